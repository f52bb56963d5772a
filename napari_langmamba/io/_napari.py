"""napari (npe2) reader, writers and sample data — without importing napari or Qt.

napari imports this module when it needs a contribution; it only checks file names and the
DICOM magic here, and loads pydicom/nibabel when something is actually read or written.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

LayerData = tuple[Any, dict[str, Any], str]
ReaderFunction = Callable[[str | Sequence[str]], list[LayerData]]

_CT_FILE_SUFFIXES = (".nii", ".nii.gz", ".npy", ".dcm", ".dicom", ".ima")
_MAX_FILES_SNIFFED = 256


def _has_dicom_magic(path: str) -> bool:
    if not os.path.isfile(path):
        return False  # a named pipe or a device: opening it could block napari
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _is_ct_file(path: str) -> bool:
    return path.lower().endswith(_CT_FILE_SUFFIXES) or _has_dicom_magic(path)


def _folder_has_dicom(folder: str) -> bool:
    """True if a DICOM file is among the first files of ``folder`` (searched recursively)."""
    seen = 0
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            path = os.path.join(root, name)
            if name.lower().endswith((".dcm", ".dicom", ".ima")) or _has_dicom_magic(path):
                return True
            seen += 1
            if seen >= _MAX_FILES_SNIFFED:
                return False
    return False


def _read(path: str | Sequence[str]) -> list[LayerData]:
    from napari_langmamba.io.api import read_ct
    from napari_langmamba.io.layers import volume_to_layer_data

    if isinstance(path, (list, tuple)):
        paths = [str(p) for p in path]
        if all(os.path.isfile(p) and not p.lower().endswith((".nii", ".nii.gz", ".npy")) for p in paths):
            return [volume_to_layer_data(read_ct(paths))]  # several DICOM files: one series
        return [volume_to_layer_data(read_ct(p)) for p in paths]
    return [volume_to_layer_data(read_ct(path))]


def get_reader(path: str | Sequence[str]) -> ReaderFunction | None:
    """npe2 reader: a function that reads ``path``, or None when it is not CT this plugin reads.

    Accepts a DICOM folder (drag and drop), DICOM files (``.dcm``/``.ima`` or any file with the
    DICOM magic), NIfTI (``.nii``, ``.nii.gz``) and ``.npy`` arrays, or a list of those.
    """
    paths = [str(p) for p in path] if isinstance(path, (list, tuple)) else [str(path)]
    if not paths:
        return None
    for p in paths:
        if os.path.isdir(p):
            if not _folder_has_dicom(p):
                return None
        elif not _is_ct_file(p):
            return None
    return _read


def _write(path: str, data: Any, meta: dict, fmt: str) -> list[str]:
    from napari_langmamba.io.api import write_ct
    from napari_langmamba.io.layers import layer_to_volume

    volume = layer_to_volume(data, meta)
    written = write_ct(volume, path, format=fmt)
    return [str(written)]


def write_dicom(path: str, data: Any, meta: dict) -> list[str]:
    """npe2 single-layer writer: a derived DICOM series in the folder ``path``."""
    return _write(path, data, meta, "dicom")


def write_nifti(path: str, data: Any, meta: dict) -> list[str]:
    """npe2 single-layer writer: a NIfTI file (``.nii`` or ``.nii.gz``)."""
    return _write(path, data, meta, "nifti")


def write_npy(path: str, data: Any, meta: dict) -> list[str]:
    """npe2 single-layer writer: a float32 ``.npy`` array in HU."""
    return _write(path, data, meta, "npy")


def _sample(name: str, layer_name: str) -> list[LayerData]:
    from napari_langmamba.io.layers import volume_to_layer_data
    from napari_langmamba.io.samples import load_sample

    return [volume_to_layer_data(load_sample(name), name=layer_name)]


def sample_abdomen() -> list[LayerData]:
    """npe2 sample: a real 512 x 512 abdominal CT slice (pydicom-data), in HU."""
    return _sample("abdomen", "abdomen sample (HU)")


def sample_ct_small() -> list[LayerData]:
    """npe2 sample: pydicom's 128 x 128 CT_small.dcm, in HU."""
    return _sample("ct_small", "CT_small (HU)")


__all__ = ["get_reader", "sample_abdomen", "sample_ct_small", "write_dicom", "write_nifti", "write_npy"]
