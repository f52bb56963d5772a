"""A tissue prior from CT physics: which kind of matter each pixel of a slice is, from its HU.

What this is -- and what it is not
----------------------------------
:func:`tissue_map` labels every pixel of one axial CT slice with one of seven **tissue
classes** (:data:`TISSUE_CLASSES`) using nothing but Hounsfield units, a little smoothing and
mask morphology. It is a *physical tissue prior*, **not organ segmentation**: it cannot tell
the liver from the spleen or a muscle (all are "soft tissue / organ"), nor a lung from gas in
the bowel (both are "air inside the body", called lung), and contrast-enhanced blood is only
told from enhancing organs by its higher HU (a non-contrast scan has no "blood" pixels: its
blood is soft tissue; arterial-phase contrast above 300 HU reads as bone). It exists so that
the pyramid semantic loss of the LangAE can give each image region a pool of words describing
what the region physically shows (:class:`training.candidates.AnatomyScorer`) on machines
without a vision-language model; a PubMedCLIP prior
(``python -m training candidates --scorer clip:<dir>``) replaces it where one is at hand.

The classes, in order (the value stored in the map)
----------------------------------------------------
0. outside air -- everything outside the body and the table;
1. lung -- air (< -500 HU) inside the body: lungs, airways, and also bowel gas;
2. fat -- [-500, -30) HU inside the body (subcutaneous and visceral fat; partial-volume edges);
3. soft tissue / organ -- [-30, 140) HU: muscle, liver, kidney, spleen, bowel wall, fluid;
4. contrast-enhanced blood -- [140, 300) HU not enclosed by bone: enhanced vessels and heart;
5. bone -- >= 300 HU, with the cancellous interior its cortex encloses (vertebral bodies);
6. table / metal -- dense matter outside the body (the patient table, cables, blankets) and
   anything >= 2000 HU (clips, wires, implants, undiluted contrast).

How the map is made
-------------------
1. The slice is smoothed with a Gaussian of 1 mm (noise of low-dose and sharp-kernel
   reconstructions is 20-90 HU; the class boundaries are a few tens of HU apart).
2. **Body mask**: pixels > -500 HU, opened with a 2 mm disk (this detaches a thin table the
   patient lies on), split into connected components; the components thicker than 16 mm (an
   inscribed disk of radius >= 8 mm: the trunk, the arms; never the table shell) are the body.
   The opening's lost rim is restored within its radius, then holes are filled (lungs and
   bowel gas become inside).
3. **Lung mask**: air (< -500 HU, the body threshold) inside the body.
4. Inside the body, HU ranges give fat, soft tissue and blood. Bone is the cortex (>= 300 HU)
   plus the cancellous bone it borders: a [140, 300) HU component touching the cortex that is
   small (<= 1200 mm^2: a vertebral body, not the aortic arch or the heart) or bordered by
   cortex along >= 30 % of its rim; then closed by a 3 mm disk, with enclosed holes up to
   2500 mm^2 filled (the marrow of a vertebral body, not the pelvic cavity); >= 2000 HU is
   metal. A vessel's contrast-filled lumen inside a calcified wall is neither: a [140, 300) HU
   component of >= 250 mm^2 that is homogeneous (SD < 45 HU inside) and whose ring of >= 300 HU
   is thin (< 1.5 mm on average; marrow is mottled and a vertebral body's cortex thicker) stays
   blood (the calcified aorta of the sample series, contrast-dense great vessels and heart
   chambers beside calcifications).
5. Dense pixels outside the body (components of at least 10 mm^2) are the table.

Pixel sizes in millimetres come from ``pixel_spacing`` (default 0.75 mm, a 384 mm field of view
on 512 pixels). The map is meant for whole slices: on a small crop the body mask cannot see
whether air touching the crop edge lies inside the body, so training computes maps on whole
slices and crops them with the image (``training/langae.py``).

This module needs only NumPy, SciPy and scikit-image (no torch at import).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_langmamba.errors import ConfigError

__all__ = [
    "BLOOD",
    "BONE",
    "FAT",
    "LUNG",
    "OUTSIDE_AIR",
    "SOFT_TISSUE",
    "TABLE_METAL",
    "TISSUE_CLASSES",
    "TissueClass",
    "body_mask",
    "DOMINANCE",
    "class_words",
    "dominant_classes",
    "dominant_region_classes",
    "majority_region_classes",
    "region_class_sets",
    "class_pool_table",
    "class_token_ids",
    "region_edges",
    "tissue_map",
]


@dataclass(frozen=True)
class TissueClass:
    """One class of :func:`tissue_map`: its value, a short name, and the words that describe it."""

    index: int
    name: str
    words: tuple[str, ...]
    description: str
    # The words true of every region of the class. The others name only some of its members (an
    # organ, a bone, a kind of vessel) that a prior from HU cannot tell apart, so they are pool
    # words while training but never the word a tissue-choosing LangAE shows (the liver is not
    # to read "muscles", a vertebral body not "rib").
    generic: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not set(self.generic) <= set(self.words):
            raise ValueError(f"{self.name}: generic words must be among its words")


OUTSIDE_AIR, LUNG, FAT, SOFT_TISSUE, BLOOD, BONE, TABLE_METAL = range(7)

# Every word is a real English word present as a whole word in MiniLM's WordPiece vocabulary
# (tests/test_anatomy.py checks this against the real table), at least three Latin letters long
# so that the displayable-word codebooks keep it too.
TISSUE_CLASSES: tuple[TissueClass, ...] = (
    TissueClass(OUTSIDE_AIR, "outside air",
                ("air", "outside", "background", "exterior", "surrounding", "empty"),
                "air outside the body",
                generic=("air", "outside", "background", "exterior", "surrounding", "empty")),
    TissueClass(LUNG, "lung",
                ("lung", "lungs", "pulmonary", "respiratory", "breathing", "lobe"),
                "air inside the body: lungs and airways (bowel gas too)",
                generic=("lung", "lungs", "pulmonary", "respiratory")),
    TissueClass(FAT, "fat",
                ("fat", "fatty", "obesity"),
                "fat inside the body, subcutaneous and visceral",
                generic=("fat", "fatty")),
    TissueClass(SOFT_TISSUE, "soft tissue",
                ("tissue", "tissues", "organ", "organs", "liver", "kidney", "muscle", "muscles", "stomach",
                 "colon", "gut", "flesh", "abdominal"),
                "soft tissue and organs: muscle, liver, kidney, spleen, bowel, fluid",
                generic=("tissue", "tissues", "organ", "organs")),
    TissueClass(BLOOD, "blood",
                ("blood", "artery", "arteries", "vein", "veins", "vessel", "vessels", "vascular", "arterial",
                 "contrast", "circulation"),
                "contrast-enhanced blood: enhanced vessels and heart chambers",
                generic=("blood", "vessel", "vessels", "vascular", "contrast")),
    TissueClass(BONE, "bone",
                ("bone", "bones", "skeletal", "skeleton", "spine", "spinal", "vertebrae", "rib", "ribs", "marrow",
                 "calcium"),
                "bone: cortex and the cancellous bone it encloses",
                generic=("bone", "bones", "skeletal", "skeleton")),
    TissueClass(TABLE_METAL, "table or metal",
                ("table", "metal", "metallic", "device", "implant", "hardware", "wire"),
                "the patient table and other objects outside the body; metal anywhere",
                generic=("device", "hardware")),
)
"""The seven tissue classes, in the order of their values in a :func:`tissue_map`."""

# HU thresholds (on the smoothed slice)
BODY_HU = -500.0
LUNG_HU = BODY_HU  # below: air (lung inside the body); above: fat
FAT_HU = -30.0  # below: fat; above: soft tissue
BLOOD_HU = 140.0  # above: contrast-enhanced blood
BONE_HU = 300.0
METAL_HU = 2000.0  # the top of the model's normalisation: a normalised 1.0 counts as metal

# Sizes in millimetres
DEFAULT_PIXEL_SPACING_MM = 0.75
SMOOTH_SIGMA_MM = 1.0
TABLE_OPENING_MM = 2.0
BODY_MIN_RADIUS_MM = 8.0
BONE_CLOSING_MM = 3.0
BONE_MAX_HOLE_MM2 = 2500.0
CANCELLOUS_RIM_SHARE = 0.3
CANCELLOUS_MAX_AREA_MM2 = 1200.0
# A vessel lumen in a calcified wall: a large, homogeneous [140, 300) HU disk inside a thin ring
LUMEN_MIN_AREA_MM2 = 250.0
LUMEN_MAX_RING_MM = 1.5
LUMEN_MAX_STD_HU = 45.0
TABLE_MIN_AREA_MM2 = 10.0


def class_words() -> dict[str, list[str]]:
    """``{class name: its words}`` in class order (what training records)."""
    return {c.name: list(c.words) for c in TISSUE_CLASSES}


def class_token_ids(codebook: Any, generic: bool = False) -> tuple[list[list[int]], dict[str, list[str]], list[str]]:
    """Per tissue class, the codebook rows of its words (``generic``: only the words true of the
    whole class, :attr:`TissueClass.generic`); the words used per class; the words that are not
    tokens of ``codebook`` (skipped)."""
    used: dict[str, list[str]] = {}
    skipped: list[str] = []
    class_ids: list[list[int]] = []
    for tissue in TISSUE_CLASSES:
        ids, words = [], []
        for word in tissue.generic if generic else tissue.words:
            try:
                ids.append(codebook.token_id(word))
                words.append(word)
            except ConfigError:
                skipped.append(word)
        class_ids.append(ids)
        used[tissue.name] = words
    return class_ids, used, skipped


def class_pool_table(class_ids: Sequence[Sequence[int]]) -> Any:
    """One pool of codebook rows per combination of classes (row ``bits``: bit ``k`` = class ``k``),
    the union of their words, as a (2**classes, width) LongTensor padded with -1: the pools that
    :func:`region_class_sets` bitmasks index."""
    import torch  # imported on use only: the tissue map itself needs no torch

    n_combos = 1 << len(class_ids)
    pools = [sorted({i for k, ids in enumerate(class_ids) if combo >> k & 1 for i in ids}) for combo in range(n_combos)]
    table = torch.full((n_combos, max(1, max(len(p) for p in pools))), -1, dtype=torch.long)
    for combo, ids in enumerate(pools):
        table[combo, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
    return table


def _as_slice(hu: np.ndarray) -> np.ndarray:
    array = np.asarray(hu, dtype=np.float32)
    if array.ndim != 2 or min(array.shape) < 1:
        raise ConfigError(f"A tissue map is made from one 2-D slice in HU; got an array of shape {array.shape}.")
    if not np.isfinite(array).all():
        raise ConfigError("The slice holds NaN or infinite values; a tissue map needs finite HU.")
    return array


def _spacing(pixel_spacing: float | Sequence[float] | None) -> float:
    if pixel_spacing is None:
        return DEFAULT_PIXEL_SPACING_MM
    values = np.atleast_1d(np.asarray(pixel_spacing, dtype=np.float64))
    if values.size == 0 or not np.isfinite(values).all() or (values <= 0).any():
        raise ConfigError(f"pixel_spacing must be positive millimetres; got {pixel_spacing!r}.")
    return float(values.mean())


def _disk(radius_px: float) -> np.ndarray:
    from skimage.morphology import disk

    return disk(max(1, int(round(radius_px))))


def _smooth(hu: np.ndarray, spacing: float) -> np.ndarray:
    from scipy import ndimage as ndi

    return ndi.gaussian_filter(hu, SMOOTH_SIGMA_MM / spacing, mode="nearest")


def _body_from_smooth(smooth: np.ndarray, spacing: float) -> np.ndarray:
    from scipy import ndimage as ndi

    dense = smooth > BODY_HU
    if dense.all():  # a crop inside the body
        return dense
    if not dense.any():
        return dense
    radius = TABLE_OPENING_MM / spacing
    opened = ndi.binary_opening(dense, structure=_disk(radius))
    labels, n = ndi.label(opened)
    if n == 0:
        return np.zeros_like(dense)
    thickness = ndi.maximum(ndi.distance_transform_edt(opened), labels, index=np.arange(1, n + 1))
    keep = np.flatnonzero(np.asarray(thickness) * spacing >= BODY_MIN_RADIUS_MM) + 1
    core = np.isin(labels, keep)
    body = dense & ndi.binary_dilation(core, structure=_disk(radius))
    return ndi.binary_fill_holes(body)


def body_mask(hu: np.ndarray, *, pixel_spacing: float | Sequence[float] | None = None) -> np.ndarray:
    """Bool (y, x) mask of the patient's body (the table excluded, lungs and gas inside)."""
    slice_hu = _as_slice(hu)
    spacing = _spacing(pixel_spacing)
    return _body_from_smooth(_smooth(slice_hu, spacing), spacing)


