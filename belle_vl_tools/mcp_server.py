"""Belle-VL's vision tools for any MCP host: an MCP server over stdio or streamable HTTP (``belle-vl mcp``).

The server maps the core agent tools of :mod:`belle_vl_tools.tools` (``describe_image``, ``visual_qa``,
``locate_objects``, ``read_text``: their argument schemas and descriptions come from there) and the caption cache of
:mod:`belle_vl_tools.captions` (``caption_folder``) to the Model Context Protocol, on the official ``mcp`` SDK. It
adds no model or prompt logic of its own; any :class:`~belle_vl_tools.backend.Backend` serves (the local runtime, or
:class:`~belle_vl_tools.backends.remote.RemoteBelleVL` in front of ``belle-vl serve`` on another machine).

What a host may read is decided as for every agent tool, by an :class:`~belle_vl_tools.images.ImagePolicy`: local
files only inside the folders the operator allows (``allowed_roots``), narrowed to the roots the host declares
through MCP's roots capability when it declares any; http(s) URLs only with ``allow_urls``. Relative paths are taken
relative to the allowed folders (never to the server's working folder), and paths in answers are shown relative to
them. A refused path, a bad image or an unknown handle is a tool result with ``isError`` and a message the agent can
act on; the server keeps serving.

Results carry the answer as text and, as ``structuredContent`` matching the tool's output schema, the answer with
its finish reason, token usage and (``locate_objects``) the boxes in pixels; ``locate_objects`` adds the picture
with the boxes drawn as a PNG. The first model load and folder captions send progress notifications when the
request asks for them, and a request the host cancels stops its generation.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import dataclasses
import hmac
import io
import ipaddress
import json
import logging
import os
import re
import socket
import sys
import threading
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit
from urllib.request import url2pathname
from weakref import WeakKeyDictionary

import anyio
import mcp.types as types
from mcp.server.lowlevel import Server
from mcp.shared.message import ServerMessageMetadata
from pydantic import BaseModel, Field, ValidationError

from . import __version__
from .backend import Backend, ChatResult, Message, StreamChunk
from .captions import CaptionCache, caption_images, find_images
from .errors import BelleVLError, ImageAccessDeniedError, ImageNotFoundError
from .images import ImagePolicy
from .tools import BelleVLTool, DescribeImageInput, ImageStore, ToolResult, make_tools

__all__ = [
    "FolderCaptions",
    "LocatedObjects",
    "VisionAnswer",
    "VisionMCPServer",
]

logger = logging.getLogger(__name__)

#: Longest side of the PNG with the boxes drawn that ``locate_objects`` returns.
DRAWN_MAX_SIDE = 1024

#: Seconds the server waits for the host's answer to ``roots/list``.
ROOTS_TIMEOUT = 10.0

#: Seconds a client has to send a whole request body over HTTP (a slowly trickled body is cut off with a 408).
BODY_TIMEOUT = 30.0

#: Largest request body over HTTP, in bytes (a tool call carrying a picture as base64 fits well inside).
MAX_BODY_BYTES = 64 << 20

_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
_WILDCARD_BINDS = ("", "0.0.0.0", "::")


def allowed_http_hosts(host: str, extra: Sequence[str] = ()) -> list[str]:
    """The ``Host`` header values (``name:port`` patterns) the HTTP transport accepts when bound to ``host``: the
    bind address itself, the loopback names when it is a loopback or wildcard address, the machine's name for a
    wildcard bind, and ``extra`` names (a DNS name or proxy the server is reached by). A request naming any other
    host is refused (DNS rebinding protection, on for every bind address)."""
    names: list[str] = []
    if host not in _WILDCARD_BINDS:
        names.append(f"[{host}]" if ":" in host and not host.startswith("[") else host)
    try:
        loopback = host in _WILDCARD_BINDS or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:
        names.extend(_LOOPBACK_NAMES)
    if host in _WILDCARD_BINDS:
        names.append(socket.gethostname())
    names.extend(extra)
    return [f"{name}:*" for name in dict.fromkeys(names)]


Reporter = Callable[[float, float | None, str], Awaitable[None]]

# The progress reporter of the request being handled (None when the request asked for no progress).
_REPORTER: contextvars.ContextVar[Reporter | None] = contextvars.ContextVar("belle_vl_mcp_reporter", default=None)

_HANDLE_RE = re.compile(r"image_\d+")
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_BASE64_RE = re.compile(r"[A-Za-z0-9+/_=\-\s]+")


# ---------------------------------------------------------------------------------------------------------------
# Output schemas (what ``structuredContent`` holds)
# ---------------------------------------------------------------------------------------------------------------


class UsageInfo(BaseModel):
    """Token counts of one answer."""

    prompt_tokens: int
    completion_tokens: int
    images: int
    total_tokens: int


class VisionAnswer(BaseModel):
    """The structured result of describe_image, visual_qa and read_text."""

    image: str = Field(description="The picture asked about: its path relative to its allowed folder, or a handle.")
    answer: str = Field(description="The model's answer as it wrote it.")
    finish_reason: Literal["stop", "length"] = Field(
        description="'stop': the answer is complete; 'length': it was cut at the token limit."
    )
    usage: UsageInfo
    model: str = Field(description="The model that answered.")


class PixelBox(BaseModel):
    """One box found by locate_objects, in pixels of the original picture."""

    label: str
    x1: float
    y1: float
    x2: float
    y2: float
    grid: list[int] = Field(description="The corners as the model wrote them, on its 0-1000 grid.")


class LocatedObjects(VisionAnswer):
    """The structured result of locate_objects."""

    image_size: list[int] = Field(min_length=2, max_length=2, description="[width, height] of the picture in pixels.")
    boxes: list[PixelBox] = Field(description="The boxes as [x1, y1, x2, y2] corners in pixels; empty if none.")


class AddImageInput(BaseModel):
    """Arguments of add_image."""

    image: str = Field(description=DescribeImageInput.model_fields["image"].description)


class AddedImage(BaseModel):
    """The structured result of add_image."""

    handle: str = Field(description="The name to pass as `image` to the other tools in this session.")
    width: int
    height: int


class CaptionFolderInput(BaseModel):
    """Arguments of caption_folder."""

    folder: str = Field(
        default=".", description="The folder of pictures, relative to the allowed folders ('.': the first of them)."
    )
    detail: Literal["brief", "detailed"] = Field(
        default="brief", description=DescribeImageInput.model_fields["detail"].description
    )
    language: Literal["en", "zh"] = Field(
        default="en", description=DescribeImageInput.model_fields["language"].description
    )
    recursive: bool = Field(default=True, description="Look into subfolders too.")
    limit: int | None = Field(
        default=None, ge=1, description="Caption at most this many pictures (the first ones in path order)."
    )


class FolderCaption(BaseModel):
    """The caption of one picture of a folder."""

    path: str = Field(description="The picture's path relative to its allowed folder.")
    caption: str
    width: int
    height: int
    cached: bool = Field(description="Whether the caption came from the cache.")


class FolderCaptions(BaseModel):
    """The structured result of caption_folder."""

    folder: str
    captions: list[FolderCaption]
    cached: int = Field(description="Captions answered from the cache.")
    new: int = Field(description="Captions made now.")
    skipped: int = Field(description="Files that could not be read as pictures.")


_OUTPUTS: dict[str, type[BaseModel]] = {
    "describe_image": VisionAnswer,
    "visual_qa": VisionAnswer,
    "locate_objects": LocatedObjects,
    "read_text": VisionAnswer,
}


# ---------------------------------------------------------------------------------------------------------------
# The backend as the tools see it: loaded on first use, generation that stops when the request is cancelled
# ---------------------------------------------------------------------------------------------------------------


class _ServedBackend:
    """Wraps the server's backend (or the callable that makes it). Loads it on first use, once, reporting progress
    to the request that needed it; answers ``achat`` through ``astream`` so that cancelling the request closes the
    stream, which stops the generation (the local runtime checks for it at every token, a remote server sees the
    connection close)."""

    def __init__(self, backend_or_factory: Backend | Callable[[], Backend]) -> None:
        if callable(getattr(backend_or_factory, "chat", None)):
            self._backend: Backend | None = backend_or_factory  # type: ignore[assignment]
            self._factory = None
        elif callable(backend_or_factory):
            self._backend, self._factory = None, backend_or_factory
        else:
            raise TypeError(
                "VisionMCPServer needs a backend (an object with chat/astream) or a callable that returns one; "
                f"got {type(backend_or_factory).__name__}."
            )
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._backend is not None

    @property
    def model_name(self) -> str:
        return str(getattr(self._backend, "model_name", "")) if self._backend is not None else ""

    def load_blocking(self) -> Backend:
        """The backend, made now if needed (blocks; call it from a worker thread)."""
        with self._lock:
            if self._backend is None:
                backend = self._factory()  # type: ignore[misc]
                if not callable(getattr(backend, "chat", None)):
                    raise TypeError(f"The backend factory returned {type(backend).__name__}, not a backend.")
                self._backend = backend
            return self._backend

    async def load(self) -> Backend:
        """The backend; the first call loads it in a worker thread and reports progress to the current request."""
        if self._backend is not None:
            return self._backend
        report = _REPORTER.get()
        if report is not None:
            await report(0, 1, "Loading the model (first use)")
        backend = await anyio.to_thread.run_sync(self.load_blocking)
        if report is not None:
            await report(1, 1, "Model loaded")
        return backend

    def chat(self, messages: Sequence[Message], **generation: Any) -> ChatResult:
        return self.load_blocking().chat(messages, **generation)

    async def achat(self, messages: Sequence[Message], **generation: Any) -> ChatResult:
        backend = await self.load()
        astream = getattr(backend, "astream", None)
        if astream is None:
            return await backend.achat(messages, **generation)
        parts: list[str] = []
        last: StreamChunk | None = None
        async with contextlib.aclosing(astream(messages, **generation)) as stream:
            async for chunk in stream:
                parts.append(chunk.delta)
                if chunk.finish_reason is not None:
                    last = chunk
        if last is None or last.usage is None or last.finish_reason is None:
            raise BelleVLError("The backend's stream ended without its final chunk (finish reason and usage).")
        return ChatResult("".join(parts), last.finish_reason, last.usage, self.model_name)


# ---------------------------------------------------------------------------------------------------------------
# Folders: the operator's, narrowed by the host's roots
# ---------------------------------------------------------------------------------------------------------------


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _intersect(operator: Sequence[Path], host: Sequence[Path]) -> tuple[Path, ...]:
    """The folders inside both an operator's folder and a host's root (each the deeper of a nested pair)."""
    found: list[Path] = []
    for allowed in operator:
        for declared in host:
            if _within(declared, allowed):
                found.append(declared)
            elif _within(allowed, declared):
                found.append(allowed)
    return tuple(dict.fromkeys(found))


def _root_path(uri: str) -> Path | None:
    parts = urlsplit(uri)
    if parts.scheme != "file" or parts.netloc not in ("", "localhost"):
        return None
    return Path(url2pathname(parts.path)).resolve()


class _Display:
    """Shows paths relative to the allowed folder they lie in, in every text the agent reads."""

    def __init__(self, roots: Sequence[Path]) -> None:
        self.roots = tuple(roots)
        self.names: dict[str, str] = {}

    def relative(self, path: Path) -> str:
        for root in self.roots:
            if _within(path, root):
                shown = path.relative_to(root).as_posix() or "."
                self.names[str(path)] = shown
                return shown
        return path.name

    def __call__(self, text: str) -> str:
        for absolute, shown in sorted(self.names.items(), key=lambda item: -len(item[0])):
            text = text.replace(absolute, shown)
        for index, root in sorted(enumerate(self.roots), key=lambda item: -len(str(item[1]))):
            if root.parent != root:  # never rewrite every "/" for a root of "/"
                text = re.sub(re.escape(str(root)) + r"(?![\w.-])", f"<allowed folder {index + 1}>", text)
        return text


def _roots_hint(roots: Sequence[Path]) -> str:
    if not roots:
        return "This server may read no local folder now (the host's roots and the operator's folders do not meet)"
    names = ", ".join(f"{i + 1}: {root.name or root}" for i, root in enumerate(roots))
    return f"Paths are taken relative to the allowed folder(s) ({names})"


def _looks_like_base64(text: str) -> bool:
    return len(text) >= 16 and "." not in text and _BASE64_RE.fullmatch(text) is not None


# ---------------------------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------------------------


class VisionMCPServer:
    """The vision tools over ``backend`` as an MCP server (the SDK's low-level :class:`mcp.server.lowlevel.Server`,
    at :attr:`server`).

    Args:
        backend: A backend (``BelleVL``, ``RemoteBelleVL``, ...) or a zero-argument callable returning one, called
            on the first call that needs the model.
        allowed_roots: The folders pictures may be read from (default: the current folder). A host that declares
            MCP roots narrows them further, per session.
        allow_urls: Fetch http(s) image URLs (public addresses only, as :class:`ImagePolicy` checks them).
        policy: The image policy the others are derived from (size limits, formats); its ``allowed_roots`` and
            ``allow_urls`` are replaced by the two arguments above.
        caption_cache: The caption cache of ``caption_folder``: a :class:`CaptionCache`, its file, or None for
            one in memory (captions then last as long as the server).
        model_key: The model part of the caption cache key (see :func:`~belle_vl_tools.captions.checkpoint_key`),
            or a callable that returns it; default: the backend's ``model_name``.
        generation: Generation settings over the tools' greedy defaults (e.g. ``{"max_new_tokens": 256}``).
        caption_batch_size: Pictures captioned together by ``caption_folder``.
        name: The server's name in the MCP handshake.
    """

    def __init__(
        self,
        backend: Backend | Callable[[], Backend],
        *,
        allowed_roots: Sequence[str | os.PathLike[str]] | None = None,
        allow_urls: bool = False,
        policy: ImagePolicy | None = None,
        caption_cache: CaptionCache | str | os.PathLike[str] | None = None,
        model_key: str | Callable[[], str] | None = None,
        generation: dict[str, Any] | None = None,
        caption_batch_size: int = 4,
        name: str = "belle-vl",
    ) -> None:
        roots = [Path.cwd()] if allowed_roots is None else [Path(os.fsdecode(r)) for r in allowed_roots]
        for root in roots:
            if not root.is_dir():
                raise ImageNotFoundError(f"The allowed folder {str(root)!r} is not a folder: name an existing folder.")
        self.allowed_roots: tuple[Path, ...] = tuple(dict.fromkeys(root.expanduser().resolve() for root in roots))
        self.allow_urls = bool(allow_urls)
        self.policy = dataclasses.replace(
            policy if policy is not None else ImagePolicy(),
            allowed_roots=self.allowed_roots,
            allow_urls=self.allow_urls,
        )
        self.backend = _ServedBackend(backend)
        self.generation = dict(generation or {})
        if isinstance(caption_batch_size, bool) or not isinstance(caption_batch_size, int) or caption_batch_size < 1:
            raise ValueError(f"caption_batch_size must be a positive integer; got {caption_batch_size!r}.")
        self.caption_batch_size = caption_batch_size
        self._caption_cache = caption_cache if caption_cache is not None else ":memory:"
        self._cache: CaptionCache | None = None
        self._model_key = model_key
        self._stores: WeakKeyDictionary[Any, ImageStore] = WeakKeyDictionary()
        # The core registry: names, descriptions and argument schemas of the vision tools.
        # the tools call chat and achat only, which the lazily loaded backend answers
        tools = make_tools(self.backend, self.policy)  # type: ignore[arg-type]
        self._specs = {name: tool.spec() for name, tool in tools.items()}
        self.server: Server = Server(name, version=__version__, instructions=self._instructions())
        self.server.list_tools()(self._list_tools)
        self.server.call_tool(validate_input=True)(self._call_tool)

    # --- description ------------------------------------------------------------------------------------------
    def _instructions(self) -> str:
        urls = "http(s) URLs of public pictures" if self.allow_urls else "no URLs (the operator has not allowed them)"
        return (
            "Vision tools: describe, ask about, locate things in and read text in pictures. Pass `image` as a path "
            "relative to the folders this server may read (or an absolute path inside them), a data URL or base64 "
            f"data, a handle from add_image, or {urls}. caption_folder captions every picture of a folder."
        )

    def tools(self) -> list[types.Tool]:
        """The MCP tool list: the core tools (their schemas and descriptions), add_image and caption_folder."""
        annotations = types.ToolAnnotations(readOnlyHint=True, openWorldHint=self.allow_urls)
        listed = [
            types.Tool(
                name=spec.name,
                description=spec.description,
                inputSchema=spec.parameters,
                outputSchema=_OUTPUTS[spec.name].model_json_schema(),
                annotations=annotations,
            )
            for spec in self._specs.values()
        ]
        listed.append(
            types.Tool(
                name="add_image",
                description=(
                    "Keep a picture for this session and get a short handle (image_1, ...) to pass as `image` to "
                    "the other tools, so a large data URL or base64 picture is sent once."
                ),
                inputSchema=AddImageInput.model_json_schema(),
                outputSchema=AddedImage.model_json_schema(),
                annotations=annotations,
            )
        )
        listed.append(
            types.Tool(
                name="caption_folder",
                description=(
                    "Caption every picture in a folder (cached, so a second call is instant), to find pictures by "
                    "what they show. Returns one caption per picture with its path."
                ),
                inputSchema=CaptionFolderInput.model_json_schema(),
                outputSchema=FolderCaptions.model_json_schema(),
                annotations=types.ToolAnnotations(readOnlyHint=False, idempotentHint=True, openWorldHint=False),
            )
        )
        return listed

    async def _list_tools(self) -> list[types.Tool]:
        return self.tools()

    # --- per request ------------------------------------------------------------------------------------------
    def _store(self, session: Any) -> ImageStore:
        store = self._stores.get(session)
        if store is None:
            store = self._stores[session] = ImageStore()
        return store

    async def _roots(self) -> tuple[Path, ...]:
        """The operator's folders, narrowed to the host's declared roots when the host declares roots.

        An empty roots list (MCP Inspector declares one) names no folder to narrow to: it counts as a host
        without roots, the operator's folders alone."""
        ctx = self.server.request_context
        params = ctx.session.client_params
        if params is None or params.capabilities.roots is None:
            return self.allowed_roots
        try:
            listed = await ctx.session.send_request(
                types.ServerRequest(types.ListRootsRequest()),
                types.ListRootsResult,
                request_read_timeout_seconds=timedelta(seconds=ROOTS_TIMEOUT),
                metadata=ServerMessageMetadata(related_request_id=ctx.request_id),
            )
        except Exception as exc:  # a host that declares roots but cannot list them gets no local files
            logger.warning("The host declared roots but listing them failed: %s", exc)
            return ()
        if not listed.roots:
            return self.allowed_roots
        declared = [path for path in (_root_path(str(root.uri)) for root in listed.roots) if path is not None]
        return _intersect(self.allowed_roots, declared)

    def _reporter(self) -> Reporter | None:
        ctx = self.server.request_context
        token = ctx.meta.progressToken if ctx.meta is not None else None
        if token is None:
            return None
        session, request_id = ctx.session, ctx.request_id

        async def report(progress: float, total: float | None, message: str) -> None:
            await session.send_progress_notification(
                token, progress, total, message, related_request_id=str(request_id)
            )

        return report

    def _local_path(self, ref: str, roots: Sequence[Path], display: _Display, *, folder: bool = False) -> Path | None:
        """The file (or folder) a path argument names inside the allowed folders, or None if ``ref`` is not a
        path (base64 data). Raises with a message for the agent when it lies outside them or does not exist."""
        text = ref.strip()
        expanded = os.path.expanduser(text)
        absolute = os.path.isabs(expanded)
        candidates = [Path(expanded)] if absolute else [root / expanded for root in roots]
        outside = False
        for candidate in candidates:
            try:
                resolved = candidate.resolve()
            except (OSError, RuntimeError, ValueError):
                continue
            if not any(_within(resolved, root) for root in roots):
                outside = True
                continue
            if resolved.is_dir() if folder else os.path.lexists(resolved):
                display.relative(resolved)
                return resolved
        if not folder and not absolute and _looks_like_base64(text):
            return None
        shown = repr(text if len(text) <= 200 else text[:200] + "...")
        if outside or (absolute and not roots) or not roots:
            raise ImageAccessDeniedError(
                f"Refused to read {shown}: it lies outside the folders this server may read. "
                f"{_roots_hint(roots)}; pass a path inside them, or the picture as a data URL or base64 data."
            )
        what = "folder" if folder else "file"
        raise ImageNotFoundError(
            f"No such {what}: {shown}. {_roots_hint(roots)}; check the spelling"
            + (", or call caption_folder to list the pictures." if not folder else ".")
        )

    def _image_argument(self, ref: Any, roots: Sequence[Path], store: ImageStore, display: _Display) -> Any:
        """The ``image`` argument for the core tool: paths made absolute inside the allowed folders, URLs refused
        here with the operator's switch named when they are off; the tool's policy checks everything again."""
        if not isinstance(ref, str):
            return ref  # the tool's schema check reports it
        text = ref.strip()
        if ref in store or _HANDLE_RE.fullmatch(text) or text[:5].lower() == "data:":
            return ref
        if _SCHEME_RE.match(text) or text[:6].lower() in ("http:/", "https:"):
            if text.lower().startswith(("http://", "https://")) and not self.allow_urls:
                raise ImageAccessDeniedError(
                    "Refused to fetch the URL: this server does not fetch image URLs (its operator can allow them "
                    "with --allow-urls). Pass a path inside the allowed folders, a data URL or base64 data instead."
                )
            return ref  # the policy refuses file:// and other schemes with its own message
        path = self._local_path(text, roots, display)
        return ref if path is None else str(path)

    async def _call_tool(self, name: str, arguments: dict[str, Any]) -> types.CallToolResult:
        report = self._reporter()
        token = _REPORTER.set(report)
        try:
            roots = await self._roots()
            display = _Display(roots)
            store = self._store(self.server.request_context.session)
            try:
                if name == "caption_folder":
                    return await self._caption_folder(arguments, roots, display, report)
                if name == "add_image":
                    return await self._add_image(arguments, roots, store, display)
                if name not in self._specs:
                    raise BelleVLError(f"Unknown tool {name!r}: call one of {', '.join(self._specs)}.")
                arguments = dict(arguments)
                if "image" in arguments:
                    arguments["image"] = self._image_argument(arguments["image"], roots, store, display)
            except (BelleVLError, ValidationError) as exc:
                return _error_result(display(_message(exc)))
            policy = dataclasses.replace(self.policy, allowed_roots=roots)
            backend: Any = self.backend  # a Backend for the tools: they call chat and achat only
            tool = BelleVLTool(name, backend, policy=policy, store=store, generation=self.generation)
            result = await tool.arun(**arguments)
            return _tool_result(name, result, display)
        finally:
            _REPORTER.reset(token)

    # --- add_image --------------------------------------------------------------------------------------------
    async def _add_image(
        self, arguments: dict[str, Any], roots: Sequence[Path], store: ImageStore, display: _Display
    ) -> types.CallToolResult:
        from .images import load_image

        args = AddImageInput.model_validate(arguments)
        source = self._image_argument(args.image, roots, store, display)
        known = store.resolve(args.image)
        policy = dataclasses.replace(self.policy, allowed_roots=tuple(roots))
        picture = await anyio.to_thread.run_sync(load_image, known if known is not None else source, policy)
        handle = store.add(picture)
        added = AddedImage(handle=handle, width=picture.width, height=picture.height)
        text = f"Added the picture as {handle} ({picture.width}x{picture.height} pixels): pass image={handle!r}."
        return types.CallToolResult(
            content=[types.TextContent(type="text", text=text)], structuredContent=added.model_dump(mode="json")
        )

    # --- caption_folder ---------------------------------------------------------------------------------------
    def _cache_handle(self) -> CaptionCache:
        if self._cache is None:
            cache = self._caption_cache
            self._cache = cache if isinstance(cache, CaptionCache) else CaptionCache(cache)
        return self._cache

    def _key(self) -> str:
        key = self._model_key
        if callable(key):
            key = key()
        if key:
            return str(key)
        return str(getattr(self.backend.load_blocking(), "model_name", "") or "belle-vl")

    async def _caption_folder(
        self, arguments: dict[str, Any], roots: Sequence[Path], display: _Display, report: Reporter | None
    ) -> types.CallToolResult:
        args = CaptionFolderInput.model_validate(arguments)
        folder = self._local_path(args.folder, roots, display, folder=True)
        assert folder is not None
        paths = await anyio.to_thread.run_sync(lambda: find_images(folder, recursive=args.recursive))
        if args.limit is not None:
            paths = paths[: args.limit]
        if not paths:
            shown = display.relative(folder)
            return _error_result(f"Error: No pictures in {shown!r} (looked for .png, .jpg, .webp, ... files).")
        total = len(paths)
        policy = dataclasses.replace(self.policy, allowed_roots=tuple(roots))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        stop = threading.Event()

        def post(kind: str, payload: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, payload))

        def factory() -> Backend:
            if not self.backend.loaded:
                post("loading", None)
            return self.backend.load_blocking()

        def work() -> None:
            try:
                records = caption_images(
                    paths,
                    factory,
                    cache=self._cache_handle(),
                    model_name=self._key(),
                    detail=args.detail,
                    language=args.language,
                    batch_size=self.caption_batch_size,
                    progress=False,
                    on_error="skip",
                    image_policy=policy,
                    **self.generation,
                )
                with contextlib.closing(records):
                    for record in records:
                        post("record", record)
                        if stop.is_set():
                            break
                post("done", None)
            except BaseException as exc:  # handed to the request
                post("error", exc)

        captions: list[FolderCaption] = []
        worker = loop.run_in_executor(None, work)
        try:
            while True:
                kind, payload = await queue.get()
                if kind == "loading":
                    if report is not None:
                        await report(0, total, "Loading the model (first use)")
                elif kind == "record":
                    shown = display.relative(Path(payload.path).resolve())
                    captions.append(
                        FolderCaption(
                            path=shown,
                            caption=payload.caption,
                            width=payload.width,
                            height=payload.height,
                            cached=payload.cached,
                        )
                    )
                    if report is not None:
                        await report(len(captions), total, f"Captioned {shown}")
                elif kind == "error":
                    if isinstance(payload, BelleVLError | ValueError | OSError):
                        return _error_result(display(_message(payload)))
                    raise payload
                else:
                    break
        finally:
            stop.set()  # a cancelled request stops after the batch in progress
            with anyio.CancelScope(shield=True):
                await worker
        result = FolderCaptions(
            folder=display.relative(folder),
            captions=captions,
            cached=sum(c.cached for c in captions),
            new=sum(not c.cached for c in captions),
            skipped=total - len(captions),
        )
        lines = [f"{c.path}: {c.caption}" for c in captions]
        skipped = f", {result.skipped} unreadable file(s) skipped" if result.skipped else ""
        head = f"{len(captions)} picture(s) in {result.folder!r} ({result.cached} from the cache{skipped}):"
        return types.CallToolResult(
            content=[types.TextContent(type="text", text="\n".join([head, *lines]))],
            structuredContent=result.model_dump(mode="json"),
        )

    # --- transports -------------------------------------------------------------------------------------------
    async def run_stdio(self) -> None:
        """Serve one host over stdin/stdout until it closes them (stray prints go to stderr)."""
        from mcp.server.stdio import stdio_server

        async with stdio_server() as (read, write):
            with contextlib.redirect_stdout(sys.stderr):
                await self.server.run(read, write, self.server.create_initialization_options())

    def streamable_http_app(
        self,
        *,
        api_key: str | None = None,
        host: str = "127.0.0.1",
        path: str = "/mcp",
        allowed_hosts: Sequence[str] = (),
    ) -> Any:
        """A Starlette app serving MCP's streamable HTTP transport at ``path``; with ``api_key``, requests need
        ``Authorization: Bearer <api_key>``. The Host and Origin headers must name the bind address (and the
        loopback names on a loopback bind) or one of ``allowed_hosts`` (DNS rebinding protection, whatever the bind
        address: :func:`allowed_http_hosts`); a request body must arrive within :data:`BODY_TIMEOUT` seconds and be at
        most :data:`MAX_BODY_BYTES`."""
        from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
        from mcp.server.transport_security import TransportSecuritySettings
        from starlette.applications import Starlette
        from starlette.routing import Route

        hosts = allowed_http_hosts(host, allowed_hosts)
        origins = [f"{scheme}://{name}" for name in hosts for scheme in ("http", "https")]
        security = TransportSecuritySettings(
            enable_dns_rebinding_protection=True, allowed_hosts=hosts, allowed_origins=origins
        )
        manager = StreamableHTTPSessionManager(
            app=self.server, security_settings=security, max_request_body_size=MAX_BODY_BYTES
        )
        return Starlette(
            routes=[Route(path, endpoint=_BearerGate(manager, api_key))],
            lifespan=lambda app: manager.run(),
        )

    def serve_http(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 8765,
        api_key: str | None = None,
        log_level: str = "info",
        allowed_hosts: Sequence[str] = (),
    ) -> None:
        """Serve over streamable HTTP at ``http://host:port/mcp`` with uvicorn until interrupted."""
        import uvicorn

        app = self.streamable_http_app(api_key=api_key, host=host, allowed_hosts=allowed_hosts)
        uvicorn.run(app, host=host, port=port, log_level=log_level)


