# Copyright 2026 The VDVAE bundle authors. Licensed under the Apache License, Version 2.0.
"""Shared Ignite/MONAI engine parts of both generator families: mixed precision on CPU or CUDA, the
AMP trainer and evaluator with gradient clipping and a resume check, the allocator setting, and the per-volume
average metric."""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from ignite.metrics import Average
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from torch import nn

__all__ = ["configure_allocator", "backward_and_clip", "AmpTrainer", "AmpEvaluator", "autocast", "AMP_MODES"]

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
    ``python -m scripts.tools.benchmark --sections allocator`` (docs/performance.md).

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
    return {
        name: float(torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], clip))
        for name, params in groups.items()
    }


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


class AmpTrainer(SupervisedTrainer):
    """SupervisedTrainer with ``amp_mode`` autocast on CPU or CUDA (``autocast``; a GradScaler under float16),
    gradient clipping to ``gradient_clipping_value``, optional channels-last inputs, and a resume check of the
    epoch length; its subclasses write ``_iteration``. (SupervisedTrainer's own ``amp`` autocasts on CUDA only.)"""

    def __init__(
        self,
        *args: Any,
        amp_mode: str = "none",
        gradient_clipping_value: float = 100.0,
        channels_last: bool = False,
        **kwargs: Any,
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
