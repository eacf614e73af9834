"""Option declarations shared by several commands, so each flag means the same thing everywhere."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from avss.data import CalibrationOptions, TextSource
from avss.models import EMBEDDED_MODELS, LoadOptions
from avss.scorers.run import ScoreOptions

ModelArg = Annotated[
    str,
    typer.Argument(
        help=f"Embedded short name ({', '.join(EMBEDDED_MODELS)}), model directory, .gguf file or hub id"
    ),
]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")]
Dtype = Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16")]
Threads = Annotated[
    str,
    typer.Option(
        help="CPU threads for torch: auto (the cores other processes leave idle when the model loads) or N"
    ),
]
DeviceMap = Annotated[
    str | None,
    typer.Option(
        help="Spread a model too large for one GPU over several (accelerate: auto, balanced, sequential); "
        "under torchrun each process uses only its own share of the node's GPUs"
    ),
]
TrustRemoteCode = Annotated[
    bool, typer.Option("--trust-remote-code", help="Allow code from the model's repository")
]
AllowPickle = Annotated[bool, typer.Option("--allow-pickle", help="Allow loading pickle (.bin) weights")]
Data = Annotated[
    Path | None,
    typer.Option(help="Text file (calibration; training text for heal): .txt paragraphs or .jsonl 'text'"),
]
DataDir = Annotated[
    Path | None,
    typer.Option(help="Text: the WikiText-2 validation split of a data directory laid out like shared/data"),
]
BenchmarkDir = Annotated[
    Path | None, typer.Option(help="Benchmark data laid out like shared/data (default: $AVSS_DATA_DIR)")
]
Dataset = Annotated[str | None, typer.Option(help="Hub dataset NAME[:CONFIG][@SPLIT] with a 'text' column")]
Samples = Annotated[int, typer.Option(min=1, help="Number of calibration sequences")]
MaxLength = Annotated[int, typer.Option(min=2, help="Tokens per calibration sequence")]
BatchSize = Annotated[int, typer.Option(min=1, help="Sequences per forward pass")]
Seed = Annotated[int, typer.Option(help="Seed for sampling calibration windows (study: and its examples)")]
Autocast = Annotated[
    str,
    typer.Option(
        help="bfloat16 forward passes over float32 weights while training: auto (GPUs with bfloat16), "
        "bf16 (any device; 2.0x faster measured on a CPU with AVX512-BF16, slower without bfloat16 "
        "arithmetic) or off"
    ),
]
Out = Annotated[Path, typer.Option(help="Output path")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output directory")]
OverwriteFile = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file")]
Site = Annotated[str, typer.Option(help="Where to measure: block, delta, mlp or attn")]
Variance = Annotated[str, typer.Option(help="elements (paper formula) or pooled (published code)")]
Threshold = Annotated[str, typer.Option(help="Near-zero rule: abs:EPS or rel:RHO")]


Command = TypeVar("Command", bound=Callable[..., Any])


@dataclass(frozen=True)
class FlagGroup:
    """Flags that several commands share, declared once with one meaning.

    A command declares the object the flags build as one keyword-only parameter named ``parameter``;
    :meth:`into` splices the flags into the command's signature in its place (typer, ``--help`` and the
    generated docs read that signature) and builds the object from their values on every call, so its
    validation runs before the command body, and so before any model loads.
    """

    parameter: str
    flags: tuple[tuple[str, Any, Any], ...]  # (name, Annotated type, default)
    build: Callable[..., Any]

    def into(self, **defaults: Any) -> Callable[[Command], Command]:
        """Decorate a command; ``defaults`` override the group's defaults for that command only."""
        unknown = set(defaults) - {name for name, _, _ in self.flags}
        if unknown:
            raise TypeError(f"{self.parameter} has no flags {sorted(unknown)}")

        def decorate(command: Command) -> Command:
            signature = inspect.signature(command, eval_str=True)
            parameters = list(signature.parameters.values())
            names = [p.name for p in parameters]
            if self.parameter not in names:
                raise TypeError(f"{command.__name__} declares no parameter {self.parameter!r} for its flags")
            at = names.index(self.parameter)
            flags = [
                inspect.Parameter(
                    name, inspect.Parameter.KEYWORD_ONLY, annotation=kind, default=defaults.get(name, default)
                )
                for name, kind, default in self.flags
            ]
            spliced = signature.replace(parameters=[*parameters[:at], *flags, *parameters[at + 1 :]])

            @functools.wraps(command)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                values = {name: kwargs.pop(name) for name, _, _ in self.flags}
                return command(*args, **kwargs, **{self.parameter: self.build(**values)})

            wrapper.__signature__ = spliced  # type: ignore[attr-defined]
            wrapper.__annotations__ = {p.name: p.annotation for p in spliced.parameters.values()}
            return wrapper  # type: ignore[return-value]

        return decorate


def text_source(data: Path | None, dataset: str | None, data_dir: Path | None) -> TextSource:
    return TextSource(
        data=str(data) if data else None,
        dataset=dataset,
        data_dir=str(data_dir) if data_dir else None,
    )


CALIBRATION_TEXT = FlagGroup(
    "source",
    (("data", Data, None), ("data_dir", DataDir, None), ("dataset", Dataset, None)),
    text_source,
)
"""Where calibration text comes from: ``--data``, ``--data-dir``, ``--dataset`` -> a :class:`TextSource`."""

CALIBRATION_WINDOWS = FlagGroup(
    "calibration",
    (
        ("samples", Samples, 64),
        ("max_length", MaxLength, 256),
        ("batch_size", BatchSize, 8),
        ("seed", Seed, 0),
    ),
    CalibrationOptions,
)
"""How it is cut into windows: ``--samples``, ``--max-length``, ``--batch-size``, ``--seed``."""


AVSS_FLAGS = FlagGroup(
    "avss_options",
    (("site", Site, "block"), ("variance", Variance, "elements"), ("threshold", Threshold, "rel:0.01")),
    ScoreOptions,
)
"""Which AVSS variant: ``--site``, ``--variance``, ``--threshold`` -> :class:`ScoreOptions`."""


LOADING = FlagGroup(
    "loading",
    (
        ("device", Device, "auto"),
        ("dtype", Dtype, "auto"),
        ("trust_remote_code", TrustRemoteCode, False),
        ("allow_pickle", AllowPickle, False),
        ("threads", Threads, "auto"),
    ),
    LoadOptions,
)
"""How the model loads and runs: ``--device``, ``--dtype``, ``--trust-remote-code``, ``--allow-pickle``,
``--threads``."""


def comma_list(text: str) -> tuple[str, ...]:
    """The non-empty, stripped items of a comma-separated option value."""
    return tuple(item.strip() for item in text.split(",") if item.strip())
