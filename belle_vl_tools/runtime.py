"""BelleVL: the local backend. Loads a checkpoint and answers chat messages with streaming, batches and caches.

Caches:

* vision features of every image are kept by content hash in a bounded LRU, so a picture that is already in the
  conversation (or was asked about before) is not encoded again;
* the KV cache of the last conversations is kept (a bounded LRU of prefixes); a new prompt that shares a prefix
  with one of them (same tokens, same pictures) only prefills what is new. A prefix is reused only while the
  dynamic-NTK factor of the new prompt equals the one its keys were rotated with.

With ``compile=True`` the KV caches are static (:class:`~belle_vl_tools.modeling_qwen_vl.QWenStaticCache`, sized in
steps of :data:`STATIC_CACHE_STEP` positions) and transformers' ``generate`` runs every decoding step through
``torch.compile`` (CUDA graphs on a GPU); the first request of each new cache size or batch size compiles.

One generation runs at a time per model (a lock), so a ``BelleVL`` is safe to call from several threads;
``achat`` / ``astream`` run the work in a thread and do not block the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import math
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import AsyncIterator, Generator, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from queue import SimpleQueue
from typing import Any

import torch
from PIL import Image
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from .backend import ChatResult, Message, StreamChunk, Usage, VisionTasks
from .checkpoint_checks import check_checkpoint_folder, check_finite_weights
from .constrained import Grammar, grammar_from, logits_processor
from .errors import CheckpointError, ContextLengthError, PromptError, SamplingError
from .images import ImagePolicy, _resolve_local_path, image_digest, load_image
from .messages import parse_messages
from .modeling_qwen_vl import CACHE_FIELD, QWenCache, QWenLMHeadModel, QWenStaticCache, ntk_alpha, stop_token_ids
from .processing_qwen_vl import ChatInputs, QWenVLProcessor
from .sampling import SamplingParams
from .tokenization_qwen_vl import IncrementalDecoder, QWenTokenizer

#: Generation arguments understood by every backend (others pass through to ``transformers`` generate).
GENERATION_ARGS = (
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "do_sample",
    "stop",
    "seed",
    "response_format",
)


# ---------------------------------------------------------------------------------------------------------------
# Generation settings
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Settings:
    config: GenerationConfig
    stop: list[str]
    seed: int | None
    grammar: Grammar | None = None


def _resolve_settings(base: GenerationConfig, kwargs: dict[str, Any]) -> _Settings:
    """Defaults from generation_config.json (or a ``generation_config`` argument), overridden by explicit
    arguments: the sampling settings are checked by :class:`~belle_vl_tools.sampling.SamplingParams`, the other
    transformers ``GenerationConfig`` fields here."""
    kwargs = dict(kwargs)
    override = kwargs.pop("generation_config", None)
    if override is not None:
        if not isinstance(override, GenerationConfig):
            raise PromptError("generation_config must be a transformers GenerationConfig.")
        base = override
    for key in ("stream", "streaming", "n"):
        kwargs.pop(key, None)
    params, extra = SamplingParams.from_kwargs(kwargs)
    unsupported = params.engine_only()
    if unsupported:
        raise SamplingError(
            f"{unsupported[0]} is honoured by the batching engine (belle_vl_tools.engine.BatchEngine), not by "
            "BelleVL.chat / stream / generate_batch: leave it out, or answer through the engine.",
            unsupported[0],
        )
    grammar = grammar_from(params.response_format)

    config = GenerationConfig.from_dict(base.to_dict())
    if params.temperature is not None:
        if params.temperature == 0:
            extra.setdefault("do_sample", False)
        else:
            config.temperature = float(params.temperature)
            extra.setdefault("do_sample", True)
    for key in ("max_new_tokens", "top_p", "top_k", "repetition_penalty"):
        value = getattr(params, key)
        if value is not None:
            setattr(config, key, value)
    for key, value in extra.items():
        if value is None:
            continue
        if key == "do_sample" and not isinstance(value, bool):
            raise PromptError(f"Invalid generation argument {key}={value!r}.")
        if not hasattr(config, key):
            raise PromptError(
                f"Unknown generation argument {key!r}: use {', '.join(GENERATION_ARGS)} "
                "or another transformers GenerationConfig field."
            )
        setattr(config, key, value)
    if not config.do_sample:  # neutral values, so transformers does not fill in the sampling defaults
        config.temperature, config.top_p, config.top_k = 1.0, 1.0, 50
    elif config.top_k == 0:  # Qwen's "no top-k"
        config.top_k = None
    config.use_cache = True
    config.return_dict_in_generate = True
    return _Settings(config=config, stop=list(params.stop), seed=params.seed, grammar=grammar)


@contextlib.contextmanager
def _quiet_loading(quiet: bool) -> Iterator[None]:
    """While a checkpoint loads: with ``quiet``, no progress bars (transformers', the Hub's), no transformers info
    or warnings and no Python warnings; the earlier settings come back afterwards."""
    if not quiet:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    bars, hub_bars = transformers_logging.is_progress_bar_enabled(), not are_progress_bars_disabled()
    level = transformers_logging.get_verbosity()
    transformers_logging.disable_progress_bar()
    disable_progress_bars()
    transformers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers_logging.set_verbosity(level)
        if bars:
            transformers_logging.enable_progress_bar()
        if hub_bars:
            enable_progress_bars()


class _StopOnStrings(StoppingCriteria):
    """Stops a row once its generated text contains one of ``stops`` (or when cancelled)."""

    def __init__(self, tokenizer: QWenTokenizer, stops: list[str], prompt_len: int, cancel: threading.Event) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.prompt_len = prompt_len
        self.cancel = cancel
        self.window = max((len(s) for s in stops), default=0) + 8

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if self.cancel.is_set():
            return done | True
        if not self.stops:
            return done
        for row in range(input_ids.shape[0]):
            tail = input_ids[row, self.prompt_len :][-self.window :].tolist()
            text = self.tokenizer.decode(tail)
            done[row] = any(s in text for s in self.stops)
        return done


class _HoldEndTokens(LogitsProcessor):
    """``min_new_tokens``: the end tokens' scores are -inf until each row has generated ``minimum`` tokens.

    transformers' own processors for this (two: ``min_length`` is derived from ``min_new_tokens``) rebuild a
    vocabulary-sized mask with ``arange`` and ``isin`` at every step; here the ids are indexed directly, which is
    the same scores for a fraction of the per-step work."""

    def __init__(self, end_ids: list[int], prompt_len: int, minimum: int, device: torch.device) -> None:
        self.end_ids = torch.tensor(end_ids, dtype=torch.long, device=device)
        self.until = prompt_len + minimum

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] < self.until:
            scores = scores.index_fill(-1, self.end_ids, -math.inf)
        return scores


# ---------------------------------------------------------------------------------------------------------------
# Turning generated ids into answers
# ---------------------------------------------------------------------------------------------------------------


def _cut_at_stops(text: str, stops: list[str]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class AnswerText:
    """Accumulates generated ids for one row and yields display text exactly as the final answer will be."""

    def __init__(self, tokenizer: QWenTokenizer, stop_ids: set[int], stops: list[str]) -> None:
        self.decoder = IncrementalDecoder(tokenizer)
        self.stop_ids = stop_ids
        self.stops = stops
        self.raw = ""
        self.ids: list[int] = []
        self.ended_by_token = False
        self.ended_by_string = False
        self.emitted = 0

    @property
    def finished(self) -> bool:
        return self.ended_by_token or self.ended_by_string

    def push(self, ids: Sequence[int]) -> None:
        for tid in ids:
            if self.finished:
                return
            self.ids.append(int(tid))
            if tid in self.stop_ids:
                self.ended_by_token = True
                self.raw += self.decoder.flush()
                return
            self.raw += self.decoder.push([int(tid)])
            if self.stops:
                _, hit = _cut_at_stops(self.raw, self.stops)
                self.ended_by_string = hit

    def final_text(self) -> str:
        text = self.raw + ("" if self.finished else self.decoder.flush())
        self.raw = text
        text, _ = _cut_at_stops(text, self.stops)
        return text.strip()

    def safe_delta(self) -> str:
        """New text that can no longer change: no trailing space, nothing that may begin a stop string."""
        text, _ = _cut_at_stops(self.raw, self.stops)
        text = text.lstrip()
        safe = len(text.rstrip())
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    safe = min(safe, len(text) - k)
                    break
        if safe <= self.emitted:
            return ""
        delta, self.emitted = text[self.emitted : safe], safe
        return delta

    def rest(self) -> str:
        final = self.final_text()
        delta, self.emitted = final[self.emitted :], len(final)
        return delta

    def finish_reason(self) -> str:
        return "stop" if self.finished else "length"


class _StreamBridge(BaseStreamer):
    """Receives ids from ``generate`` (skipping the prompt) and hands them to a queue."""

    def __init__(self, queue: SimpleQueue) -> None:
        self.queue = queue
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.queue.put(("ids", value.reshape(-1).tolist()))

    def end(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------------------------
# CPU precision and weight quantization
# ---------------------------------------------------------------------------------------------------------------

#: Values of ``BelleVL.from_pretrained(quantize=...)`` / ``--quantize``.
QUANTIZE_CHOICES = ("int8",)
_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX-512 BF16 / AMX, Arm's BF16 extension


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 matrix products natively (AVX-512 BF16 or AMX on x86, BF16 on Arm).

    Asks torch where it can tell (``torch.cpu._is_avx512_bf16_supported``, ``_is_amx_tile_supported``), else the
    flags in ``/proc/cpuinfo``; False where neither says so."""
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        probe = getattr(torch.cpu, name, None)
        if probe is not None:
            with contextlib.suppress(Exception):
                if probe():
                    return True
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    flags = {
        word for line in text.splitlines() if line.lower().startswith(("flags", "features")) for word in line.split()
    }
    return any(flag in flags for flag in _BF16_FLAGS)


