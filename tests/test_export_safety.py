"""Export never loses data: temp then rename, no silent overwrite, nothing partial after a failure."""

from __future__ import annotations

import errno
import os
import warnings
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest

from napari_langmamba.errors import CTWriteError
from napari_langmamba.io import (
    CTReadWarning,
    CTVolume,
    read_ct,
    write_ct,
    write_dicom_series,
    write_nifti,
    write_npy,
)
from napari_langmamba.io._napari import write_nifti as napari_write_nifti

FORMATS = ("dicom", "nifti", "npy")
NAMES = {"dicom": "series", "nifti": "vol.nii.gz", "npy": "vol.npy"}


def _volume(n: int = 5, seed: int = 0) -> CTVolume:
    hu = np.random.default_rng(seed).integers(-1000, 1500, size=(n, 12, 10)).astype(np.float32)
    return CTVolume(hu=hu, spacing=(2.0, 0.7, 0.7), origin=(-50.0, -60.0, 100.0))


def _write(fmt: str, volume: CTVolume, path: Path, **kw) -> Path:
    return {"dicom": write_dicom_series, "nifti": write_nifti, "npy": write_npy}[fmt](volume, path, **kw)


def _read(path: Path) -> CTVolume:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CTReadWarning)  # .npy has no spacing: expected here
        return read_ct(path)


