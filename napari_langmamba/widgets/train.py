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

The widget is the form and the views; the settings, their command and their checks are
:mod:`napari_langmamba.widgets._train_form` (no Qt), the metrics history and its plot
:mod:`napari_langmamba.widgets._train_history` (no Qt), and the process
:class:`~napari_langmamba.widgets._train_process.TrainProcess`.
"""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from qtpy.QtCore import QTimer
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

from napari_langmamba.errors import LangMambaError
from napari_langmamba.training_runs import inspect_run
from napari_langmamba.widgets._base import WidgetBase
from napari_langmamba.widgets._train_form import (
    BACKBONE_LABELS,
    DATA_LABELS,
    DEVICES,
    OUTPUT_LABELS,
    STAGE_FIELDS,
    STAGES,
    TRAINING_STAGES,
    TrainingRunState,
    TrainSettings,
    TrainStatus,
    adopted_run_hint,
    build_arguments,
    can_resume,
    format_eta,
    lr_text,
    optional_path,
    parse_extra_options,
    parse_learning_rate,
    recorded_form,
    split_paths,
    stage_choices,
    stage_default,
    stage_rows,
    validate_settings,
)
from napari_langmamba.widgets._train_history import draw_history, ingest_record
from napari_langmamba.widgets._train_process import (  # noqa: F401  (ERROR_LINES_SHOWN, NOTIFICATION_LINES: tests)
    ERROR_LINES_SHOWN,
    NOTIFICATION_LINES,
    TrainProcess,
)

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

PERSISTED_FIELDS = (
    "stage_combo", "data_edit", "val_edit", "output_edit", "preset_combo", "epochs_spin", "steps_spin",
    "batch_spin", "patch_spin", "lr_edit", "backbone_combo", "lambda_spin", "langae_edit", "codebook_edit",
    "candidates_edit", "checkpoint_edit", "dose_spin", "device_combo", "amp_combo", "extra_edit",
)
"""The form's fields remembered between napari sessions, in the order they are restored."""
LOG_BLOCKS = 2000


class TrainWidget(TrainProcess, WidgetBase):
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
        self._init_process()
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
        lr = self._row("lr_edit", QLineEdit(lr_text(stage_default("seed", "lr"))), "Learning rate")
        lr.setPlaceholderText(f"{lr_text(stage_default('langae', 'base_lr'))} x batch size")

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
        amp = self._row("amp_combo", QComboBox(), "Precision")
        amp.addItems(stage_choices("amp"))
        amp.setCurrentText(stage_default("seed", "amp"))
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
        amp.currentIndexChanged.connect(self._on_form_changed)
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
        for name, visible in stage_rows(stage).items():
            self._set_row_visible(name, visible)
        self._set_row_label("data", DATA_LABELS[stage])
        self._set_row_label("output", OUTPUT_LABELS.get(stage, "Run folder"))
        if training and not self._filling:
            # Switch the stage-specific defaults, but keep a value the user typed.
            other = "langae" if stage == "seed" else "seed"
            if self.patch_spin.value() == stage_default(other, "patch_size"):
                self.patch_spin.setValue(stage_default(stage, "patch_size"))
            if self.lr_edit.text().strip() == lr_text(stage_default(other, "lr")):
                self.lr_edit.setText(lr_text(stage_default(stage, "lr")))
        self._on_form_changed()

    def settings(self) -> TrainSettings:
        """The form's current choices (raises :class:`ConfigError` on an unreadable value)."""
        lr = parse_learning_rate(self.lr_edit.text())
        extra = parse_extra_options(self.extra_edit.text())
        device = self.device_combo.currentText().strip() or "auto"
        return TrainSettings(
            stage=self.stage,
            data=split_paths(self.data_edit.text()),
            val_data=split_paths(self.val_edit.text()),
            output=optional_path(self.output_edit.text()),
            preset=self.preset_combo.currentText(),
            epochs=int(self.epochs_spin.value()),
            steps_per_epoch=int(self.steps_spin.value()),
            batch_size=int(self.batch_spin.value()),
            patch_size=int(self.patch_spin.value()),
            lr=lr,
            langda_weight=float(self.lambda_spin.value()),
            backbone=str(self.backbone_combo.currentData()),
            codebook=self.codebook_edit.text().strip() or None,  # None: the stage's default
            langae=optional_path(self.langae_edit.text()),
            candidates=optional_path(self.candidates_edit.text()),
            checkpoint=optional_path(self.checkpoint_edit.text()),
            dose=float(self.dose_spin.value()),
            device=device,
            amp=self.amp_combo.currentText(),
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
        self._filling = True
        try:
            for name, value in recorded_form(info.stage, info.options).items():
                control = getattr(self, name)
                if isinstance(control, QLineEdit):
                    control.setText(value)
                elif isinstance(control, (QSpinBox, QDoubleSpinBox)):
                    control.setValue(value)
                elif control.findData(value) >= 0:  # the stage and backbone combos hold keys as data
                    control.setCurrentIndex(control.findData(value))
                else:
                    control.setCurrentText(value)
        finally:
            self._filling = False
        self._on_form_changed()
        return True

    def _adopt_existing_run(self) -> None:
        if self.run_state.status.active:
            return
        output = optional_path(self.output_edit.text())
        if output is None or self.stage not in TRAINING_STAGES:
            return
        info = inspect_run(output)
        if info.holds_run and self.load_run_settings(output):
            hint = adopted_run_hint(info)
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
        output = optional_path(self.output_edit.text())
        info = inspect_run(output) if output is not None and not active else None
        self.resume_button.setEnabled(can_resume(info, self.stage))
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
        ingest_record(record, self.run_state, self.loss_history, self.val_history)

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
        draw_history(self._ax_loss, self._ax_val, self._ax_val2, self.loss_history, self.val_history)
        self.canvas.draw_idle()
