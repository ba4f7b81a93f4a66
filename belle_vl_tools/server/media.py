"""Loading the pictures of requests on dedicated, bounded thread pools, apart from request handling.

Two lanes, so a slow network can never hold up a request whose pictures are inline:

* **fetch** (``http(s)`` URLs): ``fetch_workers`` slots. A fetch holds its slot until it ends or until its
  deadline (the policy's ``url_total_timeout`` plus a second) passes; then the request gets a 400 and the slot is
  free again, even if the thread is still stuck in a socket (it is left to finish in a reserve of
  ``max_abandoned`` extra threads; when the reserve is used up, new URL fetches get a 503 until threads come
  back). One client (by address) may hold at most ``per_client`` fetches at once; more get a 429.
* **decode** (data URLs): ``decode_workers`` slots, with the same deadline.

The event loop only waits; no picture is ever loaded on asyncio's default executor.

**Pixel budget.** A decoded picture costs memory by its pixels, not its bytes (a 40 MP PNG of one colour is a few
kilobytes and 120 MB of RGB). :meth:`MediaPool.load_all` reads every picture's size from its header first, then
holds the request's pixels against a budget per request (more: 413) and for the server as a whole (more: 503)
before any picture is decoded; a :class:`PixelTicket` gives them back when the request ends.
"""

from __future__ import annotations

import asyncio
import binascii
import collections
import concurrent.futures
import io
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..errors import ImageError, ImageFetchError
from ..images import ImagePolicy, check_url, fetch_url, load_image
from .errors import APIError

__all__ = ["DEFAULT_MAX_REQUEST_PIXELS", "DEFAULT_MAX_SERVER_PIXELS", "MediaPool", "PixelTicket"]

#: Pixels of all the pictures of one request, by default (two pictures at the default 40 MP limit).
DEFAULT_MAX_REQUEST_PIXELS = 80_000_000
#: Pixels of the pictures of all requests in flight at once, by default.
DEFAULT_MAX_SERVER_PIXELS = 200_000_000


class _Lane:
    """``slots`` concurrent jobs on a thread pool with ``slots + reserve`` threads."""

    def __init__(self, name: str, slots: int, reserve: int) -> None:
        self.name = name
        self.slots = slots
        self.reserve = reserve
        self.executor = ThreadPoolExecutor(max_workers=slots + reserve, thread_name_prefix=f"belle-vl-{name}")
        self.lock = threading.Lock()
        self.busy = 0  # slots held
        self.abandoned = 0  # threads still running jobs whose deadline passed
        self.waiters: collections.deque[asyncio.Future] = collections.deque()

    async def acquire(self) -> None:
        loop = asyncio.get_running_loop()
        with self.lock:
            if self.busy < self.slots and not self.waiters:
                self.busy += 1
                return
            waiter = loop.create_future()
            self.waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            with self.lock:
                if waiter in self.waiters:
                    self.waiters.remove(waiter)
                    raise
            self.release()  # the slot was handed over just as we gave up
            raise

    def release(self) -> None:
        with self.lock:
            while self.waiters:
                waiter = self.waiters.popleft()
                if not waiter.done():
                    waiter.get_loop().call_soon_threadsafe(_hand_over, waiter)
                    return
            self.busy -= 1


