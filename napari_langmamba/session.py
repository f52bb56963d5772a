"""The decisions every path from a CT image to a model shares, taken once.

The Denoise and Tokens widgets, the CLI, the benchmarks and the training package's evaluation
all reach a model through here, so each of these rules has one home:

* **Weights.** :func:`resolve_weights` turns ``"default"`` or a path into a checkpoint
  (:data:`DEFAULT_WEIGHTS_DIR` holds the bundled denoiser, its ``langae/`` sub-folder the LangAE
  whose tokens explain it; a training run folder gives its ``best``, else its ``last``,
  checkpoint). :func:`default_weights_info` reads the bundle's provenance.
* **Device.** :func:`resolve_device`: ``"auto"`` is CUDA, then Apple MPS, then the CPU; a named
  device is checked against what this machine has.
* **One model cache.** :data:`MODEL_CACHE` keeps the last few loaded models, denoisers and
  LangAEs alike, under one lock, keyed by role, checkpoint path, a hash of its content (so a
  checkpoint rewritten in place is loaded again) and device; :func:`load_cached` is the way in.
* **The current slice.** :func:`current_slice_index` / :func:`current_slice`: the slice of a
  layer that napari shows at the viewer's point, by napari's own rule (the data coordinate of
  every leading axis rounded with :func:`numpy.round`; a point outside the layer shows nothing
  and is refused); :func:`require_axial_view` checks that the view shows such slices.
* **Layers and derived volumes.** :func:`layer_volume` is the :class:`CTVolume` a CT layer (or a
  slab of its slices) shows; :func:`derived_volume` is a model's output for a volume, with the
  same geometry and a copy of its DICOM fields (the CLI writes it, the Denoise widget shows it);
  :func:`slab_translate` places a slab's layer over the slices it came from.
* **Slice preparation.** :func:`prepare_slice` validates a ``(y, x)`` slice in HU, applies the one
  policy for values that are not finite (they are read as air, the normalisation's lowest HU,
  with a :class:`RuntimeWarning`; a slice with no finite value is refused), normalises it with
  the checkpoint's :class:`~napari_langmamba.windowing.Normalization` and pads it at the bottom
  and right, by reflection, to a multiple of :data:`STRIDE`.

Nothing here imports Qt or napari (a layer is anything with napari's ``data``, ``ndim``,
``multiscale``, ``rgb``, ``name`` and ``world_to_data``; the viewer's dims anything with
``ndim``, ``ndisplay`` and ``displayed``); torch is imported only when a device or a model is
needed.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import threading
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import numpy as np

from napari_langmamba.errors import CheckpointError, ConfigError
from napari_langmamba.io.layers import layer_to_volume
from napari_langmamba.io.volume import PER_SLICE_METADATA, CTVolume
from napari_langmamba.windowing import MODEL_NORMALIZATION, Normalization

if TYPE_CHECKING:
    import torch

__all__ = [
    "BUNDLED_WEIGHTS",
    "DEFAULT_WEIGHTS_DIR",
    "MODEL_CACHE",
    "MODEL_ROLES",
    "SHARP_WEIGHTS_DIR",
    "STRIDE",
    "ModelCache",
    "PreparedSlice",
    "available_devices",
    "bundled_name",
    "check_real_dtype",
    "clear_model_cache",
    "current_slice",
    "current_slice_index",
    "default_weights_info",
    "derived_volume",
    "fingerprint",
    "layer_volume",
    "load_cached",
    "pad_to_stride",
    "padded_shape",
    "prepare_slice",
    "require_axial_view",
    "resolve_device",
    "resolve_weights",
    "slab_translate",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / "default"
"""The bundled checkpoint inside the package: the denoiser, and its LangAE under ``langae/``."""

SHARP_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / "sharp"
"""The bundled denoiser for sharp kernels (built on the default bundle's LangAE, which it reuses)."""

BUNDLED_WEIGHTS = ("default", "sharp")
"""Names that ``resolve_weights`` takes for the checkpoints shipped inside the package."""

MODEL_ROLES = ("denoiser", "langae")
"""What a checkpoint is loaded as: an image-to-image denoiser or the LangAE of the tokens."""

RUN_CHECKPOINT_NAMES = ("best", "last")
"""Inside a training run folder, the checkpoints tried in this order."""

STRIDE = 16
"""Image sides reaching a network are multiples of this (the LangAE encoder downsamples by 16)."""

MODEL_CACHE_SIZE = 4
_HASH_CHUNK = 1 << 20


# --- devices ----------------------------------------------------------------------------------
def available_devices() -> list[str]:
    """Devices this machine can run on, e.g. ``["cpu"]`` or ``["cpu", "cuda"]``."""
    import torch

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return devices


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA, then Apple MPS, then CPU; otherwise the named device, checked.

    Raises
    ------
    ConfigError
        When the device is unknown or not available on this machine.
    """
    import torch

    name = str(device).strip().lower()
    available = available_devices()
    if name == "auto":
        return torch.device("cuda" if "cuda" in available else "mps" if "mps" in available else "cpu")
    base = name.split(":", 1)[0]
    if base not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"Unknown device {device!r}; choose auto, cpu, cuda (or cuda:N) or mps.")
    if base not in available:
        raise ConfigError(
            f"Device {device!r} is not available on this machine (available: {', '.join(available)}); "
            "choose auto or cpu."
        )
    try:
        resolved = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"Invalid device {device!r}: {exc}") from None
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ConfigError(
            f"Device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)."
        )
    return resolved


# --- weights ----------------------------------------------------------------------------------
def _is_checkpoint_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def _is_checkpoint(path: Path) -> bool:
    return _is_checkpoint_folder(path) or (path.is_file() and path.suffix.lower() == ".zip")


def _check_role(role: str) -> None:
    if role not in MODEL_ROLES:
        raise ConfigError(f"Unknown model role {role!r}; choose one of {', '.join(MODEL_ROLES)}.")


def bundled_name(weights: str | Path) -> str | None:
    """``"default"`` or ``"sharp"`` when ``weights`` names bundled weights (any case), else ``None``."""
    name = weights.strip().lower() if isinstance(weights, str) else None
    return name if name in BUNDLED_WEIGHTS else None


def _bundled_checkpoint(name: str, role: str) -> Path:
    if name == "sharp" and role == "denoiser":
        if not _is_checkpoint_folder(SHARP_WEIGHTS_DIR):
            raise CheckpointError(
                f"The bundled sharp-kernel weights are missing: expected a checkpoint folder at "
                f"{SHARP_WEIGHTS_DIR}. Choose the default weights or a checkpoint instead."
            )
        return SHARP_WEIGHTS_DIR
    # the sharp-kernel SEED was trained on the default bundle's LangAE: its tokens are that one's
    return _default_checkpoint(role)


def _default_checkpoint(role: str) -> Path:
    if role == "langae":
        path = DEFAULT_WEIGHTS_DIR / "langae"
        if not _is_checkpoint_folder(path):
            raise CheckpointError(
                f"The bundled default LangAE weights are not installed (expected a checkpoint folder at "
                f"{path}). Choose a LangAE checkpoint folder instead, or reinstall napari-langmamba with "
                "its bundled weights."
            )
        return path
    if not _is_checkpoint_folder(DEFAULT_WEIGHTS_DIR):
        raise CheckpointError(
            f"The bundled default weights are missing: expected a checkpoint folder "
            f"(config.json + model.safetensors) at {DEFAULT_WEIGHTS_DIR}. This copy of "
            "napari-langmamba ships without them; choose a checkpoint or a training run "
            "folder instead (CLI: --weights PATH)."
        )
    return DEFAULT_WEIGHTS_DIR


def _run_checkpoint(path: Path) -> Path | None:
    """A training run folder's ``best`` checkpoint, else its ``last`` (folder or ``.zip``), if any."""
    for name in RUN_CHECKPOINT_NAMES:
        for parent in (path, path / "checkpoints"):
            for candidate in (parent / name, parent / f"{name}.zip"):
                if _is_checkpoint(candidate):
                    logger.info("training run %s: using its %s checkpoint %s", path, name, candidate)
                    return candidate.resolve()
    return None


def resolve_weights(weights: str | Path = "default", *, role: str = "denoiser") -> Path:
    """The checkpoint (folder or ``.zip``) that ``weights`` names for a model ``role``.

    ``"default"`` is the bundled checkpoint: :data:`DEFAULT_WEIGHTS_DIR` for the denoiser, its
    ``langae/`` sub-folder for the LangAE; ``"sharp"`` the bundled sharp-kernel denoiser
    (:data:`SHARP_WEIGHTS_DIR`, with the default LangAE). A denoiser may be given as a training run folder (its
    ``best`` checkpoint, else its ``last``, each looked for as a folder or ``.zip``, directly
    inside the run or in its ``checkpoints/`` sub-folder); a LangAE as any folder holding a
    ``langae/`` checkpoint (a denoiser bundle). What the checkpoint holds is checked when it
    is loaded.

    Raises
    ------
    CheckpointError
        When nothing usable is there, saying what was expected and what was found.
    """
    _check_role(role)
    name = bundled_name(weights)
    if name is not None:
        return _bundled_checkpoint(name, role)
    path = Path(weights).expanduser()
    if role == "langae":
        if not path.exists():
            raise CheckpointError(
                f"No checkpoint at {path}; choose a LangAE checkpoint folder (or its .zip)."
            )
        if path.is_dir() and (path / "langae").exists():  # a denoiser bundle: the LangAE it was built on
            return path / "langae"
        return path
    if not path.exists():
        raise CheckpointError(
            f"No checkpoint at {path}: the path does not exist. Give a checkpoint folder "
            "(config.json + model.safetensors), its .zip, or a training run folder."
        )
    path = path.resolve()
    if path.is_file():
        if path.suffix.lower() != ".zip":
            raise CheckpointError(
                f"{path} is not a checkpoint: expected a checkpoint folder (config.json + "
                "model.safetensors), its .zip, or a training run folder."
            )
        return path
    if _is_checkpoint_folder(path):
        return path
    found = _run_checkpoint(path)
    if found is not None:
        return found
    listing = sorted(p.name for p in path.iterdir())[:10]
    raise CheckpointError(
        f"{path} is neither a checkpoint folder (config.json + model.safetensors) nor a training "
        f"run folder with a 'best' or 'last' checkpoint; it holds: {', '.join(listing) or 'nothing'}."
    )


def default_weights_info() -> dict | None:
    """The bundled default checkpoint's ``config.json`` (its provenance), or ``None`` if absent."""
    config = DEFAULT_WEIGHTS_DIR / "config.json"
    if not _is_checkpoint_folder(DEFAULT_WEIGHTS_DIR):
        return None
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"The bundled default weights' config {config} is unreadable: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"The bundled default weights' config {config} is not a JSON object.")
    return data


def _sha256_stream(stream: Any) -> str:
    digest = hashlib.sha256()
    for chunk in iter(lambda: stream.read(_HASH_CHUNK), b""):
        digest.update(chunk)
    return digest.hexdigest()


def fingerprint(path: Path) -> tuple[str, str]:
    """``(weights_sha256, content_key)`` of a resolved checkpoint folder or ``.zip``.

    The first is the SHA-256 of ``model.safetensors`` (the same whether zipped or not), the
    provenance users see; the second also covers the config, so editing either reloads.
    """
    path = Path(path)
    try:
        if path.is_dir():
            with open(path / "model.safetensors", "rb") as fh:
                weights_sha = _sha256_stream(fh)
            config_sha = hashlib.sha256((path / "config.json").read_bytes()).hexdigest()
        else:
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n.rsplit("/", 1)[-1] == "model.safetensors"]
                if len(names) != 1:
                    raise CheckpointError(
                        f"{path} is not a checkpoint archive: expected exactly one model.safetensors "
                        f"inside, found {len(names)}."
                    )
                with archive.open(names[0]) as fh:
                    weights_sha = _sha256_stream(fh)
            with open(path, "rb") as fh:
                config_sha = _sha256_stream(fh)
    except (OSError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"Cannot read the checkpoint at {path}: {exc}") from None
    return weights_sha, hashlib.sha256((weights_sha + config_sha).encode()).hexdigest()


