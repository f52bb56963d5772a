"""The Train widget's GUI-free pieces: form rules, option parsing, resume arguments, metrics history, plot."""

from __future__ import annotations

from pathlib import Path

import pytest

from napari_langmamba.errors import ConfigError
from napari_langmamba.widgets._train_form import (
    DATA_LABELS,
    STAGES,
    TRAINING_STAGES,
    TrainingRunState,
    optional_path,
    parse_extra_options,
    parse_learning_rate,
    paths_text,
    resume_arguments,
    split_paths,
    stage_rows,
)
from napari_langmamba.widgets._train_history import draw_history, ingest_record


def test_stage_rows_show_what_each_stage_uses():
    assert set(DATA_LABELS) == set(STAGES)
    for stage in STAGES:
        rows = stage_rows(stage)
        assert rows["epochs_spin"] == rows["lr_edit"] == rows["val"] == (stage in TRAINING_STAGES)
        assert rows["dose_spin"] == (stage == "simulate") and rows["device_combo"] == (stage != "simulate")
        assert rows["amp_combo"] == (stage in TRAINING_STAGES)
        assert rows["langae"] == rows["backbone_combo"] == (stage == "seed")
        assert rows["checkpoint"] == (stage == "evaluate") and rows["candidates"] == (stage == "langae")
        assert rows["codebook_edit"] == (stage in ("langae", "candidates"))


def test_learning_rate_and_extra_options_are_read_or_refused_with_a_reason():
    assert parse_learning_rate("  ") is None
    assert parse_learning_rate(" 4.5e-6 ") == 4.5e-6
    for bad, why in (("fast", "a number"), ("-1e-4", "positive"), ("nan", "positive"), ("inf", "positive")):
        with pytest.raises(ConfigError, match=why):
            parse_learning_rate(bad)
    assert parse_extra_options('--seed 3 --note "two words"') == ("--seed", "3", "--note", "two words")
    with pytest.raises(ConfigError, match="quotes"):
        parse_extra_options('--note "open')


def test_paths_are_split_made_absolute_and_written_back(tmp_path):
    assert split_paths(f" {tmp_path / 'a'} ;; {tmp_path / 'b'} ;") == (tmp_path / "a", tmp_path / "b")
    assert split_paths("rel") == (Path("rel").absolute(),)
    assert optional_path("  ") is None and optional_path(str(tmp_path)) == tmp_path
    assert paths_text(None) == "" and paths_text("/x") == "/x" and paths_text(["/x", "/y"]) == "/x; /y"


def test_resume_repeats_the_options_that_started_the_same_run(tmp_path):
    out = tmp_path / "run"
    last = ["seed", "--output", str(out), "--epochs", "9", "--resume"]
    form = ["seed", "--output", str(out), "--epochs", "3", "--resume"]
    assert resume_arguments(last, form, out) == ["seed", "--output", str(out), "--epochs", "9", "--resume"]
    assert resume_arguments(last, form, tmp_path / "other") is form  # another run: the form's options
    assert resume_arguments(last, form, None) is form
    assert resume_arguments(["seed", "--output"], form, out) is form  # no value after --output


def test_records_fill_the_histories_and_the_run_state():
    state = TrainingRunState()
    losses, vals = {}, {}
    records = [
        {"kind": "event", "event": "start", "step": 0, "total_steps": 100},
        {"kind": "train", "step": 10, "losses": {"mse": 0.5, "bad": float("nan")}, "eta_s": 30},
        {"kind": "train", "step": 20, "losses": {"mse": 0.25}, "eta_s": None},
        {"kind": "epoch", "epoch": 1, "val": {"psnr": 30.0, "n_images": 4, "psnr_n_nonfinite": 0, "ssim": 0.9}},
        {"kind": "event", "event": "resume", "step": 15},
        {"kind": "train", "step": "x", "losses": {"mse": 1.0}},  # no step: ignored
    ]
    for record in records:
        ingest_record(record, state, losses, vals)
    assert losses == {"mse": [(10, 0.5), (20, 0.25)]}
    assert vals == {"psnr": [(1, 30.0)], "ssim": [(1, 0.9)]}
    assert (state.step, state.total_steps, state.eta_s) == (15, 100, None)


