"""The ``avss hallucination`` and ``avss mitigate`` workflows: load pairs, score, choose layers, train in
rounds, evaluate on held-out questions and save, each step a library function; this module only composes them.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from avss.adapters import get_adapter
from avss.data import resolve_data_dir
from avss.errors import DataError, MitigationConfigError
from avss.evaluation.base import get_task
from avss.hallucination.batches import contrastive_batches
from avss.hallucination.folds import Folds, is_refusal
from avss.hallucination.heldout import evaluate_heldout
from avss.hallucination.mitigate import (
    MITIGATION_FORMAT,
    MitigationOptions,
    choose_layers,
    given_layers,
    mitigate,
    needs_scores,
    pair_accuracy,
    save_mitigated,
)
from avss.hallucination.pairs import Pair, Splitter, load_pairs, split_of
from avss.hallucination.scoring import EavssOptions, EavssRun, score_eavss
from avss.models import LoadedModel
from avss.provenance import Provenance
from avss.stats.checkpoint import checkpoint_dir


def greedy_generator(model: Any, tokenizer: Any, batch_size: int = 8) -> Callable[[list[str]], list[str]]:
    """Prompts -> the model's greedy short answers, cut like the NQ-open / TriviaQA evaluation tasks."""
    from avss.evaluation import LanguageModel

    lm = LanguageModel(model, tokenizer, batch_size=batch_size)
    return lambda prompts: lm.generate(prompts, until=("\n", ".", ","), max_new_tokens=16)


@dataclass
class PairSpec:
    """Which pairs to use: sources, data directory, and at most ``limit`` per source and split.

    Questions are split by :func:`~avss.hallucination.pairs.split_of`, or, with ``folds``, by
    ``folds``-fold cross-validation (:class:`~avss.hallucination.folds.Folds`, seed ``fold_seed``) with test
    fold ``fold``. ``drop_refusals`` leaves training pairs whose truthful answer is a refusal ("I have no
    comment") out, so a gain cannot come from learning that answer style.
    """

    sources: tuple[str, ...] = ("truthfulqa",)
    data_dir: str | None = None
    limit: int | None = None
    val_limit: int | None = None
    folds: int | None = None
    fold: int = 0
    fold_seed: int = 0
    drop_refusals: bool = False

    def __post_init__(self) -> None:
        """Reject an impossible fold before the model loads."""
        self.splitter()

    def splitter(self) -> Splitter:
        if self.folds is None:
            return split_of
        return Folds(self.folds, self.fold_seed).splitter(self.fold)

    def load(self, loaded: LoadedModel, split: str, cache_dir: Path | None) -> list[Pair]:
        directory = resolve_data_dir(self.data_dir)
        if directory is None:
            raise DataError("no data directory found: pass --data-dir or set AVSS_DATA_DIR")
        limit = self.val_limit if split == "validation" else self.limit
        pairs = load_pairs(
            self.sources,
            directory,
            split=split,
            limit=limit,
            generate=greedy_generator(loaded.model, loaded.tokenizer),
            cache_dir=cache_dir,
            splitter=self.splitter(),
        )
        if self.drop_refusals and split == "train":
            pairs = [pair for pair in pairs if not is_refusal(pair.truthful)]
        return pairs


def hallucination_scores(
    loaded: LoadedModel,
    pairs: PairSpec,
    options: EavssOptions,
    out: Path | None = None,
    progress: bool = True,
) -> EavssRun:
    """EAVSS of every layer on the train-split pairs (written to ``out`` when given)."""
    train_pairs = pairs.load(loaded, "train", out)
    run = score_eavss(
        loaded.model,
        loaded.tokenizer,
        train_pairs,
        options,
        progress,
        model_info=loaded.source,
        splitter=pairs.splitter(),
    )
    run.provenance["pair_spec"] = asdict(pairs)
    if out is not None:
        run.save(out)
    return run


@dataclass
class MitigationPlan:
    """A full ``avss mitigate`` run: which layers, how many rounds, what to evaluate."""

    layers: str = "auto"
    k: int = 4
    rounds: int = 1
    seed: int = 0
    eval_tasks: tuple[str, ...] = ()
    eval_limits: dict[str, int | None] = field(default_factory=dict)
    eval_batch_size: int = 8
    eval_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """A bad layer choice, count or task fails here, before the model loads and EAVSS is measured."""
        given_layers(self.layers)
        for name, value in (
            ("k", self.k),
            ("rounds", self.rounds),
            ("eval_batch_size", self.eval_batch_size),
        ):
            if value < 1:
                raise MitigationConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        for task in self.eval_tasks:
            get_task(task)


