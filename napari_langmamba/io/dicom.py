"""DICOM series: find, group, order and decode CT slices; write derived series.

Reading happens in two passes: every file's header is read with ``stop_before_pixels`` to
group files by SeriesInstanceUID and order them by position along the slice normal; only the
chosen series' pixel data is then decoded (compressed syntaxes through pydicom's pixel
decoders, i.e. pylibjpeg/openjpeg). Axis conventions: see :mod:`napari_langmamba.io`.
"""

from __future__ import annotations

import copy
import datetime as _dt
import functools
import hashlib
import io
import logging
import math
import os
import uuid
import warnings
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from napari_langmamba import __version__
from napari_langmamba.errors import (
    CTReadError,
    CTWriteError,
    DependencyError,
    LangMambaError,
    SeriesChoiceError,
)
from napari_langmamba.events import Progress
from napari_langmamba.io._files import atomic_dir
from napari_langmamba.io.volume import CTVolume, SeriesInfo, to_jsonable, warn

logger = logging.getLogger(__name__)
T = TypeVar("T")

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
# A compressed frame this many times larger than its file, and above this size, is taken as
# a corrupt header rather than allocated (a 1-KB file claiming 65535 x 65535 pixels).
MAX_COMPRESSION_RATIO = 1000
MIN_SUSPICIOUS_BYTES = 64 * 2**20
# Geometry tolerances (mm or unit-vector components).
ORIENTATION_TOLERANCE = 1e-3
POSITION_TOLERANCE_MM = 0.01
SPACING_RELATIVE_TOLERANCE = 0.01

# DICOM fields kept in CTVolume.metadata (what a derived-series writer needs).
PATIENT_KEYWORDS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "PatientWeight",
    "PatientSize",
)
STUDY_KEYWORDS = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
)
SERIES_KEYWORDS = (
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDescription",
    "SeriesDate",
    "SeriesTime",
    "Modality",
    "BodyPartExamined",
    "PatientPosition",
    "ProtocolName",
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
)
EQUIPMENT_KEYWORDS = (
    "Manufacturer",
    "ManufacturerModelName",
    "InstitutionName",
    "StationName",
    "SoftwareVersions",
)
IMAGE_KEYWORDS = (
    "SOPClassUID",
    "ImageType",
    "SliceThickness",
    "KVP",
    "ConvolutionKernel",
    "AcquisitionDate",
    "AcquisitionTime",
    "RescaleType",
    "WindowCenter",
    "WindowWidth",
    "XRayTubeCurrent",
    "Exposure",
    "CTDIvol",
    "ContrastBolusAgent",
)
METADATA_KEYWORDS = PATIENT_KEYWORDS + STUDY_KEYWORDS + SERIES_KEYWORDS + EQUIPMENT_KEYWORDS + IMAGE_KEYWORDS

# Transfer syntaxes -> the packages that decode them (for the "install this" message).
_J2K_SYNTAXES = {
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.201",
    "1.2.840.10008.1.2.4.202",
    "1.2.840.10008.1.2.4.203",
}
_JPEG_SYNTAXES = {
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.81",
}
_JPEG_LS_SYNTAXES = {"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"}


# --------------------------------------------------------------------------------------
# Pass 1: headers
# --------------------------------------------------------------------------------------
@dataclass
class _Frame:
    """One 2-D image: a single-frame file or one frame of a multi-frame file."""

    path: str
    frame: int  # index within its file
    n_frames: int  # frames in its file
    header: Dataset
    rows: int
    columns: int
    position: np.ndarray | None  # ImagePositionPatient (3,)
    orientation: np.ndarray | None  # ImageOrientationPatient (6,)
    pixel_spacing: tuple[float, float] | None  # (row spacing dy, column spacing dx)
    slope: float | None
    intercept: float | None
    instance: int | None
    sop_uid: str
    pixel_offset: int | None = None  # where the header read stopped: the pixel data's tag (None: read it all again)


@dataclass
class _Scan:
    """What a folder scan found; ``source`` is the path (or paths) scanned, as given."""

    source: str | tuple[str, ...]
    frames: list[_Frame]
    n_files: int
    not_dicom: list[str]
    unreadable: list[str]
    no_image: list[str]
    reasons: dict[str, str] = field(default_factory=dict)  # why a file is unreadable, when known

    def impossible(self, file: str, exc: CTReadError) -> None:
        """``file``'s header cannot be true: unreadable, with the reason."""
        logger.debug("impossible DICOM header in %s: %s", file, exc)
        self.unreadable.append(file)
        self.reasons[file] = str(exc)


def looks_like_dicom(path: str | os.PathLike) -> bool:
    """Cheap test: the ``DICM`` magic at byte 128, or a DICOM file-name suffix."""
    path = Path(path)
    if not path.is_file():
        return False  # opening a named pipe or a device would block or never end
    if path.name.lower().endswith(DICOM_SUFFIXES):
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _drop_damaged_elements(ds: Dataset, path: str, depth: int = 0) -> None:
    """Decode every element now and drop those that cannot be decoded.

    pydicom decodes an element when it is first accessed, so a damaged one (an unknown VR, a
    value that does not fit its VR) would otherwise fail wherever the reader happens to look
    at it. Dropped here, it simply reads as absent. Sequence items are checked to the depth
    the reader looks into (enhanced multi-frame functional groups).
    """
    for tag in list(ds.keys()):
        try:
            element = ds[tag]
            if element.VR == "SQ" and depth < 4:
                for item in element.value:
                    _drop_damaged_elements(item, path, depth + 1)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types on damaged values
            logger.debug("dropped undecodable element %s of %s: %s", tag, path, exc)
            del ds[tag]


