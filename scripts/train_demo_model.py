"""Train the tiny Belle-VL-architecture demo model on synthetic pictures (CPU).

Steps: build the demo vocabulary (a subset of the Qwen vocabulary covering the demo corpus), write an untrained
checkpoint in the published layout with ``write_tiny_checkpoint``, load it exactly as a real checkpoint is loaded
(``QWenLMHeadModel.from_pretrained`` + ``QWenVLProcessor.from_pretrained``), train it with AdamW (linear warm-up,
cosine decay, gradient clipping) on samples of :mod:`belle_vl_tools.demo_data`, save it with ``save_pretrained``
in the published layout, reload it and score greedy answers on held-out samples through ``BelleVL``.

    python scripts/train_demo_model.py --out demo-model --steps 3000 --batch-size 16
    python scripts/train_demo_model.py --out demo-model --eval-only
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from belle_vl_tools import BelleVL
from belle_vl_tools.demo_data import DEFAULT_SIZE, build_demo_vocab, corpus_texts, make_sample
from belle_vl_tools.grounding import parse_boxes
from belle_vl_tools.modeling_qwen_vl import QWenLMHeadModel
from belle_vl_tools.processing_qwen_vl import QWenVLProcessor
from belle_vl_tools.testing import count_ranks, write_tiny_checkpoint

#: Held-out samples come from this stream (training uses --seed), so they never coincide with training ones.
EVAL_SEED_OFFSET = 7919
#: The published files whose form save_pretrained would change; they are written back after saving.
PUBLISHED_JSON = ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("demo-model"), help="checkpoint folder to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, the data stream and the batch order")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.05, help="final learning rate / peak")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping")
    p.add_argument(
        "--vision-proj-scale",
        type=float,
        default=0.01,
        help="scale of the untrained visual.proj: image features start near the word embeddings' size",
    )
    p.add_argument("--vision-lr-mult", type=float, default=3.0, help="learning rate of the vision tower / the LM's")
    p.add_argument(
        "--samples", type=int, default=0, help="size of the training pool (0: steps x batch size, no repeats)"
    )
    p.add_argument("--eval-samples", type=int, default=120, help="held-out samples scored at the end")
    p.add_argument("--eval-every", type=int, default=0, help="also score this many steps (0: only at the end)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--eval-only", action="store_true", help="score the checkpoint in --out, no training")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--save-dtype", choices=("float32", "bfloat16"), default="bfloat16")
    # sizes
    p.add_argument("--hidden", type=int, default=256, help="hidden size (a multiple of 128)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=1024, help="MLP size (Qwen's: twice the gate width)")
    p.add_argument("--vision-width", type=int, default=128)
    p.add_argument("--vision-layers", type=int, default=3)
    p.add_argument("--vision-heads", type=int, default=4)
    p.add_argument("--image-size", type=int, default=DEFAULT_SIZE, help="picture and vision-tower input size")
    return p.parse_args(argv)


# --- checkpoint ------------------------------------------------------------------------------------------------------
def build_untrained(args: argparse.Namespace) -> dict[str, Any]:
    """Vocabulary subset + untrained checkpoint in ``args.out``; returns the vocabulary report."""
    if args.hidden % 128:
        raise SystemExit("--hidden must be a multiple of 128 (as in the published models)")
    if args.image_size % 14:
        raise SystemExit("--image-size must be a multiple of the 14-pixel patch")
    n_pool = args.samples or args.steps * args.batch_size
    texts = list(corpus_texts())
    for i in range(n_pool):  # the training pool itself, so every training text is covered
        sample = make_sample(args.seed, i, size=args.image_size, with_image=False)
        texts += ["\n" + sample["question"], sample["answer"]]
    with tempfile.TemporaryDirectory() as tmp:
        vocab = build_demo_vocab(Path(tmp) / "qwen.tiktoken", texts)
        write_tiny_checkpoint(
            args.out,
            seed=args.seed,
            vocab_file=vocab["path"],
            hidden_size=args.hidden,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            kv_channels=args.hidden // args.heads,
            intermediate_size=args.intermediate,
            visual={
                "image_size": args.image_size,
                "width": args.vision_width,
                "layers": args.vision_layers,
                "heads": args.vision_heads,
            },
        )
    return vocab


def weights_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def save(model: QWenLMHeadModel, processor: QWenVLProcessor, out: Path, dtype: str) -> None:
    """save_pretrained in the published layout: one model.safetensors under the reference names, and the
    published config.json, generation_config.json, tokenizer_config.json and special_tokens_map.json
    (save_pretrained writes its own forms of these)."""
    published = {name: (out / name).read_text() for name in PUBLISHED_JSON}
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    state_dtype = getattr(torch, dtype)
    model.to(state_dtype).save_pretrained(out, safe_serialization=True, max_shard_size="1GB")
    model.to(torch.float32)
    processor.save_pretrained(out)
    for name, text in published.items():
        (out / name).write_text(text)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    if saved != names:
        raise RuntimeError(f"saved weight names differ from the published layout: {sorted(saved ^ names)[:5]}")


# --- batches ---------------------------------------------------------------------------------------------------------
def make_batch(processor: QWenVLProcessor, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    inputs = processor.apply_chat_template(
        [s["messages"] for s in samples],
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        return_assistant_tokens_mask=True,
    )
    mask = inputs.pop("assistant_masks")
    labels = torch.where(mask.bool(), inputs["input_ids"], torch.full_like(inputs["input_ids"], -100))
    return {
        "input_ids": inputs["input_ids"],
        "attention_mask": inputs["attention_mask"],
        "pixel_values": inputs["pixel_values"],
        "labels": labels,
    }


def lr_at(step: int, args: argparse.Namespace) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# --- scoring ---------------------------------------------------------------------------------------------------------
def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().rstrip(".。").lower())


def score(sample: dict[str, Any], answer: str) -> bool:
    """Whether a greedy answer is right: exact (up to case, spacing and a final period) for every kind but
    locate, where the box must overlap the drawn shape with IoU >= 0.5 and the label must match."""
    if sample["kind"] != "locate":
        return _norm(answer) == _norm(sample["answer"])
    want = parse_boxes(sample["answer"])
    got = parse_boxes(answer)
    if len(got) != 1 or got[0].label != want[0].label:
        return False
    a, b = got[0].grid, want[0].grid
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return union > 0 and inter / union >= 0.5


def evaluate(model: QWenLMHeadModel, processor: QWenVLProcessor, args: argparse.Namespace, show: int = 6) -> dict:
    runtime = BelleVL(model, processor)
    hits: dict[str, list[bool]] = defaultdict(list)
    model.eval()
    for i in range(args.eval_samples):
        sample = make_sample(args.seed + EVAL_SEED_OFFSET, i, size=args.image_size)
        result = runtime.chat(sample["messages"][:1], do_sample=False, max_new_tokens=args.max_new_tokens)
        ok = score(sample, result.text)
        hits[sample["kind"]].append(ok)
        hits[f"lang:{sample['language']}"].append(ok)
        if i < show:
            print(f"  [{sample['kind']}] {sample['question']!r} -> {result.text!r} (want {sample['answer']!r})")
    runtime.clear_caches()
    all_hits = [h for k, v in hits.items() if not k.startswith("lang:") for h in v]
    report = {k: round(sum(v) / len(v), 3) for k, v in sorted(hits.items())}
    report["overall"] = round(sum(all_hits) / max(1, len(all_hits)), 3)
    return report


# --- main ------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    out: Path = args.out

    if not args.eval_only:
        t0 = time.time()
        vocab = build_untrained(args)
        ranks = count_ranks(out / "qwen.tiktoken")
        config = json.loads((out / "config.json").read_text())
        print(
            f"vocabulary: {ranks} ranks ({vocab['used_tokens']} used by the corpus), "
            f"vocab_size {config['vocab_size']}; "
            f"untrained checkpoint {weights_size(out) / 1e6:.2f} MB float32 ({time.time() - t0:.1f}s)"
        )
    model = QWenLMHeadModel.from_pretrained(out, dtype=torch.float32)
    processor = QWenVLProcessor.from_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params / 1e6:.2f} M ({n_params * 2e-6:.1f} MB bfloat16, {n_params * 4e-6:.1f} MB float32)")

    if not args.eval_only:
        train(model, processor, args)
        save(model, processor, out, args.save_dtype)
        print(f"saved {out} ({weights_size(out) / 1e6:.2f} MB of safetensors, {args.save_dtype})")
        # score what was saved, loaded as any checkpoint is
        model = QWenLMHeadModel.from_pretrained(out)
        processor = QWenVLProcessor.from_pretrained(out)

    t0 = time.time()
    report = evaluate(model, processor, args)
    print(f"held-out accuracy ({args.eval_samples} samples, {time.time() - t0:.0f}s): {json.dumps(report)}")
    return 0


def train(model: QWenLMHeadModel, processor: QWenVLProcessor, args: argparse.Namespace) -> None:
    n_pool = args.samples or args.steps * args.batch_size
    order = list(range(n_pool))
    rng = random.Random(args.seed)
    rng.shuffle(order)
    # Freshly initialised image features are ~400x larger than word embeddings and the vision tower then learns
    # too slowly to tell colours apart (a 300-step colour-only run: 2/36 right); starting the features small and
    # giving the tower a larger learning rate reached 15/36 in the same run.
    with torch.no_grad():
        model.transformer.visual.proj.mul_(args.vision_proj_scale)
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            decays = param.ndim >= 2 and "embed" not in name and "wte" not in name
            groups.setdefault((decays, "visual" in name), []).append(param)
    optimizer = torch.optim.AdamW(
        [
            {
                "params": params,
                "weight_decay": args.weight_decay if decays else 0.0,
                "lr_mult": args.vision_lr_mult if visual else 1.0,
            }
            for (decays, visual), params in groups.items()
        ],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    model.train()
    cursor = 0
    t_start = time.time()
    smoothed = None
    for step in range(args.steps):
        if cursor + args.batch_size > len(order):
            rng.shuffle(order)
            cursor = 0
        indexes = order[cursor : cursor + args.batch_size]
        cursor += args.batch_size
        batch = make_batch(processor, [make_sample(args.seed, i, size=args.image_size) for i in indexes])
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args) * group["lr_mult"]
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        value = loss.item()
        smoothed = value if smoothed is None else 0.9 * smoothed + 0.1 * value
        if step % args.log_every == 0 or step == args.steps - 1:
            elapsed = time.time() - t_start
            print(
                f"step {step:5d} loss {value:.4f} (avg {smoothed:.4f}) grad {grad_norm:.2f} "
                f"lr {lr_at(step, args):.2e} {elapsed / (step + 1):.2f}s/step",
                flush=True,
            )
        if args.eval_every and step and step % args.eval_every == 0:
            report = evaluate(model, processor, args, show=0)
            print(f"step {step} held-out: {json.dumps(report)}", flush=True)
            model.train()


if __name__ == "__main__":
    sys.exit(main())
