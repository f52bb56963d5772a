"""Word-anatomy agreement of the LangAE token pyramid; writes benchmarks/results/token_agreement.json.

Usage::

    .venv/bin/python benchmarks/token_agreement.py [--chest DIR] [--langae DIR] [--weights DIR]
                                                   [--quick] [--threads N] [--out FILE]

Measured on slices no model was trained on (the data convention of ``../shared/data``: patient
L192 is validation only), per pyramid layer (1 coarse, 2 middle, 3 fine):

1. **Tissue agreement.** Each region of a layer (the pixel boxes of
   :func:`napari_langmamba.tokens.token_pyramid`) is *dominated* by a tissue class when that class
   covers at least ``--dominance`` (60 %) of its pixels in :func:`napari_langmamba.anatomy.tissue_map`
   of the **full-dose** slice (a physical tissue prior from HU, not organ segmentation). The
   agreement is the share of dominated regions whose word is in that class's word list
   (``TISSUE_CLASSES[k].words``, case-insensitive); the confusion table counts, per dominant
   class, the class of each region's word (``other`` for a word in no list). It is measured for
   the words of the full-dose slices, of the quarter-dose slices and of the bundled denoiser's
   output on the quarter dose (all against the full-dose tissue map), and for held-out chest
   slices (``--chest``: a folder of DICOM files from a scanner, kernel and body region the LangAE
   did not train on; the tissue map of the slice itself, there is no second dose).
2. **Noise robustness.** The share of regions whose word is the same on the quarter-dose slice
   as on its full-dose pair (the paper's claim that LangAE features are robust to noise).
3. **The denoiser's words.** The same share between the denoiser's output on the quarter dose and
   the full dose.

Inputs: ``<data>/ct/mayo2016_pairs/L192/{full,quarter}_3mm_{D45,B30}/*.IMA`` (11 pairs; a file
and its namesake in the other dose folder are the same slice) and the ``--chest`` folder (the lead
keeps held-out slices of the chest volume at ``/work/runs/data/chest_heldout``). ``--quick`` takes
one pair per kernel and three chest slices. The default run (11 pairs, 15 chest slices) takes
about 3-4 minutes on 2 CPU cores.

Prints a markdown summary (agreement per set and layer, pair agreement, the confusion table of
the full-dose L192 words, the most frequent words per class) and writes the JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from napari_langmamba.anatomy import DOMINANCE, dominant_classes  # noqa: E402  (light: numpy only)

DATA = Path(os.environ.get("LANGMAMBA_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
PATIENT = "L192"
KERNELS = ("D45", "B30")
OUT = REPO_ROOT / "benchmarks" / "results" / "token_agreement.json"
OTHER = "other"
GOALS = {  # issue 11: layer 3 >= 80 % and layer 2 >= 70 % on L192; quarter vs full >= 70 % at layer 3
    "L192_full_layer3_tissue": ("L192 full", 3, 0.80),
    "L192_full_layer2_tissue": ("L192 full", 2, 0.70),
    "L192_quarter_vs_full_layer3": ("quarter vs full", 3, 0.70),
}
LAYERS = (1, 2, 3)


# --------------------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------------------
def word_class_table() -> dict[str, int]:
    """``{lower-case word: class value}`` for every word of every tissue class (first class wins)."""
    from napari_langmamba.anatomy import TISSUE_CLASSES

    table: dict[str, int] = {}
    for tissue in TISSUE_CLASSES:
        for word in tissue.words:
            table.setdefault(word.strip().lower(), tissue.index)
    return table


def region_class_counts(tissue: np.ndarray, row_edges: np.ndarray, col_edges: np.ndarray, n_classes: int) -> np.ndarray:
    """(rows, cols, n_classes) pixel counts of each class in each region of a grid of boxes."""
    onehot = (tissue[..., None] == np.arange(n_classes, dtype=tissue.dtype)).astype(np.int32)
    return np.add.reduceat(np.add.reduceat(onehot, row_edges[:-1], axis=0), col_edges[:-1], axis=1)


class Tally:
    """Tissue agreement of one set of slices, per layer."""

    def __init__(self, class_names: list[str]) -> None:
        self.class_names = class_names
        k = len(class_names)
        # confusion[layer][dominant class, word class] (word class k = 'other')
        self.confusion = {layer: np.zeros((k, k + 1), dtype=np.int64) for layer in LAYERS}
        self.regions = dict.fromkeys(LAYERS, 0)
        self.words: dict[int, dict[int, Counter]] = {layer: {c: Counter() for c in range(k)} for layer in LAYERS}
        self.all_words: dict[int, Counter] = {layer: Counter() for layer in LAYERS}
        self.slices = 0

    def add(self, pyramid: Any, tissue: np.ndarray, word_classes: dict[str, int], threshold: float) -> dict:
        """Count one slice's pyramid against a tissue map; return its per-layer agreement."""
        k = len(self.class_names)
        self.slices += 1
        per_layer = {}
        for layer in LAYERS:
            tl = pyramid.layer(layer)
            counts = region_class_counts(tissue, tl.row_edges, tl.col_edges, k)
            dominant = dominant_classes(counts, threshold).ravel()
            words = [w.strip().lower() for w in pyramid.words(layer)]
            self.all_words[layer].update(words)
            word_class = np.array([word_classes.get(w, k) for w in words])
            dominated = dominant >= 0
            np.add.at(self.confusion[layer], (dominant[dominated], word_class[dominated]), 1)
            self.regions[layer] += int(tl.n_regions)
            for cls, word in zip(dominant[dominated], np.asarray(words, dtype=object)[dominated], strict=True):
                self.words[layer][int(cls)][word] += 1
            n_dominated = int(dominated.sum())
            n_match = int((word_class[dominated] == dominant[dominated]).sum())
            per_layer[layer] = {"dominated": n_dominated, "matched": n_match,
                                "agreement": n_match / n_dominated if n_dominated else None}
        return per_layer

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"slices": self.slices, "layers": {}}
        for layer in LAYERS:
            confusion = self.confusion[layer]
            matched = int(np.trace(confusion[:, : len(self.class_names)]))
            dominated = int(confusion.sum())
            columns = [*self.class_names, OTHER]
            out["layers"][str(layer)] = {
                "regions": self.regions[layer],
                "dominated": dominated,
                "matched": matched,
                "agreement": matched / dominated if dominated else None,
                "distinct_words": len(self.all_words[layer]),
                "most_common_word_share": (self.all_words[layer].most_common(1)[0][1] / self.regions[layer]
                                           if self.regions[layer] else None),
                "per_class": {
                    name: {
                        "dominated": int(confusion[i].sum()),
                        "matched": int(confusion[i, i]),
                        "agreement": float(confusion[i, i] / confusion[i].sum()) if confusion[i].sum() else None,
                    }
                    for i, name in enumerate(self.class_names)
                },
                "confusion": {
                    name: {col: int(confusion[i, j]) for j, col in enumerate(columns)}
                    for i, name in enumerate(self.class_names)
                },
                "top_words": {
                    name: self.words[layer][i].most_common(8) for i, name in enumerate(self.class_names)
                },
            }
        return out


