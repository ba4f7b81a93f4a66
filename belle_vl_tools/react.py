"""The tool-call session: Qwen-14B-Chat's ReAct protocol, from tools and ``tool_choice`` to parsed calls, in one place.

Belle-VL's language model is Qwen-14B-Chat, which was trained to call tools in the ReAct text format of Qwen's own
prompting examples. Tools are described in an instruction placed before the first question; the model answers ::

    Thought: what to do next
    Action: tool_name
    Action Input: {"argument": "value"}

and generation stops at ``Observation:``. The tool's result is then written after ``Observation:`` and the model goes
on, until it writes ``Thought: I now know the final answer`` and ``Final Answer: ...``.

Use it through :class:`ToolSession` (every front end does: the LangChain and LlamaIndex adapters, the server)::

    session = ToolSession.create(tools, tool_choice="required", response_format=None)
    request = session.prepare(messages, {"temperature": 0})   # messages: transformers / OpenAI dicts or Message
    result = backend.chat(request.messages, **request.generation)
    reply = session.parse(result.text)                       # ParsedReply: content, tool_calls, invalid_tool_calls

    parser = session.stream_parser()                         # while streaming:
    shown = parser.feed(chunk.delta)                         #   the answer text that may be shown now
    rest, reply = parser.finish()                            #   at the end

* ``tools``: :class:`ToolSpec` objects or OpenAI tool dicts (``{"type": "function", "function": {...}}``).
* ``tool_choice``: ``"auto"`` (or None), ``"none"``, ``"required"`` (also ``"any"`` or True), a tool's name, or
  ``{"type": "function", "function": {"name": ...}}``.
* ``response_format``: what a final answer must be (see :func:`belle_vl_tools.constrained.grammar_from`).

The rules, once: the tool instruction is rendered unless ``tool_choice`` is ``"none"`` (past calls and results are
always folded into the text); ``Observation:`` is added to the stop strings whenever a tool may be called; when a call
is forced (``"required"`` or a named tool) the answer is constrained by a grammar to one ``Action`` of an allowed
tool whose ``Action Input`` is valid under that tool's schema; with ``"auto"`` and a ``response_format`` it is either
such a call or ``Final Answer:`` followed by JSON of the format; without tools the ``response_format`` constrains the
whole answer. Replies come back as core types (:class:`~belle_vl_tools.messages.ToolCall`,
:class:`InvalidToolCall`, :class:`ParsedReply`); each front end maps them to its own.

This module imports neither torch nor transformers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .constrained import Grammar, grammar_from
from .errors import PromptError
from .messages import (
    ImagePart,
    Message,
    MessageInput,
    Part,
    TextPart,
    ToolCall,
    new_call_id,
    parse_message,
    parse_messages,
    parse_tool_call,
)

__all__ = [
    "FINAL_ANSWER_THOUGHT",
    "STOP_SEQUENCES",
    "InvalidToolCall",
    "ParsedReply",
    "PreparedRequest",
    "ReplyStreamParser",
    "ToolCall",
    "ToolSession",
    "ToolSpec",
    "format_tool_call",
    "new_call_id",
    "parse_reply",
    "react_instruction",
    "render_tool_messages",
    "tool_description",
]

#: Add these to the stop strings while tools are bound: the model must not invent tool results.
STOP_SEQUENCES: tuple[str, ...] = ("Observation:",)

#: The thought that precedes a final answer in the ReAct format.
FINAL_ANSWER_THOUGHT = "I now know the final answer"


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolSpec:
    """A tool as the model sees it: name, description and a JSON schema (``type: object``) of its arguments."""

    name: str
    description: str
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", self.name):
            raise PromptError(
                f"Tool name {self.name!r} is not usable: use 1-64 letters, digits, '_', '-' or '.' (no spaces)."
            )
        if not isinstance(self.parameters, Mapping):
            raise PromptError(f"Tool {self.name!r}: parameters must be a JSON schema dict, not {self.parameters!r}.")
        object.__setattr__(self, "description", str(self.description or "").strip())
        object.__setattr__(self, "parameters", dict(self.parameters))

    @classmethod
    def from_openai(cls, tool: Mapping[str, Any]) -> ToolSpec:
        """From ``{"type": "function", "function": {...}}`` or a bare function dict (name, description,
        parameters)."""
        if not isinstance(tool, Mapping):
            raise PromptError(f"A tool must be a dict in OpenAI's format, not {type(tool).__name__}.")
        function = tool.get("function", tool) if tool.get("type", "function") == "function" else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise PromptError(
                "A tool must look like {'type': 'function', 'function': {'name': ..., 'description': ..., "
                f"'parameters': {{...}}}}; got keys {sorted(map(str, tool))}."
            )
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        return cls(name=function["name"], description=function.get("description") or "", parameters=parameters)

    def to_openai(self) -> dict[str, Any]:
        """``{"type": "function", "function": {"name", "description", "parameters"}}``."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": dict(self.parameters)},
        }


