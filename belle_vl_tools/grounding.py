"""Read the boxes out of the model's grounding answers, write boxes in the model's format, and draw them.

Qwen-VL-Chat and Belle-VL answer a grounding request with a reference followed by one or more boxes::

    <ref>the red circle</ref><box>(100,200),(300,400)</box>

The coordinates are integers on a 0-1000 grid over the image: pixel x = x / 1000 * width, pixel y =
y / 1000 * height. :func:`parse_boxes` turns such text into :class:`Box` objects, :func:`format_box` and
:func:`to_grid` go the other way (for building training data), :func:`strip_grounding` leaves the readable
words, and :func:`draw_boxes` paints the boxes on a copy of the image.

Only the standard library and Pillow are used. Parsing never raises on model output: whatever does not read as
a box is skipped. Errors about the caller's own arguments are :class:`~belle_vl_tools.errors.ImageError` (image
sizes, box geometry, drawing options) or :class:`~belle_vl_tools.errors.PromptError` (text for the model).
"""

from __future__ import annotations

import colorsys
import functools
import math
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from belle_vl_tools.errors import ImageError, PromptError

__all__ = [
    "GRID_SIZE",
    "Box",
    "draw_boxes",
    "find_cjk_font",
    "format_box",
    "parse_boxes",
    "strip_grounding",
    "to_grid",
]

#: Box coordinates in the model's text run from 0 to this value on both axes.
GRID_SIZE = 1000

GridBox = tuple[int, int, int, int]