class _BearerGate:
    """An ASGI app that lets a request through to the MCP session manager only with the right bearer key."""

    def __init__(self, manager: Any, api_key: str | None) -> None:
        self.manager = manager
        self.api_key = api_key or None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("method") in ("POST", "PUT", "PATCH"):
            receive = await _read_body(receive, send)
            if receive is None:
                return
        if self.api_key is not None and scope["type"] == "http":
            headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                body = json.dumps(
                    {"error": "Missing or wrong API key: send 'Authorization: Bearer <key>' (the server's --api-key)."}
                ).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"www-authenticate", b"Bearer"),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.manager.handle_request(scope, receive, send)


async def _plain_error(send: Any, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Any, send: Any) -> Any:
    """Read the whole request body within BODY_TIMEOUT seconds and MAX_BODY_BYTES; return a ``receive`` that
    replays it (then passes on to the client's), or answer 408 / 413 and return None."""
    chunks: list[bytes] = []
    size = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BODY_TIMEOUT
    while True:
        try:
            message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:  # noqa: UP041 (TimeoutError is asyncio's only from Python 3.11)
            await _plain_error(send, 408, f"The request body did not arrive within {BODY_TIMEOUT:g} seconds.")
            return None
        if message["type"] != "http.request":
            return None  # the client went away
        size += len(message.get("body", b""))
        if size > MAX_BODY_BYTES:
            await _plain_error(send, 413, f"The request body is over {MAX_BODY_BYTES >> 20} MiB.")
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

    async def replaying() -> Any:
        return replay.pop() if replay else await receive()

    return replaying


