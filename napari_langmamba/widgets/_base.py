"""A small base shared by every dock widget of the project.

It gives each widget the same habits:

- controls are bound to attributes with :meth:`WidgetBase.bind`, which also sets the
  control's tooltip from :mod:`napari_langmamba.widgets.tooltips`;
- long work is a generator of :class:`~napari_langmamba.events.Progress` run by
  :meth:`WidgetBase.run_generator` in a napari ``thread_worker``; its events drive the
  widget's progress bar and :meth:`WidgetBase.cancel` stops it at the next ``yield``;
- an exception raised in that work never reaches the user as a traceback: a
  :class:`~napari_langmamba.errors.LangMambaError` becomes a napari error notification with
  its message, anything else is logged with its traceback and reported as an unexpected
  error; the widget stays usable either way;
- the widget's state (idle, running, done, cancelled, failed) is evented
  (``state_changed``), and buttons follow it.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from napari.qt.threading import GeneratorWorker, thread_worker
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Signal
from qtpy.QtWidgets import QFormLayout, QLabel, QProgressBar, QVBoxLayout, QWidget

from napari_langmamba.errors import LangMambaError
from napari_langmamba.events import Progress
from napari_langmamba.widgets.tooltips import get_tooltip

logger = logging.getLogger(__name__)

T = TypeVar("T")
W = TypeVar("W", bound=QWidget)


class WorkerState(str, enum.Enum):
    """What a widget's background work is doing."""

    IDLE = "idle"
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"
    FAILED = "failed"


@dataclass(frozen=True)
class _Failure:
    """An exception caught in the worker thread, carried to the GUI thread as a result.

    Catching inside the thread (rather than using the worker's ``errored`` signal) keeps
    napari from showing its traceback notification: the widget decides what the user sees.
    """

    error: BaseException


def _guarded(generator: Generator[Progress, None, T]) -> Generator[Progress, None, T | _Failure]:
    try:
        return (yield from generator)
    except Exception as exc:  # every exception is reported to the user on the GUI thread
        return _Failure(exc)


def _call(func: Callable[[], T]) -> Generator[Progress, None, T]:
    """A plain function as a generator without progress, so both share one worker path."""
    return func()
    yield  # unreachable; makes this a generator function


def error_message(exc: BaseException) -> str:
    """What to tell the user about ``exc``: our own errors verbatim, others as unexpected."""
    if isinstance(exc, LangMambaError):
        return str(exc)
    return (
        f"Unexpected error ({type(exc).__name__}: {exc}). This is a bug in napari-langmamba; "
        "the full traceback is in the log."
    )


