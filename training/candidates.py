"""Stage 0, ``candidates``: per training image, the candidate token pools C_1, C_2, C_3 (JSON).

The pyramid semantic loss of stage 1 pulls the layer-l token embeddings of an image towards a
pool of vocabulary tokens that describe it. Pools come from scoring every token of the
codebook's vocabulary against the image, min-max normalising the scores over the vocabulary
(per image) and keeping the tokens at or above the layer's threshold rho_l
(default 0.95, 0.9, 0.8: layer 1, the coarsest, gets the fewest, most certain tokens).

Scorers
-------
``clip:<dir>``
    The paper's prior: CLIP image-text similarity between the slice and the prompt
    ``"A CT of <token>"`` for every vocabulary token. The slice is windowed (``--window``,
    default abdomen), repeated to 3 channels, resized to the CLIP image size (224 x 224 for
    ViT-B/32) and normalised with CLIP's mean/std. ``<dir>`` is a local folder written by
    ``save_pretrained`` (PubMedCLIP, or any CLIP) holding ``*.safetensors`` weights and the
    tokenizer; nothing is downloaded.
``lexicon``
    For machines without a vision-language model. A fixed anatomy lexicon
    (:data:`ANATOMY_LEXICON`) plus the words of the image's DICOM description fields
    (StudyDescription, SeriesDescription, BodyPartExamined, ProtocolName, when the data has
    them) is embedded with the codebook's own language model -- each term is split greedily into
    vocabulary tokens and represented by the mean of their embeddings -- and every vocabulary
    token is scored by its highest cosine similarity to a term. **This is a weaker, text-only
    prior**: it never looks at the pixels, so every image with the same description gets the
    same pools (images without description fields all get the lexicon's pools); the pools say
    "this is abdominal CT anatomy", not "this slice shows the liver".

``anatomy`` (stage 1 only, the default of ``python -m training langae`` without ``--candidates``)
    No pools file: :class:`AnatomyScorer` gives **every region of every pyramid layer its own
    pool** while training, from a tissue map of the normal-dose slice in HU
    (:func:`napari_langmamba.anatomy.tissue_map`: outside air, lung, fat, soft tissue, blood,
    bone, table/metal -- a physical tissue prior, not organ segmentation). A region's pool is the
    words of the classes covering at least ``min_share`` of its pixels (and of its most frequent
    class); each class's words (:data:`napari_langmamba.anatomy.TISSUE_CLASSES`) are tokens of the
    codebook, since the codebook is the language model's own table. ``clip:<dir>`` pools
    replace it (``--candidates``) for users who have PubMedCLIP.

Output (``--output FILE.json``)::

    {"format": "napari-langmamba-candidate-pools", "version": 1,
     "scorer": "lexicon" | "clip:<dir>", "prompt": "A CT of {}", "window": "abdomen",
     "thresholds": [0.95, 0.9, 0.8],
     "codebook": {"source", "sha256", "n", "d"},
     "pool_sets": [[[ids of C_1], [ids of C_2], [ids of C_3]], ...],   # distinct pool triples
     "images": {"<image id>": <index into pool_sets>, ...},
     "top_words": {"<pool set index>": [the 10 best-scoring words], ...}}

Image ids are the ids of the training dataset (:mod:`training.datasets`), so stage 1 finds the
pools of each training slice (and of every crop taken from it).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from napari_langmamba.errors import CheckpointError, ConfigError
from training.config import add_config_argument, add_option, options_to_dict, resolve_options
from training.options import BALANCE_BY, DEFAULT_PROMPT, DEFAULT_THRESHOLDS, CandidateOptions

logger = logging.getLogger(__name__)

__all__ = [
    "ANATOMY_LEXICON",
    "AnatomyScorer",
    "DEFAULT_THRESHOLDS",
    "CandidatePools",
    "ClipScorer",
    "anatomy_word_classes",
    "LexiconScorer",
    "add_arguments",
    "load_candidate_pools",
    "main",
    "minmax",
    "pools_from_scores",
    "tokenize_greedy",
]

POOLS_FORMAT = "napari-langmamba-candidate-pools"
POOLS_VERSION = 1
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TOP_WORDS = 10
DEFAULT_MIN_SHARE = 0.25

ANATOMY_LEXICON: tuple[str, ...] = (
    # organs of the abdomen and chest
    "liver", "spleen", "kidney", "stomach", "pancreas", "gallbladder", "bladder", "bowel", "intestine",
    "colon", "duodenum", "esophagus", "adrenal", "prostate", "uterus", "heart", "lung", "diaphragm",
    # skeleton
    "bone", "vertebra", "spine", "rib", "pelvis", "femur", "sternum", "cartilage",
    # vessels
    "vessel", "aorta", "artery", "vein", "portal", "cava",
    # tissues and contents
    "fat", "muscle", "tissue", "organ", "air", "gas", "fluid", "blood", "contrast", "skin",
    # regions
    "abdomen", "chest", "thorax", "body", "anatomy",
)
"""The anatomy of abdominal and thoracic CT slices; ``--lexicon FILE`` replaces it (one term a line)."""

DESCRIPTION_FIELDS = ("StudyDescription", "SeriesDescription", "BodyPartExamined", "ProtocolName")


# ----------------------------------------------------------------------------------------------
# scores -> pools


def minmax(scores: Tensor) -> Tensor:
    """Min-max normalise scores over the vocabulary to [0, 1] (all equal -> all ones)."""
    scores = scores.to(torch.float64)
    lo, hi = scores.min(), scores.max()
    if float(hi - lo) <= 0.0:
        return torch.ones_like(scores)
    return (scores - lo) / (hi - lo)


def pools_from_scores(normalised: Tensor, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> list[list[int]]:
    """Per layer, the (sorted) token ids whose normalised score is >= the layer's threshold."""
    return [torch.nonzero(normalised >= float(rho)).flatten().tolist() for rho in thresholds]


