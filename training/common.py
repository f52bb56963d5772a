"""Options and set-up shared by the model-training stages (``langae``, ``seed``).

Each stage's options dataclass extends :class:`TrainOptions`; :func:`add_train_arguments`
declares the shared flags (through :func:`training.config.add_option`, so a config file can set
them too) and :func:`start` does the common set-up: process group, device, seeds, logging on
non-zero ranks, and the run folder. :func:`run_stage` wraps a stage's ``main``;
:func:`make_stage_data`, :func:`validation` and :func:`fit_stage` are the parts of a stage's
training function that do not depend on its model.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import math
import os
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from napari_langmamba.errors import ConfigError
from training.config import add_config_argument, add_option, options_to_dict, resolve_options
from training.distributed import DistContext, init_distributed
from training.options import (
    AMP_CHOICES,
    DEFAULT_SIM_DOSES,
    PRESET_CHOICES,
    PairDataOptions,
    TrainOptions,
    default_of,
)
from training.runs import RunFolder, seed_everything
from training.simulate import FBP_FILTERS

logger = logging.getLogger(__name__)

__all__ = [
    "PairDataOptions",
    "StageData",
    "SubsetSource",
    "TrainOptions",
    "add_pair_arguments",
    "add_train_arguments",
    "command_line",
    "crop_to_multiple",
    "default_of",
    "file_sha256",
    "fit_stage",
    "make_stage_data",
    "parse_window",
    "run_stage",
    "sharded_means",
    "split_by_patient",
    "split_source",
    "start",
    "validation",
]



def add_train_arguments(parser: argparse.ArgumentParser, cls: type[TrainOptions]) -> None:
    """Declare the shared flags of :class:`TrainOptions` (with ``cls``'s defaults in the help)."""

    def d(name: str) -> Any:
        return default_of(cls, name)

    add_config_argument(parser)
    data = parser.add_argument_group("data")
    add_option(data, "--val-data", type=Path, nargs="+", metavar="PATH",
               help="validation data in the same layout as --data (default: split off --val-fraction of --data)")
    add_option(data, "--val-fraction", type=float, metavar="F",
               help=f"fraction of the --data slices held out for validation when --val-data is not given "
                    f"(the last ones, in --data order); 0 disables validation (default {d('val_fraction')})")
    add_option(data, "--val-max-images", type=int, metavar="N",
               help=f"validate on at most N slices per epoch (default {d('val_max_images')})")
    add_option(data, "--patch-size", type=int, metavar="PX",
               help=f"train on random PX x PX crops (multiple of 16; 0 = whole slices). Crops make CPU "
                    f"training practical (default {d('patch_size')})")
    add_option(data, "--repeat", type=int, metavar="N",
               help=f"random crops per slice per epoch (default {d('repeat')})")
    add_option(data, "--workers", type=int, metavar="N",
               help=f"data-loading worker processes per training process (default {d('workers')})")

    loop = parser.add_argument_group("training loop")
    add_option(loop, "--output", type=Path, metavar="DIR",
               help="run folder: config.json, metrics.jsonl, last/ and best/ checkpoints, summary.json (required)")
    add_option(loop, "--preset", choices=PRESET_CHOICES,
               help=f"model size: tiny (tests), lite (CPU-friendly), paper (published setting) (default {d('preset')})")
    add_option(loop, "--epochs", type=int, metavar="N", help=f"passes over the training data (default {d('epochs')})")
    add_option(loop, "--steps-per-epoch", type=int, metavar="N",
               help=f"cap each epoch at N optimizer steps (0 = a full pass) (default {d('steps_per_epoch')})")
    add_option(loop, "--batch-size", type=int, metavar="N",
               help=f"images per step and process (default {d('batch_size')})")
    add_option(loop, "--seed", type=int, metavar="N",
               help=f"random seed of initialisation, data order and crops (default {d('seed')})")
    add_option(loop, "--device", metavar="DEV",
               help=f"auto, cpu, cuda or cuda:N; under torchrun each process uses cuda:LOCAL_RANK "
                    f"(default {d('device')})")
    add_option(loop, "--amp", choices=AMP_CHOICES,
               help=f"mixed precision: on CUDA auto (bf16 if supported, else fp16 with loss scaling), off, bf16, "
                    f"fp16; on CPU float32 unless bf16 is given (faster on CPUs with AVX512-BF16/AMX) "
                    f"(default {d('amp')})")
    add_option(loop, "--deterministic", action=argparse.BooleanOptionalAction,
               help="use deterministic algorithms only (slower on CUDA; CPU runs are deterministic anyway) "
                    f"(default {d('deterministic')})")
    add_option(loop, "--window", metavar="NAME",
               help=f"HU window of the validation metrics: a preset name or LOWER,UPPER (default {d('window')})")
    add_option(loop, "--log-every", type=int, metavar="N",
               help=f"write a metrics.jsonl record every N steps (default {d('log_every')})")
    add_option(loop, "--checkpoint-every", type=int, metavar="N",
               help=f"write the last/ checkpoint every N steps, besides every epoch end and on stop "
                    f"(0 = epoch ends only) (default {d('checkpoint_every')})")
    add_option(loop, "--resume", action="store_true",
               help="continue the run in --output exactly where its last/ checkpoint left it (model, "
                    "optimizer, schedule, RNG, position in the epoch); give the same options as the first time")
    add_option(loop, "--progress", action=argparse.BooleanOptionalAction,
               help="show a progress bar on the console (rank 0, terminals only) (default on)")

    debug = parser.add_argument_group("testing hooks")
    add_option(debug, "--stop-at-step", type=int, metavar="N",
               help="stop after step N exactly as SIGTERM would (checkpoint, exit 0); for tests and "
                    "scripted schedules")
    add_option(debug, "--debug-nan-at-step", type=int, metavar="N",
               help="pretend the loss of step N is NaN, to exercise the non-finite-loss guard")


_RUN_CONTROL = ("resume", "stop_at_step", "debug_nan_at_step", "progress")


def command_line(stage: str, options: Any, *, flags: dict[str, str] | None = None) -> str:
    """A command that repeats this training run (recorded in checkpoints).

    Built from the *resolved* options (defaults < config file < flags), so it is complete even
    when a config file or the Python API started the run; options at their default and the
    run-control flags (``--resume``, test hooks) are left out.
    """
    flags = flags or {}
    words = ["python", "-m", "training", stage]
    for f in dataclasses.fields(options):
        if f.name in _RUN_CONTROL:
            continue
        value = getattr(options, f.name)
        if value == f.default or value is None or value == ():
            continue
        flag = flags.get(f.name, "--" + f.name.replace("_", "-"))
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (tuple, list)):
            words += [flag, *(os.fspath(v) if isinstance(v, os.PathLike) else str(v) for v in value)]
        else:
            words += [flag, os.fspath(value) if isinstance(value, os.PathLike) else str(value)]
    return " ".join(shlex.quote(w) for w in words)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, or of a checkpoint folder's ``model.safetensors`` + ``config.json``."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path / "model.safetensors", path / "config.json"] if path.is_dir() else [path]
    for file in files:
        with open(file, "rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _warn_changed_options(before: dict, now: dict) -> None:
    changed = [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(before) | set(now))
               if k not in _RUN_CONTROL and before.get(k) != now.get(k)]
    if changed:
        logger.warning("resuming with options that differ from the run's config.json (%s); the model, optimizer "
                       "and schedule continue from the checkpoint as they were", "; ".join(changed))