# --- the model cache --------------------------------------------------------------------------
class ModelCache:
    """A small least-recently-used cache of loaded models, safe to use from worker threads.

    Keys are ``(role, ...)`` tuples, the role one of :data:`MODEL_ROLES`, so one cache serves the
    denoisers and the LangAEs and :meth:`clear` can forget one role.
    """

    def __init__(self, size: int = MODEL_CACHE_SIZE) -> None:
        if size < 1:
            raise ConfigError(f"A model cache holds at least one model; got size {size}.")
        self.size = int(size)
        self._entries: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get_or_load(self, key: tuple[Hashable, ...], load: Callable[[], T]) -> T:
        """The model cached under ``key``, or ``load()``'s result, cached (oldest evicted)."""
        _check_role(str(key[0]))
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        # loading takes seconds: outside the lock, so a second model can be looked up meanwhile
        model = load()
        with self._lock:
            self._entries[key] = model
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return model

    def models(self, role: str | None = None) -> list[Any]:
        """The cached models (of ``role``, or all), least recently used first."""
        with self._lock:
            return [m for k, m in self._entries.items() if role is None or k[0] == role]

    def clear(self, role: str | None = None) -> None:
        """Forget the cached models of ``role`` (every role when ``None``)."""
        if role is not None:
            _check_role(role)
        with self._lock:
            for key in [k for k in self._entries if role is None or k[0] == role]:
                del self._entries[key]

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