@dataclass(frozen=True)
class InvalidToolCall:
    """A call the model tried to make but got wrong; ``error`` says what was wrong."""

    name: str | None
    arguments: str | None
    error: str
    id: str = field(default_factory=new_call_id)


@dataclass(frozen=True)
class ParsedReply:
    """The model's reply read as the ReAct format.

    ``content`` is the final answer, or the whole reply when it holds no ``Action:``, or ``""`` when it only
    calls tools.
    """

    content: str
    tool_calls: list[ToolCall]
    invalid_tool_calls: list[InvalidToolCall]
    thought: str | None = None

    @property
    def has_calls(self) -> bool:
        """Whether the reply tried to call a tool (well-formed or not)."""
        return bool(self.tool_calls or self.invalid_tool_calls)


# ---------------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------------


def _clean_schema(schema: Any, in_properties: bool = False) -> Any:
    """The schema without the ``title`` keywords pydantic adds (they cost tokens and say nothing new)."""
    if isinstance(schema, Mapping):
        cleaned = {}
        for key, value in schema.items():
            if key == "title" and not in_properties and isinstance(value, str):
                continue
            cleaned[key] = _clean_schema(value, in_properties=(key in ("properties", "$defs", "definitions")))
        return cleaned
    if isinstance(schema, list):
        return [_clean_schema(item) for item in schema]
    return schema


def tool_description(tool: ToolSpec) -> str:
    """One tool's line in the instruction, in the wording Qwen-14B-Chat was trained on."""
    parameters = json.dumps(_clean_schema(tool.parameters), ensure_ascii=False)
    return (
        f"{tool.name}: Call this tool to interact with the {tool.name} API. What is the {tool.name} API useful "
        f"for? {tool.description} Parameters: {parameters} Format the arguments as a JSON object."
    )


def _choice_name(tool_choice: str | Mapping[str, Any] | None) -> str | None:
    if isinstance(tool_choice, Mapping):
        function = tool_choice.get("function", tool_choice)
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(name, str):
            raise PromptError(
                "tool_choice as a dict must be {'type': 'function', 'function': {'name': ...}}; "
                f"got {dict(tool_choice)!r}."
            )
        return name
    return None


def react_instruction(tools: Sequence[ToolSpec], tool_choice: str | Mapping[str, Any] | None = None) -> str:
    """The instruction that lists the tools and the format to use (it goes before the first question)."""
    names = ",".join(tool.name for tool in tools)
    lines = [
        "Answer the following questions as best you can. You have access to the following tools:",
        "",
        "\n\n".join(tool_description(tool) for tool in tools),
        "",
        "Use the following format:",
        "",
        "Question: the input question you must answer",
        "Thought: you should always think about what to do",
        f"Action: the action to take, should be one of [{names}]",
        "Action Input: the input to the action",
        "Observation: the result of the action",
        "... (this Thought/Action/Action Input/Observation can be repeated zero or more times)",
        f"Thought: {FINAL_ANSWER_THOUGHT}",
        "Final Answer: the final answer to the original input question",
        "",
    ]
    name = _choice_name(tool_choice)
    if name is not None:
        lines += [f"You must call the {name} tool (Action: {name}) before giving the final answer.", ""]
    elif tool_choice in ("required", "any"):
        lines += ["You must call one of the tools (an Action) before giving the final answer.", ""]
    lines.append("Begin!")
    return "\n".join(lines)


def _json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


