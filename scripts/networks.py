# Copyright 2026 The VDVAE bundle authors. Licensed under the Apache License, Version 2.0.
"""The 3D very deep hierarchical VAE (Child 2021, as streamlined for 3D by Gray et al. 2022).

Resolution ``2**k`` per axis. Every per-level list has ``k + 1`` entries, full resolution first and the 1^3
level last. The encoder runs bottom-up with two residual blocks per level; the decoder runs top-down from 1^3,
and at every level holds ``latent_feature_maps_per_resolution[i]`` latent groups, each a :class:`TopDownBlock`
(prior p(z|h), posterior q(z|x,h)) followed by a :class:`ResBlock`. A Gaussian head gives a mean and a scale
per voxel for data scaled to [-1, 1].

``forward(x)`` returns only the reconstruction mean (B, 1, D, H, W), so the Model Zoo's shape and TorchScript
checks apply; :meth:`VDVAE.forward_train` returns what the ELBO needs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["VDVAE", "VDVAETrainingStep", "ResBlock", "TopDownBlock", "gaussian_kl", "gaussian_kl_per_volume", "standard_normal_like"]

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


def gaussian_kl(mu_q: torch.Tensor, scale_q: torch.Tensor, mu_p: torch.Tensor, scale_p: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mu_q, scale_q^2) || N(mu_p, scale_p^2)), same shape as the inputs."""
    var_ratio = (scale_q / scale_p) ** 2
    return 0.5 * (var_ratio + ((mu_q - mu_p) / scale_p) ** 2 - 1.0 - torch.log(var_ratio))


