"""The bundled default weights: present, valid, and better than the noisy input on real CT."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_langmamba.inference import DEFAULT_WEIGHTS_DIR, Denoiser

MAX_BUNDLE_BYTES = 30 * 1024 * 1024


def test_bundle_is_small_and_documents_its_making():
    files = [p for p in DEFAULT_WEIGHTS_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= MAX_BUNDLE_BYTES
    config = json.loads((DEFAULT_WEIGHTS_DIR / "config.json").read_text())
    assert config["kind"] == "seed"
    assert config["storage_dtype"] == "float16"
    # SEED lite with a 60 % wider decoder (its Up stages' widths; the encoder is the lite LangAE's)
    assert config["config"]["seed"]["decoder_channels"] == [128, 64, 48, 48]
    assert config["config"]["seed"]["feature_channels"] == [32, 32, 32, 64, 64]
    training = config["training"]
    assert "python -m training seed" in training["seed"]["command_line"]
    assert "python -m training langae" in training["langae"]["command_line"]
    # Split by patient: real pairs of three patients train, L192 validates and is never trained on.
    data = training["seed"]["data"]
    assert set(data["train"]["patients"]) == {"L096", "L143", "L286"}
    assert data["validation"]["patients"] == {"L192": {"n_slices": 11, "kernels": ["B30f", "D45f"], "doses": [0.25],
                                                       "origins": ["real"]}}
    assert training["seed"]["codebook"]["source"] == "words:minilm"
    assert training["seed"]["validation"]["best_psnr"] > 30.5
    # the chain: trained from scratch (seed-wide), fine-tuned from its best checkpoint (the previous
    # bundle), then trained longer from that bundle in bfloat16 (--init, --amp bf16)
    assert training["seed"]["amp"] == "bf16" and training["seed"]["total_steps"] == 2500
    (previous,) = training["seed"]["init_runs"]
    assert previous["seed"]["init"]["path"].rstrip("/").split("/")[-2] == "seed-wide"
    assert [r.get("init") for r in previous["seed"]["init_runs"]] == [None]
    assert previous["seed"]["validation"]["best_psnr"] < training["seed"]["validation"]["best_psnr"]
    assert "not a medical device" in config["extra"]["provenance"]
    assert "L192" in json.dumps(config["metrics"]["evaluation"])
    langae = json.loads((DEFAULT_WEIGHTS_DIR / "langae" / "config.json").read_text())
    assert langae["kind"] == "langae"
    assert langae["codebook"]["source"] == "words:minilm"
    langae_training = langae["training"]
    # its chain: the LangAE trained with the anatomy prior, then its words retrained alone (selected by
    # their agreement with the tissue map on L192), with the region-pixel head, the last run the CNN
    # region head alone after its tissue classifier; SEED's encoder layers never moved
    chain = [*_flat_chain(langae_training["init_runs"]), langae_training]
    parts = [r.get("train_part", "all") for r in chain]
    last_all = len(parts) - 1 - parts[::-1].index("all")
    assert set(parts[last_all + 1:]) == {"words", "region"} and parts[-1] == "region"
    assert chain[last_all]["loss"]["semantic"] is True and len(chain[last_all]["validation"]["curve"]) >= 5
    config = langae["config"]
    assert config["region_pixels"] is True and config["region_head"] == "cnn" and config["region_wide"] is True
    assert config["word_choice"] == "tissue"  # the head's tissue classes choose the words' candidates
    tissue = [r["tissue_pretrain"] for r in chain if r.get("tissue_pretrain")]
    assert len(tissue) == 3 and tissue[-1]["steps"] >= 300 and chain[-1].get("tissue_pretrain") == tissue[-1]
    assert tissue[-1]["validation"]["accuracy"] > 0.99  # the head's tissue classes on L192's dominated regions
    prior = langae_training["semantic_prior"]
    assert prior["scorer"] == "anatomy" and prior["balance_by"] == "class" and prior["pool_balance"] == 0.75
    # the word steps after the tissue phase trained the head's offset alone, never its classifier
    assert langae_training["frozen"] == ["encoder", "quant_conv", "post_quant_conv", "decoder", "region_pixels.down",
                                         "region_pixels.cell", "region_pixels.context", "region_pixels.wide",
                                         "region_pixels.tissue"]
    assert langae_training["validation"]["best_key"] == "word_agreement"
    assert langae_training["validation"]["best_word_agreement"] > 0.99


def _flat_chain(runs: list[dict]) -> list[dict]:
    """A bundle's init runs, oldest first, with the chains of earlier bundles (nested) spelled out."""
    out = []
    for run in runs:
        out += [*_flat_chain(run.get("init_runs", [])), run]
    return out


