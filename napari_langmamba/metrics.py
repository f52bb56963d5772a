"""Image-quality metrics on a display window: PSNR, SSIM and FSIM.

All three compare a test image with a reference after both pass through the same HU
window (``windowing.get_window(...).apply``: HU -> ``[0, 1]`` with clipping), so the data
range is 1. This is the convention of the LDCT denoising literature (LEDA, LangMamba):
metrics on the abdominal window [-160, 240] HU, per slice, reported as mean +- std.

- **PSNR** -- :func:`skimage.metrics.peak_signal_noise_ratio`, data range 1. Identical
  images give ``+inf``; :func:`summarize` averages the finite values and counts the
  infinite ones.
- **SSIM** -- :func:`skimage.metrics.structural_similarity` with the convention of Wang
  et al. (2004) used by LDCT papers: an 11x11 Gaussian window with sigma 1.5
  (``gaussian_weights=True, sigma=1.5``; scikit-image truncates at 3.5 sigma, radius 5),
  population covariances (``use_sample_covariance=False``), K1 = 0.01, K2 = 0.03,
  data range 1. The mean is taken over the valid interior of the image (scikit-image
  crops the window radius from every border).
- **FSIM** -- grayscale FSIM of Zhang et al. (2011), written here in NumPy/SciPy after the
  authors' MATLAB reference (``FeatureSIM.m`` with Kovesi's ``phasecong2``): the images
  are scaled to 0-255 (the constants are defined on that scale), averaged and subsampled
  by ``F = max(1, round(min(h, w) / 256))``, phase congruency from log-Gabor filters
  (4 scales, 4 orientations, minimum wavelength 6, factor 2, sigma_f 0.55,
  dtheta/sigma 1.2, noise threshold k = 2), gradient magnitude from the Scharr kernel,
  T1 = 0.85 and T2 = 160. ``tests/test_metrics.py`` checks it against the independent
  implementation of the ``piq`` package.

Nothing here imports torch, Qt or napari.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from napari_langmamba.errors import ConfigError
from napari_langmamba.windowing import DEFAULT_WINDOW, Window, get_window

logger = logging.getLogger(__name__)

WindowLike = str | Window | tuple[float, float]

METRIC_NAMES: tuple[str, ...] = ("psnr", "ssim", "fsim")

# SSIM settings (Wang et al. 2004; the LDCT literature's convention), see the module docstring.
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03

# FSIM settings (Zhang et al. 2011, FeatureSIM.m / phasecong2.m).
FSIM_T1 = 0.85
FSIM_T2 = 160.0
PC_SCALES = 4
PC_ORIENTATIONS = 4
PC_MIN_WAVELENGTH = 6.0
PC_MULT = 2.0
PC_SIGMA_ON_F = 0.55
PC_DTHETA_ON_SIGMA = 1.2
PC_NOISE_K = 2.0
PC_EPSILON = 1e-4
# Scharr derivative kernel of FeatureSIM.m; its transpose gives the other direction.
_SCHARR_X = np.array([[3.0, 0.0, -3.0], [10.0, 0.0, -10.0], [3.0, 0.0, -3.0]]) / 16.0


# ---------------------------------------------------------------------------------------
# Inputs


def _pair_2d(x: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x)
    ref = np.asarray(ref)
    if x.ndim != 2 or ref.ndim != 2:
        raise ConfigError(
            f"Slice metrics compare two 2-D images (y, x); got shapes {x.shape} and {ref.shape}. "
            "Use evaluate_volume for (z, y, x) volumes."
        )
    if x.shape != ref.shape:
        raise ConfigError(f"The image and its reference differ in shape: {x.shape} vs {ref.shape}.")
    return x, ref


def _windowed(x_hu: np.ndarray, ref_hu: np.ndarray, window: WindowLike) -> tuple[np.ndarray, np.ndarray]:
    x_hu, ref_hu = _pair_2d(x_hu, ref_hu)
    win = get_window(window)
    return win.apply(x_hu).astype(np.float64), win.apply(ref_hu).astype(np.float64)


# ---------------------------------------------------------------------------------------
# PSNR and SSIM (scikit-image)


def psnr_unit(x: np.ndarray, ref: np.ndarray) -> float:
    """PSNR in dB of two images already in ``[0, 1]`` (data range 1); ``inf`` if identical."""
    x, ref = _pair_2d(x, ref)
    with np.errstate(divide="ignore"):
        return float(peak_signal_noise_ratio(ref.astype(np.float64), x.astype(np.float64), data_range=1.0))


def ssim_unit(x: np.ndarray, ref: np.ndarray) -> float:
    """SSIM of two images already in ``[0, 1]`` (11x11 Gaussian, sigma 1.5, K1 0.01, K2 0.03)."""
    x, ref = _pair_2d(x, ref)
    if min(x.shape) < 11:
        raise ConfigError(f"SSIM needs images of at least 11x11 pixels (its window); got {x.shape}.")
    return float(
        structural_similarity(
            ref.astype(np.float64),
            x.astype(np.float64),
            data_range=1.0,
            gaussian_weights=True,
            sigma=SSIM_SIGMA,
            use_sample_covariance=False,
            K1=SSIM_K1,
            K2=SSIM_K2,
        )
    )


def psnr(x_hu: np.ndarray, ref_hu: np.ndarray, window: WindowLike = DEFAULT_WINDOW) -> float:
    """PSNR (dB) of a slice against its reference on a display window (data range 1).

    Parameters
    ----------
    x_hu, ref_hu
        2-D slices in HU, same shape.
    window
        Preset name, :class:`~napari_langmamba.windowing.Window` or ``(lower, upper)`` HU.

    Returns
    -------
    float
        ``10 log10(1 / MSE)`` of the windowed images; ``inf`` when they are identical.
    """
    return psnr_unit(*_windowed(x_hu, ref_hu, window))


def ssim(x_hu: np.ndarray, ref_hu: np.ndarray, window: WindowLike = DEFAULT_WINDOW) -> float:
    """SSIM of a slice against its reference on a display window (see the module docstring)."""
    return ssim_unit(*_windowed(x_hu, ref_hu, window))


def fsim(x_hu: np.ndarray, ref_hu: np.ndarray, window: WindowLike = DEFAULT_WINDOW) -> float:
    """Grayscale FSIM of a slice against its reference on a display window.

    Returns 1 for identical images. FSIM is undefined when neither image has any feature
    (both flat after windowing): then the result is 1 if they are equal and ``nan`` otherwise.
    """
    return fsim_unit(*_windowed(x_hu, ref_hu, window))


# ---------------------------------------------------------------------------------------
# FSIM (Zhang et al. 2011)


def _average_downsample(image: np.ndarray, factor: int) -> np.ndarray:
    """``conv2(image, ones(F)/F^2, 'same')`` subsampled ``(1:F:end)``, as in FeatureSIM.m."""
    if factor == 1:
        return image
    before = (factor - 1) // 2  # MATLAB's 'same' alignment of an F x F kernel
    after = factor - 1 - before
    padded = np.pad(image, ((before, after), (before, after)))
    h, w = image.shape
    total = np.zeros_like(image)
    for dy in range(factor):
        for dx in range(factor):
            total += padded[dy : dy + h, dx : dx + w]
    return (total / factor**2)[::factor, ::factor]


def _centred_frequencies(n: int) -> np.ndarray:
    """Normalised frequency coordinates in ``[-0.5, 0.5]`` as Kovesi builds them."""
    if n % 2:
        return np.arange(-(n - 1) / 2, (n - 1) / 2 + 1) / (n - 1)
    return np.arange(-n / 2, n / 2) / n


@functools.lru_cache(maxsize=8)
def _log_gabor_bank(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The frequency-domain filters of phasecong2 for one image size.

    Returns ``filters`` (orientations, scales, rows, cols), their spatial (real) kernels scaled
    by ``sqrt(rows * cols)`` with the same shape, and the mean squared filter value at the
    smallest scale per orientation (for the noise estimate). Cached: every slice of a series
    has the same size.
    """
    x, y = np.meshgrid(_centred_frequencies(cols), _centred_frequencies(rows))
    radius = np.fft.ifftshift(np.sqrt(x**2 + y**2))
    theta = np.fft.ifftshift(np.arctan2(-y, x))
    # A low-pass (Butterworth, cutoff 0.45, order 15) keeps the corners of the FFT out,
    # which otherwise upset the phase-congruency normalisation.
    lowpass = 1.0 / (1.0 + (radius / 0.45) ** (2 * 15))
    radius[0, 0] = 1.0  # avoid log(0); the DC value of every filter is zeroed below
    sin_t, cos_t = np.sin(theta), np.cos(theta)

    radial = []
    for s in range(PC_SCALES):
        f0 = 1.0 / (PC_MIN_WAVELENGTH * PC_MULT**s)
        g = np.exp(-(np.log(radius / f0) ** 2) / (2 * math.log(PC_SIGMA_ON_F) ** 2)) * lowpass
        g[0, 0] = 0.0
        radial.append(g)

    theta_sigma = math.pi / PC_ORIENTATIONS / PC_DTHETA_ON_SIGMA
    filters = np.empty((PC_ORIENTATIONS, PC_SCALES, rows, cols))
    for o in range(PC_ORIENTATIONS):
        angle = o * math.pi / PC_ORIENTATIONS
        # Angular distance via atan2 of sine/cosine differences avoids the wrap-around.
        ds = sin_t * math.cos(angle) - cos_t * math.sin(angle)
        dc = cos_t * math.cos(angle) + sin_t * math.sin(angle)
        spread = np.exp(-(np.abs(np.arctan2(ds, dc)) ** 2) / (2 * theta_sigma**2))
        for s in range(PC_SCALES):
            filters[o, s] = radial[s] * spread
    spatial = np.real(np.fft.ifft2(filters, axes=(-2, -1))) * math.sqrt(rows * cols)
    em_n = np.sum(filters[:, 0] ** 2, axis=(-2, -1))
    for array in (filters, spatial, em_n):
        array.setflags(write=False)
    return filters, spatial, em_n