def _normalise_call(call: Any) -> tuple[str, str, str]:
    """(id, name, arguments as JSON text) of a past call: a :class:`ToolCall`, an :class:`InvalidToolCall` (its text
    is replayed as written) or a form :func:`~belle_vl_tools.messages.parse_tool_call` reads."""
    if isinstance(call, InvalidToolCall):
        return call.id, call.name or "", call.arguments or ""
    if isinstance(call, Mapping):
        function = found if isinstance(found := call.get("function"), Mapping) else call
        arguments = function.get("arguments", function.get("args"))
        if isinstance(function.get("name"), str) and isinstance(arguments, str) and arguments.strip():
            try:
                json.loads(arguments)
            except ValueError:  # a call the model got wrong, replayed as it wrote it
                return str(call.get("id") or ""), function["name"], arguments
    parsed = parse_tool_call(call)
    return parsed.id, parsed.name, _json_text(parsed.arguments)


def _texts(message: Message) -> str:
    """The text parts of a message, one per line (a tool result's or an assistant's text)."""
    return "\n".join(part.text for part in message.parts if isinstance(part, TextPart))


def format_tool_call(name: str, arguments: str | Mapping[str, Any], thought: str | None = None) -> str:
    """One tool call in the ReAct format: ``Thought: ...\\nAction: name\\nAction Input: {...}``."""
    args = arguments if isinstance(arguments, str) else _json_text(dict(arguments))
    thought = (thought or "").strip() or f"I should use the {name} tool."
    return f"Thought: {thought}\nAction: {name}\nAction Input: {args}"


def _prefix_question(parts: Sequence[Part], prefix: str) -> tuple[Part, ...]:
    """``parts`` with ``prefix`` put before the first text, pictures left in place."""
    out = list(parts)
    for i, part in enumerate(out):
        if isinstance(part, TextPart):
            out[i] = TextPart(prefix + part.text)
            return tuple(out)
    return (*out, TextPart(prefix.rstrip() if out else prefix))


def _read_message(raw: Any, index: int) -> tuple[Message, Sequence[Any]]:
    """A message read by the message model, and an assistant's past calls as given: a call the model got wrong
    (an :class:`InvalidToolCall`, arguments that are not JSON) is replayed as it was written."""
    if isinstance(raw, Mapping) and raw.get("role") in ("assistant", "ai") and raw.get("tool_calls"):
        calls = raw["tool_calls"]
        if not isinstance(calls, list | tuple):
            raise PromptError(f"'tool_calls' (message {index}) must be a list.")
        return parse_message({**raw, "content": raw.get("content"), "tool_calls": None}, index), calls
    message = parse_message(raw, index)
    return message, message.tool_calls


@dataclass
class _Turn:
    role: str
    parts: list[Part]
    observation: bool = False  # a user turn that shows a tool's pictures

    def message(self) -> Message:
        return Message(self.role, tuple(self.parts))  # type: ignore[arg-type]  # roles come from Message objects


class _Renderer:
    """Builds the plain conversation, folding tool calls and results into assistant text."""

    def __init__(self) -> None:
        self.out: list[_Turn] = []
        self.in_react = False  # tool calls were made since the last question

    def _last(self, role: str, observation: bool = False) -> _Turn | None:
        if self.out and self.out[-1].role == role and self.out[-1].observation == observation:
            return self.out[-1]
        return None

    def _append_assistant(self, text: str) -> None:
        last = self._last("assistant")
        if last is None:
            self.out.append(_Turn("assistant", [TextPart(text)]))
        else:
            current = "".join(part.text for part in last.parts if isinstance(part, TextPart))
            last.parts = [TextPart(current + ("\n" if current and not current.endswith("\n") else "") + text)]

    def assistant(self, message: Message, calls: Sequence[Any]) -> None:
        text = _texts(message).strip()
        if not calls:
            if self.in_react and not re.search(r"Final\s*Answer\s*[:：]", text):
                text = f"Thought: {FINAL_ANSWER_THOUGHT}\nFinal Answer: {text}"
            self.in_react = False
            self._append_assistant(text)
            return
        for index, call in enumerate(calls):
            _, name, arguments = _normalise_call(call)
            self._append_assistant(format_tool_call(name, arguments, text if index == 0 else None))
        self.in_react = True

    def tool(self, message: Message) -> None:
        images = [part for part in message.parts if isinstance(part, ImagePart)]
        observation = f"Observation: {_texts(message).strip() or '(no text)'}"
        if not images and self._last("assistant") is not None:
            self._append_assistant(observation)
            return
        # Pictures can only be shown in a user turn: the observation becomes one (the processor puts its
        # pictures before its text, as "Picture N:").
        previous = self._last("user", observation=True)
        if previous is None:
            previous = _Turn("user", [], observation=True)
            self.out.append(previous)
        previous.parts += [*images, TextPart(observation)]

    def other(self, message: Message) -> None:
        if message.role == "user":
            self.in_react = False
        self.out.append(_Turn(message.role, list(message.parts)))