@pytest.fixture(scope="module")
def held_out_pair(dicom_series_dir):
    """A held-out real slice (not trained on) and its simulated quarter-dose version."""
    from napari_langmamba.io import read_ct
    from training.simulate import simulate_low_dose

    volume = read_ct(dicom_series_dir)
    full = volume.hu[18]  # the last 15 % of the series were the validation slices
    low = simulate_low_dose(full, pixel_mm=volume.spacing[1], dose=0.25, seed=1234)
    return low.astype(np.float32), full.astype(np.float32)


def test_default_model_improves_psnr_and_ssim_on_simulated_quarter_dose(held_out_pair):
    from napari_langmamba.metrics import psnr, ssim

    low, full = held_out_pair
    denoiser = Denoiser.load("default", device="cpu")
    out = denoiser.denoise(low)
    assert out.shape == low.shape and out.dtype == np.float32
    assert psnr(out, full, "abdomen") > psnr(low, full, "abdomen") + 0.1
    assert ssim(out, full, "abdomen") > ssim(low, full, "abdomen")
    # Denoising removes noise, it does not shift tissue values: the mean HU of the body is kept.
    body = full > -500
    assert abs(float(out[body].mean() - full[body].mean())) < 5.0


def test_values_outside_the_model_range_keep_their_own_level(held_out_pair):
    """Air below -1000 HU (the normalisation's floor) stays air at its own value, not at -1000."""
    low, _full = held_out_pair
    out = Denoiser.load("default", device="cpu").denoise(low)
    air = low < -1010
    assert air.sum() > 1000
    assert abs(float(out[air].mean() - low[air].mean())) < 5.0


# NLM as tuned by `python -m training evaluate --baselines nlm --tune-patients L096,L143,L286` (best
# mean PSNR in the abdomen window on slices of the training patients; never on L192).
TUNED_NLM = {"h_factor": 1.5}


@pytest.fixture(scope="module")
def l192_pair():
    """A real quarter-/full-dose pair of the validation patient L192 (never trained on)."""
    from conftest import SHARED_DATA

    from napari_langmamba.io import read_ct

    folder = SHARED_DATA / "ct" / "mayo2016_pairs" / "L192"
    if not folder.is_dir():
        pytest.skip(f"real low-dose pairs not found at {folder} (../shared/data is absent)")
    low = read_ct(folder / "quarter_3mm_D45")
    full = read_ct(folder / "full_3mm_D45")
    assert low.hu.shape == full.hu.shape == (4, 512, 512)
    return low.hu[1].astype(np.float32), full.hu[1].astype(np.float32), full.spacing[1]


def test_default_model_beats_tuned_nlm_on_a_real_low_dose_pair(l192_pair):
    from scipy import ndimage

    from napari_langmamba.anatomy import SOFT_TISSUE, tissue_map
    from napari_langmamba.metrics import psnr, ssim
    from training.evaluate import baseline_denoiser

    low, full, pixel_mm = l192_pair
    out = Denoiser.load("default", device="cpu").denoise(low)
    nlm = baseline_denoiser("nlm", TUNED_NLM)(low[None])[0]
    for metric in (psnr, ssim):
        assert metric(out, full, "abdomen") > metric(nlm, full, "abdomen") > metric(low, full, "abdomen") - 1.0
    # A soft-tissue ROI (organs and muscle by HU, eroded away from edges) keeps its mean HU.
    roi = ndimage.binary_erosion(tissue_map(full, pixel_spacing=pixel_mm) == SOFT_TISSUE, iterations=4)
    assert roi.sum() > 5000
    assert abs(float(out[roi].mean() - full[roi].mean())) < 5.0


