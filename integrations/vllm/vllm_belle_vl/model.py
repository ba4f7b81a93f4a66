"""The Qwen-VL architecture (Belle-VL, Qwen-VL-Chat) on vLLM's building blocks.

The language model uses vLLM's tensor-parallel linear layers, vocabulary-parallel embedding and head, its
``Attention`` (paged KV cache) and rotary embedding; the vision tower and resampler are belle-vl-tools'
:class:`~belle_vl_tools.modeling_qwen_vl.VisionTransformer` (replicated on every rank: it is about 2 B parameters and
runs once per picture). Parameter names are the published checkpoints' (``transformer.h.0.attn.c_attn.weight``,
``transformer.h.0.mlp.w1.weight``, ``transformer.visual.attn_pool.query``, ...).

Prompts beyond ``seq_length`` (2048 in published checkpoints) are refused: there Qwen scales the rotary base by a
factor chosen from each prompt's length (dynamic NTK) and the queries by ``log(position) / log(seq_length)`` (logn
attention). Both are the identity up to ``seq_length`` and are exact there; beyond it, a per-request rotary base
does not fit vLLM's batched rotary cache, so vLLM's context limit stays at ``seq_length`` (it derives it from
config.json) and :class:`QWenVLForCausalLM` refuses a larger ``max_model_len``.

Pictures: each ``image_url`` / image part becomes ``<img>``, ``visual.n_queries`` (256) ``<imgpad>`` positions and
``</img>``, written where the picture stands by the checkpoint's chat template (``Picture N: <img></img>\\n``, N
counting per message) and tokenized by belle-vl-tools' tokenizer, exactly as ``BelleVL.chat`` lays it out.

LoRA (``--enable-lora``): PEFT adapters over the language model's linear layers, named as the published checkpoint
and ``belle-vl finetune`` name them (``c_attn``, ``attn.c_proj``, ``mlp.c_proj``, ``w1``, ``w2``). ``c_attn`` is one
adapter over the fused [Q; K; V]; the ``w2`` (gate) and ``w1`` adapters are the two slices of ``gate_up_proj``. The
vision tower is plain torch here, so an adapter with LoRA weights in ``transformer.visual`` (``--train-vision``) is
refused, as vLLM itself refuses whole trained modules (``modules_to_save``: ``--train-embeddings``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.config.multimodal import BaseDummyOptions
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsLoRA, SupportsMultiModal
from vllm.model_executor.models.module_mapping import MultiModelKeys
from vllm.model_executor.models.utils import WeightsMapper, _merge_multimodal_embeddings
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
    PromptUpdateDetails,
)
from vllm.sequence import IntermediateTensors

from belle_vl_tools.modeling_qwen_vl import VisionTransformer
from belle_vl_tools.tokenization_qwen_vl import IMG_TOKEN_SPAN

# ---------------------------------------------------------------------------------------------------------------
# Language model
# ---------------------------------------------------------------------------------------------------------------


class QWenAttention(nn.Module):
    """Self-attention with the fused ``c_attn`` projection ([Q; K; V], with bias) split across tensor-parallel ranks."""

    def __init__(self, config: Any, cache_config: Any, quant_config: Any, prefix: str) -> None:
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        total_heads = int(config.num_attention_heads)
        if total_heads % tp:
            raise ValueError(
                f"num_attention_heads ({total_heads}) is not divisible by --tensor-parallel-size ({tp}): pick a "
                "tensor-parallel size that divides it."
            )
        self.num_heads = total_heads // tp
        self.head_dim = int(config.kv_channels)
        self.q_size = self.num_heads * self.head_dim
        self.c_attn = QKVParallelLinear(
            config.hidden_size,
            self.head_dim,
            total_heads,
            total_heads,
            bias=True,
            quant_config=quant_config,
            prefix=f"{prefix}.c_attn",
        )
        self.c_proj = RowParallelLinear(
            total_heads * self.head_dim,
            config.hidden_size,
            bias=not config.no_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.c_proj",
        )
        self.rotary_emb = get_rope(
            self.head_dim,
            max_position=int(config.seq_length),
            is_neox_style=True,  # Qwen rotates halves (rotate_half), not interleaved pairs
            rope_parameters={"rope_type": "default", "rope_theta": float(config.rotary_emb_base)},
        )
        scaling = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
        self.attn = Attention(
            self.num_heads,
            self.head_dim,
            scaling,
            num_kv_heads=self.num_heads,
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=f"{prefix}.attn",
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.c_attn(hidden_states)
        q, k, v = qkv.split([self.q_size, self.q_size, self.q_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.c_proj(self.attn(q, k, v))
        return out


class QWenMLP(nn.Module):
    """``c_proj(w1(x) * silu(w2(x)))``: ``w2`` (the gate) and ``w1`` load into one merged column-parallel layer."""

    def __init__(self, config: Any, quant_config: Any, prefix: str) -> None:
        super().__init__()
        width = int(config.intermediate_size) // 2
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size,
            [width, width],
            bias=not config.no_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.gate_up_proj",
        )
        self.c_proj = RowParallelLinear(
            width, config.hidden_size, bias=not config.no_bias, quant_config=quant_config, prefix=f"{prefix}.c_proj"
        )
        self.act = SiluAndMul()  # silu(first half) * second half

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        out, _ = self.c_proj(self.act(gate_up))
        return out


class QWenBlock(nn.Module):
    def __init__(self, config: Any, cache_config: Any, quant_config: Any, prefix: str) -> None:
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = QWenAttention(config, cache_config, quant_config, f"{prefix}.attn")
        self.ln_2 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = QWenMLP(config, quant_config, f"{prefix}.mlp")

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(positions, self.ln_1(hidden_states))
        return hidden_states + self.mlp(self.ln_2(hidden_states))


class QWenModel(nn.Module):
    """``transformer``: embedding, blocks, final norm and (for Qwen-VL checkpoints) the vision tower."""

    def __init__(self, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        cache_config, quant_config = vllm_config.cache_config, vllm_config.quant_config
        self.wte = VocabParallelEmbedding(config.vocab_size, config.hidden_size, prefix=f"{prefix}.wte")
        self.h = nn.ModuleList(
            QWenBlock(config, cache_config, quant_config, f"{prefix}.h.{i}") for i in range(config.num_hidden_layers)
        )
        self.ln_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.visual = VisionTransformer(config.visual) if config.visual is not None else None

    def forward(self, positions: torch.Tensor, inputs_embeds: torch.Tensor) -> torch.Tensor:
        hidden_states = inputs_embeds
        for block in self.h:
            hidden_states = block(positions, hidden_states)
        return self.ln_f(hidden_states)


# ---------------------------------------------------------------------------------------------------------------
# Multimodal processing
# ---------------------------------------------------------------------------------------------------------------


class QWenVLProcessingInfo(BaseProcessingInfo):
    """Sizes of the checkpoint's pictures: ``visual.image_size`` pixels, ``visual.n_queries`` positions."""

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None} if self.get_hf_config().visual is not None else {"image": 0}

    def get_num_image_tokens(self) -> int:
        return int(self.get_hf_config().num_image_queries)

    def get_image_size(self) -> int:
        return int(self.get_hf_config().visual["image_size"])

    def span(self, num_pads: int) -> list[int]:
        """``<img>``, ``num_pads`` ``<imgpad>``, ``</img>``."""
        config = self.get_hf_config()
        return [config.image_start_id] + [config.image_pad_id] * num_pads + [config.image_start_id + 1]


