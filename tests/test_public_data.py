"""Public data: the Decathlon Task01 archive (a small fake in the exact layout) is extracted, checked and prepared with
one modality or all four; a run without network names the address and where to put the archive; the prepared
volumes train the VDVAE with in_channels 1 and 4, and four-channel samples come out."""

import json
import os
import tarfile

import nibabel as nib
import numpy as np
import pytest

import scripts.engine.public_data as public_data
from tests.conftest import tiny_architecture
from tests.test_bundle import run_bundle, tiny_overrides

MODALITY = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}


def fake_task01(root, subjects: int = 8) -> str:
    """``root/Task01_BrainTumour.tar`` holding dataset.json, imagesTr (4-D, 24 x 24 x 20 x 4, a brain-shaped
    ellipsoid in a zero background, one contrast per modality) and labelsTr (a small 'tumour' of labels 1-3)."""
    task = os.path.join(root, "build", "Task01_BrainTumour")
    os.makedirs(os.path.join(task, "imagesTr"))
    os.makedirs(os.path.join(task, "labelsTr"))
    grid = np.stack(np.meshgrid(np.arange(24), np.arange(24), np.arange(20), indexing="ij")).astype(np.float32)
    rng = np.random.default_rng(0)
    training = []
    for i in range(1, subjects + 1):
        centre = np.array([12, 12, 10])[:, None, None, None] + rng.uniform(-1, 1, (3, 1, 1, 1))
        inside = (((grid - centre) / np.array([8, 9, 7])[:, None, None, None]) ** 2).sum(0) < 1
        contrasts = [300.0, 700.0, 800.0, 200.0]
        image = np.stack([inside * (c + rng.normal(0, 10, inside.shape)) for c in contrasts], -1).astype(np.float32)
        label = np.zeros(inside.shape, dtype=np.uint8)
        label[10:13, 10:13, 8:11] = rng.integers(1, 4)
        name = f"BRATS_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(image, np.eye(4)), os.path.join(task, "imagesTr", name))
        nib.save(nib.Nifti1Image(label, np.eye(4)), os.path.join(task, "labelsTr", name))
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = {
        "name": "BRATS",
        "licence": "CC-BY-SA 4.0",
        "modality": MODALITY,
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
        "numTraining": subjects,
        "training": training,
        "test": [],
    }
    with open(os.path.join(task, "dataset.json"), "w") as f:
        json.dump(meta, f)
    archive = os.path.join(root, "Task01_BrainTumour.tar")
    with tarfile.open(archive, "w") as tar:
        tar.add(task, arcname="Task01_BrainTumour")
    return archive


def no_network(*args, **kwargs):
    raise OSError("network is unreachable")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict:
    root = str(tmp_path_factory.mktemp("public"))
    fake_task01(root)
    patch = pytest.MonkeyPatch()
    patch.setattr(public_data, "download_url", no_network)  # the archive is there: nothing is downloaded
    try:
        t1 = public_data.prepare(root=root, modality="t1")
        every = public_data.prepare(root=root, modality="all")
    finally:
        patch.undo()
    return {"root": root, "t1": t1, "all": every}


def test_preparation_crops_to_the_brain_and_keeps_labels_beside(prepared):
    every, t1 = prepared["all"], prepared["t1"]
    assert t1.endswith(os.path.join("msd_brain_tumour", "t1", "images"))
    names = sorted(os.listdir(every))
    assert len(names) == 8 and names[0] == "BRATS_001.nii.gz"
    image = nib.load(os.path.join(every, names[0])).get_fdata()
    one = nib.load(os.path.join(t1, names[0])).get_fdata()
    label = nib.load(os.path.join(os.path.dirname(every), "labels", names[0])).get_fdata()
    assert image.ndim == 4 and image.shape[-1] == 4 and one.ndim == 3
    assert image.shape[:3] == one.shape == label.shape
    assert image.shape[0] < 24 and image.shape[2] < 20  # cropped to the ellipsoid (plus the margin)
    means = [image[..., c][image[..., c] > 0].mean() for c in range(4)]
    assert np.allclose(means, [300, 700, 800, 200], rtol=0.05)  # FLAIR, T1, T1Gd, T2 in dataset.json's order
    assert np.allclose(one[one > 0].mean(), 700, rtol=0.05)  # t1 alone
    assert set(np.unique(label)) - {0} and label.sum() > 0  # the tumour survives the crop
    manifest = json.load(open(os.path.join(os.path.dirname(every), "dataset.json")))
    assert manifest["modalities"] == ["flair", "t1", "t1gd", "t2"] and manifest["num_volumes"] == 8


