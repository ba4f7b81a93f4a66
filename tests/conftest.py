"""Shared fixtures: tiny checkpoints of the published layout (written once per session) and small pictures."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image, ImageDraw


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Belle-VL-layout checkpoint (single model.safetensors, real Qwen vocabulary)."""
    from belle_vl_tools.testing import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "belle-vl-tiny", seed=0)


@pytest.fixture(scope="session")
def runtime(tiny_dir: Path):
    """The tiny checkpoint loaded once through the public API."""
    from belle_vl_tools import BelleVL

    return BelleVL.from_pretrained(tiny_dir)


@pytest.fixture(scope="session")
def processor(runtime):
    return runtime.processor


@pytest.fixture(scope="session")
def tokenizer(runtime):
    return runtime.tokenizer


def _picture(color: str, shape: str = "circle") -> Image.Image:
    image = Image.new("RGB", (96, 80), "white")
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse((20, 10, 76, 66), fill=color)
    else:
        draw.rectangle((10, 10, 60, 50), fill=color)
    return image


@pytest.fixture(scope="session")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A few small PNG files: red circle, blue square, green circle."""
    folder = tmp_path_factory.mktemp("pictures")
    paths = {}
    for name, color, shape in [("red", "red", "circle"), ("blue", "blue", "square"), ("green", "green", "circle")]:
        path = folder / f"{name}.png"
        _picture(color, shape).save(path)
        paths[name] = path
    return paths
