#!/usr/bin/env bash
# GPU checks: the @pytest.mark.gpu tests and the compiled-vs-eager distances, then the CUDA
# step-throughput benchmark, one model per process.
#
# Usage (from anywhere; runs in the repository root):
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# OUT_DIR defaults to $OUT, else ./gpu_check_out. It receives:
#   env.txt            card (nvidia-smi), driver, torch and Python versions, date
#   pytest_gpu.log     the gpu tests' output
#   bench_cuda.log     the benchmark's output
#   bench_cuda.md      the benchmark tables (mlp, bert-hf, gpt2)
#   equivalence.md     each compile_step mode's measured distance from the eager step
#   ensemble.md        K = 8 ensemble members: one vectorised step vs 8 sequential steps
#   RESULTS_cuda.md    a section ready to append to benchmarks/RESULTS.md
#
# Needs torch with CUDA; optree, pytest (and transformers/accelerate for the Hugging Face
# models and Trainer) either installed or as wheels in .whl/ (installed with --no-deps into
# /tmp/site). medfunc is used from this source tree (PYTHONPATH=.).
# Preflight problems (no GPU, torch without CUDA, medfunc not importable) stop the script at
# once. A failing test part does not stop the benchmark (both results come back from one
# run), but the script then exits non-zero. Each part has its own time limit; the whole
# script stays under 8 minutes.
# Rehearsal without a GPU: GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh /tmp/rehearsal
# runs the same parts on the CPU with tiny settings (the gpu tests then skip).
set -uo pipefail

cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-gpu_check_out}}"
PY="${PYTHON:-python3}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
TEST_LIMIT="${TEST_LIMIT:-120}"
mkdir -p "$OUT_DIR"
started=$(date +%s)

say() { echo "[gpu_check $(($(date +%s) - started))s] $*"; }
die() {
    say "FAILED: $*"
    exit 1
}

# --- preflight ------------------------------------------------------------------------------
if [ "$DEVICE" = cuda ] && compgen -G ".whl/*.whl" >/dev/null; then
    say "installing wheels from .whl/ into /tmp/site"
    timeout 120 "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
        || die "pip install of .whl/*.whl failed"
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH=".:${PYTHONPATH:-}"

if [ "$DEVICE" = cuda ]; then
    command -v nvidia-smi >/dev/null || die "nvidia-smi not found: this script needs an NVIDIA GPU"
    card=$(timeout 60 nvidia-smi --query-gpu=name,driver_version,memory.total \
        --format=csv,noheader | head -n 1) || die "nvidia-smi did not answer"
    [ -n "$card" ] || die "nvidia-smi lists no GPU"
else
    card="rehearsal on the CPU (no GPU)"
fi

GPU_CHECK_DEVICE="$DEVICE" timeout 120 "$PY" - <<'EOF' || die "torch with CUDA, optree or medfunc is not importable (see above)"
import os
import sys

import torch

if os.environ["GPU_CHECK_DEVICE"] == "cpu":
    import medfunc.compile  # noqa: F401

    sys.exit(0)
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
if [ "$DEVICE" = cuda ]; then
    bench_args=(--steps 20 --repeats 5)
    equiv_args=(--steps 20)
else
    bench_args=(--steps 2 --repeats 1 --warmup 1 --memory off)
    equiv_args=(--steps 2)
fi

# --- part 1: the gpu tests and the equivalence table, side by side (neither is timed) -------
test_summary="not run"
if "$PY" -c 'import pytest' 2>/dev/null; then
    mapfile -t gpu_files < <(grep -rl --include='test_*.py' "pytest.mark.gpu" tests | sort)
    say "pytest -m gpu on ${gpu_files[*]} (limit ${TEST_LIMIT}s)"
    timeout -k 10 "$TEST_LIMIT" "$PY" -m pytest -m gpu -q -p no:cacheprovider -rfEs \
        "${gpu_files[@]}" >"$OUT_DIR/pytest_gpu.log" 2>&1 &
    test_pid=$!
else
    test_pid=""
fi
timeout -k 10 "$TEST_LIMIT" "$PY" benchmarks/equivalence.py --device "$DEVICE" "${equiv_args[@]}" \
    --out "$OUT_DIR/equivalence.md" >"$OUT_DIR/equivalence.log" 2>&1
equiv_rc=$?
if [ "$equiv_rc" -ne 0 ]; then
    status=1
    say "equivalence FAILED (exit $equiv_rc)"
    tail -n 30 "$OUT_DIR/equivalence.log"
