"""Bundle trained checkpoints as the plugin's default weights (``napari_langmamba/weights/default``).

The bundle is the best SEED checkpoint of a ``python -m training seed`` run at the folder's top
and the LangAE it was trained with in ``langae/`` (the Tokens widget reads it), both stored as
float16 to stay small. The training record of each run, the evaluation table and a provenance
note go into their ``config.json``. Usage::

    python scripts/bundle_weights.py --seed-run RUN [--seed-init-run RUN ...] (--langae-run RUN \
        [--langae-init-run RUN ...] | --langae-bundle DIR) --evaluation EVAL.json [EVAL.json ...] [--overwrite]

Each run's validation curve (every epoch's validation metrics from its ``metrics.jsonl``) and
where its selection metric (the ``best`` key of its ``summary.json``, PSNR by default) peaked are
recorded beside its training record. An init run may also be an earlier bundled model's folder
(e.g. a copy of ``langae/``): its own record, curve and init chain are taken as they are.
``--langae-bundle DIR`` keeps a bundled LangAE (weights and record) beside a new ``--seed-run``
trained on its encoder (checked). ``--sharp`` bundles the sharp-kernel denoiser instead
(``napari_langmamba/weights/sharp``): the ``last`` checkpoint of ``--seed-run`` (a fixed schedule:
it has no validation patient of its kernel to select on), no ``langae/`` of its own (it was
trained on the default bundle's LangAE, given as ``--langae-bundle``, which the plugin reuses),
and its own provenance. ``--seed-bundle DIR`` keeps the SEED of an earlier bundle (weights, record and evaluation) instead
of ``--seed-run``, for a new LangAE that leaves SEED's encoder layers unchanged (``langae
--train-part`` or ``--freeze-features``); the LangAE's are checked to be identical.
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
from napari_langmamba.session import SHARP_WEIGHTS_DIR

PROVENANCE = (
    "Research weights, not a medical device. Trained on CPU with the bundled training package. "
    "SEED: the 25 real quarter-/full-dose pairs of Mayo-2016 patients L096, L143, L286 only (Siemens "
    "SOMATOM Definition AS+, 120 kVp, 3 mm, kernels D45 and B30, quarter dose; AAPM-Mayo Low Dose CT "
    "Grand Challenge), trained in stages that each start from the previous one (--init). "
    "Patient L192 was never trained on: it selected the checkpoints and gives every reported number. "
    "LangAE: all normal-dose CT of ../shared/data except L192 and 15 held-out chest slices (Mayo L096 "
    "volume and full-dose slices of L096/L143/L286, a contrast chest volume (Siemens Sensation 16, "
    "B70f), a Siemens Biograph40 mCT abdominal series (Br38f), three GE LightSpeed slices), the "
    "displayable-word MiniLM vocabulary, and the anatomy prior (tissue classes from HU physics, not "
    "organ segmentation). Not seen by the denoiser: other scanners, vendors and kernels (sharp kernels "
    "such as B70f lose their texture), doses other than a quarter, children, head, metal implants; "
    "expect less on them."
)

SHARP_PROVENANCE = (
    "Research weights, not a medical device. Trained on CPU with the bundled training package, starting "
    "from the bundled default SEED (--init). Data: simulated low-dose pairs of every 6th, later every 3rd, "
    "of the 84 training slices of one contrast chest CT (Siemens Sensation 16, 100 kVp, 3 mm, sharp kernel "
    "B70f), at doses of 5, 7.5, 10, 25 and 50 % with each sample's noise scaled by 0.75-1.75, made by "
    "projection-domain noise insertion matched to the volume's own measured noise (training.simulate, "
    "--match-noise, ramp-filtered texture). No real low-dose scan of a sharp kernel "
    "was available: these weights have never seen real sharp-kernel low-dose noise. Selection: none (the last "
    "checkpoint of a fixed schedule); the 15 held-out slices of the same volume give every reported chest number. "
    "For smooth and medium kernels (B30, D45, STANDARD) use the default weights; expect less on other scanners, "
    "kernels, children, head and metal."
)


def validation_curve(run: Path) -> dict:
    """Every epoch's validation metrics of a run and where its selection metric peaked."""
    curve = []
    metrics = run / "metrics.jsonl"
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        record = json.loads(line)
        if record.get("kind") == "epoch" and record.get("val"):
            curve.append({"step": record["step"], **{k: round(float(v), 5) for k, v in record["val"].items()}})
    if not curve:
        return {"curve": []}
    summary = run / "summary.json"
    key = (json.loads(summary.read_text()).get("best") or {}).get("key") if summary.is_file() else None
    key = key or "psnr"
    best = max(curve, key=lambda r: r.get(key, float("-inf")))
    return {"curve": curve, "best_key": key, "best_step": best["step"], f"best_{key}": best.get(key),
            "last_step": curve[-1]["step"], "steps_without_improvement": curve[-1]["step"] - best["step"]}


