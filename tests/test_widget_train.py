"""The Train dock widget (under Xvfb) and its Qt-free run-folder reader.

The GUI tests run the real ``python -m training seed`` stage (RED-CNN, tiny preset, lambda 0:
no LangAE needed) on a 4-slice Mayo-layout dataset of 64 x 64 slices built in ``tmp_path``.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_langmamba.training_runs import (
    MetricsTail,
    best_checkpoint,
    holds_run,
    inspect_run,
    parse_tqdm_progress,
)

PROCESS_TIMEOUT_MS = 90_000  # process start-up (torch import) is slow on a loaded 2-core machine


# --- data -------------------------------------------------------------------------------
@pytest.fixture
def mayo_root(tmp_path) -> Path:
    """The smallest paired dataset the seed stage accepts: Mayo 2D layout, HU + 1024 .npy slices."""
    rng = np.random.default_rng(7)
    root = tmp_path / "mayo"
    (root / "quarter_1mm").mkdir(parents=True)
    (root / "full_1mm").mkdir()
    yy, xx = np.mgrid[0:64, 0:64]
    for i in range(4):
        full = (40.0 + 300.0 * (((yy - 32) ** 2 + (xx - 32) ** 2) < (12 + i) ** 2)).astype(np.float32)
        low = full + rng.normal(0.0, 30.0, full.shape).astype(np.float32)
        np.save(root / "full_1mm" / f"train_full_{i:05d}.npy", full + 1024.0)
        np.save(root / "quarter_1mm" / f"train_quarter_{i:05d}.npy", low + 1024.0)
    return root


@pytest.fixture
def notifications():
    from napari.utils.notifications import notification_manager

    shown: list = []
    notification_manager.notification_ready.connect(shown.append)
    yield shown
    notification_manager.notification_ready.disconnect(shown.append)


@pytest.fixture
def viewer_widget(make_napari_viewer, qtbot):
    from napari_langmamba.widgets.train import TrainWidget

    viewer = make_napari_viewer()
    widget = TrainWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Train")
    widget.poll_interval_ms = 200
    yield viewer, widget
    widget.shutdown(timeout_s=30)  # never leave a training process behind


def fill_seed_form(widget, data: Path, output: Path, *, epochs: int) -> None:
    """A tiny RED-CNN run: 1-2 steps per epoch of 2 patches of 32 x 32, a log record every step."""
    widget.stage_combo.setCurrentIndex(widget.stage_combo.findData("seed"))
    widget.data_edit.setText(str(data))
    widget.output_edit.setText(str(output))
    widget.preset_combo.setCurrentText("tiny")
    widget.epochs_spin.setValue(epochs)
    widget.steps_spin.setValue(2)
    widget.batch_spin.setValue(2)
    widget.patch_spin.setValue(32)
    widget.backbone_combo.setCurrentIndex(widget.backbone_combo.findData("redcnn"))
    widget.lambda_spin.setValue(0.0)
    widget.device_combo.setCurrentText("cpu")
    widget.extra_edit.setText("--log-every 1 --val-fraction 0.25 --val-max-images 1")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# --- the widget with a real training process ---------------------------------------------
def test_start_shows_progress_stop_checkpoints_resume_continues(viewer_widget, qtbot, mayo_root, tmp_path):
    from napari_langmamba.widgets.denoise import DenoiseWidget
    from napari_langmamba.widgets.train import TrainStatus

    viewer, widget = viewer_widget
    run = tmp_path / "run"
    fill_seed_form(widget, mayo_root, run, epochs=400)
    statuses: list = []
    widget.run_state.events.status.connect(statuses.append)

    assert widget.start()
    assert widget.status is TrainStatus.RUNNING
    assert widget.command[:3] == [sys.executable, "-m", "training"]
    assert widget.command[3:] == widget.process.arguments()[2:]
    assert widget.command_edit.text() == shlex.join(widget.command)
    assert "--backbone" in widget.command and "redcnn" in widget.command
    assert not widget.start_button.isEnabled() and widget.stop_button.isEnabled()

    # progress: the bar follows the log's steps, the plot gets the losses
    qtbot.waitUntil(lambda: widget.run_state.step >= 2 and "mse" in widget.loss_history, timeout=PROCESS_TIMEOUT_MS)
    assert widget.progress_bar.value() >= 2
    assert widget.progress_bar.maximum() == widget.run_state.total_steps
    assert widget.run_state.total_steps >= 400  # epochs x steps per epoch, from the log
    assert "ETA" in widget.progress_bar.format()
    assert len(widget._ax_loss.get_lines()) >= 1

    pid = widget.process.processId()
    widget.stop()
    assert widget.status is TrainStatus.STOPPING
    qtbot.waitUntil(lambda: widget.status is TrainStatus.STOPPED, timeout=PROCESS_TIMEOUT_MS)
    assert widget.process is None and not pid_alive(pid)
    assert not widget._killed  # the trainer ended by itself after SIGTERM
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "stopped"
    assert (run / "last" / "training_state.json").is_file()
    stopped_step = summary["step"]
    assert stopped_step >= 2
    assert [s.value for s in statuses] == ["running", "stopping", "stopped"]
    assert widget.resume_button.isEnabled() and widget.start_button.isEnabled()
    assert widget.error_box.isHidden()

    # Start refuses to overwrite the run; Resume continues it from its checkpoint
    assert not widget.start()
    assert "already holds" in widget.status_label.text()
    assert widget.resume()
    assert widget.command[-1] == "--resume" and widget.command.count("--output") == 1
    qtbot.waitUntil(lambda: widget.run_state.step > stopped_step + 1, timeout=PROCESS_TIMEOUT_MS)
    widget.stop()
    qtbot.waitUntil(lambda: widget.status is TrainStatus.STOPPED, timeout=PROCESS_TIMEOUT_MS)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    resumed = [r for r in records if r.get("event") == "resume"]
    assert len(resumed) == 1 and resumed[0]["step"] == stopped_step
    assert json.loads((run / "summary.json").read_text())["step"] > stopped_step

    # the run's checkpoint becomes the Denoise widget's model
    denoise = DenoiseWidget(viewer)
    viewer.window.add_dock_widget(denoise, name="Denoise")
    assert widget.use_button.isEnabled()
    widget.use_button.click()
    expected = best_checkpoint(run)
    assert expected is not None
    assert denoise.weights_path.text() == str(expected)
    assert denoise.weights_combo.currentData() == "checkpoint"


def test_failing_run_is_crashed_and_shows_the_error_lines(viewer_widget, qtbot, tmp_path, notifications):
    from napari_langmamba.widgets.train import TrainStatus

    _, widget = viewer_widget
    bad = tmp_path / "not_ct"
    bad.mkdir()
    (bad / "notes.txt").write_text("no CT here")
    fill_seed_form(widget, bad, tmp_path / "run", epochs=2)
    assert widget.start()
    qtbot.waitUntil(lambda: widget.status is TrainStatus.CRASHED, timeout=PROCESS_TIMEOUT_MS)
    assert widget.process is None
    assert not widget.error_box.isHidden()
    assert widget.error_lines and widget.error_box.toPlainText() == "\n".join(widget.error_lines)
    # the stage's own message (exit code 2) names the folder it could not use
    assert widget.error_lines[-1].startswith("error:")
    assert "not_ct" in widget.error_lines[-1]
    assert "exit code 2" in widget.status_label.text()
    assert any("not_ct" in str(n.message) and "exit code 2" in str(n.message) for n in notifications)
    assert widget.start_button.isEnabled() and not widget.stop_button.isEnabled()
    assert not widget.resume_button.isEnabled()  # nothing was checkpointed


def test_a_finished_run_is_done_and_ready_for_evaluate_and_denoise(viewer_widget, qtbot, mayo_root, tmp_path):
    from napari_langmamba.widgets.train import TrainStatus

    _, widget = viewer_widget
    run = tmp_path / "run"
    fill_seed_form(widget, mayo_root, run, epochs=2)
    assert widget.start()
    qtbot.waitUntil(lambda: not widget.status.active, timeout=PROCESS_TIMEOUT_MS)
    assert widget.status is TrainStatus.DONE, widget.error_lines
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert (widget.run_state.step, widget.progress_bar.value()) == (summary["step"], summary["total_steps"])
    assert {"psnr", "ssim"} <= set(widget.val_history)  # validation curves, one point per epoch
    assert [epoch for epoch, _ in widget.val_history["psnr"]] == [1, 2]
    assert widget.checkpoint_edit.text() == str(run / "best")  # ready for the evaluate stage
    assert widget.use_button.isEnabled() and not widget.resume_button.isEnabled()


# --- validation before start (no process) -------------------------------------------------
def test_start_is_refused_with_clear_messages(viewer_widget, mayo_root, tmp_path, notifications):
    from napari_langmamba.widgets.train import TrainStatus

    _, widget = viewer_widget
    fill_seed_form(widget, tmp_path / "missing", tmp_path / "run", epochs=2)
    assert not widget.start()
    assert "does not exist" in widget.status_label.text() and "missing" in widget.status_label.text()

    existing = tmp_path / "old_run"
    existing.mkdir()
    (existing / "metrics.jsonl").write_text("")
    fill_seed_form(widget, mayo_root, existing, epochs=2)
    assert not widget.start()
    assert "already holds" in widget.status_label.text() and "press Resume" in widget.status_label.text()
    assert not widget.resume()
    assert "no checkpoint to resume" in widget.status_label.text()

    fill_seed_form(widget, mayo_root, tmp_path / "run", epochs=2)
    widget.backbone_combo.setCurrentIndex(widget.backbone_combo.findData("seed"))
    assert not widget.start()
    assert "LangAE checkpoint" in widget.status_label.text()

    widget.backbone_combo.setCurrentIndex(widget.backbone_combo.findData("redcnn"))
    widget.lr_edit.setText("fast")
    assert not widget.start()
    assert "learning rate" in widget.status_label.text()
    assert widget.process is None and widget.status is TrainStatus.IDLE
    assert len(notifications) >= 5


def test_existing_run_folder_fills_the_form(viewer_widget, tmp_path):
    _, widget = viewer_widget
    run = tmp_path / "run"
    (run / "last").mkdir(parents=True)
    (run / "last" / "training_state.json").write_text("{}")
    (run / "last" / "config.json").write_text("{}")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    options = {"data": [str(tmp_path / "a"), str(tmp_path / "b")], "val_data": [], "output": str(run), "preset": "lite",
               "epochs": 7, "steps_per_epoch": 3, "batch_size": 5, "patch_size": 48, "device": "cpu",
               "lr": 2e-4, "backbone": "redcnn", "langda_weight": 0.5, "langae": None}
    (run / "config.json").write_text(json.dumps({"stage": "seed", "options": options}))
    widget.stage_combo.setCurrentIndex(widget.stage_combo.findData("langae"))
    widget.output_edit.setText(str(run))
    widget.output_edit.editingFinished.emit()
    assert widget.stage == "seed"
    assert widget.data_edit.text() == f"{tmp_path / 'a'}; {tmp_path / 'b'}"
    assert (widget.preset_combo.currentText(), widget.epochs_spin.value(), widget.steps_spin.value(),
            widget.batch_spin.value(), widget.patch_spin.value()) == ("lite", 7, 3, 5, 48)
    assert float(widget.lr_edit.text()) == 2e-4 and widget.lambda_spin.value() == 0.5
    assert widget.backbone_combo.currentData() == "redcnn"
    assert "Resume" in widget.status_label.text()
    assert widget.resume_button.isEnabled()
    assert widget.use_button.isEnabled()  # a seed run with a checkpoint folder
    (run / "summary.json").write_text(json.dumps({"status": "completed", "step": 21, "total_steps": 21}))
    widget.output_edit.editingFinished.emit()
    assert "complete" in widget.status_label.text()
    assert not widget.resume_button.isEnabled()
    assert not widget.resume() and "nothing left to resume" in widget.status_label.text()


def test_every_control_has_a_tooltip(viewer_widget):
    _, widget = viewer_widget
    missing = [name for name, control in widget.bound_controls.items() if not control.toolTip()]
    assert missing == []


def test_stage_rows_follow_the_stage(viewer_widget):
    _, widget = viewer_widget
    expectations = {
        "seed": {"langae": True, "lambda_spin": True, "codebook_edit": False, "dose_spin": False},
        "langae": {"langae": False, "codebook_edit": True, "candidates": True, "patch_spin": True},
        "simulate": {"dose_spin": True, "epochs_spin": False, "device_combo": False},
        "evaluate": {"checkpoint": True, "epochs_spin": False, "val": False},
    }
    for stage, rows in expectations.items():
        widget.stage_combo.setCurrentIndex(widget.stage_combo.findData(stage))
        assert {name: not widget._rows[name].isHidden() for name in rows} == rows, stage
    widget.stage_combo.setCurrentIndex(widget.stage_combo.findData("langae"))
    assert widget.patch_spin.value() == 256 and widget.lr_edit.text() == ""  # langae defaults
    widget.stage_combo.setCurrentIndex(widget.stage_combo.findData("seed"))
    assert widget.patch_spin.value() == 64 and widget.lr_edit.text() == "1e-4"  # the paper's seed defaults


# --- the command uses the stages' real flags --------------------------------------------
EXTRA = {"simulate": ("--seed", "3"), "candidates": ("--batch-size", "3"), "langae": ("--seed", "3"),
         "seed": ("--seed", "3"), "evaluate": ("--max-slices", "3")}


@pytest.mark.parametrize("stage", list(EXTRA))
def test_arguments_parse_with_the_stage_parser(stage, tmp_path):
    from napari_langmamba.widgets.train import TrainSettings, build_arguments
    from training.__main__ import build_parser

    settings = TrainSettings(
        stage=stage, data=(tmp_path / "a", tmp_path / "b") if stage != "evaluate" else (tmp_path / "a",),
        val_data=(tmp_path / "v",), output=tmp_path / "out", preset="lite", epochs=3, steps_per_epoch=5,
        batch_size=2, patch_size=48, lr=2e-4, langda_weight=0.5, backbone="redcnn", codebook="random:8x4",
        langae=tmp_path / "ae", candidates=tmp_path / "c.json", checkpoint=tmp_path / "ck", dose=0.1,
        device="cpu", amp="bf16", extra=EXTRA[stage],
    )
    args = build_parser(stage).parse_args(build_arguments(settings, resume=stage in ("langae", "seed")))
    ns = vars(args)
    assert ns["stage"] == stage
    if stage == "simulate":
        assert [Path(p) for p in ns["inputs"]] == [tmp_path / "a", tmp_path / "b"]
        assert Path(ns["out"]) == tmp_path / "out" and ns["dose"] == 0.1 and ns["seed"] == 3
    elif stage == "candidates":
        assert Path(ns["output"]) == tmp_path / "out" and ns["codebook"] == "random:8x4" and ns["device"] == "cpu"
        assert ns["batch_size"] == 3
    elif stage == "evaluate":
        assert Path(ns["data"]) == tmp_path / "a" and Path(ns["checkpoint"]) == tmp_path / "ck"
        assert Path(ns["out"]) == tmp_path / "out" and ns["max_slices"] == 3
    else:
        assert [Path(p) for p in ns["data"]] == [tmp_path / "a", tmp_path / "b"]
        assert [Path(p) for p in ns["val_data"]] == [tmp_path / "v"]
        assert (ns["preset"], ns["epochs"], ns["steps_per_epoch"], ns["batch_size"], ns["patch_size"]) == (
            "lite", 3, 5, 2, 48)
        assert ns["lr"] == 2e-4 and ns["device"] == "cpu" and ns["resume"] is True and ns["seed"] == 3
        assert ns["amp"] == "bf16"
        if stage == "seed":
            assert ns["backbone"] == "redcnn" and ns["langda_weight"] == 0.5 and Path(ns["langae"]) == tmp_path / "ae"
        else:
            assert ns["codebook"] == "random:8x4" and Path(ns["candidates"]) == tmp_path / "c.json"


def test_the_form_takes_its_fields_defaults_and_flags_from_the_stages_options(viewer_widget):
    """One source of truth: the stages' option dataclasses (training.options), not a copied list."""
    import argparse
    import dataclasses
    import importlib

    from napari_langmamba.widgets.train import (
        STAGE_FIELDS,
        STAGES,
        TrainSettings,
        build_arguments,
        stage_default,
    )
    from training.__main__ import STAGES as STAGE_MODULES
    from training.options import BACKBONES, FLAGS, PRESET_CHOICES, default_of, flag_of, options_class

    _, widget = viewer_widget
    assert set(STAGE_FIELDS) == set(STAGES)
    for stage, fields in STAGE_FIELDS.items():
        options = {f.name for f in dataclasses.fields(options_class(stage))}
        assert set(fields.values()) <= options, stage  # every form field fills a real option
        parser = argparse.ArgumentParser()
        importlib.import_module(STAGE_MODULES[stage][0]).add_arguments(parser)
        for option in fields.values():  # and its flag is one the stage's parser reads into that option
            flag = flag_of(stage, option)
            assert flag == FLAGS.get(stage, {}).get(option, "--" + option.replace("_", "-"))
            action = next(a for a in parser._actions if flag in a.option_strings)
            assert action.dest == option, (stage, option)
        # a field left empty takes the stage's own default (no copy of it in the widget)
        settings = TrainSettings(stage=stage)
        for field_name, option in fields.items():
            if field_name in ("data", "val_data"):  # inputs: no default to take
                continue
            expected = default_of(options_class(stage), option)
            assert getattr(settings, field_name) == expected, (stage, field_name)
    # the stage defaults reach the command: a seed form left alone passes the stage's own values
    args = build_arguments(TrainSettings(stage="seed", data=(Path("d"),), output=Path("o")))
    for option in ("epochs", "batch_size", "patch_size", "lr"):
        flag = flag_of("seed", option)
        assert float(args[args.index(flag) + 1]) == stage_default("seed", option)
    assert args[args.index("--lambda") + 1] == format(stage_default("seed", "langda_weight"), "g")
    # the form opens on the stages' defaults
    assert widget.epochs_spin.value() == stage_default("seed", "epochs")
    assert widget.batch_spin.value() == stage_default("seed", "batch_size")
    assert widget.patch_spin.value() == stage_default("seed", "patch_size")
    assert float(widget.lr_edit.text()) == stage_default("seed", "lr")
    assert widget.lambda_spin.value() == pytest.approx(stage_default("seed", "langda_weight"))
    # the precision: the stages' choices, their default, and the choice reaches the command
    from training.options import AMP_CHOICES

    assert [widget.amp_combo.itemText(i) for i in range(widget.amp_combo.count())] == list(AMP_CHOICES)
    assert widget.amp_combo.currentText() == stage_default("seed", "amp") == "auto"
    widget.amp_combo.setCurrentText("bf16")
    command = widget.preview_command()
    assert command[command.index("--amp") + 1] == "bf16"
    assert widget.preset_combo.currentText() == stage_default("seed", "preset")
    assert widget.codebook_edit.text() == stage_default("langae", "codebook")
    assert widget.dose_spin.value() == pytest.approx(stage_default("simulate", "dose"))
    assert [widget.preset_combo.itemText(i) for i in range(widget.preset_combo.count())] == list(PRESET_CHOICES)
    assert [widget.backbone_combo.itemData(i) for i in range(widget.backbone_combo.count())] == list(BACKBONES)


