"""Torch models of napari-langmamba (no Qt, no napari) and the registry of checkpoint kinds.

Importing this package is cheap: torch and the model modules load only when a function here is
called or a model class is first accessed (``from napari_langmamba.models import LangAE``).

Kinds and their ``config`` (as stored in a checkpoint's ``config.json``)
-----------------------------------------------------------------------
``"langae"``  ``LangAEConfig.to_dict()``; needs the codebook its checkpoint names.
``"seed"``    ``{"encoder": LangAEConfig dict, "seed": SEEDConfig dict}``: the frozen LangAE encoder
              is rebuilt from the first and its weights come from the checkpoint's state dict.
``"redcnn"``  ``REDCNNConfig.to_dict()``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from napari_langmamba.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from napari_langmamba.models.codebook import Codebook

__all__ = ["KINDS", "build_model_from_config", "model_config", "needs_codebook"]

KINDS: tuple[str, ...] = ("langae", "seed", "redcnn")

# Public names resolved lazily from their modules on first access.
_LAZY: dict[str, str] = {
    "Codebook": "codebook",
    "load_codebook": "codebook",
    "LangAE": "langae",
    "LangAEConfig": "langae",
    "Encoder": "langae",
    "Decoder": "langae",
    "PyramidOutput": "quantizer",
    "PyramidQuantizer": "quantizer",
    "pyramid_positions": "quantizer",
    "pyramid_semantic_loss": "quantizer",
    "LangDALoss": "losses",
    "SEED": "seed",
    "SEEDConfig": "seed",
    "REDCNN": "redcnn",
    "REDCNNConfig": "redcnn",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ConfigError(f"Unknown model kind {kind!r}; expected one of {', '.join(KINDS)}.")
    return kind


def needs_codebook(kind: str) -> bool:
    """Whether models of this kind hold a language codebook (and checkpoints must name it)."""
    return _check_kind(kind) == "langae"


def build_model_from_config(kind: str, config: dict, *, codebook: Codebook | None = None) -> nn.Module:
    """A freshly initialised model of ``kind`` from its config dict (see the module docstring).

    Raises
    ------
    ConfigError
        Unknown kind, malformed config, or a missing codebook for ``"langae"``.
    """
    _check_kind(kind)
    if not isinstance(config, dict):
        raise ConfigError(f"A {kind} config is a JSON object; got {type(config).__name__}.")
    if kind == "langae":
        from napari_langmamba.models.langae import LangAE, LangAEConfig

        if codebook is None:
            raise ConfigError("Building a LangAE needs its codebook (load_codebook(spec)).")
        return LangAE(LangAEConfig.from_dict(config), codebook=codebook)
    if kind == "seed":
        missing = sorted({"encoder", "seed"} - set(config))
        extra = sorted(set(config) - {"encoder", "seed"})
        if missing or extra:
            raise ConfigError(
                f"A SEED config has exactly the keys 'encoder' and 'seed'; missing {missing}, unexpected {extra}."
            )
        from napari_langmamba.models.langae import Encoder, LangAEConfig
        from napari_langmamba.models.seed import SEED, SEEDConfig

        encoder = Encoder(LangAEConfig.from_dict(config["encoder"]))
        return SEED(SEEDConfig.from_dict(config["seed"]), encoder=encoder)
    from napari_langmamba.models.redcnn import REDCNN, REDCNNConfig

    return REDCNN(REDCNNConfig.from_dict(config))


def model_config(kind: str, model: nn.Module) -> dict:
    """The config dict that rebuilds ``model`` with :func:`build_model_from_config`."""
    _check_kind(kind)
    try:
        if kind == "seed":
            return {"encoder": model.encoder.config.to_dict(), "seed": model.config.to_dict()}
        return model.config.to_dict()
    except AttributeError as exc:
        raise ConfigError(
            f"Cannot derive a {kind} config from {type(model).__name__}; pass config= explicitly."
        ) from exc
