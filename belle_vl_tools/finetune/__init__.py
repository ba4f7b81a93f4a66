"""Fine-tuning Belle-VL / Qwen-VL with LoRA (QLoRA on a GPU): data, labels, training, adapters.

Light to import (the ``belle-vl`` command imports :mod:`.command` at start): the names below load their modules on
first use; :mod:`.data` needs no torch, :func:`finetune` and :func:`merge_adapter` import torch, PEFT and TRL.
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    "IGNORE_INDEX": "data",
    "BadRecord": "data",
    "Example": "data",
    "FinetuneData": "data",
    "FinetuneDataError": "data",
    "label_ids": "data",
    "load_data": "data",
    "FinetuneError": "train",
    "FinetuneResult": "train",
    "finetune": "train",
    "merge_adapter": "train",
    "apply_adapter": "adapters",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
