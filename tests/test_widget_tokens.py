"""The Tokens dock widget: overlay, click-to-read, slice following, comparison, export."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from napari.utils.interactions import mouse_press_callbacks

from napari_langmamba.tokens import TokenPyramid, token_pyramid
from napari_langmamba.widgets.tokens import (
    CHAR_WIDTH_EM,
    DISAGREEMENT_NAME,
    OVERLAY_NAME,
    POINT_PX,
    SELECTION_NAME,
    TEXT_SIZE,
    WORDS_NAME,
    TokensWidget,
    WordColors,
    text_fits,
)

CODEBOOK = "random:64x8:5"
SCALE = (3.0, 0.75, 0.6)
TRANSLATE = (-20.0, 5.0, -7.0)


@pytest.fixture(scope="module")
def model():
    from napari_langmamba.models.codebook import load_codebook
    from napari_langmamba.models.langae import LangAE, LangAEConfig

    torch.manual_seed(1)
    codebook = load_codebook(CODEBOOK)
    return LangAE(LangAEConfig.preset("tiny", codebook_dim=codebook.d), codebook=codebook).eval()


def volume(seed: int = 0, shape=(3, 96, 112)) -> np.ndarray:
    z, h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    body = ((yy - h / 2) / (0.4 * h)) ** 2 + ((xx - w / 2) / (0.45 * w)) ** 2 < 1
    slices = [np.where(body, 40.0 + 200 * k, -1000.0) for k in range(z)]
    noise = np.random.default_rng(seed).normal(0, 30, shape)
    return (np.stack(slices) + noise).astype(np.float32)


@pytest.fixture
def setup(make_napari_viewer, qtbot, model):
    viewer = make_napari_viewer()
    image = viewer.add_image(volume(), name="low dose", scale=SCALE, translate=TRANSLATE)
    widget = TokensWidget(viewer)
    qtbot.addWidget(widget)
    widget.set_model(model, name="tiny")
    viewer.dims.set_current_step(0, 1)
    return viewer, image, widget


def wait_for(qtbot, widget, worker) -> None:
    """Wait until the widget's worker has finished (it may already have: results are cached)."""
    assert worker is not None
    qtbot.waitUntil(lambda: not widget.busy, timeout=30000)


def camera(viewer):
    return viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera


def world_of(row: float, col: float, z: int = 1) -> tuple[float, float, float]:
    return tuple(t + s * v for t, s, v in zip(TRANSLATE, SCALE, (z, row, col), strict=True))


def test_overlay_shows_the_regions_and_words_of_the_chosen_layer(setup, qtbot, model):
    viewer, image, widget = setup
    widget.pyramid_layer = 2
    wait_for(qtbot, widget, widget.show_tokens())
    assert widget.pyramid_index == (1,)
    expected = token_pyramid(model, image.data[1], cache=False)
    assert widget.pyramid.to_records() == expected.to_records()

    overlay = viewer.layers[OVERLAY_NAME]
    assert overlay is widget.overlay and overlay.nshapes == expected.layer(2).n_regions
    assert list(overlay.features["word"]) == expected.words(2)
    assert overlay.text.visible and list(overlay.text.values) == expected.words(2)
    np.testing.assert_allclose(overlay.scale, image.scale)
    np.testing.assert_allclose(overlay.translate, image.translate)
    # the rectangles sit on the computed slice and outline the boxes along pixel borders
    first = np.asarray(overlay.data[0])
    y0, x0, y1, x1 = expected.boxes(2)[0]
    assert (first[:, 0] == 1).all()
    assert first[:, 1].min() == y0 - 0.5 and first[:, 1].max() == y1 - 0.5
    assert first[:, 2].min() == x0 - 0.5 and first[:, 2].max() == x1 - 0.5

    camera(viewer).zoom = 1.0  # as on a 512-px slice: a 16-px region spans ~10 screen px
    widget.pyramid_layer = 3  # too dense for text at this zoom: boxes only, words on hover/click
    assert overlay.nshapes == expected.layer(3).n_regions and not overlay.text.visible
    assert widget.hover_at(world_of(40, 50)) == "  |  ".join(f"{h.layer}: {h.word}" for h in expected.at(40, 50))
    assert viewer.layers.selection.active is image  # drawing overlays does not steal the active layer


