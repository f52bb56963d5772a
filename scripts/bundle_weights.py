"""Bundle trained checkpoints as the plugin's default weights (``napari_langmamba/weights/default``).

The bundle is the best SEED checkpoint of a ``python -m training seed`` run at the folder's top
and the LangAE it was trained with in ``langae/`` (the Tokens widget reads it), both stored as
float16 to stay small. The training record of each run, the evaluation table and a provenance
note go into their ``config.json``. Usage::

    python scripts/bundle_weights.py --seed-run RUN --langae-run RUN \
        --evaluation EVAL.json [--baseline-evaluation EVAL.json] [--overwrite]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from napari_langmamba.checkpoint import build_model, load_checkpoint, save_checkpoint
from napari_langmamba.inference import DEFAULT_WEIGHTS_DIR

PROVENANCE = (
    "Research weights, not a medical device. Trained on CPU with the bundled training package on "
    "17 slices of one contrast-enhanced abdominal CT series (Siemens Biograph40 mCT, 120 kVp, "
    "kernel Br38f; TotalSegmentator test data, Apache-2.0), with quarter-dose pairs simulated by "
    "projection-domain noise insertion; 3 further slices of the same series were held out for "
    "validation. The codebook is the MiniLM vocabulary and the candidate pools come from the "
    "text-only lexicon scorer, a weaker prior than the paper's PubMedCLIP image-text pools."
)


def best_checkpoint(run: Path) -> Path:
    for name in ("best", "last"):
        if (run / name / "config.json").is_file():
            return run / name
    raise SystemExit(f"error: no best/ or last/ checkpoint in {run}")


def read_json(path: Path | None) -> dict | None:
    return None if path is None else json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed-run", type=Path, required=True, help="run folder of the SEED + LangDA training")
    parser.add_argument("--langae-run", type=Path, required=True, help="run folder of the LangAE training")
    parser.add_argument("--evaluation", type=Path, help="JSON written by `python -m training evaluate` for this model")
    parser.add_argument("--baseline-evaluation", type=Path, help="the same for the MSE-only model trained the same way")
    parser.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS_DIR, help="destination (default: the package's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    args = parser.parse_args(argv)

    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        print(f"error: {args.out} already holds weights; pass --overwrite to replace them", file=sys.stderr)
        return 2

    seed_ckpt = load_checkpoint(best_checkpoint(args.seed_run))
    langae_ckpt = load_checkpoint(best_checkpoint(args.langae_run))
    seed_training = dict(seed_ckpt.meta.get("training") or {})
    langae_training = dict(langae_ckpt.meta.get("training") or {})
    metrics = {
        "validation": (seed_ckpt.meta.get("metrics") or {}).get("validation"),
        "evaluation": read_json(args.evaluation),
        "baseline_mse_only_evaluation": read_json(args.baseline_evaluation),
    }

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".bundle-", dir=args.out.parent) as tmp:
        staging = Path(tmp) / "default"
        save_checkpoint(
            staging,
            build_model(seed_ckpt),
            kind=seed_ckpt.kind,
            config=seed_ckpt.config,
            dtype=torch.float16,
            extra={
                "normalization": seed_ckpt.normalization,
                "training": {"seed": seed_training, "langae": langae_training},
                "metrics": metrics,
                "provenance": PROVENANCE,
            },
        )
        save_checkpoint(
            staging / "langae",
            build_model(langae_ckpt),
            kind=langae_ckpt.kind,
            config=langae_ckpt.config,
            dtype=torch.float16,
            extra={
                "normalization": langae_ckpt.normalization,
                "training": langae_training,
                "metrics": langae_ckpt.meta.get("metrics"),
                "provenance": PROVENANCE,
            },
        )
        if args.out.exists():
            shutil.rmtree(args.out)
        staging.rename(args.out)
    size_mb = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file()) / 1e6
    print(f"bundled {args.out} ({size_mb:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
