import math

import pytest
import torch

from scripts.vdvae.network import VDVAE, VDVAETrainingStep, gaussian_kl
from tests.conftest import reference_architecture, tiny_architecture


@pytest.mark.parametrize("resolution", [8, 16, 32])
def test_shapes(resolution):
    torch.manual_seed(0)
    net = VDVAE(resolution, **tiny_architecture(resolution))
    x = torch.rand(2, 1, resolution, resolution, resolution) * 2 - 1
    recon = net(x)
    assert isinstance(recon, torch.Tensor) and recon.shape == x.shape
    assert recon.abs().max() <= 1.0  # tanh output
    mean, scale, kl = net.forward_train(x)
    assert mean.shape == scale.shape == x.shape
    assert kl.shape == (2, net.num_latent_groups)
    assert (scale >= 0.01).all() and (scale <= 1.0).all()
    assert (kl >= 0).all()
    assert net.sample(3, 0.5).shape == (3, 1, resolution, resolution, resolution)


@pytest.mark.parametrize(
    "resolution, expected, groups",
    [(32, 10_335_682, 17), (64, 19_267_582, 23), (128, 32_749_282, 30)],
)
def test_parameter_count_equals_the_reference(resolution, expected, groups):
    """The reference's example configurations: 10,335,682 and 19,267,582 parameters as the reference counts them;
    at 128^3 the count of this (reference-exact) architecture, "about 32.8M" in the reference's documentation."""
    net = VDVAE(resolution, **reference_architecture(resolution))
    assert sum(p.numel() for p in net.parameters()) == expected
    assert net.num_latent_groups == groups


def test_sampling_is_deterministic_for_a_seed_and_temperature_matters():
    net = VDVAE(16, **tiny_architecture(16))
    # make the prior non-trivial so that samples differ
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    a = net.sample(2, 1.0, generator_seed=3)
    b = net.sample(2, 1.0, generator_seed=3)
    c = net.sample(2, 1.0, generator_seed=4)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    cold1 = net.sample(2, 1e-6, generator_seed=1)
    cold2 = net.sample(2, 1e-6, generator_seed=2)
    assert torch.allclose(cold1, cold2, atol=1e-4)  # T -> 0 removes the randomness
    with pytest.raises(ValueError, match="temperature"):
        net.sample(1, 0.0)
    with pytest.raises(ValueError, match="number of samples"):
        net.sample(0)


def test_progressive_reconstruction_uses_posterior_down_to_resolution():
    torch.manual_seed(0)
    net = VDVAE(16, **tiny_architecture(16))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.rand(1, 1, 16, 16, 16) * 2 - 1
    full = net.reconstruct(x)
    assert torch.allclose(full, net(x))
    assert torch.allclose(net.reconstruct(x, 16), full)
    coarse = net.reconstruct(x, 1)
    assert not torch.allclose(coarse, full)
    # with the prior alone below 1^3, the result depends on x only through the top group
    other = torch.rand(1, 1, 16, 16, 16) * 2 - 1
    assert not torch.allclose(net.reconstruct(other, 1), coarse)


def test_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mq, mp = torch.randn(5, 3), torch.randn(5, 3)
    sq, sp = torch.rand(5, 3) + 0.1, torch.rand(5, 3) + 0.1
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mq, sq), torch.distributions.Normal(mp, sp))
    assert torch.allclose(gaussian_kl(mq, sq, mp, sp), ref, atol=1e-6)


def test_training_step_wrapper_shares_parameters():
    net = VDVAE(8, **tiny_architecture(8))
    step = VDVAETrainingStep(net)
    assert {id(p) for p in step.parameters()} == {id(p) for p in net.parameters()}
    out = step(torch.zeros(1, 1, 8, 8, 8))
    assert len(out) == 3


def test_wrong_input_shape_is_reported():
    net = VDVAE(8, **tiny_architecture(8))
    with pytest.raises(ValueError, match=r"expects input of shape \(B, 1, 8, 8, 8\)"):
        net(torch.zeros(1, 1, 16, 16, 16))


@pytest.mark.parametrize("resolution", [0, 12, 24, 100])
def test_non_power_of_two_resolution(resolution):
    with pytest.raises(ValueError, match="resolution must be a power of two"):
        VDVAE(resolution, **tiny_architecture(16))


def test_wrong_list_length_names_the_option():
    arch = tiny_architecture(16)
    arch["channels_per_latent"] = arch["channels_per_latent"][:-1]
    with pytest.raises(ValueError, match=r"channels_per_latent must have log2\(resolution\) \+ 1 = 5 entries"):
        VDVAE(16, **arch)


@pytest.mark.parametrize("groups", [[1, 1, 1, 1, 0], [1, 0, 1, 1, 1]])
def test_bad_kernel_size_and_level_without_latents(groups):
    arch = tiny_architecture(16)
    arch["kernel_sizes_top_down"] = [5, 3, 3, 2, 1]
    with pytest.raises(ValueError, match="kernel_sizes"):
        VDVAE(16, **arch)
    arch = tiny_architecture(16)
    arch["latent_feature_maps_per_resolution"] = groups
    with pytest.raises(
        ValueError, match="latent_feature_maps_per_resolution entries must be >= 1 \\(every level needs a latent group"
    ):
        VDVAE(16, **arch)


