"""``simulate``: low-dose / normal-dose pairs by projection-domain noise insertion.

Public quarter-dose data (the 2016 AAPM-Mayo challenge) was made by inserting noise into the
projections of the normal-dose scan; this stage does the same on any normal-dose CT slice:

1. HU -> linear attenuation ``mu = mu_water * (1 + HU / 1000)`` (per mm, clipped at 0 for
   air), multiplied by the pixel size so that a sum over pixels is a line integral.
2. Forward projection with :func:`skimage.transform.radon`: **parallel-beam** geometry,
   ``n_views`` angles evenly spaced over [0, 180) degrees, one detector bin per pixel
   (bin width = pixel size), ``circle=False`` so every ray through the (square-padded) image
   is kept; ``p`` are dimensionless line integrals.
3. The normal-dose image already holds the noise of its own dose (``I0`` photons per ray
   before attenuation). Reaching dose fraction ``a`` needs extra projection noise of variance
   ``(1/a - 1) * exp(p) / I0 + (1/a^2 - 1) * sigma_e^2 * exp(2p) / I0^2``: the quantum
   (Poisson) term and the electronic term (Gaussian detector noise of ``sigma_e`` counts),
   in the Gaussian approximation of the log of the counts (Yu et al., Med. Phys. 2012).
   Rays whose expected low-dose count falls below one photon are treated as one photon
   (the log of a non-positive count is undefined; scanners clamp them too).
4. Filtered back-projection (:func:`skimage.transform.iradon`, the chosen filter, linear
   interpolation) of that noise alone, converted to HU and added to the original:
   ``LD = ND + FBP(noise)``. The pair differs only by noise, the target keeps its full
   resolution, and ``a = 1`` adds nothing (the original is returned unchanged).

Calibration (defaults): real quarter-minus-full-dose abdominal slices of the challenge have
a standard deviation of about 20-30 HU in a central 128x128 soft-tissue patch (15-20 HU over
the whole 512x512 image). With 720 views, ``I0 = 2e6`` and the smooth ``cosine`` filter
(closer to a clinical soft-tissue kernel than the ramp), the 20 real 512x512 abdominal slices
of the shared test series at dose 0.25 give 25.4-28.7 HU (mean 26.7) in the central patch and
17.0-18.4 HU over the whole image (``tests/test_simulate.py`` checks one slice against the
ranges above). A ramp filter would need ``I0`` around 1e7 for the same level.

That calibration holds for smooth abdominal kernels only. A sharp kernel amplifies the noise
of every photon: in the chest volume of ``../shared/data`` (Siemens B70f) the high-passed noise
variance of the full dose is about 30x what this model assigns to a full dose at the default
``I0`` with the ramp filter, and about 150x with the cosine filter (:func:`matched_i0` on 8 of
its slices), so a "10 %" simulation of it added less noise than its full dose already had. **Noise matching** (``match_noise``; the stage's
``--match-noise``) measures the image's own noise instead: on up to 8 slices of each input it
simulates the noise of a second, equal dose (dose 0.5 inserts exactly the full dose's quantum
variance) and compares its variance with the image's in 16 x 16 blocks of flat soft tissue,
both high-passed (the image minus its Gaussian blur, sigma 1.5 px, which removes most of the
anatomy). ``I0`` of that input is then the probe's ``I0`` divided by the median ratio, so the
inserted noise at dose ``a`` has ``1/a - 1`` times the image's own high-frequency noise
variance (quantum noise; the electronic term is added as usual), with the texture of the chosen
filter (``ramp`` is the closest to a sharp kernel). Anatomy left in the high-passed blocks
makes the estimate err towards more noise: on the Mayo pairs, where the real quarter dose is
known, the image's measured noise is 1.1-1.2x its physical value.

The output of :func:`iter_simulate_dataset` is a paired dataset folder::

    out_dir/
      dataset.json      options, sources, per-slice info (written last; "complete": true)
      low/00000.npy     float32 HU, the simulated low-dose slice
      full/00000.npy    float32 HU, the normal-dose slice it came from

It is a cache: running again with the same inputs and options returns at once; an
interrupted run resumes with the slices that are missing (every slice has its own seed,
so the result does not depend on the number of workers or on interruptions).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_langmamba.errors import ConfigError
from napari_langmamba.events import Progress, run
from napari_langmamba.io._files import replace_atomically
from training.config import add_config_argument, add_option, options_to_dict, resolve_options

logger = logging.getLogger(__name__)

MU_WATER_PER_MM = 0.019
"""Linear attenuation of water at an effective energy of about 70 keV (1/mm)."""

FBP_FILTERS = ("ramp", "shepp-logan", "cosine", "hamming", "hann")
DATASET_FORMAT = "napari-langmamba-simulated-pairs"
DATASET_VERSION = 1
MANIFEST_NAME = "dataset.json"
LOW_DIR = "low"
FULL_DIR = "full"
CENTRAL_PATCH = 128  # side of the central patch whose noise SD is recorded per slice


@dataclass(frozen=True)
class SimulationOptions:
    """Options of the low-dose simulation (the stage's flags; defaults are calibrated).

    Attributes
    ----------
    dose
        Dose fraction ``a`` of the simulated scan, in (0, 1]; 0.25 is quarter dose.
    i0
        Incident photons per ray of the normal-dose scan (720-view parallel-beam model).
    electronic_noise
        Standard deviation of the detector's electronic noise, in photon counts per ray.
    filter
        FBP filter of the noise image: ramp, shepp-logan, cosine, hamming or hann.
    n_views
        Number of projection angles over 180 degrees.
    mu_water
        Linear attenuation of water (1/mm).
    seed
        Base seed; slice ``n`` of a dataset uses ``SeedSequence(seed, spawn_key=(n,))``.
    match_noise
        Replace ``i0`` by one measured from each input's own noise (see the module docstring);
        ``i0`` is then the probe's value only.
    """

    dose: float = 0.25
    i0: float = 2.0e6
    electronic_noise: float = 3.0
    filter: str = "cosine"
    n_views: int = 720
    mu_water: float = MU_WATER_PER_MM
    seed: int = 0
    match_noise: bool = False

    def __post_init__(self) -> None:
        _check_physics(**self.physics())
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"The seed is a non-negative integer; got {self.seed!r}.")
        if not isinstance(self.match_noise, bool):
            raise ConfigError(f"match_noise is true or false; got {self.match_noise!r}.")
        object.__setattr__(self, "filter", self.filter.strip().lower())

    def physics(self) -> dict[str, Any]:
        """The scan parameters (all but ``seed`` and ``match_noise``), as keywords of :func:`simulate_low_dose`."""
        return {
            "dose": self.dose,
            "i0": self.i0,
            "electronic_noise": self.electronic_noise,
            "filter": self.filter,
            "n_views": self.n_views,
            "mu_water": self.mu_water,
        }


def checked_filter(name: Any, *, flag: str = "FBP filter") -> str:
    """``name`` as one of :data:`FBP_FILTERS` (stripped, lower case); a clear error otherwise."""
    if not isinstance(name, str) or name.strip().lower() not in FBP_FILTERS:
        raise ConfigError(f"Unknown {flag} {name!r}; choose one of {', '.join(FBP_FILTERS)}.")
    return name.strip().lower()


def _check_physics(
    *, dose: float, i0: float, electronic_noise: float, filter: str, n_views: int, mu_water: float
) -> None:
    if not (isinstance(dose, (int, float)) and 0.0 < dose <= 1.0):
        raise ConfigError(f"The dose fraction must be in (0, 1] (0.25 is quarter dose); got {dose!r}.")
    if not (isinstance(i0, (int, float)) and math.isfinite(i0) and i0 > 0):
        raise ConfigError(f"I0 (incident photons per ray) must be positive; got {i0!r}.")
    if not (isinstance(electronic_noise, (int, float)) and math.isfinite(electronic_noise) and electronic_noise >= 0):
        raise ConfigError(f"The electronic noise (counts) must be >= 0; got {electronic_noise!r}.")
    checked_filter(filter)
    if isinstance(n_views, bool) or not isinstance(n_views, int) or n_views < 16:
        raise ConfigError(f"The number of views must be an integer >= 16; got {n_views!r}.")
    if not (isinstance(mu_water, (int, float)) and math.isfinite(mu_water) and mu_water > 0):
        raise ConfigError(f"mu_water (1/mm) must be positive; got {mu_water!r}.")


# ---------------------------------------------------------------------------------------
# One slice


def _angles(n_views: int) -> np.ndarray:
    return np.linspace(0.0, 180.0, n_views, endpoint=False)


def _square(hu_slice: np.ndarray) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Pad a slice to a square with air (radon's geometry); return it and the crop back."""
    h, w = hu_slice.shape
    n = max(h, w)
    top, left = (n - h) // 2, (n - w) // 2
    if h == w:
        return hu_slice, (slice(None), slice(None))
    padded = np.full((n, n), -1000.0, dtype=np.float64)
    padded[top : top + h, left : left + w] = hu_slice
    return padded, (slice(top, top + h), slice(left, left + w))


def _check_slice(hu_slice: np.ndarray, pixel_mm: float) -> np.ndarray:
    hu_slice = np.asarray(hu_slice)
    if hu_slice.ndim != 2 or min(hu_slice.shape) < 8:
        raise ConfigError(f"The simulator works on one 2-D slice (y, x) of at least 8x8; got shape {hu_slice.shape}.")
    if not np.all(np.isfinite(hu_slice)):
        raise ConfigError("The slice holds NaN or infinite values; it cannot be projected.")
    if not (isinstance(pixel_mm, (int, float)) and math.isfinite(pixel_mm) and pixel_mm > 0):
        raise ConfigError(f"The pixel size must be a positive number of mm; got {pixel_mm!r}.")
    return hu_slice.astype(np.float64)


def forward_project(
    hu_slice: np.ndarray, *, pixel_mm: float, n_views: int = 720, mu_water: float = MU_WATER_PER_MM
) -> np.ndarray:
    """Parallel-beam line integrals of a HU slice (see the module docstring for the geometry).

    Parameters
    ----------
    hu_slice
        2-D slice (y, x) in HU; a non-square slice is padded with air to a square.
    pixel_mm
        Pixel size in mm (square pixels).
    n_views
        Angles evenly spaced over [0, 180) degrees.
    mu_water
        Linear attenuation of water (1/mm).

    Returns
    -------
    numpy.ndarray
        Sinogram ``(detector bins, n_views)`` of dimensionless line integrals ``p >= 0``.
    """
    from skimage.transform import radon

    square, _ = _square(_check_slice(hu_slice, pixel_mm))
    mu_per_pixel = np.clip(mu_water * (1.0 + square / 1000.0), 0.0, None) * pixel_mm
    sinogram = radon(mu_per_pixel, theta=_angles(n_views), circle=False, preserve_range=True)
    return np.clip(sinogram, 0.0, None)


def projection_noise_variance(
    sinogram: np.ndarray, *, dose: float, i0: float, electronic_noise: float = 0.0
) -> np.ndarray:
    """Variance of the projection noise to insert to go from full dose to dose ``dose``.

    ``(1/a - 1) exp(p) / I0 + (1/a^2 - 1) sigma_e^2 exp(2p) / I0^2``, with ``exp(p)`` capped
    so that the expected low-dose count ``a I0 exp(-p)`` stays >= 1 photon.
    """
    p_max = math.log(max(dose * i0, 1.0 + 1e-9))
    attenuation = np.exp(np.minimum(sinogram, p_max))
    quantum = (1.0 / dose - 1.0) * attenuation / i0
    electronic = (1.0 / dose**2 - 1.0) * electronic_noise**2 * attenuation**2 / i0**2
    return quantum + electronic


def _as_generator(seed: int | np.random.Generator | np.random.SeedSequence | None) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(seed)


def simulate_low_dose(
    hu_slice: np.ndarray,
    *,
    pixel_mm: float,
    dose: float = 0.25,
    i0: float = 2.0e6,
    electronic_noise: float = 3.0,
    filter: str = "cosine",
    n_views: int = 720,
    mu_water: float = MU_WATER_PER_MM,
    seed: int | np.random.Generator | np.random.SeedSequence | None = 0,
    sinogram: np.ndarray | None = None,
) -> np.ndarray:
    """A simulated low-dose version of a normal-dose slice (``LD = ND + FBP(noise)``).

    Parameters
    ----------
    hu_slice
        2-D normal-dose slice (y, x) in HU.
    pixel_mm
        Pixel size in mm (from the volume's spacing).
    dose, i0, electronic_noise, filter, n_views, mu_water
        See :class:`SimulationOptions`.
    seed
        Seed, ``SeedSequence`` or ``Generator`` of the noise; the same seed gives the same slice.
    sinogram
        :func:`forward_project` of this slice with the same ``pixel_mm``, ``n_views`` and
        ``mu_water``, to reuse it for several doses.

    Returns
    -------
    numpy.ndarray
        float32 slice of the input's shape in HU (not clipped: noise may go below -1000).
    """
    from skimage.transform import iradon

    _check_physics(
        dose=dose, i0=i0, electronic_noise=electronic_noise, filter=filter, n_views=n_views, mu_water=mu_water
    )
    hu64 = _check_slice(hu_slice, pixel_mm)
    if dose == 1.0:  # nothing to insert: the variance is exactly zero
        return hu64.astype(np.float32)
    if sinogram is None:
        sinogram = forward_project(hu64, pixel_mm=pixel_mm, n_views=n_views, mu_water=mu_water)
    side = max(hu64.shape)
    expected_bins = int(math.ceil(math.sqrt(2) * side))
    if sinogram.ndim != 2 or sinogram.shape[1] != n_views or abs(sinogram.shape[0] - expected_bins) > 1:
        raise ConfigError(
            f"The given sinogram {sinogram.shape} does not match this slice and {n_views} views; "
            "compute it with forward_project(slice, ...) using the same options."
        )
    variance = projection_noise_variance(sinogram, dose=dose, i0=i0, electronic_noise=electronic_noise)
    rng = _as_generator(seed)
    noise = rng.standard_normal(sinogram.shape) * np.sqrt(variance)
    noise_mu = iradon(
        noise,
        theta=_angles(n_views),
        output_size=side,
        filter_name=filter.strip().lower(),
        interpolation="linear",
        circle=False,
        preserve_range=True,
    )
    _, crop = _square(hu64)
    noise_hu = noise_mu[crop] / (pixel_mm * mu_water) * 1000.0
    return (hu64 + noise_hu).astype(np.float32)


def noise_statistics(low_hu: np.ndarray, full_hu: np.ndarray, *, patch: int = CENTRAL_PATCH) -> dict[str, float]:
    """Mean and SD of the inserted noise, over the image and over the central patch."""
    diff = np.asarray(low_hu, dtype=np.float64) - np.asarray(full_hu, dtype=np.float64)
    h, w = diff.shape
    ph, pw = min(patch, h), min(patch, w)
    centre = diff[(h - ph) // 2 : (h - ph) // 2 + ph, (w - pw) // 2 : (w - pw) // 2 + pw]
    return {
        "noise_mean_hu": float(diff.mean()),
        "noise_sd_hu": float(diff.std()),
        "central_noise_sd_hu": float(centre.std()),
    }


# ---------------------------------------------------------------------------------------
# The image's own noise

NOISE_BLOCK = 16
NOISE_HIGH_PASS_SIGMA = 1.5
MATCH_PROBE_DOSE = 0.5  # inserts exactly the full dose's quantum noise variance
MATCH_SLICES = 8
MATCH_MIN_BLOCKS = 8
# How the matched I0 is measured; part of a matched dataset's fingerprint, so a cache made by an
# earlier measurement (revision 1 seeded its probe by dose and seed) is never reused.
MATCH_PROBE = {"revision": 2, "dose": MATCH_PROBE_DOSE, "slices": MATCH_SLICES, "block": NOISE_BLOCK,
               "high_pass_sigma": NOISE_HIGH_PASS_SIGMA}


def block_noise_ratios(full_hu: np.ndarray, noise_hu: np.ndarray, *, pixel_spacing: tuple[float, float],
                       window: tuple[float, float] = (-160.0, 240.0)) -> np.ndarray:
    """``var(HP(full)) / var(HP(noise))`` in every 16 x 16 block of flat soft tissue.

    ``HP`` is the image minus its Gaussian blur (sigma 1.5 px); a block counts when all its
    pixels are soft tissue in :func:`napari_langmamba.anatomy.tissue_map` after a 3-pixel erosion
    (no organ edges) and inside ``window``. Anatomy only adds to ``HP(full)``, so the ratios
    err upwards. Empty when the slice has no such block.
    """
    from scipy.ndimage import binary_erosion, gaussian_filter

    from napari_langmamba.anatomy import SOFT_TISSUE, tissue_map

    full = np.asarray(full_hu, dtype=np.float64)
    noise = np.asarray(noise_hu, dtype=np.float64)
    if full.shape != noise.shape or full.ndim != 2:
        raise ConfigError(f"The image and its noise must be 2-D slices of one shape; got {full.shape} and "
                          f"{noise.shape}.")
    high_full = full - gaussian_filter(full, NOISE_HIGH_PASS_SIGMA)
    high_noise = noise - gaussian_filter(noise, NOISE_HIGH_PASS_SIGMA)
    soft = tissue_map(full, pixel_spacing=pixel_spacing) == SOFT_TISSUE
    soft &= (full > window[0]) & (full < window[1])
    soft = binary_erosion(soft, iterations=3)
    ratios = []
    rows, cols = full.shape
    for r in range(0, rows - NOISE_BLOCK + 1, NOISE_BLOCK):
        for c in range(0, cols - NOISE_BLOCK + 1, NOISE_BLOCK):
            if soft[r:r + NOISE_BLOCK, c:c + NOISE_BLOCK].all():
                v_noise = high_noise[r:r + NOISE_BLOCK, c:c + NOISE_BLOCK].var()
                if v_noise > 0:
                    ratios.append(high_full[r:r + NOISE_BLOCK, c:c + NOISE_BLOCK].var() / v_noise)
    return np.asarray(ratios, dtype=np.float64)


def matched_i0(slices: Sequence[np.ndarray], *, pixel_mm: float, options: SimulationOptions,
               source: str = "the input") -> dict[str, Any]:
    """The ``I0`` at which this model's full-dose noise equals the noise measured in ``slices``.

    Each slice gets the noise of a probe dose of 0.5 at ``options.i0`` without electronic noise
    (its variance is the probe's full-dose quantum variance); the median over all blocks of
    :func:`block_noise_ratios` is ``R = var(image noise) / var(probe noise)``, and the matched
    ``I0`` is ``options.i0 / R`` (quantum variance is proportional to ``1 / I0``).
    """
    physics = {**options.physics(), "dose": MATCH_PROBE_DOSE, "electronic_noise": 0.0}
    ratios = []
    for k, hu in enumerate(slices):
        hu = _check_slice(hu, pixel_mm)
        # a fixed seed: the matched I0 belongs to the input, the same at every dose and seed
        probe = simulate_low_dose(hu, pixel_mm=pixel_mm, **physics, seed=_slice_seed(0, k))
        ratios.append(block_noise_ratios(hu, probe - hu, pixel_spacing=(pixel_mm, pixel_mm)))
    ratios = np.concatenate(ratios) if ratios else np.zeros(0)
    if ratios.size < MATCH_MIN_BLOCKS:
        raise ConfigError(
            f"Cannot measure the noise of {source}: {ratios.size} flat soft-tissue blocks of "
            f"{NOISE_BLOCK}x{NOISE_BLOCK} pixels were found in {len(slices)} slices (at least {MATCH_MIN_BLOCKS} "
            "are needed). Simulate without --match-noise and set --i0 instead."
        )
    ratio = float(np.median(ratios))
    return {"i0": float(options.i0 / ratio), "image_over_probe_noise_variance": ratio,
            "n_blocks": int(ratios.size), "n_slices": len(slices), "probe_i0": float(options.i0),
            "filter": options.filter}


_MATCHED_I0: dict[tuple, dict[str, Any]] = {}  # measurements of this process, by input and probe options


def _probe_indices(n_slices: int) -> list[int]:
    """Up to :data:`MATCH_SLICES` slice indices spread evenly over a volume."""
    count = min(MATCH_SLICES, n_slices)
    return sorted({int(round(x)) for x in np.linspace(0, n_slices - 1, count + 2)[1:-1]}) or [0]


# ---------------------------------------------------------------------------------------
# A dataset


@dataclass(frozen=True)
class _SliceJob:
    index: int
    hu: np.ndarray
    pixel_mm: float
    low_path: str
    full_path: str
    i0: float | None = None  # the input's matched I0 (options.match_noise), else options.i0


def _slice_seed(seed: int, index: int) -> np.random.SeedSequence:
    return np.random.SeedSequence(seed, spawn_key=(index,))


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".npy.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, array, allow_pickle=False)
        replace_atomically(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _simulate_job(job: _SliceJob, options: SimulationOptions) -> dict[str, float]:
    """Worker: simulate one slice, write both files, return its noise statistics."""
    physics = options.physics()
    if job.i0 is not None:
        physics["i0"] = job.i0
    low = simulate_low_dose(job.hu, pixel_mm=job.pixel_mm, **physics, seed=_slice_seed(options.seed, job.index))
    full = np.asarray(job.hu, dtype=np.float32)
    _save_npy_atomic(Path(job.full_path), full)
    _save_npy_atomic(Path(job.low_path), low)
    return noise_statistics(low, full)


def _pixel_mm(spacing: Sequence[float], source: str) -> float:
    dy, dx = float(spacing[1]), float(spacing[2])
    if abs(dy - dx) > 0.01 * max(dy, dx):
        logger.warning(
            "%s has non-square pixels (%.4f x %.4f mm); the simulation uses their geometric mean.", source, dy, dx
        )
    return math.sqrt(dy * dx)


@dataclass
class _Source:
    path: str
    hu_sha256: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    slice_indices: list[int]
    positions_mm: list[float]
    noise_match: dict[str, Any] | None = None


def _read_sources(inputs: Sequence[str | os.PathLike], slice_step: int) -> Iterator[tuple[_Source, Any]]:
    from napari_langmamba.io import read_ct

    for item in inputs:
        volume = read_ct(item)
        if volume.hu.shape[1] < 8 or volume.hu.shape[2] < 8:
            raise ConfigError(f"{item} holds slices of {volume.hu.shape[1:]} pixels; the simulator needs >= 8x8.")
        positions = volume.slice_positions() @ volume.direction[0]
        indices = list(range(0, volume.hu.shape[0], slice_step))
        source = _Source(
            path=str(Path(item).resolve()),
            hu_sha256=hashlib.sha256(np.ascontiguousarray(volume.hu).tobytes()).hexdigest(),
            shape=volume.shape,
            spacing=tuple(float(s) for s in volume.spacing),
            slice_indices=indices,
            positions_mm=[float(positions[k]) for k in indices],
        )
        yield source, volume


def _fingerprint(options: SimulationOptions, sources: list[_Source], slice_step: int) -> str:
    payload = {
        "format": DATASET_FORMAT,
        "version": DATASET_VERSION,
        # without match_noise the fingerprint stays that of datasets made before the option existed
        "options": {k: v for k, v in options_to_dict(options).items() if k != "match_noise" or v},
        "slice_step": slice_step,
        "sources": [(s.hu_sha256, list(s.shape), list(s.spacing)) for s in sources],
    }
    if options.match_noise:
        payload["match_probe"] = MATCH_PROBE
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``dataset.json`` of a simulated-pairs folder (validated minimally)."""
    path = Path(folder) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"{folder} is not a simulated-pairs folder: {MANIFEST_NAME} is missing "
            "(make one with `python -m training simulate`)."
        ) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"Could not read {path}: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != DATASET_FORMAT:
        raise ConfigError(f"{path} is not a {DATASET_FORMAT} manifest.")
    if not isinstance(manifest.get("slices"), list):
        raise ConfigError(f"{path} has no list of slices; re-run `python -m training simulate`.")
    return manifest


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".dataset.", suffix=".json.tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=2)
        replace_atomically(tmp, folder / MANIFEST_NAME)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _package_version() -> str:
    from napari_langmamba import __version__

    return __version__


def _checked_arguments(inputs: Any, slice_step: Any, workers: int | None) -> tuple[list, int]:
    """The inputs as a list and the worker count (``None``: one per CPU); clear errors otherwise."""
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not inputs:
        raise ConfigError("No input CT given to simulate from; pass one or more DICOM folders or volume files.")
    if isinstance(slice_step, bool) or not isinstance(slice_step, int) or slice_step < 1:
        raise ConfigError(f"slice_step must be an integer >= 1; got {slice_step!r}.")
    workers = (os.cpu_count() or 1) if workers is None else int(workers)
    if workers < 1:
        raise ConfigError(f"workers must be >= 1; got {workers}.")
    return inputs, workers


def _existing_dataset(out: Path, fingerprint: str, overwrite: bool) -> dict[str, Any] | None:
    """The manifest of a dataset in ``out`` made from the same inputs and options, else ``None``.

    A dataset made otherwise is removed with ``overwrite`` and refused without; any other
    non-empty folder is refused.
    """
    if not (out / MANIFEST_NAME).is_file():
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise ConfigError(
                f"{out} exists and is not an empty folder or a simulated dataset; choose another output folder."
            )
        return None
    try:
        existing = read_manifest(out)
    except ConfigError:
        existing = None
    if existing is not None and existing.get("fingerprint") == fingerprint:
        return existing
    if not overwrite:
        raise ConfigError(
            f"{out} already holds a simulated dataset made from other inputs or options; "
            "choose another output folder or pass --overwrite to replace it."
        )
    logger.info("Replacing the dataset in %s (other inputs or options).", out)
    for sub in (LOW_DIR, FULL_DIR):
        shutil.rmtree(out / sub, ignore_errors=True)
    (out / MANIFEST_NAME).unlink()
    return None


def _new_manifest(fingerprint: str, options: SimulationOptions, slice_step: int,
                  sources: Sequence[_Source]) -> dict[str, Any]:
    """The manifest of a dataset being made (``complete`` false, no slices yet)."""
    return {
        "format": DATASET_FORMAT,
        "version": DATASET_VERSION,
        "complete": False,
        "fingerprint": fingerprint,
        "package_version": _package_version(),
        "options": options_to_dict(options),
        "slice_step": slice_step,
        "geometry": "parallel-beam, skimage.transform.radon/iradon, detector bin = pixel, circle=False",
        "units": "float32 HU in low/ and full/; low = full + FBP(projection noise)",
        "sources": [
            {"path": s.path, "hu_sha256": s.hu_sha256, "shape": list(s.shape), "spacing_mm": list(s.spacing),
             **({"noise_match": s.noise_match} if s.noise_match else {})}
            for s in sources
        ],
        "slices": [],
    }


def _completed_manifest(manifest: dict[str, Any], plan: list[tuple[int, int]], keys: list[str],
                        sources: Sequence[_Source], stats: dict[str, dict[str, float]]) -> dict[str, Any]:
    """``manifest`` with every slice's record (files, source, position, noise) and the summary."""
    slices = [
        {
            "key": keys[n],
            "low": f"{LOW_DIR}/{keys[n]}.npy",
            "full": f"{FULL_DIR}/{keys[n]}.npy",
            "source": s_idx,
            "slice_index": k,
            "position_mm": sources[s_idx].positions_mm[sources[s_idx].slice_indices.index(k)],
            "pixel_mm": _pixel_mm(sources[s_idx].spacing, sources[s_idx].path),
            **stats[keys[n]],
        }
        for n, (s_idx, k) in enumerate(plan)
    ]
    central = [s["central_noise_sd_hu"] for s in slices]
    whole = [s["noise_sd_hu"] for s in slices]
    summary = {
        "n_slices": len(plan),
        "central_noise_sd_hu_mean": float(np.mean(central)) if central else None,
        "noise_sd_hu_mean": float(np.mean(whole)) if whole else None,
    }
    return {**manifest, "slices": slices, "summary": summary, "complete": True}


def _run_jobs(jobs: list[_SliceJob], options: SimulationOptions,
              workers: int) -> Generator[tuple[_SliceJob, dict[str, float]], None, None]:
    """Simulate ``jobs``, yielding each finished job with its noise statistics."""
    if workers == 1 or len(jobs) <= 1:
        for job in jobs:
            yield job, _simulate_job(job, options)
        return
    # spawn: no fork of a parent that may hold torch/BLAS threads. A sliding window keeps at
    # most 2 slices per worker in flight, so memory does not grow with the dataset.
    context = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context) as pool:
        pending: dict[cf.Future, _SliceJob] = {}
        queue = iter(jobs)
        try:
            while True:
                while len(pending) < 2 * workers:
                    job = next(queue, None)
                    if job is None:
                        break
                    pending[pool.submit(_simulate_job, job, options)] = job
                if not pending:
                    break
                finished, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for future in finished:
                    yield pending.pop(future), future.result()
        except BaseException:
            for future in pending:
                future.cancel()
            raise


def iter_simulate_dataset(
    inputs: Sequence[str | os.PathLike] | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    options: SimulationOptions | None = None,
    workers: int | None = None,
    slice_step: int = 1,
    overwrite: bool = False,
) -> Generator[Progress, None, Path]:
    """Simulate a paired low-/normal-dose dataset folder, yielding progress per slice.

    Parameters
    ----------
    inputs
        CT inputs readable by :func:`napari_langmamba.io.read_ct` (DICOM folders or files,
        NIfTI, ``.npy``); every slice (or every ``slice_step``-th) becomes a pair.
    out_dir
        The dataset folder (created); see the module docstring for its layout.
    options
        Simulation options (defaults when ``None``).
    workers
        Worker processes (``None``: one per CPU; 1 runs in this process).
    slice_step
        Use every ``slice_step``-th slice of each input.
    overwrite
        Replace an existing dataset made with other inputs or options instead of refusing.

    Returns
    -------
    pathlib.Path
        ``out_dir`` (the generator's return value). A complete dataset with the same inputs
        and options is returned without recomputing anything.
    """
    options = options or SimulationOptions()
    inputs, workers = _checked_arguments(inputs, slice_step, workers)
    out = Path(out_dir)

    yield Progress(0, len(inputs), "reading inputs")
    sources: list[_Source] = []
    volumes: list[Any] = []
    for n, (source, volume) in enumerate(_read_sources(inputs, slice_step), start=1):
        sources.append(source)
        volumes.append(volume)
        yield Progress(n, len(inputs), f"read {Path(source.path).name}")
    fingerprint = _fingerprint(options, sources, slice_step)

    # Plan every slice: global index -> (source, slice index).
    plan = [(s_idx, k) for s_idx, source in enumerate(sources) for k in source.slice_indices]
    keys = [f"{n:05d}" for n in range(len(plan))]
    total = len(plan)

    existing = _existing_dataset(out, fingerprint, overwrite)

    def files_of(key: str) -> tuple[Path, Path]:
        return out / LOW_DIR / f"{key}.npy", out / FULL_DIR / f"{key}.npy"

    if existing is not None and existing.get("complete") and all(
        all(p.is_file() for p in files_of(key)) for key in keys
    ):
        logger.info("%s is up to date (same inputs and options); nothing to simulate.", out)
        yield Progress(total, total, "cached")
        return out

    if options.match_noise:
        for n, (source, volume) in enumerate(zip(sources, volumes, strict=True)):
            yield Progress(n, len(sources), f"measuring the noise of {Path(source.path).name}")
            pixel_mm = _pixel_mm(volume.spacing, source.path)
            # the same input at other doses (training's --sim-doses) reuses the measurement
            key = (source.hu_sha256, pixel_mm, options.i0, options.filter, options.n_views, options.mu_water)
            if key not in _MATCHED_I0:
                probes = [volume.hu[k] for k in _probe_indices(volume.hu.shape[0])]
                _MATCHED_I0[key] = matched_i0(probes, pixel_mm=pixel_mm, options=options, source=source.path)
            source.noise_match = dict(_MATCHED_I0[key])
            logger.info("%s: matched I0 %.3g (%d blocks)", source.path, source.noise_match["i0"],
                        source.noise_match["n_blocks"])

    (out / LOW_DIR).mkdir(parents=True, exist_ok=True)
    (out / FULL_DIR).mkdir(parents=True, exist_ok=True)
    manifest = _new_manifest(fingerprint, options, slice_step, sources)
    _write_manifest(out, manifest)

    stats: dict[str, dict[str, float]] = {}
    jobs: list[_SliceJob] = []
    for n, (s_idx, k) in enumerate(plan):
        low_path, full_path = files_of(keys[n])
        if low_path.is_file() and full_path.is_file():  # done by an interrupted earlier run
            stats[keys[n]] = noise_statistics(
                np.load(low_path, allow_pickle=False), np.load(full_path, allow_pickle=False)
            )
            continue
        volume = volumes[s_idx]
        matched = sources[s_idx].noise_match
        jobs.append(_SliceJob(n, volume.hu[k], _pixel_mm(volume.spacing, sources[s_idx].path), str(low_path),
                              str(full_path), i0=matched["i0"] if matched else None))
    done = total - len(jobs)
    if done:
        logger.info("Resuming: %d of %d slices already simulated.", done, total)
    yield Progress(done, total, "simulating")

    for job, job_stats in _run_jobs(jobs, options, workers):
        stats[keys[job.index]] = job_stats
        done += 1
        yield Progress(done, total, f"slice {keys[job.index]}")

    _write_manifest(out, _completed_manifest(manifest, plan, keys, sources, stats))
    return out


# ---------------------------------------------------------------------------------------
# Command line


@dataclass(frozen=True)
class SimulateStageOptions(SimulationOptions):
    """The ``simulate`` stage: :class:`SimulationOptions` plus inputs, output and execution."""

    inputs: tuple[str, ...] = ()
    out: str = ""
    workers: int | None = None
    slice_step: int = 1
    overwrite: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        inputs = (self.inputs,) if isinstance(self.inputs, (str, os.PathLike)) else tuple(self.inputs or ())
        object.__setattr__(self, "inputs", tuple(os.fspath(p) for p in inputs))
        object.__setattr__(self, "out", os.fspath(self.out) if self.out else "")
        if not self.inputs:
            raise ConfigError("simulate needs at least one input CT (--input DICOM folder, NIfTI or .npy).")
        if not self.out:
            raise ConfigError("simulate needs an output folder (--out).")

    def simulation(self) -> SimulationOptions:
        """The :class:`SimulationOptions` part of these options (every field it declares)."""
        return SimulationOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SimulationOptions)})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``simulate`` stage's flags (defaults in :class:`SimulateStageOptions`)."""
    add_config_argument(parser)
    add_option(parser, "--input", "--inputs", "-i", dest="inputs", nargs="+", metavar="PATH",
               help="normal-dose CT: DICOM folder(s) or file(s), NIfTI or .npy (one or more; "
               "config-file key 'inputs')")
    add_option(parser, "--out", "-o", dest="out", metavar="DIR", help="output dataset folder")
    add_option(parser, "--dose", type=float, help="dose fraction of the simulated scan, (0, 1] (default 0.25)")
    add_option(parser, "--i0", type=float, help="incident photons per ray at full dose (default 2e6, calibrated)")
    add_option(parser, "--electronic-noise", dest="electronic_noise", type=float,
               help="electronic noise SD in counts per ray (default 3)")
    add_option(parser, "--filter", choices=FBP_FILTERS, help="FBP filter of the inserted noise (default cosine)")
    add_option(parser, "--n-views", dest="n_views", type=int, help="projection angles over 180 degrees (default 720)")
    add_option(parser, "--mu-water", dest="mu_water", type=float, help="attenuation of water, 1/mm (default 0.019)")
    add_option(parser, "--seed", type=int, help="base random seed (default 0)")
    add_option(parser, "--match-noise", dest="match_noise", action="store_true",
               help="measure I0 from each input's own noise instead of --i0 (sharp kernels; use --filter ramp)")
    add_option(parser, "--workers", type=int, help="worker processes (default: one per CPU)")
    add_option(parser, "--slice-step", dest="slice_step", type=int, help="use every n-th slice (default 1)")
    add_option(parser, "--overwrite", action="store_true",
               help="replace an existing dataset made with other inputs or options")


def main(args: argparse.Namespace) -> int:
    """Run the ``simulate`` stage; returns 0 (errors raise :class:`LangMambaError`)."""
    stage = resolve_options(SimulateStageOptions, args, stage="simulate")
    generator = iter_simulate_dataset(
        stage.inputs,
        stage.out,
        options=stage.simulation(),
        workers=stage.workers,
        slice_step=stage.slice_step,
        overwrite=stage.overwrite,
    )
    from tqdm import tqdm

    with tqdm(total=0, unit="slice", desc="simulate", file=sys.stderr, dynamic_ncols=True) as bar:

        def update(event: Progress) -> None:
            bar.total = event.total
            bar.n = event.done
            bar.set_postfix_str(event.message, refresh=True)

        out = run(generator, update)
    manifest = read_manifest(out)
    summary = manifest.get("summary", {})
    print(
        f"{out}: {summary.get('n_slices')} pairs at dose {stage.dose:g}; inserted noise SD "
        f"{summary.get('central_noise_sd_hu_mean', float('nan')):.1f} HU (central {CENTRAL_PATCH}x{CENTRAL_PATCH}), "
        f"{summary.get('noise_sd_hu_mean', float('nan')):.1f} HU (whole image)"
    )
    return 0
