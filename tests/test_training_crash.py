"""Training survives crashes (issue 8, item 4).

- a failure in the middle of writing a checkpoint leaves the previous ``last/`` (and ``best/``)
  intact, loadable and consistent, with no staging folder behind, and the run resumes to exactly
  the uninterrupted result;
- a ``python -m training seed`` process killed with SIGKILL at a seeded-random step resumes from
  its last checkpoint and reproduces the uninterrupted run's loss curve and weights bit for bit;
- ``metrics.jsonl`` stays parseable: a torn last line is ignored by both readers
  (:func:`training.runs.read_metrics` and the widget's :class:`MetricsTail`) and never glues
  onto the next record.

All runs: RED-CNN (deterministic on CPU), ``tiny`` preset, lambda 0, 64 x 64 slices, one thread.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_training_stages import N_SLICES, _assert_same_tensors, _losses, _phantom

from napari_langmamba.checkpoint import load_checkpoint, save_checkpoint
from napari_langmamba.training_runs import MetricsTail, best_checkpoint, inspect_run
from training.__main__ import main as training_main
from training.runs import MetricsWriter, Trainer, load_training_state, read_metrics

torch.set_num_threads(1)
REPO_ROOT = Path(__file__).resolve().parents[1]
INJECTED = "No space left on device (injected)"


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory) -> Path:
    """Mayo 2D layout (quarter_1mm/, full_1mm/, HU + 1024 .npy) of the stage tests' phantoms."""
    root = tmp_path_factory.mktemp("mayo")
    rng = np.random.default_rng(0)
    for sub in ("quarter_1mm", "full_1mm"):
        (root / sub).mkdir()
    for i in range(N_SLICES):
        full = _phantom(rng)
        low = full + rng.normal(0.0, 30.0, full.shape).astype(np.float32)
        np.save(root / "full_1mm" / f"train_full_{i:05d}.npy", full + 1024.0)
        np.save(root / "quarter_1mm" / f"train_quarter_{i:05d}.npy", low + 1024.0)
    return root


