# Copyright 2026 The VDVAE bundle authors. Licensed under the Apache License, Version 2.0.
"""Do conditional samples follow the requested covariate? Requested against measured brain volume.

For ``num_values`` requested values of ``covariate`` spread over its training range and ``extrapolate`` (a fraction
of the range) beyond each end, it draws ``num_samples`` samples (the same noise for every value: samples i of the
stream ``seed``, as ``inference.json`` draws them) with the other covariates at their expected value given the
requested one (a least-squares line over the training volumes' features), measures each sample's brain volume from
the image alone (:meth:`scripts.engine.anatomy.AnatomyScore.brain_volume_ml`: the template's brain mask times the
determinant of the affine registration), and reports Pearson r and the mean absolute error in units of the
training volumes' standard deviation, inside the training range and beyond it. The same measurement on the held-out
volumes against their CSV values is the floor. Writes ``conditioning.json``, ``conditioning.md`` and
``conditioning.png`` (requested against measured, and samples at four requested values) to ``report_dir``
(default ``<output_dir>/conditioning``).

CLI (from the bundle root, with the same overrides as training)::

    python -m scripts.tools.check_conditioning --config_file configs/train.json \\
        --covariates_csv data/mni_cohort/covariates.csv --output_dir runs/cond --model_path runs/cond/model.pt
"""

from __future__ import annotations

import json
import os

import fire
import numpy as np
import torch

from scripts.engine.anatomy import AnatomyScore
from scripts.engine.config import read_config_with_overrides, sampling_defaults
from scripts.engine.covariates import ConditionedGenerator, covariates_in_sidecar
from scripts.engine.data import preprocess_volumes
from scripts.engine.sampling import check_sampling_options, draw_samples, load_weights, read_sidecar
from scripts.engine.visualisation import draw_volume_rows, new_figure, save_figure
from scripts.vdvae.latent_prior import with_latent_prior

__all__ = ["MEASURED", "check_conditioning", "control_figures", "expected_features", "write_report"]

MEASURED = ("brain_volume_ml",)  # covariates with an image measurement


def control_figures(requested: np.ndarray, measured: np.ndarray, std: float) -> dict:
    """Pearson r and mean absolute error / ``std`` of measured against requested values (flat arrays)."""
    r = float(np.corrcoef(requested, measured)[0, 1]) if len(requested) > 2 and np.std(requested) > 0 else None
    return {
        "pearson_r": r,
        "mae": float(np.abs(measured - requested).mean()),
        "mae_over_training_std": float(np.abs(measured - requested).mean() / std),
        "count": int(len(requested)),
    }


def expected_features(train: torch.Tensor, index: int, feature: float) -> torch.Tensor:
    """Every feature (K,) at ``feature`` for feature ``index``: the others from a least-squares line on it."""
    design = torch.stack([torch.ones(len(train)), train[:, index]], 1).double()
    coef = torch.linalg.lstsq(design, train.double()).solution  # (2, K)
    out = (torch.tensor([1.0, feature], dtype=torch.float64) @ coef).float()
    out[index] = feature
    return out


def check_conditioning(
    config_file: str | list[str] = "configs/train.json",
    covariate: str = "brain_volume_ml",
    num_values: int = 7,
    num_samples: int = 8,
    extrapolate: float = 0.1,
    temperature: float | None = None,
    use_latent_prior: bool | str | None = None,
    seed: int = 0,
    report_dir: str | None = None,
    **overrides,
) -> dict:
    if covariate not in MEASURED:
        raise ValueError(f"covariate {covariate!r} has no image measurement here; measured: {list(MEASURED)}")
    if num_values < 3 or num_samples < 1:
        raise ValueError(f"num_values must be >= 3 and num_samples >= 1, got {num_values} and {num_samples}")
    parser = read_config_with_overrides(config_file, overrides)
    temperature, use_latent_prior = sampling_defaults(
        parser.get_parsed_content("bundle_root"), temperature, use_latent_prior
    )
    check_sampling_options(num_samples, temperature)
    model_path = parser.get_parsed_content("model_path")
    encoder = covariates_in_sidecar(model_path)
    if encoder is None:
        raise ValueError(f"{model_path} is not a conditional model (no covariates in its sidecar)")
    if covariate not in encoder.names:
        raise ValueError(f"{model_path} is conditioned on {encoder.names}, not on {covariate!r}")
    data = parser.get_parsed_content("data")
    net = with_latent_prior(
        load_weights(parser.get_parsed_content("network_def"), model_path, "cpu"), model_path, use_latent_prior
    )
    index, column = encoder.numeric_feature(covariate)
    train = torch.stack([data.covariate_features[f] for f in data.train_files])
    train_values = encoder.decode_numeric(train, covariate)
    lo, hi = float(train_values.min()), float(train_values.max())
    span = hi - lo
    values = np.linspace(lo - extrapolate * span, hi + extrapolate * span, num_values)
    affine = np.asarray(read_sidecar(model_path)["affine"], dtype=np.float64)
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    scorer = AnatomyScore(net.resolution)
    rows, pictures = [], []
    for value in values:
        features = expected_features(train, index, (value - column["mean"]) / column["std"])
        generator = ConditionedGenerator(net, features, {covariate: float(value)})
        with torch.no_grad():
            samples = draw_samples(generator, float(temperature), seed, range(num_samples))
        measured = scorer.brain_volume_ml(samples, voxel_ml).numpy()
        rows.append(
            {"requested": float(value), "measured": measured.round(2).tolist(), "inside": bool(lo <= value <= hi)}
        )
        pictures.append(samples[0])
    heldout = preprocess_volumes(data.val_files, parser.get_parsed_content("validate#preprocessing"))
    heldout_requested = encoder.decode_numeric(
        torch.stack([data.covariate_features[f] for f in data.val_files]), covariate
    )
    heldout_measured = scorer.brain_volume_ml(heldout, voxel_ml).numpy()
    std = column["std"]

    def figures(inside: bool) -> dict:
        chosen = [r for r in rows if r["inside"] == inside]
        req = np.concatenate([[r["requested"]] * len(r["measured"]) for r in chosen])
        return control_figures(req, np.concatenate([r["measured"] for r in chosen]), std)

    report = {
        "checkpoint": model_path,
        "covariate": covariate,
        "measurement": "brain volume from the image: template brain mask x |det| of the affine registration",
        "temperature": float(temperature),
        "sampler": type(net).__name__,
        "num_samples_per_value": num_samples,
        "training_range": [lo, hi],
        "training_std": std,
        "other_covariates": "expected value given the requested one (least-squares line over the training volumes)",
        "samples_inside_range": figures(True),
        "samples_beyond_range": figures(False),
        "heldout_volumes": control_figures(heldout_requested.numpy(), heldout_measured, std),
        "per_value": rows,
    }
    out = report_dir or os.path.join(parser.get_parsed_content("output_dir"), "conditioning")
    write_report(report, out, "conditioning", _write_markdown)
    _plot(report, heldout_requested.numpy(), heldout_measured, pictures, os.path.join(out, "conditioning.png"))
    return report


