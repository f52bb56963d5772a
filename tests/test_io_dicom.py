"""DICOM reading: the real JPEG 2000 series, enhanced multi-frame CT, and every kind of bad input.

Odd cases are built in tmp_path from copies of the real slices, modified with pydicom.
"""

from __future__ import annotations

import shutil
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, generate_uid

from napari_langmamba.errors import CTReadError, DependencyError, LangMambaError, SeriesChoiceError
from napari_langmamba.events import Progress, run
from napari_langmamba.io import CTReadWarning, SeriesInfo, iter_read_ct, list_series, read_ct


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def _sorted_by_z(series_dir: Path) -> list[Path]:
    files = [p for p in series_dir.iterdir() if p.is_file()]
    return sorted(files, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))


@pytest.fixture(scope="module")
def real_files(dicom_series_dir) -> list[Path]:
    """The real slices, ordered by z (independently of the reader)."""
    return _sorted_by_z(dicom_series_dir)


@pytest.fixture(scope="module")
def real_read(dicom_series_dir) -> tuple:
    """The real series read once through the progress generator: (volume, events)."""
    events: list[Progress] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", CTReadWarning)  # the real series is clean: no warning at all
        volume = run(iter_read_ct(dicom_series_dir), events.append)
    return volume, events


@pytest.fixture(scope="module")
def real_volume(real_read):
    return real_read[0]


