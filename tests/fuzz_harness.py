"""Fuzzing the CT readers: seeded mutations of real files, each read in a sandboxed worker.

Shared by ``tests/test_fuzz_readers.py`` (a CI-sized run) and ``benchmarks/fuzz.py`` (thousands of
cases); it lives beside the tests, outside the shipped package (it imports pickle and subprocess and
plants pickles). No Qt, no napari, no torch; pydicom and nibabel are imported when cases are generated.

* A :class:`Seed` is a real input: DICOM files from ``../shared/data`` and from pydicom's and
  pydicom-data's bundled test files (located in the installed packages, never downloaded), the
  real NIfTI volume and small NIfTI/``.npy`` files written here.
* :func:`make_case` derives case ``index`` of a format from the seeds with one named mutation
  (truncation, bit flips, wrong or missing tags, absurd sizes, lying transfer syntaxes, deep
  sequences, mixed series, NIfTI/npy header corruption, ...). It is deterministic: the same
  ``(seed, format, index)`` always gives the same bytes, so a failure is reproducible by name.
* :class:`Sandbox` reads each case with ``read_ct`` and ``list_series`` in a worker process with
  a wall-clock time limit, an address-space limit and a resident-memory check, and classifies it:

  ``loaded``           a valid volume (:func:`check_volume`)
  ``clear_error``      a :class:`~napari_langmamba.errors.LangMambaError` with a message
  ``other_exception``  any other exception, or a project error with an empty message
  ``bad_volume``       a volume that breaks the CTVolume contract (non-finite HU without a
                       warning, bad spacing, shapes that disagree with ``list_series``)
  ``timeout``          no answer within the time limit (the worker is killed and restarted)
  ``memory``           resident memory grew more than the limit, or a MemoryError was raised
  ``crash``            the worker died (segfault, abort)
  ``code_executed``    a planted pickle was unpickled (its marker file appeared)

Only the first two are acceptable.
"""

from __future__ import annotations

import ast
import dataclasses
import gzip
import io
import json
import logging
import math
import os
import pickle
import random
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_langmamba.io.samples import _package_dir  # where pydicom's test files are

logger = logging.getLogger(__name__)

FORMATS = ("dicom", "nifti", "npy")
OUTCOMES = (
    "loaded",
    "clear_error",
    "other_exception",
    "bad_volume",
    "timeout",
    "memory",
    "crash",
    "code_executed",
)
ACCEPTABLE = ("loaded", "clear_error")
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MEMORY_LIMIT_MB = 300.0  # resident growth over the worker's idle size
DEFAULT_ADDRESS_SPACE_MB = 3072.0  # virtual memory the worker may add to its idle size
PICKLE_MARKER = "UNPICKLED"  # a planted pickle would create this file in the worker's folder

# A special file in a case: ("fifo",) or ("symlink", target).
Content = bytes | tuple[str, ...]


# ------------------------------------------------------------------------------------------ seeds
@dataclass(frozen=True)
class Seed:
    """A real input file (or DICOM folder) that cases are derived from."""

    format: str
    name: str
    files: tuple[tuple[str, bytes], ...]  # (relative path, content)
    target: str  # relative path that is read: the file, or the folder of a series


@dataclass(frozen=True)
class Case:
    """One fuzz input: a small file tree and the path in it that is read."""

    format: str
    index: int
    mutation: str  # operator name, e.g. "dicom.tag_value"
    description: str  # what was done, for a person reproducing it
    files: tuple[tuple[str, Content], ...]
    target: str

    @property
    def name(self) -> str:
        return f"{self.format}-{self.index:05d}"


def default_shared_data() -> Path:
    """``$LANGMAMBA_SHARED_DATA`` or ``../shared/data`` next to the repository."""
    repo = Path(__file__).resolve().parents[1]
    return Path(os.environ.get("LANGMAMBA_SHARED_DATA", repo.parent / "shared" / "data"))


_PYDICOM_TEST_FILES = (
    "CT_small.dcm",  # CT, explicit VR little endian, 128 x 128
    "MR_small_jp2klossless.dcm",
    "MR_small_RLE.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_jpeg_ls_lossless.dcm",  # needs a JPEG-LS decoder: a DependencyError when absent
    "JPEG2000.dcm",
    "J2K_pixelrep_mismatch.dcm",
    "image_dfl.dcm",  # deflated explicit VR little endian
    "rtdose_1frame.dcm",
    "liver_1frame.dcm",
)
_PYDICOM_DATA_FILES = ("eCT_Supplemental.dcm", "explicit_VR-UN.dcm")