# ----------------------------------------------------------------------------------------------
# lexicon scorer


def tokenize_greedy(term: str, vocabulary: dict[str, int]) -> list[int]:
    """Split ``term`` into vocabulary tokens, longest match first, word by word.

    A deterministic stand-in for the language model's own tokenizer that needs only the
    codebook's words (WordPiece and BPE markers are already removed from them). Characters no
    token covers are skipped.
    """
    ids: list[int] = []
    for word in re.findall(r"[a-z0-9]+", term.lower()):
        start = 0
        while start < len(word):
            for end in range(len(word), start, -1):
                token = vocabulary.get(word[start:end])
                if token is not None:
                    ids.append(token)
                    start = end
                    break
            else:
                start += 1
    return ids


def description_terms(metadata: dict[str, Any] | None) -> list[str]:
    """Words (3+ letters) of the DICOM description fields in ``metadata`` (lower case, unique)."""
    terms: list[str] = []
    for key in DESCRIPTION_FIELDS:
        value = (metadata or {}).get(key)
        if isinstance(value, str):
            for word in re.findall(r"[A-Za-z]{3,}", value):
                if word.lower() not in terms:
                    terms.append(word.lower())
    return terms


def slice_metadata(source: Any, index: int) -> dict[str, Any]:
    """The DICOM fields of slice ``index`` of an NDCT source ({} when it has none)."""
    getter = getattr(source, "metadata", None)
    if callable(getter):
        return dict(getter(index) or {})
    # NDCTSlices keeps the volumes it read (with their DICOM metadata) in private lists; until it
    # offers metadata(i), look there defensively and fall back to "no description".
    try:
        kind, volume_index, _ = source._items[index][1]
        if kind == "volume":
            return dict(source._volumes[volume_index].metadata or {})
    except (AttributeError, IndexError, TypeError, ValueError):
        pass
    return {}


