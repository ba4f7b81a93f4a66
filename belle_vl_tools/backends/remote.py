"""RemoteBelleVL: the backend interface over HTTP, as a client of an OpenAI-compatible chat completions server.

The server may be ``belle-vl serve``, a Ray Serve deployment of it, vLLM <= 0.23 serving Qwen-VL, or any server
that takes ``image_url`` content parts. Pictures are loaded here, under this client's
:class:`~belle_vl_tools.images.ImagePolicy`, and sent as PNG data URLs: the server never reads a path or fetches a
URL on the caller's behalf.

Requests go through the official ``openai`` client (its retries with ``Retry-After``, its server-sent events
parser and its typed errors), over an httpx transport that adds what the client lacks:

* a **total deadline** per call: connecting, TLS, waiting for headers, reading the body, and the retries' pauses
  all count against ``timeout`` seconds, checked at the socket layer (each read and write may take only the time
  left), so a server that trickles one byte a second cannot hold a call past its deadline;
* a **response size limit** (``max_response_bytes``), so a server that never stops sending cannot fill memory.

This module needs openai, httpx and Pillow only (no torch, no transformers), so an agent host can use a GPU server
without installing them.
"""

from __future__ import annotations

import asyncio
import base64
import io
import random
import ssl
import threading
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpcore
import httpx
import openai

from ..backend import ChatResult, Message, StreamChunk, Usage, VisionTasks
from ..deadline import Deadline
from ..errors import BackendError, PromptError
from ..images import ImagePolicy, load_image
from ..messages import Message as CoreMessage
from ..messages import parse_messages, to_openai

__all__ = ["DEFAULT_MAX_RESPONSE_BYTES", "RemoteBackendError", "RemoteBelleVL"]

#: Largest response (body bytes, all the events of a stream together) a call accepts by default.
DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024 * 1024
#: Seconds connecting may take at most (within the total deadline).
CONNECT_TIMEOUT = 10.0


