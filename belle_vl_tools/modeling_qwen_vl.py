"""The Qwen-VL architecture (Belle-VL, Qwen-VL-Chat; text-only Qwen-Chat without the ``visual`` block).

Module and parameter names equal the published checkpoints' keys (``transformer.h.0.attn.c_attn.weight``,
``transformer.visual.attn_pool.query``, ...), so ``from_pretrained`` loads them with no renaming.

Deliberate differences from the reference implementation (each covered by a test):

* Images enter the forward pass only as ``pixel_values`` (or precomputed ``image_features``) at the positions of
  ``<imgpad>`` tokens (a placeholder mask over ``input_ids``, or over ``inputs_embeds`` by comparing with the
  ``<imgpad>`` embedding). The forward pass never reads paths or URLs out of token ids; an image span without
  pictures, or a count of pictures that does not match the spans, raises instead of answering without them.
* Rotary positions and the logn scaling follow ``position_ids`` (derived from the attention mask), and the dynamic
  NTK factor is taken from each row's own length, so a left-padded batch computes what each prompt computes alone.
  The factor chosen at prefill is kept for the decoding steps in :class:`QWenCache` (the reference keeps it on
  its rotary module).
* Continuing a prefill on top of a cache takes the past length from the cache itself, so several new tokens can be
  prefilled after a cached prefix.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, StaticCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import logging

from .configuration_qwen_vl import NUM_IMAGE_QUERIES, QWenConfig

logger = logging.get_logger(__name__)

#: transformers renamed the cache argument and output field from ``past_key_values`` to ``cache`` (5.24); the model
#: accepts both and answers in the installed version's name.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _cache_output(cls: type, cache: Cache | None, **fields: Any) -> Any:
    return cls(**fields, **{CACHE_FIELD: cache})


def _flag(value: bool | None, config: Any, name: str) -> bool:
    """An ``output_*`` / ``return_dict`` argument, defaulting to the config's value as transformers models do."""
    return bool(getattr(config, name, False)) if value is None else bool(value)


