"""``python -m training <stage> ...``: the stages of the LangMamba pipeline.

Each stage module provides ``add_arguments(parser)`` and ``main(args) -> int``; they are
imported only when their stage is chosen, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# Idle OpenMP threads yield their core instead of spinning: on a shared or busy CPU, spinning
# threads made training steps 2-3x slower (benchmarks/training.py compares thread settings).
# Set before torch is imported; an explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from napari_langmamba.allocator import heap_allocations
from napari_langmamba.errors import LangMambaError

STAGES: dict[str, tuple[str, str]] = {
    "simulate": ("training.simulate", "make low-dose/normal-dose pairs by projection-domain noise insertion"),
    "candidates": ("training.candidates", "stage 0: candidate token pools per training image"),
    "langae": ("training.langae", "stage 1: train the LangAE (frozen language codebook)"),
    "seed": ("training.seed", "stage 2: train SEED or RED-CNN with MSE + lambda * LangDA"),
    "evaluate": ("training.evaluate", "PSNR / SSIM / FSIM per slice on a window, model vs input"),
}


def build_parser(stage: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Train and evaluate LangMamba low-dose CT denoisers.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for name, (module_name, help_text) in STAGES.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == stage:  # only the chosen stage pays for importing its module
            importlib.import_module(module_name).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    stage = next((a for a in argv if a in STAGES), None)
    args = build_parser(stage).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    module = importlib.import_module(STAGES[args.stage][0])
    try:
        # Training steps reuse their large tensors' memory instead of page-faulting it in
        # afresh each time (1.3-1.6x faster steps on 2 cores; see napari_langmamba.allocator).
        with heap_allocations():
            return int(module.main(args) or 0)
    except LangMambaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
