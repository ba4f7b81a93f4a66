"""The one message model of the core: every outside form of a chat message is parsed once, here, into these types.

Accepted outside forms (each message a mapping with ``role`` and ``content``, or a :class:`Message`):

* transformers' content lists: ``{"type": "text", "text": ...}`` and ``{"type": "image", "image": <source>}``
  (also ``"url"``, ``"path"`` or ``"base64"`` (with ``"mime_type"``) in place of ``"image"``);
* OpenAI's chat parts: ``{"type": "image_url", "image_url": {"url": ...}}``, assistant ``tool_calls``
  (``{"id", "type": "function", "function": {"name", "arguments"}}``), ``tool`` messages with ``tool_call_id``
  and the ``developer`` role (read as ``system``);
* plain strings as content, and plain strings as parts.

A picture stays a reference (:class:`ImagePart` holds its source: a path, URL, data URL, bytes, a base64 mapping, a
PIL image or a numpy array) until the image loader reads it under the caller's policy. Anything else is refused
with one :class:`~belle_vl_tools.errors.PromptError` that names the message and the part.

This module imports neither torch nor transformers.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

from .errors import PromptError

Role = Literal["system", "user", "assistant", "tool"]

#: The roles of the model's chat format. OpenAI's ``developer`` role is read as ``system``.
ROLES: tuple[Role, ...] = ("system", "user", "assistant", "tool")

#: The system prompt the reference uses when none is given.
DEFAULT_SYSTEM = "You are a helpful assistant."

_ROLE_ALIASES = {"developer": "system", "human": "user", "ai": "assistant", "function": "tool"}
_IMAGE_KEYS = ("image", "url", "path")


def new_call_id() -> str:
    """A fresh tool-call id in OpenAI's style (``call_`` and 24 hex digits)."""
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class TextPart:
    """A piece of text. Control-token text inside it stays text."""

    text: str


@dataclass(frozen=True)
class ImagePart:
    """A reference to a picture, not yet loaded: a path, URL, data URL, bytes, ``{"base64", "mime_type"}``, a PIL
    image or a numpy array."""

    source: Any = field(repr=False)
    #: OpenAI's ``image_url.detail`` as given (None when absent); not part of the picture's identity.
    detail: str | None = field(default=None, compare=False, repr=False)

    def __repr__(self) -> str:
        return f"ImagePart({_short(self.source, 60)})"


Part: TypeAlias = TextPart | ImagePart


