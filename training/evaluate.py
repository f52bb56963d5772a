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
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_langmamba.errors import ConfigError, DependencyError
from napari_langmamba.events import Progress, run
from napari_langmamba.metrics import METRIC_NAMES, evaluate_slice, summarize
from napari_langmamba.windowing import DEFAULT_WINDOW, Window, get_window
from training.common import add_pair_arguments
from training.config import add_config_argument, add_option, options_to_dict, resolve_options
from training.options import BASELINES, EvaluateOptions

logger = logging.getLogger(__name__)

Denoise = Callable[[np.ndarray], np.ndarray]
"""HU volume ``(z, y, x)`` -> HU volume of the same shape."""

INPUT_METHOD = "low-dose"
SELF_ENSEMBLE_SUFFIX = " + self-ensemble"
CSV_NAME = "evaluation.csv"
JSON_NAME = "evaluation.json"
_METRIC_LABELS = {"psnr": "PSNR (dB)", "ssim": "SSIM", "fsim": "FSIM"}
_METRIC_DIGITS = {"psnr": 2, "ssim": 4, "fsim": 4}


def load_checkpoint_denoiser(checkpoint: str | os.PathLike, *, device: str = "auto",
                             self_ensemble: bool = False) -> Denoise:
    """The hook that turns a checkpoint (or run folder) into a ``denoise`` callable.

    Wraps :meth:`napari_langmamba.inference.Denoiser.load` (the same loading, tiling and
    device handling the plugin uses) and returns its ``denoise`` method (averaged over the 8
    flips and rotations of each slice with ``self_ensemble``).
    """
    try:
        from napari_langmamba.inference import Denoiser
    except ImportError as exc:  # the inference module or torch missing from the installation
        raise DependencyError(f"Evaluating a checkpoint needs napari_langmamba.inference and torch: {exc}") from exc
    denoiser = Denoiser.load(checkpoint, device=device)
    if self_ensemble:
        return lambda hu: denoiser.denoise(hu, self_ensemble=True)
    return denoiser.denoise


# ---------------------------------------------------------------------------------------
# Results


_ALL = object()
GROUP_FIELDS = ("patient", "kernel", "dose")  # recorded per row when the pairs say them


def dose_label(dose: float | None) -> str:
    return "dose unknown" if dose is None else f"dose {100 * dose:g}%"


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

    @property
    def doses(self) -> list[float | None]:
        """The low-dose fractions of the evaluated pairs (``[None]`` when unknown)."""
        return sorted({row.get("dose") for row in self.rows}, key=lambda d: (d is None, d))

    def values(self, method: str, metric: str, *, dose: Any = _ALL) -> np.ndarray:
        """The per-slice values of one metric for one method (of one dose), in slice order."""
        return np.array([row[metric] for row in self.rows if row["method"] == method
                         and (dose is _ALL or row.get("dose") == dose)], dtype=np.float64)

    def summary(self, *, dose: Any = _ALL) -> dict[str, dict[str, dict[str, float | int]]]:
        """``{method: {metric: {"mean", "std", "n", "n_infinite", "n_nan"}}}`` (over the slices of ``dose``)."""
        return {m: {k: summarize(self.values(m, k, dose=dose)) for k in self.metrics} for m in self.methods}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: non-finite numbers become ``null`` (PSNR of identical slices is infinite)."""
        doses = self.doses
        return _finite_or_none(
            {
                "window": {"name": self.window.name, "lower_hu": self.window.lower, "upper_hu": self.window.upper},
                "data_range": 1.0,
                "metrics": list(self.metrics),
                "methods": list(self.methods),
                "n_slices": self.n_slices,
                "summary": self.summary(),
                "summary_by_dose": {dose_label(d): self.summary(dose=d) for d in doses} if len(doses) > 1 else None,
                "per_slice": self.rows,
                "info": self.info,
            }
        )

    def write_csv(self, path: str | os.PathLike) -> Path:
        """One row per slice and method: ``key, method, [patient, kernel, dose,] <metrics>``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        groups = [f for f in GROUP_FIELDS if any(f in row for row in self.rows)]
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=["key", "method", *groups, *self.metrics])
            writer.writeheader()
            for row in self.rows:
                writer.writerow({k: row.get(k) for k in ("key", "method", *groups, *self.metrics)})
        return path

    def write_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False), encoding="utf-8")
        return path

    def _table(self, summary: dict, n_slices: int, heading: str) -> list[str]:
        header = ["method", *(_METRIC_LABELS.get(m, m) for m in self.metrics)]
        lines = [f"{heading}{n_slices} slices, window {self.window.name} [{self.window.lower:g}, "
                 f"{self.window.upper:g}] HU, mean ± std over slices", "",
                 "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        for method in self.methods:
            cells = [method]
            for metric in self.metrics:
                s = summary[method][metric]
                digits = _METRIC_DIGITS.get(metric, 4)
                cell = f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}" if math.isfinite(s["mean"]) else "n/a"
                if s["n_infinite"]:
                    cell += f" ({s['n_infinite']} identical)"
                cells.append(cell)
            lines.append("| " + " | ".join(cells) + " |")
        return lines

    def format_table(self) -> str:
        """Markdown: mean ± std per method and metric; one table per dose when the pairs have several."""
        doses = self.doses
        if len(doses) <= 1:
            lines = self._table(self.summary(), self.n_slices, "")
        else:
            lines = []
            for d in doses:
                n = len({row["key"] for row in self.rows if row.get("dose") == d})
                lines += [*self._table(self.summary(dose=d), n, f"{dose_label(d)}: "), ""]
            lines = lines[:-1]
        notes = self.info.get("notes") or []
        return "\n".join([*lines, *([""] + [f"- {note}" for note in notes] if notes else [])])


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


