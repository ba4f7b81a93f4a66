"""The model card's API: ``model.chat(tokenizer, query, history)``, ``model.chat_stream(...)`` and the query format.

Published Qwen-VL-Chat / Belle-VL model cards call ``model.chat`` with a query string in which pictures are named as
``<img>path-or-url</img>`` (usually written by ``tokenizer.from_list_format``). These functions turn such a query and
its history into chat messages and answer them with a :class:`~belle_vl_tools.runtime.BelleVL` built once per model
and tokenizer. The model class reaches them with an import inside its methods, so the model file never imports the
runtime.

Unlike every other entry point, this API opens what the query names, as the reference does: ``<img>/etc/passwd</img>``
opens that file (and fails, as it is no image; the error tells neither its size nor its content). It reads under
:meth:`ImagePolicy.trusted() <belle_vl_tools.images.ImagePolicy.trusted>` unless ``model.chat(..., image_policy=...)``
names another policy, so a query from an untrusted source needs ``image_policy=ImagePolicy()`` or the chat API.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .errors import PromptError
from .images import ImagePolicy, load_image
from .messages import ImagePart, MessageInput, parse_messages
from .processing_qwen_vl import DEFAULT_SYSTEM, QWenVLImageProcessor, QWenVLProcessor
from .runtime import BelleVL
from .tokenization_qwen_vl import QWenTokenizer

_IMG_IN_QUERY = re.compile(r"(?:Picture \d+: ?)?<img>(.*?)</img>\n?", re.S)
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff"}

#: One runtime per model (weakly held: it goes with the model), rebuilt when another tokenizer is passed.
_RUNTIMES: weakref.WeakKeyDictionary[Any, BelleVL] = weakref.WeakKeyDictionary()
_RUNTIMES_LOCK = threading.Lock()


def query_to_content(query: str) -> list[dict[str, Any]]:
    """Content parts of a model-card query, in the query's order.

    ``<img>path-or-url</img>`` spans (with their ``Picture N:`` label and trailing newline) become image parts and
    the text around them text parts, so ``"Look: Picture 1: <img>a.png</img>\\nWhat changed?"`` gives text, image,
    text. As the model card also shows, a first line that names an existing image file (and no ``<img>`` tag)
    becomes the picture.
    """
    if not isinstance(query, str):
        raise PromptError(f"The query must be a string, not {type(query).__name__}.")
    first, sep, rest = query.partition("\n")
    if sep and "<img>" not in query and _looks_like_image_file(first.strip()):
        return [{"type": "image", "image": first.strip()}, {"type": "text", "text": rest}]
    parts: list[dict[str, Any]] = []
    pos = 0
    for match in _IMG_IN_QUERY.finditer(query):
        if match.start() > pos:
            parts.append({"type": "text", "text": query[pos : match.start()]})
        parts.append({"type": "image", "image": match.group(1).strip()})
        pos = match.end()
    if pos < len(query) or not parts:
        parts.append({"type": "text", "text": query[pos:]})
    return parts


def _looks_like_image_file(line: str) -> bool:
    return bool(line) and len(line) < 4096 and Path(line).suffix.lower() in _IMAGE_SUFFIXES and Path(line).is_file()


def runtime_for(model: Any, tokenizer: QWenTokenizer) -> BelleVL:
    """The runtime behind ``model.chat`` (created once per model and tokenizer).

    As the reference's ``chat``, it reads the local files and URLs the query names (a trusted image policy).
    """
    with _RUNTIMES_LOCK:
        runtime = _RUNTIMES.get(model)
        if runtime is None or runtime.tokenizer is not tokenizer:
            visual = model.config.visual or {}
            image_processor = QWenVLImageProcessor(image_size=visual.get("image_size", 448))
            window = getattr(model.generation_config, "max_window_size", None) or 6144
            processor = QWenVLProcessor(
                image_processor, tokenizer, max_window_size=window, num_image_queries=model.config.num_image_queries
            )
            runtime = BelleVL(model, processor, image_policy=ImagePolicy.trusted())
            _RUNTIMES[model] = runtime
        return runtime


def _history_messages(history: list | None, query: str, system: str) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": system or DEFAULT_SYSTEM}]
    for turn in history or []:
        if not isinstance(turn, list | tuple) or len(turn) != 2:
            raise PromptError("history must be a list of (query, response) pairs, as model.chat returns it.")
        messages.append({"role": "user", "content": query_to_content(turn[0])})
        messages.append({"role": "assistant", "content": turn[1]})
    messages.append({"role": "user", "content": query_to_content(query)})
    return messages


def _model_card_generation(tokenizer: QWenTokenizer, generation: dict[str, Any]) -> dict[str, Any]:
    """The reference chat's extra arguments: ``stop_words_ids`` (lists of ids) become stop strings."""
    generation = dict(generation)
    generation.pop("append_history", None)
    stop_ids = generation.pop("stop_words_ids", None) or []
    stops = [tokenizer.decode(ids) for ids in stop_ids if ids]
    if stops:
        existing = generation.get("stop") or []
        generation["stop"] = [existing] if isinstance(existing, str) else list(existing)
        generation["stop"] += [s for s in stops if s not in ("<|im_end|>", "<|im_start|>", "<|endoftext|>")]
    return generation


