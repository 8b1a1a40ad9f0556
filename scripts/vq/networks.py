# Copyright 2026 The VDVAE bundle authors. Licensed under the Apache License, Version 2.0.
"""The second generator family: a VQ-VAE (MONAI's) compresses a volume (or a 2-D slice) to a grid of codebook
indices ("tokens"); a prior over the tokens generates new grids, which the VQ-VAE decodes.

Two priors over a token grid of L positions and K codes, both (B, *grid) long tensors in, logits (B, L, K) out:

* :class:`AutoregressivePrior`: MONAI's causal ``DecoderOnlyTransformer`` over the tokens in a MONAI
  ``Ordering`` (raster scan, s-curve or random), with a begin-of-sequence token K; exact likelihood.
* :class:`AbsorbingDiffusionPrior`: a bidirectional transformer that predicts masked tokens (mask token K), trained
  with the reweighted ELBO of absorbing discrete diffusion (Austin et al. 2021; Bond-Taylor et al. 2022) and
  sampled by unmasking each still-masked token with probability 1/t at step t = T..1.

:class:`VQGenerator` joins a VQ-VAE and a prior behind the interface of both families,
:class:`scripts.engine.generator.Generator`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.inferers import VQVAETransformerInferer
from monai.networks.nets import VQVAE as MonaiVQVAE
from monai.networks.nets import DecoderOnlyTransformer
from monai.utils.ordering import Ordering
from torch import nn

from scripts.engine.metrics import summary

__all__ = [
    "STAGE1_COMMAND",
    "stage2_command",
    "VQVAE",
    "VQVAETrainingStep",
    "codebook_usage",
    "AutoregressivePrior",
    "AbsorbingDiffusionPrior",
    "absorbing_diffusion_loss",
    "VQGenerator",
    "select_prior",
    "require_prior",
]

logger = logging.getLogger(__name__)


def _no_autocast(device: torch.device):
    return torch.autocast(device.type, enabled=False)


class VQVAE(MonaiVQVAE):
    """MONAI's VQ-VAE (EMA codebook) at a fixed ``resolution``: each of the ``len(channels)`` levels halves the grid
    (stride-2, kernel-4 convolutions), so a (B, C, R, ..., R) input has a (R / 2^levels)^spatial_dims token grid.

    Differences from ``monai.networks.nets.VQVAE``: the nearest-code search and the codebook run in float32 under any
    autocast (MONAI disables CUDA autocast only; a bfloat16 distance on the CPU picks wrong codes), and the codebook
    takes no gradient (it is updated by EMA only, so DDP sees no unused parameter).

    Args:
        resolution: voxels per axis of the (cubic) input; divisible by 2 ** len(channels).
        spatial_dims: 3 for volumes, 2 for slices.
        in_channels: channels of the input (e.g. paired volumes); the output has as many.
        channels: encoder/decoder channels per level.
        num_res_layers: residual layers per level.
        num_embeddings: codebook size K.
        embedding_dim: dimension of each code.
        commitment_cost: weight of the commitment loss (seed 002: beta).
        decay: EMA decay of the codebook.
        activation_checkpointing: recompute the encoder and decoder activations in the backward pass (MONAI's
            ``use_checkpointing``): less memory, more time.
        dead_code_patience: a code unused for this many training steps is restarted at a random encoder output of
            the current batch (as in Jukebox / Dhariwal et al. 2020); without it, EMA codebooks collapse to a few
            codes. 0 disables. The step counts (``code_age``) are saved with the weights.
    """

    def __init__(
        self,
        resolution: int,
        spatial_dims: int = 3,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64),
        num_res_layers: int = 1,
        num_embeddings: int = 256,
        embedding_dim: int = 32,
        commitment_cost: float = 0.25,
        decay: float = 0.99,
        activation_checkpointing: bool = False,
        dead_code_patience: int = 20,
    ) -> None:
        levels = len(channels)
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if levels < 1 or resolution % (2**levels) != 0 or resolution < 2**levels:
            raise ValueError(
                f"resolution {resolution} must be divisible by 2 ** len(channels) = {2**levels} (each of the "
                f"{levels} levels halves the grid); change resolution or the number of channels"
            )
        super().__init__(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=in_channels,
            channels=tuple(channels),
            num_res_layers=num_res_layers,
            num_res_channels=tuple(channels),
            downsample_parameters=((2, 4, 1, 1),) * levels,
            upsample_parameters=((2, 4, 1, 1, 0),) * levels,
            num_embeddings=num_embeddings,
            embedding_dim=embedding_dim,
            commitment_cost=commitment_cost,
            decay=decay,
            use_checkpointing=activation_checkpointing,
        )
        self.resolution = int(resolution)
        self.token_grid = (resolution // 2**levels,) * spatial_dims
        self.quantizer.quantizer.embedding.weight.requires_grad_(False)
        if dead_code_patience < 0:
            raise ValueError(f"dead_code_patience must be >= 0, got {dead_code_patience}")
        self.dead_code_patience = int(dead_code_patience)
        self.register_buffer("code_age", torch.zeros(num_embeddings, dtype=torch.long))

    @property
    def codebook(self) -> nn.Module:
        """The EMAQuantizer (codebook ``embedding``, ``quantize``, ``embed``)."""
        return self.quantizer.quantizer

    def check_input(self, x: torch.Tensor) -> None:
        expected = (self.in_channels,) + (self.resolution,) * self.spatial_dims
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"VQVAE expects input of shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")

    def quantize(self, encodings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with _no_autocast(encodings.device):
            return super().quantize(encodings.float())

    def forward_with_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, C, *R) -> reconstruction (B, C, *R), quantisation (commitment) loss (scalar), tokens (B, *grid).
        In training mode the codebook takes an EMA step."""
        self.check_input(x)
        z = self.encode(x)
        with _no_autocast(z.device):
            quantized, qloss, tokens = self.codebook(z.float())
        if self.training and self.dead_code_patience > 0:
            self._restart_dead_codes(z.detach().float(), tokens)
        return self.decode(quantized), qloss, tokens

    @torch.no_grad()
    def _restart_dead_codes(self, z: torch.Tensor, tokens: torch.Tensor) -> None:
        """Ages every code by one step (0 when used by ``tokens`` on any rank); codes older than
        ``dead_code_patience`` move to random encoder outputs of ``z`` (B, D, *grid), chosen on rank 0."""
        counts = torch.bincount(tokens.reshape(-1), minlength=self.num_embeddings)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed:
            torch.distributed.all_reduce(counts)
        self.code_age.add_(1).masked_fill_(counts > 0, 0)
        dead = self.code_age >= self.dead_code_patience
        n = int(dead.sum())
        if n == 0:
            return
        cb = self.codebook
        flat = z.movedim(1, -1).reshape(-1, cb.embedding_dim)
        new = flat[torch.randint(0, flat.shape[0], (n,), device=flat.device)]
        cb.embedding.weight.data[dead] = new
        cb.ema_w.data[dead] = new
        cb.ema_cluster_size.data[dead] = 1.0
        self.code_age.masked_fill_(dead, 0)
        if distributed:
            for t in (cb.embedding.weight.data, cb.ema_w.data, cb.ema_cluster_size.data):
                torch.distributed.broadcast(t, src=0)

    @torch.no_grad()
    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *R) -> nearest-code indices (B, *grid), long. Never updates the codebook."""
        self.check_input(x)
        z = self.encode(x)
        with _no_autocast(z.device):
            return self.codebook.quantize(z.float())[2]

    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, *grid) long -> (B, C, *R) decoded volumes."""
        return self.decode(self.codebook.embed(tokens))

    def decode_samples(self, embedding_indices: torch.Tensor) -> torch.Tensor:  # used by VQVAETransformerInferer
        return self.decode_tokens(embedding_indices)


