"""The token pyramid of one CT slice: which words of the language model describe each region.

A LangAE quantizes its 32 x 32 latent (for a 512 x 512 slice) into three pyramid layers of
vocabulary tokens (:mod:`napari_langmamba.models.quantizer`): layer 1 at the 2 x 2 positions
``7::16``, layer 2 at the 8 x 8 positions ``3::4``, layer 3 at every latent position. This module
turns that into something a reader can check against the image:

* **Regions.** A layer-``l`` token at latent position ``p`` stands for the block of latent cells
  it samples: along each axis, the ``i``-th position of a layer with stride ``s`` (16, 4, 1)
  owns the cells ``[i * s, (i + 1) * s)``, and the last one also owns the remainder of the axis
  (and a layer with a single position owns the whole axis). On 32 x 32 that is the four
  quadrants (16 x 16 cells) for layer 1, 4 x 4 cells for layer 2 and one cell (16 x 16 pixels)
  for layer 3, so the regions of a layer tile the latent with no gaps or overlaps. One latent
  cell is 16 x 16 pixels of the padded slice; boxes are given in the pixels of the *unpadded*
  slice, ``(y0, x0, y1, x1)`` with ``y1``/``x1`` exclusive, clipped to it.
* **Padding.** The encoder needs sides that are multiples of 16: the slice is padded at the
  bottom and right by reflection (recorded in :attr:`TokenPyramid.padding`); no region is
  made only of padding because the padding is shorter than one latent cell. Padding, the
  normalisation and the reading of values that are not finite (as air, with a warning) are
  :func:`napari_langmamba.session.prepare_slice`'s, the same as the denoiser's.
* **Distances and alternatives.** Layer ``l`` quantizes the *residual* the earlier layers left at
  its positions (``PyramidOutput.layer_embeddings``), choosing the nearest vocabulary row.
  ``distance`` is the Euclidean distance between that residual and the chosen word's
  embedding; ``alternatives`` are the ``top_k`` next-nearest words to the same residual (the
  chosen one excluded), i.e. the words the region nearly got. They are computed against the
  residual, not against the chosen word's embedding, so they describe the image, not the
  vocabulary's geometry.

**Words by area.** :meth:`TokenPyramid.word_areas` lists the distinct words of a layer with the
share of the slice their regions cover (largest first; the shares sum to 1 because the regions
tile the slice) and :meth:`TokenPyramid.word_map` paints a per-pixel label image of the words:
the Tokens widget's legend and colour overlay.

Pixel coordinates follow napari: pixel ``(row, col)`` is centred at data coordinate
``(row, col)`` and spans ``[row - 0.5, row + 0.5)``; :func:`world_to_pixel` maps a world
position through a layer's scale and translate.

Results are cached (LRU) by model and by a hash of the slice's bytes, so returning to a slice,
or showing the same slice in two layers, does not run the encoder again. The LangAE itself is
loaded through :func:`napari_langmamba.session.load_cached` (the weights resolution, device
choice and model cache the denoiser uses).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import itertools
import json
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from napari_langmamba.errors import CheckpointError, ConfigError
from napari_langmamba.events import Progress, run
from napari_langmamba.session import DEFAULT_WEIGHTS_DIR, STRIDE, load_cached, padded_shape, prepare_slice
from napari_langmamba.windowing import MODEL_NORMALIZATION, Normalization

if TYPE_CHECKING:
    import torch

    from napari_langmamba.models.langae import LangAE

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_WEIGHTS_DIR",
    "LAYER_NAMES",
    "Alternative",
    "LayerComparison",
    "PyramidComparison",
    "Region",
    "TokenHit",
    "TokenLayer",
    "TokenPyramid",
    "WordArea",
    "box_corners",
    "clear_cache",
    "compare_pyramids",
    "iter_token_pyramid",
    "latent_blocks",
    "load_token_model",
    "model_normalization",
    "token_pyramid",
    "world_to_pixel",
]

LAYER_NAMES = {1: "coarse", 2: "middle", 3: "fine"}
NUM_LAYERS = 3
LAYER_STRIDES = (16, 4, 1)  # latent cells between the positions of layers 1, 2, 3 (quantizer.py)
FORMAT_NAME = "napari-langmamba.tokens"
FORMAT_VERSION = 1
CACHE_SIZE = 64
CSV_FIELDS = ("layer", "row", "col", "y0", "x0", "y1", "x1", "token_id", "word", "distance", "alternatives")


# --------------------------------------------------------------------------------------
# Result types
# --------------------------------------------------------------------------------------
class Alternative(NamedTuple):
    """A vocabulary word near the residual a region quantized."""

    word: str
    distance: float
    token_id: int


class WordArea(NamedTuple):
    """One distinct word of a pyramid layer and how much of the slice its regions cover."""

    word: str
    n_regions: int
    pixels: int
    share: float
    """Of the slice's pixels, in [0, 1]."""


