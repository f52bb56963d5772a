"""How much tissue information the LangAE's tokens could carry; writes benchmarks/results/token_probe.json.

Usage::

    .venv/bin/python benchmarks/token_probe.py [--langae DIR] [--out PATH]

The word-anatomy agreement (``token_agreement.py``) asks whether the *word* a region gets is in
its tissue class's list. This script asks whether the information is there at all: a linear
classifier (multinomial logistic regression, L-BFGS, L2 1e-3) is fitted on the LangAE's latent
``z`` and on the layer-3 residual (what the finest layer quantizes into a word) of every 16 x 16
pixel region dominated (>= 60 % of its pixels) by one class of the tissue map, on the full-dose
slices of the training patients L096, L143 and L286 (25 slices), and tested on those of the
validation patient L192 (11 slices). A probe far above the word agreement means the words, not
the features, are what is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
PAIRS = Path(os.environ.get("LANGMAMBA_SHARED_DATA", REPO_ROOT.parent / "shared" / "data")) / "ct" / "mayo2016_pairs"
OUT = REPO_ROOT / "benchmarks" / "results" / "token_probe.json"
TRAIN_PATIENTS = ("L096", "L143", "L286")
VALIDATION_PATIENT = "L192"


def region_features(model, patient: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``({"z": (m, d), "layer3": (m, d)}, dominant class (m,))`` of the dominated regions of a patient's full-dose slices."""
    import torch

    from napari_langmamba.anatomy import dominant_region_classes, tissue_map
    from napari_langmamba.io import read_ct
    from napari_langmamba.windowing import MODEL_NORMALIZATION

    feats: dict[str, list[np.ndarray]] = {"z": [], "layer3": []}
    labels = []
    for folder in sorted((PAIRS / patient).glob("full_*")):
        with warnings.catch_warnings():  # a pair series holds scattered slices: its gaps are expected
            warnings.simplefilter("ignore")
            volume = read_ct(folder)
        for hu in volume.hu:
            tissue = tissue_map(hu, pixel_spacing=volume.spacing[1:])
            x = torch.from_numpy(MODEL_NORMALIZATION.to_model(hu.astype(np.float32)))[None, None]
            with torch.inference_mode():
                z = model.encode(x)
                out = model.quantize(z, x)
            dominant = dominant_region_classes(tissue, tuple(z.shape[-2:]))[2]  # (rows, cols), -1: none
            keep = torch.from_numpy(dominant >= 0)
            feats["z"].append(z[0].permute(1, 2, 0)[keep].numpy())
            feats["layer3"].append(out.layer_embeddings[2][0].permute(1, 2, 0)[keep].numpy())
            labels.append(dominant[dominant >= 0])
    return {k: np.concatenate(v) for k, v in feats.items()}, np.concatenate(labels)


def probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> dict:
    import torch

    from napari_langmamba.anatomy import TISSUE_CLASSES

    a, b = torch.from_numpy(train_x).float(), torch.from_numpy(test_x).float()
    mean, std = a.mean(0), a.std(0) + 1e-6
    a, b = (a - mean) / std, (b - mean) / std
    weight = torch.zeros(a.shape[1], 7, requires_grad=True)
    bias = torch.zeros(7, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200)
    target = torch.from_numpy(train_y).long()

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(a @ weight + bias, target) + 1e-3 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        pred = (b @ weight + bias).argmax(1).numpy()
    per_class = {TISSUE_CLASSES[k].name: {"regions": int((test_y == k).sum()),
                                          "accuracy": float((pred[test_y == k] == k).mean())}
                 for k in range(7) if (test_y == k).any()}
    return {"accuracy": float((pred == test_y).mean()), "regions": int(len(test_y)), "per_class": per_class}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--langae", default="default", help="LangAE checkpoint folder (default: the bundled one)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if not PAIRS.is_dir():
        parser.error(f"the real pairs are not at {PAIRS} (set LANGMAMBA_SHARED_DATA)")
    from napari_langmamba.anatomy import DOMINANCE
    from napari_langmamba.tokens import load_token_model

    start = time.perf_counter()
    model = load_token_model(args.langae)
    train = [region_features(model, p) for p in TRAIN_PATIENTS]
    train_x = {k: np.concatenate([t[0][k] for t in train]) for k in ("z", "layer3")}
    train_y = np.concatenate([t[1] for t in train])
    test_x, test_y = region_features(model, VALIDATION_PATIENT)
    result = {
        "benchmark": "token_probe",
        "langae": args.langae,
        "train_patients": list(TRAIN_PATIENTS),
        "test_patient": VALIDATION_PATIENT,
        "train_regions": int(len(train_y)),
        "dominance": DOMINANCE,
        "probes": {name: probe(train_x[name], train_y, test_x[name], test_y) for name in ("z", "layer3")},
    }
    result["seconds"] = round(time.perf_counter() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, r in result["probes"].items():
        classes = ", ".join(f"{c} {v['accuracy']:.1%}" for c, v in r["per_class"].items())
        print(f"{name}: {r['accuracy']:.1%} of {r['regions']} L192 regions ({classes})")
    print(f"wrote {args.out} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
