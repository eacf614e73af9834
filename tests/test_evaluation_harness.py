"""Cross-check with lm-evaluation-harness (the optional ``harness`` extra): same items, same tiny model, same
TruthfulQA MC1/MC2 and SciQ accuracies. Skipped when ``lm_eval`` is not installed; runs offline through local
task YAMLs that include lm-eval's own task configs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from _tiny_eval import FIXTURES, bpe_llama, bpe_tokenizer
from avss.data import default_data_dir, read_jsonl
from avss.evaluation import TASKS, evaluate
from avss.evaluation.engine import LanguageModel
from avss.evaluation.harness import sciq_hub_order, write_local_config, write_local_task

lm_eval = pytest.importorskip("lm_eval")
# The first 40 test items include two with an empty support (rows 35 and 37), whose prompt starts with "\n".
SCIQ_ITEMS = 40


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """lm-eval and ``datasets`` may read only the local files the tests write."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _local_truthfulqa_tasks(directory: Path) -> list[str]:
    """lm-eval's own truthfulqa_mc1/mc2 configs, pointed at our fixture rows converted to the hub schema."""
    rows = [
        {
            "question": row["question"],
            "mc1_targets": {"choices": row["choices"], "labels": row["mc1_labels"]},
            "mc2_targets": {"choices": row["mc2_choices"], "labels": row["mc2_labels"]},
        }
        for row in read_jsonl(FIXTURES / "truthfulqa" / "truthfulqa_mc.jsonl")
    ]
    return [
        write_local_config(
            directory, f"truthfulqa/truthfulqa_{metric}.yaml", "validation", rows, f"avss_truthfulqa_{metric}"
        )
        for metric in ("mc1", "mc2")
    ]


def _harness_run(model: Any, tokenizer: Any, directory: Path, names: list[str]) -> dict[str, Any]:
    """lm-eval's output (results and per-document samples) for the local tasks in ``directory``, scored on the
    same in-memory model."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    # The tokenizer prepends <s>, and avss keeps it; tell lm-eval to keep it too.
    harness = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, add_bos_token=True)
    manager = TaskManager(include_path=str(directory))
    return simple_evaluate(model=harness, tasks=names, task_manager=manager, log_samples=True)


@pytest.mark.slow
def test_truthfulqa_mc_matches_lm_eval(tmp_path, offline):
    model, tokenizer = bpe_llama(), bpe_tokenizer()
    ours = evaluate(model, tokenizer, ["truthfulqa_mc"], data_dir=FIXTURES).tasks["truthfulqa_mc"].metrics

    names = _local_truthfulqa_tasks(tmp_path)
    theirs = _harness_run(model, tokenizer, tmp_path, names)["results"]
    print("avss", ours, "lm-eval", {name: theirs[name]["acc,none"] for name in names})
    assert ours["mc1"] == pytest.approx(theirs[names[0]]["acc,none"], abs=1e-4)
    assert ours["mc2"] == pytest.approx(theirs[names[1]]["acc,none"], abs=1e-4)


@pytest.mark.slow
def test_sciq_matches_lm_eval(tmp_path, offline):
    """On the first shared SciQ test items, our ``sciq`` accuracies equal those of lm-eval's ``sciq`` task.

    A random tiny model rarely changes its argmax when the prompt changes, so every option's log-likelihood is
    compared too: that is what pins prompt, tokenization and truncation (most supports exceed the model's 256
    positions) to lm-eval's."""
    shared = default_data_dir()
    if shared is None or not (shared / "sciq" / "sciq_test.jsonl").is_file():
        pytest.skip("no SciQ data: ../shared/data/sciq/sciq_test.jsonl (or $AVSS_DATA_DIR/sciq) is absent")
    rows = read_jsonl(shared / "sciq" / "sciq_test.jsonl")[:SCIQ_ITEMS]
    ours_dir = tmp_path / "data"
    (ours_dir / "sciq").mkdir(parents=True)
    (ours_dir / "sciq" / "sciq_test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    model, tokenizer = bpe_llama(), bpe_tokenizer()
    ours = evaluate(model, tokenizer, ["sciq"], data_dir=ours_dir).tasks["sciq"].metrics
    task, lm = TASKS["sciq"](), LanguageModel(model, tokenizer)
    our_logprobs = [[result.logprob for result in lm.loglikelihood(task.requests(row, []))] for row in rows]

    name = write_local_task(tmp_path, "sciq", rows)
    run = _harness_run(model, tokenizer, tmp_path, [name])
    theirs = run["results"][name]
    print("avss", ours, "lm-eval", {key: theirs[key] for key in ("acc,none", "acc_norm,none")})
    for sample in run["samples"][name]:
        row = rows[sample["doc_id"]]
        # lm-eval's options are [distractor1, distractor2, distractor3, correct_answer].
        mine = [our_logprobs[sample["doc_id"]][i] for i in sciq_hub_order(row)]
        assert mine == pytest.approx([logprob for logprob, _ in sample["filtered_resps"]], abs=1e-4)
    assert len(run["samples"][name]) == len(rows)
    assert ours["accuracy"] == pytest.approx(theirs["acc,none"], abs=1e-4)
    assert ours["accuracy_norm"] == pytest.approx(theirs["acc_norm,none"], abs=1e-4)


@pytest.mark.slow
def test_pruned_directory_evaluates_with_lm_eval_hf_model(tmp_path, offline):
    """A folder written by avss prune is a plain HF model for ``lm_eval --model hf``."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from avss.adapters import remove_layers
    from avss.pruning.prune import PruningRecord, save_pruned

    model, tokenizer = bpe_llama(), bpe_tokenizer()
    kept = remove_layers(model, [0])
    record = PruningRecord({"name": "tiny"}, [0], kept, len(kept) + 1, "avss", {"rule": "count"})
    save_pruned(model, tokenizer, tmp_path / "pruned", record)
    ours = evaluate(model, tokenizer, ["truthfulqa_mc"], data_dir=FIXTURES).tasks["truthfulqa_mc"].metrics

    names = _local_truthfulqa_tasks(tmp_path)
    theirs = simple_evaluate(
        model="hf",
        model_args=f"pretrained={tmp_path / 'pruned'},add_bos_token=True",
        tasks=names[:1],
        task_manager=TaskManager(include_path=str(tmp_path)),
        batch_size=4,
        device="cpu",
    )["results"]
    assert ours["mc1"] == pytest.approx(theirs[names[0]]["acc,none"], abs=1e-4)


@pytest.mark.slow
def test_evaluate_runs_harness_tasks_on_the_in_memory_model(tmp_path, offline):
    """``evaluate(..., harness=[...])`` (``avss eval --harness``) scores the same model through HFLM."""
    model, tokenizer = bpe_llama(), bpe_tokenizer()
    names = _local_truthfulqa_tasks(tmp_path)
    result = evaluate(
        model,
        tokenizer,
        ["truthfulqa_mc"],
        data_dir=FIXTURES,
        harness=names[:1],
        harness_include=str(tmp_path),
    )
    harness_mc1 = result.tasks[f"harness:{names[0]}"].metrics["acc"]
    assert harness_mc1 == pytest.approx(result.tasks["truthfulqa_mc"].metrics["mc1"], abs=1e-4)
    assert result.options["harness"] == names[:1]
