"""Fine-tuning data: Qwen-VL's conversation JSON and the package's chat messages, read, checked and labelled.

Two record forms are read, from a ``.json`` file (a list of records) or a ``.jsonl`` file (one record a line):

- Qwen-VL's own fine-tuning format: ``{"id": ..., "conversations": [{"from": "user", "value": "Picture 1:
  <img>cat.png</img>\\nWhat is it?"}, {"from": "assistant", "value": "A cat."}]}``. Pictures are ``<img>path</img>``
  spans in a user value, with the ``Picture N:`` label and the newline ``from_list_format`` writes around them.
- Chat messages, as everywhere else in the package: ``{"messages": [{"role": "user", "content": [{"type":
  "image", "image": "cat.png"}, {"type": "text", "text": "What is it?"}]}, {"role": "assistant", "content":
  "A cat."}]}`` (or the list of messages itself). A first ``system`` message replaces the default system prompt.

Relative picture paths are relative to the data file's folder, and pictures are read under an
:class:`~belle_vl_tools.images.ImagePolicy` (by default: local files inside that folder only). Every record is
checked when the data is loaded; a bad one is reported with its index and either skipped or the cause of a
:class:`FinetuneDataError` (``on_bad="skip"`` or ``"error"``), never dropped silently.

Labels follow Qwen-VL's reference fine-tuning (its ``finetune.py`` ``preprocess``) exactly: the ids are the chat
template's ChatML layout (the default system prompt first), ending with the "\\n" after the last ``<|im_end|>``; a
label is the id itself for the content of assistant messages and for the ChatML frame of every message
(``<|im_start|>``, ``<|im_end|>`` and the "\\n" after it), and -100 everywhere else (the system prompt, the user
messages with their pictures, the role names and the "\\n" after them). Records longer than ``max_length`` are
reported as bad, not cut (a cut could split a picture's span or lose the answer).

No torch here: the collator that makes tensors lives in :mod:`belle_vl_tools.finetune.train`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from PIL import Image

from ..errors import BelleVLError
from ..images import ImagePolicy, load_image
from ..messages import ImagePart, MessageInput, Part, parse_messages

if TYPE_CHECKING:
    from ..processing_qwen_vl import QWenVLProcessor

#: The label of a position that does not count in the loss (transformers' and the reference's ignore index).
IGNORE_INDEX = -100
#: ``<img>path</img>`` in a Qwen-VL value, with the ``Picture N:`` label and the newline around it.
_IMG_SPAN = re.compile(r"(?:Picture \d+: ?)?<img>(.*?)</img>\n?", re.S)
_QWEN_ROLES = {"user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}

OnBad = Literal["skip", "error"]
#: Which positions count: the reference fine-tuning's (assistant content + every turn's ChatML frame), or the
#: assistant content and its closing ``<|im_end|>`` only.
LabelMask = Literal["reference", "assistant"]


class FinetuneDataError(BelleVLError, ValueError):
    """Fine-tuning data that cannot be used (a bad file, or a bad record with ``on_bad="error"``)."""


@dataclass
class BadRecord:
    """A record that was not used: its index in the file (from 0), its ``id`` when it has one, and why."""

    index: int
    reason: str
    id: str | None = None

    def __str__(self) -> str:
        name = f" (id {self.id!r})" if self.id is not None else ""
        return f"record {self.index}{name}: {self.reason}"


@dataclass
class Example:
    """One record ready for the model: ``input_ids``, ``labels`` (-100: not counted) and its loaded pictures."""

    index: int
    input_ids: list[int]
    labels: list[int]
    images: list[Image.Image] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class FinetuneData:
    """The usable examples of a data file, and the records left out (with ``on_bad="skip"``)."""

    examples: list[Example]
    bad: list[BadRecord]
    path: Path | None = None


def _short(obj: Any, limit: int = 80) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[:limit] + "..."


def read_records(path: str | Path) -> list[Any]:
    """The raw records of a ``.json`` (a list) or ``.jsonl`` (one record a line) file."""
    path = Path(path)
    if not path.is_file():
        raise FinetuneDataError(f"{path}: no such data file. Name a .json or .jsonl file of conversations.")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl":
        records: list[Any] = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise FinetuneDataError(f"{path} line {number} is not JSON ({exc.msg}).") from None
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FinetuneDataError(
            f"{path} is not JSON ({exc.msg} at line {exc.lineno}); .jsonl files hold one record a line."
        ) from None
    if not isinstance(data, list):
        raise FinetuneDataError(f"{path} must hold a list of records (Qwen-VL conversations or chat messages).")
    return data


def _qwen_content(value: str) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    pos = 0
    for match in _IMG_SPAN.finditer(value):
        if match.start() > pos:
            parts.append({"type": "text", "text": value[pos : match.start()]})
        parts.append({"type": "image", "image": match.group(1).strip()})
        pos = match.end()
    if pos < len(value) or not parts:
        parts.append({"type": "text", "text": value[pos:]})
    return parts


def record_messages(record: Any) -> list[dict[str, Any]]:
    """A record of either form as chat messages (pictures still as the record names them).

    Raises:
        ValueError: the record is neither form, or a message is malformed (the message says which).
    """
    if isinstance(record, Mapping) and "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list) or not turns:
            raise ValueError("'conversations' must be a non-empty list of {'from', 'value'} turns")
        messages = []
        for j, turn in enumerate(turns):
            if not isinstance(turn, Mapping) or not isinstance(turn.get("value"), str):
                raise ValueError(
                    f"turn {j} must be {{'from': 'user' | 'assistant', 'value': '...'}}, not {_short(turn)}"
                )
            role = _QWEN_ROLES.get(str(turn.get("from")).lower())
            if role is None:
                raise ValueError(f"turn {j} is from {turn.get('from')!r}; use 'user' or 'assistant'")
            content: Any = _qwen_content(turn["value"]) if role == "user" else turn["value"]
            if role == "assistant" and _IMG_SPAN.search(turn["value"]):
                raise ValueError(f"turn {j}: an assistant turn cannot hold a picture (<img>...</img>)")
            messages.append({"role": role, "content": content})
        return messages
    if isinstance(record, Mapping) and "messages" in record:
        record = record["messages"]
    if isinstance(record, list) and record:
        for j, msg in enumerate(record):
            if not isinstance(msg, Mapping) or msg.get("role") not in ("system", "user", "assistant"):
                raise ValueError(
                    f"message {j} must be a dict with a 'role' of system, user or assistant, not {_short(msg)}"
                )
        return [dict(msg) for msg in record]
    raise ValueError(
        "not a conversation: give {'conversations': [{'from', 'value'}, ...]} (Qwen-VL) or "
        "{'messages': [{'role', 'content'}, ...]}"
    )


def _check_order(messages: Sequence[Mapping[str, Any]]) -> None:
    roles = [m["role"] for m in messages]
    if roles and roles[0] == "system":
        roles = roles[1:]
    if "system" in roles:
        raise ValueError("only the first message may be a system message")
    if not roles or roles[0] != "user":
        raise ValueError("the conversation must start with a user message (after an optional system message)")
    if "assistant" not in roles:
        raise ValueError("no assistant message: there is nothing to learn from it")
    for a, b in zip(roles, roles[1:], strict=False):
        if a == b:
            raise ValueError(f"two {a} messages in a row: user and assistant messages must alternate")


def _resolve_sources(messages: list[dict[str, Any]], base: Path | None) -> Sequence[MessageInput]:
    """Messages with relative picture paths made relative to ``base`` (the data file's folder)."""
    if base is None:
        return messages

    def resolved(part: Part) -> Part:
        if isinstance(part, ImagePart) and isinstance(part.source, str):
            if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", part.source):
                path = Path(part.source).expanduser()
                return ImagePart(str(path if path.is_absolute() else base / path))
        return part

    return [
        dataclasses.replace(message, parts=tuple(resolved(part) for part in message.parts))
        for message in parse_messages(messages)
    ]


def label_ids(
    processor: QWenVLProcessor, messages: Sequence[MessageInput], mask: LabelMask = "reference"
) -> tuple[list[int], list[int], list[Any]]:
    """``(input_ids, labels, picture sources)`` of one conversation, laid out and masked as the reference does
    (``mask="reference"``), or with only the assistant content and its closing ``<|im_end|>`` counted
    (``mask="assistant"``: for a model trained that way, such as the demo model, whose predictions of the frame
    tokens were never trained and would dominate the loss)."""
    if mask not in ("reference", "assistant"):
        raise FinetuneDataError(f"mask={mask!r}: use 'reference' (Qwen-VL's fine-tuning labels) or 'assistant'.")
    reference = mask == "reference"
    tokenizer = processor.tokenizer
    chat = processor.prepare(list(messages), add_generation_prompt=False, max_window_size=1 << 62)
    nl = tokenizer.encode_text("\n")
    ids = list(chat.input_ids) + nl
    answers = list(chat.assistant_mask) + [0] * len(nl)
    frame = {tokenizer.im_start_id, tokenizer.im_end_id} if reference else set()
    labels = []
    after_end = False
    for token, answer in zip(ids, answers, strict=True):
        keep = bool(answer) or token in frame or after_end
        labels.append(token if keep else IGNORE_INDEX)
        after_end = reference and token == tokenizer.im_end_id
    return ids, labels, list(chat.sources)


def load_data(
    path: str | Path | Sequence[Any],
    processor: QWenVLProcessor,
    *,
    image_policy: ImagePolicy | None = None,
    on_bad: OnBad = "skip",
    max_length: int = 2048,
    base_dir: str | Path | None = None,
    report: Callable[[BadRecord], None] | None = None,
    label_mask: LabelMask = "reference",
) -> FinetuneData:
    """Read, check, lay out and label every record of a data file (or of a list of records already read).

    ``image_policy`` defaults to local files inside the data file's folder (``base_dir`` for a list of records).
    Each bad record goes to ``report`` (when given) and into :attr:`FinetuneData.bad`; with ``on_bad="error"``
    the first one raises :class:`FinetuneDataError` naming its index instead.
    """
    if label_mask not in ("reference", "assistant"):
        raise FinetuneDataError(f"label_mask={label_mask!r}: use 'reference' or 'assistant'.")
    if on_bad not in ("skip", "error"):
        raise FinetuneDataError(f"on_bad={on_bad!r}: use 'skip' (report and leave the record out) or 'error'.")
    file: Path | None
    base: Path | None
    if isinstance(path, str | Path):
        file = Path(path)
        records = read_records(file)
        base = Path(base_dir) if base_dir is not None else file.resolve().parent
    else:
        file, records = None, list(path)
        base = Path(base_dir) if base_dir is not None else None
    if image_policy is None:
        root = (base or Path.cwd()).resolve()
        image_policy = ImagePolicy(allowed_roots=(root,))
    examples: list[Example] = []
    bad: list[BadRecord] = []
    for index, record in enumerate(records):
        rid = record.get("id") if isinstance(record, Mapping) else None
        try:
            messages = record_messages(record)
            _check_order(messages)
            ids, labels, sources = label_ids(processor, _resolve_sources(messages, base), label_mask)
            if len(ids) > max_length:
                raise ValueError(f"{len(ids)} tokens, more than max_length {max_length} (records are never cut)")
            images = [load_image(source, image_policy) for source in sources]
        except (ValueError, OSError) as exc:  # the package's typed errors are ValueErrors or OSErrors too
            item = BadRecord(index, str(exc).strip() or type(exc).__name__, None if rid is None else str(rid))
            if on_bad == "error":
                where = f" of {file}" if file is not None else ""
                raise FinetuneDataError(
                    f"Bad {item}{where}. Fix or remove it, or skip bad records (on_bad='skip', --on-bad skip)."
                ) from None
            bad.append(item)
            if report is not None:
                report(item)
            continue
        examples.append(Example(index, ids, labels, images))
    if not examples:
        raise FinetuneDataError(
            f"No usable record in {file or 'the data'} ({len(records)} read, {len(bad)} bad"
            + (f"; first: {bad[0]}" if bad else "")
            + ")."
        )
    return FinetuneData(examples, bad, file)
