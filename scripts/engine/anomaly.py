# Copyright 2026 The VDVAE bundle authors. Licensed under the Apache License, Version 2.0.
"""Anomaly maps from the bundle's generators (configs/anomaly.json, configs/vq_anomaly.json).

A model trained on healthy brains "heals" an input: what it cannot explain is the anomaly. Every detector maps a
batch of preprocessed volumes x (B, 1, R, R, R) on [-1, 1] to a voxel map (B, 1, R, R, R), higher = more anomalous,
and the healed volume (B, 1, R, R, R) it was computed against:

* :class:`VDVAEAnomaly`, ``method``:
    - ``likelihood``: per-voxel negative log-likelihood of x under the output Gaussian N(mean, scale^2), with the
      latent groups at resolutions <= ``down_to_resolution`` drawn from the posterior q(z | x) and the finer groups
      from the prior, averaged over ``num_draws`` draws (nats per voxel); healed = the mean of the output means;
    - ``reconstruction``: |x - posterior-mean reconstruction|;
    - ``kl``: the latent surprise at one scale, KL(q(z | x) || p(z | coarser z)) of the latent groups at
      ``kl_resolution`` per latent voxel (nats per image voxel, trilinearly upsampled): the information the encoder
      has to add there beyond what the coarser latents predict. Local structure that does not fit its context (a
      displacement, a mass effect) costs information even where a reconstruction copies it; healed = the
      posterior-mean reconstruction.
* :class:`VQAnomaly`, ``method``:
    - ``resample`` (Pinaya et al. 2022): tokens whose probability under the prior falls below ``threshold`` are
      resampled from the prior, the grid is decoded (healed) and the map is |x - healed|;
    - ``reconstruction``: |x - VQ-VAE reconstruction|.
* :class:`IntensityAnomaly`: the input itself (``high``) or its negative (``low``), the intensity-threshold baseline.

:func:`write_anomaly_maps` runs a detector over a NIfTI folder and writes the maps and healed volumes on each
input's own grid and world space (the preprocessing is inverted by resampling through the affines), per-volume scores
(``scores.csv``, ``scores.json``) and a PNG per volume. The metrics of ``scripts.tools.anomaly_benchmark`` are here too.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Callable, Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "VDVAE_METHODS",
    "VQ_METHODS",
    "gaussian_nll",
    "VDVAEAnomaly",
    "VQAnomaly",
    "IntensityAnomaly",
    "volume_scores",
    "smooth_maps",
    "resample_to_grid",
    "write_anomaly_maps",
    "overlay_png",
    "auroc",
    "average_precision",
    "best_dice",
    "dice_at",
]

logger = logging.getLogger(__name__)

VDVAE_METHODS = ("likelihood", "reconstruction", "kl")
VQ_METHODS = ("resample", "reconstruction")
HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _check_method(method: str, allowed: Sequence[str], family: str) -> str:
    if method not in allowed:
        raise ValueError(f"method must be one of {list(allowed)} for the {family}, got {method!r}")
    return method


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Elementwise negative log-density of x under N(mean, scale^2) in nats, float32; all (B, C, *spatial)."""
    x, mean, scale = x.float(), mean.float(), scale.float()
    return HALF_LOG_2PI + torch.log(scale) + 0.5 * ((x - mean) / scale) ** 2


# ---------------------------------------------------------------------------------------------------- detectors


