"""The post-hoc latent prior: given latents drive the decoder exactly, and the fitted Gaussian spans the training
latents."""

import pytest
import torch

from scripts.engine.anatomy import AnatomyScore
from scripts.engine.sampling import draw_samples
from scripts.vdvae.latent_prior import (
    LatentPCAPrior,
    PosthocPriorVDVAE,
    choose_sampler,
    latent_prior_path,
    save_latent_prior,
    with_latent_prior,
)
from scripts.vdvae.network import VDVAE
from tests.conftest import tiny_architecture


@pytest.fixture(scope="module")
def net_and_data():
    torch.manual_seed(0)
    net = VDVAE(16, **tiny_architecture(16))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval(), torch.rand(6, 1, 16, 16, 16) * 2 - 1


def test_given_latents_replace_the_prior_draws(net_and_data):
    """Posterior means of the groups <= 4^3 given to the prior path reproduce the progressive reconstruction."""
    net, x = net_and_data
    groups = sum(1 for r in net.group_resolutions() if r <= 4)
    with torch.no_grad():
        _, _, _, zs = net.decode_latents(net.encode(x), len(x), groups, sample_posterior=False, sample_prior=False)
        given = net.decode_latents(None, len(x), 0, sample_prior=False, given=zs[:groups])[0]
    torch.testing.assert_close(given, net.reconstruct(x, 4))
    assert [tuple(z.shape[1:]) for z in zs[:groups]] == [(4, r, r, r) for r in net.group_resolutions()[:groups]]


def test_pca_prior_spans_the_training_latents(net_and_data):
    net, x = net_and_data
    prior = LatentPCAPrior.fit(net, x, down_to_resolution=4, batch_size=4)
    groups = len(prior.shapes)
    assert prior.basis.shape == (len(x) - 1, sum(prior.sizes))
    with torch.no_grad():
        _, _, _, zs = net.decode_latents(net.encode(x), len(x), groups, sample_posterior=False, sample_prior=False)
    data = torch.cat([z.flatten(1) for z in zs[:groups]], 1)
    torch.testing.assert_close(prior.mean, data.mean(0))
    # every training latent is the mean plus a combination of the basis rows
    coeffs = torch.linalg.lstsq(prior.basis.T, (data - prior.mean).T).solution
    torch.testing.assert_close(prior.mean + (prior.basis.T @ coeffs).T, data, atol=1e-4, rtol=1e-4)
    # draws: right shapes, spread set by the temperature, the mean at T -> 0
    torch.manual_seed(0)
    draws = prior.sample_latents(500, 1.0)
    assert [tuple(d.shape) for d in draws] == [(500, *s) for s in prior.shapes]
    flat = torch.cat([d.flatten(1) for d in draws], 1)
    torch.testing.assert_close(flat.var(0).sum(), data.var(0).sum(), rtol=0.15, atol=0)
    cold = torch.cat([d.flatten(1) for d in prior.sample_latents(3, 1e-6)], 1)
    torch.testing.assert_close(cold, prior.mean.expand(3, -1), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="holds no latent group"):
        LatentPCAPrior.fit(net, x, down_to_resolution=0)


def test_a_marginal_of_the_finest_fit_is_the_fit_of_the_coarse_groups(net_and_data):
    """One fit to every group serves the coarser cuts: same mean and same covariance as fitting them alone."""
    net, x = net_and_data
    fine, coarse = LatentPCAPrior.fit(net, x, 16), LatentPCAPrior.fit(net, x, 4)
    cut = fine.marginal(len(coarse.shapes))
    assert cut.shapes == coarse.shapes and len(fine.shapes) > len(coarse.shapes)
    torch.testing.assert_close(cut.mean, coarse.mean)
    torch.testing.assert_close(cut.basis.T @ cut.basis, coarse.basis.T @ coarse.basis, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="groups must be"):
        fine.marginal(0)


def test_posthoc_sampler(net_and_data):
    net, x = net_and_data
    sampler = PosthocPriorVDVAE(net, LatentPCAPrior.fit(net, x, down_to_resolution=8))
    torch.manual_seed(1)
    a = sampler.sample(3, 0.8)
    torch.manual_seed(1)
    b = sampler.sample(3, 0.8)
    assert a.shape == (3, 1, 16, 16, 16) and torch.equal(a, b)
    assert not torch.allclose(a[0], a[1])
    torch.testing.assert_close(sampler(x), net(x))
    with pytest.raises(ValueError, match="positive"):
        sampler.sample(2, 0.0)