def test_a_click_lists_the_words_of_the_three_layers_at_that_point(setup, qtbot, model):
    viewer, image, widget = setup
    wait_for(qtbot, widget, widget.show_tokens())
    viewer.layers.selection.active = widget.overlay  # works whatever layer is active
    assert widget._mouse_press_callback in viewer.mouse_drag_callbacks

    def click(row: float, col: float, kind: str = "mouse_press") -> None:
        # napari's own dispatch of viewer-level mouse callbacks, with a world position
        mouse_press_callbacks(viewer, SimpleNamespace(type=kind, position=world_of(row, col), modifiers=()))

    expected = token_pyramid(model, image.data[1], top_k=widget.top_k, cache=False)
    for row, col in [(5, 7), (80, 100), (47.3, 63.6)]:
        click(row, col)
        pixel = (int(np.floor(row + 0.5)), int(np.floor(col + 0.5)))
        hits = expected.at(*pixel)
        assert widget.listed_words() == [(h.word, [a.word for a in h.alternatives]) for h in hits]
        assert len(widget.listed_words()) == 3 and all(len(alts) == 5 for _, alts in widget.listed_words())
        # the three regions are outlined
        selection = viewer.layers[SELECTION_NAME]
        assert selection.nshapes == 3
        boxes = [r.box for r in expected.regions_at(*pixel)]
        for shape, box in zip(selection.data, boxes, strict=True):
            assert np.asarray(shape)[:, 1].min() == box[0] - 0.5 and np.asarray(shape)[:, 2].max() == box[3] - 0.5
    # the region of the drawn layer is highlighted in the overlay
    widths = np.asarray(widget.overlay.edge_width)
    assert (widths > 1).sum() == 1

    before = widget.listed_words()
    click(5, 7, kind="mouse_release")  # not a press: ignored
    assert widget.listed_words() == before
    assert [r.box for r in widget.selected] == [r.box for r in expected.regions_at(47, 64)]
    click(-30, 7)  # outside the image: the list is kept
    assert widget.listed_words() == before


def test_the_widget_state_is_one_evented_object(setup, qtbot, model):
    """What the widget shows lives in ``token_state``; views (and tests) subscribe to its events."""
    from napari_langmamba.widgets.tokens import TokensState

    viewer, image, widget = setup
    state = widget.token_state
    assert isinstance(state, TokensState) and not state.following and state.pyramid is None
    assert state.model is model and state.model_spec == "<tiny>"
    pyramids, selections = [], []
    state.events.pyramid.connect(pyramids.append)
    state.events.selected.connect(selections.append)

    wait_for(qtbot, widget, widget.show_tokens())
    assert state.following and pyramids == [widget.pyramid] and state.pyramid is widget.pyramid
    assert state.pyramid_index == widget.pyramid_index == (1,) and state.source() is image
    assert state.computed_top_k == widget.top_k and state.computed_spec == "<tiny>"

    mouse_press_callbacks(viewer, SimpleNamespace(type="mouse_press", position=world_of(20, 30), modifiers=()))
    assert len(selections) == 1 and selections[0] is widget.selected and state.last_pixel == (20, 30)
    assert [r.word for r in selections[0]] == [w for w, _ in widget.listed_words()]  # the list follows the state

    widget._debounce.setInterval(1)
    viewer.dims.set_current_step(0, 2)
    qtbot.waitUntil(lambda: widget.pyramid_index == (2,) and not widget.busy, timeout=30000)
    assert len(pyramids) == 2 and pyramids[-1] is widget.pyramid
    # the clicked pixel is kept: its words are the new slice's
    assert len(selections) == 2 and state.last_pixel == (20, 30)
    assert [r.word for r in widget.selected] == [h.word for h in widget.pyramid.at(20, 30)]


