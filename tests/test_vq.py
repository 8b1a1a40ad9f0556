"""The VQ family (scripts/vq/networks.py, scripts/vq/trainer.py, configs/vqvae_train.json, the prior overlays, vq_inference.json
and vq_evaluate.json): shapes, the codebook, the absorbing-diffusion loss and sampler, completion, and bundle runs of
each stage with tiny settings (single process and under torchrun)."""

from __future__ import annotations

import itertools
import json
import math
import os
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.distributed as dist

from scripts.engine.handlers import latest_checkpoint
from scripts.vq.completion import region_token_mask
from scripts.vq.networks import (
    VQVAE,
    AbsorbingDiffusionPrior,
    AutoregressivePrior,
    VQGenerator,
    absorbing_diffusion_loss,
    codebook_usage,
)
from tests.conftest import copy_bundle, files_under
from tests.test_bundle import run_bundle

STAGE1 = "configs/vqvae_train.json"
PRIOR = "configs/vq_prior.json"
ABSORBING = "configs/vq_prior_absorbing.json"
AUTOREGRESSIVE = "configs/vq_prior_autoregressive.json"


def tiny_vqvae(**kw) -> VQVAE:
    args = {
        "resolution": 16,
        "spatial_dims": 3,
        "in_channels": 1,
        "channels": (8, 8),
        "num_res_layers": 1,
        "num_embeddings": 16,
        "embedding_dim": 4,
    }
    args.update(kw)
    return VQVAE(**args)


# ------------------------------------------------------------------------------------------------ model units


def test_vqvae_shapes_in_3d_2d_and_with_paired_channels():
    torch.manual_seed(0)
    net = tiny_vqvae()
    recon, qloss, tokens = net.forward_with_tokens(torch.randn(2, 1, 16, 16, 16))
    assert recon.shape == (2, 1, 16, 16, 16) and qloss.ndim == 0 and tokens.shape == (2, 4, 4, 4)
    assert net.token_grid == (4, 4, 4)
    net2d = tiny_vqvae(spatial_dims=2, in_channels=2)
    recon, _, tokens = net2d.forward_with_tokens(torch.randn(3, 2, 16, 16))
    assert recon.shape == (3, 2, 16, 16) and tokens.shape == (3, 4, 4) and tokens.dtype == torch.long
    with pytest.raises(ValueError, match=r"expects input of shape \(B, 1, 16, 16, 16\)"):
        net.tokens(torch.randn(1, 2, 16, 16, 16))
    with pytest.raises(ValueError, match="divisible by 2 \\*\\* len\\(channels\\) = 4"):
        tiny_vqvae(resolution=18)


def test_codebook_lookup_round_trip_and_reconstruction_through_tokens():
    torch.manual_seed(0)
    net = tiny_vqvae().eval()
    tokens = torch.randint(0, 16, (2, 4, 4, 4))
    embedded = net.codebook.embed(tokens)  # (2, 4, 4, 4, 4): codes as channels
    assert embedded.shape == (2, 4, 4, 4, 4)
    assert torch.equal(net.codebook.quantize(embedded)[2], tokens)  # nearest code of a code is itself
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        expected = net.decode(net.quantize(net.encode(x))[0])
        assert torch.allclose(
            VQGenerator(net, AbsorbingDiffusionPrior((4, 4, 4), 16, 4, 8, 1, 2))(x), expected, atol=1e-6
        )


def test_tokens_never_move_the_codebook_but_training_steps_do():
    torch.manual_seed(0)
    net = tiny_vqvae(dead_code_patience=0).train()
    before = net.codebook.embedding.weight.clone()
    net.tokens(torch.randn(2, 1, 16, 16, 16))
    assert torch.equal(net.codebook.embedding.weight, before)
    net.forward_with_tokens(torch.randn(2, 1, 16, 16, 16))
    assert not torch.equal(net.codebook.embedding.weight, before)  # EMA step
    assert not net.codebook.embedding.weight.requires_grad


