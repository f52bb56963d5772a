"""Time ``read_ct`` on the real 20-slice JPEG 2000 series; write benchmarks/results/io_load.json.

Usage::

    .venv/bin/python benchmarks/io_load.py [--repeats 5] [--series PATH]

The goal (issue 2) is well under 5 s for the series on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SERIES = Path(
    os.environ.get("LANGMAMBA_SHARED_DATA", REPO_ROOT.parent / "shared" / "data")
) / "ct" / "abdomen_dicom_series"
GOAL_SECONDS = 5.0


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=Path, default=DEFAULT_SERIES, help="DICOM series folder")
    parser.add_argument("--repeats", type=int, default=5, help="timed reads (after one warm-up)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "io_load.json")
    args = parser.parse_args(argv)
    if not args.series.is_dir():
        raise SystemExit(f"series not found: {args.series} (../shared/data is absent)")

    t0 = time.perf_counter()
    from napari_langmamba.io import list_series, read_ct

    import_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    volume = read_ct(args.series)  # warm-up: imports decoders, fills the OS file cache
    first_s = time.perf_counter() - t0

    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        volume = read_ct(args.series)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    list_series(args.series)
    list_s = time.perf_counter() - t0

    median = statistics.median(times)
    result = {
        "benchmark": "io_load",
        "what": "read_ct of a DICOM series folder (JPEG 2000 lossless, decoded via pylibjpeg-openjpeg)",
        "series": str(args.series),
        "shape": list(volume.hu.shape),
        "spacing_mm": list(volume.spacing),
        "repeats": args.repeats,
        "seconds": {
            "median": round(median, 4),
            "min": round(min(times), 4),
            "max": round(max(times), 4),
            "all": [round(t, 4) for t in times],
            "first_read_after_import": round(first_s, 4),
            "import_io": round(import_s, 4),
            "list_series_headers_only": round(list_s, 4),
        },
        "ms_per_slice_median": round(1000 * median / volume.hu.shape[0], 2),
        "goal_seconds": GOAL_SECONDS,
        "meets_goal": median < GOAL_SECONDS,
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["seconds"], indent=2))
    print(f"median {median:.3f} s for {volume.hu.shape[0]} slices -> {args.out}")
    return result


if __name__ == "__main__":
    main()
