"""Checkpoints: a folder (or a .zip of it) with ``model.safetensors`` and ``config.json``.

``config.json`` holds::

    {
      "format_version": 1,
      "kind": "langae" | "seed" | "redcnn",
      "config": {...},                     # architecture incl. preset (see napari_langmamba.models)
      "normalization": {"hu_min": -1000.0, "hu_max": 2000.0},
      "codebook": {"source", "sha256", "n", "d"} | null,   # for models holding a codebook
      "storage_dtype": "float32" | "float16" | "bfloat16",
      "training": {...} | null, "metrics": {...} | null, "extra": {...} | null,
      "package_version": "0.1.0", "created": "2025-01-01T00:00:00+00:00"
    }

Weights are only ever read with safetensors (no pickle). Loading validates the JSON, every
tensor's name, shape and dtype against the architecture the config describes (before reading
the data), refuses NaN/inf weights, and refuses a codebook whose SHA-256 differs from the one
the model was trained with. Saving writes to a temporary sibling and renames it into place, so
a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import logging
import lzma
import math
import os
import re
import shutil
import struct
import tempfile
import threading
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from napari_langmamba.errors import CheckpointError, ConfigError, LangMambaError
from napari_langmamba.io._files import replace_atomically
from napari_langmamba.windowing import MODEL_NORMALIZATION, Normalization

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from napari_langmamba.models.codebook import Codebook

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "Checkpoint",
    "build_model",
    "load_checkpoint",
    "read_checkpoint_config",
    "save_checkpoint",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MAX_CONFIG_BYTES = 4 * 2**20
MAX_WEIGHTS_BYTES = 8 * 2**30
MAX_HEADER_BYTES = 64 * 2**20
MAX_ZIP_ENTRIES = 256
# A zip member inflating more than this many times its compressed size (above 1 MB) is a zip
# bomb, not weights: float weights barely compress.
MAX_ZIP_RATIO = 100
MIN_ZIP_BOMB_BYTES = 2**20
# Largest codebook a checkpoint may name (PubMedCLIP's is 49408 x 512, about 25 M entries).
MAX_CODEBOOK_ENTRIES = 2**28
_DOC_KEYS = ("format_version", "kind", "config", "normalization", "codebook", "storage_dtype", "training",
             "metrics", "extra", "package_version", "created")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_STORAGE_DTYPES = ("float32", "float16", "bfloat16")


def _torch_dtypes() -> dict[str, torch.dtype]:
    import torch

    return {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
        "U8": torch.uint8, "BOOL": torch.bool,
    }


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A validated checkpoint in memory.

    Attributes
    ----------
    kind
        ``"langae"``, ``"seed"`` or ``"redcnn"``.
    config
        The architecture config (input of :func:`napari_langmamba.models.build_model_from_config`).
    state_dict
        Weights as float32 (fp16 storage is cast back) CPU tensors.
    meta
        The whole ``config.json`` (normalisation, codebook, training, metrics, version, ...).
    path
        Where it was loaded from.
    codebook
        The verified codebook for kinds that need one, else ``None``.
    """

    kind: str
    config: dict
    state_dict: dict[str, Tensor]
    meta: dict
    path: Path | None = None
    codebook: Codebook | None = field(default=None)

    @property
    def normalization(self) -> Normalization:
        return Normalization.from_dict(self.meta["normalization"])