class TokenHit(NamedTuple):
    """The token of one pyramid layer covering a pixel (what :meth:`TokenPyramid.at` returns)."""

    layer: int
    word: str
    distance: float
    alternatives: tuple[Alternative, ...]


@dataclass(frozen=True)
class Region:
    """One region of one pyramid layer: its box in image pixels and its token."""

    layer: int
    row: int
    col: int
    box: tuple[int, int, int, int]
    """``(y0, x0, y1, x1)`` in pixels of the unpadded slice; ``y1``/``x1`` exclusive."""
    token_id: int
    word: str
    distance: float
    alternatives: tuple[Alternative, ...]


@dataclass(frozen=True, eq=False)
class TokenLayer:
    """The tokens of one pyramid layer on a grid of ``n_rows x n_cols`` regions.

    Region ``(r, c)`` spans pixel rows ``row_edges[r]:row_edges[r + 1]`` and columns
    ``col_edges[c]:col_edges[c + 1]`` of the unpadded slice.
    """

    layer: int
    row_edges: np.ndarray  # (n_rows + 1,) int64, from 0 to the image height
    col_edges: np.ndarray  # (n_cols + 1,) int64, from 0 to the image width
    token_ids: np.ndarray  # (n_rows, n_cols) int64
    distances: np.ndarray  # (n_rows, n_cols) float32, Euclidean
    alternative_ids: np.ndarray  # (n_rows, n_cols, k) int64, nearest first
    alternative_distances: np.ndarray  # (n_rows, n_cols, k) float32

    @property
    def grid_shape(self) -> tuple[int, int]:
        return (len(self.row_edges) - 1, len(self.col_edges) - 1)

    @property
    def n_regions(self) -> int:
        rows, cols = self.grid_shape
        return rows * cols

    def boxes(self) -> np.ndarray:
        """(n_regions, 4) int64 boxes ``(y0, x0, y1, x1)`` in row-major region order."""
        r, c = np.meshgrid(np.arange(self.grid_shape[0]), np.arange(self.grid_shape[1]), indexing="ij")
        r, c = r.ravel(), c.ravel()
        return np.stack(
            [self.row_edges[r], self.col_edges[c], self.row_edges[r + 1], self.col_edges[c + 1]], axis=1
        ).astype(np.int64)

    def cell_at(self, y: int, x: int) -> tuple[int, int] | None:
        """Grid index ``(r, c)`` of the region holding pixel ``(y, x)``, or ``None`` outside."""
        if not (self.row_edges[0] <= y < self.row_edges[-1] and self.col_edges[0] <= x < self.col_edges[-1]):
            return None
        r = int(np.searchsorted(self.row_edges, y, side="right")) - 1
        c = int(np.searchsorted(self.col_edges, x, side="right")) - 1
        return r, c