def make_series(files: list[Path], folder: Path, modify=None, names=None) -> Path:
    """Copy ``files`` to ``folder`` (in reverse order and renamed, so names carry no order)."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, src in enumerate(files):
        name = names[k] if names else f"img_{len(files) - k:03d}"
        dst = folder / name
        if modify is None:
            shutil.copy(src, dst)
        else:
            ds = pydicom.dcmread(src)
            modify(ds, k)
            ds.save_as(dst)
    return folder


def hu_of(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


# --------------------------------------------------------------------------------------
# the real series
# --------------------------------------------------------------------------------------
def test_real_series_shape_spacing_and_hu_range(real_volume):
    assert real_volume.hu.shape == (20, 512, 512)
    assert real_volume.hu.dtype == np.float32
    np.testing.assert_allclose(real_volume.spacing, (2.0, 0.977, 0.977), atol=1e-3)
    assert real_volume.hu.min() == -1024
    assert real_volume.hu.max() == 1839


def test_real_series_is_ordered_by_position_not_file_name(real_volume, real_files):
    positions = np.array(real_volume.metadata["slice_positions_lps"])
    assert np.all(np.diff(positions[:, 2]) > 0), "slices must be in ascending position"
    expected_z = [float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) for p in real_files]
    np.testing.assert_array_equal(positions[:, 2], expected_z)
    assert real_volume.origin == tuple(float(v) for v in pydicom.dcmread(real_files[0]).ImagePositionPatient)
    np.testing.assert_array_equal(real_volume.direction, [[0, 0, 1], [0, 1, 0], [1, 0, 0]])
    # The pixels follow the positions: first, a middle and the last slice match their files.
    for k in (0, 7, 19):
        np.testing.assert_array_equal(real_volume.hu[k], hu_of(real_files[k]))


def test_real_series_metadata_is_plain_and_useful(real_volume, dicom_series_dir):
    import json

    meta = real_volume.metadata
    json.dumps(meta)  # JSON-serialisable
    assert meta["SeriesDescription"] == "CT Body 3.0"
    assert meta["Modality"] == "CT"
    assert meta["SliceThickness"] == 3.0
    assert meta["TransferSyntaxUID"] == JPEG2000Lossless
    assert real_volume.source == str(dicom_series_dir)


def test_iter_read_ct_reports_progress_per_slice(real_read, real_files):
    volume, events = real_read
    slice_events = [e for e in events if e.message.startswith("Reading slice")]
    assert [e.done for e in slice_events] == list(range(1, 21))
    assert all(e.total == 20 for e in slice_events)
    assert slice_events[-1].fraction == 1.0
    assert events[0].message.startswith("Reading DICOM headers")  # headers come before pixels
    # read_ct is the same generator driven to its end
    np.testing.assert_array_equal(read_ct(real_files[:2]).hu, volume.hu[:2])


def test_list_series_of_the_real_folder(dicom_series_dir):
    (info,) = list_series(dicom_series_dir)
    assert isinstance(info, SeriesInfo)
    assert (info.n_slices, info.rows, info.columns) == (20, 512, 512)
    assert info.description == "CT Body 3.0" and info.modality == "CT"
    np.testing.assert_allclose(info.spacing, (2.0, 0.9765625, 0.9765625))
    assert len(info.files) == 20
    # The stand-in UID of this anonymised series (no SeriesInstanceUID) selects it.
    assert read_ct(dicom_series_dir, series=info.uid).hu.shape == (20, 512, 512)


def test_single_dicom_file_reads_as_one_slice(real_files):
    volume = read_ct(real_files[3])
    assert volume.hu.shape == (1, 512, 512)
    np.testing.assert_array_equal(volume.hu[0], hu_of(real_files[3]))
    assert volume.spacing[0] == 2.0 or volume.spacing[0] == 3.0  # SpacingBetweenSlices or SliceThickness


def test_enhanced_multiframe_ct():
    from pydicom.data import get_testdata_file

    path = get_testdata_file("eCT_Supplemental.dcm")
    ds = pydicom.dcmread(path)
    volume = read_ct(path)
    assert volume.hu.shape == (2, 512, 512)
    np.testing.assert_allclose(volume.spacing, (10.0, 0.388672, 0.388672))
    # IOP [-1 0 0 0 1 0] -> normal (0, 0, -1): ascending along it puts z = -149 first.
    frames = ds.PerFrameFunctionalGroupsSequence
    z = [float(f.PlanePositionSequence[0].ImagePositionPatient[2]) for f in frames]
    first = int(np.argmax(z))
    assert volume.origin[2] == max(z)
    np.testing.assert_array_equal(volume.hu[0], ds.pixel_array[first].astype(np.float32) - 1024)
    np.testing.assert_array_equal(volume.hu[1], ds.pixel_array[1 - first].astype(np.float32) - 1024)
    np.testing.assert_array_equal(volume.direction[0], [0, 0, -1])


# --------------------------------------------------------------------------------------
# several series
# --------------------------------------------------------------------------------------
@pytest.fixture()
def two_series(real_files, tmp_path) -> tuple[Path, str, str]:
    uid_a, uid_b = generate_uid(), generate_uid()

    def relabel(uid, description, number):
        def modify(ds, k):
            ds.SeriesInstanceUID = uid
            ds.SeriesDescription = description
            ds.SeriesNumber = number

        return modify

    folder = tmp_path / "study"
    make_series(real_files[:3], folder / "a", relabel(uid_a, "Soft tissue 3 mm", 2))
    make_series(real_files[3:7], folder / "b", relabel(uid_b, "Bone 1 mm", 3))
    return folder, uid_a, uid_b


def test_several_series_raise_a_choice_listing_them(two_series):
    folder, uid_a, uid_b = two_series
    with pytest.raises(SeriesChoiceError) as info:
        read_ct(folder)
    message = str(info.value)
    assert "2 image series" in message and "Soft tissue 3 mm" in message and "Bone 1 mm" in message
    assert [s.uid for s in info.value.series] == [uid_a, uid_b]
    assert [s.n_slices for s in info.value.series] == [3, 4]
    assert [s.uid for s in list_series(folder)] == [uid_a, uid_b]


def test_several_series_choose_by_index_or_uid(two_series):
    folder, uid_a, uid_b = two_series
    assert read_ct(folder, series=0).hu.shape == (3, 512, 512)
    by_uid = read_ct(folder, series=uid_b)
    assert by_uid.hu.shape == (4, 512, 512)
    assert by_uid.metadata["SeriesInstanceUID"] == uid_b
    with pytest.raises(SeriesChoiceError, match="no series number 5"):
        read_ct(folder, series=5)
    with pytest.raises(SeriesChoiceError, match="No series with UID"):
        read_ct(folder, series="1.2.3")


def test_a_listed_series_reads_from_its_listing(two_series, monkeypatch):
    """A SeriesInfo (here from the choice error, as the Load widget gets it) reads without a new scan."""
    from napari_langmamba.io import dicom

    folder, uid_a, uid_b = two_series
    with pytest.raises(SeriesChoiceError) as info:
        read_ct(folder)
    chosen = info.value.series[1]
    assert chosen.scan is not None and chosen == list_series(folder)[1]  # the headers take no part in ==
    monkeypatch.setattr(dicom, "iter_scan", None)  # a second scan would fail
    volume = read_ct(folder, series=chosen)
    assert volume.hu.shape == (4, 512, 512) and volume.metadata["SeriesInstanceUID"] == uid_b


def test_a_listing_of_another_path_is_not_reused(two_series):
    folder, uid_a, uid_b = two_series
    (info_b,) = list_series(folder / "b")
    # the same series read through the whole study folder: scanned afresh (the listing saw only b)
    assert read_ct(folder, series=info_b).hu.shape == (4, 512, 512)
    with pytest.raises(SeriesChoiceError, match="No series with UID"):
        read_ct(folder / "a", series=info_b)


@pytest.fixture
def header_reads(monkeypatch) -> Counter:
    """How often pydicom parses each file (by name) from here on."""
    counts: Counter = Counter()
    real_dcmread = pydicom.dcmread

    def counting(fp, *args, **kwargs):
        counts[Path(getattr(fp, "name", fp)).name] += 1
        return real_dcmread(fp, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", counting)
    return counts


def test_each_header_is_parsed_once(dicom_series_dir, real_volume, real_files, header_reads):
    """read_ct, and list_series then reading the listed series (the Load widget's path): one parse per file.

    Before the listing was passed on: 2 per file for read_ct (scan, decode), 3 for list + read.
    """
    once = {f.name: 1 for f in real_files}
    volume = read_ct(dicom_series_dir)
    assert dict(header_reads) == once
    np.testing.assert_array_equal(volume.hu, real_volume.hu)

    header_reads.clear()
    (info,) = list_series(dicom_series_dir)
    listed = read_ct(dicom_series_dir, series=info)
    assert dict(header_reads) == once
    np.testing.assert_array_equal(listed.hu, real_volume.hu)
    assert listed.metadata == real_volume.metadata
    for name in ("spacing", "origin", "direction"):
        np.testing.assert_array_equal(getattr(listed, name), getattr(real_volume, name))


@pytest.mark.parametrize("kind", ["deflated", "no preamble"])
def test_pixel_data_of_deflated_and_preamble_less_files(real_files, tmp_path, kind):
    """A deflated data set (read whole: its header is parsed from a decompressed copy) and a file
    without the 128-byte preamble (its header read with force) decode to the source's HU."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    src = pydicom.dcmread(real_files[2])
    src.decompress()
    path = tmp_path / "slice.dcm"
    if kind == "deflated":
        src.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        src.save_as(path, enforce_file_format=True)
    else:
        src.preamble = None
        src.save_as(path)
    np.testing.assert_array_equal(read_ct(path).hu[0], hu_of(real_files[2]))


# --------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------
def test_empty_folder(tmp_path):
    with pytest.raises(CTReadError, match="empty"):
        read_ct(tmp_path)


def test_non_dicom_files_are_skipped_and_counted(real_files, tmp_path):
    folder = make_series(real_files[:4], tmp_path / "mixed")
    (folder / "notes.txt").write_text("scan protocol")
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1" * 20)
    (folder / "preview.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 200)
    with pytest.warns(CTReadWarning, match=r"Skipped 3 non-DICOM file\(s\)"):
        volume = read_ct(folder)
    assert volume.hu.shape == (4, 512, 512)
    np.testing.assert_array_equal(volume.hu[0], hu_of(real_files[0]))


def test_folder_without_dicom_is_an_error(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.csv").write_text("1,2,3")
    with pytest.raises(CTReadError, match=r"No DICOM images .* 2 non-DICOM file"):
        read_ct(tmp_path)


def test_truncated_pixel_data_names_the_file(real_files, tmp_path):
    folder = make_series(real_files[:3], tmp_path / "trunc")
    victim = sorted(folder.iterdir())[1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(CTReadError, match=f"{victim.name} is truncated or corrupt"):
        read_ct(folder)
    with pytest.raises(CTReadError, match="truncated"):
        read_ct(victim)


def test_truncated_header_is_skipped_with_a_warning(real_files, tmp_path):
    folder = make_series(real_files[:4], tmp_path / "trunc_header")
    victim = sorted(folder.iterdir())[-1]  # img_004 = real_files[0], the first slice
    victim.write_bytes(victim.read_bytes()[:600])
    with pytest.warns(CTReadWarning, match=r"1 DICOM file\(s\) that could not be read"):
        volume = read_ct(folder)
    assert volume.hu.shape == (3, 512, 512)
    with pytest.raises(CTReadError, match="corrupt or truncated DICOM file"):
        read_ct(victim)


def test_truncated_uncompressed_file_is_refused_before_decoding(real_files, tmp_path):
    ds = pydicom.dcmread(real_files[0])
    ds.decompress()
    path = tmp_path / "raw.dcm"
    ds.save_as(path)
    path.write_bytes(path.read_bytes()[:-5000])
    with pytest.raises(CTReadError, match=r"raw.dcm is truncated: .* 512 x 512 pixels"):
        read_ct(path)


def test_absurd_matrix_size_is_refused_without_allocating(real_files, tmp_path):
    def huge(ds, k):
        ds.Rows = ds.Columns = 65535
        ds.NumberOfFrames = 1000

    folder = make_series(real_files[:1], tmp_path / "huge", huge)
    with pytest.raises(CTReadError, match="the header is corrupt"):
        read_ct(folder)


def test_missing_pixel_decoder_names_the_packages(real_files, tmp_path, monkeypatch):
    from pydicom.pixels import get_decoder

    decoder = get_decoder(JPEG2000Lossless)
    monkeypatch.setattr(decoder, "_available", {})
    monkeypatch.setattr(decoder, "_unavailable", {"pylibjpeg": ("pylibjpeg>=2.0", "pylibjpeg-openjpeg>=2.0")})
    folder = make_series(real_files[:2], tmp_path / "j2k")
    with pytest.raises(DependencyError) as info:
        read_ct(folder)
    assert "pylibjpeg" in str(info.value) and "pylibjpeg-openjpeg" in str(info.value)
    assert "JPEG 2000" in str(info.value)
    assert isinstance(info.value, LangMambaError)


def test_missing_rescale_tags_warn_and_assume_identity(real_files, tmp_path):
    def strip(ds, k):
        del ds.RescaleSlope
        del ds.RescaleIntercept

    folder = make_series(real_files[:3], tmp_path / "norescale", strip)
    with pytest.warns(CTReadWarning, match=r"3 of 3 slice\(s\) .* no RescaleSlope/RescaleIntercept"):
        volume = read_ct(folder)
    stored = pydicom.dcmread(real_files[0]).pixel_array
    np.testing.assert_array_equal(volume.hu[0], stored.astype(np.float32))


def test_each_slice_uses_its_own_rescale(real_files, tmp_path):
    def rescale_middle(ds, k):
        if k == 1:
            ds.RescaleSlope = "2"
            ds.RescaleIntercept = "-2048"

    folder = make_series(real_files[:3], tmp_path / "rescale", rescale_middle)
    volume = read_ct(folder)
    stored = pydicom.dcmread(real_files[1]).pixel_array.astype(np.float32)
    np.testing.assert_array_equal(volume.hu[1], stored * 2 - 2048)
    np.testing.assert_array_equal(volume.hu[0], hu_of(real_files[0]))


def test_inconsistent_orientation_is_an_error(real_files, tmp_path):
    def coronal(ds, k):
        if k == 2:
            ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]

    folder = make_series(real_files[:4], tmp_path / "orient", coronal)
    with pytest.raises(CTReadError, match="2 different orientations"):
        read_ct(folder)


def test_missing_slice_warns_and_keeps_spacing(real_files, tmp_path):
    folder = make_series(real_files[:3] + real_files[4:6], tmp_path / "gap")
    with pytest.warns(CTReadWarning, match=r"miss about 1 slice"):
        volume = read_ct(folder)
    assert volume.hu.shape == (5, 512, 512)
    assert volume.spacing[0] == pytest.approx(2.0)


def test_uneven_spacing_warns(real_files, tmp_path):
    def shift(ds, k):
        if k == 2:
            x, y, z = (float(v) for v in ds.ImagePositionPatient)
            ds.ImagePositionPatient = [x, y, z + 0.6]

    folder = make_series(real_files[:5], tmp_path / "uneven", shift)
    with pytest.warns(CTReadWarning, match="uneven slice spacing"):
        volume = read_ct(folder)
    assert volume.spacing[0] == pytest.approx(2.0)


def test_gantry_tilt_warns(real_files, tmp_path):
    def tilt(ds, k):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.5 * k, z]
        ds.GantryDetectorTilt = "14"

    folder = make_series(real_files[:4], tmp_path / "tilt", tilt)
    with pytest.warns(CTReadWarning, match="gantry tilt"):
        read_ct(folder)


def test_non_ct_modality_warns(real_files, tmp_path):
    def mr(ds, k):
        ds.Modality = "MR"

    folder = make_series(real_files[:2], tmp_path / "mr", mr)
    with pytest.warns(CTReadWarning, match="modality MR, not CT"):
        read_ct(folder)


def test_duplicate_positions_warn_and_keep_one(real_files, tmp_path):
    folder = make_series(real_files[:3] + real_files[1:2], tmp_path / "dup")
    with pytest.warns(CTReadWarning, match="same position"):
        volume = read_ct(folder)
    assert volume.hu.shape == (3, 512, 512)


def test_unreadable_paths(tmp_path):
    with pytest.raises(CTReadError, match="does not exist"):
        read_ct(tmp_path / "nowhere")
    (tmp_path / "report.pdf").write_bytes(b"%PDF-1.4 not a CT")
    with pytest.raises(CTReadError, match="not a CT file this reader knows"):
        read_ct(tmp_path / "report.pdf")
    (tmp_path / "fake.dcm").write_bytes(b"just text, not DICOM")
    with pytest.raises(CTReadError, match="not a DICOM file"):
        read_ct(tmp_path / "fake.dcm")


def test_warnings_point_at_the_callers_line(real_files, tmp_path):
    def mr(ds, k):
        ds.Modality = "MR"

    folder = make_series(real_files[:1], tmp_path / "mr1", mr)
    with pytest.warns(CTReadWarning) as record:
        read_ct(folder)
    assert {Path(w.filename).name for w in record} == {Path(__file__).name}
