"""BelleVLImageLoader over a folder: one Document per picture, captions from the cache on the second run."""

from __future__ import annotations

import shutil

from langchain_belle_vl import BelleVLImageLoader


def test_loader_captions_and_caches(tiny_model, pictures, tmp_path) -> None:
    folder = tmp_path / "album"
    folder.mkdir()
    for path in pictures.values():
        shutil.copy(path, folder / path.name)
    (folder / "notes.txt").write_text("not a picture")
    loader = BelleVLImageLoader(folder, tiny_model, progress=False, max_new_tokens=6)
    first = list(loader.lazy_load())
    assert [doc.metadata["image_path"] for doc in first] == [str(folder / "blue.png"), str(folder / "red.png")]
    assert all(doc.metadata["cached"] is False and doc.page_content for doc in first)
    assert first[0].page_content != first[1].page_content
    assert first[0].metadata["width"] == 96 and first[0].metadata["source"] == first[0].metadata["image_path"]

    class Refuse:
        model_name = tiny_model.model_name

        def chat(self, *args, **kwargs):
            raise AssertionError("a cached run must not call the model")

    second = BelleVLImageLoader(folder, Refuse(), progress=False).load()
    assert [doc.page_content for doc in second] == [doc.page_content for doc in first]
    assert all(doc.metadata["cached"] for doc in second)
