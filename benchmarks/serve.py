"""Hand-run benchmark of the HTTP server and its batching engine, three measurements in one run.

    python benchmarks/serve.py

Over the small random checkpoint of ``benchmarks/runtime.py`` (Qwen-VL's proportions at hidden size 512, the first
8,192 ranks of the real vocabulary), served on 127.0.0.1:

1. **Mixed streamed burst.** 16 streamed requests sent at once, with mixed settings (greedy; seeded sampling at
   several temperatures and top-p; presence / frequency penalties), to a server whose engine decodes up to 16 rows
   together and to one that decodes one row at a time. Both must give the same answers (greedy and seeded rows
   alike); the wall times give the throughput ratio (target >= 3).
2. **Joining mid-batch.** 15 long streams decode; a 16th request arrives while they do. Its time to first token is
   compared with one decoding step of the running batch (target: within a few steps) and with the time the
   batch still had to run (it must not wait for it).
3. **Constrained decoding overhead.** The same request decoded alone by the engine with and without a JSON-schema
   grammar (xgrammar through :mod:`belle_vl_tools.constrained`); the difference of the median time per step,
   as a share of a plain step (target <= 10%).

Run it on an otherwise idle machine: timings on shared cores are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine import QUESTIONS  # noqa: E402  (the engine benchmark beside this file: the same 16 prompts)

from belle_vl_tools import BelleVL  # noqa: E402
from belle_vl_tools.server import background_server, create_app  # noqa: E402
from belle_vl_tools.testing import write_tiny_checkpoint  # noqa: E402


def _runtime_benchmark() -> Any:
    """benchmarks/runtime.py, for its model sizes and helpers (it is a script, not a package module)."""
    spec = importlib.util.spec_from_file_location("runtime_benchmark", Path(__file__).with_name("runtime.py"))
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


CONCURRENT = 16
TARGETS = {"throughput": 3.0, "ttft_steps": 4.0, "constrained": 0.10}
SCHEMA = {
    "type": "object",
    "properties": {"color": {"type": "string"}, "sides": {"type": "integer"}, "note": {"type": "string"}},
    "required": ["color", "sides", "note"],
}


def settings(i: int) -> dict[str, Any]:
    """Mixed sampling settings: greedy, seeded sampling, penalties."""
    kind = i % 4
    if kind == 0:
        return {"temperature": 0}
    if kind == 1:
        return {"temperature": 0.7, "seed": i}
    if kind == 2:
        return {"temperature": 1.0, "top_p": 0.9, "seed": i}
    return {"temperature": 0, "presence_penalty": 0.5, "frequency_penalty": 0.3}


async def stream_one(client: Any, question: str, max_tokens: int, extra: dict[str, Any]) -> dict[str, Any]:
    """One streamed request: its text, tokens, and the times of its deltas."""
    start = time.perf_counter()
    stream = await client.chat.completions.create(
        model="bench",
        messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        **extra,
    )
    text, times, tokens = "", [], 0
    async for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if choice.delta.content:
                text += choice.delta.content
                times.append(time.perf_counter() - start)
    return {"text": text, "tokens": tokens, "times": times, "start": start}


async def burst(base_url: str, max_tokens: int) -> tuple[float, list[str], int]:
    """The 16 mixed streamed requests at once: wall time, answers, generated tokens."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=600)
    start = time.perf_counter()
    replies = await asyncio.gather(
        *(stream_one(client, q, max_tokens, settings(i)) for i, q in enumerate(QUESTIONS[:CONCURRENT]))
    )
    elapsed = time.perf_counter() - start
    await client.close()
    return elapsed, [r["text"] for r in replies], sum(r["tokens"] for r in replies)


