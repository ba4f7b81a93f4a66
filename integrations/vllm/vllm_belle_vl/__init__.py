"""vLLM plugin for Belle-VL / Qwen-VL-Chat checkpoints (``architectures: ["QWenLMHeadModel"]``).

vLLM calls :func:`register` in each of its processes (entry point group ``vllm.general_plugins``). It registers

* the configuration, tokenizer and processor classes of belle-vl-tools with transformers' Auto classes, so vLLM
  reads the published folder with no ``--trust-remote-code`` and no code from the checkpoint;
* the model class (:mod:`vllm_belle_vl.model`) under the architecture name ``QWenLMHeadModel``;
* the ChatML stop tokens: published generation_config.json files name only ``<|endoftext|>``; the reference's
  ``chat`` also stops at ``<|im_end|>`` and ``<|im_start|>``, and so does vLLM with the plugin installed.
"""

from __future__ import annotations

from typing import Any

ARCHITECTURE = "QWenLMHeadModel"
_done = False


def register() -> None:
    """Register the architecture with vLLM (idempotent; vLLM calls it in every process it starts)."""
    global _done
    if _done:
        return
    _done = True
    from vllm import ModelRegistry

    from belle_vl_tools._registration import register_auto_classes

    register_auto_classes()
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "vllm_belle_vl.model:QWenVLForCausalLM")
    _add_chat_stop_tokens()


def chat_stop_token_ids(generation_config: dict[str, Any]) -> list[int] | None:
    """The eos ids of a Qwen(-VL) generation config with ``<|im_end|>`` and ``<|im_start|>`` added after
    ``<|endoftext|>`` (the smallest id named), or None when it names none."""
    from belle_vl_tools.modeling_qwen_vl import stop_token_ids

    eos = generation_config.get("eos_token_id", generation_config.get("pad_token_id"))
    if eos is None:
        return None
    ids = [eos] if isinstance(eos, int) else list(eos)
    return list(dict.fromkeys(ids + stop_token_ids(min(ids))))


def _add_chat_stop_tokens() -> None:
    from vllm.config.model import ModelConfig

    original = ModelConfig.try_get_generation_config
    if getattr(original, "_belle_vl", False):
        return

    def try_get_generation_config(self: ModelConfig) -> dict[str, Any]:
        config = original(self)
        if getattr(self.hf_config, "model_type", None) == "qwen" and ARCHITECTURE in (
            getattr(self.hf_config, "architectures", None) or []
        ):
            ids = chat_stop_token_ids(config)
            if ids is not None:
                config = {**config, "eos_token_id": ids}
        return config

    try_get_generation_config._belle_vl = True  # type: ignore[attr-defined]
    ModelConfig.try_get_generation_config = try_get_generation_config  # type: ignore[method-assign]


__all__ = ["ARCHITECTURE", "chat_stop_token_ids", "register"]
