"""The Train widget's record of a run's metrics and its plot, without Qt.

:func:`ingest_record` reads one ``metrics.jsonl`` record into the loss and validation
histories and the run state (step, total steps, ETA); :func:`draw_history` draws them on
matplotlib axes (losses per step above, validation metrics per epoch below: PSNR on the
left axis, the other metrics on the right).
"""

from __future__ import annotations

import math
from typing import Any

from matplotlib.ticker import MaxNLocator

VALIDATION_SKIP = ("n_images",)
History = dict[str, list[tuple[int, float]]]
"""Per metric name, its ``(step or epoch, value)`` points in order."""


def ingest_record(record: dict, state: Any, loss_history: History, val_history: History) -> None:
    """Add one ``metrics.jsonl`` record to the histories and to ``state`` (a ``TrainingRunState``).

    ``train`` records give losses, step and ETA; ``epoch`` records validation metrics (non-finite
    values, counts and ``*_n_nonfinite`` left out); a ``start``/``resume`` event resets the step.
    """
    kind = record.get("kind")
    step = record.get("step")
    if isinstance(record.get("total_steps"), int) and record["total_steps"] > 0:
        state.total_steps = record["total_steps"]
    if kind == "train" and isinstance(step, int):
        for key, value in (record.get("losses") or {}).items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                loss_history.setdefault(str(key), []).append((step, float(value)))
        state.step = step
        eta = record.get("eta_s")
        state.eta_s = float(eta) if isinstance(eta, (int, float)) else None
    elif kind == "epoch":
        epoch = record.get("epoch")
        for key, value in (record.get("val") or {}).items():
            if key in VALIDATION_SKIP or str(key).endswith("_n_nonfinite"):
                continue
            if isinstance(value, (int, float)) and math.isfinite(value) and isinstance(epoch, int):
                val_history.setdefault(str(key), []).append((epoch, float(value)))
    elif kind == "event" and isinstance(step, int) and record.get("event") in ("start", "resume"):
        state.step = step


def draw_history(ax_loss: Any, ax_val: Any, ax_val2: Any, loss_history: History, val_history: History) -> None:
    """Draw the losses on ``ax_loss`` and the validation metrics on ``ax_val`` / ``ax_val2`` (twin).

    Only losses that are not all zero are drawn (eight at most), on a log axis when they span
    more than a factor 20; an empty history shows a hint instead.
    """
    ax, av, av2 = ax_loss, ax_val, ax_val2
    for a in (ax, av, av2):
        a.cla()
    losses = {k: v for k, v in loss_history.items() if any(y != 0 for _, y in v)}
    for key, points in list(losses.items())[:8]:
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, label=key, lw=1.2)
    values = [y for v in losses.values() for _, y in v]
    if values and min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")  # long runs span decades; a short one reads better on a linear axis
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel("loss", fontsize=8)
    if losses:
        ax.legend(fontsize=7, loc="upper right")
    else:
        ax.text(0.5, 0.5, "Losses appear here once the run logs its first step.", ha="center",
                va="center", fontsize=8, color="0.4", transform=ax.transAxes)
    left = {k: v for k, v in val_history.items() if "psnr" in k}
    right = {k: v for k, v in val_history.items() if "psnr" not in k}
    handles = []
    for axis, series, style in ((av, left, "o-"), (av2, right, "s--")):
        for key, points in series.items():
            xs, ys = zip(*points, strict=True)
            handles += axis.plot(xs, ys, style, label=key, lw=1.0, ms=3)
    av.set_xlabel("epoch", fontsize=8)
    av.set_ylabel("PSNR (dB)" if left else "validation", fontsize=8)
    av2.yaxis.set_label_position("right")
    av2.yaxis.tick_right()
    if right:
        av2.set_ylabel("other metrics", fontsize=8)
    if handles:
        av.legend(handles=handles, fontsize=7, loc="best")
    else:
        av.text(0.5, 0.5, "Validation metrics appear after each epoch.", ha="center", va="center",
                fontsize=8, color="0.4", transform=av.transAxes)
    for a in (ax, av, av2):
        a.tick_params(labelsize=7)
    for a in (ax, av):
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
