"""A LlamaIndex reader that captions pictures with Belle-VL, so an image collection can be searched by text.

Captions go through the core caption cache (:mod:`belle_vl_tools.captions`): pictures are keyed by their pixels,
the model and the prompt; each finished batch is committed at once, so a second run over the same pictures is
answered from the cache without loading the model, and a run that was killed resumes without redoing or losing
any finished caption.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from belle_vl_tools import prompts
from belle_vl_tools.backend import Backend
from belle_vl_tools.captions import (
    IMAGE_SUFFIXES,
    CaptionCache,
    CaptionRecord,
    caption_images,
    checkpoint_key,
    find_images,
)
from belle_vl_tools.errors import ImageNotFoundError
from belle_vl_tools.images import ImagePolicy
from llama_index.core.readers.base import BaseReader
from llama_index.core.schema import Document, ImageDocument

__all__ = ["BelleVLImageReader", "checkpoint_key"]

ModelArg = Any  # a core backend, a BelleVL LLM, a checkpoint folder or Hub id, or a callable returning a backend

#: Metadata keys kept out of the text that is embedded (they would only add noise to the vectors).
_NOT_EMBEDDED = [
    "caption",
    "file_path",
    "width",
    "height",
    "content_hash",
    "caption_model",
    "caption_prompt",
    "caption_cached",
]
#: Metadata keys kept out of what an LLM reads with the caption.
_NOT_FOR_LLM = ["caption", "content_hash", "caption_model", "caption_prompt", "caption_cached"]


def _backend_of(model: ModelArg) -> Any:
    backend = getattr(model, "backend", None)  # the BelleVL LLM of llama_index.llms.belle_vl
    return backend if isinstance(backend, Backend) else model


class BelleVLImageReader(BaseReader):
    """Captions pictures with Belle-VL into documents: the caption is the text; the metadata holds the caption,
    the picture's path, name, size in pixels, content hash and the captioning model (only the file name joins
    the caption in the embedded text).

    Args:
        model: A core backend (a loaded :class:`belle_vl_tools.BelleVL` or a remote client), the ``BelleVL`` LLM
            of ``llama_index.llms.belle_vl``, a checkpoint folder or Hub id (loaded only when a picture is not in
            the cache), or a callable returning a backend (then give ``model_name``).
        cache: The caption cache: a :class:`~belle_vl_tools.captions.CaptionCache`, the path of its SQLite file,
            or None (no cache: every run captions every picture).
        model_name: The model part of the cache key. Default: :func:`~belle_vl_tools.captions.checkpoint_key`
            of a checkpoint folder, or the backend's ``model_name``.
        prompt: The captioning prompt; default: the core's describe prompt for ``detail`` and ``language``.
        detail: "brief" or "detailed" captions.
        language: "en" or "zh".
        batch_size: Pictures captioned together (each finished batch is written to the cache at once).
        show_progress: A progress bar on stderr while captioning (shown when stderr is a terminal).
        recursive: Whether folders are searched below their top level.
        on_error: A picture that cannot be read is skipped with a warning ("skip") or raises ("raise").
        image_policy: What may be read; default :meth:`ImagePolicy.trusted` (the caller names the files).
        image_documents: ``ImageDocument``s (they become ``ImageNode``s that keep the picture's path, for
            multimodal query engines) or plain ``Document``s.
        load_kwargs: Arguments of ``BelleVL.from_pretrained`` when ``model`` is a checkpoint (device, dtype, ...).
        generation: Generation arguments for captioning (greedy unless ``temperature`` is given).
    """

    def __init__(
        self,
        model: ModelArg,
        *,
        cache: CaptionCache | str | os.PathLike[str] | None = None,
        model_name: str | None = None,
        prompt: str | None = None,
        detail: prompts.Detail = "brief",
        language: prompts.Language = "en",
        batch_size: int = 8,
        show_progress: bool = True,
        recursive: bool = True,
        on_error: Literal["raise", "skip"] = "skip",
        image_policy: ImagePolicy | None = None,
        image_documents: bool = True,
        load_kwargs: dict[str, Any] | None = None,
        **generation: Any,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}.")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip'; got {on_error!r}.")
        if model is None:
            raise ValueError("Give model=: a loaded backend, a BelleVL LLM, a checkpoint folder or a Hub id.")
        if isinstance(model, (str, os.PathLike)):
            checkpoint = os.fspath(model)
            options = dict(load_kwargs or {})

            def load() -> Any:
                from belle_vl_tools.runtime import BelleVL as Runtime

                return Runtime.from_pretrained(checkpoint, **options)

            self._backend: Any = load
            self.model_name = model_name or checkpoint_key(checkpoint)
        else:
            self._backend = _backend_of(model)
            name = model_name or getattr(self._backend, "model_name", None)
            if not name:
                raise ValueError("Pass model_name= (the model part of the cache key) when model is a factory.")
            self.model_name = str(name)
        self.prompt = prompt if prompt is not None else prompts.describe_prompt(detail, language)
        self.cache = cache
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.recursive = recursive
        self.on_error = on_error
        self.image_policy = image_policy or ImagePolicy.trusted()
        self.image_documents = image_documents
        self.generation = generation

    # --- finding pictures --------------------------------------------------------------------------------------------
    def _paths(self, source: Any) -> list[Path]:
        if isinstance(source, (str, os.PathLike)):
            sources: Sequence[Any] = [source]
        elif isinstance(source, Iterable):
            sources = list(source)
        else:
            raise TypeError(f"Give a folder, a picture file or a list of them, not {type(source).__name__}.")
        paths: list[Path] = []
        for item in sources:
            path = Path(os.fspath(item)).expanduser()
            if path.is_dir():
                paths.extend(find_images(path, recursive=self.recursive))
            elif path.is_file():
                paths.append(path)
            else:
                raise ImageNotFoundError(
                    f"{str(path)!r} is neither a folder nor a file: name a folder of pictures or picture files "
                    f"(endings {', '.join(sorted(IMAGE_SUFFIXES))})."
                )
        return paths

    # --- loading ----------------------------------------------------------------------------------------------------
    def lazy_load_data(
        self,
        source: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
        extra_info: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Iterator[Document]:
        """Documents for the pictures of ``source`` (a folder, a picture file, or a list of folders and files), in
        order, as their captions become ready (cached ones at once). ``extra_info`` joins every document's
        metadata (``SimpleDirectoryReader`` passes the file's metadata there when this reader is a file
        extractor)."""
        if kwargs.get("fs") is not None:
            raise ValueError("BelleVLImageReader reads local files only: copy remote pictures to a folder first.")
        paths = self._paths(source)
        records = caption_images(
            paths,
            self._backend,
            cache=self.cache,
            model_name=self.model_name,
            prompt=self.prompt,
            batch_size=self.batch_size,
            progress=self.show_progress,
            on_error=self.on_error,
            image_policy=self.image_policy,
            **self.generation,
        )
        for record in records:
            yield self._document(record, extra_info)

    def _document(self, record: CaptionRecord, extra_info: dict[str, Any] | None) -> Document:
        path = Path(record.path)
        metadata: dict[str, Any] = {
            **(extra_info or {}),
            "caption": record.caption,
            "file_path": str(path),
            "file_name": path.name,
            "width": record.width,
            "height": record.height,
            "content_hash": record.digest,
            "caption_model": self.model_name,
            "caption_cached": record.cached,
        }
        options: dict[str, Any] = {
            "text": record.caption,
            "metadata": metadata,
            "id_": f"{path}#{record.digest[:16]}",
            "excluded_embed_metadata_keys": list(_NOT_EMBEDDED),
            "excluded_llm_metadata_keys": list(_NOT_FOR_LLM),
        }
        if self.image_documents:
            return ImageDocument(image_path=str(path), **options)
        return Document(**options)

    def load_data(
        self,
        source: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
        extra_info: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> list[Document]:
        """All documents of :meth:`lazy_load_data` as a list."""
        return list(self.lazy_load_data(source, extra_info, **kwargs))