def phase_congruency(image: np.ndarray) -> np.ndarray:
    """Phase congruency map (Kovesi's PC_2 measure, ``phasecong2`` of FeatureSIM.m).

    Parameters
    ----------
    image
        2-D grayscale image (any scale; FSIM passes 0-255).

    Returns
    -------
    numpy.ndarray
        Float64 map of the image's shape, about ``[0, 1]``; 0 where no filter responds.
    """
    image = np.asarray(image, dtype=np.float64)
    rows, cols = image.shape
    filters, spatial, em_n = _log_gabor_bank(rows, cols)
    spectrum = np.fft.fft2(image)
    # eo: (orientations, scales, rows, cols) complex; real = even, imag = odd responses.
    eo = np.fft.ifft2(spectrum[None, None] * filters, axes=(-2, -1))
    even, odd = eo.real, eo.imag
    amplitude = np.abs(eo)

    sum_e = even.sum(axis=1)  # (orientations, rows, cols)
    sum_o = odd.sum(axis=1)
    x_energy = np.sqrt(sum_e**2 + sum_o**2) + PC_EPSILON
    mean_e = (sum_e / x_energy)[:, None]
    mean_o = (sum_o / x_energy)[:, None]
    # An * (cos(phase deviation) - |sin(phase deviation)|), summed over scales.
    energy = np.sum(even * mean_e + odd * mean_o - np.abs(even * mean_o - odd * mean_e), axis=1)

    # Noise compensation: the smallest scale's squared response is Rayleigh/chi-square
    # distributed under Gaussian noise; its median gives the noise power robustly.
    median_e2n = np.median((amplitude[:, 0] ** 2).reshape(PC_ORIENTATIONS, -1), axis=1)
    mean_e2n = -median_e2n / math.log(0.5)
    noise_power = mean_e2n / em_n
    sum_an2 = np.sum(spatial**2, axis=(1, 2, 3))
    sum_ai_aj = np.zeros(PC_ORIENTATIONS)
    for si in range(PC_SCALES - 1):
        for sj in range(si + 1, PC_SCALES):
            sum_ai_aj += np.sum(spatial[:, si] * spatial[:, sj], axis=(-2, -1))
    noise_energy2 = 2 * noise_power * sum_an2 + 4 * noise_power * sum_ai_aj
    tau = np.sqrt(noise_energy2 / 2)  # Rayleigh parameter
    threshold = tau * math.sqrt(math.pi / 2) + PC_NOISE_K * np.sqrt((2 - math.pi / 2) * tau**2)
    threshold = threshold / 1.7  # Kovesi's empirical rescaling for the PC_2 measure
    energy = np.maximum(energy - threshold[:, None, None], 0.0)

    energy_all = energy.sum(axis=0)
    amplitude_all = amplitude.sum(axis=(0, 1))
    return np.divide(energy_all, amplitude_all, out=np.zeros_like(energy_all), where=amplitude_all > 0)


