"""CPU speed and memory of the denoisers: SEED (paper, lite) against RED-CNN.

Writes ``benchmarks/results/models.json`` with, on CPU with 2 torch threads:

- forward time (no gradients, one slice) of SEED-paper, SEED-lite and RED-CNN at 256x256
  and 512x512, each model in a fresh subprocess so that its peak RSS is its own;
- SEED-paper against RED-CNN at 512x512 measured in one process, alternating the two
  models, so that both see the same machine load (the machine is shared);
- SEED-paper's time at 1024x1024 over its time at 512x512 (same process);
- one SEED-lite training step (forward + backward + AdamW, batch 4 of 128x128 patches).

Times are the minimum over repetitions after a warm-up (which also loads the compiled scan
kernels); wall and CPU (user + system, all threads) seconds are both reported, with the
load average, because other jobs share the cores. Weights are random: the work done does
not depend on them. SEED uses the real LangAE encoder of the same preset.

Usage: ``python benchmarks/models.py [--quick] [--output PATH]`` (``--quick``: small sizes,
to check that the script runs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

THREADS = 2
RESULTS = Path(__file__).resolve().parent / "results" / "models.json"
GOALS = {"seed_paper_over_redcnn_512": 0.8, "scaling_1024_over_512": 4.5, "peak_rss_512_gb": 3.0}


# --------------------------------------------------------------------------- child side


def _rss_gb() -> float:
    """Peak resident set size of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _current_rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def _build(name: str):
    import torch

    from napari_langmamba.models.redcnn import REDCNN, REDCNNConfig

    if name == "redcnn":
        return REDCNN(REDCNNConfig.preset("paper"))
    from napari_langmamba.models.langae import Encoder, LangAEConfig
    from napari_langmamba.models.seed import SEED, SEEDConfig

    preset = name.split("-", 1)[1]
    encoder_config = LangAEConfig.preset(preset, codebook_dim=512)
    seed = SEED(
        SEEDConfig.preset(preset, feature_channels=encoder_config.feature_channels),
        encoder=Encoder(encoder_config),
    )
    with torch.no_grad():  # not the identity: the decoder's output is used
        seed.head.weight.normal_(std=0.01)
    return seed


def _timed(fn, reps: int) -> dict:
    walls, cpus = [], []
    for _ in range(reps):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return {"wall_s": min(walls), "cpu_s": min(cpus), "wall_reps_s": walls, "cpu_reps_s": cpus}


def _forward_job(models: list[str], sizes: list[int], reps: int) -> dict:
    """Forward timings; with several models they alternate, repetition by repetition."""
    import torch

    torch.set_num_threads(THREADS)
    built = {name: _build(name).eval() for name in models}
    out: dict = {"baseline_rss_gb": _current_rss_gb()}
    for name, model in built.items():
        out[name] = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        }
    with torch.no_grad():
        for model in built.values():  # warm-up: kernels, oneDNN primitives
            model(torch.rand(1, 1, 64, 64))
        for size in sizes:
            x = torch.rand(1, 1, size, size)
            runs: dict[str, list] = {name: [] for name in built}
            for _ in range(reps):
                for name, model in built.items():
                    runs[name].append(_timed(lambda m=model, x=x: m(x), 1))
            for name, timings in runs.items():
                out[name][str(size)] = {
                    "wall_s": min(t["wall_s"] for t in timings),
                    "cpu_s": min(t["cpu_s"] for t in timings),
                    "wall_reps_s": [t["wall_s"] for t in timings],
                    "cpu_reps_s": [t["cpu_s"] for t in timings],
                }
    out["peak_rss_gb"] = _rss_gb()
    return out


def _train_job(batch: int, size: int, reps: int) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    model = _build("seed-lite").train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.99), weight_decay=1e-9)
    x = torch.rand(batch, 1, size, size)
    target = torch.rand(batch, 1, size, size)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x), target)
        loss.backward()
        optimizer.step()

    step()  # warm-up: kernels, optimizer state
    out = _timed(step, reps)
    out.update({"batch": batch, "size": size, "trainable_parameters": sum(p.numel() for p in params)})
    out["peak_rss_gb"] = _rss_gb()
    return out


