"""Local files: a path checked against the policy's folders, then opened confined below the allowed folder
(one component at a time, following no symbolic link) and read within the byte limit."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from ..errors import ImageAccessDeniedError, ImageError, ImageNotFoundError, ImageTooLargeError
from .policy import ImagePolicy
from .sources import _cap, _short


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