# --- Qt-free run-folder reading -----------------------------------------------------------
def test_file_names_match_the_training_engine():
    import napari_langmamba.training_runs as reader
    import training.runs as engine

    for name in ("CONFIG_FILE", "METRICS_FILE", "SUMMARY_FILE", "LAST", "BEST", "STATE_JSON"):
        assert getattr(reader, name) == getattr(engine, name), name


def test_metrics_tail_reads_increments_ignores_a_torn_line_and_agrees_with_read_metrics(tmp_path):
    from training.runs import read_metrics

    path = tmp_path / "metrics.jsonl"
    tail = MetricsTail(tmp_path)
    assert tail.poll().records == []  # no file yet
    rec = [{"kind": "train", "step": i, "losses": {"loss": 1.0 / i}} for i in range(1, 6)]
    with open(path, "w") as fh:
        fh.write(json.dumps(rec[0]) + "\n" + json.dumps(rec[1]) + "\n" + json.dumps(rec[2])[:10])  # torn
    first = tail.poll()
    assert first.records == rec[:2] and not first.reset
    assert first.records == read_metrics(path)
    assert tail.poll().records == []  # the torn line is not consumed, nor trusted
    with open(path, "a") as fh:
        fh.write(json.dumps(rec[2])[10:] + "\n" + "not json\n" + "[1, 2]\n" + json.dumps(rec[3]) + "\n")
    second = tail.poll()
    assert second.records == [rec[2], rec[3]]  # invalid and non-object lines skipped
    assert first.records + second.records == read_metrics(path)
    assert tail.offset == path.stat().st_size
    # a resumed run rewrites the file atomically (new inode) without the records after its checkpoint
    tmp = tmp_path / "rewrite.tmp"
    tmp.write_text(json.dumps(rec[0]) + "\n" + json.dumps(rec[4]) + "\n")
    os.replace(tmp, path)
    third = tail.poll()
    assert third.reset and third.records == [rec[0], rec[4]] == read_metrics(path)
    # truncation in place is noticed too
    path.write_text(json.dumps(rec[1]) + "\n")
    fourth = tail.poll()
    assert fourth.reset and fourth.records == [rec[1]]


