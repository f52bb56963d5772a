"""The Compare widget's side-by-side view: napari's grid, difference layers, ROI copies, and back.

:class:`SideBySide` is mixed into :class:`~napari_langmamba.widgets.compare.CompareWidget`.
Entering the grid saves what it changes (:class:`ViewState`: layer order, visibility,
selection, grid and camera), shows before / after / reference and their differences with an
ROI layer over each cell (moving one ROI moves all), and links the images' contrast limits;
leaving restores the saved view exactly and removes what it added.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from napari.layers import Image, Layer, Shapes

from napari_langmamba.compare import slice_of, symmetric_limits
from napari_langmamba.widgets._compare_core import METADATA_KEY, ROI_LAYER_NAME, lazy_difference
from napari_langmamba.widgets._viewer import viewer_camera, viewer_grid


@dataclass
class ViewState:
    """What side-by-side mode changes, saved to be restored exactly."""

    layers: list[Layer]
    visible: dict[int, bool]  # id(layer) -> visible
    selected: list[Layer]
    active: Layer | None
    grid: dict[str, Any]
    camera: dict[str, Any]


class SideBySide:
    """The grid comparison of the Compare widget (mixed into ``CompareWidget``).

    It reads the widget's ``viewer``, ``grid_button``, ``chosen_layers()``, ``current_window()``,
    ``current_slice_index()``, ``add_roi()`` and ``schedule_update()``, and owns
    ``difference_layers`` and ``roi_copies`` while the grid is shown.
    """

    roi_layer: Shapes | None
    difference_layers: list[Image]
    roi_copies: list[Shapes]
    _saved_view: ViewState | None
    _linked: list[Image]
    _syncing_rois: bool

    def _init_side_by_side(self) -> None:
        self.difference_layers = []
        self.roi_copies = []
        """In side-by-side mode: the ROI drawn over every grid cell but the first (which has ``roi_layer``)."""
        self._syncing_rois = False
        self._saved_view = None
        self._linked = []

    @property
    def side_by_side(self) -> bool:
        return self._saved_view is not None

    def set_side_by_side(self, enabled: bool) -> None:
        """Switch the grid comparison on (saving the view) or off (restoring it)."""
        if enabled == self.side_by_side:
            return
        self.grid_button.blockSignals(True)
        try:
            if enabled:
                self._enter_grid()
            else:
                self._leave_grid()
        finally:
            self.grid_button.setChecked(self.side_by_side)
            self.grid_button.blockSignals(False)

    def _on_grid_toggled(self, checked: bool) -> None:
        try:
            self.set_side_by_side(checked)
        except Exception as exc:
            self.report_error(exc, context="Side-by-side view")

    def _save_view(self) -> ViewState:
        viewer = self.viewer
        camera = viewer_camera(viewer)
        return ViewState(
            layers=list(viewer.layers),
            visible={id(layer): layer.visible for layer in viewer.layers},
            selected=list(viewer.layers.selection),
            active=viewer.layers.selection.active,
            grid={k: getattr(viewer_grid(viewer), k) for k in ("enabled", "shape", "stride", "spacing")},
            camera={
                "center": tuple(camera.center),
                "zoom": float(camera.zoom),
                "angles": tuple(camera.angles),
                "perspective": float(camera.perspective),
            },
        )

    def _enter_grid(self) -> None:
        chosen = self.chosen_layers()
        window = self.current_window()
        viewer = self.viewer
        state = self._save_view()
        images = [chosen[r] for r in ("before", "after", "reference") if r in chosen]
        differences = self._make_differences(chosen)
        try:
            cells = [*images, *differences]
            rois = [self.add_roi(), *self._make_roi_copies(cells[1:])]
            for layer in viewer.layers:
                layer.visible = False
            # Two layers per grid cell (stride 2), at the bottom of the list in cell order: each image
            # with an ROI layer over it: before, after, reference, then the differences.
            for k, (image, roi) in enumerate(zip(cells, rois, strict=True)):
                for offset, layer in enumerate((image, roi)):
                    viewer.layers.move(viewer.layers.index(layer), 2 * k + offset)
                    layer.visible = True
            images[0].contrast_limits = window.limits
            for layer in images[1:]:
                layer.contrast_limits = window.limits
            viewer.layers.link_layers(images, ("contrast_limits",))
            self._linked = images
            viewer_grid(viewer).update(
                {"enabled": True, "stride": 2, "shape": (2 if differences else 1, len(images)), "spacing": 0.02}
            )
            viewer.layers.selection.active = images[0]
        except Exception:
            self._saved_view = state
            self._leave_grid()
            raise
        self._saved_view = state
        viewer.reset_view()
        self.set_status("Side by side: one camera, one slice, linked window. Press again to go back.")

    def _make_differences(self, chosen: dict[str, Image]) -> list[Image]:
        after = chosen["after"]
        index = self.current_slice_index(after)
        pairs = [("before", chosen["before"])] + ([("reference", chosen["reference"])] if "reference" in chosen else [])
        created = []
        for role, other in pairs:
            difference = lazy_difference(after.data, other.data)  # napari computes the slice on screen only
            shown = slice_of(after.data, index) - slice_of(other.data, index)
            layer = self.viewer.add_image(
                difference,
                name=f"{after.name} - {other.name}",
                colormap="bwr",
                contrast_limits=symmetric_limits(shown),
                scale=after.scale,
                translate=after.translate,
                metadata={METADATA_KEY: f"after - {role}"},
            )
            created.append(layer)
        self.difference_layers = created
        return created

    def _make_roi_copies(self, cells: list[Image]) -> list[Shapes]:
        """One Shapes layer per cell in ``cells`` showing the ROI (and background ROI) of :attr:`roi_layer`."""
        roi = self.roi_layer
        copies = []
        for cell in cells:
            copy = self.viewer.add_shapes(
                name=f"{ROI_LAYER_NAME} ({cell.name})",
                scale=roi.scale,
                translate=roi.translate,
                face_color="transparent",
                metadata={METADATA_KEY: "roi copy"},
            )
            copy.events.data.connect(self._on_roi_data)
            copies.append(copy)
        self.roi_copies = copies
        self._sync_rois(roi)
        for copy in copies:
            copy.mode = "select"
        return copies

    def _on_roi_data(self, event: Any = None) -> None:
        source = getattr(event, "source", None)
        if isinstance(source, Shapes):
            self._sync_rois(source)

    def _sync_rois(self, source: Shapes) -> None:
        """Give every ROI layer of the grid the rectangles of ``source``: moving one moves all."""
        if self._syncing_rois or not self.roi_copies:
            return
        layers = [layer for layer in (self.roi_layer, *self.roi_copies) if layer is not None]
        if source not in layers:
            return
        data = [np.asarray(v, dtype=float) for v in source.data]
        colours = np.asarray(source.edge_color)
        widths = list(source.edge_width)
        self._syncing_rois = True
        try:
            for layer in layers:
                if layer is source:
                    continue
                same = len(layer.data) == len(data) and all(
                    np.array_equal(a, b) for a, b in zip(layer.data, data, strict=True)
                )
                if same:
                    continue
                layer.selected_data = set()
                layer.data = []
                if data:
                    layer.add_rectangles(data, edge_color=list(colours), edge_width=widths)
        finally:
            self._syncing_rois = False
        if source is not self.roi_layer and self.roi_layer is not None:
            self.schedule_update()  # the master ROI changed without an event of its own

    def _leave_grid(self) -> None:
        state = self._saved_view
        viewer = self.viewer
        if self._linked:
            present = [layer for layer in self._linked if layer in viewer.layers]
            if len(present) > 1:
                viewer.layers.unlink_layers(present, ("contrast_limits",))
            self._linked = []
        for layer in [*self.difference_layers, *self.roi_copies]:
            if layer in viewer.layers:
                viewer.layers.remove(layer)
        self.difference_layers = []
        self.roi_copies = []
        if state is None:
            return
        self._saved_view = None
        viewer_grid(viewer).update(state.grid)
        # restore the previous order of the layers still present; layers added since stay on top
        previous = [layer for layer in state.layers if layer in viewer.layers]
        for target, layer in enumerate(previous):
            current = viewer.layers.index(layer)
            if current != target:
                viewer.layers.move(current, target)
        for layer in previous:
            layer.visible = state.visible[id(layer)]
        viewer.layers.selection.clear()
        viewer.layers.selection.update([layer for layer in state.selected if layer in viewer.layers])
        if state.active is not None and state.active in viewer.layers:
            viewer.layers.selection.active = state.active
        viewer_camera(viewer).update(state.camera)
        self.set_status("Back to the single view.")
