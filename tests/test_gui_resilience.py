"""The GUI survives failures (issue 8, point 5), under Xvfb.

1. An exception inside a worker (the reader of Load CT, the denoiser of Denoise, the model of
   Tokens) becomes a napari notification (never a traceback dialog), and leaves the viewer,
   its layers and the widget usable: a second run succeeds.
2. Removing the input layer while Denoise runs stops the run at the next batch and adds
   nothing (no orphan ``<name> denoised`` layer for a layer that is gone); the widget ends
   cancelled and says which layer was removed. This holds too when the worker had already
   finished but its result was not yet handled. Tokens draws nothing for a removed layer,
   says so, and moves on to the remaining one.
3. Closing the viewer while a worker runs (Load CT, Denoise, Tokens) or a training process
   runs (Train) raises nothing: the worker stops at its next progress event and its signals
   no longer reach the deleted widget; the training process gets SIGTERM and ends.
4. A crashed training process shows its last error lines (extends
   ``test_widget_train.py::test_failing_run_is_crashed_and_shows_the_error_lines``, a failure
   at start with exit code 2, with a crash mid-run: a Python traceback, and a SIGKILL).

Synchronisation: workers are paused on ``threading.Event`` gates inside their generators and
the tests wait on those events or on Qt signals, with timeouts; no fixed sleeps. Exceptions
raised in Qt slots are collected with ``qtbot.captureExceptions`` and must be none. The
training process is a stand-in script (fast, no torch) run through the widget's real QProcess
path; the real trainer's crash at start is covered in ``test_widget_train.py``.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from qtpy.QtCore import QCoreApplication, QThreadPool

from napari_langmamba.errors import CheckpointError, CTReadError
from napari_langmamba.widgets._base import WorkerState

TIMEOUT_MS = 30_000
GATE_TIMEOUT_S = 30.0  # a gate never opened fails the worker (and the test) instead of hanging
N_SLICES = 4


# --- shared helpers ----------------------------------------------------------------------
@pytest.fixture
def notifications():
    """Every napari notification dispatched during the test."""
    from napari.utils.notifications import notification_manager

    shown: list = []
    notification_manager.notification_ready.connect(shown.append)
    yield shown
    notification_manager.notification_ready.disconnect(shown.append)


def messages(shown: list, severity: str) -> list[str]:
    return [str(n.message) for n in shown if str(n.severity) == severity]


def assert_no_traceback_notification(shown: list) -> None:
    """napari offers a traceback dialog for notifications carrying an exception: none allowed."""
    from napari.utils.notifications import ErrorNotification

    assert [n for n in shown if isinstance(n, ErrorNotification)] == []
    assert not any("Traceback" in str(n.message) for n in shown)


def assert_no_exceptions(exceptions: list) -> None:
    """Nothing escaped into Qt's event loop (pytest-qt's capture)."""
    import traceback

    assert exceptions == [], "".join(
        "".join(traceback.format_exception(*info)) for info in exceptions
    )


def snapshot(viewer: Any) -> list[tuple[Any, str, np.ndarray]]:
    return [(layer, layer.name, np.array(layer.data, copy=True)) for layer in viewer.layers]


def assert_layers_unchanged(viewer: Any, before: list[tuple[Any, str, np.ndarray]]) -> None:
    assert [layer.name for layer in viewer.layers] == [name for _, name, _ in before]
    for (layer, name, data), now in zip(before, viewer.layers, strict=True):
        assert now is layer
        np.testing.assert_array_equal(now.data, data, err_msg=name)


class Gate:
    """Pauses a worker's generator at one point until the test opens it."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.opened = threading.Event()

    def pause(self) -> None:
        self.reached.set()
        if not self.opened.wait(GATE_TIMEOUT_S):
            raise RuntimeError("the test never opened the gate")