class ByDose:
    """A method whose denoiser depends on the pair's dose (baselines tuned per dose).

    ``denoisers`` maps a dose (or ``None``, the fallback) to a ``denoise`` callable.
    """

    def __init__(self, denoisers: dict[float | None, Denoise]):
        self.denoisers = dict(denoisers)

    def select(self, labels: dict[str, Any]) -> Denoise:
        dose = labels.get("dose")
        return self.denoisers[dose] if dose in self.denoisers else self.denoisers[None]


def iter_evaluate(
    pairs: Any,
    *,
    denoise: Denoise | None = None,
    method_name: str = "model",
    denoisers: dict[str, Denoise | ByDose] | None = None,
    window: str | Window | tuple[float, float] = DEFAULT_WINDOW,
    metrics: Sequence[str] = METRIC_NAMES,
    max_slices: int | None = None,
    info: dict[str, Any] | None = None,
) -> Generator[Progress, None, EvaluationResult]:
    """Evaluate slice by slice, yielding progress; returns an :class:`EvaluationResult`.

    Parameters
    ----------
    pairs
        A pair source (:func:`training.datasets.open_pairs`, a :class:`~training.datasets.PairSet`,
        whose patient, kernel and dose go into each row) or ``(key, low_hu, full_hu)`` triples.
    denoise
        HU ``(z, y, x)`` -> HU callable applied to each low-dose slice (as ``(1, y, x)``);
        ``None`` evaluates the low-dose input only.
    method_name
        The name of the denoiser's rows.
    denoisers
        More methods, ``{name: denoise or ByDose}``, evaluated after ``denoise`` in this order.
    window
        Metric window (preset name, :class:`Window` or ``(lower, upper)`` HU).
    metrics
        Any of ``psnr``, ``ssim``, ``fsim``.
    max_slices
        Evaluate only the first ``max_slices`` pairs.
    info
        Extra fields recorded in the result (options, data source, checkpoint); the seconds
        each method took per slice are added as ``seconds_per_slice``.
    """
    win = get_window(window)
    names = tuple(m.strip().lower() for m in metrics)
    unknown = [m for m in names if m not in METRIC_NAMES]
    if unknown or not names:
        raise ConfigError(f"Unknown metric(s) {unknown or list(metrics)}; choose from {', '.join(METRIC_NAMES)}.")
    methods: dict[str, Denoise | ByDose] = {} if denoise is None else {method_name: denoise}
    for name, fn in (denoisers or {}).items():
        if name in methods:
            raise ConfigError(f"Two methods are called {name!r}; give each model its own label.")
        methods[name] = fn
    for name in methods:
        if name.strip() in ("", INPUT_METHOD):
            raise ConfigError(f"The denoiser needs a name other than {INPUT_METHOD!r}; got {name!r}.")
    n, get = _pairs_of(pairs)
    if max_slices is not None:
        if isinstance(max_slices, bool) or not isinstance(max_slices, int) or max_slices < 1:
            raise ConfigError(f"max_slices must be a positive integer; got {max_slices!r}.")
        n = min(n, max_slices)
    if n == 0:
        raise ConfigError("There are no slice pairs to evaluate.")
    labels_of = getattr(pairs, "info", None)
    result = EvaluationResult(window=win, metrics=names, methods=(INPUT_METHOD, *methods), info=dict(info or {}))
    seconds = dict.fromkeys(methods, 0.0)
    yield Progress(0, n, "evaluating")
    for i in range(n):
        key, low, full = get(i)
        low = np.asarray(low, dtype=np.float32)
        full = np.asarray(full, dtype=np.float32)
        if low.shape != full.shape or low.ndim != 2:
            raise ConfigError(f"Pair {key!r}: low-dose {low.shape} and normal-dose {full.shape} are not matching 2-D slices.")
        labels = {k: v for k, v in labels_of(i).items() if k in GROUP_FIELDS} if labels_of is not None else {}
        outputs = {INPUT_METHOD: low}
        for name, fn in methods.items():
            start = time.perf_counter()
            outputs[name] = _denoise_slice(fn.select(labels) if isinstance(fn, ByDose) else fn, low, key)
            seconds[name] += time.perf_counter() - start
        for method, image in outputs.items():
            values = evaluate_slice(image, full, window=win, metrics=names)
            result.rows.append({"key": key, "method": method, **labels, **values})
        yield Progress(i + 1, n, f"slice {key}")
    result.info["seconds_per_slice"] = {name: total / n for name, total in seconds.items()}
    return result


