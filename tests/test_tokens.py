"""The token pyramid core: words per region, region boxes, comparison, export, loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_langmamba import session
from napari_langmamba.errors import CheckpointError, ConfigError
from napari_langmamba.tokens import (
    TokenPyramid,
    box_corners,
    clear_cache,
    compare_pyramids,
    latent_blocks,
    load_token_model,
    model_normalization,
    token_pyramid,
    world_to_pixel,
)
from napari_langmamba.windowing import MODEL_NORMALIZATION, Normalization

CODEBOOK = "random:64x8:3"
STRIDES = (16, 4, 1)


@pytest.fixture(scope="module")
def model():
    from napari_langmamba.models.codebook import load_codebook
    from napari_langmamba.models.langae import LangAE, LangAEConfig

    torch.manual_seed(0)
    codebook = load_codebook(CODEBOOK)
    return LangAE(LangAEConfig.preset("tiny", codebook_dim=codebook.d), codebook=codebook).eval()


def phantom(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Air around an elliptic soft-tissue body with a bright 'spine' and noise, in HU."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    body = ((yy - h / 2) / (0.42 * h)) ** 2 + ((xx - w / 2) / (0.45 * w)) ** 2 < 1
    spine = ((yy - 0.7 * h) / (0.08 * h)) ** 2 + ((xx - w / 2) / (0.08 * w)) ** 2 < 1
    hu = np.where(body, 40.0, -1000.0) + np.where(spine, 660.0, 0.0)
    return (hu + np.random.default_rng(seed).normal(0, 40, shape)).astype(np.float32)


def quantize_directly(model, hu: np.ndarray):
    """The quantizer's own output for a slice padded (bottom/right, reflect) to a multiple of 16."""
    h, w = hu.shape
    padded = np.pad(hu, ((0, -h % 16), (0, -w % 16)), mode="reflect")
    x = torch.from_numpy(MODEL_NORMALIZATION.to_model(padded).astype(np.float32))[None, None]
    with torch.no_grad():
        return model.quantize(model.encode(x))


