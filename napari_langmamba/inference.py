"""The denoising engine: a CT volume in HU in, the denoised volume in HU out.

:class:`Denoiser` wraps a trained denoiser (SEED or RED-CNN) loaded from a checkpoint.
:meth:`Denoiser.iter_denoise` is the one code path: a generator that yields
:class:`~napari_langmamba.events.Progress` after every batch (so the CLI can draw a bar and
a GUI worker can cancel between batches) and returns the result; :meth:`Denoiser.denoise`
just drives it.

How an image reaches the network:

1. HU -> ``[0, 1]`` with the checkpoint's own normalisation (``windowing.Normalization``);
2. reflect-padded at the bottom/right to a multiple of 16 (the encoder's downsampling factor),
   values that are not finite read as air (:func:`napari_langmamba.session.prepare_slice`, the
   slice preparation the tokens share) and kept as they were in the result;
3. when larger than ``tile`` pixels along an axis, cut into tiles of ``tile`` pixels that
   overlap by ``overlap`` pixels; each tile's output is weighted by a ramp that is zero in the
   outer quarter of the overlap and rises as a raised cosine over its middle half, so pixels
   near a tile's cut edge (where the network lacked context) never contribute and the blend
   has no visible seam; weights are normalised by their sum;
4. slices (or tiles) are processed ``batch_size`` at a time under ``torch.inference_mode``
   (and autocast to bf16/fp16 on CUDA only), then mapped back to HU and cropped.

Weights, devices and the model cache are :mod:`napari_langmamba.session`'s (shared with the
LangAE of the tokens). Nothing here imports Qt or napari; torch is imported when a model is
loaded, so importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import threading
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_langmamba.allocator import heap_allocations
from napari_langmamba.errors import CheckpointError, ConfigError
from napari_langmamba.events import Progress, run
from napari_langmamba.session import (
    DEFAULT_WEIGHTS_DIR,
    STRIDE,
    available_devices,
    bundled_name,
    check_real_dtype,
    clear_model_cache,
    default_weights_info,
    load_cached,
    padded_shape,
    prepare_slice,
    resolve_device,
    resolve_weights,
)
from napari_langmamba.windowing import MODEL_NORMALIZATION, Normalization

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_WEIGHTS_DIR",
    "DENOISER_KINDS",
    "Denoiser",
    "TilingPlan",
    "available_devices",
    "default_weights_info",
    "is_sharp_kernel",
    "kernel_advice",
    "resolve_device",
    "resolve_weights",
    "series_kernel",
    "trained_kernels",
]

logger = logging.getLogger(__name__)

DENOISER_KINDS = ("seed", "redcnn")
"""Checkpoint kinds that map an image to a denoised image."""

DEFAULT_TILE = 512
DEFAULT_OVERLAP = 128
"""Tile overlap (px): its outer quarter (32 px) exceeds RED-CNN's receptive-field radius (20 px)."""


# --- tiling -----------------------------------------------------------------------------------
def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets covering ``[0, size)`` with tiles of ``tile`` overlapping by >= ``overlap``."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    count = math.ceil((size - tile) / stride) + 1
    return sorted({min(i * stride, size - tile) for i in range(count)})


def _ramp(length: int, overlap: int, *, rise: bool, fall: bool) -> np.ndarray:
    """1-D tile weight: zero on the outer quarter of ``overlap``, raised cosine over its middle half."""
    weight = np.ones(length, dtype=np.float64)
    margin = overlap // 4
    width = max(overlap - 2 * margin, 1)
    position = np.arange(overlap, dtype=np.float64)
    edge = 0.5 - 0.5 * np.cos(np.pi * np.clip((position - margin + 0.5) / width, 0.0, 1.0))
    if rise:
        weight[:overlap] = np.minimum(weight[:overlap], edge)
    if fall:
        weight[length - overlap :] = np.minimum(weight[length - overlap :], edge[::-1])
    return weight


