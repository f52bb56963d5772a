"""The Train widget's GUI-free half: what a run is, its settings, their command and their checks.

:class:`TrainSettings` holds the form's choices; :func:`build_arguments` turns them into the
stage's real ``python -m training`` flags and :func:`validate_settings` checks them against
the file system before anything starts. The fields, defaults, choices and flags are the
stages' own (``training.options``, imported when a form or a command is built, never when
napari starts). :class:`TrainingRunState` is the evented status the widget's buttons follow.
Nothing here imports Qt, torch or the ``training`` package at import time.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psygnal import evented

from napari_langmamba.errors import ConfigError
from napari_langmamba.training_runs import inspect_run

STAGES: dict[str, str] = {
    "simulate": "simulate: low-dose pairs",
    "candidates": "candidates: token pools (stage 0)",
    "langae": "langae: LangAE (stage 1)",
    "seed": "seed: SEED / RED-CNN (stage 2)",
    "evaluate": "evaluate: PSNR / SSIM / FSIM",
}
TRAINING_STAGES = ("langae", "seed")
"""Stages that write a run folder with ``metrics.jsonl`` and checkpoints (and can resume)."""
BACKBONE_LABELS = {"seed": "SEED (Mamba decoder)", "redcnn": "RED-CNN"}
DEVICES = ("auto", "cpu", "cuda")

# Which option of each stage a form field fills. The options themselves (names, hence flags, defaults,
# choices) are the stages' own, from `training.options`, imported when a form or a command is built
# (never when napari starts); `python -m training <stage> --help` lists them.
_TRAINING_FIELDS = {
    "data": "data", "val_data": "val_data", "output": "output", "preset": "preset", "epochs": "epochs",
    "steps_per_epoch": "steps_per_epoch", "batch_size": "batch_size", "patch_size": "patch_size",
    "device": "device", "amp": "amp", "lr": "lr",
}
STAGE_FIELDS: dict[str, dict[str, str]] = {
    "simulate": {"data": "inputs", "output": "out", "dose": "dose"},
    "candidates": {"data": "data", "output": "output", "codebook": "codebook", "device": "device"},
    "langae": {**_TRAINING_FIELDS, "codebook": "codebook", "candidates": "candidates"},
    "seed": {**_TRAINING_FIELDS, "backbone": "backbone", "langda_weight": "langda_weight", "langae": "langae"},
    "evaluate": {"data": "data", "checkpoint": "checkpoint", "device": "device", "output": "out"},
}
"""Per stage, ``{form field: the stage's option}``: the command passes exactly these."""


class TrainStatus(str, enum.Enum):
    """Where the training process is."""

    IDLE = "idle"
    """No process was started yet."""
    RUNNING = "running"
    STOPPING = "stopping"
    """Stop was pressed: the trainer writes its checkpoint, or is killed after the timeout."""
    DONE = "done"
    STOPPED = "stopped"
    """Ended by Stop (or by the trainer on a stop signal): Resume continues from the checkpoint."""
    CRASHED = "crashed"
    """Ended with an error, or did not start; the last stderr lines say why."""

    @property
    def active(self) -> bool:
        """A process is alive (running or being stopped)."""
        return self in (TrainStatus.RUNNING, TrainStatus.STOPPING)


@evented
@dataclass
class TrainingRunState:
    """The evented state of the widget's run; views subscribe to ``state.events.<field>``.

    ``step``/``total_steps``/``eta_s`` come from the run's log; ``run_dir`` is the folder the
    current (or last) process writes; ``message`` is the last thing the user was told.
    """

    status: TrainStatus = TrainStatus.IDLE
    stage: str = ""
    run_dir: str = ""
    step: int = 0
    total_steps: int = 0
    eta_s: float | None = None
    message: str = ""


def stage_default(stage: str, option: str) -> Any:
    """The default of ``option`` of ``stage``, as the stage's options dataclass declares it."""
    from training.options import default_of, options_class

    return default_of(options_class(stage), option)


def stage_choices(name: str) -> tuple[str, ...]:
    """The values the stages accept for ``preset``, ``backbone`` or ``amp``."""
    from training.options import AMP_CHOICES, BACKBONES, PRESET_CHOICES

    return {"preset": PRESET_CHOICES, "backbone": BACKBONES, "amp": AMP_CHOICES}[name]


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """The form's choices; :func:`build_arguments` turns them into the stage's real flags.

    A field the stage uses (:data:`STAGE_FIELDS`) left ``None`` takes the stage's own default;
    ``lr`` stays ``None`` (no flag) when the stage derives it (``langae``: base lr x batch size).
    """

    stage: str
    data: tuple[Path, ...] = ()
    val_data: tuple[Path, ...] = ()
    output: Path | None = None
    preset: str | None = None
    epochs: int | None = None
    steps_per_epoch: int | None = None
    batch_size: int | None = None
    patch_size: int | None = None
    lr: float | None = None
    langda_weight: float | None = None
    backbone: str | None = None
    codebook: str | None = None
    langae: Path | None = None
    candidates: Path | None = None
    checkpoint: Path | None = None
    dose: float | None = None
    device: str | None = None
    amp: str | None = None
    extra: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name, option in STAGE_FIELDS.get(self.stage, {}).items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, stage_default(self.stage, option))


