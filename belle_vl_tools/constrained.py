"""Structured output by construction: constrained decoding with xgrammar.

What the answer must look like is described by a :class:`Grammar` (torch-free, hashable, serialisable):

* ``Grammar.json_object()``: any JSON object (OpenAI's ``response_format={"type": "json_object"}``);
* ``Grammar.json_schema(schema)``: JSON valid under a JSON schema (``{"type": "json_schema", ...}`` or a pydantic
  model);
* ``Grammar.tool_call(tools)``: one tool call in Qwen's ReAct format, ``Thought: ...\\nAction: <name>\\nAction Input:
  <JSON>``, the name one of the allowed tools and the JSON valid under that tool's parameter schema.

:func:`grammar_from` reads every accepted form of ``response_format``. At generation time the grammar is compiled for
the model's vocabulary (once per tokenizer and grammar; both are cached) and applied token by token:

* :func:`logits_processor` gives a transformers ``LogitsProcessor`` for ``model.generate`` (one grammar state per
  batch row);
* :class:`RowProcessor` serves one row of a batching engine: ``processor(generated_ids, logits) -> logits``.

At every step only tokens that keep the output a prefix of the grammar's language may be chosen, and the end tokens
(``<|im_end|>``, ``<|endoftext|>``) are allowed only once the output is complete, so the model also stops. When the
token budget (``max_new_tokens``) is about to run out, the processor completes the output by the shortest way it
finds (closing strings, arrays and objects, taking forced text), so even a random model returns valid JSON.

Engine: xgrammar (see docs/structured-output.md for why it was chosen over llguidance). The grammar descriptions
here import only the standard library; torch and xgrammar are imported when a grammar is compiled.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import sys
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .errors import BelleVLError, PromptError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "LIMITS",
    "Grammar",
    "GrammarBusyError",
    "GrammarError",
    "GrammarLimitError",
    "GrammarLimits",
    "RowProcessor",
    "check_schema",
    "compile_grammar",
    "compile_grammar_async",
    "grammar_from",
    "logits_processor",
    "parse_json_output",
    "set_limits",
]

#: How many tokens before the end of the budget the processor starts checking that the output can still be closed.
CLOSING_WINDOW = 64
#: Tokens kept in reserve beyond the shortest closing found (one model token may open several nested values).
CLOSING_MARGIN = 8
#: How many of the model's likeliest allowed tokens are compared at a choice while closing.
LOOKAHEAD = 4
#: Compiled grammars kept per tokenizer.
CACHE_SIZE = 64

_JSON_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")


class GrammarError(BelleVLError):
    """The output could not follow the grammar (a token outside it was chosen), or the grammar cannot be compiled."""


# ---------------------------------------------------------------------------------------------------------------
# Grammar descriptions (torch-free)
# ---------------------------------------------------------------------------------------------------------------


def _schema_text(schema: Any, what: str, param: str = "response_format", totals: _Totals | None = None) -> str:
    """A JSON schema as canonical JSON text (sorted keys are not used: property order is the output order), checked
    against :data:`LIMITS` (:func:`check_schema`)."""
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        schema = schema.model_json_schema()
    if not isinstance(schema, Mapping):
        raise PromptError(f"{what} must be a JSON schema (a dict) or a pydantic model class, not {schema!r:.80}.")
    if _json_depth(schema, 4 * LIMITS.max_depth) is None:  # before json.dumps, which recurses
        raise GrammarLimitError(f"{what} is nested more than {4 * LIMITS.max_depth} levels deep.", "max_depth", param)
    try:
        text = json.dumps(schema, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise PromptError(f"{what} is not a JSON-serialisable schema: {exc}.") from None
    if len(text) > LIMITS.max_schema_chars:
        raise GrammarLimitError(
            f"{what} is {len(text):,} characters of JSON, over the limit of {LIMITS.max_schema_chars:,}.",
            "max_schema_chars",
            param,
        )
    check_schema(json.loads(text), what, param, totals=totals)
    return text


@dataclass(frozen=True)
class Grammar:
    """What the model's answer must match. Build one with :meth:`json_object`, :meth:`json_schema`,
    :meth:`tool_call` or :func:`grammar_from`."""

    kind: Literal["json_object", "json_schema", "tool_call"]
    #: The JSON schema as JSON text (``json_schema``).
    schema: str | None = None
    #: ``(tool name, parameter schema as JSON text)`` of each allowed tool (``tool_call``).
    tools: tuple[tuple[str, str], ...] = ()
    #: The schema's name (from ``response_format.json_schema.name``), informative only.
    name: str | None = None
    #: ``tool_call`` only: the alternative to a call, ``Final Answer: `` and JSON of this (json) grammar.
    answer: Grammar | None = None

    @classmethod
    def json_object(cls) -> Grammar:
        """Any JSON object."""
        return cls("json_object")

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | type, name: str | None = None) -> Grammar:
        """JSON valid under ``schema`` (a JSON schema dict or a pydantic model class)."""
        if name is None and isinstance(schema, type):
            name = schema.__name__
        return cls("json_schema", schema=_schema_text(schema, "The JSON schema"), name=name)

    @classmethod
    def tool_call(cls, tools: Sequence[tuple[str, Mapping[str, Any]]], answer: Grammar | None = None) -> Grammar:
        """One ReAct tool call of one of ``tools`` (``(name, parameters schema)`` pairs): ``Thought: ...\nAction:
        name\nAction Input: {...}``. With ``answer`` (a JSON grammar), ``Thought: ...\nFinal Answer: <JSON>`` is
        the other choice."""
        if not tools:
            raise PromptError("A tool-call grammar needs at least one tool.")
        if answer is not None and answer.kind == "tool_call":
            raise PromptError("The answer of a tool-call grammar must be a JSON grammar.")
        totals = _Totals()  # the limits hold for all the tools together
        specs = tuple((name, _schema_text(p, f"Tool {name!r}'s parameters", "tools", totals)) for name, p in tools)
        return cls("tool_call", tools=specs, answer=answer)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form (for sending a grammar to a server); :meth:`from_dict` reads it back."""
        out: dict[str, Any] = {"kind": self.kind}
        if self.schema is not None:
            out["schema"] = json.loads(self.schema)
        if self.tools:
            out["tools"] = [{"name": n, "parameters": json.loads(p)} for n, p in self.tools]
        if self.name:
            out["name"] = self.name
        if self.answer is not None:
            out["answer"] = self.answer.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Grammar:
        kind = data.get("kind")
        if kind == "json_object":
            return cls.json_object()
        if kind == "json_schema":
            return cls.json_schema(data.get("schema"), data.get("name"))  # type: ignore[arg-type]
        if kind == "tool_call":
            answer = cls.from_dict(data["answer"]) if data.get("answer") else None
            return cls.tool_call([(t["name"], t.get("parameters") or {}) for t in data.get("tools") or []], answer)
        raise PromptError(f"Unknown grammar kind {kind!r}: use json_object, json_schema or tool_call.")


