#!/usr/bin/env bash
# The GPU session of issue 12 part B, prepared for the lent H200 (no network there; torch 2.11,
# triton 3.6, transformers 5.17, peft and accelerate on the machine). See bench/NOTES.md, "GPU session".
#
# Device budget: 15 minutes per session, machine start (~1-2 min) included, at most 10 min per
# call. Two calls, the second right after the first (the machine stays warm only ~30 s after a
# call: a cold second call redoes `setup`, ~2 min more). From the repository root, with the wheels
# downloaded into .whl/ (see bench/NOTES.md; .whl/ is git-ignored):
#
#   run(command="bash bench/gpu_session.sh part1", carry=[".whl"], timeout_s=570)   # ~7-8 min
#   run(command="bash bench/gpu_session.sh part2", carry=[".whl"], timeout_s=420)   # ~5-6 min
#
#   part1 = setup (wheels, pyalign with its CUDA kernels for sm_90: ~2 min)
#           + test (make test-gpu: the kernel/op test files on CUDA, large shapes included, the logit
#             transforms and extreme offsets on triton and cuda among them: ~4-5 min)
#           + sweep (python -m bench.kernel_sweep: Triton settings, Triton vs CUDA by kind: ~1-2 min)
#   part2 = logprobs (python -m bench.logprobs, bf16 + fp32, 8x1024x{32000,50257,128256} and
#           8x4096x152064, every method, kernels alone: ~3-4 min)
#           + linear (python -m bench.linear, bf16 at V = 32000, 50257, 128256 and fp32 at 32000,
#           every method incl. TRL's chunked log-prob, Liger, Cut Cross-Entropy: ~2 min) + table
#
# Each step has its own time limit (STEP_TIMEOUT, or the per-step ones below) so that a slow step
# cannot eat the next one's time, and every result file is rewritten after each case: a step cut
# off still returns what it finished. Files come back from $OUT (at most 8): session.log, one
# JSON + markdown per benchmark (PNGs are written into bench/results/ on the machine only, to stay
# within 8 files), and summary.md. Copy them into bench/results/ and commit.
#
# Rehearsal on a CPU machine (what runs without a GPU: argument parsing, wheel install, CPU paths):
#   BENCH_DEVICE=cpu PY=.venv/bin/python SKIP_BUILD=1 TARGET_PYTHON=3.12 SITE=/tmp/site_rehearsal \
#     OUT=/tmp/gpu_rehearsal bash bench/gpu_session.sh rehearse
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-bench/results/gpu_session}"
mkdir -p "$OUT" bench/results
LOG="$OUT/session.log"
STEP_TIMEOUT="${STEP_TIMEOUT:-540}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
unset TRITON_INTERPRET PYALIGN_BACKEND
PY="${PY:-python3}"              # the machine's python, the one that holds its CUDA torch
DEVICE="${BENCH_DEVICE:-cuda}"   # cpu only for the rehearsal
SITE="${SITE:-/tmp/site}"
STAMP=/tmp/pyalign_gpu_setup_done
status=0

log() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$LOG"; }

run_logged() {  # LIMIT seconds, then the command; output shown and logged
    local limit=$1; shift
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then log "exit $rc: $*"; status=1; fi
    return "$rc"
}

