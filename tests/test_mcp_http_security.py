"""The MCP HTTP transport checks Host and Origin whatever address it is bound to, and bounds how long a request
body may take to arrive."""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("mcp")

from starlette.testclient import TestClient  # noqa: E402

from belle_vl_tools import mcp_server  # noqa: E402
from belle_vl_tools.mcp_server import VisionMCPServer, allowed_http_hosts  # noqa: E402
from belle_vl_tools.testing import ScriptedBackend  # noqa: E402

INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
}
HEADERS = {"accept": "application/json, text/event-stream", "content-type": "application/json"}


def _statuses(app, *requests: tuple[str, str | None]) -> list[int]:
    """The status of an ``initialize`` POST for each (Host, Origin) pair, through one running app."""
    statuses = []
    with TestClient(app) as client:
        for host, origin in requests:
            headers = {**HEADERS, "host": host, **({"origin": origin} if origin else {})}
            statuses.append(client.post("/mcp", content=json.dumps(INITIALIZE), headers=headers).status_code)
    return statuses


@pytest.mark.parametrize("bind", ["127.0.0.1", "127.0.0.2", "10.1.2.3"])
def test_a_foreign_host_or_origin_is_refused_on_every_bind_address(tmp_path, bind):
    app = VisionMCPServer(ScriptedBackend("x"), allowed_roots=[tmp_path]).streamable_http_app(host=bind)
    ours, foreign_host, foreign_origin = _statuses(
        app, (f"{bind}:8765", None), ("rebind.evil.example:8765", None), (f"{bind}:8765", "http://rebind.evil.example")
    )
    assert ours == 200
    assert foreign_host in (400, 421) and foreign_origin in (400, 403)


def test_loopback_binds_take_the_loopback_names_and_extra_names_are_allowed(tmp_path):
    assert "localhost:*" in allowed_http_hosts("127.0.0.2")
    assert "localhost:*" not in allowed_http_hosts("10.1.2.3")
    assert "[::1]:*" in allowed_http_hosts("::1")
    app = VisionMCPServer(ScriptedBackend("x"), allowed_roots=[tmp_path]).streamable_http_app(
        host="10.1.2.3", allowed_hosts=["vision.example.org"]
    )
    assert _statuses(app, ("vision.example.org:443", "https://vision.example.org:443")) == [200]


def test_a_trickled_body_is_cut_off(monkeypatch):
    monkeypatch.setattr(mcp_server, "BODY_TIMEOUT", 0.3)
    sent: list[dict] = []

    async def trickle():
        await asyncio.sleep(0.2)
        return {"type": "http.request", "body": b"{", "more_body": True}

    async def send(message):
        sent.append(message)

    async def run():
        return await mcp_server._read_body(trickle, send)

    assert asyncio.run(run()) is None
    assert sent[0]["status"] == 408 and b"did not arrive within 0.3 seconds" in sent[1]["body"]


def test_a_whole_body_is_replayed_to_the_transport():
    parts = [{"type": "http.request", "body": b"ab", "more_body": True}, {"type": "http.request", "body": b"c"}]

    async def receive():
        return parts.pop(0)

    async def run():
        replay = await mcp_server._read_body(receive, None)
        return await replay()

    assert asyncio.run(run()) == {"type": "http.request", "body": b"abc", "more_body": False}


def test_a_body_over_the_sdk_default_but_within_our_limit_is_served(tmp_path):
    """The transport's own body limit (the SDK's 4 MiB default) is raised to MAX_BODY_BYTES, so a tool call
    carrying a picture of a few MiB as base64 is served, not refused with 413."""
    padded = {**INITIALIZE, "params": {**INITIALIZE["params"], "padding": "x" * (5 << 20)}}
    app = VisionMCPServer(ScriptedBackend("x"), allowed_roots=[tmp_path]).streamable_http_app()
    with TestClient(app) as client:
        headers = {**HEADERS, "host": "127.0.0.1:8765"}
        assert client.post("/mcp", content=json.dumps(padded), headers=headers).status_code == 200


def test_a_body_over_our_limit_is_refused_with_413(tmp_path, monkeypatch):
    monkeypatch.setattr(mcp_server, "MAX_BODY_BYTES", 1 << 20)
    padded = {**INITIALIZE, "params": {**INITIALIZE["params"], "padding": "x" * (2 << 20)}}
    app = VisionMCPServer(ScriptedBackend("x"), allowed_roots=[tmp_path]).streamable_http_app()
    with TestClient(app) as client:
        headers = {**HEADERS, "host": "127.0.0.1:8765"}
        response = client.post("/mcp", content=json.dumps(padded), headers=headers)
    assert response.status_code == 413 and "over 1 MiB" in response.text