class VDVAEAnomaly:
    """Anomaly maps of a VDVAE (``scripts.vdvae.network.VDVAE``, or a wrapper with a ``vae`` attribute such as the
    post-hoc prior's ``PosthocPriorVDVAE``).

    Args:
        network: the trained VDVAE.
        method: "likelihood", "reconstruction" or "kl" (see the module docstring).
        down_to_resolution: ``likelihood``: the latent groups at resolutions <= this (voxels per axis) come from
            the posterior, the finer ones from the prior (the resolution of the network: every group posterior).
        num_draws: ``likelihood``: latent draws the NLL and the healed volume are averaged over.
        kl_resolution: ``kl``: the resolution (voxels per axis) of the latent groups whose KL is mapped; None: the
            network's own resolution (its finest latent groups, the benchmark's choice over all lesion kinds; 8 is
            its choice for mass effects).
    """

    def __init__(
        self,
        network: nn.Module,
        method: str = "kl",
        down_to_resolution: int = 16,
        num_draws: int = 1,
        kl_resolution: int | None = None,
    ) -> None:
        self.vae = getattr(network, "vae", network)
        self.method = _check_method(method, VDVAE_METHODS, "VDVAE")
        self.resolution = int(self.vae.resolution)
        self.down_to_resolution = int(down_to_resolution)
        self.posterior_groups = sum(1 for r in self.vae.group_resolutions() if r <= self.down_to_resolution)
        if self.posterior_groups < 1:
            raise ValueError(
                f"down_to_resolution {down_to_resolution} holds no latent group; choose among {sorted(set(self.vae.group_resolutions()))}"
            )
        if int(num_draws) < 1:
            raise ValueError(f"num_draws must be >= 1, got {num_draws}")
        self.num_draws = int(num_draws)
        self.kl_resolution = self.resolution if kl_resolution is None else int(kl_resolution)
        self.kl_groups = [g for g, r in enumerate(self.vae.group_resolutions()) if r == self.kl_resolution]
        if self.method == "kl" and not self.kl_groups:
            raise ValueError(
                f"kl_resolution {kl_resolution} holds no latent group; choose among {sorted(set(self.vae.group_resolutions()))}"
            )

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (B, 1, R, R, R) on [-1, 1] -> {"map": (B, 1, R, R, R), "healed": (B, 1, R, R, R)}, float32."""
        return self.running_maps(x)[-1]

    @torch.no_grad()
    def kl_maps(self, x: torch.Tensor) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """One posterior-mean pass: {resolution: KL of the groups at that resolution per image voxel, (B, 1, R, R, R)
        float32, trilinearly upsampled} for every latent resolution, and the reconstruction (B, 1, R, R, R). The
        per-position KL is taken from the groups' prior and posterior heads (forward hooks), with
        :func:`scripts.vdvae.network.gaussian_kl`, the elementwise form of the KL the model is trained with."""
        from scripts.vdvae.network import gaussian_kl

        self.vae.eval()
        outputs: dict[tuple[int, str], torch.Tensor] = {}
        handles = []
        for g, block in enumerate(self.vae.decoder_blocks):
            for head in ("prior_mean", "prior_scale", "posterior_mean", "posterior_scale"):
                if hasattr(block, head):
                    hook = lambda _m, _i, out, key=(g, head): outputs.__setitem__(key, out)  # noqa: E731
                    handles.append(getattr(block, head).register_forward_hook(hook))
        try:
            mean, _, _ = self.vae.decode(
                self.vae.encode(x), x.shape[0], self.vae.num_latent_groups, sample_posterior=False
            )
        finally:
            for h in handles:
                h.remove()
        maps: dict[int, torch.Tensor] = {}
        for g, (block, r) in enumerate(zip(self.vae.decoder_blocks, self.vae.group_resolutions())):
            mu_q, scale_q = (
                outputs[(g, "posterior_mean")].float(),
                block._scale(outputs[(g, "posterior_scale")].float()),
            )
            if (g, "prior_mean") in outputs:
                mu_p, scale_p = outputs[(g, "prior_mean")].float(), block._scale(outputs[(g, "prior_scale")].float())
            else:  # the top group: N(0, I)
                mu_p, scale_p = torch.zeros_like(mu_q), torch.ones_like(mu_q)
            kl = gaussian_kl(mu_q, scale_q, mu_p, scale_p).sum(1, keepdim=True) / (self.resolution // r) ** 3
            if r < self.resolution:
                kl = F.interpolate(kl, size=x.shape[2:], mode="trilinear", align_corners=False)
            maps[r] = maps[r] + kl if r in maps else kl
        return maps, mean.float()

    @torch.no_grad()
    def running_maps(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """What :meth:`__call__` returns after each of the ``num_draws`` draws (running means; one entry for
        ``reconstruction``): the benchmark measures several draw counts from one pass."""
        self.vae.eval()
        if self.method == "kl":
            maps, mean = self.kl_maps(x)
            return [{"map": maps[self.kl_resolution], "healed": mean}]
        laterals = self.vae.encode(x)
        b = x.shape[0]
        if self.method == "reconstruction":
            mean, _, _ = self.vae.decode(laterals, b, self.vae.num_latent_groups, sample_posterior=False)
            return [{"map": (x.float() - mean.float()).abs(), "healed": mean.float()}]
        nll = torch.zeros_like(x, dtype=torch.float32)
        healed = torch.zeros_like(nll)
        out = []
        for d in range(1, self.num_draws + 1):
            mean, scale, _ = self.vae.decode(
                laterals, b, self.posterior_groups, sample_posterior=True, sample_prior=True
            )
            nll += gaussian_nll(x, mean, scale)
            healed += mean.float()
            out.append({"map": nll / d, "healed": healed / d})
        return out

    def describe(self) -> dict:
        d = {"family": "vdvae", "method": self.method}
        if self.method == "likelihood":
            d.update(down_to_resolution=self.down_to_resolution, num_draws=self.num_draws, map_units="nats per voxel")
        elif self.method == "kl":
            d.update(kl_resolution=self.kl_resolution, map_units="nats per voxel (latent KL at kl_resolution)")
        else:
            d.update(map_units="absolute difference on the [-1, 1] scale")
        return d


class VQAnomaly:
    """Anomaly maps of a VQ-VAE and a prior over its tokens (``scripts.vq.networks.VQGenerator``).

    Args:
        generator: the VQ-VAE (``generator.vqvae``) and its prior (``generator.prior``), autoregressive or absorbing.
        method: "resample" or "reconstruction" (see the module docstring).
        threshold: ``resample``: tokens with a probability below this under the prior are resampled.
        temperature: ``resample``: temperature of the replacement draws.
        mask_groups: absorbing prior only: the token probabilities are those of each token given the others, with
            every ``mask_groups``-th token masked at a time (``mask_groups`` denoiser passes per volume).
    """

    def __init__(
        self,
        generator: nn.Module,
        method: str = "resample",
        threshold: float = 0.001,
        temperature: float = 1.0,
        mask_groups: int = 8,
    ) -> None:
        from scripts.vq.networks import AutoregressivePrior

        self.vqvae, self.prior = generator.vqvae, generator.prior
        self.method = _check_method(method, VQ_METHODS, "VQ family")
        if self.vqvae.spatial_dims != 3 or self.vqvae.in_channels != 1:
            raise ValueError(
                f"anomaly maps need a 3-D, single-channel VQ-VAE (spatial_dims 3, in_channels 1), got spatial_dims "
                f"{self.vqvae.spatial_dims}, in_channels {self.vqvae.in_channels}"
            )
        if not 0.0 < float(threshold) < 1.0:
            raise ValueError(f"threshold must be a probability in (0, 1), got {threshold}")
        self.threshold = float(threshold)
        self.temperature = float(temperature)
        self.mask_groups = int(mask_groups)
        self.autoregressive = isinstance(self.prior, AutoregressivePrior)
        self.resolution = int(self.vqvae.resolution)
        self.last_resampled_fraction: torch.Tensor | None = None  # (B,) of the last call

    @torch.no_grad()
    def token_probabilities(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, *grid) tokens -> (B, *grid) probability of each token under the prior: given the tokens before it in
        the prior's ordering (autoregressive, exact), or given all the others (absorbing, ``mask_groups`` passes)."""
        b = tokens.shape[0]
        flat = tokens.reshape(b, -1)
        if self.autoregressive:
            seq_p = torch.exp(-self.prior.token_nll(tokens))  # (B, L) in sequence order
            probs = torch.empty_like(seq_p)
            probs[:, self.prior.order] = seq_p
            return probs.reshape(tokens.shape)
        probs = torch.empty(flat.shape, dtype=torch.float32, device=flat.device)
        index = torch.arange(flat.shape[1], device=flat.device)
        for g in range(self.mask_groups):
            sel = index % self.mask_groups == g
            masked = flat.clone()
            masked[:, sel] = self.prior.mask_id
            logp = F.log_softmax(self.prior.denoiser(masked).float(), dim=-1)  # (B, L, K)
            probs[:, sel] = logp.gather(-1, flat[..., None])[..., 0][:, sel].exp()
        return probs.reshape(tokens.shape)

    @torch.no_grad()
    def resample(self, tokens: torch.Tensor, flagged: torch.Tensor) -> torch.Tensor:
        """(B, *grid) tokens, (B, *grid) bool -> tokens with the ``flagged`` ones drawn anew from the prior. The
        autoregressive prior draws them in its ordering, each given the (already healed) tokens before it: one
        transformer pass over the prefix per flagged token, volume by volume (a batch would pay for the union of
        the flagged positions)."""
        if not self.autoregressive:
            return self.prior.sample(tokens.shape[0], self.temperature, known=tokens, known_mask=~flagged)
        prior, k = self.prior, self.prior.num_embeddings
        seq = prior._sequence(tokens).clone()  # (B, L) in sequence order
        flag = prior._sequence(flagged)
        for b in range(seq.shape[0]):
            for i in torch.nonzero(flag[b]).flatten().tolist():
                inputs = F.pad(seq[b : b + 1, :i], (1, 0), value=k)  # begin-of-sequence token + prefix: (1, i + 1)
                logits = prior.transformer(inputs).float()[0, -1, :k] / self.temperature
                seq[b, i] = torch.multinomial(F.softmax(logits, dim=-1), 1)[0]
        out = torch.empty_like(seq)
        out[:, prior.order] = seq
        return out.reshape(tokens.shape)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (B, 1, R, R, R) on [-1, 1] -> {"map": (B, 1, R, R, R), "healed": (B, 1, R, R, R)}, float32."""
        self.vqvae.eval()
        self.prior.eval()
        tokens = self.vqvae.tokens(x)
        if self.method == "resample":
            flagged = self.token_probabilities(tokens) < self.threshold
            self.last_resampled_fraction = flagged.flatten(1).float().mean(1)
            tokens = self.resample(tokens, flagged)
        healed = self.vqvae.decode_tokens(tokens).float().clamp(-1.0, 1.0)
        return {"map": (x.float() - healed).abs(), "healed": healed}

    def describe(self) -> dict:
        d = {
            "family": "vq",
            "method": self.method,
            "prior": "autoregressive" if self.autoregressive else "absorbing",
            "map_units": "absolute difference on the [-1, 1] scale",
        }
        if self.method == "resample":
            d.update(threshold=self.threshold, temperature=self.temperature)
        return d


class IntensityAnomaly:
    """The intensity-threshold baseline: map = x (``direction`` "high": bright is anomalous) or -x ("low")."""

    def __init__(self, direction: str = "high", resolution: int | None = None) -> None:
        if direction not in ("high", "low"):
            raise ValueError(f"direction must be 'high' or 'low', got {direction!r}")
        self.direction = direction
        self.resolution = resolution

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "map": x.float() if self.direction == "high" else -x.float(),
            "healed": torch.zeros_like(x, dtype=torch.float32),
        }

    def describe(self) -> dict:
        return {"family": "none", "method": f"intensity_{self.direction}"}


def smooth_maps(maps: torch.Tensor, size: int = 1) -> torch.Tensor:
    """Mean filter of ``size``^3 voxels (odd; 1: unchanged) over (B, 1, D, H, W) maps, averaging only the voxels
    inside the volume at its borders. Lesions are blobs and model errors at single voxels (edges, noise) are not,
    so a small filter raises the one above the other (measured in docs/anomaly.md)."""
    size = int(size)
    if size < 1 or size % 2 == 0:
        raise ValueError(f"map_smoothing must be an odd number of voxels >= 1, got {size}")
    if size == 1:
        return maps
    return F.avg_pool3d(maps.float(), size, stride=1, padding=size // 2, count_include_pad=False)


def volume_scores(maps: torch.Tensor, top_fraction: float = 0.01) -> torch.Tensor:
    """Per-volume anomaly score: the mean of the highest ``top_fraction`` of each map's voxels. (B, 1, *R) -> (B,)."""
    flat = maps.flatten(1).float()
    k = max(1, int(round(top_fraction * flat.shape[1])))
    return flat.topk(k, dim=1).values.mean(1)