class LexiconScorer:
    """Cosine similarity of every vocabulary token to the nearest lexicon term (codebook space)."""

    def __init__(self, codebook: Any, *, lexicon: Sequence[str] = ANATOMY_LEXICON) -> None:
        self.codebook = codebook
        self.lexicon = tuple(lexicon)
        vocab: dict[str, int] = {}
        for i, word in enumerate(codebook.words):
            vocab.setdefault(word.lower(), i)
        self._vocab = vocab
        table = codebook.embeddings.to(torch.float32)
        self._unit = F.normalize(table, dim=1)  # (n, d)
        self._cache: dict[tuple[str, ...], Tensor] = {}
        if self.embed_terms(self.lexicon).shape[0] == 0:
            raise ConfigError(
                f"None of the lexicon terms maps to a token of the codebook {codebook.source!r} "
                "(its words are not natural-language words?); the lexicon scorer needs a language "
                "codebook such as 'minilm' or 'clip:<dir>'."
            )

    def embed_terms(self, terms: Iterable[str]) -> Tensor:
        """(t, d): each term as the mean embedding of its tokens (terms without tokens dropped)."""
        rows = []
        for term in terms:
            ids = tokenize_greedy(term, self._vocab)
            if ids:
                rows.append(self.codebook.embeddings[ids].to(torch.float32).mean(0))
        if not rows:
            return torch.zeros(0, self.codebook.embeddings.shape[1])
        return torch.stack(rows)

    def scores(self, metadata: dict[str, Any] | None = None) -> Tensor:
        """Min-max normalised (n,) scores for an image with these DICOM fields."""
        terms = tuple(dict.fromkeys([*self.lexicon, *description_terms(metadata)]))
        cached = self._cache.get(terms)
        if cached is None:
            queries = F.normalize(self.embed_terms(terms), dim=1)  # (t, d)
            raw = (self._unit @ queries.t()).amax(dim=1)  # (n,) best cosine over terms
            cached = self._cache[terms] = minmax(raw)
        return cached


# ----------------------------------------------------------------------------------------------
# anatomy scorer (per-position pools, computed while training)


def anatomy_word_classes(codebook: Any) -> Tensor | None:
    """(n,) tissue class value of each codebook row that is one of that class's words, -1 for the
    other rows; ``None`` when no class word is a row (e.g. a ``random:`` codebook)."""
    from napari_langmamba.anatomy import class_token_ids

    class_ids, _, _ = class_token_ids(codebook)
    if not any(class_ids):
        return None
    table = torch.full((codebook.n,), -1, dtype=torch.long)
    for value, ids in reversed(list(enumerate(class_ids))):  # a word of two classes counts for the first
        table[torch.as_tensor(ids, dtype=torch.long)] = value
    return table



