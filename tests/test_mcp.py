"""The MCP server (`belle-vl mcp`) driven as real hosts drive it: the SDK's client over stdio (the server as a
subprocess) and over streamable HTTP, LangChain's and LlamaIndex's MCP adapters; the demo model answers."""

from __future__ import annotations

import asyncio
import base64
import io
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

pytest.importorskip("mcp")

import mcp.types as types  # noqa: E402
from mcp import ClientSession, StdioServerParameters  # noqa: E402
from mcp.client.stdio import stdio_client  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402
from mcp.shared.exceptions import McpError  # noqa: E402
from mcp.shared.memory import create_connected_server_and_client_session  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from belle_vl_tools.backend import ChatResult, StreamChunk, Usage  # noqa: E402
from belle_vl_tools.captions import CaptionCache  # noqa: E402
from belle_vl_tools.mcp_server import VisionMCPServer, _intersect  # noqa: E402
from belle_vl_tools.testing import write_test_pictures  # noqa: E402
from belle_vl_tools.tools import make_tools  # noqa: E402

API_KEY = "test-key-123"
QUESTION = "What color is the shape?"
MANY = 24  # pictures in the folder whose captioning is cancelled
CIRCLE = Path(__file__).resolve().parents[1] / "examples" / "pictures" / "red_circle.png"  # red in (41..70, 41..70)


# ---------------------------------------------------------------------------------------------------------------
# Pictures and servers
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The allowed folder: red/blue/green pictures, a corrupt one, an album, and MANY distinct pictures."""
    folder = tmp_path_factory.mktemp("allowed")
    write_test_pictures(folder)
    shutil.copyfile(CIRCLE, folder / "circle.png")
    good = (folder / "red.png").read_bytes()
    (folder / "broken.png").write_bytes(good[: len(good) // 3])
    write_test_pictures(folder / "album")
    (folder / "album" / "green.png").unlink()
    many = folder / "many"
    many.mkdir()
    for i in range(MANY):
        image = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(image).rectangle((2 + i, 4 + i // 2, 30 + i, 40), fill=("red", "blue", "green")[i % 3])
        image.save(many / f"p{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A picture outside the allowed folder."""
    return write_test_pictures(tmp_path_factory.mktemp("outside"))["red"]


def _command(*args: str) -> list[str]:
    """The `belle-vl` console script of this environment, else the CLI run through the interpreter."""
    script = Path(sys.executable).with_name("belle-vl")
    if script.exists():
        return [str(script), *args]
    found = shutil.which("belle-vl")
    if found:
        return [found, *args]
    return [sys.executable, "-c", "from belle_vl_tools.cli import main; main()", *args]


def _text(result: types.CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if isinstance(block, types.TextContent))


def _data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _overlap(a: list[float], b: list[float]) -> float:
    """Intersection over union of two [x1, y1, x2, y2] boxes."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def http_server(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`belle-vl mcp --http` on a loopback port with a bearer key; yields the endpoint's URL."""
    port = _free_port()
    log = tmp_path_factory.mktemp("http") / "server.log"
    cache = log.with_name("captions.sqlite")
    command = _command(
        "mcp", "--http", "--port", str(port), "--api-key", API_KEY, "--allow-root", str(root), "--cache", str(cache)
    )
    command += ["--log-level", "warning"]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"belle-vl mcp --http exited: {log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"belle-vl mcp --http did not listen: {log.read_text()[-2000:]}")
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# ---------------------------------------------------------------------------------------------------------------
# Checks shared by the transports
# ---------------------------------------------------------------------------------------------------------------


async def _check_red(session: ClientSession, image: str = "red.png") -> types.CallToolResult:
    result = await session.call_tool("visual_qa", {"image": image, "question": QUESTION})
    assert not result.isError, _text(result)
    assert "red" in _text(result).lower()
    data = result.structuredContent
    assert data is not None and "red" in data["answer"].lower()
    assert data["finish_reason"] == "stop" and data["usage"]["images"] == 1 and data["usage"]["completion_tokens"] > 0
    return result