def phantom(shape=(N_SLICES, 32, 48), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z, h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    body = np.where(np.hypot(yy - h / 2, xx - w / 2) < min(h, w) / 3, 60.0, -1000.0)
    return (body + rng.normal(0.0, 30.0, shape)).astype(np.float32)


# --- 1. Load CT: the reader fails mid-way -------------------------------------------------
@pytest.fixture
def npy_volume(tmp_path) -> Path:
    path = tmp_path / "ct.npy"
    np.save(path, phantom())
    return path


@pytest.fixture
def load_setup(make_napari_viewer, qtbot):
    from napari_langmamba.widgets.load import LoadWidget

    viewer = make_napari_viewer()
    widget = LoadWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Load CT")
    return viewer, widget


def patch_reader(monkeypatch, step: Callable[[int], None]) -> list[int]:
    """Replace ``io.iter_read_ct`` with the real reader calling ``step(k)`` after its k-th event.

    Returns the indices of the events the reader produced (to tell how far it got).
    """
    from napari_langmamba import io as ct_io
    from napari_langmamba.io import api

    passed: list[int] = []

    def reader(path, *, series=None):
        generator = api.iter_read_ct(path, series=series)
        while True:
            try:
                event = next(generator)
            except StopIteration as stop:
                return stop.value
            passed.append(len(passed))
            yield event
            step(len(passed))

    monkeypatch.setattr(ct_io, "iter_read_ct", reader)
    return passed


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (CTReadError("Slice 3 of ct.npy is truncated; copy the file again."),
         "Cannot load {path}: Slice 3 of ct.npy is truncated; copy the file again."),
        (RuntimeError("the disk went away"),
         "Cannot load {path}: Unexpected error (RuntimeError: the disk went away). This is a bug"),
    ],
    ids=["LangMambaError", "RuntimeError"],
)
def test_reader_error_is_a_notification_and_load_works_again(
    load_setup, qtbot, monkeypatch, npy_volume, notifications, caplog, error, expected
):
    caplog.set_level(logging.INFO, logger="napari_langmamba")
    viewer, widget = load_setup
    earlier = viewer.add_image(phantom(seed=1), name="earlier")
    before = snapshot(viewer)
    failures = [error]

    def fail_once_after_two_slices(k: int) -> None:
        if k == 2 and failures:
            raise failures.pop()

    passed = patch_reader(monkeypatch, fail_once_after_two_slices)
    widget.set_path(npy_volume, scan=False)
    with qtbot.captureExceptions() as exceptions:
        widget.load_button.click()
        assert widget.state is WorkerState.RUNNING and not widget.load_button.isEnabled()
        qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT_MS)
    assert_no_exceptions(exceptions)
    assert passed == [0, 1]  # it failed mid-way, after two progress events

    assert widget.state is WorkerState.FAILED
    errors = messages(notifications, "error")
    assert len(errors) == 1 and errors[0].startswith(expected.format(path=npy_volume))
    assert widget.status_label.text() == errors[0]
    assert_no_traceback_notification(notifications)
    # the traceback goes to the log, and only for a bug ("the full traceback is in the log")
    logged = [r for r in caplog.records if r.getMessage() == errors[0]]
    assert len(logged) == 1
    if isinstance(error, CTReadError):
        assert logged[0].levelno == logging.INFO and logged[0].exc_info is None
    else:
        assert logged[0].levelno == logging.ERROR and logged[0].exc_info[1] is error
    assert_layers_unchanged(viewer, before)
    # the widget is usable: controls back, and the next load succeeds
    assert widget.load_button.isEnabled() and widget.scan_button.isEnabled() and widget.path_edit.isEnabled()
    assert not widget.cancel_button.isEnabled() and widget.progress_bar.isHidden()

    with qtbot.captureExceptions() as exceptions:
        widget.load_button.click()
        qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT_MS)
    assert_no_exceptions(exceptions)
    assert widget.state is WorkerState.DONE, widget.status_label.text()
    assert [layer.name for layer in viewer.layers] == ["earlier", widget.last_layer.name]
    np.testing.assert_array_equal(widget.last_layer.data, np.load(npy_volume))
    np.testing.assert_array_equal(earlier.data, before[0][2])


# --- 1. Denoise: the denoiser fails after one batch ----------------------------------------
@pytest.fixture(scope="module")
def redcnn_checkpoint(tmp_path_factory) -> Path:
    """A tiny random-init RED-CNN checkpoint, saved the way training saves one."""
    from napari_langmamba.checkpoint import save_checkpoint
    from napari_langmamba.models.redcnn import REDCNN, REDCNNConfig

    torch.manual_seed(0)
    return save_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "redcnn", REDCNN(REDCNNConfig.preset("tiny")), kind="redcnn"
    )


