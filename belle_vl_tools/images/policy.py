"""The image policy: what :func:`~belle_vl_tools.images.load_image` may read, and how much."""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeAlias

__all__ = [
    "DEFAULT_IMAGE_FORMATS",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_REDIRECTS",
    "DEFAULT_URL_TIMEOUT",
    "DEFAULT_URL_TOTAL_TIMEOUT",
    "Fetcher",
    "ImagePolicy",
]

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

Fetcher: TypeAlias = "Callable[[str, ImagePolicy], bytes]"
"""A URL fetcher: ``fetcher(url, policy) -> bytes``; it should honour the policy's limits."""


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
