"""Qt-free helpers over a napari viewer and its layers, shared by the dock widgets.

They touch only the viewer's and layers' models (cameras, grids, transforms, callback lists),
never a Qt object, so they are tested without a window. napari moved the camera and the grid
between versions; the accessors here read both layouts.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.utils.transforms import CompositeAffine

if TYPE_CHECKING:
    from napari.layers import Layer


def viewer_camera(viewer: Any) -> Any:
    """napari >= 0.9 keeps the camera in ``viewer.scene``; older versions on the viewer."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None else viewer.camera


def viewer_grid(viewer: Any) -> Any:
    """napari >= 0.9: ``viewer.canvas.grid``; older versions: ``viewer.grid``."""
    canvas = getattr(viewer, "canvas", None)
    return canvas.grid if canvas is not None else viewer.grid


def remove_callback(callbacks: list, callback: Any, *_: object) -> None:
    """Remove ``callback`` from a viewer's mouse callback list, if it is still there."""
    try:
        callbacks.remove(callback)
    except ValueError:
        pass


def call_weakly(ref: weakref.ref, method: str, *args: Any) -> None:
    """Call ``method`` of the object behind ``ref`` unless it is gone or its Qt side is deleted.

    Viewer events and mouse callbacks reach a widget through this, so the viewer neither keeps
    a closed widget alive nor calls into one whose Qt object was deleted.
    """
    obj = ref()
    if obj is None:
        return
    try:
        getattr(obj, method)(*args)
    except RuntimeError:  # the Qt side of the widget is already deleted
        pass


def transform_kwargs(layer: Layer) -> dict[str, Any]:
    """``layer``'s world transform as keyword arguments of a new layer (``add_shapes``, ...)."""
    return {
        "scale": layer.scale, "translate": layer.translate, "rotate": layer.rotate,
        "shear": layer.shear, "affine": layer.affine.affine_matrix,
    }


def slice_transform_kwargs(layer: Layer, index: tuple[int, ...]) -> dict[str, Any]:
    """``layer``'s transform for a one-slice layer holding its slice ``index`` (leading axes)."""
    kwargs = transform_kwargs(layer)
    if index:
        shift = np.zeros(layer.ndim)
        shift[: len(index)] = index
        linear = CompositeAffine(
            scale=layer.scale, translate=layer.translate, rotate=layer.rotate, shear=layer.shear, ndim=layer.ndim
        ).linear_matrix
        kwargs["translate"] = np.asarray(layer.translate, dtype=float) + linear @ shift
    return kwargs
