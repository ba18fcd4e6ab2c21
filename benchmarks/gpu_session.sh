#!/usr/bin/env bash
# Every GPU check in one call of a lent device machine (the README's Testing section says
# how to run it): the Triton tests compiled for the GPU, the engine against transformers on
# the GPU, the Triton kernel benchmark and the offline throughput benchmark.
# Carried: .whl (wheels of the packages the machine's image lacks) and .gpu (made here by
# benchmarks/gpu_prepare.py). Logs and JSON land in $OUT.
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
step() { echo "=== $1 ($(date -u +%T))"; }

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

step "triton tests on the GPU"
TRITON_INTERPRET=0 timeout ${TEST_TIMEOUT:-130} python3 -m pytest -q -p no:cacheprovider \
    tests/test_triton_kernels.py tests/test_lora_triton.py 2>&1 | tee "$OUT/triton-tests.log" | tail -25

step "engine vs transformers on the GPU"
timeout ${CHECK_TIMEOUT:-100} python3 benchmarks/gpu_engine.py check \
    --gguf .gpu/smollm2-4layers.Q4_1.gguf --output-json "$OUT/engine-check.json" 2>&1 | tail -8

step "triton kernel benchmark"
timeout ${KERNEL_TIMEOUT:-110} python3 benchmarks/kernels_triton.py --out "$OUT/kernels-triton.json" \
    > "$OUT/kernels-triton.log" 2>&1
tail -4 "$OUT/kernels-triton.log"

step "offline throughput, random SmolLM2-135M-shaped weights"
python3 benchmarks/gpu_engine.py random-model --tokenizer .gpu/tokenizer --out /tmp/rand135m
timeout ${THROUGHPUT_TIMEOUT:-110} python3 benchmarks/throughput.py --model /tmp/rand135m \
    --num-requests 256 --prompt-len 128 --output-len 128 --max-num-seqs 256 \
    --hf-batch-size 64 --output-json "$OUT/throughput.json" 2>&1 | tail -4
step "done"
