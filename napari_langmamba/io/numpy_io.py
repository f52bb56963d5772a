"""NumPy ``.npy`` CT arrays: 2-D ``(y, x)`` or 3-D ``(z, y, x)`` in HU (or HU + 1024, Mayo layout).

``.npy`` carries no geometry, so spacing is ``(1, 1, 1)`` with a warning and the direction is
the axial one of :mod:`napari_langmamba.io`. Files are opened with ``allow_pickle=False``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Generator
from pathlib import Path

import numpy as np

from napari_langmamba.errors import ConfigError, CTReadError, CTWriteError
from napari_langmamba.events import Progress
from napari_langmamba.io._files import atomic_file
from napari_langmamba.io.volume import CTVolume, SeriesInfo, warn

logger = logging.getLogger(__name__)

# Offset subtracted from stored values for each layout (the Mayo LDCT challenge arrays store HU + 1024).
NPY_LAYOUTS: dict[str, float] = {"hu": 0.0, "mayo": 1024.0}


def is_npy_path(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(".npy")


def _layout_offset(npy_layout: str) -> float:
    key = str(npy_layout).strip().lower()
    if key not in NPY_LAYOUTS:
        raise ConfigError(f"Unknown .npy layout {npy_layout!r}; choose one of {', '.join(NPY_LAYOUTS)}.")
    return NPY_LAYOUTS[key]


def _read_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """``(shape, dtype, data offset)`` from an .npy header, parsed without unpickling or allocating."""
    import tokenize

    from numpy.lib import format as npy_format

    try:
        with open(path, "rb") as fh:
            if fh.read(6) != npy_format.MAGIC_PREFIX:
                kind = "a NumPy .npz archive" if path.stat().st_size and _starts_with_zip(path) else "not a .npy array"
                raise CTReadError(f"{path.name} is {kind}; save one HU array with numpy.save as .npy.")
            fh.seek(0)
            version = npy_format.read_magic(fh)
            if version == (1, 0):
                shape, fortran_order, dtype = npy_format.read_array_header_1_0(fh)
            elif version in ((2, 0), (3, 0)):
                shape, fortran_order, dtype = npy_format.read_array_header_2_0(fh)
            else:
                raise CTReadError(f"{path.name} uses .npy format version {version}, which this NumPy cannot read.")
            offset = fh.tell()
    except CTReadError:
        raise
    except (ValueError, SyntaxError, tokenize.TokenError, RecursionError, TypeError, EOFError, OSError) as exc:
        # numpy parses the header as a Python literal: a damaged one raises any of these.
        raise CTReadError(f"{path.name} is not a readable .npy file: its header is damaged ({exc}).") from exc
    return tuple(shape), dtype, offset


def _starts_with_zip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"PK\x03\x04"


def _open(path: Path) -> np.ndarray:
    """The array memory-mapped (nothing read yet), validated for rank, dtype and size."""
    if not path.is_file():
        raise CTReadError(f"{path} does not exist or is not a file; check the path.")
    if not os.access(path, os.R_OK):
        raise CTReadError(f"{path} cannot be read: permission denied.")
    shape, dtype, offset = _read_header(path)
    # Checked on the header, before mapping: object arrays would need pickle, and a shape the
    # file cannot hold is a damaged header, not a reason to map or allocate gigabytes.
    if dtype.kind not in "iuf" or dtype.hasobject:
        raise CTReadError(
            f"{path.name} is not a plain numeric .npy array: it holds {dtype} values, and a CT array holds "
            f"numbers in HU (integer or float), not booleans, complex numbers, text or objects."
        )
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in shape):
        raise CTReadError(f"{path.name} is not a readable .npy file: its header gives the shape {shape!r}.")
    if len(shape) not in (2, 3) or 0 in shape:
        raise CTReadError(
            f"{path.name} holds an array of shape {shape}; expected a 2-D slice (y, x) or a 3-D "
            f"volume (z, y, x) in HU."
        )
    expected = math.prod(shape) * dtype.itemsize
    size = path.stat().st_size
    if offset + expected > size:
        raise CTReadError(
            f"{path.name} is truncated: its header describes an array of shape {shape} ({dtype}, {expected} "
            f"bytes) but the file holds only {max(size - offset, 0)} bytes of data. Save the array again."
        )
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise CTReadError(
            f"{path.name} is not a plain numeric .npy array ({exc}); save the HU values as a float or "
            f"integer array."
        ) from exc
    except (OSError, EOFError) as exc:
        raise CTReadError(f"{path.name} is not a readable .npy file ({exc}); it may be corrupt or truncated.") from exc
    if not isinstance(array, np.ndarray) or array.shape != shape or array.dtype != dtype:
        raise CTReadError(f"{path.name} changed while it was read, or is not a single .npy array.")
    return array


def iter_read_npy(path: str | os.PathLike, *, npy_layout: str = "hu") -> Generator[Progress, None, CTVolume]:
    """Read a ``.npy`` HU array (``npy_layout="mayo"``: stored as HU + 1024) as a :class:`CTVolume`."""
    path = Path(path)
    offset = _layout_offset(npy_layout)
    mapped = _open(path)
    n = 1 if mapped.ndim == 2 else mapped.shape[0]
    try:
        hu = np.empty((n, *mapped.shape[-2:]), dtype=np.float32)
    except MemoryError as exc:
        raise CTReadError(f"Not enough memory to read {path.name} ({mapped.size * 4 / 2**30:.1f} GB).") from exc
    source = mapped[None] if mapped.ndim == 2 else mapped
    try:
        for k in range(n):
            hu[k] = source[k]
            if offset:
                hu[k] -= np.float32(offset)
            yield Progress(k + 1, n, f"Reading slice {k + 1} of {n}")
    except (OSError, ValueError) as exc:
        raise CTReadError(f"{path.name} could not be read ({exc}); it may be truncated.") from exc
    finally:
        del source, mapped  # release the memory map (Windows cannot delete a mapped file)
    if not np.all(np.isfinite(hu)):
        warn(f"{path.name} contains NaN or infinite values; they are kept as they are.")
    warn(f"{path.name} carries no voxel spacing; assuming 1 x 1 x 1 mm. Distances and sizes are in voxels.")
    logger.info("read .npy %s: shape %s (layout %s)", path, hu.shape, npy_layout)
    return CTVolume(
        hu=hu,
        spacing=(1.0, 1.0, 1.0),
        metadata={"source_format": "npy", "npy_layout": str(npy_layout).lower()},
        source=str(path),
    )


def npy_series_info(path: str | os.PathLike) -> SeriesInfo:
    """What :func:`napari_langmamba.io.list_series` shows for a ``.npy`` file (no data read)."""
    path = Path(path)
    mapped = _open(path)
    shape = (1, *mapped.shape) if mapped.ndim == 2 else mapped.shape
    del mapped
    return SeriesInfo(
        uid=str(path),
        description=path.stem,
        modality="CT",
        n_slices=int(shape[0]),
        rows=int(shape[1]),
        columns=int(shape[2]),
        spacing=None,
        files=(str(path),),
    )


def write_npy(volume: CTVolume, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``volume.hu`` as a float32 ``(z, y, x)`` ``.npy`` array in HU (geometry is not stored)."""
    if not isinstance(volume, CTVolume):
        raise CTWriteError(f"write_npy needs a CTVolume; got {type(volume).__name__}.")
    path = Path(path)
    if not is_npy_path(path):
        raise CTWriteError(f"A NumPy file name ends with .npy; got {path.name}.")
    with atomic_file(path, overwrite=overwrite, suffix=".npy") as tmp, open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(volume.hu, dtype=np.float32), allow_pickle=False)
    return path
