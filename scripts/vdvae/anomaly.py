# Copyright 2026 The VDVAE bundle authors. Licensed under the Apache License, Version 2.0.
"""Anomaly maps of a VDVAE (configs/anomaly.json): :class:`VDVAEAnomaly`, an
:class:`scripts.engine.anomaly.AnomalyDetector` that :func:`scripts.engine.anomaly.write_anomaly_maps` runs.

A batch of preprocessed volumes x (B, 1, R, R, R) on [-1, 1] gives a voxel map (B, 1, R, R, R), higher = more
anomalous, and the healed volume (B, 1, R, R, R) it was computed against; ``method``:

* ``likelihood``: per-voxel negative log-likelihood of x under the output Gaussian N(mean, scale^2), with the latent
  groups at resolutions <= ``down_to_resolution`` drawn from the posterior q(z | x) and the finer groups from the
  prior, averaged over ``num_draws`` draws (nats per voxel); healed = the mean of the output means;
* ``reconstruction``: |x - posterior-mean reconstruction|;
* ``kl``: the latent surprise at one scale, KL(q(z | x) || p(z | coarser z)) of the latent groups at ``kl_resolution``
  per latent voxel (nats per image voxel, trilinearly upsampled): the information the encoder has to add there beyond
  what the coarser latents predict. Local structure that does not fit its context (a displacement, a mass effect)
  costs information even where a reconstruction copies it; healed = the posterior-mean reconstruction.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from scripts.engine.anomaly import check_method
from scripts.vdvae.network import gaussian_kl

__all__ = ["VDVAE_METHODS", "gaussian_nll", "VDVAEAnomaly"]

VDVAE_METHODS = ("likelihood", "reconstruction", "kl")
HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Elementwise negative log-density of x under N(mean, scale^2) in nats, float32; all (B, C, *spatial)."""
    x, mean, scale = x.float(), mean.float(), scale.float()
    return HALF_LOG_2PI + torch.log(scale) + 0.5 * ((x - mean) / scale) ** 2


