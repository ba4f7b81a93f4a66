"""The HTTP routes: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``, ``/health``, ``/metrics``.

The routes sit at module level on :data:`router`; each looks up its serving object (:class:`OpenAIServingChat`,
:class:`OpenAIServingCompletion`, :class:`OpenAIServingModels`, put on ``app.state`` by :func:`init_app_state`) and
calls the method that holds the route's body, so one router serves any number of apps.

Every answer and stream chunk is an object of the ``openai`` package (``ChatCompletion``, ``ChatCompletionChunk``,
``Completion``, ``Model``) dumped to JSON; streams go out as server-sent events through sse-starlette.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from openai.types import Completion, CompletionChoice, CompletionUsage, Model
from openai.types.chat import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionMessageFunctionToolCall,
    ChatCompletionMessageToolCallUnion,
    ChatCompletionTokenLogprob,
)
from openai.types.chat import chat_completion as cc
from openai.types.chat import chat_completion_chunk as chunk_types
from openai.types.chat.chat_completion_token_logprob import TopLogprob
from openai.types.completion_choice import Logprobs as CompletionLogprobs
from sse_starlette.sse import EventSourceResponse

from ..backend import Usage
from ..images import ImagePolicy
from ..messages import ImagePart, MessageInput
from ..sampling import SamplingParams
from .errors import APIError, QueueFullError, api_error
from .generation import Delta, Generator, Output, TokenLogprob, check_features
from .media import MediaPool, PixelTicket
from .metrics import Metrics
from .protocol import (
    ChatRequest,
    TextRequest,
    parse_chat_request,
    parse_completion_request,
    parse_json,
)
from .structured import ChoiceContent, plan

__all__ = [
    "OpenAIServing",
    "OpenAIServingChat",
    "OpenAIServingCompletion",
    "OpenAIServingModels",
    "ServerConfig",
    "ServerState",
    "init_app_state",
    "router",
]


@dataclasses.dataclass
class ServerConfig:
    """Settings of one app (see :func:`~belle_vl_tools.server.create_app`)."""

    model_name: str
    aliases: frozenset[str]
    api_key: str | None
    image_policy: ImagePolicy
    max_request_bytes: int
    max_images_per_request: int
    max_tokens_limit: int
    default_max_tokens: int | None
    vocab_size: int | None = None


@dataclasses.dataclass
class ServerState:
    """What the routes share."""

    config: ServerConfig
    generator: Generator
    media: MediaPool
    metrics: Metrics
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes (before reading it all when it says its length)."""
    declared = request.headers.get("content-length")
    too_big = APIError(
        413,
        f"The request body is larger than this server's limit of {limit:,} bytes: send smaller or fewer images.",
        code="request_too_large",
    )
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------------------------------------------------------
# Building openai objects
# ---------------------------------------------------------------------------------------------------------------


def _usage(prompt: int, completion: int) -> CompletionUsage:
    return CompletionUsage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _sum_usage(outputs: Sequence[Output]) -> CompletionUsage:
    prompt = sum({i: o.usage.prompt_tokens for i, o in enumerate(outputs)}.values()) if outputs else 0
    return _usage(prompt, sum(o.usage.completion_tokens for o in outputs))


def _chat_logprobs(entries: Sequence[TokenLogprob] | None, top: int) -> cc.ChoiceLogprobs | None:
    if entries is None:
        return None
    return cc.ChoiceLogprobs(
        content=[
            ChatCompletionTokenLogprob(
                token=e.token,
                bytes=e.bytes,
                logprob=e.logprob,
                top_logprobs=[TopLogprob(token=t, bytes=b, logprob=lp) for t, b, lp in e.top[:top]],
            )
            for e in entries
        ],
        refusal=None,
    )


def _tool_calls(answer: ChoiceContent) -> list[ChatCompletionMessageToolCallUnion] | None:
    if not answer.tool_calls:
        return None
    return [ChatCompletionMessageFunctionToolCall.model_validate(call) for call in answer.tool_calls]


def _dump(obj: Any) -> str:
    return json.dumps(obj.model_dump(mode="json", exclude_unset=True), ensure_ascii=False)