def _lumens(hu: np.ndarray, labels: np.ndarray, n: int, cortex: np.ndarray, spacing: float) -> np.ndarray:
    """Bool (n + 1,): which labelled [140, 300) HU components are the contrast-filled lumen of a vessel with a
    calcified wall, not cancellous bone. Both sit inside a ring >= 300 HU; the lumen is large (an
    aorta, >= 250 mm^2), homogeneous (HU SD < 45 inside, away from its edge: marrow between
    trabeculae is mottled, 50-85 HU on the Mayo and sample series) and its ring is thin (cortex
    within 3 mm of it / its equivalent circumference < 1.5 mm: a calcified wall is ~1 mm, a
    vertebral body's cortex with its arch 2-4 mm)."""
    from scipy import ndimage as ndi

    lumen = np.zeros(n + 1, dtype=bool)
    area = np.bincount(labels.ravel(), minlength=n + 1) * spacing**2
    area[0] = 0.0  # the background is never a lumen
    for index in np.flatnonzero(area >= LUMEN_MIN_AREA_MM2):
        component = labels == index
        ring = cortex & ndi.binary_dilation(component, structure=_disk(3.0 / spacing))
        circumference = 2.0 * np.sqrt(np.pi * area[index])
        inside = ndi.binary_erosion(component, structure=_disk(1.5 / spacing))
        if (inside.sum() >= 10 and ring.sum() * spacing**2 / circumference < LUMEN_MAX_RING_MM
                and float(hu[inside].std()) < LUMEN_MAX_STD_HU):
            lumen[index] = True
    return lumen


