"""A held-out check of the demo model: pictures drawn by a different hand than its training pictures.

The training pictures (:mod:`belle_vl_tools.demo_data`) are white squares at the model's input size, with shapes
on a 3 x 3 grid and words in Pillow's built-in font at one size. The pictures here keep the demo's world (its six
colors, three shapes and three-letter words) but are drawn independently: several picture sizes and aspect ratios
(the processor resizes them to the model's input, as it does any picture), off-white and light-colored
backgrounds with a little noise, shapes of 8-35% of the shorter side placed anywhere (not overlapping) with
smooth edges and slightly varied colors, words in the TrueType fonts installed (DejaVu, Liberation; Pillow's
own font drawn bold when none is) at several sizes and places, and JPEG compression.

Each picture gets one question per skill it can answer, asked as the tools and the training data ask them:

=============  ==========================================================================================
color          "What color is the <kind>?" (a kind drawn once)
shape          "What shape is the <color> object?" (a color drawn once)
count          "How many shapes are there in the image?"
position       "Where is the <color> <kind>?": the 3 x 3 region of the shape's center
read-word      the read-text prompt, on pictures with a word
yes/no         "Is there a <color> <kind> in the image?" (half of them absent), MME style
Chinese        the color, shape or count question in Chinese
=============  ==========================================================================================

:func:`evaluate` asks a backend (greedy, short answers) and returns the accuracy per skill; ``python -m
belle_vl_tools.demo_heldout --n 50`` prints the figures for the shipped demo model. Only PIL, numpy and the
standard library are used to draw; the backend is whatever is passed in.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import math
import os
import random
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from .demo_data import COLORS, POSITIONS, SHAPES, WORDS
from .prompts import read_text_prompt, yes_no_prompt

__all__ = [
    "SKILLS",
    "HeldoutItem",
    "HeldoutReport",
    "HeldoutScene",
    "evaluate",
    "heldout_items",
    "heldout_scene",
    "main",
    "render_heldout",
]

#: The skills checked, in report order.
SKILLS: tuple[str, ...] = ("color", "shape", "count", "position", "read-word", "yes/no", "Chinese")

#: Picture sizes (width, height): square, landscape and portrait, smaller and larger than the model's 112.
SIZES: tuple[tuple[int, int], ...] = ((112, 112), (160, 120), (120, 160), (200, 150), (96, 128), (256, 192), (144, 144))
#: Off-white and light-colored backgrounds.
BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (250, 248, 240), (245, 245, 245), (255, 253, 245), (238, 242, 250), (250, 238, 238), (238, 248, 238),
    (248, 244, 230), (235, 235, 240),
)  # fmt: skip
#: Ink colors of words: black and near-black.
INKS: tuple[tuple[int, int, int], ...] = ((0, 0, 0), (30, 30, 30), (20, 20, 60), (50, 40, 40))
#: TrueType fonts tried for words (the first few found are used), by file name.
FONT_FILES: tuple[str, ...] = (
    "DejaVuSans-Bold.ttf", "DejaVuSans.ttf", "LiberationSans-Bold.ttf", "LiberationSans-Regular.ttf",
    "DejaVuSerif-Bold.ttf", "LiberationSerif-Bold.ttf", "DejaVuSansMono-Bold.ttf", "LiberationMono-Bold.ttf",
)  # fmt: skip
_FONT_DIRS = (
    "/usr/share/fonts",
    "/usr/local/share/fonts",
    "/Library/Fonts",
    "/System/Library/Fonts",
    "C:/Windows/Fonts",
)


@dataclass(frozen=True)
class HeldoutShape:
    kind: str  # circle, square, triangle
    color: str  # a key of COLORS
    center: tuple[float, float]  # in pixels
    size: float  # side (square, triangle) or diameter (circle), in pixels

    @property
    def box(self) -> tuple[float, float, float, float]:
        x, y = self.center
        half = self.size / 2
        return x - half, y - half, x + half, y + half


@dataclass(frozen=True)
class HeldoutScene:
    width: int
    height: int
    background: tuple[int, int, int]
    shapes: tuple[HeldoutShape, ...]
    word: str | None = None
    word_box: tuple[float, float, float, float] | None = None
    font: str = ""  # the font file's name (or "pillow" for Pillow's own font)
    word_size: int = 0
    ink: tuple[int, int, int] = (0, 0, 0)
    jpeg_quality: int = 85
    seed: int = 0

    def region(self, shape: HeldoutShape) -> tuple[int, int]:
        """The (row, column) of the 3 x 3 region holding the shape's center."""
        x, y = shape.center
        return min(2, int(3 * y / self.height)), min(2, int(3 * x / self.width))

    def near_a_region_border(self, shape: HeldoutShape, margin: float = 0.04) -> bool:
        """Whether the shape's center lies within ``margin`` (of the picture's side) of a region border, where
        its region is a matter of a pixel or two."""
        x, y = shape.center[0] / self.width, shape.center[1] / self.height
        return any(abs(v - b) < margin for v in (x, y) for b in (1 / 3, 2 / 3))


