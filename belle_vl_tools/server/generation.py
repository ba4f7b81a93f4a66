"""What the routes call to generate: one interface over the batching engine and over the plain backend scheduler.

* :class:`EngineGenerator`: the local runtime through :class:`belle_vl_tools.engine.BatchEngine`, an
  iteration-level scheduler: streamed and non-streamed requests with different settings share one running batch,
  join it between decoding steps and leave it when they finish or their client goes away. It honours every
  sampling parameter (penalties, ``logit_bias``, log-probabilities, per-row logits processors).
* :class:`BackendGenerator`: any :class:`~belle_vl_tools.backend.Backend` through :class:`BatchScheduler`. The
  backend interface has no penalties, ``logit_bias``, log-probabilities or logits processors, so requests that ask
  for them are refused with a 400 naming the parameter (:meth:`Generator.check`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

from ..backend import Backend, ChatResult, Message, StreamChunk, Usage
from ..sampling import SamplingParams
from .errors import bad_request
from .scheduler import BatchScheduler, Job, batch_key

__all__ = [
    "BackendGenerator",
    "Delta",
    "EngineGenerator",
    "Generator",
    "Output",
    "TokenLogprob",
    "check_features",
    "engine_available",
    "make_generator",
]

IsGone = Callable[[], Awaitable[bool]]


@dataclasses.dataclass
class TokenLogprob:
    """The log-probability of one generated token and of the most likely alternatives at its step."""

    token: str
    bytes: list[int] | None
    logprob: float
    top: list[tuple[str, list[int] | None, float]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Delta:
    """A piece of a streamed answer; the last one has ``finish_reason`` and ``usage``."""

    text: str = ""
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None


@dataclasses.dataclass
class Output:
    """A whole answer."""

    text: str
    finish_reason: str
    usage: Usage
    logprobs: list[TokenLogprob] | None = None


class Generator(Protocol):
    """What the routes need: answers, streams, and figures for /health and /metrics."""

    features: frozenset[str]

    @property
    def stats(self) -> Mapping[str, float]: ...

    @property
    def waiting(self) -> int: ...

    @property
    def running(self) -> int: ...

    def start(self) -> None: ...

    async def aclose(self) -> None: ...

    async def complete(self, messages: Sequence[Message], sampling: SamplingParams, is_gone: IsGone) -> Output: ...

    def stream(self, messages: Sequence[Message], sampling: SamplingParams) -> AsyncIterator[Delta]: ...


def check_features(generator: Generator, sampling: SamplingParams) -> None:
    """A 400 naming the first parameter the generator cannot honour."""
    backend = getattr(generator, "name", "backend")
    for name in sampling.engine_only():
        if name not in generator.features:
            if name == "processors":
                raise bad_request(
                    "Logits processors need the local runtime's batching engine.", None, "unsupported_parameter"
                )
            raise bad_request(
                f"{name} is not supported by this server's backend ({backend}): it needs the local "
                "runtime's batching engine.",
                name,
                "unsupported_parameter",
            )
    # a Grammar (not a response_format mapping) is a tool call's: only a backend that builds grammars can take it
    grammar = sampling.response_format
    if grammar is not None and not isinstance(grammar, Mapping) and "grammar" not in generator.features:
        raise bad_request(
            f"A forced tool call needs grammar-constrained decoding, which this server's backend ({backend}) "
            "cannot do: use tool_choice 'auto'.",
            "tool_choice",
            "unsupported_parameter",
        )


async def _until_done_or_gone(future: Awaitable[Any], is_gone: IsGone, poll: float = 0.1) -> Any:
    """The awaitable's result; raises CancelledError (after cancelling it) when the client disconnects first."""
    task = asyncio.ensure_future(future)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll)
            if done:
                return task.result()
            if await is_gone():
                raise asyncio.CancelledError("the client disconnected")
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


# ---------------------------------------------------------------------------------------------------------------
# The plain backend
# ---------------------------------------------------------------------------------------------------------------


