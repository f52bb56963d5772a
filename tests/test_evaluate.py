"""The evaluate stage: per-slice metrics of a denoiser and of the low-dose input, table / CSV / JSON."""

from __future__ import annotations

import argparse
import csv
import json
import math

import numpy as np
import pytest
from scipy import ndimage

from napari_langmamba import metrics
from napari_langmamba.errors import CheckpointError, ConfigError
from napari_langmamba.events import run
from training import evaluate
from training.evaluate import evaluate_pairs, load_checkpoint_denoiser, write_results
from training.simulate import SimulationOptions, iter_simulate_dataset

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # .npy inputs carry no spacing


def _pairs(n=3, shape=(48, 48)):
    """Smooth 'anatomy' in HU plus 25 HU white noise on the low-dose side."""
    out = []
    for k in range(n):
        field = ndimage.gaussian_filter(np.random.default_rng(k).standard_normal(shape), 4.0)
        full = (40.0 + 120.0 * field / np.abs(field).max()).astype(np.float32)
        low = full + 25.0 * np.random.default_rng(100 + k).standard_normal(shape).astype(np.float32)
        out.append((f"slice{k}", low, full))
    return out


def gaussian_denoise(hu):
    """A classical denoiser with the contract's signature: HU (z, y, x) -> HU (z, y, x)."""
    return ndimage.gaussian_filter(np.asarray(hu, dtype=np.float32), sigma=(0, 1.0, 1.0))


def test_evaluation_rows_match_the_metrics_and_the_filter_beats_the_input():
    pairs = _pairs()
    result = evaluate_pairs(pairs, denoise=gaussian_denoise, method_name="gauss")
    assert result.methods == ("low-dose", "gauss")
    assert len(result.rows) == 3 * 2 and result.n_slices == 3
    for key, low, full in pairs:
        (row,) = [r for r in result.rows if r["key"] == key and r["method"] == "low-dose"]
        assert row["psnr"] == pytest.approx(metrics.psnr(low, full))
        assert row["ssim"] == pytest.approx(metrics.ssim(low, full))
        assert row["fsim"] == pytest.approx(metrics.fsim(low, full))
        (row,) = [r for r in result.rows if r["key"] == key and r["method"] == "gauss"]
        assert row["psnr"] == pytest.approx(metrics.psnr(gaussian_denoise(low[None])[0], full))
    summary = result.summary()
    for name in ("psnr", "ssim"):
        values = result.values("gauss", name)
        assert summary["gauss"][name]["mean"] == pytest.approx(values.mean())
        assert summary["gauss"][name]["std"] == pytest.approx(values.std())
    assert summary["gauss"]["psnr"]["mean"] > summary["low-dose"]["psnr"]["mean"]


def test_csv_and_json_outputs(tmp_path):
    pairs = _pairs(n=2)
    pairs.append(("same", pairs[0][2], pairs[0][2]))  # an unprocessed slice equal to its reference
    result = evaluate_pairs(pairs, denoise=lambda hu: np.asarray(hu), window="abdomen")
    csv_path, json_path = write_results(result, tmp_path / "eval")
    with csv_path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["key", "method", "psnr", "ssim", "fsim"]
    assert [(r["key"], r["method"]) for r in rows] == [
        (k, m) for k in ("slice0", "slice1", "same") for m in ("low-dose", "model")
    ]
    assert float(rows[-1]["psnr"]) == math.inf and float(rows[-1]["ssim"]) == pytest.approx(1.0)

    data = json.loads(json_path.read_text())  # strict JSON: no Infinity/NaN
    assert data["window"] == {"name": "abdomen", "lower_hu": -160.0, "upper_hu": 240.0}
    assert data["data_range"] == 1.0 and data["n_slices"] == 3
    assert data["per_slice"][-1]["psnr"] is None
    psnr = data["summary"]["model"]["psnr"]
    finite = [float(r["psnr"]) for r in rows if r["method"] == "model" and r["psnr"] != "inf"]
    assert psnr["mean"] == pytest.approx(np.mean(finite)) and psnr["n_infinite"] == 1
    # The identity "model" equals the input, row for row.
    assert data["summary"]["model"] == data["summary"]["low-dose"]


