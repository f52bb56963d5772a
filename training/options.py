"""The options of every ``python -m training`` stage, importable without torch.

Each stage describes its options once, as a frozen dataclass whose field names are its flags
(``--<name>`` with ``-`` for ``_``, except the few in :data:`FLAGS`) and whose defaults are the
documented defaults; :mod:`training.config` layers a config file and the command line over them.
The stages' modules (which import torch) declare the flags' help texts and run the stage; this
module holds only the options, so the Train widget derives its form's defaults and the flags it
passes from here (:func:`options_class`, :func:`default_of`, :func:`flag_of`) without importing
torch or a stage.

:class:`~training.simulate.SimulateStageOptions` lives with the ``simulate`` stage (which needs no
torch either).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from napari_langmamba.errors import ConfigError
from napari_langmamba.metrics import METRIC_NAMES
from napari_langmamba.models._config import positive_ints
from napari_langmamba.windowing import DEFAULT_WINDOW, get_window

__all__ = [
    "AMP_CHOICES",
    "BACKBONES",
    "BASELINES",
    "DEFAULT_PROMPT",
    "DEFAULT_SIM_DOSES",
    "DEFAULT_THRESHOLDS",
    "FLAGS",
    "PRESET_CHOICES",
    "SCORERS",
    "TRAIN_PARTS",
    "WORD_PARTS",
    "STAGE_OPTIONS",
    "CandidateOptions",
    "EvaluateOptions",
    "LangAEOptions",
    "PairDataOptions",
    "SeedOptions",
    "TrainOptions",
    "default_of",
    "flag_of",
    "options_class",
]

PRESET_CHOICES = ("tiny", "lite", "paper")
AMP_CHOICES = ("auto", "off", "bf16", "fp16")
SCORERS = ("anatomy", "none")
# What a langae run trains: everything, only the word head (quant_conv) or only the decoder side
TRAIN_PARTS = ("all", "words", "region", "decoder")
WORD_PARTS = ("words", "region")
"""The ``--train-part`` choices trained on the semantic loss alone, selected by validation word agreement."""
BALANCE_BY = ("pool", "class")  # what the anatomy prior's --pool-balance counts: pools or majority classes
BACKBONES = ("seed", "redcnn")
BASELINES = ("gaussian", "nlm", "bm3d")
DEFAULT_THRESHOLDS = (0.95, 0.9, 0.8)
DEFAULT_PROMPT = "A CT of {}"
FLAGS: dict[str, dict[str, str]] = {"simulate": {"inputs": "--input"}, "seed": {"langda_weight": "--lambda"}}
"""Per stage, the options whose flag is not ``--<name>`` (their ``--<name>`` is an alias)."""


@dataclass(frozen=True, kw_only=True)
class TrainOptions:
    """Options every model-training stage has (defaults are the documented defaults)."""

    data: tuple[Path, ...] = ()
    output: Path | None = None
    val_data: tuple[Path, ...] = ()
    val_fraction: float = 0.1
    val_max_images: int = 32
    preset: str = "paper"
    epochs: int = 100
    steps_per_epoch: int = 0
    batch_size: int = 4
    patch_size: int = 256
    repeat: int = 1
    workers: int = 0
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    deterministic: bool = False
    window: str = "abdomen"
    log_every: int = 10
    checkpoint_every: int = 500
    resume: bool = False
    progress: bool = True
    stop_at_step: int | None = None
    debug_nan_at_step: int | None = None

    def __post_init__(self) -> None:
        for name in ("data", "val_data"):  # one path or several
            value = getattr(self, name)
            paths = (value,) if isinstance(value, (str, os.PathLike)) else tuple(value or ())
            object.__setattr__(self, name, tuple(Path(os.fspath(p)).expanduser() for p in paths))
        if self.output is not None and not isinstance(self.output, Path):
            object.__setattr__(self, "output", Path(os.fspath(self.output)).expanduser())
        if self.output is None:
            raise ConfigError("--output is required: the run folder to write (config, metrics.jsonl, checkpoints).")
        if self.preset not in PRESET_CHOICES:
            raise ConfigError(f"--preset must be one of {', '.join(PRESET_CHOICES)}; got {self.preset!r}.")
        if self.amp not in AMP_CHOICES:
            raise ConfigError(f"--amp must be one of {', '.join(AMP_CHOICES)}; got {self.amp!r}.")
        positive = ("epochs", "batch_size", "log_every", "val_max_images", "repeat")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(self, name)}.")
        for name in ("steps_per_epoch", "workers", "checkpoint_every", "patch_size"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0; got {getattr(self, name)}.")
        if self.patch_size and self.patch_size % 16:
            raise ConfigError(
                f"--patch-size must be a multiple of 16 (the encoder downsamples by 16); got {self.patch_size}."
            )
        if not 0.0 <= float(self.val_fraction) < 1.0:
            raise ConfigError(f"--val-fraction must be in [0, 1); got {self.val_fraction}.")

    def _optional_paths(self, *names: str) -> None:
        """Make the options ``names`` (a path or None) expanded :class:`~pathlib.Path` objects."""
        for name in names:
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(str(value)).expanduser())


def default_of(cls: type, name: str) -> Any:
    """The default of option ``name`` in options dataclass ``cls`` (for help texts)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.default
    raise KeyError(name)


