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
