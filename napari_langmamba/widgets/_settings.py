"""Widget settings that stick between napari sessions, with "reset to defaults".

Each widget names the bound controls it remembers (:meth:`WidgetBase.persist`); their values
are written to one INI file (Qt's ``QSettings``) as the user changes them and restored when the
widget is built again. The file is ``$LANGMAMBA_SETTINGS_DIR/settings.ini`` when that variable
is set (the test suite points it at a temporary folder, so a user's own settings are never
touched), else ``napari-langmamba/settings.ini`` in the platform's configuration folder.
A stored value the control cannot take any more (a device that is gone, a value out of range)
is ignored and the control keeps its default.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qtpy.QtCore import QSettings, QStandardPaths
from qtpy.QtWidgets import QAbstractSlider, QAbstractSpinBox, QCheckBox, QComboBox, QLineEdit, QWidget

logger = logging.getLogger(__name__)

SETTINGS_ENV = "LANGMAMBA_SETTINGS_DIR"
APP_FOLDER = "napari-langmamba"


def settings_path() -> Path:
    """The INI file the widgets' settings live in (see the module docstring)."""
    folder = os.environ.get(SETTINGS_ENV, "").strip()
    if folder:
        return Path(folder).expanduser() / "settings.ini"
    config = QStandardPaths.writableLocation(QStandardPaths.StandardLocation.GenericConfigLocation)
    return Path(config or Path.home() / ".config") / APP_FOLDER / "settings.ini"


def _store() -> QSettings:
    return QSettings(str(settings_path()), QSettings.Format.IniFormat)


def control_value(control: QWidget) -> Any:
    """The value of a combo box (its text), spin box, slider, check box or line edit."""
    if isinstance(control, QComboBox):
        return control.currentText()
    if isinstance(control, QCheckBox):
        return control.isChecked()
    if isinstance(control, (QAbstractSpinBox, QAbstractSlider)):
        return control.value()
    if isinstance(control, QLineEdit):
        return control.text()
    raise TypeError(f"cannot remember a {type(control).__name__}")


def set_control_value(control: QWidget, value: Any) -> bool:
    """Give ``control`` the value ``value``; False (control unchanged) when it cannot take it."""
    try:
        if isinstance(control, QComboBox):
            index = control.findText(str(value))
            if index >= 0:
                control.setCurrentIndex(index)
            elif control.isEditable():
                control.setEditText(str(value))
            else:
                return False
        elif isinstance(control, QCheckBox):
            control.setChecked(bool(value))
        elif isinstance(control, (QAbstractSpinBox, QAbstractSlider)):
            number = type(control.value())(value)
            if not control.minimum() <= number <= control.maximum():
                return False
            control.setValue(number)
        elif isinstance(control, QLineEdit):
            control.setText(str(value))
        else:
            return False
    except (TypeError, ValueError):
        return False
    return True


def changed_signal(control: QWidget) -> Any:
    """The signal a control emits when the user changes its value."""
    if isinstance(control, QComboBox):
        return control.currentTextChanged
    if isinstance(control, QCheckBox):
        return control.toggled
    if isinstance(control, (QAbstractSpinBox, QAbstractSlider)):
        return control.valueChanged
    if isinstance(control, QLineEdit):
        return control.textChanged
    raise TypeError(f"cannot remember a {type(control).__name__}")


class PersistentControls:
    """Controls of one widget (``section``) remembered in the settings file.

    Built after the controls have their defaults: those are what :meth:`reset` goes back to.
    """

    def __init__(self, section: str, controls: Mapping[str, QWidget]) -> None:
        self.section = section
        self.controls = dict(controls)
        self.defaults = {name: control_value(control) for name, control in self.controls.items()}
        self._restoring = False
        for name, control in self.controls.items():
            changed_signal(control).connect(lambda *_, name=name: self.save(name))

    def _key(self, name: str) -> str:
        return f"{self.section}/{name}"

    def restore(self) -> dict[str, Any]:
        """Give every control its stored value (in declaration order); return what was restored."""
        store = _store()
        restored = {}
        self._restoring = True
        try:
            for name, control in self.controls.items():
                raw = store.value(self._key(name))
                if raw is None:
                    continue
                try:
                    value = json.loads(str(raw))
                except ValueError:
                    logger.info("ignoring the unreadable stored setting %s = %r", self._key(name), raw)
                    continue
                if set_control_value(control, value):
                    restored[name] = value
        finally:
            self._restoring = False
        return restored

    def save(self, name: str) -> None:
        """Store the current value of control ``name``."""
        if self._restoring:
            return
        store = _store()
        store.setValue(self._key(name), json.dumps(control_value(self.controls[name])))
        store.sync()

    def reset(self) -> None:
        """Put every control back to its default and forget the stored values."""
        self._restoring = True
        try:
            for name, control in self.controls.items():
                set_control_value(control, self.defaults[name])
        finally:
            self._restoring = False
        store = _store()
        for name in self.controls:
            store.remove(self._key(name))
        store.sync()
