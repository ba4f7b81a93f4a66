"""RemoteBelleVL: the backend interface over HTTP, against the server and against scripted failures."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("httpx")
pytest.importorskip("fastapi")

import httpx  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402

from belle_vl_tools import ImagePolicy, RemoteBelleVL  # noqa: E402
from belle_vl_tools.backends.remote import RemoteBackendError  # noqa: E402
from belle_vl_tools.errors import ImageAccessDeniedError  # noqa: E402
from belle_vl_tools.server import background_server, create_app  # noqa: E402

GREEDY = {"temperature": 0, "max_new_tokens": 10}


def turn(image: Any, text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def base_url(runtime):
    with background_server(create_app(runtime, model_name="tiny-remote", max_batch_size=8)) as url:
        yield url


@pytest.fixture(scope="module")
def remote(base_url):
    with RemoteBelleVL(f"{base_url}/v1", api_key="unused") as client:
        yield client


def test_chat_stream_and_batch_equal_the_local_runtime(remote, runtime, pictures):
    assert remote.model_name == "tiny-remote"  # asked from the server
    red, blue = turn(pictures["red"], "What is this?"), turn(str(pictures["blue"]), "What is this?")
    local_red, local_blue = runtime.chat(red, **GREEDY), runtime.chat(blue, **GREEDY)
    assert local_red.text != local_blue.text

    result = remote.chat(red, **GREEDY)
    assert result.text == local_red.text
    assert result.usage.completion_tokens == local_red.usage.completion_tokens
    assert result.usage.prompt_tokens == local_red.usage.prompt_tokens and result.usage.images == 1
    assert result.finish_reason == local_red.finish_reason

    chunks = list(remote.stream(blue, **GREEDY))
    assert "".join(c.delta for c in chunks) == local_blue.text
    assert chunks[-1].finish_reason == local_blue.finish_reason
    assert chunks[-1].usage.completion_tokens == local_blue.usage.completion_tokens

    batch = remote.generate_batch([red, blue, red], **GREEDY)
    assert [r.text for r in batch] == [local_red.text, local_blue.text, local_red.text]

    system = runtime.chat([{"role": "user", "content": "hi"}], system="Be brief.", **GREEDY).text
    assert remote.chat([{"role": "user", "content": "hi"}], system="Be brief.", **GREEDY).text == system


def test_async_forms(remote, runtime, pictures):
    messages = turn(pictures["green"], "Colors?")
    expected = runtime.chat(messages, **GREEDY).text

    async def main() -> tuple[str, str, list[str]]:
        answer = await remote.achat(messages, **GREEDY)
        streamed = "".join([c.delta async for c in remote.astream(messages, **GREEDY)])
        batch = await remote.agenerate_batch([messages, messages], **GREEDY)
        await remote.aclose()
        return answer.text, streamed, [r.text for r in batch]

    text, streamed, batch = asyncio.run(main())
    assert text == streamed == expected and batch == [expected, expected]


def test_vision_tasks_and_tools_equal_the_local_backend(remote, runtime, pictures):
    assert remote.describe(pictures["red"], **GREEDY).text == runtime.describe(pictures["red"], **GREEDY).text
    assert remote.ask(pictures["blue"], "Why?", **GREEDY).text == runtime.ask(pictures["blue"], "Why?", **GREEDY).text
    here, there = (
        runtime.locate(pictures["red"], "the circle", **GREEDY),
        remote.locate(pictures["red"], "the circle", **GREEDY),
    )
    assert (there.text, there.boxes, there.image_size) == (here.text, here.boxes, here.image_size)

    tools_module = pytest.importorskip("belle_vl_tools.tools")
    policy = ImagePolicy.restricted(pictures["red"].parent)
    generation = {"max_new_tokens": 10}
    local_tools = tools_module.make_tools(runtime, policy, generation=generation)
    remote_tools = tools_module.make_tools(remote, policy, generation=generation)
    for name, arguments in [
        ("describe_image", {"image": str(pictures["red"])}),
        ("visual_qa", {"image": str(pictures["blue"]), "question": "What shape?"}),
        ("read_text", {"image": str(pictures["green"])}),
    ]:
        here, there = local_tools[name].run(**arguments), remote_tools[name].run(**arguments)
        assert not here.is_error and not there.is_error, (here.text, there.text)
        assert there.text == here.text
    there = asyncio.run(remote_tools["describe_image"].arun(image=str(pictures["blue"])))
    assert there.text == local_tools["describe_image"].run(image=str(pictures["blue"])).text


def test_images_pass_the_local_policy_before_anything_is_sent(base_url, pictures, tmp_path):
    app_calls: list[Any] = []
    client = RemoteBelleVL(f"{base_url}/v1", model="tiny-remote", image_policy=ImagePolicy.restricted(tmp_path))
    client.http_client.event_hooks["request"].append(app_calls.append)
    with pytest.raises(ImageAccessDeniedError):
        client.chat(turn(str(pictures["red"]), "hi"), **GREEDY)
    with pytest.raises(ImageAccessDeniedError):
        client.chat(turn("http://169.254.169.254/latest/meta-data", "hi"), **GREEDY)
    assert app_calls == []


def test_server_errors_are_typed(base_url):
    client = RemoteBelleVL(f"{base_url}/v1", model="no-such-model", max_retries=0)
    with pytest.raises(RemoteBackendError) as caught:
        client.chat([{"role": "user", "content": "hi"}], **GREEDY)
    assert caught.value.status == 404 and caught.value.code == "model_not_found"
    assert "no-such-model" in str(caught.value) and "model name" in str(caught.value)
    client = RemoteBelleVL(f"{base_url}/v1", model="tiny-remote")
    with pytest.raises(RemoteBackendError) as caught:
        client.chat([{"role": "user", "content": "hi"}], temperature=9)
    assert caught.value.status == 400 and caught.value.param == "temperature"
    with pytest.raises(RemoteBackendError):
        list(client.stream([{"role": "user", "content": "hi"}], temperature=9))


# --- retries ------------------------------------------------------------------------------------------------------
def flaky_app(failures: list[int]) -> tuple[FastAPI, list[int]]:
    """An app that answers the statuses in ``failures`` first, then a chat completion; records every call."""
    app = FastAPI()
    calls: list[int] = []

    @app.post("/v1/chat/completions")
    async def complete(request: Request) -> JSONResponse:
        body = await request.json()
        calls.append(len(calls))
        if len(calls) <= len(failures):
            status = failures[len(calls) - 1]
            return JSONResponse(
                {"error": {"message": "busy", "type": "server_error", "param": None, "code": None}},
                status_code=status,
                headers={"Retry-After": "0"},
            )
        text = f"echo {body['messages'][-1]['content']}"
        if body.get("stream"):
            from fastapi.responses import StreamingResponse

            events = [
                {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]},
                {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
                {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}},
            ]
            lines = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
            return StreamingResponse(iter([lines]), media_type="text/event-stream")
        return JSONResponse(
            {
                "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
            }
        )

    return app, calls


@pytest.mark.parametrize("status", [429, 503])
def test_retries_with_backoff_on_429_and_503(status):
    app, calls = flaky_app([status, status])
    with background_server(app) as base:
        client = RemoteBelleVL(base, model="m", max_retries=2, backoff=0.01)  # "/v1" is added to a bare host
        assert client.chat([{"role": "user", "content": "ping"}]).text == "echo ping"
        assert len(calls) == 3
        calls.clear()
        chunks = list(client.stream([{"role": "user", "content": "pong"}]))
        assert "".join(c.delta for c in chunks) == "echo pong" and chunks[-1].usage.completion_tokens == 2
        assert len(calls) == 3
        calls.clear()
        impatient = RemoteBelleVL(base, model="m", max_retries=1, backoff=0.01)
        with pytest.raises(RemoteBackendError) as caught:
            impatient.chat([{"role": "user", "content": "ping"}])
        assert caught.value.status == status and len(calls) == 2


def test_async_paths_retry_like_the_sync_ones():
    app, calls = flaky_app([503, 503])
    ping = [{"role": "user", "content": "ping"}]

    async def main(base: str) -> None:
        client = RemoteBelleVL(base, model="m", max_retries=2, backoff=0.01)
        assert (await client.achat(ping)).text == "echo ping"
        assert len(calls) == 3
        calls.clear()
        chunks = [chunk async for chunk in client.astream(ping)]
        assert "".join(c.delta for c in chunks) == "echo ping" and len(calls) == 3
        calls.clear()
        impatient = RemoteBelleVL(base, model="m", max_retries=1, backoff=0.01)
        with pytest.raises(RemoteBackendError) as caught:
            [chunk async for chunk in impatient.astream(ping)]
        assert caught.value.status == 503 and len(calls) == 2
        await client.aclose()
        await impatient.aclose()

    with background_server(app) as base:
        asyncio.run(main(base))


def test_4xx_is_not_retried():
    app, calls = flaky_app([400])
    with background_server(app) as base:
        with pytest.raises(RemoteBackendError) as caught:
            RemoteBelleVL(base, model="m", max_retries=3, backoff=0.01).chat([{"role": "user", "content": "x"}])
        assert caught.value.status == 400 and "busy" in str(caught.value) and len(calls) == 1


def test_connection_errors_are_retried_then_reported():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    client = RemoteBelleVL(f"http://127.0.0.1:{port}/v1", model="m", max_retries=2, backoff=0.01, timeout=5)
    hi = [{"role": "user", "content": "hi"}]

    async def astream() -> list[Any]:
        return [chunk async for chunk in client.astream(hi)]

    attempts = {
        "chat": lambda: client.chat(hi),
        "stream": lambda: list(client.stream(hi)),
        "achat": lambda: asyncio.run(client.achat(hi)),
        "astream": lambda: asyncio.run(astream()),
    }
    for name, attempt in attempts.items():
        with pytest.raises(RemoteBackendError) as caught:
            attempt()
        assert "after 3 attempt(s)" in str(caught.value) and "base_url" in str(caught.value), name


# --- no torch on the client side ----------------------------------------------------------------------------------
BLOCKER = """
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "tiktoken", "safetensors", "accelerate"):
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, Block())
"""


def test_remote_backend_works_without_torch_or_transformers(base_url, runtime, pictures):
    script = BLOCKER + textwrap.dedent(
        f"""
        import json, sys
        from belle_vl_tools import RemoteBelleVL
        remote = RemoteBelleVL({base_url + "/v1"!r})
        messages = [{{"role": "user", "content": [{{"type": "image", "image": {str(pictures["red"])!r}}},
                                                 {{"type": "text", "text": "What is this?"}}]}}]
        text = remote.chat(messages, temperature=0, max_new_tokens=10).text
        streamed = "".join(c.delta for c in remote.stream(messages, temperature=0, max_new_tokens=10))
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
        print(json.dumps({{"text": text, "streamed": streamed, "loaded": loaded}}))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    expected = runtime.chat(turn(pictures["red"], "What is this?"), **GREEDY).text
    assert out == {"text": expected, "streamed": expected, "loaded": []}


