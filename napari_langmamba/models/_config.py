"""JSON round trip of the models' frozen config dataclasses (one place for all of them)."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any, TypeVar

from napari_langmamba.errors import ConfigError

C = TypeVar("C")


def config_to_dict(config: Any) -> dict:
    """A JSON-ready dict of a config dataclass (tuples as lists)."""
    data = asdict(config)
    return {key: list(value) if isinstance(value, tuple) else value for key, value in data.items()}


def config_from_dict(cls: type[C], data: Any, *, what: str) -> C:
    """Rebuild ``cls`` from :func:`config_to_dict` output.

    Unknown or missing keys and badly typed values raise :class:`ConfigError` naming ``what``
    (e.g. "LangAE") and the problem, never a bare ``TypeError``/``ValueError``.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"A {what} config is a JSON object; got {type(data).__name__}.")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"Unknown {what} config keys {unknown}; expected a subset of {sorted(known)}.")
    try:
        return cls(**data)
    except TypeError as exc:
        raise ConfigError(f"Incomplete or mistyped {what} config ({exc}); got keys {sorted(data)}.") from exc
    except ValueError as exc:
        raise ConfigError(f"Invalid {what} config: {exc}") from exc


def positive_ints(value: Any, length: int, *, what: str) -> tuple[int, ...]:
    """``value`` as a tuple of ``length`` integers >= 1, else a :class:`ConfigError` naming ``what``."""
    try:
        ints = tuple(int(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{what} must be {length} integers; got {value!r}.") from exc
    if len(ints) != length or any(v < 1 for v in ints):
        raise ConfigError(f"{what} must be {length} positive integers; got {value}.")
    return ints
