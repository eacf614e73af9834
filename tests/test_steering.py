"""ITI-style mean-difference steering on tiny random models: the direction is the mean activation gap,
strength 0 is the base model, the shift lands where it is asked, and the hooks go away."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _tiny import random_batch, tiny_model
from avss.adapters import block_input, get_adapter
from avss.hallucination import load_pairs
from avss.hallucination.batches import answer_batches
from avss.hallucination.steering import (
    MeanActivations,
    StrengthPoint,
    choose_strength,
    collect_mean_activations,
    merge_all,
    steering,
)
from test_hallucination import data_dir  # noqa: F401  (fixture)

MODEL_TYPES = ["llama", "gpt2", "gemma3_text"]


def logits_of(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def hidden_states(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        inputs = {key: batch[key] for key in ("input_ids", "attention_mask")}
        return model(**inputs, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_direction_is_the_mean_gap_of_stored_activations(
    tokenizer,
    data_dir: Path,  # noqa: F811
    model_type: str,
) -> None:
    model = tiny_model(model_type, num_layers=4)
    pairs = load_pairs(["truthfulqa"], data_dir)[:7]
    means = collect_mean_activations(
        model, tokenizer, pairs, batch_size=3, max_hallucinated=2, progress=False
    )
    expected = {}
    for kind in ("truthful", "hallucinated"):
        batches = answer_batches(tokenizer, pairs, kind, batch_size=5, max_hallucinated=2)
        tokens = {layer: [] for layer in range(3)}
        for batch in batches:
            states = hidden_states(model, batch)
            for layer in tokens:  # hidden_states[l + 1] is block l's output (the last one is normed)
                tokens[layer].append(states[layer + 1][batch["stat_mask"]].double())
        expected[kind] = {layer: torch.cat(rows).mean(dim=0) for layer, rows in tokens.items()}
    for layer in range(3):
        direct = expected["truthful"][layer] - expected["hallucinated"][layer]
        torch.testing.assert_close(means.direction(layer), direct, rtol=1e-5, atol=1e-6)
    assert means.truthful_sum.dtype == torch.float64


def test_mean_activations_merge_like_one_pass(tokenizer, data_dir: Path) -> None:  # noqa: F811
    model = tiny_model("llama", num_layers=3)
    pairs = load_pairs(["truthfulqa"], data_dir)[:9]
    collect = lambda subset: collect_mean_activations(model, tokenizer, subset, progress=False)  # noqa: E731
    whole = collect(pairs)
    merged = merge_all([collect(pairs[:4]), collect(pairs[4:7]), collect(pairs[7:])])
    torch.testing.assert_close(merged.truthful_count, whole.truthful_count)
    for layer in range(3):
        torch.testing.assert_close(merged.direction(layer), whole.direction(layer))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_strength_zero_is_the_base_model_and_hooks_go_away(model_type: str) -> None:
    model = tiny_model(model_type, num_layers=4)
    batch = random_batch(batch=3, length=10)
    base = logits_of(model, batch)
    directions = {1: torch.randn(32, dtype=torch.float64), 3: torch.randn(32, dtype=torch.float64)}
    with steering(model, directions, alpha=0.0):
        assert torch.equal(logits_of(model, batch), base)
    with steering(model, directions, alpha=2.0) as steered:
        assert steered is model
        assert not torch.allclose(logits_of(model, batch), base)
    assert all(not block._forward_hooks for block in get_adapter(model).blocks)
    assert torch.equal(logits_of(model, batch), base)


def block_inputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The residual stream entering each block, as the block receives it (after any steering before it)."""
    seen: list[torch.Tensor] = []
    keep = lambda module, args, kwargs: seen.append(block_input(args, kwargs).clone())  # noqa: E731
    handles = [block.register_forward_pre_hook(keep, with_kwargs=True) for block in get_adapter(model).blocks]
    try:
        logits_of(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_the_shift_is_added_to_the_chosen_blocks_output(model_type: str) -> None:
    model = tiny_model(model_type, num_layers=4)
    batch = random_batch(batch=2, length=8, pad_rows=False)
    direction = torch.randn(32, dtype=torch.float64)
    before = block_inputs(model, batch)
    with steering(model, {1: direction}, alpha=0.5):
        after = block_inputs(model, batch)
    torch.testing.assert_close(after[1], before[1]), "blocks up to the steered one see the same input"
    torch.testing.assert_close(after[2], before[2] + 0.5 * direction.float(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(after[3], before[3])


def test_hooks_go_away_when_the_evaluation_raises() -> None:
    model = tiny_model("llama", num_layers=2)
    with pytest.raises(RuntimeError, match="boom"), steering(model, {0: torch.ones(32)}, alpha=1.0):
        raise RuntimeError("boom")
    assert all(not block._forward_hooks for block in get_adapter(model).blocks)


def test_bad_layers_or_widths_are_refused_before_any_hook() -> None:
    model = tiny_model("llama", num_layers=2)
    with pytest.raises(ValueError, match=r"not in 0\.\.1"), steering(model, {2: torch.ones(32)}, alpha=1.0):
        pass
    with pytest.raises(ValueError, match="shape"), steering(model, {0: torch.ones(31)}, alpha=1.0):
        pass
    assert all(not block._forward_hooks for block in get_adapter(model).blocks)


def test_a_layer_without_answers_has_no_direction() -> None:
    zeros = torch.zeros(2, 4, dtype=torch.float64)
    means = MeanActivations(zeros, torch.tensor([3.0, 0.0]), zeros, torch.tensor([2.0, 1.0]))
    assert means.directions([0])[0].shape == (4,)
    with pytest.raises(ValueError, match="layer 1"):
        means.direction(1)


def test_steering_works_inside_the_evaluation(tokenizer, data_dir: Path) -> None:  # noqa: F811
    from avss.hallucination.heldout import evaluate_heldout

    model = tiny_model("llama", num_layers=3)
    pairs = load_pairs(["truthfulqa"], data_dir, split="train")[:6]
    directions = collect_mean_activations(model, tokenizer, pairs, progress=False).directions([1])
    run = lambda: evaluate_heldout(  # noqa: E731
        model, tokenizer, ["truthfulqa_mc"], limits={"truthfulqa_mc": 4}, data_dir=data_dir
    )["metrics"]["truthfulqa_mc"]
    base = run()
    with steering(model, directions, alpha=0.0):
        assert run() == base
    with steering(model, directions, alpha=50.0):
        steered = run()
    assert steered.keys() == base.keys()


def test_choose_strength_takes_the_best_pair_accuracy_within_the_prose_bound() -> None:
    """Hand-made curve: 4 has the best pair accuracy but raises prose NLL by 0.5 > 0.1; of the allowed
    strengths 1 and 2 tie at 0.6, and the weaker one wins."""
    curve = {
        0.0: StrengthPoint(pair_accuracy=0.40, prose_nll=3.00),
        1.0: StrengthPoint(pair_accuracy=0.60, prose_nll=3.05),
        2.0: StrengthPoint(pair_accuracy=0.60, prose_nll=3.10),
        4.0: StrengthPoint(pair_accuracy=0.90, prose_nll=3.50),
    }
    assert choose_strength(curve, max_nll_rise=0.1) == 1.0
    assert choose_strength(curve, max_nll_rise=1.0) == 4.0
    assert choose_strength(curve, max_nll_rise=0.0) == 0.0
    with pytest.raises(ValueError, match="include 0"):
        choose_strength({1.0: curve[1.0]}, max_nll_rise=0.1)
