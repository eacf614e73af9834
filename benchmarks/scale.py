"""The scale figure and table of the multi-model pruning study (issue 14), from the studies' own files.

Reads each study folder's ``results.json`` (``avss-study/3``) and puts the models side by side: per removed
fraction, the macro chance-normalized retention of every method with its 95% interval against the unpruned
model's parameter count, the random order's band (median and 5-95% over its draws), the WikiText-2 NLL
change beside it, the blocks each method removed, and each model's rank correlations of the methods'
scores (Spearman, with layer index and with each other; the study's ``correlations``). Parameter counts
come from each model's config, instantiated on the meta device (no weights are read). Usage::

    python benchmarks/scale.py benchmarks/study_protocol_smollm2_bf16 [more studies] --out benchmarks/scale

writes ``OUT.md``, ``OUT.json`` and ``OUT.png``; a study still running is read as far as it got (its
``complete`` flag is shown).
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from avss.io import atomic_write_json, atomic_write_text
from avss.provenance import command_line
from avss.study import STUDY_FORMAT

RANDOM = "random"
HEADER = (
    "model",
    "parameters",
    "blocks",
    "fraction",
    "method",
    "blocks removed",
    "macro retention [95% CI]",
    "WikiText-2 NLL change [95% CI]",
)
MODE = "oneshot"
PROTECTED = "oneshot+protect"
ITERATIVE = "iterative"
# The README's verdict table: its rows (label, method, mode) and its models' short names, in that order.
VERDICT_ROWS = (
    ("AVSS as specified", "avss", MODE),
    ("AVSS, first and last block protected", "avss", PROTECTED),
    ("AVSS, iterative (re-scored after each removal)", "avss", ITERATIVE),
    ("block influence (ShortGPT)", "block_influence", MODE),
    ("angular distance (Gromov et al.)", "angular", MODE),
    ("leave-one-out NLL, one shot (SLEB's criterion)", "loo_nll", MODE),
    ("leave-one-out NLL, iterative (SLEB), on 64 x 512 calibration tokens", "loo_nll[batches=8]", ITERATIVE),
    ("first n", "first", MODE),
    ("last n (before the final block)", "last", MODE),
)
SHORT_NAMES = {
    "smollm2-135m": "SmolLM2",
    "gemma3-270m": "Gemma 3",
    "qwen2.5-coder-0.5b": "Qwen 0.5B",
    "qwen2.5-coder-1.5b": "Qwen 1.5B",
}
BAND_MIN_DRAWS = 10  # fewer draws are listed one by one: their 5th and 95th percentiles mean nothing
VERDICT_START = (
    "<!-- verdict table: written by benchmarks/scale.py --readme from the studies' results.json -->"
)
VERDICT_END = "<!-- end of verdict table -->"


def num_parameters(model: str) -> int:
    """Parameters of the unpruned model, from its config alone (meta device: nothing is allocated)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from avss.models import resolve_model_path

    path, _ = resolve_model_path(model)
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        network = AutoModelForCausalLM.from_config(config)
    return sum(parameter.numel() for parameter in network.parameters())


def read_study(folder: Path, parameters: bool = True) -> dict[str, Any]:
    """One study's entries: the one-shot cells (``entries``), the protected ones (``protected``) and the
    iterative ones (``iterative``), each with its macro retention, removed blocks and WikiText-2 NLL change.
    ``parameters=False`` leaves out the parameter count (it needs the model's config installed)."""
    results = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    if results.get("format") != STUDY_FORMAT:
        raise SystemExit(f"{folder}: not an {STUDY_FORMAT} results file (rerun its study with --report-only)")
    model = results["model"]["name"]
    return {
        "folder": folder.as_posix(),
        "model": model,
        "num_layers": results["num_layers"],
        "complete": results["complete"],
        "num_parameters": num_parameters(model) if parameters else None,
        "wikitext_documents": sorted(
            {row["n"] for row in results["rows"] if row["task"] == "wikitext2" and row["n"] is not None}
        ),
        "entries": mode_entries(results, MODE),
        "protected": mode_entries(results, PROTECTED),
        "iterative": mode_entries(results, ITERATIVE),
        "correlations": results["correlations"],
    }


def mode_entries(results: dict[str, Any], mode: str) -> list[dict[str, Any]]:
    rows = [row for row in results["rows"] if row["mode"] == mode]
    wikitext = {
        (row["method"], row["fraction"]): row
        for row in rows
        if row["task"] == "wikitext2" and row["kind"] == "perplexity"
    }
    removed = {(row["method"], row["fraction"]): row["removed_layers"] for row in rows}
    entries = []
    for item in results["headline"]:
        if item["mode"] != mode:
            continue
        key = (item["method"], item["fraction"])
        nll = wikitext.get(key)
        entries.append(
            {
                **item,
                "removed_layers": removed.get(key, ""),
                "nll_change": None
                if nll is None
                else [nll["difference"], nll["difference_low"], nll["difference_high"]],
            }
        )
    return entries


