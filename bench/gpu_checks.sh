#!/usr/bin/env bash
# Every GPU check and measurement in one prepared run, for a session that is lent a GPU machine for a few
# minutes. Writes JSON and logs to $OUT (the device tool's output folder; at most 8 files come back), or to
# bench/results/gpu when OUT is unset:
#   tests:   tests/test_gpu.py (every attention backend against the CPU, cached decoding, half precision with
#            padding), before any timing;
#   prefill: kernel, attention module and 2-layer model, bf16, SDPA, 4k to 32k tokens (issue 11's prefill ratios,
#            the paper's 1.67-1.80x kernel figures are GPU ones);
#   decode:  tokens/s at cache lengths 512 to 32k, DynamicCache, batch 1, with the memory-traffic ceiling;
#            prefill peak memory at 32k; training steps; the query projection alone (dense + gather against
#            projecting only the selected experts' rows);
#   static:  generate(cache_implementation="static"), which compiles the decoding forward (last: it compiles).
# Each phase runs under its own time cap (PHASE_SECONDS: tests, prefill, decode, static; about 8.5 minutes in all),
# so that one phase that hangs or compiles for too long cannot take the others' time; every phase tees its log
# into $OUT as it goes, and the benchmarks rewrite their JSON after each part.
# Needs torch with CUDA and transformers >= 5.5 (the device image has both); nothing is installed.
#     bash bench/gpu_checks.sh            # all of it
#     QUICK=1 bash bench/gpu_checks.sh    # a 1-repeat smoke run at short lengths (also runs on a CPU: DEVICE=cpu)
#     PHASES="tests prefill" bash bench/gpu_checks.sh   # some phases only (a rerun)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.
python=${PYTHON:-python3}

if [ -n "${QUICK:-}" ]; then
    prefill_lengths="256 512"; decode_lengths="64 128"; repeats=1
else
    prefill_lengths="4096 8192 16384 32768"; decode_lengths="512 2048 8192 32768"; repeats=7
fi

read -r tests_s prefill_s decode_s static_s <<<"${PHASE_SECONDS:-150 100 130 130}"

$python - <<'PY' 2>&1 | tee "$OUT/environment.txt"
import importlib.util, platform, torch, transformers
print("python", platform.python_version(), "torch", torch.__version__, "CUDA", torch.version.cuda,
      "transformers", transformers.__version__, "flash_attn", bool(importlib.util.find_spec("flash_attn")))
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")
PY
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$OUT/environment.txt"

if [ "$DEVICE" = cuda ] && ! $python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_checks: no CUDA device here: run it on a machine with a GPU (or DEVICE=cpu QUICK=1 for a smoke run)." >&2
    exit 2
fi

status=0
phase() {  # phase NAME SECONDS COMMAND...: run it under its time cap, its output teed into $OUT/NAME.log
    local name=$1 seconds=$2; shift 2
    [[ " ${PHASES:-tests prefill decode static} " == *" $name "* ]] || return 0
    echo "== $name (at most ${seconds} s)" | tee -a "$OUT/environment.txt"
    local start=$SECONDS
    timeout --kill-after=10 "$seconds" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start)) s$([ "$rc" = 124 ] && echo ' (cut at its cap)')" \
        | tee -a "$OUT/environment.txt"
    [ "$rc" = 0 ] || status=1
}
# Correctness first: every backend's float32 logits equal the CPU's, cached decoding the full forward, and half
# precision with padding stays finite (tests/test_gpu.py; skipped on machines without a GPU).
export GQE_TEST_DEVICE=$DEVICE
phase tests "$tests_s" $python -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py
phase prefill "$prefill_s" $python bench/bench_prefill.py --device "$DEVICE" --dtype bfloat16 --backends sdpa \
    --lengths $prefill_lengths --model-max-length 32768 --repeats $repeats --json "$OUT/prefill_bf16.json"
phase decode "$decode_s" $python bench/bench_decode.py --device "$DEVICE" --dtype bfloat16 \
    --parts decode memory training projection --lengths $decode_lengths --repeats $repeats \
    --json "$OUT/decode_bf16.json"
phase static "$static_s" $python bench/bench_decode.py --device "$DEVICE" --dtype bfloat16 --parts static \
    --repeats $repeats --json "$OUT/static_bf16.json"
exit $status
