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
    assert lines[1].split() == ["method", "PSNR", "(dB)", "SSIM"]
    mean = result.summary()["model"]["psnr"]["mean"]
    model_line = next(line for line in lines if line.startswith("model"))
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