def test_changing_slice_recomputes_in_a_worker(setup, qtbot, model):
    viewer, image, widget = setup
    wait_for(qtbot, widget, widget.show_tokens())
    widget._debounce.setInterval(1)
    viewer.dims.set_current_step(0, 2)
    qtbot.waitUntil(lambda: widget.pyramid_index == (2,) and not widget.busy, timeout=30000)
    expected = token_pyramid(model, image.data[2], cache=False)
    assert widget.pyramid.to_records() == expected.to_records()
    assert (np.asarray(widget.overlay.data[0])[:, 0] == 2).all()


def test_compare_reports_agreement_and_marks_disagreeing_regions(setup, qtbot, model):
    viewer, image, widget = setup
    viewer.add_image(volume(), name="same", scale=SCALE, translate=TRANSLATE)
    other = volume(seed=1)
    other[:, :48, :48] = 1800.0
    viewer.add_image(other, name="denoised", scale=SCALE, translate=TRANSLATE)
    viewer.layers.selection.active = image
    widget.set_image_layer("low dose")

    widget.compare_combo.setCurrentText("same")
    wait_for(qtbot, widget, widget.compare())
    assert widget.comparison.agreement == {1: 1.0, 2: 1.0, 3: 1.0}
    assert "layer 1: 100%" in widget.agreement_label.text() and "layer 3: 100%" in widget.agreement_label.text()
    assert viewer.layers[DISAGREEMENT_NAME].nshapes == 0

    widget.compare_combo.setCurrentText("denoised")
    wait_for(qtbot, widget, widget.compare())
    fine = widget.comparison.layer(3)
    expected = (token_pyramid(model, image.data[1], cache=False).layer(3).token_ids
                != token_pyramid(model, other[1], cache=False).layer(3).token_ids)
    assert fine.n_regions - fine.n_agree == expected.sum() > 0
    widget.pyramid_layer = 3
    assert viewer.layers[DISAGREEMENT_NAME].nshapes == expected.sum()
    assert f"layer 3: {100 * fine.agreement:.0f}%" in widget.agreement_label.text()


def test_export_writes_json_and_csv_and_controls_have_tooltips(setup, qtbot, tmp_path):
    viewer, image, widget = setup
    assert [name for name, control in widget.bound_controls.items() if not control.toolTip()] == []
    wait_for(qtbot, widget, widget.show_tokens())
    records = widget.pyramid.to_records()
    assert TokenPyramid.from_json(widget.export(tmp_path / "t.json")).to_records() == records
    assert TokenPyramid.from_csv(widget.export(tmp_path / "t.csv")).to_records() == records


def test_missing_default_weights_are_reported_not_raised(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    from napari_langmamba import session
    from napari_langmamba import tokens as tokens_module
    from napari_langmamba.widgets import tokens as widget_module

    monkeypatch.setattr(session, "DEFAULT_WEIGHTS_DIR", tmp_path / "none")
    attempts = []

    def counting_loader(*args, **kwargs):
        attempts.append(args)
        return tokens_module.load_token_model(*args, **kwargs)

    monkeypatch.setattr(widget_module, "load_token_model", counting_loader)
    viewer = make_napari_viewer()
    viewer.add_image(volume()[0], name="slice")
    widget = TokensWidget(viewer)
    qtbot.addWidget(widget)
    wait_for(qtbot, widget, widget.show_tokens())
    assert widget.pyramid is None and widget.state.value == "failed"
    assert "bundled default LangAE weights are not installed" in widget.status_label.text()
    widget._debounce.setInterval(1)
    viewer.add_image(volume()[1], name="another")  # no retry (and no new error) until Show tokens
    widget.set_image_layer("another")
    qtbot.wait(100)
    assert attempts == [("default",)] and not widget.busy


def test_a_checkpoint_folder_is_loaded_in_the_worker(make_napari_viewer, qtbot, tmp_path, model):
    from napari_langmamba.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "run" / "langae", model, kind="langae")
    viewer = make_napari_viewer()
    image = viewer.add_image(volume()[1], name="slice")
    widget = TokensWidget(viewer)
    qtbot.addWidget(widget)
    widget.set_model(model, name="tiny")
    assert widget.model_combo.currentText() == "loaded: tiny"
    widget.use_weights(tmp_path / "run")  # a folder holding a langae/ checkpoint
    assert widget.model is None and widget.model_combo.count() == 2
    wait_for(qtbot, widget, widget.show_tokens())
    assert widget.model is not None and widget.model is not model
    assert widget.pyramid.to_records() == token_pyramid(model, image.data, cache=False).to_records()


