"""The backend interface that the tools and the LangChain / LlamaIndex adapters use.

A backend answers chat messages in transformers' format (``{"role": ..., "content": str | list of parts}``, an
image part being ``{"type": "image", "image": <path | bytes | data URL | PIL image | URL>}``). The local runtime
(:class:`belle_vl_tools.runtime.BelleVL`) is one backend; a client of a remote server is another. The
vision tasks (:class:`VisionTasks`) are written once on top of the interface, so every backend gets them.

This module imports neither torch nor transformers.
"""

from __future__ import annotations

import base64
import html
import io
import os
import re
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, Protocol, TypeGuard, runtime_checkable

from .grounding import Box
from .messages import MessageInput
from .tasks import get_task

Message = MessageInput  # a core Message, or a dict in any form messages.parse_message reads
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
    #: The picture asked about (as given: a PIL image, path, bytes or data URL), when the answer came from a
    #: one-picture task (``ask``, ``describe``, ``read_text``); shown beside the answer in notebooks.
    image: Any = field(default=None, repr=False, compare=False)

    def __str__(self) -> str:
        return self.text

    def _repr_html_(self) -> str:
        answer = f"<div style='white-space:pre-wrap'>{html.escape(self.text)}</div>"
        picture = _displayable(self.image)
        if picture is None:
            return answer
        return f"<div style='display:flex;gap:1em;align-items:flex-start'>{_img_tag(picture)}{answer}</div>"


def _displayable(source: Any) -> Any:
    """A PIL image for a notebook to show, or None (no picture, a URL, which is never fetched for display, or a
    file that cannot be read any more)."""
    if source is None or _is_pil(source):
        return source
    if isinstance(source, str) and source.lower().startswith(("http://", "https://")):
        return None
    from .errors import ImageError
    from .images import ImagePolicy, load_image

    try:
        return load_image(source, ImagePolicy.trusted())
    except ImageError:
        return None


def _png_bytes(image: Any, max_side: int = 512) -> bytes:
    picture = image.convert("RGB") if image.mode not in ("RGB", "RGBA") else image
    if max(picture.size) > max_side:
        picture = picture.copy()
        picture.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def _img_tag(image: Any) -> str:
    data = base64.b64encode(_png_bytes(image, 256)).decode("ascii")
    return f"<img src='data:image/png;base64,{data}' style='max-width:256px'/>"


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


HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def is_backend(obj: Any) -> TypeGuard[Backend]:
    """Whether ``obj`` is a loaded backend (a ``BelleVL``, a ``RemoteBelleVL`` or any object with ``chat`` and
    ``model_name``); a transformers model (which has the model card's ``chat`` too) is not."""
    if obj is None or isinstance(obj, str | os.PathLike):
        return False
    if hasattr(obj, "generate") and hasattr(obj, "config") and not hasattr(obj, "processor"):
        return False  # a bare transformers model
    return callable(getattr(obj, "chat", None)) and isinstance(getattr(obj, "model_name", None), str)


def load_backend(model: Any = None, **load_kwargs: Any) -> Backend:
    """The backend for a ``model=`` argument, the one rule every constructor follows.

    ``model`` is a loaded backend (``BelleVL``, ``RemoteBelleVL``, or an adapter holding one as ``.backend``, such
    as ``ChatBelleVL`` or the LlamaIndex ``BelleVL``), a checkpoint folder, a Hub id (``owner/name``), or None for
    the shipped demo model; ``load_kwargs`` go to ``BelleVL.from_pretrained`` (``device``, ``dtype``, ...) when a
    checkpoint is loaded. Anything else raises a TypeError (or a CheckpointError for a path that is neither a
    folder nor a Hub id) saying what is accepted.
    """
    wrapped = getattr(model, "backend", None)
    if is_backend(wrapped):
        return wrapped
    if is_backend(model):
        if load_kwargs:
            raise TypeError(
                f"model= is already loaded, so {', '.join(sorted(load_kwargs))} cannot apply: pass them to "
                "BelleVL.from_pretrained() instead, or pass a checkpoint folder as model=."
            )
        return model
    if model is None or isinstance(model, str | os.PathLike):
        from .errors import CheckpointError

        text = None if model is None else os.fspath(model)
        if text is not None and text.lower().startswith(("http://", "https://")):
            raise CheckpointError(
                f"model={text!r} is a URL: for a belle-vl server pass RemoteBelleVL({text!r}) as model=, "
                "for a checkpoint pass its folder or Hub id."
            )
        if text is not None and not os.path.isdir(text) and not HUB_ID.fullmatch(text):
            raise CheckpointError(
                f"model={text!r} is not a checkpoint folder and not a Hub id (owner/name): check the path."
            )
        from .runtime import BelleVL

        return BelleVL.from_pretrained(text, **load_kwargs)
    if hasattr(model, "generate") and hasattr(model, "config"):
        raise TypeError(
            "model= got a bare transformers model: wrap it with its processor, BelleVL(model, processor), "
            "or pass the checkpoint folder."
        )
    raise TypeError(
        "model= takes a loaded backend (an object with chat() and model_name, such as BelleVL or RemoteBelleVL), "
        f"a checkpoint folder or a Hub id (None: the demo model), not {type(model).__name__}."
    )


