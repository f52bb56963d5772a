"""Every tooltip of the project's dock widgets, in one place.

Keys are ``"<widget>.<control>"``; :meth:`WidgetBase.bind` looks a control's tooltip up here
by the widget's ``TOOLTIP_SECTION`` and the attribute name the control is bound to (falling
back to ``"common.<control>"`` for the controls every widget has), so a
control and its help text cannot drift apart silently (a test checks every bound control
of the Load and Compare widgets has one).
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

TOOLTIPS: dict[str, str] = {
    # --- shared by every widget (looked up when "<widget>.<control>" has none) -------------
    "common.progress_bar": "Progress of the task running in the background (Cancel stops it).",
    "common.status_label": "What the widget is doing, or what went wrong.",
    "common.reset_button": (
        "Put this widget's remembered choices back to their defaults. Choices are remembered between "
        "napari sessions as you make them."
    ),
    # --- Load CT -------------------------------------------------------------------------
    "load.path_edit": (
        "A DICOM file or folder, a NIfTI volume (.nii, .nii.gz) or a NumPy array of HU (.npy). "
        "Press Enter (or Scan) to list the series it holds."
    ),
    "load.file_button": "Choose one file: a DICOM slice, a NIfTI volume or a .npy array of HU.",
    "load.folder_button": "Choose a folder holding DICOM files (sub-folders are searched too).",
    "load.scan_button": "List the CT series found at the path, without loading pixel data.",
    "load.series_table": (
        "The series found: description, number of slices, matrix (rows x columns) and voxel "
        "spacing (dz, dy, dx) in mm. Select the one to load; double-click loads it."
    ),
    "load.load_button": (
        "Read the selected series in the background and add it as an image layer in HU, "
        "scaled to millimetres, with the chosen window."
    ),
    "load.cancel_button": "Stop reading; nothing is added to the viewer.",
    "load.window_combo": (
        "Display window of the selected image layer. Changes only the contrast limits: "
        "the Hounsfield values are never modified."
    ),
    "load.lower_spin": "Lower limit of the custom window, in HU (shown black).",
    "load.upper_spin": "Upper limit of the custom window, in HU (shown white).",
    "load.hu_label": "The Hounsfield value of the active image layer under the mouse cursor.",
    # --- Compare -------------------------------------------------------------------------
    "compare.before_combo": "The image before processing, e.g. the low-dose scan.",
    "compare.after_combo": "The image after processing, e.g. the denoised result.",
    "compare.reference_combo": (
        "Optional reference, e.g. the normal-dose scan. PSNR, SSIM and FSIM are computed "
        "against it; without one only mean, SD and CNR are reported."
    ),
    "compare.window_combo": (
        "Window used to display the crops and to compute PSNR / SSIM / FSIM "
        "(images are clipped to it and scaled to [0, 1], as in the papers)."
    ),
    "compare.lower_spin": "Lower limit of the custom window, in HU.",
    "compare.upper_spin": "Upper limit of the custom window, in HU.",
    "compare.region_combo": (
        "Compute PSNR / SSIM / FSIM inside the ROI, or on the whole current slice "
        "(the whole-slice numbers are those of 'training evaluate')."
    ),
    "compare.grid_button": (
        "Show before / after / reference and their differences side by side, with one shared "
        "camera, slice and window. Press again to return exactly to the previous view."
    ),
    "compare.roi_button": (
        "Add (or re-centre) the ROI rectangle on the current slice. Move or resize it with "
        "the Shapes layer tools; the crops and numbers follow."
    ),
    "compare.background_button": (
        "Add a second rectangle as the background ROI: CNR = |mean(ROI) - mean(background)| "
        "/ SD(background)."
    ),
    "compare.update_button": "Recompute the crops, profile and metrics now.",
    "compare.export_button": "Save the comparison figure (PNG) and the metrics table (CSV).",
    "compare.metrics_table": "Metrics in the ROI for each image on the current slice.",
    "compare.canvas": "Zoomed ROI crops (same window), the difference and a horizontal line profile.",
    # --- Denoise -------------------------------------------------------------------------
    "denoise.layer_combo": "The image layer (in HU) to denoise. It is never modified: the result is a new layer.",
    "denoise.weights_combo": (
        "Which model to use: the bundled default weights, a checkpoint (a folder with "
        "config.json + model.safetensors, or its .zip), or a training run folder (its 'best' "
        "checkpoint, else 'last')."
    ),
    "denoise.weights_path": "Path of the checkpoint folder, .zip or training run folder.",
    "denoise.browse_button": "Choose the checkpoint or training run on disk.",
    "denoise.device_combo": (
        "Where the model runs: auto picks CUDA, then Apple MPS, then the CPU. Mixed precision "
        "is used on CUDA only; CPU results are deterministic."
    ),
    "denoise.batch_spin": (
        "Slices (or tiles of large slices) sent to the model at once. Larger batches are faster "
        "on a GPU but need more memory; on a CPU 1 is as fast. Cancel takes effect between batches."
    ),
    "denoise.scope_combo": (
        "Whole volume, or only the slice shown in the viewer: that gives a one-slice layer placed "
        "at the slice's position, handy to try a model quickly."
    ),
    "denoise.strength_spin": (
        "Denoising strength: how much of the model's change to keep. Output = input + strength x "
        "(denoised - input); 100 % is the model's output, 50 % keeps half of the original texture, as "
        "the 30 % / 50 % levels of vendor iterative reconstructions. Changing it after a run updates the "
        "result at once, without running the model again."
    ),
    "denoise.ensemble_check": (
        "Run the model on the 8 flips and 90-degree rotations of each slice and average the 8 results, "
        "each turned back: 8 times the time for a slightly better estimate (+0.1 dB PSNR for the "
        "bundled model on its validation patient). Worth it for a final image on a GPU; leave it off "
        "to explore."
    ),
    "denoise.run_button": (
        "Denoise in the background. The result is added as a new layer '<name> denoised' with the "
        "same scale and position, contrast limits linked to the input, and the model recorded in "
        "its metadata."
    ),
    "denoise.cancel_button": "Stop after the current batch; no layer is added or changed.",
    "denoise.progress_bar": "Slices (or tiles) denoised so far.",
    "denoise.status_label": "What the widget is doing, or what went wrong.",
    # --- Tokens --------------------------------------------------------------------------
    "tokens.image_combo": "The CT image layer (in HU) whose current slice is described in words.",
    "tokens.model_combo": (
        "The LangAE whose vocabulary tokens explain the slice: the bundled default, or a LangAE "
        "checkpoint folder (or a folder holding one under 'langae/')."
    ),
    "tokens.model_path_edit": "A LangAE checkpoint folder (config.json + model.safetensors) or its .zip.",
    "tokens.browse_button": "Choose a LangAE checkpoint folder.",
    "tokens.pyramid_combo": (
        "Pyramid layer drawn on the image: 1 = one word per quadrant, 2 = one per 64 x 64 px on a "
        "512 slice, 3 = one per 16 x 16 px (boxes only; hover or click to read its words)."
    ),
    "tokens.topk_spin": "How many runner-up words (nearest to what the region encodes) to list per layer.",
    "tokens.show_button": (
        "Compute the tokens of the current slice in the background and draw them. From then on the "
        "overlay follows slice and layer changes."
    ),
    "tokens.cancel_button": "Stop computing the tokens.",
    "tokens.hover_label": "Words of layers 1 / 2 / 3 under the mouse cursor.",
    "tokens.hits_tree": (
        "Click anywhere in the image: the word of each pyramid layer at that point, its distance "
        "to what the region encodes, and its nearest alternatives. The regions are outlined."
    ),
    "tokens.compare_combo": (
        "A second layer of the same size (e.g. denoised or normal-dose) whose tokens are compared "
        "with the chosen image's on the same slice."
    ),
    "tokens.compare_button": (
        "Share of regions whose word is the same in both layers, per pyramid layer, and an overlay "
        "of the regions whose word changed: what denoising changed, in words."
    ),
    "tokens.agreement_label": "Per pyramid layer: agreeing regions / all regions.",
    "tokens.export_button": (
        "Save the tokens of the current slice: layer, region box (pixels), token id, word, "
        "distance and alternatives, as JSON or CSV."
    ),
}


def get_tooltip(key: str) -> str:
    """The tooltip of ``"<widget>.<control>"`` (else ``"common.<control>"``), or ``""``."""
    text = TOOLTIPS.get(key)
    if text is None:
        text = TOOLTIPS.get("common." + key.rpartition(".")[2])
    if text is None:
        logger.debug("no tooltip for %s", key)
        return ""
    return text


# --- Train (appended by the Train widget) ----------------------------------------------
TOOLTIPS.update({
    "train.stage_combo": (
        "Which step of the pipeline to run, as `python -m training <stage>`: simulate low-dose pairs, "
        "candidate token pools (stage 0), the LangAE (stage 1), the SEED / RED-CNN denoiser (stage 2), "
        "or evaluate a denoiser. It runs in its own process: napari stays responsive."
    ),
    "train.data_edit": (
        "Input data; several paths separated by ';'. simulate / candidates / langae: normal-dose CT "
        "(DICOM folders, NIfTI, .npy, Mayo or simulate folders); seed / evaluate: paired data (a "
        "simulate output folder or a Mayo 2D root with quarter_1mm/ and full_1mm/)."
    ),
    "train.data_button": "Choose the input data folder.",
    "train.val_edit": (
        "Optional validation data in the same layout as the training data (ideally other patients). "
        "Empty: the last 10% of the training slices are held out."
    ),
    "train.val_button": "Choose the validation data folder.",
    "train.output_edit": (
        "Where the stage writes. Training: a new run folder (config.json, metrics.jsonl, last/ and best/ "
        "checkpoints); choosing an existing run fills the form with its settings so Resume can continue it. "
        "simulate: the paired dataset folder; candidates: the pools .json file; evaluate: the results folder."
    ),
    "train.output_button": "Choose the output folder (or the pools file for candidates).",
    "train.preset_combo": (
        "Model size: tiny (tests, seconds), lite (CPU-friendly), paper (the published setting; "
        "needs a GPU to train in reasonable time)."
    ),
    "train.epochs_spin": "Passes over the training data (paper: 100).",
    "train.steps_spin": "Cap each epoch at this many optimizer steps; 'full pass' uses every slice once.",
    "train.batch_spin": "Images per optimizer step (and per process under torchrun). Paper: 4.",
    "train.patch_spin": (
        "Train on random square crops of this size (a multiple of 16); 'whole slices' uses full images. "
        "Crops make CPU training practical. Defaults: 64 (seed), 256 (langae)."
    ),
    "train.lr_edit": (
        "Initial learning rate. seed: AdamW 1e-4, cosine down to 1e-6 (paper). langae: empty = the "
        "paper's Adam 4.5e-6 x batch size (x processes)."
    ),
    "train.backbone_combo": (
        "The denoiser trained in stage 2: SEED (frozen LangAE encoder + Mamba-style EMA decoder) or the "
        "RED-CNN baseline (LangDA is plug-and-play for both)."
    ),
    "train.lambda_spin": (
        "Weight of the LangDA loss (feature and token alignment with the frozen LangAE): 0.1 in "
        "LangMamba, 0.5 in LEDA; 0 trains with MSE only (the baseline)."
    ),
    "train.langae_edit": (
        "The trained LangAE checkpoint (a stage-1 run's best/ or last/ folder): SEED's frozen encoder and "
        "the LangDA loss. Filled in automatically when a langae run finishes here."
    ),
    "train.langae_button": "Choose the LangAE checkpoint folder.",
    "train.codebook_edit": (
        "The frozen language codebook: minilm (offline, bundled), clip:<local folder or hub id> "
        "(PubMedCLIP, the paper's), random:<n>x<d> (tests). Stage 0 and stage 1 must use the same one."
    ),
    "train.candidates_edit": (
        "Candidate token pools from the candidates stage (same codebook). Without them the pyramid "
        "semantic loss is off."
    ),
    "train.candidates_button": "Choose the candidate pools .json file.",
    "train.checkpoint_edit": (
        "The denoiser to evaluate (a checkpoint or a training run folder). Empty: only the low-dose input "
        "is scored against the normal-dose reference."
    ),
    "train.checkpoint_button": "Choose the checkpoint folder to evaluate.",
    "train.dose_spin": "Dose fraction of the simulated scan: 0.25 gives quarter-dose pairs, 1 adds no noise.",
    "train.amp_combo": (
        "Mixed precision of the training steps. auto: float32 on the CPU; on CUDA bfloat16 where "
        "supported, else float16 with loss scaling. bf16: bfloat16 autocast, also on the CPU, where "
        "steps run about 1.4x faster on CPUs with AVX512-BF16 or AMX at the same validation PSNR "
        "(elsewhere the trainer warns and stays in float32). Weights and validation stay float32."
    ),
    "train.device_combo": (
        "Where the process trains: auto (CUDA when present, else CPU), cpu, cuda or cuda:N. The model "
        "lives in the training process, never in napari."
    ),
    "train.extra_edit": (
        "More options of the stage, as on a command line (see `python -m training <stage> --help`), "
        "e.g. --log-every 1 --val-fraction 0.2 --seed 3."
    ),
    "train.command_edit": "The exact command Start runs (copy it to run the same thing in a terminal or on a cluster).",
    "train.start_button": "Check the choices, then start the stage in a separate process.",
    "train.stop_button": (
        "Stop gracefully: the trainer finishes its step, writes its last/ checkpoint and exits (killed if "
        "it has not ended after a minute). While stopping, press again to kill it at once."
    ),
    "train.resume_button": "Continue the run in the run folder from its last/ checkpoint (--resume, same options).",
    "train.use_button": "Make this run's best checkpoint (else its last) the model of the Denoise widget.",
    "train.progress_bar": "Steps done of all steps, and the estimated time left (from the run's log).",
    "train.tabs": "Live losses and validation metrics (read from the run's metrics.jsonl), and the process output.",
    "train.log_box": "Everything the training process printed.",
    "train.error_box": "The last error lines of a process that failed.",
})
