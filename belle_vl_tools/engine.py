"""Iteration-level batching over the model's forward: requests join and leave a running batch between steps.

:class:`BatchEngine` runs one decoding loop in a worker thread. Every step it

1. drops the rows whose consumer went away (task cancelled, stream closed, client disconnected),
2. prefills the requests that arrived since the last step (one left-padded forward) and merges their KV cache
   into the running batch, so a new request waits for at most one step, not for the batch to end,
3. runs one forward for all rows (one new token each; per-row positions and dynamic-NTK factors, left padding
   masked), and
4. picks each row's next token with that row's own settings (penalties, logit bias, row processors such as a
   grammar, then greedy or seeded sampling), hands the row's consumer an :class:`EngineEvent`, and lets
   finished rows leave the batch.

Requests with different settings share one batch; a greedy answer equals the same request answered alone by
:meth:`BelleVL.chat <belle_vl_tools.runtime.BelleVL.chat>` with ``temperature=0``; a seeded request draws from its
own ``torch.Generator``, so its answer does not depend on its batch companions. See ``docs/batching.md`` for why
this is not transformers' own continuous batching.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from queue import SimpleQueue
from typing import Any, Protocol, runtime_checkable

import torch

from .backend import Usage
from .errors import BelleVLError, SamplingError
from .modeling_qwen_vl import CACHE_FIELD, QWenCacheLayer
from .processing_qwen_vl import ChatInputs
from .runtime import AnswerText, BelleVL
from .sampling import SamplingParams


@runtime_checkable
class RowProcessor(Protocol):
    """Changes one row's next-token logits (1-D, vocabulary-sized) given the ids generated so far.

    Returns the new logits (it may modify and return its argument). Set a logit to ``-inf`` to forbid a token:
    grammar-constrained decoding is a row processor.
    """

    def __call__(self, generated_ids: list[int], logits: torch.Tensor) -> torch.Tensor: ...


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class TopLogprob:
    """One candidate token: its text (invalid UTF-8 replaced), its bytes and its log-probability."""

    token: str
    bytes: list[int]
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """The chosen token with its log-probability and the most likely alternatives (``top_logprobs`` of them)."""

    token: str
    bytes: list[int]
    logprob: float
    top_logprobs: list[TopLogprob]


@dataclass
class EngineEvent:
    """What one decoding step produced for one request.

    ``delta`` is new answer text (possibly empty: text that might still become part of a stop string, or half of
    a UTF-8 character, is held back); ``token_ids`` the ids generated in this step, and ``logprobs`` one entry per
    id when requested (the end-of-turn token that closes the answer is counted in ``usage`` but listed in
    neither). The last event has ``finish_reason`` ("stop" or "length") and ``usage``.
    """

    delta: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    usage: Usage | None = None


@dataclass
class EngineResult:
    """A whole answer: text (as :meth:`BelleVL.chat` gives it), finish reason, usage, ids and logprobs."""

    text: str
    finish_reason: str
    usage: Usage
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None

    @classmethod
    def from_events(cls, events: Sequence[EngineEvent]) -> EngineResult:
        """Join a finished stream's events into one result."""
        if not events or events[-1].finish_reason is None:
            raise ValueError("from_events needs the events of a finished stream (the last one has finish_reason).")
        last = events[-1]
        logprobs = None
        if last.logprobs is not None:
            logprobs = [entry for event in events for entry in (event.logprobs or [])]
        assert last.finish_reason is not None  # the last event ends the answer
        return cls(
            text="".join(event.delta for event in events),
            finish_reason=last.finish_reason,
            usage=last.usage or Usage(),
            token_ids=[t for event in events for t in event.token_ids],
            logprobs=logprobs,
        )


class EngineClosedError(BelleVLError, RuntimeError):
    """The engine was closed before the request finished."""


# ---------------------------------------------------------------------------------------------------------------
# Requests and rows
# ---------------------------------------------------------------------------------------------------------------


