"""transformers' model contracts, checked on a tiny text-only and a tiny vision configuration.

The same things transformers' own common model and generation tests check on in-tree models: hidden states and
attention weights (forward and generate), ``return_dict=False`` tuples, eager == sdpa with left padding, assisted
decoding, save/load, resizing the embeddings, a training step, ``inputs_embeds`` equivalence and the output of
``get_image_features``; plus the ways a picture could be lost, which must raise.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPooling

from belle_vl_tools.configuration_qwen_vl import QWenConfig
from belle_vl_tools.modeling_qwen_vl import QWenCache, QWenLMHeadModel

VOCAB = 320
IMG = 300  # <img>; </img> = 301, <imgpad> = 302
PAD_IMG = IMG + 2
QUERIES = 4  # image positions per picture
LAYERS, HEADS = 2, 4


def make_config(vision: bool, attn: str = "eager", **overrides) -> QWenConfig:
    visual = None
    if vision:
        visual = {
            "heads": 2,
            "image_size": 28,
            "image_start_id": IMG,
            "layers": 2,
            "mlp_ratio": 2.0,
            "output_dim": 128,
            "patch_size": 14,
            "width": 32,
            "n_queries": QUERIES,
        }
    config = QWenConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        kv_channels=32,
        intermediate_size=256,
        visual=visual,
        eos_token_id=VOCAB - 1,
        pad_token_id=VOCAB - 2,
        **{"seq_length": 64, **overrides},
    )
    config._attn_implementation = attn
    return config


def make_model(vision: bool, attn: str = "eager", seed: int = 0, **overrides) -> QWenLMHeadModel:
    torch.manual_seed(seed)
    return QWenLMHeadModel(make_config(vision, attn, **overrides)).eval()


def text_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, IMG, (batch, length), generator=gen)


def span() -> list[int]:
    return [IMG] + [PAD_IMG] * QUERIES + [IMG + 1]


def vision_inputs(seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """One row with two pictures and text around them, and its two pictures' pixels."""
    gen = torch.Generator().manual_seed(seed)
    words = lambda n: torch.randint(0, IMG, (n,), generator=gen).tolist()  # noqa: E731
    ids = torch.tensor([words(3) + span() + words(2) + span() + words(3)])
    return ids, torch.randn(2, 3, 28, 28, generator=gen)


@pytest.fixture(scope="module", params=[False, True], ids=["text", "vision"])
def model(request) -> QWenLMHeadModel:
    return make_model(request.param)


@pytest.fixture(scope="module")
def vlm() -> QWenLMHeadModel:
    return make_model(True)


def inputs_for(model: QWenLMHeadModel) -> dict[str, torch.Tensor]:
    if model.config.visual is None:
        return {"input_ids": text_ids(2, 9)}
    ids, pixels = vision_inputs()
    return {"input_ids": ids, "pixel_values": pixels}


# --- forward outputs ------------------------------------------------------------------------------------------
def test_hidden_states_and_attentions_have_transformers_shapes(model):
    inputs = inputs_for(model)
    batch, length = inputs["input_ids"].shape
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True, output_attentions=True)
        plain = model(**inputs)
    assert len(out.hidden_states) == LAYERS + 1
    assert all(h.shape == (batch, length, 128) for h in out.hidden_states)
    assert len(out.attentions) == LAYERS
    assert all(a.shape == (batch, HEADS, length, length) for a in out.attentions)
    # attention rows are distributions over the causal past
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(batch, HEADS, length))
    assert out.attentions[0][0, 0, 0, 1:].abs().max() == 0
    assert plain.hidden_states is None and plain.attentions is None
    # the last hidden state is the normed output that the head reads
    torch.testing.assert_close(model.lm_head(out.hidden_states[-1]), out.logits)
    # the first is the embedding sequence, pictures already in place
    base = model.transformer(**inputs, output_hidden_states=True)
    torch.testing.assert_close(base.hidden_states[0], out.hidden_states[0])


