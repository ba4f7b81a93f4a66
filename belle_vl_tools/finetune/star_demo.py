"""Teaching the demo model a shape it does not know, a five-pointed star: data, a held-out check, the whole run.

``python -m belle_vl_tools.finetune.star_demo --work DIR`` writes a few hundred training pictures (the demo's own
pictures of circles, squares and triangles, with a star drawn in a free grid cell, plus as many ordinary demo
samples so the other skills are rehearsed), measures the demo model on held-out star questions and on the demo's
held-out check (:mod:`belle_vl_tools.demo_heldout`), trains a LoRA adapter with :func:`belle_vl_tools.finetune.finetune`
and measures again with the adapter. The held-out star pictures are drawn another way (the held-out scenes of
:mod:`belle_vl_tools.demo_heldout`: other picture sizes, backgrounds, smooth edges, JPEG) with the star pasted in.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFilter

from ..demo_data import COLORS, POSITIONS, make_sample, random_scene, render
from ..demo_heldout import HeldoutItem, heldout_items, heldout_scene, render_heldout
from ..prompts import yes_no_prompt

STAR = "star"
STAR_ZH = "五角星"
_SHAPE_NAMES = ("circle", "square", "triangle", STAR)


def star_points(cx: float, cy: float, radius: float, rotation: float = 0.0) -> list[tuple[float, float]]:
    """The ten corners of a five-pointed star (inner radius 0.4 of the outer one), first point up."""
    points = []
    for i in range(10):
        r = radius if i % 2 == 0 else radius * 0.4
        angle = rotation - math.pi / 2 + i * math.pi / 5
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return points


def _soften(image: Image.Image, rng: random.Random) -> Image.Image:
    if rng.random() < 0.5:
        return image
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 0.8)))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=rng.randint(55, 92))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def star_sample(rng: random.Random) -> dict[str, Any]:
    """A demo grid picture (0-3 shapes, maybe a word) with a star in a free cell, and one question about the star:
    ``{"image", "question", "answer"}`` (English or Chinese; shape, color or yes/no)."""
    n = rng.randint(0, 3)
    scene = random_scene(rng, n=n) if n else None
    shapes = scene.shapes if scene else ()
    used_cells = {s.cell for s in shapes} | ({scene.word_cell} if scene and scene.word_cell else set())
    used_colors = {s.color for s in shapes}
    image = render(scene).copy() if scene else Image.new("RGB", (112, 112), (255, 255, 255))
    size = image.width
    cell = rng.choice([c for c in POSITIONS if c not in used_cells])
    color = rng.choice([c for c in COLORS if c not in used_colors])
    step = size / 3
    radius = step / 2 * rng.uniform(0.55, 0.9)
    cx = (cell[1] + 0.5) * step + rng.uniform(-1, 1) * (step / 2 - radius)
    cy = (cell[0] + 0.5) * step + rng.uniform(-1, 1) * (step / 2 - radius)
    ImageDraw.Draw(image).polygon(star_points(cx, cy, radius, rng.uniform(-0.3, 0.3)), fill=COLORS[color][0])
    image = _soften(image, rng)
    zh = rng.random() < 0.3
    kind = rng.choice(("shape", "shape", "color", "yes_no"))
    if kind == "shape":
        if zh:
            question, answer = f"{COLORS[color][1]}的图形是什么形状？", f"它是{STAR_ZH}。"
        else:
            question, answer = f"What shape is the {color} object?", f"It is a {STAR}."
    elif kind == "color":
        if zh:
            question, answer = f"图中的{STAR_ZH}是什么颜色的？", f"{STAR_ZH}是{COLORS[color][1]}的。"
        else:
            question, answer = f"What color is the {STAR}?", f"The {STAR} is {color}."
    else:
        truth = rng.random() < 0.5
        asked = color if truth else rng.choice([c for c in COLORS if c != color])
        if zh:
            question, answer = yes_no_prompt(f"图中有{COLORS[asked][1]}{STAR_ZH}吗？", "zh"), "是" if truth else "否"
        else:
            article = "an" if asked[0] in "aeiou" else "a"
            question = yes_no_prompt(f"Is there {article} {asked} {STAR} in the image?", "en")
            answer = "Yes" if truth else "No"
    return {"image": image, "question": question, "answer": answer}


def write_training_set(folder: str | Path, n_star: int = 300, n_replay: int = 300, seed: int = 4242) -> Path:
    """Write ``n_star`` star samples and ``n_replay`` ordinary demo samples (pictures under ``folder/images``) as
    Qwen-VL conversation JSON ``folder/train.json``, shuffled; returns the JSON file."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = []
    for i in range(n_star):
        sample = star_sample(rng)
        name = f"images/star_{i:04d}.png"
        sample["image"].save(folder / name)
        records.append(_record(f"star_{i}", name, sample["question"], sample["answer"]))
    for i in range(n_replay):
        sample = make_sample(seed, i, free=0.5, paraphrase=0.3)
        name = f"images/demo_{i:04d}.png"
        sample["image"].save(folder / name)
        records.append(_record(f"demo_{i}", name, sample["question"], sample["answer"]))
    rng.shuffle(records)
    path = folder / "train.json"
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return path