def start(options: TrainOptions, *, stage: str, config: dict) -> tuple[DistContext, RunFolder]:
    """Common set-up of a training stage; call at the top of ``main`` and ``shutdown`` at the end.

    Joins torchrun's process group (if any), quiets non-zero ranks, seeds every RNG with
    ``seed + rank``, and prepares the run folder (``config.json``, or checks ``--resume``).
    """
    ctx = init_distributed(options.device)
    if not ctx.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    if options.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    seed_everything(options.seed + ctx.rank)
    run = RunFolder(options.output, stage=stage, is_main=ctx.is_main)
    if ctx.is_main:
        run.prepare(config, resume=options.resume)
        if options.resume:
            _warn_changed_options(run.stored_config().get("options") or {}, config.get("options") or {})
    from training.distributed import barrier

    barrier(ctx)  # other ranks wait until the folder exists (and see errors as a broken group)
    if not ctx.is_main and options.resume and not (run.last_dir / "training_state.json").is_file():
        raise ConfigError(f"--resume: {run.path} holds no resumable checkpoint.")
    logger.info("%s: %s, %d process(es), device %s, run folder %s", stage, "resuming" if options.resume else
                "starting", ctx.world_size, ctx.device, run.path)
    return ctx, run


def run_stage(
    cls: type[TrainOptions],
    args: argparse.Namespace,
    *,
    stage: str,
    train: Callable[[Any, DistContext, RunFolder], int],
    flags: dict[str, str] | None = None,
) -> int:
    """A stage's ``main``: resolve its options, :func:`start`, run ``train(options, ctx, run)``, shut down.

    ``flags`` maps options whose flag is not ``--<name>`` (as for :func:`command_line`).
    """
    options = resolve_options(cls, args, stage=stage)
    config = {"stage": stage, "options": options_to_dict(options),
              "command_line": command_line(stage, options, flags=flags)}
    ctx, run = start(options, stage=stage, config=config)
    try:
        return train(options, ctx, run)
    finally:
        from training.distributed import shutdown

        shutdown(ctx)


