# Copyright 2026 The VDVAE bundle authors. Licensed under the Apache License, Version 2.0.
"""3-plane views of volumes: grey arrays for TensorBoard (:func:`montage`) and the matplotlib figures of the bundle's
PNG files (labelled rows of volumes on one intensity scale, anomaly overlays), plus the figure helpers the tools
share. Figures are :class:`matplotlib.figure.Figure` objects (Agg canvas, no pyplot, no display needed)."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "PLANES",
    "DPI",
    "INTENSITY_LABEL",
    "planes",
    "three_plane",
    "montage",
    "new_figure",
    "save_figure",
    "grey_colormap",
    "hide_ticks",
    "inches_axes",
    "text_width",
    "counterfactual_figure",
    "volume_rows_size",
    "draw_volume_rows",
    "volume_rows_figure",
    "plot_volume_rows",
    "anomaly_overlay_figure",
]

PLANES = ("axial", "coronal", "sagittal")  # the order of :func:`planes` (first, second, third axis fixed: z, y, x)
DPI = 110  # dots per inch of every PNG figure
INTENSITY_LABEL = "intensity ([-1, 1] model scale)"


def planes(
    volume: torch.Tensor | np.ndarray, centre: Sequence[int] | None = None, fill: float = 0.0
) -> list[np.ndarray]:
    """The axial, coronal and sagittal slices of a (D, H, W) or (1, D, H, W) volume through ``centre`` (default its
    middle voxel), each rotated by 90 degrees (its first axis displayed upwards) and padded with ``fill`` to (N, N),
    N the longest side."""
    v = torch.as_tensor(volume).detach().float().cpu().numpy()
    v = v[0] if v.ndim == 4 else v
    d, h, w = v.shape
    c = (d // 2, h // 2, w // 2) if centre is None else tuple(int(i) for i in centre)
    n = max(d, h, w)
    panels = []
    for sl in (v[:, :, c[2]], v[:, c[1], :], v[c[0], :, :]):
        panel = np.full((n, n), fill, dtype=np.float32)
        sl = np.rot90(sl)
        panel[: sl.shape[0], : sl.shape[1]] = sl
        panels.append(panel)
    return panels


def three_plane(volume: torch.Tensor | np.ndarray, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    """Central axial, coronal and sagittal slices of a (D, H, W) or (1, D, H, W) volume side by side:
    (N, 3N) float array in [0, 1] (``low`` -> 0, ``high`` -> 1), first axis of each slice displayed upwards."""
    v = torch.as_tensor(volume).detach().float().cpu().numpy()
    return np.concatenate(planes(np.clip((v - low) / (high - low), 0.0, 1.0)), axis=1)


def montage(volumes: torch.Tensor | np.ndarray, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    """One row per item of a (B, C, D, H, W) batch (3 planes per channel, see :func:`three_plane`) or of a
    (B, C, H, W) batch of slices (one image per channel): float array in [0, 1], for TensorBoard's ``add_image``."""
    rows = []
    for item in volumes:
        v = torch.as_tensor(item).detach().float().cpu().numpy()
        if v.ndim == 4:
            rows.append(np.concatenate([three_plane(c, low, high) for c in v], axis=1))
        else:
            rows.append(np.concatenate([np.clip((np.rot90(c) - low) / (high - low), 0.0, 1.0) for c in v], axis=1))
    return np.concatenate(rows, axis=0)


# ------------------------------------------------------------------------------------------- matplotlib figures


def new_figure(width: float, height: float, dpi: int = DPI, layout: str = "constrained") -> Figure:
    """A blank figure of ``width`` x ``height`` inches on an Agg canvas (no pyplot, so no GUI backend) with a
    constrained layout (``layout="compressed"`` packs grids of images, whose aspect is fixed, more tightly)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi, layout=layout, facecolor="white")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str) -> str:
    """Writes ``fig`` as a PNG of exactly its size in inches times its dpi (folders created); returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, format="png", dpi=fig.dpi, facecolor="white")
    return path


def grey_colormap():
    """Matplotlib's grey colormap with NaN (padding, gaps between volumes) drawn white."""
    import matplotlib

    return matplotlib.colormaps["gray"].with_extremes(bad="white")


