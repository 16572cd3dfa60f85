#!/usr/bin/env bash
# Installs the peer engines that benchmarks/peers/run.py compares tokenmill against, into the current Python
# environment, and converts the bundled SmolLM2-135M-Instruct for CTranslate2. Not run in CI.
#
#   bash benchmarks/peers/setup.sh            # ~5-10 minutes on 2 cores, most of it building llama.cpp
#
# - ctranslate2: prebuilt CPU wheel from PyPI.
# - llama-cpp-python: built from the PyPI source distribution (llama.cpp compiled for this CPU: GGML_NATIVE).
# - transformers: already a test dependency of tokenmill; checked, not installed.
# Every install uses --no-deps and names the few dependencies it needs, so the installed torch (the CPU build)
# is never replaced or upgraded. The script checks that at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."  # the repository root: run.py and models.py import as benchmarks.peers.*

PYTHON="${PYTHON:-python}"
CT2_VERSION="${CT2_VERSION:-4.8.5}"
LLAMA_CPP_VERSION="${LLAMA_CPP_VERSION:-0.3.36}"
JOBS="${JOBS:-$(nproc)}"

torch_before="$("$PYTHON" -c 'import torch; print(torch.__version__)')"
echo "== torch before: $torch_before"

echo "== ctranslate2 $CT2_VERSION (prebuilt wheel)"
"$PYTHON" -m pip install --no-deps "ctranslate2==$CT2_VERSION"
# ctranslate2's own dependencies (numpy and setuptools are already there).
"$PYTHON" -m pip install --no-deps pyyaml

echo "== llama-cpp-python $LLAMA_CPP_VERSION (built from source, -j$JOBS)"
start=$(date +%s)
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DGGML_BLAS=OFF}" CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
    "$PYTHON" -m pip install --no-deps --no-binary llama-cpp-python --no-cache-dir "llama-cpp-python==$LLAMA_CPP_VERSION"
# llama-cpp-python's own dependencies (numpy, jinja2, typing-extensions are already there).
"$PYTHON" -m pip install --no-deps diskcache
echo "== llama-cpp-python built in $(( $(date +%s) - start )) s"

echo "== converting SmolLM2-135M-Instruct to CTranslate2 format"
"$PYTHON" - <<'PY'
from benchmarks.peers.models import ct2_model_dir, hf_model_dir, convert_ct2

hf_dir = hf_model_dir()
out = ct2_model_dir()
convert_ct2(hf_dir, out)
print(f"HF-style directory: {hf_dir}\nCTranslate2 model:  {out}")
PY

torch_after="$("$PYTHON" -c 'import torch; print(torch.__version__)')"
if [[ "$torch_after" != "$torch_before" ]]; then
    echo "ERROR: torch changed from $torch_before to $torch_after" >&2
    exit 1
fi
"$PYTHON" -c 'import ctranslate2, llama_cpp, transformers; print("ctranslate2", ctranslate2.__version__,
"| llama-cpp-python", llama_cpp.__version__, "| transformers", transformers.__version__)'
echo "== done (torch $torch_after untouched)"
