"""Decoding-speed work keeps results equal: the in-place cache layer, the skipped logn factor, the compiled path.

Each optimisation is compared with the plain computation it replaces (transformers' ``DynamicLayer``, logn computed
from explicit ``position_ids``): same keys and values, same logits, and identical greedy ids.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList
from transformers.cache_utils import DynamicLayer
from transformers.generation.configuration_utils import CompileConfig

from belle_vl_tools.modeling_qwen_vl import QWenCache, QWenCacheLayer, QWenStaticCache
from tests.test_model_contracts import IMG, PAD_IMG, QUERIES, make_model


@pytest.fixture(scope="module")
def vlm():
    return make_model(vision=True, attn="sdpa")


def _kv(step: int, n: int = 1, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(batch, 3, n, 8, generator=g), torch.randn(batch, 3, n, 8, generator=g)


def _twins() -> tuple[QWenCacheLayer, DynamicLayer]:
    return QWenCacheLayer(), DynamicLayer()


def test_the_in_place_layer_holds_what_concatenation_holds():
    ours, plain = _twins()
    ours.update(*_kv(0, n=5))
    plain.update(*_kv(0, n=5))
    buffer = ours._room[0]
    for step in range(1, 200):  # past the first buffer's room: it grows, keeping what it held
        k_ours, v_ours = ours.update(*_kv(step))
        k_plain, v_plain = plain.update(*_kv(step))
        assert torch.equal(k_ours, k_plain) and torch.equal(v_ours, v_plain)
    assert ours.get_seq_length() == plain.get_seq_length() == 204
    assert ours._room[0] is not buffer and ours._room[0].shape[-2] > 204


def test_steps_write_in_place_until_the_room_is_used_up():
    layer = QWenCacheLayer()
    layer.update(*_kv(0, n=5))
    buffer = layer._room[0]
    for step in range(1, 50):
        keys, _ = layer.update(*_kv(step))
        assert keys.data_ptr() == buffer.data_ptr()  # a view of the same buffer: nothing was copied


def test_crop_reorder_and_select_are_followed_by_the_next_update():
    ours, plain = _twins()
    for layer in (ours, plain):
        layer.update(*_kv(0, n=6))
        layer.update(*_kv(1))
        layer.crop(-3)
        layer.update(*_kv(2, n=2))
        layer.reorder_cache(torch.tensor([1, 0]))
        layer.update(*_kv(3))
        layer.batch_repeat_interleave(2)
        layer.update(*_kv(4, batch=4))
        layer.batch_select_indices(torch.tensor([0, 3]))
        layer.update(*_kv(5))
    assert torch.equal(ours.keys, plain.keys) and torch.equal(ours.values, plain.values)
    ours.reset()
    assert ours.get_seq_length() == 0
    assert torch.equal(ours.update(*_kv(6))[0], _kv(6)[0])


def test_a_cache_filled_in_inference_mode_goes_on_outside_it():
    layer = QWenCacheLayer()
    with torch.inference_mode():
        layer.update(*_kv(0, n=4))
    with torch.no_grad():  # an inference tensor cannot be written here: the layer copies instead of failing
        keys, _ = layer.update(*_kv(1))
    assert keys.shape[-2] == 5 and torch.equal(keys[..., 4:, :], _kv(1)[0])


def test_gradients_flow_through_a_cache_that_needs_them():
    layer = QWenCacheLayer()
    k = torch.randn(1, 2, 3, 4, requires_grad=True)
    keys, values = layer.update(k, k * 2)
    keys2, _ = layer.update(torch.randn(1, 2, 1, 4, requires_grad=True), torch.randn(1, 2, 1, 4))
    (keys2.sum() + values.sum()).backward()
    assert torch.equal(k.grad, torch.full_like(k, 3.0))


def test_qwen_cache_builds_in_place_layers():
    cache = QWenCache(config=make_model(vision=False).config)
    assert cache.layers and all(type(layer) is QWenCacheLayer for layer in cache.layers)
    assert QWenCache().layer_class_to_replicate is QWenCacheLayer


def _prompt() -> torch.Tensor:
    torch.manual_seed(3)
    text = torch.randint(0, IMG, (1, 7))
    image = torch.tensor([[IMG] + [PAD_IMG] * QUERIES + [IMG + 1]])
    return torch.cat([text[:, :3], image, text[:, 3:]], dim=1)


def test_greedy_ids_equal_with_the_in_place_cache_and_a_plain_dynamic_cache(vlm):
    ids = _prompt()
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    greedy = {
        "do_sample": False,
        "max_new_tokens": 40,
        "min_new_tokens": 40,
        "suppress_tokens": [IMG, IMG + 1, PAD_IMG],
    }
    with torch.inference_mode():
        ours = vlm.generate(input_ids=ids, pixel_values=pixels, **greedy)
        plain = vlm.generate(input_ids=ids, pixel_values=pixels, cache=DynamicCache(), **greedy)
        other_picture = vlm.generate(input_ids=ids, pixel_values=-pixels, **greedy)
    assert torch.equal(ours, plain)
    assert not torch.equal(ours, other_picture)  # the picture reached the model on this path


@pytest.mark.parametrize("length", [20, 90])  # below and beyond seq_length (64): logn is 1, then it is not
def test_skipping_the_logn_factor_below_seq_length_changes_nothing(vlm, length):
    torch.manual_seed(length)
    ids = torch.randint(0, IMG, (1, length))
    with torch.inference_mode():
        derived = vlm(input_ids=ids).logits  # positions derived: logn skipped when all are below seq_length
        explicit = vlm(input_ids=ids, position_ids=torch.arange(length)[None]).logits  # always computed
        no_logn = make_model(vision=True, attn="sdpa", use_logn_attn=False)(input_ids=ids).logits
    torch.testing.assert_close(derived, explicit, rtol=0, atol=1e-5)
    if length > 64:  # the factor matters there, so the comparison above is not vacuous
        assert not torch.allclose(explicit, no_logn, atol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# Static caches and compiled decoding steps
# ---------------------------------------------------------------------------------------------------------------


def _compile_config(backend: str) -> CompileConfig:
    config = CompileConfig(backend=backend, fullgraph=True, dynamic=False, mode=None)
    config._compile_all_devices = True  # transformers compiles only on accelerators unless told so
    return config


def test_static_cache_decoding_compiles_in_one_graph_with_equal_greedy_ids(vlm):
    """fullgraph=True fails on any graph break: a decoding step (pictures and all) traces as one graph."""
    ids = _prompt()
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    greedy = {"do_sample": False, "max_new_tokens": 12, "min_new_tokens": 12, "suppress_tokens": [IMG, IMG + 1]}
    torch._dynamo.reset()
    with torch.inference_mode():
        eager = vlm.generate(input_ids=ids, pixel_values=pixels, **greedy)
        static = vlm.generate(input_ids=ids, pixel_values=pixels, cache_implementation="static", **greedy)
        compiled = vlm.generate(
            input_ids=ids,
            pixel_values=pixels,
            cache_implementation="static",
            compile_config=_compile_config("eager"),
            **greedy,
        )
    assert torch.equal(eager, static) and torch.equal(eager, compiled)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it was compiled, not run eagerly


def test_a_static_cache_keeps_the_prefill_ntk_factor():
    """seq_length 16 and a 20-token prompt: the factor is 3 at prefill and would be 7 past 32 tokens."""
    model = make_model(vision=False, attn="sdpa", seq_length=16, use_dynamic_ntk=True)
    ids = torch.randint(0, IMG, (1, 20), generator=torch.Generator().manual_seed(5))
    greedy = {"do_sample": False, "max_new_tokens": 24, "min_new_tokens": 24, "return_dict_in_generate": True}
    with torch.inference_mode():
        dynamic = model.generate(input_ids=ids, **greedy)
        static = model.generate(input_ids=ids, cache_implementation="static", **greedy)
    cache = static.cache if hasattr(static, "cache") else static.past_key_values
    assert isinstance(cache, QWenStaticCache) and cache.ntk_alphas == [3.0]
    assert torch.equal(dynamic.sequences, static.sequences)


class _Force(LogitsProcessor):
    """Make the first generated tokens these ones."""

    def __init__(self, prompt_len: int, tokens: list[int]) -> None:
        self.prompt_len, self.tokens = prompt_len, tokens

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_len
        if step < len(self.tokens):
            scores = torch.full_like(scores, -float("inf"))
            scores[:, self.tokens[step]] = 0.0
        return scores


def test_image_tokens_the_model_generates_are_ordinary_tokens(vlm):
    """An <img> or <imgpad> the model writes while decoding is not a picture's span: generation goes on."""
    ids = _prompt()
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    forced = [IMG, PAD_IMG, PAD_IMG, IMG + 1]
    with torch.inference_mode():
        out = vlm.generate(
            input_ids=ids,
            pixel_values=pixels,
            do_sample=False,
            max_new_tokens=8,
            min_new_tokens=8,
            logits_processor=LogitsProcessorList([_Force(ids.shape[1], forced)]),
        )
    assert out[0, ids.shape[1] : ids.shape[1] + 4].tolist() == forced and out.shape[1] == ids.shape[1] + 8