def test_a_stream_broken_midway_is_reported_not_repeated():
    """A retry after part of a streamed answer arrived would send that part again: report the break instead."""
    calls: list[int] = []

    class Breaking(httpx.SyncByteStream):
        def __iter__(self):
            yield b'data: {"choices": [{"index": 0, "delta": {"content": "hel"}}]}\n\n'
            raise httpx.ReadError("connection reset by peer")

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=Breaking())

    client = RemoteBelleVL(
        "http://server.invalid/v1", model="m", max_retries=3, backoff=0.01, transport=httpx.MockTransport(handler)
    )
    received = []
    with pytest.raises(RemoteBackendError, match="broke after part of the answer"):
        for chunk in client.stream([{"role": "user", "content": "hi"}]):
            received.append(chunk.delta)
    assert received == ["hel"] and len(calls) == 1


# --- the total deadline and the size limit ------------------------------------------------------------------------
class RawServer:
    """A loopback TCP server whose connections are answered by ``respond(socket, stop)`` in threads."""

    def __init__(self, respond: Any) -> None:
        import threading

        self.stop = threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.respond = respond
        self.connections = 0  # accepted so far (a retry is a new connection)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        import threading

        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                conn.recv(65536)  # the request (small enough to come in one read)
                self.respond(conn, self.stop)
            except OSError:
                pass

    def __enter__(self) -> RawServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


