"""Safe writing: refuse to clobber, write to a temporary sibling, then rename into place.

A failure at any point leaves the destination as it was (absent, or the old content when
overwriting) and removes the temporary sibling.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from napari_langmamba.errors import CTWriteError

logger = logging.getLogger(__name__)


def _sibling(path: Path, tag: str, suffix: str = "") -> Path:
    return path.with_name(f".{path.name}.{tag}-{uuid.uuid4().hex[:8]}{suffix}")


def _prepare_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CTWriteError(f"Cannot create the folder {path.parent} to save {path.name}: {exc}.") from exc


def _reason(exc: BaseException) -> str:
    """What went wrong, in words a user acts on (a full disk is said as such)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk is full ({exc.strerror or exc}); free some space and save again"
    if isinstance(exc, OSError) and exc.errno == errno.EROFS:
        return f"the disk is read-only ({exc.strerror or exc}); save somewhere else"
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied ({exc.strerror or exc}); save somewhere you may write"
    if isinstance(exc, OSError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _failure(path: Path, exc: BaseException, *, existed: bool) -> CTWriteError:
    kept = f"the previous {path.name} is unchanged" if existed else "nothing was written"
    return CTWriteError(f"Could not save {path}: {_reason(exc)}. {kept[0].upper()}{kept[1:]}.")


def _fsync(path: Path) -> None:
    """Flush a file's (or folder's) content to the disk, so a rename never exposes an empty file."""
    fd = None
    try:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
    except OSError as exc:  # some systems cannot open or fsync a folder; the files were flushed
        if not path.is_dir():
            raise
        logger.debug("fsync of folder %s: %s", path, exc)
    finally:
        if fd is not None:
            os.close(fd)


@contextmanager
def atomic_file(path: str | os.PathLike, *, overwrite: bool, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on success it replaces ``path``.

    ``suffix`` is appended to the temporary name (writers such as nibabel choose the format
    from the file name). Raises :class:`CTWriteError` when ``path`` exists and ``overwrite`` is
    False, when ``path`` is a folder, or when writing fails (the error of the writer, e.g. a
    full disk, is named; the temporary file is removed and ``path`` is left as it was).
    """
    path = Path(path)
    if path.is_dir():
        raise CTWriteError(f"{path} is a folder; give a file name to save to.")
    existed = path.exists()
    if existed and not overwrite:
        raise CTWriteError(
            f"{path} already exists and was left untouched; choose another name or allow overwriting."
        )
    _prepare_parent(path)
    tmp = _sibling(path, "tmp", suffix)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except CTWriteError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of the writer leaves path as it was
        raise _failure(path, exc, existed=existed) from exc
    finally:
        if tmp.exists():
            tmp.unlink()
    logger.info("wrote %s", path)


@contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool) -> Iterator[Path]:
    """Yield a new temporary sibling folder of ``path``; on success it becomes ``path``.

    An existing empty folder is replaced; a non-empty one (or a file) only with ``overwrite``,
    in which case the old content is moved aside first and deleted only after the new folder
    is in place. Any failure (or interruption) removes the temporary folder and leaves
    ``path`` as it was; failures are raised as :class:`CTWriteError`.
    """
    path = Path(path)
    existed = path.exists()
    if existed:
        if path.is_file():
            if not overwrite:
                raise CTWriteError(
                    f"{path} is an existing file and was left untouched; choose a folder name to save the series to."
                )
        elif any(path.iterdir()) and not overwrite:
            raise CTWriteError(
                f"The folder {path} already holds files and was left untouched; choose a new or empty "
                f"folder, or allow overwriting."
            )
    _prepare_parent(path)
    tmp = _sibling(path, "tmp")
    old: Path | None = None
    try:
        tmp.mkdir()
        yield tmp
        for file in tmp.iterdir():
            _fsync(file)
        _fsync(tmp)
        if path.exists():
            old = _sibling(path, "old")
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException as exc:
        if old is not None and old.exists() and not path.exists():
            os.replace(old, path)  # put the previous content back
            old = None
        if isinstance(exc, CTWriteError) or not isinstance(exc, Exception):
            raise  # our own message, or an interruption (Ctrl-C) that must stay one
        raise _failure(path, exc, existed=existed) from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    logger.info("wrote %s", path)
