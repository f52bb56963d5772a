"""Training and evaluation data: low-/normal-dose pairs and normal-dose slices.

Two layers:

- **Sources** give HU slices without torch: :class:`MayoPairs` (the AAPM-Mayo 2D layout),
  :class:`DicomPairs` (a low-dose and a normal-dose series matched by slice position),
  :class:`SimulatedPairs` (a folder made by ``python -m training simulate``) and
  :class:`NDCTSlices` (any normal-dose CT, for the LangAE). A pair source has ``len()``,
  ``key(i)`` and ``pair_hu(i) -> (low, full)``; an NDCT source has ``key(i)`` and
  ``slice_hu(i)``. :func:`open_pairs` picks the right one for a folder; ``evaluate`` uses
  the sources directly.
- **torch Datasets** over them: :class:`PairedSliceDataset` returns
  ``{"low": (1, h, w), "full": (1, h, w), "key": str, "index": int}`` and
  :class:`NDCTDataset` ``{"image": (1, h, w), "key": str, "index": int}``, float32 tensors
  normalised with :data:`napari_langmamba.windowing.MODEL_NORMALIZATION` (HU [-1000, 2000]
  -> [0, 1]). In training mode they take a random ``patch_size`` crop (or the full slice)
  and a random flip / 90-degree rotation, the SAME for the low and the full image; in
  validation mode (``train=False``) there is no augmentation and a patch, if asked for, is
  the central one. Randomness comes from torch (``generator`` or the global generator,
  which DataLoader seeds per worker), so runs are reproducible with ``torch.manual_seed``.

Mayo 2D layout (as distributed with LEDA / LangMamba)::

    root/quarter_1mm/train_quarter_00001.npy   HU + 1024, one 2-D slice per file
    root/full_1mm/train_full_00001.npy

Files are paired by name, ``quarter`` <-> ``full`` (``root`` may also hold ``train/`` and
``test/`` splits: pass ``split``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from napari_langmamba.errors import ConfigError
from napari_langmamba.inference import series_kernel
from napari_langmamba.windowing import MODEL_NORMALIZATION, Normalization
from training.options import check_noise_scale
from training.simulate import MANIFEST_NAME, read_manifest

logger = logging.getLogger(__name__)

MAYO_LOW_DIR = "quarter_1mm"
MAYO_FULL_DIR = "full_1mm"
MAYO_OFFSET_HU = 1024.0  # Mayo .npy arrays store HU + 1024


class PairSource(Protocol):
    """HU pairs, indexable: what the paired datasets and ``evaluate`` read."""

    def __len__(self) -> int: ...

    def key(self, index: int) -> str: ...

    def pair_hu(self, index: int) -> tuple[np.ndarray, np.ndarray]: ...


class SliceSource(Protocol):
    """Single HU slices, indexable: what the NDCT dataset reads."""

    def __len__(self) -> int: ...

    def key(self, index: int) -> str: ...

    def slice_hu(self, index: int) -> np.ndarray: ...


# ---------------------------------------------------------------------------------------
# Helpers


def _load_npy_slice(path: Path, *, offset_hu: float = 0.0) -> np.ndarray:
    """A 2-D HU slice from a ``.npy`` file (no pickle), ``stored - offset_hu`` as float32."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise ConfigError(f"{path} is not a readable numeric .npy array ({exc}).") from exc
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2 or array.dtype.kind not in "iuf":
        raise ConfigError(
            f"{path} should hold one 2-D slice of numbers; found shape {array.shape}, dtype {array.dtype}."
        )
    hu = array.astype(np.float32) - np.float32(offset_hu)
    if not np.all(np.isfinite(hu)):
        raise ConfigError(f"{path} holds NaN or infinite values.")
    return hu


def _npy_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".npy")


def _check_pair_shapes(key: str, low: np.ndarray, full: np.ndarray) -> None:
    if low.shape != full.shape:
        raise ConfigError(f"The pair {key!r} has a low-dose slice of {low.shape} and a full-dose slice of {full.shape}.")


# ---------------------------------------------------------------------------------------
# Sources