def test_without_network_or_archive_the_error_names_the_address_and_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(public_data, "download_url", no_network)
    with pytest.raises(
        RuntimeError, match=r"msd-for-monai.*Task01_BrainTumour.tar.*put it at .*Task01_BrainTumour.tar"
    ):
        public_data.prepare(root=str(tmp_path))
    with pytest.raises(ValueError, match=r"choose 'all' or among \['flair', 't1', 't1gd', 't2'\]"):
        public_data.prepare(root=str(tmp_path), modality="dwi")


def test_prepared_volumes_train_with_one_and_four_modalities(prepared, tmp_path):
    for folder, channels in ((prepared["t1"], 1), (prepared["all"], 4)):
        out = str(tmp_path / f"run{channels}")
        run_bundle(tiny_overrides(folder, out, max_epochs=1, in_channels=channels))
        assert os.path.isfile(os.path.join(out, "model.pt"))
    samples = str(tmp_path / "samples")
    arch = {"resolution": 16, "in_channels": 4, **tiny_architecture(16)}
    run_bundle(
        {
            "ckpt_path": os.path.join(str(tmp_path / "run4"), "model.pt"),
            "output_dir": samples,
            "num_samples": 1,
            **arch,
        },
        "configs/inference.json",
    )
    assert nib.load(os.path.join(samples, "sample_t1.2_00000.nii.gz")).shape == (16, 16, 16, 4)

    # the anomaly benchmark with the real tumour labels as ground truth, on the T1 model
    from scripts.tools.anomaly_benchmark import main as anomaly_benchmark

    run1 = str(tmp_path / "run1")
    report = tmp_path / "anomaly.md"
    out = anomaly_benchmark(
        vdvae_model=os.path.join(run1, "model.pt"),
        vdvae_run_dir=run1,
        vdvae_overrides={"resolution": 16, **tiny_architecture(16)},
        vqvae_path=str(tmp_path / "no_vqvae.pt"),
        kl_resolutions=[8],
        down_to_resolutions=[8],
        num_draws=1,
        draws=1,
        anatomies=1,
        lesion_dir=prepared["t1"],
        lesion_masks=os.path.join(os.path.dirname(prepared["t1"]), "labels"),
        output=str(report),
        figure=str(tmp_path / "anomaly.png"),
        results=str(tmp_path / "anomaly.json"),
    )
    assert out["real_lesions"]["volumes"] == 8
    for row in out["table"].values():
        real = row["real"]
        assert 0 < real["lesion_fraction"] < 0.5 and 0 <= real["auroc"] <= 1 and 0 <= real["best_dice"] <= 1
    assert "#### real lesions (8 volumes" in report.read_text()
    with pytest.raises(FileNotFoundError, match="no label volume for 8 of the 8 volumes"):
        anomaly_benchmark(
            vdvae_model=os.path.join(run1, "model.pt"),
            vdvae_run_dir=run1,
            vdvae_overrides={"resolution": 16, **tiny_architecture(16)},
            vqvae_path=str(tmp_path / "no_vqvae.pt"),
            lesion_dir=prepared["t1"],
            lesion_masks=str(tmp_path),
        )
