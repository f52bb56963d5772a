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
  (``state_changed``), and buttons follow it;
- a worker never outlives its widget's attention: when the widget is destroyed (closing the
  viewer deletes its dock widgets) the worker is asked to quit and its remaining signals no
  longer reach the widget; when a layer the work reads is removed from the viewer while it
  runs, the work stops, its result is dropped and the widget says why.

The worker machinery itself (the guarded generator, :class:`WorkerTask`, the lifeline, the
error messages) is Qt-free, in :mod:`napari_langmamba.widgets._worker`; this module is the
Qt side: the scroll area, the form, the status rows and the progress bar.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from napari.layers import Image
from napari.qt.threading import GeneratorWorker, thread_worker
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QSize, Qt, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

from napari_langmamba.errors import LangMambaError
from napari_langmamba.events import Progress
from napari_langmamba.widgets._settings import PersistentControls
from napari_langmamba.widgets._worker import (
    WorkerState,
    WorkerTask,
    _call,
    _Lifeline,
    _run_guarded,
    error_message,
)
from napari_langmamba.widgets.tooltips import get_tooltip
from napari_langmamba.windowing import DEFAULT_WINDOW, PRESETS, Window, get_window

if TYPE_CHECKING:
    from napari.layers import Layer

logger = logging.getLogger(__name__)

CUSTOM_WINDOW = "custom"
"""The window combo's entry for user-typed limits (after the named presets)."""
HU_LIMIT = 32768.0  # window spin box bounds: any HU an int16 DICOM can hold

T = TypeVar("T")
W = TypeVar("W", bound=QWidget)


def ct_image_layers(layers: Iterable[Layer], *, accept: Callable[[Image], bool] | None = None) -> list[Image]:
    """The layers that can hold a CT image in HU (napari Image layers, not RGB), in viewer order.

    ``accept`` narrows them further for one widget (e.g. no multiscale data, no derived layers).
    """
    return [
        layer for layer in layers
        if isinstance(layer, Image) and not layer.rgb and (accept is None or accept(layer))
    ]


MIN_DOCK_HEIGHT = 72
"""Pixels of height a widget needs at the least; the rest of its controls scroll."""


