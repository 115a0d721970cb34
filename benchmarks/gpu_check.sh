#!/usr/bin/env bash
# GPU check: the GPU tests and every benchmark suite on one NVIDIA GPU, in a few minutes.
#
#   benchmarks/gpu_check.sh OUTDIR
#
# Uses what is installed (a stock CUDA PyTorch + Triton; no package registry needed) and PYTHONPATH=.
# Writes to OUTDIR: env.txt (nvidia-smi, doctor), build.log, pytest-gpu.log, bench-<suite>.json/.md.
# On a machine without a GPU it says so and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA GPU on this machine; nothing to check"
  exit 0
fi
status=0
{ date -u +%FT%TZ; nvidia-smi; "$py" -m train.cli doctor; } >"$out/env.txt" 2>&1

# The C++ extension is optional for GPU work (it holds CPU kernels, and CUDA ones where they exist).
timeout 240 "$py" setup.py build_ext --inplace -j "$(nproc)" >"$out/build.log" 2>&1 \
  || echo "gpu_check: extension build failed or timed out (see build.log); continuing without it"
"$py" -m train.cli doctor >>"$out/env.txt" 2>&1

timeout 150 "$py" -m pytest -m gpu -q -p no:cacheprovider tests >"$out/pytest-gpu.log" 2>&1 || status=1
tail -3 "$out/pytest-gpu.log"

for suite in $("$py" -c 'import train.cli; from engine.bench import SUITES; print(" ".join(SUITES))'); do
  limit=120; [ "$suite" = model ] && limit=300   # compiles ConvNeXt V2-B and DiT-XL/2 training steps
  timeout $limit "$py" -m train.cli bench "$suite" --modes fwd,bwd,fwd+bwd --json "$out/bench-$suite.json" \
    >"$out/bench-$suite.md" 2>"$out/bench-$suite.err" || status=1
  cat "$out/bench-$suite.md"
done
echo "gpu_check: done (status $status); results in $out"
exit $status
