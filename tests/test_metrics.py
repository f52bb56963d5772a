"""PSNR / SSIM / FSIM on a window: sanity, analytic values, and FSIM against an independent implementation."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

from napari_langmamba import metrics
from napari_langmamba.errors import ConfigError
from napari_langmamba.windowing import get_window

ABDOMEN = get_window("abdomen")  # [-160, 240] HU


def _phantom_hu(shape=(96, 96), seed=0) -> np.ndarray:
    """Smooth soft-tissue-like structures in HU, mostly inside the abdominal window."""
    field = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(shape), 3.0)
    return (40.0 + 150.0 * field / np.abs(field).max()).astype(np.float32)


# --- sanity ---------------------------------------------------------------------------


def test_identical_images_give_perfect_scores():
    hu = _phantom_hu()
    assert metrics.psnr(hu, hu) == math.inf
    assert metrics.ssim(hu, hu) == pytest.approx(1.0, abs=1e-12)
    assert metrics.fsim(hu, hu) == pytest.approx(1.0, abs=1e-12)


def test_psnr_of_known_noise_equals_the_analytic_value():
    # A +-20 HU checkerboard around 40 HU: after the 400 HU wide window every pixel differs
    # by exactly 0.05, so MSE = 0.0025 and PSNR = 10 log10(1 / 0.0025).
    ref = np.full((64, 64), 40.0, dtype=np.float32)
    checker = np.where((np.indices(ref.shape).sum(axis=0) % 2) == 0, 20.0, -20.0).astype(np.float32)
    assert metrics.psnr(ref + checker, ref) == pytest.approx(10 * math.log10(1 / 0.0025), abs=1e-4)


def test_psnr_of_gaussian_noise_matches_its_mse():
    ref = _phantom_hu((128, 128), seed=1)
    noisy = ref + 10.0 * np.random.default_rng(2).standard_normal(ref.shape).astype(np.float32)
    mse = np.mean((ABDOMEN.apply(noisy).astype(np.float64) - ABDOMEN.apply(ref)) ** 2)
    assert metrics.psnr(noisy, ref) == pytest.approx(-10 * math.log10(mse), abs=1e-6)
    # 10 HU noise on a 400 HU window: about 20 log10(40) = 32 dB (a little more: some clipping).
    assert 31.5 < metrics.psnr(noisy, ref) < 33.0


def test_metrics_compare_windowed_images():
    air = np.full((32, 32), -1000.0, dtype=np.float32)
    # -1000 and -500 HU are both below the abdominal window: identical after windowing ...
    assert metrics.psnr(air + 500, air) == math.inf
    # ... but not on the lung window [-1350, 150].
    assert metrics.psnr(air + 500, air, window="lung") == pytest.approx(10 * math.log10(1 / (500 / 1500) ** 2))


def test_ssim_luminance_term_uses_k1_of_the_convention():
    # Flat images c and c + d: variances are 0, so SSIM = (2 c (c + d) + C1) / (c^2 + (c + d)^2 + C1)
    # with C1 = (K1 * data_range)^2 = 1e-4 (K1 = 0.01, data range 1).
    ref = np.full((32, 32), 40.0, dtype=np.float32)  # 0.5 after the window
    c, d = 0.5, 0.05
    expected = (2 * c * (c + d) + 1e-4) / (c**2 + (c + d) ** 2 + 1e-4)
    assert metrics.ssim(ref + 20.0, ref) == pytest.approx(expected, abs=1e-7)  # float32 windowing


def test_scores_fall_as_noise_grows():
    ref = _phantom_hu((128, 128), seed=3)
    rng = np.random.default_rng(4)
    noise = rng.standard_normal(ref.shape).astype(np.float32)
    scores = [
        (metrics.psnr(ref + s * noise, ref), metrics.ssim(ref + s * noise, ref), metrics.fsim(ref + s * noise, ref))
        for s in (5.0, 20.0, 60.0)
    ]
    for better, worse in zip(scores, scores[1:], strict=False):
        assert all(b > w for b, w in zip(better, worse, strict=True))
    assert all(0 < s[2] < 1 for s in scores)


def test_fsim_is_symmetric_and_one_for_equal_flat_images():
    ref = _phantom_hu((80, 80), seed=5)
    other = ndimage.gaussian_filter(ref, 1.5)
    assert metrics.fsim(ref, other) == pytest.approx(metrics.fsim(other, ref), abs=1e-12)
    flat = np.zeros((40, 40), dtype=np.float32)
    assert metrics.fsim(flat, flat) == 1.0


def test_inputs_are_validated():
    with pytest.raises(ConfigError, match="differ in shape"):
        metrics.psnr(np.zeros((8, 8)), np.zeros((8, 9)))
    with pytest.raises(ConfigError, match="2-D"):
        metrics.fsim(np.zeros((2, 8, 8)), np.zeros((2, 8, 8)))
    with pytest.raises(ConfigError, match="Unknown window"):
        metrics.psnr(np.zeros((8, 8)), np.zeros((8, 8)), window="kidney")
    with pytest.raises(ConfigError, match="Unknown metric"):
        metrics.evaluate_volume(np.zeros((1, 16, 16)), np.zeros((1, 16, 16)), metrics=("lpips",))


def test_evaluate_volume_reports_per_slice_values_and_summaries():
    ref = np.stack([_phantom_hu((64, 64), seed=s) for s in range(3)])
    pred = ref.copy()
    pred[1] += 15.0 * np.random.default_rng(6).standard_normal(pred[1].shape).astype(np.float32)
    pred[2] += 30.0 * np.random.default_rng(7).standard_normal(pred[2].shape).astype(np.float32)
    result = metrics.evaluate_volume(pred, ref, "abdomen")
    assert set(result) == {"psnr", "ssim", "fsim"}
    for name in ("psnr", "ssim", "fsim"):
        assert result[name]["per_slice"].shape == (3,)
        assert result[name]["n"] == 3
    # Slice 0 is identical: PSNR inf is counted, not averaged.
    assert result["psnr"]["per_slice"][0] == math.inf
    assert result["psnr"]["n_infinite"] == 1
    finite = result["psnr"]["per_slice"][1:]
    assert result["psnr"]["mean"] == pytest.approx(finite.mean())
    assert result["psnr"]["std"] == pytest.approx(finite.std())
    assert result["ssim"]["per_slice"][1] == pytest.approx(metrics.ssim(pred[1], ref[1]))
    assert result["fsim"]["per_slice"][2] == pytest.approx(metrics.fsim(pred[2], ref[2]))
    assert result["ssim"]["per_slice"][0] > result["ssim"]["per_slice"][1] > result["ssim"]["per_slice"][2]


def test_metrics_module_imports_neither_torch_nor_qt():
    code = (
        "import sys, napari_langmamba.metrics; "
        "bad = [m for m in ('torch', 'qtpy', 'PyQt6', 'napari') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


# --- FSIM against an independent implementation --------------------------------------
#
# Reference values were computed with the `piq` package (version 0.8.0, PyTorch 2.14.1 CPU,
# NumPy 2.4.6) in a scratch virtual environment -- never installed in the project -- as
#
#     piq.fsim(torch.from_numpy(x)[None, None], torch.from_numpy(ref)[None, None],
#              data_range=1.0, chromatic=False, reduction="none").item()
#
# on float64 copies of exactly the images the helpers below rebuild (saved to .npy by the
# project's environment, loaded in the scratch one).
#
# Tolerance: our FSIM follows the authors' MATLAB code (FeatureSIM.m / phasecong2.m); piq
# differs from it in three small details: its frequency grid is the transpose of MATLAB's
# (meshgrid "ij"), it normalises the mean phase with machine epsilon instead of 1e-4, and it
# takes the lower median of an even count. With those three switched to piq's choices our
# phase-congruency maps equal piq's to 4e-14 (checked while writing this test); as written,
# the FSIM values differ by at most 7.1e-6 over these cases. 5e-5 leaves a margin for FFT
# rounding across platforms and is still ~100x smaller than the gaps between the cases.
FSIM_TOLERANCE = 5e-5

PIQ_FSIM_SYNTHETIC = {
    "synth256": 0.8634821492184934,
    "synth192x320": 0.8518470821383889,
}
PIQ_FSIM_CT = {
    "ct_noise20": 0.9819750908897247,
    "ct_noise50": 0.9340963636170255,
    "ct_blur2": 0.8588424293558271,
}


def _synthetic_pair(shape, seed):
    field = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(shape), 4.0)
    ref = (field - field.min()) / (field.max() - field.min())
    x = np.clip(ref + 0.05 * np.random.default_rng(seed + 1).standard_normal(shape), 0, 1)
    return x, ref


def _ct_pair(hu_slice: np.ndarray, case: str):
    s = hu_slice.astype(np.float64)
    if case == "ct_noise20":
        x = s + 20 * np.random.default_rng(1).standard_normal(s.shape)
    elif case == "ct_noise50":
        x = s + 50 * np.random.default_rng(2).standard_normal(s.shape)
    else:
        x = ndimage.gaussian_filter(s, 2.0)
    return ABDOMEN.apply(x).astype(np.float64), ABDOMEN.apply(s).astype(np.float64)


@pytest.mark.parametrize(("case", "shape", "seed"), [("synth256", (256, 256), 3), ("synth192x320", (192, 320), 5)])
def test_fsim_matches_piq_on_synthetic_images(case, shape, seed):
    x, ref = _synthetic_pair(shape, seed)
    assert metrics.fsim_unit(x, ref) == pytest.approx(PIQ_FSIM_SYNTHETIC[case], abs=FSIM_TOLERANCE)


@pytest.fixture(scope="module")
def ct_slice(dicom_series_dir):
    from napari_langmamba.io import read_ct

    volume = read_ct(dicom_series_dir)
    assert volume.hu.shape == (20, 512, 512)
    return volume.hu[10]  # slices ordered feet to head; 512x512 -> FSIM downsamples by 2


@pytest.mark.parametrize("case", sorted(PIQ_FSIM_CT))
def test_fsim_matches_piq_on_a_real_ct_slice(ct_slice, case):
    x, ref = _ct_pair(ct_slice, case)
    assert metrics.fsim_unit(x, ref) == pytest.approx(PIQ_FSIM_CT[case], abs=FSIM_TOLERANCE)