def render_tool_messages(
    messages: Sequence[MessageInput],
    tools: Sequence[ToolSpec],
    tool_choice: str | Mapping[str, Any] | None = None,
) -> list[Message]:
    """Plain messages for the processor from a conversation with tools, tool calls and tool results.

    ``messages`` are :class:`~belle_vl_tools.messages.Message` objects or dicts in any form
    :func:`~belle_vl_tools.messages.parse_messages` reads (transformers', OpenAI's); assistant messages may hold
    ``tool_calls`` (:class:`ToolCall`, :class:`InvalidToolCall`, OpenAI's dicts) and ``tool`` messages hold results.
    The tool instruction goes into the first user message after the system prompt (as ``Question: ...``), later user
    messages become ``Question: ...``; calls and text results are folded into the assistant's text as ``Action`` /
    ``Action Input`` / ``Observation``; a result that holds images becomes a user turn with those images, so the
    model sees them. ``tool_choice``: ``"auto"`` or ``None``, ``"none"`` (no tool instruction), ``"required"``, or
    ``{"type": "function", "function": {"name": ...}}`` (only that tool is offered and the instruction asks for it).
    """
    specs = [tool if isinstance(tool, ToolSpec) else ToolSpec.from_openai(tool) for tool in tools]
    if tool_choice not in (None, "auto", "none", "required", "any") and not isinstance(tool_choice, Mapping):
        raise PromptError(f"tool_choice must be 'auto', 'none', 'required' or a function dict, not {tool_choice!r}.")
    chosen = _choice_name(tool_choice)
    if chosen is not None:
        specs = [spec for spec in specs if spec.name == chosen]
        if not specs:
            known = ", ".join(tool.name for tool in tools) or "none"
            raise PromptError(f"tool_choice names {chosen!r}, which is not among the tools ({known}).")
    if tool_choice == "none":
        specs = []
    instruction = react_instruction(specs, tool_choice) if specs else None

    if isinstance(messages, str | Mapping | Message) or not isinstance(messages, Sequence):
        raise PromptError("messages must be a list of messages (dicts with 'role' and 'content', or Message).")
    renderer = _Renderer()
    for i, raw in enumerate(messages):
        message, calls = _read_message(raw, i)
        if message.role == "assistant":
            renderer.assistant(message, calls)
        elif message.role == "tool":
            renderer.tool(message)
        else:
            renderer.other(message)

    first_user = True
    for turn in renderer.out:
        if turn.role != "user" or turn.observation:
            continue
        if instruction is not None:
            prefix = f"{instruction}\n\nQuestion: " if first_user else "Question: "
            turn.parts = list(_prefix_question(turn.parts, prefix))
        first_user = False
    return [turn.message() for turn in renderer.out]


# ---------------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------------

_COLON = r"[ \t]*[:：]"
_KEYWORD_RE = re.compile(
    rf"(?P<key>Thought|Action[ \t]*Input|Action|Observation|Final[ \t]*Answer|Question){_COLON}[ \t]*",
    re.IGNORECASE,
)


def _key(match: re.Match[str]) -> str:
    return re.sub(r"\s+", " ", match.group("key")).lower()


def _segments(text: str) -> list[tuple[str, str]]:
    """(keyword, value) pairs in order; text before the first keyword is keyed ``""``. Keywords count only at
    the start of a line."""
    matches = [m for m in _KEYWORD_RE.finditer(text) if m.start() == 0 or text[m.start() - 1] in "\n\r"]
    # An "Action:" line that names no tool but holds "Input:" never happens; keywords are taken as found.
    segments: list[tuple[str, str]] = []
    head = text[: matches[0].start()] if matches else text
    if head.strip():
        segments.append(("", head.strip()))
    for index, match in enumerate(matches):
        end = matches[index + 1].start() if index + 1 < len(matches) else len(text)
        segments.append((_key(match), text[match.end() : end].strip()))
    return segments


def _tool_name(raw: str) -> str:
    name = raw.strip().splitlines()[0].strip() if raw.strip() else ""
    return name.strip("`'\"[]<> ").strip()