# ----------------------------------------------------------------------------------------- saving


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    kind: str,
    config: dict | None = None,
    extra: dict | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = True,
) -> Path:
    """Write ``model`` as a checkpoint folder (or a ``.zip`` when ``path`` ends with ``.zip``).

    Parameters
    ----------
    path
        Destination folder (or .zip file). An existing checkpoint there is replaced atomically
        when ``overwrite``; anything that is not a checkpoint is never replaced.
    model
        The model; models of kind ``"langae"`` must carry their ``codebook``.
    kind
        Registry kind (``"langae"``, ``"seed"``, ``"redcnn"``).
    config
        Architecture config; derived from ``model`` when omitted. It is checked to rebuild a
        model with exactly this state dict's names and shapes.
    extra
        Optional ``"training"`` (data summary, steps, ...), ``"metrics"``, ``"normalization"``
        (a dict or :class:`Normalization`); any other keys are stored under ``"extra"``.
        Everything must be JSON-serialisable.
    dtype
        Storage dtype of floating tensors: ``None``/``torch.float32``, ``torch.float16`` or
        ``torch.bfloat16`` (loaded back as float32).

    Returns
    -------
    Path
        The written checkpoint.
    """
    from napari_langmamba.models import model_config, needs_codebook

    path = Path(path)
    if config is None:
        config = model_config(kind, model)
    storage = _storage_name(dtype)
    codebook = None
    if needs_codebook(kind):
        codebook = getattr(model, "codebook", None)
        if codebook is None or not hasattr(codebook, "sha256"):
            raise CheckpointError(f"A {kind} model must carry its codebook (model.codebook) to be saved.")

    tensors = _storage_tensors(model, storage)
    expected = _expected_tensors(kind, config, codebook)
    _compare_names(expected, {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()},
                   what=f"the model does not match its {kind} config", storage=storage)

    text = _config_text(kind, config, codebook, storage, extra)

    from safetensors.torch import save as save_safetensors

    weights = save_safetensors(tensors, metadata={"format": "pt", "kind": kind})
    if path.suffix.lower() == ".zip":
        _write_zip_atomically(path, text, weights, overwrite=overwrite)
    else:
        _write_folder_atomically(path, text, weights, overwrite=overwrite)
    log.info("Saved %s checkpoint to %s (%d tensors, %s)", kind, path, len(tensors), storage)
    return path


def _storage_tensors(model: nn.Module, storage: str) -> dict[str, Tensor]:
    """The model's state dict on the CPU in the storage dtype, each tensor with its own storage.

    Raises CheckpointError for a weight that is not finite, or that overflows the storage dtype.
    """
    import torch

    tensors: dict[str, Tensor] = {}
    for name, value in model.state_dict().items():
        tensor = value.detach().to("cpu").contiguous()
        if tensor.is_floating_point():
            if not bool(torch.isfinite(tensor).all()):
                raise CheckpointError(f"Refusing to save: the weight {name!r} contains NaN or inf values.")
            if storage != "float32":
                tensor = tensor.to(getattr(torch, storage))
                if not bool(torch.isfinite(tensor).all()):
                    raise CheckpointError(
                        f"The weight {name!r} overflows {storage}; save it as float32 instead (dtype=None)."
                    )
        tensors[name] = tensor.clone()  # own storage: safetensors refuses shared tensors
    return tensors


def _config_text(kind: str, config: dict, codebook: Any, storage: str, extra: dict | None) -> str:
    """``config.json`` of a checkpoint, validated as :func:`load_checkpoint` will read it.

    ``extra`` as for :func:`save_checkpoint`. Raises ConfigError when it is not plain JSON.
    """
    from napari_langmamba import __version__

    extra = dict(extra or {})
    normalization = extra.pop("normalization", MODEL_NORMALIZATION)
    if isinstance(normalization, dict):
        normalization = Normalization.from_dict(normalization)
    if not isinstance(normalization, Normalization):
        raise ConfigError(f"extra['normalization'] must be a Normalization or a dict; got {normalization!r}.")
    doc = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "config": config,
        "normalization": normalization.to_dict(),
        "codebook": codebook.info() if codebook is not None else None,
        "storage_dtype": storage,
        "training": extra.pop("training", None),
        "metrics": extra.pop("metrics", None),
        "extra": extra or None,
        "package_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        text = json.dumps(doc, indent=2, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"Checkpoint metadata must be plain JSON (finite numbers, str, lists, dicts): {exc}") from exc
    _validate_doc(json.loads(text))
    return text


def _storage_name(dtype: Any) -> str:
    import torch

    if dtype is None or dtype == torch.float32:
        return "float32"
    if dtype == torch.float16:
        return "float16"
    if dtype == torch.bfloat16:
        return "bfloat16"
    raise ConfigError(f"Checkpoint storage dtype must be float32, float16 or bfloat16; got {dtype!r}.")


def _is_checkpoint_folder(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_NAME).is_file()


