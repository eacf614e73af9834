"""EAVSS benchmark on SmolLM2-135M: one step per process, each writing its own JSON under ``arms/``.

Steps: ``score`` (EAVSS on train-split pairs), ``base`` and ``dola`` (no training), and
``train:SELECTION:SEED`` (copy of the base model, mitigation on the selected layers, held-out evaluation).
``table`` aggregates the JSON files into ``results.json`` and ``results.md``. Every size is a flag and is
recorded in the output; see README.md for the exact commands that produced the recorded numbers.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from statistics import mean, pstdev

from avss.adapters import get_adapter
from avss.data import resolve_data_dir
from avss.hallucination.batches import contrastive_batches
from avss.hallucination.dola import DOLA_SETTINGS, DolaConfig, DolaModel
from avss.hallucination.eavss import EavssScores
from avss.hallucination.heldout import evaluate_heldout
from avss.hallucination.mitigate import MitigationOptions, choose_layers, mitigate, pair_accuracy
from avss.hallucination.pairs import load_pairs
from avss.hallucination.scoring import EavssOptions, score_eavss
from avss.io import atomic_write_json, atomic_write_text
from avss.models import load_model
from avss.training import TrainConfig

HERE = Path(__file__).parent
ARMS = HERE / "arms"


def machine() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    return {"lscpu": lscpu[:12], "python": platform.python_version(), "node": platform.node()}


def pairs_for(args: argparse.Namespace, split: str) -> list:
    limit = {"train": args.train_limit or None, "validation": args.val_limit, "test": None}[split]
    return load_pairs(args.pairs.split(","), resolve_data_dir(None), split=split, limit=limit)


def heldout(model, tokenizer, args: argparse.Namespace, tasks: tuple[str, ...]) -> dict:
    limits = {"truthfulqa_mc": args.mc_limit or None, "sciq": args.sciq_limit, "wikitext2": args.ppl_lines}
    options = {"max_length": args.ppl_max_length} if "wikitext2" in tasks else {}
    result = evaluate_heldout(
        model,
        tokenizer,
        tasks,
        limits={t: limits[t] for t in tasks},
        batch_size=args.eval_batch_size,
        **options,
    )
    test_batches = contrastive_batches(tokenizer, pairs_for(args, "test"), negatives=args.negatives)
    started = time.perf_counter()
    result["metrics"]["pairs_test"] = {"accuracy": pair_accuracy(model, test_batches)}
    result["num_examples"]["pairs_test"] = sum(
        len(b["input_ids"]) // (1 + args.negatives) for b in test_batches
    )
    result["seconds"]["pairs_test"] = round(time.perf_counter() - started, 3)
    return result


def run_step(step: str, loaded, args: argparse.Namespace) -> dict:
    """One step on a fresh copy of the base model (the loaded model itself is never changed)."""
    model, tokenizer = copy.deepcopy(loaded.model), loaded.tokenizer
    record: dict = {"step": step, "args": vars(args), "model": loaded.source, "machine": machine()}
    if step == "score":
        run = score_eavss(
            model, tokenizer, pairs_for(args, "train"), EavssOptions(), model_info=loaded.source
        )
        run.save(HERE)
        record["ranking"] = run.scores.ranking()
        record["wall_time_s"] = run.provenance["wall_time_s"]
        return record
    tasks = ("truthfulqa_mc", "sciq", "wikitext2")
    if step == "base":
        record["eval"] = heldout(model, tokenizer, args, tasks)
        return record
    if step == "dola":
        overrides = {"buckets": args.dola_layers} if args.dola_layers else {}
        config = DolaConfig.named(args.dola_setting, **overrides)
        record["dola"] = config.to_dict()
        record["eval"] = heldout(DolaModel(model, config), tokenizer, args, tasks[:2])
        return record
    _, selection, seed = step.split(":")
    scores = EavssScores.from_dict(json.loads((HERE / "eavss.json").read_text()))
    layers = choose_layers(selection, args.k, get_adapter(model).num_layers, scores, int(seed))
    options = MitigationOptions(
        contrast=args.contrast,
        tau=args.tau,
        lam=args.lam,
        negatives=args.negatives,
        max_length=args.max_length,
        questions_per_batch=args.questions_per_batch,
        train=TrainConfig(epochs=args.epochs, lr=args.lr, seed=int(seed), progress=False),
    )
    model, result = mitigate(
        model, tokenizer, pairs_for(args, "train"), pairs_for(args, "validation"), layers, options
    )
    record["layers"] = layers
    record["mitigation"] = result.record
    record["eval"] = heldout(model, tokenizer, args, tasks)
    return record


def fmt(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{mean(values):.{digits}f} ± {pstdev(values):.{digits}f}"


COLUMNS = [
    ("truthfulqa_mc", "mc1"),
    ("truthfulqa_mc", "mc2"),
    ("pairs_test", "accuracy"),
    ("sciq", "accuracy"),
    ("sciq", "accuracy_norm"),
    ("wikitext2", "perplexity"),
]


def table(arms: Path) -> None:
    records = {path.stem: json.loads(path.read_text()) for path in sorted(arms.glob("*.json"))}
    groups: dict[str, list[dict]] = {}
    for name, record in records.items():
        if "eval" in record:
            label = "_".join(name.split("_")[:2]) if name.startswith("train_") else name
            groups.setdefault(label, []).append(record)
    order = ["base", "dola", "train_eavss", "train_random", "train_lowest", "train_all"]
    lines = [
        "| arm | runs | layers | "
        + " | ".join(f"{t} {m}" for t, m in COLUMNS)
        + " | kept epoch | val pair acc before→after | train s | optimizer state MiB | peak RSS MiB |",
        "|---" * (len(COLUMNS) + 8) + "|",
    ]
    summary = {}
    for label in [g for g in order if g in groups]:
        runs = groups[label]
        cells = []
        summary[label] = {}
        for task, metric in COLUMNS:
            values = [r["eval"]["metrics"][task][metric] for r in runs if task in r["eval"]["metrics"]]
            summary[label][f"{task}.{metric}"] = values
            cells.append(fmt(values) if values else "n/a")
        training = [r["mitigation"]["training"] for r in runs if "mitigation" in r]
        layers = "; ".join(",".join(map(str, r["layers"])) for r in runs if "layers" in r) or "-"
        kept = ",".join(str(t["best_epoch"]) for t in training) or "-"
        val = (
            "; ".join(
                f"{r['mitigation']['val_pair_accuracy']['before']:.3f}→{r['mitigation']['val_pair_accuracy']['after']:.3f}"
                for r in runs
                if "mitigation" in r
            )
            or "-"
        )
        train_s = fmt([t["wall_time_s"] for t in training], 0) if training else "-"
        opt = fmt([t["optimizer_state_bytes"] / 2**20 for t in training], 1) if training else "-"
        rss = fmt([t["peak_memory_bytes"] / 2**20 for t in training], 0) if training else "-"
        lines.append(
            f"| {label} | {len(runs)} | {layers} | "
            + " | ".join(cells)
            + f" | {kept} | {val} | {train_s} | {opt} | {rss} |"
        )
    atomic_write_json(
        HERE / "results.json", {"created": datetime.now(timezone.utc).isoformat(), "summary": summary}
    )
    atomic_write_text(HERE / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("steps", nargs="+", help="score | base | dola | train:SELECTION:SEED | table")
    parser.add_argument("--budget-s", type=float, default=840, help="Start no step after this many seconds")
    parser.add_argument("--arms-dir", type=Path, default=ARMS, help="Where the step JSON files go")
    parser.add_argument("--pairs", default="truthfulqa")
    parser.add_argument("--train-limit", type=int, default=48)
    parser.add_argument("--val-limit", type=int, default=12)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--contrast", default="infonce")
    parser.add_argument("--tau", type=float, default=0.1)
    parser.add_argument("--lam", type=float, default=0.5)
    parser.add_argument("--negatives", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--questions-per-batch", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--mc-limit", type=int, default=12)
    parser.add_argument("--sciq-limit", type=int, default=8)
    parser.add_argument("--ppl-lines", type=int, default=8)
    parser.add_argument("--ppl-max-length", type=int, default=512)
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--dola-setting", default="paper", choices=sorted(DOLA_SETTINGS))
    parser.add_argument(
        "--dola-layers", default=None, help="override the setting's bucket (low, high, 1,3,...)"
    )
    args = parser.parse_args()
    if args.steps == ["table"]:
        table(args.arms_dir)
        return
    started = time.perf_counter()
    loaded = load_model("smollm2-135m", device="cpu")
    for step in args.steps:
        path = args.arms_dir / f"{step.replace(':', '_')}.json"
        elapsed = time.perf_counter() - started
        if path.is_file():
            print(f"{step}: already done ({path.name})", flush=True)
            continue
        if elapsed > args.budget_s:
            print(f"{step}: skipped, {elapsed:.0f} s of the {args.budget_s:.0f} s budget used", flush=True)
            continue
        step_started = time.perf_counter()
        record = run_step(step, loaded, args)
        record["step_wall_time_s"] = round(time.perf_counter() - step_started, 3)
        record["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        atomic_write_json(path, record)
        summary = {k: record[k] for k in ("layers", "ranking") if k in record}
        print(
            step,
            f"{record['step_wall_time_s']:.0f} s",
            summary,
            record.get("eval", {}).get("metrics"),
            flush=True,
        )


if __name__ == "__main__":
    main()