def num_text(value: float) -> str:
    """A float as the shortest text that reads back the same in a command (``format(x, "g")``)."""
    return format(value, "g")


def lr_text(value: float | None) -> str:
    """A learning rate as people write it: ``1e-4``, ``4.5e-6``; ``""`` for none."""
    if value is None:
        return ""
    mantissa, exponent = f"{float(value):e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def build_arguments(settings: TrainSettings, *, resume: bool = False) -> list[str]:
    """``python -m training`` arguments (stage first) for ``settings``.

    Each field of the stage's :data:`STAGE_FIELDS` that holds a value becomes the flag of its
    option (:func:`training.options.flag_of`); a list option takes every path, a single one the
    first. ``--resume`` follows, then ``settings.extra`` as typed.
    """
    from training.options import flag_of, options_class

    s = settings
    if s.stage not in STAGE_FIELDS:
        raise ConfigError(f"Unknown stage {s.stage!r}; choose one of {', '.join(STAGES)}.")
    defaults = {f.name: f.default for f in dataclasses.fields(options_class(s.stage))}
    args = [s.stage]
    for name, option in STAGE_FIELDS[s.stage].items():
        value = getattr(s, name)
        if value is None or value == ():
            continue
        if isinstance(value, tuple):
            values = [str(v) for v in (value if isinstance(defaults[option], tuple) else value[:1])]
        else:
            values = [num_text(value) if isinstance(value, float) else str(value)]
        args += [flag_of(s.stage, option), *values]
    if resume:
        args.append("--resume")
    return args + list(s.extra)


def _check_exists(paths: Sequence[Path], what: str) -> None:
    for path in paths:
        if not path.exists():
            raise ConfigError(f"The {what} {path} does not exist. Choose an existing file or folder.")


