# Copyright 2026 The VDVAE bundle authors. Licensed under the Apache License, Version 2.0.
"""The built-in data set: a cohort of synthetic brains derived from the MNI ICBM152 2009 T1 template that
nilearn ships (no download; licence in docs/data_license.txt).

Each subject is the skull-stripped 2 mm template padded to a cube, resized to ``voxels_per_axis``^3 and then
deformed and re-contrasted with MONAI transforms: random affine (rotation, scale, translation), elastic
deformation, bias field, gamma contrast and Gaussian noise over the whole volume, background included, as in
MR magnitude images. (A background of exact zeros lets the per-voxel Gaussian shrink its scale to the floor
there, and the resulting likelihood spikes made training at the default learning rate diverge.) Files are
float32 NIfTI with the template's orientation and the resized voxel size.

CLI: ``python -m scripts.engine.default_data --output_directory data/mni_cohort --number_of_files 200``
"""

from __future__ import annotations

import os
import time

import fire
import nibabel as nib
import numpy as np
import torch
from monai.transforms import (
    Compose,
    Rand3DElastic,
    RandAdjustContrast,
    RandAffine,
    RandBiasField,
    RandGaussianNoise,
    Resize,
    SpatialPad,
)
from monai.utils import set_determinism

__all__ = ["generate_mni_cohort", "template_volume"]


def template_volume(voxels_per_axis: int) -> tuple[np.ndarray, np.ndarray]:
    """The nilearn MNI152 2009 brain (2 mm) padded to a cube and resized: (N, N, N) in [0, 1], and its affine."""
    from nilearn.datasets import load_mni152_template

    img = load_mni152_template(resolution=2)
    data = np.asarray(img.get_fdata(), dtype=np.float32)
    data[data < 1e-3] = 0.0
    side = max(data.shape)
    cube = SpatialPad(spatial_size=(side, side, side))(torch.from_numpy(data)[None])
    vol = Resize(spatial_size=(voxels_per_axis,) * 3, mode="area")(cube)[0]
    vol = torch.as_tensor(vol).clamp_min(0)
    vol = (vol / vol.max()).numpy()
    full = np.eye(4)  # the template's axes, voxel size scaled by side / N, centred on the origin
    full[:3, :3] = img.affine[:3, :3] * (side / voxels_per_axis)
    full[:3, 3] = -full[:3, :3] @ np.full(3, (voxels_per_axis - 1) / 2.0)
    return vol, full


def generate_mni_cohort(
    output_directory: str,
    number_of_files: int = 200,
    voxels_per_axis: int = 64,
    seed: int = 0,
) -> list[str]:
    """Writes ``number_of_files`` synthetic subjects as ``subject_XXXX.nii.gz``; returns their paths."""
    if number_of_files < 1:
        raise ValueError(f"number_of_files must be >= 1, got {number_of_files}")
    if voxels_per_axis < 8:
        raise ValueError(f"voxels_per_axis must be >= 8, got {voxels_per_axis}")
    os.makedirs(output_directory, exist_ok=True)
    template, affine = template_volume(voxels_per_axis)
    n = voxels_per_axis
    deform = Compose(
        [
            RandAffine(
                prob=1.0,
                rotate_range=(0.12, 0.12, 0.12),
                scale_range=(0.08, 0.08, 0.08),
                translate_range=(0.04 * n, 0.04 * n, 0.04 * n),
                padding_mode="zeros",
            ),
            Rand3DElastic(prob=1.0, sigma_range=(n / 10, n / 7), magnitude_range=(n / 2, n), padding_mode="zeros"),
            RandBiasField(prob=1.0, coeff_range=(0.0, 0.2)),
            RandAdjustContrast(prob=1.0, gamma=(0.7, 1.4)),
            RandGaussianNoise(prob=1.0, std=0.015),
        ]
    )
    set_determinism(seed)
    deform.set_random_state(seed)
    paths = []
    start = time.time()
    base = torch.from_numpy(template)[None]
    for i in range(number_of_files):
        vol = torch.as_tensor(deform(base))[0].numpy().astype(np.float32)  # noise everywhere, as in MR magnitude images
        path = os.path.join(output_directory, f"subject_{i:04d}.nii.gz")
        nib.save(nib.Nifti1Image(vol, affine), path)
        paths.append(path)
    set_determinism(None)
    print(f"wrote {number_of_files} volumes of {n}^3 to {output_directory} in {time.time() - start:.1f} s")
    return paths


def main(**kwargs) -> None:
    generate_mni_cohort(**kwargs)


if __name__ == "__main__":
    fire.Fire(main)
