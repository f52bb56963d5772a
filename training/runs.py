"""Run folders, ``metrics.jsonl``, crash-safe checkpoints, exact ``--resume`` and the training loop.

A run folder (``--output``) holds::

    config.json            the resolved configuration of the stage (written once, atomically)
    metrics.jsonl          one JSON object per line, appended as training goes (see below)
    last/                  newest checkpoint: the model checkpoint (checkpoint.save_checkpoint)
                           plus training_state.json + training_state.safetensors for --resume
    best/                  the model checkpoint with the best validation metric
    summary.json           written when the process ends (completed, stopped or failed)

``metrics.jsonl`` records (all have ``stage``, ``kind``, ``time`` (Unix seconds)):

- ``kind: "train"`` every ``--log-every`` steps: ``step``, ``epoch`` (1-based, in progress),
  ``losses`` (mean over the steps since the previous record, averaged over ranks), ``lr``,
  ``images_per_s``, ``eta_s``, ``total_steps``;
- ``kind: "epoch"`` at the end of every epoch: ``step``, ``epoch``, ``val`` (validation metrics);
- ``kind: "event"``: ``event`` is ``start``, ``resume``, ``checkpoint``, ``stopped``,
  ``nonfinite_loss`` or ``end`` (with ``status``), plus details.

A line is written with one ``write`` call and flushed; a reader (:func:`read_metrics`) never
trusts a last line without its newline, which is what a kill in the middle of a write leaves.

Checkpoints are built in a hidden staging folder and moved into place with renames, so ``last``
is always either the previous complete checkpoint or the new complete one; a save that fails
(disk full) removes its staging folder, and ``--resume`` drops any a kill left behind. At an
epoch end ``best`` is written before ``last``, so a ``last`` never refers to a missing ``best``.
The resume state is
safetensors + JSON (never pickle): optimizer, scheduler, scaler and auxiliary-module states,
the python/numpy/torch(/CUDA) RNG states of every rank, and the step, epoch and position in the
epoch's (seeded, reproducible) data order. On CPU with ``--workers 0`` (the default) a resumed
run is bit-identical to an uninterrupted one (given deterministic kernels); with data-loading
worker processes the random crops after a mid-epoch resume differ, because each worker draws them
from its own RNG. A run killed without warning (SIGKILL, power loss) resumes from its last
checkpoint; the records it logged after that checkpoint are dropped from ``metrics.jsonl`` and
logged again as training repeats those steps.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from napari_langmamba.errors import CheckpointError, ConfigError, LangMambaError
from napari_langmamba.io._files import replace_atomically
from training.distributed import (
    DistContext,
    ResumableBatchSampler,
    all_gather_objects,
    all_reduce_sum,
    barrier,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_FILE",
    "METRICS_FILE",
    "SUMMARY_FILE",
    "CheckpointSpec",
    "MetricsWriter",
    "NonFiniteLossError",
    "RunFolder",
    "StepOutput",
    "StopRequest",
    "TrainState",
    "Trainer",
    "atomic_write_text",
    "capture_rng_state",
    "load_training_state",
    "pack_state",
    "read_metrics",
    "restore_rng_state",
    "save_training_state",
    "seed_everything",
    "unpack_state",
]

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
LAST = "last"
BEST = "best"
STATE_JSON = "training_state.json"
STATE_TENSORS = "training_state.safetensors"
STATE_FORMAT = "napari-langmamba-training-state"
STATE_VERSION = 1


class NonFiniteLossError(LangMambaError):
    """The training loss became NaN or infinite; the run stopped without applying that step."""


# ----------------------------------------------------------------------------------------------
# small file helpers


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (never half-written)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        replace_atomically(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _json_safe(value: Any) -> Any:
    """Plain JSON (no NaN/Infinity tokens): non-finite floats become None, tensors numbers."""
    if isinstance(value, Tensor):
        value = value.detach().cpu().tolist() if value.numel() != 1 else value.detach().cpu().item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


# ----------------------------------------------------------------------------------------------
# metrics.jsonl


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All complete records of a ``metrics.jsonl``.

    A last line without its newline (a write cut short by a kill) is ignored, and so is any
    line that is not a JSON object (logged at WARNING). A missing file gives ``[]``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")
    lines = lines[:-1]  # the piece after the last newline is empty or torn: never trusted
    records: list[dict] = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            logger.warning("%s line %d is not valid JSON; skipped", path, number)
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            logger.warning("%s line %d is not a JSON object; skipped", path, number)
    return records


class MetricsWriter:
    """Append-only ``metrics.jsonl`` writer; one ``os.write`` per record (more only if the
    kernel accepts part of it).

    Opening repairs the file: a torn last line is cut off, and with ``keep_through_step`` the
    records of steps after that step (logged after the checkpoint a resumed run starts from,
    and about to be logged again) are dropped. A write that fails half-way (disk full) leaves a
    fragment; the next record starts on a new line, so the fragment is skipped by the readers
    and never glued onto a good record.
    """

    def __init__(self, path: str | os.PathLike, *, keep_through_step: int | None = None) -> None:
        self.path = Path(path)
        self._repair(keep_through_step)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._mid_line = False

    def _repair(self, keep_through_step: int | None) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        torn = bool(data) and not data.endswith(b"\n")
        if not torn and keep_through_step is None:
            return
        records = read_metrics(self.path)
        if keep_through_step is not None:
            records = [r for r in records if int(r.get("step", 0) or 0) <= keep_through_step]
        text = "".join(json.dumps(r) + "\n" for r in records)
        atomic_write_text(self.path, text)

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one record (non-finite numbers are written as null)."""
        line = (json.dumps(_json_safe(dict(record)), allow_nan=False) + "\n").encode("utf-8")
        view = memoryview(b"\n" + line if self._mid_line else line)
        self._mid_line = True  # until the newline is out
        while view:
            written = os.write(self._fd, view)
            if written <= 0:
                raise OSError(errno.EIO, f"could not append to {self.path}")
            view = view[written:]
        self._mid_line = False

    def sync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------