def parse_window(text: str) -> str | tuple[float, float]:
    """A ``--window`` value: a preset name, or ``LOWER,UPPER`` in HU."""
    if "," in text:
        lower, _, upper = text.partition(",")
        try:
            return float(lower), float(upper)
        except ValueError as exc:
            raise ConfigError(f"--window {text!r}: use a preset name or LOWER,UPPER in HU.") from exc
    return text


# ----------------------------------------------------------------------------------------------
# data helpers


class SubsetSource:
    """The slices ``indices`` of a pair or slice source of :mod:`training.datasets`."""

    def __init__(self, source: Any, indices: Sequence[int]) -> None:
        self.source = source
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def key(self, index: int) -> str:
        return self.source.key(self.indices[index])

    def pair_hu(self, index: int) -> Any:
        return self.source.pair_hu(self.indices[index])

    def slice_hu(self, index: int) -> Any:
        return self.source.slice_hu(self.indices[index])

    def info(self, index: int) -> dict[str, Any]:
        """The labels of a slice of a :class:`training.datasets.PairSet` (AttributeError for other sources)."""
        return self.source.info(self.indices[index])


def split_source(source: Any, fraction: float) -> tuple[Any, Any | None]:
    """``(train, val)``: the last ``ceil(fraction * n)`` slices are held out (None when 0).

    Holding out the *last* slices (rather than random ones) keeps neighbouring, nearly identical
    slices mostly on one side; a separate ``--val-data`` from other patients is still better.
    """
    n = len(source)
    n_val = math.ceil(fraction * n) if fraction > 0 else 0
    if n_val == 0:
        return source, None
    if n - n_val < 1:
        raise ConfigError(
            f"The data holds {n} slice(s): too few to hold out {fraction:.0%} for validation; give "
            "--val-data or --val-fraction 0."
        )
    return SubsetSource(source, range(n - n_val)), SubsetSource(source, range(n - n_val, n))


def crop_to_multiple(x: torch.Tensor, factor: int = 16) -> torch.Tensor:
    """Central crop of a (..., h, w) tensor to multiples of ``factor``."""
    h, w = x.shape[-2:]
    h2, w2 = h - h % factor, w - w % factor
    if h2 < factor or w2 < factor:
        raise ConfigError(f"A {h} x {w} image is smaller than {factor} x {factor}; it cannot go through the model.")
    top, left = (h - h2) // 2, (w - w2) // 2
    return x[..., top:top + h2, left:left + w2]


def sharded_means(
    dataset: Any,
    measure: Callable[[dict], dict[str, float]],
    *,
    keys: Sequence[str],
    ctx: DistContext,
    max_items: int,
) -> dict[str, float]:
    """Mean of ``measure(item)`` over the first ``max_items`` items, split across ranks.

    Every rank measures its share and the sums are all-reduced, so all ranks return the same
    dict (``keys`` fixes the order; non-finite values are left out of their mean and counted
    in ``<key>_n_nonfinite``).
    """
    from training.distributed import all_reduce_sum, shard_indices

    n = min(len(dataset), max_items)
    sums = torch.zeros(2 * len(keys) + 1, dtype=torch.float64)  # per key: sum, count; then items
    for i in shard_indices(n, ctx):
        values = measure(dataset[i])
        for k, key in enumerate(keys):
            v = float(values[key])
            if math.isfinite(v):
                sums[2 * k] += v
                sums[2 * k + 1] += 1
        sums[-1] += 1
    total = all_reduce_sum(sums, ctx)
    out: dict[str, float] = {}
    for k, key in enumerate(keys):
        count = float(total[2 * k + 1])
        out[key] = float(total[2 * k]) / count if count else float("nan")
        if count < float(total[-1]):
            out[f"{key}_n_nonfinite"] = float(total[-1]) - count
    out["n_images"] = float(total[-1])
    return out


