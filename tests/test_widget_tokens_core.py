"""The Tokens widget's GUI-free pieces (state, overlay maths) and the shared viewer helpers, without Qt."""

from __future__ import annotations

import weakref
from types import SimpleNamespace

import numpy as np
import pytest

from napari_langmamba.tokens import box_corners
from napari_langmamba.widgets import _tokens_core
from napari_langmamba.widgets._tokens_core import (
    TEXT_COLORS,
    TokensState,
    pixel_at,
    rectangles,
    region_text_colors,
    screen_pixels_per_pixel,
)
from napari_langmamba.widgets._viewer import (
    call_weakly,
    remove_callback,
    slice_transform_kwargs,
    transform_kwargs,
    viewer_camera,
    viewer_grid,
)

WHITE, BLACK = TEXT_COLORS


def _image(**transform):
    from napari.layers import Image

    return Image(np.zeros((4, 6, 8), dtype=np.float32), **transform)


def test_pixel_at_rounds_to_the_nearest_pixel_centre_through_the_transform():
    layer = _image(scale=(2.0, 0.5, 0.25), translate=(1.0, 10.0, -4.0))
    assert pixel_at(layer, (5.0, 10.0 + 0.5 * 3.4, -4.0 + 0.25 * 5.6)) == (3, 6)
    assert pixel_at(layer, (5.0, 10.0 - 0.5 * 0.6, -4.0)) == (-1, 0)


def test_rectangles_sit_on_the_slice_with_the_box_corners():
    boxes = np.array([[0, 0, 4, 8], [2, 3, 6, 5]])
    rects = rectangles(boxes, (3,))
    assert len(rects) == 2 and all(r.shape == (4, 3) for r in rects)
    for rect, box in zip(rects, boxes, strict=True):
        assert np.all(rect[:, 0] == 3)
        np.testing.assert_array_equal(rect[:, 1:], box_corners(box))
    assert rectangles(boxes, ())[1].shape == (4, 2)


def test_screen_pixels_per_pixel_follow_the_scale_and_the_zoom():
    layer = _image(scale=(2.0, 0.5, 0.25))
    assert screen_pixels_per_pixel(layer, 4.0) == pytest.approx((2.0, 1.0))


def test_region_text_colors_read_on_the_grey_tinted_by_the_word_colour():
    hu = np.zeros((4, 4), dtype=np.float32)
    hu[:, 2:] = 1000.0  # left column of regions dark, right bright
    edges = np.array([0, 2, 4])
    no_tint = np.zeros((4, 3))
    assert region_text_colors(hu, (0, 1000), edges, edges, no_tint, 0.0) == [WHITE, BLACK, WHITE, BLACK]
    yellow = np.tile([1.0, 1.0, 0.0], (4, 1))  # luminance 0.93: a strong tint lightens the dark regions
    assert region_text_colors(hu, (0, 1000), edges, edges, yellow, 0.9) == [BLACK] * 4
    # a window below the slice's values: everything is white on screen
    assert region_text_colors(hu, (-2000, -1000), edges, edges, no_tint, 0.0) == [BLACK] * 4


def test_slice_transform_puts_a_one_slice_layer_on_its_slice():
    layer = _image(scale=(2.0, 0.5, 0.25), translate=(1.0, 10.0, -4.0), rotate=30.0)
    kwargs = slice_transform_kwargs(layer, (2,))
    from napari.layers import Image

    one = Image(np.zeros((1, 6, 8), dtype=np.float32), **kwargs)
    for point in ([0, 0, 0], [0, 3, 5]):
        expected = layer.data_to_world([2, *point[1:]])
        np.testing.assert_allclose(one.data_to_world(point), expected, atol=1e-9)
    np.testing.assert_array_equal(slice_transform_kwargs(layer, ())["translate"], transform_kwargs(layer)["translate"])


def test_tokens_state_knows_when_its_pyramid_is_current(monkeypatch):
    layer, other = _image(), _image()
    state = TokensState(model_spec="default")
    assert not state.is_current(layer, (0,), 5, None) and state.shown_layer() is None
    calls = []
    monkeypatch.setattr(_tokens_core, "compare_pyramids", lambda a, b: calls.append((a, b)) or "comparison")
    pyramid, other_pyramid = object(), object()
    state.computed_top_k, state.computed_spec = 5, "default"
    state.show(pyramid, (1,), weakref.ref(layer))
    assert state.shown_layer() is layer and state.comparison is None and calls == []
    assert state.is_current(layer, (1,), 5, None)
    assert not state.is_current(layer, (2,), 5, None) and not state.is_current(other, (1,), 5, None)
    assert not state.is_current(layer, (1,), 3, None)
    state.comparing = True  # comparing: the comparison must be with the chosen layer
    assert not state.is_current(layer, (1,), 5, other)
    state.show(pyramid, (1,), weakref.ref(layer), other_pyramid, weakref.ref(other))
    assert calls == [(pyramid, other_pyramid)] and state.comparison == "comparison"
    assert state.compared_layer() is other and state.compare_pyramid is other_pyramid
    assert state.is_current(layer, (1,), 5, other) and not state.is_current(layer, (1,), 5, None)
    state.stop_comparing()
    assert not state.comparing and state.comparison is None and state.compare_pyramid is None
    state.following, state.refresh_pending, state.pending_click = True, True, (1.0, 2.0)
    state.stop_following()
    assert (state.following, state.refresh_pending, state.pending_click) == (False, False, None)


def test_tokens_state_emits_a_new_pyramid_even_when_equal():
    state = TokensState()
    seen = []
    state.events.pyramid.connect(seen.append)
    a, b = [1], [1]  # equal, not identical
    state.pyramid = a
    state.pyramid = b
    assert len(seen) == 2 and seen[1] is b


def test_call_weakly_skips_a_gone_or_deleted_target():
    calls = []

    class Target:
        def hit(self, *args):
            calls.append(args)

        def deleted(self):
            raise RuntimeError("wrapped C/C++ object has been deleted")

    target = Target()
    ref = weakref.ref(target)
    call_weakly(ref, "hit", 1, 2)
    call_weakly(ref, "deleted")
    del target
    call_weakly(ref, "hit", 3)
    assert calls == [(1, 2)]


def test_remove_callback_is_idempotent():
    def callback():
        pass

    callbacks = [callback]
    remove_callback(callbacks, callback, "ignored signal argument")
    remove_callback(callbacks, callback)
    assert callbacks == []


def test_camera_and_grid_are_found_in_either_napari_layout():
    old = SimpleNamespace(camera="old camera", grid="old grid")
    new = SimpleNamespace(scene=SimpleNamespace(camera="camera"), canvas=SimpleNamespace(grid="grid"))
    assert (viewer_camera(old), viewer_grid(old)) == ("old camera", "old grid")
    assert (viewer_camera(new), viewer_grid(new)) == ("camera", "grid")
