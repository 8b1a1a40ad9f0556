import math

import numpy as np
import pytest
import torch

from scripts.vdvae.loss import ELBOLoss, discretized_gaussian_nll, gaussian_nll, negative_elbo_terms
from scripts.vdvae.network import VDVAE
from tests.conftest import tiny_architecture


def _bin_probability(lo: float, hi: float) -> float:
    """Phi(hi) - Phi(lo) for standardised edges, via erfc on the tail side (accurate far from the mean)."""
    if lo > 0:
        return 0.5 * (math.erfc(lo / math.sqrt(2)) - math.erfc(hi / math.sqrt(2)))
    return 0.5 * (math.erfc(-hi / math.sqrt(2)) - math.erfc(-lo / math.sqrt(2)))


def test_discretized_likelihood_matches_direct_computation():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 3, 3, 3) * 2 - 1
    x[0, 0, 0, 0, 0] = -1.0  # first bin: open to -inf
    x[1, 0, 0, 0, 0] = 1.0  # last bin: open to +inf
    mean = torch.rand_like(x) * 2 - 1
    scale = torch.rand_like(x) * 0.2 + 0.1  # bins up to ~20 sd away: tiny but representable probabilities
    got = discretized_gaussian_nll(x, mean, scale)
    expected = []
    for b in range(2):
        total = 0.0
        for xv, m, s in zip(x[b].flatten().tolist(), mean[b].flatten().tolist(), scale[b].flatten().tolist()):
            k = round((xv + 1) * 127.5)  # bin index 0..255
            lo = -math.inf if k == 0 else -1 + (2 * k - 1) / 255
            hi = math.inf if k == 255 else -1 + (2 * k + 1) / 255
            total -= math.log(_bin_probability((lo - m) / s, (hi - m) / s))
        expected.append(total)
    assert torch.allclose(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-4)


def test_gaussian_nll_matches_torch_and_units():
    x = torch.rand(2, 1, 4, 4, 4) * 2 - 1
    mean, scale = torch.zeros_like(x), torch.full_like(x, 0.5)
    ref = -torch.distributions.Normal(mean, scale).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(gaussian_nll(x, mean, scale), ref, atol=1e-4)
    kl = torch.tensor([[1.0, 2.0], [0.0, 3.0]])
    terms = negative_elbo_terms(x, mean, scale, kl)
    assert torch.allclose(terms["neg_elbo_nats"], (ref + kl.sum(1)) / 64, atol=1e-5)
    # sharp, correct predictions: continuous density > 1, so nats/voxel is negative; bits stay positive
    sharp = negative_elbo_terms(x, x, torch.full_like(x, 0.01), torch.zeros(2, 1))
    assert (sharp["neg_elbo_nats"] < 0).all()
    assert (sharp["neg_elbo_bits"] > 0).all() and (sharp["neg_elbo_bits"] <= 8).all()


def test_loss_options():
    net = VDVAE(8, **tiny_architecture(8))
    x = torch.rand(2, 1, 8, 8, 8) * 2 - 1
    mean, scale, kl = net.forward_train(x)
    base = ELBOLoss()(x, mean, scale, kl)
    assert torch.allclose(base["loss"], base["nll"] + base["kl"])
    warm = ELBOLoss(kl_warmup_steps=10)(x, mean, scale, kl, step=5)
    assert torch.allclose(warm["loss"], base["nll"] + 0.5 * base["kl"])
    l2 = ELBOLoss(net, l2_reg_coeff=1e-2)(x, mean, scale, kl)
    assert l2["loss"] > base["loss"] and l2["l2"] > 0
    free = ELBOLoss(net, free_bits=10.0)(x, mean, scale, kl)
    floor = 10.0 * sum(net.latent_dims_per_group())
    assert free["loss"].item() == pytest.approx(base["nll"].item() + floor, rel=1e-5)
    assert torch.allclose(free["neg_elbo_nats"], base["neg_elbo_nats"])  # logged ELBO never sees free bits
    with pytest.raises(ValueError):
        ELBOLoss(l2_reg_coeff=1e-4)  # needs the network


def test_elbo_decreases_on_tiny_data():
    torch.manual_seed(0)
    net = VDVAE(8, **tiny_architecture(8))
    loss_fn = ELBOLoss(net, l2_reg_coeff=1e-4)
    opt = torch.optim.Adamax(net.parameters(), lr=3e-3)
    g = np.random.default_rng(0)
    data = torch.tensor(g.uniform(-1, 1, (4, 1, 8, 8, 8)), dtype=torch.float32)
    data[:, :, 2:6, 2:6, 2:6] = 0.8  # shared structure
    first = None
    for _ in range(80):
        mean, scale, kl = net.forward_train(data)
        out = loss_fn(data, mean, scale, kl)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        first = first if first is not None else out["neg_elbo_nats"].item()
    final = net.elbo(data)["neg_elbo_nats"].mean().item()
    assert final < first - 0.1, (first, final)
