"""Hand-run benchmark: the per-token cost of constrained decoding next to the decoding step it constrains.

    python benchmarks/constrained.py [--tokens 64] [--hidden 512] [--layers 4]

It is not a test. For each model it decodes greedily, token by token (one forward with the KV cache, then the
grammar's row processor on that step's logits, then argmax), timing the forward and the processor separately in
the same loop, and prints their medians and the ratio. Models: the shipped demo model (its own 1,024-wide
vocabulary) and a random checkpoint with the full Qwen vocabulary (151,936 logits, the width a real Belle-VL
checkpoint masks) and a small decoder (``--hidden``, ``--layers``). Grammars: a JSON schema and a forced ReAct
tool call. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from belle_vl_tools import BelleVL  # noqa: E402
from belle_vl_tools.constrained import Grammar, RowProcessor  # noqa: E402
from belle_vl_tools.testing import write_tiny_checkpoint  # noqa: E402


class Reading(BaseModel):
    city: str
    degrees: int
    sky: Literal["sunny", "cloudy", "rainy"]
    notes: list[str]


WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def decode(vl: BelleVL, grammar: Grammar, tokens: int) -> tuple[float, float, int]:
    """Median seconds of a forward step and of the processor call, and the number of steps."""
    item = vl.prepare([{"role": "user", "content": "Report the weather in Paris."}], None)
    ids = torch.tensor([item.input_ids])
    processor = RowProcessor(grammar, vl.tokenizer, vocab_size=vl.model.config.vocab_size, max_new_tokens=tokens)
    forward_times: list[float] = []
    grammar_times: list[float] = []
    generated: list[int] = []
    with torch.inference_mode():
        out = vl.model(input_ids=ids, use_cache=True)
        past, logits = out.past_key_values, out.logits[0, -1]
        for _ in range(tokens):
            start = time.perf_counter()
            logits = processor(generated, logits)
            grammar_times.append(time.perf_counter() - start)
            token = int(logits.argmax())
            generated.append(token)
            if token in vl.stop_ids:
                break
            start = time.perf_counter()
            out = vl.model(input_ids=torch.tensor([[token]]), past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[0, -1]
            forward_times.append(time.perf_counter() - start)
    return statistics.median(forward_times), statistics.median(grammar_times), len(generated)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args(argv)
    grammars = {"json_schema": Grammar.json_schema(Reading), "tool_call": Grammar.tool_call([("weather", WEATHER)])}
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tiny_checkpoint(
            Path(tmp) / "random", seed=0, hidden_size=args.hidden, num_hidden_layers=args.layers, visual=False
        )
        models: dict[str, Any] = {"demo model": BelleVL.from_pretrained(), "random, full vocab": None}
        models["random, full vocab"] = BelleVL.from_pretrained(folder)
        print(f"{'model':<20} {'grammar':<12} {'steps':>5} {'forward ms':>11} {'grammar ms':>11} {'overhead':>9}")
        for name, vl in models.items():
            for kind, grammar in grammars.items():
                decode(vl, grammar, 8)  # warm-up: compile the grammar, build the tokenizer info
                forward, constrained, steps = decode(vl, grammar, args.tokens)
                print(
                    f"{name:<20} {kind:<12} {steps:>5} {forward * 1e3:>11.2f} {constrained * 1e3:>11.3f} "
                    f"{constrained / forward:>8.1%}"
                )


if __name__ == "__main__":
    main()