@pytest.fixture
def denoise_setup(make_napari_viewer, redcnn_checkpoint):
    from napari_langmamba.inference import Denoiser
    from napari_langmamba.widgets.denoise import DenoiseWidget

    Denoiser.clear_cache()
    viewer = make_napari_viewer()
    other = viewer.add_image(phantom(seed=2), name="other")
    layer = viewer.add_image(phantom(), name="ct", scale=(2.5, 0.7, 0.7))
    widget = DenoiseWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Denoise")
    widget.set_weights(redcnn_checkpoint)
    widget.device_combo.setCurrentText("cpu")
    widget.batch_spin.setValue(1)  # one slice per batch: N_SLICES batches
    widget.layer_combo.setCurrentText("ct")
    yield viewer, widget, layer, other
    Denoiser.clear_cache()


def patch_denoiser(monkeypatch, step: Callable[[int], None]) -> list[int]:
    """Wrap ``Denoiser.iter_denoise``: ``step(k)`` runs after the k-th batch has been yielded.

    Returns the batches denoised (``done`` of each); ``step(0)`` runs after the opening (0, total) event and
    ``step(-1)`` after the last batch, just before the result is returned.
    """
    from napari_langmamba.inference import Denoiser

    real = Denoiser.iter_denoise
    batches: list[int] = []

    def iter_denoise(self, hu, **kwargs):
        generator = real(self, hu, **kwargs)
        while True:
            try:
                event = next(generator)
            except StopIteration as stop:
                step(-1)
                return stop.value
            if event.done:
                batches.append(event.done)
            yield event
            step(event.done)

    monkeypatch.setattr(Denoiser, "iter_denoise", iter_denoise)
    return batches


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (CheckpointError("The checkpoint's weights do not match RED-CNN tiny."),
         "Denoise: The checkpoint's weights do not match RED-CNN tiny."),
        (RuntimeError("CUDA error: an illegal memory access"),
         "Denoise: Unexpected error (RuntimeError: CUDA error: an illegal memory access). This is a bug"),
    ],
    ids=["LangMambaError", "RuntimeError"],
)
def test_denoiser_error_is_a_notification_and_denoise_works_again(
    denoise_setup, qtbot, monkeypatch, notifications, error, expected
):
    viewer, widget, layer, _ = denoise_setup
    before = snapshot(viewer)
    failures = [error]

    def fail_once_after_one_batch(k: int) -> None:
        if k == 1 and failures:
            raise failures.pop()

    batches = patch_denoiser(monkeypatch, fail_once_after_one_batch)
    with qtbot.captureExceptions() as exceptions:
        widget.run_button.click()
        assert widget.state is WorkerState.RUNNING and not widget.run_button.isEnabled()
        qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT_MS)
    assert_no_exceptions(exceptions)
    assert batches == [1]

    assert widget.state is WorkerState.FAILED
    errors = messages(notifications, "error")
    assert len(errors) == 1 and errors[0].startswith(expected)
    assert widget.status_label.text() == errors[0]
    assert_no_traceback_notification(notifications)
    assert_layers_unchanged(viewer, before)
    assert widget.result_layer is None
    assert widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()
    assert widget.layer_combo.isEnabled() and widget.progress_bar.isHidden()

    with qtbot.captureExceptions() as exceptions:
        widget.run_button.click()
        qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT_MS)
    assert_no_exceptions(exceptions)
    assert widget.state is WorkerState.DONE, widget.status_label.text()
    assert [lyr.name for lyr in viewer.layers] == ["other", "ct", "ct denoised"]
    assert widget.result_layer is viewer.layers["ct denoised"]
    assert widget.result_layer.data.shape == layer.data.shape
    assert batches == [1, 1, 2, 3, 4]
    np.testing.assert_array_equal(layer.data, before[1][2])


# --- 1. Tokens: the model fails -------------------------------------------------------------
@pytest.fixture(scope="module")
def langae():
    from napari_langmamba.models.codebook import load_codebook
    from napari_langmamba.models.langae import LangAE, LangAEConfig

    torch.manual_seed(1)
    codebook = load_codebook("random:64x8:5")
    return LangAE(LangAEConfig.preset("tiny", codebook_dim=codebook.d), codebook=codebook).eval()


@pytest.fixture
def tokens_setup(make_napari_viewer, qtbot, langae):
    from napari_langmamba.tokens import clear_cache
    from napari_langmamba.widgets.tokens import TokensWidget

    clear_cache()
    viewer = make_napari_viewer()
    image = viewer.add_image(phantom((2, 48, 64)), name="low dose")
    widget = TokensWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Tokens")
    widget.set_model(langae, name="tiny")
    yield viewer, widget, image
    clear_cache()


