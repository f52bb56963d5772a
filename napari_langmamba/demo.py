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
"""The first widgets are stacked one above the other; the rest share tabs beside them."""

_SHARED_DATA = Path(os.environ.get("LANGMAMBA_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SAMPLE_SERIES = _SHARED_DATA / "ct" / "abdomen_dicom_series"
SAMPLE_KEY = "abdomen"


def dock_widgets(viewer: Any, names: Sequence[str] = DOCK_WIDGETS) -> dict[str, Any]:
    """Dock the plugin's widgets named ``names`` and return them by name."""
    docked = {}
    for index, name in enumerate(names):
        tabify = index >= STACKED_WIDGETS
        _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name, tabify=tabify)
        docked[name] = widget
    return docked


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
