# Copyright 2026 The VDVAE bundle authors. Licensed under the Apache License, Version 2.0.
"""Synthetic volumes with the reference generator's options: smoothed background noise plus one randomly sized
and rotated ellipsoid inclusion, normalised by the maximum, one identity-affine NIfTI per volume.

CLI: ``python -m scripts.engine.generate_synthetic_data --voxels_per_axis 32 --number_of_files 100 --output_directory DIR``
"""

from __future__ import annotations

import os

import fire
import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.stats import special_ortho_group

__all__ = ["synthetic_volume", "generate_synthetic_data"]


def synthetic_volume(
    rng: np.random.Generator,
    voxels_per_axis: int = 32,
    background_noise_amplitude: float = 0.05,
    background_noise_length_scale: float = 0.5,
    ellipsoid_increment_interval: tuple[float, float] = (0.25, 0.75),
) -> np.ndarray:
    """One (N, N, N) float32 volume with maximum 1."""
    n = voxels_per_axis
    vol = gaussian_filter(rng.uniform(0.0, background_noise_amplitude, (n, n, n)), background_noise_length_scale)
    lo, hi = max(1, n // 8), max(1, n // 2)
    half_axes = rng.integers(lo, hi + 1, size=3).astype(np.float64)
    rotation = special_ortho_group.rvs(3, random_state=rng)
    grid = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2.0] * 3, indexing="ij"), axis=-1)
    local = grid @ rotation  # coordinates in the ellipsoid's frame
    inside = ((local / half_axes) ** 2).sum(-1) <= 1.0
    vol[inside] += rng.uniform(*ellipsoid_increment_interval)
    return (vol / vol.max()).astype(np.float32)


def generate_synthetic_data(
    output_directory: str,
    voxels_per_axis: int = 32,
    number_of_files: int = 1000,
    random_seed: int = 0,
    background_noise_amplitude: float = 0.05,
    background_noise_length_scale: float = 0.5,
    ellipsoid_increment_interval: tuple[float, float] = (0.25, 0.75),
) -> list[str]:
    """Writes ``number_of_files`` volumes ``synthetic_XXXXX.nii.gz`` to ``output_directory``."""
    if voxels_per_axis < 2 or voxels_per_axis & (voxels_per_axis - 1):
        raise ValueError(f"voxels_per_axis must be a power of two >= 2, got {voxels_per_axis}")
    if number_of_files < 1:
        raise ValueError(f"number_of_files must be >= 1, got {number_of_files}")
    lo, hi = ellipsoid_increment_interval
    if not 0 <= lo <= hi:
        raise ValueError(
            f"ellipsoid_increment_interval must be [lo, hi] with 0 <= lo <= hi, got {ellipsoid_increment_interval}"
        )
    os.makedirs(output_directory, exist_ok=True)
    rng = np.random.default_rng(random_seed)
    paths = []
    for i in range(number_of_files):
        vol = synthetic_volume(
            rng, voxels_per_axis, background_noise_amplitude, background_noise_length_scale, (lo, hi)
        )
        path = os.path.join(output_directory, f"synthetic_{i:05d}.nii.gz")
        nib.save(nib.Nifti1Image(vol, np.eye(4)), path)
        paths.append(path)
    return paths


def main(**kwargs) -> None:
    paths = generate_synthetic_data(**kwargs)
    print(f"wrote {len(paths)} volumes to {os.path.dirname(paths[0])}")


if __name__ == "__main__":
    fire.Fire(main)
