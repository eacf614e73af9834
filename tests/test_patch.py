"""``--patch linear``: streamed fit sums, the solve and the fold on plain tensors, the hooks on tiny models,
the saved model, the block-0 rule and the architectures the fold is refused for."""

from __future__ import annotations

import copy
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from _precision import FLOAT32_EPS, FLOAT32_PATHS
from _tiny import random_batch, tiny_config, tiny_model, tiny_tokenizer
from avss.adapters import first_tensor, get_adapter, remove_layers
from avss.data import CalibrationOptions, TextSource, bundled_text, split_paragraphs, tokenize_texts
from avss.errors import PruneConfigError
from avss.healing.patch import (
    LinearPatch,
    check_linear_patch,
    check_patchable,
    fit_linear_patch,
    fit_memory_bytes,
    fold_linear_map,
    linear_patch,
    plan_runs,
    ridge_lambda,
    solve_linear_map,
    squared_error,
)
from avss.launch import DistributedContext
from avss.models import LoadedModel
from avss.pruning.prune import PROVENANCE_FILE, prune, save_pruned
from avss.pruning.rules import PruneSpec
from avss.scorers import ScoringContext, get_scorer
from avss.stats.accumulators import LinearFitStats, masked_cross_products
from avss.stats.collect import collect_linear_fit
from avss.stats.distributed import collect_linear_fit_distributed

FLOAT64_EPS = torch.finfo(torch.float64).eps
PATCHABLE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2", "gpt_neox", "opt")


def _batches(count: int = 4) -> list[dict[str, torch.Tensor]]:
    return [random_batch(batch=3, length=10 + 3 * i, seed=i) for i in range(count)]


# --- the solve and the fold on plain tensors


def test_fold_matches_hand_computed_values_in_both_layouts():
    swap = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # y' = y T swaps the two outputs
    weight, bias = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([5.0, 6.0])
    folded, folded_bias = fold_linear_map(weight, bias, swap, "out_in")  # rows are outputs
    assert torch.equal(folded, torch.tensor([[3.0, 4.0], [1.0, 2.0]]))
    assert torch.equal(folded_bias, torch.tensor([6.0, 5.0]))
    folded, _ = fold_linear_map(weight, None, swap, "in_out")  # columns are outputs
    assert torch.equal(folded, torch.tensor([[2.0, 1.0], [4.0, 3.0]]))
    scale = torch.diag(torch.tensor([2.0, -1.0]))
    assert torch.equal(fold_linear_map(weight, bias, scale)[1], torch.tensor([10.0, -6.0]))


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_folded_projection_outputs_the_old_output_times_the_map(kind):
    torch.manual_seed(0)
    module = torch.nn.Linear(6, 4) if kind == "linear" else Conv1D(4, 6)
    if kind == "conv1d":
        torch.nn.init.normal_(module.bias)
    x, t = torch.randn(5, 6), torch.randn(4, 4)
    layout = "out_in" if kind == "linear" else "in_out"
    with torch.no_grad():
        want = (module(x).double() @ t.double()).float()
        weight, bias = fold_linear_map(module.weight, module.bias, t, layout)
        module.weight.copy_(weight)
        module.bias.copy_(bias)
        scale = float(want.abs().max())
        torch.testing.assert_close(module(x), want, rtol=0, atol=64 * FLOAT32_EPS * scale)


def test_solve_matches_hand_computed_values_with_and_without_ridge():
    xtx = torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64))
    xty = torch.tensor([[1.0, 2.0], [4.0, 8.0]], dtype=torch.float64)
    assert torch.equal(
        solve_linear_map(xtx, xty), torch.tensor([[1.0, 2.0], [1.0, 2.0]], dtype=torch.float64)
    )
    # ridge 0.4 x mean eigenvalue 2.5 = lambda 1: T = diag(1/2, 1/5) X^T Y
    assert ridge_lambda(xtx, 0.4) == pytest.approx(1.0)
    ridged = torch.tensor([[0.5, 1.0], [0.8, 1.6]], dtype=torch.float64)
    torch.testing.assert_close(solve_linear_map(xtx, xty, 0.4), ridged, rtol=4 * FLOAT64_EPS, atol=0)


