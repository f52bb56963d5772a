"""The session layer: one weights resolution, one device rule, one model cache, one slice preparation."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_langmamba import session
from napari_langmamba.checkpoint import save_checkpoint
from napari_langmamba.errors import CheckpointError, ConfigError
from napari_langmamba.inference import Denoiser, TilingPlan
from napari_langmamba.session import (
    MODEL_CACHE,
    STRIDE,
    ModelCache,
    clear_model_cache,
    prepare_slice,
    resolve_device,
    resolve_weights,
)
from napari_langmamba.tokens import load_token_model, token_pyramid
from napari_langmamba.windowing import MODEL_NORMALIZATION, Normalization


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A denoiser checkpoint with its LangAE under ``langae/``, laid out like the bundled weights."""
    from napari_langmamba.models.codebook import load_codebook
    from napari_langmamba.models.langae import LangAE, LangAEConfig
    from napari_langmamba.models.redcnn import REDCNN, REDCNNConfig

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("bundle") / "default"
    save_checkpoint(root, REDCNN(REDCNNConfig.preset("tiny")), kind="redcnn")
    codebook = load_codebook("random:64x8:3")
    langae = LangAE(LangAEConfig.preset("tiny", codebook_dim=codebook.d), codebook=codebook)
    save_checkpoint(root / "langae", langae, kind="langae")
    return root


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_model_cache()
    yield
    clear_model_cache()