@dataclass(frozen=True)
class Box:
    """One box: a label and two corners in pixels of the original image (or in grid units, if no size was given).

    ``grid`` holds the raw 0-1000 values as the model wrote them (clamped, corners put in order).
    Boxes made by :func:`parse_boxes` always have ``x1 <= x2`` and ``y1 <= y2``.
    """

    label: str
    x1: float
    y1: float
    x2: float
    y2: float
    grid: GridBox

    def __post_init__(self) -> None:
        try:
            coords = [float(value) for value in (self.x1, self.y1, self.x2, self.y2)]
            grid = tuple(int(value) for value in self.grid)
        except (TypeError, ValueError) as exc:
            raise ImageError(f"Box needs four numeric corners and a grid of four integers: {exc}") from None
        if len(grid) != 4:
            raise ImageError(f"Box grid must hold four integers (x1, y1, x2, y2); got {len(grid)}.")
        for name, value in zip(("x1", "y1", "x2", "y2"), coords, strict=True):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "grid", grid)
        object.__setattr__(self, "label", str(self.label))

    @property
    def width(self) -> float:
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        return self.y2 - self.y1

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    @property
    def center(self) -> tuple[float, float]:
        return ((self.x1 + self.x2) / 2, (self.y1 + self.y2) / 2)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: label, the pixel corners and the raw grid values."""
        return {
            "label": self.label,
            "x1": self.x1,
            "y1": self.y1,
            "x2": self.x2,
            "y2": self.y2,
            "grid": list(self.grid),
        }


# --- parsing ---------------------------------------------------------------------------------------------------
_TAG_RE = re.compile(r"<(/?)(ref|box|quad)>", re.IGNORECASE)
_NUMBER = r"\s*([+-]?\d+(?:\.\d*)?)\s*"
_COORDS_RE = re.compile(rf"\s*\({_NUMBER},{_NUMBER}\)\s*,?\s*\({_NUMBER},{_NUMBER}\)\s*")


def _round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


def _clamp_grid(value: float) -> int:
    return min(max(_round_half_up(value), 0), GRID_SIZE)


def _ordered(x1: float, y1: float, x2: float, y2: float) -> tuple[float, float, float, float]:
    return min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)


def _read_coords(content: str, closed: bool) -> GridBox | None:
    """The grid box in a ``<box>`` body, or None. An unclosed body only needs to start with the coordinates."""
    match = _COORDS_RE.fullmatch(content) if closed else _COORDS_RE.match(content)
    if match is None:
        return None
    values = [float(group) for group in match.groups()]
    if not all(math.isfinite(value) for value in values):
        return None
    gx1, gy1, gx2, gy2 = _ordered(*values)
    return (_clamp_grid(gx1), _clamp_grid(gy1), _clamp_grid(gx2), _clamp_grid(gy2))


def _check_size(width: object, height: object) -> None:
    if (width is None) != (height is None):
        raise ImageError(
            f"Pass both width and height of the image in pixels, or neither (for grid units); "
            f"got width={width!r}, height={height!r}."
        )
    for name, value in (("width", width), ("height", height)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ImageError(f"{name} must be a positive number of pixels; got {value!r}.")


def parse_boxes(
    text: str,
    width: int | None = None,
    height: int | None = None,
    default_label: str = "",
) -> list[Box]:
    """All boxes in a grounding answer, in the order they appear.

    A ``<ref>label</ref>`` labels every ``<box>`` after it up to the next ``<ref>``; boxes before any reference
    (or after an empty one) get ``default_label``. With ``width`` and ``height`` the corners are converted to
    pixels; without them they stay in grid units (as floats). Spaces inside the parentheses are allowed,
    swapped corners are put in order, values are clamped to 0-1000 and decimals rounded. ``<quad>`` parts and
    anything malformed are skipped; a box whose closing tag is missing still counts if its coordinates are
    complete (as at the end of a cut-off answer).
    """
    _check_size(width, height)
    if not isinstance(text, str):
        return []
    tags = list(_TAG_RE.finditer(text))
    boxes: list[Box] = []
    label: str | None = None
    index = 0
    while index < len(tags):
        tag = tags[index]
        is_closing, name = bool(tag.group(1)), tag.group(2).lower()
        index += 1
        if is_closing:
            continue  # a stray closing tag
        following = tags[index] if index < len(tags) else None
        content = text[tag.end() : following.start() if following else len(text)]
        closed = following is not None and bool(following.group(1)) and following.group(2).lower() == name
        if closed:
            index += 1
        if name == "ref":
            label = " ".join(content.split()) or None
        elif name == "box":
            grid = _read_coords(content, closed)
            if grid is None:
                continue
            gx1, gy1, gx2, gy2 = grid
            if width is not None and height is not None:
                x1, x2 = gx1 * width / GRID_SIZE, gx2 * width / GRID_SIZE
                y1, y2 = gy1 * height / GRID_SIZE, gy2 * height / GRID_SIZE
            else:
                x1, y1, x2, y2 = float(gx1), float(gy1), float(gx2), float(gy2)
            boxes.append(Box(label if label is not None else default_label, x1, y1, x2, y2, grid))
        # a <quad> body is skipped
    return boxes


# --- writing -------------------------------------------------------------------------------------------------------
_FORBIDDEN_IN_LABEL_RE = re.compile(r"</?(?:ref|box|quad|img)>|<imgpad>", re.IGNORECASE)


def _box_values(box: Box | Sequence[float], what: str) -> tuple[float, float, float, float]:
    if isinstance(box, Box):
        return box.x1, box.y1, box.x2, box.y2
    if isinstance(box, (str, bytes)) or not isinstance(box, Iterable):
        raise ImageError(f"{what} must be a Box or four numbers (x1, y1, x2, y2); got {type(box).__name__}.")
    values = list(box)
    if len(values) != 4 or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
    ):
        raise ImageError(f"{what} must be four finite numbers (x1, y1, x2, y2); got {values!r}.")
    return _ordered(*(float(v) for v in values))


def format_box(label: str, box_grid: Box | Sequence[int]) -> str:
    """``<ref>label</ref><box>(x1,y1),(x2,y2)</box>`` for a box on the 0-1000 grid (as the model writes it).

    ``box_grid`` is four integers in 0-1000 (or a :class:`Box`, whose ``grid`` is used); corners are put in
    order. An empty label gives the box alone, ``<box>(x1,y1),(x2,y2)</box>``.
    """
    if not isinstance(label, str):
        raise PromptError(f"label must be a string, e.g. 'the red car'; got {type(label).__name__}.")
    text = label.strip()
    if "\n" in text or "\r" in text:
        raise PromptError("label must be a single line, e.g. 'the red car'.")
    match = _FORBIDDEN_IN_LABEL_RE.search(text)
    if match:
        raise PromptError(f"label must not contain the tag {match.group(0)!r}; pass the plain words.")
    values: Sequence[Any] = box_grid.grid if isinstance(box_grid, Box) else box_grid
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise PromptError(
            f"box_grid must be four integers in 0-{GRID_SIZE} (x1, y1, x2, y2); got {type(values).__name__}. "
            "Use to_grid() to convert pixel coordinates."
        )
    values = list(values)
    if len(values) != 4 or not all(
        isinstance(v, (int, float))
        and not isinstance(v, bool)
        and math.isfinite(v)
        and float(v).is_integer()
        and 0 <= v <= GRID_SIZE
        for v in values
    ):
        raise PromptError(
            f"box_grid must be four integers in 0-{GRID_SIZE} (x1, y1, x2, y2); got {values!r}. "
            "Use to_grid() to convert pixel coordinates."
        )
    gx1, gy1, gx2, gy2 = (int(v) for v in _ordered(*values))
    box = f"<box>({gx1},{gy1}),({gx2},{gy2})</box>"
    return f"<ref>{text}</ref>{box}" if text else box


def to_grid(box_in_pixels: Box | Sequence[float], width: int, height: int) -> GridBox:
    """Pixel corners (a :class:`Box` or four numbers) as integers on the 0-1000 grid of a ``width`` x ``height``
    image: rounded half up, clamped to 0-1000, corners in order. The inverse of the conversion in :func:`parse_boxes`.
    """
    if width is None or height is None:
        raise ImageError(f"to_grid needs the image width and height in pixels; got width={width!r}, height={height!r}.")
    _check_size(width, height)
    x1, y1, x2, y2 = _box_values(box_in_pixels, "box_in_pixels")
    return (
        _clamp_grid(x1 * GRID_SIZE / width),
        _clamp_grid(y1 * GRID_SIZE / height),
        _clamp_grid(x2 * GRID_SIZE / width),
        _clamp_grid(y2 * GRID_SIZE / height),
    )


_CLOSED_BOX_RE = re.compile(r"[ \t]*<box>.*?</box>", re.IGNORECASE | re.DOTALL)
_CLOSED_QUAD_RE = re.compile(r"[ \t]*<quad>.*?</quad>", re.IGNORECASE | re.DOTALL)
_OPEN_COORDS_RE = re.compile(r"[ \t]*<(?:box|quad)>[\s\d().,+-]*", re.IGNORECASE)
_ANY_TAG_RE = re.compile(r"</?(?:ref|box|quad)>", re.IGNORECASE)


def strip_grounding(text: str) -> str:
    """The answer without grounding markup, for display: references keep their words, boxes go.

    ``<ref>a cat</ref><box>(1,2),(3,4)</box> on a mat`` becomes ``a cat on a mat``. Unclosed boxes and stray
    tags are removed too; the result is stripped of surrounding whitespace.
    """
    if not isinstance(text, str):
        return ""
    text = _CLOSED_BOX_RE.sub("", text)
    text = _CLOSED_QUAD_RE.sub("", text)
    text = _OPEN_COORDS_RE.sub("", text)
    text = _ANY_TAG_RE.sub("", text)
    return text.strip()


# --- drawing -------------------------------------------------------------------------------------------------------
# File names of fonts with Chinese glyphs, most preferred first.
_CJK_FONT_NAMES = (
    "NotoSansCJK-Regular.ttc",
    "NotoSansCJKsc-Regular.otf",
    "NotoSansSC-Regular.otf",
    "NotoSansSC-Regular.ttf",
    "NotoSansCJK-Medium.ttc",
    "NotoSerifCJK-Regular.ttc",
    "SourceHanSansSC-Regular.otf",
    "SourceHanSans-Regular.ttc",
    "wqy-microhei.ttc",
    "wqy-zenhei.ttc",
    "DroidSansFallbackFull.ttf",
    "DroidSansFallback.ttf",
    "uming.ttc",
    "ukai.ttc",
    "PingFang.ttc",
    "Hiragino Sans GB.ttc",
    "STHeiti Light.ttc",
    "msyh.ttc",
    "simhei.ttf",
    "simsun.ttc",
    "Arial Unicode.ttf",
)


def _font_dirs() -> list[str]:
    dirs = [
        "/usr/share/fonts",
        "/usr/local/share/fonts",
        os.path.expanduser("~/.local/share/fonts"),
        os.path.expanduser("~/.fonts"),
        "/System/Library/Fonts",
        "/Library/Fonts",
    ]
    windir = os.environ.get("WINDIR")
    if windir:
        dirs.append(os.path.join(windir, "Fonts"))
    return [d for d in dirs if os.path.isdir(d)]


def _fontconfig_cjk_font() -> str | None:
    fc_list = shutil.which("fc-list")
    if fc_list is None:
        return None
    try:
        result = subprocess.run([fc_list, ":lang=zh", "file"], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    paths = sorted(line.strip().rstrip(":").strip() for line in result.stdout.splitlines() if line.strip())
    paths = [path for path in paths if os.path.isfile(path)]
    # Prefer regular sans-serif faces when fontconfig offers several.
    paths.sort(key=lambda path: ("sans" not in path.lower(), "regular" not in path.lower()))
    return paths[0] if paths else None


@functools.lru_cache(maxsize=1)
def find_cjk_font() -> str | None:
    """The path of an installed font with Chinese glyphs, or None. Looks in the usual font folders, then asks
    fontconfig (``fc-list``) if it is installed; the answer is cached. Nothing is downloaded.
    """
    rank = {name.lower(): position for position, name in enumerate(_CJK_FONT_NAMES)}
    best: tuple[int, str] | None = None
    for font_dir in _font_dirs():
        for root, _dirs, files in os.walk(font_dir):
            for name in files:
                position = rank.get(name.lower())
                if position is not None and (best is None or position < best[0]):
                    best = (position, os.path.join(root, name))
    if best is not None:
        return best[1]
    return _fontconfig_cjk_font()


Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


@functools.lru_cache(maxsize=16)
def _load_font(size: int) -> Font:
    path = find_cjk_font()
    if path is not None:
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            pass
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # an old Pillow, or one built without FreeType
        return ImageFont.load_default()


_PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (0, 128, 128),
    (170, 110, 40),
    (255, 225, 25),
    (128, 0, 0),
)


def _color(index: int) -> tuple[int, int, int]:
    if index < len(_PALETTE):
        return _PALETTE[index]
    hue = (index * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.9)
    return (round(r * 255), round(g * 255), round(b * 255))


# Outline colors to choose from: the palette plus black and white, so one always stands out.
_CANDIDATES = (*_PALETTE, (0, 0, 0), (255, 255, 255))
# Below this distance (see _distance; 0 to about 765) a color does not stand out from the pixels under it.
_GOOD_CONTRAST = 150.0


def _distance(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    """How different two colors look ("redmean" weighted RGB distance: cheap, and closer to the eye than plain
    RGB distance)."""
    rmean = (a[0] + b[0]) / 2
    dr, dg, db = a[0] - b[0], a[1] - b[1], a[2] - b[2]
    return math.sqrt((2 + rmean / 256) * dr * dr + 4 * dg * dg + (2 + (255 - rmean) / 256) * db * db)


def _pixels_under(image: Image.Image, rect: tuple[int, int, int, int], band: int) -> list[tuple[int, ...]]:
    """A sample (at most a few hundred) of the RGB pixels in a ``band``-wide strip along the rectangle's edges."""
    left, top, right, bottom = rect
    img_w, img_h = image.size
    strips = [
        (left - band, top - band, right + band, top + band),
        (left - band, bottom - band, right + band, bottom + band),
        (left - band, top - band, left + band, bottom + band),
        (right - band, top - band, right + band, bottom + band),
    ]
    pixels: list[tuple[int, ...]] = []
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    for x1, y1, x2, y2 in strips:
        x1, y1 = max(0, x1), max(0, y1)
        x2, y2 = min(img_w, x2 + 1), min(img_h, y2 + 1)
        if x2 <= x1 or y2 <= y1:
            continue
        strip = rgb.crop((x1, y1, x2, y2))
        if strip.width * strip.height > 100:
            scale = math.sqrt(100 / (strip.width * strip.height))
            strip = strip.resize((max(1, round(strip.width * scale)), max(1, round(strip.height * scale))))
        data = strip.tobytes()
        pixels.extend(zip(data[0::3], data[1::3], data[2::3], strict=True))
    return pixels