def _cpu_default_dtype(path: str, model_kwargs: dict[str, Any], quantization_config: Any) -> torch.dtype | None:
    """bfloat16 for a CPU load with no dtype named, where the CPU computes it natively and the checkpoint's flags
    (``bf16`` / ``fp16`` / ``fp32``) choose nothing; None (the checkpoint's own default) otherwise."""
    place = model_kwargs.get("device_map")
    if quantization_config is not None or (place is not None and str(place) != "cpu"):
        return None
    if place is None and torch.cuda.is_available():
        return None
    from .configuration_qwen_vl import QWenConfig

    try:
        config = QWenConfig.from_pretrained(path)
    except Exception:  # the loader reports a broken or missing config with its own error
        return None
    if config.bf16 or config.fp16 or config.fp32:
        return None
    return torch.bfloat16 if cpu_has_native_bf16() else None


def quantize_language_model(model: QWenLMHeadModel, scheme: str) -> None:
    """Quantize the language model's linear layers in place (the blocks and the output head) with torchao;
    the vision tower and the token embedding keep their weights.

    ``"int8"``: torchao's ``Int8WeightOnlyConfig`` (symmetric, one scale per output channel); activations stay
    in the model's dtype."""
    if scheme not in QUANTIZE_CHOICES:
        raise PromptError(f"quantize={scheme!r} is not a known scheme: use one of {', '.join(QUANTIZE_CHOICES)}.")
    try:
        import logging

        logging.getLogger("torchao").setLevel(logging.ERROR)  # its GPU kernels' load failures on a CPU-only torch
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as exc:
        raise CheckpointError(
            f"quantize={scheme!r} needs torchao ({exc}): pip install 'belle-vl-tools[cpu]' (or torchao)."
        ) from None

    def language_linear(module: torch.nn.Module, name: str) -> bool:
        return isinstance(module, torch.nn.Linear) and not name.startswith("transformer.visual")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(model, Int8WeightOnlyConfig(), filter_fn=language_linear)