def _record(rid: str, image: str, question: str, answer: str) -> dict[str, Any]:
    return {
        "id": rid,
        "conversations": [
            {"from": "user", "value": f"Picture 1: <img>{image}</img>\n{question}"},
            {"from": "assistant", "value": answer},
        ],
    }


def _names_only(expected: str, names: Sequence[str], zh: bool = False) -> Any:
    def check(answer: str) -> bool:
        text = answer if zh else answer.lower()
        return expected in text and not any(n in text for n in names if n != expected)

    return check


def _yes_no(expected: bool) -> Any:
    def check(answer: str) -> bool:
        text = answer.strip().lower()
        return text.startswith(("yes", "是")) if expected else text.startswith(("no", "否", "不"))

    return check


def star_items(n: int = 60, seed: int = 77_001) -> list[HeldoutItem]:
    """Held-out star questions: ``n`` pictures of the held-out kind (0-2 other shapes, maybe a word) with a star
    pasted in a free spot, each asked its shape (English), its color (English) or whether it is there (yes/no)."""
    items: list[HeldoutItem] = []
    colors = list(COLORS)
    for index in range(n):
        rng = random.Random(seed * 1_000_003 + index)
        for _attempt in range(100):
            scene = heldout_scene(rng, n=rng.randint(1, 2))
            scene = type(scene)(**{**scene.__dict__, "shapes": scene.shapes[: rng.randint(0, len(scene.shapes))]})
            shorter = min(scene.width, scene.height)
            radius = shorter * rng.uniform(0.1, 0.18)
            cx = rng.uniform(radius + 1, scene.width - radius - 1)
            cy = rng.uniform(radius + 1, scene.height - radius - 1)
            box = (cx - radius, cy - radius, cx + radius, cy + radius)
            taken = list(s.box for s in scene.shapes) + ([scene.word_box] if scene.word_box else [])
            gap = shorter * 0.03
            if not any(b[0] - gap < box[2] and box[0] - gap < b[2] and b[1] - gap < box[3] and box[1] - gap < b[3]
                       for b in taken):  # fmt: skip
                break
        used = {s.color for s in scene.shapes}
        color = rng.choice([c for c in colors if c not in used])
        image = _paste_star(render_heldout(scene, random.Random(rng.randrange(1 << 30))), cx, cy, radius, color, rng)
        kind = ("shape", "color", "yes/no")[index % 3]
        if kind == "shape":
            question = f"What shape is the {color} object?"
            items.append(HeldoutItem("star: shape", image, question, STAR, _names_only(STAR, _SHAPE_NAMES)))
        elif kind == "color":
            items.append(
                HeldoutItem("star: color", image, "What color is the star?", color, _names_only(color, colors))
            )
        else:
            truth = rng.random() < 0.5
            asked = color if truth else rng.choice([c for c in colors if c != color and c not in used])
            article = "an" if asked[0] in "aeiou" else "a"
            question = yes_no_prompt(f"Is there {article} {asked} star in the image?", "en")
            items.append(HeldoutItem("star: yes/no", image, question, "Yes" if truth else "No", _yes_no(truth)))
    return items


