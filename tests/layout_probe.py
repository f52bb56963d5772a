"""Run by tests/test_main_window_layout.py in its own Xvfb screen: build the main job, report its layout.

    DISPLAY=:N python tests/layout_probe.py {demo|one-by-one} SERIES

Prints one JSON object: the screen, the window's geometry, whether the Denoise widget (and its
Run button) is visible and inside the window at start, whether the Load CT widget shows its
controls without scrolling (at start and once the series is loaded), which dock tab is in front,
and how much of the canvas the loaded image fills.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def wait(app, predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the series did not load in time")
        app.processEvents()
        time.sleep(0.02)
    for _ in range(30):
        app.processEvents()
        time.sleep(0.01)


def inside(widget, window) -> bool:
    """``widget`` is shown, not covered by a scroll position or tab, and wholly inside ``window``."""
    if widget.visibleRegion().isEmpty():
        return False
    top_left = widget.mapTo(window, widget.rect().topLeft())
    rect = widget.rect().translated(top_left)
    return window.rect().contains(rect)


def controls_shown(widget, window) -> dict:
    """How tall ``widget`` (a project dock widget) starts, and whether its controls show without scrolling."""
    scroll = widget.scroll_area.verticalScrollBar()
    return {
        "load_height": widget.height(),
        "load_content_height": widget.content.minimumSizeHint().height(),
        "load_scrolls": scroll.maximum() > scroll.minimum(),
        "load_controls_visible": all(inside(control, window) for control in load_controls(widget)),
    }


def load_controls(widget) -> list:
    """The Load CT widget's controls, from the path field to the window preset."""
    return [widget.path_edit, widget.scan_button, widget.series_table, widget.load_button, widget.window_combo]


def main(mode: str, series: str) -> dict:
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_langmamba import demo

    if mode == "demo":
        viewer, widgets = demo.build_viewer(show=True, series=Path(series))
    else:  # the Plugins menu: each widget docked on its own, one after the other
        viewer = napari.Viewer(title="napari-langmamba", show=True)
        widgets = {}
        for name in demo.DOCK_WIDGETS:
            _dock, widgets[name] = viewer.window.add_plugin_dock_widget(demo.PLUGIN, name)
        demo.fit_window_to_screen(viewer)
        widgets["Load CT"].open(series)
    app = QApplication.instance()
    window = viewer.window._qt_window
    load, denoise = widgets["Load CT"], widgets["Denoise"]
    for _ in range(30):  # the window is shown and laid out (the series is still being read)
        app.processEvents()
        time.sleep(0.01)
    at_start = {
        "denoise_visible": inside(denoise, window),
        "run_button_visible": inside(denoise.run_button, window),
        "load_visible": inside(load, window),
        **controls_shown(load, window),
    }
    wait(app, lambda: len(viewer.layers) == 1 and load.worker is None)
    loaded = controls_shown(load, window)
    layer = viewer.layers[0]
    canvas = viewer.window._qt_viewer.canvas.native
    extent = [n * s for n, s in zip(layer.data.shape[-2:], layer.scale[-2:], strict=True)]
    zoom = viewer.camera.zoom
    fill = [zoom * extent[0] / canvas.height(), zoom * extent[1] / canvas.width()]
    screen = window.screen().availableGeometry()
    report = {
        "screen": [screen.width(), screen.height()],
        "window": [window.frameGeometry().width(), window.frameGeometry().height()],
        "window_rect": [window.x(), window.y(), window.width(), window.height()],
        "canvas": [canvas.width(), canvas.height()],
        "fill": fill,
        "layer_shape": list(layer.data.shape),
        "front_tabs": [
            name for name, widget in widgets.items() if not widget.visibleRegion().isEmpty()
        ],
        **at_start,
        "load_scrolls_when_loaded": loaded["load_scrolls"],
    }
    viewer.close()
    return report


if __name__ == "__main__":
    print("LAYOUT " + json.dumps(main(sys.argv[1], sys.argv[2])))