class QWenVLDummyInputsBuilder(BaseDummyInputsBuilder[QWenVLProcessingInfo]):
    """Pictures of the tower's input size, each with its ``<img></img>`` placeholder (for vLLM's memory profiling)."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return "".join(f"Picture {i + 1}: <img></img>\n" for i in range(mm_counts.get("image", 0)))

    def get_dummy_mm_data(
        self, seq_len: int, mm_counts: Mapping[str, int], mm_options: Mapping[str, BaseDummyOptions] | None = None
    ) -> dict[str, Any]:
        side = self.info.get_image_size()
        return {
            "image": self._get_dummy_images(
                width=side,
                height=side,
                num_images=mm_counts.get("image", 0),
                overrides=(mm_options or {}).get("image"),
            )
        }


class QWenVLMultiModalProcessor(BaseMultiModalProcessor[QWenVLProcessingInfo]):
    """Pictures -> ``pixel_values`` through belle-vl-tools' image processor (bicubic resize, CLIP normalization).

    The tokenizer writes every picture's span with 256 ``<imgpad>`` ids (as the reference does); a checkpoint whose
    resampler has another number of queries (``visual.n_queries``) gets its spans resized here.
    """

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {"pixel_values": MultiModalFieldConfig.batched("image")}

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        config = self.info.get_hf_config()
        replacement = PromptUpdateDetails.select_token_id(
            self.info.span(self.info.get_num_image_tokens()), config.image_pad_id
        )
        return [PromptReplacement(modality="image", target=self.info.span(IMG_TOKEN_SPAN), replacement=replacement)]


# ---------------------------------------------------------------------------------------------------------------
# LoRA adapters
# ---------------------------------------------------------------------------------------------------------------

#: where the language model's blocks (the only layers vLLM's LoRA wraps here) and the vision tower live
LANGUAGE_MODEL_PREFIX = "transformer.h"
VISION_TOWER_PREFIX = "transformer.visual"


class _LanguageModelAdapters(WeightsMapper):
    """Published names unchanged; a LoRA tensor of the vision tower is refused.

    vLLM hands every tensor name of an adapter through the model's ``hf_to_vllm_mapper`` while it loads one (and
    checks only the last part of each name, e.g. ``c_proj``, against the model's LoRA layers). The vision tower
    (``transformer.visual``, plain torch here) has no LoRA layers, so its adapters would otherwise load and never
    apply (its ``mlp.c_proj`` shares the language model's name).
    """

    def map_name(self, key: str) -> str | None:
        if key.startswith(VISION_TOWER_PREFIX + ".") and ".lora_" in key:
            raise ValueError(
                f"This LoRA adapter adapts the vision tower ({key}): the vLLM plugin applies adapters to the language "
                "model only. Train it without --train-vision (`belle-vl finetune`), or serve it with `belle-vl serve "
                "--adapter`, which merges it whole."
            )
        return super().map_name(key)


# ---------------------------------------------------------------------------------------------------------------
# The causal LM
# ---------------------------------------------------------------------------------------------------------------


@MULTIMODAL_REGISTRY.register_processor(
    QWenVLMultiModalProcessor, info=QWenVLProcessingInfo, dummy_inputs=QWenVLDummyInputsBuilder
)
class QWenVLForCausalLM(nn.Module, SupportsMultiModal, SupportsLoRA):
    """Belle-VL / Qwen-VL-Chat (and text-only Qwen-Chat) for vLLM."""

    #: vLLM layer -> the adapter modules it holds, in slice order: ``c_attn`` is one adapter (as in the checkpoint
    #: and PEFT); ``gate_up_proj`` is [w2 (the gate); w1], as :attr:`_MERGED` loads it
    packed_modules_mapping = {"c_attn": ["c_attn"], "gate_up_proj": ["w2", "w1"]}
    hf_to_vllm_mapper = _LanguageModelAdapters()

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return None  # the chat template writes each picture's place ("Picture N: <img></img>\n")
        raise ValueError(f"Belle-VL takes pictures only, not {modality}.")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        max_len = vllm_config.model_config.max_model_len
        if max_len > config.seq_length:
            raise ValueError(
                f"max_model_len {max_len} is beyond this checkpoint's trained window (seq_length "
                f"{config.seq_length}): Qwen's dynamic-NTK rotary scaling and logn attention beyond it are not "
                f"implemented in this plugin. Use --max-model-len {config.seq_length} or less."
            )
        if float(config.rotary_pct) != 1.0:
            raise ValueError(f"rotary_pct {config.rotary_pct} is not supported: Qwen checkpoints rotate every channel.")
        self.transformer = QWenModel(vllm_config, prefix="transformer")
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix="lm_head")
        self.logits_processor = LogitsProcessor(config.vocab_size)

    @classmethod
    def get_mm_mapping(cls) -> MultiModelKeys:
        """LoRA applies to the language model's blocks only, never to the vision tower and its resampler."""
        return MultiModelKeys.from_string_field(language_model=LANGUAGE_MODEL_PREFIX, tower_model=VISION_TOWER_PREFIX)

    # --- pictures -----------------------------------------------------------------------------------------------
    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            return []
        visual = self.transformer.visual
        if visual is None:
            raise ValueError("This checkpoint has no vision tower (no `visual` block in config.json): text only.")
        if isinstance(pixel_values, list | tuple):
            pixel_values = torch.stack(list(pixel_values))
        features = visual(pixel_values)  # [num_images, n_queries, hidden]
        return tuple(features.unbind(0))

    def embed_input_ids(
        self,
        input_ids: torch.Tensor,
        multimodal_embeddings: MultiModalEmbeddings | None = None,
        *,
        is_multimodal: torch.Tensor | None = None,
    ) -> torch.Tensor:
        embeds = self.transformer.wte(input_ids)
        if multimodal_embeddings is None or len(multimodal_embeddings) == 0:
            return embeds
        return _merge_multimodal_embeddings(embeds, multimodal_embeddings, is_multimodal)

    # --- forward ------------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.embed_input_ids(input_ids)
        return self.transformer(positions, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    # --- weights ------------------------------------------------------------------------------------------------
    #: published names -> (merged vLLM parameter, shard id): the gate (w2) is the first half of gate_up_proj
    _MERGED = {".mlp.w2.": (".mlp.gate_up_proj.", 0), ".mlp.w1.": (".mlp.gate_up_proj.", 1)}

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load published checkpoint tensors; every parameter must be given (a missing one raises)."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue  # some exports keep the rotary buffer: recomputed here
            shard: int | None = None
            for old, (new, shard_id) in self._MERGED.items():
                if old in name:
                    name, shard = name.replace(old, new), shard_id
                    break
            if name not in params:
                raise ValueError(
                    f"The checkpoint holds {name!r}, which this model does not have: is it a Qwen-VL / Belle-VL "
                    "checkpoint (architectures QWenLMHeadModel)?"
                )
            param = params[name]
            loader = getattr(param, "weight_loader", default_weight_loader)
            if shard is None:
                loader(param, tensor)  # c_attn: the fused [Q; K; V] is split per rank by QKVParallelLinear
            else:
                loader(param, tensor, shard)
            loaded.add(name)
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(f"The checkpoint lacks {len(missing)} weight(s) of the model, e.g. {missing[:3]}.")
        return loaded


__all__ = ["QWenVLForCausalLM", "QWenVLMultiModalProcessor", "QWenVLProcessingInfo"]