def test_solve_from_sums_equals_lstsq_and_the_error_formula_equals_the_direct_error():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(200, 8, generator=generator, dtype=torch.float64)
    y = x @ torch.randn(8, 8, generator=generator, dtype=torch.float64)
    y += 0.1 * torch.randn(200, 8, generator=generator, dtype=torch.float64)
    t = solve_linear_map(x.T @ x, x.T @ y)
    want = torch.linalg.lstsq(x, y).solution
    # normal equations lose cond(X)^2 digits against lstsq's QR; the tolerance says so
    tolerance = 64 * FLOAT64_EPS * float(torch.linalg.cond(x)) ** 2 * float(want.abs().max())
    torch.testing.assert_close(t, want, rtol=0, atol=tolerance)
    direct = float((x @ t - y).square().sum())
    assert squared_error(x.T @ x, x.T @ y, y.square().sum(), t) == pytest.approx(direct, rel=1e-9)


def test_a_singular_gram_matrix_asks_for_a_ridge():
    x = torch.randn(3, 5, dtype=torch.float64)  # fewer tokens than channels
    with pytest.raises(PruneConfigError, match="--patch-ridge"):
        solve_linear_map(x.T @ x, x.T @ x)
    assert torch.isfinite(solve_linear_map(x.T @ x, x.T @ x, ridge=1e-3)).all()


# --- the streamed sums


def test_masked_sums_equal_a_direct_computation_and_shards_merge_by_addition():
    generator = torch.Generator().manual_seed(2)
    inputs, targets = (
        torch.randn(2, 3, 7, 4, generator=generator),
        torch.randn(2, 3, 7, 4, generator=generator),
    )
    masks = torch.rand(2, 3, 7, generator=generator) > 0.3
    one, halves = LinearFitStats(1, 4), [LinearFitStats(1, 4), LinearFitStats(1, 4)]
    for shard in range(2):
        one.update(0, inputs[shard], targets[shard], masks[shard])
        halves[shard].update(0, inputs[shard], targets[shard], masks[shard])
    x, y = inputs[masks].double(), targets[masks].double()
    assert float(one.count[0]) == masks.sum()
    for got, want in ((one.xtx[0], x.T @ x), (one.xty[0], x.T @ y), (one.yy[0], y.square().sum())):
        torch.testing.assert_close(got, want, rtol=64 * FLOAT64_EPS, atol=0)
    merged = halves[0].merge(halves[1])
    for name, value in one.tensors().items():
        torch.testing.assert_close(merged.tensors()[name], value, rtol=64 * FLOAT64_EPS, atol=0)
    assert masked_cross_products(inputs[0], targets[0], masks[0])[0] == masks[0].sum()


def _stored_activations(model, batches, source, target):
    """Every real token's ``m`` (source's MLP output) and ``y - r``, kept in full (the reference)."""
    adapter, captured, ms, targets = get_adapter(model), {}, [], []
    handles = [
        adapter.site_module(source, "mlp").register_forward_hook(lambda _m, _a, o: captured.update(m=o)),
        adapter.blocks[source].register_forward_hook(lambda _m, _a, o: captured.update(h=first_tensor(o))),
        adapter.blocks[target].register_forward_hook(lambda _m, _a, o: captured.update(y=first_tensor(o))),
    ]
    try:
        for batch in batches:
            with torch.no_grad():
                model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            mask = batch["attention_mask"].bool()
            m = captured["m"].double().view(*mask.shape, -1)
            r = captured["h"].double() - m
            ms.append(m[mask])
            targets.append(captured["y"].double()[mask] - r[mask])
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat(ms), torch.cat(targets)


def test_streamed_sums_and_fit_equal_stored_activations_and_lstsq():
    model, batches = tiny_model("llama", 6), _batches()
    stats = collect_linear_fit(model, batches, [(1, 3), (4, 5)], width=32, progress=False)
    for fit, (source, target) in enumerate([(1, 3), (4, 5)]):
        m, wanted = _stored_activations(model, batches, source, target)
        assert int(stats.count[fit]) == sum(int(b["attention_mask"].sum()) for b in batches) == m.shape[0]
        scale = float(m.abs().max()) * max(float(m.abs().max()), float(wanted.abs().max()))
        tolerance = 64 * FLOAT64_EPS * m.shape[0] * scale  # float64 sums of N identical products
        torch.testing.assert_close(stats.xtx[fit], m.T @ m, rtol=0, atol=tolerance)
        torch.testing.assert_close(stats.xty[fit], m.T @ wanted, rtol=0, atol=tolerance)
        fitted = solve_linear_map(stats.xtx[fit], stats.xty[fit])
        want = torch.linalg.lstsq(m, wanted).solution
        bound = 64 * FLOAT64_EPS * float(torch.linalg.cond(m)) ** 2 * float(want.abs().max())
        torch.testing.assert_close(fitted, want, rtol=0, atol=bound)


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        LOCAL_RANK="0",
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    model, batches = tiny_model("llama", 5), _batches(5)
    kwargs = dict(pairs=[(1, 2), (3, 4)], width=32, progress=False)
    gathered = collect_linear_fit_distributed(model, batches, **kwargs)
    shards = [
        collect_linear_fit(model, DistributedContext(r, world_size).shard(batches), **kwargs)
        for r in range(world_size)
    ]
    local = shards[0].merge(shards[1])
    torch.save({"gathered": gathered.tensors(), "local": local.tensors()}, f"{out}.{rank}")


