"""Cross-validated EAVSS study (issue 16): does training the EAVSS-selected layers beat training random ones?

Five question-level folds over the shared TruthfulQA questions (:class:`avss.hallucination.folds.Folds`);
every arm is trained on four folds (less a validation share for early stopping) and scored on the fifth, and
the five test folds pool into one set of per-question records, so every arm is compared with the base model
on the same questions. One process loads the model once; each step starts from a fresh copy of it and writes
``OUT/steps/STEP.json`` (skipped when it exists, so the study resumes by step). Steps:

``stats``
    every answer's own EAVSS sums (one pass over all pairs): ``OUT/answer_stats.pt``.
``ranking``
    per fold, EAVSS of the training questions only, the label-permutation null of the ranking and the
    bootstrap stability of its top-k set (no model needed once ``stats`` exists).
``tune:LR``
    the all-layers arm trained on fold ``--tune-fold``'s training questions for ``--tune-epochs`` epochs at
    learning rate ``LR`` with no early stopping: the validation-loss curve, and nothing scored on test. With
    ``--lr auto`` every ``train`` step uses the tuned rate whose best validation loss is lowest.
``base:F``, ``dola:F``
    the base model, and DoLa as its authors score multiple choice, on test fold ``F``.
``steer:SELECTION:F``
    ITI-style mean-difference steering at the chosen layers, strength tuned on validation pair accuracy
    among the strengths that raise held-out prose perplexity by at most 10%.
``train:SELECTION:SEED:F``
    contrastive mitigation of the chosen layers (``eavss``, ``lowest``, ``random``, ``all``) with seed
    ``SEED`` (the training seed, and for ``random`` also the draw), evaluated on test fold ``F``.
``table``
    pool the test folds of every arm: TruthfulQA MC1/MC2 with 95% intervals, the paired difference against
    the base model (bootstrap over questions, McNemar for MC1), the random arms as a null band, every
    metric also on the leakage-free questions; writes ``OUT/results.json`` and ``OUT/results.md``.
``grid``
    every step of the default grid (``--seeds``, ``--random-draws``), in run order.

Usage (resumable; rerun to continue)::

    python benchmarks/eavss_cv.py --model smollm2-135m --out benchmarks/eavss_cv_smollm2 grid
    python benchmarks/eavss_cv.py --model smollm2-135m --out benchmarks/eavss_cv_smollm2 table

Load the model in float32: AdamW steps of 1e-4 on bfloat16 weights of magnitude 0.05 round away (their
spacing there is 2.4e-4). ``--autocast bf16`` runs the training forward passes in bfloat16 over those float32
weights (:class:`avss.training.TrainConfig`), about twice as fast on a CPU with AVX512-BF16; one study keeps
one setting (SmolLM2's ran without).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from avss.adapters import get_adapter
from avss.data import CalibrationOptions, TextSource, resolve_data_dir
from avss.evaluation import get_task
from avss.evaluation.tasks.perplexity import PerplexityTask
from avss.evaluation.uncertainty import (
    bootstrap_mean,
    holm,
    mcnemar,
    paired_difference,
    paired_ratio_difference,
)
from avss.hallucination.answer_stats import AnswerStats, collect_answer_stats
from avss.hallucination.batches import contrastive_batches
from avss.hallucination.dola import DolaConfig, DolaModel
from avss.hallucination.folds import Folds, is_refusal, leakage_free
from avss.hallucination.heldout import evaluate_heldout
from avss.hallucination.mitigate import (
    MitigationOptions,
    MitigationResult,
    choose_layers,
    mitigate,
    pair_accuracy,
)
from avss.hallucination.pairs import load_pairs
from avss.hallucination.significance import bootstrap_topk, permutation_null
from avss.hallucination.steering import StrengthPoint, choose_strength, collect_mean_activations, steering
from avss.io import atomic_write_json, atomic_write_text
from avss.models import load_model
from avss.provenance import command_line, machine, utc_now
from avss.scorers import ScoringContext
from avss.training import AUTOCAST_MODES, TrainConfig

MC = "truthfulqa_mc"
SELECTIONS = ("eavss", "lowest", "random", "all")
STEER_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0, 8.0)
# A steering strength may raise the loss of held-out prose (the bundled calibration text, which this study
# uses for nothing else) by at most this much: perplexity up by at most 10%. Without it validation pair
# accuracy alone picks a strength that wrecks the model (at 8 on fold 0: SciQ 0.81 -> 0.30, WikiText-2
# perplexity 64,189), which ITI avoids by tuning on truthfulness times informativeness.
STEER_MAX_NLL_RISE = math.log(1.1)

STEPS_HELP = "stats | ranking | tune:LR | base:F | dola:F | steer:SEL:F | train:SEL:SEED:F | grid | table"
_SELECTION = f"(?:{'|'.join(SELECTIONS)})"
STEP = re.compile(
    rf"stats|ranking|grid|table|tune:[0-9.e+-]+|(?:base|dola):\d+|steer:{_SELECTION}:\d+"
    rf"|train:{_SELECTION}:\d+:\d+"
)


class Study:
    """The study's folds, data and outputs; ``run(step)`` does one step on a fresh copy of the model."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out: Path = args.out
        self.folds = Folds(args.folds, args.fold_seed)
        self.data_dir = resolve_data_dir(args.data_dir)
        self._loaded = None
        self._stats: AnswerStats | None = None

    @property
    def loaded(self) -> Any:
        if self._loaded is None:
            self._loaded = load_model(self.args.model, device=self.args.device, dtype=self.args.dtype)
        return self._loaded

    def pairs(self, fold: int | None, split: str | None) -> list:
        splitter = self.folds.splitter(fold) if fold is not None else self.folds.splitter(0)
        pairs = load_pairs(["truthfulqa"], self.data_dir, split=split, splitter=splitter)
        if split == "train" and self.args.drop_refusals:
            pairs = [pair for pair in pairs if not is_refusal(pair.truthful)]
        return pairs

    def stats(self) -> AnswerStats:
        if self._stats is None:
            self._stats = AnswerStats.load(self.out / "answer_stats.pt")
        return self._stats

    @functools.cached_property
    def mc_docs(self) -> list[dict[str, Any]]:
        """TruthfulQA MC's documents (the leakage filter and the guessing levels read them)."""
        docs, _ = get_task(MC)().load(self.data_dir)
        return docs

    def fold_scores(self, fold: int) -> Any:
        """EAVSS of fold ``fold``'s training questions only (the test fold never chooses layers)."""
        return self.stats().select({pair.question for pair in self.pairs(fold, "train")}).scores()

    def evaluate(self, model: Any, fold: int) -> dict[str, Any]:
        """Every evaluation task on test fold ``fold`` (per-question records) and test pair accuracy. A model
        whose logits are contrast scores (DoLa) has no perplexity, so its perplexity tasks are left out."""
        args = self.args
        transfer = args.transfer_tasks
        if getattr(model, "logits_are_scores", False):
            transfer = [task for task in transfer if not issubclass(get_task(task), PerplexityTask)]
        tasks = [MC, *transfer] if fold in args.transfer_folds else [MC]
        limits = {task: args.transfer_limit for task in transfer}
        result = evaluate_heldout(
            model,
            self.loaded.tokenizer,
            tasks,
            limits={MC: None, **limits},
            batch_size=args.eval_batch_size,
            data_dir=self.data_dir,
            splitter=self.folds.splitter(fold),
            **({"max_length": args.ppl_max_length} if "wikitext2" in tasks else {}),
        )
        batches = contrastive_batches(
            self.loaded.tokenizer, self.pairs(fold, "test"), negatives=args.negatives
        )
        result["metrics"]["pairs_test"] = {"accuracy": pair_accuracy(model, batches)}
        return result

    def options(self, seed: int, lr: float, epochs: int, patience: int | None = 1) -> MitigationOptions:
        args = self.args
        return MitigationOptions(
            contrast=args.contrast,
            tau=args.tau,
            lam=args.lam,
            negatives=args.negatives,
            max_length=args.max_length,
            questions_per_batch=args.questions_per_batch,
            train=TrainConfig(
                epochs=epochs,
                lr=lr,
                patience=patience,
                seed=seed,
                autocast=args.autocast,
                progress=False,
            ),
        )

    def learning_rate(self) -> float:
        """``--lr``, or with ``--lr auto`` the tuned rate whose best validation loss is lowest (ties: the
        smaller rate); the choice sees fold ``--tune-fold``'s validation questions only."""
        if self.args.lr != "auto":
            return float(self.args.lr)
        tuned = {}
        for rate in self.args.tune_lrs:
            path = self.step_path(f"tune:{rate:g}")
            if not path.is_file():
                raise SystemExit(f"--lr auto needs the step tune:{rate:g} first")
            tuned[rate] = min(json.loads(path.read_text())["mitigation"]["training"]["val_loss"][1:])
        return min(tuned, key=lambda rate: (tuned[rate], rate))

    def step_path(self, step: str) -> Path:
        return self.out / "steps" / f"{step.replace(':', '_')}.json"

    def run(self, step: str) -> dict[str, Any]:
        kind, *parts = step.split(":")
        record: dict[str, Any] = {"step": step}
        if kind == "stats":
            loaded = self.loaded
            stats = collect_answer_stats(loaded.model, loaded.tokenizer, self.pairs(None, None))
            stats.save(self.out / "answer_stats.pt")
            record["num_answers"] = stats.num_rows
            return record
        if kind == "ranking":
            record["folds"] = [self.ranking(fold) for fold in range(self.args.folds)]
            return record
        if kind == "tune":
            return {**record, **self.tune(float(parts[0]))}
        fold = int(parts[-1])
        self.folds.check(fold)
        model = copy.deepcopy(self.loaded.model)
        num_layers = get_adapter(model).num_layers
        if kind == "base":
            record["eval"] = self.evaluate(model, fold)
        elif kind == "dola":
            config = DolaConfig.named("paper")
            record["dola"] = config.to_dict()
            record["eval"] = self.evaluate(DolaModel(model, config), fold)
        elif kind == "steer":
            (selection,) = parts[:-1]
            layers = choose_layers(selection, self.args.k, num_layers, self.fold_scores(fold), 0)
            record.update(layers=layers, **self.steered(model, layers, fold))
        elif kind == "train":
            selection, seed = parts[0], int(parts[1])
            layers = choose_layers(selection, self.args.k, num_layers, self.fold_scores(fold), seed)
            options = self.options(seed, self.learning_rate(), self.args.epochs)
            model, result = self.mitigated(model, fold, layers, options)
            record.update(layers=layers, mitigation=result.record, eval=self.evaluate(model, fold))
        else:
            raise SystemExit(f"unknown step {step!r}")
        return record

    def ranking(self, fold: int) -> dict[str, Any]:
        train = self.stats().select({pair.question for pair in self.pairs(fold, "train")})
        args = self.args
        return {
            "fold": fold,
            "ranking": train.scores().ranking(),
            "top": train.scores().top(args.k),
            "null": permutation_null(train, args.k, permutations=args.permutations, seed=fold).to_dict(),
            "stability": bootstrap_topk(train, args.k, resamples=args.permutations, seed=fold).to_dict(),
        }

    def mitigated(
        self, model: Any, fold: int, layers: list[int], options: MitigationOptions
    ) -> tuple[Any, MitigationResult]:
        """``layers`` of ``model`` trained on fold ``fold``'s training questions, validated on its
        validation share."""
        return mitigate(
            model,
            self.loaded.tokenizer,
            self.pairs(fold, "train"),
            self.pairs(fold, "validation"),
            layers,
            options,
            splitter=self.folds.splitter(fold),
        )

    def tune(self, lr: float) -> dict[str, Any]:
        """The all-layers arm on the tuning fold at rate ``lr``, every epoch run and kept in the curve."""
        fold = self.args.tune_fold
        model = copy.deepcopy(self.loaded.model)
        layers = list(range(get_adapter(model).num_layers))
        options = self.options(0, lr, self.args.tune_epochs, patience=None)
        _, result = self.mitigated(model, fold, layers, options)
        return {"fold": fold, "lr": lr, "mitigation": result.record}

    def steered(self, model: Any, layers: list[int], fold: int) -> dict[str, Any]:
        """The steering strength with the best validation pair accuracy (never test) among those
        that keep held-out prose within :data:`STEER_MAX_NLL_RISE` of the base model's loss; then the test
        evaluation."""
        tokenizer = self.loaded.tokenizer
        directions = collect_mean_activations(model, tokenizer, self.pairs(fold, "train"), progress=False)
        directions = directions.directions(layers)
        validation = contrastive_batches(
            tokenizer, self.pairs(fold, "validation"), negatives=self.args.negatives
        )
        prose = CalibrationOptions(samples=None, max_length=256).batches(tokenizer, TextSource())
        curve = {}
        for alpha in STEER_ALPHAS:
            with steering(model, directions, alpha):
                curve[alpha] = StrengthPoint(
                    pair_accuracy(model, validation), ScoringContext(model, prose).base_nll()
                )
        best = choose_strength(curve, STEER_MAX_NLL_RISE)
        with steering(model, directions, best):
            evaluation = self.evaluate(model, fold)
        return {
            "alpha": best,
            "max_prose_nll_rise": STEER_MAX_NLL_RISE,
            "prose_tokens": prose.num_tokens,
            "validation_curve": {alpha: asdict(point) for alpha, point in curve.items()},
            "eval": evaluation,
        }

    def grid(self) -> list[str]:
        """Every step of the study in run order, so that a study cut short still compares arms: the
        training-free steps first (ranking, base, steering, DoLa), then the learning-rate tuning, then the
        trained arms with a random-k draw after each of seed 0's selected arms, the rest of the draws, and
        the further seeds last. Each arm covers every fold before the next begins."""
        args = self.args
        folds = range(args.folds)
        steps = ["stats", "ranking"]
        steps += [f"base:{f}" for f in folds]
        steps += [f"steer:{selection}:{f}" for selection in ("eavss", "random") for f in folds]
        steps += [f"dola:{f}" for f in folds]
        if args.lr == "auto":
            steps += [f"tune:{rate:g}" for rate in args.tune_lrs]
        draws = [f"random:{100 + draw}" for draw in range(args.random_draws)]
        selected = [f"{selection}:0" for selection in ("eavss", "all", "lowest")]
        arms = [arm for pair in zip(selected, draws, strict=False) for arm in pair]
        arms += selected[len(draws) :] + draws[len(selected) :]
        arms += [
            f"{selection}:{seed}" for seed in range(1, args.seeds) for selection in ("eavss", "all", "lowest")
        ]
        steps += [f"train:{arm}:{f}" for arm in arms for f in folds]
        return steps


