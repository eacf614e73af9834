"""Pairs, splits, answer-token batches and the EAVSS math (hand values), on tiny data and tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _tiny import tiny_model
from avss.errors import DataError
from avss.hallucination import SPLITS, eavss_scores, load_pairs, split_of
from avss.hallucination.batches import answer_batches, contrastive_batches
from avss.hallucination.pairs import greedy_answers
from avss.hallucination.scoring import EAVSS_FORMAT, EavssOptions, score_eavss
from test_provenance import assert_stamped


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    questions = [f"What is fact number {i}?" for i in range(60)]
    write_jsonl(
        tmp_path / "truthfulqa" / "truthfulqa_gen.jsonl",
        [
            {
                "id": f"tqa_{i:03d}",
                "question": q,
                "best_answer": f"It is {i}",
                "best_incorrect_answer": f"It is {i + 1}",
                "correct_answers": [f"It is {i}"],
                "incorrect_answers": [f"It is {i + 1}", f"It is {i + 2}", f"it is {i}"],
            }
            for i, q in enumerate(questions)
        ],
    )
    sciq = [
        {
            "id": f"sciq_{i}",
            "question": q,
            "choices": ["a", "b", "c", "d"],
            "label": i % 4,
            "correct_answer": "abcd"[i % 4],
        }
        for i, q in enumerate(questions[:30])
    ]
    write_jsonl(tmp_path / "sciq" / "sciq_valid.jsonl", sciq[:15])
    write_jsonl(tmp_path / "sciq" / "sciq_test.jsonl", sciq[15:])
    write_jsonl(
        tmp_path / "truthfulqa" / "truthfulqa_mc.jsonl",
        [
            {
                "id": f"tqa_{i:03d}",
                "question": q,
                "choices": [f"It is {i}", f"It is {i + 1}"],
                "mc1_labels": [1, 0],
                "mc2_choices": [f"It is {i}", f"It is {i + 1}", f"It is {i + 2}"],
                "mc2_labels": [1, 0, 0],
            }
            for i, q in enumerate(questions)
        ],
    )
    write_jsonl(
        tmp_path / "nq_open" / "nq_open_dev.jsonl",
        [{"id": f"nq_{i}", "question": f"who is {i}", "answers": [f"person {i}"]} for i in range(6)],
    )
    return tmp_path


def test_split_is_a_function_of_the_question_and_covers_all_splits() -> None:
    questions = [f"question {i}" for i in range(2000)]
    splits = [split_of(q) for q in questions]
    assert set(splits) == set(SPLITS)
    shares = {s: splits.count(s) / len(splits) for s in SPLITS}
    assert abs(shares["train"] - 0.7) < 0.05 and abs(shares["test"] - 0.15) < 0.04
    assert split_of("  question 7 ") == split_of("question 7")


def test_pairs_never_leak_across_splits(data_dir: Path) -> None:
    by_split = {split: load_pairs(["truthfulqa", "sciq"], data_dir, split=split) for split in SPLITS}
    questions = {split: {p.question.strip() for p in pairs} for split, pairs in by_split.items()}
    for a in SPLITS:
        for b in SPLITS:
            if a != b:
                assert not questions[a] & questions[b]
    # SciQ reuses TruthfulQA questions here: the same question lands in the same split from either source.
    total = sum(len(pairs) for pairs in by_split.values())
    assert total == len(load_pairs(["truthfulqa", "sciq"], data_dir))


def test_truthfulqa_pairs_drop_duplicates_of_the_truthful_answer(data_dir: Path) -> None:
    pair = next(p for p in load_pairs(["truthfulqa"], data_dir) if p.id == "tqa_005")
    assert pair.truthful == "It is 5"
    assert pair.hallucinated == ("It is 6", "It is 7")
    assert pair.prompt == "Q: What is fact number 5?\nA:"


def test_sciq_pairs_use_distractors(data_dir: Path) -> None:
    pair = next(p for p in load_pairs(["sciq"], data_dir) if p.id == "sciq_2")
    assert pair.truthful == "c" and set(pair.hallucinated) == {"a", "b", "d"}


def test_unknown_source_is_a_data_error(data_dir: Path) -> None:
    with pytest.raises(DataError, match="unknown pair source"):
        load_pairs(["nope"], data_dir)


def test_open_qa_pairs_keep_wrong_greedy_answers_and_cache_them(data_dir: Path, tmp_path: Path) -> None:
    calls = []

    def generate(prompts: list[str]) -> list[str]:
        calls.append(len(prompts))
        return [" person 0" if "who is 0" in p else " nobody" for p in prompts]

    pairs = load_pairs(["nq"], data_dir, generate=generate, cache_dir=tmp_path / "cache")
    assert {p.id for p in pairs} == {f"nq_{i}" for i in range(1, 6)}  # nq_0 was answered correctly
    assert all(p.hallucinated == ("nobody",) for p in pairs)
    again = load_pairs(["nq"], data_dir, generate=generate, cache_dir=tmp_path / "cache")
    assert again == pairs and calls == [6]
    assert len(greedy_answers(generate, [], tmp_path / "cache" / "greedy_nq.jsonl")) == 6


def test_eavss_ratio_matches_hand_values() -> None:
    v_t, v_h = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([2.0, 2.0, 2.0])
    s_t, s_h = torch.tensor([0.5, 0.5, 0.25]), torch.tensor([0.5, 0.25, 0.25])
    scores = eavss_scores(v_t, v_h, s_t, s_h, "ratio")
    # HSAV = [2, 1, 0.5] -> /3.5 ; HSS = [1, 0.5, 1] -> /2.5
    torch.testing.assert_close(
        scores.hsav_normalized, torch.tensor([4 / 7, 2 / 7, 1 / 7], dtype=torch.float64)
    )
    torch.testing.assert_close(scores.hss_normalized, torch.tensor([0.4, 0.2, 0.4], dtype=torch.float64))
    expected = torch.tensor([10 / 7, 10 / 7, 5 / 14], dtype=torch.float64)
    torch.testing.assert_close(scores.eavss, expected)
    torch.testing.assert_close(scores.eavss_normalized, expected / expected.sum())
    assert scores.ranking() == [0, 1, 2] and scores.top(1) == [0] and scores.bottom(1) == [2]


def test_eavss_diff_matches_hand_values_and_floors_zero_hss() -> None:
    v_t, v_h = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([2.0, 2.5, 1.0])
    s_t, s_h = torch.tensor([0.5, 0.5, 0.2]), torch.tensor([0.3, 0.5, 0.3])
    scores = eavss_scores(v_t, v_h, s_t, s_h, "diff")
    # HSAV = |[1, 0.5, -3]| -> [1, .5, 3] / 4.5 ; HSS = [0.2, 0 -> floored to 0.1, 0.1] / 0.4
    torch.testing.assert_close(scores.hss, torch.tensor([0.2, 0.1, 0.1], dtype=torch.float64))
    expected = torch.tensor([(1 / 4.5) / 0.5, (0.5 / 4.5) / 0.25, (3 / 4.5) / 0.25], dtype=torch.float64)
    torch.testing.assert_close(scores.eavss, expected)
    assert scores.ranking()[0] == 2


def test_eavss_rejects_unknown_combine() -> None:
    with pytest.raises(ValueError, match="combine"):
        eavss_scores(torch.ones(2), torch.ones(2), torch.ones(2), torch.ones(2), "product")


def test_answer_batches_mask_only_answer_tokens(tokenizer, data_dir: Path) -> None:
    pairs = load_pairs(["truthfulqa"], data_dir)[:3]
    batch = answer_batches(tokenizer, pairs, "truthful", batch_size=8)[0]
    for row in range(3):
        ids = batch["input_ids"][row][batch["stat_mask"][row]].tolist()
        assert tokenizer.decode(ids).strip() in {p.truthful for p in pairs}
    assert not (batch["stat_mask"] & batch["prompt_mask"]).any()
    assert not (batch["stat_mask"] & ~batch["attention_mask"].bool()).any()


def test_contrastive_batches_group_truthful_first(tokenizer, data_dir: Path) -> None:
    pairs = load_pairs(["truthfulqa"], data_dir)[:2]
    batch = contrastive_batches(tokenizer, pairs, negatives=2, questions_per_batch=2)[0]
    assert batch["input_ids"].shape[0] == 6 and int(batch["group_size"]) == 3
    first = batch["input_ids"][0][batch["answer_mask"][0]].tolist()
    assert tokenizer.decode(first).strip() == pairs[0].truthful


def test_score_eavss_on_a_tiny_model(tokenizer, data_dir: Path, tmp_path: Path) -> None:
    model = tiny_model("llama", num_layers=4)
    pairs = load_pairs(["truthfulqa"], data_dir)[:10]
    run = score_eavss(model, tokenizer, pairs, EavssOptions(batch_size=4), progress=False)
    assert run.scores.num_layers == 4 and torch.isfinite(run.scores.eavss).all()
    assert run.truthful.sites["block"].count[0] < run.hallucinated.sites["block"].count[0]
    out = run.save(tmp_path / "run")
    saved = json.loads((out / "eavss.json").read_text())
    assert len(saved["layers"]) == 4 and "avss_normalized" in saved["layers"][0]
    assert_stamped(saved, EAVSS_FORMAT)
    assert (out / "eavss.png").stat().st_size > 1000


def test_heldout_docs_keep_only_the_requested_split() -> None:
    from avss.hallucination.heldout import heldout_docs

    docs = [{"question": f"question {i}"} for i in range(200)]
    test = heldout_docs(docs, "test", None)
    assert test and all(split_of(doc["question"]) == "test" for doc in test)
    assert heldout_docs(docs, "test", 3) == test[:3]
    lines = [{"text": f"line {i}"} for i in range(5)]
    assert heldout_docs(lines, "test", 2) == lines[:2]  # no questions: the first lines, as for perplexity
