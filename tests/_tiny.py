"""Tiny randomly initialised models and a character tokenizer, built offline for fast tests."""

from __future__ import annotations

import contextlib
import string
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedTokenizerFast

from avss.training import Checkpoint

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
PAD, BOS, EOS, UNK = range(4)
CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character; ids 0-3 are pad, bos, eos, unk."""
    vocab = {token: index for index, token in enumerate(SPECIALS + list(CHARS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    return tokenizer


VOCAB = len(SPECIALS) + len(CHARS)
_IDS = {"pad_token_id": PAD, "bos_token_id": BOS, "eos_token_id": EOS}
_DECODER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=256,
)
TINY_CONFIGS: dict[str, dict] = {
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "gemma": _DECODER,
    "gemma2": _DECODER,
    "gemma3_text": dict(_DECODER, sliding_window=4),
    "phi3": _DECODER,
    "olmo2": {k: v for k, v in _DECODER.items() if k != "head_dim"},
    "gpt2": dict(n_embd=32, n_head=4, n_positions=256),
    "gpt_neox": dict(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, max_position_embeddings=256
    ),
    "opt": dict(
        hidden_size=32, ffn_dim=64, num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=32
    ),
    "bert": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, max_position_embeddings=256),
    "roberta": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, max_position_embeddings=300),
    "distilbert": dict(dim=32, hidden_dim=64, n_heads=4, max_position_embeddings=256),
}
ENCODERS = {"bert", "roberta", "distilbert"}
LAYER_FIELD = {"gpt2": "n_layer", "distilbert": "n_layers"}


def tiny_config(model_type: str, num_layers: int = 4):
    kwargs = dict(TINY_CONFIGS[model_type], vocab_size=VOCAB, **_IDS)
    kwargs[LAYER_FIELD.get(model_type, "num_hidden_layers")] = num_layers
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str = "llama", num_layers: int = 4, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = tiny_config(model_type, num_layers)
    auto = AutoModel if model_type in ENCODERS else AutoModelForCausalLM
    return auto.from_config(config).eval()


def random_batch(
    batch: int = 3, length: int = 12, seed: int = 0, pad_rows: bool = True
) -> dict[str, torch.Tensor]:
    """Random token ids with right padding on some rows."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(len(SPECIALS), VOCAB, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    if pad_rows:
        for row in range(1, batch):
            mask[row, length - 2 * row :] = 0
    input_ids[mask == 0] = PAD
    return {"input_ids": input_ids, "attention_mask": mask}


class Killed(Exception):
    """Stands for the process dying: raised by :func:`killed_after_checkpoint`."""


@contextlib.contextmanager
def killed_after_checkpoint(number: int = 1) -> Iterator[None]:
    """Training inside this block dies (raises :class:`Killed`) right after its ``number``-th epoch checkpoint
    is written, leaving on disk what a ``kill`` then would; the block expects and swallows the death."""
    write = Checkpoint.save
    written = 0

    def write_then_die(self: Checkpoint, *args: Any) -> None:
        nonlocal written
        write(self, *args)
        written += 1
        if written == number:
            raise Killed

    Checkpoint.save = write_then_die  # type: ignore[method-assign]
    try:
        with pytest.raises(Killed):
            yield
    finally:
        Checkpoint.save = write  # type: ignore[method-assign]