async def _check_errors(session: ClientSession, root: Path, outside: Path) -> None:
    """Each bad image is an isError result naming what to do, and the server keeps serving."""
    cases = {
        str(outside): "outside the folders",
        "../" + outside.parent.name + "/red.png": "outside the folders",
        "https://example.com/cat.png": "--allow-urls",
        "image_7": "no picture called 'image_7'",
        "broken.png": "broken.png",
        "missing.png": "No such file",
    }
    for image, expected in cases.items():
        result = await session.call_tool("visual_qa", {"image": image, "question": QUESTION})
        assert result.isError, (image, _text(result))
        assert expected in _text(result), (image, _text(result))
        assert str(root) not in _text(result)  # paths relative to the allowed folder, not the machine's
    await _check_red(session)


# ---------------------------------------------------------------------------------------------------------------
# stdio: the SDK's client, the server as a subprocess
# ---------------------------------------------------------------------------------------------------------------


class _Registry:
    """A backend good enough to build the core tools (for their specs)."""

    model_name = "registry"

    def chat(self, messages: Any, **generation: Any) -> ChatResult:  # pragma: no cover - never called
        raise AssertionError


def test_stdio_client_against_the_demo_model(root: Path, outside: Path, tmp_path: Path) -> None:
    cache = tmp_path / "captions.sqlite"
    params = StdioServerParameters(
        command=_command()[0],
        args=[*_command()[1:], "mcp", "--allow-root", str(root), "--cache", str(cache)],
        cwd=str(tmp_path),  # the server's own folder is not where pictures are read from
    )

    async def run() -> None:
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            await session.initialize()

            # The tools, with the core registry's schemas and descriptions.
            listed = {tool.name: tool for tool in (await session.list_tools()).tools}
            assert set(listed) == {
                "describe_image",
                "visual_qa",
                "locate_objects",
                "read_text",
                "add_image",
                "caption_folder",
            }
            for name, tool in make_tools(_Registry()).items():
                assert listed[name].inputSchema == tool.spec().parameters
                assert listed[name].description == tool.description
                assert listed[name].outputSchema is not None

            # The first call loads the model and says so.
            progress: list[tuple[float, float | None, str | None]] = []

            async def on_progress(value: float, total: float | None, message: str | None) -> None:
                progress.append((value, total, message))

            result = await session.call_tool(
                "visual_qa", {"image": "red.png", "question": QUESTION}, progress_callback=on_progress
            )
            assert not result.isError and "red" in _text(result).lower(), _text(result)
            assert any("Loading the model" in (message or "") for _, _, message in progress), progress

            # The picture decides the answer.
            blue = await session.call_tool("visual_qa", {"image": str(root / "blue.png"), "question": QUESTION})
            assert "blue" in _text(blue).lower() and "red" not in _text(blue).lower(), _text(blue)

            # locate_objects: boxes in pixels and the picture with them drawn.
            located = await session.call_tool(
                "locate_objects", {"image": "circle.png", "description": "the red circle"}
            )
            assert not located.isError, _text(located)
            boxes = located.structuredContent["boxes"]
            assert boxes and located.structuredContent["image_size"] == [112, 112]
            assert _overlap([boxes[0][k] for k in ("x1", "y1", "x2", "y2")], [41, 41, 71, 71]) > 0.5, boxes
            assert "circle.png" in _text(located) and str(root) not in _text(located)
            images = [block for block in located.content if isinstance(block, types.ImageContent)]
            assert len(images) == 1 and images[0].mimeType == "image/png"
            drawn = Image.open(io.BytesIO(base64.b64decode(images[0].data))).convert("RGB")
            original = Image.open(CIRCLE).convert("RGB")
            assert drawn.size == original.size and drawn.tobytes() != original.tobytes()

            await _check_errors(session, root, outside)

            # A handle for a picture sent once as a data URL.
            added = await session.call_tool("add_image", {"image": _data_url(root / "red.png")})
            assert not added.isError, _text(added)
            handle = added.structuredContent["handle"]
            await _check_red(session, handle)

            # A folder captioned with progress, then from the cache.
            progress.clear()
            captions = await session.call_tool("caption_folder", {"folder": "album"}, progress_callback=on_progress)
            assert not captions.isError, _text(captions)
            by_path = {c["path"]: c["caption"] for c in captions.structuredContent["captions"]}
            assert set(by_path) == {"album/blue.png", "album/red.png"}
            assert "red" in by_path["album/red.png"].lower() and "blue" in by_path["album/blue.png"].lower()
            assert [value for value, _, _ in progress] == [1, 2] and all(total == 2 for _, total, _ in progress)
            again = await session.call_tool("caption_folder", {"folder": "album"})
            assert again.structuredContent["cached"] == 2 and again.structuredContent["new"] == 0
            refused = await session.call_tool("caption_folder", {"folder": str(outside.parent)})
            assert refused.isError and "outside the folders" in _text(refused)

            # Cancelling a folder caption stops it; the server keeps serving.
            started = anyio.Event()

            async def first_picture(value: float, total: float | None, message: str | None) -> None:
                if (message or "").startswith("Captioned"):
                    started.set()

            outcome: dict[str, Any] = {}

            async def caption_many() -> None:
                try:
                    outcome["result"] = await session.call_tool(
                        "caption_folder", {"folder": "many"}, progress_callback=first_picture
                    )
                except McpError as exc:
                    outcome["error"] = exc

            request_id = session._request_id  # the id the next request gets
            async with anyio.create_task_group() as group:
                group.start_soon(caption_many)
                with anyio.fail_after(120):
                    await started.wait()
                await session.send_notification(
                    types.ClientNotification(
                        types.CancelledNotification(
                            params=types.CancelledNotificationParams(requestId=request_id, reason="test")
                        )
                    )
                )
            assert "error" in outcome and "cancel" in str(outcome["error"]).lower(), outcome
            await _check_red(session)
            with CaptionCache(cache) as store:
                done = len(store)
            await anyio.sleep(2)
            with CaptionCache(cache) as store:
                assert len(store) == done < 2 + MANY  # the album's two, and only part of the many

    anyio.run(run)