def evaluate_pairs(
    pairs: Any,
    *,
    denoise: Denoise | None = None,
    method_name: str = "model",
    denoisers: dict[str, Denoise | ByDose] | None = None,
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
            denoisers=denoisers,
            window=window,
            metrics=metrics,
            max_slices=max_slices,
            info=info,
        )
    )


# ---------------------------------------------------------------------------------------
# Classical baselines, tuned on training patients

NLM_SETTINGS = {"patch_size": 5, "patch_distance": 6, "fast_mode": True}
"""scikit-image non-local means search settings (fast enough for 512 x 512 slices on a CPU)."""
BM3D_SETTINGS = {"profile": "np", "search_window": 25, "step": 4}
"""bm3d package: its normal profile with a smaller search window and step (about 3x faster)."""
BASELINE_GRIDS: dict[str, tuple[dict[str, float], ...]] = {
    # Gaussian smoothing: sigma in pixels.
    "gaussian": tuple({"sigma_px": s} for s in (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5)),
    # NLM: h a multiple of the slice's estimated noise SD (sigma = the estimate), or h = sigma fixed in HU.
    "nlm": tuple({"h_factor": f} for f in (0.6, 0.8, 1.0, 1.2, 1.5, 2.0, 3.0))
    + tuple({"h_hu": h} for h in (20.0, 30.0, 40.0, 55.0, 70.0)),
    # BM3D: the noise SD it assumes, a multiple of the slice's estimated noise SD (noise of any
    # level, e.g. a sharp kernel's) or fixed in HU.
    # (the wavelet estimate sees little of a smooth kernel's correlated noise, hence factors to 6)
    "bm3d": tuple({"sigma_factor": f} for f in (0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0))
    + tuple({"sigma_hu": s} for s in (20.0, 35.0, 50.0, 70.0, 100.0)),
}


def _bm3d_module() -> Any:
    try:
        import bm3d
    except ImportError as exc:
        raise DependencyError(
            "BM3D needs the `bm3d` package: pip install 'napari-langmamba[baselines]' (or pip install bm3d)."
        ) from exc
    return bm3d


def baseline_available(name: str) -> str | None:
    """``None`` when baseline ``name`` can run here, else why not."""
    if name == "bm3d":
        try:
            _bm3d_module()
        except DependencyError as exc:
            return str(exc)
    return None


