"""Tests of belle_vl_tools.images: every source kind, conversions, typed errors, the policy, URLs, fuzzing."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import http.server
import importlib.util
import io
import ipaddress
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from belle_vl_tools.errors import (
    ImageAccessDeniedError,
    ImageDecodeError,
    ImageError,
    ImageFetchError,
    ImageNotFoundError,
    ImageTooLargeError,
    InvalidImageDataError,
    UnsupportedImageError,
)
from belle_vl_tools.images import (
    DEFAULT_MAX_BYTES,
    ImagePolicy,
    check_url,
    describe_source,
    image_digest,
    load_image,
)

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------------------------


def _picture() -> Image.Image:
    """32x24 RGB with every pixel distinct enough to catch transposes and channel swaps."""
    ys, xs = np.mgrid[0:24, 0:32]
    pixels = np.stack([xs * 8, ys * 10, (xs * 3 + ys * 5) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(pixels)


def _encode(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


@pytest.fixture()
def picture() -> Image.Image:
    return _picture()


@pytest.fixture()
def png_bytes(picture: Image.Image) -> bytes:
    return _encode(picture)


@pytest.fixture()
def png_path(tmp_path: Path, png_bytes: bytes) -> Path:
    path = tmp_path / "picture.png"
    path.write_bytes(png_bytes)
    return path


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_with_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with almost no pixel data behind it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + _png_chunk(b"IEND", b"")
    )


# ---------------------------------------------------------------------------------------------------------------
# Every source kind gives the same pixels
# ---------------------------------------------------------------------------------------------------------------


def _all_sources(picture: Image.Image, png_bytes: bytes, png_path: Path) -> dict[str, object]:
    b64 = base64.b64encode(png_bytes).decode()
    return {
        "str path": str(png_path),
        "Path": png_path,
        "bytes": png_bytes,
        "bytearray": bytearray(png_bytes),
        "memoryview": memoryview(png_bytes),
        "data URL": f"data:image/png;base64,{b64}",
        "raw base64": b64,
        "wrapped base64": "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76)),
        "url-safe base64": base64.urlsafe_b64encode(png_bytes).decode().rstrip("="),
        "PIL image": picture,
        "PIL lazy image": Image.open(io.BytesIO(png_bytes)),
        "PIL RGBA image": picture.convert("RGBA"),
        "numpy uint8": np.asarray(picture),
        "numpy float": np.asarray(picture).astype(np.float32) / 255.0,
        "numpy RGBA": np.asarray(picture.convert("RGBA")),
        "dict path": {"path": str(png_path)},
        "dict base64": {"base64": b64, "mime_type": "image/png"},
        "dict bytes": {"bytes": png_bytes},
        "dict image": {"type": "image", "image": png_bytes},
        "dict image_url": {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}},
    }


def test_every_source_kind_loads_the_same_pixels(picture, png_bytes, png_path):
    expected = np.asarray(picture)
    policy = ImagePolicy.restricted(png_path.parent)
    for name, source in _all_sources(picture, png_bytes, png_path).items():
        image = load_image(source, policy)
        assert image.mode == "RGB", name
        assert image.size == picture.size, name
        assert np.array_equal(_pixels(image), expected), name


def test_same_picture_same_digest_across_sources(picture, png_bytes, png_path):
    digests = {
        name: image_digest(load_image(source)) for name, source in _all_sources(picture, png_bytes, png_path).items()
    }
    assert len(set(digests.values())) == 1, digests


def test_relative_path_and_default_policy_use_current_folder(tmp_path, png_bytes, monkeypatch):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(png_bytes)
    monkeypatch.chdir(tmp_path)
    policy = ImagePolicy()
    assert policy.allowed_roots == (tmp_path.resolve(),)
    assert load_image("pics/a.png", policy).size == (32, 24)
    assert load_image(Path("pics") / "a.png", policy).size == (32, 24)


def test_result_is_fresh_and_holds_no_file(png_path, picture):
    image = load_image(png_path)
    assert getattr(image, "fp", None) is None
    assert type(image) is Image.Image  # not a lazily decoding PngImageFile
    os.remove(png_path)  # nothing keeps it open (matters on Windows)
    image.load()
    source = picture.copy()
    result = load_image(source)
    result.putpixel((0, 0), (1, 2, 3))
    assert source.getpixel((0, 0)) != (1, 2, 3)  # the caller's image is never returned itself


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_no_file_descriptor_leaks(png_path, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        load_image(png_path)
        with pytest.raises(ImageDecodeError):
            load_image(bad)
    assert len(os.listdir("/proc/self/fd")) <= before


# ---------------------------------------------------------------------------------------------------------------
# Conversions
# ---------------------------------------------------------------------------------------------------------------


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (200, 30, 30))
    image.paste((30, 30, 200), (0, 0, 10, 20))  # blue band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = _encode(image, "JPEG", exif=exif, quality=95)
    loaded = load_image(data)
    assert loaded.size == (20, 40)
    top = np.asarray(loaded)[2, 10]
    assert top[2] > 150 and top[0] < 100  # the blue band is now at the top


def test_rgba_is_composited_on_white():
    rgba = Image.new("RGBA", (3, 1))
    rgba.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red -> white
    rgba.putpixel((1, 0), (0, 0, 255, 128))  # half transparent blue
    rgba.putpixel((2, 0), (10, 200, 30, 255))  # opaque
    for source in (rgba, _encode(rgba)):
        pixels = _pixels(load_image(source))[0]
        assert tuple(pixels[0]) == (255, 255, 255)
        assert all(abs(int(a) - b) <= 2 for a, b in zip(pixels[1], (127, 127, 255), strict=True))
        assert tuple(pixels[2]) == (10, 200, 30)


def test_palette_with_transparency_and_gray_alpha():
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    data = _encode(palette, "PNG", transparency=0)
    assert Image.open(io.BytesIO(data)).mode == "P"
    pixels = _pixels(load_image(data))[0]
    assert tuple(pixels[0]) == (255, 255, 255)
    assert tuple(pixels[1]) == (255, 0, 0)
    gray_alpha = Image.new("LA", (1, 1), (0, 0))
    assert tuple(_pixels(load_image(_encode(gray_alpha)))[0, 0]) == (255, 255, 255)
    pa = palette.convert("PA")
    assert tuple(_pixels(load_image(pa))[0, 1]) == (255, 0, 0)


def test_16_bit_png_is_scaled():
    values = np.array([[0, 32896, 65535, 257]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode.startswith("I;16")
    loaded = load_image(_encode(image, "PNG"))
    assert list(_pixels(loaded)[0, :, 0]) == [0, 128, 255, 1]


@pytest.mark.parametrize(
    ("mode", "values", "expected"),
    [
        ("I", [0, 100, 255], [0, 100, 255]),  # already in 8-bit range: kept
        ("I", [0, 32896, 65535], [0, 128, 255]),  # 16-bit range: / 257
        ("I", [-1000, 0, 1000], [0, 128, 255]),  # anything else: stretched
        ("F", [0.0, 0.5, 1.0], [0, 128, 255]),
        ("F", [0.0, 128.0, 255.0], [0, 128, 255]),
        ("F", [float("nan"), -2.0, 2.0], [128, 0, 255]),
    ],
)
def test_high_bit_depth_modes(mode, values, expected):
    image = Image.new(mode, (3, 1))
    for x, value in enumerate(values):
        image.putpixel((x, 0), value)
    pixels = _pixels(load_image(image))
    assert list(pixels[0, :, 0]) == expected
    assert np.array_equal(pixels[..., 0], pixels[..., 2])


def test_other_modes_convert():
    assert tuple(_pixels(load_image(Image.new("CMYK", (1, 1), (0, 0, 0, 0))))[0, 0]) == (255, 255, 255)
    assert tuple(_pixels(load_image(_encode(Image.new("CMYK", (4, 4), (0, 0, 0, 255)), "JPEG")))[0, 0]) == (0, 0, 0)
    assert tuple(_pixels(load_image(Image.new("1", (1, 1), 1)))[0, 0]) == (255, 255, 255)
    assert tuple(_pixels(load_image(Image.new("YCbCr", (1, 1), (255, 128, 128))))[0, 0]) == (255, 255, 255)
    lab_gray = _pixels(load_image(Image.new("LAB", (1, 1), (128, 128, 128))))[0, 0]
    assert all(110 <= int(v) <= 130 for v in lab_gray)  # L*=50 gray, not garbage


def test_unconvertible_mode_is_unsupported():
    with pytest.raises(UnsupportedImageError, match="La"):
        load_image(Image.new("La", (2, 2)))


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(io.BytesIO(buffer.getvalue())).n_frames == 2
    pixel = _pixels(load_image(buffer.getvalue()))[4, 4]
    assert pixel[0] > 200 and pixel[2] < 50


@pytest.mark.parametrize("fmt", ["JPEG", "GIF", "BMP", "WEBP", "TIFF", "PPM", "ICO"])
def test_common_formats_load(picture, fmt):
    loaded = load_image(_encode(picture, fmt))
    assert loaded.mode == "RGB"
    if fmt != "ICO":  # icons are stored at standard sizes
        assert loaded.size == picture.size


def test_formats_outside_the_allowlist_are_refused(picture):
    data = _encode(picture, "TIFF")
    with pytest.raises(ImageDecodeError, match="allowed_formats"):
        load_image(data, ImagePolicy.trusted(allowed_formats={"PNG"}))
    tga = _encode(picture, "TGA")
    with pytest.raises(ImageDecodeError):
        load_image(tga)
    assert load_image(tga, ImagePolicy.trusted(allowed_formats=None)).size == picture.size


# ---------------------------------------------------------------------------------------------------------------
# Typed errors
# ---------------------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(ImageNotFoundError, match="nope.png") as info:
        load_image(str(missing))
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(ImageNotFoundError):
        load_image(missing, ImagePolicy.restricted(tmp_path))


def test_directory(tmp_path):
    with pytest.raises(ImageNotFoundError, match="folder"):
        load_image(tmp_path)


def test_corrupt_truncated_and_non_image_data(tmp_path, png_bytes):
    with pytest.raises(ImageDecodeError, match="not a readable image"):
        load_image(b"\x00\x01\x02garbage" * 10)
    with pytest.raises(ImageDecodeError):
        load_image(png_bytes[: len(png_bytes) // 2])
    with pytest.raises(ImageDecodeError, match="empty"):
        load_image(b"")
    text_file = tmp_path / "notes.png"
    text_file.write_text("these are my notes, not a picture\n" * 5)
    with pytest.raises(ImageDecodeError, match="notes.png") as info:
        load_image(text_file)
    assert "plain text" in str(info.value)
    with pytest.raises(ImageDecodeError, match="HTML"):
        load_image(b"<!DOCTYPE html><html><body>hi</body></html>")
    with pytest.raises(ImageDecodeError):  # valid base64, but not of an image
        load_image({"base64": base64.b64encode(b"hello world " * 20).decode()})


def test_bad_base64_and_data_urls():
    with pytest.raises(InvalidImageDataError, match="base64"):
        load_image({"base64": "not*base64!"})
    with pytest.raises(InvalidImageDataError, match="base64"):
        load_image("iVBORw0KGgo" + "A" * 302)  # raw base64 of impossible length (cut off)
    with pytest.raises(InvalidImageDataError):
        load_image("data:image/png;base64,@@@@")
    with pytest.raises(InvalidImageDataError, match="not base64-encoded"):
        load_image("data:image/png,%89PNG")
    with pytest.raises(InvalidImageDataError, match="not an image"):
        load_image("data:text/html;base64,PGh0bWw+")
    with pytest.raises(InvalidImageDataError, match=","):
        load_image("data:image/png;base64")
    with pytest.raises(InvalidImageDataError):
        load_image({"path": "a.png", "url": "http://example.com/a.png"})
    with pytest.raises(InvalidImageDataError):
        load_image({"nothing": 1})


def test_messages_never_hold_the_data():
    junk = "A" * 5_000_000 + "!"  # not base64 and not a path
    with pytest.raises(ImageError) as info:
        load_image({"base64": junk})
    assert len(str(info.value)) < 600
    with pytest.raises(ImageError) as info:
        load_image(junk)
    assert len(str(info.value)) < 600


def test_byte_limits(tmp_path, png_bytes, monkeypatch):
    small = ImagePolicy.trusted(max_bytes=100)
    with pytest.raises(ImageTooLargeError, match=f"{len(png_bytes):,} bytes") as info:
        load_image(png_bytes, small)
    assert "max_bytes=100" in str(info.value)
    path = tmp_path / "big.png"
    path.write_bytes(png_bytes)
    with pytest.raises(ImageTooLargeError, match="max_bytes=100"):
        load_image(path, small)
    with pytest.raises(ImageTooLargeError):
        load_image(memoryview(png_bytes), small)
    # base64 is measured before it is decoded
    encoded = base64.b64encode(png_bytes).decode()

    def no_decoding(*args, **kwargs):
        raise AssertionError("base64 was decoded before its length was checked")

    monkeypatch.setattr(base64, "b64decode", no_decoding)
    with pytest.raises(ImageTooLargeError, match="base64"):
        load_image({"base64": encoded}, small)
    with pytest.raises(ImageTooLargeError):
        load_image("data:image/png;base64," + encoded, small)


def test_pixel_limit_from_header_before_decoding(monkeypatch):
    huge = _png_with_header(100_000, 100_000)

    def no_decoding(self, *args, **kwargs):
        raise AssertionError("pixels were decoded before the size check")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decoding)
    with pytest.raises(ImageTooLargeError):
        load_image(huge)
    moderate = _png_with_header(2000, 1000)
    with pytest.raises(ImageTooLargeError, match=r"2000x1000 = 2,000,000 pixels") as info:
        load_image(moderate, ImagePolicy.trusted(max_pixels=1_000_000))
    assert "max_pixels=1,000,000" in str(info.value)


def test_pillow_decompression_bomb_limits_become_too_large_errors(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    policy = ImagePolicy.trusted(max_pixels=10**9)
    warned = _encode(Image.new("RGB", (40, 40)))  # 1,600 pixels: Pillow warns
    refused = _encode(Image.new("RGB", (50, 50)))  # 2,500 pixels: Pillow raises
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(ImageTooLargeError, match="MAX_IMAGE_PIXELS=1,000"):
            load_image(warned, policy)
        with pytest.raises(ImageTooLargeError, match="decompression"):
            load_image(refused, policy)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageTooLargeError):
            load_image(warned, policy)


def test_pixel_limit_for_arrays_and_pil_images():
    policy = ImagePolicy.trusted(max_pixels=100)
    with pytest.raises(ImageTooLargeError):
        load_image(np.zeros((11, 10, 3), np.uint8), policy)
    with pytest.raises(ImageTooLargeError):
        load_image(Image.new("RGB", (11, 10)), policy)
    assert load_image(np.zeros((10, 10), np.uint8), policy).size == (10, 10)


@pytest.mark.parametrize(
    ("array", "pattern"),
    [
        (np.zeros((5,), np.uint8), r"\(5,\)"),
        (np.zeros((4, 4, 2), np.uint8), r"\(4, 4, 2\)"),
        (np.zeros((3, 8, 8, 3), np.uint8), r"\(3, 8, 8, 3\)"),
        (np.zeros((3, 8, 8), np.uint8), "transpose"),
        (np.zeros((0, 8), np.uint8), "no pixels"),
        (np.zeros((4, 4), np.int64), "int64"),
        (np.zeros((4, 4, 3), np.uint16), "uint16"),
        (np.zeros((4, 4), bool), "bool"),
        (np.full((4, 4), 2.0), r"\[0, 1\]"),
        (np.full((4, 4), np.nan), "NaN"),
        (np.zeros((4, 4), complex), "complex"),
    ],
)
def test_bad_numpy_arrays(array, pattern):
    with pytest.raises(UnsupportedImageError, match=pattern):
        load_image(array)


@pytest.mark.parametrize("source", [42, None, 3.5, [b"x"], object()])
def test_unsupported_source_types(source):
    with pytest.raises(UnsupportedImageError):
        load_image(source)


def test_empty_and_odd_strings():
    with pytest.raises(ImageNotFoundError, match="empty"):
        load_image("   ")
    with pytest.raises(ImageNotFoundError, match="NUL"):
        load_image("a\x00b.png")


# ---------------------------------------------------------------------------------------------------------------
# The policy: local files
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture()
def confined(tmp_path: Path, png_bytes: bytes) -> tuple[Path, Path]:
    root = tmp_path / "root"
    root.mkdir()
    (root / "inside.png").write_bytes(png_bytes)
    outside = tmp_path / "outside.png"
    outside.write_bytes(png_bytes)
    return root, outside


def test_policy_constructors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    default = ImagePolicy()
    assert default.allowed_roots == (tmp_path.resolve(),)
    assert default.allow_urls is False and default.allow_private_urls is False
    assert default.max_bytes == DEFAULT_MAX_BYTES
    assert ImagePolicy.trusted().allowed_roots is None
    assert ImagePolicy.trusted().allow_urls is False
    assert ImagePolicy.restricted().allowed_roots == (tmp_path.resolve(),)
    assert ImagePolicy.restricted(str(tmp_path / "a")).allowed_roots == ((tmp_path / "a").resolve(),)
    assert ImagePolicy.restricted([tmp_path, "b"], allow_urls=True).allow_urls
    hosts = ImagePolicy(allowed_url_hosts={"LocalHost.", "[::1]"}).allowed_url_hosts
    assert hosts == frozenset({"localhost", "::1"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        default.allow_urls = True  # type: ignore[misc]
    for bad in ({"max_bytes": 0}, {"max_pixels": -1}, {"url_timeout": 0}, {"max_redirects": -1}):
        with pytest.raises(ValueError):
            ImagePolicy(**bad)
    with pytest.raises(TypeError):
        ImagePolicy.restricted(allowed_roots=(tmp_path,))
    assert dataclasses.replace(default, max_bytes=5).max_bytes == 5


def test_path_outside_roots_is_refused(confined):
    root, outside = confined
    policy = ImagePolicy.restricted(root)
    assert load_image(root / "inside.png", policy).size == (32, 24)
    with pytest.raises(ImageAccessDeniedError, match="allowed_roots") as info:
        load_image(str(outside), policy)
    assert isinstance(info.value, PermissionError)
    with pytest.raises(ImageAccessDeniedError):  # refused before looking whether it exists
        load_image(str(outside.parent / "does-not-exist.png"), policy)
    with pytest.raises(ImageAccessDeniedError):
        load_image({"path": str(outside)}, policy)
    assert load_image(outside).size == (32, 24)  # the trusted default reads it


def test_dot_dot_traversal_is_refused(confined):
    root, _outside = confined
    policy = ImagePolicy.restricted(root)
    with pytest.raises(ImageAccessDeniedError):
        load_image(str(root / ".." / "outside.png"), policy)
    with pytest.raises(ImageAccessDeniedError):
        load_image(f"{root}/sub/../../outside.png", policy)
    assert load_image(f"{root}/sub/../inside.png", policy).size == (32, 24)


def test_symlink_pointing_outside_is_refused(confined):
    root, outside = confined
    link = root / "link.png"
    inner_link = root / "inner.png"
    try:
        link.symlink_to(outside)
        inner_link.symlink_to(root / "inside.png")
        (root / "dirlink").symlink_to(outside.parent, target_is_directory=True)
    except (OSError, NotImplementedError):
        pytest.skip("symbolic links are not available")
    policy = ImagePolicy.restricted(root)
    with pytest.raises(ImageAccessDeniedError):
        load_image(link, policy)
    with pytest.raises(ImageAccessDeniedError):
        load_image(root / "dirlink" / "outside.png", policy)
    assert load_image(inner_link, policy).size == (32, 24)


def test_local_files_can_be_disabled(png_path, png_bytes):
    policy = ImagePolicy.trusted(allow_local_files=False)
    with pytest.raises(ImageAccessDeniedError, match="allow_local_files"):
        load_image(png_path, policy)
    assert load_image(png_bytes, policy).size == (32, 24)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_special_files_are_refused(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    outcome: list[BaseException] = []

    def load() -> None:
        try:
            load_image(fifo)
        except BaseException as exc:
            outcome.append(exc)

    reader = threading.Thread(target=load, daemon=True)
    reader.start()
    reader.join(timeout=30)  # opening the pipe to read would wait for a writer forever
    if reader.is_alive():
        os.close(os.open(fifo, os.O_WRONLY))  # free the blocked reader before failing
        pytest.fail("load_image blocked on a named pipe, waiting for a writer")
    assert len(outcome) == 1 and isinstance(outcome[0], ImageNotFoundError), outcome
    assert "regular file" in str(outcome[0])


# ---------------------------------------------------------------------------------------------------------------
# The policy: URLs without a network
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture()
def network_log(monkeypatch) -> list[object]:
    """Every name lookup and connection attempt made during the test (still performed)."""
    log: list[object] = []
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect

    def getaddrinfo(host, *args, **kwargs):
        log.append(("lookup", host))
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(self, address):
        log.append(("connect", address))
        return real_connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return log


@pytest.fixture()
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network use: {args!r}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "FILE://localhost/etc/hosts", "file:relative.png", "file:/etc/passwd"]
)
def test_file_urls_are_refused(url, no_network):
    for policy in (None, ImagePolicy.trusted(allow_urls=True, allow_private_urls=True)):
        with pytest.raises(ImageAccessDeniedError, match="plain path"):
            load_image(url, policy)


@pytest.mark.parametrize("url", ["ftp://example.com/a.png", "gopher://example.com/", "s3://bucket/key.png"])
def test_other_schemes_are_refused(url, no_network):
    with pytest.raises(ImageAccessDeniedError, match="http"):
        load_image(url, ImagePolicy.trusted(allow_urls=True, allow_private_urls=True))


def test_urls_are_off_by_default(no_network):
    for policy in (None, ImagePolicy(), ImagePolicy.trusted()):
        with pytest.raises(ImageAccessDeniedError, match=r"allow_urls=True"):
            load_image("https://example.com/cat.png", policy)


PRIVATE_URLS = [
    "http://127.0.0.1/x.png",
    "http://127.0.0.1:8080/x.png",
    "http://localhost/x.png",
    "http://LOCALHOST./x.png",
    "http://images.localhost/x.png",
    "http://[::1]/x.png",
    "http://[::]/x.png",
    "http://[::ffff:127.0.0.1]/x.png",
    "http://[::ffff:a01:203]/x.png",
    "http://[64:ff9b::a00:1]/x.png",
    "http://[2002:a00:1::]/x.png",
    "http://[fe80::1%25eth0]/x.png",
    "http://[fc00::1]/x.png",
    "http://[ff02::1]/x.png",
    "http://169.254.169.254/latest/meta-data/",
    "http://10.0.0.1/x.png",
    "https://172.16.5.4/x.png",
    "http://192.168.1.1/x.png",
    "http://100.64.0.1/x.png",
    "http://0.0.0.0/x.png",
    "http://224.0.0.1/x.png",
    "http://240.0.0.1/x.png",
    "http://255.255.255.255/x.png",
    "http://2130706433/x.png",
    "http://0x7f000001/x.png",
    "http://127.1/x.png",
    "http://0177.0.0.1/x.png",
    "http://0/x.png",
]


@pytest.mark.parametrize("url", PRIVATE_URLS)
def test_private_addresses_are_refused_without_connecting(url, no_network):
    policy = ImagePolicy.trusted(allow_urls=True)
    with pytest.raises(ImageAccessDeniedError, match="allow_private_urls") as info:
        load_image(url, policy)
    assert isinstance(info.value, PermissionError)
    with pytest.raises(ImageAccessDeniedError):
        check_url(url, policy)


def test_credentials_in_urls_are_refused(no_network):
    policy = ImagePolicy.trusted(allow_urls=True, fetcher=lambda url, policy: b"")
    with pytest.raises(ImageAccessDeniedError, match="password"):
        load_image("http://example.com@10.0.0.1/x.png", policy)


def test_malformed_urls(no_network):
    policy = ImagePolicy.trusted(allow_urls=True, fetcher=lambda url, policy: b"")
    for url in ("http:///x.png", "http://exa mple.com/x.png", "http://example.com:99999/x.png", "http:x.png"):
        with pytest.raises(ImageFetchError):
            load_image(url, policy)


def _fake_dns(monkeypatch, table: dict[str, list[str]]) -> list[object]:
    """Resolve the names in ``table`` to its addresses; refuse every connection. Returns the log."""
    log: list[object] = []

    def getaddrinfo(host, port, *args, **kwargs):
        log.append(("lookup", host))
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        results = []
        for address in table[host]:
            if ":" in address:
                results.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port, 0, 0)))
            else:
                results.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)))
        return results

    def connect(self, address):
        log.append(("connect", address))
        raise ConnectionRefusedError(111, "refused by the test")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return log


def test_names_resolving_to_private_addresses_are_refused_before_connecting(monkeypatch):
    log = _fake_dns(
        monkeypatch,
        {
            "intranet.example": ["10.0.0.7"],
            "mixed.example": ["93.184.216.34", "192.168.0.3"],
            "v6.example": ["::1"],
            "public.example": ["93.184.216.34"],
        },
    )
    policy = ImagePolicy.trusted(allow_urls=True)
    for host in ("intranet.example", "mixed.example", "v6.example"):
        with pytest.raises(ImageAccessDeniedError, match="resolves to"):
            load_image(f"http://{host}/x.png", policy)
        with pytest.raises(ImageAccessDeniedError):
            check_url(f"http://{host}/x.png", policy, resolve=True)
    assert not [entry for entry in log if entry[0] == "connect"]
    assert check_url("http://public.example/x.png", policy, resolve=True) == "http://public.example/x.png"
    with pytest.raises(ImageFetchError, match="refused by the test"):  # public: it does try to connect
        load_image("http://public.example/x.png", policy)
    assert ("connect", ("93.184.216.34", 80)) in log
    with pytest.raises(ImageFetchError, match="resolve"):
        load_image("http://unknown.example/x.png", policy)


def test_allowed_url_hosts_accept_names_and_networks(monkeypatch):
    log = _fake_dns(monkeypatch, {"store.corp": ["10.20.1.5"], "other.corp": ["10.30.0.1"]})
    by_name = ImagePolicy.trusted(allow_urls=True, allowed_url_hosts={"store.corp"})
    by_network = ImagePolicy.trusted(allow_urls=True, allowed_url_hosts={"10.20.0.0/16"})
    for policy in (by_name, by_network):
        log.clear()
        with pytest.raises(ImageFetchError, match="refused by the test"):
            load_image("http://store.corp/x.png", policy)
        assert ("connect", ("10.20.1.5", 80)) in log
        with pytest.raises(ImageAccessDeniedError):
            load_image("http://other.corp/x.png", policy)
    assert check_url("http://10.20.9.9/x.png", by_network)
    with pytest.raises(ImageAccessDeniedError):
        check_url("http://10.21.0.1/x.png", by_network)


def test_injected_fetcher_is_used(png_bytes, picture, no_network):
    calls: list[str] = []

    def fetcher(url: str, policy: ImagePolicy) -> bytes:
        calls.append(url)
        return png_bytes

    policy = ImagePolicy.trusted(allow_urls=True, fetcher=fetcher)
    image = load_image("https://images.example.test/cat.png", policy)
    assert calls == ["https://images.example.test/cat.png"]
    assert np.array_equal(_pixels(image), np.asarray(picture))
    assert load_image({"url": "https://images.example.test/cat.png"}, policy).size == picture.size
    with pytest.raises(ImageAccessDeniedError):  # the policy is checked before the fetcher runs
        load_image("http://10.0.0.1/cat.png", policy)
    with pytest.raises(ImageAccessDeniedError):
        load_image("https://images.example.test/cat.png", ImagePolicy.trusted(fetcher=fetcher))
    assert len(calls) == 2


def test_injected_fetcher_results_are_checked(png_bytes, no_network):
    def failing(url, policy):
        raise RuntimeError("connection reset by peer")

    with pytest.raises(ImageFetchError, match="connection reset"):
        load_image("https://x.example/a.png", ImagePolicy.trusted(allow_urls=True, fetcher=failing))
    with pytest.raises(ImageFetchError, match="str"):
        load_image("https://x.example/a.png", ImagePolicy.trusted(allow_urls=True, fetcher=lambda u, p: "text"))
    big = ImagePolicy.trusted(allow_urls=True, max_bytes=50, fetcher=lambda u, p: png_bytes)
    with pytest.raises(ImageTooLargeError):
        load_image("https://x.example/a.png", big)
    html = ImagePolicy.trusted(allow_urls=True, fetcher=lambda u, p: b"<html><body>not found</body></html>")
    with pytest.raises(ImageDecodeError, match="HTML"):
        load_image("https://x.example/a.png", html)


# ---------------------------------------------------------------------------------------------------------------
# The default fetcher against a local server
# ---------------------------------------------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    png = b""
    requests: list[str] = []
    streamed: list[int] = []

    def log_message(self, format, *args):  # keep test output quiet
        pass

    def _send(self, status: int, body: bytes = b"", content_type: str = "image/png", **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 (the name http.server calls)
        self.requests.append(self.path)
        if self.path == "/img.png":
            self._send(200, self.png)
        elif self.path == "/octet":
            self._send(200, self.png, content_type="application/octet-stream")
        elif self.path == "/redirect-private":
            self._send(302, Location="http://10.1.2.3/x.png")
        elif self.path == "/redirect-local":
            self._send(301, Location="/img.png")
        elif self.path == "/redirect-file":
            self._send(302, Location="file:///etc/passwd")
        elif self.path.startswith("/chain/"):
            remaining = int(self.path.rsplit("/", 1)[1])
            self._send(302, Location=f"/chain/{remaining - 1}" if remaining else "/img.png")
        elif self.path == "/page":
            self._send(200, b"<html>a page about a cat</html>", content_type="text/html; charset=utf-8")
        elif self.path == "/declared-big":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(50_000_000))
            self.end_headers()
        elif self.path == "/endless":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            sent = 0
            try:
                while sent < 64 * 1024 * 1024:
                    self.wfile.write(b"\x89" * 65536)
                    sent += 65536
            except OSError:
                pass
            self.streamed.append(sent)
        else:
            self._send(404, b"not found", content_type="text/plain")


@pytest.fixture(scope="module")
def server():
    _Handler.png = _encode(_picture())
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_loopback_server_is_refused_without_a_connection(server, network_log):
    _Handler.requests.clear()
    with pytest.raises(ImageAccessDeniedError, match="loopback"):
        load_image(f"{server}/img.png", ImagePolicy.trusted(allow_urls=True))
    assert network_log == []
    assert _Handler.requests == []


def test_default_fetcher_with_private_urls_allowed(server, picture, network_log):
    policy = ImagePolicy.trusted(allow_urls=True, allow_private_urls=True)
    image = load_image(f"{server}/img.png", policy)
    assert np.array_equal(_pixels(image), np.asarray(picture))
    assert ("lookup", "127.0.0.1") in network_log
    assert load_image(f"{server}/octet", policy).size == picture.size
    assert load_image(f"{server}/redirect-local", policy).size == picture.size
    assert load_image(f"{server}/chain/3", policy).size == picture.size
    with pytest.raises(ImageFetchError, match="max_redirects=5"):
        load_image(f"{server}/chain/9", policy)
    with pytest.raises(ImageAccessDeniedError, match="plain path"):
        load_image(f"{server}/redirect-file", policy)
    with pytest.raises(ImageFetchError, match="404"):
        load_image(f"{server}/missing.png", policy)
    with pytest.raises(ImageFetchError, match="text/html"):
        load_image(f"{server}/page", policy)


def test_allowed_loopback_host_still_refuses_private_redirects(server, picture, network_log):
    policy = ImagePolicy.trusted(allow_urls=True, allowed_url_hosts={"127.0.0.1"})
    assert np.array_equal(_pixels(load_image(f"{server}/img.png", policy)), np.asarray(picture))
    _Handler.requests.clear()
    network_log.clear()
    with pytest.raises(ImageAccessDeniedError, match="10.1.2.3"):
        load_image(f"{server}/redirect-private", policy)
    assert _Handler.requests == ["/redirect-private"]  # the first hop was fetched, the redirect was not
    assert all("10.1.2.3" not in repr(entry) for entry in network_log), network_log
    # localhost by name is a different host: still refused
    with pytest.raises(ImageAccessDeniedError):
        load_image(server.replace("127.0.0.1", "localhost") + "/img.png", policy)


def test_download_limits(server):
    policy = ImagePolicy.trusted(allow_urls=True, allow_private_urls=True, max_bytes=100_000)
    with pytest.raises(ImageTooLargeError, match="50,000,000 bytes"):
        load_image(f"{server}/declared-big", policy)
    _Handler.streamed.clear()
    with pytest.raises(ImageTooLargeError, match=r"stopped after 100,001 bytes"):
        load_image(f"{server}/endless", policy)
    deadline = time.monotonic() + 30  # the server notices the closed connection on its next write
    while not _Handler.streamed and time.monotonic() < deadline:
        time.sleep(0.05)
    # Counted in bytes, not seconds: the server could send 64 MiB, the closed connection stopped it far short
    # (what it sent is the 100,001 bytes read plus what the socket buffers held).
    assert _Handler.streamed and _Handler.streamed[0] < 16 * 2**20, _Handler.streamed


def test_download_timeout(monkeypatch):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # accepts, never answers
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    try:
        policy = ImagePolicy.trusted(allow_urls=True, allow_private_urls=True, url_timeout=0.3)
        start = time.monotonic()
        with pytest.raises(ImageFetchError, match="timed out"):  # the read timeout's message, not the deadline's
            load_image(f"http://127.0.0.1:{listener.getsockname()[1]}/x.png", policy)
        assert time.monotonic() - start < 0.3 * 10  # 10x margin for a busy machine; the peer never answers
    finally:
        listener.close()


def test_connection_errors_are_fetch_errors():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    with pytest.raises(ImageFetchError, match=f"127.0.0.1:{port}"):
        load_image(f"http://127.0.0.1:{port}/x.png", ImagePolicy.trusted(allow_urls=True, allow_private_urls=True))


# ---------------------------------------------------------------------------------------------------------------
# Digest and descriptions
# ---------------------------------------------------------------------------------------------------------------


def test_image_digest_definition_and_sensitivity():
    image = Image.new("RGB", (3, 2), (1, 2, 3))
    expected = hashlib.sha256(b"RGB\x003x2\x00" + image.tobytes()).hexdigest()
    assert image_digest(image) == expected
    assert image_digest(image.copy()) == expected
    assert image_digest(Image.new("RGB", (2, 3), (1, 2, 3))) != expected  # same bytes, other size
    changed = image.copy()
    changed.putpixel((2, 1), (1, 2, 4))
    assert image_digest(changed) != expected
    assert image_digest(Image.new("L", (9, 2), 1)) != image_digest(Image.new("RGB", (3, 2), (1, 1, 1)))
    with pytest.raises(UnsupportedImageError):
        image_digest(b"bytes")  # type: ignore[arg-type]


def test_describe_source_never_dumps_data(png_bytes):
    b64 = base64.b64encode(png_bytes * 200).decode()
    cases = {
        b64: "base64 string",
        f"data:image/png;base64,{b64}": "data URL (image/png;base64",
        "https://user:secret@example.com/a.png?token=abc123#frag": "URL https://example.com/a.png?...",
        png_bytes: "bytes of image data (PNG)",
        "/some/where/cat.png": "path '/some/where/cat.png'",
        Path("cat.png"): "path 'cat.png'",
    }
    for source, expected in cases.items():
        text = describe_source(source)
        assert expected in text, text
        assert len(text) < 250
        assert "secret" not in text and "abc123" not in text
    assert describe_source(np.zeros((4, 5, 3), np.uint8)) == "numpy array of shape (4, 5, 3) and dtype uint8"
    assert describe_source(Image.new("RGB", (4, 5))) == "PIL image 4x5 mode RGB"
    assert "keys" in describe_source({"path": "x"})
    assert describe_source("images/" * 2000 + "cat.png").endswith("more characters)'")


def test_error_messages_name_the_url_without_secrets(no_network):
    with pytest.raises(ImageAccessDeniedError) as info:
        load_image("https://example.com/a.png?X-Amz-Signature=topsecret")
    assert "example.com/a.png" in str(info.value) and "topsecret" not in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# Import hygiene
# ---------------------------------------------------------------------------------------------------------------


def test_images_module_imports_without_torch_or_transformers():
    code = (
        "import sys\n"
        "for name in ('torch', 'transformers'):\n"
        "    sys.modules[name] = None  # any import of them fails\n"
        "import belle_vl_tools.images as images\n"
        "image = images.load_image(bytes.fromhex(sys.argv[1]))\n"
        "assert image.mode == 'RGB'\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, _encode(Image.new("RGB", (2, 2))).hex()],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_images_module_does_not_import_numpy_eagerly():
    modules = sorted((REPO / "belle_vl_tools" / "images").glob("*.py"))
    assert {path.name for path in modules} >= {"__init__.py", "decode.py", "fetch.py", "load.py", "policy.py"}
    for path in modules:
        top_level = [line for line in path.read_text().splitlines() if line.startswith(("import ", "from "))]
        assert top_level, path.name
        assert not [line for line in top_level if "numpy" in line or "torch" in line or "transformers" in line], path


def test_the_package_offers_every_name_the_single_module_did():
    """Callers import these from ``belle_vl_tools.images`` (the runtime its path check), whatever module holds them."""
    import belle_vl_tools.errors as errors
    import belle_vl_tools.images as images

    names = {
        "DEFAULT_IMAGE_FORMATS", "DEFAULT_MAX_BYTES", "DEFAULT_MAX_PIXELS", "DEFAULT_MAX_REDIRECTS",
        "DEFAULT_URL_TIMEOUT", "DEFAULT_URL_TOTAL_TIMEOUT", "JPEG_FREE_SCANS", "JPEG_MAX_EXTRA_PIXEL_SCANS",
        "Fetcher", "ImagePolicy", "ImageSource", "check_url", "describe_source", "fetch_url", "image_digest",
        "load_image", "_resolve_local_path",
    }  # fmt: skip
    missing = [name for name in sorted(names) if getattr(images, name, None) is None]
    assert not missing
    assert set(images.__all__) <= names and all(hasattr(images, name) for name in images.__all__)
    for name in ("ImageError", "ImageAccessDeniedError", "ImageDecodeError", "ImageFetchError", "ImageNotFoundError"):
        assert getattr(images, name) is getattr(errors, name)
    for name in ("ImageTooLargeError", "InvalidImageDataError", "UnsupportedImageError"):
        assert getattr(images, name) is getattr(errors, name)
    assert images.load_image.__module__ == "belle_vl_tools.images.load"
    assert images.fetch_url is images.fetch.fetch_url and images.ImagePolicy is images.policy.ImagePolicy


# ---------------------------------------------------------------------------------------------------------------
# Properties and fuzzing
# ---------------------------------------------------------------------------------------------------------------

_PRIVATE_NETWORKS = [
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")
]


@settings(max_examples=300, deadline=None)
@given(network=st.sampled_from(_PRIVATE_NETWORKS), offset=st.integers(min_value=0), mapped=st.booleans())
def test_property_private_ipv4_is_always_refused(network, offset, mapped):
    address = network.network_address + offset % network.num_addresses
    host = f"[::ffff:{address}]" if mapped else str(address)
    with pytest.raises(ImageAccessDeniedError):
        check_url(f"http://{host}/x.png", ImagePolicy.trusted(allow_urls=True))


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=2048))
def test_property_arbitrary_bytes_load_or_raise_image_errors(data):
    try:
        image = load_image(data)
    except ImageError:
        return
    assert image.mode == "RGB"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=300))
def test_property_arbitrary_strings_load_or_raise_image_errors(text, tmp_path, monkeypatch, no_network):
    monkeypatch.chdir(tmp_path)
    try:
        image = load_image(text, ImagePolicy(allow_urls=True, fetcher=lambda url, policy: b""))
    except ImageError:
        return
    assert image.mode == "RGB"


def _fuzz_script():
    spec = importlib.util.spec_from_file_location("fuzz_images", REPO / "scripts" / "fuzz_images.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_images"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def test_fuzz_mutated_files(recwarn):
    fuzz_images = _fuzz_script()
    valid = fuzz_images.build_corpus()
    bombs = fuzz_images.build_bomb_corpus()
    corpus = fuzz_images.build_seed_corpus()
    assert corpus == {**valid, **bombs}
    formats = {name.split("-", 1)[0] for name in corpus}
    assert formats == {"png", "jpeg", "gif", "bmp", "webp", "tiff", "ico"}
    for name, data in valid.items():  # the valid part of the corpus loads
        assert load_image(data).mode == "RGB", name
    for name, data in bombs.items():  # and every bomb is refused by size, before decoding
        with pytest.raises(ImageTooLargeError, match="pixels"):
            load_image(data)
            pytest.fail(f"{name} loaded")
    start = time.monotonic()
    # Each input loads in milliseconds; one that hangs the decoder takes minutes. The limits leave a busy shared
    # machine a wide margin (10 s for one input, 300 s for all) and still catch a hang.
    report = fuzz_images.fuzz(3000, seed=20240611, time_limit=10.0, corpus=corpus)
    assert report.count == 3000 and sum(report.outcomes.values()) == 3000
    assert not report.bugs, report.summary()
    assert not report.too_slow, report.summary()
    assert report.slowest is not None and report.slowest.seconds < 10.0
    assert set(report.by_format) == formats
    assert report.outcomes["loaded"] > 0 and report.outcomes["ImageDecodeError"] > 0  # both paths exercised
    assert time.monotonic() - start < 300
