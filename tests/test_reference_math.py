"""Independent restatement of the Qwen-VL math, checked against the model.

Everything below is written from the architecture description alone, in
plain torch with explicit Python loops (per layer, per head and, where the
causal structure matters, per query position).  Weights are read from the
model's ``state_dict()`` by their published names, so the test also pins the
parameter names and shapes.  Sizes are tiny to keep the file fast.
"""

from __future__ import annotations

import math

import pytest
import torch

from belle_vl_tools.configuration_qwen_vl import QWenConfig
from belle_vl_tools.modeling_qwen_vl import QWenLMHeadModel

RTOL = 1e-5
ATOL = 1e-5
ATTN_IMPLS = ["eager", "sdpa"]

# --------------------------------------------------------------------------
# configurations
# --------------------------------------------------------------------------

TEXT_CFG = {
    "vocab_size": 512,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "kv_channels": 16,
    "intermediate_size": 96,
    "seq_length": 16,
    "max_position_embeddings": 128,
    "rotary_emb_base": 10000,
    "rotary_pct": 1.0,
    "layer_norm_epsilon": 1e-6,
    "no_bias": True,
}

IMAGE_START_ID = 400
VISUAL_BASE = {
    "heads": 4,
    "image_start_id": IMAGE_START_ID,
    "layers": 2,
    "mlp_ratio": 4.9231,
    "output_dim": 128,
    "patch_size": 14,
    "width": 64,
}

VL_CFG = {
    "vocab_size": 512,
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "kv_channels": 32,
    "intermediate_size": 192,
    "seq_length": 512,
    "max_position_embeddings": 1024,
    "rotary_emb_base": 10000,
    "rotary_pct": 1.0,
    "layer_norm_epsilon": 1e-6,
    "no_bias": True,
}


def make_config(base: dict, *, visual: dict | None, ntk: bool, logn: bool) -> QWenConfig:
    return QWenConfig(
        **base,
        use_dynamic_ntk=ntk,
        use_logn_attn=logn,
        visual=visual,
    )


