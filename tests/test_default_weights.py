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
    assert config["config"]["seed"]["name"] == "lite"
    training = config["training"]
    assert "python -m training seed" in training["seed"]["command_line"]
    assert "python -m training langae" in training["langae"]["command_line"]
    assert training["seed"]["data"]["n_slices"] > 0
    assert training["seed"]["codebook"]["source"] == "minilm"
    assert "not a medical device" in config["extra"]["provenance"]
    langae = json.loads((DEFAULT_WEIGHTS_DIR / "langae" / "config.json").read_text())
    assert langae["kind"] == "langae"
    assert langae["codebook"]["source"] == "minilm"


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
