import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose, EnsureTyped, LoadImaged

from scripts.engine.data import DataSplit, check_nifti_header, find_niftis, make_dataset
from scripts.engine.default_data import generate_mni_cohort, template_volume
from scripts.engine.generate_synthetic_data import generate_synthetic_data, synthetic_volume
from scripts.engine.metrics import dice
from scripts.engine.transforms import (
    LoadVolumed,
    RandAxisResampled,
    RandGhostingd,
    RandMotiond,
    RandZeroEdgesd,
    ValidateVolumed,
)


def _save(path, data, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), np.eye(4) if affine is None else affine), str(path))
    return str(path)


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_niftis(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="holds no .nii or .nii.gz files"):
        find_niftis(tmp_path)


def test_finds_nii_and_nii_gz(tmp_path):
    _save(tmp_path / "a.nii", np.zeros((4, 4, 4)))
    _save(tmp_path / "b.nii.gz", np.zeros((4, 4, 4)))
    assert [os.path.basename(f) for f in find_niftis(tmp_path)] == ["a.nii", "b.nii.gz"]


def test_header_checks(tmp_path):
    good = _save(tmp_path / "one_volume_4d.nii.gz", np.zeros((6, 6, 6, 1)))
    assert check_nifti_header(good) == (6, 6, 6)
    many = _save(tmp_path / "two_volumes.nii.gz", np.zeros((6, 6, 6, 2)))
    with pytest.raises(ValueError, match="two_volumes.nii.gz: expected a 3-D volume"):
        check_nifti_header(many)
    flat = _save(tmp_path / "slice.nii.gz", np.zeros((6, 6)))
    with pytest.raises(ValueError, match="slice.nii.gz: expected a 3-D volume"):
        check_nifti_header(flat)
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"this is not a nifti file at all" * 20)
    with pytest.raises(ValueError, match="corrupt.nii.gz: not a readable NIfTI file"):
        check_nifti_header(str(corrupt))


def _chain(err: BaseException) -> str:
    """Messages of an exception and its causes (MONAI's Compose wraps transform errors)."""
    parts = []
    while err is not None:
        parts.append(str(err))
        err = err.__cause__ or err.__context__
    return " | ".join(parts)


def test_load_pipeline_reports_nan_and_truncated_files(tmp_path):
    load = Compose([LoadVolumed("image", image_only=True, ensure_channel_first=True), ValidateVolumed("image")])
    data = np.ones((6, 6, 6))
    data[1, 2, 3] = np.nan
    nan_file = _save(tmp_path / "nan.nii.gz", data)
    with pytest.raises(Exception) as err:
        load({"image": nan_file})
    assert "nan.nii.gz: contains 1 NaN or infinite voxel values" in _chain(err.value)
    one = _save(tmp_path / "one.nii.gz", np.ones((6, 6, 6, 1)))
    assert tuple(load({"image": one})["image"].shape) == (1, 6, 6, 6)
    full = _save(tmp_path / "full.nii.gz", np.random.rand(16, 16, 16))
    blob = open(full, "rb").read()
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(Exception) as err:
        load({"image": str(truncated)})
    assert "truncated.nii.gz" in _chain(err.value)


def test_split_is_deterministic_saved_and_checked(tmp_path, nifti_dir):
    out = tmp_path / "run"
    a = DataSplit(nifti_dir, str(out), train_frac=0.75, seed=3)
    assert len(a.val_files) == 3 and len(a.train_files) == 9
    assert not set(a.val_files) & set(a.train_files)
    saved = json.loads((out / "data_split.json").read_text())
    assert saved["val"] == a.val_files
    b = DataSplit(nifti_dir, str(out), train_frac=0.75, seed=99)  # the saved split wins
    assert b.val_files == a.val_files
    c = DataSplit(nifti_dir, str(tmp_path / "other"), train_frac=0.75, seed=3)
    assert c.val_files == a.val_files  # same seed, same split
    capped = DataSplit(nifti_dir, str(tmp_path / "capped"), max_niis_to_use=4)
    assert len(capped.train_files) + len(capped.val_files) == 4
    with pytest.raises(ValueError, match="holds a split of other files"):
        DataSplit(nifti_dir, str(out), max_niis_to_use=4)
    with pytest.raises(ValueError, match="another train/validation split"):
        a.load_state_dict({"train_files": capped.train_files, "val_files": capped.val_files})


