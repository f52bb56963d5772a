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

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from napari_langmamba.errors import ConfigError
from napari_langmamba.windowing import MODEL_NORMALIZATION, Normalization
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
    """Slice positions (mm) along the slice normal, as written down in ``napari_langmamba.io``."""
    return volume.slice_positions() @ np.asarray(volume.direction)[0]


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
    ):
        if len(source) == 0:
            raise ConfigError("The paired dataset is empty.")
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


class DicomPairDataset(PairedSliceDataset):
    """:class:`PairedSliceDataset` over a low-dose and a normal-dose series matched by position."""

    def __init__(
        self,
        low: str | os.PathLike,
        full: str | os.PathLike,
        *,
        patch_size: int | None = None,
        train: bool = True,
        augment: bool = True,
        repeat: int = 1,
        generator: torch.Generator | None = None,
    ):
        super().__init__(
            DicomPairs(low, full),
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
