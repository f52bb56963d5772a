"""NIfTI and NumPy reading: the real NIfTI volume, the axis convention, and bad input."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from napari_langmamba.errors import ConfigError, CTReadError
from napari_langmamba.io import CTReadWarning, iter_read_ct, list_series, read_ct

RNG = np.random.default_rng(0)


def _save_nifti(data: np.ndarray, affine: np.ndarray, path) -> None:
    nib.save(nib.Nifti1Image(data, affine), str(path))


# --------------------------------------------------------------------------------------
# NIfTI
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_nifti(nifti_path):
    return read_ct(nifti_path)


def test_real_nifti_loads_with_3mm_spacing(real_nifti, nifti_path):
    assert real_nifti.spacing == (3.0, 3.0, 3.0)
    # File axes (i, j, k) = (122, 101, 112) become (z, y, x) = (112, 101, 122).
    assert real_nifti.hu.shape == (112, 101, 122)
    assert real_nifti.hu.dtype == np.float32
    assert real_nifti.hu.min() == -1207 and real_nifti.hu.max() == 3382
    assert real_nifti.source == str(nifti_path)


def test_real_nifti_is_oriented_like_dicom(real_nifti, nifti_path):
    """The file is RAS: i and j are flipped to L and P, k (S) kept, then stored as (z, y, x)."""
    img = nib.load(str(nifti_path))
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    data = np.asarray(img.dataobj)
    ni, nj, nk = data.shape
    for k, j, i in [(0, 0, 0), (50, 40, 60), (111, 100, 121), (7, 90, 3)]:
        assert real_nifti.hu[k, j, i] == data[ni - 1 - i, nj - 1 - j, k]
    np.testing.assert_array_equal(real_nifti.direction, [[0, 0, 1], [0, 1, 0], [1, 0, 0]])
    # Voxel (0, 0, 0) of the volume is file voxel (ni-1, nj-1, 0), converted RAS -> LPS.
    ras = img.affine @ np.array([ni - 1, nj - 1, 0, 1.0])
    np.testing.assert_allclose(real_nifti.origin, (-ras[0], -ras[1], ras[2]), atol=1e-4)


def test_any_nifti_axis_order_reads_the_same_volume(tmp_path):
    """A volume stored with permuted and flipped axes reads back identically (same LPS geometry)."""
    ijk = RNG.integers(-1000, 1000, size=(6, 5, 4)).astype(np.int16)  # canonical RAS storage
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    affine[:3, 3] = (-10.0, 20.0, 30.0)
    _save_nifti(ijk, affine, tmp_path / "ras.nii")
    # Same image stored as (k, i, j) with i flipped: voxel (k, i', j) = ijk[5 - i', j, k].
    permuted = np.ascontiguousarray(ijk[::-1].transpose(2, 0, 1))
    new_affine = np.zeros((4, 4))
    new_affine[:3, 0] = affine[:3, 2]  # new axis 0 steps along old k
    new_affine[:3, 1] = -affine[:3, 0]  # new axis 1 steps along old -i
    new_affine[:3, 2] = affine[:3, 1]  # new axis 2 steps along old j
    new_affine[:3, 3] = affine[:3, 3] + 5 * affine[:3, 0]
    new_affine[3, 3] = 1
    _save_nifti(permuted, new_affine, tmp_path / "permuted.nii.gz")
    a, b = read_ct(tmp_path / "ras.nii"), read_ct(tmp_path / "permuted.nii.gz")
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_allclose(a.spacing, (2.5, 0.9, 0.8))
    np.testing.assert_allclose(b.spacing, a.spacing)
    np.testing.assert_allclose(b.origin, a.origin, atol=1e-5)
    np.testing.assert_allclose(b.direction, a.direction, atol=1e-6)


def test_nifti_progress_and_list_series(nifti_path):
    gen = iter_read_ct(nifti_path)
    events = []
    try:
        while True:
            events.append(next(gen))
    except StopIteration as stop:
        volume = stop.value
    assert events[-1].done == events[-1].total
    assert volume.hu.shape == (112, 101, 122)
    (info,) = list_series(nifti_path)
    assert (info.n_slices, info.rows, info.columns) == (112, 101, 122)
    assert info.spacing == (3.0, 3.0, 3.0)
    assert info.description == "abdomen_pelvis_3mm"


def test_4d_nifti_is_refused(tmp_path):
    path = tmp_path / "perfusion.nii.gz"
    _save_nifti(np.zeros((4, 4, 3, 5), np.int16), np.eye(4), path)
    with pytest.raises(CTReadError, match=r"4-D image of shape \(4, 4, 3, 5\)"):
        read_ct(path)
    with pytest.raises(CTReadError, match="4-D"):
        list_series(path)


def test_nifti_with_a_singleton_fourth_axis_is_3d(tmp_path):
    path = tmp_path / "single.nii"
    data = RNG.integers(-100, 100, size=(4, 3, 2, 1)).astype(np.int16)
    _save_nifti(data, np.eye(4), path)
    assert read_ct(path).hu.shape == (2, 3, 4)


def test_2d_nifti_is_one_slice(tmp_path):
    path = tmp_path / "slice.nii"
    _save_nifti(np.arange(12, dtype=np.int16).reshape(4, 3), np.diag([0.5, 0.5, 1, 1]), path)
    volume = read_ct(path)
    assert volume.hu.shape == (1, 3, 4)
    np.testing.assert_allclose(volume.spacing[1:], (0.5, 0.5))


def test_corrupt_nifti_is_a_read_error(tmp_path, nifti_path):
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(nifti_path.read_bytes()[:5000])
    with pytest.raises(CTReadError, match="broken.nii.gz"):
        read_ct(path)
    garbage = tmp_path / "garbage.nii"
    garbage.write_bytes(b"not a nifti header" * 30)
    with pytest.raises(CTReadError, match="not a readable NIfTI"):
        read_ct(garbage)


def test_nifti_scaling_is_applied(tmp_path):
    path = tmp_path / "scaled.nii"
    img = nib.Nifti1Image(np.full((2, 2, 2), 100, np.int16), np.eye(4))
    img.header.set_slope_inter(2.0, -1024.0)
    nib.save(img, str(path))
    np.testing.assert_array_equal(read_ct(path).hu, np.full((2, 2, 2), -824.0))


# --------------------------------------------------------------------------------------
# NumPy
# --------------------------------------------------------------------------------------
def test_npy_2d_becomes_one_slice_with_a_spacing_warning(tmp_path):
    arr = RNG.normal(0, 100, size=(6, 7)).astype(np.float64)
    np.save(tmp_path / "slice.npy", arr)
    with pytest.warns(CTReadWarning, match="no voxel spacing"):
        volume = read_ct(tmp_path / "slice.npy")
    assert volume.hu.shape == (1, 6, 7) and volume.hu.dtype == np.float32
    np.testing.assert_allclose(volume.hu[0], arr, rtol=1e-6)
    assert volume.spacing == (1.0, 1.0, 1.0)


def test_npy_3d_as_is_and_mayo_layout(tmp_path):
    stored = RNG.integers(0, 3000, size=(3, 4, 5)).astype(np.uint16)
    np.save(tmp_path / "mayo.npy", stored)
    with pytest.warns(CTReadWarning):
        as_hu = read_ct(tmp_path / "mayo.npy")
        mayo = read_ct(tmp_path / "mayo.npy", npy_layout="mayo")
    np.testing.assert_array_equal(as_hu.hu, stored.astype(np.float32))
    np.testing.assert_array_equal(mayo.hu, stored.astype(np.float32) - 1024)
    with pytest.raises(ConfigError, match="Unknown .npy layout"):
        read_ct(tmp_path / "mayo.npy", npy_layout="siemens")


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4, 5), (0, 4, 4)])
def test_npy_wrong_rank_is_refused(tmp_path, shape):
    np.save(tmp_path / "bad.npy", np.zeros(shape, np.float32))
    with pytest.raises(CTReadError, match="expected a 2-D slice"):
        read_ct(tmp_path / "bad.npy")


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.zeros((3, 3), dtype=bool), "bool"),
        (np.zeros((3, 3), dtype=np.complex64), "complex64"),
        (np.array(["a", "b"]).reshape(1, 2), "<U1"),
    ],
)
def test_npy_wrong_dtype_is_refused(tmp_path, array, match):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(CTReadError, match=match):
        read_ct(tmp_path / "bad.npy")


def test_npy_object_array_is_never_unpickled(tmp_path):
    arr = np.empty((2, 2), dtype=object)
    arr[:] = [[1, 2], [3, {"x": 1}]]
    np.save(tmp_path / "obj.npy", arr, allow_pickle=True)
    with pytest.raises(CTReadError, match="not a plain numeric .npy array"):
        read_ct(tmp_path / "obj.npy")


def test_truncated_npy_is_a_read_error(tmp_path):
    np.save(tmp_path / "full.npy", np.zeros((4, 64, 64), np.float32))
    data = (tmp_path / "full.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[: len(data) // 2])
    with pytest.raises(CTReadError, match="cut.npy"):
        read_ct(tmp_path / "cut.npy")


def test_npy_list_series_reads_no_data(tmp_path):
    np.save(tmp_path / "vol.npy", np.zeros((3, 4, 5), np.int16))
    (info,) = list_series(tmp_path / "vol.npy")
    assert (info.n_slices, info.rows, info.columns, info.spacing) == (3, 4, 5, None)


def test_gzip_of_non_nifti_is_refused(tmp_path):
    path = tmp_path / "notes.nii.gz"
    path.write_bytes(gzip.compress(b"hello"))
    with pytest.raises(CTReadError, match="notes.nii.gz"):
        read_ct(path)