def _contrast(color: tuple[int, int, int], pixels: Sequence[tuple[int, ...]]) -> float:
    """How well ``color`` stands out from ``pixels``: the distance to the nearest tenth of them."""
    if not pixels:
        return float("inf")
    distances = sorted(_distance(color, p) for p in pixels)
    return distances[len(distances) // 10]


def _pick_color(
    pixels: Sequence[tuple[int, ...]], preferred: tuple[int, int, int] | None, taken: set[tuple[int, int, int]]
) -> tuple[int, int, int]:
    """The outline color for a box: ``preferred`` (its label's color so far) when it stands out from the pixels
    under the outline, else the candidate that stands out most, other labels' colors last."""
    if preferred is not None and _contrast(preferred, pixels) >= _GOOD_CONTRAST:
        return preferred
    ranked = sorted(
        _CANDIDATES,
        key=lambda c: (c in taken, -min(_contrast(c, pixels), _GOOD_CONTRAST * 1.5), _CANDIDATES.index(c)),
    )
    return ranked[0]


def _fit_label(draw: ImageDraw.ImageDraw, text: str, font: Font, max_width: int) -> tuple[str, tuple[float, ...]]:
    """The label, shortened with "..." until it is at most ``max_width`` pixels wide, and its bounding box."""
    shown, bbox = _measure(draw, text, font)
    while bbox[2] - bbox[0] > max_width and len(text) > 1:
        text = text[:-1]
        shown, bbox = _measure(draw, text.rstrip() + "...", font)
    return shown, bbox


def _text_color(background: tuple[int, int, int]) -> tuple[int, int, int]:
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def _measure(draw: ImageDraw.ImageDraw, text: str, font: Font) -> tuple[str, tuple[float, float, float, float]]:
    """The text as it can be drawn with ``font`` and its bounding box (a bitmap font only has Latin-1 glyphs)."""
    try:
        return text, draw.textbbox((0, 0), text, font=font)
    except UnicodeError:
        text = text.encode("latin-1", "replace").decode("latin-1")
        return text, draw.textbbox((0, 0), text, font=font)


def draw_boxes(
    image: Image.Image,
    boxes: Sequence[Box],
    *,
    width: int | None = None,
    font_size: int | None = None,
) -> Image.Image:
    """A copy of ``image`` with each box outlined and labelled; ``image`` itself is left unchanged.

    Boxes are in pixels of this image (parse with its width and height). Each outline gets a color that stands out
    from the pixels under it (its label's color when that one does, so a label keeps its color across boxes where
    it can), drawn over a thin dark or light edge so it shows on any picture. The label is written small on a
    filled background just above the box, or inside its top edge when there is no room above, and always inside
    the picture (shortened with "..." when it would be wider). ``width`` is the outline width in pixels (default:
    about 1/150 of the shorter side, 1 to 4); ``font_size`` defaults to about 1/20 of the shorter image side
    (8 to 20 pixels). A font with Chinese glyphs is used when one is installed. RGB and RGBA images keep their
    mode; other modes are converted to RGB.
    """
    if not isinstance(image, Image.Image):
        raise ImageError(f"image must be a PIL.Image.Image; got {type(image).__name__}.")
    if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 1):
        raise ImageError(f"width (the outline width in pixels) must be a positive integer; got {width!r}.")
    if font_size is not None and (isinstance(font_size, bool) or not isinstance(font_size, int) or font_size < 1):
        raise ImageError(f"font_size must be a positive integer or None (automatic); got {font_size!r}.")
    boxes = list(boxes)
    for box in boxes:
        if not isinstance(box, Box):
            raise ImageError(f"boxes must be Box objects (as parse_boxes returns); got {type(box).__name__}.")

    canvas = image.copy() if image.mode in ("RGB", "RGBA") else image.convert("RGB")
    img_w, img_h = canvas.size
    if not boxes or img_w == 0 or img_h == 0:
        return canvas
    original = canvas.copy()  # colors are chosen against the picture, not against outlines drawn before
    draw = ImageDraw.Draw(canvas)
    shorter = min(img_w, img_h)
    line = width if width is not None else max(1, min(4, round(shorter / 150)))
    size = font_size if font_size is not None else max(8, min(20, round(shorter / 20)))
    font = _load_font(size)
    pad = max(1, size // 6)

    colors: dict[str, tuple[int, int, int]] = {}
    placed: list[tuple[Box, tuple[int, int, int, int], tuple[int, int, int]]] = []
    for box in boxes:
        x1, y1, x2, y2 = _ordered(box.x1, box.y1, box.x2, box.y2)
        left = min(max(round(x1), 0), img_w - 1)
        top = min(max(round(y1), 0), img_h - 1)
        right = min(max(round(x2), 0), img_w - 1)
        bottom = min(max(round(y2), 0), img_h - 1)
        pixels = _pixels_under(original, (left, top, right, bottom), line + 1)
        taken = {c for label, c in colors.items() if label != box.label}
        color = _pick_color(pixels, colors.get(box.label), taken)
        colors.setdefault(box.label, color)
        edge = _text_color(color)  # black under light colors, white under dark ones
        draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), outline=edge, width=line + 2)
        draw.rectangle((left, top, right, bottom), outline=color, width=line)
        placed.append((box, (left, top, right, bottom), color))

    # Labels go on top of every outline.
    for box, (left, top, _right, _bottom), color in placed:
        if not box.label:
            continue
        text, (tl, tt, tr, tb) = _fit_label(draw, box.label, font, img_w - 2 * pad)
        label_w = min(img_w, math.ceil(tr - tl) + 2 * pad)
        label_h = min(img_h, math.ceil(tb - tt) + 2 * pad)
        lx = max(0, min(left, img_w - label_w))
        ly = top - label_h if top - label_h >= 0 else top
        ly = max(0, min(ly, img_h - label_h))
        draw.rectangle((lx, ly, lx + label_w - 1, ly + label_h - 1), fill=color)
        draw.text((lx + pad - tl, ly + pad - tt), text, fill=_text_color(color), font=font)
    return canvas
