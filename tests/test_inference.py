"""The denoising engine: loading, shapes, padding, tiling, determinism, progress and cancel."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_langmamba import inference, session
from napari_langmamba.checkpoint import save_checkpoint
from napari_langmamba.errors import CheckpointError, ConfigError
from napari_langmamba.events import Progress
from napari_langmamba.inference import Denoiser, TilingPlan, resolve_device, resolve_weights


# --- fixtures: tiny random-init checkpoints ------------------------------------------------------
def make_tiny_seed(seed: int = 0) -> torch.nn.Module:
    from napari_langmamba.models.langae import Encoder, LangAEConfig
    from napari_langmamba.models.seed import SEED, SEEDConfig

    torch.manual_seed(seed)
    encoder_config = LangAEConfig.preset("tiny", codebook_dim=8)
    config = SEEDConfig.preset("tiny", feature_channels=encoder_config.feature_channels)
    return SEED(config, encoder=Encoder(encoder_config))


def make_tiny_redcnn(seed: int = 0) -> torch.nn.Module:
    from napari_langmamba.models.redcnn import REDCNN, REDCNNConfig

    torch.manual_seed(seed)
    return REDCNN(REDCNNConfig.preset("tiny"))  # random init changes a phantom by ~150 HU


@pytest.fixture(scope="module")
def seed_ckpt(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "seed", make_tiny_seed(), kind="seed")


@pytest.fixture(scope="module")
def redcnn_ckpt(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "redcnn", make_tiny_redcnn(), kind="redcnn")


@pytest.fixture(autouse=True)
def _fresh_cache():
    Denoiser.clear_cache()
    yield
    Denoiser.clear_cache()


def phantom(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Soft tissue with a brighter disc and air corners, plus noise, in HU."""
    rng = np.random.default_rng(seed)
    *lead, h, w = shape
    yy, xx = np.mgrid[:h, :w]
    r = np.hypot((yy - h / 2) / (h / 2), (xx - w / 2) / (w / 2))
    base = np.where(r < 0.9, 40.0, -1000.0) + np.where(r < 0.3, 160.0, 0.0)
    return (base + rng.normal(0, 25, (*lead, h, w))).astype(np.float32)


# --- loading ---------------------------------------------------------------------------------------
def test_a_seed_with_its_own_decoder_widths_names_its_encoder_and_decoder(tmp_path):
    from napari_langmamba.models.langae import Encoder, LangAEConfig
    from napari_langmamba.models.seed import SEED, SEEDConfig

    encoder_config = LangAEConfig.preset("tiny", codebook_dim=8)
    config = SEEDConfig(feature_channels=encoder_config.feature_channels, decoder_channels=(24, 20, 12, 10))
    path = save_checkpoint(tmp_path / "wide", SEED(config, encoder=Encoder(encoder_config)), kind="seed")
    denoiser = Denoiser.load(path, device="cpu")
    assert denoiser.info["preset"] == "tiny, decoder 24-20-12-10"
    assert "preset='tiny, decoder 24-20-12-10'" in repr(denoiser)


def test_load_records_provenance(seed_ckpt):
    denoiser = Denoiser.load(seed_ckpt, device="cpu")
    info = denoiser.info
    assert info["kind"] == "seed"
    assert info["preset"] == "tiny"
    assert (
        info["checkpoint_sha256"]
        == hashlib.sha256((seed_ckpt / "model.safetensors").read_bytes()).hexdigest()
    )
    assert info["normalization"] == {"hu_min": -1000.0, "hu_max": 2000.0}
    assert info["device"] == "cpu"
    assert info["amp"] is None  # no autocast off CUDA
    from napari_langmamba.models.scan import scan_backend

    assert info["scan_backend"] == scan_backend(torch.device("cpu"))
    json.dumps(info)  # provenance goes into layer metadata and JSON files
    assert not denoiser.model.training
    assert not any(p.requires_grad for p in denoiser.model.parameters())