class VQVAETrainingStep(nn.Module):
    """Forward of a training step (what DDP wraps): x -> (reconstruction, quantisation loss, tokens)."""

    def __init__(self, vqvae: VQVAE) -> None:
        super().__init__()
        self.vqvae = vqvae

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.vqvae.forward_with_tokens(x)


def codebook_usage(counts: torch.Tensor) -> dict[str, float]:
    """From per-code counts (K,): ``perplexity`` (exp of the entropy of code use; K when uniform, 1 when one code
    is used) and ``dead_codes`` (codes never used)."""
    counts = counts.double()
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"perplexity": float(entropy.exp()), "dead_codes": int((counts == 0).sum())}


# ---------------------------------------------------------------------------------------------------- priors


class AutoregressivePrior(nn.Module):
    """Autoregressive prior over a token grid: MONAI ``DecoderOnlyTransformer`` on the tokens in a MONAI ``Ordering``.

    Args:
        token_grid: shape of the token grid, e.g. (8, 8, 8).
        num_embeddings: codebook size K (token K is the begin-of-sequence token).
        ordering: "raster_scan", "s_curve" or "random" (MONAI OrderingType).
        dim, depth, heads: width, number of layers and attention heads of the transformer.
        num_covariates: length K of the covariate features (:mod:`scripts.engine.covariates`) that condition the
            prior; 0 (default) for an unconditional prior. The features (B, K) are embedded linearly as one context
            token (B, 1, dim) that every position reads through the transformer's cross-attention.
    """

    def __init__(
        self,
        token_grid: Sequence[int],
        num_embeddings: int,
        ordering: str = "raster_scan",
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        num_covariates: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(num_covariates, int) or num_covariates < 0:
            raise ValueError(f"num_covariates must be a non-negative integer, got {num_covariates!r}")
        self.num_covariates = num_covariates
        self.token_grid = tuple(int(s) for s in token_grid)
        self.num_embeddings = int(num_embeddings)
        self.seq_len = math.prod(self.token_grid)
        self.ordering = Ordering(
            ordering_type=ordering, spatial_dims=len(self.token_grid), dimensions=(1,) + self.token_grid
        )
        self.transformer = DecoderOnlyTransformer(
            num_tokens=num_embeddings + 1,
            max_seq_len=self.seq_len,
            attn_layers_dim=dim,
            attn_layers_depth=depth,
            attn_layers_heads=heads,
            with_cross_attention=num_covariates > 0,
        )
        self.covariate_embedding = nn.Linear(num_covariates, dim) if num_covariates > 0 else None
        # MONAI's blocks build a cross-attention LayerNorm even without cross-attention; it never gets a gradient,
        # which DistributedDataParallel refuses ("parameters did not receive gradient"), so it is frozen
        for name, param in self.transformer.named_parameters():
            if "norm_cross_attn" in name and num_covariates == 0:
                param.requires_grad_(False)
        self.register_buffer(
            "order", torch.as_tensor(self.ordering.get_sequence_ordering(), dtype=torch.long), persistent=False
        )

    def _sequence(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.reshape(tokens.shape[0], -1)[:, self.order]

    def context(self, covariates: torch.Tensor | None, batch_size: int) -> torch.Tensor | None:
        """The cross-attention context (B, 1, dim) of covariate features (B, K); None for an unconditional prior.
        A conditional prior without ``covariates`` uses all-zero features (the training mean of numeric ones)."""
        if self.covariate_embedding is None:
            if covariates is not None:
                raise ValueError("this prior is unconditional (num_covariates 0) but covariates were given")
            return None
        weight = self.covariate_embedding.weight
        if covariates is None:
            covariates = torch.zeros(batch_size, self.num_covariates, device=weight.device)
        if covariates.dim() != 2 or tuple(covariates.shape) != (batch_size, self.num_covariates):
            raise ValueError(
                f"covariates must be ({batch_size}, {self.num_covariates}) for a batch of {batch_size}, "
                f"got {list(covariates.shape)}"
            )
        return self.covariate_embedding(covariates.to(weight)).unsqueeze(1)

    def token_nll(self, tokens: torch.Tensor, covariates: torch.Tensor | None = None) -> torch.Tensor:
        """(B, *grid) -> exact negative log-likelihood per token position (B, L) in nats, in sequence order
        (``covariates`` (B, K): those of the volumes, for a conditional prior)."""
        seq = self._sequence(tokens)
        inputs = F.pad(seq[:, :-1], (1, 0), value=self.num_embeddings)
        logits = self.transformer(inputs, self.context(covariates, len(seq))).float()[..., : self.num_embeddings]
        return F.cross_entropy(logits.transpose(1, 2), seq, reduction="none")

    def loss(self, tokens: torch.Tensor, covariates: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Training loss: mean NLL in bits per token; ``bits_per_token`` (B,) per grid."""
        bits = self.token_nll(tokens, covariates).mean(1) / math.log(2)
        return {"loss": bits.mean(), "bits_per_token": bits.detach()}

    forward = loss  # what a trainer (or DDP) calls

    def nll_bits_per_token(
        self, tokens: torch.Tensor, num_estimates: int = 1, covariates: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Exact held-out NLL (B,) in bits per token (``num_estimates`` is ignored: nothing is estimated)."""
        return self.token_nll(tokens, covariates).mean(1) / math.log(2)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        temperature: float = 1.0,
        known: torch.Tensor | None = None,
        known_mask: torch.Tensor | None = None,
        covariates: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """n token grids (n, *grid), drawn one position at a time in the ordering from softmax(logits / temperature).
        With ``known`` (n, *grid) and ``known_mask`` (n, *grid) bool, masked positions keep the known tokens."""
        device = self.order.device
        seq = torch.full((n, 1), self.num_embeddings, dtype=torch.long, device=device)
        known_seq = self._sequence(known.to(device)) if known is not None else None
        mask_seq = self._sequence(known_mask.to(device)) if known_mask is not None else None
        context = self.context(covariates, n)
        for i in range(self.seq_len):
            logits = self.transformer(seq, context).float()[:, -1, : self.num_embeddings] / temperature
            nxt = torch.multinomial(F.softmax(logits, -1), 1)
            if known_seq is not None:
                nxt = torch.where(mask_seq[:, i : i + 1], known_seq[:, i : i + 1], nxt)
            seq = torch.cat([seq, nxt], 1)
        return seq[:, 1:][:, torch.as_tensor(self.ordering.get_revert_sequence_ordering(), device=device)].reshape(
            (n,) + self.token_grid
        )


class AbsorbingTransformer(nn.Module):
    """Bidirectional transformer over (B, L) tokens in [0, K] (K = mask) -> logits (B, L, K) over the codes:
    token + learned position embeddings, pre-norm ``nn.TransformerEncoder`` layers (GELU), final LayerNorm, linear head
    (the denoiser of seed 003)."""

    def __init__(self, seq_len: int, num_embeddings: int, dim: int = 128, depth: int = 4, heads: int = 4) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(num_embeddings + 1, dim)
        self.position_embedding = nn.Parameter(torch.zeros(1, seq_len, dim))
        nn.init.normal_(self.position_embedding, std=0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_embeddings)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.token_embedding(tokens) + self.position_embedding
        return self.head(self.norm(self.layers(h)))


def absorbing_diffusion_loss(
    logits_fn, x0: torch.Tensor, num_timesteps: int, mask_id: int, t: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Absorbing-diffusion training terms for token sequences ``x0`` (B, L).

    Draws t ~ U{1..T} per sequence (unless ``t`` (B,) is given), masks each token with probability t/T, and with
    CE = cross-entropy of ``logits_fn(x_t)`` summed over the masked tokens:

    * ``loss``: mean over the batch of the reweighted ELBO (1 - t/T) * CE / (ln 2 * L), the training objective;
    * ``elbo_bits_per_token`` (B,): (T/t) * CE / (ln 2 * L), an unbiased one-sample estimate of the ELBO (an
      upper bound on the NLL) in bits per token;
    * ``t`` (B,) and ``masked`` (B, L) bool.
    """
    b, length = x0.shape
    if t is None:
        t = torch.randint(1, num_timesteps + 1, (b,), device=x0.device)
    masked = torch.rand(b, length, device=x0.device) < (t.float() / num_timesteps).unsqueeze(1)
    x_t = torch.where(masked, torch.full_like(x0, mask_id), x0)
    logits = logits_fn(x_t).float()
    ce = F.cross_entropy(logits.transpose(1, 2), x0, reduction="none")
    ce = (ce * masked).sum(1)
    norm = math.log(2) * length
    reweighted = (1.0 - t.float() / num_timesteps) * ce / norm
    elbo = (num_timesteps / t.float()) * ce / norm
    return {
        "loss": reweighted.mean(),
        "reweighted_bits_per_token": reweighted.detach(),
        "elbo_bits_per_token": elbo.detach(),
        "t": t,
        "masked": masked,
    }


class AbsorbingDiffusionPrior(nn.Module):
    """Absorbing (masked) discrete diffusion prior over a token grid (seed 003; Bond-Taylor et al. 2022).

    Args:
        token_grid: shape of the token grid, e.g. (8, 8, 8).
        num_embeddings: codebook size K (token K is the mask).
        num_timesteps: diffusion steps T (also the sampling steps).
        dim, depth, heads: width, number of layers and attention heads of the denoising transformer.
    """

    def __init__(
        self,
        token_grid: Sequence[int],
        num_embeddings: int,
        num_timesteps: int = 256,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
    ) -> None:
        super().__init__()
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
        self.token_grid = tuple(int(s) for s in token_grid)
        self.num_embeddings = int(num_embeddings)
        self.mask_id = int(num_embeddings)
        self.num_timesteps = int(num_timesteps)
        self.seq_len = math.prod(self.token_grid)
        self.denoiser = AbsorbingTransformer(self.seq_len, num_embeddings, dim, depth, heads)

    @staticmethod
    def _unconditional(covariates: torch.Tensor | None) -> None:
        if covariates is not None:
            raise ValueError(
                "the absorbing-diffusion prior is unconditional: with covariates_csv train the autoregressive prior "
                "(configs/vq_prior_autoregressive.json)"
            )

    def loss(self, tokens: torch.Tensor, covariates: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Training terms of :func:`absorbing_diffusion_loss` for (B, *grid) tokens; ``bits_per_token`` is the
        ELBO estimate."""
        self._unconditional(covariates)
        terms = absorbing_diffusion_loss(
            self.denoiser, tokens.reshape(tokens.shape[0], -1), self.num_timesteps, self.mask_id
        )
        return {
            "loss": terms["loss"],
            "bits_per_token": terms["elbo_bits_per_token"],
            "reweighted_bits_per_token": terms["reweighted_bits_per_token"],
        }

    forward = loss  # what a trainer (or DDP) calls

    def nll_bits_per_token(
        self, tokens: torch.Tensor, num_estimates: int = 4, covariates: torch.Tensor | None = None
    ) -> torch.Tensor:
        """ELBO (an upper bound on the NLL) in bits per token (B,), averaged over ``num_estimates`` draws of (t, mask)."""
        self._unconditional(covariates)
        x0 = tokens.reshape(tokens.shape[0], -1)
        draws = [
            absorbing_diffusion_loss(self.denoiser, x0, self.num_timesteps, self.mask_id)["elbo_bits_per_token"]
            for _ in range(num_estimates)
        ]
        return torch.stack(draws).mean(0)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        temperature: float = 1.0,
        known: torch.Tensor | None = None,
        known_mask: torch.Tensor | None = None,
        covariates: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """n token grids (n, *grid). Starts fully masked (except ``known_mask`` positions, which keep ``known``);
        at step t = T..1 unmasks each still-masked position with probability 1/t (all remaining ones at t = 1),
        drawing its token from softmax(logits / temperature)."""
        self._unconditional(covariates)
        device = self.denoiser.position_embedding.device
        x = torch.full((n, self.seq_len), self.mask_id, dtype=torch.long, device=device)
        unmasked = torch.zeros(n, self.seq_len, dtype=torch.bool, device=device)
        if known is not None:
            keep = known_mask.to(device).reshape(n, -1)
            x = torch.where(keep, known.to(device).reshape(n, -1), x)
            unmasked = keep.clone()
        for t in range(self.num_timesteps, 0, -1):
            change = (torch.rand(n, self.seq_len, device=device) < 1.0 / t) & ~unmasked
            if not change.any():
                continue
            logits = self.denoiser(x).float() / temperature
            draw = torch.distributions.Categorical(logits=logits).sample()
            x = torch.where(change, draw, x)
            unmasked |= change
        return x.reshape((n,) + self.token_grid)


# ---------------------------------------------------------------------------------------------------- generator


class VQGenerator(nn.Module):
    """A VQ-VAE and a prior over its tokens, as one :class:`scripts.engine.generator.Generator`.

    Args:
        vqvae: the trained stage-1 :class:`VQVAE` (frozen).
        prior: an :class:`AutoregressivePrior` or :class:`AbsorbingDiffusionPrior` over its token grid.
        likelihood_estimates: draws of the absorbing ELBO per volume in :meth:`heldout_likelihood`.
    """

    def __init__(self, vqvae: VQVAE, prior: nn.Module, likelihood_estimates: int = 4) -> None:
        super().__init__()
        if tuple(prior.token_grid) != tuple(vqvae.token_grid) or prior.num_embeddings != vqvae.num_embeddings:
            raise ValueError(
                f"the prior models {prior.num_embeddings} codes on a {tuple(prior.token_grid)} grid but the VQ-VAE has "
                f"{vqvae.num_embeddings} codes on a {tuple(vqvae.token_grid)} grid: train the prior on this VQ-VAE's tokens"
            )
        self.vqvae = vqvae
        self.prior = prior
        self.likelihood_estimates = int(likelihood_estimates)
        self.resolution = vqvae.resolution

    def forward(self, x: torch.Tensor, covariates: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction through the codebook: (B, C, *R) -> (B, C, *R) (the VQ-VAE is unconditional: a conditional
        prior's ``covariates`` do not change it)."""
        return self.vqvae.decode_tokens(self.vqvae.tokens(x))

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, covariates: torch.Tensor | None = None) -> torch.Tensor:
        """n generated volumes (n, C, *R), a conditional prior's at ``covariates`` (n, K) (None: all-zero features).
        The autoregressive prior samples through MONAI's VQVAETransformerInferer."""
        if isinstance(self.prior, AutoregressivePrior):
            bos = torch.full((n, 1), self.vqvae.num_embeddings, dtype=torch.long, device=self.prior.order.device)
            return VQVAETransformerInferer().sample(
                self.prior.token_grid,
                bos,
                self.vqvae,
                self.prior.transformer,
                self.prior.ordering,
                conditioning=self.prior.context(covariates, n),
                temperature=temperature,
                verbose=False,
            )
        return self.vqvae.decode_tokens(self.prior.sample(n, temperature, covariates=covariates))

    @torch.no_grad()
    def complete(
        self, x: torch.Tensor, keep: torch.Tensor, temperature: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Completes volumes from a part of them: the tokens of ``x`` (B, C, *R) where ``keep`` (B, *grid) is True are
        kept, the rest generated by the prior. Returns (volumes (B, C, *R), tokens (B, *grid))."""
        known = self.vqvae.tokens(x)
        tokens = self.prior.sample(x.shape[0], temperature, known=known, known_mask=keep)
        return self.vqvae.decode_tokens(tokens), tokens

    @torch.no_grad()
    def heldout_likelihood(self, x: torch.Tensor, covariates: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Held-out likelihood of the tokens of ``x``: ``bits_per_token`` (B,), exact for the autoregressive prior, an
        ELBO (upper bound) for the absorbing prior. It scores the token grid only, not the voxels (the VQ-VAE
        decoder is deterministic), so it is not comparable with the VDVAE's bits per voxel."""
        tokens = self.vqvae.tokens(x)
        bits = self.prior.nll_bits_per_token(tokens, self.likelihood_estimates, covariates=covariates)
        return {"bits_per_token": bits.float()}

    # the rest of the interface of scripts.engine.generator.Generator

    def likelihood_report(self, terms: dict[str, torch.Tensor], kl_active_threshold: float = 1.0) -> dict:
        """The prior's bits per token of the held-out token grids (``kl_active_threshold`` does not apply)."""
        bits = terms["bits_per_token"].numpy()
        tokens = math.prod(self.vqvae.token_grid)
        return {
            "bits_per_token": summary(bits),
            "tokens_per_volume": tokens,
            "bits_per_volume": float(bits.mean() * tokens),
            "kind": self.describe()["likelihood"],
            "note": (
                "the likelihood of the token grid under the prior; the VQ-VAE decoder is deterministic, so this is not a "
                "likelihood of the voxels and cannot be compared with the VDVAE's bits per voxel"
            ),
        }

    def reconstruction_note(self) -> str:
        return "reconstructions through the codebook (decoded token grids)"

    def describe(self) -> dict:
        exact = isinstance(self.prior, AutoregressivePrior)
        return {
            "family": "vq-vae + " + ("autoregressive transformer" if exact else "absorbing diffusion transformer"),
            "token_grid": list(self.vqvae.token_grid),
            "num_embeddings": self.vqvae.num_embeddings,
            "likelihood": "exact NLL of the tokens"
            if exact
            else f"ELBO of the tokens (upper bound on the NLL), mean of {self.likelihood_estimates} draws",
        }


# ---------------------------------------------------------------------------------------------------- stage 2


def require_prior(network: nn.Module) -> nn.Module:
    """``network`` when it is a prior; else a ValueError saying that stage 2 needs a prior overlay."""
    if not isinstance(network, (AutoregressivePrior, AbsorbingDiffusionPrior)):
        raise ValueError(
            "configs/vq_prior.json trains a prior over the stage-1 tokens: put a prior overlay after it, "
            "configs/vq_prior_autoregressive.json or configs/vq_prior_absorbing.json"
        )
    return network


STAGE1_COMMAND = "python -m monai.bundle run --config_file configs/vqvae_train.json"


def stage2_command(prior: str) -> str:
    """The command that trains the prior ``prior`` and writes ``models/vq_prior_<prior>.pt``, for error messages."""
    return (
        "python -m monai.bundle run --config_file "
        f"\"['configs/vqvae_train.json','configs/vq_prior.json','configs/vq_prior_{prior}.json']\" "
        f"(the prior of --prior {prior}; --prior chooses another trained one)"
    )


def select_prior(priors: dict, name: str) -> nn.Module:
    """``priors[name]``, or a ValueError naming the choices."""
    if name not in priors:
        raise ValueError(f"prior must be one of {sorted(priors)}, got {name!r}")
    return priors[name]
