# Copyright 2026 The VDVAE bundle authors. Licensed under the Apache License, Version 2.0.
"""Do counterfactuals of held-out volumes change as asked, and only as asked? Requested against measured change of
brain volume, and reversibility.

For ``num_volumes`` held-out volumes with their CSV covariates, it asks for changes of ``covariate`` of ``changes``
training standard deviations (the other covariates moved along their least-squares line on it, as
:mod:`scripts.tools.check_conditioning` sets them), decodes each counterfactual
(:meth:`scripts.vdvae.network.VDVAE.counterfactual`, for each of ``abduct_to_resolutions``) and measures its brain
volume from the image alone (:meth:`scripts.engine.anatomy.AnatomyScore.brain_volume_ml`). Reported per abduction
depth, as in Monteiro et al. (2023, "Measuring axiomatic soundness of counterfactual image models"):

* effectiveness: Pearson r, slope and mean absolute error (in training SD) of the measured change (counterfactual
  minus the reconstruction, which is the counterfactual at no change) against the requested one;
* reversibility: RMSE between the reconstruction and the counterfactual of the counterfactual back at the volume's
  own covariates (intensity units on [-1, 1]), next to the reconstruction's own RMSE against the input.

Writes ``counterfactuals.json``, ``counterfactuals.md`` and ``counterfactuals.png`` (the first volume's
reconstruction, its counterfactuals at the smallest and largest change and their differences) to ``report_dir``
(default ``<output_dir>/counterfactuals``).

CLI (from the bundle root, with the same overrides as training)::

    python -m scripts.tools.check_counterfactuals --config_file configs/train.json \\
        --covariates_csv data/mni_cohort/covariates.csv --output_dir runs/cond --model_path runs/cond/model.pt
"""

from __future__ import annotations

import os

import fire
import numpy as np
import torch

from scripts.engine.anatomy import AnatomyScore
from scripts.engine.config import read_config_with_overrides
from scripts.engine.covariates import covariates_in_sidecar
from scripts.engine.data import preprocess_volumes
from scripts.engine.sampling import load_weights, read_sidecar
from scripts.engine.visualisation import counterfactual_figure, save_figure
from scripts.tools.check_conditioning import MEASURED, expected_features, write_report

__all__ = ["check_counterfactuals"]


def check_counterfactuals(
    config_file: str | list[str] = "configs/train.json",
    covariate: str = "brain_volume_ml",
    changes: list[float] = (-1.0, -0.5, 0.5, 1.0),
    num_volumes: int = 12,
    abduct_to_resolutions: list[int | None] = (None,),
    report_dir: str | None = None,
    **overrides,
) -> dict:
    if covariate not in MEASURED:
        raise ValueError(f"covariate {covariate!r} has no image measurement here; measured: {list(MEASURED)}")
    changes = [float(c) for c in changes]
    if num_volumes < 2 or len(changes) < 2 or 0.0 in changes:
        raise ValueError(f"num_volumes >= 2 and at least two non-zero changes are needed, got {num_volumes}, {changes}")
    parser = read_config_with_overrides(config_file, overrides)
    model_path = parser.get_parsed_content("model_path")
    encoder = covariates_in_sidecar(model_path)
    if encoder is None or covariate not in encoder.names:
        raise ValueError(f"{model_path} is not conditioned on {covariate!r}")
    data = parser.get_parsed_content("data")
    net = load_weights(parser.get_parsed_content("network_def"), model_path, "cpu").eval()
    files = data.val_files[:num_volumes]
    x = preprocess_volumes(files, parser.get_parsed_content("validate#preprocessing"))
    features = torch.stack([data.covariate_features[f] for f in files])
    train = torch.stack([data.covariate_features[f] for f in data.train_files])
    index, column = encoder.numeric_feature(covariate)
    direction = expected_features(train, index, 1.0) - expected_features(train, index, 0.0)  # (K,) per training SD
    affine = np.asarray(read_sidecar(model_path)["affine"], dtype=np.float64)
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    scorer = AnatomyScore(net.resolution)
    std = column["std"]
    with torch.no_grad():
        recon = net.reconstruct(x, covariates=features)
    base = scorer.brain_volume_ml(recon, voxel_ml).numpy()
    rows, picture = [], None
    for depth in abduct_to_resolutions:
        requested, measured, back = [], [], []
        shown = {}
        for change in changes:
            new = features + change * direction
            with torch.no_grad():
                cf = net.counterfactual(x, features, new, depth)
                again = net.counterfactual(cf, new, features, depth)
            requested += [change * std] * len(files)
            measured += (scorer.brain_volume_ml(cf, voxel_ml).numpy() - base).tolist()
            back.append(float((again - recon).pow(2).mean().sqrt()))
            shown[change] = cf[0]
        req, meas = np.asarray(requested), np.asarray(measured)
        rows.append(
            {
                "abduct_to_resolution": depth,
                "pearson_r": float(np.corrcoef(req, meas)[0, 1]),
                "slope": float(np.polyfit(req, meas, 1)[0]),
                "mae_over_training_std": float(np.abs(meas - req).mean() / std),
                "reversibility_rmse": float(np.mean(back)),
                "per_change": {
                    f"{c:+g} SD": np.round(meas[i * len(files) : (i + 1) * len(files)], 1).tolist()
                    for i, c in enumerate(changes)
                },
            }
        )
        if picture is None:
            picture = shown
    report = {
        "checkpoint": model_path,
        "covariate": covariate,
        "measurement": "brain volume from the image: template brain mask x |det| of the affine registration",
        "training_std": std,
        "changes_in_training_std": changes,
        "other_covariates": "moved along their least-squares line on the covariate (training volumes)",
        "volumes": [os.path.basename(f) for f in files],
        "reconstruction_rmse": float((recon - x).pow(2).mean().sqrt()),
        "per_depth": rows,
    }
    out = report_dir or os.path.join(parser.get_parsed_content("output_dir"), "counterfactuals")
    write_report(report, out, "counterfactuals", _write_markdown)
    ends = [min(changes), max(changes)]
    labels = [f"{covariate} {c * std:+.0f} mL ({c:+g} SD)" for c in ends]
    title = f"{report['volumes'][0]}: decoded at three brain volumes (abduction: every group)"
    save_figure(
        counterfactual_figure(recon[0], [picture[c] for c in ends], labels, title),
        os.path.join(out, "counterfactuals.png"),
    )
    return report


def _write_markdown(report: dict, path: str) -> None:
    lines = [
        f"Counterfactuals of {len(report['volumes'])} held-out volumes: requested against measured change of "
        f"`{report['covariate']}` ({report['measurement']}); changes of {report['changes_in_training_std']} training "
        f"SD ({report['training_std']:.1f}); other covariates {report['other_covariates']}. Reconstruction RMSE "
        f"against the input: {report['reconstruction_rmse']:.4f}.",
        "",
        "| abduction down to | Pearson r | slope (measured / requested) | MAE / training SD | reversibility RMSE |",
        "|---|---|---|---|---|",
        *[
            f"| {'every group' if r['abduct_to_resolution'] is None else str(r['abduct_to_resolution']) + '^3'} "
            f"| {r['pearson_r']:.3f} | {r['slope']:.2f} | {r['mae_over_training_std']:.2f} "
            f"| {r['reversibility_rmse']:.4f} |"
            for r in report["per_depth"]
        ],
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    fire.Fire(check_counterfactuals)
