#!/usr/bin/env python
"""Fuzz ``load_image`` with mutated and truncated small image files.

Small valid PNG, JPEG, GIF, BMP, WEBP, TIFF and ICO files (animated PNG/WebP/GIF, multi-page TIFF and icons with
PNG and BMP entries among them) and small container "bombs" (an ICO with an embedded PNG, an APNG frame, a second
TIFF page, a GIF frame or a WebP canvas far larger than the first picture) are made in memory; each case applies
one to three random mutations (bit flips, byte overwrites, insertions, deletions, duplicated spans, truncation)
to one of them and feeds the result to ``load_image(bytes)``. The contract: every case either loads (an RGB
image) or raises an ``ImageError`` subclass, and finishes within the time limit. Cases are reproducible from
``(seed, index)``.

    python scripts/fuzz_images.py --count 10000 --seed 1
    python scripts/fuzz_images.py --seed 1 --case 4711      # rerun one case and show what happened

Exit status 1 when any case broke the contract (another exception, a non-RGB result, or too slow).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import io
import random
import sys
import time
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

from PIL import Image

try:
    from belle_vl_tools.errors import ImageError
    from belle_vl_tools.images import ImagePolicy, load_image
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from belle_vl_tools.errors import ImageError
    from belle_vl_tools.images import ImagePolicy, load_image

LOADED = "loaded"
INTERESTING_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- the corpus -------------------------------------------------------------------------------------------------
def _picture(width: int = 24, height: int = 16, alpha: bool = False) -> Image.Image:
    """A small deterministic picture with gradients and a few hard edges."""
    mode = "RGBA" if alpha else "RGB"
    image = Image.new(mode, (width, height))
    pixels = []
    for y in range(height):
        for x in range(width):
            r = x * 255 // (width - 1)
            g = y * 255 // (height - 1)
            b = 255 if (x // 4 + y // 4) % 2 else 40
            pixels.append((r, g, b, (x * 11 + y * 7) % 256) if alpha else (r, g, b))
    image.putdata(pixels)
    return image


def _encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def build_corpus() -> dict[str, bytes]:
    """Small valid files, keyed ``"<format>-<variant>"``; the format is the part before the first dash."""
    rgb = _picture()
    rgba = _picture(alpha=True)
    gray16 = Image.new("I;16", (20, 12))
    gray16.putdata([(x * 3000 + y * 500) % 65536 for y in range(12) for x in range(20)])
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotated
    frames = [_picture().convert("P"), _picture().transpose(Image.Transpose.FLIP_LEFT_RIGHT).convert("P")]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    corpus = {
        "png-rgb": _encode(rgb, "PNG"),
        "png-rgba": _encode(rgba, "PNG"),
        "png-palette": _encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG", transparency=0),
        "png-16bit": _encode(gray16, "PNG"),
        "jpeg-baseline": _encode(rgb, "JPEG", quality=85),
        "jpeg-progressive": _encode(rgb, "JPEG", quality=70, progressive=True, exif=exif),
        "gif-animated": gif.getvalue(),
        "gif-still": _encode(rgb.convert("L"), "GIF"),
        "bmp-rgb": _encode(rgb, "BMP"),
        "bmp-palette": _encode(rgb.convert("P"), "BMP"),
        "webp-lossy": _encode(rgb, "WEBP", quality=60),
        "webp-lossless": _encode(rgba, "WEBP", lossless=True),
        "tiff-raw": _encode(rgb, "TIFF"),
        "tiff-deflate": _encode(rgba, "TIFF", compression="tiff_adobe_deflate"),
        "tiff-16bit": _encode(gray16, "TIFF"),
    }
    corpus.update(build_container_corpus())
    return corpus


def build_seed_corpus() -> dict[str, bytes]:
    """What the fuzzer mutates: the valid files of :func:`build_corpus` and the bombs of
    :func:`build_bomb_corpus` (small files whose headers promise a huge picture)."""
    return {**build_corpus(), **build_bomb_corpus()}


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + kind + payload + zlib.crc32(kind + payload).to_bytes(4, "big")


def zeros_zlib(count: int) -> bytes:
    """A valid zlib stream of ``count`` zero bytes, made in a fraction of a second whatever ``count``.

    One megabyte of zeros is compressed once, ending in a full flush (so the segment stands alone), and repeated;
    the checksum is computed over the whole.
    """
    block = 1 << 20
    head = zlib.compressobj(9, zlib.DEFLATED, -15)
    segment = head.compress(bytes(block)) + head.flush(zlib.Z_FULL_FLUSH)
    full, rest = divmod(count, block)
    last = zlib.compressobj(9, zlib.DEFLATED, -15)
    tail = (last.compress(bytes(rest)) if rest else b"") + last.flush(zlib.Z_FINISH)
    checksum = 1
    zeros = bytes(block)
    for _ in range(full):
        checksum = zlib.adler32(zeros, checksum)
    checksum = zlib.adler32(bytes(rest), checksum)
    return b"\x78\xda" + segment * full + tail + checksum.to_bytes(4, "big")


def _pixels(width: int, height: int, complete: bool) -> bytes:
    """Compressed 8-bit gray rows (each with its PNG filter byte) for a ``width`` x ``height`` picture; when not
    ``complete``, only the first 2 KiB of that stream (the header still promises the whole picture)."""
    if complete:
        return zeros_zlib((width + 1) * height)
    return zeros_zlib(min((width + 1) * height, 1 << 24))[:2048]


def gray_png(width: int, height: int, *, complete: bool = True) -> bytes:
    """An all-black 8-bit gray PNG of any size (its pixel data compresses about 1000:1)."""
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes((8, 0, 0, 0, 0))
    return (
        PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", _pixels(width, height, complete)) + _chunk(b"IEND", b"")
    )


def ico_with_png(width: int, height: int, *, complete: bool = True) -> bytes:
    """An ICO whose directory says 16x16 but whose only icon is an embedded ``width`` x ``height`` PNG."""
    png = gray_png(width, height, complete=complete)
    entry = bytes((16, 16, 0, 0)) + (1).to_bytes(2, "little") + (32).to_bytes(2, "little")
    entry += len(png).to_bytes(4, "little") + (22).to_bytes(4, "little")
    return b"\x00\x00\x01\x00\x01\x00" + entry + png


def apng_with_frame(width: int, height: int, *, complete: bool = True) -> bytes:
    """A 16x16 APNG whose second frame claims ``width`` x ``height`` pixels."""

    def fctl(sequence: int, w: int, h: int) -> bytes:
        fields = [sequence, w, h, 0, 0]
        return _chunk(b"fcTL", b"".join(v.to_bytes(4, "big") for v in fields) + bytes((0, 1, 0, 100, 0, 0)))

    ihdr = (16).to_bytes(4, "big") * 2 + bytes((8, 0, 0, 0, 0))
    first = zlib.compress(bytes(17 * 16))
    return (
        PNG_SIGNATURE
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"acTL", (2).to_bytes(4, "big") + (0).to_bytes(4, "big"))
        + fctl(0, 16, 16)
        + _chunk(b"IDAT", first)
        + fctl(1, width, height)
        + _chunk(b"fdAT", (2).to_bytes(4, "big") + _pixels(width, height, complete))
        + _chunk(b"IEND", b"")
    )


def tiff_with_page(width: int, height: int, *, complete: bool = True) -> bytes:
    """A little-endian TIFF: a 16x16 gray first page, then a deflate-compressed ``width`` x ``height`` page."""
    small = bytes(16 * 16)
    big = zeros_zlib(width * height) if complete else zeros_zlib(min(width * height, 1 << 24))[:2048]

    def ifd(w: int, h: int, compression: int, strip_offset: int, strip_size: int, next_ifd: int) -> bytes:
        entries = [
            (256, 4, w),
            (257, 4, h),
            (258, 3, 8),
            (259, 3, compression),
            (262, 3, 1),
            (273, 4, strip_offset),
            (277, 3, 1),
            (278, 4, h),
            (279, 4, strip_size),
        ]
        out = len(entries).to_bytes(2, "little")
        for tag, kind, value in entries:
            out += tag.to_bytes(2, "little") + kind.to_bytes(2, "little") + (1).to_bytes(4, "little")
            out += value.to_bytes(2, "little") + b"\x00\x00" if kind == 3 else value.to_bytes(4, "little")
        return out + next_ifd.to_bytes(4, "little")

    ifd_size = 2 + 9 * 12 + 4
    first_ifd = 8
    second_ifd = first_ifd + ifd_size
    small_at = second_ifd + ifd_size
    big_at = small_at + len(small)
    return (
        b"II*\x00"
        + first_ifd.to_bytes(4, "little")
        + ifd(16, 16, 1, small_at, len(small), second_ifd)
        + ifd(width, height, 8, big_at, len(big), 0)
        + small
        + big
    )


def gif_with_frame(width: int, height: int) -> bytes:
    """A 16x16 GIF whose second frame descriptor claims ``width`` x ``height`` pixels (its data is one block)."""
    screen = b"GIF89a" + (16).to_bytes(2, "little") * 2 + bytes((0x80, 0, 0)) + bytes(6)  # 2-colour table
    first = b"\x2c" + bytes(4) + (16).to_bytes(2, "little") * 2 + b"\x00" + b"\x02\x02\x8c\x01\x00"
    second = b"\x2c" + bytes(4) + width.to_bytes(2, "little") + height.to_bytes(2, "little") + b"\x00"
    return screen + first + second + b"\x02\x02\x8c\x01\x00" + b"\x3b"


def webp_with_canvas(width: int, height: int) -> bytes:
    """An animated WebP with one 4x4 frame on a ``width`` x ``height`` canvas (the decoder allocates the canvas)."""
    still = _encode(_picture(4, 4), "WEBP", lossless=True)
    bitstream = still[12:]  # the VP8L chunk

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return kind + len(payload).to_bytes(4, "little") + payload + b"\x00" * (len(payload) & 1)

    vp8x = bytes((0x02, 0, 0, 0)) + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    anim = bytes(4) + (0).to_bytes(2, "little")
    frame = bytes(6) + (3).to_bytes(3, "little") * 2 + (100).to_bytes(3, "little") + b"\x00" + bitstream
    body = b"WEBP" + chunk(b"VP8X", vp8x) + chunk(b"ANIM", anim) + chunk(b"ANMF", frame)
    return b"RIFF" + len(body).to_bytes(4, "little") + body


def build_container_corpus() -> dict[str, bytes]:
    """Small valid containers: ICO with PNG and BMP icons, an animated PNG, an animated WebP, a two-page TIFF."""
    rgb = _picture()
    ico = io.BytesIO()
    rgb.save(ico, "ICO", sizes=[(16, 16), (24, 24)])
    frames = [_picture(), _picture().transpose(Image.Transpose.FLIP_TOP_BOTTOM)]
    apng = io.BytesIO()
    frames[0].save(apng, "PNG", save_all=True, append_images=frames[1:], duration=40)
    webp = io.BytesIO()
    frames[0].save(webp, "WEBP", save_all=True, append_images=frames[1:], duration=40, lossless=True)
    tiff = io.BytesIO()
    frames[0].save(tiff, "TIFF", save_all=True, append_images=frames[1:])
    return {
        "ico-icons": ico.getvalue(),
        "png-animated": apng.getvalue(),
        "webp-animated": webp.getvalue(),
        "tiff-pages": tiff.getvalue(),
    }


def build_bomb_corpus(side: int = 7000, *, complete: bool = False) -> dict[str, bytes]:
    """Containers hiding a ``side`` x ``side`` picture behind a small first one (49 million pixels by default,
    over the default ``max_pixels``); every one must be refused with ``ImageTooLargeError``.

    ``complete=False`` keeps the files small (the pixel data is cut after 2 KiB): the header still promises the
    whole picture, which is what the guards look at; ``complete=True`` makes real bombs that inflate in full.
    """
    return {
        "ico-bomb-png": ico_with_png(side, side, complete=complete),
        "png-bomb-apng-frame": apng_with_frame(side, side, complete=complete),
        "tiff-bomb-page2": tiff_with_page(side, side, complete=complete),
        "gif-bomb-frame": gif_with_frame(min(side, 65535), min(side, 65535)),
        "webp-bomb-canvas": webp_with_canvas(min(side, 16384), min(side, 16384)),
        "png-bomb": gray_png(side, side, complete=complete),
    }


# --- mutations --------------------------------------------------------------------------------------------------
def _position(rng: random.Random, size: int) -> int:
    """A position in ``[0, size)``, half the time inside the first 100 bytes, where the headers are."""
    if size <= 1:
        return 0
    if rng.random() < 0.5:
        return rng.randrange(min(size, 100))
    return rng.randrange(size)


def _flip(data: bytearray, rng: random.Random) -> str:
    spots = [_position(rng, len(data)) for _ in range(rng.randint(1, 8))]
    for spot in spots:
        data[spot] ^= 1 << rng.randrange(8)
    return f"flip@{','.join(map(str, spots))}"


def _overwrite(data: bytearray, rng: random.Random) -> str:
    spots = [_position(rng, len(data)) for _ in range(rng.randint(1, 8))]
    for spot in spots:
        data[spot] = rng.choice(INTERESTING_BYTES) if rng.random() < 0.5 else rng.randrange(256)
    return f"set@{','.join(map(str, spots))}"


def _insert(data: bytearray, rng: random.Random) -> str:
    spot = _position(rng, len(data) + 1)
    count = rng.randint(1, 16)
    data[spot:spot] = bytes(rng.randrange(256) for _ in range(count))
    return f"insert{count}@{spot}"


def _delete(data: bytearray, rng: random.Random) -> str:
    spot = _position(rng, len(data))
    count = rng.randint(1, 32)
    del data[spot : spot + count]
    return f"delete{count}@{spot}"


def _duplicate(data: bytearray, rng: random.Random) -> str:
    start = _position(rng, len(data))
    span = bytes(data[start : start + rng.randint(1, 64)])
    spot = _position(rng, len(data) + 1)
    data[spot:spot] = span
    return f"dup{len(span)}@{start}->{spot}"


def _truncate(data: bytearray, rng: random.Random) -> str:
    keep = rng.randrange(len(data)) if data else 0
    del data[keep:]
    return f"truncate@{keep}"


MUTATIONS: tuple[Callable[[bytearray, random.Random], str], ...] = (_flip, _overwrite, _insert, _delete, _duplicate)


def fix_png_crcs(data: bytearray) -> None:
    """Recompute the CRC of every complete PNG chunk, so that mutations get past the CRC check to the decoder."""
    offset = 8
    while offset + 12 <= len(data):
        length = int.from_bytes(data[offset : offset + 4], "big")
        end = offset + 8 + length
        if end + 4 > len(data):
            break
        data[end : end + 4] = zlib.crc32(data[offset + 4 : end]).to_bytes(4, "big")
        offset = end + 4


def mutate(original: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One to three random mutations of ``original`` (truncation, when chosen, comes last).

    For PNG data the chunk CRCs are recomputed half of the time, so that the mutation reaches the decoder.
    """
    data = bytearray(original)
    steps = []
    if rng.random() < 0.2:
        steps.append(_truncate(data, rng))
    else:
        for _ in range(rng.choice((1, 1, 2, 3))):
            if not data:
                break
            steps.append(rng.choice(MUTATIONS)(data, rng))
        if data and rng.random() < 0.15:
            steps.append(_truncate(data, rng))
    if data.startswith(PNG_SIGNATURE) and rng.random() < 0.5:
        fix_png_crcs(data)
        steps.append("crc")
    return bytes(data), ";".join(steps)


