"""One page that summarizes avss run directories: a self-contained HTML file and the same content as Markdown.

:func:`collect` walks each run directory and turns every output it recognizes into a :class:`Section` (facts,
tables, figures) through a registry of readers, one per kind of output: per-layer scores (``scores.json``,
``eavss.json``), pruning records, evaluation results, demo summaries, study tables, provenance files, plots.
A JSON file goes to the reader of its ``format`` tag (:mod:`avss.provenance`); only files written before
avss tagged its outputs are recognized by their keys. Anything unrecognized falls through to a generic
reader, so a report never fails because a run is partial or newer than this module. :func:`render_html` and
:func:`render_markdown` only format; the HTML embeds plots as base64 data URIs and carries its CSS inline, so
the page opens offline and can be mailed as one file.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avss import __version__
from avss.errors import DataError
from avss.io import atomic_directory, atomic_write_text
from avss.provenance import utc_now
from avss.stats.checkpoint import is_checkpoint

MAX_TABLE_ROWS = 200
MAX_JSON_BYTES = 20 << 20
MAX_TEXT_BYTES = 64 << 10
GENERIC_JSON_PER_FOLDER = 3
MODEL_FILES = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"}
MODEL_FILES |= {"special_tokens_map.json", "model.safetensors.index.json", "chat_template.json"}
# Headline results first, long per-layer tables and everything unrecognized after them (stable sort).
HEADLINES = ("Prune and compare", "summary", "Pruned layers", "Evaluation", "Plots")
SECTION_ORDER = {title: rank for rank, title in enumerate((*HEADLINES, "EAVSS per layer", "AVSS per layer"))}
PROVENANCE_KEYS = ("format", "command", "created", "avss_version", "versions", "model", "source_model")


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Any]]
    caption: str = ""


@dataclass
class Figure:
    path: Path
    caption: str

    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.path.read_bytes()).decode("ascii")


@dataclass
class Section:
    """What one output file says, ready to format."""

    title: str
    source: Path
    facts: dict[str, Any] = field(default_factory=dict)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    text: str = ""


@dataclass
class RunReport:
    directory: Path
    sections: list[Section]


@dataclass
class Report:
    runs: list[RunReport]
    comparisons: list[Table] = field(default_factory=list)
    created: str = field(default_factory=utc_now)


# --- readers --------------------------------------------------------------------------------

JsonReader = Callable[[Path, dict[str, Any]], Section]
Shape = Callable[[dict[str, Any]], bool]
# Format family (the tag before "/", e.g. "avss-pruning") -> its reader, which reads every version of it.
FORMAT_READERS: dict[str, JsonReader] = {}
# Files written before avss tagged its outputs have no "format"; these tests of their keys recognize them,
# tried in registration order.
UNTAGGED_READERS: list[tuple[Shape, JsonReader]] = []


def reader(*families: str, untagged: Shape | None = None) -> Callable[[JsonReader], JsonReader]:
    """Register a JSON reader for the format ``families``; ``untagged`` recognizes the same output in files
    written before it carried a format tag."""

    def register(function: JsonReader) -> JsonReader:
        FORMAT_READERS.update(dict.fromkeys(families, function))
        if untagged is not None:
            UNTAGGED_READERS.append((untagged, function))
        return function

    return register


def format_family(tag: Any) -> str:
    return str(tag).partition("/")[0]


def provenance_of(data: dict[str, Any]) -> dict[str, Any]:
    return {key: data[key] for key in PROVENANCE_KEYS if key in data}


def model_name(model: Any) -> str:
    if isinstance(model, dict):
        return str(model.get("name") or model.get("id") or model.get("path") or "")
    return str(model or "")


@reader(
    "avss-scores",
    "avss-eavss",
    untagged=lambda data: (
        isinstance(data.get("layers"), list) and data["layers"] and "layer" in data["layers"][0]
    ),
)
def per_layer_scores(path: Path, data: dict[str, Any]) -> Section:
    """Per-layer scores (``avss score``, EAVSS): one row per layer, every numeric column, ranked by score."""
    rows = data["layers"]
    columns = [key for key, value in rows[0].items() if isinstance(value, (int, float))]
    rank_key = next((key for key in ("eavss", "avss") if key in columns), None)
    table_rows = [[row.get(column) for column in columns] for row in rows]
    if rank_key is not None:
        order = sorted(range(len(rows)), key=lambda i: rows[i][rank_key])
        ranks = {layer: rank for rank, layer in enumerate(order)}
        columns = [*columns, f"rank by {rank_key} (0 = lowest)"]
        table_rows = [[*row, ranks[i]] for i, row in enumerate(table_rows)]
    title = "EAVSS per layer" if rank_key == "eavss" else "AVSS per layer"
    facts = {"model": model_name(data.get("model")), "layers": len(rows), **data.get("options", {})}
    if data.get("num_tokens"):
        facts["calibration tokens"] = data["num_tokens"]
    return Section(
        title,
        path,
        facts=facts,
        tables=[Table(columns, table_rows)],
        notes=list(data.get("warnings", [])),
        provenance=provenance_of(data),
    )


@reader("avss-pruning", untagged=lambda data: "removed_layers" in data and "kept_layers" in data)
def pruning_record(path: Path, data: dict[str, Any]) -> Section:
    """``avss_pruning.json`` beside a pruned model, and the sidecar of a pruned GGUF."""
    original = data.get("original_num_layers") or len(data["removed_layers"]) + len(data["kept_layers"])
    facts = {
        "source model": model_name(data.get("source_model")),
        "method": data.get("method", ""),
        "layers before": original,
        "layers removed": f"{len(data['removed_layers'])} ({len(data['removed_layers']) / original:.0%})",
        "removed": ", ".join(map(str, data["removed_layers"])),
        "kept": ", ".join(map(str, data["kept_layers"])),
        **{
            f"selection.{key}": value
            for key, value in data.get("selection", {}).items()
            if value not in (None, [])
        },
    }
    # Untagged records (version 1) kept command and versions under options.
    provenance = {**provenance_of(data.get("options", {})), **provenance_of(data)}
    return Section("Pruned layers", path, facts=facts, provenance=provenance)


def format_interval(value: Any, digits: int = 4) -> str:
    """``estimate [low, high]`` of an interval (an :class:`~avss.evaluation.uncertainty.Interval` or its
    dict); a bare number as it is; "" when there is none."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, (int, float)):
        return f"{value:.{digits}g}"
    if not isinstance(value, Mapping) or value.get("estimate") is None:
        return ""
    return f"{value['estimate']:.{digits}g} [{value['low']:.{digits}g}, {value['high']:.{digits}g}]"


