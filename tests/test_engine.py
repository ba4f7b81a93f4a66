"""The batching engine: requests with different settings share a running batch and each gets what it asked for."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from queue import SimpleQueue

import pytest
import torch

from belle_vl_tools import BelleVL, PromptError
from belle_vl_tools.engine import BatchEngine, EngineEvent, EngineResult, SamplingParams
from belle_vl_tools.testing import write_tiny_checkpoint

GREEDY = SamplingParams(temperature=0, max_new_tokens=8)


def ask(image, text="What is in the picture?"):
    return [{"role": "user", "content": [{"type": "image", "image": str(image)}, {"type": "text", "text": text}]}]


def greedy(**kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 0, "max_new_tokens": 8, **kw})


@pytest.fixture(scope="module")
def fresh(runtime):
    """The tiny model without the prefix cache, so one-by-one answers are computed from scratch."""
    return BelleVL(runtime.model, runtime.processor, prefix_cache_size=0)


@pytest.fixture(scope="module")
def engine(fresh):
    with BatchEngine(fresh, max_batch_size=8) as eng:
        yield eng


class NoEnd:
    """A row processor that forbids the chat's end tokens (keeps a row decoding for max_new_tokens)."""

    def __init__(self, runtime: BelleVL) -> None:
        self.stop_ids = sorted(runtime.stop_ids)

    def __call__(self, generated_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        logits[self.stop_ids] = -math.inf
        return logits


def run(coro):
    return asyncio.run(coro)


# --- greedy answers equal the runtime's, whatever shares the batch ----------------------------------------------


async def staggered(engine, jobs):
    """Run (conversation, params) jobs, each submitted once the previous one has streamed two events, so every
    request after the first joins a batch that is decoding."""

    async def one(conversation, params, started):
        events = []
        async for event in engine.stream(conversation, params):
            events.append(event)
            if len(events) == 2 or event.finish_reason is not None:
                started.set()
        return events

    tasks = []
    for conversation, params in jobs:
        started = asyncio.Event()
        tasks.append(asyncio.create_task(one(conversation, params, started)))
        await started.wait()
    return [EngineResult.from_events(events) for events in await asyncio.gather(*tasks)]


def test_greedy_in_a_mixed_batch_equals_chat_alone(fresh, engine, pictures):
    conversations = [
        ask(pictures["red"]),
        [{"role": "user", "content": "Tell me a story about a lighthouse keeper and the sea, in detail."}],
        ask(pictures["blue"], "Which shape?"),
        [{"role": "user", "content": "hi"}],
    ]
    alone = [fresh.chat(c, temperature=0, max_new_tokens=16) for c in conversations]
    sampled = SamplingParams(temperature=1.0, top_p=0.9, seed=3, max_new_tokens=20, frequency_penalty=0.5)
    joins = engine.stats["joins"]
    jobs = [(ask(pictures["green"]), sampled)] + [(c, greedy(max_new_tokens=16)) for c in conversations]
    results = run(staggered(engine, [*jobs, (conversations[1], sampled)]))[1:5]
    assert engine.stats["joins"] - joins >= 4
    assert [r.text for r in results] == [a.text for a in alone]
    assert [r.usage for r in results] == [a.usage for a in alone]
    assert [r.finish_reason for r in results] == [a.finish_reason for a in alone]
    assert [r.usage.images for r in results] == [1, 0, 1, 0]


def test_the_picture_reaches_the_model(engine, pictures):
    red, blue = (engine.complete_sync(ask(pictures[c]), greedy(logprobs=True)) for c in ("red", "blue"))
    assert [e.logprob for e in red.logprobs] != [e.logprob for e in blue.logprobs]


@pytest.fixture(scope="module")
def short_context(tmp_path_factory):
    """seq_length 64: dynamic NTK and logn scaling differ between rows of ordinary lengths."""
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("short") / "ck", seed=1, seq_length=64, visual=False)
    return BelleVL.from_pretrained(path, dtype="float32", prefix_cache_size=0)