def test_trained_kernels_and_the_advice_for_a_kernel_never_seen(tmp_path):
    from napari_langmamba.inference import is_sharp_kernel, kernel_advice, series_kernel, trained_kernels

    bundle = {"training": {"seed": {"data": {"train": {"kernels": ["D45f", "B30f"]}}}, "langae": {}}}
    run = {"training": {"data": {"train": {"kernels": ["B30f", None]}}}}
    assert trained_kernels(bundle) == ["B30f", "D45f"] and trained_kernels(run) == ["B30f"]
    assert trained_kernels({}) is None and trained_kernels({"training": {"data": {"train": {"kernels": [None]}}}}) is None
    assert series_kernel({"ConvolutionKernel": ["B70f", "LUNG"]}) == "B70f/LUNG"
    assert series_kernel({"ConvolutionKernel": " D45f "}) == "D45f" and series_kernel({}) is None
    advice = kernel_advice(["B30f", "D45f"], "B70f")
    assert "kernel B70f" in advice and "trained on B30f, D45f only" in advice and "--init" in advice
    assert kernel_advice(["B30f", "D45f"], "D45f") is None  # a kernel it saw
    assert kernel_advice(None, "B70f") is None and kernel_advice(["B30f"], None) is None  # nothing to compare
    # a sharp kernel is pointed to the bundled sharp-kernel weights, unless they are the ones in use
    assert "--weights sharp" in advice
    assert "--weights sharp" not in kernel_advice(["B70f"], "B80f", weights="sharp")
    assert "--weights sharp" not in kernel_advice(["B30f", "D45f"], "Br38f")  # a smooth kernel never seen
    sharp = {"B70f": True, "Br64": True, "B60f": True, "BONE": True, "LUNG": True, "B70f/LUNG": True,
             "B30f": False, "D45f": False, "Br38f": False, "STANDARD": False, "SOFT": False, "": False, None: False}
    assert {k: is_sharp_kernel(k) for k in sharp} == sharp
    # a loaded denoiser carries its record's kernels
    path = save_checkpoint(tmp_path / "ck", make_tiny_seed(0), kind="seed", extra=run)
    assert Denoiser.load(path, device="cpu").info["trained_kernels"] == ["B30f"]


def test_load_is_cached_and_reloads_when_the_file_changes(tmp_path):
    path = save_checkpoint(tmp_path / "ck", make_tiny_seed(0), kind="seed")
    first = Denoiser.load(path, device="cpu")
    assert Denoiser.load(str(path), device="cpu") is first
    save_checkpoint(path, make_tiny_seed(1), kind="seed")  # same path, new weights
    second = Denoiser.load(path, device="cpu")
    assert second is not first
    assert second.info["checkpoint_sha256"] != first.info["checkpoint_sha256"]


def test_zip_and_folder_give_the_same_model(seed_ckpt, tmp_path):
    archive = tmp_path / "ck.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in ("config.json", "model.safetensors"):
            zf.write(seed_ckpt / name, name)
    a = Denoiser.load(seed_ckpt, device="cpu")
    b = Denoiser.load(archive, device="cpu")
    assert a.info["checkpoint_sha256"] == b.info["checkpoint_sha256"]
    hu = phantom((32, 48))
    np.testing.assert_array_equal(a.denoise(hu), b.denoise(hu))


def test_training_run_folder_prefers_best_then_last(seed_ckpt, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    shutil.copytree(seed_ckpt, run / "checkpoints" / "last")
    assert resolve_weights(run) == (run / "checkpoints" / "last").resolve()
    shutil.copytree(seed_ckpt, run / "best")
    assert resolve_weights(run) == (run / "best").resolve()
    assert Denoiser.load(run, device="cpu").info["path"] == str((run / "best").resolve())


def test_missing_default_weights_raise_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(session, "DEFAULT_WEIGHTS_DIR", tmp_path / "weights" / "default")
    with pytest.raises(CheckpointError, match="bundled default weights are missing"):
        Denoiser.load("default", device="cpu")
    assert inference.default_weights_info() is None


def test_default_resolves_to_the_bundled_folder(seed_ckpt, tmp_path, monkeypatch):
    bundled = tmp_path / "weights" / "default"
    shutil.copytree(seed_ckpt, bundled)
    monkeypatch.setattr(session, "DEFAULT_WEIGHTS_DIR", bundled)
    denoiser = Denoiser.load("default", device="cpu")
    assert denoiser.info["weights"] == "default"
    assert denoiser.info["path"] == str(bundled)
    assert inference.default_weights_info()["kind"] == "seed"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "neither a checkpoint folder"),
        (lambda p: p.write_text("hello"), "not a checkpoint"),
    ],
)
def test_bad_weights_paths_are_refused(tmp_path, make, message):
    path = tmp_path / "weights"
    make(path)
    with pytest.raises(CheckpointError, match=message):
        Denoiser.load(path, device="cpu")


