"""Stage 1, ``langae``: train the LangAE (VQGAN autoencoder with a frozen language codebook).

Loss (LangMamba, Eq. 3-5; taming-transformers' VQGAN recipe)::

    L_VQGAN = L2(x, x_hat) + beta * L_commit + gamma * lambda_adapt * L_GAN + eta * L_perceptual
    L       = L_VQGAN + alpha * omega * L_semantic,     omega = L_VQGAN / L_semantic (no gradient)

- ``L2``: mean squared error in the model's [0, 1] scale;
- ``L_commit``: the quantizer's commitment loss (``beta`` is the LangAE config's
  ``commitment_beta``, so it is stored with the checkpoint);
- ``L_GAN``: PatchGAN hinge loss (:mod:`training.gan`), on from step ``--disc-start``, scaled
  by taming's adaptive weight ``lambda_adapt`` (gradient norms at the decoder's last layer);
  the discriminator is trained with the hinge loss on the same steps;
- ``L_perceptual``: LPIPS-style VGG16 distance, only with ``--perceptual-weights`` (local
  safetensors; nothing is downloaded); without them the term is off and the log says so;
- ``L_semantic``: the pyramid semantic loss. With ``--candidates FILE`` (stage 0: ``lexicon`` or
  the paper's ``clip:<dir>`` PubMedCLIP pools) one pool per image and layer; otherwise, with
  ``--scorer anatomy`` (the default), **one pool per region of every pyramid layer** from the
  tissue map of the normal-dose slice (:mod:`napari_langmamba.anatomy`, a physical tissue prior,
  not organ segmentation): the map is made on the whole slice and cropped, flipped and rotated
  with the image, and each region's pool holds the words of the tissue classes covering it
  (:class:`training.candidates.AnatomyScorer`). ``--scorer none`` turns the term off.

Fine-tuning: ``--init DIR`` starts from the weights of a LangAE checkpoint (fresh optimizer and
step count) whose codebook is the same language-model table (e.g. a ``minilm`` checkpoint for a
``words:minilm`` run: the displayable words are rows of the full table); ``--freeze-features``
freezes ``conv_in`` and ``encoder.down[:-1]``, exactly the layers SEED's frozen encoder uses
(``Encoder.forward_features``), so a SEED trained on that encoder stays valid. ``--train-part``
fine-tunes one part of an ``--init`` checkpoint and freezes the rest (a SEED on it stays valid):
``words`` trains only the word head, the layers between SEED's features and the words
(``encoder.down[-1]``, ``encoder.mid``, ``encoder.norm_out``, ``encoder.conv_out``,
``quant_conv`` and, with ``--region-pixels``, the region-pixel MLP), on ``beta * L_commit + alpha * L_semantic`` (no omega: nothing else is trained
for it to balance; the reconstruction is logged, not optimised) and keeps the checkpoint with the
best validation word agreement; ``decoder`` then trains ``post_quant_conv`` and the
decoder on the reconstruction alone, so the decoder learns to read the new words. With the anatomy
codebook words, validation also logs ``word_agreement``: the share of layer-3 regions dominated
(>= 60 % of pixels) by one tissue class whose word is one of that class's words, pooled over the
validation slices (``benchmarks/token_agreement.py`` measures the same on the product's path).
The run's ``config.json`` records the scorer with its class words, the initial checkpoint and the
frozen parts.

Defaults are the paper's: alpha 0.3, beta 0.3, gamma 0.1, eta 0.1, Adam with betas (0.5, 0.9)
and learning rate 4.5e-6 x (batch size x processes), taming's scaling.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from napari_langmamba.errors import ConfigError
from napari_langmamba.models.langae import REGION_HEADS, WORD_CHOICES
from napari_langmamba.models.quantizer import POOL_TARGETS
from training.common import (
    add_train_arguments,
    command_line,
    crop_to_multiple,
    default_of,
    file_sha256,
    fit_stage,
    make_stage_data,
    parse_window,
    run_stage,
    split_source,
    validation,
)
from training.config import add_option
from training.datasets import NDCTDataset
from training.options import BALANCE_BY, SCORERS, TRAIN_PARTS, WORD_PARTS, LangAEOptions

logger = logging.getLogger(__name__)

__all__ = ["LangAEOptions", "LangAEStep", "SemanticPrior", "TissueNDCTDataset", "add_arguments", "freeze_features",
           "freeze_all_but", "init_from_checkpoint", "main", "reconstruction_metrics", "seed_feature_prefixes"]

STAGE = "langae"
FROZEN_FEATURES = ("encoder.conv_in", "encoder.down[:-1]")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the options of the ``langae`` stage."""
    parser.description = (
        "Stage 1: train the LangAE, a VQGAN autoencoder whose codebook is a frozen language-model "
        "vocabulary: L = L2 + beta*commitment + gamma*adaptive*PatchGAN + eta*perceptual + "
        "alpha*omega*semantic (omega = L_VQGAN / L_semantic, no gradient). Runs under torchrun unchanged."
    )

    def d(name: str) -> Any:
        return default_of(LangAEOptions, name)

    add_option(parser, "--data", type=Path, nargs="+", metavar="PATH",
               help="normal-dose CT (required): DICOM folders or files, NIfTI, .npy volumes, folders of 2-D .npy "
                    "slices, Mayo 2D roots (their full_1mm/) or simulate output folders (their full/)")
    add_train_arguments(parser, LangAEOptions)
    data = parser.add_argument_group("normal-dose CT")
    add_option(data, "--npy-layout", choices=("hu", "mayo"),
               help=f"values stored in plain .npy files: HU or Mayo's HU+1024 (default {d('npy_layout')})")
    add_option(data, "--slice-step", type=int, metavar="N",
               help=f"use every N-th slice of volumes (default {d('slice_step')})")
    model = parser.add_argument_group("LangAE")
    add_option(model, "--codebook", metavar="SPEC",
               help=f"frozen language codebook: minilm (offline), clip:<local dir or hub id> (PubMedCLIP), "
                    f"random:<n>x<d> (default {d('codebook')})")
    add_option(model, "--candidates", type=Path, metavar="FILE",
               help="per-image candidate token pools from `python -m training candidates` (lexicon, or clip:<dir> "
                    "for PubMedCLIP; made with the same --codebook); replaces --scorer")
    add_option(model, "--scorer", choices=SCORERS,
               help="semantic prior without --candidates: anatomy (a pool per region from the slice's tissue map "
                    f"in HU: a physical prior, not organ segmentation) or none (default {d('scorer')})")
    add_option(model, "--min-share", type=float, metavar="SHARE",
               help="anatomy scorer: a tissue class's words join a region's pool when it covers this share of "
                    f"the region (default {d('min_share')})")
    add_option(model, "--pool-balance", type=float, metavar="P",
               help="weigh each position of the semantic loss by (positions sharing its pool) ** -P, so that rare "
                    f"tissues are not outvoted by air and fat; 0 = plain mean, 1 = every pool equal (default "
                    f"{d('pool_balance')})")
    add_option(model, "--balance-by", choices=BALANCE_BY,
               help="what --pool-balance counts: each pool (combination of tissue classes) or each region's most "
                    "frequent tissue class, so that rare tissues (blood, bone) weigh more but rare mixes of common "
                    f"ones (fat at the skin's edge) do not (anatomy scorer; default {d('balance_by')})")
    add_option(model, "--pool-target", choices=POOL_TARGETS,
               help="the semantic loss's target over a pool: uniform (the paper's: every pool word equally, which "
                    "pulls a position toward the pool's centre) or any (the pool's total probability, so that the "
                    f"nearest word, the one shown, is drawn into the pool) (default {d('pool_target')})")
    add_option(model, "--init", type=Path, metavar="DIR",
               help="start from this LangAE checkpoint's weights (fresh optimizer); its codebook must be the same "
                    "language-model table (minilm weights may train a words:minilm model)")
    add_option(model, "--freeze-features", action="store_true",
               help="freeze encoder.conv_in and encoder.down[:-1], the layers SEED uses, so a SEED trained on this "
                    "encoder stays valid")
    add_option(model, "--region-pixels", action="store_true",
               help="give the words each latent position's own 16 x 16 pixels too (a small MLP added after "
                    "quant_conv, starting at zero; LangAEConfig.region_pixels), so that they can tell tissues of "
                    "close HU apart (enhanced blood from organs); with --init from a checkpoint without it, the "
                    "head is added at zero (the model tokenizes as before until trained); part of the word head")
    add_option(model, "--region-context", type=int, metavar="K",
               help="with --region-pixels: odd size of the head's first layer over the grid of latent positions; 3 "
                    "also shows each position its eight neighbours' pixels (an --init head of a smaller size becomes "
                    f"the centre of the new kernel, the same function) (default {d('region_context')})")
    add_option(model, "--region-head", choices=REGION_HEADS,
               help="with --region-pixels: mlp (each position's own pixels, --region-context wide) or cnn (a small "
                    "CNN that sees about 127 x 127 pixels around each position: the shape and surroundings that tell "
                    "the aorta from a vertebral body of the same HU; an --init MLP head is replaced, at zero) "
                    f"(default {d('region_head')})")
    add_option(model, "--region-wide", action="store_true",
               help="with --region-head cnn: two more dilated convolutions (residual, starting at zero) widen each "
                    "position's view to nearly the whole slice, so the lung's interior is told from the air outside "
                    "the body (an --init CNN head gets them at zero)")
    add_option(model, "--word-choice", choices=WORD_CHOICES,
               help="with --region-head cnn: nearest (each token is the nearest word of the whole vocabulary) or tissue "
                    "(the nearest among the generic words -- tissue, organ, bone, vascular, never liver or rib -- of the tissue classes the head's classifier sees in the token's "
                    "region; train the classifier with --tissue-steps or start from a model whose head is trained; "
                    "the word steps then train only the head's offset, never the classifier) "
                    f"(default {d('word_choice')})")
    add_option(model, "--tissue-steps", type=int, metavar="N",
               help="with --region-head cnn: first train the head's tissue classifier for N steps by cross-entropy "
                    "on the tissue maps (each 16 x 16 region's most frequent class; a few hundred steps, no encoder "
                    "or vocabulary, a fraction of a word step each), so the words start from features that already "
                    f"tell the tissues apart; skipped on --resume (default {d('tissue_steps')})")
    add_option(model, "--train-part", choices=TRAIN_PARTS,
               help="with --init: train only the word head (words: the encoder layers after SEED's features and "
                    "quant_conv, on the semantic and commitment losses; the best checkpoint by validation word "
                    "agreement), only the region-pixel head (region: the same losses, the whole encoder frozen, "
                    "so a step costs a fraction) or only the decoder side (decoder: "
                    f"post_quant_conv and decoder, on the reconstruction), the rest frozen (default {d('train_part')})")
    loss = parser.add_argument_group("loss and optimizer")
    add_option(loss, "--alpha", type=float, help=f"weight of the semantic loss (default {d('alpha')})")
    add_option(loss, "--beta", type=float, help=f"weight of the commitment loss (default {d('beta')})")
    add_option(loss, "--gamma", type=float, help=f"weight of the PatchGAN loss (default {d('gamma')})")
    add_option(loss, "--eta", type=float,
               help=f"weight of the perceptual loss, used only with --perceptual-weights (default {d('eta')})")
    add_option(loss, "--disc-start", type=int, metavar="STEP",
               help=f"switch the GAN loss on from this step (default {d('disc_start')})")
    add_option(loss, "--disc-channels", type=int, metavar="N",
               help=f"channels of the PatchGAN's first layer (default {d('disc_channels')})")
    add_option(loss, "--disc-layers", type=int, metavar="N",
               help=f"stride-2 stages of the PatchGAN (default {d('disc_layers')})")
    add_option(loss, "--perceptual-weights", type=Path, metavar="FILE",
               help="VGG16 'features.*' weights (+ optional LPIPS 'lin*' heads) as a local .safetensors file; "
                    "enables the perceptual loss (off by default: nothing is downloaded)")
    add_option(loss, "--base-lr", type=float, metavar="LR",
               help=f"Adam learning rate per image: lr = base_lr x batch size x processes (default {d('base_lr')})")
    add_option(loss, "--lr", type=float, metavar="LR", help="absolute Adam learning rate (overrides --base-lr)")


