"""BelleVLImageReader: captions through the core cache, documents, retrieval, and a run killed halfway."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from belle_vl_tools import prompts
from belle_vl_tools.backend import image_message
from belle_vl_tools.captions import CaptionCache
from belle_vl_tools.images import image_digest, load_image
from helpers_belle_vl import ScriptedBackend, WordHashEmbedding, draw_picture
from llama_index.core import VectorStoreIndex
from llama_index.core.readers.base import BaseReader
from llama_index.core.schema import ImageDocument, ImageNode

from llama_index.readers.belle_vl import BelleVLImageReader

SHORT = {"max_new_tokens": 8}


def _never_loaded() -> Any:
    raise AssertionError("the model was loaded although every caption was cached")


def test_class_mro() -> None:
    assert BaseReader.__name__ in [cls.__name__ for cls in BelleVLImageReader.__mro__]


def test_documents_hold_the_models_captions(runtime: Any, pictures: dict[str, Path], tmp_path: Path) -> None:
    reader = BelleVLImageReader(runtime, cache=tmp_path / "captions.sqlite", show_progress=False, **SHORT)
    documents = reader.load_data(pictures["red"].parent)
    assert [Path(d.metadata["file_path"]).name for d in documents] == ["blue.png", "green.png", "red.png"]
    for document in documents:
        picture = load_image(document.metadata["file_path"])
        prompt = prompts.describe_prompt("brief", "en")
        expected = runtime.chat(image_message(picture, prompt), temperature=0, **SHORT).text
        assert isinstance(document, ImageDocument)
        assert document.text == expected == document.metadata["caption"]
        assert document.image_path == document.metadata["file_path"]
        assert (document.metadata["width"], document.metadata["height"]) == picture.size
        assert document.metadata["content_hash"] == image_digest(picture)
        assert document.metadata["caption_cached"] is False
        assert "content_hash" not in document.get_content(metadata_mode="embed")
    assert len({d.text for d in documents}) == 3  # three pictures, three different captions


def test_a_second_run_comes_from_the_cache(runtime: Any, pictures: dict[str, Path], tmp_path: Path) -> None:
    cache = tmp_path / "captions.sqlite"
    first = BelleVLImageReader(runtime, cache=cache, show_progress=False, **SHORT).load_data(pictures["red"].parent)
    again = BelleVLImageReader(_never_loaded, model_name=runtime.model_name, cache=cache, show_progress=False)
    second = again.load_data([pictures["red"], pictures["blue"], pictures["green"]])
    assert {d.metadata["file_name"]: d.text for d in second} == {d.metadata["file_name"]: d.text for d in first}
    assert all(d.metadata["caption_cached"] for d in second)


def test_lazy_loading_captions_batch_by_batch(pictures: dict[str, Path]) -> None:
    batches: list[int] = []
    backend = ScriptedBackend(lambda messages: "a picture")
    plain_batch = backend.generate_batch

    def generate_batch(conversations: Sequence[Any], **generation: Any) -> Any:
        batches.append(len(conversations))
        return plain_batch(conversations, **generation)

    backend.generate_batch = generate_batch  # type: ignore[method-assign]
    reader = BelleVLImageReader(backend, batch_size=2, show_progress=False, image_documents=False)
    documents = reader.lazy_load_data(sorted(pictures.values()))
    assert isinstance(documents, types.GeneratorType)
    assert batches == []  # nothing happens before the first document is asked for
    first = next(documents)
    assert batches == [2] and first.metadata["file_name"] == "blue.png"
    rest = list(documents)
    assert batches == [2] and len(backend.calls) == 3 and len(rest) == 2


def test_pictures_that_cannot_be_read_are_skipped(pictures: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    reader = BelleVLImageReader(ScriptedBackend(lambda m: "x"), show_progress=False)
    assert [d.metadata["file_name"] for d in reader.load_data([broken, pictures["red"]])] == ["red.png"]
    strict = BelleVLImageReader(ScriptedBackend(lambda m: "x"), show_progress=False, on_error="raise")
    with pytest.raises(ValueError, match="broken.png"):
        strict.load_data([broken])
    with pytest.raises(FileNotFoundError, match="neither a folder nor a file"):
        reader.load_data(tmp_path / "missing")


def test_retrieval_finds_the_picture_of_a_caption(pictures: dict[str, Path], tmp_path: Path) -> None:
    captions = {
        "red": "a red circle on a white background",
        "blue": "a blue square on a white background",
        "green": "a green circle on a white background",
    }
    cache_path = tmp_path / "captions.sqlite"
    reader = BelleVLImageReader(_never_loaded, model_name="known-captions", cache=cache_path, show_progress=False)
    with CaptionCache(cache_path) as cache:
        for name, caption in captions.items():
            picture = load_image(pictures[name])
            cache.put(image_digest(picture), reader.model_name, reader.prompt, caption, *picture.size)

    documents = reader.load_data(pictures["red"].parent)
    index = VectorStoreIndex.from_documents(documents, embed_model=WordHashEmbedding())
    retriever = index.as_retriever(similarity_top_k=1)
    for name, query in [("blue", "which picture shows a blue square"), ("green", "the green circle")]:
        (hit,) = retriever.retrieve(query)
        assert isinstance(hit.node, ImageNode)
        assert hit.node.metadata["file_path"] == str(pictures[name])
        assert hit.node.image_path == str(pictures[name])
        assert hit.node.get_content() == captions[name]


def test_works_as_a_file_extractor(pictures: dict[str, Path]) -> None:
    from llama_index.core import SimpleDirectoryReader

    reader = BelleVLImageReader(ScriptedBackend(lambda m: "a shape"), show_progress=False)
    documents = SimpleDirectoryReader(input_files=[pictures["red"]], file_extractor={".png": reader}).load_data()
    (document,) = documents
    assert document.text == "a shape"
    assert document.metadata["file_name"] == "red.png" and "creation_date" in document.metadata


# --- a run killed halfway ---------------------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys, time
    from llama_index.readers.belle_vl import BelleVLImageReader
    from belle_vl_tools.backend import ChatResult

    def caption(conversation):
        picture = conversation[0]["content"][0]["image"]
        return "caption " + "-".join(str(v) for v in picture.resize((1, 1)).getpixel((0, 0)))

    class Backend:
        model_name = "crash-test"
        batches = 0

        def chat(self, messages, **generation):
            return ChatResult(caption(messages))

        def generate_batch(self, conversations, **generation):
            Backend.batches += 1
            if Backend.batches == 3:
                print("BLOCKED", flush=True)
                time.sleep(600)  # killed here, in the middle of the third batch
            return [ChatResult(caption(c)) for c in conversations]

    reader = BelleVLImageReader(Backend(), cache=sys.argv[2], batch_size=2, show_progress=False)
    for document in reader.lazy_load_data(sys.argv[1]):
        print("DONE", document.metadata["file_path"], flush=True)
    """
)


