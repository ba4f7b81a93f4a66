"""Image processor and processor (image processor + tokenizer) for Qwen-VL-architecture checkpoints.

The processor turns chat messages in transformers' format into the token layout of the reference ``make_context``
(ChatML):

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\nPicture 1: <img>[256 image positions]</img>\\nWhat is this?<|im_end|>\\n
    <|im_start|>assistant\\n

Rules (see the tests for a worked example):

* role and content are tokenized separately; turns are joined by "\\n";
* each image of a message is written as ``Picture N: <img>…</img>\\n`` before the message's text, N counting the
  images of that message from 1 (as the reference's ``from_list_format`` does for each query);
* text is text: special-token text typed in a message (``<|im_end|>``, ``<img>``, ...) stays ordinary text, and
  images come only from image parts; the grounding tags ``<ref>``, ``</ref>``, ``<box>``, ``</box>``, ``<quad>``,
  ``</quad>`` are special tokens, as in the reference, so grounding answers re-enter the history unchanged;
* history turns are dropped whole, oldest first, when system + kept history would reach ``max_window_size``;
  the current turn is always kept.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from transformers import BatchFeature, ProcessorMixin
from transformers.image_processing_base import ImageProcessingMixin

from .configuration_qwen_vl import DEFAULT_VISUAL, NUM_IMAGE_QUERIES
from .errors import PromptError
from .images import ImagePolicy, _resolve_local_path, image_digest, load_image
from .tokenization_qwen_vl import QWenTokenizer

DEFAULT_SYSTEM = "You are a helpful assistant."
DEFAULT_MAX_WINDOW_SIZE = 6144
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ROLES = ("system", "user", "assistant")


class QWenVLImageProcessor(ImageProcessingMixin):
    """RGB, bicubic resize to ``image_size`` x ``image_size``, scale to [0, 1], normalize with CLIP's mean/std."""

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        image_size: int = 448,
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.image_size = int(image_size)
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)

    def resize(self, image: Image.Image) -> Image.Image:
        return image.convert("RGB").resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)

    def to_array(self, image: Image.Image) -> np.ndarray:
        """One image as a normalized float32 array [3, S, S]."""
        pixels = np.asarray(self.resize(image), dtype=np.float32) / 255.0
        pixels = (pixels - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return pixels.transpose(2, 0, 1)

    def __call__(self, images: Any, return_tensors: str | None = "pt", **kwargs: Any) -> BatchFeature:
        if not isinstance(images, list | tuple):
            images = [images]
        arrays = [self.to_array(load_image(im)) for im in images]
        data = np.stack(arrays) if arrays else np.zeros((0, 3, self.image_size, self.image_size), np.float32)
        return BatchFeature({"pixel_values": data}, tensor_type=return_tensors)

    preprocess = __call__


@dataclass
class ChatInputs:
    """One conversation laid out for the model."""

    input_ids: list[int]
    images: list[Image.Image] = field(default_factory=list)
    image_digests: list[str] = field(default_factory=list)
    assistant_mask: list[int] = field(default_factory=list)
    dropped_turns: int = 0

    @property
    def num_images(self) -> int:
        return len(self.images)


def _image_source(part: dict[str, Any]) -> Any:
    for key in ("image", "url", "path", "base64"):
        if part.get(key) is not None:
            return part[key] if key != "base64" else {"base64": part[key], "mime_type": part.get("mime_type")}
    raise PromptError(f"Image part {_short(part)} has no image: give it an 'image', 'url', 'path' or 'base64' key.")


def _short(obj: Any, limit: int = 120) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[:limit] + "...'"


def split_content(content: Any) -> tuple[list[str], list[Any]]:
    """The texts and image sources of a message's content (a string, or a list of parts)."""
    if isinstance(content, str):
        return [content], []
    if content is None:
        return [], []
    if not isinstance(content, list | tuple):
        raise PromptError(f"Message content must be a string or a list of parts, not {type(content).__name__}.")
    texts: list[str] = []
    images: list[Any] = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict):
            raise PromptError(f"Content part {_short(part)} must be a dict such as {{'type': 'text', 'text': ...}}.")
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise PromptError(f"Text part {_short(part)} needs a string 'text'.")
            texts.append(part["text"])
        elif kind == "image":
            images.append(_image_source(part))
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise PromptError(f"image_url part {_short(part)} needs {{'image_url': {{'url': ...}}}}.")
            images.append(url)
        else:
            raise PromptError(
                f"Unsupported content part type {kind!r}: use 'text' or 'image' parts "
                "(an image part holds a path, bytes, a data URL, a PIL image or a URL)."
            )
    return texts, images


