"""Writers: derived DICOM series (round trip, PACS tags), NIfTI, .npy; never clobber, never half-write."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian

from napari_langmamba.errors import CTWriteError
from napari_langmamba.io import (
    CTReadWarning,
    CTVolume,
    read_ct,
    write_ct,
    write_dicom_series,
    write_nifti,
    write_npy,
)

RNG = np.random.default_rng(1)


@pytest.fixture(scope="module")
def real_volume(dicom_series_dir) -> CTVolume:
    return read_ct(dicom_series_dir)


@pytest.fixture(scope="module")
def small_real(real_volume) -> CTVolume:
    """Four real slices with real geometry and metadata, to keep write tests fast."""
    return dataclasses.replace(real_volume, hu=real_volume.hu[:4, ::4, ::4].copy(), spacing=(2.0, 3.90625, 3.90625))


def _reference(volume: CTVolume) -> CTVolume:
    """The volume as if it came from a non-anonymised archive."""
    meta = dict(volume.metadata)
    meta.update(
        StudyInstanceUID="1.2.826.0.1.3680043.8.498.1",
        PatientID="PAT-0042",
        PatientName="Doe^Jane",
        AccessionNumber="ACC123",
        StudyDescription="CT abdomen",
    )
    return dataclasses.replace(volume, metadata=meta)


def _files(folder):
    return sorted(folder.iterdir())


def _synthetic(shape=(3, 8, 9), **kw) -> CTVolume:
    hu = RNG.uniform(-1024, 2000, size=shape).astype(np.float32)
    return CTVolume(hu=hu, **kw)


# --------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------
def test_dicom_round_trip_of_the_real_series(real_volume, tmp_path):
    reference = _reference(real_volume)
    out = write_dicom_series(real_volume, tmp_path / "denoised", reference=reference, description="LangMamba denoised")
    assert out == tmp_path / "denoised"
    with warnings.catch_warnings():
        warnings.simplefilter("error", CTReadWarning)
        back = read_ct(out)
    assert back.hu.shape == real_volume.hu.shape
    assert np.max(np.abs(back.hu - real_volume.hu)) <= 1.0
    assert back.spacing == real_volume.spacing
    assert back.origin == real_volume.origin
    np.testing.assert_array_equal(back.direction, real_volume.direction)
    assert back.metadata["slice_positions_lps"] == real_volume.metadata["slice_positions_lps"]


def test_derived_series_tags_a_pacs_needs(small_real, tmp_path):
    reference = _reference(small_real)
    source_uids = [f"1.2.826.0.1.3680043.8.498.2.{k}" for k in range(4)]
    reference.metadata.update(source_sop_instance_uids=source_uids, SOPClassUID=CTImageStorage)
    out = write_dicom_series(small_real, tmp_path / "out", reference=reference, description="LangMamba denoised")
    datasets = [pydicom.dcmread(p) for p in _files(out)]
    assert len(datasets) == 4
    series_uids = {ds.SeriesInstanceUID for ds in datasets}
    sop_uids = {ds.SOPInstanceUID for ds in datasets}
    assert len(series_uids) == 1 and len(sop_uids) == 4
    for ds in datasets:
        assert UID(ds.SeriesInstanceUID).is_valid and UID(ds.SOPInstanceUID).is_valid
        assert ds.SeriesInstanceUID != reference.metadata["SeriesInstanceUID"]
        assert ds.StudyInstanceUID == reference.metadata["StudyInstanceUID"]
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.SOPClassUID == CTImageStorage
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert ds.SeriesDescription == "LangMamba denoised"
        assert (ds.PatientID, str(ds.PatientName), ds.AccessionNumber) == ("PAT-0042", "Doe^Jane", "ACC123")
        assert ds.StudyDescription == "CT abdomen"
        assert ds.Modality == "CT" and ds.Manufacturer == "SIEMENS"
        assert ds.FrameOfReferenceUID == small_real.metadata["FrameOfReferenceUID"]
        assert (ds.PixelRepresentation, ds.BitsAllocated, ds.RescaleType) == (1, 16, "HU")
        assert ds.pixel_array.dtype == np.int16
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert [float(v) for v in ds.PixelSpacing] == [3.90625, 3.90625]
        assert float(ds.SpacingBetweenSlices) == 2.0
        assert float(ds.SliceThickness) == 3.0  # the reference's, not the spacing
    by_z = sorted(datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))
    assert [float(ds.ImagePositionPatient[2]) for ds in by_z] == [-804.5, -802.5, -800.5, -798.5]
    assert [int(ds.InstanceNumber) for ds in by_z] == [1, 2, 3, 4]
    # Each derived slice points at the slice it was made from.
    assert [ds.SourceImageSequence[0].ReferencedSOPInstanceUID for ds in by_z] == source_uids


def test_fractional_hu_round_trip_within_half_a_unit(tmp_path):
    volume = _synthetic(spacing=(1.25, 0.7, 0.7), origin=(10.0, -20.5, 33.25))
    back = read_ct(write_dicom_series(volume, tmp_path / "s"))
    assert np.max(np.abs(back.hu - volume.hu)) <= 0.5
    assert back.spacing == volume.spacing and back.origin == volume.origin


def test_oblique_geometry_round_trips(tmp_path):
    angle = np.deg2rad(20)
    row = np.array([np.cos(angle), np.sin(angle), 0.0])  # x axis
    col = np.array([-np.sin(angle), np.cos(angle), 0.0])  # y axis
    direction = np.stack([np.cross(row, col), col, row])
    volume = _synthetic(spacing=(2.0, 0.5, 0.5), origin=(1.0, 2.0, 3.0), direction=direction)
    back = read_ct(write_dicom_series(volume, tmp_path / "oblique"))
    np.testing.assert_allclose(back.direction, direction, atol=1e-12)
    np.testing.assert_allclose(back.origin, volume.origin, atol=1e-9)
    np.testing.assert_allclose(back.spacing, volume.spacing, atol=1e-9)


def test_without_reference_or_study_new_valid_identifiers(tmp_path):
    volume = _synthetic()
    out = write_dicom_series(volume, tmp_path / "new")
    datasets = [pydicom.dcmread(p) for p in _files(out)]
    assert len({ds.StudyInstanceUID for ds in datasets}) == 1
    ds = datasets[0]
    assert UID(ds.StudyInstanceUID).is_valid and UID(ds.FrameOfReferenceUID).is_valid
    assert ds.PatientID.startswith("LM-") and str(ds.PatientName) == "ANONYMOUS"
    assert len(ds.StudyDate) == 8
    assert ds.SeriesDescription == "Derived by napari-langmamba"


def test_values_beyond_int16_use_a_rescale_slope(tmp_path):
    volume = CTVolume(hu=np.linspace(-40000, 40000, 2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4))
    with pytest.warns(UserWarning, match="does not fit 16-bit"):
        out = write_dicom_series(volume, tmp_path / "wide")
    ds = pydicom.dcmread(_files(out)[0])
    slope = float(ds.RescaleSlope)
    assert slope > 1
    assert np.max(np.abs(read_ct(out).hu - volume.hu)) <= slope / 2 + 1e-3


def test_nan_is_refused(tmp_path):
    hu = np.zeros((2, 3, 3), np.float32)
    hu[0, 1, 1] = np.nan
    with pytest.raises(CTWriteError, match="NaN"):
        write_dicom_series(CTVolume(hu=hu), tmp_path / "nan")
    assert not (tmp_path / "nan").exists()


def test_refuses_to_write_into_a_folder_with_files(tmp_path):
    folder = tmp_path / "existing"
    folder.mkdir()
    (folder / "keep.txt").write_text("precious")
    volume = _synthetic()
    with pytest.raises(CTWriteError, match="already holds files"):
        write_dicom_series(volume, folder)
    assert [p.name for p in folder.iterdir()] == ["keep.txt"]
    # An existing empty folder is fine; overwrite=True replaces a non-empty one.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert len(_files(write_dicom_series(volume, empty))) == 3
    write_dicom_series(volume, folder, overwrite=True)
    assert len(_files(folder)) == 3 and not (folder / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "existing"]  # no temporary leftovers


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = pydicom.Dataset.save_as

    def failing_save_as(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("No space left on device")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pydicom.Dataset, "save_as", failing_save_as)
    with pytest.raises(CTWriteError, match="No space left on device"):
        write_dicom_series(_synthetic(), tmp_path / "series")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_series(tmp_path, monkeypatch):
    folder = tmp_path / "old"
    write_dicom_series(_synthetic(shape=(2, 4, 4)), folder)
    before = sorted(p.read_bytes() for p in folder.iterdir())

    def failing_save_as(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pydicom.Dataset, "save_as", failing_save_as)
    with pytest.raises(CTWriteError):
        write_dicom_series(_synthetic(), folder, overwrite=True)
    assert sorted(p.read_bytes() for p in folder.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["old"]


# --------------------------------------------------------------------------------------
# NIfTI and .npy
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vol.nii.gz", "vol.nii"])
def test_nifti_round_trip(small_real, tmp_path, name):
    path = write_nifti(small_real, tmp_path / name)
    back = read_ct(path)
    np.testing.assert_array_equal(back.hu, small_real.hu)
    np.testing.assert_allclose(back.spacing, small_real.spacing, atol=1e-6)
    np.testing.assert_allclose(back.origin, small_real.origin, atol=1e-4)
    np.testing.assert_allclose(back.direction, small_real.direction, atol=1e-6)


def test_nifti_round_trip_of_fractional_and_oblique(tmp_path):
    direction = np.array([[0.0, 0.0, -1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])  # feet-first-like storage
    volume = _synthetic(spacing=(1.5, 0.6, 0.7), origin=(5.0, 6.0, 7.0), direction=direction)
    back = read_ct(write_nifti(volume, tmp_path / "f.nii.gz"))
    # Reading reorients to L, P, S: the same voxels at the same LPS points, stored flipped in z and x.
    np.testing.assert_array_equal(back.hu, volume.hu[::-1, :, ::-1])
    nz, ny, nx = volume.shape
    for k, j, i in [(0, 0, 0), (2, 7, 8), (1, 3, 5)]:
        np.testing.assert_allclose(
            back.affine() @ [k, j, i, 1], volume.affine() @ [nz - 1 - k, j, nx - 1 - i, 1], atol=1e-4
        )
    np.testing.assert_allclose(back.spacing, volume.spacing, atol=1e-6)


def test_npy_round_trip(small_real, tmp_path):
    path = write_npy(small_real, tmp_path / "vol.npy")
    with pytest.warns(CTReadWarning):
        back = read_ct(path)
    np.testing.assert_array_equal(back.hu, small_real.hu)
    assert np.load(path, allow_pickle=False).dtype == np.float32


@pytest.mark.parametrize(("writer", "name"), [(write_nifti, "a.nii.gz"), (write_npy, "a.npy")])
def test_file_writers_refuse_to_overwrite(tmp_path, writer, name):
    path = tmp_path / name
    path.write_bytes(b"precious")
    with pytest.raises(CTWriteError, match="already exists"):
        writer(_synthetic(), path)
    assert path.read_bytes() == b"precious"
    writer(_synthetic(), path, overwrite=True)
    assert path.read_bytes() != b"precious"
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_file_writers_check_the_suffix(tmp_path):
    with pytest.raises(CTWriteError, match=r"\.nii"):
        write_nifti(_synthetic(), tmp_path / "a.img")
    with pytest.raises(CTWriteError, match=r"\.npy"):
        write_npy(_synthetic(), tmp_path / "a.np")


def test_write_ct_chooses_the_format_from_the_name(tmp_path):
    volume = _synthetic()
    assert write_ct(volume, tmp_path / "x.nii.gz").is_file()
    assert write_ct(volume, tmp_path / "x.npy").is_file()
    folder = write_ct(volume, tmp_path / "x.dcmdir", description="test")
    assert folder.is_dir() and len(_files(folder)) == 3
    assert pydicom.dcmread(_files(folder)[0]).SeriesDescription == "test"
    with pytest.raises(CTWriteError, match="ends with .nii"):
        write_ct(volume, tmp_path / "y", format="nifti")
    assert read_ct(tmp_path / "x.nii.gz").hu.shape == (3, 8, 9)