def _raised_in_pydicom(exc: BaseException) -> bool:
    """True when ``exc`` (or an exception it was raised from) comes out of pydicom's own code."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        tb = exc.__traceback__
        while tb is not None:
            module = tb.tb_frame.f_globals.get("__name__", "")
            if module == "pydicom" or module.startswith("pydicom."):
                return True
            tb = tb.tb_next
        exc = exc.__cause__ or exc.__context__
    return False


def _pydicom_failures_are_read_errors(func: Callable[..., Generator[Progress, None, T]]):
    """Decorate a reader generator: whatever pydicom raises while parsing becomes a :class:`CTReadError`.

    pydicom signals a damaged file with many exception classes (``InvalidDicomError``,
    ``ValueError``, ``KeyError``, ``NotImplementedError`` for an unknown VR, ``struct.error``,
    ``OverflowError`` ...) from wherever an element happens to be decoded lazily. Rather than
    guard every access, the public readers are wrapped: an exception that is not already the
    project's error and was raised inside pydicom is reported as an unreadable file, with its
    class and message kept for the log. Our own bugs (raised outside pydicom) stay visible.
    """

    @functools.wraps(func)
    def wrapper(path: Any, *args: Any, **kwargs: Any) -> Generator[Progress, None, T]:
        try:
            return (yield from func(path, *args, **kwargs))
        except (LangMambaError, GeneratorExit, KeyboardInterrupt, MemoryError):
            raise
        except Exception as exc:
            if not _raised_in_pydicom(exc):
                raise
            where = str(path) if isinstance(path, (str, os.PathLike)) else "the selected files"
            logger.debug("pydicom failed on %s", where, exc_info=True)
            raise CTReadError(
                f"{where} holds a damaged DICOM header that could not be parsed "
                f"({type(exc).__name__}: {exc}). Copy the file(s) again from the archive or re-export the series."
            ) from exc

    return wrapper


class _BoundedFile(io.BufferedReader):
    """A file that never hands pydicom a read larger than the bytes left in it.

    pydicom reads an element's value with ``fp.read(length)`` for whatever length the header
    gives, and ``read(n)`` reserves ``n`` bytes before reading: a damaged length field (3 GB in
    a 37 KB file, found by fuzzing) made a single header read allocate 3 GB. Reads are clamped
    to the file's end; a request for more than the whole file (beyond pydicom's delimiter search,
    which reads ahead in chunks of at most 8 KiB) is remembered, and :func:`_dcmread` refuses it.
    """

    READ_AHEAD = 2**16

    def __init__(self, path: str) -> None:
        super().__init__(io.FileIO(path, "rb"))
        self.size = os.fstat(self.fileno()).st_size
        self.impossible: tuple[int, int] | None = None  # (offset, length) of the first impossible read

    def read(self, size: int | None = -1) -> bytes:
        if size is not None and size >= 0:
            offset = self.tell()
            left = max(self.size - offset, 0)
            if size > left:
                if size > max(self.size, self.READ_AHEAD) and self.impossible is None:
                    self.impossible = (offset, size)
                size = left
        return super().read(size)


def _bounded_read(path: str, read: Callable[[_BoundedFile], T]) -> T:
    """``read(fp)`` on a :class:`_BoundedFile` of ``path``, refusing lengths the file cannot hold.

    Raises CTReadError when an element claims more bytes than the whole file has.
    """
    with _BoundedFile(path) as fp:
        result = read(fp)
        if fp.impossible is not None:
            offset, length = fp.impossible
            raise CTReadError(
                f"{Path(path).name} is corrupt: an element at byte {offset} claims {length} bytes "
                f"({length / 2**20:.0f} MB) but the whole file has {fp.size} bytes. Copy the file again "
                f"from the archive."
            )
    return result


def _dcmread(path: str, **kwargs: Any) -> Dataset:
    """``pydicom.dcmread(path, **kwargs)`` without reserving memory for lengths the file cannot hold."""
    return _bounded_read(path, lambda fp: pydicom.dcmread(fp, **kwargs))


def _read_header_at(path: str, *, force: bool = False) -> tuple[Dataset, int | None]:
    """The header of ``path`` (up to its pixel data) and the byte offset where the read stopped.

    The offset is None where it does not point into the file: a deflated data set is parsed from
    a decompressed copy.
    """

    def read(fp: _BoundedFile) -> tuple[Dataset, int | None]:
        ds = pydicom.dcmread(fp, stop_before_pixels=True, force=force)
        return ds, None if _transfer_syntax(ds) == DeflatedExplicitVRLittleEndian else fp.tell()

    return _bounded_read(path, read)


def _read_header(path: str) -> tuple[Dataset | None, int | None]:
    """The header of ``path`` (None if it is not DICOM) and where its pixel data start.

    Raises OSError/ValueError/CTReadError if corrupt.
    """
    try:
        ds, offset = _read_header_at(path)
    except InvalidDicomError:
        if not path.lower().endswith(DICOM_SUFFIXES):
            return None, None
        # Old files without the 128-byte preamble: accept only if they parse into an image header.
        try:
            ds, offset = _read_header_at(path, force=True)
        except Exception:  # noqa: BLE001 - anything pydicom raises on garbage means "not DICOM"
            return None, None
        _drop_damaged_all(ds, path)
        return (ds, offset) if "Rows" in ds and ("SOPClassUID" in ds or "Modality" in ds) else (None, None)
    _drop_damaged_all(ds, path)
    return ds, offset


def _drop_damaged_all(ds: Dataset, path: str) -> None:
    """:func:`_drop_damaged_elements` on the data set and on its file meta (group 2) too."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        _drop_damaged_elements(meta, path)
    _drop_damaged_elements(ds, path)


def _is_image_storage(ds: Dataset) -> bool:
    """True if the SOP class (or the file meta's) is an image storage class."""
    meta = getattr(ds, "file_meta", None)
    for uid in (ds.get("SOPClassUID"), meta.get("MediaStorageSOPClassUID") if meta is not None else None):
        if uid and "Image Storage" in UID(str(uid)).name:
            return True
    return False


def _floats(value: Any, n: int) -> np.ndarray | None:
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return out if out.shape == (n,) and np.all(np.isfinite(out)) else None


def _first_item(ds: Dataset, keyword: str) -> Dataset | None:
    seq = ds.get(keyword)
    return seq[0] if seq else None


