"""Stage 2, ``seed``: train the SEED denoiser (or RED-CNN) with MSE + lambda * LangDA.

- ``--backbone seed`` (default): SEED's frozen encoder is initialised from the LangAE
  checkpoint's encoder (``--langae``, required); the decoder is trained.
- ``--backbone redcnn``: RED-CNN (Chen et al. 2017), the CNN baseline; LangDA is plug-and-play.

Loss: ``MSE(denoised, full) + lambda * (MSE(z, z_hat) + MSE(z_q, z_q_hat))`` with the whole frozen
LangAE (:class:`~napari_langmamba.models.losses.LangDALoss`); ``--lambda 0`` gives the MSE-only
baseline (and RED-CNN then needs no LangAE). AdamW (betas 0.9, 0.99, weight decay 1e-9), cosine
learning rate 1e-4 -> 1e-6 over all steps. Validation after every epoch: PSNR and SSIM on the
abdomen window (``napari_langmamba.metrics``) of the denoised and of the unprocessed low-dose
slices against the normal-dose ones; ``best/`` keeps the best PSNR, ``last/`` the newest state.

The checkpoint is one model checkpoint of kind ``seed`` (config ``{"encoder": LangAEConfig,
"seed": SEEDConfig}``, weights including the frozen encoder) or ``redcnn``; its ``training``
record holds the command line, the data summary, the LangAE checkpoint's SHA-256 and its
codebook source and hash, and ``metrics`` the validation results.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from napari_langmamba.errors import ConfigError
from training.common import (
    add_pair_arguments,
    add_train_arguments,
    command_line,
    crop_to_multiple,
    default_of,
    file_sha256,
    fit_stage,
    make_stage_data,
    parse_window,
    run_stage,
    split_by_patient,
    split_source,
    validation,
)
from training.config import add_option
from training.options import BACKBONES, SeedOptions
from training.options import FLAGS as STAGE_FLAGS

logger = logging.getLogger(__name__)

__all__ = ["DenoiserStep", "SeedOptions", "add_arguments", "denoising_metrics", "main"]

STAGE = "seed"
FLAGS = STAGE_FLAGS[STAGE]  # options whose flag is not --<name>


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the options of the ``seed`` stage."""
    parser.description = (
        "Stage 2: train SEED (frozen LangAE encoder + EMA decoder) or RED-CNN with MSE + lambda * LangDA "
        "(lambda 0 = MSE-only baseline); AdamW, cosine lr, validation (PSNR/SSIM, abdomen window) each epoch, "
        "best and last checkpoints. Runs under torchrun unchanged."
    )

    def d(name: str) -> Any:
        return default_of(SeedOptions, name)

    add_option(parser, "--data", type=Path, nargs="+", metavar="DIR",
               help="paired training data: simulate output folders or Mayo 2D roots (quarter_1mm/, full_1mm/)")
    add_pair_arguments(parser)
    add_option(parser, "--split", metavar="NAME", help="sub-folder of a Mayo root, e.g. train")
    add_option(parser, "--transplant-noise-onto", dest="transplant_noise_onto", type=str, nargs="+", action="extend",
               metavar="[LABEL=]CT",
               help="normal-dose CT(s) made into extra pairs by adding the real noise (low - full) of training "
                    "pairs of the same kernel and slice shape; needs --val-patients; LABEL= names the patient")
    add_option(parser, "--transplant-slice-step", type=int, metavar="N",
               help=f"use every N-th slice of each --transplant-noise-onto CT (default {d('transplant_slice_step')})")
    add_option(parser, "--transplant-variants", type=int, metavar="N",
               help=f"pairs per slice, each with another donor's noise (default {d('transplant_variants')})")
    add_option(parser, "--noise-scale", type=float, nargs=2, metavar=("LO", "HI"),
               help="scale each training sample's noise (low - full) by a factor drawn from [LO, HI]: the same "
                    "real noise texture at other doses (0.5 1 turns quarter-dose pairs into quarter to ~57 %% "
                    "dose); validation pairs are never scaled (default: off)")
    add_train_arguments(parser, SeedOptions)
    model = parser.add_argument_group("denoiser and loss")
    add_option(model, "--backbone", choices=BACKBONES, help=f"denoiser (default {d('backbone')})")
    add_option(model, "--langae", type=Path, metavar="CHECKPOINT",
               help="trained LangAE checkpoint (folder or .zip): SEED's frozen encoder and the LangDA loss")
    add_option(model, "--decoder-channels", type=int, nargs=4, metavar=("C8", "C4", "C2", "C1"),
               help="SEED's decoder widths, the outputs of its Up stages at 1/8, 1/4, 1/2 and full resolution "
                    "(default: the --preset's, which follow the LangAE encoder, e.g. 64 32 32 32 for lite); "
                    "wider costs time per step")
    add_option(model, "--init", type=Path, metavar="CHECKPOINT",
               help="start from this SEED or RED-CNN checkpoint's weights (fresh optimizer and schedule), e.g. to "
                    "fine-tune the bundled model on your own pairs; same --backbone and --preset, and for SEED the "
                    "--langae whose encoder it was trained with")
    add_option(model, "--lambda", "--langda-weight", dest="langda_weight", type=float, metavar="W",
               help=f"LangDA weight lambda; 0 = MSE only (LangMamba 0.1, LEDA 0.5) (default {d('langda_weight')})")
    add_option(model, "--lr", type=float, metavar="LR", help=f"initial AdamW learning rate (default {d('lr')})")
    add_option(model, "--lr-min", type=float, metavar="LR",
               help=f"final learning rate of the cosine schedule (default {d('lr_min')})")
    add_option(model, "--weight-decay", type=float, metavar="W", help=f"AdamW weight decay (default {d('weight_decay')})")
    add_option(model, "--window-weight", type=float, metavar="W",
               help="add W x the MSE of output and target both clipped to --window (in model units; the log's "
                    "window_mse is that error in the window's own units, as its PSNR sees it), so the model spends its "
                    "capacity on the tissue a reader looks at rather than on bone and air edges; 0 = plain MSE "
                    f"(default {d('window_weight')})")