def test_dead_codes_restart_at_encoder_outputs_after_patience():
    torch.manual_seed(0)
    net = tiny_vqvae(dead_code_patience=2).train()
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        _, _, tokens = net.forward_with_tokens(x)
        used_first = set(tokens.unique().tolist())
        assert (net.code_age[list(used_first)] == 0).all() and (net.code_age.sum() > 0)
        _, _, tokens2 = net.forward_with_tokens(x)
        unused_twice = sorted(set(range(16)) - used_first - set(tokens2.unique().tolist()))
        assert unused_twice, "the test needs codes unused for two steps"
        z = net.encode(x).movedim(1, -1).reshape(-1, 4)
        for code in unused_twice:  # moved onto one of the batch's encoder outputs
            assert (net.codebook.embedding.weight[code][None] - z).abs().sum(1).min() < 1e-6
        assert (net.code_age[unused_twice] == 0).all()


def test_codebook_usage_perplexity_and_dead_codes():
    assert codebook_usage(torch.tensor([5, 5, 5, 5])) == {"perplexity": pytest.approx(4.0), "dead_codes": 0}
    assert codebook_usage(torch.tensor([0, 7, 0, 0])) == {"perplexity": pytest.approx(1.0), "dead_codes": 3}


def test_absorbing_loss_equals_its_definition_on_a_tiny_case():
    torch.manual_seed(0)
    b, length, k, steps = 3, 6, 5, 4
    x0 = torch.randint(0, k, (b, length))
    weight = torch.randn(k + 1, k)

    def logits_fn(x_t):  # a fixed function of the masked sequence
        return weight[x_t] + 0.1 * torch.arange(length).float()[None, :, None]

    t = torch.tensor([1, 2, 4])
    terms = absorbing_diffusion_loss(logits_fn, x0, steps, mask_id=k, t=t)
    masked = terms["masked"]
    assert masked[2].all()  # t = T masks everything
    x_t = torch.where(masked, torch.full_like(x0, k), x0)
    logp = torch.log_softmax(logits_fn(x_t), -1)
    for i in range(b):
        ce = -sum(float(logp[i, j, x0[i, j]]) for j in range(length) if masked[i, j])
        ti = int(t[i])
        assert float(terms["reweighted_bits_per_token"][i]) == pytest.approx(
            (1 - ti / steps) * ce / (math.log(2) * length), rel=1e-5
        )
        assert float(terms["elbo_bits_per_token"][i]) == pytest.approx(
            (steps / ti) * ce / (math.log(2) * length), rel=1e-5
        )
    assert float(terms["loss"]) == pytest.approx(float(terms["reweighted_bits_per_token"].mean()), rel=1e-6)
    # each token is masked with probability t / T
    many = absorbing_diffusion_loss(
        lambda x: torch.zeros(*x.shape, k), torch.zeros(2, 20000, dtype=torch.long), 4, k, t=torch.tensor([1, 3])
    )
    assert many["masked"].float().mean(1).tolist() == pytest.approx([0.25, 0.75], abs=0.015)


