"""An OpenAI-compatible HTTP server over a backend (the local runtime, usually).

``create_app(backend)`` returns a FastAPI app with

* ``POST /v1/chat/completions``: text and ``image_url`` parts (data URLs always; ``http(s)`` URLs only when the
  server's image policy allows them), SSE streaming, ``max_tokens`` / ``max_completion_tokens``, ``temperature``,
  ``top_p``, ``stop``, ``seed`` (and ``top_k`` / ``repetition_penalty`` as extensions), usage, ``tools`` /
  ``tool_choice`` through the ReAct protocol of :mod:`belle_vl_tools.toolcalls` answered as OpenAI ``tool_calls``,
  and ``response_format`` ``json_object`` / ``json_schema``;
* ``GET /v1/models``, ``GET /v1/models/{id}`` and ``GET /health``;
* OpenAI-shaped error bodies (``{"error": {"message", "type", "param", "code"}}``), an optional bearer key, and
  limits on the request size, the number and the size of images.

Requests are answered by one worker thread (:class:`BatchScheduler`): requests that wait together and share their
generation settings go to the model as one batch (``generate_batch``), so two generations never race on one model.
A request that arrives while a batch runs joins the next batch, which starts as soon as the running one ends. The
queue of waiting requests is bounded (a full queue answers 503), and a client that disconnects while its request
waits frees its place; a streaming client that disconnects stops its generation. Streaming requests run alone
(their tokens go out as they are made), except those with tools or a response format, which need the whole answer
before anything can be sent and so are batched like the others.

``serve(model_path, host, port)`` loads a checkpoint and runs the app with uvicorn.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .backend import Backend, ChatResult, StreamChunk
from .errors import (
    BelleVLError,
    ContextLengthError,
    ImageAccessDeniedError,
    ImageError,
    ImageFetchError,
    ImageTooLargeError,
    PromptError,
)
from .images import ImagePolicy, load_image

logger = logging.getLogger(__name__)

DEFAULT_SYSTEM = "You are a helpful assistant."
DEFAULT_MAX_REQUEST_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_IMAGE_BYTES = 16 * 1024 * 1024
ROLES = ("system", "developer", "user", "assistant", "tool")

__all__ = [
    "APIError",
    "BatchScheduler",
    "QueueFullError",
    "ServerConfig",
    "background_server",
    "create_app",
    "serve",
    "server_image_policy",
]


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered with an OpenAI-shaped body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class QueueFullError(APIError):
    """The scheduler's queue of waiting requests is full."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            503,
            f"The server is busy: {limit} requests are already waiting. Retry after a short pause.",
            type="server_error",
            code="queue_full",
            headers={"Retry-After": "1"},
        )


def _api_error(exc: BaseException, param: str | None = None) -> APIError:
    """The HTTP error for an exception raised while preparing or answering a request."""
    if isinstance(exc, APIError):
        return exc
    message = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, ImageTooLargeError):
        return APIError(400, message, param=param, code="image_too_large")
    if isinstance(exc, ImageAccessDeniedError):
        return APIError(400, message, param=param, code="image_url_not_allowed")
    if isinstance(exc, ImageFetchError):
        return APIError(400, message, param=param, code="image_fetch_failed")
    if isinstance(exc, ImageError):
        return APIError(400, message, param=param, code="invalid_image")
    if isinstance(exc, ContextLengthError):
        return APIError(400, message, param="messages", code="context_length_exceeded")
    if isinstance(exc, PromptError):
        return APIError(400, message, param=param)
    if isinstance(exc, BelleVLError):
        return APIError(500, message, type="server_error", code="backend_error")
    logger.exception("Request failed", exc_info=exc)
    return APIError(500, f"The model failed to answer ({type(exc).__name__}).", type="server_error")


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------