def best_checkpoint(run: Path, names: tuple[str, ...] = ("best", "last")) -> Path:
    for name in names:
        if (run / name / "config.json").is_file():
            return run / name
    raise SystemExit(f"error: no best/ or last/ checkpoint in {run}")


def init_runs(runs: list[Path]) -> list[dict]:
    """The training record and validation curve of each run a bundled model started from; for an
    earlier bundled model's folder, its record as it is (curve and init chain included)."""
    records = []
    for run in runs:
        if (run / "config.json").is_file() and not (run / "last").is_dir():
            records.append(dict(load_checkpoint(run).meta.get("training") or {}, bundled_from=str(run)))
        else:
            records.append(dict(load_checkpoint(run / "last").meta.get("training") or {},
                                validation=validation_curve(run)))
    return records


def _same_seed_encoder(seed_ckpt, langae_ckpt) -> bool:
    """Whether the SEED's frozen encoder layers equal the LangAE's (conv_in, down[:-1]) at the bundle's
    float16 precision."""
    from training.langae import seed_feature_prefixes

    langae = build_model(langae_ckpt)
    seed_state, langae_state = build_model(seed_ckpt).state_dict(), langae.state_dict()
    keys = [k for k in langae_state if k.startswith(seed_feature_prefixes(langae.encoder))]
    return bool(keys) and all(k in seed_state and torch.equal(seed_state[k].half(), langae_state[k].half())
                              for k in keys)


def save_float16(folder: Path, checkpoint, *, training: dict, metrics, provenance: str) -> None:
    """``checkpoint``'s model as a float16 checkpoint in ``folder`` with its record beside it."""
    save_checkpoint(folder, build_model(checkpoint), kind=checkpoint.kind, config=checkpoint.config,
                    dtype=torch.float16, extra={"normalization": checkpoint.normalization, "training": training,
                                                "metrics": metrics, "provenance": provenance})