class BackendGenerator:
    """Any backend, through :class:`BatchScheduler` (batches of equal settings; streams one at a time)."""

    features: frozenset[str] = frozenset()

    def __init__(self, backend: Backend, scheduler: BatchScheduler) -> None:
        self.backend = backend
        self.scheduler = scheduler
        self.name = type(backend).__name__
        # the local runtime applies a grammar itself (response_format=Grammar)
        self.features = frozenset({"grammar"}) if _is_local_runtime(backend) else frozenset()

    def _kwargs(self, sampling: SamplingParams) -> dict[str, Any]:
        # a response_format goes as it is: the runtime builds its grammar, a remote server constrains it there;
        # check_features refused what the backend cannot do
        return sampling.as_kwargs()

    @property
    def stats(self) -> dict[str, int]:
        return self.scheduler.stats

    @property
    def waiting(self) -> int:
        return self.scheduler.waiting

    @property
    def running(self) -> int:
        return self.scheduler.running

    def start(self) -> None:
        self.scheduler.start()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.scheduler.close)

    async def complete(self, messages: Sequence[Message], sampling: SamplingParams, is_gone: IsGone) -> Output:
        loop = asyncio.get_running_loop()
        generation = self._kwargs(sampling)
        job = Job(messages, generation, loop, key=batch_key(generation), future=loop.create_future())
        self.scheduler.submit(job)
        try:
            result: ChatResult = await _until_done_or_gone(job.future, is_gone)  # type: ignore[arg-type]
        finally:
            if not job.future.done() or job.future.cancelled():  # type: ignore[union-attr]
                self.scheduler.cancel(job)
        return Output(result.text, result.finish_reason, result.usage)

    async def stream(self, messages: Sequence[Message], sampling: SamplingParams) -> AsyncIterator[Delta]:
        loop = asyncio.get_running_loop()
        job = Job(messages, self._kwargs(sampling), loop, stream=True, events=asyncio.Queue())
        self.scheduler.submit(job)
        try:
            while True:
                kind, payload = await job.events.get()  # type: ignore[union-attr]
                if kind == "error":
                    raise payload
                if kind == "done":
                    return
                chunk: StreamChunk = payload
                yield Delta(chunk.delta, finish_reason=chunk.finish_reason, usage=chunk.usage)
                if chunk.finish_reason is not None:
                    return
        finally:
            self.scheduler.cancel(job)


# ---------------------------------------------------------------------------------------------------------------
# The batching engine
# ---------------------------------------------------------------------------------------------------------------


def engine_available() -> bool:
    """Whether :mod:`belle_vl_tools.engine` is installed with this package."""
    return importlib.util.find_spec("belle_vl_tools.engine") is not None


def _is_local_runtime(backend: Any) -> bool:
    return type(backend).__module__ == "belle_vl_tools.runtime" and hasattr(backend, "model")


def _token_logprob(entry: Any) -> TokenLogprob:
    """One engine log-probability entry (an object or a mapping) in the server's form."""

    def get(item: Any, name: str, default: Any = None) -> Any:
        return item.get(name, default) if isinstance(item, dict) else getattr(item, name, default)

    top = []
    for alt in get(entry, "top", None) or get(entry, "top_logprobs", None) or []:
        if isinstance(alt, tuple):
            token, raw, logprob = alt if len(alt) == 3 else (alt[0], None, alt[1])
        else:
            token, raw, logprob = get(alt, "token"), get(alt, "bytes"), get(alt, "logprob")
        top.append((str(token), list(raw) if raw is not None else None, float(logprob)))
    raw = get(entry, "bytes")
    return TokenLogprob(
        str(get(entry, "token")), list(raw) if raw is not None else None, float(get(entry, "logprob")), top
    )


