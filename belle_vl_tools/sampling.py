"""The generation settings of one request, checked once: the model shared by the runtime, the engine and the server.

:class:`SamplingParams` validates its fields when it is made (a :class:`~belle_vl_tools.errors.SamplingError`
naming the field) and is then passed down as it is: the server translates an OpenAI request into one,
:class:`~belle_vl_tools.engine.BatchEngine` decodes with it, and :class:`~belle_vl_tools.runtime.BelleVL` builds it
from its keyword arguments (:meth:`SamplingParams.from_kwargs`) before filling in transformers' ``GenerationConfig``.
No torch here: the model is plain data.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import SamplingError

__all__ = ["ENGINE_ONLY", "SEED_MAX", "SEED_MIN", "SamplingParams"]

#: Seeds ``torch.Generator.manual_seed`` accepts.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
#: Settings that only the batching engine honours (transformers' ``generate`` has no equivalent).
ENGINE_ONLY = ("presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "processors")
#: Another name a caller may use for a field (OpenAI's ``max_tokens``).
_ALIASES = {"max_tokens": "max_new_tokens"}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class SamplingParams:
    """Per-request generation settings; ``None`` takes the checkpoint's generation_config.json value.

    * ``max_new_tokens`` (>= 1): the longest answer, in tokens.
    * ``temperature`` 0 is greedy; ``top_p`` in (0, 1]; ``top_k`` 0 means no top-k.
    * ``seed``: sampling draws from a generator seeded with it (reproducible; in the engine, in any batch).
    * ``presence_penalty`` / ``frequency_penalty`` (-2 to 2) follow OpenAI: the logit of a token already generated
      ``c`` times drops by ``presence_penalty + c * frequency_penalty``.
    * ``repetition_penalty`` (> 0) follows transformers: logits of tokens in the prompt or the answer are divided
      by it (multiplied when negative).
    * ``logit_bias`` (token id -> -100 to 100) is added to the logits.
    * ``stop``: strings that end the answer (not included in it).
    * ``logprobs`` / ``top_logprobs`` (0 to 20): log-probabilities of the chosen tokens (log-softmax of the
      model's logits, before any processing) and of the most likely alternatives.
    * ``processors``: callables ``(generated_ids, logits) -> logits`` applied last, before the token is chosen
      (:class:`~belle_vl_tools.engine.RowProcessor`).
    * ``response_format``: structured output, anything :func:`~belle_vl_tools.constrained.grammar_from` takes
      (``{"type": "json_object"}``, OpenAI's ``json_schema`` form, a JSON schema dict, a pydantic model class or a
      :class:`~belle_vl_tools.constrained.Grammar`); checked where the grammar is built.

    The settings in :data:`ENGINE_ONLY` need the batching engine; :class:`~belle_vl_tools.runtime.BelleVL` refuses
    them, naming them. Invalid values raise :class:`~belle_vl_tools.errors.SamplingError` (a ``PromptError`` and a
    ``ValueError``) whose ``param`` names the field.
    """

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    processors: list[Callable[[list[int], Any], Any]] = field(default_factory=list)
    response_format: Any = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`SamplingError` naming the first invalid field (``stop`` and ``processors`` are normalised
        to lists)."""

        def bad(name: str, rule: str) -> SamplingError:
            return SamplingError(f"Invalid {name}={getattr(self, name)!r}: {rule}.", name)

        if self.max_new_tokens is not None and not (_is_int(self.max_new_tokens) and self.max_new_tokens >= 1):
            raise bad("max_new_tokens", "must be an integer >= 1")
        if self.temperature is not None and not (_is_number(self.temperature) and self.temperature >= 0):
            raise bad("temperature", "must be a finite number >= 0 (0 is greedy)")
        if self.top_p is not None and not (_is_number(self.top_p) and 0 < self.top_p <= 1):
            raise bad("top_p", "must be a number in (0, 1]")
        if self.top_k is not None and not (_is_int(self.top_k) and self.top_k >= 0):
            raise bad("top_k", "must be an integer >= 0 (0 disables top-k)")
        if self.seed is not None and not (_is_int(self.seed) and SEED_MIN <= self.seed <= SEED_MAX):
            raise bad("seed", f"must be an integer from {SEED_MIN} to {SEED_MAX}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not (_is_number(getattr(self, name)) and -2 <= getattr(self, name) <= 2):
                raise bad(name, "must be a number from -2 to 2")
        if self.repetition_penalty is not None and not (
            _is_number(self.repetition_penalty) and self.repetition_penalty > 0
        ):
            raise bad("repetition_penalty", "must be a number > 0 (1 disables it)")
        if not isinstance(self.logit_bias, dict):
            raise bad("logit_bias", "must be a dict of token id -> bias")
        for key, value in self.logit_bias.items():
            if not (_is_int(key) and key >= 0):
                raise SamplingError(f"Invalid logit_bias key {key!r}: token ids are integers >= 0.", "logit_bias")
            if not (_is_number(value) and -100 <= value <= 100):
                raise SamplingError(
                    f"Invalid logit_bias value {value!r} for token {key}: a number from -100 to 100.", "logit_bias"
                )
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, list | tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be a string or a list of non-empty strings")
        self.stop = list(self.stop)
        if not isinstance(self.logprobs, bool):
            raise bad("logprobs", "must be true or false")
        if not (_is_int(self.top_logprobs) and 0 <= self.top_logprobs <= 20):
            raise bad("top_logprobs", "must be an integer from 0 to 20")
        if self.top_logprobs and not self.logprobs:
            raise bad("top_logprobs", "needs logprobs=True")
        if not isinstance(self.processors, list | tuple) or not all(callable(p) for p in self.processors):
            raise bad("processors", "must be a list of callables (generated_ids, logits) -> logits")
        self.processors = list(self.processors)

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> tuple[SamplingParams, dict[str, Any]]:
        """Split keyword arguments into the settings (validated; ``max_tokens`` is ``max_new_tokens``; a ``None``
        value is "not given") and the rest, returned as they are for the caller to place or refuse."""
        names = {f.name for f in dataclasses.fields(cls)}
        known: dict[str, Any] = {}
        rest: dict[str, Any] = {}
        for key, value in kwargs.items():
            name = _ALIASES.get(key, key)
            if name not in names:
                rest[key] = value
            elif value is not None and (name not in known or key == name):  # the field's own name wins
                known[name] = value
        return cls(**known), rest

    def engine_only(self) -> list[str]:
        """The settings given that only the batching engine honours (:data:`ENGINE_ONLY`), in that order."""
        return [name for name in ENGINE_ONLY if getattr(self, name)]

    def as_kwargs(self) -> dict[str, Any]:
        """The settings that are given (not ``None``, not at their neutral default), as keyword arguments of a
        :class:`~belle_vl_tools.backend.Backend`'s ``chat`` / ``stream`` / ``generate_batch``."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or (f.name in ENGINE_ONLY and not value) or (f.name == "stop" and not value):
                continue
            out[f.name] = list(value) if isinstance(value, list) else dict(value) if isinstance(value, dict) else value
        return out

    def for_choice(self, index: int) -> SamplingParams:
        """The settings of choice ``index`` of ``n``: choices of a seeded request get seeds seed, seed+1, ..."""
        seed = self.seed if index == 0 or self.seed is None else (self.seed + index) % 2**63
        return dataclasses.replace(self, seed=seed, processors=list(self.processors))
