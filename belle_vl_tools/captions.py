"""Captions for many pictures, kept in a SQLite cache so no picture is captioned twice.

:class:`CaptionCache` stores one caption per ``(image digest, model name, prompt)``. :func:`caption_images` walks a
list of pictures, yields a :class:`CaptionRecord` for each, answers the cached ones from the cache and sends the
others to a backend in batches (``generate_batch`` when the backend has it, else ``chat`` one by one), writing
every finished batch to the cache at once.

The key of a picture is :func:`belle_vl_tools.images.image_digest` of the loaded image: a hash over its pixels
(after EXIF rotation and conversion to RGB), not over the file's bytes. So a picture that was copied, renamed,
re-saved losslessly or stripped of its metadata keeps its caption, and the key is the one the runtime's vision
cache uses. The price is that every picture is decoded on every run (decoding is cheap next to captioning).

Crash safety: the cache runs in SQLite's WAL mode and each batch is written in one transaction, so a run that is
killed keeps every batch it finished, and a new run picks up where it stopped. Rows are written with ``INSERT OR
IGNORE`` on the primary key, so nothing is ever stored twice (the first caption of a key wins). A cache file that
is not a SQLite database, or that cannot be written, raises :class:`CaptionCacheError` (one line saying what to do).

Concurrent runs: before captioning a picture a run takes a *lease* on its key in the cache (``lease_seconds``
long, renewed with every batch). Another run that meets a leased key waits for that caption instead of making it
again, and takes the key over when the lease expires or its holder (a process on this machine) is gone, so two
runs over one folder split the work and a killed run's leases are reclaimed.

Output files: :func:`partial_path` names a run's temporary output beside the final file and
:func:`clean_partial_files` removes those of runs that were killed (their process is gone).

Laziness: ``backend`` may be a callable that returns the backend; it is called only when the first picture that
is not in the cache needs captioning, so a run over fully cached pictures never loads a model.

This module needs only the standard library and Pillow (``rich`` is used for the progress bar when installed).
It works with any object that has ``chat`` (and optionally ``generate_batch``) as in
:class:`belle_vl_tools.backend.Backend`, and a :class:`CaptionCache` can be pickled (to hand to worker processes):
it reopens its file in the new process.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import sqlite3
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from . import prompts
from .errors import BelleVLError, ImageError
from .images import ImagePolicy, image_digest, load_image

__all__ = [
    "IMAGE_SUFFIXES",
    "CachedCaption",
    "CaptionCache",
    "CaptionCacheError",
    "CaptionRecord",
    "caption_images",
    "checkpoint_key",
    "clean_partial_files",
    "find_images",
    "partial_path",
]

logger = logging.getLogger(__name__)

#: File name endings :func:`find_images` treats as pictures (compared in lower case).
IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".ico", ".avif"}
)

BackendOrFactory = Any  # a backend (has .chat) or a zero-argument callable returning one


@dataclass(frozen=True)
class CaptionRecord:
    """The caption of one picture. ``cached`` tells whether it came from the cache (True) or was just made."""

    path: str
    digest: str
    caption: str
    width: int
    height: int
    cached: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CachedCaption:
    """A row of the cache."""

    digest: str
    model: str
    prompt: str
    caption: str
    width: int
    height: int
    created: float


_SCHEMA = """
CREATE TABLE IF NOT EXISTS captions (
    digest  TEXT NOT NULL,
    model   TEXT NOT NULL,
    prompt  TEXT NOT NULL,
    caption TEXT NOT NULL,
    width   INTEGER NOT NULL,
    height  INTEGER NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (digest, model, prompt)
) WITHOUT ROWID
"""

_LEASES = """
CREATE TABLE IF NOT EXISTS leases (
    digest  TEXT NOT NULL,
    model   TEXT NOT NULL,
    prompt  TEXT NOT NULL,
    owner   TEXT NOT NULL,
    expires REAL NOT NULL,
    PRIMARY KEY (digest, model, prompt)
) WITHOUT ROWID
"""

#: How long a run's claim on a picture lasts unless renewed (each finished batch renews the claims it holds).
DEFAULT_LEASE_SECONDS = 900.0


class CaptionCacheError(BelleVLError):
    """The caption cache cannot be used: its file is not a SQLite database, or it cannot be created or written."""


def _cache_error(path: str, exc: BaseException) -> CaptionCacheError:
    """One line that says what is wrong with the cache file ``path`` and what to do about it."""
    text = str(exc) or type(exc).__name__
    lowered = text.lower()
    if isinstance(exc, sqlite3.DatabaseError) and (
        "not a database" in lowered or "malformed" in lowered or "corrupt" in lowered
    ):
        return CaptionCacheError(
            f"The caption cache {path} is damaged or not a caption cache ({text}): delete it (its captions will be "
            "made again) or use another cache file."
        )
    if "readonly" in lowered or "read-only" in lowered or isinstance(exc, PermissionError):
        return CaptionCacheError(
            f"The caption cache {path} cannot be written ({text}): make the file and its folder writable, or use "
            "another cache file."
        )
    if isinstance(exc, OSError) or "unable to open" in lowered:
        return CaptionCacheError(
            f"The caption cache {path} cannot be opened or created ({text}): check that its folder exists and is "
            "writable (and not a file), or use another cache file."
        )
    return CaptionCacheError(f"The caption cache {path} failed ({text}): delete it or use another cache file.")


def _owner_id() -> str:
    """Who holds a lease: this machine, this process and this run."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OSError):
        return False
    return False