# ---------------------------------------------------------------------------------------------------------------
# Caches
# ---------------------------------------------------------------------------------------------------------------

#: With ``compile=True``, static caches hold a multiple of this many positions, never fewer than the largest one
#: made before (each new size compiles once).
STATIC_CACHE_STEP = 512


def _compile_config(device: torch.device) -> Any:
    """transformers' settings for compiling the decoding steps: CUDA graphs on a GPU, inductor's C++ on a CPU."""
    from transformers.generation.configuration_utils import CompileConfig

    mode = "reduce-overhead" if device.type == "cuda" else "default"
    config = CompileConfig(fullgraph=True, dynamic=False, mode=mode)
    # transformers compiles only on accelerators unless told so (a private switch it declares as None)
    config._compile_all_devices = True  # type: ignore[assignment]
    return config


class _LRU(OrderedDict):
    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity

    def put(self, key: Any, value: Any) -> None:
        if self.capacity <= 0:
            return
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.capacity:
            self.popitem(last=False)


@dataclass
class _Prefix:
    ids: list[int]
    spans: list[tuple[int, str]]  # (start of the image's positions, image digest)
    cache: Any
    alphas: list[float]


def _static_room(cache: Any) -> int:
    """Positions a cache can hold (static caches are full at their size; dynamic ones grow)."""
    return cache.get_max_length() if isinstance(cache, QWenStaticCache) else 0


