# Copyright 2026 The VDVAE bundle authors. Licensed under the Apache License, Version 2.0.
"""The bundle's own code, only what MONAI and Ignite lack, in four places (configs refer to the modules by name):

- ``scripts.engine``: shared by both generator families: config helpers, data and transforms, the Ignite engine
  parts and handlers, torchrun support, and the sampling, evaluation and anomaly-map workflows;
- ``scripts.vdvae``: the very deep VAE: network, ELBO loss, trainer, post-hoc latent prior, reference converter;
- ``scripts.vq``: the VQ family: VQ-VAE and its two priors, token files, completion, trainers;
- ``scripts.tools``: developer tools (benchmarks and reports, ``python -m scripts.tools.<name>``), used by no config.
"""

from scripts import engine, vdvae  # noqa: F401
