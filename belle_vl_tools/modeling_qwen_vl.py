"""The Qwen-VL architecture (Belle-VL, Qwen-VL-Chat; text-only Qwen-Chat without the ``visual`` block).

Module and parameter names equal the published checkpoints' keys (``transformer.h.0.attn.c_attn.weight``,
``transformer.visual.attn_pool.query``, ...), so ``from_pretrained`` loads them with no renaming.

Deliberate differences from the reference implementation (each covered by a test):

* Images enter the forward pass only as ``pixel_values`` (or precomputed ``image_features``) at the positions of
  ``<imgpad>`` tokens. The forward pass never reads paths or URLs out of token ids.
* Rotary positions and the logn scaling follow ``position_ids`` (derived from the attention mask), and the dynamic
  NTK factor is taken from each row's own length, so a left-padded batch computes what each prompt computes alone.
* Continuing a prefill on top of a cache takes the past length from the cache itself, so several new tokens can be
  prefilled after a cached prefix.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_qwen_vl import NUM_IMAGE_QUERIES, QWenConfig

#: transformers renamed the cache argument and output field from ``past_key_values`` to ``cache`` (5.24); the model
#: accepts both and answers in the installed version's name.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _cache_output(cls: type, cache: Cache | None, **fields: Any) -> Any:
    return cls(**fields, **{CACHE_FIELD: cache})


# ---------------------------------------------------------------------------------------------------------------
# Language model
# ---------------------------------------------------------------------------------------------------------------


class QWenRMSNorm(nn.Module):
    """RMSNorm computed in float32, cast back to the input dtype, then scaled."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def ntk_alpha(length: int, seq_length: int) -> float:
    """Dynamic-NTK factor for a sequence of ``length`` tokens (1.0 up to ``seq_length``)."""
    if length <= 0:
        return 1.0
    alpha = 2 ** math.ceil(math.log(length / seq_length, 2) + 1) - 1
    return float(max(alpha, 1))


