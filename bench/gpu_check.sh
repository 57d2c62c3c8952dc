#!/usr/bin/env bash
# The one prepared GPU check of the Triton kernels (issue 5), for a lent H100/H200 (the device tool copies
# the working tree and collects $OUT): both kernels against the torch reference on the GPU in fp32, fp16 and
# bf16, then InfoNCE forward+backward vs eager and top-k vs torch.mm + torch.topk (with the roofline floor),
# JSON and a log under $OUT, in under 8 minutes. It installs nothing: the machine's own python3 has torch
# and triton, and the package is put on PYTHONPATH as pip would lay it out (kernels/ inside vlm2vec_rt/).
# Without a GPU it runs the same script on tiny sizes with the kernels under TRITON_INTERPRET=1.
#
#   device:  bash bench/gpu_check.sh                 (a rerun of one kernel: bash bench/gpu_check.sh --only topk)
#   here:    OUT=/tmp/gpu_check PYTHON=.venv/bin/python bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu_check}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"

site="$(mktemp -d)"
trap 'rm -rf "$site"' EXIT
cp -r vlm2vec_rt "$site/vlm2vec_rt"
rm -rf "$site/vlm2vec_rt/kernels"
cp -r kernels "$site/vlm2vec_rt/kernels"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

mode=()
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "no CUDA device: tiny sizes, kernels under the Triton interpreter"
    export TRITON_INTERPRET=1
    mode=(--tiny)
fi
{
    "$PYTHON" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__)'
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || true
    timeout 470 "$PYTHON" bench/bench_kernels.py --gpu "${mode[@]}" --out "$OUT" "$@"
} 2>&1 | tee "$OUT/gpu_check.log"
