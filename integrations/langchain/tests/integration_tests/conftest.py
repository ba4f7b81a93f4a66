"""Shared fixtures: one tiny random Belle-VL checkpoint (real Qwen vocabulary) loaded once, and a local image server.

LangChain's standard image tests download a picture from a fixed https URL with ``httpx.get`` and also hand that
URL to the model. Here a PNG drawn on the spot is served by an HTTP server on loopback: ``httpx.get`` for that
URL is answered from it, and the model's image policy fetches URLs through a fetcher that reads from the same
server, so the tests run offline and the URL path is exercised for real.
"""

from __future__ import annotations

import http.server
import io
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw

#: The loaded tiny model, set by the session fixture below (the standard suites read it in a property).
SHARED: dict[str, Any] = {}


def _picture() -> bytes:
    image = Image.new("RGB", (120, 90), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((10, 10, 60, 50), fill="orange")
    draw.ellipse((60, 30, 110, 80), fill="purple")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


PICTURE = _picture()


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(PICTURE)))
        self.end_headers()
        self.wfile.write(PICTURE)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="session")
def image_server() -> Iterator[str]:
    """Base URL of a loopback HTTP server that answers every path with the test PNG."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _local(url: str, base: str) -> str:
    """The loopback address serving ``url`` (same path)."""
    parts = urllib.parse.urlsplit(url)
    return base + (parts.path or "/")


@pytest.fixture(scope="session", autouse=True)
def tiny_model(tmp_path_factory: pytest.TempPathFactory, image_server: str, pictures: dict[str, Path]):
    """The tiny checkpoint, loaded once, with an image policy that fetches URLs from the local server."""
    from belle_vl_tools import BelleVL, ImagePolicy
    from belle_vl_tools.testing import write_tiny_checkpoint
    from belle_vl_tools.tokenization_qwen_vl import qwen_vocab_file

    def fetch_locally(url: str, policy: ImagePolicy) -> bytes:
        with urllib.request.urlopen(_local(url, image_server), timeout=10) as response:
            return response.read(policy.max_bytes + 1)

    folder = write_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny") / "belle-vl-tiny", seed=0, vocab_file=qwen_vocab_file()
    )
    policy = ImagePolicy.trusted(allow_urls=True, fetcher=fetch_locally)
    model = BelleVL.from_pretrained(folder, image_policy=policy)
    SHARED.update(model=model, folder=folder, pictures=pictures)
    yield model
    SHARED.clear()


@pytest.fixture(autouse=True)
def _serve_test_images(monkeypatch: pytest.MonkeyPatch, image_server: str) -> None:
    """``httpx.get`` of the standard suites' image URLs is answered by the local server."""
    import httpx

    real_get = httpx.get

    def get(url: Any, *args: Any, **kwargs: Any) -> httpx.Response:
        text = str(url)
        if text.startswith("https://") and text.lower().split("?")[0].endswith((".png", ".jpg", ".jpeg")):
            return real_get(_local(text, image_server), *args, **kwargs)
        return real_get(url, *args, **kwargs)

    monkeypatch.setattr(httpx, "get", get)


@pytest.fixture(scope="session")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two small PNG files that differ: a red circle and a blue square."""
    folder = tmp_path_factory.mktemp("pictures")
    paths = {}
    for name, color in (("red", "red"), ("blue", "blue")):
        image = Image.new("RGB", (96, 80), "white")
        draw = ImageDraw.Draw(image)
        if name == "red":
            draw.ellipse((20, 10, 76, 66), fill=color)
        else:
            draw.rectangle((10, 10, 60, 50), fill=color)
        path = folder / f"{name}.png"
        image.save(path)
        paths[name] = path
    return paths
