"""Errors answered with OpenAI-shaped bodies (``{"error": {"message", "type", "param", "code"}}``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi.responses import JSONResponse

from ..constrained import GrammarBusyError, GrammarLimitError
from ..errors import (
    BelleVLError,
    ContextLengthError,
    ImageAccessDeniedError,
    ImageError,
    ImageFetchError,
    ImageTooLargeError,
    PromptError,
)

logger = logging.getLogger("belle_vl_tools.server")

__all__ = ["APIError", "QueueFullError", "api_error"]


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
        """The JSON body of the error response."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        """The error as a response."""
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class QueueFullError(APIError):
    """The queue of waiting requests is full."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            503,
            f"The server is busy: {limit} requests are already waiting. Retry after a short pause.",
            type="server_error",
            code="queue_full",
            headers={"Retry-After": "1"},
        )


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 naming the offending field."""
    return APIError(400, message, param=param, code=code)


def _server_hints(message: str) -> str:
    """A refusal's hint for the Python API rewritten for a server's user: the operator's flag."""
    return message.replace(
        "(if you configure the tool) enable URLs with ImagePolicy(allow_urls=True)",
        "ask the operator to start the server with `belle-vl serve --allow-urls`",
    )


def _context_message(exc: ContextLengthError, message: str) -> str:
    """A prompt too long, in the words of the request: max_tokens, and the operator's flag for the limit."""
    if exc.prompt_tokens is None or exc.limit is None:
        return message
    return (
        f"The prompt has {exc.prompt_tokens} tokens and max_tokens is {exc.max_new_tokens}: together more than the "
        f"model's context of {exc.limit} tokens (the checkpoint's window, or less where the server was started with "
        "`belle-vl serve --max-context-tokens`). Shorten the conversation or lower max_tokens."
    )


def api_error(exc: BaseException, param: str | None = None) -> APIError:
    """The HTTP error for an exception raised while preparing or answering a request.

    Client mistakes (bad pictures, prompts too long, bad arguments) are 400s; anything else is a 500, logged once
    with its traceback but never with the request body.
    """
    if isinstance(exc, APIError):
        return exc
    message = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, ImageTooLargeError):
        return APIError(400, message, param=param, code="image_too_large")
    if isinstance(exc, ImageAccessDeniedError):
        return APIError(400, _server_hints(message), param=param, code="image_url_not_allowed")
    if isinstance(exc, ImageFetchError):
        return APIError(400, message, param=param, code="image_fetch_failed")
    if isinstance(exc, ImageError):
        return APIError(400, message, param=param, code="invalid_image")
    if isinstance(exc, GrammarLimitError):  # before PromptError: it names its own request field
        return APIError(400, message, param=exc.param or param, code="grammar_too_complex")
    if isinstance(exc, GrammarBusyError):
        return APIError(503, message, type="server_error", code="grammar_busy", headers={"Retry-After": "5"})
    if isinstance(exc, ContextLengthError):
        return APIError(400, _context_message(exc, message), param="messages", code="context_length_exceeded")
    if isinstance(exc, PromptError):
        return APIError(400, message, param=param)
    if isinstance(exc, BelleVLError):
        logger.error("The backend failed: %s", message)
        return APIError(500, message, type="server_error", code="backend_error")
    logger.error("A request failed (%s)", type(exc).__name__, exc_info=exc)
    return APIError(500, f"The model failed to answer ({type(exc).__name__}).", type="server_error")
