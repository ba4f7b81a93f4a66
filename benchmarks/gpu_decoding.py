"""Hand-run benchmark: batch-1 decoding against the GPU's memory bandwidth, and batch-32 throughput.

    python benchmarks/gpu_decoding.py                 # full-size random Belle-VL, bf16, on cuda
    python benchmarks/gpu_decoding.py --size smoke --device cpu   # the same code path in seconds, anywhere

It is not a test. On a random Belle-VL of the published size (language model hidden 5120 x 40 layers, MLP 27392,
vocabulary 152,064; the 448 px vision tower, 48 layers of width 1664; bf16, ~32 GB), built directly on the device
(no checkpoint is written: only a tiny folder for the real tokenizer and the processor), it measures in one run:

1. the device's copy bandwidth (a 4 GiB buffer copied; read + written bytes over time);
2. a decoding step of ``BelleVL.chat`` at batch 1 about a picture (greedy; the time of a 144-token answer less that
   of a 16-token one, over 128), eager and with ``compile=True`` (static cache, CUDA graphs);
3. the bytes a step must read (the decoder's weights: every layer, the final norm and the output head; the
   embedding table is read one row at a time), so the share of the bandwidth limit a step reaches;
4. the throughput of ``generate_batch`` on 32 conversations about the same picture (32 x 128 tokens over the same
   difference of two lengths), over the single stream's tokens per second.

Targets (issue: decoding at the memory-bandwidth limit): batch 1 at >= 70% of the bandwidth limit, batch 32 at
>= 15x the single stream.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from belle_vl_tools import BelleVL  # noqa: E402
from belle_vl_tools.configuration_qwen_vl import QWenConfig  # noqa: E402
from belle_vl_tools.modeling_qwen_vl import QWenLMHeadModel  # noqa: E402
from belle_vl_tools.processing_qwen_vl import QWenVLProcessor  # noqa: E402
from belle_vl_tools.testing import BELLE_VL_CONFIG, write_tiny_checkpoint  # noqa: E402

#: A few-second stand-in with the same code path.
SMOKE_LM: dict[str, Any] = {
    "hidden_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "kv_channels": 128,
    "intermediate_size": 512,
    "seq_length": 2048,
}
SMOKE_VISUAL: dict[str, Any] = {"width": 64, "layers": 2, "heads": 4, "mlp_ratio": 4.9231, "output_dim": 256}
TARGETS = {"bandwidth_share": 0.70, "batch_speedup": 15.0}
QUESTIONS = [
    "What is in the picture?",
    "Which colors do you see?",
    "Is there a circle, and where is it?",
    "Describe the picture in one sentence.",
    "How many shapes are there?",
    "Is there any text in the picture?",
    "What is at the top left?",
    "Which shape is the largest?",
]


def picture() -> Image.Image:
    image = Image.new("RGB", (448, 448), (250, 248, 240))
    draw = ImageDraw.Draw(image)
    draw.ellipse((40, 60, 200, 220), fill=(220, 30, 30))
    draw.rectangle((250, 240, 400, 390), fill=(30, 80, 220))
    draw.polygon([(320, 30), (420, 190), (220, 190)], fill=(40, 170, 60))
    return image


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def copy_bandwidth(device: torch.device, gib: float, repeats: int = 10) -> float:
    """Bytes per second of a device-to-device copy, counting each byte read and written."""
    n = int(gib * 2**30)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = min(timed(lambda: dst.copy_(src), device) for _ in range(repeats))
    return 2 * n / seconds


def step_bytes(model: QWenLMHeadModel) -> int:
    """Bytes a decoding step reads from the weights: the layers, the final norm and the output head."""
    parts = [model.transformer.h, model.transformer.ln_f, model.lm_head]
    return sum(p.numel() * p.element_size() for part in parts for p in part.parameters())


def build(size: str, device: torch.device, dtype: torch.dtype, folder: Path) -> tuple[QWenLMHeadModel, Any]:
    """A random model of ``size`` on ``device`` and the processor of a tiny folder with the real vocabulary."""
    if size == "full":
        lm = {key: value for key, value in BELLE_VL_CONFIG.items() if key != "visual"}
        visual = BELLE_VL_CONFIG["visual"]
    else:
        lm, visual = SMOKE_LM, SMOKE_VISUAL
    tiny = write_tiny_checkpoint(folder / "processor", visual={"image_size": 448, "patch_size": 14})
    processor = QWenVLProcessor.from_pretrained(tiny)
    config = QWenConfig.from_pretrained(tiny)
    for key, value in lm.items():
        setattr(config, key, value)
    config.visual = {**config.visual, **visual}
    with torch.device(device):
        model = QWenLMHeadModel._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval(), processor


def conversation(image: Image.Image, question: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


def step_time(run: Callable[[int], Any], device: torch.device, short: int, long: int, repeats: int) -> float:
    """Seconds per decoding step: (time of ``long`` tokens - time of ``short``) / (long - short), medians."""
    run(short)
    run(long)  # warm-up (and compilation)
    shorts, longs = [], []
    for _ in range(repeats):
        shorts.append(timed(lambda: run(short), device))
        longs.append(timed(lambda: run(long), device))
    return (statistics.median(longs) - statistics.median(shorts)) / (long - short)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("full", "smoke"), default="full")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--short", type=int, default=16, help="tokens of the short answer")
    parser.add_argument("--long", type=int, default=144, help="tokens of the long answer")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--copy-gib", type=float, default=4.0, help="size of the bandwidth probe's buffer")
    parser.add_argument("--no-compile", action="store_true", help="skip the compile=True rows")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("No CUDA device here: run with --size smoke --device cpu, or on a GPU machine.")

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        model, processor = build(args.size, device, dtype, Path(tmp))
        built = time.perf_counter() - started
    bandwidth = copy_bandwidth(device, args.copy_gib if device.type == "cuda" else min(args.copy_gib, 0.25))
    nbytes = step_bytes(model)
    image = picture()
    greedy = {"do_sample": False}
    rows: list[tuple[str, int, float]] = []  # mode, batch size, seconds per step

    modes = [("eager", False)] + ([] if args.no_compile else [("compile=True", True)])
    single: dict[str, float] = {}
    for name, compile_ in modes:
        runtime = BelleVL(model, processor, model_name="belle-vl-random", compile=compile_)
        one = conversation(image, QUESTIONS[0])

        def answer(n: int, runtime: BelleVL = runtime, one: list = one) -> Any:
            return runtime.chat(one, max_new_tokens=n, min_new_tokens=n, **greedy)

        step = step_time(answer, device, args.short, args.long, args.repeats)
        single[name] = step
        rows.append((name, 1, step))

        batch = [conversation(image, QUESTIONS[i % len(QUESTIONS)]) for i in range(args.batch)]

        def answer_batch(n: int, runtime: BelleVL = runtime, batch: list = batch) -> Any:
            return runtime.generate_batch(batch, max_new_tokens=n, min_new_tokens=n, **greedy)

        batch_step = step_time(answer_batch, device, args.short, args.long, args.repeats)
        rows.append((name, args.batch, batch_step))

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    params = sum(p.numel() for p in model.parameters())
    print(
        f"{device_name}, torch {torch.__version__}; random Belle-VL ({args.size}): {params / 1e9:.2f} B parameters "
        f"in {args.dtype}, built in {built:.0f} s"
    )
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; a decoding step reads {nbytes / 1e9:.2f} GB of weights")
    limit = bandwidth / nbytes
    print(f"bandwidth limit at batch 1: {limit:.1f} tokens/s ({1e3 / limit:.2f} ms a step)\n")
    print(f"{'':28} {'ms/step':>9} {'tokens/s':>10} {'of the limit':>13} {'x single':>9}")
    for mode, rows_in_batch, step in rows:
        share = f"{nbytes / step / bandwidth:.0%}" if rows_in_batch == 1 else ""
        speedup = rows_in_batch * single[mode] / step
        label = f"batch {rows_in_batch}, {mode}"
        print(f"{label:28} {step * 1e3:9.2f} {rows_in_batch / step:10.1f} {share:>13} {speedup:9.1f}")
    best = nbytes / min(single.values()) / bandwidth
    print(
        f"\nbatch 1 at {best:.0%} of the bandwidth limit (target >= {TARGETS['bandwidth_share']:.0%}); batch "
        f"{args.batch} target >= {TARGETS['batch_speedup']:.0f}x the single stream"
    )


if __name__ == "__main__":
    main()
