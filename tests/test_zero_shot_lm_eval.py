"""The zero-shot suite of the depth-pruning papers against lm-evaluation-harness's own task configs.

For each task, about 40 items of the shared file, written back in the hub schema lm-eval's YAML reads, go
through lm-eval (in-process, the tiny random BPE Llama) and through avss: accuracy, accuracy_norm (where
lm-eval reports it), LAMBADA's perplexity and every request's log-likelihood must agree to 1e-4. A random
model rarely changes an argmax when a prompt changes, so the per-request log-likelihoods are what pin each
prompt, target delimiter and option order to lm-eval's. Skipped when ``lm_eval`` or a shared file is absent.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from _tiny_eval import bpe_llama, bpe_tokenizer
from avss.data import default_data_dir, read_jsonl
from avss.evaluation import evaluate, get_task
from avss.evaluation.engine import LanguageModel

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (the harness extra)")
from avss.evaluation.harness import HARNESS_TASKS, write_local_task  # noqa: E402
from test_evaluation_harness import _harness_run  # noqa: E402

ITEMS = 40
Row = dict[str, Any]


Extra = Callable[[list[Row], LanguageModel, Callable[[Row], bool]], list[Row]]


def _arc_quirks(later: list[Row], lm: LanguageModel, fits: Callable[[Row], bool]) -> list[Row]:
    """Up to 4 later ARC rows with 3 or 5 options or numeric labels, so the sample covers them."""
    quirky = (row for row in later if len(row["choices"]) != 4 or not row["labels"][0].isalpha())
    return list(itertools.islice((row for row in quirky if fits(row)), 4))


def _lambada_greedy(later: list[Row], lm: LanguageModel, fits: Callable[[Row], bool]) -> list[Row]:
    """Passages whose last word is replaced by the tiny model's greedy next token where that token is a
    printable " word": the random model never predicts a real last word, so without these accuracy and
    ``is_greedy`` would only ever be compared at 0."""
    contexts = [" ".join(row["text"].split(" ")[:-1]) for row in later[:200]]
    tokens = lm.generate(contexts, max_new_tokens=1)
    return [
        {**row, "id": f"{row['id']}_greedy", "text": context + token}
        for row, context, token in zip(later, contexts, tokens, strict=False)
        if token.startswith(" ") and token[1:].isprintable() and token[1:] and " " not in token[1:]
    ]


# task -> extra rows to include beside the first ITEMS (lm-eval's config and schema: HARNESS_TASKS)
EXTRAS: dict[str, Extra] = {
    "arc_easy": _arc_quirks,
    "arc_challenge": _arc_quirks,
    "lambada_openai": _lambada_greedy,
}
CASES = [task for task in HARNESS_TASKS if task != "sciq"]  # SciQ: test_evaluation_harness.py
# lm-eval's metric name for each of ours, per task.
METRICS = {
    "arc_easy": {"accuracy": "acc", "accuracy_norm": "acc_norm"},
    "arc_challenge": {"accuracy": "acc", "accuracy_norm": "acc_norm"},
    "piqa": {"accuracy": "acc", "accuracy_norm": "acc_norm"},
    "boolq": {"accuracy": "acc"},
    "winogrande": {"accuracy": "acc"},
    "openbookqa": {"accuracy": "acc", "accuracy_norm": "acc_norm"},
    "lambada_openai": {"accuracy": "acc", "perplexity": "perplexity"},
}


def _sample(task: str, path: Path, lm: LanguageModel) -> list[Row]:
    """The first ``ITEMS`` rows and the task's extra rows drawn from those after them, leaving out rows with
    a continuation longer than the tiny model's window in the tiny tokenizer's tokens (a few long PIQA
    solutions): lm-eval refuses those (an assertion), avss scores their last ``max_length`` tokens."""
    task_ = get_task(task)()

    def fits(row: Row) -> bool:
        (doc,) = task_.documents([row], task)
        return all(
            len(lm.encode(r.context + r.continuation)) - len(lm.encode(r.context)) <= lm.max_length
            for r in task_.requests(doc, [])
        )

    rows, extra = read_jsonl(path), EXTRAS.get(task)
    first = list(itertools.islice((index for index, row in enumerate(rows) if fits(row)), ITEMS))
    sample = [rows[i] for i in first]
    return sample + (extra(rows[first[-1] + 1 :], lm, fits) if extra else [])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """For every task whose shared file exists: its sampled rows, our metrics and per-request
    log-likelihoods, and lm-eval's results and samples (one lm-eval run for all of them)."""
    shared = default_data_dir()
    model, tokenizer = bpe_llama(), bpe_tokenizer()
    lm = LanguageModel(model, tokenizer)
    directory = tmp_path_factory.mktemp("zero_shot")
    out: dict[str, Any] = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setenv("HF_HUB_OFFLINE", "1")
        for task in CASES:
            cls = get_task(task)
            relative = next(iter(cls.files.values()))
            if shared is None or not (shared / relative).is_file():
                continue
            rows = _sample(task, shared / relative, lm)
            ours_dir = directory / "data"
            (ours_dir / relative).parent.mkdir(parents=True, exist_ok=True)
            (ours_dir / relative).write_text("".join(json.dumps(row) + "\n" for row in rows))
            instance = cls()
            docs = instance.documents(rows, task)
            results = [lm.loglikelihood(instance.requests(doc, [])) for doc in docs]
            metrics = evaluate(model, tokenizer, [task], data_dir=ours_dir).tasks[task].metrics
            name = write_local_task(directory, task, rows)
            out[task] = {"rows": rows, "results": results, "metrics": metrics, "name": name}
        if out:
            run = _harness_run(model, tokenizer, directory, [case["name"] for case in out.values()])
            for case in out.values():
                case["theirs"] = run["results"][case["name"]]
                case["samples"] = run["samples"][case["name"]]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("task", CASES)
def test_zero_shot_task_matches_lm_eval(task: str, runs: dict[str, Any]):
    if task not in runs:
        pytest.skip(f"no {task} data: ../shared/data/{next(iter(get_task(task).files.values()))} is absent")
    case = runs[task]
    theirs = {ours: case["theirs"][f"{metric},none"] for ours, metric in METRICS[task].items()}
    print(task, "avss", case["metrics"], "lm-eval", theirs)
    assert len(case["samples"]) == len(case["rows"])
    for sample in case["samples"]:
        mine = case["results"][sample["doc_id"]]
        assert [result.logprob for result in mine] == pytest.approx(
            [float(logprob) for logprob, _ in sample["filtered_resps"]], abs=1e-4
        )
        if task == "lambada_openai":
            assert [result.is_greedy for result in mine] == [bool(g) for _, g in sample["filtered_resps"]]
    assert set(case["metrics"]) == set(METRICS[task])
    if task == "lambada_openai":
        assert 0 < case["metrics"]["accuracy"] < 1  # greedy and non-greedy last words both compared
    for metric, value in theirs.items():
        assert case["metrics"][metric] == pytest.approx(value, abs=1e-4, rel=1e-4), metric