def validate_settings(settings: TrainSettings, *, resume: bool = False) -> None:
    """Check ``settings`` against the file system before anything starts.

    Raises
    ------
    ConfigError
        With a message saying what is wrong and what to do: a missing input, an output that
        would overwrite an earlier run (unless resuming), nothing to resume, ...
    """
    s = settings
    if s.stage not in STAGES:
        raise ConfigError(f"Unknown stage {s.stage!r}; choose one of {', '.join(STAGES)}.")
    if resume and s.stage not in TRAINING_STAGES:
        raise ConfigError(f"Only the training stages ({', '.join(TRAINING_STAGES)}) can be resumed.")
    if "--resume" in s.extra:
        raise ConfigError("Remove --resume from the extra options: press Resume to continue a run.")
    if not s.data:
        raise ConfigError("Choose the input data (a folder or file; several separated by ';').")
    _check_exists(s.data, "input data")
    if s.stage == "evaluate" and len(s.data) > 1:
        raise ConfigError("evaluate reads one paired dataset folder; give a single data folder.")
    _check_exists(s.val_data, "validation data")
    if s.output is None:
        what = "pools file (.json)" if s.stage == "candidates" else "output folder"
        raise ConfigError(f"Choose the {what}.")
    out = s.output
    if not out.parent.is_dir():
        raise ConfigError(f"The folder {out.parent} (where the output goes) does not exist; create it or choose another.")
    if s.stage == "candidates":
        if out.is_dir():
            raise ConfigError(f"The pools output {out} is a folder; give a .json file name.")
        if out.exists() and "--overwrite" not in s.extra:
            raise ConfigError(f"{out} already exists. Choose a new file name, or add --overwrite to the extra options.")
    elif out.exists() and not out.is_dir():
        raise ConfigError(f"The output {out} is a file; choose a folder.")
    if s.stage == "evaluate" and s.checkpoint is not None:
        _check_exists([s.checkpoint], "model checkpoint")
    if s.stage not in TRAINING_STAGES:
        return
    info = inspect_run(out)
    if resume:
        if not info.resumable:
            raise ConfigError(
                f"{out} holds no checkpoint to resume (last/training_state.json). Start a new run instead, "
                "or choose the run folder to continue."
            )
        if info.status == "completed":
            raise ConfigError(f"{out} holds {info.describe()}: there is nothing left to resume.")
        if info.stage and info.stage != s.stage:
            raise ConfigError(f"{out} holds a {info.stage} run; choose the stage {info.stage!r} to resume it.")
    elif info.holds_run:
        todo = ("choose a new output folder for a new run" if info.status == "completed"
                else "press Resume to continue it, or choose a new output folder")
        raise ConfigError(f"{out} already holds {info.describe()}: {todo}.")
    if s.stage == "langae" and s.candidates is not None:
        _check_exists([s.candidates], "candidate pools file")
    if s.stage == "seed":
        if s.langae is not None:
            _check_exists([s.langae], "LangAE checkpoint")
        elif s.backbone == "seed" or s.langda_weight > 0:
            why = "SEED's frozen encoder comes from it" if s.backbone == "seed" else "the LangDA loss uses it"
            raise ConfigError(
                f"Choose a LangAE checkpoint ({why}): train one with the langae stage, or use the RED-CNN "
                "backbone with lambda 0 for the MSE-only baseline."
            )


