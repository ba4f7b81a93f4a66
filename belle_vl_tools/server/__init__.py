"""An OpenAI-compatible HTTP server over a backend (the local runtime, usually).

``create_app(backend)`` returns a FastAPI app with

* ``POST /v1/chat/completions``: requests validated with pydantic models built on the ``openai`` package's own
  types (:mod:`.protocol`); answers and stream chunks are ``openai.types.chat`` objects, streamed as server-sent
  events (sse-starlette). Every documented parameter either works or is refused with a 400 naming it.
* ``POST /v1/completions`` (a prompt, asked as one user turn), ``GET /v1/models``, ``GET /v1/models/{id}``,
  ``GET /health`` and ``GET /metrics`` (Prometheus).
* OpenAI-shaped error bodies, an optional bearer key (the docs and metrics sit behind it too), limits on the
  request size, the JSON nesting, the number and the size of images; pictures are loaded on a media pool of their
  own (:mod:`.media`).

Generation goes through the iteration-level batching engine for a local runtime (:mod:`belle_vl_tools.engine`),
or through :class:`BatchScheduler` for any other backend (:mod:`.generation`). Tools and response formats go
through the core's tool-call session (:mod:`.structured`).

``serve(model_path, host, port)`` loads a checkpoint and runs the app with uvicorn.
"""

from __future__ import annotations

from .app import background_server, create_app, load_runtime, serve, server_image_policy, warn_if_exposed
from .errors import APIError, QueueFullError
from .routes import ServerConfig
from .scheduler import BatchScheduler

__all__ = [
    "APIError",
    "BatchScheduler",
    "QueueFullError",
    "ServerConfig",
    "background_server",
    "create_app",
    "load_runtime",
    "serve",
    "server_image_policy",
    "warn_if_exposed",
]
