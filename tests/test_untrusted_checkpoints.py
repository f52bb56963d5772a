"""Untrusted checkpoints: never run code, refuse unsafe archives, validate before building anything."""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save, save_file

import napari_langmamba.checkpoint as checkpoint_module
from napari_langmamba.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    build_model,
    load_checkpoint,
    save_checkpoint,
)
from napari_langmamba.errors import CheckpointError
from napari_langmamba.models.codebook import load_codebook
from napari_langmamba.models.langae import LangAE, LangAEConfig

torch.set_num_threads(1)
SPEC = "random:64x16"


class _TouchOnUnpickle:
    """Unpickling this creates ``marker``: the proof that code from a file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def _evil_pickle(marker: Path) -> bytes:
    return pickle.dumps({"state_dict": _TouchOnUnpickle(marker)}, protocol=2)


def _model(seed: int = 0) -> LangAE:
    torch.manual_seed(seed)
    return LangAE(LangAEConfig.preset("tiny", codebook_dim=16), codebook=load_codebook(SPEC))


@pytest.fixture(scope="module")
def model() -> LangAE:
    return _model()


@pytest.fixture
def ckpt(tmp_path, model) -> Path:
    return save_checkpoint(tmp_path / "ckpt", model, kind="langae")


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a planted pickle was unpickled"


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any pickle or torch.load call during the test fails it (loading must never need one)."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the checkpoint loader tried to unpickle")

    class ForbiddenUnpickler:
        def __init__(self, *args, **kwargs):
            forbidden()

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", ForbiddenUnpickler)
    monkeypatch.setattr(torch, "load", forbidden)


def _zip(path: Path, entries: dict[str, bytes], compress: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compress) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def _entries(folder: Path) -> dict[str, bytes]:
    return {CONFIG_NAME: (folder / CONFIG_NAME).read_bytes(), WEIGHTS_NAME: (folder / WEIGHTS_NAME).read_bytes()}


def _edit_config(path: Path, change) -> None:
    doc = json.loads((path / CONFIG_NAME).read_text())
    change(doc)
    (path / CONFIG_NAME).write_text(json.dumps(doc))


def _safetensors_parts(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _safetensors_bytes(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def _same_weights(loaded: dict, model: torch.nn.Module) -> bool:
    return all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------- no code runs
def test_pickle_planted_as_the_weights_is_never_unpickled(ckpt, marker, no_unpickling, tmp_path):
    (ckpt / WEIGHTS_NAME).write_bytes(_evil_pickle(marker))
    with pytest.raises(CheckpointError, match=WEIGHTS_NAME):
        load_checkpoint(ckpt)
    # torch.save's zip-of-pickles format, renamed, is refused the same way
    torch_file = tmp_path / "torch.pt"
    torch.save({"w": _TouchOnUnpickle(marker)}, torch_file)
    (ckpt / WEIGHTS_NAME).write_bytes(torch_file.read_bytes())
    with pytest.raises(CheckpointError):
        load_checkpoint(ckpt)


def test_pickles_next_to_the_weights_are_ignored(ckpt, model, marker, no_unpickling):
    for name in ("pytorch_model.bin", "model.pt", "optimizer.pt", "model.safetensors.pkl"):
        (ckpt / name).write_bytes(_evil_pickle(marker))
    loaded = load_checkpoint(ckpt)
    assert _same_weights(loaded.state_dict, model)
    built = build_model(loaded)
    assert isinstance(built, LangAE)


def test_zip_with_a_planted_pickle_is_refused_and_nothing_is_extracted(ckpt, model, marker, no_unpickling,
                                                                        tmp_path):
    entries = _entries(ckpt)
    evil = _zip(tmp_path / "evil.zip", {CONFIG_NAME: entries[CONFIG_NAME], WEIGHTS_NAME: _evil_pickle(marker)})
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(CheckpointError, match=WEIGHTS_NAME):
        load_checkpoint(evil)
    # extra pickles inside an otherwise valid archive are never opened
    extra = _zip(tmp_path / "extra.zip", {**entries, "pytorch_model.bin": _evil_pickle(marker),
                                         "data.pkl": _evil_pickle(marker)})
    assert _same_weights(load_checkpoint(extra).state_dict, model)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "extra.zip"])  # nothing extracted


# ------------------------------------------------------------------------------- archive safety
@pytest.mark.parametrize("bad_name", ["..\\config.json", "C:/weights/model.safetensors", "C:\\evil.txt",
                                      "/abs/x", "ok/../../x", "\\\\server\\share\\x"])
def test_zip_entries_escaping_the_archive_are_refused(ckpt, tmp_path, bad_name):
    archive = _zip(tmp_path / "a.zip", {**_entries(ckpt), bad_name: b"x"})
    with pytest.raises(CheckpointError, match="unsafe entry"):
        load_checkpoint(archive)


def test_duplicate_entries_are_refused(ckpt, tmp_path):
    entries = _entries(ckpt)
    archive = tmp_path / "dup.zip"
    with zipfile.ZipFile(archive, "w") as zf, pytest.warns(UserWarning, match="Duplicate name"):
        zf.writestr(CONFIG_NAME, entries[CONFIG_NAME])
        zf.writestr(WEIGHTS_NAME, entries[WEIGHTS_NAME])
        zf.writestr(CONFIG_NAME, b'{"kind": "redcnn"}')
    with pytest.raises(CheckpointError, match="exactly one config.json"):
        load_checkpoint(archive)


def test_zip_bombs_are_refused_before_inflating(ckpt, tmp_path):
    entries = _entries(ckpt)
    # 64 MB of zeros as the weights: inflates about 1000 times
    bomb = _zip(tmp_path / "bomb.zip", {CONFIG_NAME: entries[CONFIG_NAME], WEIGHTS_NAME: bytes(64 * 2**20)},
                compress=zipfile.ZIP_DEFLATED)
    with pytest.raises(CheckpointError, match="zip bomb"):
        load_checkpoint(bomb)
    # real weights with 40 MB of zeros behind them: refused from the header, the data is never read
    tail = _zip(tmp_path / "tail.zip", {CONFIG_NAME: entries[CONFIG_NAME],
                                        WEIGHTS_NAME: entries[WEIGHTS_NAME] + bytes(40 * 2**20)},
                compress=zipfile.ZIP_DEFLATED)
    with pytest.raises(CheckpointError, match="zip bomb|bytes after the last tensor"):
        load_checkpoint(tail)
    config_bomb = _zip(tmp_path / "cbomb.zip", {CONFIG_NAME: entries[CONFIG_NAME] + b" " * (8 * 2**20),
                                                WEIGHTS_NAME: entries[WEIGHTS_NAME]}, compress=zipfile.ZIP_DEFLATED)
    with pytest.raises(CheckpointError, match="zip bomb|limit"):
        load_checkpoint(config_bomb)


def test_a_member_lying_about_its_size_is_refused(ckpt, tmp_path):
    archive = _zip(tmp_path / "lie.zip", _entries(ckpt))
    data = bytearray(archive.read_bytes())
    start = data.find(b"PK\x01\x02")
    # the first central-directory entry is config.json: claim it is 10 bytes long
    assert data[start + 46:start + 46 + len(CONFIG_NAME)] == CONFIG_NAME.encode()
    struct.pack_into("<I", data, start + 24, 10)
    archive.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        load_checkpoint(archive)


def test_oversized_members_are_refused(ckpt, tmp_path, monkeypatch):
    entries = _entries(ckpt)
    big_config = _zip(tmp_path / "big.zip", {CONFIG_NAME: entries[CONFIG_NAME] + b" " * (5 * 2**20),
                                             WEIGHTS_NAME: entries[WEIGHTS_NAME]})
    with pytest.raises(CheckpointError, match="more than the limit"):
        load_checkpoint(big_config)
    monkeypatch.setattr(checkpoint_module, "MAX_WEIGHTS_BYTES", 1000)
    with pytest.raises(CheckpointError, match="more than 1000"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("damage", ["encrypted", "unknown_method", "corrupt_deflate"])
def test_unreadable_archive_members_are_a_checkpoint_error(ckpt, tmp_path, damage):
    archive = _zip(tmp_path / "x.zip", _entries(ckpt), compress=zipfile.ZIP_DEFLATED)
    data = bytearray(archive.read_bytes())
    local, central = data.find(b"PK\x03\x04"), data.find(b"PK\x01\x02")
    if damage == "encrypted":  # general-purpose flag bit 0 in both headers
        data[local + 6] |= 1
        data[central + 8] |= 1
    elif damage == "unknown_method":
        struct.pack_into("<H", data, local + 8, 99)
        struct.pack_into("<H", data, central + 10, 99)
    else:
        name_len, extra_len = struct.unpack_from("<HH", data, local + 26)
        body = local + 30 + name_len + extra_len
        data[body:body + 8] = b"\xff" * 8
    archive.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        load_checkpoint(archive)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes need a POSIX system")
def test_special_files_are_refused_without_blocking(ckpt, tmp_path):
    (ckpt / WEIGHTS_NAME).unlink()
    os.mkfifo(ckpt / WEIGHTS_NAME)
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(ckpt)
    link = tmp_path / "zeros.zip"
    link.symlink_to("/dev/zero")
    with pytest.raises(CheckpointError, match="neither"):
        load_checkpoint(link)


# ----------------------------------------------------------------------------- config.json schema
@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(kind=5), "kind"),
        (lambda d: d.update(config=[1, 2]), "config must be an object"),
        (lambda d: d.update(format_version="1"), "format_version"),
        (lambda d: d.update(format_version=True), "format_version"),
        (lambda d: d.update(format_version=0), "format_version"),
        (lambda d: d.update(normalization="HU"), "normalization"),
        (lambda d: d.update(storage_dtype=16), "storage_dtype"),
        (lambda d: d["codebook"].update(sha256="abc"), "sha256"),
        (lambda d: d["codebook"].update(n="64"), "codebook n"),
        (lambda d: d["codebook"].update(n=10**9, d=10**9), "larger than any"),
        (lambda d: d.update(training=[1, 2]), "training"),
        (lambda d: d.update(package_version=1), "package_version"),
        (lambda d: d.update(exec="import os"), "unknown keys"),
        (lambda d: d.pop("kind"), "missing keys"),
        (lambda d: d.pop("config"), "missing keys"),
        (lambda d: d["config"].update(ch="64"), "ch"),
        (lambda d: d["config"].update(ch_mult="abcde"), "cannot build"),
        (lambda d: d["config"].update(dropout="x"), "cannot build"),
        (lambda d: d["config"].update(ch_mult=[1, 1, 2]), "channel multipliers"),
        (lambda d: d["config"].pop("z_channels"), "z_channels|Incomplete"),
    ],
)
def test_malformed_config_json_is_refused_with_the_problem_named(ckpt, change, message):
    _edit_config(ckpt, change)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(ckpt)


def test_config_json_that_is_not_an_object_or_too_deep_is_refused(ckpt):
    (ckpt / CONFIG_NAME).write_text("[1, 2, 3]")
    with pytest.raises(CheckpointError, match="JSON object"):
        load_checkpoint(ckpt)
    (ckpt / CONFIG_NAME).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(ckpt)


def test_a_config_describing_a_huge_architecture_is_stopped_while_building(ckpt, monkeypatch):
    _edit_config(ckpt, lambda d: d["config"].update(num_res_blocks=1_000_000))
    with pytest.raises(CheckpointError, match="more than .* tensors"):
        load_checkpoint(ckpt)
    # wide layers: built on the meta device only, then refused on shapes (nothing allocated)
    _edit_config(ckpt, lambda d: d["config"].update(num_res_blocks=1, ch=1_000_000))
    with pytest.raises(CheckpointError, match="has shape"):
        load_checkpoint(ckpt)


def test_a_codebook_spec_asking_for_a_huge_table_is_not_generated(ckpt, monkeypatch):
    from napari_langmamba.models import codebook as codebook_module

    def never(*args, **kwargs):
        raise AssertionError("the codebook was generated")

    monkeypatch.setattr(codebook_module, "_random_table", never)
    _edit_config(ckpt, lambda d: d["codebook"].update(source="random:100000000x100000"))
    with pytest.raises(CheckpointError, match="Codebook mismatch"):
        load_checkpoint(ckpt)


# ------------------------------------------------------------------------- tensors vs architecture
def test_weights_are_checked_against_the_architecture_before_reading_them(ckpt, monkeypatch):
    import safetensors.torch

    def never(*args, **kwargs):
        raise AssertionError("tensor data was read before the header was validated")

    tensors = load_file(str(ckpt / WEIGHTS_NAME))
    tensors["quant_conv.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(ckpt / WEIGHTS_NAME))
    monkeypatch.setattr(safetensors.torch, "load_file", never)
    monkeypatch.setattr(safetensors.torch, "load", never)
    with pytest.raises(CheckpointError, match=r"'quant_conv.weight' has shape \[3, 3\], expected \[16, 16, 1, 1\]"):
        load_checkpoint(ckpt)


def test_the_expected_architecture_is_built_on_the_meta_device_only(ckpt, monkeypatch):
    import napari_langmamba.models as models

    devices = []
    real = models.build_model_from_config

    def spy(kind, config, *, codebook=None):
        built = real(kind, config, codebook=codebook)
        devices.extend({p.device.type for p in built.parameters()})
        return built

    monkeypatch.setattr(models, "build_model_from_config", spy)
    load_checkpoint(ckpt)
    assert set(devices) == {"meta"}


def test_weights_of_another_preset_are_refused(tmp_path, model):
    lite = LangAEConfig.preset("lite", codebook_dim=16).to_dict()
    path = save_checkpoint(tmp_path / "c", model, kind="langae")
    _edit_config(path, lambda d: d.update(config=lite))
    with pytest.raises(CheckpointError, match="has shape .* expected"):
        load_checkpoint(path)


def test_missing_or_unexpected_tensors_are_named(ckpt):
    original = load_file(str(ckpt / WEIGHTS_NAME))
    fewer = dict(original)
    del fewer["decoder.conv_out.weight"]
    save_file(fewer, str(ckpt / WEIGHTS_NAME))
    with pytest.raises(CheckpointError, match=r"missing 1 tensors \['decoder.conv_out.weight'\], unexpected 0"):
        load_checkpoint(ckpt)
    more = {**original, "backdoor.weight": torch.zeros(4)}
    save_file(more, str(ckpt / WEIGHTS_NAME))
    with pytest.raises(CheckpointError, match=r"missing 0 tensors \[\], unexpected 1 \['backdoor.weight'\]"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(ckpt, value):
    tensors = load_file(str(ckpt / WEIGHTS_NAME))
    tensors["encoder.conv_in.weight"].view(-1)[3] = value
    save_file(tensors, str(ckpt / WEIGHTS_NAME))
    with pytest.raises(CheckpointError, match="encoder.conv_in.weight.*NaN or inf"):
        load_checkpoint(ckpt)


def test_integer_tensor_in_a_float_slot_is_refused(ckpt):
    tensors = load_file(str(ckpt / WEIGHTS_NAME))
    tensors["quant_conv.bias"] = tensors["quant_conv.bias"].to(torch.int32)
    save_file(tensors, str(ckpt / WEIGHTS_NAME))
    with pytest.raises(CheckpointError, match="quant_conv.bias.*stored as torch.int32"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.99])
def test_truncated_weights_are_refused(ckpt, keep):
    data = (ckpt / WEIGHTS_NAME).read_bytes()
    (ckpt / WEIGHTS_NAME).write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=WEIGHTS_NAME):
        load_checkpoint(ckpt)


def _rewrite_header(ckpt: Path, change) -> None:
    header, body = _safetensors_parts((ckpt / WEIGHTS_NAME).read_bytes())
    body = change(header, body)
    (ckpt / WEIGHTS_NAME).write_bytes(_safetensors_bytes(header, body))


def _first(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


@pytest.mark.parametrize(
    "damage, message",
    [
        ("huge_shape", "points outside the file"),
        ("offsets_past_end", "points outside the file"),
        ("negative_offset", "points outside the file"),
        ("bool_shape", "invalid shape"),
        ("unknown_dtype", "unsupported dtype"),
        ("overlap", "overlap or leave a gap"),
        ("trailing_bytes", "bytes after the last tensor"),
        ("entry_not_a_dict", "malformed header entry"),
    ],
)
def test_safetensors_headers_that_lie_are_refused(ckpt, damage, message):
    def change(header: dict, body: bytes) -> bytes:
        name = _first(header)
        info = header[name]
        if damage == "huge_shape":
            info["shape"] = [2**40, 2**40]
        elif damage == "offsets_past_end":
            info["data_offsets"] = [0, 2**62]
        elif damage == "negative_offset":
            info["data_offsets"] = [-8, info["data_offsets"][1] - 8]
        elif damage == "bool_shape":
            info["shape"] = [True] * len(info["shape"])
        elif damage == "unknown_dtype":
            info["dtype"] = "F8_E4M3"
        elif damage == "overlap":
            other = next(k for k in header if k not in ("__metadata__", name)
                         and header[k]["dtype"] == info["dtype"] and header[k]["shape"] == info["shape"])
            header[other]["data_offsets"] = list(info["data_offsets"])
        elif damage == "trailing_bytes":
            return body + b"\0" * 64
        else:
            header[name] = [1, 2, 3]
        return body

    _rewrite_header(ckpt, change)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("length", [2**63, 2**40, 65 * 2**20])
def test_a_header_length_claiming_gigabytes_is_refused(ckpt, length):
    data = (ckpt / WEIGHTS_NAME).read_bytes()
    (ckpt / WEIGHTS_NAME).write_bytes(struct.pack("<Q", length) + data[8:])
    with pytest.raises(CheckpointError, match="invalid header length"):
        load_checkpoint(ckpt)


def test_a_safetensors_header_that_is_not_an_object_or_too_deep_is_refused(ckpt):
    (ckpt / WEIGHTS_NAME).write_bytes(_safetensors_bytes([1, 2, 3], b""))
    with pytest.raises(CheckpointError, match="malformed header"):
        load_checkpoint(ckpt)
    (ckpt / WEIGHTS_NAME).write_bytes(struct.pack("<Q", 200_000) + b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(CheckpointError, match="malformed header"):
        load_checkpoint(ckpt)


def test_a_valid_checkpoint_still_round_trips_after_all_checks(tmp_path, model):
    # the checks above must not reject what save_checkpoint writes (folder, zip, fp16)
    for name, dtype in (("a", None), ("b.zip", None), ("c", torch.float16)):
        path = save_checkpoint(tmp_path / name, model, kind="langae", dtype=dtype)
        loaded = load_checkpoint(path)
        expected = {k: (v.half().float() if dtype is not None else v) for k, v in model.state_dict().items()}
        assert all(torch.equal(loaded.state_dict[k], v) for k, v in expected.items())
    safetensors_bytes = save({"x": torch.zeros(2)})
    assert _safetensors_parts(safetensors_bytes)[0]["x"]["data_offsets"] == [0, 8]