class AnatomyScorer:
    """Per-region candidate pools from a tissue map of each image (no vision-language model).

    Parameters
    ----------
    codebook
        The LangAE's codebook; each tissue class's words are its tokens (``codebook.token_id``).
        Words that are not tokens of the codebook are skipped with a logged warning.
    min_share
        A class's words join a region's pool when the class covers at least this share of the
        region's pixels (the region's most frequent class always does).
    balance_by
        What the semantic loss's ``balance`` counts: ``"pool"`` (each combination of classes) or
        ``"class"`` (each region's most frequent class, so that rare tissues such as blood weigh
        more while rare mixes of common ones, such as fat at the skin's edge, do not).
    """

    name = "anatomy"

    def __init__(self, codebook: Any, *, min_share: float = DEFAULT_MIN_SHARE, balance_by: str = "pool") -> None:
        from napari_langmamba.anatomy import TISSUE_CLASSES, class_pool_table, class_token_ids

        if not 0.0 < float(min_share) <= 1.0:
            raise ConfigError(f"The anatomy scorer's min_share must be in (0, 1]; got {min_share}.")
        if balance_by not in BALANCE_BY:
            raise ConfigError(f"The anatomy scorer balances by one of {', '.join(BALANCE_BY)}; got {balance_by!r}.")
        self.codebook = codebook
        self.min_share = float(min_share)
        self.balance_by = balance_by
        self.classes = TISSUE_CLASSES
        class_ids, used, skipped = class_token_ids(codebook)
        if skipped:
            logger.warning("anatomy scorer: %d class words are not tokens of the codebook %r and are skipped: %s",
                           len(skipped), codebook.source, ", ".join(skipped))
        if not any(class_ids):
            raise ConfigError(
                f"None of the anatomy words is a token of the codebook {codebook.source!r} (its words are not "
                "natural-language words?); the anatomy scorer needs a language codebook such as 'words:minilm', "
                "'minilm' or 'clip:<dir>'. Pass --scorer none to train without the semantic loss."
            )
        self.class_words = used
        self.skipped_words = skipped
        self.pool_ids = class_pool_table(class_ids)  # one pool per combination of classes (bit k = class k)

    def info(self) -> dict[str, Any]:
        """What training records: the scorer, its share, the words used per class, the skipped ones."""
        return {"scorer": self.name, "min_share": self.min_share, "balance_by": self.balance_by,
                "class_words": self.class_words, "skipped_words": self.skipped_words}

    @staticmethod
    def tissue_maps(images: Tensor | np.ndarray, *, normalized: bool = True,
                    pixel_spacing: float | None = None) -> np.ndarray:
        """(b, h, w) uint8 tissue maps of a batch (b, 1, h, w) or (b, h, w) in the model's [0, 1] scale
        (``normalized``) or in HU. Maps of whole slices are better than maps of crops (see
        :mod:`napari_langmamba.anatomy`)."""
        from napari_langmamba.anatomy import tissue_map
        from napari_langmamba.windowing import MODEL_NORMALIZATION

        array = images.detach().float().cpu().numpy() if isinstance(images, Tensor) else np.asarray(images, np.float32)
        if array.ndim == 4 and array.shape[1] == 1:
            array = array[:, 0]
        if array.ndim != 3:
            raise ConfigError(f"A batch of slices is (b, 1, h, w) or (b, h, w); got shape {array.shape}.")
        hu = MODEL_NORMALIZATION.to_hu(array) if normalized else array
        return np.stack([tissue_map(s, pixel_spacing=pixel_spacing) for s in hu])

    def position_pools(self, tissue: Tensor | np.ndarray, latent_shape: Sequence[int], *,
                       device: torch.device | str = "cpu") -> list[Any]:
        """Per pyramid layer, the :class:`~napari_langmamba.models.quantizer.PositionPools` of
        tissue maps (b, h, w) whose LangAE latent is ``latent_shape`` (h', w')."""
        from napari_langmamba.anatomy import majority_region_classes, region_class_sets
        from napari_langmamba.models.quantizer import PositionPools

        maps = tissue.cpu().numpy() if isinstance(tissue, Tensor) else np.asarray(tissue)
        table = self.pool_ids.to(device)
        shape = (int(latent_shape[0]), int(latent_shape[1]))
        sets = region_class_sets(maps, shape, min_share=self.min_share)
        groups = majority_region_classes(maps, shape) if self.balance_by == "class" else [None] * len(sets)
        return [PositionPools(table, torch.as_tensor(bits.astype(np.int64), device=device),
                              torch.as_tensor(group, device=device) if group is not None else None)
                for bits, group in zip(sets, groups, strict=True)]


# ----------------------------------------------------------------------------------------------
# CLIP scorer


