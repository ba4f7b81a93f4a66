"""Helpers for the tests: pictures, a scripted backend and a small deterministic embedding."""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from belle_vl_tools.backend import ChatResult, StreamChunk, Usage
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


class ScriptedBackend:
    """A core backend whose replies come from a script (a function of the messages); it records every call."""

    def __init__(self, reply: Callable[[list[dict[str, Any]]], str], model_name: str = "scripted") -> None:
        self.reply = reply
        self.model_name = model_name
        self.calls: list[tuple[list[dict[str, Any]], dict[str, Any]]] = []

    def _answer(self, messages: Sequence[dict[str, Any]], generation: dict[str, Any]) -> str:
        self.calls.append((list(messages), dict(generation)))
        return self.reply(list(messages))

    def chat(self, messages: Sequence[dict[str, Any]], **generation: Any) -> ChatResult:
        text = self._answer(messages, generation)
        return ChatResult(text, "stop", Usage(10, len(text.split())), self.model_name)

    def stream(self, messages: Sequence[dict[str, Any]], **generation: Any) -> Iterator[StreamChunk]:
        text = self._answer(messages, generation)
        pieces = re.findall(r"\S*\s*", text)
        for piece in pieces[:-1]:
            yield StreamChunk(piece)
        yield StreamChunk(pieces[-1] if pieces else "", "stop", Usage(10, len(text.split())))

    async def achat(self, messages: Sequence[dict[str, Any]], **generation: Any) -> ChatResult:
        return self.chat(messages, **generation)

    async def astream(self, messages: Sequence[dict[str, Any]], **generation: Any) -> AsyncIterator[StreamChunk]:
        for chunk in self.stream(messages, **generation):
            yield chunk

    def generate_batch(self, conversations: Sequence[Sequence[dict[str, Any]]], **generation: Any) -> list[ChatResult]:
        return [self.chat(conversation, **generation) for conversation in conversations]


def last_text(messages: list[dict[str, Any]]) -> str:
    """All text of a core conversation, joined (to script replies on)."""
    texts = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            texts.append(content)
        else:
            texts.extend(part.get("text", "") for part in content if isinstance(part, dict))
    return "\n".join(texts)


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