DEFAULT_SIM_DOSES = (0.05, 0.1, 0.25, 0.5)


def _words(value: Any) -> tuple:
    """A list option from the command line (``A B``), a config file (a list) or ``A,B``."""
    if value is None:
        return ()
    out: list = []
    for v in [value] if isinstance(value, (str, int, float)) else list(value):
        out += [w.strip() for w in v.split(",") if w.strip()] if isinstance(v, str) else [v]
    return tuple(out)


@dataclass(frozen=True, kw_only=True)
class PairDataOptions:
    """Pair inputs and the split by patient, shared by ``seed`` and ``evaluate``.

    ``pairs``: folders of patients (``<patient>/full…`` + ``quarter…`` DICOM series);
    ``low``/``full``: CTs paired in order; ``manifest``: CSV files (low, full, patient[, kernel,
    dose]); ``simulate_from``/``sim_doses``: normal-dose CTs made into simulated pairs at each
    dose (cached in ``sim_cache``); ``val_patients``: the patients whose pairs are the
    validation (evaluation) set.
    """

    pairs: tuple[Path, ...] = ()
    low: tuple[Path, ...] = ()
    full: tuple[Path, ...] = ()
    manifest: tuple[Path, ...] = ()
    simulate_from: tuple[str, ...] = ()
    sim_doses: tuple[float, ...] = DEFAULT_SIM_DOSES
    sim_cache: Path | None = None
    sim_slice_step: int = 1
    sim_filter: str = "cosine"
    sim_match_noise: bool = False
    val_patients: tuple[str, ...] = ()

    def _check_pair_data(self) -> None:
        from training.datasets import parse_dose

        for name in ("pairs", "low", "full", "manifest"):
            paths = getattr(self, name)
            paths = (paths,) if isinstance(paths, (str, os.PathLike)) else tuple(paths or ())
            object.__setattr__(self, name, tuple(Path(os.fspath(p)).expanduser() for p in paths))
        object.__setattr__(self, "simulate_from", tuple(os.fspath(p) for p in _as_tuple(self.simulate_from)))
        object.__setattr__(self, "val_patients", _words(self.val_patients))
        object.__setattr__(self, "sim_doses", tuple(parse_dose(d, where="--sim-doses") for d in _words(self.sim_doses)))
        if self.sim_cache is not None and not isinstance(self.sim_cache, Path):
            object.__setattr__(self, "sim_cache", Path(os.fspath(self.sim_cache)).expanduser())
        if len(self.low) != len(self.full):
            raise ConfigError(f"--low and --full pair up in order: got {len(self.low)} low-dose and "
                              f"{len(self.full)} normal-dose CTs.")
        if self.simulate_from and not self.sim_doses:
            raise ConfigError("--simulate-from needs at least one dose (--sim-doses 0.05,0.5).")
        if isinstance(self.sim_slice_step, bool) or int(self.sim_slice_step) < 1:
            raise ConfigError(f"--sim-slice-step must be at least 1; got {self.sim_slice_step}.")
        from training.simulate import checked_filter

        object.__setattr__(self, "sim_filter", checked_filter(self.sim_filter, flag="--sim-filter"))
        if not isinstance(self.sim_match_noise, bool):
            raise ConfigError(f"--sim-match-noise is a flag (true or false); got {self.sim_match_noise!r}.")

    def has_pair_inputs(self) -> bool:
        return bool(self.pairs or self.low or self.manifest or self.simulate_from)

    def collect(self, data: Sequence[Path | str] = (), *, split: str | None = None, workers: int = 1) -> Any:
        """All the pair inputs (plus ``data`` folders) as one :class:`training.datasets.PairSet`."""
        from training.datasets import collect_pairs

        return collect_pairs(data=tuple(data), split=split, pairs=self.pairs, low=self.low, full=self.full,
                             manifest=self.manifest, simulate_from=self.simulate_from, sim_doses=self.sim_doses,
                             sim_cache=self.sim_cache, sim_slice_step=self.sim_slice_step, sim_workers=workers,
                             sim_filter=self.sim_filter, sim_match_noise=self.sim_match_noise)