def _phantom(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Air, a water disc and a bone ring, in HU, with noise: a stand-in for CT values."""
    y, x = np.mgrid[: shape[-2], : shape[-1]]
    r = np.hypot(y - shape[-2] / 2, x - shape[-1] / 2) / (min(shape[-2:]) / 2)
    plane = np.where(r < 0.7, 0.0, -1000.0) + np.where((r > 0.55) & (r < 0.7), 900.0, 0.0)
    out = np.broadcast_to(plane, shape) + rng.normal(0, 20, size=shape)
    return out


def _nifti_bytes(data: np.ndarray, affine: np.ndarray, *, version: int = 1, gz: bool = False,
                 slope: float | None = None, inter: float | None = None, sform: bool = True) -> bytes:
    import nibabel as nib

    cls = nib.Nifti1Image if version == 1 else nib.Nifti2Image
    img = cls(data, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1 if sform else 0)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    raw = img.to_bytes()
    return gzip.compress(raw, compresslevel=1, mtime=0) if gz else raw


def _npy_bytes(array: np.ndarray, version: tuple[int, int] | None = None) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, version=version, allow_pickle=False)
    return buf.getvalue()


def build_corpus(shared_data: str | os.PathLike | None = None) -> dict[str, list[Seed]]:
    """The seed inputs per format, from the installed packages and (when present) ``shared_data``."""
    rng = np.random.default_rng(0)
    shared = Path(shared_data) if shared_data is not None else default_shared_data()
    corpus: dict[str, list[Seed]] = {f: [] for f in FORMATS}

    # DICOM: pydicom's and pydicom-data's files, the real series (single files and a folder).
    pydicom_dir = _package_dir("pydicom")
    for name in _PYDICOM_TEST_FILES:
        path = None if pydicom_dir is None else pydicom_dir / "data" / "test_files" / name
        if path is not None and path.is_file():
            corpus["dicom"].append(Seed("dicom", name, ((name, path.read_bytes()),), name))
    data_store = _package_dir("data_store")
    for name in _PYDICOM_DATA_FILES:
        path = None if data_store is None else data_store / "data" / name
        if path is not None and path.is_file():
            corpus["dicom"].append(Seed("dicom", name, ((name, path.read_bytes()),), name))
    series = shared / "ct" / "abdomen_dicom_series"
    if series.is_dir():
        files = sorted(p for p in series.iterdir() if p.is_file())
        for k in (0, len(files) // 2, len(files) - 1):
            corpus["dicom"].append(Seed("dicom", f"real/{files[k].name[-12:]}", (("slice.dcm", files[k].read_bytes()),),
                                        "slice.dcm"))
        chosen = files[5:9]
        corpus["dicom"].append(Seed(
            "dicom", "real-series-4", tuple((f"series/{p.name}", p.read_bytes()) for p in chosen), "series"))
    small = next((s for s in corpus["dicom"] if s.name == "CT_small.dcm"), None)
    if small is not None:
        corpus["dicom"].append(Seed("dicom", "ct_small-series-5", _synthetic_series(small.files[0][1], 5), "series"))

    # NIfTI: the real volume, a real crop, and small files covering what nibabel can write.
    real_nifti = shared / "ct" / "abdomen_pelvis_3mm.nii.gz"
    affine = np.array([[-0.8, 0, 0, 100.0], [0, -0.8, 0, 80.0], [0, 0, 2.5, -300.0], [0, 0, 0, 1]])
    if real_nifti.is_file():
        import nibabel as nib

        corpus["nifti"].append(Seed("nifti", "real.nii.gz", (("real.nii.gz", real_nifti.read_bytes()),), "real.nii.gz"))
        img = nib.load(str(real_nifti))
        crop = np.asarray(img.dataobj[40:72, 30:62, 50:58]).astype(np.int16)
        corpus["nifti"].append(Seed("nifti", "real-crop.nii.gz",
                                    (("crop.nii.gz", _nifti_bytes(crop, img.affine, gz=True)),), "crop.nii.gz"))
        npy_crop = np.ascontiguousarray(crop.transpose(2, 1, 0))
    else:
        npy_crop = _phantom((8, 32, 32), rng).astype(np.int16)
    theta = math.radians(20)
    oblique = np.array([[math.cos(theta), -math.sin(theta), 0, 5], [math.sin(theta), math.cos(theta), 0, 6],
                        [0, 0, 3.0, 7], [0, 0, 0, 1]])
    nifti_small = [
        ("int16.nii", _nifti_bytes(_phantom((16, 12, 5), rng).astype(np.int16), affine)),
        ("scaled.nii.gz", _nifti_bytes(((_phantom((12, 12, 4), rng) + 1024) / 2).astype(np.int16), affine, gz=True,
                                       slope=2.0, inter=-1024.0)),
        ("oblique_uint16.nii", _nifti_bytes((_phantom((10, 10, 3), rng) + 1024).clip(0).astype(np.uint16), oblique)),
        ("float32_4d.nii", _nifti_bytes(_phantom((8, 8, 4), rng).astype(np.float32)[..., None], affine)),
        ("slice2d.nii", _nifti_bytes(_phantom((16, 16), rng).astype(np.float32), affine)),
        ("nifti2.nii", _nifti_bytes(_phantom((9, 8, 3), rng).astype(np.int16), affine, version=2)),
        ("qform_only.nii.gz", _nifti_bytes(_phantom((8, 8, 3), rng).astype(np.int16), oblique, gz=True, sform=False)),
    ]
    corpus["nifti"].extend(Seed("nifti", name, ((name, data),), name) for name, data in nifti_small)

    # .npy: a real crop and the dtypes/layouts/header versions numpy writes.
    npy_small = [
        ("real_crop_int16.npy", _npy_bytes(npy_crop)),
        ("float32.npy", _npy_bytes(_phantom((4, 16, 16), rng).astype(np.float32))),
        ("float64_2d.npy", _npy_bytes(_phantom((16, 16), rng))),
        ("mayo_uint16.npy", _npy_bytes((_phantom((3, 16, 16), rng) + 1024).clip(0).astype(np.uint16))),
        ("bigendian.npy", _npy_bytes(_phantom((3, 8, 8), rng).astype(">i2"))),
        ("fortran.npy", _npy_bytes(np.asfortranarray(_phantom((3, 8, 10), rng).astype(np.float32)))),
        ("version2.npy", _npy_bytes(_phantom((2, 8, 8), rng).astype(np.float32), version=(2, 0))),
        ("float16_2d.npy", _npy_bytes(_phantom((8, 8), rng).astype(np.float16))),
    ]
    corpus["npy"].extend(Seed("npy", name, ((name, data),), name) for name, data in npy_small)
    return corpus


def _synthetic_series(ct_small: bytes, n: int) -> tuple[tuple[str, bytes], ...]:
    """``n`` copies of CT_small.dcm stacked 5 mm apart: a fast uncompressed series."""
    import pydicom
    from pydicom.uid import generate_uid

    files = []
    for k in range(n):
        ds = pydicom.dcmread(io.BytesIO(ct_small))
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + 5.0 * k]
        ds.SliceLocation = z + 5.0 * k
        ds.InstanceNumber = k + 1
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["fuzz", str(k)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        files.append((f"series/CT{k + 1:03d}.dcm", _save(ds)))
    return tuple(files)


# ------------------------------------------------------------------------------ byte mutations
_INTERESTING_BYTES = (b"\x00", b"\xff", b"\x7f", b"\x80", b"\x00\x00\x00\x00", b"\xff\xff\xff\xff",
                      b"\xff\xff\xff\x7f", b"\x00\x00\x00\x80", b"\xfe\xff\x00\xe0", b"\xff\xfe")


def _truncate(rng: random.Random, data: bytes, header: int) -> tuple[bytes, str]:
    how = rng.random()
    if how < 0.4:
        cut = rng.randrange(0, max(1, min(len(data), header + 16)))
    elif how < 0.7:
        cut = max(0, len(data) - rng.randint(1, 64))
    else:
        cut = rng.randrange(0, max(1, len(data)))
    return data[:cut], f"truncated to {cut} of {len(data)} bytes"


def _flip_bits(rng: random.Random, data: bytes, header: int) -> tuple[bytes, str]:
    out = bytearray(data)
    n = rng.choice((1, 1, 2, 3, 8, 32))
    region = min(len(out), header) if rng.random() < 0.75 else len(out)
    if region == 0:
        return data, "nothing to flip"
    positions = sorted(rng.randrange(region) for _ in range(n))
    for p in positions:
        out[p] ^= 1 << rng.randrange(8)
    return bytes(out), f"flipped {n} bit(s) at {positions[:6]}"


def _overwrite(rng: random.Random, data: bytes, header: int) -> tuple[bytes, str]:
    if not data:
        return data, "empty"
    value = rng.choice(_INTERESTING_BYTES) if rng.random() < 0.7 else rng.randbytes(rng.randint(1, 16))
    region = min(len(data), header) if rng.random() < 0.8 else len(data)
    pos = rng.randrange(max(1, region))
    out = data[:pos] + value + data[pos + len(value):]
    return out[: len(data)], f"overwrote {value.hex()} at byte {pos}"


def _chunk(rng: random.Random, data: bytes, header: int) -> tuple[bytes, str]:
    if len(data) < 2:
        return data + rng.randbytes(4), "appended 4 random bytes"
    a = rng.randrange(min(len(data), header + 64))
    b = min(len(data), a + rng.choice((1, 2, 4, 8, 64, 512)))
    how = rng.choice(("delete", "duplicate", "insert"))
    if how == "delete":
        return data[:a] + data[b:], f"deleted bytes {a}..{b}"
    if how == "duplicate":
        return data[:b] + data[a:b] + data[b:], f"duplicated bytes {a}..{b}"
    junk = rng.randbytes(b - a)
    return data[:a] + junk + data[a:], f"inserted {b - a} random bytes at {a}"


_BYTE_OPS: dict[str, Callable[[random.Random, bytes, int], tuple[bytes, str]]] = {
    "truncate": _truncate,
    "bit_flip": _flip_bits,
    "overwrite": _overwrite,
    "chunk": _chunk,
}


def _byte_op(rng: random.Random, data: bytes, header: int) -> tuple[str, bytes, str]:
    name = rng.choice(list(_BYTE_OPS))
    out, description = _BYTE_OPS[name](rng, data, header)
    return name, out, description


# ----------------------------------------------------------------------------- DICOM mutations
_US_VALUES = (0, 1, 2, 3, 7, 8, 12, 15, 16, 17, 24, 31, 32, 33, 64, 255, 256, 4096, 32767, 32768, 65535)
_DS_VALUES = ("0", "-1", "-0", "nan", "NaN", "inf", "-inf", "1e308", "-1e308", "1e-308", "1e38", "3.5e38",
              "1e400", "abc", "", " ", "1\\2", "0.0000001", "65536", "-32768")
_IS_VALUES = ("0", "-1", "1", "2", "3", "100000", "2147483647", "2147483648", "99999999999", "1.5", "abc", "",
              "nan")
_CS_PHOTOMETRIC = ("RGB", "PALETTE COLOR", "YBR_FULL_422", "YBR_FULL", "MONOCHROME1", "", "XYZ")
_TRANSFER_SYNTAXES = (
    "1.2.3.4.5",  # unknown
    "1.2.840.10008.1.2",  # implicit VR (a lie for explicit data)
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.2",  # big endian
    "1.2.840.10008.1.2.1.99",  # deflated
    "1.2.840.10008.1.2.4.50",  # JPEG baseline
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.5",  # RLE
    "1.2.840.10008.1.2.4.100",  # MPEG2
    "1.2.840.10008.1.2.4.201",  # HTJ2K
    "",
    "not-a-uid",
)
# keyword -> (VR, candidate values); DS/IS/CS values are text, US values integers.
_TAG_VALUES: dict[str, tuple[str, tuple]] = {
    "Rows": ("US", _US_VALUES),
    "Columns": ("US", _US_VALUES),
    "BitsAllocated": ("US", _US_VALUES),
    "BitsStored": ("US", _US_VALUES),
    "HighBit": ("US", _US_VALUES),
    "PixelRepresentation": ("US", (0, 1, 2, 255, 65535)),
    "SamplesPerPixel": ("US", (0, 1, 2, 3, 4, 65535)),
    "PlanarConfiguration": ("US", (0, 1, 2, 65535)),
    "NumberOfFrames": ("IS", _IS_VALUES),
    "InstanceNumber": ("IS", _IS_VALUES),
    "RescaleSlope": ("DS", _DS_VALUES),
    "RescaleIntercept": ("DS", _DS_VALUES),
    "SliceThickness": ("DS", _DS_VALUES),
    "SpacingBetweenSlices": ("DS", _DS_VALUES),
    "PixelSpacing": ("DS", ("0\\0", "-1\\-1", "nan\\nan", "inf\\1", "1", "1\\2\\3", "abc\\def", "1e308\\1e308",
                            "0.5\\0", "")),
    "ImagePositionPatient": ("DS", ("nan\\nan\\nan", "0\\0\\nan", "inf\\0\\0", "1e308\\1e308\\1e308", "1\\2", "",
                                    "a\\b\\c", "-1e308\\0\\1e308")),
    "ImageOrientationPatient": ("DS", ("0\\0\\0\\0\\0\\0", "1\\0\\0\\1\\0\\0", "nan\\0\\0\\0\\1\\0",
                                       "1\\0\\0\\0\\1", "2\\0\\0\\0\\2\\0", "1e308\\0\\0\\0\\1\\0", "",
                                       "1\\0\\0\\0\\1\\0\\0")),
    "PhotometricInterpretation": ("CS", _CS_PHOTOMETRIC),
    "Modality": ("CS", ("MR", "", "PT", "XX")),
    "SeriesInstanceUID": ("UI", ("", "1.2.3", "x" * 64)),
    "WindowCenter": ("DS", ("nan", "abc", "")),
    "GantryDetectorTilt": ("DS", ("nan", "30", "-90", "1e308")),
}
_DELETABLE = (
    "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel",
    "PhotometricInterpretation", "RescaleSlope", "RescaleIntercept", "PixelSpacing", "ImagePositionPatient",
    "ImageOrientationPatient", "PixelData", "SeriesInstanceUID", "SOPClassUID", "Modality", "NumberOfFrames",
    "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence", "SliceThickness", "SOPInstanceUID",
)


def _save(ds: Any) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _encode(vr: str, value: Any, little: bool) -> bytes:
    if vr == "US":
        return struct.pack("<H" if little else ">H", int(value) & 0xFFFF)
    text = str(value).encode("ascii", "replace")
    pad = b"\0" if vr == "UI" else b" "
    return text + pad if len(text) % 2 else text


def _set_raw(ds: Any, keyword_or_tag: str | int, vr: str, value: bytes) -> None:
    """Put ``value`` into ``ds`` verbatim (pydicom would refuse to encode invalid values)."""
    from pydicom.datadict import tag_for_keyword
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    tag = Tag(tag_for_keyword(keyword_or_tag) if isinstance(keyword_or_tag, str) else keyword_or_tag)
    implicit, little = ds.original_encoding
    implicit = bool(implicit) if implicit is not None else False
    little = True if little is None else bool(little)
    ds[tag] = RawDataElement(tag, None if implicit else vr, len(value), value, 0, implicit, little)


def _little(ds: Any) -> bool:
    little = ds.original_encoding[1]
    return True if little is None else bool(little)


def _pixel_data_offset(data: bytes) -> int | None:
    """File offset of the PixelData element's tag, or None."""
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), defer_size=None)
        raw = ds.get_item(0x7FE00010)
    except Exception:  # noqa: BLE001 - a seed that pydicom cannot parse has no offset to report
        return None
    if raw is None or not hasattr(raw, "value_tell"):
        return None
    implicit = ds.original_encoding[0]
    return int(raw.value_tell) - (8 if implicit else 12)


