"""Reader fuzzing over several seeds: run ``fuzz.py`` once per seed, sum the tables, print the README's.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fuzz_seeds.py [--cases 1000] [--seeds 11 23 ...]
    .venv/bin/python benchmarks/fuzz_seeds.py --summarize-only   # from the per-seed files already there

Writes ``benchmarks/results/fuzz_seeds/seed_S.json`` (one ``fuzz.py`` result per seed, one seed
after the other) and ``benchmarks/results/fuzz_ten_seeds.json`` (format x outcome summed over the
seeds, and one row per seed), then prints both tables in the README's Markdown.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import fuzz  # noqa: E402 - benchmarks/fuzz.py (it puts tests/ on the path for the harness)
import fuzz_harness  # noqa: E402 - tests/fuzz_harness.py

SEEDS = (11, 23, 42, 101, 202, 303, 404, 505, 606, 707)
NAMES = {"dicom": "DICOM", "nifti": "NIfTI", "npy": "npy"}


def summarize(runs: dict[int, dict]) -> dict:
    """Sum the per-seed tables: ``{"table": {format: {outcome: n}}, "per_seed": [...], ...}``."""
    formats = [f for f in fuzz_harness.FORMATS if all(f in run["table"] for run in runs.values())]
    columns = ("cases", *fuzz_harness.OUTCOMES)
    table = {f: {c: sum(run["table"][f][c] for run in runs.values()) for c in columns} for f in formats}
    per_seed = [{"seed": seed, "elapsed_s": run["elapsed_s"], "goal_met": run["goal_met"],
                 "table": {f: run["table"][f] for f in formats},
                 "failures": [{k: r[k] for k in ("case", "outcome", "description", "message")}
                              for r in run["failures"]]}
                for seed, run in sorted(runs.items())]
    return {
        "benchmark": "fuzz_seeds",
        "what": "benchmarks/fuzz.py once per seed (read_ct + list_series on mutated DICOM / NIfTI / .npy "
                "inputs in a sandboxed worker), summed",
        "goal": "0 other_exception, bad_volume, timeout, memory, crash, code_executed in every format and seed",
        "goal_met": all(run["goal_met"] for run in runs.values()),
        "seeds": sorted(runs),
        "cases_per_format_and_seed": sorted({run["cases_per_format"] for run in runs.values()}),
        "outcomes": list(fuzz_harness.OUTCOMES),
        "table": table,
        "per_seed": per_seed,
        "elapsed_s": round(sum(run["elapsed_s"] for run in runs.values()), 1),
        "machine": next(iter(runs.values()))["machine"],
    }


def markdown(summary: dict) -> str:
    """The summed table and the per-seed table, as in the README."""
    outcomes = summary["outcomes"]
    lines = ["| format | cases | " + " | ".join(o.replace("_", " ") for o in outcomes) + " |",
             "|---" * (len(outcomes) + 2) + "|"]
    for f, row in summary["table"].items():
        lines.append(f"| {NAMES[f]} | " + " | ".join(str(row[c]) for c in ("cases", *outcomes)) + " |")
    formats = list(summary["table"])
    lines += ["", "| seed | " + " | ".join(f"{NAMES[f]} loaded / clear error" for f in formats)
              + " | any other outcome | seconds |", "|---" * (len(formats) + 3) + "|"]
    for run in summary["per_seed"]:
        cells = [f"{run['table'][f]['loaded']} / {run['table'][f]['clear_error']}" for f in formats]
        others = sum(run["table"][f][o] for f in formats for o in outcomes if o not in fuzz_harness.ACCEPTABLE)
        lines.append(f"| {run['seed']} | " + " | ".join(cells) + f" | {others} | {run['elapsed_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--cases", type=int, default=1000, help="cases per format and seed")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results" / "fuzz_seeds")
    parser.add_argument("--summary", type=Path, default=HERE / "results" / "fuzz_ten_seeds.json")
    parser.add_argument("--summarize-only", action="store_true", help="read the per-seed files, run nothing")
    args = parser.parse_args(argv)

    runs = {}
    for seed in args.seeds:
        path = args.out_dir / f"seed_{seed}.json"
        if not args.summarize_only:
            fuzz.main(["--cases", str(args.cases), "--seed", str(seed), "--out", str(path)])
        runs[seed] = json.loads(path.read_text())
    summary = summarize(runs)
    args.summary.parent.mkdir(parents=True, exist_ok=True)
    args.summary.write_text(json.dumps(summary, indent=2) + "\n")
    print(markdown(summary))
    print(f"wrote {args.summary}")
    return summary


if __name__ == "__main__":
    main()