@dataclass(frozen=True, eq=False)
class TokenPyramid:
    """The three-layer token pyramid of one slice, with its regions in image pixels.

    Build it with :func:`token_pyramid`; read it with :meth:`at`, :meth:`regions`,
    :meth:`words`; save it with :meth:`to_json` / :meth:`to_csv`.
    """

    image_shape: tuple[int, int]
    padding: tuple[tuple[int, int], tuple[int, int]]
    """``((top, bottom), (left, right))`` pixels added before encoding."""
    layers: tuple[TokenLayer, TokenLayer, TokenLayer]
    vocabulary: dict[int, str]
    """Word of every token id that appears (chosen or alternative)."""
    top_k: int
    normalization: Normalization = MODEL_NORMALIZATION
    model_info: dict = field(default_factory=dict)
    """Where the tokens came from: codebook source and SHA-256, LangAE preset."""

    def layer(self, layer: int) -> TokenLayer:
        """The :class:`TokenLayer` of pyramid layer 1, 2 or 3."""
        if layer not in (1, 2, 3):
            raise ConfigError(f"Pyramid layers are 1 (coarse), 2 (middle) and 3 (fine); got {layer!r}.")
        return self.layers[layer - 1]

    def word(self, token_id: int) -> str:
        """The word of a token id that appears in this pyramid."""
        return self.vocabulary[int(token_id)]

    def _alternatives(self, tl: TokenLayer, r: int, c: int) -> tuple[Alternative, ...]:
        return tuple(
            Alternative(self.word(i), float(d), int(i))
            for i, d in zip(tl.alternative_ids[r, c], tl.alternative_distances[r, c], strict=True)
        )

    def _region(self, tl: TokenLayer, r: int, c: int) -> Region:
        box = (int(tl.row_edges[r]), int(tl.col_edges[c]), int(tl.row_edges[r + 1]), int(tl.col_edges[c + 1]))
        token_id = int(tl.token_ids[r, c])
        return Region(
            layer=tl.layer, row=r, col=c, box=box, token_id=token_id, word=self.word(token_id),
            distance=float(tl.distances[r, c]), alternatives=self._alternatives(tl, r, c),
        )

    def regions(self, layer: int) -> list[Region]:
        """Every region of ``layer`` in row-major order."""
        tl = self.layer(layer)
        rows, cols = tl.grid_shape
        return [self._region(tl, r, c) for r in range(rows) for c in range(cols)]

    def words(self, layer: int) -> list[str]:
        """The chosen word of every region of ``layer``, row-major (same order as :meth:`regions`)."""
        return [self.word(i) for i in self.layer(layer).token_ids.ravel()]

    def boxes(self, layer: int) -> np.ndarray:
        """(n_regions, 4) boxes ``(y0, x0, y1, x1)`` of ``layer``, row-major."""
        return self.layer(layer).boxes()

    def word_areas(self, layer: int) -> list[WordArea]:
        """The distinct words of ``layer`` with the share of the slice their regions cover.

        Regions with the same word (even from different token ids) count as one word. Ordered
        by area, largest first (ties by word); the shares sum to 1 because the regions of a layer
        tile the slice.
        """
        tl = self.layer(layer)
        areas = np.outer(np.diff(tl.row_edges), np.diff(tl.col_edges)).ravel()
        pixels: dict[str, int] = {}
        regions: dict[str, int] = {}
        for word, area in zip(self.words(layer), areas.tolist(), strict=True):
            pixels[word] = pixels.get(word, 0) + int(area)
            regions[word] = regions.get(word, 0) + 1
        total = float(areas.sum())
        order = sorted(pixels, key=lambda w: (-pixels[w], w))
        return [WordArea(w, regions[w], pixels[w], pixels[w] / total) for w in order]

    def word_map(self, layer: int, labels: dict[str, int]) -> np.ndarray:
        """(rows, columns) int32 image of the slice: ``labels[word]`` of the region holding each pixel.

        ``labels`` must give a value to every word of ``layer`` (e.g. a colour index per word).
        """
        tl = self.layer(layer)
        try:
            grid = np.array([labels[w] for w in self.words(layer)], dtype=np.int32).reshape(tl.grid_shape)
        except KeyError as exc:
            raise ConfigError(f"No label for the word {exc.args[0]!r} of layer {layer}.") from None
        return np.repeat(np.repeat(grid, np.diff(tl.row_edges), axis=0), np.diff(tl.col_edges), axis=1)

    def contains(self, y: int, x: int) -> bool:
        """Whether pixel ``(y, x)`` lies in the (unpadded) slice."""
        return 0 <= y < self.image_shape[0] and 0 <= x < self.image_shape[1]

    def regions_at(self, y: int, x: int) -> list[Region]:
        """The region of each layer (1, 2, 3) holding pixel ``(y, x)``; empty outside the slice."""
        y, x = int(y), int(x)
        if not self.contains(y, x):
            return []
        out = []
        for tl in self.layers:
            r, c = tl.cell_at(y, x)  # type: ignore[misc]  # inside the slice, so never None
            out.append(self._region(tl, r, c))
        return out

    def at(self, y: int, x: int) -> list[TokenHit]:
        """``(layer, word, distance, alternatives)`` of the three layers covering pixel ``(y, x)``.

        Empty when the pixel is outside the slice.
        """
        return [TokenHit(g.layer, g.word, g.distance, g.alternatives) for g in self.regions_at(y, x)]

    # --- export ---------------------------------------------------------------------
    def to_records(self) -> list[dict[str, Any]]:
        """One plain dict per region (layers 1, 2, 3, row-major): the export format.

        Keys: ``layer, row, col, y0, x0, y1, x1, token_id, word, distance, alternatives``, the
        latter a list of ``{"token_id", "word", "distance"}`` nearest first.
        """
        records = []
        for layer in (1, 2, 3):
            for g in self.regions(layer):
                y0, x0, y1, x1 = g.box
                records.append({
                    "layer": g.layer, "row": g.row, "col": g.col, "y0": y0, "x0": x0, "y1": y1, "x1": x1,
                    "token_id": g.token_id, "word": g.word, "distance": g.distance,
                    "alternatives": [
                        {"token_id": a.token_id, "word": a.word, "distance": a.distance} for a in g.alternatives
                    ],
                })
        return records

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: metadata plus :meth:`to_records` under ``"regions"``."""
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "image_shape": list(self.image_shape),
            "padding": [list(p) for p in self.padding],
            "top_k": self.top_k,
            "normalization": self.normalization.to_dict(),
            "distance": "euclidean, between the residual a layer quantized and the word's embedding",
            "model": dict(self.model_info),
            "regions": self.to_records(),
        }

    def to_json(self, path: str | Path | None = None, *, indent: int | None = 1) -> str:
        """The pyramid as JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    def to_csv(self, path: str | Path | None = None) -> str:
        """One CSV row per region (header :data:`CSV_FIELDS`); ``alternatives`` is a JSON list.

        The CSV holds the regions only (no padding or model metadata: use JSON for those).
        """
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
        writer.writeheader()
        for record in self.to_records():
            row = dict(record)
            row["distance"] = repr(record["distance"])
            row["alternatives"] = json.dumps(record["alternatives"], ensure_ascii=False)
            writer.writerow(row)
        text = buffer.getvalue()
        if path is not None:
            Path(path).write_text(text, encoding="utf-8", newline="")
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenPyramid:
        """Inverse of :meth:`to_dict` (validated)."""
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise ConfigError(
                f"Not a token pyramid export: expected a JSON object with format {FORMAT_NAME!r}; "
                f"got {str(data)[:80]!r}."
            )
        if int(data.get("version", -1)) > FORMAT_VERSION:
            raise ConfigError(
                f"This token export is version {data.get('version')}, newer than this napari-langmamba "
                f"reads ({FORMAT_VERSION}); update the plugin."
            )
        try:
            padding = tuple(tuple(int(v) for v in p) for p in data["padding"])
            image_shape = tuple(int(v) for v in data["image_shape"])
            normalization = Normalization.from_dict(data["normalization"])
            return cls.from_records(
                data["regions"], image_shape=image_shape, padding=padding,  # type: ignore[arg-type]
                normalization=normalization, model_info=dict(data.get("model", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"A token pyramid export is missing or has a malformed field: {exc}.") from exc

    @classmethod
    def from_json(cls, source: str | Path) -> TokenPyramid:
        """Read :meth:`to_json` output from a path or from the JSON text itself."""
        text = _read_text(source, ".json")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"The token export is not valid JSON ({exc}).") from exc
        return cls.from_dict(data)

    @classmethod
    def from_csv(cls, source: str | Path) -> TokenPyramid:
        """Read :meth:`to_csv` output from a path or from the CSV text itself.

        The image shape is the extent of the boxes; padding is assumed to be the bottom/right
        padding :func:`token_pyramid` uses.
        """
        text = _read_text(source, ".csv")
        reader = csv.DictReader(io.StringIO(text))
        missing = set(CSV_FIELDS) - set(reader.fieldnames or ())
        if missing:
            raise ConfigError(f"The token CSV lacks the columns {sorted(missing)}; expected {list(CSV_FIELDS)}.")
        records = []
        try:
            for row in reader:
                record: dict[str, Any] = {k: int(row[k]) for k in ("layer", "row", "col", "y0", "x0", "y1", "x1",
                                                                   "token_id")}
                record["word"] = row["word"]
                record["distance"] = float(row["distance"])
                record["alternatives"] = json.loads(row["alternatives"])
                records.append(record)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"The token CSV has a malformed row ({exc}).") from exc
        return cls.from_records(records)

    @classmethod
    def from_records(
        cls,
        records: Iterable[dict[str, Any]],
        *,
        image_shape: tuple[int, int] | None = None,
        padding: tuple[tuple[int, int], tuple[int, int]] | None = None,
        normalization: Normalization = MODEL_NORMALIZATION,
        model_info: dict | None = None,
    ) -> TokenPyramid:
        """Rebuild a pyramid from :meth:`to_records` output (checked to tile each layer)."""
        by_layer: dict[int, list[dict]] = {1: [], 2: [], 3: []}
        vocabulary: dict[int, str] = {}
        for rec in records:
            layer = int(rec["layer"])
            if layer not in by_layer:
                raise ConfigError(f"A token region has layer {layer}; expected 1, 2 or 3.")
            by_layer[layer].append(rec)
            vocabulary[int(rec["token_id"])] = str(rec["word"])
            for alt in rec["alternatives"]:
                vocabulary[int(alt["token_id"])] = str(alt["word"])
        if image_shape is None:
            ends = [(int(r["y1"]), int(r["x1"])) for r in by_layer[3]] or [(0, 0)]
            image_shape = (max(e[0] for e in ends), max(e[1] for e in ends))
        if padding is None:
            padding = _padding_for(image_shape)
        layers = []
        top_k = None
        for layer in (1, 2, 3):
            tl = _layer_from_records(layer, by_layer[layer], image_shape)
            k = tl.alternative_ids.shape[-1]
            if top_k is not None and k != top_k:
                raise ConfigError(f"Token layers disagree on the number of alternatives ({top_k} vs {k}).")
            top_k = k
            layers.append(tl)
        return cls(
            image_shape=(int(image_shape[0]), int(image_shape[1])),
            padding=(tuple(padding[0]), tuple(padding[1])),  # type: ignore[arg-type]
            layers=tuple(layers),  # type: ignore[arg-type]
            vocabulary=vocabulary, top_k=int(top_k or 0), normalization=normalization,
            model_info=dict(model_info or {}),
        )