def grammar_from(response_format: Any) -> Grammar | None:
    """The grammar a ``response_format`` asks for; None for plain text.

    Accepted: None or ``{"type": "text"}`` (no constraint); ``{"type": "json_object"}``; ``{"type": "json_schema",
    "json_schema": {"name": ..., "schema": {...}, "strict": ...}}`` (OpenAI's form); a pydantic model class; a bare
    JSON schema dict; a :class:`Grammar`. Anything else is refused with a :class:`PromptError` naming
    ``response_format``.
    """
    if response_format is None or isinstance(response_format, Grammar):
        return response_format
    if isinstance(response_format, type) and hasattr(response_format, "model_json_schema"):
        return Grammar.json_schema(response_format)
    if not isinstance(response_format, Mapping):
        raise PromptError(
            "response_format must be {'type': 'json_object'}, {'type': 'json_schema', 'json_schema': {'schema': "
            f"...}}}}, a JSON schema dict or a pydantic model class, not {response_format!r:.80}."
        )
    kind = response_format.get("type")
    if kind == "text" and len(response_format) == 1:
        return None
    if kind == "json_object":
        return Grammar.json_object()
    if kind == "json_schema" and "json_schema" in response_format:
        spec = response_format["json_schema"]
        if not isinstance(spec, Mapping) or not isinstance(spec.get("schema"), Mapping):
            raise PromptError(
                "response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}; the schema is "
                "missing or not a dict."
            )
        name = spec.get("name")
        return Grammar.json_schema(spec["schema"], name if isinstance(name, str) else None)
    if kind in _JSON_TYPES or any(k in response_format for k in ("properties", "anyOf", "oneOf", "$ref", "enum")):
        return Grammar.json_schema(response_format)
    raise PromptError(
        f"Unsupported response_format type {kind!r}: use 'text', 'json_object' or 'json_schema' (or pass a JSON "
        "schema dict or a pydantic model class)."
    )


def parse_json_output(text: str) -> Any:
    """The JSON value of a constrained answer; a :class:`GrammarError` when it is not complete JSON (the answer
    was cut by ``max_new_tokens`` or a stop string)."""
    try:
        return json.loads(text)
    except ValueError as exc:
        raise GrammarError(
            f"The answer is not complete JSON ({exc}); raise max_new_tokens or remove stop strings that cut it."
        ) from None


# ---------------------------------------------------------------------------------------------------------------
# Limits: what a grammar may cost, checked before anything is compiled
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GrammarLimits:
    """How much work one grammar may cause. The schema limits are checked when a :class:`Grammar` is built (and
    again before compiling); the budgets bound what the checks cannot foresee.

    xgrammar has no limits of its own: a schema without a finite instance makes its jump-forward search run without
    end (memory grows until the process dies), a repeated regex is expanded in full, and compile time grows with
    the square of an object's optional properties. See docs/structured-output.md for the measurements.
    """

    #: Characters of one schema's JSON text.
    max_schema_chars: int = 131_072
    #: Subschemas nested in one another (objects in objects, items of items, ...).
    max_depth: int = 32
    #: Object properties in all the schemas of one grammar.
    max_properties: int = 500
    #: ``enum`` values in all the schemas of one grammar.
    max_enum_values: int = 1_000
    #: ``$ref`` uses in all the schemas of one grammar.
    max_refs: int = 128
    #: Characters of one ``pattern``.
    max_pattern_chars: int = 1_000
    #: Size of one ``pattern`` once its repetitions are written out (``(a{100}){100}`` is 10,000).
    max_pattern_size: int = 10_000
    #: Characters of the shortest JSON a schema (and each of its subschemas) allows.
    max_shortest_output: int = 65_536
    #: Seconds one grammar may take to compile; past them the request fails and the grammar is refused at once
    #: from then on.
    compile_seconds: float = 10.0
    #: Bytes a compiled grammar may hold (xgrammar's ``memory_size_bytes``).
    max_grammar_bytes: int = 64 * 1024 * 1024
    #: Seconds of grammar matching (masks, closing) one answer may take in all.
    matcher_seconds: float = 10.0
    #: Compilations past their deadline (still running on their threads) before new ones are refused as busy.
    max_overdue_compiles: int = 2


#: The limits in force (replace with :func:`set_limits`).
LIMITS = GrammarLimits()


