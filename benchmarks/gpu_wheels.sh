#!/usr/bin/env bash
# Wheels that benchmarks/gpu_check.py needs on the lent GPU machine beyond its image (which has torch,
# transformers, accelerate, peft; no deepspeed, and nothing can be fetched there). Run HERE, then carry the folder:
#   bash benchmarks/gpu_wheels.sh            # writes .gpu_wheels/ (ignored by git)
#   device run, carry [".gpu_wheels"]:  pip install --no-index --find-links .gpu_wheels deepspeed && \
#       PYTHONPATH=. python -m benchmarks.gpu_check --out "$OUT"
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p .gpu_wheels
# deepspeed ships an sdist only: build a pure-Python wheel here (ops are JIT-built at run time)
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .gpu_wheels deepspeed==0.19.8
# its dependencies the image lacks, for the GPU machine's Python 3.12 on x86_64
"$PY" -m pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --implementation cp -d .gpu_wheels hjson "pydantic>=2" annotated-types \
    typing-inspection
ls -la .gpu_wheels
