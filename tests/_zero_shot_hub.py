"""Hub rows of the zero-shot suite (ARC, PIQA, BoolQ, WinoGrande, OpenBookQA, LAMBADA) for
``tests/test_evaluation_hub.py``: task -> (load_dataset arguments, rows written in the hub dataset's own
column schema, the normalized documents the task must read from them, written by hand)."""

from __future__ import annotations

from typing import Any

Rows = list[dict[str, Any]]


def _arc_hub(source_id: str, question: str, texts: list[str], labels: list[str], key: str) -> dict[str, Any]:
    return {
        "id": source_id,
        "question": question,
        "choices": {"text": texts, "label": labels},
        "answerKey": key,
    }


ZERO_SHOT_HUB: dict[str, tuple[tuple[str, str | None, str], Rows, Rows]] = {
    "arc_easy": (
        ("allenai/ai2_arc", "ARC-Easy", "test"),
        [
            _arc_hub("Mercury_1", "What focuses light?", ["lenses", "sound", "water"], ["A", "B", "C"], "A"),
            _arc_hub("NYSEDREGENTS_2", "Where is Paris?", ["Spain", "France"], ["1", "2"], "2"),
        ],
        [
            {
                "id": "arc_easy_test_0000",
                "source_id": "Mercury_1",
                "question": "What focuses light?",
                "choices": ["lenses", "sound", "water"],
                "labels": ["A", "B", "C"],
                "answer_key": "A",
                "answer_index": 0,
                "label": 0,
            },
            {
                "id": "arc_easy_test_0001",
                "source_id": "NYSEDREGENTS_2",
                "question": "Where is Paris?",
                "choices": ["Spain", "France"],
                "labels": ["1", "2"],
                "answer_key": "2",
                "answer_index": 1,
                "label": 1,
            },
        ],
    ),
    "arc_challenge": (
        ("allenai/ai2_arc", "ARC-Challenge", "test"),
        [
            _arc_hub(
                "Mercury_3", "What melts ice?", ["cold", "heat", "dark", "wind", "salt"], list("ABCDE"), "B"
            )
        ],
        [
            {
                "id": "arc_challenge_test_0000",
                "source_id": "Mercury_3",
                "question": "What melts ice?",
                "choices": ["cold", "heat", "dark", "wind", "salt"],
                "labels": ["A", "B", "C", "D", "E"],
                "answer_key": "B",
                "answer_index": 1,
                "label": 1,
            }
        ],
    ),
    "piqa": (
        ("baber/piqa", None, "validation"),
        [
            {"goal": "To boil water,", "sol1": "heat it. ", "sol2": "freeze it.", "label": 0},
            {"goal": "Focus light", "sol1": "hum", "sol2": "use a lens", "label": 1},
        ],
        [
            {
                "id": "piqa_valid_0000",
                "goal": "To boil water,",
                "sol1": "heat it. ",
                "sol2": "freeze it.",
                "label": 0,
                "choices": ["heat it. ", "freeze it."],
            },
            {
                "id": "piqa_valid_0001",
                "goal": "Focus light",
                "sol1": "hum",
                "sol2": "use a lens",
                "label": 1,
                "choices": ["hum", "use a lens"],
            },
        ],
    ),
    "boolq": (
        ("aps/super_glue", "boolq", "validation"),
        [
            {
                "question": "does water boil at 100 degrees",
                "passage": "Water -- Water boils at 100 degrees.",
                "idx": 0,
                "label": 1,
            },
            # Only the first separator splits title from paragraph.
            {
                "question": "is a fox slow",
                "passage": "Fox -- Foxes are quick -- very quick.",
                "idx": 1,
                "label": 0,
            },
        ],
        [
            {
                "id": "boolq_dev_0000",
                "question": "does water boil at 100 degrees",
                "passage": "Water boils at 100 degrees.",
                "answer": True,
                "title": "Water",
                "choices": ["no", "yes"],
                "label": 1,
            },
            {
                "id": "boolq_dev_0001",
                "question": "is a fox slow",
                "passage": "Foxes are quick -- very quick.",
                "answer": False,
                "title": "Fox",
                "choices": ["no", "yes"],
                "label": 0,
            },
        ],
    ),
    "winogrande": (
        ("allenai/winogrande", "winogrande_xl", "validation"),
        [
            {
                "sentence": "The fox beat the dog because _ was quick.",
                "option1": "fox",
                "option2": "dog",
                "answer": "1",
            },
            {
                "sentence": "Ann thanked Eve since _ had helped.",
                "option1": "Ann",
                "option2": "Eve",
                "answer": "2",
            },
        ],
        [
            {
                "id": "winogrande_dev_0000",
                "sentence": "The fox beat the dog because _ was quick.",
                "option1": "fox",
                "option2": "dog",
                "answer": "1",
                "choices": ["fox", "dog"],
                "label": 0,
            },
            {
                "id": "winogrande_dev_0001",
                "sentence": "Ann thanked Eve since _ had helped.",
                "option1": "Ann",
                "option2": "Eve",
                "answer": "2",
                "choices": ["Ann", "Eve"],
                "label": 1,
            },
        ],
    ),
    "openbookqa": (
        ("allenai/openbookqa", "main", "test"),
        [
            {
                "id": "8-343",
                "question_stem": "Telescopes focus light with",
                "choices": {"text": ["sound", "lenses", "magnets", "water"], "label": ["A", "B", "C", "D"]},
                # lm-eval strips the key before looking it up (answerKey.lstrip()).
                "answerKey": " B",
            }
        ],
        [
            {
                "id": "obqa_test_000",
                "source_id": "8-343",
                "question_stem": "Telescopes focus light with",
                "choices": ["sound", "lenses", "magnets", "water"],
                "labels": ["A", "B", "C", "D"],
                "answer_key": " B",
                "answer_index": 1,
                "label": 1,
            }
        ],
    ),
    "lambada_openai": (
        ("EleutherAI/lambada_openai", "default", "test"),
        [{"text": "The fox jumps over the lazy dog.\n\nAgain the fox jumps over the dog"}],
        [
            {
                "id": "lambada_test_0000",
                "text": "The fox jumps over the lazy dog.\n\nAgain the fox jumps over the dog",
            }
        ],
    ),
}
