#!/usr/bin/env bash
# GPU checks of compile_step: the @pytest.mark.gpu tests, then the CUDA step-throughput benchmark.
#
# Usage (from anywhere; runs in the repository root):
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# OUT_DIR defaults to $OUT, else ./gpu_check_out. It receives:
#   env.txt            card (nvidia-smi), driver, torch and Python versions, date
#   pytest_gpu.log     the gpu tests' output
#   bench_cuda.log     the benchmark's output
#   bench_cuda.md      the benchmark table
#   RESULTS_cuda.md    a section ready to append to benchmarks/RESULTS.md
#
# Needs torch with CUDA; optree, pytest (and transformers/accelerate for the Hugging Face
# models and Trainer) either installed or as wheels in .whl/ (installed with --no-deps into
# /tmp/site). medfunc is used from this source tree (PYTHONPATH=.).
# Preflight problems (no GPU, torch without CUDA, medfunc not importable) stop the script at
# once. A failing test part does not stop the benchmark (both results come back from one
# run), but the script then exits non-zero. Each part has its own time limit; the whole
# script stays under 8 minutes.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-gpu_check_out}}"
PY="${PYTHON:-python3}"
TEST_LIMIT="${TEST_LIMIT:-150}"
BENCH_LIMIT="${BENCH_LIMIT:-270}"
mkdir -p "$OUT_DIR"
started=$(date +%s)

say() { echo "[gpu_check $(($(date +%s) - started))s] $*"; }
die() {
    say "FAILED: $*"
    exit 1
}

# --- preflight ------------------------------------------------------------------------------
if compgen -G ".whl/*.whl" >/dev/null; then
    say "installing wheels from .whl/ into /tmp/site"
    timeout 120 "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
        || die "pip install of .whl/*.whl failed"
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH=".:${PYTHONPATH:-}"

command -v nvidia-smi >/dev/null || die "nvidia-smi not found: this script needs an NVIDIA GPU"
card=$(timeout 60 nvidia-smi --query-gpu=name,driver_version,memory.total \
    --format=csv,noheader | head -n 1) || die "nvidia-smi did not answer"
[ -n "$card" ] || die "nvidia-smi lists no GPU"

timeout 120 "$PY" - <<'EOF' || die "torch with CUDA, optree or medfunc is not importable (see above)"
import sys

import torch

if not torch.cuda.is_available():
    sys.exit("torch.cuda.is_available() is False (torch %s, CUDA build %s)"
             % (torch.__version__, torch.version.cuda))
import optree  # noqa: F401

import medfunc.compile  # noqa: F401

torch.ones(1, device="cuda").add_(1)
torch.cuda.synchronize()
EOF

torch_version=$("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')
today=$(date -u +%Y-%m-%d)
{
    echo "card: $card"
    echo "torch: $torch_version"
    echo "python: $("$PY" --version 2>&1)"
    echo "date: $today"
} >"$OUT_DIR/env.txt"
say "card: $card; torch $torch_version"

status=0

# --- part 1: the gpu tests ------------------------------------------------------------------
test_summary="not run"
if "$PY" -c 'import pytest' 2>/dev/null; then
    mapfile -t gpu_files < <(grep -l "pytest.mark.gpu" tests/test_*.py)
    say "pytest -m gpu on ${gpu_files[*]} (limit ${TEST_LIMIT}s)"
    timeout -k 10 "$TEST_LIMIT" "$PY" -m pytest -m gpu -q -p no:cacheprovider -rfEs \
        "${gpu_files[@]}" >"$OUT_DIR/pytest_gpu.log" 2>&1
    rc=$?
    test_summary=$(grep -E "(passed|failed|error|skipped|no tests ran)" "$OUT_DIR/pytest_gpu.log" \
        | tail -n 1)
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        test_summary="timed out after ${TEST_LIMIT}s ($test_summary)"
    fi
    if [ "$rc" -ne 0 ]; then
        status=1
        say "gpu tests FAILED (exit $rc): $test_summary"
        tail -n 40 "$OUT_DIR/pytest_gpu.log"
    else
        say "gpu tests: $test_summary"
    fi
else
    status=1
    test_summary="NOT RUN: pytest is not importable (add its wheels to .whl/)"
    say "$test_summary"
fi

# --- part 2: the benchmark ------------------------------------------------------------------
budget=$((BENCH_LIMIT - 60))
say "benchmark on cuda (limit ${BENCH_LIMIT}s, setup budget ${budget}s)"
timeout -k 10 "$BENCH_LIMIT" "$PY" benchmarks/step_throughput.py --device cuda \
    --models mlp,bert,gpt2 --steps 20 --repeats 5 --time-budget "$budget" \
    --out "$OUT_DIR/bench_cuda.md" >"$OUT_DIR/bench_cuda.log" 2>&1
rc=$?
if [ "$rc" -ne 0 ] || [ ! -s "$OUT_DIR/bench_cuda.md" ]; then
    status=1
    say "benchmark FAILED (exit $rc)"
    tail -n 40 "$OUT_DIR/bench_cuda.log"
fi

# --- results section ------------------------------------------------------------------------
{
    echo "## Step throughput and compile_step on CUDA ($card)"
    echo
    echo "\`bash benchmarks/gpu_check.sh\` ($today): $card, torch $torch_version."
    echo "GPU tests (\`pytest -m gpu\`): $test_summary."
    echo
    if [ -s "$OUT_DIR/bench_cuda.md" ]; then
        if [ "$rc" -ne 0 ]; then
            echo "The benchmark was cut short (exit $rc): the table holds the models it finished."
            echo
        fi
        cat "$OUT_DIR/bench_cuda.md"
    else
        echo "The benchmark did not finish (exit $rc); see bench_cuda.log."
    fi
} >"$OUT_DIR/RESULTS_cuda.md"
cat "$OUT_DIR/RESULTS_cuda.md"
say "done, exit $status; results in $OUT_DIR"
exit "$status"
