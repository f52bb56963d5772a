"""Fuzz the CT readers (DICOM, NIfTI, .npy); write benchmarks/results/fuzz.json.

Usage::

    nice .venv/bin/python benchmarks/fuzz.py [--cases 1000] [--seed 0] [--timeout 30]

Each format gets ``--cases`` inputs: its seed files unchanged, then seeded mutations of them
(see ``tests/fuzz_harness.py``). Every input is read with ``read_ct`` and ``list_series``
in a sandboxed worker process and counted as loaded / clear error / other exception / bad
volume / timeout / memory blow-up / crash / code executed. The goal (issue 8) is 0 in every
column after the first two, for >= 1000 cases per format. A case is reproduced by its name:
``CaseFactory(build_corpus(), seed=SEED).make(format, index)``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing
sys.path.insert(0, str(REPO_ROOT / "tests"))  # the harness lives beside the tests, outside the package

import fuzz_harness  # noqa: E402 - tests/fuzz_harness.py


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1000, help="cases per format (seeds included)")
    parser.add_argument("--seed", type=int, default=0, help="mutation seed")
    parser.add_argument("--formats", nargs="+", default=list(fuzz_harness.FORMATS), choices=fuzz_harness.FORMATS)
    parser.add_argument("--timeout", type=float, default=fuzz_harness.DEFAULT_TIMEOUT_S, help="seconds per case")
    parser.add_argument("--memory-limit-mb", type=float, default=fuzz_harness.DEFAULT_MEMORY_LIMIT_MB,
                        help="resident memory a case may add to the worker")
    parser.add_argument("--shared-data", type=Path, default=fuzz_harness.default_shared_data())
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "fuzz.json")
    args = parser.parse_args(argv)

    corpus = fuzz_harness.build_corpus(args.shared_data)
    factory = fuzz_harness.CaseFactory(corpus, seed=args.seed)
    results: list[fuzz_harness.Result] = []
    started = time.perf_counter()
    with fuzz_harness.Sandbox(timeout=args.timeout, memory_limit_mb=args.memory_limit_mb) as sandbox:
        for format in args.formats:
            t0 = time.perf_counter()
            for k, case in enumerate(factory.cases(format, args.cases), start=1):
                result = sandbox.run(case)
                results.append(result)
                if result.outcome not in fuzz_harness.ACCEPTABLE:
                    print(f"  {result.case} {result.outcome}: {result.description} -> {result.message}",
                          file=sys.stderr)
                if k % 100 == 0 or k == args.cases:
                    print(f"{format}: {k}/{args.cases} cases, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        restarts = sandbox.restarts
    elapsed = time.perf_counter() - started

    table = fuzz_harness.summarize(results)
    failed = fuzz_harness.failures(results)
    result = {
        "benchmark": "fuzz",
        "what": "read_ct + list_series on mutated DICOM / NIfTI / .npy inputs, each in a sandboxed worker",
        "goal": "0 other_exception, bad_volume, timeout, memory, crash, code_executed for >= 1000 cases per format",
        "goal_met": not failed and all(table[f]["cases"] >= 1000 for f in args.formats),
        "seed": args.seed,
        "cases_per_format": args.cases,
        "seeds": {f: [s.name for s in corpus[f]] for f in args.formats},
        "limits": {"timeout_s": args.timeout, "rss_growth_mb": args.memory_limit_mb,
                   "address_space_mb": fuzz_harness.DEFAULT_ADDRESS_SPACE_MB},
        "outcomes": list(fuzz_harness.OUTCOMES),
        "table": {f: {k: table[f][k] for k in ("cases", *fuzz_harness.OUTCOMES)} for f in args.formats},
        "formats": table,
        "failures": [r.to_dict() for r in failed],
        "worker_restarts": restarts,
        "elapsed_s": round(elapsed, 1),
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    header = f"{'format':8}" + "".join(f"{o:>16}" for o in ("cases", *fuzz_harness.OUTCOMES))
    print(header)
    for f in args.formats:
        print(f"{f:8}" + "".join(f"{table[f][k]:>16}" for k in ("cases", *fuzz_harness.OUTCOMES)))
    print(f"wrote {args.out} ({elapsed:.0f} s)")
    return result


if __name__ == "__main__":
    main()