MODEL_CACHE = ModelCache()
"""The one cache of loaded models: :class:`~napari_langmamba.inference.Denoiser` and LangAE."""


def load_cached(
    role: str,
    weights: str | Path,
    device: str,
    build: Callable[[Path, torch.device, str], T],
    *,
    variant: str = "",
) -> T:
    """Load (or reuse) the model of ``role`` a checkpoint holds, on a device.

    Parameters
    ----------
    role
        ``"denoiser"`` or ``"langae"`` (:data:`MODEL_ROLES`): how ``weights`` is resolved.
    weights
        As for :func:`resolve_weights`.
    device
        As for :func:`resolve_device`.
    build
        ``build(path, device, weights_sha256)`` builds the model when it is not cached.
    variant
        Anything else that tells two loads of one checkpoint apart (e.g. mixed precision).

    Returns
    -------
    The model, cached per (role, checkpoint path, content hash, device, variant) in
    :data:`MODEL_CACHE`: loading again is free until the checkpoint changes on disk.
    """
    path = resolve_weights(weights, role=role)
    torch_device = resolve_device(device)
    weights_sha, content_key = fingerprint(path)
    key = (role, str(path), content_key, str(torch_device), variant)
    return MODEL_CACHE.get_or_load(key, lambda: build(path, torch_device, weights_sha))


