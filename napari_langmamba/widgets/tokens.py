"""The Tokens dock widget: the words a LangAE uses for each region of the current slice.

Show tokens computes the token pyramid (:func:`napari_langmamba.tokens.iter_token_pyramid`) of
the current slice of the chosen image layer in a worker and draws the regions of the chosen
pyramid layer in two layers: a Labels layer ("Token words") colours every region by its word
(one colour per distinct word, kept for the session so a word keeps its colour across slices
and pyramid layers), and a Shapes overlay ("Tokens") outlines the regions and writes each word
only where it fits in its box at the current zoom (re-checked on every camera zoom), so the
words never pile into an unreadable block. The legend in the widget lists the words of the slice
with their colour and the share of the slice they cover, largest first. Hovering shows the three
words under the cursor; clicking anywhere in the image (a viewer mouse callback, whatever layer
is active) lists the words of the three layers at that point with their nearest alternatives and
outlines the three regions. Changing the slice or the layer recomputes in a worker (debounced;
results are cached by the core). Compare computes the pyramid of a second layer on the same
slice and reports, per pyramid layer, the share of regions whose token agrees, with an overlay
of the regions that disagree. Export writes the current pyramid as JSON or CSV.

The overlays are nD Shapes layers with the image layer's transform (scale, translate, rotate,
shear, affine), their rectangles placed on the computed slice, so they only show on that slice;
the word colours are a one-slice Labels layer translated onto that slice (napari draws nothing
of a layer on slices outside its extent).

What the widget shows and follows (the model, the pyramid and its slice, the comparison, the
clicked regions, whether it follows slice changes) is one evented :class:`TokensState`
(``widget.token_state``), like the Train widget's run state; the list of words and the outlines of
the clicked regions follow its ``selected`` event. The current slice is
:func:`napari_langmamba.session.current_slice`'s.

The widget is the controls, the model choice and the work its worker runs; when it computes
and what it does with a result is :class:`~napari_langmamba.widgets._tokens_compute.TokenComputation`,
how it draws (layers, word colours, legend, the list of clicked words)
:class:`~napari_langmamba.widgets._tokens_overlay.TokenOverlays`, and the state and the maths of
its overlays are in :mod:`napari_langmamba.widgets._tokens_core` (no Qt).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Generator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from napari.layers import Image
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTreeWidget,
    QWidget,
)

from napari_langmamba.errors import ConfigError
from napari_langmamba.events import Progress
from napari_langmamba.tokens import (
    PyramidComparison,
    Region,
    TokenPyramid,
    iter_token_pyramid,
    load_token_model,
)
from napari_langmamba.widgets._base import WidgetBase, WorkerState, ct_image_layers
from napari_langmamba.widgets._tokens_compute import NO_LAYER, TokenComputation

# re-exported: tests import these from here
from napari_langmamba.widgets._tokens_core import (  # noqa: F401
    CHAR_WIDTH_EM,
    POINT_PX,
    TEXT_SIZE,
    TokensState,
    pixel_at,
    text_fits,
)
from napari_langmamba.widgets._tokens_overlay import (  # noqa: F401
    DISAGREEMENT_NAME,
    OVERLAY_NAME,
    SELECTION_NAME,
    WORDS_NAME,
    TokenOverlays,
    WordColors,
)
from napari_langmamba.widgets._viewer import call_weakly, remove_callback, viewer_camera

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "bundled default"
FOLDER_MODEL = "LangAE checkpoint folder"
PYRAMID_CHOICES = {
    1: "1 - coarse (quadrants)",
    2: "2 - middle (8 x 8 on 512 px)",
    3: "3 - fine (every 16 px)",
}
ZOOM_DEBOUNCE_MS = 120  # re-fit the words once a zoom pauses (napari re-lays all texts: ~0.3 s for 1024)
DEBOUNCE_MS = 250


def _on_mouse_press(ref: weakref.ref, viewer: Any, event: Any) -> None:
    if getattr(event, "type", None) == "mouse_press":
        call_weakly(ref, "select_at", event.position)


def _on_mouse_move(ref: weakref.ref, viewer: Any, event: Any) -> None:
    call_weakly(ref, "hover_at", event.position)


def _on_event(ref: weakref.ref, method: str, event: Any = None) -> None:
    call_weakly(ref, method)


class TokensWidget(TokenComputation, TokenOverlays, WidgetBase):
    """Tokens: per-region words of the LangAE token pyramid, click to read them, compare, export."""

    TOOLTIP_SECTION = "tokens"

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(napari_viewer, parent)
        self.token_state = TokensState()
        """What is shown and followed (evented: subscribe to ``token_state.events.<field>``)."""
        self.token_state.events.selected.connect(self._on_selected)
        self._init_overlays()
        self._zoom_timer = QTimer(self)
        self._zoom_timer.setSingleShot(True)
        self._zoom_timer.setInterval(ZOOM_DEBOUNCE_MS)
        self._zoom_timer.timeout.connect(self._update_text)
        self._debounce = QTimer(self)
        self._debounce.setSingleShot(True)
        self._debounce.setInterval(DEBOUNCE_MS)
        self._debounce.timeout.connect(self._on_view_changed)
        self._build()
        self._connect_viewer()
        self._refresh_layer_choices()
        self._on_state_changed(self.state.value)
        self.persist("pyramid_combo")  # remembered between sessions (issue 13)

    # --- layout -----------------------------------------------------------------------
    def _build(self) -> None:
        self.bind("image_combo", QComboBox(), label="Image")

        model_row = QHBoxLayout()
        model_combo = self.bind("model_combo", QComboBox(), add=False)
        model_combo.addItems([DEFAULT_MODEL, FOLDER_MODEL])
        model_row.addWidget(model_combo)
        path_edit = self.bind("model_path_edit", QLineEdit(), add=False)
        path_edit.setPlaceholderText("LangAE checkpoint folder")
        model_row.addWidget(path_edit, 1)
        model_row.addWidget(self.bind("browse_button", QPushButton("..."), add=False))
        self._form.addRow("Model", model_row)

        pyramid_combo = self.bind("pyramid_combo", QComboBox(), label="Pyramid layer")
        for layer, text in PYRAMID_CHOICES.items():
            pyramid_combo.addItem(text, layer)
        pyramid_combo.setCurrentIndex(1)
        topk = self.bind("topk_spin", QSpinBox(), label="Alternatives")
        topk.setRange(0, 20)
        topk.setValue(5)

        run_row = QHBoxLayout()
        run_row.addWidget(self.bind("show_button", QPushButton("Show tokens"), add=False))
        run_row.addWidget(self.bind("cancel_button", QPushButton("Cancel"), add=False))
        self._form.addRow(run_row)

        legend = self.bind("legend_table", QTableWidget(0, 3), label="Words")
        legend.setHorizontalHeaderLabels(["", "Word", "Area"])
        legend.verticalHeader().setVisible(False)
        legend.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        legend.setSelectionMode(QAbstractItemView.SelectionMode.NoSelection)
        header = legend.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Fixed)
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        header.setSectionResizeMode(2, QHeaderView.ResizeMode.ResizeToContents)
        legend.setColumnWidth(0, 22)
        legend.setMinimumHeight(160)
        if not legend.toolTip():
            legend.setToolTip(
                "The words of the drawn pyramid layer on this slice: the colour of their regions in the "
                "'Token words' layer and the share of the slice they cover, largest first."
            )

        hover = self.bind("hover_label", QLabel("Words under the cursor appear here."), label="Cursor")
        hover.setWordWrap(True)
        tree = self.bind("hits_tree", QTreeWidget())
        tree.setColumnCount(3)
        tree.setHeaderLabels(["Layer", "Word", "Distance"])
        tree.setMinimumHeight(220)

        compare_row = QHBoxLayout()
        compare_row.addWidget(self.bind("compare_combo", QComboBox(), add=False), 1)
        compare_row.addWidget(self.bind("compare_button", QPushButton("Compare"), add=False))
        self._form.addRow("Compare with", compare_row)
        agreement = self.bind("agreement_label", QLabel(""), label="Agreement")
        agreement.setWordWrap(True)
        self.bind("export_button", QPushButton("Export tokens..."))
        self.add_status_rows()
        self._layout.addStretch(1)

        model_combo.currentTextChanged.connect(self._on_model_choice)
        path_edit.editingFinished.connect(self._on_model_choice)
        self.browse_button.clicked.connect(self._browse_model)
        pyramid_combo.currentIndexChanged.connect(self._on_pyramid_layer_changed)
        topk.valueChanged.connect(lambda _v: self._schedule())
        self.image_combo.currentTextChanged.connect(lambda _t: self._schedule())
        self.compare_combo.currentTextChanged.connect(self._on_compare_choice)
        self.show_button.clicked.connect(self.show_tokens)
        self.cancel_button.clicked.connect(self.cancel)
        self.compare_button.clicked.connect(self.compare)
        self.export_button.clicked.connect(self._export_dialog)
        self.state_changed.connect(self._on_state_changed)
        self._on_model_choice()

    def _connect_viewer(self) -> None:
        # Weak references: the viewer must not keep a closed widget alive (or call into it).
        ref = weakref.ref(self)
        viewer = self.viewer
        self._mouse_press_callback = partial(_on_mouse_press, ref)
        self._mouse_move_callback = partial(_on_mouse_move, ref)
        for callbacks, callback in (
            (viewer.mouse_drag_callbacks, self._mouse_press_callback),
            (viewer.mouse_move_callbacks, self._mouse_move_callback),
        ):
            callbacks.append(callback)
            self.destroyed.connect(partial(remove_callback, callbacks, callback))
        schedule = partial(_on_event, ref, "_schedule")
        layers_changed = partial(_on_event, ref, "_refresh_layer_choices")
        for emitter, slot in (
            (viewer.dims.events.current_step, schedule),
            (viewer.layers.events.inserted, layers_changed),
            (viewer.layers.events.removed, layers_changed),
            (viewer.layers.events.renamed, layers_changed),
            (viewer_camera(viewer).events.zoom, partial(_on_event, ref, "_on_zoom")),
        ):
            emitter.connect(slot)
            self.destroyed.connect(lambda *_, emitter=emitter, slot=slot: emitter.disconnect(slot))

    def _on_zoom(self) -> None:
        self._zoom_timer.start()  # re-fit the words once the zoom pauses

    def _on_state_changed(self, state: str) -> None:
        running = state == WorkerState.RUNNING.value
        self.cancel_button.setEnabled(running)
        self.show_button.setEnabled(not running)
        self.compare_button.setEnabled(not running)

    # --- choices ----------------------------------------------------------------------
    def _image_layers(self) -> list[Image]:
        return ct_image_layers(self.viewer.layers)  # the overlays are Shapes and Labels, never listed

    def _refresh_layer_choices(self) -> None:
        names = [ly.name for ly in self._image_layers()]
        for combo, extra in ((self.image_combo, []), (self.compare_combo, [NO_LAYER])):
            current = combo.currentText()
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(extra + names)
            if current in extra + names:
                combo.setCurrentText(current)
            combo.blockSignals(False)
        if self.image_combo.currentText() != self._shown_layer_name():
            self._schedule()

    def _shown_layer_name(self) -> str | None:
        layer = self.token_state.shown_layer()
        return None if layer is None else layer.name

    def _layer_named(self, name: str) -> Image | None:
        for layer in self._image_layers():
            if layer.name == name:
                return layer
        return None

    @property
    def image_layer(self) -> Image | None:
        """The image layer chosen in the widget."""
        return self._layer_named(self.image_combo.currentText())

    def set_image_layer(self, layer: Image | str) -> None:
        """Choose the image layer whose tokens are shown (by layer or name)."""
        name = layer if isinstance(layer, str) else layer.name
        if self._layer_named(name) is None:
            raise ConfigError(f"There is no image layer named {name!r} in the viewer.")
        self.image_combo.setCurrentText(name)

    @property
    def pyramid_layer(self) -> int:
        """The pyramid layer drawn in the overlay: 1 (coarse), 2 (middle) or 3 (fine)."""
        return int(self.pyramid_combo.currentData())

    @pyramid_layer.setter
    def pyramid_layer(self, layer: int) -> None:
        if layer not in PYRAMID_CHOICES:
            raise ConfigError(f"Pyramid layers are 1, 2 and 3; got {layer!r}.")
        self.pyramid_combo.setCurrentIndex(list(PYRAMID_CHOICES).index(layer))

    @property
    def top_k(self) -> int:
        return int(self.topk_spin.value())

    # --- model ------------------------------------------------------------------------
    def _on_model_choice(self, *_: object) -> None:
        choice = self.model_combo.currentText()
        folder = choice == FOLDER_MODEL
        self.model_path_edit.setEnabled(folder)
        self.browse_button.setEnabled(folder)
        if choice not in (DEFAULT_MODEL, FOLDER_MODEL):
            return  # a model given with set_model
        for i in range(self.model_combo.count() - 1, 1, -1):  # leaving a given model forgets it
            self.model_combo.removeItem(i)
        spec = self.model_path_edit.text().strip() if folder else "default"
        if spec != self.token_state.model_spec:
            self.token_state.model = None  # loaded again, in the next worker
            self.token_state.model_spec = spec
            self._schedule()

    def _browse_model(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Choose a LangAE checkpoint folder",
                                                self.model_path_edit.text() or "")
        if path:
            self.use_weights(path)

    def use_weights(self, weights: str | Path) -> None:
        """Use ``"default"`` (the bundled LangAE) or a LangAE checkpoint folder."""
        if str(weights) == "default":
            self.model_combo.setCurrentText(DEFAULT_MODEL)
        else:
            self.model_combo.setCurrentText(FOLDER_MODEL)
            self.model_path_edit.setText(str(weights))
        self._on_model_choice()
        self._schedule()

    def set_model(self, model: Any, *, name: str = "custom model") -> None:
        """Use an already loaded LangAE (shown as ``name`` in the model choice, until it changes)."""
        self.token_state.model = model
        self.token_state.model_spec = f"<{name}>"
        combo = self.model_combo
        combo.blockSignals(True)
        for i in range(combo.count() - 1, 1, -1):
            combo.removeItem(i)
        combo.addItem(f"loaded: {name}")
        combo.setCurrentIndex(2)
        combo.blockSignals(False)
        self.model_path_edit.setEnabled(False)
        self.browse_button.setEnabled(False)
        self._schedule()

    @property
    def model(self) -> Any:
        """The LangAE in use, once loaded."""
        return self.token_state.model

    @property
    def pyramid(self) -> TokenPyramid | None:
        """The pyramid shown (of the shown layer at :attr:`pyramid_index`)."""
        return self.token_state.pyramid

    @property
    def pyramid_index(self) -> tuple[int, ...] | None:
        """The slice the pyramid shown is of (its indices along the layer's leading axes)."""
        return self.token_state.pyramid_index

    @property
    def comparison(self) -> PyramidComparison | None:
        return self.token_state.comparison

    @property
    def compare_pyramid(self) -> TokenPyramid | None:
        return self.token_state.compare_pyramid

    @property
    def selected(self) -> list[Region]:
        """The regions (one per pyramid layer) at the last clicked pixel."""
        return self.token_state.selected

    # --- computing (when and what to do with a result: TokenComputation) -----------------
    @staticmethod
    def _work(
        model: Any, spec: str, hu: np.ndarray, other_hu: np.ndarray | None, top_k: int
    ) -> Generator[Progress, None, tuple[Any, TokenPyramid, TokenPyramid | None]]:
        if model is None:
            if spec.startswith("<"):
                raise ConfigError("The model given to the widget is gone; choose the bundled default or a folder.")
            yield Progress(0, 0, "Loading the LangAE ...")
            model = load_token_model(spec, device="auto")
        pyramid = yield from iter_token_pyramid(model, hu, top_k=top_k)
        other = None
        if other_hu is not None:
            other = yield from iter_token_pyramid(model, other_hu, top_k=top_k)
        return model, pyramid, other

    # --- export -----------------------------------------------------------------------
    def export(self, path: str | Path) -> Path:
        """Write the current pyramid to ``path``: CSV when it ends in ``.csv``, JSON otherwise."""
        if self.pyramid is None:
            raise ConfigError("There are no tokens to export yet; press Show tokens first.")
        path = Path(path)
        if path.suffix.lower() == ".csv":
            self.pyramid.to_csv(path)
        else:
            if path.suffix.lower() != ".json":
                path = path.with_suffix(path.suffix + ".json")
            self.pyramid.to_json(path)
        self.set_status(f"Saved the tokens to {path}.")
        return path

    def _export_dialog(self) -> None:
        if self.pyramid is None:
            self.report_warning("There are no tokens to export yet; press Show tokens first.")
            return
        path, _ = QFileDialog.getSaveFileName(self, "Export tokens", "tokens.json", "JSON (*.json);;CSV (*.csv)")
        if path:
            try:
                self.export(path)
            except ConfigError as exc:
                self.report_error(exc, context="Cannot export the tokens")
            except OSError as exc:  # disk full, no permission: the user's to fix, not a bug
                self.report_warning(f"Cannot write {path}: {exc}")