def _gradient_magnitude(image: np.ndarray) -> np.ndarray:
    gx = ndimage.convolve(image, _SCHARR_X, mode="constant", cval=0.0)
    gy = ndimage.convolve(image, _SCHARR_X.T, mode="constant", cval=0.0)
    return np.sqrt(gx**2 + gy**2)


def fsim_unit(x: np.ndarray, ref: np.ndarray) -> float:
    """Grayscale FSIM of two images already in ``[0, 1]`` (see the module docstring)."""
    x, ref = _pair_2d(x, ref)
    if min(x.shape) < 3:
        raise ConfigError(f"FSIM needs images of at least 3x3 pixels; got {x.shape}.")
    a = np.asarray(ref, dtype=np.float64) * 255.0
    b = np.asarray(x, dtype=np.float64) * 255.0
    factor = max(1, round(min(a.shape) / 256))
    a = _average_downsample(a, factor)
    b = _average_downsample(b, factor)

    pc_a, pc_b = phase_congruency(a), phase_congruency(b)
    g_a, g_b = _gradient_magnitude(a), _gradient_magnitude(b)
    s_pc = (2 * pc_a * pc_b + FSIM_T1) / (pc_a**2 + pc_b**2 + FSIM_T1)
    s_g = (2 * g_a * g_b + FSIM_T2) / (g_a**2 + g_b**2 + FSIM_T2)
    pc_max = np.maximum(pc_a, pc_b)
    weight = pc_max.sum()
    if weight <= 0:
        return 1.0 if np.array_equal(a, b) else float("nan")
    return float(np.sum(s_pc * s_g * pc_max) / weight)