# ----------------------------------------------------------------------------------------------
# pair data: the flags of the stages that read low-/normal-dose pairs (seed, evaluate)

def add_pair_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, evaluate: bool = False) -> None:
    """Declare the flags of :class:`PairDataOptions` (``evaluate`` words the validation flag for it)."""
    add_option(parser, "--pairs", type=Path, nargs="+", action="extend", metavar="DIR",
               help="folder(s) of patients laid out <patient>/full…/ + <patient>/quarter…/ DICOM series "
                    "(as the AAPM-Mayo 2016 pairs); series of the same suffix pair by slice position")
    add_option(parser, "--low", type=Path, nargs="+", action="extend", metavar="CT",
               help="low-dose CT(s) (DICOM folder, NIfTI, .npy), each paired by slice position with the --full "
                    "at the same place; repeatable")
    add_option(parser, "--full", type=Path, nargs="+", action="extend", metavar="CT",
               help="normal-dose CT(s) matching --low, in the same order; repeatable")
    add_option(parser, "--manifest", type=Path, nargs="+", action="extend", metavar="CSV",
               help="CSV file(s) of pairs: columns low, full, patient and optionally kernel, dose "
                    "(paths relative to the file)")
    add_option(parser, "--simulate-from", type=str, nargs="+", action="extend", metavar="[LABEL=]CT",
               help="normal-dose CT(s) to make simulated pairs from at each --sim-doses (projection-domain "
                    "noise, as `python -m training simulate`; cached); LABEL= names the patient")
    add_option(parser, "--sim-doses", type=str, nargs="+", metavar="D",
               help="dose fractions (or percentages) of the simulated pairs, e.g. 0.05,0.1,0.25,0.5 "
                    f"(default {','.join(f'{d:g}' for d in DEFAULT_SIM_DOSES)})")
    add_option(parser, "--sim-cache", type=Path, metavar="DIR",
               help="folder of the cached simulated pairs (default ~/.cache/napari-langmamba/simulated)")
    add_option(parser, "--sim-slice-step", type=int, metavar="N",
               help="simulate every N-th slice of each --simulate-from volume (default 1)")
    add_option(parser, "--sim-filter", choices=FBP_FILTERS,
               help="FBP filter, i.e. texture, of the simulated noise (default cosine, a smooth kernel; ramp is "
                    "closer to sharp kernels such as D45 or B70f)")
    add_option(parser, "--sim-match-noise", action="store_true",
               help="scale the simulated noise to each volume's own measured noise instead of the calibrated "
                    "I0 (needed for sharp kernels, whose full dose is far noisier than the calibration assumes)")
    if evaluate:
        add_option(parser, "--val-patients", "--patients", dest="val_patients", nargs="+", metavar="ID",
                   help="evaluate only the pairs of these patients (e.g. L192, the validation patient)")
    else:
        add_option(parser, "--val-patients", nargs="+", metavar="ID",
                   help="patients whose pairs form the validation set and are left out of training "
                        "(e.g. L192); never a split of one patient's slices")


def split_by_patient(pairs: Any, val_patients: Sequence[str]) -> tuple[Any, Any]:
    """``(train, val)`` of a :class:`training.datasets.PairSet`: the validation patients' pairs and the rest."""
    val = pairs.select(val_patients)
    train = pairs.select(val_patients, exclude=True)
    if not len(train):
        raise ConfigError(f"Every pair belongs to the validation patient(s) {', '.join(val_patients)}; nothing is "
                          "left to train on.")
    return train, val


# ----------------------------------------------------------------------------------------------
# the parts of a stage's training function that do not depend on its model


class StageData(NamedTuple):
    """The datasets and loader of a training stage (see :func:`make_stage_data`)."""

    val_set: Any | None
    loader: Any
    batch_sampler: Any
    steps_per_epoch: int
    summary: dict[str, Any]


