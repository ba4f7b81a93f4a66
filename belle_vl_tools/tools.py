"""Framework-neutral vision tools over any backend: describe_image, visual_qa, locate_objects, read_text.

Each tool is a pydantic argument schema plus a function. An agent (an LLM) fills in the arguments, so every
image goes through the tool's :class:`~belle_vl_tools.images.ImagePolicy`, set by the developer who builds the
tools: by default local files only under the current folder and no URLs. The ``image`` argument is a string: a
path, a data URL, an http(s) URL (when the policy allows URLs) or a handle such as ``image_1`` naming a picture
already in the conversation, kept in an :class:`ImageStore`.

Tools never raise from :meth:`BelleVLTool.run` / :meth:`BelleVLTool.arun`: a refused path, a bad image, an
unknown handle or a failing backend gives a :class:`ToolResult` with ``is_error=True`` and a short message the
agent can act on. This module does not import torch.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from .backend import Backend, ChatResult, load_backend
from .errors import BelleVLError, ImageNotFoundError
from .grounding import Box, draw_boxes
from .images import ImagePolicy, describe_source, load_image
from .messages import Message
from .react import ToolSpec
from .tasks import get_task

__all__ = [
    "TOOL_NAMES",
    "BelleVLTool",
    "DescribeImageInput",
    "ImageStore",
    "LocateObjectsInput",
    "ReadTextInput",
    "ToolResult",
    "UnknownImageHandleError",
    "VisualQAInput",
    "make_tools",
]

logger = logging.getLogger(__name__)

#: The tools :func:`make_tools` builds, in this order.
TOOL_NAMES: tuple[str, ...] = ("describe_image", "visual_qa", "locate_objects", "read_text")

#: Generation settings of the tools unless the developer gives others: greedy, so answers are repeatable.
DEFAULT_TOOL_GENERATION: dict[str, Any] = {"temperature": 0, "max_new_tokens": 512}

_HANDLE_RE = re.compile(r"image_(\d+)")


class UnknownImageHandleError(ImageNotFoundError):
    """An ``image_N`` handle names no picture of the conversation."""


# ---------------------------------------------------------------------------------------------------------------
# Image store
# ---------------------------------------------------------------------------------------------------------------


class ImageStore:
    """The pictures of one conversation or agent, by handle (``image_1``, ``image_2``, ...). Thread-safe.

    A source is anything :func:`~belle_vl_tools.images.load_image` reads (a path, bytes, a data URL, a URL, a PIL
    image). The tools load it under their own policy like any other argument; add a PIL image or bytes for a
    picture that the policy would not let them read by path.
    """

    def __init__(self) -> None:
        self._items: dict[str, Any] = {}
        self._count = 0
        self._lock = threading.Lock()

    def add(self, source: Any, handle: str | None = None) -> str:
        """Keep ``source`` and return its handle (a new ``image_N`` unless ``handle`` is given)."""
        if source is None:
            raise ValueError("ImageStore.add needs an image source, got None.")
        with self._lock:
            if handle is None:
                self._count += 1
                handle = f"image_{self._count}"
                while handle in self._items:
                    self._count += 1
                    handle = f"image_{self._count}"
            elif not isinstance(handle, str) or not handle.strip():
                raise ValueError(f"An image handle must be a non-empty string, got {handle!r}.")
            self._items[handle] = source
            return handle

    def get(self, handle: str) -> Any:
        """The source of ``handle``; raises :class:`UnknownImageHandleError` when there is none."""
        with self._lock:
            if handle in self._items:
                return self._items[handle]
            known = ", ".join(self._items)
        hint = f"Use one of the known handles ({known})" if known else "No picture has been given a handle yet"
        raise UnknownImageHandleError(
            f"There is no picture called {handle!r} in this conversation. {hint}, or pass a file path or URL."
        )

    def resolve(self, ref: str) -> Any | None:
        """The source for ``ref`` if it is a known handle (quotes, brackets and spaces around it allowed)."""
        key = _handle_key(ref)
        with self._lock:
            return self._items.get(key) if key is not None else None

    def handles(self) -> list[str]:
        """The handles, oldest first."""
        with self._lock:
            return list(self._items)

    def clear(self) -> None:
        """Forget every picture (handles restart at ``image_1``)."""
        with self._lock:
            self._items.clear()
            self._count = 0

    def __contains__(self, ref: object) -> bool:
        return isinstance(ref, str) and self.resolve(ref) is not None

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


def _handle_key(ref: object) -> str | None:
    if not isinstance(ref, str):
        return None
    key = ref.strip().strip("`'\"<>[]() ").strip()
    return key or None


# ---------------------------------------------------------------------------------------------------------------
# Results and argument schemas
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ToolResult:
    """What a tool returns: ``text`` for the agent to read, an optional ``artifact`` (e.g. the picture with the
    boxes drawn), structured ``data`` (boxes in pixels, ...) and whether it is an error message."""

    text: str
    artifact: Any = None
    data: dict[str, Any] = field(default_factory=dict)
    is_error: bool = False

    def __str__(self) -> str:
        return self.text


_IMAGE_HELP = (
    "The picture: the handle of a picture in the conversation such as image_1, a file path, a data URL "
    "(data:image/png;base64,...) or an http(s) URL if URLs are allowed."
)


class DescribeImageInput(BaseModel):
    """Arguments of describe_image."""

    image: str = Field(description=_IMAGE_HELP)
    detail: Literal["brief", "detailed"] = Field(default="brief", description="'brief' or 'detailed'.")
    language: Literal["en", "zh"] = Field(default="en", description="Answer language: 'en' or 'zh'.")


class VisualQAInput(BaseModel):
    """Arguments of visual_qa."""

    image: str = Field(description=_IMAGE_HELP)
    question: str = Field(description="The question about the picture.")


class LocateObjectsInput(BaseModel):
    """Arguments of locate_objects."""

    image: str = Field(description=_IMAGE_HELP)
    description: str = Field(description="What to find, e.g. 'the red car'.")


class ReadTextInput(BaseModel):
    """Arguments of read_text."""

    image: str = Field(description=_IMAGE_HELP)


# ---------------------------------------------------------------------------------------------------------------
# The tools: each one a registered vision task with an argument schema
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ToolTask:
    """A tool on top of a registered vision task: its argument schema and how its arguments map to the task's."""

    schema: type[BaseModel]
    task: str
    arguments: Callable[[Any], dict[str, Any]]

    def messages(self, picture: Any, args: BaseModel) -> list[Message]:
        return get_task(self.task).messages(picture, **self.arguments(args))

    def result(self, answer: ChatResult, picture: Any, args: BaseModel, label: str) -> ToolResult:
        arguments = self.arguments(args)
        read = get_task(self.task).read(answer.text, picture.size, arguments)
        if self.task != "locate":
            return ToolResult(text=read, data=_answer_data(answer, label))
        return _located(answer, picture, arguments["phrase"], read, label)


