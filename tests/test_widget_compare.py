"""The Compare widget and its Qt-free core (napari_langmamba.compare), under Xvfb."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from napari_langmamba.compare import CSV_COLUMNS, Roi, compare_slices, line_profile
from napari_langmamba.errors import ConfigError
from napari_langmamba.windowing import get_window

ABDOMEN = (-160.0, 240.0)


def windowed_psnr(x_hu: np.ndarray, ref_hu: np.ndarray, limits=ABDOMEN) -> float:
    """PSNR written out from its definition: clip to the window, scale to [0, 1], 10 log10(1/MSE)."""
    lo, hi = limits
    x = np.clip((x_hu.astype(np.float64) - lo) / (hi - lo), 0, 1)
    r = np.clip((ref_hu.astype(np.float64) - lo) / (hi - lo), 0, 1)
    return 10 * math.log10(1.0 / np.mean((x - r) ** 2))


@pytest.fixture
def noisy_pair():
    """A 2-D phantom (reference: 40 HU, flat in the centre) and two copies with known Gaussian noise."""
    rng = np.random.default_rng(1234)
    yy, xx = np.mgrid[0:128, 0:128]
    reference = np.full((128, 128), 40.0, np.float32)
    border = (yy < 24) | (yy >= 104) | (xx < 24) | (xx >= 104)
    reference[border] += (60.0 * np.sin(xx / 6.0) * np.cos(yy / 9.0))[border]  # structure outside the ROI
    before = reference + rng.normal(0.0, 25.0, reference.shape).astype(np.float32)
    after = reference + rng.normal(0.0, 8.0, reference.shape).astype(np.float32)
    return before, after, reference


@pytest.fixture
def viewer_widget(make_napari_viewer, qtbot):
    from napari_langmamba.widgets.compare import CompareWidget

    viewer = make_napari_viewer()
    widget = CompareWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Compare")
    yield viewer, widget
    # never leave a worker or a pending debounced update behind the viewer's teardown
    qtbot.waitUntil(lambda: widget.idle, timeout=10000)


def wait_for(qtbot, widget, roi: Roi):
    qtbot.waitUntil(
        lambda: widget.idle and widget.comparison is not None and widget.comparison.roi == roi, timeout=10000
    )
    return widget.comparison


# --- core -------------------------------------------------------------------------------
def test_roi_from_rectangle_corners_covers_the_enclosed_pixels():
    roi = Roi(10, 20, 30, 50)
    assert Roi.from_vertices(roi.corners(), (64, 64)) == roi
    # clipped to the image, and an ROI outside it is an error with a message
    assert Roi.from_vertices([[-5.0, -5.0], [9.5, 70.0]], (64, 64)) == Roi(0, 0, 10, 64)
    with pytest.raises(ConfigError, match="does not cover any pixel"):
        Roi.from_vertices([[100.0, 100.0], [120.0, 120.0]], (64, 64))


def test_profile_runs_along_the_centre_row():
    image = np.arange(16 * 16, dtype=np.float32).reshape(16, 16)
    x, values = line_profile(image, Roi(4, 2, 8, 10))
    assert list(x) == list(range(2, 10))
    np.testing.assert_array_equal(values, image[5, 2:10])


def test_cnr_against_a_background_roi():
    rng = np.random.default_rng(7)
    image = rng.normal(0.0, 10.0, (96, 96)).astype(np.float32)
    image[10:40, 10:40] += 100.0
    roi, background = Roi(10, 10, 40, 40), Roi(50, 50, 90, 90)
    slices = {"before": ("b", image), "after": ("a", image)}
    result = compare_slices(slices, roi=roi, background=background, window=get_window("abdomen"))
    expected = abs(image[10:40, 10:40].mean() - image[50:90, 50:90].mean()) / image[50:90, 50:90].std(ddof=1)
    assert result.metrics[0].cnr == pytest.approx(expected, rel=1e-5)
    assert result.metrics[0].cnr == pytest.approx(10.0, rel=0.08)


# --- widget -----------------------------------------------------------------------------
def test_side_by_side_and_back_restores_layers_grid_and_camera(viewer_widget, noisy_pair):
    viewer, widget = viewer_widget
    before, after, reference = (np.stack([im] * 3) for im in noisy_pair)  # (3, 128, 128) volumes
    viewer.add_image(np.zeros((3, 128, 128), np.float32), name="unrelated", visible=False)
    viewer.add_image(before, name="low dose", contrast_limits=(-1000, 1000))
    viewer.add_image(after, name="denoised", contrast_limits=(-500, 500))
    viewer.add_image(reference, name="normal dose")
    viewer.add_points([[1, 64, 64]], name="marks")
    widget.set_layers("low dose", "denoised", "normal dose")
    widget.set_window("abdomen")
    viewer.scene.camera.zoom = 2.5
    viewer.scene.camera.center = (1.0, 40.0, 70.0)
    names = [layer.name for layer in viewer.layers]
    visible = [layer.visible for layer in viewer.layers]
    camera = (tuple(viewer.scene.camera.center), viewer.scene.camera.zoom)
    grid = (viewer.canvas.grid.enabled, viewer.canvas.grid.shape, viewer.canvas.grid.stride)

    widget.grid_button.click()  # on
    assert widget.side_by_side
    assert viewer.canvas.grid.enabled
    assert viewer.canvas.grid.shape == (2, 3)
    shown = [layer.name for layer in viewer.layers if layer.visible]
    cells = ["low dose", "denoised", "normal dose", "denoised - low dose", "denoised - normal dose"]
    # each cell: its image with an ROI layer drawn over it (issue 13: the ROI never gets a cell of its own)
    assert shown == [name for cell in cells for name in (cell, "ROI" if cell == "low dose" else f"ROI ({cell})")]
    assert viewer.canvas.grid.stride == 2
    difference = viewer.layers["denoised - low dose"]
    lo, hi = difference.contrast_limits
    assert lo == pytest.approx(-hi) and hi > 0
    assert difference.colormap.name == "bwr"
    np.testing.assert_allclose(np.asarray(difference.data[1]), after[1] - before[1], atol=1e-4)
    # one window for the three images, linked: changing one changes the others
    assert tuple(viewer.layers["denoised"].contrast_limits) == ABDOMEN
    viewer.layers["low dose"].contrast_limits = (-100.0, 100.0)
    assert tuple(viewer.layers["normal dose"].contrast_limits) == (-100.0, 100.0)

    widget.grid_button.click()  # back
    assert not widget.side_by_side
    assert [layer.name for layer in viewer.layers] == names
    assert [layer.visible for layer in viewer.layers] == visible
    assert (viewer.canvas.grid.enabled, viewer.canvas.grid.shape, viewer.canvas.grid.stride) == grid
    np.testing.assert_allclose(viewer.scene.camera.center, camera[0])
    assert viewer.scene.camera.zoom == pytest.approx(camera[1])
    # unlinked again
    viewer.layers["low dose"].contrast_limits = (-50.0, 50.0)
    assert tuple(viewer.layers["denoised"].contrast_limits) == (-100.0, 100.0)


def test_roi_sd_and_psnr_match_known_noise_and_formula(viewer_widget, noisy_pair, qtbot):
    viewer, widget = viewer_widget
    before, after, reference = noisy_pair
    viewer.add_image(before, name="before")
    viewer.add_image(after, name="after")
    viewer.add_image(reference, name="reference")
    widget.set_layers("before", "after", "reference")
    roi = Roi(32, 32, 96, 96)
    widget.set_roi(roi)
    result = wait_for(qtbot, widget, roi)

    by_role = {m.role: m for m in result.metrics}
    noise_sd = {
        role: float(np.std((image - reference)[roi.slices], ddof=1))
        for role, image in (("before", before), ("after", after))
    }
    # the phantom is flat in the ROI: its SD there is the noise's
    assert by_role["before"].sd_hu == pytest.approx(25.0, rel=0.03)
    assert by_role["after"].sd_hu == pytest.approx(8.0, rel=0.03)
    assert by_role["reference"].sd_hu == pytest.approx(0.0, abs=1e-4)
    assert by_role["before"].sd_hu == pytest.approx(noise_sd["before"], rel=1e-5)
    assert by_role["before"].mean_hu == pytest.approx(float(before[roi.slices].mean()), rel=1e-5)
    for role, image in (("before", before), ("after", after)):
        expected = windowed_psnr(image[roi.slices], reference[roi.slices])
        assert by_role[role].psnr == pytest.approx(expected, abs=1e-3)
    # with sigma 25 HU in a 400 HU window: PSNR = 10 log10(400^2 / 25^2) = 16.1 dB
    assert by_role["before"].psnr == pytest.approx(10 * math.log10(400**2 / 25.0**2), abs=0.3)
    assert 0 < by_role["before"].ssim < by_role["after"].ssim <= 1
    assert 0 < by_role["before"].fsim <= 1
    assert math.isnan(by_role["reference"].psnr)
    # the table shows them
    assert widget.metrics_table.rowCount() == 3
    assert widget.metrics_table.item(0, 2).text() == f"{by_role['before'].sd_hu:.1f}"

    # whole-slice metrics: the numbers of 'training evaluate'
    widget.region_combo.setCurrentText("whole slice")
    qtbot.waitUntil(lambda: widget.idle and widget.comparison.metrics_region == "slice", timeout=10000)
    slice_psnr = widget.comparison.metrics[0].psnr
    assert slice_psnr == pytest.approx(windowed_psnr(before, reference), abs=1e-3)
    # ... exactly what `training evaluate` computes per slice
    from napari_langmamba.metrics import evaluate_slice

    for m, image in zip(widget.comparison.metrics[:2], (before, after), strict=True):
        expected = evaluate_slice(image, reference, window="abdomen")
        assert (m.psnr, m.ssim, m.fsim) == pytest.approx((expected["psnr"], expected["ssim"], expected["fsim"]), rel=1e-9)


def test_volume_uses_the_current_slice(viewer_widget, qtbot):
    viewer, widget = viewer_widget
    rng = np.random.default_rng(3)
    sigmas = np.array([5.0, 10.0, 20.0, 40.0])
    before = (rng.normal(0.0, 1.0, (4, 64, 64)) * sigmas[:, None, None]).astype(np.float32)
    after = np.zeros_like(before)
    viewer.add_image(before, name="before", scale=(2.0, 0.8, 0.8))
    viewer.add_image(after, name="after", scale=(2.0, 0.8, 0.8))
    widget.set_layers("before", "after")
    viewer.dims.set_current_step(0, 2)
    roi = Roi(8, 8, 56, 56)
    widget.set_roi(roi)
    result = wait_for(qtbot, widget, roi)
    assert result.slice_index == 2
    assert result.metrics[0].sd_hu == pytest.approx(20.0, rel=0.05)
    # a 2-D ROI on a scaled volume: the rectangle lies on the chosen pixels in world space
    np.testing.assert_allclose(widget.roi_layer.scale, (0.8, 0.8))


def test_mismatched_shapes_give_a_clear_message(viewer_widget, qtbot):
    from napari.utils.notifications import notification_manager

    viewer, widget = viewer_widget
    viewer.add_image(np.zeros((64, 64), np.float32), name="small")
    viewer.add_image(np.zeros((32, 32), np.float32), name="smaller")
    widget.set_layers("small", "smaller")
    shown = []
    notification_manager.notification_ready.connect(shown.append)
    try:
        widget.update_button.click()
    finally:
        notification_manager.notification_ready.disconnect(shown.append)
    assert "same shape" in widget.status_label.text()
    assert any("same shape" in str(n.message) for n in shown)
    widget.grid_button.click()  # refused with a message, nothing changed
    assert not widget.side_by_side and not viewer.canvas.grid.enabled
    assert [layer.name for layer in viewer.layers] == ["small", "smaller"]


def test_export_writes_png_and_csv(viewer_widget, noisy_pair, tmp_path, qtbot):
    viewer, widget = viewer_widget
    before, after, reference = noisy_pair
    for name, image in (("before", before), ("after", after), ("reference", reference)):
        viewer.add_image(image, name=name)
    widget.set_layers("before", "after", "reference")
    widget.set_roi(Roi(40, 40, 88, 88), background=Roi(0, 0, 30, 30))
    png, csv_path = widget.export(tmp_path / "comparison.png")

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    height, width = imread(png).shape[:2]
    assert height > 400 and width > 600
    with csv_path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [r["role"] for r in rows] == ["before", "after", "reference"]
    assert {(r["roi_y0"], r["roi_x0"], r["roi_y1"], r["roi_x1"]) for r in rows} == {("40", "40", "88", "88")}
    assert float(rows[0]["psnr"]) == pytest.approx(windowed_psnr(before[40:88, 40:88], reference[40:88, 40:88]), abs=1e-3)
    assert float(rows[0]["sd_hu"]) == pytest.approx(np.std(before[40:88, 40:88], ddof=1), rel=1e-4)
    assert math.isfinite(float(rows[0]["cnr"]))
    assert rows[0]["window"] == "abdomen"


def test_every_control_has_a_tooltip(viewer_widget):
    _viewer, widget = viewer_widget
    missing = [name for name, control in widget.bound_controls.items() if not control.toolTip()]
    assert missing == []


def test_side_by_side_draws_the_roi_over_every_image_and_moving_one_moves_all(viewer_widget, noisy_pair):
    viewer, widget = viewer_widget
    before, after, reference = noisy_pair
    for data, name in ((before, "low dose"), (after, "denoised"), (reference, "normal dose")):
        viewer.add_image(data, name=name)
    widget.set_layers("low dose", "denoised", "normal dose")
    widget.add_background_roi()
    widget.grid_button.click()
    grid = viewer.canvas.grid
    layers = list(viewer.layers)
    cell_of = {layer.name: grid.position(i, layers) for i, layer in enumerate(layers) if layer.visible}
    images = ["low dose", "denoised", "normal dose", "denoised - low dose", "denoised - normal dose"]
    rois = [widget.roi_layer, *widget.roi_copies]
    assert len(rois) == len(images) and grid.actual_shape(layers) == (2, 3)
    assert len({cell_of[name] for name in images}) == len(images)  # one cell per image ...
    for image, roi in zip(images, rois, strict=True):
        assert cell_of[roi.name] == cell_of[image]  # ... and its ROI layer in that same cell
        assert len(roi.data) == 2  # the ROI and the background ROI
        np.testing.assert_allclose(roi.data[0], widget.roi_layer.data[0])
    assert not any(layer.visible and name not in images and not name.startswith("ROI")
                   for name, layer in ((lyr.name, lyr) for lyr in layers))

    # moving the ROI in any cell moves it in all, and the metrics follow
    moved = np.asarray(widget.roi_copies[1].data[0]) + np.array([10.0, -6.0])
    widget.roi_copies[1].data = [moved, widget.roi_copies[1].data[1]]
    for roi in rois:
        np.testing.assert_allclose(roi.data[0], moved)
        assert len(roi.data) == 2
    old_roi = widget.rois()[0]
    widget.roi_layer.data = [np.asarray(widget.roi_layer.data[0]) + np.array([-4.0, 4.0]), widget.roi_layer.data[1]]
    for roi in widget.roi_copies:
        np.testing.assert_allclose(roi.data[0], widget.roi_layer.data[0])
    assert widget.rois()[0] != old_roi

    # back to the single view: one ROI layer with the moved rectangles, no copies left
    widget.grid_button.click()
    assert not viewer.canvas.grid.enabled and widget.roi_copies == []
    assert [layer.name for layer in viewer.layers if layer.name.startswith("ROI")] == ["ROI"]
    np.testing.assert_allclose(widget.roi_layer.data[0], moved + np.array([-4.0, 4.0]))