@dataclass(frozen=True)
class TilingPlan:
    """How one ``(h, w)`` slice is padded and cut into network inputs.

    ``padded`` is the slice size after reflect padding to a multiple of 16; ``tile_shape`` the
    network input size; ``starts`` the top-left corner of every tile (one tile ``(0, 0)`` when
    the slice fits).
    """

    shape: tuple[int, int]
    padded: tuple[int, int]
    tile_shape: tuple[int, int]
    starts: tuple[tuple[int, int], ...]
    overlap: int

    @classmethod
    def for_shape(cls, shape: tuple[int, int], *, tile: int, overlap: int) -> TilingPlan:
        h, w = (int(v) for v in shape)
        padded = padded_shape((h, w))
        tile_shape = (min(tile, padded[0]), min(tile, padded[1]))
        rows = _tile_starts(padded[0], tile, overlap)
        cols = _tile_starts(padded[1], tile, overlap)
        return cls((h, w), padded, tile_shape, tuple((r, c) for r in rows for c in cols), overlap)

    @property
    def tiled(self) -> bool:
        return len(self.starts) > 1

    def weight(self, start: tuple[int, int]) -> np.ndarray:
        """Blending weight ``(th, tw)`` of the tile at ``start`` (all ones when not tiled)."""
        (r, c), (th, tw), (ph, pw) = start, self.tile_shape, self.padded
        wy = _ramp(th, self.overlap, rise=r > 0, fall=r + th < ph)
        wx = _ramp(tw, self.overlap, rise=c > 0, fall=c + tw < pw)
        return np.outer(wy, wx).astype(np.float32)


# --- the denoiser -----------------------------------------------------------------------------
def _as_slices(hu: Any) -> tuple[Any, tuple[int, ...], bool]:
    """Validate the input's shape; return a ``(z, y, x)`` view (lazy for array-likes)."""
    shape = tuple(int(s) for s in getattr(hu, "shape", np.shape(hu)))
    if len(shape) not in (2, 3):
        raise ConfigError(
            f"Denoising needs one slice (y, x) or a volume (z, y, x); got an array of shape {shape}."
        )
    if any(s == 0 for s in shape):
        raise ConfigError(f"Cannot denoise an empty image (shape {shape}).")
    check_real_dtype(getattr(hu, "dtype", None))
    if len(shape) == 2:
        return np.asarray(hu)[np.newaxis], shape, True
    return hu, shape, False


