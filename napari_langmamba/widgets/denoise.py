"""The Denoise dock widget: an image layer in HU -> a new, linked ``<name> denoised`` layer.

A thin view over :class:`napari_langmamba.inference.Denoiser`: Run validates the choices on
the GUI thread, then runs :meth:`Denoiser.iter_denoise` (after loading the model) in a napari
``thread_worker``; each batch moves the progress bar and Cancel stops the work at the next
batch without touching any layer; removing the input layer while it runs stops it the same
way and says so (no orphan result is added for a layer that is gone). The result never
replaces anything: it is added as a new layer with the input's scale, translate and
transforms, its contrast limits linked to the input's, and ``metadata["denoise"]`` recording
the model, the checkpoint hash and the settings.

**Strength** (0-100 %, default 100) keeps that share of the model's change:
``input + strength x (denoised - input)`` (:mod:`napari_langmamba.strength`). The widget keeps
the model's full-strength output of the last run, so moving the control afterwards updates the
result layer (data, ``metadata["denoise"]["strength_percent"]`` and the SeriesDescription a DICOM
export gets) without running the model again.

The result is a :class:`~napari_langmamba.io.CTVolume` made as the CLI makes it: the input
layer's volume (:func:`~napari_langmamba.session.layer_volume`) and the model's output give
:func:`~napari_langmamba.session.derived_volume`, whose geometry and DICOM fields become the new
layer's ``metadata["ct"]``.

"Current slice" on a 3-D layer denoises only the slice shown and adds a **single-slice 3-D
layer** ``(1, y, x)``: the volume of that one-slice slab, its origin at the slice, placed by
:func:`~napari_langmamba.session.slab_translate` exactly over the input at that z; it costs one
slice of memory and exports as a correctly placed one-slice series.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from napari.layers import Image
from napari.qt.threading import GeneratorWorker
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QWidget,
)

from napari_langmamba import __version__
from napari_langmamba.errors import CheckpointError, ConfigError
from napari_langmamba.events import Progress
from napari_langmamba.inference import DEFAULT_TILE, Denoiser, kernel_advice, series_kernel
from napari_langmamba.io.layers import ct_layer_metadata
from napari_langmamba.io.volume import CTVolume
from napari_langmamba.session import (
    available_devices,
    bundled_name,
    current_slice_index,
    derived_volume,
    layer_volume,
    require_axial_view,
    resolve_weights,
    slab_translate,
)
from napari_langmamba.strength import DEFAULT_STRENGTH, blend, derived_description
from napari_langmamba.widgets._base import WidgetBase, WorkerState, ct_image_layers

logger = logging.getLogger(__name__)

WEIGHT_SOURCES = {
    "default": "Bundled default",
    "sharp": "Bundled, sharp kernels (B70f)",
    "checkpoint": "Checkpoint folder",
    "zip": "Checkpoint .zip",
    "run": "Training run folder",
}
SCOPES = {"volume": "Whole volume", "slice": "Current slice"}


@dataclass(frozen=True)
class DenoiseSettings:
    """What the user chose; recorded in the result layer's metadata."""

    weights: str
    device: str
    batch_size: int
    scope: str
    slice_index: int | None
    tile: int = DEFAULT_TILE
    strength: float = DEFAULT_STRENGTH
    self_ensemble: bool = False


def _denoise_job(
    data: Any, settings: DenoiseSettings
) -> Generator[Progress, None, tuple[np.ndarray, dict, float]]:
    """Load the model, then denoise ``data``: the generator the worker runs."""
    yield Progress(0, 0, "Loading the model...")
    denoiser = Denoiser.load(settings.weights, device=settings.device)
    start = time.perf_counter()
    hu = yield from denoiser.iter_denoise(data, batch_size=settings.batch_size, tile=settings.tile,
                                          self_ensemble=settings.self_ensemble)
    return hu, dict(denoiser.info), time.perf_counter() - start