class QWenRotaryEmbedding(nn.Module):
    """Rotary embedding (rotate-half layout) with Qwen's dynamic NTK base scaling.

    The frequencies are computed on the fly from ``config`` (a few dozen values), so there is no buffer that
    meta-device loading could leave uninitialised.
    """

    def __init__(self, config: QWenConfig) -> None:
        super().__init__()
        self.dim = config.rotary_dim
        self.base = float(config.rotary_emb_base)
        self._inv_freq: dict[tuple[float, torch.device], torch.Tensor] = {}

    def inv_freq(self, alpha: float, device: torch.device) -> torch.Tensor:
        key = (alpha, device)
        if key not in self._inv_freq:
            base = self.base * alpha ** (self.dim / (self.dim - 2))
            exponents = torch.arange(0, self.dim, 2, device=device).float() / self.dim
            self._inv_freq[key] = 1.0 / (base**exponents)
        return self._inv_freq[key]

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, alphas: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of shape [batch, seq, dim] in float32, one NTK factor per row."""
        inv_freq = torch.stack([self.inv_freq(a, position_ids.device) for a in alphas])  # [B, dim/2]
        freqs = position_ids.float()[:, :, None] * inv_freq[:, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` channels of ``t`` [B, T, H, D] in float32."""
    rot_dim = cos.shape[-1]
    tf = t.float()
    t_rot, t_pass = tf[..., :rot_dim], tf[..., rot_dim:]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    t_rot = t_rot * cos + rotate_half(t_rot) * sin
    return torch.cat((t_rot, t_pass), dim=-1).type_as(t)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention over [B, H, T, D] tensors; returns [B, T, H, D] and the weights."""
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights


class QWenAttention(nn.Module):
    def __init__(self, config: QWenConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.kv_channels
        self.projection_size = self.num_heads * self.head_dim
        self.scaling = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
        self.seq_length = config.seq_length
        self.is_causal = True
        self.num_key_value_groups = 1
        self.c_attn = nn.Linear(config.hidden_size, 3 * self.projection_size, bias=True)
        self.c_proj = nn.Linear(self.projection_size, config.hidden_size, bias=not config.no_bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        logn: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        bsz, q_len, _ = hidden_states.shape
        shape = (bsz, q_len, self.num_heads, self.head_dim)
        q, k, v = self.c_attn(hidden_states).split(self.projection_size, dim=-1)
        cos, sin = rotary
        q = apply_rotary(q.view(shape), cos, sin).transpose(1, 2)
        k = apply_rotary(k.view(shape), cos, sin).transpose(1, 2)
        v = v.view(shape).transpose(1, 2)
        if logn is not None:
            q = q * logn[:, None, :, None].to(q.dtype)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)

        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, _ = attention(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=self.config.attn_dropout_prob if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        return self.c_proj(out.reshape(bsz, q_len, self.projection_size))


class QWenMLP(nn.Module):
    """c_proj(w1(x) * silu(w2(x))): ``w2`` is the gate."""

    def __init__(self, config: QWenConfig) -> None:
        super().__init__()
        width = config.intermediate_size // 2
        self.w1 = nn.Linear(config.hidden_size, width, bias=not config.no_bias)
        self.w2 = nn.Linear(config.hidden_size, width, bias=not config.no_bias)
        self.c_proj = nn.Linear(width, config.hidden_size, bias=not config.no_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


class QWenBlock(GradientCheckpointingLayer):
    def __init__(self, config: QWenConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = QWenRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = QWenAttention(config, layer_idx)
        self.ln_2 = QWenRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = QWenMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        logn: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(
            self.ln_1(hidden_states), rotary, logn, attention_mask, past_key_values, **kwargs
        )
        return hidden_states + self.mlp(self.ln_2(hidden_states))


# ---------------------------------------------------------------------------------------------------------------
# Vision tower and resampler
# ---------------------------------------------------------------------------------------------------------------


def resize_grid_embedding(pos: torch.Tensor, num_positions: int) -> torch.Tensor:
    """Resize a square grid of position embeddings [n*n, C] to [m*m, C] (bicubic, float32)."""
    src = int(math.isqrt(pos.shape[0]))
    tgt = int(math.isqrt(num_positions))
    if src == tgt:
        return pos
    grid = pos.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).flatten(0, 2).to(pos.dtype)


def sincos_grid_embedding(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding [grid_size**2, dim] (first half from rows, second from columns)."""

    def one_axis(d: int, positions: torch.Tensor) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        angles = positions.reshape(-1)[:, None] * omega[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="xy")
    return torch.cat([one_axis(dim // 2, grid_w), one_axis(dim // 2, grid_h)], dim=1).float()


class VisualAttention(nn.Module):
    """Self-attention whose fused projection is interleaved per head: [q_0 k_0 v_0 q_1 k_1 v_1 ...]."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, n, width = x.shape
        qkv = self.in_proj(x).view(bsz, n, self.heads, 3 * self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.split(self.head_dim, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(bsz, n, width))


class VisualMLP(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class VisualAttentionBlock(GradientCheckpointingLayer):
    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=1e-6)
        self.ln_2 = nn.LayerNorm(width, eps=1e-6)
        self.attn = VisualAttention(width, heads)
        self.mlp = VisualMLP(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class VisualTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(VisualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class ResamplerAttention(nn.Module):
    """Multi-head cross-attention with the parameter layout of ``torch.nn.MultiheadAttention`` ([Q;K;V])."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        bsz, nq, dim = query.shape
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(bsz, t.shape[1], self.heads, dim // self.heads).transpose(1, 2)

        q, k, v = heads(F.linear(query, w_q, b_q)), heads(F.linear(key, w_k, b_k)), heads(F.linear(value, w_v, b_v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(bsz, nq, dim))


class Resampler(nn.Module):
    """Cross-attention of ``grid_size**2`` learned queries (256 in published checkpoints) over the patch features."""

    def __init__(self, dim: int, kv_dim: int, grid_size: int = 16) -> None:
        super().__init__()
        self.num_queries = grid_size**2
        self.grid_size = grid_size
        self.pos_embed = nn.Parameter(sincos_grid_embedding(dim, grid_size), requires_grad=False)
        self.query = nn.Parameter(torch.zeros(self.num_queries, dim))
        self.kv_proj = nn.Linear(kv_dim, dim, bias=False) if kv_dim != dim else nn.Identity()
        self.attn = ResamplerAttention(dim, dim // 128)
        self.ln_q = nn.LayerNorm(dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # transformers leaves the frozen pos_embed in float32 when it loads the model in bf16/fp16: cast it here
        key_pos = resize_grid_embedding(self.pos_embed, x.shape[1]).to(x.dtype)
        x = self.ln_kv(self.kv_proj(x))
        q = (self.ln_q(self.query) + self.pos_embed.to(x.dtype)).unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.attn(q, x + key_pos.unsqueeze(0), x)


class VisionTransformer(nn.Module):
    """ViT-bigG-style tower (no class token) followed by the resampler: pixels [B, 3, S, S] -> [B, n_queries, D]."""

    def __init__(self, visual: dict[str, Any]) -> None:
        super().__init__()
        width, patch = int(visual["width"]), int(visual["patch_size"])
        self.image_size = int(visual["image_size"])
        self.output_dim = int(visual["output_dim"])
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        # 256 patch positions (a 16x16 grid resized to the patch grid) whatever n_queries is, as in the reference.
        self.positional_embedding = nn.Parameter(torch.empty(NUM_IMAGE_QUERIES, width))
        self.ln_pre = nn.LayerNorm(width, eps=1e-6)
        self.transformer = VisualTransformer(width, int(visual["layers"]), int(visual["heads"]), visual["mlp_ratio"])
        self.attn_pool = Resampler(
            self.output_dim, width, grid_size=math.isqrt(int(visual.get("n_queries", NUM_IMAGE_QUERIES)))
        )
        self.ln_post = nn.LayerNorm(self.output_dim, eps=1e-6)
        self.proj = nn.Parameter(torch.empty(self.output_dim, self.output_dim))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values.to(device=self.conv1.weight.device, dtype=self.conv1.weight.dtype)
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [B, g*g, width], patches in row-major order
        x = x + resize_grid_embedding(self.positional_embedding, x.shape[1])
        x = self.transformer(self.ln_pre(x))
        x = self.ln_post(self.attn_pool(x))
        return x @ self.proj


# ---------------------------------------------------------------------------------------------------------------
# Pretrained model, base model and causal LM
# ---------------------------------------------------------------------------------------------------------------


#: Token ids that end a chat reply: ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` (offsets from endoftext).
def stop_token_ids(eod_id: int) -> list[int]:
    return [eod_id, eod_id + 2, eod_id + 1]


class QWenPreTrainedModel(PreTrainedModel):
    config: QWenConfig
    config_class = QWenConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["QWenBlock", "VisualAttentionBlock"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = False
    _supports_attention_backend = True
    _can_compile_fullgraph = False
    input_modalities = ["image", "text"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, ResamplerAttention):
            init.xavier_uniform_(module.in_proj_weight)
            init.zeros_(module.in_proj_bias)
        elif isinstance(module, Resampler):
            init.trunc_normal_(module.query, std=0.02)
            init.copy_(module.pos_embed, sincos_grid_embedding(module.pos_embed.shape[1], module.grid_size))
        elif isinstance(module, VisionTransformer):
            width = module.positional_embedding.shape[1]
            init.normal_(module.positional_embedding, std=width**-0.5)
            init.normal_(module.proj, std=module.output_dim**-0.5)
        elif isinstance(module, QWenAttention | QWenMLP):
            # GPT-2 style scaled init of the residual projections, as the reference does
            init.normal_(module.c_proj.weight, std=std / math.sqrt(2 * self.config.num_hidden_layers))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any):  # type: ignore[override]
        """Load as :meth:`transformers.PreTrainedModel.from_pretrained`, with Qwen's own defaults.

        Without an explicit ``dtype``, the checkpoint's ``bf16`` / ``fp16`` / ``fp32`` flags choose it as the
        reference does (none set: bf16 where the GPU supports it, else fp16 on a GPU, else fp32). With a
        ``quantization_config``, the vision tower is kept out of quantization.
        """
        if "dtype" not in kwargs and "torch_dtype" not in kwargs:
            config = kwargs.get("config")
            if not isinstance(config, QWenConfig):
                config = QWenConfig.from_pretrained(
                    pretrained_model_name_or_path,
                    **{k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs},
                )
            kwargs["dtype"] = default_dtype(config)
        quant = kwargs.get("quantization_config")
        if quant is not None:
            keep_out = ["transformer.visual", "lm_head"]
            current = getattr(quant, "llm_int8_skip_modules", None)
            if current is None and hasattr(quant, "llm_int8_skip_modules"):
                quant.llm_int8_skip_modules = keep_out
            elif isinstance(current, list) and "transformer.visual" not in current:
                current.append("transformer.visual")
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if isinstance(model, QWenLMHeadModel):
            model.ensure_chat_stop_tokens()
        return model


def default_dtype(config: QWenConfig) -> torch.dtype:
    """The dtype the reference picks from the config's precision flags and the hardware."""
    if config.bf16:
        return torch.bfloat16
    if config.fp16:
        return torch.float16
    if config.fp32:
        return torch.float32
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


class QWenModel(QWenPreTrainedModel):
    def __init__(self, config: QWenConfig) -> None:
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.drop = nn.Dropout(config.emb_dropout_prob)
        self.rotary_emb = QWenRotaryEmbedding(config)
        self.h = nn.ModuleList(QWenBlock(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = QWenRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.visual = VisionTransformer(config.visual) if config.visual is not None else None
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.wte = value

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision features [num_images, n_queries, hidden] for preprocessed images [num_images, 3, S, S]."""
        if self.visual is None:
            raise ValueError("This checkpoint has no vision tower (no `visual` block in config.json): text only.")
        return self.visual(pixel_values)

    def _insert_images(
        self,
        input_ids: torch.Tensor,
        inputs_embeds: torch.Tensor,
        pixel_values: torch.Tensor | None,
        image_features: torch.Tensor | None,
    ) -> torch.Tensor:
        pad_mask = input_ids == self.config.image_pad_id
        num_positions = int(pad_mask.sum())
        if num_positions == 0:
            return inputs_embeds
        if image_features is None:
            image_features = self.get_image_features(pixel_values)
        flat = image_features.reshape(-1, image_features.shape[-1])
        per_image = self.config.num_image_queries
        if num_positions > flat.shape[0]:
            raise ValueError(
                f"The input holds {num_positions} image positions but {flat.shape[0] // per_image} images were given "
                f"({per_image} positions each): build inputs with the processor."
            )
        # Positions of images inside a cached prefix are not in `input_ids`: the ones present are the last ones.
        flat = flat[flat.shape[0] - num_positions :]
        flat = flat.to(device=inputs_embeds.device, dtype=inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(pad_mask.unsqueeze(-1), flat)

    def _ntk_alphas(
        self, batch: int, total_len: int, attention_mask: torch.Tensor | None, past_key_values: Cache | None
    ) -> list[float]:
        if self.training or not self.config.use_dynamic_ntk:
            return [1.0] * batch
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if past > 0 and getattr(past_key_values, "qwen_ntk_alphas", None) is not None:
            return list(past_key_values.qwen_ntk_alphas)  # the prefill's factor is kept while decoding
        if attention_mask is not None and attention_mask.dim() == 2:
            lengths = attention_mask.sum(-1).tolist()
        else:
            lengths = [total_len] * batch
        alphas = [ntk_alpha(int(n), self.config.seq_length) for n in lengths]
        if past_key_values is not None:
            past_key_values.qwen_ntk_alphas = alphas
        return alphas

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        if past_key_values is None:
            past_key_values = kwargs.pop("cache", None)
        kwargs.pop("cache", None)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
            if pixel_values is not None or image_features is not None:
                if self.visual is None:
                    raise ValueError("Images were given to a text-only checkpoint (no `visual` block).")
                inputs_embeds = self._insert_images(input_ids, inputs_embeds, pixel_values, image_features)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)

        batch, q_len = inputs_embeds.shape[:2]
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            if attention_mask is not None and attention_mask.dim() == 2:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q_len:]
            else:
                position_ids = torch.arange(past, past + q_len, device=inputs_embeds.device).unsqueeze(0)
        position_ids = position_ids.expand(batch, -1)

        alphas = self._ntk_alphas(batch, past + q_len, attention_mask, past_key_values)
        rotary = self.rotary_emb(position_ids, alphas)
        logn = None
        if self.config.use_logn_attn and not self.training:
            pos1 = position_ids.double() + 1
            seq_len = self.config.seq_length
            logn = torch.where(pos1 > seq_len, pos1.log() / math.log(seq_len), torch.ones_like(pos1)).float()

        # positional: the cache parameter's name differs between transformers versions
        mask = create_causal_mask(self.config, inputs_embeds, attention_mask, past_key_values, position_ids)
        hidden_states = self.drop(inputs_embeds)
        for block in self.h:
            hidden_states = block(hidden_states, rotary, logn, mask, past_key_values, **kwargs)
        hidden_states = self.ln_f(hidden_states)
        return _cache_output(
            BaseModelOutputWithPast, past_key_values if use_cache else None, last_hidden_state=hidden_states
        )


class QWenLMHeadModel(QWenPreTrainedModel, GenerationMixin):
    """Qwen-VL / Belle-VL causal language model (``architectures: ["QWenLMHeadModel"]``)."""

    def __init__(self, config: QWenConfig) -> None:
        super().__init__(config)
        self.transformer = QWenModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.transformer.get_image_features(pixel_values)

    def ensure_chat_stop_tokens(self) -> None:
        """Make a plain ``generate`` stop at ``<|im_end|>`` and ``<|im_start|>`` as well as ``<|endoftext|>``.

        Published generation_config.json files name only ``<|endoftext|>``; the reference's ``chat`` adds the
        other two itself. ``<|endoftext|>`` is taken from the generation config's pad/eos id.
        """
        gc = self.generation_config
        eos = gc.eos_token_id if gc.eos_token_id is not None else gc.pad_token_id
        if eos is None:
            return
        eos_list = [eos] if isinstance(eos, int) else list(eos)
        eod = min(eos_list)
        gc.eos_token_id = list(dict.fromkeys(eos_list + stop_token_ids(eod)))
        if gc.pad_token_id is None:
            gc.pad_token_id = eod

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits (and the loss when ``labels`` are given; -100 marks positions to ignore)."""
        if past_key_values is None:
            past_key_values = kwargs.pop("cache", None)
        kwargs.pop("cache", None)
        outputs = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            pixel_values=pixel_values,
            image_features=image_features,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return _cache_output(CausalLMOutputWithPast, getattr(outputs, CACHE_FIELD), loss=loss, logits=logits)

    # The model card's API (a thin layer over the runtime; see runtime.py) -----------------------------------
    def chat(
        self,
        tokenizer: Any,
        query: str,
        history: list | None = None,
        system: str = "You are a helpful assistant.",
        **generation_kwargs: Any,
    ) -> tuple[str, list]:
        """Answer ``query`` (images named as ``<img>path</img>``) after ``history``; returns (response, history)."""
        from .runtime import model_card_chat

        return model_card_chat(self, tokenizer, query, history, system, generation_kwargs)

    def chat_stream(
        self,
        tokenizer: Any,
        query: str,
        history: list | None = None,
        system: str = "You are a helpful assistant.",
        **generation_kwargs: Any,
    ):
        """Yield the growing response to ``query``, as the reference's ``chat_stream`` does."""
        from .runtime import model_card_chat_stream

        yield from model_card_chat_stream(self, tokenizer, query, history, system, generation_kwargs)


__all__ = ["QWenLMHeadModel", "QWenModel", "QWenPreTrainedModel", "default_dtype", "ntk_alpha", "stop_token_ids"]