def build_model(config: QWenConfig, attn_impl: str, seed: int = 0) -> QWenLMHeadModel:
    config._attn_implementation = attn_impl
    model = QWenLMHeadModel._from_config(config, attn_implementation=attn_impl)
    model = model.float().eval()
    assert model.config._attn_implementation == attn_impl
    randomise(model, seed)
    return model


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter a random value on a scale that keeps activations O(1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            owner = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if owner.startswith("ln") and leaf == "weight":
                # norm weights: around 1 but clearly not 1
                p.copy_(1.0 + 0.2 * noise)
            elif leaf == "bias" or leaf.endswith("_bias"):
                p.copy_(0.1 * noise)
            elif name.endswith("wte.weight"):
                p.copy_(noise)
            elif p.dim() >= 2 and leaf in ("weight", "in_proj_weight"):
                fan_in = p[0].numel()
                p.copy_(noise / math.sqrt(fan_in))
            elif leaf == "proj":
                p.copy_(noise / math.sqrt(p.shape[0]))
            else:  # positional embeddings, resampler queries
                p.copy_(0.5 * noise)


# --------------------------------------------------------------------------
# parameter names and shapes
# --------------------------------------------------------------------------


def expected_text_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    h, v, m = c["hidden_size"], c["vocab_size"], c["intermediate_size"] // 2
    shapes = {
        "transformer.wte.weight": (v, h),
        "transformer.ln_f.weight": (h,),
        "lm_head.weight": (v, h),
    }
    for i in range(c["num_hidden_layers"]):
        pre = f"transformer.h.{i}."
        shapes.update(
            {
                pre + "ln_1.weight": (h,),
                pre + "attn.c_attn.weight": (3 * h, h),
                pre + "attn.c_attn.bias": (3 * h,),
                pre + "attn.c_proj.weight": (h, h),
                pre + "ln_2.weight": (h,),
                pre + "mlp.w1.weight": (m, h),
                pre + "mlp.w2.weight": (m, h),
                pre + "mlp.c_proj.weight": (h, m),
            }
        )
    return shapes


def expected_visual_shapes(vis: dict) -> dict[str, tuple[int, ...]]:
    w, p, d = vis["width"], vis["patch_size"], vis["output_dim"]
    f = int(w * vis["mlp_ratio"])
    pre = "transformer.visual."
    shapes = {
        pre + "conv1.weight": (w, 3, p, p),
        pre + "positional_embedding": (256, w),
        pre + "ln_pre.weight": (w,),
        pre + "ln_pre.bias": (w,),
        pre + "attn_pool.query": (256, d),
        pre + "attn_pool.pos_embed": (256, d),
        pre + "attn_pool.ln_kv.weight": (d,),
        pre + "attn_pool.ln_kv.bias": (d,),
        pre + "attn_pool.ln_q.weight": (d,),
        pre + "attn_pool.ln_q.bias": (d,),
        pre + "attn_pool.attn.in_proj_weight": (3 * d, d),
        pre + "attn_pool.attn.in_proj_bias": (3 * d,),
        pre + "attn_pool.attn.out_proj.weight": (d, d),
        pre + "attn_pool.attn.out_proj.bias": (d,),
        pre + "ln_post.weight": (d,),
        pre + "ln_post.bias": (d,),
        pre + "proj": (d, d),
    }
    if w != d:
        shapes[pre + "attn_pool.kv_proj.weight"] = (d, w)
    for i in range(vis["layers"]):
        b = f"{pre}transformer.resblocks.{i}."
        shapes.update(
            {
                b + "ln_1.weight": (w,),
                b + "ln_1.bias": (w,),
                b + "attn.in_proj.weight": (3 * w, w),
                b + "attn.in_proj.bias": (3 * w,),
                b + "attn.out_proj.weight": (w, w),
                b + "attn.out_proj.bias": (w,),
                b + "ln_2.weight": (w,),
                b + "ln_2.bias": (w,),
                b + "mlp.c_fc.weight": (f, w),
                b + "mlp.c_fc.bias": (f,),
                b + "mlp.c_proj.weight": (w, f),
                b + "mlp.c_proj.bias": (w,),
            }
        )
    return shapes


def check_names_and_shapes(model: torch.nn.Module, expected: dict[str, tuple[int, ...]]) -> dict:
    sd = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    assert not missing, f"missing from state_dict: {missing}"
    wrong = {k: (tuple(sd[k].shape), s) for k, s in expected.items() if tuple(sd[k].shape) != s}
    assert not wrong, f"shape mismatch (got, expected): {wrong}"
    unexpected = sorted(set(dict(model.named_parameters())) - set(expected))
    assert not unexpected, f"parameters not in the description: {unexpected}"
    return {k: t.detach().float() for k, t in sd.items()}


# --------------------------------------------------------------------------
# restatement: decoder
# --------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    y = xf / torch.sqrt((xf * xf).mean(dim=-1, keepdim=True) + eps)
    return y.to(x.dtype) * weight


def ntk_alpha(length: int, seq_length: int) -> float:
    context = math.log2(length / seq_length) + 1
    return max(2 ** math.ceil(context) - 1, 1)


def rotary_inv_freq(dim: int, base: float) -> torch.Tensor:
    j = torch.arange(0, dim // 2, dtype=torch.float32)
    return 1.0 / (base ** (2 * j / dim))


def rotate(vec: torch.Tensor, pos: int, inv_freq: torch.Tensor) -> torch.Tensor:
    half = vec.shape[0] // 2
    x1, x2 = vec[:half], vec[half:]
    theta = float(pos) * inv_freq
    cos, sin = torch.cos(theta), torch.sin(theta)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin])