class _ChunkMaker:
    """The ``ChatCompletionChunk`` objects of one streamed completion."""

    def __init__(self, request_id: str, model: str, include_usage: bool) -> None:
        self.request_id = request_id
        self.model = model
        self.include_usage = include_usage
        self.created = int(time.time())

    def chunk(self, choices: list[chunk_types.Choice], usage: CompletionUsage | None = None) -> dict[str, str]:
        fields: dict[str, Any] = {
            "id": self.request_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            fields["usage"] = usage
        return {"data": _dump(ChatCompletionChunk(**fields))}

    def delta(
        self,
        index: int,
        *,
        role: bool = False,
        content: str | None = None,
        tool_calls: list[dict[str, Any]] | None = None,
        logprobs: cc.ChoiceLogprobs | None = None,
        finish_reason: str | None = None,
    ) -> dict[str, str]:
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if content is not None:
            delta["content"] = content
        if tool_calls:
            delta["tool_calls"] = [
                chunk_types.ChoiceDeltaToolCall(
                    index=i,
                    id=call["id"],
                    type="function",
                    function=chunk_types.ChoiceDeltaToolCallFunction(**call["function"]),
                )
                for i, call in enumerate(tool_calls)
            ]
        choice: dict[str, Any] = {
            "index": index,
            "delta": chunk_types.ChoiceDelta(**delta),
            "finish_reason": finish_reason,
        }
        if logprobs is not None:
            choice["logprobs"] = chunk_types.ChoiceLogprobs(content=logprobs.content, refusal=None)
        else:
            choice["logprobs"] = None
        return self.chunk([chunk_types.Choice(**choice)])


DONE = {"data": "[DONE]"}


def _error_event(error: APIError) -> dict[str, str]:
    return {"data": json.dumps(error.body(), ensure_ascii=False)}


# ---------------------------------------------------------------------------------------------------------------
# Merging the streams of n choices
# ---------------------------------------------------------------------------------------------------------------


async def _merged(streams: Sequence[AsyncIterator[Delta]]) -> AsyncGenerator[tuple[int, Delta], None]:
    """(choice index, delta) pairs from several streams as they come; an error in one ends all."""
    if len(streams) == 1:
        async for delta in streams[0]:
            yield 0, delta
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[Delta]) -> None:
        try:
            async for delta in stream:
                await queue.put((index, delta, None))
        except Exception as exc:
            await queue.put((index, None, exc))
        finally:
            await queue.put((index, None, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    open_streams = len(streams)
    try:
        while open_streams:
            index, delta, error = await queue.get()
            if error is not None:
                raise error
            if delta is None:
                open_streams -= 1
                continue
            yield index, delta
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        for stream in streams:
            close = getattr(stream, "aclose", None)
            if close is not None:
                with contextlib.suppress(BaseException):
                    await close()


async def _first_then_rest(events: AsyncIterator[Any]) -> tuple[Any, AsyncIterator[Any]]:
    """The first item (so that an error before it is an ordinary error response) and an iterator over all."""
    iterator = aiter(events)
    first = await anext(iterator)

    async def rest() -> AsyncIterator[Any]:
        yield first
        async for item in iterator:
            yield item

    return first, rest()


# ---------------------------------------------------------------------------------------------------------------
# Serving classes: the bodies of the routes, over the state one app shares
# ---------------------------------------------------------------------------------------------------------------


class OpenAIServing:
    """What every serving class holds: the app's :class:`ServerState` and the helpers its routes share."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.config = state.config
        self.generator = state.generator
        self.metrics = state.metrics
        self.media = state.media

    def model_card(self) -> Model:
        """The one model this server serves, as an ``openai`` :class:`Model`."""
        return Model(id=self.config.model_name, object="model", created=self.state.created, owned_by="belle-vl-tools")

    def count_tokens(self, outputs: Sequence[Output]) -> None:
        """Add the answers' tokens to the Prometheus counters."""
        usage = _sum_usage(outputs)
        self.metrics.prompt_tokens.inc(usage.prompt_tokens)
        self.metrics.completion_tokens.inc(usage.completion_tokens)

    async def read_json(self, request: Request) -> Any:
        """The request's body as JSON, within the size limit."""
        return parse_json(await read_body(request, self.config.max_request_bytes))

    async def complete_jobs(
        self, request: Request, jobs: Sequence[tuple[Sequence[MessageInput], SamplingParams]]
    ) -> list[Output]:
        """Whole answers of ``(messages, settings)`` jobs, generated together; all are cancelled if one fails or
        the client goes away."""
        tasks = [
            asyncio.ensure_future(self.generator.complete(messages, sampling, request.is_disconnected))
            for messages, sampling in jobs
        ]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()

    async def first_events(self, streams: Sequence[AsyncIterator[Delta]], arrived: float) -> AsyncIterator[Any]:
        """The merged streams, once their first delta has come (an error before it is an ordinary error response);
        the time to it goes to the first-token histogram."""
        merged = _merged(streams)
        try:
            _, events = await _first_then_rest(merged)
        except StopAsyncIteration:
            events = _merged([])
        except Exception as exc:
            await merged.aclose()
            raise api_error(exc) from None
        self.metrics.first_token.observe(time.monotonic() - arrived)
        return events


class OpenAIServingModels(OpenAIServing):
    """``/v1/models``, ``/health`` and ``/metrics``: what the server serves and how it is doing."""

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "model": self.config.model_name,
            "waiting": self.generator.waiting,
            "running": self.generator.running,
            "media": self.media.stats(),
        }

    def prometheus(self) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def list_models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_card().model_dump(mode="json")]}

    def show_model(self, model_id: str) -> dict[str, Any]:
        if model_id not in self.config.aliases:
            raise APIError(404, f"The model {model_id!r} does not exist on this server.", code="model_not_found")
        return self.model_card().model_dump(mode="json")