def test_per_row_dynamic_ntk(short_context):
    conversations = [
        [{"role": "user", "content": "short"}],
        [{"role": "user", "content": "long " * 120}],  # NTK factor 7 for this row only
        [{"role": "user", "content": "medium " * 50}],  # factor 3
    ]
    alone = [short_context.chat(c, temperature=0, max_new_tokens=10).text for c in conversations]
    assert len(set(alone)) == 3

    params = greedy(max_new_tokens=10, logprobs=True)
    with BatchEngine(short_context) as engine:
        one_by_one = [engine.complete_sync(c, params) for c in conversations]
        results = run(staggered(engine, [(c, params) for c in conversations]))
        assert engine.stats["joins"] == 2
    assert [r.text for r in results] == [r.text for r in one_by_one] == alone
    # the tiny model's argmax barely depends on positions: the log-probabilities show each row kept its own factor
    for batched, single in zip(results, one_by_one, strict=True):
        assert [e.logprob for e in batched.logprobs] == pytest.approx([e.logprob for e in single.logprobs], abs=1e-4)


def test_repetition_penalty_and_stop_strings_as_in_chat(fresh, engine):
    conversation = [{"role": "user", "content": "Count: one two three four"}]
    for kw in ({"repetition_penalty": 1.5}, {"stop": ["e"]}):
        alone = fresh.chat(conversation, temperature=0, max_new_tokens=12, **kw)
        result = engine.complete_sync(conversation, greedy(max_new_tokens=12, **kw))
        assert (result.text, result.finish_reason, result.usage) == (alone.text, alone.finish_reason, alone.usage)


# --- per-row sampling -----------------------------------------------------------------------------------------


def test_seeded_sampling_does_not_depend_on_companions(engine, pictures):
    params = SamplingParams(temperature=1.5, top_k=50, top_p=0.95, seed=1234, max_new_tokens=10)
    conversation = [{"role": "user", "content": "Say something."}]
    alone = engine.complete_sync(conversation, params)

    async def crowded():
        others = [
            engine.complete(ask(pictures["red"]), SamplingParams(temperature=1.0, max_new_tokens=14)),
            engine.complete(conversation, SamplingParams(temperature=1.5, seed=99, max_new_tokens=6)),
        ]
        return await asyncio.gather(engine.complete(conversation, params), *others)

    together, _, other_seed = run(crowded())
    assert together.token_ids == alone.token_ids
    assert other_seed.token_ids != alone.token_ids[:6]


def test_logprobs_equal_log_softmax_of_a_direct_forward(fresh, engine, pictures):
    conversation = ask(pictures["red"])
    result = engine.complete_sync(
        conversation,
        SamplingParams(
            temperature=1.0, seed=5, max_new_tokens=6, logprobs=True, top_logprobs=3, processors=[NoEnd(fresh)]
        ),
    )
    assert len(result.logprobs) == len(result.token_ids) == 6
    item = fresh.prepare(conversation)
    ids = torch.tensor([item.input_ids + result.token_ids])
    with torch.inference_mode():
        features = fresh.model.get_image_features(fresh.processor.pixel_values(item.images))
        features = getattr(features, "pooler_output", features)
        logits = fresh.model(input_ids=ids, image_features=features).logits[0].float()
    expected = torch.log_softmax(logits[len(item.input_ids) - 1 : -1], dim=-1)
    for step, (token, entry) in enumerate(zip(result.token_ids, result.logprobs, strict=True)):
        assert entry.logprob == pytest.approx(float(expected[step, token]), abs=1e-4)
        top = torch.topk(expected[step], 3)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert entry.bytes == list(fresh.tokenizer._piece(token, False))
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-6


def test_logit_bias_forces_a_token(fresh, engine):
    token = fresh.tokenizer.encode_text(" banana")[0]
    result = engine.complete_sync(
        [{"role": "user", "content": "hi"}], greedy(max_new_tokens=4, logit_bias={token: 100})
    )
    assert result.token_ids == [token] * 4
    assert result.finish_reason == "length"