class ClipScorer:
    """CLIP image-text similarity of a slice against ``prompt.format(token)`` for every token.

    Parameters
    ----------
    folder
        Local CLIP folder (``save_pretrained``): ``*.safetensors`` weights and tokenizer files.
    words
        The vocabulary to score (the codebook's words, in id order).
    """

    def __init__(self, folder: str | Path, words: Sequence[str], *, prompt: str = DEFAULT_PROMPT,
                 device: torch.device | str = "cpu", batch_size: int = 256) -> None:
        from transformers import AutoTokenizer, CLIPModel

        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise ConfigError(
                f"--scorer clip:{folder}: the folder does not exist. Give a local CLIP folder written by "
                "save_pretrained (PubMedCLIP or any CLIP); nothing is downloaded. Offline, use --scorer lexicon."
            )
        if not any(folder.glob("*.safetensors")):
            raise CheckpointError(
                f"{folder} holds no *.safetensors weights; re-save the CLIP model with save_pretrained "
                "(pickled pytorch_model.bin files are not read)."
            )
        try:
            self.model = CLIPModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, TypeError) as exc:
            raise CheckpointError(f"Could not load the CLIP model and tokenizer from {folder}: {exc}") from exc
        self.device = torch.device(device)
        self.model.eval().to(self.device)
        self.prompt = prompt
        self.words = list(words)
        self.batch_size = int(batch_size)
        self.image_size = int(self.model.config.vision_config.image_size)
        self._text: Tensor | None = None

    @staticmethod
    def _features(output: Any) -> Tensor:
        # transformers < 5 returns the projected tensor, 5.x a ModelOutput with it as pooler_output
        return output if isinstance(output, Tensor) else output.pooler_output

    @torch.no_grad()
    def text_features(self) -> Tensor:
        """(n, e) unit text embeddings of the prompts of the whole vocabulary (computed once)."""
        if self._text is None:
            from tqdm.auto import tqdm

            max_len = int(self.model.config.text_config.max_position_embeddings)
            chunks = []
            starts = range(0, len(self.words), self.batch_size)
            for start in tqdm(starts, desc="CLIP text prompts", unit="batch", disable=None):
                prompts = [self.prompt.format(w) for w in self.words[start:start + self.batch_size]]
                enc = self.tokenizer(prompts, padding=True, truncation=True, max_length=max_len,
                                     return_tensors="pt")
                out = self.model.get_text_features(input_ids=enc["input_ids"].to(self.device),
                                                   attention_mask=enc["attention_mask"].to(self.device))
                chunks.append(F.normalize(self._features(out).float(), dim=-1).cpu())
            self._text = torch.cat(chunks)
        return self._text

    def pixel_values(self, image01: np.ndarray) -> Tensor:
        """A windowed slice in [0, 1] (h, w) -> (1, 3, s, s) CLIP input."""
        x = torch.as_tensor(np.asarray(image01, dtype=np.float32))[None, None]  # (1, 1, h, w)
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False,
                          antialias=True).clamp(0.0, 1.0)
        x = x.expand(1, 3, -1, -1)
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def scores(self, image01: np.ndarray) -> Tensor:
        """Min-max normalised (n,) similarities of one windowed slice to every prompt."""
        text = self.text_features()
        out = self.model.get_image_features(pixel_values=self.pixel_values(image01).to(self.device))
        image = F.normalize(self._features(out).float(), dim=-1).cpu()[0]  # (e,)
        return minmax(text @ image)


# ----------------------------------------------------------------------------------------------
# the pools file


@dataclass
class CandidatePools:
    """Candidate pools of a training set, as read from a pools file (see the module docstring)."""

    pool_sets: list[list[list[int]]]
    images: dict[str, int]
    codebook: dict
    meta: dict

    def layer_masks(self, image_ids: Sequence[str], n_tokens: int, *, device: torch.device | str = "cpu"
                    ) -> list[Tensor]:
        """Three bool masks (b, n_tokens): the pools of each image (all False for unknown ids)."""
        masks = [torch.zeros(len(image_ids), n_tokens, dtype=torch.bool) for _ in range(3)]
        for row, image_id in enumerate(image_ids):
            index = self.images.get(str(image_id))
            if index is None:
                continue
            for layer, ids in enumerate(self.pool_sets[index]):
                if ids:
                    masks[layer][row, torch.as_tensor(ids, dtype=torch.long)] = True
        return [m.to(device) for m in masks]

    def coverage(self, image_ids: Iterable[str]) -> tuple[int, int]:
        """(ids with pools, all ids)."""
        ids = [str(i) for i in image_ids]
        return sum(i in self.images for i in ids), len(ids)


