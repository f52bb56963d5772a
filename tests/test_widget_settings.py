"""Settings that stick between napari sessions: two widget instances share them; reset restores defaults.

Every test runs with its own temporary settings folder (``tests/conftest.py``), so a user's
own settings file is never read or written.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from napari_langmamba.widgets import _settings


def test_the_settings_file_is_the_tests_temporary_one():
    path = _settings.settings_path()
    assert Path(os.environ[_settings.SETTINGS_ENV]) == path.parent
    assert str(Path.home() / ".config") not in str(path)


def test_load_ct_remembers_the_window_preset_and_custom_limits(make_napari_viewer):
    from napari_langmamba.widgets.load import LoadWidget

    first = LoadWidget(make_napari_viewer())
    assert first.window_combo.currentText() == "abdomen"
    first.window_combo.setCurrentText("custom")
    first.lower_spin.setValue(-300)
    first.upper_spin.setValue(500)
    second = LoadWidget(make_napari_viewer())
    assert second.window_combo.currentText() == "custom"
    assert (second.lower_spin.value(), second.upper_spin.value()) == (-300, 500)
    assert second.current_window().limits == (-300.0, 500.0)

    second.window_combo.setCurrentText("lung")
    third = LoadWidget(make_napari_viewer())
    assert third.window_combo.currentText() == "lung"
    assert (third.lower_spin.value(), third.upper_spin.value()) == (-1350, 150)  # the preset's own limits
    third.reset_button.click()
    assert third.window_combo.currentText() == "abdomen"
    assert LoadWidget(make_napari_viewer()).window_combo.currentText() == "abdomen"


def test_train_remembers_its_form(make_napari_viewer, tmp_path):
    from napari_langmamba.widgets.train import PERSISTED_FIELDS, TrainWidget

    first = TrainWidget(make_napari_viewer())
    defaults = {name: _settings.control_value(first.bound_controls[name]) for name in PERSISTED_FIELDS}
    first.stage_combo.setCurrentIndex(first.stage_combo.findData("langae"))
    first.data_edit.setText(str(tmp_path / "pairs"))
    first.epochs_spin.setValue(7)
    first.patch_spin.setValue(96)
    first.lr_edit.setText("3e-5")
    first.extra_edit.setText("--log-every 1")

    second = TrainWidget(make_napari_viewer())
    assert second.stage == "langae"
    assert second.data_edit.text() == str(tmp_path / "pairs")
    assert (second.epochs_spin.value(), second.patch_spin.value()) == (7, 96)
    assert second.lr_edit.text() == "3e-5" and second.extra_edit.text() == "--log-every 1"

    second.reset_button.click()
    after = {name: _settings.control_value(second.bound_controls[name]) for name in PERSISTED_FIELDS}
    assert after == defaults
    assert TrainWidget(make_napari_viewer()).stage == first.stage_combo.itemData(
        first.stage_combo.findText(defaults["stage_combo"]))


def test_tokens_remembers_the_pyramid_layer(make_napari_viewer):
    from napari_langmamba.widgets.tokens import TokensWidget

    first = TokensWidget(make_napari_viewer())
    default = first.pyramid_combo.currentIndex()
    first.pyramid_combo.setCurrentIndex(2)
    assert default != 2
    second = TokensWidget(make_napari_viewer())
    assert second.pyramid_combo.currentIndex() == 2
    second.reset_button.click()
    assert TokensWidget(make_napari_viewer()).pyramid_combo.currentIndex() == default


@pytest.mark.parametrize("stored", ["not json", '"cuda:9"', "99999"])
def test_a_stored_value_a_control_cannot_take_is_ignored(make_napari_viewer, stored):
    from qtpy.QtCore import QSettings

    from napari_langmamba.widgets.denoise import DenoiseWidget

    store = QSettings(str(_settings.settings_path()), QSettings.Format.IniFormat)
    store.setValue("denoise/device_combo", stored)
    store.setValue("denoise/batch_spin", stored)
    store.sync()
    widget = DenoiseWidget(make_napari_viewer())
    assert widget.device_combo.currentText() == "auto"  # no such device here: the default stays
    assert 1 <= widget.batch_spin.value() <= 64
