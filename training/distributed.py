"""Single-process and ``torchrun`` (DistributedDataParallel) execution for the training stages.

Every stage runs unchanged under ``python -m training ...`` and under
``torchrun --nproc_per_node=N -m training ...`` (also multi-node: ``--nnodes``, ``--node_rank``,
``--rdzv_endpoint``). torchrun sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; we then join the
process group with ``nccl`` on CUDA and ``gloo`` on CPU, give each rank its own GPU
(``cuda:LOCAL_RANK``), shard the training data with :class:`~torch.utils.data.DistributedSampler`,
and let rank 0 alone write the console progress, ``metrics.jsonl`` and checkpoints.

Rules the training loop follows so that ranks never wait on each other forever:

- every rank runs the same number of steps (the sampler pads/drops to equal shards and batches
  drop their remainder);
- decisions that end a run (a stop signal, a non-finite loss) are all-reduced once per step, so
  all ranks stop at the same step;
- collective calls (validation sums, checkpoint RNG gathering) are made by all ranks.

Automatic mixed precision is used on CUDA only (bf16 where the GPU supports it, fp16 with a
gradient scaler otherwise); CPU training runs in float32.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from napari_langmamba.errors import ConfigError
from training.options import AMP_CHOICES

logger = logging.getLogger(__name__)

__all__ = [
    "AmpPolicy",
    "DistContext",
    "ResumableBatchSampler",
    "all_gather_objects",
    "all_reduce_sum",
    "barrier",
    "init_distributed",
    "make_amp",
    "make_train_loader",
    "resolve_device",
    "shard_indices",
    "shutdown",
    "unwrap",
    "wrap_ddp",
]



@dataclass(frozen=True)
class DistContext:
    """Where this process runs: its rank among ``world_size`` processes and its device."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """True on the process that logs and writes checkpoints (rank 0)."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(option: str = "auto", *, local_rank: int = 0) -> torch.device:
    """Turn ``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` into a device, checking CUDA is there.

    Under torchrun, ``auto`` and ``cuda`` pick ``cuda:LOCAL_RANK``.
    """
    text = str(option).strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return torch.device("cpu")
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"--device {option} asks for a GPU but PyTorch sees no CUDA device on this machine; "
                "use --device cpu (or auto)."
            )
        if text == "cuda":
            return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
        try:
            index = int(text.split(":", 1)[1])
        except ValueError as exc:
            raise ConfigError(f"Unknown device {option!r}; use auto, cpu, cuda or cuda:N.") from exc
        if not 0 <= index < torch.cuda.device_count():
            raise ConfigError(
                f"--device {option}: this machine has {torch.cuda.device_count()} CUDA device(s)."
            )
        return torch.device("cuda", index)
    raise ConfigError(f"Unknown device {option!r}; use auto, cpu, cuda or cuda:N.")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ConfigError(f"Environment variable {name}={value!r} is not an integer (set by torchrun).") from exc


def init_distributed(device: str = "auto", *, timeout_s: float = 1800.0) -> DistContext:
    """Join the torchrun process group when launched by torchrun; a single process otherwise.

    Parameters
    ----------
    device
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (``N`` is ignored under torchrun: each rank
        uses ``cuda:LOCAL_RANK``).
    timeout_s
        How long a collective may wait for the other ranks before failing.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size <= 1:
        return DistContext(device=resolve_device(device))
    option = "cuda" if str(device).startswith("cuda") else device
    dev = resolve_device(option, local_rank=local_rank)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            world_size=world_size,
            rank=rank,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    logger.debug("rank %d/%d (local %d) on %s with %s", rank, world_size, local_rank, dev, backend)
    return DistContext(rank=rank, local_rank=local_rank, world_size=world_size, device=dev, backend=backend)


def shutdown(ctx: DistContext) -> None:
    """Leave the process group (no-op for a single process)."""
    if ctx.is_distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(module: nn.Module, ctx: DistContext) -> nn.Module:
    """``module`` wrapped in DistributedDataParallel when distributed, else ``module`` itself.

    Buffers are not broadcast every step: our models keep only frozen buffers (the language
    codebook, tens of MB) and GroupNorm/InstanceNorm, so broadcasting would only cost bandwidth.
    Modules without trainable parameters are returned unwrapped.
    """
    if not ctx.is_distributed or not any(p.requires_grad for p in module.parameters()):
        return module
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module inside a DDP wrapper."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def all_reduce_sum(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum of ``values`` over all ranks (a copy; ``values`` itself is unchanged)."""
    out = values.detach().clone()
    if ctx.is_distributed:
        # gloo reduces CPU tensors, nccl CUDA tensors
        out = out.to(ctx.device if ctx.backend == "nccl" else "cpu")
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.cpu()


def barrier(ctx: DistContext) -> None:
    if ctx.is_distributed:
        dist.barrier()


def all_gather_objects(obj: object, ctx: DistContext) -> list:
    """One picklable object from every rank, in rank order (our own processes only)."""
    if not ctx.is_distributed:
        return [obj]
    out: list = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def shard_indices(n: int, ctx: DistContext) -> list[int]:
    """Rank ``r``'s share of ``range(n)`` for evaluation: ``r, r + world, ...`` (no padding)."""
    return list(range(ctx.rank, n, ctx.world_size))