def test_a_langae_checkpoint_is_not_a_denoiser(tmp_path):
    from napari_langmamba.models.codebook import load_codebook
    from napari_langmamba.models.langae import LangAE, LangAEConfig

    codebook = load_codebook("random:32x8")
    model = LangAE(LangAEConfig.preset("tiny", codebook_dim=8), codebook=codebook)
    path = save_checkpoint(tmp_path / "ae", model, kind="langae")
    with pytest.raises(CheckpointError, match="not a denoiser"):
        Denoiser.load(path, device="cpu")


def test_devices():
    assert resolve_device("auto").type in ("cuda", "mps", "cpu")
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ConfigError, match="Unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="not available"):
            resolve_device("cuda")


# --- denoising -----------------------------------------------------------------------------------
def test_shapes_and_dtypes_2d_and_3d(seed_ckpt):
    denoiser = Denoiser.load(seed_ckpt, device="cpu")
    volume = phantom((3, 32, 48)).astype(np.int16)  # integer HU is accepted too
    out3 = denoiser.denoise(volume, batch_size=2)
    assert out3.shape == (3, 32, 48) and out3.dtype == np.float32
    out2 = denoiser.denoise(volume[1])
    assert out2.shape == (32, 48) and out2.dtype == np.float32
    np.testing.assert_allclose(out2, out3[1], atol=1e-3)  # a slice alone = the same slice in a volume


def test_non_multiple_of_16_is_reflect_padded_and_cropped(redcnn_ckpt):
    denoiser = Denoiser.load(redcnn_ckpt, device="cpu")
    hu = phantom((37, 50))
    out = denoiser.denoise(hu)
    assert out.shape == (37, 50) and np.isfinite(out).all()
    # Same as denoising the explicitly reflect-padded (48, 64) image and cropping it.
    padded = np.pad(hu, ((0, 11), (0, 14)), mode="reflect")
    np.testing.assert_allclose(out, denoiser.denoise(padded)[:37, :50], atol=1e-3)
    assert np.abs(out - hu).mean() > 1.0  # the model really changes the image


def test_tiled_and_untiled_agree_away_from_borders(redcnn_ckpt):
    denoiser = Denoiser.load(redcnn_ckpt, device="cpu")
    hu = phantom((2, 200, 232))
    whole = denoiser.denoise(hu, tile=512)
    plan = TilingPlan.for_shape((200, 232), tile=176, overlap=64)
    assert plan.tiled and len(plan.starts) == 4
    tiled = denoiser.denoise(hu, tile=176, overlap=64, batch_size=3)
    assert np.abs(whole - hu).mean() > 1.0  # not an identity model: the comparison means something
    inner = (slice(None), slice(24, -24), slice(24, -24))
    assert np.abs(tiled[inner] - whole[inner]).max() < 1.0


def test_tile_weights_cover_every_pixel():
    plan = TilingPlan.for_shape((1000, 700), tile=256, overlap=64)
    total = np.zeros(plan.padded)
    for r, c in plan.starts:
        th, tw = plan.tile_shape
        total[r : r + th, c : c + tw] += plan.weight((r, c))
    assert plan.padded == (1008, 704)
    assert total.min() > 0.5  # no pixel is left without a contributing tile


def test_deterministic_on_cpu(seed_ckpt):
    hu = phantom((2, 48, 48))
    first = Denoiser.load(seed_ckpt, device="cpu").denoise(hu)
    Denoiser.clear_cache()
    second = Denoiser.load(seed_ckpt, device="cpu").denoise(hu)
    np.testing.assert_array_equal(first, second)


def test_checkpoint_normalisation_is_used(tmp_path):
    model = make_tiny_redcnn()
    a = save_checkpoint(tmp_path / "a", model, kind="redcnn")
    b = save_checkpoint(
        tmp_path / "b", model, kind="redcnn", extra={"normalization": {"hu_min": -1024, "hu_max": 3071}}
    )
    hu = phantom((32, 32))
    out_a = Denoiser.load(a, device="cpu").denoise(hu)
    denoiser_b = Denoiser.load(b, device="cpu")
    assert denoiser_b.info["normalization"] == {"hu_min": -1024.0, "hu_max": 3071.0}
    # The same network under another scaling maps HU differently.
    assert np.abs(out_a - denoiser_b.denoise(hu)).max() > 1.0


def drain(gen) -> tuple[list, np.ndarray]:
    """(the events, the result) of an ``iter_denoise`` generator."""
    events = []
    while True:
        try:
            events.append(next(gen))
        except StopIteration as stop:
            return events, stop.value


