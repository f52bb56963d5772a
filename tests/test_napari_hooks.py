"""The npe2 reader, writers and sample data (called directly and through npe2, no viewer needed)."""

from __future__ import annotations

import socket
import subprocess
import sys

import numpy as np
import pydicom
import pytest

from napari_langmamba.io import CTReadWarning, read_ct
from napari_langmamba.io._napari import (
    get_reader,
    sample_abdomen,
    sample_ct_small,
    write_dicom,
    write_nifti,
    write_npy,
)
from napari_langmamba.windowing import get_window

ABDOMEN_LIMITS = list(get_window("abdomen").limits)


@pytest.fixture(scope="module")
def real_layer(dicom_series_dir):
    reader = get_reader(str(dicom_series_dir))
    assert callable(reader)
    (layer,) = reader(str(dicom_series_dir))
    return layer


def test_reader_gives_hu_with_scale_and_abdomen_window(real_layer, dicom_series_dir):
    data, kwargs, layer_type = real_layer
    assert layer_type == "image"
    assert data.shape == (20, 512, 512) and data.dtype == np.float32
    assert data.min() == -1024 and data.max() == 1839
    np.testing.assert_allclose(kwargs["scale"], (2.0, 0.9765625, 0.9765625))
    assert kwargs["contrast_limits"] == ABDOMEN_LIMITS == [-160.0, 240.0]
    assert kwargs["name"] == "CT Body 3.0"
    ct = kwargs["metadata"]["ct"]
    assert set(ct) == {"spacing", "origin", "direction", "metadata", "source"}
    assert ct["direction"] == [[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    assert ct["origin"][2] == -804.5
    assert ct["source"] == str(dicom_series_dir)
    assert ct["metadata"]["SeriesDescription"] == "CT Body 3.0"


def test_get_reader_accepts_ct_and_declines_the_rest(tmp_path, dicom_series_dir, nifti_path):
    np.save(tmp_path / "v.npy", np.zeros((2, 3, 3), np.float32))
    (tmp_path / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 200)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    assert callable(get_reader(str(nifti_path)))
    assert callable(get_reader(str(tmp_path / "v.npy")))
    first_file = sorted(dicom_series_dir.iterdir())[0]  # no suffix: found by the DICM magic
    assert callable(get_reader(str(first_file)))
    assert callable(get_reader([str(p) for p in sorted(dicom_series_dir.iterdir())[:2]]))
    assert get_reader(str(tmp_path / "photo.png")) is None
    assert get_reader(str(tmp_path / "notes")) is None
    assert get_reader([str(tmp_path / "v.npy"), str(tmp_path / "photo.png")]) is None


def test_reader_of_a_2d_npy_gives_a_2d_layer(tmp_path):
    np.save(tmp_path / "slice.npy", np.full((5, 6), 40.0, np.float32))
    with pytest.warns(CTReadWarning, match="no voxel spacing"):
        ((data, kwargs, layer_type),) = get_reader(str(tmp_path / "slice.npy"))(str(tmp_path / "slice.npy"))
    assert data.shape == (5, 6) and np.all(data == 40)
    assert kwargs["scale"] == [1.0, 1.0] and kwargs["name"] == "slice"


def test_reader_of_several_dicom_files_reads_one_series(dicom_series_dir):
    files = [str(p) for p in sorted(dicom_series_dir.iterdir())[:3]]
    ((data, kwargs, _),) = get_reader(files)(files)
    assert data.shape == (3, 512, 512)
    assert np.all(np.diff(np.array(kwargs["metadata"]["ct"]["metadata"]["slice_positions_lps"])[:, 2]) > 0)


def test_writers_write_what_the_reader_read(real_layer, tmp_path):
    data, kwargs, _ = real_layer
    small = data[:3]
    meta = dict(kwargs)
    (written,) = write_dicom(str(tmp_path / "out.dcmdir"), small, meta)
    back = read_ct(written)
    assert np.max(np.abs(back.hu - small)) <= 1
    np.testing.assert_allclose(back.spacing, kwargs["scale"])
    assert back.origin == tuple(kwargs["metadata"]["ct"]["origin"])
    assert pydicom.dcmread(sorted((tmp_path / "out.dcmdir").iterdir())[0]).ImageType[0] == "DERIVED"

    (nii,) = write_nifti(str(tmp_path / "out.nii.gz"), small, meta)
    back = read_ct(nii)
    np.testing.assert_array_equal(back.hu, small)
    np.testing.assert_allclose(back.spacing, kwargs["scale"], atol=1e-6)

    (npy,) = write_npy(str(tmp_path / "out.npy"), small, meta)
    np.testing.assert_array_equal(np.load(npy, allow_pickle=False), small)


def test_writer_uses_the_layer_scale_of_a_plain_layer(tmp_path):
    data = np.arange(2 * 4 * 5, dtype=np.float32).reshape(2, 4, 5)
    (path,) = write_nifti(str(tmp_path / "plain.nii"), data, {"scale": [2.5, 0.5, 0.75], "name": "plain"})
    back = read_ct(path)
    np.testing.assert_allclose(back.spacing, (2.5, 0.5, 0.75))
    np.testing.assert_array_equal(back.hu, data)


def test_sample_abdomen_is_a_real_512_slice_in_hu():
    ((data, kwargs, layer_type),) = sample_abdomen()
    assert layer_type == "image"
    assert data.shape == (512, 512) and data.dtype == np.float32
    assert data.min() <= -1000  # air outside the patient
    assert 1000 < data.max() < 3000  # contrast / bone
    soft = np.median(data[200:300, 200:300])
    assert -200 < soft < 300  # abdominal soft tissue in the middle of the slice
    assert kwargs["contrast_limits"] == ABDOMEN_LIMITS and len(kwargs["scale"]) == 2


def test_sample_ct_small_is_128_in_hu():
    ((data, kwargs, _),) = sample_ct_small()
    assert data.shape == (128, 128)
    reference = pydicom.examples.ct
    expected = reference.pixel_array * float(reference.RescaleSlope) + float(reference.RescaleIntercept)
    np.testing.assert_array_equal(data, expected.astype(np.float32))
    np.testing.assert_allclose(kwargs["scale"], [float(v) for v in reference.PixelSpacing])


def test_samples_need_no_network(monkeypatch):
    from napari_langmamba.io import samples

    samples.abdomen_path.cache_clear()

    def no_network(*args, **kwargs):
        raise AssertionError("a sample tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    assert sample_abdomen()[0][0].shape == (512, 512)
    assert sample_ct_small()[0][0].shape == (128, 128)


def test_npe2_reads_and_writes_through_the_manifest(tmp_path, nifti_path):
    import npe2

    npe2.PluginManager.instance().discover()  # what napari does at start-up (finds the installed manifest)
    layers = npe2.read([str(nifti_path)], plugin_name="napari-langmamba", stack=False)
    ((data, kwargs, layer_type),) = layers
    assert data.shape == (112, 101, 122) and kwargs["scale"] == [3.0, 3.0, 3.0]
    small = (data[:2, :8, :8], kwargs, layer_type)
    assert npe2.write(str(tmp_path / "a.npy"), [small], plugin_name="napari-langmamba") == [str(tmp_path / "a.npy")]
    assert npe2.write(str(tmp_path / "b.nii.gz"), [small], plugin_name="napari-langmamba") == [
        str(tmp_path / "b.nii.gz")
    ]
    # No extension: npe2 picks the first writer (the DICOM series folder) and appends its extension.
    (folder,) = npe2.write(str(tmp_path / "series"), [small], plugin_name="napari-langmamba")
    assert folder == str(tmp_path / "series.dcmdir")
    assert read_ct(folder).hu.shape == (2, 8, 8)


def test_hook_module_import_is_light():
    code = (
        "import sys, napari_langmamba.io._napari\n"
        "heavy = ('napari', 'qtpy', 'PyQt6', 'pydicom', 'nibabel', 'torch')\n"
        "print(','.join(sorted(m for m in heavy if m in sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_layer_tuple_makes_a_napari_image_whose_state_writes_back(tmp_path):
    """What napari does: Layer.create from the tuple, then save passes the layer's own state."""
    from napari.layers import Layer

    ((data, kwargs, layer_type),) = sample_ct_small()
    layer = Layer.create(data, kwargs, layer_type)
    assert tuple(layer.scale) == tuple(kwargs["scale"])
    assert tuple(layer.contrast_limits) == (-160.0, 240.0)
    layer_data, state, _ = layer.as_layer_data_tuple()
    (path,) = write_dicom(str(tmp_path / "ct_small.dcmdir"), layer_data, state)
    back = read_ct(path)
    np.testing.assert_array_equal(back.hu[0], data)
    np.testing.assert_allclose(back.spacing[1:], kwargs["scale"])
    assert back.origin == tuple(kwargs["metadata"]["ct"]["origin"])
