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
"""

from __future__ import annotations

import logging
import operator
import weakref
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from napari.layers import Image, Labels, Shapes
from napari.utils.colormaps import DirectLabelColormap
from napari.utils.transforms import CompositeAffine
from psygnal import evented
from qtpy.QtCore import Qt, QTimer
from qtpy.QtGui import QColor
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
    QTableWidgetItem,
    QTreeWidget,
    QTreeWidgetItem,
    QWidget,
)

from napari_langmamba.errors import ConfigError
from napari_langmamba.events import Progress
from napari_langmamba.session import current_slice, require_axial_view
from napari_langmamba.tokens import (
    LAYER_NAMES,
    PyramidComparison,
    Region,
    TokenPyramid,
    WordArea,
    box_corners,
    compare_pyramids,
    iter_token_pyramid,
    load_token_model,
)
from napari_langmamba.widgets._base import WidgetBase, WorkerState, ct_image_layers

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "bundled default"
FOLDER_MODEL = "LangAE checkpoint folder"
PYRAMID_CHOICES = {
    1: "1 - coarse (quadrants)",
    2: "2 - middle (8 x 8 on 512 px)",
    3: "3 - fine (every 16 px)",
}
NO_LAYER = "(none)"
OVERLAY_NAME = "Tokens"
SELECTION_NAME = "Token selection"
DISAGREEMENT_NAME = "Token disagreement"
WORDS_NAME = "Token words"
TEXT_SIZE = {1: 14, 2: 10, 3: 8}  # points; readable at the default zoom of a 512 x 512 slice
TEXT_COLORS = ("white", "black")  # on dark / light regions (the CT in its window, tinted by the word colour)
ZOOM_DEBOUNCE_MS = 120  # re-fit the words once a zoom pauses (napari re-lays all texts: ~0.3 s for 1024)
WORDS_OPACITY = 0.45  # the colours tint the CT; the anatomy stays readable underneath
# Text extent estimate (vispy draws text in points at 96 dpi): width of a character and height
# of a line, in font sizes, plus a margin (px) kept free on each side of a word inside its box.
POINT_PX = 96 / 72
CHAR_WIDTH_EM = 0.62
LINE_HEIGHT_EM = 1.25
TEXT_MARGIN_PX = 2.0
# Kelly's colours of maximum contrast (grey, white and black left out: they vanish on CT), then
# hues spread by the golden angle.
PALETTE = (
    "#f3c300", "#875692", "#f38400", "#a1caf1", "#be0032", "#c2b280", "#008856", "#e68fac",
    "#0067a5", "#f99379", "#604e97", "#f6a600", "#b3446c", "#dcd300", "#882d17", "#8db600",
    "#654522", "#e25822", "#2b3d26",
)
EDGE_RGBA = np.array([1.0, 0.85, 0.1, 0.7])  # yellow boxes
FINE_EDGE_RGBA = np.array([1.0, 0.85, 0.1, 0.3])  # layer 3: dense boxes, the colours already part them
HIGHLIGHT_RGBA = np.array([1.0, 0.2, 0.2, 1.0])
DISAGREE_RGBA = np.array([1.0, 0.0, 1.0, 0.9])
SELECTION_RGBA = {1: (1.0, 0.2, 0.2, 1.0), 2: (0.2, 1.0, 1.0, 1.0), 3: (1.0, 1.0, 1.0, 1.0)}
EDGE_WIDTH = 1.0
HIGHLIGHT_WIDTH = 3.0
DEBOUNCE_MS = 250


def pixel_at(layer: Image, world_position: Sequence[float]) -> tuple[int, int]:
    """``(row, col)`` pixel of ``layer``'s slice under a world position (nearest pixel centre)."""
    data = np.asarray(layer.world_to_data(np.asarray(world_position, dtype=float)))
    row, col = np.floor(data[-2:] + 0.5).astype(int)
    return int(row), int(col)


def _rectangles(boxes: np.ndarray, index: tuple[int, ...]) -> list[np.ndarray]:
    """Boxes (n, 4) -> napari rectangles (4 corners) placed on slice ``index`` of an nD layer."""
    lead = np.asarray(index, dtype=float)
    return [np.column_stack([np.tile(lead, (4, 1)), box_corners(box)]) for box in boxes]


def _transform_kwargs(layer: Image) -> dict[str, Any]:
    return {
        "scale": layer.scale, "translate": layer.translate, "rotate": layer.rotate,
        "shear": layer.shear, "affine": layer.affine.affine_matrix,
    }


