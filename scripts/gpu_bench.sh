#!/bin/bash
# `bench --gpu`, then the tests that need a GPU, on a GPU machine without
# network, from the wheels `make gpu-wheels` put in .whl/ (torch comes with the machine). Writes
# bench.json, bench.log and gpu_tests.log to $OUT (default: ./gpu-out).
# Usage: bash scripts/gpu_bench.sh [SECONDS [BENCH ARGS...]]   (the bench's time limit, default
# 420; e.g. `bash scripts/gpu_bench.sh 200 --parts stock,clt` to measure some parts again)
set -u
T0=$(date +%s)
OUT=${OUT:-gpu-out}
LIMIT=${1:-420}
shift $(( $# > 0 ? 1 : 0 ))
mkdir -p "$OUT"
ls .whl/vlm_sparsify-*.whl > /dev/null || { echo "no .whl/vlm_sparsify-*.whl: run make gpu-wheels"; exit 1; }
# by name from .whl/: pip picks the wheel that fits this Python (multiprocess has one per version)
python3 -m pip install -q --no-index --find-links .whl --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site $(ls .whl/*.whl | xargs -n1 basename | cut -d- -f1 | sort -u) || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -P -c "import torch, triton, transformers as t
print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', t.__version__)"
echo "installed t=$(( $(date +%s) - T0 ))s"
# -P: import vlm_sparsify from the installed wheel, not from this folder
timeout "$LIMIT" python3 -P -m vlm_sparsify.bench --gpu --json "$@" > "$OUT/bench.json" 2> "$OUT/bench.log"
echo "bench rc=$? t=$(( $(date +%s) - T0 ))s"
grep "\[gpu\]" "$OUT/bench.log"
tail -3 "$OUT/bench.log"
# the tests that need a GPU: CUDA graphs of decoding steps, the encoder's Triton weight gradient
# (not yet run on a GPU), and (unless TRITON_TESTS=0, to save device time: they passed on the H200
# in earlier runs) the Triton kernels against torch, compiled for this GPU (on CPUs they run in
# the interpreter)
TESTS="tests/test_decode_graphs.py tests/test_topk_encoder_backward.py"
[ "${TRITON_TESTS:-1}" = 0 ] || TESTS="$TESTS tests/test_triton_kernels.py"
timeout 150 python3 -P -m pytest -q -p no:cacheprovider $TESTS 2>&1 \
    | tail -15 | tee "$OUT/gpu_tests.log"
echo "gpu tests t=$(( $(date +%s) - T0 ))s"