def set_limits(limits: GrammarLimits) -> GrammarLimits:
    """Put ``limits`` in force for every grammar built or compiled from now on; returns the previous ones."""
    global LIMITS
    if not isinstance(limits, GrammarLimits):
        raise TypeError(f"set_limits takes a GrammarLimits, not {limits!r:.80}.")
    previous, LIMITS = LIMITS, limits
    return previous


class GrammarLimitError(GrammarError, PromptError):
    """A grammar would cost more than :data:`LIMITS` allow. ``limit`` names the :class:`GrammarLimits` field,
    ``param`` the request field it came from (``response_format`` or ``tools``)."""

    def __init__(self, message: str, limit: str, param: str | None = None) -> None:
        super().__init__(message)
        self.limit = limit
        self.param = param


class GrammarBusyError(GrammarError):
    """Too many grammar compilations are running past their deadline; retry later."""


_INF = float("inf")
#: Subschemas the shortest-instance analysis may visit (a 128 KiB schema has some 10,000).
_MAX_VISITS = 1_000_000
#: Keywords whose value is one subschema, a list of them, or a dict of them.
_ONE_SCHEMA = (
    "additionalProperties",
    "items",
    "not",
    "if",
    "then",
    "else",
    "contains",
    "propertyNames",
    "unevaluatedProperties",
    "unevaluatedItems",
    "additionalItems",
)
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_SCHEMA_DICTS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


class _Totals:
    """Counts shared by the schemas of one grammar (a tool call's tools)."""

    def __init__(self) -> None:
        self.properties = 0
        self.enum_values = 0
        self.refs = 0


def _json_depth(value: Any, limit: int) -> int | None:
    """The nesting depth of a JSON value, or None once it passes ``limit`` (iterative: no recursion)."""
    stack = [(value, 1)]
    deepest = 0
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return None
        deepest = max(deepest, depth)
        children = item.values() if isinstance(item, Mapping) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, Mapping | list))
    return deepest


def _regex_cost(pattern: str) -> tuple[float, float]:
    """(size with repetitions written out, length of the shortest match) of a regular expression, as Python reads
    it; a pattern Python cannot read is costed by its length times every ``{n}`` count in it."""
    # the standard library's own regex parser, for its structure only (re._parser since Python 3.11)
    if sys.version_info >= (3, 11):
        from re import _constants as c
        from re import _parser
    else:
        import sre_constants as c
        import sre_parse as _parser

    repeats = (c.MAX_REPEAT, c.MIN_REPEAT, getattr(c, "POSSESSIVE_REPEAT", c.MAX_REPEAT))

    def walk(items: Any) -> tuple[float, float]:
        size, shortest = 0.0, 0.0
        for op, arg in items:
            if op in repeats:
                low, high, sub = arg
                inner, least = walk(sub)
                copies = high if high != c.MAXREPEAT else low + 1
                size += inner * max(1, copies)
                shortest += least * low
            elif op is c.SUBPATTERN:
                inner, least = walk(arg[-1])
                size, shortest = size + inner, shortest + least
            elif op is c.BRANCH:
                parts = [walk(branch) for branch in arg[1]]
                size += sum(p[0] for p in parts)
                shortest += min((p[1] for p in parts), default=0.0)
            elif op in (c.ASSERT, c.ASSERT_NOT):
                size += walk(arg[1])[0]
            elif op is c.AT:
                continue
            else:  # a literal, a class, any character, a back reference
                size, shortest = size + 1, shortest + 1
        return size, shortest

    try:
        return walk(_parser.parse(pattern))
    except Exception:  # noqa: BLE001 - a syntax Python lacks (xgrammar reads ECMAScript regexes): bound it coarsely
        product = 1.0
        for match in re.finditer(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}", pattern):
            product *= max(1, int(match.group(2) or match.group(1)))
        return len(pattern) * product, 0.0