class _Request:
    """One submitted request: its laid-out prompt, resolved settings and where its events go."""

    def __init__(
        self, item: ChatInputs, params: SamplingParams, settings: dict[str, Any], sink: Callable[[Any], object]
    ) -> None:
        self.item = item
        self.params = params
        self.settings = settings
        self.sink = sink
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()

    def deliver(self, event: Any) -> None:
        try:
            self.sink(event)
        except RuntimeError:  # the consumer's event loop is gone: nobody is listening any more
            self.cancelled.set()


class _Row:
    """A request while it decodes: answer so far, penalty state, its generator and the token to feed next."""

    def __init__(self, request: _Request, runtime: BelleVL, vocab: int, device: torch.device) -> None:
        self.request = request
        s = request.settings
        self.answer = AnswerText(runtime.tokenizer, runtime.stop_ids, request.params.stop)
        self.max_new_tokens: int = s["max_new_tokens"]
        self.greedy = s["temperature"] == 0
        self.generator: torch.Generator | None = None
        if not self.greedy:
            self.generator = torch.Generator(device=device)
            if request.params.seed is not None:
                self.generator.manual_seed(request.params.seed % 2**64)
            else:
                self.generator.seed()
        p = request.params
        self.counts: torch.Tensor | None = None
        if p.presence_penalty or p.frequency_penalty:
            self.counts = torch.zeros(vocab, dtype=torch.float32, device=device)
        self.seen: torch.Tensor | None = None
        if s["repetition_penalty"] != 1.0:
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            ids = torch.tensor(request.item.input_ids, device=device)
            self.seen[ids[ids < vocab]] = True
        self.bias: tuple[torch.Tensor, torch.Tensor] | None = None
        if p.logit_bias:
            keys = torch.tensor(list(p.logit_bias), device=device)
            values = torch.tensor(list(p.logit_bias.values()), dtype=torch.float32, device=device)
            self.bias = (keys, values)
        self.next_token = -1


# ---------------------------------------------------------------------------------------------------------------
# The batch's KV cache
# ---------------------------------------------------------------------------------------------------------------


def _alpha_field(cache: Any) -> str:
    # QWenCache keeps the rows' dynamic-NTK factors in ``ntk_alphas``; a plain DynamicCache carries them as an
    # attribute the model reads back
    return "ntk_alphas" if hasattr(cache, "ntk_alphas") else "qwen_ntk_alphas"


def _get_alphas(cache: Any) -> list[float] | None:
    alphas = getattr(cache, _alpha_field(cache), None)
    return None if alphas is None else [float(a) for a in alphas]


def _set_alphas(cache: Any, alphas: list[float]) -> None:
    setattr(cache, _alpha_field(cache), [float(a) for a in alphas])


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    if width == 0:
        return t
    shape = list(t.shape)
    shape[dim] = width
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _in_place(layer: Any) -> QWenCacheLayer:
    """The layer as one that appends each step's keys and values in place (the running batch's cache)."""
    if isinstance(layer, QWenCacheLayer):
        return layer
    grown = QWenCacheLayer()
    grown.hold(layer.keys, layer.values)
    return grown