def _group_item(ds: Dataset, frame: int, keyword: str) -> Dataset | None:
    """A functional-group macro of an enhanced multi-frame image: per-frame, else shared."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and frame < len(per_frame):
        item = _first_item(per_frame[frame], keyword)
        if item is not None:
            return item
    shared = ds.get("SharedFunctionalGroupsSequence")
    return _first_item(shared[0], keyword) if shared else None


def _optional_int(ds: Dataset | None, keyword: str) -> int | None:
    """An integer header value; None when absent, empty, multi-valued or not a whole number."""
    if ds is None or keyword not in ds or ds.get(keyword) in (None, ""):
        return None
    try:
        value = float(ds.get(keyword))
    except (TypeError, ValueError, OverflowError):
        return None
    return int(value) if math.isfinite(value) and value == int(value) else None


def _optional_float(ds: Dataset | None, keyword: str) -> float | None:
    if ds is None or keyword not in ds or ds.get(keyword) in (None, ""):
        return None
    try:
        value = float(ds.get(keyword))
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) else None


def _spacing_pair(value: Any) -> tuple[float, float] | None:
    pair = _floats(value, 2) if value is not None else None
    return None if pair is None else (float(pair[0]), float(pair[1]))


def _frames_of(path: str, ds: Dataset, pixel_offset: int | None = None) -> list[_Frame]:
    """The 2-D images of one file with their own geometry and rescale.

    Raises CTReadError when the header's frame count is not a positive number, or more frames
    than the file can hold (checked before one record per frame is made).
    """
    n_frames = 1 if ds.get("NumberOfFrames") in (None, "") else _optional_int(ds, "NumberOfFrames")
    rows, columns = _optional_int(ds, "Rows") or 0, _optional_int(ds, "Columns") or 0
    if n_frames is None or n_frames < 1:
        raise CTReadError(f"its NumberOfFrames {ds.get('NumberOfFrames')!r} is not a positive whole number")
    # A lying frame count is stopped here, before one record per frame is made: the pixel data
    # must fit in the file (compressed: an 8-byte item per frame, and the compression-ratio rule
    # of _check_file). A single frame is checked, with a more specific message, in _check_file.
    if n_frames > 1:
        size = os.path.getsize(path)
        bits = _optional_int(ds, "BitsAllocated") or 16
        samples = _optional_int(ds, "SamplesPerPixel") or 1
        frame_bits = rows * columns * max(samples, 1) * max(bits, 1)
        if _is_native(_transfer_syntax(ds)):
            fits = n_frames * frame_bits <= 8 * size
        else:
            limit = max(MIN_SUSPICIOUS_BYTES, MAX_COMPRESSION_RATIO * size)
            fits = n_frames * 8 <= size and n_frames * frame_bits <= 8 * limit
        if frame_bits == 0 or not fits:
            raise CTReadError(
                f"its header describes {n_frames} frame(s) of {rows} x {columns} pixels, "
                + ("which are empty" if frame_bits == 0 else f"more than its {size} bytes can hold")
                + ": the header is corrupt"
            )
    common = {
        "path": path,
        "n_frames": n_frames,
        "header": ds,
        "rows": rows,
        "columns": columns,
        "instance": _optional_int(ds, "InstanceNumber"),
        "sop_uid": str(ds.get("SOPInstanceUID", "") or ""),
        "pixel_offset": pixel_offset,
    }
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        # Enhanced multi-frame: geometry and rescale live in per-frame or shared functional groups.
        frames = []
        for f in range(n_frames):
            plane = _group_item(ds, f, "PlanePositionSequence")
            orient = _group_item(ds, f, "PlaneOrientationSequence")
            measures = _group_item(ds, f, "PixelMeasuresSequence")
            rescale = _group_item(ds, f, "PixelValueTransformationSequence") or ds
            frames.append(
                _Frame(
                    frame=f,
                    position=None if plane is None else _floats(plane.get("ImagePositionPatient"), 3),
                    orientation=None if orient is None else _floats(orient.get("ImageOrientationPatient"), 6),
                    pixel_spacing=None if measures is None else _spacing_pair(measures.get("PixelSpacing")),
                    slope=_optional_float(rescale, "RescaleSlope"),
                    intercept=_optional_float(rescale, "RescaleIntercept"),
                    **common,
                )
            )
        return frames
    position = _floats(ds.get("ImagePositionPatient"), 3) if "ImagePositionPatient" in ds else None
    orientation = _floats(ds.get("ImageOrientationPatient"), 6) if "ImageOrientationPatient" in ds else None
    step = _optional_float(ds, "SpacingBetweenSlices") or _optional_float(ds, "SliceThickness") or 1.0
    frames = []
    for f in range(n_frames):
        frame_position = position
        if position is not None and orientation is not None and n_frames > 1:
            # A legacy multi-frame image without per-frame positions: frames are stacked
            # along the normal at SpacingBetweenSlices (the best the header offers).
            frame_position = position + f * step * np.cross(orientation[:3], orientation[3:])
        frames.append(
            _Frame(
                frame=f,
                position=frame_position,
                orientation=orientation,
                pixel_spacing=_spacing_pair(ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")),
                slope=_optional_float(ds, "RescaleSlope"),
                intercept=_optional_float(ds, "RescaleIntercept"),
                **common,
            )
        )
    return frames


def _candidate_files(path: Path) -> list[str]:
    if path.is_file():
        return [str(path)]
    files = []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        # Regular files only: reading a named pipe blocks and a device (a link to /dev/zero) never ends.
        files.extend(p for p in (os.path.join(root, n) for n in sorted(names)) if os.path.isfile(p))
    return files


def _check_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise CTReadError(f"{path} does not exist; check the path (and that the drive is mounted).")
    if not os.access(path, os.R_OK) or (path.is_dir() and not os.access(path, os.X_OK)):
        raise CTReadError(f"{path} cannot be read: permission denied. Ask for read access or copy it elsewhere.")
    if not path.is_dir() and not path.is_file():
        raise CTReadError(f"{path} is not a regular file (a pipe, socket or device); choose a DICOM file or folder.")
    return path


def _source_of(path: str | os.PathLike | Sequence[str | os.PathLike]) -> str | tuple[str, ...]:
    """The path (or paths) as given, in a form to compare: which scan belongs to which read."""
    if isinstance(path, (str, os.PathLike)):
        return os.fspath(path)
    return tuple(os.fspath(p) for p in path)


def iter_scan(path: str | os.PathLike | Sequence[str | os.PathLike]) -> Generator[Progress, None, _Scan]:
    """Read the headers of every file in a folder (recursively), a file, or a list of files."""
    if isinstance(path, (str, os.PathLike)):
        root = _check_path(path)
        files = _candidate_files(root)
        where = str(root)
    else:
        files = [str(_check_path(p)) for p in path]
        where = f"{len(files)} selected files"
    if not files:
        raise CTReadError(f"The folder {where} is empty: there are no DICOM files to read.")
    scan = _Scan(source=_source_of(path), frames=[], n_files=len(files), not_dicom=[], unreadable=[], no_image=[])
    for n, file in enumerate(files, start=1):
        try:
            ds, pixel_offset = _read_header(file)
        except CTReadError as exc:  # a header that cannot be true
            scan.impossible(file, exc)
            ds = None
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt files
            logger.debug("unreadable DICOM header in %s: %s", file, exc)
            scan.unreadable.append(file)
            ds = None
        else:
            if ds is None:
                scan.not_dicom.append(file)
            elif "Rows" not in ds or "Columns" not in ds:
                if _is_image_storage(ds):
                    scan.unreadable.append(file)  # an image whose header stops short: truncated
                else:
                    scan.no_image.append(file)  # DICOMDIR, structured reports, RT plans ...
            else:
                try:
                    scan.frames.extend(_frames_of(file, ds, pixel_offset))
                except CTReadError as exc:
                    scan.impossible(file, exc)
        if n % 16 == 0 or n == len(files):
            yield Progress(n, len(files), f"Reading DICOM headers ({n} of {len(files)} files)")
    return scan


def _report_skipped(scan: _Scan, where: str) -> None:
    if scan.not_dicom:
        examples = ", ".join(Path(f).name for f in scan.not_dicom[:3])
        warn(f"Skipped {len(scan.not_dicom)} non-DICOM file(s) in {where} (e.g. {examples}).")
    if scan.no_image:
        warn(f"Skipped {len(scan.no_image)} DICOM file(s) without an image (e.g. DICOMDIR, reports) in {where}.")
    if scan.unreadable:
        examples = ", ".join(Path(f).name for f in scan.unreadable[:3])
        warn(
            f"Skipped {len(scan.unreadable)} DICOM file(s) that could not be read (corrupt or truncated), "
            f"e.g. {examples}; the series may have gaps."
        )


def _no_images_error(scan: _Scan, where: str) -> CTReadError:
    if scan.n_files == 1:
        name = Path(where).name
        if scan.unreadable:
            reason = scan.reasons.get(scan.unreadable[0])
            return CTReadError(
                f"{name} is a corrupt or truncated DICOM file{f' ({reason})' if reason else ''}; copy it again "
                f"from the archive."
            )
        if scan.no_image:
            return CTReadError(f"{name} is a DICOM file without an image (e.g. a DICOMDIR or a report).")
        return CTReadError(
            f"{name} is not a DICOM file; expected a DICOM file or folder, a NIfTI file or a .npy array."
        )
    parts = [f"No DICOM images were found in {where}"]
    details = []
    if scan.not_dicom:
        details.append(f"{len(scan.not_dicom)} non-DICOM file(s)")
    if scan.no_image:
        details.append(f"{len(scan.no_image)} DICOM file(s) without an image")
    if scan.unreadable:
        first = scan.unreadable[0]
        reason = f", e.g. {Path(first).name}: {scan.reasons[first]}" if first in scan.reasons else ""
        details.append(f"{len(scan.unreadable)} corrupt or truncated DICOM file(s){reason}")
    if details:
        parts.append(f" (it holds {', '.join(details)})")
    parts.append(". Choose the folder that holds the CT slices, or a NIfTI/.npy file.")
    return CTReadError("".join(parts))


# --------------------------------------------------------------------------------------
# Grouping and geometry
# --------------------------------------------------------------------------------------
def _series_key(frame: _Frame) -> str:
    uid = str(frame.header.get("SeriesInstanceUID", "") or "").strip()
    if uid:
        return uid
    # Anonymised files may lack the UID: group by what else identifies a series.
    ds = frame.header
    parts = (
        str(ds.get("StudyInstanceUID", "") or ""),
        str(ds.get("SeriesNumber", "") or ""),
        str(ds.get("SeriesDescription", "") or ""),
        str(ds.get("FrameOfReferenceUID", "") or ""),
        str(ds.get("Modality", "") or ""),
    )
    return "nouid-" + hashlib.sha1("\\".join(parts).encode()).hexdigest()[:12]


def _group(frames: Iterable[_Frame]) -> list[tuple[str, list[_Frame]]]:
    groups: dict[str, list[_Frame]] = {}
    for frame in frames:
        groups.setdefault(_series_key(frame), []).append(frame)

    def sort_key(item: tuple[str, list[_Frame]]) -> tuple:
        header = item[1][0].header
        number = header.get("SeriesNumber")
        try:
            number = int(number)
        except (TypeError, ValueError):
            number = 1 << 30
        return (number, str(header.get("SeriesDescription", "") or ""), item[0])

    return sorted(groups.items(), key=sort_key)


@dataclass
class _Geometry:
    order: list[int]  # indices into the series' frames, ascending along the normal
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray
    positions: np.ndarray  # (z, 3) LPS positions in order, NaN when unknown
    problems: list[str]  # recoverable oddities, as warning messages


def _orientation(frames: list[_Frame], description: str) -> np.ndarray | None:
    known = [f.orientation for f in frames if f.orientation is not None]
    if not known:
        return None
    reference = known[0]
    distinct = [reference]
    for o in known[1:]:
        if not any(np.allclose(o, d, atol=ORIENTATION_TOLERANCE) for d in distinct):
            distinct.append(o)
    if len(distinct) > 1:
        shown = "; ".join("[" + ", ".join(f"{v:.3g}" for v in d) + "]" for d in distinct[:3])
        raise CTReadError(
            f"The slices of series {description!r} have {len(distinct)} different orientations "
            f"(ImageOrientationPatient {shown}), so they do not form one volume. The series may mix "
            f"axial slices with a localizer or a reformat: export one orientation only."
        )
    return reference


def _direction(frames: list[_Frame], description: str, problems: list[str]) -> np.ndarray:
    """The 3 x 3 direction (rows: slice normal, column, row direction) from ImageOrientationPatient."""
    iop = _orientation(frames, description)
    if iop is None:
        problems.append(
            f"Series {description!r} has no ImageOrientationPatient; assuming axial slices."
        )
        row, col = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    else:
        row, col = iop[:3], iop[3:]
        if np.linalg.norm(row) < 1e-6 or np.linalg.norm(col) < 1e-6:
            raise CTReadError(
                f"Series {description!r} has an invalid ImageOrientationPatient {iop.tolist()}: a zero "
                f"direction vector. The header is damaged."
            )
        row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = np.cross(row, col)
    norm = np.linalg.norm(normal)
    if norm < 1e-6:
        raise CTReadError(
            f"Series {description!r} has parallel row and column directions in ImageOrientationPatient; "
            f"the header is damaged."
        )
    normal /= norm
    return np.stack([normal, col, row])  # rows: z, y, x


def _pixel_spacing(frames: list[_Frame], description: str, problems: list[str]) -> tuple[float, float]:
    """``(dy, dx)`` in mm: the first slice's PixelSpacing (1 mm, with a problem, when unusable)."""
    spacings = {f.pixel_spacing for f in frames if f.pixel_spacing is not None}
    if not spacings:
        problems.append(f"Series {description!r} has no PixelSpacing; assuming 1 mm pixels.")
        return 1.0, 1.0
    dy, dx = frames[0].pixel_spacing or sorted(spacings)[0]
    if len(spacings) > 1:
        problems.append(
            f"Series {description!r} has slices with different PixelSpacing {sorted(spacings)}; "
            f"using {dy:g} x {dx:g} mm."
        )
    if dy <= 0 or dx <= 0:
        problems.append(f"Series {description!r} has a non-positive PixelSpacing; assuming 1 mm pixels.")
        return 1.0, 1.0
    return dy, dx