def random_band(entries: list[dict[str, Any]], fraction: float) -> dict[str, Any] | None:
    """The random draws at ``fraction``: retentions (``values``), count, median, 5th and 95th percentiles."""
    values = [e["retention"] for e in entries if e["method"].startswith(RANDOM) and e["fraction"] == fraction]
    if not values:
        return None
    low, median, high = np.quantile(values, [0.05, 0.5, 0.95])
    return {
        "draws": len(values),
        "low": float(low),
        "median": float(median),
        "high": float(high),
        "values": values,
    }


def verdict_table(studies: list[dict[str, Any]]) -> str:
    """The README's first-screen table: every method's macro retention [95% CI] per model and removed
    fraction, the best method of each column in bold, ``= AVSS`` where another row removes AVSS's blocks,
    and the random order's band (median [5%, 95%] of its draws) or, below ten draws, the draws."""
    columns = [(s, f) for s in studies for f in sorted({e["fraction"] for e in s["entries"]})]
    header = [f"{SHORT_NAMES.get(s['model'], s['model'])} {f * 100:g}%" for s, f in columns]
    cells = [verdict_column(study, fraction) for study, fraction in columns]
    labels = [label for label, _, _ in VERDICT_ROWS] + ["random blocks: median [5%, 95%] of the draws"]
    lines = ["| method | " + " | ".join(header) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [
        f"| {label} | " + " | ".join(column[row] for column in cells) + " |"
        for row, label in enumerate(labels)
    ]
    return "\n".join(lines) + "\n"


def verdict_column(study: dict[str, Any], fraction: float) -> list[str]:
    """One column of :func:`verdict_table`: a cell per row of :data:`VERDICT_ROWS`, then the random band."""
    by_mode = {MODE: study["entries"], PROTECTED: study["protected"], ITERATIVE: study["iterative"]}
    found = {
        (method, mode): next(
            (e for e in by_mode[mode] if e["method"] == method and e["fraction"] == fraction), None
        )
        for _, method, mode in VERDICT_ROWS
    }
    best = max((e["retention"] for e in found.values() if e is not None), default=None)
    avss = found[("avss", MODE)]
    column = []
    for _, method, mode in VERDICT_ROWS:
        entry = found[(method, mode)]
        if entry is None:
            column.append("not run")
        elif entry is not avss and avss is not None and entry["removed_layers"] == avss["removed_layers"]:
            column.append("= AVSS")
        else:
            text = interval(entry, "retention")
            column.append(f"**{text}**" if entry["retention"] == best else text)
    column.append(band_text(study["entries"], fraction) or "not run")
    return column


def band_text(entries: list[dict[str, Any]], fraction: float) -> str | None:
    """The random order's draws at ``fraction``: median [5%, 95%] (N draws), or below ten draws each draw's
    retention; None without draws."""
    band = random_band(entries, fraction)
    if band is None:
        return None
    if band["draws"] < BAND_MIN_DRAWS:
        drawn = "1 draw" if band["draws"] == 1 else f"{band['draws']} draws"
        return f"{drawn} so far: " + ", ".join(f"{value:.3f}" for value in band["values"])
    return f"{band['median']:.3f} [{band['low']:.3f}, {band['high']:.3f}] ({band['draws']} draws)"


def with_verdict(readme: str, table: str) -> str:
    """``readme`` with the text between the verdict markers replaced by ``table``."""
    start, end = readme.find(VERDICT_START), readme.find(VERDICT_END)
    if start < 0 or end < start:
        raise SystemExit(f"the README has no verdict markers ({VERDICT_START} ... {VERDICT_END})")
    return readme[: start + len(VERDICT_START)] + "\n" + table + readme[end:]


def markdown(studies: list[dict[str, Any]], command: str) -> str:
    lines = [
        "# Depth pruning across model sizes: macro chance-normalized retention",
        "",
        f"Created {datetime.now(timezone.utc).isoformat(timespec='seconds')} by `{command}` from the",
        "studies' own `results.json`; one-shot selections; retention macro-averaged over each model's",
        "included accuracy tasks (each study's `summary.md` gives the tasks, n and the per-task tables).",
        "WikiText-2: change of NLL in nats per token against the unpruned model on the same documents",
        "(" + "; ".join(wikitext_documents(study) for study in studies) + ").",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|---" * len(HEADER) + "|",
    ]
    for study in studies:
        name = study["model"] + ("" if study["complete"] else " (incomplete)")
        size = f"{name} | {study['num_parameters'] / 1e6:.0f}M | {study['num_layers']}"
        fractions = sorted({e["fraction"] for e in study["entries"]})
        for fraction in fractions:
            for entry in (e for e in study["entries"] if e["fraction"] == fraction):
                if entry["method"].startswith(RANDOM):
                    continue
                nll = entry["nll_change"]
                lines.append(
                    f"| {size} | {fraction:g} | {entry['method']} | {entry['removed_layers']} | "
                    f"{interval(entry, 'retention')} | "
                    f"{'n/a' if nll is None else f'{nll[0]:+.3f} [{nll[1]:+.3f}, {nll[2]:+.3f}]'} |"
                )
            band = band_text(study["entries"], fraction)
            if band:
                lines.append(
                    f"| {size} | {fraction:g} | random blocks: median [5%, 95%] of the draws | | {band} | |"
                )
    return "\n".join(lines + correlation_tables(studies)) + "\n"


def wikitext_documents(study: dict[str, Any]) -> str:
    """How many WikiText-2 test documents a study scored (a study may limit them to save time)."""
    counts = study["wikitext_documents"]
    return f"{study['model']}: " + (
        " or ".join(f"{n:,}" for n in counts) + " documents" if counts else "none"
    )


def correlation_tables(studies: list[dict[str, Any]]) -> list[str]:
    """Spearman correlation of each method's scores with layer index (one table, a column per model), then
    each model's method-by-method matrix: a method that tracks depth is a depth order, whatever it
    measures."""
    methods = sorted({m for s in studies for m in s["correlations"]["methods"]})
    lines = [
        "",
        "## Rank correlation of the scores with layer index (Spearman)",
        "",
        "| method | " + " | ".join(s["model"] for s in studies) + " |",
        "|---" * (len(studies) + 1) + "|",
    ]
    for method in methods:
        values = [s["correlations"]["with_layer_index"].get(method) for s in studies]
        lines.append(f"| {method} | " + " | ".join("" if v is None else f"{v:+.2f}" for v in values) + " |")
    for study in studies:
        names, matrix = study["correlations"]["methods"], study["correlations"]["spearman"]
        lines += [
            "",
            f"### {study['model']}: Spearman correlation between methods",
            "",
            "| | " + " | ".join(names) + " |",
            "|---" * (len(names) + 1) + "|",
        ]
        lines += [
            f"| {name} | " + " | ".join(f"{v:+.2f}" for v in row) + " |"
            for name, row in zip(names, matrix, strict=True)
        ]
    return lines


def interval(entry: dict[str, Any], key: str) -> str:
    return f"{entry[key]:.3f} [{entry[key + '_low']:.3f}, {entry[key + '_high']:.3f}]"


def figure(studies: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    from avss.plots import save_figure

    fractions = sorted({e["fraction"] for s in studies for e in s["entries"]})
    methods = sorted(
        {e["method"] for s in studies for e in s["entries"] if not e["method"].startswith(RANDOM)}
    )
    fig, axes = plt.subplots(
        1, len(fractions), figsize=(5.5 * len(fractions), 4.2), squeeze=False, sharey=True
    )
    for ax, fraction in zip(axes[0], fractions, strict=True):
        ordered = sorted(studies, key=lambda s: s["num_parameters"])
        sizes = [s["num_parameters"] for s in ordered]
        for method in methods:
            points = [
                (s["num_parameters"], e)
                for s in ordered
                for e in s["entries"]
                if e["method"] == method and e["fraction"] == fraction
            ]
            if not points:
                continue
            x = [p for p, _ in points]
            y = np.array([e["retention"] for _, e in points])
            error = np.array(
                [
                    [e["retention"] - e["retention_low"], e["retention_high"] - e["retention"]]
                    for _, e in points
                ]
            ).T
            ax.errorbar(x, y, yerr=error, marker="o", capsize=3, label=method)
        bands = [(s["num_parameters"], random_band(s["entries"], fraction)) for s in ordered]
        bands = [(x, b) for x, b in bands if b and b["draws"] >= BAND_MIN_DRAWS]
        if bands:
            x, medians = [x for x, _ in bands], np.array([b["median"] for _, b in bands])
            spread = np.array([[b["median"] - b["low"], b["high"] - b["median"]] for _, b in bands]).T
            ax.errorbar(
                x, medians, yerr=spread, color="grey", marker="s", linestyle=":", label="random 5-95%"
            )
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xscale("log")
        ax.set_xticks(sizes, [f"{size / 1e6:.0f}M" for size in sizes])
        ax.xaxis.set_minor_locator(NullLocator())  # the log axis' own ticks overlap ours
        ax.set_title(f"{fraction:.1%} of blocks removed")
        ax.set_xlabel("parameters of the unpruned model")
    axes[0][0].set_ylabel("macro chance-normalized retention")
    axes[0][-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("studies", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="path stem: writes OUT.md, OUT.json, OUT.png")
    parser.add_argument("--readme", type=Path, help="also write the verdict table into this README's markers")
    args = parser.parse_args()
    studies = [read_study(folder) for folder in args.studies]
    command = f"python benchmarks/{command_line()}"
    atomic_write_json(args.out.with_suffix(".json"), {"command": command, "studies": studies})
    atomic_write_text(args.out.with_suffix(".md"), markdown(studies, command))
    figure(studies, args.out.with_suffix(".png"))
    if args.readme:
        table = verdict_table(studies)
        atomic_write_text(args.readme, with_verdict(args.readme.read_text(encoding="utf-8"), table))
    print(args.out.with_suffix(".md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
