"""``torchrun --nproc_per_node=2`` (gloo on CPU) runs the seed stage unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_langmamba.checkpoint import load_checkpoint, save_checkpoint
from training.runs import read_metrics

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def pairs_and_langae(tmp_path) -> tuple[Path, Path]:
    from napari_langmamba.models.codebook import load_codebook
    from napari_langmamba.models.langae import LangAE, LangAEConfig

    rng = np.random.default_rng(1)
    for sub in ("quarter_1mm", "full_1mm"):
        (tmp_path / "data" / sub).mkdir(parents=True)
    for i in range(6):
        full = rng.normal(40.0, 20.0, (32, 32)).astype(np.float32)
        np.save(tmp_path / "data" / "full_1mm" / f"x_full_{i}.npy", full + 1024.0)
        np.save(tmp_path / "data" / "quarter_1mm" / f"x_quarter_{i}.npy", full + 1024.0 + rng.normal(0, 30, full.shape))
    torch.manual_seed(0)
    langae = LangAE(LangAEConfig.preset("tiny", codebook_dim=16), codebook=load_codebook("random:64x16"))
    save_checkpoint(tmp_path / "langae", langae, kind="langae")
    return tmp_path / "data", tmp_path / "langae"


def test_torchrun_two_processes_gloo_seed_stage(pairs_and_langae, tmp_path):
    data, langae = pairs_and_langae
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "training", "seed", "--data", str(data), "--output", str(run), "--preset", "tiny",
           "--langae", str(langae), "--epochs", "1", "--batch-size", "1", "--patch-size", "32",
           "--val-fraction", "0.3", "--val-max-images", "2", "--log-every", "1", "--device", "cpu", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(run)
    start = [r for r in records if r.get("event") == "start"]
    assert len(start) == 1 and start[0]["world_size"] == 2  # rank 0 alone writes the log
    # 4 training slices sharded over 2 processes, batch 1 each: 2 steps of 2 images
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]
    (epoch,) = [r for r in records if r["kind"] == "epoch"]
    assert epoch["val"]["n_images"] == 2  # one validation slice per rank, summed over ranks
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2
    ckpt = load_checkpoint(run / "last")
    assert ckpt.kind == "seed" and ckpt.meta["training"]["world_size"] == 2
    assert not list(run.glob(".*staging*"))
