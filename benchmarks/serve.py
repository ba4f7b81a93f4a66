"""Hand-run benchmark of the HTTP server: 16 concurrent short requests, batched vs answered one at a time.

    python benchmarks/serve.py

Two servers over the same loaded model (the small random checkpoint of ``benchmarks/runtime.py``: Qwen-VL's
proportions at hidden size 512, the first 8,192 ranks of the real vocabulary) run on 127.0.0.1, one after the
other: one batches the requests that wait together (``max_batch_size=16``), the other answers them one at a time
(``max_batch_size=1``). Each round sends the same 16 different text questions at once (greedy, ``max_tokens`` new
tokens each) to each server; both must give the same answers. It prints the medians over the rounds and the
throughput ratio (target >= 3). Run it on an otherwise idle machine: timings on shared cores are noisy.
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

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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
TARGET = 3.0
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


async def burst(base_url: str, max_tokens: int) -> tuple[float, list[str], int]:
    """Send the questions at once; the wall time, the answers and the generated tokens."""
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=httpx.Limits(max_connections=64)) as client:

        async def one(question: str) -> dict[str, Any]:
            body = {
                "model": "bench",
                "messages": [{"role": "user", "content": question}],
                "temperature": 0,
                "max_tokens": max_tokens,
            }
            response = await client.post("/v1/chat/completions", json=body)
            response.raise_for_status()
            return response.json()

        start = time.perf_counter()
        replies = await asyncio.gather(*(one(q) for q in QUESTIONS[:CONCURRENT]))
        elapsed = time.perf_counter() - start
    texts = [r["choices"][0]["message"]["content"] for r in replies]
    tokens = sum(r["usage"]["completion_tokens"] for r in replies)
    return elapsed, texts, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per server (interleaved)")
    parser.add_argument("--max-tokens", type=int, default=32, help="new tokens per request")
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
        batched = create_app(runtime, model_name="bench", max_batch_size=CONCURRENT, max_queue=64)
        single = create_app(runtime, model_name="bench", max_batch_size=1, max_queue=64)

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
        if answers["batched"] != answers["single"]:
            raise SystemExit("the batched and the one-at-a-time answers differ")
        stats = batched.state.scheduler.stats

    batched_s, single_s = statistics.median(times["batched"]), statistics.median(times["single"])
    ratio = single_s / batched_s
    lm = bench.LM
    print(
        f"Belle-VL server benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads, float32, "
        f"random weights; LM hidden {lm['hidden_size']}, {lm['num_hidden_layers']} layers, vocab ranks "
        f"{args.vocab_ranks or 'all'}"
    )
    print(
        f"{CONCURRENT} concurrent text requests, greedy, {args.max_tokens} new tokens each "
        f"({tokens['batched']} tokens per round), medians of {args.rounds} rounds:"
    )
    rows = [(f"batched (max_batch_size={CONCURRENT})", batched_s, tokens["batched"])]
    rows.append(("one at a time (max_batch_size=1)", single_s, tokens["single"]))
    for label, seconds, count in rows:
        print(f"  {label:<34} {seconds:7.2f} s  {count / seconds:7.1f} tok/s")
    verdict = "ok" if ratio >= TARGET else "MISSED"
    print(f"  throughput ratio batched / one at a time: {ratio:.2f}  (target >= {TARGET:.1f}) {verdict}")
    print(f"  batches formed by the batching server: {stats['batches']}, largest {stats['largest_batch']}")


if __name__ == "__main__":
    main()
