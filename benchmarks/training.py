"""CPU training throughput of the denoisers; writes ``benchmarks/results/training.json``.

One optimizer step = forward + loss + backward + AdamW step (betas 0.9/0.99, weight decay
1e-9, as ``python -m training seed``), on random patches (speed does not depend on the
data). Measured on CPU with 2 torch and 2 numba threads, for:

- SEED ``lite`` and ``paper`` (real LangAE encoder of the same preset, random weights) and
  RED-CNN ``paper``;
- patches 4 x 128^2, 4 x 64^2 and 8 x 64^2 (the patch sizes the training commands use);
- LangDA off (MSE only) and on (lambda 0.1, a LangAE of the same preset with a random
  30522 x 384 codebook: the size of the MiniLM vocabulary the bundled LangAE uses).

"Before" and "after" are measured in the same process, step by step alternately, so both
see the same machine load (the 2 cores are shared): "before" selects the previous training
code paths through :func:`napari_langmamba.models.scan.legacy_training_paths` (the unfused
ES2D scan with its split/merge gathers and separate projections; the unfused LayerNorm x
SiLU gate; LangDA's quantizer graph). This process runs inside
:func:`napari_langmamba.allocator.heap_allocations`, as ``python -m training`` now does; the
goal case is also timed in a fresh process with glibc's default allocator (how training ran
before), and the goal's ratios compare that process's "before" with this one's "after"
(``goal.how``). For SEED-lite, "after_bf16" is the current paths under
CPU bfloat16 autocast (``--amp bf16``), with ``ratio_bf16`` = before / after_bf16, timed only on
CPUs with native bfloat16 (AVX512-BF16 or AMX; ``cpu_native_bf16`` in the JSON). RED-CNN has no separate fast path: one mode. Each
mode gets one warm-up step (numba compiles or loads its kernels, oneDNN builds its
primitives), then ``--steps`` timed steps; the median wall time gives steps/s and training
pixels/s (batch x patch^2 per step), and ``ratio`` is before / after of the median step
time (> 1: faster now). CPU time (user + system, all threads) is reported too.

Thread settings: the goal case (fused paths) is also timed in fresh processes with 2 threads
and OpenMP's default wait policy, 2 threads with ``OMP_WAIT_POLICY=PASSIVE``, and 1 thread.

Usage: ``python benchmarks/training.py [--quick] [--steps N] [--only NAME ...] [--goal-only]
[--skip-threads] [--output PATH]``
(``--quick``: SEED-lite at 32 px and RED-CNN tiny, one timed step, to check that the script
runs).
"""

from __future__ import annotations

import os