def test_two_gloo_processes_equal_one_process(tmp_path):
    """The all-reduce adds only float64 round-off to the local merge of the same shards; against one process
    over all batches the sums agree to float32 rounding of the forward passes (another thread count)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = str(tmp_path / "fit")
    mp.spawn(_worker, args=(2, port, out), nprocs=2, join=True)
    want = collect_linear_fit(
        tiny_model("llama", 5), _batches(5), [(1, 2), (3, 4)], width=32, progress=False
    ).tensors()
    for rank in range(2):
        saved = torch.load(f"{out}.{rank}")
        for name, value in want.items():
            gathered, local = saved["gathered"][name], saved["local"][name]
            magnitude = float(value.abs().max())
            torch.testing.assert_close(gathered, local, rtol=0, atol=64 * FLOAT64_EPS * magnitude)
            torch.testing.assert_close(gathered, value, rtol=0, atol=FLOAT32_PATHS * magnitude)


# --- the fold in a model


def _hidden_entering(model, block: int, batch) -> torch.Tensor:
    captured = {}

    def hook(module, args, kwargs):
        captured["x"] = args[0] if args else kwargs["hidden_states"]

    handle = get_adapter(model).blocks[block].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        handle.remove()
    return captured["x"]


@pytest.mark.parametrize("model_type", PATCHABLE)
def test_the_first_kept_block_after_the_run_receives_r_plus_m_t(model_type):
    """Removing 2..3 after patching: block 1's output (the new block 2's input) is r + m T, with r and m of
    the unpatched model's block 1 (unchanged before it) and T the fitted map."""
    model, batches = tiny_model(model_type, 6), _batches()
    reference = copy.deepcopy(model)
    patch = fit_linear_patch(reference, batches, [2, 3], progress=False)
    linear_patch(model, batches, [2, 3], progress=False)
    remove_layers(model, [2, 3])
    batch, mask = batches[1], batches[1]["attention_mask"].bool()
    m, wanted = _stored_activations(reference, [batch], 1, 1)  # y = block 1's own output: y - r = m
    r = _hidden_entering(reference, 2, batch).double()[mask] - m
    expected = r + m @ patch.maps[0]
    got = _hidden_entering(model, 2, batch).double()[mask]
    scale = float((r.abs() + (m.abs() @ patch.maps[0].abs())).max())
    torch.testing.assert_close(got, expected, rtol=0, atol=FLOAT32_PATHS * scale)
    torch.testing.assert_close(wanted, m)


@pytest.fixture(scope="module")
def trained():
    """A 6-block tiny llama trained 60 steps on the bundled calibration text, and its batches: removing its
    middle blocks costs real loss, which a random initialisation would not show."""
    torch.manual_seed(0)
    model, tokenizer = tiny_model("llama", 6).train(), tiny_tokenizer()
    texts = split_paragraphs(bundled_text("calibration"))
    batches = tokenize_texts(tokenizer, texts, samples=32, max_length=64, batch_size=8, seed=0).batches
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(60):
        batch = batches[step % len(batches)]
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), tokenizer, batches


def test_patch_recovers_most_of_the_calibration_loss_lost_to_removal(trained):
    model, _, batches = trained
    base = ScoringContext(model, batches).base_nll()
    plain, patched = copy.deepcopy(model), copy.deepcopy(model)
    remove_layers(plain, [1, 2, 3, 4])
    record = linear_patch(patched, batches, [1, 2, 3, 4], progress=False)
    remove_layers(patched, [1, 2, 3, 4])
    lost = ScoringContext(plain, batches).base_nll() - base
    left = ScoringContext(patched, batches).base_nll() - base
    assert lost > 0.05  # the removal matters on this model (0.32 nats when written)
    assert left < 0.5 * lost  # measured 0.02 of 0.32: recovering half is far from both
    run = record["runs"][0]
    assert run["fit_error"] < run["unpatched_error"]  # T = I is feasible, so least squares cannot do worse