def load_evaluation(path: Path) -> Any:
    """The evaluation result at ``path`` with its per-example records, or None where it cannot be read."""
    from avss.evaluation.runner import EvalResult

    try:
        return EvalResult.load(path)
    except DataError:
        return None


def metric_interval(result: Any, task: str, metric: str) -> str:
    """A task metric's 95% interval from the result's records ("" without records to draw it from)."""
    if result is None or task not in result.tasks:
        return ""
    try:
        return format_interval(result.tasks[task].interval(metric))
    except DataError:
        return ""


@reader("avss-eval")  # every evaluation result carried a format tag
def evaluation_results(path: Path, data: dict[str, Any]) -> Section:
    result = load_evaluation(path)
    rows = [
        [task, metric, value, metric_interval(result, task, metric), outcome.get("num_examples")]
        for task, outcome in data.get("tasks", {}).items()
        for metric, value in outcome.get("metrics", {}).items()
    ]
    facts = {
        "model": model_name(data.get("model")),
        **{k: v for k, v in data.get("options", {}).items() if v},
    }
    table = Table(["task", "metric", "value", "95% CI", "examples"], rows)
    return Section("Evaluation", path, facts=facts, tables=[table], provenance=provenance_of(data))


@reader("avss-demo", untagged=lambda data: isinstance(data.get("comparisons"), dict) and "removed" in data)
def demo_summary(path: Path, data: dict[str, Any]) -> Section:
    """``make demo``'s summary: each pruning variant against the base, one row per task metric."""

    rows = [
        [
            variant,
            row["task"],
            row["metric"],
            format_interval(row.get("base")),
            format_interval(row.get("new")),
            format_interval(row.get("retention") if row.get("kind") == "accuracy" else row.get("difference")),
            "" if row.get("holm_p") is None else f"{row['holm_p']:.2g}",
            row.get("n", ""),
        ]
        for variant, comparison in data["comparisons"].items()
        for row in comparison
    ]
    facts = {
        "model": model_name(data.get("model")),
        "blocks": data.get("num_layers_before"),
        **{
            f"removed by {variant}": ", ".join(map(str, removed))
            for variant, removed in data["removed"].items()
        },
        "max |logit difference| after reload": data.get("max_logit_difference_after_reload"),
        "wall time (s)": data.get("wall_time_s"),
    }
    columns = [
        "variant",
        "task",
        "metric",
        "base [95% CI]",
        "pruned [95% CI]",
        "retention (accuracy) or NLL change, nats/token (perplexity) [95% CI]",
        "McNemar p (Holm)",
        "n (paired)",
    ]
    notes = list(data.get("summary") or [])
    return Section(
        "Prune three ways and compare",
        path,
        facts=facts,
        tables=[Table(columns, rows)],
        notes=notes,
        provenance=provenance_of(data),
    )