def areas_of(pyramid) -> dict[int, dict[str, int]]:
    """Pixels per word of each layer, counted pixel by pixel from ``at`` (independent of the legend code)."""
    h, w = pyramid.image_shape
    counts: dict[int, dict[str, int]] = {1: {}, 2: {}, 3: {}}
    for y in range(h):
        for x in range(w):
            for hit in pyramid.at(y, x):
                counts[hit.layer][hit.word] = counts[hit.layer].get(hit.word, 0) + 1
    return counts


def test_legend_lists_the_words_of_the_slice_by_area(setup, qtbot, model):
    viewer, image, widget = setup
    widget.pyramid_layer = 3
    wait_for(qtbot, widget, widget.show_tokens())
    expected = token_pyramid(model, image.data[1], top_k=0, cache=False)
    areas = areas_of(expected)
    for layer in (3, 2, 1):
        widget.pyramid_layer = layer
        rows = widget.legend_rows()
        counts = areas[layer]
        total = sum(counts.values())
        assert total == 96 * 112
        assert sorted(word for word, _, _ in rows) == sorted(counts)  # every word on the slice, once
        assert [share for _, share, _ in rows] == pytest.approx([counts[word] / total for word, _, _ in rows])
        shares = [share for _, share, _ in rows]
        assert shares == sorted(shares, reverse=True)  # largest area first
        assert sum(shares) == pytest.approx(1.0, abs=1e-12)
        table = widget.legend_table
        assert [table.item(r, 2).text() for r in range(table.rowCount())] == [f"{100 * s:.1f} %" for s in shares]
    assert widget.pyramid_layer == 1 and len(widget.legend_rows()) == len(set(expected.words(1)))


def test_each_word_has_one_colour_on_the_slice_and_keeps_it(setup, qtbot, model):
    viewer, image, widget = setup
    widget.pyramid_layer = 3
    wait_for(qtbot, widget, widget.show_tokens())
    expected = token_pyramid(model, image.data[1], cache=False)
    words_layer = viewer.layers[WORDS_NAME]
    assert words_layer is widget.words_layer
    # one slice, placed on the computed one: the colours show on slice 1 only
    assert words_layer.data.shape == (1, 96, 112)
    np.testing.assert_allclose(words_layer.data_to_world((0, 40, 50)), image.data_to_world((1, 40, 50)))
    labels = np.asarray(words_layer.data[0])
    colormap = words_layer.colormap
    color_of_word: dict[str, tuple] = {}
    for y in range(0, 96, 5):
        for x in range(0, 112, 5):
            word = expected.at(y, x)[2].word
            rgba = tuple(np.round(colormap.map(labels[y, x]).ravel(), 6))
            assert rgba[3] > 0
            assert color_of_word.setdefault(word, rgba) == rgba  # a word, one colour
    assert len(color_of_word) > 1
    assert len(set(color_of_word.values())) == len(color_of_word)  # different words, different colours
    for word, _, rgb in widget.legend_rows():  # the legend's swatches are the layer's colours
        if word in color_of_word:
            np.testing.assert_allclose(rgb, color_of_word[word][:3], atol=1 / 255)
    assert viewer.layers.index(words_layer) < viewer.layers.index(widget.overlay)  # outlines drawn on top
    assert viewer.layers.selection.active is image

    widget._debounce.setInterval(1)
    viewer.dims.set_current_step(0, 2)  # another slice: a word seen before keeps its colour
    qtbot.waitUntil(lambda: widget.pyramid_index == (2,) and not widget.busy, timeout=30000)
    np.testing.assert_allclose(words_layer.data_to_world((0, 40, 50)), image.data_to_world((2, 40, 50)))
    other = token_pyramid(model, image.data[2], cache=False)
    labels = np.asarray(words_layer.data[0])
    for y in range(0, 96, 5):
        for x in range(0, 112, 5):
            word = other.at(y, x)[2].word
            if word in color_of_word:
                assert tuple(np.round(words_layer.colormap.map(labels[y, x]).ravel(), 6)) == color_of_word[word]


