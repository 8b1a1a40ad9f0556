# Copyright 2026 The VDVAE bundle authors. Licensed under the Apache License, Version 2.0.
"""Anomaly maps from the bundle's generators, the part both families share (configs/anomaly.json,
configs/vq_anomaly.json).

A model trained on healthy brains "heals" an input: what it cannot explain is the anomaly. Every detector
(:class:`AnomalyDetector`) maps a batch of preprocessed volumes x (B, 1, R, R, R) on [-1, 1] to a voxel map
(B, 1, R, R, R), higher = more anomalous, and the healed volume (B, 1, R, R, R) it was computed against:

* :class:`scripts.vdvae.anomaly.VDVAEAnomaly`: ``likelihood``, ``reconstruction`` or ``kl`` maps of a VDVAE;
* :class:`scripts.vq.anomaly.VQAnomaly`: ``resample`` or ``reconstruction`` maps of a VQ-VAE and its prior;
* :class:`IntensityAnomaly`: the input itself (``high``) or its negative (``low``), the intensity-threshold baseline.

:func:`write_anomaly_maps` runs a detector over a NIfTI folder and writes the maps and healed volumes on each
input's own grid and world space (the preprocessing is inverted by resampling through the affines), per-volume scores
(``scores.csv``, ``scores.json``) and a PNG per volume. The benchmark's metrics are in :mod:`scripts.engine.metrics`.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Protocol

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from scripts.engine.data import NIFTI_SUFFIXES, check_nifti_header
from scripts.engine.sampling import nifti_array, read_sidecar, save_nifti
from scripts.engine.training import autocast
from scripts.engine.visualisation import anomaly_overlay_figure, save_figure

__all__ = [
    "AnomalyDetector",
    "check_method",
    "IntensityAnomaly",
    "volume_scores",
    "smooth_maps",
    "resample_to_grid",
    "write_anomaly_maps",
    "overlay_png",
]

logger = logging.getLogger(__name__)


class AnomalyDetector(Protocol):
    """What :func:`write_anomaly_maps` runs (``describe`` is optional there: without it ``scores.json`` records {})."""

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (B, 1, R, R, R) on [-1, 1] -> {"map": (B, 1, R, R, R), "healed": (B, 1, R, R, R)}, float32."""
        ...

    def describe(self) -> dict:
        """The family, method and options, and the map's units (``map_units``), for ``scores.json``."""
        ...


def check_method(method: str, allowed: Sequence[str], family: str) -> str:
    """``method`` if it is one of ``allowed``; otherwise a ValueError naming the choices and the ``family``."""
    if method not in allowed:
        raise ValueError(f"method must be one of {list(allowed)} for the {family}, got {method!r}")
    return method


# ---------------------------------------------------------------------------------------------------- detectors


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


def _input_files(input_dir: str | None, channels: int = 1) -> list[str]:
    """The NIfTI files of ``input_dir``, each header checked; errors name the folder or the file."""
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
        check_nifti_header(f, channels)
    return files


def _load(path: str, preprocessing: Callable, percentiles: Sequence[float]) -> tuple:
    """Preprocesses one file. Returns (x (C, R, R, R), its grid's affine (4, 4), the file's own affine (4, 4) and
    3-D shape, its intensity window per channel (the raw values at ``percentiles``, which preprocessing maps to -1
    and 1): (low (C,), high (C,)))."""
    try:
        img = nib.load(path)
        raw = np.asarray(img.dataobj, dtype=np.float32)
        x = preprocessing({"image": path})["image"]
    except ValueError:
        raise
    except Exception as e:  # truncated or corrupt data behind a valid header
        raise ValueError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})") from e
    channels = int(x.shape[0])
    low, high = np.percentile(raw.reshape(-1, channels) if channels > 1 else raw.reshape(-1, 1), percentiles, axis=0)
    grid_affine, affine = np.asarray(x.affine, dtype=np.float64), np.asarray(img.affine, dtype=np.float64)
    return (
        torch.as_tensor(x).float(),
        grid_affine,
        affine,
        tuple(int(s) for s in img.shape[:3]),
        (low, high),
    )


# ---------------------------------------------------------------------------------------------------- workflow


@torch.no_grad()
def write_anomaly_maps(
    detector: AnomalyDetector,
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
    channels: int = 1,
) -> list[dict]:
    """Anomaly maps of ``detector`` (:class:`AnomalyDetector`) for every NIfTI in ``input_dir``; the workflow of
    ``configs/anomaly.json`` and ``vq_anomaly.json``.

    Each file is preprocessed as in training (``preprocessing``: {"image": path} -> (1, R, R, R) MetaTensor). When the
    weights' sidecar (``model_path`` -> ``.json``) records the training grid and the preprocessed volume lies on
    another grid (another field of view or voxel size than the training volumes), it is resampled onto the training
    grid through world coordinates, with a logged warning; a volume mostly outside the training grid's world space
    (not registered to it) stops with an error. The detector's outputs are resampled back onto the input's own grid
    (its shape and affine), so they overlay it in any viewer. Writes to ``output_dir``:

    * ``<name>_anomaly.nii.gz``: the voxel map (units: see ``scores.json``; 0 outside the model's field of view),
      after a ``map_smoothing``^3 mean filter on the model's grid (:func:`smooth_maps`);
    * ``<name>_healed.nii.gz``: the healed volume, intensities in the input's own window (``clamp_percentiles``; with
      ``channels`` > 1 modalities per file, one window each and a 4-D file);
    * ``<name>.png``: input, healed volume and the map over the input, three planes through the map's maximum;
    * ``scores.csv`` and ``scores.json``: per volume the ``score`` (mean of the highest ``score_top_fraction`` of the
      map's voxels on the model's grid), the mean and maximum of the map, and whether the volume was resampled.

    Batch b is seeded with ``seed + b``. Returns the per-volume rows.
    """
    files = _input_files(input_dir, channels)
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
                x = torch.stack([resample_to_grid(c, grid_affine, train_affine, train_shape, fill=-1.0) for c in x])
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
            heal = torch.stack(
                [resample_to_grid(c, it["grid_affine"], it["affine"], it["shape"], fill=-1.0) for c in healed[i]]
            )
            save_nifti(amap.numpy(), it["affine"], f"{name}_anomaly.nii.gz")
            save_nifti(nifti_array(heal.numpy(), low, high), it["affine"], f"{name}_healed.nii.gz")
            if write_png:
                overlay_png(
                    it["x"][0].numpy(), healed[i, 0].numpy(), maps[i, 0].numpy(), f"{name}.png", _stem(it["path"])
                )
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


def overlay_png(x: np.ndarray, healed: np.ndarray, amap: np.ndarray, path: str, title: str | None = None) -> str:
    """Writes a PNG of three rows (input, healed, input with the map in red to yellow), each the three planes
    through the maximum of the smoothed map, with colorbars (:func:`scripts.engine.visualisation.anomaly_overlay_figure`).
    ``x``, ``healed``: (D, H, W) on [-1, 1]; ``amap``: (D, H, W)."""
    return save_figure(anomaly_overlay_figure(x, healed, amap, title), path)
