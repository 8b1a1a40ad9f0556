# Copyright 2026 The VDVAE bundle authors. Licensed under the Apache License, Version 2.0.
"""3-plane montages of volumes, for TensorBoard and PNG files."""

from __future__ import annotations

import os

import numpy as np
import torch

__all__ = ["three_plane", "montage", "save_png"]


def three_plane(volume: torch.Tensor | np.ndarray, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    """Central axial, coronal and sagittal slices of a (D, H, W) or (1, D, H, W) volume side by side:
    (N, 3N) float array in [0, 1], first axis of each slice displayed upwards."""
    v = torch.as_tensor(volume).detach().float().cpu().numpy()
    v = v[0] if v.ndim == 4 else v
    v = np.clip((v - low) / (high - low), 0.0, 1.0)
    d, h, w = v.shape
    n = max(d, h, w)
    panels = []
    for sl in (v[:, :, w // 2], v[:, h // 2, :], v[d // 2, :, :]):
        panel = np.zeros((n, n), dtype=np.float32)
        sl = np.rot90(sl)
        panel[: sl.shape[0], : sl.shape[1]] = sl
        panels.append(panel)
    return np.concatenate(panels, axis=1)


def montage(volumes: torch.Tensor | np.ndarray, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    """One row per item of a (B, C, D, H, W) batch (3 planes per channel, see :func:`three_plane`) or of a
    (B, C, H, W) batch of slices (one image per channel): float array in [0, 1]."""
    rows = []
    for item in volumes:
        v = torch.as_tensor(item).detach().float().cpu().numpy()
        if v.ndim == 4:
            rows.append(np.concatenate([three_plane(c, low, high) for c in v], axis=1))
        else:
            rows.append(np.concatenate([np.clip((np.rot90(c) - low) / (high - low), 0.0, 1.0) for c in v], axis=1))
    return np.concatenate(rows, axis=0)


def save_png(image: np.ndarray, path: str, upscale: int = 4) -> str:
    """Writes a [0, 1] grey image as an 8-bit PNG, each pixel repeated ``upscale`` times per axis."""
    from PIL import Image

    img = np.kron(np.asarray(image), np.ones((upscale, upscale))) if upscale > 1 else np.asarray(image)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray((img * 255).round().astype(np.uint8)).save(path)
    return path