def format_eta(seconds: float | None) -> str:
    """``"2 h 05 min"``, ``"3 min 20 s"``, ``"12 s"``, or ``"?"`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"


def split_paths(text: str) -> tuple[Path, ...]:
    """The absolute paths of a ``;``-separated list (blank entries skipped)."""
    return tuple(Path(p.strip()).expanduser().absolute() for p in text.split(";") if p.strip())


def optional_path(text: str) -> Path | None:
    """The absolute path typed in ``text``; None when it is blank."""
    text = text.strip()
    return Path(text).expanduser().absolute() if text else None


DATA_LABELS = {
    "simulate": "Normal-dose CT", "candidates": "Training CT", "langae": "Normal-dose CT",
    "seed": "Paired data", "evaluate": "Test pairs",
}
"""The label of the data row, per stage."""
OUTPUT_LABELS = {"simulate": "Dataset folder", "candidates": "Pools file", "evaluate": "Results folder"}
"""The label of the output row, per stage (``Run folder`` for the training stages)."""


def stage_rows(stage: str) -> dict[str, bool]:
    """Which rows of the form ``stage`` uses: ``{row name: visible}``."""
    training = stage in TRAINING_STAGES
    return {
        "val": training,
        "preset_combo": training,
        "epochs_spin": training,
        "steps_spin": training,
        "batch_spin": training,
        "patch_spin": training,
        "lr_edit": training,
        "backbone_combo": stage == "seed",
        "lambda_spin": stage == "seed",
        "langae": stage == "seed",
        "codebook_edit": stage in ("langae", "candidates"),
        "candidates": stage == "langae",
        "checkpoint": stage == "evaluate",
        "dose_spin": stage == "simulate",
        "device_combo": stage != "simulate",
        "amp_combo": training,
    }


def parse_learning_rate(text: str) -> float | None:
    """The learning rate typed in the form; None when blank (the stage derives it).

    Raises
    ------
    ConfigError
        When the text is not a positive number.
    """
    text = text.strip()
    if not text:
        return None
    try:
        lr = float(text)
    except ValueError:
        raise ConfigError(f"The learning rate must be a number such as 1e-4; got {text!r}.") from None
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"The learning rate must be positive; got {text!r}.")
    return lr


def parse_extra_options(text: str) -> tuple[str, ...]:
    """The extra options as a shell would split them (raises :class:`ConfigError` on bad quotes)."""
    try:
        return tuple(shlex.split(text))
    except ValueError as exc:
        raise ConfigError(f"The extra options cannot be read ({exc}); check the quotes.") from None


def paths_text(value: Any) -> str:
    """A recorded path option (one path, a list of them, or None) as the form writes it."""
    items = value if isinstance(value, list) else [] if value is None else [value]
    return "; ".join(str(v) for v in items)


def resume_arguments(last_args: Sequence[str], args: list[str], output: Path | None) -> list[str]:
    """What Resume runs: exactly the options that started the run in ``output``, when known.

    ``last_args`` are the arguments of the widget's last start; when they wrote to ``output``
    they are repeated with ``--resume`` (as the trainer asks), otherwise ``args`` (the form's).
    """
    if output is None or "--output" not in last_args:
        return args
    i = list(last_args).index("--output")
    if i + 1 < len(last_args) and Path(last_args[i + 1]) == output:
        return [a for a in last_args if a != "--resume"] + ["--resume"]
    return args


def recorded_form(stage: str, options: dict[str, Any]) -> dict[str, Any]:
    """The form a run's recorded ``options`` (its ``config.json``) fill: ``{control name: value}``.

    In the order the widget sets them (the stage first). Options missing or of the wrong type
    are left out, so those controls keep their values; paths are written as the form writes
    them (:func:`paths_text`), a learning rate as its shortest text (blank: the stage derives it).
    """
    o = options
    form: dict[str, Any] = {
        "stage_combo": stage, "data_edit": paths_text(o.get("data")), "val_edit": paths_text(o.get("val_data")),
    }
    if o.get("preset") in stage_choices("preset"):
        form["preset_combo"] = o["preset"]
    for name, key in (("epochs_spin", "epochs"), ("steps_spin", "steps_per_epoch"),
                      ("batch_spin", "batch_size"), ("patch_spin", "patch_size")):
        if isinstance(o.get(key), int):
            form[name] = o[key]
    form["lr_edit"] = "" if o.get("lr") is None else num_text(float(o["lr"]))
    if isinstance(o.get("device"), str):
        form["device_combo"] = o["device"]
    if o.get("amp") in stage_choices("amp"):
        form["amp_combo"] = o["amp"]
    if stage == "langae":
        form["codebook_edit"] = str(o.get("codebook") or stage_default("langae", "codebook"))
        form["candidates_edit"] = paths_text(o.get("candidates"))
    else:
        if o.get("backbone") in stage_choices("backbone"):
            form["backbone_combo"] = o["backbone"]
        if isinstance(o.get("langda_weight"), (int, float)):
            form["lambda_spin"] = float(o["langda_weight"])
        form["langae_edit"] = paths_text(o.get("langae"))
    return form


def can_resume(info: Any, stage: str) -> bool:
    """Whether Resume may continue the run ``info`` (a ``RunInfo``) with the form's ``stage``."""
    return (
        info is not None and stage in TRAINING_STAGES and info.resumable
        and info.stage in (None, stage) and info.status != "completed"
    )


def adopted_run_hint(info: Any) -> str:
    """What to do with an existing run folder the form was filled from."""
    if info.status == "completed":
        return "it is complete (choose a new folder for a new run)"
    if info.resumable:
        return "press Resume to continue it"
    return "it has no checkpoint to resume"
