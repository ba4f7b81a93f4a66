"""The local runtime on the tiny checkpoint: images reach the model, stream == chat, batch == one-by-one, caches."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from belle_vl_tools import BelleVL, ImageNotFoundError, PromptError
from belle_vl_tools.backend import LocateResult
from belle_vl_tools.testing import ScriptedBackend, write_tiny_checkpoint

GREEDY = {"do_sample": False, "max_new_tokens": 8}


def ask(image, text="What is in the picture?"):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


def test_two_images_give_different_logits(runtime, pictures):
    proc, model = runtime.processor, runtime.model
    logits = []
    for name in ("red", "blue"):
        inputs = proc.apply_chat_template(
            ask(pictures[name]), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        with torch.no_grad():
            logits.append(model(**inputs).logits[0, -1])
    assert (logits[0] - logits[1]).abs().max() > 1e-3


def test_stream_joined_equals_chat(runtime, pictures):
    result = runtime.chat(ask(pictures["red"]), **GREEDY)
    chunks = list(runtime.stream(ask(pictures["red"]), **GREEDY))
    assert "".join(c.delta for c in chunks) == result.text
    assert chunks[-1].finish_reason == result.finish_reason == "length"
    assert chunks[-1].usage == result.usage
    assert all(c.usage is None for c in chunks[:-1])
    assert result.usage.images == 1 and result.usage.completion_tokens == 8
    assert result.usage.prompt_tokens == len(runtime.prepare(ask(pictures["red"])).input_ids)


def test_batch_equals_one_by_one(runtime, pictures):
    conversations = [
        ask(pictures["red"]),
        [{"role": "user", "content": "Tell me a story about a lighthouse keeper and the sea."}],
        ask(pictures["blue"], "Which shape?"),
        [{"role": "user", "content": "hi"}],
    ]
    fresh = BelleVL(runtime.model, runtime.processor, prefix_cache_size=0, vision_cache_size=0)
    one_by_one = [fresh.chat(c, **GREEDY).text for c in conversations]
    batch = fresh.generate_batch(conversations, **GREEDY)
    assert [r.text for r in batch] == one_by_one
    assert [r.usage.images for r in batch] == [1, 0, 1, 0]


@pytest.fixture(scope="module")
def short_context(tmp_path_factory):
    """A tiny checkpoint with seq_length 64, so dynamic NTK and logn scaling are active in short prompts."""
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("short") / "ck", seed=1, seq_length=64, visual=False)
    return BelleVL.from_pretrained(path, dtype="float32", prefix_cache_size=0)


def test_batch_equals_one_by_one_beyond_seq_length(short_context):
    conversations = [
        [{"role": "user", "content": "short"}],
        [{"role": "user", "content": "long " * 120}],  # ~140 tokens: NTK factor 7 for this row only
        [{"role": "user", "content": "medium " * 50}],  # ~70 tokens: factor 3
    ]
    one_by_one = [short_context.chat(c, **GREEDY).text for c in conversations]
    assert [r.text for r in short_context.generate_batch(conversations, **GREEDY)] == one_by_one


def test_vision_features_are_cached(runtime, pictures):
    runtime.clear_caches()
    before = dict(runtime.stats)
    runtime.chat(ask(pictures["green"]), **GREEDY)
    runtime.chat(ask(pictures["green"], "And the color?"), **GREEDY)
    history = (
        ask(pictures["green"])
        + [{"role": "assistant", "content": "a circle"}]
        + [{"role": "user", "content": "Is it big?"}]
    )
    runtime.chat(history, **GREEDY)
    assert runtime.stats["vision_encoded"] - before["vision_encoded"] == 1


def test_prefix_cache_reuse_gives_the_same_answers(tiny_dir, runtime, pictures):
    cold = BelleVL(runtime.model, runtime.processor, prefix_cache_size=0, vision_cache_size=0)
    warm = BelleVL(runtime.model, runtime.processor, prefix_cache_size=2)
    questions = ["What is it?", "What color is it?", "Where is it?"]
    first = warm.chat(ask(pictures["red"], questions[0]), **GREEDY)
    assert first.text == cold.chat(ask(pictures["red"], questions[0]), **GREEDY).text
    reused_before = warm.stats["prefix_tokens_reused"]
    for q in questions[1:]:
        assert warm.chat(ask(pictures["red"], q), **GREEDY).text == cold.chat(ask(pictures["red"], q), **GREEDY).text
    assert warm.stats["prefix_tokens_reused"] - reused_before >= 2 * 258
    # another picture: the cached prefix stops before the image, and the answer is that of a cold run
    other = warm.chat(ask(pictures["blue"], questions[1]), **GREEDY)
    assert other.text == cold.chat(ask(pictures["blue"], questions[1]), **GREEDY).text
    # a follow-up turn that continues the conversation
    follow = ask(pictures["red"], questions[0]) + [
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": "Are you sure?"},
    ]
    assert warm.chat(follow, **GREEDY).text == cold.chat(follow, **GREEDY).text


def test_prefix_not_reused_across_ntk_change(short_context):
    rt = BelleVL(short_context.model, short_context.processor, prefix_cache_size=2)
    cold = short_context
    base = [{"role": "user", "content": "The quick brown fox."}]
    rt.chat(base, **GREEDY)
    longer = [{"role": "user", "content": "The quick brown fox." + " jumps" * 80}]
    assert rt.chat(longer, **GREEDY).text == cold.chat(longer, **GREEDY).text


def test_length_limit_keeps_the_last_token(runtime):
    messages = [{"role": "user", "content": "Count to ten."}]
    result = runtime.chat(messages, do_sample=False, max_new_tokens=5)
    inputs = runtime.processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    out = runtime.model.generate(**inputs, do_sample=False, max_new_tokens=5)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    assert len(new) == 5 and result.finish_reason == "length" and result.usage.completion_tokens == 5
    assert result.text == runtime.tokenizer.decode(new).strip()


def test_plain_generate_stops_at_chat_end_tokens(runtime):
    eos = runtime.model.generation_config.eos_token_id
    tok = runtime.tokenizer
    assert {tok.eod_id, tok.im_end_id, tok.im_start_id} <= set(eos)


def test_stop_strings(runtime):
    messages = [{"role": "user", "content": "Write something."}]
    full = runtime.chat(messages, do_sample=False, max_new_tokens=12).text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), "the tiny model's output should have text in the middle"
    expected = full[: full.index(stop)].strip()
    cut = runtime.chat(messages, do_sample=False, max_new_tokens=12, stop=[stop])
    assert cut.text == expected and cut.finish_reason == "stop"
    streamed = list(runtime.stream(messages, do_sample=False, max_new_tokens=12, stop=stop))
    assert "".join(c.delta for c in streamed) == expected and streamed[-1].finish_reason == "stop"


def test_generation_arguments_are_validated(runtime):
    messages = [{"role": "user", "content": "hi"}]
    for bad in ({"temperature": -1}, {"max_new_tokens": 0}, {"top_p": 2.0}, {"no_such_arg": 1}, {"stop": [""]}):
        with pytest.raises(PromptError):
            runtime.chat(messages, **bad)


def test_sampling_settings_are_checked_by_the_shared_model(runtime):
    from belle_vl_tools.errors import SamplingError
    from belle_vl_tools.sampling import SamplingParams

    messages = [{"role": "user", "content": "hi"}]
    for bad in ({"top_p": 2.0}, {"seed": 2**80}, {"max_tokens": 0}, {"temperature": float("inf")}):
        with pytest.raises(SamplingError) as from_runtime:
            runtime.chat(messages, **bad)
        with pytest.raises(SamplingError) as from_model:
            SamplingParams.from_kwargs(bad)
        assert str(from_runtime.value) == str(from_model.value)  # one rule, one message
        assert from_runtime.value.param == from_model.value.param
    # what only the batching engine honours is refused by name, not dropped
    for name, value in (("presence_penalty", 0.5), ("logit_bias", {5: 1.0}), ("logprobs", True)):
        with pytest.raises(SamplingError, match=f"{name} is honoured by the batching engine") as caught:
            runtime.chat(messages, max_new_tokens=2, **{name: value})
        assert caught.value.param == name


def test_sampling_with_seed_is_reproducible(runtime):
    messages = [{"role": "user", "content": "Say something random."}]
    a = runtime.chat(messages, temperature=1.0, top_p=1.0, seed=7, max_new_tokens=10).text
    b = runtime.chat(messages, temperature=1.0, top_p=1.0, seed=7, max_new_tokens=10).text
    c = runtime.chat(messages, temperature=1.0, top_p=1.0, seed=8, max_new_tokens=10).text
    assert a == b and a != c
    assert runtime.chat(messages, temperature=0, max_new_tokens=6).text == runtime.chat(messages, **{
        "do_sample": False, "max_new_tokens": 6}).text  # fmt: skip


def test_async_forms_match_and_do_not_block(runtime, pictures):
    expected = runtime.chat(ask(pictures["red"]), **GREEDY)

    async def main():
        ticks = 0
        done = asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0.001)

        task = asyncio.create_task(ticker())
        result = await runtime.achat(ask(pictures["red"]), **GREEDY)
        chunks = [c async for c in runtime.astream(ask(pictures["red"]), **GREEDY)]
        done.set()
        await task
        return result, chunks, ticks

    result, chunks, ticks = asyncio.run(main())
    assert result.text == expected.text
    assert "".join(c.delta for c in chunks) == expected.text
    assert ticks > 3


def test_threads_share_one_model(runtime):
    messages = [{"role": "user", "content": "Name a color."}]
    expected = runtime.chat(messages, **GREEDY).text
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(runtime.chat(messages, **GREEDY).text)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected] * 4


def test_stream_can_be_abandoned(runtime):
    messages = [{"role": "user", "content": "Go on."}]
    left_alone = runtime.chat(messages, do_sample=False, max_new_tokens=200)
    steps: list[int] = []
    hook = runtime.model.register_forward_hook(lambda *args: steps.append(1))
    try:
        stream = runtime.stream(messages, do_sample=False, max_new_tokens=200)
        next(stream)
        stream.close()  # stops the generation thread and waits for it
        at_close = len(steps)
        assert runtime.chat([{"role": "user", "content": "hi"}], **GREEDY).text  # the model is free again
    finally:
        hook.remove()
    # Counted in decoding steps, not seconds: left alone the prompt runs to the limit; closed, it stopped far short.
    assert left_alone.usage.completion_tokens == 200
    assert at_close < 50, at_close


def test_model_card_api(runtime, tokenizer, pictures):
    model = runtime.model
    query = tokenizer.from_list_format([{"image": str(pictures["red"])}, {"text": "What is this?"}])
    assert query == f"Picture 1: <img>{pictures['red']}</img>\nWhat is this?"
    response, history = model.chat(tokenizer, query=query, history=None, do_sample=False, max_new_tokens=8)
    assert response == runtime.chat(ask(pictures["red"], "What is this?"), **GREEDY).text
    assert history == [(query, response)]
    # the model card's other form: a first line naming an image file
    plain, _ = model.chat(
        tokenizer, f"{pictures['red']}\nWhat is this?", history=None, do_sample=False, max_new_tokens=8
    )
    assert plain == response
    # the image really is read: another picture, another answer path (logits differ; answers usually do too)
    _, history2 = model.chat(tokenizer, "Are you sure?", history=history, do_sample=False, max_new_tokens=8)
    assert len(history2) == 2
    streamed = list(model.chat_stream(tokenizer, query, history=None, do_sample=False, max_new_tokens=8))
    assert streamed[-1] == response
    with pytest.raises(ImageNotFoundError):
        model.chat(tokenizer, "<img>/no/such/picture.png</img>\nWhat?", history=None, max_new_tokens=2)


def test_labels_train_the_model(tiny_dir):
    from belle_vl_tools import QWenLMHeadModel

    model = QWenLMHeadModel.from_pretrained(tiny_dir).train()
    ids = torch.randint(0, 1000, (2, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_vision_tasks_on_any_backend(pictures):
    backend = ScriptedBackend("<ref>the circle</ref><box>(100,200),(500,600)</box>")
    located = backend.locate(pictures["red"], "the circle")
    assert isinstance(located, LocateResult) and located.image_size == (96, 80)
    (box,) = located.boxes
    assert (box.label, box.x1, box.y1, box.x2, box.y2) == ("the circle", 9.6, 16.0, 48.0, 48.0)
    assert 'detection box of "the circle"' in backend.messages()[0].parts[1].text
    backend.describe(pictures["red"], detail="detailed", language="zh")
    assert backend.messages()[0].parts[1].text == "详细描述一下这张图"


def test_tasks_run_on_the_runtime(runtime, pictures):
    assert runtime.describe(pictures["red"], max_new_tokens=4, do_sample=False).text
    assert runtime.ask(pictures["red"], "Which color?", max_new_tokens=4, do_sample=False).usage.images == 1
    assert isinstance(runtime.locate(pictures["red"], "circle", max_new_tokens=4, do_sample=False), LocateResult)
    with pytest.raises(PromptError):
        runtime.ask(pictures["red"], "   ")


def test_too_long_prompt_is_a_typed_error(runtime):
    from belle_vl_tools import ContextLengthError

    small = BelleVL(runtime.model, runtime.processor, max_context_tokens=64)
    with pytest.raises(ContextLengthError, match="max_context_tokens"):
        small.chat([{"role": "user", "content": "word " * 100}], max_new_tokens=4)


def test_model_card_generation_arguments(runtime, tokenizer):
    from transformers import GenerationConfig

    model = runtime.model
    greedy = GenerationConfig(do_sample=False, max_new_tokens=6)
    response, _ = model.chat(tokenizer, "Say hi.", history=None, generation_config=greedy)
    assert response == runtime.chat([{"role": "user", "content": "Say hi."}], do_sample=False, max_new_tokens=6).text
    full, _ = model.chat(tokenizer, "Say hi.", history=None, do_sample=False, max_new_tokens=12)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    cut, _ = model.chat(
        tokenizer, "Say hi.", history=None, do_sample=False, max_new_tokens=12,
        stop_words_ids=[tokenizer.encode(stop)], append_history=False,
    )  # fmt: skip
    assert cut == full[: full.index(stop)].strip()


def test_load_backend_loads_a_checkpoint_folder_and_refuses_a_bare_model(tiny_dir, runtime):
    from belle_vl_tools.backend import load_backend
    from belle_vl_tools.tools import make_tools

    loaded = load_backend(str(tiny_dir))
    assert isinstance(loaded, BelleVL) and loaded.model_name == tiny_dir.name
    assert make_tools(str(tiny_dir), names=["visual_qa"])["visual_qa"].model.model_name == tiny_dir.name
    with pytest.raises(TypeError, match="bare transformers model"):
        load_backend(runtime.model)