def phantom(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    hu = np.where((yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 3) ** 2, 60.0, -1000.0)
    return (hu + rng.normal(0, 20, shape)).astype(np.float32)


# --- weights and the one cache --------------------------------------------------------------------
def test_default_weights_resolve_for_both_roles(bundle, monkeypatch):
    monkeypatch.setattr(session, "DEFAULT_WEIGHTS_DIR", bundle)
    assert resolve_weights("default") == bundle
    assert resolve_weights("default", role="langae") == bundle / "langae"
    assert resolve_weights(bundle, role="langae") == bundle / "langae"  # a bundle names its LangAE
    with pytest.raises(ConfigError, match="Unknown model role"):
        resolve_weights("default", role="vae")


def test_sharp_weights_resolve_with_the_default_langae(bundle, monkeypatch, tmp_path):
    monkeypatch.setattr(session, "DEFAULT_WEIGHTS_DIR", bundle)
    monkeypatch.setattr(session, "SHARP_WEIGHTS_DIR", tmp_path / "sharp-missing")
    with pytest.raises(CheckpointError, match="sharp-kernel weights are missing"):
        resolve_weights("sharp")
    monkeypatch.setattr(session, "SHARP_WEIGHTS_DIR", bundle)  # any denoiser checkpoint folder
    assert resolve_weights(" Sharp ") == bundle
    assert resolve_weights("sharp", role="langae") == bundle / "langae"  # trained on the default's encoder
    assert Denoiser.load("sharp", device="cpu").info["weights"] == "sharp"
    assert session.bundled_name("SHARP") == "sharp" and session.bundled_name(str(bundle)) is None


def test_one_cache_serves_the_denoiser_and_the_langae(bundle, monkeypatch):
    monkeypatch.setattr(session, "DEFAULT_WEIGHTS_DIR", bundle)
    denoiser = Denoiser.load("default", device="cpu")
    langae = load_token_model("default", device="cpu")
    assert MODEL_CACHE.models("denoiser") == [denoiser]
    assert MODEL_CACHE.models("langae") == [langae]
    assert len(MODEL_CACHE) == 2
    # loading again is free, whatever names the same checkpoint
    assert Denoiser.load(bundle, device="cpu") is denoiser
    assert load_token_model(bundle, device="cpu") is langae
    assert load_token_model(bundle / "langae", device="cpu") is langae
    # each role forgets its own models; the session forgets all
    Denoiser.clear_cache()
    assert MODEL_CACHE.models() == [langae]
    assert Denoiser.load("default", device="cpu") is not denoiser
    clear_model_cache()
    assert len(MODEL_CACHE) == 0 and load_token_model("default", device="cpu") is not langae


def test_a_rewritten_langae_checkpoint_is_loaded_again(bundle, tmp_path):
    from napari_langmamba.models.codebook import load_codebook
    from napari_langmamba.models.langae import LangAE, LangAEConfig

    path = tmp_path / "ae"
    codebook = load_codebook("random:64x8:3")
    for seed in (0, 1):
        torch.manual_seed(seed)
        save_checkpoint(path, LangAE(LangAEConfig.preset("tiny", codebook_dim=8), codebook=codebook), kind="langae")
        if seed == 0:
            first = load_token_model(path)
            assert load_token_model(path) is first
    assert load_token_model(path) is not first


def test_the_cache_is_least_recently_used_across_roles():
    cache = ModelCache(size=2)
    a = cache.get_or_load(("denoiser", "a"), object)
    b = cache.get_or_load(("langae", "b"), object)
    assert cache.get_or_load(("denoiser", "a"), object) is a  # a is now the most recent
    c = cache.get_or_load(("langae", "c"), object)  # evicts b
    assert cache.models() == [a, c] and b not in cache.models()
    with pytest.raises(ConfigError, match="Unknown model role"):
        cache.get_or_load(("decoder", "x"), object)


def test_the_wrong_kind_of_checkpoint_is_refused_by_either_loader(bundle, tmp_path):
    import shutil

    with pytest.raises(CheckpointError, match="not a denoiser"):
        Denoiser.load(bundle / "langae", device="cpu")
    denoiser_only = tmp_path / "redcnn"
    shutil.copytree(bundle, denoiser_only, ignore=shutil.ignore_patterns("langae"))
    with pytest.raises(CheckpointError, match="tokens need a LangAE"):
        load_token_model(denoiser_only, device="cpu")
    assert len(MODEL_CACHE) == 0  # failed loads leave nothing behind


# --- devices ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["tpu", "gpu0", "cuda:x"])
def test_devices_are_validated_the_same_way_by_both_loaders(bundle, device):
    messages = []
    for load in (lambda: Denoiser.load(bundle, device=device), lambda: load_token_model(bundle, device=device)):
        with pytest.raises(ConfigError) as info:
            load()
        messages.append(str(info.value))
    assert messages[0] == messages[1]


def test_auto_picks_the_same_device_for_both(bundle):
    denoiser = Denoiser.load(bundle, device="auto")
    langae = load_token_model(bundle, device="auto")
    expected = resolve_device("auto")
    assert denoiser.device.type == expected.type
    assert next(langae.parameters()).device.type == expected.type
    if not torch.cuda.is_available():
        for load in (Denoiser.load, load_token_model):
            with pytest.raises(ConfigError, match="not available"):
                load(bundle, device="cuda")


# --- slices ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 1), (1, 40), (17, 16), (31, 33), (48, 64), (512, 512)])
def test_slices_are_padded_to_the_stride_the_same_way_everywhere(shape):
    hu = phantom(shape)
    prepared = prepare_slice(hu)
    padded = prepared.norm.shape
    assert padded[0] % STRIDE == 0 and padded[1] % STRIDE == 0
    assert padded[0] - STRIDE < shape[0] <= padded[0] and padded[1] - STRIDE < shape[1] <= padded[1]
    assert TilingPlan.for_shape(shape, tile=4096, overlap=0).padded == padded
    np.testing.assert_array_equal(prepared.norm[: shape[0], : shape[1]], MODEL_NORMALIZATION.to_model(hu))
    assert prepared.padding == ((0, padded[0] - shape[0]), (0, padded[1] - shape[1]))
    if min(shape) > 1:  # reflection: the row below the image mirrors the one above its last
        below = min(padded[0] - shape[0], shape[0] - 1)
        np.testing.assert_array_equal(
            prepared.norm[shape[0] : shape[0] + below, : shape[1]],
            prepared.norm[shape[0] - 2 : shape[0] - 2 - below : -1, : shape[1]],
        )


def test_prepare_slice_reads_non_finite_values_as_air_with_a_warning():
    norm = Normalization(hu_min=-1024.0, hu_max=3071.0)
    hu = phantom((20, 24))
    hu[3, 4], hu[5, 6], hu[7, 8] = np.nan, np.inf, -np.inf
    with pytest.warns(RuntimeWarning, match="3 NaN or infinite"):
        prepared = prepare_slice(hu, norm)
    assert prepared.hu[3, 4] == prepared.hu[5, 6] == prepared.hu[7, 8] == -1024.0
    assert np.isfinite(prepared.norm).all() and prepared.norm[3, 4] == 0.0
    with pytest.raises(ConfigError, match="only NaN"):
        prepare_slice(np.full((8, 8), np.nan, np.float32))
    with pytest.raises(ConfigError, match="real-valued"):
        prepare_slice(np.zeros((8, 8), np.complex64))
    with pytest.raises(ConfigError, match="2D slice"):
        prepare_slice(np.zeros((2, 8, 8), np.float32))


def test_nan_input_is_handled_the_same_by_the_denoiser_and_the_tokens(bundle):
    denoiser = Denoiser.load(bundle, device="cpu")
    langae = load_token_model(bundle, device="cpu")
    hu = phantom((48, 64))
    holed = hu.copy()
    holed[10:12, 20:23] = np.nan
    as_air = np.where(np.isnan(holed), np.float32(MODEL_NORMALIZATION.hu_min), holed)

    with pytest.warns(RuntimeWarning, match="6 NaN or infinite"):
        denoised = denoiser.denoise(holed)
    expected = denoiser.denoise(as_air)
    assert np.isnan(denoised[10:12, 20:23]).all()  # missing stays missing in the result
    finite = ~np.isnan(holed)
    np.testing.assert_array_equal(denoised[finite], expected[finite])  # the model saw air there

    with pytest.warns(RuntimeWarning, match="6 NaN or infinite"):
        pyramid = token_pyramid(langae, holed, cache=False)
    assert pyramid.to_records() == token_pyramid(langae, as_air, cache=False).to_records()

    nothing = np.full((32, 32), np.nan, np.float32)
    for compute in (denoiser.denoise, lambda hu: token_pyramid(langae, hu, cache=False)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # refused outright, no warning first
            with pytest.raises(ConfigError, match="only NaN"):
                compute(nothing)


# --- the current slice -----------------------------------------------------------------------------
def _every_step(viewer):
    """Every combination of the viewer's slider positions on its non-displayed axes."""
    import itertools

    lead = viewer.dims.ndim - 2
    for steps in itertools.product(*(range(n) for n in viewer.dims.nsteps[:lead])):
        for axis, step in enumerate(steps):
            viewer.dims.set_current_step(axis, step)
        yield steps


@pytest.mark.parametrize(
    ("shape", "scale", "translate"),
    [
        ((5, 6), (0.7, 0.8), (5.0, -7.0)),
        ((4, 5, 6), (2.5, 0.7, 0.8), (-10.0, 5.0, -7.0)),
        ((4, 5, 6), (2.0, 1.0, 1.0), (0.0, 0.0, 0.0)),  # on a 1-step grid: data coordinates x.5
        ((3, 4, 5, 6), (1.0, 2.5, 0.7, 0.8), (3.0, -10.0, 5.0, -7.0)),
    ],
)
def test_the_current_slice_is_the_slice_napari_shows(shape, scale, translate):
    """2-D, 3-D and 4-D layers with scale and translate, beside a layer of a finer grid and larger extent."""
    from napari.components import ViewerModel

    viewer = ViewerModel()
    data = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    layer = viewer.add_image(data, scale=scale, translate=translate, name="ct")
    lead = len(shape) - 2
    if lead:  # one slice per world unit, reaching past the CT at both ends
        viewer.add_image(np.zeros((12,) * lead + shape[-2:], np.float32), translate=(-12.0,) * lead + (0, 0))
    seen, outside = set(), 0
    for _ in _every_step(viewer):
        shown = np.asarray(layer._slice.image.raw)
        if shown.shape != shape[-2:]:  # napari draws nothing of the layer here
            outside += 1
            with pytest.raises(ConfigError, match="outside layer 'ct'"):
                session.current_slice(layer, viewer.dims.point)
            continue
        index, hu = session.current_slice(layer, viewer.dims.point)
        np.testing.assert_array_equal(hu, shown)
        assert session.current_slice_index(layer, viewer.dims.point) == index
        seen.add(index)
    if lead:
        assert outside > 0
        assert len(seen) == int(np.prod(shape[:lead]))  # every slice of the CT was current once
    else:
        assert seen == {()}


def test_the_current_slice_refuses_what_is_not_a_ct_slice():
    from napari.layers import Image

    rgb = Image(np.zeros((8, 8, 3), np.uint8), rgb=True, name="photo")
    with pytest.raises(ConfigError, match="RGB"):
        session.current_slice(rgb, (0.0, 0.0))
    line = Image(np.zeros((2, 8), np.float32), name="line")
    index, hu = session.current_slice(line, (0.0, 0.0))
    assert index == () and hu.shape == (2, 8)


def test_the_axial_view_is_required_in_either_in_plane_order():
    from napari.components import ViewerModel

    viewer = ViewerModel()
    viewer.add_image(np.zeros((3, 8, 8), np.float32))
    session.require_axial_view(viewer.dims, what="Compare")
    viewer.dims.order = (0, 2, 1)  # transposed in-plane axes: the same slices
    session.require_axial_view(viewer.dims, what="Compare")
    viewer.dims.order = (1, 0, 2)  # slices across another axis
    with pytest.raises(ConfigError, match="Compare works on axial slices"):
        session.require_axial_view(viewer.dims, what="Compare")
    viewer.dims.order = (0, 1, 2)
    viewer.dims.ndisplay = 3
    with pytest.raises(ConfigError, match="2-D view"):
        session.require_axial_view(viewer.dims, what="Tokens")


# --- layers and derived volumes ---------------------------------------------------------------
def _oblique_volume(n: int = 4):
    from napari_langmamba.io import CTVolume

    angle = np.deg2rad(20.0)  # rows and slices tilted about the patient's x axis
    direction = [[0.0, -np.sin(angle), np.cos(angle)], [0.0, np.cos(angle), np.sin(angle)], [1.0, 0.0, 0.0]]
    hu = np.random.default_rng(0).normal(0.0, 100.0, (n, 6, 8)).astype(np.float32)
    metadata = {"SeriesDescription": "oblique", "source_sop_instance_uids": [f"1.2.{k}" for k in range(n)],
                "slice_positions_lps": [[0.0, 0.0, float(k)] for k in range(n)], "Modality": "CT"}
    return CTVolume(hu=hu, spacing=(2.5, 0.7, 0.8), origin=(-100.0, -50.0, -800.0), direction=direction,
                    metadata=metadata, source="/data/oblique")


def test_a_layer_shows_the_volume_it_was_made_from_and_a_slab_is_placed_on_its_slices():
    from napari.layers import Layer

    from napari_langmamba.io import volume_to_layer_data

    volume = _oblique_volume()
    layer = Layer.create(*volume_to_layer_data(volume))
    back = session.layer_volume(layer)
    np.testing.assert_array_equal(back.hu, volume.hu)
    for name in ("spacing", "origin", "direction"):
        np.testing.assert_allclose(getattr(back, name), getattr(volume, name))
    assert back.metadata == volume.metadata and back.source == "/data/oblique"

    slab = session.layer_volume(layer, slice(2, 3))
    np.testing.assert_array_equal(slab.hu, volume.hu[2:3])
    np.testing.assert_allclose(slab.origin, volume.slice_positions()[2])  # along the tilted normal
    np.testing.assert_allclose(slab.direction, volume.direction)
    assert slab.metadata["source_sop_instance_uids"] == ["1.2.2"]
    assert slab.metadata["slice_positions_lps"] == [[0.0, 0.0, 2.0]]
    assert volume.metadata["source_sop_instance_uids"] == [f"1.2.{k}" for k in range(4)]  # untouched
    # the slab's layer, translated by slab_translate, lies on slice 2 of the input
    translate = session.slab_translate(layer, 2)
    np.testing.assert_allclose(translate, [5.0, 0.0, 0.0])
    with pytest.raises(ConfigError, match="3-D layer"):
        session.layer_volume(Layer.create(*volume_to_layer_data(_oblique_volume(1))), slice(0, 1))


def test_per_slice_fields_that_do_not_match_the_layer_are_dropped_from_a_slab():
    from napari.layers import Image

    volume = _oblique_volume()
    layer = Image(volume.hu[:3], scale=volume.spacing, metadata={"ct": {"metadata": dict(volume.metadata)}})
    slab = session.layer_volume(layer, slice(1, 2))
    assert "source_sop_instance_uids" not in slab.metadata and slab.metadata["Modality"] == "CT"


def test_a_slab_translate_follows_the_layers_rotation():
    from napari.layers import Image

    layer = Image(np.zeros((4, 6, 8), np.float32), scale=(2.0, 1.0, 1.0), translate=(3.0, 1.0, -2.0),
                  rotate=((1, 0, 0), (0, 0, -1), (0, 1, 0)))
    slab = Image(np.zeros((1, 6, 8), np.float32), scale=layer.scale, rotate=layer.rotate,
                 translate=session.slab_translate(layer, 3))
    np.testing.assert_allclose(slab.data_to_world((0, 2, 5)), layer.data_to_world((3, 2, 5)))


def test_a_derived_volume_keeps_the_geometry_and_copies_the_dicom_fields():
    volume = _oblique_volume()
    derived = session.derived_volume(volume, volume.hu + 1.0)
    np.testing.assert_array_equal(derived.hu, volume.hu + 1.0)
    assert (derived.spacing, derived.origin) == (volume.spacing, volume.origin)
    np.testing.assert_array_equal(derived.direction, volume.direction)
    assert derived.source is None and derived.metadata == volume.metadata
    derived.metadata["source_sop_instance_uids"].append("x")
    assert len(volume.metadata["source_sop_instance_uids"]) == 4  # a copy, not the source's lists
    with pytest.raises(ConfigError, match="shape"):
        session.derived_volume(volume, volume.hu[:2])