class OpenAIServingChat(OpenAIServing):
    """``POST /v1/chat/completions``."""

    async def create_chat_completion(self, request: Request) -> Response:
        """The answer to one chat request; its pictures' pixels are held until the answer has been sent."""
        ticket = self.media.ticket()
        try:
            response = await self._answer(request, ticket)
        except BaseException:
            ticket.release()
            raise
        return _released_after(response, ticket.release)

    async def _load_pictures(self, request: Request, chat: ChatRequest, ticket: PixelTicket) -> None:
        """Every picture of the request, held against the pixel budgets on ``ticket`` before any is decoded."""
        client = request.client.host if request.client else "unknown"
        limit = getattr(self.generator, "max_queue", None)
        if limit is not None and self.generator.waiting >= limit:  # a full queue refuses before decoding anything
            raise QueueFullError(limit)
        sources = [(url, f"messages[{index}].content") for index, _, url in chat.image_sources]
        try:
            pictures = await self.media.load_all(sources, self.config.image_policy, client, ticket)
        except APIError:
            raise
        except Exception as exc:
            raise api_error(exc, "messages") from None
        for (index, part_index, _), picture in zip(chat.image_sources, pictures, strict=True):
            chat.messages[index]["content"][part_index] = ImagePart(picture)

    async def _answer(self, request: Request, ticket: PixelTicket) -> Response:
        arrived = time.monotonic()
        config = self.config
        chat = parse_chat_request(
            await self.read_json(request),
            model_name=config.model_name,
            aliases=config.aliases,
            max_tokens_limit=config.max_tokens_limit,
            default_max_tokens=config.default_max_tokens,
            max_images=config.max_images_per_request,
            vocab_size=config.vocab_size,
        )
        if chat.image_sources:
            await self._load_pictures(request, chat, ticket)
        try:
            planned = plan(chat)
        except Exception as exc:
            raise api_error(exc, "messages") from None
        check_features(self.generator, planned.sampling)
        samplings = [planned.sampling.for_choice(i) for i in range(chat.n)]
        request_id = f"chatcmpl-{uuid.uuid4().hex}"

        if chat.stream and not planned.whole_answer_first:
            return await self._stream(chat, planned.messages, samplings, request_id, arrived)

        try:
            outputs = await self.complete_jobs(request, [(planned.messages, sampling) for sampling in samplings])
        except asyncio.CancelledError:
            return Response(status_code=499)
        except Exception as exc:
            raise api_error(exc) from None
        self.count_tokens(outputs)
        answers = [planned.parse(o.text, o.finish_reason) for o in outputs]
        if not chat.stream:
            return JSONResponse(self._completion(chat, request_id, answers, outputs))
        return EventSourceResponse(
            self._replay(chat, request_id, answers, outputs), headers={"Cache-Control": "no-cache"}
        )

    def _completion(
        self, chat: ChatRequest, request_id: str, answers: Sequence[ChoiceContent], outputs: Sequence[Output]
    ) -> dict[str, Any]:
        """The ``ChatCompletion`` of whole answers, as JSON."""
        top = chat.sampling.top_logprobs
        completion = ChatCompletion(
            id=request_id,
            object="chat.completion",
            created=int(time.time()),
            model=self.config.model_name,
            choices=[
                cc.Choice(
                    index=i,
                    message=ChatCompletionMessage(
                        role="assistant", content=answer.content, tool_calls=_tool_calls(answer)
                    ),
                    logprobs=_chat_logprobs(output.logprobs, top),
                    finish_reason=answer.finish_reason,  # type: ignore[arg-type]
                )
                for i, (answer, output) in enumerate(zip(answers, outputs, strict=True))
            ],
            usage=_sum_usage(outputs),
            system_fingerprint=None,
        )
        return completion.model_dump(mode="json", exclude_unset=True)

    async def _replay(
        self, chat: ChatRequest, request_id: str, answers: Sequence[ChoiceContent], outputs: Sequence[Output]
    ) -> AsyncIterator[dict[str, str]]:
        """Whole answers (parsed for tool calls or JSON) sent as a stream of a few chunks each."""
        maker = _ChunkMaker(request_id, self.config.model_name, chat.include_usage)
        top = chat.sampling.top_logprobs
        for i, (answer, output) in enumerate(zip(answers, outputs, strict=True)):
            yield maker.delta(i, role=True, content="")
            if answer.content:
                yield maker.delta(i, content=answer.content, logprobs=_chat_logprobs(output.logprobs, top))
            if answer.tool_calls:
                yield maker.delta(i, tool_calls=answer.tool_calls)
            yield maker.delta(i, finish_reason=answer.finish_reason)
        if chat.include_usage:
            yield maker.chunk([], _sum_usage(outputs))
        yield DONE

    async def _stream(
        self,
        chat: ChatRequest,
        messages: Sequence[MessageInput],
        samplings: list[SamplingParams],
        request_id: str,
        arrived: float,
    ) -> Response:
        events = await self.first_events([self.generator.stream(messages, sampling) for sampling in samplings], arrived)
        return EventSourceResponse(
            self._relay(chat, events, len(samplings), request_id), headers={"Cache-Control": "no-cache"}
        )

    async def _relay(
        self, chat: ChatRequest, events: AsyncIterator[Any], choices: int, request_id: str
    ) -> AsyncIterator[dict[str, str]]:
        """The chunks of ``choices`` streamed answers as their deltas come; an error ends the stream with an error
        event."""
        maker = _ChunkMaker(request_id, self.config.model_name, chat.include_usage)
        top = chat.sampling.top_logprobs
        usage: dict[int, Usage] = {}
        try:
            for i in range(choices):
                yield maker.delta(i, role=True, content="")
            async for index, delta in events:
                logprobs = _chat_logprobs(delta.logprobs, top) if delta.logprobs else None
                if delta.text or logprobs is not None:
                    yield maker.delta(index, content=delta.text, logprobs=logprobs)
                if delta.finish_reason is not None:
                    usage[index] = delta.usage or Usage()
                    yield maker.delta(index, finish_reason=delta.finish_reason)
        except Exception as exc:
            yield _error_event(api_error(exc))
            yield DONE
            return
        finally:
            with contextlib.suppress(BaseException):
                await events.aclose()  # type: ignore[attr-defined]
        outputs = [Output("", "stop", u) for u in usage.values()]
        self.count_tokens(outputs)
        if chat.include_usage:
            yield maker.chunk([], _sum_usage(outputs))
        yield DONE


