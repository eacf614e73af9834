"""GGUF in, GGUF out: remove blocks from a llama.cpp model file without dequantizing it.

Scores are computed on the dequantized model as for any other input; only the output differs. A pruned
GGUF keeps every tensor of every kept block byte for byte in its original quantization, because
re-quantizing dequantized weights would add a second rounding error to a model that was already rounded
once (and the K-quant mixes of a file cannot be reproduced from its floats). The surgery is therefore
metadata and names only:

- the removed blocks' ``blk.N.*`` tensors are dropped and the kept ones renumbered from 0;
- ``<arch>.block_count`` and every per-layer metadata array (:data:`PER_LAYER_KEYS`) follow the kept
  blocks; a per-layer pattern that llama.cpp derives from a period (Gemma's sliding-window layers,
  :data:`GGUF_ARCHITECTURES`) is written out as an explicit per-layer array first, since renumbering would
  otherwise move the global-attention layers;
- the tokenizer and all other metadata are copied, and the pruning provenance is added under ``avss.``
  (the same record as ``avss_pruning.json`` of a pruned Hugging Face folder, also written beside the file).

A caller may pass replacement float tensors for named tensors of the output (a training-free patch folds a
fitted map into a kept block's weights); those are written as F32 (exact: no error beyond float32, i.e.
what the Hugging Face path computes) or, on request, F16 (each element rounded to 11 significant bits,
relative error at most 2^-11, about 4.9e-4).

The functions that plan the new metadata and tensor names are pure (:func:`plan_metadata`,
:func:`plan_tensors`); :func:`prune_gguf` reads, plans and writes atomically (temporary file, rename), so
an interrupted or failed run leaves no partial file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from avss.errors import GgufError, OptionError, UnsupportedArchitectureError
from avss.io import atomic_write, atomic_write_json, check_output_file, to_json

PROVENANCE_PREFIX = "avss."
SIDECAR_SUFFIX = ".avss_pruning.json"
SWA_PATTERN = "attention.sliding_window_pattern"
SWA_WINDOW = "attention.sliding_window"


@dataclass(frozen=True)
class GgufArchitecture:
    """What pruning needs to know about one GGUF architecture (``general.architecture``).

    ``model_type`` is the Hugging Face ``config.model_type`` transformers loads the file as (its row in
    :data:`avss.adapters.ARCHITECTURES` does the scoring). ``swa_period`` is the sliding-window period
    llama.cpp assumes when the file stores no per-layer pattern (``load_swa_pattern(ml, N)`` in llama.cpp;
    a layer ``i`` slides unless ``i % N == N - 1``), and ``swa_needs_window`` says whether that period
    applies only when ``<arch>.attention.sliding_window`` is set (Gemma 3) or always (Gemma 2).
    """

    model_type: str
    swa_period: int | None = None
    swa_needs_window: bool = True
    # The MLP down projection's tensor name in a block (``blk.N.<name>.weight``), where a linear patch lands.
    mlp_down: str = "ffn_down"


GGUF_ARCHITECTURES: dict[str, GgufArchitecture] = {
    "llama": GgufArchitecture("llama"),
    "qwen2": GgufArchitecture("qwen2"),
    "qwen3": GgufArchitecture("qwen3"),
    "gemma2": GgufArchitecture("gemma2", swa_period=2, swa_needs_window=False),
    "gemma3": GgufArchitecture("gemma3_text", swa_period=6),
}

# Keys (after ``<arch>.``) that llama.cpp reads as one value per layer when they are arrays
# (``get_key_or_arr(..., n_layer)`` and the per-layer ``get_arr`` calls in llama-model.cpp).
PER_LAYER_KEYS = frozenset(
    {
        "feed_forward_length",
        "expert_feed_forward_length",
        "expert_used_count",
        "attention.head_count",
        "attention.head_count_kv",
        "attention.recurrent_layers",
        "attention.rope_pattern",
        SWA_PATTERN,
        "swiglu_clamp_exp",
        "swiglu_clamp_shexp",
    }
)

_BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.(.+)$")
REPLACEMENT_TYPES = ("F32", "F16")


def is_gguf_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".gguf"


def sidecar_path(out: str | Path) -> Path:
    """The provenance JSON written beside a pruned GGUF: ``pruned.gguf`` -> ``pruned.avss_pruning.json``."""
    out = Path(out)
    return out.with_name(out.stem + SIDECAR_SUFFIX)


def open_gguf(path: str | Path) -> Any:
    """A :class:`gguf.GGUFReader` of ``path`` whose every tensor lies inside the file.

    The reader maps the file and trusts its header, so a truncated download either fails inside gguf with
    an arbitrary exception or, when only tensor data is missing, yields short arrays; both become one
    :class:`GgufError` naming the file.
    """
    import gguf

    path = Path(path)
    with path.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise GgufError(f"{path} is not a GGUF file (it does not start with the GGUF magic)")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # gguf raises ValueError, IndexError, struct errors... on a cut-off file
        reason = str(exc) or type(exc).__name__
        raise GgufError(f"GGUF file {path} is truncated or corrupt (gguf: {reason})") from None
    size = path.stat().st_size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size or tensor.data.nbytes != tensor.n_bytes:
            raise GgufError(
                f"GGUF file {path} is truncated: tensor {tensor.name} ends at byte "
                f"{tensor.data_offset + tensor.n_bytes}, the file has {size}"
            )
    return reader


def field_value(field: Any) -> Any:
    return field.contents()


def architecture_of(reader: Any) -> tuple[str, GgufArchitecture]:
    """The file's ``general.architecture`` and its row of :data:`GGUF_ARCHITECTURES`."""
    field = reader.get_field("general.architecture")
    arch = field_value(field) if field is not None else None
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"GGUF architecture {arch!r} is not supported for GGUF output; supported: "
            f"{', '.join(sorted(GGUF_ARCHITECTURES))} (add a row to avss.pruning.gguf.GGUF_ARCHITECTURES)"
        )
    return arch, GGUF_ARCHITECTURES[arch]