def clear_model_cache(role: str | None = None) -> None:
    """Forget the cached models of ``role`` (all of them when ``None``)."""
    MODEL_CACHE.clear(role)


# --- slices -----------------------------------------------------------------------------------
class PreparedSlice(NamedTuple):
    """A slice ready for a network, and what it took to get there."""

    hu: np.ndarray
    """``(h, w)`` float32 HU, values that were not finite replaced by the normalisation's lowest HU."""
    norm: np.ndarray
    """``(H, W)`` float32 in ``[0, 1]``: ``hu`` normalised and padded to multiples of :data:`STRIDE`."""
    padding: tuple[tuple[int, int], tuple[int, int]]
    """``((top, bottom), (left, right))`` pixels added; only bottom and right are ever non-zero."""


def check_real_dtype(dtype: Any) -> None:
    """Refuse an image whose values are not real numbers (complex, bool, text, objects)."""
    if dtype is None:
        return
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise ConfigError(f"A CT image holds real-valued HU; got dtype {dtype}.")


def padded_shape(shape: Sequence[int]) -> tuple[int, int]:
    """``(h, w)`` rounded up to multiples of :data:`STRIDE`."""
    h, w = (int(v) for v in shape[-2:])
    return (-(-h // STRIDE) * STRIDE, -(-w // STRIDE) * STRIDE)


def pad_to_stride(image: np.ndarray, padded: tuple[int, int] | None = None) -> np.ndarray:
    """Pad a ``(h, w)`` image at the bottom/right to ``padded`` (default :func:`padded_shape`).

    Reflection, so the network sees plausible anatomy rather than an edge; edge mode for a
    one-pixel axis, which has nothing to reflect.
    """
    h, w = image.shape
    target = padded_shape(image.shape) if padded is None else padded
    pad = ((0, target[0] - h), (0, target[1] - w))
    if pad == ((0, 0), (0, 0)):
        return image
    return np.pad(image, pad, mode="reflect" if min(h, w) > 1 else "edge")


def prepare_slice(
    hu_slice: Any, normalization: Normalization = MODEL_NORMALIZATION, *, stacklevel: int = 2
) -> PreparedSlice:
    """One ``(y, x)`` slice in HU -> :class:`PreparedSlice` for a network.

    Values that are not finite (NaN, +-inf: missing data, a failed reconstruction) are read as
    air, the normalisation's lowest HU, with a :class:`RuntimeWarning` (``stacklevel`` as for
    :func:`warnings.warn`, counted from the caller); a slice with no finite value at all is
    refused, there being nothing to compute on.

    Raises
    ------
    ConfigError
        When the slice is not 2-D, is empty, is not real-valued or holds no finite value.
    """
    array = np.asarray(hu_slice)
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
        raise ConfigError(f"A model takes one 2D slice (rows, columns); got an array of shape {array.shape}.")
    check_real_dtype(array.dtype)
    hu = np.ascontiguousarray(array, dtype=np.float32)
    finite = np.isfinite(hu)
    if not finite.all():
        if not finite.any():
            raise ConfigError(
                "The slice holds only NaN or infinite values: there is no image to compute on; "
                "choose another slice or replace them (e.g. with -1000 HU, air) first."
            )
        warnings.warn(
            f"The slice holds {int(hu.size - finite.sum())} NaN or infinite value(s); the model reads "
            f"them as air ({normalization.hu_min:g} HU, the lowest of its range).",
            RuntimeWarning, stacklevel=stacklevel,
        )
        hu = np.where(finite, hu, np.float32(normalization.hu_min)).astype(np.float32)
    padded = padded_shape(hu.shape)
    norm = pad_to_stride(np.asarray(normalization.to_model(hu), dtype=np.float32), padded)
    padding = ((0, padded[0] - hu.shape[0]), (0, padded[1] - hu.shape[1]))
    return PreparedSlice(hu, norm, padding)


# --- the current slice ------------------------------------------------------------------------
def require_axial_view(dims: Any, *, what: str) -> None:
    """Refuse unless the viewer shows 2-D slices across the last two axes (in either order).

    ``what`` names the tool in the message, e.g. ``"Compare"``.
    """
    ndim = int(dims.ndim)
    if int(dims.ndisplay) != 2 or sorted(int(a) for a in dims.displayed) != [ndim - 2, ndim - 1]:
        raise ConfigError(
            f"{what} works on axial slices (the last two axes) in the 2-D view: switch the viewer "
            "to 2-D and reset the axis order."
        )


def _layer_data(layer: Any) -> Any:
    """The full-resolution data of a layer (level 0 of a multiscale one)."""
    return layer.data[0] if getattr(layer, "multiscale", False) else layer.data


def current_slice_index(layer: Any, world_point: Sequence[float]) -> tuple[int, ...]:
    """The index along ``layer``'s leading axes of the 2-D slice napari shows at ``world_point``.

    ``world_point`` is the viewer's ``dims.point`` (world coordinates, any length: the last
    ``layer.ndim`` values are used). The layer's scale, translate and affine map it to data
    coordinates, which are rounded as napari rounds them when it slices (:func:`numpy.round`);
    a 2-D layer has the empty index ``()``.

    Raises
    ------
    ConfigError
        When the layer has fewer than two axes, or the point lies outside the layer along a
        leading axis (napari shows nothing of the layer there).
    """
    shape = tuple(int(n) for n in np.shape(_layer_data(layer)))
    if len(shape) < 2:
        raise ConfigError(f"{layer.name!r} has {len(shape)} dimension(s); a CT slice needs two.")
    lead = len(shape) - 2
    if not lead:
        return ()
    position = np.asarray(layer.world_to_data(np.asarray(world_point, dtype=float)), dtype=float)[:lead]
    index = tuple(int(np.round(v)) for v in position)
    for axis, (i, n) in enumerate(zip(index, shape[:lead], strict=True)):
        if not 0 <= i < n:
            where = "slice" if lead == 1 else f"index along axis {axis}"
            raise ConfigError(
                f"The viewer's current slice lies outside layer {layer.name!r} ({where} {i} of 0..{n - 1}); "
                "move the slider onto it."
            )
    return index


def current_slice(layer: Any, world_point: Sequence[float]) -> tuple[tuple[int, ...], np.ndarray]:
    """:func:`current_slice_index` and that slice's data, float32 (HU for a CT layer).

    Raises
    ------
    ConfigError
        As :func:`current_slice_index`, and for an RGB layer (not a CT image).
    """
    if getattr(layer, "rgb", False):
        raise ConfigError(f"{layer.name!r} is an RGB image; a CT image in HU is needed.")
    index = current_slice_index(layer, world_point)
    return index, np.asarray(_layer_data(layer)[index], dtype=np.float32)


# --- layers and derived volumes ---------------------------------------------------------------
def layer_volume(layer: Any, slices: slice | None = None) -> CTVolume:
    """The :class:`CTVolume` a CT image layer shows, or the slab ``slices`` of a 3-D one.

    The data (float32 HU) with the geometry and DICOM fields of ``layer.metadata["ct"]`` and the
    layer's scale as spacing (:func:`~napari_langmamba.io.layer_to_volume`). A slab's origin is
    its first slice's position, and the per-slice DICOM fields are cut to its slices.
    """
    data = _layer_data(layer)
    n_slices = int(np.shape(data)[0])
    if slices is not None:
        if int(layer.ndim) != 3:
            raise ConfigError(f"A slab of slices is taken from a 3-D layer; {layer.name!r} has {layer.ndim} axes.")
        data = data[slices]
    volume = layer_to_volume(data, {"scale": layer.scale, "metadata": layer.metadata, "rgb": layer.rgb})
    if slices is None:
        return volume
    start, stop, step = slices.indices(n_slices)
    if step != 1:
        raise ConfigError("A slab is a run of consecutive slices.")
    origin = np.asarray(volume.origin) + start * volume.spacing[0] * volume.direction[0]
    metadata = dict(volume.metadata)
    for key in PER_SLICE_METADATA:
        values = metadata.get(key)
        if isinstance(values, list):
            if len(values) == n_slices:
                metadata[key] = values[start:stop]
            else:
                del metadata[key]  # they do not describe this layer's slices
    return dataclasses.replace(volume, origin=tuple(origin), metadata=metadata)


def derived_volume(volume: CTVolume, hu: np.ndarray) -> CTVolume:
    """A model's output ``hu`` for ``volume``: its geometry, a copy of its DICOM fields, no source.

    ``hu`` has ``volume``'s shape. Nothing holds the result on disk yet (``source`` is None); a
    DICOM export makes it a derived series of ``volume`` (new UIDs, the same positions).
    """
    hu = np.asarray(hu)
    if hu.shape != volume.hu.shape:
        raise ConfigError(f"A derived volume has its source's shape {volume.hu.shape}; got {hu.shape}.")
    return dataclasses.replace(volume, hu=hu, metadata=copy.deepcopy(volume.metadata), source=None)


def slab_translate(layer: Any, start: int) -> np.ndarray:
    """The ``translate`` that shows a slab beginning at slice ``start`` of ``layer`` over it.

    The shift is slice ``start``'s offset in world space (through the layer's scale, rotation,
    shear and affine), undone by the layer's affine so that a layer with the same scale,
    rotation, shear and affine and this translate lands exactly on those slices.
    """
    translate = np.asarray(layer.translate, dtype=float)
    if not start:
        return translate
    step = np.asarray(layer.data_to_world([start] + [0] * (layer.ndim - 1)), dtype=float)
    step -= np.asarray(layer.data_to_world([0] * layer.ndim), dtype=float)
    return translate + np.linalg.solve(layer.affine.linear_matrix, step)
