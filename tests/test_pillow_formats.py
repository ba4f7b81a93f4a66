"""Every format Pillow opens reaches the loader, under whichever Pillow is installed.

The test command runs this file twice: in the full test environment, and in one made by a plain
``pip install -e .`` (the newest Pillow the package admits), so a Pillow release that calls its hooks in a new
way fails here before it fails a user.
"""

from __future__ import annotations

import inspect
import io
import struct
import zlib

import PIL
import pytest
from PIL import Image, features

from belle_vl_tools.images import ImagePolicy, load_image

RED = (220, 20, 30)


def _encode(fmt: str, **save: object) -> bytes:
    mode = "RGBA" if save.pop("alpha", False) else "RGB"
    picture = Image.new(mode, (48, 32), RED + ((230,) if mode == "RGBA" else ()))
    out = io.BytesIO()
    picture.save(out, format=fmt, **save)
    return out.getvalue()


FORMATS = {
    "png": ("PNG", {}),
    "jpeg": ("JPEG", {"quality": 95}),
    "jpeg-progressive": ("JPEG", {"quality": 95, "progressive": True}),
    "webp-lossy": ("WEBP", {"quality": 90}),
    "webp-lossless": ("WEBP", {"lossless": True}),
    "webp-alpha": ("WEBP", {"lossless": True, "alpha": True}),
    "gif": ("GIF", {}),
    "bmp": ("BMP", {}),
    "tiff": ("TIFF", {}),
    "ico": ("ICO", {"sizes": [(32, 32)]}),
}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_the_loader_reads_each_format(name):
    fmt, save = FORMATS[name]
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip(f"this Pillow ({PIL.__version__}) was built without WebP")
    data = _encode(fmt, **dict(save))
    picture = load_image(data, ImagePolicy())
    assert picture.mode == "RGB"
    red, green, blue = picture.getpixel((picture.width // 2, picture.height // 2))
    assert red > 150 and green < 90 and blue < 90, (name, PIL.__version__, (red, green, blue))


def test_the_bomb_hook_takes_every_argument_pillow_passes():
    load_image(_encode("PNG"), ImagePolicy())  # installs the hook
    hooked = Image._decompression_bomb_check
    assert getattr(hooked, "_belle_vl_hook", False)
    original = hooked.__wrapped__
    params = inspect.signature(original).parameters
    keywords = {name: p.default for name, p in list(params.items())[1:] if p.default is not inspect.Parameter.empty}
    hooked((10, 10))
    hooked((10, 10), **keywords)  # Pillow 13's WebP reader passes error_only=True


def _scan_bomb(side: int, repeats: int) -> bytes:
    """A progressive JPEG whose last scan is repeated: small on disk, slow to decode."""
    picture = Image.new("RGB", (side, side), RED)
    out = io.BytesIO()
    picture.save(out, format="JPEG", quality=90, progressive=True)
    data = out.getvalue()
    last = data.rindex(b"\xff\xda")
    return data[:last] + data[last:-2] * repeats + data[-2:]


def test_a_jpeg_scan_bomb_is_refused_before_decoding():
    import time

    from belle_vl_tools.errors import ImageTooLargeError

    bomb = _scan_bomb(1000, 2000)
    started = time.monotonic()
    with pytest.raises(ImageTooLargeError, match="progressive JPEG of 1000x1000 pixels in 2,0"):
        load_image(bomb, ImagePolicy())
    assert time.monotonic() - started < 30  # refused from the markers; decoding it takes minutes


def test_an_ordinary_progressive_jpeg_of_many_pixels_still_loads():
    big = io.BytesIO()
    Image.new("RGB", (3000, 2000), RED).save(big, format="JPEG", progressive=True)
    assert load_image(big.getvalue(), ImagePolicy()).size == (3000, 2000)


# --- files whose decoding cost is out of proportion to their bytes and pixels (benchmarks/image_worst_case.py) ---
#
# Each file below is a small instance of a case that, at the size the default limits admit, takes from several
# seconds to hours to decode, or gigabytes of memory for a few pixels (figures in docs/image-policy.md). The loader
# should refuse them before decoding, as it refuses the JPEG scan bomb; until it does, these fail.


def _ifd(entries: list[tuple[int, int, int]], next_ifd: int) -> bytes:
    """A little-endian TIFF directory of (tag, SHORT or LONG type, single value) entries."""
    body = b"".join(struct.pack("<HHII", tag, kind, 1, value) for tag, kind, value in sorted(entries))
    return struct.pack("<H", len(entries)) + body + struct.pack("<I", next_ifd)


_ONE_GRAY_PIXEL = [(256, 3, 1), (257, 3, 1), (258, 3, 8), (259, 3, 1), (262, 3, 1), (277, 3, 1), (278, 3, 1)]


def test_a_jpeg_scan_bomb_inside_an_mpo_file_is_refused():
    from belle_vl_tools.errors import ImageTooLargeError

    picture = Image.new("RGB", (1024, 1024), RED)
    out = io.BytesIO()
    picture.save(out, format="MPO", save_all=True, append_images=[picture.resize((8, 8))], progressive=True)
    data = out.getvalue()
    end = data.index(b"\xff\xd9") + 2  # the first picture's end: entropy-coded data never holds FF D9
    last = data.rindex(b"\xff\xda", 0, end)
    bomb = data[:last] + data[last : end - 2] * 400 + data[end - 2 :]
    with Image.open(io.BytesIO(bomb)) as probe:
        assert probe.format == "MPO"
    with pytest.raises(ImageTooLargeError):
        load_image(bomb, ImagePolicy())


def test_a_gif_comment_of_many_tiny_sub_blocks_is_refused():
    from belle_vl_tools.errors import ImageError

    tiny = _encode("GIF")
    at = tiny.index(b",")  # the first image descriptor
    slow = tiny[:at] + b"!\xfe" + b"\x01x" * 131_072 + b"\x00" + tiny[at:]
    with pytest.raises(ImageError):
        load_image(slow, ImagePolicy())


def test_a_tiff_whose_directories_overlap_is_refused():
    from belle_vl_tools.errors import ImageError

    pages, per_page = 4095, 200
    head = 8 + len(_ifd(_ONE_GRAY_PIXEL + [(273, 4, 0), (279, 4, 1)], 0))
    chain = head + 2  # 2 mod 4, so that no pointer below reads as a width or height tag
    first = _ifd(_ONE_GRAY_PIXEL + [(273, 4, chain - 2), (279, 4, 1)], chain)
    slots = bytearray(12 * (per_page + pages) + 16)
    for k in range(pages):  # directory k starts 12 * k bytes into the chain and ends inside directory k + per_page
        struct.pack_into("<H", slots, 12 * k, per_page)
        struct.pack_into("<I", slots, 12 * (k + per_page) + 2, chain + 12 * (k + 1) if k < pages - 1 else 0)
    data = b"II*\x00" + struct.pack("<I", 8) + first + b"\x00\x00" + bytes(slots)
    with pytest.raises(ImageError):
        load_image(data, ImagePolicy())


def test_a_tiff_with_far_more_strips_than_lines_is_refused():
    from belle_vl_tools.errors import ImageError

    count = 100_000
    entries = [(256, 3, 1), (257, 3, 2), (258, 3, 8), (259, 3, 1), (262, 3, 1), (277, 3, 1), (278, 3, 1)]
    entries += [(279, 3, 1), (273, 3, 0)]
    body = b""
    directory_end = 8 + 2 + 12 * len(entries) + 4
    for tag, kind, value in sorted(entries):
        if tag == 273:  # the offsets (all pointing at the first bytes) live after the directory
            body += struct.pack("<HHII", tag, kind, count, directory_end)
        else:
            body += struct.pack("<HHII", tag, kind, 1, value)
    data = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(entries)) + body + b"\x00" * 4
    data += struct.pack("<H", 8) * count
    with Image.open(io.BytesIO(data)) as probe:
        assert probe.size == (1, 2) and len(probe.tile) >= count // 2
    with pytest.raises(ImageError):
        load_image(data, ImagePolicy())


def test_a_jpeg_of_a_million_markers_is_refused():
    from belle_vl_tools.errors import ImageError

    jpeg = _encode("JPEG")
    slow = jpeg[:2] + b"\xff\xe5\x00\x02" * 250_000 + jpeg[2:]
    with pytest.raises(ImageError):
        load_image(slow, ImagePolicy())


def test_an_ico_whose_entries_all_name_one_huge_png_is_refused():
    """Each embedded PNG is walked once, however many icon entries name it, and its size is still checked."""
    from belle_vl_tools.errors import ImageTooLargeError

    small = io.BytesIO()
    Image.new("RGB", (16, 16), RED).save(small, format="PNG")
    png = bytearray(small.getvalue())
    struct.pack_into(">II", png, 16, 10_000, 10_000)  # the IHDR's size: 100 MP, over the 40 MP limit
    struct.pack_into(">I", png, 29, zlib.crc32(png[12:29]))
    entries = 64
    start = 6 + 16 * entries
    head = struct.pack("<HHH", 0, 1, entries)
    head += b"".join(struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png), start) for _ in range(entries))
    with pytest.raises(ImageTooLargeError, match="10000x10000"):
        load_image(head + bytes(png), ImagePolicy())