@pytest.fixture(scope="module")
def compiled(tiny_dir):
    """The tiny checkpoint with compile=True (inductor; compiles on its first decoding step)."""
    from belle_vl_tools import BelleVL

    return BelleVL.from_pretrained(tiny_dir, dtype="float32", compile=True)


GREEDY = {"do_sample": False, "max_new_tokens": 12, "min_new_tokens": 12}


def test_the_runtime_compiled_answers_as_the_eager_one(compiled, runtime, pictures):
    """BelleVL(compile=True): static caches, decoding steps through torch.compile (inductor), the prefix cache
    still reused, and the same greedy answers as the eager runtime, with and without a picture."""

    def ask(picture: str, question: str) -> list[dict]:
        return [{"role": "user", "content": [{"type": "image", "image": str(pictures[picture])}, question]}]

    first, second, other = ask("red", "What is it?"), ask("red", "And its color?"), ask("blue", "What is it?")
    text = [{"role": "user", "content": "Tell me a story."}]
    for messages in (first, second, other, text):
        assert compiled.chat(messages, **GREEDY).text == runtime.chat(messages, **GREEDY).text
    assert compiled.stats["prefix_tokens_reused"] > 0
    assert compiled.chat(first, **GREEDY).text != compiled.chat(other, **GREEDY).text  # the picture counts


