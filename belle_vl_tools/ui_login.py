"""The web chat's login, applied to every route Gradio leaves open (``belle-vl ui --auth``).

Gradio's ``auth=`` checks the login on the routes that run or describe the app (``/config``, ``/gradio_api/info``,
``/gradio_api/queue/join``, ``/gradio_api/upload``, ``/gradio_api/file=...``), but leaves others open: the queue's
``/gradio_api/cancel``, ``/gradio_api/reset``, ``/gradio_api/stream/...`` and ``/gradio_api/heartbeat/...``, the run
history, and FastAPI's own ``/openapi.json`` (the schema of every route). :class:`LoginRequired` answers 401 on
every route that is not in :data:`PUBLIC` unless the request carries Gradio's login cookie. The decision is
Gradio's own: its ``/gradio_api/login_check`` route is asked in process with the request's cookies, so a login made
through the page or through ``gradio_client``'s ``auth=`` counts, and nothing here reads Gradio's tokens.

Written here rather than taken from a library because the check must be the same as Gradio's own session check,
which only Gradio's app can make.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

__all__ = ["PUBLIC", "PUBLIC_PREFIXES", "LoginRequired"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Paths served without a login: the login page and its form, and what the page needs before the login
#: (its scripts, styles and icons, and Gradio's own "who am I" answers, which say nothing about the app).
PUBLIC = frozenset(
    {
        "/",
        "/login",
        "/login/",
        "/logout",
        "/favicon.ico",
        "/robots.txt",
        "/manifest.json",
        "/theme.css",
        "/pwa_icon",
        "/gradio_api/theme.css",
        "/gradio_api/login_check",
        "/gradio_api/login_check/",
        "/gradio_api/user",
        "/gradio_api/user/",
        "/gradio_api/token",
        "/gradio_api/token/",
        "/gradio_api/app_id",
        "/gradio_api/app_id/",
        # Gradio's launch() asks it (without a cookie) whether the server is up; it answers true or false.
        "/gradio_api/startup-events",
    }
)
#: Path prefixes served without a login: the page's static files (Gradio serves only its own build from them).
PUBLIC_PREFIXES = ("/assets/", "/static/", "/svelte/", "/pwa_icon/", "/gradio_api/custom_component/")

LOGIN_CHECK = "/gradio_api/login_check"
NOT_LOGGED_IN = json.dumps({"detail": {"error": "Not authenticated", "auth_message": None}}).encode()


class LoginRequired:
    """ASGI middleware for the Gradio app: a request to a route outside :data:`PUBLIC` without Gradio's login is 401.

    Install it with ``launch(..., app_kwargs={"middleware": [Middleware(LoginRequired)]})`` together with
    ``auth=``; WebSocket and lifespan traffic pass unchanged (Gradio's web chat uses neither for its API).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._public(scope.get("path", "")) or await self._logged_in(scope):
            await self.app(scope, receive, send)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(NOT_LOGGED_IN)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": NOT_LOGGED_IN})

    @staticmethod
    def _public(path: str) -> bool:
        return path in PUBLIC or path.startswith(PUBLIC_PREFIXES)

    async def _logged_in(self, scope: Scope) -> bool:
        """Whether Gradio's own ``/gradio_api/login_check`` accepts this request's cookies (asked in process)."""
        check = {**scope, "method": "GET", "path": LOGIN_CHECK, "raw_path": LOGIN_CHECK.encode(), "query_string": b""}
        status: list[int] = []

        async def no_body() -> MutableMapping[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def keep_status(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])

        await self.app(check, no_body, keep_status)
        return status == [200]
