# Copyright 2026 The VDVAE bundle authors. Licensed under the Apache License, Version 2.0.
"""The built-in data set: a cohort of synthetic brains derived from the MNI ICBM152 2009 T1 template that
nilearn ships (no download; licence in docs/data_license.txt).

Each subject is the skull-stripped 2 mm template padded to a cube, resized to ``voxels_per_axis``^3 and then
deformed and re-contrasted with MONAI transforms: random affine (rotation, scale, translation), elastic
deformation, bias field, gamma contrast and Gaussian noise over the whole volume, background included, as in
MR magnitude images. (A background of exact zeros lets the per-voxel Gaussian shrink its scale to the floor
there, and the resulting likelihood spikes made training at the default learning rate diverge.) Files are
float32 NIfTI with the template's orientation and the resized voxel size.

``covariates.csv`` (columns ``file``, ``brain_volume_ml``, ``ventricle_volume_ml``) holds two covariates measured on
each subject, not invented: two masks of the template go through the same pad, resize and spatial deformation as
the image (as extra channels of the same transform call, so the same random affine and elastic field), and each
covariate is the sum of its deformed (partial-volume) mask times the voxel volume of the file's affine:

- brain: nilearn's MNI152 brain mask, i.e. the skull-stripped template's extent (brain tissue and the CSF inside);
- ventricles: the template has no ventricle mask, so one is derived: voxels of that brain mask whose grey plus white
  matter probability (nilearn's MNI152 tissue maps) is below 0.5, inside the box |x| < 30 mm, -50 < y < 35 mm,
  -5 < z < 35 mm around the lateral ventricles, keeping the two largest connected parts (left and right lateral
  ventricle; 22 mL in the 2 mm template).

CLI: ``python -m scripts.engine.default_data --output_directory data/mni_cohort --number_of_files 200``;
``--covariates_only True`` writes ``covariates.csv`` for a cohort generated before it existed (same seed, same
volumes: the first file is compared).
"""

from __future__ import annotations

import csv
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
from scipy import ndimage

__all__ = ["generate_mni_cohort", "template_volume", "template_masks", "COVARIATES_FILE", "COHORT_COVARIATES"]

COVARIATES_FILE = "covariates.csv"
COHORT_COVARIATES = ("brain_volume_ml", "ventricle_volume_ml")
VENTRICLE_BOX_MM = ((-30.0, 30.0), (-50.0, 35.0), (-5.0, 35.0))  # x, y, z in MNI space around the lateral ventricles


def _to_cube(data: np.ndarray, voxels_per_axis: int) -> torch.Tensor:
    """A 2 mm template map padded to a cube and area-resized to ``voxels_per_axis``^3: (N, N, N)."""
    side = max(data.shape)
    cube = SpatialPad(spatial_size=(side, side, side))(torch.from_numpy(np.asarray(data, dtype=np.float32))[None])
    return torch.as_tensor(Resize(spatial_size=(voxels_per_axis,) * 3, mode="area")(cube)[0])


def template_volume(voxels_per_axis: int) -> tuple[np.ndarray, np.ndarray]:
    """The nilearn MNI152 2009 brain (2 mm) padded to a cube and resized: (N, N, N) in [0, 1], and its affine."""
    from nilearn.datasets import load_mni152_template

    img = load_mni152_template(resolution=2)
    data = np.asarray(img.get_fdata(), dtype=np.float32)
    data[data < 1e-3] = 0.0
    side = max(data.shape)
    vol = _to_cube(data, voxels_per_axis).clamp_min(0)
    vol = (vol / vol.max()).numpy()
    full = np.eye(4)  # the template's axes, voxel size scaled by side / N, centred on the origin
    full[:3, :3] = img.affine[:3, :3] * (side / voxels_per_axis)
    full[:3, 3] = -full[:3, :3] @ np.full(3, (voxels_per_axis - 1) / 2.0)
    return vol, full