# --- running cases ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Case:
    index: int
    name: str
    mutation: str
    data: bytes


@dataclasses.dataclass
class Outcome:
    case: Case
    outcome: str  # "loaded", an ImageError subclass name, or "BUG: ..."
    seconds: float
    detail: str = ""

    @property
    def is_bug(self) -> bool:
        return self.outcome.startswith("BUG")


def make_case(corpus: dict[str, bytes], seed: int, index: int) -> Case:
    """Case ``index`` of run ``seed``: cycles through the corpus, each case with its own random stream."""
    names = sorted(corpus)
    name = names[index % len(names)]
    rng = random.Random(f"{seed}:{index}")
    data, mutation = mutate(corpus[name], rng)
    return Case(index, name, mutation, data)


def run_case(case: Case, policy: ImagePolicy) -> Outcome:
    start = time.perf_counter()
    try:
        image = load_image(case.data, policy)
    except ImageError as exc:
        return Outcome(case, type(exc).__name__, time.perf_counter() - start, str(exc))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # anything else breaks the contract
        return Outcome(case, f"BUG: {type(exc).__name__}", time.perf_counter() - start, repr(exc))
    seconds = time.perf_counter() - start
    if not isinstance(image, Image.Image) or image.mode != "RGB":
        return Outcome(case, "BUG: result is not an RGB image", seconds, repr(image))
    return Outcome(case, LOADED, seconds, f"{image.width}x{image.height}")


