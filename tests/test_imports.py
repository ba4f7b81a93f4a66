"""The package's import contract: a light top level, lazy Auto registration, and a one-way import graph."""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from pathlib import Path

import pytest

import belle_vl_tools

PACKAGE = Path(belle_vl_tools.__file__).parent

_BLOCK_TORCH = (
    "import sys\n"
    "class _Block:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] in ('torch', 'transformers'):\n"
    "            raise ImportError('blocked for this test: ' + name)\n"
    "sys.meta_path.insert(0, _Block())\n"
)


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_import_belle_vl_tools_imports_neither_torch_nor_transformers():
    out = _run(
        "import sys, belle_vl_tools, belle_vl_tools.messages, belle_vl_tools.tasks, belle_vl_tools.tools\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    assert out.strip() == "[]"


def test_light_modules_work_with_torch_absent():
    out = _run(
        _BLOCK_TORCH + "import belle_vl_tools\n"
        "from belle_vl_tools import ImagePolicy, ChatResult\n"
        "from belle_vl_tools.tasks import get_task\n"
        "print(get_task('ask').prompt(question='What?'))\n"
        "print(belle_vl_tools.register_auto_classes())\n"
    )
    assert out.split() == ["What?", "False"]


def test_every_public_name_resolves_and_the_light_ones_stay_light():
    out = _run(
        _BLOCK_TORCH + "import belle_vl_tools\n"
        "from belle_vl_tools import ImageStore, RemoteBelleVL, load_backend, make_tools\n"
        "print(ImageStore.__name__, RemoteBelleVL.__name__, load_backend.__name__, make_tools.__name__)\n"
    )
    assert out.split() == ["ImageStore", "RemoteBelleVL", "load_backend", "make_tools"]
    heavy = {"BelleVL", "QWenConfig", "QWenLMHeadModel", "QWenModel", "QWenTokenizer", "QWenVLProcessor"}
    heavy |= {"QWenVLImageProcessor"}
    for name in belle_vl_tools.__all__:
        assert getattr(belle_vl_tools, name) is not None, name
    assert heavy <= set(belle_vl_tools.__all__)


@pytest.mark.parametrize(
    "order",
    [
        "import belle_vl_tools\nfrom transformers import AutoModelForCausalLM, AutoConfig, AutoProcessor\n",
        "from transformers import AutoModelForCausalLM, AutoConfig, AutoProcessor\nimport belle_vl_tools\n",
        "import belle_vl_tools, transformers\n"
        "AutoModelForCausalLM, AutoConfig, AutoProcessor = (transformers.AutoModelForCausalLM, "
        "transformers.AutoConfig, transformers.AutoProcessor)\n",
    ],
    ids=["package-first", "transformers-first", "attribute-access"],
)
def test_auto_classes_load_a_checkpoint_after_import_belle_vl_tools(tiny_dir, order):
    out = _run(
        "import warnings\nwarnings.simplefilter('error', UserWarning)\n" + order + f"folder = {str(tiny_dir)!r}\n"
        "print(AutoConfig.from_pretrained(folder).model_type)\n"
        "print(type(AutoModelForCausalLM.from_pretrained(folder)).__name__)\n"
        "print(type(AutoProcessor.from_pretrained(folder)).__name__)\n"
    )
    assert out.split()[-3:] == ["qwen", "QWenLMHeadModel", "QWenVLProcessor"]


def test_pipeline_finds_the_model_after_import_belle_vl_tools(tiny_dir):
    out = _run(
        "import warnings\nwarnings.simplefilter('error', UserWarning)\n"
        "import belle_vl_tools\nfrom transformers import pipeline\n"
        f"print(type(pipeline('text-generation', model={str(tiny_dir)!r}).model).__name__)\n"
    )
    assert out.split()[-1] == "QWenLMHeadModel"


# ---------------------------------------------------------------------------------------------------------------
# The import graph: each module sits on a layer and imports only from its own layer or those below.
# ---------------------------------------------------------------------------------------------------------------

LAYERS: list[set[str]] = [
    # 0: no model code: errors, the total deadline, the message model, the sampling settings, pictures, prompts,
    # boxes, the task registry, config
    {
        "errors",
        "deadline",
        "messages",
        "sampling",
        "images",
        "images.policy",
        "images.sources",
        "images.formats",
        "images.decode",
        "images.data_urls",
        "images.local",
        "images.fetch",
        "images.load",
        "prompts",
        "grounding",
        "tasks",
        "configuration_qwen_vl",
        "checkpoint_checks",
        "demo",
    },
    # 1: the transformers model and tokenizer
    {"modeling_qwen_vl", "tokenization_qwen_vl"},
    # 2: the processor
    {"processing_qwen_vl"},
    # 3: backends: the interface, the local runtime and its engines, the remote client
    {"backend", "runtime", "model_card", "engine", "constrained", "backends", "backends.remote", "finetune.adapters"},
    # 4: tool-call session, caption cache
    {"react", "captions"},
    # 5: agent tools
    {"tools"},
    # 6: apps: translation only
    {
        "cli",
        "server",
        "mcp_server",
        "ui",
        "ui_login",
        "ray",
        "eval",
        "testing",
        "demo_data",
        "demo_heldout",
        "transformers_cli",
        "finetune",
    },
]
#: Imports inside functions that go up on purpose, with the reason.
ALLOWED_UPWARD = {
    # The model card documents ``model.chat(tokenizer, query)`` on the model class: a thin call into the runtime.
    ("modeling_qwen_vl", "model_card"),
    # A chat template's ``tools=`` are rendered in Qwen's ReAct format by the one renderer of tool prompts.
    ("tokenization_qwen_vl", "react"),
}
#: The package's front door and its registration hook sit outside the layers (they re-export and register).
OUTSIDE = {"__init__", "_registration", "__main__"}


def _layer_of(module: str) -> int | None:
    parts = module.split(".")
    for depth in range(len(parts), 0, -1):
        name = ".".join(parts[:depth])
        for index, layer in enumerate(LAYERS):
            if name in layer:
                return index
    return None


def _module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, module: str) -> list[tuple[str, bool]]:
    """(imported module of this package, at module level?) for each import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package_parts = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: list[tuple[str, bool]] = []
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        at_top = id(node) in top_level or _in_type_checking(tree, node)
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[: len(package_parts) - (node.level - 1)]
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
                names = [target] if node.module else [".".join([*base, alias.name]) for alias in node.names]
            elif node.module and node.module.startswith("belle_vl_tools"):
                target = node.module.removeprefix("belle_vl_tools").lstrip(".")
                names = [target] if target else [alias.name for alias in node.names]
            else:
                continue
            found.extend((name, at_top) for name in names if name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("belle_vl_tools."):
                    found.append((alias.name.removeprefix("belle_vl_tools."), at_top))
    return found


def _in_type_checking(tree: ast.Module, node: ast.AST) -> bool:
    for top in tree.body:
        if isinstance(top, ast.If) and "TYPE_CHECKING" in ast.unparse(top.test):
            if any(child is node for child in ast.walk(top)):
                return True
    return False


@functools.cache
def _graph() -> dict[str, list[tuple[str, bool]]]:
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        if module.split(".")[0] in OUTSIDE or module in OUTSIDE:
            continue
        graph[module] = _imports(path, module)
    return graph


def test_every_module_of_the_core_has_a_layer():
    missing = [module for module in _graph() if _layer_of(module) is None]
    assert not missing, f"give these modules a layer in LAYERS: {missing}"


def test_no_module_imports_a_module_above_it():
    upward = []
    for module, imports in _graph().items():
        mine = _layer_of(module)
        for target, _at_top in imports:
            theirs = _layer_of(target)
            if theirs is None or mine is None or theirs <= mine:
                continue
            if (module.split(".")[0], target.split(".")[0]) in ALLOWED_UPWARD:
                continue
            upward.append(f"{module} (layer {mine}) imports {target} (layer {theirs})")
    assert not upward, "\n".join(upward)


def test_module_level_imports_have_no_cycle():
    graph = {
        module: {target for target, at_top in imports if at_top and target in _graph()}
        for module, imports in _graph().items()
    }
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, path: list[str]) -> bool:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                cycle.extend([*path, node, nxt])
                return True
            if state.get(nxt) is None and visit(nxt, [*path, node]):
                return True
        state[node] = 2
        return False

    for node in graph:
        if state.get(node) is None and visit(node, []):
            break
    assert not cycle, " -> ".join(cycle)


def test_the_graph_walker_sees_an_upward_import(tmp_path):
    """The walker itself: a lower module importing a higher one is reported."""
    fake = tmp_path / "images.py"
    fake.write_text("from .runtime import BelleVL\n\ndef f():\n    from . import tools\n", encoding="utf-8")
    imports = _imports(fake, "images")
    assert ("runtime", True) in imports and ("tools", False) in imports
    assert _layer_of("runtime") > _layer_of("images")


def test_python_dash_m_runs_package_modules_through_the_hook():
    """The registration hook wraps loaders of this package's modules; runpy still finds their code."""
    code = (
        "import runpy, sys\n"
        "sys.argv = ['belle-vl', '--help']\n"
        "try:\n"
        "    runpy.run_module('belle_vl_tools.cli', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    print('exit', e.code)\n"
    )
    out = _run(code)
    assert "Usage" in out and "exit 0" in out


def test_the_architecture_docs_draw_the_same_layers():
    """docs/architecture.md's arrow names every module on the layer this test file puts it on."""
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    drawn: dict[int, str] = {}
    layer = None
    for line in doc.split("```")[1].splitlines():
        if "-> layer " in line:
            layer = int(line.split("-> layer ")[1].split()[0])
            drawn[layer] = ""
        if layer is not None:
            drawn[layer] += line
    assert sorted(drawn) == list(range(len(LAYERS)))
    for index, modules in enumerate(LAYERS):
        words = drawn[index].replace(",", " ").replace("(", " ").replace(")", " ").split()
        names = set(words) | {word.split("/")[0] for word in words}  # backends/remote draws backends too
        for module in modules:
            assert module in names or module.split(".")[0] in names, (module, index)
