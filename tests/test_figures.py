"""The matplotlib figures of the PNG files: labelled axes, one intensity scale, the written PNG's size."""

from __future__ import annotations

import struct

import numpy as np
import torch

from scripts.engine.anomaly import overlay_png
from scripts.engine.evaluation import plot_report, report_figure
from scripts.engine.visualisation import (
    DPI,
    INTENSITY_LABEL,
    PLANES,
    anomaly_overlay_figure,
    plot_volume_rows,
    volume_rows_figure,
)
from scripts.tools.anomaly_benchmark import LESIONS, lesion_figure


def png_size(path: str) -> tuple[int, int]:
    """(height, width) in pixels of the PNG file ``path``, read from its header."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG file"
    width, height = struct.unpack(">II", head[16:24])
    return height, width


def _pixels(fig) -> tuple[int, int]:
    return round(fig.get_figheight() * fig.dpi), round(fig.get_figwidth() * fig.dpi)


def _ball(r: int = 16) -> torch.Tensor:
    g = torch.linspace(-1, 1, r)
    return torch.exp(-3 * (g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2)) * 2 - 1


def test_volume_rows_share_one_scale_and_are_labelled(tmp_path):
    vol = _ball()
    rows = {"samples": [vol[None], 0.5 * vol[None]], "held-out": [vol, vol], "empty": []}
    fig = volume_rows_figure(rows, title="samples above held-out", column_titles=["first", "second"])
    images = [ax for ax in fig.axes if ax.get_images() and ax.get_ylabel()]
    assert [ax.get_ylabel() for ax in images] == ["samples", "held-out"]  # empty rows are left out
    assert all(ax.get_images()[0].get_clim() == (-1.0, 1.0) for ax in images)  # one grey scale for every row
    assert [t.get_text() for t in images[-1].get_xticklabels()] == list(PLANES) * 2
    assert {t.get_text() for t in images[0].texts} == {"first", "second"}
    assert [ax.get_ylabel() for ax in fig.axes if ax not in images] == [INTENSITY_LABEL]  # the colorbar
    assert fig.get_suptitle() == "samples above held-out" and fig.dpi == DPI
    strip = images[0].get_images()[0].get_array()
    assert strip.shape[0] == 16 and strip.shape[1] == 2 * 3 * 16 + 3  # two volumes of three planes, one gap
    fig.canvas.draw()
    assert images[0].yaxis.label.get_window_extent().x0 >= 0  # the row label is not cropped at the left edge
    path = plot_volume_rows(rows, str(tmp_path / "rows.png"), title="t")
    height, width = png_size(path)
    assert 6 * DPI <= width <= 12 * DPI and height >= 2 * DPI


def test_report_figure_axes(tmp_path):
    groups = [
        {"resolution": r, "kl_nats_per_volume": kl, "active": kl > 1.0}
        for r, kl in [(1, 40.0), (2, 0.5), (4, 3.0), (8, 250.0)]
    ]
    report = {
        "checkpoint_resolution": 16,
        "model": {"family": "vdvae"},
        "likelihood": {"kl_per_group": groups, "kl_active_threshold_nats_per_volume": 1.0},
    }
    shown = {"held-out (anatomy 0.80)": [_ball()[None, None].repeat(2, 1, 1, 1, 1)], "samples T=1": []}
    distances = {"held-out": np.array([0.1, 0.15, 0.2]), "samples T=1": np.array([0.3, 0.4])}
    fig = report_figure(report, shown, distances)
    kl, dist = fig.axes[0], fig.axes[1]
    assert kl.get_ylabel() == "KL (nats per volume)" and kl.get_yscale() == "log"
    assert [t.get_text() for t in kl.get_xticklabels()] == ["1³", "2³", "4³", "8³"]
    assert [p.get_height() for p in kl.patches[:4]] == [40.0, 0.5, 3.0, 250.0]
    assert kl.patches[1].get_facecolor() != kl.patches[0].get_facecolor()  # the collapsed group is lighter
    assert dist.get_xlabel() == "RMSE to the nearest training volume ([-1, 1] intensity scale)"
    assert [t.get_text().split("\n")[0] for t in dist.get_yticklabels()] == ["samples T=1", "held-out"]
    assert "median 0.150" in dist.get_yticklabels()[1].get_text()
    assert [ax.get_ylabel() for ax in fig.axes[2:]] == ["held-out (anatomy 0.80)", INTENSITY_LABEL]
    path = plot_report(report, shown, distances, str(tmp_path / "report.png"))
    assert png_size(path) == _pixels(fig) and _pixels(fig)[1] == 12 * DPI


def test_anomaly_overlay_figure(tmp_path):
    x = _ball().numpy()
    amap = np.zeros_like(x)
    amap[3:6, 10:13, 4:7] = 5.0
    fig = anomaly_overlay_figure(x, x, amap, title="sub-01")
    grid = [ax for ax in fig.axes if ax.get_images()]
    assert len(grid) == 9
    assert [ax.get_ylabel() for ax in grid[::3]] == ["input", "healed", "input + map"]
    assert [ax.get_title() for ax in grid[:3]] == [f"{p} (slice {c})" for p, c in zip(PLANES, (5, 11, 4))]
    bars = [ax for ax in fig.axes if not ax.get_images()]
    assert bars[0].get_ylabel() == INTENSITY_LABEL and bars[1].get_xlabel().startswith("anomaly map")
    overlay = grid[6].get_images()[0].get_array()
    assert overlay.shape == (16, 16, 3) and overlay[..., 0].max() > overlay[..., 2].max()  # red to yellow on grey
    path = overlay_png(x, x, amap, str(tmp_path / "b.png"), "sub-01")
    assert png_size(path) == _pixels(fig)


def test_lesion_figure_rows_and_columns():
    x = _ball()[None]
    brain = (x[0] > -0.8).numpy()
    cases = []
    for kind in LESIONS:
        mask = np.zeros_like(brain)
        mask[6:9, 6:9, 7:9] = True
        cases.append({"kind": kind, "x": x, "mask": mask, "brain": brain})
    maps = np.random.default_rng(0).random((len(cases), 16, 16, 16))
    fig = lesion_figure({"method A": {"test": maps}, "method B": {"test": maps}}, cases)
    panels = [ax for ax in fig.axes if ax.get_images()]
    assert len(panels) == len(LESIONS) * 4
    assert [ax.get_title() for ax in panels[:4]] == ["lesioned input", "true mask", "method A", "method B"]
    assert [ax.get_ylabel() for ax in panels[::4]] == [k.replace("_", " ") for k in LESIONS]
    assert fig.axes[-1].get_ylabel().startswith("map, scaled per panel")
