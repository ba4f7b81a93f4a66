"""Synthetic pictures with questions and answers, for training and checking the tiny demo model.

Every picture is a white square with one to four flat shapes (circle, square, triangle) in distinct cells of a
3 x 3 grid, each in its own color and size, and sometimes a short printed word in a free cell. Because the scene
is known exactly, every answer is exact: the color of a shape, its kind, the number of shapes, where a shape is,
the printed word, and the box of a shape on the 0-1000 grid of :mod:`belle_vl_tools.grounding`.

Pictures are drawn at ``DEFAULT_SIZE`` (112) pixels: the demo model's vision tower reads 112 x 112 inputs with
14-pixel patches (an 8 x 8 patch grid), the smallest size at which a three-letter word is still legible
(capitals about 12 pixels tall, a word about as wide as a grid cell) while the vision tower stays cheap to train
on a CPU. The picture size equals the model's input size, so the processor's resize leaves the pixels as drawn.

Opt-in variety for a more robust model (both off by default, so the shipped model's stream is unchanged):
``free`` draws a share of the pictures in a free layout (shapes of 8-35% of the picture anywhere, several picture
sizes and aspect ratios resized to the model's input, light backgrounds, words in several fonts and sizes, JPEG;
positions are the 3 x 3 regions of the shapes' centers), and ``paraphrase`` asks a share of the short questions in
other words (:data:`PARAPHRASES`, English and Chinese). Its fonts differ from those of the independent held-out
check (:mod:`belle_vl_tools.demo_heldout`).

The prompts are exactly those of :mod:`belle_vl_tools.prompts` (describe, read-text, locate, yes/no), so the
model learns the wording the tools send. Everything is seeded: ``generate_samples(n, seed)`` returns the same
pictures and texts on every run. Only PIL, numpy and the standard library are used here (no torch).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from belle_vl_tools.grounding import format_box, to_grid
from belle_vl_tools.prompts import (
    LANGUAGES,
    PROMPT_TEMPLATES,
    describe_prompt,
    locate_prompt,
    read_text_prompt,
    yes_no_prompt,
)

__all__ = [
    "COLORS",
    "DEFAULT_SIZE",
    "make_conversation",
    "KINDS",
    "MME_SUBTASKS",
    "ONE_SHAPE_PARAPHRASES",
    "PARAPHRASES",
    "YES_NO_SUBTASKS",
    "POSITIONS",
    "SHAPES",
    "WORDS",
    "Scene",
    "build_demo_vocab",
    "Shape",
    "corpus_texts",
    "generate_mme_set",
    "generate_samples",
    "make_sample",
    "paraphrase_texts",
    "random_scene",
    "render",
    "sample_texts",
    "shape_mask",
]

DEFAULT_SIZE = 112
BACKGROUND = (255, 255, 255)
TEXT_COLOR = (0, 0, 0)

#: name -> (RGB, Chinese name). Hues far apart, none black or white (the text and background colors).
COLORS: dict[str, tuple[tuple[int, int, int], str]] = {
    "red": ((220, 30, 30), "红色"),
    "green": ((30, 160, 50), "绿色"),
    "blue": ((30, 70, 220), "蓝色"),
    "yellow": ((245, 210, 0), "黄色"),
    "purple": ((140, 40, 170), "紫色"),
    "orange": ((250, 130, 0), "橙色"),
}
#: name -> Chinese name.
SHAPES: dict[str, str] = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}
#: grid cell (row, column) -> (English phrase, Chinese phrase) for where a shape is.
POSITIONS: dict[tuple[int, int], tuple[str, str]] = {
    (0, 0): ("at the top left", "左上方"),
    (0, 1): ("at the top", "上方"),
    (0, 2): ("at the top right", "右上方"),
    (1, 0): ("on the left", "左侧"),
    (1, 1): ("in the center", "中间"),
    (1, 2): ("on the right", "右侧"),
    (2, 0): ("at the bottom left", "左下方"),
    (2, 1): ("at the bottom", "下方"),
    (2, 2): ("at the bottom right", "右下方"),
}
#: Printed words: three upper-case letters, so a word fits in one grid cell at the demo's picture size.
WORDS: tuple[str, ...] = (
    "CAT", "DOG", "SUN", "SKY", "BUS", "MAP", "PEN", "BOX", "CUP", "KEY", "HAT", "EGG",
    "BED", "CAR", "TOY", "JAM", "OWL", "FOX", "ICE", "INK", "LOG", "NET", "TEA", "ZOO",
)  # fmt: skip
#: Sample kinds, in the order of the default mix.
KINDS: tuple[str, ...] = (
    "color", "shape", "count", "position", "describe_brief", "describe_detailed", "read_text", "locate", "yes_no",
)  # fmt: skip
#: Relative frequency of each kind in :func:`generate_samples` (short answers are the bulk of the demo's skills).
KIND_WEIGHTS: dict[str, float] = {
    "color": 3, "shape": 3, "count": 2, "position": 2, "describe_brief": 1.5, "describe_detailed": 1,
    "read_text": 1.5, "locate": 2, "yes_no": 4,
}  # fmt: skip
#: MME perception subtasks :func:`generate_mme_set` writes (MME's own folder names).
MME_SUBTASKS: tuple[str, ...] = ("existence", "count", "position", "color", "OCR")
#: Yes/no questions of the training mix: MME's subtasks, and two one-attribute checks ("Is there anything red?",
#: "Is there a circle?") that a model learns first and builds the two-attribute ones on.
YES_NO_SUBTASKS: tuple[str, ...] = (*MME_SUBTASKS, "any_color", "any_kind")

_ZH_DIGITS = "零一二三四五六七八九"


@dataclass(frozen=True)
class Shape:
    kind: str  # circle, square, triangle
    color: str  # a key of COLORS
    cell: tuple[int, int]  # (row, column) in the 3 x 3 grid
    box: tuple[int, int, int, int]  # drawn extent in pixels: x1, y1 inclusive, x2, y2 exclusive

    def phrase(self, language: str = "en") -> str:
        if language == "zh":
            return COLORS[self.color][1] + SHAPES[self.kind]
        return f"the {self.color} {self.kind}"


@dataclass(frozen=True)
class Scene:
    size: int
    shapes: tuple[Shape, ...]
    word: str | None = None
    word_cell: tuple[int, int] | None = None
    word_box: tuple[int, int, int, int] | None = field(default=None, compare=False)
    #: How a free-layout scene (see :func:`random_scene`) is drawn; the defaults draw as the grid layout does.
    background: tuple[int, int, int] = BACKGROUND
    canvas: tuple[int, int] | None = None  # drawn at this (width, height), then resized to size x size
    font: str | None = None  # a TrueType file for the word (None: Pillow's own font)
    font_size: int | None = None  # in canvas pixels
    jpeg_quality: int | None = None  # JPEG-compressed at this quality after drawing

    def unique_kind(self, kind: str) -> bool:
        return sum(s.kind == kind for s in self.shapes) == 1

    def unique_color(self, color: str) -> bool:
        return sum(s.color == color for s in self.shapes) == 1


# --- scenes and pictures -------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _word_box(word: str, cell: tuple[int, int], size: int) -> tuple[int, int, int, int]:
    """Where ``word`` is drawn (its top-left anchor and extent) when centered in ``cell``."""
    step = size / 3
    font = _font(_grid_font_size(size))
    # whole pixels from Pillow's fonts (typed as floats)
    left, top, right, bottom = map(int, ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), word, font=font))
    cx, cy = (cell[1] + 0.5) * step, (cell[0] + 0.5) * step
    x = min(max(1, round(cx - (right - left) / 2)), size - 1 - (right - left))
    y = min(max(1, round(cy - (bottom - top) / 2)), size - 1 - (bottom - top))
    return x, y, x + (right - left), y + (bottom - top)


def random_scene(
    rng: random.Random,
    size: int = DEFAULT_SIZE,
    word: bool | None = None,
    n: int | None = None,
    free: bool = False,
) -> Scene:
    """A random scene: ``n`` (default 1-4) shapes with distinct (color, kind) pairs in distinct cells, and a
    printed word in a free cell with probability 0.4 (``word=True``/``False`` forces it). With ``free``, the
    free layout instead: shapes anywhere in several sizes, pictures and backgrounds (see :func:`_free_scene`)."""
    if free:
        scene = _free_scene(rng, size, word, n)
        while word and scene.word is None:  # the forced word found no free place in a crowded picture: draw again
            scene = _free_scene(rng, size, word, n)
        return scene
    n = n if n is not None else rng.randint(1, 4)
    cells = rng.sample(sorted(POSITIONS), n + 1)
    pairs = rng.sample([(c, k) for c in COLORS for k in SHAPES], n)
    step = size / 3
    shapes = []
    for (color, kind), cell in zip(pairs, cells[:n], strict=True):
        side = round(step * rng.uniform(0.5, 0.85))
        slack = int(step) - side - 2
        x0 = round(cell[1] * step) + 1 + rng.randint(0, max(0, slack))
        y0 = round(cell[0] * step) + 1 + rng.randint(0, max(0, slack))
        shapes.append(Shape(kind, color, cell, (x0, y0, x0 + side, y0 + side)))
    has_word = rng.random() < 0.4 if word is None else word
    if not has_word:
        return Scene(size, tuple(shapes))
    text = rng.choice(WORDS)
    return Scene(size, tuple(shapes), text, cells[n], _word_box(text, cells[n], size))


#: Light backgrounds of free-layout scenes (white among them).
FREE_BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (255, 255, 255), (252, 250, 243), (243, 243, 243), (240, 245, 252), (252, 242, 242), (242, 250, 240),
)  # fmt: skip
#: Picture sizes (width, height) of free-layout scenes before the resize to the model's input.
FREE_CANVASES: tuple[tuple[int, int], ...] = ((112, 112), (168, 112), (112, 168), (224, 168), (140, 140))
#: TrueType fonts free-layout words are printed in, when installed (besides Pillow's own font).
FREE_FONTS: tuple[str, ...] = (
    "DejaVuSansCondensed-Bold.ttf", "DejaVuSansCondensed.ttf", "LiberationSansNarrow-Bold.ttf", "DejaVuSerif.ttf",
    "LiberationSerif-Regular.ttf", "DejaVuSansMono.ttf",
)  # fmt: skip


@functools.lru_cache(maxsize=1)
def _free_fonts() -> tuple[str, ...]:
    import os

    found: dict[str, str] = {}
    for root_dir in ("/usr/share/fonts", "/usr/local/share/fonts", "/Library/Fonts", "C:/Windows/Fonts"):
        for root, _dirs, files in os.walk(root_dir):
            for name in files:
                if name in FREE_FONTS:
                    found.setdefault(name, os.path.join(root, name))
    return tuple(found[name] for name in FREE_FONTS if name in found)


@functools.lru_cache(maxsize=64)
def _truetype(path: str, size: int) -> Any:
    return ImageFont.truetype(path, size)


def _grid_font_size(size: int) -> int:
    """The size of the grid layout's words (Pillow's own font) in a ``size`` x ``size`` picture."""
    return max(8, round(size * 0.15))


def _word_font(scene: Scene) -> Any:
    """The font the scene's word is drawn in: the free layout's own, or the grid layout's."""
    if scene.canvas is not None and scene.font_size:
        return _truetype(scene.font, scene.font_size) if scene.font else _font(scene.font_size)
    return _font(_grid_font_size(scene.size))


