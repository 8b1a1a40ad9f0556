# Copyright 2026 The VDVAE bundle authors. Licensed under the Apache License, Version 2.0.
"""The interface both generator families implement for the shared workflows (sampling, ``evaluate.json``'s
metrics, anomaly maps): :class:`scripts.vdvae.network.VDVAE` (and its post-hoc prior wrapper) and
:class:`scripts.vq.networks.VQGenerator`. A new family only has to provide these to be sampled, evaluated and
compared with the others."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

__all__ = ["Generator", "require_generator"]


@runtime_checkable
class Generator(Protocol):
    """A trained generator of volumes (C channels: modalities) of ``resolution`` voxels per axis on the [-1, 1] scale. A
    conditional one also takes ``covariates`` (B, K) as a keyword of ``__call__``, ``sample`` and
    ``heldout_likelihood``."""

    resolution: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of ``x`` (B, C, R, R, R) -> (B, C, R, R, R) (the module's ``forward``)."""

    def sample(self, n: int, temperature: float = 1.0) -> torch.Tensor:
        """``n`` new volumes (n, 1, R, R, R) at sampling ``temperature``."""

    def describe(self) -> dict:
        """What the report says of the model: at least ``family``."""

    def heldout_likelihood(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-volume likelihood terms of held-out volumes ``x`` (B, C, R, R, R): each value has B rows."""

    def likelihood_report(self, terms: dict[str, torch.Tensor], kl_active_threshold: float = 1.0) -> dict:
        """The report's likelihood section from the terms of every held-out volume (the rows of
        :meth:`heldout_likelihood` concatenated); ``kl_active_threshold`` (nats per volume) applies to families with
        latent groups."""

    def reconstruction_note(self) -> str:
        """What ``forward`` reconstructs, for the report (e.g. "posterior-mean reconstructions")."""


def require_generator(network: object) -> Generator:
    """``network`` when it implements :class:`Generator`; else a TypeError naming what it lacks."""
    missing = [
        name
        for name in (
            "resolution",
            "sample",
            "describe",
            "heldout_likelihood",
            "likelihood_report",
            "reconstruction_note",
        )
        if not hasattr(network, name)
    ]
    if missing:
        raise TypeError(
            f"{type(network).__name__} is not a generator the workflows can use: it lacks {', '.join(missing)} "
            "(see scripts.engine.generator.Generator)"
        )
    return network  # type: ignore[return-value]
