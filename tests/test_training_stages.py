"""The training stages on tiny synthetic data: candidates, langae, seed (runs, checkpoints, resume,
stop signals, the non-finite-loss guard, --help)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_langmamba.checkpoint import build_model, load_checkpoint, save_checkpoint
from training.__main__ import build_parser
from training.__main__ import main as training_main
from training.runs import read_metrics

torch.set_num_threads(1)
REPO_ROOT = Path(__file__).resolve().parents[1]
N_SLICES = 6
SIZE = 64


def _phantom(rng: np.random.Generator) -> np.ndarray:
    """A 64 x 64 body-like slice in HU: air, a soft-tissue ellipse, a few round 'organs'."""
    yy, xx = (np.mgrid[:SIZE, :SIZE] + 0.5) / SIZE - 0.5
    img = np.full((SIZE, SIZE), -1000.0, np.float32)
    body = (xx / 0.45) ** 2 + (yy / 0.38) ** 2 < 1
    img[body] = 40.0
    for _ in range(3):
        cx, cy = rng.uniform(-0.2, 0.2, 2)
        r = rng.uniform(0.05, 0.12)
        img[((xx - cx) ** 2 + (yy - cy) ** 2 < r * r) & body] = rng.choice([60.0, 300.0, -100.0])
    return img


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A Mayo-layout pair folder (HU + 1024) and a folder of the normal-dose slices (HU)."""
    root = tmp_path_factory.mktemp("ct")
    rng = np.random.default_rng(0)
    for sub in ("quarter_1mm", "full_1mm", "ndct"):
        (root / sub).mkdir()
    for i in range(N_SLICES):
        full = _phantom(rng)
        low = full + rng.normal(0.0, 30.0, full.shape).astype(np.float32)
        np.save(root / "full_1mm" / f"train_full_{i:05d}.npy", full + 1024.0)
        np.save(root / "quarter_1mm" / f"train_quarter_{i:05d}.npy", low + 1024.0)
        np.save(root / "ndct" / f"slice_{i:03d}.npy", full)
    return root


@pytest.fixture(scope="module")
def langae_ckpt(tmp_path_factory) -> Path:
    """An (untrained) tiny LangAE checkpoint with a small random codebook."""
    from napari_langmamba.models.codebook import load_codebook
    from napari_langmamba.models.langae import LangAE, LangAEConfig

    torch.manual_seed(0)
    codebook = load_codebook("random:64x16")
    model = LangAE(LangAEConfig.preset("tiny", codebook_dim=16), codebook=codebook)
    path = tmp_path_factory.mktemp("langae") / "ckpt"
    save_checkpoint(path, model, kind="langae")
    return path


def _train(args: list[str]) -> int:
    return training_main([*args, "--no-progress"])


def _losses(run: Path, key: str = "loss") -> dict[int, float]:
    return {r["step"]: r["losses"][key] for r in read_metrics(run) if r["kind"] == "train"}


def _assert_same_tensors(a_dir: Path, b_dir: Path) -> None:
    from safetensors.torch import load_file

    for name in ("model.safetensors", "training_state.safetensors"):
        a, b = load_file(str(a_dir / name)), load_file(str(b_dir / name))
        assert a.keys() == b.keys(), name
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, f"{name}: {different[:5]}"


# ----------------------------------------------------------------------------------------- --help


def _options_dataclass(stage: str):
    from training.candidates import CandidateOptions
    from training.langae import LangAEOptions
    from training.seed import SeedOptions

    return {"candidates": CandidateOptions, "langae": LangAEOptions, "seed": SeedOptions}[stage]


@pytest.mark.parametrize("stage", ["candidates", "langae", "seed"])
def test_help_documents_every_option(stage):
    import dataclasses

    parser = build_parser(stage)
    sub = parser._subparsers._group_actions[0].choices[stage]
    text = sub.format_help()
    flags = {"langda_weight": "--langda-weight"}
    for field in dataclasses.fields(_options_dataclass(stage)):
        flag = flags.get(field.name, "--" + field.name.replace("_", "-"))
        assert flag in text, f"{stage} --help lacks {flag}"
    assert "(default" in text and "--config" in text


# ----------------------------------------------------------------------------------------- stage 0


@pytest.fixture(scope="module")
def pools_minilm(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pools") / "pools.json"
    assert training_main(["candidates", "--data", str(data_dir / "ndct"), "--output", str(out)]) == 0
    return out


def test_candidates_lexicon_pools_hold_the_anatomy_words(pools_minilm, data_dir):
    from napari_langmamba.models.codebook import load_codebook
    from training.candidates import load_candidate_pools

    codebook = load_codebook("words:minilm")  # the candidates stage's default codebook
    doc = json.loads(pools_minilm.read_text())
    assert doc["scorer"] == "lexicon" and doc["thresholds"] == [0.95, 0.9, 0.8]
    assert doc["codebook"]["sha256"] == codebook.sha256
    assert sorted(doc["images"]) == [f"slice_{i:03d}" for i in range(N_SLICES)]
    # no DICOM description in .npy slices: one pool set shared by all images (the documented weakness)
    assert len(doc["pool_sets"]) == 1
    c1, c2, c3 = doc["pool_sets"][0]
    assert set(c1) <= set(c2) <= set(c3) and 0 < len(c1) < len(c3) < codebook.n
    for word in ("liver", "kidney", "stomach", "bone", "vessel"):
        assert codebook.token_id(word) in c1  # a one-token lexicon term has cosine 1 with itself
    assert codebook.token_id("piano") not in c3
    pools = load_candidate_pools(pools_minilm, codebook=codebook)
    masks = pools.layer_masks(["slice_000", "unknown"], codebook.n)
    assert masks[0][0].sum() == len(c1) and not masks[0][1].any()


def test_lexicon_scorer_uses_dicom_descriptions():
    from napari_langmamba.models.codebook import load_codebook
    from training.candidates import LexiconScorer, pools_from_scores

    codebook = load_codebook("minilm")
    scorer = LexiconScorer(codebook)
    plain = scorer.scores({})
    brain = scorer.scores({"SeriesDescription": "HEAD Brain 5mm"})
    assert float(plain.min()) == 0.0 and float(plain.max()) == 1.0
    token = codebook.token_id("brain")
    assert float(brain[token]) == pytest.approx(1.0) and float(plain[token]) < 0.95
    assert token in pools_from_scores(brain)[0] and token not in pools_from_scores(plain)[0]


def _tiny_clip(folder: Path) -> None:
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    folder.mkdir(parents=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in [*letters, *(t + "</w>" for t in letters), "li"]:
        vocab[token] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\nl i\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=224, patch_size=32),
        projection_dim=8,
    )
    CLIPModel(config).save_pretrained(folder)


def test_candidates_clip_scorer_with_a_tiny_local_clip(data_dir, tmp_path):
    from transformers import AutoTokenizer, CLIPModel

    from napari_langmamba.models.codebook import load_codebook
    from napari_langmamba.windowing import get_window
    from training.candidates import ClipScorer, pools_from_scores

    clip = tmp_path / "clip"
    _tiny_clip(clip)
    out = tmp_path / "pools.json"
    assert training_main(["candidates", "--data", str(data_dir / "ndct"), "--output", str(out),
                          "--codebook", f"clip:{clip}", "--scorer", f"clip:{clip}", "--device", "cpu"]) == 0
    doc = json.loads(out.read_text())
    codebook = load_codebook(f"clip:{clip}")
    assert doc["codebook"]["n"] == codebook.n == 75 and len(doc["images"]) == N_SLICES
    # the text side, computed independently: "A CT of <word>" through the CLIP text tower
    scorer = ClipScorer(clip, codebook.words)
    model = CLIPModel.from_pretrained(str(clip))
    tokenizer = AutoTokenizer.from_pretrained(str(clip))
    enc = tokenizer(["A CT of liver"], return_tensors="pt")
    with torch.no_grad():
        out_text = model.get_text_features(**enc)
    ref = out_text if isinstance(out_text, torch.Tensor) else out_text.pooler_output
    ref = torch.nn.functional.normalize(ref, dim=-1)[0]
    scorer.words = ["liver"]
    scorer._text = None
    assert torch.allclose(scorer.text_features()[0], ref, atol=1e-5)
    # the pools of an image are exactly the thresholded, min-max normalised scores
    scorer.words = list(codebook.words)
    scorer._text = None
    slice_hu = np.load(data_dir / "ndct" / "slice_002.npy")
    scores = scorer.scores(get_window("abdomen").apply(slice_hu))
    assert float(scores.min()) == 0.0 and float(scores.max()) == 1.0
    assert doc["pool_sets"][doc["images"]["slice_002"]] == pools_from_scores(scores)
    assert scorer.pixel_values(np.zeros((64, 64))).shape == (1, 3, 224, 224)


