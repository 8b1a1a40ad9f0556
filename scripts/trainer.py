# Copyright 2026 The VDVAE bundle authors. Licensed under the Apache License, Version 2.0.
"""Ignite/MONAI engines for the VDVAE: a trainer with clipping, safe gradient skipping, mixed precision and EMA,
and an evaluator that reports the negative ELBO per volume."""

from __future__ import annotations

import contextlib
import ctypes
import math
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from ignite.metrics import Average
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from scripts.losses import negative_elbo_terms

__all__ = ["configure_allocator", "backward_and_clip", "AmpTrainer", "AmpEvaluator", "VDVAETrainer", "VDVAEEvaluator", "GradientSkipper", "make_ema", "autocast", "AMP_MODES"]

AMP_MODES = ("none", "bfloat16", "float16")


def autocast(device: torch.device | str, amp: str):
    """Autocast context for ``amp`` in AMP_MODES: bfloat16 on CPU or CUDA, float16 on CUDA only."""
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {AMP_MODES}, got {amp!r}")
    device_type = torch.device(device).type
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "float16" and device_type != "cuda":
        raise ValueError("amp='float16' needs a CUDA device; use amp='bfloat16' on CPU")
    return torch.autocast(device_type, dtype=torch.bfloat16 if amp == "bfloat16" else torch.float16)


