#!/usr/bin/env bash
# Installs llama-cpp-python (the real llama.cpp, compiled from its sdist) into .venv for the GGUF export
# tests. The compile takes minutes on 2 cores, so the wheel is built once into a cache folder outside the
# work tree and every later run only installs it (seconds).
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${MATELIKE_WHEEL_CACHE:-$HOME/.cache/matelike-wheels}"
PY="${1:-.venv/bin/python}"  # the interpreter to install into (default: the project's .venv)

if "$PY" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
    exit 0
fi
mkdir -p "$CACHE"
if ! ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
    # GGML_NATIVE=OFF: no -march=native, so the cached wheel runs on any x86-64 with AVX2/FMA/F16C rather
    # than only on the CPU that built it. No llava/mtmd, tests or examples: only libllama is needed.
    echo "building llama-cpp-python $VERSION (a few minutes, once) into $CACHE" >&2
    CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF}" \
    CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
        "$PY" -m pip wheel --quiet --no-deps --no-binary llama-cpp-python \
        "llama-cpp-python==$VERSION" -w "$CACHE"
fi
# Its runtime dependencies (numpy, typing-extensions, diskcache, jinja2) come from the index as usual.
"$PY" -m pip install --quiet "$CACHE"/llama_cpp_python-"$VERSION"-*.whl
