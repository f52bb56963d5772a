"""``evaluate``: per-slice PSNR / SSIM / FSIM of a denoiser and of the unprocessed low-dose input.

Every slice of a paired dataset (a ``simulate`` folder, a Mayo 2D folder, or a low-dose and a
normal-dose series) is compared with its normal-dose reference on a display window (default
abdomen [-160, 240] HU, data range 1 after windowing; see :mod:`napari_langmamba.metrics`),
for the low-dose input itself (method ``low-dose``) and, when a denoiser is given, for its
output (method ``model`` or the given name). Results are reported as mean +- std over the
slices, as a printed table, a CSV with one row per slice and method, and a JSON file.

The function API takes any ``denoise`` callable mapping a HU volume ``(z, y, x)`` to a HU
volume of the same shape, so it works with a checkpoint loaded by
:func:`load_checkpoint_denoiser` (the command line's path), a classical filter or the
identity.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_langmamba.errors import ConfigError, DependencyError
from napari_langmamba.events import Progress, run
from napari_langmamba.metrics import METRIC_NAMES, evaluate_slice, summarize
from napari_langmamba.windowing import DEFAULT_WINDOW, Window, get_window
from training.config import add_config_argument, add_option, options_to_dict, resolve_options

logger = logging.getLogger(__name__)

Denoise = Callable[[np.ndarray], np.ndarray]
"""HU volume ``(z, y, x)`` -> HU volume of the same shape."""

INPUT_METHOD = "low-dose"
CSV_NAME = "evaluation.csv"
JSON_NAME = "evaluation.json"
_METRIC_LABELS = {"psnr": "PSNR (dB)", "ssim": "SSIM", "fsim": "FSIM"}
_METRIC_DIGITS = {"psnr": 2, "ssim": 4, "fsim": 4}


def load_checkpoint_denoiser(checkpoint: str | os.PathLike, *, device: str = "auto") -> Denoise:
    """The hook that turns a checkpoint (or run folder) into a ``denoise`` callable.

    Wraps :meth:`napari_langmamba.inference.Denoiser.load` (the same loading, tiling and
    device handling the plugin uses) and returns its ``denoise`` method.
    """
    try:
        from napari_langmamba.inference import Denoiser
    except ImportError as exc:  # the inference module or torch missing from the installation
        raise DependencyError(f"Evaluating a checkpoint needs napari_langmamba.inference and torch: {exc}") from exc
    denoiser = Denoiser.load(checkpoint, device=device)
    return denoiser.denoise


# ---------------------------------------------------------------------------------------
# Results


@dataclass
class EvaluationResult:
    """Per-slice metrics of each method, with their summaries and writers."""

    window: Window
    metrics: tuple[str, ...]
    methods: tuple[str, ...]
    rows: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_slices(self) -> int:
        return len({row["key"] for row in self.rows})

    def values(self, method: str, metric: str) -> np.ndarray:
        """The per-slice values of one metric for one method, in slice order."""
        return np.array([row[metric] for row in self.rows if row["method"] == method], dtype=np.float64)

    def summary(self) -> dict[str, dict[str, dict[str, float | int]]]:
        """``{method: {metric: {"mean", "std", "n", "n_infinite", "n_nan"}}}``."""
        return {m: {k: summarize(self.values(m, k)) for k in self.metrics} for m in self.methods}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: non-finite numbers become ``null`` (PSNR of identical slices is infinite)."""
        return _finite_or_none(
            {
                "window": {"name": self.window.name, "lower_hu": self.window.lower, "upper_hu": self.window.upper},
                "data_range": 1.0,
                "metrics": list(self.metrics),
                "methods": list(self.methods),
                "n_slices": self.n_slices,
                "summary": self.summary(),
                "per_slice": self.rows,
                "info": self.info,
            }
        )

    def write_csv(self, path: str | os.PathLike) -> Path:
        """One row per slice and method: ``key, method, <metrics>``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=["key", "method", *self.metrics])
            writer.writeheader()
            for row in self.rows:
                writer.writerow({k: row[k] for k in ("key", "method", *self.metrics)})
        return path

    def write_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False), encoding="utf-8")
        return path

    def format_table(self) -> str:
        """A plain-text table of mean +- std per method and metric."""
        summary = self.summary()
        header = ["method", *(_METRIC_LABELS.get(m, m) for m in self.metrics)]
        lines = [header]
        for method in self.methods:
            cells = [method]
            for metric in self.metrics:
                s = summary[method][metric]
                digits = _METRIC_DIGITS.get(metric, 4)
                cell = f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}" if math.isfinite(s["mean"]) else "n/a"
                if s["n_infinite"]:
                    cell += f" ({s['n_infinite']} identical)"
                cells.append(cell)
            lines.append(cells)
        widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
        title = (
            f"{self.n_slices} slices, window {self.window.name} [{self.window.lower:g}, {self.window.upper:g}] HU, "
            "mean ± std over slices"
        )
        body = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in lines]
        body.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join([title, *body])


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


# ---------------------------------------------------------------------------------------
# Evaluation


def _pairs_of(pairs: Any) -> tuple[int, Callable[[int], tuple[str, np.ndarray, np.ndarray]]]:
    """Length and accessor for a pair source or a sequence of ``(key, low_hu, full_hu)``."""
    if hasattr(pairs, "pair_hu") and hasattr(pairs, "key"):
        return len(pairs), lambda i: (pairs.key(i), *pairs.pair_hu(i))
    items = list(pairs)
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) == 3):
            raise ConfigError("Pairs are a pair source or (key, low_hu, full_hu) triples.")
    return len(items), lambda i: (str(items[i][0]), np.asarray(items[i][1]), np.asarray(items[i][2]))


def _denoise_slice(denoise: Denoise, low_hu: np.ndarray, key: str) -> np.ndarray:
    out = np.asarray(denoise(np.asarray(low_hu, dtype=np.float32)[None]))  # (1, y, x) in, (1, y, x) out
    if out.shape != (1, *low_hu.shape):
        raise ConfigError(
            f"The denoiser returned shape {out.shape} for slice {key!r} of shape (1, {low_hu.shape[0]}, {low_hu.shape[1]})."
        )
    if not np.all(np.isfinite(out)):
        raise ConfigError(f"The denoiser returned NaN or infinite values for slice {key!r}.")
    return out[0]


def iter_evaluate(
    pairs: Any,
    *,
    denoise: Denoise | None = None,
    method_name: str = "model",
    window: str | Window | tuple[float, float] = DEFAULT_WINDOW,
    metrics: Sequence[str] = METRIC_NAMES,
    max_slices: int | None = None,
    info: dict[str, Any] | None = None,
) -> Generator[Progress, None, EvaluationResult]:
    """Evaluate slice by slice, yielding progress; returns an :class:`EvaluationResult`.

    Parameters
    ----------
    pairs
        A pair source (:func:`training.datasets.open_pairs`) or ``(key, low_hu, full_hu)`` triples.
    denoise
        HU ``(z, y, x)`` -> HU callable applied to each low-dose slice (as ``(1, y, x)``);
        ``None`` evaluates the low-dose input only.
    method_name
        The name of the denoiser's rows.
    window
        Metric window (preset name, :class:`Window` or ``(lower, upper)`` HU).
    metrics
        Any of ``psnr``, ``ssim``, ``fsim``.
    max_slices
        Evaluate only the first ``max_slices`` pairs.
    info
        Extra fields recorded in the result (options, data source, checkpoint).
    """
    win = get_window(window)
    names = tuple(m.strip().lower() for m in metrics)
    unknown = [m for m in names if m not in METRIC_NAMES]
    if unknown or not names:
        raise ConfigError(f"Unknown metric(s) {unknown or list(metrics)}; choose from {', '.join(METRIC_NAMES)}.")
    if method_name.strip() in ("", INPUT_METHOD):
        raise ConfigError(f"The denoiser needs a name other than {INPUT_METHOD!r}; got {method_name!r}.")
    n, get = _pairs_of(pairs)
    if max_slices is not None:
        if isinstance(max_slices, bool) or not isinstance(max_slices, int) or max_slices < 1:
            raise ConfigError(f"max_slices must be a positive integer; got {max_slices!r}.")
        n = min(n, max_slices)
    if n == 0:
        raise ConfigError("There are no slice pairs to evaluate.")
    methods = (INPUT_METHOD,) if denoise is None else (INPUT_METHOD, method_name)
    result = EvaluationResult(window=win, metrics=names, methods=methods, info=dict(info or {}))
    yield Progress(0, n, "evaluating")
    for i in range(n):
        key, low, full = get(i)
        low = np.asarray(low, dtype=np.float32)
        full = np.asarray(full, dtype=np.float32)
        if low.shape != full.shape or low.ndim != 2:
            raise ConfigError(f"Pair {key!r}: low-dose {low.shape} and normal-dose {full.shape} are not matching 2-D slices.")
        outputs = {INPUT_METHOD: low}
        if denoise is not None:
            outputs[method_name] = _denoise_slice(denoise, low, key)
        for method, image in outputs.items():
            values = evaluate_slice(image, full, window=win, metrics=names)
            result.rows.append({"key": key, "method": method, **values})
        yield Progress(i + 1, n, f"slice {key}")
    return result


def evaluate_pairs(
    pairs: Any,
    *,
    denoise: Denoise | None = None,
    method_name: str = "model",
    window: str | Window | tuple[float, float] = DEFAULT_WINDOW,
    metrics: Sequence[str] = METRIC_NAMES,
    max_slices: int | None = None,
    info: dict[str, Any] | None = None,
) -> EvaluationResult:
    """:func:`iter_evaluate` run to its end."""
    return run(
        iter_evaluate(
            pairs,
            denoise=denoise,
            method_name=method_name,
            window=window,
            metrics=metrics,
            max_slices=max_slices,
            info=info,
        )
    )


def write_results(result: EvaluationResult, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``evaluation.csv`` and ``evaluation.json`` into ``out_dir``; return their paths."""
    out = Path(out_dir)
    return result.write_csv(out / CSV_NAME), result.write_json(out / JSON_NAME)


