# Copyright 2026 The VDVAE bundle authors. Licensed under the Apache License, Version 2.0.
"""Evaluation of a trained generator (configs/evaluate.json; the VQ family with configs/vq_evaluate.json on top):
one JSON report and one PNG plot.

For a held-out set of NIfTI volumes (default: the validation split of the training run) and ``num_samples``
samples per temperature:

* likelihood: for the VDVAE, the negative ELBO in nats/voxel and discretised bits/voxel (:mod:`scripts.vdvae.loss`),
  KL per latent group in nats per volume and per latent dimension, active vs collapsed groups; for the VQ family
  (:class:`scripts.vq.networks.VQGenerator`), the prior's bits per token of the held-out token grids (exact for the
  autoregressive prior, an ELBO for the absorbing prior), which scores tokens, not voxels;
* reconstruction: PSNR and SSIM (MONAI ``PSNRMetric``, ``SSIMMetric``) of the posterior-mean reconstructions
  (VDVAE) or of the decoded token grids (VQ-VAE);
* diversity: mean pairwise MS-SSIM (MONAI ``MultiScaleSSIMMetric``) among samples, and among real volumes;
* fidelity: Frechet distance (MONAI ``FIDMetric``) and MMD (MONAI ``MMDMetric``, Gaussian kernel through
  random Fourier features) between the features of samples and of the training volumes, next to the same
  figures for the held-out volumes. The features come from :class:`RandomFeatureNet`, a fixed, seeded,
  randomly initialised 3D convolutional network (no weights are downloaded): the figures are comparable only
  between evaluations of this bundle (same feature network, preprocessing and resolution), not with FIDs
  from the literature;
* anatomy (:mod:`scripts.engine.anatomy`): tissue contrast in the MNI152 tissue regions after an affine alignment to
  a brain template (1 = the template), of the held-out volumes, of their Gaussian blurs by 0.5, 1 and 1.5 voxels (the
  figures to beat), of the reconstructions and of the samples; and each reconstruction's blur-equivalent sigma (the
  Gaussian blur of its input with the same PSNR);
* memorisation: each sample's distance (RMSE on the [-1, 1] scale) to its nearest training volume, next to the
  same distance for the held-out volumes;
* time per sample (seconds, wall clock, batch of ``batch_size``).

The network is a :class:`scripts.engine.generator.Generator`: each family supplies its own likelihood terms and
report section; everything else is the same code for both. The summary statistics, Frechet distance and MS-SSIM are
those of :mod:`scripts.engine.metrics`.

Everything streams: volumes pass in batches; only features (N, 224), per-volume figures, the first
``diversity_samples`` volumes of each set (for the pairwise MS-SSIM) and chunks of ``chunk_size`` queries for
the nearest-neighbour search are kept.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence

import nibabel as nib
import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.metrics import MMDMetric, PSNRMetric, SSIMMetric
from torch import nn

from scripts.engine.anatomy import AnatomyScore, blur_equivalent_sigma, gaussian_blur
from scripts.engine.covariates import ConditionedGenerator
from scripts.engine.data import check_nifti_header, find_niftis, make_dataset
from scripts.engine.generator import require_generator
from scripts.engine.metrics import frechet_distance, mean_pairwise_ms_ssim, ms_ssim_parameters, summary, to_unit
from scripts.engine.sampling import check_sampling_options, draw_samples
from scripts.engine.training import autocast
from scripts.engine.visualisation import (
    draw_volume_rows,
    inches_axes,
    new_figure,
    save_figure,
    text_width,
    volume_rows_size,
)

__all__ = [
    "RandomFeatureNet",
    "RandomFourierFeatures",
    "NearestTrainingVolume",
    "resolve_volumes",
    "check_shapes_match",
    "evaluate",
]

logger = logging.getLogger(__name__)

FEATURE_NETWORK = (
    "RandomFeatureNet v1: 3 x (3^3 conv stride 2 + LeakyReLU 0.2), widths 16/32/64, Kaiming-normal init with seed 0, "
    "never trained; features = per-channel mean and std of each stage (224)"
)


# ----------------------------------------------------------------------------------------------- features


class RandomFeatureNet(nn.Module):
    """Fixed feature extractor: (B, 1, R, R, R) on [-1, 1] -> (B, 2 * sum(widths)) = (B, 224).

    Three stride-2 3^3 convolutions with LeakyReLU, weights drawn once from a Kaiming normal with a private
    generator seeded with ``seed`` (independent of the global RNG), never trained. Features are the spatial
    mean and standard deviation of every channel of every stage, so their number does not depend on R.
    """

    def __init__(self, widths: Sequence[int] = (16, 32, 64), seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        chans = [1, *widths]
        self.convs = nn.ModuleList(nn.Conv3d(a, b, 3, stride=2, padding=1) for a, b in zip(chans[:-1], chans[1:]))
        with torch.no_grad():
            for conv in self.convs:
                nn.init.kaiming_normal_(conv.weight, a=0.2, generator=gen)
                conv.bias.zero_()
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = []
        h = x.float()
        for conv in self.convs:
            h = nn.functional.leaky_relu(conv(h), 0.2)
            flat = h.flatten(2)
            feats += [flat.mean(2), flat.std(2, unbiased=False)]
        return torch.cat(feats, dim=1)


class RandomFourierFeatures:
    """(N, F) -> (N, D) random Fourier features of a Gaussian kernel of bandwidth ``sigma`` (Rahimi & Recht
    2007): <phi(a), phi(b)> ~= exp(-|a - b|^2 / (2 sigma^2)). Used as MONAI ``MMDMetric``'s ``y_mapping``, so its
    linear-kernel MMD^2 estimates the Gaussian-kernel MMD^2. Seeded, so fixed."""

    def __init__(self, in_features: int, sigma: float, num_features: int = 2048, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.sigma = float(sigma)
        self.w = torch.randn(in_features, num_features, generator=gen, dtype=torch.float64) / self.sigma
        self.b = torch.rand(num_features, generator=gen, dtype=torch.float64) * 2 * math.pi
        self.scale = math.sqrt(2.0 / num_features)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.cos(x.double().cpu() @ self.w + self.b)


# ----------------------------------------------------------------------------------------------- memorisation


class NearestTrainingVolume:
    """Distance of query volumes to their nearest training volume: RMSE over voxels on the [-1, 1] scale.

    Queries (B, 1, R, R, R) are buffered in chunks of ``chunk_size``; each full chunk costs one pass over
    ``train_loader``, so neither the queries nor the training set need to fit in memory at once.
    """

    def __init__(self, train_loader: DataLoader, device: torch.device | str, chunk_size: int = 64) -> None:
        self.loader = train_loader
        self.device = torch.device(device)
        self.chunk_size = int(chunk_size)
        self._buffer: list[torch.Tensor] = []
        self.distances: list[float] = []
        self.nearest: list[int] = []

    def add(self, x: torch.Tensor) -> None:
        self._buffer.append(x.detach().float().flatten(1).cpu())
        if sum(b.shape[0] for b in self._buffer) >= self.chunk_size:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        q = torch.cat(self._buffer).to(self.device)
        self._buffer = []
        best = torch.full((q.shape[0],), float("inf"), device=self.device)
        best_idx = torch.full((q.shape[0],), -1, dtype=torch.long, device=self.device)
        offset = 0
        for batch in self.loader:
            t = _image(batch).to(self.device).float().flatten(1)
            d = torch.cdist(q.double(), t.double()).float() / math.sqrt(q.shape[1])  # (Q, T) RMSE
            m, idx = d.min(1)
            better = m < best
            best = torch.where(better, m, best)
            best_idx = torch.where(better, idx + offset, best_idx)
            offset += t.shape[0]
        self.distances += best.cpu().tolist()
        self.nearest += best_idx.cpu().tolist()

    def result(self) -> tuple[np.ndarray, list[int]]:
        self.flush()
        return np.asarray(self.distances), list(self.nearest)


def _image(batch: dict) -> torch.Tensor:
    x = batch["image"]
    return x.as_tensor() if hasattr(x, "as_tensor") else x


# ----------------------------------------------------------------------------------------------- inputs


def resolve_volumes(folder: str | None, run_dir: str, split: str, option: str) -> tuple[list[str], str]:
    """NIfTI files of ``folder``, or when it is None/empty the ``split`` ("train" or "val") list of the training
    run's ``run_dir/data_split.json``. Returns (files, a description of where they came from)."""
    if folder:
        return find_niftis(folder), f"folder {folder}"
    split_file = os.path.join(run_dir, "data_split.json")
    if not os.path.isfile(split_file):
        raise FileNotFoundError(
            f"{option} is not set and {split_file} does not exist: pass --{option} (a folder of NIfTI files) or "
            "--run_dir (the output_dir of the training run, which holds data_split.json)"
        )
    with open(split_file) as f:
        files = json.load(f)[split]
    name = {"train": "training", "val": "validation"}[split]
    return list(files), f"{name} split of {split_file}"


