"""How a dock widget's background work runs and reports, without Qt.

:meth:`WidgetBase.run_generator <napari_langmamba.widgets._base.WidgetBase.run_generator>`
runs :func:`_run_guarded` in a napari thread worker: the work's exception is caught in the
worker thread and carried to the GUI thread as a :class:`_Failure` result, so the widget (not
napari's traceback notification) decides what the user sees (:func:`error_message`). A
:class:`WorkerTask` holds the handlers of one worker's signals; a :class:`_Lifeline` tells
them whether the widget still exists. The worker and the widget are used through their
methods only, so all of this is tested with stand-ins.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from napari_langmamba.errors import LangMambaError
from napari_langmamba.events import Progress

if TYPE_CHECKING:
    from napari.layers import Layer
    from napari.qt.threading import GeneratorWorker

    from napari_langmamba.widgets._base import WidgetBase

T = TypeVar("T")


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


def _run_guarded(generator: Generator[Progress, None, T]) -> Generator[Progress, None, T | _Failure]:
    """The worker's generator function: ``generator`` with its exception caught (:func:`_guarded`)."""
    return (yield from _guarded(generator))


@dataclass(eq=False)
class WorkerTask:
    """One run of :meth:`WidgetBase.run_generator`: the handlers of its worker's signals.

    ``yielded`` moves the progress bar; ``returned`` hands the result (or reports the caught
    error) and sets the widget's state; ``aborted`` marks it cancelled; ``finished`` frees the
    widget for the next task and runs ``on_finished``. Each touches the widget only while it
    is alive (its :class:`_Lifeline`). ``inputs`` are the layers the work reads: removing one
    from the viewer (``layer_removed``) quits the worker, and its result is then dropped. The
    other fields are :meth:`WidgetBase.run_generator`'s arguments.
    """

    widget: WidgetBase
    worker: Any
    on_returned: Callable[[Any], None]
    on_failed: Callable[[BaseException], None] | None = None
    on_finished: Callable[[], None] | None = None
    show_progress: bool = True
    context: str = ""
    inputs: Sequence[Layer] = ()

    def __post_init__(self) -> None:
        self.lifeline = self.widget._lifeline
        self.watched = [layer for layer in self.inputs if layer is not None]
        self.watching = bool(self.watched)
        self.removed: list[str] = []  # names of input layers removed while the work ran

    def connect(self) -> None:
        """Connect the handlers to the worker (and the viewer's layer list, when there are inputs).

        Through partials: PyQt holds a bound method's object only weakly, and the worker's
        connections are what keep this task alive until its worker has finished.
        """
        worker = self.worker
        worker.yielded.connect(partial(WorkerTask.yielded, self))
        worker.returned.connect(partial(WorkerTask.returned, self))
        worker.aborted.connect(partial(WorkerTask.aborted, self))
        worker.finished.connect(partial(WorkerTask.finished, self))
        if self.watching:
            self.widget.viewer.layers.events.removed.connect(self.layer_removed)

    def layer_removed(self, event: Any) -> None:
        """A layer left the viewer: if the work reads it, stop the work (once)."""
        layer = getattr(event, "value", None)
        if not self.removed and any(layer is watched for watched in self.watched):
            self.removed.append(layer.name)
            self.worker.quit()

    def yielded(self, event: object) -> None:
        if self.lifeline.alive and self.show_progress and isinstance(event, Progress):
            self.widget.update_progress(event)

    def returned(self, result: object) -> None:
        if not self.lifeline.alive or self.removed:  # nobody to show it to, or its input is gone
            return
        self.watched.clear()  # handled: removing an input from now on is the user's own business
        if isinstance(result, _Failure):
            self._fail(result.error)
            return
        self.widget._set_state(WorkerState.DONE)
        try:
            self.on_returned(result)
        except Exception as exc:  # a failing result handler must not kill the widget
            self._fail(exc)

    def _fail(self, error: BaseException) -> None:
        self.widget._set_state(WorkerState.FAILED)
        self.widget.report_error(error, context=self.context)
        if self.on_failed is not None:
            self.on_failed(error)

    def aborted(self) -> None:
        if not self.lifeline.alive or self.removed:  # reported once finished
            return
        self.widget._set_state(WorkerState.CANCELLED)
        self.widget.set_status("Cancelled.")

    def finished(self) -> None:
        if self.watching:
            self.widget.viewer.layers.events.removed.disconnect(self.layer_removed)
        if self.lifeline.worker is self.worker:
            self.lifeline.worker = None
        if not self.lifeline.alive:
            return
        widget = self.widget
        widget._worker = None
        if self.show_progress:
            widget.finish_progress()
        if self.removed:
            widget._set_state(WorkerState.CANCELLED)
            what = f"{self.context}: stopped" if self.context else "Stopped"
            widget.report_warning(
                f"{what}, because the input layer {self.removed[0]!r} was removed from the viewer while it "
                "ran; nothing was added. Load the layer again to redo it."
            )
        elif widget.state is WorkerState.RUNNING:  # neither returned nor aborted
            widget._set_state(WorkerState.IDLE)
        if self.on_finished is not None:
            self.on_finished()


def _call(func: Callable[[], T]) -> Generator[Progress, None, T]:
    """A plain function as a generator without progress, so both share one worker path."""
    return func()
    yield  # unreachable; makes this a generator function


class _Lifeline:
    """Whether a widget still exists, and the worker to stop when it goes away.

    Not a QObject, so its connection to the widget's ``destroyed`` signal survives the widget
    (the same habit as the Train widget's process guard). Worker signal handlers check
    :attr:`alive` first: after the viewer closes they must not touch the deleted widget.
    """

    def __init__(self) -> None:
        self.alive = True
        self.worker: GeneratorWorker | None = None

    def on_widget_destroyed(self, *_: object) -> None:
        self.alive = False
        if self.worker is not None:
            self.worker.quit()  # stop at the next progress event: nobody waits for the result


def error_message(exc: BaseException) -> str:
    """What to tell the user about ``exc``: our own errors verbatim, others as unexpected."""
    if isinstance(exc, LangMambaError):
        return str(exc)
    return (
        f"Unexpected error ({type(exc).__name__}: {exc}). This is a bug in napari-langmamba; "
        "the full traceback is in the log."
    )
