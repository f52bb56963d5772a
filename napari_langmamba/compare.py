"""Before/after comparison of CT slices: ROI statistics, CNR, profiles, metrics, export.

The Qt-free core of the Compare widget (which only gathers the current slice of each
layer and draws the result). Conventions:

- Images are 2-D HU arrays ``(y, x)`` of one slice, all of the same shape.
- A :class:`Roi` is a half-open pixel box ``[y0, y1) x [x0, x1)`` in array indices. A
  rectangle drawn in napari has its corners on pixel *edges* (pixel ``i`` spans
  ``[i - 0.5, i + 0.5]``), so :meth:`Roi.from_vertices` rounds ``v + 0.5`` down.
- Noise is the sample SD (``ddof=1``) in the ROI; CNR is ``|mean(ROI) - mean(bg)| / SD(bg)``.
- PSNR / SSIM / FSIM come from :mod:`napari_langmamba.metrics` (images clipped to the chosen
  window and scaled to ``[0, 1]``, data range 1), computed on the ROI crop or on the whole
  slice (``region="slice"``, the numbers ``training evaluate`` reports).
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from napari_langmamba.errors import ConfigError, LangMambaError
from napari_langmamba.windowing import Window

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

ROLES: tuple[str, ...] = ("before", "after", "reference")
REGIONS: tuple[str, ...] = ("roi", "slice")
CSV_COLUMNS: tuple[str, ...] = (
    "image",
    "role",
    "slice",
    "roi_y0",
    "roi_x0",
    "roi_y1",
    "roi_x1",
    "mean_hu",
    "sd_hu",
    "cnr",
    "psnr",
    "ssim",
    "fsim",
    "metrics_region",
    "window",
    "window_lower_hu",
    "window_upper_hu",
)


@dataclass(frozen=True)
class Roi:
    """A half-open pixel box ``[y0, y1) x [x0, x1)`` of a 2-D slice."""

    y0: int
    x0: int
    y1: int
    x1: int

    def __post_init__(self) -> None:
        if self.y1 <= self.y0 or self.x1 <= self.x0:
            raise ConfigError(
                f"An ROI needs a positive size; got rows [{self.y0}, {self.y1}) and "
                f"columns [{self.x0}, {self.x1}). Draw a larger rectangle."
            )

    @classmethod
    def from_vertices(cls, vertices_yx: np.ndarray | Sequence[Sequence[float]], shape: Sequence[int]) -> Roi:
        """The pixels enclosed by a shape's vertices ``(n, 2)`` in (fractional) pixel coordinates.

        The bounding box is clipped to ``shape`` (y, x); an ROI entirely outside the image
        raises :class:`ConfigError`.
        """
        vertices = np.asarray(vertices_yx, dtype=float)
        if vertices.ndim != 2 or vertices.shape[1] != 2 or len(vertices) == 0:
            raise ConfigError(f"ROI vertices must be an (n, 2) array of (y, x); got shape {vertices.shape}.")
        lo = np.floor(vertices.min(axis=0) + 0.5).astype(int)
        hi = np.floor(vertices.max(axis=0) + 0.5).astype(int)
        height, width = int(shape[0]), int(shape[1])
        y0, x0 = max(0, lo[0]), max(0, lo[1])
        y1, x1 = min(height, hi[0]), min(width, hi[1])
        if y1 <= y0 or x1 <= x0:
            raise ConfigError(
                f"The ROI (rows {lo[0]}..{hi[0]}, columns {lo[1]}..{hi[1]}) does not cover any pixel "
                f"of the {height} x {width} image. Move the rectangle onto the image."
            )
        return cls(int(y0), int(x0), int(y1), int(x1))

    @classmethod
    def centred(cls, shape: Sequence[int], *, fraction: float = 0.125, min_size: int = 8) -> Roi:
        """A square ROI in the centre of an image of ``shape`` (y, x), ``fraction`` of its size."""
        height, width = int(shape[0]), int(shape[1])
        side = max(min_size, int(round(min(height, width) * fraction)))
        side = min(side, height, width)
        y0 = (height - side) // 2
        x0 = (width - side) // 2
        return cls(y0, x0, y0 + side, x0 + side)

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y1), slice(self.x0, self.x1)

    @property
    def shape(self) -> tuple[int, int]:
        return self.y1 - self.y0, self.x1 - self.x0

    @property
    def centre_row(self) -> int:
        """The row the horizontal profile runs along (the upper middle row for even heights)."""
        return (self.y0 + self.y1 - 1) // 2

    def corners(self) -> np.ndarray:
        """Rectangle corners ``(4, 2)`` (y, x) on pixel edges, as a napari rectangle."""
        top, left, bottom, right = self.y0 - 0.5, self.x0 - 0.5, self.y1 - 0.5, self.x1 - 0.5
        return np.array([[top, left], [top, right], [bottom, right], [bottom, left]], dtype=float)

    def crop(self, image: np.ndarray) -> np.ndarray:
        return np.asarray(image)[self.slices]


def check_compatible(shapes: Mapping[str, Sequence[int]], scales: Mapping[str, Sequence[float]] | None = None,
                     *, rtol: float = 1e-4) -> None:
    """Raise :class:`ConfigError` unless every image has the same shape (and scale).

    ``shapes`` and ``scales`` map an image name to its array shape / voxel size.
    """
    names = list(shapes)
    if not names:
        return
    first = names[0]
    for name in names[1:]:
        if tuple(shapes[name]) != tuple(shapes[first]):
            listing = "; ".join(f"{n}: {tuple(int(v) for v in s)}" for n, s in shapes.items())
            raise ConfigError(
                f"Images to compare must have the same shape; found {listing}. "
                "Compare a result with the image it was computed from (or resample first)."
            )
    if scales:
        ref = np.asarray(scales[first], dtype=float)
        for name in names[1:]:
            other = np.asarray(scales[name], dtype=float)
            if other.shape != ref.shape or not np.allclose(other, ref, rtol=rtol, atol=0.0):
                listing = "; ".join(
                    f"{n}: ({', '.join(f'{float(v):.4g}' for v in s)})" for n, s in scales.items()
                )
                raise ConfigError(
                    f"Images to compare must have the same voxel size (layer scale); found {listing}. "
                    "Pixels would not correspond: compare images of the same series geometry."
                )


def slice_of(data: np.ndarray, index: int | None) -> np.ndarray:
    """The 2-D HU slice ``index`` of a (z, y, x) volume, or the image itself when it is 2-D."""
    ndim = np.ndim(data)
    if ndim == 2:
        return np.asarray(data, dtype=np.float32)
    if ndim == 3:
        if index is None or not 0 <= index < data.shape[0]:
            raise ConfigError(f"Slice {index} is outside the volume of {data.shape[0]} slices.")
        return np.asarray(data[index], dtype=np.float32)
    raise ConfigError(f"Comparison works on 2-D images and 3-D volumes; got a {ndim}-D array.")


def roi_stats(image: np.ndarray, roi: Roi) -> tuple[float, float]:
    """Mean and sample SD (ddof=1) of the HU in ``roi``."""
    values = roi.crop(image).astype(np.float64)
    mean = float(values.mean())
    sd = float(values.std(ddof=1)) if values.size > 1 else math.nan
    return mean, sd


def cnr(image: np.ndarray, roi: Roi, background: Roi) -> float:
    """Contrast-to-noise ratio ``|mean(roi) - mean(background)| / SD(background)``.

    NaN when the background has no spread (SD 0), where the ratio is undefined.
    """
    mean_roi, _ = roi_stats(image, roi)
    mean_bg, sd_bg = roi_stats(image, background)
    if not sd_bg > 0:
        return math.nan
    return abs(mean_roi - mean_bg) / sd_bg


def line_profile(image: np.ndarray, roi: Roi) -> tuple[np.ndarray, np.ndarray]:
    """The HU along the ROI's centre row, across its width: ``(x indices, values)``."""
    x = np.arange(roi.x0, roi.x1)
    return x, np.asarray(image, dtype=np.float32)[roi.centre_row, roi.x0 : roi.x1].copy()


