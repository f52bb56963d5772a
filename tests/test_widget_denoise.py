"""The Denoise dock widget under Xvfb: linked result layers, current slice, cancel, errors."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_langmamba.checkpoint import save_checkpoint
from napari_langmamba.inference import Denoiser
from napari_langmamba.widgets._base import WorkerState
from napari_langmamba.widgets.denoise import DenoiseWidget

TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny random-init RED-CNN checkpoint."""
    from napari_langmamba.models.redcnn import REDCNN, REDCNNConfig

    torch.manual_seed(0)
    return save_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "redcnn", REDCNN(REDCNNConfig.preset("tiny")), kind="redcnn"
    )


def ct_layer_kwargs() -> dict:
    rng = np.random.default_rng(0)
    hu = np.where(np.hypot(*np.mgrid[-24:24, -32:32]) < 20, 60.0, -1000.0) + rng.normal(0, 30, (4, 48, 64))
    ct = {
        "spacing": [2.5, 0.7, 0.7],
        "origin": [-100.0, -50.0, -800.0],
        "direction": [[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]],
        "metadata": {"Modality": "CT", "SeriesDescription": "phantom"},
        "source": "/data/phantom",
    }
    return dict(
        data=hu.astype(np.float32),
        name="ct",
        scale=(2.5, 0.7, 0.7),
        translate=(-800.0, -50.0, -100.0),
        contrast_limits=(-160.0, 240.0),
        metadata={"ct": ct},
    )


@pytest.fixture
def viewer_widget(make_napari_viewer, ckpt):
    Denoiser.clear_cache()
    viewer = make_napari_viewer()
    layer = viewer.add_image(**ct_layer_kwargs())
    widget = DenoiseWidget(viewer)
    widget.set_weights(ckpt)
    widget.device_combo.setCurrentText("cpu")
    widget.batch_spin.setValue(2)
    return viewer, widget, layer


def wait_idle(qtbot, widget: DenoiseWidget) -> None:
    qtbot.waitUntil(
        lambda: widget.worker is None and widget.state is not WorkerState.RUNNING, timeout=TIMEOUT_MS
    )


def test_run_adds_a_linked_layer(viewer_widget, qtbot, ckpt):
    viewer, widget, layer = viewer_widget
    assert widget.layer_combo.currentText() == "ct"
    assert widget.weights_combo.currentData() == "checkpoint"
    widget.run_button.click()
    wait_idle(qtbot, widget)
    assert widget.state is WorkerState.DONE, widget.status_label.text()

    assert [lyr.name for lyr in viewer.layers] == ["ct", "ct denoised"]
    out = viewer.layers["ct denoised"]
    assert out.data.shape == layer.data.shape and out.data.dtype == np.float32
    np.testing.assert_allclose(out.scale, layer.scale)
    np.testing.assert_allclose(out.translate, layer.translate)
    expected = Denoiser.load(ckpt, device="cpu").denoise(layer.data, batch_size=2)
    np.testing.assert_array_equal(out.data, expected)  # the same engine, deterministic on CPU
    assert np.abs(out.data - layer.data).mean() > 1.0

    meta = out.metadata["denoise"]
    sha = Denoiser.load(ckpt, device="cpu").info["checkpoint_sha256"]
    assert meta["checkpoint_sha256"] == sha
    assert meta["model"]["kind"] == "redcnn" and meta["model"]["preset"] == "tiny"
    assert meta["settings"] == {
        "weights": str(ckpt),
        "device": "cpu",
        "batch_size": 2,
        "scope": "volume",
        "slice_index": None,
        "tile": 512,
        "strength": 100.0,
        "self_ensemble": False,
    }
    assert meta["strength_percent"] == 100.0
    assert meta["input_layer"] == "ct"
    ct = out.metadata["ct"]
    assert ct["spacing"] == [2.5, 0.7, 0.7] and ct["origin"] == [-100.0, -50.0, -800.0]
    assert ct["metadata"]["SeriesDescription"] == "phantom denoised redcnn tiny 100% (LangMamba)"

    # Contrast limits are linked both ways.
    layer.contrast_limits = (-100.0, 100.0)
    assert tuple(out.contrast_limits) == (-100.0, 100.0)
    out.contrast_limits = (-50.0, 150.0)
    assert tuple(layer.contrast_limits) == (-50.0, 150.0)

    # A second run adds another layer and leaves the first as it was.
    first = out.data.copy()
    widget.layer_combo.setCurrentText("ct")
    widget.run()
    wait_idle(qtbot, widget)
    assert [lyr.name for lyr in viewer.layers] == ["ct", "ct denoised", "ct denoised [2]"]
    np.testing.assert_array_equal(viewer.layers["ct denoised"].data, first)


