"""Projection-domain low-dose simulation: physics, calibration on real CT, the dataset cache, the CLI."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import numpy as np
import pytest

from napari_langmamba.errors import ConfigError
from napari_langmamba.events import run
from training import simulate
from training.config import load_config_file, resolve_options
from training.simulate import (
    SimulationOptions,
    forward_project,
    iter_simulate_dataset,
    noise_statistics,
    projection_noise_variance,
    simulate_low_dose,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # .npy inputs carry no spacing

TINY = SimulationOptions(n_views=32, i0=1e5)  # fast settings for the dataset machinery


def _water_disc(n=128, pixel_mm=0.5, radius_mm=25.0) -> np.ndarray:
    yy, xx = (np.indices((n, n)) - (n - 1) / 2) * pixel_mm
    hu = np.full((n, n), -1000.0, dtype=np.float32)
    hu[yy**2 + xx**2 <= radius_mm**2] = 0.0
    return hu


# --- physics on small phantoms ----------------------------------------------------------


def test_forward_projection_gives_line_integrals_in_physical_units():
    # Through the centre of a water disc of radius 25 mm the line integral is 2 R mu_water.
    sinogram = forward_project(_water_disc(), pixel_mm=0.5, n_views=36)
    assert sinogram.shape == (math.ceil(math.sqrt(2) * 128), 36)
    assert sinogram.max(axis=0) == pytest.approx(np.full(36, 50.0 * 0.019), rel=0.03)
    assert sinogram.min() >= 0.0


def test_noise_variance_follows_the_dose_formula():
    p = np.array([[0.0, 2.0, 5.0]])
    a, i0, sigma_e = 0.25, 1e5, 3.0
    expected = (1 / a - 1) * np.exp(p) / i0 + (1 / a**2 - 1) * sigma_e**2 * np.exp(2 * p) / i0**2
    assert projection_noise_variance(p, dose=a, i0=i0, electronic_noise=sigma_e) == pytest.approx(expected)
    assert np.all(projection_noise_variance(p, dose=1.0, i0=i0, electronic_noise=sigma_e) == 0.0)
    # Rays with less than one expected low-dose photon are clamped to one photon.
    deep = projection_noise_variance(np.array([40.0, 60.0]), dose=a, i0=i0)
    assert deep[0] == deep[1] == pytest.approx((1 / a - 1) * (a * i0) / i0)


def test_simulation_is_seeded_and_keeps_shape_for_non_square_slices():
    hu = _water_disc()[:, 16:112]  # 128 x 96
    kwargs = dict(pixel_mm=0.5, n_views=48, i0=1e5)
    first = simulate_low_dose(hu, seed=7, **kwargs)
    assert first.shape == hu.shape and first.dtype == np.float32
    np.testing.assert_array_equal(first, simulate_low_dose(hu, seed=7, **kwargs))
    assert not np.array_equal(first, simulate_low_dose(hu, seed=8, **kwargs))
    assert np.std(first - hu) > 1.0


def test_options_are_validated():
    with pytest.raises(ConfigError, match="dose fraction"):
        SimulationOptions(dose=0.0)
    with pytest.raises(ConfigError, match="filter"):
        SimulationOptions(filter="butterworth")
    with pytest.raises(ConfigError, match="pixel size"):
        simulate_low_dose(np.zeros((32, 32)), pixel_mm=0.0)
    with pytest.raises(ConfigError, match="sinogram"):
        simulate_low_dose(np.zeros((32, 32)), pixel_mm=1.0, n_views=32, sinogram=np.zeros((10, 32)))


# --- calibration on a real 512 x 512 abdominal slice (default options) --------------------


@pytest.fixture(scope="module")
def real_slice(dicom_series_dir):
    from napari_langmamba.io import read_ct

    volume = read_ct(dicom_series_dir)
    assert volume.hu.shape[1:] == (512, 512)
    pixel_mm = volume.spacing[2]
    hu = volume.hu[10]  # upper abdomen: liver, stomach, spleen
    defaults = SimulationOptions()
    sinogram = forward_project(hu, pixel_mm=pixel_mm, n_views=defaults.n_views, mu_water=defaults.mu_water)
    return hu, pixel_mm, sinogram


@pytest.fixture(scope="module")
def quarter_dose(real_slice):
    hu, pixel_mm, sinogram = real_slice
    return simulate_low_dose(hu, pixel_mm=pixel_mm, dose=0.25, seed=1, sinogram=sinogram)


@pytest.mark.slow
def test_quarter_dose_noise_matches_the_challenge_calibration(real_slice, quarter_dose):
    hu, _, _ = real_slice
    stats = noise_statistics(quarter_dose, hu)
    assert abs(stats["noise_mean_hu"]) < 0.5  # zero-mean noise, the anatomy untouched
    assert 20.0 <= stats["central_noise_sd_hu"] <= 30.0  # central 128 x 128 soft-tissue patch
    assert 15.0 <= stats["noise_sd_hu"] <= 20.0  # whole image


@pytest.mark.slow
def test_noise_scales_as_sqrt_of_inverse_dose_minus_one(real_slice, quarter_dose):
    hu, pixel_mm, sinogram = real_slice
    sd_quarter = noise_statistics(quarter_dose, hu)["central_noise_sd_hu"]
    for seed, dose in ((2, 0.1), (3, 0.5)):
        low = simulate_low_dose(hu, pixel_mm=pixel_mm, dose=dose, seed=seed, sinogram=sinogram)
        ratio = noise_statistics(low, hu)["central_noise_sd_hu"] / sd_quarter
        expected = math.sqrt((1 / dose - 1) / (1 / 0.25 - 1))
        # 10%: the small electronic-noise term scales as (1/a^2 - 1), not (1/a - 1).
        assert ratio == pytest.approx(expected, rel=0.10)


def test_full_dose_adds_nothing(real_slice):
    hu, pixel_mm, sinogram = real_slice
    np.testing.assert_array_equal(simulate_low_dose(hu, pixel_mm=pixel_mm, dose=1.0, sinogram=sinogram), hu)


# --- the paired dataset folder ------------------------------------------------------------


@pytest.fixture()
def tiny_volume(tmp_path):
    rng = np.random.default_rng(0)
    volume = np.stack([_water_disc(48, 1.0, 18.0) + 30.0 * k for k in range(3)]) + rng.normal(0, 5, (3, 48, 48))
    path = tmp_path / "ndct.npy"
    np.save(path, volume.astype(np.float32))
    return path


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.npy"))}


def test_dataset_folder_layout_and_manifest(tiny_volume, tmp_path):
    out = run(iter_simulate_dataset([tiny_volume], tmp_path / "pairs", options=TINY, workers=1))
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["complete"] is True
    assert manifest["options"] == {
        "dose": 0.25, "i0": 1e5, "electronic_noise": 3.0, "filter": "cosine", "n_views": 32,
        "mu_water": 0.019, "seed": 0, "match_noise": False,
    }
    assert [s["key"] for s in manifest["slices"]] == ["00000", "00001", "00002"]
    assert manifest["sources"][0]["path"] == str(tiny_volume.resolve())
    source = np.load(tiny_volume)
    for entry in manifest["slices"]:
        full = np.load(out / entry["full"])
        low = np.load(out / entry["low"])
        assert full.dtype == low.dtype == np.float32
        np.testing.assert_array_equal(full, source[entry["slice_index"]])
        assert entry["noise_sd_hu"] == pytest.approx(np.std(low.astype(np.float64) - full))


def test_dataset_is_cached_and_refuses_other_options(tiny_volume, tmp_path):
    out = tmp_path / "pairs"
    run(iter_simulate_dataset([tiny_volume], out, options=TINY, workers=1))
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.npy")}
    events = list(_progress(iter_simulate_dataset([tiny_volume], out, options=TINY, workers=1)))
    assert events[-1].message == "cached"
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.npy")} == mtimes

    other = SimulationOptions(n_views=32, i0=1e5, dose=0.5)
    with pytest.raises(ConfigError, match="other inputs or options"):
        run(iter_simulate_dataset([tiny_volume], out, options=other, workers=1))
    run(iter_simulate_dataset([tiny_volume], out, options=other, workers=1, overwrite=True))
    assert json.loads((out / "dataset.json").read_text())["options"]["dose"] == 0.5


def _progress(generator):
    while True:
        try:
            yield next(generator)
        except StopIteration:
            return


def test_interrupted_run_resumes_to_the_same_result(tiny_volume, tmp_path):
    reference = run(iter_simulate_dataset([tiny_volume], tmp_path / "ref", options=TINY, workers=1))
    generator = iter_simulate_dataset([tiny_volume], tmp_path / "resumed", options=TINY, workers=1)
    for event in generator:
        if event.message.startswith("slice"):
            break  # one slice written
    generator.close()
    partial = json.loads((tmp_path / "resumed" / "dataset.json").read_text())
    assert partial["complete"] is False
    resumed = run(iter_simulate_dataset([tiny_volume], tmp_path / "resumed", options=TINY, workers=1))
    assert _files(resumed) == _files(reference)


def test_worker_processes_give_the_same_pairs(tiny_volume, tmp_path):
    serial = run(iter_simulate_dataset([tiny_volume], tmp_path / "serial", options=TINY, workers=1))
    parallel = run(iter_simulate_dataset([tiny_volume], tmp_path / "parallel", options=TINY, workers=2))
    assert _files(parallel) == _files(serial)


def test_cli_flags_override_the_config_file(tiny_volume, tmp_path):
    config = tmp_path / "options.yaml"
    config.write_text("simulate:\n  dose: 0.5\n  n-views: 64\n  i0: 100000\n  workers: 1\nseed:\n  epochs: 3\n")
    parser = argparse.ArgumentParser()
    simulate.add_arguments(parser)
    args = parser.parse_args(
        ["--config", str(config), "--input", str(tiny_volume), "--out", str(tmp_path / "cli"), "--n-views", "32"]
    )
    assert simulate.main(args) == 0
    options = json.loads((tmp_path / "cli" / "dataset.json").read_text())["options"]
    assert options["dose"] == 0.5  # from the file's simulate section
    assert options["n_views"] == 32  # the flag wins over the file's 64
    assert options["filter"] == "cosine"  # the default


def test_config_files_are_validated(tmp_path):
    bad_key = tmp_path / "bad.json"
    bad_key.write_text(json.dumps({"dose": 0.5, "dosee": 0.3}))
    with pytest.raises(ConfigError, match="dosee"):
        resolve_options(SimulationOptions, config=bad_key, stage="simulate")
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config_file(not_mapping)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config_file(broken)
    assert resolve_options(SimulationOptions, config={"n-views": 90}).n_views == 90


# --- noise matched to the image's own noise ---------------------------------------------


def _noisy_soft_tissue_disc(i0: float, seeds=(5, 6), pixel_mm=1.0) -> np.ndarray:
    """Slices of a 40 HU disc carrying the ramp-filtered quantum noise of ``i0`` photons per ray."""
    n = 128
    yy, xx = (np.indices((n, n)) - (n - 1) / 2) * pixel_mm
    clean = np.where(yy**2 + xx**2 <= (0.45 * n * pixel_mm) ** 2, 40.0, -1000.0).astype(np.float32)
    # dose 0.5 inserts exactly the quantum variance of the full dose: the slice is "scanned" at i0
    return np.stack([simulate_low_dose(clean, pixel_mm=pixel_mm, dose=0.5, i0=i0, electronic_noise=0.0,
                                       filter="ramp", n_views=180, seed=s) for s in seeds])


def test_matched_i0_recovers_the_photon_count_of_a_noisy_slice():
    options = SimulationOptions(filter="ramp", n_views=180)  # probe at the default I0 of 2e6
    for i0 in (3e4, 3e5):
        matched = simulate.matched_i0(list(_noisy_soft_tissue_disc(i0)), pixel_mm=1.0, options=options)
        assert matched["i0"] == pytest.approx(i0, rel=0.15)
        assert matched["n_blocks"] >= 16 and matched["n_slices"] == 2
        assert matched["image_over_probe_noise_variance"] == pytest.approx(2e6 / i0, rel=0.15)
    with pytest.raises(ConfigError, match="--i0"):  # no soft tissue: nothing to measure
        simulate.matched_i0([_water_disc(64, 1.0, 20.0) - 100.0], pixel_mm=1.0, options=options)


def test_match_noise_dataset_inserts_the_image_noise_times_one_over_dose_minus_one(tmp_path):
    i0 = 5e4
    volume = _noisy_soft_tissue_disc(i0, seeds=(1, 2, 3))
    path = tmp_path / "sharp.npy"
    np.save(path, volume)
    options = SimulationOptions(dose=0.25, filter="ramp", n_views=180, electronic_noise=0.0, match_noise=True)
    out = run(iter_simulate_dataset([path], tmp_path / "pairs", options=options, workers=1))
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["options"]["match_noise"] is True
    assert manifest["sources"][0]["noise_match"]["i0"] == pytest.approx(i0, rel=0.15)
    # the inserted noise has (1/0.25 - 1) = 3x the variance of the slice's own noise
    own = np.std(volume[:, 44:84, 44:84] - np.median(volume[:, 44:84, 44:84]))
    low = np.stack([np.load(out / s["low"]) for s in manifest["slices"]])
    full = np.stack([np.load(out / s["full"]) for s in manifest["slices"]])
    inserted = np.std((low - full)[:, 44:84, 44:84])
    assert inserted / own == pytest.approx(math.sqrt(3.0), rel=0.15)
    # without matching, the calibrated I0 of 2e6 inserts far less on this noisy "scanner"
    plain = run(iter_simulate_dataset([path], tmp_path / "plain", options=dataclasses.replace(options,
                                                                                              match_noise=False)))
    plain_manifest = json.loads((plain / "dataset.json").read_text())
    assert "noise_match" not in plain_manifest["sources"][0] and plain_manifest["fingerprint"] != manifest["fingerprint"]
    assert np.std((np.load(plain / "low/00000.npy") - volume[0])[44:84, 44:84]) < 0.3 * inserted


def test_a_matched_dataset_from_another_noise_measurement_is_not_reused(tmp_path, monkeypatch):
    volume = _noisy_soft_tissue_disc(5e4, seeds=(1, 2))
    path = tmp_path / "sharp.npy"
    np.save(path, volume)
    options = SimulationOptions(dose=0.25, filter="ramp", n_views=180, electronic_noise=0.0, match_noise=True)
    out = run(iter_simulate_dataset([path], tmp_path / "pairs", options=options, workers=1))
    first = json.loads((out / "dataset.json").read_text())["fingerprint"]
    revision = simulate.MATCH_PROBE["revision"]
    # the same inputs and options, the I0 measured another way (an older revision of the probe)
    monkeypatch.setitem(simulate.MATCH_PROBE, "revision", revision - 1)
    with pytest.raises(ConfigError, match="other inputs or options"):
        run(iter_simulate_dataset([path], out, options=options, workers=1))
    remade = run(iter_simulate_dataset([path], out, options=options, workers=1, overwrite=True))
    assert json.loads((remade / "dataset.json").read_text())["fingerprint"] != first
    # a plain (unmatched) dataset's fingerprint does not depend on the probe
    plain = dataclasses.replace(options, match_noise=False)
    made = run(iter_simulate_dataset([path], tmp_path / "plain", options=plain, workers=1))
    monkeypatch.setitem(simulate.MATCH_PROBE, "revision", revision)
    assert run(iter_simulate_dataset([path], made, options=plain, workers=1)) == made


def test_pair_options_check_the_simulated_noise_options():
    from training.options import PairDataOptions

    ok = PairDataOptions(simulate_from=("x.npy",), sim_filter=" Ramp ", sim_match_noise=True)
    ok._check_pair_data()
    assert ok.sim_filter == "ramp" and ok.sim_match_noise is True
    with pytest.raises(ConfigError, match="--sim-filter"):
        PairDataOptions(simulate_from=("x.npy",), sim_filter="B70f")._check_pair_data()
    with pytest.raises(ConfigError, match="match_noise"):
        SimulationOptions(match_noise="yes")