@dataclasses.dataclass
class FuzzReport:
    count: int
    seed: int
    seconds: float
    outcomes: collections.Counter
    by_format: dict[str, collections.Counter]
    slowest: Outcome | None
    bugs: list[Outcome]
    too_slow: list[Outcome]

    def summary(self) -> str:
        lines = [f"fuzzed {self.count:,} cases (seed {self.seed}) in {self.seconds:.1f} s"]
        lines.append("outcomes:")
        for outcome, number in self.outcomes.most_common():
            lines.append(f"  {outcome:<28} {number:>7,}")
        lines.append("by format:")
        for fmt in sorted(self.by_format):
            counts = self.by_format[fmt]
            parts = ", ".join(f"{name} {number:,}" for name, number in counts.most_common())
            lines.append(f"  {fmt:<5} {sum(counts.values()):>6,}: {parts}")
        if self.slowest is not None:
            s = self.slowest
            lines.append(
                f"slowest: case {s.case.index} ({s.case.name}, {s.case.mutation}) {s.seconds * 1000:.1f} ms -> "
                f"{s.outcome}"
            )
        lines.append(f"contract violations: {len(self.bugs)} exceptions/non-RGB, {len(self.too_slow)} too slow")
        for bad in (self.bugs + self.too_slow)[:20]:
            lines.append(
                f"  case {bad.case.index} ({bad.case.name}, {bad.case.mutation}): {bad.outcome} "
                f"in {bad.seconds:.2f} s {bad.detail[:200]}"
            )
        return "\n".join(lines)