def symmetric_limits(difference: np.ndarray, *, percentile: float = 99.5, floor: float = 1.0) -> tuple[float, float]:
    """Contrast limits ``(-d, d)`` centred on 0 covering ``percentile`` % of ``|difference|``."""
    finite = np.abs(np.asarray(difference, dtype=np.float32))
    finite = finite[np.isfinite(finite)]
    d = float(np.percentile(finite, percentile)) if finite.size else floor
    d = max(d, floor)
    return (-d, d)


@dataclass(frozen=True)
class ImageMetrics:
    """The numbers of one image on one slice (NaN where not applicable)."""

    role: str
    image: str
    mean_hu: float
    sd_hu: float
    cnr: float = math.nan
    psnr: float = math.nan
    ssim: float = math.nan
    fsim: float = math.nan


@dataclass(frozen=True)
class Comparison:
    """Everything the Compare widget shows and exports for one slice."""

    names: dict[str, str]  # role -> layer name
    slice_index: int | None  # None for 2-D images
    roi: Roi
    background: Roi | None
    window: Window
    metrics_region: str
    crops: dict[str, np.ndarray]  # role -> HU crop (y, x) of the ROI
    differences: dict[str, np.ndarray]  # "after - before", ... -> HU crop (y, x)
    profile_x: np.ndarray  # x indices along the ROI's centre row
    profiles: dict[str, np.ndarray]  # role -> HU along that row
    metrics: tuple[ImageMetrics, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def slice_label(self) -> str:
        return "2-D image" if self.slice_index is None else f"slice {self.slice_index}"

    @property
    def window_label(self) -> str:
        w = self.window
        return f"{w.name} W{w.width:g}/L{w.level:g} [{w.lower:g}, {w.upper:g}] HU"

    def rows(self) -> list[dict[str, object]]:
        """One CSV row per image, keyed by :data:`CSV_COLUMNS`."""
        rows = []
        for m in self.metrics:
            rows.append(
                {
                    "image": m.image,
                    "role": m.role,
                    "slice": "" if self.slice_index is None else self.slice_index,
                    "roi_y0": self.roi.y0,
                    "roi_x0": self.roi.x0,
                    "roi_y1": self.roi.y1,
                    "roi_x1": self.roi.x1,
                    "mean_hu": m.mean_hu,
                    "sd_hu": m.sd_hu,
                    "cnr": m.cnr,
                    "psnr": m.psnr,
                    "ssim": m.ssim,
                    "fsim": m.fsim,
                    "metrics_region": self.metrics_region,
                    "window": self.window.name,
                    "window_lower_hu": self.window.lower,
                    "window_upper_hu": self.window.upper,
                }
            )
        return rows


def _reference_metrics(image: np.ndarray, reference: np.ndarray, window: Window) -> tuple[tuple[float, float, float], list[str]]:
    """PSNR, SSIM, FSIM of ``image`` against ``reference`` (NaN for one that cannot be computed)."""
    from napari_langmamba import metrics  # imported here: it pulls in scikit-image

    values: list[float] = []
    notes: list[str] = []
    for name in ("psnr", "ssim", "fsim"):
        try:
            values.append(float(getattr(metrics, name)(image, reference, window=window)))
        except (LangMambaError, ValueError) as exc:
            # e.g. an ROI smaller than the SSIM window: report the others, say why this one is missing
            values.append(math.nan)
            notes.append(f"{name.upper()} not computed: {exc}")
    return (values[0], values[1], values[2]), notes


def compare_slices(
    slices: Mapping[str, tuple[str, np.ndarray]],
    *,
    roi: Roi,
    window: Window,
    background: Roi | None = None,
    metrics_region: str = "roi",
    slice_index: int | None = None,
) -> Comparison:
    """Compare the 2-D HU slices of ``before``/``after``/optional ``reference`` in an ROI.

    Parameters
    ----------
    slices
        role (``"before"``, ``"after"``, optionally ``"reference"``) -> (image name, HU (y, x)).
    roi, background
        The ROI and the optional background ROI for the CNR.
    window
        Display window of the crops and window of PSNR / SSIM / FSIM.
    metrics_region
        ``"roi"``: reference metrics on the ROI crops; ``"slice"``: on the whole slices.
    slice_index
        The slice shown (recorded in the table and the figure); None for 2-D images.
    """
    unknown = set(slices) - set(ROLES)
    if unknown or "before" not in slices or "after" not in slices:
        raise ConfigError(f"Compare needs 'before' and 'after' (and optionally 'reference'); got {sorted(slices)}.")
    if metrics_region not in REGIONS:
        raise ConfigError(f"metrics_region must be one of {REGIONS}; got {metrics_region!r}.")
    roles = [r for r in ROLES if r in slices]
    images = {r: np.asarray(slices[r][1], dtype=np.float32) for r in roles}
    for r in roles:
        if images[r].ndim != 2:
            raise ConfigError(f"compare_slices takes 2-D slices; {r} has shape {images[r].shape}.")
    check_compatible({f"{r} ({slices[r][0]})": images[r].shape for r in roles})
    shape = images["before"].shape
    roi = Roi.from_vertices(roi.corners(), shape)  # clip to the image
    if background is not None:
        background = Roi.from_vertices(background.corners(), shape)

    crops = {r: roi.crop(images[r]).copy() for r in roles}
    differences = {"after - before": crops["after"] - crops["before"]}
    if "reference" in images:
        differences["after - reference"] = crops["after"] - crops["reference"]
    profile_x, _ = line_profile(images["before"], roi)
    profiles = {r: line_profile(images[r], roi)[1] for r in roles}

    notes: list[str] = []
    rows: list[ImageMetrics] = []
    reference = images.get("reference")
    for r in roles:
        mean, sd = roi_stats(images[r], roi)
        contrast = cnr(images[r], roi, background) if background is not None else math.nan
        scores = (math.nan, math.nan, math.nan)
        if reference is not None and r != "reference":
            if metrics_region == "roi":
                scores, why = _reference_metrics(crops[r], crops["reference"], window)
            else:
                scores, why = _reference_metrics(images[r], reference, window)
            notes.extend(f"{r}: {w}" for w in why)
        rows.append(ImageMetrics(r, slices[r][0], mean, sd, contrast, *scores))
    return Comparison(
        names={r: slices[r][0] for r in roles},
        slice_index=slice_index,
        roi=roi,
        background=background,
        window=window,
        metrics_region=metrics_region,
        crops=crops,
        differences=differences,
        profile_x=profile_x,
        profiles=profiles,
        metrics=tuple(rows),
        notes=tuple(notes),
    )


def write_csv(comparison: Comparison, path: str | Path) -> Path:
    """Write the metrics table (:data:`CSV_COLUMNS`) to ``path`` and return it."""
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in comparison.rows():
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return path


def _fmt(value: float, digits: int = 1) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:.{digits}f}" if math.isfinite(value) else ("inf" if value > 0 else "-inf")