class _FittingScrollArea(QScrollArea):
    """A scroll area as wide as its content (no horizontal scrolling) and as tall as the room it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.setWidgetResizable(True)
        self.setFrameShape(QScrollArea.Shape.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAsNeeded)

    def _extra_width(self) -> int:
        return self.verticalScrollBar().sizeHint().width() + 2 * self.frameWidth()

    def sizeHint(self) -> QSize:
        content = self.widget()
        if content is None:
            return super().sizeHint()
        hint = content.sizeHint()
        return QSize(hint.width() + self._extra_width(), hint.height() + 2 * self.frameWidth())

    def minimumSizeHint(self) -> QSize:
        content = self.widget()
        if content is None:
            return super().minimumSizeHint()
        width = content.minimumSizeHint().width() + self._extra_width()
        return QSize(width, min(MIN_DOCK_HEIGHT, content.minimumSizeHint().height()))


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
        self._persistent: PersistentControls | None = None
        self._lifeline = _Lifeline()
        self.destroyed.connect(self._lifeline.on_widget_destroyed)

        # The controls live in a scroll area: a dock never asks for more height than the screen has
        # (several docks stacked on a 1366 x 768 screen), it scrolls instead.
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        self.scroll_area = _FittingScrollArea()
        self.content = QWidget()
        self.scroll_area.setWidget(self.content)
        outer.addWidget(self.scroll_area)
        self._layout = QVBoxLayout(self.content)
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

    # --- settings that stick between sessions -----------------------------------------
    def persist(self, *names: str) -> dict[str, Any]:
        """Remember the bound controls ``names`` between napari sessions; restore them now.

        Call once, after the controls have their defaults and their own signal handlers (a
        restored value fires them, so the widget follows it). Adds a "Reset to defaults"
        button (``reset_button``). Returns the values restored.
        """
        self._persistent = PersistentControls(self.TOOLTIP_SECTION, {name: self._bound[name] for name in names})
        reset = self.bind("reset_button", QPushButton("Reset to defaults"), add=False)
        reset.clicked.connect(self.reset_settings)
        self._form.addRow(reset)
        return self._persistent.restore()

    @property
    def persisted(self) -> tuple[str, ...]:
        """Names of the controls remembered between sessions."""
        return tuple(self._persistent.controls) if self._persistent is not None else ()

    def reset_settings(self) -> None:
        """Every remembered control back to its default; the stored values are forgotten."""
        if self._persistent is not None:
            self._persistent.reset()
            self.set_status("Settings reset to their defaults.")

    # --- display window (shared by the widgets that show one) -------------------------
    def add_window_row(self) -> None:
        """Add the "Window" row: ``window_combo`` (presets + custom) and ``lower_spin`` /
        ``upper_spin`` (HU limits, editable only for the custom window). Widgets connect their
        own handlers to the three controls."""
        row = QHBoxLayout()
        combo = self.bind("window_combo", QComboBox(), add=False)
        combo.addItems((*PRESETS, CUSTOM_WINDOW))
        combo.setCurrentText(DEFAULT_WINDOW)
        row.addWidget(combo, 1)
        for name in ("lower_spin", "upper_spin"):
            spin = self.bind(name, QDoubleSpinBox(), add=False)
            spin.setRange(-HU_LIMIT, HU_LIMIT)
            spin.setDecimals(0)
            spin.setSuffix(" HU")
            row.addWidget(spin)
        self._form.addRow("Window", row)
        self.show_window_limits(get_window(DEFAULT_WINDOW))

    def current_window(self) -> Window:
        """The window chosen in the combo (a preset, or the custom limits)."""
        name = self.window_combo.currentText()
        if name == CUSTOM_WINDOW:
            return Window.from_limits(self.lower_spin.value(), self.upper_spin.value())
        return get_window(name)

    def show_window_limits(self, window: Window) -> None:
        """Show ``window``'s limits in the spin boxes without firing their signals."""
        custom = self.window_combo.currentText() == CUSTOM_WINDOW
        for spin, value in ((self.lower_spin, window.lower), (self.upper_spin, window.upper)):
            spin.blockSignals(True)
            spin.setValue(value)
            spin.blockSignals(False)
            spin.setEnabled(custom)

    def controls_height(self) -> int:
        """The height this widget needs to show all its controls without scrolling, at its current width.

        The progress bar counts even while hidden (it shows whenever work runs).
        """
        scroll, content = self.scroll_area, self.content
        width = scroll.viewport().width()
        # the status line wraps: the content's height depends on its width
        wanted = content.heightForWidth(width) if content.hasHeightForWidth() else content.sizeHint().height()
        if not self.progress_bar.isVisibleTo(content):
            wanted += self.progress_bar.sizeHint().height() + self._form.verticalSpacing()
        return self.height() - scroll.viewport().height() + wanted

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
        inputs: Sequence[Layer] = (),
    ) -> GeneratorWorker:
        """Run ``generator`` in a napari thread worker and return the (started) worker.

        Its :class:`Progress` events drive the progress bar; its return value goes to
        ``on_returned`` on the GUI thread; an exception is reported with
        :meth:`report_error` (prefixed with ``context``) and then passed to ``on_failed``.
        ``on_finished`` runs last in every case, once the widget is free for the next task.
        Only one worker runs per widget: starting another while one runs is refused.

        ``inputs`` are the layers the work reads: when one of them is removed from the viewer
        before the result is handled, the work is stopped at its next progress event, its
        result (if it still arrives) is dropped, and the widget ends cancelled with a warning
        naming the layer. When the widget itself is destroyed (the viewer closed), the work is
        stopped the same way and nothing is reported.
        """
        if self._worker is not None:
            raise RuntimeError("this widget is already running a task; cancel it first")
        worker = thread_worker(_run_guarded, start_thread=False)(generator)
        self._worker = worker
        self._lifeline.worker = worker
        task = WorkerTask(
            self, worker, on_returned=on_returned, on_failed=on_failed, on_finished=on_finished,
            show_progress=show_progress, context=context, inputs=inputs,
        )
        task.connect()
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
        inputs: Sequence[Layer] = (),
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
            inputs=inputs,
        )

    def cancel(self) -> None:
        """Ask the running worker (if any) to stop at its next progress event."""
        if self._worker is not None:
            self._worker.quit()