class RecordingDenoiser(torch.nn.Module):
    """Random logits; records the input of every call."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k
        self.position_embedding = torch.nn.Parameter(torch.zeros(1))  # gives the sampler its device
        self.calls: list[torch.Tensor] = []

    def forward(self, x):
        self.calls.append(x.clone())
        return torch.randn(*x.shape, self.k)


def test_absorbing_sampler_unmasks_every_position_exactly_once_and_keeps_known_tokens():
    torch.manual_seed(0)
    prior = AbsorbingDiffusionPrior((3, 3, 2), 7, num_timesteps=10, dim=8, depth=1, heads=2)
    prior.denoiser = RecordingDenoiser(7)
    out = prior.sample(4, temperature=1.0)
    assert out.shape == (4, 3, 3, 2) and int(out.max()) < 7
    states = prior.denoiser.calls + [out.reshape(4, -1)]
    unmasked_at = torch.full((4, 18), -1)
    for step, (before, after) in enumerate(zip(states[:-1], states[1:])):
        was, now = before != 7, after != 7
        assert not (was & ~now).any(), "a token was masked again"
        assert torch.equal(before[was], after[was]), "an unmasked token changed"
        unmasked_at[now & ~was] = step
    assert (unmasked_at >= 0).all()  # every position unmasked, once (never re-masked or changed)
    known = torch.randint(0, 7, (4, 3, 3, 2))
    keep = region_token_mask((3, 3, 2), 4, "first_half")
    prior.denoiser.calls.clear()
    out = prior.sample(4, 0.5, known=known, known_mask=keep)
    assert torch.equal(out[keep], known[keep])
    assert (prior.denoiser.calls[0][keep.reshape(4, -1)] != 7).all()  # kept tokens are given from the start


def test_autoregressive_likelihood_is_normalised_and_completion_keeps_tokens():
    torch.manual_seed(0)
    prior = AutoregressivePrior((1, 2), 3, ordering="raster_scan", dim=8, depth=1, heads=2).eval()
    grids = torch.tensor(list(itertools.product(range(3), repeat=2))).reshape(9, 1, 2)
    with torch.no_grad():
        total = prior.token_nll(grids).sum(1)
    assert float(torch.exp(-total).sum()) == pytest.approx(1.0, abs=1e-5)  # a distribution over all 9 grids
    prior = AutoregressivePrior((4, 4, 4), 16, ordering="s_curve", dim=8, depth=1, heads=2).eval()
    known = torch.randint(0, 16, (2, 4, 4, 4))
    keep = region_token_mask((4, 4, 4), 2, "centre")
    out = prior.sample(2, 1.0, known=known, known_mask=keep)
    assert out.shape == (2, 4, 4, 4) and torch.equal(out[keep], known[keep]) and int(out.max()) < 16
    gen = VQGenerator(tiny_vqvae().eval(), prior)
    assert gen.sample(2, 1.0).shape == (2, 1, 16, 16, 16)  # through MONAI's VQVAETransformerInferer
    with pytest.raises(ValueError, match="train the prior on this VQ-VAE's tokens"):
        VQGenerator(tiny_vqvae(num_embeddings=8), prior)


def test_conditional_autoregressive_prior_is_a_distribution_per_condition():
    """With covariates the prior reads them through cross-attention: for each condition the likelihood sums to 1
    over all grids, and conditions change it; without covariates the tensors are the unconditional prior's."""
    torch.manual_seed(0)
    plain = AutoregressivePrior((1, 2), 3, dim=8, depth=1, heads=2)
    conditional = AutoregressivePrior((1, 2), 3, dim=8, depth=1, heads=2, num_covariates=2).eval()
    assert not any(".cross_attn." in k or "covariate" in k for k in plain.state_dict())  # as before
    assert any(k.startswith("covariate_embedding.") for k in conditional.state_dict())
    grids = torch.tensor(list(itertools.product(range(3), repeat=2))).reshape(9, 1, 2)
    with torch.no_grad():
        totals = [conditional.token_nll(grids, c.expand(9, 2)).sum(1) for c in (torch.zeros(1, 2), torch.ones(1, 2))]
    for total in totals:
        assert float(torch.exp(-total).sum()) == pytest.approx(1.0, abs=1e-5)
    assert not torch.allclose(totals[0], totals[1], atol=1e-4)
    with pytest.raises(ValueError, match=r"covariates must be \(9, 2\)"):
        conditional.token_nll(grids, torch.zeros(9, 3))
    with pytest.raises(ValueError, match="unconditional"):
        plain.token_nll(grids, torch.zeros(9, 2))
    with pytest.raises(ValueError, match="absorbing-diffusion prior is unconditional"):
        AbsorbingDiffusionPrior((1, 2), 3, num_timesteps=2, dim=8, depth=1, heads=2).loss(grids, torch.zeros(9, 2))


def test_region_token_mask():
    m = region_token_mask((2, 2, 4), 3, "first_half")
    assert m.shape == (3, 2, 2, 4) and m[..., :2].all() and not m[..., 2:].any()
    assert int(region_token_mask((4, 4, 4), 1, "centre").sum()) == 8
    with pytest.raises(ValueError, match="keep must be"):
        region_token_mask((4, 4), 1, "top")


# ------------------------------------------------------------------------------------------------ bundle runs


def stage1_overrides(nifti_dir: str, run: str, **extra) -> dict:
    opts = {
        "dataset_dir": nifti_dir,
        "output_dir": run,
        "vqvae_path": os.path.join(run, "vqvae.pt"),
        "resolution": 16,
        "vq_channels": [8, 8],
        "num_embeddings": 16,
        "embedding_dim": 4,
        "batch_size": 4,
        "max_epochs": 2,
        "num_workers": 0,
        "train_frac": 0.75,
        "amp": "none",
        "images_to_plot": 1,
    }
    opts.update(extra)
    return opts


