"""NIfTI volumes (``.nii``, ``.nii.gz``) through nibabel, in the package's (z, y, x) LPS convention.

NIfTI's world is RAS+ and its voxel axes can be stored in any order; on reading, the voxel
axes are flipped/permuted (never resampled) to point as close as possible to patient Left,
Posterior and Superior, and the array is stored as (z, y, x) = (k, j, i). Writing does the
inverse, so a volume survives a write/read round trip unchanged. See :mod:`napari_langmamba.io`.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Generator
from pathlib import Path

import numpy as np

from napari_langmamba.errors import CTReadError, CTWriteError
from napari_langmamba.events import Progress
from napari_langmamba.io._files import atomic_file
from napari_langmamba.io.volume import CTVolume, SeriesInfo, warn

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
_LPS_AXCODES = ("L", "P", "S")


def is_nifti_path(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _load(path: Path):
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    if not path.is_file():
        raise CTReadError(f"{path} does not exist or is not a file; check the path.")
    if not os.access(path, os.R_OK):
        raise CTReadError(f"{path} cannot be read: permission denied.")
    try:
        return nib.load(str(path))
    except (ImageFileError, OSError, EOFError, zlib.error, ValueError) as exc:
        raise CTReadError(f"{path.name} is not a readable NIfTI file ({exc}); it may be corrupt or truncated.") from exc


def _shape3(path: Path, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """The (i, j, k) shape of a NIfTI that holds one 3-D volume, or a clear error."""
    squeezed = list(shape)
    while len(squeezed) > 3 and squeezed[-1] == 1:
        squeezed.pop()
    if len(squeezed) == 2:
        squeezed.append(1)
    if len(squeezed) != 3:
        raise CTReadError(
            f"{path.name} holds a {len(shape)}-D image of shape {tuple(shape)} (e.g. a time series or "
            f"several channels); a CT volume is 3-D. Save the one volume you need as its own NIfTI file."
        )
    if min(squeezed) < 1:
        raise CTReadError(f"{path.name} holds an empty image of shape {tuple(shape)}.")
    return tuple(squeezed)  # type: ignore[return-value]


def _reorientation(affine: np.ndarray, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``(transform, new_affine)``: flips/permutations taking voxel axes to L, P, S."""
    from nibabel import orientations

    current = orientations.io_orientation(affine)
    transform = orientations.ornt_transform(current, orientations.axcodes2ornt(_LPS_AXCODES))
    new_affine = affine @ orientations.inv_ornt_aff(transform, shape)
    return transform, new_affine


def _geometry(path: Path, affine_ras: np.ndarray):
    lps = _RAS_TO_LPS @ affine_ras
    columns = lps[:3, :3]  # column c: LPS step of voxel axis c (i, j, k)
    norms = np.linalg.norm(columns, axis=0)
    if not np.all(np.isfinite(lps)) or np.any(norms < 1e-9) or abs(np.linalg.det(columns)) < 1e-12:
        raise CTReadError(f"{path.name} has a degenerate affine (voxel size zero or axes parallel): {affine_ras.tolist()}.")
    spacing = (float(norms[2]), float(norms[1]), float(norms[0]))
    direction = np.stack([columns[:, 2] / norms[2], columns[:, 1] / norms[1], columns[:, 0] / norms[0]])
    origin = tuple(float(v) for v in lps[:3, 3])
    return spacing, origin, direction