class ResumableBatchSampler(Sampler[list[int]]):
    """Batches of a (distributed) shuffled order that can start part-way through an epoch.

    The order of epoch ``e`` depends only on ``(seed, e)`` (through
    :class:`~torch.utils.data.DistributedSampler`), so a resumed run that skips the batches it
    already trained on sees exactly the batches an uninterrupted run would have seen.
    """

    def __init__(self, sampler: DistributedSampler, *, batch_size: int) -> None:
        if batch_size < 1:
            raise ConfigError(f"The batch size must be at least 1; got {batch_size}.")
        self.sampler = sampler
        self.batch_size = batch_size
        self.skip = 0

    def set_epoch(self, epoch: int, *, skip_batches: int = 0) -> None:
        """Choose the epoch's order and how many of its first batches to skip."""
        self.sampler.set_epoch(epoch)
        self.skip = max(0, int(skip_batches))

    def __len__(self) -> int:
        return max(0, len(self.sampler) // self.batch_size - self.skip)

    def batches_per_epoch(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        indices = list(self.sampler)
        full = len(indices) // self.batch_size  # the remainder is dropped: equal steps on every rank
        for b in range(self.skip, full):
            yield indices[b * self.batch_size:(b + 1) * self.batch_size]


def _worker_init(_worker_id: int) -> None:
    # Ctrl-C reaches the whole process group: the main process handles it (finish the step,
    # checkpoint); workers must not die first and break the data pipeline under it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_train_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    ctx: DistContext,
    seed: int,
    num_workers: int = 0,
) -> tuple[DataLoader, ResumableBatchSampler]:
    """A shuffling, sharded, resumable training loader and its batch sampler.

    Call ``batch_sampler.set_epoch(epoch, skip_batches=k)`` before iterating an epoch.
    Raises :class:`ConfigError` when the data cannot fill one batch per rank.
    """
    n = len(dataset)  # type: ignore[arg-type]
    if n < batch_size * ctx.world_size:
        raise ConfigError(
            f"The training data holds {n} samples, fewer than one batch of {batch_size} for each of "
            f"the {ctx.world_size} process(es); add data or lower --batch-size."
        )
    sampler = DistributedSampler(
        dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed, drop_last=True
    )
    batch_sampler = ResumableBatchSampler(sampler, batch_size=batch_size)
    # A private generator keeps the DataLoader from drawing from the global torch RNG, whose
    # state is part of the exact-resume contract.
    generator = torch.Generator().manual_seed(int(seed) + 7919 * ctx.rank)
    loader = DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        pin_memory=ctx.device.type == "cuda",
        worker_init_fn=_worker_init if num_workers > 0 else None,
        generator=generator,
        persistent_workers=False,
    )
    return loader, batch_sampler


@dataclass
class AmpPolicy:
    """Mixed precision settings: ``dtype`` None means float32 (CPU, or ``--amp off``)."""

    device_type: str
    dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for forward passes."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    @property
    def name(self) -> str:
        return {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bfloat16 natively on this CPU (AVX512-BF16 or AMX).

    Without it, bf16 convolutions fall back to PyTorch's reference kernels: a SEED-lite
    training step measured 26 s instead of 1 s in float32 on an AVX2-only CPU.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def make_amp(option: str, device: torch.device) -> AmpPolicy:
    """Mixed precision for ``--amp {auto,off,bf16,fp16}`` on ``device``.

    CUDA: ``auto`` is bf16 where supported, else fp16 with loss scaling. CPU: float32 unless
    ``bf16`` is asked for explicitly (bfloat16 autocast: convolutions and matrix products in
    bf16, which CPUs with AVX512-BF16 or AMX run much faster) and the CPU has native bf16
    (:func:`cpu_has_native_bf16`; elsewhere a warning, and float32); fp16 is CUDA only.
    """
    option = str(option).lower()
    if option not in AMP_CHOICES:
        raise ConfigError(f"Unknown --amp {option!r}; choose one of {', '.join(AMP_CHOICES)}.")
    if device.type == "cpu" and option == "bf16":
        if cpu_has_native_bf16():
            return AmpPolicy(device_type="cpu", dtype=torch.bfloat16)
        logger.warning(
            "--amp bf16: this CPU has no native bfloat16 (AVX512-BF16 or AMX), where bf16 convolutions run "
            "about 20x slower than float32; training in float32"
        )
        return AmpPolicy(device_type="cpu")
    if device.type != "cuda" or option == "off":
        if device.type != "cuda" and option == "fp16":
            logger.warning("--amp fp16 needs CUDA; training on %s in float32", device)
        return AmpPolicy(device_type=device.type)
    if option == "auto":
        option = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if option == "bf16":
        return AmpPolicy(device_type="cuda", dtype=torch.bfloat16)
    return AmpPolicy(device_type="cuda", dtype=torch.float16, scaler=torch.amp.GradScaler("cuda"))
