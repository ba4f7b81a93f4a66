"""The backend interface that the tools and the LangChain / LlamaIndex adapters use.

A backend answers chat messages in transformers' format (``{"role": ..., "content": str | list of parts}``, an
image part being ``{"type": "image", "image": <path | bytes | data URL | PIL image | URL>}``). The local runtime
(:class:`belle_vl_tools.runtime.BelleVL`) is one backend; a client of a remote server is another. The
vision tasks (:class:`VisionTasks`) are written once on top of the interface, so every backend gets them.

This module imports neither torch nor transformers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from . import prompts
from .grounding import Box, parse_boxes

Message = dict[str, Any]
FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Usage:
    """Token counts of one generation (``images`` counts the pictures in the prompt)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    images: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total_tokens": self.total_tokens}


@dataclass(frozen=True)
class ChatResult:
    """The answer to one conversation."""

    text: str
    finish_reason: FinishReason = "stop"
    usage: Usage = field(default_factory=Usage)
    model: str = ""

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class StreamChunk:
    """A piece of a streamed answer; the last chunk carries ``finish_reason`` and ``usage``."""

    delta: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None


@runtime_checkable
class Backend(Protocol):
    """What the tools and adapters need from a model: chat, stream, their async forms, and batches."""

    model_name: str

    def chat(self, messages: Sequence[Message], **generation: Any) -> ChatResult: ...

    def stream(self, messages: Sequence[Message], **generation: Any) -> Iterator[StreamChunk]: ...

    async def achat(self, messages: Sequence[Message], **generation: Any) -> ChatResult: ...

    def astream(self, messages: Sequence[Message], **generation: Any) -> AsyncIterator[StreamChunk]: ...

    def generate_batch(self, conversations: Sequence[Sequence[Message]], **generation: Any) -> list[ChatResult]: ...


def image_message(image: Any, text: str) -> list[Message]:
    """A one-turn conversation: one picture and a text."""
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


@dataclass(frozen=True)
class LocateResult:
    """Boxes found for a phrase, in pixels of the original image, and the raw answer."""

    phrase: str
    boxes: list[Box]
    text: str
    image_size: tuple[int, int]


class VisionTasks:
    """describe / ask / read_text / locate, written on top of :meth:`Backend.chat` (mixed into backends)."""

    def chat(self, messages: Sequence[Message], **generation: Any) -> ChatResult:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(
        self,
        image: Any,
        detail: Literal["brief", "detailed"] = "brief",
        language: Literal["en", "zh"] = "en",
        **generation: Any,
    ) -> ChatResult:
        """A description of the picture."""
        return self.chat(image_message(image, prompts.describe_prompt(detail, language)), **generation)

    def ask(self, image: Any, question: str, **generation: Any) -> ChatResult:
        """The answer to a question about the picture."""
        return self.chat(image_message(image, prompts.ask_prompt(question)), **generation)

    def read_text(self, image: Any, language: Literal["en", "zh"] = "en", **generation: Any) -> ChatResult:
        """The text visible in the picture."""
        return self.chat(image_message(image, prompts.read_text_prompt(language)), **generation)

    def locate(self, image: Any, phrase: str, language: Literal["en", "zh"] = "en", **generation: Any) -> LocateResult:
        """Boxes around what ``phrase`` names, parsed from the model's ``<ref>…</ref><box>…</box>`` answer."""
        from .images import load_image

        picture = load_image(image, getattr(self, "image_policy", None))
        result = self.chat(image_message(picture, prompts.locate_prompt(phrase, language)), **generation)
        width, height = picture.size
        boxes = parse_boxes(result.text, width, height, default_label=phrase)
        return LocateResult(phrase=phrase, boxes=boxes, text=result.text, image_size=(width, height))


__all__ = [
    "Backend",
    "ChatResult",
    "FinishReason",
    "LocateResult",
    "Message",
    "StreamChunk",
    "Usage",
    "VisionTasks",
    "image_message",
]
