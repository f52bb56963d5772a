"""NumPy ``.npy`` CT arrays: 2-D ``(y, x)`` or 3-D ``(z, y, x)`` in HU (or HU + 1024, Mayo layout).

``.npy`` carries no geometry, so spacing is ``(1, 1, 1)`` with a warning and the direction is
the axial one of :mod:`napari_langmamba.io`. Files are opened with ``allow_pickle=False``.
"""

from __future__ import annotations

import logging
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


def _open(path: Path) -> np.ndarray:
    """The array memory-mapped (nothing read yet), validated for rank and dtype."""
    if not path.is_file():
        raise CTReadError(f"{path} does not exist or is not a file; check the path.")
    if not os.access(path, os.R_OK):
        raise CTReadError(f"{path} cannot be read: permission denied.")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        # Object arrays cannot be memory-mapped and need pickle: refuse them.
        raise CTReadError(
            f"{path.name} is not a plain numeric .npy array ({exc}); save the HU values as a float or "
            f"integer array."
        ) from exc
    except (OSError, EOFError) as exc:
        raise CTReadError(f"{path.name} is not a readable .npy file ({exc}); it may be corrupt or truncated.") from exc
    if not isinstance(array, np.ndarray):
        raise CTReadError(f"{path.name} holds several arrays (an .npz archive?); save one HU array as .npy.")
    if array.dtype.kind not in "iuf":
        raise CTReadError(
            f"{path.name} holds {array.dtype} values; a CT array holds numbers in HU (integer or float), "
            f"not booleans, complex numbers, text or objects."
        )
    if array.ndim not in (2, 3) or 0 in array.shape:
        raise CTReadError(
            f"{path.name} holds an array of shape {array.shape}; expected a 2-D slice (y, x) or a 3-D "
            f"volume (z, y, x) in HU."
        )
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