@dataclass(frozen=True)
class MetadataEntry:
    """One key of the output: value and GGUF type (``sub_type`` for arrays), as GGUFWriter takes them."""

    key: str
    value: Any
    type: Any
    sub_type: Any = None


def _entries(reader: Any) -> list[MetadataEntry]:
    """The file's own metadata as entries (the reader's virtual ``GGUF.*`` fields left out)."""
    import gguf

    entries = []
    for field in reader.fields.values():
        if field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        entries.append(MetadataEntry(field.name, field_value(field), kind, sub))
    return entries


def swa_layers(entries: Mapping[str, MetadataEntry], arch: str, spec: GgufArchitecture, n: int) -> list[bool]:
    """Per-layer sliding-window flags as llama.cpp derives them, or ``[]`` when the file has none.

    An array is taken as is; a scalar is a period; no key means the architecture's default period, which
    for Gemma 3 applies only when a window is set. Mirrors ``llama_hparams::set_swa_pattern``.
    """
    stored = entries.get(f"{arch}.{SWA_PATTERN}")
    if stored is not None and isinstance(stored.value, list):
        return [bool(v) for v in stored.value]
    if spec.swa_period is None:
        return []
    window = entries.get(f"{arch}.{SWA_WINDOW}")
    if spec.swa_needs_window and (window is None or not window.value):
        return []
    period = int(stored.value) if stored is not None else spec.swa_period
    return [period == 0 or i % period < period - 1 for i in range(n)]


