#!/usr/bin/env bash
# GPU check for a borrowed device (one H200, minutes of lease): every figure in one tarball, in < 420 s.
#
#   benchmarks/gpu_check.sh OUTDIR              on a machine with a CUDA GPU
#   benchmarks/gpu_check.sh --dry-run OUTDIR    the same phases on the CPU (Triton interpreter, tiny sizes)
#
# Runs from the checkout with PYTHONPATH=. and what is installed (torch, triton; CuPy, pytest-timeout,
# flash-attn, xformers, open_clip, timm if present); no package registry, no pip install.
#   phase 0 (<= 20 s)  env.txt (nvidia-smi, versions, kfe doctor) + measured ceilings: device copy bandwidth
#                      and bf16 8192^3 matmul rate; every "% of ceiling" below is of these
#   phase 1 (<= 180 s) the ops' GPU tests, GRN -> sparse -> HOG -> contrastive -> attention, per-test
#                      timeout 60 s, per-op limits, short tracebacks; no model/train tests
#   phase 2 (<= 175 s) benchmarks, rows that matter first: kfe fwd / fwd+bwd at the priority shapes, then
#                      the reference and peers, then other shapes; torch.compile(reference) last, if time remains
#   phase 3 (optional) KFE_GPU_SUITES=model: model/recipe throughput and MFU (alone: 'model'; both: add it
#                      to the op list, e.g. KFE_GPU_SUITES="grn sparse hog contrastive attention model")
# Output: OUTDIR/gpu_check.tar.gz (every log, JSON and table) and OUTDIR/summary.md, printed last: one row
# per op with test counts, kfe time, best other provider, ratio, % of ceiling; a suite or test set cut
# by its time limit says CUT. Knobs (see engine/bench/gpucheck.py): KFE_GPU_CHECK_LIMITS, KFE_GPU_BUILD=1,
# KFE_BENCH_GRAPHS=0 (no CUDA-graph launch timing), PYTHON (the interpreter; default python3).
# Exit status: 0 all passed and nothing cut, 1 a failure or a cut, 2 no GPU (without --dry-run).
set -uo pipefail
cd "$(dirname "$0")/.."
dry=()
if [ "${1:-}" = "--dry-run" ]; then dry=(--dry-run); shift; export TRITON_INTERPRET=1; fi
out=${1:?usage: benchmarks/gpu_check.sh [--dry-run] OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")  # not under OUTDIR: the device tool returns 8 files
# The orchestrator keeps to its own budget (395 s); this watchdog only guards against a hang in it.
timeout -k 5 "${KFE_GPU_CHECK_WATCHDOG:-410}" "$py" -m engine.bench.gpucheck "$work" "${dry[@]}"
status=$?
if [ ! -s "$work/summary.md" ]; then
  { echo "# gpu_check: CUT: the orchestrator stopped (exit $status) before writing its summary"
    "$py" -c 'import sys; from engine.bench import gpusummary; print(gpusummary.write(sys.argv[1]))' "$work" 2>&1
  } >"$work/summary.partial.md"
  mv "$work/summary.partial.md" "$work/summary.md"
  [ "$status" = 0 ] && status=1
fi
cp "$work/summary.md" "$out/summary.md"
tar -czf "$out/gpu_check.tar.gz" -C "$work" .
rm -rf "$work"
echo "gpu_check: exit $status; $out/gpu_check.tar.gz holds every file; summary:"
echo
cat "$out/summary.md"
exit $status