# --- the table ------------------------------------------------------------------------------------------


def arm_of(step: str) -> str:
    """A step less its fold: ``train:random:103:2`` -> ``train:random:103``, ``base:0`` -> ``base``."""
    return step.rsplit(":", 1)[0]


def fold_of(step: str) -> int:
    """A step's test fold: ``train:random:103:2`` -> 2."""
    return int(step.rsplit(":", 1)[1])


def pooled(records: list[dict[str, Any]], metric: str) -> dict[str, float]:
    """Per-question values of ``metric`` over the test folds' records of one arm."""
    return {
        item["id"]: item["metrics"][metric]
        for record in records
        for item in record["eval"]["records"][MC]
        if metric in item["metrics"]
    }


def leakage_free_ids(study: Study) -> set[str]:
    """Test questions none of whose true answers (MC2's true choices) appears verbatim among the true answers
    of their fold's training questions: a gain there cannot be answer style learned in training."""
    docs = study.mc_docs
    truths = {
        doc["question"]: [c for c, label in zip(doc["mc2_choices"], doc["mc2_labels"], strict=True) if label]
        for doc in docs
    }
    ids = {doc["question"]: str(doc["id"]) for doc in docs}
    kept: set[str] = set()
    for fold in range(study.args.folds):
        split = study.folds.splitter(fold)
        test = {q: answers for q, answers in truths.items() if split(q) == "test"}
        train = [answer for q, answers in truths.items() if split(q) == "train" for answer in answers]
        kept.update(ids[q] for q in leakage_free(test, train))
    return kept


