"""URLs: checked against the policy (schemes, private addresses, every redirect hop) and downloaded by the
default fetcher, which connects only to checked addresses, within a total deadline and the byte limit."""

from __future__ import annotations

import concurrent.futures
import functools
import http.client
import ipaddress
import logging
import re
import socket
import ssl
import threading
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from PIL import Image

from ..deadline import Deadline, DeadlineExceeded
from ..errors import ImageAccessDeniedError, ImageError, ImageFetchError, ImageTooLargeError
from .decode import _check_bytes, _decode_bytes
from .policy import ImagePolicy, _normalise_host
from .sources import _describe_url, _short

__all__ = ["check_url", "fetch_url"]

logger = logging.getLogger(__name__)

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


def _getaddrinfo(host: str, port: int, deadline: Deadline | None) -> list[tuple[Any, ...]]:
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
        raise DeadlineExceeded(f"resolving {host!r} took too long") from None


def _resolve_checked(
    host: str, port: int, policy: ImagePolicy, deadline: Deadline | None = None
) -> list[tuple[Any, ...]]:
    """Resolve ``host`` and check every address against the policy; the addresses to connect to."""
    try:
        infos = _getaddrinfo(host, port, deadline)
    except DeadlineExceeded:
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


class _DeadlineSocket(socket.socket):
    """A socket whose every connect, read and write waits at most until the download's deadline."""

    _deadline: Deadline | None = None

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

    _deadline: Deadline | None = None

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
    deadline: Deadline | None = None,
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
            if isinstance(exc, DeadlineExceeded):
                break
    raise errors[-1] if errors else OSError(f"cannot connect to {host!r}")


class _GuardedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args: Any, policy: ImagePolicy, deadline: Deadline | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = functools.partial(_guarded_connect, policy=policy, deadline=deadline)


class _GuardedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args: Any, policy: ImagePolicy, deadline: Deadline | None = None, **kwargs: Any) -> None:
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
    def __init__(self, policy: ImagePolicy, deadline: Deadline | None = None) -> None:
        super().__init__()
        self._policy = policy
        self._deadline = deadline

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        factory = functools.partial(_GuardedHTTPConnection, policy=self._policy, deadline=self._deadline)
        return self.do_open(factory, req)


class _GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, policy: ImagePolicy, deadline: Deadline | None = None) -> None:
        self._ssl_context = ssl.create_default_context()
        self._ssl_context.sslsocket_class = _DeadlineSSLSocket
        super().__init__(context=self._ssl_context)
        self._policy = policy
        self._deadline = deadline

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        factory = functools.partial(_GuardedHTTPSConnection, policy=self._policy, deadline=self._deadline)
        return self.do_open(factory, req, context=self._ssl_context)


def _build_opener(policy: ImagePolicy, deadline: Deadline | None = None) -> urllib.request.OpenerDirector:
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
    shown: str, exc: BaseException, policy: ImagePolicy | None = None, budget: Deadline | None = None
) -> ImageError:
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, ImageError):
        return reason
    expired = isinstance(reason, DeadlineExceeded) or (
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
    budget = Deadline(policy.url_total_timeout, policy.url_timeout)
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
                return _read_limited(response, policy, shown, budget)
            except (ImageError, MemoryError):
                raise
            except (http.client.HTTPException, OSError, ValueError) as exc:
                raise _fetch_error(shown, exc, policy, budget) from exc
    raise ImageFetchError(
        f"Fetching {_describe_url(url)} failed: more than ImagePolicy.max_redirects={policy.max_redirects} redirects."
        " Use the final URL of the image directly."
    )


def _read_limited(response: http.client.HTTPResponse, policy: ImagePolicy, shown: str, budget: Deadline) -> bytes:
    read = getattr(response, "read1", response.read)
    chunks: list[bytes] = []
    total = 0
    while True:
        if budget.expired():
            raise _fetch_error(shown, DeadlineExceeded(), policy)
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
