"""The zero-shot suite (ARC, PIQA, BoolQ, WinoGrande, OpenBookQA, LAMBADA) on hand-written rows: the exact
lm-evaluation-harness prompts and continuations, the metrics from given log-likelihoods, chance from each
document's options, and the C4 calibration slice as ``--data``. The same tasks against lm-eval itself:
``tests/test_zero_shot_lm_eval.py`` (slow)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import pytest

from _tiny_eval import FIXTURES, bpe_llama, bpe_tokenizer
from avss.data import TextSource, default_data_dir, read_text_file
from avss.errors import DataError
from avss.evaluation import evaluate, get_task
from avss.evaluation.engine import LanguageModel, Loglikelihood, LoglikelihoodRequest
from avss.evaluation.tasks.boolq import boolq_row
from avss.evaluation.tasks.lambada import last_word_request

ZERO_SHOT = ["arc_easy", "arc_challenge", "piqa", "boolq", "winogrande", "openbookqa", "lambada_openai"]
ARC_DOC = {
    "id": "arc_easy_test_0000",
    "question": "What do telescopes use?",
    "choices": ["lenses", "sound", "water"],
    "labels": ["1", "2", "3"],
    "answer_key": "1",
    "answer_index": 0,
}


def _doc(task: str, row: dict[str, Any]) -> dict[str, Any]:
    (doc,) = get_task(task)().documents([row], "test rows")
    return doc


def _requests(task: str, row: dict[str, Any]) -> list[tuple[str, str]]:
    requests = get_task(task)().requests(_doc(task, row), [])
    return [(request.context, request.continuation) for request in requests]


def _results(logprobs: Sequence[float], greedy: bool = False) -> list[Loglikelihood]:
    return [Loglikelihood(logprob, greedy, 1) for logprob in logprobs]


def test_prompts_are_lm_eval_s():
    """The strings of lm-eval 0.4's YAMLs: ``doc_to_text``, ``" "`` (target_delimiter) + each choice."""
    arc = "Question: What do telescopes use?\nAnswer:"
    assert _requests("arc_easy", ARC_DOC) == [(arc, " lenses"), (arc, " sound"), (arc, " water")]
    assert _requests("arc_challenge", ARC_DOC) == _requests("arc_easy", ARC_DOC)
    piqa = {"id": "p", "goal": "Boil water", "sol1": "heat it ", "sol2": "freeze it", "label": 0}
    assert _requests("piqa", piqa) == [
        ("Question: Boil water\nAnswer:", " heat it "),  # solutions as stored, trailing space included
        ("Question: Boil water\nAnswer:", " freeze it"),
    ]
    boolq = {"question": "is it hot", "passage": "It is hot.", "answer": True, "title": "Heat"}
    boolq_context = "Heat -- It is hot.\nQuestion: is it hot?\nAnswer:"  # SuperGLUE's "TITLE -- PASSAGE"
    assert _requests("boolq", boolq) == [(boolq_context, " no"), (boolq_context, " yes")]
    wino = {
        "sentence": "Ann thanked Eve since _ had helped. ",
        "option1": "Ann",
        "option2": "Eve",
        "answer": "2",
    }
    assert _requests("winogrande", wino) == [
        ("Ann thanked Eve since Ann", " had helped."),  # partial scoring: the shared rest, stripped
        ("Ann thanked Eve since Eve", " had helped."),
    ]
    obqa = {"question_stem": "Light is focused by", "choices": ["sound", "lenses"], "answer_index": 1}
    assert _requests("openbookqa", obqa) == [
        ("Light is focused by", " sound"),
        ("Light is focused by", " lenses"),
    ]
    text = 'He said:\n\n"I know" the  answer'
    assert last_word_request(text) == LoglikelihoodRequest('He said:\n\n"I know" the ', " answer")
    assert last_word_request("one\ntwo") == LoglikelihoodRequest("", " one\ntwo")  # spaces only, as lm-eval


def test_accuracy_and_length_normalized_accuracy():
    arc = get_task("arc_easy")()
    doc = _doc("arc_easy", ARC_DOC)  # choices of 6, 5 and 5 characters
    assert arc.score(doc, _results([-6.0, -5.5, -9.0])) == {"accuracy": 0.0, "accuracy_norm": 1.0}
    assert arc.score(doc, _results([-1.0, -1.0, -3.0])) == {
        "accuracy": 1.0,
        "accuracy_norm": 1.0,
    }  # tie: first
    wino = _doc("winogrande", {"sentence": "A _ b", "option1": "x", "option2": "y", "answer": "2"})
    assert get_task("winogrande")().score(wino, _results([-2.0, -1.0])) == {"accuracy": 1.0}
    boolq = _doc("boolq", {"question": "q", "passage": "p", "answer": False, "title": "t"})
    assert get_task("boolq")().score(boolq, _results([-1.0, -2.0])) == {"accuracy": 1.0}
    obqa = _doc("openbookqa", {"question_stem": "s", "choices": ["aa", "b"], "answer_index": 1})
    assert get_task("openbookqa")().score(obqa, _results([-2.0, -1.5])) == {
        "accuracy": 1.0,
        "accuracy_norm": 0.0,
    }


