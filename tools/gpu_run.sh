#!/usr/bin/env bash
# Every GPU question in one command (meant to take at most 9 minutes on one H100): tools/bench.py's rows with each
# switch on and off (compile, CUDA graphs at B = 1, channels_last, fused q/k/v, bf16 decode), the SCott and LoRA
# steps eager / checkpointed / compiled with their peak memory, then tools/gpu_check.py; the tables are written
# into docs/performance.md between its gpu_run.sh markers (the rest of the file is left alone).
#
#   tools/gpu_run.sh                                   # on the GPU, from the repository root
#   tools/gpu_run.sh --device cpu --tiny --warmup 0 --repeats 1 --compile-backend eager --docs /tmp/p.md   # dry run
#
# Extra flags go to `python -m tools.bench --suite` (--budget-s, --out, --micro-batch, ...); later flags win.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m tools.bench --suite --docs docs/performance.md --out runs/gpu_run "$@"