class Denoiser:
    """A loaded denoising model, ready to map HU slices to denoised HU.

    Use :meth:`load` (cached); the constructor wraps an already built model, e.g. in tests
    or for validation during training.

    Parameters
    ----------
    model
        A module mapping ``(b, 1, h, w)`` in ``[0, 1]`` to ``(b, 1, h, w)``, h and w multiples of 16.
    normalization
        HU <-> model scaling the model was trained with.
    device
        Where the model lives; it is moved there.
    amp
        Autocast to bf16 (or fp16 without bf16 support) on CUDA; ignored elsewhere.
    info
        Provenance merged into :attr:`info`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        normalization: Normalization = MODEL_NORMALIZATION,
        device: str | torch.device = "cpu",
        amp: bool = True,
        info: dict | None = None,
    ) -> None:
        import torch

        self.device = resolve_device(device) if isinstance(device, str) else torch.device(device)
        self.normalization = normalization
        self.model = model.to(self.device).float().eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.amp_dtype: torch.dtype | None = None
        if amp and self.device.type == "cuda":
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.info: dict[str, Any] = {
            "kind": None,
            "preset": None,
            "checkpoint_sha256": None,
            "weights": None,
            **(info or {}),
            "normalization": normalization.to_dict(),
            "device": str(self.device),
            "amp": None if self.amp_dtype is None else str(self.amp_dtype).removeprefix("torch."),
        }
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Denoiser(kind={self.info.get('kind')!r}, preset={self.info.get('preset')!r}, device='{self.device}')"

    # --- loading ------------------------------------------------------------------------
    @classmethod
    def load(cls, weights: str | Path = "default", *, device: str = "auto", amp: bool = True) -> Denoiser:
        """Load (or reuse) the denoiser a checkpoint holds.

        Parameters
        ----------
        weights
            ``"default"`` (the bundled weights), a checkpoint folder or ``.zip``, or a training
            run folder (its ``best`` checkpoint, else ``last``).
        device
            ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
        amp
            Use mixed precision on CUDA.

        Returns
        -------
        Denoiser
            Cached per (checkpoint path, content hash, device, amp) in the model cache the
            LangAE shares (:data:`napari_langmamba.session.MODEL_CACHE`): loading again is free.

        Raises
        ------
        CheckpointError
            Missing, unreadable or mismatched checkpoint, or one that is not a denoiser.
        ConfigError
            Unknown or unavailable device.
        """
        return load_cached(
            "denoiser",
            weights,
            device,
            lambda path, torch_device, weights_sha: cls._build(
                path, torch_device, amp=amp, weights_sha=weights_sha, label=str(weights)
            ),
            variant=f"amp={bool(amp)}",
        )

    @classmethod
    def _build(cls, path: Path, device: torch.device, *, amp: bool, weights_sha: str, label: str) -> Denoiser:
        from napari_langmamba.checkpoint import build_model, load_checkpoint

        checkpoint = load_checkpoint(path)
        if checkpoint.kind not in DENOISER_KINDS:
            raise CheckpointError(
                f"{path} holds a {checkpoint.kind!r} model, not a denoiser: choose a SEED or RED-CNN "
                "checkpoint (a LangAE checkpoint is stage 1 of training, not a denoiser)."
            )
        config = checkpoint.config if isinstance(checkpoint.config, dict) else {}
        normalization = checkpoint.normalization  # validated by load_checkpoint
        model = build_model(checkpoint)
        info = {
            "kind": checkpoint.kind,
            "preset": _find_preset(config),
            "checkpoint_sha256": weights_sha,
            "weights": bundled_name(label) or str(path),
            "path": str(path),
            "scan_backend": _scan_backend(device) if checkpoint.kind == "seed" else None,
            "created": checkpoint.meta.get("created"),
            "trained_with_package": checkpoint.meta.get("package_version"),
            "trained_kernels": trained_kernels(checkpoint.meta),
        }
        logger.info("loaded %s %s from %s on %s", info["kind"], info["preset"], path, device)
        return cls(model, normalization=normalization, device=device, amp=amp, info=info)

    @staticmethod
    def clear_cache() -> None:
        """Forget every cached denoiser (frees their memory once no one else holds them)."""
        clear_model_cache("denoiser")

    # --- denoising ----------------------------------------------------------------------
    def default_batch_size(self) -> int:
        """Slices per batch when none is given: 4 on CUDA, 1 elsewhere (CPU gains nothing from more)."""
        return 4 if self.device.type == "cuda" else 1

    def denoise(
        self,
        hu: Any,
        *,
        batch_size: int | None = None,
        tile: int = DEFAULT_TILE,
        overlap: int | None = None,
        self_ensemble: bool = False,
    ) -> np.ndarray:
        """Denoise a slice ``(y, x)`` or a volume ``(z, y, x)`` in HU; float32 HU, same shape.

        See :meth:`iter_denoise` for the parameters.
        """
        return run(self.iter_denoise(hu, batch_size=batch_size, tile=tile, overlap=overlap,
                                     self_ensemble=self_ensemble))

    def iter_denoise(
        self,
        hu: Any,
        *,
        batch_size: int | None = None,
        tile: int = DEFAULT_TILE,
        overlap: int | None = None,
        self_ensemble: bool = False,
    ) -> Generator[Progress, None, np.ndarray]:
        """Denoise as a generator: yields :class:`Progress` per batch, returns the result.

        Parameters
        ----------
        hu
            ``(y, x)`` or ``(z, y, x)`` array (or lazy array-like, read one slice at a time) in HU.
        batch_size
            Network inputs per batch (slices, or tiles when an image is tiled).
            ``None``: :meth:`default_batch_size`.
        tile
            Largest network input side in pixels (rounded down to a multiple of 16): bigger
            slices are tiled. Bounds memory per input.
        overlap
            Overlap of neighbouring tiles in pixels. Pixels in its outer quarter are dropped, so
            that quarter should exceed the network's receptive-field radius for exact blending.
            ``None``: :data:`DEFAULT_OVERLAP`, reduced to fit small tiles.
        self_ensemble
            Run the model on the 8 flips and 90-degree rotations of each input and average the
            8 outputs, each turned back (:data:`SELF_ENSEMBLE`): 8 times the time for a
            slightly better estimate (+0.1 dB PSNR for the bundled model on L192).

        Yields
        ------
        Progress
            ``done``/``total`` count network inputs (slices, or tiles of slices when tiled):
            first ``(0, total)``, then one event per batch. Closing the generator stops the
            work before the next batch.

        Returns
        -------
        numpy.ndarray
            float32 HU with the shape of ``hu``.
        """
        volume, shape, was_2d = _as_slices(hu)
        batch_size = self.default_batch_size() if batch_size is None else int(batch_size)
        if batch_size < 1:
            raise ConfigError(f"The batch size must be at least 1; got {batch_size}.")
        tile = int(tile) // STRIDE * STRIDE
        overlap = min(DEFAULT_OVERLAP, max(0, (tile - STRIDE) // 2)) if overlap is None else int(overlap)
        if overlap < 0 or tile < max(2 * STRIDE, 2 * overlap + STRIDE):
            raise ConfigError(
                f"Tiles of {tile} px cannot overlap by {overlap} px: choose a tile of at least "
                f"max(32, 2 x overlap + 16) px and an overlap >= 0."
            )
        n_slices = shape[0] if not was_2d else 1
        plan = TilingPlan.for_shape(shape[-2:], tile=tile, overlap=overlap)
        weights = {start: plan.weight(start) for start in plan.starts} if plan.tiled else {}
        total = n_slices * len(plan.starts)
        items = [(z, start) for z in range(n_slices) for start in plan.starts]
        result = np.empty((n_slices, *shape[-2:]), dtype=np.float32)
        if plan.tiled:
            logger.debug(
                "tiling %s slices into %d tiles of %s", shape[-2:], len(plan.starts), plan.tile_shape
            )

        pending: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # z -> (input, acc, wsum)
        yield Progress(0, total, f"denoising {n_slices} slice(s)")
        # The network's large temporaries reuse heap memory instead of fresh pages (``result``,
        # allocated above, pins none of it afterwards); see napari_langmamba.allocator.
        with heap_allocations():
            for first in range(0, total, batch_size):
                batch = items[first : first + batch_size]
                inputs = []
                for z, (r, c) in batch:
                    if z not in pending:
                        pending[z] = self._prepare_slice(volume[z], plan)
                    th, tw = plan.tile_shape
                    inputs.append(pending[z][0][r : r + th, c : c + tw])
                outputs = self._run_batch(np.stack(inputs), self_ensemble=self_ensemble)  # (b, th, tw) in HU
                for (z, start), out in zip(batch, outputs, strict=True):
                    norm, acc, wsum = pending[z]
                    if not plan.tiled:
                        acc[...] = out
                    else:
                        r, c = start
                        th, tw = plan.tile_shape
                        acc[r : r + th, c : c + tw] += out * weights[start]
                        wsum[r : r + th, c : c + tw] += weights[start]
                    if start == plan.starts[-1]:  # the slice's last tile: finish it
                        h, w = plan.shape
                        result[z] = acc[:h, :w] if not plan.tiled else acc[:h, :w] / wsum[:h, :w]
                        result[z] += self._outside_range(volume[z])
                        del pending[z]
                done = first + len(batch)
                yield Progress(done, total, f"slice {min(batch[-1][0] + 1, n_slices)} of {n_slices}")
        return result[0] if was_2d else result

    def _prepare_slice(self, hu_slice: Any, plan: TilingPlan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        norm = prepare_slice(hu_slice, self.normalization, stacklevel=4).norm  # (padded h, padded w)
        acc = np.zeros(plan.padded, dtype=np.float32)
        wsum = np.zeros(plan.padded, dtype=np.float32) if plan.tiled else acc
        return norm, acc, wsum

    def _outside_range(self, hu_slice: Any) -> np.ndarray:
        """The part of ``hu_slice`` the normalisation clips away (0 inside its HU range).

        Adding it back keeps air below -1000 HU (e.g. -1024 outside the scan field) and dense
        metal above the range at their own values instead of the range's edge; values that are
        not finite come back as they were (the network saw them as air).
        """
        hu_slice = np.asarray(hu_slice, dtype=np.float32)
        norm = self.normalization
        return hu_slice - np.clip(hu_slice, norm.hu_min, norm.hu_max)

    def _run_batch(self, norm: np.ndarray, *, self_ensemble: bool = False) -> np.ndarray:
        """``(b, h, w)`` normalised -> ``(b, h, w)`` HU, float32."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(norm)).unsqueeze(1).to(self.device)  # (b, 1, h, w)
        autocast = (
            torch.autocast(device_type="cuda", dtype=self.amp_dtype)
            if self.amp_dtype is not None
            else contextlib.nullcontext()
        )
        transforms = SELF_ENSEMBLE if self_ensemble else SELF_ENSEMBLE[:1]
        # One thread at a time per model: modules are not re-entrant across threads.
        with self._lock, torch.inference_mode(), autocast:
            y = None
            for quarter_turns, flip in transforms:
                out = self._model_output(_dihedral(x, quarter_turns, flip), shape=x.shape)
                out = _dihedral(out.float(), quarter_turns, flip, inverse=True)
                y = out if y is None else y + out
            y = y / len(transforms)
        # The model predicts within its normalisation range (its targets were clipped to it); what lies
        # outside comes back from the input (_outside_range), so a prediction past the edge would
        # count twice, e.g. shift air at -1024 HU further down.
        hu = self.normalization.to_hu(y.float()[:, 0].clamp(0.0, 1.0))  # (b, h, w)
        return hu.cpu().numpy().astype(np.float32, copy=False)

    def _model_output(self, x: torch.Tensor, *, shape: tuple[int, ...]) -> torch.Tensor:
        """The model on ``x``, checked to be an image of ``x``'s shape (``shape``: the untransformed input's)."""
        y = self.model(x)
        if isinstance(y, (tuple, list)):  # tolerate models returning (image, extras)
            y = y[0]
        if tuple(y.shape) != tuple(x.shape):
            raise CheckpointError(
                f"The model returned shape {tuple(y.shape)} for an input of shape {tuple(shape)}; "
                "this checkpoint is not an image-to-image denoiser."
            )
        return y


