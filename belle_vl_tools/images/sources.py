"""Image sources: what :func:`~belle_vl_tools.images.load_image` accepts, how a string is told apart (base64 or
path), and how a source is described in messages and logs without dumping its data."""

from __future__ import annotations

import base64
import binascii
import os
import re
import sys
import urllib.parse
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeAlias

from PIL import Image

if TYPE_CHECKING:  # pragma: no cover
    import numpy

__all__ = ["ImageSource", "describe_source"]

ImageSource: TypeAlias = (
    "Image.Image | numpy.ndarray | bytes | bytearray | memoryview | str | os.PathLike[str] | Mapping[str, Any]"
)
"""Everything :func:`load_image` accepts."""

_MESSAGE_PREVIEW = 80  # characters of user data quoted in messages at most


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


_BASE64_RE = re.compile(r"[A-Za-z0-9+/\-_]+={0,2}")
_WHITESPACE_RE = re.compile(r"\s+")
_URLSAFE_TO_STANDARD = str.maketrans("-_", "+/")


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
