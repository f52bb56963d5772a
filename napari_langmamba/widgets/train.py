"""The Train dock widget: run a stage of ``python -m training`` and follow it live.

The training runs in **its own process** (:class:`~qtpy.QtCore.QProcess`), never in napari:
the GUI never blocks, a crash cannot take the viewer down, and CUDA memory stays out of
napari. The widget builds the command from its form (the exact command line is shown, so it
can be copied to a terminal or a cluster script), validates the choices before starting, and
then follows the run:

- a ``QTimer`` polls the run folder's ``metrics.jsonl`` incrementally
  (:class:`~napari_langmamba.training_runs.MetricsTail`: only appended bytes, a torn last
  line is never trusted) and feeds the live plot of losses and validation metrics and the
  progress bar with ETA (``step``, ``total_steps``, ``eta_s`` of the ``train`` records; the
  non-training stages report through tqdm on stderr);
- **Stop** sends SIGTERM (``QProcess.terminate``): the trainer finishes its step, writes its
  ``last/`` checkpoint and exits; the process is killed if it has not ended after
  :attr:`TrainWidget.stop_timeout_s` (pressing Stop again kills at once). On Windows a console
  process cannot receive that signal, so Stop ends in the kill and Resume continues from the
  previous checkpoint;
- **Resume** starts the same command again with ``--resume`` on the same run folder;
- a non-zero exit shows the process's last stderr lines in a notification and in the
  widget's error box;
- **Use in Denoise** hands the finished run's checkpoint to the Denoise widget.

Buttons follow an evented status object (:class:`TrainingRunState`: idle, running, stopping,
done, stopped, crashed). Nothing here imports torch or the ``training`` package: the process
does that.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import shlex
import sys
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from napari.utils.notifications import show_error
from psygnal import evented
from qtpy.QtCore import QProcess, QProcessEnvironment, QTimer
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QHBoxLayout,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QTabWidget,
    QWidget,
)

from napari_langmamba.errors import ConfigError, LangMambaError
from napari_langmamba.training_runs import MetricsTail, inspect_run, parse_tqdm_progress
from napari_langmamba.widgets._base import WidgetBase

logger = logging.getLogger(__name__)

__all__ = [
    "STAGES",
    "STAGE_FIELDS",
    "TRAINING_STAGES",
    "TrainSettings",
    "TrainStatus",
    "TrainWidget",
    "TrainingRunState",
    "build_arguments",
    "format_eta",
    "stage_default",
    "validate_settings",
]

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
    "device": "device", "lr": "lr",
}
STAGE_FIELDS: dict[str, dict[str, str]] = {
    "simulate": {"data": "inputs", "output": "out", "dose": "dose"},
    "candidates": {"data": "data", "output": "output", "codebook": "codebook", "device": "device"},
    "langae": {**_TRAINING_FIELDS, "codebook": "codebook", "candidates": "candidates"},
    "seed": {**_TRAINING_FIELDS, "backbone": "backbone", "langda_weight": "langda_weight", "langae": "langae"},
    "evaluate": {"data": "data", "checkpoint": "checkpoint", "device": "device", "output": "out"},
}
"""Per stage, ``{form field: the stage's option}``: the command passes exactly these."""

PERSISTED_FIELDS = (
    "stage_combo", "data_edit", "val_edit", "output_edit", "preset_combo", "epochs_spin", "steps_spin",
    "batch_spin", "patch_spin", "lr_edit", "backbone_combo", "lambda_spin", "langae_edit", "codebook_edit",
    "candidates_edit", "checkpoint_edit", "dose_spin", "device_combo", "extra_edit",
)
"""The form's fields remembered between napari sessions, in the order they are restored."""
STDERR_LINES_KEPT = 400
ERROR_LINES_SHOWN = 12
NOTIFICATION_LINES = 6
LOG_BLOCKS = 2000
VALIDATION_SKIP = ("n_images",)


class TrainStatus(str, enum.Enum):
    """Where the training process is."""

    IDLE = "idle"
    RUNNING = "running"
    STOPPING = "stopping"
    DONE = "done"
    STOPPED = "stopped"
    CRASHED = "crashed"

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
    """The values the stages accept for ``preset`` or ``backbone``."""
    from training.options import BACKBONES, PRESET_CHOICES

    return {"preset": PRESET_CHOICES, "backbone": BACKBONES}[name]


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
    extra: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name, option in STAGE_FIELDS.get(self.stage, {}).items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, stage_default(self.stage, option))


