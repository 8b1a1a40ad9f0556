# Copyright 2026 The VDVAE bundle authors. Licensed under the Apache License, Version 2.0.
"""Completion with a VQ generator: keep a region of an input's token grid and let the prior draw the rest."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
import torch
from monai.data import DataLoader, Dataset

from scripts.engine.data import find_niftis
from scripts.engine.sampling import nifti_array, read_sidecar, save_nifti
from scripts.engine.visualisation import plot_volume_rows
from scripts.vq.networks import VQGenerator

logger = logging.getLogger(__name__)

__all__ = ["region_token_mask", "complete_volumes"]


def region_token_mask(token_grid: Sequence[int], n: int, keep: str) -> torch.Tensor:
    """(n, *grid) bool mask of the tokens to keep for completion: ``keep`` is "first_half" / "second_half" of the
    last axis (seed 002 generates the other half) or "centre" (the middle half of every axis)."""
    grid = tuple(token_grid)
    mask = torch.zeros(grid, dtype=torch.bool)
    half = grid[-1] // 2
    if keep == "first_half":
        mask[..., :half] = True
    elif keep == "second_half":
        mask[..., half:] = True
    elif keep == "centre":
        mask[tuple(slice(s // 4, s - s // 4) for s in grid)] = True
    else:
        raise ValueError(f"keep must be 'first_half', 'second_half' or 'centre', got {keep!r}")
    return mask.expand((n,) + grid).clone()


@torch.no_grad()
def complete_volumes(
    generator: VQGenerator,
    files: Sequence[str],
    preprocessing,
    output_dir: str,
    keep: str = "first_half",
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    model_path: str | None = None,
) -> list[str]:
    """Masked completion (seed 002): for each file, keeps the tokens of the ``keep`` region (see
    :func:`region_token_mask`) and lets the prior generate the rest. Writes, per input ``<name>``,
    ``<name>_input.nii.gz`` (the preprocessed input), ``<name>_given.nii.gz`` (the input where tokens were kept,
    -1 elsewhere on the [-1, 1] scale) and ``<name>_completed.nii.gz``, on the training grid and intensity window
    (sidecar of ``model_path``), plus ``completion.png`` (one row per input, up to 8: given | completed | input).
    Batch b is seeded with ``seed + b``. Returns the paths of the completed volumes."""
    if isinstance(files, str):
        files = find_niftis(files)
    if not files:
        raise ValueError("complete_dir holds no volumes to complete")
    info = read_sidecar(model_path) if model_path else {}
    affine = np.asarray(info.get("affine", np.eye(4)), dtype=np.float64)
    low, high = info.get("intensity_low", -1.0), info.get("intensity_high", 1.0)  # numbers, or one per channel
    generator = generator.to(device).eval()
    os.makedirs(output_dir, exist_ok=True)
    loader = DataLoader(Dataset([{"image": f} for f in files], preprocessing), batch_size=batch_size, shuffle=False)
    written, rows, i = [], {}, 0
    for b, batch in enumerate(loader):
        x = batch["image"]
        x = (x.as_tensor() if hasattr(x, "as_tensor") else x).to(device).float()
        mask = region_token_mask(generator.vqvae.token_grid, x.shape[0], keep).to(device)
        torch.manual_seed(seed + b)
        completed, _ = generator.complete(x, mask, temperature)
        scale = generator.vqvae.resolution // mask.shape[-1]
        voxel_mask = mask[:, None].float()
        for axis in range(2, voxel_mask.ndim):
            voxel_mask = voxel_mask.repeat_interleave(scale, dim=axis)
        given = torch.where(voxel_mask.bool(), x, torch.full_like(x, -1.0))
        for item in range(x.shape[0]):
            name = os.path.basename(files[i]).split(".nii")[0]
            for suffix, vol in (
                ("input", x[item]),
                ("given", given[item]),
                ("completed", completed[item].float().clamp(-1, 1)),
            ):
                path = save_nifti(
                    nifti_array(vol.cpu().numpy(), low, high),
                    affine,
                    os.path.join(output_dir, f"{name}_{suffix}.nii.gz"),
                )
            written.append(path)
            if len(rows) < 8:
                rows[name] = [v.cpu() for v in (given[item], completed[item].float().clamp(-1, 1), x[item])]
            i += 1
        logger.info(f"completion: {i}/{len(files)} volumes")
    plot_volume_rows(
        rows,
        os.path.join(output_dir, "completion.png"),
        title=f"masked completion (kept region: {keep})",
        column_titles=["given", "completed", "input"],
    )
    logger.info(f"wrote {len(written)} completions to {output_dir}")
    return written