def test_generator_statistics(tmp_path):
    rng = np.random.default_rng(0)
    vols = np.stack([synthetic_volume(rng, 16) for _ in range(20)])
    assert vols.shape == (20, 16, 16, 16) and vols.dtype == np.float32
    assert np.allclose(vols.max(axis=(1, 2, 3)), 1.0)
    # background: smoothed U(0, 0.05) noise normalised by (max ~ 0.25..0.8): well below the inclusion
    corners = vols[:, :2, :2, :2]
    assert corners.max() < 0.25
    inside_fraction = (vols > 0.3).mean(axis=(1, 2, 3))
    # half-axes in [2, 8] voxels: ellipsoid volume between 4/3 pi 8 and the cube
    assert inside_fraction.min() > 4 / 3 * np.pi * 8 / 16**3 * 0.5
    assert inside_fraction.std() > 0.01  # sizes vary
    paths = generate_synthetic_data(str(tmp_path), voxels_per_axis=8, number_of_files=3, random_seed=5)
    img = nib.load(paths[0])
    assert img.shape == (8, 8, 8) and np.allclose(img.affine, np.eye(4))
    again = generate_synthetic_data(str(tmp_path / "again"), voxels_per_axis=8, number_of_files=3, random_seed=5)
    assert np.array_equal(nib.load(again[2]).get_fdata(), nib.load(paths[2]).get_fdata())
    with pytest.raises(ValueError, match="power of two"):
        generate_synthetic_data(str(tmp_path), voxels_per_axis=12, number_of_files=1)


@pytest.mark.parametrize("cls", [RandGhostingd, RandMotiond, RandAxisResampled, RandZeroEdgesd])
def test_custom_augmentations_change_the_volume_and_keep_shape(cls):
    x = 0.1 * torch.rand(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    x[:, 4:12, 3:13, 5:11] = 1.0
    t = cls(keys="image", prob=1.0)
    t.set_random_state(0)
    out = t({"image": x.clone()})["image"]
    assert out.shape == x.shape and torch.isfinite(torch.as_tensor(out)).all()
    assert not torch.allclose(torch.as_tensor(out), x)
    never = cls(keys="image", prob=0.0)
    assert torch.equal(torch.as_tensor(never({"image": x.clone()})["image"]), x)


def test_disk_cache_never_serves_stale_data(tmp_path):
    path = _save(tmp_path / "v.nii.gz", np.ones((4, 4, 4)))
    load = Compose([LoadImaged("image", image_only=True, ensure_channel_first=True), EnsureTyped("image")])
    ds = make_dataset([{"image": path}], load, "disk", str(tmp_path / "cache"))
    assert float(ds[0]["image"].mean()) == 1.0
    os.utime(path, ns=(1, 1))
    _save(tmp_path / "v.nii.gz", np.full((4, 4, 4), 2.0))
    ds = make_dataset([{"image": path}], load, "disk", str(tmp_path / "cache"))
    assert float(ds[0]["image"].mean()) == 2.0


def test_default_cohort_is_a_varied_set_of_brains(tmp_path):
    paths = generate_mni_cohort(str(tmp_path), number_of_files=3, voxels_per_axis=16, seed=2)
    vols = np.stack([nib.load(p).get_fdata() for p in paths])
    assert vols.shape == (3, 16, 16, 16) and np.isfinite(vols).all()
    template, affine = template_volume(16)
    brain = template > 0.1
    assert 0.1 < brain.mean() < 0.6  # a brain inside a padded cube
    for v in vols:
        assert dice(v > 0.1, brain) > 0.6  # still brain-shaped
    assert not np.allclose(vols[0], vols[1])  # but each subject differs
    assert np.allclose(nib.load(paths[0]).affine, affine)


def test_dice():
    a = np.zeros((4, 4, 4), bool)
    a[:2] = True
    assert dice(a, a) == 1.0 and dice(a, ~a) == 0.0
    b = np.zeros_like(a)
    b[:1] = True
    assert dice(a, b) == pytest.approx(2 * 16 / (32 + 16))


@pytest.mark.parametrize("augment", [False, True])
def test_augment_option_adds_the_reference_augmentations(augment):
    """train.json ``augment``: off (default) the training preprocessing is the validation one; on it appends the
    reference's augmentations (the presets turn it on)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config("configs/train.json")
    parser.update({"augment": augment})
    train = [type(t).__name__ for t in parser.get_parsed_content("train#preprocessing").transforms]
    validate = [type(t).__name__ for t in parser.get_parsed_content("validate#preprocessing").transforms]
    augmentations = [type(t).__name__ for t in parser.get_parsed_content("augmentations")]
    assert train == validate + (augmentations if augment else [])
    assert "RandAffined" in augmentations and "RandSpatialCropd" in augmentations
    for preset in ("32", "64", "128"):
        with open(f"configs/vdvae_{preset}.json") as f:
            assert json.load(f)["augment"] is True