# --- drawing -------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def available_fonts() -> tuple[str, ...]:
    """The paths of the fonts of :data:`FONT_FILES` installed here (searched once)."""
    found: dict[str, str] = {}
    for root_dir in _FONT_DIRS:
        if not os.path.isdir(root_dir):
            continue
        for root, _dirs, files in os.walk(root_dir):
            for name in files:
                if name in FONT_FILES and name not in found:
                    found[name] = os.path.join(root, name)
    return tuple(found[name] for name in FONT_FILES if name in found)


@functools.lru_cache(maxsize=64)
def _font(path: str, size: int) -> Any:
    if path == "pillow":
        try:
            return ImageFont.load_default(size=size)
        except (TypeError, OSError, ImportError):  # pragma: no cover - Pillow without FreeType
            return ImageFont.load_default()
    return ImageFont.truetype(path, size)


def _overlaps(a: tuple[float, ...], b: tuple[float, ...], gap: float) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def heldout_scene(rng: random.Random, *, word: bool | None = None, n: int | None = None) -> HeldoutScene:
    """A random held-out scene: a picture size, a light background, ``n`` (default 1-4) shapes with distinct
    (color, kind) pairs placed anywhere without overlapping, and a word (probability 0.6) in a free spot."""
    width, height = rng.choice(SIZES)
    shorter = min(width, height)
    n = n if n is not None else rng.randint(1, 4)
    pairs = rng.sample([(c, k) for c in COLORS for k in SHAPES], n)
    boxes: list[tuple[float, float, float, float]] = []
    shapes: list[HeldoutShape] = []
    gap = shorter * 0.03
    for color, kind in pairs:
        for _attempt in range(200):
            size = shorter * rng.uniform(0.08, 0.35)
            margin = size / 2 + 1
            center = (rng.uniform(margin, width - margin), rng.uniform(margin, height - margin))
            shape = HeldoutShape(kind, color, center, size)
            if not any(_overlaps(shape.box, other, gap) for other in boxes):
                shapes.append(shape)
                boxes.append(shape.box)
                break
    fonts = available_fonts() or ("pillow",)
    font = rng.choice(fonts)
    background = rng.choice(BACKGROUNDS)
    quality = rng.randint(55, 92)
    has_word = rng.random() < 0.6 if word is None else word
    scene = HeldoutScene(width, height, background, tuple(shapes), font=os.path.basename(font), jpeg_quality=quality)
    if not has_word:
        return scene
    text = rng.choice(WORDS)
    for _attempt in range(200):
        word_size = max(9, round(shorter * rng.uniform(0.11, 0.2)))
        left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox(
            (0, 0), text, font=_font(font, word_size)
        )
        w, h = right - left, bottom - top
        if w + 4 >= width or h + 4 >= height:
            continue
        x, y = rng.uniform(2, width - w - 2), rng.uniform(2, height - h - 2)
        box = (x, y, x + w, y + h)
        if not any(_overlaps(box, other, gap) for other in boxes):
            ink = rng.choice(INKS)
            return HeldoutScene(
                width, height, background, tuple(shapes), text, box, os.path.basename(font), word_size, ink, quality
            )
    return scene