def _as_tuple(value: Any) -> tuple:
    if value is None:
        return ()
    return (value,) if isinstance(value, (str, os.PathLike)) else tuple(value)


@dataclass(frozen=True, kw_only=True)
class LangAEOptions(TrainOptions):
    """Options of ``python -m training langae`` (defaults are the documented defaults)."""

    codebook: str = "words:minilm"
    candidates: Path | None = None
    scorer: str = "anatomy"
    min_share: float = 0.25
    pool_balance: float = 0.0
    balance_by: str = "pool"
    pool_target: str = "uniform"
    init: Path | None = None
    freeze_features: bool = False
    train_part: str = "all"
    region_pixels: bool = False
    region_context: int = 1
    region_head: str = "mlp"
    region_wide: bool = False
    word_choice: str = "nearest"
    tissue_steps: int = 0
    alpha: float = 0.3
    beta: float = 0.3
    gamma: float = 0.1
    eta: float = 0.1
    disc_start: int = 10000
    disc_channels: int = 64
    disc_layers: int = 3
    perceptual_weights: Path | None = None
    base_lr: float = 4.5e-6
    lr: float | None = None
    npy_layout: str = "hu"
    slice_step: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.data:
            raise ConfigError("--data is required: normal-dose CT (DICOM folders, NIfTI, .npy, Mayo or simulate folders).")
        self._optional_paths("candidates", "perceptual_weights", "init")
        if self.scorer not in SCORERS:
            raise ConfigError(
                f"--scorer must be one of {', '.join(SCORERS)}; got {self.scorer!r} (PubMedCLIP pools come from "
                "`python -m training candidates --scorer clip:<dir>`, given here as --candidates)."
            )
        if not 0.0 < float(self.min_share) <= 1.0:
            raise ConfigError(f"--min-share must be in (0, 1]; got {self.min_share}.")
        if int(self.region_context) < 1 or int(self.region_context) % 2 == 0:
            raise ConfigError(f"--region-context must be an odd positive integer (1, 3, 5 ...); got {self.region_context}.")
        if int(self.region_context) != 1 and not self.region_pixels:
            raise ConfigError("--region-context sets the size of the region-pixel head: give --region-pixels too.")
        from napari_langmamba.models.langae import REGION_HEADS

        if self.region_head not in REGION_HEADS:
            raise ConfigError(f"--region-head must be one of {', '.join(REGION_HEADS)}; got {self.region_head!r}.")
        if self.region_head != "mlp" and not self.region_pixels:
            raise ConfigError("--region-head picks the region-pixel head: give --region-pixels too.")
        if self.region_head == "cnn" and int(self.region_context) != 1:
            raise ConfigError("--region-context sizes the MLP head; the CNN head (--region-head cnn) has its own context.")
        from napari_langmamba.models.langae import WORD_CHOICES

        if self.word_choice not in WORD_CHOICES:
            raise ConfigError(f"--word-choice must be one of {', '.join(WORD_CHOICES)}; got {self.word_choice!r}.")
        if (self.region_wide or self.word_choice != "nearest") and not (self.region_pixels and self.region_head == "cnn"):
            raise ConfigError("--region-wide and --word-choice tissue need the CNN region head: give --region-pixels "
                              "--region-head cnn.")
        if self.word_choice == "tissue" and not int(self.tissue_steps) and self.init is None:
            raise ConfigError("--word-choice tissue lets the head's tissue classifier choose the words: train it first "
                              "(--tissue-steps N) or start from a model whose classifier is trained (--init DIR).")
        if int(self.tissue_steps) < 0:
            raise ConfigError(f"--tissue-steps must be 0 or more; got {self.tissue_steps}.")
        if int(self.tissue_steps) and self.region_head != "cnn":
            raise ConfigError("--tissue-steps trains the tissue classifier of the CNN region head: give "
                              "--region-pixels --region-head cnn.")
        if self.train_part not in TRAIN_PARTS:
            raise ConfigError(f"--train-part must be one of {', '.join(TRAIN_PARTS)}; got {self.train_part!r}.")
        if int(self.tissue_steps) and self.train_part == "decoder":
            raise ConfigError("--tissue-steps trains the region head, which --train-part decoder keeps frozen.")
        if self.train_part != "all" and self.init is None:
            raise ConfigError(f"--train-part {self.train_part} fine-tunes part of a trained LangAE: give it with --init DIR.")
        if self.train_part == "region" and not self.region_pixels:
            raise ConfigError("--train-part region trains the region-pixel head alone: give --region-pixels too.")
        if not 0.0 <= float(self.pool_balance) <= 1.0:
            raise ConfigError(f"--pool-balance must be in [0, 1]; got {self.pool_balance}.")
        from napari_langmamba.models.quantizer import POOL_TARGETS

        if self.pool_target not in POOL_TARGETS:
            raise ConfigError(f"--pool-target must be one of {', '.join(POOL_TARGETS)}; got {self.pool_target!r}.")
        if self.balance_by not in BALANCE_BY:
            raise ConfigError(f"--balance-by must be one of {', '.join(BALANCE_BY)}; got {self.balance_by!r}.")
        if self.balance_by == "class" and (float(self.pool_balance) == 0 or self.candidates is not None
                                           or self.scorer != "anatomy"):
            raise ConfigError("--balance-by class weighs the anatomy prior's tissue classes: it needs --pool-balance "
                              "above 0 and the anatomy scorer (no --candidates, --scorer anatomy).")
        for name in ("alpha", "beta", "gamma", "eta", "base_lr"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value >= 0.0):
                raise ConfigError(f"--{name.replace('_', '-')} must be a finite number >= 0; got {value}.")
        if self.lr is not None and not (math.isfinite(float(self.lr)) and float(self.lr) > 0):
            raise ConfigError(f"--lr must be positive; got {self.lr}.")
        if self.disc_start < 0 or self.disc_channels < 1 or self.disc_layers < 1:
            raise ConfigError("--disc-start must be >= 0, --disc-channels and --disc-layers >= 1.")
        if self.npy_layout not in ("hu", "mayo"):
            raise ConfigError(f"--npy-layout must be 'hu' or 'mayo'; got {self.npy_layout!r}.")
        if self.slice_step < 1:
            raise ConfigError(f"--slice-step must be >= 1; got {self.slice_step}.")


