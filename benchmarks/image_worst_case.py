"""Hand-run benchmark: each accepted image format's costliest file under the default limits, decoded by load_image.

    nice -n 10 python benchmarks/image_worst_case.py [--only PATTERN ...] [--repeat 3] [--timeout 60] [--keep DIR]

It is not a test. For every format ``ImagePolicy()`` decodes (``DEFAULT_IMAGE_FORMATS``, and MPO, which Pillow's
JPEG opener returns for a JPEG carrying a multi-picture index) it builds the files that cost the most while staying
inside the limits (``max_bytes``, ``max_pixels``, the container walkers' counts, the JPEG scan budget): the most
pixels, the most frames, pages or chunks, the costliest filter or compression, the most bytes. Each file is loaded
with ``load_image(data, ImagePolicy())`` in a fresh child process, which reports the wall and CPU time of the call
and its peak extra resident memory (``ru_maxrss`` after the call minus before it; tracemalloc cannot see the
decoders' C allocations). A case whose cost grows faster than its bytes is also built at a few smaller sizes, so
that the growth can be read off without waiting for the full-size file. The restricted, upload and server policies
have the same byte, pixel and format limits as ``ImagePolicy()``, so one policy covers them.

Cases slower than a second are run ``--repeat`` times and the median is printed (the machine may be shared). A case
still running after ``--timeout`` seconds is killed and shown as such. ``--keep DIR`` leaves the built files there,
to reproduce a case by hand: ``load_image(Path(DIR, NAME).read_bytes(), ImagePolicy())``.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import io
import json
import math
import os
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from belle_vl_tools import images  # noqa: E402

MAX_BYTES = images.DEFAULT_MAX_BYTES
MAX_PIXELS = images.DEFAULT_MAX_PIXELS
BYTES_BUDGET = MAX_BYTES - 64 * 1024  # what a builder fills up to, leaving room for headers
SIDE_W = math.isqrt(MAX_PIXELS)
SIDE_H = MAX_PIXELS // SIDE_W  # SIDE_W x SIDE_H: the most pixels in a near-square picture (6325 x 6324)


# ---------------------------------------------------------------------------------------------------------------
# Small writers (the costliest files are malformed in ways no encoder produces, so they are assembled by hand)
# ---------------------------------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, body: bytes = b"") -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def _png_idat(width: int, height: int, depth: int, colour: int, interlace: bool, line_filter: int = 4) -> bytes:
    """Compressed scanlines of zeros, every line with ``line_filter`` (4, Paeth, is the costliest to undo)."""
    bits = depth * _PNG_CHANNELS[colour]
    packer = zlib.compressobj(9)
    out = []
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    for x0, y0, dx, dy in passes:
        pass_w, pass_h = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if pass_w <= 0 or pass_h <= 0:
            continue
        line = bytes([line_filter]) + bytes(-(-(pass_w * bits) // 8))
        for _ in range(pass_h):
            out.append(packer.compress(line))
    out.append(packer.flush())
    return b"".join(out)


def _png(
    width: int, height: int, depth: int, colour: int, *, interlace: bool = False, before_idat: bytes = b""
) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, int(interlace))
    idat = _png_idat(width, height, depth, colour, interlace)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + before_idat
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND")
    )


def _encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **params)
    return out.getvalue()


def _noise(width: int, height: int, mode: str = "RGB", mask: int = 0xFF) -> Image.Image:
    raw = os.urandom(width * height * len(mode))
    if mask != 0xFF:
        raw = raw.translate(bytes(b & mask for b in range(256)))
    return Image.frombytes(mode, (width, height), raw)


def _fill(build: Callable[[Image.Image], bytes], make: Callable[[int, int], Image.Image], levels: list) -> bytes:
    """The first of ``levels`` whose file, built from a full-size picture, fits the byte limit.

    A 1/16 crop is tried first to skip the levels that clearly do not fit."""
    crop = make(SIDE_W // 4, SIDE_H // 4)
    for level in levels:
        if len(build(crop, level)) * 16 > BYTES_BUDGET * 1.05:
            continue
        data = build(make(SIDE_W, SIDE_H), level)
        if len(data) <= MAX_BYTES:
            return data
    raise RuntimeError("no level fits the byte limit")


def _repeat_last_scan(jpeg: bytes, total_scans: int) -> bytes:
    """A progressive JPEG with its last scan repeated until it has ``total_scans`` scans."""
    last = jpeg.rindex(b"\xff\xda")
    scans = jpeg.count(b"\xff\xda")
    return jpeg[:last] + jpeg[last:-2] * (1 + total_scans - scans) + jpeg[-2:]


def _tiff(entries: list[tuple[int, int, list[int]]], tail: bytes = b"", next_ifd: int = 0) -> bytes:
    """A little-endian classic TIFF: one IFD at offset 8 (tag, type, values; SHORT=3, LONG=4), then ``tail``.

    Values that do not fit an entry are stored after the IFD; ``tail`` starts at ``tiff_tail_offset(entries)``."""
    sizes = {3: 2, 4: 4}
    ifd_end = 8 + 2 + 12 * len(entries) + 4
    extra = b""
    body = b""
    for tag, kind, values in sorted(entries):
        packed = b"".join(struct.pack("<H" if kind == 3 else "<I", v) for v in values)
        if len(packed) <= 4:
            field = packed.ljust(4, b"\0")
        else:
            field = struct.pack("<I", ifd_end + len(extra))
            extra += packed + b"\0" * (len(packed) & 1)
        body += struct.pack("<HHI", tag, kind, len(values)) + field
        assert sizes[kind]
    return (
        b"II*\0"
        + struct.pack("<I", 8)
        + struct.pack("<H", len(entries))
        + body
        + struct.pack("<I", next_ifd)
        + extra
        + tail
    )


def _tiff_tail_offset(entries: list[tuple[int, int, list[int]]]) -> int:
    return len(_tiff(entries))


def _bmp(width: int, height: int, bits: int, compression: int, palette: int, pixels: bytes) -> bytes:
    offset = 14 + 40 + 4 * palette
    header = struct.pack("<IiiHHIIiiII", 40, width, height, 1, bits, compression, len(pixels), 2835, 2835, palette, 0)
    colours = b"".join(bytes((i * 17 % 256, i * 5 % 256, i * 3 % 256, 0)) for i in range(palette))
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + header + colours + pixels


# ---------------------------------------------------------------------------------------------------------------
# The cases
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], bytes]
    what: str


def _png_cases() -> Iterator[Case]:
    yield Case(
        "png-rgba16-adam7",
        lambda: _png(SIDE_W, SIDE_H, 16, 6, interlace=True),
        "40 MP, 16-bit RGBA, Adam7 interlaced, Paeth on every line, transparent (composited on white)",
    )
    yield Case("png-rgb8", lambda: _png(SIDE_W, SIDE_H, 8, 2), "40 MP, 8-bit RGB, Paeth on every line")

    def many_idat() -> bytes:
        still = _png(SIDE_W, SIDE_H, 8, 2)
        at = still.index(b"IDAT") - 4
        empty = _png_chunk(b"IDAT")
        return still[:at] + empty * ((BYTES_BUDGET - len(still)) // len(empty)) + still[at:]

    yield Case("png-empty-idat-chunks", many_idat, "40 MP RGB after 1.7 million empty IDAT chunks (bytes limit)")

    def private_chunks(count: int) -> Callable[[], bytes]:
        return lambda: _png(SIDE_W, SIDE_H, 8, 0, before_idat=_png_chunk(b"prIv") * count)

    yield Case(
        "png-private-chunks",
        private_chunks((BYTES_BUDGET - 100_000) // 12),
        "40 MP gray after 1.7 million empty private chunks (Pillow keeps each in im.private_chunks)",
    )

    def apng() -> bytes:
        width, height = SIDE_W, SIDE_H
        frames = 99_990  # the header walker looks at 200,000 chunks (two per frame)
        one = zlib.compress(b"\x00\x00\x00\x00\x00")
        parts = [
            _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)),
            _png_chunk(b"acTL", struct.pack(">II", frames, 0)),
            _png_chunk(b"fcTL", struct.pack(">IIIIIHHBB", 0, width, height, 0, 0, 1, 10, 0, 0)),
            _png_chunk(b"IDAT", _png_idat(width, height, 8, 6, False)),
        ]
        seq = 1
        for _ in range(frames - 1):
            parts.append(_png_chunk(b"fcTL", struct.pack(">IIIIIHHBB", seq, 1, 1, 0, 0, 1, 10, 0, 0)))
            parts.append(_png_chunk(b"fdAT", struct.pack(">I", seq + 1) + one))
            seq += 2
        return b"\x89PNG\r\n\x1a\n" + b"".join(parts) + _png_chunk(b"IEND")

    yield Case("apng-frames", apng, "APNG: 40 MP RGBA first frame, 99,990 frames (the walker's 200,000 chunks)")


def _jpeg_cases() -> Iterator[Case]:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate, so the loader transposes the whole picture

    def baseline() -> bytes:
        build = lambda im, q: _encode(im, "JPEG", quality=q, subsampling=0, exif=exif.tobytes())  # noqa: E731
        return _fill(build, _noise, [95, 90, 80, 70, 60, 50, 40, 30, 20, 10, 5])

    yield Case("jpeg-baseline", baseline, "40 MP noise, 4:4:4, the highest quality under 20 MiB, EXIF rotation")

    def progressive_at_budget() -> bytes:
        scans = images.JPEG_FREE_SCANS + images.JPEG_MAX_EXTRA_PIXEL_SCANS // (SIDE_W * SIDE_H)

        def build(im: Image.Image, q: int) -> bytes:
            jpeg = _encode(im, "JPEG", quality=q, subsampling=0, progressive=True, bufsize=4 * im.width * im.height)
            return _repeat_last_scan(jpeg, scans)

        return _fill(build, _noise, [90, 80, 70, 60, 50, 40, 30, 20, 10, 5])

    yield Case(
        "jpeg-progressive-budget",
        progressive_at_budget,
        "40 MP noise, progressive, 22 scans (the scan budget's edge), under 20 MiB",
    )

    def progressive_small_budget() -> bytes:
        side = 4000
        scans = images.JPEG_FREE_SCANS + images.JPEG_MAX_EXTRA_PIXEL_SCANS // (side * side)
        jpeg = _encode(Image.new("RGB", (side, side), (220, 20, 30)), "JPEG", quality=90, progressive=True)
        return _repeat_last_scan(jpeg, scans)

    yield Case("jpeg-progressive-16mp-37-scans", progressive_small_budget, "16 MP flat, 37 scans (budget's edge)")
    yield Case(
        "jpeg-scan-bomb",
        lambda: _repeat_last_scan(
            _encode(Image.new("RGB", (4000, 4000), (220, 20, 30)), "JPEG", quality=90, progressive=True), 2010
        ),
        "16 MP, 2,010 scans: must be refused",
    )

    def markers() -> bytes:
        jpeg = _encode(Image.new("RGB", (8, 8), (220, 20, 30)), "JPEG")
        empty_app = b"\xff\xe5\x00\x02"
        return jpeg[:2] + empty_app * ((BYTES_BUDGET - len(jpeg)) // 4) + jpeg[2:]

    yield Case("jpeg-empty-app-markers", markers, "8x8 after 5 million empty APP5 markers (Pillow lists each)")

    for repeats in (100, 400):
        yield Case(
            f"mpo-scan-bomb-{repeats}",
            (lambda r: lambda: mpo_scan_bomb(4000, r))(repeats),
            f"16 MP progressive JPEG, {repeats + 10} scans, with a 2-picture MPO index (as JPEG: refused)",
        )


def mpo_scan_bomb(side: int, repeats: int) -> bytes:
    """A progressive JPEG with ``repeats`` extra copies of its last scan, inside a two-picture MPO file.

    Pillow's JPEG opener returns such a file as format "MPO"; the second picture's offset is kept right."""
    picture = Image.new("RGB", (side, side), (220, 20, 30))
    data = _encode(picture, "MPO", save_all=True, append_images=[picture.resize((8, 8))], progressive=True)
    with Image.open(io.BytesIO(data)) as probe:
        relative = probe.mpinfo[0xB002][1]["DataOffset"]  # from the MP header
        start = probe._MpoImageFile__mpoffsets[1]  # from the file's start
    first, second = data[:start], data[start:]
    last = first.rindex(b"\xff\xda")
    bigger = first[:last] + first[last:-2] * (repeats + 1) + first[-2:]
    grown = len(bigger) - len(first)
    for order in (">I", "<I"):
        old, new = struct.pack(order, relative), struct.pack(order, relative + grown)
        head = bigger[: bigger.index(b"\xff\xda")]
        if head.count(old) == 1:
            bigger = bigger.replace(old, new, 1)
            break
    return bigger + second


def _gif_cases() -> Iterator[Case]:
    one_pixel = b",\0\0\0\0\x01\0\x01\0\0\x02\x02\x44\x01\0"  # a 1x1 frame: clear, 0, end-of-information

    def frames() -> bytes:
        first = _encode(Image.new("P", (SIDE_W, SIDE_H), 0), "GIF")
        return first[:-1] + one_pixel * ((BYTES_BUDGET - len(first)) // len(one_pixel)) + b";"

    yield Case("gif-frames", frames, "40 MP first frame, then 1.4 million 1x1 frames (bytes limit)")

    tiny = _encode(Image.new("P", (1, 1), 0), "GIF")
    at = tiny.index(b",")

    def extension(label: int, size: int) -> bytes:
        return tiny[:at] + b"!" + bytes([label]) + b"\x01x" * ((size - len(tiny)) // 2) + b"\0" + tiny[at:]

    yield Case(
        "gif-extension-subblocks",
        lambda: extension(0x01, BYTES_BUDGET),
        "1x1, one plain-text extension of 10 million 1-byte sub-blocks (bytes limit)",
    )
    for mib in (0.25, 0.5, 1, 2):
        yield Case(
            f"gif-comment-{mib:g}mib",
            (lambda m: lambda: extension(0xFE, int(m * 1024 * 1024)))(mib),
            f"1x1, one comment extension of {mib:g} MiB in 1-byte sub-blocks (Pillow joins them one by one)",
        )


def _webp_riff(chunks: list[bytes]) -> bytes:
    body = b"WEBP" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _riff_chunk(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("<I", len(body)) + body + b"\0" * (len(body) & 1)


def _vp8l_chunk(image: Image.Image) -> bytes:
    data = _encode(image, "WEBP", lossless=True, method=0, quality=0)
    at = data.index(b"VP8L")
    size = struct.unpack("<I", data[at + 4 : at + 8])[0]
    return data[at : at + 8 + size + (size & 1)]


def _webp_cases() -> Iterator[Case]:
    yield Case(
        "webp-lossy",
        lambda: _fill(
            lambda im, q: _encode(im, "WEBP", quality=q, method=0), _noise, [100, 95, 90, 80, 70, 60, 50, 40, 30, 20]
        ),
        "40 MP noise, lossy, the highest quality under 20 MiB",
    )
    yield Case(
        "webp-lossless",
        lambda: _fill(
            lambda im, _: _encode(im, "WEBP", lossless=True, method=0, quality=0),
            lambda w, h: _noise(w, h, "RGB", 0x01),
            [0],
        ),
        "40 MP RGB noise of 1 bit a channel, lossless (about 15 MiB)",
    )

    def animated() -> bytes:
        width, height = SIDE_W, SIDE_H
        big = _vp8l_chunk(Image.new("RGBA", (width, height), (220, 20, 30, 128)))
        small = _vp8l_chunk(Image.new("RGBA", (1, 1), (0, 0, 0, 0)))

        def frame(w: int, h: int, bitstream: bytes) -> bytes:
            fields = (0).to_bytes(3, "little") * 2 + (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little")
            return _riff_chunk(b"ANMF", fields + (10).to_bytes(3, "little") + b"\x00" + bitstream)

        vp8x = bytes([0x12, 0, 0, 0]) + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
        one = frame(1, 1, small)
        head = [_riff_chunk(b"VP8X", vp8x), _riff_chunk(b"ANIM", b"\xff\xff\xff\xff\0\0"), frame(width, height, big)]
        count = (BYTES_BUDGET - sum(map(len, head))) // len(one)
        return _webp_riff(head + [one] * count)

    yield Case("webp-animated", animated, "40 MP canvas, translucent first frame, then 1x1 frames (bytes limit)")


def _bmp_cases() -> Iterator[Case]:
    def raw24() -> bytes:
        side = math.isqrt(BYTES_BUDGET // 3)
        return _encode(_noise(side, side), "BMP")

    yield Case("bmp-24bit", raw24, "uncompressed 24-bit noise up to the bytes limit (7 MP)")
    yield Case("bmp-1bit", lambda: _encode(_noise(SIDE_W, SIDE_H, "L").convert("1"), "BMP"), "40 MP, 1 bit a pixel")
    yield Case(
        "bmp-rle8-end-of-lines",
        lambda: _bmp(SIDE_W, SIDE_H, 8, 1, 256, b"\1\0\0\0" * SIDE_H + b"\0\1"),
        "40 MP RLE8: each line one pixel and an end-of-line code (25 KB; Pillow pads each line pixel by pixel)",
    )

    def rle4_runs() -> bytes:
        line = b"".join(bytes((min(255, SIDE_W - x), 0x12)) for x in range(0, SIDE_W, 255)) + b"\0\0"
        return _bmp(SIDE_W, SIDE_H, 4, 2, 16, line * SIDE_H + b"\0\1")

    yield Case("bmp-rle4-runs", rle4_runs, "40 MP RLE4 in runs of 255 (Pillow expands each run pixel by pixel)")

    def rle8_literal() -> bytes:
        width = 2 * 255 * 12
        line = (b"\0\xff" + os.urandom(255) + b"\0") * 12 + b"\0\0"
        height = min((BYTES_BUDGET - 2000) // len(line), MAX_PIXELS // width)
        return _bmp(width, height, 8, 1, 256, line * height + b"\0\1")

    yield Case("bmp-rle8-literal", rle8_literal, "RLE8 in absolute (literal) runs up to the bytes limit")


def _tiff_cases() -> Iterator[Case]:
    yield Case(
        "tiff-raw-rgb", lambda: _encode(_noise(2640, 2640), "TIFF"), "uncompressed RGB noise, 7 MP (bytes limit)"
    )
    flat = (220, 20, 30)
    for compression in ("tiff_deflate", "tiff_lzw", "packbits", "jpeg", "webp", "zstd", "lzma"):
        side = (2640, 2640) if compression == "packbits" else (SIDE_W, SIDE_H)  # Pillow's packbits: 1 byte a byte

        def build(c: str = compression, size: tuple[int, int] = side) -> bytes:
            return _encode(Image.new("RGB", size, flat), "TIFF", compression=c)

        yield Case(f"tiff-{compression}", build, f"{side[0] * side[1] / 1e6:.0f} MP flat RGB, {compression} (libtiff)")

    def pages() -> bytes:
        first = Image.new("RGB", (SIDE_W, SIDE_H), flat)
        rest = [Image.new("RGB", (1, 1), flat)] * 4095
        return _encode(first, "TIFF", compression="tiff_deflate", save_all=True, append_images=rest)

    yield Case("tiff-4096-pages", pages, "40 MP deflate first page, then 4,095 more pages (the walker's limit)")

    def many_strips(count: int) -> bytes:
        entries = [(256, 3, [1]), (257, 3, [2]), (258, 3, [8]), (259, 3, [1]), (262, 3, [1])]
        entries += [(277, 3, [1]), (278, 3, [1]), (279, 3, [1])]
        pixels_at = 1000  # inside the strip offsets: any byte will do for a gray pixel
        return _tiff([*entries, (273, 3, [pixels_at] * count)])

    for count in (100_000, 1_000_000, (BYTES_BUDGET - 1000) // 2):
        yield Case(
            f"tiff-many-strips-{count // 100_000 / 10:g}m",
            (lambda n: lambda: many_strips(n))(count),
            f"1x2 gray, uncompressed, {count:,} strip offsets (SHORT: 2 bytes each)",
        )

    for per_page in (10_000, 100_000):
        yield Case(
            f"tiff-overlapping-ifds-{per_page // 1000}k",
            (lambda n: lambda: overlapping_ifds(n))(per_page),
            f"1x1 page, then 4,095 overlapping IFDs of {per_page:,} entries each ({12 * (per_page + 4096):,} bytes)",
        )
    for scans in (20, 99):  # libtiff refuses a JPEG strip of 100 scans or more
        yield Case(
            f"tiff-jpeg-progressive-{scans}-scans",
            (lambda s: lambda: progressive_jpeg_tiff(SIDE_W, SIDE_H, 512, s))(scans),
            f"40 MP YCbCr TIFF in JPEG strips of 512 lines, each strip a progressive JPEG of {scans} scans",
        )


def overlapping_ifds(per_page: int, pages: int = 4095) -> bytes:
    """A valid 1x1 TIFF page followed by ``pages`` IFDs 12 bytes apart, each claiming ``per_page`` entries.

    The IFDs overlap, so the file is small while a reader visiting each IFD's entries does pages x per_page work."""
    base = [(256, 3, [1]), (257, 3, [1]), (258, 3, [8]), (259, 3, [1]), (262, 3, [1])]
    base += [(273, 4, [0]), (277, 3, [1]), (278, 3, [1]), (279, 4, [1])]
    start = _tiff_tail_offset(base) + 2  # chain offset, 2 mod 4: no pointer below reads as tag 256 or 257
    start += (2 - start) % 4
    slots = bytearray(12 * (per_page + pages) + 16)
    for slot in range(pages):
        struct.pack_into("<H", slots, 12 * slot, per_page)
    for k in range(pages):
        following = start + 12 * (k + 1) if k < pages - 1 else 0
        struct.pack_into("<I", slots, 12 * (k + per_page) + 2, following)
    entries = [(t, k, v if t != 273 else [start - 2]) for t, k, v in base]
    data = _tiff(entries, next_ifd=start)
    pad = start - len(data)
    return data + b"\0" * pad + bytes(slots)