def _read_text(source: str | Path, suffix: str) -> str:
    """The export's text: ``source`` itself when it looks like file content, else the file it names."""
    if isinstance(source, str):
        looks_like_text = source.lstrip().startswith("{") if suffix == ".json" else "\n" in source
        if looks_like_text:
            return source
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"No token export at {path}; choose an existing {suffix} file.")
    return path.read_text(encoding="utf-8")


def _layer_from_records(layer: int, records: list[dict], image_shape: tuple[int, int]) -> TokenLayer:
    if not records:
        raise ConfigError(f"The token export has no regions for layer {layer}.")
    rows = max(int(r["row"]) for r in records) + 1
    cols = max(int(r["col"]) for r in records) + 1
    k = len(records[0]["alternatives"])
    row_edges = np.full(rows + 1, -1, dtype=np.int64)
    col_edges = np.full(cols + 1, -1, dtype=np.int64)
    ids = np.full((rows, cols), -1, dtype=np.int64)
    dist = np.zeros((rows, cols), dtype=np.float32)
    alt_ids = np.zeros((rows, cols, k), dtype=np.int64)
    alt_dist = np.zeros((rows, cols, k), dtype=np.float32)
    for rec in records:
        r, c = int(rec["row"]), int(rec["col"])
        if ids[r, c] != -1:
            raise ConfigError(f"The token export lists region ({r}, {c}) of layer {layer} twice.")
        if len(rec["alternatives"]) != k:
            raise ConfigError(f"Layer {layer} regions have different numbers of alternatives.")
        for edges, i, lo, hi in ((row_edges, r, rec["y0"], rec["y1"]), (col_edges, c, rec["x0"], rec["x1"])):
            for j, v in ((i, int(lo)), (i + 1, int(hi))):
                if edges[j] not in (-1, v):
                    raise ConfigError(f"Layer {layer} regions of the token export do not form a grid.")
                edges[j] = v
        ids[r, c] = int(rec["token_id"])
        dist[r, c] = float(rec["distance"])
        alt_ids[r, c] = [int(a["token_id"]) for a in rec["alternatives"]]
        alt_dist[r, c] = [float(a["distance"]) for a in rec["alternatives"]]
    if (ids < 0).any():
        raise ConfigError(f"The token export misses regions of layer {layer} (expected a {rows} x {cols} grid).")
    tiles = (
        row_edges[0] == 0 and col_edges[0] == 0 and row_edges[-1] == image_shape[0]
        and col_edges[-1] == image_shape[1] and (np.diff(row_edges) > 0).all() and (np.diff(col_edges) > 0).all()
    )
    if not tiles:
        raise ConfigError(f"Layer {layer} regions of the token export do not tile a {image_shape} image.")
    return TokenLayer(layer, row_edges, col_edges, ids, dist, alt_ids, alt_dist)


