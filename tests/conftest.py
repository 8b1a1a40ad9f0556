"""Shared fixtures: tiny architectures and tiny NIfTI folders, so the suite runs in minutes on 2 CPU cores."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from scripts.engine.generate_synthetic_data import generate_synthetic_data  # noqa: E402


def tiny_architecture(resolution: int = 16, width: int = 8) -> dict:
    """Per-level lists for a small VDVAE at ``resolution``^3 (one latent group per level, two at the top)."""
    levels = resolution.bit_length()
    kernels = [3] * (levels - 2) + [2, 1]
    return {
        "channels": [width] * levels,
        "channels_hidden": [width] * levels,
        "channels_top_down": [width] * levels,
        "channels_hidden_top_down": [width] * levels,
        "channels_per_latent": [4] * levels,
        "latent_feature_maps_per_resolution": [1] * (levels - 1) + [2],
        "kernel_sizes_bottom_up": kernels,
        "kernel_sizes_top_down": kernels,
    }


def reference_architecture(resolution: int) -> dict:
    levels = resolution.bit_length()
    ch = [20 * (i + 1) for i in range(levels)]
    lat = [2] + list(range(levels - 1, 0, -1))
    kernels = [3] * (levels - 2) + [2, 1]
    return {
        "channels": ch,
        "channels_hidden": ch,
        "channels_top_down": ch,
        "channels_hidden_top_down": ch,
        "channels_per_latent": [20] * (levels - 1) + [200],
        "latent_feature_maps_per_resolution": lat,
        "kernel_sizes_bottom_up": kernels,
        "kernel_sizes_top_down": kernels,
    }


@pytest.fixture(scope="session")
def nifti_dir(tmp_path_factory) -> str:
    """12 synthetic ellipsoid volumes of 16^3."""
    folder = tmp_path_factory.mktemp("niftis")
    generate_synthetic_data(str(folder), voxels_per_axis=16, number_of_files=12, random_seed=1)
    return str(folder)


# what a bundle is made of (the Model Zoo's copy of it): configs, code, the models/ folder's README, docs, licence
BUNDLE_CONTENT = ["configs", "scripts", "docs", "models/README.md", "LICENSE", "README.md"]


def copy_bundle(target: str) -> str:
    """Copies the bundle's files (:data:`BUNDLE_CONTENT`, no runs, data or weights) to ``target``; returns it."""
    for item in BUNDLE_CONTENT:
        src, dst = os.path.join(ROOT, item), os.path.join(target, item)
        if os.path.isdir(src):
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy2(src, dst)
    return target


def files_under(folder: str) -> set[str]:
    """Relative paths of every file under ``folder``."""
    return {os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs}