def test_saved_patched_model_reloads_with_the_same_logits_size_and_a_provenance_record(trained, tmp_path):
    model, tokenizer, _ = trained
    calibration = CalibrationOptions(samples=16, max_length=48, batch_size=4)
    results = {}
    for patch in (None, "linear"):
        loaded = LoadedModel(copy.deepcopy(model), tokenizer, {"name": "tiny-trained"})
        spec = PruneSpec(n_layers=2, patch=patch, patch_ridge=1e-6)
        result, _ = prune(
            loaded, get_scorer("block_influence"), TextSource(), calibration, spec, progress=False
        )
        save_pruned(loaded.model, loaded.tokenizer, tmp_path / str(patch), result.record)
        results[patch] = (loaded, result)
    loaded, result = results["linear"]
    unpatched_loaded, unpatched = results[None]
    assert result.removed == unpatched.removed
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "linear").eval()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "None").eval()
    assert reloaded.num_parameters() == plain.num_parameters() == unpatched_loaded.model.num_parameters()
    assert type(reloaded) is type(plain)
    assert reloaded.config.num_hidden_layers == plain.config.num_hidden_layers == 4
    batch = random_batch()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, loaded.model(**batch).logits, rtol=0, atol=0)
    record = json.loads((tmp_path / "linear" / PROVENANCE_FILE).read_text())
    assert json.loads((tmp_path / "None" / PROVENANCE_FILE).read_text())["patch"] is None
    patch = record["patch"]
    assert record["selection"]["patch"] == "linear" and record["selection"]["patch_ridge"] == 1e-6
    assert patch["method"] == "linear" and patch["ridge"] == 1e-6
    assert patch["fit_tokens"] == record["options"]["num_tokens"]
    runs = {tuple(run["removed"]): run for run in patch["runs"]}
    assert sorted(layer for removed in runs for layer in removed) == result.removed
    for removed, run in runs.items():
        assert run["folded_into"] == removed[0] - 1
        assert run["module"] == f"model.layers.{removed[0] - 1}.mlp.down_proj"
        assert 0 <= run["fit_error"] < run["unpatched_error"]
        assert run["relative_fit_error"] == pytest.approx(run["fit_error"] / run["unpatched_error"])


def test_python_api_prune_patches_with_the_bundled_calibration_text(trained):
    model, tokenizer, _ = trained
    loaded = LoadedModel(copy.deepcopy(model), tokenizer, {"name": "tiny-trained"})
    calibration = CalibrationOptions(samples=8, max_length=32, batch_size=4)
    spec = PruneSpec(n_layers=2, patch="linear")
    result, _ = prune(loaded, get_scorer("avss"), TextSource(), calibration, spec, progress=False)
    assert 0 not in result.removed
    assert result.record.patch is not None and result.record.patch["fit_tokens"] > 0


# --- rules and refusals


def test_block_zero_is_protected_by_a_patch_and_a_run_starting_there_is_refused():
    scores = torch.tensor([0.01, 0.5, 0.02, 0.9])
    assert PruneSpec(n_layers=2).select(scores) == [0, 2]
    assert PruneSpec(n_layers=2, patch="linear").select(scores) == [1, 2]
    assert PruneSpec(rule="mass", tau=0.03, patch="linear").select(scores) == [2]
    assert PruneSpec(patch="linear").protected(4) == {0}
    with pytest.raises(PruneConfigError, match=r"starts at block 0.*--protect first"):
        plan_runs([0, 1, 3], 4)
    assert [(run.first, run.last, run.source) for run in plan_runs([3, 1, 2, 5], 6)] == [(1, 3, 0), (5, 5, 4)]
    with pytest.raises(PruneConfigError, match="starts at block 0"):
        linear_patch(tiny_model("llama", 4), _batches(1), [0], progress=False)


def test_prune_with_a_patch_never_removes_block_zero_even_when_the_scorer_ranks_it_lowest():
    loaded = LoadedModel(tiny_model("llama", 4), tiny_tokenizer())
    calibration = CalibrationOptions(samples=4, max_length=24, batch_size=2)
    spec = PruneSpec(n_layers=2, patch="linear", patch_ridge=1e-3)
    result, _ = prune(loaded, get_scorer("first"), TextSource(), calibration, spec, progress=False)
    assert result.removed == [1, 2]


@pytest.mark.parametrize(
    ("model_type", "config", "message"),
    [
        ("gemma3_text", {}, "post_feedforward_layernorm"),
        ("gemma2", {}, "post_feedforward_layernorm"),
        ("bert", {}, "output.LayerNorm"),
        ("distilbert", {}, "output_layer_norm"),
        ("opt", {"do_layer_norm_before": False}, "final_layer_norm"),
    ],
)
def test_architectures_with_a_norm_after_the_mlp_are_refused(model_type, config, message):
    model = tiny_model(model_type, 2)
    for key, value in config.items():
        setattr(model.config, key, value)
    with pytest.raises(PruneConfigError, match=f"cannot be folded.*{message}"):
        check_patchable(model)