def test_the_plot_draws_the_histories_or_a_hint():
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    figure = Figure()
    ax_loss, ax_val = figure.subplots(2, 1)
    ax_val2 = ax_val.twinx()
    draw_history(ax_loss, ax_val, ax_val2, {}, {})
    assert "first step" in ax_loss.texts[0].get_text() and "after each epoch" in ax_val.texts[0].get_text()
    losses = {"mse": [(1, 100.0), (2, 1.0)], "zero": [(1, 0.0), (2, 0.0)]}
    vals = {"psnr": [(1, 30.0), (2, 31.0)], "ssim": [(1, 0.8), (2, 0.9)]}
    draw_history(ax_loss, ax_val, ax_val2, losses, vals)
    assert [line.get_label() for line in ax_loss.lines] == ["mse"]  # all-zero losses are left out
    assert ax_loss.get_yscale() == "log"  # a factor 100 between the values
    assert [line.get_label() for line in ax_val.lines] == ["psnr"] and ax_val.get_ylabel() == "PSNR (dB)"
    assert [line.get_label() for line in ax_val2.lines] == ["ssim"] and ax_val2.get_ylabel() == "other metrics"


def test_a_recorded_run_fills_the_form_it_was_started_from():
    from napari_langmamba.widgets._train_form import recorded_form, stage_default

    seed = recorded_form("seed", {
        "data": ["/a", "/b"], "val_data": None, "preset": "lite", "epochs": 3, "steps_per_epoch": "many",
        "batch_size": 2, "patch_size": 48, "lr": 0.0002, "device": "cpu", "amp": "bf16", "backbone": "redcnn",
        "langda_weight": 0, "langae": "/ae", "codebook": "ignored for seed",
    })
    assert list(seed)[0] == "stage_combo" and seed["stage_combo"] == "seed"
    assert seed == {
        "stage_combo": "seed", "data_edit": "/a; /b", "val_edit": "", "preset_combo": "lite", "epochs_spin": 3,
        "batch_spin": 2, "patch_spin": 48, "lr_edit": "0.0002", "device_combo": "cpu", "amp_combo": "bf16",
        "backbone_combo": "redcnn", "lambda_spin": 0.0, "langae_edit": "/ae",
    }  # steps_per_epoch of the wrong type is left out: the control keeps its value
    langae = recorded_form("langae", {"data": "/ct", "preset": "no such preset", "lr": None, "candidates": "/c.json",
                                      "amp": "fp8"})
    assert "preset_combo" not in langae and "amp_combo" not in langae and langae["lr_edit"] == "" and langae["data_edit"] == "/ct"
    assert langae["codebook_edit"] == stage_default("langae", "codebook") and langae["candidates_edit"] == "/c.json"
    assert "backbone_combo" not in langae and "langae_edit" not in langae


def test_resume_is_offered_only_for_an_unfinished_checkpointed_run_of_the_stage():
    from types import SimpleNamespace

    from napari_langmamba.widgets._train_form import adopted_run_hint, can_resume

    def run(**kw):
        return SimpleNamespace(**{"resumable": True, "stage": "seed", "status": "stopped", **kw})

    assert can_resume(run(), "seed") and can_resume(run(stage=None), "langae")
    assert not can_resume(None, "seed") and not can_resume(run(), "evaluate")
    assert not can_resume(run(resumable=False), "seed") and not can_resume(run(stage="langae"), "seed")
    assert not can_resume(run(status="completed"), "seed")
    assert adopted_run_hint(run(status="completed")).startswith("it is complete")
    assert adopted_run_hint(run()) == "press Resume to continue it"
    assert adopted_run_hint(run(resumable=False)) == "it has no checkpoint to resume"
