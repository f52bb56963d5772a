"""NIfTI volumes (``.nii``, ``.nii.gz``) through nibabel, in the package's (z, y, x) LPS convention.

NIfTI's world is RAS+ and its voxel axes can be stored in any order; on reading, the voxel
axes are flipped/permuted (never resampled) to point as close as possible to patient Left,
Posterior and Superior, and the array is stored as (z, y, x) = (k, j, i). Writing does the
inverse, so a volume survives a write/read round trip unchanged. See :mod:`napari_langmamba.io`.
"""

from __future__ import annotations

import logging
import math
import os
import struct
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
# A compressed file whose header claims this many times more voxel data than the file's size,
# and more than this many bytes, is taken as a corrupt header rather than allocated (the rule
# the DICOM reader uses for compressed pixel data).
MAX_COMPRESSION_RATIO = 1000
MIN_SUSPICIOUS_BYTES = 64 * 2**20
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
_LPS_AXCODES = ("L", "P", "S")
# The voxel axes' unit vectors must span space: |det| of the direction matrix (1 for orthogonal
# axes, cos(tilt) for a gantry tilt) below this means axes within ~0.06 degrees of a plane.
MIN_AXES_DETERMINANT = 1e-3


def is_nifti_path(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _nibabel_errors() -> tuple[type[Exception], ...]:
    """What nibabel raises on a damaged file; its exceptions share no base class."""
    from nibabel.filebasedimages import ImageFileError
    from nibabel.spatialimages import HeaderDataError, HeaderTypeError, ImageDataError

    # ValueError covers numpy.linalg.LinAlgError (e.g. a quaternion nibabel cannot turn into an affine).
    return (ImageFileError, HeaderDataError, HeaderTypeError, ImageDataError, OSError, EOFError, zlib.error,
            ValueError, OverflowError, struct.error)


def _load(path: Path):
    """The nibabel image at ``path`` (header parsed, no voxel data read)."""
    import nibabel as nib

    if not path.is_file():
        raise CTReadError(f"{path} does not exist or is not a file; check the path.")
    if not os.access(path, os.R_OK):
        raise CTReadError(f"{path} cannot be read: permission denied.")
    try:
        img = nib.load(str(path))
        img.affine  # noqa: B018 - computed from the header here, so a damaged one fails as a read error
    except _nibabel_errors() as exc:
        raise CTReadError(f"{path.name} is not a readable NIfTI file ({exc}); it may be corrupt or truncated.") from exc
    return img


def _check_data_size(path: Path, img, shape: tuple[int, int, int]) -> None:
    """Refuse, before anything is allocated, a header that claims more voxel data than the file holds."""
    dtype = img.get_data_dtype()
    expected = math.prod(shape) * dtype.itemsize
    size = path.stat().st_size
    offset = int(getattr(img.dataobj, "offset", 0) or 0)
    if path.name.lower().endswith(".gz"):
        if expected > max(MIN_SUSPICIOUS_BYTES, MAX_COMPRESSION_RATIO * size):
            raise CTReadError(
                f"{path.name} claims {shape[0]} x {shape[1]} x {shape[2]} voxels of {dtype} "
                f"({expected / 2**20:.0f} MB) in a {size / 2**10:.0f} KB file; the header is corrupt."
            )
        # nibabel zero-fills a buffer of the claimed size before reading the stream: above a
        # modest size, make sure the stream really holds that much first (one decompression
        # pass in 1 MB pieces, stopping as soon as enough was seen).
        if expected > MIN_SUSPICIOUS_BYTES and not _gzip_holds(path, offset + expected):
            raise CTReadError(
                f"{path.name} is truncated or corrupt: its header describes {shape[0]} x {shape[1]} x {shape[2]} "
                f"voxels of {dtype} ({expected / 2**20:.0f} MB) but the compressed data ends or breaks before "
                f"that. Copy it again."
            )
        return
    if offset + expected > size:
        raise CTReadError(
            f"{path.name} is truncated: its header describes {shape[0]} x {shape[1]} x {shape[2]} voxels of "
            f"{dtype} ({expected} bytes from byte {offset}) but the file has only {size} bytes. Copy it again."
        )


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


def _gzip_holds(path: Path, n_bytes: int) -> bool:
    """Whether the gzip stream at ``path`` decompresses to at least ``n_bytes`` without an error."""
    import gzip

    remaining = n_bytes
    try:
        with gzip.open(path, "rb") as fh:
            while remaining > 0:
                chunk = fh.read(min(remaining, 2**20))
                if not chunk:
                    return False
                remaining -= len(chunk)
    except (OSError, EOFError, zlib.error):  # a truncated or damaged stream
        return False
    return True


def _reorientation(path: Path, affine: np.ndarray, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``(transform, new_affine)``: flips/permutations taking voxel axes to L, P, S."""
    from nibabel import orientations

    _geometry(path, affine)  # a NaN or singular affine has no orientation: refuse it first
    current = orientations.io_orientation(affine)
    if np.any(np.isnan(current)):  # an axis so short next to the others that it has no direction
        raise CTReadError(f"{path.name} has a degenerate affine (an axis of almost zero length): {affine.tolist()}.")
    transform = orientations.ornt_transform(current, orientations.axcodes2ornt(_LPS_AXCODES))
    new_affine = affine @ orientations.inv_ornt_aff(transform, shape)
    return transform, new_affine


def _geometry(path: Path, affine_ras: np.ndarray):
    lps = _RAS_TO_LPS @ affine_ras
    columns = lps[:3, :3]  # column c: LPS step of voxel axis c (i, j, k)
    norms = np.linalg.norm(columns, axis=0)
    # The determinant is taken on unit axes: on the scaled ones a huge voxel size along one axis
    # (a damaged srow, fuzzing found 8e11 mm) hides axes that are coplanar.
    if (not np.all(np.isfinite(lps)) or np.any(norms < 1e-9)
            or abs(np.linalg.det(columns / norms)) < MIN_AXES_DETERMINANT):
        raise CTReadError(f"{path.name} has a degenerate affine (voxel size zero, or axes parallel or in one plane): {affine_ras.tolist()}.")
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
    transform, affine = _reorientation(path, img.affine, shape)
    spacing, origin, direction = _geometry(path, affine)
    _check_data_size(path, img, shape)
    try:
        data = np.asarray(img.dataobj, dtype=np.float32)  # applies scl_slope/scl_inter
    except _nibabel_errors() as exc:
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
    transform, affine = _reorientation(path, img.affine, shape)
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