class _FixedLM:
    """A language model whose every request gets the next of the given results."""

    def __init__(self, results: list[Loglikelihood]) -> None:
        self.results = results

    def loglikelihood(self, requests: list[LoglikelihoodRequest]) -> list[Loglikelihood]:
        assert len(requests) == len(self.results)
        return self.results


def test_lambada_perplexity_is_exp_of_minus_the_mean_word_loglikelihood():
    task = get_task("lambada_openai")()
    docs = task.documents([{"id": f"d{i}", "text": f"a passage ending in word{i}"} for i in range(3)], "rows")
    results = [Loglikelihood(-1.0, True, 2), Loglikelihood(-2.0, False, 1), Loglikelihood(-6.0, False, 3)]
    output = task.run(_FixedLM(results), docs, docs, seed=0)
    assert output.metrics == pytest.approx({"accuracy": 1 / 3, "perplexity": math.exp(3.0)})
    # Per passage: the word's NLL over one word, so records give the same perplexity; no options (chance 0).
    assert [(r.nll, r.num_tokens, r.num_options) for r in output.records] == [
        (1.0, 1, None),
        (2.0, 1, None),
        (6.0, 1, None),
    ]
    assert [r.metrics for r in output.records] == [{"accuracy": 1.0}, {"accuracy": 0.0}, {"accuracy": 0.0}]


def test_is_greedy_marks_the_greedy_continuation():
    """LAMBADA's accuracy is the engine's ``is_greedy``: every target token is the argmax at its position."""
    lm = LanguageModel(bpe_llama(), bpe_tokenizer())
    context = "The quick brown fox jumps over the lazy"
    (greedy,) = lm.generate([context], max_new_tokens=3)
    token_ids = lm.encode(context + greedy)[len(lm.encode(context)) :]
    assert lm.encode(context) + token_ids == lm.encode(context + greedy)  # the greedy text re-tokenizes alike
    first, other = lm.loglikelihood(
        [LoglikelihoodRequest(context, greedy), LoglikelihoodRequest(context, " dog")]
    )
    assert first.is_greedy and first.num_tokens == len(token_ids)
    assert other.logprob < first.logprob and not other.is_greedy


def test_documents_carry_their_options_and_label_for_chance():
    """``choices`` (and ``label``) on every multiple-choice document, and records whose ``num_options`` is the
    number of choices: chance is ``1 / len(choices)``; LAMBADA has none (chance 0)."""
    model, tokenizer = bpe_llama(), bpe_tokenizer()
    result = evaluate(model, tokenizer, ZERO_SHOT, data_dir=FIXTURES, batch_size=4)
    for name in ZERO_SHOT:
        task = get_task(name)()
        docs, _ = task.load(FIXTURES, "local")
        records = result.tasks[name].records
        assert [record.id for record in records] == [doc["id"] for doc in docs]
        for doc, record in zip(docs, records, strict=True):
            if name == "lambada_openai":
                assert "choices" not in doc and record.num_options is None and record.label is None
                continue
            assert record.num_options == len(doc["choices"]) == len(task.requests(doc, []))
            assert record.label == doc["label"] and 0 <= doc["label"] < len(doc["choices"])
    assert [len(doc["choices"]) for doc in get_task("arc_easy")().load(FIXTURES, "local")[0]] == [4, 3, 5]


def test_malformed_rows_are_reported():
    with pytest.raises(DataError, match="rows: row 1 \\(w1\\) has no blank '_'"):
        get_task("winogrande")().documents(
            [{"id": "w1", "sentence": "No blank.", "option1": "a", "option2": "b", "answer": "1"}], "rows"
        )
    with pytest.raises(DataError, match="no ' -- ' after its title"):
        boolq_row({"question": "q", "passage": "no title here", "idx": 0, "label": 1}, "dev_0000")


def test_c4_calibration_slice_reads_as_data_file(tmp_path):
    """``--data ../shared/data/c4/c4_validation_2k.jsonl`` needs nothing new: a .jsonl's ``text`` field is
    read and the other fields (``id``, ``url``, ``timestamp``) are ignored."""
    rows = [
        {
            "id": "c4_val_0000",
            "text": "We offer valet parking.\nCall us.",
            "url": "u",
            "timestamp": "2019-04-22",
        },
        {"id": "c4_val_0001", "text": "Second document.", "url": "v", "timestamp": "2019-04-23"},
    ]
    path = tmp_path / "c4_validation_2k.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert TextSource(data=str(path)).load() == [row["text"] for row in rows]
    assert TextSource(data=str(path)).describe()["kind"] == "file"
    shared = default_data_dir()
    c4 = shared / "c4" / "c4_validation_2k.jsonl" if shared else None
    if c4 is None or not c4.is_file():
        pytest.skip("no C4 slice: ../shared/data/c4/c4_validation_2k.jsonl is absent")
    texts = read_text_file(c4)
    assert len(texts) == 2000 and all(text.strip() for text in texts)
