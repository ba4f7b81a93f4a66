"""belle-vl-tools: Belle-VL (Qwen-VL architecture) on current transformers, as a chat model and as agent tools.

Importing the package imports neither torch nor transformers. It registers the model's classes with
transformers' Auto classes as soon as transformers' Auto machinery is imported (or at once if it already is), so
``AutoConfig``, ``AutoModelForCausalLM``, ``AutoModelForImageTextToText``, ``AutoTokenizer``, ``AutoProcessor`` and
``pipeline`` load published checkpoints without ``trust_remote_code``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._registration import install_import_hook, register_auto_classes
from .backend import Backend, ChatResult, LocateResult, StreamChunk, Usage, VisionTasks, load_backend
from .errors import (
    BelleVLError,
    CheckpointError,
    ContextLengthError,
    ImageAccessDeniedError,
    ImageDecodeError,
    ImageError,
    ImageFetchError,
    ImageNotFoundError,
    ImageTooLargeError,
    InvalidImageDataError,
    PromptError,
    UnsupportedImageError,
)
from .images import ImagePolicy, load_image

__version__ = "0.1.0"

_LAZY = {
    "BelleVL": "runtime",
    "QWenConfig": "configuration_qwen_vl",
    "QWenLMHeadModel": "modeling_qwen_vl",
    "QWenModel": "modeling_qwen_vl",
    "QWenTokenizer": "tokenization_qwen_vl",
    "QWenVLProcessor": "processing_qwen_vl",
    "QWenVLImageProcessor": "processing_qwen_vl",
    "Box": "grounding",
    "draw_boxes": "grounding",
    "parse_boxes": "grounding",
    "RemoteBelleVL": "backends.remote",
    "ImageStore": "tools",
    "make_tools": "tools",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


install_import_hook()

if TYPE_CHECKING:
    from .backends.remote import RemoteBelleVL
    from .configuration_qwen_vl import QWenConfig
    from .grounding import Box, draw_boxes, parse_boxes
    from .modeling_qwen_vl import QWenLMHeadModel, QWenModel
    from .processing_qwen_vl import QWenVLImageProcessor, QWenVLProcessor
    from .runtime import BelleVL
    from .tokenization_qwen_vl import QWenTokenizer
    from .tools import ImageStore, make_tools

__all__ = [
    "Backend",
    "BelleVL",
    "BelleVLError",
    "Box",
    "ChatResult",
    "CheckpointError",
    "ContextLengthError",
    "ImageAccessDeniedError",
    "ImageDecodeError",
    "ImageError",
    "ImageFetchError",
    "ImageNotFoundError",
    "ImagePolicy",
    "ImageStore",
    "ImageTooLargeError",
    "InvalidImageDataError",
    "LocateResult",
    "PromptError",
    "QWenConfig",
    "QWenLMHeadModel",
    "QWenModel",
    "QWenTokenizer",
    "QWenVLImageProcessor",
    "QWenVLProcessor",
    "RemoteBelleVL",
    "StreamChunk",
    "UnsupportedImageError",
    "Usage",
    "VisionTasks",
    "draw_boxes",
    "load_backend",
    "load_image",
    "make_tools",
    "parse_boxes",
    "register_auto_classes",
]
