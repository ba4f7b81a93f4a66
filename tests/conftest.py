"""Shared fixtures: tiny checkpoints of the published layout (written once per session) and small pictures."""

from __future__ import annotations

from pathlib import Path

import pytest

from belle_vl_tools.testing import write_test_pictures


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Belle-VL-layout checkpoint (single model.safetensors, real Qwen vocabulary)."""
    from belle_vl_tools.testing import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "belle-vl-tiny", seed=0)


@pytest.fixture(scope="session")
def runtime(tiny_dir: Path):
    """The tiny checkpoint loaded once through the public API."""
    from belle_vl_tools import BelleVL

    return BelleVL.from_pretrained(tiny_dir, dtype="float32")


@pytest.fixture(scope="session")
def processor(runtime):
    return runtime.processor


@pytest.fixture(scope="session")
def tokenizer(runtime):
    return runtime.tokenizer


@pytest.fixture(scope="session")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A few small PNG files: red circle, blue square, green circle."""
    return write_test_pictures(tmp_path_factory.mktemp("pictures"))