def _owner_gone(owner: str) -> bool:
    """Whether the holder of a lease was a process on this machine that no longer runs."""
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    return pid != os.getpid() and _process_gone(pid)


# SQLite limits the number of host parameters of one statement; look keys up in chunks below it.
_LOOKUP_CHUNK = 400


class CaptionCache:
    """A SQLite file of captions keyed by ``(digest, model, prompt)``; safe to share between threads.

    ``path`` is a file (created with its folder when missing) or ``":memory:"``. Several processes may use the
    same file: SQLite serialises the writers (``timeout`` seconds of waiting at most). Use it as a context manager
    or call :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 30.0) -> None:
        self.path = str(path)
        self.timeout = timeout
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._connect()

    # --- connection ----------------------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        conn = None
        try:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                if Path(self.path).is_dir():
                    raise IsADirectoryError(21, "Is a folder, not a file", self.path)
            conn = sqlite3.connect(self.path, timeout=self.timeout, check_same_thread=False, isolation_level=None)
            if self.path != ":memory:":
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")  # with WAL: a killed process loses no committed batch
            conn.execute(_SCHEMA)
            conn.execute(_LEASES)
            # Schema statements on an existing database write nothing; make sure this file takes writes now,
            # not after the first batch was captioned.
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
        except (sqlite3.Error, OSError) as exc:
            if conn is not None:
                conn.close()
            raise _cache_error(self.path, exc) from None
        self._conn, self._pid = conn, os.getpid()
        return conn

    def _run(self, work: Any) -> Any:
        """``work(connection)`` under the lock, with SQLite's errors turned into :class:`CaptionCacheError`."""
        with self._lock:
            conn = self._connect()
            try:
                return work(conn)
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise _cache_error(self.path, exc) from None

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    def __enter__(self) -> CaptionCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        if self.path == ":memory:":
            raise TypeError("An in-memory CaptionCache cannot be sent to another process; give it a file path.")
        return {"path": self.path, "timeout": self.timeout}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], timeout=state["timeout"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"CaptionCache({self.path!r})"

    # --- reading -------------------------------------------------------------------------------------------------
    def get(self, digest: str, model: str, prompt: str) -> CachedCaption | None:
        """The cached caption of one key, or None."""
        return self.get_many([digest], model, prompt).get(digest)

    def get_many(self, digests: Iterable[str], model: str, prompt: str) -> dict[str, CachedCaption]:
        """The cached captions among ``digests`` for ``model`` and ``prompt``, by digest."""
        wanted = list(dict.fromkeys(digests))
        found: dict[str, CachedCaption] = {}

        def work(conn: sqlite3.Connection) -> None:
            for start in range(0, len(wanted), _LOOKUP_CHUNK):
                chunk = wanted[start : start + _LOOKUP_CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = conn.execute(
                    "SELECT digest, model, prompt, caption, width, height, created FROM captions "
                    f"WHERE model = ? AND prompt = ? AND digest IN ({marks})",
                    (model, prompt, *chunk),
                ).fetchall()
                for row in rows:
                    found[row[0]] = CachedCaption(*row)

        self._run(work)
        return found

    def __len__(self) -> int:
        return int(self._run(lambda conn: conn.execute("SELECT COUNT(*) FROM captions").fetchone()[0]))

    def __iter__(self) -> Iterator[CachedCaption]:
        rows = self._run(
            lambda conn: conn.execute(
                "SELECT digest, model, prompt, caption, width, height, created FROM captions ORDER BY created"
            ).fetchall()
        )
        return iter([CachedCaption(*row) for row in rows])

    # --- writing -------------------------------------------------------------------------------------------------
    def put(self, digest: str, model: str, prompt: str, caption: str, width: int, height: int) -> bool:
        """Store one caption; False if the key was already there (the stored caption is kept)."""
        return self.put_many([(digest, model, prompt, caption, width, height)]) == 1

    def put_many(self, rows: Iterable[tuple[str, str, str, str, int, int]]) -> int:
        """Store ``(digest, model, prompt, caption, width, height)`` rows in one transaction: all or none.

        Keys already present are left as they are. Returns the number of rows added."""
        now = time.time()
        values = [(d, m, p, c, int(w), int(h), now) for d, m, p, c, w, h in rows]
        if not values:
            return 0

        def work(conn: sqlite3.Connection) -> int:
            before = conn.total_changes
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(
                    "INSERT OR IGNORE INTO captions (digest, model, prompt, caption, width, height, created) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    values,
                )
                added = conn.total_changes - before
                # The captions are in: nobody needs to wait for these keys any more.
                conn.executemany(
                    "DELETE FROM leases WHERE digest = ? AND model = ? AND prompt = ?",
                    [(d, m, p) for d, m, p, *_ in values],
                )
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return added

        return int(self._run(work))

    # --- leases (so concurrent runs do not caption one picture twice) ----------------------------------------------
    def claim(
        self, digest: str, model: str, prompt: str, owner: str, *, lease_seconds: float = DEFAULT_LEASE_SECONDS
    ) -> CachedCaption | bool:
        """Claim the key for ``owner`` before captioning it: the cached caption if there is one by now, True if the
        claim is ``owner``'s (it was free, expired, already ``owner``'s, or its holder's process is gone), False if
        another live run holds it."""

        def work(conn: sqlite3.Connection) -> CachedCaption | bool:
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute(
                    "SELECT digest, model, prompt, caption, width, height, created FROM captions "
                    "WHERE digest = ? AND model = ? AND prompt = ?",
                    (digest, model, prompt),
                ).fetchone()
                if row is not None:
                    conn.execute("ROLLBACK")
                    return CachedCaption(*row)
                lease = conn.execute(
                    "SELECT owner, expires FROM leases WHERE digest = ? AND model = ? AND prompt = ?",
                    (digest, model, prompt),
                ).fetchone()
                now = time.time()
                if lease is not None and lease[0] != owner and lease[1] > now and not _owner_gone(lease[0]):
                    conn.execute("ROLLBACK")
                    return False
                conn.execute(
                    "INSERT OR REPLACE INTO leases (digest, model, prompt, owner, expires) VALUES (?, ?, ?, ?, ?)",
                    (digest, model, prompt, owner, now + lease_seconds),
                )
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return True

        return self._run(work)

    def renew(
        self,
        digests: Iterable[str],
        model: str,
        prompt: str,
        owner: str,
        *,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
    ) -> None:
        """Extend ``owner``'s leases on these keys by ``lease_seconds`` from now."""
        expires = time.time() + lease_seconds
        rows = [(expires, d, model, prompt, owner) for d in digests]
        if rows:
            self._run(
                lambda conn: conn.executemany(
                    "UPDATE leases SET expires = ? WHERE digest = ? AND model = ? AND prompt = ? AND owner = ?", rows
                )
            )

    def release(self, owner: str) -> None:
        """Drop every lease ``owner`` still holds (a run that stops early lets others take its pictures now)."""
        self._run(lambda conn: conn.execute("DELETE FROM leases WHERE owner = ?", (owner,)))

    def leases(self) -> list[tuple[str, str, str, str, float]]:
        """The leases held now: ``(digest, model, prompt, owner, expires)`` rows."""
        return list(
            self._run(lambda conn: conn.execute("SELECT digest, model, prompt, owner, expires FROM leases").fetchall())
        )


# ---------------------------------------------------------------------------------------------------------------
# Model keys
# ---------------------------------------------------------------------------------------------------------------


def checkpoint_key(path: str | os.PathLike[str]) -> str:
    """The model part of the cache key for a checkpoint: for a folder, its name and a hash of its files' names,
    sizes and modification times (and of the contents of its JSON files), so a retrained or replaced checkpoint
    does not reuse old captions; anything else (a Hub id) as it is given."""
    folder = Path(path)
    if not folder.is_dir():
        return os.fspath(path)
    digest = hashlib.sha256()
    for child in sorted(folder.iterdir()):
        if not child.is_file():
            continue
        stat = child.stat()
        digest.update(f"{child.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        if child.suffix == ".json" and stat.st_size < 1 << 20:
            digest.update(child.read_bytes())
    return f"{folder.resolve().name}@{digest.hexdigest()[:16]}"


# ---------------------------------------------------------------------------------------------------------------
# Finding pictures
# ---------------------------------------------------------------------------------------------------------------


def find_images(folder: str | os.PathLike[str], *, recursive: bool = True) -> list[Path]:
    """The picture files in ``folder`` (by name ending, see :data:`IMAGE_SUFFIXES`), sorted; hidden files and
    folders (names starting with ".") are skipped."""
    root = Path(folder)
    if not root.is_dir():
        raise ImageError(f"{str(root)!r} is not a folder: name a folder of pictures.")
    found: list[Path] = []
    pattern = "**/*" if recursive else "*"
    for path in root.glob(pattern):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            found.append(path)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


# ---------------------------------------------------------------------------------------------------------------
# Output files of runs
# ---------------------------------------------------------------------------------------------------------------

_PARTIAL_SUFFIX = ".partial"
_STALE_PARTIAL_SECONDS = 7 * 24 * 3600.0  # a partial file this old is left over whoever wrote it


def partial_path(out: str | os.PathLike[str]) -> Path:
    """Where a run writes ``out`` before moving it into place: a hidden file beside it, named after this
    process (``.NAME.PID.RANDOM.partial``), so :func:`clean_partial_files` can tell a killed run's leftovers."""
    final = Path(out)
    return final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{_PARTIAL_SUFFIX}")


def clean_partial_files(out: str | os.PathLike[str]) -> list[Path]:
    """Remove the partial files of ``out`` left by runs that were killed (their process is gone, or the file is
    more than a week old); files of runs still going are kept. Returns the removed paths."""
    final = Path(out)
    removed: list[Path] = []
    prefix = f".{final.name}."
    folder = final.parent if str(final.parent) else Path(".")
    if not folder.is_dir():
        return removed
    for candidate in folder.iterdir():
        name = candidate.name
        if not (name.startswith(prefix) and name.endswith(_PARTIAL_SUFFIX)):
            continue
        pid_text = name[len(prefix) : -len(_PARTIAL_SUFFIX)].split(".")[0]
        try:
            age = time.time() - candidate.stat().st_mtime
        except OSError:
            continue
        gone = pid_text.isdigit() and int(pid_text) != os.getpid() and _process_gone(int(pid_text))
        if gone or age > _STALE_PARTIAL_SECONDS:
            try:
                candidate.unlink()
            except FileNotFoundError:
                continue
            removed.append(candidate)
            logger.info("Removed %s, left over by a run that was stopped.", candidate)
    return removed


# ---------------------------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------------------------


class ProgressBar:
    """A rich progress bar on stderr, shown only when stderr is a terminal and rich is installed; otherwise it
    does nothing. ``ProgressBar(total, description, enabled)`` is a context manager with :meth:`advance`."""

    #: How many bars are on screen now (so other live displays, such as a spinner, can stay out of their way).
    active = 0

    def __init__(self, total: int | None, description: str, enabled: bool = True) -> None:
        self._progress = None
        self._task = None
        if not enabled or not sys.stderr.isatty():
            return
        try:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
        except ImportError:  # pragma: no cover - rich is optional here
            return
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._task = self._progress.add_task(description, total=total)

    def __enter__(self) -> ProgressBar:
        if self._progress is not None:
            self._progress.start()
            ProgressBar.active += 1
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
            ProgressBar.active -= 1

    def advance(self, n: int = 1) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, n)


# ---------------------------------------------------------------------------------------------------------------
# Captioning
# ---------------------------------------------------------------------------------------------------------------


def _is_backend(obj: Any) -> bool:
    return not isinstance(obj, type) and callable(getattr(obj, "chat", None))


class _LazyBackend:
    """Holds a backend, or the callable that makes it; makes it on first use, once."""

    def __init__(self, backend_or_factory: BackendOrFactory) -> None:
        if _is_backend(backend_or_factory):
            self._backend, self._factory = backend_or_factory, None
        elif callable(backend_or_factory):
            self._backend, self._factory = None, backend_or_factory
        else:
            raise TypeError(
                "backend must be a backend (an object with .chat) or a callable that returns one; "
                f"got {type(backend_or_factory).__name__}."
            )

    @property
    def loaded(self) -> bool:
        return self._backend is not None

    def get(self) -> Any:
        if self._backend is None:
            backend = self._factory()  # type: ignore[misc]
            if not _is_backend(backend):
                raise TypeError(f"The backend factory returned {type(backend).__name__}, not a backend with .chat.")
            self._backend = backend
        return self._backend

    def peek_name(self) -> str | None:
        return getattr(self._backend, "model_name", None) if self._backend is not None else None


def run_batch(backend: Any, conversations: Sequence[Sequence[dict[str, Any]]], generation: dict[str, Any]) -> list[str]:
    """Answer conversations with ``generate_batch`` when the backend has it (one by one with ``chat`` otherwise);
    returns the answers' texts."""
    if not conversations:
        return []
    batch = getattr(backend, "generate_batch", None)
    if callable(batch) and len(conversations) > 1:
        results = batch(list(conversations), **generation)
    else:
        results = [backend.chat(conversation, **generation) for conversation in conversations]
    return [getattr(result, "text", result) for result in results]


@dataclass
class _Entry:
    path: str
    digest: str = ""
    width: int = 0
    height: int = 0
    caption: str | None = None
    cached: bool = False
    skip: bool = False
    waiting: bool = False  # another run holds the lease on this picture: wait for its caption


def caption_images(
    paths: Iterable[str | os.PathLike[str]],
    backend: BackendOrFactory,
    *,
    cache: CaptionCache | str | os.PathLike[str] | None,
    model_name: str | None = None,
    prompt: str | None = None,
    detail: prompts.Detail = "brief",
    language: prompts.Language = "en",
    batch_size: int = 8,
    progress: bool | Callable[[CaptionRecord], None] = True,
    on_error: Literal["raise", "skip"] = "raise",
    image_policy: ImagePolicy | None = None,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    poll_seconds: float = 0.5,
    **generation: Any,
) -> Generator[CaptionRecord, None, None]:
    """Yield a :class:`CaptionRecord` for each picture of ``paths``, in their order, lazily.

    Args:
        paths: Picture files (see :func:`find_images` for a folder).
        backend: A backend (``chat``, optionally ``generate_batch``) or a zero-argument callable returning one,
            called only if some picture is not cached yet.
        cache: A :class:`CaptionCache`, the path of its file (opened and closed here), or None (no caching).
        model_name: The model part of the cache key; default: the backend's ``model_name`` (required when
            ``backend`` is a factory). Generation settings are not part of the key: put them into the name when
            they change what the model writes (e.g. ``max_new_tokens``).
        prompt: The captioning prompt; default :func:`belle_vl_tools.prompts.describe_prompt` of ``detail``
            ("brief" or "detailed") and ``language`` ("en" or "zh").
        batch_size: Uncached pictures answered together; each finished batch is written to the cache at once.
        progress: True for a progress bar on stderr (when it is a terminal), False for none, or a callable
            called with every record.
        on_error: A picture that cannot be read (:class:`~belle_vl_tools.errors.ImageError`) raises ("raise"),
            or is logged and left out ("skip"). Backend errors always raise.
        image_policy: What may be read; default :meth:`ImagePolicy.trusted` (any local path).
        lease_seconds: How long this run's claim on a picture it is captioning lasts (renewed every batch); a run
            that meets another run's live claim waits for that caption, polling the cache every ``poll_seconds``.
        generation: Generation arguments for the backend; ``temperature`` defaults to 0 (greedy), so a caption
            depends on the picture, the model and the prompt only.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}.")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip'; got {on_error!r}.")
    lazy = _LazyBackend(backend)
    name = model_name or lazy.peek_name()
    if not name:
        raise ValueError("Pass model_name= (the model part of the cache key) when backend is a factory.")
    text = prompt if prompt is not None else prompts.describe_prompt(detail, language)
    if not isinstance(text, str) or not text.strip():
        raise ValueError("prompt must be a non-empty string.")
    generation.setdefault("temperature", 0)
    policy = image_policy or ImagePolicy.trusted()
    if not lease_seconds > 0 or not poll_seconds > 0:
        raise ValueError(f"lease_seconds and poll_seconds must be > 0; got {lease_seconds!r}, {poll_seconds!r}.")
    items = list(paths) if progress is True else paths
    total = len(items) if isinstance(items, Sequence) else None
    leases = (lease_seconds, poll_seconds)
    return _caption_iter(
        items, lazy, cache, name, text, batch_size, progress, on_error, policy, generation, total, leases
    )


def _caption_iter(
    paths: Iterable[str | os.PathLike[str]],
    lazy: _LazyBackend,
    cache_arg: CaptionCache | str | os.PathLike[str] | None,
    model: str,
    prompt: str,
    batch_size: int,
    progress: bool | Callable[[CaptionRecord], None],
    on_error: str,
    policy: ImagePolicy,
    generation: dict[str, Any],
    total: int | None,
    leases: tuple[float, float],
) -> Generator[CaptionRecord, None, None]:
    own_cache = cache_arg is not None and not isinstance(cache_arg, CaptionCache)
    cache = CaptionCache(cache_arg) if cache_arg is not None and not isinstance(cache_arg, CaptionCache) else cache_arg
    lease_seconds, poll_seconds = leases
    owner = _owner_id()
    callback = progress if callable(progress) else None
    # Entries wait in ``queue`` (input order) until their caption is known. Uncached pictures wait in ``pending``
    # (digest -> image), so a picture that appears twice is captioned once.
    queue: deque[_Entry] = deque()
    pending: dict[str, Any] = {}
    made: dict[str, str] = {}  # captions made in this run (so a repeat later in the run is not redone)
    max_waiting = max(4 * batch_size, 64)

    def flush_batch() -> None:
        if not pending:
            return
        digests = list(pending)
        conversations = [
            [{"role": "user", "content": [{"type": "image", "image": pending[d]}, {"type": "text", "text": prompt}]}]
            for d in digests
        ]
        answers = run_batch(lazy.get(), conversations, generation)
        if len(answers) != len(digests):
            raise RuntimeError(f"The backend answered {len(answers)} of {len(digests)} conversations.")
        sizes = {e.digest: (e.width, e.height) for e in queue if e.digest in pending}
        if cache is not None:
            cache.renew(digests, model, prompt, owner, lease_seconds=lease_seconds)
            cache.put_many((d, model, prompt, a, *sizes[d]) for d, a in zip(digests, answers, strict=True))
        made.update(zip(digests, answers, strict=True))
        for entry in queue:
            if entry.caption is None and entry.digest in made:
                entry.caption = made[entry.digest]
        pending.clear()

    def claim(entry: _Entry, image: Any) -> None:
        """Caption ``entry`` in this run if its key is free; else wait for the run that holds it."""
        got = (
            cache.claim(entry.digest, model, prompt, owner, lease_seconds=lease_seconds) if cache is not None else True
        )
        if isinstance(got, CachedCaption):
            entry.caption, entry.cached, entry.waiting = got.caption, True, False
        elif got:
            entry.waiting = False
            pending[entry.digest] = image
        else:
            entry.waiting = True

    def check_waiting(take_over: bool) -> None:
        """Pick up the captions other runs made for waiting entries; with ``take_over``, claim the keys whose
        holder stopped (expired lease, process gone) and caption them here."""
        waiting = [e for e in queue if e.waiting]
        if not waiting or cache is None:
            return
        found = cache.get_many([e.digest for e in waiting], model, prompt)
        for entry in waiting:
            hit = found.get(entry.digest)
            if hit is not None:
                entry.caption, entry.cached, entry.waiting = hit.caption, True, False
            elif entry.digest in made:
                entry.caption, entry.waiting = made[entry.digest], False
            elif entry.digest in pending:
                entry.waiting = False
            elif take_over:
                try:
                    image = load_image(Path(entry.path), policy)
                except ImageError as exc:
                    if on_error == "raise":
                        raise
                    logger.warning("Skipping %s: %s", entry.path, exc)
                    entry.skip, entry.waiting = True, False
                    continue
                claim(entry, image)

    def ready() -> Iterator[CaptionRecord]:
        if queue and queue[0].waiting:
            check_waiting(take_over=False)
        while queue and (queue[0].caption is not None or queue[0].skip):
            entry = queue.popleft()
            if entry.skip:
                bar.advance()
                continue
            record = CaptionRecord(
                entry.path, entry.digest, entry.caption or "", entry.width, entry.height, entry.cached
            )
            bar.advance()
            if callback is not None:
                callback(record)
            yield record

    try:
        with ProgressBar(total, "Captioning", enabled=progress is True) as bar:
            for raw in paths:
                entry = _Entry(path=os.fspath(raw))
                queue.append(entry)
                try:
                    image = load_image(Path(entry.path), policy)
                except ImageError as exc:
                    if on_error == "raise":
                        raise
                    logger.warning("Skipping %s: %s", entry.path, exc)
                    entry.skip = True
                    yield from ready()
                    continue
                entry.digest = image_digest(image)
                entry.width, entry.height = image.size
                if entry.digest in made:
                    entry.caption = made[entry.digest]
                elif entry.digest not in pending:
                    hit = cache.get(entry.digest, model, prompt) if cache is not None else None
                    if hit is not None:
                        entry.caption, entry.cached = hit.caption, True
                    elif any(e.waiting and e.digest == entry.digest for e in queue):
                        entry.waiting = True  # the same picture again, held by another run
                    else:
                        claim(entry, image)
                if len(pending) >= batch_size or (pending and len(queue) >= max_waiting and not queue[0].waiting):
                    flush_batch()
                yield from ready()
            flush_batch()
            yield from ready()
            # What is left waits for other runs: their captions, or their leases to lapse.
            while queue:
                check_waiting(take_over=True)
                flush_batch()
                before = len(queue)
                yield from ready()
                if queue and len(queue) == before and queue[0].waiting:
                    time.sleep(poll_seconds)
    finally:
        try:
            if cache is not None:
                cache.release(owner)
        finally:
            if own_cache and cache is not None:
                cache.close()
