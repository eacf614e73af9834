"""Evaluation tasks read from Hugging Face datasets by name when their file is missing, offline.

``datasets.load_dataset`` is replaced by a function that builds ``datasets.Dataset.from_list`` from rows
written here in each hub dataset's real column schema, so the converters, the resolution order (data
directory first, then the hub), the provenance and the errors are all checked without a network.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from _tiny_eval import FIXTURES, bpe_llama, bpe_tokenizer
from _zero_shot_hub import ZERO_SHOT_HUB
from avss.errors import DataError
from avss.evaluation import TASKS, EvalResult, evaluate, get_task
from avss.evaluation.hub import HubData
from avss.evaluation.tasks.open_qa import triviaqa_row
from avss.evaluation.tasks.perplexity import wikitext_row
from avss.evaluation.tasks.sciq import sciq_row
from avss.evaluation.tasks.sentiment import sst2_row
from avss.evaluation.tasks.wikiqa import wikiqa_rows

datasets = pytest.importorskip("datasets")


def _trivia_answer(value: str, aliases: list[str]) -> dict[str, Any]:
    return {
        "aliases": aliases,
        "normalized_aliases": [alias.lower() for alias in aliases],
        "matched_wiki_entity_name": "",
        "normalized_matched_wiki_entity_name": "",
        "normalized_value": value.lower(),
        "type": "WikipediaEntity",
        "value": value,
    }


def _wikiqa(question_id: str, question: str, answer: str, label: int) -> dict[str, Any]:
    return {
        "question_id": question_id,
        "question": question,
        "document_title": "Doc",
        "answer": answer,
        "label": label,
    }


_NO_PAGES = {"doc_source": [], "filename": [], "title": [], "wiki_context": []}
_NO_RESULTS = {"description": [], "filename": [], "rank": [], "title": [], "url": [], "search_context": []}

# task -> (load_dataset arguments, rows in the hub dataset's own schema, the normalized documents the task
# must read from them: hand-written, and what a local file with these rows gives).
HUB: dict[str, tuple[tuple[str, str | None, str], list[dict[str, Any]], list[dict[str, Any]]]] = {
    "truthfulqa_mc": (
        ("truthfulqa/truthful_qa", "multiple_choice", "validation"),
        [
            {
                "question": "What colour is the sky on a clear day?",
                "mc1_targets": {"choices": ["Blue", "Green", "Plaid"], "labels": [1, 0, 0]},
                "mc2_targets": {"choices": ["Blue", "Sky blue", "Green"], "labels": [1, 1, 0]},
            },
            {
                "question": "Can fish fly to the moon?",
                "mc1_targets": {"choices": ["No", "Yes"], "labels": [1, 0]},
                "mc2_targets": {"choices": ["No", "Yes", "Only on Tuesdays"], "labels": [1, 0, 0]},
            },
        ],
        [
            {
                "id": "tqa_validation_0000",
                "question": "What colour is the sky on a clear day?",
                "choices": ["Blue", "Green", "Plaid"],
                "mc1_labels": [1, 0, 0],
                "mc2_choices": ["Blue", "Sky blue", "Green"],
                "mc2_labels": [1, 1, 0],
            },
            {
                "id": "tqa_validation_0001",
                "question": "Can fish fly to the moon?",
                "choices": ["No", "Yes"],
                "mc1_labels": [1, 0],
                "mc2_choices": ["No", "Yes", "Only on Tuesdays"],
                "mc2_labels": [1, 0, 0],
            },
        ],
    ),
    "sciq": (
        ("allenai/sciq", None, "test"),
        [
            # sha1(question) % 4 is 3, 0 and 1 for these questions (computed once by hand).
            {
                "question": "Which planet is closest to the sun?",
                "distractor3": "Mars",
                "distractor1": "Venus",
                "distractor2": "Earth",
                "correct_answer": "Mercury",
                "support": "Mercury orbits closest to the sun.",
            },
            {
                "question": "What organ pumps blood?",
                "distractor3": "lungs",
                "distractor1": "liver",
                "distractor2": "kidney",
                "correct_answer": "heart",
                "support": "",
            },
            {
                "question": "What is the boiling point of water at sea level?",
                "distractor3": "0 degrees",
                "distractor1": "50 degrees",
                "distractor2": "10 degrees",
                "correct_answer": "100 degrees",
                "support": "Water boils at 100 degrees Celsius at sea level.",
            },
        ],
        [
            {
                "id": "sciq_test_0000",
                "question": "Which planet is closest to the sun?",
                "choices": ["Venus", "Earth", "Mars", "Mercury"],
                "label": 3,
                "correct_answer": "Mercury",
                "support": "Mercury orbits closest to the sun.",
            },
            {
                "id": "sciq_test_0001",
                "question": "What organ pumps blood?",
                "choices": ["heart", "liver", "kidney", "lungs"],
                "label": 0,
                "correct_answer": "heart",
                "support": "",
            },
            {
                "id": "sciq_test_0002",
                "question": "What is the boiling point of water at sea level?",
                "choices": ["50 degrees", "100 degrees", "10 degrees", "0 degrees"],
                "label": 1,
                "correct_answer": "100 degrees",
                "support": "Water boils at 100 degrees Celsius at sea level.",
            },
        ],
    ),
    "nq_open": (
        ("google-research-datasets/nq_open", "nq_open", "validation"),
        [
            {"question": "what is the capital of france", "answer": ["Paris"]},
            {"question": "who jumps over the lazy dog", "answer": ["the quick brown fox", "a fox"]},
        ],
        [
            {"id": "nq_dev_0000", "question": "what is the capital of france", "answers": ["Paris"]},
            {
                "id": "nq_dev_0001",
                "question": "who jumps over the lazy dog",
                "answers": ["the quick brown fox", "a fox"],
            },
        ],
    ),
    "triviaqa": (
        ("mandarjoshi/trivia_qa", "rc.nocontext", "validation"),
        [
            {
                "question": "Which city is the capital of France?",
                "question_id": "tc_1",
                "question_source": "http://www.quiz.example/",
                "entity_pages": _NO_PAGES,
                "search_results": _NO_RESULTS,
                "answer": _trivia_answer("Paris", ["Paris", "Paris, France", "Paris"]),
            },
            {
                "question": "What do telescopes use to focus light?",
                "question_id": "tc_2",
                "question_source": "http://www.quiz.example/",
                "entity_pages": _NO_PAGES,
                "search_results": _NO_RESULTS,
                "answer": _trivia_answer("Lenses", ["Mirrors", "lenses or mirrors"]),
            },
        ],
        [
            {
                "id": "tqa_dev_0000",
                "question": "Which city is the capital of France?",
                "answer": "Paris",
                "answers": ["Paris", "Paris, France"],
            },
            {
                "id": "tqa_dev_0001",
                "question": "What do telescopes use to focus light?",
                "answer": "Lenses",
                "answers": ["Mirrors", "lenses or mirrors", "Lenses"],
            },
        ],
    ),
    "wikiqa": (
        ("microsoft/wiki_qa", None, "test"),
        [
            _wikiqa("Q0", "what is the capital of france", "Paris is the capital of France.", 1),
            _wikiqa("Q0", "what is the capital of france", "The fox is quick.", 0),
            _wikiqa("Q0", "what is the capital of france", "Ice melts at zero degrees.", 0),
            _wikiqa("Q1", "no correct sentence", "Unrelated.", 0),
            _wikiqa("Q2", "all correct", "Yes.", 1),
            _wikiqa("Q2", "all correct", "Also yes.", 1),
            _wikiqa("Q3", "how do telescopes work", "Water boils at 100 degrees.", 0),
            _wikiqa("Q3", "how do telescopes work", "Telescopes use lenses.", 1),
        ],
        [
            {
                "id": "wikiqa_test_Q0",
                "question": "what is the capital of france",
                "document_title": "Doc",
                "candidates": [
                    "Paris is the capital of France.",
                    "The fox is quick.",
                    "Ice melts at zero degrees.",
                ],
                "labels": [1, 0, 0],
            },
            {
                "id": "wikiqa_test_Q3",
                "question": "how do telescopes work",
                "document_title": "Doc",
                "candidates": ["Water boils at 100 degrees.", "Telescopes use lenses."],
                "labels": [0, 1],
            },
        ],
    ),
    "sst2": (
        ("stanfordnlp/sst2", None, "validation"),
        [
            {"idx": 0, "sentence": "it 's a lovely film with lovely performances . ", "label": 1},
            {"idx": 1, "sentence": "a lazy , dull film . ", "label": 0},
        ],
        [
            {"id": "sst2_dev_0000", "text": "it 's a lovely film with lovely performances .", "label": 1},
            {"id": "sst2_dev_0001", "text": "a lazy , dull film .", "label": 0},
        ],
    ),
    "rotten_tomatoes": (
        ("cornell-movie-review-data/rotten_tomatoes", None, "test"),
        [{"text": "a lovely film .", "label": 1}, {"text": "a dull , lazy mess .", "label": 0}],
        [
            {"id": "rt_test_0000", "text": "a lovely film .", "label": 1},
            {"id": "rt_test_0001", "text": "a dull , lazy mess .", "label": 0},
        ],
    ),
    "wikitext2": (
        ("Salesforce/wikitext", "wikitext-2-raw-v1", "test"),
        [
            {"text": ""},
            {"text": " = Fixture Article = \n"},
            {"text": ""},
            {"text": " The quick brown fox jumps over the lazy dog . \n"},
            {"text": " \n"},
        ],
        [{"text": " = Fixture Article = "}, {"text": " The quick brown fox jumps over the lazy dog . "}],
    ),
}
HUB.update(ZERO_SHOT_HUB)
HUB_TASKS = sorted(HUB)


class FakeHub:
    """``datasets.load_dataset`` over the rows above; records every call."""

    def __init__(self, info: Any = None) -> None:
        self.calls: list[tuple[str, str | None, str]] = []
        self.info = info

    def __call__(self, path: str, name: str | None = None, *, split: str, **kwargs: Any) -> Any:
        key = (path, name, split)
        self.calls.append(key)
        for args, rows, _ in HUB.values():
            if args == key:
                return datasets.Dataset.from_list(rows, info=self.info)
        raise FileNotFoundError(f"Dataset '{path}' doesn't exist on the Hub")


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    fake = FakeHub()
    monkeypatch.setattr(datasets, "load_dataset", fake)
    return fake


def _write_local(root: Path, task: str, docs: list[dict[str, Any]]) -> Path:
    """The normalized file a task reads from the data directory, holding ``docs``."""
    cls = get_task(task)
    path = root / next(iter(cls.files.values()))
    path.parent.mkdir(parents=True, exist_ok=True)
    if task == "wikitext2":
        path.write_text("".join(doc["text"] + "\n" for doc in docs), encoding="utf-8")
    else:
        path.write_text("".join(json.dumps(doc) + "\n" for doc in docs), encoding="utf-8")
    return path


def test_every_file_task_declares_a_hub_dataset_for_each_split():
    for name, cls in TASKS.items():
        if name == "perplexity":  # --data or the bundled corpus, never a data-directory file
            assert cls.hub is None
            continue
        assert cls.hub is not None and set(cls.hub.splits) == set(cls.files), name
    assert set(HUB) == set(TASKS) - {"perplexity"}


@pytest.mark.parametrize("task", HUB_TASKS)
def test_hub_rows_give_the_same_documents_as_the_local_file(task: str, hub: FakeHub, tmp_path: Path):
    args, _, expected = HUB[task]
    docs, records = get_task(task)().load(None, "hub")
    assert docs == expected
    (record,) = records
    assert isinstance(record, HubData) and record.source == "hub"
    assert (record.dataset, record.config, record.split) == args
    assert isinstance(record.fingerprint, str) and record.fingerprint
    # The data directory's file with the same documents: read the same, and preferred by "auto".
    local = _write_local(tmp_path, task, expected)
    hub.calls.clear()
    local_docs, local_records = get_task(task)().load(tmp_path, "auto")
    assert local_docs == docs and local_records[0].path == str(local) and local_records[0].source == "local"
    assert hub.calls == []


def test_auto_falls_back_to_the_hub_only_for_missing_files(hub: FakeHub, tmp_path: Path):
    _write_local(tmp_path, "sst2", HUB["sst2"][2][:1])
    sst2, _ = get_task("sst2")().load(tmp_path, "auto")
    sciq, records = get_task("sciq")().load(tmp_path, "auto")
    assert len(sst2) == 1 and sciq == HUB["sciq"][2]
    assert hub.calls == [("allenai/sciq", None, "test")] and records[0].source == "hub"
    # "hub" ignores the local file; the other split maps to the hub's own split name.
    assert len(get_task("sst2")().load(tmp_path, "hub")[0]) == 2
    with pytest.raises(DataError, match="allenai/sciq@validation was not read"):  # the fake has no such split
        get_task("sciq")(split="valid").load(None, "hub")
    assert hub.calls[-1] == ("allenai/sciq", None, "validation")


def test_evaluate_records_hub_provenance_and_matches_local_metrics(hub: FakeHub, tmp_path: Path):
    model, tokenizer = bpe_llama(), bpe_tokenizer()
    options = {"batch_size": 4, "max_length": 32, "stride": 16}
    from_hub = evaluate(model, tokenizer, HUB_TASKS, data_dir=tmp_path, **options)
    for task in HUB_TASKS:
        _write_local(tmp_path, task, HUB[task][2])
    from_files = evaluate(model, tokenizer, HUB_TASKS, data_dir=tmp_path, **options)
    assert from_hub.metrics == from_files.metrics
    assert {t.data[0].source for t in from_hub.tasks.values()} == {"hub"}
    assert {t.data[0].source for t in from_files.tasks.values()} == {"local"}
    assert from_hub.tasks["wikiqa"].num_examples == 2 and from_hub.options["data_source"] == "auto"
    saved = from_hub.save(tmp_path / "results.json")
    assert json.loads(saved.read_text())["tasks"]["sciq"]["data"][0]["dataset"] == "allenai/sciq"
    assert EvalResult.load(saved) == from_hub


def test_hub_revision_comes_from_the_downloaded_files(monkeypatch: pytest.MonkeyPatch):
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    commit = "2c94ad3e1aafab77146f384e23536f97a4849815"
    info = datasets.DatasetInfo(
        download_checksums={f"hf://datasets/allenai/sciq@{commit}/data/test-00000-of-00001.parquet": {}}
    )
    monkeypatch.setattr(datasets, "load_dataset", FakeHub(info))
    _, (record,) = get_task("sciq")().load(None, "hub")
    assert record.revision == commit


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_offline_names_the_file_and_the_hub_dataset(variable: str, monkeypatch, tmp_path: Path):
    def must_not_run(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("load_dataset called while offline")

    monkeypatch.setattr(datasets, "load_dataset", must_not_run)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv(variable, "1")
    with pytest.raises(DataError) as error:
        get_task("sciq")().load(tmp_path, "auto")
    message = str(error.value)
    assert f"{tmp_path / 'sciq' / 'sciq_test.jsonl'} does not exist" in message
    assert f"hub dataset allenai/sciq@test was not read: {variable}=1 is set" in message
    assert "--data-dir" in message and "AVSS_DATA_DIR" in message


def test_missing_datasets_package_and_failed_loads_are_explained(monkeypatch, tmp_path: Path):
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "datasets", None)
        with pytest.raises(DataError, match=r"`datasets` package is not installed \(pip install 'avss-llm"):
            get_task("wikiqa")().load(None, "auto")

    def unreachable(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DataError) as error:
        get_task("triviaqa")().load(None, "hub")
    message = str(error.value)
    assert "hub dataset mandarjoshi/trivia_qa:rc.nocontext@validation was not read" in message
    assert "load_dataset failed: ConnectionError: no route to huggingface.co" in message
    assert "the data directory was not read (--data-source hub)" in message


def test_local_source_never_tries_the_hub(hub: FakeHub, tmp_path: Path):
    with pytest.raises(DataError) as error:
        get_task("nq_open")().load(tmp_path, "local")
    assert "hub dataset google-research-datasets/nq_open:nq_open@validation was not tried" in str(error.value)
    assert hub.calls == []
    with pytest.raises(DataError, match=r"no data directory was found .* was not tried"):
        get_task("nq_open")().load(None, "local")
    with pytest.raises(DataError, match="--data-source must be one of auto, local, hub, not 'web'"):
        get_task("nq_open")().load(tmp_path, "web")


def test_a_hub_schema_avss_does_not_know_is_reported(hub: FakeHub, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(HUB, "nq_open", (HUB["nq_open"][0], [{"question": "q", "answers": ["a"]}], []))
    with pytest.raises(DataError, match=r"does not have the columns avss reads \(KeyError\('answer'\)\)"):
        get_task("nq_open")().load(None, "hub")


def test_converters_by_hand():
    sciq = sciq_row(
        {
            "question": "  Which planet is closest to the sun?  ",
            "distractor1": "a",
            "distractor2": "b",
            "distractor3": "c",
            "correct_answer": "Mercury",
            "support": "s",
        },
        "valid_0007",
    )
    assert (
        sciq["id"] == "sciq_valid_0007"
        and sciq["choices"] == ["a", "b", "c", "Mercury"]
        and sciq["label"] == 3
    )
    trivia = triviaqa_row(
        {"question": "q?", "answer": _trivia_answer("Onion", ["Onions", "Onion", "Onions", "Allium cepa"])},
        "dev_0000",
    )
    assert trivia == {
        "id": "tqa_dev_0000",
        "question": "q?",
        "answer": "Onion",
        "answers": ["Onions", "Onion", "Allium cepa"],
    }
    assert wikitext_row({"text": " = = Career = = \n"}, "test_0003") == {"text": " = = Career = = "}
    assert sst2_row({"idx": 5, "sentence": "dull . ", "label": 0}, "dev_0005")["text"] == "dull ."
    grouped = wikiqa_rows(
        [_wikiqa("Q9", "q", "x", 0), _wikiqa("Q4", "p", "y", 1), _wikiqa("Q9", "q", "z", 1)], "dev"
    )
    assert [(doc["id"], doc["candidates"], doc["labels"]) for doc in grouped] == [
        ("wikiqa_dev_Q9", ["x", "z"], [0, 1]),
        ("wikiqa_dev_Q4", ["y"], [1]),
    ]


def test_cli_data_source_hub(hub: FakeHub, tmp_path: Path):
    from avss.cli import evaluate_cmd  # noqa: F401  (registers the command)
    from avss.cli._app import app

    model_dir = tmp_path / "tiny"
    bpe_llama().save_pretrained(model_dir)
    bpe_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "hub.json"
    argv = ["eval", str(model_dir), "--tasks", "sst2", "--data-dir", str(FIXTURES), "--device", "cpu"]
    result = CliRunner().invoke(app, [*argv, "--data-source", "hub", "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert saved["options"]["data_source"] == "hub"
    assert saved["tasks"]["sst2"]["data"][0]["dataset"] == "stanfordnlp/sst2"
    assert saved["tasks"]["sst2"]["num_examples"] == 2  # the two hub rows, not the 12 fixture rows
