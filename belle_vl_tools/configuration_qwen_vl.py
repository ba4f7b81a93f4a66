"""Configuration of Qwen-VL-architecture models (Belle-VL, Qwen-VL-Chat) and of the text-only Qwen(-Chat) models.

The field names are those of the published ``config.json`` files (``model_type`` "qwen"), so a published
configuration loads as is. ``seq_length`` and the ``visual`` block exist only in the JSON files of the published
checkpoints; here they are ordinary fields. A configuration without ``visual`` describes a text-only model.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import PreTrainedConfig

from .checkpoint_checks import check_config

#: The keys of the ``visual`` block, with Qwen-VL-Chat's values as defaults (Belle-VL differs in ``output_dim``).
DEFAULT_VISUAL: dict[str, Any] = {
    "heads": 16,
    "image_size": 448,
    "image_start_id": 151857,
    "layers": 48,
    "mlp_ratio": 4.9231,
    "output_dim": 4096,
    "patch_size": 14,
    "width": 1664,
}

#: Number of vectors the resampler produces per image, whatever the image or patch size, unless the ``visual``
#: block sets ``n_queries`` (a parameter of the reference vision tower; published checkpoints leave it at 256).
NUM_IMAGE_QUERIES = 256


class QWenConfig(PreTrainedConfig):
    """Configuration of a Qwen / Qwen-VL causal language model.

    Defaults are those of Qwen-VL-Chat; Belle-VL's ``config.json`` (Qwen-14B-Chat sizes) overrides them.
    """

    model_type = "qwen"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 151936
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    kv_channels: int = 128
    intermediate_size: int = 22016
    emb_dropout_prob: float = 0.0
    attn_dropout_prob: float = 0.0
    layer_norm_epsilon: float = 1e-6
    initializer_range: float = 0.02
    max_position_embeddings: int = 8192
    seq_length: int = 2048
    scale_attn_weights: bool = True
    use_cache: bool = True
    bf16: bool = False
    fp16: bool = False
    fp32: bool = False
    rotary_pct: float = 1.0
    rotary_emb_base: float | int = 10000
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    use_flash_attn: bool | str = "auto"
    no_bias: bool = True
    tie_word_embeddings: bool = False
    visual: dict[str, Any] | None = None
    tokenizer_type: str | None = "QWenTokenizer"
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        check_config(self)  # sizes within what the architecture admits, before anything is built
        if self.visual is not None:
            self.visual = {**DEFAULT_VISUAL, **self.visual}
            if self.visual["output_dim"] != self.hidden_size:
                raise ValueError(
                    f"visual.output_dim ({self.visual['output_dim']}) must equal hidden_size ({self.hidden_size}): "
                    "the resampler's outputs are inserted into the language model's embedding sequence."
                )
            n_queries = int(self.visual.get("n_queries", NUM_IMAGE_QUERIES))
            if n_queries < 1 or math.isqrt(n_queries) ** 2 != n_queries:
                raise ValueError(
                    f"visual.n_queries ({n_queries}) must be a perfect square: the resampler's queries form a grid."
                )
            if self.visual["output_dim"] % 128:
                raise ValueError(
                    f"visual.output_dim ({self.visual['output_dim']}) must be a multiple of 128: the resampler "
                    "uses attention heads of size 128."
                )
        super().__post_init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def image_start_id(self) -> int | None:
        """Id of ``<img>``; ``</img>`` and ``<imgpad>`` follow it. None for a text-only model."""
        return None if self.visual is None else int(self.visual["image_start_id"])

    @property
    def image_pad_id(self) -> int | None:
        """Id of ``<imgpad>``: the positions the image features fill. None for a text-only model."""
        return None if self.visual is None else int(self.visual["image_start_id"]) + 2

    @property
    def image_token_id(self) -> int | None:
        """transformers' name for the placeholder id (``generate`` reads it): :attr:`image_pad_id`."""
        return self.image_pad_id

    @property
    def num_image_queries(self) -> int:
        """Positions (and vision vectors) per image: ``visual.n_queries``, 256 in published checkpoints."""
        return int((self.visual or {}).get("n_queries", NUM_IMAGE_QUERIES))

    @property
    def rotary_dim(self) -> int:
        return int(self.kv_channels * self.rotary_pct)


__all__ = ["QWenConfig", "DEFAULT_VISUAL", "NUM_IMAGE_QUERIES"]
