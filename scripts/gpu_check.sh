#!/usr/bin/env bash
# The GPU check (issue 13 item 7), under 8 minutes on one GPU: the CUDA tests, then the Mixtral-width
# model (synth, 8 layers) with --device cuda under a 6 GiB VRAM budget: device slots holding the pool's
# blocks (dequantize) or NF4, each with the measured copy-vs-CPU miss choice and with every miss copied.
# One table out: $OUT/gpu_check.md when OUT is set, else in the work folder (benchmarks/README.md).
#
#   scripts/gpu_check.sh [WORK_DIR]          # default /tmp/gpu-check; the synth model is kept there
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_SYNTH="--layers 2 --hidden 256 --intermediate 512 --heads 4 --kv-heads 2" \
#       GPU_CHECK_BUDGET=1GiB scripts/gpu_check.sh /tmp/gpu-dry   # the dry run of all but the GPU
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
WORK="${1:-/tmp/gpu-check}"
RESULTS="${OUT:-$WORK}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
BUDGET="${GPU_CHECK_BUDGET:-6GiB}"
SYNTH="${GPU_CHECK_SYNTH:---layers 8}"
MODEL="$WORK/model-$(echo "$SYNTH" | tr -c 'a-z0-9\n' '_')"
mkdir -p "$WORK" "$RESULTS"
started=$(date +%s)

python3 - <<'PY'
import importlib.util, torch
missing = [m for m in ("numba", "gguf", "safetensors", "sentencepiece", "click", "transformers", "bitsandbytes")
           if importlib.util.find_spec(m) is None]
print(f"torch {torch.__version__}, CUDA {torch.cuda.is_available()}"
      + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "")
      + (f"; missing: {', '.join(missing)} (carry wheels: benchmarks/README.md)" if missing else ""))
PY

# 1. The CUDA tests (skipped without a GPU): the device tier and NF4 slots against the CPU, torch dequantize.
set +e
timeout 200 python3 -m pytest -q -rs -p no:cacheprovider -k cuda \
    tests/test_device_tier.py tests/test_nf4_slots.py tests/test_quant_quantize.py 2>&1 | tee "$RESULTS/gpu_check_tests.log"
set -e
summary="CUDA tests: $(grep -E '(passed|failed|skipped|error)' "$RESULTS/gpu_check_tests.log" | tail -1 | tr -d '=')"

# 2. The Mixtral-width model, written once (random int4 g64 experts; the demo tokenizer fits its vocabulary).
if [ ! -d "$MODEL" ]; then
    # shellcheck disable=SC2086  # SYNTH is a list of options
    timeout 150 python3 -m mixtral_offload synth "$MODEL" $SYNTH --tokenizer mixtral_offload/demo/tokenizer.model -q
fi

# 3. The rows, each a fresh child; rows that would start past the deadline are listed as skipped.
left=$(( 450 - ($(date +%s) - started) ))
python3 benchmarks/gpu_check.py "$MODEL" --device "$DEVICE" --budget "$BUDGET" --deadline "$(( left > 0 ? left : 0 ))" \
    --tests "$summary" --table "$RESULTS/gpu_check.md" --json "$RESULTS/gpu_check.json"
echo "gpu_check: $(( $(date +%s) - started )) s; table in $RESULTS/gpu_check.md"