# ---------------------------------------------------------------------------------------------------- grids


def resample_to_grid(
    volume: torch.Tensor,
    source_affine: np.ndarray,
    target_affine: np.ndarray,
    target_shape: Sequence[int],
    fill: float = 0.0,
    chunk: int = 32,
) -> torch.Tensor:
    """Trilinear resampling of a volume (D, H, W) with voxel-to-world ``source_affine`` (4, 4) onto the grid of
    ``target_shape`` (3 ints) with ``target_affine``: each target voxel takes the source value at its world position,
    ``fill`` outside the source. Works in slabs of ``chunk`` target slices. Returns (*target_shape) float32."""
    src = torch.as_tensor(volume).float()
    size = torch.tensor(src.shape, dtype=torch.float64)
    to_source = torch.as_tensor(
        np.linalg.inv(np.asarray(source_affine, dtype=np.float64)) @ np.asarray(target_affine, dtype=np.float64)
    )
    d, h, w = (int(s) for s in target_shape)
    jj, kk = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    out = []
    for start in range(0, d, chunk):
        ii = torch.arange(start, min(d, start + chunk), dtype=torch.float64)[:, None, None].expand(-1, h, w)
        ijk = torch.stack([ii, jj.expand_as(ii), kk.expand_as(ii), torch.ones_like(ii)], -1)  # (n, H, W, 4)
        pos = (ijk @ to_source.T)[..., :3]  # source voxel coordinates
        norm = 2.0 * pos / (size - 1).clamp_min(1.0) - 1.0  # align_corners=True: voxel centres at -1 and 1
        grid = norm.flip(-1).float()[None]  # grid_sample wants (x, y, z) = (W, H, D) order
        sampled = F.grid_sample(
            (src - fill)[None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True
        )
        out.append(sampled[0, 0] + fill)
    return torch.cat(out)


def _grids_match(a: np.ndarray, shape_a: Sequence[int], b: np.ndarray, shape_b: Sequence[int]) -> bool:
    return list(shape_a) == list(shape_b) and np.allclose(a, b, atol=1e-3 * max(1.0, float(np.abs(b[:3, :3]).max())))


def _inside_fraction(
    mask: np.ndarray, affine: np.ndarray, target_affine: np.ndarray, target_shape: Sequence[int]
) -> float:
    """Fraction of the voxels of ``mask`` (D, H, W) bool (grid ``affine``) that lie inside the target grid."""
    ijk = np.argwhere(mask)
    if len(ijk) == 0:
        return 1.0
    pos = (np.linalg.inv(target_affine) @ affine @ np.c_[ijk, np.ones(len(ijk))].T)[:3].T
    inside = np.all((pos >= -0.5) & (pos <= np.asarray(target_shape) - 0.5), axis=1)
    return float(inside.mean())


def _stem(path: str) -> str:
    name = os.path.basename(path)
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else os.path.splitext(name)[0]


def _input_files(input_dir: str | None) -> list[str]:
    """The NIfTI files of ``input_dir``, each header checked; errors name the folder or the file."""
    from scripts.engine.data import NIFTI_SUFFIXES, check_nifti_header

    if not input_dir:
        raise ValueError("input_dir is not set: pass --input_dir <folder of .nii/.nii.gz volumes>")
    if not os.path.isdir(input_dir):
        raise FileNotFoundError(f"input_dir {input_dir!r} is not a folder: expected a folder of .nii/.nii.gz volumes")
    files = sorted(
        os.path.join(input_dir, f)
        for f in os.listdir(input_dir)
        if f.endswith(NIFTI_SUFFIXES) and os.path.isfile(os.path.join(input_dir, f))
    )
    if not files:
        raise FileNotFoundError(f"input_dir {input_dir!r} holds no .nii or .nii.gz files")
    for f in files:
        check_nifti_header(f)
    return files


def _load(path: str, preprocessing: Callable, percentiles: Sequence[float]) -> tuple:
    """Preprocesses one file. Returns (x (1, R, R, R), its grid's affine (4, 4), the file's own affine (4, 4) and
    3-D shape, its intensity window (the raw values at ``percentiles``, which preprocessing maps to -1 and 1))."""
    try:
        img = nib.load(path)
        raw = np.asarray(img.dataobj, dtype=np.float32)
        x = preprocessing({"image": path})["image"]
    except ValueError:
        raise
    except Exception as e:  # truncated or corrupt data behind a valid header
        raise ValueError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})") from e
    low, high = np.percentile(raw, percentiles)
    grid_affine, affine = np.asarray(x.affine, dtype=np.float64), np.asarray(img.affine, dtype=np.float64)
    return (
        torch.as_tensor(x).float(),
        grid_affine,
        affine,
        tuple(int(s) for s in img.shape[:3]),
        (float(low), float(high)),
    )


