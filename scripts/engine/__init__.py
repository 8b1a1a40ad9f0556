# Copyright 2026 The VDVAE bundle authors. Licensed under the Apache License, Version 2.0.
"""What both generator families share: config helpers (``config``), data folders and splits (``data``,
``default_data``, ``generate_synthetic_data``), transforms MONAI lacks (``transforms``), Ignite engine parts
(``training``) and handlers (``handlers``), torchrun support (``distributed``), the workflows over a trained
generator (``sampling``, ``evaluation``, ``anomaly``), the metrics they and the tools share (``metrics``) and pictures
(``visualisation``)."""

from scripts.engine import config, data, distributed, handlers, sampling, training, transforms, visualisation  # noqa: F401