def check_shapes_match(heldout_files: Sequence[str], train_files: Sequence[str]) -> list[list[int]]:
    """Raises ValueError naming the first held-out file whose voxel grid differs from every training volume's
    (its metrics would measure the resampling, not the model), or whose number of channels (modalities) differs
    from the first training volume's. Returns the training shapes."""
    channels = int(np.prod([s for s in nib.load(train_files[0]).shape[3:] if s != 1])) if train_files else 1
    train_shapes = sorted({tuple(check_nifti_header(f, channels)) for f in train_files})
    for f in heldout_files:
        shape = tuple(check_nifti_header(f, channels))
        if shape not in train_shapes:
            expected = " or ".join(str(s) for s in train_shapes)
            raise ValueError(
                f"held-out volume {f} has shape {shape}, but the training volumes have shape {expected}: put the "
                "held-out set on the training data's grid (or pass --check_shapes false to evaluate it after the "
                "usual resizing to the network's resolution)"
            )
    return [list(s) for s in train_shapes]


# ----------------------------------------------------------------------------------------------- evaluation


class _FeatureSpace:
    """The training set's side of the comparison: standardised features of every training volume (the reference
    set of the Frechet distance and MMD, with the MMD's random Fourier features) and the nearest-neighbour search."""

    def __init__(self, train_loader: DataLoader, device: torch.device, chunk_size: int) -> None:
        self.loader, self.device, self.chunk_size = train_loader, device, chunk_size
        self.net = RandomFeatureNet().to(device)
        with torch.no_grad():
            feats = torch.cat([self.features(_image(b).to(device)) for b in train_loader])
        self.mu, self.sd = feats.mean(0), feats.std(0, unbiased=False).clamp_min(1e-6)
        self.train_z = self.standardise(feats)
        self.rff = RandomFourierFeatures(self.train_z.shape[1], sigma=_median_distance(self.train_z))

    def standardise(self, feats: torch.Tensor) -> torch.Tensor:
        return (feats - self.mu) / self.sd

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, R, R, R) -> (B, C * 224): the random features of each channel (modality), side by side."""
        return torch.cat([self.net(x[:, c : c + 1]) for c in range(x.shape[1])], dim=1).cpu()

    def nearest(self) -> NearestTrainingVolume:
        return NearestTrainingVolume(self.loader, self.device, self.chunk_size)

    def distribution(self, z: torch.Tensor, n: int) -> dict:
        """Frechet distance and MMD of the first ``n`` standardised features ``z`` to the training set's."""
        return {
            "frechet_distance_to_train": frechet_distance(z[:n], self.train_z),
            "mmd_to_train": _mmd(z[:n], self.train_z, self.rff),
            "num_volumes_for_distribution_metrics": n,
        }


