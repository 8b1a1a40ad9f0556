# Copyright 2026 The VDVAE bundle authors. Licensed under the Apache License, Version 2.0.
"""Are the samples brains? Mean Dice between each sample's foreground and the cohort's mean brain mask.

Foreground = voxels above ``threshold`` on the [-1, 1] scale (the built-in cohort's background is about
-0.92 +- 0.03, grey matter about 0). The cohort's mean mask is the
majority vote of the foregrounds of the preprocessed volumes of ``dataset_dir``. Writes a JSON report and a PNG
montage (samples, then real volumes, as 3-plane rows).

CLI (from the bundle root, with the same overrides as training)::

    python -m scripts.tools.check_samples --config_file configs/train.json --num_samples 16

It samples what ``inference.json`` samples: its ``temperature`` and sampler (``use_latent_prior``) unless given, and
the same volumes for the same seed (:func:`scripts.engine.sampling.draw_samples`).
"""

from __future__ import annotations

import json
import os

import fire
import numpy as np
import torch

from scripts.engine.config import read_config_with_overrides, sampling_defaults
from scripts.engine.data import preprocess_volumes
from scripts.engine.metrics import dice
from scripts.engine.sampling import check_sampling_options, draw_samples, load_weights
from scripts.engine.visualisation import plot_volume_rows
from scripts.vdvae.latent_prior import with_latent_prior

__all__ = ["check_samples"]


def check_samples(
    config_file: str | list[str] = "configs/train.json",
    ckpt_path: str | None = None,
    num_samples: int = 16,
    temperature: float | None = None,
    threshold: float = -0.8,
    seed: int = 0,
    use_latent_prior: bool | str | None = None,
    output_json: str | None = None,
    output_png: str | None = None,
    **overrides,
) -> dict:
    parser = read_config_with_overrides(config_file, overrides)
    temperature, use_latent_prior = sampling_defaults(
        parser.get_parsed_content("bundle_root"), temperature, use_latent_prior
    )
    check_sampling_options(num_samples, temperature)
    ckpt_path = ckpt_path or parser.get_parsed_content("model_path")
    net = with_latent_prior(
        load_weights(parser.get_parsed_content("network_def"), ckpt_path, "cpu"), ckpt_path, use_latent_prior
    )
    data = parser.get_parsed_content("data")
    preprocess = parser.get_parsed_content("validate#preprocessing")
    real = preprocess_volumes(data.train_files + data.val_files, preprocess).numpy()
    mean_mask = (real > threshold).mean(0)[0] >= 0.5
    with torch.no_grad():
        samples = draw_samples(net, temperature, seed, range(num_samples)).cpu().numpy()
    scores = [dice(s[0] > threshold, mean_mask) for s in samples]
    real_scores = [dice(r[0] > threshold, mean_mask) for r in real]
    report = {
        "checkpoint": ckpt_path,
        "num_samples": num_samples,
        "temperature": temperature,
        "sampler": type(net).__name__,
        "threshold": threshold,
        "mean_dice_samples_vs_cohort_mask": float(np.mean(scores)),
        "min_dice_samples_vs_cohort_mask": float(np.min(scores)),
        "mean_dice_real_vs_cohort_mask": float(np.mean(real_scores)),
        "dice_per_sample": [round(s, 4) for s in scores],
    }
    output_dir = parser.get_parsed_content("output_dir")
    output_json = output_json or os.path.join(output_dir, "sample_check.json")
    output_png = output_png or os.path.join(output_dir, "sample_check.png")
    os.makedirs(os.path.dirname(os.path.abspath(output_json)), exist_ok=True)
    with open(output_json, "w") as f:
        json.dump(report, f, indent=1)
    shown = min(4, num_samples)
    plot_volume_rows(
        {
            **{f"sample {i} (Dice {scores[i]:.2f})": [samples[i]] for i in range(shown)},
            **{f"real {i} (Dice {real_scores[i]:.2f})": [real[i]] for i in range(min(shown, len(real)))},
        },
        output_png,
        title=f"samples at T={temperature:g} above real volumes (Dice with the cohort's brain mask)",
    )
    print(json.dumps({k: v for k, v in report.items() if k != "dice_per_sample"}, indent=1))
    print(f"report: {output_json}\nmontage (first {shown} samples, then {shown} real volumes): {output_png}")
    return report


def main(**kwargs) -> None:
    check_samples(**kwargs)


if __name__ == "__main__":
    fire.Fire(main)
