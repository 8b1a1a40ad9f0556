# Copyright 2026 The VDVAE bundle authors. Licensed under the Apache License, Version 2.0.
"""The VDVAE bundle's own code: only what MONAI and Ignite lack. Configs refer to these modules by name."""

from scripts import config, data, distributed, handlers, latent_prior, losses, networks, sampling, trainer, transforms, visualisation  # noqa: F401
