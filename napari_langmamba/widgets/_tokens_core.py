"""The Tokens widget's GUI-free pieces: its evented state and the maths of its overlays.

Where a click lands (:func:`pixel_at`), where a region's rectangle goes on an nD layer
(:func:`rectangles`), whether a word fits its box at a zoom (:func:`text_fits`,
:func:`screen_pixels_per_pixel`) and which text colour reads on a region
(:func:`region_text_colors`) are computed here from numbers and layer models only, so they are
tested without a window; no Qt is imported.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from psygnal import evented

from napari_langmamba.tokens import PyramidComparison, Region, TokenPyramid, box_corners, compare_pyramids

if TYPE_CHECKING:
    from napari.layers import Image

TEXT_SIZE = {1: 14, 2: 10, 3: 8}  # points; readable at the default zoom of a 512 x 512 slice
TEXT_COLORS = ("white", "black")  # on dark / light regions (the CT in its window, tinted by the word colour)
# Text extent estimate (vispy draws text in points at 96 dpi): width of a character and height
# of a line, in font sizes, plus a margin (px) kept free on each side of a word inside its box.
POINT_PX = 96 / 72
CHAR_WIDTH_EM = 0.62
LINE_HEIGHT_EM = 1.25
TEXT_MARGIN_PX = 2.0


def pixel_at(layer: Image, world_position: Sequence[float]) -> tuple[int, int]:
    """``(row, col)`` pixel of ``layer``'s slice under a world position (nearest pixel centre)."""
    data = np.asarray(layer.world_to_data(np.asarray(world_position, dtype=float)))
    row, col = np.floor(data[-2:] + 0.5).astype(int)
    return int(row), int(col)



def rectangles(boxes: np.ndarray, index: tuple[int, ...]) -> list[np.ndarray]:
    """Boxes (n, 4) -> napari rectangles (4 corners) placed on slice ``index`` of an nD layer."""
    lead = np.asarray(index, dtype=float)
    return [np.column_stack([np.tile(lead, (4, 1)), box_corners(box)]) for box in boxes]


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



def region_text_colors(
    hu: np.ndarray,
    contrast_limits: Sequence[float],
    row_edges: np.ndarray,
    col_edges: np.ndarray,
    word_rgb: np.ndarray,
    alpha: float,
) -> list[str]:
    """Black or white text per region (row-major): whichever reads on the region as shown.

    The shade of a region is its mean grey of ``hu`` (rows, cols) in ``contrast_limits``, tinted
    at opacity ``alpha`` by its word colour ``word_rgb`` (n_regions, 3; RGB in [0, 1]). The
    regions are the cells between consecutive ``row_edges`` and ``col_edges``.
    """
    lo, hi = (float(v) for v in contrast_limits)
    grey = np.clip((hu - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    sums = np.add.reduceat(np.add.reduceat(grey, row_edges[:-1], axis=0), col_edges[:-1], axis=1)
    mean = (sums / np.outer(np.diff(row_edges), np.diff(col_edges))).ravel()
    tint = np.asarray(word_rgb).reshape(-1, 3) @ np.array([0.2126, 0.7152, 0.0722])  # relative luminance
    shade = (1.0 - alpha) * mean + alpha * tint
    return [TEXT_COLORS[int(v > 0.5)] for v in shade]


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

    def shown_layer(self) -> Image | None:
        """The layer the shown pyramid is of, while it exists."""
        return self.source() if self.source else None

    def compared_layer(self) -> Image | None:
        """The layer the comparison is with, while it exists."""
        return self.compare_source() if self.compare_source else None

    def is_current(self, layer: Image, index: tuple[int, ...], top_k: int, compare_with: Image | None) -> bool:
        """Whether the pyramid shown is of ``layer``'s slice ``index`` with these settings.

        When comparing, the comparison must also be with ``compare_with``; anything else asks for
        a recomputation.
        """
        return (
            self.pyramid is not None and layer is self.shown_layer() and index == self.pyramid_index
            and self.computed_top_k == top_k and self.computed_spec == self.model_spec
            and (not self.comparing or (compare_with is not None and self.compared_layer() is compare_with))
        )

    def show(
        self,
        pyramid: TokenPyramid,
        index: tuple[int, ...],
        source: weakref.ref,
        other: TokenPyramid | None = None,
        other_source: weakref.ref | None = None,
    ) -> None:
        """Show ``pyramid`` of ``source()`` at slice ``index``, compared with ``other`` when given."""
        self.pyramid = pyramid
        self.pyramid_index = index
        self.source = source
        self.comparison = None
        self.compare_pyramid = None
        if other is not None and other_source is not None and other_source() is not None:
            self.compare_pyramid = other
            self.compare_source = other_source
            self.comparison = compare_pyramids(pyramid, other)

    def stop_comparing(self) -> None:
        self.comparing = False
        self.comparison = None
        self.compare_pyramid = None

    def stop_following(self) -> None:
        """Forget what waits for the next computation, and follow no more slice changes."""
        self.following = False
        self.refresh_pending = False
        self.pending_click = None