def _pictures_under(messages: list[dict[str, Any]], policy: ImagePolicy | None) -> Sequence[MessageInput]:
    """The messages with every picture loaded under ``policy`` (``None``: left to the runtime's trusted policy).

    The query names files and URLs as the reference's ``chat`` reads them: with no ``image_policy`` given, any local
    file is opened, so a query must not come from an untrusted source; pass ``image_policy=ImagePolicy()`` (or
    another restricted policy) to confine what a query may open.
    """
    if policy is None:
        return messages
    if not isinstance(policy, ImagePolicy):
        raise PromptError(f"image_policy must be an ImagePolicy, not {type(policy).__name__}.")
    return [
        dataclasses.replace(
            message,
            parts=tuple(
                ImagePart(load_image(part.source, policy)) if isinstance(part, ImagePart) else part
                for part in message.parts
            ),
        )
        for message in parse_messages(messages)
    ]


def model_card_chat(
    model: Any, tokenizer: QWenTokenizer, query: str, history: list | None, system: str, generation: dict[str, Any]
) -> tuple[str, list]:
    """``model.chat``: the response to ``query`` after ``history``, and the history with this turn appended.

    ``image_policy=`` among the keyword arguments decides what the ``<img>`` tags may open (default: any local
    file, as the reference does; see :func:`_pictures_under`).
    """
    runtime = runtime_for(model, tokenizer)
    policy = generation.pop("image_policy", None)
    messages = _pictures_under(_history_messages(history, query, system), policy)
    result = runtime.chat(messages, **_model_card_generation(tokenizer, generation))
    return result.text, [*(history or []), (query, result.text)]


def model_card_chat_stream(
    model: Any, tokenizer: QWenTokenizer, query: str, history: list | None, system: str, generation: dict[str, Any]
) -> Iterator[str]:
    """``model.chat_stream``: the growing response to ``query`` (``image_policy=`` as for :func:`model_card_chat`)."""
    runtime = runtime_for(model, tokenizer)
    text = ""
    policy = generation.pop("image_policy", None)
    messages = _pictures_under(_history_messages(history, query, system), policy)
    for chunk in runtime.stream(messages, **_model_card_generation(tokenizer, generation)):
        text += chunk.delta
        if chunk.delta:
            yield text


def from_list_format(list_format: Any) -> str:
    """``tokenizer.from_list_format``: see :func:`belle_vl_tools.tokenization_qwen_vl.from_list_format`."""
    from .tokenization_qwen_vl import from_list_format as render

    return render(list_format)


__all__ = ["from_list_format", "model_card_chat", "model_card_chat_stream", "query_to_content", "runtime_for"]
