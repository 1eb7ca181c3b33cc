#!/usr/bin/env bash
# DeCLIP ViT-B/32 training-step throughput on one CUDA device: bf16 autocast, torch.compile, 128 per device.
#
#   bash benchmarks/gpu.sh                 # ~2-4 min: compile, then STEPS timed steps; prints samples/s and MFU
#   FULL=1 bash benchmarks/gpu.sh          # then every benchmark (run_all.py) on the GPU, appended to docs
#
# MFU here = FLOPs of one step (counted by torch.utils.flop_counter on the eager model) / step time / the bf16
# matmul rate measured on this GPU in the same run (8192^3), not the datasheet peak. Target: >= 3,000 samples/s
# on one H200. The step is the trainer's own (build_model, DeCLIPObjective, fused AdamW) on synthetic inputs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
BATCH=${BATCH:-128}
STEPS=${STEPS:-30}
TARGET=3000

timeout 290 "$PY" - "$BATCH" "$STEPS" "$TARGET" <<'PYEOF'
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
import train_step as ts  # noqa: E402

from declip.config import config_from_dict  # noqa: E402

batch, steps, target = (int(a) for a in sys.argv[1:4])
torch.cuda.set_device(0)
device = torch.device("cuda", 0)
peak = ts.matmul_peak(device, "amp_bf16", quick=False)
t0 = time.perf_counter()
step = ts.declip_step(config_from_dict({}), batch, device, "amp_bf16", compile=True)
seconds, flops = ts.measure(step, steps, device)
fps = batch / seconds
print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
print(f"bf16 matmul rate (8192^3): {peak / 1e12:.0f} TFLOP/s")
print(f"DeCLIP ViT-B/32, batch {batch}, amp_bf16, compiled: {fps:,.0f} samples/s "
      f"({seconds * 1e3:.1f} ms/step, {flops / 1e9:.0f} GFLOP/step, {flops / seconds / 1e12:.0f} TFLOP/s)")
print(f"MFU vs measured bf16 matmul: {flops / seconds / peak:.1%}")
print(f"target >= {target:,} samples/s: {'met' if fps >= target else 'NOT met'} "
      f"(benchmark wall {time.perf_counter() - t0:.0f} s incl. compile)")
print(f"peak memory: {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
PYEOF

if [[ "${FULL:-0}" == "1" ]]; then
  "$PY" benchmarks/run_all.py --device cuda --precision amp_bf16 --compile --batch "$BATCH" --steps 20 \
    --out docs/performance.md
fi