# ---------------------------------------------------------------------------------------------------------------
# Streamable HTTP: the SDK's client, LangChain, LlamaIndex
# ---------------------------------------------------------------------------------------------------------------


def test_http_needs_the_key(http_server: str) -> None:
    request = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    headers = {"Accept": "application/json, text/event-stream"}
    response = httpx.post(http_server, json=request, headers=headers)
    assert response.status_code == 401 and "--api-key" in response.text
    wrong = httpx.post(http_server, json=request, headers={**headers, "Authorization": "Bearer nope"})
    assert wrong.status_code == 401


def test_http_client_with_host_roots(http_server: str, root: Path, outside: Path) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}

    async def album_only(context: Any) -> types.ListRootsResult:
        return types.ListRootsResult(roots=[types.Root(uri=(root / "album").as_uri(), name="album")])

    async def run() -> None:
        async with (
            httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(30, read=300)) as http,
            streamable_http_client(http_server, http_client=http) as (read, write, _),
        ):
            async with ClientSession(read, write) as session:
                await session.initialize()
                await _check_red(session)
                await _check_errors(session, root, outside)
        # A host that declares roots narrows the folders: the album only.
        async with (
            httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(30, read=300)) as http,
            streamable_http_client(http_server, http_client=http) as (read, write, _),
        ):
            async with ClientSession(read, write, list_roots_callback=album_only) as session:
                await session.initialize()
                refused = await session.call_tool("visual_qa", {"image": str(root / "red.png"), "question": QUESTION})
                assert refused.isError and "outside the folders" in _text(refused), _text(refused)
                await _check_red(session, "red.png")  # relative to the host's root now: album/red.png
                answer = await _check_red(session, str(root / "album" / "red.png"))
                assert answer.structuredContent["image"] == "red.png"

    anyio.run(run)


