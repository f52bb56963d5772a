"""LangAE reconstruction quality on slices never trained on; writes benchmarks/results/langae_recon.json.

Usage::

    .venv/bin/python benchmarks/langae_recon.py [--langae DIR ...] [--label NAME ...]

Each LangAE (default: the bundled one) encodes, quantizes and decodes every full-dose slice of
the validation patient L192 (../shared/data/ct/mayo2016_pairs/L192/full_*, 11 slices, 512 x 512),
exactly as the ``langae`` training stage validates: the whole slice in the model's [0, 1]
normalisation, the reconstruction clipped to [0, 1], PSNR / SSIM in the abdomen window
[-160, 240] HU per slice, reported as mean and standard deviation.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LANGMAMBA_SHARED_DATA", REPO_ROOT.parent / "shared" / "data")) / "ct"
VALIDATION = sorted((DATA / "mayo2016_pairs" / "L192").glob("full_*"))
OUT = REPO_ROOT / "benchmarks" / "results" / "langae_recon.json"


def validation_slices() -> list[np.ndarray]:
    from napari_langmamba.io import read_ct

    return [hu for folder in VALIDATION for hu in read_ct(folder).hu]


def measure(langae_dir: Path, slices: list[np.ndarray]) -> dict:
    import torch

    from napari_langmamba import metrics
    from napari_langmamba.checkpoint import build_model, load_checkpoint
    from napari_langmamba.windowing import MODEL_NORMALIZATION

    checkpoint = load_checkpoint(langae_dir)
    model = build_model(checkpoint, device="cpu").eval()
    psnr, ssim = [], []
    start = time.perf_counter()
    for hu in slices:
        x = torch.from_numpy(MODEL_NORMALIZATION.to_model(hu).astype(np.float32))[None, None]
        with torch.inference_mode():
            recon, _ = model(x)
        out_hu = MODEL_NORMALIZATION.to_hu(recon[0, 0].clamp(0.0, 1.0).numpy())
        ref_hu = MODEL_NORMALIZATION.to_hu(x[0, 0].numpy())  # the clipped reference, as in training
        psnr.append(metrics.psnr(out_hu, ref_hu, "abdomen"))
        ssim.append(metrics.ssim(out_hu, ref_hu, "abdomen"))
    training = checkpoint.meta.get("training") or {}
    return {
        "path": str(langae_dir),
        "codebook": checkpoint.meta["codebook"]["source"],
        "step": training.get("step") if isinstance(training, dict) else None,
        "psnr_mean": float(np.mean(psnr)), "psnr_std": float(np.std(psnr)),
        "ssim_mean": float(np.mean(ssim)), "ssim_std": float(np.std(ssim)),
        "seconds": time.perf_counter() - start,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--langae", type=Path, nargs="+",
                        default=[REPO_ROOT / "napari_langmamba" / "weights" / "default" / "langae"])
    parser.add_argument("--label", nargs="+", help="one name per --langae (default: the folder names)")
    parser.add_argument("--output", type=Path, default=OUT)
    args = parser.parse_args()
    if not VALIDATION:
        raise SystemExit(f"No L192 full-dose series under {DATA / 'mayo2016_pairs'}: nothing to measure.")
    labels = args.label or [p.name for p in args.langae]
    if len(labels) != len(args.langae):
        raise SystemExit("Give one --label per --langae.")
    if len(set(labels)) != len(labels):
        raise SystemExit(f"Two LangAEs would share a row name ({', '.join(labels)}); name them with --label.")
    slices = validation_slices()
    rows = {label: measure(path, slices) for label, path in zip(labels, args.langae, strict=True)}
    print(f"LangAE reconstruction, L192 full dose ({len(slices)} slices, abdomen window)")
    print("| LangAE | codebook | PSNR (dB) | SSIM |\n|---|---|---|---|")
    for label, row in rows.items():
        print(f"| {label} | {row['codebook']} | {row['psnr_mean']:.2f} ± {row['psnr_std']:.2f} "
              f"| {row['ssim_mean']:.4f} ± {row['ssim_std']:.4f} |")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"slices": len(slices), "window": "abdomen", "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