def test_a_kernel_the_model_never_saw_is_named_in_a_warning(make_napari_viewer, qtbot, tmp_path):
    from napari_langmamba.models.redcnn import REDCNN, REDCNNConfig

    torch.manual_seed(0)
    record = {"training": {"data": {"train": {"kernels": ["B30f", "D45f"]}}}}
    trained = save_checkpoint(tmp_path / "trained", REDCNN(REDCNNConfig.preset("tiny")), kind="redcnn", extra=record)
    Denoiser.clear_cache()
    viewer = make_napari_viewer()
    sharp = ct_layer_kwargs()
    sharp["metadata"]["ct"]["metadata"]["ConvolutionKernel"] = "B70f"
    viewer.add_image(**sharp)
    smooth = ct_layer_kwargs()
    smooth["metadata"]["ct"]["metadata"]["ConvolutionKernel"] = "B30f"
    viewer.add_image(**{**smooth, "name": "smooth"})
    widget = DenoiseWidget(viewer)
    widget.set_weights(trained)
    widget.device_combo.setCurrentText("cpu")
    widget.scope_combo.setCurrentIndex(widget.scope_combo.findData("slice"))
    for name, warned in (("ct", True), ("smooth", False)):
        widget.layer_combo.setCurrentText(name)
        widget.run()
        wait_idle(qtbot, widget)
        assert widget.state is WorkerState.DONE, widget.status_label.text()
        text = widget.status_label.text()
        assert text.startswith(f"Added '{name} denoised'")
        assert ("kernel B70f; the model was trained on B30f, D45f only" in text) is warned


def test_current_slice_gives_a_placed_single_slice_layer(viewer_widget, qtbot, ckpt):
    viewer, widget, layer = viewer_widget
    viewer.dims.set_current_step(0, 2)
    widget.scope_combo.setCurrentIndex(widget.scope_combo.findData("slice"))
    widget.run()
    wait_idle(qtbot, widget)
    out = viewer.layers["ct denoised"]
    assert out.data.shape == (1, 48, 64)
    np.testing.assert_allclose(out.translate, [-800.0 + 2 * 2.5, -50.0, -100.0])
    np.testing.assert_allclose(
        out.data[0], Denoiser.load(ckpt, device="cpu").denoise(layer.data[2]), atol=1e-4
    )
    assert out.metadata["denoise"]["settings"]["slice_index"] == 2
    # The slice's patient position: origin + 2 * dz along the slice normal (LPS z here).
    assert out.metadata["ct"]["origin"] == pytest.approx([-100.0, -50.0, -800.0 + 5.0])