def _slice_spacing(
    along: np.ndarray, positions: np.ndarray, normal: np.ndarray, header: Dataset, description: str,
    problems: list[str],
) -> float:
    """The median distance between consecutive slices (at least two, ordered, without duplicates).

    Gaps, uneven spacing and a gantry tilt (positions drifting within the slice plane: a
    sheared volume) are recoverable problems.
    """
    diffs = np.diff(along)
    dz = float(np.median(diffs))
    tolerance = max(POSITION_TOLERANCE_MM, SPACING_RELATIVE_TOLERANCE * dz)
    gaps = diffs > 1.5 * dz
    if np.any(gaps):
        missing = int(sum(round(d / dz) - 1 for d in diffs[gaps]))
        where = ", ".join(f"{along[k]:.1f}..{along[k + 1]:.1f} mm" for k in np.flatnonzero(gaps)[:3])
        problems.append(
            f"Series {description!r} seems to miss about {missing} slice(s) (gaps at {where}); the "
            f"volume is built from the slices present with a spacing of {dz:g} mm, so distances "
            f"across the gap are wrong."
        )
    uneven = np.abs(diffs - dz) > tolerance
    if np.any(uneven & ~gaps):
        problems.append(
            f"Series {description!r} has uneven slice spacing (from {diffs.min():.3g} to "
            f"{diffs.max():.3g} mm); using the median, {dz:.4g} mm."
        )
    steps = np.diff(positions, axis=0)
    in_plane = steps - np.outer(steps @ normal, normal)
    shear = np.linalg.norm(in_plane, axis=1)
    if np.any(shear > POSITION_TOLERANCE_MM + 1e-3 * np.linalg.norm(steps, axis=1)):
        tilt = _optional_float(header, "GantryDetectorTilt")
        angle = float(np.degrees(np.arctan2(np.median(shear), dz)))
        problems.append(
            f"Series {description!r} was acquired with a gantry tilt (about {angle:.1f} degrees"
            + (f", header says {tilt:g}" if tilt else "")
            + "): slices are shifted in-plane, so the volume shown is sheared. Distances within a "
            "slice are right; across slices they are approximate."
        )
    return dz