def inches_axes(fig: Figure, left: float, bottom: float, width: float, height: float) -> Axes:
    """Adds an axes at a rectangle given in inches from the lower left corner of ``fig`` (for figures laid out by
    hand, ``layout="none"``)."""
    fw, fh = fig.get_size_inches()
    return fig.add_axes((left / fw, bottom / fh, width / fw, height / fh))


def hide_ticks(ax: Axes) -> None:
    """Removes the ticks and frame of an image axes (its labels and title stay)."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _as_volumes(volumes) -> list[np.ndarray]:
    """A (B, 1, D, H, W) / (B, D, H, W) batch or a sequence of (1, D, H, W) / (D, H, W) volumes as (D, H, W) arrays."""
    out = []
    for v in volumes:
        a = torch.as_tensor(v).detach().float().cpu().numpy()
        out.append(a[0] if a.ndim == 4 else a)
    return out


def _row_image(volumes: list[np.ndarray], low: float, high: float, gap: int) -> tuple[np.ndarray, list[float]]:
    """The 3-plane views of ``volumes`` side by side (NaN in the padding and in ``gap`` columns between volumes),
    clipped to [low, high], and the x position of each plane's centre."""
    n = max(max(v.shape) for v in volumes)
    parts, centres, x = [], [], 0
    for i, v in enumerate(volumes):
        if i:
            parts.append(np.full((n, gap), np.nan, dtype=np.float32))
            x += gap
        for p in planes(np.clip(v, low, high), fill=np.nan):
            pad = np.full((n, n), np.nan, dtype=np.float32)
            pad[: p.shape[0], : p.shape[1]] = p
            parts.append(pad)
            centres.append(x + (n - 1) / 2)
            x += n
    return np.concatenate(parts, axis=1), centres


def text_width(fig: Figure, text: str, fontsize: float) -> float:
    """Width in inches of ``text`` drawn at ``fontsize`` points (measured on an Agg canvas, else estimated)."""
    get_renderer = getattr(fig.canvas, "get_renderer", None)
    if get_renderer is None:
        return max((len(line) for line in text.split("\n")), default=0) * 0.6 * fontsize / 72
    t = fig.text(0, 0, text, fontsize=fontsize)
    width = t.get_window_extent(get_renderer()).width / fig.dpi
    t.remove()
    return width


ROW_LABEL_FONT, ROW_GAP, COLORBAR_WIDTH = 9, 0.06, 1.0  # points, inches, inches (bar, ticks and label)


def volume_rows_size(rows: Mapping[str, Sequence], max_width: float = 8.5, max_panel: float = 1.5) -> tuple:
    """(width, height) in inches of the images of :func:`draw_volume_rows` for ``rows``: each plane at most
    ``max_panel`` inches wide, each row at most ``max_width`` inches wide (labels and colorbar not included)."""
    counts = [len(v) for v in rows.values() if len(v)]
    per_row = max(counts) * 3
    panel = min(max_panel, max_width / per_row)
    return per_row * panel, len(counts) * panel + ROW_GAP * (len(counts) - 1)


