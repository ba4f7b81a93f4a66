"""Hand-run measurement: what the server's pixel budget keeps its memory at, under the attack it answers.

    python benchmarks/pixel_budget.py [--side 6320] [--requests 4] [--pictures 8]

It is not a test. A server with a scripted backend (no model) and the default budgets is sent ``--requests``
requests at once, each with ``--pictures`` PNGs of ``--side`` x ``--side`` pixels of one colour (39.9 MP each by
default, under the 40 MP limit per picture: a few hundred kilobytes that decode to 120 MB of RGB). It prints the
statuses, the server's peak resident growth, and the same for requests that fill the budgets exactly (two pictures
each, so that the whole server budget is decoded), with the growth per million pixels held.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from belle_vl_tools.backend import Usage  # noqa: E402
from belle_vl_tools.server import background_server, create_app  # noqa: E402
from belle_vl_tools.testing import ScriptedBackend  # noqa: E402


def rss() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


class Peak:
    def __enter__(self) -> Peak:
        self.base = self.peak = rss()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self) -> None:
        while not self.stop.wait(0.01):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()


class Forgetful(ScriptedBackend):
    """Answers "ok" and keeps no messages (so the pictures are freed with their request)."""

    def chat(self, messages: Any, **generation: Any) -> Any:
        result = super().chat(messages, **generation)
        self.calls.clear()
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=6320)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--pictures", type=int, default=8)
    args = parser.parse_args()
    buffer = io.BytesIO()
    Image.new("RGB", (args.side, args.side), (200, 40, 40)).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    pixels = args.side * args.side

    def body(count: int) -> dict[str, Any]:
        parts = [{"type": "image_url", "image_url": {"url": url}} for _ in range(count)]
        return {"model": "scripted", "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "?"}]}]}

    app = create_app(Forgetful("ok", usage=Usage(5, 2)), max_request_bytes=64 << 20, max_batch_size=8)
    with background_server(app) as base, httpx.Client(base_url=base, timeout=300) as client:
        client.get("/health")
        for label, count in ((f"{args.pictures} pictures", args.pictures), ("2 pictures (the request budget)", 2)):
            with Peak() as peak, concurrent.futures.ThreadPoolExecutor(args.requests) as pool:
                payload = body(count)
                codes = list(
                    pool.map(lambda _, p=payload: client.post("/v1/chat/completions", json=p), range(args.requests))
                )
            statuses = [c.status_code for c in codes]
            held = sum(count * pixels for c in codes if c.status_code == 200)
            growth = (peak.peak - peak.base) / 2**20
            per_mp = f", {growth / (held / 1e6):.1f} MB per MP answered" if held else ""
            print(
                f"{args.requests} requests x {label} of {pixels / 1e6:.1f} MP: statuses {statuses}, "
                f"peak RSS growth {growth:,.0f} MB{per_mp}"
            )


if __name__ == "__main__":
    main()
