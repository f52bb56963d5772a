"""How the Tokens widget draws: word colours, the napari layers it owns, the legend and the list.

:class:`WordColors` gives each distinct word a label and a colour for the widget's life.
:class:`TokenOverlays` is the part of :class:`~napari_langmamba.widgets.tokens.TokensWidget`
that keeps its layers ("Token words" Labels, the "Tokens", "Token selection" and
"Token disagreement" Shapes) in step with its :class:`~napari_langmamba.widgets._tokens_core.TokensState`,
writes each word where it fits at the current zoom, fills the legend and the list of clicked
words, and turns clicks and hovers into selected regions. The maths it uses are in
:mod:`napari_langmamba.widgets._tokens_core`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from napari.layers import Image, Labels, Shapes
from napari.utils.colormaps import DirectLabelColormap
from qtpy.QtCore import Qt
from qtpy.QtGui import QColor
from qtpy.QtWidgets import QTableWidgetItem, QTreeWidgetItem

from napari_langmamba.errors import ConfigError
from napari_langmamba.session import current_slice
from napari_langmamba.tokens import LAYER_NAMES, Region, WordArea
from napari_langmamba.widgets._tokens_core import (
    TEXT_COLORS,
    TEXT_SIZE,
    pixel_at,
    rectangles,
    region_text_colors,
    screen_pixels_per_pixel,
    text_fits,
)
from napari_langmamba.widgets._viewer import slice_transform_kwargs, transform_kwargs, viewer_camera

OVERLAY_NAME = "Tokens"
SELECTION_NAME = "Token selection"
DISAGREEMENT_NAME = "Token disagreement"
WORDS_NAME = "Token words"
WORDS_OPACITY = 0.45  # the colours tint the CT; the anatomy stays readable underneath
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



class TokenOverlays:
    """The drawing and pointing half of the Tokens widget (mixed into ``TokensWidget``).

    It reads the widget's ``viewer``, ``token_state``, ``pyramid_layer`` and its controls
    (``legend_table``, ``hits_tree``, ``hover_label``, ``agreement_label``), and owns the
    layers it draws: ``overlay``, ``selection_layer``, ``disagreement_layer``, ``words_layer``.
    """

    overlay: Shapes | None
    selection_layer: Shapes | None
    disagreement_layer: Shapes | None
    words_layer: Labels | None
    word_colors: WordColors
    legend: list[WordArea]
    """The words of the drawn pyramid layer on the slice, largest area first."""
    _text_boxes: dict[str, tuple[np.ndarray, list[str], float]]

    def _init_overlays(self) -> None:
        self.overlay = None
        self.selection_layer = None
        self.disagreement_layer = None
        self.words_layer = None
        self.word_colors = WordColors()
        self.legend = []
        self._text_boxes = {}

    # --- overlays ---------------------------------------------------------------------
    def _ensure_shapes(self, attr: str, name: str, image: Image) -> Shapes:
        layer = getattr(self, attr)
        if layer is None or layer not in self.viewer.layers or layer.ndim != image.ndim:
            if layer is not None and layer in self.viewer.layers:
                self.viewer.layers.remove(layer)
            active = self.viewer.layers.selection.active
            layer = self.viewer.add_shapes(
                ndim=image.ndim, name=name, face_color="transparent", edge_color="yellow",
                **transform_kwargs(image),
            )
            layer.editable = False
            setattr(self, attr, layer)
            if active is not None and active in self.viewer.layers:  # adding a layer must not steal focus
                self.viewer.layers.selection.active = active
        else:
            for key, value in transform_kwargs(image).items():
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
        layer.data = (rectangles(boxes, self.pyramid_index or ()), ["rectangle"] * n)
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
        per_row, per_col = screen_pixels_per_pixel(image, viewer_camera(self.viewer).zoom)
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
        """Black or white text per region of ``layer``: whichever reads on the region as shown."""
        assert self.pyramid is not None
        tl = self.pyramid.layer(layer)
        data = image.data[0] if image.multiscale else image.data
        hu = np.asarray(data[self.pyramid_index or ()], dtype=np.float32)
        if hu.shape != self.pyramid.image_shape:
            return [TEXT_COLORS[0]] * tl.n_regions
        rgb = np.array([self.word_colors.rgba(w)[:3] for w in self.pyramid.words(layer)]).reshape(-1, 3)
        words_layer = self.words_layer
        alpha = words_layer.opacity if words_layer is not None and words_layer.visible else 0.0
        return region_text_colors(hu, image.contrast_limits, tl.row_edges, tl.col_edges, rgb, alpha)

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
        kwargs = slice_transform_kwargs(image, self.pyramid_index or ())
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
        other = self.token_state.compared_layer()
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

