#!/bin/bash
# The GPU measurements of the speed issue, as one short run for a lent GPU machine (`device` tool):
#   run(command="bash benchmarks/gpu_check.sh", timeout_s=540)
# Nothing can be downloaded there, so models are random-init from real shapes (bench_stats.py --model
# random:NAME); results land in $OUT (default benchmarks/) as stats_overhead_gpu.{json,md}, with the
# machine, date and command recorded by the script itself. Copy them into benchmarks/ afterwards.
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
out=${OUT:-benchmarks}
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
# The CUDA paths of the statistics (no host synchronisation inside the pass, bf16 moments).
python3 -m pytest -q -p no:cacheprovider tests/test_collect_devices.py 2>&1 | tail -3
# Statistics pass vs a bare forward over the body, store-everything and the linear patch's sums: 7B shape,
# bf16, 100k tokens (issue targets: avss <= 1.05x, linear_fit <= 1.10x).
python3 benchmarks/bench_stats.py --model random:llama-7b --device cuda --dtype bfloat16 \
    --tokens 100000 --max-length 512 --batch-size 8 --repeats 3 \
    --variants bare_body avss linear_fit store_all avss_compiled --label gpu --out "$out/stats_overhead_gpu"
# The study's models at their own shapes (smaller kernels: launch overhead shows here if anywhere).
python3 benchmarks/bench_stats.py --model random:qwen2.5-1.5b --device cuda --dtype bfloat16 \
    --tokens 100000 --max-length 512 --batch-size 8 --repeats 3 \
    --variants bare_body avss linear_fit --label gpu --out "$out/stats_overhead_gpu"
