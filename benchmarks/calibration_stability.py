"""Do the selected layers survive another calibration set? (issue: calibration robustness)

Scores the model on several disjoint calibration sets (parts 0..K-1 of the shared C4 validation slice and,
when present, WikiText-2 valid), selects the blocks to remove at each budget, and writes the Jaccard
overlap of the selections and the spread of the scores per method (:mod:`avss.scorers.stability`). Each
scored set is kept in ``OUT/sets/NAME.json`` as soon as it is done and reused by a later run with the same
model, dtype and set, so a run of leave-one-out (over an hour) resumes by set. Usage::

    .venv/bin/python benchmarks/calibration_stability.py --model smollm2-135m --c4-parts 4 \\
        --samples 64 --max-length 512 --budgets 4,8 --out benchmarks/calibration_stability_smollm2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import avss
from avss.data import CalibrationOptions, TextSource, resolve_data_dir
from avss.io import atomic_write_json, atomic_write_text
from avss.provenance import command_line, describe_machine, machine, package_versions, utc_now
from avss.scorers.stability import CalibrationSet, SetScores, calibration_stability


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default="avss,block_influence,angular")
    parser.add_argument("--c4-parts", type=int, default=4)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--budgets", default="4,8")
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16 (a study's --dtype)")
    parser.add_argument("--data-dir", default=None, help="default: $AVSS_DATA_DIR, then ../shared/data")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/calibration_stability_smollm2"))
    args = parser.parse_args()

    data_dir = resolve_data_dir(args.data_dir)
    if data_dir is None:
        raise SystemExit("needs the shared data directory (../shared/data or $AVSS_DATA_DIR)")
    c4 = TextSource(data=str(data_dir / "c4" / "c4_validation_2k.jsonl"))
    options = {"samples": args.samples, "max_length": args.max_length}
    sets = [
        CalibrationSet(f"c4-part{k}", c4, CalibrationOptions(**options, part=k)) for k in range(args.c4_parts)
    ]
    sets.append(
        CalibrationSet("wikitext2-valid", TextSource(data_dir=str(data_dir)), CalibrationOptions(**options))
    )
    run = {"model": args.model, "dtype": args.dtype}
    done = scored_sets(args.out / "sets", run)
    loaded = avss.load_model(args.model, device="cpu", dtype=args.dtype)
    budgets = [int(n) for n in args.budgets.split(",")]

    def keep(scored: SetScores) -> None:
        atomic_write_json(args.out / "sets" / f"{scored.set['name']}.json", {**run, **scored.to_dict()})
        print(f"{scored.set['name']}: {scored.seconds:.0f} s", flush=True)

    result = calibration_stability(loaded, args.methods.split(","), sets, budgets, done=done, on_set=keep)
    seconds = sum(s["seconds"] for s in result.sets)
    per_set = ", ".join(f"{s['name']} {s['seconds']:.0f}" for s in result.sets)
    record = {
        **result.to_dict(),
        "seconds": round(seconds, 1),
        "date": utc_now(),
        "machine": machine(),
        "command": f"python benchmarks/{command_line()}",
        "dtype": args.dtype,
        "versions": package_versions(),
    }
    atomic_write_json(args.out / "results.json", record)
    tokens = ", ".join(f"{s['name']} {s['tokens']}" for s in result.sets)
    text = (
        f"# Calibration stability: {args.model}\n\n"
        f"{record['date']}, {describe_machine(record['machine'])}, {seconds:.0f} s of scoring "
        f"({per_set}). "
        f"Command: `{record['command']}`\n\n"
        f"Sets (tokens): {tokens}. The C4 parts are disjoint windows of one seeded shuffle.\n\n"
        f"Jaccard: mean and minimum over the {len(sets) * (len(sets) - 1) // 2} pairs of sets of the "
        "blocks selected at each budget. Score CV: per block, std / |mean| of its score over the sets, "
        "averaged over blocks. Spearman: mean rank correlation of the score vectors between sets.\n\n"
        + result.markdown()
    )
    atomic_write_text(args.out / "README.md", text)
    print(text)


def scored_sets(folder: Path, run: dict[str, str]) -> dict[str, SetScores]:
    """The sets an earlier run kept in ``folder``; a set scored with another model or dtype stops the run
    before the model loads (its file would otherwise be silently replaced)."""
    done = {}
    for path in sorted(folder.glob("*.json")):
        record = json.loads(path.read_text())
        if {key: record.get(key) for key in run} != run:
            raise SystemExit(
                f"{path} was scored with {record.get('model')} in {record.get('dtype')}; use another --out"
            )
        done[path.stem] = SetScores.from_dict(record)
    return done


if __name__ == "__main__":
    main()