def stage2_overrides(stage1: dict, run: str, **extra) -> dict:
    """Stage 2 on the tokens of the stage-1 run ``stage1`` (``vqvae_dir``), written to ``run``."""
    opts = {
        **stage1,
        "vqvae_dir": stage1["output_dir"],
        "output_dir": run,
        "model_path": os.path.join(run, "prior.pt"),
        "prior_dim": 16,
        "prior_depth": 1,
        "prior_heads": 2,
        "num_timesteps": 8,
        "val_interval": 1,
        "max_epochs": 2,
    }
    opts.update(extra)
    return opts


@pytest.fixture(scope="module")
def vq_runs(tmp_path_factory, nifti_dir) -> dict:
    """Stage 1 (2 epochs), then each prior (2 epochs) on its tokens, each in its own output_dir, with a copy of the
    bundle as bundle_root (so that ``test_runs_write_only_under_their_output_dirs`` sees what lands in it)."""
    root = tmp_path_factory.mktemp("vq")
    bundle = copy_bundle(str(root / "bundle"))
    bundle_files = files_under(bundle)
    s1 = stage1_overrides(nifti_dir, str(root / "vqvae"), bundle_root=bundle)
    run_bundle(s1, STAGE1)
    runs = {"root": str(root), "bundle": bundle, "bundle_files": bundle_files, "stage1": s1}
    for name, config in (("absorbing", ABSORBING), ("autoregressive", AUTOREGRESSIVE)):
        s2 = stage2_overrides(s1, str(root / name))
        run_bundle(s2, json.dumps([STAGE1, PRIOR, config]))
        runs[name] = s2
    return runs


def test_runs_write_only_under_their_output_dirs(vq_runs):
    """--output_dir moves everything a stage-1 run writes, its data split and tokens included, and stage 2 reads them
    from --vqvae_dir: nothing lands in the bundle (no runs/vqvae, no models/*.pt)."""
    assert files_under(vq_runs["bundle"]) == vq_runs["bundle_files"]
    s1 = vq_runs["stage1"]
    stage1 = set(os.listdir(s1["output_dir"]))
    assert {"data_split.json", "tokens.pt", "checkpoints", "tensorboard", "vqvae.pt", "vqvae.json"} <= stage1
    for name in ("absorbing", "autoregressive"):
        written = set(os.listdir(vq_runs[name]["output_dir"]))
        assert {"checkpoints", "tensorboard", "prior.pt"} <= written and not {"tokens.pt", "data_split.json"} & written


def test_stage1_writes_weights_tokens_and_a_resumable_checkpoint(vq_runs):
    s1 = vq_runs["stage1"]
    state = torch.load(s1["vqvae_path"], weights_only=True)
    net = tiny_vqvae()
    net.load_state_dict(state)
    tokens = torch.load(os.path.join(s1["output_dir"], "tokens.pt"), weights_only=False)
    assert tokens["train"]["tokens"].shape == (9, 4, 4, 4) and tokens["val"]["tokens"].shape == (3, 4, 4, 4)
    assert tokens["vqvae"] == s1["vqvae_path"] and len(tokens["train"]["files"]) == 9
    # the saved tokens are the model's tokens of the deterministic preprocessing
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(os.path.dirname(os.path.dirname(__file__)), STAGE1))
    parser.update({k: v for k, v in s1.items()})
    pre = parser.get_parsed_content("validate#preprocessing")
    x = pre({"image": tokens["val"]["files"][0]})["image"].as_tensor()[None]
    assert torch.equal(net.eval().tokens(x)[0], tokens["val"]["tokens"][0].long())
    ckpt = latest_checkpoint(os.path.join(s1["output_dir"], "checkpoints"))
    full = torch.load(ckpt, weights_only=True)
    assert {"trainer", "network", "optimizer", "data", "best_model"} <= set(full) and full["trainer"]["iteration"] == 6
    assert "code_age" in full["network"]
    os.remove(os.path.join(s1["output_dir"], "tokens.pt"))
    run_bundle({**s1, "run_id": "tokenize"}, STAGE1)  # rewrites the tokens from models/vqvae.pt alone
    again = torch.load(os.path.join(s1["output_dir"], "tokens.pt"), weights_only=False)
    assert torch.equal(again["train"]["tokens"], tokens["train"]["tokens"])
    run_bundle({**s1, "max_epochs": 3}, STAGE1)  # resumes: one more epoch
    assert (
        torch.load(latest_checkpoint(os.path.join(s1["output_dir"], "checkpoints")), weights_only=True)["trainer"][
            "iteration"
        ]
        == 9
    )
    proc = run_bundle({**s1, "max_epochs": 4, "batch_size": 2}, STAGE1, check=False)  # another effective batch
    assert proc.returncode != 0 and "written with 3 iterations per epoch but this run has 5" in proc.stderr