class OpenAIServingCompletion(OpenAIServing):
    """``POST /v1/completions``: each prompt asked as one user turn."""

    async def create_completion(self, request: Request) -> Response:
        arrived = time.monotonic()
        config = self.config
        text_request = parse_completion_request(
            await self.read_json(request),
            model_name=config.model_name,
            aliases=config.aliases,
            max_tokens_limit=config.max_tokens_limit,
            vocab_size=config.vocab_size,
        )
        check_features(self.generator, text_request.sampling)
        jobs = [
            ([{"role": "user", "content": prompt}], text_request.sampling.for_choice(j))
            for prompt in text_request.prompts
            for j in range(text_request.n)
        ]
        request_id = f"cmpl-{uuid.uuid4().hex}"
        if text_request.stream:
            events = await self.first_events(
                [self.generator.stream(messages, sampling) for messages, sampling in jobs], arrived
            )
            return EventSourceResponse(
                self._relay(text_request, events, request_id), headers={"Cache-Control": "no-cache"}
            )
        try:
            outputs = await self.complete_jobs(request, jobs)
        except asyncio.CancelledError:
            return Response(status_code=499)
        except Exception as exc:
            raise api_error(exc) from None
        self.count_tokens(outputs)
        completion = Completion(
            id=request_id,
            object="text_completion",
            created=int(time.time()),
            model=config.model_name,
            choices=[
                CompletionChoice(
                    index=i,
                    text=output.text,
                    logprobs=_text_logprobs(output.logprobs, text_request.logprobs),
                    finish_reason=output.finish_reason,  # type: ignore[arg-type]
                )
                for i, output in enumerate(outputs)
            ],
            usage=_usage(
                sum(o.usage.prompt_tokens for o in outputs[:: text_request.n]),
                sum(o.usage.completion_tokens for o in outputs),
            ),
        )
        return JSONResponse(completion.model_dump(mode="json", exclude_unset=True))

    async def _relay(
        self, text_request: TextRequest, events: AsyncIterator[Any], request_id: str
    ) -> AsyncIterator[dict[str, str]]:
        """The ``Completion`` chunks of streamed answers as their deltas come."""
        created = int(time.time())

        def chunk(choices: list[CompletionChoice], usage: CompletionUsage | None = None) -> dict[str, str]:
            fields: dict[str, Any] = {
                "id": request_id,
                "object": "text_completion",
                "created": created,
                "model": self.config.model_name,
                "choices": choices,
            }
            if text_request.include_usage:
                fields["usage"] = usage
            return {"data": _dump(Completion(**fields))}

        usage: dict[int, Usage] = {}
        try:
            async for index, delta in events:
                if delta.text or delta.finish_reason is not None or delta.logprobs:
                    yield chunk(
                        [
                            CompletionChoice.model_construct(  # finish_reason is null until the last chunk
                                index=index,
                                text=delta.text,
                                logprobs=_text_logprobs(delta.logprobs, text_request.logprobs)
                                if delta.logprobs
                                else None,
                                finish_reason=delta.finish_reason,
                            )
                        ]
                    )
                if delta.finish_reason is not None:
                    usage[index] = delta.usage or Usage()
        except Exception as exc:
            yield _error_event(api_error(exc))
            yield DONE
            return
        finally:
            with contextlib.suppress(BaseException):
                await events.aclose()  # type: ignore[attr-defined]
        outputs = [Output("", "stop", u) for u in usage.values()]
        self.count_tokens(outputs)
        if text_request.include_usage:
            prompt = sum(u.prompt_tokens for i, u in usage.items() if i % text_request.n == 0)
            yield chunk([], _usage(prompt, sum(u.completion_tokens for u in usage.values())))
        yield DONE