def _child(job: dict) -> None:
    if job["kind"] == "forward":
        result = _forward_job(job["models"], job["sizes"], job["reps"])
    else:
        result = _train_job(job["batch"], job["size"], job["reps"])
    from napari_langmamba.models.scan import scan_backend

    result["scan_backend"] = scan_backend("cpu")
    print(json.dumps(result))


# --------------------------------------------------------------------------- parent side


def _run(job: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), NUMBA_NUM_THREADS=str(THREADS))
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--job", json.dumps(job)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark job {job} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["job_seconds"] = time.perf_counter() - start
    result["load_average_after"] = os.getloadavg()
    print(f"  {job} done in {result['job_seconds']:.0f} s", file=sys.stderr)
    return result


def _host() -> dict:
    import numba
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": THREADS,
        "torch": torch.__version__,
        "numba": numba.__version__,
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, only to check the script")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.job:
        _child(json.loads(args.job))
        return 0

    small, large, huge = (64, 128, 256) if args.quick else (256, 512, 1024)
    train_size = 64 if args.quick else 128
    output = args.output or (RESULTS.with_name("models_quick.json") if args.quick else RESULTS)
    load_before = os.getloadavg()
    forward = {}
    for name in ("seed-paper", "seed-lite", "redcnn"):
        result = _run({"kind": "forward", "models": [name], "sizes": [small, large], "reps": 2})
        forward[name] = {**result.pop(name), **result}
    paired = _run({"kind": "forward", "models": ["seed-paper", "redcnn"], "sizes": [large], "reps": 2})
    scaling = _run({"kind": "forward", "models": ["seed-paper"], "sizes": [large, huge], "reps": 2})
    train = _run({"kind": "train", "batch": 4, "size": train_size, "reps": 3})

    seed_l, red_l = paired["seed-paper"][str(large)], paired["redcnn"][str(large)]
    ratio_wall = seed_l["wall_s"] / red_l["wall_s"]
    ratio_cpu = seed_l["cpu_s"] / red_l["cpu_s"]
    scale = scaling["seed-paper"]
    scaling_wall = scale[str(huge)]["wall_s"] / scale[str(large)]["wall_s"]
    scaling_cpu = scale[str(huge)]["cpu_s"] / scale[str(large)]["cpu_s"]
    report = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/models.py" + (" --quick" if args.quick else ""),
        "host": _host(),
        "scan_backend": train["scan_backend"],
        "load_average_before": load_before,
        "sizes": {"small": small, "large": large, "huge": huge},
        "forward_one_slice": forward,
        "paired_seed_paper_vs_redcnn": {
            "size": large,
            "seed_paper": seed_l,
            "redcnn": red_l,
            "ratio_wall": ratio_wall,
            "ratio_cpu": ratio_cpu,
            "load_average_after": paired["load_average_after"],
        },
        "seed_paper_scaling": {
            "sizes": [large, huge],
            "timings": {str(large): scale[str(large)], str(huge): scale[str(huge)]},
            "ratio_wall": scaling_wall,
            "ratio_cpu": scaling_cpu,
            "peak_rss_gb": scaling["peak_rss_gb"],
        },
        "train_step_seed_lite": train,
        "goals": {
            "seed_paper_over_redcnn_512": {
                "value_wall": ratio_wall,
                "value_cpu": ratio_cpu,
                "goal": GOALS["seed_paper_over_redcnn_512"],
                "met": max(ratio_wall, ratio_cpu) <= GOALS["seed_paper_over_redcnn_512"],
            },
            "scaling_1024_over_512": {
                "value_wall": scaling_wall,
                "value_cpu": scaling_cpu,
                "goal": GOALS["scaling_1024_over_512"],
                "met": max(scaling_wall, scaling_cpu) <= GOALS["scaling_1024_over_512"],
            },
            "peak_rss_512_gb": {
                "value": forward["seed-paper"]["peak_rss_gb"],
                "goal": GOALS["peak_rss_512_gb"],
                "met": forward["seed-paper"]["peak_rss_gb"] <= GOALS["peak_rss_512_gb"],
            },
        },
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["goals"], indent=2))
    print(f"wrote {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
