"""Loading images: the one place where images enter the package.

Images come from two kinds of callers:

* the Python API and the CLI, where the caller is trusted and may name any local file;
* agent-facing tools and the HTTP server, where an LLM picks the argument, steered by whatever text it has read.

:func:`load_image` accepts every supported source (a PIL image, a numpy array, encoded bytes, a path, a ``data:``
URL, an ``http(s)://`` URL, raw base64 or a small dict) and returns a plain, fully loaded RGB
:class:`PIL.Image.Image`. What it may read is decided by an :class:`ImagePolicy`:

* ``ImagePolicy()`` is the *restricted* policy: local files only inside the current working directory (as it was
  when the policy was made), no URLs. Safety is the default; agent tools use it.
* ``ImagePolicy.trusted()`` reads any local path (still no URLs); ``load_image(source)`` without a policy uses it.

Every failure raises a subclass of :class:`~belle_vl_tools.errors.ImageError` whose message says what was wrong
(the path, the URL, the limit and the actual size) and what to do next. Decoder exceptions from PIL, zlib and
friends never escape; ``KeyboardInterrupt`` and ``MemoryError`` are not swallowed.

This module needs only the standard library, Pillow and (imported lazily, for arrays and high bit depth images)
numpy.
"""

from __future__ import annotations

import base64
import binascii
import concurrent.futures
import contextlib
import dataclasses
import errno
import functools
import hashlib
import http.client
import io
import ipaddress
import logging
import os
import re
import socket
import ssl
import stat
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, cast

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import (
    ImageAccessDeniedError,
    ImageDecodeError,
    ImageError,
    ImageFetchError,
    ImageNotFoundError,
    ImageTooLargeError,
    InvalidImageDataError,
    UnsupportedImageError,
)

if TYPE_CHECKING:  # pragma: no cover
    import numpy