def draw_volume_rows(
    fig: Figure,
    rows: Mapping[str, Sequence],
    low: float = -1.0,
    high: float = 1.0,
    column_titles: Sequence[str] | None = None,
    colorbar_label: str = INTENSITY_LABEL,
    box: Sequence[float] | None = None,
    gap: int = 3,
    max_panel: float = 1.5,
    cmap=None,
) -> list[Axes]:
    """Draws one axes per entry of ``rows`` (label -> volumes, each (D, H, W) or (1, D, H, W); empty entries are
    skipped) into ``box`` = (left, bottom, width, height) inches of ``fig`` (default all of it): the axial, coronal
    and sagittal slices through the centre of each volume side by side, every row in grey on the one scale
    [``low``, ``high``] with one colorbar. The row label is the axes' y label, the plane names are the bottom
    row's x tick labels and ``column_titles`` (one per volume) stand above the top row. Axes are placed by hand
    (use a figure without a layout engine) so that labels never crop and the images keep their aspect. ``cmap``:
    a matplotlib colormap instead of grey (e.g. a diverging one for differences)."""
    names = [k for k, v in rows.items() if len(v)]
    images = [_row_image(_as_volumes(rows[k]), low, high, gap) for k in names]
    width_px = max(img.shape[1] for img, _ in images)
    height_px = max(img.shape[0] for img, _ in images)
    fw, fh = fig.get_size_inches()
    left, bottom, bw, bh = box if box is not None else (0.0, 0.0, fw, fh)
    label_w = max(text_width(fig, name, ROW_LABEL_FONT) for name in names) + 0.2
    top_margin, bottom_margin = 0.1 + 0.25 * bool(column_titles), 0.3
    n = len(names)
    scale = min(  # inches per pixel
        max_panel / height_px,
        (bw - label_w - COLORBAR_WIDTH) / width_px,
        (bh - top_margin - bottom_margin - ROW_GAP * (n - 1)) / (n * height_px),
    )
    w_in, h_in = width_px * scale, height_px * scale
    cmap = grey_colormap() if cmap is None else cmap
    axes, im = [], None
    y = bottom + bh - top_margin
    for r, (name, (img, centres)) in enumerate(zip(names, images)):
        y -= h_in
        ax = inches_axes(fig, left + label_w, y, w_in, h_in)
        y -= ROW_GAP
        im = ax.imshow(img, cmap=cmap, vmin=low, vmax=high, interpolation="nearest", aspect="auto")
        ax.set_xlim(-0.5, width_px - 0.5)
        ax.set_ylim(height_px - 0.5, -0.5)
        hide_ticks(ax)
        ax.set_ylabel(name, rotation=0, ha="right", va="center", rotation_mode="default", fontsize=ROW_LABEL_FONT)
        if r == n - 1:
            ax.set_xticks(centres, [PLANES[i % 3] for i in range(len(centres))], fontsize=7)
            ax.tick_params(axis="x", length=0)
        if r == 0 and column_titles:
            for title, c in zip(column_titles, centres[1::3]):
                ax.text(c, 1.03, title, transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=9)
        axes.append(ax)
    rows_h = n * h_in + ROW_GAP * (n - 1)
    bar_h = min(max(rows_h, min(1.5, bh - top_margin - bottom_margin)), 4.0)
    cax = inches_axes(fig, left + label_w + w_in + 0.12, y + ROW_GAP + rows_h - bar_h, 0.14, bar_h)
    fig.colorbar(im, cax=cax, label=colorbar_label)
    return axes


def volume_rows_figure(
    rows: Mapping[str, Sequence],
    title: str | None = None,
    low: float = -1.0,
    high: float = 1.0,
    column_titles: Sequence[str] | None = None,
    colorbar_label: str = INTENSITY_LABEL,
) -> Figure:
    """A figure of :func:`draw_volume_rows` sized to its rows, with ``title`` above."""
    w, h = volume_rows_size(rows)
    label_w = max(len(k) for k, v in rows.items() if len(v)) * 0.6 * ROW_LABEL_FONT / 72 + 0.3
    title_h = 0.45 if title else 0.1
    fig = new_figure(
        max(6.0, w + label_w + COLORBAR_WIDTH + 0.2),
        max(2.0, h + 0.45 + 0.25 * bool(column_titles) + title_h),
        layout="none",
    )
    fw, fh = fig.get_size_inches()
    if title:  # wrapped to the figure's width (about 0.55 * 11 pt per character)
        title = textwrap.fill(title, width=max(20, int(fw * 72 / (0.55 * 11))))
        lines = title.count("\n") + 1
        if lines > 1:
            title_h += 0.2 * (lines - 1)
            fig.set_size_inches(fw, fh + 0.2 * (lines - 1))
            fw, fh = fig.get_size_inches()
    draw_volume_rows(fig, rows, low, high, column_titles, colorbar_label, box=(0.0, 0.0, fw - 0.1, fh - title_h))
    if title:
        fig.suptitle(title, fontsize=11, y=1 - 0.12 / fh, va="top")
    return fig


def plot_volume_rows(rows: Mapping[str, Sequence], path: str, title: str | None = None, **kwargs) -> str:
    """Writes :func:`volume_rows_figure` of ``rows`` as the PNG ``path``; returns ``path``."""
    return save_figure(volume_rows_figure(rows, title, **kwargs), path)


