"""The app: :func:`create_app` assembles the routes, the generator, the media pool, metrics and the API key check;
:func:`serve` loads a checkpoint and runs it with uvicorn."""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import ipaddress
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..backend import Backend
from ..images import ImagePolicy
from .errors import APIError, api_error
from .generation import make_generator
from .media import DEFAULT_MAX_REQUEST_PIXELS, DEFAULT_MAX_SERVER_PIXELS, MediaPool
from .metrics import Metrics
from .routes import ServerConfig, ServerState, init_app_state, router

logger = logging.getLogger("belle_vl_tools.server")

DEFAULT_MAX_REQUEST_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_IMAGE_BYTES = 16 * 1024 * 1024
#: Paths answered without the API key.
OPEN_PATHS = frozenset({"/health"})

__all__ = [
    "background_server",
    "create_app",
    "load_runtime",
    "serve",
    "server_image_policy",
    "warn_if_exposed",
]


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


def _vocab_size(backend: Any) -> int | None:
    tokenizer = getattr(backend, "tokenizer", None) if type(backend).__module__.startswith("belle_vl_tools") else None
    size = getattr(tokenizer, "vocab_size", None) if tokenizer is not None else None
    model = getattr(backend, "model", None)
    config = getattr(model, "config", None)
    size = getattr(config, "vocab_size", None) or size
    return int(size) if isinstance(size, int) else None


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
    engine: bool | None = None,
    media_workers: int = 8,
    decode_workers: int = 2,
    max_fetches_per_client: int = 4,
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS,
    max_server_pixels: int = DEFAULT_MAX_SERVER_PIXELS,
) -> FastAPI:
    """An OpenAI-compatible FastAPI app answering with ``backend`` (e.g. a loaded :class:`~belle_vl_tools.BelleVL`).

    Args:
        backend: What answers: anything with the :class:`~belle_vl_tools.backend.Backend` interface.
        model_name: The model id clients name (default: the backend's ``model_name``); both are accepted.
        api_key: When set, every route but ``/health`` (``/v1/*``, ``/metrics``, ``/docs``, ``/redoc``,
            ``/openapi.json``) needs ``Authorization: Bearer <api_key>``.
        image_policy: Limits for images in requests; local files are never read, whatever it says.
        allow_urls: Fetch ``http(s)`` image URLs (public addresses only, unless the policy says otherwise).
        max_image_bytes: Largest image after decoding its base64 (default 16 MiB, or the policy's if smaller).
        max_request_bytes: Largest request body.
        max_images_per_request: Most images in one request.
        max_tokens_limit: Largest ``max_tokens`` a request may ask for.
        default_max_tokens: ``max_tokens`` of requests that name none (default: the model's generation config).
        max_batch_size: Most requests decoded together.
        max_queue: Most requests waiting; more get 503.
        batch_wait_ms: How long the backend scheduler lets a burst of requests gather before a batch (not used by
            the engine, which takes requests in between decoding steps).
        engine: Use the iteration-level batching engine (:mod:`belle_vl_tools.engine`): None uses it for a local
            runtime when it is installed; False always uses the backend scheduler.
        media_workers: Threads fetching image URLs (a pool of their own, apart from request handling).
        decode_workers: Threads decoding data-URL images.
        max_fetches_per_client: Most image URL fetches one client address may have running at once.
        max_request_pixels: Pixels (width x height, read from the headers before decoding) of all the pictures of
            one request; more get 413.
        max_server_pixels: Pixels of the pictures of all requests in flight (from their headers until the answer
            is sent); a request that would pass it gets 503 until others end.
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
        vocab_size=_vocab_size(backend),
    )
    holder: dict[str, Any] = {}
    metrics = Metrics(lambda: holder["generator"].waiting, lambda: holder["generator"].running)
    generator = make_generator(
        backend,
        engine=engine,
        max_batch_size=max_batch_size,
        max_queue=max_queue,
        batch_wait=batch_wait_ms / 1000,
        on_batch=metrics.batch_size.observe,
    )
    holder["generator"] = generator
    media = MediaPool(
        fetch_workers=media_workers,
        decode_workers=decode_workers,
        per_client=max_fetches_per_client,
        max_request_pixels=max_request_pixels,
        max_server_pixels=max_server_pixels,
    )
    state = ServerState(config=config, generator=generator, media=media, metrics=metrics)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        generator.start()
        try:
            yield
        finally:
            await generator.aclose()
            media.close()

    app = FastAPI(title="belle-vl-tools", description="OpenAI-compatible Belle-VL server", lifespan=lifespan)
    app.state.config = config
    app.state.generator = generator
    app.state.scheduler = generator  # the same figures (stats, waiting, running) under the older name
    app.state.backend = backend
    app.state.media = media
    app.state.metrics = metrics

    @app.exception_handler(APIError)
    async def _on_api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), code=code, headers=exc.headers).response()

    @app.exception_handler(RequestValidationError)
    async def _on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return APIError(400, f"Invalid request: {exc.errors()[:1]}").response()

    @app.exception_handler(Exception)
    async def _on_error(_: Request, exc: Exception) -> JSONResponse:
        return api_error(exc).response()

    app.add_middleware(_KeyAndMetrics, api_key=config.api_key, metrics=metrics)
    init_app_state(app.state, state)
    app.include_router(router)
    return app


class _KeyAndMetrics:
    """ASGI middleware: the API key check (every path but :data:`OPEN_PATHS`, the docs included) and the request
    counters and latency histograms. Pure ASGI, so streams and disconnects pass through untouched."""

    def __init__(self, app: Any, *, api_key: str | None, metrics: Metrics) -> None:
        self.app = app
        self.api_key = api_key
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        route = path if path in ("/v1/chat/completions", "/v1/completions") else "other"
        started = time.monotonic()
        status = {"code": 500}
        if self.api_key is not None and path not in OPEN_PATHS and not _key_ok(scope, self.api_key):
            response = APIError(
                401,
                "Missing or wrong API key: send 'Authorization: Bearer <key>' with the server's key.",
                code="invalid_api_key",
            ).response()
            await response(scope, receive, send)
            self.metrics.requests.labels(route=route, status="401").inc()
            return

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.requests.labels(route=route, status=str(status["code"])).inc()
            if route != "other":
                self.metrics.latency.labels(route=route).observe(time.monotonic() - started)


def _key_ok(scope: dict[str, Any], key: str) -> bool:
    header = ""
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            header = value.decode("latin-1")
            break
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


def _is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def warn_if_exposed(host: str, api_key: str | None) -> bool:
    """Log a warning (and return True) when serving on a non-loopback address without an API key."""
    if api_key or _is_loopback(host):
        return False
    logger.warning(
        "Serving on %s without an API key: anyone who can reach this address can use the model. "
        "Pass --api-key (or BELLE_VL_API_KEY), or listen on 127.0.0.1.",
        host,
    )
    return True


def load_runtime(
    model_path: str | None = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    image_policy: ImagePolicy | None = None,
    **runtime_kwargs: Any,
) -> Any:
    """The local runtime for ``model_path`` (the shipped demo model when None), for serving."""
    from ..runtime import BelleVL

    if model_path is None:
        from ..demo import DEMO_MODEL_NAME, default_model_path

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
    compile: bool = False,
    max_context_tokens: int | None = None,
    quantize: str | None = None,
    adapter: str | None = None,
    **app_kwargs: Any,
) -> None:
    """Load ``model_path`` (default: the demo model) and serve it with uvicorn until interrupted.

    ``app_kwargs`` go to :func:`create_app` (``api_key``, ``allow_urls``, ``max_batch_size``, ...). Serving on a
    non-loopback address without ``api_key`` logs a warning. ``quantize="int8"`` stores the language model's
    linear weights as int8 (see :meth:`BelleVL.from_pretrained`). ``adapter``: a LoRA adapter folder merged into
    the model as it loads. ``compile=True`` loads the runtime with compiled
    decoding steps (:meth:`BelleVL.from_pretrained`); requests are then batched by the scheduler, not the engine.
    ``max_context_tokens`` lowers the longest prompt and answer below the checkpoint's window (its default).
    """
    import uvicorn

    warn_if_exposed(host, app_kwargs.get("api_key"))
    policy = server_image_policy(
        app_kwargs.get("image_policy"),
        allow_urls=app_kwargs.get("allow_urls", False),
        max_image_bytes=app_kwargs.get("max_image_bytes"),
    )
    runtime = load_runtime(
        model_path,
        device=device,
        dtype=dtype,
        image_policy=policy,
        compile=compile,
        max_context_tokens=max_context_tokens,
        quantize=quantize,
        adapter=adapter,
    )
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