def mitigation_run(
    loaded: LoadedModel,
    pairs: PairSpec,
    plan: MitigationPlan,
    options: MitigationOptions,
    eavss: EavssOptions,
    out: Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Score, choose layers, train; repeat for ``plan.rounds`` while validation pair accuracy improves.

    Returns the record (also saved beside the model in ``out``). With ``plan.eval_tasks`` the base and the
    mitigated model are evaluated on test-split questions. Per-epoch checkpoints go to
    ``options.train.checkpoint_dir`` (default ``OUT.checkpoint``, removed once the model is saved), one folder
    per round (``round-0``, ...) so that with ``options.train.resume`` every round continues from its own
    epochs: finished rounds reload their result and the interrupted one goes on where it stopped.
    """
    started = time.perf_counter()
    given = options.train.checkpoint_dir
    checkpoints = Path(given) if given else checkpoint_dir(out) if out is not None else None
    cache = out.parent / f".{out.name}.cache" if out is not None else None
    train_pairs = pairs.load(loaded, "train", cache)
    val_pairs = pairs.load(loaded, "validation", cache)
    test_pairs = pairs.load(loaded, "test", cache)
    model, tokenizer = loaded.model, loaded.tokenizer
    splitter = pairs.splitter()
    heldout = dict(
        limits=plan.eval_limits,
        batch_size=plan.eval_batch_size,
        data_dir=pairs.data_dir,
        splitter=splitter,
        **plan.eval_options,
    )
    test_batches = contrastive_batches(
        tokenizer, test_pairs, negatives=options.negatives, max_length=options.max_length
    )
    record: dict[str, Any] = {
        "plan": asdict(plan),
        "pair_spec": asdict(pairs),
        "rounds": [],
    }
    if plan.eval_tasks:
        record["before"] = evaluate_heldout(model, tokenizer, plan.eval_tasks, **heldout)
    record["test_pair_accuracy_before"] = pair_accuracy(model, test_batches)
    val_batches = contrastive_batches(
        tokenizer, val_pairs, negatives=options.negatives, max_length=options.max_length
    )
    best = pair_accuracy(model, val_batches)
    for round_index in range(plan.rounds):
        snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()} if round_index else None
        scores = (
            score_eavss(model, tokenizer, train_pairs, eavss, progress) if needs_scores(plan.layers) else None
        )
        layers = choose_layers(
            plan.layers, plan.k, get_adapter(model).num_layers, scores and scores.scores, plan.seed
        )
        model, result = mitigate(
            model,
            tokenizer,
            train_pairs,
            val_pairs,
            layers,
            round_options(options, checkpoints, round_index),
            splitter=splitter,
        )
        accuracy = pair_accuracy(model, val_batches)
        record["rounds"].append(
            {
                "round": round_index,
                "layers": layers,
                "eavss": scores.to_dict() if scores else None,
                "mitigation": result.record,
                "val_pair_accuracy": accuracy,
            }
        )
        if round_index and accuracy <= best:
            assert snapshot is not None
            model.load_state_dict(snapshot)
            record["rounds"][-1]["reverted"] = True
            break
        best = max(best, accuracy)
    loaded.model = model
    record["test_pair_accuracy_after"] = pair_accuracy(model, test_batches)
    if plan.eval_tasks:
        record["after"] = evaluate_heldout(model, tokenizer, plan.eval_tasks, **heldout)
    record["wall_time_s"] = round(time.perf_counter() - started, 3)
    record = {**Provenance.now(MITIGATION_FORMAT, model=loaded.source).to_dict(), **record}
    if out is not None:
        save_mitigated(model, tokenizer, out, record, overwrite=overwrite)
        if checkpoints is not None:
            shutil.rmtree(checkpoints, ignore_errors=True)
    return record


def round_options(options: MitigationOptions, checkpoints: Path | None, index: int) -> MitigationOptions:
    """``options`` with round ``index``'s own checkpoint folder: rounds train different states (and
    often different layers), so sharing one would resume a round from another round's epochs."""
    if checkpoints is None:
        return options
    folder = checkpoints / f"round-{index}"
    return replace(options, train=replace(options.train, checkpoint_dir=str(folder)))


def comparison_rows(record: dict[str, Any]) -> list[tuple[str, str, float, float]]:
    """(task, metric, before, after) for the before/after table."""
    rows = [
        ("pairs(test)", "accuracy", record["test_pair_accuracy_before"], record["test_pair_accuracy_after"])
    ]
    for task, metrics in record.get("before", {}).get("metrics", {}).items():
        for metric, value in metrics.items():
            rows.append((task, metric, value, record["after"]["metrics"][task][metric]))
    return rows
