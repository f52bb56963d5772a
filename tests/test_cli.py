"""The headless CLI: denoise real DICOM into a derived series, refuse overwrites, clear errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from napari_langmamba import cli, session
from napari_langmamba.checkpoint import save_checkpoint
from napari_langmamba.inference import Denoiser
from napari_langmamba.io import read_ct


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny random-init RED-CNN checkpoint (fast on 512 x 512 slices)."""
    from napari_langmamba.models.redcnn import REDCNN, REDCNNConfig

    torch.manual_seed(0)
    return save_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "redcnn", REDCNN(REDCNNConfig.preset("tiny")), kind="redcnn"
    )


@pytest.fixture(scope="module")
def series_dir(dicom_series_dir, tmp_path_factory) -> Path:
    """Three consecutive slices of the real series, copied (files named by UID, not in order)."""
    files = sorted(dicom_series_dir.iterdir())
    z = {f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files}
    chosen = sorted(files, key=z.get)[8:11]
    out = tmp_path_factory.mktemp("series") / "input"
    out.mkdir()
    for f in chosen:
        shutil.copy2(f, out / f.name)
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    return err


def test_denoise_dicom_gives_a_derived_series(series_dir, ckpt, tmp_path, capsys):
    before = snapshot(series_dir)
    out = tmp_path / "denoised"
    code = cli.main(
        ["denoise", str(series_dir), "-o", str(out), "--weights", str(ckpt), "--device", "cpu", "-q"]
    )
    assert code == 0
    assert str(out) in capsys.readouterr().out
    assert snapshot(series_dir) == before  # the input is untouched

    original, derived = read_ct(series_dir), read_ct(out)
    assert derived.shape == original.shape == (3, 512, 512)
    np.testing.assert_allclose(derived.spacing, original.spacing, atol=1e-4)
    np.testing.assert_allclose(derived.origin, original.origin, atol=1e-3)
    np.testing.assert_allclose(derived.direction, original.direction, atol=1e-6)
    expected = Denoiser.load(ckpt, device="cpu").denoise(original.hu)
    assert np.abs(expected - original.hu).mean() > 1.0  # the model did change the image
    np.testing.assert_allclose(derived.hu, expected, atol=0.51)  # int16 storage: exact to 0.5 HU

    old = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(series_dir.iterdir())]
    new = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(out.iterdir())]
    assert len(new) == 3
    assert {d.SeriesInstanceUID for d in new}.isdisjoint({d.SeriesInstanceUID for d in old})
    assert len({d.SeriesInstanceUID for d in new}) == 1
    assert {d.SOPInstanceUID for d in new}.isdisjoint({d.SOPInstanceUID for d in old})
    old_study = {str(d.get("StudyInstanceUID", "")) for d in old}
    new_study = {str(d.StudyInstanceUID) for d in new}
    # The same study when the input names one; this anonymised series has none, so a new one.
    assert new_study == old_study if old_study != {""} else (len(new_study) == 1 and "" not in new_study)
    assert "denoised redcnn tiny" in str(new[0].SeriesDescription)
    assert "DERIVED" in list(new[0].ImageType)


def test_denoise_warns_about_a_kernel_the_model_never_saw(series_dir, ckpt, tmp_path, capsys):
    from napari_langmamba.models.redcnn import REDCNN, REDCNNConfig

    kernel = list(pydicom.dcmread(next(series_dir.iterdir()), stop_before_pixels=True).ConvolutionKernel)
    assert kernel == ["Br38f", "3"]  # the real series' kernel (a two-valued field: named as training records it)
    torch.manual_seed(0)
    record = {"training": {"data": {"train": {"kernels": ["B30f", "D45f"]}}}}
    smooth_only = save_checkpoint(tmp_path / "b30", REDCNN(REDCNNConfig.preset("tiny")), kind="redcnn", extra=record)
    args = [str(series_dir), "--device", "cpu", "-q"]
    assert cli.main(["denoise", *args, "-o", str(tmp_path / "a"), "--weights", str(smooth_only)]) == 0
    err = capsys.readouterr().err
    assert "warning: This series was reconstructed with the kernel Br38f/3; the model was trained on B30f, D45f" in err
    assert cli.main(["denoise", *args, "-o", str(tmp_path / "b"), "--weights", str(ckpt)]) == 0  # no record: quiet
    assert "warning" not in capsys.readouterr().err


