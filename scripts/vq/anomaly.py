# Copyright 2026 The VDVAE bundle authors. Licensed under the Apache License, Version 2.0.
"""Anomaly maps of a VQ-VAE and its prior (configs/vq_anomaly.json): :class:`VQAnomaly`, an
:class:`scripts.engine.anomaly.AnomalyDetector` that :func:`scripts.engine.anomaly.write_anomaly_maps` runs.

A batch of preprocessed volumes x (B, 1, R, R, R) on [-1, 1] gives a voxel map (B, 1, R, R, R), higher = more
anomalous, and the healed volume (B, 1, R, R, R) it was computed against; ``method``:

* ``resample`` (Pinaya et al. 2022): tokens whose probability under the prior falls below ``threshold`` are resampled
  from the prior, the grid is decoded (healed) and the map is |x - healed|;
* ``reconstruction``: |x - VQ-VAE reconstruction|.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scripts.engine.anomaly import check_method
from scripts.vq.networks import AutoregressivePrior

__all__ = ["VQ_METHODS", "VQAnomaly"]

VQ_METHODS = ("resample", "reconstruction")


class VQAnomaly:
    """Anomaly maps of a VQ-VAE and a prior over its tokens (``scripts.vq.networks.VQGenerator``).

    Args:
        generator: the VQ-VAE (``generator.vqvae``) and its prior (``generator.prior``), autoregressive or absorbing.
        method: "resample" or "reconstruction" (see the module docstring).
        threshold: ``resample``: tokens with a probability below this under the prior are resampled (0.01: the
            benchmark's choice by the largest shortfall on any lesion kind, docs/anomaly.md).
        temperature: ``resample``: temperature of the replacement draws.
        mask_groups: absorbing prior only: the token probabilities are those of each token given the others, with
            every ``mask_groups``-th token masked at a time (``mask_groups`` denoiser passes per volume).
    """

    def __init__(
        self,
        generator: nn.Module,
        method: str = "resample",
        threshold: float = 0.01,
        temperature: float = 1.0,
        mask_groups: int = 8,
    ) -> None:
        self.vqvae, self.prior = generator.vqvae, generator.prior
        self.method = check_method(method, VQ_METHODS, "VQ family")
        if self.vqvae.spatial_dims != 3 or self.vqvae.in_channels != 1:
            raise ValueError(
                f"anomaly maps need a 3-D, single-channel VQ-VAE (spatial_dims 3, in_channels 1), got spatial_dims "
                f"{self.vqvae.spatial_dims}, in_channels {self.vqvae.in_channels}"
            )
        if not 0.0 < float(threshold) < 1.0:
            raise ValueError(f"threshold must be a probability in (0, 1), got {threshold}")
        self.threshold = float(threshold)
        self.temperature = float(temperature)
        self.mask_groups = int(mask_groups)
        self.autoregressive = isinstance(self.prior, AutoregressivePrior)
        self.resolution = int(self.vqvae.resolution)
        self.last_resampled_fraction: torch.Tensor | None = None  # (B,) of the last call

    @torch.no_grad()
    def token_probabilities(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, *grid) tokens -> (B, *grid) probability of each token under the prior: given the tokens before it in
        the prior's ordering (autoregressive, exact), or given all the others (absorbing, ``mask_groups`` passes)."""
        b = tokens.shape[0]
        flat = tokens.reshape(b, -1)
        if self.autoregressive:
            seq_p = torch.exp(-self.prior.token_nll(tokens))  # (B, L) in sequence order
            probs = torch.empty_like(seq_p)
            probs[:, self.prior.order] = seq_p
            return probs.reshape(tokens.shape)
        probs = torch.empty(flat.shape, dtype=torch.float32, device=flat.device)
        index = torch.arange(flat.shape[1], device=flat.device)
        for g in range(self.mask_groups):
            sel = index % self.mask_groups == g
            masked = flat.clone()
            masked[:, sel] = self.prior.mask_id
            logp = F.log_softmax(self.prior.denoiser(masked).float(), dim=-1)  # (B, L, K)
            probs[:, sel] = logp.gather(-1, flat[..., None])[..., 0][:, sel].exp()
        return probs.reshape(tokens.shape)

    @torch.no_grad()
    def resample(self, tokens: torch.Tensor, flagged: torch.Tensor) -> torch.Tensor:
        """(B, *grid) tokens, (B, *grid) bool -> tokens with the ``flagged`` ones drawn anew from the prior. The
        autoregressive prior draws them in its ordering, each given the (already healed) tokens before it: one
        transformer pass over the prefix per flagged token, volume by volume (a batch would pay for the union of
        the flagged positions)."""
        if not self.autoregressive:
            return self.prior.sample(tokens.shape[0], self.temperature, known=tokens, known_mask=~flagged)
        prior, k = self.prior, self.prior.num_embeddings
        seq = prior._sequence(tokens).clone()  # (B, L) in sequence order
        flag = prior._sequence(flagged)
        for b in range(seq.shape[0]):
            for i in torch.nonzero(flag[b]).flatten().tolist():
                inputs = F.pad(seq[b : b + 1, :i], (1, 0), value=k)  # begin-of-sequence token + prefix: (1, i + 1)
                logits = prior.transformer(inputs).float()[0, -1, :k] / self.temperature
                seq[b, i] = torch.multinomial(F.softmax(logits, dim=-1), 1)[0]
        out = torch.empty_like(seq)
        out[:, prior.order] = seq
        return out.reshape(tokens.shape)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (B, 1, R, R, R) on [-1, 1] -> {"map": (B, 1, R, R, R), "healed": (B, 1, R, R, R)}, float32."""
        self.vqvae.eval()
        self.prior.eval()
        tokens = self.vqvae.tokens(x)
        if self.method == "resample":
            flagged = self.token_probabilities(tokens) < self.threshold
            self.last_resampled_fraction = flagged.flatten(1).float().mean(1)
            tokens = self.resample(tokens, flagged)
        healed = self.vqvae.decode_tokens(tokens).float().clamp(-1.0, 1.0)
        return {"map": (x.float() - healed).abs(), "healed": healed}

    def describe(self) -> dict:
        d = {
            "family": "vq",
            "method": self.method,
            "prior": "autoregressive" if self.autoregressive else "absorbing",
            "map_units": "absolute difference on the [-1, 1] scale",
        }
        if self.method == "resample":
            d.update(threshold=self.threshold, temperature=self.temperature)
        return d
