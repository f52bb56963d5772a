"""Safe writing: refuse to clobber, write to a temporary sibling, then rename into place.

A failure at any point leaves the destination as it was (absent, or the old content when
overwriting) and removes the temporary sibling. :func:`replace_atomically` is the package's one
atomic replace: the CT writers here, checkpoints (``checkpoint.py``) and training run folders
(``training/runs.py``) all put their output in place through it.
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


def _remove(path: Path, *, ignore_errors: bool = False) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=ignore_errors)
    else:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            if not ignore_errors:
                raise


def replace_atomically(staged: str | os.PathLike, path: str | os.PathLike, *, aside: str | os.PathLike | None = None) -> None:
    """Put the finished file or folder ``staged`` at ``path`` by renames, never leaving ``path`` half-written.

    ``staged`` (and each entry of a folder) is flushed to the disk first, so a rename never
    exposes an empty file, and the rename itself is flushed after. A file replaces a file in one
    rename; a folder cannot, so an existing ``path`` is first moved to ``aside`` (default: a
    unique hidden sibling; a fixed name lets a crash be recovered from) and deleted once
    ``staged`` is in place. If that rename fails (or is interrupted) the previous content is put
    back. Errors are raised as they come (``OSError``): callers word them for their users.
    """
    staged, path = Path(staged), Path(path)
    if staged.is_dir():
        for entry in staged.iterdir():
            _fsync(entry)
    _fsync(staged)
    old: Path | None = None
    if path.is_dir() or (staged.is_dir() and path.exists()):
        old = Path(aside) if aside is not None else _sibling(path, "old")
        if old.exists() or old.is_symlink():
            _remove(old)  # the leftover of an earlier crash: path is complete
        os.replace(path, old)
    try:
        os.replace(staged, path)
    except BaseException:
        if old is not None and old.exists() and not path.exists():
            os.replace(old, path)  # put the previous content back
        raise
    _fsync(path.parent)
    if old is not None:
        _remove(old, ignore_errors=True)


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
        replace_atomically(tmp, path)
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
    try:
        tmp.mkdir()
        yield tmp
        replace_atomically(tmp, path)
    except BaseException as exc:
        if isinstance(exc, CTWriteError) or not isinstance(exc, Exception):
            raise  # our own message, or an interruption (Ctrl-C) that must stay one
        raise _failure(path, exc, existed=existed) from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("wrote %s", path)
