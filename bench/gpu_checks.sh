#!/usr/bin/env bash
# Every GPU check and measurement in one prepared run, for a session that is lent a GPU machine for a few
# minutes (sized for about 6 minutes on an H100/H200; not yet run on one). Writes JSON and logs to $OUT (the
# device tool's output folder), or to bench/results/gpu when OUT is unset:
#   tests:   tests/test_gpu.py (every attention backend against the CPU, cached decoding, half precision with
#            padding), before any timing;
#   prefill: kernel, attention module and 2-layer model, bf16, SDPA, 4k to 32k tokens (issue 11's prefill ratios,
#            the paper's 1.67-1.80x kernel figures are GPU ones);
#   decode:  tokens/s at cache lengths 512 to 32k, DynamicCache, batch 1, with the memory-traffic ceiling;
#            prefill peak memory at 32k; compiled static-cache generate; training steps; the query projection
#            alone (dense + gather against projecting only the selected experts' rows).
# Needs torch with CUDA and transformers >= 5.5 (the device image has both); nothing is installed.
#     bash bench/gpu_checks.sh            # all of it
#     QUICK=1 bash bench/gpu_checks.sh    # a 1-repeat smoke run at short lengths (also runs on a CPU: DEVICE=cpu)
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

$python - <<'PY' 2>&1 | tee "$OUT/environment.txt"
import torch, transformers
print("torch", torch.__version__, "transformers", transformers.__version__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")
PY

if [ "$DEVICE" = cuda ] && ! $python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_checks: no CUDA device here: run it on a machine with a GPU (or DEVICE=cpu QUICK=1 for a smoke run)." >&2
    exit 2
fi

status=0
# Correctness first: every backend's float32 logits equal the CPU's, cached decoding the full forward, and half
# precision with padding stays finite (tests/test_gpu.py; skipped on machines without a GPU).
GQE_TEST_DEVICE=$DEVICE $python -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/tests.log" \
    || status=1
$python bench/bench_prefill.py --device "$DEVICE" --dtype bfloat16 --backends sdpa --lengths $prefill_lengths \
    --model-max-length 32768 --repeats $repeats --json "$OUT/prefill_bf16.json" 2>&1 | tee "$OUT/prefill.log" \
    || status=1
$python bench/bench_decode.py --device "$DEVICE" --dtype bfloat16 --parts decode memory static training projection \
    --lengths $decode_lengths --repeats $repeats --json "$OUT/decode_bf16.json" 2>&1 | tee "$OUT/decode.log" \
    || status=1
exit $status