def configure_allocator(lean_memory: bool) -> bool:
    """Tells glibc's malloc what to do with the large activation blocks that every step allocates and frees.

    ``lean_memory=False`` (speed: training without activation checkpointing, sampling, evaluation): blocks are
    served from the heap and freed blocks stay there for the next step. glibc's default maps each block above a
    moving threshold (128 KiB, rising to at most 32 MiB) afresh with mmap and unmaps it when freed, so every step
    page-faults its activations in again. Measured side by side in fresh processes by
    ``python -m scripts.benchmark --sections allocator`` (docs/performance.md).

    ``lean_memory=True`` (memory: training with activation checkpointing): blocks of 4 MiB or more are mmap-ed,
    so freed activations go back to the OS at once. With glibc's moving threshold the heap fragments and keeps
    freed activations resident; this setting keeps a 128^3 training step with activation checkpointing under
    8 GB (docs/performance.md).

    Returns whether the setting was applied (False off glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from malloc.h
    if lean_memory:
        return bool(libc.mallopt(m_mmap_threshold, 4 << 20))
    keep = 1 << 30  # 1 GiB: larger than any single activation block of the example configurations
    return bool(libc.mallopt(m_mmap_threshold, keep)) and bool(libc.mallopt(m_trim_threshold, keep))


def backward_and_clip(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    clip: float,
    groups: Mapping[str, Sequence[nn.Parameter]] | None = None,
) -> dict[str, float]:
    """Backward pass of ``loss`` (scaled and then unscaled when ``scaler`` is given, i.e. under float16), then
    clipping of the gradient norm to ``clip`` separately for each of ``groups`` (name -> parameters; default: one
    group "all" of ``optimizer``'s parameters). Returns each group's norm before clipping."""
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if groups is None:
        groups = {"all": [p for g in optimizer.param_groups for p in g["params"]]}
    return {name: float(torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], clip)) for name, params in groups.items()}


class AmpEvaluator(SupervisedEvaluator):
    """SupervisedEvaluator with ``amp_mode`` autocast on CPU or CUDA (``autocast``) and optional channels-last
    inputs; its subclasses write ``_iteration``. (SupervisedEvaluator's own ``amp`` autocasts on CUDA only.)"""

    def __init__(self, *args: Any, amp_mode: str = "none", channels_last: bool = False, **kwargs: Any) -> None:
        kwargs["amp"] = False
        kwargs.setdefault("decollate", False)
        super().__init__(*args, **kwargs)
        autocast(self.state.device, amp_mode)  # validates the mode for this device
        self.amp_mode = amp_mode
        self.channels_last = bool(channels_last)


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
        if gradient_skipping_value <= 0 or gradient_skip_factor < 0 or window < 1 or max_consecutive_skips < 1 or warmup_iterations < 0:
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


class AmpTrainer(SupervisedTrainer):
    """SupervisedTrainer with ``amp_mode`` autocast on CPU or CUDA (``autocast``; a GradScaler under float16),
    gradient clipping to ``gradient_clipping_value``, optional channels-last inputs, and a resume check of the
    epoch length; its subclasses write ``_iteration``. (SupervisedTrainer's own ``amp`` autocasts on CUDA only.)"""

    def __init__(
        self, *args: Any, amp_mode: str = "none", gradient_clipping_value: float = 100.0, channels_last: bool = False, **kwargs: Any
    ) -> None:
        kwargs["amp"] = False
        kwargs.setdefault("decollate", False)
        super().__init__(*args, **kwargs)
        autocast(self.state.device, amp_mode)  # validates the mode for this device
        self.amp_mode = amp_mode
        self.clip = float(gradient_clipping_value)
        self.channels_last = bool(channels_last)
        self.scaler = torch.amp.GradScaler("cuda") if amp_mode == "float16" else None

    def load_state_dict(self, state_dict) -> None:
        """Ignite's trainer state (iteration, epoch length, max epochs), refused when the checkpoint's epoch length
        differs from this run's: Ignite would keep the saved length and silently cut or misnumber epochs. The
        length is ceil(volumes / (processes x batch_size)), so it matches when the effective batch does."""
        saved = state_dict.get("epoch_length")
        current = len(self.data_loader) if hasattr(self.data_loader, "__len__") else None
        if saved is not None and current is not None and int(saved) != current:
            raise ValueError(
                f"the checkpoint was written with {saved} iterations per epoch but this run has {current}: the number "
                "of processes x batch_size (the effective batch) differs from the run that wrote it. Resume with "
                "the same effective batch (e.g. 2 processes x batch 4 -> 1 process x batch 8), or train into a new "
                "output_dir (or --resume False)"
            )
        super().load_state_dict(state_dict)


class VDVAETrainer(AmpTrainer):
    """SupervisedTrainer for the VDVAE ELBO.

    ``network`` is a module whose forward returns (mean, scale, kl_per_group), i.e. a
    :class:`scripts.networks.VDVAETrainingStep`, possibly wrapped in DistributedDataParallel; ``loss_function``
    is a :class:`scripts.losses.ELBOLoss`. Each iteration: forward under ``amp`` autocast, backward, clip the
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
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        with autocast(engine.state.device, engine.amp_mode):
            mean, scale, kl = engine.inferer(x, engine.network)
        terms = engine.loss_function(x, mean, scale, kl, step=engine.state.iteration)
        loss = terms["loss"]
        terms = {k: v.detach() for k, v in terms.items()}
        norms = backward_and_clip(loss, engine.optimizer, engine.scaler, engine.clip, _unwrap_vae(engine.network).clipping_groups())
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


def _unwrap_vae(module: nn.Module) -> nn.Module:
    """The VDVAE inside DDP and/or a VDVAETrainingStep wrapper."""
    module = getattr(module, "module", module)  # DistributedDataParallel
    return getattr(module, "vae", module)


class VDVAEEvaluator(AmpEvaluator):
    """Evaluator whose output holds per-volume ELBO figures (see :func:`scripts.losses.negative_elbo_terms`):
    ``neg_elbo_nats``, ``neg_elbo_bits``, ``kl_per_group`` (B, G), plus ``image`` and ``recon`` (posterior
    means). ``network`` is the VDVAE (or its EMA: an AveragedModel, whose ``module`` is used)."""

    def _iteration(self, engine: VDVAEEvaluator, batchdata: dict[str, torch.Tensor]) -> dict:
        x = batchdata["image"].to(engine.state.device, non_blocking=engine.non_blocking)
        x = x.as_tensor() if hasattr(x, "as_tensor") else x
        if engine.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        vae = engine.network.module if isinstance(engine.network, AveragedModel) else engine.network
        vae.eval()
        with torch.no_grad(), autocast(engine.state.device, engine.amp_mode):
            mean, scale, kl = vae.forward_train(x)
            terms = negative_elbo_terms(x, mean, scale, kl)
            recon = vae.reconstruct(x) if engine.state.iteration == 1 else None
        engine.state.output = {"image": x, "recon": recon, **terms}
        return engine.state.output


def metric_lower_is_better(current: float, previous: float) -> bool:
    """metric_cmp_fn for the negative ELBO key metric."""
    return current < previous


class VolumeAverage(Average):
    """Ignite Average over volumes of a per-volume output (B,) as a float; exact under DDP (sums and counts
    are all-reduced, no padding)."""

    def compute(self) -> float:
        return float(torch.as_tensor(super().compute()).reshape(-1)[0])


def average_metric(key: str) -> VolumeAverage:
    """Mean over volumes of ``engine.state.output[key]``."""
    return VolumeAverage(output_transform=lambda out: out[key].detach().float().reshape(-1, 1))