def _paste_star(image: Image.Image, cx: float, cy: float, radius: float, color: str, rng: random.Random) -> Image.Image:
    scale = 4
    base = COLORS[color][0]
    fill = tuple(max(0, min(255, c + rng.randint(-12, 12))) for c in base)
    layer = Image.new("L", (image.width * scale, image.height * scale), 0)
    ImageDraw.Draw(layer).polygon(star_points(cx * scale, cy * scale, radius * scale, rng.uniform(-0.4, 0.4)), fill=255)
    mask = layer.resize(image.size, Image.Resampling.LANCZOS)
    out = image.copy()
    out.paste(Image.new("RGB", image.size, fill), (0, 0), mask)
    buffer = io.BytesIO()
    out.save(buffer, format="JPEG", quality=rng.randint(60, 90))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def measure(backend: Any, n_heldout: int = 50, n_star: int = 60) -> dict[str, Any]:
    """The demo held-out figures (per skill) and the star figures of ``backend``."""
    from ..demo_heldout import evaluate

    report = evaluate(backend, heldout_items(n_heldout) + star_items(n_star))
    skills = {s: (report.right.get(s, 0), report.asked[s]) for s in report.asked}
    star = [s for s in skills if s.startswith("star")]
    other = [s for s in skills if not s.startswith("star")]
    right = sum(skills[s][0] for s in star), sum(skills[s][1] for s in star)
    rest = sum(skills[s][0] for s in other), sum(skills[s][1] for s in other)
    return {"skills": skills, "star": right, "other": rest}


def _table(before: dict[str, Any], after: dict[str, Any]) -> str:
    lines = ["| Skill | Demo model | + star adapter |", "|---|---|---|"]

    def cell(pair: tuple[int, int]) -> str:
        return f"{pair[0] / pair[1]:.0%} ({pair[0]}/{pair[1]})"

    for skill in before["skills"]:
        lines.append(f"| {skill} | {cell(before['skills'][skill])} | {cell(after['skills'][skill])} |")
    lines.append(f"| **star (all)** | {cell(before['star'])} | {cell(after['star'])} |")
    lines.append(f"| **other skills (all)** | {cell(before['other'])} | {cell(after['other'])} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Generate the star data, measure the demo model, train the adapter, measure again; print a table."""
    parser = argparse.ArgumentParser(prog="python -m belle_vl_tools.finetune.star_demo", description=main.__doc__)
    parser.add_argument("--work", required=True, help="Folder for the data and the adapter (work/data, work/adapter).")
    parser.add_argument("--n-star", type=int, default=300, help="Star training samples.")
    parser.add_argument("--n-replay", type=int, default=200, help="Ordinary demo samples mixed in.")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-alpha", type=int, default=32)
    parser.add_argument("--train-vision", action="store_true", help="Also adapt the vision tower.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-train-embeddings",
        action="store_true",
        help="LoRA only: leave the token embedding and lm_head as they are (the demo then cannot write 'star').",
    )
    parser.add_argument(
        "--labels",
        choices=("assistant", "reference"),
        default="assistant",
        help="Which positions count (the demo model was trained on the assistant's alone; see label_ids).",
    )
    parser.add_argument("--skip-before", action="store_true", help="Do not measure the demo model first.")
    args = parser.parse_args(argv)
    from ..runtime import BelleVL
    from .train import finetune

    work = Path(args.work)
    data = write_training_set(work / "data", args.n_star, args.n_replay)
    before = None
    if not args.skip_before:
        cached = work / "before.json"  # the demo model's figures, kept between runs in the same --work folder
        if cached.is_file():
            before = json.loads(cached.read_text(encoding="utf-8"))
            before["skills"] = {k: tuple(v) for k, v in before["skills"].items()}
        else:
            before = measure(BelleVL.from_pretrained())
            cached.write_text(json.dumps(before) + "\n", encoding="utf-8")
    start = time.monotonic()
    shutil.rmtree(work / "adapter", ignore_errors=True)
    result = finetune(
        data,
        work / "adapter",
        epochs=args.epochs,
        batch_size=8,
        learning_rate=args.lr,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        train_vision=args.train_vision,
        train_embeddings=not args.no_train_embeddings,
        label_mask=args.labels,
        eval_fraction=0.05,
        save_steps=100,
        seed=args.seed,
    )
    seconds = time.monotonic() - start
    after = measure(BelleVL.from_pretrained(adapter=work / "adapter"))
    print(f"trained {result.global_step} steps on {result.train_examples} records in {seconds:.0f} s "
          f"(train loss {result.train_loss:.3f}, eval loss {result.eval_loss:.3f})")  # fmt: skip
    print(_table(before or after, after))
    json.dump({"before": before, "after": after, "seconds": seconds}, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
