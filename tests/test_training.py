"""The generic training loop: only selected parameters move, losses fall, checkpoints resume, early stop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _tiny import random_batch, tiny_model
from avss.errors import CheckpointError
from avss.training import (
    TrainConfig,
    autocast_enabled,
    evaluate_loss,
    half_precision_warning,
    prefix_selector,
    set_trainable,
    train,
)


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss


def batches(n: int = 2) -> list[dict[str, torch.Tensor]]:
    return [random_batch(batch=2, length=10, seed=seed) for seed in range(n)]


def test_only_selected_parameters_change() -> None:
    model = tiny_model("llama", num_layers=4)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    result = train(
        model,
        lm_loss,
        batches(),
        trainable=prefix_selector(["model.layers.1"]),
        config=TrainConfig(progress=False),
    )
    assert result.steps == 2 and result.trainable_parameters < result.total_parameters
    for name, param in model.named_parameters():
        if name.startswith("model.layers.1."):
            assert not torch.equal(param, before[name]), name
        else:
            assert torch.equal(param, before[name]), name
    assert result.optimizer_state_bytes == 2 * 4 * result.trainable_parameters + 4 * sum(
        1 for n, _ in model.named_parameters() if n.startswith("model.layers.1.")
    )


def test_sixteen_bit_trainable_weights_are_warned_about() -> None:
    # The reason: an AdamW-sized step of 1e-4 on a bfloat16 weight near 0.05 rounds back to the weight.
    weight = torch.tensor(0.05, dtype=torch.bfloat16)
    assert weight + torch.tensor(1e-4, dtype=torch.bfloat16) == weight
    params = {"a": torch.nn.Parameter(torch.zeros(2)), "b": torch.nn.Parameter(torch.zeros(2))}
    assert half_precision_warning(params) is None
    params["b"] = torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
    assert "bfloat16 weights" in half_precision_warning(params)
    model = tiny_model("llama", num_layers=2).to(torch.bfloat16)
    config = TrainConfig(progress=False)
    result = train(model, lm_loss, batches(1), trainable=prefix_selector(["model.layers.0"]), config=config)
    assert result.warnings == [half_precision_warning(dict(model.model.layers[0].named_parameters()))]


def test_autocast_modes() -> None:
    cpu = torch.device("cpu")
    assert not autocast_enabled("auto", cpu)  # CPUs opt in: without native bfloat16 it is slower
    assert autocast_enabled("bf16", cpu)
    assert not autocast_enabled("off", cpu)
    assert not autocast_enabled("off", torch.device("cuda"))


@pytest.mark.parametrize("mode", ["bf16", "off"])
def test_autocast_runs_forward_passes_in_bfloat16_over_float32_weights(mode: str) -> None:
    model = tiny_model("llama", num_layers=2)
    seen: list[torch.dtype] = []
    model.lm_head.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    config = TrainConfig(epochs=1, lr=1e-2, patience=None, autocast=mode, progress=False)
    result = train(
        model,
        lm_loss,
        batches(2),
        trainable=prefix_selector(["model.layers.0"]),
        val_batches=batches(1),
        config=config,
    )
    expected = torch.bfloat16 if mode == "bf16" else torch.float32
    assert seen == [expected] * 4  # validation before, two training batches, validation after
    assert result.autocast_dtype == ("bfloat16" if mode == "bf16" else None)
    weight = model.model.layers[0].mlp.down_proj.weight
    assert weight.dtype == torch.float32 and not torch.equal(weight, before)
    assert result.warnings == []


def test_autocast_loss_agrees_with_float32_to_bfloat16_precision() -> None:
    # bfloat16 rounds each activation and logit to 8 significant bits (relative error at most 2**-8); the
    # loss, a mean of log-softmax values, inherits at most about that relative error, and is not exact.
    model = tiny_model("llama", num_layers=2)
    full = evaluate_loss(model, lm_loss, batches(2), autocast="off")
    half = evaluate_loss(model, lm_loss, batches(2), autocast="bf16")
    assert half != full
    assert abs(half - full) <= 2**-8 * abs(full)


def test_empty_selection_is_an_error() -> None:
    with pytest.raises(ValueError, match="no parameters"):
        set_trainable(tiny_model("llama", 2), lambda name, param: False)


def test_loss_decreases_and_grad_accumulation_counts_steps() -> None:
    model = tiny_model("llama", num_layers=2)
    data = batches(4)
    config = TrainConfig(epochs=8, lr=3e-3, grad_accum=2, patience=None, progress=False)
    result = train(model, lm_loss, data, trainable=lambda n, p: True, val_batches=data, config=config)
    assert result.steps == 16
    assert result.val_loss[-1] < result.val_loss[0] - 0.5
    assert result.best_epoch == len(result.val_loss) - 1


def test_early_stopping_restores_the_best_epoch() -> None:
    model = tiny_model("llama", num_layers=2)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    # A huge learning rate makes validation worse at once: training must stop and keep the initial weights.
    config = TrainConfig(epochs=5, lr=10.0, patience=1, max_grad_norm=None, progress=False)
    result = train(
        model, lm_loss, batches(), trainable=lambda n, p: True, val_batches=batches(), config=config
    )
    assert result.stopped_early and result.best_epoch == 0 and result.epochs_run == 1
    assert all(torch.equal(p, initial[n]) for n, p in model.named_parameters())


def test_resume_continues_from_the_checkpoint(tmp_path: Path) -> None:
    data = batches(2)
    straight = tiny_model("llama", num_layers=2)
    config = dict(lr=1e-3, patience=None, progress=False, checkpoint_dir=str(tmp_path / "a"))
    train(straight, lm_loss, data, trainable=lambda n, p: True, config=TrainConfig(epochs=2, **config))

    interrupted = tiny_model("llama", num_layers=2)
    config["checkpoint_dir"] = str(tmp_path / "b")
    train(interrupted, lm_loss, data, trainable=lambda n, p: True, config=TrainConfig(epochs=1, **config))
    assert (tmp_path / "b" / "checkpoint.pt").is_file()
    resumed = tiny_model("llama", num_layers=2)
    result = train(
        resumed,
        lm_loss,
        data,
        trainable=lambda n, p: True,
        config=TrainConfig(epochs=2, resume=True, **config),
    )
    assert result.resumed_from_epoch == 1 and result.epochs_run == 2 and result.steps == 4
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"PK\x03\x04truncated zip"])
def test_a_corrupted_checkpoint_is_a_clear_error_and_is_kept(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "checkpoint.pt").write_bytes(content)
    config = TrainConfig(epochs=1, resume=True, progress=False, checkpoint_dir=str(tmp_path))
    model = tiny_model("llama", num_layers=2)
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt is unreadable"):
        train(model, lm_loss, batches(1), trainable=lambda n, p: True, config=config)
    assert (tmp_path / "checkpoint.pt").read_bytes() == content


def test_a_checkpoint_that_would_run_pickled_code_is_refused(tmp_path: Path) -> None:
    """``weights_only``: a checkpoint holding an arbitrary object (here a function) does not load."""
    torch.save({"state": print}, tmp_path / "checkpoint.pt")
    config = TrainConfig(epochs=1, resume=True, progress=False, checkpoint_dir=str(tmp_path))
    with pytest.raises(CheckpointError):
        train(tiny_model("llama", 2), lm_loss, batches(1), trainable=lambda n, p: True, config=config)