# A 95% interval spans 2 x 1.96 standard errors; at two-sided alpha 0.05 a true difference of
# (1.96 + 0.84) standard errors is detected with 80% power.
Z_95 = 1.96
DETECTABLE_IN_SE = Z_95 + 0.84


def chance_levels(study: Study) -> dict[str, float]:
    """What a model that scores every choice alike gets on all questions: MC1 the mean of 1 / options, MC2
    the mean share of true choices."""
    docs = study.mc_docs
    return {
        "mc1": float(np.mean([1 / len(doc["mc1_labels"]) for doc in docs])),
        "mc2": float(np.mean([sum(doc["mc2_labels"]) / len(doc["mc2_labels"]) for doc in docs])),
    }


def compare(base: dict[str, float], new: dict[str, float], binary: bool, subset: set[str] | None) -> dict:
    """``new`` against ``base`` on their shared questions (within ``subset``): the value, the paired
    difference, the smallest true difference the comparison detects with 80% power, and McNemar's p where
    both are per-question 0/1 scores."""
    ids = sorted(set(base) & set(new) & (subset if subset is not None else set(base)))
    b = np.array([base[i] for i in ids])
    n = np.array([new[i] for i in ids])
    difference = paired_difference(b, n).to_dict()
    row = {
        "n": len(ids),
        "value": bootstrap_mean(n).to_dict(),
        "difference": difference,
        "detectable": DETECTABLE_IN_SE * (difference["high"] - difference["low"]) / (2 * Z_95),
    }
    if binary:
        row["mcnemar_p"] = mcnemar(b, n).p_value
    return row