class MayoPairs:
    """The AAPM-Mayo 2D layout: ``quarter_1mm/`` and ``full_1mm/`` ``.npy`` slices (HU + 1024).

    Parameters
    ----------
    root
        The folder holding ``quarter_1mm/`` and ``full_1mm/`` (or their parent, with ``split``).
    split
        A sub-folder of ``root`` such as ``"train"`` or ``"test"``.
    offset_hu
        Subtracted from the stored values (1024 for the published arrays).
    """

    def __init__(self, root: str | os.PathLike, *, split: str | None = None, offset_hu: float = MAYO_OFFSET_HU):
        base = Path(root) / split if split else Path(root)
        low_dir, full_dir = base / MAYO_LOW_DIR, base / MAYO_FULL_DIR
        for folder in (low_dir, full_dir):
            if not folder.is_dir():
                raise ConfigError(
                    f"{base} is not a Mayo 2D dataset: {folder.name}/ is missing (expected "
                    f"{MAYO_LOW_DIR}/ and {MAYO_FULL_DIR}/ of .npy slices)."
                )
        low_files, full_files = _npy_files(low_dir), _npy_files(full_dir)
        if not low_files or not full_files:
            empty = low_dir if not low_files else full_dir
            raise ConfigError(f"{empty} holds no .npy slices.")
        full_by_key = {self._match_key(p.stem): p for p in full_files}
        low_by_key = {self._match_key(p.stem): p for p in low_files}
        unmatched_low = sorted(set(low_by_key) - set(full_by_key))
        unmatched_full = sorted(set(full_by_key) - set(low_by_key))
        if unmatched_low or unmatched_full:
            examples = [low_by_key[k].name for k in unmatched_low[:3]] + [full_by_key[k].name for k in unmatched_full[:3]]
            raise ConfigError(
                f"In {base}, {len(unmatched_low)} quarter-dose and {len(unmatched_full)} full-dose files have no "
                f"partner (files pair by name with 'quarter' <-> 'full'), e.g. {', '.join(examples)}."
            )
        self.root = base
        self.offset_hu = float(offset_hu)
        self._keys = sorted(low_by_key)
        self._pairs = [(low_by_key[k], full_by_key[k]) for k in self._keys]

    @staticmethod
    def _match_key(stem: str) -> str:
        return re.sub(r"quarter|full", "*", stem, flags=re.IGNORECASE)

    def __len__(self) -> int:
        return len(self._pairs)

    def key(self, index: int) -> str:
        return self._pairs[index][1].stem

    def pair_hu(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        low_path, full_path = self._pairs[index]
        low = _load_npy_slice(low_path, offset_hu=self.offset_hu)
        full = _load_npy_slice(full_path, offset_hu=self.offset_hu)
        _check_pair_shapes(self.key(index), low, full)
        return low, full


class SimulatedPairs:
    """A paired folder written by :func:`training.simulate.iter_simulate_dataset`."""

    def __init__(self, folder: str | os.PathLike):
        folder = Path(folder)
        manifest = read_manifest(folder)
        if not manifest.get("complete"):
            raise ConfigError(
                f"The simulated dataset in {folder} is incomplete (an interrupted run); run "
                "`python -m training simulate` again with the same options to finish it."
            )
        entries = manifest["slices"]
        if not entries:
            raise ConfigError(f"The simulated dataset in {folder} holds no slices.")
        pairs = []
        for entry in entries:
            try:
                key, low, full = str(entry["key"]), folder / entry["low"], folder / entry["full"]
            except (KeyError, TypeError) as exc:
                raise ConfigError(f"{folder / MANIFEST_NAME} has a malformed slice entry: {entry!r}.") from exc
            if not (low.is_file() and full.is_file()):
                raise ConfigError(f"The pair {key!r} of {folder} is missing {low.name if not low.is_file() else full.name}.")
            pairs.append((key, low, full))
        self.root = folder
        self.manifest = manifest
        self._pairs = pairs

    def __len__(self) -> int:
        return len(self._pairs)

    def key(self, index: int) -> str:
        return self._pairs[index][0]

    def paths(self, index: int) -> tuple[Path, Path]:
        """The ``(low, full)`` files of pair ``index``."""
        return self._pairs[index][1], self._pairs[index][2]

    def pair_hu(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        key, low_path, full_path = self._pairs[index]
        low, full = _load_npy_slice(low_path), _load_npy_slice(full_path)
        _check_pair_shapes(key, low, full)
        return low, full


def _as_volume(item: Any, series: str | int | None) -> Any:
    if hasattr(item, "hu") and hasattr(item, "slice_positions"):
        return item
    from napari_langmamba.io import read_ct

    return read_ct(item, series=series)


def _positions_along_normal(volume: Any) -> np.ndarray:
    """Slice positions (mm) along the slice normal.

    The positions the DICOM reader recorded per slice (``metadata["slice_positions_lps"]``)
    when present: a series of a few scattered slices (as the Mayo pairs are) has gaps that
    the volume's regular grid (origin + k * spacing) does not describe.
    """
    normal = np.asarray(volume.direction)[0]
    recorded = (getattr(volume, "metadata", None) or {}).get("slice_positions_lps")
    if recorded is not None:
        positions = np.asarray(recorded, dtype=np.float64)
        if positions.shape == (volume.hu.shape[0], 3):
            return positions @ normal
    return volume.slice_positions() @ normal


class DicomPairs:
    """A low-dose and a normal-dose CT paired by slice position.

    ``low`` and ``full`` are anything :func:`~napari_langmamba.io.read_ct` reads (DICOM
    series folders above all; ``low_series``/``full_series`` choose in mixed folders) or
    already loaded :class:`~napari_langmamba.io.CTVolume` objects.

    Each low-dose slice is matched to the normal-dose slice at the same position along the
    slice normal (within ``tolerance_mm``, default a quarter of the slice spacing); slices
    present in only one of the series are an error unless ``allow_unmatched``.
    """

    def __init__(
        self,
        low: str | os.PathLike | Any,
        full: str | os.PathLike | Any,
        *,
        tolerance_mm: float | None = None,
        allow_unmatched: bool = False,
        low_series: str | int | None = None,
        full_series: str | int | None = None,
    ):
        low_volume = _as_volume(low, low_series)
        full_volume = _as_volume(full, full_series)
        if low_volume.hu.shape[1:] != full_volume.hu.shape[1:]:
            raise ConfigError(
                f"The low-dose series ({low_volume.hu.shape[1]}x{low_volume.hu.shape[2]}) and the normal-dose series "
                f"({full_volume.hu.shape[1]}x{full_volume.hu.shape[2]}) have different slice sizes; they are not a pair."
            )
        if abs(float(np.dot(low_volume.direction[0], full_volume.direction[0]))) < 0.999:
            raise ConfigError("The low-dose and normal-dose series are not oriented alike (different slice normals).")
        tol = 0.25 * min(low_volume.spacing[0], full_volume.spacing[0]) if tolerance_mm is None else float(tolerance_mm)
        low_pos = _positions_along_normal(low_volume)
        full_pos = _positions_along_normal(full_volume)
        pairs: list[tuple[int, int]] = []
        unmatched: list[float] = []
        for i, z in enumerate(low_pos):
            j = int(np.argmin(np.abs(full_pos - z)))
            if abs(full_pos[j] - z) <= tol:
                pairs.append((i, j))
            else:
                unmatched.append(float(z))
        n_unmatched_full = len(full_pos) - len({j for _, j in pairs})
        if not pairs:
            raise ConfigError(
                f"No slice of {low} lies at a slice position of {full} (tolerance {tol:.2f} mm): low-dose "
                f"{low_pos.min():.1f}..{low_pos.max():.1f} mm, normal-dose {full_pos.min():.1f}..{full_pos.max():.1f} mm."
            )
        if (unmatched or n_unmatched_full) and not allow_unmatched:
            raise ConfigError(
                f"{len(unmatched)} low-dose and {n_unmatched_full} normal-dose slices have no partner at the same "
                f"position (tolerance {tol:.2f} mm){f', e.g. low-dose at {unmatched[0]:.1f} mm' if unmatched else ''}; "
                "check that both series cover the same range, or allow unmatched slices."
            )
        self.low_volume, self.full_volume = low_volume, full_volume
        self._pairs = pairs
        self._positions = [float(low_pos[i]) for i, _ in pairs]

    def __len__(self) -> int:
        return len(self._pairs)

    def key(self, index: int) -> str:
        return f"z{self._positions[index]:+.2f}mm"

    def pair_hu(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        i, j = self._pairs[index]
        return self.low_volume.hu[i], self.full_volume.hu[j]


class NDCTSlices:
    """Normal-dose slices for the LangAE from any mix of inputs.

    Each input may be: a Mayo 2D root (its ``full_1mm/`` slices), a simulated-pairs folder
    (its ``full/`` slices), a folder of 2-D ``.npy`` slices (stored as ``npy_layout``), or
    anything :func:`~napari_langmamba.io.read_ct` reads (DICOM folder/file, NIfTI, ``.npy``
    volume), whose slices along z are used. ``slice_step`` keeps every n-th slice of volumes.
    """

    def __init__(self, inputs: Sequence[str | os.PathLike] | str | os.PathLike, *, npy_layout: str = "hu", slice_step: int = 1):
        if isinstance(inputs, (str, os.PathLike)):
            inputs = [inputs]
        if not inputs:
            raise ConfigError("No normal-dose CT given; pass DICOM folders, NIfTI/.npy files or slice folders.")
        if npy_layout not in ("hu", "mayo"):
            raise ConfigError(f"Unknown .npy layout {npy_layout!r}; choose 'hu' or 'mayo' (HU + 1024).")
        if isinstance(slice_step, bool) or not isinstance(slice_step, int) or slice_step < 1:
            raise ConfigError(f"slice_step must be an integer >= 1; got {slice_step!r}.")
        from napari_langmamba.io import read_ct

        # Each item: (key, ("file", path, offset)) or (key, ("volume", volume_index, k)).
        self._items: list[tuple[str, tuple]] = []
        self._volumes: list[Any] = []
        layout_offset = MAYO_OFFSET_HU if npy_layout == "mayo" else 0.0
        for raw in inputs:
            path = Path(raw)
            if path.is_dir() and (path / MAYO_FULL_DIR).is_dir():
                files = _npy_files(path / MAYO_FULL_DIR)
                self._items += [(p.stem, ("file", p, MAYO_OFFSET_HU)) for p in files]
            elif path.is_dir() and (path / MANIFEST_NAME).is_file():
                source = SimulatedPairs(path)
                self._items += [
                    (f"{path.name}/{source.key(i)}", ("file", source.paths(i)[1], 0.0)) for i in range(len(source))
                ]
            elif path.is_dir() and _npy_files(path):
                self._items += [(p.stem, ("file", p, layout_offset)) for p in _npy_files(path)]
            else:
                volume = read_ct(path, npy_layout=npy_layout)
                v_idx = len(self._volumes)
                self._volumes.append(volume)
                name = path.name or str(path)
                self._items += [(f"{name}:{k}", ("volume", v_idx, k)) for k in range(0, volume.hu.shape[0], slice_step)]
        if not self._items:
            raise ConfigError(f"No CT slices found in {', '.join(str(p) for p in inputs)}.")

    def __len__(self) -> int:
        return len(self._items)

    def key(self, index: int) -> str:
        return self._items[index][0]

    def slice_hu(self, index: int) -> np.ndarray:
        kind, a, b = self._items[index][1]
        if kind == "file":
            return _load_npy_slice(a, offset_hu=b)
        return self._volumes[a].hu[b]

    def metadata(self, index: int) -> dict[str, Any]:
        """The plain metadata (DICOM fields) of the volume slice ``index`` came from; ``{}`` for ``.npy`` slices."""
        kind, a, _ = self._items[index][1]
        if kind == "file":
            return {}
        return dict(self._volumes[a].metadata or {})


def open_pairs(
    data: str | os.PathLike | None = None,
    *,
    low: str | os.PathLike | None = None,
    full: str | os.PathLike | None = None,
    split: str | None = None,
) -> PairSource:
    """The pair source for a dataset folder (simulated or Mayo), or for ``low`` + ``full`` CTs.

    Raises
    ------
    ConfigError
        Neither form given, both given, or a folder of an unknown layout.
    """
    if (data is None) == (low is None and full is None):
        raise ConfigError("Give either a dataset folder, or a low-dose and a normal-dose CT (both), not both forms.")
    if data is None:
        if low is None or full is None:
            raise ConfigError("Paired CT series need both the low-dose and the normal-dose input.")
        return DicomPairs(low, full)
    root = Path(data)
    base = root / split if split else root
    if (base / MANIFEST_NAME).is_file():
        return SimulatedPairs(base)
    if (base / MAYO_LOW_DIR).is_dir() or (base / MAYO_FULL_DIR).is_dir():
        return MayoPairs(root, split=split)
    if not base.is_dir():
        raise ConfigError(f"The dataset folder {base} does not exist.")
    raise ConfigError(
        f"{base} is neither a simulated-pairs folder ({MANIFEST_NAME}, from `python -m training simulate`) nor a "
        f"Mayo 2D dataset ({MAYO_LOW_DIR}/ and {MAYO_FULL_DIR}/); for two CT series give the low and full inputs."
    )


# ---------------------------------------------------------------------------------------
# Many pairs at once: labelled groups (patient, kernel, dose) and their collection

PAIR_MANIFEST_COLUMNS = ("low", "full", "patient")
PAIR_MANIFEST_OPTIONAL = ("kernel", "dose")
_LOW_PREFIXES = {"quarter": 0.25, "low": None}  # folder-name prefix of a low-dose series -> its dose
_FULL_PREFIX = "full"


@dataclass(frozen=True)
class PairGroup:
    """One pair source with what a run record says about it.

    ``patient`` names the person scanned (validation splits by it), ``kernel`` the
    reconstruction kernel, ``dose`` the low-dose fraction (``None`` when unknown), ``origin``
    ``"real"``, ``"simulated"`` or ``"transplanted"`` (:class:`TransplantedNoisePairs`), ``name``
    the prefix of its keys and ``path`` where it came from.
    """

    source: Any
    patient: str
    name: str
    kernel: str | None = None
    dose: float | None = None
    origin: str = "real"
    path: str = ""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "patient": self.patient, "kernel": self.kernel, "dose": self.dose,
                "origin": self.origin, "n_slices": len(self.source), "path": self.path}


class PairSet:
    """Labelled pair groups concatenated into one pair source (see :class:`PairSource`).

    Keys are ``<group name>/<key in the group>``; :meth:`info` gives the patient, kernel,
    dose and origin of a pair, :meth:`select` keeps or drops patients, :meth:`summary` is the
    data record of a run.
    """

    def __init__(self, groups: Sequence[PairGroup]):
        self.groups = [g for g in groups if len(g.source)]
        self._index = [(g, i) for g in self.groups for i in range(len(g.source))]

    def __len__(self) -> int:
        return len(self._index)

    def key(self, index: int) -> str:
        group, i = self._index[index]
        return f"{group.name}/{group.source.key(i)}"

    def pair_hu(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        group, i = self._index[index]
        return group.source.pair_hu(i)

    def info(self, index: int) -> dict[str, Any]:
        """``patient``, ``kernel``, ``dose`` and ``origin`` of pair ``index``."""
        group = self._index[index][0]
        return {"patient": group.patient, "kernel": group.kernel, "dose": group.dose, "origin": group.origin}

    @property
    def patients(self) -> list[str]:
        return sorted({g.patient for g in self.groups})

    def select(self, patients: Sequence[str], *, exclude: bool = False) -> PairSet:
        """The pairs of ``patients`` (or of every other patient with ``exclude``).

        Raises
        ------
        ConfigError
            A named patient has no pairs here.
        """
        wanted = {str(p) for p in patients}
        missing = sorted(wanted - set(self.patients))
        if missing:
            raise ConfigError(
                f"No pairs of patient(s) {', '.join(missing)} in the data; its patients are "
                f"{', '.join(self.patients) or 'none'}."
            )
        return PairSet([g for g in self.groups if (g.patient in wanted) != exclude])

    def summary(self) -> dict[str, Any]:
        """:func:`pair_summary` plus the source layouts and the groups."""
        return {**pair_summary(self), "layouts": sorted({type(g.source).__name__ for g in self.groups}),
                "groups": [g.describe() for g in self.groups]}


def pair_summary(source: Any) -> dict[str, Any]:
    """Slices, patients (slices, kernels, doses of each), kernels, doses, real/simulated counts.

    ``source`` is a :class:`PairSet` or a subset of one (anything with ``info(i)``); other
    sources give only their slice count.
    """
    if not hasattr(source, "info"):
        return {"n_slices": len(source)}
    infos = [source.info(i) for i in range(len(source))]

    def ordered(values: Any) -> list:
        return sorted(set(values), key=lambda v: (v is None, v))

    patients = {}
    for patient in ordered(i["patient"] for i in infos):
        mine = [i for i in infos if i["patient"] == patient]
        patients[patient] = {"n_slices": len(mine), "kernels": ordered(i["kernel"] for i in mine),
                             "doses": ordered(i["dose"] for i in mine), "origins": ordered(i["origin"] for i in mine)}
    return {
        "n_slices": len(infos),
        "patients": patients,
        "kernels": ordered(i["kernel"] for i in infos),
        "doses": ordered(i["dose"] for i in infos),
        "n_real_slices": sum(i["origin"] == "real" for i in infos),
        "n_simulated_slices": sum(i["origin"] == "simulated" for i in infos),
        "n_transplanted_slices": sum(i["origin"] == "transplanted" for i in infos),
    }


def _quiet_read(item: Any) -> Any:
    """``read_ct`` without the warnings about gaps: a pair series may hold a few scattered slices."""
    from napari_langmamba.io.volume import CTReadWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CTReadWarning)
        return _as_volume(item, None)


def patient_label(metadata: dict[str, Any] | None, fallback: str) -> str:
    """A patient name from DICOM fields: PatientID, else PatientName's first ``_`` token, else ``fallback``.

    Anonymised series often carry ``PatientID = "Anonymous"``; the Mayo data then names the
    patient in PatientName (``L096_FD_3_SHARP`` -> ``L096``).
    """
    metadata = metadata or {}
    pid = str(metadata.get("PatientID") or "").strip()
    if pid and not pid.lower().startswith(("anon", "unknown")):
        return pid
    name = str(metadata.get("PatientName") or "").strip()
    if name:
        return re.split(r"[_^ ]", name)[0] or name
    return fallback


def _series_folders(folder: Path) -> tuple[dict[str, Path], dict[str, tuple[Path, float | None]]]:
    """``({suffix: full folder}, {suffix: (low folder, dose)})`` of a patient folder."""
    fulls: dict[str, Path] = {}
    lows: dict[str, tuple[Path, float | None]] = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        lower = sub.name.lower()
        if lower.startswith(_FULL_PREFIX):
            fulls[lower[len(_FULL_PREFIX):]] = sub
            continue
        for prefix, dose in _LOW_PREFIXES.items():
            if lower.startswith(prefix):
                lows[lower[len(prefix):]] = (sub, dose)
                break
    return fulls, lows


def patient_folder_pairs(root: str | os.PathLike) -> list[PairGroup]:
    """The pairs of a folder of patients: ``root/<patient>/{full…, quarter…}/`` DICOM series.

    In each patient folder, a ``full<suffix>`` series pairs with the ``quarter<suffix>`` (dose
    0.25) or ``low<suffix>`` (dose unknown) series of the same suffix (e.g. ``full_3mm_D45`` and
    ``quarter_3mm_D45``); their slices are matched by position. ``root`` may also be one
    patient's folder. The kernel comes from the DICOM header (else the suffix).

    Raises
    ------
    ConfigError
        ``root`` is missing, holds no such pairs, or a series has no partner.
    """
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"The pairs folder {root} does not exist.")
    fulls, lows = _series_folders(root)
    patients = [root] if (fulls or lows) else sorted(p for p in root.iterdir() if p.is_dir())
    groups: list[PairGroup] = []
    for patient_dir in patients:
        fulls, lows = _series_folders(patient_dir)
        unpaired = sorted(set(fulls) ^ set(lows))
        if unpaired:
            names = [fulls[s].name if s in fulls else lows[s][0].name for s in unpaired]
            raise ConfigError(
                f"In {patient_dir}, the series {', '.join(names)} have no partner: a full<suffix> folder pairs "
                "with the quarter<suffix> (or low<suffix>) folder of the same suffix."
            )
        for suffix in sorted(fulls):
            low_dir, dose = lows[suffix]
            source = DicomPairs(_quiet_read(low_dir), _quiet_read(fulls[suffix]))
            kernel = series_kernel(source.low_volume.metadata) or suffix.strip("_-") or None
            groups.append(PairGroup(source, patient=patient_dir.name, name=f"{patient_dir.name}/{low_dir.name}",
                                    kernel=kernel, dose=dose, path=str(low_dir)))
    if not groups:
        raise ConfigError(
            f"{root} holds no low-/normal-dose pairs: expected <patient>/full…/ and <patient>/quarter…/ "
            "DICOM series folders (as in the AAPM-Mayo 2016 pairs)."
        )
    return groups


def dicom_pair_group(low: str | os.PathLike | Any, full: str | os.PathLike | Any, *, patient: str | None = None,
                     kernel: str | None = None, dose: float | None = None) -> PairGroup:
    """One labelled low-/normal-dose pair of CTs (patient and kernel from the header unless given)."""
    source = DicomPairs(_quiet_read(low), _quiet_read(full))
    meta = source.low_volume.metadata
    name = Path(os.fspath(low)).name if isinstance(low, (str, os.PathLike)) else "low"
    label = patient or patient_label(meta, name)
    return PairGroup(source, patient=label, name=f"{label}/{name}", kernel=kernel or series_kernel(meta), dose=dose,
                     path=os.fspath(low) if isinstance(low, (str, os.PathLike)) else "")


def parse_dose(text: Any, *, where: str) -> float:
    """A dose fraction from ``0.25``, ``"0.25"`` or ``"25%"``; in (0, 1]."""
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) / 100.0 if raw.endswith("%") else float(raw)
    except ValueError:
        raise ConfigError(f"{where}: a dose is a fraction such as 0.25 or a percentage such as 25%; got {raw!r}.") from None
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ConfigError(f"{where}: a dose fraction must be in (0, 1]; got {raw!r}.")
    return value


