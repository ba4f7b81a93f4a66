"""ChatBelleVL: Belle-VL as a LangChain chat model.

This module only translates: LangChain messages become the core's chat messages, the core's tool-call session
(:class:`belle_vl_tools.react.ToolSession`) renders tools, forces calls and structured output by constrained decoding
and parses replies, and answers come back as ``AIMessage`` / ``AIMessageChunk``.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from operator import itemgetter
from typing import Any, Literal, cast

from belle_vl_tools.backend import ChatResult as CoreResult
from belle_vl_tools.backend import StreamChunk, Usage
from belle_vl_tools.errors import PromptError
from belle_vl_tools.messages import ToolCall, new_call_id
from belle_vl_tools.react import InvalidToolCall, ParsedReply, ToolSession
from belle_vl_tools.tools import ImageStore
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.chat_models import LangSmithParams
from langchain_core.language_models.model_profile import ModelProfile
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import ToolCallChunk
from langchain_core.output_parsers import JsonOutputKeyToolsParser, JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import PydanticToolsParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

__all__ = ["ChatBelleVL", "to_core_messages"]

PROVIDER = "belle_vl"

#: Keys LangChain may put into the call's keyword arguments that are not generation settings.
_NOT_GENERATION = frozenset({"tools", "tool_choice", "parallel_tool_calls", "stream_usage", "model", "response_format"})
_IMAGE_HANDLE = "image_{}"


# ---------------------------------------------------------------------------------------------------------------
# Message translation
# ---------------------------------------------------------------------------------------------------------------


def _image_part(block: dict[str, Any]) -> dict[str, Any]:
    """A core image part from a LangChain v1 image block (base64 + mime type, or URL)."""
    if block.get("base64"):
        mime = block.get("mime_type") or "image/png"
        return {"type": "image", "image": f"data:{mime};base64,{block['base64']}"}
    if block.get("url"):
        return {"type": "image", "image": block["url"]}
    if block.get("file_id") or block.get("id"):
        raise PromptError(
            "An image given by file_id cannot be read by Belle-VL: send it as base64 data or a URL instead."
        )
    raise PromptError(f"The image block {_short(block)} holds no image: give 'base64' (with 'mime_type') or 'url'.")


def _short(value: Any, limit: int = 100) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _content_parts(message: BaseMessage, *, allow_images: bool) -> list[dict[str, Any]]:
    """The text and image parts of a message, read through LangChain's standard content blocks."""
    parts: list[dict[str, Any]] = []
    # read as plain dicts: the union of LangChain's block types does not narrow on .get("type")
    for block in cast(list[dict[str, Any]], message.content_blocks):
        kind = block.get("type")
        if kind == "text":
            if block.get("text"):
                parts.append({"type": "text", "text": block["text"]})
        elif kind == "image":
            if not allow_images:
                raise PromptError(f"A {message.type} message cannot hold images: put pictures in a human message.")
            parts.append(_image_part(dict(block)))
        elif kind in ("tool_call", "tool_call_chunk", "invalid_tool_call", "reasoning", "server_tool_call"):
            continue  # tool calls are read from message.tool_calls; reasoning is not sent back
        elif kind in ("audio", "video", "file", "text-plain"):
            raise PromptError(
                f"Belle-VL reads text and images only; the {message.type} message holds a {kind!r} block. "
                "Remove it or convert it to text or an image."
            )
        elif kind == "non_standard":
            value = block.get("value")
            if isinstance(value, dict) and value.get("type") in ("tool_use", "function_call"):
                continue  # a provider's own tool-call record, also present in message.tool_calls
            parts.append({"type": "text", "text": json.dumps(value, ensure_ascii=False, default=str)})
        else:
            raise PromptError(f"Unsupported content block type {kind!r} in a {message.type} message.")
    return parts


def _text_of(parts: list[dict[str, Any]]) -> str:
    return "\n".join(part["text"] for part in parts if part["type"] == "text")