def test_config_flags_set_the_default_outputs():
    model = make_model(False)
    model.config.output_hidden_states = True
    model.config.output_attentions = True
    with torch.no_grad():
        out = model(input_ids=text_ids(1, 5))
        off = model(input_ids=text_ids(1, 5), output_hidden_states=False, output_attentions=False)
    assert len(out.hidden_states) == LAYERS + 1 and len(out.attentions) == LAYERS
    assert off.hidden_states is None and off.attentions is None


def test_return_dict_false_gives_the_tuple_of_the_output(model):
    inputs = inputs_for(model)
    labels = inputs["input_ids"].clone()
    with torch.no_grad():
        out = model(**inputs, labels=labels, output_hidden_states=True)
        tup = model(**inputs, labels=labels, output_hidden_states=True, return_dict=False)
        base = model.transformer(**inputs, return_dict=False)
    assert isinstance(tup, tuple) and isinstance(base, tuple)
    assert len(tup) == len(out.to_tuple()) == 4  # loss, logits, cache, hidden states
    torch.testing.assert_close(tup[0], out.loss)
    torch.testing.assert_close(tup[1], out.logits)
    assert isinstance(tup[2], QWenCache) and len(tup[3]) == LAYERS + 1
    torch.testing.assert_close(base[0], out.hidden_states[-1])


def test_use_cache_labels_and_logits_to_keep(model):
    inputs = inputs_for(model)
    ids = inputs["input_ids"]
    with torch.no_grad():
        full = model(**inputs, labels=ids)
        no_cache = model(**inputs, use_cache=False)
        last = model(**inputs, logits_to_keep=1)
    assert getattr(full, "cache", getattr(full, "past_key_values", None)) is not None
    assert getattr(no_cache, "cache", getattr(no_cache, "past_key_values", None)) is None
    assert last.logits.shape[1] == 1
    torch.testing.assert_close(last.logits[:, 0], full.logits[:, -1])
    expected = torch.nn.functional.cross_entropy(full.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(full.loss, expected)


@pytest.mark.parametrize("vision", [False, True], ids=["text", "vision"])
def test_eager_equals_sdpa_with_left_padding(vision):
    eager, sdpa = make_model(vision, "eager"), make_model(vision, "sdpa")
    if vision:
        ids, pixels = vision_inputs()
        short = ids[:, 11:]  # the second picture only
        extra = {"pixel_values": torch.cat([pixels, pixels[1:]])}
    else:
        ids, short, extra = text_ids(1, 12), text_ids(1, 7, seed=5), {}
    pad = VOCAB - 2
    width = ids.shape[1]
    batch = torch.full((2, width), pad)
    batch[0] = ids[0]
    batch[1, width - short.shape[1] :] = short[0]
    mask = torch.zeros_like(batch)
    mask[0] = 1
    mask[1, width - short.shape[1] :] = 1
    with torch.no_grad():
        a = eager(input_ids=batch, attention_mask=mask, **extra).logits
        b = sdpa(input_ids=batch, attention_mask=mask, **extra).logits
        alone = eager(input_ids=short, pixel_values=pixels[1:] if vision else None).logits
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], rtol=1e-4, atol=1e-4)
    # the left-padded row computes what the short prompt computes alone
    torch.testing.assert_close(a[1, real[1]], alone[0], rtol=1e-4, atol=1e-4)


def test_sdpa_model_returns_attentions_through_eager(caplog):
    eager, sdpa = make_model(False, "eager"), make_model(False, "sdpa")
    ids = text_ids(1, 6)
    with torch.no_grad():
        want = eager(input_ids=ids, output_attentions=True).attentions
        got = sdpa(input_ids=ids, output_attentions=True).attentions
    assert len(got) == LAYERS
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g, w)