def _short(text: str, n: int = 26) -> str:
    return text if len(text) <= n else text[: n - 1] + "\u2026"


def draw_comparison(figure: Figure, comparison: Comparison, *, compact: bool = False) -> None:
    """Draw crops, differences and the line profile (plus metrics and caption) into ``figure``.

    The widget's live canvas uses ``compact=True`` (role titles only, no table: the widget
    shows the numbers itself); :func:`save_figure` draws the full version with the layer
    names, the metrics table, the window and the slice. Give ``figure`` a constrained layout.
    """
    figure.clear()
    roles = list(comparison.crops)
    diffs = list(comparison.differences)
    n_cols = max(len(roles), len(diffs) + 1)
    heights = [1.0, 1.0] if compact else [1.0, 1.0, 0.45]
    grid = figure.add_gridspec(len(heights), n_cols, height_ratios=heights)
    w = comparison.window
    colours = {"before": "tab:red", "after": "tab:blue", "reference": "tab:green"}
    size = 7 if compact else 8

    for col, role in enumerate(roles):
        ax = figure.add_subplot(grid[0, col])
        ax.imshow(comparison.crops[role], cmap="gray", vmin=w.lower, vmax=w.upper, interpolation="nearest")
        title = role if compact else f"{role}\n{_short(comparison.names[role], 34)}"
        ax.set_title(title, fontsize=size)
        ax.axhline(comparison.roi.centre_row - comparison.roi.y0, color=colours[role], lw=0.8, alpha=0.7)
        ax.set_xticks([])
        ax.set_yticks([])
    if diffs:
        limit = max(symmetric_limits(d)[1] for d in comparison.differences.values())
        axes = []
        for col, label in enumerate(diffs):
            ax = figure.add_subplot(grid[1, col])
            image = ax.imshow(comparison.differences[label], cmap="bwr", vmin=-limit, vmax=limit,
                              interpolation="nearest")
            ax.set_title(label, fontsize=size)
            ax.set_xticks([])
            ax.set_yticks([])
            axes.append(ax)
        bar = figure.colorbar(image, ax=axes, shrink=0.9, pad=0.02)
        bar.ax.tick_params(labelsize=size - 1)
        bar.set_label("difference (HU)", fontsize=size - 1)
    ax = figure.add_subplot(grid[1, len(diffs) :])
    for role in roles:
        ax.plot(comparison.profile_x, comparison.profiles[role], color=colours[role], lw=1, label=role)
    values = np.concatenate([comparison.profiles[r] for r in roles])
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    pad = max(5.0, 0.05 * (hi - lo))
    ax.axhspan(w.lower, w.upper, color="0.92", zorder=0)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel("x (pixel)", fontsize=size - 1)
    ax.set_ylabel("HU", fontsize=size - 1)
    ax.set_title(f"profile, row {comparison.roi.centre_row}", fontsize=size)
    ax.tick_params(labelsize=size - 1)
    ax.legend(fontsize=size - 2, loc="best")
    if compact:
        return

    ax = figure.add_subplot(grid[2, :])
    ax.axis("off")
    header = ["image", "mean HU", "SD HU", "CNR", "PSNR dB", "SSIM", "FSIM"]
    cells = [
        [f"{m.role}: {_short(m.image)}", _fmt(m.mean_hu), _fmt(m.sd_hu), _fmt(m.cnr, 2), _fmt(m.psnr, 2),
         _fmt(m.ssim, 4), _fmt(m.fsim, 4)]
        for m in comparison.metrics
    ]
    table = ax.table(cellText=cells, colLabels=header, loc="center", cellLoc="center",
                     colWidths=[0.34] + [0.11] * 6)
    table.auto_set_font_size(False)
    table.set_fontsize(size)
    table.scale(1.0, 1.3)
    roi = comparison.roi
    region = "ROI" if comparison.metrics_region == "roi" else "whole slice"
    caption = (
        f"{comparison.slice_label}; ROI rows {roi.y0}-{roi.y1 - 1}, columns {roi.x0}-{roi.x1 - 1}"
        + ("" if comparison.background is None else
           f"; background rows {comparison.background.y0}-{comparison.background.y1 - 1}, "
           f"columns {comparison.background.x0}-{comparison.background.x1 - 1}")
        + f"\nwindow {comparison.window_label}; PSNR / SSIM / FSIM on the {region} (window scaled to [0, 1])"
    )
    figure.suptitle(caption, fontsize=size)


def save_figure(comparison: Comparison, path: str | Path, *, dpi: int = 150) -> Path:
    """Write the comparison figure (crops, differences, profile, metrics, window, slice) as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    figure = Figure(figsize=(2.8 * max(3, len(comparison.crops)), 7.8), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    draw_comparison(figure, comparison)
    figure.savefig(path, format="png")
    return path