def test_serving_a_compiled_runtime(compiled, runtime, monkeypatch):
    """`belle-vl serve --compile` loads a compiled runtime; the server answers through the scheduler (the engine
    keeps caches of its own) with the eager runtime's greedy answer, and refuses engine=True."""
    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    import belle_vl_tools.server as server
    from belle_vl_tools.cli import app as cli
    from belle_vl_tools.server import create_app

    seen: dict = {}
    monkeypatch.setattr(server, "serve", lambda *args, **kwargs: seen.update(kwargs))
    assert CliRunner().invoke(cli, ["serve", "--compile"]).exit_code == 0 and seen["compile"] is True
    assert CliRunner().invoke(cli, ["serve"]).exit_code == 0 and seen["compile"] is False

    messages = [{"role": "user", "content": "Tell me a story."}]
    with TestClient(create_app(compiled, model_name="tiny")) as client:
        reply = client.post(
            "/v1/chat/completions",
            json={"model": "tiny", "messages": messages, "temperature": 0, "max_tokens": 12},
        )
    assert reply.status_code == 200, reply.text
    expected = runtime.chat(messages, do_sample=False, max_new_tokens=12).text
    assert reply.json()["choices"][0]["message"]["content"] == expected
    with pytest.raises(ValueError, match="compile=True"):
        create_app(compiled, engine=True)


