"""Helpers for the tests: pictures, a scripted backend and a small deterministic embedding."""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Iterator
from typing import Any

from belle_vl_tools.backend import StreamChunk, Usage
from belle_vl_tools.messages import Message
from belle_vl_tools.testing import ScriptedBackend as CoreScriptedBackend
from llama_index.core.embeddings import BaseEmbedding
from PIL import Image, ImageDraw


def draw_picture(color: str, shape: str, size: tuple[int, int] = (96, 80), offset: int = 0) -> Image.Image:
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    box = (10 + offset, 10, 60 + offset, 60)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    else:
        draw.rectangle(box, fill=color)
    return image


class ScriptedBackend(CoreScriptedBackend):
    """The shared scripted backend, its replies a function of the (parsed) messages; streams come word by word."""

    def __init__(self, reply: Callable[[list[Message]], str], model_name: str = "scripted") -> None:
        super().__init__(reply, model_name=model_name)

    def stream(self, messages: Any, **generation: Any) -> Iterator[StreamChunk]:
        text = "".join(chunk.delta for chunk in super().stream(messages, **generation))
        usage = Usage(10, max(1, len(text.split())))
        pieces = re.findall(r"\S*\s*", text)
        for piece in pieces[:-1]:
            yield StreamChunk(piece)
        yield StreamChunk(pieces[-1] if pieces else "", "stop", usage)


def last_text(messages: list[Message]) -> str:
    """All text of a core conversation, joined (to script replies on)."""
    return "\n".join(message.text for message in messages)


class WordHashEmbedding(BaseEmbedding):
    """A deterministic bag-of-words embedding (words hashed into a fixed number of buckets): texts that share
    words are close. Enough to check retrieval without a neural model."""

    dimensions: int = 512

    @classmethod
    def class_name(cls) -> str:
        return "WordHashEmbedding"

    def _vector(self, text: str) -> list[float]:
        vector = [0.0] * self.dimensions
        for word in re.findall(r"[a-z]+", text.lower()):
            bucket = int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "big") % self.dimensions
            vector[bucket] += 1.0
        norm = math.sqrt(sum(v * v for v in vector)) or 1.0
        return [v / norm for v in vector]

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._vector(query)

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._vector(text)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._vector(query)