# --- the bundled sharp-kernel weights ----------------------------------------------------------

# Measured by `python -m training evaluate ... --sim-filter ramp --sim-match-noise` on the 15 held-out
# chest slices (training.simulate.matched_i0: the I0 at which the simulated full dose has their own noise).
CHEST_HELD_OUT_I0 = 3.1e4
# NLM as tuned on simulated 10 % pairs of the chest volume's training slices (never the held-out ones).
TUNED_NLM_CHEST_10 = {"h_factor": 2.0}


def test_sharp_bundle_is_small_and_documents_its_making():
    from napari_langmamba.session import SHARP_WEIGHTS_DIR

    files = [p for p in DEFAULT_WEIGHTS_DIR.parent.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= MAX_BUNDLE_BYTES  # both bundles together
    config = json.loads((SHARP_WEIGHTS_DIR / "config.json").read_text())
    assert config["kind"] == "seed" and config["storage_dtype"] == "float16"
    assert not (SHARP_WEIGHTS_DIR / "langae").exists()  # its tokens are the default LangAE's
    seed = config["training"]["seed"]
    assert "--sim-match-noise" in seed["command_line"] and "--init" in seed["command_line"]
    inputs = seed["data"]["inputs"]
    assert inputs["sim_match_noise"] is True and inputs["sim_filter"] == "ramp"
    assert all("chest_train" in p for p in inputs["simulate_from"])  # never the held-out slices
    assert seed["data"]["train"]["kernels"] == ["B70f"]
    assert "not a medical device" in config["extra"]["provenance"].lower()


@pytest.fixture(scope="module")
def chest_held_out_pair():
    """A held-out slice of the B70f chest volume (z in [-123, -81] mm, never trained on), at a simulated 10 %."""
    from conftest import SHARED_DATA

    from napari_langmamba.io import read_ct
    from training.simulate import simulate_low_dose

    folder = SHARED_DATA / "ct" / "chest_ct_B70f"
    if not folder.is_dir():
        pytest.skip(f"the chest volume is not at {folder} (../shared/data is absent)")
    volume = read_ct(folder)
    z = volume.slice_positions() @ volume.direction[0]
    index = int(np.argmin(np.abs(z - (-102.0))))
    assert -123.0 <= z[index] <= -81.0
    full = volume.hu[index].astype(np.float32)
    low = simulate_low_dose(full, pixel_mm=float(volume.spacing[1]), dose=0.1, i0=CHEST_HELD_OUT_I0, filter="ramp",
                            seed=7)
    return low, full, float(volume.spacing[1])


def test_sharp_weights_beat_tuned_nlm_and_the_default_on_a_sharp_kernel(chest_held_out_pair):
    from scipy import ndimage

    from napari_langmamba.anatomy import SOFT_TISSUE, tissue_map
    from napari_langmamba.metrics import psnr
    from training.evaluate import baseline_denoiser

    low, full, pixel_mm = chest_held_out_pair
    sharp = Denoiser.load("sharp", device="cpu").denoise(low)
    default = Denoiser.load("default", device="cpu").denoise(low)
    nlm = baseline_denoiser("nlm", TUNED_NLM_CHEST_10)(low[None])[0]
    assert psnr(sharp, full, "abdomen") > psnr(nlm, full, "abdomen") + 1.0
    assert psnr(sharp, full, "abdomen") > psnr(default, full, "abdomen") + 1.0
    assert psnr(nlm, full, "abdomen") > psnr(low, full, "abdomen") + 3.0  # heavy noise: any filter helps
    # the mean HU of the soft tissue (mediastinum, chest wall) is kept
    roi = ndimage.binary_erosion(tissue_map(full, pixel_spacing=pixel_mm) == SOFT_TISSUE, iterations=4)
    assert roi.sum() > 1000
    assert abs(float(sharp[roi].mean() - full[roi].mean())) < 5.0


def _layer3_word(hu: np.ndarray, point: tuple[int, int]) -> str:
    from napari_langmamba.tokens import load_token_model, token_pyramid

    return token_pyramid(load_token_model("default"), hu).at(*point)[-1].word


def _shown_words() -> dict[str, tuple[str, ...]]:
    """Per tissue class, the words the bundled LangAE may show (it chooses words by tissue among
    the generic ones: "tissue" at the liver, never "muscles")."""
    from napari_langmamba.anatomy import TISSUE_CLASSES

    return {c.name: c.generic for c in TISSUE_CLASSES}


def test_bundled_words_name_lung_aortas_and_spine_on_a_chest_slice_never_trained_on(chest_held_out_pair):
    _, full, _ = chest_held_out_pair  # the full-dose slice at z = -102 mm (another scanner, kernel B70f)
    words = _shown_words()
    assert _layer3_word(full, (250, 100)) in words["lung"]  # the right lung
    assert _layer3_word(full, (175, 255)) in words["blood"]  # the ascending aorta
    assert _layer3_word(full, (325, 285)) in words["blood"]  # the descending aorta
    assert _layer3_word(full, (350, 230)) in words["bone"]  # the vertebral body


def test_bundled_words_name_the_aorta_and_the_spine_on_real_contrast_ct():
    """The aorta and vertebral bodies of two contrast-enhanced series (both among the LangAE's training
    series: a check that the words keep naming them, not a held-out score, which is issue 11's
    agreement benchmark). The sample series' aorta has a calcified wall, which the tissue prior
    filled as bone until its lumen rule."""
    from conftest import SHARED_DATA

    from napari_langmamba.io import read_ct

    folder = SHARED_DATA / "ct"
    if not (folder / "abdomen_dicom_series").is_dir():
        pytest.skip(f"the real series are not in {folder} (../shared/data is absent)")
    words = _shown_words()
    sample = read_ct(folder / "abdomen_dicom_series")  # the series of `make run`
    assert _layer3_word(sample.hu[10].astype(np.float32), (330, 242)) in words["bone"]  # vertebral body
    assert _layer3_word(sample.hu[10].astype(np.float32), (298, 265)) in words["blood"]  # the calcified aorta
    assert _layer3_word(sample.hu[10].astype(np.float32), (300, 170)) in words["soft tissue"]  # liver
    mayo = read_ct(folder / "mayo2016_L096_full_dose")
    upper, kidneys = mayo.hu[104].astype(np.float32), mayo.hu[64].astype(np.float32)  # 0209.IMA, 0129.IMA
    assert _layer3_word(upper, (275, 268)) in words["blood"]  # aorta, upper abdomen
    assert _layer3_word(kidneys, (228, 233)) in words["blood"]  # aorta at the kidneys
    assert _layer3_word(upper, (322, 235)) in words["bone"] and _layer3_word(kidneys, (270, 225)) in words["bone"]
    assert _layer3_word(upper, (180, 180)) in words["soft tissue"]  # liver (the latent alone said "muscles")


def test_bundled_words_name_spine_fat_and_air_on_the_validation_patient(l192_pair):
    _, full, _ = l192_pair
    words = _shown_words()
    assert _layer3_word(full, (300, 265)) in words["bone"]  # vertebral body
    assert _layer3_word(full, (252, 276)) in words["blood"]  # the aorta
    assert _layer3_word(full, (250, 45)) in words["fat"]  # subcutaneous fat
    assert _layer3_word(full, (30, 30)) in words["outside air"]