def image_message(image: Any, text: str) -> list[Message]:
    """A one-turn conversation in transformers' form: one picture and a text."""
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


@dataclass(frozen=True)
class LocateResult:
    """Boxes found for a phrase, in pixels of the original image, and the raw answer."""

    phrase: str
    boxes: list[Box]
    text: str
    image_size: tuple[int, int]
    #: The picture the boxes are in (drawn by :meth:`drawn` and shown in notebooks).
    image: Any = field(default=None, repr=False, compare=False)

    def drawn(self) -> Any:
        """A copy of the picture with the boxes outlined and labelled."""
        from .grounding import draw_boxes

        if self.image is None:
            raise ValueError("This result carries no picture: draw the boxes on your own copy with draw_boxes().")
        return draw_boxes(self.image, self.boxes)

    def _repr_png_(self) -> bytes | None:
        return None if self.image is None else _png_bytes(self.drawn())

    def _repr_html_(self) -> str:
        found = ", ".join(
            f"{html.escape(b.label or self.phrase)} ({b.x1:.0f}, {b.y1:.0f}, {b.x2:.0f}, {b.y2:.0f})"
            for b in self.boxes
        )
        caption = f"<div>{html.escape(self.phrase)}: {found or 'nothing found'}</div>"
        if self.image is None:
            return caption
        data = base64.b64encode(_png_bytes(self.drawn())).decode("ascii")
        return f"<div><img src='data:image/png;base64,{data}' style='max-width:512px'/>{caption}</div>"


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
        return self._run_text_task("describe", image, {"detail": detail, "language": language}, generation)

    def ask(self, image: Any, question: str, **generation: Any) -> ChatResult:
        """The answer to a question about the picture."""
        return self._run_text_task("ask", image, {"question": question}, generation)

    def read_text(self, image: Any, language: Literal["en", "zh"] = "en", **generation: Any) -> ChatResult:
        """The text visible in the picture."""
        return self._run_text_task("read_text", image, {"language": language}, generation)

    def locate(
        self, image: Any, phrase: str, language: Literal["en", "zh"] | None = None, **generation: Any
    ) -> LocateResult:
        """Boxes around what ``phrase`` names, parsed from the model's ``<ref>…</ref><box>…</box>`` answer
        (``language`` None: the phrase's own language)."""
        from .images import load_image

        task = get_task("locate")
        arguments = {"phrase": phrase, "language": language}
        prompt_messages = task.messages(None, **arguments)  # a bad phrase fails before the picture is read
        picture = load_image(image, getattr(self, "image_policy", None))
        result = self.chat(_with_picture(prompt_messages, picture), **generation)
        boxes = task.read(result.text, picture.size, arguments)
        return LocateResult(phrase=phrase, boxes=boxes, text=result.text, image_size=picture.size, image=picture)

    def _run_text_task(
        self, name: str, image: Any, arguments: dict[str, Any], generation: dict[str, Any]
    ) -> ChatResult:
        """The answer to a one-picture task, carrying the picture as given."""
        messages = get_task(name).messages(image, **arguments)
        return replace(self.chat(messages, **generation), image=image)


def _with_picture(messages: list[Any], picture: Any) -> list[Any]:
    """A task conversation with its picture part set to ``picture``."""
    from .messages import ImagePart

    [message] = messages
    parts = tuple(ImagePart(picture) if isinstance(p, ImagePart) else p for p in message.parts)
    return [replace(message, parts=parts)]


def _is_pil(image: Any) -> bool:
    return hasattr(image, "convert") and hasattr(image, "size") and hasattr(image, "mode")


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
    "is_backend",
    "load_backend",
]