@dataclass(frozen=True)
class ToolCall:
    """A call of a named tool with JSON-object arguments."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=new_call_id)


@dataclass(frozen=True)
class Message:
    """One chat message: a role and its parts in order (text and pictures interleaved as given).

    An assistant message may carry ``tool_calls``; a ``tool`` message answers the call ``tool_call_id`` (its parts
    are the tool's result, pictures included).
    """

    role: Role
    parts: tuple[Part, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None

    @property
    def text(self) -> str:
        """The message's text parts joined (pictures left out)."""
        return "".join(part.text for part in self.parts if isinstance(part, TextPart))

    @property
    def images(self) -> list[Any]:
        """The sources of the message's pictures, in order."""
        return [part.source for part in self.parts if isinstance(part, ImagePart)]

    @classmethod
    def user(cls, *parts: str | Part) -> Message:
        """A user message from strings (text) and parts."""
        return cls("user", tuple(TextPart(p) if isinstance(p, str) else p for p in parts))

    @classmethod
    def system(cls, text: str) -> Message:
        return cls("system", (TextPart(text),))

    @classmethod
    def assistant(cls, text: str = "", tool_calls: Iterable[ToolCall] = ()) -> Message:
        return cls("assistant", (TextPart(text),) if text else (), tuple(tool_calls))


# What every backend and app accepts as one message: a parsed Message or a raw form parse_message reads.
MessageInput: TypeAlias = "Message | Mapping[str, Any]"


def _short(obj: Any, limit: int = 120) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[:limit] + "..."


def _where(index: int | None, part: int | None = None) -> str:
    where = "" if index is None else f"message {index}"
    if part is not None:
        where += f"{', ' if where else ''}part {part}"
    return f" ({where})" if where else ""


def _image_part(raw: Mapping[str, Any], where: str, placeholders: bool = False) -> ImagePart:
    kind = raw.get("type")
    if kind == "image_url":
        url = raw.get("image_url")
        url = url.get("url") if isinstance(url, Mapping) else url
        detail = raw["image_url"].get("detail") if isinstance(raw.get("image_url"), Mapping) else None
        if not isinstance(url, str) or not url:
            raise PromptError(f"image_url part{where} needs {{'image_url': {{'url': 'https://... or data:...'}}}}.")
        return ImagePart(url, detail if isinstance(detail, str) else None)
    for key in _IMAGE_KEYS:
        if raw.get(key) is not None:
            return ImagePart(raw[key])
    if raw.get("base64") is not None:
        return ImagePart({"base64": raw["base64"], "mime_type": raw.get("mime_type")})
    if placeholders and kind == "image":
        return ImagePart(None)  # transformers' {"type": "image"}: the picture's place, the picture given apart
    raise PromptError(
        f"Image part{where} has no picture: give it an 'image' (a path, URL, data URL, bytes, PIL image or array), "
        "'url', 'path' or 'base64' key."
    )


def parse_part(raw: Any, where: str = "", *, placeholders: bool = False) -> Part:
    """One content part: a string, a text or image part (transformers or OpenAI form), or a part object.

    With ``placeholders``, an image part without a picture (transformers' ``{"type": "image"}``, as chat templates
    take it when the pictures are given apart) is an ``ImagePart(None)``: a place, not a picture."""
    if isinstance(raw, TextPart | ImagePart):
        return raw
    if isinstance(raw, str):
        return TextPart(raw)
    if not isinstance(raw, Mapping):
        raise PromptError(
            f"Content part{where} {_short(raw)} must be a string or a dict such as {{'type': 'text', 'text': ...}} "
            "or {'type': 'image', 'image': ...}."
        )
    kind = raw.get("type")
    if kind == "text":
        if not isinstance(raw.get("text"), str):
            raise PromptError(f"Text part{where} {_short(raw)} needs a string 'text'.")
        return TextPart(raw["text"])
    if kind in ("image", "image_url"):
        return _image_part(raw, where, placeholders)
    raise PromptError(
        f"Unsupported content part type {kind!r}{where}: use 'text', 'image' or 'image_url' parts "
        "(an image part holds a path, bytes, a data URL, a PIL image or a URL)."
    )


def parse_content(content: Any, where: str = "", *, placeholders: bool = False) -> tuple[Part, ...]:
    """A message's content (a string, None, a part or a list of parts) as parts, in order."""
    if content is None:
        return ()
    if isinstance(content, str):
        return (TextPart(content),)
    if isinstance(content, Mapping | TextPart | ImagePart):
        return (parse_part(content, where, placeholders=placeholders),)
    if not isinstance(content, list | tuple):
        raise PromptError(f"Message content{where} must be a string or a list of parts, not {type(content).__name__}.")
    return tuple(parse_part(part, _where_part(where, i), placeholders=placeholders) for i, part in enumerate(content))


def _where_part(where: str, i: int) -> str:
    return f"{where[:-1]}, part {i})" if where else f" (part {i})"


def parse_tool_call(raw: Any, where: str = "") -> ToolCall:
    """A tool call: a :class:`ToolCall`, or OpenAI's ``{"id", "type": "function", "function": {"name",
    "arguments"}}`` (arguments as a JSON object or its text)."""
    if isinstance(raw, ToolCall):
        return raw
    if isinstance(raw, Mapping):
        function = raw.get("function")
        source = function if isinstance(function, Mapping) else raw
        name = source.get("name")
        arguments = source.get("arguments", source.get("args", {}))
        if isinstance(name, str) and name:
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments) if arguments.strip() else {}
                except json.JSONDecodeError as exc:
                    raise PromptError(f"Tool call {name!r}{where} has arguments that are not JSON: {exc}.") from None
            if arguments is None:
                arguments = {}
            if not isinstance(arguments, Mapping):
                raise PromptError(f"Tool call {name!r}{where} needs a JSON object as arguments.")
            return ToolCall(name, dict(arguments), str(raw.get("id") or new_call_id()))
    raise PromptError(
        f"Cannot read the tool call{where} {_short(raw)}: give {{'id', 'type': 'function', "
        "'function': {'name', 'arguments'}}."
    )


def parse_message(raw: Any, index: int | None = None, *, placeholders: bool = False) -> Message:
    """One message from a :class:`Message` or a mapping with ``role`` and ``content``."""
    if isinstance(raw, Message):
        return raw
    where = _where(index)
    if not isinstance(raw, Mapping):
        raise PromptError(f"Each message{where} must be a dict with 'role' and 'content', not {_short(raw)}.")
    role = raw.get("role")
    role = _ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
    if role not in ROLES:
        raise PromptError(f"Unknown role {raw.get('role')!r}{where}: use one of {', '.join(ROLES)}.")
    if "content" not in raw and not raw.get("tool_calls"):
        raise PromptError(f"Message{where} has no 'content'.")
    parts = parse_content(raw.get("content"), where, placeholders=placeholders)
    calls = raw.get("tool_calls") or ()
    if calls and role != "assistant":
        raise PromptError(f"Only assistant messages carry 'tool_calls'{where}.")
    if not isinstance(calls, list | tuple):
        raise PromptError(f"'tool_calls'{where} must be a list.")
    tool_calls = tuple(parse_tool_call(call, where) for call in calls)
    tool_call_id = raw.get("tool_call_id")
    if tool_call_id is not None and not isinstance(tool_call_id, str):
        raise PromptError(f"'tool_call_id'{where} must be a string.")
    name = raw.get("name")
    return Message(role, parts, tool_calls, tool_call_id, name if isinstance(name, str) else None)