def _num(value: float) -> str:
    return format(value, "g")


def _lr_text(value: float | None) -> str:
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
            values = [_num(value) if isinstance(value, float) else str(value)]
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


def _split_paths(text: str) -> tuple[Path, ...]:
    return tuple(Path(p.strip()).expanduser().absolute() for p in text.split(";") if p.strip())


def _optional_path(text: str) -> Path | None:
    text = text.strip()
    return Path(text).expanduser().absolute() if text else None


class _ProcessGuard:
    """Ends a still-running training process when the widget is destroyed.

    Not a QObject and not the widget, so the ``destroyed`` connection survives the widget:
    SIGTERM (the trainer checkpoints), then a kill after the timeout.
    """

    def __init__(self) -> None:
        self.process: QProcess | None = None
        self.timeout_s = 60.0

    def on_widget_destroyed(self, *_: Any) -> None:
        process = self.process
        if process is None or process.state() == QProcess.ProcessState.NotRunning:
            return
        logger.warning("Train widget closed while a run was going: stopping it (it writes its checkpoint)")
        try:
            process.disconnect()  # its slots belong to the deleted widget
        except (TypeError, RuntimeError):
            pass
        self.shutdown()

    def shutdown(self) -> None:
        process = self.process
        if process is None or process.state() == QProcess.ProcessState.NotRunning:
            return
        process.terminate()
        if not process.waitForFinished(int(self.timeout_s * 1000)):
            process.kill()
            process.waitForFinished(5000)


