"""How much model work ``avss eval`` saves against lm-evaluation-harness, counted rather than timed.

Both tools run the same forward passes on the same tokens, except where avss shares work: a packed row runs a
context once for all its options, and only the positions that predict scored tokens go through the LM head
(lm-eval computes the head and a vocabulary-wide log-softmax at every position of every padded batch). So
the speed-up either tool can show on a task is bounded by the ratio of the work each asks of the model, and
this script counts that work without running the model, avss's from the engine's own plan
(``LanguageModel.work``: the batches ``loglikelihood`` would run, tested against the forwards it runs):

- body MACs: tokens entering the transformer blocks (padding included) x the blocks' weight count per token,
- head MACs: positions entering the LM head x hidden size x vocabulary.

lm-eval's plan is modelled as its ``HFLM._loglikelihood_tokens`` does it: every (context, option) request
alone, sorted longest first, ``--batch-size`` per forward, right-padded to the longest, full logits. The
attention's own cost (quadratic in the row) is left out; it is small at these lengths and favours neither.

    .venv/bin/python benchmarks/eval_work.py --model smollm2-135m --tasks sciq,arc_easy,piqa,winogrande \\
        --out benchmarks/eval_work_smollm2.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from avss.data import resolve_data_dir
from avss.evaluation.engine import LanguageModel
from avss.evaluation.runner import build_tasks
from avss.io import atomic_write_json
from avss.models import resolve_model_path
from avss.provenance import utc_now


def batches(items: list, batch_size: int) -> list[list]:
    return [items[i : i + batch_size] for i in range(0, len(items), batch_size)]


def lm_eval_plan(inputs: list[int], batch_size: int) -> dict[str, int]:
    """lm-eval: every request alone, longest first, right-padded, the head at every padded position."""
    positions = sum(len(batch) * batch[0] for batch in batches(sorted(inputs, reverse=True), batch_size))
    return {"body_tokens": positions, "head_positions": positions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default="sciq,arc_easy,piqa,winogrande")
    parser.add_argument("--limit", type=int, default=None, help="seeded sample per task (default: every row)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    location, _ = resolve_model_path(args.model)
    config = AutoConfig.from_pretrained(location)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    text = config.get_text_config()
    head_macs = text.hidden_size * text.vocab_size
    embeddings = {
        id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) for p in m.parameters()
    }
    body_macs = sum(p.numel() for p in model.parameters() if id(p) not in embeddings and p.dim() == 2)
    lm = LanguageModel(model, AutoTokenizer.from_pretrained(location), batch_size=args.batch_size)
    directory = resolve_data_dir(args.data_dir)
    results = {}
    for name, task in build_tasks(args.tasks.split(","), {}).items():
        pool, _ = task.load(directory, "local")
        docs = task.select(pool, args.limit, 0)
        sampler = task.fewshot(pool, 0)
        requests = [request for doc in docs for request in task.requests(doc, sampler.shots(doc))]
        unique = list(dict.fromkeys(requests))
        work = lm.work(unique)  # avss's own plan: the batches loglikelihood would run
        inputs = [len(tokens) - 1 for tokens, _ in (lm.encode_request(request) for request in unique)]
        counted = {
            "requests": work.requests,
            "lm_eval": lm_eval_plan(inputs, args.batch_size),
            "avss": {
                "body_tokens": work.body_tokens,
                "head_positions": work.head_positions,
                "packed_requests": work.packed_requests,
            },
        }
        for tool in ("lm_eval", "avss"):
            work = counted[tool]
            work["macs"] = work["body_tokens"] * body_macs + work["head_positions"] * head_macs
        counted["work_ratio"] = counted["lm_eval"]["macs"] / counted["avss"]["macs"]
        counted["documents"] = len(docs)
        results[name] = counted
        print(
            f"{name}: {len(docs)} documents, lm-eval / avss model work = {counted['work_ratio']:.2f}x "
            f"(body tokens {counted['lm_eval']['body_tokens']} / {counted['avss']['body_tokens']}, "
            f"head positions {counted['lm_eval']['head_positions']} / {counted['avss']['head_positions']})"
        )
    record = {
        "format": "avss-eval-work/1",
        "created": utc_now(),
        "model": args.model,
        "body_macs_per_token": body_macs,
        "head_macs_per_position": head_macs,
        "batch_size": args.batch_size,
        "limit": args.limit,
        "tasks": results,
    }
    atomic_write_json(args.out, record)


if __name__ == "__main__":
    main()
