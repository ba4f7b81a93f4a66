"""Backends other than the local runtime: :class:`RemoteBelleVL`, a client of an OpenAI-compatible server.

Importing this package needs httpx only when :class:`RemoteBelleVL` is used (it is loaded on first access).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {"RemoteBelleVL": "remote", "RemoteBackendError": "remote"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    from .remote import RemoteBackendError, RemoteBelleVL

__all__ = ["RemoteBackendError", "RemoteBelleVL"]
