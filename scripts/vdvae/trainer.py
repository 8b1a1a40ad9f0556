# Copyright 2026 The VDVAE bundle authors. Licensed under the Apache License, Version 2.0.
"""Ignite/MONAI engines for the VDVAE: a trainer with clipping, safe gradient skipping, mixed precision and EMA,
and an evaluator that reports the negative ELBO per volume."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from scripts.engine.sampling import TRAIN_COMMAND, load_weights
from scripts.engine.training import (
    AmpEvaluator,
    AmpTrainer,
    autocast,
    backward_and_clip,
)
from scripts.vdvae.loss import negative_elbo_terms

__all__ = [
    "VDVAETrainer",
    "VDVAEEvaluator",
    "GradientSkipper",
    "make_ema",
    "initial_weights",
    "trainable_parameters",
    "is_prior_parameter",
    "TRAIN_ONLY",
]

TRAIN_ONLY = ("all", "priors")


def initial_weights(network: nn.Module, init_weights: str | None) -> nn.Module:
    """``network`` as built (``init_weights`` None) or with the weights of a trained model (a ``models/model.pt`` of
    the same architecture and function-changing options, checked as at inference), in training mode."""
    if init_weights is None:
        return network
    return load_weights(network, init_weights, "cpu", "init_weights", TRAIN_COMMAND).train()


def is_prior_parameter(name: str) -> bool:
    """Whether the parameter ``name`` belongs to a latent group's prior p(z | h): its conv stack ``prior`` and its
    heads ``prior_mean``, ``prior_scale`` and ``prior_skip`` (:class:`scripts.vdvae.network.TopDownBlock`)."""
    return any(part in ("prior", "prior_mean", "prior_scale", "prior_skip") for part in name.split("."))


def trainable_parameters(network: nn.Module, train_only: str = "all") -> list[nn.Parameter]:
    """The parameters the optimiser updates: all of them (``"all"``), or the latent priors' alone (``"priors"``:
    prior-only fine-tuning of a trained model, ``--init_weights``; the encoder, the posteriors, the decoder's other
    layers and the output head are frozen, ``requires_grad`` False, so they stay bit-identical)."""
    if train_only not in TRAIN_ONLY:
        raise ValueError(f"train_only must be one of {TRAIN_ONLY}, got {train_only!r}")
    chosen = []
    for name, p in network.named_parameters():
        p.requires_grad_(train_only == "all" or is_prior_parameter(name))
        if p.requires_grad:
            chosen.append(p)
    if not chosen:
        raise ValueError(f"train_only {train_only!r}: the network has no such parameters")
    return chosen


def make_ema(network: nn.Module, decay: float) -> AveragedModel | None:
    """Exponential moving average of ``network``'s weights (torch's AveragedModel), or None when decay is 0."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {decay}")
    if decay == 0.0:
        return None
    return AveragedModel(network, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def _all_ranks_agree(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` holds on any rank (so every rank takes the same decision under DDP)."""
    if dist.is_available() and dist.is_initialized():
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)
    return flag


class GradientSkipper:
    """Decides whether to skip an update from its gradient norm (the largest of the per-part norms).

    Reference rule (``gradient_skip_factor`` = 0, the default): skip when the norm is >= ``gradient_skipping_value``
    (1e12) or not finite, but never a finite one in the first ``warmup_iterations - 1`` iterations (50 -> iterations
    1-49). The reference also applies non-finite updates in those iterations, which turns every weight into NaN; here
    a non-finite update is always skipped.

    Adaptive rule (``gradient_skip_factor`` > 0, this bundle's option): also skip when the norm exceeds
    ``gradient_skip_factor * median of the last `window` finite norms`` (once ``min_window`` norms have been seen).
    Every finite norm, skipped or not, enters the window, so a lasting rise of the norm raises the threshold within
    ``window / 2`` steps instead of skipping forever (the failure of a fixed threshold).

    Either way, after ``max_consecutive_skips`` skips in a row a RuntimeError says so.
    """

    def __init__(
        self,
        gradient_skipping_value: float = 1e12,
        gradient_skip_factor: float = 0.0,
        warmup_iterations: int = 50,
        window: int = 100,
        min_window: int = 20,
        max_consecutive_skips: int = 50,
    ) -> None:
        if (
            gradient_skipping_value <= 0
            or gradient_skip_factor < 0
            or window < 1
            or max_consecutive_skips < 1
            or warmup_iterations < 0
        ):
            raise ValueError(
                "gradient_skipping_value must be > 0, gradient_skip_factor and warmup_iterations >= 0, window and "
                "max_consecutive_skips >= 1"
            )
        self.fixed = float(gradient_skipping_value)
        self.factor = float(gradient_skip_factor)
        self.warmup_iterations = int(warmup_iterations)
        self.min_window = int(min_window)
        self.max_consecutive = int(max_consecutive_skips)
        self.norms: deque[float] = deque(maxlen=int(window))
        self.consecutive = 0
        self.skipped_total = 0
        self.nonfinite_total = 0

    def threshold(self) -> float:
        """The current norm threshold: adaptive once warmed up, else the fixed value."""
        if self.factor > 0 and len(self.norms) >= self.min_window:
            return self.factor * sorted(self.norms)[len(self.norms) // 2]
        return self.fixed

    def should_skip(self, grad_norm: float, iteration: int | None = None) -> bool:
        """Whether to skip the update of (1-based) ``iteration`` (None: past the warm-up) whose norm is ``grad_norm``."""
        finite = math.isfinite(grad_norm)
        in_warmup = iteration is not None and iteration < self.warmup_iterations
        skip = (not finite) or (grad_norm >= self.threshold() and not in_warmup)
        if finite:
            self.norms.append(grad_norm)
        return skip

    def record(self, skipped: bool, nonfinite: bool) -> None:
        if not skipped:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.skipped_total += 1
        self.nonfinite_total += int(nonfinite)
        if self.consecutive >= self.max_consecutive:
            raise RuntimeError(
                f"{self.consecutive} consecutive updates were skipped (gradient norm non-finite or above "
                f"{self.threshold():.4g}; {self.nonfinite_total} non-finite in total). Training has diverged or "
                "the skip threshold is too low: lower learning_rate, use amp='none', or raise "
                "gradient_skipping_value / gradient_skip_factor / max_consecutive_skips."
            )

    def state_dict(self) -> dict:
        return {
            "norms": list(self.norms),
            "consecutive": self.consecutive,
            "skipped_total": self.skipped_total,
            "nonfinite_total": self.nonfinite_total,
        }

    def load_state_dict(self, state: dict) -> None:
        self.norms.clear()
        self.norms.extend(float(v) for v in state["norms"])
        self.consecutive = int(state["consecutive"])
        self.skipped_total = int(state["skipped_total"])
        self.nonfinite_total = int(state["nonfinite_total"])


class VDVAETrainer(AmpTrainer):
    """SupervisedTrainer for the VDVAE ELBO.

    ``network`` is a module whose forward returns (mean, scale, kl_per_group), i.e. a
    :class:`scripts.vdvae.network.VDVAETrainingStep`, possibly wrapped in DistributedDataParallel; ``loss_function``
    is a :class:`scripts.vdvae.loss.ELBOLoss`. Each iteration: forward under ``amp`` autocast, backward, clip the
    gradient norm to ``gradient_clipping_value`` separately for encoder, decoder and output head (as the reference
    does; ``VDVAE.clipping_groups``), skip the update when :class:`GradientSkipper` says so (the
    decision is all-reduced, so under DDP every rank skips together), step, update the EMA.

    ``engine.state.output`` holds ``image``, ``recon`` (posterior-sample output mean), ``loss`` (float) and
    ``scalars`` (a dict of floats for TensorBoard: loss, ELBO terms, KL per group, gradient norm per part, skipped
    updates, learning rate).

    Args (beyond :class:`AmpTrainer`'s ``amp_mode`` ("none", "bfloat16" on CPU or CUDA, "float16" on CUDA),
    ``gradient_clipping_value`` (reference: 100) and ``channels_last``):
        skipper: a :class:`GradientSkipper`.
        ema: an AveragedModel of the VAE (from :func:`make_ema`), or None.
        group_names: names of the latent groups for the KL scalars.
    """

    def __init__(
        self,
        *args: Any,
        skipper: GradientSkipper | None = None,
        ema: AveragedModel | None = None,
        group_names: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.skipper = skipper if skipper is not None else GradientSkipper()
        self.ema = ema
        self.group_names = list(group_names) if group_names is not None else None
        self.state.skipped_updates = 0  # logged per epoch

    def _iteration(self, engine: VDVAETrainer, batchdata: dict[str, torch.Tensor]) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        x = batchdata["image"].to(engine.state.device, non_blocking=engine.non_blocking)
        x = x.as_tensor() if hasattr(x, "as_tensor") else x
        if engine.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        condition = _covariates(batchdata, engine)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        with autocast(engine.state.device, engine.amp_mode):
            mean, scale, kl = engine.inferer(x, engine.network, **condition)
        terms = engine.loss_function(x, mean, scale, kl, step=engine.state.iteration)
        loss = terms["loss"]
        terms = {k: v.detach() for k, v in terms.items()}
        norms = backward_and_clip(
            loss, engine.optimizer, engine.scaler, engine.clip, _unwrap_vae(engine.network).clipping_groups()
        )
        grad_norm = max(norms.values())  # nan and inf propagate
        if any(not math.isfinite(n) for n in norms.values()):
            grad_norm = float("nan")
        skip_local = engine.skipper.should_skip(grad_norm, engine.state.iteration)
        skip = _all_ranks_agree(skip_local, torch.device(engine.state.device))
        nonfinite = not math.isfinite(grad_norm)
        if engine.scaler is not None:
            if skip:  # the scaler must still see the overflow to lower its scale
                engine.optimizer.zero_grad(set_to_none=True)
                engine.scaler.update()
            else:
                engine.scaler.step(engine.optimizer)
                engine.scaler.update()
        elif not skip:
            engine.optimizer.step()
        if not skip and engine.ema is not None:
            engine.ema.update_parameters(_unwrap_vae(engine.network))
        engine.skipper.record(skip, nonfinite)
        engine.state.skipped_updates = engine.skipper.skipped_total

        scalars = {
            "loss": float(loss.detach()),
            "neg_elbo_nats_per_voxel": float(terms["neg_elbo_nats"]),
            "neg_elbo_bits_per_voxel": float(terms["neg_elbo_bits"]),
            "nll_nats_per_volume": float(terms["nll"]),
            "kl_nats_per_volume": float(terms["kl"]),
            **{f"grad_norm/{name}": norm if math.isfinite(norm) else float("nan") for name, norm in norms.items()},
            "skipped_updates": float(engine.skipper.skipped_total),
            "learning_rate": float(engine.optimizer.param_groups[0]["lr"]),
        }
        names = engine.group_names or [f"{i:02d}" for i in range(terms["kl_per_group"].numel())]
        for name, value in zip(names, terms["kl_per_group"].tolist()):
            scalars[f"kl_per_group/{name}"] = value
        engine.state.output = {
            "image": x.detach(),
            "recon": mean.detach(),
            "loss": scalars["loss"],
            "neg_elbo_nats": terms["neg_elbo_nats"],
            "scalars": scalars,
        }
        return engine.state.output


def _covariates(batchdata: dict, engine) -> dict[str, torch.Tensor]:
    """{"covariates": (B, K)} on the engine's device when the batch carries covariates, else {}."""
    if "covariates" not in batchdata:
        return {}
    c = batchdata["covariates"]
    c = c.as_tensor() if hasattr(c, "as_tensor") else c
    return {"covariates": c.to(engine.state.device, non_blocking=engine.non_blocking).float()}


def _unwrap_vae(module: nn.Module) -> nn.Module:
    """The VDVAE inside DDP and/or a VDVAETrainingStep wrapper."""
    module = getattr(module, "module", module)  # DistributedDataParallel
    return getattr(module, "vae", module)


class VDVAEEvaluator(AmpEvaluator):
    """Evaluator whose output holds per-volume ELBO figures (see :func:`scripts.vdvae.loss.negative_elbo_terms`):
    ``neg_elbo_nats``, ``neg_elbo_bits``, ``kl_per_group`` (B, G), plus ``image`` and ``recon`` (posterior
    means). ``network`` is the VDVAE (or its EMA: an AveragedModel, whose ``module`` is used)."""

    def _iteration(self, engine: VDVAEEvaluator, batchdata: dict[str, torch.Tensor]) -> dict:
        x = batchdata["image"].to(engine.state.device, non_blocking=engine.non_blocking)
        x = x.as_tensor() if hasattr(x, "as_tensor") else x
        if engine.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        condition = _covariates(batchdata, engine)
        vae = engine.network.module if isinstance(engine.network, AveragedModel) else engine.network
        vae.eval()
        with torch.no_grad(), autocast(engine.state.device, engine.amp_mode):
            mean, scale, kl = vae.forward_train(x, **condition)
            terms = negative_elbo_terms(x, mean, scale, kl)
            recon = vae.reconstruct(x, **condition) if engine.state.iteration == 1 else None
        engine.state.output = {"image": x, "recon": recon, **terms}
        return engine.state.output
