"""Belle-VL as a LlamaIndex LLM: chat about pictures, streaming, async, and tool calling for agents.

Messages are translated to the core's chat format (text and image parts); images in ``ImageBlock``s are loaded
here under an :class:`~belle_vl_tools.images.ImagePolicy`, so a path or URL in a message is read only where the
policy allows. Tool calling and structured output go through the core's tool-call session
(:class:`belle_vl_tools.react.ToolSession`): tools are described in the prompt, forced calls and ``structured_predict``
are generated under a grammar (constrained decoding), the reply is parsed into ``ToolCallBlock``s, and tool results
are folded back into the conversation as observations. This module only translates.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from io import IOBase
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from belle_vl_tools.backend import Backend, ChatResult, Usage
from belle_vl_tools.errors import InvalidImageDataError, PromptError, ToolCallParseError
from belle_vl_tools.images import ImagePolicy, load_image
from belle_vl_tools.messages import ToolCall
from belle_vl_tools.react import ParsedReply, ToolSession, ToolSpec
from llama_index.core.base.llms.types import (
    CachePoint,
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    ImageBlock,
    LLMMetadata,
    MessageRole,
    TextBlock,
    ThinkingBlock,
    ToolCallBlock,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection
from llama_index.core.types import PydanticProgramMode
from pydantic import BaseModel

if TYPE_CHECKING:  # pragma: no cover
    from llama_index.core.prompts import BasePromptTemplate
    from llama_index.core.tools.types import BaseTool
    from PIL import Image

Model = TypeVar("Model", bound=BaseModel)

__all__ = ["BelleVL", "image_from_block", "to_core_messages"]

#: Context window used only when the backend does not tell its own (the published checkpoints' max_window_size).
FALLBACK_CONTEXT_WINDOW = 6144

_ROLES: dict[MessageRole, str] = {
    MessageRole.SYSTEM: "system",
    MessageRole.DEVELOPER: "system",
    MessageRole.USER: "user",
    MessageRole.ASSISTANT: "assistant",
    MessageRole.MODEL: "assistant",
    MessageRole.CHATBOT: "assistant",
    MessageRole.TOOL: "tool",
    MessageRole.FUNCTION: "tool",
}


# ---------------------------------------------------------------------------------------------------------------
# Translating messages
# ---------------------------------------------------------------------------------------------------------------


def image_from_block(block: ImageBlock, policy: ImagePolicy) -> Image.Image:
    """The picture an ``ImageBlock`` holds (inline bytes or base64, a path, or a URL), loaded under ``policy``."""
    if block.image is not None:
        data: Any = block.image
        if isinstance(data, IOBase):
            data.seek(0)
            data = data.read()
        if isinstance(data, str):
            data = data.encode("ascii", errors="replace")
        return load_image(_unbase64(bytes(data)), policy)
    if block.path is not None:
        return load_image(Path(block.path), policy)
    if block.url is not None:
        return load_image(str(block.url), policy)
    raise InvalidImageDataError("An ImageBlock holds no picture: give it image=<bytes or base64>, path= or url=.")


def _unbase64(data: bytes) -> bytes:
    # ImageBlock stores inline images as base64; a block built from a stream may hold the raw file instead.
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return data


def _tool_arguments(value: dict[str, Any] | str) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    try:
        parsed = json.loads(value) if value.strip() else {}
    except json.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def to_core_messages(messages: Sequence[ChatMessage], policy: ImagePolicy) -> list[dict[str, Any]]:
    """LlamaIndex messages as core messages: text and image parts, assistant ``tool_calls`` and ``tool`` turns.

    System messages at the start are merged into one; a system message later in the conversation (agents add
    some, e.g. when they stop early) becomes a user turn, since the chat layout has one system prompt only.
    """
    out: list[dict[str, Any]] = []
    tool_names: dict[str, str] = {}
    for index, message in enumerate(messages):
        role = _ROLES.get(MessageRole(message.role))
        if role is None:  # pragma: no cover - every MessageRole is mapped
            raise PromptError(f"Message {index} has role {message.role!r}, which Belle-VL cannot take.")
        parts: list[dict[str, Any]] = []
        calls: list[ToolCall] = []
        for block in message.blocks:
            if isinstance(block, TextBlock):
                parts.append({"type": "text", "text": block.text})
            elif isinstance(block, ImageBlock):
                parts.append({"type": "image", "image": image_from_block(block, policy)})
            elif isinstance(block, ToolCallBlock):
                call_id = block.tool_call_id or f"call_{uuid.uuid4().hex[:24]}"
                calls.append(ToolCall(block.tool_name, _tool_arguments(block.tool_kwargs), call_id))
                tool_names[call_id] = block.tool_name
            elif isinstance(block, (ThinkingBlock, CachePoint)):
                continue
            else:
                raise PromptError(
                    f"Message {index} holds a {block.block_type!r} block: Belle-VL reads text and images only. "
                    "Turn it into text (or an ImageBlock) first."
                )
        if role == "system" and out and out[-1]["role"] != "system":
            role = "user"
        if role == "system" and any(p["type"] == "image" for p in parts):
            raise PromptError(f"Message {index} is a system message with an image: put pictures in a user message.")
        core: dict[str, Any] = {"role": role, "content": _content(parts)}
        if calls:
            core["tool_calls"] = calls
            thought = message.additional_kwargs.get("thought")
            if not core["content"] and isinstance(thought, str):
                core["content"] = thought  # the protocol writes it as the call's Thought
        if role == "tool":
            answered = message.additional_kwargs.get("tool_call_id")
            core["tool_call_id"] = answered
            core["name"] = message.additional_kwargs.get("name") or tool_names.get(str(answered), "")
        if role == "system" and out and out[-1]["role"] == "system":
            previous = out[-1]["content"]
            out[-1]["content"] = "\n".join(t for t in (previous, core["content"]) if t)
            continue
        out.append(core)
    return out


def _content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    if all(part["type"] == "text" for part in parts):
        return "\n".join(part["text"] for part in parts)
    return parts


def _tool_spec(tool: Any) -> ToolSpec:
    if isinstance(tool, ToolSpec):
        return tool
    if isinstance(tool, dict):
        return ToolSpec.from_openai(tool)
    metadata = getattr(tool, "metadata", None)
    if metadata is None:
        raise TypeError(f"Cannot describe {type(tool).__name__} as a tool: pass LlamaIndex tools or OpenAI tool dicts.")
    return ToolSpec(
        name=metadata.get_name(), description=metadata.description, parameters=metadata.get_parameters_dict()
    )


@dataclass
class _Request:
    messages: list[Any]
    generation: dict[str, Any]
    session: ToolSession


def _usage(usage: Usage | None) -> dict[str, int]:
    return usage.as_dict() if usage is not None else {}


def _raw(text: str, finish_reason: str | None, usage: Usage | None, model: str) -> dict[str, Any]:
    return {"text": text, "finish_reason": finish_reason, "usage": _usage(usage), "model": model}


# ---------------------------------------------------------------------------------------------------------------
# The LLM
# ---------------------------------------------------------------------------------------------------------------


class BelleVL(FunctionCallingLLM):
    """Belle-VL (or Qwen-VL-Chat) as a LlamaIndex chat LLM that reads ``ImageBlock``s and calls tools.

    Give a checkpoint (``BelleVL(model="/models/BELLE-VL")``, loaded with :class:`belle_vl_tools.BelleVL`) or any
    loaded core backend (``BelleVL(model=runtime)``, e.g. a runtime or a remote client; ``backend=`` also works).
    Pictures in messages may be inline bytes or base64, a path, or a URL; they are read under ``image_policy``
    (default: the backend's policy, else :meth:`ImagePolicy.trusted`: any local path, no URLs).

    Generation settings left at ``None`` take the checkpoint's ``generation_config.json`` values (the published
    ones sample with ``top_p=0.3``); ``temperature=0`` is greedy.
    """

    model: str = Field(default="", description="The checkpoint folder or Hub id (or the backend's model name).")
    max_new_tokens: int = Field(default=512, gt=0, description="Most tokens generated per answer.")
    temperature: float | None = Field(default=None, ge=0.0, description="Sampling temperature; 0 is greedy.")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int | None = Field(default=None, ge=0, description="Top-k sampling (0: off).")
    repetition_penalty: float | None = Field(default=None, gt=0.0, description="Repetition penalty.")
    seed: int | None = Field(default=None, description="Random seed for sampled answers.")
    stop: list[str] = Field(default_factory=list, description="Strings that end an answer.")
    context_window: int | None = Field(
        default=None, gt=0, description="Tokens of context; default: the checkpoint's max_window_size."
    )
    generate_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Further generation arguments (any transformers GenerationConfig field)."
    )

    _backend: Any = PrivateAttr(default=None)
    _image_policy: ImagePolicy = PrivateAttr(default_factory=ImagePolicy.trusted)

    def __init__(
        self,
        model: Any = None,
        *,
        backend: Backend | None = None,
        image_policy: ImagePolicy | None = None,
        load_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """``model`` follows the package's one rule (:func:`belle_vl_tools.backend.load_backend`): a loaded
        backend (``BelleVL``, ``RemoteBelleVL``, or an adapter holding one), a checkpoint folder or a Hub id,
        loaded with ``BelleVL.from_pretrained(model, **load_kwargs)`` (``device``, ``dtype``, ...), or None for the
        shipped demo model. ``backend=`` (a loaded backend) is the same as ``model=``. Other keyword arguments are
        the fields above and the LLM base fields."""
        from belle_vl_tools.backend import load_backend

        if backend is not None:
            if model is not None:
                raise TypeError("Give model= or backend=, not both (both take a loaded backend).")
            if not isinstance(backend, Backend):
                raise TypeError(
                    f"backend must be a belle_vl_tools backend (chat, stream, achat, astream, generate_batch); "
                    f"got {type(backend).__name__}."
                )
            model = backend
        backend = load_backend(model, **(load_kwargs or {}))
        name = os.fspath(model) if isinstance(model, str | os.PathLike) else str(backend.model_name)
        super().__init__(model=name, **kwargs)
        self._backend = backend
        self._image_policy = image_policy or getattr(backend, "image_policy", None) or ImagePolicy.trusted()

    @classmethod
    def class_name(cls) -> str:
        return "BelleVL_llm"

    @property
    def backend(self) -> Backend:
        """The core backend that answers (a local runtime or a remote client)."""
        return self._backend

    @property
    def image_policy(self) -> ImagePolicy:
        """What pictures in messages may be read."""
        return self._image_policy

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self.context_window or _backend_window(self._backend),
            num_output=self.max_new_tokens,
            is_chat_model=True,
            is_function_calling_model=True,
            model_name=str(getattr(self._backend, "model_name", self.model) or self.model),
        )

    # --- building requests -----------------------------------------------------------------------------------------
    def _generation(self, overrides: dict[str, Any]) -> dict[str, Any]:
        generation: dict[str, Any] = {"max_new_tokens": self.max_new_tokens}
        for name in ("temperature", "top_p", "top_k", "repetition_penalty", "seed"):
            value = getattr(self, name)
            if value is not None:
                generation[name] = value
        if self.stop:
            generation["stop"] = list(self.stop)
        generation.update(self.generate_kwargs)
        generation.update(overrides)
        return generation

    def _request(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> _Request:
        kwargs = dict(kwargs)
        tools = [_tool_spec(t) for t in kwargs.pop("tools", None) or ()]
        tool_choice = kwargs.pop("tool_choice", None)
        if tool_choice is None and kwargs.get("tool_required"):
            tool_choice = "required"
        for name in ("allow_parallel_tool_calls", "tool_required", "verbose"):
            kwargs.pop(name, None)
        session = ToolSession.create(tools, tool_choice, kwargs.pop("response_format", None))
        request = session.prepare(to_core_messages(messages, self._image_policy), self._generation(kwargs))
        return _Request(request.messages, request.generation, session)

    def _message(self, text: str, session: ToolSession) -> ChatMessage:
        if not session.may_call:
            return ChatMessage(role=MessageRole.ASSISTANT, content=text)
        return _parsed_message(text, session.parse(text))

    def _response(self, result: ChatResult, session: ToolSession) -> ChatResponse:
        return ChatResponse(
            message=self._message(result.text, session),
            raw=_raw(result.text, result.finish_reason, result.usage, result.model),
            additional_kwargs=_usage(result.usage),
        )

    # --- chat ------------------------------------------------------------------------------------------------------
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        request = self._request(messages, kwargs)
        result = self._backend.chat(request.messages, **request.generation)
        return self._response(result, request.session)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        request = self._request(messages, kwargs)
        chunks = self._backend.stream(request.messages, **request.generation)

        def responses() -> ChatResponseGen:
            translate = _StreamTranslator(self, request)
            for chunk in chunks:
                yield from translate.push(chunk)

        return responses()

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        request = await asyncio.to_thread(self._request, messages, kwargs)
        result = await self._backend.achat(request.messages, **request.generation)
        return self._response(result, request.session)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        request = await asyncio.to_thread(self._request, messages, kwargs)

        async def responses() -> ChatResponseAsyncGen:
            translate = _StreamTranslator(self, request)
            async for chunk in self._backend.astream(request.messages, **request.generation):
                for response in translate.push(chunk):
                    yield response

        return responses()

    # --- completion ------------------------------------------------------------------------------------------------
    def _completion_messages(self, prompt: str) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.append({"role": "user", "content": prompt})
        return messages

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        result = self._backend.chat(self._completion_messages(prompt), **self._generation(kwargs))
        return CompletionResponse(
            text=result.text,
            raw=_raw(result.text, result.finish_reason, result.usage, result.model),
            additional_kwargs=_usage(result.usage),
        )

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        chunks = self._backend.stream(self._completion_messages(prompt), **self._generation(kwargs))

        def responses() -> CompletionResponseGen:
            text = ""
            for chunk in chunks:
                text += chunk.delta
                yield CompletionResponse(text=text, delta=chunk.delta, additional_kwargs=_usage(chunk.usage))

        return responses()

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        result = await self._backend.achat(self._completion_messages(prompt), **self._generation(kwargs))
        return CompletionResponse(
            text=result.text,
            raw=_raw(result.text, result.finish_reason, result.usage, result.model),
            additional_kwargs=_usage(result.usage),
        )

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        chunks = self._backend.astream(self._completion_messages(prompt), **self._generation(kwargs))

        async def responses() -> CompletionResponseAsyncGen:
            text = ""
            async for chunk in chunks:
                text += chunk.delta
                yield CompletionResponse(text=text, delta=chunk.delta, additional_kwargs=_usage(chunk.usage))

        return responses()

    # --- structured output -------------------------------------------------------------------------------------------
    def _structured_messages(self, prompt: BasePromptTemplate, prompt_args: dict[str, Any]) -> list[ChatMessage]:
        return self._extend_messages(prompt.format_messages(llm=self, **prompt_args))

    def structured_predict(
        self,
        output_cls: type[Model],
        prompt: BasePromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> Model:
        """An ``output_cls`` from the prompt: the answer is generated as JSON under the class's schema (constrained
        decoding), so it always validates. Another ``pydantic_program_mode`` than DEFAULT uses LlamaIndex's
        programs instead."""
        if self.pydantic_program_mode != PydanticProgramMode.DEFAULT:
            return super().structured_predict(output_cls, prompt, llm_kwargs, **prompt_args)
        messages = self._structured_messages(prompt, prompt_args)
        response = self.chat(messages, **{**(llm_kwargs or {}), "response_format": output_cls})
        return output_cls.model_validate_json(response.message.content or "")

    async def astructured_predict(
        self,
        output_cls: type[Model],
        prompt: BasePromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> Model:
        """:meth:`structured_predict`, async."""
        if self.pydantic_program_mode != PydanticProgramMode.DEFAULT:
            return await super().astructured_predict(output_cls, prompt, llm_kwargs, **prompt_args)
        messages = self._structured_messages(prompt, prompt_args)
        response = await self.achat(messages, **{**(llm_kwargs or {}), "response_format": output_cls})
        return output_cls.model_validate_json(response.message.content or "")

    # --- tool calling ------------------------------------------------------------------------------------------------
    def _prepare_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        tool_choice: str | dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        messages = list(chat_history or [])
        if user_msg is not None:
            messages.append(
                ChatMessage(role=MessageRole.USER, content=user_msg) if isinstance(user_msg, str) else user_msg
            )
        return {
            "messages": messages,
            "tools": [_tool_spec(tool).to_openai() for tool in tools],
            "tool_choice": "required" if tool_choice is None and tool_required else tool_choice,
            **kwargs,
        }

    def _validate_chat_with_tools_response(
        self,
        response: ChatResponse,
        tools: Sequence[BaseTool],
        allow_parallel_tool_calls: bool = False,
        **kwargs: Any,
    ) -> ChatResponse:
        if not allow_parallel_tool_calls:
            calls = [b for b in response.message.blocks if isinstance(b, ToolCallBlock)]
            if len(calls) > 1:
                response.message.blocks = [
                    b for b in response.message.blocks if not isinstance(b, ToolCallBlock) or b is calls[0]
                ]
        return response

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        calls = [
            ToolSelection(
                tool_id=block.tool_call_id or f"call_{uuid.uuid4().hex[:24]}",
                tool_name=block.tool_name,
                tool_kwargs=_tool_arguments(block.tool_kwargs),
            )
            for block in response.message.blocks
            if isinstance(block, ToolCallBlock)
        ]
        if not calls and error_on_no_tool_call:
            invalid = response.message.additional_kwargs.get("invalid_tool_calls") or []
            detail = "; ".join(str(c.get("error")) for c in invalid)
            raise ToolCallParseError(
                "Belle-VL's reply calls no tool"
                + (f" ({detail})" if detail else "")
                + ". Ask again, or pass error_on_no_tool_call=False to accept a plain answer."
            )
        return calls


class _StreamTranslator:
    """Turns core stream chunks into ``ChatResponse``s. With tools bound only the answer meant for the user
    streams (the text after ``Final Answer:``, or a plain reply), and the last response carries the parsed
    message (text and ``ToolCallBlock``s)."""

    def __init__(self, llm: BelleVL, request: _Request) -> None:
        self._model = str(getattr(llm.backend, "model_name", "") or llm.model)
        self._text = ""
        self._parser = request.session.stream_parser() if request.session.may_call else None
        self._shown = ""

    def push(self, chunk: Any) -> list[ChatResponse]:
        self._text += chunk.delta
        if self._parser is None:
            delta = chunk.delta
            message = ChatMessage(role=MessageRole.ASSISTANT, content=self._text)
        elif chunk.finish_reason is None:
            delta = self._parser.feed(chunk.delta)
            self._shown += delta
            message = ChatMessage(role=MessageRole.ASSISTANT, content=self._shown)
        else:
            delta = self._parser.feed(chunk.delta)
            rest, parsed = self._parser.finish()
            delta += rest
            message = _parsed_message(self._text, parsed)
        if chunk.finish_reason is None:
            return [ChatResponse(message=message, delta=delta)] if delta else []
        raw = _raw(self._text, chunk.finish_reason, chunk.usage, self._model)
        return [ChatResponse(message=message, delta=delta, raw=raw, additional_kwargs=_usage(chunk.usage))]


def _parsed_message(text: str, parsed: ParsedReply) -> ChatMessage:
    """The assistant message of a reply read with the tool protocol: the answer text and ``ToolCallBlock``s.

    A call the model got wrong but that names a tool is handed on as well, so the agent runs it and the tool's
    error message tells the model what to fix; every problem is listed in ``additional_kwargs``.
    """
    blocks: list[Any] = []
    if parsed.content:
        blocks.append(TextBlock(text=parsed.content))
    for call in parsed.tool_calls:
        blocks.append(ToolCallBlock(tool_call_id=call.id, tool_name=call.name, tool_kwargs=dict(call.arguments)))
    for bad in parsed.invalid_tool_calls:
        if bad.name:
            blocks.append(ToolCallBlock(tool_call_id=bad.id, tool_name=bad.name, tool_kwargs=bad.arguments or ""))
    extra: dict[str, Any] = {}
    if parsed.thought:
        extra["thought"] = parsed.thought
    if parsed.invalid_tool_calls:
        extra["invalid_tool_calls"] = [
            {"id": c.id, "name": c.name, "arguments": c.arguments, "error": c.error} for c in parsed.invalid_tool_calls
        ]
    if not blocks:
        blocks.append(TextBlock(text=text.strip()))
    return ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks, additional_kwargs=extra)


def _backend_window(backend: Any) -> int:
    for owner in (backend, getattr(backend, "processor", None), getattr(backend, "generation_config", None)):
        value = getattr(owner, "max_window_size", None) if owner is not None else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return FALLBACK_CONTEXT_WINDOW