def test_table_shows_mean_and_std_per_method():
    result = evaluate_pairs(_pairs(n=2), denoise=gaussian_denoise, metrics=("psnr", "ssim"), window=(-100, 200))
    table = result.format_table()
    lines = table.splitlines()
    assert "2 slices" in lines[0] and "[-100, 200] HU" in lines[0]
    assert lines[2] == "| method | PSNR (dB) | SSIM |" and lines[3] == "|---|---|---|"  # markdown
    mean = result.summary()["model"]["psnr"]["mean"]
    model_line = next(line for line in lines if line.startswith("| model"))
    assert f"{mean:.2f} ±" in model_line and "FSIM" not in table


def test_bad_denoisers_and_options_are_reported():
    pairs = _pairs(n=1)
    with pytest.raises(ConfigError, match="returned shape"):
        evaluate_pairs(pairs, denoise=lambda hu: hu[0])
    with pytest.raises(ConfigError, match="NaN"):
        evaluate_pairs(pairs, denoise=lambda hu: hu * np.nan)
    with pytest.raises(ConfigError, match="Unknown metric"):
        evaluate_pairs(pairs, metrics=("mse",))
    with pytest.raises(ConfigError, match="no slice pairs"):
        evaluate_pairs([])


def test_checkpoint_hook_reports_a_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="No checkpoint"):
        load_checkpoint_denoiser(tmp_path / "no-such-run", device="cpu")


def test_cli_on_a_simulated_folder(tmp_path, capsys):
    volume = np.stack([_pairs(n=1, shape=(40, 40))[0][2] + 10.0 * k for k in range(2)])
    np.save(tmp_path / "v.npy", volume)
    folder = run(
        iter_simulate_dataset([tmp_path / "v.npy"], tmp_path / "sim", options=SimulationOptions(n_views=24), workers=1)
    )
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    args = parser.parse_args(["--data", str(folder), "--metrics", "psnr", "ssim", "--out", str(tmp_path / "out")])
    assert evaluate.main(args) == 0
    printed = capsys.readouterr().out
    assert "low-dose" in printed and "2 slices" in printed
    data = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert data["methods"] == ["low-dose"] and data["metrics"] == ["psnr", "ssim"]
    low = np.load(folder / "low" / "00001.npy")
    assert data["per_slice"][1]["psnr"] == pytest.approx(metrics.psnr(low, volume[1]))
    assert data["info"]["options"]["data"] == str(folder)

    with pytest.raises(ConfigError, match="--data FOLDER"):
        evaluate.main(parser.parse_args([]))


# --- classical baselines, several models, pairs of several patients and doses ------------------------


class _Patient:
    """A pair source of one 'patient': the _pairs() anatomy with white noise of ``noise`` HU."""

    def __init__(self, seed, noise=25.0, n=2, shape=(48, 48)):
        self.items = []
        for k in range(n):
            field = ndimage.gaussian_filter(np.random.default_rng(seed + k).standard_normal(shape), 4.0)
            full = (40.0 + 120.0 * field / np.abs(field).max()).astype(np.float32)
            low = full + noise * np.random.default_rng(1000 + seed + k).standard_normal(shape).astype(np.float32)
            self.items.append((f"s{k}", low, full))

    def __len__(self):
        return len(self.items)

    def key(self, i):
        return self.items[i][0]

    def pair_hu(self, i):
        return self.items[i][1], self.items[i][2]


def test_a_baseline_is_tuned_to_the_grid_point_of_best_psnr():
    tune = _Patient(seed=0, n=3)
    grid = [{"sigma_px": s} for s in (0.3, 1.0, 3.0)]
    tuned = evaluate.tune_baseline("gaussian", tune, max_slices=2, grid=grid)
    picked = [tune.items[0], tune.items[2]]  # two slices spread over three
    assert tuned["keys"] == ["s0", "s2"]
    direct = [np.mean([metrics.psnr(ndimage.gaussian_filter(low.astype(np.float64), g["sigma_px"]), full)
                       for _k, low, full in picked]) for g in grid]
    assert [s["psnr"] for s in tuned["grid"]] == pytest.approx(direct)
    assert tuned["params"] == grid[int(np.argmax(direct))] and tuned["psnr"] == pytest.approx(max(direct))
    nlm = evaluate.tune_baseline("nlm", tune, max_slices=1, grid=[{"h_factor": 1.0}, {"h_hu": 2.0}])
    assert nlm["params"] == {"h_factor": 1.0}  # h of 2 HU barely touches 25 HU noise
    low, full = tune.pair_hu(0)
    smoothed = evaluate.baseline_denoiser("nlm", {"h_factor": 1.0})(low[None])
    assert smoothed.shape == (1, 48, 48) and metrics.psnr(smoothed[0], full) > metrics.psnr(low, full) + 2.0
    with pytest.raises(ConfigError, match="Unknown baseline"):
        evaluate.baseline_denoiser("median", {})


