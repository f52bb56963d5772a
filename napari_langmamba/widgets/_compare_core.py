"""The Compare widget's GUI-free pieces: ROI geometry, the comparison of a slice, table texts.

Pixel boxes (:class:`~napari_langmamba.compare.Roi`) live in the chosen images' pixel indices;
the ROI Shapes layer has its own scale and translate, so :func:`pixel_to_roi_data` and
:func:`roi_data_to_pixel` convert through world coordinates. :func:`compute_comparison` is
what the widget's worker runs; :func:`lazy_difference` is the side-by-side view's difference
volume, computed by napari one slice at a time. No Qt is imported.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from napari_langmamba.compare import Comparison, ImageMetrics, Roi, compare_slices, slice_of

NONE = "(none)"
ROI_LAYER_NAME = "ROI"
ROI_COLOUR = "yellow"
BACKGROUND_COLOUR = "cyan"
METADATA_KEY = "langmamba_compare"  # marks layers this widget created (differences)
REGION_CHOICES = {"ROI": "roi", "whole slice": "slice"}
TABLE_COLUMNS = ("image", "mean HU", "SD HU", "CNR", "PSNR", "SSIM", "FSIM")


def format_metric(value: float, digits: int) -> str:
    """A metric for the table: ``digits`` decimals, ``-`` for NaN (not computed), ``inf``/``-inf``."""
    if math.isnan(value):
        return "-"
    return f"{value:.{digits}f}" if math.isfinite(value) else ("inf" if value > 0 else "-inf")


def metric_cells(m: ImageMetrics) -> tuple[str, ...]:
    """One row of the metrics table, in :data:`TABLE_COLUMNS` order."""
    return (m.role, format_metric(m.mean_hu, 1), format_metric(m.sd_hu, 1), format_metric(m.cnr, 2),
            format_metric(m.psnr, 2), format_metric(m.ssim, 4), format_metric(m.fsim, 4))


def pixel_to_roi_data(layer: Any, roi_layer: Any, vertices_yx: np.ndarray) -> np.ndarray:
    """Pixel ``(row, col)`` vertices of ``layer``'s images -> data coordinates of the ROI layer."""
    world = vertices_yx * np.asarray(layer.scale[-2:]) + np.asarray(layer.translate[-2:])
    return (world - np.asarray(roi_layer.translate[-2:])) / np.asarray(roi_layer.scale[-2:])


def roi_data_to_pixel(layer: Any, roi_layer: Any, vertices: np.ndarray) -> np.ndarray:
    """Vertices of the ROI layer (its last two axes) -> pixel ``(row, col)`` of ``layer``'s images."""
    world = vertices[:, -2:] * np.asarray(roi_layer.scale[-2:]) + np.asarray(roi_layer.translate[-2:])
    return (world - np.asarray(layer.translate[-2:])) / np.asarray(layer.scale[-2:])


def background_beside(roi: Roi, width: int) -> Roi:
    """A background box as large as ``roi``: two widths to its left, else one to its right, in the image."""
    x0 = roi.x0 - 2 * (roi.x1 - roi.x0)
    if x0 < 0:
        x0 = min(roi.x1 + (roi.x1 - roi.x0), width - (roi.x1 - roi.x0))
    return Roi(roi.y0, x0, roi.y1, x0 + (roi.x1 - roi.x0))


def compute_comparison(inputs: dict[str, Any]) -> Comparison:
    """Compare the slice ``inputs["index"]`` of each ``inputs["layers"]`` (role -> (name, data)).

    ``inputs`` also holds the ``roi``, the ``background`` ROI (or None), the ``window`` and the
    metrics ``region`` (``"roi"`` or ``"slice"``), as the widget gathers them.
    """
    slices = {role: (name, slice_of(data, inputs["index"])) for role, (name, data) in inputs["layers"].items()}
    return compare_slices(
        slices,
        roi=inputs["roi"],
        background=inputs["background"],
        window=inputs["window"],
        metrics_region=inputs["region"],
        slice_index=inputs["index"],
    )


def lazy_difference(after: Any, other: Any) -> Any:
    """``after - other`` in float32 as a dask array chunked by slice (a 2-D image: one chunk).

    napari computes only the slice on screen, so the volume is never duplicated.
    """
    import dask.array as da

    chunks = (1, *after.shape[1:]) if after.ndim == 3 else after.shape
    return da.from_array(after, chunks=chunks).astype(np.float32) - da.from_array(other, chunks=chunks).astype(
        np.float32
    )