class DenoiseWidget(WidgetBase):
    """Dock widget: denoise an image layer with a LangMamba checkpoint.

    Parameters
    ----------
    napari_viewer
        The viewer (npe2 passes it).
    """

    TOOLTIP_SECTION = "denoise"

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(napari_viewer, parent)

        self.bind("layer_combo", QComboBox(), label="Input layer")

        self.bind("weights_combo", QComboBox(), label="Weights")
        for key, text in WEIGHT_SOURCES.items():
            self.weights_combo.addItem(text, key)
        path_row = QHBoxLayout()
        self.bind("weights_path", QLineEdit(), add=False)
        self.weights_path.setPlaceholderText("path to a checkpoint or training run")
        self.bind("browse_button", QPushButton("Browse..."), add=False)
        path_row.addWidget(self.weights_path)
        path_row.addWidget(self.browse_button)
        self._form.addRow("", path_row)

        self.bind("device_combo", QComboBox(), label="Device")
        self.device_combo.addItems(["auto", *available_devices()])

        self.bind("batch_spin", QSpinBox(), label="Batch size")
        self.batch_spin.setRange(1, 64)
        self.batch_spin.setValue(1 if "cuda" not in available_devices() else 4)

        self.bind("scope_combo", QComboBox(), label="Denoise")
        for key, text in SCOPES.items():
            self.scope_combo.addItem(text, key)

        self.bind("strength_spin", QSpinBox(), label="Strength")
        self.strength_spin.setRange(0, 100)
        self.strength_spin.setSingleStep(10)
        self.strength_spin.setSuffix(" %")
        self.strength_spin.setValue(int(DEFAULT_STRENGTH))

        self.bind("ensemble_check", QCheckBox("Self-ensemble (8 x the time)"), label="Quality")

        buttons = QHBoxLayout()
        self.bind("run_button", QPushButton("Run"), add=False)
        self.bind("cancel_button", QPushButton("Cancel"), add=False)
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        self._form.addRow(buttons)
        self.add_status_rows()

        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.browse_button.clicked.connect(self._browse)
        self.weights_combo.currentIndexChanged.connect(self._sync_controls)
        self.state_changed.connect(self._sync_controls)
        self.strength_spin.valueChanged.connect(self.apply_strength)
        self.result_layer: Image | None = None
        # The last run's input and full-strength model output: a new strength re-blends them.
        self._last_input: np.ndarray | None = None
        self._last_denoised: np.ndarray | None = None

        layers = self.viewer.layers
        layers.events.inserted.connect(self._refresh_layers)
        layers.events.removed.connect(self._refresh_layers)
        layers.events.moved.connect(self._refresh_layers)
        self._refresh_layers()
        self._sync_controls()
        self.persist("weights_combo", "weights_path", "device_combo", "batch_spin", "strength_spin", "ensemble_check")
        try:
            resolve_weights("default")
        except CheckpointError as exc:  # say so now rather than at the first Run
            self.set_status(str(exc))

    # --- controls -----------------------------------------------------------------------
    def _candidate_layers(self) -> list[Image]:
        return ct_image_layers(self.viewer.layers, accept=lambda ly: not ly.multiscale and ly.ndim in (2, 3))

    def _refresh_layers(self, event: Any = None) -> None:
        current = self.layer_combo.currentText()
        active = self.viewer.layers.selection.active
        names = [layer.name for layer in self._candidate_layers()]
        for layer in self._candidate_layers():  # follow renames
            layer.events.name.disconnect(self._refresh_layers)
            layer.events.name.connect(self._refresh_layers)
        self.layer_combo.blockSignals(True)
        self.layer_combo.clear()
        self.layer_combo.addItems(names)
        if current in names:
            self.layer_combo.setCurrentText(current)
        elif active is not None and active.name in names:
            self.layer_combo.setCurrentText(active.name)
        self.layer_combo.blockSignals(False)
        self._sync_controls()

    def _sync_controls(self, *args: Any) -> None:
        running = self.state is WorkerState.RUNNING
        needs_path = bundled_name(self.weights_combo.currentData()) is None
        self.weights_path.setEnabled(needs_path and not running)
        self.browse_button.setEnabled(needs_path and not running)
        for control in (
            self.layer_combo,
            self.weights_combo,
            self.device_combo,
            self.batch_spin,
            self.scope_combo,
            self.ensemble_check,
        ):
            control.setEnabled(not running)
        self.run_button.setEnabled(not running and self.layer_combo.count() > 0)
        self.cancel_button.setEnabled(running)

    def _browse(self) -> None:
        source = self.weights_combo.currentData()
        start = self.weights_path.text() or str(Path.home())
        if source == "zip":
            path, _ = QFileDialog.getOpenFileName(self, "Checkpoint archive", start, "Checkpoint (*.zip)")
        else:
            title = "Training run folder" if source == "run" else "Checkpoint folder"
            path = QFileDialog.getExistingDirectory(self, title, start)
        if path:
            self.weights_path.setText(path)

    def set_weights(self, weights: str | Path) -> None:
        """Choose the weights: ``"default"``, ``"sharp"``, a checkpoint folder or ``.zip``, or a training run folder.

        Used by the Train widget to hand over a finished run's checkpoint.
        """
        source = bundled_name(str(weights))
        if source is None:
            path = Path(weights)
            is_checkpoint = (path / "config.json").is_file()
            source = "zip" if path.suffix.lower() == ".zip" else "checkpoint" if is_checkpoint else "run"
            self.weights_path.setText(str(path))
        self.weights_combo.setCurrentIndex(self.weights_combo.findData(source))

    @property
    def input_layer(self) -> Image | None:
        """The layer chosen in the input combo box."""
        name = self.layer_combo.currentText()
        return next((layer for layer in self._candidate_layers() if layer.name == name), None)

    def settings(self) -> DenoiseSettings:
        """The current choices, validated (raises :class:`LangMambaError` on a bad one)."""
        source = self.weights_combo.currentData()
        if bundled_name(source) is not None:
            weights = source
        else:
            text = self.weights_path.text().strip()
            if not text:
                raise CheckpointError(
                    f"Choose a {WEIGHT_SOURCES[source].lower()} (Browse...) or pick the bundled default weights."
                )
            weights = text
        resolve_weights(weights)  # cheap: fails here, on the GUI thread, with a clear message
        layer = self.input_layer
        if layer is None:
            raise ConfigError("Choose an image layer to denoise (load a CT first).")
        scope = self.scope_combo.currentData()
        slice_index = self._current_slice(layer) if scope == "slice" and layer.ndim == 3 else None
        return DenoiseSettings(
            weights=weights,
            device=self.device_combo.currentText(),
            batch_size=int(self.batch_spin.value()),
            scope=scope,
            slice_index=slice_index,
            strength=float(self.strength_spin.value()),
            self_ensemble=self.ensemble_check.isChecked(),
        )

    def _current_slice(self, layer: Image) -> int:
        require_axial_view(self.viewer.dims, what="'Current slice'")
        (z,) = current_slice_index(layer, self.viewer.dims.point)
        return z

    # --- running ------------------------------------------------------------------------
    def run(self) -> GeneratorWorker | None:
        """Validate the choices and start denoising in a worker (``None`` if refused)."""
        if self.busy:
            self.set_status("Already running: cancel first.")
            return None
        try:
            settings = self.settings()
        except Exception as exc:  # shown to the user; the widget stays usable
            self.report_error(exc, context="Denoise")
            return None
        layer = self.input_layer
        z = settings.slice_index
        try:  # (1, y, x) for one slice of a 3-D layer: the slab keeps the volume 3-D
            volume = layer_volume(layer, None if z is None else slice(z, z + 1))
        except Exception as exc:  # noqa: BLE001 - shown to the user; the widget stays usable
            self.report_error(exc, context="Denoise")
            return None
        self.result_layer = None
        return self.run_generator(
            _denoise_job(volume.hu, settings),
            on_returned=lambda result: self._add_result(layer, volume, settings, *result),
            context="Denoise",
            inputs=(layer,),  # closing the input layer mid-run stops the run and adds nothing
        )

    def __call__(self) -> GeneratorWorker | None:
        return self.run()

    def _unique_name(self, base: str) -> str:
        names = {layer.name for layer in self.viewer.layers}
        if base not in names:
            return base
        n = 2
        while f"{base} [{n}]" in names:
            n += 1
        return f"{base} [{n}]"

    def _add_result(
        self, layer: Image, volume: CTVolume, settings: DenoiseSettings, hu: np.ndarray, info: dict, seconds: float
    ) -> None:
        derived = derived_volume(volume, hu)
        ct = ct_layer_metadata(derived)
        ct["original_series_description"] = derived.metadata.get("SeriesDescription")
        metadata = {
            "denoise": {
                "model": info,
                "checkpoint_sha256": info.get("checkpoint_sha256"),
                "settings": asdict(settings),
                "input_layer": layer.name,
                "seconds": round(seconds, 3),
                "package_version": __version__,
            },
            "ct": ct,
        }
        # The layer keeps the input's shape (a 2-D slice stays 2-D; the volume is (1, y, x)).
        shape = np.shape(layer.data) if settings.slice_index is None else volume.hu.shape
        self._last_input = volume.hu.reshape(shape)
        self._last_denoised = derived.hu.reshape(shape)
        # the strength chosen now (it may have moved while the model ran)
        out = self.viewer.add_image(
            blend(self._last_input, self._last_denoised, self.strength),
            name=self._unique_name(f"{layer.name} denoised"),
            scale=layer.scale,
            translate=slab_translate(layer, settings.slice_index or 0),
            rotate=layer.rotate,
            shear=layer.shear,
            affine=layer.affine.affine_matrix,
            units=layer.units,
            axis_labels=layer.axis_labels,
            contrast_limits=layer.contrast_limits,
            colormap=layer.colormap,
            gamma=layer.gamma,
            metadata=metadata,
        )
        if layer in self.viewer.layers:  # the input may have been closed while we worked
            self.viewer.layers.link_layers([layer, out], ("contrast_limits",))
        self.result_layer = out
        self._record_strength(out, self.strength)
        where = "" if settings.slice_index is None else f" (slice {settings.slice_index})"
        status = (f"Added '{out.name}'{where}: {info.get('kind')} {info.get('preset') or ''} on "
                  f"{info.get('device')} in {seconds:.1f} s.")
        advice = kernel_advice(info.get("trained_kernels"), series_kernel(volume.metadata),
                               weights=info.get("weights"))
        if advice:  # a kernel the model never saw: say so where the user looks, and as a notification
            self.report_warning(f"{status}\n{advice}")
        else:
            self.set_status(status)

    # --- strength -----------------------------------------------------------------------
    @property
    def strength(self) -> float:
        """The denoising strength chosen, in percent."""
        return float(self.strength_spin.value())

    def apply_strength(self, *_: Any) -> bool:
        """Re-blend the last result at the chosen strength, without the model; False if there is none."""
        out = self.result_layer
        if out is None or self._last_denoised is None or out not in self.viewer.layers:
            return False
        out.data = blend(self._last_input, self._last_denoised, self.strength)
        self._record_strength(out, self.strength)
        self.set_status(f"'{out.name}' at {self.strength:g} % strength (the model did not run again).")
        return True

    @staticmethod
    def _record_strength(layer: Image, strength: float) -> None:
        """Write ``strength`` into the layer's metadata and the SeriesDescription its DICOM export gets."""
        record = layer.metadata.get("denoise")
        if not isinstance(record, dict):
            return
        record["strength_percent"] = strength
        if isinstance(record.get("settings"), dict):
            record["settings"]["strength"] = strength
        ct = layer.metadata.get("ct")
        if isinstance(ct, dict) and isinstance(ct.get("metadata"), dict):
            original = ct.get("original_series_description")
            ct["metadata"]["SeriesDescription"] = derived_description(original, record.get("model") or {}, strength)
