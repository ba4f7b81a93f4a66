"""The shipped demo model: a tiny Belle-VL-architecture checkpoint trained on synthetic pictures.

It lives in ``belle_vl_tools/demo/model/`` (published layout: config.json, generation_config.json,
tokenizer_config.json, qwen.tiktoken, model.safetensors) and is the default model wherever none is named.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "model"
DEMO_MODEL_NAME = "belle-vl-demo"


def default_model_path() -> Path:
    """The folder of the shipped demo checkpoint."""
    if not (DEMO_MODEL_DIR / "config.json").is_file() or not (DEMO_MODEL_DIR / "model.safetensors").is_file():
        raise CheckpointError(
            f"The demo model is missing from {DEMO_MODEL_DIR}: reinstall belle-vl-tools, or name a checkpoint "
            "folder or Hub id with --model / from_pretrained(...)."
        )
    return DEMO_MODEL_DIR


__all__ = ["DEMO_MODEL_DIR", "DEMO_MODEL_NAME", "default_model_path"]
