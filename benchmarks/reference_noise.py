"""How much of the low-dose error any denoiser can remove, given that the reference is noisy too.

Writes benchmarks/results/reference_noise.json. Usage::

    .venv/bin/python benchmarks/reference_noise.py [--pairs DIR] [--patients L192 ...]
        [--weights default|CHECKPOINT|none] [--out PATH]

A Mayo-2016 quarter-dose image is its full-dose image plus inserted noise:
``low = full + n_e`` with ``full = clean + n_f``. PSNR against ``full`` therefore charges even a
perfect denoiser, one that returns ``clean``, with the reference's own noise ``n_f``. Per slice,
the error of that perfect denoiser is ``MSE_input * var(n_f) / var(n_e)``, so its PSNR is the
input's plus ``10 log10(var(n_e) / var(n_f))``. For quantum noise inserted to a quarter of the
dose, ``var(n_e) = 3 var(n_f)`` (+4.77 dB); the script also measures the ratio on every slice:
both images are high-passed (the image minus its Gaussian blur, sigma 1.5 px), the variances of
``HP(full)`` and ``HP(low - full)`` are taken in 16 x 16 blocks of soft tissue inside the window,
and the median of their ratio is the estimate (anatomy only adds to ``HP(full)`` and the median
keeps the flat blocks, so the measured ratio errs towards a *lower* ceiling).

A model can score above the perfect denoiser only by reproducing part of ``n_f``, which the
low-dose image carries: with Gaussian noise and the clean image known exactly, the best guess of
``full`` keeps ``var(n_f) / (var(n_f) + var(n_e))`` of the noise and leaves
``var(n_f) var(n_e) / (var(n_f) + var(n_e))`` of error, a bound no real denoiser reaches.
The window clips both noises alike, which the per-slice shift ignores (a small effect: the
window holds the soft tissue where the noise is measured).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
OUT = REPO_ROOT / "benchmarks" / "results" / "reference_noise.json"
DEFAULT_PAIRS = REPO_ROOT.parent / "shared" / "data" / "ct" / "mayo2016_pairs"
if str(REPO_ROOT) not in sys.path:  # the training package lives beside the plugin, not inside it
    sys.path.insert(0, str(REPO_ROOT))


def noise_variance_ratio(low_hu: np.ndarray, full_hu: np.ndarray, *, pixel_spacing: tuple[float, float],
                         window: tuple[float, float]) -> tuple[float, int]:
    """Median over soft-tissue blocks of var(HP(full)) / var(HP(low - full)), and the block count."""
    from training.simulate import block_noise_ratios

    full = full_hu.astype(np.float64)
    ratios = block_noise_ratios(full, low_hu.astype(np.float64) - full, pixel_spacing=pixel_spacing, window=window)
    return (float(np.median(ratios)) if ratios.size else float("nan")), int(ratios.size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=Path, default=DEFAULT_PAIRS,
                        help="folder of patients with full…/quarter… DICOM series (default ../shared/data/ct/"
                             "mayo2016_pairs)")
    parser.add_argument("--patients", nargs="+", default=["L192"],
                        help="patients to measure (default L192, the validation patient)")
    parser.add_argument("--weights", default="default",
                        help="denoiser whose PSNR is placed on the same scale (default: the bundled one); 'none' "
                             "skips it")
    parser.add_argument("--dose", type=float, default=0.25, help="low-dose fraction of the pairs (default 0.25)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if not args.pairs.is_dir():
        parser.error(f"{args.pairs} does not exist: this benchmark needs the Mayo-2016 pairs (see ../shared/data).")

    from napari_langmamba.metrics import psnr
    from napari_langmamba.windowing import DEFAULT_WINDOW, get_window
    from training.datasets import PairSet, patient_folder_pairs
    from training.evaluate import load_checkpoint_denoiser
    from training.simulate import NOISE_BLOCK, NOISE_HIGH_PASS_SIGMA

    window = get_window(DEFAULT_WINDOW)
    groups = PairSet(patient_folder_pairs(args.pairs)).select(args.patients).groups
    denoise = None if args.weights == "none" else load_checkpoint_denoiser(args.weights, device="cpu")

    physics_ratio = 1.0 / args.dose - 1.0  # var(n_e) / var(n_f) for pure quantum noise
    started = time.perf_counter()
    rows = []
    for group, i in ((g, i) for g in groups for i in range(len(g.source))):
        low, full = group.source.pair_hu(i)
        spacing = tuple(float(s) for s in group.source.full_volume.spacing[1:])
        # NaN on a slice without a flat soft-tissue block
        measured, n_blocks = noise_variance_ratio(low, full, pixel_spacing=spacing,
                                                  window=(window.lower, window.upper))
        row = {"key": f"{group.name}/{group.source.key(i)}", "kernel": group.kernel,
               "input_psnr": psnr(low, full, window),
               "full_over_inserted_noise_variance": measured, "n_blocks": n_blocks}
        for name, ratio in (("physics", physics_ratio), ("measured", 1.0 / measured)):
            shift = 10 * np.log10(ratio)
            row[f"perfect_denoiser_psnr_{name}"] = row["input_psnr"] + shift
            row[f"bayes_bound_psnr_{name}"] = row["input_psnr"] + shift + 10 * np.log10(1 + 1 / ratio)
        if denoise is not None:
            row["model_psnr"] = psnr(np.asarray(denoise(low.astype(np.float32)[None]))[0], full, window)
        rows.append(row)
        print(f"{row['key']:40s} input {row['input_psnr']:.2f}  perfect {row['perfect_denoiser_psnr_physics']:.2f} "
              f"(measured ratio {1 / measured:.2f}: {row['perfect_denoiser_psnr_measured']:.2f})"
              + (f"  model {row['model_psnr']:.2f}" if "model_psnr" in row else ""), flush=True)

    def mean(name: str) -> float:  # slices without a flat soft-tissue block have no measured ratio
        return float(np.nanmean([r[name] for r in rows]))

    summary = {name: mean(name) for name in rows[0] if name not in ("key", "kernel", "n_blocks")}
    if denoise is not None:
        # share of the error a perfect denoiser removes that the model removes (MSE, per slice)
        def mse_share(row: dict, perfect: str) -> float:
            m_in, m_model, m_best = (10 ** (-row[k] / 10) for k in ("input_psnr", "model_psnr", perfect))
            return (m_in - m_model) / (m_in - m_best)

        summary["model_share_of_removable_error_physics"] = float(
            np.mean([mse_share(r, "perfect_denoiser_psnr_physics") for r in rows]))
    result = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": "python benchmarks/reference_noise.py " + " ".join(argv or []),
        "host": {"python": platform.python_version(), "machine": platform.machine()},
        "window": {"name": window.name, "lower_hu": window.lower, "upper_hu": window.upper},
        "patients": args.patients, "dose": args.dose, "weights": args.weights,
        "physics_inserted_over_full_noise_variance": physics_ratio,
        "high_pass_sigma_px": NOISE_HIGH_PASS_SIGMA, "block_px": NOISE_BLOCK,
        "n_slices": len(rows), "n_slices_measured": int(sum(np.isfinite(r["full_over_inserted_noise_variance"])
                                                             for r in rows)),
        "summary": summary, "slices": rows,
        "seconds": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