def _snapshot(path: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``path`` (or ``path`` itself) with its bytes and mtime, to prove it is untouched."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): (p.read_bytes(), p.stat().st_mtime_ns) for p in files}


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _disk_full() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _FailingSlices:
    """Patch ``pydicom.Dataset.save_as`` to write ``ok`` slices, then half a file, then raise ``error``."""

    def __init__(self, monkeypatch, ok: int, error: BaseException, check=None) -> None:
        self.calls, self.ok, self.error, self.check = 0, ok, error, check
        original = pydicom.Dataset.save_as

        def save_as(ds, filename, *args, **kwargs):
            self.calls += 1
            if self.check is not None:
                self.check()
            if self.calls > self.ok:
                Path(filename).write_bytes(b"\0" * 200)  # the disk filled up mid-file
                raise self.error
            return original(ds, filename, *args, **kwargs)

        monkeypatch.setattr(pydicom.Dataset, "save_as", save_as)


def _fail_file_writer(monkeypatch, fmt: str, error: BaseException) -> None:
    """Make the NIfTI/npy writer write part of its temporary file, then raise ``error``."""
    if fmt == "nifti":
        def save(img, filename):
            Path(filename).write_bytes(b"\0" * 300)
            raise error

        monkeypatch.setattr(nibabel, "save", save)
    else:
        def np_save(file, arr, allow_pickle=False):
            file.write(b"\x93NUMPY partial")
            raise error

        monkeypatch.setattr(np, "save", np_save)


def _inject(monkeypatch, fmt: str, error: BaseException, ok: int = 2) -> None:
    if fmt == "dicom":
        _FailingSlices(monkeypatch, ok, error)
    else:
        _fail_file_writer(monkeypatch, fmt, error)


# ------------------------------------------------------------------------------- no silent overwrite
@pytest.mark.parametrize("fmt", FORMATS)
def test_an_existing_destination_is_never_overwritten_without_the_flag(tmp_path, fmt):
    dest = _write(fmt, _volume(seed=1), tmp_path / NAMES[fmt])
    before = _snapshot(dest)
    with pytest.raises(CTWriteError, match="already (exists|holds files)"):
        _write(fmt, _volume(seed=2), dest)
    with pytest.raises(CTWriteError, match="already (exists|holds files)"):
        write_ct(_volume(seed=2), dest, format=fmt)
    assert _snapshot(dest) == before
    assert _listing(tmp_path) == [NAMES[fmt]]


def test_the_napari_writer_refuses_an_existing_file(tmp_path):
    dest = tmp_path / "vol.nii"
    dest.write_bytes(b"precious")
    with pytest.raises(CTWriteError, match="already exists"):
        napari_write_nifti(str(dest), _volume().hu, {"scale": (2.0, 0.7, 0.7)})
    assert dest.read_bytes() == b"precious"


@pytest.mark.parametrize("fmt", ["nifti", "npy"])
def test_a_file_writer_never_replaces_a_folder(tmp_path, fmt):
    folder = tmp_path / NAMES[fmt]
    folder.mkdir()
    (folder / "keep.txt").write_text("keep")
    with pytest.raises(CTWriteError, match="is a folder"):
        _write(fmt, _volume(), folder, overwrite=True)
    assert (folder / "keep.txt").read_text() == "keep"


@pytest.mark.parametrize("fmt", FORMATS)
def test_overwrite_replaces_the_old_output_only_once_the_new_one_is_complete(tmp_path, monkeypatch, fmt):
    dest = _write(fmt, _volume(seed=1), tmp_path / NAMES[fmt])
    before = _snapshot(dest)
    seen = []

    def old_output_still_intact() -> None:
        seen.append(_snapshot(dest) == before)

    if fmt == "dicom":
        _FailingSlices(monkeypatch, ok=10**6, error=_disk_full(), check=old_output_still_intact)
    else:
        writer = nibabel.save if fmt == "nifti" else np.save

        def checking(*args, **kwargs):
            old_output_still_intact()
            return writer(*args, **kwargs)

        monkeypatch.setattr(nibabel if fmt == "nifti" else np, "save", checking)
    new = _volume(seed=2)
    _write(fmt, new, dest, overwrite=True)
    assert seen and all(seen)  # while the new output was written, the old one was untouched
    back = _read(dest)
    np.testing.assert_allclose(back.hu, new.hu, atol=0.5)
    assert _listing(tmp_path) == [NAMES[fmt]]  # no temporary or ".old" leftovers


# ------------------------------------------------------------------------ failures leave nothing
@pytest.mark.parametrize("fmt", FORMATS)
def test_disk_full_midway_leaves_no_partial_output(tmp_path, monkeypatch, fmt):
    source = _write("npy", _volume(), tmp_path / "input.npy")
    input_before = _snapshot(source)
    volume = _read(source)
    _inject(monkeypatch, fmt, _disk_full(), ok=3)
    with pytest.raises(CTWriteError, match="the disk is full") as info:
        _write(fmt, volume, tmp_path / NAMES[fmt])
    assert "Nothing was written" in str(info.value)
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    assert _listing(tmp_path) == ["input.npy"]  # no partial output, no temporary file or folder
    assert _snapshot(source) == input_before


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_injected_exception_midway_leaves_no_partial_output(tmp_path, monkeypatch, fmt):
    _inject(monkeypatch, fmt, RuntimeError("injected failure"), ok=1)
    with pytest.raises(CTWriteError, match="RuntimeError: injected failure") as info:
        _write(fmt, _volume(), tmp_path / NAMES[fmt])
    assert isinstance(info.value.__cause__, RuntimeError)
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_interrupted_write_leaves_no_partial_output_and_stays_an_interruption(tmp_path, monkeypatch, fmt):
    dest = _write(fmt, _volume(seed=1), tmp_path / NAMES[fmt])
    before = _snapshot(dest)
    _inject(monkeypatch, fmt, KeyboardInterrupt(), ok=2)
    with pytest.raises(KeyboardInterrupt):
        _write(fmt, _volume(seed=2), dest, overwrite=True)
    assert _snapshot(dest) == before
    assert _listing(tmp_path) == [NAMES[fmt]]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_failed_overwrite_of_the_input_itself_keeps_the_input(tmp_path, monkeypatch, fmt):
    """Saving the result over the file it was read from, and failing half-way, loses nothing."""
    source = _write(fmt, _volume(seed=3), tmp_path / NAMES[fmt])
    before = _snapshot(source)
    original = _read(source)
    denoised = CTVolume(hu=original.hu + 1, spacing=original.spacing, origin=original.origin,
                        direction=original.direction, metadata=original.metadata)
    _inject(monkeypatch, fmt, _disk_full(), ok=2)
    with pytest.raises(CTWriteError, match=f"disk is full.*previous {NAMES[fmt]} is unchanged"):
        _write(fmt, denoised, source, overwrite=True)
    assert _snapshot(source) == before
    assert _listing(tmp_path) == [NAMES[fmt]]
    monkeypatch.undo()
    np.testing.assert_array_equal(_read(source).hu, original.hu)


def test_a_failed_rename_restores_the_old_series(tmp_path, monkeypatch):
    dest = write_dicom_series(_volume(seed=1), tmp_path / "series")
    before = _snapshot(dest)
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).name.startswith(".series.tmp-"):
            raise _disk_full()
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(CTWriteError, match="disk is full"):
        write_dicom_series(_volume(seed=2), dest, overwrite=True)
    assert _snapshot(dest) == before
    assert _listing(tmp_path) == ["series"]