def _pair_sources(options: SeedOptions) -> tuple[Any, Any | None, str | None]:
    """``(train, validation or None, how the validation set was chosen)``.

    Validation: the ``--val-patients``' pairs (left out of training), ``--val-data``, or for
    data of a single patient (and ``--data`` folders, whose patients are unknown) the last
    ``--val-fraction`` of its slices. Pairs of several known patients are never split by slice:
    they need ``--val-patients`` (or ``--val-fraction 0``).
    """
    workers = max(1, options.workers)
    source = options.collect(options.data, split=options.split, workers=workers)
    if options.val_patients:
        train, val = split_by_patient(source, options.val_patients)
        if options.transplant_noise_onto:
            from training.datasets import PairSet, transplanted_pair_groups

            train = PairSet(train.groups + transplanted_pair_groups(
                options.transplant_noise_onto, train, slice_step=options.transplant_slice_step,
                variants=options.transplant_variants, seed=options.seed, exclude_patients=options.val_patients))
        return train, val, f"patients {', '.join(options.val_patients)}"
    if options.val_data:
        from training.datasets import collect_pairs

        return source, collect_pairs(data=options.val_data, split=options.split), None
    if options.val_fraction > 0 and len(source.patients) > 1 and options.has_pair_inputs():
        raise ConfigError(
            f"The pairs come from {len(source.patients)} patients ({', '.join(source.patients)}); validate on "
            "whole patients with --val-patients (e.g. --val-patients L192), or give --val-fraction 0 (no validation)."
        )
    train, val = split_source(source, options.val_fraction)
    return train, val, None