def render_heldout(scene: HeldoutScene, rng: random.Random | None = None) -> Image.Image:
    """The picture of ``scene``: drawn at four times the size and scaled down (smooth edges), the colors varied a
    little, a little noise on the background, then JPEG-compressed at the scene's quality and decoded again."""
    rng = rng or random.Random(scene.seed)
    scale = 4
    big = Image.new("RGB", (scene.width * scale, scene.height * scale), scene.background)
    draw = ImageDraw.Draw(big)
    for shape in scene.shapes:
        base = COLORS[shape.color][0]
        fill = tuple(max(0, min(255, c + rng.randint(-12, 12))) for c in base)
        x1, y1, x2, y2 = (v * scale for v in shape.box)
        if shape.kind == "circle":
            draw.ellipse((x1, y1, x2, y2), fill=fill)
        elif shape.kind == "square":
            draw.rectangle((x1, y1, x2, y2), fill=fill)
        else:
            draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=fill)
    if scene.word is not None and scene.word_box is not None:
        path = next((p for p in available_fonts() if os.path.basename(p) == scene.font), "pillow")
        font = _font(path, scene.word_size * scale)
        left, top, _r, _b = draw.textbbox((0, 0), scene.word, font=font)
        stroke = scale if path == "pillow" else 0  # Pillow's own font drawn bold: not the training's look
        x, y = scene.word_box[0] * scale - left, scene.word_box[1] * scale - top
        draw.text((x, y), scene.word, fill=scene.ink, font=font, stroke_width=stroke, stroke_fill=scene.ink)
    image = big.resize((scene.width, scene.height), Image.Resampling.LANCZOS).filter(ImageFilter.SMOOTH)
    pixels = np.asarray(image, dtype=np.int16)
    noise = np.random.default_rng(rng.randrange(1 << 30)).integers(-4, 5, size=pixels.shape)
    image = Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8), "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=scene.jpeg_quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