def test_the_real_input_series_is_untouched_by_a_failed_export(dicom_series_dir, tmp_path, monkeypatch):
    before = _snapshot(dicom_series_dir)
    volume = read_ct(dicom_series_dir)
    small = CTVolume(hu=volume.hu[:4, ::8, ::8].copy(), spacing=(2.0, 7.8125, 7.8125), origin=volume.origin,
                     direction=volume.direction, metadata=volume.metadata)
    _FailingSlices(monkeypatch, ok=2, error=_disk_full())
    with pytest.raises(CTWriteError, match="disk is full"):
        write_dicom_series(small, tmp_path / "denoised", reference=volume)
    assert _snapshot(dicom_series_dir) == before
    assert _listing(tmp_path) == []


# ---------------------------------------------------------------------------------- durability
@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="maps descriptors to paths through /proc")
@pytest.mark.parametrize("fmt", FORMATS)
def test_output_is_flushed_to_disk_before_it_is_renamed_into_place(tmp_path, monkeypatch, fmt):
    flushed: set[str] = set()
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        flushed.add(os.path.realpath(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def replace(src, dst):
        src = Path(src)
        files = [src] if src.is_file() else [*src.iterdir(), src]
        assert all(str(f.resolve()) in flushed for f in files), f"{src} renamed before being flushed"
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = _write(fmt, _volume(), tmp_path / NAMES[fmt])
    assert path.exists() and str(tmp_path.resolve()) in flushed  # the rename itself was flushed too


def test_an_impossible_destination_is_a_write_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for fmt in FORMATS:
        with pytest.raises(CTWriteError, match="Cannot create the folder"):
            _write(fmt, _volume(), blocker / "sub" / NAMES[fmt])
    assert _listing(tmp_path) == ["a_file"]


# ------------------------------------------------------------------ the one atomic replace
def _folder(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "a.txt").write_text(text)
    return path


def test_replace_atomically_puts_files_and_folders_in_place(tmp_path):
    """The helper behind the CT writers, checkpoints and training run folders."""
    from napari_langmamba.io._files import replace_atomically

    (tmp_path / "new.txt").write_text("new")
    (tmp_path / "out.txt").write_text("old")
    replace_atomically(tmp_path / "new.txt", tmp_path / "out.txt")  # a file over a file: one rename
    assert (tmp_path / "out.txt").read_text() == "new"

    replace_atomically(_folder(tmp_path / "staged", "one"), tmp_path / "dir")  # nothing there yet
    replace_atomically(_folder(tmp_path / "staged", "two"), tmp_path / "dir")  # over a folder
    assert (tmp_path / "dir" / "a.txt").read_text() == "two"
    replace_atomically(_folder(tmp_path / "staged", "three"), tmp_path / "out.txt")  # a folder over a file
    assert (tmp_path / "out.txt" / "a.txt").read_text() == "three"
    # a fixed aside name (training's .last.old, for crash recovery): a leftover there is cleared first
    _folder(tmp_path / ".dir.old", "leftover")
    replace_atomically(_folder(tmp_path / "staged", "four"), tmp_path / "dir", aside=tmp_path / ".dir.old")
    assert (tmp_path / "dir" / "a.txt").read_text() == "four"
    assert _listing(tmp_path) == ["dir", "out.txt"]


@pytest.mark.parametrize("error", [_disk_full(), KeyboardInterrupt()], ids=["disk full", "interrupted"])
def test_replace_atomically_puts_the_old_folder_back_when_the_rename_fails(tmp_path, monkeypatch, error):
    from napari_langmamba.io._files import replace_atomically

    dest = _folder(tmp_path / "dir", "old")
    staged = _folder(tmp_path / "staged", "new")
    real_replace = os.replace

    def replace(src, dst):
        if Path(src) == staged:
            raise error
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(type(error)):
        replace_atomically(staged, dest)
    assert (dest / "a.txt").read_text() == "old"
    assert _listing(tmp_path) == ["dir", "staged"]  # the old copy is back; the caller removes its staging
