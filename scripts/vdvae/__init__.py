# Copyright 2026 The VDVAE bundle authors. Licensed under the Apache License, Version 2.0.
"""The very deep hierarchical VAE: the network (``network``), its ELBO (``loss``), its Ignite trainer and evaluator
(``trainer``), the post-hoc prior of its coarse latents (``latent_prior``), its anomaly maps (``anomaly``) and the
reference checkpoint converter (``reference``)."""

from scripts.vdvae import anomaly, latent_prior, loss, network, trainer  # noqa: F401