def _parse_arguments(raw: str, spec: ToolSpec | None) -> tuple[dict[str, Any] | None, str | None]:
    """The arguments as a dict, or None and the reason."""
    text = raw.strip()
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, re.S)
    if fence:
        text = fence.group(1)
    value: Any
    try:
        value = json.loads(text)
    except ValueError:
        start = text.find("{")
        value = None
        if start >= 0:
            try:
                value, _ = json.JSONDecoder().raw_decode(text[start:])  # stray text after the object
            except ValueError:
                value = None
        if value is None:
            properties = list((spec.parameters.get("properties") or {}) if spec else [])
            if spec is not None and len(properties) == 1 and text and not text.startswith(("{", "[")):
                return {properties[0]: text}, None  # a bare value for a one-argument tool
            return None, 'Action Input is not valid JSON: write the arguments as a JSON object, e.g. {"x": 1}.'
    if isinstance(value, dict):
        return value, None
    properties = list((spec.parameters.get("properties") or {}) if spec else [])
    if spec is not None and len(properties) == 1:
        return {properties[0]: value}, None
    return None, f"Action Input must be a JSON object of named arguments, not {type(value).__name__}."


def parse_reply(text: str, tools: Sequence[ToolSpec] | None = None) -> ParsedReply:
    """Read the model's reply: tool calls, or the final answer, or plain text. Never raises.

    Text after an ``Observation:`` the model wrote itself is dropped (the results it would invent). A
    ``Final Answer`` before any ``Action`` ends the reply. An unknown tool name (when ``tools`` are given), an
    ``Action Input`` that is not a JSON object, or a missing ``Action Input`` gives an :class:`InvalidToolCall`.
    """
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    specs: dict[str, ToolSpec] = {}
    for tool in tools or ():
        spec = tool if isinstance(tool, ToolSpec) else ToolSpec.from_openai(tool)
        specs[spec.name] = spec
    segments = _segments(text)
    # Drop what follows an invented observation.
    for index, (key, _) in enumerate(segments):
        if key == "observation":
            segments = segments[:index]
            break

    calls: list[ToolCall] = []
    invalid: list[InvalidToolCall] = []
    thought: str | None = None
    final: str | None = None
    index = 0
    while index < len(segments):
        key, value = segments[index]
        if key == "thought" and thought is None:
            thought = value
        elif key == "" and thought is None and index == 0 and any(k == "action" for k, _ in segments):
            thought = value
        elif key == "final answer" and not calls and not invalid:
            final = value
            break
        elif key == "action":
            name = _tool_name(value)
            following = segments[index + 1] if index + 1 < len(segments) else None
            if following is None or following[0] != "action input":
                invalid.append(
                    InvalidToolCall(
                        name or None,
                        None,
                        f"Action {name!r} has no Action Input: write 'Action Input: {{...}}' on the next line.",
                    )
                )
            else:
                index += 1
                raw = following[1]
                invalid_name = _check_name(name, specs)
                arguments, problem = _parse_arguments(raw, specs.get(name))
                if invalid_name is not None:
                    invalid.append(InvalidToolCall(name or None, raw, invalid_name))
                elif arguments is None:
                    invalid.append(InvalidToolCall(name, raw, problem or "Unreadable Action Input."))
                else:
                    calls.append(ToolCall(name, arguments))
        elif key == "action input":
            invalid.append(InvalidToolCall(None, value, "Action Input without an Action line naming the tool."))
        index += 1

    if final is not None:
        return ParsedReply(final, [], [], thought)
    if calls or invalid:
        return ParsedReply("", calls, invalid, thought)
    content = text.strip()
    return ParsedReply(content, [], [], thought)


def _check_name(name: str, specs: Mapping[str, ToolSpec]) -> str | None:
    if not name:
        return "Action names no tool: write the tool's name after 'Action:'."
    if specs and name not in specs:
        return f"Unknown tool {name!r}: the Action must be one of {', '.join(specs)}."
    return None


# ---------------------------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------------------------

_REACT_STARTS = ("thought", "action", "final answer", "question")