def _simplify(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """A plain string when the parts are text only."""
    if all(part["type"] == "text" for part in parts):
        return _text_of(parts)
    return parts


def to_core_messages(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """LangChain messages as the core's chat messages (tool calls and tool results kept for the protocol).

    System messages are merged into one leading system message. Images may come in every form LangChain accepts
    (v1 ``image`` blocks, ``source_type`` blocks, OpenAI ``image_url`` blocks); they become image parts of user
    and tool messages.
    """
    system: list[str] = []
    out: list[dict[str, Any]] = []
    for message in messages:
        if isinstance(message, SystemMessage) or (isinstance(message, ChatMessage) and message.role == "system"):
            text = _text_of(_content_parts(message, allow_images=False))
            if text:
                system.append(text)
        elif isinstance(message, HumanMessage) or (isinstance(message, ChatMessage) and message.role == "user"):
            out.append({"role": "user", "content": _simplify(_content_parts(message, allow_images=True))})
        elif isinstance(message, AIMessage) or (isinstance(message, ChatMessage) and message.role == "assistant"):
            entry: dict[str, Any] = {
                "role": "assistant",
                "content": _text_of(_content_parts(message, allow_images=False)),
            }
            calls: list[ToolCall | InvalidToolCall] = []
            if isinstance(message, AIMessage):
                calls += [
                    ToolCall(c["name"], dict(c["args"]), c.get("id") or new_call_id()) for c in message.tool_calls
                ]
                calls += [
                    InvalidToolCall(c.get("name"), c.get("args"), c.get("error") or "", c.get("id") or new_call_id())
                    for c in message.invalid_tool_calls
                ]
            if calls:
                entry["tool_calls"] = calls
            out.append(entry)
        elif isinstance(message, (ToolMessage, FunctionMessage)):
            parts = _content_parts(message, allow_images=True)
            out.append(
                {
                    "role": "tool",
                    "content": _simplify(parts),
                    "tool_call_id": getattr(message, "tool_call_id", ""),
                    "name": message.name or "",
                }
            )
        else:
            raise PromptError(
                f"Unsupported message type {type(message).__name__} (role {getattr(message, 'role', message.type)!r}):"
                " use system, human, AI and tool messages."
            )
    if system:
        out.insert(0, {"role": "system", "content": "\n\n".join(system)})
    return out


def _register_images(messages: Sequence[dict[str, Any]], store: ImageStore) -> None:
    """Give the n-th picture of the conversation the handle ``image_n`` in ``store`` (stable across turns)."""
    count = 0
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            if isinstance(part, dict) and part.get("type") == "image":
                count += 1
                store.add(part["image"], handle=_IMAGE_HANDLE.format(count))


def _usage(usage: Usage | None) -> UsageMetadata | None:
    if usage is None:
        return None
    # langchain-core writes the details keys as typing.NotRequired (Python 3.11), which a 3.10 check reads as required
    return UsageMetadata(  # type: ignore[typeddict-item]
        input_tokens=usage.prompt_tokens,
        output_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )


def _lc_tool_calls(parsed: ParsedReply) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    calls = [{"name": c.name, "args": c.arguments, "id": c.id, "type": "tool_call"} for c in parsed.tool_calls]
    invalid = [
        {"name": c.name, "args": c.arguments, "id": c.id, "error": c.error, "type": "invalid_tool_call"}
        for c in parsed.invalid_tool_calls
    ]
    return calls, invalid


# ---------------------------------------------------------------------------------------------------------------
# The chat model
# ---------------------------------------------------------------------------------------------------------------

_LOADED: dict[tuple[Any, ...], Any] = {}
_LOAD_LOCK = threading.Lock()


def load_backend(model: Any, **options: Any) -> Any:
    """The backend for ``model=`` by the core's one rule (:func:`belle_vl_tools.backend.load_backend`: a loaded
    backend, a checkpoint folder, a Hub id, or None for the demo model). A checkpoint is loaded once and shared by
    every chat model that asks for it with the same options (LangChain copies and rebuilds chat models freely)."""
    from belle_vl_tools.backend import load_backend as core_load_backend

    if model is not None and not isinstance(model, str | os.PathLike):
        return core_load_backend(model, **options)
    key = (None if model is None else os.fspath(model), tuple(sorted((k, repr(v)) for k, v in options.items())))
    with _LOAD_LOCK:
        if key not in _LOADED:
            _LOADED[key] = core_load_backend(model, **options)
        return _LOADED[key]


class ChatBelleVL(BaseChatModel):
    """Belle-VL (or Qwen-VL-Chat) as a LangChain chat model: text and images in, text and tool calls out.

    Build it from a loaded model, ``ChatBelleVL(model=BelleVL.from_pretrained(...))`` (any backend of
    :mod:`belle_vl_tools.backend` works), or from a checkpoint, ``ChatBelleVL(model="/models/BELLE-VL",
    device="cuda")``, loaded on first use. Without ``model`` the shipped demo model is used.

    Tool calling (``bind_tools``, ``with_structured_output``) uses the ReAct text protocol Qwen-14B-Chat was
    trained on; a reply that does not parse becomes an ``invalid_tool_calls`` entry, never an exception.
    """

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True)

    model: str | None = Field(default=None, alias="model_name")
    """Checkpoint folder or Hub id (loaded on first use), or the name of the backend given as ``client``."""
    client: Any = Field(default=None, exclude=True)
    """A loaded backend (``BelleVL`` or another backend); when None it is loaded from ``model``."""
    device: str | None = None
    """Where to load the model ("cpu", "cuda", "cuda:1"); only when loading from ``model``."""
    dtype: str | None = None
    """Weights' dtype when loading ("bfloat16", ...); default: the checkpoint's own flags."""
    load_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Other options of ``BelleVL.from_pretrained`` (``device_map``, ``quantization_config``, ...)."""
    image_policy: Any = Field(default=None, exclude=True)
    """What images in messages may be read, when this model loads the checkpoint itself (a given ``client`` keeps
    its own policy). Default: the Python API's trusted policy (local paths, no URLs)."""
    image_store: Any = Field(default=None, exclude=True)
    """When set, the n-th picture of each conversation is registered as ``image_n`` so tools can name it."""

    temperature: float | None = None
    """Sampling temperature; 0 is greedy. Default: the checkpoint's generation_config.json."""
    max_tokens: int | None = Field(default=None, alias="max_new_tokens")
    """Most tokens to generate."""
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: list[str] | None = Field(default=None, alias="stop_sequences")
    """Strings that end the answer (not included in it)."""
    generation_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Other transformers ``GenerationConfig`` fields."""
    streaming: bool = False
    """Whether ``invoke`` streams internally (callbacks get every token)."""

    _client: Any = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _backend_as_model(cls, values: Any) -> Any:
        """``model=<a loaded backend>`` is read as ``client``."""
        if isinstance(values, dict):
            for key in ("model", "model_name"):
                value = values.get(key)
                if value is not None and not isinstance(value, (str, os.PathLike)):
                    values = dict(values)
                    values["client"] = values.pop(key)
                elif isinstance(value, os.PathLike):
                    values = {**values, key: os.fspath(value)}
        return values

    # --- identity -------------------------------------------------------------------------------------------
    @property
    def _llm_type(self) -> str:
        return "belle-vl"

    @property
    def model_label(self) -> str:
        """The model's name as reported in metadata."""
        if self.client is not None and getattr(self.client, "model_name", None):
            return str(self.client.model_name)
        if self.model:
            return os.path.basename(self.model.rstrip("/\\")) or self.model
        return "belle-vl-demo"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model_label, **self._generation({})}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider=PROVIDER,
            ls_model_name=model if isinstance(model := kwargs.get("model"), str) else self.model_label,
            ls_model_type="chat",
        )
        temperature = kwargs.get("temperature", self.temperature)
        if temperature is not None:
            params["ls_temperature"] = temperature
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        stop = stop or self.stop
        if stop:
            params["ls_stop"] = list(stop)
        return params

    def _resolve_model_profile(self) -> ModelProfile:
        return {
            "text_inputs": True,
            "image_inputs": True,
            "image_url_inputs": True,
            "image_tool_message": True,
            "tool_calling": True,
            "tool_choice": True,
            "structured_output": True,  # constrained decoding: json_schema, json_mode and function_calling
            "max_input_tokens": 8192,
        }

    # --- backend --------------------------------------------------------------------------------------------
    @property
    def backend(self) -> Any:
        """The loaded backend (loads the checkpoint on first use)."""
        if self.client is not None:
            if self._client is None:
                self._client = load_backend(self.client)  # checked and unwrapped by the one rule
            return self._client
        if self._client is None:
            options: dict[str, Any] = dict(self.load_kwargs)
            if self.device is not None:
                options["device"] = self.device
            if self.dtype is not None:
                options["dtype"] = self.dtype
            if self.image_policy is not None:
                options["image_policy"] = self.image_policy
            self._client = load_backend(self.model, **options)
        return self._client

    # --- tools ----------------------------------------------------------------------------------------------
    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool],
        *,
        tool_choice: str | dict[str, Any] | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Offer tools to the model (ReAct protocol). ``tool_choice``: "auto", "none", "any"/"required"/True, a
        tool's name, or ``{"type": "function", "function": {"name": ...}}``; a forced call is generated under a
        grammar, so it always names an allowed tool with arguments valid under its schema."""
        formatted = [convert_to_openai_tool(tool) for tool in tools]
        ToolSession.create(formatted, tool_choice)  # refuse unusable names or choices now, not at the first call
        if tool_choice is not None:
            kwargs["tool_choice"] = tool_choice
        return super().bind(tools=formatted, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type | None = None,
        *,
        method: Literal["function_calling", "json_schema", "json_mode"] = "function_calling",
        include_raw: bool = False,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | BaseModel]:
        """A runnable that returns ``schema``'s type (a pydantic model, TypedDict or JSON schema; a dict for the
        latter two), generated under a grammar so that it always parses.

        ``method``: "function_calling" (a forced ReAct call of a tool named after the schema), "json_schema" (the
        answer is JSON of the schema; the fewest tokens) or "json_mode" (any JSON object; ``schema`` optional, used
        only to parse). ``include_raw=True`` returns ``{"raw", "parsed", "parsing_error"}``.
        """
        kwargs.pop("strict", None)  # True or False: the output always follows the schema (stricter than asked)
        if kwargs:
            raise PromptError(f"Unsupported with_structured_output arguments: {', '.join(sorted(kwargs))}.")
        if schema is None and method != "json_mode":
            raise PromptError(f"with_structured_output(method={method!r}) needs a schema.")
        pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        json_schema = convert_to_json_schema(schema) if schema is not None else None
        structured = {"kwargs": {"method": method}, "schema": json_schema}
        if method == "function_calling":
            assert schema is not None  # refused above
            tool = convert_to_openai_tool(schema)
            name = tool["function"]["name"]
            llm = self.bind_tools([tool], tool_choice="required", ls_structured_output_format=structured)
            parser: Runnable = (
                PydanticToolsParser(tools=[schema], first_tool_only=True)  # type: ignore[list-item]
                if pydantic
                else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True)
            )
        elif method in ("json_schema", "json_mode"):
            response_format = {"type": "json_object"} if method == "json_mode" else json_schema
            llm = self.bind(response_format=response_format, ls_structured_output_format=structured)
            parser = PydanticOutputParser(pydantic_object=schema) if pydantic else JsonOutputParser()  # type: ignore[arg-type]
        else:
            raise PromptError(f"method must be 'function_calling', 'json_schema' or 'json_mode', not {method!r}.")
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        failed = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([failed], exception_key="parsing_error")

    # --- preparing a call -----------------------------------------------------------------------------------
    def _generation(self, kwargs: dict[str, Any], stop: list[str] | None = None) -> dict[str, Any]:
        settings: dict[str, Any] = {
            "temperature": self.temperature,
            "max_new_tokens": self.max_tokens,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "repetition_penalty": self.repetition_penalty,
            "seed": self.seed,
            **self.generation_kwargs,
        }
        for key, value in kwargs.items():
            if key in _NOT_GENERATION or key.startswith("ls_"):
                continue
            settings["max_new_tokens" if key == "max_tokens" else key] = value
        stops = list(stop if stop is not None else (self.stop or []))
        if stops:
            settings["stop"] = stops
        return {key: value for key, value in settings.items() if value is not None}

    def _prepare(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> tuple[list[Any], dict[str, Any], ToolSession]:
        """Core messages and generation settings for the backend, and the tool-call session that reads the reply."""
        requested = kwargs.get("model")
        if isinstance(requested, str) and requested not in (self.model, self.model_label):
            raise PromptError(
                f"This ChatBelleVL serves {self.model_label!r}; it cannot switch to model={requested!r} per call. "
                "Make another ChatBelleVL for another checkpoint."
            )
        core = to_core_messages(messages)
        if self.image_store is not None:
            _register_images(core, self.image_store)
        session = ToolSession.create(kwargs.get("tools"), kwargs.get("tool_choice"), kwargs.get("response_format"))
        request = session.prepare(core, self._generation(kwargs, stop))
        return request.messages, request.generation, session

    def _metadata(self, finish_reason: str, parsed: ParsedReply | None, model: str | None) -> dict[str, Any]:
        reason = "tool_calls" if parsed is not None and parsed.has_calls else finish_reason
        return {"model_name": model or self.model_label, "model_provider": PROVIDER, "finish_reason": reason}

    def _message(self, result: CoreResult, session: ToolSession) -> AIMessage:
        if not session.may_call:
            return AIMessage(
                content=result.text,
                usage_metadata=_usage(result.usage),
                response_metadata=self._metadata(result.finish_reason, None, result.model),
            )
        parsed = session.parse(result.text)
        calls, invalid = _lc_tool_calls(parsed)
        return AIMessage(
            content=parsed.content,
            tool_calls=calls,
            invalid_tool_calls=invalid,
            usage_metadata=_usage(result.usage),
            response_metadata=self._metadata(result.finish_reason, parsed, result.model),
            additional_kwargs={"thought": parsed.thought} if parsed.thought else {},
        )

    # --- LangChain entry points -----------------------------------------------------------------------------
    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.streaming:
            chunks = list(self._stream(messages, stop=stop, run_manager=run_manager, **kwargs))
            return _from_chunks(chunks)
        core, generation, session = self._prepare(messages, stop, kwargs)
        result = self.backend.chat(core, **generation)
        return ChatResult(generations=[ChatGeneration(message=self._message(result, session))])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.streaming:
            chunks = [c async for c in self._astream(messages, stop=stop, run_manager=run_manager, **kwargs)]
            return _from_chunks(chunks)
        core, generation, session = self._prepare(messages, stop, kwargs)
        result = await self.backend.achat(core, **generation)
        return ChatResult(generations=[ChatGeneration(message=self._message(result, session))])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        core, generation, session = self._prepare(messages, stop, kwargs)
        converter = _ChunkConverter(self, session)
        for piece in self.backend.stream(core, **generation):
            for chunk in converter.push(piece):
                if run_manager is not None and chunk.text:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        core, generation, session = self._prepare(messages, stop, kwargs)
        converter = _ChunkConverter(self, session)
        async for piece in self.backend.astream(core, **generation):
            for chunk in converter.push(piece):
                if run_manager is not None and chunk.text:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk


class _ChunkConverter:
    """Turns the backend's stream chunks into LangChain chunks: text as it may be shown, tool calls at the end,
    usage and metadata on the last chunk."""

    def __init__(self, chat: ChatBelleVL, session: ToolSession) -> None:
        self.chat = chat
        self.parser = session.stream_parser() if session.may_call else None

    def push(self, piece: StreamChunk) -> list[ChatGenerationChunk]:
        out: list[ChatGenerationChunk] = []
        text = piece.delta if self.parser is None else self.parser.feed(piece.delta)
        if piece.finish_reason is None:
            if text:
                out.append(ChatGenerationChunk(message=AIMessageChunk(content=text)))
            return out
        parsed = None
        # ToolCallChunk's "type" is typing.NotRequired (Python 3.11), which a 3.10 check reads as required
        chunks: list[ToolCallChunk] = []
        if self.parser is not None:
            rest, parsed = self.parser.finish()
            text += rest
            chunks = [
                {  # type: ignore[typeddict-item]
                    "name": c.name,
                    "args": json.dumps(c.arguments, ensure_ascii=False),
                    "id": c.id,
                    "index": i,
                }
                for i, c in enumerate(parsed.tool_calls)
            ]
            chunks += [
                {"name": c.name, "args": c.arguments or "", "id": c.id, "index": len(chunks) + i}  # type: ignore[typeddict-item]
                for i, c in enumerate(parsed.invalid_tool_calls)
            ]
        last = AIMessageChunk(
            content=text,
            tool_call_chunks=chunks,
            usage_metadata=_usage(piece.usage),
            response_metadata=self.chat._metadata(piece.finish_reason, parsed, None),
            chunk_position="last",
        )
        out.append(ChatGenerationChunk(message=last))
        return out


def _from_chunks(chunks: list[ChatGenerationChunk]) -> ChatResult:
    if not chunks:
        raise PromptError("The model produced no output.")
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    message = cast(AIMessageChunk, merged.message)  # the chunks are AIMessageChunk
    return ChatResult(
        generations=[
            ChatGeneration(
                message=AIMessage(
                    content=message.content,
                    tool_calls=message.tool_calls,
                    invalid_tool_calls=message.invalid_tool_calls,
                    usage_metadata=message.usage_metadata,
                    response_metadata=message.response_metadata,
                )
            )
        ]
    )
