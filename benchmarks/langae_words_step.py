"""Time of one word-head training step with and without the decoder; writes benchmarks/results/langae_words_step.json.

Usage::

    .venv/bin/python benchmarks/langae_words_step.py [--langae DIR] [--batch N] [--repeats K] [--out PATH]

``langae --train-part words`` (and ``region``) trains on ``beta * L_commit + alpha * L_semantic``
alone, so its steps no longer run the decoder (``LangAE(x, decode=False)``). This script times a
whole step of that loss -- forward, pyramid semantic loss against a planted pool of 50 words on
every layer, backward through the word head -- on ``--batch`` 512 x 512 random images, with the
decoder run as before and without it, alternating the two ``--repeats`` times in one process so
that both see the same machine load; it reports the medians and their ratio.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
OUT = REPO_ROOT / "benchmarks" / "results" / "langae_words_step.json"
WORD_HEAD = ("encoder.down.4", "encoder.mid", "encoder.norm_out", "encoder.conv_out", "quant_conv", "region_pixels")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--langae", default="default", help="LangAE checkpoint (default: the bundled one)")
    parser.add_argument("--batch", type=int, default=2, help="512 x 512 images per step (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per mode (default 3)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)

    import torch

    from napari_langmamba.models.quantizer import pyramid_semantic_loss
    from napari_langmamba.tokens import load_token_model

    model = load_token_model(args.langae).float().train()
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith(WORD_HEAD))
    x = torch.rand(args.batch, 1, 512, 512, generator=torch.Generator().manual_seed(0))
    n = model.quantizer.codebook.shape[0]
    pool = torch.zeros(n, dtype=torch.bool)
    pool[:50] = True

    def step(decode: bool) -> float:
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        _recon, pyramid = model(x, decode=decode)
        semantic = pyramid_semantic_loss([e.float() for e in pyramid.layer_embeddings], model.quantizer.codebook,
                                         [pool] * 3)
        (pyramid.commitment_loss + semantic).backward()
        return time.perf_counter() - start

    step(True), step(False)  # warm-up
    times: dict[str, list[float]] = {"with_decoder": [], "without_decoder": []}
    for _ in range(args.repeats):
        times["with_decoder"].append(step(True))
        times["without_decoder"].append(step(False))
    medians = {k: float(np.median(v)) for k, v in times.items()}
    report = {
        "benchmark": "langae_words_step",
        "command": "python benchmarks/langae_words_step.py" + (f" --batch {args.batch}" if args.batch != 2 else ""),
        "machine": {"processor": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads()},
        "langae": str(args.langae),
        "batch": args.batch,
        "image": [512, 512],
        "seconds": times,
        "median_seconds": medians,
        "speedup": medians["with_decoder"] / medians["without_decoder"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"median_seconds": medians, "speedup": round(report["speedup"], 2)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
