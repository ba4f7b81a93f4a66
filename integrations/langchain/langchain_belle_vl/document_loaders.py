"""BelleVLImageLoader: a caption per picture of a folder, as LangChain Documents (for RAG over images)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from belle_vl_tools.captions import CaptionCache, caption_images, checkpoint_key, find_images
from belle_vl_tools.images import ImagePolicy
from langchain_core.document_loaders import BaseLoader
from langchain_core.documents import Document

__all__ = ["BelleVLImageLoader"]


class BelleVLImageLoader(BaseLoader):
    """Captions every picture of a folder (or a list of files) with Belle-VL, one Document per picture.

    Captions are kept in the core's SQLite caption cache (``cache``, by default ``.belle-vl-captions.sqlite`` in
    the folder), keyed by the picture's pixels, the model and the prompt: a second run answers from the cache
    without loading the model. Loading is lazy (:meth:`lazy_load` yields each Document as soon as its batch is
    done) and shows a progress bar on a terminal.

    Each Document's ``page_content`` is the caption; ``metadata`` holds ``source`` (the image path),
    ``image_path``, ``width``, ``height``, ``digest``, ``model`` and ``cached``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        model: Any = None,
        *,
        cache: str | os.PathLike[str] | CaptionCache | None | Literal["default"] = "default",
        recursive: bool = True,
        detail: Literal["brief", "detailed"] = "brief",
        language: Literal["en", "zh"] = "en",
        prompt: str | None = None,
        batch_size: int = 8,
        progress: bool = True,
        on_error: Literal["raise", "skip"] = "skip",
        image_policy: ImagePolicy | None = None,
        model_name: str | None = None,
        **generation: Any,
    ) -> None:
        """``path``: a folder (its pictures, sorted; sub-folders too when ``recursive``) or a list of files.
        ``model``: a loaded ``BelleVL`` or other backend, a ``ChatBelleVL``, a checkpoint path (loaded only when
        some picture is not cached), or None for the demo model. ``cache``: a file, a :class:`CaptionCache`, None
        for no cache, or "default". ``model_name``: the model part of the cache key (default:
        :func:`belle_vl_tools.captions.checkpoint_key` of a checkpoint path, else the model's own name). Other
        arguments go to :func:`belle_vl_tools.captions.caption_images`."""
        self.path = path
        self.model = model
        self.recursive = recursive
        self.detail = detail
        self.language = language
        self.prompt = prompt
        self.batch_size = batch_size
        self.progress = progress
        self.on_error = on_error
        self.image_policy = image_policy
        self.model_name = model_name
        self.generation = generation
        if cache == "default":
            if isinstance(path, (str, os.PathLike)) and Path(path).is_dir():
                cache = Path(path) / ".belle-vl-captions.sqlite"
            else:
                cache = None
        self.cache = cache

    def _paths(self) -> list[Path]:
        if isinstance(self.path, (str, os.PathLike)):
            folder = Path(self.path)
            if folder.is_dir():
                return find_images(folder, recursive=self.recursive)
            return [folder]
        return [Path(p) for p in self.path]

    def _name(self) -> str | None:
        if self.model_name:
            return self.model_name
        if isinstance(self.model, str):
            return checkpoint_key(self.model)
        if self.model is None:
            from belle_vl_tools.demo import DEMO_MODEL_NAME

            return DEMO_MODEL_NAME
        if getattr(self.model, "model_label", None):  # a ChatBelleVL
            return str(self.model.model_label)
        return getattr(self.model, "model_name", None)

    def _factory(self) -> Any:
        from .tools import _backend

        return _backend(self.model)

    def lazy_load(self) -> Iterator[Document]:
        """One Document per picture, in path order, as soon as its caption is known."""
        name = self._name()
        backend = self.model if callable(getattr(self.model, "chat", None)) else self._factory
        records = caption_images(
            self._paths(),
            backend,
            cache=self.cache,
            model_name=name,
            prompt=self.prompt,
            detail=self.detail,
            language=self.language,
            batch_size=self.batch_size,
            progress=self.progress,
            on_error=self.on_error,
            image_policy=self.image_policy,
            **self.generation,
        )
        for record in records:
            yield Document(
                page_content=record.caption,
                metadata={
                    "source": record.path,
                    "image_path": record.path,
                    "width": record.width,
                    "height": record.height,
                    "digest": record.digest,
                    "model": name,
                    "cached": record.cached,
                },
            )