def test_run_folder_inspection_matches_the_engine(tmp_path):
    from training.runs import RunFolder

    cases = {"empty": [], "config": ["config.json"], "metrics": ["metrics.jsonl"], "last": ["last/"],
             "other": ["notes.txt"]}
    for name, files in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        for f in files:
            (folder / f).mkdir() if f.endswith("/") else (folder / f).write_text("{}")
        assert holds_run(folder) == RunFolder(folder, stage="seed").holds_run(), name
    run = tmp_path / "done"
    (run / "last").mkdir(parents=True)
    (run / "best").mkdir()
    (run / "last" / "config.json").write_text("{}")
    (run / "last" / "training_state.json").write_text("{}")
    (run / "config.json").write_text(json.dumps({"stage": "langae", "options": {"epochs": 2}}))
    (run / "summary.json").write_text(json.dumps({"status": "completed", "step": 6, "total_steps": 6}))
    assert best_checkpoint(run) == run / "last"  # best/ without its config.json is not a checkpoint
    (run / "best" / "config.json").write_text("{}")
    info = inspect_run(run)
    assert (info.stage, info.status, info.step, info.total_steps, info.resumable) == ("langae", "completed", 6, 6, True)
    assert info.checkpoint == run / "best" and info.options == {"epochs": 2}
    assert info.describe() == "a langae run, completed at step 6 of 6"
    assert inspect_run(tmp_path / "nowhere").holds_run is False