fi
if [ -n "$test_pid" ]; then
    wait "$test_pid"
    rc=$?
    test_summary=$(grep -E "(passed|failed|error|skipped|no tests ran)" "$OUT_DIR/pytest_gpu.log" \
        | tail -n 1)
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        test_summary="timed out after ${TEST_LIMIT}s ($test_summary)"
    fi
    if [ "$rc" -ne 0 ]; then
        status=1
        say "gpu tests FAILED (exit $rc): $test_summary"
        grep -E "^(FAILED|ERROR)|Error|assert" "$OUT_DIR/pytest_gpu.log" | head -n 60
    else
        say "gpu tests: $test_summary"
    fi
else
    status=1
    test_summary="NOT RUN: pytest is not importable (add its wheels to .whl/)"
    say "$test_summary"
fi

# --- part 1b: K = 8 ensemble members, one vectorised step vs 8 sequential steps -------------
timeout -k 10 "${ENSEMBLE_LIMIT:-60}" "$PY" benchmarks/ensemble.py --device "$DEVICE" \
    >"$OUT_DIR/ensemble.md" 2>"$OUT_DIR/ensemble.log"
ensemble_rc=$?
if [ "$ensemble_rc" -ne 0 ]; then
    status=1
    say "ensemble benchmark FAILED (exit $ensemble_rc)"
    tail -n 20 "$OUT_DIR/ensemble.log"
fi

# --- part 2: the benchmark, one process per model, each under its own limit -----------------
# model:limit:runners (runners in priority order; --time-budget skips the last ones first)
all_runners="plain,medfunc,plain-cudagraph,medfunc-cudagraph,medfunc-inductor+cudagraph"
parts=(
    "mlp:${MLP_LIMIT:-60}:$all_runners,hf-trainer,plain-compile,medfunc-inductor,lightning"
    "bert-hf:${BERT_LIMIT:-170}:$all_runners,hf-trainer,lightning,plain-compile,medfunc-inductor"
    "gpt2:${GPT_LIMIT:-130}:plain,plain-compile,medfunc-inductor,medfunc,hf-trainer"
)
: >"$OUT_DIR/bench_cuda.md"
: >"$OUT_DIR/bench_cuda.log"
bench_failed=""
for part in "${parts[@]}"; do
    IFS=: read -r model limit runners <<<"$part"
    say "benchmark $model on $DEVICE (limit ${limit}s)"
    timeout -k 10 "$limit" "$PY" benchmarks/step_throughput.py --device "$DEVICE" \
        --models "$model" --runners "$runners" "${bench_args[@]}" \
        --time-budget $((limit * 2 / 3)) --out "$OUT_DIR/bench_$model.md" \
        >>"$OUT_DIR/bench_cuda.log" 2>&1
    rc=$?
    if [ -s "$OUT_DIR/bench_$model.md" ]; then
        {
            [ "$rc" -ne 0 ] && printf 'Cut short (exit %s): the rows it finished.\n\n' "$rc"
            cat "$OUT_DIR/bench_$model.md"
            echo
        } >>"$OUT_DIR/bench_cuda.md"
        rm -f "$OUT_DIR/bench_$model.md"
    fi
    if [ "$rc" -ne 0 ]; then
        status=1
        bench_failed="$bench_failed $model"
        say "benchmark $model FAILED (exit $rc)"
        tail -n 30 "$OUT_DIR/bench_cuda.log"
    fi
done

# --- results section ------------------------------------------------------------------------
{
    echo "## Step throughput and compile_step on CUDA ($card)"
    echo
    echo "\`bash benchmarks/gpu_check.sh\` ($today): $card, torch $torch_version."
    echo "GPU tests (\`pytest -m gpu\`): $test_summary."
    echo
    [ -s "$OUT_DIR/equivalence.md" ] && cat "$OUT_DIR/equivalence.md" && echo
    [ -s "$OUT_DIR/ensemble.md" ] && cat "$OUT_DIR/ensemble.md" && echo
    [ -n "$bench_failed" ] && echo "Benchmark parts that failed or were cut short:$bench_failed." && echo
    cat "$OUT_DIR/bench_cuda.md"
} >"$OUT_DIR/RESULTS_cuda.md"
cat "$OUT_DIR/RESULTS_cuda.md"
say "done, exit $status; results in $OUT_DIR"
exit "$status"
