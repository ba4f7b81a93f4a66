"""The entry point: :func:`load_image` sends each kind of source to its reader, and :func:`image_digest`."""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Mapping
from typing import Any

from PIL import Image

from ..errors import ImageNotFoundError, InvalidImageDataError, UnsupportedImageError
from .data_urls import _decode_base64, _decode_data_url
from .decode import _check_bytes, _decode_bytes, _from_array, _from_pil
from .fetch import _URL_SCHEME_RE, _load_url
from .local import _read_local_file
from .policy import ImagePolicy
from .sources import ImageSource, _looks_like_base64, _short, describe_source

__all__ = ["image_digest", "load_image"]

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