class ReplyStreamParser:
    """Reads a reply as it streams: :meth:`feed` returns the answer text that may be shown now, :meth:`finish`
    the parsed reply.

    A reply that starts as plain text is passed through (a trailing line that might become ``Action:`` is held
    back); a ReAct reply is held back until its ``Final Answer:``, whose text then streams. Tool calls are known
    only at the end.
    """

    def __init__(self, tools: Sequence[ToolSpec] | None = None) -> None:
        self.tools = list(tools or [])
        self.text = ""
        self.emitted = 0  # characters of answer text given out so far
        self._mode: str | None = None  # None (undecided), "plain", "react"
        self._answer_start: int | None = None

    def feed(self, delta: str) -> str:
        """Add generated text; the answer text that can be shown now."""
        self.text += delta
        return self._release(final=False)

    def finish(self) -> tuple[str, ParsedReply]:
        """The answer text not yet shown, and the parsed reply."""
        parsed = parse_reply(self.text, self.tools)
        rest = ""
        if not parsed.has_calls:
            rest = self._release(final=True)
        return rest, parsed

    def _release(self, final: bool) -> str:
        stripped = self.text.lstrip()
        if self._mode is None:
            lowered = stripped.lower()
            if not lowered:
                return ""
            if any(lowered.startswith(k) or k.startswith(lowered[: len(k)]) for k in _REACT_STARTS):
                if len(lowered) < 14 and not final:
                    return ""  # still a prefix of a keyword
                self._mode = "react" if _KEYWORD_RE.match(stripped) else "plain"
            else:
                self._mode = "plain"
        if self._mode == "react":
            if self._answer_start is None:
                match = re.search(rf"(?:^|\n)Final[ \t]*Answer{_COLON}[ \t]*", self.text, re.IGNORECASE)
                if match is None or re.search(r"(?:^|\n)Action[ \t]*[:：]", self.text[: match.start()]):
                    if final and match is None and not re.search(r"(?:^|\n)Action", self.text):
                        # A ReAct-looking reply with no action and no final answer: all of it is the answer.
                        self._answer_start = len(self.text) - len(stripped)
                    else:
                        return ""
                else:
                    self._answer_start = match.end()
            return self._emit(self.text[self._answer_start :], final)
        # plain text: stop streaming if an Action appears
        if re.search(r"(?:^|\n)Action[ \t]*[:：]", self.text):
            return ""
        return self._emit(stripped, final)

    def _emit(self, answer: str, final: bool) -> str:
        if not final:
            # Hold back the last line while it could still turn into a keyword or a stop string.
            cut = answer.rfind("\n")
            tail = answer[cut + 1 :] if cut >= 0 else answer
            if cut >= 0 and any(k.startswith(tail.lower()[: len(k)]) for k in ("action", "observation")):
                answer = answer[:cut]
        if final:
            answer = answer.rstrip()
        out = answer[self.emitted :]
        self.emitted = max(self.emitted, len(answer))
        return out


# ---------------------------------------------------------------------------------------------------------------
# The session
# ---------------------------------------------------------------------------------------------------------------

ToolChoice = str | dict[str, Any]


def normalize_tool_choice(tool_choice: Any, tools: Sequence[ToolSpec] = ()) -> ToolChoice:
    """``"auto"``, ``"none"``, ``"required"`` or ``{"type": "function", "function": {"name": ...}}`` from every
    accepted form (None, "any", True, False, a tool's name, the function dict); a named tool must be among
    ``tools``."""
    if tool_choice is None or tool_choice == "auto":
        return "auto"
    if tool_choice is True or tool_choice in ("any", "required"):
        return "required"
    if tool_choice is False or tool_choice == "none":
        return "none"
    if isinstance(tool_choice, str):
        if tool_choice not in {tool.name for tool in tools}:
            raise PromptError(
                f"tool_choice must be 'auto', 'none', 'required' or the name of a bound tool, not {tool_choice!r}."
            )
        tool_choice = {"type": "function", "function": {"name": tool_choice}}
    if isinstance(tool_choice, Mapping):
        name = _choice_name(tool_choice)
        if tools and name not in {tool.name for tool in tools}:
            known = ", ".join(tool.name for tool in tools)
            raise PromptError(f"tool_choice names {name!r}, which is not among the tools ({known}).")
        return {"type": "function", "function": {"name": name}}
    raise PromptError(f"tool_choice must be 'auto', 'none', 'required' or a function dict, not {tool_choice!r}.")


