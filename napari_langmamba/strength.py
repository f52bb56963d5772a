"""Denoising strength: how much of the model's change is kept, as vendor iterative reconstructions offer.

``output = input + strength * (denoised - input)`` with the strength in percent (0-100,
default 100). Readers often want some of the original texture back; this is a post-processing
step on the model's full-strength output, so changing it never runs the model again. GUI-free:
used by the Denoise widget and the ``denoise`` command.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from napari_langmamba.errors import ConfigError

DEFAULT_STRENGTH = 100.0
"""Percent of the model's change kept by default: the model's output as it is."""
DESCRIPTION_MAX = 64  # DICOM LO (SeriesDescription) holds at most 64 characters


def check_strength(percent: Any) -> float:
    """``percent`` as a float in [0, 100]; a :class:`ConfigError` with a plain message otherwise."""
    try:
        value = float(percent)
    except (TypeError, ValueError):
        raise ConfigError(f"The denoising strength is a percentage from 0 to 100; got {percent!r}.") from None
    if not math.isfinite(value) or not 0.0 <= value <= 100.0:
        raise ConfigError(f"The denoising strength is a percentage from 0 to 100; got {percent!r}.")
    return value


def blend(original: Any, denoised: Any, percent: float = DEFAULT_STRENGTH) -> np.ndarray:
    """``original + percent/100 * (denoised - original)`` as float32 HU, same shape as both.

    0 % returns the input exactly and 100 % the model's output exactly (no rounding on the way).
    """
    fraction = check_strength(percent) / 100.0
    original = np.asarray(original, dtype=np.float32)
    denoised = np.asarray(denoised, dtype=np.float32)
    if original.shape != denoised.shape:
        raise ConfigError(
            f"Cannot blend a denoised image of shape {denoised.shape} with an input of shape {original.shape}."
        )
    if fraction == 1.0:
        return denoised.copy()
    if fraction == 0.0:
        return original.copy()
    out = denoised - original
    out *= np.float32(fraction)
    out += original
    return out


def strength_label(percent: float) -> str:
    """How a strength is written in names and descriptions: ``"50%"``."""
    return f"{check_strength(percent):g}%"


def derived_description(original: str | None, info: dict, percent: float = DEFAULT_STRENGTH) -> str:
    """SeriesDescription of a denoised series: the original's, the model and the strength, in 64 characters."""
    model = f"{info.get('kind') or 'model'} {info.get('preset') or ''}".strip()
    note = f"denoised {model} {strength_label(percent)} (LangMamba)"
    original = str(original or "").strip()
    if not original:
        return note[:DESCRIPTION_MAX]
    room = DESCRIPTION_MAX - len(note) - 1
    return f"{original[:room]} {note}" if room > 0 else note[:DESCRIPTION_MAX]