def generic_json(path: Path, data: Any) -> Section:
    """Scalars of any other JSON output, flattened one level deep."""
    facts: dict[str, Any] = {}
    items = data.items() if isinstance(data, dict) else [("value", data)]
    for key, value in items:
        if isinstance(value, dict):
            facts.update({f"{key}.{k}": v for k, v in value.items() if is_scalar(v)})
        elif is_scalar(value) or (
            isinstance(value, list) and len(value) <= 20 and all(map(is_scalar, value))
        ):
            facts[key] = value
    return Section(
        path.stem.replace("_", " "),
        path,
        facts=facts,
        provenance=provenance_of(data) if isinstance(data, dict) else {},
    )


def csv_table(path: Path) -> Section:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return Section(path.name, path, notes=["empty file"])
    header, body = rows[0], [[number_or_text(value) for value in row] for row in rows[1:]]
    notes = [f"first {MAX_TABLE_ROWS} of {len(body)} rows"] if len(body) > MAX_TABLE_ROWS else []
    return Section(
        path.stem.replace("_", " "), path, tables=[Table(header, body[:MAX_TABLE_ROWS])], notes=notes
    )


def text_summary(path: Path) -> Section:
    """A short text or Markdown summary written by a command (``summary.txt``, ``summary.md``), verbatim."""
    if path.stat().st_size > MAX_TEXT_BYTES:
        return Section(path.name, path, notes=[f"larger than {MAX_TEXT_BYTES >> 10} KiB; not included"])
    return Section(path.stem.replace("_", " "), path, text=path.read_text(encoding="utf-8", errors="replace"))


def number_or_text(value: str) -> Any:
    """CSV cells are text; numbers are parsed so they print with the same precision as JSON values."""
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        return value


def is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


# --- collection -----------------------------------------------------------------------------


def output_files(directory: Path) -> Iterator[Path]:
    """Every file a report may use, skipping hidden/temporary files, checkpoints of unfinished runs and the
    weights and config of models."""
    for root, folders, files in os.walk(directory):
        folders[:] = sorted(f for f in folders if not f.startswith(".") and not is_checkpoint(f))
        is_model = any(name.endswith(".safetensors") for name in files)
        for name in sorted(files):
            if name.startswith(".") or is_checkpoint(name) or (is_model and name in MODEL_FILES):
                continue
            yield Path(root) / name


def read_json(path: Path) -> Any:
    if path.stat().st_size > MAX_JSON_BYTES:
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def reader_of(data: dict[str, Any]) -> JsonReader | None:
    """The reader of the file's format family, or by its keys for a file without a tag (written before avss
    tagged its outputs). Families without a reader here (healing, mitigation, study) are shown generically."""
    if "format" in data:
        return FORMAT_READERS.get(format_family(data["format"]))
    return next((read for matches, read in UNTAGGED_READERS if matches(data)), None)