def _answer_data(answer: ChatResult, label: str) -> dict[str, Any]:
    return {
        "image": label,
        "answer": answer.text,
        "finish_reason": answer.finish_reason,
        "usage": answer.usage.as_dict(),
        "model": answer.model,
    }


def _located(answer: ChatResult, picture: Any, phrase: str, boxes: list[Box], label: str) -> ToolResult:
    width, height = picture.size
    data = {**_answer_data(answer, label), "image_size": [width, height], "boxes": [box.as_dict() for box in boxes]}
    if not boxes:
        text = (
            f"No box found for {phrase!r} in {label} ({width}x{height} pixels). "
            f"The model answered: {answer.text.strip()!r}"
        )
    else:
        listed = "; ".join(
            f"{box.label}: [{round(box.x1)}, {round(box.y1)}, {round(box.x2)}, {round(box.y2)}]" for box in boxes
        )
        text = (
            f"Found {len(boxes)} box{'es' if len(boxes) != 1 else ''} in {label} ({width}x{height} pixels), "
            f"as [x1, y1, x2, y2] in pixels: {listed}"
        )
    return ToolResult(text=text, artifact=draw_boxes(picture, boxes), data=data)


_TASKS: dict[str, _ToolTask] = {
    "describe_image": _ToolTask(DescribeImageInput, "describe", lambda a: {"detail": a.detail, "language": a.language}),
    "visual_qa": _ToolTask(VisualQAInput, "ask", lambda a: {"question": a.question}),
    "locate_objects": _ToolTask(LocateObjectsInput, "locate", lambda a: {"phrase": a.description}),
    "read_text": _ToolTask(ReadTextInput, "read_text", lambda a: {"language": "en"}),
}


# ---------------------------------------------------------------------------------------------------------------
# The tool class
# ---------------------------------------------------------------------------------------------------------------