def ref_decoder(sd: dict, c: dict, embeds: torch.Tensor, *, ntk: bool, logn: bool) -> torch.Tensor:
    """embeds [B, T, h] -> logits [B, T, vocab]; positions 0..T-1, causal."""
    h, n_heads, d = c["hidden_size"], c["num_attention_heads"], c["kv_channels"]
    eps, seq_length = c["layer_norm_epsilon"], c["seq_length"]
    rot_dim = int(d * c["rotary_pct"])
    B, T, _ = embeds.shape

    base = float(c["rotary_emb_base"])
    if ntk:
        alpha = ntk_alpha(T, seq_length)
        base = base * alpha ** (rot_dim / (rot_dim - 2))
    inv_freq = rotary_inv_freq(rot_dim, base)

    def logn_scale(p: int) -> float:
        if logn and p + 1 > seq_length:
            return math.log(p + 1) / math.log(seq_length)
        return 1.0

    logits = []
    for b in range(B):
        x = embeds[b].clone()  # [T, h]
        for i in range(c["num_hidden_layers"]):
            pre = f"transformer.h.{i}."
            a_in = rms_norm(x, sd[pre + "ln_1.weight"], eps)
            qkv = a_in @ sd[pre + "attn.c_attn.weight"].T + sd[pre + "attn.c_attn.bias"]
            q_all, k_all, v_all = qkv[:, :h], qkv[:, h : 2 * h], qkv[:, 2 * h :]
            head_outs = []
            for j in range(n_heads):
                sl = slice(j * d, (j + 1) * d)
                q = torch.stack(
                    [
                        torch.cat(
                            [
                                rotate(q_all[p, sl][:rot_dim], p, inv_freq),
                                q_all[p, sl][rot_dim:],
                            ]
                        )
                        * logn_scale(p)
                        for p in range(T)
                    ]
                )
                k = torch.stack(
                    [
                        torch.cat(
                            [
                                rotate(k_all[p, sl][:rot_dim], p, inv_freq),
                                k_all[p, sl][rot_dim:],
                            ]
                        )
                        for p in range(T)
                    ]
                )
                v = v_all[:, sl]
                rows = []
                for p in range(T):
                    scores = (k[: p + 1] @ q[p]) / math.sqrt(d)
                    weights = torch.softmax(scores.float(), dim=-1)
                    rows.append(weights @ v[: p + 1])
                head_outs.append(torch.stack(rows))
            attn = torch.cat(head_outs, dim=-1) @ sd[pre + "attn.c_proj.weight"].T
            x = x + attn
            m_in = rms_norm(x, sd[pre + "ln_2.weight"], eps)
            up = m_in @ sd[pre + "mlp.w1.weight"].T
            gate = m_in @ sd[pre + "mlp.w2.weight"].T
            x = x + (up * torch.nn.functional.silu(gate)) @ sd[pre + "mlp.c_proj.weight"].T
        x = rms_norm(x, sd["transformer.ln_f.weight"], eps)
        logits.append(x @ sd["lm_head.weight"].T)
    return torch.stack(logits)