def _data_summary(options: SeedOptions, train: Any, val: Any | None) -> dict[str, Any]:
    """The run record's data: inputs, layout, and the patients, slices, kernels and doses of each side."""
    from training.datasets import pair_summary

    base = getattr(train, "source", train)  # a slice split is a subset of the whole set
    inputs = {name: [str(p) for p in getattr(options, name)] for name in
              ("data", "pairs", "low", "full", "manifest", "simulate_from") if getattr(options, name)}
    if options.simulate_from:
        inputs["sim_doses"] = list(options.sim_doses)
        inputs["sim_slice_step"] = options.sim_slice_step
        inputs["sim_filter"] = options.sim_filter
        inputs["sim_match_noise"] = options.sim_match_noise
    if options.transplant_noise_onto:
        inputs["transplant_noise_onto"] = list(options.transplant_noise_onto)
        inputs["transplant_slice_step"] = options.transplant_slice_step
        inputs["transplant_variants"] = options.transplant_variants
    return {
        "source": [str(p) for p in options.data] + [f"{name}={p}" for name in ("pairs", "low", "full", "manifest",
                                                                              "simulate_from")
                                                    for p in inputs.get(name, [])],
        "inputs": inputs,
        "layout": "+".join(base.summary()["layouts"]) if hasattr(base, "summary") else type(base).__name__,
        "train": pair_summary(train),
        "validation": pair_summary(val) if val is not None else None,
        "val_patients": list(options.val_patients),
    }


def main(args: argparse.Namespace) -> int:
    """Run the ``seed`` stage; returns the exit code (errors raise :class:`LangMambaError`)."""
    return run_stage(SeedOptions, args, stage=STAGE, train=_train, flags=FLAGS)


def _build(options: SeedOptions, device: torch.device) -> tuple[torch.nn.Module, str, Any, dict | None, dict | None]:
    """(denoiser, kind, frozen LangAE or None, LangAE provenance or None, --init provenance or None)."""
    from napari_langmamba.checkpoint import build_model, load_checkpoint
    from napari_langmamba.models import model_config
    from napari_langmamba.models.redcnn import REDCNN, REDCNNConfig
    from napari_langmamba.models.seed import SEED, SEEDConfig

    langae, provenance = None, None
    if options.langae is not None:
        ckpt = load_checkpoint(options.langae)
        if ckpt.kind != "langae":
            raise ConfigError(f"--langae {options.langae} is a {ckpt.kind!r} checkpoint; give a LangAE checkpoint.")
        langae = build_model(ckpt)  # eval mode, strict load, codebook verified
        provenance = {"path": str(options.langae), "sha256": file_sha256(options.langae),
                      "codebook": ckpt.meta.get("codebook"), "config": ckpt.config}
    if options.backbone == "seed":
        assert langae is not None
        encoder = copy.deepcopy(langae.encoder)  # SEED freezes its own copy; LangDA keeps the full LangAE
        config = SEEDConfig.preset(options.preset, feature_channels=langae.config.feature_channels)
        if options.decoder_channels is not None:  # a wider (or narrower) decoder on the same frozen encoder
            config = dataclasses.replace(config, decoder_channels=options.decoder_channels, name="custom")
        model: torch.nn.Module = SEED(config, encoder=encoder)
        kind = "seed"
    else:
        model = REDCNN(REDCNNConfig.preset(options.preset))
        kind = "redcnn"
    model_config(kind, model)  # fails early if the model cannot be described in a checkpoint
    init = _init_from_checkpoint(model, kind, options) if options.init is not None else None
    if langae is not None:
        langae.to(device)
    return model.to(device), kind, langae, provenance, init


