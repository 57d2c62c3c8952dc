#!/usr/bin/env bash
# The wheels bench/gpu_check.sh installs on the GPU machine, fetched here into .whl/ (git-ignored): that
# machine has no network, Python 3.12 on x86-64, torch and triton but an older transformers than the one
# the package is written against (pyproject.toml's pin). Only what its own packages do not satisfy travels:
#   transformers  the pinned version (the package uses image processors and helpers the older one lacks);
#   regex         transformers needs >= 2025.10.22 and the machine's version is not on record.
# Its other needs (huggingface-hub, tokenizers, safetensors, numpy, packaging, pyyaml, tqdm, typer) are
# on the machine at versions that satisfy them; gpu_check.py checks that there, before anything runs.
# Prints each wheel's requirements (a new pin may need more) and the size of what travels: the working
# tree and .whl/ together must stay under 64 MiB.
#
#   bash bench/prepare_gpu_wheels.sh            (PYTHON=... picks the pip; default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
dest=.whl
transformers_pin="$(grep -o '"transformers==[^"]*"' pyproject.toml | tr -d '"')"
wheels=("${transformers_pin:-transformers==5.24.0}" "regex==2026.11.19")

rm -rf "$dest"
mkdir -p "$dest"
# the device README's recipe: binary wheels for CPython 3.12 on any manylinux x86-64 the machine accepts
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" "${wheels[@]}"

for whl in "$dest"/*.whl; do
    echo "== $(basename "$whl") ($(du -k "$whl" | cut -f1) KiB) requires:"
    unzip -p "$whl" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' | sed 's/^/    /' || true
done
wheels_kib=$(du -sk "$dest" | cut -f1)
# what the device tool sends: tracked files and untracked ones git does not ignore, plus the carried .whl
tree_kib=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | du -ck --files0-from=- 2>/dev/null \
    | tail -1 | cut -f1)
echo "wheels: ${wheels_kib} KiB in $dest/; working tree: ${tree_kib} KiB;" \
    "together $(((wheels_kib + tree_kib) / 1024)) MiB of the 64 MiB a device call may carry"
if [ $((wheels_kib + tree_kib)) -gt $((56 * 1024)) ]; then
    echo "WARNING: within 8 MiB of the 64 MiB limit" >&2
fi