# ---------------------------------------------------------------------------------------
# Command line


def _parse_window(value: Any) -> str | tuple[float, float]:
    """A preset name, ``"lower,upper"`` or a 2-sequence of HU limits."""
    if isinstance(value, str) and "," in value:
        parts = value.split(",")
        try:
            if len(parts) != 2:
                raise ValueError
            return (float(parts[0]), float(parts[1]))
        except ValueError:
            raise ConfigError(f"A window is a preset name or 'lower,upper' in HU; got {value!r}.") from None
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return (float(value[0]), float(value[1]))
    return value


@dataclass(frozen=True)
class EvaluateOptions:
    """Options of the ``evaluate`` stage.

    Data: ``data`` (a simulated-pairs or Mayo 2D folder, optional ``split``) or ``low`` and
    ``full`` (two CT series paired by slice position). Model: ``checkpoint`` (a checkpoint
    folder/zip or a training run folder); without it only the low-dose input is evaluated.
    """

    data: str | None = None
    split: str | None = None
    low: str | None = None
    full: str | None = None
    checkpoint: str | None = None
    method_name: str = "model"
    device: str = "auto"
    window: Any = DEFAULT_WINDOW
    metrics: tuple[str, ...] = METRIC_NAMES
    max_slices: int | None = None
    held_out: float = 0.0
    out: str | None = None

    def __post_init__(self) -> None:
        for name in ("data", "low", "full", "checkpoint", "out"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, os.fspath(value))
        window = _parse_window(self.window)
        get_window(window)  # validates
        object.__setattr__(self, "window", window)
        metrics = (self.metrics,) if isinstance(self.metrics, str) else tuple(self.metrics)
        object.__setattr__(self, "metrics", tuple(m.strip().lower() for m in metrics))
        if self.data is None and (self.low is None or self.full is None):
            raise ConfigError("evaluate needs --data FOLDER, or --low and --full CT series.")
        if not 0.0 <= float(self.held_out) < 1.0:
            raise ConfigError(f"--held-out is a fraction in [0, 1); got {self.held_out!r}.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``evaluate`` stage's flags (defaults in :class:`EvaluateOptions`)."""
    add_config_argument(parser)
    add_option(parser, "--data", metavar="DIR", help="paired dataset folder (from simulate, or Mayo 2D layout)")
    add_option(parser, "--split", help="sub-folder of --data, e.g. test")
    add_option(parser, "--low", metavar="PATH", help="low-dose CT (instead of --data; paired with --full by slice position)")
    add_option(parser, "--full", metavar="PATH", help="normal-dose CT paired with --low")
    add_option(parser, "--checkpoint", metavar="PATH",
               help="denoiser checkpoint or training run folder; without it only the low-dose input is evaluated")
    add_option(parser, "--method-name", dest="method_name", help="name of the model's rows (default 'model')")
    add_option(parser, "--device", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    add_option(parser, "--window", help="metric window: preset name or 'lower,upper' HU, e.g. --window=-160,240 (default abdomen)")
    add_option(parser, "--metrics", nargs="+", choices=METRIC_NAMES, help="metrics to compute (default all)")
    add_option(parser, "--max-slices", dest="max_slices", type=int, help="evaluate only the first N pairs")
    add_option(parser, "--held-out", dest="held_out", type=float, metavar="F",
               help="evaluate only the slices a training run with --val-fraction F held out "
                    "(the last ceil(F * n) pairs); 0 = all pairs (default 0)")
    add_option(parser, "--out", "-o", metavar="DIR", help=f"folder for {CSV_NAME} and {JSON_NAME}")


def main(args: argparse.Namespace) -> int:
    """Run the ``evaluate`` stage: print the table, write CSV/JSON when ``--out`` is given."""
    from training.datasets import open_pairs

    options = resolve_options(EvaluateOptions, args, stage="evaluate")
    pairs = open_pairs(options.data, low=options.low, full=options.full, split=options.split)
    if options.held_out > 0:
        from training.common import split_source

        _train, pairs = split_source(pairs, options.held_out)
    denoise = None
    if options.checkpoint is not None:
        denoise = load_checkpoint_denoiser(options.checkpoint, device=options.device)
    from tqdm import tqdm

    with tqdm(total=0, unit="slice", desc="evaluate", file=sys.stderr, dynamic_ncols=True) as bar:

        def update(event: Progress) -> None:
            bar.total = event.total
            bar.n = event.done
            bar.refresh()

        result = run(
            iter_evaluate(
                pairs,
                denoise=denoise,
                method_name=options.method_name,
                window=options.window,
                metrics=options.metrics,
                max_slices=options.max_slices,
                info={"options": options_to_dict(options)},
            ),
            update,
        )
    print(result.format_table())
    if options.out is not None:
        csv_path, json_path = write_results(result, options.out)
        print(f"wrote {csv_path} and {json_path}")
    return 0