class GatedModel(torch.nn.Module):
    """Identity model that runs one batch per permit, so the test controls the worker's pace."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.gate = threading.Semaphore(0)
        self.calls = 0

    def forward(self, x):
        if not self.gate.acquire(timeout=30):
            raise RuntimeError("test gate never opened")
        self.calls += 1
        return x * self.scale


def test_cancel_stops_within_one_batch_and_adds_nothing(viewer_widget, qtbot, monkeypatch):
    viewer, widget, layer = viewer_widget
    model = GatedModel()
    denoiser = Denoiser(model, device="cpu")
    monkeypatch.setattr(
        Denoiser, "load", classmethod(lambda cls, weights, *, device="auto", amp=True: denoiser)
    )
    before = layer.data.copy()
    widget.batch_spin.setValue(1)

    widget.run_button.click()
    assert widget.state is WorkerState.RUNNING
    assert not widget.run_button.isEnabled() and widget.cancel_button.isEnabled()
    model.gate.release()  # let exactly one batch through
    qtbot.waitUntil(lambda: widget.progress_bar.value() == 1, timeout=TIMEOUT_MS)
    widget.cancel_button.click()
    model.gate.release(10)  # the worker may finish the batch it is in, never more
    wait_idle(qtbot, widget)

    assert widget.state is WorkerState.CANCELLED
    assert model.calls <= 2 < layer.data.shape[0]
    assert [lyr.name for lyr in viewer.layers] == ["ct"]
    np.testing.assert_array_equal(layer.data, before)
    assert widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()


def test_errors_are_reported_and_the_widget_stays_usable(viewer_widget, qtbot, tmp_path, ckpt):
    viewer, widget, layer = viewer_widget
    (tmp_path / "not_a_checkpoint").mkdir()
    widget.set_weights(tmp_path / "not_a_checkpoint")
    assert widget.run() is None  # refused on the GUI thread, before any worker
    assert "neither a checkpoint folder" in widget.status_label.text()

    widget.weights_combo.setCurrentIndex(widget.weights_combo.findData("checkpoint"))
    widget.weights_path.setText("")
    assert widget.run() is None
    assert "Choose a checkpoint folder" in widget.status_label.text()

    # An error inside the worker (NaN in the image) fails the run without adding a layer.
    bad = viewer.add_image(np.full((2, 32, 32), np.nan, np.float32), name="broken")
    widget.set_weights(ckpt)
    widget.layer_combo.setCurrentText("broken")
    widget.run()
    wait_idle(qtbot, widget)
    assert widget.state is WorkerState.FAILED
    assert "NaN" in widget.status_label.text()
    assert [lyr.name for lyr in viewer.layers] == ["ct", "broken"]

    viewer.layers.remove(bad)
    assert widget.layer_combo.currentText() == "ct"
    widget.run()
    wait_idle(qtbot, widget)
    assert widget.state is WorkerState.DONE
    assert "ct denoised" in viewer.layers


def test_layer_choices_follow_the_viewer(viewer_widget):
    viewer, widget, layer = viewer_widget
    viewer.add_labels(np.zeros((4, 48, 64), np.uint8), name="mask")
    viewer.add_image(np.zeros((8, 8, 3), np.uint8), name="photo", rgb=True)
    viewer.add_image(np.zeros((16, 16), np.float32), name="slice")
    names = [widget.layer_combo.itemText(i) for i in range(widget.layer_combo.count())]
    assert names == ["ct", "slice"]
    assert widget.layer_combo.currentText() == "ct"
    viewer.layers["slice"].name = "renamed"
    assert "renamed" in [widget.layer_combo.itemText(i) for i in range(widget.layer_combo.count())]
    viewer.layers.remove("ct")
    assert widget.input_layer is viewer.layers["renamed"]


def test_every_control_has_a_tooltip(viewer_widget):
    _, widget, _ = viewer_widget
    missing = [name for name, control in widget.bound_controls.items() if not control.toolTip()]
    assert missing == []
    assert {"layer_combo", "weights_combo", "run_button", "cancel_button", "progress_bar"} <= set(widget.bound_controls)


# --- strength ------------------------------------------------------------------------------------
def test_strength_blends_and_changing_it_never_runs_the_model_again(viewer_widget, qtbot, ckpt, monkeypatch,
                                                                    tmp_path):
    viewer, widget, layer = viewer_widget
    model = Denoiser.load(ckpt, device="cpu").denoise(layer.data, batch_size=2)
    calls = []
    real = Denoiser.iter_denoise

    def counting(self, *args, **kwargs):
        calls.append(args[0].shape)
        return (yield from real(self, *args, **kwargs))

    monkeypatch.setattr(Denoiser, "iter_denoise", counting)
    assert widget.strength_spin.value() == 100  # the default: the model's output
    widget.strength_spin.setValue(50)
    widget.run()
    wait_idle(qtbot, widget)
    assert widget.state is WorkerState.DONE, widget.status_label.text()
    assert len(calls) == 1
    out = widget.result_layer
    np.testing.assert_allclose(out.data, (layer.data + model) / 2, atol=1e-3)  # 50 %: the midpoint
    assert out.metadata["denoise"]["strength_percent"] == 50.0
    assert "50%" in out.metadata["ct"]["metadata"]["SeriesDescription"]

    widget.strength_spin.setValue(0)
    np.testing.assert_array_equal(out.data, layer.data)  # 0 %: the input exactly
    widget.strength_spin.setValue(100)
    np.testing.assert_array_equal(out.data, model)  # 100 %: the model's output exactly
    widget.strength_spin.setValue(30)
    np.testing.assert_allclose(out.data, layer.data + 0.3 * (model - layer.data), atol=1e-3)
    assert len(calls) == 1  # the model ran once, for the first run only
    meta = out.metadata["denoise"]
    assert meta["strength_percent"] == 30.0 and meta["settings"]["strength"] == 30.0
    assert out.metadata["ct"]["metadata"]["SeriesDescription"] == "phantom denoised redcnn tiny 30% (LangMamba)"
    assert [lyr.name for lyr in viewer.layers] == ["ct", "ct denoised"]  # updated in place, nothing added
    assert "did not run again" in widget.status_label.text()

    # The exported derived series carries the strength in its description.
    import pydicom

    from napari_langmamba.io import _napari

    (written,) = _napari.write_dicom(str(tmp_path / "derived"), out.data,
                                     {"metadata": out.metadata, "scale": list(out.scale)})
    description = pydicom.dcmread(next(Path(written).iterdir()), stop_before_pixels=True).SeriesDescription
    assert "30%" in description and "phantom" in description


def test_self_ensemble_box_gives_the_averaged_model_and_records_it(viewer_widget, qtbot, ckpt):
    viewer, widget, layer = viewer_widget
    averaged = Denoiser.load(ckpt, device="cpu").denoise(layer.data, self_ensemble=True)
    plain = Denoiser.load(ckpt, device="cpu").denoise(layer.data)
    widget.ensemble_check.setChecked(True)
    widget.run()
    assert not widget.ensemble_check.isEnabled()  # fixed while the model runs
    wait_idle(qtbot, widget)
    assert widget.state is WorkerState.DONE, widget.status_label.text()
    assert widget.ensemble_check.isEnabled()
    out = widget.result_layer
    np.testing.assert_allclose(out.data, averaged, atol=1e-3)
    assert np.abs(out.data - plain).max() > 0.1
    assert out.metadata["denoise"]["settings"]["self_ensemble"] is True


# --- settings that stick -------------------------------------------------------------------------
def test_settings_persist_across_two_widget_instances_and_reset(make_napari_viewer, ckpt):
    from napari_langmamba.widgets import _settings

    first = DenoiseWidget(make_napari_viewer())
    default_batch = first.batch_spin.value()
    assert default_batch != 7 and first.strength_spin.value() == 100
    assert set(first.persisted) == {"weights_combo", "weights_path", "device_combo", "batch_spin", "strength_spin",
                                    "ensemble_check"}
    assert not first.ensemble_check.isChecked()
    first.set_weights("sharp")  # the bundled sharp-kernel weights need no path
    assert first.weights_combo.currentData() == "sharp" and not first.weights_path.isEnabled()
    first.set_weights(ckpt)
    first.device_combo.setCurrentText("cpu")
    first.batch_spin.setValue(7)
    first.strength_spin.setValue(40)
    first.ensemble_check.setChecked(True)
    assert _settings.settings_path().is_file()  # the temporary location of this test (conftest)

    second = DenoiseWidget(make_napari_viewer())  # a later napari session
    assert second.weights_combo.currentData() == "checkpoint"
    assert second.weights_path.text() == str(ckpt)
    assert second.device_combo.currentText() == "cpu"
    assert second.batch_spin.value() == 7 and second.strength_spin.value() == 40
    assert second.ensemble_check.isChecked()

    second.reset_button.click()
    assert second.weights_combo.currentData() == "default" and second.weights_path.text() == ""
    assert second.strength_spin.value() == 100 and second.batch_spin.value() == default_batch
    assert second.device_combo.currentText() == "auto" and not second.ensemble_check.isChecked()
    third = DenoiseWidget(make_napari_viewer())
    assert third.strength_spin.value() == 100 and third.weights_combo.currentData() == "default"


def test_the_result_is_the_volume_the_cli_derives(make_napari_viewer, qtbot, ckpt, tmp_path, monkeypatch):
    """For the same DICOM input (an oblique series), the Denoise widget's result layer holds the volume
    the CLI writes: the same HU, spacing, origin, direction and DICOM fields; its scale is the spacing
    and its translate the input's. A current-slice result is that volume's slice, placed on it."""
    from napari.layers import Layer

    from napari_langmamba import cli
    from napari_langmamba import io as ct_io
    from napari_langmamba.session import layer_volume

    angle = np.deg2rad(15.0)
    direction = [[0.0, -np.sin(angle), np.cos(angle)], [0.0, np.cos(angle), np.sin(angle)], [1.0, 0.0, 0.0]]
    phantom = ct_layer_kwargs()["data"]
    source = ct_io.CTVolume(hu=phantom, spacing=(2.5, 0.7, 0.8), origin=(-100.0, -50.0, -800.0),
                            direction=direction, metadata={"SeriesDescription": "phantom", "Modality": "CT"})
    series = ct_io.write_dicom_series(source, tmp_path / "series")

    written = []
    real_write_ct = ct_io.write_ct

    def capture(volume, path, **kwargs):
        written.append((volume, kwargs))
        return real_write_ct(volume, path, **kwargs)

    monkeypatch.setattr(ct_io, "write_ct", capture)
    cli.denoise_file(series, tmp_path / "cli_denoised", weights=str(ckpt), device="cpu", batch_size=2, quiet=True)
    ((cli_volume, cli_kwargs),) = written

    Denoiser.clear_cache()
    viewer = make_napari_viewer()
    layer = viewer.add_layer(Layer.create(*ct_io.volume_to_layer_data(ct_io.read_ct(series))))  # as Load adds it
    widget = DenoiseWidget(viewer)
    widget.set_weights(ckpt)
    widget.device_combo.setCurrentText("cpu")
    widget.batch_spin.setValue(2)
    widget.run()
    wait_idle(qtbot, widget)
    out = viewer.layers[f"{layer.name} denoised"]
    shown = layer_volume(out)
    np.testing.assert_array_equal(shown.hu, cli_volume.hu)
    for name in ("spacing", "origin", "direction"):
        np.testing.assert_allclose(getattr(shown, name), getattr(cli_volume, name), atol=1e-9, err_msg=name)
    np.testing.assert_allclose(out.scale, cli_volume.spacing)
    np.testing.assert_allclose(out.translate, layer.translate)
    description = shown.metadata.pop("SeriesDescription")
    assert description == cli_kwargs["description"]  # the CLI names the derived series the same way
    assert shown.metadata == {k: v for k, v in cli_volume.metadata.items() if k != "SeriesDescription"}
    assert shown.source is None and cli_volume.source is None

    viewer.dims.set_current_step(0, 2)
    widget.scope_combo.setCurrentIndex(widget.scope_combo.findData("slice"))
    widget.run()
    wait_idle(qtbot, widget)
    one = layer_volume(viewer.layers[f"{layer.name} denoised [2]"])
    np.testing.assert_allclose(one.hu, cli_volume.hu[2:3], atol=1e-3)
    np.testing.assert_allclose(one.origin, cli_volume.slice_positions()[2], atol=1e-9)
    np.testing.assert_allclose(one.spacing, cli_volume.spacing)
    np.testing.assert_allclose(one.direction, cli_volume.direction, atol=1e-12)
    assert one.metadata["source_sop_instance_uids"] == cli_volume.metadata["source_sop_instance_uids"][2:3]
    np.testing.assert_allclose(viewer.layers[f"{layer.name} denoised [2]"].data_to_world((0, 10, 20)),
                               layer.data_to_world((2, 10, 20)))
