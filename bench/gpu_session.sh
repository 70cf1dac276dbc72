#!/usr/bin/env bash
# One script for a session on the lent H100 (no network there; see bench/NOTES.md, "GPU session").
#
#   bash bench/gpu_session.sh [STEP ...]      STEP: setup test logprobs linear all (default: all)
#
# setup     installs the wheels carried in .whl/ (liger-kernel, cut-cross-entropy) into /tmp/site and
#           builds pyalign against the machine's own torch (pip install --no-build-isolation -e .)
# test      the whole test suite on CUDA, large shapes included (what `make test-gpu` runs)
# logprobs  python -m bench.logprobs --device cuda   (extra arguments: LOGPROBS_ARGS)
# linear    python -m bench.linear --device cuda     (extra arguments: LINEAR_ARGS)
#
# Each step first redoes `setup` if a fresh machine lacks it, so the steps can go in separate calls
# (each call is limited to 10 minutes). Results: JSON + markdown + PNG written straight into $OUT
# (what comes back from the machine; copy them into bench/results/ and commit) and into
# bench/results/ on the machine; one log, $OUT/session.log. A short table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-bench/results/gpu_session}"
mkdir -p "$OUT" bench/results
LOG="$OUT/session.log"
STEP_TIMEOUT="${STEP_TIMEOUT:-570}"   # seconds per long step, inside the call's 600 s
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET PYALIGN_BACKEND
PY="${PY:-python3}"          # the machine's python, the one that holds its CUDA torch
DEVICE="${BENCH_DEVICE:-cuda}"  # cpu only for a dry run of this script elsewhere
SITE=/tmp/site
status=0

log() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$LOG"; }

run_logged() {  # run a command with a time limit, its output both shown and logged
    timeout "$STEP_TIMEOUT" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then log "exit $rc: $*"; status=1; fi
    return "$rc"
}

install_wheels() {
    if compgen -G ".whl/*.whl" >/dev/null; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" .whl/*.whl 2>&1 | tee -a "$LOG"
    else
        log "no .whl/ folder carried: Liger-Kernel and Cut Cross-Entropy will be skipped"
    fi
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
}

setup() {
    log "machine"
    { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
      $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
      nvcc --version | tail -1; } 2>&1 | tee -a "$LOG"
    install_wheels
    log "build pyalign against this machine's torch"
    run_logged $PY -m pip install --no-build-isolation --no-deps -e . || return 1
    run_logged $PY -c "import pyalign, pyalign._C as C; print('pyalign', pyalign.__version__, 'cuda kernel built:', C.has_cuda(), 'backends:', pyalign.available_backends('cuda'))"
    $PY -c "import liger_kernel, cut_cross_entropy" 2>&1 | tee -a "$LOG"
    touch /tmp/pyalign_gpu_setup_done
}

ensure_setup() {
    if [ -f /tmp/pyalign_gpu_setup_done ]; then
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    else
        setup
    fi
}

step_test() {
    ensure_setup || return 1
    log "test suite on CUDA, large shapes included"
    run_logged $PY -m pytest -q --run-large -p no:cacheprovider tests
}

step_bench() {  # $1: logprobs | linear, then extra arguments
    local kind=$1; shift
    ensure_setup || return 1
    log "bench.$kind $*"
    run_logged $PY -m "bench.$kind" --device "$DEVICE" --out "$OUT" "$@"
    cp -f "$OUT"/"$kind"_*.json "$OUT"/"$kind"_*.md "$OUT"/"$kind"_*.png bench/results/ 2>/dev/null
}

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(all)
for step in "${steps[@]}"; do
    case "$step" in
        setup) setup ;;
        test) step_test ;;
        logprobs) step_bench logprobs ${LOGPROBS_ARGS:-} ;;
        linear) step_bench linear ${LINEAR_ARGS:-} ;;
        all) step_test; step_bench logprobs ${LOGPROBS_ARGS:-}; step_bench linear ${LINEAR_ARGS:-} ;;
        *) echo "unknown step '$step' (setup test logprobs linear all)"; exit 2 ;;
    esac
done

if compgen -G "$OUT/*.json" >/dev/null; then
    echo
    $PY -m bench.summary "$OUT"/*.json
fi
exit $status