def server_image_policy(
    policy: ImagePolicy | None = None, *, allow_urls: bool = False, max_image_bytes: int | None = None
) -> ImagePolicy:
    """The policy for images in requests: never local files; data URLs always; http(s) only when allowed."""
    if policy is None:
        policy = ImagePolicy(allowed_roots=(), allow_local_files=False, allow_urls=allow_urls)
    changes: dict[str, Any] = {"allow_local_files": False, "allowed_roots": ()}
    if allow_urls:
        changes["allow_urls"] = True
    if max_image_bytes is not None:
        changes["max_bytes"] = max_image_bytes
    elif policy.max_bytes > DEFAULT_MAX_IMAGE_BYTES:
        changes["max_bytes"] = DEFAULT_MAX_IMAGE_BYTES
    return dataclasses.replace(policy, **changes)


@dataclasses.dataclass
class ServerConfig:
    """Settings of one app (see :func:`create_app`)."""

    model_name: str
    aliases: frozenset[str]
    api_key: str | None
    image_policy: ImagePolicy
    max_request_bytes: int
    max_images_per_request: int
    max_tokens_limit: int
    default_max_tokens: int | None


# ---------------------------------------------------------------------------------------------------------------
# The scheduler
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class Job:
    """One request waiting for, or getting, its answer."""

    messages: list[dict[str, Any]]
    generation: dict[str, Any]
    loop: asyncio.AbstractEventLoop
    stream: bool = False
    key: str | None = None  # requests with equal keys may share a batch; None runs alone
    future: asyncio.Future | None = None
    events: asyncio.Queue | None = None
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    enqueued: float = dataclasses.field(default_factory=time.monotonic)

    def deliver(self, result: ChatResult | None = None, error: BaseException | None = None) -> None:
        def settle() -> None:
            if self.future is None or self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self.loop.call_soon_threadsafe(settle)

    def emit(self, kind: str, payload: Any) -> None:
        assert self.events is not None
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))


def batch_key(generation: Mapping[str, Any]) -> str | None:
    """Requests with the same key can share a batch. Sampling with a seed runs alone, so a seed reproduces."""
    sampled = generation.get("temperature") != 0
    if generation.get("seed") is not None and sampled:
        return None
    return json.dumps(generation, sort_keys=True, default=str)


