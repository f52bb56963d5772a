"""Read a training run folder while it is being written, without torch or Qt.

The Train dock widget runs ``python -m training <stage>`` in a separate process and follows
its run folder (layout and record format: :mod:`training.runs`). It polls often, from the GUI
thread, so reading must be cheap and must not import torch (importing ``training.runs`` costs
seconds): :class:`MetricsTail` reads only the bytes appended to ``metrics.jsonl`` since the
previous poll and, like :func:`training.runs.read_metrics`, never trusts a last line without
its newline (a write cut short). The file names below are those of :mod:`training.runs`; a
test checks that they agree, and that both readers give the same records.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "BEST",
    "CONFIG_FILE",
    "LAST",
    "METRICS_FILE",
    "STATE_JSON",
    "SUMMARY_FILE",
    "MetricsTail",
    "MetricsUpdate",
    "RunInfo",
    "TqdmProgress",
    "best_checkpoint",
    "holds_run",
    "inspect_run",
    "parse_tqdm_progress",
    "read_json_object",
]

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
LAST = "last"
BEST = "best"
STATE_JSON = "training_state.json"
MODEL_CONFIG = "config.json"  # a checkpoint folder's config (next to model.safetensors)

MAX_READ_BYTES = 4 << 20
"""At most this much of ``metrics.jsonl`` is parsed per poll, so a huge file never freezes a GUI."""


@dataclass(frozen=True)
class MetricsUpdate:
    """The records appended since the previous poll.

    ``reset`` is True when the file was replaced or shortened (a resumed run rewrites it
    without the records logged after its checkpoint): ``records`` then holds the whole new
    file and whatever was read before must be discarded.
    """

    records: list[dict] = field(default_factory=list)
    reset: bool = False


class MetricsTail:
    """Incremental reader of a growing ``metrics.jsonl``.

    Parameters
    ----------
    path
        The ``metrics.jsonl`` file, or the run folder holding it. It may not exist yet.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        self.path = path if path.suffix == ".jsonl" and not path.is_dir() else path / METRICS_FILE
        self._offset = 0
        self._identity: tuple[int, int] | None = None
        self._line_number = 0

    @property
    def offset(self) -> int:
        """Bytes of the file consumed so far (always at a line boundary)."""
        return self._offset

    def poll(self) -> MetricsUpdate:
        """Read the complete lines appended since the last call."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            reset = self._offset > 0
            self._forget()
            return MetricsUpdate([], reset)
        identity = (stat.st_dev, stat.st_ino)
        reset = False
        if self._identity is not None and (identity != self._identity or stat.st_size < self._offset):
            reset = True  # replaced (atomic rewrite on resume) or truncated: start over
            self._forget()
        self._identity = identity
        if stat.st_size <= self._offset:
            return MetricsUpdate([], reset)
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                chunk = fh.read(MAX_READ_BYTES)
        except OSError as exc:
            logger.warning("could not read %s: %s", self.path, exc)
            return MetricsUpdate([], reset)
        end = chunk.rfind(b"\n")
        if end < 0:
            # Only a torn (or still being written) line; a single line longer than the read
            # limit is not a metrics record: skip it rather than stall forever.
            if len(chunk) >= MAX_READ_BYTES:
                logger.warning("%s holds a line longer than %d bytes; skipped", self.path, MAX_READ_BYTES)
                self._offset += len(chunk)
            return MetricsUpdate([], reset)
        complete = chunk[: end + 1]
        self._offset += len(complete)
        return MetricsUpdate(self._parse(complete), reset)

    def _forget(self) -> None:
        self._offset = 0
        self._identity = None
        self._line_number = 0

    def _parse(self, data: bytes) -> list[dict]:
        records: list[dict] = []
        for raw in data.split(b"\n")[:-1]:  # the piece after the last newline is empty
            self._line_number += 1
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                logger.warning("%s line %d is not valid JSON; skipped", self.path, self._line_number)
                continue
            if isinstance(record, dict):
                records.append(record)
            else:
                logger.warning("%s line %d is not a JSON object; skipped", self.path, self._line_number)
        return records


def read_json_object(path: str | os.PathLike) -> dict:
    """A JSON file holding an object, or ``{}`` when it is absent, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def holds_run(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` already holds a training run (what a new run must not overwrite).

    The same rule as ``training.runs.RunFolder.holds_run``: a run has trained once it logged
    metrics or wrote ``last/``; a ``config.json`` alone (a run that failed while loading its
    data) does not count, and the trainer simply rewrites it.
    """
    folder = Path(folder)
    return (folder / METRICS_FILE).exists() or (folder / LAST).exists()


def best_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The run's ``best/`` checkpoint, else its ``last/`` one, else ``None``."""
    folder = Path(folder)
    for name in (BEST, LAST):
        if (folder / name / MODEL_CONFIG).is_file():
            return folder / name
    return None


@dataclass(frozen=True)
class RunInfo:
    """What a run folder holds, as far as the Train widget needs to know.

    ``stage`` comes from ``config.json``; ``status`` (``completed``, ``stopped``, ``failed``),
    ``step`` and ``total_steps`` from ``summary.json`` when the last process to use the folder
    ended; ``options`` are the resolved options recorded in ``config.json``.
    """

    path: Path
    exists: bool
    holds_run: bool
    resumable: bool
    stage: str | None = None
    status: str | None = None
    step: int | None = None
    total_steps: int | None = None
    checkpoint: Path | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """One line for the user, e.g. ``"a seed run, stopped at step 40 of 300"``."""
        what = f"a {self.stage} run" if self.stage else "a training run"
        if self.status and self.step is not None:
            of = f" of {self.total_steps}" if self.total_steps else ""
            return f"{what}, {self.status} at step {self.step}{of}"
        return what


def inspect_run(folder: str | os.PathLike) -> RunInfo:
    """Read what :class:`RunInfo` describes from ``folder`` (cheap: a few small JSON files)."""
    folder = Path(folder)
    if not folder.is_dir():
        return RunInfo(path=folder, exists=folder.exists(), holds_run=False, resumable=False)
    config = read_json_object(folder / CONFIG_FILE)
    summary = read_json_object(folder / SUMMARY_FILE)
    options = config.get("options")

    def as_int(value: Any) -> int | None:
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    return RunInfo(
        path=folder,
        exists=True,
        holds_run=holds_run(folder),
        resumable=(folder / LAST / STATE_JSON).is_file(),
        stage=config.get("stage") if isinstance(config.get("stage"), str) else None,
        status=summary.get("status") if isinstance(summary.get("status"), str) else None,
        step=as_int(summary.get("step")),
        total_steps=as_int(summary.get("total_steps")),
        checkpoint=best_checkpoint(folder),
        options=dict(options) if isinstance(options, dict) else {},
    )


@dataclass(frozen=True)
class TqdmProgress:
    """A progress bar line printed by tqdm: ``done`` of ``total``, seconds remaining if known."""

    done: int
    total: int
    eta_s: float | None


_TQDM = re.compile(r"(\d+)/(\d+)\s*\[[^<\]]*<([0-9:?]+)")


def _clock_seconds(text: str) -> float | None:
    parts = text.split(":")
    if not all(p.isdigit() for p in parts):
        return None
    seconds = 0.0
    for p in parts:
        seconds = seconds * 60 + int(p)
    return seconds


def parse_tqdm_progress(text: str) -> TqdmProgress | None:
    """The last tqdm progress in ``text`` (e.g. ``" 40%|####  | 8/20 [00:05<00:07, 1.6it/s]"``).

    The ``simulate``, ``evaluate`` and ``candidates`` stages report progress this way on
    stderr (the training stages log ``step``/``total_steps``/``eta_s`` to ``metrics.jsonl``).
    """
    matches = list(_TQDM.finditer(text))
    if not matches:
        return None
    match = matches[-1]
    done, total = int(match.group(1)), int(match.group(2))
    if total <= 0:
        return None
    return TqdmProgress(done=done, total=total, eta_s=_clock_seconds(match.group(3)))
