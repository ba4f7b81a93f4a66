"""Registration of the model's classes with transformers' Auto classes, done when transformers' Auto machinery is
first imported rather than at ``import belle_vl_tools``.

``import belle_vl_tools`` stays free of torch and transformers: it installs :func:`install_import_hook`, which
registers the classes as soon as one of transformers' ``models.auto`` modules has been imported and the import that
pulled it in is complete (so
``AutoModelForCausalLM.from_pretrained(folder)``, ``AutoProcessor``, ``pipeline(...)`` all find model_type
"qwen"), or at once when transformers' Auto modules are already loaded.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import inspect
import sys
import threading
import warnings
from types import ModuleType
from typing import Any

_AUTO_MODULES = frozenset(
    f"transformers.models.auto.{name}"
    for name in (
        "configuration_auto",
        "modeling_auto",
        "tokenization_auto",
        "processing_auto",
        "image_processing_auto",
        "auto_factory",
    )
)

_lock = threading.RLock()
_registered = False


def register_auto_classes() -> bool:
    """Register config, models, tokenizer and processors with transformers' Auto classes (idempotent).

    Returns False when torch or transformers is not installed.
    """
    global _registered
    with _lock:
        if _registered:
            return True
        try:
            import torch  # noqa: F401
            import transformers
        except ImportError:
            return False
        from .configuration_qwen_vl import QWenConfig
        from .modeling_qwen_vl import QWenLMHeadModel
        from .processing_qwen_vl import QWenVLImageProcessor, QWenVLProcessor
        from .tokenization_qwen_vl import QWenTokenizer

        _registered = True  # set first: the imports below may re-enter through the import hook
        transformers.AutoConfig.register("qwen", QWenConfig, exist_ok=True)
        for auto in ("AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoModelForVision2Seq"):
            if hasattr(transformers, auto):
                getattr(transformers, auto).register(QWenConfig, QWenLMHeadModel, exist_ok=True)
        transformers.AutoTokenizer.register(QWenConfig, tokenizer_class=QWenTokenizer, exist_ok=True)
        transformers.AutoProcessor.register(QWenConfig, QWenVLProcessor, exist_ok=True)
        image_auto = transformers.AutoImageProcessor
        if "image_processor_classes" in inspect.signature(image_auto.register).parameters:
            image_auto.register(QWenConfig, image_processor_classes={"pil": QWenVLImageProcessor}, exist_ok=True)
        else:  # transformers before the per-backend registry
            image_auto.register(QWenConfig, slow_image_processor_class=QWenVLImageProcessor, exist_ok=True)
        _register_architecture_name(transformers, QWenLMHeadModel)
        return True


def _register_architecture_name(transformers: ModuleType, model_class: type) -> None:
    """Make the class findable by its ``architectures`` name, as ``transformers serve`` looks it up
    (``getattr(transformers, config.architectures[0])``), and known as an image-text-to-text model by name, as
    serve's modality check and the pipelines' model check read the name tables.

    transformers replaces its lazy top-level module once while loading (``processing_utils`` executes its
    ``__init__`` again), so a module imported before that holds the earlier object: the name is set on every
    ``transformers`` module object that a loaded ``transformers.*`` module refers to.
    Only the name tables gain an entry: the Auto mappings skip a model type that has no entry in
    ``CONFIG_MAPPING_NAMES`` (ours is registered, not named there), so nothing tries to import a
    ``transformers.models.qwen`` module.
    """
    name = model_class.__name__
    tops = {id(transformers): transformers}
    for module_name, module in list(sys.modules.items()):
        if module_name == "transformers" or module_name.startswith("transformers."):
            top = vars(module).get("transformers") if module_name != "transformers" else module
            if isinstance(top, ModuleType) and top.__name__ == "transformers":
                tops[id(top)] = top
    for top in tops.values():
        if getattr(top, name, model_class) is model_class:  # a class of that name in transformers stays
            setattr(top, name, model_class)
    try:
        from transformers.models.auto import configuration_auto, modeling_auto
    except ImportError:
        return
    if "qwen" in configuration_auto.CONFIG_MAPPING_NAMES:  # transformers named the type itself: leave its tables
        return
    for table in ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"):
        names = getattr(modeling_auto, table, None)
        if names is not None:
            names.setdefault("qwen", name)


def _register_after_import() -> None:
    try:
        register_auto_classes()
    except Exception as exc:  # never break the user's own import of transformers
        warnings.warn(f"belle_vl_tools could not register its classes with transformers: {exc}", stacklevel=2)


def _watched(name: str) -> bool:
    # "transformers" itself too: its __init__ replaces its module in sys.modules with a lazy one at its end, so
    # registering while it runs would set names on the module that is then thrown away
    return name == "transformers" or name.startswith(("transformers.", "belle_vl_tools."))


def _others_initializing(current: str) -> bool:
    """Whether a module of transformers or of this package other than ``current`` is still being imported:
    registering then would import it half-done."""
    for name, module in list(sys.modules.items()):
        if name != current and _watched(name) and getattr(getattr(module, "__spec__", None), "_initializing", False):
            return True
    return False


def _auto_loaded() -> bool:
    return any(name in sys.modules for name in _AUTO_MODULES)


class _Loader(importlib.abc.Loader):
    """Runs the real loader, then registers once transformers' Auto machinery is loaded and no module of
    transformers or of this package is half-imported."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def __getattr__(self, name: str) -> Any:  # get_code, get_source, is_package, ... (runpy and inspect use them)
        return getattr(self._loader, name)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        if not _registered and _auto_loaded() and not _others_initializing(module.__name__):
            _register_after_import()


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if _registered or not _watched(name):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


def install_import_hook() -> None:
    """Register now if transformers' Auto modules are loaded already, else when they first are."""
    if _auto_loaded():
        _register_after_import()
        return
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