class BatchScheduler:
    """Feeds queued requests to one backend from one worker thread, batching those with equal settings.

    ``max_batch_size`` caps a batch, ``max_queue`` the requests waiting (not yet running); ``batch_wait`` is how
    long (seconds) the worker lets a burst of requests gather before it takes the next batch.
    """

    def __init__(
        self, backend: Backend, *, max_batch_size: int = 8, max_queue: int = 64, batch_wait: float = 0.002
    ) -> None:
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be at least 1.")
        self.backend = backend
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.batch_wait = batch_wait
        self._pending: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.running = 0
        self.stats = {"batches": 0, "requests": 0, "largest_batch": 0, "cancelled": 0}

    # --- queue ---------------------------------------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        return len(self._pending)

    def submit(self, job: Job) -> None:
        """Queue a job; :class:`QueueFullError` when ``max_queue`` jobs already wait."""
        with self._cond:
            if self._closed:
                raise APIError(503, "The server is shutting down.", type="server_error", code="shutting_down")
            if len(self._pending) >= self.max_queue:
                raise QueueFullError(self.max_queue)
            self._pending.append(job)
            self._ensure_started()
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """The client is gone: drop the job if it still waits, and stop its stream if it runs."""
        job.cancelled.set()
        with self._cond:
            try:
                self._pending.remove(job)
                self.stats["cancelled"] += 1
            except ValueError:
                pass

    def _ensure_started(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="belle-vl-scheduler", daemon=True)
            self._thread.start()

    def start(self) -> None:
        with self._cond:
            self._closed = False
            self._ensure_started()

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop taking jobs, fail the waiting ones and let the worker end."""
        with self._cond:
            self._closed = True
            pending = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
            thread = self._thread
        error = APIError(503, "The server is shutting down.", type="server_error", code="shutting_down")
        for job in pending:
            job.emit("error", error) if job.stream else job.deliver(error=error)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # --- worker --------------------------------------------------------------------------------------------------
    def _take(self) -> list[Job]:
        first = self._pending.popleft()
        batch = [first]
        if first.stream or first.key is None or self.max_batch_size == 1:
            return batch
        for job in list(self._pending):
            if len(batch) >= self.max_batch_size:
                break
            if not job.stream and job.key == first.key:
                self._pending.remove(job)
                batch.append(job)
        return batch

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
            if self.batch_wait > 0:
                time.sleep(self.batch_wait)  # let requests sent together arrive together
            with self._cond:
                if not self._pending:
                    continue
                batch = [job for job in self._take() if not job.cancelled.is_set()]
                self.running = len(batch)
            try:
                if not batch:
                    continue
                self.stats["batches"] += 1
                self.stats["requests"] += len(batch)
                self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
                if batch[0].stream:
                    self._stream(batch[0])
                else:
                    self._answer(batch)
            except BaseException as exc:  # never let the worker die
                logger.exception("The scheduler's worker failed", exc_info=exc)
            finally:
                with self._cond:
                    self.running = 0

    def _answer(self, batch: list[Job]) -> None:
        try:
            if len(batch) == 1:
                results = [self.backend.chat(batch[0].messages, **batch[0].generation)]
            else:
                results = self.backend.generate_batch([job.messages for job in batch], **batch[0].generation)
        except Exception as exc:
            if len(batch) == 1:
                batch[0].deliver(error=exc)
                return
            for job in batch:  # one bad request must not fail the others: answer them one by one
                self._answer([job])
            return
        for job, result in zip(batch, results, strict=True):
            job.deliver(result)

    def _stream(self, job: Job) -> None:
        iterator = self.backend.stream(job.messages, **job.generation)
        try:
            for chunk in iterator:
                if job.cancelled.is_set():
                    return
                job.emit("chunk", chunk)
            job.emit("done", None)
        except Exception as exc:
            job.emit("error", exc)
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()  # stops the generation of a client that went away


# ---------------------------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ChatRequest:
    """A validated chat completion request."""

    model: str
    messages: list[dict[str, Any]]
    generation: dict[str, Any]
    stream: bool
    include_usage: bool
    tools: list[Any]  # ToolSpec
    tool_choice: Any
    response_format: str  # "text", "json_object", "json_schema"
    json_schema: dict[str, Any] | None
    image_sources: list[tuple[int, int, str]]  # (message index, part index, url)


def _fail(message: str, param: str | None = None, code: str | None = None, status: int = 400) -> APIError:
    return APIError(status, message, param=param, code=code)


def _number(body: Mapping[str, Any], name: str, low: float, high: float, *, low_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(f"{name} must be a number, not {json.dumps(value)[:40]}.", name)
    if value > high or value < low or (low_open and value == low):
        bound = f"> {low}" if low_open else f">= {low}"
        raise _fail(f"{name} must be {bound} and <= {high}, not {value}.", name)
    return float(value)


def _integer(body: Mapping[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _fail(f"{name} must be an integer from {low} to {high}, not {json.dumps(value)[:40]}.", name)
    return value


def _parse_content(content: Any, index: int, role: str, images: list[tuple[int, int, str]]) -> Any:
    param = f"messages[{index}].content"
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise _fail(f"{param} must be a string or a list of content parts.", param)
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        if not isinstance(part, Mapping):
            raise _fail(f"{where} must be an object such as {{'type': 'text', 'text': ...}}.", where)
        kind = part.get("type")
        if kind in ("text", "input_text"):
            if not isinstance(part.get("text"), str):
                raise _fail(f"{where} is a text part without a string 'text'.", where)
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            if role not in ("user", "tool"):
                raise _fail(f"{where}: only user messages (and tool results) can hold images.", where)
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, Mapping) else image_url
            if not isinstance(url, str) or not url.strip():
                raise _fail(f"{where} needs {{'image_url': {{'url': 'data:image/png;base64,...'}}}}.", where)
            if not url.lstrip()[:8].lower().startswith(("data:", "http://", "https://")):
                raise _fail(
                    f"{where}: the image URL must be a data URL (data:image/...;base64,...) or an http(s) URL.",
                    where,
                    code="invalid_image_url",
                )
            images.append((index, len(parts), url))
            parts.append({"type": "image_url", "image_url": {"url": url}})
        else:
            raise _fail(f"{where} has type {kind!r}: this model reads 'text' and 'image_url' parts.", where)
    return parts


def parse_chat_request(body: Any, config: ServerConfig) -> ChatRequest:
    """Validate a chat completions body; raises :class:`APIError` (400 / 404) naming the bad field."""
    if not isinstance(body, Mapping):
        raise _fail("The request body must be a JSON object.")
    model = body.get("model")
    if model is None:
        model = config.model_name
    if not isinstance(model, str) or model not in config.aliases:
        raise APIError(
            404,
            f"The model {model!r} does not exist on this server; it serves {config.model_name!r} (GET /v1/models).",
            param="model",
            code="model_not_found",
        )
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise _fail("messages must be a non-empty list of {'role': ..., 'content': ...} objects.", "messages")

    images: list[tuple[int, int, str]] = []
    messages: list[dict[str, Any]] = []
    call_names: dict[str, str] = {}
    for i, raw in enumerate(raw_messages):
        if not isinstance(raw, Mapping):
            raise _fail(f"messages[{i}] must be an object with 'role' and 'content'.", f"messages[{i}]")
        role = raw.get("role")
        if role not in ROLES:
            raise _fail(f"messages[{i}].role is {role!r}; use one of {', '.join(ROLES)}.", f"messages[{i}].role")
        role = "system" if role == "developer" else role
        message: dict[str, Any] = {"role": role, "content": _parse_content(raw.get("content"), i, role, images)}
        if role == "assistant" and raw.get("tool_calls"):
            calls = raw["tool_calls"]
            if not isinstance(calls, list):
                raise _fail(f"messages[{i}].tool_calls must be a list.", f"messages[{i}].tool_calls")
            for call in calls:
                function = call.get("function") if isinstance(call, Mapping) else None
                if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
                    raise _fail(
                        f"messages[{i}].tool_calls holds {json.dumps(call)[:80]}; each call needs "
                        "{'id', 'type': 'function', 'function': {'name', 'arguments'}}.",
                        f"messages[{i}].tool_calls",
                    )
                call_names[str(call.get("id"))] = function["name"]
            message["tool_calls"] = calls
        if role == "tool":
            call_id = raw.get("tool_call_id")
            message["tool_call_id"] = call_id
            message["name"] = raw.get("name") or call_names.get(str(call_id), "tool")
        messages.append(message)
    if len(images) > config.max_images_per_request:
        raise _fail(
            f"The request holds {len(images)} images; this server takes at most {config.max_images_per_request}.",
            "messages",
            code="too_many_images",
        )

    n = body.get("n")
    if n not in (None, 1):
        raise _fail("n must be 1: this server returns one choice per request.", "n")
    generation: dict[str, Any] = {}
    limit = config.max_tokens_limit
    max_tokens = _integer(body, "max_completion_tokens", 1, limit)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1, limit)
    if max_tokens is None:
        max_tokens = config.default_max_tokens
    if max_tokens is not None:
        generation["max_new_tokens"] = max_tokens
    temperature = _number(body, "temperature", 0, 2)
    if temperature is not None:
        generation["temperature"] = temperature
    top_p = _number(body, "top_p", 0, 1, low_open=True)
    if top_p is not None:
        generation["top_p"] = top_p
    top_k = _integer(body, "top_k", -1, 1_000_000)
    if top_k is not None and top_k > 0:
        generation["top_k"] = top_k
    penalty = _number(body, "repetition_penalty", 0, 10, low_open=True)
    if penalty is not None:
        generation["repetition_penalty"] = penalty
    seed = body.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise _fail("seed must be an integer.", "seed")
        generation["seed"] = seed
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or len(stops) > 16 or not all(isinstance(s, str) and s for s in stops):
            raise _fail("stop must be a non-empty string or a list of at most 16 non-empty strings.", "stop")
        if stops:
            generation["stop"] = list(stops)

    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise _fail("stream must be true or false.", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, Mapping):
        raise _fail("stream_options must be an object.", "stream_options")
    include_usage = bool(options.get("include_usage"))

    tools: list[Any] = []
    raw_tools = body.get("tools")
    tool_choice = body.get("tool_choice")
    if raw_tools is not None or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
        from .toolcalls import ToolSpec

        if raw_tools is not None and not isinstance(raw_tools, list):
            raise _fail("tools must be a list of {'type': 'function', 'function': {...}} objects.", "tools")
        try:
            tools = [ToolSpec.from_openai(tool) for tool in raw_tools or []]
        except PromptError as exc:
            raise _fail(" ".join(str(exc).split()), "tools") from None
    if tool_choice is not None and not (
        tool_choice in ("auto", "none", "required") or isinstance(tool_choice, Mapping)
    ):
        raise _fail("tool_choice must be 'auto', 'none', 'required' or {'type': 'function', ...}.", "tool_choice")

    response_format, schema = "text", None
    fmt = body.get("response_format")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, Mapping) else None
        if kind not in ("text", "json_object", "json_schema"):
            raise _fail("response_format.type must be 'text', 'json_object' or 'json_schema'.", "response_format")
        response_format = kind
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, Mapping) else None
            if not isinstance(schema, Mapping):
                raise _fail("response_format.json_schema needs a 'schema' object.", "response_format")
            schema = dict(schema)
    return ChatRequest(
        model=model,
        messages=messages,
        generation=generation,
        stream=stream,
        include_usage=include_usage,
        tools=tools,
        tool_choice=tool_choice,
        response_format=response_format,
        json_schema=schema,
        image_sources=images,
    )


def _load_images(request: ChatRequest, policy: ImagePolicy) -> None:
    """Replace the image_url parts by pictures loaded under the server's policy (raises APIError)."""
    for index, part_index, url in request.image_sources:
        try:
            picture = load_image(url, policy)
        except ImageError as exc:
            raise _api_error(exc, f"messages[{index}].content") from None
        request.messages[index]["content"][part_index] = {"type": "image", "image": picture}