class _SchemaCheck:
    """Checks one JSON schema against :class:`GrammarLimits` before it is compiled: size, nesting, counts, regex
    cost, and that every subschema has a finite instance no longer than ``max_shortest_output`` (the length of the
    shortest JSON it allows, following ``$ref`` to a fixed point). The last rule is what keeps xgrammar's
    jump-forward search finite."""

    def __init__(self, schema: Mapping[str, Any], what: str, param: str, limits: GrammarLimits, totals: _Totals):
        self.root = schema
        self.what = what
        self.param = param
        self.limits = limits
        self.totals = totals
        self.targets: dict[str, Any] = {}  # local $ref -> the subschema it names
        self.shortest: dict[str, float] = {}  # local $ref -> the shortest instance found so far
        self.visits = 0

    def fail(self, message: str, limit: str) -> GrammarLimitError:
        return GrammarLimitError(f"{self.what} {message}", limit, self.param)

    def run(self) -> None:
        limits = self.limits
        if _json_depth(self.root, 4 * limits.max_depth) is None:
            raise self.fail(f"is nested more than {4 * limits.max_depth} levels deep.", "max_depth")
        self._scan(self.root, "#", 0)
        for _ in range(len(self.targets) + 1):  # shortest instances of the $ref targets, to a fixed point
            changed = False
            for ref, target in self.targets.items():
                value = self._shortest(target, ref, flag=False)
                if value < self.shortest[ref]:
                    self.shortest[ref], changed = value, True
            if not changed:
                break
        self._shortest(self.root, "#", flag=True)
        for ref, target in self.targets.items():
            self._shortest(target, ref, flag=True)

    # --- counts, nesting, patterns, references ----------------------------------------------------------------
    def _scan(self, node: Any, path: str, depth: int) -> None:
        limits, totals = self.limits, self.totals
        if not isinstance(node, Mapping):
            return
        if depth > limits.max_depth:
            raise self.fail(f"nests subschemas more than {limits.max_depth} deep (at {_where(path)}).", "max_depth")
        properties = node.get("properties")
        if isinstance(properties, Mapping):
            totals.properties += len(properties)
            if totals.properties > limits.max_properties:
                raise self.fail(
                    f"has more than {limits.max_properties} object properties in all (at {_where(path)}/properties): "
                    "split the request or use fewer fields.",
                    "max_properties",
                )
        enum = node.get("enum")
        if isinstance(enum, list):
            totals.enum_values += len(enum)
            if totals.enum_values > limits.max_enum_values:
                raise self.fail(
                    f"has more than {limits.max_enum_values} enum values in all (at {_where(path)}/enum).",
                    "max_enum_values",
                )
        patterns = [(f"{path}/pattern", node.get("pattern"))]
        if isinstance(node.get("patternProperties"), Mapping):
            patterns += [(f"{path}/patternProperties", key) for key in node["patternProperties"]]
        for where, pattern in patterns:
            if isinstance(pattern, str):
                self._check_pattern(pattern, where)
        ref = node.get("$ref")
        if isinstance(ref, str):
            totals.refs += 1
            if totals.refs > limits.max_refs:
                raise self.fail(f"uses $ref more than {limits.max_refs} times (at {_where(path)}).", "max_refs")
            if ref.startswith("#") and ref not in self.targets:
                self.targets[ref] = self._resolve(ref, path)
                self.shortest[ref] = _INF
        for key in _ONE_SCHEMA:
            if isinstance(node.get(key), Mapping):
                self._scan(node[key], f"{path}/{key}", depth + 1)
        for key in _SCHEMA_LISTS:
            if isinstance(node.get(key), list):
                for i, child in enumerate(node[key]):
                    self._scan(child, f"{path}/{key}/{i}", depth + 1)
        for key in _SCHEMA_DICTS:
            if isinstance(node.get(key), Mapping):
                for name, child in node[key].items():
                    self._scan(child, f"{path}/{key}/{_pointer_part(name)}", depth + (key in ("properties",)))

    def _check_pattern(self, pattern: str, where: str) -> None:
        limits = self.limits
        if len(pattern) > limits.max_pattern_chars:
            raise self.fail(
                f"has a pattern of {len(pattern):,} characters at {_where(where)}, over the limit of "
                f"{limits.max_pattern_chars:,}.",
                "max_pattern_chars",
            )
        size, _ = _regex_cost(pattern)
        if size > limits.max_pattern_size:
            raise self.fail(
                f"has a pattern at {_where(where)} ({_short(pattern)}) whose repetitions expand to about {size:,.0f} "
                f"elements, over the limit of {limits.max_pattern_size:,}: use smaller repetition counts.",
                "max_pattern_size",
            )

    def _resolve(self, ref: str, path: str) -> Any:
        node: Any = self.root
        for part in ref[1:].split("/")[1:] if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, Mapping) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise PromptError(f"{self.what} has a $ref {_short(ref)} at {_where(path)} that names nothing in it.")
        return node

    # --- the shortest instance -----------------------------------------------------------------------------------
    def _shortest(self, node: Any, path: str, *, flag: bool) -> float:
        """Characters of the shortest JSON ``node`` allows (infinite: none). With ``flag``, a subschema without a
        finite instance, or with too long a shortest one, is refused naming its path."""
        self.visits += 1
        if self.visits > _MAX_VISITS:  # references into references: bound the analysis itself
            raise self.fail(
                f"has references too intertwined to check (over {_MAX_VISITS:,} subschema visits following $ref): "
                "use fewer $ref, each to a $defs entry.",
                "max_refs",
            )
        value = self._measure(node, path, flag)
        if flag and isinstance(node, Mapping):
            if value == _INF:
                raise self.fail(
                    f"allows no finite JSON at {_where(path)}: it requires itself without end (a required property, or "
                    "minItems, leads back to it through $ref). Make the recursive part optional.",
                    "max_shortest_output",
                )
            if value > self.limits.max_shortest_output:
                raise self.fail(
                    f"needs at least {value:,.0f} characters of JSON at {_where(path)}, over the limit of "
                    f"{self.limits.max_shortest_output:,}.",
                    "max_shortest_output",
                )
        return value

    def _measure(self, node: Any, path: str, flag: bool) -> float:
        if node is True or not isinstance(node, Mapping):
            return 4.0  # null; a malformed subschema is left to the compiler's own message
        if not node:
            return 4.0
        if isinstance(node.get("$ref"), str):
            return self.shortest.get(node["$ref"], 4.0)  # each target is checked on its own (see run)
        if "const" in node:
            return float(len(json.dumps(node["const"], default=str)))
        if isinstance(node.get("enum"), list):
            return min((float(len(json.dumps(v, default=str))) for v in node["enum"]), default=_INF)
        sub = lambda child, where: self._shortest(child, where, flag=flag)  # noqa: E731
        for key in ("anyOf", "oneOf"):
            if isinstance(node.get(key), list):
                values = [sub(child, f"{path}/{key}/{i}") for i, child in enumerate(node[key])]
                return min(values, default=_INF)
        if isinstance(node.get("allOf"), list):
            values = [sub(child, f"{path}/allOf/{i}") for i, child in enumerate(node["allOf"])]
            return max(values, default=4.0)
        types = node.get("type")
        if types is None:
            types = "object" if "properties" in node or "required" in node else None
            types = types or ("array" if "items" in node or "prefixItems" in node else "any")
        if isinstance(types, list):
            return min((self._typed(node, t, path, flag) for t in types), default=_INF)
        return self._typed(node, types, path, flag)

    def _typed(self, node: Mapping[str, Any], kind: Any, path: str, flag: bool) -> float:
        sub = lambda child, where: self._shortest(child, where, flag=flag)  # noqa: E731
        if kind == "object":
            properties = found if isinstance(found := node.get("properties"), Mapping) else {}
            required = [r for r in node.get("required") or [] if isinstance(r, str)]
            extra = node.get("additionalProperties", True)
            total = 2.0
            for name, child in properties.items():
                value = sub(child, f"{path}/properties/{_pointer_part(name)}")
                if name in required:
                    total += len(json.dumps(name)) + 2 + value + 2
            for name in required:
                if name not in properties:
                    total += len(json.dumps(name)) + 2 + sub(extra, f"{path}/additionalProperties") + 2
            more = node.get("minProperties")
            if isinstance(more, int) and more > len(required):
                total += (more - len(required)) * 8.0
            return total
        if kind == "array":
            prefix = found if isinstance(found := node.get("prefixItems"), list) else []
            items = node.get("items", True)
            total = 2.0 + sum(sub(child, f"{path}/prefixItems/{i}") + 2 for i, child in enumerate(prefix))
            least = found if isinstance(found := node.get("minItems"), int) else 0
            item = sub(items, f"{path}/items") if isinstance(items, Mapping | bool) else 4.0
            if items is False:
                item = _INF
            more = max(0, least - len(prefix))
            return total + (more * (item + 2) if more else 0.0)
        if kind == "string":
            least = found if isinstance(found := node.get("minLength"), int) else 0
            pattern = node.get("pattern")
            shortest = _regex_cost(pattern)[1] if isinstance(pattern, str) else 0.0
            return 2.0 + max(float(least), shortest, 24.0 if "format" in node else 0.0)
        if kind in ("integer", "number"):
            low = node.get("minimum", node.get("exclusiveMinimum", 0))
            return float(len(str(low))) + 1 if isinstance(low, int | float) else 1.0
        return 4.0  # boolean, null, anything