def read_json(path: Path | None) -> dict | None:
    return None if path is None else json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    seed = parser.add_mutually_exclusive_group(required=True)
    seed.add_argument("--seed-run", type=Path, help="run folder of the SEED + LangDA training")
    seed.add_argument("--seed-bundle", type=Path,
                      help="keep the SEED of this earlier bundle as it is (its weights, record and evaluation)")
    parser.add_argument("--seed-init-run", type=Path, nargs="+", default=[],
                        help="the SEED runs that --seed-run started from (--init), oldest first")
    langae = parser.add_mutually_exclusive_group(required=True)
    langae.add_argument("--langae-run", type=Path, help="run folder of the LangAE training")
    langae.add_argument("--langae-bundle", type=Path,
                        help="keep this earlier bundled LangAE as it is (e.g. a copy of an earlier bundle's langae/; "
                             "its weights and record), beside a new --seed-run trained on its encoder")
    parser.add_argument("--langae-init-run", type=Path, nargs="+", default=[],
                        help="the LangAE runs that --langae-run started from (--init), oldest first")
    parser.add_argument("--evaluation", type=Path, nargs="+", default=[],
                        help="JSON files written by `python -m training evaluate` for this model")
    parser.add_argument("--sharp", action="store_true",
                        help="bundle the sharp-kernel denoiser: --seed-run's last checkpoint, no langae/ of its own "
                             "(needs --langae-bundle, the default bundle's LangAE), written to weights/sharp")
    parser.add_argument("--out", type=Path, help="destination (default: the package's default or sharp weights)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = SHARP_WEIGHTS_DIR if args.sharp else DEFAULT_WEIGHTS_DIR
    if args.sharp and (args.seed_run is None or args.langae_bundle is None):
        print("error: --sharp bundles a new --seed-run trained on the default bundle's LangAE (--langae-bundle)",
              file=sys.stderr)
        return 2

    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        print(f"error: {args.out} already holds weights; pass --overwrite to replace them", file=sys.stderr)
        return 2

    if args.langae_bundle is not None:
        if args.seed_bundle is not None or args.langae_init_run:
            print("error: --langae-bundle keeps a bundled LangAE with its own record; give it with a new --seed-run "
                  "and without --langae-init-run", file=sys.stderr)
            return 2
        langae_ckpt = load_checkpoint(args.langae_bundle)
        langae_training = dict(langae_ckpt.meta.get("training") or {})
    else:
        langae_ckpt = load_checkpoint(best_checkpoint(args.langae_run))
        langae_training = dict(langae_ckpt.meta.get("training") or {}, validation=validation_curve(args.langae_run))
        langae_training["init_runs"] = init_runs(args.langae_init_run)
    if args.seed_bundle is not None:
        seed_ckpt = load_checkpoint(args.seed_bundle)
        seed_training = dict((seed_ckpt.meta.get("training") or {}).get("seed") or {})
        metrics = dict(seed_ckpt.meta.get("metrics") or {})
        metrics["evaluation"] = {**(metrics.get("evaluation") or {}),
                                 **{path.parent.name: read_json(path) for path in args.evaluation}}
    else:
        seed_ckpt = load_checkpoint(best_checkpoint(args.seed_run, ("last",) if args.sharp else ("best", "last")))
        seed_training = dict(seed_ckpt.meta.get("training") or {}, validation=validation_curve(args.seed_run))
        seed_training["init_runs"] = init_runs(args.seed_init_run)
        metrics = {
            "validation": (seed_ckpt.meta.get("metrics") or {}).get("validation"),
            "evaluation": {path.parent.name: read_json(path) for path in args.evaluation},
        }

    # A kept SEED or a kept LangAE must share the encoder layers SEED runs (a --langae-run beside a
    # --seed-run is the pair as trained).
    kept = args.seed_bundle or args.langae_bundle
    if kept is not None and not _same_seed_encoder(seed_ckpt, langae_ckpt):
        print(f"error: the SEED of {args.seed_bundle or args.seed_run} was trained on another encoder than the "
              f"LangAE of {args.langae_bundle or args.langae_run}; retrain the SEED on this LangAE "
              "(--seed-run of a run trained with --langae set to it)", file=sys.stderr)
        return 2

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".bundle-", dir=args.out.parent) as tmp:
        staging = Path(tmp) / "default"
        save_float16(staging, seed_ckpt, training={"seed": seed_training, "langae": langae_training},
                     metrics=metrics, provenance=SHARP_PROVENANCE if args.sharp else PROVENANCE)
        if not args.sharp:
            save_float16(staging / "langae", langae_ckpt, training=langae_training,
                         metrics=langae_ckpt.meta.get("metrics"), provenance=PROVENANCE)
        if args.out.exists():
            shutil.rmtree(args.out)
        staging.rename(args.out)
    size_mb = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file()) / 1e6
    print(f"bundled {args.out} ({size_mb:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