def _json_instruction(request: ChatRequest) -> str | None:
    if request.response_format == "json_object":
        return "Answer with one JSON object and nothing else."
    if request.response_format == "json_schema":
        schema = json.dumps(request.json_schema, ensure_ascii=False)
        return f"Answer with one JSON object that follows this JSON schema, and nothing else: {schema}"
    return None


def model_messages(request: ChatRequest) -> tuple[list[dict[str, Any]], bool]:
    """The conversation as the backend takes it, and whether the reply is to be read for tool calls."""
    messages = request.messages
    instruction = _json_instruction(request)
    if instruction is not None:
        messages = [dict(m) for m in messages]
        if messages[0]["role"] == "system":
            text = messages[0]["content"]
            if isinstance(text, list):
                text = "\n".join(p["text"] for p in text if p.get("type") == "text")
            messages[0]["content"] = f"{text}\n{instruction}" if text else instruction
        else:
            messages.insert(0, {"role": "system", "content": f"{DEFAULT_SYSTEM}\n{instruction}"})
    uses_tools = bool(request.tools) and request.tool_choice != "none"
    if uses_tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
        from .toolcalls import render_tool_messages

        messages = render_tool_messages(messages, request.tools, request.tool_choice)
    return messages, uses_tools


def extract_json(text: str) -> str | None:
    """The first JSON object written in ``text`` (fences and stray words around it ignored), or None."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start >= 0:
        try:
            value, end = decoder.raw_decode(text, start)
        except ValueError:
            start = text.find("{", start + 1)
            continue
        if isinstance(value, dict):
            return text[start:end]
        start = text.find("{", end)
    return None


@dataclasses.dataclass
class Answer:
    """What goes into a choice: content, tool calls, finish reason."""

    content: str | None
    tool_calls: list[dict[str, Any]]
    finish_reason: str


def shape_answer(request: ChatRequest, result: ChatResult, uses_tools: bool) -> Answer:
    """The model's text as an OpenAI choice: tool calls read from the ReAct format, JSON picked out."""
    text = result.text
    if uses_tools:
        from .toolcalls import parse_reply

        parsed = parse_reply(text, request.tools)
        if parsed.tool_calls:
            calls = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)},
                }
                for call in parsed.tool_calls
            ]
            return Answer(parsed.content or None, calls, "tool_calls")
        text = parsed.content if not parsed.invalid_tool_calls else text
    if request.response_format in ("json_object", "json_schema"):
        found = extract_json(text)
        if found is not None:
            text = found
    return Answer(text, [], result.finish_reason)