def _where(path: str, limit: int = 100) -> str:
    """A JSON pointer for a message, its middle cut when long."""
    return path if len(path) <= limit else f"{path[: limit // 2]}...{path[-limit // 2 :]}"


def _pointer_part(name: str) -> str:
    return str(name).replace("~", "~0").replace("/", "~1")


def _short(text: str, limit: int = 60) -> str:
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def check_schema(
    schema: Mapping[str, Any],
    what: str = "The JSON schema",
    param: str = "response_format",
    *,
    limits: GrammarLimits | None = None,
    totals: _Totals | None = None,
) -> None:
    """Raise :class:`GrammarLimitError` (naming the limit and where in the schema) when ``schema`` would cost more
    than ``limits`` (default :data:`LIMITS`) allow; a cheap walk of the schema, nothing is compiled."""
    limits = limits or LIMITS
    _SchemaCheck(schema, what, param, limits, totals or _Totals()).run()


# ---------------------------------------------------------------------------------------------------------------
# Compiling (xgrammar)
# ---------------------------------------------------------------------------------------------------------------


def _xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError as exc:  # pragma: no cover - installed with the "local" extra
        raise GrammarError(
            "Constrained decoding (response_format, forced tool calls) needs xgrammar: pip install "
            "'belle-vl-tools[local]'."
        ) from exc
    return xgrammar