def check_noise_scale(value: Any) -> tuple[float, float] | None:
    """``(lo, hi)`` noise factors with ``0 <= lo <= hi`` (finite), or None; else a ConfigError."""
    if value is None:
        return None
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"The noise scale is two numbers LO HI; got {value!r}.") from exc
    if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 <= lo <= hi):
        raise ConfigError(f"The noise scale needs 0 <= LO <= HI (finite); got {lo:g} {hi:g}.")
    return lo, hi


@dataclass(frozen=True, kw_only=True)
class SeedOptions(TrainOptions, PairDataOptions):
    """Options of ``python -m training seed`` (defaults are the documented defaults)."""

    split: str | None = None
    backbone: str = "seed"
    langae: Path | None = None
    init: Path | None = None
    langda_weight: float = 0.1
    lr: float = 1e-4
    lr_min: float = 1e-6
    weight_decay: float = 1e-9
    patch_size: int = 64
    window_weight: float = 0.0
    transplant_noise_onto: tuple[str, ...] = ()
    transplant_slice_step: int = 1
    transplant_variants: int = 2
    noise_scale: tuple[float, float] | None = None
    decoder_channels: tuple[int, int, int, int] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_pair_data()
        if self.decoder_channels is not None:  # refused here, before a run folder is written
            if self.backbone != "seed":
                raise ConfigError("--decoder-channels sets SEED's decoder widths; RED-CNN has no such option.")
            object.__setattr__(self, "decoder_channels",
                               positive_ints(self.decoder_channels, 4, what="--decoder-channels (1/8 -> full)"))
        object.__setattr__(self, "noise_scale", check_noise_scale(self.noise_scale))
        self._optional_paths("langae", "init")
        object.__setattr__(self, "transplant_noise_onto", tuple(os.fspath(p) for p in _as_tuple(self.transplant_noise_onto)))
        for name in ("transplant_slice_step", "transplant_variants"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= 1; got {value!r}.")
        if self.transplant_noise_onto and not self.val_patients:
            raise ConfigError("--transplant-noise-onto needs --val-patients: the noise donors must be training "
                              "pairs only, and the validation patients are left out by name.")
        if not self.data and not self.has_pair_inputs():
            raise ConfigError(
                "Training pairs are required: --pairs FOLDER (<patient>/full…/ + quarter…/ DICOM series), "
                "--data FOLDER (from `python -m training simulate`, or a Mayo 2D root), --low CT --full CT "
                "(series paired by slice position), --manifest CSV, or --simulate-from CT."
            )
        if self.val_patients and self.val_data:
            raise ConfigError("Give either --val-patients or --val-data, not both.")
        if self.backbone not in BACKBONES:
            raise ConfigError(f"--backbone must be one of {', '.join(BACKBONES)}; got {self.backbone!r}.")
        weight = float(self.langda_weight)
        if not (math.isfinite(weight) and weight >= 0):
            raise ConfigError(f"--lambda must be a finite number >= 0; got {self.langda_weight}.")
        if self.langae is None and (self.backbone == "seed" or weight > 0):
            why = "SEED's frozen encoder comes from it" if self.backbone == "seed" else "the LangDA loss uses it"
            raise ConfigError(
                f"--langae CHECKPOINT is required ({why}); train one with `python -m training langae`, "
                "or use --backbone redcnn --lambda 0 for the MSE-only RED-CNN baseline."
            )
        for name in ("lr", "lr_min"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"--{name.replace('_', '-')} must be positive; got {value}.")
        if self.lr_min > self.lr:
            raise ConfigError(f"--lr-min ({self.lr_min}) must not exceed --lr ({self.lr}).")
        if not float(self.weight_decay) >= 0:
            raise ConfigError(f"--weight-decay must be >= 0; got {self.weight_decay}.")
        if not (math.isfinite(float(self.window_weight)) and float(self.window_weight) >= 0):
            raise ConfigError(f"--window-weight must be a finite number >= 0; got {self.window_weight}.")


@dataclass(frozen=True, kw_only=True)
class CandidateOptions:
    """Options of ``python -m training candidates`` (defaults are the documented defaults)."""

    data: tuple[Path, ...] = ()
    output: Path | None = None
    npy_layout: str = "hu"
    slice_step: int = 1
    codebook: str = "words:minilm"
    scorer: str = "lexicon"
    thresholds: tuple[float, float, float] = DEFAULT_THRESHOLDS
    window: str = "abdomen"
    prompt: str = DEFAULT_PROMPT
    lexicon: Path | None = None
    device: str = "auto"
    batch_size: int = 256
    overwrite: bool = False

    def __post_init__(self) -> None:
        data = (self.data,) if isinstance(self.data, (str, os.PathLike)) else tuple(self.data or ())
        object.__setattr__(self, "data", tuple(Path(os.fspath(p)).expanduser() for p in data))
        for name in ("output", "lexicon"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(os.fspath(value)).expanduser())
        if not self.data:
            raise ConfigError("--data is required: the training images (the same --data as stage 1).")
        if self.npy_layout not in ("hu", "mayo"):
            raise ConfigError(f"--npy-layout must be 'hu' or 'mayo'; got {self.npy_layout!r}.")
        if self.slice_step < 1:
            raise ConfigError(f"--slice-step must be >= 1; got {self.slice_step}.")
        if self.output is None:
            raise ConfigError("--output is required: the pools JSON file to write.")
        thresholds = tuple(float(t) for t in self.thresholds)
        if len(thresholds) != 3 or not all(0.0 <= t <= 1.0 for t in thresholds):
            raise ConfigError(f"--thresholds needs three values in [0, 1] (rho_1 rho_2 rho_3); got {self.thresholds}.")
        object.__setattr__(self, "thresholds", thresholds)
        if self.scorer == "anatomy":
            raise ConfigError(
                "--scorer anatomy makes no pools file: its pools are per region and computed while training; it "
                "is the default of `python -m training langae` without --candidates."
            )
        if self.scorer != "lexicon" and not (self.scorer.startswith("clip:") and len(self.scorer) > 5):
            raise ConfigError(f"--scorer must be 'lexicon' or 'clip:<local CLIP folder>'; got {self.scorer!r}.")
        if "{}" not in self.prompt:
            raise ConfigError(f"--prompt must contain '{{}}' where the token goes; got {self.prompt!r}.")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1; got {self.batch_size}.")


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


@dataclass(frozen=True, kw_only=True)
class EvaluateOptions(PairDataOptions):
    """Options of the ``evaluate`` stage.

    Data: ``data`` (a simulated-pairs or Mayo 2D folder, optional ``split``) and/or the pair
    inputs of :class:`PairDataOptions` (``--pairs``, ``--low/--full``,
    ``--manifest``, ``--simulate-from``); ``val_patients`` chooses the patients evaluated.
    Methods: the low-dose input, the ``baselines`` (tuned on ``tune_patients``, or read from
    ``tuned``), and each model: ``checkpoint`` (named ``method_name``) and ``weights``
    (``[LABEL=]PATH``, repeatable), with ``self_ensemble`` also averaged over the 8 flips and
    rotations of each slice.
    """

    data: str | None = None
    split: str | None = None
    checkpoint: str | None = None
    method_name: str = "model"
    weights: tuple[str, ...] = ()
    self_ensemble: bool = False
    baselines: tuple[str, ...] = ()
    tune_patients: tuple[str, ...] = ()
    tune_slices: int = 4
    tuned: str | None = None
    device: str = "auto"
    window: Any = DEFAULT_WINDOW
    metrics: tuple[str, ...] = METRIC_NAMES
    max_slices: int | None = None
    held_out: float = 0.0
    out: str | None = None

    def __post_init__(self) -> None:
        self._check_pair_data()
        for name in ("data", "checkpoint", "out", "tuned"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, os.fspath(value))
        window = _parse_window(self.window)
        get_window(window)  # validates
        object.__setattr__(self, "window", window)
        metrics = (self.metrics,) if isinstance(self.metrics, str) else tuple(self.metrics)
        object.__setattr__(self, "metrics", tuple(m.strip().lower() for m in metrics))
        object.__setattr__(self, "weights", tuple(os.fspath(w) for w in
                                                  ((self.weights,) if isinstance(self.weights, str) else self.weights)))
        object.__setattr__(self, "baselines", tuple(b.lower() for b in _words(self.baselines)))
        object.__setattr__(self, "tune_patients", _words(self.tune_patients))
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown:
            raise ConfigError(f"Unknown baseline(s) {', '.join(unknown)}; choose from {', '.join(BASELINES)}.")
        if self.data is None and not self.has_pair_inputs():
            raise ConfigError("evaluate needs pairs: --data FOLDER, --pairs FOLDER, --low and --full CT series, "
                              "--manifest CSV or --simulate-from CT.")
        if not 0.0 <= float(self.held_out) < 1.0:
            raise ConfigError(f"--held-out is a fraction in [0, 1); got {self.held_out!r}.")
        if self.self_ensemble and self.checkpoint is None and not self.weights:
            raise ConfigError("--self-ensemble averages a model's outputs: give the model with --checkpoint or --weights.")
        if self.baselines and not (self.tune_patients or self.tuned):
            raise ConfigError("--baselines are tuned on training patients: give --tune-patients (e.g. "
                              "L096,L143,L286) or --tuned EVALUATION.json of an earlier run.")
        overlap = sorted(set(self.tune_patients) & set(self.val_patients))
        if overlap:
            raise ConfigError(f"Patient(s) {', '.join(overlap)} are both tuned on and evaluated; tune the baselines "
                              "on training patients only.")
        if isinstance(self.tune_slices, bool) or int(self.tune_slices) < 1:
            raise ConfigError(f"--tune-slices must be at least 1; got {self.tune_slices}.")


# ---------------------------------------------------------------------------------------
# Per stage

STAGE_OPTIONS: dict[str, str] = {
    "simulate": "training.simulate:SimulateStageOptions",
    "candidates": "training.options:CandidateOptions",
    "langae": "training.options:LangAEOptions",
    "seed": "training.options:SeedOptions",
    "evaluate": "training.options:EvaluateOptions",
}
"""Each stage's options dataclass, as ``module:name``."""


def options_class(stage: str) -> type:
    """The options dataclass of ``stage`` (``simulate`` imports its stage module, numpy only)."""
    try:
        module, name = STAGE_OPTIONS[stage].split(":")
    except KeyError:
        raise ConfigError(f"Unknown stage {stage!r}; choose one of {', '.join(STAGE_OPTIONS)}.") from None
    return getattr(importlib.import_module(module), name)


def flag_of(stage: str, name: str) -> str:
    """The command-line flag of option ``name`` of ``stage`` (``--<name>``, ``_`` -> ``-``, or :data:`FLAGS`)."""
    if name not in {f.name for f in dataclasses.fields(options_class(stage))}:
        raise KeyError(f"{stage} has no option {name!r}")
    return FLAGS.get(stage, {}).get(name, "--" + name.replace("_", "-"))
