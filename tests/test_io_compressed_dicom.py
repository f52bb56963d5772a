"""Compressed DICOM out of the box: real slices encoded in the test into each syntax a PACS uses.

Two real, uncompressed Mayo slices (``../shared/data``) are re-encoded here with GDCM (the
declared ``python-gdcm`` dependency, which also decodes them) and read back through
``read_ct``: every lossless syntax gives the same HU to the unit, JPEG-LS near-lossless stays
within its NEAR bound. JPEG-LS is decoded by CharLS (the declared ``pyjpegls``), GDCM being the
fallback. Nothing encoded is committed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import gdcm  # python-gdcm: a declared dependency (pyproject.toml), so never skipped
import jpeg_ls  # pyjpegls: a declared dependency too
import numpy as np
import pydicom
import pytest
from pydicom import uid

from napari_langmamba.errors import CTReadError, DependencyError
from napari_langmamba.io import dicom as dicom_reader
from napari_langmamba.io import read_ct

MAYO_SERIES = Path("mayo2016_pairs") / "L192" / "quarter_3mm_D45"  # under ../shared/data/ct
NEAR = 2  # JPEG-LS near-lossless: every stored value within +-NEAR


@pytest.fixture(scope="module")
def uncompressed(dicom_series_dir, tmp_path_factory) -> tuple[Path, np.ndarray]:
    """Two real uncompressed slices in a folder, and their HU as the reader gives them."""
    series = dicom_series_dir.parent / MAYO_SERIES
    if not series.is_dir():
        pytest.skip(f"real CT data not found at {series} (../shared/data is incomplete)")
    folder = tmp_path_factory.mktemp("native")
    for src in sorted(series.iterdir())[:2]:
        shutil.copy(src, folder / src.name)
    volume = read_ct(folder)
    assert volume.shape == (2, 512, 512)
    assert str(pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).file_meta.TransferSyntaxUID) in (
        uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian)
    return folder, volume.hu


def _codec(syntax: str):
    if syntax in (uid.JPEGLosslessSV1, uid.JPEGLossless, uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit):
        codec = gdcm.JPEGCodec()
        codec.SetLossless(syntax in (uid.JPEGLosslessSV1, uid.JPEGLossless))
    elif syntax in (uid.JPEGLSLossless, uid.JPEGLSNearLossless):
        codec = gdcm.JPEGLSCodec()
        codec.SetLossless(syntax == uid.JPEGLSLossless)
        if syntax == uid.JPEGLSNearLossless:
            codec.SetLossyError(NEAR)
    elif syntax in (uid.JPEG2000Lossless,):
        codec = gdcm.JPEG2000Codec()
    elif syntax == uid.RLELossless:
        codec = gdcm.RLECodec()
    else:  # pragma: no cover - the parametrisation names only the above
        raise AssertionError(syntax)
    return codec


def encode(src: Path, dst: Path, syntax: str) -> None:
    """Re-encode the DICOM file ``src`` into ``dst`` with the transfer syntax ``syntax`` (GDCM)."""
    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    assert reader.Read(), f"GDCM cannot read {src}"
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(syntax)))
    codec = _codec(syntax)  # kept alive here: GDCM holds only a pointer to it
    change.SetUserCodec(codec)
    change.SetInput(reader.GetImage())
    assert change.Change(), f"GDCM cannot encode {src.name} as {uid.UID(syntax).name}"
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(dst))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write(), f"GDCM cannot write {dst}"


def _encoded_series(native: Path, folder: Path, syntax: str) -> Path:
    folder.mkdir()
    for src in sorted(native.iterdir()):
        encode(src, folder / src.name, syntax)
        written = pydicom.dcmread(folder / src.name, stop_before_pixels=True)
        assert written.file_meta.TransferSyntaxUID == syntax  # really stored in that syntax
    return folder


@pytest.mark.parametrize(
    "syntax",
    [uid.JPEGLosslessSV1, uid.JPEGLossless, uid.JPEGLSLossless, uid.RLELossless, uid.JPEG2000Lossless],
    ids=["jpeg-lossless-sv1", "jpeg-lossless-process14", "jpeg-ls-lossless", "rle", "jpeg2000-lossless"],
)
def test_lossless_syntaxes_read_back_identical_hu(uncompressed, tmp_path, syntax):
    native, hu = uncompressed
    volume = read_ct(_encoded_series(native, tmp_path / "encoded", syntax))
    assert volume.shape == hu.shape
    np.testing.assert_array_equal(volume.hu, hu)


def test_jpeg_ls_near_lossless_stays_within_its_bound(uncompressed, tmp_path):
    native, hu = uncompressed
    volume = read_ct(_encoded_series(native, tmp_path / "near", uid.JPEGLSNearLossless))
    error = np.abs(volume.hu - hu)
    assert error.max() <= NEAR  # slope 1: NEAR stored values are NEAR HU
    assert error.max() > 0  # it really is lossy


@pytest.mark.parametrize("syntax", [uid.JPEGLSLossless, uid.JPEGLSNearLossless], ids=["lossless", "near-lossless"])
def test_jpeg_ls_is_decoded_by_charls_and_by_gdcm_without_it(uncompressed, tmp_path, monkeypatch, syntax):
    # CharLS refuses the damaged JPEG-LS streams GDCM aborts or hangs on (benchmarks/fuzz.py), so it
    # decodes first; where pyjpegls is missing, GDCM decodes the same values.
    from pydicom.pixels import get_decoder

    native, hu = uncompressed
    folder = _encoded_series(native, tmp_path / "jls", syntax)
    assert jpeg_ls.__name__ == "jpeg_ls" and dicom_reader._preferred_plugin(uid.UID(syntax)) == "pyjpegls"
    by_charls = read_ct(folder).hu
    monkeypatch.delitem(get_decoder(syntax)._available, "pyjpegls")  # as if pyjpegls were not installed
    assert dicom_reader._preferred_plugin(uid.UID(syntax)) == ""
    assert get_decoder(syntax).available_plugins == ("gdcm",)
    by_gdcm = read_ct(folder).hu
    np.testing.assert_array_equal(by_charls, by_gdcm)
    error = np.abs(by_charls - hu).max()
    assert error == 0 if syntax == uid.JPEGLSLossless else 0 < error <= NEAR


def test_jpeg_baseline_of_a_real_slice_decodes_close_to_its_source(uncompressed, tmp_path):
    # Baseline JPEG holds 8-bit samples: the real slice windowed to 8 bits (as secondary captures are).
    native, _ = uncompressed
    ds = pydicom.dcmread(sorted(native.iterdir())[0])
    ds.PixelData = np.clip((ds.pixel_array.astype(float) - 900) / 400 * 255, 0, 255).astype(np.uint8).tobytes()
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.save_as(tmp_path / "u8.dcm")
    (tmp_path / "jpeg").mkdir()
    encode(tmp_path / "u8.dcm", tmp_path / "jpeg" / "baseline.dcm", uid.JPEGBaseline8Bit)
    source, decoded = read_ct(tmp_path / "u8.dcm").hu, read_ct(tmp_path / "jpeg" / "baseline.dcm").hu
    assert pydicom.dcmread(tmp_path / "jpeg" / "baseline.dcm").file_meta.TransferSyntaxUID == uid.JPEGBaseline8Bit
    assert np.abs(decoded - source).mean() < 1.0 and np.abs(decoded - source).max() <= 16


def test_lossy_jpeg_2000_decodes():
    from pydicom.data import get_testdata_file

    path = Path(get_testdata_file("JPEG2000.dcm"))
    header = pydicom.dcmread(path, stop_before_pixels=True)
    assert header.file_meta.TransferSyntaxUID == uid.JPEG2000
    volume = read_ct(path)
    assert volume.shape[-2:] == (header.Rows, header.Columns) and volume.hu.std() > 0


def test_12_bit_jpeg_extended_names_the_one_decoder_for_it(uncompressed, tmp_path):
    # GDCM's pydicom plugin does not decode 12-bit process 4; only GPL-3 pylibjpeg-libjpeg does.
    from pydicom.pixels import get_decoder

    native, _ = uncompressed
    encode(sorted(native.iterdir())[0], tmp_path / "ext.dcm", uid.JPEGExtended12Bit)
    if "pylibjpeg" in get_decoder(uid.JPEGExtended12Bit).available_plugins:  # a user installed it: it reads
        assert read_ct(tmp_path / "ext.dcm").shape == (1, 512, 512)
        return
    with pytest.raises(DependencyError, match="12-bit JPEG Extended .* pylibjpeg-libjpeg \\(GPL-3"):
        read_ct(tmp_path / "ext.dcm")


@pytest.mark.parametrize(
    "syntax",
    [uid.JPEGLosslessSV1, uid.JPEGLossless, uid.JPEGLSLossless, uid.JPEGLSNearLossless, uid.RLELossless,
     uid.JPEG2000Lossless, uid.JPEG2000, uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit],
)
def test_every_pacs_syntax_has_a_decoder_from_the_declared_dependencies(syntax):
    from pydicom.pixels import get_decoder

    assert get_decoder(syntax).is_available, f"no decoder for {uid.UID(syntax).name}"


def test_a_syntax_nothing_decodes_stays_a_clear_error(uncompressed, tmp_path):
    native, _ = uncompressed
    src = sorted(native.iterdir())[0]
    ds = pydicom.dcmread(src)
    ds.file_meta.TransferSyntaxUID = uid.MPEG2MPML
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * 64])
    path = tmp_path / "mpeg.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(CTReadError, match="MPEG2 .*cannot be decoded. Re-export the series uncompressed"):
        read_ct(path)
