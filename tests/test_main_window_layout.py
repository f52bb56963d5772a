"""The main job's window on a 1366 x 768 screen: it fits, Denoise is in front, Load CT shows all its
controls, the CT fills the canvas.

Each case runs ``tests/layout_probe.py`` in a fresh process on its own Xvfb screen of that size
(the suite's own Xvfb screen is 800 x 600), loading the real series through the Load CT widget.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCREEN = (1366, 768)
PROBE = Path(__file__).with_name("layout_probe.py")


def probe(mode: str, series: Path, screen: tuple[int, int] = SCREEN) -> dict:
    pyvirtualdisplay = pytest.importorskip("pyvirtualdisplay")
    with pyvirtualdisplay.Display(backend="xvfb", size=screen, color_depth=24, manage_global_env=False) as display:
        env = {**os.environ, **display.env(), "QT_QPA_PLATFORM": "xcb"}
        done = subprocess.run([sys.executable, str(PROBE), mode, str(series)], env=env, capture_output=True,
                              text=True, timeout=240)
    lines = [line for line in done.stdout.splitlines() if line.startswith("LAYOUT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1][len("LAYOUT "):])


def test_the_main_job_fits_1366x768_with_denoise_in_front_and_the_ct_fitted(dicom_series_dir):
    report = probe("demo", dicom_series_dir)
    assert report["screen"] == list(SCREEN)
    width, height = report["window"]
    assert height <= SCREEN[1] and width <= SCREEN[0]
    assert report["denoise_visible"] and report["run_button_visible"] and report["load_visible"]
    assert report["front_tabs"] == ["Load CT", "Denoise"]  # Compare, Tokens and Train are tabs behind it
    # Load CT starts tall enough for its controls (it used to start 72 px tall, scrolled): path, Scan,
    # the series table, Load and the window preset inside the window, nothing to scroll, then or later
    assert report["load_controls_visible"] and not report["load_scrolls"]
    assert report["load_height"] >= report["load_content_height"] > 200
    assert not report["load_scrolls_when_loaded"]
    assert report["layer_shape"] == [20, 512, 512]
    assert max(report["fill"]) >= 0.9 and min(report["fill"]) >= 0.6  # fitted: the CT fills the canvas


def test_widgets_opened_one_by_one_still_fit(dicom_series_dir):
    report = probe("one-by-one", dicom_series_dir)
    width, height = report["window"]
    assert height <= SCREEN[1] and width <= SCREEN[0]  # the docks scroll instead of growing the window
    assert report["denoise_visible"] and report["load_visible"]
    assert max(report["fill"]) >= 0.9