# --- pictures ---------------------------------------------------------------------------------------------------
def test_get_image_features_returns_a_transformers_output(vlm):
    _, pixels = vision_inputs()
    with torch.no_grad():
        out = vlm.get_image_features(pixels, output_hidden_states=True, output_attentions=True)
        plain = vlm.get_image_features(pixels)
        tup = vlm.get_image_features(pixels, return_dict=False)
    assert isinstance(out, BaseModelOutputWithPooling)
    assert out.pooler_output.shape == (2, QUERIES, 128)
    assert out.last_hidden_state.shape == (2, 4, 32)  # 2x2 patches of width 32
    assert len(out.hidden_states) == 3 and len(out.attentions) == 2
    assert out.attentions[0].shape == (2, 2, 4, 4)
    torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state)
    torch.testing.assert_close(plain.pooler_output, out.pooler_output)
    assert plain.hidden_states is None and plain.attentions is None
    torch.testing.assert_close(tup[1], out.pooler_output)


def test_pixels_change_the_answer_and_features_equal_pixels(vlm):
    ids, pixels = vision_inputs()
    with torch.no_grad():
        a = vlm(input_ids=ids, pixel_values=pixels).logits
        b = vlm(input_ids=ids, pixel_values=pixels.flip(0)).logits
        feats = vlm.get_image_features(pixels)
        c = vlm(input_ids=ids, image_features=feats.pooler_output).logits
        d = vlm(input_ids=ids, image_features=feats).logits
    assert (a[0, -1] - b[0, -1]).abs().max() > 1e-4
    torch.testing.assert_close(c, a)
    torch.testing.assert_close(d, a)


def test_inputs_embeds_with_pixels_equal_input_ids_with_pixels(vlm):
    ids, pixels = vision_inputs()
    with torch.no_grad():
        want = vlm(input_ids=ids, pixel_values=pixels).logits
        got = vlm(inputs_embeds=vlm.get_input_embeddings()(ids), pixel_values=pixels).logits
        ignored = vlm(inputs_embeds=vlm.get_input_embeddings()(ids), pixel_values=pixels.flip(0)).logits
    torch.testing.assert_close(got, want)
    assert (ignored[0, -1] - want[0, -1]).abs().max() > 1e-4


def test_placeholder_mask_for_ids_and_embeds(vlm):
    ids, _ = vision_inputs()
    by_ids, starts = vlm.transformer.get_placeholder_mask(ids, vlm.get_input_embeddings()(ids))
    by_embeds, starts_e = vlm.transformer.get_placeholder_mask(None, vlm.get_input_embeddings()(ids))
    assert int(by_ids.sum()) == 2 * QUERIES and torch.equal(by_ids, by_embeds) and torch.equal(starts, starts_e)


def test_an_image_span_without_pictures_raises(vlm):
    ids, pixels = vision_inputs()
    with pytest.raises(ValueError, match=r"image spans \(8 <imgpad> positions, 2 image\(s\)\).*no pixel_values"):
        vlm(input_ids=ids)
    with pytest.raises(ValueError, match="no pixel_values"):
        vlm(inputs_embeds=vlm.get_input_embeddings()(ids))
    with pytest.raises(ValueError, match="no pixel_values"):
        vlm.generate(input_ids=ids, max_new_tokens=2, do_sample=False)


def test_picture_count_mismatch_names_both_counts(vlm):
    ids, pixels = vision_inputs()
    with pytest.raises(ValueError, match=r"8 <imgpad> positions \(2 image\(s\) of 4\) but 4 feature vectors"):
        vlm(input_ids=ids, pixel_values=pixels[:1])
    with pytest.raises(ValueError, match=r"8 <imgpad> positions .* but 12 feature vectors \(3 image\(s\)\)"):
        vlm(input_ids=ids, pixel_values=torch.cat([pixels, pixels[:1]]))
    with pytest.raises(ValueError, match="2 image.* no image positions"):
        vlm(input_ids=text_ids(1, 5), pixel_values=pixels)
    with pytest.raises(ValueError, match="text-only"):
        make_model(False)(input_ids=text_ids(1, 5), pixel_values=pixels)


