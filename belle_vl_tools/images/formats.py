"""Header probes of image containers: frame, page and icon sizes read from the bytes before anything is decoded,
and hints for data that is not an image at all. Pure functions of bytes; the limits are applied in ``decode``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Literal

_MAX_CONTAINER_ENTRIES = 4096  # icons, pages, frames or chunks looked at per file; more pages/icons are refused
_MAX_CHUNKS = 200_000  # PNG chunks / GIF blocks walked at most (a guard against pathological files)


def _u16le(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 2], "little")


def _u24le(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 3], "little")


def _u32le(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 4], "little")


def _u32be(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 4], "big")


def _png_frames(data: bytes, start: int = 0) -> Iterator[tuple[str, int, int]]:
    """IHDR and (for APNG) every fcTL frame size of the PNG starting at ``start``."""
    if data[start : start + 8] != b"\x89PNG\r\n\x1a\n":
        return
    offset = start + 8
    animated = False
    for _ in range(_MAX_CHUNKS):
        if offset + 8 > len(data):
            return
        length = _u32be(data, offset)
        kind = data[offset + 4 : offset + 8]
        body = offset + 8
        if kind == b"IHDR" and length >= 8:
            yield "the PNG header", _u32be(data, body), _u32be(data, body + 4)
        elif kind == b"acTL":
            animated = True
        elif kind == b"fcTL" and length >= 12:
            yield "an APNG frame", _u32be(data, body + 4), _u32be(data, body + 8)
        elif kind == b"IDAT" and not animated:
            return  # a still PNG: nothing after the pixel data is decoded
        elif kind == b"IEND":
            return
        offset = body + length + 4


def _gif_frames(data: bytes) -> Iterator[tuple[str, int, int]]:
    """The logical screen and every frame of a GIF (a frame reaching past the screen grows Pillow's canvas)."""
    if len(data) < 13 or data[:6] not in (b"GIF87a", b"GIF89a"):
        return
    screen_w, screen_h = _u16le(data, 6), _u16le(data, 8)
    yield "the GIF screen", screen_w, screen_h
    flags = data[10]
    offset = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    steps = 0
    while offset < len(data) and steps < _MAX_CHUNKS:
        steps += 1
        marker = data[offset]
        if marker == 0x2C:  # image descriptor
            if offset + 10 > len(data):
                return
            left, top = _u16le(data, offset + 1), _u16le(data, offset + 3)
            width, height = _u16le(data, offset + 5), _u16le(data, offset + 7)
            yield "a GIF frame", max(screen_w, left + width), max(screen_h, top + height)
            local = data[offset + 9]
            offset += 10 + (3 << ((local & 7) + 1) if local & 0x80 else 0) + 1  # + LZW minimum code size
        elif marker == 0x21:  # extension: label, then sub-blocks
            offset += 2
        elif marker == 0x3B:  # trailer
            return
        else:
            return  # damaged: Pillow decides
        while offset < len(data) and steps < _MAX_CHUNKS:  # sub-blocks up to the zero-length terminator
            steps += 1
            size = data[offset]
            offset += 1 + size
            if size == 0:
                break


def _webp_frames(data: bytes) -> Iterator[tuple[str, int, int]]:
    """The canvas, every animation frame and every bitstream size of a WebP file."""
    if len(data) < 16 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return
    offset = 12
    for _ in range(_MAX_CONTAINER_ENTRIES):
        if offset + 8 > len(data):
            return
        kind, length = data[offset : offset + 4], _u32le(data, offset + 4)
        body = offset + 8
        if kind == b"VP8X" and length >= 10:
            yield "the WebP canvas", _u24le(data, body + 4) + 1, _u24le(data, body + 7) + 1
        elif kind == b"ANMF" and length >= 16:
            yield "a WebP animation frame", _u24le(data, body + 6) + 1, _u24le(data, body + 9) + 1
        elif kind == b"VP8 " and length >= 10 and data[body + 3 : body + 6] == b"\x9d\x01\x2a":
            yield "the WebP picture", _u16le(data, body + 6) & 0x3FFF, _u16le(data, body + 8) & 0x3FFF
        elif kind == b"VP8L" and length >= 5 and data[body] == 0x2F:
            bits = _u32le(data, body + 1)
            yield "the WebP picture", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        offset = body + length + (length & 1)


def _ico_frames(data: bytes) -> Iterator[tuple[str, int, int]]:
    """Every icon of an ICO/CUR file, read from the icon's own header (embedded PNG or BMP), not the directory."""
    if len(data) < 6 or data[:2] != b"\x00\x00" or _u16le(data, 2) not in (1, 2):
        return
    count = _u16le(data, 4)
    if count > _MAX_CONTAINER_ENTRIES:
        raise _TooManyFrames("icons", count)
    pngs: dict[int, list[tuple[int, int]]] = {}  # each embedded PNG walked once, however many entries name it
    for index in range(count):
        entry = 6 + 16 * index
        if entry + 16 > len(data):
            return
        offset = _u32le(data, entry + 12)
        head = data[offset : offset + 24]
        if head[:8] == b"\x89PNG\r\n\x1a\n":
            if offset not in pngs:
                pngs[offset] = [(w, h) for _, w, h in _png_frames(data, offset)]
            yield from ((f"icon {index + 1} (an embedded PNG)", w, h) for w, h in pngs[offset])
        elif len(head) >= 12:
            width = abs(int.from_bytes(head[4:8], "little", signed=True))
            height = abs(int.from_bytes(head[8:12], "little", signed=True))
            yield f"icon {index + 1} (an embedded bitmap)", width, height


def _tiff_frames(data: bytes) -> Iterator[tuple[str, int, int]]:
    """The size of every page (IFD) of a TIFF file, classic or BigTIFF."""
    orders: dict[bytes, Literal["little", "big"]] = {b"II": "little", b"MM": "big"}
    order = orders.get(data[:2])
    if order is None or len(data) < 8:
        return
    magic = int.from_bytes(data[2:4], order)
    if magic == 42:
        big, offset = False, int.from_bytes(data[4:8], order)
    elif magic == 43 and len(data) >= 16:
        big, offset = True, int.from_bytes(data[8:16], order)
    else:
        return
    count_size, entry_size, next_size = (8, 20, 8) if big else (2, 12, 4)
    types = {3: 2, 4: 4, 16: 8}  # SHORT, LONG, LONG8: the value sits in the entry
    seen: set[int] = set()
    page = walked = 0
    while offset and offset not in seen and offset + count_size <= len(data):
        seen.add(offset)
        page += 1
        if page > _MAX_CONTAINER_ENTRIES:
            raise _TooManyFrames("pages", page)
        entries = int.from_bytes(data[offset : offset + count_size], order)
        start = offset + count_size
        end = start + entries * entry_size
        if end + next_size > len(data) or entries > 100_000:
            return
        walked += end + next_size - offset
        if walked > len(data):  # directories that do not overlap fit in the file, so these share bytes
            raise _BadContainer("a TIFF whose directories (IFDs) overlap one another, which no encoder writes")
        size = {256: 0, 257: 0, 277: 1, 278: 0, 322: 0, 323: 0}
        counts = {273: 0, 324: 0}  # strip and tile offsets
        for at in range(start, end, entry_size):
            tag = int.from_bytes(data[at : at + 2], order)
            if tag in counts:
                counts[tag] = int.from_bytes(data[at + 4 : at + (12 if big else 8)], order)
            width = types.get(int.from_bytes(data[at + 2 : at + 4], order))
            if tag in size and width is not None:
                value_at = at + (12 if big else 8)
                size[tag] = int.from_bytes(data[value_at : value_at + width], order)
        _check_tiff_pieces(page, size, counts)
        yield f"page {page}", size[256], size[257]
        offset = int.from_bytes(data[end : end + next_size], order)


def _check_tiff_pieces(page: int, size: dict[int, int], counts: dict[int, int]) -> None:
    """Refuse a TIFF page with more strips or tiles than its size needs: Pillow makes one tile per offset."""
    width, height, samples = size[256], size[257], max(1, size[277])
    if counts[273] > max(1, height) * samples:
        raise _BadContainer(
            f"a TIFF whose page {page} is {width}x{height} pixels in {counts[273]:,} strips, more strips than "
            "it has rows"
        )
    tile_w, tile_h = size[322], size[323]
    grid = -(-width // tile_w) * -(-height // tile_h) * samples if tile_w and tile_h else max(1, width * height)
    if counts[324] > max(1, grid):
        raise _BadContainer(
            f"a TIFF whose page {page} is {width}x{height} pixels in {counts[324]:,} tiles, more tiles than its "
            "tiling grid holds"
        )


class _BadContainer(Exception):
    """A container whose headers are built to cost far more to read than their bytes: the message says how."""


#: Most APPn/COM markers a JPEG may have before its first scan: Pillow keeps every one in a list (millions of empty
#: ones fit in the byte limit and take seconds and hundreds of MiB); encoders write a handful.
JPEG_MAX_MARKERS = 4096
#: Most sub-blocks one GIF extension may have: Pillow joins a comment's sub-blocks in quadratic time (a comment of
#: 1-byte sub-blocks within the byte limit would take hours); real extensions (XMP included) have a few hundred.
GIF_MAX_EXTENSION_SUB_BLOCKS = 4096


def _jpeg_parse_problem(data: bytes) -> str | None:
    """Say what is wrong with a JPEG's marker segments before the first scan, or None (headers only)."""
    offset, markers = 2, 0
    while offset + 4 <= len(data) and data[offset] == 0xFF:
        code = data[offset + 1]
        if code == 0xFF:  # fill byte
            offset += 1
            continue
        if code == 0xDA or code == 0xD9:  # start of scan or end of image: the header is over
            return None
        if 0xE0 <= code <= 0xEF or code == 0xFE:
            markers += 1
            if markers > JPEG_MAX_MARKERS:
                return (
                    f"a JPEG with more than {JPEG_MAX_MARKERS:,} metadata (APP/COM) markers, far more than an "
                    "encoder writes (a handful)"
                )
        offset += 2 + int.from_bytes(data[offset + 2 : offset + 4], "big")
    return None


def _gif_parse_problem(data: bytes) -> str | None:
    """Say what is wrong with a GIF's extension blocks before the first frame, or None (headers only)."""
    if len(data) < 13:
        return None
    flags = data[10]
    offset = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    while offset + 1 < len(data) and data[offset] == 0x21:  # extensions before the first image descriptor
        offset += 2
        blocks = 0
        while offset < len(data):
            size = data[offset]
            offset += 1 + size
            if size == 0:
                break
            blocks += 1
            if blocks > GIF_MAX_EXTENSION_SUB_BLOCKS:
                return (
                    f"a GIF with an extension (comment or metadata) split into more than "
                    f"{GIF_MAX_EXTENSION_SUB_BLOCKS:,} sub-blocks, far more than an encoder writes"
                )
    return None


def _parse_problem(data: bytes) -> str | None:
    """What makes a file's headers too costly for Pillow to parse, found before Pillow opens it; None if nothing."""
    if data[:2] == b"\xff\xd8":
        return _jpeg_parse_problem(data)
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return _gif_parse_problem(data)
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        try:
            for _ in _tiff_frames(data):
                pass
        except _BadContainer as exc:
            return str(exc)
        except _TooManyFrames:
            return None  # refused, with its own message, once Pillow has identified the file
    return None


class _TooManyFrames(Exception):
    def __init__(self, what: str, count: int) -> None:
        super().__init__(f"{count} {what}")
        self.what = what
        self.count = count


_FRAME_WALKERS: dict[str, Callable[[bytes], Iterator[tuple[str, int, int]]]] = {
    "PNG": _png_frames,
    "GIF": _gif_frames,
    "WEBP": _webp_frames,
    "ICO": _ico_frames,
    "CUR": _ico_frames,
    "TIFF": _tiff_frames,
}


def _sniff_hint(data: bytes) -> str:
    head = bytes(data[:256]).lstrip()
    lower = head.lower()
    if lower.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return " It looks like an HTML page, not an image (a URL may point to a web page instead of the image file)."
    if b"<svg" in lower:
        return " It looks like an SVG (vector) image, which is not supported: rasterize it to PNG first."
    if lower.startswith(b"%pdf"):
        return " It looks like a PDF document: render the page to PNG first."
    if lower.startswith(b"%!ps"):
        return " It looks like PostScript/EPS, which is not decoded (it would run Ghostscript): convert it to PNG."
    if lower.startswith((b"{", b"[")):
        return " It looks like JSON text, not an image."
    if lower.startswith(b"pk\x03\x04"):
        return " It looks like a ZIP archive, not an image."
    if head and all(32 <= c < 127 or c in (9, 10, 13) for c in head):
        return " It looks like plain text, not an image."
    return ""
