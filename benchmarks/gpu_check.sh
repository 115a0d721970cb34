#!/usr/bin/env bash
# GPU check: the GPU tests and every op benchmark on one NVIDIA GPU, in about 6 minutes.
#
#   benchmarks/gpu_check.sh OUTDIR
#
# Uses what is installed (a stock CUDA PyTorch + Triton, CuPy if present; no package registry needed)
# and PYTHONPATH=. Writes to OUTDIR: env.txt (date, nvidia-smi, versions, kfe doctor), build.log,
# pytest-gpu.log, bench-<suite>.{md,json,err}. On a machine without a GPU it says so and exits 0.
# Budget (seconds, each a hard timeout; about 6 minutes in all): extension build 150 (in the background,
# during the tests), GPU tests 120, then per op suite the limit below with few repeats. `kfe bench`
# prints each row and rewrites its JSON as soon as a shape is timed, so a suite cut off by its limit
# still leaves every shape it finished (most important shapes come first in each suite).
# Commit OUTDIR under benchmarks/results/.
# Model training throughput (issue 7) is a separate, longer call: KFE_GPU_SUITES=model benchmarks/gpu_check.sh OUT
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
suites=${KFE_GPU_SUITES:-grn attention contrastive sparse hog fcmae}

if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA GPU on this machine; nothing to check"
  exit 0
fi
status=0
{ date -u +%FT%TZ; nvidia-smi; "$py" -c 'import sys, torch, triton; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'; } >"$out/env.txt" 2>&1

# The extension holds the C++ CPU kernels and, built here, the CUDA ones (else CuPy compiles them).
timeout 150 "$py" setup.py build_ext --inplace -j "$(nproc)" >"$out/build.log" 2>&1 &
build=$!
timeout 120 "$py" -m pytest -m gpu -q -p no:cacheprovider --durations=15 tests >"$out/pytest-gpu.log" 2>&1 || status=1
tail -3 "$out/pytest-gpu.log"
wait $build || echo "gpu_check: extension build failed or timed out (see build.log); the CUDA kernels use CuPy"
"$py" -m train.cli doctor >>"$out/env.txt" 2>&1

for suite in $suites; do
  case $suite in                      # seconds; model compiles ConvNeXt V2-B and DiT-XL/2 training steps
    attention) limit=60 ;; contrastive) limit=45 ;; sparse) limit=35 ;; model) limit=300 ;; *) limit=30 ;;
  esac
  timeout $limit "$py" -m train.cli bench "$suite" --modes fwd,fwd+bwd --warmup 3 --repeats 10 \
    --json "$out/bench-$suite.json" >"$out/bench-$suite.md" 2>"$out/bench-$suite.err" || status=1
  cat "$out/bench-$suite.md"
done
echo "gpu_check: done (status $status); results in $out"
exit $status