class BelleVLTool:
    """One vision tool over a backend: ``run(**arguments)`` / ``await arun(**arguments)`` return a
    :class:`ToolResult` and never raise."""

    def __init__(
        self,
        name: str,
        model: Backend,
        *,
        policy: ImagePolicy | None = None,
        store: ImageStore | None = None,
        generation: dict[str, Any] | None = None,
        description: str | None = None,
    ) -> None:
        if name not in _TASKS:
            raise ValueError(f"Unknown tool {name!r}: choose from {', '.join(TOOL_NAMES)}.")
        task = _TASKS[name]
        self.name = name
        self.model = model
        self.policy = policy if policy is not None else ImagePolicy()
        self.store = store if store is not None else ImageStore()
        self.generation = {**DEFAULT_TOOL_GENERATION, **(generation or {})}
        self.description = description or get_task(task.task).summary
        self.args_schema: type[BaseModel] = task.schema
        self._task = task

    def __repr__(self) -> str:
        return f"BelleVLTool({self.name!r}, model={getattr(self.model, 'model_name', '?')!r})"

    def spec(self) -> ToolSpec:
        """The tool for the ReAct protocol or an OpenAI tools list."""
        return ToolSpec(self.name, self.description, self.args_schema.model_json_schema())

    # --- running --------------------------------------------------------------------------------------------
    def _arguments(self, kwargs: dict[str, Any]) -> Any:
        """The arguments as the tool's input model (each of them has an ``image`` field)."""
        try:
            return self.args_schema.model_validate(kwargs)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in error['loc']) or 'arguments'}: {error['msg']}" for error in exc.errors()
            )
            raise _ArgumentError(f"Invalid arguments for {self.name}: {problems}.") from None

    def _picture(self, ref: str) -> tuple[Any, str]:
        """The loaded picture for the ``image`` argument and a short label for messages."""
        source = self.store.resolve(ref)
        label = _handle_key(ref) or ref
        if source is None:
            key = _handle_key(ref)
            if key is not None and _HANDLE_RE.fullmatch(key) and not _exists_as_path(ref):
                self.store.get(key)  # raises with the known handles
            source = ref.strip()
            label = describe_source(source) if len(source) > 120 or source.startswith("data:") else repr(source)
        return load_image(source, self.policy), label

    def _error(self, exc: BaseException) -> ToolResult:
        if isinstance(exc, (BelleVLError, _ArgumentError)):
            text = f"Error: {exc}"
        else:
            logger.exception("Tool %s failed", self.name)
            text = f"Error: {self.name} failed ({type(exc).__name__}: {str(exc)[:300]})."
        return ToolResult(text=text, is_error=True, data={"error": type(exc).__name__})

    def run(self, **kwargs: Any) -> ToolResult:
        """Run the tool on the backend; errors come back as ``ToolResult(is_error=True)``."""
        try:
            args = self._arguments(kwargs)
            picture, label = self._picture(args.image)
            answer = self.model.chat(self._task.messages(picture, args), **self.generation)
            return self._task.result(answer, picture, args, label)
        except Exception as exc:  # every failure becomes a message the agent can read
            return self._error(exc)

    async def arun(self, **kwargs: Any) -> ToolResult:
        """:meth:`run` without blocking the event loop (image loading in a thread, the backend's ``achat``)."""
        try:
            args = self._arguments(kwargs)
            picture, label = await asyncio.to_thread(self._picture, args.image)
            answer = await self.model.achat(self._task.messages(picture, args), **self.generation)
            return await asyncio.to_thread(self._task.result, answer, picture, args, label)
        except Exception as exc:
            return self._error(exc)

    def __call__(self, **kwargs: Any) -> ToolResult:
        return self.run(**kwargs)


class _ArgumentError(ValueError):
    """The agent's arguments do not fit the tool's schema."""


def _exists_as_path(ref: str) -> bool:
    try:
        return os.path.lexists(ref.strip())
    except (OSError, ValueError):
        return False


def make_tools(
    model: Backend | str | os.PathLike | None,
    policy: ImagePolicy | None = None,
    store: ImageStore | None = None,
    names: Sequence[str] | None = None,
    *,
    generation: dict[str, Any] | None = None,
) -> dict[str, BelleVLTool]:
    """The vision tools over ``model`` (a loaded ``BelleVL`` or any :class:`~belle_vl_tools.backend.Backend`, a
    checkpoint folder or a Hub id; see :func:`~belle_vl_tools.backend.load_backend`), by name.

    ``policy`` decides which images the tools may read (default ``ImagePolicy()``: files under the current
    folder, no URLs); ``store`` resolves ``image_N`` handles (one is made if not given; all tools share it);
    ``names`` picks tools out of :data:`TOOL_NAMES`; ``generation`` overrides the greedy defaults
    (:data:`DEFAULT_TOOL_GENERATION`).
    """
    model = load_backend(model)
    wanted = list(TOOL_NAMES if names is None else names)
    unknown = [name for name in wanted if name not in _TASKS]
    if unknown:
        raise ValueError(f"Unknown tool name(s) {', '.join(map(repr, unknown))}: choose from {', '.join(TOOL_NAMES)}.")
    policy = policy if policy is not None else ImagePolicy()
    store = store if store is not None else ImageStore()
    return {
        name: BelleVLTool(name, model, policy=policy, store=store, generation=generation)
        for name in dict.fromkeys(wanted)
    }