def plan_metadata(entries: Sequence[MetadataEntry], kept: Sequence[int]) -> list[MetadataEntry]:
    """The output's metadata: ``entries`` with the layer count and per-layer values following ``kept``.

    Earlier ``avss.*`` keys (a file pruned before) are dropped; the caller adds the new provenance. An
    array of exactly ``block_count`` values under the architecture's prefix that is not a known per-layer
    key is refused rather than guessed at: slicing a non-per-layer array, or leaving a per-layer one at
    its old length, would both give a file llama.cpp misreads or rejects.
    """
    import gguf

    by_key = {entry.key: entry for entry in entries}
    arch = by_key["general.architecture"].value
    spec = GGUF_ARCHITECTURES[arch]
    count_key = f"{arch}.block_count"
    if count_key not in by_key:
        raise GgufError(f"GGUF metadata has no {count_key}")
    n = int(by_key[count_key].value)
    check_kept(kept, n)
    swa = swa_layers(by_key, arch, spec, n)
    out = []
    for entry in entries:
        if entry.key.startswith(PROVENANCE_PREFIX):
            continue
        suffix = entry.key.removeprefix(f"{arch}.") if entry.key.startswith(f"{arch}.") else None
        if entry.key == count_key:
            entry = MetadataEntry(entry.key, len(kept), entry.type)
        elif suffix == SWA_PATTERN and swa:
            continue  # written below as an explicit per-layer array
        elif isinstance(entry.value, list) and suffix is not None and len(entry.value) == n:
            if suffix not in PER_LAYER_KEYS:
                raise GgufError(
                    f"GGUF metadata {entry.key} has {n} values, one per block, but is not a known "
                    "per-layer key; add it to avss.pruning.gguf.PER_LAYER_KEYS if it is one"
                )
            entry = MetadataEntry(entry.key, [entry.value[i] for i in kept], entry.type, entry.sub_type)
        out.append(entry)
        if entry.key == count_key and swa:
            out.append(
                MetadataEntry(
                    f"{arch}.{SWA_PATTERN}",
                    [swa[i] for i in kept],
                    gguf.GGUFValueType.ARRAY,
                    gguf.GGUFValueType.BOOL,
                )
            )
    return out


def check_kept(kept: Sequence[int], n: int) -> None:
    if not kept:
        raise GgufError("cannot remove every block; at least one must remain")
    if list(kept) != sorted(set(kept)) or kept[0] < 0 or kept[-1] >= n:
        raise GgufError(f"kept blocks {list(kept)} must be ascending indices below {n}")


def plan_tensors(names: Sequence[str], kept: Sequence[int]) -> list[tuple[str, str]]:
    """``(input name, output name)`` for every tensor of the output, in the input's order.

    Tensors of removed blocks are absent; ``blk.K.x`` of the i-th kept block becomes ``blk.i.x``; tensors
    outside blocks (embeddings, output norm and head, rope factors) keep their names.
    """
    position = {layer: index for index, layer in enumerate(kept)}
    plan = []
    for name in names:
        match = _BLOCK_TENSOR.match(name)
        if match is None:
            plan.append((name, name))
        elif int(match.group(1)) in position:
            plan.append((name, f"blk.{position[int(match.group(1))]}.{match.group(2)}"))
    return plan


def provenance_metadata(record: Mapping[str, Any]) -> list[MetadataEntry]:
    """The pruning record as ``avss.*`` keys: a few typed fields to read at a glance, and the whole record
    as JSON in ``avss.pruning`` (the same content as the sidecar file)."""
    import gguf

    kind = gguf.GGUFValueType
    entries = [
        MetadataEntry("avss.version", str(record.get("avss_version", "")), kind.STRING),
        MetadataEntry("avss.method", str(record.get("method", "")), kind.STRING),
        MetadataEntry("avss.original_block_count", int(record["original_num_layers"]), kind.UINT32),
    ]
    for key in ("removed_layers", "kept_layers"):
        if record.get(key):
            values = [int(v) for v in record[key]]
            entries.append(MetadataEntry(f"avss.{key}", values, kind.ARRAY, kind.INT32))
    entries.append(MetadataEntry("avss.pruning", to_json(record), kind.STRING))
    return entries