def _write_folder_atomically(path: Path, text: str, weights: bytes, *, overwrite: bool) -> None:
    if path.exists():
        if not overwrite:
            raise CheckpointError(f"{path} already exists; choose another name or allow overwriting.")
        if not _is_checkpoint_folder(path):
            raise CheckpointError(f"{path} exists and is not a checkpoint folder; refusing to replace it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        (tmp / WEIGHTS_NAME).write_bytes(weights)
        (tmp / CONFIG_NAME).write_text(text, encoding="utf-8")
        replace_atomically(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_zip_atomically(path: Path, text: str, weights: bytes, *, overwrite: bool) -> None:
    if path.exists() and (not overwrite or not path.is_file()):
        raise CheckpointError(f"{path} already exists; choose another name or allow overwriting.")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as raw, zipfile.ZipFile(raw, "w") as zf:
            zf.writestr(CONFIG_NAME, text, compress_type=zipfile.ZIP_DEFLATED)
            zf.writestr(WEIGHTS_NAME, weights, compress_type=zipfile.ZIP_STORED)
        replace_atomically(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


# ---------------------------------------------------------------------------------------- loading


def read_checkpoint_config(path: str | os.PathLike) -> dict:
    """The validated ``config.json`` of a checkpoint, without reading the weights."""
    with _open_checkpoint(Path(path)) as source:
        return _validate_doc(_parse_json(source.read_config()))


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and validate a checkpoint folder or .zip.

    Raises
    ------
    CheckpointError
        Missing files, unsafe zip entries, malformed JSON, tensors that do not match the
        architecture, NaN/inf weights, or a codebook different from the one trained with.
    """
    import torch

    path = Path(path)
    with _open_checkpoint(path) as source:
        doc = _validate_doc(_parse_json(source.read_config()))
        kind, config = doc["kind"], doc["config"]
        header, weights_size = source.read_header()
        stored = _check_header(header, weights_size)
        codebook = _verified_codebook(doc)
        # The architecture is built on the meta device (no memory), and a config describing far
        # more tensors than the weights file holds is stopped while it is being built.
        expected = _expected_tensors(kind, config, codebook, max_tensors=2 * len(stored) + 256)
        _compare_names(expected, stored, what=f"the weights do not match the {kind} architecture in config.json",
                       storage=doc["storage_dtype"])
        raw = source.read_tensors()
    state_dict: dict[str, Tensor] = {}
    for name, tensor in raw.items():
        want = expected[name][1]
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: the weight {name!r} contains NaN or inf values; the checkpoint is damaged.")
        state_dict[name] = tensor.to(want) if tensor.dtype != want else tensor
    return Checkpoint(kind=kind, config=config, state_dict=state_dict, meta=doc, path=path, codebook=codebook)


def build_model(checkpoint: Checkpoint, *, device: str | torch.device | None = None) -> nn.Module:
    """The model a checkpoint describes, weights loaded strictly, in eval mode."""
    from napari_langmamba.models import build_model_from_config

    try:
        model = build_model_from_config(checkpoint.kind, checkpoint.config, codebook=checkpoint.codebook)
    except ConfigError as exc:
        raise CheckpointError(f"The checkpoint's {checkpoint.kind} config cannot build a model: {exc}") from exc
    try:
        model.load_state_dict(checkpoint.state_dict, strict=True)
    except RuntimeError as exc:
        have = set(checkpoint.state_dict)
        want = set(model.state_dict())
        raise CheckpointError(
            f"The checkpoint's weights do not fit the {checkpoint.kind} model: missing {sorted(want - have)[:8]}, "
            f"unexpected {sorted(have - want)[:8]} ({exc})."
        ) from exc
    model.eval()
    if device is not None:
        model.to(device)
    return model


# What zipfile raises on a damaged, encrypted or exotic archive: a corrupt deflate stream
# (zlib.error), an encrypted member (RuntimeError), an unknown compression method
# (NotImplementedError), a corrupt LZMA stream, bad header fields (ValueError, EOFError).
_ARCHIVE_ERRORS = (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError, NotImplementedError,
                   zlib.error, lzma.LZMAError)


class _Source:
    """Reads the two files of a checkpoint from a folder or a zip archive, with size limits."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._zip: zipfile.ZipFile | None = None
        self._names: dict[str, str] = {}
        if path.is_dir():
            for name in (CONFIG_NAME, WEIGHTS_NAME):
                if not (path / name).is_file():
                    raise CheckpointError(
                        f"{path} is not a checkpoint folder: {name} is missing (expected {CONFIG_NAME} and "
                        f"{WEIGHTS_NAME})."
                    )
        elif path.is_file() and zipfile.is_zipfile(path):
            try:
                self._zip = zipfile.ZipFile(path)
                self._names = _zip_members(self._zip, path)
            except _ARCHIVE_ERRORS as exc:
                self.close()
                raise CheckpointError(f"{path} is a damaged zip archive ({exc}).") from exc
            except CheckpointError:
                self.close()
                raise
        elif path.exists():
            raise CheckpointError(f"{path} is neither a checkpoint folder nor a .zip of one.")
        else:
            raise CheckpointError(f"Checkpoint not found: {path}.")

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()

    def __enter__(self) -> _Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _size(self, name: str) -> int:
        if self._zip is not None:
            return self._zip.getinfo(self._names[name]).file_size
        return (self.path / name).stat().st_size

    def _read(self, name: str, limit: int, n: int | None = None) -> bytes:
        size = self._size(name)
        if size > limit:
            raise CheckpointError(f"{self.path}: {name} is {size} bytes, more than the limit of {limit}.")
        want = (size + 1) if n is None else min(n, size)  # one extra byte reveals a lying size
        try:
            if self._zip is not None:
                with self._zip.open(self._names[name]) as f:
                    data = f.read(want)
            else:
                with open(self.path / name, "rb") as f:
                    data = f.read(want)
        except _ARCHIVE_ERRORS as exc:
            raise CheckpointError(f"{self.path}: could not read {name} ({type(exc).__name__}: {exc}).") from exc
        if n is None and len(data) != size:
            raise CheckpointError(f"{self.path}: {name} is damaged (its size does not match).")
        return data

    def read_config(self) -> bytes:
        return self._read(CONFIG_NAME, MAX_CONFIG_BYTES)

    def read_header(self) -> tuple[dict, int]:
        size = self._size(WEIGHTS_NAME)
        if size > MAX_WEIGHTS_BYTES:
            raise CheckpointError(f"{self.path}: {WEIGHTS_NAME} is {size} bytes, more than {MAX_WEIGHTS_BYTES}.")
        if size < 8:
            raise CheckpointError(f"{self.path}: {WEIGHTS_NAME} is truncated.")
        (n,) = struct.unpack("<Q", self._read(WEIGHTS_NAME, MAX_WEIGHTS_BYTES, 8))
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(f"{self.path}: {WEIGHTS_NAME} has an invalid header length ({n}).")
        raw = self._read(WEIGHTS_NAME, MAX_WEIGHTS_BYTES, 8 + n)[8:]
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise CheckpointError(f"{self.path}: {WEIGHTS_NAME} has a malformed header ({exc}).") from exc
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: {WEIGHTS_NAME} has a malformed header.")
        return header, size - 8 - n

    def read_tensors(self) -> dict[str, Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load, load_file

        try:
            if self._zip is not None:
                return load(self._read(WEIGHTS_NAME, MAX_WEIGHTS_BYTES))
            return load_file(str(self.path / WEIGHTS_NAME))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{self.path}: could not read {WEIGHTS_NAME} ({exc}).") from exc


def _open_checkpoint(path: Path) -> _Source:
    return _Source(path)


def _zip_members(zf: zipfile.ZipFile, path: Path) -> dict[str, str]:
    """Map ``config.json``/``model.safetensors`` to their archive names, refusing unsafe archives."""
    infos = zf.infolist()
    if len(infos) > MAX_ZIP_ENTRIES:
        raise CheckpointError(f"{path}: the archive has {len(infos)} entries; a checkpoint has two.")
    found: dict[str, list[str]] = {CONFIG_NAME: [], WEIGHTS_NAME: []}
    for info in infos:
        name = info.filename
        pure = PurePosixPath(name.replace("\\", "/"))
        if name.startswith(("/", "\\")) or pure.is_absolute() or ".." in pure.parts or re.match(r"^[A-Za-z]:", name):
            raise CheckpointError(f"{path}: unsafe entry {name!r} in the archive (absolute path or '..'); refusing it.")
        if info.is_dir():
            continue
        if info.file_size > max(MIN_ZIP_BOMB_BYTES, MAX_ZIP_RATIO * info.compress_size):
            raise CheckpointError(
                f"{path}: the archive entry {name!r} inflates from {info.compress_size} to {info.file_size} bytes "
                f"(a zip bomb?); refusing it."
            )
        if pure.name in found and len(pure.parts) <= 2:
            found[pure.name].append(name)
    for key, names in found.items():
        if len(names) != 1:
            raise CheckpointError(
                f"{path}: expected exactly one {key} at the top of the archive (or in one folder); found {len(names)}."
            )
    if PurePosixPath(found[CONFIG_NAME][0]).parent != PurePosixPath(found[WEIGHTS_NAME][0]).parent:
        raise CheckpointError(f"{path}: {CONFIG_NAME} and {WEIGHTS_NAME} must sit in the same folder of the archive.")
    return {key: names[0] for key, names in found.items()}


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{CONFIG_NAME} is not valid JSON ({exc}).") from exc


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} in JSON")


def _validate_doc(doc: Any) -> dict:
    """Check the ``config.json`` schema; return it unchanged or raise CheckpointError."""
    from napari_langmamba.models import KINDS

    def fail(message: str) -> CheckpointError:
        return CheckpointError(f"Invalid {CONFIG_NAME}: {message}")

    if not isinstance(doc, dict):
        raise fail("the top level must be a JSON object.")
    required = ("format_version", "kind", "config", "normalization", "codebook", "storage_dtype")
    missing = [k for k in required if k not in doc]
    if missing:
        raise fail(f"missing keys {missing}.")
    unknown = sorted(set(doc) - set(_DOC_KEYS))
    if unknown:
        raise fail(f"unknown keys {unknown}; expected a subset of {list(_DOC_KEYS)}.")
    version = doc["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise fail(f"format_version must be a positive integer; got {version!r}.")
    if version > FORMAT_VERSION:
        raise fail(
            f"format_version {version} is newer than this napari-langmamba understands ({FORMAT_VERSION}); "
            f"update the package."
        )
    if doc["kind"] not in KINDS:
        raise fail(f"kind must be one of {list(KINDS)}; got {doc['kind']!r}.")
    if not isinstance(doc["config"], dict):
        raise fail("config must be an object.")
    try:
        Normalization.from_dict(doc["normalization"] if isinstance(doc["normalization"], dict) else {})
    except ConfigError as exc:
        raise fail(f"normalization: {exc}") from exc
    if doc["storage_dtype"] not in _STORAGE_DTYPES:
        raise fail(f"storage_dtype must be one of {list(_STORAGE_DTYPES)}; got {doc['storage_dtype']!r}.")
    codebook = doc["codebook"]
    if codebook is not None:
        if not isinstance(codebook, dict) or set(codebook) != {"source", "sha256", "n", "d"}:
            raise fail(f"codebook must be null or {{source, sha256, n, d}}; got {codebook!r}.")
        if not isinstance(codebook["source"], str) or not _SHA256_RE.match(str(codebook["sha256"])):
            raise fail("codebook needs a source string and a 64-hex-digit sha256.")
        for key in ("n", "d"):
            value = codebook[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise fail(f"codebook {key} must be a positive integer; got {value!r}.")
        if codebook["n"] * codebook["d"] > MAX_CODEBOOK_ENTRIES:
            raise fail(f"codebook {codebook['n']} x {codebook['d']} is larger than any language model's table.")
    for key in ("training", "metrics", "extra"):
        if doc.get(key) is not None and not isinstance(doc[key], dict):
            raise fail(f"{key} must be an object or null.")
    for key in ("package_version", "created"):
        if key in doc and not isinstance(doc[key], str):
            raise fail(f"{key} must be a string.")
    return doc


def _verified_codebook(doc: dict) -> Codebook | None:
    from napari_langmamba.models import needs_codebook
    from napari_langmamba.models.codebook import load_codebook

    if not needs_codebook(doc["kind"]):
        return None
    info = doc["codebook"]
    if info is None:
        raise CheckpointError(f"Invalid {CONFIG_NAME}: a {doc['kind']} checkpoint must name its codebook.")
    size = re.match(r"^\s*random:(\d+)x(\d+)", info["source"])
    if size is not None and (int(size.group(1)), int(size.group(2))) != (info["n"], info["d"]):
        # Checked before generating it: the spec alone could ask for any size.
        raise CheckpointError(
            f"Codebook mismatch: {CONFIG_NAME} names {info['source']!r} but records a {info['n']} x {info['d']} table."
        )
    try:
        codebook = load_codebook(info["source"])
    except LangMambaError as exc:
        raise CheckpointError(
            f"This {doc['kind']} checkpoint was trained with the codebook {info['source']!r}, which could not be "
            f"loaded here: {exc}"
        ) from exc
    if codebook.sha256 != info["sha256"] or (codebook.n, codebook.d) != (info["n"], info["d"]):
        raise CheckpointError(
            f"Codebook mismatch: this checkpoint was trained with {info['source']!r} "
            f"({info['n']} x {info['d']}, sha256 {info['sha256'][:12]}...), but {info['source']!r} here gives "
            f"{codebook.n} x {codebook.d}, sha256 {codebook.sha256[:12]}.... Its token ids would name the wrong "
            f"words; install the exact codebook the model was trained with."
        )
    return codebook


class _TooManyTensors(Exception):
    """Raised inside a model build that registers more tensors than allowed."""


@contextmanager
def _tensor_budget(limit: int | None) -> Iterator[None]:
    """Abort a model build (in this thread) once it registers more than ``limit`` parameters/buffers.

    An untrusted config can describe millions of layers; even on the meta device building them
    would take hours and gigabytes, so the build is stopped as soon as it outgrows the weights.
    """
    if limit is None:
        yield
        return
    from torch.nn.modules import module as torch_module

    thread = threading.get_ident()
    count = 0

    def hook(module: Any, name: str, value: Any) -> None:
        nonlocal count
        if value is not None and threading.get_ident() == thread:
            count += 1
            if count > limit:
                raise _TooManyTensors(count)

    handles = [torch_module.register_module_parameter_registration_hook(hook),
               torch_module.register_module_buffer_registration_hook(hook)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _expected_tensors(
    kind: str, config: dict, codebook: Codebook | None, *, max_tensors: int | None = None
) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Names, shapes and dtypes of the state dict the config describes (built on the meta device).

    Never allocates real weights: an untrusted config is only ever built on the meta device.
    """
    import torch

    from napari_langmamba.models import build_model_from_config

    try:
        with torch.device("meta"), _tensor_budget(max_tensors):
            model = build_model_from_config(kind, config, codebook=codebook)
    except _TooManyTensors as exc:
        raise CheckpointError(
            f"The {kind} config describes a model with more than {exc.args[0] - 1} tensors, far more than the "
            f"weights file holds; the config does not belong to these weights."
        ) from None
    except ConfigError as exc:
        raise CheckpointError(f"The {kind} config cannot build a model: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - an untrusted config can make any constructor fail
        raise CheckpointError(f"The {kind} config cannot build a model ({type(exc).__name__}: {exc}).") from exc
    return {name: (tuple(t.shape), t.dtype) for name, t in model.state_dict().items()}


def _check_header(header: dict, data_size: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Names, shapes and dtypes from a safetensors header, checking its offsets are consistent."""
    dtypes = _torch_dtypes()
    out: dict[str, tuple[tuple[int, ...], Any]] = {}
    extents: list[tuple[int, int]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise CheckpointError(f"{WEIGHTS_NAME}: tensor {name!r} has a malformed header entry {info!r}.")
        if info.get("dtype") not in dtypes:
            raise CheckpointError(f"{WEIGHTS_NAME}: tensor {name!r} has an unsupported dtype {info!r}.")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(type(s) is int and s >= 0 for s in shape)):
            raise CheckpointError(f"{WEIGHTS_NAME}: tensor {name!r} has an invalid shape {shape!r}.")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise CheckpointError(f"{WEIGHTS_NAME}: tensor {name!r} has invalid offsets {offsets!r}.")
        dtype = dtypes[info["dtype"]]
        nbytes = math.prod(shape) * dtype.itemsize
        if not (0 <= offsets[0] <= offsets[1] <= data_size and offsets[1] - offsets[0] == nbytes):
            raise CheckpointError(f"{WEIGHTS_NAME}: tensor {name!r} points outside the file; it is damaged.")
        out[name] = (tuple(shape), dtype)
        extents.append((offsets[0], offsets[1]))
    # The format's rule: tensors tile the data section exactly, with no gap, overlap or tail
    # (so nothing hidden rides along, and the file is no larger than its tensors).
    position = 0
    for start, end in sorted(extents):
        if start != position:
            raise CheckpointError(
                f"{WEIGHTS_NAME}: its tensors overlap or leave a gap at byte {position}; the file is damaged."
            )
        position = end
    if position != data_size:
        raise CheckpointError(
            f"{WEIGHTS_NAME}: {data_size - position} bytes after the last tensor; the file is damaged or not a "
            f"plain safetensors file."
        )
    return out


def _compare_names(
    expected: dict[str, tuple[tuple[int, ...], Any]],
    found: dict[str, tuple[tuple[int, ...], Any]],
    *,
    what: str,
    storage: str = "float32",
) -> None:
    import torch

    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{what}: missing {len(missing)} tensors {missing[:8]}, unexpected {len(unexpected)} {unexpected[:8]}."
        )
    allowed_float = {torch.float32, getattr(torch, storage)}
    for name, (shape, dtype) in expected.items():
        got_shape, got_dtype = found[name]
        if got_shape != shape:
            raise CheckpointError(f"{what}: {name!r} has shape {list(got_shape)}, expected {list(shape)}.")
        ok = got_dtype in allowed_float if dtype.is_floating_point else got_dtype == dtype
        if not ok:
            raise CheckpointError(f"{what}: {name!r} is stored as {got_dtype}, expected {dtype}.")
