"""Image processor and processor (image processor + tokenizer) for Qwen-VL-architecture checkpoints.

The processor lays chat messages out as the reference ``make_context`` does (ChatML), through the tokenizer's chat
template (:data:`~belle_vl_tools.tokenization_qwen_vl.CHAT_TEMPLATE`):

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\nPicture 1: <img>[256 image positions]</img>\\nWhat is this?<|im_end|>\\n
    <|im_start|>assistant\\n

Rules (see the tests for worked examples):

* role and content are tokenized separately; messages are joined by "\\n";
* a message's parts keep their order: each picture is written as ``Picture N: <img>…</img>\\n`` where it stands,
  N counting the pictures of that message from 1, and text is inserted as is (the reference's ``from_list_format``);
* text is text: special-token text typed in a message (``<|im_end|>``, ``<img>``, ...) stays ordinary text, and
  pictures come only from image parts; the grounding tags ``<ref>``, ``</ref>``, ``<box>``, ``</box>``, ``<quad>``,
  ``</quad>`` are special tokens, as in the reference, so grounding answers re-enter the history unchanged;
* history turns are dropped whole, oldest first, when system + kept history would reach ``max_window_size``;
  the current turn is always kept.

The image processor and the processor's layout (:meth:`QWenVLProcessor.prepare`, ``__call__``) are pure: they take
pictures already loaded (PIL images or arrays) and read no files. Only ``apply_chat_template`` with
``tokenize=True`` (transformers' entry point, used by its pipelines) loads the pictures its messages name, through
:func:`belle_vl_tools.images.load_image` under the processor's :class:`~belle_vl_tools.images.ImagePolicy`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
from PIL import Image
from transformers import BatchFeature, ProcessorMixin
from transformers.image_processing_utils import BaseImageProcessor

from .configuration_qwen_vl import DEFAULT_VISUAL, NUM_IMAGE_QUERIES
from .errors import PromptError
from .images import ImagePolicy, load_image
from .messages import DEFAULT_SYSTEM, Message, MessageInput
from .tokenization_qwen_vl import CHAT_TEMPLATE, IMG_END, IMG_START, QWenTokenizer, chat_template_inputs

DEFAULT_MAX_WINDOW_SIZE = 6144
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ROLES = ("system", "user", "assistant")
PROCESSOR_CONFIG = "processor_config.json"
#: A picture's place in text given to the processor: ``<img></img>`` as the chat template writes it (or, as in the
#: reference's queries, ``<img>name</img>``; the name is not read).
_PLACEHOLDER_RE = re.compile(re.escape(IMG_START) + r"[^\n]*?" + re.escape(IMG_END))


class QWenVLImageProcessor(BaseImageProcessor):
    """Pictures -> ``pixel_values``: RGB, bicubic resize to ``size``, rescale to [0, 1], normalize (CLIP's mean/std).

    The options are those of transformers' image processors and can be changed per call
    (``processor(images=..., size={"height": 224, "width": 224}, do_normalize=False)``). The vision tower takes
    square pictures, so ``size`` must be square. Pictures must be loaded already: PIL images or ``H x W x C``
    arrays (use :func:`belle_vl_tools.images.load_image` for paths, bytes and URLs).
    """

    model_input_names = ["pixel_values"]
    _OPTIONS = (
        "do_resize",
        "size",
        "resample",
        "do_rescale",
        "rescale_factor",
        "do_normalize",
        "image_mean",
        "image_std",
        "do_convert_rgb",
    )

    def __init__(
        self,
        do_resize: bool = True,
        size: Mapping[str, int] | int | None = None,
        resample: int = Image.Resampling.BICUBIC,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
        do_convert_rgb: bool = True,
        image_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.do_resize = bool(do_resize)
        self.size = _square_size(size if size is not None else (image_size or DEFAULT_VISUAL["image_size"]))
        self.resample = int(resample)
        self.do_rescale = bool(do_rescale)
        self.rescale_factor = float(rescale_factor)
        self.do_normalize = bool(do_normalize)
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]
        self.do_convert_rgb = bool(do_convert_rgb)

    @property
    def image_size(self) -> int:
        """Side of the square the pictures are resized to (config.json's ``visual.image_size``)."""
        return self.size["height"]

    def _options(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(overrides) - set(self._OPTIONS))
        if unknown:
            raise TypeError(
                f"Unknown image processor argument(s) {', '.join(unknown)}: use {', '.join(self._OPTIONS)}."
            )
        options = {name: getattr(self, name) for name in self._OPTIONS}
        options.update({k: v for k, v in overrides.items() if v is not None})
        options["size"] = _square_size(options["size"])
        return options

    def to_array(self, image: Any, **overrides: Any) -> np.ndarray:
        """One picture as a float32 array [3, H, W] (``H = W = size`` when resizing)."""
        o = self._options(overrides)
        image = _as_pil(image)
        if o["do_convert_rgb"]:
            image = image.convert("RGB")
        if o["do_resize"]:
            image = image.resize((o["size"]["width"], o["size"]["height"]), Image.Resampling(int(o["resample"])))
        pixels: np.ndarray = np.asarray(image, dtype=np.float32)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        if o["do_rescale"]:
            pixels = pixels * np.float32(o["rescale_factor"])
        if o["do_normalize"]:
            pixels = (pixels - np.asarray(o["image_mean"], np.float32)) / np.asarray(o["image_std"], np.float32)
        return pixels.transpose(2, 0, 1)

    # transformers' base names its BatchFeature subclass; the image processor gives the plain one, as it always has
    def __call__(self, images: Any, return_tensors: str | None = "pt", **overrides: Any) -> BatchFeature:  # type: ignore[override]
        return self.preprocess(images, return_tensors=return_tensors, **overrides)

    def preprocess(self, images: Any, return_tensors: str | None = "pt", **overrides: Any) -> BatchFeature:
        """``pixel_values`` [num_images, 3, H, W] of one picture or a (possibly nested) list of pictures."""
        pictures = _flatten_images(images)
        arrays = [self.to_array(picture, **overrides) for picture in pictures]
        if not arrays:
            side = self._options(overrides)["size"]
            data = np.zeros((0, 3, side["height"], side["width"]), np.float32)
        elif len({a.shape for a in arrays}) > 1:
            raise ValueError(
                "Pictures of different sizes cannot be stacked: keep do_resize=True (the vision tower takes "
                f"{self.image_size} x {self.image_size} pictures)."
            )
        else:
            data = np.stack(arrays)
        return BatchFeature({"pixel_values": data}, tensor_type=return_tensors)


def _square_size(size: Mapping[str, int] | int | Sequence[int]) -> dict[str, int]:
    if isinstance(size, Mapping):
        if "shortest_edge" in size and "height" not in size:
            height = width = int(size["shortest_edge"])
        else:
            height, width = int(size["height"]), int(size["width"])
    elif isinstance(size, int):
        height = width = size
    else:
        height, width = (int(v) for v in size)
    if height != width or height < 1:
        raise ValueError(
            f"size must be a square ({{'height': n, 'width': n}}): the vision tower takes square pictures, "
            f"got {height} x {width}."
        )
    return {"height": height, "width": width}


def _as_pil(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = array.transpose(1, 2, 0)
        if array.dtype != np.uint8:
            array = np.clip(array * (255 if array.max() <= 1.0 else 1), 0, 255).astype(np.uint8)
        return Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[-1] == 1 else array)
    if hasattr(image, "numpy") and hasattr(image, "dim"):  # a torch tensor [C, H, W] or [H, W, C]
        return _as_pil(image.detach().cpu().numpy())
    raise TypeError(
        f"The image processor takes loaded pictures (PIL images or arrays), not {type(image).__name__}: load paths, "
        "bytes and URLs first with belle_vl_tools.images.load_image (under an ImagePolicy)."
    )


def _flatten_images(images: Any) -> list[Any]:
    if images is None:
        return []
    if isinstance(images, list | tuple):
        return [picture for item in images for picture in _flatten_images(item)]
    return [images]


@dataclass
class ChatInputs:
    """One conversation laid out for the model.

    ``sources`` are the pictures as the messages give them (paths, URLs, bytes, PIL images, ...), in prompt order;
    ``images`` / ``image_digests`` are filled by whoever loads them (the runtime, under its image policy).
    """

    input_ids: list[int]
    sources: list[Any] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    image_digests: list[str] = field(default_factory=list)
    assistant_mask: list[int] = field(default_factory=list)
    dropped_turns: int = 0

    @property
    def num_images(self) -> int:
        return len(self.sources)


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
        if kwargs:
            raise TypeError(f"QWenVLProcessor got unexpected arguments: {', '.join(sorted(kwargs))}.")
        chat_template = chat_template or getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATE
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.max_window_size = int(max_window_size)
        #: Positions per image between <img> and </img>: config.json's visual.n_queries, 256 when absent.
        self.num_image_queries = int(num_image_queries)
        #: What apply_chat_template(tokenize=True) may read when messages name pictures (default: trusted).
        self.image_policy = image_policy

    # --- loading and saving -------------------------------------------------------------------------------------
    @classmethod
    # transformers' base takes its own keywords (cache_dir, force_download, ...); these take them through **kwargs
    def from_pretrained(  # type: ignore[override]
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
    ) -> QWenVLProcessor:
        """Build the processor from a checkpoint folder or Hub id.

        A folder written by :meth:`save_pretrained` has processor_config.json and preprocessor_config.json;
        published checkpoints have neither, and the settings come from config.json's ``visual`` block and
        generation_config.json's ``max_window_size``. Keyword arguments override them.
        """
        # loading details that AutoProcessor and pipeline() pass along; none concerns the processor
        for detail in (
            "trust_remote_code",
            "_from_auto",
            "_from_pipeline",
            "_commit_hash",
            "code_revision",
            "use_fast",
            "dtype",
            "torch_dtype",
            "device_map",
        ):
            kwargs.pop(detail, None)
        hub_kwargs: dict[str, Any] = {
            k: kwargs.pop(k) for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs
        }
        tokenizer = kwargs.pop("tokenizer", None) or QWenTokenizer.from_pretrained(
            pretrained_model_name_or_path, **hub_kwargs
        )
        saved = _read_json(pretrained_model_name_or_path, PROCESSOR_CONFIG, hub_kwargs) or {}
        image_config = _read_json(pretrained_model_name_or_path, "preprocessor_config.json", hub_kwargs)
        config = _read_json(pretrained_model_name_or_path, "config.json", hub_kwargs) or {}
        visual = {**DEFAULT_VISUAL, **(config.get("visual") or {})}
        image_processor = kwargs.pop("image_processor", None)
        if image_processor is None:
            if image_config is not None:
                options = {k: v for k, v in image_config.items() if k in QWenVLImageProcessor._OPTIONS}
                image_processor = QWenVLImageProcessor(**options)
            else:
                image_processor = QWenVLImageProcessor(image_size=visual["image_size"])
        if "max_window_size" not in kwargs:
            generation = _read_json(pretrained_model_name_or_path, "generation_config.json", hub_kwargs) or {}
            kwargs["max_window_size"] = saved.get(
                "max_window_size", generation.get("max_window_size", DEFAULT_MAX_WINDOW_SIZE)
            )
        kwargs.setdefault(
            "num_image_queries", saved.get("num_image_queries", visual.get("n_queries", NUM_IMAGE_QUERIES))
        )
        return cls(image_processor, tokenizer, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> list[str]:  # type: ignore[override]
        """Write the tokenizer files, the chat template, preprocessor_config.json and processor_config.json, so
        ``AutoProcessor.from_pretrained(save_directory)`` gives an equal processor."""
        if kwargs.get("push_to_hub"):
            raise NotImplementedError("push_to_hub is not supported: save to a folder and upload it.")
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        files = [str(p) for p in self.tokenizer.save_pretrained(folder)]
        files += [str(p) for p in self.image_processor.save_pretrained(folder)]
        (folder / "chat_template.jinja").write_text(cast(str, self.chat_template), encoding="utf-8")  # one, see init
        settings = {
            "processor_class": type(self).__name__,
            "max_window_size": self.max_window_size,
            "num_image_queries": self.num_image_queries,
        }
        (folder / PROCESSOR_CONFIG).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
        files += [str(folder / "chat_template.jinja"), str(folder / PROCESSOR_CONFIG)]
        return list(dict.fromkeys(files))

    # --- pictures -----------------------------------------------------------------------------------------------
    def pixel_values(self, images: Sequence[Any], **image_kwargs: Any) -> Any:
        """``pixel_values`` [num_images, 3, S, S] (a torch tensor) of loaded pictures."""
        return self.image_processor(list(images), return_tensors="pt", **image_kwargs)["pixel_values"]

    def load_images(self, sources: Sequence[Any], image_policy: ImagePolicy | None = None) -> list[Image.Image]:
        """Load picture sources with :func:`belle_vl_tools.images.load_image` under ``image_policy`` (default: the
        processor's, else :meth:`ImagePolicy.trusted`)."""
        policy = image_policy or self.image_policy or ImagePolicy.trusted()
        return [load_image(source, policy) for source in sources]

    # --- chat layout --------------------------------------------------------------------------------------------
    def prepare(
        self,
        messages: Sequence[MessageInput],
        *,
        add_generation_prompt: bool = True,
        system: str | None = None,
        max_window_size: int | None = None,
        continue_final_message: bool = False,
        chat_template: str | None = None,
        tools: Sequence[Any] | None = None,
        documents: Sequence[Any] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> ChatInputs:
        """Lay out one conversation (token ids, the pictures' sources in prompt order, the assistant mask).

        ``messages`` are :class:`~belle_vl_tools.messages.Message` objects or the dicts transformers' chat
        templates take (any form :func:`~belle_vl_tools.messages.parse_messages` reads), read once here.
        ``tools``, ``documents`` and ``template_kwargs`` (template variables) mean what they mean for transformers'
        chat templates (see :func:`~belle_vl_tools.tokenization_qwen_vl.chat_template_inputs`: tools are rendered
        in Qwen's ReAct format by the reference layout). Pure: the pictures are not loaded (see :class:`ChatInputs`).
        """
        if not isinstance(messages, list | tuple) or not messages:
            raise PromptError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts.")
        window = int(max_window_size or self.max_window_size)
        chat_template = chat_template or cast(str, self.chat_template)  # __init__ always sets one template
        msgs, variables = chat_template_inputs(
            messages, chat_template, tools=tools, documents=documents, template_kwargs=template_kwargs
        )
        for i, msg in enumerate(msgs):
            if msg.role not in ROLES:
                raise PromptError(
                    f"Message {i} has role {msg.role!r}; use one of {', '.join(ROLES)} "
                    "(tool results go into a user message)."
                )
            if msg.role == "system" and i > 0:
                raise PromptError(f"Message {i} is a system message: only the first message may be one.")
            if any(source is None for source in msg.images):
                raise PromptError(
                    f"Message {i} has an image part with no picture ({{'type': 'image'}} alone): give it an 'image' "
                    "(a path, URL, data URL, bytes, PIL image or array), 'url', 'path' or 'base64' key."
                )
            if msg.images and msg.role != "user":
                what = "The system message" if msg.role == "system" else f"A {msg.role} message"
                raise PromptError(f"{what} cannot hold images: put them in a user message.")
        conversation = list(msgs)
        if conversation[0].role != "system":
            conversation.insert(0, Message.system(system if system is not None else DEFAULT_SYSTEM))
        if len(conversation) == 1:
            raise PromptError("messages hold only a system message: add a user message.")
        sources = [message.images for message in conversation]

        blocks = self.tokenizer.encode_chat(
            conversation,
            chat_template=chat_template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            num_image_queries=self.num_image_queries,
            **variables,
        )
        expected = len(conversation) + (1 if add_generation_prompt else 0)
        if len(blocks) != expected:
            raise PromptError(
                f"The chat template wrote {len(blocks)} message blocks for {expected}: it must write one "
                "<|im_start|>...<|im_end|> block per message."
            )
        system_block, message_blocks = blocks[0], blocks[1 : len(conversation)]
        tail = blocks[len(conversation) :]

        # turns: a user message and what follows it
        turns: list[list[int]] = []
        for index, block in enumerate(message_blocks):
            if block.role == "user" or not turns:
                turns.append([])
            turns[-1].append(index)

        def turn_length(turn: list[int]) -> int:
            return sum(len(message_blocks[i].separator) + len(message_blocks[i].ids) for i in turn)

        kept = 0
        history_len = 0
        for turn in reversed(turns[:-1]):
            size = turn_length(turn)
            if len(system_block.ids) + history_len + size < window:
                history_len += size
                kept += 1
            else:
                break
        chosen = [i for turn in turns[len(turns) - 1 - kept :] for i in turn]

        input_ids = list(system_block.separator) + list(system_block.ids)
        mask = [0] * len(input_ids)
        kept_sources: list[Any] = []
        for i in chosen:
            block = message_blocks[i]
            answer = 1 if block.role == "assistant" and block.closed else 0
            input_ids += block.separator + block.ids
            mask += [0] * (len(block.separator) + block.head_len) + [answer] * (len(block.ids) - block.head_len)
            kept_sources += sources[i + 1]
        for block in tail:
            input_ids += block.separator + block.ids
            mask += [0] * (len(block.separator) + len(block.ids))
        return ChatInputs(
            input_ids=input_ids,
            sources=kept_sources,
            assistant_mask=mask,
            dropped_turns=len(turns) - 1 - kept,
        )

    def collate(self, batch: Sequence[ChatInputs], return_tensors: str = "pt", **image_kwargs: Any) -> BatchFeature:
        """Left-pad a batch of laid-out conversations into model inputs (``pixel_values`` of their loaded
        ``images``, when there are any)."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eod_id
        width = max(len(item.input_ids) for item in batch)
        ids = [[pad] * (width - len(x.input_ids)) + x.input_ids for x in batch]
        attn = [[0] * (width - len(x.input_ids)) + [1] * len(x.input_ids) for x in batch]
        data: dict[str, Any] = {"input_ids": ids, "attention_mask": attn}
        images = [im for item in batch for im in item.images]
        if images:
            data["pixel_values"] = self.image_processor(images, return_tensors=None, **image_kwargs)["pixel_values"]
        return BatchFeature(data, tensor_type=return_tensors)

    def apply_chat_template(  # type: ignore[override]
        self,
        conversation: Sequence[MessageInput] | Sequence[Sequence[MessageInput]],
        chat_template: str | None = None,
        tools: Sequence[Any] | None = None,
        documents: Sequence[Any] | None = None,
        *,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        tokenize: bool = False,
        return_dict: bool = False,
        return_tensors: str | None = None,
        system: str | None = None,
        max_window_size: int | None = None,
        return_assistant_tokens_mask: bool = False,
        image_policy: ImagePolicy | None = None,
        processor_kwargs: Mapping[str, Any] | None = None,
        load_audio_from_video: bool = False,
        sanitize_control_tokens: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """Render one conversation or a batch in the reference ChatML layout.

        With ``tokenize=True, return_dict=True, return_tensors="pt"`` the result holds ``input_ids``,
        ``attention_mask`` and (when there are pictures) ``pixel_values``, ready for ``model.generate(**inputs)``;
        the pictures the messages name are loaded under ``image_policy`` (default: the processor's
        ``image_policy``, else :meth:`ImagePolicy.trusted`: local files, no URLs). ``processor_kwargs`` /
        keyword arguments of the image processor (``size``, ``do_normalize``, ...) apply to the pictures.
        With ``tokenize=False`` it returns the prompt text (each picture shown as ``<img></img>``).

        As in transformers: ``tools`` are rendered (Qwen's ReAct format in the reference layout), ``documents`` go
        to a template that reads them, and other keywords are template variables (``enable_thinking=False``, ...).
        Text is always text here (``sanitize_control_tokens=True`` is how it works; False is refused), and there is
        no audio (``load_audio_from_video=True`` is refused). Generation arguments (``do_sample``, ...) are refused
        with the place they go (``generate_kwargs=`` of the pipeline).
        """
        if load_audio_from_video:
            raise TypeError("load_audio_from_video=True: this model takes no audio (pictures and text only).")
        if sanitize_control_tokens is False:
            raise TypeError(
                "sanitize_control_tokens=False: this processor always keeps the messages' text as text (a control "
                "token typed in a message stays plain characters); leave the argument out."
            )
        image_kwargs = dict(processor_kwargs or {})
        image_kwargs.update({k: kwargs.pop(k) for k in list(kwargs) if k in QWenVLImageProcessor._OPTIONS})
        for name in ("padding", "truncation", "max_length"):  # what the pipeline may pass; left padding is applied
            if kwargs.get(name) in (None, False, True, "longest"):
                kwargs.pop(name, None)
        batched = bool(conversation) and not isinstance(conversation[0], Mapping | Message)
        conversations = cast(list[Sequence[MessageInput]], list(conversation) if batched else [conversation])
        items = [
            self.prepare(
                conv,
                add_generation_prompt=add_generation_prompt,
                system=system,
                max_window_size=max_window_size,
                continue_final_message=continue_final_message,
                chat_template=chat_template,
                tools=tools,
                documents=documents,
                template_kwargs=kwargs,
            )
            for conv in conversations
        ]
        if not tokenize:
            texts = [self.render_text(item.input_ids) for item in items]
            return texts if batched else texts[0]
        for item in items:
            item.images = self.load_images(item.sources, image_policy)
        if not return_dict:
            if return_tensors:
                return self.collate(items, return_tensors=return_tensors)["input_ids"]
            ids = [item.input_ids for item in items]
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
                out["pixel_values"] = self.image_processor(images, return_tensors=None, **image_kwargs)["pixel_values"]
            return BatchFeature(out)
        feature = self.collate(items, return_tensors=return_tensors, **image_kwargs)
        if return_assistant_tokens_mask:
            width = feature["input_ids"].shape[1]
            masks = [[0] * (width - len(x.assistant_mask)) + x.assistant_mask for x in items]
            feature["assistant_masks"] = BatchFeature({"m": masks}, tensor_type=return_tensors)["m"]
        return feature

    def render_text(self, input_ids: Sequence[int]) -> str:
        """Prompt text for display: each image span shown as ``<img></img>``."""
        return self.tokenizer.decode(list(input_ids))

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images: Any = None,
        return_tensors: str | None = "pt",
        **kwargs: Any,
    ) -> BatchFeature:
        """Tokenize text and preprocess loaded pictures, as transformers processors do.

        Each picture placeholder in the text (``<img></img>`` as the chat template writes it, or
        ``<img>name</img>``) becomes an image span of ``num_image_queries`` positions, and the pictures, in order,
        fill them: the number of placeholders must equal the number of pictures. The rest of the text is
        tokenized as the tokenizer does (special-token text in it is parsed). Image processor arguments (``size``,
        ``do_resize``, ``do_normalize``, ...) go to the image processor, the others to the tokenizer.
        """
        image_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in QWenVLImageProcessor._OPTIONS}
        pictures = _flatten_images(images)
        data: dict[str, Any] = {}
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            if not all(isinstance(t, str) for t in texts):
                raise TypeError("text must be a string or a list of strings.")
            placeholders = sum(len(_PLACEHOLDER_RE.findall(t)) for t in texts)
            if placeholders != len(pictures):
                raise ValueError(
                    f"The text holds {placeholders} picture placeholder(s) ({IMG_START}{IMG_END}) but "
                    f"{len(pictures)} picture(s) were given: each picture needs its placeholder, in order (the "
                    "chat template writes them), and each placeholder its picture (loaded, not a path)."
                )
            rows = [self._encode_with_placeholders(t, kwargs.get("add_special_tokens", False)) for t in texts]
            tokenizer_kwargs = {k: v for k, v in kwargs.items() if k != "add_special_tokens"}
            if isinstance(text, str) and not tokenizer_kwargs.get("padding"):
                encoded: dict[str, Any] = {"input_ids": [rows[0]], "attention_mask": [[1] * len(rows[0])]}
                if return_tensors is None:
                    encoded = {key: value[0] for key, value in encoded.items()}
                data.update(encoded)
            else:
                data.update(self.tokenizer.pad({"input_ids": rows}, return_tensors=None, **tokenizer_kwargs))
        if pictures or images is not None:
            data.update(self.image_processor(pictures, return_tensors=None, **image_kwargs))
        return BatchFeature(data, tensor_type=return_tensors)

    def _encode_with_placeholders(self, text: str, add_special_tokens: bool) -> list[int]:
        tok = self.tokenizer
        ids: list[int] = []
        position = 0
        span = [tok.img_start_id] + [tok.img_pad_id] * self.num_image_queries + [tok.img_end_id]
        for match in _PLACEHOLDER_RE.finditer(text):
            ids += tok.encode(text[position : match.start()], add_special_tokens=add_special_tokens)
            ids += span
            position = match.end()
        return ids + tok.encode(text[position:], add_special_tokens=add_special_tokens)

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


__all__ = [
    "DEFAULT_SYSTEM",
    "ChatInputs",
    "QWenVLImageProcessor",
    "QWenVLProcessor",
]