@pytest.mark.parametrize("name", ["absorbing", "autoregressive"])
def test_stage2_writes_a_prior_that_loads(vq_runs, name):
    s2 = vq_runs[name]
    cls = AbsorbingDiffusionPrior if name == "absorbing" else AutoregressivePrior
    kwargs = {"num_timesteps": 8} if name == "absorbing" else {}
    prior = cls((4, 4, 4), 16, dim=16, depth=1, heads=2, **kwargs)
    prior.load_state_dict(torch.load(s2["model_path"], weights_only=True))
    full = torch.load(latest_checkpoint(os.path.join(s2["output_dir"], "checkpoints")), weights_only=True)
    assert full["trainer"]["iteration"] == 6  # 9 token grids, batch 4: 3 steps per epoch, 2 epochs
    assert math.isfinite(full["best_model"]["best"]) and full["best_model"]["best"] > 0  # held-out bits per token


@pytest.mark.parametrize("name", ["absorbing", "autoregressive"])
def test_vq_inference_samples_and_completes(vq_runs, nifti_dir, tmp_path, name):
    s2 = vq_runs[name]
    common = {
        k: v
        for k, v in vq_runs["stage1"].items()
        if k in ("resolution", "vq_channels", "num_embeddings", "embedding_dim")
    }
    common.update(
        prior=name,
        vqvae_path=vq_runs["stage1"]["vqvae_path"],
        ckpt_path=s2["model_path"],
        prior_dim=16,
        prior_depth=1,
        prior_heads=2,
        num_timesteps=8,
    )
    out = str(tmp_path / "samples")
    run_bundle({**common, "output_dir": out, "num_samples": 3, "batch_size": 2}, "configs/vq_inference.json")
    files = sorted(f for f in os.listdir(out) if f.endswith(".nii.gz"))
    assert len(files) == 3 and os.path.isfile(os.path.join(out, "samples.png"))
    assert nib.load(os.path.join(out, files[0])).shape == (16, 16, 16)
    few = tmp_path / "few"
    few.mkdir()
    for f in sorted(os.listdir(nifti_dir))[:2]:
        os.symlink(os.path.join(nifti_dir, f), few / f)
    out = str(tmp_path / "completed")
    run_bundle(
        {**common, "output_dir": out, "complete_dir": str(few), "keep_region": "first_half"},
        "configs/vq_inference.json",
    )
    written = sorted(os.listdir(out))
    assert len([f for f in written if f.endswith("_completed.nii.gz")]) == 2 and "completion.png" in written
    given = nib.load(os.path.join(out, [f for f in written if f.endswith("_given.nii.gz")][0])).get_fdata()
    inp = nib.load(os.path.join(out, [f for f in written if f.endswith("_input.nii.gz")][0])).get_fdata()
    assert np.allclose(given[..., :8], inp[..., :8]) and not np.allclose(given[..., 8:], inp[..., 8:])
    with pytest.raises(AssertionError, match="prior must be one of"):
        run_bundle(
            {**common, "prior": "pixelcnn", "ckpt_path": s2["model_path"], "output_dir": out},
            "configs/vq_inference.json",
        )


def test_evaluate_reports_both_families_side_by_side_figures(vq_runs, tmp_path):
    s1 = vq_runs["stage1"]
    out = str(tmp_path / "eval")
    opts = {k: v for k, v in s1.items() if k in ("resolution", "vq_channels", "num_embeddings", "embedding_dim")}
    opts.update(
        prior="autoregressive",
        vqvae_path=s1["vqvae_path"],
        ckpt_path=vq_runs["autoregressive"]["model_path"],
        prior_dim=16,
        prior_depth=1,
        prior_heads=2,
        run_dir=s1["output_dir"],
        output_dir=out,
        num_samples=4,
        batch_size=2,
        diversity_samples=4,
        cache="none",
    )
    run_bundle(opts, json.dumps(["configs/evaluate.json", "configs/vq_evaluate.json"]))
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["model"]["family"] == "vq-vae + autoregressive transformer"
    like = report["likelihood"]
    assert like["tokens_per_volume"] == 64 and 0 < like["bits_per_token"]["mean"] < 8.0  # < log2(16) + slack
    assert like["kind"] == "exact NLL of the tokens"
    assert -1 <= report["reconstruction"]["ssim"] <= 1 and math.isfinite(
        report["reconstruction"]["psnr_db"]
    )  # 2 epochs: SSIM near 0
    sample = report["samples"]["0.9"]
    assert (
        sample["seconds_per_sample"] > 0
        and sample["num_samples"] == 4
        and math.isfinite(sample["frechet_distance_to_train"])
    )
    assert os.path.isfile(os.path.join(out, "report.png"))