def test_opt_with_pre_norm_and_the_patchable_types_are_accepted():
    assert tiny_config("opt").do_layer_norm_before
    for model_type in PATCHABLE:
        check_patchable(tiny_model(model_type, 2))


def test_memory_figure_and_the_check_before_the_pass(monkeypatch):
    assert LinearFitStats.bytes_needed(1, 4096) == 268_435_456  # two 4096 x 4096 float64 sums
    assert fit_memory_bytes(3, 4096, 0) == 3 * 268_435_456 + 3 * 8 * 4096**2
    monkeypatch.setattr("avss.healing.patch.available_memory", lambda device: 10_000)
    with pytest.raises(PruneConfigError, match=r"needs 0\.0\d GB on cpu.*only 0\.00 GB are free"):
        check_linear_patch(tiny_model("llama", 2), _batches(1))
    monkeypatch.setattr("avss.healing.patch.available_memory", lambda device: None)  # unknown: no refusal
    assert check_linear_patch(tiny_model("llama", 2), _batches(1)) > 0


@pytest.mark.parametrize(
    ("options", "iterative", "message"),
    [
        ({"patch": "quadratic"}, False, "unknown --patch"),
        ({"patch": "linear", "patch_ridge": -1.0}, False, "--patch-ridge must be"),
        ({"patch": "linear", "patch_ridge": float("nan")}, False, "--patch-ridge must be"),
        ({"patch": "linear"}, True, "cannot be combined with --iterative"),
    ],
)
def test_bad_patch_options_fail_before_the_model_is_used(options, iterative, message):
    with pytest.raises(PruneConfigError, match=message):
        PruneSpec(**options).check(iterative=iterative)


def test_patch_record_of_an_exact_linear_relation_has_zero_fit_error():
    """If y - r is exactly a linear map of m, the fit recovers it and the residual error is zero."""
    generator = torch.Generator().manual_seed(3)
    m = torch.randn(50, 4, generator=generator, dtype=torch.float64)
    t = torch.randn(4, 4, generator=generator, dtype=torch.float64)
    stats = LinearFitStats(1, 4, count=torch.tensor([50.0], dtype=torch.float64))
    stats.xtx[0], stats.xty[0], stats.yy[0] = m.T @ m, m.T @ (m @ t), (m @ t).square().sum()
    patch = LinearPatch(plan_runs([2], 4), [solve_linear_map(stats.xtx[0], stats.xty[0])], stats, 0.0)
    run = patch.record()["runs"][0]
    assert run["fit_error"] <= 1e-9 * float((m @ t).square().mean()) * 4
    assert run["removed"] == [2] and run["folded_into"] == 1 and run["fit_tokens"] == 50


def test_cli_prune_with_patch_writes_the_record_and_bad_options_fail_before_loading(
    tmp_path, monkeypatch, capsys
):
    import sys

    from avss.cli import main

    model_dir, out = tmp_path / "tiny", tmp_path / "pruned"
    tiny_model("llama", 4).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)

    def avss(*args: object) -> int:
        monkeypatch.setattr(sys, "argv", ["avss", *map(str, args)])
        try:
            main()
        except SystemExit as exit_:
            return int(exit_.code or 0)
        return 0

    fast = ["--samples", 4, "--max-length", 24, "--batch-size", 2, "--device", "cpu"]
    assert (
        avss(
            "prune",
            model_dir,
            "--patch",
            "linear",
            "--patch-ridge",
            1e-4,
            "--n-layers",
            2,
            *fast,
            "--out",
            out,
        )
        == 0
    )
    assert "linear patch folded into blocks" in capsys.readouterr().out
    record = json.loads((out / PROVENANCE_FILE).read_text())
    assert 0 not in record["removed_layers"] and record["patch"]["ridge"] == 1e-4
    monkeypatch.setattr("avss.cli.core.load_model", lambda *a, **k: pytest.fail("loaded a model"))
    assert avss("prune", model_dir, "--patch", "cubic", "--out", tmp_path / "x") == 2
    assert "unknown --patch 'cubic'" in capsys.readouterr().err
    assert avss("prune", model_dir, "--patch", "linear", "--iterative", "--out", tmp_path / "x") == 2
    assert "--iterative" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
