# Copyright 2026 The VDVAE bundle authors. Licensed under the Apache License, Version 2.0.
"""ELBO loss and likelihood units.

Units (both are per voxel, so they compare across resolutions):

* ``neg_elbo_nats``: negative ELBO in nats per voxel of the *continuous* Gaussian density on the [-1, 1]
  scale: (-log N(x; mu, sigma) summed over voxels + KL) / voxels. A density can exceed 1, so this can be
  negative; it is what training minimises.
* ``neg_elbo_bits``: negative ELBO in bits per voxel when the same Gaussian is discretised to 256 equal bins
  over [-1, 1] (data rounded to the bin centres, the two edge bins open to +-infinity, as for 8-bit images in
  Child 2021): (-log2 P(x_bin) summed + KL / ln 2) / voxels. Always positive and at most 8 + KL bits for a
  sensible model; comparable across models that share this bundle's preprocessing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["ELBOLoss", "gaussian_nll", "discretized_gaussian_nll", "negative_elbo_terms"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
NUM_BINS = 256


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """-log N(x; mean, scale^2) summed per volume: (B, C, D, H, W) -> (B,), in nats."""
    z = (x.float() - mean.float()) / scale.float()
    return (_HALF_LOG_2PI + torch.log(scale.float()) + 0.5 * z * z).flatten(1).sum(1)


def discretized_gaussian_nll(x: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """-log P(bin of x) for the Gaussian discretised to 256 bins over [-1, 1], summed per volume, in nats.

    Computed in float64 with log-CDFs on the tail side of the mean, so far-off bins keep their (tiny)
    probabilities instead of rounding to zero. For reporting only (no gradient)."""
    with torch.no_grad():
        half_bin = 1.0 / (NUM_BINS - 1)
        x = torch.round((x.double().clamp(-1, 1) + 1) * (NUM_BINS - 1) / 2) * 2 / (NUM_BINS - 1) - 1
        mean, scale = mean.double(), scale.double()
        inf = torch.full_like(x, float("inf"))
        upper = torch.where(x > 1 - half_bin, inf, (x + half_bin - mean) / scale)  # standardised bin edges
        lower = torch.where(x < -1 + half_bin, -inf, (x - half_bin - mean) / scale)
        # P = Phi(upper) - Phi(lower) = Phi(-lower) - Phi(-upper): use the side where both CDFs are small
        flip = lower > 0
        b = torch.where(flip, -lower, upper)
        a = torch.where(flip, -upper, lower)
        log_b, log_a = torch.special.log_ndtr(b), torch.special.log_ndtr(a)
        log_p = log_b + torch.log1p(-torch.exp(log_a - log_b).clamp(max=1 - 1e-16))
        return -log_p.flatten(1).sum(1).float()


def negative_elbo_terms(
    x: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor, kl: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-volume figures (each (B,)): ``neg_elbo_nats`` and ``neg_elbo_bits`` (per voxel, see module doc),
    ``nll`` and ``kl`` (nats per volume), and ``kl_per_group`` (B, G) in nats per volume."""
    voxels = x[0].numel()
    nll = gaussian_nll(x, mean, scale)
    kl_total = kl.sum(1)
    disc = discretized_gaussian_nll(x, mean, scale)
    return {
        "neg_elbo_nats": (nll + kl_total) / voxels,
        "neg_elbo_bits": (disc + kl_total) / (voxels * math.log(2)),
        "nll": nll,
        "kl": kl_total,
        "kl_per_group": kl,
    }


class ELBOLoss(nn.Module):
    """Negative ELBO per volume (Gaussian NLL + analytic KLs), batch mean, plus an optional L2 weight penalty.

    Args:
        network: the model whose weights the L2 penalty covers (``l2_reg_coeff * sum over weights of mean(W^2)``,
            as in the reference); may be None when ``l2_reg_coeff`` is 0.
        l2_reg_coeff: L2 penalty coefficient (reference: 1e-4).
        beta: weight of the KL term (1 = the ELBO).
        kl_warmup_steps: KL weight grows linearly from 0 to ``beta`` over this many steps (0 = off).
        free_bits: minimum KL, in nats per latent dimension (channel x voxel), of each latent group's batch-mean
            KL (0 = off; Kingma et al. 2016). Only the loss sees it; the logged ELBO never does.

    Call with ``(x, mean, scale, kl_per_group, step)``; returns a dict with ``loss`` (scalar to minimise) and
    the batch means of the figures of :func:`negative_elbo_terms`.
    """

    def __init__(
        self,
        network: nn.Module | None = None,
        l2_reg_coeff: float = 0.0,
        beta: float = 1.0,
        kl_warmup_steps: int = 0,
        free_bits: float = 0.0,
        latent_dims_per_group: Iterable[int] | None = None,
    ) -> None:
        super().__init__()
        if l2_reg_coeff < 0 or beta < 0 or kl_warmup_steps < 0 or free_bits < 0:
            raise ValueError("l2_reg_coeff, beta, kl_warmup_steps and free_bits must be >= 0")
        if l2_reg_coeff > 0 and network is None:
            raise ValueError("ELBOLoss needs `network` when l2_reg_coeff > 0")
        self.l2_reg_coeff = float(l2_reg_coeff)
        self.beta = float(beta)
        self.kl_warmup_steps = int(kl_warmup_steps)
        self.free_bits = float(free_bits)
        self._weights = (
            [p for n, p in network.named_parameters() if n.endswith("weight")] if network is not None else []
        )
        if latent_dims_per_group is None and network is not None and hasattr(network, "latent_dims_per_group"):
            latent_dims_per_group = network.latent_dims_per_group()
        self.latent_dims = list(latent_dims_per_group) if latent_dims_per_group is not None else None

    def kl_weight(self, step: int) -> float:
        if self.kl_warmup_steps <= 0:
            return self.beta
        return self.beta * min(1.0, step / self.kl_warmup_steps)

    def forward(
        self, x: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor, kl_per_group: torch.Tensor, step: int = 0
    ) -> dict[str, torch.Tensor]:
        terms = negative_elbo_terms(x, mean, scale, kl_per_group)
        kl_groups = kl_per_group.mean(0)  # (G,) batch mean per group
        if self.free_bits > 0:
            if self.latent_dims is None:
                raise ValueError("free_bits needs the latent dimensions of each group (pass `network`)")
            floor = self.free_bits * torch.tensor(self.latent_dims, dtype=kl_groups.dtype, device=kl_groups.device)
            kl_for_loss = torch.maximum(kl_groups, floor).sum()
        else:
            kl_for_loss = kl_groups.sum()
        loss = terms["nll"].mean() + self.kl_weight(step) * kl_for_loss
        l2 = torch.zeros((), device=loss.device)
        if self.l2_reg_coeff > 0:
            l2 = self.l2_reg_coeff * sum(w.float().pow(2).mean() for w in self._weights)
            loss = loss + l2
        out = {k: v.mean(0) for k, v in terms.items()}
        out["loss"] = loss
        out["l2"] = l2
        return out