# ---------------------------------------------------------------------------------------
# Volumes

_UNIT_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "psnr": psnr_unit,
    "ssim": ssim_unit,
    "fsim": fsim_unit,
}


def _check_metric_names(metrics: Sequence[str]) -> tuple[str, ...]:
    names = tuple(m.strip().lower() for m in metrics)
    unknown = [m for m in names if m not in _UNIT_METRICS]
    if unknown or not names:
        raise ConfigError(f"Unknown metric(s) {unknown or list(metrics)}; choose from {', '.join(METRIC_NAMES)}.")
    return names


def evaluate_slice(
    x_hu: np.ndarray,
    ref_hu: np.ndarray,
    *,
    window: WindowLike = DEFAULT_WINDOW,
    metrics: Sequence[str] = METRIC_NAMES,
) -> dict[str, float]:
    """The chosen metrics of one slice against its reference (windowed once)."""
    x, ref = _windowed(x_hu, ref_hu, window)
    return {name: _UNIT_METRICS[name](x, ref) for name in _check_metric_names(metrics)}


def summarize(values: Sequence[float] | np.ndarray) -> dict[str, float | int]:
    """Mean and (population) std of per-slice values.

    Infinite values (PSNR of identical slices) and NaN (FSIM of two different featureless
    slices) are left out of mean and std and counted in ``n_infinite`` / ``n_nan``.
    """
    arr = np.asarray(values, dtype=np.float64).ravel()
    finite = arr[np.isfinite(arr)]
    return {
        "mean": float(finite.mean()) if finite.size else float("nan"),
        "std": float(finite.std()) if finite.size else float("nan"),
        "n": int(arr.size),
        "n_infinite": int(np.isinf(arr).sum()),
        "n_nan": int(np.isnan(arr).sum()),
    }


def evaluate_volume(
    pred_hu: np.ndarray,
    ref_hu: np.ndarray,
    window: WindowLike = DEFAULT_WINDOW,
    *,
    metrics: Sequence[str] = METRIC_NAMES,
) -> dict[str, dict]:
    """Per-slice metrics of a (z, y, x) volume (or one (y, x) slice) against its reference.

    Returns
    -------
    dict
        ``{metric: {"per_slice": ndarray (z,), "mean": float, "std": float, "n": int,
        "n_infinite": int, "n_nan": int}}`` for each metric (see :func:`summarize`).
    """
    pred_hu = np.asarray(pred_hu)
    ref_hu = np.asarray(ref_hu)
    if pred_hu.shape != ref_hu.shape:
        raise ConfigError(f"The volume and its reference differ in shape: {pred_hu.shape} vs {ref_hu.shape}.")
    if pred_hu.ndim == 2:
        pred_hu, ref_hu = pred_hu[None], ref_hu[None]
    if pred_hu.ndim != 3:
        raise ConfigError(f"Expected a (z, y, x) volume or a (y, x) slice; got shape {pred_hu.shape}.")
    names = _check_metric_names(metrics)
    per_slice = {name: np.empty(pred_hu.shape[0]) for name in names}
    for k in range(pred_hu.shape[0]):
        values = evaluate_slice(pred_hu[k], ref_hu[k], window=window, metrics=names)
        for name in names:
            per_slice[name][k] = values[name]
    return {name: {"per_slice": per_slice[name], **summarize(per_slice[name])} for name in names}