def _filter_slice(name: str, params: dict[str, float], hu: np.ndarray) -> np.ndarray:
    image = np.asarray(hu, dtype=np.float64)
    if name == "gaussian":
        from scipy import ndimage

        return ndimage.gaussian_filter(image, sigma=float(params["sigma_px"]))
    if name == "nlm":
        from skimage.restoration import denoise_nl_means, estimate_sigma

        if "h_factor" in params:
            sigma = float(estimate_sigma(image))
            h = float(params["h_factor"]) * sigma
        else:
            sigma = h = float(params["h_hu"])
        return denoise_nl_means(image, h=h, sigma=sigma, preserve_range=True, **NLM_SETTINGS)
    if name == "bm3d":
        bm3d = _bm3d_module()
        profile = bm3d.BM3DProfile()
        profile.search_window_ht = profile.search_window_wiener = BM3D_SETTINGS["search_window"]
        profile.step_ht = profile.step_wiener = BM3D_SETTINGS["step"]
        if "sigma_factor" in params:
            from skimage.restoration import estimate_sigma

            sigma = float(params["sigma_factor"]) * float(estimate_sigma(image))
        else:
            sigma = float(params["sigma_hu"])
        scale = 1000.0  # HU -> about unit range; BM3D is linear in the scale of image and sigma
        return np.asarray(bm3d.bm3d(image / scale, sigma_psd=sigma / scale, profile=profile)) * scale
    raise ConfigError(f"Unknown baseline {name!r}; choose from {', '.join(BASELINES)}.")


def baseline_denoiser(name: str, params: dict[str, float]) -> Denoise:
    """A ``denoise`` callable (HU ``(z, y, x)`` -> HU) applying baseline ``name`` with ``params`` slice by slice."""
    if name not in BASELINES:
        raise ConfigError(f"Unknown baseline {name!r}; choose from {', '.join(BASELINES)}.")

    def denoise(hu: np.ndarray) -> np.ndarray:
        volume = np.asarray(hu, dtype=np.float32)
        return np.stack([_filter_slice(name, params, s) for s in volume]).astype(np.float32)

    return denoise