def _init_from_checkpoint(model: torch.nn.Module, kind: str, options: SeedOptions) -> dict[str, Any]:
    """Load ``--init``'s weights into ``model``; SEED's frozen encoder must be the ``--langae`` one."""
    from napari_langmamba.checkpoint import load_checkpoint

    path = options.init
    ckpt = load_checkpoint(path)
    if ckpt.kind != kind:
        raise ConfigError(f"--init {path} is a {ckpt.kind!r} checkpoint; --backbone {options.backbone} needs {kind!r}.")
    if kind == "seed":
        # The encoder stays frozen, so a model trained on another LangAE's encoder would silently change.
        # Only the layers SEED runs count: a LangAE fine-tuned with --freeze-features keeps them.
        from training.langae import seed_feature_prefixes

        used = seed_feature_prefixes(model.encoder)
        current = {k: v for k, v in model.state_dict().items() if k.startswith(used)}
        for name, value in current.items():
            stored = ckpt.state_dict.get(name)
            if stored is None or stored.shape != value.shape or not torch.allclose(
                    stored.float(), value.float(), rtol=2e-3, atol=1e-4):
                raise ConfigError(
                    f"--init {path} was trained on another LangAE encoder than --langae {options.langae} "
                    f"(they differ at {name}); give the LangAE named in its training record "
                    f"({(ckpt.meta.get('training') or {}).get('langae', {}) or 'not recorded'})."
                )
    try:
        model.load_state_dict(ckpt.state_dict, strict=True)
    except RuntimeError as exc:
        preset = ckpt.config.get("seed", ckpt.config).get("name", "another preset")
        raise ConfigError(
            f"--init {path} holds a {kind} of another architecture ({preset}); give the matching --preset "
            "(and --decoder-channels, for a custom SEED decoder)."
        ) from exc
    return {"path": str(path), "sha256": file_sha256(path), "kind": ckpt.kind,
            "metrics": ckpt.meta.get("metrics")}


