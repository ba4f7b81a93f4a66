"""Ray for many GPUs and big image collections (the ``[ray]`` extra).

* :func:`build_app` / :func:`run_server`: the OpenAI-compatible server as a Ray Serve deployment with N replicas.
* :func:`caption_dataset`: a Ray Data pipeline that captions an image collection and writes JSONL or Parquet.

Ray is imported when one of these is used, not when this package is imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "build_app": "serve",
    "run_server": "serve",
    "app_builder": "serve",
    "caption_dataset": "data",
    "read_images": "data",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    from .data import caption_dataset, read_images
    from .serve import app_builder, build_app, run_server

__all__ = ["app_builder", "build_app", "caption_dataset", "read_images", "run_server"]