def manifest_pairs(path: str | os.PathLike) -> list[PairGroup]:
    """The pairs listed in a CSV manifest: columns ``low, full, patient`` and optional ``kernel, dose``.

    Each row is a low-dose and a normal-dose CT (anything :func:`~napari_langmamba.io.read_ct`
    reads; relative paths are relative to the manifest's folder) paired by slice position.
    """
    import csv

    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip().lower() for c in reader.fieldnames or []]
            rows = list(reader)
    except OSError as exc:
        raise ConfigError(f"Could not read the pairs manifest {path}: {exc}") from exc
    missing = [c for c in PAIR_MANIFEST_COLUMNS if c not in columns]
    if missing:
        raise ConfigError(
            f"The pairs manifest {path} lacks the column(s) {', '.join(missing)}; it needs "
            f"{', '.join(PAIR_MANIFEST_COLUMNS)} (and optionally {', '.join(PAIR_MANIFEST_OPTIONAL)})."
        )
    if not rows:
        raise ConfigError(f"The pairs manifest {path} lists no pairs.")
    groups = []
    for n, raw in enumerate(rows, start=2):  # line numbers as a spreadsheet shows them
        row = {str(k).strip().lower(): (v or "").strip() for k, v in raw.items() if k is not None}
        where = f"{path.name} line {n}"
        if not all(row.get(c) for c in PAIR_MANIFEST_COLUMNS):
            raise ConfigError(f"{where}: every row needs low, full and patient.")
        low, full = (Path(row[c]) if Path(row[c]).is_absolute() else path.parent / row[c] for c in ("low", "full"))
        for item in (low, full):
            if not item.exists():
                raise ConfigError(f"{where}: {item} does not exist.")
        dose = parse_dose(row["dose"], where=where) if row.get("dose") else None
        groups.append(dicom_pair_group(low, full, patient=row["patient"], kernel=row.get("kernel") or None, dose=dose))
    return groups


