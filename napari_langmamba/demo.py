"""The GUI main job: ``python -m napari_langmamba.demo``.

Opens napari with this plugin's dock widgets (:data:`DOCK_WIDGETS`) and a real CT loaded:
the abdominal DICOM series of ``../shared/data`` next to a source checkout when present
(read through the Load CT widget, in its worker, so the progress bar shows), otherwise the
plugin's ``abdomen`` sample (a real 512 x 512 slice that ships with ``pydicom-data``).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PLUGIN = "napari-langmamba"
DOCK_WIDGETS: tuple[str, ...] = ("Load CT", "Denoise", "Compare", "Tokens", "Train")
"""Display names (napari.yaml) of the dock widgets opened, in order; the first is the loader."""
STACKED_WIDGETS = 2
"""The first widgets are stacked one above the other; the rest share tabs with the last of those."""
FRONT_WIDGET = "Denoise"
"""The tab in front at start: what a first user is looking for after loading a CT."""

_SHARED_DATA = Path(os.environ.get("LANGMAMBA_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SAMPLE_SERIES = _SHARED_DATA / "ct" / "abdomen_dicom_series"
SAMPLE_KEY = "abdomen"


def dock_widgets(viewer: Any, names: Sequence[str] = DOCK_WIDGETS) -> dict[str, Any]:
    """Dock the plugin's widgets named ``names`` and return them by name.

    Load CT on top; below it one tab group (Denoise, Compare, Tokens, Train) with
    :data:`FRONT_WIDGET` in front; the window then fits the screen (:func:`fit_window_to_screen`).
    """
    docked, docks = {}, {}
    for index, name in enumerate(names):
        tabify = index >= STACKED_WIDGETS
        docks[name], docked[name] = viewer.window.add_plugin_dock_widget(PLUGIN, name, tabify=tabify)
    if FRONT_WIDGET in docks:  # tabifying raised the last one added
        from qtpy.QtCore import QTimer

        front = docks[FRONT_WIDGET]
        front.raise_()
        QTimer.singleShot(0, front.raise_)  # again once the window is shown: Qt applies it to the tab bar then
    fit_window_to_screen(viewer)
    if STACKED_WIDGETS <= len(names):  # the loader above the tab group: room for all its controls
        from qtpy.QtCore import QTimer

        loader, below = names[0], names[STACKED_WIDGETS - 1]

        def fit_loader() -> None:
            try:
                fit_dock_to_controls(viewer, docks[loader], docked[loader], docks[below])
            except RuntimeError:  # the window was closed first (its Qt objects are gone)
                logger.debug("the viewer closed before its docks were laid out")

        QTimer.singleShot(0, fit_loader)  # once the window is laid out: the docks' heights are known then
    return docked


def fit_dock_to_controls(viewer: Any, dock: Any, widget: Any, below: Any) -> int:
    """Make ``dock`` (one of the project's widgets) tall enough for its controls, taking the height from ``below``.

    Stacked above a dock that asks for more room (the tab group of Denoise, Compare, Tokens and
    Train), the loader would start at its minimum height, a few rows, the rest scrolled away.
    ``below`` keeps at least its minimum height. Returns the height ``dock`` gets.
    """
    from qtpy.QtCore import Qt

    total = dock.height() + below.height()  # both change, the sum does not: nothing else moves
    height = min(dock.height() - widget.height() + widget.controls_height(),
                 total - below.minimumSizeHint().height())
    viewer.window._qt_window.resizeDocks([dock, below], [height, total - height], Qt.Orientation.Vertical)
    return height


def fit_window_to_screen(viewer: Any) -> tuple[int, int]:
    """Size the viewer's window to the screen's available area (its frame included); return (w, h).

    The dock widgets scroll when the room is short, so nothing asks for more than the screen.
    """
    from qtpy.QtGui import QGuiApplication

    window = viewer.window._qt_window
    screen = window.screen() or QGuiApplication.primaryScreen()
    if screen is None:
        return window.width(), window.height()
    available = screen.availableGeometry()
    frame_w = max(0, window.frameGeometry().width() - window.geometry().width())
    frame_h = max(0, window.frameGeometry().height() - window.geometry().height())
    width, height = available.width() - frame_w, available.height() - frame_h
    window.resize(width, height)
    window.move(available.topLeft())
    return window.width(), window.height()


def load_sample(viewer: Any, load_widget: Any, series: Path | None = SAMPLE_SERIES) -> Any:
    """Start loading the real series through the Load CT widget, or open the bundled sample.

    Returns the widget's worker while the series is scanned (None when the sample was opened).
    """
    if series is not None and Path(series).exists():
        load_widget.open(str(series))  # scan (the table lists the series), then load it
        return load_widget.worker
    logger.info("%s not found: opening the plugin's %r sample instead", series, SAMPLE_KEY)
    viewer.open_sample(PLUGIN, SAMPLE_KEY)
    return None


def build_viewer(*, show: bool = True, series: Path | None = SAMPLE_SERIES) -> tuple[Any, dict[str, Any]]:
    """A napari viewer with :data:`DOCK_WIDGETS` docked and the sample CT loading."""
    import napari

    viewer = napari.Viewer(title="napari-langmamba", show=show)
    widgets = dock_widgets(viewer)
    load_sample(viewer, widgets[DOCK_WIDGETS[0]], series)
    return viewer, widgets


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m napari_langmamba.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=Path, default=SAMPLE_SERIES, help="DICOM folder or CT file to open")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    import napari

    build_viewer(show=True, series=args.series)
    napari.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