def test_bundle_fits_the_prior_after_training_and_inference_uses_it(tmp_path, nifti_dir):
    """train.json with latent_prior_resolution writes models/<name>_latent_prior.pt; inference.json samples the coarse
    groups from it unless use_latent_prior is false."""
    import os

    import nibabel as nib

    from scripts.vdvae.latent_prior import latent_prior_path
    from tests.test_bundle import run_bundle, tiny_overrides

    out = str(tmp_path / "train")
    run_bundle(tiny_overrides(nifti_dir, out, max_epochs=1, latent_prior_resolution=4))
    path = latent_prior_path(os.path.join(out, "model.pt"))
    state = torch.load(path, weights_only=True)
    assert state["down_to_resolution"] == 4 and len(state["shapes"]) == 4  # the 1^3 group (two), 2^3 and 4^3
    assert state["basis"].shape[0] == 8  # 9 training volumes - 1

    def sample(folder, **extra):
        opts = {
            "ckpt_path": os.path.join(out, "model.pt"),
            "output_dir": str(tmp_path / folder),
            "resolution": 16,
            **tiny_architecture(16),
            "num_samples": 2,
            "seed": 3,
            **extra,
        }
        run_bundle(opts, config_file="configs/inference.json")  # at its default temperature, 1.2
        return nib.load(str(tmp_path / folder / "sample_t1.2_00000.nii.gz")).get_fdata()

    with_prior, again, without = sample("a"), sample("b"), sample("c", use_latent_prior=False)
    assert (with_prior == again).all() and not (with_prior == without).all()
    os.remove(path)  # without the file, inference falls back to the learned priors
    assert (sample("d") == without).all()


def test_posthoc_prior_model_is_the_vdvae_but_for_sampling():
    """evaluate.json and reconstruct.json call VDVAE methods on the wrapped network."""
    net = VDVAE(16, **tiny_architecture(16)).eval()
    x = torch.rand(3, 1, 16, 16, 16) * 2 - 1
    wrapped = PosthocPriorVDVAE(net, LatentPCAPrior.fit(net, x, 2))
    assert wrapped.group_resolutions() == net.group_resolutions() and wrapped.resolution == 16
    assert torch.equal(wrapped.reconstruct(x, 4), net.reconstruct(x, 4))
    with pytest.raises(AttributeError):
        wrapped.no_such_attribute


def test_auto_sampler_follows_the_comparison_made_after_training(net_and_data, tmp_path):
    net, x = net_and_data
    prior = LatentPCAPrior.fit(net, x, 4)
    choice = choose_sampler(net, prior, num_samples=4, temperature=0.7)
    scores = choice["anatomy_score"]
    assert set(scores) == {"posthoc", "learned"} and choice["num_samples"] == 4 and choice["temperature"] == 0.7
    # the compared samples are the volumes inference.json draws at that temperature (seed 0, samples 0-3)
    score = AnatomyScore(net.resolution)
    for name, generator in (("learned", net), ("posthoc", PosthocPriorVDVAE(net, prior))):
        drawn = draw_samples(generator, 0.7, 0, range(4))
        assert scores[name] == pytest.approx(float(score.score_all(drawn).mean()), abs=1e-6)
    assert choose_sampler(net, prior, num_samples=4, temperature=1.5)["anatomy_score"] != scores
    assert choice["sampler"] == ("learned" if scores["learned"] > scores["posthoc"] else "posthoc")
    model = str(tmp_path / "model.pt")
    for sampler, auto_type in (("learned", VDVAE), ("posthoc", PosthocPriorVDVAE)):
        save_latent_prior(prior, latent_prior_path(model), 4, {**choice, "sampler": sampler})
        assert type(with_latent_prior(net, model, "auto")) is auto_type
        assert type(with_latent_prior(net, model, True)) is PosthocPriorVDVAE  # an explicit choice wins
        assert with_latent_prior(net, model, False) is net
    with pytest.raises(ValueError, match="use_latent_prior"):
        with_latent_prior(net, model, "yes")