def test_token_model_error_is_a_notification_and_tokens_work_again(
    tokens_setup, qtbot, monkeypatch, notifications, langae
):
    from napari_langmamba.widgets.tokens import OVERLAY_NAME, WORDS_NAME

    viewer, widget, image = tokens_setup
    before = snapshot(viewer)
    calls: list[str] = []

    def broken_quantize(z, x=None):  # the encoder ran; quantizing fails (mid-way through the pyramid)
        calls.append("quantize")
        raise RuntimeError("codebook tensor on a lost device")

    monkeypatch.setattr(langae, "quantize", broken_quantize)
    with qtbot.captureExceptions() as exceptions:
        worker = widget.show_tokens()
        assert worker is not None and not widget.show_button.isEnabled()
        qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT_MS)
    assert_no_exceptions(exceptions)
    assert calls == ["quantize"]

    assert widget.state is WorkerState.FAILED
    errors = messages(notifications, "error")
    assert errors == [widget.status_label.text()]
    assert errors[0].startswith(
        "Cannot compute the tokens: Unexpected error (RuntimeError: codebook tensor on a lost device)."
    )
    assert_no_traceback_notification(notifications)
    assert_layers_unchanged(viewer, before)  # no overlay for a failed pyramid
    assert widget.pyramid is None and widget.overlay is None
    assert widget.show_button.isEnabled() and widget.compare_button.isEnabled()

    monkeypatch.undo()  # the model works again
    with qtbot.captureExceptions() as exceptions:
        widget.show_tokens()
        qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT_MS)
    assert_no_exceptions(exceptions)
    assert widget.state is WorkerState.DONE, widget.status_label.text()
    assert widget.pyramid is not None and widget.pyramid.image_shape == (48, 64)
    assert [layer.name for layer in viewer.layers] == ["low dose", WORDS_NAME, OVERLAY_NAME]
    np.testing.assert_array_equal(image.data, before[0][2])


# --- 2. Removing the input layer while Denoise runs -----------------------------------------
CT_REMOVED = (
    "Denoise: stopped, because the input layer 'ct' was removed from the viewer while it ran; nothing was added."
)


def test_removing_the_input_layer_mid_run_stops_denoise_and_adds_nothing(
    denoise_setup, qtbot, monkeypatch, notifications
):
    viewer, widget, layer, other = denoise_setup
    other_data = np.array(other.data, copy=True)
    gate = Gate()
    batches = patch_denoiser(monkeypatch, lambda k: gate.pause() if k == 1 else None)

    with qtbot.captureExceptions() as exceptions:
        widget.run_button.click()
        assert gate.reached.wait(GATE_TIMEOUT_S)  # the worker is between batch 1 and batch 2
        viewer.layers.remove(layer)
        assert widget.state is WorkerState.RUNNING  # the worker is asked to stop, not yet stopped
        gate.opened.set()
        qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT_MS)
    assert_no_exceptions(exceptions)

    assert batches == [1, 2]  # it stopped at the next batch instead of denoising all slices
    assert widget.state is WorkerState.CANCELLED
    assert [lyr.name for lyr in viewer.layers] == ["other"]  # no orphan "ct denoised"
    assert widget.result_layer is None
    warnings = messages(notifications, "warning")
    assert warnings == [widget.status_label.text()]
    assert warnings[0].startswith(CT_REMOVED)
    assert messages(notifications, "error") == []
    assert_no_traceback_notification(notifications)

    # usable: the remaining layer is offered and denoises
    assert widget.layer_combo.currentText() == "other" and widget.run_button.isEnabled()
    gate.opened.set()
    with qtbot.captureExceptions() as exceptions:
        widget.run_button.click()
        qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT_MS)
    assert_no_exceptions(exceptions)
    assert widget.state is WorkerState.DONE, widget.status_label.text()
    assert [lyr.name for lyr in viewer.layers] == ["other", "other denoised"]
    np.testing.assert_array_equal(other.data, other_data)


