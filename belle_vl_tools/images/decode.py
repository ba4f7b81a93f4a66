"""Decoding: encoded bytes, PIL images and arrays to a fresh RGB image, under the policy's byte and pixel limits
(Pillow's decompression-bomb check made per thread, container headers checked before decoding)."""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageDecodeError, ImageError, ImageTooLargeError, UnsupportedImageError
from .formats import _FRAME_WALKERS, _MAX_CONTAINER_ENTRIES, _BadContainer, _parse_problem, _sniff_hint, _TooManyFrames
from .policy import ImagePolicy
from .sources import _cap, _magic_name, _short, describe_source

if TYPE_CHECKING:  # pragma: no cover
    import numpy

__all__ = ["JPEG_FREE_SCANS", "JPEG_MAX_EXTRA_PIXEL_SCANS"]

logger = logging.getLogger(__name__)

_FORMAT_ORDER = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "ICO", "PPM", "AVIF", "HEIF")


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
# headers by the small walkers of ``formats`` before anything is decoded.

_limits = threading.local()
_hook_lock = threading.Lock()


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
    except _BadContainer as exc:
        raise ImageTooLargeError(
            f"{_cap(label)} is {exc}; reading it would take far more time and memory than its size warrants, so it "
            "was refused before being decoded. Re-save the image (e.g. as PNG)."
        ) from None
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
    if fmt not in ("JPEG", "MPO"):  # an MPO is a JPEG with a multi-picture index: its first picture is a JPEG
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
    problem = _parse_problem(data)
    if problem is not None:
        raise ImageTooLargeError(
            f"{_cap(label)} is {problem}; reading its headers alone would take seconds and much memory, so it was "
            "refused before being opened. Re-save the image (e.g. as PNG) without the extra metadata."
        )
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