def init_app_state(app_state: Any, state: ServerState) -> None:
    """Put the serving objects over ``state`` on an app's ``app.state``, where the routes of :data:`router` find
    them."""
    app_state.server_state = state
    app_state.openai_serving_models = OpenAIServingModels(state)
    app_state.openai_serving_chat = OpenAIServingChat(state)
    app_state.openai_serving_completion = OpenAIServingCompletion(state)


# ---------------------------------------------------------------------------------------------------------------
# Routes: each finds its serving object on the app that received the request
# ---------------------------------------------------------------------------------------------------------------

#: The routes of every app; :func:`init_app_state` gives an app the objects they call.
router = APIRouter()


def models(request: Request) -> OpenAIServingModels:
    return request.app.state.openai_serving_models


def chat(request: Request) -> OpenAIServingChat:
    return request.app.state.openai_serving_chat


def completion(request: Request) -> OpenAIServingCompletion:
    return request.app.state.openai_serving_completion


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    return models(request).health()


@router.get("/metrics")
async def prometheus(request: Request) -> Response:
    return models(request).prometheus()


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    return models(request).list_models()


@router.get("/v1/models/{model_id:path}")
async def show_model(request: Request, model_id: str) -> dict[str, Any]:
    return models(request).show_model(model_id)


@router.post("/v1/chat/completions")
async def create_chat_completion(request: Request) -> Response:
    return await chat(request).create_chat_completion(request)


@router.post("/v1/completions")
async def create_completion(request: Request) -> Response:
    return await completion(request).create_completion(request)


class _ReleasingStream(EventSourceResponse):
    """A stream that calls ``on_close`` once it has ended, however it ends (finished, failed, client gone)."""

    def __init__(self, *args: Any, on_close: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _released_after(response: Response, release: Any) -> Response:
    """``response``, with ``release`` called when it is done: now for a whole answer, at the end for a stream."""
    if isinstance(response, EventSourceResponse):
        stream = _ReleasingStream(response.body_iterator, headers={"Cache-Control": "no-cache"}, on_close=release)
        return stream
    release()
    return response


def _text_logprobs(entries: Sequence[TokenLogprob] | None, top: int | None) -> CompletionLogprobs | None:
    if entries is None or top is None:
        return None
    offsets, position = [], 0
    for entry in entries:
        offsets.append(position)
        position += len(entry.token)
    return CompletionLogprobs(
        tokens=[e.token for e in entries],
        token_logprobs=[e.logprob for e in entries],
        top_logprobs=[{t: lp for t, _, lp in e.top[:top]} for e in entries],
        text_offset=offsets,
    )