THREADS = 2
# numba reads its thread count when it is first imported: set it before anything imports it.
os.environ.setdefault("NUMBA_NUM_THREADS", str(THREADS))
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
for _path in (REPO_ROOT, REPO_ROOT / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

RESULTS = REPO_ROOT / "benchmarks" / "results" / "training.json"
CODEBOOK = "random:30522x384"
LAMBDA = 0.1
# Issue 14: SEED-lite, 4 x 128^2, LangDA off: at least twice the throughput of the old code.
GOAL_RATIO = 2.0


def _build(model: str, langda: bool):
    """(denoiser, LangDA loss or None) for ``model`` = seed-lite | seed-paper | seed-tiny | redcnn[-preset]."""
    import torch

    from napari_langmamba.models.codebook import load_codebook
    from napari_langmamba.models.langae import LangAE, LangAEConfig
    from napari_langmamba.models.losses import LangDALoss
    from napari_langmamba.models.redcnn import REDCNN, REDCNNConfig
    from napari_langmamba.models.seed import SEED, SEEDConfig

    kind, _, preset = model.partition("-")
    torch.manual_seed(0)
    langae = None
    if kind == "seed" or langda:
        ae_preset = preset if kind == "seed" else "lite"
        codebook = load_codebook(CODEBOOK)
        config = LangAEConfig.preset(ae_preset, codebook_dim=codebook.embeddings.shape[1])
        langae = LangAE(config, codebook=codebook).eval()
    if kind == "seed":
        assert langae is not None
        import copy

        net = SEED(
            SEEDConfig.preset(preset, feature_channels=langae.config.feature_channels),
            encoder=copy.deepcopy(langae.encoder),
        )
        with torch.no_grad():  # not the identity: the decoder's output matters
            net.head.weight.normal_(std=0.01)
    else:
        net = REDCNN(REDCNNConfig.preset(preset or "paper"))
    loss = LangDALoss(langae, weight=LAMBDA) if langda else None
    return net.train(), loss


def _measure(model: str, batch: int, size: int, langda: bool, steps: int, modes: list[str]) -> dict:
    import torch
    import torch.nn.functional as F

    from napari_langmamba.models.scan import legacy_training_paths

    net, loss_fn = _build(model, langda)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.99), weight_decay=1e-9)
    g = torch.Generator().manual_seed(1)
    low = torch.rand(batch, 1, size, size, generator=g)
    full = (low + 0.05 * torch.randn(batch, 1, size, size, generator=g)).clamp(0, 1)

    def step(bf16: bool = False) -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = net(low)
            loss = loss_fn(out.float(), full)[0] if loss_fn is not None else F.mse_loss(out.float(), full)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    walls: dict[str, list[float]] = {m: [] for m in modes}
    cpus: dict[str, list[float]] = {m: [] for m in modes}
    previous = legacy_training_paths()
    try:
        for mode in modes:  # warm-up of each path
            legacy_training_paths(mode == "before")
            step(mode == "after_bf16")
        for _ in range(steps):
            for mode in modes:
                legacy_training_paths(mode == "before")
                c0, t0 = time.process_time(), time.perf_counter()
                step(mode == "after_bf16")
                walls[mode].append(time.perf_counter() - t0)
                cpus[mode].append(time.process_time() - c0)
    finally:
        legacy_training_paths(previous)
    out: dict = {
        "model": model,
        "batch": batch,
        "patch": size,
        "langda": langda,
        "trainable_parameters": sum(p.numel() for p in params),
    }
    pixels = batch * size * size
    for mode in modes:
        wall = statistics.median(walls[mode])
        out[mode] = {
            "step_s": wall,
            "steps_per_s": 1.0 / wall,
            "pixels_per_s": pixels / wall,
            "cpu_s": statistics.median(cpus[mode]),
            "wall_reps_s": walls[mode],
            "cpu_reps_s": cpus[mode],
        }
    if "before" in out and "after" in out:
        out["ratio"] = out["before"]["step_s"] / out["after"]["step_s"]
        out["ratio_min"] = min(walls["before"]) / min(walls["after"])
        out["ratio_cpu"] = out["before"]["cpu_s"] / out["after"]["cpu_s"]
    if "before" in out and "after_bf16" in out:
        out["ratio_bf16"] = out["before"]["step_s"] / out["after_bf16"]["step_s"]
    out["load_average_after"] = os.getloadavg()
    return out


def _host() -> dict:
    import numba
    import torch
    from models import _host as models_host  # benchmarks/models.py: CPU, versions

    return {**models_host(), "torch_threads": torch.get_num_threads(), "numba_threads": numba.config.NUMBA_NUM_THREADS}


# Thread settings for the goal case (fused paths), each in a fresh process because OpenMP reads
# its wait policy once: the default lets torch's idle threads spin, which on a shared,
# oversubscribed machine takes the cores from the threads doing work (numba's included).
THREAD_SETTINGS = (
    {"threads": 2, "OMP_WAIT_POLICY": None},
    {"threads": 2, "OMP_WAIT_POLICY": "PASSIVE"},
    {"threads": 1, "OMP_WAIT_POLICY": None},
)


