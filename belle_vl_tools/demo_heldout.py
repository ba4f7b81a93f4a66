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
from .messages import TextPart, parse_message
from .prompts import read_text_prompt, yes_no_prompt

__all__ = [
    "AGENT_SKILLS",
    "SKILLS",
    "AgentItem",
    "agent_items",
    "evaluate_agent",
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
    #: The skills the table lists, in order (:data:`SKILLS`, or :data:`AGENT_SKILLS` for :func:`evaluate_agent`).
    skills: tuple[str, ...] = SKILLS

    def accuracy(self, skill: str | None = None) -> float:
        """The share of right answers of one skill, or of all questions (``None``)."""
        if skill is None:
            asked = sum(self.asked.values())
            return sum(self.right.values()) / asked if asked else math.nan
        return self.right.get(skill, 0) / self.asked[skill] if self.asked.get(skill) else math.nan

    def as_dict(self) -> dict[str, Any]:
        skills = {s: {"right": self.right.get(s, 0), "asked": self.asked[s]} for s in self.skills if s in self.asked}
        return {"overall": self.accuracy(), "skills": skills}

    def table(self) -> str:
        """A Markdown table: skill, right / asked, accuracy, then the overall figure."""
        lines = ["| Skill | Right | Accuracy |", "|---|---|---|"]
        for skill in self.skills:
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
    parser.add_argument(
        "--agent",
        type=int,
        default=0,
        help="Also check the agent skills (AGENT_SKILLS) on this many more pictures (about 9 questions each).",
    )
    args = parser.parse_args(argv)
    from .runtime import BelleVL

    backend = BelleVL.from_pretrained(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize)
    reports = [evaluate(backend, heldout_items(args.n, args.seed))] if args.n else []
    if args.agent:
        reports.append(evaluate_agent(backend, agent_items(args.agent)))
    for report in reports:
        print(json.dumps(report.as_dict()) if args.json else report.table())
        for skill, question, expected, answer in report.wrong[: args.show_wrong]:
            print(f"[{skill}] {question!r}: expected {expected!r}, answered {answer!r}", file=sys.stderr)
    return 0


# --- agent skills --------------------------------------------------------------------------------------------------
#: The agent skills :func:`agent_items` checks, in report order: boxes (IoU >= 0.5 with the drawn shape), no box
#: and a refusal for a shape that is not drawn, a question before its picture, a question about one of two
#: pictures, brief and detailed descriptions (every shape by color and kind, the word, and for the detailed one each
#: shape's place), JSON under a ``{"color", "shape", "count"}`` schema and a ``json_object`` whose keys the question
#: names, and in Qwen's ReAct format with the vision tools offered: the right tool call, then the right final answer.
AGENT_SKILLS: tuple[str, ...] = (
    "locate", "absent", "text-first", "two-picture", "description", "detailed", "schema", "json-object",
    "tool choice", "tool answer",
)  # fmt: skip

_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"color": {"type": "string"}, "shape": {"type": "string"}, "count": {"type": "integer"}},
    "required": ["color", "shape", "count"],
}


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _box_check(scene: HeldoutScene, shape: HeldoutShape) -> Callable[[str], bool]:
    from .grounding import parse_boxes

    def check(answer: str) -> bool:
        boxes = parse_boxes(answer, scene.width, scene.height)
        if len(boxes) != 1:
            return False
        box = boxes[0]
        return _iou((box.x1, box.y1, box.x2, box.y2), shape.box) >= 0.5

    return check


def _refusal_check(answer: str) -> bool:
    from .grounding import parse_boxes

    said_no = re.search(r"\b(no|not|none|nothing)\b", answer.lower()) is not None or "没有" in answer
    return said_no and not parse_boxes(answer)