def load_candidate_pools(path: str | Path, *, codebook: Any | None = None) -> CandidatePools:
    """Read and validate a pools file; with ``codebook``, check it was made for that codebook."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"--candidates {path}: file not found (make it with `python -m training candidates`).") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--candidates {path} is not a readable JSON file ({exc}).") from exc
    if not isinstance(doc, dict) or doc.get("format") != POOLS_FORMAT:
        raise ConfigError(f"--candidates {path} is not a candidate-pools file of `python -m training candidates`.")
    if doc.get("version") != POOLS_VERSION:
        raise ConfigError(f"--candidates {path} has version {doc.get('version')!r}; this version reads {POOLS_VERSION}.")
    info = doc.get("codebook") or {}
    n = int(info.get("n", 0))
    pool_sets = doc.get("pool_sets")
    images = doc.get("images")
    if not isinstance(pool_sets, list) or not isinstance(images, dict):
        raise ConfigError(f"--candidates {path} lacks 'pool_sets' or 'images'.")
    for k, triple in enumerate(pool_sets):
        if (not isinstance(triple, list) or len(triple) != 3
                or not all(isinstance(ids, list) and all(isinstance(i, int) and 0 <= i < n for i in ids)
                           for ids in triple)):
            raise ConfigError(f"--candidates {path}: pool set {k} is not three lists of token ids in [0, {n}).")
    for image_id, index in images.items():
        if not isinstance(index, int) or not 0 <= index < len(pool_sets):
            raise ConfigError(f"--candidates {path}: image {image_id!r} points to a missing pool set {index!r}.")
    if codebook is not None and info.get("sha256") != codebook.sha256:
        raise ConfigError(
            f"--candidates {path} was made for the codebook {info.get('source')!r} (sha256 "
            f"{str(info.get('sha256'))[:12]}...), not {codebook.source!r} (sha256 {codebook.sha256[:12]}...); "
            "token ids would name other words. Make the pools again with the same --codebook."
        )
    return CandidatePools(pool_sets=pool_sets, images={str(k): v for k, v in images.items()}, codebook=info,
                          meta={k: v for k, v in doc.items() if k not in ("pool_sets", "images")})


def write_candidate_pools(path: Path, *, per_image: dict[str, list[list[int]]], top_words: dict[str, list[str]],
                          codebook: Any, scorer: str, thresholds: Sequence[float], window: str, prompt: str,
                          extra: dict[str, Any]) -> dict:
    """Write the pools file (distinct pool triples stored once) atomically; return its summary."""
    from training.runs import atomic_write_text

    sets: list[list[list[int]]] = []
    index_of: dict[str, int] = {}
    images: dict[str, int] = {}
    tops: dict[str, list[str]] = {}
    for image_id, triple in per_image.items():
        key = json.dumps(triple)
        if key not in index_of:
            index_of[key] = len(sets)
            sets.append(triple)
            tops[str(index_of[key])] = top_words[image_id]
        images[image_id] = index_of[key]
    doc = {
        "format": POOLS_FORMAT,
        "version": POOLS_VERSION,
        "scorer": scorer,
        "prompt": prompt,
        "window": window,
        "thresholds": [float(t) for t in thresholds],
        "codebook": codebook.info(),
        **extra,
        "pool_sets": sets,
        "images": images,
        "top_words": tops,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(doc) + "\n")
    sizes = np.array([[len(p) for p in triple] for triple in sets]) if sets else np.zeros((0, 3))
    return {"images": len(images), "distinct_pool_sets": len(sets),
            "mean_pool_sizes": sizes.mean(0).round(1).tolist() if len(sets) else [0, 0, 0]}


# ----------------------------------------------------------------------------------------------
# the stage


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the options of the ``candidates`` stage."""
    parser.description = (
        "Stage 0: candidate token pools C_1..C_3 per training image for the pyramid semantic loss of "
        "stage 1. Scorer 'clip:<dir>' (the paper's prior: CLIP image-text similarity against "
        "'A CT of <token>') needs a local CLIP folder; scorer 'lexicon' works offline but is a weaker, "
        "text-only prior (anatomy lexicon + DICOM description fields, no pixels): images with the same "
        "description get identical pools."
    )
    add_config_argument(parser)
    add_option(parser, "--data", type=Path, nargs="+", metavar="PATH",
               help="normal-dose training CT, exactly as given to stage 1 (the pools are keyed by its slice ids): "
                    "DICOM folders or files, NIfTI, .npy, Mayo 2D roots or simulate folders (required)")
    add_option(parser, "--npy-layout", choices=("hu", "mayo"),
               help="values stored in plain .npy files: HU or Mayo's HU+1024 (default hu)")
    add_option(parser, "--slice-step", type=int, metavar="N", help="use every N-th slice of volumes (default 1)")
    add_option(parser, "--output", type=Path, metavar="FILE",
               help="the pools JSON file to write (required); give it to stage 1 as --candidates")
    add_option(parser, "--codebook", metavar="SPEC",
               help="codebook whose vocabulary is scored: minilm, clip:<dir> or random:<n>x<d>; must be the "
                    "--codebook of stage 1 (default minilm)")
    add_option(parser, "--scorer", metavar="NAME",
               help="lexicon (offline, text-only) or clip:<local CLIP folder> (default lexicon)")
    add_option(parser, "--thresholds", type=float, nargs=3, metavar=("RHO1", "RHO2", "RHO3"),
               help="min-max-normalised score thresholds of the three pools (default 0.95 0.9 0.8)")
    add_option(parser, "--window", metavar="NAME",
               help="HU window applied before CLIP sees the slice (preset name or LOWER,UPPER) (default abdomen)")
    add_option(parser, "--prompt", metavar="TEXT", help=f"CLIP prompt template (default {DEFAULT_PROMPT!r})")
    add_option(parser, "--lexicon", type=Path, metavar="FILE",
               help="replace the built-in anatomy lexicon by the terms of FILE (one a line) (lexicon scorer)")
    add_option(parser, "--device", metavar="DEV", help="auto, cpu, cuda or cuda:N for CLIP (default auto)")
    add_option(parser, "--batch-size", type=int, metavar="N", help="CLIP text prompts per batch (default 256)")
    add_option(parser, "--overwrite", action="store_true", help="replace an existing --output file")