def _image_spans(ids: Sequence[int], pad_id: int, digests: Sequence[str]) -> list[tuple[int, str]]:
    starts = [i for i, t in enumerate(ids) if t == pad_id and (i == 0 or ids[i - 1] != pad_id)]
    return list(zip(starts, digests, strict=False))


def _shared_prefix(entry: _Prefix, ids: list[int], spans: list[tuple[int, str]], per_image: int) -> int:
    n = 0
    limit = min(len(entry.ids), len(ids) - 1)
    while n < limit and entry.ids[n] == ids[n]:
        n += 1
    for (start, digest), (_, old) in zip(spans, entry.spans, strict=False):
        if start >= n:
            break
        if digest != old:
            n = start - 1  # back to before the image (and its <img> tag)
            break
    for start, _ in spans:
        if start - 1 <= n < start + per_image + 1:
            n = min(n, start - 1)
    return max(n, 0)


# ---------------------------------------------------------------------------------------------------------------
# The runtime
# ---------------------------------------------------------------------------------------------------------------


class BelleVL(VisionTasks):
    """A loaded Belle-VL / Qwen-VL(-Chat) checkpoint answering chat messages (the local backend)."""

    def __init__(
        self,
        model: QWenLMHeadModel,
        processor: QWenVLProcessor,
        *,
        model_name: str | None = None,
        image_policy: ImagePolicy | None = None,
        vision_cache_size: int = 64,
        prefix_cache_size: int = 2,
        max_context_tokens: int | None = None,
        compile: bool = False,
    ) -> None:
        if model.config.visual is not None and processor.num_image_queries != model.config.num_image_queries:
            raise CheckpointError(
                f"The processor writes {processor.num_image_queries} positions per image but the model's vision "
                f"tower gives {model.config.num_image_queries} (visual.n_queries): load both from the same folder."
            )
        self.model = model.eval()
        window = int(processor.max_window_size)
        if max_context_tokens is not None and not 0 < int(max_context_tokens) <= window:
            raise CheckpointError(
                f"max_context_tokens={max_context_tokens}: it must be between 1 and the checkpoint's context of "
                f"{window} tokens (max_window_size in generation_config.json); past it the answers degrade."
            )
        #: The most tokens of prompt and answer together: the checkpoint's max_window_size, or lower if asked.
        self.max_context_tokens = window if max_context_tokens is None else int(max_context_tokens)
        self._context_source = (
            "the checkpoint's max_window_size" if max_context_tokens is None else "max_context_tokens"
        )
        self.processor = processor
        if image_policy is not None:
            processor.image_policy = image_policy
        self.image_policy = processor.image_policy
        self.model_name = model_name or Path(str(model.config.name_or_path or "belle-vl")).name or "belle-vl"
        self._lock = threading.RLock()
        self._vision_cache = _LRU(vision_cache_size)
        self._prefix_cache = _LRU(prefix_cache_size)
        self._decoded_files = _LRU(16)  # decoded picture files, see _load_image
        self._decoded_lock = threading.Lock()
        tok = processor.tokenizer
        self.stop_ids = set(stop_token_ids(tok.eod_id))
        model.ensure_chat_stop_tokens()
        self.stats = {"vision_encoded": 0, "vision_cache_hits": 0, "prefix_tokens_reused": 0}
        self.compile = bool(compile)
        self._compile_config = _compile_config(self.device) if self.compile else None
        self._static_size = 0  # the largest static cache made so far (compile=True)

    # --- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike | None = None,
        *,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        device_map: Any = None,
        attn_implementation: str | None = None,
        quantization_config: Any = None,
        image_policy: ImagePolicy | None = None,
        vision_cache_size: int = 64,
        prefix_cache_size: int = 2,
        max_context_tokens: int | None = None,
        verbose: bool = False,
        check_weights: bool = False,
        compile: bool = False,
        quantize: str | None = None,
        adapter: str | os.PathLike | None = None,
        weights_folders: Sequence[str | os.PathLike] = (),
        **model_kwargs: Any,
    ) -> BelleVL:
        """Load a checkpoint folder or Hub model id (published layout; no code from the checkpoint is run); with
        none named, the shipped demo model.

        ``dtype`` defaults to the checkpoint's precision flags; with none set, bfloat16 on a CPU that computes it
        natively (AVX-512 BF16, AMX: :func:`cpu_has_native_bf16`), else float32 on a CPU (``dtype="float32"``
        gives the reference's exact fp32 numbers); ``quantize="int8"`` stores the language model's linear weights
        as int8 (torchao weight-only, one scale per output channel; the vision tower stays as loaded); ``device``
        ("cpu", "cuda", "cuda:1") places the whole model, ``device_map`` ("auto", ...) spreads it;
        ``quantization_config`` (e.g. ``BitsAndBytesConfig(load_in_4bit=True)``) quantizes the language model and
        keeps the vision tower as is.
        Loading is quiet (no progress bars, transformers' info and warnings, or Python warnings) unless ``verbose``.
        The config's sizes (and, for a local folder, its vocabulary against the tokenizer file) are checked before
        anything is built; ``check_weights=True`` also refuses weights holding NaN or infinities (it reads them all).
        Problems raise :class:`CheckpointError` naming the key or weight. ``compile=True`` decodes with static caches
        through ``torch.compile`` (see the module's docstring); answers are the same. ``adapter`` names a LoRA
        adapter folder (``belle-vl finetune``'s output, a standard PEFT adapter), merged into the weights as it loads.
        The checkpoint's files must be regular files inside its folder (links resolved); ``weights_folders`` names
        shared folders its links may point into. Its weight files must hold exactly the layers its config declares.
        """
        model_kwargs.pop("trust_remote_code", None)
        if quantize is not None and quantize not in QUANTIZE_CHOICES:
            raise PromptError(f"quantize={quantize!r} is not a known scheme: use one of {', '.join(QUANTIZE_CHOICES)}.")
        if quantize is not None and quantization_config is not None:
            raise PromptError("Pass either quantize= or quantization_config=, not both.")
        if dtype is not None:
            model_kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
        if device_map is None and device is not None:
            device_map = str(device)
        if device_map is not None:
            model_kwargs["device_map"] = device_map
        if attn_implementation is not None:
            model_kwargs["attn_implementation"] = attn_implementation
        if quantization_config is not None:
            model_kwargs["quantization_config"] = quantization_config
        if path_or_hub_id is None:
            from .demo import DEMO_MODEL_NAME, default_model_path

            path_or_hub_id, name = default_model_path(), DEMO_MODEL_NAME
        else:
            name = None
        path = str(path_or_hub_id)
        if Path(path).exists() and not (Path(path) / "config.json").is_file():
            raise CheckpointError(f"{path} has no config.json: point at a checkpoint folder (config.json, weights).")
        check_checkpoint_folder(path, tuple(weights_folders))
        if dtype is None and "dtype" not in model_kwargs:
            cpu_default = _cpu_default_dtype(path, model_kwargs, quantization_config)
            if cpu_default is not None:
                model_kwargs["dtype"] = cpu_default
        with _quiet_loading(not verbose):
            model = QWenLMHeadModel.from_pretrained(path, **model_kwargs)
            if adapter is not None:
                from .finetune.adapters import apply_adapter, stored_dtype

                model = apply_adapter(model, adapter, precision=stored_dtype(path))
            processor = QWenVLProcessor.from_pretrained(path)
            if quantize is not None:
                quantize_language_model(model, quantize)
        if check_weights:
            check_finite_weights(model)
        return cls(
            model,
            processor,
            model_name=name or (Path(path).name if Path(path).exists() else path),
            image_policy=image_policy,
            vision_cache_size=vision_cache_size,
            prefix_cache_size=prefix_cache_size,
            max_context_tokens=max_context_tokens,
            compile=compile,
        )

    @property
    def tokenizer(self) -> QWenTokenizer:
        return self.processor.tokenizer

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def generation_config(self) -> GenerationConfig:
        return self.model.generation_config

    def clear_caches(self) -> None:
        with self._lock:
            self._vision_cache.clear()
            self._prefix_cache.clear()

    # --- preparing inputs ---------------------------------------------------------------------------------------
    def prepare(self, messages: Sequence[Message], system: str | None = None) -> ChatInputs:
        """Token ids and pictures of a conversation, in any accepted form (parsed once, by the message model)."""
        item = self.processor.prepare(parse_messages(messages), add_generation_prompt=True, system=system)
        if item.sources and self.model.transformer.visual is None:
            raise PromptError(
                "This checkpoint is text-only (its config.json has no `visual` block): send text without images."
            )
        loaded = [self._load_image(source) for source in item.sources]
        item.images = [image for image, _ in loaded]
        item.image_digests = [digest for _, digest in loaded]
        return item

    def _load_image(self, source: Any) -> tuple[Image.Image, str]:
        """A picture loaded under the runtime's image policy, and its digest. Files are decoded once while
        unchanged (same policy, path, mtime and size): a picture asked about again is then neither decoded nor
        hashed again; the policy check still runs."""
        policy = self.image_policy or ImagePolicy.trusted()
        if isinstance(source, str | os.PathLike) and os.path.isfile(source):
            resolved, _ = _resolve_local_path(source, policy)  # raises when the policy refuses the path
            stat = resolved.stat()
            key = (policy, str(resolved), stat.st_mtime_ns, stat.st_size)
            with self._decoded_lock:
                if key in self._decoded_files:
                    self._decoded_files.move_to_end(key)
                    return self._decoded_files[key]
            image = load_image(source, policy)
            entry = (image, image_digest(image))
            with self._decoded_lock:
                self._decoded_files.put(key, entry)
            return entry
        image = load_image(source, policy)
        return image, image_digest(image)

    def _image_features(self, items: Sequence[ChatInputs], skip: Sequence[int]) -> torch.Tensor | None:
        """Features of the images of ``items`` (without the first ``skip[i]`` images of item i), cached by hash."""
        wanted = [
            (digest, image)
            for item, k in zip(items, skip, strict=True)
            for digest, image in list(zip(item.image_digests, item.images, strict=True))[k:]
        ]
        if not wanted:
            return None
        found: dict[str, torch.Tensor] = {}
        for digest, _ in wanted:
            if digest in self._vision_cache:
                found[digest] = self._vision_cache[digest]
                self._vision_cache.move_to_end(digest)
        missing = {d: im for d, im in wanted if d not in found}
        self.stats["vision_cache_hits"] += len(wanted) - len(missing)
        if missing:
            pixels = self.processor.pixel_values(list(missing.values()))
            with torch.inference_mode():
                feats = self.model.get_image_features(pixels, return_dict=True).pooler_output
            self.stats["vision_encoded"] += len(missing)
            for digest, feat in zip(missing, feats, strict=True):
                found[digest] = feat
                self._vision_cache.put(digest, feat)
        return torch.stack([found[d] for d, _ in wanted])

    def _check_length(self, n_prompt: int, max_new_tokens: int) -> None:
        """Refuse, before anything is generated, a prompt that leaves no room for ``max_new_tokens`` in the
        context (past it transformers only warns, and the answer is garbage)."""
        if n_prompt + max_new_tokens > self.max_context_tokens:
            raise ContextLengthError(
                f"The prompt has {n_prompt} tokens and max_new_tokens is {max_new_tokens}: together more than the "
                f"model's context of {self.max_context_tokens} tokens ({self._context_source}). Shorten the prompt "
                "or lower max_new_tokens.",
                prompt_tokens=n_prompt,
                max_new_tokens=max_new_tokens,
                limit=self.max_context_tokens,
            )

    def _take_prefix(
        self, ids: list[int], spans: list[tuple[int, str]], alphas: list[float], need: int
    ) -> tuple[Any, int]:
        best_key, best_len = None, 0
        for key, entry in self._prefix_cache.items():
            if entry.alphas != alphas or (self.compile and _static_room(entry.cache) < need):
                continue
            n = _shared_prefix(entry, ids, spans, self.processor.num_image_queries)
            if n > best_len:
                best_key, best_len = key, n
        if best_key is None or best_len < 1:
            return None, 0
        entry = self._prefix_cache.pop(best_key)
        cache = entry.cache
        extra = int(cache.get_seq_length()) - best_len
        if extra > 0:
            cache.crop(-extra)
        self.stats["prefix_tokens_reused"] += best_len
        return cache, best_len

    # --- generation ---------------------------------------------------------------------------------------------
    def _generate(
        self,
        items: list[ChatInputs],
        settings: _Settings,
        *,
        streamer: BaseStreamer | None = None,
        cancel: threading.Event | None = None,
    ) -> tuple[torch.Tensor, int]:
        """Run ``generate`` for a batch; returns the generated ids [batch, new] and the prompt width."""
        # ids and mask only: the images enter as (cached) features from _image_features, so collate must not
        # preprocess their pixels again
        batch = self.processor.collate([replace(it, images=[]) for it in items], return_tensors="pt")
        input_ids = batch["input_ids"].to(self.device)
        attention_mask = batch["attention_mask"].to(self.device)
        prompt_len = input_ids.shape[1]
        self._check_length(prompt_len, settings.config.max_new_tokens or 0)

        past, reused = None, 0
        single = len(items) == 1
        pad_id = self.tokenizer.img_pad_id
        spans: list[tuple[int, str]] = []
        alphas = [
            ntk_alpha(len(it.input_ids), self.model.config.seq_length) if self.model.config.use_dynamic_ntk else 1.0
            for it in items
        ]
        need = prompt_len + (settings.config.max_new_tokens or 0)
        if single:
            ids = items[0].input_ids
            spans = _image_spans(ids, pad_id, items[0].image_digests)
            past, reused = self._take_prefix(ids, spans, alphas, need)
        if self.compile and past is None:
            self._static_size = max(self._static_size, -(-need // STATIC_CACHE_STEP) * STATIC_CACHE_STEP)
            past = QWenStaticCache(config=self.model.config, max_cache_len=self._static_size)
        skip = [sum(1 for start, _ in spans if start < reused)] if single else [0] * len(items)
        features = self._image_features(items, skip)

        config = settings.config
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if settings.stop or cancel is not None:  # a per-step check only where one is needed
            criterion = _StopOnStrings(self.tokenizer, settings.stop, prompt_len, cancel or threading.Event())
            kwargs["stopping_criteria"] = StoppingCriteriaList([criterion])
        processors: list[LogitsProcessor] = []
        end_ids = config.eos_token_id
        if config.min_new_tokens and end_ids is not None:
            end_ids = [end_ids] if isinstance(end_ids, int) else list(end_ids)
            processors.append(_HoldEndTokens(end_ids, prompt_len, config.min_new_tokens, self.device))
            config = copy.deepcopy(config)
            config.min_new_tokens = None  # held by the processor above, not by transformers' two
        if settings.grammar is not None:  # structured output: only tokens the grammar allows, then an end token
            processor = logits_processor(
                settings.grammar,
                self.tokenizer,
                vocab_size=self.model.config.vocab_size,
                max_new_tokens=settings.config.max_new_tokens,
            )
            processors.append(processor)
        if processors:
            kwargs["logits_processor"] = LogitsProcessorList(processors)
        if features is not None:
            kwargs["image_features"] = features.to(self.device)
        if past is not None:
            kwargs[CACHE_FIELD] = past
        if self._compile_config is not None:
            config.compile_config = self._compile_config
        kwargs["generation_config"] = config
        if streamer is not None:
            kwargs["streamer"] = streamer
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        with torch.inference_mode():
            out = self.model.generate(**kwargs)
        sequences = out.sequences
        cache = getattr(out, CACHE_FIELD, None)
        if single and cache is not None:
            length = int(cache.get_seq_length())
            full = sequences[0, :length].tolist()
            kept = (
                cache.ntk_alphas
                if isinstance(cache, QWenCache | QWenStaticCache) and cache.ntk_alphas is not None
                else alphas
            )
            self._prefix_cache.put(id(cache), _Prefix(ids=full, spans=spans, cache=cache, alphas=list(kept)))
        return sequences[:, prompt_len:], prompt_len

    def _result(self, item: ChatInputs, answer: AnswerText) -> ChatResult:
        usage = Usage(prompt_tokens=len(item.input_ids), completion_tokens=len(answer.ids), images=item.num_images)
        return ChatResult(answer.final_text(), answer.finish_reason(), usage, self.model_name)  # type: ignore[arg-type]

    def chat(self, messages: Sequence[Message], *, system: str | None = None, **generation: Any) -> ChatResult:
        """Answer a conversation (messages in transformers' format); ``system`` replaces the default prompt.

        ``response_format`` (``{"type": "json_object"}``, ``{"type": "json_schema", "json_schema": {...}}``, a JSON
        schema dict, a pydantic model class or a :class:`~belle_vl_tools.constrained.Grammar`) constrains the
        answer while it is generated (also in :meth:`stream` and :meth:`generate_batch`)."""
        settings = _resolve_settings(self.generation_config, generation)
        item = self.prepare(messages, system)
        with self._lock:
            new_ids, _ = self._generate([item], settings)
        answer = AnswerText(self.tokenizer, self.stop_ids, settings.stop)
        answer.push(new_ids[0].tolist())
        return self._result(item, answer)

    def generate_batch(
        self, conversations: Sequence[Sequence[Message]], *, system: str | None = None, **generation: Any
    ) -> list[ChatResult]:
        """Answer several conversations in one left-padded batch (greedy results equal one-by-one answers)."""
        if not conversations:
            return []
        settings = _resolve_settings(self.generation_config, generation)
        items = [self.prepare(conv, system) for conv in conversations]
        with self._lock:
            new_ids, _ = self._generate(items, settings)
        results = []
        for item, row in zip(items, new_ids.tolist(), strict=True):
            answer = AnswerText(self.tokenizer, self.stop_ids, settings.stop)
            answer.push(row)
            results.append(self._result(item, answer))
        return results

    def stream(
        self, messages: Sequence[Message], *, system: str | None = None, **generation: Any
    ) -> Generator[StreamChunk, None, None]:
        """Yield the answer as text deltas; the last chunk carries ``finish_reason`` and ``usage``."""
        settings = _resolve_settings(self.generation_config, generation)
        item = self.prepare(messages, system)
        queue: SimpleQueue = SimpleQueue()
        cancel = threading.Event()

        def work() -> None:
            try:
                with self._lock:
                    self._generate([item], settings, streamer=_StreamBridge(queue), cancel=cancel)
                queue.put(("done", None))
            except BaseException as exc:  # handed to the consumer
                queue.put(("error", exc))

        worker = threading.Thread(target=work, name="belle-vl-generate", daemon=True)
        worker.start()
        answer = AnswerText(self.tokenizer, self.stop_ids, settings.stop)
        try:
            while True:
                kind, payload = queue.get()
                if kind == "error":
                    raise payload
                if kind == "done":
                    break
                answer.push(payload)
                if answer.finished:
                    cancel.set()
                delta = answer.safe_delta()
                if delta:
                    yield StreamChunk(delta)
            result = self._result(item, answer)
            yield StreamChunk(answer.rest(), finish_reason=result.finish_reason, usage=result.usage)
        finally:
            cancel.set()
            worker.join()

    async def achat(self, messages: Sequence[Message], **generation: Any) -> ChatResult:
        """:meth:`chat` in a worker thread."""
        return await asyncio.to_thread(self.chat, messages, **generation)

    async def agenerate_batch(self, conversations: Sequence[Sequence[Message]], **generation: Any) -> list[ChatResult]:
        return await asyncio.to_thread(self.generate_batch, conversations, **generation)

    async def astream(self, messages: Sequence[Message], **generation: Any) -> AsyncIterator[StreamChunk]:
        """:meth:`stream` driven from a worker thread; chunks arrive without blocking the event loop."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        iterator = self.stream(messages, **generation)
        stop = threading.Event()

        def pump() -> None:
            try:
                for chunk in iterator:
                    loop.call_soon_threadsafe(queue.put_nowait, ("chunk", chunk))
                    if stop.is_set():
                        break
                loop.call_soon_threadsafe(queue.put_nowait, ("done", None))
            except BaseException as exc:
                loop.call_soon_threadsafe(queue.put_nowait, ("error", exc))
            finally:
                iterator.close()

        task = loop.run_in_executor(None, pump)
        try:
            while True:
                kind, payload = await queue.get()
                if kind == "chunk":
                    yield payload
                elif kind == "error":
                    raise payload
                else:
                    break
        finally:
            stop.set()
            await task


__all__ = ["BelleVL", "GENERATION_ARGS", "QUANTIZE_CHOICES", "cpu_has_native_bf16", "quantize_language_model"]
