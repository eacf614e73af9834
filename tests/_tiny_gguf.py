"""Write a tiny random Hugging Face model as a GGUF that transformers' GGUF loader (and llama.cpp) reads.

The tensor names come from transformers' own GGUF name map (``get_gguf_hf_weights_map``), and the two
layout changes llama.cpp's converter makes are undone here in reverse: llama's Q/K rows are permuted
into llama.cpp's rotary order, and Gemma norms are stored as ``1 + weight``. Two-dimensional weights are
quantized to Q8_0 (the embedding) or stored as F16 (the feed-forward matrices) so the byte-copy tests
see several tensor types; the rest is F32. The tokenizer is the one-character-per-token vocabulary of
:mod:`_tiny`, spelled as a byte-level BPE without merges.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.modeling_gguf_pytorch_utils import (
    TENSOR_PROCESSORS,
    TensorProcessor,
    get_gguf_hf_weights_map,
)

from _tiny import BOS, CHARS, EOS, PAD, SPECIALS, UNK, tiny_model

GGUF_ARCH = {"llama": "llama", "gemma3_text": "gemma3"}


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary permutation of Q/K rows (the inverse of transformers' reverse permutation)."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _gguf_layout(arch: str, name: str, weights: np.ndarray, config) -> np.ndarray:
    if arch == "llama" and ".attn_q." in name:
        return _permute(weights, config.num_attention_heads)
    if arch == "llama" and ".attn_k." in name:
        return _permute(weights, config.num_key_value_heads)
    if arch == "gemma3" and name.endswith("norm.weight"):
        return weights + 1
    return weights


def _tensor_type(name: str, weights: np.ndarray) -> gguf.GGMLQuantizationType:
    if weights.ndim < 2:
        return gguf.GGMLQuantizationType.F32
    if name == "token_embd.weight" or ".attn_" in name:
        return gguf.GGMLQuantizationType.Q8_0
    return gguf.GGMLQuantizationType.F16


def _tokens() -> list[str]:
    spelling = bytes_to_unicode()
    return SPECIALS + ["".join(spelling[b] for b in char.encode()) for char in CHARS]


def write_tiny_gguf(model, path: Path, claimed_arch: str | None = None) -> Path:
    """Write ``model`` (a tiny llama or gemma3_text from :func:`_tiny.tiny_model`) as a GGUF at ``path``;
    ``claimed_arch`` writes the same tensors and keys under another ``general.architecture``."""
    config = model.config
    arch = GGUF_ARCH[config.model_type]
    writer = gguf.GGUFWriter(path, claimed_arch or arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if arch == "llama":
        writer.add_rope_dimension_count(config.head_dim)
        writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    else:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
        writer.add_sliding_window(config.sliding_window)
        writer.add_rope_freq_base(config.rope_parameters["full_attention"]["rope_theta"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(_tokens())
    token_types = [gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * len(CHARS)
    writer.add_token_types(token_types)
    writer.add_token_scores([0.0] * len(token_types))  # no merges: gguf writes no empty arrays, and the
    # merges transformers derives from one-character tokens are none
    writer.add_bos_token_id(BOS)
    writer.add_eos_token_id(EOS)
    writer.add_unk_token_id(UNK)
    writer.add_pad_token_id(PAD)
    writer.add_add_bos_token(False)

    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())
    names = get_gguf_hf_weights_map(model, processor)
    state = model.state_dict()
    for gguf_name, hf_name in names.items():
        if gguf_name.startswith("output.") and config.tie_word_embeddings:
            continue
        weights = state[hf_name].detach().float().numpy()
        weights = _gguf_layout(arch, gguf_name, weights, config)
        kind = _tensor_type(gguf_name, weights)
        if kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, weights.astype(np.float32))
        elif kind == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(gguf_name, weights.astype(np.float16))
        else:
            data = gguf.quants.quantize(weights.astype(np.float32), kind)
            writer.add_tensor(gguf_name, data, raw_shape=data.shape, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_gguf(
    model_type: str, path: Path, num_layers: int = 6, seed: int = 0, claimed_arch: str | None = None
) -> Path:
    return write_tiny_gguf(tiny_model(model_type, num_layers, seed), path, claimed_arch)


def truncated_copy(path: Path, target: Path, keep: float = 0.6) -> Path:
    """The first ``keep`` of ``path``'s bytes: a download cut off in the tensor data."""
    data = path.read_bytes()
    target.write_bytes(data[: int(len(data) * keep)])
    return target
