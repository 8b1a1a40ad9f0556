# Copyright 2026 The VDVAE bundle authors. Licensed under the Apache License, Version 2.0.
"""The 3D very deep hierarchical VAE (Child 2021, as streamlined for 3D by Gray et al. 2022).

With its defaults, :class:`VDVAE` computes exactly the function of the reference implementation
(``3d_very_deep_vae``, tested against its numbers in ``tests/test_reference_parity.py``), and
:func:`scripts.vdvae.reference.convert_reference_state_dict` loads the reference's checkpoints into it.

Resolution ``2**k`` per axis. Every per-level list has ``k + 1`` entries, full resolution first and the 1^3
level last. The encoder runs bottom-up with two residual blocks per level (nearest subsampling between levels);
the decoder runs top-down from 1^3 (nearest x2 upsampling between levels), and at every level holds
``latent_feature_maps_per_resolution[i]`` latent groups, each a :class:`TopDownBlock` (prior p(z|h), posterior
q(z|x,h)) followed by a :class:`ResBlock`. A Gaussian head gives a mean and a scale per voxel for data scaled to
[-1, 1]. Every convolution is preceded by a GELU.

``forward(x)`` returns only the reconstruction mean (B, 1, D, H, W), so the Model Zoo's shape and TorchScript
checks apply; :meth:`VDVAE.forward_train` returns what the ELBO needs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from scripts.engine.metrics import summary
from scripts.vdvae.loss import negative_elbo_terms

__all__ = [
    "VDVAE",
    "VDVAETrainingStep",
    "ResBlock",
    "TopDownBlock",
    "TopLatentBlock",
    "gaussian_kl",
    "gaussian_kl_per_volume",
    "standard_normal_like",
    "TEMPERATURE_MODES",
]

ARCHITECTURE_LISTS = (
    "channels",
    "channels_hidden",
    "channels_top_down",
    "channels_hidden_top_down",
    "channels_per_latent",
    "latent_feature_maps_per_resolution",
    "kernel_sizes_bottom_up",
    "kernel_sizes_top_down",
)

PRIOR_VARIANCE_FLOOR = 1e-5  # the reference's KL divides by max(prior variance, 1e-5)

# "latent": z = T * (mu_p + sigma_p * eps), the reference's; "std": z = mu_p + T * sigma_p * eps (Child 2021)
TEMPERATURE_MODES = ("latent", "std")


def gaussian_kl(
    mu_q: torch.Tensor,
    scale_q: torch.Tensor,
    mu_p: torch.Tensor,
    scale_p: torch.Tensor,
    variance_floor: float = PRIOR_VARIANCE_FLOOR,
) -> torch.Tensor:
    """Elementwise KL(N(mu_q, scale_q^2) || N(mu_p, scale_p^2)) with the reference's floor on the prior variance:
    ((scale_q^2 + (mu_q - mu_p)^2) / max(scale_p^2, 1e-5) - 1) / 2 + log scale_p - log scale_q."""
    var_p = torch.clamp(scale_p * scale_p, min=variance_floor)
    return 0.5 * (
        (scale_q * scale_q + (mu_q - mu_p) ** 2) / var_p - 1.0 + 2.0 * torch.log(scale_p) - 2.0 * torch.log(scale_q)
    )


class GaussianKLPerVolume(torch.autograd.Function):
    """Sum over (C, D, H, W) of :func:`gaussian_kl`, (B, C, D, H, W) x 4 -> (B,), computed in float32 whatever
    the input dtype, with an analytic backward that keeps only the four inputs.

    Autograd through :func:`gaussian_kl` would store about six float32 latent-sized intermediates per group,
    the largest share of training memory at 128^3; this stores none. Both passes work in place on float32
    copies: PyTorch's CPU kernels are several times slower on mixed bfloat16 / float32 operands than a
    conversion followed by a float32 operation, and at 32^3 these elementwise passes are what the KL costs.
    With v = max(scale_p^2, 1e-5) and A = scale_q^2 + (mu_q - mu_p)^2: KL = (A / v - 1) / 2 + log(scale_p / scale_q).
    """

    @staticmethod
    def _terms(mu_q, scale_q, mu_p, scale_p) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """float32 (1 / v, A / v, diff = mu_q - mu_p, scale_q) for the KL and its gradients."""
        sq = scale_q.to(torch.float32, copy=True)
        inv_v = scale_p.float().square().clamp_(min=PRIOR_VARIANCE_FLOOR).reciprocal_()
        diff = mu_q.to(torch.float32, copy=True).sub_(mu_p.float())
        a_over_v = sq.square().addcmul_(diff, diff).mul_(inv_v)
        return inv_v, a_over_v, diff, sq

    @staticmethod
    def forward(
        ctx, mu_q: torch.Tensor, scale_q: torch.Tensor, mu_p: torch.Tensor, scale_p: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(mu_q, scale_q, mu_p, scale_p)
        # the reference's order of operations, so that float32 results agree to the last bits even where the
        # terms cancel (KL << 1 per dimension): ((var_q + diff^2) / v - 1 + 2 log sp) - 2 log sq
        sq, sp = scale_q.float(), scale_p.float()
        diff = mu_q.to(torch.float32, copy=True).sub_(mu_p.float())
        kl = sq.square().add_(diff.square_()).div_(sp.square().clamp_(min=PRIOR_VARIANCE_FLOOR))
        kl.sub_(1.0).add_(sp.log(), alpha=2.0).sub_(sq.log(), alpha=2.0)
        return kl.sum(dim=(1, 2, 3, 4)).mul_(0.5)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        mu_q, scale_q, mu_p, scale_p = ctx.saved_tensors
        inv_v, a_over_v, diff, sq = GaussianKLPerVolume._terms(mu_q, scale_q, mu_p, scale_p)
        g = grad.float().view(-1, 1, 1, 1, 1)
        sp = scale_p.float()
        # dKL/dmu_q = diff / v = -dKL/dmu_p; dKL/dsq = sq / v - 1 / sq;
        # dKL/dsp = 1 / sp - (A / v) * (2 sp / v) / 2 where the floor is not active, else 1 / sp
        floored = (sp * sp) < PRIOR_VARIANCE_FLOOR
        grad_scale_p = a_over_v.mul_(inv_v).mul_(sp).masked_fill_(floored, 0.0).neg_().add_(sp.reciprocal()).mul_(g)
        grad_scale_q = sq.mul(inv_v).sub_(sq.reciprocal()).mul_(g)
        grad_mu_q = diff.mul_(inv_v).mul_(g)
        return (
            grad_mu_q.to(mu_q.dtype),
            grad_scale_q.to(scale_q.dtype),
            grad_mu_q.neg().to(mu_p.dtype),
            grad_scale_p.to(scale_p.dtype),
        )


def gaussian_kl_per_volume(
    mu_q: torch.Tensor, scale_q: torch.Tensor, mu_p: torch.Tensor, scale_p: torch.Tensor
) -> torch.Tensor:
    """KL(q || p) summed per volume (B,), float32; memory-lean autograd outside TorchScript."""
    if torch.jit.is_scripting():
        return gaussian_kl(mu_q.float(), scale_q.float(), mu_p.float(), scale_p.float()).sum(dim=(1, 2, 3, 4))
    return GaussianKLPerVolume.apply(mu_q, scale_q, mu_p, scale_p)


def standard_normal_like(t: torch.Tensor) -> torch.Tensor:
    """N(0, 1) noise of t's shape in float32, laid out like ``t`` (channels-last-3d when t's channel stride is 1).

    The values are drawn in (B, C, D, H, W) order whatever the layout, so a seed gives the same latents with and
    without channels-last. Drawing into a dense tensor matters: ``randn_like`` of a channel slice of a
    channels-last activation falls back to a slow element-by-element path.
    """
    noise = torch.randn(t.shape, dtype=torch.float32, device=t.device)
    if t.dim() == 5 and t.shape[1] > 1 and t.stride(1) == 1:
        return noise.contiguous(memory_format=torch.channels_last_3d)
    return noise


def _draw(
    mu: torch.Tensor, scale: torch.Tensor, sample: bool, temperature: float, temperature_mode: str
) -> torch.Tensor:
    """A latent from N(mu, scale^2) in float32: mu + scale * eps (temperature 1), tempered as ``temperature_mode``
    says; ``sample=False`` gives the (tempered) mean."""
    if temperature_mode == "std":
        if not sample:
            return mu.float()
        return torch.addcmul(mu.float(), scale.float(), standard_normal_like(mu), value=temperature)
    z = torch.addcmul(mu.float(), scale.float(), standard_normal_like(mu)) if sample else mu.float()
    return z if temperature == 1.0 else z * temperature


class Conv3dSame(nn.Conv3d):
    """k^3 convolution (k in 1, 2, 3) that keeps the spatial size; k = 2 is zero-padded at the start of each axis
    only, k = 3 on both sides, as in the reference."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        if kernel_size not in (1, 2, 3):
            raise ValueError(f"kernel sizes must be 1, 2 or 3, got {kernel_size}")
        super().__init__(in_channels, out_channels, kernel_size, padding=1 if kernel_size == 3 else 0)
        self.front_pad = kernel_size == 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.front_pad:
            x = F.pad(x, (1, 0, 1, 0, 1, 0))
        return self._conv_forward(x, self.weight, self.bias)