@dataclass(frozen=True)
class PreparedRequest:
    """What to hand to a backend: ``backend.chat(request.messages, **request.generation)``."""

    messages: list[Message]
    generation: dict[str, Any]


@dataclass(frozen=True)
class ToolSession:
    """Tools, a ``tool_choice`` and a ``response_format``, and what follows from them: the prompt, the generation
    settings (stop strings, grammar) and the reading of replies. Build it with :meth:`create`."""

    tools: tuple[ToolSpec, ...] = ()
    tool_choice: ToolChoice = "auto"
    response_format: Grammar | None = None

    @classmethod
    def create(
        cls,
        tools: Sequence[ToolSpec | Mapping[str, Any]] | None = None,
        tool_choice: Any = None,
        response_format: Any = None,
    ) -> ToolSession:
        """Validate and normalise; bad tools, ``tool_choice`` or ``response_format`` raise a :class:`PromptError`
        that names them."""
        specs = tuple(tool if isinstance(tool, ToolSpec) else ToolSpec.from_openai(tool) for tool in tools or ())
        choice = normalize_tool_choice(tool_choice, specs)
        if choice != "auto" and choice != "none" and not specs:
            raise PromptError(f"tool_choice={tool_choice!r} needs tools to choose from; none are given.")
        return cls(specs, choice, grammar_from(response_format))

    @property
    def offered(self) -> tuple[ToolSpec, ...]:
        """The tools the model is told about (only the named one when a call of it is forced; none for "none")."""
        if self.tool_choice == "none":
            return ()
        name = _choice_name(self.tool_choice) if isinstance(self.tool_choice, Mapping) else None
        return tuple(spec for spec in self.tools if name is None or spec.name == name)

    @property
    def may_call(self) -> bool:
        """Whether the reply may be a tool call."""
        return bool(self.offered)

    @property
    def forces_call(self) -> bool:
        """Whether the reply must be a tool call ("required" or a named tool)."""
        return self.may_call and self.tool_choice != "auto"

    def grammar(self) -> Grammar | None:
        """The grammar the reply is generated under, if any."""
        calls = [(spec.name, spec.parameters) for spec in self.offered]
        if self.forces_call:
            return Grammar.tool_call(calls)
        if self.may_call and self.response_format is not None:
            return Grammar.tool_call(calls, answer=self.response_format)
        return self.response_format

    def prepare(self, messages: Sequence[MessageInput], generation: Mapping[str, Any] | None = None) -> PreparedRequest:
        """The messages for the backend (tool instruction and past calls rendered in the ReAct format) and the
        generation settings (``stop`` extended by ``Observation:`` when a tool may be called; ``response_format``
        set to the session's grammar)."""
        settings = dict(generation or {})
        if "response_format" in settings:
            raise PromptError("Give response_format to the ToolSession, not with the generation settings.")
        history = any(_has_tool_turns(message) for message in messages)
        if self.tools or history:
            out = render_tool_messages(messages, self.offered, self.tool_choice if self.offered else None)
        else:
            out = parse_messages(messages)
        if self.may_call:
            stops = settings.get("stop") or []
            stops = [stops] if isinstance(stops, str) else list(stops)
            settings["stop"] = [*stops, *(s for s in STOP_SEQUENCES if s not in stops)]
        grammar = self.grammar()
        if grammar is not None:
            settings["response_format"] = grammar
        return PreparedRequest(out, settings)

    def parse(self, text: str) -> ParsedReply:
        """The reply as the ReAct format when tools were offered (calls of unknown tools are invalid), else as plain
        text."""
        if not self.may_call:
            return ParsedReply((text or "").strip(), [], [], None)
        return parse_reply(text, self.offered)

    def stream_parser(self) -> ReplyStreamParser:
        """A parser for the reply while it streams."""
        return ReplyStreamParser(self.offered) if self.may_call else _PlainStreamParser()


def _has_tool_turns(message: Any) -> bool:
    if isinstance(message, Message):
        return message.role == "tool" or bool(message.tool_calls)
    return isinstance(message, Mapping) and (
        message.get("role") in ("tool", "function") or bool(message.get("tool_calls"))
    )


class _PlainStreamParser(ReplyStreamParser):
    """Passes text through (no tools offered)."""

    def feed(self, delta: str) -> str:
        self.text += delta
        return delta

    def finish(self) -> tuple[str, ParsedReply]:
        return "", ParsedReply(self.text.strip(), [], [], None)