def _region(x: float, y: float, width: float, height: float) -> tuple[int, int]:
    return min(2, int(3 * y / height)), min(2, int(3 * x / width))


def _free_scene(rng: random.Random, size: int, word: bool | None, n: int | None) -> Scene:
    """Shapes of 8-35% of the shorter side anywhere (not overlapping), on a light background, in one of several
    picture sizes; the word (probability 0.4) anywhere free, in one of several fonts and sizes; JPEG. Each shape's
    cell is the 3 x 3 region of its center; boxes are in the resized picture's pixels. A word that finds no free
    place is left out, even a forced one (about 1 picture in 10,000; :func:`random_scene` then draws again)."""
    width, height = rng.choice(FREE_CANVASES)
    shorter = min(width, height)
    n = n if n is not None else rng.randint(1, 4)
    pairs = rng.sample([(c, k) for c in COLORS for k in SHAPES], n)
    taken: list[tuple[float, float, float, float]] = []
    gap = shorter * 0.03

    def free(box: tuple[float, float, float, float]) -> bool:
        return all(box[2] + gap <= o[0] or o[2] + gap <= box[0] or box[3] + gap <= o[1] or o[3] + gap <= box[1]
                   for o in taken)  # fmt: skip

    sx, sy = size / width, size / height
    shapes = []
    for color, kind in pairs:
        for _attempt in range(100):
            side = shorter * rng.uniform(0.08, 0.35)
            x0, y0 = rng.uniform(1, width - side - 1), rng.uniform(1, height - side - 1)
            box = (x0, y0, x0 + side, y0 + side)
            if free(box):
                taken.append(box)
                cell = _region(x0 + side / 2, y0 + side / 2, width, height)
                scaled = (round(x0 * sx), round(y0 * sy), round((x0 + side) * sx), round((y0 + side) * sy))
                shapes.append(Shape(kind, color, cell, scaled))
                break
    fonts = (*_free_fonts(), None)
    style: dict[str, Any] = {
        "background": rng.choice(FREE_BACKGROUNDS),
        "canvas": (width, height),
        "font": rng.choice(fonts),
        "jpeg_quality": rng.randint(60, 95),
    }
    has_word = rng.random() < 0.4 if word is None else word
    if has_word:
        text = rng.choice(WORDS)
        for _attempt in range(100):
            font_size = max(9, round(shorter * rng.uniform(0.1, 0.2)))
            font = _truetype(style["font"], font_size) if style["font"] else _font(font_size)
            left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font)
            w, h = right - left, bottom - top
            if w + 4 >= width or h + 4 >= height:
                continue
            x0, y0 = rng.uniform(2, width - w - 2), rng.uniform(2, height - h - 2)
            box = (x0, y0, x0 + w, y0 + h)
            if free(box):
                cell = _region(x0 + w / 2, y0 + h / 2, width, height)
                word_at = (round(x0), round(y0), round(x0 + w), round(y0 + h))  # canvas pixels, for drawing
                return Scene(size, tuple(shapes), text, cell, word_at, font_size=font_size, **style)
    return Scene(size, tuple(shapes), **style)


