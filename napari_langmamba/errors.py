"""The project's error types.

Every error a user can cause (a bad file, a wrong checkpoint, an impossible option)
is raised as a subclass of :class:`LangMambaError` with a message that says what was
expected, what was found and what to do. Widgets turn them into notifications and the
CLI into exit code 2; anything else escaping is a bug.
"""

from __future__ import annotations


class LangMambaError(Exception):
    """Base class of every error the project raises on purpose."""


class CTReadError(LangMambaError):
    """A CT file or folder could not be read (missing, corrupt, unsupported)."""


class SeriesChoiceError(CTReadError):
    """A folder holds several DICOM series and none was chosen.

    ``series`` lists what was found so a caller (or a widget) can offer a choice.
    """

    def __init__(self, message: str, series: list | None = None) -> None:
        super().__init__(message)
        self.series = list(series or [])


class CTWriteError(LangMambaError):
    """A volume could not be written (destination exists, disk error, bad volume)."""


class CheckpointError(LangMambaError):
    """A checkpoint is missing, malformed, unsafe or does not match the model."""


class ConfigError(LangMambaError):
    """An option or configuration value is invalid."""


class DependencyError(LangMambaError):
    """An optional package needed for this input is not installed."""