def _geometry(frames: list[_Frame], description: str) -> _Geometry:
    problems: list[str] = []
    first = frames[0]
    direction = _direction(frames, description, problems)
    normal = direction[0]
    dy, dx = _pixel_spacing(frames, description, problems)

    thickness = _optional_float(first.header, "SliceThickness")
    fallback_dz = _optional_float(first.header, "SpacingBetweenSlices") or thickness or 1.0
    have_positions = all(f.position is not None for f in frames)
    if not have_positions:
        if len(frames) > 1:
            problems.append(
                f"Series {description!r} lacks ImagePositionPatient on some slices; ordering by "
                f"InstanceNumber and using a slice spacing of {fallback_dz:g} mm from the header."
            )
        order = sorted(range(len(frames)), key=lambda i: (frames[i].instance or 0, frames[i].path, frames[i].frame))
        origin = frames[order[0]].position if frames[order[0]].position is not None else np.zeros(3)
        positions = np.full((len(frames), 3), np.nan)
        return _Geometry(order, (abs(fallback_dz), dy, dx), tuple(origin), direction, positions, problems)

    along = np.array([float(np.dot(f.position, normal)) for f in frames])
    order = sorted(range(len(frames)), key=lambda i: (along[i], frames[i].instance or 0))
    along = along[order]
    positions = np.stack([frames[i].position for i in order])
    diffs = np.diff(along)
    duplicates = int(np.sum(diffs < POSITION_TOLERANCE_MM))
    if duplicates:
        keep = [0] + [k + 1 for k, d in enumerate(diffs) if d >= POSITION_TOLERANCE_MM]
        problems.append(
            f"Series {description!r} has {duplicates} slice(s) at the same position as another "
            f"(several acquisitions or phases in one series?); kept the first at each position."
        )
        order = [order[k] for k in keep]
        along, positions = along[keep], positions[keep]
    if len(order) > 1:
        dz = _slice_spacing(along, positions, normal, first.header, description, problems)
    else:
        dz = abs(fallback_dz)
    return _Geometry(order, (dz, dy, dx), tuple(positions[0]), direction, positions, problems)


def _description(header: Dataset) -> str:
    return str(header.get("SeriesDescription", "") or "").strip()


def _series_info(uid: str, frames: list[_Frame], scan: _Scan) -> SeriesInfo:
    header = frames[0].header
    description = _description(header)
    try:
        spacing: tuple[float, float, float] | None = _geometry(frames, description).spacing
    except CTReadError:
        spacing = None
    files = tuple(dict.fromkeys(f.path for f in frames))
    return SeriesInfo(
        uid=uid,
        description=description,
        modality=str(header.get("Modality", "") or ""),
        n_slices=len(frames),
        rows=frames[0].rows,
        columns=frames[0].columns,
        spacing=spacing,
        files=files,
        scan=scan,
    )


@_pydicom_failures_are_read_errors
def iter_list_dicom_series(path: str | os.PathLike | Sequence) -> Generator[Progress, None, list[SeriesInfo]]:
    """The image series at ``path``, yielding progress while headers are read.

    Each :class:`SeriesInfo` keeps the headers read here, so ``iter_read_dicom(path, series=info)``
    decodes the pixels without parsing a header again.
    """
    scan = yield from iter_scan(path)
    if not scan.frames:
        raise _no_images_error(scan, str(path))
    return [_series_info(uid, frames, scan) for uid, frames in _group(scan.frames)]


def _choose(scan: _Scan, series: str | int | None, where: str) -> tuple[str, list[_Frame]]:
    groups = _group(scan.frames)
    infos = [_series_info(uid, frames, scan) for uid, frames in groups]
    listing = "\n".join(f"  [{i}] {info.summary()}  (UID {info.uid})" for i, info in enumerate(infos))
    if series is None:
        if len(groups) == 1:
            return groups[0]
        raise SeriesChoiceError(
            f"{where} holds {len(groups)} image series; choose one by its number or UID:\n{listing}",
            series=infos,
        )
    if isinstance(series, (int, np.integer)) and not isinstance(series, bool):
        if 0 <= int(series) < len(groups):
            return groups[int(series)]
        raise SeriesChoiceError(
            f"There is no series number {series} in {where}; it holds {len(groups)}:\n{listing}", series=infos
        )
    wanted = str(series).strip()
    for uid, frames in groups:
        if uid == wanted:
            return uid, frames
    raise SeriesChoiceError(f"No series with UID {wanted!r} in {where}; it holds:\n{listing}", series=infos)


