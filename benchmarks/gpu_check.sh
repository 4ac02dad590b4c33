#!/usr/bin/env bash
# The first GPU run's one command: prints ONE JSON line (MAUGen images/s fp16/bf16 x eager/compiled x batch
# 1/16/auto at 512 px, 30 steps, CFG 7.5, labels on; the stock diffusers inpaint pipeline with the same UNet;
# peak GPU memory; compiled-vs-eager label agreement; a short `mifa build` with its generator busy share).
# Progress goes to stderr. Under 8 minutes on one H100/H200 (a budget skips what would not fit, and says so).
#
#   benchmarks/gpu_check.sh            # CUDA machine, from a checkout (with .whl/ from ../shared/tools/device-wheels.sh
#                                      # when the machine lacks diffusers/ray/webdataset/insightface)
#   benchmarks/gpu_check.sh --tiny     # anywhere, on the CPU: tiny model, 64 px, 2 steps (tests run this)
#   extra options: --budget-s SECONDS --dtypes fp16 bf16 --runner ray|local
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1 && ! "$PY" -c "import diffusers, ray, webdataset" 2>/dev/null; then
  site=${TMPDIR:-/tmp}/mifa-gpu-check-site
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl >&2
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
exec "$PY" benchmarks/gpu_check.py "$@"