def test_stage2_without_tokens_names_the_missing_file(nifti_dir, tmp_path):
    s1 = stage1_overrides(nifti_dir, str(tmp_path / "nothing"))
    proc = run_bundle(
        stage2_overrides(s1, str(tmp_path / "prior")), json.dumps([STAGE1, PRIOR, ABSORBING]), check=False
    )
    assert proc.returncode != 0
    assert f"token file {tmp_path / 'nothing' / 'tokens.pt'} does not exist: train stage 1 first" in proc.stderr


def paired_niftis(nifti_dir: str, folder) -> str:
    """4-D NIfTI files of 2 channels (each volume and its foreground mask), as paired data (seed 003)."""
    folder.mkdir()
    for f in sorted(os.listdir(nifti_dir))[:8]:
        img = nib.load(os.path.join(nifti_dir, f))
        data = img.get_fdata()
        pair = np.stack([data, (data > data.mean()).astype(np.float64)], axis=-1)
        nib.save(nib.Nifti1Image(pair.astype(np.float32), img.affine), str(folder / f))
    return str(folder)


def test_2d_slices_of_paired_volumes_train_and_sample(nifti_dir, tmp_path):
    data = paired_niftis(nifti_dir, tmp_path / "paired")
    s1 = stage1_overrides(data, str(tmp_path / "vqvae"), spatial_dims=2, in_channels=2, max_epochs=1)
    run_bundle(s1, STAGE1)
    tokens = torch.load(os.path.join(s1["output_dir"], "tokens.pt"), weights_only=False)
    assert tokens["train"]["tokens"].shape == (6, 4, 4)
    s2 = stage2_overrides(s1, str(tmp_path / "prior"), max_epochs=1)
    run_bundle(s2, json.dumps([STAGE1, PRIOR, ABSORBING]))
    out = str(tmp_path / "samples")
    run_bundle(
        {
            "spatial_dims": 2,
            "in_channels": 2,
            "resolution": 16,
            "vq_channels": [8, 8],
            "num_embeddings": 16,
            "embedding_dim": 4,
            "prior_dim": 16,
            "prior_depth": 1,
            "prior_heads": 2,
            "num_timesteps": 8,
            "vqvae_path": s1["vqvae_path"],
            "ckpt_path": s2["model_path"],
            "output_dir": out,
            "num_samples": 2,
        },
        "configs/vq_inference.json",
    )
    sample = nib.load(os.path.join(out, "sample_t0.9_00000.nii.gz"))
    assert sample.shape == (16, 16, 1, 2)  # 2-D, two channels
    # single-channel files for in_channels 2: the error names the file
    proc = run_bundle(stage1_overrides(nifti_dir, str(tmp_path / "bad"), in_channels=2), STAGE1, check=False)
    assert proc.returncode != 0 and "expected a 4-D file of 2 3-D volumes (in_channels = 2)" in proc.stderr


