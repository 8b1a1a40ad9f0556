# Copyright 2026 The VDVAE bundle authors. Licensed under the Apache License, Version 2.0.
"""An anatomy measure: does a volume have a brain's tissue contrast *where a brain has its tissues*?

The bundle's Frechet distance compares global feature statistics, which a smooth brain-shaped blob can match.
:class:`AnatomyScore` instead aligns each volume to a brain template (an affine registration, Adam on the
normalised cross-correlation of the two volumes smoothed by 1 voxel), then reads the mean intensity inside the
template's cerebrospinal fluid (ventricles, sulci), grey-matter and white-matter regions (nilearn's MNI152 tissue
maps; each brain voxel goes to its most probable tissue), each normalised so that the background is 0 and the whole
brain 1. The score is the signed sum of the three pairwise contrasts (CSF/GM, GM/WM, CSF/WM) in the direction the
template has them, divided by the template's own:

    score = sum_pairs sign(t_j - t_i) (v_j - v_i) / sum_pairs |t_j - t_i|        (1 = the template's contrast)

A Gaussian blur mixes the thin tissues and lowers the score; voxel noise averages out over a region and does not
lift it; a smooth blob, or anatomy in the wrong place, scores near 0 or below; inverted contrast is negative.
``tests/test_anatomy.py`` checks the ranking on real-anatomy volumes. The regions are those of the template
*after an affine* alignment, so elastic differences between brains cost real volumes part of the score too: the
held-out volumes' score is the figure to reach, never 1.

The default template is the MNI ICBM152 2009 T1 brain that nilearn ships (T1 contrast: CSF < GM < WM). For other
contrasts (FLAIR, T2) pass a skull-stripped template of that contrast *in MNI152 space* (``anatomy_template`` in
``evaluate.json``): the registration uses it, the tissue regions stay MNI152's.

:func:`blur_equivalent_sigma` turns a reconstruction's PSNR into the sigma (voxels) of the Gaussian blur of its
input that has the same PSNR: "as blurred as a 1-voxel Gaussian".
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.layers import GaussianFilter

from scripts.engine.metrics import psnr_per_volume

__all__ = ["AnatomyScore", "gaussian_blur", "blur_equivalent_sigma"]

BLUR_SIGMAS = tuple(np.round(np.arange(0.05, 3.0001, 0.05), 2))  # voxels, the grid of blur_equivalent_sigma


def _unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] (the data's scale to a non-negative one, background near 0)."""
    return (x.float() + 1.0) / 2.0


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of (B, C, D, H, W) volumes on the [-1, 1] scale by ``sigma`` voxels (background-padded:
    outside the volume counts as -1). ``sigma`` 0 returns ``x``."""
    if sigma <= 0:
        return x
    blurred = GaussianFilter(3, float(sigma)).to(x.device)(_unit(x))  # zero padding = background on [0, 1]
    return (blurred * 2.0 - 1.0).to(x.dtype)


def blur_equivalent_sigma(inputs: torch.Tensor, reconstructions: torch.Tensor) -> np.ndarray:
    """Per volume, the sigma (voxels) of the Gaussian blur of the input whose PSNR against the input equals the
    reconstruction's (interpolated on a 0.05-voxel grid up to 3 voxels; 0 when the reconstruction is at least as close as a
    0.05-voxel blur, 3 when it is further than a 3-voxel one). (B,) array."""
    with torch.no_grad():
        target = psnr_per_volume(reconstructions, inputs).cpu().numpy()
        curve = np.stack([psnr_per_volume(gaussian_blur(inputs, s), inputs).cpu().numpy() for s in BLUR_SIGMAS], 1)
    sigmas = np.asarray(BLUR_SIGMAS)
    out = np.empty(len(target))
    for i, (psnr, c) in enumerate(zip(target, curve)):
        if psnr >= c[0]:
            out[i] = 0.0
        else:
            out[i] = float(np.interp(-psnr, -c, sigmas))  # PSNR falls as sigma grows
    return out


def _cube(data: np.ndarray, resolution: int) -> torch.Tensor:
    """A 3-D array padded to a cube and area-resized to ``resolution``^3 (the data pipeline's geometry with
    ``keep_aspect_ratio``, and the built-in cohort's): (1, 1, R, R, R) float32."""
    from monai.transforms import Resize, SpatialPad

    vol = torch.from_numpy(np.asarray(data, dtype=np.float32))[None]
    side = max(vol.shape[1:])
    vol = Resize(spatial_size=(resolution,) * 3, mode="area")(SpatialPad(spatial_size=(side,) * 3)(vol))
    return torch.from_numpy(np.asarray(vol, dtype=np.float32))[None]


def _mni_maps(resolution: int) -> dict[str, torch.Tensor]:
    """nilearn's MNI152 2009 (2 mm) T1 brain, brain mask and grey/white-matter probability maps as cubes
    (1, 1, R, R, R) in the template's orientation (RAS)."""
    from nilearn import datasets

    names = {
        "t1": "load_mni152_template",
        "mask": "load_mni152_brain_mask",
        "gm": "load_mni152_gm_template",
        "wm": "load_mni152_wm_template",
    }
    return {k: _cube(getattr(datasets, f)(resolution=2).get_fdata(), resolution) for k, f in names.items()}


def _template_from_file(path: str, resolution: int) -> torch.Tensor:
    """A skull-stripped NIfTI template in MNI152 space, reoriented to RAS and made a cube: (1, 1, R, R, R)."""
    from monai.transforms import LoadImage, Orientation

    try:
        img = Orientation(axcodes="RAS")(LoadImage(image_only=True, ensure_channel_first=True)(path))
    except Exception as e:  # noqa: BLE001 - name the file whatever the reader says
        raise ValueError(f"cannot read the anatomy template {path!r}: {e}") from e
    if img.ndim != 4 or img.shape[0] != 1:
        raise ValueError(f"anatomy template {path!r} must be one 3-D volume, got shape {tuple(img.shape)}")
    return _cube(np.asarray(img[0]), resolution)


TISSUES = ("csf", "grey_matter", "white_matter")
PAIRS = ((0, 1), (1, 2), (0, 2))


class AnatomyScore:
    """Tissue contrast in the template's tissue regions after affine alignment, relative to the template's own.

    Args:
        resolution: voxels per axis of the volumes to score (>= 8).
        template: a skull-stripped NIfTI template of the data's contrast in MNI152 space, or None for nilearn's
            MNI152 2009 T1 brain.
        registration_steps: Adam steps of the affine registration (on volumes smoothed by 1 voxel and resized to
            at most 32^3).
        device: where the registration and the score run.

    Call with volumes (B, 1, R, R, R) on [-1, 1]; returns the scores (B,).
    """

    def __init__(
        self,
        resolution: int,
        template: str | None = None,
        registration_steps: int = 80,
        device: torch.device | str = "cpu",
    ) -> None:
        if resolution < 8:
            raise ValueError(f"the anatomy score needs at least 8^3 voxels, got {resolution}^3")
        self.resolution, self.device = int(resolution), torch.device(device)
        self.registration_steps = int(registration_steps)
        maps = _mni_maps(self.resolution)
        image = maps["t1"] if template is None else _template_from_file(template, self.resolution)
        self.template = (image / image.max().clamp_min(1e-8)).to(self.device)  # [0, 1]
        inside = maps["mask"] > 0.5
        csf = (maps["mask"] - maps["gm"] - maps["wm"]).clamp_min(0)
        tissue = torch.cat([csf, maps["gm"], maps["wm"]], 1).argmax(1, keepdim=True)
        self.regions = {
            "inside": inside,
            "outside": F.max_pool3d(inside.float(), 5, 1, 2) < 0.5,  # 2 voxels clear of the brain
            **{name: (tissue == k) & inside for k, name in enumerate(TISSUES)},
        }
        self.regions = {k: v.to(self.device).float() for k, v in self.regions.items()}
        if min(float(self.regions[t].sum()) for t in TISSUES) < 1 or float(self.regions["outside"].sum()) < 1:
            raise ValueError(f"at {resolution}^3 the template leaves a tissue region or the background empty")
        self._reg_size = min(32, self.resolution)
        self._reg_template = self._registration_view(self.template).flatten(1)
        self.template_tissue = self.tissue_means(self.template)[0]  # (3,)
        t = self.template_tissue
        self._signs = torch.stack([torch.sign(t[j] - t[i]) for i, j in PAIRS])
        self._norm = float(sum(abs(t[j] - t[i]) for i, j in PAIRS))

    def _registration_view(self, v: torch.Tensor) -> torch.Tensor:
        """Smoothed by 1 voxel, resized to at most 32^3, standardised per volume: what the registration compares."""
        v = GaussianFilter(3, 1.0).to(v.device)(v)
        if v.shape[-1] != self._reg_size:
            v = F.interpolate(v, size=(self._reg_size,) * 3, mode="trilinear", align_corners=False)
        flat = v.flatten(1)
        return (v - flat.mean(1).view(-1, 1, 1, 1, 1)) / flat.std(1).clamp_min(1e-6).view(-1, 1, 1, 1, 1)

    def align(self, x: torch.Tensor) -> torch.Tensor:
        """Affinely aligns volumes (B, 1, R, R, R) on [-1, 1] to the template; returns them on [0, 1] in the
        template's voxel grid (B, 1, R, R, R)."""
        unit = _unit(x.to(self.device))
        grid = F.affine_grid(self.register(x), unit.shape, align_corners=False)
        return F.grid_sample(unit, grid, align_corners=False, padding_mode="zeros")

    def brain_volume_ml(self, x: torch.Tensor, voxel_ml: float) -> torch.Tensor:
        """Brain volume (B,) in mL of volumes (B, 1, R, R, R) on [-1, 1] with voxels of ``voxel_ml`` mL, measured
        from the image alone: the template's brain mask (voxels) times the determinant of the affine that maps the
        template onto the volume. On the built-in cohort it follows the volumes' mask-measured brain_volume_ml with
        Pearson r 0.97 (docs/conditioning.md)."""
        with torch.no_grad():
            det = torch.linalg.det(self.register(x.float())[:, :, :3].double()).abs()
        return (det * float(self.regions["inside"].sum()) * voxel_ml).float().cpu()

    def register(self, x: torch.Tensor) -> torch.Tensor:
        """The affine (B, 3, 4), in ``torch.nn.functional.affine_grid``'s normalised coordinates, that maps the
        template's grid onto volumes (B, 1, R, R, R) on [-1, 1] (normalised cross-correlation, Adam)."""
        unit = _unit(x.to(self.device))
        b = unit.shape[0]
        moving = self._registration_view(unit)
        identity = torch.eye(3, 4, device=self.device).expand(b, 3, 4)
        delta = torch.zeros(b, 3, 4, device=self.device, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=0.01)
        size = (b, 1) + (self._reg_size,) * 3
        with torch.enable_grad():
            for _ in range(self.registration_steps):
                grid = F.affine_grid(identity + delta, size, align_corners=False)
                w = F.grid_sample(moving, grid, align_corners=False, padding_mode="border").flatten(1)
                w = (w - w.mean(1, keepdim=True)) / w.std(1, keepdim=True).clamp_min(1e-6)
                loss = -(w * self._reg_template).mean(1).sum()  # normalised cross-correlation, summed over volumes
                opt.zero_grad()
                loss.backward()
                opt.step()
        return (identity + delta).detach()

    def tissue_means(self, aligned: torch.Tensor) -> torch.Tensor:
        """Mean intensity (B, 3) in the CSF, grey- and white-matter regions of aligned volumes (B, 1, R, R, R) on
        [0, 1], with the background's mean mapped to 0 and the whole brain's to 1."""

        def mean(region: torch.Tensor) -> torch.Tensor:
            return (aligned * region).flatten(1).sum(1) / region.sum()

        background, brain = mean(self.regions["outside"]), mean(self.regions["inside"])
        step = brain - background
        step = torch.where(step.abs() < 1e-6, torch.full_like(step, 1e-6), step)  # an empty volume: no contrast
        return torch.stack([(mean(self.regions[t]) - background) / step for t in TISSUES], 1)

    def score_aligned(self, aligned: torch.Tensor) -> torch.Tensor:
        """Scores (B,) of volumes already aligned (B, 1, R, R, R) on [0, 1]."""
        v = self.tissue_means(aligned)
        contrasts = torch.stack([v[:, j] - v[:, i] for i, j in PAIRS], 1)
        return (contrasts * self._signs).sum(1) / self._norm

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != 1 or tuple(x.shape[2:]) != (self.resolution,) * 3:
            raise ValueError(
                f"the anatomy score needs single-channel volumes (B, 1, {self.resolution}, {self.resolution}, "
                f"{self.resolution}), got {tuple(x.shape)}"
            )
        with torch.no_grad():
            return self.score_aligned(self.align(x.float())).cpu()

    def score_all(self, volumes: torch.Tensor, batch_size: int = 32) -> np.ndarray:
        """Scores of many volumes (N, 1, R, R, R) in batches: (N,) array."""
        return torch.cat([self(b) for b in volumes.split(batch_size)]).numpy()
