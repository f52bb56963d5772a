"""The process half of the Train widget: start, stop, resume ``python -m training`` and read it.

:class:`TrainProcess` is mixed into :class:`~napari_langmamba.widgets.train.TrainWidget`. It
starts the stage in a :class:`~qtpy.QtCore.QProcess` (unbuffered, the same interpreter), keeps
its output in the Log tab and the last stderr lines for an error report, stops it with SIGTERM
(the trainer checkpoints) and kills it after the widget's ``stop_timeout_s``, and turns its
exit into the run state's final status with a message; Use in Denoise hands a finished run's
checkpoint to the Denoise widget. :class:`_ProcessGuard` ends a run still going when the
widget is destroyed.
"""

from __future__ import annotations

import logging
import shlex
import sys
from collections import deque
from pathlib import Path
from typing import Any

from napari.utils.notifications import show_error
from qtpy.QtCore import QProcess, QProcessEnvironment, QTimer
from qtpy.QtWidgets import QLineEdit, QPlainTextEdit

from napari_langmamba.errors import ConfigError, LangMambaError
from napari_langmamba.training_runs import MetricsTail, inspect_run, parse_tqdm_progress
from napari_langmamba.widgets._train_form import (
    TRAINING_STAGES,
    TrainingRunState,
    TrainSettings,
    TrainStatus,
    build_arguments,
    optional_path,
    resume_arguments,
    validate_settings,
)

logger = logging.getLogger(__name__)

STDERR_LINES_KEPT = 400
ERROR_LINES_SHOWN = 12
NOTIFICATION_LINES = 6


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



class TrainProcess:
    """Start, stop and follow the training process (mixed into ``TrainWidget``).

    It reads the widget's ``run_state``, ``settings()``, ``poll()``, ``stop_timeout_s``, its
    timers and its ``log_box``, ``error_box``, ``command_edit``, ``langae_edit`` and
    ``checkpoint_edit``.
    """

    run_state: TrainingRunState
    stop_timeout_s: float
    log_box: QPlainTextEdit
    error_box: QPlainTextEdit
    command_edit: QLineEdit
    _poll_timer: QTimer
    _kill_timer: QTimer

    def _init_process(self) -> None:
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
            if resume and self._last_args:
                args = resume_arguments(self._last_args, args, settings.output)
        except LangMambaError as exc:
            self.report_error(exc, context="Train")
            return False
        self._start_process(settings, args, resume=resume)
        return True

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
            output = optional_path(self.output_edit.text())
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