# --------------------------------------------------------------------------
# restatement: vision tower and resampler
# --------------------------------------------------------------------------


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def gelu_erf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def resize_grid(table: torch.Tensor, g: int) -> torch.Tensor:
    """[256, C] laid out as a row-major 16x16 grid -> [g*g, C]."""
    if g == 16:
        return table
    c = table.shape[1]
    grid = table.float().reshape(16, 16, c).permute(2, 0, 1).unsqueeze(0)  # [1, C, 16, 16]
    grid = torch.nn.functional.interpolate(grid, size=(g, g), mode="bicubic", align_corners=False)
    return grid[0].permute(1, 2, 0).reshape(g * g, c).to(table.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Non-causal single-head attention, one query row at a time."""
    rows = []
    for i in range(q.shape[0]):
        weights = torch.softmax((k @ q[i]) * scale, dim=-1)
        rows.append(weights @ v)
    return torch.stack(rows)


def ref_visual(sd: dict, vis: dict, pixel_values: torch.Tensor) -> torch.Tensor:
    w, heads, p, d_out = (
        vis["width"],
        vis["heads"],
        vis["patch_size"],
        vis["output_dim"],
    )
    g = vis["image_size"] // p
    hd = w // heads
    pre = "transformer.visual."
    conv = sd[pre + "conv1.weight"].reshape(w, 3 * p * p)
    pos = resize_grid(sd[pre + "positional_embedding"], g)
    pool_pos = sd[pre + "attn_pool.pos_embed"]
    pool_pos_kv = resize_grid(pool_pos, g)

    outs = []
    for img in pixel_values:
        patches = []
        for r in range(g):  # row-major over the grid
            for col in range(g):
                patch = img[:, r * p : (r + 1) * p, col * p : (col + 1) * p].reshape(-1)
                patches.append(conv @ patch)
        x = torch.stack(patches) + pos  # [g*g, w]
        x = layer_norm(x, sd[pre + "ln_pre.weight"], sd[pre + "ln_pre.bias"])

        for i in range(vis["layers"]):
            b = f"{pre}transformer.resblocks.{i}."
            y = layer_norm(x, sd[b + "ln_1.weight"], sd[b + "ln_1.bias"])
            qkv = y @ sd[b + "attn.in_proj.weight"].T + sd[b + "attn.in_proj.bias"]
            head_outs = []
            for j in range(heads):
                base = 3 * hd * j  # per-head interleaved [q_j; k_j; v_j]
                q = qkv[:, base : base + hd]
                k = qkv[:, base + hd : base + 2 * hd]
                v = qkv[:, base + 2 * hd : base + 3 * hd]
                head_outs.append(attention(q, k, v, 1.0 / math.sqrt(hd)))
            a = torch.cat(head_outs, dim=-1) @ sd[b + "attn.out_proj.weight"].T + sd[b + "attn.out_proj.bias"]
            x = x + a
            y = layer_norm(x, sd[b + "ln_2.weight"], sd[b + "ln_2.bias"])
            y = gelu_erf(y @ sd[b + "mlp.c_fc.weight"].T + sd[b + "mlp.c_fc.bias"])
            x = x + y @ sd[b + "mlp.c_proj.weight"].T + sd[b + "mlp.c_proj.bias"]

        # resampler
        ap = pre + "attn_pool."
        if ap + "kv_proj.weight" in sd:
            x = x @ sd[ap + "kv_proj.weight"].T
        x = layer_norm(x, sd[ap + "ln_kv.weight"], sd[ap + "ln_kv.bias"])
        k_in = x + pool_pos_kv
        v_in = x
        q_in = layer_norm(sd[ap + "query"], sd[ap + "ln_q.weight"], sd[ap + "ln_q.bias"]) + pool_pos
        W, bias = sd[ap + "attn.in_proj_weight"], sd[ap + "attn.in_proj_bias"]
        D = d_out
        Q = q_in @ W[:D].T + bias[:D]
        K = k_in @ W[D : 2 * D].T + bias[D : 2 * D]
        V = v_in @ W[2 * D :].T + bias[2 * D :]
        n_pool_heads = D // 128
        phd = D // n_pool_heads
        head_outs = []
        for j in range(n_pool_heads):
            sl = slice(j * phd, (j + 1) * phd)
            head_outs.append(attention(Q[:, sl], K[:, sl], V[:, sl], 1.0 / math.sqrt(phd)))
        y = torch.cat(head_outs, dim=-1) @ sd[ap + "attn.out_proj.weight"].T + sd[ap + "attn.out_proj.bias"]
        y = layer_norm(y, sd[pre + "ln_post.weight"], sd[pre + "ln_post.bias"])
        outs.append(y @ sd[pre + "proj"])
    return torch.stack(outs)


# --------------------------------------------------------------------------
# sanity checks of the restatement's own helpers
# --------------------------------------------------------------------------


def test_ntk_alpha_formula():
    assert ntk_alpha(12, 16) == 1
    assert ntk_alpha(16, 16) == 1
    assert ntk_alpha(24, 16) == 3
    assert ntk_alpha(32, 16) == 3
    assert ntk_alpha(40, 16) == 7
    assert ntk_alpha(64, 16) == 7


def test_rotate_matches_rotate_half_on_a_plane():
    # with a single frequency the rotation is a plain 2-D rotation of (x1, x2)
    vec = torch.tensor([1.0, 0.0])
    out = rotate(vec, 3, torch.tensor([0.5]))
    torch.testing.assert_close(out, torch.tensor([math.cos(1.5), math.sin(1.5)]))


# --------------------------------------------------------------------------
# 1. decoder stack
# --------------------------------------------------------------------------


@pytest.mark.parametrize("attn_impl", ATTN_IMPLS)
@pytest.mark.parametrize(
    "length,ntk,logn",
    [
        (12, True, True),  # below seq_length: no NTK, no logn effect
        (24, True, True),  # alpha = 3, logn active
        (40, True, True),  # alpha = 7, logn active
        (40, False, False),  # flags off beyond seq_length
        (40, True, False),
        (40, False, True),
    ],
)
def test_decoder_matches_reference(attn_impl, length, ntk, logn):
    config = make_config(TEXT_CFG, visual=None, ntk=ntk, logn=logn)
    model = build_model(config, attn_impl, seed=length)
    sd = check_names_and_shapes(model, expected_text_shapes(TEXT_CFG))
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()

    gen = torch.Generator().manual_seed(100 + length)
    input_ids = torch.randint(0, TEXT_CFG["vocab_size"], (2, length), generator=gen)
    with torch.no_grad():
        got = model(input_ids=input_ids).logits
        expected = ref_decoder(sd, TEXT_CFG, sd["transformer.wte.weight"][input_ids], ntk=ntk, logn=logn)
        assert got.shape == (2, length, TEXT_CFG["vocab_size"])
        torch.testing.assert_close(got.float(), expected, rtol=RTOL, atol=ATOL)

        # an all-ones 2-D mask and explicit 0-based positions describe the same thing
        ones = torch.ones_like(input_ids)
        positions = torch.arange(length).unsqueeze(0).expand(2, -1)
        got_masked = model(input_ids=input_ids, attention_mask=ones, position_ids=positions).logits
        torch.testing.assert_close(got_masked.float(), expected, rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------
# 2. vision tower + resampler
# --------------------------------------------------------------------------


def visual_cfg(image_size: int) -> dict:
    return dict(VISUAL_BASE, image_size=image_size)


@pytest.mark.parametrize("attn_impl", ATTN_IMPLS)
@pytest.mark.parametrize("image_size", [56, 224])
def test_visual_matches_reference(attn_impl, image_size):
    vis = visual_cfg(image_size)
    config = make_config(VL_CFG, visual=vis, ntk=True, logn=True)
    model = build_model(config, attn_impl, seed=image_size)
    shapes = expected_text_shapes(VL_CFG) | expected_visual_shapes(vis)
    sd = check_names_and_shapes(model, shapes)

    gen = torch.Generator().manual_seed(7 + image_size)
    pixel_values = torch.randn(2, 3, image_size, image_size, generator=gen)
    with torch.no_grad():
        got = model.transformer.visual(pixel_values)
        expected = ref_visual(sd, vis, pixel_values)
    assert got.shape == (2, 256, vis["output_dim"])
    torch.testing.assert_close(got.float(), expected, rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------
# 3. image insertion into the decoder
# --------------------------------------------------------------------------


@pytest.mark.parametrize("attn_impl", ATTN_IMPLS)
def test_image_insertion_matches_reference(attn_impl):
    vis = visual_cfg(56)
    config = make_config(VL_CFG, visual=vis, ntk=True, logn=True)
    model = build_model(config, attn_impl, seed=3)
    sd = check_names_and_shapes(model, expected_text_shapes(VL_CFG) | expected_visual_shapes(vis))

    img, img_end, pad = IMAGE_START_ID, IMAGE_START_ID + 1, IMAGE_START_ID + 2
    gen = torch.Generator().manual_seed(11)

    def text(n: int) -> list[int]:
        return torch.randint(0, IMAGE_START_ID, (n,), generator=gen).tolist()

    # one sequence holding two images, so the "image after image" order matters
    ids = text(5) + [img] + [pad] * 256 + [img_end] + text(3) + [img] + [pad] * 256 + [img_end] + text(4)
    input_ids = torch.tensor([ids])
    pixel_values = torch.randn(2, 3, 56, 56, generator=gen)

    with torch.no_grad():
        got = model(input_ids=input_ids, pixel_values=pixel_values).logits

        feats = ref_visual(sd, vis, pixel_values)  # [2, 256, D]
        embeds = sd["transformer.wte.weight"][input_ids].clone()
        pad_positions = (input_ids[0] == pad).nonzero().flatten()
        assert pad_positions.numel() == 512
        embeds[0, pad_positions] = feats.reshape(512, -1)
        expected = ref_decoder(sd, VL_CFG, embeds, ntk=True, logn=True)
        torch.testing.assert_close(got.float(), expected, rtol=RTOL, atol=ATOL)

        # swapping the two images changes the output (features go in order)
        swapped = model(input_ids=input_ids, pixel_values=pixel_values.flip(0)).logits
        other = model(input_ids=input_ids, pixel_values=torch.randn(2, 3, 56, 56, generator=gen)).logits
    assert (swapped[0, -1] - got[0, -1]).abs().max() > 1e-3
    assert (other[0, -1] - got[0, -1]).abs().max() > 1e-3
    # text before the first image does not see it
    torch.testing.assert_close(other[0, :6], got[0, :6], rtol=RTOL, atol=ATOL)
