"""CT input/output: DICOM series, NIfTI and NumPy volumes in Hounsfield units (no Qt, no napari).

Axis convention (the one place it is written down)
---------------------------------------------------
Every volume is a :class:`CTVolume` whose ``hu`` array is indexed ``(z, y, x)``:

* ``x`` is the image **column** index (DICOM ``Columns``), ``y`` the image **row** index
  (DICOM ``Rows``) and ``z`` the **slice** index;
* world coordinates are DICOM patient coordinates, **LPS** (x grows to the patient's Left,
  y to Posterior, z to Superior), in millimetres;
* ``spacing = (dz, dy, dx)`` and ``origin`` is the LPS position of the centre of voxel
  ``(0, 0, 0)``;
* ``direction`` is a 3 x 3 array whose **row a** is the LPS unit vector along array axis ``a``
  (row 0 for z, row 1 for y, row 2 for x), so the voxel ``index = (k, j, i)`` lies at::

      lps = origin + (index * spacing) @ direction

DICOM maps onto this directly: ``direction[2]`` is the first triplet of ImageOrientationPatient
(along a row, increasing column), ``direction[1]`` the second triplet (down a column) and
``direction[0]`` their cross product (the slice normal). Slices are ordered by their position
along that normal (ImagePositionPatient projected on it), ascending, and ``origin`` is the
position of the first. An axial head-first-supine series therefore has
``direction = [[0, 0, 1], [0, 1, 0], [1, 0, 0]]``: slices run feet to head, rows anterior to
posterior (top to bottom on screen) and columns patient right to left (the radiological view).

NIfTI stores a RAS+ world: its affine is converted to LPS by negating the first two world axes,
and its voxel axes are flipped/permuted (never resampled) to the nearest L, P, S directions
before being stored as ``(z, y, x)``, so a NIfTI volume and the DICOM series it came from show
the same way. ``.npy`` files carry no geometry: spacing ``(1, 1, 1)`` (with a warning) and the
axial direction above.

Public API
----------
``read_ct``, ``iter_read_ct``, ``list_series``, ``write_ct``, ``write_dicom_series``,
``write_nifti``, ``write_npy``, ``volume_to_layer_data``, ``layer_to_volume``,
``load_sample``, ``CTVolume``, ``SeriesInfo``, ``CTReadWarning``.

Submodules are imported on first use (PEP 562), so importing :mod:`napari_langmamba.io._napari`
at napari start-up stays cheap; pydicom and nibabel load only when a file is read or written.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "CTVolume": "volume",
    "SeriesInfo": "volume",
    "CTReadWarning": "volume",
    "read_ct": "api",
    "iter_read_ct": "api",
    "list_series": "api",
    "write_ct": "api",
    "write_dicom_series": "dicom",
    "write_nifti": "nifti",
    "write_npy": "numpy_io",
    "volume_to_layer_data": "layers",
    "layer_to_volume": "layers",
    "load_sample": "samples",
}

__all__ = [
    "CTReadWarning",
    "CTVolume",
    "SeriesInfo",
    "iter_read_ct",
    "layer_to_volume",
    "list_series",
    "load_sample",
    "read_ct",
    "volume_to_layer_data",
    "write_ct",
    "write_dicom_series",
    "write_nifti",
    "write_npy",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from napari_langmamba.io.api import iter_read_ct, list_series, read_ct, write_ct
    from napari_langmamba.io.dicom import write_dicom_series
    from napari_langmamba.io.layers import layer_to_volume, volume_to_layer_data
    from napari_langmamba.io.nifti import write_nifti
    from napari_langmamba.io.numpy_io import write_npy
    from napari_langmamba.io.samples import load_sample
    from napari_langmamba.io.volume import CTReadWarning, CTVolume, SeriesInfo


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module_name}"), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