async def join_mid_batch(base_url: str, long_tokens: int) -> dict[str, float]:
    """TTFT of a request that arrives while 15 long streams decode, against their step time."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=600)
    first_tokens: list[asyncio.Event] = [asyncio.Event() for _ in range(CONCURRENT - 1)]

    async def long(i: int) -> dict[str, Any]:
        start = time.perf_counter()
        stream = await client.chat.completions.create(
            model="bench",
            messages=[{"role": "user", "content": QUESTIONS[i]}],
            max_tokens=long_tokens,
            temperature=0,
            stream=True,
        )
        times = []
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                times.append(time.perf_counter())
                first_tokens[i].set()
        return {"start": start, "times": times}

    runners = [asyncio.ensure_future(long(i)) for i in range(CONCURRENT - 1)]
    await asyncio.gather(*(event.wait() for event in first_tokens))
    await asyncio.sleep(0.2)  # well inside the decoding
    late = await stream_one(client, QUESTIONS[-1], 4, {"temperature": 0})
    arrived = late["start"]
    ttft = late["times"][0]
    results = await asyncio.gather(*runners)
    await client.close()
    gaps = [b - a for r in results for a, b in zip(r["times"], r["times"][1:], strict=False)]
    batch_end = max(r["times"][-1] for r in results)
    return {"ttft": ttft, "step": statistics.median(gaps), "batch_left": batch_end - arrived}


def constrained_overhead(runtime: Any, tokens: int, repeats: int) -> dict[str, float]:
    """Median seconds per decoding step of one request alone, with and without a JSON-schema grammar."""
    from belle_vl_tools.constrained import Grammar, RowProcessor
    from belle_vl_tools.engine import BatchEngine, SamplingParams

    messages = [{"role": "user", "content": "Describe a shape as JSON."}]
    vocab = runtime.model.config.vocab_size
    steps: dict[str, list[float]] = {"plain": [], "json": []}
    with BatchEngine(runtime, max_batch_size=1) as engine:
        for _ in range(repeats):
            for name in ("plain", "json"):
                processors = []
                if name == "json":
                    grammar = Grammar.json_schema(SCHEMA)
                    processors = [RowProcessor(grammar, runtime.tokenizer, vocab_size=vocab, max_new_tokens=tokens)]
                params = SamplingParams(max_new_tokens=tokens, temperature=0, processors=processors)
                last = None
                for _event in engine.stream_sync(messages, params):
                    now = time.perf_counter()
                    if last is not None:
                        steps[name].append(now - last)
                    last = now
    plain, constrained = statistics.median(steps["plain"]), statistics.median(steps["json"])
    return {"plain": plain, "json": constrained, "share": (constrained - plain) / plain}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of the burst per server (interleaved)")
    parser.add_argument("--max-tokens", type=int, default=32, help="new tokens per request of the burst")
    parser.add_argument("--long-tokens", type=int, default=96, help="new tokens of the long streams in part 2")
    parser.add_argument("--vocab-ranks", type=int, default=8192, help="first N ranks of qwen.tiktoken (0: all)")
    args = parser.parse_args()
    bench = _runtime_benchmark()
    bench.warn_if_busy()

    with tempfile.TemporaryDirectory() as tmp:
        vocab = bench.vocab_prefix(Path(tmp), args.vocab_ranks)
        folder = write_tiny_checkpoint(
            Path(tmp) / "belle-vl-small", seed=0, visual=bench.VISUAL, vocab_file=vocab, **bench.LM
        )
        runtime = BelleVL.from_pretrained(folder, prefix_cache_size=0)
        batched = create_app(runtime, model_name="bench", max_batch_size=CONCURRENT, max_queue=64, engine=True)
        single = create_app(runtime, model_name="bench", max_batch_size=1, max_queue=64, engine=True)

        times: dict[str, list[float]] = {"batched": [], "single": []}
        answers: dict[str, list[str]] = {}
        tokens: dict[str, int] = {}
        with background_server(batched) as batched_url, background_server(single) as single_url:
            asyncio.run(burst(batched_url, 4))  # warm-up
            asyncio.run(burst(single_url, 4))
            for _ in range(args.rounds):  # interleaved, so that drifts of the machine hit both alike
                for name, url in (("batched", batched_url), ("single", single_url)):
                    elapsed, texts, count = asyncio.run(burst(url, args.max_tokens))
                    times[name].append(elapsed)
                    if answers.setdefault(name, texts) != texts:
                        raise SystemExit(f"the {name} server answered differently between rounds")
                    tokens[name] = count
            join = asyncio.run(join_mid_batch(batched_url, args.long_tokens))
            stats = batched.state.generator.stats
        same = answers["batched"] == answers["single"]
        overhead = constrained_overhead(runtime, 48, args.rounds)

    batched_s, single_s = statistics.median(times["batched"]), statistics.median(times["single"])
    ratio = single_s / batched_s
    lm = bench.LM

    def verdict(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    print(
        f"Belle-VL server benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads, float32, "
        f"random weights; LM hidden {lm['hidden_size']}, {lm['num_hidden_layers']} layers, vocab ranks "
        f"{args.vocab_ranks or 'all'}"
    )
    print(
        f"1. {CONCURRENT} concurrent streamed requests, mixed settings (greedy / seeded sampling / penalties), "
        f"{args.max_tokens} new tokens at most, medians of {args.rounds} rounds:"
    )
    for label, seconds, count in (
        (f"batched (engine, {CONCURRENT} rows)", batched_s, tokens["batched"]),
        ("one at a time (engine, 1 row)", single_s, tokens["single"]),
    ):
        print(f"   {label:<34} {seconds:7.2f} s  {count / seconds:7.1f} tok/s")
    print(
        f"   throughput ratio: {ratio:.2f} (target >= {TARGETS['throughput']:.0f}) {verdict(ratio >= 3)}; "
        f"answers equal batched vs one at a time: {same}"
    )
    steps = join["ttft"] / join["step"]
    print(f"2. a request arriving while {CONCURRENT - 1} streams decode ({args.long_tokens} tokens each):")
    print(
        f"   time to first token {join['ttft'] * 1000:.0f} ms = {steps:.1f} decoding steps of the batch "
        f"({join['step'] * 1000:.0f} ms each; target <= {TARGETS['ttft_steps']:.0f}) {verdict(steps <= 4)}; "
        f"the batch still had {join['batch_left']:.2f} s to run"
    )
    share = overhead["share"]
    print("3. constrained decoding (JSON schema, xgrammar), one request alone, median per step:")
    print(
        f"   plain {overhead['plain'] * 1000:.2f} ms, constrained {overhead['json'] * 1000:.2f} ms: overhead "
        f"{share * 100:+.1f}% of a step (target <= {TARGETS['constrained'] * 100:.0f}%) "
        f"{verdict(share <= TARGETS['constrained'])}"
    )
    print(
        f"   engine of the batching server: {stats.get('prefills', 0)} prefills, largest batch {stats.get('max_rows')}"
    )
    if not same:
        raise SystemExit("the batched and the one-at-a-time answers differ")


if __name__ == "__main__":
    main()