class Script:
    """Forces a fixed answer and records the logits it receives at each step (after penalties)."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens
        self.seen: list[torch.Tensor] = []

    def __call__(self, generated_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        self.seen.append(logits.clone())
        forced = torch.full_like(logits, -math.inf)
        forced[self.tokens[len(generated_ids)]] = 0
        return forced


def test_penalties(fresh, engine):
    """presence / frequency as OpenAI defines them (generated tokens only); repetition as transformers (prompt too)."""
    tokens = [11, 11, 12, 11, 13]
    conversation = [{"role": "user", "content": "Repeat after me."}]
    prompt = fresh.prepare(conversation).input_ids
    plain, openai, repetition = Script(tokens), Script(tokens), Script(tokens)
    engine.complete_sync(conversation, greedy(max_new_tokens=5, processors=[plain]))
    engine.complete_sync(
        conversation, greedy(max_new_tokens=5, processors=[openai], presence_penalty=0.5, frequency_penalty=0.25)
    )
    engine.complete_sync(conversation, greedy(max_new_tokens=5, processors=[repetition], repetition_penalty=1.3))
    counts: dict[int, int] = {}
    for step, (a, b, r) in enumerate(zip(plain.seen, openai.seen, repetition.seen, strict=True)):
        expected = torch.zeros_like(a)
        for token, c in counts.items():
            expected[token] = -(0.5 + 0.25 * c)
        assert torch.allclose(b - a, expected, atol=1e-4), step
        seen = torch.tensor(sorted(set(prompt) | set(counts)))
        penalised = a.clone()
        penalised[seen] = torch.where(a[seen] < 0, a[seen] * 1.3, a[seen] / 1.3)
        assert (a[seen] < 0).any() and (a[seen] > 0).any()
        assert torch.allclose(r, penalised, atol=1e-4), step
        counts[tokens[step]] = counts.get(tokens[step], 0) + 1


# --- joining, leaving, streaming ------------------------------------------------------------------------------


def test_a_request_joins_a_running_batch_and_a_finished_one_leaves(fresh, engine):
    long = greedy(max_new_tokens=60, processors=[NoEnd(fresh)])
    conversation = [{"role": "user", "content": "Write a long text."}]

    async def main():
        order = []

        async def one(name, params):
            n = 0
            async for _ in engine.stream(conversation, params):
                n += 1
                if name == "long" and n == 5:
                    late.set()
            order.append(name)
            return n

        late = asyncio.Event()
        long_task = asyncio.create_task(one("long", long))
        await late.wait()
        steps_before = engine.stats["steps"]
        short = await one("short", greedy(max_new_tokens=3))
        joined_after = engine.stats["steps"] - steps_before
        await long_task
        return order, short, joined_after

    order, short, steps = run(main())
    assert order == ["short", "long"]  # joined while the long one decoded, and finished first
    assert short <= 3 and steps < 10


def test_an_abandoned_stream_leaves_the_batch(fresh, engine):
    params = greedy(max_new_tokens=500, processors=[NoEnd(fresh)])
    conversation = [{"role": "user", "content": "Go on forever."}]

    async def main():
        async def consume():
            async for _ in engine.stream(conversation, params):
                pass

        stream = engine.stream(conversation, params)
        async for _ in stream:  # stop iterating after the first event
            break
        await stream.aclose()
        task = asyncio.create_task(consume())  # a task cancelled mid-stream
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())
    iterator = engine.stream_sync(conversation, params)
    next(iterator)
    iterator.close()
    deadline = time.monotonic() + 10
    while (engine.batch_size or engine.queue_depth) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.batch_size == 0 and engine.queue_depth == 0


def test_stream_events(fresh, engine, pictures):
    conversation = ask(pictures["green"], "Describe it.")
    alone = fresh.chat(conversation, temperature=0, max_new_tokens=16)
    events = list(engine.stream_sync(conversation, greedy(max_new_tokens=16, logprobs=True)))
    assert all(isinstance(e, EngineEvent) for e in events)
    assert "".join(e.delta for e in events) == alone.text
    assert [e.finish_reason for e in events[:-1]] == [None] * (len(events) - 1)
    assert events[-1].finish_reason == alone.finish_reason and events[-1].usage == alone.usage
    assert all(len(e.logprobs) == len(e.token_ids) for e in events)


def test_rows_that_end_at_their_first_token_leave_their_prefill_group(fresh, engine):
    conversations = [[{"role": "user", "content": f"Question {i}?"}] for i in range(3)]
    limits = [4, 1, 5]
    alone = [fresh.chat(c, temperature=0, max_new_tokens=n) for c, n in zip(conversations, limits, strict=True)]
    queues = [SimpleQueue() for _ in conversations]
    with engine._cv:  # all three arrive before the worker looks: one prefill group
        prefills = engine.stats["prefills"]
        for conversation, n, queue in zip(conversations, limits, queues, strict=True):
            engine.submit(engine.prepare(conversation), greedy(max_new_tokens=n), queue.put)
    results = []
    for queue in queues:
        events = [queue.get()]
        while events[-1].finish_reason is None:
            events.append(queue.get())
        results.append(EngineResult.from_events(events))
    assert engine.stats["prefills"] == prefills + 1
    assert [(r.text, r.usage) for r in results] == [(a.text, a.usage) for a in alone]


def test_more_requests_than_rows_wait_their_turn(fresh):
    conversations = [[{"role": "user", "content": f"Number {i}"}] for i in range(5)]
    alone = [fresh.chat(c, temperature=0, max_new_tokens=6).text for c in conversations]
    results: list = [None] * 5
    with BatchEngine(fresh, max_batch_size=2) as small:

        def work(i):
            results[i] = small.complete_sync(conversations[i], greedy(max_new_tokens=6)).text

        threads = [threading.Thread(target=work, args=(i,)) for i in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert small.stats["max_rows"] <= 2
    assert results == alone


def test_a_failing_processor_fails_only_its_request(engine):
    def boom(generated_ids, logits):
        raise RuntimeError("grammar exploded")

    conversation = [{"role": "user", "content": "hi"}]

    async def main():
        return await asyncio.gather(
            engine.complete(conversation, greedy(processors=[boom])),
            engine.complete(conversation, greedy()),
            return_exceptions=True,
        )

    failed, fine = run(main())
    assert isinstance(failed, RuntimeError) and "grammar exploded" in str(failed)
    assert isinstance(fine, EngineResult) and fine.usage.completion_tokens >= 1


def test_the_shared_message_model_is_accepted(engine, pictures):
    from belle_vl_tools.messages import parse_messages

    conversation = ask(pictures["blue"], "Which shape?")
    as_dicts = engine.complete_sync(conversation, GREEDY)
    assert engine.complete_sync(parse_messages(conversation), GREEDY).token_ids == as_dicts.token_ids


def test_closed_engine_refuses_and_fails_waiting_requests(fresh):
    engine = BatchEngine(fresh)
    engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.complete_sync([{"role": "user", "content": "hi"}], GREEDY)


# --- settings are checked ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", float("nan")),
        ("temperature", -1),
        ("top_p", 0),
        ("top_k", -1),
        ("seed", 2**80),
        ("max_new_tokens", 0),
        ("presence_penalty", 3),
        ("frequency_penalty", float("inf")),
        ("repetition_penalty", 0),
        ("top_logprobs", 21),
        ("logit_bias", {"x": 1}),
        ("logit_bias", {5: 101}),
        ("stop", [""]),
        ("processors", [1]),
    ],
)
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(PromptError, match=field):
        SamplingParams(**{field: value, **({"logprobs": True} if field == "top_logprobs" else {})})


def test_bad_inputs_are_refused_before_queueing(engine, runtime):
    with pytest.raises(PromptError, match="logit_bias"):
        engine.complete_sync([{"role": "user", "content": "hi"}], greedy(logit_bias={10**7: 1}))
    with pytest.raises(PromptError, match="top_logprobs"):
        SamplingParams(top_logprobs=2)  # without logprobs=True
    with pytest.raises(PromptError, match="response_format"):  # a grammar goes in as a row processor, not dropped
        engine.complete_sync([{"role": "user", "content": "hi"}], greedy(response_format={"type": "json_object"}))
    with pytest.raises(PromptError):
        run(engine.complete([], GREEDY))


# --- the demo model answers right through the engine ----------------------------------------------------------


def test_demo_model_answers_about_the_picture(pictures):
    demo = BelleVL.from_pretrained(dtype="float32")
    with BatchEngine(demo) as engine:

        async def main():
            question = "What color is the shape?"
            return await asyncio.gather(
                *(engine.complete(ask(pictures[c], question), greedy(max_new_tokens=16)) for c in ("red", "blue"))
            )

        red, blue = run(main())
    assert "red" in red.text.lower() and "blue" in blue.text.lower()