def _hidden(folder: Path) -> list[str]:
    """Leftovers of interrupted writes (staging/temporary/old folders and files)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _step_of(checkpoint: Path) -> int:
    return int(load_checkpoint(checkpoint).meta["training"]["step"])


def _validations(run: Path) -> list[tuple[int, dict]]:
    return [(r["step"], r["val"]) for r in read_metrics(run) if r["kind"] == "epoch"]


def _lrs(run: Path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in read_metrics(run) if r["kind"] == "train"}


def _same_weights(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _complete_lines(data: bytes) -> list[bytes]:
    return [line for line in data.split(b"\n")[:-1] if line.strip()]


# ----------------------------------------------------------------------- 1. failure mid-write

# 6 slices, 2 held out for validation, batch 1: 4 steps per epoch, 8 steps; last/ at steps 2, 4
# (epoch end, with best/ the first time), 6 and 8 (epoch end).
IN_PROCESS_ARGS = ["seed", "--backbone", "redcnn", "--lambda", "0", "--preset", "tiny", "--epochs", "2",
                   "--batch-size", "1", "--patch-size", "32", "--val-fraction", "0.2", "--val-max-images", "2",
                   "--log-every", "1", "--checkpoint-every", "2", "--no-progress"]


@pytest.fixture(scope="module")
def reference_run(pairs_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("reference") / "run"
    assert training_main([*IN_PROCESS_ARGS, "--data", str(pairs_dir), "--output", str(run)]) == 0
    assert sorted(_losses(run)) == list(range(1, 9)) and (run / "best").is_dir()
    return run


def _fail_half_way(write, path: Path, data) -> None:
    """Write the first half of ``data`` to ``path`` (as a full disk would), then raise."""
    write(path, data[: len(data) // 2])
    raise OSError(errno.ENOSPC, INJECTED)


def _arm_injection(monkeypatch, point: str, target: tuple[str, int, int]) -> list[tuple[str, int]]:
    """Make ``point`` fail in the ``Trainer.save(name)`` of ``target = (name, step, epochs_done)``."""
    import safetensors.torch

    armed = {"on": False}
    fired: list[tuple[str, int]] = []
    original_save = Trainer.save

    def save(self, name="last"):
        armed["on"] = (name, self.state.step, self.state.epoch) == target
        try:
            return original_save(self, name)
        finally:
            armed["on"] = False

    monkeypatch.setattr(Trainer, "save", save)

    def fire(where: str) -> bool:
        if armed["on"]:
            fired.append((where, target[1]))
            armed["on"] = False
            return True
        return False

    if point == "training_state.safetensors":
        real_save_file = safetensors.torch.save_file

        def save_file(tensors, filename, metadata=None):
            if Path(filename).name == point and fire(point):
                data = safetensors.torch.save(tensors, metadata=metadata)
                _fail_half_way(Path.write_bytes, Path(filename), data)
            return real_save_file(tensors, filename, metadata=metadata)

        monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    elif point in ("training_state.json", "config.json"):
        real_write_text = Path.write_text

        def write_text(self, data, encoding=None, errors=None, newline=None):
            if self.name == point and fire(point):
                _fail_half_way(lambda p, d: real_write_text(p, d, encoding=encoding), self, data)
            return real_write_text(self, data, encoding=encoding, errors=errors, newline=newline)

        monkeypatch.setattr(Path, "write_text", write_text)
    elif point == "model.safetensors":
        real_write_bytes = Path.write_bytes

        def write_bytes(self, data):
            if self.name == point and fire(point):
                _fail_half_way(real_write_bytes, self, data)
            return real_write_bytes(self, data)

        monkeypatch.setattr(Path, "write_bytes", write_bytes)
    elif point == "rename":
        real_replace = os.replace
        name = target[0]

        def replace(src, dst, **kwargs):
            # the rename that puts the new checkpoint in place (the old one was already moved aside)
            if Path(dst).name == name and Path(src).name.startswith(f".{name}.staging-") and fire(point):
                raise OSError(errno.EIO, f"Input/output error (injected) renaming {src}")
            return real_replace(src, dst, **kwargs)

        monkeypatch.setattr(os, "replace", replace)
    else:
        raise ValueError(point)
    return fired


@pytest.mark.parametrize(
    ("point", "target"),
    [
        ("training_state.safetensors", ("last", 6, 1)),  # the resume state's tensors
        ("training_state.json", ("last", 6, 1)),  # the resume state's JSON
        ("model.safetensors", ("last", 4, 1)),  # the model weights, after the first epoch's validation
        ("config.json", ("last", 2, 0)),  # the model checkpoint's JSON, before any last/ exists
        ("rename", ("last", 6, 1)),  # the rename into place, after the old last/ was moved aside
        ("model.safetensors", ("best", 4, 1)),  # best/ at the first epoch end
    ],
)
def test_failure_while_writing_a_checkpoint_keeps_the_previous_one_and_resumes_exactly(
    point, target, pairs_dir, reference_run, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    args = [*IN_PROCESS_ARGS, "--data", str(pairs_dir), "--output", str(run)]
    with monkeypatch.context() as patch:
        fired = _arm_injection(patch, point, target)
        with pytest.raises(OSError, match="injected"):
            training_main(args)
    assert fired == [(point, target[1])]
    assert _hidden(run) == []  # no staging, temporary or moved-aside folder left behind

    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "injected" in summary["error"]
    records = read_metrics(run)
    assert max(r["step"] for r in records if r["kind"] == "train") == target[1]
    assert records[-1]["event"] == "end" and records[-1]["status"] == "failed"

    checkpoints = sorted(r["step"] for r in records if r.get("event") == "checkpoint" and r["name"] == "last")
    if not checkpoints:  # the very first checkpoint failed: nothing to resume, nothing half-written
        assert not (run / "last").exists() and not (run / "best").exists()
        assert not inspect_run(run).resumable and best_checkpoint(run) is None
        return
    previous = checkpoints[-1]
    # the previous last/ is complete: the model loads and validates, the resume state reads
    assert _step_of(run / "last") == previous
    progress, states, rngs, _ = load_training_state(run / "last", stage="seed")
    assert progress.step == previous and {"optimizer", "scheduler"} <= set(states) and len(rngs) == 1
    # ... and the run folder is consistent: a best/ named by last/'s state was written
    if progress.best_step is not None:
        assert _step_of(run / "best") >= progress.best_step
    info = inspect_run(run)
    assert info.resumable and info.status == "failed" and info.step == target[1]

    assert training_main([*args, "--resume"]) == 0
    assert _hidden(run) == []
    assert _losses(run) == _losses(reference_run) and _lrs(run) == _lrs(reference_run)
    assert _validations(run) == _validations(reference_run)
    _assert_same_tensors(reference_run / "last", run / "last")  # weights, AdamW, cosine schedule, RNG
    _same_weights(reference_run / "best", run / "best")
    assert _step_of(run / "best") == _step_of(reference_run / "best")
    resumes = [r for r in read_metrics(run) if r.get("event") == "resume"]
    assert [r["step"] for r in resumes] == [previous]


@pytest.mark.parametrize("point", ["model.safetensors", "config.json", "rename"])
def test_save_checkpoint_over_an_existing_one_keeps_it_when_the_write_fails(point, tmp_path, monkeypatch):
    from napari_langmamba.models.redcnn import REDCNN, REDCNNConfig

    torch.manual_seed(0)
    old_model, new_model = REDCNN(REDCNNConfig.preset("tiny")), REDCNN(REDCNNConfig.preset("tiny"))
    assert not torch.equal(old_model.conv[0].weight, new_model.conv[0].weight)
    path = tmp_path / "ckpt"
    save_checkpoint(path, old_model, kind="redcnn")
    real_replace, real_write_bytes, real_write_text = os.replace, Path.write_bytes, Path.write_text
    fired: list[str] = []

    def replace(src, dst, **kwargs):
        if Path(dst) == path and Path(src).name.startswith(".ckpt.tmp-"):
            fired.append(point)
            raise OSError(errno.EIO, "Input/output error (injected)")
        return real_replace(src, dst, **kwargs)

    def write_bytes(self, data):
        if self.name == point:
            fired.append(point)
            _fail_half_way(real_write_bytes, self, data)
        return real_write_bytes(self, data)

    def write_text(self, data, encoding=None, errors=None, newline=None):
        if self.name == point:
            fired.append(point)
            _fail_half_way(lambda p, d: real_write_text(p, d, encoding=encoding), self, data)
        return real_write_text(self, data, encoding=encoding, errors=errors, newline=newline)

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", replace)
        patch.setattr(Path, "write_bytes", write_bytes)
        patch.setattr(Path, "write_text", write_text)
        with pytest.raises(OSError, match="injected"):
            save_checkpoint(path, new_model, kind="redcnn")
    assert fired == [point]
    assert _hidden(tmp_path) == []
    kept = load_checkpoint(path)
    for name, value in old_model.state_dict().items():
        assert torch.equal(kept.state_dict[name], value), name
    save_checkpoint(path, new_model, kind="redcnn")  # and the next save goes through
    saved = load_checkpoint(path).state_dict
    assert all(torch.equal(saved[name], value) for name, value in new_model.state_dict().items())
    assert _hidden(tmp_path) == []


# ----------------------------------------------------------------------- 2. SIGKILL and resume

# 6 slices, batch 2: 3 steps per epoch, 60 steps; last/ every 2 steps and at every epoch end.
KILL_SEED = 20240508
SUBPROCESS_ARGS = ["seed", "--backbone", "redcnn", "--lambda", "0", "--preset", "tiny", "--epochs", "20",
                   "--batch-size", "2", "--patch-size", "32", "--val-fraction", "0", "--log-every", "1",
                   "--checkpoint-every", "2", "--no-progress"]
TOTAL_STEPS = 60
PROCESS_TIMEOUT_S = 180  # python + torch start-up is slow on a loaded 2-core machine


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "training", *args], cwd=REPO_ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, log: Path) -> None:
    try:
        code = proc.wait(timeout=PROCESS_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, log.read_text()[-3000:]


def test_sigkill_at_a_random_step_then_resume_reproduces_the_uninterrupted_run(pairs_dir, tmp_path):
    args = [*SUBPROCESS_ARGS, "--data", str(pairs_dir)]
    reference, run = tmp_path / "reference", tmp_path / "run"
    kill_after = int(np.random.default_rng(KILL_SEED).integers(3, 20))  # a step past >= 1 checkpoint
    ref_proc = _start([*args, "--output", str(reference)], tmp_path / "reference.log")
    proc = _start([*args, "--output", str(run)], tmp_path / "run.log")
    tail = MetricsTail(run)  # the Train widget's reader follows the run all along
    seen: list[dict] = []
    try:
        deadline = time.monotonic() + PROCESS_TIMEOUT_S
        while True:
            update = tail.poll()
            seen = update.records if update.reset else seen + update.records
            steps = [r["step"] for r in seen if r["kind"] == "train"]
            if steps and steps[-1] >= kill_after and any(r.get("event") == "checkpoint" for r in seen):
                break
            assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"step {kill_after} not reached in {PROCESS_TIMEOUT_S} s"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    except BaseException:
        for p in (proc, ref_proc):
            if p.poll() is None:
                p.kill()
                p.wait()
        raise
    _finish(ref_proc, tmp_path / "reference.log")

    # --- what the kill left: no summary, a last/ checkpoint, a parseable metrics.jsonl
    assert not (run / "summary.json").exists()  # it never got to finish
    resume_step = load_training_state(run / "last", stage="seed")[0].step
    assert _step_of(run / "last") == resume_step
    killed = read_metrics(run)
    killed_steps = [r["step"] for r in killed if r["kind"] == "train"]
    assert killed_steps == list(range(1, killed_steps[-1] + 1))
    assert kill_after <= killed_steps[-1] < TOTAL_STEPS and 2 <= resume_step <= killed_steps[-1]
    data = (run / "metrics.jsonl").read_bytes()
    lines = _complete_lines(data)
    assert [json.loads(line) for line in lines] == killed  # every complete line parses
    update = tail.poll()
    seen = update.records if update.reset else seen + update.records
    assert seen == killed  # the widget's reader agrees with read_metrics

    # --- and a kill in the middle of a metrics write: the torn last line is not trusted
    torn = data[: len(data) - 1 - len(lines[-1]) // 2]
    (run / "metrics.jsonl").write_bytes(torn)
    assert read_metrics(run) == killed[:-1]
    assert MetricsTail(run).poll().records == killed[:-1]
    update = tail.poll()
    assert update.reset and update.records == killed[:-1]  # the file shrank: the tail starts over
    seen = update.records

    # --- a staging folder a crash left behind is never trusted: make one that looks complete
    decoy = run / ".last.staging-999999"
    shutil.copytree(reference / "last", decoy)  # the finished reference run's step-60 checkpoint

    resumed = _start([*args, "--output", str(run), "--resume"], tmp_path / "resumed.log")
    _finish(resumed, tmp_path / "resumed.log")
    assert not decoy.exists() and _hidden(run) == []
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == TOTAL_STEPS

    # --- the same curve and the same weights as the uninterrupted run, bit for bit
    final = read_metrics(run)
    assert [r["step"] for r in final if r["kind"] == "train"] == list(range(1, TOTAL_STEPS + 1))
    ours, theirs = _losses(run), _losses(reference)
    assert {s: v for s, v in ours.items() if s > resume_step} == {s: v for s, v in theirs.items() if s > resume_step}
    assert ours == theirs and _lrs(run) == _lrs(reference)
    assert _validations(run) == _validations(reference)  # one epoch record per epoch, none repeated
    _assert_same_tensors(reference / "last", run / "last")  # weights, AdamW moments, schedule, RNG states
    resumes = [r for r in final if r.get("event") == "resume"]
    assert [r["step"] for r in resumes] == [resume_step]

    # --- metrics.jsonl after the resume: well-formed lines only, the resumed writer on a new line
    text = (run / "metrics.jsonl").read_bytes()
    assert text.endswith(b"\n")
    assert [json.loads(line) for line in text.split(b"\n")[:-1]] == final
    first_resumed = final.index(resumes[0])
    assert final[:first_resumed] == [r for r in killed[:-1] if r["step"] <= resume_step]
    update = tail.poll()  # the resume rewrote the file (new inode): the widget starts over
    assert update.reset and update.records == final


# ----------------------------------------------------------------------- 3. torn metrics lines


def _records(n: int) -> list[dict]:
    return [{"stage": "seed", "kind": "train", "time": 1.7e9 + i, "step": i, "epoch": 1,
             "losses": {"loss": 1.0 / i, "mse": 0.5 / i}, "lr": 1e-4} for i in range(1, n + 1)]


def test_both_readers_ignore_a_torn_last_line_at_every_cut(tmp_path):
    path = tmp_path / "metrics.jsonl"
    expected = _records(4)
    with MetricsWriter(path) as writer:
        for record in expected:
            writer.write(record)
    data = path.read_bytes()
    ends = [i + 1 for i, byte in enumerate(data) if byte == ord("\n")]
    assert len(ends) == len(expected)
    growing = MetricsTail(path)  # a reader following a file written byte by byte
    followed: list[dict] = []
    for cut in range(len(data) + 1):
        path.write_bytes(data[:cut])
        complete = expected[: sum(end <= cut for end in ends)]
        assert read_metrics(path) == complete, cut
        assert MetricsTail(path).poll().records == complete, cut
        update = growing.poll()
        assert not update.reset
        followed += update.records
        assert followed == complete, cut
        assert growing.offset == max([0, *(end for end in ends if end <= cut)])


@pytest.mark.parametrize("keep_through_step", [None, 3])
def test_a_resumed_writer_starts_on_a_new_line_after_a_torn_one(tmp_path, keep_through_step):
    path = tmp_path / "metrics.jsonl"
    records = _records(5)
    whole = b"".join(json.dumps(r).encode() + b"\n" for r in records)
    path.write_bytes(whole[: len(whole) - 9])  # killed in the middle of record 5
    tail = MetricsTail(path)
    assert tail.poll().records == records[:4]
    new = {"stage": "seed", "kind": "event", "time": 0.0, "step": 4, "event": "resume"}
    with MetricsWriter(path, keep_through_step=keep_through_step) as writer:
        writer.write(new)
    kept = [r for r in records[:4] if keep_through_step is None or r["step"] <= keep_through_step]
    text = path.read_bytes()
    assert text.endswith(b"\n") and [json.loads(line) for line in text.split(b"\n")[:-1]] == [*kept, new]
    assert read_metrics(path) == [*kept, new]
    update = tail.poll()
    assert update.reset and update.records == [*kept, new]  # repaired by an atomic rewrite


def test_a_metrics_write_cut_short_never_corrupts_the_next_record(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    records = _records(4)
    real_write = os.write
    with MetricsWriter(path) as writer:
        writer.write(records[0])

        def short_write(fd, data):  # the kernel may accept part of a write (a signal, a pipe, ...)
            return real_write(fd, bytes(data)[:7])

        with monkeypatch.context() as patch:
            patch.setattr(os, "write", short_write)
            writer.write(records[1])
        assert read_metrics(path) == records[:2]  # the whole record landed, in several writes

        def write_then_fail(fd, data):  # part of the line, then the disk is full
            if write_then_fail.done:
                raise OSError(errno.ENOSPC, INJECTED)
            write_then_fail.done = True
            return real_write(fd, bytes(data)[:11])

        write_then_fail.done = False
        with monkeypatch.context() as patch:
            patch.setattr(os, "write", write_then_fail)
            with pytest.raises(OSError, match="injected"):
                writer.write(records[2])
        assert read_metrics(path) == records[:2]  # the fragment is not trusted
        writer.write(records[3])  # space freed: e.g. the "end" event the trainer writes next
    assert read_metrics(path) == [records[0], records[1], records[3]]
    assert MetricsTail(path).poll().records == [records[0], records[1], records[3]]
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and json.loads(lines[-2]) == records[3]  # record 4 whole, on its own line