def test_iter_denoise_reports_each_batch(redcnn_ckpt):
    denoiser = Denoiser.load(redcnn_ckpt, device="cpu")
    events, result = drain(denoiser.iter_denoise(phantom((5, 32, 32)), batch_size=2))
    assert all(isinstance(e, Progress) for e in events)
    assert [(e.done, e.total) for e in events] == [(0, 5), (2, 5), (4, 5), (5, 5)]
    assert result.shape == (5, 32, 32)


class CountingModel(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def test_closing_the_generator_stops_the_work():
    model = CountingModel(make_tiny_redcnn())
    denoiser = Denoiser(model, device="cpu")
    gen = denoiser.iter_denoise(phantom((10, 32, 32)), batch_size=1)
    assert next(gen) == Progress(0, 10, "denoising 10 slice(s)")
    assert next(gen).done == 1
    gen.close()
    assert model.calls == 1
    with pytest.raises(StopIteration):
        next(gen)


class ColumnRamp(torch.nn.Module):
    """Adds ``step`` x (column index): the same at every flip and rotation only once averaged."""

    def __init__(self, step: float) -> None:
        super().__init__()
        self.step = step
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        return x + self.step * torch.arange(x.shape[-1], dtype=x.dtype)


def test_self_ensemble_averages_the_eight_flips_and_rotations_each_turned_back():
    # 64 x 48: the turned inputs are 48 x 64, so the model sees both orientations.
    hu = np.full((2, 64, 48), 40.0, np.float32)
    model = ColumnRamp(step=1e-4)
    denoiser = Denoiser(model, device="cpu")
    hu_per_unit = denoiser.normalization.hu_max - denoiser.normalization.hu_min
    plain = denoiser.denoise(hu)
    np.testing.assert_allclose(plain[0, 5], 40.0 + 1e-4 * hu_per_unit * np.arange(48), atol=1e-3)
    assert model.shapes == [(1, 1, 64, 48)] * 2
    model.shapes.clear()
    ensemble = denoiser.denoise(hu, self_ensemble=True)
    # Each of the 8 outputs, turned back, holds a ramp along one axis, one way or the other: the
    # column ramp twice each way and the row ramp twice each way. Their mean is the same at every
    # pixel: 1e-4 x ((48 - 1) / 2 + (64 - 1) / 2) / 2 model units.
    expected = 40.0 + 1e-4 * hu_per_unit * ((48 - 1) / 2 + (64 - 1) / 2) / 2
    np.testing.assert_allclose(ensemble, expected, atol=1e-3)
    assert sorted(set(model.shapes)) == [(1, 1, 48, 64), (1, 1, 64, 48)]
    assert len(model.shapes) == 2 * 8


def test_self_ensemble_of_a_real_model_stays_close_and_keeps_progress(redcnn_ckpt):
    denoiser = Denoiser.load(redcnn_ckpt, device="cpu")
    hu = phantom((3, 48, 48))
    events, ensemble = drain(denoiser.iter_denoise(hu, batch_size=2, self_ensemble=True))
    assert [(e.done, e.total) for e in events] == [(0, 3), (2, 3), (3, 3)]
    plain = denoiser.denoise(hu)
    change = np.abs(plain - hu).mean()
    assert change > 20.0  # the random network changes the phantom...
    differs = np.abs(ensemble - plain).mean()
    assert 0.0 < differs < change  # ...and the ensemble, another estimate, stays nearer its members


@pytest.mark.parametrize(
    ("hu", "message"),
    [
        (np.zeros((2, 2, 16, 16), np.float32), "one slice"),
        (np.zeros((0, 16, 16), np.float32), "empty"),
        (np.full((16, 16), np.nan, np.float32), "NaN"),
        (np.zeros((16, 16), np.complex64), "real-valued"),
    ],
)
def test_bad_images_are_refused(seed_ckpt, hu, message):
    denoiser = Denoiser.load(seed_ckpt, device="cpu")
    with pytest.raises(ConfigError, match=message):
        denoiser.denoise(hu)


def test_bad_settings_are_refused(seed_ckpt):
    denoiser = Denoiser.load(seed_ckpt, device="cpu")
    with pytest.raises(ConfigError, match="batch size"):
        denoiser.denoise(phantom((16, 16)), batch_size=0)
    with pytest.raises(ConfigError, match="cannot overlap"):
        denoiser.denoise(phantom((16, 16)), tile=64, overlap=48)
