#!/usr/bin/env bash
# The one prepared device run (the device tool copies the working tree, runs this, collects $OUT): the
# Triton kernels, the Embedder, AOTInductor engines, the C++ preprocessing and the end-to-end pipeline on
# the GPU, each step timed and guarded (bench/gpu_check.py, which says what each step measures), writing
# $OUT/gpu_check.json and $OUT/gpu_check.log, in under 9 minutes on an H200. It installs nothing from the
# network: the machine's own python3 has torch and triton; the pinned transformers travels as wheels in .whl/
# (bench/prepare_gpu_wheels.sh, run here first; name .whl in the call's carry) and the C++ extension is
# built there for its Python. The package is put on PYTHONPATH from a private copy laid out as pip would
# (kernels/ inside vlm2vec_rt/), so the working tree is never written to.
# Without a GPU the same sequence runs on tiny sizes (kernels under the Triton interpreter): CI runs it.
#
#   device:  bash bench/gpu_check.sh                  (rerun some steps: bash bench/gpu_check.sh --only aoti_fp16)
#   here:    OUT=/tmp/gpu_check PYTHON=.venv/bin/python bash bench/gpu_check.sh
set -uo pipefail
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
# a CUDA probe that cannot initialise the driver in the parent, whose forked steps use the GPU
export PYTORCH_NVML_BASED_CUDA_CHECK=1

{
    date -u +"start %Y-%m-%dT%H:%M:%SZ"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    # 535 s: the driver keeps its own 525 s budget; this only stops a run that hangs outside any step
    timeout -k 5 535 "$PYTHON" bench/gpu_check.py --out "$OUT" --site "$site" "$@"
    echo "gpu_check.py exit $?"
} 2>&1 | tee "$OUT/gpu_check.log"