SELF_ENSEMBLE: tuple[tuple[int, bool], ...] = tuple((k, flip) for flip in (False, True) for k in range(4))
"""(quarter turns, left-right flip) of the 8 inputs a self-ensemble averages; the first is the identity."""


def _dihedral(x: torch.Tensor, quarter_turns: int, flip: bool, *, inverse: bool = False) -> torch.Tensor:
    """Flip the last axis (if ``flip``), then turn the last two by ``quarter_turns``; or undo both."""
    import torch

    if not inverse:
        x = torch.flip(x, dims=(-1,)) if flip else x
        return torch.rot90(x, quarter_turns, dims=(-2, -1)) if quarter_turns else x
    x = torch.rot90(x, -quarter_turns, dims=(-2, -1)) if quarter_turns else x
    return torch.flip(x, dims=(-1,)) if flip else x


def trained_kernels(meta: dict) -> list[str] | None:
    """The reconstruction kernels of a denoiser's training pairs, from its checkpoint record.

    Bundled weights record each stage (``training.seed``); a run's checkpoint records its own
    run (``training``). ``None`` when the record does not say (older or foreign checkpoints).
    """
    training = meta.get("training") if isinstance(meta, dict) else None
    if not isinstance(training, dict):
        return None
    for record in (training.get("seed"), training.get("redcnn"), training):
        data = record.get("data") if isinstance(record, dict) else None
        train = data.get("train") if isinstance(data, dict) else None
        kernels = train.get("kernels") if isinstance(train, dict) else None
        if isinstance(kernels, list) and any(isinstance(k, str) for k in kernels):
            return sorted({k for k in kernels if isinstance(k, str)})
    return None


