"""Shared fixtures: one tiny random checkpoint (real Qwen vocabulary) loaded once, and pictures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Belle-VL-layout checkpoint with the real Qwen vocabulary."""
    from belle_vl_tools.testing import write_tiny_checkpoint
    from belle_vl_tools.tokenization_qwen_vl import qwen_vocab_file

    folder = tmp_path_factory.mktemp("checkpoint") / "belle-vl-tiny"
    return write_tiny_checkpoint(folder, seed=0, vocab_file=qwen_vocab_file())


@pytest.fixture(scope="session")
def runtime(tiny_checkpoint: Path) -> Any:
    """The tiny checkpoint loaded once through the core runtime."""
    from belle_vl_tools import BelleVL as Runtime

    return Runtime.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="session")
def llm(runtime: Any) -> Any:
    """The LlamaIndex LLM over the shared runtime, greedy and short."""
    from llama_index.llms.belle_vl import BelleVL

    return BelleVL(backend=runtime, temperature=0, max_new_tokens=8)


@pytest.fixture(scope="session")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small PNG files in one folder: a red circle, a blue square, a green circle."""
    from belle_vl_tools.testing import write_test_pictures

    return write_test_pictures(tmp_path_factory.mktemp("pictures"))
