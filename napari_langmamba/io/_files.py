"""Safe writing: refuse to clobber, write to a temporary sibling, then rename into place.

A failure at any point leaves the destination as it was (absent, or the old content when
overwriting) and removes the temporary sibling.
"""

from __future__ import annotations

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


@contextmanager
def atomic_file(path: str | os.PathLike, *, overwrite: bool, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on success it replaces ``path``.

    ``suffix`` is appended to the temporary name (writers such as nibabel choose the format
    from the file name). Raises :class:`CTWriteError` when ``path`` exists and ``overwrite`` is
    False, or when ``path`` is a folder.
    """
    path = Path(path)
    if path.is_dir():
        raise CTWriteError(f"{path} is a folder; give a file name to save to.")
    if path.exists() and not overwrite:
        raise CTWriteError(
            f"{path} already exists and was left untouched; choose another name or allow overwriting."
        )
    _prepare_parent(path)
    tmp = _sibling(path, "tmp", suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        raise CTWriteError(f"Could not save {path}: {exc}. Nothing was written.") from exc
    finally:
        if tmp.exists():
            tmp.unlink()
    logger.info("wrote %s", path)


@contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool) -> Iterator[Path]:
    """Yield a new temporary sibling folder of ``path``; on success it becomes ``path``.

    An existing empty folder is replaced; a non-empty one (or a file) only with ``overwrite``,
    in which case the old content is moved aside first and deleted only after the new folder
    is in place.
    """
    path = Path(path)
    if path.exists():
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
        if path.exists():
            old = _sibling(path, "old")
            os.replace(path, old)
        os.replace(tmp, path)
    except OSError as exc:
        if old is not None and old.exists() and not path.exists():
            os.replace(old, path)  # put the previous content back
            old = None
        raise CTWriteError(f"Could not save {path}: {exc}. Nothing was written.") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    logger.info("wrote %s", path)