def test_bm3d_runs_on_the_cpu_and_removes_noise():
    pytest.importorskip("bm3d", reason="the optional bm3d package is not installed")
    assert evaluate.baseline_available("bm3d") is None
    low, full = _Patient(seed=3).pair_hu(0)
    out = evaluate.baseline_denoiser("bm3d", {"sigma_hu": 25.0})(low[None])[0]
    assert metrics.psnr(out, full) > metrics.psnr(low, full) + 2.0
    # sigma as a multiple of the slice's estimated noise SD: the same filter at that sigma
    from skimage.restoration import estimate_sigma

    sigma = float(estimate_sigma(low.astype(np.float64)))
    assert 15.0 < sigma < 35.0  # the phantom's 25 HU noise
    relative = evaluate.baseline_denoiser("bm3d", {"sigma_factor": 1.5})(low[None])[0]
    np.testing.assert_allclose(relative, evaluate.baseline_denoiser("bm3d", {"sigma_hu": 1.5 * sigma})(low[None])[0],
                               atol=1e-3)


def test_results_of_several_doses_get_a_table_each():
    from training.datasets import PairGroup, PairSet

    pairs = PairSet([PairGroup(_Patient(seed=0, noise=60.0), patient="V", name="V/10", dose=0.1),
                     PairGroup(_Patient(seed=0, noise=15.0), patient="V", name="V/50", dose=0.5)])
    result = evaluate_pairs(pairs, denoisers={"gauss": gaussian_denoise, "ident": lambda hu: np.asarray(hu)},
                            metrics=("psnr",))
    assert result.methods == ("low-dose", "gauss", "ident") and result.doses == [0.1, 0.5]
    assert {r["dose"] for r in result.rows if r["key"].startswith("V/10/")} == {0.1}
    table = result.format_table()
    assert "dose 10%: 2 slices" in table and "dose 50%: 2 slices" in table
    by_dose = result.to_dict()["summary_by_dose"]
    assert by_dose["dose 10%"]["low-dose"]["psnr"]["mean"] == pytest.approx(result.values("low-dose", "psnr")[:2].mean())
    assert by_dose["dose 10%"]["low-dose"]["psnr"]["mean"] < by_dose["dose 50%"]["low-dose"]["psnr"]["mean"]
    assert set(result.info["seconds_per_slice"]) == {"gauss", "ident"}


def _manifest(tmp_path):
    rows = ["low,full,patient,dose"]
    for name, seed in (("T", 0), ("U", 10), ("V", 20)):
        patient = _Patient(seed=seed)
        np.save(tmp_path / f"{name}_low.npy", np.stack([low for _k, low, _f in patient.items]))
        np.save(tmp_path / f"{name}_full.npy", np.stack([full for _k, _l, full in patient.items]))
        rows.append(f"{name}_low.npy,{name}_full.npy,{name},0.25")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "pairs.csv"