def _bone_mask(hu: np.ndarray, smooth: np.ndarray, body: np.ndarray, spacing: float) -> np.ndarray:
    from scipy import ndimage as ndi

    cortex = smooth >= BONE_HU
    # Cancellous bone (often 130-250 HU, like enhanced blood): a component of that range that
    # touches the cortex and is either small (a vertebral body, not the aortic arch or the heart)
    # or bordered by the cortex along much of its rim.
    middle = (smooth >= BLOOD_HU) & ~cortex & body
    labels, n = ndi.label(middle)
    dense = cortex.copy()
    if n:
        rim = middle & ~ndi.binary_erosion(middle)
        near_cortex = ndi.binary_dilation(cortex, structure=_disk(1.0 / spacing))
        index = np.arange(1, n + 1)
        contact = np.asarray(ndi.sum(rim & near_cortex, labels, index))
        share = contact / np.maximum(np.asarray(ndi.sum(rim, labels, index)), 1)
        area = np.bincount(labels.ravel(), minlength=n + 1)[1:] * spacing**2
        inner = np.zeros(n + 1, dtype=bool)
        inner[1:] = (contact > 0) & ((share >= CANCELLOUS_RIM_SHARE) | (area <= CANCELLOUS_MAX_AREA_MM2))
        lumen = _lumens(hu, labels, n, cortex, spacing)
        inner &= ~lumen
        dense |= inner[labels]
        lumen_mask = lumen[labels]
    else:
        lumen_mask = np.zeros_like(middle)
    dense = ndi.binary_closing(dense, structure=_disk(BONE_CLOSING_MM / spacing)) & body & ~lumen_mask
    holes = ndi.binary_fill_holes(dense) & ~dense & ~lumen_mask
    labels, n = ndi.label(holes)
    if n:
        areas = np.bincount(labels.ravel(), minlength=n + 1) * spacing**2
        small = areas <= BONE_MAX_HOLE_MM2
        small[0] = False
        dense |= small[labels]
    return dense