# --- questions and checks ------------------------------------------------------------------------------------------
_EN_NUMBERS = {w: i for i, w in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight"))}
_ZH_NUMBERS = {"零": 0, "一": 1, "两": 2, "二": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8}


def _mentions(answer: str, names: Sequence[str]) -> set[str]:
    lowered = answer.lower()
    return {name for name in names if re.search(rf"\b{re.escape(name.lower())}\b", lowered)}


def _only(expected: str, names: Sequence[str]) -> Callable[[str], bool]:
    """Right when the answer names ``expected`` and none of the other ``names``."""
    return lambda answer: _mentions(answer, names) == {expected}


def _only_zh(expected: str, names: Sequence[str]) -> Callable[[str], bool]:
    return lambda answer: {name for name in names if name in answer} == {expected}


def _count_check(n: int, language: str) -> Callable[[str], bool]:
    def check(answer: str) -> bool:
        if language == "zh":
            found = [_ZH_NUMBERS[c] for c in answer if c in _ZH_NUMBERS] + [int(d) for d in re.findall(r"\d", answer)]
        else:
            words = re.findall(r"[a-z]+|\d+", answer.lower())
            found = [_EN_NUMBERS[w] if w in _EN_NUMBERS else int(w) for w in words if w in _EN_NUMBERS or w.isdigit()]
        return bool(found) and found[0] == n

    return check


def _position_check(cell: tuple[int, int]) -> Callable[[str], bool]:
    phrases = {phrase: c for c, (phrase, _zh) in POSITIONS.items()}

    def check(answer: str) -> bool:
        lowered = answer.lower()
        hits = [p for p in phrases if p in lowered]
        if not hits:
            return False
        longest = max(hits, key=len)  # "at the top left" over "at the top"
        return phrases[longest] == cell

    return check


def _yes_no_check(expected: bool) -> Callable[[str], bool]:
    def check(answer: str) -> bool:
        head = answer.strip().lower()
        said = True if head.startswith("yes") else False if head.startswith("no") else None
        return said is expected

    return check


def _word_check(word: str) -> Callable[[str], bool]:
    return lambda answer: re.search(rf"\b{word}\b", answer.upper()) is not None


@dataclass
class HeldoutItem:
    """One question about one held-out picture, with the check of its answer."""

    skill: str
    image: Image.Image
    question: str
    expected: str
    check: Callable[[str], bool] = field(repr=False)


def _items_for(scene: HeldoutScene, image: Image.Image, rng: random.Random) -> list[HeldoutItem]:
    items: list[HeldoutItem] = []
    shapes = scene.shapes
    unique_kinds = [s for s in shapes if sum(o.kind == s.kind for o in shapes) == 1]
    unique_colors = [s for s in shapes if sum(o.color == s.color for o in shapes) == 1]
    colors, kinds = list(COLORS), list(SHAPES)
    if unique_kinds:
        s = rng.choice(unique_kinds)
        items.append(HeldoutItem("color", image, f"What color is the {s.kind}?", s.color, _only(s.color, colors)))
    if unique_colors:
        s = rng.choice(unique_colors)
        question = f"What shape is the {s.color} object?"
        items.append(HeldoutItem("shape", image, question, s.kind, _only(s.kind, kinds)))
    items.append(
        HeldoutItem(
            "count",
            image,
            "How many shapes are there in the image?",
            str(len(shapes)),
            _count_check(len(shapes), "en"),
        )
    )
    clear = [s for s in shapes if not scene.near_a_region_border(s)]
    if clear:
        s = rng.choice(clear)
        cell = scene.region(s)
        question = f"Where is the {s.color} {s.kind}?"
        items.append(HeldoutItem("position", image, question, POSITIONS[cell][0], _position_check(cell)))
    if scene.word is not None:
        items.append(HeldoutItem("read-word", image, read_text_prompt("en"), scene.word, _word_check(scene.word)))
    present = {(s.color, s.kind) for s in shapes}
    answer = rng.random() < 0.5
    color, kind = rng.choice(sorted(present if answer else {(c, k) for c in colors for k in kinds} - present))
    article = "an" if color[0] in "aeiou" else "a"
    question = yes_no_prompt(f"Is there {article} {color} {kind} in the image?", "en")
    items.append(HeldoutItem("yes/no", image, question, "Yes" if answer else "No", _yes_no_check(answer)))
    zh_colors = [COLORS[c][1] for c in colors]
    zh_kinds = [SHAPES[k] for k in kinds]
    choices = ["count"] + (["color"] if unique_kinds else []) + (["shape"] if unique_colors else [])
    which = rng.choice(choices)
    if which == "color":
        s = rng.choice(unique_kinds)
        expected = COLORS[s.color][1]
        question = f"图中的{SHAPES[s.kind]}是什么颜色的？"
        items.append(HeldoutItem("Chinese", image, question, expected, _only_zh(expected, zh_colors)))
    elif which == "shape":
        s = rng.choice(unique_colors)
        expected = SHAPES[s.kind]
        question = f"{COLORS[s.color][1]}的图形是什么形状？"
        items.append(HeldoutItem("Chinese", image, question, expected, _only_zh(expected, zh_kinds)))
    else:
        items.append(
            HeldoutItem("Chinese", image, "图中有几个图形？", str(len(shapes)), _count_check(len(shapes), "zh"))
        )
    return items


def heldout_items(n: int = 50, seed: int = 90_001) -> list[HeldoutItem]:
    """The questions about ``n`` held-out pictures of the stream ``seed`` (the same on every run), about one per
    skill each picture can answer (read-word only on pictures with a word)."""
    items: list[HeldoutItem] = []
    for index in range(n):
        rng = random.Random(seed * 1_000_003 + index)
        scene = heldout_scene(rng)
        scene = HeldoutScene(**{**scene.__dict__, "seed": rng.randrange(1 << 30)})
        items.extend(_items_for(scene, render_heldout(scene), rng))
    return items


# --- scoring -------------------------------------------------------------------------------------------------------
@dataclass
class HeldoutReport:
    """Right answers per skill (``right[skill]`` of ``asked[skill]``), and the wrong answers for reading."""

    right: dict[str, int] = field(default_factory=dict)
    asked: dict[str, int] = field(default_factory=dict)
    wrong: list[tuple[str, str, str, str]] = field(default_factory=list)  # skill, question, expected, answer

    def accuracy(self, skill: str | None = None) -> float:
        """The share of right answers of one skill, or of all questions (``None``)."""
        if skill is None:
            asked = sum(self.asked.values())
            return sum(self.right.values()) / asked if asked else math.nan
        return self.right.get(skill, 0) / self.asked[skill] if self.asked.get(skill) else math.nan

    def as_dict(self) -> dict[str, Any]:
        skills = {s: {"right": self.right.get(s, 0), "asked": self.asked[s]} for s in SKILLS if s in self.asked}
        return {"overall": self.accuracy(), "skills": skills}

    def table(self) -> str:
        """A Markdown table: skill, right / asked, accuracy, then the overall figure."""
        lines = ["| Skill | Right | Accuracy |", "|---|---|---|"]
        for skill in SKILLS:
            if skill in self.asked:
                lines.append(
                    f"| {skill} | {self.right.get(skill, 0)} / {self.asked[skill]} | {self.accuracy(skill):.0%} |"
                )
        total = sum(self.asked.values())
        lines.append(f"| **overall** | {sum(self.right.values())} / {total} | **{self.accuracy():.0%}** |")
        return "\n".join(lines)


def evaluate(
    backend: Any, items: Sequence[HeldoutItem] | None = None, *, batch_size: int = 16, **generation: Any
) -> HeldoutReport:
    """Ask ``backend`` (anything with ``chat``, and ``generate_batch`` for speed) every question of ``items``
    (default :func:`heldout_items`), greedily with short answers unless ``generation`` says otherwise, and count
    the right answers per skill."""
    from .captions import run_batch

    items = heldout_items() if items is None else items
    generation = {"temperature": 0, "max_new_tokens": 32, **generation}
    report = HeldoutReport()
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        conversations = [
            [
                {
                    "role": "user",
                    "content": [{"type": "image", "image": item.image}, {"type": "text", "text": item.question}],
                }
            ]
            for item in chunk
        ]
        answers = run_batch(backend, conversations, generation)
        for item, answer in zip(chunk, answers, strict=True):
            report.asked[item.skill] = report.asked.get(item.skill, 0) + 1
            if item.check(answer):
                report.right[item.skill] = report.right.get(item.skill, 0) + 1
            else:
                report.wrong.append((item.skill, item.question, item.expected, answer))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m belle_vl_tools.demo_heldout --n 50``: the held-out figures of a checkpoint (default: the demo)."""
    parser = argparse.ArgumentParser(prog="python -m belle_vl_tools.demo_heldout", description=main.__doc__)
    parser.add_argument("--n", type=int, default=50, help="Held-out pictures (about 6 questions each).")
    parser.add_argument("--seed", type=int, default=90_001, help="The picture stream.")
    parser.add_argument("--model", default=None, help="Checkpoint folder. [default: the shipped demo model]")
    parser.add_argument("--device", default=None, help="cpu, cuda, ...")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, ... [default: as BelleVL.from_pretrained]")
    parser.add_argument("--quantize", default=None, choices=("int8",), help="int8: the LM's linear weights as int8")
    parser.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    parser.add_argument("--show-wrong", type=int, default=0, help="Also print this many wrong answers.")
    args = parser.parse_args(argv)
    from .runtime import BelleVL

    backend = BelleVL.from_pretrained(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize)
    report = evaluate(backend, heldout_items(args.n, args.seed))
    if args.json:
        print(json.dumps(report.as_dict()))
    else:
        print(report.table())
    for skill, question, expected, answer in report.wrong[: args.show_wrong]:
        print(f"[{skill}] {question!r}: expected {expected!r}, answered {answer!r}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
