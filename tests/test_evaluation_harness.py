"""Cross-check with lm-evaluation-harness (the optional ``harness`` extra): same items, same tiny model, same
MC1/MC2. Skipped when ``lm_eval`` is not installed; runs offline through a local task YAML."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _tiny_eval import FIXTURES, bpe_llama, bpe_tokenizer
from avss.evaluation import evaluate

lm_eval = pytest.importorskip("lm_eval")


def _local_truthfulqa_tasks(directory: Path) -> list[str]:
    """lm-eval's own truthfulqa_mc1/mc2 configs, pointed at our fixture rows converted to the hub schema."""
    source = FIXTURES / "truthfulqa" / "truthfulqa_mc.jsonl"
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    data = directory / "truthfulqa_mc.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "question": row["question"],
                    "mc1_targets": {"choices": row["choices"], "labels": row["mc1_labels"]},
                    "mc2_targets": {"choices": row["mc2_choices"], "labels": row["mc2_labels"]},
                }
            )
            + "\n"
            for row in rows
        )
    )
    builtin = Path(lm_eval.__file__).parent / "tasks" / "truthfulqa"
    names = []
    for metric in ("mc1", "mc2"):
        name = f"avss_truthfulqa_{metric}"
        (directory / f"{name}.yaml").write_text(
            f"include: {builtin / f'truthfulqa_{metric}.yaml'}\n"
            f"task: {name}\n"
            "tag: []\n"
            "dataset_path: json\n"
            "dataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    validation: {data}\n"
        )
        names.append(name)
    return names


@pytest.mark.slow
def test_truthfulqa_mc_matches_lm_eval(tmp_path, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = bpe_llama(), bpe_tokenizer()
    ours = evaluate(model, tokenizer, ["truthfulqa_mc"], data_dir=FIXTURES).tasks["truthfulqa_mc"].metrics

    names = _local_truthfulqa_tasks(tmp_path)
    # The tokenizer prepends <s>, and avss keeps it; tell lm-eval to keep it too.
    harness = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, add_bos_token=True)
    manager = TaskManager(include_path=str(tmp_path))
    theirs = simple_evaluate(model=harness, tasks=names, task_manager=manager)["results"]
    print("avss", ours, "lm-eval", {name: theirs[name]["acc,none"] for name in names})
    assert ours["mc1"] == pytest.approx(theirs[names[0]]["acc,none"], abs=1e-4)
    assert ours["mc2"] == pytest.approx(theirs[names[1]]["acc,none"], abs=1e-4)


@pytest.mark.slow
def test_pruned_directory_evaluates_with_lm_eval_hf_model(tmp_path, monkeypatch):
    """A folder written by avss prune is a plain HF model for ``lm_eval --model hf``."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from avss.prune import PruningRecord, remove_layers, save_pruned

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
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
def test_evaluate_runs_harness_tasks_on_the_in_memory_model(tmp_path, monkeypatch):
    """``evaluate(..., harness=[...])`` (``avss eval --harness``) scores the same model through HFLM."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
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