# state (de)serialisation without pickle


def pack_state(obj: Any, prefix: str = "") -> tuple[Any, dict[str, Tensor]]:
    """Split a nested state (dicts, lists, tuples, tensors, arrays, numbers) into JSON + tensors.

    Tensors are replaced by ``{"__tensor__": key}`` and returned in a flat dict for safetensors;
    tuples, non-string dict keys, numpy arrays, bytes and non-finite floats get small tagged
    objects so that :func:`unpack_state` rebuilds exactly the same structure.
    """
    tensors: dict[str, Tensor] = {}

    def enc(x: Any, path: str) -> Any:
        if isinstance(x, Tensor):
            key = path or "tensor"
            tensors[key] = x.detach().to("cpu").contiguous().clone()
            return {"__tensor__": key}
        if isinstance(x, np.ndarray):
            if x.dtype == object:
                raise TypeError(f"object arrays cannot be stored ({path})")
            return {"__ndarray__": x.ravel().tolist(), "dtype": x.dtype.str, "shape": list(x.shape)}
        if isinstance(x, np.generic):
            return enc(x.item(), path)
        if x is None or isinstance(x, (bool, int, str)):
            return x
        if isinstance(x, float):
            return x if math.isfinite(x) else {"__float__": repr(x)}
        if isinstance(x, bytes):
            return {"__bytes__": x.hex()}
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v, f"{path}.{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, f"{path}.{i}") for i, v in enumerate(x)]
        if isinstance(x, Mapping):
            if all(isinstance(k, str) and not k.startswith("__") for k in x):
                return {k: enc(v, f"{path}.{k}" if path else k) for k, v in x.items()}
            return {"__items__": [[enc(k, f"{path}.k{i}"), enc(v, f"{path}.{i}")]
                                  for i, (k, v) in enumerate(x.items())]}
        if isinstance(x, torch.dtype):
            return {"__dtype__": str(x).removeprefix("torch.")}
        raise TypeError(f"cannot store a {type(x).__name__} in the training state ({path or 'root'})")

    return enc(obj, prefix), tensors


