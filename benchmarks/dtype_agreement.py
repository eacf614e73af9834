"""bfloat16 against float32 on the same examples: the paired difference of two evaluations of one model.

The SmolLM2 protocol study runs in bfloat16 on CPU (about 4x faster with AMX); its float32 pilot evaluated the
unpruned model on the same seeded samples. This script pairs the two base evaluations (and any pruned cell
both studies hold) example by example: accuracy differences with paired-bootstrap intervals and McNemar's
test, so a reader can see what the precision changes. Tasks whose sample differs (WikiText-2: 500 lines in
the pilot, the full test in the study) are left out.

    .venv/bin/python benchmarks/dtype_agreement.py benchmarks/study_protocol_smollm2 \\
        benchmarks/study_protocol_smollm2_bf16 --out benchmarks/study_protocol_smollm2_bf16/dtype_agreement.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

from avss.evaluation.runner import EvalResult
from avss.study.analysis import load_evaluations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("float32_study", type=Path)
    parser.add_argument("bfloat16_study", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    lines = [
        "# bfloat16 against float32, same examples",
        "",
        f"float32: `{args.float32_study}`; bfloat16: `{args.bfloat16_study}`.",
        "Difference = bfloat16 - float32, 95% paired bootstrap (10,000 resamples); McNemar exact: examples",
        "right only in float32 / only in bfloat16. Command: `benchmarks/dtype_agreement.py`'s docstring.",
        "",
        "| cell | task | metric | n | float32 | bfloat16 | difference [95% CI] | only fp32 / only bf16 | p |",
        "|---|---|---|---:|---:|---:|---|---:|---:|",
    ]
    keys = sorted(
        {path.name.split(".eval.json")[0] for path in (args.bfloat16_study / "cells").glob("*.eval.json*")}
    )
    for key in keys:
        found = load_evaluations(args.float32_study, [key])
        if key not in found:
            continue
        single, half = found[key], load_evaluations(args.bfloat16_study, [key])[key]
        shared = [t for t in half.tasks if t in single.tasks and _same_sample(single, half, t)]
        for name in set(single.tasks) - set(shared):
            single.tasks.pop(name)
        for name in set(half.tasks) - set(shared):
            half.tasks.pop(name)
        comparison = half.compare(single).to_dict()
        for row in comparison["rows"]:
            if row.get("mcnemar") is None:
                continue
            d, m = row["difference"], row["mcnemar"]
            lines.append(
                f"| {key} | {row['task']} | {row['metric']} | {row['n']} "
                f"| {row['base']['estimate']:.3f} | {row['new']['estimate']:.3f} "
                f"| {d['estimate']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] "
                f"| {m['base_only']} / {m['new_only']} | {m['p_value']:.2f} |"
            )
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


def _same_sample(a: EvalResult, b: EvalResult, task: str) -> bool:
    return [r.id for r in a.tasks[task].records] == [r.id for r in b.tasks[task].records]


if __name__ == "__main__":
    main()