def progressive_jpeg_tiff(width: int, height: int, rows: int, scans: int) -> bytes:
    """A YCbCr TIFF whose JPEG strips are each a whole progressive JPEG of ``scans`` scans (4:4:4)."""
    strips = []
    for top in range(0, height, rows):
        strip = Image.new("RGB", (width, min(rows, height - top)), (220, 20, 30))
        strips.append(_repeat_last_scan(_encode(strip, "JPEG", quality=90, subsampling=0, progressive=True), scans))
    entries = [
        (256, 4, [width]),
        (257, 4, [height]),
        (258, 3, [8, 8, 8]),
        (259, 3, [7]),
        (262, 3, [6]),
        (277, 3, [3]),
        (278, 4, [rows]),
        (279, 4, [len(s) for s in strips]),
        (284, 3, [1]),
        (530, 3, [1, 1]),
        (273, 4, [0] * len(strips)),
    ]
    at = _tiff_tail_offset(entries)
    offsets, position = [], at
    for s in strips:
        offsets.append(position)
        position += len(s)
    entries[-1] = (273, 4, offsets)
    assert _tiff_tail_offset(entries) == at
    return _tiff(entries, tail=b"".join(strips))


def _ico_cases() -> Iterator[Case]:
    def ico(icon: bytes, count: int, side: int) -> bytes:
        dim = 0 if side >= 256 else side
        directory = struct.pack("<BBBBHHII", dim, dim, 0, 0, 1, 32, len(icon), 6 + 16 * count) * count
        return struct.pack("<HHH", 0, 1, count) + directory + icon

    yield Case("ico-png-40mp", lambda: ico(_png(SIDE_W, SIDE_H, 8, 6), 1, 256), "one icon: an embedded 40 MP RGBA PNG")

    for chunks in (2_000, 20_000, 199_990):
        yield Case(
            f"ico-4096-icons-png-{chunks // 1000}k-chunks",
            (lambda c: lambda: ico(_png(16, 16, 8, 6, before_idat=_png_chunk(b"prIv") * c), 4096, 16))(chunks),
            f"4,096 icon entries naming one 16x16 PNG that has {chunks:,} empty chunks before its pixels",
        )


