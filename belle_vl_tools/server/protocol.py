"""Request validation on the ``openai`` package's own types, and the internal form of a validated request.

Bodies are parsed with :func:`parse_json` (NaN / Infinity, numbers too long to read and nesting deeper than
:data:`MAX_JSON_DEPTH` are refused before anything else looks at them), then validated by pydantic models whose
fields are the OpenAI parameter types (``ChatCompletionMessageParam`` and its parts, ``ChatCompletionToolParam``,
``ResponseFormat``, ``ChatCompletionStreamOptionsParam``, ...). Every documented parameter of the OpenAI API is
either declared here, and so honoured, or refused with a 400 that names it; an unknown parameter is refused too.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from openai.types import completion_create_params as completion_params
from openai.types.chat import (
    ChatCompletionAssistantMessageParam,
    ChatCompletionContentPartParam,
    ChatCompletionContentPartTextParam,
    ChatCompletionDeveloperMessageParam,
    ChatCompletionFunctionToolParam,
    ChatCompletionStreamOptionsParam,
    ChatCompletionSystemMessageParam,
    ChatCompletionToolChoiceOptionParam,
    ChatCompletionToolMessageParam,
    ChatCompletionUserMessageParam,
)
from openai.types.chat import completion_create_params as chat_params
from openai.types.chat.completion_create_params import ResponseFormat
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from ..errors import PromptError, SamplingError
from ..messages import ImagePart, Part, parse_part
from ..sampling import SamplingParams
from .errors import APIError, bad_request

__all__ = [
    "MAX_JSON_DEPTH",
    "MAX_N",
    "ChatCompletionRequest",
    "ChatRequest",
    "CompletionRequest",
    "parse_chat_request",
    "parse_completion_request",
    "parse_json",
]

#: Deepest nesting of arrays and objects a request body may have.
MAX_JSON_DEPTH = 64
#: Most choices (``n``) one request may ask for.
MAX_N = 8
#: Most logit_bias entries, as the OpenAI API allows.
MAX_LOGIT_BIAS = 300
OPENAI_ROLES = ("system", "developer", "user", "assistant", "tool")

Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
Stop = str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=16)]


# ---------------------------------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------------------------------


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _depth(value: Any, limit: int) -> int:
    """The nesting depth of ``value`` (iteratively: no recursion to exhaust), stopping past ``limit``."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_json(raw: bytes) -> Any:
    """The request body as JSON; :class:`APIError` 400 for malformed JSON, NaN / Infinity, numbers too long to
    read, and nesting deeper than :data:`MAX_JSON_DEPTH`."""
    try:
        body = json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        raise bad_request(
            f"The request body nests deeper than {MAX_JSON_DEPTH} levels.", code="json_too_deep"
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        detail = " ".join(str(exc).split())[:160]
        raise bad_request(
            f"The request body is not valid JSON ({detail}): send a JSON object; NaN and Infinity are not numbers.",
            code="invalid_json",
        ) from None
    if _depth(body, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise bad_request(f"The request body nests deeper than {MAX_JSON_DEPTH} levels.", code="json_too_deep")
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    return body


def _param(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and not part[:1].isupper() and part not in ("function-after", "function-before"):
            out += f".{part}" if out else part
    return out


def _validation_error(exc: ValidationError, prefix: str = "") -> APIError:
    """The first error of a pydantic validation as a 400 naming the field."""
    errors = exc.errors(include_url=False)
    # for unions, prefer an error that is not just "wrong member": the deepest location says most
    error = max(errors, key=lambda e: len(e["loc"]))
    param = _param(error["loc"])
    if prefix:
        param = f"{prefix}.{param}" if param and not param.startswith("[") else f"{prefix}{param}"
    shown = json.dumps(error.get("input"), default=str)[:60] if "input" in error else ""
    if error["type"] == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {param}.", param or None, "unknown_parameter")
    message = f"{param or 'body'}: {error['msg']}" + (f" (got {shown})" if shown else "") + "."
    return bad_request(message, param or None)


# ---------------------------------------------------------------------------------------------------------------
# Internal form (the generation settings are the core's SamplingParams)
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ChatRequest:
    """A validated chat completion request."""

    model: str
    messages: list[dict[str, Any]]
    sampling: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    tools: list[Any]  # ToolSpec
    tool_choice: Any
    parallel_tool_calls: bool
    response_format: dict[str, Any] | None  # {"type": "json_object"} / {"type": "json_schema", "json_schema": ...}
    image_sources: list[tuple[int, int, str]]  # (message index, part index, url)
    user: str | None = None

    @property
    def format_type(self) -> str:
        return (self.response_format or {}).get("type", "text")

    @property
    def json_schema(self) -> dict[str, Any] | None:
        spec = (self.response_format or {}).get("json_schema") or {}
        schema = spec.get("schema")
        return dict(schema) if isinstance(schema, Mapping) else None


# ---------------------------------------------------------------------------------------------------------------
# Pydantic models
# ---------------------------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class _SamplingFields(_Strict):
    model: str | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=MAX_N)
    seed: Int64 | None = None
    stop: Stop | None = None
    stream: bool | None = None
    stream_options: ChatCompletionStreamOptionsParam | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(None, max_length=MAX_LOGIT_BIAS)
    user: str | None = Field(None, max_length=256)
    # extensions (as vLLM and transformers serve take them)
    top_k: int | None = Field(None, ge=-1, le=1_000_000)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``: the parameters this server honours, typed with openai's own param types."""

    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ChatCompletionFunctionToolParam] | None = Field(None, max_length=128)
    tool_choice: ChatCompletionToolChoiceOptionParam | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = Field(
        None, max_length=16
    )
    safety_identifier: str | None = Field(None, max_length=256)
    # accepted only at their neutral values
    store: Literal[False] | None = None
    modalities: list[Literal["text"]] | None = None
    service_tier: Literal["auto", "default"] | None = None


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``: text in, text out."""

    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_N)]
    max_tokens: int | None = Field(None, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: Literal[False] | None = None
    suffix: Literal[""] | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)


def _documented(params: Any) -> set[str]:
    return set(getattr(params.CompletionCreateParamsBase, "__annotations__", {})) | {"stream"}


_NOT_SUPPORTED = {
    "audio": "audio output",
    "function_call": "the deprecated functions API (use tools)",
    "functions": "the deprecated functions API (use tools)",
    "prediction": "predicted outputs",
    "reasoning_effort": "reasoning models",
    "verbosity": "reasoning models",
    "web_search_options": "web search",
    "prompt_cache_key": "prompt caching hints (prefixes are reused automatically)",
    "prompt_cache_retention": "prompt caching hints (prefixes are reused automatically)",
    "prompt_cache_options": "prompt caching hints (prefixes are reused automatically)",
    "moderation": "moderation",
}


def _check_names(body: Mapping[str, Any], model: type[BaseModel], documented: set[str]) -> None:
    for name, value in body.items():
        if name in model.model_fields:
            continue
        if name in documented or name in _NOT_SUPPORTED:
            if value is None:
                continue  # an explicit null is "not given"
            what = _NOT_SUPPORTED.get(name, name)
            raise bad_request(
                f"{name} is not supported by this server ({what}); leave it out.", name, "unsupported_parameter"
            )
        raise bad_request(f"Unrecognized request argument supplied: {name}.", name, "unknown_parameter")


def _validate(model: type[BaseModel], body: Mapping[str, Any], documented: set[str]) -> Any:
    _check_names(body, model, documented)
    body = {k: v for k, v in body.items() if k in model.model_fields}  # what is left: nulls of unsupported ones
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    except RecursionError:
        raise bad_request("The request nests too deeply.", code="json_too_deep") from None


# ---------------------------------------------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------------------------------------------

_MESSAGE_TYPES: dict[str, Any] = {
    "system": ChatCompletionSystemMessageParam,
    "developer": ChatCompletionDeveloperMessageParam,
    "user": ChatCompletionUserMessageParam,
    "assistant": ChatCompletionAssistantMessageParam,
    "tool": ChatCompletionToolMessageParam,
}
_MESSAGE_ADAPTERS = {role: TypeAdapter(kind) for role, kind in _MESSAGE_TYPES.items()}
_TEXT_CONTENT = TypeAdapter(str | list[ChatCompletionContentPartTextParam])
_MEDIA_CONTENT = TypeAdapter(str | list[ChatCompletionContentPartParam])
_ASSISTANT_CONTENT = TypeAdapter(str | list[ChatCompletionContentPartTextParam] | None)
_REFUSED_MESSAGE_KEYS = {"audio": "audio", "function_call": "the deprecated functions API (use tool_calls)"}


def _keys(kind: Any) -> frozenset[str]:
    return kind.__required_keys__ | kind.__optional_keys__


def _parse_content(content: Any, index: int, role: str, images: list[tuple[int, int, str]]) -> Any:
    param = f"messages[{index}].content"
    adapters: dict[str, TypeAdapter[Any]] = {
        "user": _MEDIA_CONTENT,
        "tool": _MEDIA_CONTENT,
        "assistant": _ASSISTANT_CONTENT,
    }
    adapter = adapters.get(role, _TEXT_CONTENT)
    if role != "assistant" and content is None:
        raise bad_request(f"{param} is missing: give a string or a list of content parts.", param)
    try:
        content = adapter.validate_python(content)
    except ValidationError as exc:
        kinds = "'text' and 'image_url'" if role in ("user", "tool") else "'text'"
        bad = _validation_error(exc, param)
        raise bad_request(f"{bad.message} {role} message content holds {kinds} parts.", bad.param) from None
    if content is None or isinstance(content, str):
        return content or ""
    parts: list[Part] = []
    for j, raw_part in enumerate(content):
        where = f"{param}[{j}]"
        try:
            part = parse_part(raw_part)  # the core's one reading of content parts
        except PromptError as exc:
            raise bad_request(f"{where}: {exc} This server reads 'text' and 'image_url' parts.", where) from None
        if isinstance(part, ImagePart):
            url = part.source
            if part.detail not in (None, "auto"):
                raise bad_request(
                    f"{where}.image_url.detail is {part.detail!r}: this model sees every picture at one resolution "
                    "(448x448); leave detail out or use 'auto'.",
                    f"{where}.image_url.detail",
                )
            if not url.strip():
                raise bad_request(f"{where} needs {{'image_url': {{'url': 'data:image/png;base64,...'}}}}.", where)
            if not url.lstrip()[:8].lower().startswith(("data:", "http://", "https://")):
                raise bad_request(
                    f"{where}: the image URL must be a data URL (data:image/...;base64,...) or an http(s) URL.",
                    where,
                    code="invalid_image_url",
                )
            images.append((index, len(parts), url))
        parts.append(part)
    return parts


def _parse_messages(raw_messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[tuple[int, int, str]]]:
    images: list[tuple[int, int, str]] = []
    messages: list[dict[str, Any]] = []
    call_names: dict[str, str] = {}
    for i, raw in enumerate(raw_messages):
        role = raw.get("role")
        if role not in OPENAI_ROLES:
            raise bad_request(
                f"messages[{i}].role is {role!r}; use one of {', '.join(OPENAI_ROLES)}.", f"messages[{i}].role"
            )
        kind = _MESSAGE_TYPES[role]
        for key, value in raw.items():
            if key not in _keys(kind):
                raise bad_request(
                    f"messages[{i}] has the key {key!r}, which a {role} message does not take.",
                    f"messages[{i}].{key}",
                    "unknown_parameter",
                )
            if key in _REFUSED_MESSAGE_KEYS and value is not None:
                raise bad_request(
                    f"messages[{i}].{key}: {_REFUSED_MESSAGE_KEYS[key]} is not supported by this server.",
                    f"messages[{i}].{key}",
                    "unsupported_parameter",
                )
        rest = {k: v for k, v in raw.items() if k != "content"}
        if role != "assistant" or "content" in raw:
            rest["content"] = "" if role != "assistant" else None
        try:
            _MESSAGE_ADAPTERS[role].validate_python(rest)
        except ValidationError as exc:
            raise _validation_error(exc, f"messages[{i}]") from None
        role = "system" if role == "developer" else role
        message: dict[str, Any] = {"role": role, "content": _parse_content(raw.get("content"), i, role, images)}
        if role == "assistant" and raw.get("tool_calls"):
            calls = []
            for j, call in enumerate(raw["tool_calls"]):
                if call.get("type") != "function":
                    raise bad_request(
                        f"messages[{i}].tool_calls[{j}] has type {call.get('type')!r}: only function calls.",
                        f"messages[{i}].tool_calls[{j}].type",
                    )
                call_names[str(call.get("id"))] = call["function"]["name"]
                calls.append(dict(call))
            message["tool_calls"] = calls
        if role == "tool":
            call_id = raw.get("tool_call_id")
            message["tool_call_id"] = call_id
            message["name"] = call_names.get(str(call_id), "tool")
        elif raw.get("name"):
            message["name"] = raw["name"]
        messages.append(message)
    return messages, images


# ---------------------------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------------------------


def _check_model(model: str | None, default: str, aliases: frozenset[str]) -> str:
    if model is None:
        return default
    if model not in aliases:
        raise APIError(
            404,
            f"The model {model!r} does not exist on this server; it serves {default!r} (GET /v1/models).",
            param="model",
            code="model_not_found",
        )
    return model


def _logit_bias(raw: Mapping[str, float] | None, vocab_size: int | None) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in (raw or {}).items():
        token = key.strip()
        if not token.isdigit() or (vocab_size is not None and int(token) >= vocab_size):
            limit = f" below {vocab_size}" if vocab_size else ""
            raise bad_request(
                f"logit_bias keys are token ids (integers as strings){limit}; {key!r} is not one.", "logit_bias"
            )
        out[int(token)] = float(value)
    return out


def _max_tokens(value: int | None, name: str, limit: int, default: int | None) -> int | None:
    if value is None:
        return default
    if value > limit:
        raise bad_request(f"{name} is {value}; this server answers at most {limit} tokens per request.", name)
    return value


def _sampling(
    req: _SamplingFields, max_new_tokens: int | None, vocab_size: int | None, *, logprobs: bool, top_logprobs: int
) -> SamplingParams:
    """The request's generation settings in the core's model (checked there too: a 400 naming the parameter)."""
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if isinstance(req.stop, str) and not req.stop:
        raise bad_request("stop must be a non-empty string or a list of non-empty strings.", "stop")
    try:
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k if req.top_k is not None and req.top_k > 0 else None,
            seed=req.seed,
            repetition_penalty=req.repetition_penalty,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            logit_bias=_logit_bias(req.logit_bias, vocab_size),
            stop=stop,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
        )
    except SamplingError as exc:
        param = "max_tokens" if exc.param == "max_new_tokens" else exc.param
        raise bad_request(" ".join(str(exc).split()), param) from None


def parse_chat_request(
    body: Mapping[str, Any],
    *,
    model_name: str,
    aliases: frozenset[str],
    max_tokens_limit: int,
    default_max_tokens: int | None,
    max_images: int,
    vocab_size: int | None = None,
) -> ChatRequest:
    """Validate a chat completions body; raises :class:`APIError` (400 / 404) naming the bad field."""
    req: ChatCompletionRequest = _validate(ChatCompletionRequest, body, _documented(chat_params))
    model = _check_model(req.model, model_name, aliases)
    messages, images = _parse_messages(req.messages)
    if len(images) > max_images:
        raise bad_request(
            f"The request holds {len(images)} images; this server takes at most {max_images}.",
            "messages",
            "too_many_images",
        )
    max_new = _max_tokens(req.max_completion_tokens, "max_completion_tokens", max_tokens_limit, None)
    if max_new is None:
        max_new = _max_tokens(req.max_tokens, "max_tokens", max_tokens_limit, default_max_tokens)
    if req.top_logprobs and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs: true.", "top_logprobs")
    sampling = _sampling(req, max_new, vocab_size, logprobs=bool(req.logprobs), top_logprobs=req.top_logprobs or 0)

    tools: list[Any] = []
    uses_tool_history = any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
    if req.tools is not None or uses_tool_history:
        from ..react import ToolSpec

        try:
            tools = [ToolSpec.from_openai(dict(tool)) for tool in req.tools or []]
        except Exception as exc:  # PromptError with the reason
            raise bad_request(" ".join(str(exc).split()), "tools") from None
    choice = req.tool_choice
    if isinstance(choice, Mapping):
        if choice.get("type") != "function":
            raise bad_request("tool_choice must be 'auto', 'none', 'required' or a function.", "tool_choice")
        function = choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
        if name not in {tool.name for tool in tools}:
            raise bad_request(f"tool_choice names {name!r}, which is not one of the tools.", "tool_choice")
    elif choice == "required" and not tools:
        raise bad_request("tool_choice 'required' needs tools.", "tool_choice")
    fmt: dict[str, Any] | None = dict(req.response_format) if req.response_format is not None else None
    if fmt is not None and fmt.get("type") == "text":
        fmt = None
    if fmt is not None and fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema") or {}
        if not isinstance(spec.get("schema"), Mapping):
            raise bad_request("response_format.json_schema needs a 'schema' object.", "response_format.json_schema")
        fmt["json_schema"] = dict(spec)
    options = req.stream_options or {}
    if options and not req.stream:
        raise bad_request("stream_options is only allowed with stream: true.", "stream_options")
    return ChatRequest(
        model=model,
        messages=messages,
        sampling=sampling,
        n=req.n or 1,
        stream=bool(req.stream),
        include_usage=bool(options.get("include_usage")),
        tools=tools,
        tool_choice=choice,
        parallel_tool_calls=req.parallel_tool_calls is not False,
        response_format=fmt,
        image_sources=images,
        user=req.user or req.safety_identifier,
    )


@dataclasses.dataclass
class TextRequest:
    """A validated ``/v1/completions`` request: each prompt is asked as one user turn."""

    model: str
    prompts: list[str]
    sampling: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None


def parse_completion_request(
    body: Mapping[str, Any],
    *,
    model_name: str,
    aliases: frozenset[str],
    max_tokens_limit: int,
    vocab_size: int | None = None,
) -> TextRequest:
    """Validate a ``/v1/completions`` body (``max_tokens`` defaults to 16, as in the OpenAI API)."""
    req: CompletionRequest = _validate(CompletionRequest, body, _documented(completion_params))
    model = _check_model(req.model, model_name, aliases)
    prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    n = req.n or 1
    if req.best_of is not None and req.best_of != n:
        raise bad_request(f"best_of must equal n ({n}): this server does not rank candidates.", "best_of")
    if len(prompts) * n > MAX_N:
        raise bad_request(f"prompts x n is {len(prompts) * n}; this server answers at most {MAX_N}.", "n")
    sampling = _sampling(
        req,
        _max_tokens(req.max_tokens, "max_tokens", max_tokens_limit, 16),
        vocab_size,
        logprobs=req.logprobs is not None,
        top_logprobs=req.logprobs or 0,
    )
    options = req.stream_options or {}
    if options and not req.stream:
        raise bad_request("stream_options is only allowed with stream: true.", "stream_options")
    return TextRequest(
        model=model,
        prompts=prompts,
        sampling=sampling,
        n=n,
        stream=bool(req.stream),
        include_usage=bool(options.get("include_usage")),
        logprobs=req.logprobs,
    )