# ---------------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------------


def _message(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'arguments'}: {error['msg']}" for error in exc.errors()
        )
        return f"Error: invalid arguments: {problems}."
    return f"Error: {exc}"


def _error_result(text: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)], isError=True)


def _png(picture: Any) -> str:
    if max(picture.size) > DRAWN_MAX_SIDE:
        picture = picture.copy()
        picture.thumbnail((DRAWN_MAX_SIDE, DRAWN_MAX_SIDE))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _tool_result(name: str, result: ToolResult, display: _Display) -> types.CallToolResult:
    """A core tool's result as an MCP result: the text, the structured data and (locate_objects) the drawing."""
    text = display(result.text)
    if result.is_error:
        return _error_result(text)
    data = dict(result.data)
    if isinstance(data.get("image"), str):
        data["image"] = display(data["image"]).strip("'\"")
    try:
        structured = _OUTPUTS[name].model_validate(data).model_dump(mode="json")
    except ValidationError as exc:
        return _error_result(f"Error: {name} returned data outside its output schema ({_message(exc)[7:]})")
    content: list[types.ContentBlock] = [types.TextContent(type="text", text=text)]
    if result.artifact is not None:
        content.append(types.ImageContent(type="image", data=_png(result.artifact), mimeType="image/png"))
    return types.CallToolResult(content=content, structuredContent=structured)