def _spread(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (all when ``k >= n``)."""
    return list(range(n)) if k >= n else sorted({int(round(x)) for x in np.linspace(0, n - 1, k)})


def tune_baseline(
    name: str,
    pairs: Any,
    *,
    window: str | Window | tuple[float, float] = DEFAULT_WINDOW,
    max_slices: int = 4,
    grid: Sequence[dict[str, float]] | None = None,
) -> dict[str, Any]:
    """The grid point of baseline ``name`` with the best mean PSNR (on ``window``) over a few of ``pairs``.

    ``pairs`` must come from training patients only (never from those evaluated). Returns
    ``{"params", "psnr", "grid": [{"params", "psnr"}], "keys", "seconds_per_slice"}``.
    """
    from napari_langmamba.metrics import psnr

    n, get = _pairs_of(pairs)
    if n == 0:
        raise ConfigError(f"No pairs to tune {name} on.")
    picked = [get(i) for i in _spread(n, max_slices)]
    scores, seconds = [], 0.0
    for params in grid or BASELINE_GRIDS[name]:
        values = []
        for _key, low, full in picked:
            start = time.perf_counter()
            out = _filter_slice(name, params, low)
            seconds += time.perf_counter() - start
            values.append(psnr(out, full, window))
        scores.append({"params": dict(params), "psnr": float(np.mean(values))})
    best = max(scores, key=lambda s: s["psnr"])
    return {"params": best["params"], "psnr": best["psnr"], "grid": scores, "keys": [p[0] for p in picked],
            "seconds_per_slice": seconds / (len(scores) * len(picked))}


def write_results(result: EvaluationResult, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``evaluation.csv`` and ``evaluation.json`` into ``out_dir``; return their paths."""
    out = Path(out_dir)
    return result.write_csv(out / CSV_NAME), result.write_json(out / JSON_NAME)


# ---------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``evaluate`` stage's flags (defaults in :class:`EvaluateOptions`)."""
    add_config_argument(parser)
    add_option(parser, "--data", metavar="DIR", help="paired dataset folder (from simulate, or Mayo 2D layout)")
    add_option(parser, "--split", help="sub-folder of --data, e.g. test")
    add_pair_arguments(parser, evaluate=True)
    add_option(parser, "--checkpoint", metavar="PATH",
               help="denoiser checkpoint or training run folder; without it only the low-dose input is evaluated")
    add_option(parser, "--method-name", dest="method_name", help="name of the --checkpoint's rows (default 'model')")
    add_option(parser, "--weights", nargs="+", action="extend", metavar="[LABEL=]PATH",
               help="more model checkpoints (or run folders) to compare, each with its label; repeatable")
    add_option(parser, "--self-ensemble", dest="self_ensemble", action="store_true",
               help=f"also evaluate each model averaged over the 8 flips and rotations of every slice, as rows "
                    f"'LABEL{SELF_ENSEMBLE_SUFFIX}' (8 times the model's time)")
    add_option(parser, "--baselines", nargs="+", metavar="NAME",
               help=f"classical filters to compare, e.g. gaussian,nlm,bm3d ({', '.join(BASELINES)}); their "
                    "parameters are tuned by a small grid (best PSNR on the window) on --tune-patients")
    add_option(parser, "--tune-patients", dest="tune_patients", nargs="+", metavar="ID",
               help="training patients whose pairs tune the baselines (never the evaluated ones), e.g. L096,L143,L286")
    add_option(parser, "--tune-slices", dest="tune_slices", type=int, metavar="N",
               help="slices (spread over the tuning pairs, per dose) each grid point is scored on (default 4)")
    add_option(parser, "--tuned", metavar="JSON",
               help="reuse the baseline parameters of an earlier evaluation.json instead of tuning")
    add_option(parser, "--device", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    add_option(parser, "--window", help="metric window: preset name or 'lower,upper' HU, e.g. --window=-160,240 (default abdomen)")
    add_option(parser, "--metrics", nargs="+", choices=METRIC_NAMES, help="metrics to compute (default all)")
    add_option(parser, "--max-slices", dest="max_slices", type=int, help="evaluate only the first N pairs")
    add_option(parser, "--held-out", dest="held_out", type=float, metavar="F",
               help="evaluate only the slices a training run with --val-fraction F held out "
                    "(the last ceil(F * n) pairs); 0 = all pairs (default 0)")
    add_option(parser, "--out", "-o", metavar="DIR", help=f"folder for {CSV_NAME} and {JSON_NAME}")


def _model_label(spec: str) -> tuple[str, str]:
    """``(label, path)`` of a ``--weights`` value (``LABEL=PATH`` or a path named after its folder)."""
    if "=" in spec and not Path(spec).exists():
        label, _, path = spec.partition("=")
        return label.strip(), path
    path = Path(spec)
    label = f"{path.parent.name}/{path.name}" if path.name in ("best", "last") and path.parent.name else path.name
    return label or spec, spec


def _doses_of(pairs: Any) -> list[float | None]:
    labels = getattr(pairs, "info", None)
    if labels is None:
        return [None]
    return sorted({labels(i)["dose"] for i in range(len(pairs))}, key=lambda d: (d is None, d))


def _of_dose(pairs: Any, dose: float | None) -> Any:
    """The pairs of ``pairs`` at ``dose`` (all of them when none or when they carry no doses)."""
    from training.common import SubsetSource

    if not hasattr(pairs, "info"):
        return pairs
    indices = [i for i in range(len(pairs)) if pairs.info(i)["dose"] == dose]
    return SubsetSource(pairs, indices) if indices else pairs


def _read_tuned(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return data["info"]["baselines"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--tuned {path}: not an evaluation.json with tuned baselines ({exc}).") from exc


def _baseline_methods(options: EvaluateOptions, tune_pairs: Any, eval_doses: list[float | None],
                      window: Any) -> tuple[dict[str, ByDose], dict[str, Any], list[str]]:
    """The baselines' denoisers (per dose), their record (parameters, grid, scores) and notes for the table."""
    methods: dict[str, ByDose] = {}
    record: dict[str, Any] = {}
    notes: list[str] = []
    previous = _read_tuned(options.tuned) if options.tuned else None
    for name in options.baselines:
        why = baseline_available(name)
        if why is not None:
            record[name] = {"status": "unavailable", "reason": why}
            notes.append(f"{name}: not evaluated, {why}")
            continue
        by_dose: dict[str, Any] = {}
        denoisers: dict[float | None, Denoise] = {}
        for dose in eval_doses:
            label = dose_label(dose)
            if previous is not None:
                stored = (previous.get(name) or {}).get("by_dose") or {}
                if not stored:
                    raise ConfigError(f"--tuned {options.tuned} has no parameters for {name}.")
                tuned = stored.get(label) or next(iter(stored.values()))
            else:
                logger.info("tuning %s for %s on patients %s", name, label, ", ".join(options.tune_patients))
                tuned = tune_baseline(name, _of_dose(tune_pairs, dose), window=window, max_slices=options.tune_slices)
            by_dose[label] = tuned
            denoisers[dose] = baseline_denoiser(name, tuned["params"])
        denoisers.setdefault(None, next(iter(denoisers.values())))
        methods[name] = ByDose(denoisers)
        settings = {"nlm": NLM_SETTINGS, "bm3d": BM3D_SETTINGS}.get(name, {})
        record[name] = {"status": "ok", "by_dose": by_dose, "grid": [dict(g) for g in BASELINE_GRIDS[name]],
                        "settings": settings, "tune_patients": list(options.tune_patients),
                        "tuned_from": options.tuned}
        params = "; ".join(f"{lbl}: {_params_text(t['params'])}" for lbl, t in by_dose.items())
        notes.append(f"{name}: {params} (tuned on {', '.join(options.tune_patients) or options.tuned})")
    return methods, record, notes


def _params_text(params: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in params.items())


def main(args: argparse.Namespace) -> int:
    """Run the ``evaluate`` stage: print the table, write CSV/JSON when ``--out`` is given."""
    from training.common import split_source
    from training.datasets import pair_summary

    options = resolve_options(EvaluateOptions, args, stage="evaluate")
    everything = options.collect(() if options.data is None else (options.data,), split=options.split)
    pairs = everything
    if options.val_patients:
        pairs = everything.select(options.val_patients)
    elif options.tune_patients:
        pairs = everything.select(options.tune_patients, exclude=True)
    if options.held_out > 0:
        _train, pairs = split_source(pairs, options.held_out)
    if pairs is None or not len(pairs):
        raise ConfigError("No pairs are left to evaluate.")
    window = options.window
    tune_pairs = everything.select(options.tune_patients) if options.tune_patients else None
    baselines, baseline_record, notes = _baseline_methods(options, tune_pairs, _doses_of(pairs), window) \
        if options.baselines else ({}, {}, [])
    models: dict[str, Denoise | ByDose] = {}
    model_paths: dict[str, str] = {}
    specs = ([f"{options.method_name}={options.checkpoint}"] if options.checkpoint is not None else []) + \
        list(options.weights)
    for spec in specs:
        label, path = _model_label(spec)
        models[label] = load_checkpoint_denoiser(path, device=options.device)
        model_paths[label] = path
        if options.self_ensemble:
            models[label + SELF_ENSEMBLE_SUFFIX] = load_checkpoint_denoiser(path, device=options.device,
                                                                            self_ensemble=True)
            model_paths[label + SELF_ENSEMBLE_SUFFIX] = path
    info = {"options": options_to_dict(options), "data": pair_summary(pairs),
            "baselines": baseline_record, "models": model_paths,
            "notes": notes}
    from tqdm import tqdm

    with tqdm(total=0, unit="slice", desc="evaluate", file=sys.stderr, dynamic_ncols=True) as bar:

        def update(event: Progress) -> None:
            bar.total = event.total
            bar.n = event.done
            bar.refresh()

        result = run(
            iter_evaluate(
                pairs,
                denoisers={**baselines, **models},
                window=window,
                metrics=options.metrics,
                max_slices=options.max_slices,
                info=info,
            ),
            update,
        )
    print(result.format_table())
    seconds = result.info["seconds_per_slice"]
    if seconds:
        print("\nseconds per slice: " + ", ".join(f"{m} {t:.2f}" for m, t in seconds.items()))
    if options.out is not None:
        csv_path, json_path = write_results(result, options.out)
        print(f"wrote {csv_path} and {json_path}")
    return 0
