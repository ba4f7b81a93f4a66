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

This package needs only the standard library, Pillow and (imported lazily, for arrays and high bit depth images)
numpy. Its modules, one concern each: ``policy`` (:class:`ImagePolicy` and the defaults), ``sources`` (what a
source is, :func:`describe_source`), ``formats`` (container header probes), ``decode`` (bytes, PIL images and
arrays to RGB under the limits), ``data_urls`` (base64 and ``data:`` URLs), ``local`` (confined opening of
local files), ``fetch`` (:func:`check_url`, :func:`fetch_url`: the SSRF-guarded download) and ``load``
(:func:`load_image`, :func:`image_digest`).
"""

from __future__ import annotations

# Names outside ``__all__`` (the error classes, the other limits, the path check the runtime uses) are re-exported
# too: everything the former single module offered is still found here.
from ..errors import ImageAccessDeniedError as ImageAccessDeniedError
from ..errors import ImageDecodeError as ImageDecodeError
from ..errors import ImageError as ImageError
from ..errors import ImageFetchError as ImageFetchError
from ..errors import ImageNotFoundError as ImageNotFoundError
from ..errors import ImageTooLargeError as ImageTooLargeError
from ..errors import InvalidImageDataError as InvalidImageDataError
from ..errors import UnsupportedImageError as UnsupportedImageError
from .decode import JPEG_FREE_SCANS as JPEG_FREE_SCANS
from .decode import JPEG_MAX_EXTRA_PIXEL_SCANS as JPEG_MAX_EXTRA_PIXEL_SCANS
from .fetch import check_url, fetch_url
from .load import image_digest, load_image
from .local import _resolve_local_path as _resolve_local_path
from .policy import (
    DEFAULT_IMAGE_FORMATS,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_REDIRECTS,
    DEFAULT_URL_TIMEOUT,
    Fetcher,
    ImagePolicy,
)
from .policy import DEFAULT_URL_TOTAL_TIMEOUT as DEFAULT_URL_TOTAL_TIMEOUT
from .sources import ImageSource, describe_source

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