def test_torchscript_matches_eager():
    torch.manual_seed(0)
    net = VDVAE(16, **tiny_architecture(16)).eval()
    scripted = torch.jit.script(net)
    x = torch.rand(2, 1, 16, 16, 16) * 2 - 1
    assert torch.allclose(scripted(x), net(x), atol=1e-6)


def _loss_and_grads(net, x, seed):
    from scripts.vdvae.loss import ELBOLoss

    torch.manual_seed(seed)
    net.zero_grad(set_to_none=True)
    mean, scale, kl = net.forward_train(x)
    loss = ELBOLoss()(x, mean, scale, kl)["loss"]
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in net.parameters()]


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    """Checkpointed blocks recompute with the same noise, so loss and gradients match the stored-activation run."""
    torch.manual_seed(0)
    net = VDVAE(16, **tiny_architecture(16)).train()
    x = torch.rand(2, 1, 16, 16, 16) * 2 - 1
    loss_plain, grads_plain = _loss_and_grads(net, x, seed=3)
    net.set_activation_checkpointing(True)
    assert sum(getattr(m, "activation_checkpointing", False) for m in net.modules()) > 5
    loss_ckpt, grads_ckpt = _loss_and_grads(net, x, seed=3)
    assert torch.equal(loss_plain, loss_ckpt)
    for g_plain, g_ckpt in zip(grads_plain, grads_ckpt):
        assert torch.allclose(g_plain, g_ckpt, rtol=1e-5, atol=1e-7)
    # a different seed draws other latents: the check above could fail
    loss_other, _ = _loss_and_grads(net, x, seed=4)
    assert not torch.equal(loss_plain, loss_other)
    # still scriptable for ckpt_export, and inference is unaffected
    scripted = torch.jit.script(net.eval())
    assert torch.allclose(scripted(x), net(x), atol=1e-6)


def test_noise_follows_the_channels_last_layout():
    from scripts.vdvae.network import standard_normal_like

    t = torch.zeros(2, 6, 4, 4, 4).contiguous(memory_format=torch.channels_last_3d)[:, :3]
    noise = standard_normal_like(t)
    assert noise.shape == t.shape and noise.dtype == torch.float32
    assert noise.is_contiguous(memory_format=torch.channels_last_3d)
    assert standard_normal_like(torch.zeros(2, 3, 4, 4, 4)).is_contiguous()
    assert 0.8 < float(standard_normal_like(torch.zeros(4, 8, 8, 8, 8)).std()) < 1.2
    torch.manual_seed(0)
    a = standard_normal_like(t)
    torch.manual_seed(0)
    assert torch.equal(a, standard_normal_like(torch.zeros(2, 3, 4, 4, 4)))  # same values in either layout


def test_fused_kl_per_volume_matches_autograd_of_the_elementwise_kl():
    from scripts.vdvae.network import gaussian_kl_per_volume

    torch.manual_seed(0)
    shape = (3, 4, 5, 5, 5)
    leaves = [torch.randn(shape), torch.rand(shape) + 0.05, torch.randn(shape), torch.rand(shape) + 0.05]
    a = [t.clone().requires_grad_(True) for t in leaves]
    b = [t.clone().requires_grad_(True) for t in leaves]
    weights = torch.tensor([1.0, -2.0, 0.5])
    fused = gaussian_kl_per_volume(*a)
    plain = gaussian_kl(*b).sum(dim=(1, 2, 3, 4))
    assert torch.allclose(fused, plain, rtol=1e-5)
    (fused * weights).sum().backward()
    (plain * weights).sum().backward()
    for x, y, leaf in zip(a, b, leaves):
        assert torch.allclose(x.grad, y.grad, rtol=1e-4, atol=1e-5)
        assert torch.equal(x.detach(), leaf)  # the inputs are never written into
    # bfloat16 inputs give float32 KL and bfloat16 gradients
    c = [t.to(torch.bfloat16).requires_grad_(True) for t in leaves]
    out = gaussian_kl_per_volume(*c)
    out.sum().backward()
    assert out.dtype == torch.float32 and c[1].grad.dtype == torch.bfloat16


def test_kl_divides_by_the_floored_prior_variance():
    """Prior scales below sqrt(1e-5) divide by 1e-5, as in the reference; the fused KL's gradients there equal
    autograd's through the clamp (zero through the floored variance)."""
    from scripts.vdvae.network import gaussian_kl_per_volume

    mq, sq, mp = torch.tensor([0.3]), torch.tensor([0.01]), torch.tensor([0.1])
    for sp in (0.001, 0.5):
        expected = 0.5 * ((0.01**2 + 0.2**2) / max(sp**2, 1e-5) - 1) + math.log(sp / 0.01)
        assert float(gaussian_kl(mq, sq, mp, torch.tensor([sp]))) == pytest.approx(expected, rel=1e-5)
    torch.manual_seed(1)
    shape = (2, 3, 4, 4, 4)
    leaves = [
        torch.randn(shape),
        torch.rand(shape) * 0.01 + 0.001,
        torch.randn(shape),
        torch.rand(shape) * 0.006 + 0.001,
    ]
    a = [t.clone().requires_grad_(True) for t in leaves]
    b = [t.clone().requires_grad_(True) for t in leaves]
    fused, plain = gaussian_kl_per_volume(*a), gaussian_kl(*b).sum(dim=(1, 2, 3, 4))
    assert torch.allclose(fused, plain, rtol=1e-5)
    fused.sum().backward()
    plain.sum().backward()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("mode", ["latent", "std"])