def unpack_state(packed: Any, tensors: Mapping[str, Tensor]) -> Any:
    """Inverse of :func:`pack_state`; raises :class:`CheckpointError` on malformed input."""

    def dec(x: Any) -> Any:
        if isinstance(x, list):
            return [dec(v) for v in x]
        if not isinstance(x, dict):
            return x
        if "__tensor__" in x:
            key = x["__tensor__"]
            if key not in tensors:
                raise CheckpointError(f"the training state refers to a tensor {key!r} that is not stored")
            return tensors[key]
        if "__ndarray__" in x:
            return np.asarray(x["__ndarray__"], dtype=np.dtype(x["dtype"])).reshape(x["shape"])
        if "__float__" in x:
            return float(x["__float__"])
        if "__bytes__" in x:
            return bytes.fromhex(x["__bytes__"])
        if "__tuple__" in x:
            return tuple(dec(v) for v in x["__tuple__"])
        if "__items__" in x:
            return {dec(k): dec(v) for k, v in x["__items__"]}
        if "__dtype__" in x:
            dtype = getattr(torch, str(x["__dtype__"]), None)
            if not isinstance(dtype, torch.dtype):
                raise CheckpointError(f"unknown dtype {x['__dtype__']!r} in the training state")
            return dtype
        return {k: dec(v) for k, v in x.items()}

    try:
        return dec(packed)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"The training state is malformed ({exc}).") from exc


# ----------------------------------------------------------------------------------------------
# RNG


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict:
    """The python, numpy, torch and (when initialised) CUDA RNG states of this process."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Put back a state from :func:`capture_rng_state`."""
    try:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8))
        if "cuda" in state and torch.cuda.is_available():
            cuda_states = list(state["cuda"])
            if len(cuda_states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all([torch.as_tensor(s, dtype=torch.uint8) for s in cuda_states])
            else:
                logger.warning("CUDA RNG states of %d devices saved, %d present; not restored",
                               len(cuda_states), torch.cuda.device_count())
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"The RNG state in the training state is malformed ({exc}).") from exc


# ----------------------------------------------------------------------------------------------
# training state


@dataclass
class TrainState:
    """Where training is: optimizer steps done, epochs finished, batches done in this epoch."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_value: float | None = None
    best_step: int | None = None
    best_metrics: dict = field(default_factory=dict)
    last_val: dict = field(default_factory=dict)
    train_seconds: float = 0.0

    def to_dict(self) -> dict:
        return _json_safe(asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainState:
        try:
            return cls(
                step=int(data["step"]),
                epoch=int(data["epoch"]),
                batch_in_epoch=int(data["batch_in_epoch"]),
                best_value=None if data.get("best_value") is None else float(data["best_value"]),
                best_step=None if data.get("best_step") is None else int(data["best_step"]),
                best_metrics=dict(data.get("best_metrics") or {}),
                last_val=dict(data.get("last_val") or {}),
                train_seconds=float(data.get("train_seconds") or 0.0),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"The training state's progress record is malformed ({exc}).") from exc


def save_training_state(
    folder: str | os.PathLike,
    *,
    stage: str,
    state: TrainState,
    objects: Mapping[str, Any],
    rng: list[dict],
    world_size: int,
) -> None:
    """Write ``training_state.json`` + ``training_state.safetensors`` into ``folder``.

    ``objects`` maps names to objects with ``state_dict()`` (optimizers, schedulers, grad
    scalers, auxiliary modules such as the GAN discriminator); ``rng`` holds one
    :func:`capture_rng_state` per rank.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    tree = {name: obj.state_dict() for name, obj in objects.items()}
    packed, tensors = pack_state({"objects": tree, "rng": rng})
    header = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "stage": stage,
        "world_size": int(world_size),
        "progress": state.to_dict(),
        "state": packed,
    }
    save_file(tensors, str(folder / STATE_TENSORS), metadata={"format": STATE_FORMAT})
    (folder / STATE_JSON).write_text(json.dumps(header), encoding="utf-8")