def test_refuses_to_overwrite(series_dir, ckpt, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    before = snapshot(series_dir)
    base = ["--weights", str(ckpt), "--device", "cpu", "-q"]

    assert cli.main(["denoise", str(series_dir), "-o", str(out), *base]) == 2
    assert "already exists" in one_line_error(capsys)
    assert (out / "keep.txt").read_text() == "precious"

    # The input itself, a folder inside it, or a folder holding it: refused even with --overwrite.
    for target in (series_dir, series_dir / "sub", series_dir.parent):
        assert cli.main(["denoise", str(series_dir), "-o", str(target), *base, "--overwrite"]) == 2
        one_line_error(capsys)
    assert snapshot(series_dir) == before
    assert not (series_dir / "sub").exists()

    assert cli.main(["denoise", str(series_dir), "-o", str(out), *base, "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and len(read_ct(out).hu) == 3


def test_npy_and_nifti_outputs(series_dir, ckpt, tmp_path):
    base = ["--weights", str(ckpt), "--device", "cpu", "-q"]
    assert cli.main(["denoise", str(series_dir), "-o", str(tmp_path / "d.npy"), *base]) == 0
    assert cli.main(["denoise", str(series_dir), "-o", str(tmp_path / "d.nii.gz"), *base]) == 0
    expected = Denoiser.load(ckpt, device="cpu").denoise(read_ct(series_dir).hu)
    np.testing.assert_allclose(np.load(tmp_path / "d.npy", allow_pickle=False), expected, atol=1e-3)
    nifti = read_ct(tmp_path / "d.nii.gz")
    np.testing.assert_allclose(nifti.hu, expected, atol=0.51)


@pytest.mark.parametrize(
    ("make_input", "extra", "message"),
    [
        (lambda tmp: tmp / "missing", [], "does not exist"),
        (lambda tmp: _garbage(tmp / "junk.dcm"), [], ""),
        (lambda tmp: _garbage(tmp / "junk.nii.gz"), [], ""),
        (lambda tmp: tmp, [], ""),  # an empty folder: no DICOM in it
        ("series", ["--weights", "/nonexistent/ckpt"], "No checkpoint"),
        ("series", ["--device", "cuda:7"], "cuda:7"),
        ("series", ["--series", "9"], ""),
    ],
)
def test_bad_input_exits_2_with_one_line(series_dir, ckpt, tmp_path, capsys, make_input, extra, message):
    source = series_dir if make_input == "series" else make_input(_mkdir(tmp_path / "in"))
    argv = [
        "denoise",
        str(source),
        "-o",
        str(tmp_path / "out"),
        "--weights",
        str(ckpt),
        "--device",
        "cpu",
        "-q",
    ]
    code = cli.main(argv + extra)
    assert code == 2
    err = one_line_error(capsys)
    assert message in err
    assert not (tmp_path / "out").exists()


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _garbage(path: Path) -> Path:
    path.write_bytes(b"\x00not a medical image\xff" * 50)
    return path


def test_console_script_exit_code_and_message(tmp_path):
    script = Path(sys.executable).with_name("napari-langmamba")
    result = subprocess.run(
        [str(script), "denoise", str(tmp_path / "nothing"), "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: ") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_info_runs(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out
    assert "scan backend:" in out and "cpu:" in out
    assert "default weights:" in out


def test_info_shows_the_default_weights_provenance(ckpt, tmp_path, monkeypatch, capsys):
    bundled = tmp_path / "default"
    shutil.copytree(ckpt, bundled)
    monkeypatch.setattr(session, "DEFAULT_WEIGHTS_DIR", bundled)
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"default weights: {bundled}" in out
    assert "kind: redcnn" in out
    monkeypatch.setattr(session, "SHARP_WEIGHTS_DIR", bundled)
    assert cli.main(["info"]) == 0
    assert f"sharp-kernel weights (--weights sharp): {bundled}" in capsys.readouterr().out
    monkeypatch.setattr(session, "SHARP_WEIGHTS_DIR", tmp_path / "none")
    assert cli.main(["info"]) == 0
    assert "sharp-kernel weights are missing" in capsys.readouterr().out


def test_demo_without_default_weights_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(session, "DEFAULT_WEIGHTS_DIR", tmp_path / "missing")
    assert cli.main(["demo", "--output", str(tmp_path / "out"), "-q"]) == 2
    assert "bundled default weights are missing" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_demo_denoises_the_sample_into_a_fresh_folder(series_dir, ckpt, tmp_path, monkeypatch, capsys):
    bundled = tmp_path / "default"
    shutil.copytree(ckpt, bundled)
    monkeypatch.setattr(session, "DEFAULT_WEIGHTS_DIR", bundled)
    monkeypatch.setattr(cli, "DEMO_SERIES", series_dir)
    Denoiser.clear_cache()
    results = []
    for _ in range(2):  # a second demo never overwrites the first
        assert cli.main(["demo", "--output", str(tmp_path / "out"), "--device", "cpu", "-q"]) == 0
        out = capsys.readouterr().out
        (line,) = [x for x in out.splitlines() if x.startswith("Result")]
        results.append(Path(line.split(": ", 1)[1]))
        assert " s " in out or " s (" in out
    assert results[0] != results[1]
    for path in results:
        assert path.parent.parent == tmp_path / "out"
        assert read_ct(path).shape == (3, 512, 512)
        assert (path.parent / "demo.json").is_file()


# --- denoising strength -------------------------------------------------------------------------
def test_strength_flag_blends_input_and_model_output(series_dir, ckpt, tmp_path, capsys):
    original = read_ct(series_dir)
    model = Denoiser.load(ckpt, device="cpu").denoise(original.hu)
    outputs = {}
    for strength in ("0", "50", "100"):
        out = tmp_path / f"s{strength}.npy"
        argv = ["denoise", str(series_dir), "-o", str(out), "--weights", str(ckpt), "--device", "cpu", "-q"]
        assert cli.main([*argv, "--strength", strength]) == 0
        assert f"at {strength}% strength" in capsys.readouterr().out
        outputs[strength] = read_ct(out).hu
    np.testing.assert_array_equal(outputs["0"], original.hu)  # 0 %: the input, exactly
    np.testing.assert_array_equal(outputs["100"], model)  # 100 %: the model's output, exactly
    np.testing.assert_allclose(outputs["50"], (original.hu + model) / 2, atol=1e-3)  # the midpoint
    assert np.abs(outputs["50"] - original.hu).max() > 1.0


def test_self_ensemble_flag_writes_the_averaged_model_output(series_dir, ckpt, tmp_path, capsys):
    original = read_ct(series_dir)
    averaged = Denoiser.load(ckpt, device="cpu").denoise(original.hu, self_ensemble=True)
    plain = Denoiser.load(ckpt, device="cpu").denoise(original.hu)
    out = tmp_path / "se.npy"
    argv = ["denoise", str(series_dir), "-o", str(out), "--weights", str(ckpt), "--device", "cpu", "-q"]
    assert cli.main([*argv, "--self-ensemble"]) == 0
    assert "(self-ensemble of 8)" in capsys.readouterr().out
    np.testing.assert_array_equal(read_ct(out).hu, averaged)
    assert np.abs(averaged - plain).max() > 0.1


def test_strength_is_named_in_the_derived_series_description(series_dir, ckpt, tmp_path):
    out = tmp_path / "derived"
    argv = ["denoise", str(series_dir), "-o", str(out), "--weights", str(ckpt), "--device", "cpu", "-q"]
    assert cli.main([*argv, "--strength", "30"]) == 0
    descriptions = {pydicom.dcmread(p, stop_before_pixels=True).SeriesDescription for p in out.iterdir()}
    assert len(descriptions) == 1
    (description,) = descriptions
    assert "30%" in description and "denoised" in description and len(description) <= 64


@pytest.mark.parametrize("value", ["101", "-5", "nan", "half"])
def test_a_strength_outside_0_to_100_exits_2(series_dir, ckpt, tmp_path, capsys, value):
    argv = ["denoise", str(series_dir), "-o", str(tmp_path / "out"), "--weights", str(ckpt), f"--strength={value}"]
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    assert "percentage from 0 to 100" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
