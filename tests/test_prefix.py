"""Running a pruned model from a recorded block input of the unpruned one gives its full forward's logits."""

from __future__ import annotations

import copy

import pytest
import torch

from _tiny import random_batch, tiny_model
from avss.adapters import remove_layers
from avss.evaluation.prefix import PrefixMismatch, PrefixStore

NUM_LAYERS = 6


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "gpt2", "qwen2"])
def test_replayed_prefix_gives_the_full_forward_to_the_bit(model_type, tmp_path):
    """Blocks 4 and 5 removed: the pruned model run from block 3 on the recorded input equals its full
    forward exactly, padding, sliding-window layers (gemma3) and Conv1D blocks (gpt2) included."""
    base = tiny_model(model_type, NUM_LAYERS)
    batches = [random_batch(3, 10, seed=1), random_batch(2, 7, seed=2)]
    store = PrefixStore(tmp_path, [1, 3])
    with torch.no_grad(), store.record(base, "task"):
        for batch in batches:
            base(**batch, use_cache=False)
    pruned = copy.deepcopy(base)
    remove_layers(pruned, [4, 5])
    with torch.no_grad():
        full = [pruned(**batch, use_cache=False).logits for batch in batches]
        for start in (1, 3):
            with store.replay(pruned, "task", start):
                replayed = [pruned(**batch, use_cache=False).logits for batch in batches]
            for a, b in zip(full, replayed, strict=True):
                assert torch.equal(a, b), (model_type, start)
        assert torch.equal(pruned(**batches[0], use_cache=False).logits, full[0])  # restored after replay


def test_a_replay_that_does_not_fit_raises(tmp_path):
    base = tiny_model("llama", NUM_LAYERS)
    store = PrefixStore(tmp_path, [2])
    with torch.no_grad(), store.record(base, "task"):
        base(**random_batch(3, 10, seed=1), use_cache=False)
    another_shape = random_batch(2, 7, seed=2)
    with torch.no_grad(), pytest.raises(PrefixMismatch, match="do not fit"), store.replay(base, "task", 2):
        base(**another_shape, use_cache=False)
    with pytest.raises(PrefixMismatch, match="fewer forward passes"), store.replay(base, "task", 2):
        pass


def test_a_cell_records_the_starts_it_passes_and_the_next_one_replays_them(tmp_path):
    """Without the unpruned model's pass, the first pruned model (blocks 4 and 5 removed) records blocks 1
    and 3 on its way; the next (block 5 removed) runs from block 3 on that recording, to its full forward's
    bits, and records nothing; a start at or after a model's first removed block is never recorded by it."""
    base = tiny_model("llama", NUM_LAYERS)
    batches = [random_batch(3, 10, seed=1), random_batch(2, 7, seed=2)]
    store = PrefixStore(tmp_path, [1, 3, 5])
    first, second = copy.deepcopy(base), copy.deepcopy(base)
    remove_layers(first, [4, 5])
    remove_layers(second, [5])
    with torch.no_grad():
        with store.run(first, "task", first_removed=4):
            for batch in batches:
                first(**batch, use_cache=False)
        assert [store.has("task", s) for s in (1, 3, 5)] == [True, True, False]
        full = [second(**batch, use_cache=False).logits for batch in batches]
        recorded = {s: store.path("task", s).stat().st_mtime_ns for s in (1, 3)}
        with store.run(second, "task", first_removed=5):
            replayed = [second(**batch, use_cache=False).logits for batch in batches]
    for a, b in zip(full, replayed, strict=True):
        assert torch.equal(a, b)
    assert {s: store.path("task", s).stat().st_mtime_ns for s in (1, 3)} == recorded
    assert not store.has("task", 5)  # the second model's block 5 is the unpruned one's head input: no start
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_replayed_cell_records_a_later_start_as_the_unpruned_model_would(tmp_path):
    """Run from block 1's recording, a model first removing block 4 records block 3's input to the bit of
    the unpruned model's own recording."""
    base = tiny_model("llama", NUM_LAYERS)
    batches = [random_batch(3, 10, seed=1), random_batch(2, 7, seed=2)]
    reference, store = PrefixStore(tmp_path / "base", [1, 3]), PrefixStore(tmp_path / "cells", [1, 3])
    early, late = copy.deepcopy(base), copy.deepcopy(base)
    remove_layers(early, [2])
    remove_layers(late, [4, 5])
    with torch.no_grad():
        for model, store_, first in ((base, reference, None), (early, store, 2), (late, store, 4)):
            with store_.run(model, "task", first_removed=first):
                for batch in batches:
                    model(**batch, use_cache=False)
    assert store.has("task", 3)
    for start in (1, 3):
        ours, theirs = (torch.load(s.path("task", start), weights_only=True) for s in (store, reference))
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True)), start