class ConvStack(nn.Module):
    """GELU -> 1x1 (in -> hidden) -> GELU -> k^3 -> GELU -> k^3 -> GELU: (B, in, D, H, W) -> (B, hidden, D, H, W),
    the trunk shared by residual blocks, priors and posteriors (its output is the activated input of their
    last 1x1 convolutions)."""

    def __init__(self, in_channels: int, hidden_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            [
                nn.Conv3d(in_channels, hidden_channels, 1),
                Conv3dSame(hidden_channels, hidden_channels, kernel_size),
                Conv3dSame(hidden_channels, hidden_channels, kernel_size),
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = conv(F.gelu(x))
        return F.gelu(x)


def _scale_weight(conv: nn.Conv3d, factor: float) -> None:
    with torch.no_grad():
        conv.weight.mul_(factor)


class ResBlock(nn.Module):
    """Pre-activation GELU bottleneck 1x1 -> k^3 -> k^3 -> 1x1, plus a skip.

    Args:
        in_channels: C_in of the input (B, C_in, D, H, W).
        hidden_channels: width of the two k^3 convolutions.
        out_channels: C_out of the output (B, C_out, D, H, W).
        kernel_size: k, one of 1, 2, 3.
        residual: add the input (identity, or a 1x1 projection when C_in != C_out).
        last_scale: multiplies the initial weights of the last convolution (sqrt(1/depth) in the VAE).
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int,
        out_channels: int,
        kernel_size: int,
        residual: bool = True,
        last_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.stack = ConvStack(in_channels, hidden_channels, kernel_size)
        self.out = nn.Conv3d(hidden_channels, out_channels, 1)
        self.skip: nn.Module | None = None
        if residual:
            self.skip = nn.Identity() if in_channels == out_channels else nn.Conv3d(in_channels, out_channels, 1)
        _scale_weight(self.out, last_scale)
        self.activation_checkpointing = False  # set by VDVAE.set_activation_checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # TorchScript has no checkpoint; scripted modules are for inference
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.out(self.stack(x))
        if self.skip is not None:
            h = h + self.skip(x)
        return h


class _LatentBlock(nn.Module):
    """What both kinds of latent group share: scale parameterisation, temperature mode and checkpointing."""

    def __init__(self, latent_channels: int, scale_bounds: tuple[float, float], temperature_mode: str) -> None:
        super().__init__()
        self.latent_channels = latent_channels
        self.scale_lo, self.scale_hi = float(scale_bounds[0]), float(scale_bounds[1])
        self.temperature_mode = temperature_mode
        self.activation_checkpointing = False  # set by VDVAE.set_activation_checkpointing

    def _scale(self, raw: torch.Tensor) -> torch.Tensor:
        return self.scale_lo + (self.scale_hi - self.scale_lo) * torch.sigmoid(raw)

    def forward(
        self,
        h: torch.Tensor,
        lateral: torch.Tensor,
        use_posterior: bool = True,
        sample: bool = True,
        temperature: float = 1.0,
        z_given: torch.Tensor | None = None,
        standardised: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (new h (B, C_out, d, h, w), KL of this group per volume (B,), float32, zeros when the posterior
        is not used, and the latent z (B, Z, d, h, w), float32). Without the posterior, ``z_given`` (when given)
        replaces the prior draw. ``standardised``: the returned and the given latent are in the prior's standard
        coordinates, eps = (z - prior mean) / prior scale (the top group's prior is N(0, I): eps = z). With
        ``activation_checkpointing`` in training, the block's activations are recomputed in the backward pass (same
        noise: the RNG state is restored) instead of being stored."""
        if not torch.jit.is_scripting():  # TorchScript has no checkpoint; scripted modules are for inference
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                return checkpoint(
                    self._forward,
                    h,
                    lateral,
                    use_posterior,
                    sample,
                    temperature,
                    z_given,
                    standardised,
                    use_reentrant=False,
                )
        return self._forward(h, lateral, use_posterior, sample, temperature, z_given, standardised)

    def _forward(
        self,
        h: torch.Tensor,
        lateral: torch.Tensor,
        use_posterior: bool,
        sample: bool,
        temperature: float,
        z_given: torch.Tensor | None,
        standardised: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class TopLatentBlock(_LatentBlock):
    """The top latent group (1^3): prior N(0, I), posterior q(z | x) from the encoder's top activation alone;
    its output conv_z(z) (B, C_out, 1, 1, 1) starts the decoder state (``h`` is only read for its shape)."""

    def __init__(
        self,
        encoder_channels: int,
        hidden_channels: int,
        latent_channels: int,
        out_channels: int,
        kernel_size: int,
        scale_bounds: tuple[float, float],
        temperature_mode: str,
    ) -> None:
        super().__init__(latent_channels, scale_bounds, temperature_mode)
        self.posterior = ConvStack(encoder_channels, hidden_channels, kernel_size)
        self.posterior_mean = nn.Conv3d(hidden_channels, latent_channels, 1)
        self.posterior_scale = nn.Conv3d(hidden_channels, latent_channels, 1)
        self.z_proj = nn.Conv3d(latent_channels, out_channels, 1)

    def _forward(
        self,
        h: torch.Tensor,
        lateral: torch.Tensor,
        use_posterior: bool,
        sample: bool,
        temperature: float,
        z_given: torch.Tensor | None,
        standardised: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if use_posterior:
            feats = self.posterior(lateral)
            mu_q, scale_q = self.posterior_mean(feats), self._scale(self.posterior_scale(feats))
            ones = torch.ones_like(mu_q)
            kl = gaussian_kl_per_volume(mu_q, scale_q, torch.zeros_like(mu_q), ones)
            z = _draw(mu_q, scale_q, sample, 1.0, "latent")
        else:
            shape = [h.shape[0], self.latent_channels, h.shape[2], h.shape[3], h.shape[4]]
            zeros = torch.zeros(shape, dtype=torch.float32, device=h.device)
            kl = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
            z = (
                z_given.float()
                if z_given is not None
                else _draw(zeros, torch.ones_like(zeros), sample, temperature, self.temperature_mode)
            )
        return self.z_proj(z.to(h.dtype)), kl, z


class TopDownBlock(_LatentBlock):
    """One latent group below the top: prior p(z | h), posterior q(z | x, h), and
    h <- conv_z(z) + prior_skip + skip(h), where skip is the identity, or a 1x1 convolution (with PyTorch's default
    bias initialisation) when the group changes the width from C_in to C_out (the first group after upsampling).

    Prior and posterior are a :class:`ConvStack` on h, respectively on concat(encoder lateral, h), each followed by
    1x1 heads (mean, raw scale; the prior also a skip head to the state). The prior's heads start at zero. Scales are
    ``lo + (hi - lo) * sigmoid(raw)`` with ``(lo, hi) = scale_bounds``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        encoder_channels: int,
        hidden_channels: int,
        latent_channels: int,
        kernel_size: int,
        scale_bounds: tuple[float, float],
        temperature_mode: str,
    ) -> None:
        super().__init__(latent_channels, scale_bounds, temperature_mode)
        self.prior = ConvStack(in_channels, hidden_channels, kernel_size)
        self.prior_mean = nn.Conv3d(hidden_channels, latent_channels, 1)
        self.prior_scale = nn.Conv3d(hidden_channels, latent_channels, 1)
        self.prior_skip = nn.Conv3d(hidden_channels, out_channels, 1)
        self.posterior = ConvStack(encoder_channels + in_channels, hidden_channels, kernel_size)
        self.posterior_mean = nn.Conv3d(hidden_channels, latent_channels, 1)
        self.posterior_scale = nn.Conv3d(hidden_channels, latent_channels, 1)
        self.z_proj = nn.Conv3d(latent_channels, out_channels, 1)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv3d(in_channels, out_channels, 1)
        for head in (self.prior_mean, self.prior_scale, self.prior_skip):
            _scale_weight(head, 0.0)

    def _forward(
        self,
        h: torch.Tensor,
        lateral: torch.Tensor,
        use_posterior: bool,
        sample: bool,
        temperature: float,
        z_given: torch.Tensor | None,
        standardised: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        prior = self.prior(h)
        mu_p, scale_p = self.prior_mean(prior), self._scale(self.prior_scale(prior))
        if use_posterior:
            feats = self.posterior(torch.cat([lateral, h], dim=1))
            mu_q, scale_q = self.posterior_mean(feats), self._scale(self.posterior_scale(feats))
            kl = gaussian_kl_per_volume(mu_q, scale_q, mu_p, scale_p)
            z = _draw(mu_q, scale_q, sample, 1.0, "latent")
        else:
            kl = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
            if z_given is None:
                z = _draw(mu_p, scale_p, sample, temperature, self.temperature_mode)
            elif standardised:
                z = torch.addcmul(mu_p.float(), scale_p.float(), z_given.float())
            else:
                z = z_given.float()
        out = self.z_proj(z.to(h.dtype)) + self.prior_skip(prior) + self.skip(h)
        return out, kl, ((z - mu_p.float()) / scale_p.float() if standardised else z)


class Subsample(nn.Module):
    """Nearest subsampling by 2 per axis (even-index voxels): (B, C, D, H, W) -> (B, C, D/2, H/2, W/2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, ::2, ::2, ::2]


class Upsample(nn.Module):
    """Nearest x2 upsampling: (B, C, d, h, w) -> (B, C, 2d, 2h, 2w)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")


class OutputHead(nn.Module):
    """GELU -> 1x1 convolution to 2 x C channels: (B, C_dec, R, R, R) -> (B, 2C, R, R, R), mean channels first."""

    def __init__(self, in_channels: int, image_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, 2 * image_channels, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.conv(F.gelu(h))


def _check_options(
    activation: str,
    temperature_mode: str,
    hidden_bounds: Sequence[float],
    output_bounds: Sequence[float],
    flags: dict[str, object] | None = None,
) -> None:
    """Raises ValueError naming the first VDVAE option (other than the per-level lists) with a value it cannot take.
    ``flags`` are the boolean options by name: a string such as ``'false'`` (what the command line gives for
    ``--option false``) is refused rather than read as true."""
    for name, value in (flags or {}).items():
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r} (on the command line write True or False)")
    if activation not in ("tanh", "identity"):
        raise ValueError(f"output_activation_function must be 'tanh' or 'identity', got {activation!r}")
    if temperature_mode not in TEMPERATURE_MODES:
        raise ValueError(f"temperature_mode must be one of {TEMPERATURE_MODES}, got {temperature_mode!r}")
    for name, bounds in (("scale_hidden_clamp_bounds", hidden_bounds), ("scale_output_clamp_bounds", output_bounds)):
        if len(bounds) != 2 or not 0 < bounds[0] < bounds[1]:
            raise ValueError(f"{name} must be [lo, hi] with 0 < lo < hi, got {list(bounds)}")


class VDVAE(nn.Module):
    """3D very deep VAE for volumes of ``resolution``^3 voxels (``in_channels`` modalities) scaled to [-1, 1].

    The defaults are the reference's: with the reference's per-level lists, this is the reference's model, parameter
    for parameter (``scripts.vdvae.reference`` converts its checkpoints). Options that depart from it say so.

    Args:
        resolution: voxels per axis, a power of two >= 2.
        channels: encoder block output widths per level (k+1 entries, full resolution first).
        channels_hidden: encoder bottleneck widths per level.
        channels_top_down: decoder state widths per level.
        channels_hidden_top_down: decoder bottleneck widths per level (priors, posteriors, residual blocks).
        channels_per_latent: latent channels per group at each level (capped by the decoder width there).
        latent_feature_maps_per_resolution: number of latent groups at each level (>= 1 everywhere).
        kernel_sizes_bottom_up: encoder kernel size (1, 2 or 3) per level.
        kernel_sizes_top_down: decoder kernel size (1, 2 or 3) per level.
        in_channels: image channels (1 for the reference model).
        convolutional_downsampling: stride-2 2^3 convolutions instead of nearest subsampling in the encoder.
        scale_hidden_clamp_bounds: [lo, hi] of the latent scales.
        scale_output_clamp_bounds: [lo, hi] of the per-voxel output scale.
        output_activation_function: "tanh" (reference) or "identity" for the output mean.
        predict_x_scale: learn the per-voxel output scale; when false it is fixed at ``fixed_x_scale``.
        fixed_x_scale: output scale used when ``predict_x_scale`` is false.
        shared_x_scale: with ``predict_x_scale``, one output scale per image channel shared by every voxel instead of
            a per-voxel scale (the optimal sigma-VAE, Rybkin et al. 2021): a buffer that each training pass moves to
            the batch's root-mean-square error of the output mean (momentum 0.1, within
            ``scale_output_clamp_bounds``), so it is a fixed model parameter at evaluation and the ELBO stays a proper
            bound. A per-voxel scale lets the decoder call fine structure noise and blur it; a shared one cannot.
            The reference has a per-voxel scale (False).
        temperature_mode: how a sampling temperature T acts on each prior draw: "latent" (reference) multiplies the
            whole latent, z = T * (mu_p + sigma_p * eps), so T -> 0 shrinks every latent to 0; "std" (Child 2021)
            scales only the spread, z = mu_p + T * sigma_p * eps, so T -> 0 follows the prior means.
        full_resolution_residual: give the decoder's full-resolution residual blocks an identity skip and the depth
            scaling of every other block (the reference has neither there; False).
        activation_checkpointing: in training, store only the input of each residual block and latent group
            and recompute the rest in the backward pass: a fraction of the memory for 20-80% more time
            (see docs/performance.md). Has no effect on results, evaluation or sampling.
        num_covariates: length K of the covariate features (:mod:`scripts.engine.covariates`) that condition the
            model; 0 (the reference) for an unconditional model, which then has no covariate parameters. With K > 0,
            a linear projection of the covariates (B, K), one per latent group below the top, is added to the decoder
            state before the group, so every prior p(z | h, c) and posterior q(z | x, h, c) below the top and the
            decoder state see them; the projections start at zero (the unconditional network).
    """

    def __init__(
        self,
        resolution: int,
        channels: Sequence[int],
        channels_hidden: Sequence[int],
        channels_top_down: Sequence[int],
        channels_hidden_top_down: Sequence[int],
        channels_per_latent: Sequence[int],
        latent_feature_maps_per_resolution: Sequence[int],
        kernel_sizes_bottom_up: Sequence[int],
        kernel_sizes_top_down: Sequence[int],
        in_channels: int = 1,
        convolutional_downsampling: bool = False,
        scale_hidden_clamp_bounds: Sequence[float] = (0.001, 1.0),
        scale_output_clamp_bounds: Sequence[float] = (0.01, 1.0),
        output_activation_function: str = "tanh",
        predict_x_scale: bool = True,
        fixed_x_scale: float = 0.1,
        shared_x_scale: bool = False,
        temperature_mode: str = "latent",
        full_resolution_residual: bool = False,
        activation_checkpointing: bool = False,
        num_covariates: int = 0,
    ) -> None:
        super().__init__()
        lists = dict(
            channels=channels,
            channels_hidden=channels_hidden,
            channels_top_down=channels_top_down,
            channels_hidden_top_down=channels_hidden_top_down,
            channels_per_latent=channels_per_latent,
            latent_feature_maps_per_resolution=latent_feature_maps_per_resolution,
            kernel_sizes_bottom_up=kernel_sizes_bottom_up,
            kernel_sizes_top_down=kernel_sizes_top_down,
        )
        validate_architecture(resolution, **lists)
        flags = dict(
            convolutional_downsampling=convolutional_downsampling,
            predict_x_scale=predict_x_scale,
            shared_x_scale=shared_x_scale,
            full_resolution_residual=full_resolution_residual,
            activation_checkpointing=activation_checkpointing,
        )
        _check_options(
            output_activation_function, temperature_mode, scale_hidden_clamp_bounds, scale_output_clamp_bounds, flags
        )
        if not isinstance(num_covariates, int) or num_covariates < 0:
            raise ValueError(f"num_covariates must be a non-negative integer, got {num_covariates!r}")
        self.resolution = int(resolution)
        self.in_channels = int(in_channels)
        self.num_covariates = num_covariates
        self.num_levels = len(channels)
        self.output_tanh = output_activation_function == "tanh"
        self.predict_x_scale = bool(predict_x_scale)
        self.fixed_x_scale = float(fixed_x_scale)
        self.shared_x_scale = bool(shared_x_scale) and self.predict_x_scale
        self.temperature_mode = temperature_mode
        self.full_resolution_residual = bool(full_resolution_residual)
        self.hidden_lo, self.hidden_hi = float(scale_hidden_clamp_bounds[0]), float(scale_hidden_clamp_bounds[1])
        self.out_lo, self.out_hi = float(scale_output_clamp_bounds[0]), float(scale_output_clamp_bounds[1])
        self.top_channels = channels_top_down[-1]
        # init scaling of the last convolution of residual blocks, as in the reference
        depth = sum(latent_feature_maps_per_resolution) + 2 * (self.num_levels - 1)
        last_scale = math.sqrt(1.0 / depth)

        self.encoder_levels, self.downsamplers = self._build_encoder(lists, convolutional_downsampling, last_scale)
        self.group_levels: list[int] = []  # level index of each latent group, top first (0 = full resolution)
        self.decoder_upsamplers = nn.ModuleList()  # per group: Upsample when it starts a level below the top
        self.decoder_blocks = nn.ModuleList()  # TopLatentBlock, then TopDownBlocks
        self.decoder_resblocks = nn.ModuleList()
        self.group_in_channels: list[int] = []  # decoder state width entering each latent group
        bounds = (float(scale_hidden_clamp_bounds[0]), float(scale_hidden_clamp_bounds[1]))
        self._build_decoder(lists, bounds, last_scale, full_resolution_residual)
        # one projection of the covariates per latent group below the top (none for an unconditional model)
        self.covariate_projections = nn.ModuleList(
            [nn.Linear(num_covariates, c) for c in self.group_in_channels[1:]] if num_covariates > 0 else []
        )
        for proj in self.covariate_projections:
            nn.init.zeros_(proj.weight)
            nn.init.zeros_(proj.bias)
        self.output_head = OutputHead(channels_top_down[0], in_channels)
        # the shared output scale (C,) starts at the top of the bounds and the first training passes bring it down; it is
        # saved with the weights only when it is used (TorchScript needs the attribute either way)
        self.register_buffer(
            "x_scale", torch.full((in_channels,), min(self.out_hi, 1.0)), persistent=self.shared_x_scale
        )
        self._zero_biases()
        self.set_activation_checkpointing(activation_checkpointing)

    def _build_encoder(self, lists: dict, convolutional_downsampling: bool, last_scale: float):
        """Two residual blocks per level, the first changing the width (1x1 skip), then subsampling."""
        channels, hidden, kernels = lists["channels"], lists["channels_hidden"], lists["kernel_sizes_bottom_up"]
        levels, downsamplers = nn.ModuleList(), nn.ModuleList()
        for i in range(self.num_levels):
            c_in = self.in_channels if i == 0 else channels[i - 1]
            levels.append(
                nn.Sequential(
                    ResBlock(c_in, hidden[i], channels[i], kernels[i], last_scale=last_scale),
                    ResBlock(channels[i], hidden[i], channels[i], kernels[i], last_scale=last_scale),
                )
            )
            if i == self.num_levels - 1:
                downsamplers.append(nn.Identity())
            elif convolutional_downsampling:
                downsamplers.append(nn.Conv3d(channels[i], channels[i], 2, stride=2))
            else:
                downsamplers.append(Subsample())
        return levels, downsamplers

    def _build_decoder(
        self, lists: dict, bounds: tuple[float, float], last_scale: float, full_res_residual: bool
    ) -> None:
        """Latent groups and residual blocks from the 1^3 level down to full resolution."""
        channels, channels_top_down, hidden = (
            lists["channels"],
            lists["channels_top_down"],
            lists["channels_hidden_top_down"],
        )
        per_latent, groups, kernels = (
            lists["channels_per_latent"],
            lists["latent_feature_maps_per_resolution"],
            lists["kernel_sizes_top_down"],
        )
        top = self.num_levels - 1
        c_state = channels_top_down[top]
        for i in range(top, -1, -1):
            c = channels_top_down[i]
            z_ch = min(per_latent[i], c)
            residual = i > 0 or full_res_residual
            for j in range(groups[i]):
                self.decoder_upsamplers.append(Upsample() if (i < top and j == 0) else nn.Identity())
                if i == top and j == 0:
                    block: nn.Module = TopLatentBlock(
                        channels[i], hidden[i], z_ch, c, kernels[i], bounds, self.temperature_mode
                    )
                else:
                    block = TopDownBlock(
                        c_state, c, channels[i], hidden[i], z_ch, kernels[i], bounds, self.temperature_mode
                    )
                self.decoder_blocks.append(block)
                self.group_in_channels.append(c_state)
                self.decoder_resblocks.append(
                    ResBlock(c, hidden[i], c, kernels[i], residual=residual, last_scale=last_scale if residual else 1.0)
                )
                self.group_levels.append(i)
                c_state = c

    def _zero_biases(self) -> None:
        """Every convolution bias starts at zero except the 1x1 width changes of the latent groups (the reference's
        ``skip_con_conv``), which keep PyTorch's default initialisation."""
        kept = {
            id(b.skip.bias)
            for b in self.decoder_blocks
            if isinstance(b, TopDownBlock) and isinstance(b.skip, nn.Conv3d)
        }
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Conv3d) and m.bias is not None and id(m.bias) not in kept:
                    m.bias.zero_()

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Checkpoint every encoder residual block, latent group and decoder residual block (not nested)."""
        self.activation_checkpointing = bool(enabled)
        outer = [b for level in self.encoder_levels for b in level]
        for m in outer + list(self.decoder_blocks) + list(self.decoder_resblocks):
            m.activation_checkpointing = self.activation_checkpointing

    # ------------------------------------------------------------------ helpers
    def function_options(self) -> dict:
        """The constructor options (config keys) that change what a set of weights computes without changing the
        names or shapes of its tensors. Saved next to the weights (``model.json``) and checked when they are loaded,
        so weights are never run as another function. ``temperature_mode`` is a sampling choice and not listed."""
        return {
            "full_resolution_residual": self.full_resolution_residual,
            "shared_x_scale": self.shared_x_scale,
            "predict_x_scale": self.predict_x_scale,
            "output_activation_function": "tanh" if self.output_tanh else "identity",
            "scale_hidden_clamp_bounds": [self.hidden_lo, self.hidden_hi],
            "scale_output_clamp_bounds": [self.out_lo, self.out_hi],
        }

    @property
    def num_latent_groups(self) -> int:
        return len(self.decoder_blocks)

    def group_resolutions(self) -> list[int]:
        """Voxels per axis of each latent group, top of the hierarchy first."""
        return [self.resolution >> lvl for lvl in self.group_levels]

    def latent_dims_per_group(self) -> list[int]:
        """Number of latent dimensions (channels x voxels) of each group, top first."""
        return [b.latent_channels * r**3 for b, r in zip(self.decoder_blocks, self.group_resolutions())]

    def clipping_groups(self) -> dict[str, list[nn.Parameter]]:
        """The parameters whose gradient norms the reference clips separately: encoder, decoder (latent groups and
        residual blocks) and output head."""
        return {
            "encoder": list(self.encoder_levels.parameters()) + list(self.downsamplers.parameters()),
            "decoder": list(self.decoder_blocks.parameters()) + list(self.decoder_resblocks.parameters()),
            "output_head": list(self.output_head.parameters()),
        }

    def _check_input(self, x: torch.Tensor) -> None:
        r = self.resolution
        if x.dim() != 5 or x.shape[1] != self.in_channels or x.shape[2] != r or x.shape[3] != r or x.shape[4] != r:
            raise ValueError(
                f"VDVAE expects input of shape (B, {self.in_channels}, {r}, {r}, {r}), got {list(x.shape)}"
            )

    def _covariate_inputs(self, covariates: torch.Tensor | None, batch_size: int) -> list[torch.Tensor]:
        """The projections (B, C_g, 1, 1, 1) added to the decoder state before each latent group below the top
        ([] for an unconditional model). ``covariates`` (B, K); None samples a conditional model at the training
        mean of its numeric covariates (all-zero features)."""
        if self.num_covariates == 0:
            if covariates is not None:
                raise ValueError("this VDVAE is unconditional (num_covariates 0) but covariates were given")
            return []
        if covariates is None:
            ref = self.output_head.conv.weight
            covariates = torch.zeros(batch_size, self.num_covariates, dtype=torch.float32, device=ref.device)
        if covariates.dim() != 2 or covariates.shape[0] != batch_size or covariates.shape[1] != self.num_covariates:
            raise ValueError(
                f"covariates must be ({batch_size}, {self.num_covariates}) for a batch of {batch_size}, "
                f"got {list(covariates.shape)}"
            )
        out: list[torch.Tensor] = []
        for proj in self.covariate_projections:
            out.append(proj(covariates.float())[:, :, None, None, None])
        return out

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Lateral activations per level, full resolution first: [(B, channels[i], R/2^i, ...)]."""
        h = x
        laterals: list[torch.Tensor] = []
        for level, down in zip(self.encoder_levels, self.downsamplers):
            h = level(h)
            laterals.append(h)
            h = down(h)
        return laterals

    def _output(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.output_head(h).float()
        mean = out[:, : self.in_channels]
        mean = torch.tanh(mean) if self.output_tanh else mean
        if self.shared_x_scale:
            scale = self.x_scale.view(1, -1, 1, 1, 1).expand_as(mean)
        elif self.predict_x_scale:
            scale = self.out_lo + (self.out_hi - self.out_lo) * torch.sigmoid(out[:, self.in_channels :])
        else:
            scale = torch.full_like(mean, self.fixed_x_scale)
        return mean, scale

    def decode_latents(
        self,
        laterals: list[torch.Tensor] | None,
        batch_size: int,
        posterior_groups: int,
        sample_posterior: bool = True,
        sample_prior: bool = True,
        temperature: float = 1.0,
        given: list[torch.Tensor] | None = None,
        covariates: torch.Tensor | None = None,
        standardised_groups: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Runs the top-down path. The first ``posterior_groups`` groups (top first) use the posterior and need
        ``laterals``; the rest use the prior, except that prior group g takes ``given[g]`` as its latent when
        g < len(given). ``covariates`` (B, K) condition a conditional model (see :meth:`_covariate_inputs`).
        The first ``standardised_groups`` groups return and take their latents in the prior's standard coordinates
        (z - prior mean) / prior scale (see :meth:`counterfactual`).
        Returns (mean, scale) of the output Gaussian (B, C, R, R, R), the per-volume KL of every group [(B,)] (zero
        for prior groups) and every group's latent [(B, Z, r, r, r)]."""
        ref = self.output_head.conv.weight
        h = torch.zeros(batch_size, self.top_channels, 1, 1, 1, dtype=ref.dtype, device=ref.device)
        if laterals is not None:
            h = h.to(laterals[-1].dtype)
        conditions = self._covariate_inputs(covariates, batch_size)
        kls: list[torch.Tensor] = []
        zs: list[torch.Tensor] = []
        g = 0
        for upsample, block, res in zip(self.decoder_upsamplers, self.decoder_blocks, self.decoder_resblocks):
            h = upsample(h)
            if g > 0 and len(conditions) > 0:
                h = h + conditions[g - 1].to(h.dtype)
            if laterals is not None and g < posterior_groups:
                h, kl, z = block(
                    h, laterals[self.group_levels[g]], True, sample_posterior, 1.0, None, g < standardised_groups
                )
            else:
                z_given: torch.Tensor | None = None
                if given is not None and g < len(given):
                    z_given = given[g]
                h, kl, z = block(h, h, False, sample_prior, temperature, z_given, g < standardised_groups)
            kls.append(kl)
            zs.append(z)
            h = res(h)
            g += 1
        mean, scale = self._output(h)
        return mean, scale, kls, zs

    def decode(
        self,
        laterals: list[torch.Tensor] | None,
        batch_size: int,
        posterior_groups: int,
        sample_posterior: bool = True,
        sample_prior: bool = True,
        temperature: float = 1.0,
        covariates: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """:meth:`decode_latents` without the latents: (mean, scale, KL per group)."""
        mean, scale, kls, _ = self.decode_latents(
            laterals, batch_size, posterior_groups, sample_posterior, sample_prior, temperature, None, covariates
        )
        return mean, scale, kls

    # ------------------------------------------------------------------ public API
    def forward(self, x: torch.Tensor, covariates: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction mean (B, C, R, R, R) using the posterior means of every latent group (``covariates``
        (B, K): those of ``x``, for a conditional model)."""
        self._check_input(x)
        mean, _, _ = self.decode(
            self.encode(x), x.shape[0], self.num_latent_groups, sample_posterior=False, covariates=covariates
        )
        return mean

    def forward_train(
        self, x: torch.Tensor, covariates: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass with posterior samples: output mean and scale (B, C, R, R, R), KL per group (B, G)."""
        self._check_input(x)
        mean, scale, kls = self.decode(
            self.encode(x), x.shape[0], self.num_latent_groups, sample_posterior=True, covariates=covariates
        )
        if self.shared_x_scale and self.training:
            scale = self._update_shared_scale(x, mean)
        return mean, scale, torch.stack(kls, dim=1)

    @torch.no_grad()
    def _update_shared_scale(self, x: torch.Tensor, mean: torch.Tensor, momentum: float = 0.1) -> torch.Tensor:
        """Moves the shared output scale (C,) towards the batch's RMS error per channel; returns it expanded like
        ``mean`` (no gradient: the scale is fitted in closed form, not by the optimiser). Under torch.distributed the
        mean squared error is averaged over the processes, so every replica keeps the same scale; a non-finite error
        (on any process) leaves the scale as it was, like the skipped update of the weights."""
        mse = (x.float() - mean.float()).pow(2).transpose(0, 1).flatten(1).mean(1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(mse)
            mse = mse / torch.distributed.get_world_size()
        target = mse.sqrt().clamp(self.out_lo, self.out_hi)
        finite = torch.isfinite(mse).all()
        self.x_scale.copy_(torch.where(finite, torch.lerp(self.x_scale, target, momentum), self.x_scale))
        return self.x_scale.view(1, -1, 1, 1, 1).expand_as(mean)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        temperature: float = 1.0,
        generator_seed: int | None = None,
        covariates: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Output means of ``n`` samples (n, C, R, R, R), every latent drawn from its prior at ``temperature``
        as ``temperature_mode`` says; a conditional model's at ``covariates`` (n, K) (None: all-zero features, the
        training mean of numeric covariates)."""
        if n <= 0:
            raise ValueError(f"number of samples must be positive, got {n}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if generator_seed is not None:
            torch.manual_seed(generator_seed)
        mean, _, _ = self.decode(None, n, 0, sample_prior=True, temperature=temperature, covariates=covariates)
        return mean

    @torch.no_grad()
    def reconstruct(
        self, x: torch.Tensor, down_to_resolution: int | None = None, covariates: torch.Tensor | None = None
    ) -> torch.Tensor:
        """ "Progressive" reconstruction (B, C, R, R, R): posterior means for the groups at resolutions
        <= ``down_to_resolution`` (all groups when None), prior means below."""
        self._check_input(x)
        if down_to_resolution is None:
            groups = self.num_latent_groups
        else:
            groups = sum(1 for r in self.group_resolutions() if r <= down_to_resolution)
        mean, _, _ = self.decode(
            self.encode(x), x.shape[0], groups, sample_posterior=False, sample_prior=False, covariates=covariates
        )
        return mean

    @torch.no_grad()
    def counterfactual(
        self,
        x: torch.Tensor,
        covariates: torch.Tensor,
        new_covariates: torch.Tensor,
        abduct_to_resolution: int | None = None,
    ) -> torch.Tensor:
        """Output mean (B, C, R, R, R) of ``x`` (B, C, R, R, R) with its covariates (B, K) changed to
        ``new_covariates`` (B, K), by abduction, action and prediction on the latents:

        1. abduction: the posterior means z_g of every group given ``x`` and its ``covariates``, expressed in the
           prior's standard coordinates eps_g = (z_g - mu_g) / sigma_g for the groups at resolutions <=
           ``abduct_to_resolution`` (None: every group);
        2. action and prediction: the top-down pass at ``new_covariates``, where those groups take
           z'_g = mu'_g + sigma'_g eps_g under their new priors, and the finer groups keep their posterior means z_g.

        With ``new_covariates == covariates`` this is the reconstruction ``reconstruct(x, covariates=covariates)``.
        Standard coordinates let the coarse latents follow the prior's shift with the covariates (a larger brain's
        layout) while keeping where this volume sat within the prior; kept fine latents keep its texture exactly."""
        self._check_input(x)
        if self.num_covariates == 0:
            raise ValueError("counterfactual needs a conditional VDVAE (num_covariates > 0)")
        groups = self.num_latent_groups
        if abduct_to_resolution is None:
            standard = groups
        else:
            standard = sum(1 for r in self.group_resolutions() if r <= abduct_to_resolution)
            if standard == 0:
                raise ValueError(
                    f"abduct_to_resolution {abduct_to_resolution} is below every latent resolution "
                    f"{sorted(set(self.group_resolutions()))}"
                )
        batch = x.shape[0]
        _, _, _, latents = self.decode_latents(
            self.encode(x), batch, groups, False, False, covariates=covariates, standardised_groups=standard
        )
        mean, _, _, _ = self.decode_latents(
            None, batch, 0, False, False, given=latents, covariates=new_covariates, standardised_groups=standard
        )
        return mean

    @torch.no_grad()
    def elbo(self, x: torch.Tensor, covariates: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Negative ELBO per volume: see :func:`scripts.vdvae.loss.negative_elbo_terms` for the units."""
        mean, scale, kl = self.forward_train(x, covariates)
        return negative_elbo_terms(x, mean, scale, kl)

    # the interface of scripts.engine.generator.Generator (sampling, evaluation and anomaly workflows)

    def describe(self) -> dict:
        return {"family": "vdvae", "latent_groups": self.num_latent_groups}

    def reconstruction_note(self) -> str:
        return "posterior-mean reconstructions"

    def heldout_likelihood(self, x: torch.Tensor, covariates: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per volume (B rows): ``neg_elbo_nats`` and ``neg_elbo_bits`` per voxel, ``kl_per_group`` (B, G) nats
        (``covariates`` (B, K): those of ``x``, for a conditional model)."""
        terms = self.elbo(x, covariates)
        return {k: terms[k].float() for k in ("neg_elbo_nats", "neg_elbo_bits", "kl_per_group")}

    def likelihood_report(self, terms: dict[str, torch.Tensor], kl_active_threshold: float = 1.0) -> dict:
        """Negative ELBO per voxel (summary over volumes) and the KL of each latent group, with the groups whose mean
        KL exceeds ``kl_active_threshold`` nats per volume called active."""
        kl = terms["kl_per_group"]  # (N, G) nats per volume
        resolutions, dims = self.group_resolutions(), self.latent_dims_per_group()
        groups = []
        for g in range(kl.shape[1]):
            mean_kl = float(kl[:, g].mean())
            groups.append(
                {
                    "group": g,
                    "resolution": resolutions[g],
                    "latent_dims": dims[g],
                    "kl_nats_per_volume": mean_kl,
                    "kl_nats_per_latent_dim": mean_kl / dims[g],
                    "active": mean_kl > kl_active_threshold,
                }
            )
        return {
            "neg_elbo_nats_per_voxel": summary(terms["neg_elbo_nats"].numpy()),
            "neg_elbo_bits_per_voxel": summary(terms["neg_elbo_bits"].numpy()),
            "kl_nats_per_volume": float(kl.sum(1).mean()),
            "kl_active_threshold_nats_per_volume": kl_active_threshold,
            "active_groups": [g["group"] for g in groups if g["active"]],
            "collapsed_groups": [g["group"] for g in groups if not g["active"]],
            "kl_per_group": groups,
            "note": "single-sample ELBO estimate (posterior noise seeded with `seed`); groups listed top of the hierarchy first",
        }


class VDVAETrainingStep(nn.Module):
    """Wraps a :class:`VDVAE` so that its training pass is ``forward`` (what DistributedDataParallel calls).

    Shares parameters with ``vae``; its state dict is the VAE's under the prefix ``vae.``.
    """

    def __init__(self, vae: VDVAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(
        self, x: torch.Tensor, covariates: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.vae.forward_train(x, covariates)


def validate_architecture(resolution: int, **lists: Sequence[int]) -> None:
    """Raises ValueError naming the option when ``resolution`` or a per-level list is invalid."""
    if not isinstance(resolution, int) or resolution < 2 or resolution & (resolution - 1):
        raise ValueError(f"resolution must be a power of two >= 2 (8, 16, 32, 64, 128, ...), got {resolution!r}")
    levels = int(math.log2(resolution)) + 1
    for name in ARCHITECTURE_LISTS:
        values = lists[name]
        if len(values) != levels:
            raise ValueError(
                f"{name} must have log2(resolution) + 1 = {levels} entries for resolution {resolution} "
                f"(full resolution first, 1^3 last), got {len(values)}: {list(values)}"
            )
        if any((not isinstance(v, int)) or v < 0 for v in values):
            raise ValueError(f"{name} must hold non-negative integers, got {list(values)}")
        if any(v < 1 for v in values):
            hint = (
                " (every level needs a latent group: the first one at a level changes the decoder width)"
                if name == "latent_feature_maps_per_resolution"
                else ""
            )
            raise ValueError(f"{name} entries must be >= 1{hint}, got {list(values)}")
    bad = [
        k for k in list(lists["kernel_sizes_bottom_up"]) + list(lists["kernel_sizes_top_down"]) if k not in (1, 2, 3)
    ]
    if bad:
        raise ValueError(f"kernel_sizes_bottom_up / kernel_sizes_top_down entries must be 1, 2 or 3, got {bad}")