def random_mean(arms: dict[str, list[dict[str, Any]]], metric: str, kind: str = "train") -> dict[str, float]:
    """Per question, the mean of ``metric`` over the random-k arms of one kind (``train:random:*`` or
    ``steer:random``; on the questions every draw has scored): what choosing k layers at random gives,
    against which the EAVSS choice is compared question by question."""
    draws = [pooled(records, metric) for arm, records in arms.items() if arm.startswith(f"{kind}:random")]
    if not draws:
        return {}
    ids = set.intersection(*(set(draw) for draw in draws))
    return {i: float(np.mean([draw[i] for draw in draws])) for i in ids}


def table(study: Study) -> None:
    steps = {path.stem: json.loads(path.read_text()) for path in sorted((study.out / "steps").glob("*.json"))}
    arms: dict[str, list[dict[str, Any]]] = {}
    for record in steps.values():
        if "eval" in record:
            arms.setdefault(arm_of(record["step"]), []).append(record)
    if len(arms.get("base", [])) != study.args.folds:
        raise SystemExit("the table needs base:F for every fold")
    # An arm still running is compared on the test folds it has finished (its n says how many questions).
    folds = {arm: sorted(fold_of(record["step"]) for record in records) for arm, records in arms.items()}
    subsets = {"all": None, "leakage-free": leakage_free_ids(study)}
    results: dict[str, Any] = {
        "folds": study.args.folds,
        "arms": {},
        "arm_folds": folds,
        "incomplete": sorted(arm for arm in arms if len(folds[arm]) < study.args.folds),
    }
    metrics = ("mc1", "mc2")
    base = {metric: pooled(arms["base"], metric) for metric in metrics}
    # Each arm against the random layers of its own kind (steering at EAVSS layers against steering at
    # random ones); arms of a kind without random arms (DoLa) against the trained random-k draws.
    randoms = {kind: {m: random_mean(arms, m, kind) for m in metrics} for kind in ("train", "steer")}
    header = (
        "arm",
        "questions",
        "MC1 [95% CI]",
        "MC1 - base",
        "McNemar p (Holm)",
        "MC1 - random",
        "MC2 [95% CI]",
        "MC2 - base",
        "MC2 - random",
    )
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for name, subset in subsets.items():
        rows = {}
        for arm, records in sorted(arms.items()):
            rows[arm] = {
                metric: compare(base[metric], pooled(records, metric), metric == "mc1", subset)
                for metric in metrics
            }
            kind = arm.split(":")[0]
            random = randoms[kind] if randoms.get(kind, {}).get("mc1") else randoms["train"]
            if random["mc1"] and arm != "base" and not arm.startswith(f"{kind}:random"):
                for metric in metrics:
                    versus = compare(random[metric], pooled(records, metric), False, subset)
                    rows[arm][metric]["versus_random"] = versus
        tested = [arm for arm in rows if arm != "base"]
        adjusted = holm([rows[arm]["mc1"]["mcnemar_p"] for arm in tested])
        for arm, p_value in zip(tested, adjusted, strict=True):
            rows[arm]["mc1"]["mcnemar_p_holm"] = p_value
        for arm, row in rows.items():
            results["arms"].setdefault(arm, {})[name] = row
            mc1, mc2 = row["mc1"], row["mc2"]
            versus = [
                interval(row[m]["versus_random"]["difference"], True) if "versus_random" in row[m] else "-"
                for m in metrics
            ]
            holm_p = f" ({mc1['mcnemar_p_holm']:.2g})" if "mcnemar_p_holm" in mc1 else ""
            partial = f" [folds {','.join(map(str, folds[arm]))}]" if arm in results["incomplete"] else ""
            cells = [
                f"{arm}{partial} ({name})",
                str(mc1["n"]),
                interval(mc1["value"]),
                interval(mc1["difference"], True),
            ]
            cells += [f"{mc1['mcnemar_p']:.2g}{holm_p}", versus[0], interval(mc2["value"])]
            cells += [interval(mc2["difference"], True), versus[1]]
            lines.append("| " + " | ".join(cells) + " |")
    results["chance"] = chance_levels(study)
    lines += [
        "",
        f"- guessing: MC1 {results['chance']['mc1']:.3f} (mean of 1 / options), MC2 "
        f"{results['chance']['mc2']:.3f} (a uniform scorer: the share of true choices)",
        "- MC1 - random, MC2 - random: paired, against the random layers of the same kind of arm (steering"
        " at random layers for steering; the trained random-k draws, per question mean, for trained arms and"
        " DoLa)",
    ]
    lines += [*detectable(results), "", *null_band(results), "", *tuning_curves(steps, results)]
    lines += ["", *transfer(arms, results), "", *ranking_summary(steps, results)]
    results["created"] = utc_now()
    results["command"] = f"python benchmarks/{command_line()}"
    atomic_write_json(study.out / "results.json", results)
    atomic_write_text(study.out / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def detectable(results: dict[str, Any]) -> list[str]:
    """The power of the table in one line per subset: the median over arms of the smallest true paired
    difference (against base, and against the random draws) detected with 80% power."""
    lines = []
    for subset in ("all", "leakage-free"):
        rows = [arm[subset] for name, arm in results["arms"].items() if name != "base"]
        if not rows:
            continue
        parts = []
        for metric in ("mc1", "mc2"):
            against_base = np.median([row[metric]["detectable"] for row in rows])
            parts.append(f"{metric.upper()} {against_base:.3f} against base")
            versus = [
                row[metric]["versus_random"]["detectable"] for row in rows if "versus_random" in row[metric]
            ]
            if versus:
                parts.append(f"{np.median(versus):.3f} against random")
        lines.append(f"- detectable with 80% power ({subset}, median over arms): " + "; ".join(parts))
    return lines


def null_band(results: dict[str, Any]) -> list[str]:
    """The random-k arms' paired differences against base as a null band (median, 5% and 95% over draws),
    stored in ``results["random_band"]``; every other arm's difference is read against it."""
    draws = [rows for arm, rows in results["arms"].items() if arm.startswith("train:random:")]
    if not draws:
        return ["No random-k arm is finished yet: no null band."]
    if len(draws) == 1:  # one draw has no spread: its own paired interval is in the table above
        return ["One random-k draw is finished: no null band yet (its paired difference is in the table)."]
    lines = [f"Random-k null band over {len(draws)} draws (difference against base: median [5%, 95%]):", ""]
    results["random_band"] = {}
    for subset in ("all", "leakage-free"):
        for metric in ("mc1", "mc2"):
            values = np.array([rows[subset][metric]["difference"]["estimate"] for rows in draws])
            band = {q: float(np.quantile(values, q)) for q in (0.05, 0.5, 0.95)}
            results["random_band"][f"{subset}.{metric}"] = band
            lines.append(f"- {metric} ({subset}): {band[0.5]:+.3f} [{band[0.05]:+.3f}, {band[0.95]:+.3f}]")
    return lines


def transfer(arms: dict[str, list[dict[str, Any]]], results: dict[str, Any]) -> list[str]:
    """What mitigation costs elsewhere, on the transfer folds: every other task's paired difference against
    the base model on the same examples (accuracy; WikiText-2 as the change in NLL, nats per token), stored
    in ``results["transfer"]``."""

    def by_fold(records: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
        return {fold_of(record["step"]): record for record in records}

    base = by_fold(arms["base"])
    rows: dict[str, dict[str, Any]] = {}
    for arm, records in sorted(arms.items()):
        for fold, record in by_fold(records).items():
            for task, items in record["eval"]["records"].items():
                if task == MC or arm == "base":
                    continue
                reference = {item["id"]: item for item in base[fold]["eval"]["records"][task]}
                ids = [item["id"] for item in items if item["id"] in reference]
                new = {item["id"]: item for item in items}
                if "nll" in items[0]:
                    if "dola" in record:
                        continue  # a step recorded before perplexity was refused for DoLa's scores
                    columns = [
                        [source[i][key] for i in ids]
                        for source in (reference, new)
                        for key in ("nll", "num_tokens")
                    ]
                    difference, metric = paired_ratio_difference(*columns), "NLL per token"
                else:
                    before = [reference[i]["metrics"]["accuracy"] for i in ids]
                    after = [new[i]["metrics"]["accuracy"] for i in ids]
                    difference, metric = paired_difference(before, after), "accuracy"
                rows.setdefault(arm, {})[f"{task}:{fold}"] = {
                    "metric": metric,
                    "n": len(ids),
                    "difference": difference.to_dict(),
                }
    if not rows:
        return []
    results["transfer"] = rows
    lines = [
        "Other tasks on the transfer folds, paired against base (accuracy; WikiText-2 NLL, nats/token):",
        "",
    ]
    for arm, tasks in rows.items():
        parts = [
            f"{task} {row['metric']} {interval(row['difference'], True)} (n = {row['n']})"
            for task, row in tasks.items()
        ]
        lines.append(f"- {arm}: " + "; ".join(parts))
    return lines


def ranking_summary(steps: dict[str, dict[str, Any]], results: dict[str, Any]) -> list[str]:
    """Per fold, whether the EAVSS ranking of the training questions differs from shuffled labels (the
    top-k gap's permutation p) and how stable its top-k set is over bootstrap resamples of the questions;
    stored in ``results["ranking"]``."""
    if "ranking" not in steps:
        return []
    rows = []
    lines = [
        "EAVSS ranking per fold (training questions only): top-k, label-permutation p of the top-k gap, "
        "bootstrap Jaccard of the top-k set (mean), share of resamples keeping each top layer:",
        "",
    ]
    for fold in steps["ranking"]["folds"]:
        null, stability = fold["null"], fold["stability"]
        inclusion = {layer: stability["inclusion"][layer] for layer in fold["top"]}
        rows.append(
            {
                "fold": fold["fold"],
                "top": fold["top"],
                "p_value": null["p_value"],
                "permutations": null["permutations"],
                "jaccard_mean": stability["jaccard"]["mean"],
                "inclusion": inclusion,
            }
        )
        kept = ", ".join(f"{layer}: {share:.2f}" for layer, share in inclusion.items())
        lines.append(
            f"- fold {fold['fold']}: top {fold['top']}, p = {null['p_value']:.3f} "
            f"({null['permutations']} shuffles), Jaccard {stability['jaccard']['mean']:.2f}, kept {kept}"
        )
    results["ranking"] = rows
    return lines


def tuning_curves(steps: dict[str, dict[str, Any]], results: dict[str, Any]) -> list[str]:
    """The all-layers arm's validation loss after every epoch at each tuned rate (epoch 0: before training),
    stored in ``results["tuning"]``: the evidence that the training budget moves the model."""
    tuned = [record for record in steps.values() if record["step"].startswith("tune:")]
    if not tuned:
        return []
    results["tuning"] = {}
    lines = ["Validation loss of the all-layers arm per epoch (epoch 0 = before training):", ""]
    for record in sorted(tuned, key=lambda r: r["lr"]):
        mitigation = record["mitigation"]
        curve = mitigation["training"]["val_loss"]
        pairs = mitigation["val_pair_accuracy"]
        results["tuning"][f"{record['lr']:g}"] = {
            "fold": record["fold"],
            "val_loss": curve,
            "val_pair_accuracy": pairs,
            "val_pairs": mitigation["val_pairs"],
        }
        losses = ", ".join(f"{value:.3f}" for value in curve)
        lines.append(
            f"- lr {record['lr']:g} (fold {record['fold']}): {losses}; "
            f"validation pair accuracy {pairs['before']:.3f} -> {pairs['after']:.3f}"
        )
    return lines


def interval(value: dict[str, Any], sign: bool = False) -> str:
    number = "{:+.3f}" if sign else "{:.3f}"
    return (
        f"{number.format(value['estimate'])} [{number.format(value['low'])}, {number.format(value['high'])}]"
    )


# --- command line ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "steps",
        nargs="+",
        help=STEPS_HELP,
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--autocast", default="auto", choices=AUTOCAST_MODES)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--fold-seed", type=int, default=0)
    parser.add_argument("--drop-refusals", action="store_true")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument(
        "--seeds", type=int, default=3, help="training seeds of the eavss, all and lowest arms"
    )
    parser.add_argument("--random-draws", type=int, default=10, help="random-k arms (one seed each)")
    parser.add_argument("--permutations", type=int, default=1000)
    parser.add_argument("--contrast", default="infonce")
    parser.add_argument("--tau", type=float, default=0.1)
    parser.add_argument("--lam", type=float, default=0.5)
    parser.add_argument("--negatives", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--questions-per-batch", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=1, help="most epochs per fold (early stopping)")
    parser.add_argument("--lr", default="1e-4", help="a learning rate, or auto (the best tune:LR)")
    parser.add_argument(
        "--tune-lrs", default="1e-5,3e-5,1e-4", type=lambda s: [float(r) for r in s.split(",")]
    )
    parser.add_argument("--tune-epochs", type=int, default=4)
    parser.add_argument("--tune-fold", type=int, default=0)
    parser.add_argument(
        "--transfer-tasks", default="sciq,arc_easy,wikitext2", type=lambda s: [t for t in s.split(",") if t]
    )
    parser.add_argument("--transfer-folds", default="0", type=lambda s: {int(f) for f in s.split(",") if f})
    parser.add_argument("--transfer-limit", type=int, default=200, help="per task and test fold")
    parser.add_argument("--ppl-max-length", type=int, default=512)
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="start no step after this")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    unknown = [step for step in args.steps if not STEP.fullmatch(step)]
    if unknown:
        raise SystemExit(f"unknown step {unknown[0]!r}; steps: {STEPS_HELP}")
    study = Study(args)
    # "grid" stands for every grid step not named before it: `base:0 tune:1e-4 grid` runs those two first;
    # "table" is written after every step named.
    expanded = [name for step in args.steps for name in (study.grid() if step == "grid" else [step])]
    steps = [step for step in dict.fromkeys(expanded) if step != "table"]
    (args.out / "steps").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for step in steps:
        path = study.step_path(step)
        if path.is_file():
            continue
        if time.perf_counter() - started > args.budget_s:
            print(f"budget spent; stopping before {step}", flush=True)
            break
        step_started = time.perf_counter()
        record = study.run(step)
        record.update(
            args={
                k: sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v
                for k, v in vars(args).items()
            },
            machine=machine(),
            model=study.loaded.source if step != "ranking" else None,
            wall_time_s=round(time.perf_counter() - step_started, 3),
            finished=utc_now(),
        )
        atomic_write_json(path, record)
        print(f"{step}: {record['wall_time_s']:.0f} s", flush=True)
    if "table" in args.steps:
        table(study)


if __name__ == "__main__":
    main()
