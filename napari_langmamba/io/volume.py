"""The CT volume and series records shared by every reader and writer.

Axes, units and the meaning of ``origin``/``direction`` follow the convention written in the
:mod:`napari_langmamba.io` package docstring.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from napari_langmamba.errors import ConfigError

# Rows: LPS unit vectors of array axes (z, y, x) for an axial head-first-supine series.
AXIAL_DIRECTION: np.ndarray = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
AXIAL_DIRECTION.setflags(write=False)


class CTReadWarning(UserWarning):
    """A recoverable oddity in CT input (spacing, rescale, orientation, skipped files)."""


def warn(message: str, category: type[Warning] = CTReadWarning) -> None:
    """``warnings.warn`` pointing at the first caller outside this package's I/O machinery.

    Readers are generators driven by :func:`napari_langmamba.events.run`, so a fixed
    ``stacklevel`` would point at different frames depending on the call path; walking the
    stack makes the warning name the user's own line.
    """
    level = 2
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").startswith(
        ("napari_langmamba.io", "napari_langmamba.events")
    ):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)


def _triple(name: str, value: Any, *, positive: bool) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"A CT volume's {name} must be three numbers (z, y, x); got {value!r}.") from None
    if len(out) != 3 or not all(math.isfinite(v) for v in out):
        raise ConfigError(f"A CT volume's {name} must be three finite numbers (z, y, x); got {value!r}.")
    if positive and not all(v > 0 for v in out):
        raise ConfigError(f"A CT volume's {name} must be positive (millimetres); got {value!r}.")
    return out  # type: ignore[return-value]


PER_SLICE_METADATA = ("source_sop_instance_uids", "slice_positions_lps")
"""``CTVolume.metadata`` keys that hold one entry per slice (a DICOM read writes them)."""


@dataclass(eq=False)  # identity comparison: element-wise array equality has no single truth value
class CTVolume:
    """A CT volume in Hounsfield units with its patient geometry.

    Attributes
    ----------
    hu : np.ndarray
        float32 array ``(z, y, x)`` in HU.
    spacing : tuple of float
        ``(dz, dy, dx)`` in mm.
    origin : tuple of float
        LPS position (mm) of the centre of voxel ``(0, 0, 0)``.
    direction : np.ndarray
        3 x 3; row ``a`` is the LPS unit vector of array axis ``a`` (z, y, x).
    metadata : dict
        Plain, JSON-serialisable DICOM fields (keyword -> value) that a writer needs, plus a few
        lower-case bookkeeping keys (e.g. ``source_format``).
    source : str or None
        The file or folder read, if any.
    """

    hu: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: AXIAL_DIRECTION.copy())
    metadata: dict = field(default_factory=dict)
    source: str | None = None

    def __post_init__(self) -> None:
        hu = np.asarray(self.hu)
        if hu.ndim != 3:
            raise ConfigError(f"A CT volume is 3-D (z, y, x); got an array of shape {hu.shape}.")
        if hu.dtype.kind not in "iuf":
            raise ConfigError(f"A CT volume holds numbers in HU; got dtype {hu.dtype}.")
        self.hu = hu.astype(np.float32, copy=False)
        self.spacing = _triple("spacing", self.spacing, positive=True)
        self.origin = _triple("origin", self.origin, positive=False)
        direction = np.asarray(self.direction, dtype=np.float64)
        if direction.shape != (3, 3) or not np.all(np.isfinite(direction)):
            raise ConfigError(f"A CT volume's direction is a finite 3 x 3 matrix; got {self.direction!r}.")
        norms = np.linalg.norm(direction, axis=1)
        if np.any(norms < 1e-6):
            raise ConfigError(f"A CT volume's direction rows must be non-zero vectors; got {direction.tolist()}.")
        self.direction = direction / norms[:, None]
        self.metadata = dict(self.metadata or {})
        self.source = None if self.source is None else str(self.source)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.hu.shape)  # type: ignore[return-value]

    def affine(self) -> np.ndarray:
        """4 x 4 matrix mapping a homogeneous index ``(k, j, i, 1)`` to LPS millimetres."""
        out = np.eye(4)
        out[:3, :3] = (self.direction * np.asarray(self.spacing)[:, None]).T
        out[:3, 3] = self.origin
        return out

    def slice_positions(self) -> np.ndarray:
        """LPS position (mm) of the centre of the first voxel of every slice, shape ``(z, 3)``."""
        steps = np.arange(self.shape[0])[:, None] * self.spacing[0] * self.direction[0][None, :]
        return np.asarray(self.origin)[None, :] + steps


@dataclass(frozen=True)
class SeriesInfo:
    """One series found in a folder or file: what a "series found" list shows.

    ``uid`` is the SeriesInstanceUID, or for series whose files carry none (anonymised data),
    a stable stand-in starting with ``"nouid-"``; either way ``read_ct(path, series=uid)``
    loads it, and ``read_ct(path, series=info)`` loads it without reading its headers again. ``spacing`` is ``(dz, dy, dx)`` in mm when the headers give it.
    """

    uid: str
    description: str
    modality: str
    n_slices: int
    rows: int
    columns: int
    spacing: tuple[float, float, float] | None
    files: tuple[str, ...]
    scan: Any = field(default=None, repr=False, compare=False)  # the DICOM headers read, for the read to reuse

    def summary(self) -> str:
        """One line for a list: description, slices, matrix and spacing."""
        spacing = "unknown spacing" if self.spacing is None else " x ".join(f"{s:.3g}" for s in self.spacing) + " mm"
        description = self.description or "(no description)"
        return (
            f"{description} [{self.modality or '?'}]: {self.n_slices} slice(s), "
            f"{self.rows} x {self.columns}, {spacing}"
        )


def to_jsonable(value: Any) -> Any:
    """A plain JSON-serialisable copy of a header value (pydicom types, NumPy scalars)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, bytes):
        return None  # binary blobs are not metadata a writer can use
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, Sequence):  # list, tuple, pydicom MultiValue
        return [to_jsonable(v) for v in value]
    return str(value)