def test_word_colours_are_distinct_for_many_words():
    colors = WordColors()
    words = [f"word{i}" for i in range(500)]
    colors.add(words[:300])
    colors.add(words)  # adding again keeps the first assignment
    rgb = {tuple(round(255 * v) for v in colors.rgba(w)[:3]) for w in words}
    assert len(rgb) == 500
    assert sorted(colors.labels.values()) == list(range(1, 501))
    assert colors.label("word0") == 1 and colors.label("word499") == 500


def test_text_fits_needs_room_for_every_letter():
    size = 10
    one_char = CHAR_WIDTH_EM * size * POINT_PX
    widths = np.array([100.0, 100.0, 100.0, 30.0])
    heights = np.array([100.0, 100.0, 5.0, 100.0])
    fits = text_fits(widths, heights, ["lung", "x" * int(100 / one_char) + "xx", "bone", "liver"], size)
    assert fits.tolist() == [True, False, False, False]


def test_words_are_written_only_where_they_fit_at_the_zoom(make_napari_viewer, qtbot, model):
    viewer = make_napari_viewer()
    # 100 x 150 px: the last row of fine regions is 4 px tall and the last column 6 px wide
    image = viewer.add_image(volume(shape=(1, 100, 150))[0], name="slice")
    widget = TokensWidget(viewer)
    qtbot.addWidget(widget)
    widget.set_model(model, name="tiny")
    widget.pyramid_layer = 3
    wait_for(qtbot, widget, widget.show_tokens())
    pyramid = widget.pyramid
    words = pyramid.words(3)
    boxes = pyramid.boxes(3)
    full_cell = ((boxes[:, 2] - boxes[:, 0]) == 16) & ((boxes[:, 3] - boxes[:, 1]) == 16)
    assert 0 < full_cell.sum() < len(words) and max(len(w) for w in words) <= 5

    cam = camera(viewer)

    def zoom_to(zoom: float, expected: list[str]) -> None:  # the words are re-fitted once the zoom pauses
        cam.zoom = zoom
        qtbot.waitUntil(lambda: widget.shown_words() == expected, timeout=5000)

    zoom_to(20.0, words)  # every region is 80+ screen px: every word is written
    assert widget.overlay.text.visible
    # 16-px regions are 48 screen px wide (a 5-letter word at 8 pt needs ~37), the 4-6 px ones 12-18
    zoom_to(3.0, [w if fits else "" for w, fits in zip(words, full_cell, strict=True)])
    assert widget.overlay.text.visible
    zoom_to(1.0, [""] * len(words))  # 16 screen px per region: nothing fits, no text at all
    assert not widget.overlay.text.visible
    assert list(widget.overlay.features["word"]) == words  # hover and click still read every word

    # text colour: white over air; black everywhere once the window makes the whole slice white
    air = [(image.data[y0:y1, x0:x1] < -500).all() for y0, x0, y1, x1 in boxes]
    colors = list(widget.overlay.features["text_color"])
    assert any(air) and all(c == "white" for c, a in zip(colors, air, strict=True) if a)
    image.contrast_limits = (-3000.0, -2000.0)
    widget.pyramid_layer = 1  # quadrants: 50 x 75 screen px at zoom 1, room for a word at 14 pt
    assert widget.shown_words() == pyramid.words(1)
    assert set(widget.overlay.features["text_color"]) == {"black"}
    assert TEXT_SIZE[1] > TEXT_SIZE[3]