# --------------------------------------------------------------------------------------
# Pass 2: pixels
# --------------------------------------------------------------------------------------
def _transfer_syntax(header: Dataset) -> UID:
    meta = getattr(header, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    return UID(str(uid)) if uid else ExplicitVRLittleEndian


def _packages_for(syntax: UID) -> str:
    """Which package decodes ``syntax``: the declared ones (pyproject.toml) first, then opt-in ones."""
    reinstall = "declared dependencies of napari-langmamba (pip install --force-reinstall napari-langmamba)"
    if syntax in _J2K_SYNTAXES:
        return f"python-gdcm or pylibjpeg-openjpeg, {reinstall}"
    if syntax in _JPEG_LS_SYNTAXES:
        return f"pyjpegls or python-gdcm, {reinstall}"
    if syntax in _JPEG_SYNTAXES:
        return (
            f"python-gdcm, a {reinstall[:-1]}; 12-bit JPEG Extended (process 4) is decoded only by "
            "pylibjpeg-libjpeg (GPL-3, hence not bundled: pip install pylibjpeg-libjpeg)"
        )
    return f"python-gdcm or pylibjpeg with its plugins, {reinstall}"


# Decoders tried first, per syntax: those that fail cleanly on corrupt data (fuzzing showed GDCM
# aborting the process or hanging on damaged JPEG 2000 and JPEG-LS streams that openjpeg and
# pyjpegls/CharLS simply refuse). GDCM stays the decoder of JPEG Lossless, which nothing else
# permissive decodes, and the fallback for every syntax whose preferred plugin is not installed.
_PREFERRED_PLUGINS = (("pylibjpeg", _J2K_SYNTAXES), ("pydicom", {"1.2.840.10008.1.2.5"}),
                      ("pillow", {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"}),
                      ("pyjpegls", _JPEG_LS_SYNTAXES))


def _preferred_plugin(syntax: UID) -> str:
    """The decoder plugin to use for ``syntax`` when it is available, else "" (pydicom's choice)."""
    from pydicom.pixels import get_decoder

    for plugin, syntaxes in _PREFERRED_PLUGINS:
        if syntax in syntaxes:
            try:
                available = get_decoder(syntax).available_plugins
            except NotImplementedError:
                return ""
            return plugin if plugin in available else ""
    return ""


def _is_native(syntax: UID) -> bool:
    """True for uncompressed pixel data (its size is known); False for compressed, deflated or unknown."""
    if not syntax.is_transfer_syntax:  # a damaged or private UID: nothing can be assumed
        return False
    return not (syntax.is_compressed or syntax.is_deflated)


def _check_decoders(syntaxes: Iterable[UID]) -> None:
    """Fail before decoding anything when a transfer syntax has no working decoder."""
    from pydicom.pixels import get_decoder

    for syntax in syntaxes:
        if not syntax.is_transfer_syntax:
            raise CTReadError(
                f"The file meta header gives the transfer syntax {str(syntax)!r}, which is not a DICOM transfer "
                f"syntax; the header is damaged or the file uses a private encoding. Re-export the series."
            )
        try:
            decoder = get_decoder(syntax)
        except NotImplementedError:
            raise CTReadError(
                f"The pixel data is stored as {syntax.name} ({syntax}), which cannot be decoded. "
                f"Re-export the series uncompressed or as JPEG 2000."
            ) from None
        if not decoder.is_available:
            missing = "; ".join(decoder.missing_dependencies) or "no decoder plugin is installed"
            raise DependencyError(
                f"The pixel data is compressed as {syntax.name}; decoding it needs {_packages_for(syntax)}, "
                f"which is not installed ({missing}). Install it and open the series again."
            )


def _expected_bytes_of(header: Dataset, rows: int, columns: int, n_frames: int) -> int:
    bits = _optional_int(header, "BitsAllocated") or 16
    samples = _optional_int(header, "SamplesPerPixel") or 1
    return rows * columns * n_frames * max(samples, 1) * max(bits, 1) // 8


def _expected_bytes(frame: _Frame) -> int:
    return _expected_bytes_of(frame.header, frame.rows, frame.columns, frame.n_frames)


def _check_file(frame: _Frame) -> None:
    """Refuse, before any allocation, images that are not CT-like or whose header cannot be true."""
    path = frame.path
    header = frame.header
    name = Path(path).name
    if (_optional_int(header, "SamplesPerPixel") or 1) != 1:
        raise CTReadError(f"{name} is a colour image ({header.get('SamplesPerPixel')} samples per pixel), not CT.")
    photometric = str(header.get("PhotometricInterpretation", "") or "MONOCHROME2").strip().upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        # CT is greyscale; a colour interpretation on one sample per pixel is a damaged header, and
        # decoders (GDCM) may abort or hang on it rather than fail.
        raise CTReadError(f"{name} is not a greyscale image (PhotometricInterpretation {photometric}), not CT.")
    if frame.rows <= 0 or frame.columns <= 0:
        raise CTReadError(f"{name} has an empty image ({frame.rows} x {frame.columns} pixels); the header is damaged.")
    expected = _expected_bytes(frame)
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise CTReadError(f"{name} cannot be read: {exc}.") from exc
    syntax = _transfer_syntax(header)
    packed = not _is_native(syntax)  # the file may be far smaller than its pixels
    if not packed and size < expected:
        raise CTReadError(
            f"{name} is truncated: its header describes {frame.n_frames} frame(s) of {frame.rows} x "
            f"{frame.columns} pixels ({expected} bytes) but the file has only {size} bytes. Copy the file "
            f"again from the archive."
        )
    if packed and expected > max(MIN_SUSPICIOUS_BYTES, MAX_COMPRESSION_RATIO * size):
        raise CTReadError(
            f"{name} claims {frame.n_frames} frame(s) of {frame.rows} x {frame.columns} pixels "
            f"({expected / 2**20:.0f} MB) in a {size / 2**10:.0f} KB file; the header is corrupt."
        )


def _with_pixel_data(frame: _Frame) -> Dataset:
    """The file of ``frame`` with its pixel data: the scanned header plus what follows it.

    Only the elements from the pixel data on are parsed (the header read by the scan is not
    parsed again); a file whose header gave no position or transfer syntax is read whole.
    """
    header = frame.header
    meta = getattr(header, "file_meta", None)
    if frame.pixel_offset is None or meta is None or "TransferSyntaxUID" not in meta:
        return _dcmread(frame.path)
    implicit, little = header.original_encoding

    def read(fp: _BoundedFile) -> Dataset:
        fp.seek(frame.pixel_offset)
        return read_dataset(fp, is_implicit_VR=implicit, is_little_endian=little)

    rest = _bounded_read(frame.path, read)
    ds = Dataset(dict(header.items()))  # a new element dict: the scan's header stays without pixels
    ds.file_meta = meta
    ds.set_original_encoding(implicit, little)
    ds.update(rest)
    return ds


def _decode_file(frame: _Frame) -> np.ndarray:
    """All frames of ``frame.path`` as stored values, shape ``(frames, rows, columns)``."""
    path = frame.path
    name = Path(path).name
    syntax = _transfer_syntax(frame.header)
    expected = _expected_bytes(frame)
    truncated = CTReadError(f"{name} is truncated or corrupt: its pixel data ends early. Copy it again from the archive.")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = _with_pixel_data(frame)
    except CTReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - corrupt files raise many types
        raise CTReadError(f"{name} is corrupt and could not be read ({exc}).") from exc
    if any("End of file" in str(w.message) for w in caught):
        raise truncated
    if "PixelData" not in ds:
        raise CTReadError(f"{name} has no pixel data; it is not an image or it is truncated.")
    try:
        plugin = _preferred_plugin(syntax)
        if plugin:
            ds.pixel_array_options(decoding_plugin=plugin)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pixels = ds.pixel_array
        for w in caught:  # pydicom's own notes (e.g. J2K sign corrections) go to the log
            logger.debug("pydicom, decoding %s: %s", name, w.message)
    except RuntimeError as exc:
        if "missing dependencies" in str(exc) or "plugins" in str(exc):
            raise DependencyError(
                f"Cannot decode {name} ({syntax.name}): {_packages_for(syntax)} is needed ({exc})."
            ) from exc
        raise CTReadError(f"The pixel data of {name} could not be decoded ({exc}); the file may be corrupt.") from exc
    except NotImplementedError as exc:
        raise CTReadError(f"{name} uses {syntax.name}, which cannot be decoded ({exc}).") from exc
    except MemoryError as exc:
        raise CTReadError(f"Not enough memory to decode {name} ({expected / 2**20:.0f} MB).") from exc
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt streams raise ValueError, OSError, ...
        raise CTReadError(
            f"The pixel data of {name} could not be decoded ({exc}); the file may be corrupt or truncated."
        ) from exc
    except BaseException as exc:
        # A decoder plugin written in Rust (pyo3) reports a panic on a corrupt stream as PanicException,
        # which is not an Exception: still a damaged file, not a reason to end the program.
        if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        raise CTReadError(
            f"The pixel data of {name} could not be decoded (the {syntax.name} decoder failed: "
            f"{type(exc).__name__}); the file is corrupt."
        ) from exc
    pixels = np.asarray(pixels)
    if pixels.ndim == 2:
        pixels = pixels[None]
    if pixels.shape != (frame.n_frames, frame.rows, frame.columns):
        raise CTReadError(
            f"{name} decoded to an array of shape {pixels.shape}, not the {frame.n_frames} x {frame.rows} x "
            f"{frame.columns} its header promises; the file is corrupt."
        )
    return pixels


def _metadata(frames: list[_Frame], geometry: _Geometry) -> dict[str, Any]:
    header = frames[geometry.order[0]].header
    out: dict[str, Any] = {}
    for keyword in METADATA_KEYWORDS:
        if keyword in header:
            value = to_jsonable(header.get(keyword))
            if value is not None:
                out[keyword] = value
    out["source_format"] = "dicom"
    out["TransferSyntaxUID"] = str(_transfer_syntax(header))
    ordered = [frames[i] for i in geometry.order]
    uids = [f.sop_uid for f in ordered]
    if all(uids) and all(f.n_frames == 1 for f in ordered):
        out["source_sop_instance_uids"] = uids
    out["slice_positions_lps"] = [
        None if np.any(np.isnan(p)) else [float(v) for v in p] for p in geometry.positions
    ]
    return out

@_pydicom_failures_are_read_errors
def iter_read_dicom(
    path: str | os.PathLike | Sequence, *, series: str | int | SeriesInfo | None = None
) -> Generator[Progress, None, CTVolume]:
    """Read one DICOM series (a folder, a file, or a list of files) as a :class:`CTVolume`.

    Yields :class:`Progress` while headers are read and per slice decoded. ``series`` is an index
    into :func:`iter_list_dicom_series` order, a UID, or one of its :class:`SeriesInfo`: then the
    headers that listing read are used, not read again. Raises :class:`SeriesChoiceError` when
    several series are found and ``series`` is None; :class:`DependencyError` when the pixel
    decoder is missing; :class:`CTReadError` for anything else unreadable.
    """
    where = str(path) if isinstance(path, (str, os.PathLike)) else f"the {len(path)} selected files"
    scan = getattr(series, "scan", None)
    if not isinstance(scan, _Scan) or scan.source != _source_of(path):
        scan = yield from iter_scan(path)
    if isinstance(series, SeriesInfo):
        series = series.uid
    if not scan.frames:
        raise _no_images_error(scan, where)
    _report_skipped(scan, where)
    uid, frames = _choose(scan, series, where)
    header = frames[0].header
    description = _description(header) or Path(frames[0].path).parent.name

    sizes = {(f.rows, f.columns) for f in frames}
    if len(sizes) > 1:
        raise CTReadError(
            f"The slices of series {description!r} have different matrix sizes ({sorted(sizes)}); they do "
            f"not form one volume. Export the series again or choose one of its parts."
        )
    geometry = _geometry(frames, description)
    for message in geometry.problems:
        warn(message)
    modality = str(header.get("Modality", "") or "")
    if modality != "CT":
        warn(
            f"Series {description!r} has modality {modality or 'unknown'}, not CT: its values are shown "
            f"as if they were Hounsfield units, which they may not be."
        )
    ordered = [frames[i] for i in geometry.order]
    no_rescale = sum(1 for f in ordered if f.slope is None or f.intercept is None)
    if no_rescale:
        warn(
            f"{no_rescale} of {len(ordered)} slice(s) of series {description!r} have no RescaleSlope/"
            f"RescaleIntercept; assuming slope 1 and intercept 0 (stored values taken as HU). Check that "
            f"air reads about -1000 HU."
        )
    _check_decoders({_transfer_syntax(f.header) for f in ordered})
    for frame in {f.path: f for f in ordered}.values():
        _check_file(frame)

    n, rows, columns = len(ordered), ordered[0].rows, ordered[0].columns
    try:
        hu = np.empty((n, rows, columns), dtype=np.float32)
    except (MemoryError, ValueError) as exc:
        raise CTReadError(
            f"Series {description!r} needs {n * rows * columns * 4 / 2**30:.1f} GB of memory, which is not "
            f"available."
        ) from exc
    cache: dict[str, np.ndarray] = {}  # multi-frame files are decoded once
    for k, frame in enumerate(ordered):
        pixels = cache.get(frame.path)
        if pixels is None:
            pixels = _decode_file(frame)
            if frame.n_frames > 1:
                cache[frame.path] = pixels
        slope = 1.0 if frame.slope is None else frame.slope
        intercept = 0.0 if frame.intercept is None else frame.intercept
        with np.errstate(over="ignore", invalid="ignore"):
            np.multiply(pixels[frame.frame], np.float32(slope), out=hu[k], casting="unsafe")
            hu[k] += np.float32(intercept)
        if not np.all(np.isfinite(hu[k])):
            raise CTReadError(
                f"Slice {k + 1} of series {description!r} ({Path(frame.path).name}) has RescaleSlope {slope:g} and "
                f"RescaleIntercept {intercept:g}, which put its values beyond any Hounsfield unit; the header is "
                f"damaged."
            )
        yield Progress(k + 1, n, f"Reading slice {k + 1} of {n}")

    metadata = _metadata(frames, geometry)
    metadata["SeriesInstanceUID"] = str(header.get("SeriesInstanceUID", "") or "")
    source = str(path) if isinstance(path, (str, os.PathLike)) else str(Path(ordered[0].path).parent)
    logger.info("read %d slices of %r from %s", n, description, source)
    return CTVolume(
        hu=hu,
        spacing=geometry.spacing,
        origin=geometry.origin,
        direction=geometry.direction,
        metadata=metadata,
        source=source,
    )


# --------------------------------------------------------------------------------------
# Writing a derived series
# --------------------------------------------------------------------------------------
def _ds(value: float) -> str:
    """A decimal string (DS) of at most 16 characters that parses back to ``value`` when possible."""
    value = float(value)
    if value == 0:
        return "0"
    text = repr(value)
    if len(text) <= 16:
        return text[:-2] if text.endswith(".0") else text
    return format_number_as_ds(value)


def _int16_rescale(hu: np.ndarray) -> tuple[float, float]:
    """``(slope, intercept)`` so that ``hu = stored * slope + intercept`` fits int16."""
    lo, hi = float(np.min(hu)), float(np.max(hu))
    if lo >= -32768 and hi <= 32767:
        return 1.0, 0.0
    slope = (hi - lo) / 65535.0
    warn(
        f"HU range {lo:.0f}..{hi:.0f} does not fit 16-bit integers; storing with RescaleSlope {slope:.4g} "
        f"(precision about {slope / 2:.2g} HU).",
        category=UserWarning,
    )
    return slope, lo + 32768.0 * slope


def _today() -> tuple[str, str]:
    now = _dt.datetime.now()
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S")


def _set(ds: Dataset, keyword: str, value: Any) -> None:
    if value is None:
        return
    try:
        setattr(ds, keyword, value)
    except (TypeError, ValueError) as exc:  # a value read from another file that no longer validates
        logger.debug("dropped %s=%r: %s", keyword, value, exc)


def _identity(source: dict[str, Any], *, date: str, time: str) -> dict[str, Any]:
    """Patient, study and equipment fields of a derived series, copied from ``source``.

    A source without a study gets new identifiers (a PACS files every image under a valid
    StudyInstanceUID and a patient ID); the type 2 fields are present, possibly empty.
    """
    identity: dict[str, Any] = {}
    new_study = not str(source.get("StudyInstanceUID", "") or "").strip()
    if new_study:
        identity.update(StudyInstanceUID=generate_uid(), StudyDate=date, StudyTime=time, StudyID="1")
    for keyword in PATIENT_KEYWORDS + STUDY_KEYWORDS + EQUIPMENT_KEYWORDS:
        if keyword not in identity and source.get(keyword) not in (None, ""):
            identity[keyword] = source[keyword]
    if new_study and not identity.get("PatientID"):
        identity["PatientID"] = f"LM-{uuid.uuid4().hex[:10].upper()}"
        identity.setdefault("PatientName", "ANONYMOUS")
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "StudyID", "AccessionNumber", "ReferringPhysicianName"):
        identity.setdefault(keyword, "")  # type 2: present, possibly empty
    return identity


def _series_template(
    volume: CTVolume, source: dict[str, Any], description: str, *, slope: float, intercept: float
) -> Dataset:
    """The fields every slice of the derived series of ``volume`` shares (``source``: the DICOM fields it derives from)."""
    date, time = _today()
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    for keyword, value in _identity(source, date=date, time=time).items():
        _set(ds, keyword, value)
    for keyword in ("BodyPartExamined", "PatientPosition", "KVP", "ConvolutionKernel", "ProtocolName"):
        if source.get(keyword) not in (None, ""):
            _set(ds, keyword, source[keyword])
    ds.Modality = "CT"
    ds.SeriesInstanceUID = generate_uid()
    try:
        ds.SeriesNumber = int(source.get("SeriesNumber")) + 1000
    except (TypeError, ValueError):
        ds.SeriesNumber = 1001
    ds.SeriesDescription = description
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.ContentDate, ds.ContentTime = date, time
    ds.DerivationDescription = description
    ds.SoftwareVersions = f"napari-langmamba {__version__}"
    if "Manufacturer" not in ds:
        ds.Manufacturer = ""
    frame_of_reference = str(volume.metadata.get("FrameOfReferenceUID") or source.get("FrameOfReferenceUID") or "")
    ds.FrameOfReferenceUID = frame_of_reference or generate_uid()
    ds.PositionReferenceIndicator = str(source.get("PositionReferenceIndicator", "") or "")
    ds.AcquisitionNumber = 1
    dz, dy, dx = volume.spacing
    _, col, row = volume.direction
    ds.ImageOrientationPatient = [_ds(v) for v in (*row, *col)]
    ds.PixelSpacing = [_ds(dy), _ds(dx)]
    thickness = source.get("SliceThickness")
    ds.SliceThickness = _ds(float(thickness) if thickness not in (None, "") else dz)
    ds.SpacingBetweenSlices = _ds(dz)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = volume.shape[1:]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = _ds(intercept)
    ds.RescaleSlope = _ds(slope)
    ds.RescaleType = "HU"
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    return ds


def _slice_dataset(series: Dataset, k: int, position: np.ndarray, normal: np.ndarray, stored: np.ndarray) -> Dataset:
    """Slice ``k`` of a derived series: the series' fields, a new SOP instance, its position and pixels."""
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"LANGMAMBA_{__version__}"[:16]
    ds = copy.deepcopy(series)
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.SliceLocation = _ds(float(np.dot(position, normal)))
    ds.PixelData = stored.tobytes()
    return ds


def write_dicom_series(
    volume: CTVolume,
    out_dir: str | os.PathLike,
    *,
    reference: CTVolume | None = None,
    description: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``volume`` as a derived CT series (one uncompressed file per slice) a PACS accepts.

    Parameters
    ----------
    volume : CTVolume
        The HU volume to write; its geometry (spacing, origin, direction) is written exactly.
    out_dir : path
        A new or empty folder (any existing content only with ``overwrite=True``, which replaces it).
    reference : CTVolume, optional
        The series this one derives from (e.g. the low-dose input): its patient, study and
        equipment fields are copied and its StudyInstanceUID reused. Without it, the volume's own
        metadata is used; if that has no study, new patient/study identifiers are created.
    description : str, optional
        SeriesDescription of the new series, e.g. ``"LangMamba denoised"``.
    overwrite : bool
        Replace an existing non-empty folder.

    Returns
    -------
    Path
        ``out_dir``.

    Notes
    -----
    Each file gets a new SOPInstanceUID and the series a new SeriesInstanceUID; ImageType is
    ``DERIVED\\SECONDARY\\AXIAL``; pixels are int16 with RescaleSlope/Intercept (exact to 0.5 HU);
    transfer syntax Explicit VR Little Endian. The files are written to a temporary sibling
    folder and renamed into place, so a failure leaves nothing behind.
    """
    if not isinstance(volume, CTVolume):
        raise CTWriteError(f"write_dicom_series needs a CTVolume; got {type(volume).__name__}.")
    hu = volume.hu
    if not np.all(np.isfinite(hu)):
        raise CTWriteError("The volume holds NaN or infinite values, which DICOM cannot store; nothing was written.")
    out_dir = Path(out_dir)
    source = dict(reference.metadata if reference is not None else volume.metadata)
    old_description = str(source.get("SeriesDescription", "") or "").strip()
    if description is None:
        description = f"Derived from {old_description}" if old_description else "Derived by napari-langmamba"
    description = description[:64]  # LO: 64 characters
    slope, intercept = _int16_rescale(hu)
    series = _series_template(volume, source, description, slope=slope, intercept=intercept)
    source_uids = source.get("source_sop_instance_uids") or []
    source_class = str(source.get("SOPClassUID") or CTImageStorage)
    positions = volume.slice_positions()
    n = volume.shape[0]
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        for k in range(n):
            # Slice by slice: a float64 copy of the whole volume would double peak memory.
            stored = np.clip(np.rint((hu[k].astype(np.float64) - intercept) / slope), -32768, 32767).astype("<i2")
            ds = _slice_dataset(series, k, positions[k], volume.direction[0], stored)
            if len(source_uids) == n:
                item = Dataset()
                item.ReferencedSOPClassUID = source_class
                item.ReferencedSOPInstanceUID = source_uids[k]
                ds.SourceImageSequence = DicomSequence([item])
            try:
                ds.save_as(tmp / f"CT{k + 1:05d}.dcm", enforce_file_format=True)
            except (ValueError, TypeError, AttributeError) as exc:
                raise CTWriteError(f"Could not encode slice {k + 1} as DICOM ({exc}); nothing was written.") from exc
    logger.info("wrote %d-slice derived series %r to %s", n, description, out_dir)
    return out_dir
