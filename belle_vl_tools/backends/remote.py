"""RemoteBelleVL: the backend interface over HTTP, as a client of an OpenAI-compatible chat completions server.

The server may be ``belle-vl serve``, a Ray Serve deployment of it, vLLM <= 0.23 serving Qwen-VL, or any server
that takes ``image_url`` content parts. Pictures are loaded here, under this client's
:class:`~belle_vl_tools.images.ImagePolicy`, and sent as PNG data URLs: the server never reads a path or fetches a
URL on the caller's behalf.

This module needs httpx and Pillow only (no torch, no transformers), so an agent host can use a GPU server without
installing them.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from ..backend import ChatResult, Message, StreamChunk, Usage, VisionTasks
from ..errors import BackendError, PromptError
from ..images import ImagePolicy, load_image

__all__ = ["RemoteBackendError", "RemoteBelleVL", "RETRY_STATUSES"]

#: HTTP statuses that are retried (with backoff): rate limits and an overloaded or restarting server.
RETRY_STATUSES = frozenset({429, 502, 503, 504})
_CONNECT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError)


class RemoteBackendError(BackendError):
    """The server answered with an error (or could not be reached); ``status`` is the HTTP status (0: none)."""

    def __init__(self, message: str, *, status: int = 0, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param


def _base_url(url: str) -> str:
    """The API root: ``http://host:8000`` becomes ``http://host:8000/v1``; a URL with a path is kept as is."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise PromptError(f"base_url must be an http(s) URL such as http://127.0.0.1:8000/v1, not {url!r}.")
    path = parts.path.rstrip("/") or "/v1"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _error_from_response(response: httpx.Response) -> RemoteBackendError:
    status = response.status_code
    message, code, param = "", None, None
    try:
        error = response.json().get("error")
        if isinstance(error, Mapping):
            message = str(error.get("message") or "")
            code = error.get("code")
            param = error.get("param")
        elif isinstance(error, str):
            message = error
    except (ValueError, AttributeError):
        message = response.text[:300]
    hint = {
        401: " Check the api_key.",
        403: " Check the api_key.",
        404: " Check base_url and the model name (GET /v1/models lists the served models).",
        413: " Send a smaller request (smaller or fewer images).",
        429: " The server is rate limiting: slow down or raise max_retries.",
        503: " The server is overloaded: retry later or raise max_retries.",
    }.get(status, "")
    text = f"The server at {response.request.url} answered {status}: {message or response.reason_phrase}.{hint}"
    return RemoteBackendError(" ".join(text.split()), status=status, code=code, param=param)


def _retry_after(response: httpx.Response | None, attempt: int, backoff: float) -> float:
    if response is not None:
        value = response.headers.get("retry-after")
        if value is not None:
            try:
                return min(max(float(value), 0.0), 60.0)
            except ValueError:
                pass
    return backoff * (2**attempt) * (0.5 + random.random())


