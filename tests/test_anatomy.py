"""The anatomy measure ranks real-anatomy volumes above their blurs, in order, and noise does not buy the score back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from scripts.engine.anatomy import AnatomyScore, blur_equivalent_sigma, gaussian_blur
from scripts.engine.data import preprocess_volumes
from scripts.engine.default_data import generate_mni_cohort
from scripts.engine.metrics import psnr_per_volume
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def real_volumes(tmp_path_factory) -> torch.Tensor:
    """8 subjects of the built-in cohort (the MNI152 brain, deformed and re-contrasted) through the training's
    deterministic preprocessing at 32^3: (8, 1, 32, 32, 32) on [-1, 1]."""
    folder = tmp_path_factory.mktemp("mni")
    files = generate_mni_cohort(str(folder), number_of_files=8, voxels_per_axis=64, seed=3)
    parser = ConfigParser()
    parser.read_config(f"{ROOT}/configs/train.json")
    return preprocess_volumes(files, parser.get_parsed_content("validate#preprocessing"))


@pytest.fixture(scope="module")
def score() -> AnatomyScore:
    return AnatomyScore(32)


def test_blurs_rank_below_the_originals_in_order_and_noise_does_not_lift_them(real_volumes, score):
    original = score.score_all(real_volumes)
    blurred = {s: score.score_all(gaussian_blur(real_volumes, s)) for s in (0.5, 1.0, 1.5)}
    # every volume, not only on average: original > 0.5 > 1 > 1.5 voxel blur
    assert np.all(original > blurred[0.5])
    assert np.all(blurred[0.5] > blurred[1.0])
    assert np.all(blurred[1.0] > blurred[1.5])
    gen = torch.Generator().manual_seed(0)
    for sigma in (0.5, 1.0):
        for noise in (0.05, 0.1, 0.2):
            b = gaussian_blur(real_volumes, sigma)
            noisy = (b + noise * torch.randn(b.shape, generator=gen)).clamp(-1, 1)
            assert np.all(score.score_all(noisy) < original), (sigma, noise)


def test_the_template_scores_one_and_blobs_or_empty_volumes_score_near_zero(real_volumes, score):
    assert float(score(score.template * 2 - 1)[0]) == pytest.approx(1.0, abs=0.01)
    assert float(score(torch.full((1, 1, 32, 32, 32), -1.0))[0]) == pytest.approx(0.0, abs=1e-6)
    blobs = gaussian_blur(real_volumes, 3.0)  # a brain-shaped blob without internal structure
    assert np.all(score.score_all(blobs) < 0.1)
    assert np.all(score.score_all(-real_volumes) < 0)  # inverted contrast


def test_the_score_does_not_depend_on_where_the_brain_sits(real_volumes, score):
    shifted = torch.roll(real_volumes, shifts=(2, -1, 1), dims=(2, 3, 4))  # the registration undoes a shift
    assert np.allclose(score.score_all(shifted), score.score_all(real_volumes), atol=0.05)


def test_blur_equivalent_sigma_inverts_the_blur(real_volumes):
    for sigma in (0.5, 0.7, 1.0, 1.5):
        assert np.allclose(blur_equivalent_sigma(real_volumes, gaussian_blur(real_volumes, sigma)), sigma, atol=0.03)
    assert np.all(blur_equivalent_sigma(real_volumes, real_volumes) == 0.0)
    psnr = psnr_per_volume(gaussian_blur(real_volumes, 1.0), real_volumes)
    assert torch.all((psnr > 20) & (psnr < 35))


def test_bad_input_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"\(B, 1, 32, 32, 32\)"):
        AnatomyScore(32)(torch.zeros(1, 1, 16, 16, 16))
    bad = tmp_path / "template.nii.gz"
    bad.write_bytes(b"not a nifti")
    with pytest.raises(ValueError, match="template.nii.gz"):
        AnatomyScore(32, template=str(bad))
    with pytest.raises(ValueError, match="8\\^3"):
        AnatomyScore(4)