class WidgetBase(QWidget):
    """Base of the project's dock widgets (npe2: constructed with ``napari_viewer``).

    Subclasses set :attr:`TOOLTIP_SECTION`, build their controls with :meth:`bind` and run
    long work with :meth:`run_generator` or :meth:`run_function`.
    """

    TOOLTIP_SECTION: ClassVar[str] = ""
    state_changed = Signal(str)
    """Emitted with the new :class:`WorkerState` value whenever the state changes."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self._state = WorkerState.IDLE
        self._worker: GeneratorWorker | None = None
        self._bound: dict[str, QWidget] = {}

        self._layout = QVBoxLayout(self)
        self._form = QFormLayout()
        self._layout.addLayout(self._form)

        self.progress_bar = QProgressBar()
        self.progress_bar.setVisible(False)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)

    # --- controls ---------------------------------------------------------------------
    def bind(self, name: str, control: W, *, label: str | None = None, add: bool = True) -> W:
        """Bind ``control`` to ``self.<name>``, give it its tooltip and (optionally) lay it out.

        ``label`` puts it in the widget's form with that label; without one it spans the row.
        ``add=False`` only binds (for controls placed in a sub-layout by the caller).
        """
        setattr(self, name, control)
        control.setObjectName(name)
        tooltip = get_tooltip(f"{self.TOOLTIP_SECTION}.{name}")
        if tooltip:
            control.setToolTip(tooltip)
        self._bound[name] = control
        if add:
            if label is None:
                self._form.addRow(control)
            else:
                self._form.addRow(label, control)
        return control

    @property
    def bound_controls(self) -> dict[str, QWidget]:
        """Every control bound with :meth:`bind`, by attribute name."""
        return dict(self._bound)

    def add_status_rows(self) -> None:
        """Place the shared progress bar and status label (call once, after the controls)."""
        self.bind("progress_bar", self.progress_bar)
        self.bind("status_label", self.status_label)

    # --- messages ---------------------------------------------------------------------
    def set_status(self, message: str) -> None:
        """Show ``message`` in the widget's status line (no notification)."""
        self.status_label.setText(message)

    def report_info(self, message: str) -> None:
        """Status line plus a napari info notification."""
        self.set_status(message)
        show_info(message)

    def report_warning(self, message: str) -> None:
        """Status line plus a napari warning notification."""
        self.set_status(message)
        show_warning(message)

    def report_error(self, exc: BaseException, *, context: str = "") -> str:
        """Tell the user about ``exc`` with a napari notification; return the message shown.

        A :class:`LangMambaError` is expected (bad input) and logged at INFO; anything else
        is a bug, logged with its traceback.
        """
        message = error_message(exc)
        if context:
            message = f"{context}: {message}"
        if isinstance(exc, LangMambaError):
            logger.info("%s", message)
        else:
            logger.error("%s", message, exc_info=(type(exc), exc, exc.__traceback__))
        self.set_status(message)
        show_error(message)
        return message

    # --- progress ---------------------------------------------------------------------
    def start_progress(self, total: int = 0) -> None:
        """Show the progress bar; ``total <= 0`` shows a busy indicator."""
        self.progress_bar.setRange(0, max(0, int(total)))
        self.progress_bar.setValue(0)
        self.progress_bar.setVisible(True)

    def update_progress(self, event: Progress) -> None:
        """Move the progress bar to ``event`` and show its message."""
        if event.total > 0:
            if self.progress_bar.maximum() != event.total:
                self.progress_bar.setRange(0, int(event.total))
            self.progress_bar.setValue(int(min(event.done, event.total)))
        if event.message:
            self.set_status(event.message)

    def finish_progress(self) -> None:
        """Hide the progress bar."""
        self.progress_bar.setVisible(False)

    # --- state ------------------------------------------------------------------------
    @property
    def state(self) -> WorkerState:
        return self._state

    def _set_state(self, state: WorkerState) -> None:
        if state is not self._state:
            self._state = state
            self.state_changed.emit(state.value)

    @property
    def worker(self) -> GeneratorWorker | None:
        """The running worker, if any (tests wait on its ``finished`` signal)."""
        return self._worker

    @property
    def busy(self) -> bool:
        return self._worker is not None

    # --- workers ----------------------------------------------------------------------
    def run_generator(
        self,
        generator: Generator[Progress, None, T],
        *,
        on_returned: Callable[[T], None],
        on_failed: Callable[[BaseException], None] | None = None,
        on_finished: Callable[[], None] | None = None,
        show_progress: bool = True,
        context: str = "",
    ) -> GeneratorWorker:
        """Run ``generator`` in a napari thread worker and return the (started) worker.

        Its :class:`Progress` events drive the progress bar; its return value goes to
        ``on_returned`` on the GUI thread; an exception is reported with
        :meth:`report_error` (prefixed with ``context``) and then passed to ``on_failed``.
        ``on_finished`` runs last in every case, once the widget is free for the next task.
        Only one worker runs per widget: starting another while one runs is refused.
        """
        if self._worker is not None:
            raise RuntimeError("this widget is already running a task; cancel it first")

        def _work() -> Generator[Progress, None, Any]:
            return (yield from _guarded(generator))

        worker = thread_worker(_work, start_thread=False)()
        self._worker = worker

        def _yielded(event: object) -> None:
            if show_progress and isinstance(event, Progress):
                self.update_progress(event)

        def _returned(result: object) -> None:
            if isinstance(result, _Failure):
                self._set_state(WorkerState.FAILED)
                self.report_error(result.error, context=context)
                if on_failed is not None:
                    on_failed(result.error)
                return
            self._set_state(WorkerState.DONE)
            try:
                on_returned(result)
            except Exception as exc:  # a failing result handler must not kill the widget
                self._set_state(WorkerState.FAILED)
                self.report_error(exc, context=context)
                if on_failed is not None:
                    on_failed(exc)

        def _aborted() -> None:
            self._set_state(WorkerState.CANCELLED)
            self.set_status("Cancelled.")

        def _finished() -> None:
            self._worker = None
            if show_progress:
                self.finish_progress()
            if self._state is WorkerState.RUNNING:  # neither returned nor aborted
                self._set_state(WorkerState.IDLE)
            if on_finished is not None:
                on_finished()

        worker.yielded.connect(_yielded)
        worker.returned.connect(_returned)
        worker.aborted.connect(_aborted)
        worker.finished.connect(_finished)
        if show_progress:
            self.start_progress(0)
        self._set_state(WorkerState.RUNNING)
        worker.start()
        return worker

    def run_function(
        self,
        func: Callable[[], T],
        *,
        on_returned: Callable[[T], None],
        on_failed: Callable[[BaseException], None] | None = None,
        on_finished: Callable[[], None] | None = None,
        show_progress: bool = False,
        context: str = "",
    ) -> GeneratorWorker:
        """Run ``func()`` (bind arguments with :func:`functools.partial`) in a worker.

        Same result and error handling as :meth:`run_generator`.
        """
        return self.run_generator(
            _call(func),
            on_returned=on_returned,
            on_failed=on_failed,
            on_finished=on_finished,
            show_progress=show_progress,
            context=context,
        )

    def cancel(self) -> None:
        """Ask the running worker (if any) to stop at its next progress event."""
        if self._worker is not None:
            self._worker.quit()
