"""Cross-validation folds (question-level, deterministic), the leakage filter, the refusal predicate, and
their use by pair loading, held-out evaluation and the CLI."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from _tiny import tiny_model
from avss.errors import OptionError
from avss.hallucination import load_pairs
from avss.hallucination.folds import Folds, fold_of, is_refusal, leakage_free
from avss.hallucination.heldout import heldout_docs
from avss.hallucination.pairs import describe_pairs
from avss.hallucination.workflow import PairSpec
from avss.models import LoadedModel
from test_hallucination import data_dir, write_jsonl  # noqa: F401  (data_dir: fixture)

QUESTIONS = [f"What is fact number {i}?" for i in range(300)]


def test_every_question_is_tested_in_exactly_one_fold_and_trains_in_the_others() -> None:
    folds = Folds(5, seed=0)
    parts = folds.assign(QUESTIONS)
    tested = [set(part.test) for part in parts]
    assert set().union(*tested) == set(QUESTIONS)
    assert sum(len(t) for t in tested) == len(QUESTIONS)  # no question in two folds
    for part in parts:
        train, validation, test = set(part.train), set(part.validation), set(part.test)
        assert not (train & validation or train & test or validation & test)
        assert train | validation | test == set(QUESTIONS)
        assert 0.1 < len(validation) / len(train | validation) < 0.3
    sizes = [len(t) for t in tested]
    assert min(sizes) > 0.6 * len(QUESTIONS) / 5


def test_folds_are_deterministic_stable_under_order_and_whitespace_and_change_with_the_seed() -> None:
    shuffled = QUESTIONS[:]
    random.Random(1).shuffle(shuffled)
    assert Folds(5).assign(QUESTIONS) == Folds(5).assign(shuffled)
    assert Folds(5).assign(QUESTIONS) == Folds(5).assign([f"  {q}\n" for q in QUESTIONS])
    assert [fold_of(q, 5) for q in QUESTIONS] == [fold_of(q, 5, seed=0) for q in QUESTIONS]
    assert [fold_of(q, 5, seed=1) for q in QUESTIONS] != [fold_of(q, 5) for q in QUESTIONS]


def test_fold_options_are_checked() -> None:
    with pytest.raises(OptionError, match="--folds"):
        Folds(1)
    with pytest.raises(OptionError, match=r"--fold must be in 0\.\.4"):
        Folds(5).splitter(5)
    with pytest.raises(OptionError, match="--fold"):
        PairSpec(folds=5, fold=7)


def test_a_questions_pairs_never_split_across_folds(data_dir: Path) -> None:  # noqa: F811
    """SciQ repeats the TruthfulQA questions in this data: each question's pairs land in one fold."""
    folds = Folds(3)
    for fold in range(3):
        splitter = folds.splitter(fold)
        test = load_pairs(["truthfulqa", "sciq"], data_dir, split="test", splitter=splitter)
        train = load_pairs(["truthfulqa", "sciq"], data_dir, split="train", splitter=splitter)
        assert test and train
        assert not {p.question for p in test} & {p.question for p in train}
        assert all(folds.fold_of(p.question) == fold for p in test)
        counts = describe_pairs(test, splitter)["counts"]
        assert set(counts["truthfulqa"]) == {"test"}


def test_heldout_docs_follow_the_splitter() -> None:
    docs = [{"question": q} for q in QUESTIONS]
    splitter = Folds(5).splitter(2)
    test = heldout_docs(docs, "test", None, splitter)
    assert {doc["question"] for doc in test} == set(Folds(5).assign(QUESTIONS)[2].test)


def test_pair_spec_with_folds_drops_refusals_from_training_only(tokenizer, tmp_path: Path) -> None:

    rows = [
        {
            "id": f"tqa_{i}",
            "question": q,
            "best_answer": "I have no comment" if i % 2 else f"It is {i}",
            "best_incorrect_answer": f"It is {i + 1}",
            "correct_answers": [],
            "incorrect_answers": [],
        }
        for i, q in enumerate(QUESTIONS[:60])
    ]
    write_jsonl(tmp_path / "truthfulqa" / "truthfulqa_gen.jsonl", rows)

    loaded = LoadedModel(tiny_model("llama", num_layers=2), tokenizer)
    spec = PairSpec(data_dir=str(tmp_path), folds=5, fold=1, drop_refusals=True)
    train, test = spec.load(loaded, "train", None), spec.load(loaded, "test", None)
    assert train and not any(is_refusal(p.truthful) for p in train)
    assert any(is_refusal(p.truthful) for p in test)
    assert all(Folds(5).fold_of(p.question) == 1 for p in test)