class _BatchCache:
    """The running batch's left-padded KV cache with its attention mask and per-row NTK factors."""

    def __init__(self) -> None:
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # [rows, cached length], 1 where a row holds a token

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    def merge(self, cache: Any, mask: torch.Tensor) -> None:
        """Append the rows of another cache (a prefill's) below the current ones."""
        if self.cache is None:
            cache.layers = [_in_place(layer) for layer in cache.layers]
            self.cache, self.mask = cache, mask
            return
        assert self.mask is not None  # a cache has its mask
        old_len, new_len = self.mask.shape[1], mask.shape[1]
        width = max(old_len, new_len)
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.hold(
                torch.cat([_pad_left(mine.keys, width - old_len, -2), _pad_left(theirs.keys, width - new_len, -2)]),
                torch.cat([_pad_left(mine.values, width - old_len, -2), _pad_left(theirs.values, width - new_len, -2)]),
            )
        self.mask = torch.cat([_pad_left(self.mask, width - old_len, 1), _pad_left(mask, width - new_len, 1)])
        mine_alphas, their_alphas = _get_alphas(self.cache), _get_alphas(cache)
        assert mine_alphas is not None and their_alphas is not None  # QWenCache and the prefill's both carry them
        _set_alphas(self.cache, mine_alphas + their_alphas)

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows (in this order) and drop the columns every remaining row has as padding."""
        if not indices:
            self.cache, self.mask = None, None
            return
        alphas = _get_alphas(self.cache)
        assert self.mask is not None and alphas is not None  # rows to keep: a cache, its mask and its factors
        index = torch.tensor(indices, device=self.mask.device)
        self.mask = self.mask[index]
        lead = int((self.mask.cumsum(1) == 0).all(0).sum())  # columns of padding in every row
        self.mask = self.mask[:, lead:]
        for layer in self.cache.layers:
            keys, values = layer.keys[index, :, lead:], layer.values[index, :, lead:]
            if isinstance(layer, QWenCacheLayer):
                layer.hold(keys, values)
            else:  # a plain layer of a prefill's own cache, before it joins the batch
                layer.keys, layer.values = keys, values
        _set_alphas(self.cache, [alphas[i] for i in indices])


# ---------------------------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------------------------


class BatchEngine:
    """Continuous (iteration-level) batching of chat requests over one :class:`BelleVL` runtime.

    ``max_batch_size`` rows decode together; further requests wait in a queue and join as rows leave. Use
    :meth:`stream` / :meth:`complete` from asyncio code, :meth:`stream_sync` / :meth:`complete_sync` from threads.
    The engine starts its worker thread on first use (or :meth:`start`); :meth:`close` stops it.
    """

    def __init__(self, runtime: BelleVL, max_batch_size: int = 16) -> None:
        if not _is_int(max_batch_size) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, not {max_batch_size!r}.")
        self.runtime = runtime
        self.max_batch_size = max_batch_size
        self._pending: deque[_Request] = deque()
        self._rows: list[_Row] = []
        self._batch = _BatchCache()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.stats: dict[str, float] = {
            "steps": 0,
            "prefills": 0,
            "joins": 0,
            "tokens": 0,
            "max_rows": 0,
            "step_seconds": 0.0,
            "prefill_seconds": 0.0,
        }
        lm_head = runtime.model.get_output_embeddings()
        self._vocab = lm_head.weight.shape[0]
        gc = runtime.generation_config
        self._defaults = {
            "max_new_tokens": gc.max_new_tokens or 512,
            "temperature": (gc.temperature if gc.temperature is not None else 1.0) if gc.do_sample else 0.0,
            "top_p": gc.top_p if gc.top_p is not None else 1.0,
            "top_k": gc.top_k or 0,
            "repetition_penalty": gc.repetition_penalty if gc.repetition_penalty is not None else 1.0,
        }

    # --- lifecycle ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the decoding thread (idempotent)."""
        with self._cv:
            if self._closed:
                raise EngineClosedError("This BatchEngine was closed; create a new one.")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="belle-vl-batch-engine", daemon=True)
                self._thread.start()

    def close(self) -> None:
        """Stop the decoding thread; requests still running or waiting get :class:`EngineClosedError`."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> BatchEngine:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def queue_depth(self) -> int:
        """Requests waiting to join the batch."""
        return len(self._pending)

    @property
    def batch_size(self) -> int:
        """Rows decoding now."""
        return len(self._rows)

    # --- submitting -----------------------------------------------------------------------------------------------
    def resolve(self, params: SamplingParams) -> dict[str, Any]:
        """The request's settings with the checkpoint's defaults filled in; checks token ids against the vocabulary."""
        params.validate()
        if params.response_format is not None:
            raise SamplingError(
                "The BatchEngine takes structured output as a row processor: pass "
                "processors=[belle_vl_tools.constrained.RowProcessor(grammar, ...)] instead of response_format.",
                "response_format",
            )
        settings = dict(self._defaults)
        for key in settings:
            value = getattr(params, key)
            if value is not None:
                settings[key] = value
        for token in params.logit_bias:
            if token >= self._vocab:
                raise SamplingError(
                    f"Invalid logit_bias key {token}: this model's token ids go from 0 to {self._vocab - 1}.",
                    "logit_bias",
                )
        return settings

    def prepare(self, messages: Sequence[Any], system: str | None = None) -> ChatInputs:
        """Lay out a conversation (pictures loaded under the runtime's image policy); raises on bad input."""
        return self.runtime.prepare(messages, system)

    def submit(self, item: ChatInputs, params: SamplingParams, sink: Callable[[Any], object]) -> Callable[[], None]:
        """Queue a prepared request; ``sink`` receives its events (then an exception if it fails). Returns a
        function that cancels it."""
        settings = self.resolve(params)
        self.runtime._check_length(len(item.input_ids), settings["max_new_tokens"])
        request = _Request(item, params, settings, sink)
        self.start()
        with self._cv:
            if self._closed:
                raise EngineClosedError("This BatchEngine was closed; create a new one.")
            self._pending.append(request)
            self._cv.notify_all()
        return request.cancel

    async def stream(
        self, messages: Sequence[Any], params: SamplingParams | None = None, *, system: str | None = None
    ) -> AsyncGenerator[EngineEvent, None]:
        """Stream one answer; leaving the loop (or cancelling the task) takes the request out of the batch."""
        params = params if params is not None else SamplingParams()
        item = await asyncio.to_thread(self.prepare, messages, system)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = self.submit(item, params, lambda event: loop.call_soon_threadsafe(queue.put_nowait, event))
        try:
            while True:
                event = await queue.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            cancel()

    async def complete(
        self, messages: Sequence[Any], params: SamplingParams | None = None, *, system: str | None = None
    ) -> EngineResult:
        """The whole answer (the request shares the batch while it decodes)."""
        return EngineResult.from_events([event async for event in self.stream(messages, params, system=system)])

    def stream_sync(
        self, messages: Sequence[Any], params: SamplingParams | None = None, *, system: str | None = None
    ) -> Iterator[EngineEvent]:
        """:meth:`stream` for threads; closing the iterator takes the request out of the batch."""
        params = params if params is not None else SamplingParams()
        item = self.prepare(messages, system)
        queue: SimpleQueue = SimpleQueue()
        cancel = self.submit(item, params, queue.put)
        try:
            while True:
                event = queue.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            cancel()

    def complete_sync(
        self, messages: Sequence[Any], params: SamplingParams | None = None, *, system: str | None = None
    ) -> EngineResult:
        """:meth:`complete` for threads."""
        return EngineResult.from_events(list(self.stream_sync(messages, params, system=system)))

    # --- the decoding loop ----------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._pending and not self._rows:
                    self._cv.wait()
                if self._closed:
                    break
                free = self.max_batch_size - len(self._rows)
                joining = [self._pending.popleft() for _ in range(min(free, len(self._pending)))]
            try:
                self._drop_cancelled()
                joining = [r for r in joining if not r.cancelled.is_set()]
                for group in _prefill_groups(joining):
                    self._prefill(group)
                if self._rows:
                    self._step()
            except Exception as exc:  # a fault in the batch's forward pass: fail its requests, keep serving
                for request in {id(r): r for r in [*joining, *(row.request for row in self._rows)]}.values():
                    request.deliver(exc)
                self._rows = []
                self._batch = _BatchCache()
        error = EngineClosedError("The BatchEngine was closed before this request finished.")
        with self._cv:
            waiting = list(self._pending) + [row.request for row in self._rows]
            self._pending.clear()
            self._rows = []
            self._batch = _BatchCache()
        for request in waiting:
            request.deliver(error)

    def _drop_cancelled(self) -> None:
        keep = [i for i, row in enumerate(self._rows) if not row.request.cancelled.is_set()]
        if len(keep) != len(self._rows):
            self._rows = [self._rows[i] for i in keep]
            self._batch.keep(keep)

    def _prefill(self, requests: list[_Request]) -> None:
        runtime = self.runtime
        device = runtime.device
        items = [r.item for r in requests]
        try:
            batch = runtime.processor.collate([replace(it, images=[]) for it in items], return_tensors="pt")
            kwargs: dict[str, Any] = {
                "input_ids": batch["input_ids"].to(device),
                "attention_mask": batch["attention_mask"].to(device),
                "use_cache": True,
                "logits_to_keep": 1,
            }
            with runtime._lock, torch.inference_mode():
                features = runtime._image_features(items, [0] * len(items))
                if features is not None:
                    kwargs["image_features"] = features.to(device)
                start = time.perf_counter()
                out = runtime.model(**kwargs)
                self.stats["prefill_seconds"] += time.perf_counter() - start
        except Exception as exc:  # this group's fault (e.g. an image the model cannot take): fail it only
            for request in requests:
                request.deliver(exc)
            return
        self.stats["prefills"] += 1
        cache = getattr(out, CACHE_FIELD)
        if _get_alphas(cache) is None:  # dynamic NTK off: every row rotates with factor 1
            _set_alphas(cache, [1.0] * len(requests))
        rows = [_Row(r, runtime, self._vocab, device) for r in requests]
        finished = self._advance(rows, out.logits[:, -1].float())
        keep = [i for i, row in enumerate(rows) if i not in finished]
        if not keep:
            return
        part = _BatchCache()
        part.cache, part.mask = cache, kwargs["attention_mask"].long()
        if len(keep) != len(rows):
            part.keep(keep)
        if self._rows:
            self.stats["joins"] += 1  # joined a batch that is decoding
        self._batch.merge(part.cache, part.mask)
        self._rows.extend(rows[i] for i in keep)
        self.stats["max_rows"] = max(self.stats["max_rows"], len(self._rows))

    def _step(self) -> None:
        runtime = self.runtime
        device = runtime.device
        ids = torch.tensor([[row.next_token] for row in self._rows], device=device)
        batch = self._batch
        assert batch.mask is not None  # a step runs on a batch with rows
        mask = torch.cat([batch.mask, batch.mask.new_ones(batch.rows, 1)], dim=1)
        with runtime._lock, torch.inference_mode():
            start = time.perf_counter()
            out = runtime.model(
                input_ids=ids, attention_mask=mask, past_key_values=batch.cache, use_cache=True, logits_to_keep=1
            )
            self.stats["step_seconds"] += time.perf_counter() - start
        batch.mask = mask
        batch.cache = getattr(out, CACHE_FIELD)
        self.stats["steps"] += 1
        finished = self._advance(self._rows, out.logits[:, -1].float())
        if finished:
            keep = [i for i in range(len(self._rows)) if i not in finished]
            self._rows = [self._rows[i] for i in keep]
            batch.keep(keep)

    def _advance(self, rows: list[_Row], logits: torch.Tensor) -> set[int]:
        """Choose each row's next token, deliver its event; returns the indices of rows that finished."""
        finished: set[int] = set()
        for i, row in enumerate(rows):
            if row.request.cancelled.is_set():
                finished.add(i)
                continue
            try:
                token, entry = self._choose(row, logits[i])
            except Exception as exc:  # a row processor failed: that request fails, the batch goes on
                row.request.deliver(exc)
                finished.add(i)
                continue
            self.stats["tokens"] += 1
            answer = row.answer
            answer.push([token])
            end_token = token in self.runtime.stop_ids
            if row.counts is not None:
                row.counts[token] += 1
            if row.seen is not None:
                row.seen[token] = True
            ids = [] if end_token else [token]
            entries = [entry] if entry is not None and not end_token else []
            done = answer.finished or len(answer.ids) >= row.max_new_tokens
            params = row.request.params
            if done:
                item = row.request.item
                usage = Usage(
                    prompt_tokens=len(item.input_ids), completion_tokens=len(answer.ids), images=item.num_images
                )
                event = EngineEvent(
                    answer.rest(), ids, entries if params.logprobs else None, answer.finish_reason(), usage
                )
                finished.add(i)
            else:
                event = EngineEvent(answer.safe_delta(), ids, entries if params.logprobs else None)
                row.next_token = token
            row.request.deliver(event)
        return finished

    def _choose(self, row: _Row, raw: torch.Tensor) -> tuple[int, TokenLogprob | None]:
        """The row's next token from its raw logits, and its logprob entry when asked for."""
        params, settings = row.request.params, row.request.settings
        logits = raw.clone()
        if row.seen is not None:
            penalty = settings["repetition_penalty"]
            picked = logits[row.seen]
            logits[row.seen] = torch.where(picked < 0, picked * penalty, picked / penalty)
        if row.counts is not None:
            logits -= row.counts * params.frequency_penalty + (row.counts > 0).float() * params.presence_penalty
        if row.bias is not None:
            logits.index_add_(0, row.bias[0], row.bias[1])
        for processor in params.processors:
            logits = processor(list(row.answer.ids), logits)
        if row.greedy:
            token = int(torch.argmax(logits))
        else:
            token = _sample(logits, settings["temperature"], settings["top_k"], settings["top_p"], row.generator)
        entry = None
        if params.logprobs:
            logprobs = torch.log_softmax(raw, dim=-1)
            top = []
            if params.top_logprobs:
                values, indices = torch.topk(logprobs, params.top_logprobs)
                top = [self._top(int(t), float(v)) for t, v in zip(indices.tolist(), values.tolist(), strict=True)]
            chosen = self._top(token, float(logprobs[token]))
            entry = TokenLogprob(chosen.token, chosen.bytes, chosen.logprob, top)
        return token, entry

    def _top(self, token: int, logprob: float) -> TopLogprob:
        text, raw = token_text(self.runtime.tokenizer, token)
        return TopLogprob(text, list(raw), logprob)


def _prefill_groups(requests: list[_Request], waste: float = 0.25) -> list[list[_Request]]:
    """Requests grouped by prompt length for prefilling: a group's left padding stays within ``waste`` of its
    tokens (similar prompts share one forward; a long prompt does not pad many short ones)."""
    groups: list[list[_Request]] = []
    tokens = 0
    for request in sorted(requests, key=lambda r: len(r.item.input_ids)):
        n = len(request.item.input_ids)  # the longest so far: the group's width if it joins
        if groups and n * (len(groups[-1]) + 1) <= (1 + waste) * (tokens + n):
            groups[-1].append(request)
            tokens += n
        else:
            groups.append([request])
            tokens = n
    return groups


def _sample(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None
) -> int:
    """Sample from ``logits`` / temperature restricted to the top-k, then the top-p nucleus (transformers' order)."""
    scores = logits / temperature
    if top_k and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        remove = cumulative <= 1 - top_p
        remove[-1] = False  # keep at least the most likely token
        scores = scores.masked_fill(remove.scatter(0, order, remove), -math.inf)
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def token_text(tokenizer: Any, token: int) -> tuple[str, bytes]:
    """Text (invalid UTF-8 replaced) and bytes of one token id, as OpenAI's logprob entries give them."""
    piece = tokenizer._piece(int(token), False)
    if piece is None:
        return "", b""
    if isinstance(piece, bytes):
        return piece.decode("utf-8", errors="replace"), piece
    return piece, piece.encode("utf-8")


__all__ = [
    "BatchEngine",
    "EngineClosedError",
    "EngineEvent",
    "EngineResult",
    "RowProcessor",
    "SamplingParams",
    "TokenLogprob",
    "TopLogprob",
    "token_text",
]
