#!/usr/bin/env bash
# Wheels for a GPU machine that has PyTorch, transformers' dependencies and peft but no
# DeepSpeed and nothing to fetch them with (an offline image with Python 3.12): written to
# .whl/ (git-ignored), installed there by bench/gpu_checks.sh when it finds them. Pins the
# versions this repository is tested with; run here, where PyPI is reachable.
#   bash bench/gpu_wheels.sh [PYTHON_VERSION]      # default 3.12
set -euo pipefail
cd "$(dirname "$0")/.."
pyver=${1:-3.12}
py=${PYTHON:-.venv/bin/python}
mkdir -p .whl
rm -f .whl/*.whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    platforms+=(--platform "$p")
done
# Binary and pure-Python wheels for that interpreter: what DeepSpeed and transformers 5.24 need
# beyond such an image (hjson, pydantic and its core), and transformers itself at our version.
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    "${platforms[@]}" -d .whl \
    transformers==5.24.0 hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 \
    annotated-types==0.8.0 typing-inspection==0.4.5
# DeepSpeed ships as a source distribution: build its pure-Python wheel (ops compile on first use).
DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
ls -l .whl
du -sh .whl