def anomaly_overlay_figure(
    x: np.ndarray,
    healed: np.ndarray,
    amap: np.ndarray,
    title: str | None = None,
    map_label: str = "anomaly map (higher = more anomalous)",
) -> Figure:
    """Three rows (input, healed volume, input with the map in red to yellow) by the three planes through the
    maximum of the map after a 3^3 mean filter. ``x``, ``healed``: (D, H, W) on [-1, 1], both grey on that scale;
    ``amap``: (D, H, W), coloured from its median (transparent up to 20% of the range) to its 99.9th percentile
    (:func:`monai.visualize.blend_images` with matplotlib's "autumn" map), with a colorbar in the map's units."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from monai.visualize import blend_images
    from scipy.ndimage import uniform_filter

    smooth = uniform_filter(amap.astype(np.float32), size=3)
    centre = np.unravel_index(int(np.argmax(smooth)), amap.shape)
    lo, hi = (float(v) for v in np.percentile(amap, [50.0, 99.9]))
    hi = max(hi, lo + 1e-8)
    grey = [np.clip((p + 1.0) / 2.0, 0.0, 1.0) for p in planes(x, centre, fill=-1.0)]
    heat = [np.clip((p - lo) / (hi - lo), 0.0, 1.0) for p in planes(amap, centre, fill=lo)]
    blended = [
        np.moveaxis(
            blend_images(g[None], h[None], np.where(h > 0.2, 0.8 * h, 0.0)[None], "autumn", rescale_arrays=False),
            0,
            -1,
        )
        for g, h in zip(grey, heat)
    ]
    fig = new_figure(8.0, 8.0 + 0.3 * bool(title), layout="compressed")
    axes = fig.subplots(3, 3)
    cmap = grey_colormap()
    im = None
    for r, (name, row) in enumerate(
        (("input", planes(x, centre, fill=np.nan)), ("healed", planes(healed, centre, fill=np.nan)))
    ):
        for c, p in enumerate(row):
            im = axes[r, c].imshow(p, cmap=cmap, vmin=-1.0, vmax=1.0, interpolation="nearest")
    for c, rgb in enumerate(blended):
        axes[2, c].imshow(np.clip(rgb, 0.0, 1.0), interpolation="nearest")
    for ax in axes.ravel():
        hide_ticks(ax)
    for c, plane in enumerate(PLANES):
        axes[0, c].set_title(f"{plane} (slice {centre[2 - c]})", fontsize=9)
    for r, name in enumerate(("input", "healed", "input + map")):
        axes[r, 0].set_ylabel(name, fontsize=10)
    fig.colorbar(im, ax=list(axes.ravel()), label=INTENSITY_LABEL, fraction=0.04, shrink=0.6)
    fig.colorbar(
        ScalarMappable(Normalize(lo, hi), "autumn"),
        ax=list(axes.ravel()),
        location="bottom",
        label=f"{map_label}; transparent below {lo + 0.2 * (hi - lo):.3g}",
        fraction=0.04,
        shrink=0.7,
    )
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def counterfactual_figure(
    reconstruction: np.ndarray, counterfactuals: Sequence[np.ndarray], labels: Sequence[str], title: str | None = None
) -> Figure:
    """Two blocks of 3-plane rows: the reconstruction and each counterfactual (D, H, W) in grey on [-1, 1], then
    each counterfactual minus the reconstruction on a symmetric blue (darker) to red (brighter) scale."""
    import matplotlib

    recon = _as_volumes([reconstruction])[0]
    cfs = _as_volumes(counterfactuals)
    grey = {"reconstruction": [recon], **{label: [v] for label, v in zip(labels, cfs)}}
    diffs = {f"{label}\nminus reconstruction": [v - recon] for label, v in zip(labels, cfs)}
    bound = max(1e-3, max(float(np.abs(d[0]).max()) for d in diffs.values()))
    w, h_grey = volume_rows_size(grey)
    _, h_diff = volume_rows_size(diffs)
    label_w = 2.4
    title_h = 0.45 if title else 0.1
    fw, fh = max(6.0, w + label_w + COLORBAR_WIDTH + 0.2), h_grey + h_diff + 1.2 + title_h
    fig = new_figure(fw, fh, layout="none")
    top = fh - title_h
    draw_volume_rows(fig, grey, box=(0.0, top - h_grey - 0.45, fw - 0.1, h_grey + 0.45))
    draw_volume_rows(
        fig,
        diffs,
        -bound,
        bound,
        colorbar_label="difference (intensity)",
        box=(0.0, 0.0, fw - 0.1, h_diff + 0.5),
        cmap=matplotlib.colormaps["RdBu_r"].with_extremes(bad="white"),
    )
    if title:
        fig.suptitle(
            textwrap.fill(title, width=max(20, int(fw * 72 / (0.55 * 11)))), fontsize=11, y=1 - 0.12 / fh, va="top"
        )
    return fig