def test_leakage_filter_on_a_hand_made_case() -> None:
    train_answers = ["I have no comment", "Paris is the capital", "It is 42"]
    test_answers = {
        "q1": ["i have  NO comment", "Something new"],  # a true answer seen in training (case, spaces)
        "q2": ["Lyon is a city"],
        "q3": ["Paris is the capital of France"],  # only a longer answer: not verbatim
        "q4": ["It is 42"],
        "q5": [],
    }
    assert leakage_free(test_answers, train_answers) == ["q2", "q3", "q5"]
    assert leakage_free(test_answers, []) == list(test_answers)


@pytest.mark.parametrize(
    "answer",
    [
        "I have no comment",
        "I have no comment.",
        "  i HAVE no   comment ",
        "No comment.",
        "I don't know",
        "I do not know.",
        "I\u2019m not sure",
        "I have no idea",
        "I cannot answer that",
        "I'd rather not say",
    ],
)
def test_refusals_are_recognized(answer: str) -> None:
    assert is_refusal(answer)


@pytest.mark.parametrize(
    "answer",
    [
        "Nobody knows",
        "It is unknown",
        "I have no comment on that, but the answer is 4",
        "The seeds pass through",
        "I know the answer is Paris",
        "",
    ],
)
def test_statements_are_not_refusals(answer: str) -> None:
    assert not is_refusal(answer)


def test_cli_runs_one_fold(cli, saved_tiny_model, data_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    import json

    model = saved_tiny_model(4)
    common = ["--data-dir", data_dir, "--device", "cpu", "--folds", "3", "--fold", "1", "--max-length", "48"]
    scored = cli("hallucination", model, "--out", tmp_path / "eavss", "--limit", "8", *common)
    assert scored.returncode == 0, scored.stdout + scored.stderr
    saved = json.loads((tmp_path / "eavss" / "eavss.json").read_text())
    assert saved["pair_spec"]["folds"] == 3 and set(saved["pairs"]["counts"]["truthfulqa"]) == {"train"}
    evaluation = ["--eval", "--eval-tasks", "truthfulqa_mc", "--layers", "1,2", "--drop-refusals"]
    mitigated = cli("mitigate", model, "--out", tmp_path / "m", "--limit", "6", *common, *evaluation)
    assert mitigated.returncode == 0, mitigated.stdout + mitigated.stderr
    record = json.loads((tmp_path / "m" / "avss_mitigation.json").read_text())
    assert record["pair_spec"]["fold"] == 1 and record["pair_spec"]["drop_refusals"]
    mitigation = record["rounds"][0]["mitigation"]
    assert set(mitigation["train_pairs"]["counts"]["truthfulqa"]) == {"train"}
    assert set(mitigation["val_pairs"]["counts"]["truthfulqa"]) == {"validation"}
    tested = [q for q in QUESTIONS[:60] if fold_of(q, 3) == 1]  # the fixture's questions are QUESTIONS[:60]
    assert record["after"]["num_examples"]["truthfulqa_mc"] == len(tested)


def test_cli_refuses_an_impossible_fold_before_loading(cli, monkeypatch, tmp_path: Path) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr("avss.cli.hallucination_cmd.load_model", refuse)
    for command in ("hallucination", "mitigate"):
        result = cli(command, "some-model", "--folds", "5", "--fold", "5", "--out", tmp_path / command)
        assert result.returncode != 0 and "--fold must be in 0..4" in result.stdout + result.stderr


def test_heldout_evaluation_keeps_records_for_pooling_and_takes_a_leakage_free_splitter(
    tokenizer,
    data_dir: Path,  # noqa: F811
) -> None:
    from avss.evaluation.comparison import interval
    from avss.evaluation.records import ExampleRecord
    from avss.hallucination.heldout import evaluate_heldout

    model = tiny_model("llama", num_layers=2)
    folds = Folds(3)
    pooled = []
    for fold in range(3):
        result = evaluate_heldout(
            model, tokenizer, ["truthfulqa_mc"], data_dir=data_dir, splitter=folds.splitter(fold)
        )
        records = result["records"]["truthfulqa_mc"]
        assert len(records) == result["num_examples"]["truthfulqa_mc"]
        pooled += [ExampleRecord.from_dict(record) for record in records]
    assert len(pooled) == 60, "every question is tested once over the folds"
    assert 0 <= interval(pooled, "mc1").low <= interval(pooled, "mc1").high <= 1
    clean = {"What is fact number 3?", "What is fact number 5?"}
    only_clean = evaluate_heldout(
        model,
        tokenizer,
        ["truthfulqa_mc"],
        data_dir=data_dir,
        splitter=lambda question: "test" if question in clean else None,
    )
    assert only_clean["num_examples"]["truthfulqa_mc"] == 2
