"""When the Tokens widget computes, and what it does with a result.

:class:`TokenComputation` is mixed into :class:`~napari_langmamba.widgets.tokens.TokensWidget`.
Once Show tokens (or Compare) was pressed, slice and layer changes recompute the pyramid of
the current slice in a worker, debounced and only when the shown one is not current
(:meth:`~napari_langmamba.widgets._tokens_core.TokensState.is_current`); a request made while
a worker runs waits for it. A result is shown only while its layer is still in the viewer; a
click made before it arrived is applied then. A failure stops the following, so a slider
drag does not repeat the same error.
"""

from __future__ import annotations

import weakref
from functools import partial
from typing import Any

from napari.layers import Image
from qtpy.QtCore import QTimer

from napari_langmamba.errors import ConfigError
from napari_langmamba.session import current_slice, require_axial_view
from napari_langmamba.tokens import TokenPyramid
from napari_langmamba.widgets._tokens_core import TokensState

NO_LAYER = "(none)"


class TokenComputation:
    """Scheduling, running and receiving the token computations (mixed into ``TokensWidget``).

    It reads the widget's ``viewer``, ``token_state``, ``image_layer``, ``top_k``, ``model``,
    ``compare_combo``, ``agreement_label``, ``_layer_named()``, its worker methods
    (``busy``, ``run_generator``) and ``_work`` (the computation the worker runs), and calls the
    drawing of :class:`~napari_langmamba.widgets._tokens_overlay.TokenOverlays`.
    """

    token_state: TokensState
    _debounce: QTimer

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
        compare_with = self._layer_named(self.compare_combo.currentText())
        if not self.token_state.is_current(layer, index, self.top_k, compare_with):
            self.refresh()

    def _shown_layer(self) -> Image | None:
        return self.token_state.shown_layer()

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
        self.token_state.stop_comparing()
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

    def _on_failed(self, error: BaseException) -> None:
        # stop following the slice: every slider step would otherwise repeat the same error
        self.token_state.stop_following()

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
        self.token_state.show(pyramid, index, layer_ref, other, other_ref)
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
