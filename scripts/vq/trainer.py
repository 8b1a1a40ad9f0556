# Copyright 2026 The VDVAE bundle authors. Licensed under the Apache License, Version 2.0.
"""Ignite/MONAI engines of the VQ family, with the VDVAE trainer's conventions (``amp_mode``, ``channels_last``,
gradient clipping, ``state.output`` with ``loss`` and ``scalars``): stage 1 trains the VQ-VAE on images, stage 2 a
prior on the frozen token grids."""

from __future__ import annotations

import math
from typing import Any

import torch
from ignite.engine import Events
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce
from monai.engines import SupervisedTrainer
from monai.handlers import IgniteMetricHandler
from monai.metrics import PSNRMetric, SSIMMetric

from scripts.engine.training import (
    AmpEvaluator,
    AmpTrainer,
    autocast,
    backward_and_clip,
)
from scripts.vq.networks import codebook_usage

__all__ = [
    "VQVAETrainer",
    "VQVAEEvaluator",
    "PriorTrainer",
    "PriorEvaluator",
    "CodebookUsage",
    "reconstruction_metrics",
    "psnr_metric",
]


def _image(batch: dict, device, non_blocking: bool, channels_last: bool) -> torch.Tensor:
    x = batch["image"].to(device, non_blocking=non_blocking)
    x = x.as_tensor() if hasattr(x, "as_tensor") else x
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d if x.ndim == 5 else torch.channels_last)
    return x


def _step(engine: SupervisedTrainer, loss: torch.Tensor) -> float:
    """Backward (scaled under float16), clip to ``engine.clip``, step; returns the gradient norm (the update is
    skipped when it is not finite)."""
    grad_norm = backward_and_clip(loss, engine.optimizer, engine.scaler, engine.clip)["all"]
    if engine.scaler is not None:
        engine.scaler.step(engine.optimizer)
        engine.scaler.update()
    elif math.isfinite(grad_norm):
        engine.optimizer.step()
    return grad_norm


class VQVAETrainer(AmpTrainer):
    """Stage 1: ``network`` is a :class:`scripts.vq.networks.VQVAETrainingStep` (possibly in DDP). Loss = MSE of the
    reconstruction + the quantiser's commitment loss; the codebook moves by EMA.

    ``state.output``: ``image``, ``pred`` (reconstruction), ``tokens`` (B, *grid), ``recon_mse`` (B,), ``loss`` and
    ``scalars`` (loss, reconstruction MSE, commitment loss, batch codebook perplexity, gradient norm, learning rate).
    """

    def _iteration(self, engine: VQVAETrainer, batchdata: dict) -> dict:
        x = _image(batchdata, engine.state.device, engine.non_blocking, engine.channels_last)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        with autocast(engine.state.device, engine.amp_mode):
            recon, qloss, tokens = engine.network(x)
        mse = ((recon.float() - x) ** 2).flatten(1).mean(1)
        loss = mse.mean() + qloss
        grad_norm = _step(engine, loss)
        usage = codebook_usage(torch.bincount(tokens.reshape(-1), minlength=engine.num_embeddings))
        scalars = {
            "loss": float(loss.detach()),
            "recon_mse": float(mse.mean().detach()),
            "commitment_loss": float(qloss.detach()),
            "batch_perplexity": usage["perplexity"],
            "grad_norm": grad_norm if math.isfinite(grad_norm) else float("nan"),
            "learning_rate": float(engine.optimizer.param_groups[0]["lr"]),
        }
        engine.state.output = {
            "image": x,
            "pred": recon.detach().float(),
            "tokens": tokens,
            "recon_mse": mse.detach(),
            "loss": scalars["loss"],
            "scalars": scalars,
        }
        return engine.state.output

    @property
    def num_embeddings(self) -> int:
        net = getattr(self.network, "module", self.network)
        return net.vqvae.num_embeddings


class VQVAEEvaluator(AmpEvaluator):
    """Stage-1 validation: reconstructs through the codebook (eval mode, no EMA step). ``state.output``: ``image``,
    ``pred`` and ``recon`` (the reconstruction, for the metrics and for TensorBoard), ``tokens``, ``recon_mse`` (B,).
    ``network`` is the :class:`scripts.vq.networks.VQVAE`."""

    def _iteration(self, engine: VQVAEEvaluator, batchdata: dict) -> dict:
        x = _image(batchdata, engine.state.device, engine.non_blocking, engine.channels_last)
        engine.network.eval()
        with torch.no_grad(), autocast(engine.state.device, engine.amp_mode):
            tokens = engine.network.tokens(x)
            recon = engine.network.decode_tokens(tokens).float()
        mse = ((recon - x) ** 2).flatten(1).mean(1)
        recon = recon.clamp(-1, 1)
        engine.state.output = {"image": x, "pred": recon, "recon": recon, "tokens": tokens, "recon_mse": mse}
        return engine.state.output