def test_langchain_agent_calls_visual_qa(http_server: str) -> None:
    pytest.importorskip("langchain_mcp_adapters")
    from langchain.agents import create_agent
    from langchain_core.language_models.chat_models import BaseChatModel
    from langchain_core.messages import AIMessage, ToolMessage
    from langchain_core.outputs import ChatGeneration
    from langchain_core.outputs import ChatResult as LCChatResult
    from langchain_mcp_adapters.client import MultiServerMCPClient

    class ScriptedModel(BaseChatModel):
        """Asks visual_qa about red.png, then repeats what the tool said."""

        @property
        def _llm_type(self) -> str:
            return "scripted"

        def bind_tools(self, tools: Any, **kwargs: Any) -> ScriptedModel:
            assert "visual_qa" in {getattr(tool, "name", None) for tool in tools}
            return self

        def _generate(self, messages: list[Any], stop: Any = None, run_manager: Any = None, **kw: Any) -> Any:
            answers = [m for m in messages if isinstance(m, ToolMessage)]
            if not answers:
                call = {"name": "visual_qa", "args": {"image": "red.png", "question": QUESTION}, "id": "call_1"}
                message = AIMessage(content="", tool_calls=[call])
            else:
                message = AIMessage(content=f"The picture tool says: {answers[-1].text}")
            return LCChatResult(generations=[ChatGeneration(message=message)])

    async def run() -> None:
        client = MultiServerMCPClient(
            {
                "belle-vl": {
                    "transport": "streamable_http",
                    "url": http_server,
                    "headers": {"Authorization": f"Bearer {API_KEY}"},
                }
            }
        )
        tools = await client.get_tools()
        assert {"describe_image", "visual_qa", "locate_objects", "read_text"} <= {tool.name for tool in tools}
        agent = create_agent(ScriptedModel(), tools)
        state = await agent.ainvoke({"messages": [{"role": "user", "content": "What color is red.png?"}]})
        tool_message = next(m for m in state["messages"] if isinstance(m, ToolMessage))
        assert tool_message.status != "error" and "red" in tool_message.text.lower(), tool_message
        assert "red" in state["messages"][-1].text.lower()

    anyio.run(run)


def test_llama_index_tool_spec_lists_and_calls(http_server: str, root: Path) -> None:
    pytest.importorskip("llama_index.tools.mcp")
    from llama_index.tools.mcp import BasicMCPClient, McpToolSpec

    async def run() -> None:
        client = BasicMCPClient(http_server, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=180)
        tools = {tool.metadata.name: tool for tool in await McpToolSpec(client=client).to_tool_list_async()}
        assert {"describe_image", "visual_qa", "locate_objects", "read_text", "caption_folder"} <= set(tools)
        assert "question" in tools["visual_qa"].metadata.fn_schema.model_fields
        output = await tools["visual_qa"].acall(image="red.png", question=QUESTION)
        assert not output.raw_output.isError and "red" in _text(output.raw_output).lower()
        refused = await tools["visual_qa"].acall(image="https://example.com/x.png", question=QUESTION)
        assert refused.raw_output.isError

    anyio.run(run)


# ---------------------------------------------------------------------------------------------------------------
# In process: cancellation reaches the generation
# ---------------------------------------------------------------------------------------------------------------


class _EndlessBackend:
    """Streams "red" forever until the stream is closed."""

    model_name = "endless"

    def __init__(self) -> None:
        self.started = threading.Event()
        self.closed = threading.Event()
        self.tokens = 0

    def chat(self, messages: Any, **generation: Any) -> ChatResult:  # pragma: no cover - the server streams
        raise AssertionError("the MCP server must stream, so that a cancelled call stops")

    async def astream(self, messages: Any, **generation: Any) -> Any:
        self.started.set()
        try:
            while True:
                self.tokens += 1
                yield StreamChunk("red ")
                await asyncio.sleep(0.01)
        finally:
            self.closed.set()


class _OneAnswer(_EndlessBackend):
    async def astream(self, messages: Any, **generation: Any) -> Any:
        yield StreamChunk("It is red.")
        yield StreamChunk("", finish_reason="stop", usage=Usage(10, 4, 1))


def test_cancelling_a_call_stops_generation(root: Path) -> None:
    backend = _EndlessBackend()
    server = VisionMCPServer(backend, allowed_roots=[root])

    async def run() -> None:
        async with create_connected_server_and_client_session(server.server) as session:
            outcome: dict[str, Any] = {}

            async def ask() -> None:
                try:
                    outcome["result"] = await session.call_tool("visual_qa", {"image": "red.png", "question": "?"})
                except McpError as exc:
                    outcome["error"] = exc

            request_id = session._request_id
            async with anyio.create_task_group() as group:
                group.start_soon(ask)
                with anyio.fail_after(30):
                    while not backend.started.is_set():
                        await anyio.sleep(0.01)
                await anyio.sleep(0.1)
                await session.send_notification(
                    types.ClientNotification(
                        types.CancelledNotification(params=types.CancelledNotificationParams(requestId=request_id))
                    )
                )
            assert "error" in outcome, outcome
            with anyio.fail_after(10):
                while not backend.closed.is_set():
                    await anyio.sleep(0.01)
            tokens = backend.tokens
            await anyio.sleep(0.2)
            assert backend.tokens == tokens  # no token after the stream was closed
            assert (await session.send_ping()) is not None

    anyio.run(run)