def test_a_result_arriving_after_its_input_was_removed_is_dropped(
    denoise_setup, qtbot, monkeypatch, notifications
):
    """The worker finished (its result queued for the GUI thread) before the layer was removed."""
    viewer, widget, layer, _ = denoise_setup
    gate = Gate()
    patch_denoiser(monkeypatch, lambda k: gate.pause() if k == -1 else None)  # just before returning
    results: list = []

    with qtbot.captureExceptions() as exceptions:
        worker = widget.run()
        assert gate.reached.wait(GATE_TIMEOUT_S)
        worker.returned.connect(results.append)
        gate.opened.set()
        # Block the GUI thread (no event processing) until the worker has returned: its result
        # is emitted and queued, not yet handled. Only then is the input removed.
        assert QThreadPool.globalInstance().waitForDone(TIMEOUT_MS)
        assert not worker.abort_requested and widget.state is WorkerState.RUNNING
        viewer.layers.remove(layer)
        qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT_MS)
    assert_no_exceptions(exceptions)

    assert len(results) == 1  # the result did arrive ...
    assert [lyr.name for lyr in viewer.layers] == ["other"]  # ... and was not added
    assert widget.result_layer is None
    assert widget.state is WorkerState.CANCELLED
    warnings = messages(notifications, "warning")
    assert warnings == [widget.status_label.text()] and warnings[0].startswith(CT_REMOVED)


def test_removing_the_image_layer_mid_tokens_raises_nothing_and_draws_nothing(
    tokens_setup, qtbot, monkeypatch, langae, notifications
):
    from napari_langmamba.tokens import token_pyramid
    from napari_langmamba.widgets.tokens import OVERLAY_NAME, WORDS_NAME

    viewer, widget, image = tokens_setup
    second = viewer.add_image(phantom((2, 48, 64), seed=3), name="second")
    widget.set_image_layer(image)
    gate = Gate()
    real_quantize = langae.quantize
    monkeypatch.setattr(langae, "quantize", lambda z, x=None: (gate.pause(), real_quantize(z, x))[1])

    with qtbot.captureExceptions() as exceptions:
        worker = widget.show_tokens()
        assert gate.reached.wait(GATE_TIMEOUT_S)
        viewer.layers.remove(image)
        with qtbot.waitSignal(worker.finished, timeout=TIMEOUT_MS):
            gate.opened.set()
        # the pyramid of the removed layer is not drawn, and the widget says why
        assert [layer.name for layer in viewer.layers] == ["second"]
        assert widget.overlay is None and widget.pyramid is None
        assert widget.status_label.text() == (
            "The layer 'low dose' was removed before its tokens were ready; nothing was drawn."
        )
        # and, still following the view, it moves on to the remaining layer
        assert widget.image_combo.currentText() == "second"
        qtbot.waitUntil(lambda: widget.overlay is not None and not widget.busy, timeout=TIMEOUT_MS)
    assert_no_exceptions(exceptions)
    assert widget.state is WorkerState.DONE
    assert [layer.name for layer in viewer.layers] == ["second", WORDS_NAME, OVERLAY_NAME]
    assert widget.pyramid.to_records() == token_pyramid(langae, second.data[0], cache=False).to_records()
    assert messages(notifications, "error") == []


# --- 3. Closing the viewer while a worker runs ----------------------------------------------
def close_mid_run(qtbot, viewer, worker, gate: Gate) -> list:
    """Close ``viewer`` while ``worker`` waits at ``gate``; let it go on; return Qt exceptions."""
    with qtbot.captureExceptions() as exceptions:
        assert gate.reached.wait(GATE_TIMEOUT_S)
        viewer.close()
        with qtbot.waitSignal(worker.finished, timeout=TIMEOUT_MS):
            gate.opened.set()
        QCoreApplication.processEvents()  # deliver anything else the worker queued
    return exceptions


def test_closing_the_viewer_mid_load_raises_nothing_and_stops_reading(
    load_setup, qtbot, monkeypatch, npy_volume, notifications
):
    viewer, widget = load_setup
    gate = Gate()
    passed = patch_reader(monkeypatch, lambda k: gate.pause() if k == 1 else None)
    widget.set_path(npy_volume, scan=False)
    widget.load()
    worker = widget.worker
    exceptions = close_mid_run(qtbot, viewer, worker, gate)
    assert_no_exceptions(exceptions)
    assert worker.abort_requested  # the widget's destruction asked it to stop
    assert passed == [0, 1]  # it read on to its next progress event, then stopped: not all slices
    assert len(viewer.layers) == 0
    assert notifications == []