def tissue_map(hu: np.ndarray, *, pixel_spacing: float | Sequence[float] | None = None) -> np.ndarray:
    """Tissue class of every pixel of an axial slice in HU: a (y, x) uint8 map of class values.

    See the module docstring for the classes and the rules; this is a physical prior, not
    organ segmentation.

    Parameters
    ----------
    hu
        One slice (y, x) in Hounsfield units.
    pixel_spacing
        Pixel size in mm (a number or ``(dy, dx)``); default 0.75 mm.
    """
    from scipy import ndimage as ndi

    slice_hu = _as_slice(hu)
    spacing = _spacing(pixel_spacing)
    smooth = _smooth(slice_hu, spacing)
    body = _body_from_smooth(smooth, spacing)
    out = np.full(slice_hu.shape, OUTSIDE_AIR, dtype=np.uint8)

    table = (smooth > BODY_HU) & ~body
    labels, n = ndi.label(table)
    if n:
        areas = np.bincount(labels.ravel(), minlength=n + 1) * spacing**2
        big = areas >= TABLE_MIN_AREA_MM2
        big[0] = False
        out[big[labels]] = TABLE_METAL

    inside = np.digitize(smooth, [LUNG_HU, FAT_HU, BLOOD_HU]).astype(np.uint8)  # 0 air, 1 fat, 2 soft, 3 blood
    by_range = np.array([LUNG, FAT, SOFT_TISSUE, BLOOD], dtype=np.uint8)[inside]
    out[body] = by_range[body]
    out[_bone_mask(slice_hu, smooth, body, spacing)] = BONE
    out[smooth >= METAL_HU] = TABLE_METAL
    return out