def load_training_state(folder: str | os.PathLike, *, stage: str) -> tuple[TrainState, dict, list[dict], int]:
    """Read a training state written by :func:`save_training_state`.

    Returns ``(progress, object_states, rng_per_rank, world_size)``. Only safetensors and JSON
    are read: nothing in the folder can execute code.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    json_path, tensor_path = folder / STATE_JSON, folder / STATE_TENSORS
    if not json_path.is_file() or not tensor_path.is_file():
        raise CheckpointError(
            f"{folder} holds no training state ({STATE_JSON} and {STATE_TENSORS}); it cannot be resumed. "
            "Only the 'last' checkpoint of a run folder can."
        )
    try:
        header = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{json_path} is not valid JSON ({exc}).") from exc
    if not isinstance(header, dict) or header.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{json_path} is not a napari-langmamba training state.")
    if header.get("version") != STATE_VERSION:
        raise CheckpointError(
            f"{json_path} has training-state version {header.get('version')!r}; this version reads "
            f"{STATE_VERSION}."
        )
    if header.get("stage") != stage:
        raise CheckpointError(
            f"{folder} is a checkpoint of stage {header.get('stage')!r}, not {stage!r}; "
            "resume it with the stage that wrote it."
        )
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{tensor_path} is not a readable safetensors file ({exc}).") from exc
    body = unpack_state(header.get("state"), tensors)
    if not isinstance(body, dict) or not isinstance(body.get("objects"), dict) or not isinstance(body.get("rng"), list):
        raise CheckpointError(f"{json_path} lacks the optimizer/RNG sections.")
    progress = TrainState.from_dict(header.get("progress") or {})
    return progress, body["objects"], body["rng"], int(header.get("world_size", 1))


# ----------------------------------------------------------------------------------------------
# run folder


def _swap_into_place(staging: Path, final: Path) -> None:
    """Replace folder ``final`` by ``staging`` with renames; a crash leaves one complete copy.

    The previous copy waits at the fixed name ``.<final>.old`` until the new one is in place, so
    :meth:`RunFolder.recover` finds it after a crash between the two renames.
    """
    replace_atomically(staging, final, aside=final.with_name(f".{final.name}.old"))


class RunFolder:
    """The output folder of one training stage (see the module docstring for its layout)."""

    def __init__(self, path: str | os.PathLike, *, stage: str, is_main: bool = True) -> None:
        self.path = Path(path)
        self.stage = stage
        self.is_main = is_main

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def last_dir(self) -> Path:
        return self.path / LAST

    @property
    def best_dir(self) -> Path:
        return self.path / BEST

    def recover(self) -> None:
        """Finish or undo a checkpoint swap interrupted by a crash; drop stale staging folders."""
        if not self.is_main or not self.path.is_dir():
            return
        for name in (LAST, BEST):
            final, old = self.path / name, self.path / f".{name}.old"
            if not final.exists() and old.exists():
                os.replace(old, final)  # the crash hit between the two renames
                logger.warning("recovered the %r checkpoint of %s after an interrupted save", name, self.path)
            elif old.exists():
                shutil.rmtree(old, ignore_errors=True)
        for stale in self.path.glob(".*.staging-*"):
            shutil.rmtree(stale, ignore_errors=True)

    def holds_run(self) -> bool:
        """Whether a run has trained here (a config.json alone, from a run that failed while
        loading its data, does not count: it is simply rewritten)."""
        return self.metrics_path.exists() or self.last_dir.exists()

    def prepare(self, config: Mapping[str, Any], *, resume: bool) -> None:
        """Create the folder and write ``config.json`` (new run) or check it can be resumed.

        Raises :class:`ConfigError` when a new run would overwrite an existing one, or when
        there is nothing to resume.
        """
        if resume:
            self.recover()
            if not (self.last_dir / STATE_JSON).is_file():
                raise ConfigError(
                    f"--resume: {self.path} holds no resumable checkpoint ({LAST}/{STATE_JSON}). "
                    "Start a new run without --resume, or point --output at the run folder to continue."
                )
            return
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"--output {self.path} is a file; give a folder for the run.")
        if self.holds_run():
            hint = ("Continue it with --resume, or choose a new output folder." if self.last_dir.exists() else
                    "It has no checkpoint to continue from: delete the folder or choose a new one.")
            raise ConfigError(f"--output {self.path} already holds a training run. {hint}")
        if self.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.config_path, json.dumps(_json_safe(dict(config)), indent=2) + "\n")

    def stored_config(self) -> dict:
        """The ``config.json`` of this run ({} when absent or unreadable)."""
        try:
            data = json.loads(self.config_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return {}
        return data if isinstance(data, dict) else {}

    def staging_dir(self, name: str) -> Path:
        staging = self.path / f".{name}.staging-{os.getpid()}"
        if staging.exists():
            shutil.rmtree(staging)
        return staging

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        if self.is_main and self.path.is_dir():
            atomic_write_text(self.path / SUMMARY_FILE, json.dumps(_json_safe(dict(summary)), indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# signals


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop finishes the step, checkpoints and exits 0.

    A second SIGINT raises :class:`KeyboardInterrupt` (the impatient user's way out).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> StopRequest:
        if threading.current_thread() is not threading.main_thread():
            logger.debug("not on the main thread: SIGINT/SIGTERM handlers not installed")
            return self
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = name
        logger.warning("%s received: finishing this step, writing a checkpoint, then stopping", name)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> StopRequest:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.restore()


# ----------------------------------------------------------------------------------------------
# the training loop


@dataclass
class StepOutput:
    """What a stage's step function returns.

    ``losses``: scalar tensors (``"loss"`` first, the total); all must be finite on every rank
    before ``apply`` (backward + optimizer/scheduler steps) is called. ``images``: samples in
    this rank's batch.
    """

    losses: dict[str, Tensor]
    apply: Callable[[], None]
    images: int


@dataclass
class CheckpointSpec:
    """How to write the model checkpoint: the (unwrapped) model, its kind, and callables giving
    the ``config`` and ``extra`` dicts of :func:`napari_langmamba.checkpoint.save_checkpoint`."""

    model: nn.Module
    kind: str
    config: Callable[[], dict]
    extra: Callable[[TrainState], dict]


class _Meter:
    """Running means of logged losses and the images seen since the last record."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.images = 0
        self.lr: float | None = None
        self.start = time.monotonic()

    def add(self, losses: Mapping[str, float], images: int) -> None:
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.steps += 1
        self.images += images

    def means(self) -> dict[str, float]:
        return {k: v / max(1, self.steps) for k, v in self.sums.items()}


