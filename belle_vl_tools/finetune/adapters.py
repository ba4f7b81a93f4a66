"""Loading a LoRA adapter (a PEFT adapter folder, as ``belle-vl finetune`` writes) onto a loaded base model."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def stored_dtype(checkpoint: str | Path) -> str | None:
    """The precision a checkpoint folder's floating-point weights are stored in: read from its safetensors
    files' headers (config.json's ``torch_dtype`` may say otherwise), else that ``torch_dtype``; None if unknown."""
    folder = Path(checkpoint)
    files = sorted(folder.glob("*.safetensors"))
    if files:
        try:
            from safetensors import safe_open

            with safe_open(str(files[0]), framework="pt") as handle:
                for key in handle.keys():
                    name = _SAFETENSORS_DTYPES.get(handle.get_slice(key).get_dtype())
                    if name is not None:
                        return name
        except (ImportError, OSError, ValueError):
            pass
    config = folder / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text(encoding="utf-8"))
    value = data.get("torch_dtype") or data.get("dtype")
    return value if isinstance(value, str) else None


def apply_adapter(model: Any, adapter: str | os.PathLike[str], *, precision: str | None = None) -> Any:
    """``model`` with the LoRA ``adapter`` merged into its weights (so every runtime path, caches and compiled
    decoding included, runs it at the base's speed).

    ``precision`` (the base checkpoint's stored precision, e.g. "bfloat16") rounds the merged layers to it, so a
    base + adapter loaded in float32 has exactly the weights of the merged checkpoint
    :func:`~belle_vl_tools.finetune.merge_adapter` writes in that precision (and answers the same). Raises
    :class:`CheckpointError` for a folder that is not a PEFT adapter or one made for another architecture or size.
    """
    folder = Path(adapter).expanduser()
    if not (folder / "adapter_config.json").is_file():
        raise CheckpointError(
            f"adapter {adapter}: no adapter_config.json there; name the folder `belle-vl finetune --out` wrote "
            "(adapter_config.json, adapter_model.safetensors)."
        )
    try:
        import torch
        from peft import PeftModel
    except ImportError as exc:
        raise CheckpointError(
            f"Loading an adapter needs peft ({exc}): pip install 'belle-vl-tools[finetune]'."
        ) from None
    try:
        wrapped = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
        adapted = [  # LoRA layers, and whole modules the adapter trained (modules_to_save: wte, lm_head)
            name
            for name, module in wrapped.base_model.model.named_modules()
            if hasattr(module, "lora_A") or hasattr(module, "modules_to_save")
        ]
        merged = wrapped.merge_and_unload()
    except (ValueError, RuntimeError, KeyError) as exc:
        detail = " ".join(str(exc).split())[:300]
        raise CheckpointError(
            f"adapter {adapter} does not fit this model ({type(exc).__name__}: {detail}); use the base checkpoint it "
            "was trained on."
        ) from None
    target = getattr(torch, precision, None) if precision else None
    if isinstance(target, torch.dtype) and target.is_floating_point:
        with torch.no_grad():
            for name in adapted:
                for weight in merged.get_submodule(name).parameters():
                    if weight.dtype.is_floating_point and weight.dtype.itemsize > target.itemsize:
                        weight.copy_(weight.to(target).to(weight.dtype))
    return merged