def test_cli_compares_input_tuned_baselines_and_labelled_models(tmp_path, capsys):
    import torch

    from napari_langmamba.checkpoint import save_checkpoint
    from napari_langmamba.models.redcnn import REDCNN, REDCNNConfig

    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "run" / "best", REDCNN(REDCNNConfig.preset("tiny")), kind="redcnn")
    manifest = _manifest(tmp_path)
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    args = ["--manifest", str(manifest), "--val-patients", "V", "--baselines", "gaussian,nlm", "--tune-patients",
            "T", "U", "--tune-slices", "2", "--weights", f"A={ckpt}", "--weights", str(ckpt), "--device", "cpu",
            "--metrics", "psnr", "ssim", "--out", str(tmp_path / "out")]
    assert evaluate.main(parser.parse_args(args)) == 0
    printed = capsys.readouterr().out
    assert "| gaussian |" in printed and "| A |" in printed and "seconds per slice" in printed
    data = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert data["methods"] == ["low-dose", "gaussian", "nlm", "A", "run/best"]
    assert {r["patient"] for r in data["per_slice"]} == {"V"} and data["n_slices"] == 2
    gauss = data["info"]["baselines"]["gaussian"]
    tuned = gauss["by_dose"]["dose 25%"]
    assert {k.split("/")[0] for k in tuned["keys"]} <= {"T", "U"} and gauss["tune_patients"] == ["T", "U"]
    assert len(tuned["grid"]) == len(evaluate.BASELINE_GRIDS["gaussian"])
    # the table's Gaussian rows are the tuned filter applied to the validation slices
    patient_v = _Patient(seed=20)
    sigma = tuned["params"]["sigma_px"]
    expected = [metrics.psnr(ndimage.gaussian_filter(low.astype(np.float64), sigma), full)
                for _k, low, full in patient_v.items]
    assert [r["psnr"] for r in data["per_slice"] if r["method"] == "gaussian"] == pytest.approx(expected, rel=1e-5)
    a = [r["psnr"] for r in data["per_slice"] if r["method"] == "A"]
    assert a == [r["psnr"] for r in data["per_slice"] if r["method"] == "run/best"]  # the same weights
    assert data["summary"]["nlm"]["psnr"]["mean"] > data["summary"]["low-dose"]["psnr"]["mean"]

    # the tuned parameters are reused from the JSON without tuning again
    again = ["--manifest", str(manifest), "--val-patients", "V", "--baselines", "gaussian", "--tuned",
             str(tmp_path / "out" / "evaluation.json"), "--metrics", "psnr"]
    assert evaluate.main(parser.parse_args(again)) == 0
    assert f"gaussian: dose 25%: sigma_px={sigma:g}" in capsys.readouterr().out


def test_self_ensemble_adds_a_row_per_model_with_the_averaged_model(tmp_path, capsys):
    import torch

    from napari_langmamba.checkpoint import save_checkpoint
    from napari_langmamba.inference import Denoiser
    from napari_langmamba.models.redcnn import REDCNN, REDCNNConfig

    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "m", REDCNN(REDCNNConfig.preset("tiny")), kind="redcnn")
    manifest = _manifest(tmp_path)
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    args = ["--manifest", str(manifest), "--val-patients", "V", "--weights", f"M={ckpt}", "--self-ensemble",
            "--device", "cpu", "--metrics", "psnr", "--out", str(tmp_path / "out")]
    assert evaluate.main(parser.parse_args(args)) == 0
    assert "| M + self-ensemble |" in capsys.readouterr().out
    data = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert data["methods"] == ["low-dose", "M", "M + self-ensemble"]
    assert data["info"]["models"] == {"M": str(ckpt), "M + self-ensemble": str(ckpt)}
    denoiser = Denoiser.load(ckpt, device="cpu")
    lows = [low for _k, low, _f in _Patient(seed=20).items]
    fulls = [full for _k, _l, full in _Patient(seed=20).items]
    plain = [metrics.psnr(denoiser.denoise(low[None])[0], full) for low, full in zip(lows, fulls, strict=True)]
    averaged = [metrics.psnr(denoiser.denoise(low[None], self_ensemble=True)[0], full)
                for low, full in zip(lows, fulls, strict=True)]
    rows = {m: [r["psnr"] for r in data["per_slice"] if r["method"] == m] for m in ("M", "M + self-ensemble")}
    assert rows["M"] == pytest.approx(plain, rel=1e-5)
    assert rows["M + self-ensemble"] == pytest.approx(averaged, rel=1e-5)
    assert rows["M"] != pytest.approx(rows["M + self-ensemble"], rel=1e-4)  # another estimate
    with pytest.raises(ConfigError, match="--self-ensemble averages a model"):
        evaluate.main(parser.parse_args(["--manifest", str(manifest), "--self-ensemble"]))


def test_baselines_are_never_tuned_on_the_evaluated_patients(tmp_path):
    manifest = _manifest(tmp_path)
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    base = ["--manifest", str(manifest), "--baselines", "gaussian"]
    with pytest.raises(ConfigError, match="both tuned on and evaluated"):
        evaluate.main(parser.parse_args([*base, "--val-patients", "V", "--tune-patients", "V,T"]))
    with pytest.raises(ConfigError, match="--tune-patients"):
        evaluate.main(parser.parse_args(base))
    with pytest.raises(ConfigError, match="Unknown baseline"):
        evaluate.main(parser.parse_args([*base, "median", "--tune-patients", "T"]))
    with pytest.raises(ConfigError, match="No pairs of patient"):
        evaluate.main(parser.parse_args([*base, "--tune-patients", "Q"]))