class QWenVLProcessor(ProcessorMixin):
    """Image processor + tokenizer, with the reference's ChatML layout as ``apply_chat_template``."""

    def __init__(
        self,
        image_processor: QWenVLImageProcessor,
        tokenizer: QWenTokenizer,
        chat_template: str | None = None,
        max_window_size: int = DEFAULT_MAX_WINDOW_SIZE,
        image_policy: ImagePolicy | None = None,
        num_image_queries: int = NUM_IMAGE_QUERIES,
        **kwargs: Any,
    ) -> None:
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.max_window_size = int(max_window_size)
        #: Positions per image between <img> and </img>: config.json's visual.n_queries, 256 when absent.
        self.num_image_queries = int(num_image_queries)
        self.image_policy = image_policy
        self._decoded_files: OrderedDict[tuple, tuple[Image.Image, str]] = OrderedDict()
        self.decoded_files_capacity = 16

    # --- loading ------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> QWenVLProcessor:
        """Build the processor from a checkpoint: ``qwen.tiktoken``, config.json's ``visual`` block and
        generation_config.json's ``max_window_size`` (published checkpoints have no preprocessor_config.json)."""
        kwargs.pop("trust_remote_code", None)
        hub_kwargs = {k: kwargs.pop(k) for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs}
        tokenizer = kwargs.pop("tokenizer", None) or QWenTokenizer.from_pretrained(
            pretrained_model_name_or_path, **hub_kwargs
        )
        config = _read_json(pretrained_model_name_or_path, "config.json", hub_kwargs) or {}
        generation = _read_json(pretrained_model_name_or_path, "generation_config.json", hub_kwargs) or {}
        visual = {**DEFAULT_VISUAL, **(config.get("visual") or {})}
        image_processor = QWenVLImageProcessor(image_size=visual["image_size"])
        max_window = kwargs.pop("max_window_size", generation.get("max_window_size", DEFAULT_MAX_WINDOW_SIZE))
        queries = int(visual.get("n_queries", NUM_IMAGE_QUERIES))
        return cls(image_processor, tokenizer, max_window_size=max_window, num_image_queries=queries, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> list[str]:
        """Write the tokenizer files (the image settings live in config.json, as in published checkpoints)."""
        return list(self.tokenizer.save_pretrained(save_directory))

    # --- images -------------------------------------------------------------------------------------------------
    def load_images(self, sources: Sequence[Any]) -> list[Image.Image]:
        return [self._load(src)[0] for src in sources]

    def _load(self, source: Any) -> tuple[Image.Image, str]:
        """An image and its digest. Files are decoded once while unchanged (same policy, path, mtime and size):
        a picture asked about again is then neither decoded nor hashed again; the policy check still runs."""
        policy = self.image_policy or ImagePolicy.trusted()
        if isinstance(source, str | os.PathLike) and os.path.isfile(source):
            resolved, _ = _resolve_local_path(source, policy)  # raises when the policy refuses the path
            stat = resolved.stat()
            key = (policy, str(resolved), stat.st_mtime_ns, stat.st_size)
            if key in self._decoded_files:
                self._decoded_files.move_to_end(key)
                return self._decoded_files[key]
            image = load_image(source, policy)
            self._decoded_files[key] = entry = (image, image_digest(image))
            while len(self._decoded_files) > self.decoded_files_capacity:
                self._decoded_files.popitem(last=False)
            return entry
        image = load_image(source, policy)
        return image, image_digest(image)

    def pixel_values(self, images: Sequence[Image.Image]) -> Any:
        import torch

        if not images:
            size = self.image_processor.image_size
            return torch.zeros((0, 3, size, size))
        return torch.from_numpy(np.stack([self.image_processor.to_array(im) for im in images]))

    # --- chat layout --------------------------------------------------------------------------------------------
    def _encode_message(self, role: str, texts: list[str], num_images: int) -> tuple[list[int], list[int]]:
        """Tokens of one ``<|im_start|>role\\ncontent<|im_end|>`` block, and where the images go."""
        tok = self.tokenizer
        pieces: list[int] = []
        text = ""
        for n in range(1, num_images + 1):
            pieces += tok.encode_text(text + f"Picture {n}: ")
            pieces += [tok.img_start_id] + [tok.img_pad_id] * self.num_image_queries + [tok.img_end_id]
            text = "\n"
        pieces += tok.encode_text(text + "\n".join(texts))
        head = [tok.im_start_id] + tok.encode_text(role, grounding_tags=False) + tok.encode_text("\n")
        return head + pieces + [tok.im_end_id], [len(head), len(pieces) + 1]

    def prepare(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        system: str | None = None,
        max_window_size: int | None = None,
        load_images: bool = True,
    ) -> ChatInputs:
        """Lay out one conversation; images are loaded (under the processor's image policy) and kept."""
        if not isinstance(messages, list | tuple) or not messages:
            raise PromptError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts.")
        window = int(max_window_size or self.max_window_size)
        nl = self.tokenizer.encode_text("\n")

        # system prompt
        msgs = list(messages)
        for i, msg in enumerate(msgs):
            if not isinstance(msg, dict) or "role" not in msg:
                raise PromptError(f"Message {i} ({_short(msg)}) must be a dict with 'role' and 'content'.")
            if msg["role"] not in ROLES:
                raise PromptError(
                    f"Message {i} has role {msg['role']!r}; use one of {', '.join(ROLES)} "
                    "(tool results go into a user message)."
                )
            if msg["role"] == "system" and i > 0:
                raise PromptError(f"Message {i} is a system message: only the first message may be one.")
        if msgs[0]["role"] == "system":
            sys_texts, sys_images = split_content(msgs.pop(0)["content"])
            if sys_images:
                raise PromptError("The system message cannot hold images: put them in a user message.")
            system = "\n".join(sys_texts)
        if system is None:
            system = DEFAULT_SYSTEM
        system_tokens, _ = self._encode_message("system", [system], 0)
        if not msgs:
            raise PromptError("messages hold only a system message: add a user message.")

        # turns: a user message and what follows it
        turns: list[list[dict[str, Any]]] = []
        for msg in msgs:
            if msg["role"] == "user" or not turns:
                turns.append([])
            turns[-1].append(msg)

        encoded_turns = []
        for turn in turns:
            blocks = []
            for msg in turn:
                texts, sources = split_content(msg.get("content"))
                if sources and msg["role"] != "user":
                    raise PromptError(f"A {msg['role']} message cannot hold images: put them in a user message.")
                tokens, (head_len, content_len) = self._encode_message(msg["role"], texts, len(sources))
                blocks.append((msg["role"], tokens, head_len, sources))
            encoded_turns.append(blocks)

        def turn_length(blocks: list) -> int:
            return sum(len(nl) + len(b[1]) for b in blocks)

        kept = 0
        history_len = 0
        for blocks in reversed(encoded_turns[:-1]):
            size = turn_length(blocks)
            if len(system_tokens) + history_len + size < window:
                history_len += size
                kept += 1
            else:
                break
        chosen = encoded_turns[len(encoded_turns) - 1 - kept :]

        input_ids = list(system_tokens)
        mask = [0] * len(input_ids)
        sources: list[Any] = []
        for blocks in chosen:
            for role, tokens, head_len, srcs in blocks:
                input_ids += nl + tokens
                is_answer = 1 if role == "assistant" else 0
                mask += [0] * (len(nl) + head_len) + [is_answer] * (len(tokens) - head_len)
                sources += srcs
        if add_generation_prompt:
            tail = nl + [self.tokenizer.im_start_id] + self.tokenizer.encode_text("assistant", grounding_tags=False)
            tail += nl
            input_ids += tail
            mask += [0] * len(tail)
        loaded = [self._load(src) for src in sources] if load_images else []
        return ChatInputs(
            input_ids=input_ids,
            images=[image for image, _ in loaded],
            image_digests=[digest for _, digest in loaded],
            assistant_mask=mask,
            dropped_turns=len(encoded_turns) - 1 - kept,
        )

    def collate(self, batch: Sequence[ChatInputs], return_tensors: str = "pt") -> BatchFeature:
        """Left-pad a batch of laid-out conversations into model inputs."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eod_id
        width = max(len(item.input_ids) for item in batch)
        ids = [[pad] * (width - len(x.input_ids)) + x.input_ids for x in batch]
        attn = [[0] * (width - len(x.input_ids)) + [1] * len(x.input_ids) for x in batch]
        data: dict[str, Any] = {"input_ids": ids, "attention_mask": attn}
        images = [im for item in batch for im in item.images]
        if images:
            data["pixel_values"] = self.pixel_values(images).numpy()
        return BatchFeature(data, tensor_type=return_tensors)

    def apply_chat_template(  # type: ignore[override]
        self,
        conversation: Sequence[dict[str, Any]] | Sequence[Sequence[dict[str, Any]]],
        chat_template: str | None = None,
        *,
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        return_dict: bool = False,
        return_tensors: str | None = None,
        system: str | None = None,
        max_window_size: int | None = None,
        return_assistant_tokens_mask: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Render one conversation or a batch in the reference ChatML layout.

        With ``tokenize=True, return_dict=True, return_tensors="pt"`` the result holds ``input_ids``,
        ``attention_mask`` and (when there are images) ``pixel_values``, ready for ``model.generate(**inputs)``.
        With ``tokenize=False`` it returns the prompt text (images shown as ``<img></img>``).
        """
        batched = bool(conversation) and isinstance(conversation[0], list | tuple)
        conversations = list(conversation) if batched else [conversation]
        items = [
            self.prepare(
                conv,
                add_generation_prompt=add_generation_prompt,
                system=system,
                max_window_size=max_window_size,
                load_images=tokenize,
            )
            for conv in conversations
        ]
        if not tokenize:
            texts = [self.render_text(item.input_ids) for item in items]
            return texts if batched else texts[0]
        if not return_dict:
            ids = [item.input_ids for item in items]
            if return_tensors:
                return self.collate(items, return_tensors=return_tensors)["input_ids"]
            return ids if batched else ids[0]
        if return_tensors is None:
            out: dict[str, Any] = {
                "input_ids": [x.input_ids for x in items],
                "attention_mask": [[1] * len(x.input_ids) for x in items],
            }
            if return_assistant_tokens_mask:
                out["assistant_masks"] = [x.assistant_mask for x in items]
            if not batched:
                out = {k: v[0] for k, v in out.items()}
            images = [im for x in items for im in x.images]
            if images:
                out["pixel_values"] = self.pixel_values(images).numpy()
            return BatchFeature(out)
        feature = self.collate(items, return_tensors=return_tensors)
        if return_assistant_tokens_mask:
            width = feature["input_ids"].shape[1]
            masks = [[0] * (width - len(x.assistant_mask)) + x.assistant_mask for x in items]
            feature["assistant_masks"] = BatchFeature({"m": masks}, tensor_type=return_tensors)["m"]
        return feature

    def render_text(self, input_ids: Sequence[int]) -> str:
        """Prompt text for display: each image span shown as ``<img></img>``."""
        tok = self.tokenizer
        ids = [i for i in input_ids if i != tok.img_pad_id]
        return tok.decode(ids)

    def __call__(self, text: Any = None, images: Any = None, return_tensors: str | None = "pt", **kwargs: Any):
        """Tokenize plain text (special-token text parsed, as a tokenizer does) and/or preprocess images."""
        data: dict[str, Any] = {}
        if text is not None:
            data.update(self.tokenizer(text, return_tensors=return_tensors, **kwargs))
        if images is not None:
            data.update(self.image_processor(images, return_tensors=return_tensors))
        return BatchFeature(data, tensor_type=return_tensors)

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]


def _read_json(path_or_id: str | os.PathLike, name: str, hub_kwargs: dict[str, Any]) -> dict[str, Any] | None:
    local = Path(path_or_id) / name
    if local.is_file():
        return json.loads(local.read_text(encoding="utf-8"))
    if Path(path_or_id).is_dir():
        return None
    from transformers.utils import cached_file

    resolved = cached_file(str(path_or_id), name, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
    return json.loads(Path(resolved).read_text(encoding="utf-8")) if resolved else None


__all__ = ["QWenVLImageProcessor", "QWenVLProcessor", "ChatInputs", "DEFAULT_SYSTEM", "split_content"]