def _patch_transfer_syntax(data: bytes, uid: str) -> bytes:
    """Rewrite (0002,0010) in the file meta group (always explicit VR little endian) to ``uid``."""
    if data[128:132] != b"DICM":
        return data
    pos, elements = 132, []
    while pos + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, pos)
        if group != 2:
            break
        vr = data[pos + 4:pos + 6]
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR", b"OF", b"OD", b"OL", b"OV"):
            length = struct.unpack_from("<I", data, pos + 8)[0]
            header = 12
        else:
            length = struct.unpack_from("<H", data, pos + 6)[0]
            header = 8
        elements.append((element, vr, data[pos + header:pos + header + length], data[pos:pos + header + length]))
        pos += header + length
    value = uid.encode("ascii") + (b"\0" if len(uid) % 2 else b"")
    body = b""
    for element, _vr, _value, raw in elements:
        if element == 0x0000:
            continue
        if element == 0x0010:
            raw = struct.pack("<HH2sH", 2, 0x10, b"UI", len(value)) + value
        body += raw
    group_length = struct.pack("<HH2sHI", 2, 0, b"UL", 4, len(body))
    return data[:132] + group_length + body + data[pos:]


def _nested_sequences(depth: int, flavour: str, little: bool, implicit: bool) -> bytes:
    """``depth`` nested sequences of one item each, as raw bytes (tag (0008,1140))."""
    e = "<" if little else ">"

    def sq(length: int) -> bytes:
        if implicit:
            return struct.pack(e + "HHI", 0x0008, 0x1140, length)
        return struct.pack(e + "HH2sHI", 0x0008, 0x1140, b"SQ", 0, length)

    def item(length: int) -> bytes:
        return struct.pack(e + "HHI", 0xFFFE, 0xE000, length)

    undefined = 0xFFFFFFFF
    if flavour == "delimited":
        close = struct.pack(e + "HHI", 0xFFFE, 0xE00D, 0) + struct.pack(e + "HHI", 0xFFFE, 0xE0DD, 0)
        return (sq(undefined) + item(undefined)) * depth + close * depth
    if flavour == "undelimited":
        return (sq(undefined) + item(undefined)) * depth
    if flavour == "lying":
        return (sq(0xFFFFFFF0) + item(0xFFFFFFF0)) * depth
    inner = b""  # defined lengths, built from the inside out
    for _ in range(depth):
        inner = item(len(inner)) + inner
        inner = sq(len(inner)) + inner
    return inner


def _huge_element(little: bool, implicit: bool, rng: random.Random) -> bytes:
    """A private OB element whose length claims up to 4 GB (more than any file holds)."""
    e = "<" if little else ">"
    length = rng.choice((0xFFFFFFF0, 0x7FFFFFFF, 0x10000000, 0xFFFFFFFE))
    if implicit:
        return struct.pack(e + "HHI", 0x0009, 0x1010, length) + b"\0" * 16
    return struct.pack(e + "HH2sHI", 0x0009, 0x1010, b"OB", 0, length) + b"\0" * 16


def _splice_before_pixels(data: bytes, blob: bytes) -> bytes:
    offset = _pixel_data_offset(data)
    if offset is None or offset <= 132:
        return data + blob
    return data[:offset] + blob + data[offset:]


