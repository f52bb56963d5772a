"""Screenshots of the plugin for the README, made under Xvfb.

    xvfb-run -a .venv/bin/python scripts/screenshot.py [--out docs/images]

1. ``load_ct.png``: napari with the dock widgets of the main job (``napari_langmamba.demo``)
   and the real abdominal series of ``../shared/data`` loaded through the Load CT widget.
2. ``compare.png`` and ``compare_figure.png``: the Compare widget on one real slice: the
   normal-dose slice (reference), a low-dose version simulated by the project's projection-
   domain simulator (``training.simulate``) and its denoised result (the bundled default
   model; with ``--stand-in`` when no weights are available, a Gaussian filter clearly named
   as a stand-in), side by side with the ROI crops and metrics; the second file is the
   widget's PNG export.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
logger = logging.getLogger("screenshot")


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    parser.add_argument("--slice", type=int, default=10, help="slice shown (index along z)")
    parser.add_argument("--dose", type=float, default=0.25, help="simulated dose fraction")
    parser.add_argument("--weights", default="default", help="denoiser checkpoint")
    parser.add_argument("--stand-in", action="store_true", help="Gaussian filter when no weights exist")
    parser.add_argument("--size", type=int, nargs=2, default=(1700, 1050), metavar=("W", "H"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)

    from napari_langmamba import demo
    from napari_langmamba.compare import Roi

    if not demo.SAMPLE_SERIES.is_dir():
        print(f"The real series is missing ({demo.SAMPLE_SERIES}); screenshots need it.", file=sys.stderr)
        return 1
    viewer, widgets = demo.build_viewer(show=True)
    viewer.window._qt_window.resize(*args.size)
    load = widgets["Load CT"]
    wait(lambda: not load.busy and len(viewer.layers) > 0, timeout=180, what="the series to load")
    ct = viewer.layers[0]
    viewer.dims.set_current_step(0, args.slice)
    centre = np.array([args.slice, 256, 182]) * np.asarray(ct.scale)  # a point in the liver
    load.show_value_at(tuple(centre))
    wait(lambda: True, timeout=5, what="repaint")
    path = args.out / "load_ct.png"
    viewer.screenshot(str(path), canvas_only=False, flash=False)
    logger.info("wrote %s", path)

    # --- comparison on one real slice ----------------------------------------------------
    sys.path.insert(0, str(REPO))
    from training.simulate import simulate_low_dose

    reference = np.asarray(ct.data[args.slice], dtype=np.float32)
    scale = tuple(ct.scale[-2:])
    low = simulate_low_dose(reference, pixel_mm=float(scale[-1]), dose=args.dose, seed=0)
    after, after_name = denoised(low, weights=args.weights, stand_in=args.stand_in)
    ct.visible = False
    low_name = f"low dose ({args.dose:.0%}, simulated)"
    viewer.add_image(low, name=low_name, scale=scale, contrast_limits=(-160, 240))
    viewer.add_image(after, name=after_name, scale=scale, contrast_limits=(-160, 240))
    viewer.add_image(reference, name="normal dose", scale=scale, contrast_limits=(-160, 240))
    compare = widgets["Compare"]
    compare.set_layers(low_name, after_name, "normal dose")
    compare.set_window("abdomen")
    compare.set_roi(Roi(224, 150, 288, 214), background=Roi(270, 330, 310, 370))  # liver; spleen
    wait(lambda: compare.idle and compare.comparison is not None, timeout=120, what="the comparison")
    compare.set_side_by_side(True)
    wait(lambda: compare.idle, timeout=120, what="the comparison")
    path = args.out / "compare.png"
    viewer.screenshot(str(path), canvas_only=False, flash=False)
    logger.info("wrote %s", path)
    png, csv = compare.export(args.out / "compare_figure.png", args.out / "compare_metrics.csv")
    logger.info("wrote %s and %s", png, csv)
    for m in compare.comparison.metrics:
        logger.info("%s: mean %.1f SD %.1f HU, PSNR %.2f SSIM %.4f FSIM %.4f", m.image, m.mean_hu, m.sd_hu,
                    m.psnr, m.ssim, m.fsim)
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