def iter_read_nifti(path: str | os.PathLike) -> Generator[Progress, None, CTVolume]:
    """Read a NIfTI CT volume as a :class:`CTVolume` (HU, spacing from the affine)."""
    from nibabel import orientations

    path = Path(path)
    yield Progress(0, 2, f"Reading {path.name}")
    img = _load(path)
    shape = _shape3(path, tuple(int(n) for n in img.shape))
    dtype = img.get_data_dtype()
    if dtype.kind not in "iuf":
        raise CTReadError(
            f"{path.name} stores {dtype} values (e.g. colour or complex data); a CT volume holds one number "
            f"per voxel in HU."
        )
    transform, affine = _reorientation(img.affine, shape)
    spacing, origin, direction = _geometry(path, affine)
    try:
        data = np.asarray(img.dataobj, dtype=np.float32)  # applies scl_slope/scl_inter
    except (OSError, EOFError, zlib.error, ValueError) as exc:
        raise CTReadError(f"The image data of {path.name} could not be read ({exc}); the file may be truncated.") from exc
    except MemoryError as exc:
        raise CTReadError(f"Not enough memory to read {path.name} ({np.prod(shape) * 4 / 2**30:.1f} GB).") from exc
    yield Progress(1, 2, f"Reorienting {path.name}")
    data = orientations.apply_orientation(data.reshape(shape), transform)
    hu = np.ascontiguousarray(data.transpose(2, 1, 0))  # (i, j, k) -> (z, y, x)
    if not np.all(np.isfinite(hu)):
        warn(f"{path.name} contains NaN or infinite values; they are kept as they are.")
    yield Progress(2, 2, f"Read {path.name}")
    logger.info("read NIfTI %s: shape %s, spacing %s", path, hu.shape, spacing)
    return CTVolume(
        hu=hu,
        spacing=spacing,
        origin=origin,
        direction=direction,
        metadata={"source_format": "nifti"},
        source=str(path),
    )


def nifti_series_info(path: str | os.PathLike) -> SeriesInfo:
    """What :func:`napari_langmamba.io.list_series` shows for a NIfTI file (header only)."""
    path = Path(path)
    img = _load(path)
    shape = _shape3(path, tuple(int(n) for n in img.shape))
    transform, affine = _reorientation(img.affine, shape)
    spacing, _, _ = _geometry(path, affine)
    i, j, k = (shape[int(axis)] for axis in transform[:, 0].argsort())
    return SeriesInfo(
        uid=str(path),
        description=_stem(path),
        modality="CT",
        n_slices=int(k),
        rows=int(j),
        columns=int(i),
        spacing=spacing,
        files=(str(path),),
    )


def write_nifti(volume: CTVolume, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``volume`` as NIfTI-1 (``.nii`` or ``.nii.gz``) with its geometry in the affine.

    Integer-valued HU within the int16 range are stored as int16, anything else as float32.
    Written to a temporary sibling and renamed into place; an existing file is replaced only
    with ``overwrite=True``.
    """
    import nibabel as nib

    if not isinstance(volume, CTVolume):
        raise CTWriteError(f"write_nifti needs a CTVolume; got {type(volume).__name__}.")
    path = Path(path)
    if not is_nifti_path(path):
        raise CTWriteError(f"A NIfTI file name ends with .nii or .nii.gz; got {path.name}.")
    hu = volume.hu
    data = hu.transpose(2, 1, 0)  # (z, y, x) -> (i, j, k)
    finite = bool(np.all(np.isfinite(hu)))
    if finite and np.all(hu == np.rint(hu)) and hu.min() >= -32768 and hu.max() <= 32767:
        data = data.astype(np.int16)
    # index (k, j, i) -> LPS, reordered to (i, j, k) -> LPS, then LPS -> RAS.
    affine_lps = volume.affine()[:, [2, 1, 0, 3]]
    affine_ras = _RAS_TO_LPS @ affine_lps
    img = nib.Nifti1Image(np.asarray(data), affine_ras)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine_ras, code=1)  # scanner coordinates
    img.set_sform(affine_ras, code=1)
    img.header["descrip"] = b"napari-langmamba CT (HU)"
    suffix = ".nii.gz" if path.name.lower().endswith(".gz") else ".nii"
    with atomic_file(path, overwrite=overwrite, suffix=suffix) as tmp:
        nib.save(img, str(tmp))
    return path