def fuzz(
    count: int,
    seed: int,
    *,
    policy: ImagePolicy | None = None,
    time_limit: float = 2.0,
    corpus: dict[str, bytes] | None = None,
) -> FuzzReport:
    """Run ``count`` cases; collect outcome counts, the slowest case and every contract violation."""
    policy = policy or ImagePolicy.trusted()
    corpus = corpus or build_seed_corpus()
    outcomes: collections.Counter = collections.Counter()
    by_format: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    slowest: Outcome | None = None
    bugs: list[Outcome] = []
    too_slow: list[Outcome] = []
    start = time.perf_counter()
    for index in range(count):
        result = run_case(make_case(corpus, seed, index), policy)
        outcomes[result.outcome] += 1
        by_format[result.case.name.split("-", 1)[0]][result.outcome] += 1
        if slowest is None or result.seconds > slowest.seconds:
            slowest = result
        if result.is_bug:
            bugs.append(result)
        if result.seconds >= time_limit:
            too_slow.append(result)
    return FuzzReport(count, seed, time.perf_counter() - start, outcomes, dict(by_format), slowest, bugs, too_slow)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10_000, help="number of cases (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the run (default 0)")
    parser.add_argument("--time-limit", type=float, default=2.0, help="seconds a case may take (default 2)")
    parser.add_argument("--case", type=int, help="rerun only this case index and print its result")
    parser.add_argument("--save", type=Path, help="folder to write the data of every violating case to")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")  # Pillow warns about every damaged metadata block; the outcome is what counts

    if args.case is not None:
        case = make_case(build_seed_corpus(), args.seed, args.case)
        result = run_case(case, ImagePolicy.trusted())
        print(f"case {case.index}: {case.name}, {case.mutation}, {len(case.data)} bytes")
        print(f"-> {result.outcome} in {result.seconds * 1000:.1f} ms: {result.detail}")
        return 1 if result.is_bug or result.seconds >= args.time_limit else 0

    report = fuzz(args.count, args.seed, time_limit=args.time_limit)
    print(report.summary())
    if args.save is not None:
        args.save.mkdir(parents=True, exist_ok=True)
        for bad in report.bugs + report.too_slow:
            (args.save / f"case-{args.seed}-{bad.case.index}-{bad.case.name}.bin").write_bytes(bad.case.data)
    return 1 if report.bugs or report.too_slow else 0


if __name__ == "__main__":
    sys.exit(main())
