"""Format dispatch: one ``read_ct``/``write_ct`` for DICOM, NIfTI and NumPy."""

from __future__ import annotations

import os
from collections.abc import Generator, Sequence
from pathlib import Path

from napari_langmamba.errors import ConfigError, CTReadError
from napari_langmamba.events import Progress, run
from napari_langmamba.io import dicom, nifti, numpy_io
from napari_langmamba.io.volume import CTVolume, SeriesInfo

PathLike = str | os.PathLike
WRITE_FORMATS = ("dicom", "nifti", "npy")


def _kind(path: PathLike | Sequence[PathLike]) -> str:
    """``"dicom"``, ``"nifti"`` or ``"npy"`` for a path, or a clear error."""
    if not isinstance(path, (str, os.PathLike)):
        if not path:
            raise CTReadError("No files were given to read.")
        return "dicom"
    p = Path(path)
    if not p.exists():
        raise CTReadError(f"{p} does not exist; check the path (and that the drive is mounted).")
    if p.is_dir():
        return "dicom"
    if nifti.is_nifti_path(p):
        return "nifti"
    if numpy_io.is_npy_path(p):
        return "npy"
    if dicom.looks_like_dicom(p):
        return "dicom"
    if not os.access(p, os.R_OK):
        raise CTReadError(f"{p} cannot be read: permission denied. Ask for read access or copy it elsewhere.")
    raise CTReadError(
        f"{p.name} is not a CT file this reader knows: expected a DICOM file or folder, a NIfTI file "
        f"(.nii, .nii.gz) or a NumPy array (.npy)."
    )


def iter_read_ct(
    path: PathLike | Sequence[PathLike],
    *,
    series: str | int | SeriesInfo | None = None,
    npy_layout: str = "hu",
) -> Generator[Progress, None, CTVolume]:
    """Read a CT volume, yielding :class:`~napari_langmamba.events.Progress` per slice read.

    Parameters
    ----------
    path : path or list of paths
        A DICOM folder (searched recursively), a DICOM file, a list of DICOM files, a NIfTI
        file (``.nii``/``.nii.gz``) or a ``.npy`` array (2-D or 3-D).
    series : str, int or SeriesInfo, optional
        Which DICOM series to read when there are several: a SeriesInstanceUID (as listed by
        :func:`list_series`), an index into that list, or one of its :class:`SeriesInfo` (then
        the headers the listing read are reused, not parsed again).
    npy_layout : {"hu", "mayo"}
        How ``.npy`` values are stored: HU, or HU + 1024 (Mayo LDCT challenge).

    Returns
    -------
    CTVolume
        The generator's return value (see :func:`napari_langmamba.events.run`).

    Raises
    ------
    SeriesChoiceError
        Several series and ``series`` not given (``error.series`` lists them).
    DependencyError
        Compressed pixel data whose decoder is not installed.
    CTReadError
        Anything else that cannot be read; recoverable oddities are :class:`CTReadWarning`.
    """
    kind = _kind(path)
    if kind == "nifti":
        return (yield from nifti.iter_read_nifti(path))
    if kind == "npy":
        return (yield from numpy_io.iter_read_npy(path, npy_layout=npy_layout))
    return (yield from dicom.iter_read_dicom(path, series=series))


def read_ct(
    path: PathLike | Sequence[PathLike],
    *,
    series: str | int | SeriesInfo | None = None,
    npy_layout: str = "hu",
) -> CTVolume:
    """Read a CT volume (DICOM, NIfTI or ``.npy``); see :func:`iter_read_ct` for the arguments."""
    return run(iter_read_ct(path, series=series, npy_layout=npy_layout))


def list_series(path: PathLike | Sequence[PathLike]) -> list[SeriesInfo]:
    """The image series at ``path`` (headers only): several for a mixed DICOM folder, one otherwise."""
    kind = _kind(path)
    if kind == "nifti":
        return [nifti.nifti_series_info(path)]
    if kind == "npy":
        return [numpy_io.npy_series_info(path)]
    return run(dicom.iter_list_dicom_series(path))


def _write_format(path: Path, format: str | None) -> str:
    if format is not None:
        key = format.strip().lower()
        aliases = {"dcm": "dicom", "nii": "nifti", "nii.gz": "nifti", "numpy": "npy"}
        key = aliases.get(key, key)
        if key not in WRITE_FORMATS:
            raise ConfigError(f"Unknown format {format!r}; choose one of {', '.join(WRITE_FORMATS)}.")
        return key
    if nifti.is_nifti_path(path):
        return "nifti"
    if numpy_io.is_npy_path(path):
        return "npy"
    return "dicom"  # a folder name (with or without a suffix such as .dcmdir)


def write_ct(
    volume: CTVolume,
    path: PathLike,
    *,
    format: str | None = None,
    overwrite: bool = False,
    reference: CTVolume | None = None,
    description: str | None = None,
) -> Path:
    """Write ``volume`` as a derived DICOM series folder, NIfTI or ``.npy``.

    ``format`` defaults from the name: ``.nii``/``.nii.gz`` -> NIfTI, ``.npy`` -> NumPy,
    anything else -> a DICOM series folder (``reference`` and ``description`` apply to DICOM
    only). Nothing existing is replaced unless ``overwrite`` is True.
    """
    path = Path(path)
    kind = _write_format(path, format)
    if kind == "nifti":
        return nifti.write_nifti(volume, path, overwrite=overwrite)
    if kind == "npy":
        return numpy_io.write_npy(volume, path, overwrite=overwrite)
    return dicom.write_dicom_series(
        volume, path, reference=reference, description=description, overwrite=overwrite
    )
