"""The quality-over-time benchmark: wall-clock snapshots, the sample figures and an end-to-end tiny run."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from ignite.engine import Engine

from scripts.engine.handlers import WallClockSnapshots
from scripts.tools import quality_benchmark
from scripts.tools.quality_benchmark import CURVES, Reference, config_parser, curves_figure, main, plot_curves
from tests.test_bundle import tiny_overrides
from tests.test_figures import png_size


def test_wall_clock_snapshots_save_at_their_times_and_stop_the_run(tmp_path):
    net = torch.nn.Linear(2, 2)

    def step(engine, batch):
        time.sleep(0.02)
        with torch.no_grad():
            net.weight.add_(1.0)

    engine = Engine(step)
    snaps = WallClockSnapshots([0.1, 0.2], str(tmp_path), net)
    snaps.attach(engine)
    engine.run(range(1000), max_epochs=1)
    assert engine.state.iteration < 1000  # stopped after the last snapshot
    first, second = (torch.load(p, weights_only=False) for p in snaps.written)
    assert [os.path.basename(p) for p in snaps.written] == ["snapshot_0.1s.pt", "snapshot_0.2s.pt"]
    assert 0.1 <= first["elapsed_s"] < second["elapsed_s"] and second["elapsed_s"] >= 0.2
    assert first["iteration"] < second["iteration"] <= engine.state.iteration
    # the weights as they were at that iteration (each step adds 1)
    assert float(second["network"]["weight"][0, 0] - first["network"]["weight"][0, 0]) == pytest.approx(
        second["iteration"] - first["iteration"]
    )
    assert first["ema"] is None
    with pytest.raises(ValueError, match="times_s"):
        WallClockSnapshots([], str(tmp_path), net)


@pytest.fixture(scope="module")
def tiny_reference(nifti_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("quality"))
    return Reference(config_parser(["configs/train.json"], tiny_overrides(nifti_dir, out)))


def test_reference_figures_of_real_and_degenerate_volumes(tiny_reference):
    ref = tiny_reference
    assert ref.train.shape[1:] == (1, 16, 16, 16) and len(ref.heldout) == 3
    # a training volume is its own nearest neighbour; a constant volume has no foreground
    assert ref.nearest_rmse(ref.train[:2]).max() == 0.0
    blank = -torch.ones(6, 1, 16, 16, 16)
    figures = ref.figures(blank)
    assert figures["dice_vs_cohort_mask"] == 0.0
    assert figures["frechet_distance"] > ref.real["frechet_distance"]  # (3 held-out volumes: a rough figure)
    assert ref.real["dice_vs_cohort_mask"] > 0.5
    expected = float(((ref.train + 1.0) ** 2).flatten(1).mean(1).min().sqrt())
    assert figures["nearest_train_rmse_median"] == pytest.approx(expected, rel=1e-5)


def test_curves_figure(tmp_path):
    rows = [
        {
            "family": "vdvae",
            "recipe": r,
            "weights": "network",
            "sampler": "learned priors",
            "temperature_mode": "latent",
            "temperature": 0.8,
            "point": p,
            "time_s": 10.0 * (p + 1),
            "frechet_distance": 100.0 / (p + 1) + i,
            "ms_ssim": 0.5,
            "nearest_train_rmse_median": 0.3,
            "dice_vs_cohort_mask": 0.2 * p,
            "heldout_neg_elbo_nats": -p * 0.5,
        }
        for i, r in enumerate(["a", "b"])
        for p in range(3)
    ]
    real = {
        "frechet_distance": 10.0,
        "ms_ssim": 0.7,
        "nearest_train_rmse_median": 0.2,
        "dice_vs_cohort_mask": 0.9,
        "anatomy_score": 0.8,
        "anatomy_score_blur_1": 0.35,
    }
    fig = curves_figure(rows, real)
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert len(panels) == len(CURVES)
    for title, ylabel in CURVES.values():
        assert panels[title].get_xlabel() == "training wall clock (s)" and panels[title].get_ylabel().startswith(ylabel)
    frechet = panels[CURVES["frechet_distance"][0]]
    assert frechet.get_yscale() == "log"
    assert [len(line.get_xdata()) for line in frechet.get_lines()[:2]] == [3, 3]  # one line of 3 points per recipe
    assert frechet.get_lines()[2].get_ydata()[0] == 10.0  # the held-out volumes' figure
    anatomy = panels[CURVES["anatomy_score"][0]]  # not measured here: the targets and the goal only
    assert sorted(line.get_ydata()[0] for line in anatomy.get_lines()) == [0.35, 0.8]
    legend = [t.get_text() for t in fig.axes[-1].get_legend().get_texts()]
    assert any(t.startswith("a, network weights") for t in legend) and "held-out volumes" in legend
    path = plot_curves(rows, real, str(tmp_path / "c.png"))
    assert png_size(path) == (round(fig.get_figheight() * fig.dpi), round(fig.get_figwidth() * fig.dpi))


def test_tiny_end_to_end_run(nifti_dir, tmp_path, monkeypatch):
    """Two recipes, one seed, two snapshots of a 16^3 model: every row is measured and reported."""
    overrides = {
        k: v
        for k, v in tiny_overrides(nifti_dir, str(tmp_path / "unused")).items()
        if k not in ("output_dir", "model_path")
    }
    output = str(tmp_path / "quality.md")
    results = main(
        recipes=["default", "reference"],
        seeds=[0],
        budget_s=6,
        points=2,
        temperatures=[0.8],
        temperature_modes=["latent", "std"],
        num_samples=6,
        vq=False,
        latent_prior_resolutions=[8],
        work_dir=str(tmp_path / "runs"),
        output=output,
        figure=str(tmp_path / "q.png"),
        overrides=overrides,
    )
    rows = results["rows"]
    assert len(rows) == 2 * 2 * 3  # recipes x points x (learned priors in 2 temperature modes, post-hoc prior <= 8^3)
    assert {r["sampler"] for r in rows} == {"learned priors", "post-hoc prior <= 8^3"}
    assert {r["recipe"] for r in rows} == {"default", "reference"}
    for r in rows:
        assert r["time_s"] >= 3.0 * (r["point"] + 1) and r["iteration"] >= 1
        assert 0.0 <= r["dice_vs_cohort_mask"] <= 1.0 and r["frechet_distance"] >= 0 and r["skipped_fraction"] == 0.0
    later = [r for r in rows if r["point"] == 1]  # (under load both snapshots can fall on one long iteration)
    assert all(
        r["iteration"] >= s["iteration"] for r in later for s in rows if s["point"] == 0 and s["recipe"] == r["recipe"]
    )
    with open(output) as f:
        text = f.read()
    assert "| default | network | learned priors | latent | 0.8 |" in text
    assert "| reference | network | post-hoc prior <= 8^3 | latent | 0.8 |" in text
    with open(os.path.splitext(output)[0] + ".json") as f:
        assert json.load(f)["real"]["dice_vs_cohort_mask"] > 0.5
    # the two recipes trained different networks from the same seed, with the options the recipes name
    for recipe, augment in (("default", False), ("reference", True)):
        with open(tmp_path / f"runs/{recipe}/seed0/snapshots/spec.json") as f:
            spec = json.load(f)["overrides"]
        assert spec.get("augment", False) is augment and spec.get("full_resolution_residual", True) is not augment
    snaps = [
        torch.load(str(tmp_path / f"runs/{r}/seed0/snapshots/snapshot_3s.pt"), weights_only=False)["network"]
        for r in ("default", "reference")
    ]
    assert "x_scale" in snaps[0] and "x_scale" not in snaps[1]  # the default shares one output scale, the reference not
    assert any(not torch.equal(snaps[0][k], snaps[1][k]) for k in snaps[1])
    # a rerun reuses the finished runs (same overrides and times) and measures them again
    log = tmp_path / "runs/default/seed0/train.log"
    stamp = log.stat().st_mtime
    again = main(
        recipes=["default"],
        seeds=[0],
        budget_s=6,
        points=2,
        temperatures=[0.8],
        temperature_modes=["latent"],
        num_samples=6,
        vq=False,
        latent_prior_resolutions=[],
        work_dir=str(tmp_path / "runs"),
        output=output,
        figure=str(tmp_path / "q.png"),
        overrides=overrides,
        keep_rows_from=os.path.splitext(output)[0] + ".json",
    )
    assert log.stat().st_mtime == stamp
    # default measured again (2 points, learned priors only); the reference's 6 rows kept from the earlier results
    assert sorted((r["recipe"], r["sampler"]) for r in again["rows"]).count(("default", "learned priors")) == 2
    assert [r for r in again["rows"] if r["recipe"] == "reference"] == [r for r in rows if r["recipe"] == "reference"]
    assert len(again["rows"]) == 8 and "`, then `" in again["command"]
    with pytest.raises(ValueError, match="unknown recipe"):
        main(recipes=["nonsense"], vq=False)
    with pytest.raises(ValueError, match="resolutions >= 1"):
        main(recipes=["default"], vq=False, latent_prior_resolutions=[0, 8])
    # the montage: each sampler's draws of one stream, then held-out volumes, at one grey scale
    drawn = {}
    monkeypatch.setattr(quality_benchmark, "plot_volume_rows", lambda rows, path, title: drawn.update(rows) or path)
    quality_benchmark.samples("default", 0, 3, [8, 0], 0.8, 2, str(tmp_path / "runs"), str(tmp_path / "m.png"))
    assert list(drawn) == [
        "post-hoc <= 8^3, sample 0",
        "post-hoc <= 8^3, sample 1",
        "learned priors, sample 0",
        "learned priors, sample 1",
        "held-out 0",
        "held-out 1",
    ]
    assert not torch.equal(torch.as_tensor(drawn["post-hoc <= 8^3, sample 0"][0]), drawn["learned priors, sample 0"][0])
