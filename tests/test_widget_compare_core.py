"""The Compare widget's GUI-free pieces: ROI geometry, the worker's comparison, table texts, differences."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from napari_langmamba.compare import ImageMetrics, Roi, compare_slices
from napari_langmamba.widgets._compare_core import (
    TABLE_COLUMNS,
    background_beside,
    compute_comparison,
    format_metric,
    lazy_difference,
    metric_cells,
    pixel_to_roi_data,
    roi_data_to_pixel,
)
from napari_langmamba.windowing import get_window


def test_metrics_are_written_with_their_digits_and_dashes():
    assert format_metric(math.nan, 2) == "-"
    assert format_metric(math.inf, 2) == "inf" and format_metric(-math.inf, 1) == "-inf"
    assert format_metric(12.345, 1) == "12.3" and format_metric(0.98765, 4) == "0.9877"
    row = ImageMetrics(role="after", image="denoised", mean_hu=40.04, sd_hu=9.96, cnr=3.333, psnr=35.5)
    cells = metric_cells(row)
    assert len(cells) == len(TABLE_COLUMNS)
    assert cells == ("after", "40.0", "10.0", "3.33", "35.50", "-", "-")


def test_roi_vertices_go_through_world_coordinates_and_back():
    image = SimpleNamespace(scale=(2.0, 0.7, 0.5), translate=(0.0, 10.0, -3.0))
    roi_layer = SimpleNamespace(scale=(0.35, 0.25), translate=(4.0, 1.0))  # a 2-D Shapes layer of its own
    pixels = Roi(10, 20, 30, 50).corners()
    data = pixel_to_roi_data(image, roi_layer, pixels)
    world = data * np.asarray(roi_layer.scale) + np.asarray(roi_layer.translate)
    np.testing.assert_allclose(world, pixels * np.asarray(image.scale[-2:]) + np.asarray(image.translate[-2:]))
    np.testing.assert_allclose(roi_data_to_pixel(image, roi_layer, data), pixels)
    nd = np.column_stack([np.full(4, 7.0), data])  # vertices of an nD Shapes layer: leading axes ignored
    np.testing.assert_allclose(roi_data_to_pixel(image, roi_layer, nd), pixels)


def test_the_background_roi_sits_beside_the_roi_inside_the_image():
    roi = Roi(10, 40, 20, 50)  # 10 px wide
    assert background_beside(roi, 100) == Roi(10, 20, 20, 30)  # two widths to the left
    near_left = Roi(10, 5, 20, 15)
    assert background_beside(near_left, 100) == Roi(10, 25, 20, 35)  # no room on the left: to the right
    cramped = Roi(0, 5, 10, 15)
    assert background_beside(cramped, 20) == Roi(0, 10, 10, 20)  # clamped to the image's right edge


def test_compute_comparison_compares_the_chosen_slice():
    rng = np.random.default_rng(0)
    before = rng.normal(40, 20, size=(3, 32, 32)).astype(np.float32)
    after = before * 0.5 + 20
    inputs = {
        "layers": {"before": ("noisy", before), "after": ("denoised", after)},
        "index": 1, "roi": Roi(8, 8, 24, 24), "background": None,
        "window": get_window("abdomen"), "region": "roi",
    }
    result = compute_comparison(inputs)
    expected = compare_slices(
        {"before": ("noisy", before[1]), "after": ("denoised", after[1])},
        roi=inputs["roi"], window=inputs["window"], metrics_region="roi", slice_index=1,
    )
    assert result.metrics == expected.metrics and result.slice_label == expected.slice_label
    assert [m.image for m in result.metrics] == ["noisy", "denoised"]


@pytest.mark.parametrize("shape", [(3, 8, 6), (8, 6)])
def test_the_lazy_difference_is_after_minus_other_chunked_by_slice(shape):
    after = np.arange(np.prod(shape), dtype=np.int16).reshape(shape)
    other = np.ones(shape, dtype=np.int16) * 5
    difference = lazy_difference(after, other)
    assert difference.dtype == np.float32 and difference.shape == shape
    assert difference.chunksize == ((1, *shape[1:]) if len(shape) == 3 else shape)
    np.testing.assert_array_equal(np.asarray(difference), after.astype(np.float32) - 5)
