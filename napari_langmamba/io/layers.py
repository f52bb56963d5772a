"""CTVolume <-> napari layer data, without importing napari.

An Image layer made from a volume carries ``hu`` as data, ``scale = spacing`` (mm),
``contrast_limits`` from a display window, and the rest of the volume in
``layer.metadata["ct"] = {"spacing", "origin", "direction", "metadata", "source"}`` as plain
lists and dicts. A single slice becomes a 2-D layer (scale ``(dy, dx)``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from napari_langmamba.errors import ConfigError
from napari_langmamba.io.volume import AXIAL_DIRECTION, CTVolume
from napari_langmamba.windowing import DEFAULT_WINDOW, Window, get_window

LayerData = tuple[np.ndarray, dict[str, Any], str]


def layer_name(volume: CTVolume) -> str:
    """SeriesDescription, else the file (or folder) name without its suffix, else ``"CT"``."""
    description = str(volume.metadata.get("SeriesDescription", "") or "").strip()
    if description:
        return description
    if volume.source:
        name = Path(volume.source).name
        for suffix in (".nii.gz", ".nii", ".npy", ".dcm"):
            if name.lower().endswith(suffix):
                return name[: -len(suffix)]
        return name
    return "CT"


def ct_layer_metadata(volume: CTVolume) -> dict[str, Any]:
    """``layer.metadata["ct"]`` for a layer showing ``volume``: its geometry, DICOM fields and source, as plain data."""
    return {
        "spacing": [float(s) for s in volume.spacing],
        "origin": [float(v) for v in volume.origin],
        "direction": np.asarray(volume.direction, dtype=float).tolist(),
        "metadata": copy.deepcopy(volume.metadata),
        "source": volume.source,
    }


def volume_to_layer_data(
    volume: CTVolume,
    *,
    name: str | None = None,
    window: str | Window | tuple[float, float] = DEFAULT_WINDOW,
) -> LayerData:
    """napari layer data ``(hu, kwargs, "image")`` for ``volume``.

    Parameters
    ----------
    volume : CTVolume
        The volume to show.
    name : str, optional
        Layer name; defaults to the SeriesDescription or the file name.
    window : str, Window or (lower, upper)
        Display window for ``contrast_limits`` (a preset name such as ``"abdomen"``).

    Returns
    -------
    tuple
        ``(data, kwargs, "image")`` as napari readers and ``Layer.create`` expect; ``data`` is
        the volume's float32 HU array, 2-D for a single slice.
    """
    limits = get_window(window).limits
    spacing = tuple(float(s) for s in volume.spacing)
    if volume.hu.shape[0] == 1:
        data, scale = volume.hu[0], spacing[1:]
    else:
        data, scale = volume.hu, spacing
    kwargs: dict[str, Any] = {
        "name": name or layer_name(volume),
        "scale": list(scale),
        "contrast_limits": [float(limits[0]), float(limits[1])],
        "colormap": "gray",
        "rgb": False,
        "metadata": {"ct": ct_layer_metadata(volume)},
    }
    return data, kwargs, "image"


def layer_to_volume(data: Any, meta: Mapping[str, Any] | None = None) -> CTVolume:
    """Rebuild a :class:`CTVolume` from layer data and its kwargs/state.

    ``meta`` may be the kwargs of :func:`volume_to_layer_data`, a layer's state (what napari
    passes to writers: ``scale``, ``metadata``, ...) or empty. The layer's ``scale`` wins over
    the stored spacing (it is what the user sees); geometry and DICOM fields come from
    ``metadata["ct"]`` when present.
    """
    meta = dict(meta or {})
    if isinstance(data, (list, tuple)) and data and hasattr(data[0], "shape"):
        data = data[0]  # multiscale: the full-resolution level
    if meta.get("rgb"):
        raise ConfigError("This is an RGB image layer; a CT volume holds one HU value per voxel.")
    hu = np.asarray(data)
    while hu.ndim > 3 and hu.shape[0] == 1:
        hu = hu[0]
    if hu.ndim not in (2, 3):
        raise ConfigError(
            f"A CT layer is a 2-D slice or a 3-D volume; this one has shape {hu.shape}. Select one volume "
            f"(e.g. one time point) first."
        )
    if hu.dtype.kind not in "iuf":
        raise ConfigError(f"A CT layer holds numbers in HU; this one holds {hu.dtype} values.")
    two_d = hu.ndim == 2
    if two_d:
        hu = hu[None]
    layer_meta = meta.get("metadata") or {}
    ct = dict(layer_meta.get("ct") or meta.get("ct") or {})
    stored = [float(s) for s in ct.get("spacing") or (1.0, 1.0, 1.0)]
    scale = meta.get("scale")
    if scale is not None and len(scale) >= 2:
        scale = [abs(float(s)) for s in scale]
        spacing = scale[-3:] if len(scale) >= 3 and not two_d else [stored[0], *scale[-2:]]
    else:
        spacing = stored
    return CTVolume(
        hu=hu,
        spacing=tuple(spacing),
        origin=tuple(ct.get("origin") or (0.0, 0.0, 0.0)),
        direction=np.asarray(ct.get("direction") if ct.get("direction") is not None else AXIAL_DIRECTION),
        metadata=copy.deepcopy(dict(ct.get("metadata") or {})),
        source=ct.get("source"),
    )
