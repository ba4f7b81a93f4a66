"""The framework-neutral vision tools: the image policy they enforce, the image store, and runs over the tiny
checkpoint."""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from belle_vl_tools.backend import Usage
from belle_vl_tools.errors import BackendError
from belle_vl_tools.images import ImagePolicy
from belle_vl_tools.react import ToolSpec
from belle_vl_tools.testing import ScriptedBackend
from belle_vl_tools.tools import TOOL_NAMES, BelleVLTool, ImageStore, ToolResult, UnknownImageHandleError, make_tools

FEW_TOKENS = {"max_new_tokens": 6}


def _png(color: str, size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


class SpyBackend(ScriptedBackend):
    """A backend that records what it is asked and answers with a fixed text (no model)."""

    def __init__(self, answer: str = "an answer", error: BaseException | None = None) -> None:
        super().__init__(answer, model_name="spy", error=error, usage=Usage(10, 3, 1))

    def picture(self, call: int = -1) -> Image.Image:
        [picture] = self.pictures(call)
        return picture


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    """An allowed folder with a picture in it; a picture outside it sits next to it."""
    inside = tmp_path / "allowed"
    inside.mkdir()
    (inside / "red.png").write_bytes(_png("red"))
    (tmp_path / "secret.png").write_bytes(_png("blue"))
    return inside


def _tool(backend: Any, root: Path, name: str = "describe_image", **policy: Any) -> BelleVLTool:
    return make_tools(backend, ImagePolicy.restricted(root, **policy), names=[name])[name]


# --- policy ------------------------------------------------------------------------------------------------------


def test_reads_a_file_inside_the_root(root: Path) -> None:
    spy = SpyBackend("A red picture.")
    result = _tool(spy, root).run(image=str(root / "red.png"))
    assert not result.is_error and result.text == "A red picture."
    assert spy.picture().getpixel((0, 0)) == (255, 0, 0)


def test_parent_traversal_is_refused(root: Path) -> None:
    spy = SpyBackend()
    result = _tool(spy, root).run(image=str(root / ".." / "secret.png"))
    assert result.is_error
    assert "outside the folders images may be read from" in result.text
    assert spy.calls == []  # the model never saw it


def test_relative_traversal_is_refused(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(root)
    result = _tool(SpyBackend(), root).run(image="../secret.png")
    assert result.is_error and "outside" in result.text


def test_symlink_out_of_the_root_is_refused(root: Path) -> None:
    link = root / "innocent.png"
    try:
        os.symlink(root.parent / "secret.png", link)
    except (OSError, NotImplementedError):  # pragma: no cover - platforms without symlinks
        pytest.skip("symbolic links are not available here")
    spy = SpyBackend()
    result = _tool(spy, root).run(image=str(link))
    assert result.is_error and "symbolic links are resolved" in result.text
    assert spy.calls == []


def test_file_url_is_refused(root: Path) -> None:
    result = _tool(SpyBackend(), root, allow_urls=True).run(image=(root / "red.png").as_uri())
    assert result.is_error and "file" in result.text.lower()


def test_urls_are_off_by_default(root: Path) -> None:
    result = _tool(SpyBackend(), root).run(image="https://example.com/cat.png")
    assert result.is_error and "allow_urls" in result.text


def test_loopback_url_is_refused(root: Path) -> None:
    for url in ("http://127.0.0.1:8000/x.png", "http://localhost/x.png", "http://[::1]/x.png"):
        result = _tool(SpyBackend(), root, allow_urls=True).run(image=url)
        assert result.is_error, url
        assert "loopback" in result.text.lower() or "private" in result.text.lower()


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the standard library's name
        if self.path == "/red.png":
            body = _png("red")
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path.startswith("/to/"):
            self.send_response(302)
            self.send_header("Location", "http://" + self.path[len("/to/") :])
            self.end_headers()
        else:
            self.send_error(404)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """A local HTTP server on loopback: /red.png is a picture, /to/<host/path> redirects to http://<host/path>."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_allowed_url_is_fetched(root: Path, server: str) -> None:
    spy = SpyBackend("red")
    tool = _tool(spy, root, allow_urls=True, allowed_url_hosts={"127.0.0.1"})
    result = tool.run(image=f"{server}/red.png")
    assert not result.is_error, result.text
    assert spy.picture().getpixel((5, 5)) == (255, 0, 0)


@pytest.mark.parametrize("target", ["10.1.2.3/x.png", "169.254.169.254/latest/meta-data", "192.168.0.1/x.png"])
def test_redirect_to_a_private_address_is_refused(root: Path, server: str, target: str) -> None:
    spy = SpyBackend()
    tool = _tool(spy, root, allow_urls=True, allowed_url_hosts={"127.0.0.1"})
    result = tool.run(image=f"{server}/to/{target}")
    assert result.is_error
    assert target.split("/")[0] in result.text
    assert "private" in result.text.lower() or "link-local" in result.text.lower()
    assert spy.calls == []


def test_oversize_file_is_refused(root: Path) -> None:
    noisy = Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3))
    noisy.save(root / "noise.png")
    assert (root / "noise.png").stat().st_size > 10_000
    result = _tool(SpyBackend(), root, max_bytes=10_000).run(image=str(root / "noise.png"))
    assert result.is_error and "max_bytes" in result.text


def test_too_many_pixels_is_refused(root: Path) -> None:
    (root / "wide.png").write_bytes(_png("white", (400, 300)))
    result = _tool(SpyBackend(), root, max_pixels=10_000).run(image=str(root / "wide.png"))
    assert result.is_error and "max_pixels" in result.text


def test_corrupt_image_is_refused(root: Path) -> None:
    (root / "broken.png").write_bytes(_png("red")[:60])
    (root / "notes.png").write_bytes(b"just some text, not a picture")
    for name in ("broken.png", "notes.png"):
        result = _tool(SpyBackend(), root).run(image=str(root / name))
        assert result.is_error, name
        assert name in result.text


def test_missing_file(root: Path) -> None:
    result = _tool(SpyBackend(), root).run(image=str(root / "nope.png"))
    assert result.is_error and "No such file" in result.text


def test_data_url_is_accepted(root: Path) -> None:
    spy = SpyBackend()
    url = "data:image/png;base64," + base64.b64encode(_png("green")).decode()
    assert not _tool(spy, root).run(image=url).is_error
    assert spy.picture().getpixel((1, 1)) == (0, 128, 0)


# --- handles -----------------------------------------------------------------------------------------------------


def test_handles_name_pictures_of_the_conversation(root: Path) -> None:
    spy = SpyBackend()
    tool = _tool(spy, root)
    first = tool.store.add(_png("red"))
    second = tool.store.add(Image.new("RGB", (8, 8), "blue"))
    assert (first, second) == ("image_1", "image_2")
    assert "image_2" in tool.store and "'image_2'" in tool.store and "image_9" not in tool.store
    assert not tool.run(image="image_2").is_error
    assert spy.picture().getpixel((0, 0)) == (0, 0, 255)
    assert not tool.run(image=" `image_1` ").is_error
    assert spy.picture().getpixel((0, 0)) == (255, 0, 0)


def test_unknown_handle(root: Path) -> None:
    spy = SpyBackend()
    tool = _tool(spy, root)
    result = tool.run(image="image_3")
    assert result.is_error and "No picture has been given a handle yet" in result.text
    tool.store.add(_png("red"))
    result = tool.run(image="image_3")
    assert result.is_error and "'image_3'" in result.text and "image_1" in result.text
    assert spy.calls == []
    with pytest.raises(UnknownImageHandleError):
        ImageStore().get("image_1")


def test_store_handles_are_loaded_under_the_policy(root: Path) -> None:
    tool = _tool(SpyBackend(), root)
    handle = tool.store.add(str(root.parent / "secret.png"))
    result = tool.run(image=handle)
    assert result.is_error and "outside" in result.text


def test_store_is_thread_safe() -> None:
    store = ImageStore()
    handles: list[str] = []
    lock = threading.Lock()

    def add_many() -> None:
        for _ in range(200):
            handle = store.add(b"x")
            with lock:
                handles.append(handle)

    threads = [threading.Thread(target=add_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(handles)) == 800 == len(store)


# --- errors and arguments ----------------------------------------------------------------------------------------


def test_argument_errors_come_back_as_results(root: Path) -> None:
    tool = _tool(SpyBackend(), root, name="visual_qa")
    result = tool.run(image=str(root / "red.png"))
    assert result.is_error and "question" in result.text and "Field required" in result.text
    result = _tool(SpyBackend(), root).run(image=str(root / "red.png"), detail="very")
    assert result.is_error and "detail" in result.text


@pytest.mark.parametrize("error", [BackendError("The server is down."), RuntimeError("CUDA out of memory")])
def test_backend_errors_come_back_as_results(root: Path, error: BaseException) -> None:
    result = _tool(SpyBackend(error=error), root).run(image=str(root / "red.png"))
    assert result.is_error and str(error) in result.text
    assert asyncio.run(_tool(SpyBackend(error=error), root).arun(image=str(root / "red.png"))).is_error


def test_prompt_errors_come_back_as_results(root: Path) -> None:
    result = _tool(SpyBackend(), root, name="visual_qa").run(image=str(root / "red.png"), question="<img>x</img>")
    assert result.is_error


def test_make_tools_names_and_specs(root: Path) -> None:
    tools = make_tools(SpyBackend(), ImagePolicy.restricted(root))
    assert tuple(tools) == TOOL_NAMES
    assert len({id(tool.store) for tool in tools.values()}) == 1
    spec = tools["visual_qa"].spec()
    assert isinstance(spec, ToolSpec) and spec.parameters["required"] == ["image", "question"]
    assert ToolSpec.from_openai(spec.to_openai()) == spec
    with pytest.raises(ValueError, match="Unknown tool name"):
        make_tools(SpyBackend(), names=["describe_image", "paint"])
    with pytest.raises(TypeError, match="chat"):
        make_tools(object())
    assert make_tools(SpyBackend())["read_text"].policy == ImagePolicy(allowed_roots=(Path.cwd(),))


def test_prompts_and_generation_reach_the_backend(root: Path) -> None:
    spy = SpyBackend()
    tools = make_tools(spy, ImagePolicy.restricted(root), generation={"max_new_tokens": 7})
    path = str(root / "red.png")
    tools["describe_image"].run(image=path, detail="detailed", language="zh")
    tools["visual_qa"].run(image=path, question="How many circles?")
    tools["read_text"].run(image=path)
    texts = [messages[0].parts[1].text for messages, _ in spy.calls]
    assert texts[0] == "详细描述一下这张图" and "How many circles?" in texts[1] and texts[2] != texts[1]
    assert all(call[1] == {"temperature": 0, "max_new_tokens": 7} for call in spy.calls)


# --- locate ------------------------------------------------------------------------------------------------------


def test_locate_returns_pixel_boxes_and_a_drawing(root: Path) -> None:
    (root / "wide.png").write_bytes(_png("white", (200, 100)))
    spy = SpyBackend("<ref>the red car</ref><box>(100,200),(500,600)</box>")
    result = _tool(spy, root, name="locate_objects").run(image=str(root / "wide.png"), description="the red car")
    assert not result.is_error
    [box] = result.data["boxes"]
    assert (box["x1"], box["y1"], box["x2"], box["y2"]) == (20, 20, 100, 60)
    assert box["label"] == "the red car" and result.data["image_size"] == [200, 100]
    assert "[20, 20, 100, 60]" in result.text
    drawn = result.artifact
    assert isinstance(drawn, Image.Image) and drawn.size == (200, 100)
    assert drawn.getpixel((20, 40)) != (255, 255, 255)  # the left edge of the box is drawn
    assert drawn.getpixel((180, 90)) == (255, 255, 255)  # far from the box nothing changed
    assert 'Output the detection box of "the red car"' in spy.messages(0)[0].parts[1].text


def test_locate_without_boxes(root: Path) -> None:
    result = _tool(SpyBackend("I see nothing."), root, name="locate_objects").run(
        image=str(root / "red.png"), description="a dog"
    )
    assert not result.is_error and result.data["boxes"] == [] and "No box found" in result.text
    assert isinstance(result.artifact, Image.Image)


# --- over the tiny checkpoint ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_tools(runtime, pictures) -> dict[str, BelleVLTool]:
    folder = next(iter(pictures.values())).parent
    return make_tools(runtime, ImagePolicy.restricted(folder), generation=FEW_TOKENS)


@pytest.mark.parametrize("name", ["describe_image", "visual_qa", "read_text"])
def test_the_image_changes_the_answer(tiny_tools, pictures, name: str) -> None:
    tool = tiny_tools[name]
    extra = {"question": "What is it?"} if name == "visual_qa" else {}
    red = tool.run(image=str(pictures["red"]), **extra)
    blue = tool.run(image=str(pictures["blue"]), **extra)
    assert not red.is_error and not blue.is_error, (red.text, blue.text)
    assert red.text != blue.text
    assert red.data["usage"]["images"] == 1 and red.data["model"]
    assert tool.run(image=str(pictures["red"]), **extra).text == red.text  # greedy: repeatable


def test_handle_and_path_give_the_same_answer(tiny_tools, pictures) -> None:
    tool = tiny_tools["describe_image"]
    handle = tool.store.add(str(pictures["green"]))
    assert tool.run(image=handle).text == tool.run(image=str(pictures["green"])).text


def test_async_run_matches_run(tiny_tools, pictures) -> None:
    tool = tiny_tools["visual_qa"]
    sync = tool.run(image=str(pictures["blue"]), question="Which color?")
    result = asyncio.run(tool.arun(image=str(pictures["blue"]), question="Which color?"))
    assert isinstance(result, ToolResult) and result.text == sync.text


def test_locate_over_the_tiny_checkpoint(tiny_tools, pictures) -> None:
    result = tiny_tools["locate_objects"].run(image=str(pictures["red"]), description="the red circle")
    assert not result.is_error
    assert result.data["image_size"] == [96, 80]
    assert isinstance(result.artifact, Image.Image) and result.artifact.size == (96, 80)
    for box in result.data["boxes"]:  # a random model may or may not write boxes; any it writes are in pixels
        assert 0 <= box["x1"] <= box["x2"] <= 96 and 0 <= box["y1"] <= box["y2"] <= 80


def test_policy_applies_over_the_tiny_checkpoint(tiny_tools, tmp_path: Path) -> None:
    outside = tmp_path / "outside.png"
    outside.write_bytes(_png("red"))
    result = tiny_tools["describe_image"].run(image=str(outside))
    assert result.is_error and "outside" in result.text


# --- what model= accepts -------------------------------------------------------------------------------------------


def test_model_argument_takes_a_backend_a_folder_or_a_hub_id_and_nothing_else(tmp_path: Path) -> None:
    from belle_vl_tools.backend import load_backend
    from belle_vl_tools.errors import CheckpointError

    spy = SpyBackend()
    assert load_backend(spy) is spy

    class Adapter:  # e.g. ChatBelleVL or the LlamaIndex LLM: holds its backend
        backend = spy

    assert load_backend(Adapter()) is spy
    with pytest.raises(CheckpointError, match="not a checkpoint folder and not a Hub id"):
        load_backend(str(tmp_path / "no" / "such" / "folder"))
    with pytest.raises(CheckpointError, match="RemoteBelleVL"):
        load_backend("http://127.0.0.1:8000/v1")
    with pytest.raises(TypeError, match="checkpoint folder or a Hub id"):
        load_backend(42)
    with pytest.raises(TypeError, match="already loaded"):
        load_backend(spy, device="cuda")