# ---------------------------------------------------------------------------------------------------------------
# Half precision with SDPA: how a GPU user loads the model
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_sdpa_prefill_matches_float32_eager(tmp_path, dtype):
    """The vision tower, the resampler and the prefill loaded in bf16/fp16 with SDPA (the kernels a GPU runs, flash
    among them where installed) give the float32 eager model's logits within half-precision tolerance."""
    from belle_vl_tools.modeling_qwen_vl import QWenLMHeadModel
    from tests.test_model_contracts import vision_inputs

    reference = make_model(vision=True, attn="eager")
    reference.save_pretrained(tmp_path)
    half = QWenLMHeadModel.from_pretrained(tmp_path, dtype=dtype, attn_implementation="sdpa").eval()
    assert half.transformer.h[0].attn.c_attn.weight.dtype == dtype
    assert half.config._attn_implementation == "sdpa"
    ids, pixels = vision_inputs()
    with torch.inference_mode():
        want = reference(input_ids=ids, pixel_values=pixels).logits
        got = half(input_ids=ids, pixel_values=pixels.to(dtype)).logits.float()
        other_picture = half(input_ids=ids, pixel_values=-pixels.to(dtype)).logits.float()
    tolerance = 0.03 * want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=0, atol=tolerance)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.95
    assert (other_picture - want).abs().max() > 3 * tolerance  # the pictures matter beyond the tolerance


# ---------------------------------------------------------------------------------------------------------------
# min_new_tokens without transformers' per-step vocabulary masks
# ---------------------------------------------------------------------------------------------------------------


def test_holding_the_end_tokens_scores_as_transformers_processors_do():
    from transformers.generation.logits_process import MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor

    from belle_vl_tools.runtime import _HoldEndTokens

    end = [5, 17, 30]
    ours = _HoldEndTokens(end, prompt_len=6, minimum=4, device=torch.device("cpu"))
    theirs = LogitsProcessorList(
        [
            MinLengthLogitsProcessor(6 + 4, torch.tensor(end)),  # transformers derives min_length from min_new_tokens
            MinNewTokensLengthLogitsProcessor(6, 4, torch.tensor(end)),
        ]
    )
    scores = torch.randn(2, 40, generator=torch.Generator().manual_seed(0))
    scores[:, end] = 50.0  # the end tokens would win
    for length in range(6, 14):
        ids = torch.zeros(2, length, dtype=torch.long)
        want = theirs(ids, scores.clone())
        assert torch.equal(ours(ids, scores.clone()), want)
        assert (want.argmax(-1).tolist()[0] in end) == (length >= 10)  # held for 4 tokens, then free


def test_min_new_tokens_in_the_runtime_gives_transformers_ids(runtime):
    """With the end token favoured, min_new_tokens holds it back for exactly as many tokens as transformers would."""
    end = runtime.generation_config.eos_token_id
    end = end if isinstance(end, int) else end[0]
    settings = {"do_sample": False, "max_new_tokens": 20, "min_new_tokens": 7, "sequence_bias": {(end,): 30.0}}
    item = runtime.prepare([{"role": "user", "content": "Tell me a story."}])
    ids = torch.tensor([item.input_ids])
    with torch.inference_mode():
        want = runtime.model.generate(input_ids=ids, **settings)[0, ids.shape[1] :].tolist()
    assert len(want) == 8 and want[-1] == end  # seven tokens held, then the favoured end token
    result = runtime.chat([{"role": "user", "content": "Tell me a story."}], **settings)
    assert result.usage.completion_tokens == len(want) and result.finish_reason == "stop"  # the end token counts
    assert result.text == runtime.tokenizer.decode(want[:-1]).strip()