def test_tqdm_progress_and_eta_text():
    from napari_langmamba.widgets.train import format_eta

    text = "simulate:  10%|#         | 2/20 [00:03<00:27,  1.5s/slice]\rsimulate:  40%|####      | 8/20 [00:12<01:05,  1.5s/slice]"
    progress = parse_tqdm_progress(text)
    assert (progress.done, progress.total, progress.eta_s) == (8, 20, 65.0)
    assert parse_tqdm_progress("evaluate: 0/5 [00:00<?, ?it/s]").eta_s is None
    assert parse_tqdm_progress("step 3/10 epoch 1: loss=0.1") is None
    assert [format_eta(s) for s in (None, 12.4, 200, 7500)] == ["?", "12 s", "3 min 20 s", "2 h 05 min"]


def test_use_in_denoise_opens_the_denoise_widget(viewer_widget, tmp_path):
    from napari_langmamba.widgets.denoise import DenoiseWidget

    viewer, widget = viewer_widget
    run = tmp_path / "seed_run"
    (run / "best").mkdir(parents=True)
    (run / "best" / "config.json").write_text("{}")
    (run / "config.json").write_text(json.dumps({"stage": "seed", "options": {}}))
    widget.output_edit.setText(str(run))
    assert not any(isinstance(w, DenoiseWidget) for w in viewer.window.dock_widgets.values())
    assert widget.use_in_denoise() == run / "best"
    denoise = [w for w in viewer.window.dock_widgets.values() if isinstance(w, DenoiseWidget)]
    assert len(denoise) == 1 and denoise[0].weights_path.text() == str(run / "best")