def write_report(report: dict, folder: str, name: str, markdown) -> str:
    """Writes ``report`` as ``<folder>/<name>.json`` and, with ``markdown(report, path)``, ``<folder>/<name>.md``
    (the folder created); returns ``folder``."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{name}.json"), "w") as f:
        json.dump(report, f, indent=2)
    markdown(report, os.path.join(folder, f"{name}.md"))
    return folder


def _fmt(d: dict) -> str:
    r = "n/a" if d["pearson_r"] is None else f"{d['pearson_r']:.3f}"
    return f"| {r} | {d['mae']:.1f} | {d['mae_over_training_std']:.2f} | {d['count']} |"


def _write_markdown(report: dict, path: str) -> None:
    lines = [
        f"Requested against measured `{report['covariate']}` ({report['measurement']}); samples at "
        f"T = {report['temperature']:g} ({report['sampler']}), {report['num_samples_per_value']} per requested value; "
        f"training range {report['training_range'][0]:.0f} to {report['training_range'][1]:.0f}, "
        f"standard deviation {report['training_std']:.1f}.",
        "",
        "| volumes | Pearson r | MAE | MAE / training SD | count |",
        "|---|---|---|---|---|",
        "| held-out volumes (their CSV value against the measurement: the floor) " + _fmt(report["heldout_volumes"]),
        "| samples, requested inside the training range " + _fmt(report["samples_inside_range"]),
        "| samples, requested beyond it (extrapolation) " + _fmt(report["samples_beyond_range"]),
        "",
        "| requested | measured, mean (SD) |",
        "|---|---|",
        *[
            f"| {r['requested']:.0f} | {np.mean(r['measured']):.0f} ({np.std(r['measured']):.0f}) |"
            for r in report["per_value"]
        ],
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _plot(report: dict, heldout_req, heldout_meas, pictures: list, path: str) -> None:
    fig = new_figure(10.0, 6.2, layout="none")
    ax = fig.add_axes((0.09, 0.45, 0.45, 0.5))
    for r in report["per_value"]:
        ax.scatter([r["requested"]] * len(r["measured"]), r["measured"], s=12, color="C0" if r["inside"] else "C1")
    ax.scatter(heldout_req, heldout_meas, s=16, marker="x", color="k", label="held-out volumes (CSV value)")
    ax.scatter([], [], s=12, color="C0", label="samples, inside the training range")
    ax.scatter([], [], s=12, color="C1", label="samples, beyond it")
    lims = [min(ax.get_xlim()[0], ax.get_ylim()[0]), max(ax.get_xlim()[1], ax.get_ylim()[1])]
    ax.plot(lims, lims, color="grey", lw=0.8, label="measured = requested")
    ax.set_xlabel(f"requested {report['covariate']} (mL)")
    ax.set_ylabel("measured from the image (mL)")
    ax.set_title("Conditional samples: requested against measured", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    shown = sorted({round(i) for i in np.linspace(0, len(pictures) - 1, min(4, len(pictures)))})
    draw_volume_rows(
        fig,
        {f"sample 0 at\nrequested\n{report['covariate']}": [pictures[i] for i in shown]},
        column_titles=[f"{report['per_value'][i]['requested']:.0f} mL" for i in shown],
        colorbar_label="intensity, [-1, 1]",
        box=(0.2, 0.05, 9.6, 2.0),
    )
    save_figure(fig, path)


def main(**kwargs) -> None:
    report = check_conditioning(**kwargs)
    print(
        json.dumps(
            {k: report[k] for k in ("samples_inside_range", "samples_beyond_range", "heldout_volumes")}, indent=2
        )
    )


if __name__ == "__main__":
    fire.Fire(main)