def _ppm_cases() -> Iterator[Case]:
    side = math.isqrt(BYTES_BUDGET // 3)
    yield Case("ppm-p6", lambda: b"P6 %d %d 255\n" % (side, side) + os.urandom(side * side * 3), "raw RGB, 7 MP")
    side16 = math.isqrt(BYTES_BUDGET // 2)
    yield Case(
        "ppm-p5-16bit", lambda: b"P5 %d %d 65535\n" % (side16, side16) + os.urandom(side16**2 * 2), "16-bit gray, 10 MP"
    )
    yield Case(
        "ppm-p4", lambda: b"P4 %d %d\n" % (SIDE_W, SIDE_H) + os.urandom(-(-SIDE_W // 8) * SIDE_H), "40 MP, 1 bit"
    )
    plain_side = math.isqrt(BYTES_BUDGET // 2)
    yield Case(
        "ppm-p2-plain",
        lambda: b"P2 %d %d 255\n" % (plain_side, plain_side) + b"7 " * plain_side**2,
        "plain (ASCII) gray, 10 million one-digit values (bytes limit)",
    )
    yield Case(
        "ppm-p1-plain",
        lambda: b"P1 %d %d\n" % (4400, BYTES_BUDGET // 4400) + b"01" * (BYTES_BUDGET // 2),
        "plain (ASCII) bitmap, 20 million pixels without separators (bytes limit)",
    )
    pfm_side = math.isqrt(BYTES_BUDGET // 4)
    yield Case(
        "pfm",
        lambda: b"Pf\n%d %d\n-1.0\n" % (pfm_side, pfm_side) + os.urandom(pfm_side**2 * 4),
        "float gray (PFM, random bits: NaN and infinities included), 5 MP",
    )


def _avif_cases() -> Iterator[Case]:
    yield Case(
        "avif-40mp",
        lambda: _encode(Image.new("RGB", (SIDE_W, SIDE_H), (220, 20, 30)), "AVIF", quality=50, speed=10),
        "40 MP flat RGB (aom at speed 10; decoded by dav1d)",
    )
    yield Case(
        "avif-noise-4mp",
        lambda: _encode(_noise(2000, 2000), "AVIF", quality=90, speed=10),
        "4 MP noise at quality 90 (what AV1 decoding costs per byte; 40 MP of noise takes too long to encode)",
    )


def all_cases() -> list[Case]:
    groups = (_png_cases, _jpeg_cases, _gif_cases, _webp_cases, _bmp_cases, _tiff_cases, _ico_cases, _ppm_cases)
    return [case for group in (*groups, _avif_cases) for case in group()]


# ---------------------------------------------------------------------------------------------------------------
# Measuring (in a child process per case, so that each peak RSS is its own)
# ---------------------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    """A memory figure of this process from /proc/self/status (Linux), in KiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> int:
    """This process's resident memory now (KiB), with its peak reset to it where Linux allows.

    ``ru_maxrss`` is no use here: Linux carries it over ``exec`` from the forked parent, so a child of a large parent
    would report the parent's size. ``VmHWM`` belongs to the new program's memory and "5" in clear_refs resets it."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    now = _status_kib("VmRSS")
    return now if now is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak() -> int:
    peak = _status_kib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _child(path: str) -> None:
    from belle_vl_tools.errors import ImageError
    from belle_vl_tools.images import ImagePolicy, load_image

    policy = ImagePolicy()
    load_image(_encode(Image.new("RGB", (4, 4)), "PNG"), policy)  # plugins imported, the bomb hook installed
    data = Path(path).read_bytes()
    before = _reset_peak()
    cpu = time.process_time()
    wall = time.perf_counter()
    outcome, size = "ok", None
    try:
        picture = load_image(data, policy)
        size = picture.size
    except ImageError as exc:
        outcome = f"refused: {type(exc).__name__}: {str(exc)[:150]}"
    wall = time.perf_counter() - wall
    cpu = time.process_time() - cpu
    extra = _peak() - before
    print(json.dumps({"outcome": outcome, "size": size, "wall": wall, "cpu": cpu, "rss_kib": extra}))


def _measure(path: Path, timeout: float) -> dict:
    command = [sys.executable, __file__, "--child", str(path)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"outcome": f"killed after {timeout:g} s", "size": None, "wall": timeout, "cpu": None, "rss_kib": None}
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["?"]
        return {"outcome": f"crashed ({done.returncode}): {tail[0][:150]}", "size": None, "wall": None, "cpu": None}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _row(case: Case, data_len: int, runs: list[dict]) -> str:
    first = runs[0]
    walls = [r["wall"] for r in runs if r.get("wall") is not None]
    cpus = [r["cpu"] for r in runs if r.get("cpu") is not None]
    rss = [r["rss_kib"] for r in runs if r.get("rss_kib") is not None]  # the highest: a peak is a maximum
    size = first.get("size")
    pixels = f"{size[0] * size[1] / 1e6:.2f}" if size else "-"
    wall = f"{statistics.median(walls):.2f}" if walls else "-"
    cpu = f"{statistics.median(cpus):.2f}" if cpus else "-"
    mib = max(rss) / 1024 if rss else None
    many = size is not None and size[0] * size[1] >= 10_000  # bytes a pixel of a few pixels says nothing
    per_pixel = f"{mib * 2**20 / (size[0] * size[1]):.1f}" if mib is not None and many else "-"
    outcome = (
        first["outcome"]
        if first["outcome"] == "ok" or first["outcome"].startswith(("killed", "crash"))
        else (first["outcome"].split(":")[0] + ": " + first["outcome"].split(":")[1].strip())
    )
    memory = f"{mib:.0f}" if mib is not None else "-"
    return (
        f"| {case.name} | {data_len:,} | {pixels} | {wall} | {cpu} | {memory} | {per_pixel} | {len(runs)} | {outcome} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=[], help="fnmatch patterns of case names, e.g. 'tiff-*'")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each case slower than a second (median)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a case's child is killed")
    parser.add_argument("--keep", type=Path, help="folder to keep the built files in")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child)
        return
    cases = [c for c in all_cases() if not args.only or any(fnmatch.fnmatch(c.name, p) for p in args.only)]
    if args.list:
        for case in cases:
            print(f"{case.name}: {case.what}")
        return
    folder = args.keep or Path(tempfile.mkdtemp(prefix="image-worst-case-"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"Pillow {Image.__version__}; limits: {MAX_BYTES:,} bytes, {MAX_PIXELS:,} pixels; {os.cpu_count()} CPUs")
    print("| case | bytes | MP decoded | wall s | CPU s | peak extra RSS MiB | RSS bytes/pixel | runs | outcome |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    try:
        for case in cases:
            path = folder / case.name
            if not path.exists():
                try:
                    data = case.build()
                except Exception as exc:  # a codec this Pillow lacks
                    print(f"| {case.name} | - | - | - | - | - | - | 0 | not built: {type(exc).__name__}: {exc} |")
                    continue
                if len(data) > MAX_BYTES:
                    print(f"| {case.name} | {len(data):,} | - | - | - | - | - | 0 | over the bytes limit: fix |")
                    continue
                path.write_bytes(data)
                del data
            runs = [_measure(path, args.timeout)]
            slow = runs[0].get("wall") is not None and runs[0]["wall"] > 1.0
            if slow and not runs[0]["outcome"].startswith("killed"):
                runs += [_measure(path, args.timeout) for _ in range(args.repeat - 1)]
            print(_row(case, path.stat().st_size, runs), flush=True)
    finally:
        if args.keep is None:
            for path in folder.iterdir():
                path.unlink()
            folder.rmdir()


if __name__ == "__main__":
    main()