def test_use_in_denoise_refuses_a_langae_run(viewer_widget, tmp_path):
    _, widget = viewer_widget
    run = tmp_path / "ae_run"
    (run / "best").mkdir(parents=True)
    (run / "best" / "config.json").write_text("{}")
    (run / "config.json").write_text(json.dumps({"stage": "langae", "options": {}}))
    widget.output_edit.setText(str(run))
    assert not widget.use_button.isEnabled()
    assert widget.use_in_denoise() is None
    assert "only a seed (stage 2) run" in widget.status_label.text()


def test_evaluate_stage_reports_tqdm_progress_and_finishes(viewer_widget, qtbot, mayo_root, tmp_path):
    from napari_langmamba.widgets.train import TrainStatus

    _, widget = viewer_widget
    widget.stage_combo.setCurrentIndex(widget.stage_combo.findData("evaluate"))
    widget.data_edit.setText(str(mayo_root))
    widget.output_edit.setText(str(tmp_path / "eval"))
    widget.device_combo.setCurrentText("cpu")
    widget.extra_edit.setText("--metrics psnr ssim")
    assert widget.start()
    qtbot.waitUntil(lambda: not widget.status.active, timeout=PROCESS_TIMEOUT_MS)
    assert widget.status is TrainStatus.DONE, widget.error_lines
    assert (widget.run_state.step, widget.run_state.total_steps) == (4, 4)  # 4 slices, from tqdm on stderr
    assert (widget.progress_bar.value(), widget.progress_bar.maximum()) == (4, 4)
    result = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert result  # written by the stage
    assert "PSNR" in widget.log_box.toPlainText()  # stdout (the table) reaches the log