def series_kernel(metadata: dict | None) -> str | None:
    """A series' reconstruction kernel from its DICOM fields (``ConvolutionKernel``), if recorded."""
    kernel = (metadata or {}).get("ConvolutionKernel")
    if isinstance(kernel, (list, tuple)):
        kernel = "/".join(str(k) for k in kernel)
    kernel = str(kernel).strip() if kernel is not None else ""
    return kernel or None


SHARP_KERNEL_WORDS = ("BONE", "LUNG", "EDGE", "SHARP", "DETAIL")
"""Kernel names (other vendors' style, e.g. GE's BONE, LUNG, EDGE) that mean a sharp kernel."""


def is_sharp_kernel(kernel: str | None) -> bool:
    """Whether a DICOM ``ConvolutionKernel`` names a sharp kernel (a heuristic on the name).

    Siemens names carry the sharpness as a number after the letters (B30f smooth, D45 medium,
    B70f, Br64 sharp): 60 and above counts as sharp. Other vendors' names count when they hold
    one of :data:`SHARP_KERNEL_WORDS`.
    """
    name = (kernel or "").strip().upper()
    number = re.match(r"^[A-Z]{1,3}(\d{2})", name)
    if number:
        return int(number.group(1)) >= 60
    return any(word in name for word in SHARP_KERNEL_WORDS)