class GaussianKLPerVolume(torch.autograd.Function):
    """Sum over (C, D, H, W) of :func:`gaussian_kl`, (B, C, D, H, W) x 4 -> (B,), computed in float32 whatever
    the input dtype, with an analytic backward that keeps only the four inputs.

    Autograd through :func:`gaussian_kl` would store about six float32 latent-sized intermediates per group,
    the largest share of training memory at 128^3; this stores none. Both passes work on r = scale_q / scale_p
    and d = (mu_q - mu_p) / scale_p, KL = (r^2 + d^2 - 1) / 2 - log r, in as few passes over memory as eager
    PyTorch allows: at 32^3 these elementwise passes, not arithmetic, are what the KL costs.
    """

    @staticmethod
    def _ratio_and_distance(mu_q, scale_q, mu_p, scale_p) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """float32 (1 / scale_p, r, d), computed in place on float32 copies: PyTorch's CPU kernels are several times
        slower on mixed bfloat16 / float32 operands than a conversion followed by a float32 operation."""
        inv_p = scale_p.to(torch.float32, copy=True).reciprocal_()
        ratio = scale_q.to(torch.float32, copy=True).mul_(inv_p)
        distance = mu_q.to(torch.float32, copy=True).sub_(mu_p.float()).mul_(inv_p)
        return inv_p, ratio, distance

    @staticmethod
    def forward(ctx, mu_q: torch.Tensor, scale_q: torch.Tensor, mu_p: torch.Tensor, scale_p: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(mu_q, scale_q, mu_p, scale_p)
        _, ratio, distance = GaussianKLPerVolume._ratio_and_distance(mu_q, scale_q, mu_p, scale_p)
        kl = ratio.square().addcmul_(distance, distance).sub_(1.0)  # r^2 + d^2 - 1
        kl.sub_(ratio.log_(), alpha=2.0)
        return kl.sum(dim=(1, 2, 3, 4)).mul_(0.5)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        mu_q, scale_q, mu_p, scale_p = ctx.saved_tensors
        inv_p, ratio, distance = GaussianKLPerVolume._ratio_and_distance(mu_q, scale_q, mu_p, scale_p)
        g_over_p = inv_p.mul_(grad.float().view(-1, 1, 1, 1, 1))  # g / scale_p
        # dKL/dmu_q = d / sp = -dKL/dmu_p, dKL/dsq = (r - 1/r) / sp, dKL/dsp = (1 - r^2 - d^2) / sp
        grad_scale_q = ratio.reciprocal().sub_(ratio).neg_().mul_(g_over_p)
        grad_scale_p = ratio.square_().addcmul_(distance, distance).sub_(1.0).neg_().mul_(g_over_p)  # uses r, d
        grad_mu_q = distance.mul_(g_over_p)
        return grad_mu_q.to(mu_q.dtype), grad_scale_q.to(scale_q.dtype), grad_mu_q.neg().to(mu_p.dtype), grad_scale_p.to(scale_p.dtype)


def gaussian_kl_per_volume(mu_q: torch.Tensor, scale_q: torch.Tensor, mu_p: torch.Tensor, scale_p: torch.Tensor) -> torch.Tensor:
    """KL(q || p) summed per volume (B,), float32; memory-lean autograd outside TorchScript."""
    if torch.jit.is_scripting():
        return gaussian_kl(mu_q.float(), scale_q.float(), mu_p.float(), scale_p.float()).sum(dim=(1, 2, 3, 4))
    return GaussianKLPerVolume.apply(mu_q, scale_q, mu_p, scale_p)


def standard_normal_like(t: torch.Tensor) -> torch.Tensor:
    """N(0, 1) noise of t's shape in float32, laid out like ``t`` (channels-last-3d when t's channel stride is 1).

    The values are drawn in (B, C, D, H, W) order whatever the layout, so a seed gives the same latents with and
    without channels-last. Drawing into a dense tensor matters: ``randn_like`` of a channel slice of a
    channels-last activation falls back to a slow element-by-element path (10% of a training step here).
    """
    noise = torch.randn(t.shape, dtype=torch.float32, device=t.device)
    if t.dim() == 5 and t.shape[1] > 1 and t.stride(1) == 1:
        return noise.contiguous(memory_format=torch.channels_last_3d)
    return noise


def _conv(in_ch: int, out_ch: int, kernel_size: int) -> nn.Module:
    """``kernel_size``^3 convolution that keeps the spatial size (k=2 is padded at the front of each axis)."""
    if kernel_size not in (1, 2, 3):
        raise ValueError(f"kernel sizes must be 1, 2 or 3, got {kernel_size}")
    if kernel_size == 2:
        return nn.Sequential(nn.ConstantPad3d((1, 0, 1, 0, 1, 0), 0.0), nn.Conv3d(in_ch, out_ch, 2))
    return nn.Conv3d(in_ch, out_ch, kernel_size, padding=kernel_size // 2)


class Subsample(nn.Module):
    """Nearest subsampling by 2 per axis: (B, C, D, H, W) -> (B, C, D/2, H/2, W/2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, ::2, ::2, ::2]


class LevelUp(nn.Module):
    """Nearest x2 upsampling, then a 1x1 projection when the width changes: (B, C_in, d, h, w) -> (B, C_out, 2d, 2h, 2w)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.proj = nn.Identity() if in_channels == out_channels else nn.Conv3d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ResBlock(nn.Module):
    """Pre-activation GELU bottleneck 1x1 -> k^3 -> k^3 -> 1x1, plus a skip.

    Args:
        in_channels: C_in of the input (B, C_in, D, H, W).
        hidden_channels: width of the two k^3 convolutions.
        out_channels: C_out of the output (B, C_out, D, H, W).
        kernel_size: k, one of 1, 2, 3.
        residual: add the input (identity, or a 1x1 projection when C_in != C_out).
        last_scale: multiplies the initial weights of the last convolution (sqrt(1/depth) in the VAE).
        zero_last: zero-initialise the last convolution (used for heads that must start at zero).
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int,
        out_channels: int,
        kernel_size: int,
        residual: bool = True,
        last_scale: float = 1.0,
        zero_last: bool = False,
    ) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            [
                nn.Conv3d(in_channels, hidden_channels, 1),
                _conv(hidden_channels, hidden_channels, kernel_size),
                _conv(hidden_channels, hidden_channels, kernel_size),
                nn.Conv3d(hidden_channels, out_channels, 1),
            ]
        )
        self.skip: nn.Module | None = None
        if residual:
            self.skip = nn.Identity() if in_channels == out_channels else nn.Conv3d(in_channels, out_channels, 1)
        last = self.convs[-1]
        with torch.no_grad():
            if zero_last:
                last.weight.zero_()
            else:
                last.weight.mul_(last_scale)
        self.activation_checkpointing = False  # set by VDVAE.set_activation_checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # TorchScript has no checkpoint; scripted modules are for inference
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _last_input(self, x: torch.Tensor) -> torch.Tensor:
        """The activated input of the last convolution (B, hidden, D, H, W)."""
        h = x
        for i, conv in enumerate(self.convs):
            if i < 3:
                h = conv(F.gelu(h))
        return F.gelu(h)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.convs[3](self._last_input(x))
        if self.skip is not None:
            h = h + self.skip(x)
        return h

    def forward_split(self, x: torch.Tensor, sizes: List[int]) -> List[torch.Tensor]:
        """The output of a block without skip, as channel groups of ``sizes`` [(B, n, D, H, W)]: the same numbers
        as ``forward(x).split(sizes, 1)``, but each group is computed by its own slice of the last convolution's
        weights, so every group is a dense tensor in the input's memory format. Channel slices of a channels-last
        tensor are not dense: PyTorch's elementwise kernels run slowly on them, and their gradients are assembled
        by slow strided copies."""
        if self.skip is not None:
            raise ValueError("forward_split is for blocks without a skip connection")
        h = self._last_input(x)
        last = self.convs[3]
        weight, bias = last.weight, last.bias
        assert bias is not None
        outputs: List[torch.Tensor] = []
        start = 0
        for n in sizes:
            outputs.append(F.conv3d(h, weight[start : start + n], bias[start : start + n]))
            start += n
        return outputs


class TopDownBlock(nn.Module):
    """One latent group: prior p(z | h), posterior q(z | x, h), and h <- h + proj(z) + prior_skip.

    Scales are ``lo + (hi - lo) * sigmoid(raw)`` with ``(lo, hi) = scale_bounds``. The top block of the
    hierarchy (``unconditional_prior=True``) has the prior N(0, I) and a posterior from the encoder alone.
    """

    def __init__(
        self,
        channels: int,
        encoder_channels: int,
        hidden_channels: int,
        latent_channels: int,
        kernel_size: int,
        last_scale: float,
        scale_bounds: tuple[float, float],
        unconditional_prior: bool = False,
    ) -> None:
        super().__init__()
        self.latent_channels = latent_channels
        self.scale_lo, self.scale_hi = float(scale_bounds[0]), float(scale_bounds[1])
        posterior_in = encoder_channels if unconditional_prior else encoder_channels + channels
        self.posterior = ResBlock(posterior_in, hidden_channels, 2 * latent_channels, kernel_size, residual=False)
        self.prior: Optional[ResBlock] = None
        if not unconditional_prior:
            self.prior = ResBlock(
                channels, hidden_channels, 2 * latent_channels + channels, kernel_size, residual=False, zero_last=True
            )
        self.z_proj = nn.Conv3d(latent_channels, channels, 1)
        with torch.no_grad():
            self.z_proj.weight.mul_(last_scale)
        self.activation_checkpointing = False  # set by VDVAE.set_activation_checkpointing

    def _scale(self, raw: torch.Tensor) -> torch.Tensor:
        return self.scale_lo + (self.scale_hi - self.scale_lo) * torch.sigmoid(raw)

    def prior_params(self, h: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prior mean and scale (B, Z, d, h, w) and the skip (B, C, d, h, w) added to the decoder state."""
        if self.prior is None:
            zeros = h.new_zeros([h.shape[0], self.latent_channels, h.shape[2], h.shape[3], h.shape[4]])
            return zeros, torch.ones_like(zeros), torch.zeros_like(h)
        z = self.latent_channels
        mu, raw_scale, skip = self.prior.forward_split(h, [z, z, h.shape[1]])
        return mu, self._scale(raw_scale), skip

    def posterior_params(self, h: torch.Tensor, lateral: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and scale (B, Z, d, h, w) from the encoder's lateral activation and the state h."""
        inp = lateral if self.prior is None else torch.cat([lateral, h], dim=1)
        z = self.latent_channels
        mu, raw_scale = self.posterior.forward_split(inp, [z, z])
        return mu, self._scale(raw_scale)

    def forward(
        self, h: torch.Tensor, lateral: torch.Tensor, use_posterior: bool = True, sample: bool = True, temperature: float = 1.0
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns (new h (B, C, d, h, w), KL of this group per volume (B,), float32; zeros when the posterior
        is not used). With ``activation_checkpointing`` in training, the block's activations are recomputed in
        the backward pass (same noise: the RNG state is restored) instead of being stored."""
        if not torch.jit.is_scripting():  # TorchScript has no checkpoint; scripted modules are for inference
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                return checkpoint(self._forward, h, lateral, use_posterior, sample, temperature, use_reentrant=False)
        return self._forward(h, lateral, use_posterior, sample, temperature)

    def _forward(
        self, h: torch.Tensor, lateral: torch.Tensor, use_posterior: bool, sample: bool, temperature: float
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        mu_p, scale_p, skip = self.prior_params(h)
        if use_posterior:
            mu_q, scale_q = self.posterior_params(h, lateral)
            kl = gaussian_kl_per_volume(mu_q, scale_q, mu_p, scale_p)
            # mu + scale * noise in float32, then the state's dtype
            z = torch.addcmul(mu_q.float(), scale_q.float(), standard_normal_like(mu_q)) if sample else mu_q
        else:
            kl = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
            z = torch.addcmul(mu_p.float(), scale_p.float(), standard_normal_like(mu_p), value=temperature) if sample else mu_p
        z = z.to(h.dtype)
        return h + skip + self.z_proj(z), kl


class VDVAE(nn.Module):
    """3D very deep VAE for single-channel volumes of ``resolution``^3 voxels scaled to [-1, 1].

    Args:
        resolution: voxels per axis, a power of two >= 2.
        channels: encoder block output widths per level (k+1 entries, full resolution first).
        channels_hidden: encoder bottleneck widths per level.
        channels_top_down: decoder state widths per level.
        channels_hidden_top_down: decoder bottleneck widths per level.
        channels_per_latent: latent channels per group at each level (capped by the decoder width there).
        latent_feature_maps_per_resolution: number of latent groups at each level (>= 1 at the 1^3 level).
        kernel_sizes_bottom_up: encoder kernel size (1, 2 or 3) per level.
        kernel_sizes_top_down: decoder kernel size (1, 2 or 3) per level.
        in_channels: image channels (1 for the reference model).
        convolutional_downsampling: stride-2 convolutions instead of nearest subsampling in the encoder.
        scale_hidden_clamp_bounds: [lo, hi] of the latent scales.
        scale_output_clamp_bounds: [lo, hi] of the per-voxel output scale.
        output_activation_function: "tanh" (reference) or "identity" for the output mean.
        predict_x_scale: learn the per-voxel output scale; when false it is fixed at ``fixed_x_scale``.
        fixed_x_scale: output scale used when ``predict_x_scale`` is false.
        activation_checkpointing: in training, store only the input of each residual block and latent group
            and recompute the rest in the backward pass: a fraction of the memory for 20-80% more time
            (see docs/performance.md). Has no effect on results, evaluation or sampling.
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
        activation_checkpointing: bool = False,
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
        if output_activation_function not in ("tanh", "identity"):
            raise ValueError(f"output_activation_function must be 'tanh' or 'identity', got {output_activation_function!r}")
        for name, bounds in (("scale_hidden_clamp_bounds", scale_hidden_clamp_bounds), ("scale_output_clamp_bounds", scale_output_clamp_bounds)):
            if len(bounds) != 2 or not 0 < bounds[0] < bounds[1]:
                raise ValueError(f"{name} must be [lo, hi] with 0 < lo < hi, got {list(bounds)}")
        self.resolution = int(resolution)
        self.in_channels = int(in_channels)
        self.num_levels = len(channels)
        self.output_tanh = output_activation_function == "tanh"
        self.predict_x_scale = bool(predict_x_scale)
        self.fixed_x_scale = float(fixed_x_scale)
        self.out_lo, self.out_hi = float(scale_output_clamp_bounds[0]), float(scale_output_clamp_bounds[1])
        hidden_bounds = (float(scale_hidden_clamp_bounds[0]), float(scale_hidden_clamp_bounds[1]))
        depth = sum(latent_feature_maps_per_resolution) + 2 * self.num_levels
        last_scale = math.sqrt(1.0 / depth)

        # ---- encoder (bottom-up) ----
        self.encoder_in = nn.Conv3d(in_channels, channels[0], 3, padding=1)
        self.encoder_levels = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        for i in range(self.num_levels):
            c_in = channels[max(i - 1, 0)]
            k = kernel_sizes_bottom_up[i]
            self.encoder_levels.append(
                nn.Sequential(
                    ResBlock(c_in, channels_hidden[i], channels[i], k, last_scale=last_scale),
                    ResBlock(channels[i], channels_hidden[i], channels[i], k, last_scale=last_scale),
                )
            )
            if i == self.num_levels - 1:
                self.downsamplers.append(nn.Identity())
            elif convolutional_downsampling:
                self.downsamplers.append(nn.Conv3d(channels[i], channels[i], 2, stride=2))
            else:
                self.downsamplers.append(Subsample())

        # ---- decoder (top-down), from the 1^3 level to full resolution ----
        self.decoder_blocks = nn.ModuleList()  # TopDownBlock per latent group, top first
        self.decoder_resblocks = nn.ModuleList()
        self.decoder_transitions = nn.ModuleList()  # LevelUps since the previous group (empty: same level)
        self.group_levels: List[int] = []  # level index of each group (0 = full resolution)
        top = self.num_levels - 1
        pending: list[nn.Module] = []
        for i in range(top, -1, -1):
            c = channels_top_down[i]
            if i < top:
                pending.append(LevelUp(channels_top_down[i + 1], c))
            z_ch = min(channels_per_latent[i], c)
            for j in range(latent_feature_maps_per_resolution[i]):
                self.decoder_transitions.append(nn.Sequential(*pending))
                pending = []
                self.decoder_blocks.append(
                    TopDownBlock(
                        c,
                        channels[i],
                        channels_hidden_top_down[i],
                        z_ch,
                        kernel_sizes_top_down[i],
                        last_scale,
                        hidden_bounds,
                        unconditional_prior=(i == top and j == 0),
                    )
                )
                self.decoder_resblocks.append(
                    ResBlock(c, channels_hidden_top_down[i], c, kernel_sizes_top_down[i], last_scale=last_scale)
                )
                self.group_levels.append(i)
        self.final_transition = nn.Sequential(*pending)  # up to full resolution after the last group
        self.top_channels = channels_top_down[top]
        self.output_head = nn.Conv3d(channels_top_down[0], 2 * in_channels, 1)

        for m in self.modules():
            if isinstance(m, nn.Conv3d) and m.bias is not None:
                nn.init.zeros_(m.bias)
        self.set_activation_checkpointing(activation_checkpointing)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Checkpoint every encoder residual block, latent group and decoder residual block (not nested)."""
        self.activation_checkpointing = bool(enabled)
        outer = [b for level in self.encoder_levels for b in level]
        for m in outer + list(self.decoder_blocks) + list(self.decoder_resblocks):
            m.activation_checkpointing = self.activation_checkpointing

    # ------------------------------------------------------------------ helpers
    @property
    def num_latent_groups(self) -> int:
        return len(self.decoder_blocks)

    def group_resolutions(self) -> list[int]:
        """Voxels per axis of each latent group, top of the hierarchy first."""
        return [self.resolution >> lvl for lvl in self.group_levels]

    def latent_dims_per_group(self) -> list[int]:
        """Number of latent dimensions (channels x voxels) of each group, top first."""
        return [b.latent_channels * r**3 for b, r in zip(self.decoder_blocks, self.group_resolutions())]

    def _check_input(self, x: torch.Tensor) -> None:
        r = self.resolution
        if x.dim() != 5 or x.shape[1] != self.in_channels or x.shape[2] != r or x.shape[3] != r or x.shape[4] != r:
            raise ValueError(f"VDVAE expects input of shape (B, {self.in_channels}, {r}, {r}, {r}), got {list(x.shape)}")

    def encode(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Lateral activations per level, full resolution first: [(B, channels[i], R/2^i, ...)]."""
        h = self.encoder_in(x)
        laterals: List[torch.Tensor] = []
        for level, down in zip(self.encoder_levels, self.downsamplers):
            h = level(h)
            laterals.append(h)
            h = down(h)
        return laterals

    def _output(self, h: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        out = self.output_head(h).float()
        mean = out[:, : self.in_channels]
        mean = torch.tanh(mean) if self.output_tanh else mean
        if self.predict_x_scale:
            scale = self.out_lo + (self.out_hi - self.out_lo) * torch.sigmoid(out[:, self.in_channels :])
        else:
            scale = torch.full_like(mean, self.fixed_x_scale)
        return mean, scale

    def decode(
        self,
        laterals: Optional[List[torch.Tensor]],
        batch_size: int,
        posterior_groups: int,
        sample_posterior: bool = True,
        sample_prior: bool = True,
        temperature: float = 1.0,
    ) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
        """Runs the top-down path. The first ``posterior_groups`` groups (top first) use the posterior and need
        ``laterals``; the rest use the prior. Returns (mean, scale) of the output Gaussian (B, C, R, R, R) and
        the per-volume KL of every group [(B,)] (zero for prior groups)."""
        ref = self.output_head.weight
        h = torch.zeros(batch_size, self.top_channels, 1, 1, 1, dtype=ref.dtype, device=ref.device)
        if laterals is not None:
            h = h.to(laterals[-1].dtype)
        kls: List[torch.Tensor] = []
        g = 0
        for transition, block, res in zip(self.decoder_transitions, self.decoder_blocks, self.decoder_resblocks):
            h = transition(h)
            if laterals is not None and g < posterior_groups:
                h, kl = block(h, laterals[self.group_levels[g]], True, sample_posterior, 1.0)
            else:
                h, kl = block(h, h, False, sample_prior, temperature)
            kls.append(kl)
            h = res(h)
            g += 1
        h = self.final_transition(h)
        mean, scale = self._output(h)
        return mean, scale, kls

    # ------------------------------------------------------------------ public API
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction mean (B, C, R, R, R) using the posterior means of every latent group."""
        self._check_input(x)
        mean, _, _ = self.decode(self.encode(x), x.shape[0], self.num_latent_groups, sample_posterior=False)
        return mean

    def forward_train(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass with posterior samples: output mean and scale (B, C, R, R, R), KL per group (B, G)."""
        self._check_input(x)
        mean, scale, kls = self.decode(self.encode(x), x.shape[0], self.num_latent_groups, sample_posterior=True)
        return mean, scale, torch.stack(kls, dim=1)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, generator_seed: int | None = None) -> torch.Tensor:
        """Output means of ``n`` samples (n, C, R, R, R). Each prior draws z ~ N(mu_p, (T * sigma_p)^2): the
        temperature scales only the standard deviation (Child 2021), so T -> 0 follows the prior means."""
        if n <= 0:
            raise ValueError(f"number of samples must be positive, got {n}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if generator_seed is not None:
            torch.manual_seed(generator_seed)
        mean, _, _ = self.decode(None, n, 0, sample_prior=True, temperature=temperature)
        return mean

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, down_to_resolution: int | None = None) -> torch.Tensor:
        """"Progressive" reconstruction (B, C, R, R, R): posterior means for the groups at resolutions
        <= ``down_to_resolution`` (all groups when None), prior means below."""
        self._check_input(x)
        if down_to_resolution is None:
            groups = self.num_latent_groups
        else:
            groups = sum(1 for r in self.group_resolutions() if r <= down_to_resolution)
        mean, _, _ = self.decode(self.encode(x), x.shape[0], groups, sample_posterior=False, sample_prior=False)
        return mean

    @torch.no_grad()
    def elbo(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Negative ELBO per volume: see :func:`scripts.losses.negative_elbo_terms` for the units."""
        from scripts.losses import negative_elbo_terms

        mean, scale, kl = self.forward_train(x)
        return negative_elbo_terms(x, mean, scale, kl)


class VDVAETrainingStep(nn.Module):
    """Wraps a :class:`VDVAE` so that its training pass is ``forward`` (what DistributedDataParallel calls).

    Shares parameters with ``vae``; its state dict is the VAE's under the prefix ``vae.``.
    """

    def __init__(self, vae: VDVAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.vae.forward_train(x)


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
        if name != "latent_feature_maps_per_resolution" and any(v < 1 for v in values):
            raise ValueError(f"{name} entries must be >= 1, got {list(values)}")
    if lists["latent_feature_maps_per_resolution"][-1] < 1:
        raise ValueError("latent_feature_maps_per_resolution must have at least 1 group at the 1^3 level (its last entry)")
    bad = [k for k in list(lists["kernel_sizes_bottom_up"]) + list(lists["kernel_sizes_top_down"]) if k not in (1, 2, 3)]
    if bad:
        raise ValueError(f"kernel_sizes_bottom_up / kernel_sizes_top_down entries must be 1, 2 or 3, got {bad}")