def test_stop_twice_kills_at_once(viewer_widget, qtbot, mayo_root, tmp_path):
    from napari_langmamba.widgets.train import TrainStatus

    _, widget = viewer_widget
    fill_seed_form(widget, mayo_root, tmp_path / "run", epochs=400)
    assert widget.start()
    qtbot.waitUntil(lambda: widget.process.processId() > 0, timeout=10_000)
    pid = widget.process.processId()
    widget.stop()
    assert widget.stop_button.text() == "Kill now"
    widget.stop()
    qtbot.waitUntil(lambda: widget.status is TrainStatus.STOPPED, timeout=PROCESS_TIMEOUT_MS)
    assert not pid_alive(pid)
    assert "killed" in widget.status_label.text()
    assert widget.stop_button.text() == "Stop" and not widget.stop_button.isEnabled()


def test_closing_the_viewer_ends_a_running_process(make_napari_viewer, qtbot, mayo_root, tmp_path):
    from napari_langmamba.widgets.train import TrainWidget

    viewer = make_napari_viewer()
    widget = TrainWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Train")
    fill_seed_form(widget, mayo_root, tmp_path / "run", epochs=400)
    assert widget.start()
    qtbot.waitUntil(lambda: widget.process.processId() > 0, timeout=10_000)
    pid = widget.process.processId()
    viewer.close()
    qtbot.waitUntil(lambda: not pid_alive(pid), timeout=PROCESS_TIMEOUT_MS)


def test_importing_the_widget_loads_neither_torch_nor_training():
    import subprocess

    code = (
        "import sys\n"
        "import napari_langmamba.training_runs\n"
        "assert not {'qtpy', 'torch', 'napari'} & set(sys.modules), 'training_runs pulled in Qt/torch'\n"
        "import napari_langmamba.widgets.train\n"
        "heavy = sorted(m for m in ('torch', 'training', 'training.runs') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