def parse_messages(raw: Any, *, placeholders: bool = False) -> list[Message]:
    """Every message of a conversation; a single string is one user message."""
    if isinstance(raw, str):
        return [Message.user(raw)]
    if isinstance(raw, Message | Mapping):
        return [parse_message(raw, placeholders=placeholders)]
    if not isinstance(raw, Sequence):
        raise PromptError(f"Messages must be a list of dicts with 'role' and 'content', not {type(raw).__name__}.")
    return [parse_message(message, i, placeholders=placeholders) for i, message in enumerate(raw)]


def part_dict(part: Part) -> dict[str, Any]:
    """A part in transformers' content-list form (a ``{"base64", "mime_type"}`` source as those two keys)."""
    if isinstance(part, TextPart):
        return {"type": "text", "text": part.text}
    source = part.source
    if isinstance(source, Mapping) and set(source) == {"base64", "mime_type"}:
        return {"type": "image", "base64": source["base64"], "mime_type": source["mime_type"]}
    return {"type": "image", "image": source}


def is_text_only(message: Message) -> bool:
    """Whether the message holds no picture."""
    return all(isinstance(part, TextPart) for part in message.parts)


def template_messages(messages: Iterable[Message], text: Callable[[str], str] | None = None) -> list[dict[str, Any]]:
    """Messages as transformers' chat templates read them.

    A message of text only has its text as ``content`` (a string); one with pictures has a list of
    ``{"type": "text", "text"}`` and ``{"type": "image"}`` parts (the template writes a picture's place, never its
    source). Tool calls are ``{"id", "type": "function", "function": {"name", "arguments": {...}}}`` (arguments as
    an object, as transformers' templates take them); ``tool_call_id`` and ``name`` are kept. ``text`` maps each
    text (the tokenizer puts markers in its place).
    """
    write = text or (lambda value: value)
    out: list[dict[str, Any]] = []
    for message in messages:
        content: Any
        if is_text_only(message):
            content = write(message.text)
        else:
            content = [
                {"type": "text", "text": write(part.text)} if isinstance(part, TextPart) else {"type": "image"}
                for part in message.parts
            ]
        entry: dict[str, Any] = {"role": message.role, "content": content}
        if message.tool_calls:
            entry["tool_calls"] = [
                {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
                for call in message.tool_calls
            ]
        out.append(entry | _reply_keys(message))
    return out


def _reply_keys(message: Message) -> dict[str, str]:
    """A tool message's ``tool_call_id`` and a message's ``name``, where they are set."""
    keys = {"tool_call_id": message.tool_call_id, "name": message.name}
    return {key: value for key, value in keys.items() if value is not None}


def to_openai(message: Message, image: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    """A message in OpenAI's chat form: text only as a string (None for an assistant's bare tool calls), else a
    list of ``{"type": "text"}`` parts and what ``image`` makes of each picture's source (an ``image_url`` part);
    tool calls with their arguments as JSON text."""
    content: Any
    if not message.parts and message.tool_calls:
        content = None
    elif is_text_only(message):
        content = message.text
    else:
        content = [
            {"type": "text", "text": part.text} if isinstance(part, TextPart) else image(part.source)
            for part in message.parts
        ]
    [entry] = to_content_lists([Message(message.role, (), message.tool_calls, message.tool_call_id, message.name)])
    entry["content"] = content
    return entry


def to_content_lists(messages: Iterable[Message]) -> list[dict[str, Any]]:
    """Messages in transformers' form (``{"role", "content": [parts]}``; tool calls in OpenAI's form)."""
    out: list[dict[str, Any]] = []
    for message in messages:
        entry: dict[str, Any] = {"role": message.role, "content": [part_dict(p) for p in message.parts]}
        if message.tool_calls:
            entry["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)},
                }
                for call in message.tool_calls
            ]
        out.append(entry | _reply_keys(message))
    return out


def count_images(messages: Iterable[Message]) -> int:
    """How many pictures the messages hold."""
    return sum(len(message.images) for message in messages)


__all__ = [
    "DEFAULT_SYSTEM",
    "ROLES",
    "ImagePart",
    "Message",
    "Part",
    "Role",
    "TextPart",
    "ToolCall",
    "count_images",
    "is_text_only",
    "new_call_id",
    "parse_content",
    "parse_message",
    "parse_messages",
    "parse_part",
    "parse_tool_call",
    "part_dict",
    "template_messages",
    "to_content_lists",
    "to_openai",
]