def read_known(path: Path, data: Any) -> Section | None:
    """The section of the file's reader, or ``None`` when no reader knows this file (including a newer or
    hand-edited file that its reader cannot parse)."""
    if not isinstance(data, dict):
        return None
    read = reader_of(data)
    if read is None:
        return None
    try:
        return read(path, data)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


def collect_run(directory: Path) -> RunReport:
    sections: list[Section] = []
    generic: dict[Path, list[Section]] = {}
    figures: list[Figure] = []
    for path in output_files(directory):
        suffix = path.suffix.lower()
        if suffix == ".png":
            figures.append(Figure(path, str(path.relative_to(directory))))
        elif suffix == ".csv":
            sections.append(csv_table(path))
        elif suffix in (".txt", ".md"):
            sections.append(text_summary(path))
        elif suffix == ".json":
            data = read_json(path)
            if data is None:
                sections.append(Section(path.name, path, notes=["not readable as JSON"]))
                continue
            section = read_known(path, data)
            if section is not None:
                sections.append(section)
            else:
                generic.setdefault(path.parent, []).append(generic_json(path, data))
    for folder, found in generic.items():
        if len(found) <= GENERIC_JSON_PER_FOLDER:
            sections.extend(found)
        else:
            names = ", ".join(section.source.name for section in found[:5])
            sections.append(
                Section(
                    f"{folder.relative_to(directory)}/",
                    folder,
                    notes=[f"{len(found)} further JSON files ({names}, ...)"],
                )
            )
    if figures:
        sections.append(Section("Plots", directory, figures=figures))
    sections.sort(key=lambda section: SECTION_ORDER.get(section.title, len(SECTION_ORDER)))
    return RunReport(directory, sections)


def collect(directories: list[str | Path]) -> Report:
    """Read every run directory; a missing directory or one without any avss output is an error."""
    runs = []
    for directory in map(Path, directories):
        if not directory.is_dir():
            raise DataError(f"run directory {directory} does not exist")
        run = collect_run(directory.resolve())
        if not run.sections:
            raise DataError(f"{directory} contains no avss outputs (JSON, CSV or PNG files)")
        runs.append(run)
    return Report(runs, comparisons=compare_evaluations(runs))


def compare_evaluations(runs: list[RunReport]) -> list[Table]:
    """With evaluations in several runs: every later run against the first, paired over the same examples.

    Where both files hold per-example records on the same examples, each row carries both scores with 95%
    intervals, the paired difference (accuracy points, or NLL nats per token), McNemar's p Holm-corrected
    over the table, and chance-normalized retention only where the first run is above chance and the
    trivial baselines. Otherwise the runs can only be set side by side, as plain numbers.
    """
    found = [(run.directory.name, s) for run in runs for s in run.sections if s.title == "Evaluation"]
    if len(found) < 2:
        return []
    names, sections = [name for name, _ in found], [section for _, section in found]
    results = [load_evaluation(section.source) for section in sections]
    paired, unpaired = [], []
    for name, section, result in zip(names[1:], sections[1:], results[1:], strict=True):
        try:
            table = result.compare(results[0]) if result is not None and results[0] is not None else None
        except DataError:  # other examples, or no records: nothing to pair
            table = None
        if table is None or not any(row.n for row in table.rows):
            unpaired.append((name, section))
            continue
        paired += [[name, *comparison_cells(row)] for row in table.rows]
    tables = []
    if paired:
        columns = ["run", "task", "metric", "n", f"{names[0]} [95% CI]", "run [95% CI]"]
        columns += ["paired difference [95% CI]", "Holm p (McNemar)", "chance-normalized retention [95% CI]"]
        caption = f"Evaluation across runs, paired with {names[0]} over the same examples"
        tables.append(Table(columns, paired, caption=caption))
    if unpaired:
        tables.append(side_by_side(names[0], sections[0], unpaired))
    return tables