class Trainer:
    """The loop shared by the training stages: epochs of steps with a synchronised NaN/stop
    check, periodic logging, validation, best/last checkpoints and exact resume.

    Parameters
    ----------
    run
        The run folder (rank 0 writes into it).
    ctx
        Distributed context (all ranks run the loop).
    loader, batch_sampler
        From :func:`training.distributed.make_train_loader`.
    epochs, steps_per_epoch
        Length of training; ``steps_per_epoch`` may cap an epoch below a full pass.
    step_fn
        ``step_fn(batch, state) -> StepOutput``: forward pass and losses (no backward yet).
    validate_fn
        ``validate_fn(state) -> dict`` of validation metrics, run by all ranks at each epoch end.
    best_key, best_mode
        Which validation metric chooses ``best`` and whether higher (``"max"``) is better.
    objects
        Everything with ``state_dict``/``load_state_dict`` that resume must restore besides the
        model weights (optimizers, schedulers, scaler, discriminator).
    checkpoint
        How to write the model checkpoint.
    lr_fn
        Current learning rate for the log.
    """

    def __init__(
        self,
        *,
        run: RunFolder,
        ctx: DistContext,
        loader: Iterable,
        batch_sampler: ResumableBatchSampler,
        epochs: int,
        steps_per_epoch: int,
        step_fn: Callable[[Any, TrainState], StepOutput],
        validate_fn: Callable[[TrainState], dict] | None,
        objects: Mapping[str, Any],
        checkpoint: CheckpointSpec,
        lr_fn: Callable[[], float],
        best_key: str | None = None,
        best_mode: str = "max",
        log_every: int = 10,
        checkpoint_every: int = 0,
        stop_at_step: int | None = None,
        nan_at_step: int | None = None,
        progress: bool = True,
    ) -> None:
        if epochs < 1:
            raise ConfigError(f"--epochs must be at least 1; got {epochs}.")
        if steps_per_epoch < 1:
            raise ConfigError("An epoch has no training step; add data or lower --batch-size.")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        self.run = run
        self.ctx = ctx
        self.loader = loader
        self.batch_sampler = batch_sampler
        self.epochs = int(epochs)
        self.steps_per_epoch = int(steps_per_epoch)
        self.step_fn = step_fn
        self.validate_fn = validate_fn
        self.objects = dict(objects)
        self.checkpoint = checkpoint
        self.lr_fn = lr_fn
        self.best_key = best_key
        self.best_mode = best_mode
        self.log_every = max(1, int(log_every))
        self.checkpoint_every = max(0, int(checkpoint_every))
        self.stop_at_step = stop_at_step
        self.nan_at_step = nan_at_step
        self.progress = progress
        self.state = TrainState()
        self.metrics: MetricsWriter | None = None
        self.last_saved_step: int | None = None

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    # -- resume --------------------------------------------------------------------------------

    def restore(self) -> None:
        """Load model weights, object states, this rank's RNG and the progress from ``last``."""
        folder = self.run.last_dir
        progress, states, rngs, world = load_training_state(folder, stage=self.run.stage)
        self._load_model_weights(folder)
        missing = sorted(set(self.objects) - set(states))
        if missing:
            raise CheckpointError(f"{folder} lacks the saved state of {', '.join(missing)}; it cannot be resumed.")
        for name, obj in self.objects.items():
            try:
                obj.load_state_dict(states[name])
            except (KeyError, ValueError, RuntimeError, TypeError) as exc:
                raise CheckpointError(
                    f"The saved {name} state in {folder} does not fit this run ({exc}); resume with the "
                    "same options that started it."
                ) from exc
        if world != self.ctx.world_size:
            logger.warning(
                "the run was saved with %d process(es) and resumes with %d: the data order of the "
                "remaining epochs differs from an uninterrupted run", world, self.ctx.world_size)
        rank = self.ctx.rank if self.ctx.rank < len(rngs) else 0
        restore_rng_state(rngs[rank])
        self.state = progress
        self.last_saved_step = progress.step
        logger.info("resumed %s at step %d (epoch %d, batch %d of the epoch)", self.run.path,
                    progress.step, progress.epoch + 1, progress.batch_in_epoch)

    def _load_model_weights(self, folder: Path) -> None:
        from napari_langmamba.checkpoint import load_checkpoint

        ckpt = load_checkpoint(folder)
        if ckpt.kind != self.checkpoint.kind:
            raise CheckpointError(f"{folder} holds a {ckpt.kind!r} checkpoint, this run trains {self.checkpoint.kind!r}.")
        try:
            self.checkpoint.model.load_state_dict(ckpt.state_dict, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(
                f"The weights in {folder} do not match this run's model ({exc}); resume with the same "
                "preset and options."
            ) from exc

    # -- checkpoints ---------------------------------------------------------------------------

    def save(self, name: str = LAST) -> None:
        """Write checkpoint ``name`` (``last`` with the resume state); call on every rank."""
        from napari_langmamba.checkpoint import save_checkpoint

        with_state = name == LAST
        rngs = all_gather_objects(capture_rng_state(), self.ctx) if with_state else []
        if self.ctx.is_main:
            staging = self.run.staging_dir(name)
            extra = dict(self.checkpoint.extra(self.state))
            extra["training"] = {
                **dict(extra.get("training") or {}),
                "stage": self.run.stage,
                "step": self.state.step,
                "epoch": self.state.epoch,
                "total_steps": self.total_steps,
                "run": str(self.run.path.resolve()),
                "checkpoint": name,
            }
            if name == BEST:
                metrics, at_step = self.state.best_metrics, self.state.best_step
            else:
                metrics, at_step = self.state.last_val, self.state.step
            extra["metrics"] = {"validation": dict(metrics), "step": at_step} if metrics else None
            try:
                save_checkpoint(staging, self.checkpoint.model, kind=self.checkpoint.kind,
                                config=self.checkpoint.config(), extra=_json_safe(extra))
                if with_state:
                    save_training_state(staging, stage=self.run.stage, state=self.state, objects=self.objects,
                                        rng=rngs, world_size=self.ctx.world_size)
                _swap_into_place(staging, self.run.path / name)  # flushes the files first
            except BaseException:
                # The previous checkpoint is still in place; a half-built one is only litter.
                shutil.rmtree(staging, ignore_errors=True)
                raise
            self._event("checkpoint", name=name, path=str(self.run.path / name))
        if with_state:
            self.last_saved_step = self.state.step
        barrier(self.ctx)

    # -- logging -------------------------------------------------------------------------------

    def _record(self, kind: str, fields: Mapping[str, Any]) -> dict:
        # "epoch" is 1-based: the epoch in progress, or for kind "epoch" the one just finished
        epoch = self.state.epoch if kind == "epoch" else min(self.state.epoch + 1, self.epochs)
        record = {"stage": self.run.stage, "kind": kind, "time": time.time(), "step": self.state.step,
                  "epoch": epoch}
        record.update({k: v for k, v in fields.items() if k not in record})
        return record

    def _write(self, record: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(record)

    def _event(self, event: str, **fields: Any) -> None:
        self._write(self._record("event", {"event": event, **fields}))

    # -- the loop ------------------------------------------------------------------------------

    def _check(self, out: StepOutput, stop: StopRequest) -> list[float]:
        """All-reduce [non-finite, stop, losses...]; raise on a non-finite loss anywhere."""
        names = list(out.losses)
        local = [float(out.losses[k].detach().float().cpu()) for k in names]
        step = self.state.step + 1
        if self.nan_at_step is not None and step == self.nan_at_step and names:
            local[0] = float("nan")  # test hook: --debug-nan-at-step
        bad = any(not math.isfinite(v) for v in local)
        want_stop = stop.requested or (self.stop_at_step is not None and step >= self.stop_at_step)
        # Non-finite values would poison the sum: send zeros and the flag instead.
        values = [0.0 if bad else v for v in local]
        reduced = all_reduce_sum(torch.tensor([float(bad), float(want_stop), *values], dtype=torch.float64), self.ctx)
        if reduced[0] > 0:
            raise self._nonfinite(step, dict(zip(names, local, strict=True)), int(reduced[0]))
        self._stop_now = bool(reduced[1] > 0)
        return [float(v) / self.ctx.world_size for v in reduced[2:]]

    def _nonfinite(self, step: int, local: dict[str, float], n_ranks: int) -> NonFiniteLossError:
        parts = ", ".join(f"{k}={v:.6g}" for k, v in local.items())
        if self.last_saved_step is not None:
            kept = f"The last good checkpoint is kept: {self.run.last_dir} (step {self.last_saved_step})."
            hint = "Lower the learning rate (--lr) or check the training data, then continue with --resume."
        else:
            kept = "No checkpoint had been written yet (lower --checkpoint-every to save earlier)."
            hint = "Lower the learning rate (--lr) or check the training data, then start again."
        where = "" if not self.ctx.is_distributed else f" on {n_ranks} of {self.ctx.world_size} processes"
        message = (f"The {self.run.stage} training loss became NaN or infinite at step {step} "
                   f"(epoch {self.state.epoch + 1}){where}; this rank's losses: {parts}. Training stopped "
                   f"without applying that step. {kept} {hint}")
        self._event("nonfinite_loss", failed_step=step, losses=local, message=message)
        return NonFiniteLossError(message)

    def _sync_stop(self, stop: StopRequest) -> bool:
        flag = torch.tensor([float(stop.requested)], dtype=torch.float64)
        return bool(all_reduce_sum(flag, self.ctx)[0] > 0)

    def _log_train(self, meter: _Meter, names: list[str], started: float, steps_run: int) -> None:
        seconds = time.monotonic() - meter.start
        elapsed = time.monotonic() - started
        remaining = self.total_steps - self.state.step
        eta = elapsed / max(1, steps_run) * remaining
        images_per_s = meter.images * self.ctx.world_size / seconds if seconds > 0 else None
        losses = meter.means()
        lr = meter.lr if meter.lr is not None else self.lr_fn()
        self._write(self._record("train", {"losses": losses, "lr": lr, "images_per_s": images_per_s,
                                           "eta_s": eta, "total_steps": self.total_steps}))
        if self.ctx.is_main:
            text = " ".join(f"{k}={v:.4g}" for k, v in losses.items())
            logger.info("step %d/%d epoch %d: %s lr=%.3g %.1f img/s eta %.0fs", self.state.step,
                        self.total_steps, self.state.epoch + 1, text, lr, images_per_s or 0.0, eta)
        meter.reset()

    def _is_better(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        best = self.state.best_value
        if best is None:
            return True
        return value > best if self.best_mode == "max" else value < best

    def fit(self, *, resume: bool = False, start_event: Mapping[str, Any] | None = None) -> dict:
        """Train to the end (or until stopped); returns the summary also written to ``summary.json``.

        Raises :class:`NonFiniteLossError` (after logging it) when a loss stops being finite.
        """
        if resume:
            self.restore()
        if self.ctx.is_main:
            self.metrics = MetricsWriter(self.run.metrics_path,
                                         keep_through_step=self.state.step if resume else None)
        self._event("resume" if resume else "start", total_steps=self.total_steps, epochs=self.epochs,
                    steps_per_epoch=self.steps_per_epoch, world_size=self.ctx.world_size,
                    **dict(start_event or {}))
        status = "completed"
        error: str | None = None
        started = time.monotonic()
        train_seconds0 = self.state.train_seconds
        steps_run = 0
        meter = _Meter()
        self._stop_now = False
        bar = None
        if self.ctx.is_main and self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.state.step, desc=self.run.stage, unit="step",
                       dynamic_ncols=True, disable=None, file=sys.stderr)
        stop = StopRequest().install()
        try:
            while self.state.epoch < self.epochs and status == "completed":
                skip = self.state.batch_in_epoch
                if skip < self.steps_per_epoch:
                    self.batch_sampler.set_epoch(self.state.epoch, skip_batches=skip)
                    for batch in self.loader:
                        out = self.step_fn(batch, self.state)
                        means = self._check(out, stop)
                        meter.lr = self.lr_fn()  # the rate this step uses (schedulers step in apply)
                        out.apply()
                        self.state.step += 1
                        self.state.batch_in_epoch += 1
                        steps_run += 1
                        self.state.train_seconds = train_seconds0 + time.monotonic() - started
                        meter.add(dict(zip(out.losses, means, strict=True)), out.images)
                        if bar is not None:
                            bar.update(1)
                            bar.set_postfix({k: f"{v:.4g}" for k, v in list(zip(out.losses, means, strict=True))[:3]})
                        end_of_epoch = self.state.batch_in_epoch >= self.steps_per_epoch
                        if self.state.step % self.log_every == 0 or end_of_epoch or self._stop_now:
                            self._log_train(meter, list(out.losses), started, steps_run)
                        if self._stop_now:
                            status = "stopped"
                            break
                        # (at an epoch end last/ is written after validation instead: saving it
                        # before as well would let a crash in between log that epoch twice)
                        if (self.checkpoint_every and self.state.step % self.checkpoint_every == 0
                                and not end_of_epoch):
                            self.save(LAST)
                        if end_of_epoch:
                            break
                    if status == "stopped":
                        self.save(LAST)
                        self._event("stopped", reason=stop.signal_name or "stop_at_step")
                        logger.warning("stopped at step %d; continue with --resume (checkpoint %s)",
                                       self.state.step, self.run.last_dir)
                        break
                self._end_epoch()
                if self._sync_stop(stop):
                    status = "stopped"
                    self._event("stopped", reason=stop.signal_name or "signal")
        except NonFiniteLossError as exc:
            status, error = "failed", str(exc)
            raise
        except BaseException as exc:  # KeyboardInterrupt (second Ctrl-C) or a crash: record it
            status, error = "failed", f"{type(exc).__name__}: {exc}"
            raise
        finally:
            stop.restore()
            if bar is not None:
                bar.close()
            summary = self._summary(status, error)
            self._event("end", status=status, error=error)
            if self.metrics is not None:
                self.metrics.sync()
                self.metrics.close()
            self.run.write_summary(summary)
        return summary

    def _end_epoch(self) -> None:
        """Validation, ``epoch`` record and best/last checkpoints at the end of an epoch."""
        self.state.epoch += 1
        self.state.batch_in_epoch = 0
        val: dict = {}
        if self.validate_fn is not None:
            val = dict(self.validate_fn(self.state))
            self.state.last_val = dict(val)
        self._write(self._record("epoch", {"val": val}))
        if val and self.ctx.is_main:
            logger.info("epoch %d validation: %s", self.state.epoch,
                        " ".join(f"{k}={v:.4g}" for k, v in val.items() if isinstance(v, (int, float))))
        improved = False
        if self.best_key is not None and self.best_key in val:
            value = float(val[self.best_key])
            if self._is_better(value):
                self.state.best_value, self.state.best_step = value, self.state.step
                self.state.best_metrics = dict(val)
                improved = True
        # best/ first: a crash between the two saves must not leave a last/ whose state names a
        # best/ that was never written (the resumed run repeats this epoch end and writes both).
        if improved:
            self.save(BEST)
        self.save(LAST)

    def _summary(self, status: str, error: str | None) -> dict:
        return {
            "stage": self.run.stage,
            "status": status,
            "error": error,
            "step": self.state.step,
            "total_steps": self.total_steps,
            "epochs_done": self.state.epoch,
            "epochs": self.epochs,
            "train_seconds": self.state.train_seconds,
            "last_validation": self.state.last_val,
            "best": {"key": self.best_key, "value": self.state.best_value, "step": self.state.best_step,
                     "metrics": self.state.best_metrics},
            "checkpoints": {
                "last": str(self.run.last_dir) if self.run.last_dir.exists() else None,
                "best": str(self.run.best_dir) if self.run.best_dir.exists() else None,
            },
            "world_size": self.ctx.world_size,
        }