class VDVAEAnomaly:
    """Anomaly maps of a VDVAE (``scripts.vdvae.network.VDVAE``, or a wrapper with a ``vae`` attribute such as the
    post-hoc prior's ``PosthocPriorVDVAE``).

    Args:
        network: the trained VDVAE.
        method: "likelihood", "reconstruction" or "kl" (see the module docstring).
        down_to_resolution: ``likelihood``: the latent groups at resolutions <= this (voxels per axis) come from
            the posterior, the finer ones from the prior (the resolution of the network: every group posterior).
        num_draws: ``likelihood``: latent draws the NLL and the healed volume are averaged over.
        kl_resolution: ``kl``: the resolution (voxels per axis) of the latent groups whose KL is mapped; None: half
            the network's resolution (its second-finest latent groups: 16 at 32^3, the benchmark's choice by the
            largest shortfall on any lesion kind, docs/anomaly.md).
    """

    def __init__(
        self,
        network: nn.Module,
        method: str = "kl",
        down_to_resolution: int = 16,
        num_draws: int = 1,
        kl_resolution: int | None = None,
    ) -> None:
        self.vae = getattr(network, "vae", network)
        self.method = check_method(method, VDVAE_METHODS, "VDVAE")
        self.resolution = int(self.vae.resolution)
        self.down_to_resolution = int(down_to_resolution)
        self.posterior_groups = sum(1 for r in self.vae.group_resolutions() if r <= self.down_to_resolution)
        if self.posterior_groups < 1:
            raise ValueError(
                f"down_to_resolution {down_to_resolution} holds no latent group; choose among {sorted(set(self.vae.group_resolutions()))}"
            )
        if int(num_draws) < 1:
            raise ValueError(f"num_draws must be >= 1, got {num_draws}")
        self.num_draws = int(num_draws)
        self.kl_resolution = max(1, self.resolution // 2) if kl_resolution is None else int(kl_resolution)
        self.kl_groups = [g for g, r in enumerate(self.vae.group_resolutions()) if r == self.kl_resolution]
        if self.method == "kl" and not self.kl_groups:
            raise ValueError(
                f"kl_resolution {kl_resolution} holds no latent group; choose among {sorted(set(self.vae.group_resolutions()))}"
            )

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (B, C, R, R, R) on [-1, 1] -> {"map": (B, 1, R, R, R), "healed": (B, C, R, R, R)}, float32. With several
        channels (modalities) the reconstruction error is their mean and the NLL their sum."""
        return self.running_maps(x)[-1]

    @torch.no_grad()
    def kl_maps(self, x: torch.Tensor) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """One posterior-mean pass: {resolution: KL of the groups at that resolution per image voxel, (B, 1, R, R, R)
        float32, trilinearly upsampled} for every latent resolution, and the reconstruction (B, 1, R, R, R). The
        per-position KL is taken from the groups' prior and posterior heads (forward hooks), with
        :func:`scripts.vdvae.network.gaussian_kl`, the elementwise form of the KL the model is trained with."""
        self.vae.eval()
        outputs: dict[tuple[int, str], torch.Tensor] = {}
        handles = []
        for g, block in enumerate(self.vae.decoder_blocks):
            for head in ("prior_mean", "prior_scale", "posterior_mean", "posterior_scale"):
                if hasattr(block, head):
                    hook = lambda _m, _i, out, key=(g, head): outputs.__setitem__(key, out)  # noqa: E731
                    handles.append(getattr(block, head).register_forward_hook(hook))
        try:
            mean, _, _ = self.vae.decode(
                self.vae.encode(x), x.shape[0], self.vae.num_latent_groups, sample_posterior=False
            )
        finally:
            for h in handles:
                h.remove()
        maps: dict[int, torch.Tensor] = {}
        for g, (block, r) in enumerate(zip(self.vae.decoder_blocks, self.vae.group_resolutions())):
            mu_q, scale_q = (
                outputs[(g, "posterior_mean")].float(),
                block._scale(outputs[(g, "posterior_scale")].float()),
            )
            if (g, "prior_mean") in outputs:
                mu_p, scale_p = outputs[(g, "prior_mean")].float(), block._scale(outputs[(g, "prior_scale")].float())
            else:  # the top group: N(0, I)
                mu_p, scale_p = torch.zeros_like(mu_q), torch.ones_like(mu_q)
            kl = gaussian_kl(mu_q, scale_q, mu_p, scale_p).sum(1, keepdim=True) / (self.resolution // r) ** 3
            if r < self.resolution:
                kl = F.interpolate(kl, size=x.shape[2:], mode="trilinear", align_corners=False)
            maps[r] = maps[r] + kl if r in maps else kl
        return maps, mean.float()

    @torch.no_grad()
    def running_maps(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """What :meth:`__call__` returns after each of the ``num_draws`` draws (running means; one entry for
        ``reconstruction``): the benchmark measures several draw counts from one pass."""
        self.vae.eval()
        if self.method == "kl":
            maps, mean = self.kl_maps(x)
            return [{"map": maps[self.kl_resolution], "healed": mean}]
        laterals = self.vae.encode(x)
        b = x.shape[0]
        if self.method == "reconstruction":
            mean, _, _ = self.vae.decode(laterals, b, self.vae.num_latent_groups, sample_posterior=False)
            error = (x.float() - mean.float()).abs().mean(1, keepdim=True)  # over the channels (modalities)
            return [{"map": error, "healed": mean.float()}]
        nll = torch.zeros_like(x[:, :1], dtype=torch.float32)
        healed = torch.zeros_like(x, dtype=torch.float32)
        out = []
        for d in range(1, self.num_draws + 1):
            mean, scale, _ = self.vae.decode(
                laterals, b, self.posterior_groups, sample_posterior=True, sample_prior=True
            )
            nll += gaussian_nll(x, mean, scale).sum(1, keepdim=True)  # summed over the channels (modalities)
            healed += mean.float()
            out.append({"map": nll / d, "healed": healed / d})
        return out

    def describe(self) -> dict:
        d = {"family": "vdvae", "method": self.method}
        if self.method == "likelihood":
            d.update(down_to_resolution=self.down_to_resolution, num_draws=self.num_draws, map_units="nats per voxel")
        elif self.method == "kl":
            d.update(kl_resolution=self.kl_resolution, map_units="nats per voxel (latent KL at kl_resolution)")
        else:
            d.update(map_units="absolute difference on the [-1, 1] scale")
        return d