def render(scene: Scene) -> Image.Image:
    """The picture of ``scene`` (RGB, no antialiasing, so every shape pixel has its exact color); a free-layout
    scene is drawn at its canvas size, resized to ``size`` x ``size`` (as the processor resizes) and
    JPEG-compressed."""
    if scene.canvas is not None:
        return _render_free(scene)
    image = Image.new("RGB", (scene.size, scene.size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        x1, y1, x2, y2 = shape.box
        fill = COLORS[shape.color][0]
        if shape.kind == "circle":
            draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=fill)
        elif shape.kind == "square":
            draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=fill)
        else:
            draw.polygon([((x1 + x2 - 1) / 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=fill)
    if scene.word is not None and scene.word_box is not None:
        font = _word_font(scene)
        left, top, _r, _b = draw.textbbox((0, 0), scene.word, font=font)
        draw.text((scene.word_box[0] - left, scene.word_box[1] - top), scene.word, fill=TEXT_COLOR, font=font)
    return image


def letter_centers(scene: Scene) -> list[tuple[str, float, float]]:
    """Each letter of the scene's printed word with the center of its ink, in the pixels of the picture
    :func:`render` returns (``scene.size`` square); empty without a word. The trainer labels the patches under
    the letters with it."""
    if scene.word is None or scene.word_box is None:
        return []
    width, height = scene.canvas if scene.canvas is not None and scene.font_size else (scene.size, scene.size)
    font = _word_font(scene)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left, top, _r, _b = draw.textbbox((0, 0), scene.word, font=font)
    x0, y0 = scene.word_box[0] - left, scene.word_box[1] - top
    centers = []
    for i, letter in enumerate(scene.word):
        x1, y1, x2, y2 = draw.textbbox((x0 + font.getlength(scene.word[:i]), y0), letter, font=font)
        centers.append((letter, (x1 + x2) / 2 * scene.size / width, (y1 + y2) / 2 * scene.size / height))
    return centers


def _render_free(scene: Scene) -> Image.Image:
    import io

    width, height = scene.canvas  # type: ignore[misc]
    sx, sy = width / scene.size, height / scene.size
    image = Image.new("RGB", (width, height), scene.background)
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        x1, y1, x2, y2 = shape.box[0] * sx, shape.box[1] * sy, shape.box[2] * sx, shape.box[3] * sy
        fill = COLORS[shape.color][0]
        if shape.kind == "circle":
            draw.ellipse((x1, y1, x2, y2), fill=fill)
        elif shape.kind == "square":
            draw.rectangle((x1, y1, x2, y2), fill=fill)
        else:
            draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=fill)
    if scene.word is not None and scene.word_box is not None and scene.font_size:
        font = _word_font(scene)
        left, top, _r, _b = draw.textbbox((0, 0), scene.word, font=font)
        draw.text((scene.word_box[0] - left, scene.word_box[1] - top), scene.word, fill=TEXT_COLOR, font=font)
    image = image.resize((scene.size, scene.size), Image.Resampling.BICUBIC)
    if scene.jpeg_quality is None:
        return image
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=scene.jpeg_quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


# --- texts ---------------------------------------------------------------------------------------------------------
def _zh_count(n: int) -> str:
    """The Chinese numeral used before a measure word (两 for two, as in 两个)."""
    return "两" if n == 2 else _ZH_DIGITS[n] if 0 <= n < 10 else str(n)


def _en_count(n: int) -> str:
    return ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")[n]


def _list_en(items: Sequence[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _a(color: str) -> str:
    return "an" if color[0] in "aeiou" else "a"


def _describe(scene: Scene, detail: str, language: str) -> str:
    shapes = sorted(scene.shapes, key=lambda s: s.cell)
    n = len(shapes)
    white = scene.background == BACKGROUND
    if language == "zh":
        if detail == "brief":
            items = "、".join(f"一个{s.phrase('zh')}" for s in shapes)
            text = f"{'白色' if white else '浅色'}背景上有{items}。"
            return text + (f'图中写着"{scene.word}"。' if scene.word else "")
        items = "；".join(f"{POSITIONS[s.cell][1]}是一个{s.phrase('zh')}" for s in shapes)
        text = f"这张图的背景是{'白色' if white else '浅色'}的，上面有{_zh_count(n)}个图形：{items}。"
        if scene.word and scene.word_cell:
            text += f'{POSITIONS[scene.word_cell][1]}用黑色写着单词"{scene.word}"。'
        return text
    if detail == "brief":
        items = _list_en([f"{_a(s.color)} {s.color} {s.kind}" for s in shapes])
        text = f"{items[0].upper()}{items[1:]} on a {'white' if white else 'light'} background."
        return text + (f' The word "{scene.word}" is written on it.' if scene.word else "")
    noun = "shape" if n == 1 else "shapes"
    items = _list_en([f"{_a(s.color)} {s.color} {s.kind} {POSITIONS[s.cell][0]}" for s in shapes])
    text = f"The picture shows {_en_count(n)} {noun} on a {'white' if white else 'light'} background: {items}."
    if scene.word and scene.word_cell:
        text += f' The word "{scene.word}" is written in black {POSITIONS[scene.word_cell][0]}.'
    return text


def _yes_no(scene: Scene, rng: random.Random, answer: bool, subtask: str, language: str) -> tuple[str, str]:
    """An MME-style yes/no question about ``scene`` whose true answer is ``answer``: (prompt, "Yes"/"No")."""
    zh = language == "zh"
    present = {(s.color, s.kind) for s in scene.shapes}
    if subtask == "existence":
        if answer:
            color, kind = rng.choice(sorted(present))
        else:
            color, kind = rng.choice(sorted({(c, k) for c in COLORS for k in SHAPES} - present))
        q = (
            f"图中有{COLORS[color][1]}{SHAPES[kind]}吗？"
            if zh
            else f"Is there {_a(color)} {color} {kind} in the image?"
        )
    elif subtask == "count":
        n = len(scene.shapes)
        m = n if answer else rng.choice([k for k in range(1, 6) if k != n])
        q = f"图中一共有{_zh_count(m)}个图形吗？" if zh else f"Are there {_en_count(m)} shapes in the image?"
        if not zh and m == 1:
            q = "Is there one shape in the image?"
    elif subtask == "position":
        shape = rng.choice([s for s in scene.shapes if s.cell != (1, 1)] or list(scene.shapes))
        if shape.cell == (1, 1):  # only a centered shape: ask about a corner instead
            true_side, false_side = "center", rng.choice(["left", "right", "top", "bottom"])
        else:
            axis = rng.choice([a for a in (0, 1) if shape.cell[a] != 1])
            sides = ("top", "center", "bottom") if axis == 0 else ("left", "center", "right")
            true_side = sides[shape.cell[axis]]
            false_side = {"top": "bottom", "bottom": "top", "left": "right", "right": "left"}[true_side]
        side = true_side if answer else false_side
        zh_side = {"top": "上方", "bottom": "下方", "left": "左侧", "right": "右侧", "center": "中间"}[side]
        if zh:
            q = f"{shape.phrase('zh')}在图的{zh_side}吗？"
        elif side == "center":
            q = f"Is the {shape.color} {shape.kind} in the center of the image?"
        elif side in ("top", "bottom"):
            q = f"Is the {shape.color} {shape.kind} in the {side} part of the image?"
        else:
            q = f"Is the {shape.color} {shape.kind} on the {side} side of the image?"
    elif subtask == "color":
        kinds = [k for k in SHAPES if scene.unique_kind(k)]
        if not kinds:
            raise ValueError("a color question needs a scene with a shape of a unique kind")
        kind = rng.choice(kinds)
        true_color = next(s.color for s in scene.shapes if s.kind == kind)
        color = true_color if answer else rng.choice([c for c in COLORS if c != true_color])
        q = f"图中的{SHAPES[kind]}是{COLORS[color][1]}的吗？" if zh else f"Is the {kind} in the image {color}?"
    elif subtask == "any_color":
        colors = {s.color for s in scene.shapes}
        color = rng.choice(sorted(colors if answer else set(COLORS) - colors))
        q = f"图中有{COLORS[color][1]}的图形吗？" if zh else f"Is there anything {color} in the image?"
    elif subtask == "any_kind":
        drawn = {s.kind for s in scene.shapes}
        if not answer and drawn == set(SHAPES):
            answer = True  # every kind is drawn: no kind to ask about that is absent
        kind = rng.choice(sorted(drawn if answer else set(SHAPES) - drawn))
        q = f"图中有{SHAPES[kind]}吗？" if zh else f"Is there {_a(kind)} {kind} in the image?"
    elif subtask == "OCR":
        if scene.word is None:
            raise ValueError("an OCR question needs a scene with a printed word")
        word = scene.word if answer else rng.choice([w for w in WORDS if w != scene.word])
        q = f'图中写的单词是"{word}"吗？' if zh else f'Is the word in the image "{word}"?'
    else:
        raise ValueError(f"unknown yes/no subtask {subtask!r}")
    reply = ("是" if answer else "否") if zh else ("Yes" if answer else "No")
    return yes_no_prompt(q, language), reply  # type: ignore[arg-type]


#: Other wordings of the short questions (kind -> language -> templates), asked instead of the usual one with the
#: probability ``paraphrase`` of :func:`make_sample`; the answers stay the same. Fields: {kind}, {color},
#: {kind_zh}, {color_zh}, {phrase_zh}.
PARAPHRASES: dict[str, dict[str, tuple[str, ...]]] = {
    "color": {
        "en": (
            "What is the color of the {kind}?", "Which color does the {kind} have?", "Tell me the color of the {kind}.",
            "What colour is the {kind}?", "The {kind} is what color?",
        ),
        "zh": ("{kind_zh}是什么颜色？", "这个{kind_zh}是什么颜色的？", "{kind_zh}的颜色是什么？"),
    },
    "shape": {
        "en": ("What shape is the {color} one?", "What is the {color} shape?", "Which shape is {color}?"),
        "zh": ("{color_zh}的是什么形状？", "{color_zh}图形的形状是什么？"),
    },
    "count": {
        "en": (
            "How many shapes are in the picture?", "How many objects are there?", "Count the shapes.",
            "How many shapes can you see?",
        ),
        "zh": ("图里有多少个图形？", "数一数图中有几个图形。"),
    },
    "position": {
        "en": (
            "Where's the {color} {kind}?", "Where is the {color} {kind} located?",
            "In which part of the picture is the {color} {kind}?",
        ),
        "zh": ("{phrase_zh}在图的什么位置？", "{phrase_zh}在哪儿？"),
    },
}  # fmt: skip

#: Wordings that name no shape, asked (besides :data:`PARAPHRASES`) about pictures with a single shape: a user
#: who sees one shape asks "What color is the shape?", and "shape" in a color question must not turn it into a
#: shape question.
ONE_SHAPE_PARAPHRASES: dict[str, dict[str, tuple[str, ...]]] = {
    "color": {
        "en": ("What color is the shape?", "What color is it?", "What color is the object?", "What colour is this?"),
        "zh": ("这个图形是什么颜色？", "它是什么颜色的？"),
    },
    "shape": {
        "en": ("What shape is it?", "What shape is this?", "What is the shape?", "Which shape is in the picture?"),
        "zh": ("这是什么形状？", "图中的图形是什么形状？"),
    },
}  # fmt: skip


def paraphrase_texts() -> Iterator[str]:
    """Every question :data:`PARAPHRASES` and :data:`ONE_SHAPE_PARAPHRASES` can ask (for the vocabulary), as the
    processor writes it."""
    for by_language in (*PARAPHRASES.values(), *ONE_SHAPE_PARAPHRASES.values()):
        for templates in by_language.values():
            for template in templates:
                for color, (_rgb, color_zh) in COLORS.items():
                    for kind, kind_zh in SHAPES.items():
                        fields = {"kind": kind, "color": color, "kind_zh": kind_zh, "color_zh": color_zh}
                        yield "\n" + template.format(**fields, phrase_zh=color_zh + kind_zh)


def _paraphrased(
    kind: str, language: str, question: str, shape: Shape | None, rng: random.Random, one_shape: bool = False
) -> str:
    templates = PARAPHRASES.get(kind, {}).get(language, ())
    if one_shape:
        templates += ONE_SHAPE_PARAPHRASES.get(kind, {}).get(language, ())
    if not templates:
        return question
    template = rng.choice(templates)
    if shape is None:
        return template
    color_zh, kind_zh = COLORS[shape.color][1], SHAPES[shape.kind]
    return template.format(
        kind=shape.kind, color=shape.color, kind_zh=kind_zh, color_zh=color_zh, phrase_zh=color_zh + kind_zh
    )


def _named_shape(scene: Scene, kind: str, language: str, question: str, answer: str) -> Shape | None:
    """The shape a color, shape or position question names (by its unique kind, its unique color, or its
    phrase in the answer)."""
    zh = language == "zh"
    for shape in scene.shapes:
        kind_name = SHAPES[shape.kind] if zh else shape.kind
        color_name = COLORS[shape.color][1] if zh else shape.color
        if kind == "color" and scene.unique_kind(shape.kind) and kind_name in question:
            return shape
        if kind == "shape" and scene.unique_color(shape.color) and color_name in question:
            return shape
        if kind == "position" and shape.phrase(language) in answer:
            return shape
    return None


def sample_texts(
    scene: Scene, kind: str, language: str, rng: random.Random, paraphrase: float = 0.0
) -> tuple[str, str]:
    """(question, answer) of one sample ``kind`` about ``scene`` in ``language`` ("en" or "zh"). Besides
    :data:`KINDS`, ``"yes_no:<subtask>"`` asks a yes/no question of one of :data:`YES_NO_SUBTASKS`. With
    ``paraphrase`` > 0, a color, shape, count or position question is asked in one of :data:`PARAPHRASES`'
    wordings with that probability, about a picture with one shape also in :data:`ONE_SHAPE_PARAPHRASES`'
    (``paraphrase=0`` draws exactly what earlier versions drew)."""
    question, answer = _sample_texts(scene, kind, language, rng)
    if paraphrase > 0 and kind in PARAPHRASES and rng.random() < paraphrase:
        shape = _named_shape(scene, kind, language, question, answer)
        if shape is None and kind != "count":
            return question, answer
        question = _paraphrased(kind, language, question, shape, rng, one_shape=len(scene.shapes) == 1)
    return question, answer


def _sample_texts(scene: Scene, kind: str, language: str, rng: random.Random) -> tuple[str, str]:
    zh = language == "zh"
    if kind == "color":
        shape = rng.choice([s for s in scene.shapes if scene.unique_kind(s.kind)])  # see _answerable
        if zh:
            return f"图中的{SHAPES[shape.kind]}是什么颜色的？", f"{SHAPES[shape.kind]}是{COLORS[shape.color][1]}的。"
        return f"What color is the {shape.kind}?", f"The {shape.kind} is {shape.color}."
    if kind == "shape":
        shape = rng.choice([s for s in scene.shapes if scene.unique_color(s.color)])  # see _answerable
        if zh:
            return f"{COLORS[shape.color][1]}的图形是什么形状？", f"它是{SHAPES[shape.kind]}。"
        return f"What shape is the {shape.color} object?", f"It is a {shape.kind}."
    if kind == "count":
        n = len(scene.shapes)
        if zh:
            return "图中有几个图形？", f"图中有{_zh_count(n)}个图形。"
        return (
            "How many shapes are there in the image?",
            f"There {'is' if n == 1 else 'are'} {_en_count(n)} shape{'' if n == 1 else 's'}.",
        )
    if kind == "position":
        shape = rng.choice(scene.shapes)
        if zh:
            return f"{shape.phrase('zh')}在哪里？", f"{shape.phrase('zh')}在图的{POSITIONS[shape.cell][1]}。"
        return (
            f"Where is the {shape.color} {shape.kind}?",
            f"The {shape.color} {shape.kind} is {POSITIONS[shape.cell][0]}.",
        )
    if kind in ("describe_brief", "describe_detailed"):
        detail = kind.split("_")[1]
        return describe_prompt(detail, language), _describe(scene, detail, language)  # type: ignore[arg-type]
    if kind == "read_text":
        if scene.word is None:
            return read_text_prompt(language), ("图中没有文字。" if zh else "There is no text in this image.")  # type: ignore[arg-type]
        return read_text_prompt(language), scene.word  # type: ignore[arg-type]
    if kind == "locate":
        shape = rng.choice(scene.shapes)
        phrase = shape.phrase(language)
        grid = to_grid(shape.box, scene.size, scene.size)
        return locate_prompt(phrase, language), format_box(phrase, grid)  # type: ignore[arg-type]
    if kind == "yes_no":
        subtasks = [t for t in YES_NO_SUBTASKS if t != "OCR" or scene.word is not None]
        return _yes_no(scene, rng, rng.random() < 0.5, rng.choice(subtasks), language)
    if kind.startswith("yes_no:") and kind[7:] in YES_NO_SUBTASKS:
        return _yes_no(scene, rng, rng.random() < 0.5, kind[7:], language)
    raise ValueError(f"unknown sample kind {kind!r}; use one of {', '.join(KINDS)} or yes_no:<subtask>")


def _messages(image: Any, question: str, answer: str | None) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}
    ]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def _sample_rng(seed: int, index: int) -> random.Random:
    return random.Random(seed * 1_000_003 + index)


def _choose_kind(rng: random.Random, kinds: Sequence[str] | None) -> str:
    names = list(kinds) if kinds else list(KINDS)
    return rng.choices(names, weights=[KIND_WEIGHTS.get(k, 1.0) for k in names])[0]


def _answerable(scene: Scene, kind: str) -> bool:
    """Whether a question of ``kind`` can name a shape of ``scene`` unambiguously (by kind for color
    questions, by color for shape questions; yes/no questions may ask either)."""
    unique_kind = any(scene.unique_kind(s.kind) for s in scene.shapes)
    unique_color = any(scene.unique_color(s.color) for s in scene.shapes)
    if kind == "color":
        return unique_kind
    if kind == "shape":
        return unique_color
    if kind.startswith("yes_no"):
        return unique_kind and unique_color
    return True


def make_sample(
    seed: int,
    index: int,
    *,
    size: int = DEFAULT_SIZE,
    kinds: Sequence[str] | None = None,
    with_image: bool = True,
    paraphrase: float = 0.0,
    free: float = 0.0,
) -> dict[str, Any]:
    """Sample ``index`` of the stream of ``seed``: ``{"image", "messages", "kind", "language", "question",
    "answer", "scene"}``. ``messages`` is a user message (image part + text) and the assistant's answer, in the
    chat format the processor takes. With ``with_image=False`` no picture is drawn (``image`` is None). ``paraphrase``
    is the share of short questions asked in other words (see :func:`sample_texts`), ``free`` the share of
    free-layout pictures (see :func:`random_scene`; 0 draws exactly what earlier versions drew)."""
    rng = _sample_rng(seed, index)
    kind = _choose_kind(rng, kinds)
    language = rng.choice(LANGUAGES)
    word = True if (kind == "read_text" and rng.random() < 0.8) or kind == "yes_no:OCR" else None
    layout = free > 0 and rng.random() < free
    scene = random_scene(rng, size, word=word, free=layout)
    while not _answerable(scene, kind):  # no shape the question could name without ambiguity: draw again
        scene = random_scene(rng, size, word=word, free=layout)
    question, answer = sample_texts(scene, kind, language, rng, paraphrase)
    image = render(scene) if with_image else None
    return {
        "image": image,
        "messages": _messages(image, question, answer),
        "kind": kind,
        "language": language,
        "question": question,
        "answer": answer,
        "scene": scene,
    }


def make_conversation(
    seed: int,
    index: int,
    *,
    turns: int = 1,
    size: int = DEFAULT_SIZE,
    kinds: Sequence[str] | None = None,
    paraphrase: float = 0.0,
    free: float = 0.0,
) -> dict[str, Any]:
    """Sample ``index`` of the stream of ``seed`` (see :func:`make_sample`) followed by ``turns - 1`` more
    questions about the same picture, each in its own user turn after the previous answer; ``messages`` holds the
    whole conversation (the picture only in the first turn)."""
    sample = make_sample(seed, index, size=size, kinds=kinds, paraphrase=paraphrase, free=free)
    rng = _sample_rng(seed, index + 7_777_777)
    messages = list(sample["messages"])
    for _ in range(turns - 1):
        kind = _choose_kind(rng, kinds)
        needs_word = kind in ("read_text", "yes_no:OCR")
        if not _answerable(sample["scene"], kind) or (needs_word and sample["scene"].word is None):
            continue
        question, answer = sample_texts(sample["scene"], kind, sample["language"], rng, paraphrase)
        messages.append({"role": "user", "content": [{"type": "text", "text": question}]})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return {**sample, "messages": messages}


def generate_samples(
    n: int, seed: int = 0, *, start: int = 0, size: int = DEFAULT_SIZE, kinds: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """``n`` samples (see :func:`make_sample`), indexes ``start .. start + n - 1`` of the stream of ``seed``."""
    return [make_sample(seed, i, size=size, kinds=kinds) for i in range(start, start + n)]


# --- vocabulary corpus ---------------------------------------------------------------------------------------------
#: Text the chat layout writes around every conversation (see :mod:`belle_vl_tools.processing_qwen_vl`).
CHAT_TEXTS: tuple[str, ...] = ("system", "user", "assistant", "\n", "You are a helpful assistant.", "Picture 1: ")


def corpus_texts(n: int = 20000, seed: int = 12345) -> Iterator[str]:
    """Every text the demo data can put through the tokenizer: the chat layout's fixed text, every prompt
    template of :mod:`belle_vl_tools.prompts`, and questions and answers of ``n`` samples (no pictures drawn),
    the question as the processor writes it after the picture (``"\\n" + question``)."""
    yield from CHAT_TEXTS
    for by_language in PROMPT_TEMPLATES.values():
        yield from by_language.values()
    for i in range(n):
        sample = make_sample(seed, i, with_image=False)
        yield "\n" + sample["question"]
        yield sample["answer"]


# --- MME-format evaluation set -------------------------------------------------------------------------------------
def generate_mme_set(
    folder: str | Path, seed: int = 0, images_per_subtask: int = 30, *, size: int = DEFAULT_SIZE
) -> dict[str, Path]:
    """Write an MME-format yes/no set: for each subtask (existence, count, position, color, OCR) a folder
    ``folder/<subtask>/`` with PNG pictures and ``<subtask>.txt``, whose lines are
    ``image_name<TAB>question<TAB>ground_truth``, two per picture on consecutive lines (one "Yes", one "No",
    in random order), each question ending " Please answer yes or no.". Returns ``{subtask: txt path}``."""
    root = Path(folder)
    written: dict[str, Path] = {}
    for t, subtask in enumerate(MME_SUBTASKS):
        sub = root / subtask
        sub.mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(images_per_subtask):
            rng = _sample_rng(seed, 1_000_000 * (t + 1) + i)
            scene = random_scene(rng, size, word=subtask == "OCR")
            while subtask == "color" and not _answerable(scene, "color"):
                scene = random_scene(rng, size, word=False)
            name = f"{subtask.lower()}_{i:04d}.png"
            render(scene).save(sub / name)
            order = [True, False] if rng.random() < 0.5 else [False, True]
            for answer in order:
                question, reply = _yes_no(scene, rng, answer, subtask, "en")
                lines.append(f"{name}\t{question}\t{reply}")
        path = sub / f"{subtask}.txt"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        written[subtask] = path
    return written


def shape_mask(image: Image.Image, color: str) -> np.ndarray:
    """Boolean mask of the pixels of ``image`` drawn in ``color`` (a key of :data:`COLORS`)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    return np.all(pixels == np.asarray(COLORS[color][0], dtype=np.int16), axis=-1)


# --- demo vocabulary -----------------------------------------------------------------------------------------------
def _bpe_merges(token: bytes, ranks: dict[bytes, int]) -> list[bytes]:
    """Every token byte-pair merging builds on the way from the single bytes of ``token`` to ``token``
    (lowest rank first, leftmost on ties, as tiktoken merges), ``token`` included."""
    parts = [bytes([b]) for b in token]
    made: list[bytes] = []
    while len(parts) > 1:
        best, best_rank = -1, None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (best_rank is None or rank < best_rank):
                best, best_rank = i, rank
        if best < 0:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
        made.append(parts[best])
    if parts != [token]:
        raise ValueError(f"byte-pair merging does not reach the token {token!r}")
    return made


def build_demo_vocab(
    out_file: str | Path,
    texts: Sequence[str] | Iterator[str] | None = None,
    full_vocab_file: str | Path | None = None,
) -> dict[str, Any]:
    """Write a small ``qwen.tiktoken`` (same format: ``base64(token) rank`` per line) for the demo model.

    It holds the 256 single bytes, every token the full Qwen vocabulary uses to encode ``texts`` (default:
    :func:`corpus_texts`; grounding tags are special, as in the chat layout), and every intermediate token on the
    byte-pair path of each of them, so merging still reaches them. Tokens keep the order of their original ranks
    and are renumbered from 0, so the special tokens follow the last rank. Returns ``{"path", "ranks",
    "used_tokens", "old_ranks"}`` (``old_ranks``: the original rank of each new rank, in order).

    The tokenizer module (and with it transformers) is imported only here.
    """
    import base64

    from belle_vl_tools.tokenization_qwen_vl import QWenTokenizer, load_tiktoken_ranks, qwen_vocab_file

    full_file = Path(full_vocab_file) if full_vocab_file is not None else qwen_vocab_file()
    ranks = load_tiktoken_ranks(full_file)
    tokenizer = QWenTokenizer(vocab_file=full_file)
    n_ranks = len(ranks)
    by_rank = {rank: token for token, rank in ranks.items()}
    used: set[int] = set()
    for text in texts if texts is not None else corpus_texts():
        used.update(i for i in tokenizer.encode_text(text) if i < n_ranks)
    keep: set[bytes] = {bytes([b]) for b in range(256)}
    for rank in used:
        keep.update(_bpe_merges(by_rank[rank], ranks))
    old_ranks = sorted(ranks[token] for token in keep)
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="ascii") as f:
        for new, old in enumerate(old_ranks):
            f.write(f"{base64.b64encode(by_rank[old]).decode('ascii')} {new}\n")
    return {"path": out, "ranks": len(old_ranks), "used_tokens": len(used), "old_ranks": old_ranks}


# --- agent skills: any part order, two pictures, absent objects, paraphrased descriptions, JSON, tool calls -------
#: Sample kinds for an agent's uses, besides :data:`KINDS` (asked only when named in ``kinds``): ``absent`` (a
#: locate or where-question about a shape that is not drawn: the answer says so and gives no box),
#: ``describe_any`` (a description asked in everyday words, brief or detailed), ``json_schema`` (color, shape and
#: count as JSON, as a ``{"color", "shape", "count"}`` schema frames it) and ``json_object`` (JSON whose keys the
#: question names).
AGENT_KINDS: tuple[str, ...] = ("absent", "describe_any", "json_schema", "json_object")

#: Everyday wordings of the description requests (detail -> language -> questions).
DESCRIBE_QUESTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "brief": {
        "en": (
            "What is in this image?", "What is in the picture?", "What do you see?", "Describe the picture.",
            "Describe this image.", "What does the picture show?", "Describe the image briefly.",
            "What can you see in this image?",
        ),
        "zh": ("图中有什么？", "描述一下这张图。", "这张图里有什么？", "简要描述这张图片。"),
    },
    "detailed": {
        "en": (
            "Describe the picture in detail.", "Describe this image in detail.", "Describe the image in detail.",
            "Give a detailed description of the picture.", "Describe everything in the picture and where it is.",
            "Please describe this picture in detail.",
        ),
        "zh": ("详细描述这张图。", "请详细描述一下这张图片。", "详细说说图里有什么，分别在哪里。"),
    },
}  # fmt: skip

#: Text put before the picture when the question follows it ("around" order), and after it when the question
#: comes first.
LEAD_INS: dict[str, tuple[str, ...]] = {
    "en": ("Here is a picture.", "Look at this image:", "I have a picture for you.", "Picture:", "See the image."),
    "zh": ("这是一张图。", "请看这张图：", "看一下这张图片。"),
}
TRAILERS: dict[str, tuple[str, ...]] = {
    "en": ("Thanks!", "Please answer.", "Answer briefly.", "Thank you."),
    "zh": ("谢谢！", "请回答。"),
}
#: How a question names one of two pictures ({n}: 1 or 2; {q}: the question, {ql}: it with a lower-case start).
PICTURE_REFERENCES: dict[str, tuple[str, ...]] = {
    "en": ("In Picture {n}, {ql}", "Picture {n}: {q}", "About Picture {n}: {q}", "Look at Picture {n}. {q}"),
    "zh": ("第{n}张图：{q}", "在图{n}中，{q}", "看第{n}张图。{q}"),
}

#: JSON keys a ``json_object`` question may name, and the JSON schema of ``json_schema`` answers.
JSON_KEYS: tuple[str, ...] = ("color", "shape", "position", "count", "word")
JSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"color": {"type": "string"}, "shape": {"type": "string"}, "count": {"type": "integer"}},
    "required": ["color", "shape", "count"],
}
_JSON_SCHEMA_QUESTIONS: dict[str, tuple[str, ...]] = {
    "en": (
        "Give the color and the shape of the object and the number of shapes.",
        "What color is the shape, what shape is it, and how many shapes are there?",
        "Answer in JSON with the keys color, shape and count.",
        "Describe the shape as JSON: its color, its shape and the count of shapes.",
        "Extract the color, shape and count.",
    ),
    "zh": ("用JSON回答：图形的颜色、形状和图形的数量。", "给出图形的颜色、形状和数量。"),
}
_JSON_OBJECT_QUESTIONS: dict[str, tuple[str, ...]] = {
    "en": (
        "Return a JSON object with the keys {keys} for the {kind}.",
        "Answer in JSON with the keys {keys}: tell me about the {kind}.",
        "Give {keys} of the {kind} as a JSON object.",
    ),
    "zh": ("用JSON对象回答，键为{keys}：图中的{kind_zh}。", "以JSON格式给出{kind_zh}的{keys}。"),
}


def _position_value(cell: tuple[int, int]) -> str:
    """A region as a JSON value: "top left", "center", ..."""
    phrase = POSITIONS[cell][0]
    for lead in ("at the ", "on the ", "in the "):
        if phrase.startswith(lead):
            return phrase[len(lead) :]
    return phrase


def json_answer(scene: Scene, keys: Sequence[str], shape: Shape | None = None) -> str:
    """The JSON text (``json.dumps``' spacing, as the constrained decoding writes it) of ``keys`` about ``shape``
    (color, shape, position) and the scene (count, word: null without one)."""
    import json

    values: dict[str, Any] = {}
    for key in keys:
        if key == "count":
            values[key] = len(scene.shapes)
        elif key == "word":
            values[key] = scene.word
        elif shape is None:
            raise ValueError(f"the JSON key {key!r} needs a shape")
        else:
            values[key] = {"color": shape.color, "shape": shape.kind, "position": _position_value(shape.cell)}[key]
    return json.dumps(values, ensure_ascii=False)


def agent_texts(scene: Scene, kind: str, language: str, rng: random.Random) -> tuple[str, str]:
    """(question, answer) of one of :data:`AGENT_KINDS` about ``scene``."""
    zh = language == "zh"
    if kind == "absent":
        present = {(s.color, s.kind) for s in scene.shapes}
        color, kind_name = rng.choice(sorted({(c, k) for c in COLORS for k in SHAPES} - present))
        phrase_zh = COLORS[color][1] + SHAPES[kind_name]
        answer = f"图中没有{phrase_zh}。" if zh else f"There is no {color} {kind_name} in the image."
        if rng.random() < 0.7:
            phrase = phrase_zh if zh else f"the {color} {kind_name}"
            return locate_prompt(phrase, language), answer  # type: ignore[arg-type]
        return (f"{phrase_zh}在哪里？" if zh else f"Where is the {color} {kind_name}?"), answer
    if kind == "describe_any":
        detail = rng.choice(("brief", "detailed"))
        return rng.choice(DESCRIBE_QUESTIONS[detail][language]), _describe(scene, detail, language)
    if kind == "json_schema":
        shape = scene.shapes[0]
        return rng.choice(_JSON_SCHEMA_QUESTIONS[language]), json_answer(scene, ("color", "shape", "count"), shape)
    if kind == "json_object":
        shape = rng.choice([s for s in scene.shapes if scene.unique_kind(s.kind)])
        pool = [k for k in JSON_KEYS if k != "word" or scene.word is not None]
        keys = rng.sample(pool, rng.randint(1, 3))
        listed = "、".join(keys) if zh else _list_en([f'"{k}"' for k in keys])
        template = rng.choice(_JSON_OBJECT_QUESTIONS[language])
        question = template.format(keys=listed, kind=shape.kind, kind_zh=SHAPES[shape.kind])
        return question, json_answer(scene, keys, shape)
    raise ValueError(f"unknown agent sample kind {kind!r}; use one of {', '.join(AGENT_KINDS)}")


def _agent_answerable(scene: Scene, kind: str) -> bool:
    if kind == "json_schema":
        return len(scene.shapes) == 1
    if kind == "json_object":
        return any(scene.unique_kind(s.kind) for s in scene.shapes)
    if kind == "absent":
        return len(scene.shapes) < len(COLORS) * len(SHAPES)
    return True


def _turn_texts(scene: Scene, kind: str, language: str, rng: random.Random, paraphrase: float) -> tuple[str, str]:
    if kind in AGENT_KINDS:
        return agent_texts(scene, kind, language, rng)
    return sample_texts(scene, kind, language, rng, paraphrase)


def _can_ask(scene: Scene, kind: str) -> bool:
    if kind in AGENT_KINDS:
        return _agent_answerable(scene, kind)
    needs_word = kind in ("read_text", "yes_no:OCR")
    return _answerable(scene, kind) and not (needs_word and scene.word is None)


def _arranged(image_parts: list[dict[str, Any]], question: str, order: str, language: str, rng: random.Random):
    """A user message's parts: the pictures and the question in ``order`` ("after": pictures first, "before":
    text first, "around": text on both sides)."""
    text = {"type": "text", "text": question}
    if order == "before":
        return [text, *image_parts]
    if order == "around":
        if rng.random() < 0.5:
            return [{"type": "text", "text": rng.choice(LEAD_INS[language])}, *image_parts, text]
        return [text, *image_parts, {"type": "text", "text": rng.choice(TRAILERS[language])}]
    return [*image_parts, text]


def _refer(question: str, n: int, language: str, rng: random.Random) -> str:
    template = rng.choice(PICTURE_REFERENCES[language])
    lowered = question[:1].lower() + question[1:] if language == "en" else question
    return template.format(n=n, q=question, ql=lowered)


def make_agent_conversation(
    seed: int,
    index: int,
    *,
    turns: int = 1,
    size: int = DEFAULT_SIZE,
    kinds: Sequence[str] | None = None,
    paraphrase: float = 0.0,
    free: float = 0.0,
    order: float = 0.0,
    two_pictures: float = 0.0,
) -> dict[str, Any]:
    """A conversation of :func:`make_conversation`'s stream with the agent skills mixed in: ``kinds`` may also
    name :data:`AGENT_KINDS`; a share ``order`` of first turns put their text before or around the picture, a share
    ``two_pictures`` show two pictures in the first turn, each question then naming "Picture 1" or "Picture 2".
    ``scenes`` lists the scenes in picture order. Draws from its own stream: :func:`make_conversation`'s samples
    are unchanged."""
    rng = _sample_rng(seed, index + 13_131_313)
    names = list(kinds) if kinds else list(KINDS)
    kind = _choose_kind(rng, names)
    language = rng.choice(LANGUAGES)
    word = True if (kind == "read_text" and rng.random() < 0.8) or kind == "yes_no:OCR" else None
    layout = free > 0 and rng.random() < free
    scene = random_scene(rng, size, word=word, free=layout)
    while not _can_ask(scene, kind):
        scene = random_scene(rng, size, word=word, free=layout)
    scenes = [scene]
    two = two_pictures > 0 and rng.random() < two_pictures
    if two:
        other = random_scene(rng, size, free=free > 0 and rng.random() < free)
        scenes = [scene, other] if rng.random() < 0.5 else [other, scene]
    question, answer = _turn_texts(scene, kind, language, rng, paraphrase)
    if two:
        question = _refer(question, scenes.index(scene) + 1, language, rng)
    place = rng.choice(("before", "around")) if order > 0 and rng.random() < order else "after"
    images = [render(s) for s in scenes]
    parts = _arranged([{"type": "image", "image": im} for im in images], question, place, language, rng)
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": parts},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]
    for _ in range(turns - 1):
        kind_n = _choose_kind(rng, names)
        target = rng.randrange(len(scenes))
        if not _can_ask(scenes[target], kind_n):
            continue
        q, a = _turn_texts(scenes[target], kind_n, language, rng, paraphrase)
        if two:
            q = _refer(q, target + 1, language, rng)
        messages.append({"role": "user", "content": [{"type": "text", "text": q}]})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
    return {
        "image": images[0],
        "messages": messages,
        "kind": kind,
        "language": language,
        "question": question,
        "answer": answer,
        "scene": scene,
        "scenes": scenes,
    }


# --- tool calls in the ReAct format ----------------------------------------------------------------------------
def _with_handle(question: str, handle: str, language: str, rng: random.Random) -> str:
    """The question a user asks an agent about the picture called ``handle``."""
    if language == "zh":
        return rng.choice((f"{handle}中，{question}", f"看{handle}：{question}", f"关于{handle}：{question}"))
    for said in ("in the image", "in the picture", "in this image"):
        if said in question:
            return question.replace(said, f"in {handle}", 1)
    if rng.random() < 0.5 and question.endswith("?"):
        return f"{question[:-1]} in {handle}?"
    return rng.choice((f"Look at {handle}. {question}", f"{question} ({handle})", f"About {handle}: {question}"))


def react_turn(
    scene: Scene, handle: str, language: str, rng: random.Random, paraphrase: float = 0.5
) -> tuple[str, str, dict[str, Any], str]:
    """One question an agent gets about ``handle`` (a picture it cannot see) and how to answer it with the vision
    tools: ``(user question, tool name, arguments, observation)``; the observation is what the tool returns for
    ``scene`` (the demo model's own answer form), and the final answer repeats it."""
    zh = language == "zh"
    what = rng.choices(("ask", "describe", "locate", "read"), weights=(6, 2, 1.5, 1))[0]
    if what == "read" and scene.word is None:
        what = "ask"
    if what == "describe":
        detail = rng.choice(("brief", "detailed"))
        if zh:
            question = (
                f"详细描述{handle}。"
                if detail == "detailed"
                else rng.choice((f"描述{handle}。", f"{handle}里有什么？"))
            )
        elif detail == "detailed":
            question = rng.choice((f"Describe {handle} in detail.", f"Give a detailed description of {handle}."))
        else:
            question = rng.choice((f"Describe {handle}.", f"What is in {handle}?", f"What does {handle} show?"))
        arguments: dict[str, Any] = {"image": handle, "detail": detail}
        if zh:
            arguments["language"] = "zh"
        return question, "describe_image", arguments, _describe(scene, detail, language)
    if what == "locate":
        shape = rng.choice(scene.shapes)
        phrase = shape.phrase(language)
        question = (
            f"在{handle}中找到{phrase}的位置框。"
            if zh
            else rng.choice((f"Find {phrase} in {handle}.", f"Give the bounding box of {phrase} in {handle}."))
        )
        width, height = scene.canvas if scene.canvas is not None else (scene.size, scene.size)
        sx, sy = width / scene.size, height / scene.size
        x1, y1, x2, y2 = shape.box
        box = f"[{round(x1 * sx)}, {round(y1 * sy)}, {round(x2 * sx)}, {round(y2 * sy)}]"
        observation = (
            f"Found 1 box in {handle} ({width}x{height} pixels), as [x1, y1, x2, y2] in pixels: {phrase}: {box}"
        )
        return question, "locate_objects", {"image": handle, "description": phrase}, observation
    if what == "read":
        question = (
            f"{handle}上写着什么字？"
            if zh
            else rng.choice(
                (f"What does the text in {handle} say?", f"Read the word in {handle}.", f"What is written in {handle}?")
            )
        )
        return question, "read_text", {"image": handle}, scene.word or ""
    kind = rng.choice([k for k in ("color", "shape", "count", "position", "yes_no") if _answerable(scene, k)])
    base, answer = sample_texts(scene, kind, language, rng, paraphrase)
    return _with_handle(base, handle, language, rng), "visual_qa", {"image": handle, "question": base}, answer


def make_react_conversation(
    seed: int, index: int, *, turns: int = 1, size: int = DEFAULT_SIZE, free: float = 0.0
) -> dict[str, Any]:
    """An agent's conversation in OpenAI's message form (no pictures in it: the agent names them by handle):
    each user question about ``image_N`` answered by one tool call (assistant ``tool_calls``), the tool's result
    (``role: tool``) and the final answer. ``scenes`` maps handles to scenes. Render it with
    :func:`belle_vl_tools.react.render_tool_messages` and the tools' specs."""
    rng = _sample_rng(seed, index + 17_171_717)
    n_pictures = rng.randint(1, 3)
    scenes = {
        f"image_{i + 1}": random_scene(rng, size, free=free > 0 and rng.random() < free) for i in range(n_pictures)
    }
    language = "zh" if rng.random() < 0.2 else "en"
    messages: list[dict[str, Any]] = []
    for turn in range(turns):
        handle = rng.choice(sorted(scenes))
        question, tool, arguments, observation = react_turn(scenes[handle], handle, language, rng)
        call_id = f"call_{index}_{turn}"
        messages.append({"role": "user", "content": question})
        messages.append(
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"id": call_id, "type": "function", "function": {"name": tool, "arguments": _json_dumps(arguments)}}
                ],
            }
        )
        messages.append({"role": "tool", "content": observation, "tool_call_id": call_id, "name": tool})
        messages.append({"role": "assistant", "content": observation})
    return {"messages": messages, "scenes": scenes, "language": language}


def _json_dumps(value: Any) -> str:
    import json

    return json.dumps(value, ensure_ascii=False)