def _dicom_tag_mutation(rng: random.Random, data: bytes) -> tuple[str, bytes, str]:
    """One structured change to a DICOM file, through pydicom with raw (unvalidated) values."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    implicit = bool(ds.original_encoding[0])
    little = _little(ds)
    op = rng.choices(
        ("tag_value", "tag_delete", "transfer_syntax", "absurd_size", "pixel_data", "deep_sequence",
         "huge_length", "functional_groups"),
        weights=(8, 4, 2, 2, 2, 1, 1, 1 if "PerFrameFunctionalGroupsSequence" in ds else 0),
    )[0]
    if op == "tag_value":
        keywords = rng.sample(list(_TAG_VALUES), k=rng.choice((1, 1, 2, 3)))
        parts = []
        for keyword in keywords:
            vr, values = _TAG_VALUES[keyword]
            value = rng.choice(values) if rng.random() < 0.85 else rng.randrange(65536)
            if vr == "US" and isinstance(value, str):
                value = 0
            encoded = _encode(vr, value, little)
            if vr == "US" and rng.random() < 0.15:  # two values, or an odd length, where one is expected
                encoded = encoded + (encoded if rng.random() < 0.5 else b"\x01")
                value = f"{value} (length {len(encoded)})"
            _set_raw(ds, keyword, vr, encoded)
            parts.append(f"{keyword}={value!r}")
        return op, _save(ds), "set " + ", ".join(parts)
    if op == "tag_delete":
        present = [k for k in _DELETABLE if k in ds]
        gone = rng.sample(present, k=min(len(present), rng.choice((1, 1, 2)))) if present else []
        for keyword in gone:
            del ds[keyword]
        return op, _save(ds), f"deleted {gone}"
    if op == "transfer_syntax":
        uid = rng.choice(_TRANSFER_SYNTAXES)
        return op, _patch_transfer_syntax(data, uid), f"TransferSyntaxUID -> {uid!r} (data unchanged)"
    if op == "absurd_size":
        rows, columns = rng.choice(((65535, 65535), (65535, 1), (1, 65535), (40000, 40000), (0, 0), (0, 512)))
        frames = rng.choice(("1", "100000", "2147483647", "1000"))
        _set_raw(ds, "Rows", "US", _encode("US", rows, little))
        _set_raw(ds, "Columns", "US", _encode("US", columns, little))
        _set_raw(ds, "NumberOfFrames", "IS", _encode("IS", frames, little))
        if rng.random() < 0.5:
            _set_raw(ds, "BitsAllocated", "US", _encode("US", rng.choice((16, 32, 64)), little))
        return op, _save(ds), f"header claims {frames} frame(s) of {rows} x {columns} pixels"
    if op == "pixel_data" and "PixelData" in ds:
        raw = ds.get_item(0x7FE00010)
        value = bytes(raw.value)
        how = rng.choice(("shorter", "longer", "empty", "odd", "flip"))
        if how == "shorter":
            value = value[: rng.randrange(max(1, len(value)))]
        elif how == "longer":
            value = value + rng.randbytes(rng.choice((2, 1024, 65536)))
        elif how == "empty":
            value = b""
        elif how == "odd":
            value = value[:-1]
        else:
            buf = bytearray(value)
            for _ in range(rng.choice((1, 8, 64))):
                if buf:
                    buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
            value = bytes(buf)
        vr = raw.VR or "OB"
        if raw.length == 0xFFFFFFFF:  # encapsulated: keep the undefined length, the bytes are fragments
            ds[0x7FE00010] = pydicom.dataelem.RawDataElement(raw.tag, vr, 0xFFFFFFFF, value, 0, implicit, little)
        else:
            _set_raw(ds, 0x7FE00010, vr if vr in ("OB", "OW") else "OW", value)
        return op, _save(ds), f"pixel data made {how} ({len(value)} bytes)"
    if op == "deep_sequence":
        flavour = rng.choice(("delimited", "undelimited", "defined", "lying"))
        depth = rng.choice((64, 500, 2000) if flavour == "defined" else (64, 1000, 20000, 100000))
        blob = _nested_sequences(depth, flavour, little, implicit)
        return op, _splice_before_pixels(data, blob), f"{depth} nested sequences ({flavour} lengths)"
    if op == "huge_length":
        return op, _splice_before_pixels(data, _huge_element(little, implicit, rng)), "element with a 4 GB length"
    if op == "functional_groups" and "PerFrameFunctionalGroupsSequence" in ds:
        groups = ds.PerFrameFunctionalGroupsSequence
        how = rng.choice(("drop_items", "nan_position", "zero_spacing", "more_frames", "empty_items"))
        if how == "drop_items" and len(groups) > 1:
            del groups[rng.randrange(len(groups))]
        elif how == "nan_position":
            for item in groups:
                for plane in item.get("PlanePositionSequence", []):
                    _set_raw(plane, "ImagePositionPatient", "DS", _encode("DS", "nan\\nan\\nan", little))
        elif how == "zero_spacing":
            for item in groups:
                for measures in item.get("PixelMeasuresSequence", []):
                    _set_raw(measures, "PixelSpacing", "DS", _encode("DS", "0\\0", little))
                    _set_raw(measures, "SliceThickness", "DS", _encode("DS", "0", little))
        elif how == "more_frames":
            _set_raw(ds, "NumberOfFrames", "IS", _encode("IS", str(len(groups) + rng.choice((1, 100))), little))
        else:
            for item in groups:
                item.clear()
        return op, _save(ds), f"functional groups: {how}"
    name, out, description = _byte_op(rng, data, _pixel_data_offset(data) or 2048)
    return name, out, description


def _dicom_folder_mutation(rng: random.Random, files: list[tuple[str, bytes]], folder: str,
                           extras: dict[str, bytes]) -> tuple[str, list[tuple[str, Content]], str]:
    """A change to a DICOM series folder: geometry, mixed series, or odd files next to it."""
    import pydicom

    op = rng.choices(("geometry", "mixed", "extra_file", "one_file"), weights=(3, 3, 2, 3))[0]
    out: list[tuple[str, Content]] = list(files)
    datasets = [pydicom.dcmread(io.BytesIO(data)) for _, data in files]
    little = _little(datasets[0])
    if op == "geometry":
        how = rng.choice(("duplicate", "nan_one", "nan_all", "same_all", "zero_step", "random", "missing_some",
                          "tiny_step", "huge"))
        positions = [[float(v) for v in ds.ImagePositionPatient] for ds in datasets]
        texts: list[str | None] = [None] * len(datasets)
        if how == "duplicate":
            i, j = rng.sample(range(len(datasets)), 2)
            positions[j] = list(positions[i])
        elif how == "nan_one":
            texts[rng.randrange(len(texts))] = "nan\\nan\\nan"
        elif how == "nan_all":
            texts = ["0\\0\\nan"] * len(texts)
        elif how in ("same_all", "zero_step"):
            positions = [list(positions[0]) for _ in positions]
        elif how == "random":
            positions = [[rng.uniform(-500, 500) for _ in range(3)] for _ in positions]
        elif how == "missing_some":
            for ds in rng.sample(datasets, k=max(1, len(datasets) // 2)):
                del ds.ImagePositionPatient
        elif how == "tiny_step":
            positions = [[p[0], p[1], positions[0][2] + 1e-6 * k] for k, p in enumerate(positions)]
        else:
            positions = [[p[0], p[1], 1e308 * (1 if k % 2 else -1)] for k, p in enumerate(positions)]
        for k, ds in enumerate(datasets):
            if "ImagePositionPatient" not in ds and texts[k] is None:
                continue
            text = texts[k] or "\\".join(repr(v) for v in positions[k])
            _set_raw(ds, "ImagePositionPatient", "DS", _encode("DS", text, little))
        description = f"series geometry: {how}"
    elif op == "mixed":
        how = rng.choice(("two_series", "no_uid", "rows", "orientation", "modality", "syntax", "bits"))
        k = rng.randrange(len(datasets))
        ds = datasets[k]
        if how == "two_series":
            for other in datasets[k:]:
                other.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.999"
        elif how == "no_uid":
            del ds.SeriesInstanceUID
        elif how == "rows":
            _set_raw(ds, "Rows", "US", _encode("US", int(ds.Rows) // 2, little))
        elif how == "orientation":
            _set_raw(ds, "ImageOrientationPatient", "DS", _encode("DS", "1\\0\\0\\0\\0\\-1", little))
        elif how == "modality":
            ds.Modality = "MR"
        elif how == "syntax" and ds.file_meta.TransferSyntaxUID.is_compressed:
            ds.decompress()
        else:
            _set_raw(ds, "BitsAllocated", "US", _encode("US", 8, little))
        description = f"mixed series: {how} (file {k})"
    elif op == "extra_file":
        how = rng.choice(("junk", "empty", "dicomdir_cyclic", "fifo", "dev_zero", "report", "duplicate_file",
                          "hidden_dir", "nested"))
        if how == "junk":
            out.append((f"{folder}/notes.dcm", rng.randbytes(rng.choice((10, 200, 5000)))))
        elif how == "empty":
            out.append((f"{folder}/empty.dcm", b""))
        elif how == "dicomdir_cyclic" and "DICOMDIR" in extras:
            out.append((f"{folder}/DICOMDIR", extras["DICOMDIR"]))
        elif how == "fifo":
            out.append((f"{folder}/pipe.dcm", ("fifo",)))
        elif how == "dev_zero":
            out.append((f"{folder}/zeros.dcm", ("symlink", "/dev/zero")))
        elif how == "report" and "rtplan" in extras:
            out.append((f"{folder}/plan.dcm", extras["rtplan"]))
        elif how == "duplicate_file":
            out.append((f"{folder}/copy_of_first.dcm", files[0][1]))
        elif how == "hidden_dir":
            out.append((f"{folder}/.trash/old.dcm", files[0][1]))
        else:
            out.append((f"{folder}/sub/dir/deeper.dcm", files[-1][1]))
        return op, out, f"folder also holds: {how}"
    else:
        k = rng.randrange(len(files))
        name, data, description = _dicom_tag_mutation(rng, files[k][1]) if rng.random() < 0.6 else \
            _byte_op(rng, files[k][1], _pixel_data_offset(files[k][1]) or 2048)
        out[k] = (files[k][0], data)
        return f"one_file.{name}", out, f"file {k}: {description}"
    for k, ds in enumerate(datasets):
        out[k] = (files[k][0], _save(ds))
    return op, out, description


def _cyclic_dicomdir() -> bytes | None:
    """pydicom's test DICOMDIR with its last record pointing back to the first (a cycle)."""
    import pydicom

    base = _package_dir("pydicom")
    path = None if base is None else base / "data" / "test_files" / "dicomdirtests" / "DICOMDIR"
    if path is None or not path.is_file():
        return None
    ds = pydicom.dcmread(path)
    first = ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity
    records = ds.DirectoryRecordSequence
    records[-1].OffsetOfTheNextDirectoryRecord = first
    records[0].OffsetOfReferencedLowerLevelDirectoryEntity = first
    return _save(ds)