class QWenCacheLayer(DynamicLayer):
    """A :class:`~transformers.cache_utils.DynamicLayer` whose keys and values sit at the front of a buffer with
    room to spare, so that a decoding step writes its one new position in place.

    ``DynamicLayer`` concatenates the whole cache with each new token (a copy of every cached key and value per
    step and layer: on a CPU the largest cost of a decoding step beside the weights). ``keys`` / ``values`` stay
    what transformers expects, [batch, heads, length, head_dim] tensors (views of the buffer); anything that
    replaces them (cropping, beam reordering, batch selection, offloading) is taken as the new content on the next
    update. Where a step needs gradients through the cache it concatenates as ``DynamicLayer`` does.
    """

    #: spare positions allocated beyond what is needed: a quarter of the length, at least 128 and at most 1024
    MIN_ROOM, MAX_ROOM = 128, 1024

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._room: tuple[torch.Tensor, torch.Tensor] | None = None

    def _fits(self, new: torch.Tensor, total: int) -> bool:
        room = getattr(self, "_room", None)
        if room is None or total > room[0].shape[-2]:
            return False
        keys, buf = self.keys, room[0]
        if buf.is_inference() and not torch.is_inference_mode_enabled():
            return False  # an inference tensor cannot be written outside inference mode
        if buf.dtype != new.dtype or buf.device != new.device or buf.shape[:2] != new.shape[:2]:
            return False
        if keys is None or keys.numel() == 0:
            return True
        values = self.values
        assert values is not None  # set together with the keys
        return all(
            t.data_ptr() == b.data_ptr() and t.stride() == b.stride() and t.shape[:2] == b.shape[:2]
            for t, b in ((keys, room[0]), (values, room[1]))
        )

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad):
            self._room = None
            return super().update(key_states, value_states, *args, **kwargs)
        past = self.get_seq_length()
        total = past + key_states.shape[-2]
        if not self._fits(key_states, total):
            capacity = total + min(self.MAX_ROOM, max(self.MIN_ROOM, total // 4))
            batch, heads, _, dim = key_states.shape
            keys = key_states.new_empty(batch, heads, capacity, dim)
            values = value_states.new_empty(batch, heads, capacity, value_states.shape[-1])
            if past:
                assert self.keys is not None and self.values is not None  # past tokens: the layer holds them
                keys[..., :past, :] = self.keys
                values[..., :past, :] = self.values
            self._room = (keys, values)
        assert self._room is not None  # it fits, or was just made
        keys, values = self._room
        keys[..., past:total, :] = key_states
        values[..., past:total, :] = value_states
        self.keys, self.values = keys[..., :total, :], values[..., :total, :]
        return self.keys, self.values

    def reset(self) -> None:
        super().reset()
        self._room = None

    def hold(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Hold exactly these keys and values [batch, heads, length, head_dim] (copied, with room to grow)."""
        self.reset()
        self.update(keys, values)


class _KeepsNtkFactors:
    """Keeps the dynamic-NTK factor of each row of a cache, following the rows through beam reordering, repetition
    and selection (a mixin of :class:`QWenCache` and :class:`QWenStaticCache`).

    Qwen rotates keys with a base scaled by a factor that depends on the prompt's length (:func:`ntk_alpha`); the
    reference keeps the factor chosen at prefill for all decoding steps. The factor is chosen when the cache is first
    filled.
    """

    ntk_alphas: list[float] | None

    def __init__(self, *args: Any, ntk_alphas: Sequence[float] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ntk_alphas = [float(a) for a in ntk_alphas] if ntk_alphas is not None else None

    def reset(self) -> None:
        super().reset()  # type: ignore[misc]
        self.ntk_alphas = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)  # type: ignore[misc]
        if self.ntk_alphas is not None:
            self.ntk_alphas = [self.ntk_alphas[int(i)] for i in beam_idx.tolist()]

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)  # type: ignore[misc]
        if self.ntk_alphas is not None:
            self.ntk_alphas = [a for a in self.ntk_alphas for _ in range(repeats)]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)  # type: ignore[misc]
        if self.ntk_alphas is not None:
            self.ntk_alphas = [self.ntk_alphas[int(i)] for i in torch.as_tensor(indices).tolist()]


class QWenCache(_KeepsNtkFactors, DynamicCache):
    """A :class:`~transformers.DynamicCache` that keeps each row's dynamic-NTK factor and appends in place
    (:class:`QWenCacheLayer`)."""

    def __init__(self, *args: Any, ntk_alphas: Sequence[float] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, ntk_alphas=ntk_alphas, **kwargs)
        # layers that append in place (QWenCacheLayer) where transformers would build plain DynamicLayers
        if self.layer_class_to_replicate is DynamicLayer:
            self.layer_class_to_replicate = QWenCacheLayer
        for i, layer in enumerate(self.layers):
            if type(layer) is DynamicLayer and not layer.is_initialized:
                self.layers[i] = QWenCacheLayer()


class QWenStaticCache(_KeepsNtkFactors, StaticCache):
    """A :class:`~transformers.StaticCache` (fixed shapes, for ``torch.compile``) that keeps each row's dynamic-NTK
    factor. ``generate(cache_implementation="static")`` builds one."""


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
        # x * rsqrt(mean(x^2) + eps) in one kernel (a handful of small ops per call otherwise, twice per layer)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, eps=self.eps)
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
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
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    if rot_dim == t.shape[-1]:  # Qwen rotates every channel: no pass-through part to cut off and join again
        return (tf * cos + rotate_half(tf) * sin).type_as(t)
    t_rot, t_pass = tf[..., :rot_dim], tf[..., rot_dim:]
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
    """Plain softmax attention over [B, H, T, D] tensors; returns [B, T, H, D] and the weights [B, H, T, S].

    ``attention_mask`` is an additive float mask, a boolean mask (True = may attend) as the SDPA path builds it, or
    None, which means causal attention (the queries being the last ``T`` of the ``S`` positions).
    """
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    lowest = torch.finfo(weights.dtype).min
    if attention_mask is None:
        q_len, kv_len = query.shape[2], key.shape[2]
        if getattr(module, "is_causal", True) and q_len > 1:
            allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
            weights = weights.masked_fill(~allowed, lowest)
    elif attention_mask.dtype == torch.bool:
        weights = weights.masked_fill(~attention_mask[..., : key.shape[2]], lowest)
    else:
        weights = weights + attention_mask[..., : key.shape[2]]
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
        output_attentions: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The attention output and, with ``output_attentions``, the weights [B, heads, T, S] (else None)."""
        bsz, q_len, _ = hidden_states.shape
        qkv = self.c_attn(hidden_states).view(bsz, q_len, 3 * self.num_heads, self.head_dim)
        # queries and keys rotate with the same angles: one call for both heads' groups
        qk = apply_rotary(qkv[:, :, : 2 * self.num_heads], *rotary)
        q, k = qk[:, :, : self.num_heads].transpose(1, 2), qk[:, :, self.num_heads :].transpose(1, 2)
        v = qkv[:, :, 2 * self.num_heads :].transpose(1, 2)
        if logn is not None:
            q = q * logn[:, None, :, None].to(q.dtype)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)

        if output_attentions:  # only the eager path computes the weights (QWenModel warns once)
            attention: Callable = eager_attention_forward
        else:
            attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = attention(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=self.config.attn_dropout_prob if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        return self.c_proj(out.reshape(bsz, q_len, self.projection_size)), weights if output_attentions else None


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
        output_attentions: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, weights = self.attn(
            self.ln_1(hidden_states), rotary, logn, attention_mask, past_key_values, output_attentions, **kwargs
        )
        hidden_states = hidden_states + attended
        return hidden_states + self.mlp(self.ln_2(hidden_states)), weights


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

    def forward(self, x: torch.Tensor, output_attentions: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The attention output and, with ``output_attentions``, the weights [B, heads, N, N] (else None)."""
        bsz, n, width = x.shape
        qkv = self.in_proj(x).view(bsz, n, self.heads, 3 * self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.split(self.head_dim, dim=-1))
        weights = None
        if output_attentions:
            weights = F.softmax(torch.matmul(q, k.transpose(2, 3)) * self.head_dim**-0.5, dim=-1, dtype=torch.float32)
            weights = weights.to(q.dtype)
            out = torch.matmul(weights, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(bsz, n, width)), weights


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

    def forward(self, x: torch.Tensor, output_attentions: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, weights = self.attn(self.ln_1(x), output_attentions)
        x = x + attended
        return x + self.mlp(self.ln_2(x)), weights


class VisualTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(VisualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers))

    def forward(
        self, x: torch.Tensor, output_hidden_states: bool = False, output_attentions: bool = False
    ) -> BaseModelOutputWithPast:
        """The last hidden state, with every block's input and output / attention weights on request."""
        hidden: tuple[torch.Tensor, ...] = ()
        attentions: tuple[torch.Tensor, ...] = ()
        for block in self.resblocks:
            if output_hidden_states:
                hidden += (x,)
            x, weights = block(x, output_attentions)
            if output_attentions:
                attentions += (weights,)
        if output_hidden_states:
            hidden += (x,)
        return BaseModelOutputWithPast(
            last_hidden_state=x,
            hidden_states=hidden if output_hidden_states else None,
            attentions=attentions if output_attentions else None,
        )


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

    def encode(
        self, pixel_values: torch.Tensor, output_hidden_states: bool = False, output_attentions: bool = False
    ) -> BaseModelOutputWithPooling:
        """Encode pixels [B, 3, S, S].

        ``pooler_output`` holds the features inserted into the language model [B, n_queries, output_dim];
        ``last_hidden_state`` the patch states of the last block [B, patches, width]; ``hidden_states`` (the
        input of the first block, then each block's output) and ``attentions`` (each block's weights) on request.
        """
        x = pixel_values.to(device=self.conv1.weight.device, dtype=self.conv1.weight.dtype)
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [B, g*g, width], patches in row-major order
        x = x + resize_grid_embedding(self.positional_embedding, x.shape[1])
        tower = self.transformer(self.ln_pre(x), output_hidden_states, output_attentions)
        pooled = self.ln_post(self.attn_pool(tower.last_hidden_state)) @ self.proj
        return BaseModelOutputWithPooling(
            last_hidden_state=tower.last_hidden_state,
            pooler_output=pooled,
            hidden_states=tower.hidden_states,
            attentions=tower.attentions,
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Features [B, n_queries, output_dim] of pixels [B, 3, S, S]."""
        return cast(torch.Tensor, self.encode(pixel_values).pooler_output)  # encode always sets it


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
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any):
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

    # transformers' base takes any module; the word embedding here is an nn.Embedding
    def set_input_embeddings(self, value: nn.Embedding) -> None:  # type: ignore[override]
        self.wte = value

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs: Any) -> BaseModelOutputWithPooling | tuple:
        """Encode preprocessed images [num_images, 3, S, S] with the vision tower and the resampler.

        Returns a :class:`~transformers.modeling_outputs.BaseModelOutputWithPooling` whose ``pooler_output`` holds
        the features that go into the language model, [num_images, n_queries, hidden]; ``last_hidden_state`` the
        vision tower's patch states; ``hidden_states`` / ``attentions`` of the vision blocks with
        ``output_hidden_states=True`` / ``output_attentions=True``; a tuple with ``return_dict=False``.

        (The options are keyword arguments, not named parameters: ``generate`` hands this method the named
        parameters it finds among its own arguments, and must keep ``output_hidden_states`` for the decoder.)
        """
        if self.visual is None:
            raise ValueError("This checkpoint has no vision tower (no `visual` block in config.json): text only.")
        output_hidden_states = kwargs.pop("output_hidden_states", None)
        output_attentions = kwargs.pop("output_attentions", None)
        return_dict = kwargs.pop("return_dict", None)
        if kwargs:
            raise TypeError(f"get_image_features() got unexpected arguments: {', '.join(sorted(kwargs))}.")
        out = self.visual.encode(
            pixel_values,
            output_hidden_states=_flag(output_hidden_states, self.config, "output_hidden_states"),
            output_attentions=_flag(output_attentions, self.config, "output_attentions"),
        )
        return out if _flag(return_dict, self.config, "return_dict") else out.to_tuple()

    def get_placeholder_mask(
        self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Where the image features go (``<imgpad>`` positions) and where image spans open (``<img>``), [B, T].

        With ``input_ids`` the positions are read from the ids; with only ``inputs_embeds`` they are the positions
        whose embedding equals the ``<imgpad>`` (``<img>``) embedding, as transformers' VLMs find them.
        """
        pad_id, start_id = self.config.image_pad_id, self.config.image_start_id
        if input_ids is not None:
            return cast(torch.Tensor, input_ids == pad_id), cast(
                torch.Tensor, input_ids == start_id
            )  # torch types == as bool
        ids = torch.tensor([pad_id, start_id], device=inputs_embeds.device)
        pad, start = self.wte(ids).to(inputs_embeds.dtype)
        return (inputs_embeds == pad).all(-1), (inputs_embeds == start).all(-1)

    def _merge_images(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor,
        pixel_values: torch.Tensor | None,
        image_features: Any,
        past: int,
    ) -> torch.Tensor:
        """Put the image features at the ``<imgpad>`` positions; refuse every way a picture could be lost."""
        given = pixel_values is not None or image_features is not None
        if self.visual is None:
            if given:
                raise ValueError("Images were given to a text-only checkpoint (no `visual` block in config.json).")
            return inputs_embeds
        if inputs_embeds.shape[1] == 1 and (torch.compiler.is_compiling() or past > 0):
            # one generated token after the prompt: an <img> or <imgpad> there is an ordinary token, not a picture's
            # span (pictures that generate passes along again went in with the prompt)
            return inputs_embeds
        pad_mask, start_mask = self.get_placeholder_mask(input_ids, inputs_embeds)
        positions = int(pad_mask.sum())
        per_image = self.config.num_image_queries
        if positions == 0:
            if given and past == 0:
                count: Any = image_features if image_features is not None else pixel_values
                count = getattr(count, "pooler_output", count)
                raise ValueError(
                    f"{count.shape[0]} image(s) were given but the input holds no image positions (<imgpad>): write "
                    "each picture's <img>...</img> span into the text (the processor or chat template does)."
                )
            return inputs_embeds
        if not given:
            if past == 0 or bool(start_mask.any()):
                raise ValueError(
                    f"The input holds image spans ({positions} <imgpad> positions, {positions / per_image:g} "
                    "image(s)) but no pixel_values or image_features were given: pass the pictures, or the model "
                    "would answer without them."
                )
            return inputs_embeds  # an <imgpad> generated while decoding is an ordinary token
        if image_features is None:
            assert pixel_values is not None  # given: one of the two
            image_features = self.get_image_features(pixel_values, return_dict=True)
        image_features = getattr(image_features, "pooler_output", image_features)
        flat = image_features.reshape(-1, image_features.shape[-1])
        if positions != flat.shape[0]:
            cached = past > 0 and positions < flat.shape[0] and positions % per_image == 0
            if not cached:
                raise ValueError(
                    f"Image features and image positions do not match: the input holds {positions} <imgpad> "
                    f"positions ({positions / per_image:g} image(s) of {per_image}) but {flat.shape[0]} feature "
                    f"vectors ({flat.shape[0] / per_image:g} image(s)) were given. Build inputs with the processor."
                )
            # the other pictures sit in the cached prefix, before this slice: the ones present are the last ones
            flat = flat[flat.shape[0] - positions :]
        flat = flat.to(device=inputs_embeds.device, dtype=inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(pad_mask.unsqueeze(-1).to(inputs_embeds.device), flat)

    def _ntk_alphas(
        self, batch: int, total_len: int, attention_mask: torch.Tensor | None, cache: Cache | None, past: int
    ) -> list[float]:
        if self.training or not self.config.use_dynamic_ntk:
            return [1.0] * batch
        stored = cache.ntk_alphas if isinstance(cache, _KeepsNtkFactors) else None
        # the prefill's factor is kept while decoding (a compiled step is always a decoding step: transformers
        # compiles those only, and a static cache's length is a tensor there)
        if stored is not None and len(stored) == batch and (torch.compiler.is_compiling() or past > 0):
            return list(stored)
        if attention_mask is not None and attention_mask.dim() == 2:
            lengths = attention_mask.sum(-1).tolist()
        else:
            lengths = [total_len] * batch
        alphas = [ntk_alpha(int(n), self.config.seq_length) for n in lengths]
        if isinstance(cache, _KeepsNtkFactors):
            cache.ntk_alphas = alphas
        return alphas

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | BaseModelOutputWithPooling | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast | tuple:
        """Hidden states of the decoder (pictures inserted at the ``<imgpad>`` positions of the input).

        The pictures come as ``pixel_values``, as ``image_features`` (a tensor or :meth:`get_image_features`'
        output) or, from ``generate``, as ``mm_encoder_outputs["image"]`` (encoded once before the prefill).
        """
        if mm_encoder_outputs and mm_encoder_outputs.get("image") is not None:
            if image_features is not None or pixel_values is not None:
                raise ValueError("Pass the pictures once: pixel_values, image_features or mm_encoder_outputs.")
            image_features = mm_encoder_outputs["image"]
        cache = past_key_values if past_key_values is not None else cache
        output_attentions = _flag(output_attentions, self.config, "output_attentions")
        output_hidden_states = _flag(output_hidden_states, self.config, "output_hidden_states")
        return_dict = _flag(return_dict, self.config, "return_dict")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and use_cache:
            logger.warning_once("use_cache=True is incompatible with gradient checkpointing: using use_cache=False.")
            use_cache = False
        if output_attentions and self.config._attn_implementation != "eager":
            logger.warning_once(
                f"output_attentions=True needs the eager attention: this call runs it instead of "
                f"{self.config._attn_implementation!r}. Load with attn_implementation='eager' to silence this."
            )
        if use_cache and cache is None:
            cache = QWenCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0

        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        inputs_embeds = self._merge_images(input_ids, inputs_embeds, pixel_values, image_features, past)

        batch, q_len = inputs_embeds.shape[:2]
        # positions derived here are below this bound; ones passed in may be anything
        bound: int | None = None
        if position_ids is None:
            if attention_mask is not None and attention_mask.dim() == 2:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q_len:]
                bound = attention_mask.shape[-1]
            else:  # (a static cache's length is a tensor: no Python number is taken from it)
                position_ids = (torch.arange(q_len, device=inputs_embeds.device) + past).unsqueeze(0)
                bound = past + q_len if isinstance(past, int) else None
        position_ids = position_ids.expand(batch, -1)

        alphas = self._ntk_alphas(batch, past + q_len, attention_mask, cache, past)
        rotary = self.rotary_emb(position_ids, alphas)
        logn = None
        # the logn factor is 1 up to seq_length: skipped (per layer) where no position can pass it
        if self.config.use_logn_attn and not self.training and (bound is None or bound > self.config.seq_length):
            pos1 = position_ids.double() + 1
            seq_len = self.config.seq_length
            logn = torch.where(pos1 > seq_len, pos1.log() / math.log(seq_len), torch.ones_like(pos1)).float()

        # positional: the cache parameter's name differs between transformers versions
        mask = create_causal_mask(self.config, inputs_embeds, attention_mask, cache, position_ids)
        hidden_states = self.drop(inputs_embeds)
        all_hidden: tuple[torch.Tensor, ...] = ()
        all_attentions: tuple[torch.Tensor, ...] = ()
        for block in self.h:
            if output_hidden_states:
                all_hidden += (hidden_states,)
            hidden_states, weights = block(hidden_states, rotary, logn, mask, cache, output_attentions, **kwargs)
            if output_attentions:
                all_attentions += (weights,)
        hidden_states = self.ln_f(hidden_states)
        if output_hidden_states:
            all_hidden += (hidden_states,)
        out = _cache_output(
            BaseModelOutputWithPast,
            cache if use_cache else None,
            last_hidden_state=hidden_states,
            hidden_states=all_hidden if output_hidden_states else None,
            attentions=all_attentions if output_attentions else None,
        )
        return out if return_dict else out.to_tuple()


#: The forward arguments that carry pictures.
_PICTURE_INPUTS = ("pixel_values", "mm_encoder_outputs", "image_features")


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

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs: Any) -> BaseModelOutputWithPooling | tuple:
        """See :meth:`QWenModel.get_image_features` (``pooler_output`` holds the per-image features)."""
        return self.transformer.get_image_features(pixel_values, **kwargs)

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

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``generate``; an ``eos_token_id`` that names ``<|endoftext|>`` alone (the value of the
        checkpoint's generation_config.json, which callers such as ``transformers serve`` copy into every request)
        means the checkpoint's stop tokens, so ``<|im_end|>`` and ``<|im_start|>`` end a ChatML reply there too, as
        in the reference's ``chat``. Any other ``eos_token_id`` is used as given."""
        eos = kwargs.get("eos_token_id")
        stops = self.generation_config.eos_token_id
        if eos is not None and isinstance(stops, list) and len(stops) > 1:
            given = [eos] if isinstance(eos, int) else list(eos) if isinstance(eos, list | tuple) else None
            if given is not None and len(given) == 1 and int(given[0]) == min(stops):
                kwargs["eos_token_id"] = list(stops)
        return super().generate(*args, **kwargs)

    def _prepare_cache_for_generation(self, generation_config: Any, model_kwargs: dict, *args: Any, **kwargs: Any):
        """As transformers prepares it, but a default dynamic cache is a :class:`QWenCache` (it keeps the NTK
        factor of each row); a cache passed in by the caller is used as it is."""
        # transformers types these generation helpers' self as its GenerativePreTrainedModel
        result = super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)  # type: ignore[misc]
        for name in ("cache", "past_key_values"):
            cache = model_kwargs.get(name)
            if (
                type(cache) is DynamicCache
                and not getattr(cache, "_is_user_defined", False)
                and generation_config.cache_implementation in (None, "dynamic")
            ):
                model_kwargs[name] = QWenCache(config=self.config.get_text_config(decoder=True))
        return result

    def _prepare_static_cache(self, *args: Any, **kwargs: Any) -> Cache:
        """As transformers builds it for ``cache_implementation="static"``, as a :class:`QWenStaticCache`."""
        cache = super()._prepare_static_cache(*args, **kwargs)  # type: ignore[misc]  # as above
        if type(cache) is StaticCache:
            cache.__class__ = QWenStaticCache  # same fields and tensors; adds the NTK factors' bookkeeping
            cache.ntk_alphas = None  # type: ignore[attr-defined]  # a QWenStaticCache field now
        return cache

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        *args: Any,
        inputs_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> dict:
        """As transformers prepares them, but the pictures stay with any step whose ids hold image positions.

        transformers passes pictures only to the first forward of ``generate``; an assistant model's first forward
        (assisted decoding) is not counted as one, and would otherwise meet the image spans without pictures.
        """
        # (inputs_embeds and cache are named so that generate sees this method forwards them)
        if cache is not None:
            kwargs["cache"] = cache
        model_inputs = super().prepare_inputs_for_generation(input_ids, *args, inputs_embeds=inputs_embeds, **kwargs)
        ids = model_inputs.get("input_ids")
        # (a single new token never holds a picture's span: an <imgpad> generated while decoding is a token)
        if (
            self.config.visual is not None
            and ids is not None
            and ids.shape[1] > 1
            and bool((ids == self.config.image_pad_id).any())
        ):
            for key in _PICTURE_INPUTS:
                if kwargs.get(key) is not None and model_inputs.get(key) is None:
                    model_inputs[key] = kwargs[key]
        elif ids is not None and ids.shape[1] == 1 and not kwargs.get("is_first_iteration"):
            # a decoding step: the pictures went in with the prompt (and a compiled step sees one set of inputs)
            for key in _PICTURE_INPUTS:
                model_inputs.pop(key, None)
        return model_inputs

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | BaseModelOutputWithPooling | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits (and the loss when ``labels`` are given; -100 marks positions to ignore).

        ``pixel_values`` [num_images, 3, S, S] (or their ``image_features``) go, in order, to the ``<imgpad>``
        positions of ``input_ids`` / ``inputs_embeds``. ``return_dict=False`` gives a tuple, as transformers models.
        """
        past_key_values = past_key_values if past_key_values is not None else cache
        return_dict = _flag(return_dict, self.config, "return_dict")
        outputs = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            pixel_values=pixel_values,
            image_features=image_features,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            mm_encoder_outputs=mm_encoder_outputs,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            if logits_to_keep > 0:
                hidden_states = hidden_states[:, -logits_to_keep:]
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        out = _cache_output(
            CausalLMOutputWithPast,
            getattr(outputs, CACHE_FIELD),
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return out if return_dict else out.to_tuple()

    # The model card's API (see model_card.py) ---------------------------------------------------------------
    def chat(
        self,
        tokenizer: Any,
        query: str,
        history: list | None = None,
        system: str = "You are a helpful assistant.",
        **generation_kwargs: Any,
    ) -> tuple[str, list]:
        """Answer ``query`` (images named as ``<img>path</img>``) after ``history``; returns (response, history)."""
        from .model_card import model_card_chat

        return model_card_chat(self, tokenizer, query, history, system, generation_kwargs)

    def chat_stream(
        self,
        tokenizer: Any,
        query: str,
        history: list | None = None,
        system: str = "You are a helpful assistant.",
        **generation_kwargs: Any,
    ) -> Iterator[str]:
        """Yield the growing response to ``query``, as the reference's ``chat_stream`` does."""
        from .model_card import model_card_chat_stream

        yield from model_card_chat_stream(self, tokenizer, query, history, system, generation_kwargs)


__all__ = [
    "QWenCache",
    "QWenCacheLayer",
    "QWenStaticCache",
    "QWenLMHeadModel",
    "QWenModel",
    "QWenPreTrainedModel",
    "default_dtype",
    "ntk_alpha",
    "stop_token_ids",
]