def test_pictures_of_a_cached_prefix_are_skipped(vlm):
    """A prompt continued on a cache holding its first picture: pixels of both pictures may still be passed."""
    ids, pixels = vision_inputs()
    with torch.no_grad():
        full = vlm(input_ids=ids, pixel_values=pixels).logits
        cut = 3 + len(span()) + 1
        cache = vlm(input_ids=ids[:, :cut], pixel_values=pixels[:1]).cache
        rest = vlm(input_ids=ids[:, cut:], pixel_values=pixels, cache=cache).logits
    torch.testing.assert_close(rest, full[:, cut:], rtol=1e-4, atol=1e-4)


# --- generate -----------------------------------------------------------------------------------------------------
def test_generate_dict_outputs(model):
    inputs = inputs_for(model)
    batch, length = inputs["input_ids"].shape
    new = 3
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            return_dict_in_generate=True,
            output_hidden_states=True,
            output_attentions=True,
            output_scores=True,
            output_logits=True,
        )
    assert out.sequences.shape == (batch, length + new)
    assert len(out.scores) == len(out.logits) == new and out.scores[0].shape == (batch, VOCAB)
    assert len(out.hidden_states) == len(out.attentions) == new
    assert len(out.hidden_states[0]) == LAYERS + 1 and out.hidden_states[0][0].shape == (batch, length, 128)
    assert out.hidden_states[1][0].shape == (batch, 1, 128)
    assert out.attentions[0][0].shape == (batch, HEADS, length, length)
    assert out.attentions[-1][0].shape == (batch, HEADS, 1, length + new - 1)
    assert isinstance(getattr(out, "cache", getattr(out, "past_key_values", None)), QWenCache)


def test_assisted_decoding_with_outputs_matches_greedy(model):
    inputs = inputs_for(model)
    inputs = {k: v[:1] if k == "input_ids" else v for k, v in inputs.items()}
    assistant = make_model(model.config.visual is not None, seed=9)
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    outputs = dict(output_hidden_states=True, output_attentions=True, output_scores=True)
    with torch.no_grad():
        greedy = model.generate(**inputs, **kwargs, **outputs)
        assisted = model.generate(**inputs, assistant_model=assistant, **kwargs, **outputs)
    assert torch.equal(assisted.sequences, greedy.sequences)
    assert len(assisted.hidden_states) == len(assisted.attentions) == 5
    for a, g in zip(assisted.scores, greedy.scores, strict=True):
        torch.testing.assert_close(a, g, rtol=1e-4, atol=1e-4)


def test_generate_keeps_the_prefill_ntk_factor_per_row():
    model = make_model(False, seq_length=8)
    ids = text_ids(2, 12)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # row 1 is 6 tokens long: alpha 1; row 0 is 12: alpha 3
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                             return_dict_in_generate=True)  # fmt: skip
        alone = model.generate(input_ids=ids[1:, 6:], max_new_tokens=4, do_sample=False)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    assert cache.ntk_alphas == [3.0, 1.0]
    assert torch.equal(out.sequences[1, 12:], alone[0, 6:])


def test_beam_search_reorders_the_ntk_factors():
    model = make_model(False, seq_length=8)
    ids = text_ids(2, 12)
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=3, num_beams=2, do_sample=False,
                             return_dict_in_generate=True)  # fmt: skip
    assert out.sequences.shape == (2, 15)
    cache = QWenCache(ntk_alphas=[1.0, 3.0])
    cache.batch_repeat_interleave(2)
    assert cache.ntk_alphas == [1.0, 1.0, 3.0, 3.0]
    cache.batch_select_indices(torch.tensor([3, 0]))
    assert cache.ntk_alphas == [3.0, 1.0]


def test_a_plain_dynamic_cache_from_the_caller_still_works():
    model = make_model(False)
    ids = text_ids(1, 6)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        cache = DynamicCache()
        first = model(input_ids=ids[:, :4], cache=cache)
        rest = model(input_ids=ids[:, 4:], cache=first.cache).logits
    torch.testing.assert_close(rest, want[:, 4:], rtol=1e-5, atol=1e-5)


# --- save/load, resize, training -----------------------------------------------------------------------------------
def test_save_and_load_round_trip(model, tmp_path):
    inputs = inputs_for(model)
    model.save_pretrained(tmp_path)
    loaded = QWenLMHeadModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is QWenLMHeadModel and loaded.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)