# ----------------------------------------------------------------------------------------------
# regions of the token pyramid


def region_edges(latent_size: int, image_size: int) -> list[np.ndarray]:
    """Per pyramid layer, the pixel edges of the regions along one axis.

    The regions are those of :mod:`napari_langmamba.tokens`: the ``i``-th position of a layer
    stands for a block of latent cells (``latent_blocks``), and one latent cell is
    ``image_size / latent_size`` pixels. Returns three int64 arrays of ``n_positions + 1`` edges
    from 0 to ``image_size``.
    """
    from napari_langmamba.models.quantizer import axis_positions  # torch, imported on use only
    from napari_langmamba.tokens import latent_blocks

    latent_size, image_size = int(latent_size), int(image_size)
    if latent_size < 1 or image_size % latent_size:
        raise ConfigError(
            f"An image axis of {image_size} pixels is not a whole number of latent cells ({latent_size})."
        )
    cell = image_size // latent_size
    return [latent_blocks(p, latent_size) * cell for p in axis_positions(latent_size)]


# A region is dominated by a tissue class covering at least this share of its pixels (word agreement)
DOMINANCE = 0.6


def _checked_maps(tissue: np.ndarray) -> np.ndarray:
    """Tissue maps as a (b, y, x) integer array of class values, or a ConfigError."""
    maps = np.asarray(tissue)
    if maps.ndim == 2:
        maps = maps[None]
    if maps.ndim != 3 or not np.issubdtype(maps.dtype, np.integer):
        raise ConfigError(f"Tissue maps are integer (y, x) or (b, y, x) arrays; got {maps.dtype} {maps.shape}.")
    n_classes = len(TISSUE_CLASSES)
    if maps.size and (maps.min() < 0 or maps.max() >= n_classes):
        raise ConfigError(f"Tissue map values must be class values 0..{n_classes - 1}.")
    return maps