def pair_agreement(a: Any, b: Any) -> dict[int, tuple[int, int, float]]:
    """``{layer: (identical words, regions, chance)}`` between two pyramids of the same geometry.

    ``chance`` is the agreement expected if each region's two words were drawn independently from
    the words of each slice (sum over words of the product of their shares): a vocabulary that
    collapses onto a few words agrees with itself by chance alone.
    """
    out = {}
    for layer in LAYERS:
        wa, wb = a.words(layer), b.words(layer)
        ca, cb = Counter(wa), Counter(wb)
        chance = sum(ca[w] * cb[w] for w in ca) / (len(wa) * len(wb))
        out[layer] = (sum(x == y for x, y in zip(wa, wb, strict=True)), len(wa), chance)
    return out


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------
def l192_pairs(data: Path, quick: bool) -> list[tuple[str, Path, Path]]:
    """``(name, full-dose file, quarter-dose file)`` of the L192 pairs (one per kernel with ``quick``)."""
    pairs = []
    for kernel in KERNELS:
        full_dir = data / "ct" / "mayo2016_pairs" / PATIENT / f"full_3mm_{kernel}"
        quarter_dir = data / "ct" / "mayo2016_pairs" / PATIENT / f"quarter_3mm_{kernel}"
        if not full_dir.is_dir() or not quarter_dir.is_dir():
            continue
        names = sorted(p.name for p in full_dir.iterdir() if (quarter_dir / p.name).is_file())
        if quick:
            names = names[len(names) // 2 : len(names) // 2 + 1]
        pairs += [(f"{kernel}/{n}", full_dir / n, quarter_dir / n) for n in names]
    return pairs


def read_slice(path: Path) -> tuple[np.ndarray, tuple[float, float]]:
    from napari_langmamba.io import read_ct

    volume = read_ct(path)
    if volume.hu.shape[0] != 1:
        raise SystemExit(f"{path} holds {volume.hu.shape[0]} slices; expected one.")
    return np.asarray(volume.hu[0], dtype=np.float32), (float(volume.spacing[1]), float(volume.spacing[2]))


def chest_slices(folder: Path, quick: bool) -> tuple[np.ndarray, tuple[float, float]]:
    from napari_langmamba.io import read_ct

    volume = read_ct(folder)
    hu = np.asarray(volume.hu, dtype=np.float32)
    if quick:
        hu = hu[np.linspace(0, len(hu) - 1, min(3, len(hu))).round().astype(int)]
    return hu, (float(volume.spacing[1]), float(volume.spacing[2]))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def langae_info(spec: str, model: Any) -> dict:
    from napari_langmamba.session import resolve_weights

    path = resolve_weights(spec, role="langae")
    info: dict[str, Any] = {"weights": spec, "path": str(path)}
    weights = path / "model.safetensors" if path.is_dir() else path
    if weights.is_file():
        info["sha256"] = sha256_file(weights)
    config_path = path / "config.json" if path.is_dir() else None
    if config_path is not None and config_path.is_file():
        config = json.loads(config_path.read_text())
        info["preset"] = config.get("config", {}).get("name")
        info["codebook"] = config.get("codebook")
        training = config.get("training", {})
        info["trained_on"] = training.get("data")
    info["vocabulary_size"] = len(model.codebook.words)
    # "tissue": the words are chosen among those of the class the region head predicts, so the
    # agreement below then largely measures that classifier against the HU prior
    info["word_choice"] = model.config.word_choice
    info["region_wide"] = model.config.region_wide
    return info


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------
def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def markdown(result: dict) -> str:
    lines = [f"## Word-anatomy agreement ({result['langae']['path']})", ""]
    lines += ["Tissue agreement: share of regions dominated (>= "
              f"{100 * result['dominance']:.0f} % of pixels) by one tissue class whose word is in that class's list.",
              "(distinct words on those slices in brackets)",
              "", "| set | slices | layer 1 | layer 2 | layer 3 |", "|---|---|---|---|---|"]
    for name, group in result["sets"].items():
        cells = []
        for layer in LAYERS:
            g = group["layers"][str(layer)]
            cells.append(f"{pct(g['agreement'])} ({g['matched']}/{g['dominated']}; {g['distinct_words']} words)")
        lines.append(f"| {name} | {group['slices']} | " + " | ".join(cells) + " |")
    if result["pairs"]:
        lines += ["", "Identical words per region between two versions of the same slice "
                  "(in brackets: the agreement expected by chance from each slice's word shares):", "",
                  "| pair | slices | layer 1 | layer 2 | layer 3 |", "|---|---|---|---|---|"]
        for name, pair in result["pairs"].items():
            cells = [f"{pct(pair['layers'][str(layer)]['agreement'])} "
                     f"({pair['layers'][str(layer)]['identical']}/{pair['layers'][str(layer)]['regions']}; "
                     f"chance {pct(pair['layers'][str(layer)]['chance'])})"
                     for layer in LAYERS]
            lines.append(f"| {name} | {pair['slices']} | " + " | ".join(cells) + " |")
    full = result["sets"].get("L192 full")
    if full:
        for layer in (2, 3):
            confusion = full["layers"][str(layer)]["confusion"]
            columns = list(next(iter(confusion.values())))
            lines += ["", f"Confusion, L192 full dose, layer {layer} (rows: dominant tissue class; "
                      "columns: the class of the region's word):", "",
                      "| class | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
            for name, row in confusion.items():
                lines.append(f"| {name} | " + " | ".join(str(row[c]) for c in columns) + " |")
        lines += ["", "Most frequent words per dominant class, L192 full dose, layer 3:", ""]
        for name, words in full["layers"]["3"]["top_words"].items():
            if words:
                lines.append(f"- {name}: " + ", ".join(f"{w} ({n})" for w, n in words))
    if result["goals"]:
        lines += ["", "Goals (issue 11):", ""]
        for name, goal in result["goals"].items():
            lines.append(f"- {name}: {pct(goal['value'])} (goal >= {100 * goal['goal']:.0f} %): "
                         + ("met" if goal["met"] else "not met"))
    lines += ["", f"{result['seconds']:.0f} s on {result['machine']['cpu_count']} CPU cores, "
              f"torch threads {result['machine']['torch_threads']}."]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------
def _measure_l192_pair(name: str, full_path: Path, quarter_path: Path, *, pyramid: Any, denoiser: Any,
                       sets: dict, pair_counts: dict, words: Any, threshold: float) -> dict:
    """Add one L192 pair (full, quarter and denoised words) to ``sets`` and ``pair_counts``; its record."""
    from napari_langmamba.anatomy import TISSUE_CLASSES, tissue_map

    full, spacing = read_slice(full_path)
    quarter, _ = read_slice(quarter_path)
    tissue = tissue_map(full, pixel_spacing=spacing)
    versions = {"full": full, "quarter": quarter}
    if denoiser is not None:
        versions["denoised"] = denoiser.denoise(quarter)
    pyramids = {key: pyramid(hu) for key, hu in versions.items()}
    record: dict[str, Any] = {"set": "L192", "slice": name,
                              "tissue_pixels": np.bincount(tissue.ravel(), minlength=len(TISSUE_CLASSES)).tolist()}
    for key, p in pyramids.items():
        per_layer = sets[f"L192 {key}"].add(p, tissue, words, threshold)
        record[f"{key}_tissue_agreement"] = {str(k): v["agreement"] for k, v in per_layer.items()}
    for pair_name, other in (("quarter vs full", "quarter"), ("denoised vs full", "denoised")):
        if other not in pyramids:
            continue
        agree = pair_agreement(pyramids[other], pyramids["full"])
        for layer, (same, n, chance) in agree.items():
            pair_counts[pair_name][layer][0] += same
            pair_counts[pair_name][layer][1] += n
            pair_counts[pair_name][layer][2] += chance * n
        record[f"{other}_vs_full"] = {str(k): same / n for k, (same, n, _) in agree.items()}
    return record


def _pair_summary(pair_counts: dict, n_slices: int) -> dict:
    """Identical-word shares per slice pair kind and layer, with the agreement expected by chance."""
    return {
        name: {"slices": n_slices, "layers": {
            str(layer): {"identical": same, "regions": n, "agreement": same / n if n else None,
                         "chance": chance / n if n else None}
            for layer, (same, n, chance) in counts.items()
        }}
        for name, counts in pair_counts.items()
    }


def _goals(result: dict) -> dict:
    """Each issue goal (GOALS) with the measured value and whether it is met."""
    goals = {}
    for key, (name, layer, goal) in GOALS.items():
        source = result["sets"].get(name) or result["pairs"].get(name)
        value = source["layers"][str(layer)]["agreement"] if source else None
        goals[key] = {"value": value, "goal": goal, "met": value is not None and value >= goal}
    return goals


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--langae", default="default",
                        help="LangAE checkpoint folder (or a folder holding langae/); default: the bundled one")
    parser.add_argument("--weights", default="default",
                        help="denoiser checkpoint for the 'denoised' words (default: the bundled one); 'none' skips it")
    parser.add_argument("--chest", type=Path, default=None,
                        help="folder of held-out chest DICOM slices (e.g. /work/runs/data/chest_heldout)")
    parser.add_argument("--data", type=Path, default=DATA, help="the shared data folder (holds ct/mayo2016_pairs)")
    parser.add_argument("--dominance", type=float, default=DOMINANCE,
                        help="share of a region's pixels one class must cover to dominate it (default 0.6)")
    parser.add_argument("--quick", action="store_true", help="one L192 pair per kernel and three chest slices")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=OUT, help=f"JSON output (default {OUT.relative_to(REPO_ROOT)})")
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = _parser()
    args = parser.parse_args(argv)
    if not 0.5 < args.dominance <= 1.0:
        parser.error("--dominance must be in (0.5, 1]: one class at most can dominate a region")

    import torch

    from napari_langmamba.anatomy import TISSUE_CLASSES, tissue_map
    from napari_langmamba.tokens import load_token_model, token_pyramid

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    load_before = os.getloadavg()[0]
    pairs = l192_pairs(args.data, args.quick)
    if not pairs:
        raise SystemExit(f"No L192 pairs under {args.data / 'ct' / 'mayo2016_pairs' / PATIENT}; "
                         "point --data at the shared data folder.")
    if args.chest is not None and not args.chest.is_dir():
        raise SystemExit(f"--chest {args.chest} is not a folder.")

    model = load_token_model(args.langae, device="cpu")
    denoiser = None
    if str(args.weights).lower() != "none":
        from napari_langmamba.inference import Denoiser

        denoiser = Denoiser.load(args.weights, device="cpu")
    class_names = [c.name for c in TISSUE_CLASSES]
    words = word_class_table()
    threshold = float(args.dominance)

    sets = {"L192 full": Tally(class_names), "L192 quarter": Tally(class_names)}
    if denoiser is not None:
        sets["L192 denoised"] = Tally(class_names)
    pair_names = ["quarter vs full"] + (["denoised vs full"] if denoiser is not None else [])
    pair_counts = {name: {layer: [0, 0, 0.0] for layer in LAYERS} for name in pair_names}
    per_slice = []

    def pyramid(hu: np.ndarray) -> Any:
        return token_pyramid(model, hu, top_k=0, cache=False)

    for i, (name, full_path, quarter_path) in enumerate(pairs, 1):
        print(f"[{i}/{len(pairs)}] L192 {name}", file=sys.stderr, flush=True)
        per_slice.append(_measure_l192_pair(name, full_path, quarter_path, pyramid=pyramid, denoiser=denoiser,
                                            sets=sets, pair_counts=pair_counts, words=words, threshold=threshold))

    chest_info = None
    if args.chest is not None:
        hu, spacing = chest_slices(args.chest, args.quick)
        chest = sets["chest held-out"] = Tally(class_names)
        for z, slice_hu in enumerate(hu):
            print(f"[chest {z + 1}/{len(hu)}]", file=sys.stderr, flush=True)
            tissue = tissue_map(slice_hu, pixel_spacing=spacing)
            per_layer = chest.add(pyramid(slice_hu), tissue, words, threshold)
            per_slice.append({"set": "chest held-out", "slice": z,
                              "full_tissue_agreement": {str(k): v["agreement"] for k, v in per_layer.items()}})
        chest_info = {"folder": str(args.chest), "slices": len(hu)}

    pairs_out = _pair_summary(pair_counts, len(pairs))
    result: dict[str, Any] = {
        "benchmark": "token_agreement",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "machine": {
            "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "load_average_1min_before": round(load_before, 2),
            "load_average_1min_after": round(os.getloadavg()[0], 2),
        },
        "langae": langae_info(args.langae, model),
        "denoiser": None if denoiser is None else {k: denoiser.info.get(k) for k in
                                                   ("weights", "path", "kind", "preset", "checkpoint_sha256")},
        "inputs": {"L192_pairs": [name for name, _, _ in pairs], "data": str(args.data), "chest": chest_info,
                   "quick": bool(args.quick)},
        "dominance": threshold,
        "tissue_classes": {c.name: list(c.words) for c in TISSUE_CLASSES},
        "tissue_map": "napari_langmamba.anatomy.tissue_map of the full-dose slice (the chest slice itself)",
        "sets": {name: tally.to_dict() for name, tally in sets.items()},
        "pairs": pairs_out,
        "per_slice": per_slice,
    }
    result["goals"] = _goals(result)
    result["seconds"] = round(time.perf_counter() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))
    print(f"\nwrote {args.out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
