"""Screenshots of the plugin for the README, made under Xvfb.

    xvfb-run -a -s "-screen 0 1920x1080x24" .venv/bin/python scripts/screenshot.py [--out docs/images]
    xvfb-run -a -s "-screen 0 1920x1080x24" .venv/bin/python scripts/screenshot.py --tokens-only

1. ``load_ct.png``: napari with the dock widgets of the main job (``napari_langmamba.demo``,
   Denoise in front) and the real abdominal series of ``../shared/data`` loaded through the
   Load CT widget, on a 1920 x 1080 screen (the main job sizes its window to the screen).
   ``denoise.png``: the Denoise widget's result for the current slice (the bundled default
   model) shown at 50 % strength, set after the run (the model runs once). ``--no-tokens``
   makes only these and the compare images.
2. ``compare.png`` and ``compare_figure.png``: the Compare widget on one real slice: the
   normal-dose slice (reference), a low-dose version simulated by the project's projection-
   domain simulator (``training.simulate``) and its denoised result (the bundled default
   model; with ``--stand-in`` when no weights are available, a Gaussian filter clearly named
   as a stand-in), side by side with the ROI crops and metrics; the second file is the
   widget's PNG export.
3. ``tokens.png`` and ``tokens_zoom.png`` (``--tokens-only`` makes just these two): the Tokens
   widget on the same real slice in a fresh 1920 x 1080 window, with the token pyramid of the
   bundled default LangAE. ``tokens.png``: pyramid layer 2, its regions coloured by word with
   the legend of the slice's words by area, words written where they fit, and a click on the
   liver, so the list shows the words of the three layers there. ``tokens_zoom.png``: pyramid
   layer 3 zoomed onto the liver, spine and aorta, where the fine words fit their regions.
   The words at the liver, spine, aorta, air outside the body and subcutaneous fat are logged.

PNGs larger than ``--max-kb`` are saved with a 256-colour palette (and downscaled if that is
not enough), so the README stays light.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from napari_langmamba.widgets._settings import SETTINGS_ENV

REPO = Path(__file__).resolve().parents[1]
logger = logging.getLogger("screenshot")

LIVER_PIXEL = (250, 150)  # (row, column) of a liver pixel on the 512 x 512 slices
# (row, column) on slice 10 of the real series (checked on the image and its tissue map)
ANATOMY_PIXELS = {
    "liver": LIVER_PIXEL,
    "spine (vertebral body)": (324, 238),
    "aorta": (296, 265),
    "air outside the body": (20, 20),
    "subcutaneous fat": (330, 410),  # the left flank: 79 % of its 16 x 16 region is fat
}
ZOOM_CENTRE = (290, 210)  # (row, column) between the liver, the spine and the aorta
ZOOM_FACTOR = 3.0  # times the fitted view: fine (16 px) regions wide enough for their words
TOKENS_LEFT_WIDTH, TOKENS_RIGHT_WIDTH = 250, 420  # dock columns (px) narrowed: room for the words


def wait(predicate: Callable[[], bool], *, timeout: float, what: str) -> None:
    """Run the Qt event loop until ``predicate()`` holds (workers report through it)."""
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance()
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        app.processEvents()
        time.sleep(0.02)
    for _ in range(20):  # let the canvas and the docks repaint
        app.processEvents()
        time.sleep(0.01)


def save_png(image: np.ndarray, path: Path, *, max_kb: int) -> Path:
    """Write an (h, w, 3|4) uint8 screenshot; palette, then downscale, while over ``max_kb``."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(image[..., :3]))
    img.save(path, optimize=True)
    if path.stat().st_size <= max_kb * 1024:
        return path
    # 256 colours keep UI text and a windowed CT slice visually unchanged at a third of the size
    for factor in (1.0, 0.9, 0.8, 0.7, 0.6):
        scaled = img if factor == 1.0 else img.resize(
            (round(img.width * factor), round(img.height * factor)), Image.Resampling.LANCZOS
        )
        scaled.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            path, optimize=True
        )
        if path.stat().st_size <= max_kb * 1024:
            break
    logger.info("%s: %d KB (%d x %d)", path.name, path.stat().st_size // 1024, *scaled.size)
    return path


def screenshot(viewer: Any, path: Path, *, max_kb: int) -> None:
    """The whole napari window (canvas and docks) as a PNG."""
    save_png(viewer.screenshot(canvas_only=False, flash=False), path, max_kb=max_kb)
    logger.info("wrote %s", path)


def denoised(low_hu: np.ndarray, *, weights: str, stand_in: bool) -> tuple[np.ndarray, str]:
    """The denoised slice and the name of the layer that shows it."""
    from napari_langmamba.errors import LangMambaError
    from napari_langmamba.inference import Denoiser

    try:
        model = Denoiser.load(weights, device="cpu")
    except LangMambaError as exc:
        if not stand_in:
            raise SystemExit(f"No denoiser ({exc}). Pass --stand-in to use a Gaussian filter instead.") from exc
        from scipy.ndimage import gaussian_filter

        logger.warning("no denoiser weights (%s): using a Gaussian filter as a clearly named stand-in", exc)
        return gaussian_filter(low_hu, sigma=1.5).astype(np.float32), "Gaussian sigma 1.5 px (stand-in)"
    return model.denoise(low_hu), f"denoised ({weights})"


def open_viewer(size: tuple[int, int]) -> tuple[Any, dict[str, Any], Any]:
    """The demo viewer with the real series loaded: (viewer, widgets by name, CT layer)."""
    from napari_langmamba import demo

    viewer, widgets = demo.build_viewer(show=True)
    window = viewer.window._qt_window
    if (window.width(), window.height()) != tuple(size):
        window.resize(*size)
    load = widgets["Load CT"]
    wait(lambda: not load.busy and len(viewer.layers) > 0, timeout=300, what="the series to load")
    return viewer, widgets, viewer.layers[0]


def dock_of(widget: Any) -> Any:
    """The ``QDockWidget`` holding ``widget``."""
    from qtpy.QtWidgets import QDockWidget

    parent = widget.parentWidget()
    while parent is not None and not isinstance(parent, QDockWidget):
        parent = parent.parentWidget()
    if parent is None:
        raise RuntimeError(f"{type(widget).__name__} is not in a dock")
    return parent


def raise_dock(widget: Any) -> Any:
    """Bring the dock holding ``widget`` to the front of its tab group; return the dock."""
    dock = dock_of(widget)
    dock.show()
    dock.raise_()
    return dock


def widen_canvas(viewer: Any, *, left: int, right: int) -> None:
    """Narrow the left and right dock columns to ``left`` / ``right`` pixels (as far as they go)."""
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QDockWidget

    window = viewer.window._qt_window
    for area, width in ((Qt.DockWidgetArea.LeftDockWidgetArea, left), (Qt.DockWidgetArea.RightDockWidgetArea, right)):
        docks = [d for d in window.findChildren(QDockWidget) if d.isVisible() and window.dockWidgetArea(d) == area]
        if docks:
            window.resizeDocks(docks, [width] * len(docks), Qt.Orientation.Horizontal)


def fit_tree(tree: Any) -> None:
    """Make an expanded ``QTreeWidget`` tall enough to show all its rows without scrolling."""
    rows, item = 0, tree.topLevelItem(0)
    while item is not None:
        rows += 1
        item = tree.itemBelow(item)
    # one spare row: the hint can be a pixel or two short of the drawn rows
    height = tree.header().height() + (rows + 1) * tree.sizeHintForRow(0) + 2 * tree.frameWidth()
    tree.setMinimumHeight(height)


def shoot_load_and_compare(args: argparse.Namespace) -> None:
    """``load_ct.png``, ``compare.png``, ``compare_figure.png`` and ``compare_metrics.csv``."""
    from napari_langmamba.compare import Roi

    viewer, widgets, ct = open_viewer(args.size)
    load = widgets["Load CT"]
    raise_dock(widgets["Denoise"])  # the next step of the main job, rather than the last tab added
    viewer.dims.set_current_step(0, args.slice)
    centre = np.array([args.slice, 256, 182]) * np.asarray(ct.scale)  # a point in the liver
    load.show_value_at(tuple(centre))
    wait(lambda: True, timeout=5, what="repaint")
    screenshot(viewer, args.out / "load_ct.png", max_kb=args.max_kb)
    shoot_denoise(args, viewer, widgets)

    # --- comparison on one real slice ----------------------------------------------------
    sys.path.insert(0, str(REPO))
    from training.simulate import simulate_low_dose

    reference = np.asarray(ct.data[args.slice], dtype=np.float32)
    scale = tuple(ct.scale[-2:])
    low = simulate_low_dose(reference, pixel_mm=float(scale[-1]), dose=args.dose, seed=0)
    after, after_name = denoised(low, weights=args.weights, stand_in=args.stand_in)
    for layer in viewer.layers:
        layer.visible = False
    low_name = f"low dose ({args.dose:.0%}, simulated)"
    viewer.add_image(low, name=low_name, scale=scale, contrast_limits=(-160, 240))
    viewer.add_image(after, name=after_name, scale=scale, contrast_limits=(-160, 240))
    viewer.add_image(reference, name="normal dose", scale=scale, contrast_limits=(-160, 240))
    compare = widgets["Compare"]
    raise_dock(compare)
    compare.set_layers(low_name, after_name, "normal dose")
    compare.set_window("abdomen")
    compare.set_roi(Roi(224, 150, 288, 214), background=Roi(270, 330, 310, 370))  # liver; spleen
    wait(lambda: compare.idle and compare.comparison is not None, timeout=300, what="the comparison")
    compare.set_side_by_side(True)
    wait(lambda: compare.idle, timeout=300, what="the comparison")
    screenshot(viewer, args.out / "compare.png", max_kb=args.max_kb)
    png, csv = compare.export(args.out / "compare_figure.png", args.out / "compare_metrics.csv")
    logger.info("wrote %s and %s", png, csv)
    for m in compare.comparison.metrics:
        logger.info("%s: mean %.1f SD %.1f HU, PSNR %.2f SSIM %.4f FSIM %.4f", m.image, m.mean_hu, m.sd_hu,
                    m.psnr, m.ssim, m.fsim)
    viewer.close()


def fit_table(table: Any, *, max_rows: int) -> None:
    """Make a ``QTableWidget`` tall enough for up to ``max_rows`` rows without scrolling."""
    rows = min(table.rowCount(), max_rows)
    height = table.horizontalHeader().height() + rows * table.verticalHeader().defaultSectionSize()
    table.setMinimumHeight(height + 2 * table.frameWidth() + 2)


def shoot_denoise(args: argparse.Namespace, viewer: Any, widgets: dict[str, Any]) -> None:
    """``denoise.png``: the current slice denoised with the bundled weights, then shown at 50 % strength."""
    raise_dock(widgets["Denoise"])
    denoise = widgets["Denoise"]
    denoise.scope_combo.setCurrentIndex(denoise.scope_combo.findData("slice"))
    denoise.device_combo.setCurrentText("cpu")
    denoise.strength_spin.setValue(100)
    if denoise.run() is None:
        raise RuntimeError(f"Denoise refused to run: {denoise.status_label.text()}")
    wait(lambda: not denoise.busy, timeout=600, what="the denoised slice")
    if denoise.result_layer is None:
        raise RuntimeError(f"Denoise failed: {denoise.status_label.text()}")
    denoise.strength_spin.setValue(50)  # re-blended at once, the model does not run again
    wait(lambda: True, timeout=5, what="repaint")
    logger.info("denoise: %s", denoise.status_label.text())
    screenshot(viewer, args.out / "denoise.png", max_kb=args.max_kb)


def shoot_tokens(args: argparse.Namespace) -> None:
    """``tokens.png`` (layer 2, legend, a click on the liver) and ``tokens_zoom.png`` (layer 3 zoomed)."""
    from qtpy.QtWidgets import QApplication

    viewer, widgets, ct = open_viewer(args.tokens_size)
    tokens = widgets["Tokens"]
    raise_dock(tokens)
    # the Tokens dock gets the whole column: its legend and list of three layers are tall
    dock_of(widgets["Load CT"]).hide()
    viewer.dims.set_current_step(0, args.slice)
    tokens.set_image_layer(ct)
    tokens.use_weights("default")
    tokens.pyramid_layer = 2
    tokens.show_tokens()
    wait(lambda: not tokens.busy and tokens.pyramid is not None and tokens.pyramid_index == (args.slice,),
         timeout=600, what="the token pyramid")
    for name, pixel in ANATOMY_PIXELS.items():
        hits = tokens.pyramid.at(*pixel)
        logger.info("%s %s: %s", name, pixel, " / ".join(f"{h.layer}: {h.word}" for h in hits))
    viewer.layers.selection.active = ct
    click = ct.data_to_world((args.slice, *LIVER_PIXEL))  # the viewer gives world positions
    regions = tokens.select_at(click)
    tokens.hover_at(click)
    if len(regions) != 3:
        raise RuntimeError(f"expected the regions of 3 pyramid layers at the liver pixel, got {len(regions)}")
    fit_tree(tokens.hits_tree)
    fit_table(tokens.legend_table, max_rows=12)
    widen_canvas(viewer, left=TOKENS_LEFT_WIDTH, right=TOKENS_RIGHT_WIDTH)
    window = viewer.window._qt_window
    window.resize(*args.tokens_size)  # raising the tall dock may have grown it
    screen = QApplication.primaryScreen()
    if screen is not None:  # the whole window on the screen, as a user would place it
        window.move(screen.availableGeometry().topLeft())
    viewer.reset_view()
    wait(lambda: True, timeout=5, what="repaint")
    for region in regions:
        logger.info("layer %d at the liver %s: %s (alternatives %s)", region.layer, LIVER_PIXEL, region.word,
                    ", ".join(a.word for a in region.alternatives))
    written = sum(bool(w) for w in tokens.shown_words())
    logger.info("layer 2: %d of %d words written at zoom %.2f; legend: %s", written, len(tokens.shown_words()),
                tokens_camera(viewer).zoom,
                ", ".join(f"{e.word} {100 * e.share:.0f}%" for e in tokens.legend[:8]))
    screenshot(viewer, args.out / "tokens.png", max_kb=args.max_kb)

    tokens.pyramid_layer = 3
    camera = tokens_camera(viewer)
    camera.center = tuple(ct.data_to_world((args.slice, *ZOOM_CENTRE)))[-2:]
    camera.zoom = camera.zoom * ZOOM_FACTOR
    fit_table(tokens.legend_table, max_rows=12)
    wait(lambda: True, timeout=5, what="repaint")
    written = sum(bool(w) for w in tokens.shown_words())
    logger.info("layer 3 zoomed: %d of %d words written at zoom %.2f", written, len(tokens.shown_words()),
                camera.zoom)
    screenshot(viewer, args.out / "tokens_zoom.png", max_kb=args.max_kb)
    viewer.close()


def tokens_camera(viewer: Any) -> Any:
    """napari >= 0.9 keeps the camera in ``viewer.scene``; older versions on the viewer."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None else viewer.camera


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    parser.add_argument("--slice", type=int, default=10, help="slice shown (index along z)")
    parser.add_argument("--dose", type=float, default=0.25, help="simulated dose fraction")
    parser.add_argument("--weights", default="default", help="denoiser checkpoint")
    parser.add_argument("--stand-in", action="store_true", help="Gaussian filter when no weights exist")
    parser.add_argument("--size", type=int, nargs=2, default=(1920, 1080), metavar=("W", "H"),
                        help="window of load_ct.png, denoise.png and compare.png (the Xvfb screen's size)")
    parser.add_argument("--no-tokens", action="store_true",
                        help="make only load_ct.png, denoise.png and the compare images")
    parser.add_argument("--tokens-size", type=int, nargs=2, default=(1920, 1080), metavar=("W", "H"),
                        help="window of tokens.png and tokens_zoom.png (the Xvfb screen's size)")
    parser.add_argument("--tokens-only", action="store_true",
                        help="make only tokens.png and tokens_zoom.png (e.g. after the bundled LangAE changed)")
    parser.add_argument("--max-kb", type=int, default=480, help="largest PNG written, in KB")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    # the widgets' defaults, whatever this machine's user chose before; their settings stay untouched
    os.environ[SETTINGS_ENV] = tempfile.mkdtemp(prefix="screenshot-settings-")

    from napari_langmamba import demo

    if not demo.SAMPLE_SERIES.is_dir():
        print(f"The real series is missing ({demo.SAMPLE_SERIES}); screenshots need it.", file=sys.stderr)
        return 1
    if not args.tokens_only:
        shoot_load_and_compare(args)
    if not args.no_tokens:
        shoot_tokens(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