def _read_lexicon(path: Path | None) -> tuple[str, ...]:
    if path is None:
        return ANATOMY_LEXICON
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--lexicon {path} cannot be read ({exc}).") from exc
    terms = tuple(t.strip() for t in lines if t.strip() and not t.strip().startswith("#"))
    if not terms:
        raise ConfigError(f"--lexicon {path} holds no terms (one a line, '#' starts a comment).")
    return terms


def main(args: argparse.Namespace) -> int:
    """Run the ``candidates`` stage; returns the exit code."""
    from napari_langmamba.models.codebook import load_codebook
    from napari_langmamba.windowing import get_window
    from training.common import parse_window
    from training.distributed import resolve_device

    options = resolve_options(CandidateOptions, args, stage="candidates")
    if options.output.exists() and not options.overwrite:
        raise ConfigError(f"--output {options.output} exists; pass --overwrite to replace it.")
    codebook = load_codebook(options.codebook)
    window = get_window(parse_window(options.window))
    if options.scorer == "lexicon":
        scorer: LexiconScorer | ClipScorer = LexiconScorer(codebook, lexicon=_read_lexicon(options.lexicon))
        logger.warning("lexicon scorer: a weaker, text-only prior (anatomy lexicon + DICOM descriptions, no "
                       "pixels); images with the same description get identical pools")
    else:
        scorer = ClipScorer(options.scorer.split(":", 1)[1], codebook.words, prompt=options.prompt,
                            device=resolve_device(options.device), batch_size=options.batch_size)
    from tqdm.auto import tqdm

    from training.datasets import NDCTSlices

    source = NDCTSlices(list(options.data), npy_layout=options.npy_layout, slice_step=options.slice_step)
    per_image: dict[str, list[list[int]]] = {}
    top_words: dict[str, list[str]] = {}
    for i in tqdm(range(len(source)), desc="candidate pools", unit="image", disable=None):
        key = source.key(i)
        if isinstance(scorer, ClipScorer):
            scores = scorer.scores(window.apply(source.slice_hu(i)))
        else:
            scores = scorer.scores(slice_metadata(source, i))
        per_image[key] = pools_from_scores(scores, options.thresholds)
        top = torch.topk(scores, k=min(TOP_WORDS, scores.numel())).indices.tolist()
        top_words[key] = codebook.decode(top)
    if not per_image:
        raise ConfigError(f"--data {options.data}: no training images found.")
    extra: dict[str, Any] = {"options": options_to_dict(options)}
    if isinstance(scorer, LexiconScorer):
        extra["lexicon"] = list(scorer.lexicon)
    summary = write_candidate_pools(options.output, per_image=per_image, top_words=top_words, codebook=codebook,
                                    scorer=options.scorer, thresholds=options.thresholds, window=options.window,
                                    prompt=options.prompt, extra=extra)
    logger.info("wrote %s: %d images, %d distinct pool sets, mean pool sizes C1..C3 %s", options.output,
                summary["images"], summary["distinct_pool_sets"], summary["mean_pool_sizes"])
    return 0

