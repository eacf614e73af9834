"""Iterative pruning: the cached re-scoring picks exactly the layers that full recomputation picks."""

from __future__ import annotations

import pytest
import torch

from _tiny import random_batch, tiny_model, tiny_tokenizer
from avss.adapters import get_adapter
from avss.data import CalibrationOptions, TextSource
from avss.errors import PruneConfigError
from avss.models import LoadedModel
from avss.pruning.prune import prune
from avss.pruning.rules import PruneSpec
from avss.pruning.select import select_iteratively, select_layers, select_oneshot
from avss.scorers import CachedContext, ScoringContext, context_for, get_scorer
from avss.scorers.run import ScoreOptions, score


def batches() -> list[dict[str, torch.Tensor]]:
    return [random_batch(3, 12, seed=5), random_batch(2, 10, seed=6)]


@pytest.mark.parametrize(
    ("model_type", "method"),
    [("llama", "avss"), ("gemma3_text", "block_influence"), ("llama", "loo_nll"), ("gpt2", "angular")],
)
def test_cached_and_uncached_iterative_runs_pick_the_same_layers(model_type, method):
    scorer = get_scorer(method)
    runs = []
    for cached in (False, True):
        model = tiny_model(model_type, 6)
        runs.append(select_iteratively(scorer, context_for(model, batches(), [scorer], cached=cached), 3))
        assert get_adapter(model).num_layers == 3
    plain, cached = runs
    assert plain.order == cached.order
    for a, b in zip(plain.steps, cached.steps, strict=True):
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-6, atol=1e-7)


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("method", ["loo_nll", "avss"])
def test_an_interrupted_iterative_search_goes_on_to_the_uninterrupted_result(method):
    """``done`` replays the steps an interrupted run reported through ``on_step`` (protected layers, original
    indices) and the search continues to the same order and the same scores as one uninterrupted run."""
    scorer, protect = get_scorer(method), {2}
    whole = select_iteratively(scorer, CachedContext(tiny_model("llama", 6), batches()), 3, protect)
    reported = []

    def stop_after_two(selection):
        reported.append(selection)
        if len(selection.order) == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        select_iteratively(
            scorer, CachedContext(tiny_model("llama", 6), batches()), 3, protect, on_step=stop_after_two
        )
    assert [s.order for s in reported] == [whole.order[:1], whole.order[:2]]
    model = tiny_model("llama", 6)
    resumed = select_iteratively(scorer, CachedContext(model, batches()), 3, protect, done=reported[-1])
    assert resumed.order == whole.order and 2 not in resumed.order
    assert get_adapter(model).num_layers == 3
    for a, b in zip(resumed.steps, whole.steps, strict=True):
        torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=0)


def test_cache_runs_fewer_blocks_than_recomputing():
    model = tiny_model("llama", 6)
    context = CachedContext(model, batches())
    selection = select_iteratively(get_scorer("avss"), context, 3)
    # The first pass runs all 6 blocks; each later pass starts at the removed block.
    current, expected = list(range(6)), 6
    for layer in selection.order[:-1]:
        position = current.index(layer)
        current.pop(position)
        expected += len(current) - position
    assert context.blocks_run == expected < 6 + 5 + 4


def test_iterative_first_step_matches_oneshot_and_keeps_protected_layers():
    scorer = get_scorer("avss")
    oneshot = select_oneshot(scorer, ScoringContext(tiny_model("llama", 6), batches()), 1)
    iterative = select_iteratively(scorer, CachedContext(tiny_model("llama", 6), batches()), 1)
    assert oneshot.removed == iterative.removed
    protect = {0, 5, iterative.order[0]}
    guarded = select_layers(
        scorer, CachedContext(tiny_model("llama", 6), batches()), 3, protect, iterative=True
    )
    assert not protect & set(guarded.removed)
    assert len(set(guarded.order)) == 3


def test_budget_is_checked():
    context = ScoringContext(tiny_model("llama", 4), batches())
    for n_remove in (0, 4):
        with pytest.raises(PruneConfigError):
            select_oneshot(get_scorer("avss"), context, n_remove)


@pytest.mark.parametrize(
    "spec",
    [PruneSpec(n_layers=2, protect=("first",)), PruneSpec(rule="mass", tau=0.4)],
    ids=["count", "mass"],
)
def test_prune_with_the_avss_scorer_matches_the_scores_of_avss_score(spec):
    """`avss prune` goes through prune for every method; for AVSS it must remove what the
    selection rule picks from the streamed scores of `avss score`, and record the same scores."""
    calibration = CalibrationOptions(samples=8, max_length=24, batch_size=2)
    options = ScoreOptions(site="delta", threshold="rel:0.05")
    scorer = get_scorer("avss[site=delta,threshold=rel:0.05]")
    by_scorer = LoadedModel(tiny_model("llama", 6), tiny_tokenizer())
    result, selection = prune(by_scorer, scorer, TextSource(), calibration, spec, progress=False)
    by_run = LoadedModel(tiny_model("llama", 6), tiny_tokenizer())
    run = score(by_run, TextSource(), calibration, options, progress=False)
    assert result.removed == spec.select(run.scores.avss)
    assert result.record.scores == pytest.approx(run.scores.avss.tolist(), rel=1e-9)
    assert get_adapter(by_scorer.model).num_layers == 6 - len(result.removed)
    assert result.record.method == selection.method == "avss[site=delta,threshold=rel:0.05]"
    assert result.record.provenance.command and result.record.provenance.avss_version


@pytest.mark.parametrize(
    ("method", "iterative", "cached"),
    [
        ("avss", False, False),
        ("block_influence", False, False),
        ("avss", True, True),
        ("loo_nll", False, True),
    ],
)
def test_only_repeated_passes_keep_the_residual_cache(monkeypatch, method, iterative, cached):
    """One-shot activation scorers stream (memory flat in calibration tokens); the CachedContext, which holds
    every block's input on CPU, is only for re-scoring after removals and for skipping blocks."""
    import avss.pruning.prune

    built = []

    def recording_context_for(*args, **kwargs):
        built.append(context_for(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(avss.pruning.prune, "context_for", recording_context_for)
    loaded = LoadedModel(tiny_model("llama", 4), tiny_tokenizer())
    calibration = CalibrationOptions(samples=4, max_length=16, batch_size=2)
    spec = PruneSpec(n_layers=1)
    prune(loaded, get_scorer(method), TextSource(), calibration, spec, iterative, progress=False)
    assert [isinstance(context, CachedContext) for context in built] == [cached]


@pytest.mark.parametrize("extra", [["--method", "block_influence", "--iterative"], ["--method", "angular"]])
def test_prune_command_accepts_any_method(tmp_path, extra):
    import json

    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from _tiny import tiny_tokenizer
    from avss.cli._app import app

    source = tmp_path / "tiny"
    tiny_model("llama", 6).save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    text = tmp_path / "calibration.txt"
    text.write_text("\n\n".join(f"Paragraph {i} about cats and mats." for i in range(20)))
    out = tmp_path / "pruned"
    arguments = ["prune", str(source), "--out", str(out), "--n-layers", "2", "--data", str(text)]
    arguments += ["--samples", "4", "--max-length", "32", *extra]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "avss_pruning.json").read_text())
    assert record["method"] == extra[1] and len(record["removed_layers"]) == 2
    assert record["selection"]["iterative"] == ("--iterative" in extra)
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4