def test_closing_the_viewer_mid_denoise_raises_nothing_and_stops_denoising(
    denoise_setup, qtbot, monkeypatch, notifications
):
    viewer, widget, _, _ = denoise_setup
    gate = Gate()
    batches = patch_denoiser(monkeypatch, lambda k: gate.pause() if k == 1 else None)
    worker = widget.run()
    exceptions = close_mid_run(qtbot, viewer, worker, gate)
    assert_no_exceptions(exceptions)
    assert worker.abort_requested
    assert batches == [1, 2]  # it stopped at its next batch, never the whole volume
    assert len(viewer.layers) == 0
    assert notifications == []  # nothing reported to a viewer that is gone


def test_closing_the_viewer_mid_tokens_raises_nothing(tokens_setup, qtbot, monkeypatch, langae, notifications):
    viewer, widget, _ = tokens_setup
    gate = Gate()
    real_quantize = langae.quantize

    def slow_quantize(z, x=None):
        gate.pause()
        return real_quantize(z, x)

    monkeypatch.setattr(langae, "quantize", slow_quantize)
    worker = widget.show_tokens()
    exceptions = close_mid_run(qtbot, viewer, worker, gate)
    assert_no_exceptions(exceptions)
    assert worker.abort_requested
    assert len(viewer.layers) == 0  # no overlay added to a closed viewer
    assert notifications == []


# --- 3 and 4. Train: a stand-in training process ----------------------------------------------
FAKE_TRAINER = textwrap.dedent(
    '''
    import json, os, signal, sys, time
    from pathlib import Path

    mode = {mode!r}
    out = Path(sys.argv[sys.argv.index("--output") + 1])
    out.mkdir(parents=True, exist_ok=True)

    def on_sigterm(signum, frame):
        (out / "got_sigterm").write_text("checkpoint written")
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    with open(out / "metrics.jsonl", "a") as fh:
        for step in (1, 2, 3):
            record = {{"kind": "train", "step": step, "total_steps": 100, "losses": {{"mse": 1.0 / step}}}}
            fh.write(json.dumps(record) + "\\n")
    print("ready", flush=True)
    if mode == "traceback":
        print("Traceback (most recent call last):", file=sys.stderr)
        for i in range(15):
            print(f"  File \\"trainer.py\\", line {{i}}, in step_{{i}}", file=sys.stderr)
        print("RuntimeError: CUDA out of memory at step 3", file=sys.stderr, flush=True)
        sys.exit(1)
    if mode == "sigkill":
        print("slice 7 of the batch is corrupt, going down", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # run until stopped (at most a minute)
        time.sleep(0.05)
    '''
)


def make_fake_python(tmp_path: Path, mode: str) -> Path:
    """An executable standing in for ``python``: ``<it> -m training seed ...`` runs the fake trainer."""
    script = tmp_path / f"fake_python_{mode}"
    script.write_text(f"#!{sys.executable}\n" + FAKE_TRAINER.format(mode=mode))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


@pytest.fixture
def train_setup(make_napari_viewer, tmp_path):
    from napari_langmamba.widgets.train import TrainWidget

    viewer = make_napari_viewer()
    widget = TrainWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Train")
    data = tmp_path / "data"
    data.mkdir()
    widget.stage_combo.setCurrentIndex(widget.stage_combo.findData("seed"))
    widget.data_edit.setText(str(data))
    widget.output_edit.setText(str(tmp_path / "run"))
    widget.preset_combo.setCurrentText("tiny")
    widget.backbone_combo.setCurrentIndex(widget.backbone_combo.findData("redcnn"))
    widget.lambda_spin.setValue(0.0)  # the MSE baseline needs no LangAE checkpoint
    widget.device_combo.setCurrentText("cpu")
    yield viewer, widget, tmp_path / "run"
    widget.shutdown(timeout_s=10)  # never leave a process behind


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


POSIX_ONLY = pytest.mark.skipif(sys.platform == "win32", reason="the stand-in trainer uses SIGTERM/SIGKILL")