# ----------------------------------------------------------------------------------------- stage 1


def _thin_vgg(path: Path) -> None:
    from safetensors.torch import save_file

    from training.perceptual import VGG16_CONV_INDICES

    torch.manual_seed(0)
    tensors, c_in = {}, 3
    for i in VGG16_CONV_INDICES:
        tensors[f"features.{i}.weight"] = torch.randn(4, c_in, 3, 3) * 0.3
        tensors[f"features.{i}.bias"] = torch.zeros(4)
        c_in = 4
    save_file(tensors, str(path))


def test_langae_stage_trains_with_every_loss_term(data_dir, pools_minilm, tmp_path):
    vgg = tmp_path / "vgg.safetensors"
    _thin_vgg(vgg)
    run = tmp_path / "run"
    assert _train(["langae", "--data", str(data_dir / "ndct"), "--output", str(run), "--preset", "tiny",
                   "--codebook", "words:minilm", "--candidates", str(pools_minilm), "--perceptual-weights", str(vgg),
                   "--epochs", "1", "--batch-size", "2", "--patch-size", "64", "--disc-start", "1",
                   "--disc-channels", "8", "--log-every", "1", "--val-fraction", "0.2"]) == 0
    records = read_metrics(run)
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        assert r["stage"] == "langae" and r["lr"] == pytest.approx(4.5e-6 * 2)
        assert r["losses"]["semantic"] > 0 and r["losses"]["perceptual"] > 0 and r["losses"]["recon"] > 0
        assert r["images_per_s"] > 0 and r["eta_s"] >= 0
    assert train[0]["losses"]["gan_d"] == 0 and train[1]["losses"]["gan_d"] > 0  # GAN on from step 1 (0-based)
    assert train[1]["losses"]["gan_weight"] > 0
    epoch = [r for r in records if r["kind"] == "epoch"]
    assert len(epoch) == 1 and np.isfinite(epoch[0]["val"]["psnr"]) and epoch[0]["val"]["n_images"] == 2
    ckpt = load_checkpoint(run / "best")
    assert ckpt.kind == "langae" and ckpt.meta["codebook"]["source"] == "words:minilm"
    assert ckpt.meta["training"]["loss"]["semantic"] and ckpt.meta["training"]["loss"]["perceptual"]
    assert ckpt.meta["training"]["semantic_prior"] == {"scorer": "lexicon", "per": "image", "pool_balance": 0.0,
                                                       "pool_target": "uniform"}
    assert ckpt.meta["training"]["init"] is None and ckpt.meta["training"]["frozen"] == []
    assert ckpt.meta["training"]["data"]["n_slices"] == N_SLICES - 2  # ceil(0.2 * 6) held out
    assert ckpt.meta["metrics"]["validation"]["psnr"] == pytest.approx(epoch[0]["val"]["psnr"])
    model = build_model(ckpt)
    assert model.config.commitment_beta == 0.3 and model.config.codebook_dim == 384
    config = json.loads((run / "config.json").read_text())
    assert config["options"]["alpha"] == 0.3 and config["options"]["preset"] == "tiny"
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"


def test_langae_resume_continues_exactly(data_dir, tmp_path):
    args = ["langae", "--data", str(data_dir / "ndct"), "--preset", "tiny", "--codebook", "random:64x16",
            "--scorer", "none", "--epochs", "2", "--batch-size", "2", "--patch-size", "32", "--disc-start", "1", "--disc-channels", "8",
            "--log-every", "1", "--val-fraction", "0.3"]
    assert _train([*args, "--output", str(tmp_path / "a")]) == 0
    assert _train([*args, "--output", str(tmp_path / "b"), "--stop-at-step", "3"]) == 0
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["status"] == "stopped"
    assert _train([*args, "--output", str(tmp_path / "b"), "--resume"]) == 0
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    assert sorted(_losses(tmp_path / "b")) == [1, 2, 3, 4]
    _assert_same_tensors(tmp_path / "a" / "last", tmp_path / "b" / "last")  # weights, Adam x2, discriminator


@pytest.fixture(scope="module")
def minilm_langae_ckpt(tmp_path_factory) -> Path:
    """An (untrained) tiny LangAE checkpoint on the full MiniLM table."""
    from napari_langmamba.models.codebook import load_codebook
    from napari_langmamba.models.langae import LangAE, LangAEConfig

    torch.manual_seed(1)
    model = LangAE(LangAEConfig.preset("tiny", codebook_dim=384), codebook=load_codebook("minilm"))
    path = tmp_path_factory.mktemp("langae-minilm") / "ckpt"
    save_checkpoint(path, model, kind="langae")
    return path


def test_langae_anatomy_prior_from_init_with_frozen_features(data_dir, minilm_langae_ckpt, tmp_path):
    from safetensors.torch import load_file

    from napari_langmamba.anatomy import class_words

    run = tmp_path / "run"
    # the default prior (anatomy, no --candidates) on the displayable words, from a full-table checkpoint
    assert _train(["langae", "--data", str(data_dir / "ndct"), "--output", str(run), "--preset", "tiny",
                   "--codebook", "words:minilm", "--init", str(minilm_langae_ckpt), "--freeze-features",
                   "--alpha", "0.3", "--epochs", "1", "--batch-size", "2", "--patch-size", "32", "--log-every", "1",
                   "--val-fraction", "0.2", "--gamma", "0", "--pool-balance", "0.5", "--balance-by", "class",
                   "--pool-target", "any"]) == 0
    train = [r for r in read_metrics(run) if r["kind"] == "train"]
    assert len(train) == 2 and all(r["losses"]["semantic"] > 0 for r in train)
    training = load_checkpoint(run / "last").meta["training"]
    prior = training["semantic_prior"]
    assert prior["scorer"] == "anatomy" and prior["per"] == "region" and prior["min_share"] == 0.25
    assert prior["pool_balance"] == 0.5 and prior["balance_by"] == "class" and prior["pool_target"] == "any"
    for flags in (["--balance-by", "class"], ["--balance-by", "class", "--pool-balance", "0.5", "--scorer", "none"]):
        assert _train(["langae", "--data", str(data_dir / "ndct"), "--preset", "tiny",
                       "--output", str(tmp_path / "refused"), *flags]) == 2  # nothing for it to weigh
        assert not (tmp_path / "refused").exists()
    assert prior["class_words"] == class_words() and prior["skipped_words"] == []
    assert training["frozen"] == ["encoder.conv_in", "encoder.down[:-1]"] and training["loss"]["semantic"]
    assert training["init"]["path"] == str(minilm_langae_ckpt) and training["init"]["codebook"] == "minilm"
    assert training["codebook"]["source"] == "words:minilm"
    # SEED's layers kept the initial weights exactly; the rest of the model trained
    before = load_file(str(minilm_langae_ckpt / "model.safetensors"))
    after = load_file(str(run / "last" / "model.safetensors"))
    seed_layers = [k for k in before if k.startswith(("encoder.conv_in.", *(f"encoder.down.{i}." for i in range(4))))]
    assert seed_layers and all(torch.equal(before[k], after[k]) for k in seed_layers)
    others = [k for k in before if k not in seed_layers]
    assert sum(not torch.equal(before[k], after[k]) for k in others) > len(others) // 2


