"""Shared fixtures: the real CT data in ../shared/data (skipped with a reason when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests are sized for 2 CPU cores; one intra-op thread each keeps them predictable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LANGMAMBA_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def load_benchmark(name: str):
    """The module of ``benchmarks/<name>.py`` (the scripts are not a package), to test its pieces."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _private_widget_settings(tmp_path_factory, monkeypatch):
    """Widgets remember their settings in a fresh temporary folder per test, never in the user's own file."""
    monkeypatch.setenv("LANGMAMBA_SETTINGS_DIR", str(tmp_path_factory.mktemp("settings")))


DICOM_SERIES = SHARED_DATA / "ct" / "abdomen_dicom_series"
NIFTI_VOLUME = SHARED_DATA / "ct" / "abdomen_pelvis_3mm.nii.gz"


@pytest.fixture(scope="session")
def dicom_series_dir() -> Path:
    """The real 20-slice abdominal DICOM series (JPEG 2000 lossless)."""
    if not DICOM_SERIES.is_dir():
        pytest.skip(f"real CT data not found at {DICOM_SERIES} (../shared/data is absent)")
    return DICOM_SERIES


@pytest.fixture(scope="session")
def nifti_path() -> Path:
    """The real abdomen/pelvis NIfTI volume (3 mm isotropic)."""
    if not NIFTI_VOLUME.is_file():
        pytest.skip(f"real CT data not found at {NIFTI_VOLUME} (../shared/data is absent)")
    return NIFTI_VOLUME