@POSIX_ONLY
@pytest.mark.parametrize("mode", ["traceback", "sigkill"])
def test_a_training_process_crashing_mid_run_shows_its_last_error_lines(
    train_setup, qtbot, monkeypatch, notifications, mode
):
    from napari_langmamba.widgets.train import ERROR_LINES_SHOWN, NOTIFICATION_LINES, TrainStatus

    viewer, widget, run = train_setup
    monkeypatch.setattr(sys, "executable", str(make_fake_python(run.parent, mode)))
    with qtbot.captureExceptions() as exceptions:
        assert widget.start()
        qtbot.waitUntil(lambda: widget.status is TrainStatus.CRASHED, timeout=TIMEOUT_MS)
    assert_no_exceptions(exceptions)

    if mode == "traceback":
        expected = [f'File "trainer.py", line {i}, in step_{i}' for i in range(15)]
        expected += ["RuntimeError: CUDA out of memory at step 3"]
        expected = expected[-ERROR_LINES_SHOWN:]  # the last lines (not the header), the exception last
        how = "exit code 1"
    else:
        expected = ["slice 7 of the batch is corrupt, going down"]
        how = "was killed by a signal"
    assert [line.strip() for line in widget.error_lines] == expected
    assert not widget.error_box.isHidden()
    assert widget.error_box.toPlainText() == "\n".join(widget.error_lines)
    assert how in widget.status_label.text()
    errors = messages(notifications, "error")
    assert len(errors) == 1 and how in errors[0]
    assert [line.strip() for line in errors[0].splitlines()[1:]] == expected[-NOTIFICATION_LINES:]
    assert_no_traceback_notification(notifications)
    # what the run logged before it crashed stays on the plot
    assert widget.loss_history == {"mse": [(1, 1.0), (2, 0.5), (3, 1.0 / 3)]}
    assert widget.process is None
    assert widget.start_button.isEnabled() and not widget.stop_button.isEnabled()
    assert len(viewer.layers) == 0


@POSIX_ONLY
def test_closing_the_viewer_stops_a_running_training_process(train_setup, qtbot, monkeypatch):
    """Extends test_widget_train.py's check (the process ends) with: it got SIGTERM, no kill."""
    viewer, widget, run = train_setup
    monkeypatch.setattr(sys, "executable", str(make_fake_python(run.parent, "run")))
    with qtbot.captureExceptions() as exceptions:
        assert widget.start()
        qtbot.waitUntil(lambda: "ready" in widget.log_box.toPlainText(), timeout=TIMEOUT_MS)
        pid = widget.process.processId()
        assert pid_alive(pid)
        viewer.close()  # blocks until the process has ended (it checkpoints on SIGTERM)
        qtbot.waitUntil(lambda: not pid_alive(pid), timeout=TIMEOUT_MS)
    assert_no_exceptions(exceptions)
    assert (run / "got_sigterm").read_text() == "checkpoint written"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]


# ------------------------------------------------------------------ the worker's handlers, alone
class _FakeWidget:
    """What a WorkerTask touches of its widget, recorded."""

    def __init__(self) -> None:
        from napari_langmamba.widgets._base import _Lifeline

        self._lifeline = _Lifeline()
        self.calls: list[tuple] = []
        self.state = WorkerState.RUNNING

    def _set_state(self, state: WorkerState) -> None:
        self.state = state
        self.calls.append(("state", state))

    def report_error(self, exc: BaseException, *, context: str = "") -> str:
        self.calls.append(("error", context, str(exc)))
        return str(exc)


def _task(widget, worker, **kwargs):
    from napari_langmamba.widgets._base import WorkerTask

    return WorkerTask(widget, worker, **kwargs)


def test_a_worker_task_quits_once_when_an_input_layer_is_removed_and_drops_the_result():
    quits, results = [], []
    worker = type("Worker", (), {"quit": lambda self: quits.append(1)})()
    ct, other = type("L", (), {"name": "ct"})(), type("L", (), {"name": "other"})()
    task = _task(_FakeWidget(), worker, on_returned=results.append, inputs=(ct, None))
    task.layer_removed(type("E", (), {"value": other})())
    assert quits == [] and task.removed == []
    for _ in range(2):
        task.layer_removed(type("E", (), {"value": ct})())
    assert quits == [1] and task.removed == ["ct"]
    task.returned("denoised")
    assert results == []  # nothing is added for a layer that is gone


def test_a_worker_task_reports_a_failing_result_handler_and_passes_it_on():
    widget, failed = _FakeWidget(), []

    def handler(result):
        raise ValueError(f"cannot show {result}")

    task = _task(widget, None, on_returned=handler, on_failed=failed.append, context="Denoise")
    task.returned("x")
    assert widget.calls == [("state", WorkerState.DONE), ("state", WorkerState.FAILED),
                            ("error", "Denoise", "cannot show x")]
    assert [str(e) for e in failed] == ["cannot show x"]
    widget._lifeline.on_widget_destroyed()
    task.returned("y")  # a deleted widget is not touched
    assert len(widget.calls) == 3
