"""Packaging: the manifest napari finds, and a core that stays free of Qt."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_manifest_symlink_points_at_root_file():
    inside = REPO_ROOT / "napari_langmamba" / "napari.yaml"
    assert inside.is_symlink(), "napari_langmamba/napari.yaml must be a symlink to the root manifest"
    assert os.path.samefile(inside, REPO_ROOT / "napari.yaml")


def test_installed_manifest_is_the_root_manifest():
    from importlib.metadata import entry_points

    (entry,) = [ep for ep in entry_points(group="napari.manifest") if ep.name == "napari-langmamba"]
    import importlib.resources

    package, resource = entry.value.split(":")
    text = importlib.resources.files(package).joinpath(resource).read_text()
    assert text == (REPO_ROOT / "napari.yaml").read_text()


def test_npe2_validate_passes():
    npe2 = Path(sys.executable).with_name("npe2")
    result = subprocess.run(
        [str(npe2), "validate", "napari-langmamba"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout


def test_manifest_python_names_import():
    """Every command of the manifest resolves to a real object (what napari imports on demand)."""
    from npe2 import PluginManifest

    manifest = PluginManifest.from_file(REPO_ROOT / "napari.yaml")
    import importlib

    for command in manifest.contributions.commands:
        module_name, attr = command.python_name.split(":")
        module = importlib.import_module(module_name)
        assert callable(getattr(module, attr)), command.python_name


CORE_MODULES = [
    "napari_langmamba",
    "napari_langmamba.errors",
    "napari_langmamba.events",
    "napari_langmamba.windowing",
    "napari_langmamba.io",
    "napari_langmamba.metrics",
    "napari_langmamba.compare",
    "napari_langmamba.models",
    "napari_langmamba.checkpoint",
    "napari_langmamba.inference",
    "napari_langmamba.tokens",
    "napari_langmamba.session",
]


QT = ("qtpy", "PyQt6", "PyQt5", "PySide6")
QT_FREE_WIDGET_MODULES = [
    "napari_langmamba.widgets._viewer",
    "napari_langmamba.widgets._worker",
    "napari_langmamba.widgets._tokens_core",
    "napari_langmamba.widgets._compare_core",
    "napari_langmamba.widgets._train_form",
    "napari_langmamba.widgets._train_history",
]
"""The widgets' GUI-free pieces (they may use napari's models, never Qt)."""


def _loaded_by(module: str, names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` importing ``module`` in a fresh interpreter loads."""
    code = f"import sys, {module}\nprint(','.join(sorted(m for m in {names!r} if m in sys.modules)))\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [m for m in result.stdout.strip().split(",") if m]


@pytest.mark.parametrize("module", CORE_MODULES)
def test_core_module_imports_no_qt_or_napari(module):
    assert _loaded_by(module, (*QT, "napari")) == [], module


@pytest.mark.parametrize("module", QT_FREE_WIDGET_MODULES)
def test_widget_core_module_imports_no_qt(module):
    assert _loaded_by(module, QT) == [], module


@pytest.mark.parametrize(
    "module",
    ["napari_langmamba.io._napari", "napari_langmamba.session", "training.options",
     "napari_langmamba.widgets._train_form", "napari_langmamba.widgets._train_history"],
)
def test_light_modules_import_no_torch(module):
    """napari imports the reader/sample module at start-up; the session layer and the stages' options
    (what the Train widget reads) are needed before any model: none of them may load torch."""
    assert _loaded_by(module, ("torch",)) == [], module


def test_manifest_entry_modules_import_neither_training_nor_torch():
    """What napari imports at start-up (every module the manifest names) loads no model code.

    torch, transformers and the bundled ``training`` package are imported only when a model runs
    or a run starts, so opening napari and listing the plugin's widgets stays fast.
    """
    from npe2 import PluginManifest

    manifest = PluginManifest.from_file(REPO_ROOT / "napari.yaml")
    modules = sorted({command.python_name.split(":")[0] for command in manifest.contributions.commands})
    assert "napari_langmamba.widgets.train" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "heavy = ('training', 'torch', 'transformers')\n"
        "print(','.join(sorted(m for m in heavy if m in sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"the manifest's modules pulled in {result.stdout.strip()}"


def test_shipped_packages_carry_no_fuzz_harness_and_import_no_pickle():
    """What the wheel ships (pyproject's packages: napari_langmamba*, training*) holds no test tooling.

    The reader fuzzing harness imports pickle and subprocess and plants pickles; it lives in
    tests/fuzz_harness.py. No shipped module imports pickle (checkpoints are safetensors + JSON).
    """
    import ast

    pyproject = (REPO_ROOT / "pyproject.toml").read_text()  # (tomllib is 3.11+)
    assert '[tool.setuptools.packages.find]\ninclude = ["napari_langmamba*", "training*"]\n' in pyproject
    modules = sorted(p for name in ("napari_langmamba", "training") for p in (REPO_ROOT / name).rglob("*.py"))
    assert modules and not [p for p in modules if "fuzz" in p.name]
    importing_pickle = []
    for path in modules:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            if any(n.split(".")[0] == "pickle" for n in names):
                importing_pickle.append(str(path.relative_to(REPO_ROOT)))
    assert importing_pickle == []
    assert (REPO_ROOT / "tests" / "fuzz_harness.py").is_file()