class _Kit:
    """What is built once per tokenizer and vocabulary size: xgrammar's tokenizer info and compiler, the end token,
    single-token ids of the text used to close an output, and the compiled grammars (an LRU)."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        xgr = _xgrammar()
        self.vocab_size = vocab_size
        self.stop_ids = _stop_ids(tokenizer)
        self.end_id = getattr(tokenizer, "im_end_id", None) or self.stop_ids[0]
        decoder = getattr(tokenizer, "decoder", None)
        if isinstance(decoder, Mapping) and any(isinstance(v, bytes) for v in list(decoder.values())[:16]):
            # tiktoken-based (QWenTokenizer): ordinary ids are raw bytes; special ids must never match text.
            vocab = [decoder.get(i) for i in range(vocab_size)]
            encoded = [v if isinstance(v, bytes) else b"" for v in vocab]
            self.info = xgr.TokenizerInfo(
                encoded, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=self.stop_ids
            )
        else:
            self.info = xgr.TokenizerInfo.from_huggingface(
                tokenizer, vocab_size=vocab_size, stop_token_ids=self.stop_ids
            )
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1)
        self.tokenizer = tokenizer
        # Closing: end a line, close a string (when text is allowed, as inside one), else close, else the shortest
        # values.
        self.newline, self.quote, self.letter = self._single("\n"), self._single('"'), self._single("a")
        self.priority = [tid for tid in (self._single(t) for t in ("}", "]", '"', "0", "[", "{")) if tid >= 0]
        self.compiled: OrderedDict[Grammar, Any] = OrderedDict()
        self.running: dict[Grammar, _Job] = {}
        self.refused: OrderedDict[Grammar, str] = OrderedDict()  # grammars that ran past their compile budget
        self.overdue = 0  # compilations past their deadline whose threads still run
        self.lock = threading.Lock()

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _single(self, text: str) -> int:
        ids = self.encode(text)
        return ids[0] if len(ids) == 1 else -1

    def compile(self, grammar: Grammar) -> Any:
        """The compiled grammar (cached); waits at most :attr:`GrammarLimits.compile_seconds`."""
        job = self.start(grammar)
        try:
            return job.future.result(timeout=max(0.0, job.deadline - time.monotonic()))
        except concurrent.futures.TimeoutError:
            raise self.overrun(grammar, job) from None

    def start(self, grammar: Grammar) -> _Job:
        """The compilation of ``grammar``: a finished one from the cache, the one already running, or a new one on
        a thread of its own (a daemon: a compilation never holds up the process's exit)."""
        with self.lock:
            hit = self.compiled.get(grammar)
            if hit is not None:
                self.compiled.move_to_end(grammar)
                return _Job.done(hit)
            refused = self.refused.get(grammar)
            if refused is not None:
                raise GrammarLimitError(refused, "compile_seconds", _param(grammar))
            running = self.running.get(grammar)
            if running is not None:
                return running
            if self.overdue >= LIMITS.max_overdue_compiles:
                raise GrammarBusyError(
                    f"{self.overdue} grammar compilations are still running past their deadline; retry in a few "
                    "seconds."
                )
            job = self.running[grammar] = _Job(time.monotonic() + LIMITS.compile_seconds)
        threading.Thread(target=self._run, args=(grammar, job), name="belle-vl-grammar", daemon=True).start()
        return job

    def overrun(self, grammar: Grammar, job: _Job) -> GrammarLimitError:
        """Mark ``job`` as past its deadline: the grammar is refused from now on, its thread counted until it ends."""
        seconds = LIMITS.compile_seconds
        message = (
            f"{_what(grammar)} took longer than {seconds:g} s to compile (GrammarLimits.compile_seconds): use "
            "fewer properties, enum values or alternatives."
        )
        with self.lock:
            if not job.overdue and not job.future.done():
                job.overdue = True
                self.overdue += 1
            self.refused[grammar] = message
            while len(self.refused) > 4 * CACHE_SIZE:
                self.refused.popitem(last=False)
        return GrammarLimitError(message, "compile_seconds", _param(grammar))

    def _run(self, grammar: Grammar, job: _Job) -> None:
        job.future.set_running_or_notify_cancel()
        try:
            check_grammar(grammar)  # again: a Grammar built directly, not through its constructors
            compiled = self._compile(grammar)
            size = int(compiled.memory_size_bytes)
            if size > LIMITS.max_grammar_bytes:
                raise GrammarLimitError(
                    f"{_what(grammar)} compiles to {size / 2**20:,.1f} MiB, over the limit of "
                    f"{LIMITS.max_grammar_bytes / 2**20:,.0f} MiB (GrammarLimits.max_grammar_bytes).",
                    "max_grammar_bytes",
                    _param(grammar),
                )
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
            with self.lock:
                self.running.pop(grammar, None)
                self.overdue -= job.overdue
            job.future.set_exception(exc)
            return
        with self.lock:
            self.running.pop(grammar, None)
            self.overdue -= job.overdue
            if not job.overdue:  # a grammar past its budget is not kept: it stays refused
                self.compiled[grammar] = compiled
                while len(self.compiled) > CACHE_SIZE:
                    self.compiled.popitem(last=False)
        job.future.set_result(compiled)

    def _compile(self, grammar: Grammar) -> Any:
        xgr = _xgrammar()
        try:
            if grammar.kind != "tool_call":
                return self.compiler.compile_grammar(_json_grammar(grammar))
            calls = [
                xgr.Grammar.concat(
                    xgr.Grammar.from_ebnf(f'root ::= "{name}\\nAction Input: "'),
                    xgr.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=True),
                )
                for name, schema in grammar.tools
            ]
            branches = [xgr.Grammar.concat(xgr.Grammar.from_ebnf('root ::= "Action: "'), xgr.Grammar.union(*calls))]
            if grammar.answer is not None:
                final = xgr.Grammar.from_ebnf('root ::= "Final Answer: "')
                branches.append(xgr.Grammar.concat(final, _json_grammar(grammar.answer)))
            thought = xgr.Grammar.from_ebnf('root ::= ("Thought: " [^\\n]* "\\n")?')  # as trained; optional
            return self.compiler.compile_grammar(xgr.Grammar.concat(thought, xgr.Grammar.union(*branches)))
        except (RuntimeError, ValueError) as exc:
            raise PromptError(f"Cannot build a grammar from {_what(grammar, lower=True)}: {_clean(exc)}") from None


class _Job:
    """One compilation: its future and its deadline (monotonic seconds)."""

    def __init__(self, deadline: float) -> None:
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.deadline = deadline
        self.overdue = False

    @classmethod
    def done(cls, compiled: Any) -> _Job:
        job = cls(time.monotonic() + LIMITS.compile_seconds)
        job.future.set_result(compiled)
        return job


#: xgrammar's log prefix (``[12:00:00] /project/cpp/json_schema_converter.cc:5088: ``) and other C++ source places.
_CXX_PLACE = re.compile(r"\[\d{1,2}:\d{2}:\d{2}\]\s*|\S*\.(?:cc|cpp|h|hpp)(?::\d+)+:?\s*")