def _job(setting: dict, steps: int, quick: bool, *, modes: list[str], heap: bool) -> dict:
    """The goal case (SEED-lite, 4 x 128^2, LangDA off) in a fresh process: ``_measure``'s result."""
    env = dict(os.environ, NUMBA_NUM_THREADS=str(setting["threads"]), OMP_NUM_THREADS=str(setting["threads"]))
    env.pop("OMP_WAIT_POLICY", None)
    if setting["OMP_WAIT_POLICY"]:
        env["OMP_WAIT_POLICY"] = setting["OMP_WAIT_POLICY"]
    job = {"threads": setting["threads"], "steps": steps, "quick": quick, "modes": modes, "heap": heap}
    proc = subprocess.run([sys.executable, __file__, "--job", json.dumps(job)], capture_output=True, text=True,
                          env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"job {job} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _thread_job(setting: dict, steps: int, quick: bool) -> dict:
    r = _job(setting, steps, quick, modes=["after"], heap=True)
    return {**setting, "patch": r["patch"], "batch": r["batch"], **r["after"]}


def _run_job(job: dict) -> None:
    import torch

    from napari_langmamba.allocator import heap_allocations

    torch.set_num_threads(job["threads"])
    size = 32 if job["quick"] else 128
    with heap_allocations() if job["heap"] else contextlib.nullcontext():
        r = _measure("seed-lite", 4, size, False, job["steps"], job["modes"])
    print(json.dumps(r))


def _row(r: dict) -> str:
    name = f"{r['model']:<11} {r['batch']}x{r['patch']:<4} langda={'on ' if r['langda'] else 'off'}"
    parts = []
    for mode in ("before", "after", "after_bf16"):
        if mode in r:
            m = r[mode]
            parts.append(f"{mode} {m['step_s']:.3f} s/step {m['steps_per_s']:.2f} st/s {m['pixels_per_s'] / 1e3:.0f} kpx/s")
    if "ratio" in r:
        parts.append(f"ratio {r['ratio']:.2f} (min {r['ratio_min']:.2f}, cpu {r['ratio_cpu']:.2f})")
    if "ratio_bf16" in r:
        parts.append(f"ratio bf16 {r['ratio_bf16']:.2f}")
    return name + " | " + " | ".join(parts)


def _goal(now: dict, default_allocator: dict, native_bf16: bool) -> dict:
    """Issue 14's goal: the old training (old code paths, glibc's default allocator: the fresh
    process's "before") against training now (this process's "after" and "after_bf16")."""
    before = default_allocator["before"]
    value = before["step_s"] / now["after"]["step_s"]
    value_bf16 = before["step_s"] / now["after_bf16"]["step_s"] if "after_bf16" in now else None
    return {
        "what": "SEED-lite, 4 x 128^2, LangDA off: steps/s now over before (value: float32, the default; "
                "value_bf16: with --amp bf16)",
        "how": "before: the previous code paths with glibc's default allocator, in a fresh process "
               "(default_allocator.before); now: the current paths inside heap_allocations, as python -m "
               "training runs (results[goal].after / after_bf16); the two processes ran one after the other. "
               "Same-process ratios: results[goal].ratio (code paths alone), default_allocator.ratio.",
        "value": value,
        "value_cpu": before["cpu_s"] / now["after"]["cpu_s"],
        "value_bf16": value_bf16,
        "value_code_paths_only": now["ratio"],
        "goal": GOAL_RATIO,
        "met": value >= GOAL_RATIO,
        "met_bf16": (value_bf16 or 0.0) >= GOAL_RATIO if native_bf16 else
        "not measured: this CPU has no native bfloat16 (--amp bf16 trains in float32 here)",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one timed step: a smoke run")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per mode (default 3; --quick 1)")
    parser.add_argument("--only", nargs="*", default=None, help="models to run (seed-lite seed-paper redcnn)")
    parser.add_argument("--goal-only", action="store_true", help="only the goal case: SEED-lite, 4 x 128^2, no LangDA")
    parser.add_argument("--skip-threads", action="store_true", help="skip the thread-settings comparison")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.job:
        _run_job(json.loads(args.job))
        return 0

    import torch

    from napari_langmamba.allocator import heap_allocations, heap_allocations_available

    torch.set_num_threads(THREADS)
    both = ["after", "before"]
    from training.distributed import cpu_has_native_bf16

    native_bf16 = cpu_has_native_bf16()
    # --amp bf16 on CPU: the fused paths under bfloat16 autocast; training falls back to float32 on
    # CPUs without native bf16 (where bf16 convolutions are ~20x slower), so it is not timed there.
    seed_modes = [*both, "after_bf16"] if native_bf16 else both
    if args.quick:
        steps = args.steps or 1
        cases = [("seed-lite", 2, 32, False, seed_modes), ("seed-lite", 2, 32, True, both),
                 ("redcnn-tiny", 2, 32, False, ["after"])]
    else:
        steps = args.steps or 3
        cases = []
        for model, modes in (("seed-lite", seed_modes), ("seed-paper", both), ("redcnn-paper", ["after"])):
            for langda in (False, True):
                for batch, size in ((4, 128), (4, 64), (8, 64)):
                    cases.append((model, batch, size, langda, modes))
    if args.only:
        cases = [c for c in cases if any(c[0].startswith(o) for o in args.only)]
    if args.goal_only:
        cases = [("seed-lite", 4, 128, False, seed_modes)]
    output = args.output or (RESULTS.with_name("training_quick.json") if args.quick else RESULTS)

    from napari_langmamba.models.scan import scan_backend

    load_before = os.getloadavg()
    start = time.perf_counter()
    results = []
    with heap_allocations():
        for model, batch, size, langda, modes in cases:
            r = _measure(model, batch, size, langda, steps, modes)
            results.append(r)
            print(_row(r), file=sys.stderr, flush=True)
    goal = next((r for r in results if r["model"] == "seed-lite" and r["batch"] == 4 and r["patch"] == 128
                 and not r["langda"] and "ratio" in r), None)
    default_allocator = None
    if goal is not None or args.quick:  # --quick: the smoke run goes through this job too
        default_allocator = _job({"threads": THREADS, "OMP_WAIT_POLICY": None}, steps, args.quick,
                                 modes=seed_modes, heap=False)
        print("glibc's default allocator, fresh process: " + _row(default_allocator), file=sys.stderr, flush=True)
    threads = []
    if not args.skip_threads:
        for setting in THREAD_SETTINGS:
            t = _thread_job(setting, steps, args.quick)
            threads.append(t)
            print(f"threads={t['threads']} OMP_WAIT_POLICY={t['OMP_WAIT_POLICY']}: {t['step_s']:.3f} s/step, "
                  f"cpu {t['cpu_s']:.3f} s", file=sys.stderr, flush=True)
    report = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/training.py" + (" --quick" if args.quick else "")
        + (f" --steps {args.steps}" if args.steps else "") + (f" --only {' '.join(args.only)}" if args.only else "") + (" --goal-only" if args.goal_only else ""),
        "host": _host(),
        "cpu_native_bf16": native_bf16,
        "scan_backend": scan_backend("cpu"),
        "steps_per_mode": steps,
        "warmup_steps_per_mode": 1,
        "langda": {"lambda": LAMBDA, "codebook": CODEBOOK},
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "seconds": time.perf_counter() - start,
        "results": results,
        "heap_allocations": heap_allocations_available(),
        "default_allocator": default_allocator,
        "thread_settings": {
            "what": "SEED-lite, 4 x 128^2 (--quick: 32^2), LangDA off, fused paths, heap allocations, each "
                    "setting in a fresh process",
            "results": threads,
        },
        "goal": None if goal is None or default_allocator is None else _goal(goal, default_allocator, native_bf16),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["goal"], indent=2))
    print(f"wrote {output} in {report['seconds']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