def _ndct_sources(options: LangAEOptions) -> tuple[Any, Any | None]:
    from training.datasets import NDCTSlices

    source = NDCTSlices(list(options.data), npy_layout=options.npy_layout, slice_step=options.slice_step)
    if options.val_data:
        return source, NDCTSlices(list(options.val_data), npy_layout=options.npy_layout, slice_step=options.slice_step)
    return split_source(source, options.val_fraction)


class TissueNDCTDataset(NDCTDataset):
    """:class:`NDCTDataset` whose items also carry ``"tissue"``: the (h, w) uint8 tissue map
    (:func:`napari_langmamba.anatomy.tissue_map`) of the whole slice, cut and turned with the same
    crop, flips and rotation as the image (a map made from a crop could not tell lungs touching the
    crop's edge from outside air). Maps are cached per slice (``cache`` slices per process)."""

    def __init__(self, *args: Any, cache: int = 512, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_size = int(cache)
        self._last_transform: Any = None

    def _transform(self, shape: tuple[int, int], key: str) -> Any:
        self._last_transform = super()._transform(shape, key)
        return self._last_transform

    def slice_tissue(self, i: int) -> np.ndarray:
        """The tissue map of whole slice ``i`` of the source."""
        from napari_langmamba.anatomy import tissue_map

        cached = self._cache.get(i)
        if cached is None:
            spacing = getattr(self.source, "pixel_spacing", None)
            cached = tissue_map(self.source.slice_hu(i), pixel_spacing=spacing(i) if callable(spacing) else None)
            self._cache[i] = cached
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(i)
        return cached

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = super().__getitem__(index)
        item["tissue"] = torch.from_numpy(self._last_transform(self.slice_tissue(item["index"])))
        return item


def _stage_dataset(tissue: bool) -> Any:
    """The dataset factory of :func:`make_stage_data`: tissue maps for training items only."""

    def make(source: Any, *, train: bool, **kwargs: Any) -> NDCTDataset:
        cls = TissueNDCTDataset if tissue and train else NDCTDataset
        return cls(source, train=train, **kwargs)

    return make


def _same_language_table(old: Any, new: Any) -> bool:
    """Whether every row of ``new`` is a row of ``old`` (the same table, or a word subset of it)."""
    if old.sha256 == new.sha256:
        return True
    if old.d != new.d or new.n > old.n:
        return False
    rows = {bytes(r) for r in old.embeddings.numpy().astype("<f4")}
    return all(bytes(r) in rows for r in new.embeddings.numpy().astype("<f4"))


def init_from_checkpoint(model: Any, path: Path, codebook: Any) -> dict[str, Any]:
    """Load a LangAE checkpoint's weights into ``model`` (``--init``); returns what to record."""
    from napari_langmamba.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    if ckpt.kind != "langae":
        raise ConfigError(f"--init {path} is a {ckpt.kind} checkpoint; it must be a LangAE checkpoint.")
    if not _same_language_table(ckpt.codebook, codebook):
        raise ConfigError(
            f"--init {path} was trained with the codebook {ckpt.codebook.source!r} ({ckpt.codebook.n} x "
            f"{ckpt.codebook.d}); --codebook {codebook.source!r} ({codebook.n} x {codebook.d}) is not that table "
            "or a word subset of it, so its weights would map to other words. Use the same language model."
        )
    state = dict(ckpt.state_dict)
    # A checkpoint from before --region-pixels (or --region-context) gets the head as the same function.
    added = model.region_pixels.adapt_state_dict(state, "region_pixels.") if model.region_pixels is not None else []
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        preset = ckpt.config.get("name", "another preset")
        raise ConfigError(
            f"--init {path} holds a LangAE of another architecture ({preset}); give the matching --preset and "
            f"--region-pixels as it was trained ({exc})."
        ) from exc
    if added:
        logger.info("--init %s: %s", path, "; ".join(added))
    return {"path": str(path), "sha256": file_sha256(path / "model.safetensors") if path.is_dir() else file_sha256(path),
            "codebook": ckpt.codebook.source, "preset": ckpt.config.get("name")}


def seed_feature_prefixes(encoder: Any) -> tuple[str, ...]:
    """State-dict prefixes (in a LangAE or SEED) of the encoder layers SEED runs: conv_in, down[:-1]."""
    return ("encoder.conv_in.", *(f"encoder.down.{i}." for i in range(len(encoder.down) - 1)))


def freeze_features(model: Any) -> list[str]:
    """Freeze ``encoder.conv_in`` and ``encoder.down[:-1]`` (SEED's encoder); returns their names."""
    for module in (model.encoder.conv_in, *list(model.encoder.down)[:-1]):
        module.requires_grad_(False)
    return list(FROZEN_FEATURES)


# What each --train-part freezes (every other layer trains). The word head is every layer between
# the features SEED uses and the words (the quantizer has no parameters: its codebook is frozen).
FROZEN_MODULES = {"words": ("encoder.conv_in", "encoder.down[:-1]", "post_quant_conv", "decoder"),
                  "region": ("encoder", "quant_conv", "post_quant_conv", "decoder"),
                  "decoder": ("encoder", "quant_conv")}


def _part_modules(model: Any, part: str) -> dict[str, Any]:
    """The layers ``--train-part part`` trains, by name."""
    encoder = model.encoder
    return {"words": {"encoder.down[-1]": encoder.down[-1], "encoder.mid": encoder.mid,
                      "encoder.norm_out": encoder.norm_out, "encoder.conv_out": encoder.conv_out,
                      "quant_conv": model.quant_conv,
                      **({"region_pixels": model.region_pixels} if model.region_pixels is not None else {})},
            "region": {"region_pixels": model.region_pixels},
            "decoder": {"post_quant_conv": model.post_quant_conv, "decoder": model.decoder}}[part]


def freeze_all_but(model: Any, part: str) -> list[str]:
    """Freeze every layer of a LangAE but those ``--train-part part`` trains; returns the frozen names."""
    if part == "all":
        return []
    model.requires_grad_(False)
    for module in _part_modules(model, part).values():
        module.requires_grad_(True)
    extra = ["region_pixels"] if part == "decoder" and model.region_pixels is not None else []
    return [*FROZEN_MODULES[part], *extra]


def main(args: argparse.Namespace) -> int:
    """Run the ``langae`` stage; returns the exit code (errors raise :class:`LangMambaError`)."""
    return run_stage(LangAEOptions, args, stage=STAGE, train=_train)


@dataclasses.dataclass
class SemanticPrior:
    """Where the word pools of a batch come from: a candidates file (one pool per image) or the
    anatomy scorer (one pool per region, from each slice's tissue map); neither turns the
    semantic loss off."""

    n_words: int  # rows of the codebook the pools index
    pools: Any = None  # training.candidates.CandidatePools
    anatomy: Any = None  # training.candidates.AnatomyScorer
    alpha: float = 0.0
    balance: float = 0.0  # exponent of the pool-frequency weights of the semantic loss
    target: str = "uniform"  # the loss's target over a pool (POOL_TARGETS)

    @property
    def on(self) -> bool:
        return self.alpha > 0 and (self.pools is not None or self.anatomy is not None)

    def layer_pools(self, batch: dict, x: torch.Tensor, pyramid: Any) -> Any:
        """The per-layer pool masks of this batch, or ``None`` when the semantic loss is off."""
        if self.pools is not None and self.alpha > 0:
            return self.pools.layer_masks(list(batch["key"]), self.n_words, device=x.device)
        if self.anatomy is not None:
            tissue = batch["tissue"] if "tissue" in batch else self.anatomy.tissue_maps(x)
            return self.anatomy.position_pools(tissue, pyramid.layer_embeddings[2].shape[-2:], device=x.device)
        return None

    def info(self) -> dict[str, Any]:
        if self.pools is not None:
            return {"scorer": self.pools.meta.get("scorer", "candidates"), "per": "image", "pool_balance": self.balance,
                    "pool_target": self.target}
        if self.anatomy is not None:
            return {**self.anatomy.info(), "per": "region", "pool_balance": self.balance, "pool_target": self.target}
        return {"scorer": "none"}


def _semantic_prior(options: LangAEOptions, codebook: Any, train_source: Any, anatomy: Any) -> SemanticPrior:
    """The semantic prior of the run, checked against the training slices."""
    from training.candidates import load_candidate_pools

    pools = None
    if options.candidates is not None:
        pools = load_candidate_pools(options.candidates, codebook=codebook)
        have, total = pools.coverage(train_source.key(i) for i in range(len(train_source)))
        logger.info("candidate pools for %d of %d training slices", have, total)
        if have == 0:
            raise ConfigError(
                f"--candidates {options.candidates} has pools for none of the {total} training slices (ids such as "
                f"{train_source.key(0)!r}); make it with `python -m training candidates` on the same --data."
            )
    elif anatomy is not None:
        logger.info("semantic prior: anatomy (a pool per region from the tissue map of each slice; %s)",
                    ", ".join(f"{k}: {len(v)} words" for k, v in anatomy.class_words.items()))
    elif options.alpha > 0:
        logger.warning("semantic loss off: --scorer none and no --candidates pools file (alpha ignored)")
    return SemanticPrior(n_words=codebook.n, pools=pools, anatomy=anatomy, alpha=float(options.alpha),
                         balance=float(options.pool_balance), target=options.pool_target)


@dataclasses.dataclass
class LangAEStep:
    """One LangAE optimisation step: reconstruction (+ eta * perceptual) + commitment + gamma * GAN
    (after ``disc_start``) + alpha * omega * pyramid semantic loss, omega = L_VQ / L_sem."""

    model: Any  # the unwrapped LangAE
    ddp_model: Any
    device: torch.device
    prior: SemanticPrior
    optimizer: torch.optim.Optimizer
    amp: Any
    options: LangAEOptions
    perceptual: Any = None
    disc: Any = None
    ddp_disc: Any = None
    opt_d: torch.optim.Optimizer | None = None

    def __call__(self, batch: dict, state: Any) -> Any:
        from training.runs import StepOutput

        x = batch["image"].to(self.device, non_blocking=True)  # (b, 1, h, w) in [0, 1]
        gan_on = self.disc is not None and state.step >= self.options.disc_start
        self.ddp_model.train()
        with self.amp.autocast():
            losses = self.losses(batch, x, gan_on)
        return StepOutput(losses=losses, apply=lambda: self.apply(losses["loss"], losses["gan_d"], gan_on),
                          images=x.shape[0])

    def losses(self, batch: dict, x: torch.Tensor, gan_on: bool) -> dict[str, torch.Tensor]:
        from napari_langmamba.models.quantizer import pyramid_semantic_loss
        from training.gan import adaptive_gan_weight, hinge_d_loss, hinge_g_loss

        options, zero = self.options, x.new_zeros(())
        words_only = options.train_part in WORD_PARTS
        # The word head's loss has no reconstruction term: the decoder (half the step's work) is skipped.
        recon, pyramid = self.ddp_model(x, decode=not words_only)
        rec = zero if words_only else F.mse_loss(recon.float(), x)
        p_loss = self.perceptual(recon.float(), x) if self.perceptual is not None else zero  # never with words
        nll = rec + options.eta * p_loss
        g_loss, d_weight = zero, zero
        if gan_on:
            self.disc.requires_grad_(False)  # the generator's GAN term must not reach D's weights
            g_loss = hinge_g_loss(self.disc(recon.float()))
            self.disc.requires_grad_(True)
            d_weight = adaptive_gan_weight(nll, g_loss, self.model.decoder.conv_out.weight)
        commit = pyramid.commitment_loss.float()
        vq = nll + commit + options.gamma * d_weight * g_loss
        sem, total = zero, vq
        layer_pools = self.prior.layer_pools(batch, x, pyramid)
        if layer_pools is not None:
            sem = pyramid_semantic_loss([e.float() for e in pyramid.layer_embeddings],
                                        self.model.quantizer.codebook, layer_pools, balance=self.prior.balance,
                                        target=self.prior.target)
            if words_only:  # only the word head trains: its own two terms, no omega
                total = commit + options.alpha * sem
            elif float(sem.detach()) > 0:
                omega = (vq / sem).detach()
                total = vq + options.alpha * omega * sem
        d_loss = zero
        if gan_on:
            logits = self.ddp_disc(torch.cat([x, recon.detach().float()]))  # real and fake in one pass
            d_loss = hinge_d_loss(logits[: x.shape[0]], logits[x.shape[0]:])
        losses = {"loss": total, "recon": rec, "commit": commit, "semantic": sem, "perceptual": p_loss,
                  "gan_g": g_loss, "gan_weight": d_weight, "gan_d": d_loss}
        if words_only:  # no reconstruction to log (validation still measures it)
            del losses["recon"], losses["perceptual"]
        return losses

    def apply(self, total: torch.Tensor, d_loss: torch.Tensor, gan_on: bool) -> None:
        """Backward and optimizer steps (the discriminator's after the generator's)."""
        scaler = self.amp.scaler
        self.optimizer.zero_grad(set_to_none=True)
        if gan_on:
            self.opt_d.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(total).backward()
            scaler.step(self.optimizer)
            if gan_on:
                scaler.scale(d_loss).backward()
                scaler.step(self.opt_d)
            scaler.update()
        else:
            total.backward()
            self.optimizer.step()
            if gan_on:
                d_loss.backward()
                self.opt_d.step()


@torch.no_grad()
def reconstruction_metrics(item: dict, *, model: Any, amp: Any, window: Any,
                           word_classes: torch.Tensor | None = None) -> dict[str, float]:
    """Validation of one slice: the LangAE's reconstruction against it (MSE, PSNR, SSIM in ``window``)
    and, with ``word_classes`` (:func:`training.candidates.anatomy_word_classes`), the counts behind
    the word agreement: layer-3 regions dominated by one tissue class, and those whose word is one
    of that class's words."""
    from napari_langmamba import metrics as quality
    from napari_langmamba.anatomy import dominant_region_classes, tissue_map
    from napari_langmamba.windowing import MODEL_NORMALIZATION

    x = crop_to_multiple(item["image"][None].to(model.decoder.conv_out.weight.device))  # (1, 1, h, w)
    with amp.autocast():
        recon, pyramid = model(x)
    recon = recon.float().clamp(0.0, 1.0)
    ref_hu = MODEL_NORMALIZATION.to_hu(x[0, 0].cpu().numpy())
    out_hu = MODEL_NORMALIZATION.to_hu(recon[0, 0].cpu().numpy())
    metrics = {"recon_mse": float(F.mse_loss(recon, x)),
               "psnr": quality.psnr(out_hu, ref_hu, window),
               "ssim": quality.ssim(out_hu, ref_hu, window)}
    if word_classes is not None:
        ids = pyramid.ids[2][0].cpu()  # (h/16, w/16) layer-3 words
        dominant = dominant_region_classes(tissue_map(ref_hu), tuple(ids.shape))[2]
        said = word_classes[ids].numpy()
        metrics["words_dominated"] = float((dominant >= 0).sum())
        metrics["words_matched"] = float(((said == dominant) & (dominant >= 0)).sum())
    return metrics


def _with_word_agreement(validate: Any) -> Any:
    """A validate_fn that adds ``word_agreement`` (matched / dominated regions, pooled over the slices)."""
    if validate is None:
        return None

    def run(state: Any) -> dict:
        result = validate(state)
        if result.get("words_dominated"):
            result["word_agreement"] = result["words_matched"] / result["words_dominated"]
        return result

    return run


TISSUE_LR = 2e-3  # peak of the one-cycle AdamW schedule of --tissue-steps
TISSUE_RECORD = "tissue_pretrain.json"  # in the run folder: what --resume reads back


def region_tissue_labels(tissue: np.ndarray, factor: int) -> torch.Tensor:
    """An (h, w) tissue map (cut to multiples of ``factor``) -> (h/f, w/f) int64: each layer-3
    region's most frequent tissue class (:func:`napari_langmamba.anatomy.majority_region_classes`)."""
    from napari_langmamba.anatomy import majority_region_classes

    h, w = (tissue.shape[0] // factor) * factor, (tissue.shape[1] // factor) * factor
    return torch.from_numpy(majority_region_classes(np.asarray(tissue)[:h, :w], (h // factor, w // factor))[2])


def tissue_class_weights(train_set: Any, factor: int, *, max_slices: int = 64) -> torch.Tensor:
    """Cross-entropy weights ``count ** -0.5`` of each class's regions on up to ``max_slices`` training
    slices, normalised to a mean of 1 over the regions (rare blood and bone weigh more, not all)."""
    from napari_langmamba.anatomy import TISSUE_CLASSES

    n = len(train_set.source)
    picks = np.unique(np.linspace(0, n - 1, min(n, max_slices)).round().astype(int))
    counts = torch.zeros(len(TISSUE_CLASSES))
    for i in picks:
        tissue = train_set.slice_tissue(int(i))
        if min(tissue.shape) >= factor:
            counts += torch.bincount(region_tissue_labels(tissue, factor).reshape(-1),
                                     minlength=len(TISSUE_CLASSES)).float()
    weights = counts.clamp_min(1.0).pow(-0.5)
    return weights * counts.sum().clamp_min(1.0) / (weights * counts).sum().clamp_min(1e-12)


@torch.no_grad()
def tissue_accuracy(head: Any, val_set: Any, *, device: torch.device, max_items: int) -> dict[str, Any]:
    """Per tissue class: regions of the validation slices dominated (>= 60 %) by it, and how many of
    them the head's tissue logits name."""
    from napari_langmamba.anatomy import TISSUE_CLASSES, dominant_region_classes, tissue_map
    from napari_langmamba.windowing import MODEL_NORMALIZATION

    right = np.zeros(len(TISSUE_CLASSES), dtype=np.int64)
    total = np.zeros(len(TISSUE_CLASSES), dtype=np.int64)
    for index in range(min(len(val_set), max_items) if max_items else len(val_set)):
        x = crop_to_multiple(val_set[index]["image"][None].to(device))
        said = head.tissue_logits(x).argmax(1)[0].cpu().numpy()
        dominant = dominant_region_classes(tissue_map(MODEL_NORMALIZATION.to_hu(x[0, 0].cpu().numpy())),
                                           said.shape)[2]
        for k in range(len(TISSUE_CLASSES)):
            where = dominant == k
            total[k] += int(where.sum())
            right[k] += int((said[where] == k).sum())
    return {"accuracy": float(right.sum() / max(int(total.sum()), 1)),
            "per_class": {c.name: [int(right[c.index]), int(total[c.index])] for c in TISSUE_CLASSES}}


def keep_tissue_classifier(model: Any) -> list[str]:
    """Under ``--word-choice tissue`` the head's classifier picks each word's class, so the word steps
    must not move it: freeze every layer of the CNN head but its offset; returns the frozen names."""
    head = model.region_pixels
    names = []
    for name, module in head.named_children():
        if name != "offset" and any(p.requires_grad for p in module.parameters()):
            module.requires_grad_(False)
            names.append(f"region_pixels.{name}")
    return names


def _tissue_phase(options: LangAEOptions, ctx: Any, run: Any, model: Any, data: Any,
                  device: torch.device) -> dict[str, Any]:
    """``--tissue-steps``: train the CNN region head's tissue classifier before the words; returns the record.

    On ``--resume`` the head comes back with the checkpoint and the record from the run folder."""
    import json
    import time

    from training.runs import atomic_write_text

    record_path = Path(run.path) / TISSUE_RECORD
    if options.resume:
        if record_path.is_file():
            return json.loads(record_path.read_text())
        raise ConfigError(f"--resume --tissue-steps: {record_path} is missing; the run did not finish its tissue phase.")
    if ctx.world_size > 1:
        raise ConfigError("--tissue-steps runs in one process; start the run without torchrun (it takes minutes).")
    head = model.region_pixels
    factor = head.factor
    train_set = data.loader.dataset
    weights = tissue_class_weights(train_set, factor).to(device)
    # the offset gets no gradient here, so AdamW leaves it (and its zeros) alone
    optimizer = torch.optim.AdamW(head.parameters(), lr=TISSUE_LR, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, TISSUE_LR, total_steps=int(options.tissue_steps))
    generator = torch.Generator().manual_seed(int(options.seed))
    logger.info("--tissue-steps %d: training the CNN region head's tissue classifier (class weights %s)",
                options.tissue_steps, ", ".join(f"{w:.2f}" for w in weights.tolist()))
    start, losses = time.monotonic(), []
    head.train()
    for step in range(int(options.tissue_steps)):
        picks = torch.randint(len(train_set), (options.batch_size,), generator=generator).tolist()
        loss = torch.zeros((), device=device)
        for i in picks:  # one at a time: whole slices of different sizes do not stack
            item = train_set[i]
            x = crop_to_multiple(item["image"][None].to(device))
            labels = region_tissue_labels(item["tissue"].numpy(), factor)[None].to(device)
            loss = loss + F.cross_entropy(head.tissue_logits(x), labels, weight=weights) / len(picks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 50 == 0 or step + 1 == options.tissue_steps:
            logger.info("tissue step %d/%d: cross-entropy %.4f (%.1f s)", step + 1, options.tissue_steps,
                        float(np.mean(losses[-50:])), time.monotonic() - start)
    record: dict[str, Any] = {"steps": int(options.tissue_steps), "lr": TISSUE_LR, "schedule": "one-cycle AdamW",
                              "batch_size": options.batch_size, "class_weights": [round(w, 4) for w in weights.tolist()],
                              "loss_every_10": [round(float(np.mean(losses[i : i + 10])), 4)
                                                for i in range(0, len(losses), 10)],
                              "seconds": round(time.monotonic() - start, 1)}
    if data.val_set is not None:
        head.eval()
        record["validation"] = tissue_accuracy(head, data.val_set, device=device, max_items=options.val_max_images)
        head.train()
        logger.info("tissue classifier on the validation slices: %.1f %% of dominated regions (%s)",
                    100 * record["validation"]["accuracy"],
                    ", ".join(f"{k} {a}/{b}" for k, (a, b) in record["validation"]["per_class"].items() if b))
    if ctx.is_main:
        atomic_write_text(record_path, json.dumps(record, indent=1))
    return record


def _perceptual_loss(options: LangAEOptions, device: torch.device) -> Any:
    if options.perceptual_weights is not None and options.eta > 0:
        from training.perceptual import load_perceptual_loss

        return load_perceptual_loss(options.perceptual_weights).to(device)
    if options.eta > 0:
        logger.warning("perceptual loss off: no --perceptual-weights given (no feature network is downloaded; "
                       "eta ignored)")
    return None


def _train(options: LangAEOptions, ctx: Any, run: Any) -> int:
    from functools import partial

    from napari_langmamba.models.codebook import load_codebook
    from napari_langmamba.models.langae import LangAE, LangAEConfig
    from training.candidates import AnatomyScorer, anatomy_word_classes
    from training.distributed import make_amp, wrap_ddp
    from training.gan import PatchDiscriminator
    from training.runs import CheckpointSpec

    device = ctx.device
    # -- model, semantic prior, data
    codebook = load_codebook(options.codebook)
    model_config = dataclasses.replace(LangAEConfig.preset(options.preset, codebook_dim=codebook.d),
                                       commitment_beta=float(options.beta), region_pixels=bool(options.region_pixels),
                                       region_context=int(options.region_context), region_head=options.region_head,
                                       region_wide=bool(options.region_wide), word_choice=options.word_choice)
    model = LangAE(model_config, codebook=codebook)
    init_info = init_from_checkpoint(model, options.init, codebook) if options.init is not None else None
    frozen = freeze_features(model) if options.freeze_features else []
    frozen += [name for name in freeze_all_but(model, options.train_part) if name not in frozen]
    model = model.to(device)
    anatomy = None
    semantic = options.train_part != "decoder"  # the decoder side gets no gradient from the semantic loss
    if semantic and options.candidates is None and options.scorer == "anatomy" and options.alpha > 0:
        anatomy = AnatomyScorer(codebook, min_share=options.min_share, balance_by=options.balance_by)
    train_source, val_source = _ndct_sources(options)
    data = make_stage_data(_stage_dataset(anatomy is not None or options.tissue_steps > 0), train_source, val_source,
                           options, ctx,
                           source_summary={"source": [str(p) for p in options.data]}, val_label="--data")
    prior = _semantic_prior(options, codebook, train_source, anatomy) if semantic else SemanticPrior(n_words=codebook.n)
    if options.train_part in WORD_PARTS and not prior.on:
        raise ConfigError(f"--train-part {options.train_part} trains on the semantic loss alone: it needs --alpha > 0 "
                          "and a prior (--scorer anatomy or --candidates FILE).")
    if options.train_part != "all":
        logger.info("--train-part %s: training %s; frozen: %s", options.train_part,
                    ", ".join(_part_modules(model, options.train_part)), ", ".join(frozen))

    tissue_record = _tissue_phase(options, ctx, run, model, data, device) if options.tissue_steps else None
    if options.word_choice == "tissue":
        frozen += [name for name in keep_tissue_classifier(model) if name not in frozen]

    # -- losses, optimizers
    perceptual = _perceptual_loss(options, device) if options.train_part not in WORD_PARTS else None
    disc = PatchDiscriminator(in_channels=1, ndf=options.disc_channels, n_layers=options.disc_layers).to(device) \
        if options.gamma > 0 and options.train_part not in WORD_PARTS else None
    lr = float(options.lr) if options.lr is not None else options.base_lr * options.batch_size * ctx.world_size
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=lr, betas=(0.5, 0.9)) if disc is not None else None
    amp = make_amp(options.amp, device)
    step = LangAEStep(model=model, ddp_model=wrap_ddp(model, ctx), device=device, prior=prior, optimizer=optimizer, amp=amp,
                      options=options, perceptual=perceptual, disc=disc,
                      ddp_disc=wrap_ddp(disc, ctx) if disc is not None else None, opt_d=opt_d)
    objects: dict[str, Any] = {"optimizer": optimizer}
    if disc is not None:
        objects.update(discriminator=disc, optimizer_d=opt_d)

    record = {
        "data": data.summary,
        "codebook": codebook.info(),
        "candidates": {"path": str(options.candidates), "sha256": file_sha256(options.candidates)}
        if options.candidates is not None else None,
        "semantic_prior": prior.info(),
        "init": init_info,
        "train_part": options.train_part,
        "frozen": frozen,
        "tissue_pretrain": tissue_record,
        "loss": {"alpha": options.alpha, "beta": options.beta, "gamma": options.gamma,
                 "eta": options.eta if perceptual is not None else 0.0, "disc_start": options.disc_start,
                 "semantic": prior.on, "perceptual": perceptual is not None},
        "optimizer": {"name": "Adam", "lr": lr, "betas": [0.5, 0.9]},
        "world_size": ctx.world_size,
        "amp": amp.name,
    }
    word_classes = anatomy_word_classes(codebook)
    keys = ("recon_mse", "psnr", "ssim") + (("words_dominated", "words_matched") if word_classes is not None else ())
    validate = validation(model, data.val_set,
                          partial(reconstruction_metrics, model=model, amp=amp, window=parse_window(options.window),
                                  word_classes=word_classes),
                          keys=keys, ctx=ctx, max_items=options.val_max_images)
    if options.train_part in WORD_PARTS and word_classes is None:
        raise ConfigError(f"--train-part {options.train_part} needs a codebook with the anatomy words (it selects its checkpoint by "
                          f"their agreement); {codebook.source!r} has none.")
    return fit_stage(
        options, stage=STAGE, ctx=ctx, run=run, data=data, step_fn=step, validate_fn=_with_word_agreement(validate),
        objects=objects, amp=amp, optimizer=optimizer,
        best_key="word_agreement" if options.train_part in WORD_PARTS else "psnr",
        checkpoint=CheckpointSpec(model=model, kind="langae", config=model_config.to_dict,
                                  extra=lambda state: {"training": {"command_line": command_line(STAGE, options),
                                                                    **record}}),
        start_event={
            "lr": lr, "codebook": codebook.source, "preset": options.preset,
            "semantic": prior.info()["scorer"] if prior.on else None,
            "init": str(options.init) if options.init is not None else None, "frozen": frozen,
            "train_part": options.train_part,
            "perceptual": perceptual is not None, "gan": disc is not None, "disc_start": options.disc_start,
            "n_slices": len(train_source), "amp": amp.name,
        },
        log=logger,
    )
