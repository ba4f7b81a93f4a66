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

import json
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .errors import BelleVLError, PromptError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "Grammar",
    "GrammarError",
    "RowProcessor",
    "compile_grammar",
    "grammar_from",
    "logits_processor",
    "parse_json_output",
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


def _schema_text(schema: Any, what: str) -> str:
    """A JSON schema as canonical JSON text (sorted keys are not used: property order is the output order)."""
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        schema = schema.model_json_schema()
    if not isinstance(schema, Mapping):
        raise PromptError(f"{what} must be a JSON schema (a dict) or a pydantic model class, not {schema!r:.80}.")
    try:
        return json.dumps(schema, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise PromptError(f"{what} is not a JSON-serialisable schema: {exc}.") from None


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
        specs = tuple((name, _schema_text(p, f"Tool {name!r}'s parameters")) for name, p in tools)
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
        self.lock = threading.Lock()

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _single(self, text: str) -> int:
        ids = self.encode(text)
        return ids[0] if len(ids) == 1 else -1

    def compile(self, grammar: Grammar) -> Any:
        with self.lock:
            hit = self.compiled.get(grammar)
            if hit is not None:
                self.compiled.move_to_end(grammar)
                return hit
        compiled = self._compile(grammar)
        with self.lock:
            self.compiled[grammar] = compiled
            while len(self.compiled) > CACHE_SIZE:
                self.compiled.popitem(last=False)
        return compiled

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
            what = "response_format's JSON schema" if grammar.kind != "tool_call" else "a tool's parameter schema"
            raise PromptError(f"Cannot build a grammar from {what}: {exc}".splitlines()[0]) from None


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
    model's logits (default: the tokenizer's length)."""
    return _kit(tokenizer, vocab_size).compile(grammar)


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
        self, grammar: Grammar, tokenizer: Any, *, vocab_size: int | None = None, max_new_tokens: int | None = None
    ) -> None:
        import numpy as np

        xgr = _xgrammar()
        self._kit = _kit(tokenizer, vocab_size)
        self.grammar = grammar
        self._matcher = xgr.GrammarMatcher(self._kit.compile(grammar))
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
        self.advance(generated_ids)
        return self.mask(logits)

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
