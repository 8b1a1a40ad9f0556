"""Multi-modal volumes: a 4-D NIfTI of C modalities trains the VDVAE with in_channels = C, each modality keeps its own
intensity window, and sampling and reconstruction write C-channel volumes."""

import json
import os

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import tiny_architecture
from tests.test_bundle import run_bundle, tiny_overrides
from tests.test_covariates import evaluate_run


@pytest.fixture(scope="module")
def two_modalities(tmp_path_factory) -> str:
    """10 subjects at 16^3: channel 0 a bright ball on [0, 1], channel 1 its dark rim on [0, 1000] (another contrast,
    another scale)."""
    folder = tmp_path_factory.mktemp("mm")
    grid = np.stack(np.meshgrid(*[np.arange(16) - 7.5] * 3, indexing="ij"))
    rng = np.random.default_rng(0)
    for i in range(10):
        dist = np.sqrt((grid**2).sum(0))
        ball = 1 / (1 + np.exp(2 * (dist - rng.uniform(4, 6))))
        rim = 1000 * np.exp(-((dist - 6) ** 2)) + rng.normal(0, 5, dist.shape)
        vol = np.stack([ball + rng.normal(0, 0.01, dist.shape), rim], -1).astype(np.float32)
        nib.save(nib.Nifti1Image(vol, np.eye(4)), str(folder / f"subject_{i:02d}.nii.gz"))
    return str(folder)


def test_two_modalities_train_sample_and_reconstruct(two_modalities, tmp_path):
    out = str(tmp_path / "run")
    run_bundle(tiny_overrides(two_modalities, out, max_epochs=1, in_channels=2))
    sidecar = json.load(open(os.path.join(out, "model.json")))
    low, high = sidecar["intensity_low"], sidecar["intensity_high"]
    assert len(low) == len(high) == 2 and high[1] > 100 * high[0]  # a window per modality
    arch = {"resolution": 16, "in_channels": 2, **tiny_architecture(16)}
    samples = str(tmp_path / "samples")
    run_bundle(
        {"ckpt_path": os.path.join(out, "model.pt"), "output_dir": samples, "num_samples": 2, **arch},
        "configs/inference.json",
    )
    vol = nib.load(os.path.join(samples, "sample_t1.2_00000.nii.gz")).get_fdata()
    assert vol.shape == (16, 16, 16, 2)
    for c in range(2):  # each modality back in its own window
        assert low[c] - 1e-3 <= vol[..., c].min() and vol[..., c].max() <= high[c] + 1e-3 * abs(high[c])
    recon = str(tmp_path / "recon")
    run_bundle(
        {"ckpt_path": os.path.join(out, "model.pt"), "input_dir": two_modalities, "output_dir": recon, **arch},
        "configs/reconstruct.json",
    )
    written = nib.load(os.path.join(recon, "subject_00_recon.nii.gz")).get_fdata()
    given = nib.load(os.path.join(recon, "subject_00_input.nii.gz")).get_fdata()
    source = nib.load(os.path.join(two_modalities, "subject_00.nii.gz")).get_fdata()
    assert written.shape == given.shape == (16, 16, 16, 2)
    for c in range(2):  # each channel mapped back to the input's own window of that channel
        lo, hi = np.percentile(source[..., c], [0.05, 99.95])
        assert lo - 1e-3 * abs(hi) <= written[..., c].min() and written[..., c].max() <= hi + 1e-3 * abs(hi)
        assert np.allclose(given[..., c], np.clip(source[..., c], lo, hi), atol=1e-3 * abs(hi))
    assert os.path.getsize(os.path.join(recon, "subject_00.png")) > 0
    # evaluation: features of both modalities, the anatomy score of the first; the report is written
    report = evaluate_run(out, str(tmp_path / "eval"), arch, num_samples=2)
    assert report["samples"]["1"]["frechet_distance_to_train"] >= 0
    assert os.path.getsize(tmp_path / "eval" / "report.png") > 0
    # anomaly maps: one map per subject, the healed volume with every modality in its own window
    maps = tmp_path / "anomaly"
    for method in ("reconstruction", "likelihood"):
        run_bundle(
            {
                "ckpt_path": os.path.join(out, "model.pt"),
                "input_dir": two_modalities,
                "output_dir": str(maps / method),
                "method": method,
                "down_to_resolution": 8,
                **arch,
            },
            "['configs/inference.json','configs/anomaly.json']",
        )
        amap = nib.load(str(maps / method / "subject_00_anomaly.nii.gz")).get_fdata()
        healed = nib.load(str(maps / method / "subject_00_healed.nii.gz")).get_fdata()
        assert amap.shape == (16, 16, 16) and healed.shape == (16, 16, 16, 2) and np.isfinite(amap).all()
        assert healed[..., 1].max() > 100 * healed[..., 0].max()  # the rim modality back on its own scale
    # a file with another number of modalities stops by name
    proc = run_bundle(tiny_overrides(two_modalities, str(tmp_path / "bad"), max_epochs=1), check=False)
    assert proc.returncode != 0 and "subject_0" in proc.stderr and "set in_channels = 2" in proc.stderr