# ----------------------------------------------------------------------------- NIfTI mutations
# NIfTI-1 header fields: name -> (offset, struct format, candidate values).
_NIFTI1_FIELDS: dict[str, tuple[int, str, tuple]] = {
    "sizeof_hdr": (0, "i", (348, 540, 0, -1, 349, 1543569408)),
    "dim[0]": (40, "h", (-1, 0, 1, 2, 3, 4, 5, 7, 8, 9, 32767)),
    "dim[1]": (42, "h", (0, -1, 1, 32767, -32768, 100)),
    "dim[2]": (44, "h", (0, -1, 1, 32767, -32768, 100)),
    "dim[3]": (46, "h", (0, -1, 1, 32767, -32768, 100)),
    "dim[4]": (48, "h", (0, 1, 2, 32767, -1)),
    "datatype": (70, "h", (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304,
                           9999, -1, 16384)),
    "bitpix": (72, "h", (0, 1, 8, 16, 32, 64, 128, -1, 12)),
    "pixdim[0]": (76, "f", (0.0, -1.0, 1.0, 2.0, float("nan"))),
    "pixdim[1]": (80, "f", (0.0, -1.0, float("nan"), float("inf"), 1e-30, 1e30, 3.4e38)),
    "pixdim[2]": (84, "f", (0.0, -1.0, float("nan"), float("inf"), 1e-30, 1e30, 3.4e38)),
    "pixdim[3]": (88, "f", (0.0, -1.0, float("nan"), float("inf"), 1e-30, 1e30, 3.4e38)),
    "vox_offset": (108, "f", (0.0, 1.0, 347.0, 348.0, 352.0, 353.0, 351.5, 1e9, -352.0, float("nan"),
                              float("inf"), 2.0**31)),
    "scl_slope": (112, "f", (0.0, float("nan"), float("inf"), -float("inf"), 1e38, -1e38, 1e-38, 1.0)),
    "scl_inter": (116, "f", (float("nan"), float("inf"), 1e38, -1e38, 0.0)),
    "qform_code": (252, "h", (0, 1, 2, 3, 4, 5, -1, 32767)),
    "sform_code": (254, "h", (0, 1, 2, 3, 4, 5, -1, 32767)),
    "quatern_b": (256, "f", (float("nan"), 2.0, -2.0, 1.0, 0.0, float("inf"))),
    "quatern_c": (260, "f", (float("nan"), 2.0, 1.0, float("inf"))),
    "quatern_d": (264, "f", (float("nan"), 2.0, 1.0, float("inf"))),
    "qoffset_x": (268, "f", (float("nan"), float("inf"), 1e38)),
    "srow_x[0]": (280, "f", (float("nan"), float("inf"), 0.0, 1e38, 1e-38)),
    "srow_y[1]": (300, "f", (float("nan"), float("inf"), 0.0, 1e38, 1e-38)),
    "srow_z[2]": (320, "f", (float("nan"), float("inf"), 0.0, 1e38, 1e-38)),
    "srow_z[3]": (324, "f", (float("nan"), float("inf"), 1e38)),
    "magic": (344, "4s", (b"n+1\0", b"ni1\0", b"n+2\0", b"\0\0\0\0", b"xyz\0")),
    "xyzt_units": (123, "B", (0, 1, 2, 3, 255)),
    "dim_info": (39, "B", (0, 255, 57)),
    "intent_code": (68, "h", (0, 1001, 2001, 2005, -1)),
}
# NIfTI-2 (540-byte header): a few fields with wider types.
_NIFTI2_FIELDS: dict[str, tuple[int, str, tuple]] = {
    "dim[0]": (16, "q", (-1, 0, 3, 4, 8, 9)),
    "dim[1]": (24, "q", (0, -1, 100000, 2**40, 2**62)),
    "dim[2]": (32, "q", (0, -1, 100000, 2**40)),
    "dim[3]": (40, "q", (0, -1, 100000, 2**40)),
    "datatype": (12, "h", (0, 1, 32, 128, 1536, 9999)),
    "pixdim[1]": (112, "d", (0.0, -1.0, float("nan"), float("inf"), 1e300)),
    "vox_offset": (168, "q", (0, 1, 539, 540, 2**40, -544)),
    "scl_slope": (176, "d", (0.0, float("nan"), float("inf"), 1e300)),
    "srow_x[0]": (400, "d", (float("nan"), float("inf"), 0.0, 1e300)),
}


def _nifti_layout(raw: bytes) -> tuple[dict[str, tuple[int, str, tuple]], str, int]:
    """Field table, byte order and header size of a NIfTI payload."""
    for order in ("<", ">"):
        if len(raw) >= 4:
            size = struct.unpack_from(order + "i", raw, 0)[0]
            if size == 348:
                return _NIFTI1_FIELDS, order, 348
            if size == 540:
                return _NIFTI2_FIELDS, order, 540
    return _NIFTI1_FIELDS, "<", 348


def _set_field(raw: bytes, offset: int, fmt: str, value: Any, order: str) -> bytes:
    if offset + struct.calcsize(fmt) > len(raw):
        return raw
    out = bytearray(raw)
    struct.pack_into(order + fmt, out, offset, value)
    return bytes(out)