def test_a_killed_run_resumes_without_losing_or_redoing_captions(tmp_path: Path) -> None:
    folder = tmp_path / "album"
    folder.mkdir()
    colors = ["red", "blue", "green", "orange", "purple", "black", "gray", "brown", "pink", "teal"]
    for i, color in enumerate(colors):
        draw_picture(color, "circle" if i % 2 else "square", offset=i).save(folder / f"{i:02d}-{color}.png")
    cache_path = tmp_path / "captions.sqlite"
    script = tmp_path / "child.py"
    script.write_text(CHILD)

    child = subprocess.Popen(
        [sys.executable, str(script), str(folder), str(cache_path)], stdout=subprocess.PIPE, text=True
    )
    done: list[str] = []
    try:
        assert child.stdout is not None
        for line in child.stdout:
            if line.startswith("BLOCKED"):
                break
            done.append(line.split(" ", 1)[1].strip())
    finally:
        child.kill()
        child.wait(timeout=60)
    assert child.returncode != 0
    assert len(done) == 4  # two batches of two finished before the kill

    with CaptionCache(cache_path) as cache:
        before = {row.digest: row for row in cache}
    assert len(before) == 4

    captioned: list[str] = []

    def caption(messages: list[Any]) -> str:
        picture = messages[0].images[0]
        captioned.append(image_digest(picture))
        return "caption " + "-".join(str(v) for v in picture.resize((1, 1)).getpixel((0, 0)))

    reader = BelleVLImageReader(
        ScriptedBackend(caption, model_name="crash-test"), cache=cache_path, show_progress=False
    )
    documents = reader.load_data(folder)
    assert len(documents) == len(colors)
    assert len(captioned) == len(colors) - 4 and not set(captioned) & set(before)  # only the unfinished ones
    with CaptionCache(cache_path) as cache:
        after = {row.digest: row for row in cache}
        assert len(cache) == len(colors)  # nothing stored twice
    for digest, row in before.items():
        assert after[digest] == row  # finished captions kept as they were
    assert {d.metadata["content_hash"] for d in documents} == set(after)
    assert [d.metadata["caption_cached"] for d in documents].count(True) == 4
    for document in documents:
        assert document.text == after[document.metadata["content_hash"]].caption