def _description_check(scene: HeldoutScene, positions: bool) -> Callable[[str], bool]:
    """Right when the answer names exactly the drawn (color, kind) pairs, the word if there is one, and (with
    ``positions``) the region of each shape whose center is not near a region border, right after its name."""
    pairs = {(s.color, s.kind) for s in scene.shapes}
    phrases = {phrase: cell for cell, (phrase, _zh) in POSITIONS.items()}

    def check(answer: str) -> bool:
        lowered = answer.lower()
        named = {(c, k) for c in COLORS for k in SHAPES if re.search(rf"\b{c} {k}s?\b", lowered)}
        if named != pairs:
            return False
        if scene.word is not None and not _word_check(scene.word)(answer):
            return False
        if not positions:
            return True
        for shape in scene.shapes:
            if scene.near_a_region_border(shape):
                continue
            match = re.search(rf"\b{shape.color} {shape.kind}\b(.*?)(?:,|;| and |\.|$)", lowered)
            hits = [p for p in phrases if match and p in match.group(1)]
            if not hits or phrases[max(hits, key=len)] != scene.region(shape):
                return False
        return True

    return check


def _json_check(expected: dict[str, Any]) -> Callable[[str], bool]:
    def check(answer: str) -> bool:
        try:
            value = json.loads(answer)
        except ValueError:
            return False
        if not isinstance(value, dict) or set(value) != set(expected):
            return False
        return all(str(value[k]).strip().lower() == str(v).lower() for k, v in expected.items())

    return check


@dataclass
class AgentItem(HeldoutItem):
    """An agent-skill question: ``content`` is the user message's parts in order (pictures and text),
    ``response_format`` constrains the answer, ``tool`` (the tool expected and a check of its arguments) makes it
    a ReAct question about ``image_1`` with the vision tools offered."""

    content: list[dict[str, Any]] = field(default_factory=list)
    response_format: Any = None
    max_new_tokens: int = 32
    tool: tuple[str, Callable[[dict[str, Any]], bool]] | None = field(default=None, repr=False)


def _question_for(scene: HeldoutScene, rng: random.Random) -> tuple[str, str, Callable[[str], bool]]:
    """A color, shape or count question about ``scene``: (question, expected, check)."""
    shapes = scene.shapes
    unique_kinds = [s for s in shapes if sum(o.kind == s.kind for o in shapes) == 1]
    unique_colors = [s for s in shapes if sum(o.color == s.color for o in shapes) == 1]
    which = rng.choice(["count"] + (["color"] * 2 if unique_kinds else []) + (["shape"] if unique_colors else []))
    if which == "color":
        s = rng.choice(unique_kinds)
        return f"What color is the {s.kind}?", s.color, _only(s.color, list(COLORS))
    if which == "shape":
        s = rng.choice(unique_colors)
        return f"What shape is the {s.color} object?", s.kind, _only(s.kind, list(SHAPES))
    return "How many shapes are there in the image?", str(len(shapes)), _count_check(len(shapes), "en")


def _picture(rng: random.Random, n: int | None = None, word: bool | None = None) -> tuple[HeldoutScene, Any]:
    scene = heldout_scene(rng, n=n, word=word)
    scene = HeldoutScene(**{**scene.__dict__, "seed": rng.randrange(1 << 30)})
    return scene, render_heldout(scene)


