"""Every format Pillow opens reaches the loader, under whichever Pillow is installed.

The test command runs this file twice: in the full test environment, and in one made by a plain
``pip install -e .`` (the newest Pillow the package admits), so a Pillow release that calls its hooks in a new
way fails here before it fails a user.
"""

from __future__ import annotations

import inspect
import io

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