def test_resize_token_embeddings():
    model = make_model(True)
    ids, pixels = vision_inputs()
    with torch.no_grad():
        before = model(input_ids=ids, pixel_values=pixels).logits
    model.resize_token_embeddings(VOCAB + 16)
    assert model.get_input_embeddings().weight.shape[0] == VOCAB + 16
    assert model.get_output_embeddings().weight.shape[0] == VOCAB + 16 == model.config.vocab_size
    with torch.no_grad():
        after = model(input_ids=ids, pixel_values=pixels).logits
    assert after.shape[-1] == VOCAB + 16
    torch.testing.assert_close(after[..., :VOCAB], before)
    model.resize_token_embeddings(VOCAB - 8)
    assert model.config.vocab_size == VOCAB - 8


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_a_training_step_updates_every_trained_part(checkpointing):
    model = make_model(True)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    ids, pixels = vision_inputs()
    labels = ids.clone()
    labels[ids == PAD_IMG] = -100
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    loss = model(input_ids=ids, pixel_values=pixels, labels=labels).loss
    loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert "transformer.h.0.attn.c_attn.weight" in changed
    assert "transformer.visual.conv1.weight" in changed  # the picture's gradient reaches the vision tower
    assert "lm_head.weight" in changed


def test_generate_from_inputs_embeds_with_pictures(vlm):
    ids, pixels = vision_inputs()
    kwargs = dict(max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        by_ids = vlm.generate(input_ids=ids, pixel_values=pixels, **kwargs)[:, ids.shape[1] :]
        by_embeds = vlm.generate(inputs_embeds=vlm.get_input_embeddings()(ids), pixel_values=pixels, **kwargs)
    assert torch.equal(by_embeds, by_ids)


def test_generate_continues_from_a_returned_cache(model):
    inputs = inputs_for(model)
    kwargs = dict(do_sample=False, return_dict_in_generate=True)
    with torch.no_grad():
        whole = model.generate(**inputs, max_new_tokens=6, **kwargs)
        first = model.generate(**inputs, max_new_tokens=3, **kwargs)
        cache = first.cache if hasattr(first, "cache") else first.past_key_values
        more = {k: v for k, v in inputs.items() if k != "input_ids"}
        rest = model.generate(input_ids=first.sequences, max_new_tokens=3, cache=cache, **more, **kwargs)
    assert torch.equal(rest.sequences, whole.sequences)


def test_config_round_trips(tmp_path):
    config = make_config(True, seq_length=128)
    config.save_pretrained(tmp_path)
    loaded = QWenConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert QWenConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()
    assert json.loads(config.to_json_string())["model_type"] == "qwen"
    assert loaded.visual["n_queries"] == QUERIES and loaded.num_image_queries == QUERIES
    assert loaded.image_pad_id == PAD_IMG and make_config(False).image_pad_id is None
    with pytest.raises(ValueError, match="output_dim"):
        QWenConfig(hidden_size=256, visual={"output_dim": 128})


def test_pictures_with_beams_samples_and_a_static_cache(vlm):
    """generate encodes the pictures once and expands them for beams and returned sequences."""
    ids, pixels = vision_inputs()
    greedy = dict(max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        want = vlm.generate(input_ids=ids, pixel_values=pixels, **greedy)
        static = vlm.generate(input_ids=ids, pixel_values=pixels, cache_implementation="static", **greedy)
        beams = vlm.generate(input_ids=ids, pixel_values=pixels, num_beams=2, num_return_sequences=2, **greedy)
        torch.manual_seed(0)
        sampled = vlm.generate(input_ids=ids, pixel_values=pixels, num_return_sequences=2, max_new_tokens=4,
                               do_sample=True, top_k=1)  # fmt: skip
    assert torch.equal(static, want)
    assert beams.shape == (2, ids.shape[1] + 4)
    assert torch.equal(sampled, want.expand(2, -1))  # top_k=1: both samples are the greedy answer