class EngineGenerator:
    """The local runtime through the iteration-level batching engine."""

    features = frozenset(
        {"presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "processors", "grammar"}
    )

    def __init__(self, runtime: Any, *, max_batch_size: int, max_queue: int, on_batch: Callable[[int], None]) -> None:
        from ..engine import BatchEngine

        self.runtime = runtime
        self.name = "BatchEngine"
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.engine = BatchEngine(runtime, max_batch_size=max_batch_size)
        self.on_batch = on_batch
        self._closed = False
        self._counts = {"requests": 0, "cancelled": 0}

    @property
    def stats(self) -> dict[str, float]:
        """``batches``: prefill forwards (each may admit several requests), ``largest_batch``: most rows decoded
        together, ``requests``, ``cancelled``, and the engine's own counters (``steps``, ``tokens``, ...)."""
        engine = dict(self.engine.stats)
        return {
            **engine,
            **self._counts,
            "batches": engine.get("prefills", 0),
            "largest_batch": engine.get("max_rows", 0),
        }

    @property
    def waiting(self) -> int:
        return int(self.engine.queue_depth)

    @property
    def running(self) -> int:
        return int(self.engine.batch_size)

    def start(self) -> None:
        if self._closed:  # a closed engine cannot restart: a new lifespan gets a new one
            from ..engine import BatchEngine

            self.engine = BatchEngine(self.runtime, max_batch_size=self.max_batch_size)
            self._closed = False
        self.engine.start()

    async def aclose(self) -> None:
        self._closed = True
        await asyncio.to_thread(self.engine.close)

    async def _params(self, sampling: SamplingParams) -> SamplingParams:
        """The settings for the engine: a response_format becomes a compiled grammar's row processor."""
        processors = list(sampling.processors)
        if sampling.response_format is not None:
            from ..constrained import RowProcessor, compile_grammar_async, grammar_from

            grammar = grammar_from(sampling.response_format)
            if grammar is not None:
                limit = sampling.max_new_tokens or self.runtime.generation_config.max_new_tokens or 512
                vocab = self.runtime.model.config.vocab_size
                tokenizer = self.runtime.tokenizer
                # compiled on a thread of its own under its time budget: neither this event loop nor the engine's
                # decoding loop waits on it (the processor then only builds a matcher)
                compiled = await compile_grammar_async(grammar, tokenizer, vocab)
                processors.append(
                    RowProcessor(grammar, tokenizer, vocab_size=vocab, max_new_tokens=limit, compiled=compiled)
                )
        try:
            return dataclasses.replace(sampling, response_format=None, processors=processors)
        except ValueError as exc:  # SamplingError naming the field
            raise bad_request(" ".join(str(exc).split())) from None

    def _admit(self) -> None:
        if self.waiting >= self.max_queue:
            from .errors import QueueFullError

            raise QueueFullError(self.max_queue)
        self._counts["requests"] += 1

    async def complete(self, messages: Sequence[Message], sampling: SamplingParams, is_gone: IsGone) -> Output:
        params = await _until_done_or_gone(self._params(sampling), is_gone)
        self._admit()
        try:
            result = await _until_done_or_gone(self.engine.complete(messages, params), is_gone)
        except asyncio.CancelledError:
            self._counts["cancelled"] += 1
            raise
        self.on_batch(max(1, self.running))
        return Output(
            text=result.text,
            finish_reason=result.finish_reason,
            usage=_usage(result.usage),
            logprobs=[_token_logprob(e) for e in result.logprobs] if result.logprobs is not None else None,
        )

    async def stream(self, messages: Sequence[Message], sampling: SamplingParams) -> AsyncIterator[Delta]:
        params = await self._params(sampling)
        self._admit()
        events = self.engine.stream(messages, params)
        try:
            async for event in events:
                yield Delta(
                    text=event.delta,
                    logprobs=[_token_logprob(e) for e in event.logprobs or ()],
                    finish_reason=event.finish_reason,
                    usage=_usage(event.usage) if event.usage is not None else None,
                )
                if event.finish_reason is not None:
                    self.on_batch(max(1, self.running))
        finally:
            await events.aclose()


def _usage(usage: Any) -> Usage:
    if usage is None:
        return Usage()
    if isinstance(usage, Usage):
        return usage
    return Usage(
        prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
        completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
        images=int(getattr(usage, "images", 0) or 0),
    )


def make_generator(
    backend: Backend,
    *,
    engine: bool | None,
    max_batch_size: int,
    max_queue: int,
    batch_wait: float,
    on_batch: Callable[[int], None],
) -> Generator:
    """The engine for a local runtime when it is available (``engine=None``) or asked for (``True``); otherwise
    the backend scheduler. A runtime loaded with ``compile=True`` goes through the scheduler: the engine decodes
    with caches of its own, which are not the compiled static ones."""
    compiled = bool(getattr(backend, "compile", False)) and _is_local_runtime(backend)
    use_engine = engine if engine is not None else (_is_local_runtime(backend) and engine_available() and not compiled)
    if use_engine:
        if not _is_local_runtime(backend):
            raise ValueError("engine=True needs the local runtime (belle_vl_tools.BelleVL) as the backend.")
        if compiled:
            raise ValueError(
                "engine=True cannot serve a runtime loaded with compile=True (the engine decodes with its own caches, "
                "not the compiled static ones): pass engine=None, or load the runtime without compile."
            )
        if not engine_available():
            raise ValueError("engine=True needs belle_vl_tools.engine, which this installation lacks.")
        return EngineGenerator(backend, max_batch_size=max_batch_size, max_queue=max_queue, on_batch=on_batch)
    scheduler = BatchScheduler(
        backend, max_batch_size=max_batch_size, max_queue=max_queue, batch_wait=batch_wait, on_batch=on_batch
    )
    return BackendGenerator(backend, scheduler)
