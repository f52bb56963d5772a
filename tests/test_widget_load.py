"""The Load CT widget under Xvfb: scan, load in a worker, window presets, HU under the cursor."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

LOAD_TIMEOUT_MS = 60000  # 20 JPEG 2000 slices on a shared 2-core machine


@pytest.fixture
def viewer_widget(make_napari_viewer, qtbot):
    from napari_langmamba.widgets.load import LoadWidget

    viewer = make_napari_viewer()
    widget = LoadWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Load CT")
    yield viewer, widget
    qtbot.waitUntil(lambda: not widget.busy, timeout=LOAD_TIMEOUT_MS)


@pytest.fixture
def notifications():
    from napari.utils.notifications import notification_manager

    shown = []
    notification_manager.notification_ready.connect(shown.append)
    yield shown
    notification_manager.notification_ready.disconnect(shown.append)


def test_scan_and_load_the_real_series(viewer_widget, qtbot, dicom_series_dir):
    viewer, widget = viewer_widget
    widget.open(dicom_series_dir)  # lists the series in a worker, then loads the only one
    assert widget.busy and not widget.load_button.isEnabled() and widget.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: not widget.busy and len(viewer.layers) == 1, timeout=LOAD_TIMEOUT_MS)
    table = widget.series_table
    assert table.rowCount() == 1
    assert [table.item(0, c).text() for c in (1, 2)] == ["20", "512 x 512"]
    assert table.item(0, 3).text().startswith("2 x 0.977 x 0.977")
    layer = viewer.layers[0]
    assert layer.data.shape == (20, 512, 512)
    np.testing.assert_allclose(layer.scale, (2.0, 0.977, 0.977), atol=1e-3)
    np.testing.assert_allclose(layer.contrast_limits, (-160.0, 240.0))
    assert layer.data.dtype == np.float32
    assert layer.data.min() == pytest.approx(-1024) and layer.data.max() == pytest.approx(1839)
    assert widget.load_button.isEnabled() and not widget.cancel_button.isEnabled()
    assert "Loaded" in widget.status_label.text()

    # a window preset changes contrast limits only: the data stay the very same values
    data = layer.data
    before = np.array(data, copy=True)
    widget.window_combo.setCurrentText("lung")
    np.testing.assert_allclose(layer.contrast_limits, (-1350.0, 150.0))
    assert layer.data is data
    np.testing.assert_array_equal(layer.data, before)
    widget.set_window((-100.0, 300.0))
    assert widget.window_combo.currentText() == "custom"
    np.testing.assert_allclose(layer.contrast_limits, (-100.0, 300.0))
    np.testing.assert_array_equal(layer.data, before)

    # HU under the cursor: the viewer's mouse-move callback shows the voxel's value
    index = (10, 300, 200)
    world = np.asarray(index) * np.asarray(layer.scale) + np.asarray(layer.translate)
    viewer.dims.set_current_step(0, index[0])
    for callback in viewer.mouse_move_callbacks:
        callback(viewer, SimpleNamespace(position=tuple(world)))
    expected = float(before[index])
    assert widget.hu_label.text().startswith(f"{expected:.0f} HU at (z 10, y 300, x 200)")
    assert widget.show_value_at((0.0, -500.0, -500.0)) is None  # outside the image


def test_scan_then_load_parses_each_header_once(viewer_widget, qtbot, dicom_series_dir, monkeypatch):
    """The load reads the series the scan listed: one pydicom parse per file (before: 3, list + re-scan + decode)."""
    import collections

    import pydicom

    viewer, widget = viewer_widget
    reads: collections.Counter = collections.Counter()
    real_dcmread = pydicom.dcmread

    def counting(fp, *args, **kwargs):
        reads[getattr(fp, "name", fp)] += 1
        return real_dcmread(fp, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", counting)
    widget.open(dicom_series_dir)
    qtbot.waitUntil(lambda: not widget.busy and len(viewer.layers) == 1, timeout=LOAD_TIMEOUT_MS)
    assert len(reads) == 20 and set(reads.values()) == {1}
    assert viewer.layers[0].data.shape == (20, 512, 512)


def test_bad_path_notifies_and_adds_nothing(viewer_widget, qtbot, tmp_path, notifications):
    viewer, widget = viewer_widget
    missing = tmp_path / "no such folder"
    widget.set_path(missing)
    qtbot.waitUntil(lambda: not widget.busy, timeout=10000)
    assert any("does not exist" in str(n.message) for n in notifications)
    assert "does not exist" in widget.status_label.text()

    junk = tmp_path / "notes.txt"
    junk.write_text("not a CT")
    widget.set_path(junk, scan=False)
    widget.load()
    qtbot.waitUntil(lambda: not widget.busy, timeout=10000)
    assert len(viewer.layers) == 0
    assert any("notes.txt" in str(n.message) for n in notifications)
    assert widget.state.value == "failed"
    # the widget stays usable
    assert widget.load_button.isEnabled() and widget.scan_button.isEnabled()


def test_cancel_stops_loading(viewer_widget, qtbot, dicom_series_dir):
    viewer, widget = viewer_widget
    widget.set_path(dicom_series_dir, scan=False)
    widget.load_button.click()
    assert widget.busy and widget.cancel_button.isEnabled()
    widget.cancel_button.click()
    qtbot.waitUntil(lambda: not widget.busy, timeout=LOAD_TIMEOUT_MS)
    assert widget.state.value == "cancelled"
    assert len(viewer.layers) == 0


def test_every_control_has_a_tooltip(viewer_widget):
    _viewer, widget = viewer_widget
    missing = [name for name, control in widget.bound_controls.items() if not control.toolTip()]
    assert missing == []


def test_demo_docks_its_widgets_and_opens_the_bundled_sample(make_napari_viewer, qtbot):
    from napari_langmamba import demo
    from napari_langmamba.widgets.compare import CompareWidget
    from napari_langmamba.widgets.denoise import DenoiseWidget
    from napari_langmamba.widgets.load import LoadWidget
    from napari_langmamba.widgets.tokens import TokensWidget
    from napari_langmamba.widgets.train import TrainWidget

    viewer = make_napari_viewer()
    widgets = demo.dock_widgets(viewer)
    assert list(widgets) == ["Load CT", "Denoise", "Compare", "Tokens", "Train"] == list(demo.DOCK_WIDGETS)
    expected = {"Load CT": LoadWidget, "Denoise": DenoiseWidget, "Compare": CompareWidget,
                "Tokens": TokensWidget, "Train": TrainWidget}
    assert all(isinstance(widgets[name], cls) for name, cls in expected.items())
    # no shared data folder: the plugin's own real sample slice (pydicom-data) is opened
    assert demo.load_sample(viewer, widgets["Load CT"], series=None) is None
    assert len(viewer.layers) == 1
    layer = viewer.layers[0]
    assert layer.data.shape == (512, 512)
    np.testing.assert_allclose(layer.contrast_limits, (-160.0, 240.0))
    qtbot.waitUntil(lambda: widgets["Compare"].idle, timeout=10000)
