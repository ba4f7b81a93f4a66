"""Hand-run benchmark: vLLM with the Belle-VL plugin against ``belle-vl serve``, same checkpoint, same machine.

    .venv/bin/python benchmarks/vllm.py [--model FOLDER] [--dtype float32] [--device cuda]
        [--vllm-python .venv-vllm/bin/python]

Starts both OpenAI-compatible servers one after the other on 127.0.0.1 (``belle-vl serve`` from this environment,
vLLM's server from the environment that has vLLM and the plugin installed), sends each the same 16 concurrent
streamed requests (text-only and one-picture questions, greedy, 32 new tokens at most) and prints each server's
throughput (completion tokens per second of wall time), the ratio vLLM / belle-vl serve, and every request's time
to first token. Without ``--model``: the shipped demo model. Timings on shared cores are noisy: run it on an idle
machine, and compare ratios from one run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PICTURES = ROOT / "examples" / "pictures"


def requests() -> list[list[dict[str, Any]]]:
    """16 conversations: 8 text-only, 8 with one picture (data URLs, which both servers take)."""

    def picture(name: str) -> dict[str, Any]:
        data = base64.b64encode((PICTURES / name).read_bytes()).decode()
        return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}

    names = ["red_circle.png", "blue_square.png", "shapes_and_word.png"]
    questions = ["What color is the circle?", "Describe the picture.", "How many shapes are there in the image?"]
    out: list[list[dict[str, Any]]] = []
    for i in range(16):
        if i % 2:
            content: Any = [picture(names[i % 3]), {"type": "text", "text": questions[i % 3]}]
        else:
            content = f"Question {i}: what can you tell me about shapes and colors?"
        out.append([{"role": "user", "content": content}])
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(process: subprocess.Popen, port: int, log: Path, limit: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise SystemExit(f"the server did not start within {limit:.0f} s:\n{log.read_text()[-3000:]}")


async def burst(port: int, model: str, max_tokens: int) -> tuple[float, int, list[float]]:
    """Wall time, completion tokens and each request's time to first token of 16 concurrent streamed requests."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=600, max_retries=0)

    async def one(messages: list[dict[str, Any]]) -> tuple[float, int]:
        start = time.perf_counter()
        first = None
        tokens = 0
        stream = await client.chat.completions.create(
            model=model,
            messages=messages,
            temperature=0,
            max_tokens=max_tokens,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return (first if first is not None else time.perf_counter() - start), tokens

    start = time.perf_counter()
    results = await asyncio.gather(*(one(m) for m in requests()))
    wall = time.perf_counter() - start
    await client.close()
    return wall, sum(t for _, t in results), [f for f, _ in results]


def run_server(command: list[str], port: int, name: str, max_tokens: int, log: Path) -> tuple[float, int, list]:
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_ready(process, port, log)
            asyncio.run(burst(port, name, 4))  # warm-up: first requests pay one-time costs on both servers
            return asyncio.run(burst(port, name, max_tokens))
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="checkpoint folder [default: the shipped demo model]")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", help="belle-vl serve's device (cuda on a GPU) [default: its own choice]")
    parser.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--kv-cache-bytes", type=int, default=1 << 30, help="vLLM's KV cache (CPU build)")
    args = parser.parse_args()
    if args.model is None:
        from belle_vl_tools.demo import default_model_path

        args.model = str(default_model_path())
    logs = Path(tempfile.mkdtemp(prefix="bench-vllm-"))  # the two servers' logs

    port = free_port()
    belle = [sys.executable, "-m", "belle_vl_tools.cli", "serve", "--model", args.model, "--port", str(port)]
    belle += ["--dtype", args.dtype, "--max-batch-size", "16", "--served-model-name", "bench"]
    belle += ["--device", args.device] if args.device else []
    ours = run_server(belle, port, "bench", args.max_tokens, logs / "belle-vl-serve.log")

    port = free_port()
    vllm = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model, "--port", str(port)]
    vllm += ["--dtype", args.dtype, "--served-model-name", "bench", "--max-num-seqs", "16"]
    vllm += ["--kv-cache-memory-bytes", str(args.kv_cache_bytes)]
    theirs = run_server(vllm, port, "bench", args.max_tokens, logs / "vllm.log")

    print(f"model {args.model} ({args.dtype}), 16 concurrent streamed requests, {args.max_tokens} new tokens at most")
    for label, (wall, tokens, ttfts) in (("belle-vl serve", ours), ("vLLM + plugin", theirs)):
        print(f"{label:15s} {tokens} tokens in {wall:.2f} s = {tokens / wall:.1f} tokens/s")
        print(f"{'':15s} time to first token (s): " + " ".join(f"{t:.2f}" for t in ttfts))
    print(f"server logs: {logs}")
    print(f"throughput vLLM / belle-vl serve: {(theirs[1] / theirs[0]) / (ours[1] / ours[0]):.2f}")


if __name__ == "__main__":
    main()
