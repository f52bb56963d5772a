"""The tissue prior from HU physics (napari_langmamba.anatomy) on real CT slices, and its regions."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import SHARED_DATA

from napari_langmamba.anatomy import (
    BLOOD,
    BONE,
    FAT,
    LUNG,
    OUTSIDE_AIR,
    SOFT_TISSUE,
    TABLE_METAL,
    TISSUE_CLASSES,
    TissueClass,
    body_mask,
    region_class_sets,
    region_edges,
    tissue_map,
)
from napari_langmamba.errors import ConfigError

L096 = SHARED_DATA / "ct" / "mayo2016_L096_full_dose"
CHEST = SHARED_DATA / "ct" / "chest_ct_B70f"


def _slice(path):
    if not path.is_file():
        pytest.skip(f"real CT data not found at {path} (../shared/data is absent)")
    from napari_langmamba.io import read_ct

    volume = read_ct(path)
    return volume.hu[0], volume.spacing[1:]


def test_classes_are_ordered_and_their_words_are_minilm_words():
    assert [c.index for c in TISSUE_CLASSES] == list(range(7))
    assert [c.name for c in TISSUE_CLASSES] == [
        "outside air", "lung", "fat", "soft tissue", "blood", "bone", "table or metal"]
    from napari_langmamba.models.codebook import load_codebook

    codebook = load_codebook("minilm")
    vocabulary = set(codebook.words)
    for tissue in TISSUE_CLASSES:
        assert 3 <= len(tissue.words) <= 16
        for word in tissue.words:
            assert word.isalpha() and word.isascii() and len(word) >= 3, word
            assert word in vocabulary, f"{word!r} ({tissue.name}) is not a whole word of MiniLM"
    assert {"bone", "spine", "rib"} <= set(TISSUE_CLASSES[BONE].words)
    assert {"lung", "lungs", "pulmonary"} <= set(TISSUE_CLASSES[LUNG].words)
    assert {"liver", "kidney", "muscle"} <= set(TISSUE_CLASSES[SOFT_TISSUE].words)


def test_generic_words_name_no_single_organ_bone_or_vessel():
    # what a tissue-choosing LangAE shows: true of every region of the class, as the prior cannot
    # tell the liver from a muscle, a vertebra from a rib, an artery from a vein
    specific = {"liver", "kidney", "muscle", "muscles", "stomach", "colon", "spine", "spinal", "vertebrae",
                "rib", "ribs", "artery", "arteries", "arterial", "vein", "veins", "table", "implant", "wire"}
    for tissue in TISSUE_CLASSES:
        assert 2 <= len(tissue.generic) and set(tissue.generic) <= set(tissue.words), tissue.name
        assert not set(tissue.generic) & specific, tissue.name
    assert {"tissue", "organ"} <= set(TISSUE_CLASSES[SOFT_TISSUE].generic)
    assert {"bone", "skeletal"} <= set(TISSUE_CLASSES[BONE].generic)
    assert {"blood", "vascular"} <= set(TISSUE_CLASSES[BLOOD].generic)
    with pytest.raises(ValueError, match="generic words must be among its words"):
        TissueClass(0, "x", ("air",), "x", generic=("air", "liver"))


def test_abdominal_slice_pixels_fall_in_their_tissue_class():
    # L096 full dose, upper abdomen at the lung bases (0129.IMA): pixels found by viewing the slice
    hu, spacing = _slice(L096 / "0129.IMA")
    tissue = tissue_map(hu, pixel_spacing=spacing)
    assert tissue.shape == hu.shape and tissue.dtype == np.uint8
    assert tissue[30, 30] == OUTSIDE_AIR  # top-left corner, air around the patient
    assert tissue[180, 180] == SOFT_TISSUE  # right lobe of the liver
    assert tissue[160, 130] == SOFT_TISSUE  # liver
    assert tissue[420, 250] == FAT  # posterior subcutaneous fat
    assert tissue[250, 40] == FAT  # lateral subcutaneous fat
    assert tissue[268, 262] == BLOOD  # the contrast-filled descending aorta
    assert tissue[300, 140] == LUNG  # the right lung base
    assert tissue[480, 250] == TABLE_METAL  # the patient table's lower shell, outside the body
    body = body_mask(hu, pixel_spacing=spacing)
    assert not body[480, 250] and not body[30, 30] and body[180, 180] and body[300, 140]
    # the body is one piece holding the lungs; the table is not part of it
    assert (tissue[~body] != LUNG).all() and (tissue[body] != OUTSIDE_AIR).all()


def test_vertebral_body_is_bone():
    # L096 full dose, lower abdomen (0209.IMA): the lumbar vertebral body, its cancellous centre
    # (~90 HU, the HU of soft tissue) enclosed by cortex
    hu, spacing = _slice(L096 / "0209.IMA")
    tissue = tissue_map(hu, pixel_spacing=spacing)
    assert 50 < float(np.median(hu[268:277, 220:229])) < 300  # cancellous: not bone by HU alone
    assert (tissue[255:291:5, 225] == BONE).all()
    assert tissue[272, 225] == BONE and tissue[265, 215] == BONE and tissue[280, 240] == BONE


def test_lung_on_a_chest_slice_of_another_scanner():
    # chest_ct_B70f (Siemens Sensation 16, sharp kernel, 0.56 mm pixels), 000028.dcm: both lungs
    hu, spacing = _slice(CHEST / "000028.dcm")
    tissue = tissue_map(hu, pixel_spacing=spacing)
    assert tissue[300, 100] == LUNG and tissue[250, 400] == LUNG
    assert tissue[150, 250] == SOFT_TISSUE  # the heart (not enhanced on this slice)
    lung_share = float((tissue == LUNG).mean())
    assert 0.2 < lung_share < 0.45


def test_synthetic_phantom_classes_and_table():
    rng = np.random.default_rng(0)
    hu = np.full((128, 128), -1000.0, dtype=np.float32)
    yy, xx = np.mgrid[:128, :128]
    body = (yy - 55) ** 2 / 45**2 + (xx - 64) ** 2 / 55**2 <= 1
    hu[body] = -100.0  # fat
    hu[(yy - 55) ** 2 + (xx - 64) ** 2 <= 30**2] = 50.0  # an organ
    hu[(yy - 45) ** 2 + (xx - 40) ** 2 <= 8**2] = -850.0  # a lung
    hu[(yy - 60) ** 2 + (xx - 80) ** 2 <= 5**2] = 220.0  # a vessel
    hu[(yy - 70) ** 2 + (xx - 60) ** 2 <= 6**2] = 900.0  # bone
    hu[(yy - 40) ** 2 + (xx - 75) ** 2 <= 4] = 3000.0  # a metal clip
    hu[115:118, 10:118] = 0.0  # a thin table below the body
    hu += rng.normal(0, 10, hu.shape).astype(np.float32)
    tissue = tissue_map(hu, pixel_spacing=1.0)
    assert tissue[5, 5] == OUTSIDE_AIR and tissue[55, 64] == SOFT_TISSUE and tissue[45, 40] == LUNG
    assert tissue[60, 80] == BLOOD and tissue[70, 60] == BONE and tissue[40, 75] == TABLE_METAL
    assert tissue[55, 14] == FAT and tissue[116, 64] == TABLE_METAL
    assert tissue[112, 64] == OUTSIDE_AIR  # the gap between body and table


def test_a_lumen_in_a_calcified_wall_is_blood_and_mottled_marrow_in_a_cortex_is_bone():
    rng = np.random.default_rng(1)
    hu = np.full((320, 320), -1000.0, dtype=np.float32)  # 0.5 mm pixels
    yy, xx = np.mgrid[:320, :320] * 0.5
    hu[(yy - 80) ** 2 + (xx - 80) ** 2 <= 75**2] = 40.0  # the body, soft tissue
    vessel = (yy - 60) ** 2 + (xx - 50) ** 2
    arc = (np.arctan2(yy - 60, xx - 50) + np.pi) / (2 * np.pi) < 0.6
    hu[(vessel <= 13.5**2) & arc] = 1500.0  # calcified plaque, 0.5 mm thick, along 60 % of the wall ...
    hu[vessel <= 13**2] = 160.0  # ... of a homogeneous contrast-filled lumen of 530 mm^2
    spine = (yy - 100) ** 2 + (xx - 100) ** 2
    hu[spine <= 20**2] = 700.0  # a cortex, 2 mm thick ...
    marrow = spine <= 18**2
    hu[marrow] = 180.0 + rng.normal(0, 60, int(marrow.sum())).astype(np.float32)  # ... around mottled marrow
    hu += rng.normal(0, 10, hu.shape).astype(np.float32)
    tissue = tissue_map(hu, pixel_spacing=0.5)
    assert (tissue[vessel <= 10**2] == BLOOD).all()  # (the rule before it called the lumen bone)
    assert (tissue[spine <= 15**2] == BONE).all()


def test_the_calcified_aorta_of_the_sample_series_is_blood_beside_a_bone_vertebral_body():
    folder = SHARED_DATA / "ct" / "abdomen_dicom_series"
    if not folder.is_dir():
        pytest.skip(f"real CT data not found at {folder} (../shared/data is absent)")
    from napari_langmamba.io import read_ct

    volume = read_ct(folder)  # the series of `make run`
    tissue = tissue_map(volume.hu[10], pixel_spacing=volume.spacing[1:])
    assert tissue[298, 265] == BLOOD and tissue[300, 262] == BLOOD  # the aorta's lumen (~155 HU)
    assert tissue[330, 242] == BONE and tissue[325, 245] == BONE  # the vertebral body below it


def test_bad_input_is_a_config_error():
    with pytest.raises(ConfigError, match="2-D slice"):
        tissue_map(np.zeros((2, 8, 8)))
    with pytest.raises(ConfigError, match="NaN"):
        tissue_map(np.full((8, 8), np.nan))
    with pytest.raises(ConfigError, match="pixel_spacing"):
        tissue_map(np.zeros((8, 8)), pixel_spacing=0.0)
    with pytest.raises(ConfigError, match="latent cells"):
        region_edges(5, 64)
    with pytest.raises(ConfigError, match="class values"):
        region_class_sets(np.full((32, 32), 9, dtype=np.uint8), (2, 2))


def test_region_edges_follow_the_pyramid_positions():
    l1, l2, l3 = region_edges(32, 512)
    assert l1.tolist() == [0, 256, 512]
    assert l2.tolist() == list(range(0, 513, 64))
    assert l3.tolist() == list(range(0, 513, 16))
    # a 128-pixel crop: 8 latent cells -> layer 1 has one position (the whole crop), layer 2 two
    l1, l2, l3 = region_edges(8, 128)
    assert l1.tolist() == [0, 128] and l2.tolist() == [0, 64, 128] and len(l3) == 9


def test_region_class_sets_mark_the_classes_covering_each_region():
    tissue = np.full((64, 64), OUTSIDE_AIR, dtype=np.uint8)
    tissue[:, 32:] = SOFT_TISSUE  # right half organ
    tissue[:16, 32:48] = BONE  # a 16 x 16 block of bone in the top-right quadrant's left half
    sets = region_class_sets(tissue, (4, 4), min_share=0.25)
    assert [s.shape for s in sets] == [(1, 1), (1, 1), (4, 4)]  # 4 x 4 latent: 1, 1, 4 x 4 positions
    whole = (1 << OUTSIDE_AIR) | (1 << SOFT_TISSUE)  # bone is 1/16 of the image (< 25 %)
    assert sets[0][0, 0] == whole and sets[1][0, 0] == whole
    assert sets[2][0, 0] == 1 << OUTSIDE_AIR and sets[2][0, 2] == 1 << BONE and sets[2][0, 3] == 1 << SOFT_TISSUE
    assert sets[2][3, 3] == 1 << SOFT_TISSUE
    batch = region_class_sets(np.stack([tissue, tissue[::-1]]), (4, 4), min_share=0.05)
    assert batch[0].shape == (2, 1, 1) and batch[0][0, 0, 0] == whole | (1 << BONE)
    assert batch[2][1, 3, 2] == 1 << BONE  # flipped image: bone in the bottom row


def test_import_does_not_load_torch():
    code = "import sys, napari_langmamba.anatomy; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------------------- the scorer


def _words_codebook(words):
    import torch

    from napari_langmamba.models.codebook import Codebook, codebook_sha256

    table = torch.randn(len(words), 8, generator=torch.Generator().manual_seed(0))
    return Codebook(embeddings=table, words=tuple(words), source="test:words", sha256=codebook_sha256(table))


def test_anatomy_scorer_gives_each_region_the_words_of_its_tissues():
    from training.candidates import AnatomyScorer

    hu, spacing = _slice(L096 / "0129.IMA")
    from napari_langmamba.models.codebook import load_codebook

    codebook = load_codebook("minilm")
    scorer = AnatomyScorer(codebook)
    assert scorer.skipped_words == [] and scorer.class_words["bone"][:3] == ["bone", "bones", "skeletal"]
    tissue = tissue_map(hu, pixel_spacing=spacing)[None]
    pools = scorer.position_pools(tissue, (32, 32))
    assert [tuple(p.index.shape) for p in pools] == [(1, 2, 2), (1, 8, 8), (1, 32, 32)]

    def words_at(layer, y, x):
        edges = region_edges(32, 512)[layer]
        r, c = np.searchsorted(edges, y, side="right") - 1, np.searchsorted(edges, x, side="right") - 1
        ids = pools[layer].pool_ids[int(pools[layer].index[0, r, c])]
        return set(codebook.decode(ids[ids >= 0]))

    assert {"liver", "organ", "tissue"} <= words_at(2, 180, 180) and "lung" not in words_at(2, 180, 180)
    assert {"lung", "pulmonary"} <= words_at(2, 300, 140)
    assert {"air", "outside"} <= words_at(2, 20, 20) and "bone" not in words_at(2, 20, 20)
    assert {"fat", "fatty"} <= words_at(2, 250, 40)
    assert {"blood", "artery"} <= words_at(2, 268, 262)  # the aorta fills its 16 x 16 pixel region
    # layer 1 quadrants mix classes: each gets the words of every class on >= 25 % of its pixels
    n_classes = []
    for y0, x0 in ((0, 0), (0, 256), (256, 0), (256, 256)):
        share = np.bincount(tissue[0, y0:y0 + 256, x0:x0 + 256].ravel(), minlength=7) / 256**2
        wanted = {w for k in np.flatnonzero(share >= 0.25) for w in TISSUE_CLASSES[k].words}
        assert words_at(0, y0 + 1, x0 + 1) == wanted
        n_classes.append(int((share >= 0.25).sum()))
    assert max(n_classes) >= 2
    assert all(p.group is None for p in pools)  # the loss's balance counts pools by default
    # balance by class: each region's group is its most frequent tissue class (the aorta's: blood)
    by_class = AnatomyScorer(codebook, balance_by="class").position_pools(tissue, (32, 32))
    assert all(bool((a.index == b.index).all()) for a, b in zip(pools, by_class, strict=True))
    for layer, edges in enumerate(region_edges(32, 512)):
        counts = [[np.bincount(tissue[0, edges[r]:edges[r + 1], edges[c]:edges[c + 1]].ravel(), minlength=7)
                   for c in range(len(edges) - 1)] for r in range(len(edges) - 1)]
        assert by_class[layer].group[0].tolist() == np.argmax(counts, axis=-1).tolist()
    assert int(by_class[2].group[0, 268 // 16, 262 // 16]) == BLOOD
    with pytest.raises(ConfigError, match="balances by"):
        AnatomyScorer(codebook, balance_by="word")
    # the same map from the batch in the model's [0, 1] scale
    from napari_langmamba.windowing import MODEL_NORMALIZATION

    batch = MODEL_NORMALIZATION.to_model(hu)[None, None]
    again = AnatomyScorer.tissue_maps(batch, pixel_spacing=float(spacing[0]))
    assert again.shape == tissue.shape and float((again == tissue).mean()) > 0.999  # clipping at -1000 HU aside


def test_anatomy_scorer_skips_missing_words_and_needs_some():
    from training.candidates import AnatomyScorer

    scorer = AnatomyScorer(_words_codebook(["bone", "lung", "piano", "fat"]))
    assert scorer.class_words["bone"] == ["bone"] and scorer.class_words["soft tissue"] == []
    assert "liver" in scorer.skipped_words
    # pools of class combinations: bone alone, bone + lung, soft tissue alone (no word: empty)
    assert scorer.pool_ids[1 << BONE].tolist()[:1] == [0] and (scorer.pool_ids[1 << BONE][1:] == -1).all()
    assert sorted(i for i in scorer.pool_ids[(1 << BONE) | (1 << LUNG)].tolist() if i >= 0) == [0, 1]
    assert (scorer.pool_ids[1 << SOFT_TISSUE] == -1).all()
    with pytest.raises(ConfigError, match="--scorer none"):
        AnatomyScorer(_words_codebook(["tok0", "tok1"]))


def test_anatomy_word_classes_name_the_class_of_each_codebook_row():
    from training.candidates import anatomy_word_classes

    classes = anatomy_word_classes(_words_codebook(["bone", "lung", "piano", "fat", "liver"]))
    assert classes.tolist() == [BONE, LUNG, -1, FAT, SOFT_TISSUE]
    assert anatomy_word_classes(_words_codebook(["tok0", "tok1"])) is None


def test_dominant_region_classes_need_a_share_of_the_region():
    from napari_langmamba.anatomy import dominant_region_classes

    tissue = np.full((32, 32), SOFT_TISSUE, dtype=np.uint8)  # a 2 x 2 latent: four 16 x 16 regions at layer 3
    tissue[:16, 16:][:10] = FAT  # 10 of 16 rows fat: 62.5 % fat
    tissue[16:, :16][:8] = FAT  # half fat, half soft tissue: no class dominates
    layers = dominant_region_classes(tissue, (2, 2))
    assert layers[2].tolist() == [[SOFT_TISSUE, FAT], [-1, SOFT_TISSUE]]
    assert layers[0].shape == (1, 1) and layers[0][0, 0] == SOFT_TISSUE  # 1 - (160 + 128) / 1024 = 72 %
    assert dominant_region_classes(tissue[None], (2, 2))[2].shape == (1, 2, 2)
    assert dominant_region_classes(tissue, (2, 2), dominance=0.7)[2][0, 1] == -1
    with pytest.raises(ConfigError, match="dominance"):
        dominant_region_classes(tissue, (2, 2), dominance=0.5)