def make_stage_data(
    dataset_cls: Callable[..., Any],
    train_source: Any,
    val_source: Any | None,
    options: TrainOptions,
    ctx: DistContext,
    *,
    source_summary: dict[str, Any],
    val_label: str,
    val_description: str | None = None,
) -> StageData:
    """Training and validation datasets, the resumable loader and the data summary of a stage.

    ``dataset_cls`` is a dataset of :mod:`training.datasets` over a source (random crops of
    ``--patch-size`` for training, whole slices for validation); ``source_summary`` opens the
    summary recorded in checkpoints, and ``val_label`` names the data the validation slices were
    split off when there is no ``--val-data`` (``val_description`` replaces both when given).
    """
    from training.distributed import make_train_loader

    patch = options.patch_size or None
    train_set = dataset_cls(train_source, patch_size=patch, train=True, repeat=options.repeat)
    val_set = dataset_cls(val_source, patch_size=None, train=False) if val_source is not None else None
    loader, batch_sampler = make_train_loader(train_set, batch_size=options.batch_size, ctx=ctx, seed=options.seed,
                                              num_workers=options.workers)
    full_pass = batch_sampler.batches_per_epoch()
    steps_per_epoch = min(full_pass, options.steps_per_epoch) if options.steps_per_epoch else full_pass
    summary = {
        **source_summary,
        "n_slices": len(train_source),
        "n_val_slices": len(val_source) if val_source is not None else 0,
        "val_source": val_description or [str(p) for p in options.val_data] or (
            f"last {options.val_fraction:.0%} of {val_label}" if val_source is not None else None),
        "patch_size": patch,
        "repeat": options.repeat,
    }
    return StageData(val_set, loader, batch_sampler, steps_per_epoch, summary)


def validation(
    model: torch.nn.Module,
    dataset: Any | None,
    measure: Callable[[dict], dict[str, float]],
    *,
    keys: Sequence[str],
    ctx: DistContext,
    max_items: int,
) -> Callable[[Any], dict] | None:
    """The ``validate_fn`` of a :class:`training.runs.Trainer`: :func:`sharded_means` in eval mode.

    None when there is no validation ``dataset``.
    """
    if dataset is None:
        return None

    def validate(state: Any) -> dict:
        model.eval()
        try:
            return sharded_means(dataset, measure, keys=keys, ctx=ctx, max_items=max_items)
        finally:
            model.train()

    return validate


def fit_stage(
    options: TrainOptions,
    *,
    stage: str,
    ctx: DistContext,
    run: RunFolder,
    data: StageData,
    step_fn: Callable[..., Any],
    validate_fn: Callable[[Any], dict] | None,
    objects: dict[str, Any],
    amp: Any,
    optimizer: torch.optim.Optimizer,
    checkpoint: Any,
    start_event: dict[str, Any],
    log: logging.Logger,
    best_key: str = "psnr",
) -> int:
    """Train with a :class:`training.runs.Trainer` (best checkpoint by the validation metric ``best_key``,
    higher is better) and log the outcome.

    ``objects`` are the stage's resumable state besides the model (the AMP gradient scaler is
    added); returns the exit code 0.
    """
    from training.runs import Trainer

    if amp.scaler is not None:
        objects = {**objects, "grad_scaler": amp.scaler}
    trainer = Trainer(
        run=run, ctx=ctx, loader=data.loader, batch_sampler=data.batch_sampler, epochs=options.epochs,
        steps_per_epoch=data.steps_per_epoch, step_fn=step_fn, validate_fn=validate_fn, objects=objects,
        checkpoint=checkpoint, lr_fn=lambda: float(optimizer.param_groups[0]["lr"]), best_key=best_key,
        best_mode="max", log_every=options.log_every, checkpoint_every=options.checkpoint_every,
        stop_at_step=options.stop_at_step, nan_at_step=options.debug_nan_at_step, progress=options.progress,
    )
    summary = trainer.fit(resume=options.resume, start_event=start_event)
    best = summary["best"]
    log.info("%s %s at step %d of %d%s; checkpoints in %s (summary.json)", stage, summary["status"], summary["step"],
             summary["total_steps"], f"; best validation {best['key']} {best['value']:.4g} at step {best['step']}"
             if best["value"] is not None else "", run.path)
    return 0
