"""Files written whole or not at all, never through a link, with the user's permissions.

Model folders and prediction files are written under a unique temporary name beside their
target, synced, then renamed into place: a crash leaves the old content and a reader sees the
old or the new one. Files are created with ``O_EXCL`` and opened with ``O_NOFOLLOW`` (a planted
link is never written through), with modes ``0o666`` / ``0o777`` filtered by the umask.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import secrets
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping
    from typing import BinaryIO

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


class LinkError(ValueError):
    """A path that must be a plain file or folder is a symbolic link."""


def sibling_name(target: Path, tag: str) -> Path:
    """A hidden, unique name in ``target``'s folder: ``.<name>.<tag>-<random>``."""
    return target.with_name(f".{target.name}.{tag}-{secrets.token_hex(6)}")


def make_sibling_folder(target: Path, tag: str) -> Path:
    """Create an empty folder with a unique hidden name beside ``target``."""
    for _ in range(16):
        path = sibling_name(target, tag)
        try:
            os.mkdir(path, 0o777)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"Could not create a temporary folder beside {target}.")


def _open(
    path: str | os.PathLike[str], flags: int, dir_fd: int | None = None, mode: int = 0o666
) -> int:
    try:
        return os.open(path, flags | _NOFOLLOW | _CLOEXEC, mode, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LinkError(
                f"{path} is a symbolic link; ptrag_sc neither reads nor writes through links."
            ) from None
        raise


def write_bytes(folder: Path, name: str, data: bytes) -> None:
    """Create ``folder/name`` (it must not exist), write ``data`` and sync it to disk."""
    fd = _open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_bytes(path: Path) -> bytes:
    """The content of a plain file (``LinkError`` for a link)."""
    fd = _open(path, os.O_RDONLY)
    with os.fdopen(fd, "rb") as handle:
        return handle.read()


def open_folder(path: Path) -> int:
    """A file descriptor of the folder ``path`` (itself may be a link the user made)."""
    return os.open(path, os.O_RDONLY | _DIRECTORY | _CLOEXEC)


def open_file(name: str, dir_fd: int) -> BinaryIO:
    """A binary file object for the plain file ``name`` in the folder ``dir_fd``."""
    return os.fdopen(_open(name, os.O_RDONLY, dir_fd), "rb")


def digest(handle: BinaryIO) -> dict:
    """``{"bytes", "sha256"}`` of an open binary file, read by blocks (then rewound)."""
    sha, size = hashlib.sha256(), 0
    for block in iter(lambda: handle.read(1 << 20), b""):
        sha.update(block)
        size += len(block)
    handle.seek(0)
    return {"bytes": size, "sha256": sha.hexdigest()}


def open_verified(name: str, dir_fd: int, expected: dict, recorded_in: str) -> BinaryIO:
    """The plain file ``name`` of the folder ``dir_fd``, open, if its :func:`digest` is
    ``expected``; else a ``ValueError`` saying how it differs."""
    handle = open_file(name, dir_fd)
    found = digest(handle)
    if found == expected:
        return handle
    handle.close()
    size, recorded = found["bytes"], expected.get("bytes")
    if size == 0:
        raise ValueError("the file is empty (an interrupted save or copy?).")
    if size != recorded:
        what = (
            "truncated" if isinstance(recorded, int) and size < recorded else "of the wrong size"
        )
        raise ValueError(f"the file is {what} ({size} bytes; {recorded_in} records {recorded}).")
    raise ValueError(
        f"its content does not match the SHA-256 recorded in {recorded_in}: modified or damaged "
        "after saving, or from another save."
    )


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's content (for a folder: its entries) to disk."""
    fd = os.open(path, os.O_RDONLY | _CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems cannot sync folders
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``folder`` so writers take turns (where locks exist; each
    writer still swaps in its own whole folder)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = open_folder(folder)
    try:
        with contextlib.suppress(OSError):  # a file system without locks
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` if unable."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(b))


def swap_in(new: Path, target: Path) -> None:
    """Put the complete folder ``new`` at ``target`` and delete the old one.

    Where the system swaps two names in one step a reader always finds a whole folder; elsewhere
    ``target`` is missing between two renames, and the old folder is put back if the second fails.
    """
    if not os.path.lexists(target):
        os.rename(new, target)
    elif _exchange(new, target):
        shutil.rmtree(new, ignore_errors=True)  # `new` now holds the old folder
    else:
        aside = sibling_name(target, "old")
        os.rename(target, aside)
        try:
            os.rename(new, target)
        except BaseException:
            os.rename(aside, target)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    fsync_path(target.parent)


@contextlib.contextmanager
def replacing_folder(target: Path, *, overwrite: bool, keep_out: set[str]) -> Iterator[Path]:
    """A new folder to fill that replaces ``target`` whole when the block succeeds.

    The entries of an existing ``target`` other than ``keep_out`` are carried over (hard links);
    a failure leaves ``target`` as it was. ``ValueError`` for a link or, without ``overwrite``,
    an existing ``target``; ``NotADirectoryError`` for a file.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(target.parent):
        if target.is_symlink():
            raise ValueError(
                f"{target} is a symbolic link: folders are replaced whole, never through a link. "
                f"Pass the folder itself ({os.path.realpath(target)!r})."
            )
        if target.exists() and not target.is_dir():
            raise NotADirectoryError(f"{target} exists and is not a directory.")
        if target.exists() and not overwrite:
            raise ValueError(
                f"{target} already exists. Pass `overwrite=True` to replace the files in it, or "
                "choose another directory."
            )
        staging = make_sibling_folder(target, "saving")
        try:
            if target.exists():
                carry_over(target, staging, skip=keep_out)
            yield staging
            fsync_path(staging)
            swap_in(staging, target)
        except BaseException as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(exc, OSError) and exc.errno is not None:  # a full disk, an I/O error
                why = exc.strerror or str(exc)
                message = f"Could not write {target}: {why}. It was left as it was."
                raise OSError(exc.errno, message) from exc
            raise


def link_or_copy(source: str, destination: str) -> None:
    """Hard-link ``source`` at ``destination`` (else copy it); follows no link."""
    try:
        os.link(source, destination, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, destination, follow_symlinks=False)


def carry_over(old: Path, new: Path, skip: set[str]) -> None:
    """Give ``new`` the entries of ``old`` except ``skip`` (hard links; links stay links)."""
    with os.scandir(old) as entries:
        for entry in entries:
            if entry.name in skip:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.copytree(
                    entry.path, new / entry.name, symlinks=True, copy_function=link_or_copy
                )
            elif entry.is_symlink():
                os.symlink(os.readlink(entry.path), new / entry.name)
            else:
                link_or_copy(entry.path, str(new / entry.name))


def download_missing(folder: Path, names: list[str], source: str | Mapping[str, str]) -> None:
    """Download the files ``names`` absent from ``folder``, each written whole or not at all,
    from a base URL or a mapping name -> URL (names it lacks are skipped)."""
    import urllib.error
    import urllib.request

    for name in names:
        target = folder / name
        url = source.get(name) if isinstance(source, dict) else f"{str(source).rstrip('/')}/{name}"
        if os.path.lexists(target) or url is None:
            continue
        request = urllib.request.Request(url, headers={"User-Agent": "ptrag_sc"})
        try:
            with urllib.request.urlopen(request) as response:
                data = response.read()
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise FileNotFoundError(f"Cannot download {name} from {url}: {exc}") from None
        part = sibling_name(target, "download")
        write_bytes(folder, part.name, data)
        os.replace(part, target)