# ---------------------------------------------------------------------------------------------------- workflow


@torch.no_grad()
def write_anomaly_maps(
    detector: Callable,
    input_dir: str | None,
    output_dir: str,
    preprocessing: Callable,
    model_path: str | None = None,
    clamp_percentiles: Sequence[float] = (0.05, 99.95),
    batch_size: int = 4,
    seed: int = 0,
    device: torch.device | str = "cpu",
    amp: str = "none",
    score_top_fraction: float = 0.01,
    map_smoothing: int = 1,
    write_png: bool = True,
) -> list[dict]:
    """Anomaly maps of every NIfTI in ``input_dir``; the workflow of ``configs/anomaly.json`` and ``vq_anomaly.json``.

    Each file is preprocessed as in training (``preprocessing``: {"image": path} -> (1, R, R, R) MetaTensor). When the
    weights' sidecar (``model_path`` -> ``.json``) records the training grid and the preprocessed volume lies on
    another grid (another field of view or voxel size than the training volumes), it is resampled onto the training
    grid through world coordinates, with a logged warning; a volume mostly outside the training grid's world space
    (not registered to it) stops with an error. The detector's outputs are resampled back onto the input's own grid
    (its shape and affine), so they overlay it in any viewer. Writes to ``output_dir``:

    * ``<name>_anomaly.nii.gz``: the voxel map (units: see ``scores.json``; 0 outside the model's field of view),
      after a ``map_smoothing``^3 mean filter on the model's grid (:func:`smooth_maps`);
    * ``<name>_healed.nii.gz``: the healed volume, intensities in the input's own window (``clamp_percentiles``);
    * ``<name>.png``: input, healed volume and the map over the input, three planes through the map's maximum;
    * ``scores.csv`` and ``scores.json``: per volume the ``score`` (mean of the highest ``score_top_fraction`` of the
      map's voxels on the model's grid), the mean and maximum of the map, and whether the volume was resampled.

    Batch b is seeded with ``seed + b``. Returns the per-volume rows.
    """
    from scripts.engine.sampling import read_sidecar, save_nifti
    from scripts.engine.training import autocast

    files = _input_files(input_dir)
    info = read_sidecar(model_path) if model_path else {}
    train_affine = np.asarray(info["affine"], dtype=np.float64) if "affine" in info else None
    train_shape = [int(s) for s in info.get("spatial_shape", [])] or None
    percentiles = [float(p) for p in clamp_percentiles]
    os.makedirs(output_dir, exist_ok=True)
    rows: list[dict] = []
    for b, start in enumerate(range(0, len(files), batch_size)):
        items = []
        for path in files[start : start + batch_size]:
            x, grid_affine, affine, shape, window = _load(path, preprocessing, percentiles)
            resampled = False
            if (
                train_affine is not None
                and train_shape is not None
                and not _grids_match(grid_affine, x.shape[1:], train_affine, train_shape)
            ):
                inside = _inside_fraction(x[0].numpy() > -0.8, grid_affine, train_affine, train_shape)
                if inside < 0.5:
                    raise ValueError(
                        f"{path}: only {inside:.0%} of the volume's foreground lies inside the training grid's field of view "
                        f"(world space of {model_path}): register it to the training data's space first"
                    )
                logger.warning(
                    f"{path}: preprocessed onto another grid than training (shape {list(x.shape[1:])}, voxel size "
                    f"{np.linalg.norm(grid_affine[:3, :3], axis=0).round(3).tolist()} mm, origin {grid_affine[:3, 3].round(2).tolist()}; "
                    f"training: {train_shape}, {np.linalg.norm(train_affine[:3, :3], axis=0).round(3).tolist()} mm, "
                    f"{train_affine[:3, 3].round(2).tolist()}): resampled onto the training grid through world coordinates "
                    f"({inside:.0%} of its foreground inside it)"
                )
                x = resample_to_grid(x[0], grid_affine, train_affine, train_shape, fill=-1.0)[None]
                grid_affine, resampled = train_affine, True
            items.append(
                {
                    "path": path,
                    "x": x,
                    "grid_affine": grid_affine,
                    "affine": affine,
                    "shape": shape,
                    "window": window,
                    "resampled": resampled,
                }
            )
        batch = torch.stack([it["x"] for it in items]).to(device)
        torch.manual_seed(seed + b)
        with autocast(batch.device, amp):
            out = detector(batch)
        maps, healed = smooth_maps(out["map"].float().cpu(), map_smoothing), out["healed"].float().cpu()
        scores = volume_scores(maps, score_top_fraction)
        for i, it in enumerate(items):
            name = os.path.join(output_dir, _stem(it["path"]))
            low, high = it["window"]
            amap = resample_to_grid(maps[i, 0], it["grid_affine"], it["affine"], it["shape"], fill=0.0)
            heal = resample_to_grid(healed[i, 0], it["grid_affine"], it["affine"], it["shape"], fill=-1.0)
            save_nifti(amap.numpy(), it["affine"], f"{name}_anomaly.nii.gz")
            save_nifti((low + (heal.numpy() + 1.0) / 2.0 * (high - low)), it["affine"], f"{name}_healed.nii.gz")
            if write_png:
                overlay_png(it["x"][0].numpy(), healed[i, 0].numpy(), maps[i, 0].numpy(), f"{name}.png")
            rows.append(
                {
                    "file": it["path"],
                    "name": _stem(it["path"]),
                    "score": float(scores[i]),
                    "mean": float(maps[i].mean()),
                    "max": float(maps[i].max()),
                    "resampled": it["resampled"],
                }
            )
        logger.info(f"anomaly maps: {len(rows)}/{len(files)} volumes")
    describe = detector.describe() if hasattr(detector, "describe") else {}
    with open(os.path.join(output_dir, "scores.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(output_dir, "scores.json"), "w") as f:
        json.dump(
            {
                "detector": describe,
                "score": f"mean of the highest {score_top_fraction:g} of the map's voxels on the model's grid",
                "map_smoothing": map_smoothing,
                "model_path": model_path,
                "volumes": rows,
            },
            f,
            indent=1,
        )
    logger.info(f"wrote anomaly maps of {len(rows)} volumes to {output_dir} ({describe})")
    return rows


def _planes(volume: np.ndarray, centre: Sequence[int]) -> list[np.ndarray]:
    """The three slices of a (D, H, W) array through ``centre``, each rotated and padded to (N, N) as
    ``scripts.engine.visualisation.three_plane`` lays them out."""
    n = max(volume.shape)
    panels = []
    for sl in (volume[:, :, centre[2]], volume[:, centre[1], :], volume[centre[0], :, :]):
        panel = np.zeros((n, n), dtype=np.float32)
        sl = np.rot90(sl)
        panel[: sl.shape[0], : sl.shape[1]] = sl
        panels.append(panel)
    return panels


def overlay_png(x: np.ndarray, healed: np.ndarray, amap: np.ndarray, path: str, upscale: int = 4) -> str:
    """Writes a colour PNG of three rows (input, healed, input with the map in red to yellow), each the three
    planes through the maximum of the smoothed map. ``x``, ``healed``: (D, H, W) on [-1, 1]; ``amap``: (D, H, W)."""
    from PIL import Image
    from scipy.ndimage import uniform_filter

    smooth = uniform_filter(amap.astype(np.float32), size=3)
    centre = np.unravel_index(int(np.argmax(smooth)), amap.shape)
    grey = lambda v: np.clip((v + 1.0) / 2.0, 0.0, 1.0)  # noqa: E731
    lo, hi = np.percentile(amap, [50.0, 99.9])
    heat = np.clip((amap - lo) / max(hi - lo, 1e-8), 0.0, 1.0)
    rows = []
    for volume in (grey(x), grey(healed)):
        g = np.concatenate(_planes(volume, centre), axis=1)
        rows.append(np.stack([g, g, g], -1))
    g = np.concatenate(_planes(grey(x), centre), axis=1)
    h = np.concatenate(_planes(heat, centre), axis=1)
    alpha = np.where(h > 0.2, 0.8 * h, 0.0)
    colour = np.stack([np.ones_like(h), h, np.zeros_like(h)], -1)
    rows.append((1 - alpha[..., None]) * np.stack([g, g, g], -1) + alpha[..., None] * colour)
    image = np.concatenate(rows, axis=0)
    image = np.repeat(np.repeat(image, upscale, axis=0), upscale, axis=1)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray((image * 255).round().astype(np.uint8), mode="RGB").save(path)
    return path


# ---------------------------------------------------------------------------------------------------- metrics


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (ties count one half): the probability that a
    positive scores above a negative. NaN without both classes."""
    from scipy.stats import rankdata

    s, y = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(labels).ravel().astype(bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def _operating_points(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """True and false positives when predicting ``score >= t`` for every distinct score t (descending), those t, and
    the number of positives."""
    s, y = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(labels).ravel().astype(bool)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    tp, fp = np.cumsum(y), np.cumsum(~y)
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # the last index of each run of equal scores
    return tp[last], fp[last], s[last], int(y.sum())


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the precision-recall curve, sum over thresholds of (recall step) x precision (scikit-learn's
    ``average_precision_score``). NaN without positives."""
    tp, fp, _, p = _operating_points(scores, labels)
    if p == 0:
        return float("nan")
    precision, recall = tp / (tp + fp), tp / p
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def best_dice(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """The highest Dice of ``score >= t`` with ``labels`` over every threshold t, and that t."""
    tp, fp, thresholds, p = _operating_points(scores, labels)
    dice = 2.0 * tp / (tp + fp + p)
    i = int(np.argmax(dice))
    return float(dice[i]), float(thresholds[i])


def dice_at(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    """Dice of ``score >= threshold`` with ``labels`` (1 when both are empty)."""
    pred, y = np.asarray(scores).ravel() >= threshold, np.asarray(labels).ravel().astype(bool)
    denom = pred.sum() + y.sum()
    return float(2.0 * (pred & y).sum() / denom) if denom else 1.0
