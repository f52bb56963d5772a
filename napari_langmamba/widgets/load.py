"""The Load CT dock widget: choose a file or folder, pick a series, load it, window it.

Listing and reading run in napari thread workers (``io.list_series``, ``io.iter_read_ct``);
the read is given the listed ``SeriesInfo``, so each DICOM header is parsed once;
the loaded volume becomes an Image layer in HU with ``scale = spacing`` (mm) and the chosen
window as contrast limits. The window combo changes contrast limits only, never data. The
Hounsfield value under the cursor is shown with its voxel index.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Generator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from napari.layers import Image, Layer
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QAbstractItemView,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)

from napari_langmamba import io as ct_io
from napari_langmamba.errors import ConfigError, SeriesChoiceError
from napari_langmamba.events import Progress
from napari_langmamba.widgets._base import CUSTOM_WINDOW, WidgetBase, WorkerState
from napari_langmamba.windowing import PRESETS, Window, get_window

logger = logging.getLogger(__name__)

SERIES_COLUMNS: tuple[str, ...] = ("Description", "Slices", "Matrix", "Spacing (mm)")


def _format_spacing(spacing: Sequence[float] | None) -> str:
    if spacing is None:
        return "unknown"
    return " x ".join(f"{float(s):.3g}" for s in spacing)


def series_row(info: Any) -> tuple[str, str, str, str]:
    """The table row shown for one ``io.SeriesInfo``: description, slices, matrix, spacing."""
    description = info.description or "(no description)"
    if getattr(info, "modality", "") and info.modality != "CT":
        description = f"{description} [{info.modality}]"
    return (
        description,
        str(info.n_slices),
        f"{info.rows} x {info.columns}",
        _format_spacing(info.spacing),
    )


def image_layer_under(viewer: Any) -> Image | None:
    """The active layer if it is an Image, else the top-most visible Image layer."""
    active = viewer.layers.selection.active
    if isinstance(active, Image):
        return active
    for layer in reversed(viewer.layers):
        if isinstance(layer, Image) and layer.visible:
            return layer
    return None


def value_at(layer: Image, world_position: Sequence[float]) -> tuple[tuple[int, ...], float] | None:
    """The voxel index and value of ``layer`` at a world position, or None outside the data."""
    if layer.multiscale or layer.rgb:
        return None
    data_position = np.asarray(layer.world_to_data(np.asarray(world_position, dtype=float)))
    index = tuple(int(i) for i in np.floor(data_position[-layer.ndim :] + 0.5))
    shape = layer.data.shape
    if len(index) != len(shape) or any(i < 0 or i >= n for i, n in zip(index, shape, strict=True)):
        return None
    return index, float(np.asarray(layer.data[index]))


class LoadWidget(WidgetBase):
    """Load CT: file/folder, series choice, background loading, window presets, HU under cursor."""

    TOOLTIP_SECTION = "load"

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(napari_viewer, parent)
        self._series: list[Any] = []
        self._scanned_path: str | None = None
        self._syncing_window = False
        self.last_layer: Image | None = None
        self._build()
        self._connect_viewer()
        self._on_state_changed(self.state.value)
        # remembered between sessions; the custom limits first, so a preset then shows its own
        self.persist("lower_spin", "upper_spin", "window_combo")

    # --- layout -----------------------------------------------------------------------
    def _build(self) -> None:
        path_row = QHBoxLayout()
        path_edit = self.bind("path_edit", QLineEdit(), add=False)
        path_edit.setPlaceholderText("DICOM folder or file, .nii(.gz), .npy")
        path_row.addWidget(path_edit, 1)
        path_row.addWidget(self.bind("file_button", QPushButton("File..."), add=False))
        path_row.addWidget(self.bind("folder_button", QPushButton("Folder..."), add=False))
        path_row.addWidget(self.bind("scan_button", QPushButton("Scan"), add=False))
        self._form.addRow("Path", path_row)

        table = self.bind("series_table", QTableWidget(0, len(SERIES_COLUMNS)))
        table.setHorizontalHeaderLabels(SERIES_COLUMNS)
        table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        table.verticalHeader().setVisible(False)
        table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        table.setMaximumHeight(140)

        run_row = QHBoxLayout()
        run_row.addWidget(self.bind("load_button", QPushButton("Load"), add=False))
        run_row.addWidget(self.bind("cancel_button", QPushButton("Cancel"), add=False))
        self._form.addRow(run_row)
        self.add_status_rows()

        self.add_window_row()

        hu_label = self.bind("hu_label", QLabel("HU: move the cursor over an image"), label="Cursor")
        hu_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self._layout.addStretch(1)

        path_edit.returnPressed.connect(lambda: self.scan())
        self.file_button.clicked.connect(self._browse_file)
        self.folder_button.clicked.connect(self._browse_folder)
        self.scan_button.clicked.connect(lambda: self.scan())
        self.load_button.clicked.connect(self.load)
        self.cancel_button.clicked.connect(self.cancel)
        table.itemDoubleClicked.connect(lambda _item: self.load())
        self.window_combo.currentTextChanged.connect(self._on_window_choice)
        self.lower_spin.valueChanged.connect(self._on_custom_limits)
        self.upper_spin.valueChanged.connect(self._on_custom_limits)
        self.state_changed.connect(self._on_state_changed)

    def _connect_viewer(self) -> None:
        # A weak reference: the viewer must not keep a closed widget alive (or call into it).
        ref = weakref.ref(self)

        def _mouse_move(viewer: Any, event: Any) -> None:
            widget = ref()
            if widget is None:
                return
            try:
                widget.show_value_at(event.position)
            except RuntimeError:  # the Qt side of the widget is already deleted
                pass

        self._mouse_move_callback = _mouse_move
        self.viewer.mouse_move_callbacks.append(_mouse_move)
        self.viewer.layers.selection.events.active.connect(self._on_active_layer)
        self.destroyed.connect(partial(_remove_callback, self.viewer, _mouse_move))

    def _on_state_changed(self, state: str) -> None:
        running = state == WorkerState.RUNNING.value
        for name in ("path_edit", "file_button", "folder_button", "scan_button", "series_table", "load_button"):
            getattr(self, name).setEnabled(not running)
        self.cancel_button.setEnabled(running)

    # --- path and series --------------------------------------------------------------
    @property
    def path(self) -> str:
        return self.path_edit.text().strip()

    def set_path(self, path: str | Path, *, scan: bool = True) -> None:
        """Put ``path`` in the path field and (by default) list its series in a worker."""
        self.path_edit.setText(str(path))
        if scan:
            self.scan()

    def _browse_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Open a CT file", self.path or "",
            "CT (*.dcm *.DCM *.ima *.IMA *.nii *.nii.gz *.npy);;All files (*)",
        )
        if path:
            self.set_path(path)

    def _browse_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Open a DICOM folder", self.path or "")
        if path:
            self.set_path(path)

    @property
    def series(self) -> list[Any]:
        """The ``io.SeriesInfo`` found by the last scan."""
        return list(self._series)

    def open(self, path: str | Path) -> None:
        """Scan ``path`` and, when it holds exactly one series, load it (several: choose first)."""
        self.set_path(path, scan=False)
        self.scan(then_load=True)

    def _ready_path(self) -> str | None:
        """The path to work on, or None (after saying why) when it is empty or a task is running."""
        path = self.path
        if not path:
            self.report_warning("Choose a DICOM folder or a CT file first.")
            return None
        if self.busy:
            self.set_status("Busy: wait for the current task or cancel it.")
            return None
        return path

    def scan(self, *, then_load: bool = False) -> None:
        """List the series at the current path in a worker; the table shows them.

        ``then_load`` loads the series right after, when exactly one was found.
        """
        path = self._ready_path()
        if path is None:
            return
        self._set_series([], path=None)
        self.set_status(f"Looking for CT series in {path} ...")
        def load_if_single() -> None:
            if then_load and len(self._series) == 1 and self._scanned_path == path:
                self.load()

        self.run_function(
            partial(ct_io.list_series, path),
            on_returned=partial(self._on_series_found, path),
            on_finished=load_if_single,
            show_progress=True,
            context=f"Cannot list the series in {path}",
        )

    def _on_series_found(self, path: str, series: list[Any]) -> None:
        self._set_series(series, path=path)
        if not series:
            self.report_warning(f"No CT series found in {path}.")
        elif len(series) == 1:
            self.set_status(f"1 series found: {series_row(series[0])[0]}. Press Load.")
        else:
            self.set_status(f"{len(series)} series found: select one and press Load.")

    def _set_series(self, series: Sequence[Any], *, path: str | None) -> None:
        self._series = list(series)
        self._scanned_path = path
        table = self.series_table
        table.setRowCount(len(self._series))
        for row, info in enumerate(self._series):
            for column, text in enumerate(series_row(info)):
                item = QTableWidgetItem(text)
                if column:
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                table.setItem(row, column, item)
        if self._series:
            table.selectRow(0)

    def select_series(self, index: int) -> None:
        """Select row ``index`` of the series table."""
        if not 0 <= index < len(self._series):
            raise ConfigError(f"There is no series number {index}; {len(self._series)} were found.")
        self.series_table.selectRow(index)

    def _chosen_series(self) -> Any | None:
        """The ``io.SeriesInfo`` to load (its headers are not read again), or None before a scan of this path."""
        if self._scanned_path != self.path or not self._series:
            return None
        rows = self.series_table.selectionModel().selectedRows()
        index = rows[0].row() if rows else 0
        return self._series[index]

    # --- loading ----------------------------------------------------------------------
    def load(self) -> None:
        """Read the chosen series in a worker and add it as an Image layer."""
        path = self._ready_path()
        if path is None:
            return
        series = self._chosen_series()
        try:
            window = self.current_window()
        except ConfigError as exc:
            self.report_error(exc)
            return
        self.set_status(f"Reading {path} ...")

        def read() -> Generator[Progress, None, Any]:
            return (yield from ct_io.iter_read_ct(path, series=series))

        self.run_generator(
            read(),
            on_returned=partial(self._on_volume, window),
            on_failed=partial(self._on_load_failed, path),
            context=f"Cannot load {path}",
        )

    def _on_volume(self, window: Window, volume: Any) -> None:
        window_arg: str | tuple[float, float] = window.name if window.name in PRESETS else window.limits
        data, meta, layer_type = ct_io.volume_to_layer_data(volume, window=window_arg)
        layer = self.viewer.add_layer(Layer.create(data, meta, layer_type))
        self.last_layer = layer
        self.fit_view()
        QTimer.singleShot(0, self.fit_view)  # again once the docks and the canvas have their final size
        shape = " x ".join(str(n) for n in np.shape(data))
        self.set_status(f"Loaded {layer.name}: {shape} voxels, spacing {_format_spacing(volume.spacing)} mm.")

    def fit_view(self) -> None:
        """Fit the viewer's camera to the layers (the loaded volume fills the canvas)."""
        if self._lifeline.alive:
            self.viewer.reset_view()

    def _on_load_failed(self, path: str, error: BaseException) -> None:
        # Several series and none chosen: offer them in the table instead of only failing.
        if isinstance(error, SeriesChoiceError) and error.series:
            self._set_series(error.series, path=path)

    # --- window -----------------------------------------------------------------------
    def set_window(self, window: str | tuple[float, float]) -> None:
        """Choose a preset by name or custom ``(lower, upper)`` HU limits, and apply it."""
        if isinstance(window, str):
            self.window_combo.setCurrentText(get_window(window).name)
            return
        chosen = get_window(window)
        self._syncing_window = True
        try:
            self.window_combo.setCurrentText(CUSTOM_WINDOW)
            self.show_window_limits(chosen)
        finally:
            self._syncing_window = False
        self._apply_window(chosen)

    def _on_window_choice(self, name: str) -> None:
        if name == CUSTOM_WINDOW:
            self.lower_spin.setEnabled(True)
            self.upper_spin.setEnabled(True)
            if not self._syncing_window:
                self._on_custom_limits()
            return
        window = get_window(name)
        self.show_window_limits(window)
        if not self._syncing_window:
            self._apply_window(window)

    def _on_custom_limits(self, *_: object) -> None:
        if self.window_combo.currentText() != CUSTOM_WINDOW or self._syncing_window:
            return
        try:
            window = self.current_window()
        except ConfigError as exc:
            self.set_status(str(exc))
            return
        self._apply_window(window)

    def _apply_window(self, window: Window) -> None:
        layer = image_layer_under(self.viewer)
        if layer is None:
            return
        # contrast_limits only: the HU data are never touched by a display window.
        layer.contrast_limits = window.limits
        self.set_status(f"{layer.name}: window {window.name} [{window.lower:g}, {window.upper:g}] HU.")

    def _on_active_layer(self, event: Any = None) -> None:
        """Show the active image layer's window in the combo (without re-applying it)."""
        layer = self.viewer.layers.selection.active
        if not isinstance(layer, Image):
            return
        lower, upper = (float(v) for v in layer.contrast_limits)
        name = next((w.name for w in PRESETS.values() if np.allclose(w.limits, (lower, upper))), CUSTOM_WINDOW)
        self._syncing_window = True
        try:
            self.window_combo.setCurrentText(name)
            if upper > lower:
                self.show_window_limits(Window.from_limits(lower, upper, name=name))
        finally:
            self._syncing_window = False

    # --- HU under the cursor ----------------------------------------------------------
    def show_value_at(self, world_position: Sequence[float]) -> float | None:
        """Show (and return) the HU of the active image layer at a world position."""
        if self.viewer.dims.ndisplay != 2:
            self.hu_label.setText("HU: shown in 2D view only")
            return None
        layer = image_layer_under(self.viewer)
        found = None if layer is None else value_at(layer, world_position)
        if found is None:
            self.hu_label.setText("HU: -")
            return None
        index, value = found
        axes = ("z", "y", "x")[-len(index) :] if len(index) <= 3 else tuple(f"d{i}" for i in range(len(index)))
        where = ", ".join(f"{a} {i}" for a, i in zip(axes, index, strict=True))
        self.hu_label.setText(f"{value:.0f} HU at ({where}) in {layer.name}")
        return value


def _remove_callback(viewer: Any, callback: Any, *_: object) -> None:
    try:
        viewer.mouse_move_callbacks.remove(callback)
    except ValueError:
        pass