def region_class_sets(
    tissue: np.ndarray, latent_shape: tuple[int, int], *, min_share: float = 0.25
) -> list[np.ndarray]:
    """Which tissue classes cover each region of each pyramid layer, as class bitmasks.

    Parameters
    ----------
    tissue
        (y, x) or (b, y, x) tissue maps (:func:`tissue_map`).
    latent_shape
        ``(h, w)`` of the LangAE latent of these images (one latent cell is a whole number of pixels).
    min_share
        A class belongs to a region when it covers at least this share of the region's pixels;
        the region's most frequent class always belongs.

    Returns
    -------
    list of three uint8 arrays (b, rows_l, cols_l)
        Bit ``k`` of a value is set when class ``k`` covers the region (``(b,)`` dropped for a 2-D map).
    """
    maps = _checked_maps(tissue)
    single = np.asarray(tissue).ndim == 2
    if not 0.0 <= float(min_share) <= 1.0:
        raise ConfigError(f"min_share must be in [0, 1]; got {min_share}.")
    weights = (1 << np.arange(len(TISSUE_CLASSES))).astype(np.int64)
    out = []
    for counts in _region_class_counts(maps, latent_shape):  # (b, r, c, k)
        share = counts / counts.sum(-1, keepdims=True)
        members = (counts > 0) & (share >= float(min_share))
        np.put_along_axis(members, counts.argmax(-1)[..., None], True, axis=-1)
        bits = (members * weights).sum(-1).astype(np.uint8)
        out.append(bits[0] if single else bits)
    return out


def _region_class_counts(maps: np.ndarray, latent_shape: tuple[int, int]) -> list[np.ndarray]:
    """Per pyramid layer, (b, rows_l, cols_l, classes) pixel counts of tissue maps (b, y, x)."""
    b, h, w = maps.shape
    onehot = (maps[..., None] == np.arange(len(TISSUE_CLASSES), dtype=maps.dtype)).astype(np.int32)  # (b, h, w, k)
    return [np.add.reduceat(np.add.reduceat(onehot, rows[:-1], axis=1), cols[:-1], axis=2)
            for rows, cols in zip(region_edges(latent_shape[0], h), region_edges(latent_shape[1], w), strict=True)]


def dominant_classes(counts: np.ndarray, dominance: float = DOMINANCE) -> np.ndarray:
    """The class covering at least ``dominance`` of each region's pixels, from per-class pixel counts
    (..., classes); int64 (...), ``-1`` where no class does."""
    if not 0.5 < float(dominance) <= 1.0:
        raise ConfigError(f"dominance must be in (0.5, 1]: one class at most can dominate a region; got {dominance}.")
    share = counts / np.maximum(counts.sum(-1, keepdims=True), 1)
    return np.where(share.max(-1) >= float(dominance), share.argmax(-1), -1).astype(np.int64)


def majority_region_classes(tissue: np.ndarray, latent_shape: tuple[int, int]) -> list[np.ndarray]:
    """Per pyramid layer, the most frequent tissue class of each region of :func:`region_class_sets`:
    three int64 arrays (b, rows_l, cols_l) (``(b,)`` dropped for a 2-D map)."""
    maps = _checked_maps(tissue)
    single = np.asarray(tissue).ndim == 2
    return [counts.argmax(-1).astype(np.int64)[0 if single else slice(None)]
            for counts in _region_class_counts(maps, latent_shape)]


def dominant_region_classes(tissue: np.ndarray, latent_shape: tuple[int, int], *,
                            dominance: float = DOMINANCE) -> list[np.ndarray]:
    """Per pyramid layer, the tissue class covering at least ``dominance`` of each region's pixels.

    The regions are those of :func:`region_class_sets`; ``benchmarks/token_agreement.py`` counts a
    region's word as agreeing when it is in the list of this class. Returns three int64 arrays
    (b, rows_l, cols_l) (``(b,)`` dropped for a 2-D map), ``-1`` where no class dominates.
    """
    maps = _checked_maps(tissue)
    single = np.asarray(tissue).ndim == 2
    return [dominant_classes(counts, dominance)[0 if single else slice(None)]
            for counts in _region_class_counts(maps, latent_shape)]