def _agent_items_for(index: int, rng: random.Random) -> list[AgentItem]:
    from .prompts import locate_prompt

    items: list[AgentItem] = []

    def add(skill: str, content: list[dict[str, Any]], expected: str, check: Callable[[str], bool], **kw: Any):
        asked = parse_message({"role": "user", "content": content})
        image = asked.images[0]  # every item shows a picture
        question = " ".join(part.text for part in asked.parts if isinstance(part, TextPart))
        items.append(AgentItem(skill, image, question, expected, check, content=content, **kw))

    scene, image = _picture(rng, n=rng.randint(1, 3))
    picture = {"type": "image", "image": image}
    shape = rng.choice(scene.shapes)
    phrase = f"the {shape.color} {shape.kind}"
    text = {"type": "text", "text": locate_prompt(phrase, "en")}
    add("locate", [picture, text], f"{phrase}: {tuple(round(v) for v in shape.box)}", _box_check(scene, shape))
    present = {(s.color, s.kind) for s in scene.shapes}
    color, kind = rng.choice(sorted({(c, k) for c in COLORS for k in SHAPES} - present))
    text = {"type": "text", "text": locate_prompt(f"the {color} {kind}", "en")}
    add("absent", [picture, text], "no box, says it is not there", _refusal_check)
    question, expected, check = _question_for(scene, rng)
    add("text-first", [{"type": "text", "text": question}, picture], expected, check)
    other, other_image = _picture(rng)
    target = rng.randint(1, 2)
    pictures = [picture, {"type": "image", "image": other_image}]
    if target == 2:
        pictures.reverse()
    question, expected, check = _question_for(scene, rng)
    question = f"In Picture {target}, {question[0].lower()}{question[1:]}"
    add("two-picture", [*pictures, {"type": "text", "text": question}], expected, check)
    del other
    described = ", ".join(f"{s.color} {s.kind}" for s in scene.shapes) + (f', "{scene.word}"' if scene.word else "")
    question = rng.choice(("What is in this image?", "Describe the picture.", "What do you see?"))
    add(
        "description",
        [picture, {"type": "text", "text": question}],
        described,
        _description_check(scene, False),
        max_new_tokens=96,
    )
    question = rng.choice(("Describe the picture in detail.", "Describe this image in detail."))
    add(
        "detailed",
        [picture, {"type": "text", "text": question}],
        described,
        _description_check(scene, True),
        max_new_tokens=128,
    )
    if index % 2 == 0:
        one, one_image = _picture(rng, n=1)
        expected_json = {"color": one.shapes[0].color, "shape": one.shapes[0].kind, "count": 1}
        question = "Give the color and the shape of the object and the number of shapes."
        add(
            "schema",
            [{"type": "image", "image": one_image}, {"type": "text", "text": question}],
            json.dumps(expected_json),
            _json_check(expected_json),
            response_format=_SCHEMA,
            max_new_tokens=48,
        )
    else:
        unique = [s for s in scene.shapes if sum(o.kind == s.kind for o in scene.shapes) == 1]
        if unique:
            s = rng.choice(unique)
            keys = rng.sample(["color", "shape", "count"], rng.randint(1, 3))
            values = {"color": s.color, "shape": s.kind, "count": len(scene.shapes)}
            expected_json = {k: values[k] for k in keys}
            listed = " and ".join(f'"{k}"' for k in keys)
            question = f"Return a JSON object with the keys {listed} for the {s.kind}."
            add(
                "json-object",
                [picture, {"type": "text", "text": question}],
                json.dumps(expected_json),
                _json_check(expected_json),
                response_format={"type": "json_object"},
                max_new_tokens=48,
            )
    items.extend(_tool_items(scene, image, rng))
    return items


def _tool_items(scene: HeldoutScene, image: Any, rng: random.Random) -> list[AgentItem]:
    """A ReAct question about ``image_1`` (``scene``): which tool, whether its arguments make sense, and the final
    answer's check."""
    what = rng.choice(
        ("color", "count", "describe", "locate", "read") if scene.word else ("color", "count", "describe", "locate")
    )
    unique_kinds = [s for s in scene.shapes if sum(o.kind == s.kind for o in scene.shapes) == 1]
    tool: tuple[str, Callable[[dict[str, Any]], bool]]  # the tool expected and a check of its arguments
    if what == "color" and unique_kinds:
        s = rng.choice(unique_kinds)
        noun = "shape" if len(scene.shapes) == 1 else s.kind
        question = f"What color is the {noun} in image_1?"
        tool = ("visual_qa", lambda a: a.get("image") == "image_1" and "color" in str(a.get("question", "")).lower())
        check, expected = _only(s.color, list(COLORS)), s.color
    elif what == "describe":
        question = "Describe image_1."
        tool = ("describe_image", lambda a: a.get("image") == "image_1")
        check, expected = _description_check(scene, False), "every shape"
    elif what == "locate":
        s = rng.choice(scene.shapes)
        question = f"Find the {s.color} {s.kind} in image_1 and give its bounding box."

        def located(a: dict[str, Any], s: Any = s) -> bool:
            return a.get("image") == "image_1" and f"{s.color} {s.kind}" in str(a.get("description", ""))

        tool = ("locate_objects", located)
        check, expected = (lambda answer: "[" in answer), "a box"
    elif what == "read":
        question = "What does the text in image_1 say?"
        tool = ("read_text", lambda a: a.get("image") == "image_1")
        check, expected = _word_check(scene.word or ""), scene.word or ""
    else:
        question = "How many shapes are there in image_1?"
        tool = ("visual_qa", lambda a: a.get("image") == "image_1" and bool(str(a.get("question", "")).strip()))
        check, expected = _count_check(len(scene.shapes), "en"), str(len(scene.shapes))
    content = [{"type": "text", "text": question}]
    return [AgentItem("tool choice", image, question, expected, check, content=content, max_new_tokens=160, tool=tool)]