def test_temperature_mode_definition(monkeypatch, mode):
    """A prior draw at temperature T is T * (mu + sigma * eps) ("latent", the reference's) or mu + T * sigma * eps
    ("std"); the top group draws T * eps either way."""
    import scripts.vdvae.network as networks

    torch.manual_seed(0)
    net = VDVAE(8, **tiny_architecture(8), temperature_mode=mode)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    eps_value = 0.7
    monkeypatch.setattr(networks, "standard_normal_like", lambda t: torch.full(t.shape, eps_value))
    T = 0.4
    top, block = net.decoder_blocks[0], net.decoder_blocks[1]
    h0 = torch.zeros(1, net.top_channels, 1, 1, 1)
    h1, _, z_top = top(h0, h0, False, True, T)
    torch.testing.assert_close(z_top, torch.full((1, top.latent_channels, 1, 1, 1), T * eps_value))
    torch.testing.assert_close(h1, top.z_proj(z_top))
    h = torch.randn(1, 8, 4, 4, 4)
    out, kl, z_drawn = block(h, h, False, True, T)
    feats = block.prior(h)
    mu, sigma = block.prior_mean(feats), block._scale(block.prior_scale(feats))
    z = T * (mu + sigma * eps_value) if mode == "latent" else mu + T * sigma * eps_value
    torch.testing.assert_close(z_drawn, z)
    torch.testing.assert_close(out, block.z_proj(z) + block.prior_skip(feats) + block.skip(h))
    assert torch.equal(kl, torch.zeros(1))


@pytest.mark.parametrize("option", [False, True])
def test_full_resolution_residual_option(option):
    """The reference's full-resolution decoder residual blocks have no skip and unscaled last convolutions; the
    option gives them the identity skip and the depth scaling of every other block."""
    torch.manual_seed(0)
    net = VDVAE(8, **tiny_architecture(8), full_resolution_residual=option)
    full_res = [r for r, lvl in zip(net.decoder_resblocks, net.group_levels) if lvl == 0]
    lower = [r for r, lvl in zip(net.decoder_resblocks, net.group_levels) if lvl > 0]
    assert full_res and lower
    assert all((r.skip is not None) == option for r in full_res)
    assert all(r.skip is not None for r in lower)
    x = torch.randn(1, 8, 8, 8, 8)
    block = full_res[0]
    expected = block.out(block.stack(x)) + (x if option else 0)
    torch.testing.assert_close(block(x), expected)


def test_shared_output_scale_follows_the_rms_error_in_training_only(tmp_path):
    torch.manual_seed(0)
    net = VDVAE(8, **tiny_architecture(8), shared_x_scale=True, scale_output_clamp_bounds=(0.01, 1.0))
    assert "x_scale" in net.state_dict() and "x_scale" not in VDVAE(8, **tiny_architecture(8)).state_dict()
    x = torch.rand(3, 1, 8, 8, 8) * 2 - 1
    net.train()
    mean, scale, _ = net.forward_train(x)
    rmse = float((x - mean).pow(2).mean().sqrt())
    assert float(net.x_scale) == pytest.approx(0.9 * 1.0 + 0.1 * rmse, rel=1e-5)  # momentum 0.1 from 1.0
    assert torch.all(scale == net.x_scale)  # one scale for every voxel
    for _ in range(200):
        mean, _, _ = net.forward_train(x)
    assert float(net.x_scale) == pytest.approx(float((x - mean).pow(2).mean().sqrt()), rel=0.05)
    frozen = float(net.x_scale)
    net.eval()
    terms = net.elbo(x)  # evaluation uses the fitted scale and leaves it alone: a proper bound
    assert float(net.x_scale) == frozen and torch.isfinite(terms["neg_elbo_nats"]).all()
    net.train()  # a non-finite batch (whose update the trainer skips) leaves the scale alone too
    net.forward_train(torch.full_like(x, float("nan")))
    assert float(net.x_scale) == frozen
    # 'false' from the command line is refused, not read as true
    with pytest.raises(ValueError, match="shared_x_scale must be True or False, got 'false'"):
        VDVAE(8, **tiny_architecture(8), shared_x_scale="false")
    # weights of the other output scale are named as such
    from scripts.engine.sampling import load_weights

    path = str(tmp_path / "per_voxel.pt")
    torch.save(VDVAE(8, **tiny_architecture(8)).state_dict(), path)
    with pytest.raises(ValueError, match="per-voxel output scale; pass --shared_x_scale False"):
        load_weights(net, path, "cpu")