def test_bad_resolution_and_unknown_option_are_named(nifti_dir, tmp_path):
    proc = run_bundle(stage1_overrides(nifti_dir, str(tmp_path / "a"), resolution=18), STAGE1, check=False)
    assert proc.returncode != 0 and "resolution 18 must be divisible by 2 ** len(channels) = 4" in proc.stderr
    proc = run_bundle(stage1_overrides(nifti_dir, str(tmp_path / "b"), num_embedings=8), STAGE1, check=False)
    assert proc.returncode != 0 and "unknown option 'num_embedings' (did you mean 'num_embeddings'?)" in proc.stderr


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo")
def test_both_stages_train_under_torchrun(nifti_dir, tmp_path):
    from tests.test_distributed import MULTI, STANDALONE
    from tests.test_distributed import torchrun as torchrun_once

    def torchrun(launches, overrides, config_files):
        """One retry: this launch failed 2 times in about 20 runs of this file, never when rerun alone, for a
        reason not found yet (the log of the failed launch goes to stderr, shown if the retry fails too)."""
        try:
            return torchrun_once(launches, overrides, config_files)
        except AssertionError as first:
            print(f"torchrun failed once, retrying (resumes from its checkpoint):\n{first}", file=sys.stderr)
            return torchrun_once(launches, overrides, config_files)

    s1 = stage1_overrides(nifti_dir, str(tmp_path / "vqvae"), batch_size=2, max_epochs=1)
    torchrun([STANDALONE], s1, [STAGE1, MULTI])
    ckpt = latest_checkpoint(os.path.join(s1["output_dir"], "checkpoints"))
    assert ckpt.endswith("checkpoint_3.pt")  # 9 volumes over 2 processes x batch 2 (padded to 10): 3 steps
    tiny_vqvae().load_state_dict(torch.load(s1["vqvae_path"], weights_only=True))
    assert torch.load(os.path.join(s1["output_dir"], "tokens.pt"), weights_only=False)["train"]["tokens"].shape[0] == 9
    s2 = stage2_overrides(s1, str(tmp_path / "prior"), batch_size=2, max_epochs=1)
    torchrun([STANDALONE], s2, [STAGE1, PRIOR, ABSORBING, MULTI])
    state = torch.load(latest_checkpoint(os.path.join(s2["output_dir"], "checkpoints")), weights_only=True)
    assert state["trainer"]["iteration"] == 3
    AbsorbingDiffusionPrior((4, 4, 4), 16, 8, 16, 1, 2).load_state_dict(torch.load(s2["model_path"], weights_only=True))


def test_compare_reports_formats_both_families_from_the_reports(tmp_path):
    from scripts.tools.compare_reports import comparison_rows, main

    def report(likelihood: dict) -> dict:
        stats = {"median": 0.2}
        return {
            "likelihood": likelihood,
            "reconstruction": {"psnr_db": 22.61, "ssim": 0.7612},
            "real": {
                "diversity_mean_pairwise_ms_ssim": 0.833,
                "frechet_distance_to_train": 173.2,
                "mmd_to_train": 0.0123,
                "nearest_train_rmse": {"median": 0.145},
            },
            "samples": {
                "0.3": {
                    "diversity_mean_pairwise_ms_ssim": 0.878,
                    "frechet_distance_to_train": 6062.4,
                    "mmd_to_train": 0.5,
                    "nearest_train_rmse": stats,
                    "seconds_per_sample": 0.1,
                },
                "0.8": {
                    "diversity_mean_pairwise_ms_ssim": 0.496,
                    "frechet_distance_to_train": 5360.0,
                    "mmd_to_train": 0.4,
                    "nearest_train_rmse": stats,
                    "seconds_per_sample": 0.12,
                },
            },
        }

    vdvae = report({"neg_elbo_nats_per_voxel": {"mean": -1.4461}, "neg_elbo_bits_per_voxel": {"mean": 4.68}})
    vq = report(
        {
            "bits_per_token": {"mean": 1.2345},
            "tokens_per_volume": 512,
            "kind": "ELBO of the tokens (upper bound on the NLL), mean of 4 draws",
        }
    )
    rows = comparison_rows({"VDVAE": vdvae, "VQ": vq}, {"VDVAE": 0.8})
    assert rows[0][:5] == ["VDVAE (T=0.8)", "-1.446 nats/voxel (neg. ELBO)", "22.6", "0.761", "0.496 (0.833)"]
    assert rows[0][5:] == ["5360 (173)", "0.400 (0.012)", "0.200 (0.145)", "0.120"]
    assert [r[0] for r in rows[1:]] == ["VQ (T=0.3)", "VQ (T=0.8)"]  # every temperature by default
    assert rows[1][1] == "1.234 bits/token (ELBO, 512 tokens)"
    with pytest.raises(KeyError, match="no samples at temperature 1"):
        comparison_rows({"VQ": vq}, {"VQ": 1.0})
    path = tmp_path / "r.json"
    path.write_text(json.dumps(vq))
    out = tmp_path / "table.md"
    main({"VQ": str(path)}, output=str(out))
    assert out.read_text().splitlines()[2].startswith("| VQ (T=0.3) | 1.234 bits/token")
    with pytest.raises(FileNotFoundError, match="run evaluate.json first"):
        main({"missing": str(tmp_path / "nope.json")})