def agent_items(n: int = 30, seed: int = 91_003) -> list[AgentItem]:
    """The agent-skill questions about ``n`` held-out pictures of the stream ``seed`` (the same on every run): one
    per skill of :data:`AGENT_SKILLS` for each picture (schema and json-object on alternate pictures)."""
    items: list[AgentItem] = []
    for index in range(n):
        items.extend(_agent_items_for(index, random.Random(seed * 1_000_003 + index)))
    return items


def _count(report: HeldoutReport, skill: str, ok: bool, item: HeldoutItem, answer: str) -> None:
    report.asked[skill] = report.asked.get(skill, 0) + 1
    if ok:
        report.right[skill] = report.right.get(skill, 0) + 1
    else:
        report.wrong.append((skill, item.question, item.expected, answer))


def _run_tool_item(backend: Any, item: AgentItem, report: HeldoutReport) -> None:
    """Two agent turns as an agent framework runs them: the model's call, the tool run for real on the picture,
    the model's final answer from the observation."""
    from .react import ToolSession
    from .tools import TOOL_NAMES, ImageStore, make_tools

    store = ImageStore()
    store.add(item.image, "image_1")
    tools = make_tools(backend, store=store)
    session = ToolSession.create([tools[name].spec() for name in TOOL_NAMES])
    messages: list[dict[str, Any]] = [{"role": "user", "content": item.question}]
    generation = {"temperature": 0, "max_new_tokens": item.max_new_tokens}
    request = session.prepare(messages, generation)
    reply = session.parse(backend.chat(request.messages, **request.generation).text)
    name, argument_check = item.tool  # type: ignore[misc]
    call = reply.tool_calls[0] if reply.tool_calls else None
    chose = call is not None and call.name == name and argument_check(dict(call.arguments))
    said = f"{call.name}({json.dumps(call.arguments)})" if call else (reply.content or "(invalid call)")
    _count(report, "tool choice", chose, item, said)
    if call is None or call.name not in tools:
        _count(report, "tool answer", False, item, said)
        return
    result = tools[call.name].run(**call.arguments)
    messages += [
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": result.text, "tool_call_id": call.id, "name": call.name},
    ]
    request = session.prepare(messages, generation)
    final = session.parse(backend.chat(request.messages, **request.generation).text)
    _count(report, "tool answer", not final.has_calls and item.check(final.content), item, final.content)


def evaluate_agent(backend: Any, items: Sequence[AgentItem] | None = None) -> HeldoutReport:
    """Ask ``backend`` every question of ``items`` (default :func:`agent_items`), greedily, and count the right
    answers per skill of :data:`AGENT_SKILLS` (the report's table lists them)."""
    items = agent_items() if items is None else items
    report = HeldoutReport(skills=AGENT_SKILLS)
    for item in items:
        if item.tool is not None:
            _run_tool_item(backend, item, report)
            continue
        generation: dict[str, Any] = {"temperature": 0, "max_new_tokens": item.max_new_tokens}
        if item.response_format is not None:
            generation["response_format"] = item.response_format
        answer = backend.chat([{"role": "user", "content": item.content}], **generation).text
        _count(report, item.skill, item.check(answer), item, answer)
    return report


if __name__ == "__main__":
    raise SystemExit(main())