def trickle_headers(conn: socket.socket, stop: Any) -> None:
    """Headers one byte a second, never finished."""
    for byte in b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Slow: " + b"a" * 10_000:
        if stop.wait(1.0):
            return
        conn.sendall(bytes([byte]))


def endless_body(conn: socket.socket, stop: Any) -> None:
    """A chunked body that never ends."""
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"x" * 65536
    frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    while not stop.is_set():
        conn.sendall(frame)


def endless_events(conn: socket.socket, stop: Any) -> None:
    """A server-sent event stream that never ends."""
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
    event = b'data: {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [' + (
        b'{"index": 0, "delta": {"content": "' + b"a" * 4000 + b'"}, "finish_reason": null}]}\n\n'
    )
    frame = f"{len(event):x}\r\n".encode() + event + b"\r\n"
    while not stop.is_set():
        conn.sendall(frame)


HI = [{"role": "user", "content": "hi"}]


def test_a_server_trickling_headers_cannot_hold_a_call_past_its_deadline():
    import time

    with RawServer(trickle_headers) as server:
        client = RemoteBelleVL(server.url, model="m", max_retries=3, backoff=0.01)

        async def achat() -> Any:
            return await client.achat(HI, timeout=3)

        async def astream() -> list[Any]:
            return [c async for c in client.astream(HI, timeout=3)]

        calls = {
            "chat": lambda: client.chat(HI, timeout=3),
            "stream": lambda: list(client.stream(HI, timeout=3)),
            "achat": lambda: asyncio.run(achat()),
            "astream": lambda: asyncio.run(astream()),
        }
        for name, call in calls.items():
            connections = server.connections
            started = time.monotonic()
            with pytest.raises(RemoteBackendError) as caught:
                call()
            elapsed = time.monotonic() - started
            assert caught.value.code == "timeout" and "deadline of 3 s" in str(caught.value), name
            assert server.connections - connections == 1, name  # not retried after the deadline
            # The deadline is the point: not before it, and (5x margin for a busy machine) not held by the trickle.
            assert 2.5 < elapsed < 3 * 5, (name, elapsed)


def test_an_endless_answer_is_cut_at_the_size_limit_with_bounded_memory():
    import tracemalloc

    limit = 2 * 1024 * 1024

    def check(client: RemoteBelleVL) -> None:
        with pytest.raises(RemoteBackendError):  # once first, so that lazy imports do not count below
            client.chat(HI)
        tracemalloc.start()
        try:
            for call in (lambda: client.chat(HI), lambda: list(client.stream(HI))):
                with pytest.raises(RemoteBackendError) as caught:
                    call()
                assert caught.value.code == "response_too_large", str(caught.value)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 4 * limit, peak  # the answer was never read past the limit
        with pytest.raises(RemoteBackendError) as caught:
            asyncio.run(client.achat(HI))
        assert caught.value.code == "response_too_large"

    for respond in (endless_body, endless_events):
        with RawServer(respond) as server:
            check(RemoteBelleVL(server.url, model="m", max_retries=2, timeout=60, max_response_bytes=limit))
