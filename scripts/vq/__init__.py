# Copyright 2026 The VDVAE bundle authors. Licensed under the Apache License, Version 2.0.
"""The VQ family: the VQ-VAE, its autoregressive and absorbing-diffusion priors and the generator that joins them
(``networks``), the token files between the two stages (``tokens``), masked completion (``completion``), anomaly maps
(``anomaly``) and their Ignite engines (``trainer``)."""

from scripts.vq import anomaly, completion, networks, tokens, trainer  # noqa: F401