# --------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------
def _padding_for(shape: Sequence[int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """Bottom/right padding up to the next multiple of 16 (what ``session.prepare_slice`` adds)."""
    (ph, pw), (h, w) = padded_shape(shape), (int(shape[0]), int(shape[1]))
    return ((0, ph - h), (0, pw - w))


def latent_blocks(positions: Sequence[int], size: int) -> np.ndarray:
    """Cell edges of the blocks the positions of one layer stand for along one latent axis.

    The ``i``-th of ``k`` evenly spaced positions (stride ``s``) owns latent cells
    ``[i * s, (i + 1) * s)``; the last also owns the rest of the axis; a single position owns
    the whole axis. Returns ``k + 1`` increasing edges from 0 to ``size``.
    """
    p = [int(v) for v in positions]
    if not p or sorted(p) != p or p[0] < 0 or p[-1] >= size:
        raise ConfigError(f"Pyramid positions {p} do not fit a latent axis of {size} cells.")
    if len(p) == 1:
        return np.array([0, size], dtype=np.int64)
    steps = set(np.diff(p).tolist())
    if len(steps) != 1:
        raise ConfigError(f"Pyramid positions {p} are not evenly spaced; cannot assign regions to them.")
    stride = steps.pop()
    edges = np.array([i * stride for i in range(len(p))] + [size], dtype=np.int64)
    if not all(edges[i] <= v < edges[i + 1] for i, v in enumerate(p)):
        raise ConfigError(f"Pyramid positions {p} fall outside the blocks they would stand for.")
    return edges


def _pixel_edges(cell_edges: np.ndarray, pad_before: int, length: int) -> np.ndarray:
    """Latent cell edges -> pixel edges of the unpadded axis (clipped to ``[0, length]``)."""
    edges = np.clip(cell_edges * STRIDE - pad_before, 0, length).astype(np.int64)
    if (np.diff(edges) <= 0).any():  # a block made only of padding: impossible when pad < 16
        raise ConfigError(f"Padding of {pad_before} pixels leaves an empty region; pad by less than 16.")
    return edges


def world_to_pixel(
    position: Sequence[float], *, scale: Sequence[float], translate: Sequence[float]
) -> tuple[int, int]:
    """A napari world position -> ``(row, col)`` pixel of the displayed slice of a layer.

    Uses the last two axes of ``position``, ``scale`` and ``translate`` (a layer without
    rotation, shear or affine): ``data = (world - translate) / scale``, rounded to the nearest
    pixel centre (napari's convention: pixel ``i`` is centred at data coordinate ``i``).
    """
    pos = np.asarray(position, dtype=float)[-2:]
    scale_ = np.asarray(scale, dtype=float)[-2:]
    translate_ = np.asarray(translate, dtype=float)[-2:]
    data = (pos - translate_) / scale_
    row, col = np.floor(data + 0.5).astype(int)
    return int(row), int(col)


def box_corners(box: Sequence[int]) -> np.ndarray:
    """A ``(y0, x0, y1, x1)`` pixel box -> its 4 corners in napari data coordinates.

    The box's outline runs along pixel borders (half a pixel outside the border pixels' centres).
    """
    y0, x0, y1, x1 = (float(v) for v in box)
    top, left, bottom, right = y0 - 0.5, x0 - 0.5, y1 - 0.5, x1 - 0.5
    return np.array([[top, left], [top, right], [bottom, right], [bottom, left]], dtype=float)


# --------------------------------------------------------------------------------------
# Computing the pyramid
# --------------------------------------------------------------------------------------
_CACHE: OrderedDict[tuple, TokenPyramid] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_MODEL_KEYS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_MODEL_COUNTER = itertools.count(1)


def _model_key(model: Any) -> int:
    """A number unique to this model object for as long as it lives (``id`` could be reused)."""
    with _CACHE_LOCK:
        key = _MODEL_KEYS.get(model)
        if key is None:
            key = next(_MODEL_COUNTER)
            _MODEL_KEYS[model] = key
        return key


def clear_cache() -> None:
    """Forget every cached pyramid."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _slice_digest(hu: np.ndarray) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str(hu.shape).encode())
    digest.update(hu.tobytes())
    return digest.hexdigest()


def _model_device(model: Any) -> torch.device:
    import torch

    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _model_info(model: Any) -> dict:
    codebook = getattr(model, "codebook", None)
    config = getattr(model, "config", None)
    info: dict[str, Any] = {}
    if codebook is not None:
        info["codebook_source"] = str(getattr(codebook, "source", ""))
        info["codebook_sha256"] = str(getattr(codebook, "sha256", ""))
        info["vocabulary_size"] = len(getattr(codebook, "words", ()))
    if config is not None:
        info["preset"] = str(getattr(config, "name", "custom"))  # LangAEConfig.name: the preset it came from
    return info


def _decode(model: Any, ids: Iterable[int]) -> dict[int, str]:
    unique = sorted({int(i) for i in ids})
    words = model.codebook.decode(unique)
    return dict(zip(unique, (str(w) for w in words), strict=True))


def model_normalization(model: Any) -> Normalization:
    """The HU scaling a model was trained with: recorded by :func:`load_token_model`, else the default."""
    normalization = getattr(model, "normalization", None)
    return normalization if isinstance(normalization, Normalization) else MODEL_NORMALIZATION


@contextlib.contextmanager
def _evaluating(model: Any) -> Generator[None, None, None]:
    """Eval mode for the duration of a step, then the model's previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def iter_token_pyramid(
    model: LangAE,
    hu_slice: np.ndarray,
    *,
    normalization: Normalization | None = None,
    top_k: int = 5,
    cache: bool = True,
) -> Generator[Progress, None, TokenPyramid]:
    """:func:`token_pyramid` as a generator of :class:`Progress` events returning the pyramid."""
    import torch

    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ConfigError(f"top_k is the number of alternative words per region, an integer >= 0; got {top_k!r}.")
    if normalization is None:
        normalization = model_normalization(model)
    hu, norm, padding = prepare_slice(hu_slice, normalization, stacklevel=3)  # norm: (H, W), multiples of 16
    key = (_model_key(model), _slice_digest(hu), normalization.hu_min, normalization.hu_max, top_k)
    if cache:
        with _CACHE_LOCK:
            hit = _CACHE.get(key)
            if hit is not None:
                _CACHE.move_to_end(key)
        if hit is not None:
            logger.debug("token pyramid cache hit for a %s slice", hu.shape)
            yield Progress(5, 5, "Tokens (cached)")
            return hit

    total = 5
    yield Progress(0, total, "Encoding the slice")
    h, w = hu.shape
    if norm.size < 2 * STRIDE**2:
        # one latent cell leaves the encoder's per-channel GroupNorm a single value
        raise ConfigError(f"A {h} x {w} slice is too small for tokens; it needs at least 17 pixels along one side.")
    device = _model_device(model)
    x = torch.from_numpy(norm).to(device)[None, None]  # (1, 1, H, W)
    # grad mode and train/eval are set per step, never held across a yield: the consumer's code
    # runs between yields (in the same thread) and must not inherit them
    with _evaluating(model), torch.inference_mode():
        z = model.encode(x)  # (1, d, H/16, W/16)
    yield Progress(1, total, "Quantizing")
    with _evaluating(model), torch.inference_mode():
        out = model.quantize(z, x)
    table = model.quantizer.codebook.to(device=device, dtype=torch.float32)  # (n, d)
    k = min(top_k, table.shape[0] - 1)
    layers = []
    for index in range(NUM_LAYERS):
        yield Progress(2 + index, total, f"Nearest words, layer {index + 1}")
        with torch.inference_mode():
            layers.append(_layer_tokens(index + 1, out, index, table, k, tuple(z.shape[-2:]), padding, (h, w)))

    ids = itertools.chain.from_iterable(
        itertools.chain(tl.token_ids.ravel().tolist(), tl.alternative_ids.ravel().tolist()) for tl in layers
    )
    pyramid = TokenPyramid(
        image_shape=(h, w), padding=padding, layers=tuple(layers),  # type: ignore[arg-type]
        vocabulary=_decode(model, ids), top_k=k, normalization=normalization, model_info=_model_info(model),
    )
    if cache:
        with _CACHE_LOCK:
            _CACHE[key] = pyramid
            _CACHE.move_to_end(key)
            while len(_CACHE) > CACHE_SIZE:
                _CACHE.popitem(last=False)
    yield Progress(total, total, "Tokens ready")
    return pyramid


def _layer_tokens(
    layer: int,
    out: Any,
    index: int,
    table: torch.Tensor,
    k: int,
    latent_shape: tuple[int, int],
    padding: tuple[tuple[int, int], tuple[int, int]],
    image_shape: tuple[int, int],
) -> TokenLayer:
    """Ids, distances, alternatives and pixel edges of one layer (batch item 0)."""
    import torch

    rows, cols = out.positions[index]
    row_edges = _pixel_edges(latent_blocks(rows.tolist(), latent_shape[0]), padding[0][0], image_shape[0])
    col_edges = _pixel_edges(latent_blocks(cols.tolist(), latent_shape[1]), padding[1][0], image_shape[1])
    ids = out.ids[index][0].to(torch.long)  # (r, c)
    n_rows, n_cols = ids.shape
    residual = out.layer_embeddings[index][0].to(torch.float32)  # (d, r, c): what this layer quantized
    flat = residual.permute(1, 2, 0).reshape(-1, residual.shape[0])  # (r*c, d)
    chosen = ids.reshape(-1)
    dist = (flat - table[chosen]).norm(dim=1)  # exact, rather than the expanded |x|^2 - 2x.e + |e|^2
    alt_ids = torch.zeros((flat.shape[0], k), dtype=torch.long, device=flat.device)
    if k > 0:
        sq_norms = table.pow(2).sum(1)
        step = max(1, 2**24 // table.shape[0])  # (positions x vocabulary) blocks of <= 64 MB
        for start in range(0, flat.shape[0], step):
            block = flat[start : start + step]
            partial = torch.addmm(sq_norms.unsqueeze(0), block, table.t(), alpha=-2.0)  # (m, n), |x|^2 omitted
            nearest = partial.topk(k + 1, dim=1, largest=False).indices  # (m, k + 1), nearest first
            # drop the chosen token (or, if a tie kept it out of the k + 1, the farthest candidate)
            is_chosen = nearest == chosen[start : start + step, None]
            is_chosen[~is_chosen.any(dim=1), -1] = True
            keep = (~is_chosen).nonzero()[:, 1].reshape(-1, k)  # column order preserved per row
            alt_ids[start : start + step] = nearest.gather(1, keep)
    alt_dist = (flat[:, None, :] - table[alt_ids]).norm(dim=2)  # (r*c, k)
    return TokenLayer(
        layer=layer,
        row_edges=row_edges,
        col_edges=col_edges,
        token_ids=ids.cpu().numpy().astype(np.int64),
        distances=dist.reshape(n_rows, n_cols).cpu().numpy().astype(np.float32),
        alternative_ids=alt_ids.reshape(n_rows, n_cols, k).cpu().numpy().astype(np.int64),
        alternative_distances=alt_dist.reshape(n_rows, n_cols, k).cpu().numpy().astype(np.float32),
    )


def token_pyramid(
    model: LangAE,
    hu_slice: np.ndarray,
    *,
    normalization: Normalization | None = None,
    top_k: int = 5,
    cache: bool = True,
) -> TokenPyramid:
    """The token pyramid of one CT slice in HU under a loaded LangAE.

    Parameters
    ----------
    model
        A :class:`~napari_langmamba.models.langae.LangAE` (its ``codebook`` decodes the words).
    hu_slice
        (rows, columns) array in Hounsfield units, any size (padded to a multiple of 16).
    normalization
        HU -> [0, 1] scaling; by default the one the model's checkpoint records
        (:func:`model_normalization`), i.e. :data:`~napari_langmamba.windowing.MODEL_NORMALIZATION`
        for models not loaded by :func:`load_token_model`.
    top_k
        Alternative words kept per region (nearest first, the chosen word excluded).
    cache
        Reuse (and store) the result for the same model object, slice bytes, normalisation and
        ``top_k``. The cache assumes the model's weights no longer change: call
        :func:`clear_cache` after modifying them in place (e.g. between training steps).

    Returns
    -------
    TokenPyramid
        Per layer the token ids, words, distances, alternatives and region boxes.
    """
    return run(iter_token_pyramid(model, hu_slice, normalization=normalization, top_k=top_k, cache=cache))


# --------------------------------------------------------------------------------------
# Comparing two pyramids
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerComparison:
    """Agreement of one pyramid layer between two slices."""

    layer: int
    n_regions: int
    n_agree: int
    disagreeing_boxes: np.ndarray  # (m, 4) int64 boxes (y0, x0, y1, x1)
    disagreeing_words: tuple[tuple[str, str], ...]  # (word in a, word in b) per disagreeing box

    @property
    def agreement(self) -> float:
        """Share of regions whose token is the same in both, in [0, 1]."""
        return self.n_agree / self.n_regions if self.n_regions else 1.0


@dataclass(frozen=True)
class PyramidComparison:
    """Per-layer agreement between two token pyramids of the same slice geometry."""

    layers: tuple[LayerComparison, LayerComparison, LayerComparison]

    def layer(self, layer: int) -> LayerComparison:
        if layer not in (1, 2, 3):
            raise ConfigError(f"Pyramid layers are 1, 2 and 3; got {layer!r}.")
        return self.layers[layer - 1]

    @property
    def agreement(self) -> dict[int, float]:
        """``{layer: share of agreeing regions}``."""
        return {c.layer: c.agreement for c in self.layers}


def compare_pyramids(a: TokenPyramid, b: TokenPyramid) -> PyramidComparison:
    """Which regions got the same token in ``a`` and ``b`` (e.g. low-dose vs denoised).

    Both must come from slices of the same size and from the same codebook.
    """
    if a.image_shape != b.image_shape:
        raise ConfigError(
            f"Token pyramids can only be compared on slices of the same size; got {a.image_shape} and "
            f"{b.image_shape}. Compare layers of the same series (or resample one first)."
        )
    sha_a, sha_b = a.model_info.get("codebook_sha256"), b.model_info.get("codebook_sha256")
    if sha_a and sha_b and sha_a != sha_b:
        raise ConfigError(
            "These token pyramids come from different codebooks, so their token ids are not comparable; "
            "compute both with the same model."
        )
    out = []
    for la, lb in zip(a.layers, b.layers, strict=True):
        same_grid = np.array_equal(la.row_edges, lb.row_edges) and np.array_equal(la.col_edges, lb.col_edges)
        if not same_grid:
            raise ConfigError(f"Layer {la.layer} regions differ between the two pyramids; cannot compare them.")
        differ = (la.token_ids != lb.token_ids).ravel()
        boxes = la.boxes()[differ]
        words = tuple(
            (a.word(i), b.word(j))
            for i, j in zip(la.token_ids.ravel()[differ], lb.token_ids.ravel()[differ], strict=True)
        )
        out.append(LayerComparison(
            layer=la.layer, n_regions=la.n_regions, n_agree=int((~differ).sum()),
            disagreeing_boxes=boxes, disagreeing_words=words,
        ))
    return PyramidComparison(tuple(out))  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# Loading the LangAE the tokens come from
# --------------------------------------------------------------------------------------
def load_token_model(weights: str | Path = "default", *, device: str = "cpu") -> LangAE:
    """The LangAE whose tokens explain a slice (loaded once, then reused from the model cache).

    Parameters
    ----------
    weights
        ``"default"`` (the bundled ``weights/default/langae`` checkpoint), a LangAE checkpoint
        folder or ``.zip``, or a folder holding a ``langae/`` checkpoint (e.g. a denoiser
        bundle).
    device
        ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``,
        checked as for the denoiser (:func:`napari_langmamba.session.resolve_device`).

    Raises
    ------
    CheckpointError
        When the checkpoint is missing, invalid, or not a LangAE.
    ConfigError
        Unknown or unavailable device.
    """
    return load_cached("langae", weights, device, _build_token_model)


def _build_token_model(path: Path, device: torch.device, weights_sha: str) -> LangAE:
    from napari_langmamba.checkpoint import build_model, load_checkpoint

    checkpoint = load_checkpoint(path)
    if checkpoint.kind != "langae":
        raise CheckpointError(
            f"The checkpoint at {path} is a {checkpoint.kind!r} model; the tokens need a LangAE checkpoint "
            "(a folder whose config.json says kind 'langae', or a folder holding one under 'langae/')."
        )
    model = build_model(checkpoint, device=device).eval()
    # the HU scaling it was trained with; token_pyramid uses it when not told otherwise
    model.normalization = checkpoint.normalization
    logger.info("loaded the token model from %s (SHA-256 %s) on %s", path, weights_sha[:12], device)
    return model