def test_structured_result_and_roots_in_process(root: Path) -> None:
    server = VisionMCPServer(_OneAnswer(), allowed_roots=[root])

    async def album(context: Any) -> types.ListRootsResult:
        return types.ListRootsResult(roots=[types.Root(uri=(root / "album").as_uri())])

    async def run() -> None:
        async with create_connected_server_and_client_session(server.server, list_roots_callback=album) as session:
            result = await session.call_tool("visual_qa", {"image": "red.png", "question": "?"})
            assert not result.isError, _text(result)
            assert result.structuredContent == {
                "image": "red.png",
                "answer": "It is red.",
                "finish_reason": "stop",
                "usage": {"prompt_tokens": 10, "completion_tokens": 4, "images": 1, "total_tokens": 14},
                "model": "endless",
            }
            outside_album = await session.call_tool("visual_qa", {"image": "../green.png", "question": "?"})
            assert outside_album.isError and "outside the folders" in _text(outside_album)
            bad = await session.call_tool("visual_qa", {"image": "red.png"})
            assert bad.isError and "question" in _text(bad)

    anyio.run(run)


def test_an_empty_roots_list_means_the_operators_folders(root: Path, outside: Path) -> None:
    server = VisionMCPServer(_OneAnswer(), allowed_roots=[root])

    async def no_roots(context: Any) -> types.ListRootsResult:  # as MCP Inspector declares them
        return types.ListRootsResult(roots=[])

    async def elsewhere(context: Any) -> types.ListRootsResult:
        return types.ListRootsResult(roots=[types.Root(uri=outside.parent.as_uri())])

    async def run() -> None:
        async with create_connected_server_and_client_session(server.server, list_roots_callback=no_roots) as session:
            read = await session.call_tool("visual_qa", {"image": "red.png", "question": "?"})
            assert not read.isError, _text(read)
            added = await session.call_tool("add_image", {"image": "album/red.png"})
            assert not added.isError, _text(added)
            beyond = await session.call_tool("visual_qa", {"image": str(outside), "question": "?"})
            assert beyond.isError  # still nothing outside --allow-root
        async with create_connected_server_and_client_session(server.server, list_roots_callback=elsewhere) as session:
            for image in ("red.png", str(outside)):
                refused = await session.call_tool("visual_qa", {"image": image, "question": "?"})
                assert refused.isError, _text(refused)

    anyio.run(run)


def test_error_results_carry_our_message_and_the_handshake_our_version(root: Path, tmp_path: Path) -> None:
    """What keeps the server on the SDK's low-level server (docs/mcp.md): an error result, on tools that declare an
    output schema too, is our message as written (no wrapper prefix, no validation dump in its place), and the
    handshake names this package's version, not the SDK's."""
    from belle_vl_tools import __version__

    (tmp_path / "empty").mkdir()
    server = VisionMCPServer(_OneAnswer(), allowed_roots=[root, tmp_path])

    async def run() -> None:
        async with create_connected_server_and_client_session(server.server) as session:
            handshake = await session.initialize()  # again, to read what the server answers to it
            assert handshake.serverInfo.name == "belle-vl" and handshake.serverInfo.version == __version__
            tools = {tool.name: tool for tool in (await session.list_tools()).tools}
            assert tools["visual_qa"].outputSchema is not None and tools["caption_folder"].outputSchema is not None
            refused = await session.call_tool("visual_qa", {"image": "/etc/hostname", "question": "?"})
            assert refused.isError and refused.structuredContent is None
            assert _text(refused).startswith("Error: Refused to read '/etc/hostname'"), _text(refused)
            empty = await session.call_tool("caption_folder", {"folder": str(tmp_path / "empty")})
            assert empty.isError and _text(empty).startswith("Error: No pictures in 'empty'"), _text(empty)

    anyio.run(run)