# ---------------------------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------------------------


def _usage(result_usage: Any) -> dict[str, int]:
    return {
        "prompt_tokens": result_usage.prompt_tokens,
        "completion_tokens": result_usage.completion_tokens,
        "total_tokens": result_usage.total_tokens,
    }


def _completion(request_id: str, model: str, answer: Answer, result: ChatResult) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": answer.content}
    if answer.tool_calls:
        message["tool_calls"] = answer.tool_calls
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": answer.finish_reason}],
        "usage": _usage(result.usage),
        "system_fingerprint": None,
    }


class _Chunks:
    """Builds the SSE events of one streamed completion."""

    def __init__(self, request_id: str, model: str, include_usage: bool) -> None:
        self.request_id = request_id
        self.model = model
        self.include_usage = include_usage
        self.created = int(time.time())

    def event(self, delta: dict[str, Any] | None, finish_reason: str | None = None, usage: Any = None) -> str:
        data: dict[str, Any] = {
            "id": self.request_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": []
            if delta is None
            else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if self.include_usage:
            data["usage"] = _usage(usage) if usage is not None else None
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    def closing(self, finish_reason: str, usage: Any) -> list[str]:
        events = [self.event({}, finish_reason)]
        if self.include_usage:
            events.append(self.event(None, usage=usage))
        events.append("data: [DONE]\n\n")
        return events


def _error_event(error: APIError) -> str:
    return f"data: {json.dumps(error.body(), ensure_ascii=False)}\n\n"


# ---------------------------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------------------------


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    too_big = APIError(
        413,
        f"The request body is larger than this server's limit of {limit:,} bytes: send smaller or fewer images.",
        code="request_too_large",
    )
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def _until_done_or_gone(request: Request, future: asyncio.Future, poll: float = 0.1) -> Any:
    """The future's result; raises CancelledError when the client disconnects first."""
    while True:
        done, _ = await asyncio.wait({future}, timeout=poll)
        if done:
            return future.result()
        if await request.is_disconnected():
            raise asyncio.CancelledError("the client disconnected")


def create_app(
    backend: Backend,
    *,
    model_name: str | None = None,
    api_key: str | None = None,
    image_policy: ImagePolicy | None = None,
    allow_urls: bool = False,
    max_image_bytes: int | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    max_images_per_request: int = 8,
    max_tokens_limit: int = 4096,
    default_max_tokens: int | None = None,
    max_batch_size: int = 8,
    max_queue: int = 64,
    batch_wait_ms: float = 2.0,
) -> FastAPI:
    """An OpenAI-compatible FastAPI app answering with ``backend`` (e.g. a loaded :class:`~belle_vl_tools.BelleVL`).

    Args:
        backend: What answers: anything with the :class:`~belle_vl_tools.backend.Backend` interface.
        model_name: The model id clients name (default: the backend's ``model_name``); both are accepted.
        api_key: When set, ``/v1/*`` requests need ``Authorization: Bearer <api_key>``.
        image_policy: Limits for images in requests; local files are never read, whatever it says.
        allow_urls: Fetch ``http(s)`` image URLs (public addresses only, unless the policy says otherwise).
        max_image_bytes: Largest image after decoding its base64 (default 16 MiB, or the policy's if smaller).
        max_request_bytes: Largest request body.
        max_images_per_request: Most images in one request.
        max_tokens_limit: Largest ``max_tokens`` a request may ask for.
        default_max_tokens: ``max_tokens`` of requests that name none (default: the model's generation config).
        max_batch_size: Most requests answered in one batch.
        max_queue: Most requests waiting; more get 503.
        batch_wait_ms: How long the worker lets a burst of requests gather before it starts a batch.
    """
    name = model_name or getattr(backend, "model_name", None) or "belle-vl"
    config = ServerConfig(
        model_name=name,
        aliases=frozenset({name, str(getattr(backend, "model_name", name))}),
        api_key=api_key or None,
        image_policy=server_image_policy(image_policy, allow_urls=allow_urls, max_image_bytes=max_image_bytes),
        max_request_bytes=max_request_bytes,
        max_images_per_request=max_images_per_request,
        max_tokens_limit=max_tokens_limit,
        default_max_tokens=default_max_tokens,
    )
    scheduler = BatchScheduler(
        backend, max_batch_size=max_batch_size, max_queue=max_queue, batch_wait=batch_wait_ms / 1000
    )
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.close)

    app = FastAPI(title="belle-vl-tools", description="OpenAI-compatible Belle-VL server", lifespan=lifespan)
    app.state.config = config
    app.state.scheduler = scheduler
    app.state.backend = backend

    @app.exception_handler(APIError)
    async def _on_api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), code=code, headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def _on_error(_: Request, exc: Exception) -> JSONResponse:
        return _api_error(exc).response()

    def check_key(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise APIError(
                401,
                "Missing or wrong API key: send 'Authorization: Bearer <key>' with the server's key.",
                code="invalid_api_key",
            )

    def model_card() -> dict[str, Any]:
        return {"id": config.model_name, "object": "model", "created": created, "owned_by": "belle-vl-tools"}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": config.model_name,
            "waiting": scheduler.waiting,
            "running": scheduler.running,
            "max_queue": scheduler.max_queue,
        }

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        check_key(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        check_key(request)
        if model_id not in config.aliases:
            raise APIError(404, f"The model {model_id!r} does not exist on this server.", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        check_key(request)
        raw = await _read_body(request, config.max_request_bytes)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise APIError(
                400, "The request body is not valid JSON: send a JSON object.", code="invalid_json"
            ) from None
        chat = parse_chat_request(body, config)
        if chat.image_sources:
            await asyncio.to_thread(_load_images, chat, config.image_policy)
        try:
            messages, uses_tools = model_messages(chat)
        except PromptError as exc:
            raise _api_error(exc, "messages") from None
        generation = dict(chat.generation)
        if uses_tools:
            from .toolcalls import STOP_SEQUENCES

            generation["stop"] = [*generation.get("stop", []), *STOP_SEQUENCES]
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        loop = asyncio.get_running_loop()
        whole_answer_first = uses_tools or chat.response_format != "text"

        if chat.stream and not whole_answer_first:
            return await _stream_tokens(request, chat, messages, generation, request_id, loop)

        job = Job(messages, generation, loop, key=batch_key(generation), future=loop.create_future())
        scheduler.submit(job)
        try:
            result: ChatResult = await _until_done_or_gone(request, job.future)  # type: ignore[arg-type]
        except asyncio.CancelledError:
            scheduler.cancel(job)
            return Response(status_code=499)
        except Exception as exc:
            raise _api_error(exc) from None
        finally:
            if not job.future.done():  # type: ignore[union-attr]
                scheduler.cancel(job)
        answer = shape_answer(chat, result, uses_tools)
        if not chat.stream:
            return JSONResponse(_completion(request_id, config.model_name, answer, result))
        return StreamingResponse(
            _replay(_Chunks(request_id, config.model_name, chat.include_usage), answer, result),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    async def _stream_tokens(
        request: Request,
        chat: ChatRequest,
        messages: list[dict[str, Any]],
        generation: dict[str, Any],
        request_id: str,
        loop: asyncio.AbstractEventLoop,
    ) -> Response:
        job = Job(messages, generation, loop, stream=True, events=asyncio.Queue())
        scheduler.submit(job)
        # Wait for the first event, so that an error before the first token is an ordinary error response.
        getter = asyncio.ensure_future(job.events.get())  # type: ignore[union-attr]
        try:
            kind, payload = await _until_done_or_gone(request, getter)
        except asyncio.CancelledError:
            getter.cancel()
            scheduler.cancel(job)
            return Response(status_code=499)
        if kind == "error":
            raise _api_error(payload)
        chunks = _Chunks(request_id, config.model_name, chat.include_usage)
        return StreamingResponse(
            _relay(scheduler, job, chunks, (kind, payload)),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    return app


async def _replay(chunks: _Chunks, answer: Answer, result: ChatResult) -> AsyncIterator[str]:
    """A finished answer as SSE events (streaming requests with tools or a response format)."""
    yield chunks.event({"role": "assistant", "content": ""})
    if answer.content:
        yield chunks.event({"content": answer.content})
    if answer.tool_calls:
        calls = [{"index": i, **call} for i, call in enumerate(answer.tool_calls)]
        yield chunks.event({"tool_calls": calls})
    for event in chunks.closing(answer.finish_reason, result.usage):
        yield event


async def _relay(scheduler: BatchScheduler, job: Job, chunks: _Chunks, first: tuple[str, Any]) -> AsyncIterator[str]:
    """Token deltas from the worker as SSE events; a client that goes away stops the generation."""
    try:
        yield chunks.event({"role": "assistant", "content": ""})
        kind, payload = first
        while True:
            if kind == "error":
                yield _error_event(_api_error(payload))
                yield "data: [DONE]\n\n"
                return
            if kind == "done":
                return
            chunk: StreamChunk = payload
            if chunk.delta:
                yield chunks.event({"content": chunk.delta})
            if chunk.finish_reason is not None:
                for event in chunks.closing(chunk.finish_reason, chunk.usage):
                    yield event
            kind, payload = await job.events.get()  # type: ignore[union-attr]
    finally:
        scheduler.cancel(job)


# ---------------------------------------------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------------------------------------------


def load_runtime(
    model_path: str | None = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    image_policy: ImagePolicy | None = None,
    **runtime_kwargs: Any,
) -> Any:
    """The local runtime for ``model_path`` (the shipped demo model when None), for serving."""
    from .runtime import BelleVL

    if model_path is None:
        from .demo import DEMO_MODEL_NAME, default_model_path

        runtime = BelleVL.from_pretrained(
            default_model_path(), device=device, dtype=dtype, image_policy=image_policy, **runtime_kwargs
        )
        runtime.model_name = DEMO_MODEL_NAME
        return runtime
    return BelleVL.from_pretrained(model_path, device=device, dtype=dtype, image_policy=image_policy, **runtime_kwargs)


def serve(
    model_path: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    device: str | None = None,
    dtype: str | None = None,
    log_level: str = "info",
    on_ready: Callable[[FastAPI], None] | None = None,
    **app_kwargs: Any,
) -> None:
    """Load ``model_path`` (default: the demo model) and serve it with uvicorn until interrupted.

    ``app_kwargs`` go to :func:`create_app` (``api_key``, ``allow_urls``, ``max_batch_size``, ...).
    """
    import uvicorn

    policy = server_image_policy(
        app_kwargs.get("image_policy"),
        allow_urls=app_kwargs.get("allow_urls", False),
        max_image_bytes=app_kwargs.get("max_image_bytes"),
    )
    runtime = load_runtime(model_path, device=device, dtype=dtype, image_policy=policy)
    app = create_app(runtime, **app_kwargs)
    if on_ready is not None:
        on_ready(app)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


@contextlib.contextmanager
def background_server(
    app: Any, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning", startup_timeout: float = 30.0
) -> Iterator[str]:
    """Run ``app`` with uvicorn in a thread (for notebooks and tests); yields the base URL, e.g.
    ``http://127.0.0.1:51234``. ``port=0`` picks a free port."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="belle-vl-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"The server did not start on {host}:{port}.")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()
    try:
        yield f"http://{host}:{bound[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