class RemoteBackendError(BackendError):
    """The server answered with an error (or could not be reached); ``status`` is the HTTP status (0: none);
    ``code`` is the server's error code, or ``"timeout"`` / ``"response_too_large"`` for this client's limits."""

    def __init__(self, message: str, *, status: int = 0, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param


# ---------------------------------------------------------------------------------------------------------------
# The deadline and the size limit, at the transport
# ---------------------------------------------------------------------------------------------------------------


class _DeadlineExceeded(openai.OpenAIError):
    """Raised inside the transport when a call's deadline passes (an OpenAIError, so the client never retries)."""


class _ResponseTooLarge(openai.OpenAIError):
    """Raised inside the transport when a response passes the size limit (never retried either)."""


class _Timeout(float):
    """A per-operation timeout that also carries the call's :class:`~belle_vl_tools.deadline.Deadline`.

    It rides in the request's timeout settings through the openai client, httpx and httpcore down to the
    socket operations, where :func:`_left` bounds each connect, read and write by the time left.
    """

    deadline: Deadline

    def __new__(cls, value: float, deadline: Deadline) -> _Timeout:
        obj = super().__new__(cls, value)
        obj.deadline = deadline
        return obj


def _left(timeout: float | None) -> float | None:
    """The timeout of one socket operation: the per-operation timeout, cut to the time left before the deadline
    (raises :class:`_DeadlineExceeded` once it has passed)."""
    deadline: Deadline | None = getattr(timeout, "deadline", None)
    if deadline is None or timeout is None:
        return timeout
    return deadline.timeout(float(timeout))


def _expired(timeout: float | None) -> bool:
    deadline: Deadline | None = getattr(timeout, "deadline", None)
    return deadline is not None and deadline.expired(slack=0.001)


class _Stream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            return self._inner.read(max_bytes, _left(timeout))
        except httpcore.TimeoutException:
            if _expired(timeout):
                raise _DeadlineExceeded("deadline") from None
            raise

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        try:
            self._inner.write(buffer, _left(timeout))
        except httpcore.TimeoutException:
            if _expired(timeout):
                raise _DeadlineExceeded("deadline") from None
            raise

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        return _Stream(self._inner.start_tls(ssl_context, server_hostname, _left(timeout)))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _Backend(httpcore.NetworkBackend):
    def __init__(self, inner: httpcore.NetworkBackend) -> None:
        self._inner = inner

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        try:
            return _Stream(self._inner.connect_tcp(host, port, _left(timeout), local_address, socket_options))
        except httpcore.TimeoutException:
            if _expired(timeout):
                raise _DeadlineExceeded("deadline") from None
            raise

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        return _Stream(self._inner.connect_unix_socket(path, _left(timeout), socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class _AsyncStream(httpcore.AsyncNetworkStream):
    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            return await self._inner.read(max_bytes, _left(timeout))
        except httpcore.TimeoutException:
            if _expired(timeout):
                raise _DeadlineExceeded("deadline") from None
            raise

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        try:
            await self._inner.write(buffer, _left(timeout))
        except httpcore.TimeoutException:
            if _expired(timeout):
                raise _DeadlineExceeded("deadline") from None
            raise

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.AsyncNetworkStream:
        return _AsyncStream(await self._inner.start_tls(ssl_context, server_hostname, _left(timeout)))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _AsyncBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, inner: httpcore.AsyncNetworkBackend) -> None:
        self._inner = inner

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            stream = await self._inner.connect_tcp(host, port, _left(timeout), local_address, socket_options)
        except httpcore.TimeoutException:
            if _expired(timeout):
                raise _DeadlineExceeded("deadline") from None
            raise
        return _AsyncStream(stream)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        return _AsyncStream(await self._inner.connect_unix_socket(path, _left(timeout), socket_options))

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _Limited(httpx.SyncByteStream):
    def __init__(self, inner: httpx.SyncByteStream, limit: int) -> None:
        self._inner, self._limit = inner, limit

    def __iter__(self) -> Iterator[bytes]:
        size = 0
        for chunk in self._inner:
            size += len(chunk)
            if size > self._limit:
                raise _ResponseTooLarge("too large")
            yield chunk

    def close(self) -> None:
        self._inner.close()


class _AsyncLimited(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, limit: int) -> None:
        self._inner, self._limit = inner, limit

    async def __aiter__(self) -> AsyncIterator[bytes]:
        size = 0
        async for chunk in self._inner:
            size += len(chunk)
            if size > self._limit:
                raise _ResponseTooLarge("too large")
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


class _Transport(httpx.BaseTransport):
    """httpx's own transport, with the deadline at its sockets and the size limit on its responses."""

    def __init__(self, limit: int, inner: httpx.BaseTransport | None = None) -> None:
        if inner is None:
            inner = httpx.HTTPTransport()
            pool = getattr(inner, "_pool", None)
            if pool is None or not hasattr(pool, "_network_backend"):
                raise RuntimeError("This httpx version does not expose its connection pool's network backend.")
            pool._network_backend = _Backend(pool._network_backend)
        self._inner, self._limit = inner, limit

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self._inner.handle_request(request)
        response.stream = _Limited(response.stream, self._limit)  # type: ignore[arg-type]
        return response

    def close(self) -> None:
        self._inner.close()


class _AsyncTransport(httpx.AsyncBaseTransport):
    def __init__(self, limit: int, inner: httpx.AsyncBaseTransport | None = None) -> None:
        if inner is None:
            inner = httpx.AsyncHTTPTransport()
            pool = getattr(inner, "_pool", None)
            if pool is None or not hasattr(pool, "_network_backend"):
                raise RuntimeError("This httpx version does not expose its connection pool's network backend.")
            pool._network_backend = _AsyncBackend(pool._network_backend)
        self._inner, self._limit = inner, limit

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        response.stream = _AsyncLimited(response.stream, self._limit)  # type: ignore[arg-type]
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


class _RetryPauses:
    """The openai client's pauses between retries, with our first pause (``backoff``) and never past the call's
    deadline. ``Retry-After`` from the server is honoured as the client does."""

    _belle_backoff: float = 0.5

    def _calculate_retry_timeout(self, remaining_retries: int, options: Any, response_headers: Any = None) -> float:
        retry_after = self._parse_retry_after_header(response_headers)  # type: ignore[attr-defined]
        if retry_after is not None and 0 < retry_after <= 60:
            delay = float(retry_after)
        else:
            done = options.get_max_retries(self.max_retries) - remaining_retries  # type: ignore[attr-defined]
            delay = min(self._belle_backoff * 2.0 ** min(done, 30), 8.0) * (1 - 0.25 * random.random())
        timeout = getattr(options, "timeout", None)
        deadline: Deadline | None = getattr(getattr(timeout, "read", None), "deadline", None)
        if deadline is not None:
            delay = min(delay, deadline.remaining())
        return delay


class _OpenAI(_RetryPauses, openai.OpenAI):
    pass


class _AsyncOpenAI(_RetryPauses, openai.AsyncOpenAI):
    pass


# ---------------------------------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------------------------------


def _base_url(url: str) -> str:
    """The API root: ``http://host:8000`` becomes ``http://host:8000/v1``; a URL with a path is kept as is."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise PromptError(f"base_url must be an http(s) URL such as http://127.0.0.1:8000/v1, not {url!r}.")
    path = parts.path.rstrip("/") or "/v1"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


_HINTS = {
    401: " Check the api_key.",
    403: " Check the api_key.",
    404: " Check base_url and the model name (GET /v1/models lists the served models).",
    413: " Send a smaller request (smaller or fewer images).",
    429: " The server is rate limiting: slow down or raise max_retries.",
    503: " The server is overloaded: retry later or raise max_retries.",
}


class RemoteBelleVL(VisionTasks):
    """A backend that asks an OpenAI-compatible server (``POST {base_url}/chat/completions``).

    Args:
        base_url: The API root, e.g. ``http://127.0.0.1:8000/v1`` (``/v1`` is added to a bare host).
        api_key: Sent as ``Authorization: Bearer ...`` when given.
        model: The model id to ask for; None asks the server (``GET /models``) and takes the first.
        timeout: Seconds one call may take in all: connecting, sending, waiting for headers, reading the whole
            answer (a stream's last event included), and the pauses between retries. ``timeout=`` given to a call
            replaces it for that call.
        max_retries: Retries on connection errors, 408, 409, 429 and 5xx answers (as the openai client does), with
            exponential backoff; ``Retry-After`` is honoured. A call that ran out of time is not retried.
        backoff: Seconds before the first retry (doubled for each next one, with jitter).
        image_policy: What pictures may be read here before they are sent (default: any local path, no URLs, as
            for the Python API; pass ``ImagePolicy()`` where an agent picks the images).
        max_concurrency: Requests in flight at once for :meth:`generate_batch`.
        headers: Extra HTTP headers for every request.
        max_response_bytes: Largest answer accepted (a stream's events together); more raises
            :class:`RemoteBackendError` with code ``"response_too_large"``.
        transport: An httpx transport to send synchronous requests through instead of httpx's own (a proxy, a
            test double); the size limit still applies, the deadline only as far as the transport honours the
            request's timeouts.
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
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = _base_url(base_url)
        self.api_key = api_key
        self._model = model
        if not isinstance(timeout, int | float) or isinstance(timeout, bool) or not timeout > 0:
            raise PromptError(f"timeout must be a positive number of seconds, not {timeout!r}.")
        self.timeout = float(timeout)
        self.max_retries = max(0, int(max_retries))
        self.backoff = backoff
        self.image_policy = image_policy or ImagePolicy.trusted()
        self.max_concurrency = max(1, int(max_concurrency))
        self.max_response_bytes = int(max_response_bytes)
        self.headers = dict(headers or {})
        self._transport = transport
        self._client: _OpenAI | None = None
        self._http: httpx.Client | None = None
        self._aclients: dict[int, _AsyncOpenAI] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"RemoteBelleVL(base_url={self.base_url!r}, model={self._model!r})"

    # --- clients -------------------------------------------------------------------------------------------------
    @property
    def http_client(self) -> httpx.Client:
        """The httpx client under the synchronous openai client (for event hooks, tests)."""
        self.client  # noqa: B018 - creates both
        assert self._http is not None
        return self._http

    @property
    def client(self) -> openai.OpenAI:
        """The synchronous openai client this backend sends with."""
        with self._lock:
            if self._client is None:
                self._http = httpx.Client(transport=_Transport(self.max_response_bytes, self._transport))
                self._client = self._make(_OpenAI, self._http)
            return self._client

    def _make(self, kind: type, http_client: Any) -> Any:
        client = kind(
            base_url=self.base_url,
            api_key=self.api_key or "not-needed",
            max_retries=self.max_retries,
            default_headers=self.headers,
            http_client=http_client,
        )
        client._belle_backoff = self.backoff
        return client

    def _aclient(self) -> openai.AsyncOpenAI:
        """An async client for the running event loop (httpx's async clients are bound to one loop)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            client = self._aclients.get(id(loop))
            if client is None or client.is_closed():
                client = self._make(_AsyncOpenAI, httpx.AsyncClient(transport=_AsyncTransport(self.max_response_bytes)))
                self._aclients[id(loop)] = client
            return client

    def close(self) -> None:
        """Close the synchronous connection pool (async clients close with :meth:`aclose`)."""
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
                self._http = None

    async def aclose(self) -> None:
        self.close()
        with self._lock:
            clients, self._aclients = list(self._aclients.values()), {}
        for client in clients:
            await client.close()

    def __enter__(self) -> RemoteBelleVL:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _deadline(self, timeout: float | None) -> httpx.Timeout:
        total = self.timeout if timeout is None else float(timeout)
        if not total > 0:
            raise PromptError(f"timeout must be a positive number of seconds, not {timeout!r}.")
        deadline = Deadline(total, error=_DeadlineExceeded)
        return httpx.Timeout(_Timeout(total, deadline), connect=_Timeout(min(CONNECT_TIMEOUT, total), deadline))

    # --- model name ----------------------------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        """The model id sent with each request (asked from the server once when not given; "" while the server
        cannot be reached)."""
        try:
            return self.resolve_model()
        except RemoteBackendError:
            return ""

    @model_name.setter
    def model_name(self, value: str) -> None:
        self._model = value

    def resolve_model(self) -> str:
        """The model id, asking the server (``GET /models``, the first one listed) when none was given."""
        if self._model is None:
            timeout = self._deadline(None)
            try:
                models = list(self.client.models.list(timeout=timeout))
            except Exception as exc:
                raise self._error(exc, timeout) from None
            if not models:
                raise RemoteBackendError(f"The server at {self.base_url} lists no model: pass model=... explicitly.")
            self._model = str(models[0].id)
        return self._model

    # --- requests ------------------------------------------------------------------------------------------------
    def _image_part(self, source: Any) -> dict[str, Any]:
        picture = load_image(source, self.image_policy)
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        data = base64.b64encode(buffer.getvalue()).decode("ascii")
        return _PicturePart(type="image_url", image_url={"url": f"data:image/png;base64,{data}"})

    def _messages(self, messages: Sequence[Message], system: str | None) -> list[dict[str, Any]]:
        if not isinstance(messages, list | tuple) or not messages:
            raise PromptError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts.")
        parsed = parse_messages(messages)  # the one reading of every accepted form
        out: list[dict[str, Any]] = []
        if system is not None and parsed[0].role != "system":
            out.append({"role": "system", "content": system})
        for message in parsed:
            if message.role == "system" and system is not None:
                message = CoreMessage.system(system)
            out.append(to_openai(message, self._image_part))
        return out

    def _body(
        self, messages: Sequence[Message], generation: dict[str, Any], stream: bool
    ) -> tuple[dict[str, Any], float | None]:
        """The keyword arguments of ``chat.completions.create``, and the call's own timeout (None: the default)."""
        generation = dict(generation)
        timeout = generation.pop("timeout", None)
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
        standard = (
            "top_p",
            "seed",
            "tools",
            "tool_choice",
            "response_format",
            "presence_penalty",
            "frequency_penalty",
            "logit_bias",
            "logprobs",
            "top_logprobs",
            "user",
        )
        for key in standard:
            value = generation.pop(key, None)
            if value is not None:
                body[key] = value
        extra = dict(generation.pop("extra_body", None) or {})
        for key in ("top_k", "repetition_penalty"):  # extensions the server takes, outside openai's signature
            value = generation.pop(key, None)
            if value is not None:
                extra[key] = value
        stop = generation.pop("stop", None)
        if stop:
            body["stop"] = [stop] if isinstance(stop, str) else list(stop)
        for key in ("stream", "streaming", "n"):
            generation.pop(key, None)
        if generation:
            raise PromptError(
                f"RemoteBelleVL cannot send the generation argument(s) {', '.join(sorted(generation))}: use "
                "max_new_tokens, temperature, top_p, top_k, repetition_penalty, do_sample, stop, seed, "
                "presence_penalty, frequency_penalty, logit_bias, timeout, or extra_body."
            )
        if extra:
            body["extra_body"] = extra
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body, timeout

    def _result(self, completion: Any, images: int) -> ChatResult:
        try:
            choice = completion.choices[0]
            text = choice.message.content or ""
            finish = choice.finish_reason or "stop"
        except (AttributeError, IndexError, TypeError):
            raise RemoteBackendError(f"The server's answer is not a chat completion: {str(completion)[:200]}") from None
        return ChatResult(
            text=text,
            finish_reason="length" if finish == "length" else "stop",
            usage=_usage(completion.usage, images),
            model=str(completion.model or self._model or ""),
        )

    # --- errors --------------------------------------------------------------------------------------------------
    def _error(self, exc: BaseException, timeout: httpx.Timeout, *, sent: bool = False) -> RemoteBackendError:
        """The :class:`RemoteBackendError` for an exception out of the openai client."""
        total = getattr(timeout.read, "real", timeout.read)
        if isinstance(exc, RemoteBackendError):
            return exc
        if isinstance(exc, _DeadlineExceeded) or isinstance(exc.__cause__, _DeadlineExceeded):
            return RemoteBackendError(
                f"The server at {self.base_url} did not finish answering within the deadline of {total:g} s: "
                "raise timeout=..., or ask for fewer tokens.",
                code="timeout",
            )
        if isinstance(exc, _ResponseTooLarge) or isinstance(exc.__cause__, _ResponseTooLarge):
            return RemoteBackendError(
                f"The answer from {self.base_url} is larger than max_response_bytes={self.max_response_bytes:,}; "
                "the rest was not read.",
                code="response_too_large",
            )
        if isinstance(exc, openai.APIStatusError):
            body = exc.body if isinstance(exc.body, Mapping) else {}
            message = str(body.get("message") or exc.message)
            status = exc.status_code
            text = f"The server at {exc.request.url} answered {status}: {message}.{_HINTS.get(status, '')}"
            return RemoteBackendError(" ".join(text.split()), status=status, code=exc.code, param=exc.param)
        if isinstance(exc, openai.APITimeoutError):
            return RemoteBackendError(
                f"The server at {self.base_url} did not answer in time ({total:g} s): raise timeout=..., or ask for "
                "fewer tokens.",
                code="timeout",
            )
        if sent and isinstance(exc, httpx.TransportError | openai.APIConnectionError):
            return RemoteBackendError(
                f"The connection to {self.base_url} broke after part of the answer had arrived "
                f"({type(exc).__name__}: {exc}); ask again (the part already received is not repeated by a retry)."
            )
        if isinstance(exc, openai.APIConnectionError | httpx.TransportError):
            cause = exc.__cause__ or exc
            return RemoteBackendError(
                f"Cannot reach the server at {self.base_url} after {self.max_retries + 1} attempt(s) "
                f"({type(cause).__name__}: {cause}). Check that it runs and that base_url is right."
            )
        if isinstance(exc, openai.APIError):  # an error event inside a stream
            body = exc.body if isinstance(exc.body, Mapping) else {}
            return RemoteBackendError(
                f"The server failed while streaming: {body.get('message') or exc.message}",
                code=body.get("code") if isinstance(body.get("code"), str) else None,
            )
        raise exc

    # --- the backend interface -----------------------------------------------------------------------------------
    def chat(self, messages: Sequence[Message], **generation: Any) -> ChatResult:
        """Answer a conversation (transformers' message format; image parts hold any image source).

        ``timeout=`` sets this call's total deadline in seconds (default: the client's ``timeout``)."""
        body, own = self._body(messages, generation, stream=False)
        timeout = self._deadline(own)
        try:
            completion = self.client.chat.completions.create(**body, timeout=timeout)
        except Exception as exc:
            raise self._error(exc, timeout) from None
        return self._result(completion, _count_images(body))

    async def achat(self, messages: Sequence[Message], **generation: Any) -> ChatResult:
        body, own = await asyncio.to_thread(self._body, messages, generation, False)  # images are encoded off the loop
        timeout = self._deadline(own)
        try:
            completion = await self._aclient().chat.completions.create(**body, timeout=timeout)
        except Exception as exc:
            raise self._error(exc, timeout) from None
        return self._result(completion, _count_images(body))

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
        """Yield the answer as text deltas (server-sent events); the last chunk has finish_reason and usage.

        The deadline covers the whole stream; the request is retried only before anything arrived."""
        body, own = self._body(messages, generation, stream=True)
        images = _count_images(body)
        timeout = self._deadline(own)
        collector = _Collector(images)
        try:
            events = self.client.chat.completions.create(**body, timeout=timeout)
        except Exception as exc:
            raise self._error(exc, timeout) from None
        try:
            for event in events:
                yield from collector.feed(event)
        except Exception as exc:
            raise self._error(exc, timeout, sent=collector.sent) from None
        finally:
            events.close()
        yield collector.end()

    async def astream(self, messages: Sequence[Message], **generation: Any) -> AsyncIterator[StreamChunk]:
        body, own = await asyncio.to_thread(self._body, messages, generation, True)
        images = _count_images(body)
        timeout = self._deadline(own)
        collector = _Collector(images)
        try:
            events = await self._aclient().chat.completions.create(**body, timeout=timeout)
        except Exception as exc:
            raise self._error(exc, timeout) from None
        try:
            async for event in events:
                for chunk in collector.feed(event):
                    yield chunk
        except Exception as exc:
            raise self._error(exc, timeout, sent=collector.sent) from None
        finally:
            await events.close()
        yield collector.end()


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


def _usage(data: Any, images: int) -> Usage:
    if data is None:
        return Usage(images=images)
    return Usage(
        prompt_tokens=int(getattr(data, "prompt_tokens", 0) or 0),
        completion_tokens=int(getattr(data, "completion_tokens", 0) or 0),
        images=images,
    )


class _PicturePart(dict):
    """An ``image_url`` part this client wrote (a plain dict on the wire; its type counts the request's pictures)."""


def _count_images(body: Mapping[str, Any]) -> int:
    return sum(
        1
        for message in body.get("messages", [])
        if isinstance(message.get("content"), list)
        for part in message["content"]
        if isinstance(part, _PicturePart)
    )


class _Collector:
    """Turns ``ChatCompletionChunk`` objects into StreamChunks; the last carries the finish reason and the usage
    (which may arrive in a chunk after the one with the finish reason)."""

    def __init__(self, images: int) -> None:
        self.images = images
        self.finish: str | None = None
        self.usage: Usage | None = None
        self.sent = False

    def feed(self, event: Any) -> list[StreamChunk]:
        if getattr(event, "usage", None):
            self.usage = _usage(event.usage, self.images)
        out = []
        for choice in event.choices or []:
            delta = (choice.delta.content if choice.delta is not None else None) or ""
            if choice.finish_reason:
                self.finish = "length" if choice.finish_reason == "length" else "stop"
            if delta:
                self.sent = True
                out.append(StreamChunk(delta))
        return out

    def end(self) -> StreamChunk:
        return StreamChunk("", finish_reason=self.finish or "stop", usage=self.usage or Usage(images=self.images))  # type: ignore[arg-type]