class TrainWidget(WidgetBase):
    """Dock widget: start, follow, stop and resume ``python -m training`` runs.

    Parameters
    ----------
    napari_viewer
        The viewer (npe2 passes it).
    """

    TOOLTIP_SECTION = "train"

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(napari_viewer, parent)
        self.run_state = TrainingRunState()
        self.stop_timeout_s = 60.0
        """Seconds Stop waits for the trainer's checkpoint before killing the process."""
        self.loss_history: dict[str, list[tuple[int, float]]] = {}
        self.val_history: dict[str, list[tuple[int, float]]] = {}
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_LINES_KEPT)
        self.error_lines: list[str] = []
        self.command: list[str] = []
        self._process: QProcess | None = None
        self._guard = _ProcessGuard()
        self.destroyed.connect(self._guard.on_widget_destroyed)
        self._tail: MetricsTail | None = None
        self._stop_requested = False
        self._killed = False
        self._last_args: list[str] = []
        self._partial = {"stdout": "", "stderr": ""}
        self._filling = False

        self._build_form()
        self._build_views()

        self._poll_timer = QTimer(self)
        self._poll_timer.setInterval(1000)
        self._poll_timer.timeout.connect(self.poll)
        self._kill_timer = QTimer(self)
        self._kill_timer.setSingleShot(True)
        self._kill_timer.timeout.connect(self._kill_after_timeout)

        self.run_state.events.status.connect(self._sync_controls)
        self.run_state.events.step.connect(self._show_progress)
        self.run_state.events.total_steps.connect(self._show_progress)
        self.run_state.events.eta_s.connect(self._show_progress)
        self._on_stage_changed()
        self.persist(*PERSISTED_FIELDS)  # the form is remembered between sessions (stage first)

    # --- construction -----------------------------------------------------------------
    def _path_row(self, name: str, label: str, *, browse: str, placeholder: str = "") -> QLineEdit:
        container = QWidget()
        row = QHBoxLayout(container)
        row.setContentsMargins(0, 0, 0, 0)
        edit = self.bind(f"{name}_edit", QLineEdit(), add=False)
        edit.setPlaceholderText(placeholder)
        button = self.bind(f"{name}_button", QPushButton("..."), add=False)
        button.setMaximumWidth(32)
        button.clicked.connect(lambda: self._browse(edit, browse))
        row.addWidget(edit)
        row.addWidget(button)
        self._form.addRow(label, container)
        self._rows[name] = container
        edit.textChanged.connect(self._on_form_changed)
        return edit

    def _row(self, name: str, control: QWidget, label: str) -> Any:
        self.bind(name, control, label=label)
        self._rows[name] = control
        return control

    def _build_form(self) -> None:
        self._rows: dict[str, QWidget] = {}
        stage = self._row("stage_combo", QComboBox(), "Stage")
        for key, text in STAGES.items():
            stage.addItem(text, key)
        stage.setCurrentIndex(stage.findData("seed"))

        self._path_row("data", "Data", browse="folder", placeholder="folder(s) or file(s), separated by ';'")
        self._path_row("val", "Validation data", browse="folder", placeholder="optional: split off the data")
        self._path_row("output", "Run folder", browse="save-folder", placeholder="a new folder for this run")

        preset = self._row("preset_combo", QComboBox(), "Preset")
        preset.addItems(stage_choices("preset"))
        preset.setCurrentText(stage_default("seed", "preset"))
        epochs = self._row("epochs_spin", QSpinBox(), "Epochs")
        epochs.setRange(1, 1_000_000)
        epochs.setValue(stage_default("seed", "epochs"))
        steps = self._row("steps_spin", QSpinBox(), "Steps per epoch")
        steps.setRange(0, 100_000_000)
        steps.setSpecialValueText("full pass")
        batch = self._row("batch_spin", QSpinBox(), "Batch size")
        batch.setRange(1, 4096)
        batch.setValue(stage_default("seed", "batch_size"))
        patch = self._row("patch_spin", QSpinBox(), "Patch size (px)")
        patch.setRange(0, 4096)
        patch.setSingleStep(16)
        patch.setSpecialValueText("whole slices")
        patch.setValue(stage_default("seed", "patch_size"))
        lr = self._row("lr_edit", QLineEdit(_lr_text(stage_default("seed", "lr"))), "Learning rate")
        lr.setPlaceholderText(f"{_lr_text(stage_default('langae', 'base_lr'))} x batch size")

        backbone = self._row("backbone_combo", QComboBox(), "Backbone")
        for key in stage_choices("backbone"):
            backbone.addItem(BACKBONE_LABELS.get(key, key), key)
        lam = self._row("lambda_spin", QDoubleSpinBox(), "LangDA lambda")
        lam.setDecimals(3)
        lam.setRange(0.0, 100.0)
        lam.setSingleStep(0.05)
        lam.setValue(stage_default("seed", "langda_weight"))
        self._path_row("langae", "LangAE checkpoint", browse="folder", placeholder="stage-1 run's best/ (or last/)")
        self._row("codebook_edit", QLineEdit(stage_default("langae", "codebook")), "Codebook")
        self._path_row("candidates", "Candidate pools", browse="open-json", placeholder="optional: stage-0 .json")
        self._path_row("checkpoint", "Model checkpoint", browse="folder", placeholder="optional: denoiser checkpoint")
        dose = self._row("dose_spin", QDoubleSpinBox(), "Dose fraction")
        dose.setDecimals(3)
        dose.setRange(0.01, 1.0)
        dose.setSingleStep(0.05)
        dose.setValue(stage_default("simulate", "dose"))

        device = self._row("device_combo", QComboBox(), "Device")
        device.setEditable(True)
        device.addItems(DEVICES)
        extra = self._row("extra_edit", QLineEdit(), "Extra options")
        extra.setPlaceholderText("e.g. --log-every 1 --val-fraction 0.2")
        command = self._row("command_edit", QLineEdit(), "Command")
        command.setReadOnly(True)

        buttons = QHBoxLayout()
        for name, text in (("start_button", "Start"), ("stop_button", "Stop"), ("resume_button", "Resume"),
                           ("use_button", "Use in Denoise")):
            buttons.addWidget(self.bind(name, QPushButton(text), add=False))
        self._form.addRow(buttons)
        self.add_status_rows()

        self.start_button.clicked.connect(self.start)
        self.stop_button.clicked.connect(self.stop)
        self.resume_button.clicked.connect(self.resume)
        self.use_button.clicked.connect(self.use_in_denoise)
        stage.currentIndexChanged.connect(self._on_stage_changed)
        self.output_edit.editingFinished.connect(self._adopt_existing_run)
        for control in (preset, backbone):
            control.currentIndexChanged.connect(self._on_form_changed)
        device.currentTextChanged.connect(self._on_form_changed)
        for control in (epochs, steps, batch, patch, lam, dose):
            control.valueChanged.connect(self._on_form_changed)
        for control in (lr, self.codebook_edit, extra):
            control.textChanged.connect(self._on_form_changed)

    def _build_views(self) -> None:
        tabs = self.bind("tabs", QTabWidget())
        self.figure = Figure(figsize=(4.5, 3.6), dpi=90, layout="constrained")
        self._ax_loss, self._ax_val = self.figure.subplots(2, 1)
        self._ax_val2 = self._ax_val.twinx()
        canvas = FigureCanvasQTAgg(self.figure)
        canvas.setObjectName("canvas")
        canvas.setMinimumHeight(280)
        self.canvas = canvas
        tabs.addTab(canvas, "Plot")
        log = self.bind("log_box", QPlainTextEdit(), add=False)
        log.setReadOnly(True)
        log.setMaximumBlockCount(LOG_BLOCKS)
        log.setLineWrapMode(QPlainTextEdit.LineWrapMode.NoWrap)
        tabs.addTab(log, "Log")
        errors = self.bind("error_box", QPlainTextEdit())
        errors.setReadOnly(True)
        errors.setMaximumHeight(160)
        errors.setVisible(False)
        self._redraw()

    # --- form -------------------------------------------------------------------------
    @property
    def stage(self) -> str:
        return str(self.stage_combo.currentData())

    def _set_row_visible(self, name: str, visible: bool) -> None:
        field = self._rows[name]
        label = self._form.labelForField(field)
        field.setVisible(visible)
        if label is not None:
            label.setVisible(visible)

    def _set_row_label(self, name: str, text: str) -> None:
        label = self._form.labelForField(self._rows[name])
        if label is not None:
            label.setText(text)

    def _on_stage_changed(self, *_: Any) -> None:
        stage = self.stage
        training = stage in TRAINING_STAGES
        rows = {
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
        }
        for name, visible in rows.items():
            self._set_row_visible(name, visible)
        self._set_row_label("data", {
            "simulate": "Normal-dose CT", "candidates": "Training CT", "langae": "Normal-dose CT",
            "seed": "Paired data", "evaluate": "Test pairs",
        }[stage])
        self._set_row_label("output", {
            "simulate": "Dataset folder", "candidates": "Pools file", "evaluate": "Results folder",
        }.get(stage, "Run folder"))
        if training and not self._filling:
            # Switch the stage-specific defaults, but keep a value the user typed.
            other = "langae" if stage == "seed" else "seed"
            if self.patch_spin.value() == stage_default(other, "patch_size"):
                self.patch_spin.setValue(stage_default(stage, "patch_size"))
            if self.lr_edit.text().strip() == _lr_text(stage_default(other, "lr")):
                self.lr_edit.setText(_lr_text(stage_default(stage, "lr")))
        self._on_form_changed()

    def settings(self) -> TrainSettings:
        """The form's current choices (raises :class:`ConfigError` on an unreadable value)."""
        lr_text = self.lr_edit.text().strip()
        lr: float | None = None
        if lr_text:
            try:
                lr = float(lr_text)
            except ValueError:
                raise ConfigError(f"The learning rate must be a number such as 1e-4; got {lr_text!r}.") from None
            if not (math.isfinite(lr) and lr > 0):
                raise ConfigError(f"The learning rate must be positive; got {lr_text!r}.")
        try:
            extra = tuple(shlex.split(self.extra_edit.text()))
        except ValueError as exc:
            raise ConfigError(f"The extra options cannot be read ({exc}); check the quotes.") from None
        device = self.device_combo.currentText().strip() or "auto"
        return TrainSettings(
            stage=self.stage,
            data=_split_paths(self.data_edit.text()),
            val_data=_split_paths(self.val_edit.text()),
            output=_optional_path(self.output_edit.text()),
            preset=self.preset_combo.currentText(),
            epochs=int(self.epochs_spin.value()),
            steps_per_epoch=int(self.steps_spin.value()),
            batch_size=int(self.batch_spin.value()),
            patch_size=int(self.patch_spin.value()),
            lr=lr,
            langda_weight=float(self.lambda_spin.value()),
            backbone=str(self.backbone_combo.currentData()),
            codebook=self.codebook_edit.text().strip() or None,  # None: the stage's default
            langae=_optional_path(self.langae_edit.text()),
            candidates=_optional_path(self.candidates_edit.text()),
            checkpoint=_optional_path(self.checkpoint_edit.text()),
            dose=float(self.dose_spin.value()),
            device=device,
            extra=extra,
        )

    def preview_command(self, *, resume: bool = False) -> list[str]:
        """The command Start (or Resume) would run now."""
        return [sys.executable, "-m", "training", *build_arguments(self.settings(), resume=resume)]

    def _on_form_changed(self, *_: Any) -> None:
        if self.run_state.status.active:
            return
        try:
            text = shlex.join(self.preview_command())
        except LangMambaError as exc:
            text = f"({exc})"
        self.command_edit.setText(text)
        self._sync_controls()

    def _browse(self, edit: QLineEdit, kind: str) -> None:
        start = edit.text().split(";")[0].strip() or str(Path.home())
        if kind == "open-json":
            path, _ = QFileDialog.getOpenFileName(self, "Candidate pools", start, "JSON (*.json)")
        elif kind == "save-folder" and self.stage == "candidates":
            path, _ = QFileDialog.getSaveFileName(self, "Pools file", start, "JSON (*.json)")
        else:
            path = QFileDialog.getExistingDirectory(self, "Choose a folder", start)
        if path:
            edit.setText(path)
            if edit is self.output_edit:
                self._adopt_existing_run()

    def load_run_settings(self, folder: str | Path) -> bool:
        """Fill the form from the options recorded in a run folder's ``config.json``.

        Returns False when the folder holds no run of a training stage. Resume then continues
        it with the same options (the trainer asks for them).
        """
        info = inspect_run(folder)
        if info.stage not in TRAINING_STAGES or not info.options:
            return False
        o = info.options

        def paths(value: Any) -> str:
            items = value if isinstance(value, list) else [] if value is None else [value]
            return "; ".join(str(v) for v in items)

        self._filling = True
        try:
            self.stage_combo.setCurrentIndex(self.stage_combo.findData(info.stage))
            self.data_edit.setText(paths(o.get("data")))
            self.val_edit.setText(paths(o.get("val_data")))
            if o.get("preset") in stage_choices("preset"):
                self.preset_combo.setCurrentText(o["preset"])
            for spin, key in ((self.epochs_spin, "epochs"), (self.steps_spin, "steps_per_epoch"),
                              (self.batch_spin, "batch_size"), (self.patch_spin, "patch_size")):
                if isinstance(o.get(key), int):
                    spin.setValue(o[key])
            self.lr_edit.setText("" if o.get("lr") is None else _num(float(o["lr"])))
            if isinstance(o.get("device"), str):
                self.device_combo.setCurrentText(o["device"])
            if info.stage == "langae":
                self.codebook_edit.setText(str(o.get("codebook") or stage_default("langae", "codebook")))
                self.candidates_edit.setText(paths(o.get("candidates")))
            else:
                if o.get("backbone") in stage_choices("backbone"):
                    self.backbone_combo.setCurrentIndex(self.backbone_combo.findData(o["backbone"]))
                if isinstance(o.get("langda_weight"), (int, float)):
                    self.lambda_spin.setValue(float(o["langda_weight"]))
                self.langae_edit.setText(paths(o.get("langae")))
        finally:
            self._filling = False
        self._on_form_changed()
        return True

    def _adopt_existing_run(self) -> None:
        if self.run_state.status.active:
            return
        output = _optional_path(self.output_edit.text())
        if output is None or self.stage not in TRAINING_STAGES:
            return
        info = inspect_run(output)
        if info.holds_run and self.load_run_settings(output):
            if info.status == "completed":
                hint = "it is complete (choose a new folder for a new run)"
            elif info.resumable:
                hint = "press Resume to continue it"
            else:
                hint = "it has no checkpoint to resume"
            self.set_status(f"{output} holds {info.describe()}: the form shows its settings; {hint}.")

    # --- buttons follow the status ------------------------------------------------------
    def _sync_controls(self, *_: Any) -> None:
        status = self.run_state.status
        active = status.active
        for name in self._rows:
            if name != "command_edit":
                self._rows[name].setEnabled(not active)
        self.start_button.setEnabled(not active)
        self.stop_button.setEnabled(active)
        self.stop_button.setText("Kill now" if status is TrainStatus.STOPPING else "Stop")
        output = _optional_path(self.output_edit.text())
        info = inspect_run(output) if output is not None and not active else None
        self.resume_button.setEnabled(
            info is not None and self.stage in TRAINING_STAGES and info.resumable
            and info.stage in (None, self.stage) and info.status != "completed"
        )
        self.use_button.setEnabled(info is not None and info.stage == "seed" and info.checkpoint is not None)

    @property
    def status(self) -> TrainStatus:
        """The run's status (also ``run_state.status``, evented)."""
        return self.run_state.status

    @property
    def poll_interval_ms(self) -> int:
        """How often ``metrics.jsonl`` is read while a run goes (default 1000 ms)."""
        return self._poll_timer.interval()

    @poll_interval_ms.setter
    def poll_interval_ms(self, value: int) -> None:
        self._poll_timer.setInterval(max(50, int(value)))

    @property
    def process(self) -> QProcess | None:
        """The running training process, if any."""
        return self._process

    # --- start / resume -----------------------------------------------------------------
    def start(self) -> bool:
        """Validate the form and start a new run; False (with a message) when refused."""
        return self._launch(resume=False)

    def __call__(self) -> bool:
        return self.start()

    def resume(self) -> bool:
        """Continue the run in the output folder with ``--resume``; False when refused."""
        return self._launch(resume=True)

    def _launch(self, *, resume: bool) -> bool:
        if self.run_state.status.active:
            self.set_status("A run is going: stop it first.")
            return False
        try:
            settings = self.settings()
            validate_settings(settings, resume=resume)
            args = build_arguments(settings, resume=resume)
            if resume and self._last_args and self._same_output(self._last_args, settings.output):
                # exactly the options that started this run, as the trainer asks
                args = [a for a in self._last_args if a != "--resume"] + ["--resume"]
        except LangMambaError as exc:
            self.report_error(exc, context="Train")
            return False
        self._start_process(settings, args, resume=resume)
        return True

    @staticmethod
    def _same_output(args: list[str], output: Path | None) -> bool:
        if output is None or "--output" not in args:
            return False
        i = args.index("--output")
        return i + 1 < len(args) and Path(args[i + 1]) == output

    def _start_process(self, settings: TrainSettings, args: list[str], *, resume: bool) -> None:
        self.command = [sys.executable, "-m", "training", *args]
        self.command_edit.setText(shlex.join(self.command))
        self._last_args = list(args)
        self._stop_requested = False
        self._killed = False
        self._partial = {"stdout": "", "stderr": ""}
        self.stderr_tail.clear()
        self.error_lines = []
        self.error_box.clear()
        self.error_box.setVisible(False)
        self.log_box.appendPlainText(f"$ {shlex.join(self.command)}")
        run_dir = settings.output if settings.output is not None else Path()
        training = settings.stage in TRAINING_STAGES
        self._tail = MetricsTail(run_dir) if training else None
        self._clear_history()
        if resume and self._tail is not None:
            self.poll()  # show the curve so far; the trainer trims what follows its checkpoint

        process = QProcess()
        process.setProgram(sys.executable)
        process.setArguments(["-m", "training", *args])
        env = QProcessEnvironment.systemEnvironment()
        env.insert("PYTHONUNBUFFERED", "1")
        process.setProcessEnvironment(env)
        process.readyReadStandardOutput.connect(lambda: self._read_stream("stdout"))
        process.readyReadStandardError.connect(lambda: self._read_stream("stderr"))
        process.finished.connect(self._on_finished)
        process.errorOccurred.connect(self._on_process_error)
        self._process = process
        self._guard.process = process
        self._guard.timeout_s = self.stop_timeout_s

        state = self.run_state
        state.stage = settings.stage
        state.run_dir = str(run_dir)
        state.total_steps = 0
        state.step = 0
        state.eta_s = None
        verb = "Resuming" if resume else "Starting"
        state.message = f"{verb} {settings.stage} in {run_dir} ..."
        self.set_status(state.message)
        self.start_progress(0)
        state.status = TrainStatus.RUNNING
        logger.info("starting: %s", shlex.join(self.command))
        process.start()
        if training:
            self._poll_timer.start()

    # --- stop ---------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the process to stop (SIGTERM: it checkpoints and exits); a second call kills it."""
        process = self._process
        if process is None or not self.run_state.status.active:
            return
        if self.run_state.status is TrainStatus.STOPPING:
            self._kill("Killed on request")
            return
        self._stop_requested = True
        self.run_state.status = TrainStatus.STOPPING
        self.set_status("Stopping: the trainer finishes its step and writes a checkpoint ...")
        process.terminate()
        self._kill_timer.start(int(self.stop_timeout_s * 1000))

    def _kill_after_timeout(self) -> None:
        self._kill(f"Still running {self.stop_timeout_s:g} s after Stop: killed")

    def _kill(self, why: str) -> None:
        if self._process is not None and self._process.state() != QProcess.ProcessState.NotRunning:
            self._killed = True
            self.log_box.appendPlainText(f"[{why}]")
            self._process.kill()

    def shutdown(self, timeout_s: float | None = None) -> None:
        """Stop a running process and wait for it (blocking; for closing napari and tests)."""
        self._guard.timeout_s = self.stop_timeout_s if timeout_s is None else timeout_s
        self._stop_requested = self._stop_requested or self._process is not None
        self._guard.shutdown()

    # --- process output -----------------------------------------------------------------
    def _read_stream(self, name: str) -> None:
        process = self._process
        if process is None:
            return
        raw = process.readAllStandardOutput() if name == "stdout" else process.readAllStandardError()
        text = bytes(raw).decode("utf-8", errors="replace")
        if not text:
            return
        if self.run_state.stage not in TRAINING_STAGES:
            progress = parse_tqdm_progress(text)
            if progress is not None:
                self.run_state.total_steps = progress.total
                self.run_state.step = progress.done
                self.run_state.eta_s = progress.eta_s
        self._append_lines(name, text)

    def _append_lines(self, name: str, text: str, *, flush: bool = False) -> None:
        buffer = self._partial[name] + text.replace("\r\n", "\n")
        lines = buffer.split("\n")
        self._partial[name] = "" if flush else lines.pop()
        for line in lines:
            line = line.split("\r")[-1].rstrip()  # what a terminal shows after tqdm's redraws
            if not line:
                continue
            self.log_box.appendPlainText(line)
            if name == "stderr":
                self.stderr_tail.append(line)

    def _on_process_error(self, error: QProcess.ProcessError) -> None:
        if error == QProcess.ProcessError.FailedToStart:
            reason = self._process.errorString() if self._process is not None else ""
            self.stderr_tail.append(f"could not start {sys.executable}: {reason}")
            self._finish(TrainStatus.CRASHED, exit_text="did not start")

    def _on_finished(self, exit_code: int, exit_status: QProcess.ExitStatus) -> None:
        for name in ("stdout", "stderr"):
            self._read_stream(name)
            self._append_lines(name, "", flush=True)
        crashed = exit_status == QProcess.ExitStatus.CrashExit
        if self._stop_requested and (crashed or exit_code == 0):
            status = TrainStatus.STOPPED  # a non-zero exit code while stopping is still a failure
        elif not crashed and exit_code == 0:
            summary = inspect_run(self.run_state.run_dir) if self.run_state.stage in TRAINING_STAGES else None
            status = TrainStatus.STOPPED if summary is not None and summary.status == "stopped" else TrainStatus.DONE
        else:
            status = TrainStatus.CRASHED
        how = "was killed by a signal" if crashed else f"exit code {exit_code}"
        self._finish(status, exit_text=how)

    def _finish(self, status: TrainStatus, *, exit_text: str) -> None:
        self._poll_timer.stop()
        self._kill_timer.stop()
        self.poll()
        process, self._process = self._process, None
        self._guard.process = None
        if process is not None:
            process.deleteLater()
        state = self.run_state
        run = inspect_run(state.run_dir) if state.stage in TRAINING_STAGES else None
        if status is TrainStatus.CRASHED:
            self.error_lines = list(self.stderr_tail)[-ERROR_LINES_SHOWN:] or [f"(no error output; {exit_text})"]
            self.error_box.setPlainText("\n".join(self.error_lines))
            self.error_box.setVisible(True)
            message = f"The {state.stage} process failed ({exit_text})."
            state.message = message + " Its last error lines are shown below."
            self.set_status(state.message)
            show_error(message + "\n" + "\n".join(self.error_lines[-NOTIFICATION_LINES:]))
        elif status is TrainStatus.STOPPED:
            where = ""
            if run is not None and run.resumable:
                where = f" Checkpoint at step {run.step if run.step is not None else state.step}: Resume continues it."
            if self._killed:
                where = " It was killed before it could finish its checkpoint." + (
                    " The previous checkpoint is kept: Resume continues from it." if run and run.resumable else "")
            state.message = f"Stopped {state.stage}.{where}"
            self.set_status(state.message)
        else:
            state.message = self._done_message(run)
            self.set_status(state.message)
        if state.total_steps == 0:
            self.finish_progress()  # no step was ever reported: hide the busy indicator
        state.status = status
        self._sync_controls()

    def _done_message(self, run: Any) -> str:
        stage = self.run_state.stage
        if run is None or run.checkpoint is None:
            return f"{stage} finished: {self.run_state.run_dir}"
        if stage == "langae" and not self.langae_edit.text().strip():
            self.langae_edit.setText(str(run.checkpoint))  # ready for stage 2
            return f"LangAE trained: {run.checkpoint} (set as the LangAE checkpoint of the seed stage)."
        if stage == "seed" and not self.checkpoint_edit.text().strip():
            self.checkpoint_edit.setText(str(run.checkpoint))  # ready for evaluate
        return f"{stage} finished: checkpoint {run.checkpoint}. Use in Denoise makes it the Denoise widget's model."

    # --- metrics ------------------------------------------------------------------------
    def poll(self) -> int:
        """Read what the run appended to ``metrics.jsonl``; returns the number of new records."""
        if self._tail is None:
            return 0
        update = self._tail.poll()
        if update.reset:
            self._clear_history()
        for record in update.records:
            self._ingest(record)
        if update.records or update.reset:
            self._redraw()
        return len(update.records)

    def _clear_history(self) -> None:
        self.loss_history = {}
        self.val_history = {}

    def _ingest(self, record: dict) -> None:
        kind = record.get("kind")
        step = record.get("step")
        state = self.run_state
        if isinstance(record.get("total_steps"), int) and record["total_steps"] > 0:
            state.total_steps = record["total_steps"]
        if kind == "train" and isinstance(step, int):
            for key, value in (record.get("losses") or {}).items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.loss_history.setdefault(str(key), []).append((step, float(value)))
            state.step = step
            eta = record.get("eta_s")
            state.eta_s = float(eta) if isinstance(eta, (int, float)) else None
        elif kind == "epoch":
            epoch = record.get("epoch")
            for key, value in (record.get("val") or {}).items():
                if key in VALIDATION_SKIP or str(key).endswith("_n_nonfinite"):
                    continue
                if isinstance(value, (int, float)) and math.isfinite(value) and isinstance(epoch, int):
                    self.val_history.setdefault(str(key), []).append((epoch, float(value)))
        elif kind == "event" and isinstance(step, int) and record.get("event") in ("start", "resume"):
            state.step = step

    def _show_progress(self, *_: Any) -> None:
        state = self.run_state
        bar = self.progress_bar
        if state.total_steps > 0:
            bar.setVisible(True)
            if bar.maximum() != state.total_steps:
                bar.setRange(0, state.total_steps)
            bar.setValue(min(state.step, state.total_steps))
            unit = " steps" if state.stage in TRAINING_STAGES else ""
            bar.setFormat(f"%v / %m{unit} · ETA {format_eta(state.eta_s)}")

    def _redraw(self) -> None:
        ax, av, av2 = self._ax_loss, self._ax_val, self._ax_val2
        for a in (ax, av, av2):
            a.cla()
        losses = {k: v for k, v in self.loss_history.items() if any(y != 0 for _, y in v)}
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
        left = {k: v for k, v in self.val_history.items() if "psnr" in k}
        right = {k: v for k, v in self.val_history.items() if "psnr" not in k}
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
        self.canvas.draw_idle()

    # --- hand-over ----------------------------------------------------------------------
    def _find_denoise_widget(self) -> Any:
        from napari_langmamba.widgets.denoise import DenoiseWidget

        for widget in self.viewer.window.dock_widgets.values():
            if isinstance(widget, DenoiseWidget):
                return widget
        _, widget = self.viewer.window.add_plugin_dock_widget("napari-langmamba", "Denoise")
        return widget

    def use_in_denoise(self) -> Path | None:
        """Make the run's checkpoint (``best/``, else ``last/``) the Denoise widget's weights.

        Opens the Denoise widget when it is not docked yet. Returns the checkpoint, or None
        (with a message) when the output folder holds no trained denoiser.
        """
        try:
            output = _optional_path(self.output_edit.text())
            if output is None:
                raise ConfigError("Choose the run folder of a trained seed (stage 2) run.")
            info = inspect_run(output)
            if info.stage != "seed":
                what = f"a {info.stage} run" if info.stage else "no training run"
                raise ConfigError(
                    f"{output} holds {what}; only a seed (stage 2) run gives a denoiser for the Denoise widget."
                )
            if info.checkpoint is None:
                raise ConfigError(f"{output} holds no checkpoint yet; train (or resume) the run first.")
            widget = self._find_denoise_widget()
            widget.set_weights(info.checkpoint)
        except Exception as exc:  # shown to the user; the widget stays usable
            self.report_error(exc, context="Use in Denoise")
            return None
        self.report_info(f"The Denoise widget now uses {info.checkpoint}.")
        return info.checkpoint
