# Copyright 2026 The VDVAE bundle authors. Licensed under the Apache License, Version 2.0.
"""Metrics shared by both families, the workflows and the tools:

* :func:`summary`: mean, std, median, min and max of a set of figures;
* :func:`frechet_distance`: Frechet distance between two feature sets (MONAI ``FIDMetric``);
* :func:`ms_ssim_parameters`, :func:`mean_pairwise_ms_ssim`: MS-SSIM (MONAI ``MultiScaleSSIMMetric``) among volumes;
* :func:`psnr_per_volume`: PSNR of volumes on [-1, 1];
* :func:`dice`, :func:`dice_at`, :func:`best_dice`: Dice overlap of masks and of thresholded maps;
* :func:`auroc`, :func:`average_precision`: how well scores rank binary labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import FIDMetric, MultiScaleSSIMMetric

__all__ = [
    "summary",
    "frechet_distance",
    "to_unit",
    "ms_ssim_parameters",
    "mean_pairwise_ms_ssim",
    "psnr_per_volume",
    "dice",
    "dice_at",
    "best_dice",
    "auroc",
    "average_precision",
]

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, finest scale first


def summary(values: Sequence[float] | np.ndarray) -> dict:
    """Mean, std, median, min and max of ``values`` (any shape), as floats."""
    v = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(v.mean()),
        "std": float(v.std()),
        "median": float(np.median(v)),
        "min": float(v.min()),
        "max": float(v.max()),
    }


# ----------------------------------------------------------------------------------------------- feature sets


def frechet_distance(gen: torch.Tensor, ref: torch.Tensor, ridge: float = 1e-6) -> float:
    """Frechet distance between two feature sets (N, F) and (M, F) (MONAI FIDMetric). With fewer volumes than
    features the covariance product is near-singular and MONAI's matrix square root can keep an imaginary part above
    its 1e-3 limit; then both covariances get a ``ridge`` on the diagonal (the remedy of pytorch-fid) and scipy's
    sqrtm is used."""
    try:
        return float(FIDMetric()(gen.double(), ref.double()))
    except ValueError as e:
        if "Imaginary component" not in str(e):
            raise
    from scipy import linalg

    g, r = gen.double().numpy(), ref.double().numpy()
    offset = ridge * np.eye(g.shape[1])
    cov_g, cov_r = np.cov(g, rowvar=False) + offset, np.cov(r, rowvar=False) + offset
    covmean = linalg.sqrtm(cov_g @ cov_r).real
    diff = g.mean(0) - r.mean(0)
    return float(diff @ diff + np.trace(cov_g) + np.trace(cov_r) - 2 * np.trace(covmean))


# ----------------------------------------------------------------------------------------------- images


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped (SSIM's luminance term assumes non-negative intensities)."""
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def ms_ssim_parameters(resolution: int) -> dict | None:
    """Kernel and scales of MS-SSIM valid at ``resolution``^3, or None below 8^3.

    Valid means both MONAI's check (``R // (scales - 1)^2 > kernel - 1``) and a coarsest scale at least one
    kernel wide (MONAI convolves without padding). Picks the most scales (<= 5) at which a Gaussian kernel of
    5 or 7 voxels (sigma 1.5) fits, with the larger kernel when both do; 3 voxels only at 8^3. Weights are the
    first ``scales`` of Wang et al.'s five, renormalised. 8: (3, 2 scales), 16: (7, 2), 32: (7, 3), 64: (7, 4),
    128: (7, 5).
    """

    def fits(k: int, n: int) -> bool:
        return resolution // max(1, n - 1) ** 2 > k - 1 and resolution // 2 ** (n - 1) >= k

    for kernels in ((7, 5), (3,)):
        for n in range(5, 1, -1):
            for k in kernels:
                if fits(k, n):
                    w = np.asarray(MS_SSIM_WEIGHTS[:n])
                    return {
                        "kernel_size": k,
                        "kernel_sigma": 1.5,
                        "num_scales": n,
                        "weights": (w / w.sum()).round(4).tolist(),
                    }
    return None


def mean_pairwise_ms_ssim(volumes: torch.Tensor, params: dict, pairs_per_batch: int = 16) -> tuple[float, int]:
    """Mean MS-SSIM over all pairs of (N, 1, R, R, R) volumes on [-1, 1]; returns (mean, number of pairs).
    Higher means less diverse (1 = identical)."""
    n = volumes.shape[0]
    if n < 2:
        return float("nan"), 0
    metric = MultiScaleSSIMMetric(
        spatial_dims=3,
        data_range=1.0,
        kernel_size=params["kernel_size"],
        kernel_sigma=params["kernel_sigma"],
        weights=params["weights"],
    )
    i, j = torch.triu_indices(n, n, offset=1)
    x = to_unit(volumes)
    for start in range(0, i.numel(), pairs_per_batch):
        sl = slice(start, start + pairs_per_batch)
        metric(x[i[sl]], x[j[sl]])
    # float32 rounding can put identical volumes a few 1e-5 above the exact maximum, 1
    return min(1.0, float(metric.aggregate().item())), int(i.numel())


def psnr_per_volume(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR (dB) of ``x`` against ``y`` per volume, both (B, C, D, H, W) on [-1, 1], data range 1 after mapping
    to [0, 1] (unclamped; as ``evaluate.json``'s reconstruction PSNR). Returns (B,)."""
    mse = (((x.float() + 1.0) / 2.0 - (y.float() + 1.0) / 2.0) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return -10.0 * torch.log10(mse)


# ----------------------------------------------------------------------------------------------- masks and maps


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean arrays (1.0 when both are empty)."""
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)


def dice_at(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    """Dice of ``score >= threshold`` with ``labels`` (1 when both are empty)."""
    pred, y = np.asarray(scores).ravel() >= threshold, np.asarray(labels).ravel().astype(bool)
    denom = pred.sum() + y.sum()
    return float(2.0 * (pred & y).sum() / denom) if denom else 1.0


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
    dices = 2.0 * tp / (tp + fp + p)
    i = int(np.argmax(dices))
    return float(dices[i]), float(thresholds[i])
