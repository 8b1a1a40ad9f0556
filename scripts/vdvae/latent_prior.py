# Copyright 2026 The VDVAE bundle authors. Licensed under the Apache License, Version 2.0.
"""A prior for the coarse latent groups fitted after training (ex-post density estimation, Ghosh et al. 2020).

A VDVAE trained briefly encodes the global shape in latent groups whose learned priors cannot yet produce it: its
posterior-mean reconstructions are brains while its samples are not. :class:`LatentPCAPrior` fits a low-rank
Gaussian to the posterior means of the groups at resolutions <= ``down_to_resolution`` over the training volumes;
:class:`PosthocPriorVDVAE` samples those groups from it and the finer groups from the VDVAE's own priors.
"""

from __future__ import annotations

import copy
import logging
import os

import torch
from torch import nn

from scripts.engine.anatomy import AnatomyScore
from scripts.engine.data import preprocess_volumes
from scripts.engine.handlers import is_main_process
from scripts.engine.sampling import draw_samples, load_weights
from scripts.vdvae.network import VDVAE

__all__ = ["LatentPCAPrior", "PosthocPriorVDVAE", "latent_prior_path", "fit_after_training", "with_latent_prior"]


class LatentPCAPrior(nn.Module):
    """z = mean + y @ coef + T * (c @ basis), c ~ N(0, I_k): a Gaussian of rank k over the concatenated latents of
    the top ``len(shapes)`` groups, whose mean moves linearly with the covariate features y (K,) of a conditional
    model. ``basis`` (k, D) holds the principal directions of the residuals scaled by their standard deviations.

    Args:
        shapes: per group (Z, r, r, r), top first.
        mean: (D,) mean of the flattened latents (at all-zero covariate features).
        basis: (k, D).
        coef: (K, D) regression of the latents on the covariate features; None for an unconditional model.
    """

    def __init__(
        self, shapes: list[list[int]], mean: torch.Tensor, basis: torch.Tensor, coef: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        sizes = [int(torch.tensor(s).prod()) for s in shapes]
        if mean.shape != (sum(sizes),) or basis.dim() != 2 or basis.shape[1] != mean.shape[0]:
            raise ValueError(f"mean must be ({sum(sizes)},) and basis (k, {sum(sizes)}) for latents of shapes {shapes}")
        self.shapes = [list(map(int, s)) for s in shapes]
        self.sizes = sizes
        if coef is not None and (coef.dim() != 2 or coef.shape[1] != mean.shape[0]):
            raise ValueError(f"coef must be (K, {mean.shape[0]}), got {list(coef.shape)}")
        self.register_buffer("mean", mean.float())
        self.register_buffer("basis", basis.float())
        self.register_buffer("coef", None if coef is None else coef.float())

    @classmethod
    @torch.no_grad()
    def fit(
        cls,
        vae: VDVAE,
        volumes: torch.Tensor,
        down_to_resolution: int,
        rank: int | None = None,
        batch_size: int = 8,
        covariates: torch.Tensor | None = None,
    ) -> LatentPCAPrior:
        """Fits to the posterior means of the groups at resolutions <= ``down_to_resolution`` of ``volumes``
        (N, C, R, R, R); ``rank`` defaults to N - 1 (every direction the data span). For a conditional model,
        ``covariates`` (N, K) are the volumes' features: the latents are regressed on them (least squares) and the
        PCA is of the residuals."""
        groups = sum(1 for r in vae.group_resolutions() if r <= down_to_resolution)
        if groups < 1:
            raise ValueError(
                f"down_to_resolution {down_to_resolution} holds no latent group (group resolutions {vae.group_resolutions()})"
            )
        if len(volumes) < 2:
            raise ValueError(f"fitting the latent prior needs at least 2 volumes, got {len(volumes)}")
        vae.eval()
        if (covariates is None) != (vae.num_covariates == 0):
            raise ValueError(
                f"the network has {vae.num_covariates} covariate features: fit with covariates (N, K) exactly when K > 0"
            )
        rows = []
        for i, x in enumerate(volumes.split(batch_size)):
            c = None if covariates is None else covariates[i * batch_size : i * batch_size + x.shape[0]]
            _, _, _, zs = vae.decode_latents(
                vae.encode(x), x.shape[0], groups, sample_posterior=False, sample_prior=False, covariates=c
            )
            rows.append(torch.cat([z.float().flatten(1) for z in zs[:groups]], dim=1))
        shapes = [list(z.shape[1:]) for z in zs[:groups]]
        data = torch.cat(rows)
        coef = None
        if covariates is None:
            mean = data.mean(0)
            residuals = data - mean
            dof = len(data) - 1
        else:
            design = torch.cat([torch.ones(len(data), 1), covariates.float()], dim=1)  # (N, 1 + K)
            solution = torch.linalg.lstsq(design.double(), data.double()).solution.float()
            mean, coef = solution[0], solution[1:]
            residuals = data - design @ solution
            dof = max(1, len(data) - design.shape[1])
        _, s, vt = torch.linalg.svd(residuals, full_matrices=False)
        k = min(rank or len(data) - 1, len(s))
        basis = (s[:k] / dof**0.5)[:, None] * vt[:k]
        return cls(shapes, mean, basis, coef)

    def marginal(self, groups: int) -> LatentPCAPrior:
        """The prior of the first ``groups`` groups alone: the exact marginal of this Gaussian (its mean and basis
        columns of those groups), so one fit to the finest groups serves every coarser cut."""
        if not 1 <= groups <= len(self.shapes):
            raise ValueError(f"groups must be in [1, {len(self.shapes)}], got {groups}")
        d = sum(self.sizes[:groups])
        coef = None if self.coef is None else self.coef[:, :d].clone()
        return LatentPCAPrior(self.shapes[:groups], self.mean[:d].clone(), self.basis[:, :d].clone(), coef)

    def sample_latents(
        self, n: int, temperature: float = 1.0, covariates: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """``n`` draws, split into the groups' latents [(n, Z, r, r, r)], top first; a conditional prior's at
        ``covariates`` (n, K) (None: all-zero features)."""
        coeffs = torch.randn(n, self.basis.shape[0], device=self.basis.device) * temperature
        flat = self.mean + coeffs @ self.basis
        if self.coef is not None and covariates is not None:
            flat = flat + covariates.float().to(self.coef.device) @ self.coef
        return [part.reshape(n, *shape) for part, shape in zip(flat.split(self.sizes, dim=1), self.shapes)]


class PosthocPriorVDVAE(nn.Module):
    """A VDVAE whose ``sample`` draws the coarse groups from ``latent_prior`` and the rest from its own priors, at
    the same temperature; every other method is the VDVAE's."""

    def __init__(self, vae: VDVAE, latent_prior: LatentPCAPrior) -> None:
        super().__init__()
        self.vae, self.latent_prior = vae, latent_prior
        self.resolution = vae.resolution

    def forward(self, x: torch.Tensor, covariates: torch.Tensor | None = None) -> torch.Tensor:
        return self.vae(x, covariates)

    def __getattr__(self, name: str):
        """Everything but ``sample`` is the VDVAE's (``elbo``, ``encode``, ``group_resolutions``, ...)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("vae"), name)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, covariates: torch.Tensor | None = None) -> torch.Tensor:
        if n <= 0 or temperature <= 0:
            raise ValueError(f"number of samples and temperature must be positive, got {n} and {temperature}")
        given = self.latent_prior.sample_latents(n, temperature, covariates)
        return self.vae.decode_latents(
            None, n, 0, sample_prior=True, temperature=temperature, given=given, covariates=covariates
        )[0]


def latent_prior_path(model_path: str) -> str:
    """Where the post-hoc prior of ``models/model.pt`` lives: ``models/model_latent_prior.pt``."""
    return os.path.splitext(model_path)[0] + "_latent_prior.pt"


def save_latent_prior(prior: LatentPCAPrior, path: str, down_to_resolution: int, choice: dict | None = None) -> str:
    """Writes the prior (atomically) with ``choice``, the sampler comparison of :func:`choose_sampler`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(
        {
            "shapes": prior.shapes,
            "mean": prior.mean,
            "basis": prior.basis,
            "coef": prior.coef,
            "down_to_resolution": down_to_resolution,
            "choice": choice,
        },
        tmp,
    )
    os.replace(tmp, path)
    return path


def fit_after_training(
    network_def: VDVAE,
    model_path: str,
    train_files,
    preprocessing,
    down_to_resolution: int,
    temperature: float | list[float] = 1.0,
    covariate_features: dict | None = None,
) -> str | None:
    """Run at the end of train.json when ``latent_prior_resolution`` > 0: fits the post-hoc prior of the groups
    <= ``down_to_resolution``^3 of the best weights (``model_path``) to the training volumes and writes it next to
    them (:func:`latent_prior_path`), where inference.json and evaluate.json find it, with the sampler comparison of
    :func:`choose_sampler` at ``temperature`` (train.json passes inference.json's; a list: its first). A conditional
    model's prior is fitted with ``covariate_features`` ({file: (K,)}, the data split's). Returns the path (None when
    off or when training saved no weights)."""
    if down_to_resolution <= 0 or not is_main_process():
        return None
    if not os.path.isfile(model_path):  # e.g. a wall-clock budget that ended before the first validation
        logging.getLogger(__name__).warning(
            f"no weights at {model_path}: training stopped before its first validation saved any, so no post-hoc "
            "prior was fitted (inference.json then samples the learned priors)"
        )
        return None
    vae = load_weights(
        copy.deepcopy(network_def).to(memory_format=torch.contiguous_format), model_path, "cpu"
    )  # not the training instance
    volumes = preprocess_volumes(train_files, preprocessing)
    features = torch.stack([covariate_features[f] for f in train_files]) if covariate_features else None
    prior = LatentPCAPrior.fit(vae, volumes, down_to_resolution, covariates=features)
    if isinstance(temperature, (list, tuple)):
        temperature = temperature[0]
    choice = choose_sampler(vae, prior, temperature=float(temperature))
    path = save_latent_prior(prior, latent_prior_path(model_path), down_to_resolution, choice)
    logging.getLogger(__name__).info(
        f"post-hoc prior of the {len(prior.shapes)} latent groups <= {down_to_resolution}^3 (rank {prior.basis.shape[0]}): "
        f"{path}; sampler by default: {choice['sampler']} (mean anatomy score of {choice['num_samples']} samples at "
        f"T = {choice['temperature']:g}: {choice['anatomy_score']})"
    )
    return path


SAMPLERS = ("posthoc", "learned")


@torch.no_grad()
def choose_sampler(
    vae: VDVAE, prior: LatentPCAPrior, num_samples: int = 16, seed: int = 0, temperature: float = 1.0
) -> dict:
    """Which sampler ``inference.json`` and ``evaluate.json`` use by default (``use_latent_prior`` "auto"): the one
    whose ``num_samples`` samples at ``temperature`` (the stream ``seed`` of :func:`draw_samples`, what
    inference.json draws) have the higher mean anatomy score (:mod:`scripts.engine.anatomy`; of the first channel
    for volumes of several modalities), the post-hoc prior on a tie. Returns {"sampler", "anatomy_score":
    {"posthoc", "learned"}, "num_samples", "seed", "temperature"}."""
    found = {"num_samples": num_samples, "seed": seed, "temperature": float(temperature)}
    if vae.resolution < 8:  # too small for the anatomy score: keep the post-hoc prior
        return {"sampler": "posthoc", "anatomy_score": None, **found, "num_samples": 0}
    score = AnatomyScore(vae.resolution)
    scores = {}
    for name, generator in (("posthoc", PosthocPriorVDVAE(vae, prior)), ("learned", vae)):
        samples = draw_samples(generator, temperature, seed, range(num_samples))
        scores[name] = float(score.score_all(samples[:, :1]).mean())
    sampler = "learned" if scores["learned"] > scores["posthoc"] else "posthoc"
    return {"sampler": sampler, "anatomy_score": scores, **found}


def with_latent_prior(vae: VDVAE, model_path: str, use: bool | str = "auto") -> nn.Module:
    """``vae`` wrapped in :class:`PosthocPriorVDVAE` when a post-hoc prior lies next to ``model_path`` and ``use`` is
    True, or "auto" and the training's comparison (:func:`choose_sampler`) chose it; ``vae`` itself otherwise."""
    if use not in (True, False, "auto"):
        raise ValueError(f"use_latent_prior must be true, false or 'auto', got {use!r}")
    path = latent_prior_path(model_path)
    if not use or not os.path.isfile(path):
        return vae
    state = torch.load(path, map_location=vae.output_head.conv.weight.device, weights_only=True)
    choice = state.get("choice")
    if use == "auto" and choice is not None:
        logging.getLogger(__name__).info(
            f"sampler: {choice['sampler']}, the better anatomy score after training {choice['anatomy_score']} "
            "(use_latent_prior true / false overrides)"
        )
        if choice["sampler"] == "learned":
            return vae
    prior = LatentPCAPrior(state["shapes"], state["mean"], state["basis"], state.get("coef"))
    expected = [[b.latent_channels, r, r, r] for b, r in zip(vae.decoder_blocks, vae.group_resolutions())][
        : len(prior.shapes)
    ]
    if prior.shapes != expected:
        raise ValueError(
            f"{path} was fitted to latents of shapes {prior.shapes}, but the network's top groups have {expected}: refit it"
        )
    return PosthocPriorVDVAE(vae, prior)
