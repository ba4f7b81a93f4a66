"""Hand-run benchmark of the batching engine: 16 concurrent streamed requests with mixed settings, batched vs one
at a time, and the time to first token of a request that arrives while a batch is decoding.

    python benchmarks/engine.py [--rounds 2] [--max-tokens 32]

The model is the small random checkpoint of ``benchmarks/runtime.py`` (Qwen-VL's proportions at hidden size 512,
the first 8,192 ranks of the real vocabulary). Sixteen requests (four with a picture) stream at once: half greedy,
the others sampled with their own seeds, temperatures, top-p / top-k, presence / frequency / repetition penalties,
logit biases, stop strings and log-probabilities. They run through one :class:`BatchEngine` with
``max_batch_size=16`` and through one with ``max_batch_size=1`` (one at a time, the same code path); the answers of
both must be equal (greedy ones also equal ``BelleVL.chat`` alone, seeded ones equal across the two engines).

The second figure: fifteen requests decode, then a sixteenth arrives; its time to first token is reported in
milliseconds and in decoding steps of the running batch (target: a few steps, not the rest of the batch).

``run_benchmarks(runtime)`` returns the figures as a dict, for other benchmarks (``benchmarks/serve.py``) to
print side by side. Timings on shared cores are noisy: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import math
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from belle_vl_tools import BelleVL  # noqa: E402
from belle_vl_tools.engine import BatchEngine, EngineResult, SamplingParams  # noqa: E402
from belle_vl_tools.testing import write_tiny_checkpoint  # noqa: E402

CONCURRENT = 16
TARGET_RATIO = 3.0
TARGET_TTFT_STEPS = 4.0
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain why the sky is blue.",
    "List three uses of a paperclip.",
    "hi",
    "Translate 'good morning' into German.",
    "What is 17 times 23?",
    "Summarize a detective novel.",
    "Name a large mammal.",
    "How do bees make honey?",
    "Give me a word that rhymes with cat.",
    "What colour is a ripe banana?",
    "Why do we sleep?",
    "Suggest a name for a goldfish.",
    "What is a prime number?",
    "Describe the smell of rain.",
]


def _runtime_benchmark() -> Any:
    """benchmarks/runtime.py, for its model sizes and helpers (it is a script, not a package module)."""
    spec = importlib.util.spec_from_file_location("runtime_benchmark", Path(__file__).with_name("runtime.py"))
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


class _NoEnd:
    """Forbids the end-of-turn tokens, so a row decodes for all of its ``max_new_tokens``."""

    def __init__(self, stop_ids: set[int]) -> None:
        self.stop_ids = sorted(stop_ids)

    def __call__(self, generated_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        logits[self.stop_ids] = -math.inf
        return logits


def mixed_requests(
    runtime: BelleVL, pictures: list[Path], max_tokens: int, concurrent: int = CONCURRENT, with_picture: int = 4
) -> list[tuple[list[dict], SamplingParams]]:
    """``concurrent`` conversations (``with_picture`` of them, spread out, ask about a picture) and settings: even
    ones greedy, odd ones sampled with different seeds and penalties."""
    requests = []
    step = concurrent // with_picture if with_picture else 0
    for i in range(concurrent):
        question = QUESTIONS[i % len(QUESTIONS)]
        content: Any = question
        if step and i % step == step - 1 and i // step < with_picture and pictures:
            content = [{"type": "image", "image": str(pictures[i % len(pictures)])}, {"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        if i % 2 == 0:
            params = SamplingParams(temperature=0, max_new_tokens=max_tokens, logprobs=i % 4 == 0, top_logprobs=0)
        else:
            params = SamplingParams(
                temperature=0.7 + 0.1 * (i % 5),
                top_p=0.9,
                top_k=40 if i % 3 == 0 else 0,
                seed=1000 + i,
                max_new_tokens=max_tokens,
                presence_penalty=0.3 * (i % 3),
                frequency_penalty=0.2,
                repetition_penalty=1.1 if i % 5 == 0 else None,
                logit_bias={100 + i: 2.0},
                stop=["\n\n"],
                logprobs=True,
                top_logprobs=2,
            )
        requests.append((messages, params))
    return requests


async def _burst(engine: BatchEngine, requests: list[tuple[list[dict], SamplingParams]]) -> list[EngineResult]:
    async def one(messages: list[dict], params: SamplingParams) -> EngineResult:
        text, last, ids = "", None, []
        async for event in engine.stream(messages, params):
            text += event.delta
            ids += event.token_ids
            last = event
        return EngineResult(text, last.finish_reason, last.usage, ids)

    return await asyncio.gather(*(one(m, p) for m, p in requests))


def bench_throughput(
    runtime: BelleVL,
    pictures: list[Path],
    max_tokens: int = 32,
    rounds: int = 2,
    concurrent: int = CONCURRENT,
    with_picture: int = 4,
) -> dict[str, Any]:
    """Wall time of ``concurrent`` streamed mixed requests batched and one at a time (medians over rounds)."""
    requests = mixed_requests(runtime, pictures, max_tokens, concurrent, with_picture)
    times: dict[str, list[float]] = {"batched": [], "single": []}
    answers: dict[str, list[EngineResult]] = {}
    with BatchEngine(runtime, max_batch_size=concurrent) as batched, BatchEngine(runtime, max_batch_size=1) as single:
        warm = [(m, replace(p, max_new_tokens=2)) for m, p in requests[:4]]
        asyncio.run(_burst(batched, warm))
        asyncio.run(_burst(single, warm))
        for _ in range(rounds):  # interleaved, so that drifts of the machine hit both alike
            for name, engine in (("batched", batched), ("single", single)):
                start = time.perf_counter()
                results = asyncio.run(_burst(engine, requests))
                times[name].append(time.perf_counter() - start)
                answers[name] = results
        max_rows = batched.stats["max_rows"]
    greedy = [i for i, (_, p) in enumerate(requests) if p.temperature == 0]
    alone = [runtime.chat(requests[i][0], temperature=0, max_new_tokens=max_tokens).text for i in greedy]
    same_greedy = [answers["batched"][i].text for i in greedy] == alone == [answers["single"][i].text for i in greedy]
    same_sampled = [r.token_ids for r in answers["batched"]] == [r.token_ids for r in answers["single"]]
    tokens = sum(r.usage.completion_tokens for r in answers["batched"])
    batched_s, single_s = statistics.median(times["batched"]), statistics.median(times["single"])
    return {
        "requests": concurrent,
        "with_picture": with_picture,
        "max_tokens": max_tokens,
        "rounds": rounds,
        "tokens": tokens,
        "batched_s": batched_s,
        "single_s": single_s,
        "ratio": single_s / batched_s,
        "max_rows": max_rows,
        "greedy_equal_chat": same_greedy,
        "seeded_equal": same_sampled,
    }


def bench_join(runtime: BelleVL, running: int = CONCURRENT - 1, steps_before: int = 8, repeats: int = 3) -> dict:
    """Time to first token of a request arriving while ``running`` rows decode, in ms and in decoding steps."""
    no_end = _NoEnd(runtime.stop_ids)
    long = SamplingParams(temperature=0, max_new_tokens=steps_before + 60, processors=[no_end])
    newcomer = [{"role": "user", "content": "What is the capital of France?"}]
    ttfts, steps, idle = [], [], []

    with BatchEngine(runtime, max_batch_size=running + 1) as engine:

        async def idle_ttft() -> float:
            start = time.perf_counter()
            async for _ in engine.stream(newcomer, SamplingParams(temperature=0, max_new_tokens=1)):
                break
            return time.perf_counter() - start

        async def one_round() -> tuple[float, float]:
            ready = asyncio.Event()
            stamps: list[float] = []

            async def background(i: int) -> None:
                n = 0
                async for _ in engine.stream([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], long):
                    n += 1
                    if i == 0:
                        stamps.append(time.perf_counter())
                    if n == steps_before and i == 0:
                        ready.set()

            tasks = [asyncio.create_task(background(i)) for i in range(running)]
            await ready.wait()
            start = time.perf_counter()
            async for _ in engine.stream(newcomer, SamplingParams(temperature=0, max_new_tokens=1)):
                break
            ttft = time.perf_counter() - start
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            intervals = [b - a for a, b in zip(stamps[1:-1], stamps[2:], strict=False)]  # steps after all joined
            return ttft, statistics.median(intervals)

        asyncio.run(idle_ttft())  # warm-up
        for _ in range(repeats):
            idle.append(asyncio.run(idle_ttft()))
            ttft, step = asyncio.run(one_round())
            ttfts.append(ttft)
            steps.append(step)
    ttft, step = statistics.median(ttfts), statistics.median(steps)
    return {
        "running": running,
        "ttft_s": ttft,
        "step_s": step,
        "ttft_steps": ttft / step,
        "idle_ttft_s": statistics.median(idle),
        "rest_of_batch_steps": 60,
    }


def run_benchmarks(
    runtime: BelleVL, pictures: list[Path], max_tokens: int = 32, rounds: int = 2, with_picture: int = 4
) -> dict[str, Any]:
    """Both figures: ``{"throughput": bench_throughput(...), "join": bench_join(...)}``."""
    throughput = bench_throughput(runtime, pictures, max_tokens, rounds, with_picture=with_picture)
    return {"throughput": throughput, "join": bench_join(runtime)}


def report(figures: dict[str, Any]) -> list[str]:
    """Lines that describe the figures, with the targets."""
    t, j = figures["throughput"], figures["join"]
    lines = [
        f"{t['requests']} concurrent streamed requests, mixed settings (half greedy, half seeded sampling with "
        f"penalties, logit bias, stop strings, logprobs; {t['with_picture']} with a picture), "
        f"up to {t['max_tokens']} new tokens each "
        f"({t['tokens']} tokens per round), medians of {t['rounds']} rounds:",
        f"  batched (max_batch_size={t['requests']}, up to {t['max_rows']} rows) {t['batched_s']:7.2f} s  "
        f"{t['tokens'] / t['batched_s']:7.1f} tok/s",
        f"  one at a time (max_batch_size=1)         {t['single_s']:7.2f} s  {t['tokens'] / t['single_s']:7.1f} tok/s",
        f"  throughput ratio {t['ratio']:.2f}x (target >= {TARGET_RATIO:g}x: "
        f"{'ok' if t['ratio'] >= TARGET_RATIO else 'MISSED'}); greedy answers equal BelleVL.chat alone: "
        f"{t['greedy_equal_chat']}; seeded answers equal batched and alone: {t['seeded_equal']}",
        f"Time to first token of a request arriving while {j['running']} rows decode: {j['ttft_s'] * 1000:.0f} ms = "
        f"{j['ttft_steps']:.1f} decoding steps of {j['step_s'] * 1000:.0f} ms (target <= {TARGET_TTFT_STEPS:g}: "
        f"{'ok' if j['ttft_steps'] <= TARGET_TTFT_STEPS else 'MISSED'}; the batch had {j['rest_of_batch_steps']} "
        f"steps to go); on an idle engine: {j['idle_ttft_s'] * 1000:.0f} ms",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds per engine (interleaved)")
    parser.add_argument("--max-tokens", type=int, default=32, help="new tokens per request")
    parser.add_argument("--pictures", type=int, default=4, help="how many of the 16 requests ask about a picture")
    parser.add_argument("--vocab-ranks", type=int, default=8192, help="first N ranks of qwen.tiktoken (0: all)")
    args = parser.parse_args()
    bench = _runtime_benchmark()
    bench.warn_if_busy()
    with tempfile.TemporaryDirectory() as tmp:
        vocab = bench.vocab_prefix(Path(tmp), args.vocab_ranks)
        folder = write_tiny_checkpoint(
            Path(tmp) / "belle-vl-small", seed=0, visual=bench.VISUAL, vocab_file=vocab, **bench.LM
        )
        pictures = []
        for seed in range(2):
            path = Path(tmp) / f"picture{seed}.png"
            bench.picture(seed).save(path)
            pictures.append(path)
        runtime = BelleVL.from_pretrained(folder, prefix_cache_size=0)
        figures = run_benchmarks(runtime, pictures, args.max_tokens, args.rounds, args.pictures)
    lm = bench.LM
    print(
        f"Belle-VL batching engine benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads, float32, "
        f"random weights; LM hidden {lm['hidden_size']}, {lm['num_hidden_layers']} layers, vocab ranks "
        f"{args.vocab_ranks or 'all'}"
    )
    for line in report(figures):
        print(line)


if __name__ == "__main__":
    main()