def _nifti_mutation(rng: random.Random, name: str, data: bytes) -> tuple[str, bytes, str]:
    gz = name.endswith(".gz")
    op = rng.choices(("header_field", "absurd_dims", "extension", "gzip", "data_region", "bytes"),
                     weights=(8, 2, 1, 2 if gz else 1, 2, 3))[0]
    if op == "gzip":
        how = rng.choice(("truncate", "flip", "crc", "garbage_after", "two_members", "plain", "empty")
                         if gz else ("compressed_content", "plain_truncated"))
        if how == "truncate":
            out = data[: rng.randrange(max(1, len(data)))]
        elif how == "flip":
            out, _ = _flip_bits(rng, data, len(data))
        elif how == "crc":
            out = data[:-8] + rng.randbytes(8)
        elif how == "garbage_after":
            out = data + rng.randbytes(rng.choice((1, 10, 1000)))
        elif how == "two_members":
            out = data + data
        elif how == "plain":
            out = gzip.decompress(data)
        elif how == "empty":
            out = gzip.compress(b"", mtime=0)
        elif how == "compressed_content":
            out = gzip.compress(data, compresslevel=1, mtime=0)
        else:
            out = data[: len(data) // 2]
        return f"gzip.{how}", out, f"gzip stream: {how}"
    raw = gzip.decompress(data) if gz else data
    fields, order, header = _nifti_layout(raw)
    if op == "header_field":
        chosen = rng.sample(list(fields), k=rng.choice((1, 1, 2, 3)))
        parts = []
        for field in chosen:
            offset, fmt, values = fields[field]
            value = rng.choice(values)
            raw = _set_field(raw, offset, fmt, value, order)
            parts.append(f"{field}={value!r}")
        description = "set " + ", ".join(parts)
    elif op == "absurd_dims":
        if header == 540:
            dims = rng.choice(((100000, 100000, 100000), (2**40, 1, 1), (2**31, 2**31, 1)))
            for k, d in enumerate(dims):
                raw = _set_field(raw, 24 + 8 * k, "q", d, order)
        else:
            dims = rng.choice(((32767, 32767, 32767), (32767, 32767, 1), (10000, 10000, 100)))
            raw = _set_field(raw, 40, "h", 3, order)
            for k, d in enumerate(dims):
                raw = _set_field(raw, 42 + 2 * k, "h", d, order)
        description = f"dims claim {dims}"
    elif op == "extension":
        esize = rng.choice((16, 8, 0, -16, 2**31 - 8, 17, 1 << 24))
        ext = struct.pack(order + "ii", esize, rng.choice((4, 6, 40, -1))) + rng.randbytes(8)
        raw = raw[:header] + b"\1\0\0\0" + ext + raw[header + 4:]
        description = f"header extension with esize {esize}"
    elif op == "data_region":
        vox = header + 4
        how = rng.choice(("truncate", "flip", "nan"))
        if how == "truncate":
            raw = raw[: rng.randrange(vox, max(vox + 1, len(raw)))]
        elif how == "flip":
            raw, _ = _flip_bits(rng, raw[vox:], 0)
            raw = (gzip.decompress(data) if gz else data)[:vox] + raw
        else:
            pos = vox + 4 * rng.randrange(max(1, (len(raw) - vox) // 4))
            raw = raw[:pos] + struct.pack(order + "f", float("nan")) + raw[pos + 4:]
        description = f"data region: {how}"
    else:
        op, raw, description = _byte_op(rng, raw, header + 4)
        op = f"bytes.{op}"
    return op, gzip.compress(raw, compresslevel=1, mtime=0) if gz else raw, description


# ------------------------------------------------------------------------------ npy mutations
_NPY_DESCRS = ("<f4", ">f4", "<f8", "<i2", "|u1", "<f2", "<f16", "|O", "<c8", "|b1", "<U4", "|S4", "|V8",
               "<M8[s]", "<m8[s]", "[('a', '<f4')]", "'garbage'", "<i8", "<u8", "<f4 ", "", "<i0", "<f3")
_NPY_SHAPES = ("()", "(0,)", "(5,)", "(100000, 100000)", "(100000, 100000, 100000)", "(-1, 5)", "(2, -3, 4)",
               "(2**62, 2**62)", "(4611686018427387904, 4)", "('a', 3)", "(2.5, 3)", "((2, 3), 4)",
               "(1, 1, 1, 1)", "(0, 8, 8)", "(3, 0, 8)", "(True, 8, 8)", "[3, 8, 8]", "(1, 1, 1)",
               "(65536, 65536, 65536)", "(10**30,)")


def _npy_header(data: bytes) -> tuple[int, int, str, int]:
    """``(major, minor, header text, data offset)`` of an npy file (as written by numpy)."""
    major, minor = data[6], data[7]
    if major == 1:
        (length,) = struct.unpack_from("<H", data, 8)
        start = 10
    else:
        (length,) = struct.unpack_from("<I", data, 8)
        start = 12
    return major, minor, data[start:start + length].decode("latin1"), start + length


def _npy_file(text: str, body: bytes, *, version: tuple[int, int] = (1, 0), pad: bool = True) -> bytes:
    prefix = 10 if version[0] == 1 else 12
    if pad:
        total = prefix + len(text) + 1
        text = text + " " * ((64 - total % 64) % 64) + "\n"
    raw = text.encode("latin1")
    length = struct.pack("<H", len(raw) % 65536) if version[0] == 1 else struct.pack("<I", len(raw))
    return b"\x93NUMPY" + bytes(version) + length + raw + body


class _Unpickled:
    """A pickle that, if ever unpickled, creates :data:`PICKLE_MARKER` in the reader's folder."""

    def __reduce__(self) -> tuple:
        return (Path.touch, (Path(PICKLE_MARKER),))


def _npy_mutation(rng: random.Random, data: bytes) -> tuple[str, bytes, str]:
    major, minor, text, offset = _npy_header(data)
    body = data[offset:]
    header = ast.literal_eval(text)
    op = rng.choices(("header_dict", "absurd_shape", "header_length", "magic_version", "data_region",
                      "not_an_array", "bytes"), weights=(8, 2, 2, 1, 2, 1, 3))[0]
    if op == "header_dict":
        descr, shape, fortran = repr(header["descr"]), repr(header["shape"]), repr(header["fortran_order"])
        how = rng.choice(("descr", "shape", "fortran", "keys", "raw"))
        extra = ""
        if how == "descr":
            descr = repr(rng.choice(_NPY_DESCRS)) if rng.random() < 0.8 else rng.choice(_NPY_DESCRS)
        elif how == "shape":
            shape = rng.choice(_NPY_SHAPES)
        elif how == "fortran":
            fortran = rng.choice(("True", "False", "1", "'yes'", "None"))
        elif how == "keys":
            extra = rng.choice((", 'extra': 1", ", 'descr': '<f8'", ""))
            if not extra:
                descr = None  # type: ignore[assignment]
        items = [f"'descr': {descr}"] if descr is not None else []
        items += [f"'fortran_order': {fortran}", f"'shape': {shape}"]
        new = "{" + ", ".join(items) + extra + ", }"
        if how == "raw":
            new = rng.choice(("{", "[1, 2, 3]", "{'descr': '<f4', 'fortran_order': False, 'shape': (" + "(" * 5000,
                              "__import__('os').system('touch " + PICKLE_MARKER + "')", "{'descr': '<f4'} extra",
                              "{" + "'a': 1, " * 1000 + "}", "\x00\x01\x02"))
        return f"header_dict.{how}", _npy_file(new, body, version=(major, minor)), f"header -> {new[:80]!r}"
    if op == "absurd_shape":
        shape = rng.choice(("(100000, 100000)", "(100000, 100000, 100000)", "(65536, 65536, 65536)",
                            "(1, 100000, 100000)", "(2**40, 1, 1)"))
        new = "{" + f"'descr': {header['descr']!r}, 'fortran_order': False, 'shape': {shape}, " + "}"
        return op, _npy_file(new, body, version=(major, minor)), f"shape claims {shape}"
    if op == "header_length":
        value = rng.choice((0, 1, 9, 65535, len(text) - 1, len(text) + 1, 2**31))
        prefix = data[:8]
        field = struct.pack("<H", value % 65536) if major == 1 else struct.pack("<I", value % 2**32)
        start = 10 if major == 1 else 12
        return op, prefix + field + data[start:], f"header length field -> {value}"
    if op == "magic_version":
        version = rng.choice(((0, 0), (1, 0), (2, 0), (3, 0), (9, 9), (255, 255)))
        how = rng.choice(("version", "magic"))
        if how == "version":
            return op, data[:6] + bytes(version) + data[8:], f"version bytes -> {version}"
        return op, b"\x93NUMPZ" + data[6:], "damaged magic"
    if op == "data_region":
        how = rng.choice(("truncate", "extend", "nan", "empty"))
        if how == "truncate":
            body = body[: rng.randrange(max(1, len(body)))]
        elif how == "extend":
            body = body + rng.randbytes(rng.choice((1, 7, 4096)))
        elif how == "empty":
            body = b""
        else:
            buf = bytearray(body)
            for _ in range(rng.choice((1, 4))):
                pos = rng.randrange(max(1, len(buf) - 8))
                buf[pos:pos + 8] = b"\xff" * 8
            body = bytes(buf)
        return f"data_region.{how}", data[:offset] + body, f"data region: {how}"
    if op == "not_an_array":
        how = rng.choice(("pickle", "npz", "empty", "text", "object_array"))
        if how == "pickle":
            out = pickle.dumps(_Unpickled(), protocol=4)
        elif how == "npz":
            buf = io.BytesIO()
            np.savez(buf, a=np.zeros((2, 3, 3), np.float32))
            out = buf.getvalue()
        elif how == "empty":
            out = b""
        elif how == "text":
            out = b"1,2,3\n4,5,6\n"
        else:  # an object array whose pickled payload would run code if loaded with pickle allowed
            text_o = "{'descr': '|O', 'fortran_order': False, 'shape': (1, 1, 1), }"
            out = _npy_file(text_o, pickle.dumps(np.array([_Unpickled()], dtype=object), protocol=4))
        return f"not_an_array.{how}", out, f"file is {how}, named .npy"
    name, out, description = _byte_op(rng, data, offset)
    return f"bytes.{name}", out, description


# ------------------------------------------------------------------------------------- cases
class CaseFactory:
    """Deterministic cases from a corpus: ``factory.make(format, index)``."""

    def __init__(self, corpus: dict[str, list[Seed]], *, seed: int = 0) -> None:
        missing = [f for f in FORMATS if not corpus.get(f)]
        if missing:
            raise ValueError(f"the corpus has no seeds for {missing}")
        self.corpus = corpus
        self.seed = seed
        self._extras: dict[str, bytes] | None = None

    def _dicom_extras(self) -> dict[str, bytes]:
        if self._extras is None:
            extras = {}
            cyclic = _cyclic_dicomdir()
            if cyclic is not None:
                extras["DICOMDIR"] = cyclic
            base = _package_dir("pydicom")
            rtplan = None if base is None else base / "data" / "test_files" / "rtplan.dcm"
            if rtplan is not None and rtplan.is_file():
                extras["rtplan"] = rtplan.read_bytes()
            self._extras = extras
        return self._extras

    def make(self, format: str, index: int) -> Case:
        """Case ``index`` of ``format``: index 0..n_seeds-1 are the seeds themselves, unchanged."""
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom/nibabel comment on the damage being made
            return self._make(format, index)

    def _make(self, format: str, index: int) -> Case:
        if format not in FORMATS:
            raise ValueError(f"unknown format {format!r}")
        seeds = self.corpus[format]
        if index < len(seeds):
            s = seeds[index]
            return Case(format, index, "seed", f"seed {s.name} unchanged", s.files, s.target)
        rng = random.Random(f"{self.seed}/{format}/{index}")
        s = rng.choice(seeds)
        try:
            mutation, files, description = self._mutate(rng, s)
        except Exception as exc:  # noqa: BLE001 - a structured edit pydicom/nibabel cannot express
            logger.debug("structured mutation of %s failed (%s); using a byte mutation", s.name, exc)
            name, data = s.files[0]
            op, out, description = _byte_op(rng, data, 1024)
            mutation, files = f"bytes.{op}", ((name,) + (out,),) + s.files[1:]
        return Case(format, index, f"{format}.{mutation}", f"{s.name}: {description}", tuple(files), s.target)

    def _mutate(self, rng: random.Random, s: Seed) -> tuple[str, tuple[tuple[str, Content], ...], str]:
        if s.format == "dicom" and len(s.files) > 1:
            mutation, files, description = _dicom_folder_mutation(rng, list(s.files), s.target, self._dicom_extras())
            return f"folder.{mutation}", tuple(files), description
        name, data = s.files[0]
        mutation, out, description = self._mutate_file(rng, s.format, name, data)
        if rng.random() < 0.2:  # a second, stacked mutation: damage rarely comes alone
            try:
                second, out, more = self._mutate_file(rng, s.format, name, out)
            except Exception as exc:  # noqa: BLE001 - the first mutation may leave nothing to edit
                logger.debug("stacked mutation skipped: %s", exc)
            else:
                mutation, description = f"{mutation}+{second}", f"{description}; then {more}"
        return mutation, ((name, out),), description

    @staticmethod
    def _mutate_file(rng: random.Random, format: str, name: str, data: bytes) -> tuple[str, bytes, str]:
        if format == "dicom":
            if rng.random() < 0.65:
                return _dicom_tag_mutation(rng, data)
            mutation, out, description = _byte_op(rng, data, _pixel_data_offset(data) or 2048)
            return f"bytes.{mutation}", out, description
        if format == "nifti":
            return _nifti_mutation(rng, name, data)
        return _npy_mutation(rng, data)

    def cases(self, format: str, n: int, *, start: int = 0) -> Iterator[Case]:
        for index in range(start, start + n):
            yield self.make(format, index)


def materialise(case: Case, root: Path) -> Path:
    """Write ``case``'s files under ``root`` (a fresh folder) and return the path to read."""
    root.mkdir(parents=True, exist_ok=True)
    for relative, content in case.files:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content[0] == "fifo" and hasattr(os, "mkfifo"):
            os.mkfifo(path)
        elif content[0] == "symlink":
            os.symlink(content[1], path)
    return root / case.target if case.target else root


# ------------------------------------------------------------------------------------- oracle
def check_volume(volume: Any, warned: Iterable[str], series: list | None, format: str) -> str | None:
    """What is wrong with a volume a reader returned (None when it honours the CTVolume contract)."""
    from napari_langmamba.io.volume import CTVolume

    if not isinstance(volume, CTVolume):
        return f"read_ct returned {type(volume).__name__}, not a CTVolume"
    hu = volume.hu
    if not isinstance(hu, np.ndarray) or hu.dtype != np.float32 or hu.ndim != 3 or min(hu.shape) < 1:
        return f"hu is {type(hu).__name__} {getattr(hu, 'dtype', '?')} of shape {getattr(hu, 'shape', '?')}"
    if not np.all(np.isfinite(hu)) and not any("NaN" in w for w in warned):
        return "hu holds NaN/inf values and no warning said so"
    spacing = np.asarray(volume.spacing, dtype=float)
    if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or not np.all(spacing > 0):
        return f"spacing {volume.spacing} is not three positive finite numbers"
    if not np.all(np.isfinite(np.asarray(volume.origin, dtype=float))):
        return f"origin {volume.origin} is not finite"
    direction = np.asarray(volume.direction, dtype=float)
    if direction.shape != (3, 3) or not np.all(np.isfinite(direction)):
        return "direction is not a finite 3 x 3 matrix"
    if not np.allclose(np.linalg.norm(direction, axis=1), 1.0, atol=1e-6) or abs(np.linalg.det(direction)) < 1e-6:
        return f"direction {direction.tolist()} has non-unit or parallel rows"
    try:
        json.dumps(volume.metadata, allow_nan=False)
    except (TypeError, ValueError) as exc:
        return f"metadata is not plain JSON: {exc}"
    if series is not None:
        shape = hu.shape
        if format == "dicom":
            ok = any(s.rows == shape[1] and s.columns == shape[2] and s.n_slices >= shape[0] for s in series)
        else:
            ok = len(series) == 1 and (series[0].n_slices, series[0].rows, series[0].columns) == shape
        if not ok:
            found = [(s.n_slices, s.rows, s.columns) for s in series]
            return f"volume shape {shape} disagrees with list_series {found}"
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and exc not in out and len(out) < 20:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _classify(exc: BaseException) -> tuple[str, str, str]:
    """``(outcome, error type, message)`` of an exception raised by a reader."""
    from napari_langmamba.errors import LangMambaError

    message = str(exc).strip()
    if any(isinstance(e, MemoryError) for e in _chain(exc)):
        return "memory", type(exc).__name__, message or "MemoryError"
    if isinstance(exc, LangMambaError) and message:
        return "clear_error", type(exc).__name__, message
    frames = traceback.extract_tb(exc.__traceback__)[-3:]
    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames))
    return "other_exception", type(exc).__name__, f"{message or '(no message)'} [at {where}]"


def run_reader(path: str | os.PathLike, format: str) -> dict[str, Any]:
    """Read ``path`` with ``read_ct`` and ``list_series`` (in this process) and classify the outcome."""
    import warnings

    from napari_langmamba.io import list_series, read_ct

    read: tuple[str, str, str] | None = None
    volume = series = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            volume = read_ct(path)
        except Exception as exc:  # noqa: BLE001 - classifying every exception is the point
            read = _classify(exc)
        try:
            series = list_series(path)
            listed = None
        except Exception as exc:  # noqa: BLE001
            listed = _classify(exc)
    warned = [str(w.message) for w in caught]
    outcome, error_type, message = read or ("loaded", "", "")
    if read is None:
        problem = check_volume(volume, warned, series, format)
        if problem is not None:
            outcome, error_type, message = "bad_volume", "", problem
    if listed is not None and listed[0] != "clear_error" and outcome in ACCEPTABLE:
        outcome, error_type, message = listed[0], listed[1], "list_series: " + listed[2]
    shape = list(volume.hu.shape) if volume is not None else None
    return {"outcome": outcome, "error_type": error_type, "message": message[:500], "shape": shape,
            "n_warnings": len(warned)}


# ------------------------------------------------------------------------------------ sandbox
@dataclass
class Result:
    """The outcome of one case."""

    case: str
    format: str
    mutation: str
    description: str
    outcome: str
    error_type: str = ""
    message: str = ""
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    rss_growth_mb: float = 0.0
    shape: list[int] | None = None  # of the volume read, when one was

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Sandbox:
    """Runs cases in a worker process with a time limit and memory limits.

    The worker (``python tests/fuzz_harness.py --worker``) imports the readers once, caps its
    address space at its idle size plus ``address_space_mb`` and reports its peak resident size
    after each case; a case that raises the peak more than ``memory_limit_mb`` above the idle
    size is a memory blow-up. A worker that times out, dies or blows up is replaced.
    """

    def __init__(self, *, timeout: float = DEFAULT_TIMEOUT_S, memory_limit_mb: float = DEFAULT_MEMORY_LIMIT_MB,
                 address_space_mb: float = DEFAULT_ADDRESS_SPACE_MB, workdir: str | os.PathLike | None = None) -> None:
        self.timeout = float(timeout)
        self.memory_limit_mb = float(memory_limit_mb)
        self.address_space_mb = float(address_space_mb)
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="langmamba-fuzz-")) if workdir is None else Path(workdir)
        self._cwd = self.workdir / "cwd"
        self._cwd.mkdir(parents=True, exist_ok=True)
        self._proc: subprocess.Popen | None = None
        self._buffer = b""
        self._baseline_mb = 0.0
        self.restarts = 0

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
        package_root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        log = open(self.workdir / "worker.log", "ab")  # noqa: SIM115 - handed to the child
        try:
            self._proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--worker",
                 "--address-space-mb", str(self.address_space_mb)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, cwd=self._cwd, env=env, bufsize=0,
            )
        finally:
            log.close()
        self._buffer = b""
        ready = self._receive(120.0)
        if ready is None or ready.get("op") != "ready":
            self._kill()
            raise RuntimeError(f"the fuzz worker did not start; see {self.workdir / 'worker.log'}")
        self._baseline_mb = float(ready["rss_mb"])

    def _kill(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            for stream in (self._proc.stdin, self._proc.stdout):
                if stream is not None:
                    stream.close()
        self._proc = None

    def _receive(self, timeout: float) -> dict | None:
        """The next JSON line from the worker, or None on timeout or EOF."""
        assert self._proc is not None and self._proc.stdout is not None
        deadline = time.monotonic() + timeout
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                # End of file: the worker is dying. Let it finish, so that the caller's poll()
                # tells a crash from a hang (a dying worker was once counted as a timeout).
                try:
                    self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def run(self, case: Case) -> Result:
        """Read ``case`` in the worker and classify the outcome."""
        result = Result(case.name, case.format, case.mutation, case.description, "crash")
        folder = self.workdir / "case"
        shutil.rmtree(folder, ignore_errors=True)
        target = materialise(case, folder)
        marker = self._cwd / PICKLE_MARKER
        marker.unlink(missing_ok=True)
        if self._proc is None or self._proc.poll() is not None:
            self._kill()
            self._start()
        assert self._proc is not None and self._proc.stdin is not None
        start = time.monotonic()
        try:
            self._proc.stdin.write((json.dumps({"path": str(target), "format": case.format}) + "\n").encode())
            answer = self._receive(self.timeout)
        except (BrokenPipeError, OSError):
            answer = None
        result.seconds = round(time.monotonic() - start, 4)
        if answer is None:
            alive = self._proc.poll() is None
            result.outcome = "timeout" if alive else "crash"
            result.message = (f"no answer within {self.timeout:g} s" if alive
                              else f"the worker died (exit code {self._proc.returncode})")
            self._kill()
            self.restarts += 1
        else:
            result.outcome = answer["outcome"]
            result.error_type = answer["error_type"]
            result.message = answer["message"]
            result.cpu_seconds = answer["cpu_seconds"]
            result.shape = answer["shape"]
            result.rss_growth_mb = round(answer["peak_rss_mb"] - self._baseline_mb, 1)
            if result.rss_growth_mb > self.memory_limit_mb:
                result.outcome = "memory"
                result.message = f"peak resident memory grew by {result.rss_growth_mb:.0f} MB ({result.message})"
                self._kill()  # the peak only ever rises: measure the next case in a fresh worker
                self.restarts += 1
        if marker.exists():
            result.outcome, result.message = "code_executed", "a planted pickle was unpickled"
            marker.unlink()
        shutil.rmtree(folder, ignore_errors=True)
        return result

    def close(self) -> None:
        if self._proc is not None and self._proc.stdin is not None:
            try:
                self._proc.stdin.close()
                self._proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self._kill()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def summarize(results: Iterable[Result], *, examples: int = 4) -> dict[str, Any]:
    """Counts per format and outcome, the mutations tried, and a few example messages per outcome."""
    results = list(results)
    table: dict[str, Any] = {}
    for format in FORMATS:
        mine = [r for r in results if r.format == format]
        if not mine:
            continue
        counts = Counter(r.outcome for r in mine)
        shown: dict[str, list[dict]] = {}
        for outcome in OUTCOMES:
            seen: set[str] = set()
            picked = []
            for r in mine:
                key = f"{r.error_type}:{r.message[:50]}"
                if r.outcome == outcome and key not in seen and len(picked) < examples:
                    seen.add(key)
                    picked.append({"case": r.case, "input": r.description[:160], "error": r.error_type,
                                   "message": r.message[:300]})
            if picked:
                shown[outcome] = picked
        table[format] = {
            "cases": len(mine),
            **{outcome: counts.get(outcome, 0) for outcome in OUTCOMES},
            "max_case_seconds": round(max(r.seconds for r in mine), 3),
            "max_cpu_seconds": round(max(r.cpu_seconds for r in mine), 3),
            "max_rss_growth_mb": round(max(r.rss_growth_mb for r in mine), 1),
            "mutations": dict(sorted(Counter(_family(r.mutation) for r in mine).items())),
            "examples": shown,
        }
    return table


def _family(mutation: str) -> str:
    """``"dicom.tag_value+bytes.truncate"`` -> ``"tag_value"``: the first operator, without format."""
    first = mutation.split("+")[0]
    return first.split(".")[1] if "." in first else first


def failures(results: Iterable[Result]) -> list[Result]:
    """The results that are not a loaded volume or a clear error."""
    return [r for r in results if r.outcome not in ACCEPTABLE]


# ------------------------------------------------------------------------------------- worker
def _status_mb(field: str) -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def _worker(address_space_mb: float) -> None:
    import resource

    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything a library prints goes to the log, not into the protocol
    sys.stdout = sys.stderr
    from pydicom.pixels import get_decoder  # noqa: F401

    import napari_langmamba.io.api  # noqa: F401 - imported before measuring the idle size
    import napari_langmamba.io.dicom  # noqa: F401
    import napari_langmamba.io.nifti  # noqa: F401

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    vm_mb = _status_mb("VmSize")
    if vm_mb > 0:
        limit = int((vm_mb + address_space_mb) * 2**20)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    protocol.write(json.dumps({"op": "ready", "rss_mb": _peak_rss_mb(), "vm_mb": vm_mb}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        before = resource.getrusage(resource.RUSAGE_SELF)
        answer = run_reader(request["path"], request["format"])
        after = resource.getrusage(resource.RUSAGE_SELF)
        answer["cpu_seconds"] = round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 4)
        answer["peak_rss_mb"] = _peak_rss_mb()
        answer["op"] = "result"
        protocol.write(json.dumps(answer) + "\n")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="napari-langmamba reader fuzz worker (internal)")
    parser.add_argument("--worker", action="store_true", required=True)
    parser.add_argument("--address-space-mb", type=float, default=DEFAULT_ADDRESS_SPACE_MB)
    _worker(parser.parse_args().address_space_mb)