class RemoteBelleVL(VisionTasks):
    """A backend that asks an OpenAI-compatible server (``POST {base_url}/chat/completions``).

    Args:
        base_url: The API root, e.g. ``http://127.0.0.1:8000/v1`` (``/v1`` is added to a bare host).
        api_key: Sent as ``Authorization: Bearer ...`` when given.
        model: The model id to ask for; None asks the server (``GET /models``) and takes the first.
        timeout: Seconds a request may take in all (connecting: at most 10 of them).
        max_retries: Retries on connection errors and on 429 / 502 / 503 / 504, with exponential backoff
            (``Retry-After`` honoured).
        backoff: Seconds before the first retry (doubled for each next one, with jitter).
        image_policy: What pictures may be read here before they are sent (default: any local path, no URLs, as
            for the Python API; pass ``ImagePolicy()`` where an agent picks the images).
        max_concurrency: Requests in flight at once for :meth:`generate_batch`.
        headers: Extra HTTP headers for every request.
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000/v1",
        api_key: str | None = None,
        model: str | None = None,
        *,
        timeout: float = 120.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        image_policy: ImagePolicy | None = None,
        max_concurrency: int = 16,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.base_url = _base_url(base_url)
        self.api_key = api_key
        self._model = model
        self.timeout = httpx.Timeout(timeout, connect=min(10.0, timeout))
        self.max_retries = max(0, int(max_retries))
        self.backoff = backoff
        self.image_policy = image_policy or ImagePolicy.trusted()
        self.max_concurrency = max(1, int(max_concurrency))
        self.headers = {"Accept": "application/json", **(dict(headers or {}))}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self._client: httpx.Client | None = None
        self._aclients: dict[int, httpx.AsyncClient] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"RemoteBelleVL(base_url={self.base_url!r}, model={self._model!r})"

    # --- clients -------------------------------------------------------------------------------------------------
    @property
    def client(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                self._client = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=self.timeout)
            return self._client

    def _aclient(self) -> httpx.AsyncClient:
        """An async client for the running event loop (httpx's async clients are bound to one loop)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            client = self._aclients.get(id(loop))
            if client is None or client.is_closed:
                client = httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=self.timeout)
                self._aclients[id(loop)] = client
            return client

    def close(self) -> None:
        """Close the synchronous connection pool (async clients close with :meth:`aclose`)."""
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    async def aclose(self) -> None:
        self.close()
        with self._lock:
            clients, self._aclients = list(self._aclients.values()), {}
        for client in clients:
            await client.aclose()

    def __enter__(self) -> RemoteBelleVL:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- model name ----------------------------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        """The model id sent with each request (asked from the server once when not given; "" while the server
        cannot be reached)."""
        try:
            return self.resolve_model()
        except RemoteBackendError:
            return ""

    def resolve_model(self) -> str:
        """The model id, asking the server (``GET /models``, the first one listed) when none was given."""
        if self._model is None:
            data = self._send("GET", "/models").json()
            models = data.get("data") or []
            if not models:
                raise RemoteBackendError(f"The server at {self.base_url} lists no model: pass model=... explicitly.")
            self._model = str(models[0]["id"])
        return self._model

    @model_name.setter
    def model_name(self, value: str) -> None:
        self._model = value

    # --- requests ------------------------------------------------------------------------------------------------
    def _image_part(self, source: Any) -> dict[str, Any]:
        picture = load_image(source, self.image_policy)
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        data = base64.b64encode(buffer.getvalue()).decode("ascii")
        return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}

    def _content(self, content: Any) -> Any:
        if content is None or isinstance(content, str):
            return content
        if not isinstance(content, list | tuple):
            raise PromptError(f"Message content must be a string or a list of parts, not {type(content).__name__}.")
        parts: list[dict[str, Any]] = []
        for part in content:
            if isinstance(part, str):
                parts.append({"type": "text", "text": part})
                continue
            if not isinstance(part, Mapping):
                raise PromptError(f"Content part {part!r:.80} must be a dict such as {{'type': 'text', ...}}.")
            kind = part.get("type")
            if kind == "text":
                parts.append({"type": "text", "text": part.get("text", "")})
            elif kind == "image":
                source = next((part[k] for k in ("image", "url", "path") if part.get(k) is not None), None)
                if source is None and part.get("base64") is not None:
                    source = {"base64": part["base64"], "mime_type": part.get("mime_type")}
                if source is None:
                    raise PromptError(f"Image part {part!r:.80} has no image: give it an 'image' key.")
                parts.append(self._image_part(source))
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, Mapping) else url
                parts.append(self._image_part(url))
            else:
                raise PromptError(f"Unsupported content part type {kind!r}: use 'text' or 'image' parts.")
        return parts

    def _messages(self, messages: Sequence[Message], system: str | None) -> list[dict[str, Any]]:
        if not isinstance(messages, list | tuple) or not messages:
            raise PromptError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts.")
        out: list[dict[str, Any]] = []
        if system is not None and not (isinstance(messages[0], Mapping) and messages[0].get("role") == "system"):
            out.append({"role": "system", "content": system})
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping) or "role" not in message:
                raise PromptError(f"Message {i} must be a dict with 'role' and 'content'.")
            converted = {k: v for k, v in message.items() if k != "content"}
            converted["content"] = self._content(message.get("content"))
            if converted["role"] == "system" and system is not None:
                converted["content"] = system
            out.append(converted)
        return out

    def _body(self, messages: Sequence[Message], generation: dict[str, Any], stream: bool) -> dict[str, Any]:
        generation = dict(generation)
        system = generation.pop("system", None)
        body: dict[str, Any] = {"model": self.resolve_model(), "messages": self._messages(messages, system)}
        max_tokens = generation.pop("max_new_tokens", None)
        max_tokens = generation.pop("max_tokens", max_tokens)
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        do_sample = generation.pop("do_sample", None)
        temperature = generation.pop("temperature", None)
        if do_sample is False:
            temperature = 0.0
        if temperature is not None:
            body["temperature"] = temperature
        for key in ("top_p", "seed", "top_k", "repetition_penalty", "tools", "tool_choice", "response_format"):
            value = generation.pop(key, None)
            if value is not None:
                body[key] = value
        stop = generation.pop("stop", None)
        if stop:
            body["stop"] = [stop] if isinstance(stop, str) else list(stop)
        for key in ("stream", "streaming", "n"):
            generation.pop(key, None)
        extra = generation.pop("extra_body", None) or {}
        if generation:
            raise PromptError(
                f"RemoteBelleVL cannot send the generation argument(s) {', '.join(sorted(generation))}: use "
                "max_new_tokens, temperature, top_p, top_k, repetition_penalty, do_sample, stop, seed, or extra_body."
            )
        body.update(extra)
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    def _result(self, data: Mapping[str, Any], images: int) -> ChatResult:
        try:
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
            finish = choice.get("finish_reason") or "stop"
        except (KeyError, IndexError, TypeError, AttributeError):
            raise RemoteBackendError(
                f"The server's answer is not a chat completion: {json.dumps(data)[:200]}"
            ) from None
        return ChatResult(
            text=text,
            finish_reason="length" if finish == "length" else "stop",
            usage=_usage(data.get("usage"), images),
            model=str(data.get("model") or self._model or ""),
        )

    # --- transport with retries ----------------------------------------------------------------------------------
    def _send(self, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = self.client.request(method, path, json=body)
            except _CONNECT_ERRORS as exc:
                delay = self._retry_delay(attempt, exc)
            except httpx.TimeoutException as exc:
                raise self._timed_out(exc) from None
            else:
                if response.status_code < 400:
                    return response
                delay = self._retry_delay(attempt, response)
            time.sleep(delay)
            attempt += 1

    async def _asend(self, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = await self._aclient().request(method, path, json=body)
            except _CONNECT_ERRORS as exc:
                delay = self._retry_delay(attempt, exc)
            except httpx.TimeoutException as exc:
                raise self._timed_out(exc) from None
            else:
                if response.status_code < 400:
                    return response
                delay = self._retry_delay(attempt, response)
            await asyncio.sleep(delay)
            attempt += 1

    def _retry_delay(self, attempt: int, failure: httpx.Response | Exception) -> float:
        """Seconds to wait before the next try after attempt ``attempt`` (0: the first) failed with ``failure``: an
        error response (its body already read) or a connection error. Raises the error to report instead when that
        failure is not retried or no retry is left."""
        if isinstance(failure, httpx.Response):
            if failure.status_code not in RETRY_STATUSES or attempt >= self.max_retries:
                raise _error_from_response(failure)
            return _retry_after(failure, attempt, self.backoff)
        if attempt >= self.max_retries:
            raise self._unreachable(failure) from None
        return _retry_after(None, attempt, self.backoff)

    def _unreachable(self, exc: BaseException) -> RemoteBackendError:
        return RemoteBackendError(
            f"Cannot reach the server at {self.base_url} after {self.max_retries + 1} attempt(s) "
            f"({type(exc).__name__}: {exc}). Check that it runs and that base_url is right."
        )

    def _broken(self, exc: BaseException) -> RemoteBackendError:
        return RemoteBackendError(
            f"The connection to {self.base_url} broke after part of the answer had arrived "
            f"({type(exc).__name__}: {exc}); ask again (the part already received is not repeated by a retry)."
        )

    def _timed_out(self, exc: BaseException) -> RemoteBackendError:
        return RemoteBackendError(
            f"The server at {self.base_url} did not answer within {self.timeout.read} s ({type(exc).__name__}): "
            "raise timeout=..., or ask for fewer tokens."
        )

    # --- the backend interface -----------------------------------------------------------------------------------
    def chat(self, messages: Sequence[Message], **generation: Any) -> ChatResult:
        """Answer a conversation (transformers' message format; image parts hold any image source)."""
        body = self._body(messages, generation, stream=False)
        return self._result(self._send("POST", "/chat/completions", body).json(), _count_images(body))

    async def achat(self, messages: Sequence[Message], **generation: Any) -> ChatResult:
        body = await asyncio.to_thread(self._body, messages, generation, False)  # images are encoded off the loop
        response = await self._asend("POST", "/chat/completions", body)
        return self._result(response.json(), _count_images(body))

    def generate_batch(self, conversations: Sequence[Sequence[Message]], **generation: Any) -> list[ChatResult]:
        """Answer several conversations with concurrent requests (the server batches them)."""
        if not conversations:
            return []
        self.resolve_model()  # once, before the threads start
        workers = min(self.max_concurrency, len(conversations))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="belle-vl-remote") as pool:
            return list(pool.map(lambda conv: self.chat(conv, **generation), conversations))

    async def agenerate_batch(self, conversations: Sequence[Sequence[Message]], **generation: Any) -> list[ChatResult]:
        gate = asyncio.Semaphore(self.max_concurrency)

        async def one(conv: Sequence[Message]) -> ChatResult:
            async with gate:
                return await self.achat(conv, **generation)

        return list(await asyncio.gather(*(one(conv) for conv in conversations)))

    def stream(self, messages: Sequence[Message], **generation: Any) -> Iterator[StreamChunk]:
        """Yield the answer as text deltas (server-sent events); the last chunk has finish_reason and usage."""
        body = self._body(messages, generation, stream=True)
        images = _count_images(body)
        attempt = 0
        sent = False
        while True:
            try:
                with self.client.stream("POST", "/chat/completions", json=body) as response:
                    if response.status_code >= 400:
                        response.read()
                        delay = self._retry_delay(attempt, response)
                    else:
                        for chunk in _read_events(_sync_lines(response), images):
                            sent = True
                            yield chunk
                        return
            except _CONNECT_ERRORS as exc:
                if sent:  # a retry would send the answer's beginning again
                    raise self._broken(exc) from None
                delay = self._retry_delay(attempt, exc)
            except httpx.TimeoutException as exc:
                raise self._timed_out(exc) from None
            time.sleep(delay)
            attempt += 1

    async def astream(self, messages: Sequence[Message], **generation: Any) -> AsyncIterator[StreamChunk]:
        body = await asyncio.to_thread(self._body, messages, generation, True)
        images = _count_images(body)
        attempt = 0
        sent = False
        while True:
            try:
                async with self._aclient().stream("POST", "/chat/completions", json=body) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        delay = self._retry_delay(attempt, response)
                    else:
                        parser = _EventParser(images)
                        async for line in response.aiter_lines():
                            for chunk in parser.feed(line):
                                sent = True
                                yield chunk
                        for chunk in parser.end():
                            yield chunk
                        return
            except _CONNECT_ERRORS as exc:
                if sent:  # a retry would send the answer's beginning again
                    raise self._broken(exc) from None
                delay = self._retry_delay(attempt, exc)
            except httpx.TimeoutException as exc:
                raise self._timed_out(exc) from None
            await asyncio.sleep(delay)
            attempt += 1


# ---------------------------------------------------------------------------------------------------------------
# Server-sent events
# ---------------------------------------------------------------------------------------------------------------


def _usage(data: Any, images: int) -> Usage:
    if not isinstance(data, Mapping):
        return Usage(images=images)
    return Usage(
        prompt_tokens=int(data.get("prompt_tokens") or 0),
        completion_tokens=int(data.get("completion_tokens") or 0),
        images=images,
    )


def _count_images(body: Mapping[str, Any]) -> int:
    return sum(
        1
        for message in body.get("messages", [])
        if isinstance(message.get("content"), list)
        for part in message["content"]
        if part.get("type") == "image_url"
    )


def _sync_lines(response: httpx.Response) -> Iterator[str]:
    yield from response.iter_lines()


class _EventParser:
    """Turns ``data: {...}`` lines of a chat completion stream into StreamChunks; the last carries the finish
    reason and the usage (which may arrive in a chunk after the one with the finish reason)."""

    def __init__(self, images: int) -> None:
        self.images = images
        self.finish: str | None = None
        self.usage: Usage | None = None
        self.done = False

    def feed(self, line: str) -> list[StreamChunk]:
        line = line.strip()
        if not line.startswith("data:") or self.done:
            return []
        data = line[5:].strip()
        if data == "[DONE]":
            self.done = True
            return []
        try:
            event = json.loads(data)
        except ValueError:
            raise RemoteBackendError(f"The server sent an unreadable stream event: {data[:200]}") from None
        if isinstance(event, Mapping) and event.get("error"):
            error = event["error"]
            message = error.get("message") if isinstance(error, Mapping) else str(error)
            raise RemoteBackendError(f"The server failed while streaming: {message}")
        if event.get("usage"):
            self.usage = _usage(event["usage"], self.images)
        out = []
        for choice in event.get("choices") or []:
            delta = (choice.get("delta") or {}).get("content") or ""
            if choice.get("finish_reason"):
                self.finish = "length" if choice["finish_reason"] == "length" else "stop"
            if delta:
                out.append(StreamChunk(delta))
        return out

    def end(self) -> list[StreamChunk]:
        return [StreamChunk("", finish_reason=self.finish or "stop", usage=self.usage or Usage(images=self.images))]  # type: ignore[arg-type]


def _read_events(lines: Iterator[str], images: int) -> Iterator[StreamChunk]:
    parser = _EventParser(images)
    for line in lines:
        yield from parser.feed(line)
    yield from parser.end()