def _hand_over(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _abandon(lane: _Lane, future: concurrent.futures.Future) -> None:
    """Count a job nobody waits for any more among the lane's stuck threads until its thread really ends (the
    thread's own future: asyncio's wrapper of it is done as soon as it is cancelled, the thread is not)."""
    with lane.lock:
        if future.done():
            return
        lane.abandoned += 1

    def done(_: Any) -> None:
        with lane.lock:
            lane.abandoned -= 1

    future.add_done_callback(done)


class PixelTicket:
    """The pixels one request holds against the server's budget; :meth:`release` (idempotent) gives them back."""

    def __init__(self, pool: MediaPool) -> None:
        self._pool = pool
        self.pixels = 0

    def release(self) -> None:
        with self._pool._pixels_lock:
            self._pool.pixels_in_flight -= self.pixels
            self.pixels = 0


def _data_url_bytes(source: str) -> bytes | None:
    """The encoded picture of a base64 data URL, or None (load_image then says what is wrong with it)."""
    head, comma, payload = source.strip().partition(",")
    if not comma or not head.lower().startswith("data:") or ";base64" not in head.lower():
        return None
    text = "".join(payload.split()).translate(str.maketrans("-_", "+/"))
    try:
        return binascii.a2b_base64(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None


def _header_pixels(data: bytes | None, policy: ImagePolicy) -> int:
    """Width x height of the (first) picture in ``data`` from its header, nothing decoded; when the header cannot be
    read, the most the policy lets a picture have (the decoder refuses more)."""
    if data is not None:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as image:  # lazy: reads the header only
                width, height = image.size
                return int(width) * int(height)
        except Exception:  # noqa: BLE001 - unreadable or over Pillow's own limit: load_image explains
            pass
    return int(policy.max_pixels)


def _fetch(url: str, policy: ImagePolicy) -> bytes:
    """The encoded picture at an allowed http(s) URL (as :func:`load_image` fetches it, without decoding)."""
    url = check_url(url, policy)
    fetcher = policy.fetcher or fetch_url
    try:
        data = fetcher(url, policy)
    except (ImageError, MemoryError):
        raise
    except Exception as exc:  # a custom fetcher's own error types
        raise ImageFetchError(f"Fetching the image failed ({type(exc).__name__}).") from exc
    if isinstance(data, memoryview):
        data = data.tobytes()
    if not isinstance(data, bytes | bytearray):
        raise ImageFetchError(f"The image fetcher returned {type(data).__name__}, not bytes.")
    return bytes(data)


class MediaPool:
    """Loads request pictures under a policy on bounded pools (see the module's description).

    Args:
        fetch_workers: Slots for URL fetches.
        decode_workers: Slots for decoding data URLs.
        per_client: Most URL fetches one client address may have running at once.
        max_abandoned: Threads still stuck in fetches past their deadline that may exist at once.
        grace: Seconds added to the policy's ``url_total_timeout`` before a fetch's slot is taken back.
        decode_timeout: Seconds a data URL may take to decode.
        max_request_pixels: Pixels of all the pictures of one request (more: 413).
        max_server_pixels: Pixels of the pictures of all requests in flight (more: 503 until some end).
    """

    def __init__(
        self,
        *,
        fetch_workers: int = 8,
        decode_workers: int = 2,
        per_client: int = 4,
        max_abandoned: int = 32,
        grace: float = 1.0,
        decode_timeout: float = 30.0,
        max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS,
        max_server_pixels: int = DEFAULT_MAX_SERVER_PIXELS,
    ) -> None:
        if min(fetch_workers, decode_workers, per_client) < 1 or max_abandoned < 0:
            raise ValueError("media pool sizes must be at least 1 (max_abandoned at least 0).")
        if min(max_request_pixels, max_server_pixels) < 1:
            raise ValueError("the pixel budgets must be at least 1.")
        self.max_request_pixels = int(max_request_pixels)
        self.max_server_pixels = int(max_server_pixels)
        self.pixels_in_flight = 0
        self._pixels_lock = threading.Lock()
        self.fetch = _Lane("fetch", fetch_workers, max_abandoned)
        self.decode = _Lane("decode", decode_workers, max_abandoned)
        self.per_client = per_client
        self.grace = grace
        self.decode_timeout = decode_timeout
        self._clients: collections.Counter[str] = collections.Counter()
        self._clients_lock = threading.Lock()

    def stats(self) -> dict[str, int]:
        """Slots in use and stuck threads, per lane, and the pixels requests in flight hold."""
        return {
            "fetch_busy": self.fetch.busy,
            "fetch_abandoned": self.fetch.abandoned,
            "decode_busy": self.decode.busy,
            "decode_abandoned": self.decode.abandoned,
            "pixels_in_flight": self.pixels_in_flight,
            "max_server_pixels": self.max_server_pixels,
        }

    def ticket(self) -> PixelTicket:
        """A new request's hold on the pixel budget (empty until :meth:`load_all` fills it)."""
        return PixelTicket(self)

    def _hold(self, ticket: PixelTicket, pixels: Sequence[int], params: Sequence[str | None]) -> None:
        total = sum(pixels)
        if total > self.max_request_pixels:
            biggest = max(range(len(pixels)), key=pixels.__getitem__)
            raise APIError(
                413,
                f"The request's pictures hold {total:,} pixels, over this server's budget of "
                f"{self.max_request_pixels:,} pixels per request (the largest, in {params[biggest]}, has "
                f"{pixels[biggest]:,}): send fewer or smaller pictures.",
                param=params[biggest],
                code="pixel_budget_exceeded",
            )
        with self._pixels_lock:
            if self.pixels_in_flight + total > self.max_server_pixels:
                raise APIError(
                    503,
                    f"The server is decoding or answering pictures of {self.pixels_in_flight:,} pixels, and "
                    f"{total:,} more would pass its budget of {self.max_server_pixels:,} pixels in flight; retry "
                    "shortly.",
                    type="server_error",
                    code="pixel_budget_busy",
                    headers={"Retry-After": "2"},
                )
            self.pixels_in_flight += total
            ticket.pixels += total

    async def load_all(
        self,
        sources: Sequence[tuple[str, str | None]],
        policy: ImagePolicy,
        client: str,
        ticket: PixelTicket,
    ) -> list[Any]:
        """The pictures of one request (``(source, param)`` pairs), as PIL images: URLs fetched first, then every
        picture's size read from its header and the request's pixels held on ``ticket`` against the budgets
        (413 / 503), and only then decoded. The caller releases the ticket when the request ends."""
        raw: list[Any] = await asyncio.gather(*(self._encoded(src, policy, client, param) for src, param in sources))
        pixels = await asyncio.to_thread(
            lambda: [_header_pixels(item if isinstance(item, bytes) else _data_url_bytes(item), policy) for item in raw]
        )
        self._hold(ticket, pixels, [param for _, param in sources])
        tasks = [
            asyncio.ensure_future(self._run(self.decode, load_image, item, policy, self.decode_timeout, param))
            for item, (_, param) in zip(raw, sources, strict=True)
        ]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()

    async def _encoded(self, source: str, policy: ImagePolicy, client: str, param: str | None) -> Any:
        """A data URL as it is (decoded from base64 with the picture, on the decode lane), a URL's downloaded bytes."""
        if not source.lstrip()[:8].lower().startswith(("http://", "https://")):
            return source
        return await self._fetch_bytes(source, policy, client, param)

    def close(self) -> None:
        """Stop the pools' threads (jobs still running are not waited for)."""
        for lane in (self.fetch, self.decode):
            lane.executor.shutdown(wait=False, cancel_futures=True)

    async def load(self, source: str, policy: ImagePolicy, client: str, param: str | None = None) -> Any:
        """The picture at ``source`` (a data URL or an http(s) URL) as a PIL image, loaded under ``policy`` (no
        pixel budget: :meth:`load_all` holds one)."""
        is_url = source.lstrip()[:8].lower().startswith(("http://", "https://"))
        if not is_url:
            return await self._run(self.decode, load_image, source, policy, self.decode_timeout, param)
        data = await self._fetch_bytes(source, policy, client, param)
        return await self._run(self.decode, load_image, data, policy, self.decode_timeout, param)

    async def _fetch_bytes(self, source: str, policy: ImagePolicy, client: str, param: str | None) -> bytes:
        with self._clients_lock:
            if self._clients[client] >= self.per_client:
                raise APIError(
                    429,
                    f"This client already has {self.per_client} image downloads running; wait for them to finish.",
                    param=param,
                    code="too_many_fetches",
                    headers={"Retry-After": "1"},
                )
            self._clients[client] += 1
        try:
            return await self._run(self.fetch, _fetch, source, policy, policy.url_total_timeout + self.grace, param)
        finally:
            with self._clients_lock:
                self._clients[client] -= 1
                if self._clients[client] <= 0:
                    del self._clients[client]

    async def _run(
        self,
        lane: _Lane,
        job: Callable[[Any, ImagePolicy], Any],
        source: Any,
        policy: ImagePolicy,
        deadline: float,
        param: str | None,
    ) -> Any:
        if lane.abandoned and lane.abandoned >= lane.reserve:
            raise APIError(
                503,
                f"The server's {lane.name} threads are all stuck on slow sources; retry later.",
                type="server_error",
                code="media_busy",
                headers={"Retry-After": "5"},
            )
        await lane.acquire()
        released = False
        try:
            thread_future = lane.executor.submit(job, source, policy)
            future = asyncio.wrap_future(thread_future)
            try:
                return await asyncio.wait_for(asyncio.shield(future), timeout=deadline)
            except TimeoutError:
                _abandon(lane, thread_future)
                lane.release()
                released = True
                what = "download" if lane.name == "fetch" else "decoding"
                raise APIError(
                    400,
                    f"The image {what} took longer than its deadline of {deadline:.0f} s.",
                    param=param,
                    code="image_fetch_failed" if lane.name == "fetch" else "invalid_image",
                ) from None
            except asyncio.CancelledError:  # the client went away, or a sibling picture failed
                if not thread_future.cancel():  # already running: counted until its thread ends
                    _abandon(lane, thread_future)
                raise
        finally:
            if not released:
                lane.release()