def _clean(exc: BaseException) -> str:
    """The grammar library's message in our words: its first line, without C++ source paths and log stamps."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    text = _CXX_PLACE.sub("", lines[0] if lines else type(exc).__name__).strip(" :")
    text = text[:1].upper() + text[1:] if text else type(exc).__name__
    return (text if len(text) <= 300 else text[:300] + "...").rstrip(".") + "."


def _param(grammar: Grammar) -> str:
    return "tools" if grammar.kind == "tool_call" else "response_format"


def _what(grammar: Grammar, lower: bool = False) -> str:
    text = "The response_format's JSON schema" if grammar.kind != "tool_call" else "The tools' parameter schemas"
    return text[0].lower() + text[1:] if lower else text


def check_grammar(grammar: Grammar) -> None:
    """:func:`check_schema` for every schema of ``grammar`` (the limits hold for all of them together)."""
    totals = _Totals()
    if grammar.schema is not None:
        check_schema(json.loads(grammar.schema), "The JSON schema", _param(grammar), totals=totals)
    for name, parameters in grammar.tools:
        check_schema(json.loads(parameters), f"Tool {name!r}'s parameters", "tools", totals=totals)
    if grammar.answer is not None:
        check_grammar(grammar.answer)


def _json_grammar(grammar: Grammar) -> Any:
    """The xgrammar grammar of a JSON kind: one line, ``", "`` and ``": "`` between items (as ``json.dumps``)."""
    xgr = _xgrammar()
    if grammar.kind == "json_object":
        return xgr.Grammar.from_json_schema('{"type":"object"}', any_whitespace=False, strict_mode=False)
    return xgr.Grammar.from_json_schema(grammar.schema or "{}", any_whitespace=False, strict_mode=True)


def _stop_ids(tokenizer: Any) -> list[int]:
    eod = getattr(tokenizer, "eod_id", None)
    if eod is not None:
        ids = [getattr(tokenizer, "im_end_id", eod + 2), eod]
    else:
        ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if not ids:
        raise GrammarError("The tokenizer has no end-of-text token, so a constrained answer could never stop.")
    return ids


_KITS: weakref.WeakKeyDictionary[Any, dict[int, _Kit]] = weakref.WeakKeyDictionary()
_KITS_LOCK = threading.Lock()


def _kit(tokenizer: Any, vocab_size: int | None = None) -> _Kit:
    size = int(vocab_size or len(tokenizer))
    with _KITS_LOCK:
        kits = _KITS.setdefault(tokenizer, {})
        kit = kits.get(size)
        if kit is None:
            kit = kits[size] = _Kit(tokenizer, size)
    return kit


def compile_grammar(grammar: Grammar, tokenizer: Any, vocab_size: int | None = None) -> Any:
    """The xgrammar ``CompiledGrammar`` of ``grammar`` for ``tokenizer`` (cached). ``vocab_size``: the width of the
    model's logits (default: the tokenizer's length). Compiles on a thread of its own and waits at most
    :attr:`GrammarLimits.compile_seconds` (then :class:`GrammarLimitError`)."""
    return _kit(tokenizer, vocab_size).compile(grammar)


async def compile_grammar_async(grammar: Grammar, tokenizer: Any, vocab_size: int | None = None) -> Any:
    """:func:`compile_grammar` for asyncio code: the event loop only waits (building the tokenizer's tables, once,
    and compiling both run on threads). Cancelling the wait leaves the compilation to finish for the cache."""
    import asyncio

    kit = await asyncio.to_thread(_kit, tokenizer, vocab_size)
    job = kit.start(grammar)
    if job.future.done():  # cached (asyncio's wrapper of a done future is only done one loop turn later)
        return job.future.result()
    try:
        return await asyncio.wait_for(
            asyncio.shield(asyncio.wrap_future(job.future)), max(0.0, job.deadline - time.monotonic())
        )
    except TimeoutError:
        raise kit.overrun(grammar, job) from None


# ---------------------------------------------------------------------------------------------------------------
# Applying a grammar while decoding
# ---------------------------------------------------------------------------------------------------------------


class RowProcessor:
    """The grammar state of one generated sequence.

    ``processor(generated_ids, logits)``: ``generated_ids`` are the ids generated so far for this row (the prompt
    excluded; every call passes the whole list, the processor reads what is new), ``logits`` the row's 1-D logits
    for the next token. Returns the logits with every token the grammar forbids set to ``-inf`` (in place).
    """

    def __init__(
        self,
        grammar: Grammar,
        tokenizer: Any,
        *,
        vocab_size: int | None = None,
        max_new_tokens: int | None = None,
        compiled: Any = None,
    ) -> None:
        import numpy as np

        xgr = _xgrammar()
        self._kit = _kit(tokenizer, vocab_size)
        self.grammar = grammar
        # ``compiled``: from compile_grammar(_async) beforehand, so that building the processor does no compiling
        self._matcher = xgr.GrammarMatcher(compiled if compiled is not None else self._kit.compile(grammar))
        self._spent = 0.0  # seconds of matching so far (GrammarLimits.matcher_seconds)
        self.max_new_tokens = max_new_tokens
        self._consumed = 0
        self._closing = False
        self._next_check = 0
        self._bitmask = xgr.allocate_token_bitmask(1, self._kit.vocab_size)
        self._words = self._bitmask[0].numpy()  # a view: the bits of the last mask
        self._np = np

    @property
    def finished(self) -> bool:
        """Whether an end token was accepted."""
        return self._matcher.is_terminated()

    @property
    def complete(self) -> bool:
        """Whether the output so far is a complete sentence of the grammar."""
        return self._matcher.is_terminated() or self._matcher.is_completed()

    def advance(self, generated_ids: Sequence[int]) -> None:
        """Feed the ids generated since the last call."""
        for tid in list(generated_ids[self._consumed :]):
            if self._matcher.is_terminated():
                break  # a finished row of a batch is padded
            if not self._matcher.accept_token(int(tid)):
                raise GrammarError(f"Token {int(tid)} does not follow the grammar ({self.grammar.kind}).")
        self._consumed = len(generated_ids)

    def __call__(self, generated_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        self.advance(generated_ids)
        out = self.mask(logits)
        self._spent += time.perf_counter() - started
        if self._spent > LIMITS.matcher_seconds:  # checked between steps: one step is bounded by the schema checks
            raise GrammarLimitError(
                f"Following the grammar took more than {LIMITS.matcher_seconds:g} s of matching for this answer "
                "(GrammarLimits.matcher_seconds): simplify the schema or ask for fewer tokens.",
                "matcher_seconds",
                _param(self.grammar),
            )
        return out

    # --- masking ------------------------------------------------------------------------------------------------
    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """Forbid, in place, what the grammar does not allow next (the logits' last dimension is the vocabulary)."""
        import torch

        if self._matcher.is_terminated():
            return logits
        remaining = None if self.max_new_tokens is None else self.max_new_tokens - self._consumed
        if (
            not self._closing
            and remaining is not None
            and remaining <= CLOSING_WINDOW
            and self._consumed >= self._next_check
        ):
            needed = self._closing_length(remaining)
            slack = -1 if needed is None else remaining - needed - 1 - CLOSING_MARGIN
            self._closing = slack <= 0
            # Measured again after a quarter of the slack: the margin covers what a few tokens can open meanwhile.
            self._next_check = self._consumed + max(1, slack // 4)
        if self._closing:
            token = self._closing_token(self._matcher, logits)
            logits.fill_(float("-inf"))
            logits[..., token] = 0.0
            return logits
        self._matcher.fill_next_token_bitmask(self._bitmask)
        forbidden = torch.from_numpy(self._bits() == 0)
        if logits.device.type != "cpu":
            forbidden = forbidden.to(logits.device, non_blocking=True)
        width, size = logits.shape[-1], self._kit.vocab_size
        if width > size:  # logits wider than the vocabulary: the extra ids are never allowed
            logits[..., size:] = float("-inf")
        logits[..., : min(width, size)].masked_fill_(forbidden[:width], float("-inf"))
        return logits

    def _bits(self) -> Any:
        """The last mask as one uint8 (0 or 1) per id of the vocabulary."""
        np = self._np
        return np.unpackbits(self._words.view(np.uint8), bitorder="little", count=self._kit.vocab_size)

    def _is_allowed(self, token: int) -> bool:
        return bool((int(self._words[token >> 5]) >> (token & 31)) & 1)

    def _closing_token(self, matcher: Any, logits: torch.Tensor | None) -> int:
        """The next token on a short way to a complete output: the end token when complete, else forced text, else
        a closing character, else the model's (or the first) allowed token."""
        if matcher.is_completed():
            return self._kit.end_id
        matcher.fill_next_token_bitmask(self._bitmask)
        forced = matcher.find_jump_forward_string()
        if forced:
            ids = self._kit.encode(forced)
            if ids and self._is_allowed(ids[0]):
                return ids[0]
        kit = self._kit
        if kit.newline >= 0 and self._is_allowed(kit.newline):
            return kit.newline
        if min(kit.quote, kit.letter) >= 0 and self._is_allowed(kit.quote) and self._is_allowed(kit.letter):
            return kit.quote  # inside a string: close it
        for token in kit.priority:
            if self._is_allowed(token):
                return token
        allowed = self._bits()
        first = int(self._np.flatnonzero(allowed)[0])
        if logits is None:  # while measuring a closing: no lookahead
            return first
        # A choice (a tool's name, an enum value, thought or not): of the model's likeliest allowed tokens and the
        # first allowed one, the one with the shortest closing after it (ties: the likeliest).
        import torch

        scores = logits.reshape(-1)[: self._kit.vocab_size].clone()
        scores[torch.from_numpy(allowed == 0).to(scores.device)] = float("-inf")
        top = scores.topk(min(LOOKAHEAD, int(allowed.sum()))).indices.tolist()
        best, best_steps = top[0], None
        for token in [*top, first]:
            probe = matcher.fork()
            if not probe.accept_token(token):  # pragma: no cover - taken from the mask
                continue
            steps = self._closing_length(CLOSING_WINDOW, probe)
            if steps is not None and (best_steps is None or steps < best_steps):
                best, best_steps = token, steps
        matcher.fill_next_token_bitmask(self._bitmask)  # the probes overwrote the mask
        return best

    def _closing_length(self, limit: int, start: Any = None) -> int | None:
        """Tokens the closing way needs from here, or from the matcher ``start`` (None: more than ``limit``)."""
        probe = (start or self._matcher).fork()
        for steps in range(limit):
            if probe.is_completed():
                return steps
            if not probe.accept_token(self._closing_token(probe, None)):  # pragma: no cover - chosen from the mask
                return None
        return None


def logits_processor(
    grammars: Grammar | Sequence[Grammar | None],
    tokenizer: Any,
    *,
    vocab_size: int | None = None,
    max_new_tokens: int | None = None,
) -> Any:
    """A transformers ``LogitsProcessor`` that applies ``grammars`` (one per batch row, or one for every row; None
    leaves a row free) during one ``model.generate`` call. Make a new one for each call."""
    from transformers import LogitsProcessor

    class GrammarLogitsProcessor(LogitsProcessor):
        """Applies a grammar per batch row; the prompt width is taken from the first call."""

        def __init__(self) -> None:
            self.grammars = grammars
            self.rows: list[RowProcessor | None] | None = None
            self.prompt_len = 0

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            if self.rows is None:
                batch = input_ids.shape[0]
                per_row = [grammars] * batch if isinstance(grammars, Grammar) else list(grammars)
                if len(per_row) != batch:
                    raise GrammarError(f"{len(per_row)} grammars for a batch of {batch} rows.")
                self.rows = [
                    None
                    if g is None
                    else RowProcessor(
                        g, tokenizer, vocab_size=vocab_size or scores.shape[-1], max_new_tokens=max_new_tokens
                    )
                    for g in per_row
                ]
                self.prompt_len = input_ids.shape[1]
            for index, row in enumerate(self.rows):
                if row is not None:
                    row(input_ids[index, self.prompt_len :].tolist(), scores[index])
            return scores

    return GrammarLogitsProcessor()
