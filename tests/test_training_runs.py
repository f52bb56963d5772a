"""The training engine: metrics.jsonl, pickle-free resume state, RNG, run folders, the loop's guards."""

from __future__ import annotations

import json
import os
import random
import signal

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from napari_langmamba.errors import CheckpointError, ConfigError
from training.distributed import DistContext, ResumableBatchSampler, make_train_loader
from training.runs import (
    CheckpointSpec,
    MetricsWriter,
    NonFiniteLossError,
    RunFolder,
    StepOutput,
    StopRequest,
    Trainer,
    TrainState,
    capture_rng_state,
    load_training_state,
    pack_state,
    read_metrics,
    restore_rng_state,
    save_training_state,
    unpack_state,
)

torch.set_num_threads(1)


# -------------------------------------------------------------------------------- metrics.jsonl


def test_read_metrics_ignores_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1, "kind": "train"}\n{"step": 2, "kind": "train"}\n{"step": 3, "ki')
    records = read_metrics(path)
    assert [r["step"] for r in records] == [1, 2]
    # a complete but corrupt middle line is skipped, not fatal
    path.write_bytes(b'{"step": 1}\nnot json\n{"step": 2}\n')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    assert read_metrics(tmp_path / "missing.jsonl") == []
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]  # a run folder works too


