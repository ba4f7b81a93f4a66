"""The scheduler that feeds a :class:`~belle_vl_tools.backend.Backend` from one worker thread.

It serves backends without the batching engine (a remote server, a test double, a runtime when the engine is not
available): requests that wait together and share their generation settings go to the backend as one batch
(``generate_batch``), streamed requests run one at a time, and two generations never race on one model. A request
that arrives while a batch runs joins the next batch. The queue of waiting requests is bounded (a full queue
answers 503), a client that disconnects while its request waits frees its place, and a streaming client that
disconnects stops its generation.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..backend import Backend, ChatResult, Message
from .errors import APIError, QueueFullError

logger = logging.getLogger("belle_vl_tools.server")

__all__ = ["BatchScheduler", "Job", "batch_key"]


@dataclasses.dataclass(eq=False)
class Job:
    """One request waiting for, or getting, its answer."""

    messages: Sequence[Message]
    generation: dict[str, Any]
    loop: asyncio.AbstractEventLoop
    stream: bool = False
    key: str | None = None  # requests with equal keys may share a batch; None runs alone
    future: asyncio.Future | None = None
    events: asyncio.Queue | None = None
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    enqueued: float = dataclasses.field(default_factory=time.monotonic)

    def deliver(self, result: ChatResult | None = None, error: BaseException | None = None) -> None:
        def settle() -> None:
            if self.future is None or self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self.loop.call_soon_threadsafe(settle)

    def emit(self, kind: str, payload: Any) -> None:
        assert self.events is not None
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))


def batch_key(generation: Mapping[str, Any]) -> str | None:
    """Requests with the same key can share a batch. Sampling with a seed runs alone, so a seed reproduces."""
    sampled = generation.get("temperature") != 0
    if generation.get("seed") is not None and sampled:
        return None
    return json.dumps(generation, sort_keys=True, default=str)


class BatchScheduler:
    """Feeds queued requests to one backend from one worker thread, batching those with equal settings.

    ``max_batch_size`` caps a batch, ``max_queue`` the requests waiting (not yet running); ``batch_wait`` is how
    long (seconds) the worker lets a burst of requests gather before it takes the next batch.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        max_batch_size: int = 8,
        max_queue: int = 64,
        batch_wait: float = 0.002,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be at least 1.")
        self.backend = backend
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.batch_wait = batch_wait
        self._pending: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.running = 0
        self.on_batch = on_batch
        self.stats = {"batches": 0, "requests": 0, "largest_batch": 0, "cancelled": 0}

    # --- queue ---------------------------------------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        return len(self._pending)

    def submit(self, job: Job) -> None:
        """Queue a job; :class:`QueueFullError` when ``max_queue`` jobs already wait."""
        with self._cond:
            if self._closed:
                raise APIError(503, "The server is shutting down.", type="server_error", code="shutting_down")
            if len(self._pending) >= self.max_queue:
                raise QueueFullError(self.max_queue)
            self._pending.append(job)
            self._ensure_started()
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """The client is gone: drop the job if it still waits, and stop its stream if it runs."""
        job.cancelled.set()
        with self._cond:
            try:
                self._pending.remove(job)
                self.stats["cancelled"] += 1
            except ValueError:
                pass

    def _ensure_started(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="belle-vl-scheduler", daemon=True)
            self._thread.start()

    def start(self) -> None:
        with self._cond:
            self._closed = False
            self._ensure_started()

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop taking jobs, fail the waiting ones and let the worker end."""
        with self._cond:
            self._closed = True
            pending = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
            thread = self._thread
        error = APIError(503, "The server is shutting down.", type="server_error", code="shutting_down")
        for job in pending:
            job.emit("error", error) if job.stream else job.deliver(error=error)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # --- worker --------------------------------------------------------------------------------------------------
    def _take(self) -> list[Job]:
        first = self._pending.popleft()
        batch = [first]
        if first.stream or first.key is None or self.max_batch_size == 1:
            return batch
        for job in list(self._pending):
            if len(batch) >= self.max_batch_size:
                break
            if not job.stream and job.key == first.key:
                self._pending.remove(job)
                batch.append(job)
        return batch

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
            if self.batch_wait > 0:
                time.sleep(self.batch_wait)  # let requests sent together arrive together
            with self._cond:
                if not self._pending:
                    continue
                batch = [job for job in self._take() if not job.cancelled.is_set()]
                self.running = len(batch)
            try:
                if not batch:
                    continue
                self.stats["batches"] += 1
                self.stats["requests"] += len(batch)
                self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
                if self.on_batch is not None:
                    self.on_batch(len(batch))
                if batch[0].stream:
                    self._stream(batch[0])
                else:
                    self._answer(batch)
            except BaseException as exc:  # never let the worker die
                logger.exception("The scheduler's worker failed", exc_info=exc)
            finally:
                with self._cond:
                    self.running = 0

    def _answer(self, batch: list[Job]) -> None:
        try:
            if len(batch) == 1:
                results = [self.backend.chat(batch[0].messages, **batch[0].generation)]
            else:
                results = self.backend.generate_batch([job.messages for job in batch], **batch[0].generation)
        except Exception as exc:
            if len(batch) == 1:
                batch[0].deliver(error=exc)
                return
            for job in batch:  # one bad request must not fail the others: answer them one by one
                self._answer([job])
            return
        for job, result in zip(batch, results, strict=True):
            job.deliver(result)

    def _stream(self, job: Job) -> None:
        iterator = self.backend.stream(job.messages, **job.generation)
        try:
            for chunk in iterator:
                if job.cancelled.is_set():
                    return
                job.emit("chunk", chunk)
            job.emit("done", None)
        except Exception as exc:
            job.emit("error", exc)
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()  # stops the generation of a client that went away
