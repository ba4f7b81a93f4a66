"""Tools and response formats: how a request's ``tools`` / ``tool_choice`` / ``response_format`` become a prompt and
generation settings, and how the model's reply becomes OpenAI ``content`` / ``tool_calls``.

The server has no logic of its own here: it asks the core's tool-call session (:mod:`belle_vl_tools.react`, with
grammar-constrained decoding from :mod:`belle_vl_tools.constrained`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

from ..messages import DEFAULT_SYSTEM, Message, TextPart
from ..sampling import SamplingParams
from .protocol import ChatRequest

__all__ = ["ChoiceContent", "Plan", "extract_json", "plan"]


@dataclasses.dataclass
class ChoiceContent:
    """What goes into a choice: content, tool calls (OpenAI dicts), finish reason."""

    content: str | None
    tool_calls: list[dict[str, Any]]
    finish_reason: str


@dataclasses.dataclass
class Plan:
    """How to ask the model, and how to read its reply.

    ``whole_answer_first``: the reply must be complete before anything is sent (it is parsed for tool calls or
    JSON); a streamed request then gets the parsed answer as a few chunks.
    """

    messages: list[Message]
    sampling: SamplingParams
    whole_answer_first: bool
    parse: Callable[[str, str], ChoiceContent]


def extract_json(text: str) -> str | None:
    """The first JSON object written in ``text`` (fences and stray words around it ignored), or None."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start >= 0:
        try:
            value, end = decoder.raw_decode(text, start)
        except ValueError:
            start = text.find("{", start + 1)
            continue
        if isinstance(value, dict):
            return text[start:end]
        start = text.find("{", end)
    return None


def plan(request: ChatRequest) -> Plan:
    """The plan for ``request`` (the messages already hold their loaded pictures)."""
    return _plan_with_session(request)


def _openai_calls(calls: Any, parallel: bool) -> list[dict[str, Any]]:
    out = [
        {
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)},
        }
        for call in calls
    ]
    return out if parallel else out[:1]


def _plan_with_session(request: ChatRequest) -> Plan:
    """The core tool-call session's plan: its prompt, its stop strings, its grammar (a forced call, or the response
    format) and its reading of the reply."""
    from ..react import ToolSession

    session = ToolSession.create(
        tools=request.tools, tool_choice=request.tool_choice, response_format=request.response_format
    )
    messages = request.messages
    if not session.may_call:  # say what to write too: the grammar makes sure, the instruction makes it good
        messages = _with_json_instruction(request, messages)
    prepared = session.prepare(messages, {"stop": list(request.sampling.stop)})
    grammar = prepared.generation.get("response_format")
    # a grammar that is just the request's response_format goes on as that (what a remote backend can take, the
    # same grammar for the local ones); one for tool calls goes on as the Grammar, which needs a local backend
    response_format = request.response_format if grammar is not None and not session.may_call else grammar
    sampling = dataclasses.replace(
        request.sampling,
        stop=list(prepared.generation.get("stop") or []),
        response_format=response_format,
        processors=list(request.sampling.processors),
    )

    def parse(text: str, finish_reason: str) -> ChoiceContent:
        reply = session.parse(text)
        if reply.tool_calls:
            return ChoiceContent(
                reply.content or None, _openai_calls(reply.tool_calls, request.parallel_tool_calls), "tool_calls"
            )
        content = reply.content if session.may_call and not reply.invalid_tool_calls else text
        if request.format_type in ("json_object", "json_schema"):
            content = extract_json(content) or content
        return ChoiceContent(content, [], finish_reason)

    whole_first = session.may_call or request.format_type != "text"
    return Plan(list(prepared.messages), sampling, whole_first, parse)


def _json_instruction(request: ChatRequest) -> str | None:
    if request.format_type == "json_object":
        return "ChoiceContent with one JSON object and nothing else."
    if request.format_type == "json_schema":
        schema = json.dumps(request.json_schema, ensure_ascii=False)
        return f"ChoiceContent with one JSON object that follows this JSON schema, and nothing else: {schema}"
    return None


def _with_json_instruction(request: ChatRequest, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    instruction = _json_instruction(request)
    if instruction is None:
        return messages
    messages = [dict(m) for m in messages]
    if messages[0]["role"] == "system":
        text = messages[0]["content"]
        if isinstance(text, list):  # the request's parts, read by the message model
            text = "\n".join(part.text for part in text if isinstance(part, TextPart))
        messages[0]["content"] = f"{text}\n{instruction}" if text else instruction
    else:
        messages.insert(0, {"role": "system", "content": f"{DEFAULT_SYSTEM}\n{instruction}"})
    return messages