def test_metrics_writer_repairs_torn_tail_and_drops_steps_after_resume_point(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "kind": "train"}) for s in (1, 2, 3, 4)]
    path.write_text("\n".join(lines) + '\n{"step": 5, "kin')
    with MetricsWriter(path, keep_through_step=2) as writer:
        writer.write({"step": 3, "kind": "train", "losses": {"loss": float("nan"), "mse": 0.5}})
    text = path.read_text()
    assert text.endswith("\n")
    records = read_metrics(path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[-1]["losses"] == {"loss": None, "mse": 0.5}  # strict JSON: NaN is written as null
    for line in text.splitlines():
        json.loads(line)  # every line is valid JSON


def test_metrics_writer_appends_after_torn_line_without_gluing(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n{"step": 2, "ki')
    with MetricsWriter(path) as writer:
        writer.write({"step": 2})
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


# -------------------------------------------------------------------------------- state without pickle


def _adam_after_steps(n: int = 2) -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=1e-9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=1e-6)
    for _ in range(n):
        opt.zero_grad()
        model(torch.randn(4, 3)).pow(2).mean().backward()
        opt.step()
        sched.step()
    return model, opt, sched


def test_pack_unpack_round_trips_optimizer_scheduler_and_rng_exactly():
    _, opt, sched = _adam_after_steps()
    tree = {"opt": opt.state_dict(), "sched": sched.state_dict(), "rng": capture_rng_state(),
            "misc": {1: (2.5, float("inf")), "b": b"\x00\xff", "dtype": torch.float16}}
    packed, tensors = pack_state(tree)
    text = json.dumps(packed, allow_nan=False)  # strict JSON: no pickle, no NaN tokens
    back = unpack_state(json.loads(text), tensors)
    assert back["opt"]["param_groups"][0]["betas"] == (0.9, 0.99)
    assert back["sched"] == sched.state_dict()
    assert back["misc"] == {1: (2.5, float("inf")), "b": b"\x00\xff", "dtype": torch.float16}
    for idx, st in opt.state_dict()["state"].items():
        for key, value in st.items():
            assert torch.equal(back["opt"]["state"][idx][key], value)
    assert back["rng"]["python"] == tree["rng"]["python"]
    assert np.array_equal(back["rng"]["numpy"][1], tree["rng"]["numpy"][1])
    assert back["rng"]["numpy"][1].dtype == np.uint32


def test_unpack_rejects_missing_tensor():
    with pytest.raises(CheckpointError, match="not stored"):
        unpack_state({"a": {"__tensor__": "nope"}}, {})


def test_rng_state_restores_python_numpy_and_torch_streams():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = capture_rng_state()
    first = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    packed, tensors = pack_state(state)
    restore_rng_state(unpack_state(json.loads(json.dumps(packed)), tensors))
    assert (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()) == first


def test_training_state_files_round_trip_and_refuse_other_stages(tmp_path):
    model, opt, sched = _adam_after_steps()
    state = TrainState(step=7, epoch=1, batch_in_epoch=3, best_value=31.5, best_step=4, best_metrics={"psnr": 31.5})
    save_training_state(tmp_path, stage="seed", state=state, objects={"optimizer": opt, "scheduler": sched},
                        rng=[capture_rng_state()], world_size=1)
    assert not any(p.suffix in (".pt", ".pth", ".pkl") for p in tmp_path.iterdir())
    progress, objects, rngs, world = load_training_state(tmp_path, stage="seed")
    assert (progress.step, progress.epoch, progress.batch_in_epoch, progress.best_step) == (7, 1, 3, 4)
    assert progress.best_metrics == {"psnr": 31.5} and world == 1 and len(rngs) == 1
    _, opt2, sched2 = _adam_after_steps(0)
    opt2.load_state_dict(objects["optimizer"])
    sched2.load_state_dict(objects["scheduler"])
    for idx, st in opt.state_dict()["state"].items():
        for key, value in st.items():
            assert torch.equal(opt2.state_dict()["state"][idx][key], value)
    assert sched2.state_dict() == sched.state_dict()
    with pytest.raises(CheckpointError, match="stage 'seed', not 'langae'"):
        load_training_state(tmp_path, stage="langae")
    (tmp_path / "training_state.safetensors").unlink()
    with pytest.raises(CheckpointError, match="holds no training state"):
        load_training_state(tmp_path, stage="seed")


# -------------------------------------------------------------------------------- run folder


def test_run_folder_refuses_to_overwrite_and_needs_a_checkpoint_to_resume(tmp_path):
    run = RunFolder(tmp_path / "run", stage="seed")
    run.prepare({"a": 1}, resume=False)
    assert json.loads(run.config_path.read_text()) == {"a": 1}
    run.prepare({"a": 3}, resume=False)  # only a config.json (data failed to load): rewritten
    assert json.loads(run.config_path.read_text()) == {"a": 3}
    run.metrics_path.write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match="already holds a training run"):
        RunFolder(tmp_path / "run", stage="seed").prepare({"a": 2}, resume=False)
    with pytest.raises(ConfigError, match="no resumable checkpoint"):
        RunFolder(tmp_path / "run", stage="seed").prepare({"a": 2}, resume=True)


def test_run_folder_recovers_a_checkpoint_swap_cut_between_the_renames(tmp_path):
    run = RunFolder(tmp_path, stage="seed")
    old = tmp_path / ".last.old"
    old.mkdir()
    (old / "training_state.json").write_text("{}")
    (tmp_path / ".last.staging-123").mkdir()  # a half-written new checkpoint
    run.recover()
    assert (tmp_path / "last" / "training_state.json").is_file()
    assert not old.exists() and not (tmp_path / ".last.staging-123").exists()


# -------------------------------------------------------------------------------- sampler, signals


class _Range(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor(i)


def test_resumable_batch_sampler_skips_into_the_same_order_and_shards_disjointly():
    ctx = DistContext()
    _, sampler = make_train_loader(_Range(10), batch_size=3, ctx=ctx, seed=5)
    sampler.set_epoch(2)
    full = list(sampler)
    assert len(full) == 3 and len(sampler) == 3  # 10 // 3 batches, the remainder dropped
    sampler.set_epoch(2, skip_batches=1)
    assert list(sampler) == full[1:] and len(sampler) == 2
    sampler.set_epoch(3)
    assert list(sampler) != full  # a new order each epoch
    shards = []
    for rank in (0, 1):
        _, s = make_train_loader(_Range(10), batch_size=2, ctx=DistContext(rank=rank, world_size=2), seed=5)
        s.set_epoch(0)
        shards.append({i for batch in s for i in batch})
    assert not shards[0] & shards[1] and len(shards[0]) == len(shards[1]) == 4
    assert isinstance(sampler, ResumableBatchSampler)


def test_stop_request_turns_sigterm_into_a_flag():
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is not stop._handle


# -------------------------------------------------------------------------------- the loop's guards


class _Pairs(Dataset):
    def __init__(self, n: int = 6) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, 1, 16, 16, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


def _toy_trainer(run_dir, **kwargs) -> tuple[Trainer, torch.nn.Module]:
    from napari_langmamba.models import model_config
    from napari_langmamba.models.redcnn import REDCNN, REDCNNConfig

    torch.manual_seed(0)
    ctx = DistContext()
    model = REDCNN(REDCNNConfig.preset("tiny"))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader, sampler = make_train_loader(_Pairs(), batch_size=2, ctx=ctx, seed=0)
    run = RunFolder(run_dir, stage="seed")
    run.prepare({"toy": True}, resume=kwargs.pop("resume_folder", False))

    def step_fn(batch, state):
        loss = (model(batch + 0.05) - batch).pow(2).mean()

        def apply():
            opt.zero_grad()
            loss.backward()
            opt.step()

        return StepOutput(losses={"loss": loss}, apply=apply, images=batch.shape[0])

    trainer = Trainer(run=run, ctx=ctx, loader=loader, batch_sampler=sampler, epochs=2, steps_per_epoch=3,
                      step_fn=step_fn, validate_fn=lambda s: {"psnr": 20.0 + s.epoch}, objects={"optimizer": opt},
                      checkpoint=CheckpointSpec(model=model, kind="redcnn", config=lambda: model_config("redcnn", model),
                                                extra=lambda s: {"training": {"toy": True}}),
                      lr_fn=lambda: 1e-3, best_key="psnr", log_every=1, progress=False, **kwargs)
    return trainer, model


def test_nonfinite_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer, _ = _toy_trainer(tmp_path / "run", checkpoint_every=1, nan_at_step=3)
    with pytest.raises(NonFiniteLossError, match=r"NaN or infinite at step 3 .*last good checkpoint is kept.*step 2"):
        trainer.fit()
    progress, _, _, _ = load_training_state(tmp_path / "run" / "last", stage="seed")
    assert progress.step == 2
    records = read_metrics(tmp_path / "run")
    events = [r for r in records if r["kind"] == "event"]
    assert any(e["event"] == "nonfinite_loss" and e["failed_step"] == 3 for e in events)
    assert events[-1]["event"] == "end" and events[-1]["status"] == "failed"
    assert max(r["step"] for r in records if r["kind"] == "train") == 2
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and "NaN" in summary["error"]


def test_toy_loop_resumes_exactly_and_tracks_best(tmp_path):
    full, model_a = _toy_trainer(tmp_path / "a")
    summary = full.fit()
    assert summary["status"] == "completed" and summary["step"] == 6
    assert summary["best"]["value"] == 22.0 and summary["best"]["step"] == 6  # psnr 21 then 22
    part, _ = _toy_trainer(tmp_path / "b", stop_at_step=4)
    assert part.fit()["status"] == "stopped"
    resumed, model_b = _toy_trainer(tmp_path / "b", resume_folder=True)
    assert resumed.fit(resume=True)["step"] == 6
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    steps = [r["step"] for r in read_metrics(tmp_path / "b") if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]