def kernel_advice(trained: Sequence[str] | None, kernel: str | None, *, weights: str | None = None) -> str | None:
    """A warning when a series' kernel is not one the denoiser was trained on (``None``: no reason to warn).

    A denoiser learns the noise texture of the kernels it saw; on a sharper kernel it also
    removes the kernel's own fine texture (measured: the bundled model on a B70f chest scan).
    On a sharp kernel the advice names the bundled sharp-kernel weights, unless ``weights``
    (the ``info["weights"]`` of the loaded denoiser) already is them.
    """
    if not trained or not kernel or kernel in trained:
        return None
    advice = (f"This series was reconstructed with the kernel {kernel}; the model was trained on {', '.join(trained)} "
              "only. On a kernel it has not seen it may smooth away the kernel's own texture with the noise (sharp "
              "kernels most): compare with the input, lower the strength, or fine-tune the model on pairs from your "
              "scanner (python -m training seed --init ...).")
    if is_sharp_kernel(kernel) and weights != "sharp":
        advice += (" For a sharp kernel, try the bundled sharp-kernel weights (Weights: 'Bundled, sharp kernels'; "
                   "CLI: --weights sharp).")
    return advice


def _find_preset(config: dict) -> str | None:
    """The preset a checkpoint's architecture config records (``preset`` or ``name``), if any.

    SEED configs are ``{"encoder": ..., "seed": ...}``: the denoiser's own preset comes first;
    a SEED with its own decoder widths (``custom``) reads e.g. ``lite, decoder 128-64-48-48``
    (its encoder's preset and its decoder channels).
    """
    seed, encoder = config.get("seed"), config.get("encoder")
    if isinstance(seed, dict) and seed.get("name") == "custom" and isinstance(encoder, dict):
        channels = seed.get("decoder_channels")
        if isinstance(encoder.get("name"), str) and isinstance(channels, list):
            return f"{encoder['name']}, decoder {'-'.join(str(c) for c in channels)}"
    for section in (config, config.get("seed"), config.get("redcnn"), config.get("encoder")):
        if isinstance(section, dict):
            for key in ("preset", "name"):
                if isinstance(section.get(key), str):
                    return section[key]
    return None


def _scan_backend(device: torch.device) -> str | None:
    try:
        from napari_langmamba.models.scan import scan_backend
    except ImportError:  # the model core without a scan module cannot build SEED anyway
        return None
    return str(scan_backend(device))