__all__ = [
    "DEFAULT_IMAGE_FORMATS",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_REDIRECTS",
    "DEFAULT_URL_TIMEOUT",
    "Fetcher",
    "ImagePolicy",
    "ImageSource",
    "check_url",
    "describe_source",
    "fetch_url",
    "image_digest",
    "load_image",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
"""Largest encoded image (file, bytes, decoded base64, download) accepted by default: 20 MiB."""

DEFAULT_MAX_PIXELS = 40_000_000
"""Largest image (width x height) decoded by default; checked from the header before any pixel is decoded."""

DEFAULT_URL_TIMEOUT = 10.0
"""Seconds each network operation (connect, each read) may take by default."""

DEFAULT_URL_TOTAL_TIMEOUT = 60.0
"""Seconds a whole download, redirects included, may take by default."""

DEFAULT_MAX_REDIRECTS = 5
"""Redirects followed by the default fetcher before it gives up."""

DEFAULT_IMAGE_FORMATS: frozenset[str] = frozenset({"PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "ICO", "PPM", "AVIF"})
"""Pillow format names decoded by default: the common raster formats. Formats that hand data to external programs
(EPS runs Ghostscript) or that are rarely seen and weakly tested are left out; ``allowed_formats=None`` allows all."""

_FORMAT_ORDER = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "ICO", "PPM", "AVIF", "HEIF")

Fetcher: TypeAlias = "Callable[[str, ImagePolicy], bytes]"
"""A URL fetcher: ``fetcher(url, policy) -> bytes``; it should honour the policy's limits."""

ImageSource: TypeAlias = (
    "Image.Image | numpy.ndarray | bytes | bytearray | memoryview | str | os.PathLike[str] | Mapping[str, Any]"
)
"""Everything :func:`load_image` accepts."""

_MESSAGE_PREVIEW = 80  # characters of user data quoted in messages at most


# ---------------------------------------------------------------------------------------------------------------
# Policy
# ---------------------------------------------------------------------------------------------------------------


def _cwd_roots() -> tuple[Path, ...]:
    return (Path.cwd(),)


def _normalise_host(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host.rstrip(".")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImagePolicy:
    """What :func:`load_image` may read, and how much.

    ``ImagePolicy()`` is the **restricted** policy (the safe default, used by agent tools): local files only under
    the current working directory as it was when the policy was created, no URLs. Use :meth:`trusted` for the
    Python API and the CLI, :meth:`restricted` to name other folders, and :func:`dataclasses.replace` to derive a
    variant of an existing policy.

    Attributes:
        allowed_roots: Folders local files must lie in, or ``None`` for any local path. Paths are resolved with
            symbolic links followed before the check, so ``../`` tricks and links pointing outside are refused;
            the file is then opened one path component at a time below the allowed folder, never following a
            symbolic link, so a folder swapped for a link between the check and the open cannot lead outside.
            Relative paths are taken relative to the current working directory. Defaults to ``(Path.cwd(),)``.
            Error messages of a confined policy name paths relative to the allowed folder, never its absolute
            location.
        allow_local_files: Whether local paths are read at all.
        allow_hard_links: Whether a confined policy (``allowed_roots`` set) reads files with more than one hard
            link. Off by default: a hard link inside an allowed folder may name a file that also lies outside it,
            which no path check can see. Ignored when ``allowed_roots`` is ``None``.
        allow_urls: Whether ``http://`` and ``https://`` URLs are fetched. ``file://`` and every other scheme are
            always refused (pass a plain path instead).
        allow_private_urls: Whether URLs may reach loopback, private, link-local, reserved, multicast or
            unspecified addresses (IPv4 and IPv6, IPv4-mapped IPv6 included) and names like ``localhost``.
            When ``False`` every redirect hop is checked too, and host names are resolved and checked before any
            connection is made (every resolved address must be public).
        allowed_url_hosts: Exceptions to the private-address rule, e.g. an internal image store: host names
            (matched exactly, case-insensitively, against the URL's host) and IP addresses or networks such as
            ``"10.20.0.0/16"`` (matched against the resolved addresses, so an address entry admits every name that
            resolves into it, a redirect hop's included; list a host name instead to admit that name alone). URLs
            still need ``allow_urls=True``.
        allowed_formats: Pillow format names that may be decoded (``None``: every format Pillow knows). Defaults
            to :data:`DEFAULT_IMAGE_FORMATS`.
        max_bytes: Largest encoded image in bytes (files, bytes, base64 after decoding, downloads).
        max_pixels: Largest ``width * height``, checked from the header before pixels are decoded (the
            decompression bomb guard). Every frame, page and embedded picture of a container (ICO/CUR icons and
            their embedded PNGs, TIFF pages, GIF/APNG/WebP animation frames) is checked from its header too, and
            Pillow's own bomb check refuses anything larger while this policy's image is decoded. Pillow's limit
            (``PIL.Image.MAX_IMAGE_PIXELS``, about 89 million) applies too: images above it are refused even when
            ``max_pixels`` is higher.
        url_timeout: Seconds each network operation of a download may take.
        url_total_timeout: Seconds a whole download may take: connecting, the TLS handshake, the response
            headers, every redirect and the body together (checked on every read and write of the socket).
        max_redirects: Redirects the default fetcher follows (each hop re-checked against this policy).
        fetcher: ``fetcher(url, policy) -> bytes`` used for allowed URLs instead of :func:`fetch_url`. The URL has
            passed :func:`check_url` (scheme, ``allow_urls``, literal addresses) but host names are not resolved
            for a custom fetcher: it should call ``check_url(url, policy, resolve=True)`` itself if it connects
            directly. Its result is still held to ``max_bytes``.
    """

    allowed_roots: tuple[Path, ...] | None = dataclasses.field(default_factory=_cwd_roots)
    allow_local_files: bool = True
    allow_hard_links: bool = False
    allow_urls: bool = False
    allow_private_urls: bool = False
    allowed_url_hosts: frozenset[str] = frozenset()
    allowed_formats: frozenset[str] | None = DEFAULT_IMAGE_FORMATS
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    url_timeout: float = DEFAULT_URL_TIMEOUT
    url_total_timeout: float = DEFAULT_URL_TOTAL_TIMEOUT
    max_redirects: int = DEFAULT_MAX_REDIRECTS
    fetcher: Fetcher | None = None

    def __post_init__(self) -> None:
        set_ = functools.partial(object.__setattr__, self)
        roots: Any = self.allowed_roots  # callers may give str or path-like folders: normalised here
        if roots is not None:
            if isinstance(roots, (str, os.PathLike)):
                roots = (roots,)
            set_("allowed_roots", tuple(Path(os.fsdecode(r)).expanduser().resolve() for r in roots))
        hosts = self.allowed_url_hosts
        if isinstance(hosts, str):
            hosts = (hosts,)
        set_("allowed_url_hosts", frozenset(_normalise_host(h) for h in hosts if h and h.strip()))
        if self.allowed_formats is not None:
            formats = (self.allowed_formats,) if isinstance(self.allowed_formats, str) else self.allowed_formats
            set_("allowed_formats", frozenset(f.upper() for f in formats))
        for name in ("max_bytes", "max_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ImagePolicy.{name} must be a positive integer, got {value!r}")
        if isinstance(self.max_redirects, bool) or not isinstance(self.max_redirects, int) or self.max_redirects < 0:
            raise ValueError(f"ImagePolicy.max_redirects must be an integer >= 0, got {self.max_redirects!r}")
        for name in ("url_timeout", "url_total_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"ImagePolicy.{name} must be a positive number of seconds, got {value!r}")
        if self.fetcher is not None and not callable(self.fetcher):
            raise ValueError(f"ImagePolicy.fetcher must be callable as fetcher(url, policy), got {self.fetcher!r}")

    @classmethod
    def trusted(cls, **overrides: Any) -> ImagePolicy:
        """Policy for a trusted caller (Python API, CLI): any local path; URLs stay off unless overridden."""
        overrides.setdefault("allowed_roots", None)
        return cls(**overrides)

    @classmethod
    def restricted(
        cls, roots: Iterable[str | os.PathLike[str]] | str | os.PathLike[str] | None = None, **overrides: Any
    ) -> ImagePolicy:
        """Policy for untrusted callers (agent tools): local files only under ``roots``, no URLs unless overridden.

        ``roots`` defaults to the current working directory; a single folder may be given without a tuple.
        """
        if "allowed_roots" in overrides:
            raise TypeError("ImagePolicy.restricted() takes the folders as `roots`, not `allowed_roots`")
        if roots is None:
            roots = _cwd_roots()
        elif isinstance(roots, (str, os.PathLike)):
            roots = (roots,)
        return cls(allowed_roots=tuple(Path(os.fsdecode(r)) for r in roots), **overrides)

    # --- helpers used by the loader ------------------------------------------------------------------------
    def _allowed_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        networks = []
        for entry in self.allowed_url_hosts:
            try:
                networks.append(ipaddress.ip_network(entry.split("%", 1)[0], strict=False))
            except ValueError:
                continue
        return networks


# ---------------------------------------------------------------------------------------------------------------
# Describing sources (for messages and logs, never dumping data)
# ---------------------------------------------------------------------------------------------------------------


def _short(text: str, limit: int = _MESSAGE_PREVIEW) -> str:
    """``text`` cut to ``limit`` characters, with the number of characters left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit:,} more characters)"


def _cap(text: str) -> str:
    """``text`` with its first letter upper-cased, for labels that start a message."""
    return text[:1].upper() + text[1:]


def _describe_url(url: str) -> str:
    """A URL without credentials, query string or fragment (those may hold tokens), shortened."""
    try:
        parts = urllib.parse.urlsplit(url)
        netloc = parts.netloc.rpartition("@")[2]
        shown = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))
        if parts.query:
            shown += "?..."
    except ValueError:
        shown = url
    return _short(shown, 200)


def _magic_name(data: bytes | bytearray | memoryview) -> str | None:
    try:
        head = bytes(data[:16])
    except (TypeError, ValueError, NotImplementedError):  # exotic memoryviews
        return None
    checks = (
        (b"\x89PNG\r\n\x1a\n", "PNG"),
        (b"\xff\xd8\xff", "JPEG"),
        (b"GIF87a", "GIF"),
        (b"GIF89a", "GIF"),
        (b"II*\x00", "TIFF"),
        (b"MM\x00*", "TIFF"),
        (b"\x00\x00\x01\x00", "ICO"),
    )
    for prefix, name in checks:
        if head.startswith(prefix):
            return name
    if head[:2] == b"BM" and head[6:10] == b"\x00\x00\x00\x00":  # the reserved header fields
        return "BMP"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[4:8] == b"ftyp":
        return "AVIF/HEIF"
    if re.match(rb"P[1-6]\s", head):
        return "PPM"
    return None


def describe_source(source: object) -> str:
    """A short human-readable description of an image source, safe for messages and logs.

    Never contains image data or long strings: base64 and data URLs are summarised by their length, URLs lose
    credentials and query strings, long paths are shortened.
    """
    if isinstance(source, Image.Image):
        return f"PIL image {source.width}x{source.height} mode {source.mode}"
    numpy_module = sys.modules.get("numpy")
    if numpy_module is not None and isinstance(source, numpy_module.ndarray):
        return f"numpy array of shape {tuple(source.shape)} and dtype {source.dtype}"
    if isinstance(source, (bytes, bytearray, memoryview)):
        size = source.nbytes if isinstance(source, memoryview) else len(source)
        kind = _magic_name(source) if size else None
        return f"{size:,} bytes of image data" + (f" ({kind})" if kind else "")
    if isinstance(source, os.PathLike):
        return f"path {_short(os.fsdecode(source), 200)!r}"
    if isinstance(source, str):
        text = source.strip()
        if text[:5].lower() == "data:":
            header = text[5:].partition(",")[0]
            return f"data URL ({_short(header, 60) or 'no media type'}, {len(text):,} characters)"
        if re.match(r"[A-Za-z][A-Za-z0-9+.\-]+://", text):
            return f"URL {_describe_url(text)}"
        if _looks_like_base64(text):
            return f"base64 string ({len(text):,} characters)"
        return f"path {_short(source, 200)!r}"
    if isinstance(source, Mapping):
        keys = sorted(str(k) for k in source)[:8]
        return f"dict with keys {keys}"
    return f"object of type {type(source).__module__}.{type(source).__qualname__}"


# ---------------------------------------------------------------------------------------------------------------
# Decoding and conversion to RGB
# ---------------------------------------------------------------------------------------------------------------


def _numpy():  # imported lazily: numpy is only needed for arrays and high bit depth images
    import numpy

    return numpy


def _check_pixels(size: tuple[int, int], policy: ImagePolicy, label: str) -> None:
    width, height = size
    if width * height > policy.max_pixels:
        raise ImageTooLargeError(
            f"{_cap(label)} is {width}x{height} = {width * height:,} pixels, over the limit of "
            f"ImagePolicy.max_pixels={policy.max_pixels:,}. Downscale the image first, or raise max_pixels."
        )
    if width <= 0 or height <= 0:
        raise UnsupportedImageError(f"{_cap(label)} has no pixels (size {width}x{height}).")


def _check_bytes(size: int, policy: ImagePolicy, label: str) -> None:
    if size > policy.max_bytes:
        raise ImageTooLargeError(
            f"{_cap(label)} is {size:,} bytes, over the limit of ImagePolicy.max_bytes={policy.max_bytes:,}. "
            "Compress or downscale the image first, or raise max_bytes."
        )


def _check_pillow_limit(size: tuple[int, int], label: str) -> None:
    """Pillow's decompression-bomb threshold, whose warning is treated as an error (only reachable when
    ``ImagePolicy.max_pixels`` is set above it)."""
    limit = Image.MAX_IMAGE_PIXELS
    width, height = size
    if limit and width * height > limit:
        raise ImageTooLargeError(
            f"{_cap(label)} is {width}x{height} = {width * height:,} pixels, over Pillow's decompression-bomb limit "
            f"PIL.Image.MAX_IMAGE_PIXELS={limit:,}. Downscale the image first, or raise both that limit and "
            "ImagePolicy.max_pixels."
        )


# --- pixel limits inside containers -----------------------------------------------------------------------------
#
# Pillow checks an image's size against the global ``PIL.Image.MAX_IMAGE_PIXELS`` when it opens a file, when it
# opens a picture embedded in another (an ICO's PNG or BMP icons) and when frames of some formats grow the canvas;
# below twice that limit it only warns. Changing the global would be visible to every thread (and to other code in
# the process), so the policy's limit is applied per thread instead: while a load runs, Pillow's check function
# first refuses, as an error, any size over the limit of the policy this thread is loading under; other threads
# and other code see Pillow's own behaviour. Frame, page and icon sizes of containers are also read from their
# headers by the small walkers below before anything is decoded.

_limits = threading.local()
_hook_lock = threading.Lock()
_MAX_CONTAINER_ENTRIES = 4096  # icons, pages, frames or chunks looked at per file; more pages/icons are refused
_MAX_CHUNKS = 200_000  # PNG chunks / GIF blocks walked at most (a guard against pathological files)


class _FrameTooLarge(Image.DecompressionBombError):
    """Raised by the bomb check hook: an embedded picture or frame is over the policy's limit."""

    def __init__(self, size: tuple[int, int], limit: int) -> None:
        super().__init__(f"an embedded picture or frame of {size[0]}x{size[1]} pixels is over the limit of {limit:,}")
        self.size = size
        self.limit = limit


def _install_bomb_check_hook() -> None:
    """Wrap ``PIL.Image._decompression_bomb_check`` (once) so that it honours the calling thread's load limit."""
    original = getattr(Image, "_decompression_bomb_check", None)
    if original is None or getattr(original, "_belle_vl_hook", False):
        return
    with _hook_lock:
        original = Image._decompression_bomb_check
        if getattr(original, "_belle_vl_hook", False):
            return

        def checked(*args: Any, **kwargs: Any) -> None:
            # Pillow's readers call the check as check(size) and, since Pillow 13, some as
            # check(size, error_only=True); whatever else a later Pillow passes goes on to its own function
            # untouched, so the hook never decides which signatures exist.
            size = args[0] if args else kwargs.get("size")
            limit = getattr(_limits, "pixels", None)
            if limit is not None and size is not None and int(size[0]) * int(size[1]) > limit:
                raise _FrameTooLarge((int(size[0]), int(size[1])), limit)
            original(*args, **kwargs)

        checked._belle_vl_hook = True  # type: ignore[attr-defined]
        checked.__wrapped__ = original  # type: ignore[attr-defined]
        Image._decompression_bomb_check = checked


def _effective_pixel_limit(policy: ImagePolicy) -> int:
    """The policy's ``max_pixels``, or Pillow's ``MAX_IMAGE_PIXELS`` when that is lower."""
    pillow = Image.MAX_IMAGE_PIXELS
    return min(policy.max_pixels, pillow) if pillow else policy.max_pixels


@contextlib.contextmanager
def _pixel_limit(limit: int) -> Iterator[None]:
    """Within the block, Pillow's bomb check refuses (raises) sizes over ``limit`` in this thread."""
    _install_bomb_check_hook()
    previous = getattr(_limits, "pixels", None)
    _limits.pixels = limit if previous is None else min(previous, limit)
    try:
        yield
    finally:
        _limits.pixels = previous


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
    for index in range(count):
        entry = 6 + 16 * index
        if entry + 16 > len(data):
            return
        offset = _u32le(data, entry + 12)
        head = data[offset : offset + 24]
        if head[:8] == b"\x89PNG\r\n\x1a\n":
            yield from ((f"icon {index + 1} (an embedded PNG)", w, h) for _, w, h in _png_frames(data, offset))
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
    page = 0
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
        size = {256: 0, 257: 0}
        for at in range(start, end, entry_size):
            tag = int.from_bytes(data[at : at + 2], order)
            width = types.get(int.from_bytes(data[at + 2 : at + 4], order))
            if tag in size and width is not None:
                value_at = at + (12 if big else 8)
                size[tag] = int.from_bytes(data[value_at : value_at + width], order)
        yield f"page {page}", size[256], size[257]
        offset = int.from_bytes(data[end : end + next_size], order)


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


def _check_container(data: bytes, fmt: str | None, limit: int, policy: ImagePolicy, label: str) -> None:
    """Refuse a file any of whose frames, pages or embedded pictures is over ``limit`` pixels (headers only)."""
    walker = _FRAME_WALKERS.get(fmt or "")
    if walker is None:
        return
    try:
        for what, width, height in walker(data):
            if width * height > limit:
                raise ImageTooLargeError(
                    f"{_cap(label)} holds {what} of {width}x{height} = {width * height:,} pixels, over the limit of "
                    f"{_limit_text(policy, limit)}. Only the first picture is used, but a file hiding a huge one "
                    "is refused before anything is decoded: re-export the picture on its own."
                )
    except _TooManyFrames as exc:
        raise ImageTooLargeError(
            f"{_cap(label)} holds more than {_MAX_CONTAINER_ENTRIES:,} {exc.what}; only the first picture is used. "
            "Re-export the picture on its own."
        ) from None


#: Scans of a progressive JPEG that cost nothing extra (encoders write about 10); each scan past them is charged.
JPEG_FREE_SCANS = 12
#: Most pixel-scans past the free ones a JPEG may cost: a progressive JPEG's decoding time grows with its
#: scans x pixels, which neither the byte nor the pixel limit bounds (2,000 repeats of a 16 MP picture's last scan
#: fit in 156 KB and decode for over a minute); 4e8 is about a second of decoding here.
JPEG_MAX_EXTRA_PIXEL_SCANS = 400_000_000


def _check_decode_cost(data: bytes, fmt: str | None, size: tuple[int, int], label: str) -> None:
    """Refuse a picture whose decoding cost is not bounded by its bytes and pixels: a JPEG with many scans.

    Scans are counted by their start-of-scan markers (FF DA), which the entropy-coded data cannot contain (its
    FF bytes are stuffed with 00), so the count is exact for the image and at most an embedded thumbnail's more."""
    if fmt != "JPEG":
        return
    scans = data.count(b"\xff\xda")
    extra = max(0, scans - JPEG_FREE_SCANS) * size[0] * size[1]
    if extra > JPEG_MAX_EXTRA_PIXEL_SCANS:
        raise ImageTooLargeError(
            f"{_cap(label)} is a progressive JPEG of {size[0]}x{size[1]} pixels in {scans:,} scans, far more than an "
            "encoder writes (about 10); decoding it would take minutes. Re-save it as a baseline JPEG or as PNG."
        )


def _limit_text(policy: ImagePolicy, limit: int) -> str:
    if limit < policy.max_pixels:
        return f"PIL.Image.MAX_IMAGE_PIXELS={limit:,}"
    return f"ImagePolicy.max_pixels={policy.max_pixels:,}"


def _pillow_formats() -> frozenset[str]:
    Image.init()  # cheap after the first call; plugins registered later (e.g. HEIF) are seen too
    return frozenset(Image.OPEN)


def _open_formats(policy: ImagePolicy) -> tuple[str, ...] | None:
    if policy.allowed_formats is None:
        return None
    known = _pillow_formats()
    ordered = [f for f in _FORMAT_ORDER if f in policy.allowed_formats]
    ordered += sorted(policy.allowed_formats.difference(_FORMAT_ORDER))
    return tuple(f for f in ordered if f in known)


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


def _unidentified_message(data: bytes, policy: ImagePolicy, label: str, private: bool = False) -> str:
    formats = _open_formats(policy)
    kind = _magic_name(data)
    size = "" if private else f" ({len(data):,} bytes)"
    message = f"{_cap(label)}{size} is not a readable image"
    if formats is not None:
        message += f" in one of the allowed formats ({', '.join(formats)})"
    message += "."
    if kind is not None and formats is not None and not set(kind.split("/")) & set(formats):
        message += (
            f" It looks like a {kind} file, a format this policy does not decode; convert it to PNG or JPEG, or "
            "(if you configure the tool) add the format to ImagePolicy(allowed_formats=...)."
        )
    elif kind is not None:
        message += f" It starts like a {kind} file but its header is damaged or truncated; re-export it."
    else:
        message += _sniff_hint(data)
        if formats is not None:
            message += " If it is another format Pillow can read, allow it with ImagePolicy(allowed_formats=None)."
    return message


def _decode_bytes(data: bytes, policy: ImagePolicy, label: str, *, private: bool = False) -> Image.Image:
    """Decode encoded image bytes to a fresh RGB image, or raise an ImageError subclass.

    ``private``: the data is a local file's; messages then do not tell its size (the file may be anything, e.g. a
    prompt naming ``/etc/passwd``).
    """
    if not data:
        raise ImageDecodeError(f"{_cap(label)} is empty (0 bytes): there is no image in it.")
    _check_bytes(len(data), policy, label)
    limit = _effective_pixel_limit(policy)
    try:
        with _pixel_limit(limit), Image.open(io.BytesIO(data), formats=_open_formats(policy)) as image:
            _check_pixels(image.size, policy, label)  # header only: no pixel is decoded yet
            _check_pillow_limit(image.size, label)
            _check_container(data, image.format, limit, policy, label)
            _check_decode_cost(data, image.format, image.size, label)
            image.load()
            _check_pixels(image.size, policy, label)
            return _finish(image, policy, label, owned=True)
    except (ImageError, MemoryError):
        raise
    except _FrameTooLarge as exc:
        width, height = exc.size
        raise ImageTooLargeError(
            f"{_cap(label)} is or holds a picture of {width}x{height} = {width * height:,} pixels, over the limit "
            f"of {_limit_text(policy, exc.limit)} (the decompression-bomb guard); it was refused before being "
            "decoded. Downscale the image first."
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(
            f"{_cap(label)} is too large to decode safely: {exc} Downscale the image first (Pillow's own limit, "
            f"PIL.Image.MAX_IMAGE_PIXELS, applies besides ImagePolicy.max_pixels={policy.max_pixels:,})."
        ) from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(_unidentified_message(data, policy, label, private)) from exc
    except Exception as exc:  # PIL, zlib and codec errors of every kind: corrupt or truncated data
        size = "" if private else f" ({len(data):,} bytes)"
        raise ImageDecodeError(
            f"{_cap(label)}{size} could not be decoded ({type(exc).__name__}: {_short(str(exc))}). "
            "The data is probably corrupt or truncated: re-export it as PNG or JPEG."
        ) from exc


def _finish(image: Image.Image, policy: ImagePolicy, label: str, *, owned: bool) -> Image.Image:
    """EXIF orientation, then RGB with transparency on white: always a new, independent image.

    ``owned``: the image was decoded here, so it may be rotated in place (saves a copy of a large image); an image
    of the caller's is never modified.
    """
    oriented = image
    try:
        if owned:
            ImageOps.exif_transpose(image, in_place=True)
        else:
            oriented = ImageOps.exif_transpose(image)
    except MemoryError:
        raise
    except Exception as exc:  # a broken EXIF block should not make an otherwise good image unusable
        logger.debug("ignoring unreadable EXIF orientation of %s: %r", label, exc)
        oriented = image
    _check_pixels(oriented.size, policy, label)
    return _to_rgb(oriented, label)


_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa"})


def _to_rgb(image: Image.Image, label: str) -> Image.Image:
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        image = _high_bit_to_l(image)
        mode = "L"
    elif mode == "LAB":
        return _lab_to_rgb(image, label)
    if mode in _ALPHA_MODES or (mode in ("1", "L", "P", "RGB") and image.info.get("transparency") is not None):
        try:
            rgba = image.convert("RGBA")
        except ValueError as exc:
            raise UnsupportedImageError(
                f"{_cap(label)} has mode {mode!r}, whose transparency cannot be converted ({exc}). "
                "Convert it to RGBA first."
            ) from exc
        return _composite_on_white(rgba)
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise UnsupportedImageError(
            f"{_cap(label)} has mode {mode!r}, which cannot be converted to RGB ({exc}). Convert it to RGB first."
        ) from exc


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    low, _high = rgba.getchannel("A").getextrema()
    if low == 255:
        return rgba.convert("RGB")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


@functools.lru_cache(maxsize=1)
def _sixteen_to_eight_bit_table():
    np = _numpy()
    return ((np.arange(65536, dtype=np.uint32) + 128) // 257).astype(np.uint8)  # round(v / 257)


def _high_bit_to_l(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float grayscale to 8-bit.

    ``I;16*``: value / 257 (full 16-bit range). ``I``: kept if within 0..255, divided by 257 if within 0..65535,
    else stretched from its minimum to its maximum. ``F``: times 255 if within 0..1, kept if within 0..255, else
    stretched; NaN and infinities become 0.
    """
    np = _numpy()
    values = np.asarray(image)
    if image.mode.startswith("I;16"):
        return Image.fromarray(_sixteen_to_eight_bit_table()[values])
    if image.mode == "F":
        values = values.astype(np.float32)  # a writable copy
        finite = np.isfinite(values)
        if not finite.all():
            values[~finite] = 0.0
    low, high = values.min().item(), values.max().item()
    if image.mode != "F" and low >= 0 and high <= 255:
        return Image.fromarray(values.astype(np.uint8))
    if image.mode != "F" and low >= 0 and high <= 65535:
        return Image.fromarray(_sixteen_to_eight_bit_table()[values.astype(np.uint16)])
    values = values.astype(np.float32, copy=image.mode != "F")
    if image.mode == "F" and low >= 0.0 and high <= 1.0:
        values *= 255.0
    elif image.mode == "F" and low >= 0.0 and high <= 255.0:
        pass
    elif high > low:
        values -= low
        values *= 255.0 / (high - low)
    else:
        values[...] = 0.0
    np.rint(values, out=values)
    np.clip(values, 0.0, 255.0, out=values)
    return Image.fromarray(values.astype(np.uint8))


@functools.lru_cache(maxsize=1)
def _lab_transform():
    from PIL import ImageCms

    return ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")


def _lab_to_rgb(image: Image.Image, label: str) -> Image.Image:
    try:
        from PIL import ImageCms

        return cast(Image.Image, ImageCms.applyTransform(image, _lab_transform()))  # None only when in place
    except (ImportError, OSError, ValueError, AttributeError) as exc:
        raise UnsupportedImageError(
            f"{_cap(label)} is a CIE L*a*b* image and this Pillow cannot convert it to RGB ({exc}). "
            "Convert it to RGB with a colour-managed tool first."
        ) from exc


def _from_pil(image: Image.Image, policy: ImagePolicy) -> Image.Image:
    label = f"the given {describe_source(image)}"
    _check_pixels(image.size, policy, label)
    limit = _effective_pixel_limit(policy)
    try:
        with _pixel_limit(limit):
            image.load()
    except (ImageError, MemoryError):
        raise
    except _FrameTooLarge as exc:
        raise ImageTooLargeError(
            f"{_cap(label)} holds a picture of {exc.size[0]}x{exc.size[1]} pixels, over the limit of "
            f"{_limit_text(policy, exc.limit)}; it was refused before being decoded."
        ) from None
    except Exception as exc:
        raise ImageDecodeError(
            f"{_cap(label)} could not be loaded ({type(exc).__name__}: {_short(str(exc))}); its file may be corrupt."
        ) from exc
    try:
        return _finish(image, policy, label, owned=False)
    except (ImageError, MemoryError):
        raise
    except Exception as exc:
        raise UnsupportedImageError(
            f"{_cap(label)} could not be converted to RGB ({type(exc).__name__}: {_short(str(exc))})."
        ) from exc


def _from_array(array: numpy.ndarray, policy: ImagePolicy) -> Image.Image:
    np = _numpy()
    label = describe_source(array)
    shape = tuple(array.shape)
    if not (array.ndim == 2 or (array.ndim == 3 and shape[2] in (1, 3, 4))):
        raise UnsupportedImageError(
            f"Cannot use a {label}: expected HxW (gray), HxWx3 (RGB) or HxWx4 (RGBA). "
            "Channel-first arrays (CxHxW) must be transposed, e.g. array.transpose(1, 2, 0)."
        )
    _check_pixels((shape[1], shape[0]), policy, label)
    if array.dtype == np.uint8:
        pixels = array
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise UnsupportedImageError(f"Cannot use a {label}: it contains NaN or infinite values.")
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            raise UnsupportedImageError(
                f"Cannot use a {label}: float pixels must lie in [0, 1], these range from {low:g} to {high:g}. "
                "Divide by 255 (or clip) first, or pass uint8."
            )
        pixels = np.rint(array.astype(np.float64) * 255.0).astype(np.uint8)
    else:
        raise UnsupportedImageError(
            f"Cannot use a {label}: the dtype must be uint8, or float with values in [0, 1]. "
            "Convert it first, e.g. array.astype(numpy.uint8)."
        )
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    image = Image.fromarray(np.ascontiguousarray(pixels))
    return _to_rgb(image, label)


# ---------------------------------------------------------------------------------------------------------------
# Base64 and data URLs
# ---------------------------------------------------------------------------------------------------------------

_BASE64_RE = re.compile(r"[A-Za-z0-9+/\-_]+={0,2}")
_WHITESPACE_RE = re.compile(r"\s+")
_URLSAFE_TO_STANDARD = str.maketrans("-_", "+/")
_NOT_BASE64_RE = re.compile(r"[^A-Za-z0-9+/=]")


def _looks_like_base64(text: str) -> bool:
    """Whether a string that is not a path should be read as raw base64 image data.

    Only the base64 alphabet (standard or URL-safe, whitespace ignored) and either a known image signature in the
    first bytes or at least 256 characters; dots never occur in base64, so ``cat.png`` is always a path.
    """
    if len(text) < 16 or "." in text:
        return False
    compact = _WHITESPACE_RE.sub("", text)
    if not _BASE64_RE.fullmatch(compact):
        return False
    try:
        head = base64.b64decode(compact[:16].translate(_URLSAFE_TO_STANDARD), validate=True)
    except (binascii.Error, ValueError):
        return False
    return _magic_name(head) is not None or len(compact) >= 256


def _decode_base64(text: str, policy: ImagePolicy, label: str) -> bytes:
    compact = _WHITESPACE_RE.sub("", text)
    if not compact:
        raise InvalidImageDataError(f"{_cap(label)} is empty: there is no base64 data in it.")
    decoded_size = len(compact.rstrip("=")) * 3 // 4  # known before decoding anything
    if decoded_size > policy.max_bytes:
        raise ImageTooLargeError(
            f"{_cap(label)} has {len(compact):,} base64 characters, which decode to {decoded_size:,} bytes, over the "
            f"limit of ImagePolicy.max_bytes={policy.max_bytes:,}. Send a smaller image."
        )
    if "-" in compact or "_" in compact:
        compact = compact.translate(_URLSAFE_TO_STANDARD)
    remainder = len(compact) % 4
    if remainder == 1:
        raise InvalidImageDataError(
            f"{_cap(label)} is not valid base64: its length ({len(compact):,} characters) is impossible for base64 "
            "(the data may be cut off). Send the complete base64 encoding of the image file."
        )
    if remainder and not compact.endswith("="):
        compact += "=" * (4 - remainder)
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        bad = _NOT_BASE64_RE.search(compact)
        detail = f"character {bad.group()!r} is not in the base64 alphabet" if bad else str(exc)
        raise InvalidImageDataError(
            f"{_cap(label)} is not valid base64 ({detail}); starts with {_short(text.strip(), 24)!r}. "
            "Send the standard base64 encoding of the image file."
        ) from exc
    _check_bytes(len(data), policy, label)
    return data


def _decode_data_url(url: str, policy: ImagePolicy) -> bytes:
    header, comma, payload = url[5:].partition(",")
    label = f"data URL ({_short(header, 60) or 'no media type'})"
    if not comma:
        raise InvalidImageDataError(
            f"The {label} has no ',' separating its header from the data; use the form "
            "'data:image/png;base64,<base64 data>'."
        )
    params = [p.strip().lower() for p in header.split(";")]
    media_type = params[0]
    if "base64" not in params[1:]:
        raise InvalidImageDataError(
            f"The {label} is not base64-encoded: only 'data:<image type>;base64,<data>' is accepted. "
            "Encode the image file with base64 and add ';base64' to the header."
        )
    if media_type and not (media_type.startswith("image/") or media_type in ("application/octet-stream", "binary")):
        raise InvalidImageDataError(
            f"The {label} declares the media type {media_type!r}, which is not an image; use e.g. "
            "'data:image/png;base64,...'."
        )
    if "%" in payload:
        payload = urllib.parse.unquote(payload)
    return _decode_base64(payload, policy, label)


# ---------------------------------------------------------------------------------------------------------------
# Local files
# ---------------------------------------------------------------------------------------------------------------


def _is_within(path: Path, root: Path) -> bool:
    """Whether ``path`` is ``root`` or below it (both absolute and normalised; compared as strings, which is
    exact for such paths and much cheaper than walking ``path.parents``)."""
    text, base = str(path), str(root)
    return text == base or text.startswith(base if base.endswith(os.sep) else base + os.sep)


def _roots_text(roots: tuple[Path, ...], confined: bool) -> str:
    """The allowed folders for a message: full paths for a trusted caller's policy, only the folder names for a
    confined one (its messages reach agents and clients, who must not learn the server's folders)."""
    if not roots:
        return "none"
    return ", ".join(repr(r.name or str(r)) if confined else str(r) for r in roots)


def _shown_path(text: str, resolved: Path | None, policy: ImagePolicy) -> str:
    """How a path appears in messages. Under a confined policy a relative path is shown as given and an absolute
    one relative to its allowed folder, so that messages never carry the server's absolute folders."""
    roots = policy.allowed_roots
    if roots is None or not (os.path.isabs(text) or text.startswith("~")):
        return repr(_short(text, 200))
    lexical = Path(os.path.abspath(os.path.expanduser(text)))
    for candidate in (lexical, resolved):
        if candidate is None:
            continue
        for root in roots:
            if _is_within(candidate, root):
                relative = os.path.relpath(candidate, root).replace(os.sep, "/")
                return repr(_short(relative, 200))
    return repr(_short(text, 200))  # outside every allowed folder: the caller's own text


def _locate(raw: str | os.PathLike[str], policy: ImagePolicy) -> tuple[Path, str, Path | None]:
    """The resolved path, its form for messages, and the allowed folder it lies in (``None`` when unconfined)."""
    text = os.fsdecode(raw)
    shown = repr(_short(text, 200))
    if not policy.allow_local_files:
        shown = _shown_path(text, None, policy) if "\x00" not in text else shown
        raise ImageAccessDeniedError(
            f"Refused to read the local path {shown}: reading local files is disabled by "
            "ImagePolicy(allow_local_files=False). Pass the image as base64 or a data URL instead."
        )
    if not text:
        raise ImageNotFoundError("The image source is an empty string: pass a path, URL, data URL or base64 data.")
    if "\x00" in text:
        raise ImageNotFoundError(f"The path {shown} contains a NUL character, so it cannot name a file.")
    roots = policy.allowed_roots
    try:
        resolved = Path(text).expanduser().resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # symlink loops, unusable names
        detail = "a loop of symbolic links or an unusable name" if roots is not None else str(exc)
        raise ImageNotFoundError(f"The path {shown} cannot be resolved ({detail}).") from exc
    if roots is None:
        return resolved, shown, None
    shown = _shown_path(text, resolved, policy)
    root = next((r for r in roots if _is_within(resolved, r)), None)
    if root is None:
        raise ImageAccessDeniedError(
            f"Refused to read {shown}: it lies outside the folders images may be read from "
            f"({_roots_text(roots, True)}); '..' and symbolic links are resolved before this check. Pass a path "
            "inside one of them, or (if you configure the tool) add its folder to ImagePolicy(allowed_roots=...)."
        )
    return resolved, shown, root


def _resolve_local_path(raw: str | os.PathLike[str], policy: ImagePolicy) -> tuple[Path, str]:
    """The resolved path and its form for messages; raises when the policy refuses the path."""
    resolved, shown, _root = _locate(raw, policy)
    return resolved, shown


def _flag(name: str) -> int:
    return getattr(os, name, 0)


_FILE_FLAGS = os.O_RDONLY | _flag("O_BINARY") | _flag("O_NONBLOCK") | _flag("O_NOCTTY") | _flag("O_CLOEXEC")
_DIR_FLAGS = os.O_RDONLY | _flag("O_DIRECTORY") | _flag("O_NOFOLLOW") | _flag("O_CLOEXEC")
_CONFINED_OPEN = (
    os.open in os.supports_dir_fd and hasattr(os, "O_NOFOLLOW") and hasattr(os, "O_DIRECTORY")
)  # openat() with O_NOFOLLOW per component: POSIX systems


class _PathChanged(OSError):
    """A path component turned into a symbolic link between the check and the open."""


def _open_beneath(root: Path, resolved: Path) -> int:
    """Open ``resolved`` (a path without symbolic links, inside ``root``) one component at a time from a file
    descriptor of ``root``, following no symbolic link, so no rename or swap made meanwhile can lead outside."""
    parts = Path(os.path.relpath(resolved, root)).parts if resolved != root else ()
    if not parts:
        raise IsADirectoryError(str(resolved))
    fd = os.open(root, _DIR_FLAGS)
    try:
        for part in parts[:-1]:
            try:
                inner = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise _PathChanged(exc.errno, exc.strerror) from exc
                raise
            os.close(fd)
            fd = inner
        try:
            return os.open(parts[-1], _FILE_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _PathChanged(exc.errno, exc.strerror) from exc
            raise
    finally:
        os.close(fd)


def _read_local_file(raw: str | os.PathLike[str], policy: ImagePolicy) -> tuple[bytes, str]:
    resolved, shown, root = _locate(raw, policy)
    label = f"the file {shown}"
    try:
        if root is not None and _CONFINED_OPEN:
            fd = _open_beneath(root, resolved)
        else:
            fd = os.open(resolved, _FILE_FLAGS | _flag("O_NOFOLLOW"))
    except _PathChanged as exc:
        raise ImageAccessDeniedError(
            f"Refused to read {shown}: a folder or file on its path was replaced by a symbolic link while it was "
            "being opened. Pass a path to a regular file inside the allowed folders."
        ) from exc
    except FileNotFoundError as exc:
        where = ""
        if root is None and not Path(os.fsdecode(raw)).is_absolute():
            where = f" (relative to the current folder {Path.cwd()})"
        elif root is not None:
            where = " in the folders images may be read from"
        raise ImageNotFoundError(
            f"No such file: {shown}{where}. Check the spelling and the folder, or pass the image as a URL or "
            "base64 data."
        ) from exc
    except IsADirectoryError as exc:
        raise ImageNotFoundError(
            f"{shown} is a folder, not an image file: pass the path of an image file inside it."
        ) from exc
    except NotADirectoryError as exc:
        raise ImageNotFoundError(f"No such file: {shown} (a part of the path is a file, not a folder).") from exc
    except PermissionError as exc:
        raise ImageAccessDeniedError(f"The operating system does not allow reading {shown} ({exc.strerror}).") from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ImageAccessDeniedError(
                f"Refused to read {shown}: it is a symbolic link that changed while being opened."
            ) from exc
        raise ImageNotFoundError(f"Cannot open {shown}: {exc.strerror or exc}.") from exc
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ImageNotFoundError(
                f"{shown} is a folder, not an image file: pass the path of an image file inside it."
            )
        if not stat.S_ISREG(info.st_mode):
            raise ImageNotFoundError(f"{shown} is not a regular file (a device, pipe or socket): pass an image file.")
        if root is not None and not policy.allow_hard_links:
            if info.st_nlink > 1:
                raise ImageAccessDeniedError(
                    f"Refused to read {shown}: the file has {info.st_nlink} hard links, and a hard link inside the "
                    "allowed folders may name a file that lies outside them. Pass a copy of the image, or (if you "
                    "configure the tool) allow it with ImagePolicy(allow_hard_links=True)."
                )
            if not _still_linked_here(fd, info, resolved, root):
                raise ImageAccessDeniedError(
                    f"Refused to read {shown}: the file was renamed, replaced or re-linked while it was being "
                    "opened. Pass a path to a regular file inside the allowed folders that is not being changed."
                )
        _check_file_bytes(info.st_size, policy, label)
        chunks: list[bytes] = []
        total = 0
        while total <= policy.max_bytes:
            chunk = os.read(fd, min(1 << 20, policy.max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        _check_file_bytes(total, policy, label)  # the file grew while being read
        return b"".join(chunks), label
    except ImageError:
        raise
    except OSError as exc:
        raise ImageNotFoundError(f"Reading {shown} failed: {exc.strerror or exc}.") from exc
    finally:
        os.close(fd)


_PROC_FD = Path("/proc/self/fd")


def _still_linked_here(fd: int, info: os.stat_result, resolved: Path, root: Path) -> bool:
    """Whether the name opened as ``fd`` is, after ``info`` (its ``fstat``, one link) was taken, still a live link
    of the file, inside ``root``: then that one link was this name, so the file lies nowhere outside.

    A link count alone cannot tell: a name inside the folder may be a second link of a file outside it when it is
    opened, and be renamed over (dropping the count to one) before the count is read. On Linux the opened name
    itself is asked (``/proc/self/fd``, whose target ends in `` (deleted)`` once that name was unlinked or renamed
    over, even while the file lives on through another link; a name once unlinked never comes back), which closes
    the race. Elsewhere the name is looked up again and must still be the same file, which narrows the window to
    two renames between two system calls.
    """
    try:
        target = os.readlink(_PROC_FD / str(fd))
    except OSError:
        target = None
    if target is not None:
        if target == str(resolved):
            return True
        return not target.endswith(" (deleted)") and _is_within(Path(target), root)
    try:
        again = os.stat(resolved, follow_symlinks=False)
    except OSError:
        return False
    return (again.st_dev, again.st_ino) == (info.st_dev, info.st_ino) and again.st_nlink == 1


def _check_file_bytes(size: int, policy: ImagePolicy, label: str) -> None:
    """The byte limit for a local file; the message does not tell the file's size (it may not be an image)."""
    if size > policy.max_bytes:
        raise ImageTooLargeError(
            f"{_cap(label)} is larger than the limit of ImagePolicy.max_bytes={policy.max_bytes:,} bytes. "
            "Compress or downscale the image first, or raise max_bytes."
        )


# ---------------------------------------------------------------------------------------------------------------
# URLs
# ---------------------------------------------------------------------------------------------------------------

_URL_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]+)://")
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
_NAT64_NETWORKS = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_MAX_URL_LENGTH = 8192


def _address_problem(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why ``address`` is not a public unicast address, or ``None`` when it is."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and any(address in net for net in _NAT64_NETWORKS):
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            problem = _address_problem(embedded)
            return None if problem is None else f"{problem} (IPv4 {embedded} inside IPv6)"
    for attribute, name in (
        ("is_unspecified", "unspecified"),
        ("is_loopback", "loopback"),
        ("is_link_local", "link-local"),
        ("is_multicast", "multicast"),
        ("is_private", "private"),
        ("is_reserved", "reserved"),
    ):
        if getattr(address, attribute):
            return name
    if not address.is_global:
        return "non-public"
    return None


def _literal_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a host written as an IP literal denotes (including forms like ``127.1`` and ``0x7f000001``)."""
    text = host.split("%", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    if text and re.fullmatch(r"[0-9a-fA-FxX.]+", text) and text[0].isdigit():
        try:
            return ipaddress.IPv4Address(socket.inet_aton(text))
        except OSError:
            return None
    return None


def _refuse_private(host: str, what: str) -> ImageAccessDeniedError:
    return ImageAccessDeniedError(
        f"Refused to fetch from host {_short(host, 100)!r}: it is {what}, and URLs may only reach public internet "
        "addresses. Use a public URL; to allow this host, configure "
        f"ImagePolicy(allowed_url_hosts={{{_short(host, 100)!r}}}) or ImagePolicy(allow_private_urls=True)."
    )


def _needs_address_check(host: str, policy: ImagePolicy) -> bool:
    return not policy.allow_private_urls and host not in policy.allowed_url_hosts


def _check_address(host: str, address_text: str, policy: ImagePolicy) -> None:
    address = ipaddress.ip_address(address_text.split("%", 1)[0])
    if any(address in network for network in policy._allowed_networks()):
        return
    problem = _address_problem(address)
    if problem is not None:
        logger.debug("refusing %r: resolves to %s (%s)", host, address, problem)
        if _literal_address(host) is not None:
            raise _refuse_private(host, f"a {problem} address")
        raise _refuse_private(host, f"a name that resolves to a {problem} address")


_resolver_pool: concurrent.futures.ThreadPoolExecutor | None = None
_resolver_lock = threading.Lock()


def _getaddrinfo(host: str, port: int, deadline: _Deadline | None) -> list[tuple[Any, ...]]:
    """``socket.getaddrinfo``; with a ``deadline``, the caller waits no longer than it (the system resolver cannot
    be interrupted, so the lookup finishes in a small shared pool of threads while the caller gives up)."""
    if deadline is None or _literal_address(host) is not None:
        return socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    global _resolver_pool
    with _resolver_lock:
        if _resolver_pool is None:
            _resolver_pool = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="image-dns")
    future = _resolver_pool.submit(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
    try:
        return future.result(timeout=deadline.timeout())
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise _DeadlineExceeded(f"resolving {host!r} took too long") from None


def _resolve_checked(
    host: str, port: int, policy: ImagePolicy, deadline: _Deadline | None = None
) -> list[tuple[Any, ...]]:
    """Resolve ``host`` and check every address against the policy; the addresses to connect to."""
    try:
        infos = _getaddrinfo(host, port, deadline)
    except _DeadlineExceeded:
        raise
    except (OSError, UnicodeError) as exc:
        raise ImageFetchError(f"Cannot resolve the host {_short(host, 100)!r} ({exc}). Check the URL.") from exc
    if not infos:
        raise ImageFetchError(f"The host {_short(host, 100)!r} has no addresses. Check the URL.")
    if _needs_address_check(host, policy):
        for info in infos:
            _check_address(host, str(info[4][0]), policy)
    return infos


def check_url(url: str, policy: ImagePolicy, *, resolve: bool = False) -> str:
    """Check a URL against ``policy`` without fetching it; returns the URL (stripped).

    Refuses (with :class:`ImageAccessDeniedError`) schemes other than http/https, any URL when ``allow_urls`` is
    off, credentials in the URL, and hosts that are loopback, private, link-local, reserved, multicast or
    unspecified when written as an address or named ``localhost``. With ``resolve=True`` the host name is also
    resolved and every address checked (the default fetcher does this on each connection, right before
    connecting). Malformed URLs raise :class:`ImageFetchError`.
    """
    url = url.strip()
    match = _URL_SCHEME_RE.match(url)
    scheme = (match.group(1) if match else url.partition(":")[0]).lower()
    shown = _describe_url(url)
    if scheme == "file":
        raise ImageAccessDeniedError(
            f"file:// URLs are not accepted ({shown}): pass a plain path such as 'images/cat.png' instead "
            "(local paths are checked against ImagePolicy.allowed_roots)."
        )
    if scheme not in ("http", "https"):
        raise ImageAccessDeniedError(
            f"The URL scheme {_short(scheme, 20)!r} is not supported ({shown}): only http:// and https:// URLs "
            "can be fetched; pass a local path, a data URL or base64 data otherwise."
        )
    if not policy.allow_urls:
        raise ImageAccessDeniedError(
            f"Refused to fetch {shown}: fetching URLs is disabled by the image policy. Pass a local path or base64 "
            "data instead, or (if you configure the tool) enable URLs with ImagePolicy(allow_urls=True)."
        )
    if len(url) > _MAX_URL_LENGTH:
        raise ImageFetchError(f"The URL {shown} is {len(url):,} characters long, over {_MAX_URL_LENGTH:,}.")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 or c == "\\" for c in url):
        raise ImageFetchError(f"The URL {shown} contains spaces, control characters or backslashes; encode them.")
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
        _ = parts.port  # raises ValueError for a bad port
    except ValueError as exc:
        raise ImageFetchError(f"The URL {shown} is malformed ({exc}).") from exc
    if not host:
        raise ImageFetchError(f"The URL {shown} names no host.")
    if "@" in parts.netloc:
        raise ImageAccessDeniedError(
            f"Refused to fetch {shown}: URLs with a user name or password are not accepted. Remove the credentials."
        )
    host = _normalise_host(host)
    if _needs_address_check(host, policy):
        address = _literal_address(host)
        if address is not None:
            _check_address(host, str(address), policy)
        elif host in _LOOPBACK_NAMES or host.endswith(".localhost"):
            raise _refuse_private(host, "a loopback host name")
        elif resolve:
            _resolve_checked(host, parts.port or (443 if scheme == "https" else 80), policy)
    return url


class _DeadlineExceeded(TimeoutError):
    """The whole download ran past ``ImagePolicy.url_total_timeout``."""


class _Deadline:
    """A monotonic deadline for one download, and the per-operation timeout."""

    def __init__(self, total: float, per_operation: float) -> None:
        self.end = time.monotonic() + total
        self.per_operation = per_operation

    def timeout(self) -> float:
        """Seconds the next socket operation may take; raises once the deadline has passed."""
        remaining = self.end - time.monotonic()
        if remaining <= 0:
            raise _DeadlineExceeded("the total download deadline has passed")
        return min(self.per_operation, remaining)

    def expired(self) -> bool:
        return time.monotonic() >= self.end


class _DeadlineSocket(socket.socket):
    """A socket whose every connect, read and write waits at most until the download's deadline."""

    _deadline: _Deadline | None = None

    def _arm(self) -> None:
        if self._deadline is not None:
            super().settimeout(self._deadline.timeout())

    def connect(self, address: Any) -> None:
        self._arm()
        super().connect(address)

    def recv(self, *args: Any) -> bytes:
        self._arm()
        return super().recv(*args)

    def recv_into(self, *args: Any) -> int:
        self._arm()
        return super().recv_into(*args)

    def send(self, *args: Any) -> int:
        self._arm()
        return super().send(*args)

    def sendall(self, data: Any, *args: Any) -> None:
        view = memoryview(data).cast("B")
        while view:  # one deadline check per write, so a slow reader cannot stretch a large send
            sent = self.send(view[: 1 << 16], *args)
            view = view[sent:]


class _DeadlineSSLSocket(ssl.SSLSocket):
    """The TLS counterpart of :class:`_DeadlineSocket` (handshake, reads and writes)."""

    _deadline: _Deadline | None = None

    def _arm(self) -> None:
        if self._deadline is not None:
            super().settimeout(self._deadline.timeout())

    def do_handshake(self, *args: Any, **kwargs: Any) -> None:
        self._arm()
        super().do_handshake(*args, **kwargs)

    def read(self, *args: Any, **kwargs: Any) -> Any:
        self._arm()
        return super().read(*args, **kwargs)

    def write(self, *args: Any, **kwargs: Any) -> int:
        self._arm()
        return super().write(*args, **kwargs)

    def recv(self, *args: Any, **kwargs: Any) -> bytes:
        self._arm()
        return super().recv(*args, **kwargs)

    def recv_into(self, *args: Any, **kwargs: Any) -> int:
        self._arm()
        return super().recv_into(*args, **kwargs)

    def send(self, *args: Any, **kwargs: Any) -> int:
        self._arm()
        return super().send(*args, **kwargs)

    def sendall(self, data: Any, *args: Any) -> None:
        view = memoryview(data).cast("B")
        while view:
            sent = self.send(view[: 1 << 16], *args)
            view = view[sent:]


def _guarded_connect(
    address: tuple[str, int],
    timeout: Any = None,
    source_address: Any = None,
    *,
    policy: ImagePolicy,
    deadline: _Deadline | None = None,
) -> socket.socket:
    """``socket.create_connection`` that checks every resolved address first and connects only to those; with a
    ``deadline``, the socket enforces it on every later operation too."""
    host, port = address
    infos = _resolve_checked(_normalise_host(host), port, policy, deadline)
    errors: list[OSError] = []
    for family, kind, proto, _canonical, sockaddr in infos:
        sock = _DeadlineSocket(family, kind, proto)
        try:
            if isinstance(timeout, (int, float)):
                sock.settimeout(timeout)
            sock._deadline = deadline
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            errors.append(exc)
            sock.close()
            if isinstance(exc, _DeadlineExceeded):
                break
    raise errors[-1] if errors else OSError(f"cannot connect to {host!r}")


class _GuardedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args: Any, policy: ImagePolicy, deadline: _Deadline | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = functools.partial(_guarded_connect, policy=policy, deadline=deadline)


class _GuardedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args: Any, policy: ImagePolicy, deadline: _Deadline | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline = deadline
        self._create_connection = functools.partial(_guarded_connect, policy=policy, deadline=deadline)

    def connect(self) -> None:
        # As http.client's, with the handshake started only once the deadline is attached to the TLS socket.
        http.client.HTTPConnection.connect(self)
        server_hostname = self._tunnel_host or self.host  # type: ignore[attr-defined]  # private, not in typeshed
        context = self._context  # type: ignore[attr-defined]  # http.client's private TLS context, not in typeshed
        sock = context.wrap_socket(self.sock, server_hostname=server_hostname, do_handshake_on_connect=False)
        sock._deadline = self._deadline
        self.sock = sock
        sock.do_handshake()


class _GuardedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, policy: ImagePolicy, deadline: _Deadline | None = None) -> None:
        super().__init__()
        self._policy = policy
        self._deadline = deadline

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        factory = functools.partial(_GuardedHTTPConnection, policy=self._policy, deadline=self._deadline)
        return self.do_open(factory, req)


class _GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, policy: ImagePolicy, deadline: _Deadline | None = None) -> None:
        self._ssl_context = ssl.create_default_context()
        self._ssl_context.sslsocket_class = _DeadlineSSLSocket
        super().__init__(context=self._ssl_context)
        self._policy = policy
        self._deadline = deadline

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        factory = functools.partial(_GuardedHTTPSConnection, policy=self._policy, deadline=self._deadline)
        return self.do_open(factory, req, context=self._ssl_context)


def _build_opener(policy: ImagePolicy, deadline: _Deadline | None = None) -> urllib.request.OpenerDirector:
    # Only the two guarded handlers: no proxies from the environment (the address checks must see the real
    # destination), no automatic redirects (each hop is checked here), no HTTP error processing (statuses are
    # handled below).
    opener = urllib.request.OpenerDirector()
    opener.add_handler(_GuardedHTTPHandler(policy, deadline))
    opener.add_handler(_GuardedHTTPSHandler(policy, deadline))
    return opener


_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_NON_IMAGE_TYPES = frozenset(
    {
        "application/json",
        "application/xml",
        "application/xhtml+xml",
        "application/javascript",
        "application/ecmascript",
        "application/pdf",
        "application/zip",
        "application/gzip",
        "application/x-gzip",
        "application/x-tar",
    }
)
_NON_IMAGE_MAJOR_TYPES = frozenset({"text", "audio", "video", "font", "multipart", "message", "model"})


def _check_content_type(value: str | None, shown: str) -> None:
    if not value:
        return
    media_type = value.split(";", 1)[0].strip().lower()
    if media_type in _NON_IMAGE_TYPES or media_type.partition("/")[0] in _NON_IMAGE_MAJOR_TYPES:
        hint = " (probably a web page about the image, not the image file)" if media_type == "text/html" else ""
        raise ImageFetchError(
            f"{shown} returned content of type {_short(media_type, 60)!r}, not an image{hint}. "
            "Use the direct URL of the image file."
        )


def _fetch_error(
    shown: str, exc: BaseException, policy: ImagePolicy | None = None, budget: _Deadline | None = None
) -> ImageError:
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, ImageError):
        return reason
    expired = isinstance(reason, _DeadlineExceeded) or (
        isinstance(reason, (TimeoutError, socket.timeout)) and budget is not None and budget.expired()
    )
    if expired and policy is not None:
        return ImageFetchError(
            f"Fetching {shown} took longer than ImagePolicy.url_total_timeout={policy.url_total_timeout:g} s "
            "(connecting, headers, redirects and body together). Try again later or use another URL."
        )
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return ImageFetchError(f"Fetching {shown} timed out. Try again later or use another URL.")
    if isinstance(reason, ssl.SSLError):
        return ImageFetchError(f"Fetching {shown} failed: TLS error ({_short(str(reason), 160)}).")
    if isinstance(reason, http.client.HTTPException):
        return ImageFetchError(
            f"Fetching {shown} failed: bad HTTP response ({type(reason).__name__}: {_short(str(reason), 160)})."
        )
    detail = getattr(reason, "strerror", None) or str(reason)
    return ImageFetchError(
        f"Fetching {shown} failed: {_short(str(detail), 160)}. Check the URL and that the server is reachable."
    )


def fetch_url(url: str, policy: ImagePolicy) -> bytes:
    """The default fetcher: download an ``http(s)`` URL under ``policy`` and return the body.

    Checks the URL with :func:`check_url` on every hop and follows at most ``policy.max_redirects`` redirects
    itself. Host names are resolved and every address checked right before connecting, and the connection goes
    only to a checked address. Environment proxies are not used. Each network operation waits at most
    ``policy.url_timeout`` seconds; the whole download (connect, TLS handshake, response headers, every redirect
    and the body) ends within ``policy.url_total_timeout`` seconds, a monotonic deadline checked by the socket on
    every read and write (a slow name resolution is left to finish in a small shared pool of threads while the
    caller gives up at the deadline). A plain blocking function: servers run it in a thread pool of their own,
    whose slot it frees by the deadline. Reads at most
    ``policy.max_bytes + 1`` bytes. Raises :class:`ImageAccessDeniedError`, :class:`ImageTooLargeError` or
    :class:`ImageFetchError` (bad status, obviously non-image content type, network errors, timeouts).
    """
    budget = _Deadline(policy.url_total_timeout, policy.url_timeout)
    deadline = budget.end
    opener = _build_opener(policy, budget)
    current = url.strip()
    for _hop in range(policy.max_redirects + 1):
        current = check_url(current, policy)
        shown = _describe_url(current)
        request = urllib.request.Request(
            current,
            headers={"User-Agent": "belle-vl-tools", "Accept": "image/*,*/*;q=0.5", "Accept-Encoding": "identity"},
            method="GET",
        )
        try:
            response = opener.open(request, timeout=budget.timeout())
        except (ImageError, MemoryError):
            raise
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
            error = _fetch_error(shown, exc, policy, budget)
            if error is getattr(exc, "reason", None):  # our own refusal, raised while connecting
                raise error from None
            raise error from exc
        if response is None:  # no handler took the request (cannot happen for http/https)
            raise ImageFetchError(f"Fetching {shown} failed: no handler for this URL.")
        with response:
            status = response.status
            if status in _REDIRECT_STATUSES:
                location = response.headers.get("Location")
                if not location:
                    raise ImageFetchError(f"{shown} answered HTTP {status} (a redirect) without a Location header.")
                location = urllib.parse.quote(location.strip(), safe=":/?#[]@!$&'()*+,;=%~")
                current = urllib.parse.urldefrag(urllib.parse.urljoin(current, location))[0]
                continue
            if status not in (200, 203):
                raise ImageFetchError(
                    f"Fetching {shown} failed: the server answered HTTP {status} {_short(response.reason or '', 60)}."
                    " Check that the URL is correct and publicly reachable."
                )
            _check_content_type(response.headers.get("Content-Type"), shown)
            declared = response.headers.get("Content-Length")
            if declared and declared.strip().isdigit():
                _check_bytes(int(declared), policy, f"The download from {shown}")
            try:
                return _read_limited(response, policy, shown, deadline)
            except (ImageError, MemoryError):
                raise
            except (http.client.HTTPException, OSError, ValueError) as exc:
                raise _fetch_error(shown, exc, policy, budget) from exc
    raise ImageFetchError(
        f"Fetching {_describe_url(url)} failed: more than ImagePolicy.max_redirects={policy.max_redirects} redirects."
        " Use the final URL of the image directly."
    )


def _read_limited(response: http.client.HTTPResponse, policy: ImagePolicy, shown: str, deadline: float) -> bytes:
    read = getattr(response, "read1", response.read)
    chunks: list[bytes] = []
    total = 0
    while True:
        if time.monotonic() > deadline:
            raise _fetch_error(shown, _DeadlineExceeded(), policy)
        chunk = read(min(1 << 16, policy.max_bytes + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > policy.max_bytes:
            raise ImageTooLargeError(
                f"The download from {shown} is larger than ImagePolicy.max_bytes={policy.max_bytes:,} bytes "
                f"(stopped after {total:,} bytes). Use a smaller image, or raise max_bytes."
            )


def _load_url(url: str, policy: ImagePolicy) -> Image.Image:
    url = check_url(url, policy)
    shown = _describe_url(url)
    fetcher = policy.fetcher or fetch_url
    try:
        data = fetcher(url, policy)
    except (ImageError, MemoryError):
        raise
    except Exception as exc:  # a custom fetcher's own error types
        raise ImageFetchError(f"Fetching {shown} failed ({type(exc).__name__}: {_short(str(exc), 160)}).") from exc
    if isinstance(data, memoryview):
        data = data.tobytes()
    if not isinstance(data, (bytes, bytearray)):
        raise ImageFetchError(f"The image fetcher returned {type(data).__name__} for {shown}, not bytes.")
    label = f"the image from {shown}"
    _check_bytes(len(data), policy, label)
    return _decode_bytes(bytes(data), policy, label)


# ---------------------------------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------------------------------

_DICT_SOURCE_KEYS = ("path", "url", "image_url", "base64", "b64", "data", "bytes", "image")
_DICT_MAX_DEPTH = 3


def _load_str(text: str, policy: ImagePolicy) -> Image.Image:
    stripped = text.strip()
    if not stripped:
        raise ImageNotFoundError("The image source is an empty string: pass a path, URL, data URL or base64 data.")
    lower = stripped[:8].lower()
    if lower.startswith("data:"):
        data = _decode_data_url(stripped, policy)
        return _decode_bytes(data, policy, "the image in the data URL")
    if _URL_SCHEME_RE.match(stripped) or lower.startswith(("http:", "https:", "file:")):
        return _load_url(stripped, policy)
    if _looks_like_base64(stripped) and not _path_exists(stripped):
        data = _decode_base64(stripped, policy, "the base64 string")
        return _decode_bytes(data, policy, "the image in the base64 string")
    return _load_path(stripped, policy)


def _path_exists(text: str) -> bool:
    if len(text) > 4096:
        return False
    try:
        return os.path.lexists(os.path.expanduser(text))
    except (OSError, ValueError):
        return False


def _load_path(path: str | os.PathLike[str], policy: ImagePolicy) -> Image.Image:
    data, label = _read_local_file(path, policy)
    return _decode_bytes(data, policy, label, private=True)


def _load_bytes(data: bytes | bytearray | memoryview, policy: ImagePolicy) -> Image.Image:
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    label = "the image data"
    _check_bytes(size, policy, label)
    raw = data.tobytes() if isinstance(data, memoryview) else bytes(data)
    return _decode_bytes(raw, policy, label)


def _load_dict(source: Mapping[Any, Any], policy: ImagePolicy, depth: int) -> Image.Image:
    if depth > _DICT_MAX_DEPTH:
        raise InvalidImageDataError("The image source nests dicts too deeply.")
    present = [key for key in _DICT_SOURCE_KEYS if key in source]
    if len(present) != 1:
        keys = sorted(str(k) for k in source)[:8]
        problem = "has none of" if not present else f"has several of ({', '.join(present)})"
        raise InvalidImageDataError(
            f"The image dict (keys {keys}) {problem} the keys naming an image: give exactly one of "
            "'path', 'url', 'base64' (with optional 'mime_type'), 'bytes' or 'image'."
        )
    key = present[0]
    value = source[key]
    media_type = source.get("mime_type") or source.get("media_type")
    if isinstance(media_type, str) and media_type.lower().startswith(("text/", "audio/", "video/")):
        raise InvalidImageDataError(f"The image dict declares mime_type {_short(media_type, 40)!r}, not an image.")
    if key == "path":
        if not isinstance(value, (str, os.PathLike)):
            raise InvalidImageDataError(f"The image dict's 'path' must be a string, not {type(value).__name__}.")
        return _load_path(value, policy)
    if key in ("url", "image_url"):
        if isinstance(value, Mapping) and "url" in value:
            value = value["url"]
        if not isinstance(value, str):
            raise InvalidImageDataError(f"The image dict's {key!r} must be a string, not {type(value).__name__}.")
        return _load_str(value, policy)
    if key in ("base64", "b64", "data"):
        if isinstance(value, (bytes, bytearray)) and key == "data":
            return _load_bytes(value, policy)
        if not isinstance(value, str):
            raise InvalidImageDataError(f"The image dict's {key!r} must be a string, not {type(value).__name__}.")
        if value.strip()[:5].lower() == "data:":
            data = _decode_data_url(value.strip(), policy)
        else:
            data = _decode_base64(value, policy, f"the base64 data in {key!r}")
        return _decode_bytes(data, policy, f"the image in the dict's {key!r}")
    if key == "bytes":
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise InvalidImageDataError(f"The image dict's 'bytes' must be bytes, not {type(value).__name__}.")
        return _load_bytes(value, policy)
    return _load(value, policy, depth + 1)


def _load(source: object, policy: ImagePolicy, depth: int) -> Image.Image:
    if isinstance(source, Image.Image):
        return _from_pil(source, policy)
    numpy_module = sys.modules.get("numpy")  # an ndarray implies numpy is imported already
    if numpy_module is not None and isinstance(source, numpy_module.ndarray):
        return _from_array(source, policy)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _load_bytes(source, policy)
    if isinstance(source, str):
        return _load_str(source, policy)
    if isinstance(source, os.PathLike):
        return _load_path(source, policy)
    if isinstance(source, Mapping):
        return _load_dict(source, policy, depth)
    hint = ""
    if type(source).__name__ == "Tensor":
        hint = " Convert a tensor to a numpy array in HxWxC layout first, e.g. tensor.permute(1, 2, 0).cpu().numpy()."
    elif isinstance(source, (list, tuple)):
        hint = " Pass one image at a time."
    raise UnsupportedImageError(
        f"Cannot load an image from an {describe_source(source)}: pass a PIL image, a numpy array, bytes, a path, "
        f"a URL, a data URL or base64 data.{hint}"
    )


def load_image(source: ImageSource, policy: ImagePolicy | None = None) -> Image.Image:
    """Load an image from any supported source as a new, fully loaded RGB :class:`PIL.Image.Image`.

    Args:
        source: One of

            * a :class:`PIL.Image.Image` (converted; the caller's image is not modified except being loaded);
            * a numpy array: HxW gray, HxWx3 RGB or HxWx4 RGBA (HxWx1 is gray), dtype uint8 or float in [0, 1];
            * ``bytes``/``bytearray``/``memoryview`` holding an encoded image file;
            * an :class:`os.PathLike`: always a local path;
            * a ``str``: a ``data:image/...;base64,`` URL, an ``http(s)://`` URL, a local path, or raw base64
              data (a string of the base64 alphabet that is not an existing path); ``file://`` and other schemes
              are refused;
            * a dict with exactly one of ``path``, ``url`` (also OpenAI-style ``image_url``), ``base64`` (optional
              ``mime_type``), ``bytes`` or ``image`` (any of the above).
        policy: What may be read and the size limits; ``None`` means :meth:`ImagePolicy.trusted` (any local path,
            no URLs). Agent tools should pass a restricted policy, e.g. ``ImagePolicy()``.

    Returns:
        An RGB image: EXIF orientation applied, transparency composited onto white, the first frame of an
        animation, high bit depth scaled to 8 bits. It holds no open file.

    Raises:
        ImageNotFoundError: a path names no readable file (missing, a folder, a device).
        ImageAccessDeniedError: the policy forbids the path or URL (outside ``allowed_roots``, URLs disabled,
            private addresses, unsupported schemes).
        ImageTooLargeError: over ``max_bytes`` or ``max_pixels``.
        InvalidImageDataError: malformed base64, data URL or dict.
        ImageDecodeError: the data is not a readable image (corrupt, truncated, not an image).
        UnsupportedImageError: an unsupported source type, array shape/dtype or image mode.
        ImageFetchError: an allowed URL could not be fetched.
    """
    return _load(source, ImagePolicy.trusted() if policy is None else policy, 0)


def image_digest(image: Image.Image) -> str:
    """A stable content hash of an image: sha256 hex over its mode, size and pixel bytes.

    Equal pixels give equal digests whatever the image came from (file, bytes, array), so it serves as a cache
    key. Metadata (EXIF, format, ICC profile) does not enter it.
    """
    if not isinstance(image, Image.Image):
        raise UnsupportedImageError(f"image_digest needs a PIL image, got an {describe_source(image)}.")
    digest = hashlib.sha256()
    digest.update(f"{image.mode}\0{image.width}x{image.height}\0".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()
