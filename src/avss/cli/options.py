"""Option declarations shared by several commands, so each flag means the same thing everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from avss.data import CalibrationOptions, TextSource
from avss.models import DEFAULT_MODEL

ModelArg = Annotated[
    str,
    typer.Argument(
        help=f"Embedded short name ({DEFAULT_MODEL}, gemma3-270m), model directory, .gguf file or hub id"
    ),
]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")]
Dtype = Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16")]
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
    Path | None, typer.Option(help="Calibration text: .txt (blank-line paragraphs) or .jsonl with 'text'")
]
DataDir = Annotated[
    Path | None, typer.Option(help="Data directory laid out like shared/data (WikiText-2 valid is used)")
]
Dataset = Annotated[str | None, typer.Option(help="Hub dataset NAME[:CONFIG][@SPLIT] with a 'text' column")]
Samples = Annotated[int, typer.Option(min=1, help="Number of calibration sequences")]
MaxLength = Annotated[int, typer.Option(min=2, help="Tokens per calibration sequence")]
BatchSize = Annotated[int, typer.Option(min=1, help="Sequences per forward pass")]
Seed = Annotated[int, typer.Option(help="Seed for sampling calibration windows")]
Out = Annotated[Path, typer.Option(help="Output path")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output directory")]
OverwriteFile = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file")]
Site = Annotated[str, typer.Option(help="Where to measure: block, delta, mlp or attn")]
Variance = Annotated[str, typer.Option(help="elements (paper formula) or pooled (published code)")]
Threshold = Annotated[str, typer.Option(help="Near-zero rule: abs:EPS or rel:RHO")]


def comma_list(text: str) -> tuple[str, ...]:
    """The non-empty, stripped items of a comma-separated option value."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def text_source(data: Path | None, dataset: str | None, data_dir: Path | None) -> TextSource:
    return TextSource(
        data=str(data) if data else None,
        dataset=dataset,
        data_dir=str(data_dir) if data_dir else None,
    )


def calibration(samples: int, max_length: int, batch_size: int, seed: int) -> CalibrationOptions:
    return CalibrationOptions(samples=samples, max_length=max_length, batch_size=batch_size, seed=seed)
