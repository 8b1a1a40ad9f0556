# Copyright 2026 The VDVAE bundle authors. Licensed under the Apache License, Version 2.0.
"""Developer tools, run as ``python -m scripts.tools.<name>``: the speed benchmark (``benchmark``), sample quality
over training time (``quality_benchmark``), anomaly maps on synthetic lesions (``anomaly_benchmark``), the sample
check (``check_samples``) and side-by-side evaluation reports (``compare_reports``). No config imports them."""
