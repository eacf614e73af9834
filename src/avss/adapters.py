"""The one place that knows how architectures differ.

A table maps ``config.model_type`` to where the block list lives, which module's *input* is the MLP's
post-nonlinearity activation, which modules are the attention and MLP sublayers and where the residual stream
between them can be read, and which config fields depend on depth.
Everything else in avss asks a :class:`LayerAdapter` and never branches on the model type. Adding a family is
one line in :data:`ARCHITECTURES`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from avss.errors import PruneConfigError, UnsupportedArchitectureError

SITES = ("block", "delta", "mlp", "attn")


@dataclass(frozen=True)
class ArchitectureSpec:
    """Module paths of one architecture family.

    ``layers`` is relative to ``model.base_model``; ``mlp_down`` and ``attn`` are relative to one block.
    ``mlp_down`` names the MLP's output projection: its input is the activation after the nonlinearity.

    ``mlp_output_norm`` names the norm (relative to one block) that stands between ``mlp_down``'s output and
    the block's output: a post-MLP norm applied before the residual add (Gemma 2/3, OLMo 2) or a post-LN
    block's norm after it (BERT). Without one, the block's output is its residual stream plus ``mlp_down``'s
    output, which is what ``--patch linear`` folds its map into. ``pre_norm_field`` is a config flag that,
    when true, means the norm is not in the way after all (OPT's ``do_layer_norm_before``).
    ``mlp_down_layout`` is how the projection stores its weight: ``out_in`` (``nn.Linear``) or ``in_out``
    (GPT-2's ``Conv1D``).

    ``final_norm`` (relative to ``model.base_model``; None for encoders) is the norm between the last block
    and the LM head, and ``logit_softcap_field`` the config field of the head's tanh soft-cap (Gemma 2; absent
    or null elsewhere): with them any layer's hidden state becomes logits the way the last one does (DoLa).

    ``attn_residual`` names the module (relative to one block) whose *input* is the residual stream after the
    attention sublayer, ``x + F(LN x)``: the pre-MLP norm of pre-LN decoders (``post_attention_layernorm`` in
    Llama, ``pre_feedforward_layernorm`` in Gemma 2/3, GPT-2's ``ln_2``) or, without a pre-MLP norm, the MLP
    itself (OLMo 2). With it, each sublayer's share of the block can be measured (LLM-Drop's similarity) and
    ``sublayer_module`` names the ``attn``/``mlp`` modules that sublayer removal replaces. None where no
    module sees that stream: parallel attention and MLP (GPT-NeoX), post-LN blocks (BERT, OPT-350m), or an
    MLP without its own module (OPT); sublayer scoring and removal are refused there.
    """

    layers: str
    mlp_down: str
    attn: str
    num_layers_field: str = "num_hidden_layers"
    per_layer_fields: tuple[str, ...] = ("layer_types",)
    causal: bool = True
    mlp_output_norm: str | None = None
    pre_norm_field: str | None = None
    mlp_down_layout: str = "out_in"
    final_norm: str | None = "norm"
    logit_softcap_field: str | None = "final_logit_softcapping"
    attn_residual: str | None = None
    mlp: str = "mlp"


_DECODER = ArchitectureSpec(
    layers="layers", mlp_down="mlp.down_proj", attn="self_attn", attn_residual="post_attention_layernorm"
)
_DECODER_POST_MLP_NORM = replace(
    _DECODER, mlp_output_norm="post_feedforward_layernorm", attn_residual="pre_feedforward_layernorm"
)
_BERT_LIKE = ArchitectureSpec(
    layers="encoder.layer",
    mlp_down="output.dense",
    attn="attention.output.dense",
    causal=False,
    mlp_output_norm="output.LayerNorm",
    final_norm=None,
)

ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "gemma": _DECODER,
    "gemma2": _DECODER_POST_MLP_NORM,
    "gemma3_text": _DECODER_POST_MLP_NORM,
    "phi3": _DECODER,
    "olmo2": replace(_DECODER_POST_MLP_NORM, attn_residual="mlp"),  # no pre-MLP norm
    "gpt2": ArchitectureSpec(
        layers="h",
        mlp_down="mlp.c_proj",
        attn="attn",
        num_layers_field="n_layer",
        mlp_down_layout="in_out",
        final_norm="ln_f",
        attn_residual="ln_2",
    ),
    "gpt_neox": ArchitectureSpec(
        layers="layers", mlp_down="mlp.dense_4h_to_h", attn="attention", final_norm="final_layer_norm"
    ),
    "opt": ArchitectureSpec(
        layers="decoder.layers",
        mlp_down="fc2",
        attn="self_attn",
        mlp_output_norm="final_layer_norm",
        pre_norm_field="do_layer_norm_before",
        final_norm="decoder.final_layer_norm",
    ),
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "distilbert": ArchitectureSpec(
        layers="transformer.layer",
        mlp_down="ffn.lin2",
        attn="attention",
        num_layers_field="n_layers",
        causal=False,
        mlp_output_norm="output_layer_norm",
        final_norm=None,
    ),
}


def supported_model_types() -> list[str]:
    return sorted(ARCHITECTURES)


def spec_for_model_type(model_type: str) -> ArchitectureSpec:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported; supported model types: "
            f"{', '.join(supported_model_types())}"
        ) from None


def resolve_adapter_for_config(config: Any) -> ArchitectureSpec:
    return spec_for_model_type(getattr(config, "model_type", type(config).__name__))


def first_tensor(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a module output.

    In transformers 5 decoder layers return a tensor; older versions and attention modules return tuples
    whose first element is the hidden state. Indexing a tensor with ``[0]`` would silently take batch row 0,
    so the type is checked rather than assumed.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    raise TypeError(f"cannot find a hidden-state tensor in a module output of type {type(output).__name__}")


def block_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The residual stream entering a block, whether passed positionally or by keyword."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for name in ("hidden_states", "x", "hidden_state"):
        if isinstance(kwargs.get(name), torch.Tensor):
            return kwargs[name]
    raise TypeError("cannot find the hidden-state input of a block")


def replace_input(args: tuple[Any, ...], kwargs: dict[str, Any], hidden: torch.Tensor) -> tuple[tuple, dict]:
    """A block's call arguments with the residual stream replaced by ``hidden``."""
    if args and isinstance(args[0], torch.Tensor):
        return (hidden, *args[1:]), kwargs
    for name in ("hidden_states", "x", "hidden_state"):
        if isinstance(kwargs.get(name), torch.Tensor):
            return args, {**kwargs, name: hidden}
    raise TypeError("cannot find the hidden-state input of a block")


@contextlib.contextmanager
def hooks(*handles: Any) -> Iterator[None]:
    """Remove the given hook handles on exit, whatever happens inside."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def suffix_view(adapter: LayerAdapter, start: int) -> Iterator[None]:
    """Temporarily make the model run only blocks ``start:`` (config per-layer lists sliced to match).

    The model still computes embeddings, masks and position embeddings itself, so every remaining block gets
    exactly the keyword arguments it gets in a full forward pass; only the residual stream entering block
    ``start`` has to be supplied (by a hook). Nothing is changed for good: the block list and config are
    restored on exit. The KV cache is switched off meanwhile: the remaining blocks keep their ``layer_idx``,
    which would not match a cache sized for the sliced config.
    """
    if start == 0:
        yield
        return
    blocks = adapter.blocks
    parent_path, _, attr = adapter.spec.layers.rpartition(".")
    parent = adapter.model.base_model.get_submodule(parent_path) if parent_path else adapter.model.base_model
    config = adapter.model.config
    saved = {name: getattr(config, name, None) for name in (*adapter.spec.per_layer_fields, "use_cache")}
    setattr(parent, attr, nn.ModuleList(list(blocks)[start:]))
    for name, values in saved.items():
        if isinstance(values, list) and len(values) == len(blocks):
            setattr(config, name, values[start:])
    config.use_cache = False
    try:
        yield
    finally:
        setattr(parent, attr, blocks)
        for name, values in saved.items():
            setattr(config, name, values)


class LayerAdapter:
    """Architecture-independent access to a model's blocks and measurement sites."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.model_type = model.config.model_type
        self.spec = spec_for_model_type(self.model_type)

    @property
    def blocks(self) -> nn.ModuleList:
        blocks = self.model.base_model.get_submodule(self.spec.layers)
        if not isinstance(blocks, nn.ModuleList):
            raise UnsupportedArchitectureError(
                f"{self.model_type}: expected a ModuleList at base_model.{self.spec.layers}"
            )
        return blocks

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def causal(self) -> bool:
        return self.spec.causal

    def final_norm(self) -> nn.Module:
        """The norm between the last block and the LM head (identity where the architecture has none)."""
        if self.spec.final_norm is None:
            raise UnsupportedArchitectureError(f"{self.model_type} has no LM head to exit early through")
        parent, _, name = self.spec.final_norm.rpartition(".")
        owner = self.model.base_model.get_submodule(parent) if parent else self.model.base_model
        if not hasattr(owner, name):
            raise UnsupportedArchitectureError(
                f"{self.model_type}: no final norm at base_model.{self.spec.final_norm}"
            )
        norm = getattr(owner, name)  # None for OPT without do_layer_norm_before
        return norm if norm is not None else nn.Identity()

    def early_exit_logits(self, hidden: torch.Tensor, norm: bool = True) -> torch.Tensor:
        """LM-head logits of a hidden state (any layer's): final norm (unless ``norm`` is false), the output
        embedding, then the config's logit soft-cap ``tanh(x / c) * c`` where the architecture has one."""
        head = self.model.get_output_embeddings()
        if head is None:
            raise UnsupportedArchitectureError(f"{self.model_type}: the model has no LM head")
        logits = head(self.final_norm()(hidden) if norm else hidden)
        cap = getattr(self.model.config, self.spec.logit_softcap_field or "", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    def site_module(self, layer: int, site: str) -> nn.Module:
        """The module hooked for ``site`` of block ``layer``: the block itself for ``block``/``delta``."""
        block = self.blocks[layer]
        if site in ("block", "delta"):
            return block
        if site == "mlp":
            return block.get_submodule(self.spec.mlp_down)
        if site == "attn":
            return block.get_submodule(self.spec.attn)
        raise ValueError(f"unknown site {site!r}; choose one of {', '.join(SITES)}")

    def mlp_output_obstacle(self) -> str | None:
        """Why the block's output is not its residual stream plus ``mlp_down``'s output (None when it is)."""
        spec = self.spec
        if spec.mlp_output_norm is None:
            return None
        if spec.pre_norm_field is not None and getattr(self.model.config, spec.pre_norm_field, False):
            return None
        return (
            f"{self.model_type} passes the MLP output through {spec.mlp_output_norm} on its way into the "
            "residual stream"
        )

    def sublayer_path(self, kind: str) -> str:
        """Where the ``attn`` or ``mlp`` sublayer sits in a block; refuses architectures without
        ``attn_residual`` (see :class:`ArchitectureSpec`), where removing one sublayer is not well defined."""
        if self.spec.attn_residual is None:
            raise UnsupportedArchitectureError(
                f"{self.model_type} has no residual stream between its attention and MLP sublayers that avss "
                "can read, so sublayers cannot be scored or removed separately; supported: "
                + ", ".join(sorted(name for name, spec in ARCHITECTURES.items() if spec.attn_residual))
            )
        paths = {"attn": self.spec.attn, "mlp": self.spec.mlp}
        if kind not in paths:
            raise ValueError(f"unknown sublayer {kind!r}; choose one of {', '.join(paths)}")
        return paths[kind]

    def sublayer_module(self, layer: int, kind: str) -> nn.Module:
        """Block ``layer``'s ``attn`` or ``mlp`` sublayer (the module sublayer removal replaces)."""
        return self.blocks[layer].get_submodule(self.sublayer_path(kind))

    def set_sublayer_module(self, layer: int, kind: str, module: nn.Module) -> nn.Module:
        """Put ``module`` where block ``layer``'s ``kind`` sublayer was; returns the module it replaced."""
        parent_path, _, name = self.sublayer_path(kind).rpartition(".")
        block = self.blocks[layer]
        parent = block.get_submodule(parent_path) if parent_path else block
        previous = getattr(parent, name)
        setattr(parent, name, module)
        return previous

    def attn_residual_module(self, layer: int) -> nn.Module:
        """The module of block ``layer`` whose input is the residual stream after its attention sublayer."""
        self.sublayer_path("attn")  # refuses architectures without one
        assert self.spec.attn_residual is not None
        return self.blocks[layer].get_submodule(self.spec.attn_residual)

    def layer_name(self, layer: int, site: str = "block") -> str:
        base = f"{self.model.base_model_prefix}.{self.spec.layers}.{layer}"
        suffix = {"block": "", "delta": "", "mlp": f".{self.spec.mlp_down}", "attn": f".{self.spec.attn}"}
        return base + suffix[site]

    def keep_layers(self, keep: list[int]) -> None:
        """Keep only the blocks ``keep`` (in order) and update every depth-dependent field.

        Updates the ModuleList, the config's layer count and per-layer lists (e.g. ``layer_types``, which
        decides sliding vs full attention), and each module's ``layer_idx`` so the KV cache indexes layers
        by their new position.
        """
        blocks = self.blocks
        kept = nn.ModuleList([blocks[i] for i in keep])
        parent_path, _, attr = self.spec.layers.rpartition(".")
        parent = self.model.base_model.get_submodule(parent_path) if parent_path else self.model.base_model
        setattr(parent, attr, kept)
        config = self.model.config
        setattr(config, self.spec.num_layers_field, len(keep))
        for field in self.spec.per_layer_fields:
            values = getattr(config, field, None)
            if isinstance(values, list) and len(values) == len(blocks):
                setattr(config, field, [values[i] for i in keep])
        for new_index, block in enumerate(kept):
            for module in block.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = new_index


def get_adapter(model: nn.Module) -> LayerAdapter:
    """Resolve the adapter for ``model``; unsupported architectures raise a clear error."""
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedArchitectureError(f"{type(model).__name__} has no Hugging Face config")
    return LayerAdapter(model)


def remove_layers(model: nn.Module, remove: list[int]) -> list[int]:
    """Remove blocks ``remove`` from ``model`` in place; returns the original indices of the kept blocks."""
    adapter = get_adapter(model)
    num_layers = adapter.num_layers
    bad = [layer for layer in remove if not 0 <= layer < num_layers]
    if bad:
        raise PruneConfigError(f"layer index {bad[0]} out of range for a {num_layers}-layer model")
    keep = [layer for layer in range(num_layers) if layer not in set(remove)]
    if not keep:
        raise PruneConfigError("cannot remove every layer; at least one must remain")
    adapter.keep_layers(keep)
    return keep


def insert_blocks(model: nn.Module, insertions: list[tuple[int, nn.Module, int]]) -> None:
    """Insert blocks into ``model``'s block list and update every depth-dependent config field.

    Each insertion is ``(index in the new list, block, existing block whose per-layer config values it
    takes)``. The blocks are appended and the list is then reordered with :meth:`LayerAdapter.keep_layers`,
    which already knows how to rewrite the layer count, per-layer fields and ``layer_idx``.
    """
    adapter = get_adapter(model)
    blocks = adapter.blocks
    count = len(blocks)
    order = list(range(count))
    config = model.config
    per_layer = {
        name: getattr(config, name)
        for name in adapter.spec.per_layer_fields
        if isinstance(getattr(config, name, None), list) and len(getattr(config, name)) == count
    }
    for offset, (index, block, like) in enumerate(sorted(insertions, key=lambda item: item[0])):
        blocks.append(block)
        for values in per_layer.values():
            values.append(values[like])
        order.insert(index, count + offset)
    adapter.keep_layers(order)