def test_roots_intersection(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert _intersect([tmp_path], [a]) == (a,)
    assert _intersect([a], [tmp_path]) == (a,)
    assert _intersect([a], [b]) == ()
    assert _intersect([a, b], [tmp_path / "a" / "x", b]) == (tmp_path / "a" / "x", b)


def test_cancelling_stops_the_local_runtime(runtime: Any, root: Path) -> None:
    """A cancelled call frees the real runtime at once: a call that needs it next answers in seconds, though the
    cancelled one had thousands of tokens left to generate."""
    endless = VisionMCPServer(runtime, allowed_roots=[root], generation={"max_new_tokens": 4000})
    short = VisionMCPServer(runtime, allowed_roots=[root], generation={"max_new_tokens": 2})

    async def run() -> None:
        async with (
            create_connected_server_and_client_session(endless.server) as first,
            create_connected_server_and_client_session(short.server) as second,
        ):
            outcome: dict[str, Any] = {}

            async def ask() -> None:
                try:
                    outcome["result"] = await first.call_tool("describe_image", {"image": "red.png"})
                except McpError as exc:
                    outcome["error"] = exc

            request_id = first._request_id
            async with anyio.create_task_group() as group:
                group.start_soon(ask)
                await anyio.sleep(2)
                await first.send_notification(
                    types.ClientNotification(
                        types.CancelledNotification(params=types.CancelledNotificationParams(requestId=request_id))
                    )
                )
            assert "error" in outcome, outcome
            with anyio.fail_after(300):  # a hang guard only; what is proven is counted in decoding steps below
                answer = await second.call_tool("describe_image", {"image": "red.png"})
            assert not answer.isError and answer.structuredContent["usage"]["completion_tokens"] <= 2

    steps: list[int] = []
    hook = runtime.model.register_forward_hook(lambda *args: steps.append(1))
    try:
        anyio.run(run)
    finally:
        hook.remove()
    # Both calls together took far fewer steps than the cancelled one alone would have (4,000 tokens): it stopped.
    assert len(steps) < 4000 // 2, len(steps)


def test_remote_backend_answers_as_the_local_one(runtime: Any, root: Path) -> None:
    """`--remote`: the tools over RemoteBelleVL in front of `belle-vl serve` answer as over the runtime itself."""
    pytest.importorskip("fastapi")
    from belle_vl_tools import RemoteBelleVL
    from belle_vl_tools.server import background_server, create_app

    arguments = {"image": "red.png", "question": QUESTION}
    generation = {"max_new_tokens": 8}

    async def call(server: VisionMCPServer) -> types.CallToolResult:
        async with create_connected_server_and_client_session(server.server) as session:
            return await session.call_tool("visual_qa", arguments)

    local = anyio.run(call, VisionMCPServer(runtime, allowed_roots=[root], generation=generation))
    with background_server(create_app(runtime, model_name="tiny-remote")) as url:
        remote = RemoteBelleVL(url)
        try:
            served = anyio.run(call, VisionMCPServer(remote, allowed_roots=[root], generation=generation))
        finally:
            remote.close()
    assert not local.isError and not served.isError, (_text(local), _text(served))
    assert served.structuredContent["answer"] == local.structuredContent["answer"]
    assert served.structuredContent["model"] == "tiny-remote"
    tokens = [result.structuredContent["usage"]["completion_tokens"] for result in (local, served)]
    assert tokens[0] == tokens[1] > 0


def test_cli_refuses_mismatched_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from belle_vl_tools.cli import app

    monkeypatch.delenv("BELLE_VL_API_KEY", raising=False)
    monkeypatch.delenv("BELLE_VL_REMOTE_API_KEY", raising=False)
    for args, hint in (
        (["--api-key", "k"], "--api-key"),
        (["--remote", "http://127.0.0.1:1", "--model", "x"], "--model"),
        (["--remote-api-key", "k"], "--remote-api-key"),
        (["--allow-root", str(tmp_path / "missing")], "not a folder"),
    ):
        done = CliRunner().invoke(app, ["mcp", *args])
        assert done.exit_code in (1, 2) and hint in done.output, (args, done.output)
        assert done.exception is None or isinstance(done.exception, SystemExit), done.exception