class CodebookUsage(Metric):
    """Code use over an epoch from ``output["tokens"]``: ``<prefix>perplexity`` (exp of the entropy of code use; K when
    all K codes are used equally) and ``<prefix>dead_codes`` (codes never used). Exact under DDP (counts all-reduced)."""

    def __init__(self, num_embeddings: int, prefix: str = "", device: str | torch.device = "cpu") -> None:
        self.num_embeddings = int(num_embeddings)
        self.prefix = prefix
        super().__init__(output_transform=lambda out: out["tokens"], device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self.counts = torch.zeros(self.num_embeddings, dtype=torch.float64, device=self._device)

    @reinit__is_reduced
    def update(self, tokens: torch.Tensor) -> None:
        self.counts += torch.bincount(tokens.reshape(-1).to(self._device), minlength=self.num_embeddings).double()

    @sync_all_reduce("counts")
    def compute(self) -> dict:
        usage = codebook_usage(self.counts)
        return {f"{self.prefix}perplexity": usage["perplexity"], f"{self.prefix}dead_codes": float(usage["dead_codes"])}


def reconstruction_metrics(spatial_dims: int, num_embeddings: int, prefix: str = "val_") -> dict:
    """Validation metrics of stage 1: PSNR and SSIM (MONAI metrics, 2-D or 3-D, data range 2 for the [-1, 1] scale)
    and codebook usage. (The key metric, ``val_psnr``, is separate.)"""
    return {
        f"{prefix}ssim": IgniteMetricHandler(
            metric_fn=SSIMMetric(spatial_dims=spatial_dims, data_range=2.0, win_size=7),
            output_transform=lambda out: (out["pred"], out["image"]),
        ),
        f"{prefix}codebook": CodebookUsage(num_embeddings, prefix=prefix),
    }


def psnr_metric() -> IgniteMetricHandler:
    """PSNR (dB) of the reconstructions on the [-1, 1] scale (data range 2), MONAI's PSNRMetric."""
    return IgniteMetricHandler(
        metric_fn=PSNRMetric(max_val=2.0), output_transform=lambda out: (out["pred"], out["image"])
    )


def _covariates(batchdata: dict, engine) -> dict[str, torch.Tensor]:
    """{"covariates": (B, K)} on the engine's device when the token grids carry covariates, else {}."""
    if "covariates" not in batchdata:
        return {}
    return {"covariates": batchdata["covariates"].to(engine.state.device, non_blocking=engine.non_blocking).float()}


class PriorTrainer(AmpTrainer):
    """Stage 2: ``network`` is a prior (:class:`scripts.vq.networks.AutoregressivePrior` or :class:`scripts.vq.networks.AbsorbingDiffusionPrior`,
    possibly in DDP) whose forward maps token grids ``batch["tokens"]`` (B, *grid) (and their ``covariates`` (B, K),
    for a conditional prior) to its loss terms.

    ``state.output``: ``bits_per_token`` (B,; exact NLL or the ELBO estimate), ``loss`` and ``scalars``.
    """

    def _iteration(self, engine: PriorTrainer, batchdata: dict) -> dict:
        tokens = batchdata["tokens"].to(engine.state.device, non_blocking=engine.non_blocking).long()
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        with autocast(engine.state.device, engine.amp_mode):
            terms = engine.network(tokens, **_covariates(batchdata, engine))
        grad_norm = _step(engine, terms["loss"])
        scalars = {
            "loss": float(terms["loss"].detach()),
            "bits_per_token": float(terms["bits_per_token"].mean()),
            "grad_norm": grad_norm if math.isfinite(grad_norm) else float("nan"),
            "learning_rate": float(engine.optimizer.param_groups[0]["lr"]),
        }
        if "reweighted_bits_per_token" in terms:
            scalars["reweighted_elbo_bits_per_token"] = float(terms["reweighted_bits_per_token"].mean())
        engine.state.output = {"bits_per_token": terms["bits_per_token"], "loss": scalars["loss"], "scalars": scalars}
        return engine.state.output


class PriorEvaluator(AmpEvaluator):
    """Stage-2 validation: held-out bits per token (B,) of ``network`` (a prior): exact for the autoregressive prior,
    the mean of ``num_estimates`` ELBO draws for the absorbing prior (seeded by ``seed`` at every run, so epochs
    compare on the same draws)."""

    def __init__(self, *args: Any, num_estimates: int = 4, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.num_estimates = int(num_estimates)
        self.seed = int(seed)
        self._rng_state: torch.Tensor | None = None
        self.add_event_handler(Events.EPOCH_STARTED, self._seed)
        self.add_event_handler(Events.EPOCH_COMPLETED, self._restore)

    def _seed(self, engine: PriorEvaluator) -> None:
        self._rng_state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)

    def _restore(self, engine: PriorEvaluator) -> None:
        if self._rng_state is not None:
            torch.random.set_rng_state(self._rng_state)

    def _iteration(self, engine: PriorEvaluator, batchdata: dict) -> dict:
        tokens = batchdata["tokens"].to(engine.state.device, non_blocking=engine.non_blocking).long()
        prior = getattr(engine.network, "module", engine.network)
        prior.eval()
        with torch.no_grad(), autocast(engine.state.device, engine.amp_mode):
            bits = prior.nll_bits_per_token(tokens, engine.num_estimates, **_covariates(batchdata, engine)).float()
        engine.state.output = {"bits_per_token": bits}
        return engine.state.output
