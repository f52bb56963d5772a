"""Datasets: layouts, pairing, normalisation, paired crops and augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from napari_langmamba.errors import ConfigError
from napari_langmamba.events import run
from napari_langmamba.windowing import MODEL_NORMALIZATION
from training.datasets import (
    DicomPairs,
    MayoDataset,
    MayoPairs,
    NDCTDataset,
    PairedSliceDataset,
    PairSet,
    SimulatedPairDataset,
    SimulatedPairs,
    collect_pairs,
    open_pairs,
    patient_folder_pairs,
    simulated_pair_groups,
    transplanted_pair_groups,
)
from training.options import SeedOptions
from training.simulate import SimulationOptions, iter_simulate_dataset

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # .npy inputs carry no spacing

OFFSET_HU = 100.0  # low = full + OFFSET_HU in the synthetic pairs below


class ArrayPairs:
    """A pair source over in-memory arrays (low = full + OFFSET_HU), to test the datasets alone."""

    def __init__(self, fulls):
        self.fulls = [np.asarray(f, dtype=np.float32) for f in fulls]

    def __len__(self):
        return len(self.fulls)

    def key(self, index):
        return f"s{index}"

    def pair_hu(self, index):
        return self.fulls[index] + OFFSET_HU, self.fulls[index]


def _random_hu(shape, seed):
    # Inside the model range [-1000, 2000] even after +OFFSET_HU: no clipping, so low - full is exact.
    return np.random.default_rng(seed).uniform(-800, 1500, shape).astype(np.float32)


def _norm(hu):
    return MODEL_NORMALIZATION.to_model(np.asarray(hu, dtype=np.float32))


def _locate(patch, image, size):
    """Every (top, left, transform) such that the patch is that flip/rotation of that crop."""
    windows = np.lib.stride_tricks.sliding_window_view(image, (size, size))  # (tops, lefts, size, size)
    found = []
    for k in range(4):
        rotated = np.rot90(windows, k, axes=(2, 3))
        for flip in (False, True):
            candidates = rotated[..., ::-1] if flip else rotated
            hits = np.all(np.abs(candidates - patch) < 1e-6, axis=(2, 3))
            found += [(int(t), int(left), 2 * k + flip) for t, left in zip(*np.nonzero(hits), strict=True)]
    return found


# --- paired crops and augmentation ------------------------------------------------------------


def test_training_samples_apply_the_same_crop_and_flip_to_low_and_full():
    full = _random_hu((40, 40), seed=0)
    dataset = PairedSliceDataset(ArrayPairs([full]), patch_size=12, generator=torch.Generator().manual_seed(0))
    positions, transforms = set(), set()
    for _ in range(24):
        sample = dataset[0]
        assert sample["low"].shape == sample["full"].shape == (1, 12, 12)
        assert sample["low"].dtype == torch.float32
        assert sample["key"] == "s0" and sample["index"] == 0
        # Same crop and same flip/rotation: the difference is the constant offset everywhere.
        diff = (sample["low"] - sample["full"]).numpy()
        np.testing.assert_allclose(diff, OFFSET_HU / 3000.0, atol=1e-6)
        (match,) = _locate(sample["full"][0].numpy(), _norm(full), 12)
        positions.add(match[:2])
        transforms.add(match[2])
    assert len(positions) > 10  # random crops
    assert len(transforms) >= 5  # random flips and quarter turns (8 possible)


def test_validation_samples_are_the_central_crop_without_augmentation():
    full = _random_hu((40, 48), seed=1)
    dataset = PairedSliceDataset(ArrayPairs([full]), patch_size=16, train=False)
    for _ in range(3):
        sample = dataset[0]
        np.testing.assert_array_equal(sample["full"][0].numpy(), _norm(full[12:28, 16:32]))
        np.testing.assert_array_equal(sample["low"][0].numpy(), _norm(full[12:28, 16:32] + OFFSET_HU))
    whole = PairedSliceDataset(ArrayPairs([full]), train=False)[0]
    np.testing.assert_array_equal(whole["full"][0].numpy(), _norm(full))


def test_full_slices_keep_their_shape_under_augmentation():
    full = _random_hu((24, 32), seed=2)
    dataset = PairedSliceDataset(ArrayPairs([full]), generator=torch.Generator().manual_seed(1))
    for _ in range(12):
        sample = dataset[0]
        assert sample["full"].shape == (1, 24, 32)  # only half turns for a non-square slice
        np.testing.assert_allclose((sample["low"] - sample["full"]).numpy(), OFFSET_HU / 3000.0, atol=1e-6)


def test_noise_scale_multiplies_the_training_noise_by_a_drawn_factor_and_never_the_validation_noise():
    full = _random_hu((32, 32), seed=3)
    scaled = PairedSliceDataset(ArrayPairs([full]), patch_size=16, noise_scale=(0.5, 1.0),
                                generator=torch.Generator().manual_seed(2))
    factors = []
    for _ in range(40):
        sample = scaled[0]
        diff = (sample["low"] - sample["full"]).numpy() * 3000.0  # HU: k * OFFSET_HU everywhere
        k = float(diff.mean()) / OFFSET_HU
        np.testing.assert_allclose(diff, k * OFFSET_HU, atol=2e-3)
        factors.append(k)
    assert 0.5 <= min(factors) < 0.6 and 0.9 < max(factors) <= 1.0  # spread over [0.5, 1]
    # The full-dose target is untouched, and validation pairs keep their own noise.
    val = PairedSliceDataset(ArrayPairs([full]), train=False, noise_scale=(0.5, 1.0))[0]
    np.testing.assert_allclose((val["low"] - val["full"]).numpy() * 3000.0, OFFSET_HU, atol=2e-3)
    np.testing.assert_array_equal(val["full"][0].numpy(), _norm(full))
    for bad in ((1.0, 0.5), (-0.1, 1.0), (0.5, float("nan")), (1.0,)):
        with pytest.raises(ConfigError, match="noise scale"):
            PairedSliceDataset(ArrayPairs([full]), noise_scale=bad)
    with pytest.raises(ConfigError, match="noise scale"):
        SeedOptions(output=Path("run"), pairs=(Path("pairs"),), val_patients=("L192",), langae=Path("ae"),
                    noise_scale=(2.0, 1.0))
    assert SeedOptions(output=Path("run"), pairs=(Path("pairs"),), val_patients=("L192",), langae=Path("ae"),
                       noise_scale=[0.5, 1]).noise_scale == (0.5, 1.0)


def test_seeded_generators_reproduce_the_samples_and_repeat_extends_an_epoch():
    fulls = [_random_hu((32, 32), seed=s) for s in range(3)]
    a = PairedSliceDataset(ArrayPairs(fulls), patch_size=8, repeat=4, generator=torch.Generator().manual_seed(5))
    b = PairedSliceDataset(ArrayPairs(fulls), patch_size=8, repeat=4, generator=torch.Generator().manual_seed(5))
    assert len(a) == 12
    for i in range(12):
        sample_a, sample_b = a[i], b[i]
        assert sample_a["index"] == sample_b["index"] == i % 3
        torch.testing.assert_close(sample_a["full"], sample_b["full"])
    with pytest.raises(IndexError):
        a[12]
    loader = torch.utils.data.DataLoader(a, batch_size=4)
    batch = next(iter(loader))
    assert batch["low"].shape == (4, 1, 8, 8) and len(batch["key"]) == 4


def test_dataset_options_are_validated():
    source = ArrayPairs([_random_hu((16, 16), seed=0)])
    with pytest.raises(ConfigError, match="larger than the slice"):
        PairedSliceDataset(source, patch_size=32)[0]
    with pytest.raises(ConfigError, match="patch_size"):
        PairedSliceDataset(source, patch_size=0)
    with pytest.raises(ConfigError, match="repeat"):
        PairedSliceDataset(source, repeat=0)
    with pytest.raises(ConfigError, match="empty"):
        PairedSliceDataset(ArrayPairs([]))


# --- Mayo 2D layout ------------------------------------------------------------------------


def _mayo(root, n=3, shape=(32, 32)):
    (root / "quarter_1mm").mkdir(parents=True)
    (root / "full_1mm").mkdir()
    fulls = {}
    for k in range(1, n + 1):
        full = np.full(shape, 100.0 * k, dtype=np.float32)  # each pair has its own level
        fulls[k] = full
        np.save(root / "full_1mm" / f"train_full_{k:05d}.npy", (full + 1024).astype(np.int16))
        np.save(root / "quarter_1mm" / f"train_quarter_{k:05d}.npy", (full + OFFSET_HU + 1024).astype(np.int16))
    return fulls


def test_mayo_layout_pairs_by_name_and_removes_the_1024_offset(tmp_path):
    fulls = _mayo(tmp_path)
    dataset = MayoDataset(tmp_path, train=False)
    assert len(dataset) == 3
    for i in range(3):
        sample = dataset[i]
        k = int(sample["key"].rsplit("_", 1)[1])
        assert sample["key"] == f"train_full_{k:05d}"
        np.testing.assert_allclose(sample["full"][0].numpy(), _norm(fulls[k]), atol=1e-7)
        np.testing.assert_allclose(sample["low"][0].numpy(), _norm(fulls[k] + OFFSET_HU), atol=1e-7)
    low_hu, full_hu = MayoPairs(tmp_path).pair_hu(0)
    assert full_hu.dtype == np.float32 and float(full_hu[0, 0]) == 100.0 and float(low_hu[0, 0]) == 200.0
    assert isinstance(open_pairs(tmp_path), MayoPairs)


def test_mayo_layout_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="quarter_1mm"):
        MayoPairs(tmp_path)
    (tmp_path / "quarter_1mm").mkdir()
    (tmp_path / "full_1mm").mkdir()
    with pytest.raises(ConfigError, match="no .npy slices"):
        MayoPairs(tmp_path)
    _mayo(tmp_path / "split" / "train", n=2)
    np.save(tmp_path / "split" / "train" / "quarter_1mm" / "train_quarter_00009.npy", np.zeros((32, 32), np.int16))
    with pytest.raises(ConfigError, match="no partner.*train_quarter_00009"):
        MayoPairs(tmp_path / "split", split="train")


# --- simulated pairs and DICOM pairs ----------------------------------------------------------


def test_simulated_pairs_folder(tmp_path):
    volume = np.stack([_random_hu((32, 32), seed=s) * 0.1 for s in range(2)])
    np.save(tmp_path / "v.npy", volume)
    folder = run(iter_simulate_dataset([tmp_path / "v.npy"], tmp_path / "sim", options=SimulationOptions(n_views=24), workers=1))
    assert isinstance(open_pairs(folder), SimulatedPairs)
    dataset = SimulatedPairDataset(folder, train=False)
    assert len(dataset) == 2
    sample = dataset[1]
    assert sample["key"] == "00001"
    np.testing.assert_allclose(sample["full"][0].numpy(), _norm(volume[1]), atol=1e-7)
    np.testing.assert_allclose(sample["low"][0].numpy(), _norm(np.load(folder / "low" / "00001.npy")), atol=1e-7)
    assert not np.allclose(sample["low"].numpy(), sample["full"].numpy())


def test_dicom_pairs_match_slices_by_position(dicom_series_dir, tmp_path):
    from napari_langmamba.io import CTVolume, read_ct

    full = read_ct(dicom_series_dir)
    # A "low-dose" volume covering slices 5..9 of the series only, shifted along the normal.
    positions = full.slice_positions()
    low = CTVolume(
        hu=full.hu[5:10] + OFFSET_HU,
        spacing=full.spacing,
        origin=tuple(positions[5]),
        direction=full.direction,
    )
    with pytest.raises(ConfigError, match="0 low-dose and 15 normal-dose slices have no partner"):
        DicomPairs(low, full)
    pairs = DicomPairs(low, full, allow_unmatched=True)
    assert len(pairs) == 5
    for i in range(5):
        low_hu, full_hu = pairs.pair_hu(i)
        np.testing.assert_array_equal(low_hu - OFFSET_HU, full.hu[5 + i])
        np.testing.assert_array_equal(full_hu, full.hu[5 + i])
    # The real series (read from disk) against itself: every slice pairs with itself.
    same = DicomPairs(dicom_series_dir, full)
    assert len(same) == 20 and same.key(0) == "z-804.50mm"
    with pytest.raises(ConfigError, match="No slice"):
        far = CTVolume(hu=full.hu[:2], spacing=full.spacing, origin=(0.0, 0.0, 500.0), direction=full.direction)
        DicomPairs(far, full)


def test_open_pairs_needs_a_known_layout(tmp_path):
    with pytest.raises(ConfigError, match="neither a simulated-pairs folder"):
        open_pairs(tmp_path)
    with pytest.raises(ConfigError, match="either a dataset folder"):
        open_pairs(tmp_path, low=tmp_path, full=tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        open_pairs(tmp_path / "missing")


# --- normal-dose slices for the LangAE ----------------------------------------------------------


def test_ndct_dataset_reads_volumes_mayo_and_slice_folders(tmp_path):
    volume = np.stack([_random_hu((32, 32), seed=s) for s in range(3)])
    np.save(tmp_path / "volume.npy", volume)
    slices = tmp_path / "slices"
    slices.mkdir()
    for k in range(2):
        np.save(slices / f"s{k}.npy", volume[k] + 1024)  # stored as HU + 1024
    mayo = tmp_path / "mayo"
    fulls = _mayo(mayo, n=2)

    # npy_layout applies to plain .npy inputs (the slice folder here); Mayo roots always store HU + 1024.
    dataset = NDCTDataset([tmp_path / "volume.npy", slices, mayo], train=False, npy_layout="mayo")
    assert len(dataset) == 3 + 2 + 2
    hu_dataset = NDCTDataset(tmp_path / "volume.npy", train=False)
    np.testing.assert_allclose(hu_dataset[2]["image"][0].numpy(), _norm(volume[2]), atol=1e-7)
    assert hu_dataset[2]["key"] == "volume.npy:2"
    by_key = {dataset[i]["key"]: dataset[i]["image"] for i in range(len(dataset))}
    np.testing.assert_allclose(by_key["s1"][0].numpy(), _norm(volume[1]), atol=1e-6)
    np.testing.assert_allclose(by_key["train_full_00002"][0].numpy(), _norm(fulls[2]), atol=1e-7)

    augmented = NDCTDataset(tmp_path / "volume.npy", patch_size=16, generator=torch.Generator().manual_seed(0))
    sample = augmented[0]
    assert sample["image"].shape == (1, 16, 16)
    assert len(_locate(sample["image"][0].numpy(), _norm(volume[0]), 16)) == 1
    with pytest.raises(ConfigError, match="No normal-dose CT"):
        NDCTDataset([])


def test_ndct_slices_of_a_dicom_series_carry_its_metadata(dicom_series_dir, tmp_path):
    from training.datasets import NDCTSlices

    np.save(tmp_path / "v.npy", np.zeros((2, 16, 16), np.float32))
    source = NDCTSlices([dicom_series_dir, tmp_path / "v.npy"], slice_step=5)
    assert len(source) == 4 + 1  # slices 0, 5, 10, 15 of the series and slice 0 of the 2-slice volume
    assert [source.key(i) for i in range(4)] == [f"{dicom_series_dir.name}:{k}" for k in (0, 5, 10, 15)]
    assert source.metadata(0)["Modality"] == "CT"
    assert source.metadata(0)["SeriesDescription"] == "CT Body 3.0"
    assert "Modality" not in source.metadata(4)  # a .npy volume has no DICOM fields


# --- many pairs at once: patients folders, manifests, --low/--full, simulated doses ---------------

MAYO_PAIRS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ct" / "mayo2016_pairs"


def _volume_pair(folder, name, seed, offset):
    """A 3-slice .npy 'normal-dose' volume and its 'low-dose' partner (full + offset)."""
    full = np.stack([_random_hu((24, 24), seed=seed + k) * 0.2 for k in range(3)])
    np.save(folder / f"{name}_full.npy", full)
    np.save(folder / f"{name}_low.npy", full + offset)
    return full


def test_manifest_and_repeated_low_full_pairs_are_labelled_by_patient(tmp_path):
    full_a = _volume_pair(tmp_path, "a", 0, 10.0)
    full_b = _volume_pair(tmp_path, "b", 10, 20.0)
    full_c = _volume_pair(tmp_path, "c", 20, 30.0)
    (tmp_path / "pairs.csv").write_text(
        "low,full,patient,kernel,dose\na_low.npy,a_full.npy,P1,B30f,10%\n"
        f"{tmp_path / 'b_low.npy'},b_full.npy,P2,,0.5\n"
    )
    pairs = collect_pairs(manifest=[tmp_path / "pairs.csv"], low=[tmp_path / "c_low.npy"], full=[tmp_path / "c_full.npy"])
    assert len(pairs) == 9 and pairs.patients == ["P1", "P2", "c_low.npy"]
    # collect_pairs order: --low/--full pairs, then the manifest's rows
    for i, (full, offset) in enumerate([(full_c, 30.0), (full_a, 10.0), (full_b, 20.0)]):
        for k in range(3):
            low_hu, full_hu = pairs.pair_hu(3 * i + k)
            np.testing.assert_allclose(full_hu, full[k])
            np.testing.assert_allclose(low_hu - full_hu, offset, atol=1e-4)
    assert pairs.info(3) == {"patient": "P1", "kernel": "B30f", "dose": 0.1, "origin": "real"}
    assert pairs.info(6)["dose"] == 0.5 and pairs.info(6)["kernel"] is None and pairs.info(0)["dose"] is None
    assert len({pairs.key(i) for i in range(9)}) == 9 and pairs.key(3).startswith("P1/")
    summary = pairs.summary()
    assert summary["patients"]["P1"] == {"n_slices": 3, "kernels": ["B30f"], "doses": [0.1], "origins": ["real"]}
    assert summary["doses"] == [0.1, 0.5, None] and summary["n_real_slices"] == 9
    # validation by patient: the named patients' pairs, the rest for training
    val, train = pairs.select(["P2"]), pairs.select(["P2"], exclude=True)
    assert len(val) == 3 and len(train) == 6 and "P2" not in train.patients
    with pytest.raises(ConfigError, match="No pairs of patient"):
        pairs.select(["L192"])


def test_bad_manifests_and_pair_inputs_are_plain_errors(tmp_path):
    _volume_pair(tmp_path, "a", 0, 10.0)
    cases = {
        "low,full\na_low.npy,a_full.npy\n": "lacks the column",
        "low,full,patient\n": "lists no pairs",
        "low,full,patient\na_low.npy,missing.npy,P1\n": "does not exist",
        "low,full,patient,dose\na_low.npy,a_full.npy,P1,3\n": "dose fraction must be in",
        "low,full,patient\na_low.npy,a_full.npy,\n": "needs low, full and patient",
    }
    for n, (text, message) in enumerate(cases.items()):
        (tmp_path / f"m{n}.csv").write_text(text)
        with pytest.raises(ConfigError, match=message):
            collect_pairs(manifest=[tmp_path / f"m{n}.csv"])
    with pytest.raises(ConfigError, match="pair up in order"):
        collect_pairs(low=[tmp_path / "a_low.npy"], full=[])
    with pytest.raises(ConfigError, match="No slice pairs"):
        collect_pairs()
    with pytest.raises(ConfigError, match="does not exist"):
        patient_folder_pairs(tmp_path / "nowhere")
    (tmp_path / "P9" / "full_3mm_B30").mkdir(parents=True)
    with pytest.raises(ConfigError, match="full_3mm_B30 have no partner"):
        patient_folder_pairs(tmp_path)


def test_simulated_pairs_at_several_doses_are_cached(tmp_path):
    volume = np.stack([_random_hu((32, 32), seed=s) * 0.1 for s in range(2)])
    np.save(tmp_path / "nd.npy", volume)
    kwargs = {"cache": tmp_path / "cache", "slice_step": 1}
    groups = simulated_pair_groups([f"PX={tmp_path / 'nd.npy'}"], [0.05, "50%"], **kwargs)
    assert [(g.patient, g.dose, g.origin, len(g.source)) for g in groups] == [
        ("PX", 0.05, "simulated", 2), ("PX", 0.5, "simulated", 2)]
    noise = []
    for group in groups:
        low, full = group.source.pair_hu(1)
        np.testing.assert_array_equal(full, volume[1])
        noise.append(float(np.std(low - full)))
    assert noise[0] > 2.0 * noise[1] > 0  # 5 % dose is much noisier than 50 %
    stamps = sorted(p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.npy"))
    again = simulated_pair_groups([f"PX={tmp_path / 'nd.npy'}"], [0.05, 0.5], **kwargs)  # the cache answers
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.npy")) == stamps
    np.testing.assert_array_equal(again[0].source.pair_hu(1)[0], groups[0].source.pair_hu(1)[0])
    mixed = PairSet([*groups, *again])
    assert mixed.summary()["n_simulated_slices"] == 8 and mixed.summary()["doses"] == [0.05, 0.5]


def test_the_mayo_patient_folders_pair_by_position():
    if not MAYO_PAIRS.is_dir():
        pytest.skip(f"real CT data not found at {MAYO_PAIRS} (../shared/data is absent)")
    pairs = collect_pairs(pairs=[MAYO_PAIRS])
    summary = pairs.summary()
    assert pairs.patients == ["L096", "L143", "L192", "L286"] and len(pairs) == 36
    assert {p: (e["n_slices"], e["kernels"]) for p, e in summary["patients"].items()} == {
        "L096": (10, ["D45f"]), "L143": (11, ["B30f", "D45f"]), "L192": (11, ["B30f", "D45f"]), "L286": (4, ["D45f"])}
    assert summary["doses"] == [0.25]
    val = pairs.select(["L192"])
    keys = [val.key(i) for i in range(len(val))]
    assert keys[0] == "L192/quarter_3mm_B30/z-476.60mm" and len(set(keys)) == 11
    low, full = val.pair_hu(0)
    assert low.shape == full.shape == (512, 512)
    assert 10.0 < float(np.std((low - full)[192:320, 192:320])) < 100.0  # real quarter-dose noise, same slice


def _residual_variants(noise):
    return [noise, noise[::-1], noise[:, ::-1], noise[::-1, ::-1]]


def test_noise_transplant_adds_a_donor_pairs_real_noise_to_new_slices(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a", "b"):  # two donor patients whose noise is a fixed random image
        full = np.stack([_random_hu((24, 24), seed=k) * 0.2 for k in range(2)])
        np.save(tmp_path / f"{name}_full.npy", full)
        np.save(tmp_path / f"{name}_low.npy", full + rng.normal(0, 30, full.shape).astype(np.float32))
    (tmp_path / "pairs.csv").write_text("low,full,patient\na_low.npy,a_full.npy,PA\nb_low.npy,b_full.npy,PB\n")
    pairs = collect_pairs(manifest=[tmp_path / "pairs.csv"])
    train = pairs.select(["PB"], exclude=True)  # PB plays the validation patient: never a donor
    target = np.stack([_random_hu((24, 24), seed=10 + k) * 0.2 for k in range(5)])
    np.save(tmp_path / "target.npy", target)
    groups = transplanted_pair_groups([f"PT={tmp_path / 'target.npy'}"], train, slice_step=2, variants=3, seed=7,
                                      exclude_patients=["PB"])
    (group,) = groups
    assert (group.patient, group.origin, group.dose, len(group.source)) == ("PT", "transplanted", None, 9)
    donor_noise = [np.subtract(*train.pair_hu(i)) for i in range(len(train))]
    for i in range(len(group.source)):
        low, full = group.source.pair_hu(i)
        np.testing.assert_array_equal(full, target[2 * (i // 3)])  # slices 0, 2, 4; three variants each
        noise = low - full
        assert any(np.allclose(noise, v, atol=1e-4) for d in donor_noise for v in _residual_variants(d))
        assert group.source.key(i).split("+")[1].startswith("PA/")
    assert len(set(map(str, group.source._draws))) > 1  # the variants differ in donor or flip
    again = transplanted_pair_groups([f"PT={tmp_path / 'target.npy'}"], train, slice_step=2, variants=3, seed=7)[0]
    np.testing.assert_array_equal(again.source.pair_hu(4)[0], group.source.pair_hu(4)[0])  # stable across runs
    mixed = PairSet([*train.groups, group])
    assert mixed.summary()["n_transplanted_slices"] == 9 and mixed.summary()["n_real_slices"] == 2
    # a validation patient's scan is refused; a target of another shape has no donor
    with pytest.raises(ConfigError, match="validation patient"):
        transplanted_pair_groups([f"PB={tmp_path / 'target.npy'}"], train, exclude_patients=["PB"])
    np.save(tmp_path / "other.npy", np.zeros((2, 16, 16), np.float32))
    with pytest.raises(ConfigError, match="no real noise to add"):
        transplanted_pair_groups([tmp_path / "other.npy"], train)
    with pytest.raises(ConfigError, match="does not exist"):
        transplanted_pair_groups([tmp_path / "nowhere.npy"], train)
    with pytest.raises(ConfigError, match="needs --val-patients"):  # donors must be known training pairs
        SeedOptions(output=tmp_path / "run", manifest=[tmp_path / "pairs.csv"], backbone="redcnn", langda_weight=0,
                    transplant_noise_onto=[tmp_path / "target.npy"])


def test_noise_transplant_noise_onto_the_real_l096_volume_uses_d45_noise_only():
    volume = MAYO_PAIRS.parent / "mayo2016_L096_full_dose"
    if not (MAYO_PAIRS.is_dir() and volume.is_dir()):
        pytest.skip(f"real CT data not found at {MAYO_PAIRS.parent} (../shared/data is absent)")
    train = collect_pairs(pairs=[MAYO_PAIRS]).select(["L192"], exclude=True)
    (group,) = transplanted_pair_groups([volume], train, slice_step=40, variants=2, exclude_patients=["L192"])
    assert (group.patient, group.kernel, group.dose, len(group.source)) == ("L096", "D45f", 0.25, 10)
    assert {len(group.source.residuals)} == {18}  # the D45 pairs of L096, L143 and L286; no B30, no L192
    assert not any("L192" in key or "B30" in key for key, _ in group.source.residuals)
    low, full = group.source.pair_hu(4)
    assert low.shape == full.shape == (512, 512)
    assert 20.0 < float(np.std((low - full)[192:320, 192:320])) < 100.0  # real quarter-dose noise, as the pairs
    assert -1100.0 < float(full.min()) and float(np.median(full[200:300, 200:300])) > -200.0  # HU of a body
    with pytest.raises(ConfigError, match="validation patient"):
        transplanted_pair_groups([MAYO_PAIRS / "L192" / "full_3mm_D45"], train, exclude_patients=["L192"])