def comparison_cells(row: Any) -> list[Any]:
    """A paired comparison row as table cells; retention is shown only where the task is included."""
    if row.kind == "accuracy":
        retention = (
            format_interval(row.retention) if row.included else f"not reported: {row.inclusion_reason}"
        )
    else:
        retention = ""
    difference = format_interval(row.difference)
    if row.difference_unit == "nats per token":
        difference = f"{difference} nats/token"
    holm = "" if row.holm_p is None else f"{row.holm_p:.3g}"
    base, new = format_interval(row.base), format_interval(row.new)
    return [row.task, row.metric, row.n, base, new, difference or row.note or "", holm, retention]


def side_by_side(first: str, base: Section, others: list[tuple[str, Section]]) -> Table:
    """Runs without per-example records on the same examples: their numbers in columns, nothing derived."""
    sections = [base, *(section for _, section in others)]
    values = [{(row[0], row[1]): row[2] for row in section.tables[0].rows} for section in sections]
    keys = list(dict.fromkeys(key for table in values for key in table))
    rows = [[task, metric, *(table.get((task, metric)) for table in values)] for task, metric in keys]
    columns = ["task", "metric", first, *(name for name, _ in others)]
    caption = (
        "Evaluation across runs (no per-example records on the same examples: no interval or paired test)"
    )
    return Table(columns, rows, caption=caption)


# --- rendering ------------------------------------------------------------------------------


def fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def provenance_rows(report: Report) -> list[list[str]]:
    rows = []
    for run in report.runs:
        for section in run.sections:
            for key, value in section.provenance.items():
                if key in ("model", "source_model"):
                    value = model_name(value)
                rows.append([str(section.source.relative_to(run.directory.parent)), key, fmt(value)])
    return rows


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:72rem;
color:#1d2330;line-height:1.45;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}
h2{border-bottom:2px solid #d6dae3;padding-bottom:.2rem;margin-top:2.2rem}
h3{margin-bottom:.3rem}.source{color:#667085;font-size:.85rem;font-family:ui-monospace,monospace}
table{border-collapse:collapse;margin:.6rem 0 1rem;font-size:.88rem}.scroll{overflow-x:auto}
th,td{border:1px solid #d6dae3;padding:.25rem .55rem;text-align:left}
th{background:#f2f4f8}td.num{text-align:right;font-variant-numeric:tabular-nums}
dl.facts{display:grid;grid-template-columns:max-content auto;gap:.15rem 1rem;font-size:.9rem}
dl.facts dt{color:#475467}dl.facts dd{margin:0;font-family:ui-monospace,monospace}
figure{margin:1rem 0}figure img{max-width:100%;border:1px solid #e4e7ec}
figcaption{color:#667085;font-size:.85rem}
pre{background:#f6f8fa;padding:.6rem;white-space:pre-wrap;font-size:.82rem}
.note{color:#8a5a00;background:#fff7e6;padding:.3rem .6rem}
"""


def html_cell(value: Any) -> str:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    opening = '<td class="num">' if numeric else "<td>"
    return f"{opening}{html.escape(fmt(value))}</td>"


def html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
    body = "".join("<tr>" + "".join(html_cell(v) for v in row) + "</tr>" for row in table.rows)
    caption = f"<caption>{html.escape(table.caption)}</caption>" if table.caption else ""
    table_html = f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    return f'<div class="scroll">{table_html}</div>'


def html_section(section: Section, root: Path) -> str:
    parts = [f"<h3>{html.escape(section.title)}</h3>"]
    parts.append(f'<div class="source">{html.escape(str(section.source.relative_to(root)))}</div>')
    if section.facts:
        items = "".join(
            f"<dt>{html.escape(str(k))}</dt><dd>{html.escape(fmt(v))}</dd>" for k, v in section.facts.items()
        )
        parts.append(f'<dl class="facts">{items}</dl>')
    parts.extend(f'<p class="note">{html.escape(note)}</p>' for note in section.notes)
    if section.text:
        parts.append(f"<pre>{html.escape(section.text)}</pre>")
    parts.extend(html_table(table) for table in section.tables)
    parts.extend(
        f'<figure><img src="{figure.data_uri()}" alt="{html.escape(figure.caption)}">'
        f"<figcaption>{html.escape(figure.caption)}</figcaption></figure>"
        for figure in section.figures
    )
    return "\n".join(parts)


def render_html(report: Report, title: str = "avss report") -> str:
    body = [f"<h1>{html.escape(title)}</h1>"]
    body.append(f'<p class="source">generated {report.created} by avss {__version__}</p>')
    for table in report.comparisons:
        body.append(f"<h2>{html.escape(table.caption)}</h2>{html_table(table)}")
    for run in report.runs:
        body.append(f"<h2>{html.escape(run.directory.name)}</h2>")
        body.extend(html_section(section, run.directory.parent) for section in run.sections)
    provenance = provenance_rows(report)
    if provenance:
        body.append("<h2>Provenance</h2>" + html_table(Table(["file", "field", "value"], provenance)))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def md_cell(value: Any) -> str:
    return fmt(value).replace("|", "\\|").replace("\n", " ")


def md_table(table: Table) -> list[str]:
    lines = ["| " + " | ".join(md_cell(c) for c in table.columns) + " |"]
    lines.append("|" + "|".join("---" for _ in table.columns) + "|")
    lines.extend("| " + " | ".join(md_cell(v) for v in row) + " |" for row in table.rows)
    return [*lines, ""]


def render_markdown(
    report: Report, title: str = "avss report", links: Mapping[Path, str] | None = None
) -> str:
    """The same content as Markdown; each plot is linked as ``links[path]`` (default: its absolute path)."""
    links = links or {}
    lines = [f"# {title}", "", f"generated {report.created} by avss {__version__}", ""]
    for table in report.comparisons:
        lines += [f"## {table.caption}", "", *md_table(table)]
    for run in report.runs:
        lines += [f"## {run.directory.name}", ""]
        for section in run.sections:
            lines += [f"### {section.title}", "", f"`{section.source.relative_to(run.directory.parent)}`", ""]
            lines += [f"- **{k}**: {md_cell(v)}" for k, v in section.facts.items()]
            lines += [""] if section.facts else []
            lines += [f"> {note}\n" for note in section.notes]
            lines += [section.text.rstrip(), ""] if section.text else []
            for table in section.tables:
                lines += md_table(table)
            for figure in section.figures:
                link = links.get(figure.path, figure.path.resolve().as_posix())
                lines += [f"![{figure.caption}]({link})", ""]
    provenance = provenance_rows(report)
    if provenance:
        lines += ["## Provenance", "", *md_table(Table(["file", "field", "value"], provenance))]
    return "\n".join(lines).rstrip() + "\n"


def write_report(
    directories: list[str | Path],
    out: str | Path,
    markdown: str | Path | None = None,
    title: str = "avss report",
) -> tuple[Path, Path]:
    """Collect ``directories``; write the HTML page to ``out``, the Markdown beside it or to ``markdown``."""
    out = Path(out)
    markdown = Path(markdown) if markdown is not None else out.with_suffix(".md")
    report = collect(directories)
    atomic_write_text(out, render_html(report, title))
    links = copy_figures(report, markdown.with_name(f"{markdown.stem}_files"))
    atomic_write_text(markdown, render_markdown(report, title, links))
    return out, markdown


def copy_figures(report: Report, folder: Path) -> dict[Path, str]:
    """Copy every plot into ``folder`` (replaced atomically) so the Markdown travels with its images; returns
    each plot's link relative to the Markdown file."""
    figures = [(run, figure) for run in report.runs for section in run.sections for figure in section.figures]
    if not figures:
        return {}
    links: dict[Path, str] = {}
    run_names: dict[Path, str] = {}
    with atomic_directory(folder, overwrite=True) as tmp:
        for run, figure in figures:
            name = run_names.setdefault(run.directory, f"{len(run_names)}-{run.directory.name}")
            relative = Path(name) / figure.path.relative_to(run.directory)
            (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(figure.path, tmp / relative)
            links[figure.path] = f"{folder.name}/{relative.as_posix()}"
    return links