@pytest.mark.parametrize("shape", [(256, 256), (200, 330)])
def test_words_at_a_pixel_are_those_of_the_region_holding_it(model, shape):
    hu = phantom(shape)
    pyramid = token_pyramid(model, hu, top_k=3, cache=False)
    out = quantize_directly(model, hu)
    words = model.codebook.words
    assert len(set(pyramid.words(3))) > 1, "a test slice with a single word could not catch a wrong region"
    checked = 0
    for y in range(0, shape[0], 7):
        for x in range(0, shape[1], 11):
            hits = pyramid.at(y, x)
            assert [h.layer for h in hits] == [1, 2, 3]
            for hit, ids, (rows, cols), stride in zip(hits, out.ids, out.positions, STRIDES, strict=True):
                # the region of a position is the block of latent cells [i * stride, (i + 1) * stride)
                r = min((y // 16) // stride, len(rows) - 1)
                c = min((x // 16) // stride, len(cols) - 1)
                assert hit.word == words[int(ids[0, r, c])]
                region = pyramid.regions_at(y, x)[hit.layer - 1]
                assert (region.row, region.col) == (r, c)
                y0, x0, y1, x1 = region.box
                assert y0 <= y < y1 and x0 <= x < x1
                # the latent position the token was quantized at lies in its region
                assert y0 <= int(rows[r]) * 16 < y1 and x0 <= int(cols[c]) * 16 < x1
                checked += 1
    assert checked > 300
    assert pyramid.at(-1, 0) == [] and pyramid.at(0, shape[1]) == []


def test_distances_and_alternatives_come_from_the_quantized_residual(model):
    hu = phantom((128, 160))
    pyramid = token_pyramid(model, hu, top_k=4, cache=False)
    out = quantize_directly(model, hu)
    for layer in (1, 2, 3):
        tl = pyramid.layer(layer)
        np.testing.assert_array_equal(tl.token_ids, out.ids[layer - 1][0].numpy())
        np.testing.assert_allclose(tl.distances**2, out.distances[layer - 1][0].numpy(), rtol=1e-3, atol=1e-4)
        assert tl.alternative_ids.shape == (*tl.grid_shape, 4)
        assert not (tl.alternative_ids == tl.token_ids[..., None]).any()  # the chosen word is not an alternative
        assert (np.diff(tl.alternative_distances, axis=-1) >= -1e-5).all()  # nearest first
        assert (tl.alternative_distances >= tl.distances[..., None] - 1e-4).all()  # chosen is the nearest
        # check one alternative distance by hand against the residual the layer quantized
        residual = out.layer_embeddings[layer - 1][0, :, 0, 0]
        alt = int(tl.alternative_ids[0, 0, 0])
        expected = float((residual - model.codebook.embeddings[alt]).norm())
        assert tl.alternative_distances[0, 0, 0] == pytest.approx(expected, rel=1e-4)
    region = pyramid.regions(2)[0]
    assert [a.word for a in region.alternatives] == model.codebook.decode(pyramid.layer(2).alternative_ids[0, 0])


@pytest.mark.parametrize("shape", [(256, 256), (250, 230), (37, 301), (16, 48), (200, 17)])
def test_region_boxes_tile_the_image(model, shape):
    pyramid = token_pyramid(model, phantom(shape), top_k=1, cache=False)
    assert pyramid.image_shape == shape
    assert pyramid.padding == ((0, -shape[0] % 16), (0, -shape[1] % 16))
    for layer in (1, 2, 3):
        boxes = pyramid.boxes(layer)
        assert len(boxes) == pyramid.layer(layer).n_regions == len(pyramid.words(layer))
        coverage = np.zeros(shape, dtype=np.int32)
        for y0, x0, y1, x1 in boxes:
            assert 0 <= y0 < y1 <= shape[0] and 0 <= x0 < x1 <= shape[1]
            coverage[y0:y1, x0:x1] += 1
        assert (coverage == 1).all(), f"layer {layer}: gaps or overlaps"


def test_region_sizes_on_a_full_latent(model):
    pyramid = token_pyramid(model, phantom((256, 256)), top_k=0, cache=False)  # 16 x 16 latent
    # layer 1 has a single position per axis on 16 cells (7::16): one region, the whole slice
    assert pyramid.boxes(1).tolist() == [[0, 0, 256, 256]]
    assert pyramid.layer(2).grid_shape == (4, 4)
    assert set(map(tuple, pyramid.boxes(2)[:, 2:] - pyramid.boxes(2)[:, :2])) == {(64, 64)}
    assert set(map(tuple, pyramid.boxes(3)[:, 2:] - pyramid.boxes(3)[:, :2])) == {(16, 16)}
    assert pyramid.layer(1).alternative_ids.shape == (1, 1, 0)


def test_latent_blocks_on_the_paper_latent():
    assert latent_blocks(range(7, 32, 16), 32).tolist() == [0, 16, 32]  # the 2 x 2 quadrants
    assert latent_blocks(range(3, 32, 4), 32).tolist() == list(range(0, 33, 4))
    assert latent_blocks(range(32), 32).tolist() == list(range(33))
    assert latent_blocks([7, 23], 30).tolist() == [0, 16, 30]  # the last block takes the remainder
    assert latent_blocks([5], 11).tolist() == [0, 11]
    with pytest.raises(ConfigError):
        latent_blocks([1, 2, 4], 8)


def test_self_agreement_is_complete_and_differences_are_located(model):
    hu = phantom((160, 192))
    a = token_pyramid(model, hu, top_k=2)
    same = compare_pyramids(a, token_pyramid(model, hu.copy(), top_k=2, cache=False))
    assert same.agreement == {1: 1.0, 2: 1.0, 3: 1.0}
    assert all(len(c.disagreeing_boxes) == 0 for c in same.layers)

    changed = hu.copy()
    changed[:64, :64] = 1500.0  # a bright block: only regions touching it may change
    b = token_pyramid(model, changed, top_k=2)
    diff = compare_pyramids(a, b)
    fine = diff.layer(3)
    assert 0 < fine.n_agree < fine.n_regions
    assert fine.agreement == pytest.approx(fine.n_agree / fine.n_regions)
    differ = (a.layer(3).token_ids != b.layer(3).token_ids).ravel()
    np.testing.assert_array_equal(fine.disagreeing_boxes, a.boxes(3)[differ])
    assert [w for w, _ in fine.disagreeing_words] == list(np.array(a.words(3))[differ])
    with pytest.raises(ConfigError, match="same size"):
        compare_pyramids(a, token_pyramid(model, phantom((160, 176)), top_k=2))


def test_json_and_csv_exports_round_trip(model, tmp_path):
    pyramid = token_pyramid(model, phantom((90, 130)), top_k=3)
    records = pyramid.to_records()
    assert records[0].keys() >= {"layer", "y0", "x0", "y1", "x1", "token_id", "word", "distance", "alternatives"}
    assert len(records) == sum(tl.n_regions for tl in pyramid.layers)

    pyramid.to_json(tmp_path / "tokens.json")
    back = TokenPyramid.from_json(tmp_path / "tokens.json")
    assert back.to_records() == records
    assert back.padding == pyramid.padding and back.image_shape == pyramid.image_shape
    assert back.model_info == pyramid.model_info and back.model_info["codebook_source"] == CODEBOOK
    assert back.model_info["preset"] == model.config.name
    assert json.loads((tmp_path / "tokens.json").read_text())["format"] == "napari-langmamba.tokens"

    pyramid.to_csv(tmp_path / "tokens.csv")
    from_csv = TokenPyramid.from_csv(tmp_path / "tokens.csv")
    assert from_csv.to_records() == records
    for y, x in [(0, 0), (45, 77), (89, 129)]:
        assert from_csv.at(y, x) == pyramid.at(y, x)


def test_csv_round_trip_keeps_awkward_words(model):
    records = token_pyramid(model, phantom((48, 64)), top_k=2).to_records()
    awkward = ['a,b "c"', "line\nbreak", "ü'ß", "</w>"]
    for i, record in enumerate(records):
        record["word"] = awkward[record["token_id"] % len(awkward)]
        for alt in record["alternatives"]:
            alt["word"] = awkward[alt["token_id"] % len(awkward)]
        if i == 0:
            record["distance"] = 0.1 + 0.2  # a float whose repr needs all its digits
    pyramid = TokenPyramid.from_records(records)
    assert TokenPyramid.from_csv(pyramid.to_csv()).to_records() == pyramid.to_records()
    assert TokenPyramid.from_json(pyramid.to_json()).to_records() == pyramid.to_records()


def test_malformed_exports_are_refused(model, tmp_path):
    with pytest.raises(ConfigError, match="Not a token pyramid export"):
        TokenPyramid.from_json('{"regions": []}')
    records = token_pyramid(model, phantom((48, 64)), top_k=1).to_records()
    with pytest.raises(ConfigError, match="misses regions"):
        TokenPyramid.from_records([r for r in records if not (r["layer"] == 3 and r["row"] == 1 and r["col"] == 1)])
    with pytest.raises(ConfigError, match="No token export"):
        TokenPyramid.from_csv(tmp_path / "absent.csv")


def test_results_are_cached_by_slice_content_and_model(model):
    clear_cache()
    hu = phantom((64, 64))
    first = token_pyramid(model, hu)
    assert token_pyramid(model, hu.copy()) is first  # same bytes: the cached result
    assert token_pyramid(model, hu, top_k=2) is not first
    assert token_pyramid(model, hu, cache=False) is not first
    changed = hu.copy()
    changed[0, 0] += 1.0
    assert token_pyramid(model, changed) is not first


def test_bad_slices_are_refused(model):
    with pytest.raises(ConfigError, match="2D slice"):
        token_pyramid(model, np.zeros((2, 32, 32), np.float32))
    with pytest.raises(ConfigError, match="too small"):
        token_pyramid(model, np.zeros((10, 12), np.float32))
    with pytest.warns(RuntimeWarning, match="NaN"):
        hu = phantom((32, 32))
        hu[3, 3] = np.nan
        token_pyramid(model, hu, cache=False)


def test_world_to_pixel_inverts_scale_and_translate():
    scale, translate = (2.5, 0.7, 0.8), (10.0, -3.0, 4.0)
    for row, col in [(0, 0), (5, 9), (511, 300)]:
        world = (99.0, translate[1] + scale[1] * row, translate[2] + scale[2] * col)
        assert world_to_pixel(world, scale=scale, translate=translate) == (row, col)
        # anywhere inside a pixel (up to half a pixel from its centre) maps to it
        near = (world[0], world[1] + 0.49 * scale[1], world[2] - 0.49 * scale[2])
        assert world_to_pixel(near, scale=scale, translate=translate) == (row, col)
    corners = box_corners((0, 0, 16, 32))
    assert corners.min(axis=0).tolist() == [-0.5, -0.5] and corners.max(axis=0).tolist() == [15.5, 31.5]


def test_load_token_model_from_folders(model, tmp_path, monkeypatch):
    from napari_langmamba.checkpoint import save_checkpoint

    norm = Normalization(hu_min=-1024.0, hu_max=3071.0)
    save_checkpoint(tmp_path / "bundle" / "langae", model, kind="langae", extra={"normalization": norm})
    hu = phantom((64, 80))
    expected = token_pyramid(model, hu, normalization=norm, cache=False).to_records()
    for weights in (tmp_path / "bundle" / "langae", tmp_path / "bundle", str(tmp_path / "bundle")):
        loaded = load_token_model(weights)
        assert model_normalization(loaded) == norm
        assert token_pyramid(loaded, hu, cache=False).to_records() == expected

    monkeypatch.setattr(session, "DEFAULT_WEIGHTS_DIR", tmp_path / "not-installed")
    with pytest.raises(CheckpointError, match="bundled default LangAE weights are not installed"):
        load_token_model("default")
    monkeypatch.setattr(session, "DEFAULT_WEIGHTS_DIR", tmp_path / "bundle")
    assert model_normalization(load_token_model("default")) == norm
    with pytest.raises(CheckpointError, match="No checkpoint"):
        load_token_model(tmp_path / "absent")


def test_the_generator_leaves_grad_and_train_modes_alone(model):
    from napari_langmamba.tokens import iter_token_pyramid

    model.train()
    try:
        steps = iter_token_pyramid(model, phantom((48, 48)), cache=False)
        for _event in steps:  # the consumer's code between events runs in its own modes
            assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
            assert model.training
    finally:
        model.eval()


@pytest.mark.parametrize("layer", [1, 2, 3])
def test_word_areas_and_word_map_cover_the_slice(model, layer):
    hu = phantom((200, 330), seed=4)
    pyramid = token_pyramid(model, hu, top_k=0, cache=False)
    areas = pyramid.word_areas(layer)
    counts: dict[str, int] = {}
    regions: dict[str, int] = {}
    for region in pyramid.regions(layer):
        y0, x0, y1, x1 = region.box
        counts[region.word] = counts.get(region.word, 0) + (y1 - y0) * (x1 - x0)
        regions[region.word] = regions.get(region.word, 0) + 1
    assert {a.word: a.pixels for a in areas} == counts and {a.word: a.n_regions for a in areas} == regions
    assert len(areas) == len(counts)  # one entry per distinct word
    assert [a.pixels for a in areas] == sorted((a.pixels for a in areas), reverse=True)
    assert sum(a.pixels for a in areas) == 200 * 330 and sum(a.share for a in areas) == pytest.approx(1.0)

    labels = {a.word: i + 7 for i, a in enumerate(areas)}
    word_map = pyramid.word_map(layer, labels)
    assert word_map.shape == (200, 330)
    for y in range(0, 200, 9):
        for x in range(0, 330, 13):
            assert word_map[y, x] == labels[pyramid.at(y, x)[layer - 1].word]
    assert np.bincount(word_map.ravel())[7:].tolist() == [a.pixels for a in areas]
    with pytest.raises(ConfigError, match="No label for the word"):
        pyramid.word_map(layer, dict(list(labels.items())[1:]))
