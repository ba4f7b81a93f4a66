"""Base64 strings and ``data:`` URLs, decoded to bytes within the policy's byte limit."""

from __future__ import annotations

import base64
import binascii
import re
import urllib.parse

from ..errors import ImageTooLargeError, InvalidImageDataError
from .decode import _check_bytes
from .policy import ImagePolicy
from .sources import _URLSAFE_TO_STANDARD, _WHITESPACE_RE, _cap, _short

_NOT_BASE64_RE = re.compile(r"[^A-Za-z0-9+/=]")


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