def _replacement_array(name: str, value: Any, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """``value`` (tensor or array) as a C-contiguous float array of the GGUF tensor's shape."""
    if hasattr(value, "detach"):
        value = value.detach().to("cpu").float().numpy()
    array = np.ascontiguousarray(np.asarray(value, dtype=np.float32))
    if array.shape != shape:
        raise GgufError(
            f"replacement for {name} has shape {array.shape}; the GGUF tensor is {shape} (numpy order)"
        )
    return array.astype(np.float16) if dtype == "F16" else array


def prune_gguf(
    source: str | Path,
    out: str | Path,
    kept: Sequence[int],
    record: Mapping[str, Any],
    *,
    replacements: Mapping[str, Any] | None = None,
    replacement_type: str = "F32",
    overwrite: bool = False,
) -> Path:
    """Write ``source`` with only the blocks ``kept`` (original indices, ascending) to ``out``.

    ``record`` is the pruning provenance (:meth:`avss.pruning.prune.PruningRecord.to_dict`, format
    ``avss-pruning/2``); it goes into the file under ``avss.`` and into :func:`sidecar_path`, which adds a
    ``gguf`` section (source file, tensors copied and replaced) under the same format. ``replacements``
    maps output tensor names (after renumbering, e.g. ``blk.3.ffn_down.weight``) to float tensors in GGUF
    layout, i.e. numpy shape = the GGUF dims reversed, and for llama's ``attn_q``/``attn_k`` llama.cpp's
    permuted rows; they are written as ``replacement_type`` (``F32``, exact, or ``F16``, relative error
    <= 2^-11). Every other tensor is copied byte for byte. Both files are written to temporary paths and
    renamed into place.
    """
    import gguf

    if replacement_type not in REPLACEMENT_TYPES:
        raise OptionError(
            f"replacement_type must be one of {', '.join(REPLACEMENT_TYPES)}, not {replacement_type!r}"
        )
    out = Path(out)
    check_gguf_output(out, overwrite)
    reader = open_gguf(source)
    arch, _ = architecture_of(reader)
    kept = list(kept)
    metadata = plan_metadata(_entries(reader), kept) + provenance_metadata(record)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    plan = plan_tensors(list(tensors), kept)
    replacements = dict(replacements or {})
    unknown = sorted(set(replacements) - {new for _, new in plan})
    if unknown:
        raise GgufError(f"replacement for {unknown[0]!r}, which is not a tensor of the pruned file")
    arrays = {
        new: _replacement_array(
            new, replacements[new], tuple(int(d) for d in reversed(tensors[old].shape)), replacement_type
        )
        for old, new in plan
        if new in replacements
    }

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, arch, endianess=reader.endianess)
        if reader.alignment != gguf.GGUF_DEFAULT_ALIGNMENT:
            writer.data_alignment = reader.alignment  # the key itself is copied with the metadata
        for entry in metadata:
            if entry.key == "general.architecture":
                continue  # GGUFWriter writes it first
            writer.add_key_value(entry.key, entry.value, entry.type, sub_type=entry.sub_type)
        for old, new in plan:
            if new in arrays:
                writer.add_tensor_info(new, arrays[new].shape, arrays[new].dtype, arrays[new].nbytes)
            else:
                data = tensors[old].data
                writer.add_tensor_info(new, data.shape, data.dtype, data.nbytes, tensors[old].tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for old, new in plan:
            if new in arrays:
                writer.write_tensor_data(arrays[new])
            else:
                writer.write_tensor_data(tensors[old].data, tensor_endianess=reader.endianess)
        writer.close()

    sidecar = {
        **record,
        "gguf": {
            "source": str(Path(source).resolve()),
            "architecture": arch,
            "tensors_copied": len(plan) - len(arrays),
            "tensors_replaced": {name: replacement_type for name in sorted(arrays)},
        },
    }
    atomic_write(out, write)
    atomic_write_json(sidecar_path(out), sidecar)
    return out


def check_gguf_output(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing ``--out FILE.gguf`` (or its provenance sidecar) unless ``overwrite``, and a
    directory at either path: the output-file rule of every command, applied to both files written."""
    check_output_file(sidecar_path(out), overwrite)
    return check_output_file(out, overwrite)


def gguf_source(source: Mapping[str, Any]) -> Path | None:
    """The GGUF file a loaded model came from (``LoadedModel.source``), or ``None``."""
    path = source.get("path")
    return Path(path) if path and is_gguf_path(path) else None


def check_gguf_prune(model: str, out: str | Path, overwrite: bool, heal: str | None = None) -> Path:
    """Everything ``avss prune MODEL --out FILE.gguf`` can check before loading and scoring: the output
    path, the input being a readable GGUF of a known architecture, and no healing (it retrains the kept
    blocks, whose quantized tensors are copied). A linear patch is fine: the few tensors it changes are
    written as F32. Returns the input's path."""
    from avss.models import EMBEDDED_MODELS

    check_gguf_output(out, overwrite)
    if heal:
        raise OptionError(
            "--heal retrains the kept blocks, so their quantized tensors cannot be copied into a .gguf "
            "--out; save a model directory instead (--out DIR)"
        )
    path = EMBEDDED_MODELS[model].locate() if model in EMBEDDED_MODELS else Path(model).expanduser()
    if not is_gguf_path(path):
        raise OptionError(
            f"--out {out} is a GGUF file, which needs a GGUF model (a .gguf file or an embedded GGUF "
            f"model); {model} is not one. Give --out a directory instead"
        )
    if not path.is_file():
        raise GgufError(f"GGUF file {path} does not exist")
    architecture_of(open_gguf(path))
    return path


def patched_tensors(source: str | Path, model: Any, record: Mapping[str, Any]) -> dict[str, Any]:
    """The tensors a linear patch changed, as :func:`prune_gguf` replacements: each run's folded MLP down
    projection (and bias, if any) of the pruned in-memory ``model``, named by its block's new index.

    The down projection is stored unpermuted in GGUF (numpy shape = the Hugging Face weight's (out, in)), so
    the folded weight goes in as it is. Empty when the record holds no patch.
    """
    from avss.adapters import get_adapter

    patch = record.get("patch")
    if not patch:
        return {}
    _, architecture = architecture_of(open_gguf(source))
    adapter = get_adapter(model)
    kept = list(record["kept_layers"])
    tensors = {}
    for run in patch["runs"]:
        index = kept.index(run["folded_into"])
        module = adapter.site_module(index, "mlp")  # the down projection (its input is the MLP site)
        name = f"blk.{index}.{architecture.mlp_down}"
        tensors[f"{name}.weight"] = module.weight.detach().float().cpu().numpy()
        if getattr(module, "bias", None) is not None:
            tensors[f"{name}.bias"] = module.bias.detach().float().cpu().numpy()
    return tensors


def save_pruned_gguf(
    source: str | Path,
    out: str | Path,
    record: Any,
    *,
    model: Any = None,
    overwrite: bool = False,
    **kwargs: Any,
) -> Path:
    """:func:`prune_gguf` with the kept blocks taken from a :class:`avss.pruning.prune.PruningRecord` (or its
    dict); with a linear patch in the record, the pruned ``model``'s folded down projections replace the
    quantized ones (F32 by default: no error beyond float32)."""
    data = record.to_dict() if hasattr(record, "to_dict") else dict(record)
    replacements = patched_tensors(source, model, data) if model is not None else {}
    if data.get("patch") and not replacements:
        raise OptionError("a patched pruning record needs the patched model to write its tensors")
    return prune_gguf(
        source,
        out,
        data["kept_layers"],
        data,
        replacements=replacements or None,
        overwrite=overwrite,
        **kwargs,
    )


def hf_config_overrides(path: str | Path) -> dict[str, Any]:
    """Config fields transformers' GGUF loader does not read but a pruned file needs: ``layer_types`` from
    an explicit per-layer sliding-window array.

    transformers rebuilds Gemma's ``layer_types`` from the layer count and a fixed period, which after
    pruning would move the global-attention layers; llama.cpp reads the array. Empty for other files.
    """
    reader = open_gguf(path)
    field = reader.get_field("general.architecture")
    arch = field_value(field) if field is not None else None
    pattern = reader.get_field(f"{arch}.{SWA_PATTERN}")
    if pattern is None or arch not in GGUF_ARCHITECTURES:
        return {}
    values = field_value(pattern)
    if not isinstance(values, list):
        return {}
    return {"layer_types": ["sliding_attention" if v else "full_attention" for v in values]}