install_wheels() {
    # One version of each package: the datasets wheel that matches the machine's pyarrow
    # (datasets 5.2 needs pyarrow >= 24, 4.7 needs >= 21; TRL 1.16 accepts either).
    if ! compgen -G ".whl/*.whl" >/dev/null; then
        log "no .whl/ folder carried: TRL's chunked log-prob, Liger and Cut Cross-Entropy will be skipped"
        return 0
    fi
    local pyarrow datasets_whl
    pyarrow=$($PY -c "import pyarrow; print(pyarrow.__version__.split('.')[0])" 2>/dev/null || echo 0)
    if [ "${pyarrow:-0}" -ge 24 ]; then datasets_whl=$(ls .whl/datasets/datasets-5.*.whl 2>/dev/null)
    else datasets_whl=$(ls .whl/datasets/datasets-4.*.whl 2>/dev/null); fi
    log "installing wheels into $SITE (pyarrow major $pyarrow -> ${datasets_whl:-no datasets wheel})"
    # TARGET_PYTHON (rehearsal only): install the wheels made for the GPU machine's python here.
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        ${TARGET_PYTHON:+--python-version "$TARGET_PYTHON" --only-binary=:all:} \
        .whl/*.whl $datasets_whl 2>&1 | tee -a "$LOG"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    $PY - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib
for name in ("trl", "trl.kernels.chunked_logprob", "trl.trainer.utils", "liger_kernel.chunked_loss",
             "cut_cross_entropy", "datasets"):
    try:
        module = importlib.import_module(name)
        print(f"  import {name}: ok {getattr(module, '__version__', '')}")
    except Exception as err:  # noqa: BLE001 - report, the benches skip what is missing
        print(f"  import {name}: FAILED {type(err).__name__}: {err}")
EOF
}

setup() {
    log "machine"
    { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1
      $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
      nvcc --version 2>&1 | tail -1; } 2>&1 | tee -a "$LOG"
    install_wheels
    if [ -z "${SKIP_BUILD:-}" ]; then
        log "build pyalign (CUDA kernels for sm_90) against this machine's torch"
        TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" PYALIGN_BUILD_JOBS="${PYALIGN_BUILD_JOBS:-16}" \
            run_logged 300 $PY -m pip install --no-build-isolation --no-deps -e . || return 1
    fi
    run_logged 60 $PY -c "import pyalign, pyalign._C as C; print('pyalign', pyalign.__version__, 'cuda kernel built:', C.has_cuda(), 'backends:', pyalign.available_backends('$DEVICE'))" || return 1
    touch "$STAMP"
}

ensure_setup() {
    if [ -f "$STAMP" ]; then
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    else
        setup
    fi
}

step_test() {
    ensure_setup || return 1
    log "make test-gpu (kernel and op tests on CUDA, large shapes included)"
    run_logged "${TEST_TIMEOUT:-300}" make test-gpu GPU_PY="$PY" PYTEST_ARGS="${PYTEST_ARGS:--p no:cacheprovider}"
}

step_sweep() {
    ensure_setup || return 1
    log "bench.kernel_sweep"
    run_logged "${SWEEP_TIMEOUT:-150}" $PY -m bench.kernel_sweep --device "$DEVICE" --out "$OUT" ${SWEEP_ARGS:-}
}

step_bench() {  # $1: logprobs | linear, $2: time limit, then extra arguments
    local kind=$1 limit=$2; shift 2
    ensure_setup || return 1
    log "bench.$kind $*"
    run_logged "$limit" $PY -m "bench.$kind" --device "$DEVICE" --out "$OUT" "$@"
    if [ "$DEVICE" = cuda ]; then  # keep $OUT within 8 files; the rehearsal leaves bench/results/ alone
        mv -f "$OUT"/"$kind"_*.png bench/results/ 2>/dev/null
        cp -f "$OUT"/"$kind"_*.json "$OUT"/"$kind"_*.md bench/results/ 2>/dev/null
    fi
}

logprobs_args() { echo ${LOGPROBS_ARGS:---shapes 8x1024x32000,8x1024x50257,8x1024x128256,8x4096x152064 --dtypes bf16,fp32 --repeats 10 --warmup 2}; }
linear_bf16_args() { echo ${LINEAR_BF16_ARGS:---shapes 8x1024x4096x32000,8x1024x4096x50257,8x1024x4096x128256 --dtypes bf16 --repeats 5 --warmup 1}; }
linear_fp32_args() { echo ${LINEAR_FP32_ARGS:---shapes 8x1024x4096x32000 --dtypes fp32 --repeats 3 --warmup 1}; }

summary() {
    if compgen -G "$OUT/*.json" >/dev/null; then
        log "summary"
        { echo '```'; $PY -m bench.summary "$OUT"/logprobs_*.json "$OUT"/linear_*.json 2>&1
          $PY - "$OUT" <<'EOF'
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("kernel_sweep_*.json")):
    suggested = json.loads(path.read_text())["suggested"]
    print(f"kernel_sweep: {suggested['auto_line']}")
    print(f"kernel_sweep: best Triton settings {suggested['best_settings']}")
EOF
          echo '```'; } > "$OUT/summary.md" 2>&1
        cat "$OUT/summary.md"
    fi
}

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(part1 part2)
for step in "${steps[@]}"; do
    case "$step" in
        setup) setup ;;
        test) step_test ;;
        sweep) step_sweep ;;
        logprobs) step_bench logprobs "${LOGPROBS_TIMEOUT:-270}" $(logprobs_args) ;;
        linear) step_bench linear "${LINEAR_TIMEOUT:-150}" $(linear_bf16_args)
                step_bench linear "${LINEAR_FP32_TIMEOUT:-60}" $(linear_fp32_args) ;;
        part1) setup; step_test; step_sweep ;;
        part2) step_bench logprobs "${LOGPROBS_TIMEOUT:-270}" $(logprobs_args)
               step_bench linear "${LINEAR_TIMEOUT:-150}" $(linear_bf16_args)
               step_bench linear "${LINEAR_FP32_TIMEOUT:-60}" $(linear_fp32_args) ;;
        rehearse)  # the CPU rehearsal: every step's code path on tiny shapes
            setup
            TRITON_INTERPRET=1 run_logged 300 $PY -m bench.kernel_sweep --device cpu --repeats 1 --out "$OUT"
            step_bench logprobs 300 --shapes 2x16x1000,2x16x1001 --dtypes fp32 --repeats 1 --warmup 0
            step_bench linear 300 --shapes 2x8x32x1000 --dtypes bf16,fp32 --repeats 1 --warmup 0 ;;
        summary) ;;
        *) echo "unknown step '$step' (setup test sweep logprobs linear part1 part2 rehearse summary)"; exit 2 ;;
    esac
done
summary
exit $status