def folder_pair_group(folder: str | os.PathLike, *, split: str | None = None) -> PairGroup:
    """A ``--data`` folder (simulated pairs or a Mayo 2D root) as one group named after the folder."""
    source = open_pairs(folder, split=split)
    name = Path(folder).name or str(folder)
    dose = None
    if isinstance(source, SimulatedPairs):
        dose = (source.manifest.get("options") or {}).get("dose")
    return PairGroup(source, patient=name, name=name, dose=dose,
                     origin="simulated" if isinstance(source, SimulatedPairs) else "real", path=str(folder))


def labelled_input(item: str | os.PathLike, purpose: str) -> tuple[str | None, Path]:
    """``(label or None, path)`` of an input given as ``PATH`` or ``LABEL=PATH`` (the label names the patient).

    Raises
    ------
    ConfigError
        The path does not exist (``purpose`` says what it was for).
    """
    text, label = os.fspath(item), None
    if "=" in text and not Path(text).exists():
        label, _, text = text.partition("=")
    path = Path(text)
    if not path.exists():
        raise ConfigError(f"The normal-dose CT {path} ({purpose}) does not exist.")
    return label, path


def default_simulation_cache() -> Path:
    """Where simulated pairs are cached unless told otherwise (``$XDG_CACHE_HOME/napari-langmamba/simulated``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "napari-langmamba" / "simulated"


def simulated_pair_groups(
    inputs: Sequence[str | os.PathLike],
    doses: Sequence[float],
    *,
    cache: str | os.PathLike | None = None,
    slice_step: int = 1,
    workers: int = 1,
    filter: str = "cosine",
    match_noise: bool = False,
) -> list[PairGroup]:
    """Simulated pairs of normal-dose CTs at each dose, made once and cached (``training.simulate``).

    Every (input, dose) becomes its own simulated-pairs folder under ``cache``, named by a hash
    of the input path, the dose, the slice step and the noise options, so runs with the same
    inputs reuse them. An input given as ``LABEL=PATH`` names its patient; otherwise the DICOM
    header does. ``filter`` and ``match_noise`` are those of
    :class:`training.simulate.SimulationOptions` (noise matched to each input's own noise).
    """
    import hashlib

    from napari_langmamba.events import run as run_events
    from training.simulate import SimulationOptions, iter_simulate_dataset

    if not inputs:
        return []
    if not doses:
        raise ConfigError("Simulated pairs need at least one dose (e.g. --sim-doses 0.05,0.1,0.25,0.5).")
    cache = Path(cache) if cache is not None else default_simulation_cache()
    groups = []
    for item in inputs:
        label, path = labelled_input(item, "to simulate from")
        volume = _quiet_read(path)
        patient = label or patient_label(volume.metadata, path.name)
        kernel = series_kernel(volume.metadata)
        del volume
        for dose in doses:
            dose = parse_dose(dose, where="--sim-doses")
            seed = int(round(dose * 10000))  # independent noise per dose, stable across runs
            options = SimulationOptions(dose=dose, seed=seed, filter=filter, match_noise=match_noise)
            noise = "" if (options.filter, match_noise) == ("cosine", False) else f"|{options.filter}|{match_noise}"
            tag = hashlib.sha256(f"{path.resolve()}|{dose!r}|{slice_step}|{seed}{noise}".encode()).hexdigest()[:12]
            folder = cache / f"{path.name}_dose{dose:g}_{tag}"
            logger.info("simulated pairs of %s at dose %g: %s", path, dose, folder)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run_events(iter_simulate_dataset([path], folder, options=options,
                                                 workers=workers, slice_step=slice_step, overwrite=True))
            groups.append(PairGroup(SimulatedPairs(folder), patient=patient, name=f"{patient}/sim{dose:g}",
                                    kernel=kernel, dose=dose, origin="simulated", path=str(path)))
    return groups


class TransplantedNoisePairs:
    """Normal-dose slices plus the real noise of other pairs: ``low = full + (donor low - donor full)``.

    A real low-dose pair's difference image is that scanner's own quantum noise at that dose,
    reconstructed with that kernel: its texture is exactly what the model must remove, which
    projection-domain simulation only approximates. Adding it to another normal-dose slice of
    the same scanner and kernel makes a new pair with real noise over new anatomy ("noise
    transplant"). ``donors`` are ``(key, low, full)`` arrays of the same shape as the slices;
    each slice gets ``variants`` pairs, each with a donor and a flip drawn from ``seed``
    (stable across runs, so a run can be resumed and repeated).
    """

    def __init__(self, slices: NDCTSlices, donors: Sequence[tuple[str, np.ndarray, np.ndarray]], *,
                 variants: int = 2, seed: int = 0):
        if not donors:
            raise ConfigError("Noise transplant needs at least one donor pair.")
        if isinstance(variants, bool) or not isinstance(variants, int) or variants < 1:
            raise ConfigError(f"--transplant-variants must be an integer >= 1; got {variants!r}.")
        self.slices = slices
        self.residuals = [(key, (np.asarray(low, np.float32) - np.asarray(full, np.float32))) for key, low, full in donors]
        rng = np.random.default_rng(seed)
        n = len(slices) * variants
        # (donor index, flip rows, flip columns) of each pair, drawn once.
        self._draws = list(zip(rng.integers(len(self.residuals), size=n).tolist(),
                               rng.integers(2, size=n).astype(bool).tolist(),
                               rng.integers(2, size=n).astype(bool).tolist(), strict=True))
        self.variants = variants

    def __len__(self) -> int:
        return len(self._draws)

    def key(self, index: int) -> str:
        return f"{self.slices.key(index // self.variants)}+{self.residuals[self._draws[index][0]][0]}"

    def pair_hu(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        donor, flip_rows, flip_cols = self._draws[index]
        full = np.asarray(self.slices.slice_hu(index // self.variants), dtype=np.float32)
        noise = self.residuals[donor][1]
        if noise.shape != full.shape:
            raise ConfigError(f"The donor noise {self.residuals[donor][0]!r} is {noise.shape[0]}x{noise.shape[1]} but "
                              f"the slice {self.key(index)!r} is {full.shape[0]}x{full.shape[1]}.")
        noise = noise[::-1] if flip_rows else noise
        noise = noise[:, ::-1] if flip_cols else noise
        return full + noise, full


def transplanted_pair_groups(
    inputs: Sequence[str | os.PathLike],
    donors: PairSet,
    *,
    slice_step: int = 1,
    variants: int = 2,
    seed: int = 0,
    exclude_patients: Sequence[str] = (),
) -> list[PairGroup]:
    """Pairs made by adding the real noise of ``donors`` to normal-dose CTs (:class:`TransplantedNoisePairs`).

    Each input (``LABEL=PATH`` names its patient) takes as donors the real pairs of ``donors``
    with its reconstruction kernel and slice shape, so a kernel's noise texture never lands on
    another kernel's image; pass only training pairs (never a validation patient's). An input of
    a patient in ``exclude_patients`` is refused.

    Raises
    ------
    ConfigError
        An input is missing, belongs to an excluded patient, or has no donor of its kernel and shape.
    """
    groups = []
    for item in inputs:
        label, path = labelled_input(item, "to add real noise to")
        slices = NDCTSlices([path], slice_step=slice_step)
        metadata = slices.metadata(0)
        patient = label or patient_label(metadata, path.name)
        if patient in {str(p) for p in exclude_patients}:
            raise ConfigError(f"{path} is a scan of {patient}, a validation patient; it cannot be trained on.")
        kernel = series_kernel(metadata)
        shape = slices.slice_hu(0).shape
        chosen, doses = [], set()
        for index in range(len(donors)):
            info = donors.info(index)
            if info["origin"] != "real" or (kernel is not None and info["kernel"] != kernel):
                continue
            low, full = donors.pair_hu(index)
            if low.shape == shape:
                chosen.append((donors.key(index), low, full))
                doses.add(info["dose"])
        if not chosen:
            raise ConfigError(
                f"No real training pair has the kernel {kernel or '(unknown)'} and the slice shape "
                f"{shape[0]}x{shape[1]} of {path}, so there is no real noise to add to it."
            )
        logger.info("noise transplant: %d slices of %s (%s, kernel %s) x %d variants from %d real pairs",
                    len(slices), path, patient, kernel, variants, len(chosen))
        groups.append(PairGroup(TransplantedNoisePairs(slices, chosen, variants=variants, seed=seed),
                                patient=patient, name=f"{patient}/transplant", kernel=kernel,
                                dose=doses.pop() if len(doses) == 1 else None, origin="transplanted", path=str(path)))
    return groups


def collect_pairs(
    *,
    data: Sequence[str | os.PathLike] = (),
    split: str | None = None,
    pairs: Sequence[str | os.PathLike] = (),
    low: Sequence[str | os.PathLike] = (),
    full: Sequence[str | os.PathLike] = (),
    manifest: Sequence[str | os.PathLike] = (),
    simulate_from: Sequence[str | os.PathLike] = (),
    sim_doses: Sequence[float] = (),
    sim_cache: str | os.PathLike | None = None,
    sim_slice_step: int = 1,
    sim_workers: int = 1,
    sim_filter: str = "cosine",
    sim_match_noise: bool = False,
) -> PairSet:
    """Every kind of pair input as one :class:`PairSet` (the one place training and ``evaluate`` read pairs).

    ``data``: simulated-pairs folders or Mayo 2D roots; ``pairs``: folders of patients
    (:func:`patient_folder_pairs`); ``low``/``full``: CTs paired in order; ``manifest``: CSV
    files (:func:`manifest_pairs`); ``simulate_from`` + ``sim_doses``: normal-dose CTs turned
    into simulated pairs at each dose (:func:`simulated_pair_groups`).
    """
    if len(low) != len(full):
        raise ConfigError(f"--low and --full pair up in order: got {len(low)} low-dose and {len(full)} normal-dose CTs.")
    groups: list[PairGroup] = [folder_pair_group(d, split=split) for d in data]
    for root in pairs:
        groups += patient_folder_pairs(root)
    groups += [dicom_pair_group(lo, fu) for lo, fu in zip(low, full, strict=True)]
    for file in manifest:
        groups += manifest_pairs(file)
    groups += simulated_pair_groups(simulate_from, sim_doses, cache=sim_cache, slice_step=sim_slice_step,
                                    workers=sim_workers, filter=sim_filter, match_noise=sim_match_noise)
    names = [g.name for g in groups]
    for name in {n for n in names if names.count(n) > 1}:  # keys stay unique
        same = [i for i, n in enumerate(names) if n == name]
        for k, i in enumerate(same):
            groups[i] = dataclasses.replace(groups[i], name=f"{name}#{k + 1}")
    result = PairSet(groups)
    if not len(result):
        raise ConfigError("No slice pairs were given (--data, --pairs, --low/--full, --manifest or --simulate-from).")
    return result


# ---------------------------------------------------------------------------------------
# Crops and augmentation (one transform applied to every image of a sample)


def _check_patch_size(patch_size: int | None) -> int | None:
    if patch_size is None:
        return None
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ConfigError(f"patch_size must be a positive integer (pixels) or None for full slices; got {patch_size!r}.")
    return patch_size


class _Transform:
    """Crop window + flips + 90-degree rotation drawn once per sample."""

    def __init__(
        self,
        shape: tuple[int, int],
        *,
        patch_size: int | None,
        train: bool,
        augment: bool,
        generator: torch.Generator | None,
        key: str,
    ):
        h, w = shape
        if patch_size is not None and (patch_size > h or patch_size > w):
            raise ConfigError(f"patch_size {patch_size} is larger than the slice {key!r} ({h}x{w}).")

        def randint(high: int) -> int:
            return int(torch.randint(high, (1,), generator=generator).item())

        if patch_size is None:
            self.top, self.left, self.ph, self.pw = 0, 0, h, w
        elif train:
            self.top, self.left, self.ph, self.pw = randint(h - patch_size + 1), randint(w - patch_size + 1), patch_size, patch_size
        else:
            self.top, self.left, self.ph, self.pw = (h - patch_size) // 2, (w - patch_size) // 2, patch_size, patch_size
        if train and augment:
            self.flip_y, self.flip_x = bool(randint(2)), bool(randint(2))
            # Odd quarter turns would change the shape of a non-square image (and break batching).
            self.quarter_turns = randint(4) if self.ph == self.pw else 2 * randint(2)
        else:
            self.flip_y = self.flip_x = False
            self.quarter_turns = 0

    def __call__(self, image: np.ndarray) -> np.ndarray:
        out = image[self.top : self.top + self.ph, self.left : self.left + self.pw]
        if self.flip_y:
            out = out[::-1]
        if self.flip_x:
            out = out[:, ::-1]
        if self.quarter_turns:
            out = np.rot90(out, self.quarter_turns)
        return np.ascontiguousarray(out)


def _to_tensor(hu: np.ndarray, normalization: Normalization) -> torch.Tensor:
    norm = normalization.to_model(np.asarray(hu, dtype=np.float32))
    return torch.from_numpy(np.ascontiguousarray(norm, dtype=np.float32))[None]  # (1, h, w)


class _AugmentedDataset(Dataset):
    def __init__(
        self,
        *,
        n_items: int,
        patch_size: int | None,
        train: bool,
        augment: bool,
        repeat: int,
        normalization: Normalization,
        generator: torch.Generator | None,
    ):
        if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
            raise ConfigError(f"repeat (samples per slice per epoch) must be an integer >= 1; got {repeat!r}.")
        self.patch_size = _check_patch_size(patch_size)
        self.train = bool(train)
        self.augment = bool(augment)
        self.repeat = repeat
        self.normalization = normalization
        self.generator = generator
        self._n = n_items

    def __len__(self) -> int:
        return self._n * self.repeat

    def _slice_index(self, index: int) -> int:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        return (index % len(self)) % self._n

    def _transform(self, shape: tuple[int, int], key: str) -> _Transform:
        return _Transform(
            shape, patch_size=self.patch_size, train=self.train, augment=self.augment, generator=self.generator, key=key
        )


class PairedSliceDataset(_AugmentedDataset):
    """Low-/normal-dose pairs as normalised tensors, with paired crops and augmentation.

    Parameters
    ----------
    source
        A pair source (:class:`MayoPairs`, :class:`DicomPairs`, :class:`SimulatedPairs`, or
        :func:`open_pairs`).
    patch_size
        Side of square random crops (training) or of the central crop (validation); ``None``
        for full slices.
    train
        Training mode (random crops, augmentation) or validation mode (deterministic).
    augment
        Random flips and 90-degree rotations in training mode.
    repeat
        Samples drawn per slice per epoch (several random patches of each slice).
    normalization
        HU -> model input mapping (default :data:`MODEL_NORMALIZATION`).
    generator
        torch Generator for the random choices (default: torch's global generator).
    noise_scale
        ``(lo, hi)``: in training mode, each sample's noise ``low - full`` is multiplied by a factor
        drawn uniformly from ``[lo, hi]`` (``low' = full + k (low - full)``), i.e. the same pair at
        another dose with the same noise texture. For pairs made by projection-domain noise
        insertion (the Mayo quarter dose, ``simulate``) the difference is pure noise, so ``k``
        turns dose ``a`` into ``a'`` with ``1/a' - 1 = k^2 (1/a - 1)``. ``None``: the pairs as they are.
    """

    def __init__(
        self,
        source: PairSource,
        *,
        patch_size: int | None = None,
        train: bool = True,
        augment: bool = True,
        repeat: int = 1,
        normalization: Normalization = MODEL_NORMALIZATION,
        generator: torch.Generator | None = None,
        noise_scale: tuple[float, float] | None = None,
    ):
        if len(source) == 0:
            raise ConfigError("The paired dataset is empty.")
        self.noise_scale = check_noise_scale(noise_scale)
        super().__init__(
            n_items=len(source),
            patch_size=patch_size,
            train=train,
            augment=augment,
            repeat=repeat,
            normalization=normalization,
            generator=generator,
        )
        self.source = source

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = self._slice_index(index)
        key = self.source.key(i)
        low, full = self.source.pair_hu(i)
        _check_pair_shapes(key, low, full)
        transform = self._transform(low.shape, key)
        if self.train and self.noise_scale is not None:
            lo, hi = self.noise_scale
            k = lo + (hi - lo) * float(torch.rand((), generator=self.generator))
            full = np.asarray(full, dtype=np.float32)
            low = full + np.float32(k) * (np.asarray(low, dtype=np.float32) - full)
        return {
            "low": _to_tensor(transform(low), self.normalization),
            "full": _to_tensor(transform(full), self.normalization),
            "key": key,
            "index": i,
        }


class MayoDataset(PairedSliceDataset):
    """:class:`PairedSliceDataset` over :class:`MayoPairs` (``root``, optional ``split``)."""

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        split: str | None = None,
        patch_size: int | None = None,
        train: bool = True,
        augment: bool = True,
        repeat: int = 1,
        generator: torch.Generator | None = None,
    ):
        super().__init__(
            MayoPairs(root, split=split),
            patch_size=patch_size,
            train=train,
            augment=augment,
            repeat=repeat,
            generator=generator,
        )


class SimulatedPairDataset(PairedSliceDataset):
    """:class:`PairedSliceDataset` over a ``simulate`` output folder."""

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        patch_size: int | None = None,
        train: bool = True,
        augment: bool = True,
        repeat: int = 1,
        generator: torch.Generator | None = None,
    ):
        super().__init__(
            SimulatedPairs(folder),
            patch_size=patch_size,
            train=train,
            augment=augment,
            repeat=repeat,
            generator=generator,
        )


class NDCTDataset(_AugmentedDataset):
    """Normal-dose slices as normalised tensors (for the LangAE), with crops and augmentation.

    ``inputs`` are as for :class:`NDCTSlices` (or an already built slice source); the other
    parameters as for :class:`PairedSliceDataset`.
    """

    def __init__(
        self,
        inputs: SliceSource | Sequence[str | os.PathLike] | str | os.PathLike,
        *,
        patch_size: int | None = None,
        train: bool = True,
        augment: bool = True,
        repeat: int = 1,
        npy_layout: str = "hu",
        slice_step: int = 1,
        normalization: Normalization = MODEL_NORMALIZATION,
        generator: torch.Generator | None = None,
    ):
        source = inputs if hasattr(inputs, "slice_hu") else NDCTSlices(inputs, npy_layout=npy_layout, slice_step=slice_step)
        super().__init__(
            n_items=len(source),
            patch_size=patch_size,
            train=train,
            augment=augment,
            repeat=repeat,
            normalization=normalization,
            generator=generator,
        )
        self.source = source

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = self._slice_index(index)
        key = self.source.key(i)
        image = self.source.slice_hu(i)
        transform = self._transform(image.shape, key)
        return {"image": _to_tensor(transform(image), self.normalization), "key": key, "index": i}
