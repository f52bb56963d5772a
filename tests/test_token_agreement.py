"""The counting of benchmarks/token_agreement.py: dominant classes, tissue agreement, confusion, pair agreement."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import load_benchmark

from napari_langmamba.anatomy import BONE, FAT, OUTSIDE_AIR, TISSUE_CLASSES
from napari_langmamba.tokens import TokenPyramid, token_pyramid


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("token_agreement")


@pytest.fixture(scope="module")
def geometry():
    """A real pyramid's regions (tiny LangAE on a 128 x 128 slice: 1, 2 x 2 and 8 x 8 regions)."""
    from napari_langmamba.models.codebook import load_codebook
    from napari_langmamba.models.langae import LangAE, LangAEConfig

    torch.manual_seed(0)
    codebook = load_codebook("random:16x8:1")
    model = LangAE(LangAEConfig.preset("tiny", codebook_dim=codebook.d), codebook=codebook).eval()
    hu = np.random.default_rng(0).normal(0, 50, (128, 128)).astype(np.float32)
    return token_pyramid(model, hu, top_k=0, cache=False)


def with_words(pyramid: TokenPyramid, word_of) -> TokenPyramid:
    """The same regions, each given ``word_of(region record)`` (a fresh token id per word)."""
    ids: dict[str, int] = {}
    records = []
    for rec in pyramid.to_records():
        word = word_of(rec)
        records.append({**rec, "word": word, "token_id": ids.setdefault(word, len(ids))})
    return TokenPyramid.from_records(records, image_shape=pyramid.image_shape, padding=pyramid.padding)


def test_dominant_class_needs_the_threshold_share(bench):
    tissue = np.zeros((4, 8), dtype=np.uint8)
    tissue[:, 4:] = BONE
    tissue[:, 4] = FAT  # right box: 3/4 bone, 1/4 fat
    tissue[:2, :2] = FAT  # left box: 3/4 air, 1/4 fat
    counts = bench.region_class_counts(tissue, np.array([0, 4]), np.array([0, 4, 8]), len(TISSUE_CLASSES))
    assert counts[0, 0, OUTSIDE_AIR] == 12 and counts[0, 0, FAT] == 4 and counts[0, 1, BONE] == 12
    assert bench.dominant_classes(counts, 0.6).tolist() == [[OUTSIDE_AIR, BONE]]
    assert bench.dominant_classes(counts, 0.8).tolist() == [[-1, -1]]


def test_tissue_agreement_and_confusion_count_the_planted_words(bench, geometry):
    h, w = geometry.image_shape
    tissue = np.full((h, w), OUTSIDE_AIR, dtype=np.uint8)
    tissue[:, : w // 2] = BONE  # left half bone, right half air; the boxes of layers 2-3 split at w / 2

    def word_of(rec):  # bone regions say "Spine", air regions a word in no list
        return "Spine" if rec["x1"] <= w // 2 else "plin"

    pyramid = with_words(geometry, word_of)
    names = [c.name for c in TISSUE_CLASSES]
    tally = bench.Tally(names)
    per_layer = tally.add(pyramid, tissue, bench.word_class_table(), 0.6)
    out = tally.to_dict()["layers"]
    for layer in (2, 3):
        boxes = pyramid.boxes(layer)
        left = int((boxes[:, 3] <= w // 2).sum())
        assert 0 < left < len(boxes) and all((b[1] >= w // 2) or (b[3] <= w // 2) for b in boxes)
        assert per_layer[layer] == {"dominated": len(boxes), "matched": left, "agreement": left / len(boxes)}
        assert out[str(layer)]["confusion"]["bone"]["bone"] == left
        assert out[str(layer)]["confusion"]["outside air"]["other"] == len(boxes) - left
        assert sum(sum(row.values()) for row in out[str(layer)]["confusion"].values()) == len(boxes)
        assert out[str(layer)]["top_words"]["bone"] == [("spine", left)]
        assert out[str(layer)]["distinct_words"] == 2
    # layer 1: one region over both halves, no class reaches 60 %
    assert per_layer[1]["dominated"] == 0 and per_layer[1]["agreement"] is None


def test_pair_agreement_and_its_chance_level(bench, geometry):
    a = with_words(geometry, lambda rec: "fat" if (rec["row"] + rec["col"]) % 2 else "bone")
    b = with_words(geometry, lambda rec: "fat")
    out = bench.pair_agreement(a, b)
    for layer in (2, 3):
        words = a.words(layer)
        n_fat = words.count("fat")
        same, n, chance = out[layer]
        assert (same, n) == (n_fat, len(words))
        assert chance == pytest.approx(n_fat / len(words))  # b says "fat" everywhere
    assert bench.pair_agreement(a, a)[3][0] == a.layer(3).n_regions
