"""Tasks, the ``evaluate`` API, result files and ``avss eval`` on tiny models and the fixture data."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from _tiny import tiny_model, tiny_tokenizer
from _tiny_eval import FIXTURES, bpe_llama, bpe_tokenizer
from avss.errors import DataError, UnsupportedArchitectureError
from avss.evaluation import TASKS, EvalResult, evaluate, get_task
from avss.evaluation.base import FewShotSampler
from avss.evaluation.uncertainty import Bootstrap, PairingError

EXPECTED_METRICS = {
    "wikitext2": {"perplexity"},
    "perplexity": {"perplexity"},
    "truthfulqa_mc": {"mc1", "mc2", "mc3"},
    "sciq": {"accuracy", "accuracy_norm"},
    "nq_open": {"exact_match", "f1"},
    "triviaqa": {"exact_match", "f1"},
    "wikiqa": {"map", "mrr"},
    "sst2": {"accuracy"},
    "rotten_tomatoes": {"accuracy"},
    "arc_easy": {"accuracy", "accuracy_norm"},
    "arc_challenge": {"accuracy", "accuracy_norm"},
    "piqa": {"accuracy", "accuracy_norm"},
    "openbookqa": {"accuracy", "accuracy_norm"},
    "boolq": {"accuracy"},
    "winogrande": {"accuracy"},
    "lambada_openai": {"accuracy", "perplexity"},
}


@pytest.fixture(scope="module")
def bpe():
    return bpe_llama(), bpe_tokenizer()


@pytest.fixture(scope="module")
def all_tasks(bpe):
    model, tokenizer = bpe
    return evaluate(model, tokenizer, list(TASKS), data_dir=FIXTURES, batch_size=4, max_length=64, stride=32)


def test_registry_holds_every_task():
    assert set(TASKS) == set(EXPECTED_METRICS)
    with pytest.raises(DataError, match="unknown task 'nope'; available: "):
        get_task("nope")


def test_every_task_runs_on_fixtures(all_tasks):
    for name, expected in EXPECTED_METRICS.items():
        metrics = all_tasks.tasks[name].metrics
        assert set(metrics) == expected, name
        for metric, value in metrics.items():
            assert math.isfinite(value)
            if metric != "perplexity":
                assert 0.0 <= value <= 1.0, (name, metric)
    # WikiQA keeps questions with 0 < positives < candidates: the all-positive fixture question is dropped.
    assert all_tasks.tasks["wikiqa"].num_examples == 2


def test_result_records_provenance_and_round_trips(all_tasks, tmp_path):
    sciq = all_tasks.tasks["sciq"]
    assert sciq.data[0].path.endswith("sciq/sciq_test.jsonl") and len(sciq.data[0].sha256) == 64
    assert sciq.config == {"split": "test"}
    assert all_tasks.tasks["wikitext2"].config == {"max_length": 64, "stride": 32}
    assert {"torch", "transformers", "avss-llm", "python"} <= set(all_tasks.versions)
    assert all_tasks.options["seed"] == 0 and all_tasks.model["model_type"] == "llama"
    assert all_tasks.wall_time_s > 0
    path = all_tasks.save(tmp_path / "results.json")
    saved = json.loads(path.read_text())
    assert saved["format"] == "avss-eval/2"
    assert saved["tasks"]["sciq"]["metrics"] == sciq.metrics
    assert len(saved["tasks"]["sciq"]["records"]) == sciq.num_examples
    assert "nll" not in saved["tasks"]["sciq"]["records"][0]  # fields that do not apply are left out
    loaded = EvalResult.load(path)
    assert loaded == all_tasks
    assert loaded.tasks["sciq"].records == sciq.records


def test_every_task_records_each_example(all_tasks):
    fixture = [json.loads(line) for line in (FIXTURES / "sciq" / "sciq_test.jsonl").read_text().splitlines()]
    for name, task in all_tasks.tasks.items():
        records = task.records
        assert len(records) == (
            task.num_examples if name not in ("sst2", "rotten_tomatoes") else len(records)
        )
        assert len({record.id for record in records}) == len(records), name
        for metric, value in task.metrics.items():
            if metric != "perplexity":  # the mean of the records is the task's metric
                assert sum(r.metrics[metric] for r in records) / len(records) == pytest.approx(value), name
    sciq = all_tasks.tasks["sciq"].records
    assert [record.id for record in sciq] == [doc["id"] for doc in fixture]
    first = sciq[0]
    assert first.num_options == 4 and len(first.scores) == 4 and first.label == fixture[0]["label"]
    assert first.option_lengths == [len(choice) for choice in fixture[0]["choices"]]
    assert first.prediction == max(range(4), key=lambda i: (first.scores[i], -i))
    assert first.metrics["accuracy"] == float(first.prediction == first.label)
    truthfulqa = all_tasks.tasks["truthfulqa_mc"].records[0]
    assert truthfulqa.num_options < len(truthfulqa.scores)  # MC1 choices first, then the MC2 set
    assert isinstance(all_tasks.tasks["nq_open"].records[0].prediction, str)
    # Perplexity: per-document NLL and tokens that add up to the corpus figure.
    wikitext = all_tasks.tasks["wikitext2"]
    assert len(wikitext.records) == wikitext.num_examples
    total_nll = sum(record.nll for record in wikitext.records)
    total_tokens = sum(record.num_tokens for record in wikitext.records)
    assert math.exp(total_nll / total_tokens) == pytest.approx(wikitext.metrics["perplexity"], rel=1e-5)
    assert all(record.num_tokens > 0 for record in wikitext.records)
    summary = wikitext.summary(Bootstrap(500))["perplexity"]
    assert summary.low <= wikitext.metrics["perplexity"] <= summary.high and summary.n == len(
        wikitext.records
    )


def test_evaluation_is_deterministic_and_leaves_the_model_mode(bpe):
    model, tokenizer = bpe
    model.train()
    first = evaluate(model, tokenizer, ["sst2", "nq_open"], data_dir=FIXTURES, num_fewshot=2, seed=3)
    assert model.training
    model.eval()
    second = evaluate(model, tokenizer, ["sst2", "nq_open"], data_dir=FIXTURES, num_fewshot=2, seed=3)
    assert first.metrics == second.metrics


def test_limit_takes_a_seeded_sample_in_file_order(bpe):
    model, tokenizer = bpe
    result = evaluate(model, tokenizer, ["sciq", "truthfulqa_mc"], data_dir=FIXTURES, limit=2)
    assert {task.num_examples for task in result.tasks.values()} == {2}
    pool = [{"i": i} for i in range(10)]
    sciq, wikitext2 = get_task("sciq")(), get_task("wikitext2")()
    sample = sciq.select(pool, 4, seed=0)
    assert sample == sciq.select(pool, 4, seed=0) != sciq.select(pool, 4, seed=1)
    assert [doc["i"] for doc in sample] == sorted(doc["i"] for doc in sample)
    assert wikitext2.select(pool, 4, seed=0) == pool[:4]
    assert sciq.select(pool, None, seed=0) == sciq.select(pool, 50, seed=0) == pool


def test_comparison_against_itself_changes_nothing(all_tasks):
    table = all_tasks.compare(all_tasks, Bootstrap(200))
    assert {(row.task, row.metric) for row in table.rows} == {
        (name, metric) for name, task in all_tasks.tasks.items() for metric in task.metrics
    }
    for row in table.rows:
        assert row.difference.estimate == row.difference.low == row.difference.high == 0.0, row
        if row.kind == "accuracy":
            assert row.mcnemar.p_value == row.holm_p == 1.0
            assert math.isnan(row.retention.estimate) or row.retention.estimate == pytest.approx(1.0)


def test_perplexity_task_reads_a_text_file(bpe, tmp_path):
    model, tokenizer = bpe
    path = tmp_path / "text.txt"
    path.write_text("The quick brown fox.\n\nJumps over the lazy dog.\n")
    result = evaluate(model, tokenizer, ["perplexity"], data=str(path), max_length=32)
    assert result.tasks["perplexity"].data[0].path == str(path)
    assert result.tasks["perplexity"].num_examples == 2


def test_missing_data_says_where_it_looked(bpe, tmp_path):
    model, tokenizer = bpe
    with pytest.raises(DataError) as error:
        evaluate(model, tokenizer, ["sciq"], data_dir=tmp_path)
    message = str(error.value)
    assert str(tmp_path / "sciq" / "sciq_test.jsonl") in message
    assert "--data-dir" in message and "AVSS_DATA_DIR" in message
    assert "hub dataset allenai/sciq@test was not read: HF_DATASETS_OFFLINE=1 is set" in message  # conftest


def test_no_data_directory_at_all():
    with pytest.raises(DataError, match=r"needs sciq/sciq_test.jsonl: no data directory was found"):
        get_task("sciq")().load(None)


def test_malformed_rows_name_the_file_and_row(bpe, tmp_path):
    model, tokenizer = bpe
    (tmp_path / "sciq").mkdir()
    (tmp_path / "sciq" / "sciq_test.jsonl").write_text(json.dumps({"id": "x", "question": "q"}) + "\n")
    with pytest.raises(DataError, match=r"sciq_test.jsonl: row 1 \(x\) lacks choices, label, support"):
        evaluate(model, tokenizer, ["sciq"], data_dir=tmp_path)


def test_unknown_option_and_bad_split(bpe):
    model, tokenizer = bpe
    with pytest.raises(DataError, match="option\\(s\\) stride not used by task\\(s\\) sciq"):
        evaluate(model, tokenizer, ["sciq"], data_dir=FIXTURES, stride=4)
    with pytest.raises(DataError, match="split 'train'"):
        evaluate(model, tokenizer, ["sciq"], data_dir=FIXTURES, split="train")


def test_encoders_get_a_linear_probe():
    model, tokenizer = tiny_model("bert"), tiny_tokenizer()
    result = evaluate(model, tokenizer, ["sst2", "rotten_tomatoes"], data_dir=FIXTURES)
    for task in result.tasks.values():
        assert set(task.metrics) == {"probe_accuracy"}
        assert 0.0 <= task.metrics["probe_accuracy"] <= 1.0
    with pytest.raises(UnsupportedArchitectureError, match="encoder models support rotten_tomatoes, sst2"):
        evaluate(model, tokenizer, ["truthfulqa_mc"], data_dir=FIXTURES)


def test_few_shot_sampler_excludes_the_document_and_ignores_limit():
    docs = [{"i": i} for i in range(6)]
    sampler = FewShotSampler(docs, 3, seed=1)
    for doc in docs:
        shots = sampler.shots(doc)
        assert len(shots) == 3 and doc not in shots
        assert len({shot["i"] for shot in shots}) == 3
    assert FewShotSampler(docs, 3, seed=1).shots(docs[2]) == sampler.shots(docs[2])
    with pytest.raises(DataError):
        FewShotSampler(docs[:3], 3, seed=1)


def test_cli_eval_writes_json_and_compares(bpe, tmp_path):
    from avss.cli import evaluate_cmd  # noqa: F401  (registers the command)
    from avss.cli._app import app

    model, tokenizer = bpe
    model_dir = tmp_path / "tiny"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "base.json"
    common = [str(model_dir), "--data-dir", str(FIXTURES), "--device", "cpu", "--max-length", "32"]
    runner = CliRunner()
    first = runner.invoke(app, ["eval", *common, "--tasks", "sciq,wikitext2", "--out", str(out)])
    assert first.exit_code == 0, first.output
    assert "accuracy_norm" in first.output
    saved = json.loads(out.read_text())
    assert set(saved["tasks"]) == {"sciq", "wikitext2"}
    assert saved["model"]["kind"] == "directory" and saved["options"]["max_length"] == 32

    compared = tmp_path / "compared.json"
    args = ["eval", *common, "--tasks", "wikitext2,sciq", "--compare", str(out), "--out", str(compared)]
    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    assert "+0.0000" in second.output  # the model against itself (the table wraps at 80 columns)
    saved = json.loads(compared.read_text())
    assert saved["comparison"]["base"]["path"] == str(out)
    rows = {(row["task"], row["metric"]): row for row in saved["comparison"]["rows"]}
    assert rows[("wikitext2", "perplexity")]["difference_unit"] == "nats per token"
    assert rows[("sciq", "accuracy")]["mcnemar"]["p_value"] == 1.0
    assert EvalResult.load(compared).comparison == saved["comparison"]

    # Another example set (--limit): one line through the CLI's AvssError handler, results still saved.
    other = tmp_path / "other.json"
    args = [
        "eval",
        *common[:-2],
        "--tasks",
        "sciq",
        "--limit",
        "2",
        "--compare",
        str(out),
        "--out",
        str(other),
    ]
    third = runner.invoke(app, args)
    assert isinstance(third.exception, PairingError) and "different examples" in str(third.exception)
    assert EvalResult.load(other).comparison is None
