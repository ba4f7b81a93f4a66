"""Pictures are budgeted by their pixels, read from the headers before anything is decoded: per request (413) and
for the server as a whole (503); decode threads are counted until they really end."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import io
import sys
import threading
import time
from typing import Any

import httpx
import pytest
from PIL import Image

pytest.importorskip("fastapi")

from belle_vl_tools.backend import Usage  # noqa: E402
from belle_vl_tools.images import ImagePolicy  # noqa: E402
from belle_vl_tools.server import background_server, create_app  # noqa: E402
from belle_vl_tools.server.media import MediaPool  # noqa: E402
from belle_vl_tools.testing import ScriptedBackend  # noqa: E402

SIDE = 6320  # 39.9 MP: just under the default 40 MP limit per picture


def _png_url(width: int, height: int, colour: tuple[int, int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def huge_url() -> str:
    """A 6320 x 6320 PNG of one colour: a few hundred kilobytes that decode to 120 MB of RGB."""
    return _png_url(SIDE, SIDE, (200, 40, 40))


def _body(urls: list[str]) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {"model": "scripted", "messages": [{"role": "user", "content": [*content, {"type": "text", "text": "?"}]}]}


def _rss() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


class _PeakRSS:
    """The highest resident size seen (every 20 ms) while the block runs, less the size before it."""

    def __enter__(self) -> _PeakRSS:
        self.base = self.peak = _rss()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(0.02):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()
        self.growth = self.peak - self.base


@pytest.mark.skipif(sys.platform != "linux", reason="reads the resident size from /proc")
def test_eight_huge_pictures_are_refused_from_their_headers_alone(huge_url: str) -> None:
    backend = ScriptedBackend("ok", usage=Usage(5, 2))
    app = create_app(backend, max_request_bytes=8_000_000)  # the default budgets: 80 MP per request, 200 MP in all
    body = _body([huge_url] * 8)
    with background_server(app) as base, httpx.Client(base_url=base, timeout=120) as client:
        with _PeakRSS() as rss:
            reply = client.post("/v1/chat/completions", json=body)
            with concurrent.futures.ThreadPoolExecutor(4) as pool:  # four such requests at once
                replies = list(pool.map(lambda _: client.post("/v1/chat/completions", json=body), range(4)))
        for answer in [reply, *replies]:
            assert answer.status_code == 413, answer.text
            error = answer.json()["error"]
            assert error["code"] == "pixel_budget_exceeded"
            assert "80,000,000 pixels per request" in error["message"]
            assert "319,539,200" in error["message"]  # what the request holds
        assert backend.calls == []
        # nothing was decoded: one decoded picture alone would add 120 MB (generous: the machine is shared)
        assert rss.growth < 100 * 2**20, rss.growth
        health = client.get("/health").json()["media"]
        assert health["pixels_in_flight"] == 0 and health["decode_abandoned"] == 0


#: Peak resident growth per million pixels decoded and held (measured: 6.8 MB with benchmarks/pixel_budget.py;
#: the decoded RGB picture and the decoder's own copy), doubled for the test's margin.
MB_PER_MEGAPIXEL = 14


@pytest.mark.skipif(sys.platform != "linux", reason="reads the resident size from /proc")
def test_memory_stays_within_the_server_budget_when_it_is_full() -> None:
    picture = _png_url(3000, 3000, (90, 90, 200))  # 9 MP
    backend = ScriptedBackend("ok", usage=Usage(5, 2))
    app = create_app(backend, max_request_pixels=18_000_000, max_server_pixels=27_000_000, max_batch_size=8)
    body = _body([picture, picture])
    with background_server(app) as base, httpx.Client(base_url=base, timeout=120) as client:
        client.get("/health")
        with _PeakRSS() as rss, concurrent.futures.ThreadPoolExecutor(4) as pool:
            statuses = [
                r.status_code for r in pool.map(lambda _: client.post("/v1/chat/completions", json=body), range(4))
            ]
        backend.calls.clear()
    assert set(statuses) <= {200, 503} and 200 in statuses
    assert rss.growth < (27 * MB_PER_MEGAPIXEL + 64) * 2**20, rss.growth  # the 27 MP budget, not 4 x 18 MP


def test_the_server_budget_holds_pictures_until_their_answers_are_sent() -> None:
    gate = threading.Event()
    backend = ScriptedBackend("ok", usage=Usage(5, 2), gate=gate)
    picture = _png_url(2000, 2000, (10, 120, 30))  # 4 MP
    app = create_app(backend, max_request_pixels=8_000_000, max_server_pixels=12_000_000, max_batch_size=8)
    body = _body([picture, picture])  # 8 MP: the whole per-request budget
    with background_server(app) as base, httpx.Client(base_url=base, timeout=60) as client:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            first = pool.submit(client.post, "/v1/chat/completions", json=body)
            deadline = time.monotonic() + 30
            while client.get("/health").json()["media"]["pixels_in_flight"] < 8_000_000:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            # 8 MP held while the first answer waits: another 8 MP would pass the 12 MP budget
            busy = client.post("/v1/chat/completions", json=body)
            assert busy.status_code == 503, busy.text
            assert busy.json()["error"]["code"] == "pixel_budget_busy"
            assert "12,000,000 pixels in flight" in busy.json()["error"]["message"]
            assert busy.headers.get("retry-after")
            small = pool.submit(client.post, "/v1/chat/completions", json=_body([picture]))  # 4 MP still fits
            while client.get("/health").json()["media"]["pixels_in_flight"] < 12_000_000:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            gate.set()
            assert first.result().status_code == 200 and small.result().status_code == 200
        streamed = client.post("/v1/chat/completions", json={**body, "stream": True})
        assert streamed.status_code == 200 and "[DONE]" in streamed.text
        deadline = time.monotonic() + 10  # a stream gives its hold back once its response has ended
        while client.get("/health").json()["media"]["pixels_in_flight"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert client.get("/health").json()["media"]["pixels_in_flight"] == 0  # every hold given back
        over = client.post("/v1/chat/completions", json=_body([picture, picture, picture]))
        assert over.status_code == 413 and "messages[0].content" in over.json()["error"]["message"]


def test_a_decode_thread_is_counted_until_it_really_ends() -> None:
    """A picture's decode abandoned because a sibling failed (its task cancelled) still holds its thread."""
    pool = MediaPool(decode_workers=2)
    release = threading.Event()
    started = threading.Event()

    def stuck(source: Any, policy: ImagePolicy) -> None:
        started.set()
        release.wait(30)

    async def run() -> None:
        task = asyncio.ensure_future(pool._run(pool.decode, stuck, "x", ImagePolicy(), 30.0, None))
        while not started.is_set():
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert pool.stats()["decode_abandoned"] == 1 and pool.stats()["decode_busy"] == 0
    release.set()
    deadline = time.monotonic() + 10
    while pool.stats()["decode_abandoned"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool.stats()["decode_abandoned"] == 0
    pool.close()
