"""The Compare dock widget: before / after / reference side by side, ROI crops and metrics.

A thin view over :mod:`napari_langmamba.compare`: it picks the current slice of each chosen
layer and the ROI rectangle(s) of a Shapes layer, runs :func:`compare_slices` in a worker
(debounced: the ROI and the slice can change many times a second) and draws the result. The
side-by-side view uses napari's grid (one camera, one slice position, linked contrast
limits) plus difference layers, and its exact previous state is restored by one click
(:class:`~napari_langmamba.widgets._compare_grid.SideBySide`). ROI geometry, the comparison
the worker runs and the table's texts are Qt-free, in :mod:`napari_langmamba.widgets._compare_core`.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from napari.layers import Image, Shapes
from napari.utils.notifications import show_info
from qtpy.QtCore import QTimer, Signal
from qtpy.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFileDialog,
    QGridLayout,
    QHeaderView,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)

from napari_langmamba.compare import (
    Comparison,
    Roi,
    check_compatible,
    draw_comparison,
    save_figure,
    write_csv,
)
from napari_langmamba.errors import ConfigError, LangMambaError
from napari_langmamba.session import current_slice_index, require_axial_view
from napari_langmamba.widgets._base import CUSTOM_WINDOW, WidgetBase, ct_image_layers
from napari_langmamba.widgets._compare_core import (
    BACKGROUND_COLOUR,
    METADATA_KEY,
    NONE,
    REGION_CHOICES,
    ROI_COLOUR,
    ROI_LAYER_NAME,
    TABLE_COLUMNS,
    background_beside,
    compute_comparison,
    metric_cells,
    pixel_to_roi_data,
    roi_data_to_pixel,
)
from napari_langmamba.widgets._compare_grid import SideBySide
from napari_langmamba.windowing import get_window

logger = logging.getLogger(__name__)

DEBOUNCE_MS = 150


class CompareWidget(SideBySide, WidgetBase):
    """Compare before / after (/ reference) image layers: grid view, ROI crops, metrics, export."""

    TOOLTIP_SECTION = "compare"
    comparison_ready = Signal(object)
    """Emitted with each new :class:`~napari_langmamba.compare.Comparison` (after drawing)."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(napari_viewer, parent)
        self.comparison: Comparison | None = None
        self.roi_layer: Shapes | None = None
        self._init_side_by_side()
        self._dirty = False
        self._refreshing = False
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(DEBOUNCE_MS)
        self._timer.timeout.connect(self.update_now)
        self._build()
        self._connect_viewer()
        self.refresh_layers()

    # --- layout -----------------------------------------------------------------------
    def _build(self) -> None:
        for name, label in (("before_combo", "Before"), ("after_combo", "After"), ("reference_combo", "Reference")):
            combo = self.bind(name, QComboBox(), label=label)
            combo.currentTextChanged.connect(self._on_choice)

        self.add_window_row()
        for control in (self.lower_spin, self.upper_spin):
            control.valueChanged.connect(self._on_window)
        self.window_combo.currentTextChanged.connect(self._on_window)

        region = self.bind("region_combo", QComboBox(), label="Metrics on")
        region.addItems(tuple(REGION_CHOICES))
        region.currentTextChanged.connect(lambda _t: self.schedule_update())

        buttons = QGridLayout()
        grid_button = self.bind("grid_button", QPushButton("Side by side"), add=False)
        grid_button.setCheckable(True)
        grid_button.toggled.connect(self._on_grid_toggled)
        buttons.addWidget(grid_button, 0, 0)
        buttons.addWidget(self.bind("roi_button", QPushButton("ROI"), add=False), 0, 1)
        buttons.addWidget(self.bind("background_button", QPushButton("Background ROI"), add=False), 0, 2)
        buttons.addWidget(self.bind("update_button", QPushButton("Update"), add=False), 1, 0)
        buttons.addWidget(self.bind("export_button", QPushButton("Export..."), add=False), 1, 1, 1, 2)
        self._form.addRow(buttons)
        self.roi_button.clicked.connect(lambda: self._guard(self.add_roi, recentre=True))
        self.background_button.clicked.connect(lambda: self._guard(self.add_background_roi))
        self.update_button.clicked.connect(lambda: self._guard(self.update_now, explicit=True))
        self.export_button.clicked.connect(self._export_dialog)

        table = self.bind("metrics_table", QTableWidget(0, len(TABLE_COLUMNS)))
        table.setHorizontalHeaderLabels(TABLE_COLUMNS)
        table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        table.verticalHeader().setVisible(False)
        table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        table.verticalHeader().setDefaultSectionSize(22)
        table.setFixedHeight(4 * 22 + 8)  # header + before / after / reference

        self.figure = Figure(figsize=(4.5, 3.6), dpi=90, layout="constrained")
        self.figure.text(0.5, 0.5, "Choose the before and after layers:\nROI crops, differences and the line "
                         "profile appear here.", ha="center", va="center", fontsize=9, color="0.4")
        canvas = self.bind("canvas", FigureCanvasQTAgg(self.figure))
        canvas.setMinimumHeight(300)
        self.add_status_rows()

    def _connect_viewer(self) -> None:
        layers = self.viewer.layers
        layers.events.inserted.connect(self._on_layer_inserted)
        layers.events.removed.connect(self._on_layer_removed)
        # bound methods, not lambdas: napari holds them weakly, so a closed widget is not called
        layers.events.moved.connect(self._on_layer_renamed)
        for layer in layers:
            layer.events.name.connect(self._on_layer_renamed)
        self.viewer.dims.events.current_step.connect(self._on_view_changed)

    def _guard(self, action: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a button's action; an error becomes a notification, never a traceback."""
        try:
            return action(*args, **kwargs)
        except Exception as exc:
            self.report_error(exc)
            return None

    # --- layer choice -----------------------------------------------------------------
    def _image_layers(self) -> list[Image]:
        return ct_image_layers(self.viewer.layers, accept=lambda layer: METADATA_KEY not in layer.metadata)

    def refresh_layers(self) -> None:
        """Fill the layer combos with the image layers, keeping the current choices."""
        names = [layer.name for layer in self._image_layers()]
        self._refreshing = True
        try:
            for combo, optional in ((self.before_combo, False), (self.after_combo, False), (self.reference_combo, True)):
                current = combo.currentText()
                combo.clear()
                combo.addItems(([NONE] if optional else []) + names)
                if current in names or (optional and current == NONE):
                    combo.setCurrentText(current)
            # sensible first choice: the first two images as before / after
            if len(names) >= 2 and self.before_combo.currentText() == self.after_combo.currentText():
                self.before_combo.setCurrentText(names[0])
                self.after_combo.setCurrentText(names[1])
        finally:
            self._refreshing = False
        self.schedule_update()

    def _on_layer_inserted(self, event: Any) -> None:
        event.value.events.name.connect(self._on_layer_renamed)
        self.refresh_layers()

    def _on_layer_removed(self, event: Any) -> None:
        layer = event.value
        if layer is self.roi_layer:
            self.roi_layer = None
        if layer in self.difference_layers:
            self.difference_layers.remove(layer)
        if layer in self.roi_copies:
            self.roi_copies.remove(layer)
        self.refresh_layers()

    def _on_layer_renamed(self, event: Any = None) -> None:
        self.refresh_layers()

    def _on_choice(self, _text: str = "") -> None:
        if self._refreshing:
            return
        # a choice made by the user: give them an ROI to move if there is none yet
        if self.roi_layer is None or self.roi_layer not in self.viewer.layers:
            try:
                self.add_roi()
            except LangMambaError as exc:
                self.set_status(str(exc))
        self.schedule_update()

    def _on_view_changed(self, event: Any = None) -> None:
        self.schedule_update()

    def set_layers(self, before: Image | str, after: Image | str, reference: Image | str | None = None) -> None:
        """Choose the before / after / (optional) reference layers (objects or names)."""
        def name(value: Image | str | None) -> str:
            return NONE if value is None else (value if isinstance(value, str) else value.name)

        for combo, value in ((self.before_combo, before), (self.after_combo, after), (self.reference_combo, reference)):
            if combo.findText(name(value)) < 0:
                raise ConfigError(f"There is no image layer named {name(value)!r} to compare.")
            combo.setCurrentText(name(value))

    def chosen_layers(self) -> dict[str, Image]:
        """role -> layer of the current choice; raises :class:`ConfigError` when incomplete or mismatched."""
        by_name = {layer.name: layer for layer in self._image_layers()}
        chosen: dict[str, Image] = {}
        for role, combo in (("before", self.before_combo), ("after", self.after_combo), ("reference", self.reference_combo)):
            text = combo.currentText()
            if text and text != NONE and text in by_name:
                chosen[role] = by_name[text]
        if "before" not in chosen or "after" not in chosen:
            raise ConfigError("Choose a 'before' and an 'after' image layer to compare.")
        if len({id(layer) for layer in chosen.values()}) != len(chosen):
            raise ConfigError("Choose different layers for before, after and reference.")
        check_compatible(
            {f"{role} '{layer.name}'": layer.data.shape for role, layer in chosen.items()},
            {f"{role} '{layer.name}'": layer.scale for role, layer in chosen.items()},
        )
        if chosen["before"].ndim not in (2, 3):
            raise ConfigError(f"Compare works on 2-D images and 3-D volumes; '{chosen['before'].name}' is {chosen['before'].ndim}-D.")
        return chosen

    # --- window -----------------------------------------------------------------------
    def set_window(self, window: str | tuple[float, float]) -> None:
        """A preset name or custom ``(lower, upper)`` HU for crops, metrics and linked layers."""
        if isinstance(window, str):
            self.window_combo.setCurrentText(get_window(window).name)
            return
        chosen = get_window(window)
        self.window_combo.setCurrentText(CUSTOM_WINDOW)
        self.lower_spin.setValue(chosen.lower)
        self.upper_spin.setValue(chosen.upper)

    def _on_window(self, *_: object) -> None:
        if self.window_combo.currentText() == CUSTOM_WINDOW:
            self.lower_spin.setEnabled(True)
            self.upper_spin.setEnabled(True)
        else:
            self.show_window_limits(get_window(self.window_combo.currentText()))
        try:
            window = self.current_window()
        except ConfigError as exc:
            self.set_status(str(exc))
            return
        for layer in self._linked:  # linked: setting one sets all
            layer.contrast_limits = window.limits
            break
        self.schedule_update()

    # --- geometry helpers ---------------------------------------------------------------
    def current_slice_index(self, layer: Image) -> int | None:
        """The data index along z of the slice shown (None for a 2-D image)."""
        if layer.ndim == 2:
            return None
        require_axial_view(self.viewer.dims, what="Compare")
        return current_slice_index(layer, self.viewer.dims.point)[0]

    # --- ROI ----------------------------------------------------------------------------
    def add_roi(self, *, recentre: bool = False) -> Shapes:
        """The ROI Shapes layer, created with a rectangle in the centre of the slice if missing."""
        layer = self.chosen_layers()["before"]
        shape = layer.data.shape[-2:]
        if self.roi_layer is None or self.roi_layer not in self.viewer.layers:
            roi = Roi.centred(shape)
            # 2-D shapes in a 3-D viewer are shown on every slice: one ROI follows the slider.
            self.roi_layer = self.viewer.add_shapes(
                [roi.corners()],
                shape_type="rectangle",
                edge_color=ROI_COLOUR,
                face_color="transparent",
                edge_width=max(1.0, shape[-1] / 256),
                name=ROI_LAYER_NAME,
                scale=layer.scale[-2:],
                translate=layer.translate[-2:],
                metadata={METADATA_KEY: "roi"},
            )
            self.roi_layer.events.data.connect(self._on_view_changed)
            self.roi_layer.events.data.connect(self._on_roi_data)
            self.roi_layer.mode = "select"
        elif recentre or len(self.roi_layer.data) == 0:
            self.set_roi(Roi.centred(shape), background=self.background_roi())
        self.schedule_update()
        return self.roi_layer

    def add_background_roi(self) -> Roi:
        """Add (or return) the second rectangle, the background of the CNR."""
        roi_layer = self.add_roi()
        current = self.rois()
        if current[1] is not None:
            return current[1]
        roi = current[0]
        background = background_beside(roi, self.chosen_layers()["before"].data.shape[-1])
        layer = self.chosen_layers()["before"]
        roi_layer.add_rectangles(
            pixel_to_roi_data(layer, roi_layer, background.corners()), edge_color=BACKGROUND_COLOUR
        )
        self.schedule_update()
        return background

    def set_roi(self, roi: Roi, background: Roi | None = None) -> None:
        """Place the ROI (and background ROI) rectangles, in pixel indices of the chosen images."""
        layer = self.chosen_layers()["before"]
        if self.roi_layer is None or self.roi_layer not in self.viewer.layers:
            self.add_roi()
        roi_layer = self.roi_layer
        shapes = [pixel_to_roi_data(layer, roi_layer, roi.corners())]
        colours = [ROI_COLOUR]
        if background is not None:
            shapes.append(pixel_to_roi_data(layer, roi_layer, background.corners()))
            colours.append(BACKGROUND_COLOUR)
        roi_layer.selected_data = set()
        roi_layer.data = []
        roi_layer.add_rectangles(shapes, edge_color=colours)
        self.schedule_update()

    def rois(self) -> tuple[Roi, Roi | None]:
        """The ROI and optional background ROI (pixel boxes of the chosen images)."""
        layer = self.chosen_layers()["before"]
        if self.roi_layer is None or self.roi_layer not in self.viewer.layers or len(self.roi_layer.data) == 0:
            raise ConfigError("Draw a rectangle in the ROI layer (or press ROI) to choose the region to compare.")
        shape = layer.data.shape[-2:]
        found = [
            Roi.from_vertices(roi_data_to_pixel(layer, self.roi_layer, np.asarray(v, dtype=float)), shape)
            for v in self.roi_layer.data[:2]
        ]
        return found[0], (found[1] if len(found) > 1 else None)

    def background_roi(self) -> Roi | None:
        try:
            return self.rois()[1]
        except ConfigError:
            return None

    # --- computing ----------------------------------------------------------------------
    @property
    def idle(self) -> bool:
        """No computation running or scheduled (tests wait for this)."""
        return not self.busy and not self._timer.isActive() and not self._dirty

    def schedule_update(self) -> None:
        """Recompute after a short quiet period (ROI drags and slider moves come in bursts)."""
        self._timer.start()

    def _inputs(self, *, create_roi: bool = False) -> dict[str, Any]:
        chosen = self.chosen_layers()
        if create_roi and (self.roi_layer is None or self.roi_layer not in self.viewer.layers):
            self.add_roi()
        roi, background = self.rois()
        index = self.current_slice_index(chosen["before"])
        region = REGION_CHOICES[self.region_combo.currentText()]
        return {
            "layers": {role: (layer.name, layer.data) for role, layer in chosen.items()},
            "index": index,
            "roi": roi,
            "background": background,
            "window": self.current_window(),
            "region": region,
        }

    def update_now(self, *, explicit: bool = False) -> None:
        """Recompute the comparison for the current slice and ROI in a worker.

        ``explicit`` (the Update button): create the ROI if missing and notify on errors;
        live updates only write to the status line.
        """
        self._timer.stop()
        if self.busy:
            self._dirty = True  # recompute once the running one is done
            return
        try:
            inputs = self._inputs(create_roi=explicit)
        except LangMambaError as exc:
            if explicit:
                self.report_error(exc)
            else:
                self.set_status(str(exc))
            return
        self._dirty = False
        self.run_function(
            partial(compute_comparison, inputs),
            on_returned=self._show,
            on_failed=lambda _e: self._after_compute(),
            context="Comparison failed",
        )

    def _after_compute(self) -> None:
        if self._dirty:
            self.schedule_update()

    def _show(self, comparison: Comparison) -> None:
        self.comparison = comparison
        self._fill_table(comparison)
        draw_comparison(self.figure, comparison, compact=True)
        self.canvas.draw_idle()
        message = f"{comparison.slice_label}, window {comparison.window_label}."
        if comparison.notes:
            message += " " + " ".join(comparison.notes)
        self.set_status(message)
        self.comparison_ready.emit(comparison)
        self._after_compute()

    def _fill_table(self, comparison: Comparison) -> None:
        table = self.metrics_table
        table.setRowCount(len(comparison.metrics))
        for row, m in enumerate(comparison.metrics):
            for column, text in enumerate(metric_cells(m)):
                item = QTableWidgetItem(text)
                item.setToolTip(f"{m.role}: {m.image}")
                table.setItem(row, column, item)

    def compute_now(self) -> Comparison:
        """Compute the comparison on the GUI thread and return it (export uses this)."""
        comparison = compute_comparison(self._inputs(create_roi=True))
        self._show(comparison)
        return comparison

    # --- export -------------------------------------------------------------------------
    def export(self, png_path: str | Path, csv_path: str | Path | None = None) -> tuple[Path, Path]:
        """Write the comparison figure (PNG) and the metrics (CSV, next to it by default)."""
        png_path = Path(png_path)
        if png_path.suffix.lower() != ".png":
            png_path = png_path.with_suffix(".png")
        csv_path = png_path.with_suffix(".csv") if csv_path is None else Path(csv_path)
        comparison = self.compute_now()
        save_figure(comparison, png_path)
        write_csv(comparison, csv_path)
        self.set_status(f"Saved {png_path.name} and {csv_path.name} in {png_path.parent}.")
        return png_path, csv_path

    def _export_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export the comparison", "comparison.png", "PNG figure (*.png)")
        if not path:
            return
        try:
            png, csv = self.export(path)
        except (OSError, LangMambaError) as exc:
            self.report_error(exc, context="Export failed")
            return
        show_info(f"Saved the figure {png} and the metrics {csv}.")