@dataclass
class DenoiserStep:
    """One denoiser optimisation step: MSE, or MSE + lambda * LangDA through the frozen LangAE."""

    ddp_model: Any
    device: torch.device
    optimizer: torch.optim.Optimizer
    scheduler: Any
    amp: Any
    langda: Any = None  # napari_langmamba.models.losses.LangDALoss, or None for MSE only
    window: tuple[float, float] | None = None  # (lower, upper) in model units of the window term
    window_weight: float = 0.0

    def __call__(self, batch: dict, state: Any) -> Any:
        from training.runs import StepOutput

        low = batch["low"].to(self.device, non_blocking=True)  # (b, 1, h, w) in [0, 1]
        full = batch["full"].to(self.device, non_blocking=True)
        self.ddp_model.train()
        with self.amp.autocast():
            losses = self.losses(self.ddp_model(low).float(), full)
        return StepOutput(losses=losses, apply=lambda: self.apply(losses["loss"]), images=low.shape[0])

    def losses(self, denoised: torch.Tensor, full: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.langda is None:
            loss = F.mse_loss(denoised, full)
            out = {"loss": loss, "mse": loss.detach()}
        else:
            loss, parts = self.langda(denoised, full)
            out = {"loss": loss, "mse": parts["mse"], "langda_feature": parts["feature"], "langda_token": parts["token"]}
        if self.window_weight > 0 and self.window is not None:
            lower, upper = self.window
            # Both images clipped to the window and rescaled to it: the error its PSNR measures.
            window_mse = F.mse_loss(denoised.clamp(lower, upper), full.clamp(lower, upper)) / (upper - lower) ** 2
            out["loss"] = out["loss"] + self.window_weight * (upper - lower) ** 2 * window_mse
            out["window_mse"] = window_mse.detach()
        return out

    def apply(self, loss: torch.Tensor) -> None:
        """Backward, optimizer step (loss-scaled under fp16) and the cosine schedule's step."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.amp.scaler is not None:
            self.amp.scaler.scale(loss).backward()
            self.amp.scaler.step(self.optimizer)
            self.amp.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.scheduler.step()


@torch.no_grad()
def denoising_metrics(item: dict, *, model: Any, amp: Any, window: Any) -> dict[str, float]:
    """Validation of one pair: PSNR / SSIM (in ``window``) of the denoised and of the low-dose slice."""
    from napari_langmamba import metrics as quality
    from napari_langmamba.windowing import MODEL_NORMALIZATION

    device = next(model.parameters()).device
    low = crop_to_multiple(item["low"][None].to(device))  # (1, 1, h, w)
    full = crop_to_multiple(item["full"][None].to(device))
    with amp.autocast():
        denoised = model(low).float()
    low_hu, full_hu = (MODEL_NORMALIZATION.to_hu(t[0, 0].cpu().numpy()) for t in (low, full))
    out_hu = MODEL_NORMALIZATION.to_hu(denoised[0, 0].cpu().numpy())
    return {"psnr": quality.psnr(out_hu, full_hu, window), "ssim": quality.ssim(out_hu, full_hu, window),
            "input_psnr": quality.psnr(low_hu, full_hu, window), "input_ssim": quality.ssim(low_hu, full_hu, window),
            "mse": float(F.mse_loss(denoised, full))}


def _train(options: SeedOptions, ctx: Any, run: Any) -> int:
    from functools import partial

    from napari_langmamba.models import model_config
    from napari_langmamba.models.losses import LangDALoss
    from training.datasets import PairedSliceDataset
    from training.distributed import make_amp, wrap_ddp
    from training.runs import CheckpointSpec

    device = ctx.device
    train_source, val_source, val_description = _pair_sources(options)
    data = make_stage_data(
        partial(PairedSliceDataset, noise_scale=options.noise_scale), train_source, val_source, options, ctx,
        source_summary=_data_summary(options, train_source, val_source),
        val_label="the training data", val_description=val_description,
    )

    # -- model, loss, optimizer
    model, kind, langae, langae_info, init_info = _build(options, device)
    langda = LangDALoss(langae, weight=options.langda_weight).to(device) \
        if langae is not None and options.langda_weight > 0 else None
    if langda is None:
        logger.info("loss: MSE only (lambda = %g)", options.langda_weight)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=options.lr, betas=(0.9, 0.99), weight_decay=options.weight_decay)
    total_steps = options.epochs * data.steps_per_epoch
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps),
                                                           eta_min=options.lr_min)
    amp = make_amp(options.amp, device)
    from napari_langmamba.windowing import MODEL_NORMALIZATION, get_window

    window = get_window(parse_window(options.window))
    step = DenoiserStep(ddp_model=wrap_ddp(model, ctx), device=device, optimizer=optimizer, scheduler=scheduler,
                        amp=amp, langda=langda, window_weight=float(options.window_weight),
                        window=tuple(float(MODEL_NORMALIZATION.to_model(torch.tensor(v))) for v in window.limits))
    n_trainable = sum(p.numel() for p in params)
    logger.info("%s (%s preset): %.2fM trainable parameters; %d steps", kind, options.preset, n_trainable / 1e6,
                total_steps)

    record = {
        "data": data.summary,
        "backbone": options.backbone,
        "langda_weight": options.langda_weight,
        "langae": langae_info,
        "init": init_info,
        "codebook": (langae_info or {}).get("codebook"),
        "optimizer": {"name": "AdamW", "lr": options.lr, "lr_min": options.lr_min, "betas": [0.9, 0.99],
                      "weight_decay": options.weight_decay, "schedule": "cosine"},
        "window": options.window,
        "window_weight": options.window_weight,
        "noise_scale": list(options.noise_scale) if options.noise_scale is not None else None,
        "world_size": ctx.world_size,
        "amp": amp.name,
    }
    # On CPU the product denoises in float32, so validation (and model selection) does too.
    val_amp = amp if device.type == "cuda" else make_amp("off", device)
    validate = validation(model, data.val_set,
                          partial(denoising_metrics, model=model, amp=val_amp, window=parse_window(options.window)),
                          keys=("psnr", "ssim", "input_psnr", "input_ssim", "mse"), ctx=ctx,
                          max_items=options.val_max_images)
    return fit_stage(
        options, stage=STAGE, ctx=ctx, run=run, data=data, step_fn=step, validate_fn=validate,
        objects={"optimizer": optimizer, "scheduler": scheduler}, amp=amp, optimizer=optimizer,
        checkpoint=CheckpointSpec(
            model=model, kind=kind, config=lambda: model_config(kind, model),
            extra=lambda state: {"training": {"command_line": command_line(STAGE, options, flags=FLAGS), **record}}),
        start_event={
            "backbone": options.backbone, "model_kind": kind, "preset": options.preset,
            "lambda": options.langda_weight, "n_slices": len(train_source), "trainable_parameters": n_trainable,
            "init": str(options.init) if options.init is not None else None,
            "data": {k: data.summary[k] for k in ("train", "validation", "val_source")},
            "amp": amp.name,
        },
        log=logger,
    )