def test_langae_train_part_words_then_decoder(data_dir, minilm_langae_ckpt, tmp_path, capsys):
    from safetensors.torch import load_file

    base = ["langae", "--data", str(data_dir / "ndct"), "--preset", "tiny", "--codebook", "words:minilm",
            "--epochs", "1", "--batch-size", "2", "--patch-size", "32", "--log-every", "1", "--val-fraction", "0.2",
            "--gamma", "0"]
    assert _train([*base, "--output", str(tmp_path / "x"), "--train-part", "words"]) == 2
    assert "--init" in capsys.readouterr().err  # a part is fine-tuned from a trained LangAE
    assert _train([*base, "--output", str(tmp_path / "y"), "--init", str(minilm_langae_ckpt), "--train-part", "words",
                   "--scorer", "none"]) == 2
    assert "semantic loss alone" in capsys.readouterr().err

    # 1. the word head alone, on the semantic and commitment losses
    words = tmp_path / "words"
    assert _train([*base, "--output", str(words), "--init", str(minilm_langae_ckpt), "--train-part", "words",
                   "--alpha", "1", "--lr", "1e-2"]) == 0
    before = load_file(str(minilm_langae_ckpt / "model.safetensors"))
    after = load_file(str(words / "last" / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    head = ("encoder.down.4.", "encoder.mid.", "encoder.norm_out.", "encoder.conv_out.", "quant_conv.")
    assert {"quant_conv.weight", "encoder.conv_out.weight"} <= changed and all(k.startswith(head) for k in changed)
    records = read_metrics(words)
    train = [r for r in records if r["kind"] == "train"]
    for r in train:  # the loss is commitment + alpha * semantic; the decoder does not even run
        assert r["losses"]["loss"] == pytest.approx(r["losses"]["commit"] + r["losses"]["semantic"], rel=1e-5)
        assert "recon" not in r["losses"] and r["losses"]["semantic"] > 0
    val = [r for r in records if r["kind"] == "epoch"][0]["val"]
    assert val["words_dominated"] > 0 and 0 <= val["words_matched"] <= val["words_dominated"]
    assert val["word_agreement"] == pytest.approx(val["words_matched"] / val["words_dominated"])
    training = load_checkpoint(words / "last").meta["training"]
    assert training["train_part"] == "words"
    assert training["frozen"] == ["encoder.conv_in", "encoder.down[:-1]", "post_quant_conv", "decoder"]
    best = json.loads((words / "summary.json").read_text())["best"]
    assert best["key"] == "word_agreement" and best["value"] == pytest.approx(val["word_agreement"])

    # 2. then the decoder side alone, on the reconstruction: the words stay as they are
    decoder = tmp_path / "decoder"
    assert _train([*base, "--output", str(decoder), "--init", str(words / "last"), "--train-part", "decoder",
                   "--lr", "1e-3"]) == 0
    tuned = load_file(str(decoder / "last" / "model.safetensors"))
    changed = {k for k in after if not torch.equal(after[k], tuned[k])}
    assert changed and all(k.startswith(("post_quant_conv.", "decoder.")) for k in changed)
    train = [r for r in read_metrics(decoder) if r["kind"] == "train"]
    assert all(r["losses"]["semantic"] == 0 for r in train)
    training = load_checkpoint(decoder / "last").meta["training"]
    assert training["frozen"] == ["encoder", "quant_conv"] and training["semantic_prior"] == {"scorer": "none"}


def test_langae_region_pixels_start_at_zero_and_train_with_the_word_head(data_dir, minilm_langae_ckpt, tmp_path):
    from safetensors.torch import load_file

    from napari_langmamba.models.codebook import load_codebook
    from napari_langmamba.models.langae import LangAE
    from training.langae import init_from_checkpoint

    # An --init checkpoint without the head gets it at zero: the same latent, so the same words.
    plain = build_model(load_checkpoint(minilm_langae_ckpt))
    codebook = load_codebook("words:minilm")
    config = dataclasses.replace(plain.config, region_pixels=True, codebook_dim=codebook.d)
    extended = LangAE(config, codebook=codebook).eval()
    init_from_checkpoint(extended, minilm_langae_ckpt, codebook)
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(extended.encode(x), plain.encode(x))
        # each latent position sees only its own 16 x 16 pixels
        torch.nn.init.normal_(extended.region_pixels.mlp[-1].weight)
        offset = extended.region_pixels(x)
        y = x.clone()
        y[..., 16:32, 32:48] += 0.05  # the pixels of latent position (1, 2)
        moved = (extended.region_pixels(y) - offset).abs().sum(1)[0]
    assert moved[1, 2] > 0 and torch.count_nonzero(moved) == 1

    run = tmp_path / "words"
    assert _train(["langae", "--data", str(data_dir / "ndct"), "--preset", "tiny", "--codebook", "words:minilm",
                   "--epochs", "1", "--batch-size", "2", "--patch-size", "32", "--val-fraction", "0.2", "--gamma", "0",
                   "--output", str(run), "--init", str(minilm_langae_ckpt), "--train-part", "words", "--alpha", "1",
                   "--lr", "1e-2", "--region-pixels"]) == 0
    before = load_file(str(minilm_langae_ckpt / "model.safetensors"))
    after = load_file(str(run / "last" / "model.safetensors"))
    assert after["region_pixels.mlp.2.weight"].abs().sum() > 0  # trained away from zero
    head = ("encoder.down.4.", "encoder.mid.", "encoder.norm_out.", "encoder.conv_out.", "quant_conv.")
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith(head))
    ckpt = load_checkpoint(run / "last")
    assert ckpt.config["region_pixels"] is True and build_model(ckpt).region_pixels is not None
    assert "region_pixels" not in ckpt.meta["training"]["frozen"]

    # --train-part region: the head alone moves, on the semantic and commitment losses
    region = tmp_path / "region"
    assert _train(["langae", "--data", str(data_dir / "ndct"), "--preset", "tiny", "--codebook", "words:minilm",
                   "--epochs", "1", "--batch-size", "2", "--patch-size", "32", "--val-fraction", "0.2", "--gamma", "0",
                   "--output", str(region), "--init", str(run / "last"), "--train-part", "region", "--alpha", "1",
                   "--lr", "1e-2", "--region-pixels"]) == 0
    again = load_file(str(region / "last" / "model.safetensors"))
    moved_keys = {k for k in after if not torch.equal(after[k], again[k])}
    assert moved_keys and all(k.startswith("region_pixels.") for k in moved_keys)
    assert load_checkpoint(region / "last").meta["training"]["frozen"] == [
        "encoder", "quant_conv", "post_quant_conv", "decoder"]
    records = [r for r in read_metrics(region) if r["kind"] == "train"]
    assert records and all(r["losses"]["loss"] == pytest.approx(r["losses"]["commit"] + r["losses"]["semantic"],
                                                                rel=1e-5) for r in records)
    assert _train(["langae", "--data", str(data_dir / "ndct"), "--preset", "tiny", "--codebook", "words:minilm",
                   "--output", str(tmp_path / "e"), "--init", str(run / "last"), "--train-part", "region"]) == 2
    assert not (tmp_path / "e").exists()  # no head to train without --region-pixels

    # A trained 1 x 1 head widened to see the neighbours (--region-context 3) starts as the same function.
    trained = build_model(ckpt)
    wider = LangAE(dataclasses.replace(trained.config, region_context=3), codebook=codebook).eval()
    init_from_checkpoint(wider, run / "last", codebook)
    assert wider.region_pixels.mlp[0].weight.shape[-2:] == (3, 3)
    with torch.no_grad():
        assert torch.allclose(wider.encode(x), trained.encode(x), atol=1e-5)
        torch.nn.init.normal_(wider.region_pixels.mlp[0].weight, std=0.1)  # as training would spread it
        y = x.clone()
        y[..., 16:32, 32:48] += 0.05  # now its neighbours' offsets move too, and nothing further away
        moved = (wider.region_pixels(y) - wider.region_pixels(x)).abs().sum(1)[0]
    assert moved[1, 2] > 0 and moved[0, 1] > 0 and moved[2, 3] > 0 and moved[3, 0] == 0
    # and a 3 x 3 head given to --region-context 5 becomes the centre of the 5 x 5 kernel
    widest = LangAE(dataclasses.replace(trained.config, region_context=5), codebook=codebook).eval()
    state = wider.state_dict()
    assert widest.region_pixels.adapt_state_dict(state, "region_pixels.") == [
        "region_pixels.mlp.0.weight widened to 5 x 5 around the stored 3 x 3"]
    widest.load_state_dict(state)
    with torch.no_grad():
        assert torch.allclose(widest.region_pixels(y), wider.region_pixels(y), rtol=1e-5, atol=1e-4)
    assert _train(["langae", "--data", str(data_dir / "ndct"), "--preset", "tiny", "--output", str(tmp_path / "c"),
                   "--region-context", "3"]) == 2  # the context of a head that is not there
    assert _train(["langae", "--data", str(data_dir / "ndct"), "--preset", "tiny", "--output", str(tmp_path / "d"),
                   "--region-pixels", "--region-context", "2"]) == 2  # no centre tap
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_langae_init_needs_the_same_language_table_and_architecture(data_dir, langae_ckpt, minilm_langae_ckpt,
                                                                    tmp_path, capsys):
    base = ["langae", "--data", str(data_dir / "ndct"), "--epochs", "1", "--batch-size", "2", "--patch-size", "32"]
    assert _train([*base, "--output", str(tmp_path / "a"), "--preset", "tiny", "--codebook", "words:minilm",
                   "--init", str(langae_ckpt)]) == 2
    assert "random:64x16" in capsys.readouterr().err
    assert _train([*base, "--output", str(tmp_path / "b"), "--preset", "lite", "--codebook", "minilm",
                   "--init", str(minilm_langae_ckpt)]) == 2
    assert "--preset" in capsys.readouterr().err
    assert _train([*base, "--output", str(tmp_path / "c"), "--codebook", "random:64x16", "--preset", "tiny"]) == 2
    assert "--scorer none" in capsys.readouterr().err  # no anatomy words in a random table
    assert training_main(["candidates", "--data", str(data_dir / "ndct"), "--output", str(tmp_path / "p.json"),
                          "--scorer", "anatomy"]) == 2
    assert "while training" in capsys.readouterr().err


def test_tissue_maps_are_cropped_and_turned_with_their_image(data_dir):
    from napari_langmamba.anatomy import tissue_map
    from napari_langmamba.windowing import MODEL_NORMALIZATION
    from training.datasets import NDCTSlices
    from training.langae import TissueNDCTDataset

    source = NDCTSlices([data_dir / "ndct"])
    dataset = TissueNDCTDataset(source, patch_size=32, train=True, repeat=4,
                                generator=torch.Generator().manual_seed(3))
    turns = set()
    for index in range(len(dataset)):
        item = dataset[index]
        full_hu = source.slice_hu(item["index"])
        full_image, full_map = MODEL_NORMALIZATION.to_model(full_hu), tissue_map(full_hu)
        crop = item["image"][0].numpy()
        # find the crop in the 8 flips/rotations of the whole slice, then compare the maps there
        found = []
        for k in range(4):
            for flip in (False, True):
                image, labels = np.rot90(full_image, k), np.rot90(full_map, k)
                if flip:
                    image, labels = image[:, ::-1], labels[:, ::-1]
                for y in range(SIZE - 31):
                    for x in range(SIZE - 31):
                        if np.array_equal(image[y:y + 32, x:x + 32], crop):
                            found.append(labels[y:y + 32, x:x + 32])
                            turns.add((k, flip))
        assert found and any(np.array_equal(item["tissue"].numpy(), labels) for labels in found)
        assert item["tissue"].dtype == torch.uint8 and (item["tissue"] > 0).any()
    assert len(turns) > 1  # the augmentation did turn some crops


# ----------------------------------------------------------------------------------------- stage 2


def test_seed_stage_writes_a_seed_checkpoint_with_its_provenance(data_dir, langae_ckpt, tmp_path):
    from training.common import file_sha256

    run = tmp_path / "run"
    assert _train(["seed", "--data", str(data_dir), "--output", str(run), "--preset", "tiny", "--langae",
                   str(langae_ckpt), "--epochs", "1", "--batch-size", "2", "--patch-size", "32", "--log-every", "1",
                   "--val-fraction", "0.2"]) == 0
    train = [r for r in read_metrics(run) if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    assert {"mse", "langda_feature", "langda_token"} <= set(train[0]["losses"])
    assert train[0]["lr"] == pytest.approx(1e-4)  # cosine from 1e-4 to 1e-6 over the 2 steps
    assert train[1]["lr"] == pytest.approx(1e-6 + (1e-4 - 1e-6) / 2)
    ckpt = load_checkpoint(run / "last")
    assert ckpt.kind == "seed" and set(ckpt.config) == {"encoder", "seed"}
    assert ckpt.config["encoder"]["codebook_dim"] == 16
    training = ckpt.meta["training"]
    assert training["langae"]["sha256"] == file_sha256(langae_ckpt)
    assert training["codebook"]["source"] == "random:64x16" and len(training["codebook"]["sha256"]) == 64
    assert training["data"]["n_slices"] == N_SLICES - 2 and training["data"]["layout"] == "MayoPairs"
    assert training["command_line"].startswith("python -m training seed --data") and training["step"] == 2
    # the recorded command line repeats the run: it parses back to the same options
    import shlex

    from training.config import resolve_options
    from training.seed import SeedOptions

    words = shlex.split(training["command_line"])[3:]
    again = resolve_options(SeedOptions, build_parser("seed").parse_args(words), stage="seed")
    stored = json.loads((run / "config.json").read_text())["options"]
    assert json.loads(json.dumps(__import__("training.config").config.options_to_dict(again))) == \
        {**stored, "progress": True}
    val = ckpt.meta["metrics"]["validation"]
    assert {"psnr", "ssim", "input_psnr", "input_ssim"} <= set(val) and 0 < val["ssim"] <= 1
    model = build_model(ckpt)
    # the frozen encoder is the LangAE's
    langae = build_model(load_checkpoint(langae_ckpt))
    assert torch.equal(model.encoder.conv_in.weight, langae.encoder.conv_in.weight)
    with torch.no_grad():
        assert model(torch.rand(1, 1, 32, 32)).shape == (1, 1, 32, 32)
    assert (run / "best" / "model.safetensors").is_file()


def test_seed_decoder_channels_widen_the_decoder_and_are_refused_when_malformed(data_dir, langae_ckpt, tmp_path,
                                                                                capsys):
    args = ["seed", "--data", str(data_dir), "--preset", "tiny", "--langae", str(langae_ckpt), "--lambda", "0",
            "--epochs", "1", "--batch-size", "2", "--patch-size", "32", "--val-fraction", "0.2"]
    run = tmp_path / "wide"
    assert _train([*args, "--output", str(run), "--decoder-channels", "24", "20", "12", "10"]) == 0
    ckpt = load_checkpoint(run / "last")
    assert ckpt.config["seed"]["decoder_channels"] == [24, 20, 12, 10] and ckpt.config["seed"]["name"] == "custom"
    model = build_model(ckpt)  # the checkpoint alone rebuilds the wider decoder
    assert model.config.decoder_channels == (24, 20, 12, 10)
    with torch.no_grad():
        assert model(torch.rand(1, 1, 32, 32)).shape == (1, 1, 32, 32)
    # a preset-sized model cannot start from it: the message names the option
    assert _train([*args, "--output", str(tmp_path / "narrow"), "--init", str(run / "last")]) == 2
    assert "--decoder-channels" in capsys.readouterr().err
    assert _train([*args, "--output", str(tmp_path / "bad"), "--decoder-channels", "8", "0", "8", "8"]) == 2
    assert "4 positive integers" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_bf16_autocast_on_cpu_only_when_asked_and_native(data_dir, langae_ckpt, tmp_path, monkeypatch, caplog):
    from training import distributed
    from training.distributed import make_amp

    cpu = torch.device("cpu")
    # Without native bf16 (AVX2-only CPUs) bf16 convolutions are ~20x slower: warn, train in float32.
    monkeypatch.setattr(distributed, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level("WARNING", logger="training.distributed"):
        assert make_amp("bf16", cpu).dtype is None and make_amp("bf16", cpu).name == "off"
    assert "no native bfloat16" in caplog.text
    monkeypatch.setattr(distributed, "cpu_has_native_bf16", lambda: True)
    assert make_amp("bf16", cpu).dtype == torch.bfloat16 and make_amp("bf16", cpu).scaler is None
    assert [make_amp(o, cpu).dtype for o in ("auto", "off", "fp16")] == [None, None, None]  # float32
    run = tmp_path / "run"
    assert _train(["seed", "--data", str(data_dir), "--output", str(run), "--preset", "tiny", "--langae",
                   str(langae_ckpt), "--lambda", "0", "--epochs", "1", "--batch-size", "2", "--patch-size", "32",
                   "--log-every", "1", "--val-fraction", "0.2", "--amp", "bf16"]) == 0
    train = [r for r in read_metrics(run) if r["kind"] == "train"]
    assert len(train) == 2 and all(0 < r["losses"]["mse"] < 1 for r in train)
    ckpt = load_checkpoint(run / "last")
    assert ckpt.meta["training"]["amp"] == "bf16"
    model = build_model(ckpt)  # weights stay float32; only the forward pass ran in bf16
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert 0 < ckpt.meta["metrics"]["validation"]["ssim"] <= 1


def test_seed_resume_continues_exactly(data_dir, langae_ckpt, tmp_path):
    # On CPU this runs the numba scan, whose gradients are reproducible to the bit.
    args = ["seed", "--data", str(data_dir), "--preset", "tiny", "--langae", str(langae_ckpt), "--epochs", "1",
            "--batch-size", "2", "--patch-size", "16", "--log-every", "1", "--val-fraction", "0"]
    assert _train([*args, "--output", str(tmp_path / "a")]) == 0
    assert _train([*args, "--output", str(tmp_path / "b"), "--stop-at-step", "1"]) == 0  # mid-epoch
    assert _train([*args, "--output", str(tmp_path / "b"), "--resume"]) == 0
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    assert sorted(_losses(tmp_path / "b")) == [1, 2, 3]  # 6 slices, batch 2
    _assert_same_tensors(tmp_path / "a" / "last", tmp_path / "b" / "last")  # weights, AdamW, cosine schedule
    events = [r["event"] for r in read_metrics(tmp_path / "b") if r["kind"] == "event"]
    assert events.count("resume") == 1 and events[-1] == "end"


def test_seed_init_fine_tunes_a_checkpoint_and_refuses_a_mismatch(data_dir, langae_ckpt, tmp_path, capsys):
    from napari_langmamba.models.codebook import load_codebook
    from napari_langmamba.models.langae import LangAE, LangAEConfig

    base = ["seed", "--data", str(data_dir), "--preset", "tiny", "--epochs", "1", "--batch-size", "2",
            "--patch-size", "32", "--lambda", "0", "--val-fraction", "0.2"]
    assert _train([*base, "--langae", str(langae_ckpt), "--output", str(tmp_path / "a")]) == 0
    first = load_checkpoint(tmp_path / "a" / "last")
    # a learning rate too small to move float32 weights: the fine-tune starts exactly where --init ended
    assert _train([*base, "--langae", str(langae_ckpt), "--output", str(tmp_path / "b"), "--init",
                   str(tmp_path / "a" / "last"), "--lr", "1e-30", "--lr-min", "1e-30"]) == 0
    tuned = load_checkpoint(tmp_path / "b" / "last")
    assert tuned.meta["training"]["init"]["path"] == str(tmp_path / "a" / "last")
    assert tuned.meta["metrics"]["validation"]["psnr"] == pytest.approx(first.meta["metrics"]["validation"]["psnr"])
    changed = [k for k in first.state_dict if not torch.equal(first.state_dict[k], tuned.state_dict[k])]
    assert changed == []
    # another LangAE's encoder, another backbone or another preset are refused before training
    torch.manual_seed(5)
    other = tmp_path / "other-langae"
    save_checkpoint(other, LangAE(LangAEConfig.preset("tiny", codebook_dim=16), codebook=load_codebook("random:64x16")),
                    kind="langae")
    assert _train([*base, "--langae", str(other), "--output", str(tmp_path / "c"), "--init",
                   str(tmp_path / "a" / "last")]) == 2
    assert "another LangAE encoder" in capsys.readouterr().err
    assert _train([*base, "--backbone", "redcnn", "--output", str(tmp_path / "d"), "--init",
                   str(tmp_path / "a" / "last")]) == 2
    assert "'seed' checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "c" / "last").exists() and not (tmp_path / "d" / "last").exists()


def test_redcnn_mse_only_baseline_needs_no_langae(data_dir, tmp_path):
    run = tmp_path / "run"
    assert _train(["seed", "--backbone", "redcnn", "--lambda", "0", "--data", str(data_dir), "--output", str(run),
                   "--preset", "tiny", "--epochs", "1", "--batch-size", "2", "--patch-size", "32",
                   "--val-fraction", "0"]) == 0
    ckpt = load_checkpoint(run / "last")
    assert ckpt.kind == "redcnn" and ckpt.meta["training"]["langae"] is None
    assert set(_losses(run, "mse")) == {3}  # 6 slices / batch 2 = 3 steps, logged at the epoch end
    assert not (run / "best").exists()  # no validation, no best


def test_seed_trains_on_many_patients_and_validates_on_whole_patients(data_dir, tmp_path, capsys):
    # three 'patients' of two slices each (volumes of the phantom pairs), listed in a manifest
    lows = sorted((data_dir / "quarter_1mm").glob("*.npy"))
    fulls = sorted((data_dir / "full_1mm").glob("*.npy"))
    rows = ["low,full,patient,kernel,dose"]
    for p in range(3):
        for name, files in (("low", lows), ("full", fulls)):
            np.save(tmp_path / f"{name}{p}.npy", np.stack([np.load(f) - 1024.0 for f in files[2 * p:2 * p + 2]]))
        rows.append(f"low{p}.npy,full{p}.npy,P{p},K{p % 2},0.25")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    args = ["seed", "--backbone", "redcnn", "--lambda", "0", "--manifest", str(tmp_path / "pairs.csv"),
            "--preset", "tiny", "--epochs", "1", "--batch-size", "2", "--patch-size", "32"]
    assert _train([*args, "--output", str(tmp_path / "slice-split")]) == 2  # several patients: no slice split
    assert "--val-patients" in capsys.readouterr().err
    assert _train([*args, "--output", str(tmp_path / "bad"), "--val-patients", "P7"]) == 2
    assert "No pairs of patient(s) P7" in capsys.readouterr().err

    run = tmp_path / "run"
    assert _train([*args, "--output", str(run), "--val-patients", "P2", "--window-weight", "3", "--log-every", "1"]) == 0
    training = load_checkpoint(run / "last").meta["training"]
    assert training["window_weight"] == 3.0 and training["window"] == "abdomen"
    train = [r for r in read_metrics(run) if r["kind"] == "train"]
    # the loss holds the window term: MSE + 3 x (window span in model units)^2 x MSE in window units
    span = 400.0 / 3000.0
    assert train and all(r["losses"]["window_mse"] > 0 for r in train)
    assert all(abs(r["losses"]["loss"] - r["losses"]["mse"] - 3 * span ** 2 * r["losses"]["window_mse"])
               < 1e-6 * r["losses"]["loss"] for r in train)
    data = training["data"]
    assert data["n_slices"] == 4 and data["n_val_slices"] == 2 and data["val_source"] == "patients P2"
    assert data["train"]["patients"] == {
        "P0": {"n_slices": 2, "kernels": ["K0"], "doses": [0.25], "origins": ["real"]},
        "P1": {"n_slices": 2, "kernels": ["K1"], "doses": [0.25], "origins": ["real"]}}
    assert list(data["validation"]["patients"]) == ["P2"] and data["validation"]["kernels"] == ["K0"]
    assert data["inputs"] == {"manifest": [str(tmp_path / "pairs.csv")]}
    assert set(_losses(run)) == {1, 2}  # 4 training slices / batch 2, logged every step
    (epoch,) = [r for r in read_metrics(run) if r["kind"] == "epoch"]
    assert epoch["val"]["n_images"] == 2  # both P2 slices, and only those

    # the real noise of P0/P1's pairs added to a normal-dose volume: 3 slices x 2 donors each
    np.save(tmp_path / "extra.npy", np.stack([np.load(f) - 1024.0 for f in fulls[:3]]))
    extra = tmp_path / "extra-run"
    assert _train([*args, "--output", str(extra), "--val-patients", "P2", "--transplant-noise-onto",
                   f"PX={tmp_path / 'extra.npy'}"]) == 0
    data = load_checkpoint(extra / "last").meta["training"]["data"]
    assert data["train"]["n_transplanted_slices"] == 6 and data["train"]["n_real_slices"] == 4
    assert data["train"]["patients"]["PX"]["origins"] == ["transplanted"] and "PX" not in data["validation"]["patients"]
    assert data["inputs"]["transplant_noise_onto"] == [f"PX={tmp_path / 'extra.npy'}"]
    assert _train([*args, "--output", str(tmp_path / "no"), "--val-patients", "P2", "--transplant-noise-onto",
                   f"P2={tmp_path / 'extra.npy'}"]) == 2  # a validation patient's scan is never trained on
    assert "validation patient" in capsys.readouterr().err


def test_seed_on_the_mayo_patient_folders(tmp_path):
    pairs_dir = REPO_ROOT.parent / "shared" / "data" / "ct" / "mayo2016_pairs"
    if not pairs_dir.is_dir():
        pytest.skip(f"real CT data not found at {pairs_dir} (../shared/data is absent)")
    run = tmp_path / "run"
    assert _train(["seed", "--backbone", "redcnn", "--lambda", "0", "--pairs", str(pairs_dir), "--val-patients",
                   "L192", "--output", str(run), "--preset", "tiny", "--epochs", "1", "--steps-per-epoch", "1",
                   "--batch-size", "2", "--patch-size", "32", "--val-max-images", "1"]) == 0
    data = load_checkpoint(run / "last").meta["training"]["data"]
    assert sorted(data["train"]["patients"]) == ["L096", "L143", "L286"] and data["n_slices"] == 25
    assert data["validation"]["patients"]["L192"]["n_slices"] == 11 and data["n_val_slices"] == 11
    assert data["train"]["kernels"] == ["B30f", "D45f"] and data["train"]["doses"] == [0.25]


def test_nonfinite_loss_keeps_the_last_good_checkpoint(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    code = _train(["seed", "--backbone", "redcnn", "--lambda", "0", "--data", str(data_dir), "--output", str(run),
                   "--preset", "tiny", "--epochs", "1", "--batch-size", "2", "--patch-size", "32",
                   "--checkpoint-every", "1", "--log-every", "1", "--debug-nan-at-step", "2"])
    assert code == 2
    err = capsys.readouterr().err
    assert "NaN or infinite at step 2" in err and "last good checkpoint is kept" in err
    ckpt = load_checkpoint(run / "last")  # loads: finite weights
    assert ckpt.meta["training"]["step"] == 1
    assert [r["step"] for r in read_metrics(run) if r["kind"] == "train"] == [1]


def test_config_file_sets_options_and_flags_override(data_dir, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("seed:\n  backbone: redcnn\n  langda-weight: 0\n  epochs: 5\n  batch-size: 3\n  patch_size: 32\n"
                   "  val_fraction: 0\n  preset: tiny\n")
    run = tmp_path / "run"
    assert _train(["seed", "--config", str(cfg), "--data", str(data_dir), "--output", str(run), "--epochs", "1"]) == 0
    options = json.loads((run / "config.json").read_text())["options"]
    assert options["epochs"] == 1 and options["batch_size"] == 3 and options["backbone"] == "redcnn"
    assert set(_losses(run)) == {2}  # 6 slices / batch 3


def test_sigterm_finishes_the_step_checkpoints_and_exits_cleanly(data_dir, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "training", "seed", "--backbone", "redcnn", "--lambda", "0", "--data", str(data_dir),
           "--output", str(run), "--preset", "tiny", "--epochs", "1000", "--batch-size", "2", "--patch-size", "32",
           "--val-fraction", "0", "--log-every", "1", "--checkpoint-every", "0", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not any(r["kind"] == "train" for r in read_metrics(run)):
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "no training step within 90 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert "SIGTERM received" in err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "stopped"
    steps = [r["step"] for r in read_metrics(run) if r["kind"] == "train"]
    assert summary["step"] == steps[-1] >= 1
    ckpt = load_checkpoint(run / "last")
    assert ckpt.meta["training"]["step"] == summary["step"]
    # and the run continues from there
    assert _train([*cmd[3:], "--resume", "--stop-at-step", str(summary["step"] + 1)]) == 0
    steps_after = [r["step"] for r in read_metrics(run) if r["kind"] == "train"]
    assert steps_after == [*steps, summary["step"] + 1]


def test_named_step_pieces_compute_the_documented_losses():
    """The stages' step objects alone: SEED's MSE step and the LangAE's semantic prior switch."""
    from types import SimpleNamespace

    from training.langae import SemanticPrior
    from training.seed import DenoiserStep

    torch.manual_seed(0)
    denoised, full = torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8)
    step = DenoiserStep(ddp_model=None, device=torch.device("cpu"), optimizer=None, scheduler=None, amp=None)
    losses = step.losses(denoised, full)
    assert set(losses) == {"loss", "mse"}
    assert float(losses["loss"]) == pytest.approx(float(((denoised - full) ** 2).mean()), rel=1e-6)
    # a LangDA loss object's parts are reported under their own names
    step.langda = lambda d, f: (torch.tensor(3.0), {"mse": torch.tensor(1.0), "feature": torch.tensor(0.5),
                                                    "token": torch.tensor(1.5)})
    assert {k: float(v) for k, v in step.losses(denoised, full).items()} == \
        {"loss": 3.0, "mse": 1.0, "langda_feature": 0.5, "langda_token": 1.5}
    # no pools and no anatomy scorer: the semantic loss is off whatever alpha says
    prior = SemanticPrior(n_words=64, alpha=50.0)
    assert not prior.on and prior.info() == {"scorer": "none"}
    assert prior.layer_pools({"key": ["a"]}, torch.zeros(1, 1, 16, 16), SimpleNamespace(layer_embeddings=[])) is None
    planted = SimpleNamespace(meta={"scorer": "lexicon"}, layer_masks=lambda keys, n, device: ("masks", keys, n))
    prior = SemanticPrior(n_words=64, pools=planted, alpha=0.3)
    assert prior.on and prior.info() == {"scorer": "lexicon", "per": "image", "pool_balance": 0.0,
                                         "pool_target": "uniform"}
    assert prior.layer_pools({"key": ["a", "b"]}, torch.zeros(2, 1, 16, 16), None) == ("masks", ["a", "b"], 64)
    assert SemanticPrior(n_words=64, pools=planted, alpha=0.0).layer_pools({"key": ["a"]}, torch.zeros(1), None) \
        is None


def test_bundle_keeps_a_bundled_seed_beside_a_langae_with_its_encoder_unchanged(data_dir, langae_ckpt, tmp_path,
                                                                                capsys):
    import importlib.util

    from safetensors.torch import load_file

    spec = importlib.util.spec_from_file_location("bundle_weights", REPO_ROOT / "scripts" / "bundle_weights.py")
    bundle = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bundle)
    common = ["--epochs", "1", "--batch-size", "2", "--patch-size", "32", "--val-fraction", "0.2"]
    assert _train(["seed", "--data", str(data_dir), "--output", str(tmp_path / "seed"), "--preset", "tiny",
                   "--langae", str(langae_ckpt), *common]) == 0
    langae = ["langae", "--data", str(data_dir / "ndct"), "--preset", "tiny", "--codebook", "random:64x16",
              "--init", str(langae_ckpt), "--gamma", "0", "--lr", "1e-3", *common]
    assert _train([*langae, "--output", str(tmp_path / "decoder"), "--train-part", "decoder"]) == 0
    assert _train([*langae, "--output", str(tmp_path / "all"), "--scorer", "none"]) == 0  # the encoder trains too
    first = tmp_path / "bundle1"
    assert bundle.main(["--seed-run", str(tmp_path / "seed"), "--langae-run", str(tmp_path / "all"),
                        "--out", str(first)]) == 0
    # a new LangAE whose SEED layers are unchanged goes beside the bundled SEED, kept bit for bit
    second = tmp_path / "bundle2"
    assert bundle.main(["--seed-bundle", str(first), "--langae-run", str(tmp_path / "decoder"),
                        "--langae-init-run", str(first / "langae"), "--out", str(second)]) == 0
    assert load_file(str(second / "model.safetensors")).keys() == load_file(str(first / "model.safetensors")).keys()
    assert all(torch.equal(a, load_file(str(second / "model.safetensors"))[k])
               for k, a in load_file(str(first / "model.safetensors")).items())
    record = json.loads((second / "langae" / "config.json").read_text())["training"]
    assert record["train_part"] == "decoder" and record["validation"]["best_key"] == "psnr"
    assert record["init_runs"][0]["bundled_from"] == str(first / "langae")
    assert json.loads((second / "config.json").read_text())["training"]["seed"] == \
        json.loads((first / "config.json").read_text())["training"]["seed"]
    # a LangAE whose encoder changed is refused: the SEED would no longer match it
    assert bundle.main(["--seed-bundle", str(first), "--langae-run", str(tmp_path / "all"), "--out",
                        str(tmp_path / "bundle3")]) == 2
    assert "retrain the SEED" in capsys.readouterr().err
    # a new SEED beside the bundled LangAE, kept with its record as it is
    third = tmp_path / "bundle4"
    assert _train(["seed", "--data", str(data_dir), "--output", str(tmp_path / "seed2"), "--preset", "tiny",
                   "--langae", str(first / "langae"), *common]) == 0
    assert bundle.main(["--seed-run", str(tmp_path / "seed2"), "--langae-bundle", str(first / "langae"),
                        "--out", str(third)]) == 0
    assert all(torch.equal(a, load_file(str(third / "langae" / "model.safetensors"))[k])
               for k, a in load_file(str(first / "langae" / "model.safetensors")).items())
    assert json.loads((third / "langae" / "config.json").read_text())["training"] == \
        json.loads((first / "langae" / "config.json").read_text())["training"]
    assert json.loads((third / "config.json").read_text())["training"]["seed"]["run"] == str(tmp_path / "seed2")
    # a SEED trained on another encoder is refused beside it
    assert bundle.main(["--seed-run", str(tmp_path / "seed"), "--langae-bundle", str(first / "langae"),
                        "--out", str(tmp_path / "bundle5")]) == 2
    assert "another encoder" in capsys.readouterr().err
    # the sharp-kernel bundle: the run's last checkpoint, no LangAE of its own, its own provenance
    sharp = tmp_path / "sharp"
    assert bundle.main(["--sharp", "--seed-run", str(tmp_path / "seed2"), "--langae-bundle", str(first / "langae"),
                        "--out", str(sharp)]) == 0
    assert not (sharp / "langae").exists()
    sharp_weights = load_file(str(sharp / "model.safetensors"))
    last_weights = load_file(str(tmp_path / "seed2" / "last" / "model.safetensors"))
    assert sharp_weights.keys() == last_weights.keys()
    assert all(torch.equal(a.to(sharp_weights[k].dtype), sharp_weights[k]) for k, a in last_weights.items())
    sharp_meta = json.loads((sharp / "config.json").read_text())
    assert "B70f" in sharp_meta["extra"]["provenance"] and sharp_meta["training"]["seed"]["run"] == str(tmp_path / "seed2")
    assert bundle.main(["--sharp", "--seed-run", str(tmp_path / "seed2"), "--langae-run", str(tmp_path / "all"),
                        "--out", str(tmp_path / "sharp2")]) == 2
    assert "--langae-bundle" in capsys.readouterr().err


def test_cnn_region_head_sees_about_127_pixels_and_replaces_an_mlp_head_at_zero(minilm_langae_ckpt, tmp_path):
    from napari_langmamba.models.codebook import load_codebook
    from napari_langmamba.models.langae import LangAE, RegionCNN
    from training.langae import init_from_checkpoint

    codebook = load_codebook("minilm")
    base = build_model(load_checkpoint(minilm_langae_ckpt)).eval()
    cnn = LangAE(dataclasses.replace(base.config, region_pixels=True, region_head="cnn"), codebook=codebook).eval()
    assert isinstance(cnn.region_pixels, RegionCNN)
    assert init_from_checkpoint(cnn, minilm_langae_ckpt, codebook)["path"] == str(minilm_langae_ckpt)
    x = torch.rand(1, 1, 256, 256)
    with torch.no_grad():
        assert torch.equal(cnn.encode(x), base.encode(x))  # an untrained head adds nothing
        torch.nn.init.normal_(cnn.region_pixels.offset.weight, std=0.1)
        y = x.clone()
        y[..., 128, 128] += 0.2
        moved = (cnn.region_pixels(y) - cnn.region_pixels(x)).abs().sum(1)[0]
    assert moved.shape == (16, 16)
    # a position (16 x 16 pixels from 16 j) sees pixels 16 j - 63 ... 16 j + 78: 127 + 15 wide
    assert moved[8, 8] > 0 and moved[8, 11] > 0 and moved[5, 8] > 0 and moved[11, 5] > 0
    assert moved[8, 12] == 0 and moved[4, 8] == 0 and moved[0, 0] == 0  # farther: beyond it
    assert cnn.region_pixels.tissue_logits(x).shape == (1, 7, 16, 16)

    # an MLP head stored in a checkpoint is dropped for the CNN head, at zero
    mlp = LangAE(dataclasses.replace(base.config, region_pixels=True), codebook=codebook)
    torch.nn.init.normal_(mlp.region_pixels.mlp[-1].weight, std=0.1)
    mlp_ckpt = tmp_path / "mlp"
    save_checkpoint(mlp_ckpt, mlp, kind="langae")
    state = mlp.state_dict()
    fresh = LangAE(cnn.config, codebook=codebook).eval()
    assert fresh.region_pixels.adapt_state_dict(state, "region_pixels.") == ["region_pixels.* replaced by a CNN head at zero"]
    init_from_checkpoint(fresh, mlp_ckpt, codebook)
    mlp.eval()
    with torch.no_grad():
        assert torch.allclose(fresh.encode(x), mlp.quant_conv(mlp.encoder(x)[0]))


def test_wide_view_and_tissue_words_start_as_the_narrow_head_and_follow_the_head(minilm_langae_ckpt, tmp_path):
    from napari_langmamba.anatomy import BONE, FAT, TISSUE_CLASSES
    from napari_langmamba.errors import ConfigError
    from napari_langmamba.models.codebook import load_codebook
    from napari_langmamba.models.langae import LangAE, LangAEConfig
    from napari_langmamba.tokens import load_token_model, token_pyramid
    from training.langae import init_from_checkpoint

    codebook = load_codebook("minilm")
    base = build_model(load_checkpoint(minilm_langae_ckpt)).eval()
    narrow = LangAE(dataclasses.replace(base.config, region_pixels=True, region_head="cnn"), codebook=codebook).eval()
    init_from_checkpoint(narrow, minilm_langae_ckpt, codebook)
    torch.manual_seed(4)
    for p in narrow.region_pixels.parameters():  # a trained head
        torch.nn.init.normal_(p, std=0.1)
    narrow_ckpt = tmp_path / "narrow"
    save_checkpoint(narrow_ckpt, narrow, kind="langae")

    # the wide view joins a stored CNN head at zero: the same function until trained
    wide_config = dataclasses.replace(narrow.config, region_wide=True)
    wide = LangAE(wide_config, codebook=codebook).eval()
    state = dict(narrow.state_dict())
    assert wide.region_pixels.adapt_state_dict(state, "region_pixels.") == ["region_pixels.wide.* added at zero (the wide view)"]
    init_from_checkpoint(wide, narrow_ckpt, codebook)
    x = torch.rand(1, 1, 256, 256)
    with torch.no_grad():
        assert torch.equal(wide.encode(x), narrow.encode(x))
        for conv in wide.region_pixels.wide:
            torch.nn.init.normal_(conv.weight, std=0.1)
        y = x.clone()
        y[..., 128, 128] += 0.2
        moved = (wide.region_pixels.tissue_logits(y) - wide.region_pixels.tissue_logits(x)).abs().sum(1)[0]
        moved_narrow = (narrow.region_pixels.tissue_logits(y) - narrow.region_pixels.tissue_logits(x)).abs().sum(1)[0]
    assert moved_narrow[8, 12] == 0 and moved_narrow[8, 1] == 0  # beyond the narrow head's 127 pixels
    assert moved[8, 12] > 0 and moved[8, 1] > 0 and moved[0, 15] > 0  # the wide head sees across the slice

    # word_choice "tissue": every word is one of the generic words of the class the head predicts
    chooser = LangAE(dataclasses.replace(narrow.config, word_choice="tissue"), codebook=codebook).eval()
    chooser.load_state_dict(narrow.state_dict())
    hu = np.full((256, 256), 40.0, dtype=np.float32)
    hu[64:192, 64:192] = 400.0
    for planted in (BONE, FAT):
        with torch.no_grad():
            chooser.region_pixels.tissue.weight.zero_()
            chooser.region_pixels.tissue.bias.copy_(torch.nn.functional.one_hot(torch.tensor(planted), 7).float() * 10)
        words = set(TISSUE_CLASSES[planted].generic)
        pyramid = token_pyramid(chooser, hu, cache=False)
        assert all(set(pyramid.words(layer)) <= words for layer in (1, 2, 3))
    free = token_pyramid(narrow, hu, cache=False)  # the same latent, the whole vocabulary
    assert not set(free.words(3)) <= words
    save_checkpoint(tmp_path / "chooser", chooser, kind="langae")
    loaded = load_token_model(tmp_path / "chooser")
    assert loaded.config.word_choice == "tissue" and token_pyramid(loaded, hu, cache=False).words(3) == pyramid.words(3)
    with pytest.raises(ConfigError, match="needs the image"):
        chooser.quantize(chooser.encode(torch.rand(1, 1, 64, 64)))

    # both need the CNN head; configs without the fields load as before
    for bad in ({"region_wide": True}, {"word_choice": "tissue"}, {"word_choice": "closest"}):
        with pytest.raises(ConfigError):
            dataclasses.replace(base.config, **bad)
    old = {k: v for k, v in narrow.config.to_dict().items() if k not in ("region_wide", "word_choice")}
    assert LangAEConfig.from_dict(old) == narrow.config


def test_langae_tissue_steps_train_the_cnn_head_before_its_words(data_dir, minilm_langae_ckpt, tmp_path):
    from safetensors.torch import load_file

    run = tmp_path / "cnn"
    args = ["langae", "--data", str(data_dir / "ndct"), "--preset", "tiny", "--codebook", "words:minilm",
            "--batch-size", "2", "--patch-size", "64", "--val-fraction", "0.2", "--gamma", "0", "--alpha", "1",
            "--init", str(minilm_langae_ckpt), "--train-part", "region", "--region-pixels", "--region-head", "cnn",
            "--lr", "1e-2"]
    assert _train([*args, "--output", str(run), "--epochs", "1", "--tissue-steps", "60"]) == 0
    record = json.loads((run / "tissue_pretrain.json").read_text())
    curve = record["loss_every_10"]
    assert record["steps"] == 60 and len(curve) == 6 and curve[-1] < 0.5 * curve[0]  # it learned the phantoms' tissues
    per_class = record["validation"]["per_class"]
    assert per_class["outside air"][1] > 0 and per_class["soft tissue"][1] > 0  # the held-out phantom slice
    assert record["validation"]["accuracy"] >= 0.75
    ckpt = load_checkpoint(run / "last")
    assert ckpt.config["region_head"] == "cnn" and ckpt.meta["training"]["tissue_pretrain"] == record
    after = load_file(str(run / "last" / "model.safetensors"))
    before = load_file(str(minilm_langae_ckpt / "model.safetensors"))
    assert after["region_pixels.tissue.weight"].abs().sum() > 0 and after["region_pixels.offset.weight"].abs().sum() > 0
    assert all(torch.equal(before[k], after[k]) for k in before)  # the rest is the --init LangAE's

    # --resume reads the tissue phase back from the run folder instead of training it again
    stamp = (run / "tissue_pretrain.json").stat().st_mtime_ns
    assert _train([*args, "--output", str(run), "--epochs", "2", "--tissue-steps", "60", "--resume"]) == 0
    assert (run / "tissue_pretrain.json").stat().st_mtime_ns == stamp
    assert load_checkpoint(run / "last").meta["training"]["tissue_pretrain"] == record

    # --word-choice tissue: the head's classifier chooses the words, so the word steps train its offset only
    chosen = tmp_path / "chosen"
    assert _train([*args[:args.index("--init")], "--init", str(run / "last"), "--train-part", "region",
                   "--region-pixels", "--region-head", "cnn", "--word-choice", "tissue", "--lr", "1e-2",
                   "--output", str(chosen), "--epochs", "1"]) == 0
    start, trained = (load_file(str(d / "last" / "model.safetensors")) for d in (run, chosen))
    head = [k for k in start if k.startswith("region_pixels.")]
    assert all(torch.equal(start[k], trained[k]) for k in head if not k.startswith("region_pixels.offset."))
    assert not torch.equal(start["region_pixels.offset.weight"], trained["region_pixels.offset.weight"])
    chosen_ckpt = load_checkpoint(chosen / "last")
    assert chosen_ckpt.config["word_choice"] == "tissue"
    assert "region_pixels.tissue" in chosen_ckpt.meta["training"]["frozen"]

    for bad in (["--region-head", "cnn"],  # no --region-pixels
                ["--region-pixels", "--tissue-steps", "5"],  # the MLP head has no tissue classifier
                ["--region-pixels", "--region-head", "cnn", "--region-context", "3"],
                ["--region-pixels", "--region-head", "cnn", "--tissue-steps", "-1"],
                ["--region-pixels", "--region-wide"],  # the wide view and tissue words need the CNN head
                ["--region-pixels", "--word-choice", "tissue"],
                ["--region-pixels", "--region-head", "cnn", "--word-choice", "tissue"]):  # an untrained classifier
        out = tmp_path / "bad"
        assert _train(["langae", "--data", str(data_dir / "ndct"), "--preset", "tiny", "--output", str(out),
                       *bad]) == 2
        assert not out.exists()
