"""HU display windows and the model's intensity normalisation — the only place for both.

A display window (width W, level L) maps HU to grey levels over ``[L - W/2, L + W/2]``;
it never changes the data (in napari it sets ``contrast_limits``). The model normalisation
clips HU to ``[-1000, 2000]`` and scales to ``[0, 1]``; its inverse maps back to HU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from napari_langmamba.errors import ConfigError


@dataclass(frozen=True)
class Window:
    """A display window in HU given by its width and level (centre)."""

    width: float
    level: float
    name: str = "custom"

    def __post_init__(self) -> None:
        if not np.isfinite(self.width) or not np.isfinite(self.level) or self.width <= 0:
            raise ConfigError(
                f"A window needs a positive, finite width and a finite level; "
                f"got width {self.width} and level {self.level}."
            )

    @property
    def lower(self) -> float:
        return self.level - self.width / 2

    @property
    def upper(self) -> float:
        return self.level + self.width / 2

    @property
    def limits(self) -> tuple[float, float]:
        """``(lower, upper)`` in HU, the napari ``contrast_limits`` of this window."""
        return (self.lower, self.upper)

    @classmethod
    def from_limits(cls, lower: float, upper: float, name: str = "custom") -> Window:
        if not upper > lower:
            raise ConfigError(f"A window's upper limit must exceed its lower one; got [{lower}, {upper}].")
        return cls(width=upper - lower, level=(upper + lower) / 2, name=name)

    def apply(self, hu: np.ndarray) -> np.ndarray:
        """Map HU to ``[0, 1]`` through this window (clipping outside), as float32."""
        out = (np.asarray(hu, dtype=np.float32) - np.float32(self.lower)) / np.float32(self.width)
        return np.clip(out, 0.0, 1.0)


PRESETS: dict[str, Window] = {
    w.name: w
    for w in (
        Window(400, 40, "abdomen"),
        Window(150, 90, "liver"),
        Window(1500, -600, "lung"),
        Window(1800, 400, "bone"),
        Window(80, 40, "brain"),
        Window(350, 50, "mediastinum"),
    )
}
DEFAULT_WINDOW = "abdomen"


def get_window(name_or_window: str | Window | tuple[float, float]) -> Window:
    """A preset by name, a :class:`Window` as is, or ``(lower, upper)`` HU limits."""
    if isinstance(name_or_window, Window):
        return name_or_window
    if isinstance(name_or_window, str):
        key = name_or_window.strip().lower()
        if key not in PRESETS:
            raise ConfigError(
                f"Unknown window {name_or_window!r}; choose one of {', '.join(PRESETS)} "
                f"or give (lower, upper) limits in HU."
            )
        return PRESETS[key]
    try:
        lower, upper = (float(v) for v in name_or_window)
    except (TypeError, ValueError):
        raise ConfigError(f"A window is a preset name or (lower, upper) in HU; got {name_or_window!r}.") from None
    return Window.from_limits(lower, upper)


@dataclass(frozen=True)
class Normalization:
    """Model input scaling: HU clipped to ``[hu_min, hu_max]`` mapped linearly to ``[0, 1]``."""

    hu_min: float = -1000.0
    hu_max: float = 2000.0

    def __post_init__(self) -> None:
        if not (np.isfinite(self.hu_min) and np.isfinite(self.hu_max) and self.hu_max > self.hu_min):
            raise ConfigError(
                f"Normalisation needs finite hu_min < hu_max; got [{self.hu_min}, {self.hu_max}]."
            )

    def to_model(self, hu):
        """HU -> ``[0, 1]``; works on NumPy arrays and torch tensors alike."""
        scaled = (hu - self.hu_min) / (self.hu_max - self.hu_min)
        return scaled.clip(0.0, 1.0)

    def to_hu(self, norm):
        """``[0, 1]`` -> HU (no clipping: the model may step slightly outside)."""
        return norm * (self.hu_max - self.hu_min) + self.hu_min

    def to_dict(self) -> dict:
        return {"hu_min": float(self.hu_min), "hu_max": float(self.hu_max)}

    @classmethod
    def from_dict(cls, data: dict) -> Normalization:
        try:
            return cls(hu_min=float(data["hu_min"]), hu_max=float(data["hu_max"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"A normalisation needs numeric 'hu_min' and 'hu_max'; got {data!r}.") from exc


MODEL_NORMALIZATION = Normalization()
