"""Loading the pictures of requests on dedicated, bounded thread pools, apart from request handling.

Two lanes, so a slow network can never hold up a request whose pictures are inline:

* **fetch** (``http(s)`` URLs): ``fetch_workers`` slots. A fetch holds its slot until it ends or until its
  deadline (the policy's ``url_total_timeout`` plus a second) passes; then the request gets a 400 and the slot is
  free again, even if the thread is still stuck in a socket (it is left to finish in a reserve of
  ``max_abandoned`` extra threads; when the reserve is used up, new URL fetches get a 503 until threads come
  back). One client (by address) may hold at most ``per_client`` fetches at once; more get a 429.
* **decode** (data URLs): ``decode_workers`` slots, with the same deadline.

The event loop only waits; no picture is ever loaded on asyncio's default executor.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..images import ImagePolicy, load_image
from .errors import APIError

__all__ = ["MediaPool"]


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


def _abandon(lane: _Lane, future: asyncio.Future) -> None:
    """Count a job nobody waits for any more among the lane's stuck threads until it ends."""
    if future.done():
        return
    with lane.lock:
        lane.abandoned += 1

    def done(_: Any) -> None:
        with lane.lock:
            lane.abandoned -= 1

    future.add_done_callback(done)


class MediaPool:
    """Loads request pictures under a policy on bounded pools (see the module's description).

    Args:
        fetch_workers: Slots for URL fetches.
        decode_workers: Slots for decoding data URLs.
        per_client: Most URL fetches one client address may have running at once.
        max_abandoned: Threads still stuck in fetches past their deadline that may exist at once.
        grace: Seconds added to the policy's ``url_total_timeout`` before a fetch's slot is taken back.
        decode_timeout: Seconds a data URL may take to decode.
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
    ) -> None:
        if min(fetch_workers, decode_workers, per_client) < 1 or max_abandoned < 0:
            raise ValueError("media pool sizes must be at least 1 (max_abandoned at least 0).")
        self.fetch = _Lane("fetch", fetch_workers, max_abandoned)
        self.decode = _Lane("decode", decode_workers, max_abandoned)
        self.per_client = per_client
        self.grace = grace
        self.decode_timeout = decode_timeout
        self._clients: collections.Counter[str] = collections.Counter()
        self._clients_lock = threading.Lock()

    def stats(self) -> dict[str, int]:
        """Slots in use and stuck threads, per lane."""
        return {
            "fetch_busy": self.fetch.busy,
            "fetch_abandoned": self.fetch.abandoned,
            "decode_busy": self.decode.busy,
            "decode_abandoned": self.decode.abandoned,
        }

    def close(self) -> None:
        """Stop the pools' threads (jobs still running are not waited for)."""
        for lane in (self.fetch, self.decode):
            lane.executor.shutdown(wait=False, cancel_futures=True)

    async def load(self, source: str, policy: ImagePolicy, client: str, param: str | None = None) -> Any:
        """The picture at ``source`` (a data URL or an http(s) URL) as a PIL image, loaded under ``policy``."""
        is_url = source.lstrip()[:8].lower().startswith(("http://", "https://"))
        if not is_url:
            return await self._run(self.decode, source, policy, self.decode_timeout, param)
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
            return await self._run(self.fetch, source, policy, policy.url_total_timeout + self.grace, param)
        finally:
            with self._clients_lock:
                self._clients[client] -= 1
                if self._clients[client] <= 0:
                    del self._clients[client]

    async def _run(self, lane: _Lane, source: str, policy: ImagePolicy, deadline: float, param: str | None) -> Any:
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
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(lane.executor, load_image, source, policy)
            try:
                return await asyncio.wait_for(asyncio.shield(future), timeout=deadline)
            except TimeoutError:
                _abandon(lane, future)
                lane.release()
                released = True
                what = "download" if lane.name == "fetch" else "decoding"
                raise APIError(
                    400,
                    f"The image {what} took longer than its deadline of {deadline:.0f} s.",
                    param=param,
                    code="image_fetch_failed" if lane.name == "fetch" else "invalid_image",
                ) from None
            except asyncio.CancelledError:  # the client went away
                if not future.cancel():
                    _abandon(lane, future)
                raise
        finally:
            if not released:
                lane.release()
