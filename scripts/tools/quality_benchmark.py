# Copyright 2026 The VDVAE bundle authors. Licensed under the Apache License, Version 2.0.
"""Sample quality over training time: trains recipes for a wall-clock budget and measures them at fixed times.

    python -m scripts.tools.quality_benchmark                                   # default recipe, 3 seeds, 15 min each, VQ family
    python -m scripts.tools.quality_benchmark --recipes "['default','reference']" --seeds "[0]" --budget_s 600 --vq False

Each (recipe, seed) trains ``configs/train.json`` with the recipe's overrides on the built-in cohort in a fresh
process; :class:`scripts.engine.handlers.WallClockSnapshots` saves the weights at ``points`` evenly spaced times up to
``budget_s`` (wall clock since the trainer started, validation included) and stops the run. Each snapshot is then
measured, outside the clock, for each temperature mode and temperature:

- held-out negative ELBO (nats/voxel, the run's validation split) and the fraction of skipped updates so far;
- samples (``num_samples``, seeded): Frechet distance to the training set in the bundle's fixed random-convolution
  feature space (as ``evaluate.json``; computed on as many samples as there are held-out volumes and averaged over
  the disjoint groups of that size, so it compares with the held-out figure), mean pairwise MS-SSIM, median RMSE to
  the nearest training volume, and the mean Dice of each sample's foreground (voxels above -0.8) with the cohort's
  majority brain mask (as ``scripts.tools.check_samples``). The same figures of the held-out volumes are the targets.

The VQ family (``vq``) trains stage 1 (``configs/vqvae_train.json``) for ``vq_stage1_fraction`` of the budget and
its autoregressive prior for the rest, with snapshots of the prior at the time points past stage 1.

Writes ``output`` (Markdown table), the same name with ``.json`` (every figure) and a figure of the curves
(``docs/images/quality_over_time.png``); runs go under ``work_dir``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import fire
import numpy as np
import torch

from scripts.engine.anatomy import AnatomyScore, blur_equivalent_sigma, gaussian_blur
from scripts.engine.config import from_config_file
from scripts.engine.data import preprocess_volumes
from scripts.engine.evaluation import RandomFeatureNet
from scripts.engine.handlers import WallClockSnapshots
from scripts.engine.metrics import dice, frechet_distance, mean_pairwise_ms_ssim, ms_ssim_parameters, psnr_per_volume
from scripts.engine.sampling import draw_samples, load_weights
from scripts.engine.visualisation import new_figure, plot_volume_rows, save_figure
from scripts.vdvae.latent_prior import LatentPCAPrior, PosthocPriorVDVAE
from scripts.vq.networks import VQGenerator

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = "configs/train.json"
VQ_STAGE1 = ["configs/vqvae_train.json"]
VQ_STAGE2 = ["configs/vqvae_train.json", "configs/vq_prior.json", "configs/vq_prior_autoregressive.json"]
FOREGROUND = -0.8  # the built-in cohort's background is about -0.92

# named recipes: overrides of configs/train.json ("default" is train.json itself)
REFERENCE_RECIPE = {
    "augment": True,
    "shared_x_scale": False,
    "full_resolution_residual": False,
    "gradient_skip_factor": 0.0,
    "latent_prior_resolution": 0,
}
RECIPES: dict[str, dict] = {
    "default": {},
    "reference": REFERENCE_RECIPE,  # the reference's recipe (as the presets set it)
    "augment": {"augment": True},
    "reference_full_resolution_residual": {**REFERENCE_RECIPE, "full_resolution_residual": True},
    "reference_adaptive_skip": {**REFERENCE_RECIPE, "gradient_skip_factor": 10.0},
    "ema": {"ema_decay": 0.999},
    "per_voxel_scale": {"shared_x_scale": False},  # 2.0.0's default recipe
    "scale_floor": {"shared_x_scale": False, "scale_output_clamp_bounds": [0.03, 1.0]},
    "batch8": {"batch_size": 8},
}

logger = logging.getLogger("quality_benchmark")


# ------------------------------------------------------------------ training (each in its own process)
def train_run(spec: str) -> None:
    """Trains as the JSON file ``spec`` says ({"config_files", "overrides", "times_s", "folder"}) until the last
    of ``times_s``, saving snapshots into ``folder``."""
    from monai.bundle import ConfigWorkflow

    with open(spec) as f:
        run = json.load(f)
    workflow = ConfigWorkflow(config_file=run["config_files"], workflow_type="train", **run["overrides"])
    workflow.initialize()
    parser = workflow.parser
    ema = parser.get_parsed_content("ema") if "ema" in parser else None
    WallClockSnapshots(run["times_s"], run["folder"], parser.get_parsed_content("network"), ema).attach(
        parser.get_parsed_content("train#trainer")
    )
    workflow.run()
    workflow.finalize()


def _launch(config_files: list[str], overrides: dict, times: list[float], folder: str, log: str) -> None:
    os.makedirs(folder, exist_ok=True)
    spec = os.path.join(folder, "spec.json")
    with open(spec, "w") as f:
        json.dump(
            {"config_files": config_files, "overrides": overrides, "times_s": times, "folder": folder}, f, indent=1
        )
    cmd = [sys.executable, "-m", "scripts.tools.quality_benchmark", "train_run", "--spec", spec]
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"training failed ({' '.join(cmd)}); see {log}")


# ------------------------------------------------------------------ measuring
class Reference:
    """The preprocessed training and held-out volumes of a run's split, their features and the cohort mask."""

    def __init__(self, parser, device: str = "cpu") -> None:
        data = parser.get_parsed_content("data")
        pre = parser.get_parsed_content("validate#preprocessing")
        self.train, self.heldout = preprocess_volumes(data.train_files, pre), preprocess_volumes(data.val_files, pre)
        self.features = RandomFeatureNet().to(device)
        with torch.no_grad():
            train_f = torch.cat([self.features(b) for b in self.train.split(16)])
        self.mu, self.sd = train_f.mean(0), train_f.std(0, unbiased=False).clamp_min(1e-6)
        self.train_z = (train_f - self.mu) / self.sd
        self.mask = ((torch.cat([self.train, self.heldout]) > FOREGROUND).float().mean(0)[0] >= 0.5).numpy()
        self.ms_params = ms_ssim_parameters(self.train.shape[-1])
        self.anatomy = AnatomyScore(self.train.shape[-1])
        self.real = {
            **self.figures(self.heldout),
            **{
                f"anatomy_score_blur_{s:g}": float(self.anatomy.score_all(gaussian_blur(self.heldout, s)).mean())
                for s in (0.5, 1.0, 1.5)
            },
            "reconstruction_psnr_blur_0.7": float(
                psnr_per_volume(gaussian_blur(self.heldout, 0.7), self.heldout).mean()
            ),
        }

    def _z(self, volumes: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return (torch.cat([self.features(b) for b in volumes.split(16)]) - self.mu) / self.sd

    def nearest_rmse(self, volumes: torch.Tensor) -> np.ndarray:
        flat_train = self.train.flatten(1)
        return np.array([float(((flat_train - v.flatten()) ** 2).mean(1).min().sqrt()) for v in volumes])

    def figures(self, volumes: torch.Tensor) -> dict:
        """Frechet distance, MS-SSIM diversity, nearest-train RMSE and Dice of (N, 1, R, R, R) volumes."""
        z, n = self._z(volumes), len(self.heldout)
        groups = [z[i : i + n] for i in range(0, len(z) - n + 1, n)]
        return {
            "frechet_distance": float(np.mean([frechet_distance(g, self.train_z) for g in groups])),
            "ms_ssim": mean_pairwise_ms_ssim(volumes[:16], self.ms_params)[0] if self.ms_params else None,
            "nearest_train_rmse_median": float(np.median(self.nearest_rmse(volumes))),
            "dice_vs_cohort_mask": float(np.mean([dice(v[0].numpy() > FOREGROUND, self.mask) for v in volumes])),
            "anatomy_score": float(self.anatomy.score_all(volumes).mean()),
        }

    def reconstruction_figures(self, reconstructions: torch.Tensor) -> dict:
        """PSNR (dB), blur-equivalent sigma (median, voxels) and anatomy score of reconstructions of the held-out
        volumes (N, 1, R, R, R), in their order."""
        return {
            "reconstruction_psnr": float(psnr_per_volume(reconstructions, self.heldout).mean()),
            "reconstruction_blur_sigma": float(np.median(blur_equivalent_sigma(self.heldout, reconstructions))),
            "reconstruction_anatomy_score": float(self.anatomy.score_all(reconstructions).mean()),
        }


def config_parser(config_files: list[str], overrides: dict):
    """A ConfigParser of ``config_files`` (paths relative to the bundle root) with ``overrides`` applied."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([os.path.join(ROOT, c) for c in config_files])
    parser.update(overrides)
    return parser


def _samples(generator, n: int, temperature: float, seed: int) -> torch.Tensor:
    """The first ``n`` volumes of the stream ``seed`` (what ``inference.json`` writes for that seed)."""
    with torch.no_grad():
        return draw_samples(generator, temperature, seed, range(n))


def measure_vdvae(
    parser,
    ref: Reference,
    snapshot: dict,
    modes,
    temperatures,
    num_samples: int,
    seed: int,
    latent_prior_resolutions=(),
) -> list[dict]:
    """Rows per weights (raw, EMA), sampler (the learned priors in each temperature mode; the post-hoc latent prior
    of the groups <= r^3 for each r of ``latent_prior_resolutions``, finer groups from the learned priors in the
    first mode) and temperature."""
    rows = []
    for weights in ("network", "ema"):
        if snapshot.get(weights) is None:
            continue
        for m_i, mode in enumerate(modes):
            parser["temperature_mode"] = mode
            net = parser.get_parsed_content("network_def", instantiate=True, lazy=False)
            net.load_state_dict(snapshot[weights])
            net.eval()
            torch.manual_seed(seed)
            with torch.no_grad():
                elbo = float(torch.cat([net.elbo(b)["neg_elbo_nats"] for b in ref.heldout.split(5)]).mean())
                recon = ref.reconstruction_figures(torch.cat([net(b) for b in ref.heldout.split(5)]).float())
            samplers = [("learned priors", net)]
            if m_i == 0 and latent_prior_resolutions:
                finest = LatentPCAPrior.fit(net, ref.train, max(latent_prior_resolutions))  # one pass; marginals
                for r in latent_prior_resolutions:
                    groups = sum(1 for g in net.group_resolutions() if g <= r)
                    if groups == 0:
                        raise ValueError(
                            f"--latent_prior_resolutions {r}: no latent group is that coarse "
                            f"(group resolutions {sorted(set(net.group_resolutions()))})"
                        )
                    prior = PosthocPriorVDVAE(net, finest.marginal(groups))
                    samplers.append((f"post-hoc prior <= {r}^3", prior))
            for name, generator in samplers:
                for t in temperatures:
                    figures = ref.figures(_samples(generator, num_samples, t, seed))
                    rows.append(
                        {
                            "weights": weights,
                            "sampler": name,
                            "temperature_mode": mode,
                            "temperature": t,
                            "heldout_neg_elbo_nats": elbo,
                            **recon,
                            **figures,
                        }
                    )
    return rows


def measure_vq(generator, ref: Reference, temperatures, num_samples: int, seed: int) -> list[dict]:
    with torch.no_grad():
        recon = ref.reconstruction_figures(torch.cat([generator(b) for b in ref.heldout.split(5)]).float())
    return [
        {
            "weights": "network",
            "sampler": "autoregressive prior",
            "temperature_mode": "-",
            "temperature": t,
            "heldout_neg_elbo_nats": None,
            **recon,
            **ref.figures(_samples(generator, num_samples, t, seed)),
        }
        for t in temperatures
    ]


# ------------------------------------------------------------------ report
def _fmt(v, digits=3) -> str:
    return "-" if v is None else f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def write_report(results: dict, output: str, figure: str) -> None:
    rows = results["rows"]
    lines = [
        "# Sample quality over training time",
        "",
        f"Measured by `{results['command']}` ({results['date']}, {results['machine']}). Budget {results['budget_s']:.0f} s of "
        "training wall clock per run (validation included) on the built-in cohort at 32^3; snapshots measured outside the "
        f"clock, {results['num_samples']} samples per temperature. Targets (held-out volumes, mean over seeds): "
        + ", ".join(f"{k} {_fmt(v)}" for k, v in results["real"].items())
        + ". Goals: reconstructions no blurrier than a 0.7-voxel Gaussian blur of the held-out volumes (recon PSNR >= "
        "reconstruction_psnr_blur_0.7, recon blur sigma <= 0.7); samples' anatomy score >= anatomy_score_blur_1 (the "
        "held-out volumes blurred by 1 voxel), nearest-train RMSE >= held-out, Frechet distance <= 2x held-out. "
        "Anatomy: scripts.engine.anatomy (tissue contrast in the MNI152 tissue regions after affine alignment, 1 = the "
        "template). Figures are means over seeds (min-max in brackets where there are several).",
        "",
        f"![curves]({os.path.relpath(figure, os.path.dirname(output))})",
        "",
        "| family / recipe | weights | sampler | T mode | T | time (s) | updates | skipped "
        "| held-out -ELBO (nats/voxel) | recon PSNR (dB) | recon blur sigma | recon anatomy "
        "| Frechet | MS-SSIM | NN-RMSE | Dice | anatomy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted({_series(r) + (r["point"],) for r in rows}, key=str)
    for recipe, weights, sampler, mode, t, point in keys:
        sel = [r for r in rows if _series(r) + (r["point"],) == (recipe, weights, sampler, mode, t, point)]

        def agg(k, d=3):
            vals = [r[k] for r in sel if r.get(k) is not None]
            if not vals:
                return "-"
            m = _fmt(float(np.mean(vals)), d)
            return m if len(vals) == 1 else f"{m} [{_fmt(min(vals), d)}-{_fmt(max(vals), d)}]"

        lines.append(
            f"| {recipe} | {weights} | {sampler} | {mode} | {t:g} | {agg('time_s', 3)} | {agg('iteration')} | {agg('skipped_fraction', 2)} | "
            f"{agg('heldout_neg_elbo_nats')} | {agg('reconstruction_psnr')} | {agg('reconstruction_blur_sigma', 2)} | "
            f"{agg('reconstruction_anatomy_score')} | {agg('frechet_distance')} | {agg('ms_ssim')} | "
            f"{agg('nearest_train_rmse_median')} | {agg('dice_vs_cohort_mask')} | {agg('anatomy_score')} |"
        )
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        f.write("\n".join(lines) + "\n")
    plot_curves(rows, results["real"], figure)


def _series(r: dict) -> tuple:
    return (r["recipe"], r["weights"], r["sampler"], r["temperature_mode"], r["temperature"])


# metric -> (panel title, y-axis label) of the curves, in panel order
CURVES = {
    "anatomy_score": ("Anatomy score of the samples", "tissue contrast (1 = template)"),
    "reconstruction_psnr": ("Held-out reconstruction PSNR", "PSNR (dB)"),
    "frechet_distance": ("Frechet distance to training set", "random-conv feature distance"),
    "ms_ssim": ("Sample diversity (MS-SSIM)", "mean pairwise MS-SSIM (low = diverse)"),
    "nearest_train_rmse_median": ("RMSE to nearest training volume", "median RMSE ([-1, 1] scale)"),
    "dice_vs_cohort_mask": ("Dice with cohort brain mask", "mean Dice"),
    "heldout_neg_elbo_nats": ("Held-out negative ELBO", "nats per voxel"),
}
# metric -> (key of the goal in ``real``, legend label): the goals of docs/quality.md drawn as dotted lines
GOALS = {
    "anatomy_score": ("anatomy_score_blur_1", "goal: held-out, 1-voxel blur"),
    "reconstruction_psnr": ("reconstruction_psnr_blur_0.7", "goal: PSNR of a 0.7-voxel blur"),
}


def curves_figure(rows: list[dict], real: dict):
    """A matplotlib Figure of one panel per metric of :data:`CURVES` (Frechet distance on a log scale) against
    training time, one line per (family / recipe, weights, sampler) at the highest measured temperature in the
    first temperature mode: seed means with a band from the lowest to the highest seed; dashed: the held-out
    volumes, dotted: the goals of :data:`GOALS`. Reconstruction PSNR and ELBO do not depend on the sampler, so the
    lines of one weights' samplers coincide there. The table has every temperature and mode."""
    import textwrap

    t_plot = (
        max(r["temperature"] for r in rows if r["family"] == "vdvae")
        if any(r["family"] == "vdvae" for r in rows)
        else None
    )
    first_mode = next((r["temperature_mode"] for r in rows if r["family"] == "vdvae"), None)
    shown = [
        r
        for r in rows
        if r["family"] != "vdvae" or (r["temperature"] == t_plot and r["temperature_mode"] == first_mode)
    ]
    series: dict[tuple, dict[float, list[dict]]] = {}
    for r in shown:
        series.setdefault(_series(r), {}).setdefault(r["point"], []).append(r)
    seeds = max((len(rs) for points in series.values() for rs in points.values()), default=0)
    tmax = max((r["time_s"] for r in shown), default=0.0) or 1.0
    fig = new_figure(12.0, 6.6)
    axes = fig.subplots(2, 4).ravel()
    handles: dict[str, object] = {}
    for ax, (metric, (title, ylabel)) in zip(axes, CURVES.items()):
        ax.set_title(title, fontsize=9.5)
        ax.set_xlabel("training wall clock (s)")
        ax.set_ylabel(ylabel)
        ax.set_xlim(0, tmax * 1.05)
        ax.grid(True, alpha=0.3)
        for s_i, (key, points) in enumerate(sorted(series.items(), key=lambda kv: str(kv[0]))):
            pts = sorted(
                (float(np.mean([r["time_s"] for r in rs])), [float(r[metric]) for r in rs])
                for rs in points.values()
                if all(r.get(metric) is not None for r in rs)
            )
            if not pts:
                continue
            t = [p[0] for p in pts]
            label = textwrap.fill(f"{key[0]}, {key[1]} weights, {key[2]}, T mode {key[3]}, T={key[4]:g}", 36)
            (line,) = ax.plot(t, [np.mean(p[1]) for p in pts], "o-", color=f"C{s_i}", label=label)
            handles.setdefault(label, line)
            if any(len(p[1]) > 1 for p in pts):
                ax.fill_between(t, [min(p[1]) for p in pts], [max(p[1]) for p in pts], color=f"C{s_i}", alpha=0.15)
        if real.get(metric) is not None:
            handles.setdefault(
                "held-out volumes", ax.axhline(real[metric], color="0.35", ls="--", lw=1.2, label="held-out volumes")
            )
        goal, goal_label = GOALS.get(metric, (None, None))
        if real.get(goal) is not None:
            handles["goals (dotted, labelled)"] = ax.axhline(real[goal], color="C3", ls=":", lw=1.5)
            ax.annotate(
                goal_label,
                (0.98, real[goal]),
                xycoords=ax.get_yaxis_transform(),
                ha="right",
                va="bottom",
                fontsize=7,
                color="C3",
            )
        values = [v for line in ax.get_lines() for v in line.get_ydata()]
        if metric == "frechet_distance" and values and min(values) > 0:
            ax.set_yscale("log")
            ax.set_ylabel(ylabel + " (log)")
        if not ax.get_lines():
            ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center", va="center", color="0.4")
    legend = axes[-1]
    legend.axis("off")
    legend.legend(list(handles.values()), list(handles), loc="center", fontsize=8, frameon=False)
    band = f"; band: lowest to highest of {seeds} seeds" if seeds > 1 else ""
    fig.suptitle(f"Sample quality over training time (seed means{band})", fontsize=12)
    return fig


def plot_curves(rows: list[dict], real: dict, path: str) -> str:
    """Writes :func:`curves_figure` as the PNG ``path``; returns ``path``."""
    return save_figure(curves_figure(rows, real), path)


# ------------------------------------------------------------------ driver
def main(
    recipes: str | list[str] = ("default",),
    seeds: int | list[int] = (0, 1, 2),
    budget_s: float = 900.0,
    points: int = 3,
    temperatures: float | list[float] = (0.8, 1.0, 1.2),
    temperature_modes: str | list[str] = ("latent",),
    num_samples: int = 30,
    latent_prior_resolutions: int | list[int] = (16,),
    vq: bool = True,
    vq_stage1_fraction: float = 0.4,
    vq_temperatures: float | list[float] = (1.0,),
    vq_num_samples: int = 10,
    vq_seeds: int | list[int] | None = None,
    work_dir: str = "runs/quality",
    output: str = "docs/quality.md",
    figure: str = "docs/images/quality_over_time.png",
    extra_recipes: dict | None = None,
    overrides: dict | None = None,
    vq_overrides: dict | None = None,
    keep_rows_from: str | None = None,
    measure_points: int | list[int] | None = None,
) -> dict:
    """Runs the VQ family (for ``vq_seeds``, default ``seeds``) and then every recipe for every seed, measures the
    snapshots and writes the report (see module doc) after each run.
    ``overrides`` apply to every VDVAE run (e.g. ``{"dataset_dir": "/data/t1"}``), ``vq_overrides`` to both VQ stages.
    ``keep_rows_from``: a results file of an earlier run (e.g. ``docs/quality.json``) whose rows of the runs not
    measured now are kept in the report, so that recipes can be added one invocation at a time.
    ``measure_points``: indices of the time points to measure (default all), e.g. ``[2]`` to measure only the last
    snapshot at other temperatures."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    as_list = lambda v: [v] if isinstance(v, (int, float, str)) else list(v)  # noqa: E731
    recipes, seeds, temperatures = (
        as_list(recipes),
        [int(s) for s in as_list(seeds)],
        [float(t) for t in as_list(temperatures)],
    )
    modes, vq_temperatures = as_list(temperature_modes), [float(t) for t in as_list(vq_temperatures)]
    lp_res = [int(r) for r in as_list(latent_prior_resolutions)]
    if any(r < 1 for r in lp_res):
        raise ValueError(
            f"--latent_prior_resolutions must list resolutions >= 1 (the learned priors are always measured), "
            f"got {lp_res}"
        )
    known = {**RECIPES, **(extra_recipes or {})}
    unknown = [r for r in recipes if r not in known]
    if unknown:
        raise ValueError(f"unknown recipe(s) {unknown}; known: {sorted(known)} (or pass --extra_recipes)")
    if points < 1 or budget_s <= 0 or num_samples < 2:
        raise ValueError("points >= 1, budget_s > 0 and num_samples >= 2 are required")
    times = [budget_s * (i + 1) / points for i in range(points)]
    work_dir = os.path.abspath(work_dir)
    rows, reals = [], []
    command = "python -m scripts.tools.quality_benchmark " + " ".join(sys.argv[1:])
    if keep_rows_from:
        with open(keep_rows_from) as f:
            earlier = json.load(f)
        measured_now = {
            ("vq", "VQ-VAE + autoregressive", s) for s in (seeds if vq_seeds is None else as_list(vq_seeds)) if vq
        }
        measured_now |= {("vdvae", r, s) for r in recipes for s in seeds}
        rows = [r for r in earlier["rows"] if (r["family"], r["recipe"], r["seed"]) not in measured_now]
        reals = list(earlier["real_per_seed"])
        command = f"{earlier['command']}`, then `{command}"
    for seed in (seeds if vq_seeds is None else [int(s) for s in as_list(vq_seeds)]) if vq else []:
        rows += run_vq(
            seed, times, budget_s * vq_stage1_fraction, work_dir, vq_temperatures, vq_num_samples, vq_overrides or {}
        )
    for recipe in recipes:  # recipe by recipe, so that an interrupted benchmark has whole recipes
        for seed in seeds:
            run = os.path.join(work_dir, recipe, f"seed{seed}")
            run_overrides = {
                **(overrides or {}),
                **known[recipe],
                "output_dir": run,
                "model_path": os.path.join(run, "model.pt"),
                "seed": seed,
                "max_epochs": 100000,
                "resume": False,
            }
            if not _have_snapshots(os.path.join(run, "snapshots"), times, run_overrides):
                logger.info(f"training {recipe}, seed {seed}, {budget_s:.0f} s")
                _launch([TRAIN], run_overrides, times, os.path.join(run, "snapshots"), os.path.join(run, "train.log"))
            parser = config_parser([TRAIN], run_overrides)
            ref = Reference(parser)
            reals.append(ref.real)
            for i, t in enumerate(times):
                if measure_points is not None and i not in as_list(measure_points):
                    continue
                snap = torch.load(os.path.join(run, "snapshots", f"snapshot_{t:g}s.pt"), weights_only=False)
                logger.info(f"measuring {recipe}, seed {seed}, {snap['elapsed_s']:.0f} s")
                common = {
                    "family": "vdvae",
                    "recipe": recipe,
                    "seed": seed,
                    "point": i,
                    "time_s": snap["elapsed_s"],
                    "iteration": snap["iteration"],
                    "skipped_fraction": snap["skipped_updates"] / max(1, snap["iteration"]),
                }
                rows += [
                    {**common, **r}
                    for r in measure_vdvae(parser, ref, snap, modes, temperatures, num_samples, seed, lp_res)
                ]
            _report(
                rows, reals, budget_s, num_samples, output, figure, command
            )  # after every run: nothing measured is lost
    results = _report(rows, reals, budget_s, num_samples, output, figure, command)
    logger.info(f"wrote {output} and {figure}")
    return results


def samples(
    recipe: str,
    seed: int = 0,
    time_s: float = 660.0,
    latent_prior_resolution: int | list[int] = 0,
    temperature: float | None = None,
    n: int = 4,
    work_dir: str = "runs/quality",
    output: str = "docs/images/quality_samples.png",
) -> str:
    """A montage of ``n`` samples of a benchmark snapshot per sampler (top rows) above ``n`` held-out volumes (bottom
    rows), one grey scale. Samplers: for each r of ``latent_prior_resolution`` (a number or a list), the post-hoc prior
    of the groups <= r^3 when r > 0, the learned priors when r = 0; at ``temperature`` (default: ``inference.json``'s).
    Every sampler draws the same stream of ``seed``, so rows with the same index share their noise."""
    run = os.path.join(os.path.abspath(work_dir), recipe, f"seed{seed}")
    with open(os.path.join(run, "snapshots", "spec.json")) as f:
        overrides = json.load(f)["overrides"]
    parser = config_parser([TRAIN], overrides)
    if temperature is None:
        temperature = from_config_file(
            parser.get_parsed_content("bundle_root"), "configs/inference.json", "temperature"
        )
    ref = Reference(parser)
    net = parser.get_parsed_content("network_def", instantiate=True, lazy=False)
    net.load_state_dict(
        torch.load(os.path.join(run, "snapshots", f"snapshot_{time_s:g}s.pt"), weights_only=False)["network"]
    )
    net.eval()
    resolutions = [
        int(r)
        for r in ([latent_prior_resolution] if isinstance(latent_prior_resolution, int) else latent_prior_resolution)
    ]
    rows = {}
    for r in resolutions:
        generator = PosthocPriorVDVAE(net, LatentPCAPrior.fit(net, ref.train, r)) if r else net
        name = f"post-hoc <= {r}^3" if r else "learned priors"
        rows.update({f"{name}, sample {i}": [v] for i, v in enumerate(_samples(generator, n, temperature, seed))})
    rows.update({f"held-out {i}": [v] for i, v in enumerate(ref.heldout[:n])})
    title = f"{recipe}, seed {seed}, {time_s:g} s of training, T={temperature:g}: samples above held-out volumes"
    return plot_volume_rows(rows, output, title=title)


def report(
    results: str = "docs/quality.json", output: str | None = None, figure: str = "docs/images/quality_over_time.png"
) -> None:
    """Rewrites the Markdown table and the figure from a results file of :func:`main`."""
    with open(results) as f:
        data = json.load(f)
    write_report(data, output or os.path.splitext(results)[0] + ".md", figure)


def _have_snapshots(folder: str, times: list[float], overrides: dict) -> bool:
    """Whether ``folder`` holds a finished run with these overrides and times, whose snapshots are then reused."""
    try:
        with open(os.path.join(folder, "spec.json")) as f:
            spec = json.load(f)
    except (OSError, ValueError):
        return False
    same = spec.get("overrides") == json.loads(json.dumps(overrides)) and spec.get("times_s") == list(times)
    return same and all(os.path.isfile(os.path.join(folder, f"snapshot_{t:g}s.pt")) for t in times)


def _report(
    rows: list[dict], reals: list[dict], budget_s: float, num_samples: int, output: str, figure: str, command: str
) -> dict:
    real = {k: float(np.mean([r[k] for r in reals])) for k in reals[0]} if reals else {}
    results = {
        "command": command,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPU threads, torch {torch.__version__}",
        "budget_s": budget_s,
        "num_samples": num_samples,
        "real": real,
        "real_per_seed": reals,
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(os.path.splitext(output)[0] + ".json", "w") as f:
        json.dump(results, f, indent=1)
    write_report(results, output, figure)
    return results


def run_vq(
    seed: int,
    times: list[float],
    stage1_s: float,
    work_dir: str,
    temperatures: list[float],
    num_samples: int,
    overrides: dict,
) -> list[dict]:
    """Stage 1 for ``stage1_s``, then the autoregressive prior with snapshots at the time points after it."""
    run = os.path.join(work_dir, "vq", f"seed{seed}")
    stage1 = {
        **overrides,
        "output_dir": run,
        "vqvae_path": os.path.join(run, "vqvae.pt"),
        "seed": seed,
        "max_epochs": 100000,
        "resume": False,
    }
    if not _have_snapshots(os.path.join(run, "stage1"), [stage1_s], stage1):
        logger.info(f"training the VQ-VAE, seed {seed}, {stage1_s:.0f} s")
        _launch(VQ_STAGE1, stage1, [stage1_s], os.path.join(run, "stage1"), os.path.join(run, "stage1.log"))
    later = [t - stage1_s for t in times if t > stage1_s]
    if not later:
        return []
    stage2 = {
        **stage1,
        "vqvae_dir": run,
        "output_dir": os.path.join(run, "prior"),
        "model_path": os.path.join(run, "prior.pt"),
    }
    if not _have_snapshots(os.path.join(run, "stage2"), later, stage2):
        logger.info(f"training the autoregressive prior, seed {seed}, {later[-1]:.0f} s")
        _launch(VQ_STAGE2, stage2, later, os.path.join(run, "stage2"), os.path.join(run, "stage2.log"))
    parser = config_parser(VQ_STAGE2, stage2)
    ref = Reference(config_parser(VQ_STAGE1, stage1))
    vqvae = load_weights(parser.get_parsed_content("vqvae_def"), stage1["vqvae_path"], "cpu")
    rows = []
    for i, t in enumerate(times):
        if t <= stage1_s:
            continue
        snap = torch.load(os.path.join(run, "stage2", f"snapshot_{t - stage1_s:g}s.pt"), weights_only=False)
        prior = parser.get_parsed_content("network_def", instantiate=True, lazy=False)
        prior.load_state_dict(snap["network"])
        generator = VQGenerator(vqvae, prior.eval()).eval()
        logger.info(f"measuring the VQ family, seed {seed}, {t:.0f} s")
        common = {
            "family": "vq",
            "recipe": "VQ-VAE + autoregressive",
            "seed": seed,
            "point": i,
            "time_s": stage1_s + snap["elapsed_s"],
            "iteration": snap["iteration"],
            "skipped_fraction": None,
        }
        rows += [{**common, **r} for r in measure_vq(generator, ref, temperatures, num_samples, seed)]
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["train_run"]:  # one training run, launched by main()
        fire.Fire(train_run, command=sys.argv[2:])
    elif sys.argv[1:2] == [
        "samples"
    ]:  # a montage of a snapshot's samples: samples --recipe ours --latent_prior_resolution 8
        fire.Fire(samples, command=sys.argv[2:])
    elif sys.argv[1:2] == [
        "report"
    ]:  # redraw the table and figure from a results file: report --results docs/quality.json
        fire.Fire(report, command=sys.argv[2:])
    else:
        fire.Fire(main)