def distinct_color(i: int) -> tuple[float, float, float, float]:
    """The ``i``-th colour of the word palette (RGBA in [0, 1]); different ``i``, different colour."""
    if i < len(PALETTE):
        rgb = QColor(PALETTE[i])
        return (rgb.redF(), rgb.greenF(), rgb.blueF(), 1.0)
    j = i - len(PALETTE)
    hue = (j * 0.618033988749895) % 1.0
    # three saturation/value rings so far-apart indices landing on close hues still differ
    saturation, value = ((0.85, 0.95), (0.55, 0.85), (0.95, 0.65))[(j // 7) % 3]
    color = QColor.fromHsvF(hue, saturation, value)
    return (color.redF(), color.greenF(), color.blueF(), 1.0)


class WordColors:
    """One label value and one colour per distinct word, assigned in first-seen order.

    The assignment lasts for the widget's life, so a word keeps its colour across slices and
    pyramid layers; two different words never share a label or a colour.
    """

    def __init__(self) -> None:
        self._labels: dict[str, int] = {}
        self._colors: dict[str, tuple[float, float, float, float]] = {}
        self._used: set[tuple[int, ...]] = set()
        self._next = 0  # the next palette index to try

    def add(self, words: Sequence[str]) -> None:
        """Give every new word of ``words`` (in order) the next label and a colour no word has."""
        for word in words:
            if word in self._labels:
                continue
            while True:  # skip palette entries equal (in 8 bits) to a colour in use
                color = distinct_color(self._next)
                self._next += 1
                key = tuple(round(255 * v) for v in color[:3])
                if key not in self._used:
                    break
            self._used.add(key)
            self._labels[word] = len(self._labels) + 1  # 0 is the transparent background
            self._colors[word] = color

    def label(self, word: str) -> int:
        return self._labels[word]

    def rgba(self, word: str) -> tuple[float, float, float, float]:
        return self._colors[word]

    @property
    def labels(self) -> dict[str, int]:
        return dict(self._labels)

    def colormap(self) -> DirectLabelColormap:
        transparent = (0.0, 0.0, 0.0, 0.0)
        colors: dict[int | None, Any] = {None: transparent, 0: transparent}
        colors.update({self._labels[w]: c for w, c in self._colors.items()})
        return DirectLabelColormap(color_dict=colors)


def text_fits(widths_px: np.ndarray, heights_px: np.ndarray, words: Sequence[str], size: float) -> np.ndarray:
    """Whether each word, drawn at ``size`` points, fits inside its box of ``widths x heights`` screen px."""
    px = size * POINT_PX
    text_w = np.array([len(w) for w in words], dtype=float) * CHAR_WIDTH_EM * px + 2 * TEXT_MARGIN_PX
    text_h = LINE_HEIGHT_EM * px + 2 * TEXT_MARGIN_PX
    return (np.asarray(widths_px, dtype=float) >= text_w) & (np.asarray(heights_px, dtype=float) >= text_h)


def screen_pixels_per_pixel(layer: Image, zoom: float) -> tuple[float, float]:
    """Screen pixels spanned by one image pixel along rows and along columns at a camera zoom."""
    origin = np.zeros(layer.ndim)
    steps = []
    for axis in (layer.ndim - 2, layer.ndim - 1):
        step = origin.copy()
        step[axis] = 1.0
        world = np.asarray(layer.data_to_world(step)) - np.asarray(layer.data_to_world(origin))
        steps.append(float(np.linalg.norm(world)) * float(zoom))
    return steps[0], steps[1]


def _camera(viewer: Any) -> Any:
    """napari >= 0.9 keeps the camera in ``viewer.scene``; older versions on the viewer."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None else viewer.camera


def _slice_transform_kwargs(layer: Image, index: tuple[int, ...]) -> dict[str, Any]:
    """``layer``'s transform for a one-slice layer holding its slice ``index`` (leading axes)."""
    kwargs = _transform_kwargs(layer)
    if index:
        shift = np.zeros(layer.ndim)
        shift[: len(index)] = index
        linear = CompositeAffine(
            scale=layer.scale, translate=layer.translate, rotate=layer.rotate, shear=layer.shear, ndim=layer.ndim
        ).linear_matrix
        kwargs["translate"] = np.asarray(layer.translate, dtype=float) + linear @ shift
    return kwargs


def _remove_callback(callbacks: list, callback: Any, *_: object) -> None:
    try:
        callbacks.remove(callback)
    except ValueError:
        pass


_IDENTITY = operator.is_  # models, pyramids and layer references: a new object is news, whatever it holds


@evented(equality_operators={
    name: _IDENTITY
    for name in ("model", "pyramid", "source", "compare_pyramid", "comparison", "compare_source", "selected")
})
@dataclass
class TokensState:
    """What the Tokens widget shows and follows; views subscribe to ``token_state.events.<field>``.

    The pyramid shown is of the image layer ``source()`` at slice ``pyramid_index``, computed
    with ``computed_top_k`` alternatives by the model ``computed_spec`` named; the comparison
    likewise of ``compare_source()``. Layer references are weak: a layer removed from the viewer
    is not kept alive by the widget.
    """

    model: Any = None
    """The LangAE in use, once loaded (or given with ``set_model``)."""
    model_spec: str | None = None
    """``"default"``, a checkpoint folder, or ``"<name>"`` of a model given with ``set_model``."""
    pyramid: TokenPyramid | None = None
    pyramid_index: tuple[int, ...] | None = None
    source: weakref.ref | None = None
    compare_pyramid: TokenPyramid | None = None
    comparison: PyramidComparison | None = None
    compare_source: weakref.ref | None = None
    computed_top_k: int | None = None
    computed_spec: str | None = None
    selected: list[Region] = field(default_factory=list)
    """The regions (one per pyramid layer) at the last clicked pixel."""
    last_pixel: tuple[int, int] | None = None
    following: bool = False
    """Tokens were shown once: slice and layer changes recompute them from now on."""
    comparing: bool = False
    refresh_pending: bool = False
    """A recomputation was asked for while a worker ran: start it when that one ends."""
    pending_click: tuple[float, ...] | None = None
    """A click (world position) that waits for the pyramid of its slice."""


class TokensWidget(WidgetBase):
    """Tokens: per-region words of the LangAE token pyramid, click to read them, compare, export."""

    TOOLTIP_SECTION = "tokens"

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(napari_viewer, parent)
        self.token_state = TokensState()
        """What is shown and followed (evented: subscribe to ``token_state.events.<field>``)."""
        self.token_state.events.selected.connect(self._on_selected)
        self.overlay: Shapes | None = None
        self.selection_layer: Shapes | None = None
        self.disagreement_layer: Shapes | None = None
        self.words_layer: Labels | None = None
        self.word_colors = WordColors()
        self.legend: list[WordArea] = []
        """The words of the drawn pyramid layer on the slice, largest area first."""
        self._text_boxes: dict[str, tuple[np.ndarray, list[str], float]] = {}
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

        def _mouse_press(viewer: Any, event: Any) -> None:
            widget = ref()
            if widget is None or getattr(event, "type", None) != "mouse_press":
                return
            try:
                widget.select_at(event.position)
            except RuntimeError:  # the Qt side of the widget is already deleted
                pass

        def _mouse_move(viewer: Any, event: Any) -> None:
            widget = ref()
            if widget is None:
                return
            try:
                widget.hover_at(event.position)
            except RuntimeError:
                pass

        def _schedule(event: Any = None) -> None:
            widget = ref()
            if widget is not None:
                try:
                    widget._schedule()
                except RuntimeError:
                    pass

        def _layers_changed(event: Any = None) -> None:
            widget = ref()
            if widget is not None:
                try:
                    widget._refresh_layer_choices()
                except RuntimeError:
                    pass

        def _zoomed(event: Any = None) -> None:
            widget = ref()
            if widget is not None:
                try:
                    widget._zoom_timer.start()
                except RuntimeError:
                    pass

        self._mouse_press_callback = _mouse_press
        self._mouse_move_callback = _mouse_move
        viewer = self.viewer
        viewer.mouse_drag_callbacks.append(_mouse_press)
        viewer.mouse_move_callbacks.append(_mouse_move)
        viewer.dims.events.current_step.connect(_schedule)
        viewer.layers.events.inserted.connect(_layers_changed)
        viewer.layers.events.removed.connect(_layers_changed)
        viewer.layers.events.renamed.connect(_layers_changed)
        _camera(viewer).events.zoom.connect(_zoomed)
        self.destroyed.connect(partial(_remove_callback, viewer.mouse_drag_callbacks, _mouse_press))
        self.destroyed.connect(partial(_remove_callback, viewer.mouse_move_callbacks, _mouse_move))
        for emitter, slot in (
            (viewer.dims.events.current_step, _schedule),
            (viewer.layers.events.inserted, _layers_changed),
            (viewer.layers.events.removed, _layers_changed),
            (viewer.layers.events.renamed, _layers_changed),
            (_camera(viewer).events.zoom, _zoomed),
        ):
            self.destroyed.connect(lambda *_, emitter=emitter, slot=slot: emitter.disconnect(slot))

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
        layer = self.token_state.source() if self.token_state.source else None
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

    # --- computing --------------------------------------------------------------------
    def _schedule(self) -> None:
        """Recompute after a short pause (slider drags fire many events)."""
        if self.token_state.following:
            self._debounce.start()

    def _on_view_changed(self) -> None:
        if self.busy:
            self.token_state.refresh_pending = True
            return
        layer = self.image_layer
        if layer is None:
            return
        try:
            index, _ = current_slice(layer, self.viewer.dims.point)
        except ConfigError as exc:
            self.set_status(str(exc))
            return
        state = self.token_state
        fresh = (
            state.pyramid is not None and layer is self._shown_layer() and index == state.pyramid_index
            and state.computed_top_k == self.top_k and state.computed_spec == state.model_spec
            and (not state.comparing or self._compare_is_fresh())
        )
        if not fresh:
            self.refresh()

    def _shown_layer(self) -> Image | None:
        return self.token_state.source() if self.token_state.source else None

    def _compare_is_fresh(self) -> bool:
        other = self.token_state.compare_source() if self.token_state.compare_source else None
        return other is not None and other is self._layer_named(self.compare_combo.currentText())

    def show_tokens(self) -> Any:
        """Compute and show the tokens of the current slice; follow slice/layer changes from now on."""
        self.token_state.following = True
        return self.refresh()

    def compare(self) -> Any:
        """Compare the tokens of the chosen image with those of the 'Compare with' layer."""
        if self._layer_named(self.compare_combo.currentText()) is None:
            self.report_warning("Choose a second image layer to compare with.")
            return None
        self.token_state.following = True
        self.token_state.comparing = True
        return self.refresh()

    def stop_comparing(self) -> None:
        """Hide the disagreement overlay and stop comparing on slice changes."""
        self.token_state.comparing = False
        self.token_state.comparison = None
        self.token_state.compare_pyramid = None
        self.agreement_label.setText("")
        self._remove_layer("disagreement_layer")

    def _on_compare_choice(self, name: str) -> None:
        if name == NO_LAYER:
            self.stop_comparing()
        elif self.token_state.comparing:
            self._schedule()

    def refresh(self) -> Any:
        """Compute the pyramid(s) of the current slice in a worker; return the worker (or None)."""
        if self.busy:
            self.token_state.refresh_pending = True
            return None
        layer = self.image_layer
        if layer is None:
            self.report_warning("Add or choose an image layer first.")
            return None
        try:
            require_axial_view(self.viewer.dims, what="Tokens")
        except ConfigError as exc:
            self.report_warning(str(exc))
            return None
        if self.model is None and not self.token_state.model_spec:
            self.report_warning("Choose a LangAE checkpoint folder (or the bundled default model) first.")
            return None
        other = self._layer_named(self.compare_combo.currentText()) if self.token_state.comparing else None
        try:
            index, hu = current_slice(layer, self.viewer.dims.point)
            other_slice = current_slice(other, self.viewer.dims.point) if other is not None else None
        except ConfigError as exc:
            self.report_error(exc)
            return None
        if other_slice is not None and other_slice[1].shape != hu.shape:
            self.report_error(ConfigError(
                f"{layer.name!r} and {other.name!r} have slices of different sizes ({hu.shape} vs "
                f"{other_slice[1].shape}); compare layers of the same series."
            ))
            self.token_state.comparing = False
            other, other_slice = None, None
        where = f"slice {index[0]}" if len(index) == 1 else "this slice"
        self.set_status(f"Computing the tokens of {layer.name} ({where}) ...")
        work = self._work(self.model, self.token_state.model_spec or "default", hu,
                          None if other_slice is None else other_slice[1], self.top_k)
        layer_ref = weakref.ref(layer)
        other_ref = None if other is None else weakref.ref(other)
        worker = self.run_generator(
            work,
            on_returned=partial(
                self._on_computed, layer_ref, index, other_ref, self.top_k, self.token_state.model_spec
            ),
            on_failed=self._on_failed,
            context="Cannot compute the tokens",
        )
        worker.finished.connect(self._after_worker)
        return worker

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

    def _on_failed(self, error: BaseException) -> None:
        # stop following the slice: every slider step would otherwise repeat the same error
        self.token_state.following = False
        self.token_state.refresh_pending = False
        self.token_state.pending_click = None

    def _after_worker(self) -> None:
        if self.token_state.refresh_pending:
            self.token_state.refresh_pending = False
            self._debounce.start()

    def _on_computed(
        self,
        layer_ref: weakref.ref,
        index: tuple[int, ...],
        other_ref: weakref.ref | None,
        top_k: int,
        spec: str | None,
        result: tuple[Any, TokenPyramid, TokenPyramid | None],
    ) -> None:
        model, pyramid, other = result
        if spec == self.token_state.model_spec:  # the choice may have changed while the worker ran
            self.token_state.model = model
        self.token_state.computed_top_k, self.token_state.computed_spec = top_k, spec
        layer = layer_ref()
        if layer is None or layer not in self.viewer.layers:
            # closed while the worker ran: draw nothing (the choice moves to another layer)
            name = "The image layer" if layer is None else f"The layer {layer.name!r}"
            self.set_status(f"{name} was removed before its tokens were ready; nothing was drawn.")
            return
        self.token_state.pyramid = pyramid
        self.token_state.pyramid_index = index
        self.token_state.source = layer_ref
        self.token_state.comparison = None
        self.token_state.compare_pyramid = None
        if other is not None and other_ref is not None and other_ref() is not None:
            self.token_state.compare_pyramid = other
            self.token_state.compare_source = other_ref
            self.token_state.comparison = compare_pyramids(pyramid, other)
        self._draw_overlay()
        self._draw_comparison()
        n = {tl.layer: tl.n_regions for tl in pyramid.layers}
        self.set_status(
            f"Tokens of {layer.name}: {n[1]} / {n[2]} / {n[3]} regions in layers 1 / 2 / 3. "
            "Click the image to read the words at a point."
        )
        if self.token_state.pending_click is not None:
            position, self.token_state.pending_click = self.token_state.pending_click, None
            self.select_at(position)
        elif self.token_state.last_pixel is not None and pyramid.contains(*self.token_state.last_pixel):
            # keep the list on the same pixel when the slice changes: its words are the new slice's
            self._show_hits(*self.token_state.last_pixel)

    # --- overlays ---------------------------------------------------------------------
    def _ensure_shapes(self, attr: str, name: str, image: Image) -> Shapes:
        layer = getattr(self, attr)
        if layer is None or layer not in self.viewer.layers or layer.ndim != image.ndim:
            if layer is not None and layer in self.viewer.layers:
                self.viewer.layers.remove(layer)
            active = self.viewer.layers.selection.active
            layer = self.viewer.add_shapes(
                ndim=image.ndim, name=name, face_color="transparent", edge_color="yellow",
                **_transform_kwargs(image),
            )
            layer.editable = False
            setattr(self, attr, layer)
            if active is not None and active in self.viewer.layers:  # adding a layer must not steal focus
                self.viewer.layers.selection.active = active
        else:
            for key, value in _transform_kwargs(image).items():
                setattr(layer, key, value)
        return layer

    def _remove_layer(self, attr: str) -> None:
        layer = getattr(self, attr)
        setattr(self, attr, None)
        if layer is not None and layer in self.viewer.layers:
            self.viewer.layers.remove(layer)

    def _set_shapes(
        self, layer: Shapes, boxes: np.ndarray, words: list[str], *, edge_rgba: np.ndarray,
        show_text: bool, text_color: str | Sequence[str] = TEXT_COLORS[0], attr: str | None = None,
    ) -> None:
        """Draw ``boxes``; with ``show_text``, each word where it fits its box at the current zoom."""
        n = len(boxes)
        size = TEXT_SIZE[self.pyramid_layer]
        colors = [text_color] * n if isinstance(text_color, str) else list(text_color)
        layer.data = (_rectangles(boxes, self.pyramid_index or ()), ["rectangle"] * n)
        shown = self._fitting_words(np.asarray(boxes), words, size) if show_text else [""] * n
        layer.features = {"word": list(words), "label": shown, "text_color": colors}
        if n:
            layer.edge_color = np.tile(edge_rgba, (n, 1))
            layer.edge_width = [EDGE_WIDTH] * n
        layer.text = {"string": "{label}", "size": size, "color": {"feature": "text_color"},
                      "anchor": "center", "visible": any(shown)}
        if attr is not None:
            if show_text:
                self._text_boxes[attr] = (np.asarray(boxes), list(words), size)
            else:
                self._text_boxes.pop(attr, None)

    def _fitting_words(self, boxes: np.ndarray, words: Sequence[str], size: float) -> list[str]:
        """Each word where it fits its box on screen at the current zoom, else ``""``."""
        image = self._shown_layer()
        if image is None or not len(boxes):
            return [""] * len(words)
        per_row, per_col = screen_pixels_per_pixel(image, _camera(self.viewer).zoom)
        heights = (boxes[:, 2] - boxes[:, 0]) * per_row
        widths = (boxes[:, 3] - boxes[:, 1]) * per_col
        fits = text_fits(widths, heights, words, size)
        return [w if f else "" for w, f in zip(words, fits, strict=True)]

    def _update_text(self) -> None:
        """Write each word where it fits at the current zoom (after each zoom, debounced)."""
        self._zoom_timer.stop()
        for attr, (boxes, words, size) in list(self._text_boxes.items()):
            layer = getattr(self, attr)
            if layer is None or layer not in self.viewer.layers or layer.nshapes != len(words):
                continue
            shown = self._fitting_words(boxes, words, size)
            if list(layer.features["label"]) == shown:
                continue  # napari re-lays every text on a change: skip when nothing changes
            features = layer.features.copy()
            features["label"] = shown
            layer.features = features
            layer.text.visible = any(shown)

    def _text_colors(self, image: Image, layer: int) -> list[str]:
        """Black or white text per region of ``layer``: whichever reads on the region as shown.

        The shade of a region is its mean grey in the image's contrast limits, tinted by the
        word colour at the words layer's opacity.
        """
        assert self.pyramid is not None
        tl = self.pyramid.layer(layer)
        data = image.data[0] if image.multiscale else image.data
        hu = np.asarray(data[self.pyramid_index or ()], dtype=np.float32)
        if hu.shape != self.pyramid.image_shape:
            return [TEXT_COLORS[0]] * tl.n_regions
        lo, hi = (float(v) for v in image.contrast_limits)
        grey = np.clip((hu - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
        sums = np.add.reduceat(np.add.reduceat(grey, tl.row_edges[:-1], axis=0), tl.col_edges[:-1], axis=1)
        mean = (sums / np.outer(np.diff(tl.row_edges), np.diff(tl.col_edges))).ravel()
        rgb = np.array([self.word_colors.rgba(w)[:3] for w in self.pyramid.words(layer)]).reshape(-1, 3)
        tint = rgb @ np.array([0.2126, 0.7152, 0.0722])  # relative luminance of the word colour
        words_layer = self.words_layer
        alpha = words_layer.opacity if words_layer is not None and words_layer.visible else 0.0
        shade = (1.0 - alpha) * mean + alpha * tint
        return [TEXT_COLORS[int(v > 0.5)] for v in shade]

    def shown_words(self) -> list[str]:
        """The words written on the overlay now (``""`` where a word does not fit its box)."""
        overlay = self.overlay
        if overlay is None or overlay not in self.viewer.layers or not overlay.text.visible:
            return [""] * (0 if overlay is None else overlay.nshapes)
        return [str(v) for v in overlay.text.values]

    def _draw_words(self, image: Image) -> None:
        """Colour every region of the drawn pyramid layer by its word, and fill the legend."""
        assert self.pyramid is not None
        layer = self.pyramid_layer
        self.legend = self.pyramid.word_areas(layer)
        self.word_colors.add([entry.word for entry in self.legend])
        labels = self.word_colors.labels
        word_map = self.pyramid.word_map(layer, labels)
        lead = len(self.pyramid_index or ())
        data = word_map.reshape((1,) * lead + word_map.shape)
        kwargs = _slice_transform_kwargs(image, self.pyramid_index or ())
        words_layer = self.words_layer
        if words_layer is None or words_layer not in self.viewer.layers or words_layer.ndim != image.ndim:
            if words_layer is not None and words_layer in self.viewer.layers:
                self.viewer.layers.remove(words_layer)
            active = self.viewer.layers.selection.active
            words_layer = self.viewer.add_labels(data, name=WORDS_NAME, opacity=WORDS_OPACITY, **kwargs)
            words_layer.editable = False
            self.words_layer = words_layer
            if active is not None and active in self.viewer.layers:
                self.viewer.layers.selection.active = active
        else:
            for key, value in kwargs.items():
                setattr(words_layer, key, value)
            words_layer.data = data
        words_layer.colormap = self.word_colors.colormap()
        # napari's status bar shows a label's features: the word under the cursor
        words_layer.features = {"index": [0, *labels.values()], "word": ["", *labels]}
        self._fill_legend()

    def _fill_legend(self) -> None:
        table = self.legend_table
        table.setRowCount(len(self.legend))
        for row, entry in enumerate(self.legend):
            swatch = QTableWidgetItem("")
            r, g, b, _ = self.word_colors.rgba(entry.word)
            swatch.setBackground(QColor.fromRgbF(r, g, b))
            swatch.setData(Qt.ItemDataRole.UserRole, entry.word)
            word = QTableWidgetItem(entry.word)
            word.setToolTip(f"{entry.word}: {entry.n_regions} region(s), {entry.pixels} pixels")
            area = QTableWidgetItem(f"{100 * entry.share:.1f} %")
            area.setData(Qt.ItemDataRole.UserRole, float(entry.share))
            area.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            for column, item in enumerate((swatch, word, area)):
                table.setItem(row, column, item)

    def legend_rows(self) -> list[tuple[str, float, tuple[float, float, float]]]:
        """What the legend shows, top to bottom: (word, share of the slice, swatch RGB in [0, 1])."""
        out = []
        table = self.legend_table
        for row in range(table.rowCount()):
            color = table.item(row, 0).background().color()
            out.append((table.item(row, 1).text(), float(table.item(row, 2).data(Qt.ItemDataRole.UserRole)),
                        (color.redF(), color.greenF(), color.blueF())))
        return out

    def _draw_overlay(self) -> None:
        image = self._shown_layer()
        if self.pyramid is None or image is None:
            return
        self._draw_words(image)
        overlay = self._ensure_shapes("overlay", OVERLAY_NAME, image)
        layers = self.viewer.layers
        if layers.index(self.words_layer) > layers.index(overlay):  # the outlines and words above the colours
            layers.move(layers.index(self.words_layer), layers.index(overlay))
        layer = self.pyramid_layer
        self._set_shapes(overlay, self.pyramid.boxes(layer), self.pyramid.words(layer),
                         edge_rgba=self._edge_rgba(), show_text=True, text_color=self._text_colors(image, layer),
                         attr="overlay")
        self._highlight_overlay()

    def _edge_rgba(self) -> np.ndarray:
        return FINE_EDGE_RGBA if self.pyramid_layer == 3 else EDGE_RGBA

    def _highlight_overlay(self) -> None:
        overlay = self.overlay
        if overlay is None or self.pyramid is None or overlay not in self.viewer.layers or overlay.nshapes == 0:
            return
        n = overlay.nshapes
        colors = np.tile(self._edge_rgba(), (n, 1))
        widths = [EDGE_WIDTH] * n
        layer = self.pyramid_layer
        for region in self.selected:
            if region.layer == layer:
                i = region.row * self.pyramid.layer(layer).grid_shape[1] + region.col
                if i < n:
                    colors[i] = HIGHLIGHT_RGBA
                    widths[i] = HIGHLIGHT_WIDTH
        overlay.edge_color = colors
        overlay.edge_width = widths

    def _draw_comparison(self) -> None:
        if self.comparison is None:
            self.agreement_label.setText("")
            self._remove_layer("disagreement_layer")
            return
        parts = [
            f"layer {c.layer}: {100 * c.agreement:.0f}% ({c.n_agree}/{c.n_regions})" for c in self.comparison.layers
        ]
        other = self.token_state.compare_source() if self.token_state.compare_source else None
        other_name = other.name if other is not None else "?"
        self.agreement_label.setText(f"vs {other_name}: " + ", ".join(parts))
        image = self._shown_layer()
        if image is None:
            return
        comparison = self.comparison.layer(self.pyramid_layer)
        layer = self._ensure_shapes("disagreement_layer", DISAGREEMENT_NAME, image)
        words = [f"{a} -> {b}" for a, b in comparison.disagreeing_words]
        self._set_shapes(layer, comparison.disagreeing_boxes, words, edge_rgba=DISAGREE_RGBA,
                         show_text=True, text_color="magenta", attr="disagreement_layer")
        if len(words):
            layer.edge_width = [2.0] * len(words)

    def _on_pyramid_layer_changed(self, *_: object) -> None:
        self._draw_overlay()
        self._draw_comparison()

    # --- pointing ---------------------------------------------------------------------
    def _pointable_layer(self) -> Image | None:
        """The shown layer when the view is on the slice the pyramid was computed for."""
        layer = self._shown_layer()
        if layer is None or self.pyramid is None or layer not in self.viewer.layers or self.viewer.dims.ndisplay != 2:
            return None
        try:
            index, _ = current_slice(layer, self.viewer.dims.point)
        except ConfigError:
            return None
        return layer if index == self.pyramid_index else None

    def select_at(self, world_position: Sequence[float]) -> list[Region]:
        """List the words of the three pyramid layers at a world position and outline their regions.

        Called by the viewer's mouse-press callback. When the pyramid of the current slice is
        still being computed, the click is applied once it is ready.
        """
        if not self.token_state.following or self.pyramid is None:
            return []
        layer = self._pointable_layer()
        if layer is None:
            if self.busy or self._debounce.isActive():  # the pyramid of this slice is on its way
                self.token_state.pending_click = tuple(float(v) for v in world_position)
            return []
        row, col = pixel_at(layer, world_position)
        return self._show_hits(row, col)

    def _show_hits(self, row: int, col: int) -> list[Region]:
        assert self.pyramid is not None
        regions = self.pyramid.regions_at(row, col)
        if not regions:
            self.set_status(f"Pixel ({row}, {col}) is outside the image.")
            return []
        self.token_state.last_pixel = (row, col)
        self.token_state.selected = regions  # the list, the outlines and the highlight follow
        self.set_status(f"Words at pixel (row {row}, column {col}): " + ", ".join(r.word for r in regions))
        return regions

    def _on_selected(self, regions: list[Region]) -> None:
        self._fill_tree(regions)
        self._draw_selection()
        self._highlight_overlay()

    def _fill_tree(self, regions: list[Region]) -> None:
        tree = self.hits_tree
        tree.clear()
        for region in regions:
            y0, x0, y1, x1 = region.box
            item = QTreeWidgetItem([f"{region.layer} {LAYER_NAMES[region.layer]}", region.word,
                                    f"{region.distance:.3f}"])
            item.setToolTip(0, f"Region rows {y0}-{y1 - 1}, columns {x0}-{x1 - 1}; token id {region.token_id}")
            for alt in region.alternatives:
                QTreeWidgetItem(item, ["  alternative", alt.word, f"{alt.distance:.3f}"])
            tree.addTopLevelItem(item)
        tree.expandAll()
        for column in range(3):
            tree.resizeColumnToContents(column)

    def listed_words(self) -> list[tuple[str, list[str]]]:
        """What the list shows: per layer row, its word and its alternatives' words."""
        out = []
        for i in range(self.hits_tree.topLevelItemCount()):
            item = self.hits_tree.topLevelItem(i)
            out.append((item.text(1), [item.child(j).text(1) for j in range(item.childCount())]))
        return out

    def _draw_selection(self) -> None:
        image = self._shown_layer()
        if image is None or not self.selected:
            return
        layer = self._ensure_shapes("selection_layer", SELECTION_NAME, image)
        boxes = np.array([r.box for r in self.selected])
        self._set_shapes(layer, boxes, [r.word for r in self.selected], edge_rgba=HIGHLIGHT_RGBA, show_text=False)
        layer.edge_color = np.array([SELECTION_RGBA[r.layer] for r in self.selected])
        layer.edge_width = [HIGHLIGHT_WIDTH] * len(self.selected)

    def hover_at(self, world_position: Sequence[float]) -> str:
        """Show (and return) the words of the three layers under the cursor."""
        layer = self._pointable_layer()
        if layer is None or self.pyramid is None:
            return ""
        hits = self.pyramid.at(*pixel_at(layer, world_position))
        text = "  |  ".join(f"{h.layer}: {h.word}" for h in hits) if hits else "outside the image"
        self.hover_label.setText(text)
        return text

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