def template_masks(voxels_per_axis: int) -> dict[str, np.ndarray]:
    """The brain and lateral-ventricle masks of the template (module docstring) on the grid of
    :func:`template_volume`: {"brain", "ventricles"}, each (N, N, N) in [0, 1] (partial volumes after resizing)."""
    from nilearn.datasets import (
        load_mni152_brain_mask,
        load_mni152_gm_template,
        load_mni152_template,
        load_mni152_wm_template,
    )
    from nilearn.image import resample_to_img

    t1 = load_mni152_template(resolution=2)

    def on_t1(img, interpolation: str = "continuous") -> np.ndarray:
        kw = dict(interpolation=interpolation, force_resample=True, copy_header=True)
        return np.asarray(resample_to_img(img, t1, **kw).get_fdata(), dtype=np.float32)

    brain = on_t1(load_mni152_brain_mask(resolution=2), "nearest") > 0.5
    tissue = on_t1(load_mni152_gm_template(resolution=2)) + on_t1(load_mni152_wm_template(resolution=2))
    ijk = np.indices(t1.shape).reshape(3, -1)
    xyz = (t1.affine[:3, :3] @ ijk + t1.affine[:3, 3:]).reshape(3, *t1.shape)
    box = np.all([(xyz[a] > lo) & (xyz[a] < hi) for a, (lo, hi) in enumerate(VENTRICLE_BOX_MM)], axis=0)
    labels, n = ndimage.label(brain & (tissue < 0.5) & box)
    sizes = ndimage.sum(labels > 0, labels, range(1, n + 1))
    ventricles = np.isin(labels, 1 + np.argsort(sizes)[-2:])
    return {
        "brain": _to_cube(brain, voxels_per_axis).clamp(0, 1).numpy(),
        "ventricles": _to_cube(ventricles, voxels_per_axis).clamp(0, 1).numpy(),
    }


def write_covariates(path: str, rows: list[dict]) -> str:
    """Writes ``rows`` ({"file", covariate: value}) as a CSV (atomically); returns ``path``."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", *COHORT_COVARIATES])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return path


def generate_mni_cohort(
    output_directory: str,
    number_of_files: int = 200,
    voxels_per_axis: int = 64,
    seed: int = 0,
    covariates_only: bool = False,
) -> list[str]:
    """Writes ``number_of_files`` synthetic subjects as ``subject_XXXX.nii.gz`` and their measured covariates as
    ``covariates.csv``; returns the volumes' paths. ``covariates_only``: write the CSV alone, for the volumes that
    the same arguments made before (stops if the first file differs from what they make)."""
    if number_of_files < 1:
        raise ValueError(f"number_of_files must be >= 1, got {number_of_files}")
    if voxels_per_axis < 8:
        raise ValueError(f"voxels_per_axis must be >= 8, got {voxels_per_axis}")
    os.makedirs(output_directory, exist_ok=True)
    template, affine = template_volume(voxels_per_axis)
    masks = template_masks(voxels_per_axis)
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
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
    spatial, intensity = deform.transforms[:2], deform.transforms[2:]
    paths, rows = [], []
    start = time.time()
    base = torch.from_numpy(np.stack([template, masks["brain"], masks["ventricles"]]))
    for i in range(number_of_files):
        moved = base
        for t in spatial:  # one random affine and elastic field for the image and its masks
            moved = t(moved)
        vol = moved[:1]
        for t in intensity:
            vol = t(vol)
        vol = torch.as_tensor(vol)[0].numpy().astype(np.float32)  # noise everywhere, as in MR magnitude images
        path = os.path.join(output_directory, f"subject_{i:04d}.nii.gz")
        if covariates_only:
            if i == 0 and not np.allclose(np.asarray(nib.load(path).dataobj, dtype=np.float32), vol, atol=1e-5):
                raise ValueError(
                    f"{path} is not the volume that seed {seed} and voxels_per_axis {voxels_per_axis} make: "
                    "covariates_only needs the arguments the cohort was generated with"
                )
        else:
            nib.save(nib.Nifti1Image(vol, affine), path)
        masks_i = torch.as_tensor(moved[1:]).clamp(0, 1).flatten(1).sum(1).numpy() * voxel_ml
        rows.append(
            {"file": os.path.basename(path), **{k: round(float(v), 2) for k, v in zip(COHORT_COVARIATES, masks_i)}}
        )
        paths.append(path)
    set_determinism(None)
    write_covariates(os.path.join(output_directory, COVARIATES_FILE), rows)
    done = "covariates of" if covariates_only else "wrote"
    print(f"{done} {number_of_files} volumes of {n}^3 in {output_directory} in {time.time() - start:.1f} s")
    return paths


def main(**kwargs) -> None:
    generate_mni_cohort(**kwargs)


if __name__ == "__main__":
    fire.Fire(main)