def _check_inputs(
    num_samples: int, temperature, heldout_files: Sequence[str], train_files: Sequence[str]
) -> list[float]:
    temps = check_sampling_options(num_samples, temperature)
    if num_samples < 2:
        raise ValueError(
            f"num_samples must be at least 2 for the evaluation (pairwise MS-SSIM, MMD), got {num_samples}"
        )
    if len(heldout_files) < 2:
        raise ValueError(f"the held-out set needs at least 2 volumes, got {len(heldout_files)}")
    if not train_files:
        raise ValueError("the training set (train_dir) holds no volumes")
    return temps


def evaluate(
    network: nn.Module,
    heldout_files: Sequence[str],
    train_files: Sequence[str],
    preprocessing: Callable,
    output_dir: str,
    *,
    temperature: float | Sequence[float],
    num_samples: int = 64,
    seed: int = 0,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    amp: str = "none",
    diversity_samples: int = 32,
    chunk_size: int = 64,
    kl_active_threshold: float = 1.0,
    check_shapes: bool = True,
    cache: str = "none",
    num_workers: int = 0,
    sources: dict | None = None,
    anatomy_template: str | None = None,
    covariates: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Evaluates ``network`` and writes ``output_dir/report.json`` and ``output_dir/report.png``.

    Args:
        network: a trained :class:`scripts.engine.generator.Generator` (the VDVAE, with or without its post-hoc
            prior, or a :class:`scripts.vq.networks.VQGenerator`) of 3-D volumes; with C channels (modalities) the
            random features of each channel side by side, the anatomy score of the first.
        heldout_files: NIfTI volumes never trained on (at least 2).
        train_files: the training volumes (reference set of the Frechet distance and MMD, and of the
            nearest-neighbour search).
        preprocessing: the training's deterministic transforms ({"image": path} -> (1, R, R, R) on [-1, 1]).
        output_dir: where the report and the plot go.
        num_samples: samples per temperature (>= 2).
        temperature: a number or a list (> 0); sample figures are given per temperature.
        seed: seeds the posterior noise of the ELBO and the samples (the stream of
            :func:`scripts.engine.sampling.draw_samples`: the same volumes as ``inference.json`` with that seed).
        batch_size: volumes per batch.
        device, amp: where and in which precision the network runs ("none", "bfloat16", "float16").
        diversity_samples: the first N volumes of each set enter the pairwise MS-SSIM (N (N - 1) / 2 pairs).
        chunk_size: queries per pass over the training set in the nearest-neighbour search.
        kl_active_threshold: a latent group is active when its mean KL exceeds this many nats per volume.
        check_shapes: require held-out volumes on the training volumes' voxel grid (see :func:`check_shapes_match`).
        cache: "none", "memory" or "disk" caching of the preprocessed training set (see ``make_dataset``).
        num_workers: DataLoader workers.
        sources: where the file lists came from, copied into the report.
        anatomy_template: a skull-stripped template of the data's contrast in MNI152 space for the anatomy score
            (None: nilearn's MNI152 T1 brain; see :mod:`scripts.engine.anatomy`).
        covariates: for a conditional model, {file: (K,) features} of the held-out and the training volumes: the
            likelihood and reconstructions use each held-out volume's own, and sample i is drawn at those of training
            volume i mod N, so that the samples follow the covariates of the set they are compared with.
    """
    temps = _check_inputs(num_samples, temperature, heldout_files, train_files)
    train_shapes = check_shapes_match(heldout_files, train_files) if check_shapes else None
    device = torch.device(device)
    network = require_generator(network).to(device).eval()

    def loader(files: Sequence[str], cached: bool = False) -> DataLoader:
        data = [{"image": f} for f in files]
        if covariates is not None and not cached:  # the held-out volumes
            data = [{**d, "covariates": covariates[d["image"]]} for d in data]
        ds = (
            make_dataset(data, preprocessing, cache, os.path.join(output_dir, "cache"))
            if cached
            else Dataset(data, preprocessing)
        )
        return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)

    logger.info(f"evaluation: features of {len(train_files)} training volumes")
    space = _FeatureSpace(loader(train_files, cached=True), device, chunk_size)
    logger.info(
        f"evaluation: {len(heldout_files)} held-out volumes (likelihood, reconstructions, nearest training volumes)"
    )
    anatomy = AnatomyScore(int(network.resolution), anatomy_template, device=device)
    torch.manual_seed(seed)
    held = _heldout_pass(network, loader(heldout_files), space, device, amp, diversity_samples, anatomy)
    ms_params = ms_ssim_parameters(network.resolution)
    n_eq = min(num_samples, held["z"].shape[0])
    conditions = None if covariates is None else torch.stack([covariates[f] for f in train_files]).to(device)
    report: dict = {
        "checkpoint_resolution": int(network.resolution),
        "heldout": {"source": (sources or {}).get("heldout"), "num_volumes": held["z"].shape[0]},
        "train": {
            "source": (sources or {}).get("train"),
            "num_volumes": int(space.train_z.shape[0]),
            "voxel_grids": train_shapes,
        },
        "seed": seed,
        "model": network.describe(),
        "likelihood": network.likelihood_report(held["terms"], kl_active_threshold=kl_active_threshold),
        "reconstruction": {
            **held["reconstruction"],
            "note": network.reconstruction_note()
            + " vs the preprocessed inputs, intensities mapped from [-1, 1] to [0, 1] (data range 1)",
        },
        "anatomy": {
            "heldout": summary(held["anatomy"]["heldout"]),
            **{f"heldout_blurred_{s:g}_voxel": summary(v) for s, v in held["anatomy"]["blurred"].items()},
            "reconstructions": summary(held["anatomy"]["reconstructions"]),
            "samples": {},
            "template": anatomy_template or "MNI152 2009 T1 (nilearn)",
        },
        "ms_ssim_parameters": ms_params,
        "feature_network": FEATURE_NETWORK + "; comparable only between evaluations of this bundle",
        "real": {
            **_diversity(held["diversity"], ms_params),
            **space.distribution(held["z"], n_eq),
            "nearest_train_rmse": summary(held["distances"]),
        },
        "samples": {},
    }
    if ms_params is None:
        report["ms_ssim_parameters"] = f"MS-SSIM needs at least 8^3 voxels; not computed at {network.resolution}^3"
    if float(held["distances"].min()) == 0.0:
        logger.warning(
            "some held-out volumes are identical to training volumes: is the held-out set part of train_dir?"
        )
        report["real"]["heldout_volumes_identical_to_a_training_volume"] = int((held["distances"] == 0).sum())
    shown, distances = held["shown"], {"held-out": held["distances"]}
    if conditions is not None:
        report["conditioning"] = (
            "conditional model: likelihood and reconstructions at each held-out volume's covariates; sample i at "
            f"those of training volume i mod {len(conditions)}"
        )
    for t in temps:
        logger.info(f"evaluation: {num_samples} samples at temperature {t:g}")
        section, first, dist = _sample_pass(
            network,
            t,
            num_samples,
            seed,
            batch_size,
            space,
            device,
            amp,
            diversity_samples,
            ms_params,
            n_eq,
            train_files,
            anatomy,
            conditions,
        )
        report["anatomy"]["samples"][f"{t:g}"] = section["anatomy_score"]
        section["fraction_closer_than_closest_heldout"] = float((dist < held["distances"].min()).mean())
        report["samples"][f"{t:g}"] = section
        shown[f"samples T={t:g}"], distances[f"samples T={t:g}"] = first, dist
    report["notes"] = NOTES
    a = report["anatomy"]
    means = {"held-out": a["heldout"], "reconstructions": a["reconstructions"]}
    means.update({f"samples T={t}": v for t, v in a["samples"].items()})
    shown = {f"{k} (anatomy {means[k]['mean']:.2f})" if k in means else k: v for k, v in shown.items()}
    return _write_report(report, shown, distances, output_dir)


def _heldout_pass(
    network: nn.Module,
    loader: DataLoader,
    space: _FeatureSpace,
    device: torch.device,
    amp: str,
    diversity_samples: int,
    anatomy: AnatomyScore,
) -> dict:
    """One pass over the held-out volumes: the family's likelihood terms, PSNR/SSIM and blur-equivalent sigma of the
    reconstructions, anatomy scores (held-out, blurred held-out, reconstructions), standardised features, the
    diversity set, the volumes shown and the distances to the nearest training volume."""
    resolution = int(network.resolution)
    ssim_kernel = min(7, resolution - (1 - resolution % 2))
    psnr, ssim = (
        PSNRMetric(max_val=1.0),
        SSIMMetric(spatial_dims=3, data_range=1.0, win_size=ssim_kernel, kernel_sigma=1.5),
    )
    terms: dict[str, list[torch.Tensor]] = {}
    feats, diversity, shown, nearest = [], [], {"held-out": [], "reconstructions": []}, space.nearest()
    scores: dict = {"heldout": [], "reconstructions": [], "blurred": {s: [] for s in BLURS}}
    sigmas = []
    with torch.no_grad():
        for batch in loader:
            x = _image(batch).to(device).float()
            if tuple(x.shape[2:]) != (resolution,) * 3:
                raise ValueError(
                    f"evaluation needs 3-D volumes of {resolution}^3; the preprocessing gives {tuple(x.shape[1:])} "
                    "(channels first)"
                )
            cond = {"covariates": batch["covariates"].to(device).float()} if "covariates" in batch else {}
            with autocast(device, amp):
                for k, v in network.heldout_likelihood(x, **cond).items():
                    terms.setdefault(k, []).append(v.float().cpu())
                recon = network(x, **cond).float()
            psnr(to_unit(recon), to_unit(x))
            ssim(to_unit(recon), to_unit(x))
            sigmas.append(blur_equivalent_sigma(x, recon))
            scores["heldout"].append(anatomy(x[:, :1]).numpy())  # the first modality: the template's contrast
            scores["reconstructions"].append(anatomy(recon[:, :1]).numpy())
            for s in BLURS:
                scores["blurred"][s].append(anatomy(gaussian_blur(x[:, :1], s)).numpy())
            feats.append(space.features(x))
            _keep(diversity, x, diversity_samples)
            _keep(shown["held-out"], x, 4)
            _keep(shown["reconstructions"], recon, 4)
            nearest.add(x)
    distances, _ = nearest.result()
    return {
        "terms": {k: torch.cat(v) for k, v in terms.items()},
        "reconstruction": {
            "psnr_db": float(psnr.aggregate().item()),
            "ssim": float(ssim.aggregate().item()),
            "ssim_kernel_size": ssim_kernel,
            "ssim_kernel_sigma": 1.5,
            "blur_equivalent_sigma_voxels": summary(np.concatenate(sigmas)),
        },
        "anatomy": {
            "heldout": np.concatenate(scores["heldout"]),
            "reconstructions": np.concatenate(scores["reconstructions"]),
            "blurred": {s: np.concatenate(v) for s, v in scores["blurred"].items()},
        },
        "z": space.standardise(torch.cat(feats)),
        "diversity": diversity,
        "shown": shown,
        "distances": distances,
    }


def _sample_pass(
    network: nn.Module,
    t: float,
    num_samples: int,
    seed: int,
    batch_size: int,
    space: _FeatureSpace,
    device: torch.device,
    amp: str,
    diversity_samples: int,
    ms_params: dict | None,
    n_eq: int,
    train_files: Sequence[str],
    anatomy: AnatomyScore,
    conditions: torch.Tensor | None = None,
) -> tuple[dict, list[torch.Tensor], np.ndarray]:
    """``num_samples`` samples at temperature ``t``, the stream ``seed`` of :func:`draw_samples` (the volumes
    ``inference.json`` writes for that seed; sample i at the features ``conditions[i % N]`` (N, K) of a conditional
    model): the report's section, the first four samples and every sample's distance to its nearest training
    volume."""
    feats, diversity, nearest, first, seconds, scores = [], [], space.nearest(), [], 0.0, []
    with torch.no_grad():
        for start in range(0, num_samples, batch_size):
            tic = time.perf_counter()
            indices = range(start, min(start + batch_size, num_samples))
            with autocast(device, amp):
                if conditions is None:
                    s = draw_samples(network, t, seed, indices)
                else:
                    s = torch.cat(
                        [
                            draw_samples(ConditionedGenerator(network, conditions[i % len(conditions)]), t, seed, [i])
                            for i in indices
                        ]
                    )
            seconds += time.perf_counter() - tic
            feats.append(space.features(s))
            scores.append(anatomy(s[:, :1]).numpy())
            _keep(diversity, s, diversity_samples)
            _keep(first, s, 4)
            nearest.add(s)
    dist, nearest_idx = nearest.result()
    section = {
        "temperature": t,
        "num_samples": num_samples,
        "seconds_per_sample": seconds / num_samples,
        **_diversity(diversity, ms_params),
        **space.distribution(space.standardise(torch.cat(feats)), n_eq),
        "nearest_train_rmse": summary(dist),
        "anatomy_score": summary(np.concatenate(scores)),
        "closest_samples": [
            {"sample": int(i), "rmse": float(dist[i]), "nearest_train_volume": train_files[nearest_idx[i]]}
            for i in np.argsort(dist)[:5]
        ],
    }
    return section, first, dist


def _diversity(volumes: list[torch.Tensor], ms_params: dict | None) -> dict:
    value, pairs = mean_pairwise_ms_ssim(torch.cat(volumes), ms_params) if ms_params else (None, 0)
    return {"diversity_mean_pairwise_ms_ssim": value, "diversity_pairs": pairs}


BLURS = (0.5, 1.0, 1.5)  # voxels: the blurred held-out volumes whose anatomy scores are the figures to beat

NOTES = {
    "anatomy": (
        "scripts.engine.anatomy: after an affine registration to the template, the tissue contrast (CSF / grey / white "
        "matter means in MNI152's tissue regions, background 0, brain 1) relative to the template's (1 = the template); "
        "blurs lower it, noise does not lift it; the held-out volumes' score (not 1) is what samples and reconstructions "
        "should reach, and the blurred held-out scores place them on a blur scale"
    ),
    "blur_equivalent_sigma": "sigma (voxels) of the Gaussian blur of each input with the reconstruction's PSNR",
    "diversity": "mean MS-SSIM over all pairs of the first `diversity_samples` volumes; lower = more diverse; compare samples with real",
    "distribution_metrics": (
        "Frechet distance (MONAI FIDMetric) and MMD^2 (MONAI MMDMetric, unbiased, Gaussian kernel of bandwidth the median "
        "pairwise distance of the training features, via 2048 seeded random Fourier features) between features standardised "
        "with the training set's mean and std; samples and held-out volumes use the same number of volumes "
        "(num_volumes_for_distribution_metrics), since both figures depend on it; the held-out figure is the floor to expect"
    ),
    "memorisation": "RMSE on the [-1, 1] scale to the nearest training volume; samples much closer than held-out volumes suggest copying",
}


def _write_report(report: dict, shown: dict, distances: dict, output_dir: str) -> dict:
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "report.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    plot_report(report, shown, distances, os.path.join(output_dir, "report.png"))
    logger.info(f"wrote {path} and {os.path.join(output_dir, 'report.png')}")
    return report


def _keep(store: list, x: torch.Tensor, limit: int) -> None:
    """Appends the first volumes of ``x`` (B, 1, R, R, R) to ``store`` (on the CPU) until it holds ``limit``."""
    have = sum(v.shape[0] for v in store)
    if have < limit:
        store.append(x[: limit - have].detach().float().cpu())


def _median_distance(z: torch.Tensor, max_items: int = 1000) -> float:
    """Median pairwise Euclidean distance among the first ``max_items`` rows of (N, F) (1.0 if degenerate)."""
    z = z[:max_items].double()
    d = torch.cdist(z, z)
    d = d[torch.triu_indices(len(z), len(z), offset=1).unbind()]
    med = float(d.median()) if d.numel() else 0.0
    return med if med > 0 else 1.0


def _mmd(gen: torch.Tensor, ref: torch.Tensor, rff: RandomFourierFeatures) -> float:
    """Unbiased MMD^2 with MONAI's MMDMetric (equal set sizes: the first min(N, M) of each)."""
    n = min(len(gen), len(ref))
    return float(MMDMetric(y_mapping=rff)(ref[:n], gen[:n]))


# ----------------------------------------------------------------------------------------------- plot


def report_figure(report: dict, shown: dict[str, list[torch.Tensor]], distances: dict[str, np.ndarray]):
    """The matplotlib Figure of ``report.png``, top to bottom: KL per latent group (log scale, active groups dark;
    the held-out token likelihood for the VQ family), the distance of each held-out volume and of each temperature's
    samples to its nearest training volume (one tick per volume, median in red), and one row of 3-plane views per
    set of volumes in ``shown`` (held-out, reconstructions, samples), all on the [-1, 1] grey scale."""
    from matplotlib.patches import Patch

    rows = {name: list(torch.cat(vols)) for name, vols in shown.items() if vols}
    rows_h = volume_rows_size(rows)[1] + 0.85 if rows else 0.0
    likelihood = report["likelihood"]
    kl_h, dist_h, width = 3.0 if "kl_per_group" in likelihood else 1.3, 1.2 + 0.45 * len(distances), 12.0
    height = kl_h + dist_h + rows_h
    fig = new_figure(width, height, layout="none")

    # KL per group, log scale (VDVAE); the token likelihood (VQ family)
    ax = inches_axes(fig, 0.9, height - kl_h + 0.65, width - 1.15, kl_h - 1.0)
    if "kl_per_group" not in likelihood:
        b = likelihood["bits_per_token"]
        ax.axis("off")
        ax.set_title(f"{report['model']['family']}: held-out {likelihood['kind']}")
        ax.text(
            0.5,
            0.5,
            f"bits per token: mean {b['mean']:.3f}, median {b['median']:.3f}\n"
            f"{likelihood['tokens_per_volume']} tokens per volume",
            transform=ax.transAxes,
            ha="center",
            va="center",
            fontsize=12,
        )
    else:
        groups = likelihood["kl_per_group"]
        dark, light = "#28469f", "#aabee6"
        ax.bar(
            range(len(groups)),
            [max(g["kl_nats_per_volume"], 1e-6) for g in groups],
            color=[dark if g["active"] else light for g in groups],
        )
        ax.set_yscale("log")
        ax.set_xticks(range(len(groups)), [f"{g['resolution']}³" for g in groups], fontsize=8)
        ax.set_xlim(-0.6, len(groups) - 0.4)
        ax.set_xlabel("latent group (its resolution), top of the hierarchy first")
        ax.set_ylabel("KL (nats per volume)")
        ax.set_title("KL per latent group (held-out volumes)")
        ax.grid(True, axis="y", alpha=0.3)
        threshold = likelihood.get("kl_active_threshold_nats_per_volume")
        ax.legend(
            [Patch(color=dark), Patch(color=light)],
            [f"active (> {threshold:g} nats)" if threshold is not None else "active", "collapsed"],
            fontsize=8,
            loc="upper left",
        )

    # distances to the nearest training volume, one strip per set, first set on top
    labels = [
        f"{name}\nmedian {float(np.median(d)):.3f} ({float(d.min()):.3f}-{float(d.max()):.3f})"
        for name, d in distances.items()
    ]
    label_w = max((text_width(fig, label, 8) for label in labels), default=0.5) + 0.25
    ax = inches_axes(fig, label_w, rows_h + 0.6, width - label_w - 0.25, dist_h - 1.0)
    for i, (name, d) in enumerate(distances.items()):
        y, med = len(distances) - 1 - i, float(np.median(d))
        ax.plot(d, np.full(len(d), y), "|", color="0.25", ms=12, label="one volume" if i == 0 else None)
        ax.plot([med], [y], "|", color="red", ms=22, mew=3, label="median" if i == 0 else None)
    ax.set_yticks(range(len(distances)), labels[::-1], fontsize=8)
    ax.set_ylim(-0.6, len(distances) - 0.4)
    ax.set_xlim(0, 1.05 * max((float(d.max()) for d in distances.values()), default=1.0))
    ax.set_xlabel("RMSE to the nearest training volume ([-1, 1] intensity scale)")
    ax.set_title("Distance of each volume to its nearest training volume (samples much closer than held-out = copying)")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")

    if rows:
        draw_volume_rows(fig, rows, box=(0.0, 0.0, width - 0.1, rows_h - 0.4))
        fig.text(0.5, (rows_h - 0.1) / height, "Central slices, one grey scale for every row", ha="center", va="top")
    return fig


def plot_report(report: dict, shown: dict[str, list[torch.Tensor]], distances: dict[str, np.ndarray], path: str) -> str:
    """Writes :func:`report_figure` as the PNG ``path``; returns ``path``."""
    return save_figure(report_figure(report, shown, distances), path)
