"""Sample CT slices that ship inside installed wheels (no download, works offline).

* ``"abdomen"``: a real 512 x 512 abdominal CT slice from the ``pydicom-data`` wheel (package
  ``data_store``), found by its header (CT, 512 x 512, abdominal body part); if that wheel is
  missing, pydicom's own ``CT_small.dcm``.
* ``"ct_small"``: pydicom's ``CT_small.dcm`` (128 x 128).

The files are located in the installed packages directly: ``pydicom.data.get_testdata_file``
may try to download files it does not find, which must never happen here.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from pathlib import Path

from napari_langmamba.errors import ConfigError, CTReadError
from napari_langmamba.io.volume import CTVolume

logger = logging.getLogger(__name__)

SAMPLES = ("abdomen", "ct_small")
# The abdominal slice known to be in pydicom-data 1.x; checked first, then any abdominal CT.
_PREFERRED_ABDOMEN = ("explicit_VR-UN.dcm",)
_ABDOMINAL_WORDS = ("ABDOMEN", "PANCREAS", "LIVER", "KIDNEY", "ABD", "PELVIS")


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def ct_small_path() -> Path:
    """pydicom's bundled ``CT_small.dcm``."""
    package = _package_dir("pydicom")
    path = None if package is None else package / "data" / "test_files" / "CT_small.dcm"
    if path is None or not path.is_file():
        raise CTReadError("pydicom's sample CT_small.dcm is not installed; reinstall pydicom.")
    return path


def _is_abdominal_ct(path: Path) -> bool:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - any unreadable file is simply not a candidate
        return False
    if ds.get("Modality") != "CT" or ds.get("Rows") != 512 or ds.get("Columns") != 512:
        return False
    if int(ds.get("NumberOfFrames") or 1) != 1:
        return False
    text = " ".join(
        str(ds.get(k, "") or "") for k in ("BodyPartExamined", "StudyDescription", "SeriesDescription")
    ).upper()
    return any(word in text for word in _ABDOMINAL_WORDS)


@functools.lru_cache(maxsize=1)
def abdomen_path() -> Path:
    """A real 512 x 512 abdominal CT slice from ``pydicom-data``, else ``CT_small.dcm``."""
    package = _package_dir("data_store")
    folder = None if package is None else package / "data"
    if folder is not None and folder.is_dir():
        preferred = [folder / name for name in _PREFERRED_ABDOMEN]
        others = sorted(p for p in folder.glob("*.dcm") if p not in preferred)
        for path in preferred + others:
            if path.is_file() and _is_abdominal_ct(path):
                return path
    logger.warning("no abdominal CT found in pydicom-data; using pydicom's CT_small.dcm")
    return ct_small_path()


def sample_path(name: str) -> Path:
    """The file behind sample ``name`` (one of :data:`SAMPLES`)."""
    key = name.strip().lower()
    if key == "abdomen":
        return abdomen_path()
    if key == "ct_small":
        return ct_small_path()
    raise ConfigError(f"Unknown sample {name!r}; choose one of {', '.join(SAMPLES)}.")


def load_sample(name: str = "abdomen") -> CTVolume:
    """A bundled sample as a :class:`CTVolume` in HU (one slice, shape ``(1, y, x)``)."""
    from napari_langmamba.io.api import read_ct

    return read_ct(sample_path(name))
