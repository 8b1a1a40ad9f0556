"""Parity with the reference implementation on ``shared/parity`` (see its README): a tiny 16^3 reference model, its
initial and a perturbed weight set, one input and the reference's numbers computed with every latent draw set to
zero. After conversion, this bundle's VDVAE, loss and per-part clipping give the same numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import scripts.vdvae.network as networks
from scripts.engine.sampling import load_weights
from scripts.engine.training import backward_and_clip
from scripts.vdvae.loss import ELBOLoss
from scripts.vdvae.network import ARCHITECTURE_LISTS, VDVAE
from scripts.vdvae.reference import REFERENCE_GRAPHS, convert_reference_state_dict, to_reference_state_dict
from tests.conftest import ROOT

PARITY = os.path.join(os.path.dirname(ROOT), "shared", "parity")
pytestmark = pytest.mark.skipif(not os.path.isdir(PARITY), reason=f"parity fixture not found at {PARITY}")
WEIGHTS = {"init": "reference_state_dict.pt", "perturbed": "reference_state_dict_perturbed.pt"}
RTOL = 1e-5
# where a group's KL is ~1e-6 nats its float32 value is rounding noise: the reference's own float32 and float64
# results differ by up to 6e-7 there (README: float32 vs float64 of the reference itself)
KL_ATOL = 1e-6
# the reference's clipping groups, in this bundle's names
CLIP_GROUPS = {"encoder": "bottom_up_graph_1", "decoder": "top_down_graph_latents", "output_head": "top_down_graph_mu"}


@pytest.fixture(scope="module")
def fixture():
    outputs = torch.load(os.path.join(PARITY, "reference_outputs.pt"), weights_only=False)
    config = outputs["meta"]["config"]
    arch = {name: config[name] for name in ARCHITECTURE_LISTS}
    x = torch.load(os.path.join(PARITY, "input.pt"))
    return outputs, config["resolution"], arch, x


def _load(which: str, resolution: int, arch: dict, **options) -> tuple[VDVAE, dict]:
    checkpoint = torch.load(os.path.join(PARITY, WEIGHTS[which]))
    net = VDVAE(resolution, **arch, **options)
    net.load_state_dict(convert_reference_state_dict(checkpoint, net))
    return net, checkpoint


@pytest.fixture
def zero_noise(monkeypatch):
    """Every latent draw is its mean, as in the fixture (the reference's randn patched to zeros)."""
    monkeypatch.setattr(
        networks, "standard_normal_like", lambda t: torch.zeros(t.shape, dtype=torch.float32, device=t.device)
    )


def _close(actual, expected, rtol=RTOL, atol=0.0, what=""):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        rtol=rtol,
        atol=atol,
        msg=lambda m: f"{what}: {m}",
    )


def test_parameter_counts_per_graph(fixture):
    outputs, resolution, arch, _ = fixture
    net = VDVAE(resolution, **arch)
    counts = outputs["meta"]["param_count"]
    groups = {name: sum(p.numel() for p in params) for name, params in net.clipping_groups().items()}
    assert groups == {
        ours: counts[ref]
        for ours, ref in zip(groups, ("bottom_up_graph_1", "top_down_generative_graph", "top_down_x_mu_graph"))
    }
    assert sum(p.numel() for p in net.parameters()) == counts["total_trainable"]


@pytest.mark.parametrize("which", ["init", "perturbed"])
def test_training_pass_equals_the_reference(fixture, zero_noise, which):
    outputs, resolution, arch, x = fixture
    ref = outputs[which]["train"]
    net, _ = _load(which, resolution, arch)
    net.train()
    mean, scale, kl = net.forward_train(x)
    terms = ELBOLoss(net, l2_reg_coeff=outputs["meta"]["schema_defaults_used"]["l2_reg_coeff"])(x, mean, scale, kl)
    optimizer = torch.optim.Adamax(net.parameters(), lr=1e-3)
    norms = backward_and_clip(terms["loss"], optimizer, None, 100.0, net.clipping_groups())

    _close(terms["loss"].detach(), ref["loss"], what="loss")
    _close(terms["l2"].detach(), ref["l2_term"], what="l2 term")
    _close(terms["nll"].detach(), ref["recon_nll_per_volume"].mean(), what="reconstruction NLL")
    _close(kl.detach().T, ref["kl_per_group_per_volume"], atol=KL_ATOL, what="KL per group")
    _close(mean.detach(), ref["x_mu"], rtol=0, atol=1e-6, what="output mean")
    _close(scale.detach(), ref["x_std"], rtol=0, atol=1e-6, what="output scale")
    for ours, theirs in CLIP_GROUPS.items():
        _close(norms[ours], ref["grad_norm"][theirs], what=f"gradient norm of {ours}")
    # and per tensor, through the key map, to find where a mismatch would start
    param_names = outputs["meta"]["param_names"]
    ours_by_ref = {f"{graph.replace('_state_dict', '')}/module.{r}": o for graph, r, o in _key_rows(net)}
    grads = dict(net.named_parameters())
    ours_norms = [float(torch.linalg.vector_norm(_pre_clip_grad(grads[ours_by_ref[n]], norms, n))) for n in param_names]
    _close(ours_norms, ref["grad_norm_per_tensor"], rtol=1e-4, atol=1e-5, what="gradient norm per tensor")


def _key_rows(net):
    from scripts.vdvae.reference import reference_key_map

    for graph, ref_module, our_module in reference_key_map(net):
        for param in ("weight", "bias"):
            yield graph, f"{ref_module}.{param}", f"{our_module}.{param}"


def _pre_clip_grad(grad_param: torch.nn.Parameter, norms: dict, ref_name: str) -> torch.Tensor:
    """The gradient before clipping: clip_grad_norm_ scaled each group by 100 / norm when its norm exceeded 100."""
    graph = ref_name.split("/")[0]
    ours = {v: k for k, v in CLIP_GROUPS.items()}[
        {
            "bottom_up_graph_1": "bottom_up_graph_1",
            "top_down_generative_graph": "top_down_graph_latents",
            "top_down_x_mu_graph": "top_down_graph_mu",
        }[graph]
    ]
    factor = max(1.0, norms[ours] / 100.0)
    return grad_param.grad.double() * factor


@pytest.mark.parametrize("which", ["init", "perturbed"])
def test_prior_mean_path_equals_the_reference(fixture, zero_noise, which):
    """Sampling with every draw zero at temperature 1.0 and 0.5, the reference's temperature (whole latent)."""
    outputs, resolution, arch, _ = fixture
    net, _ = _load(which, resolution, arch, temperature_mode="latent")
    net.eval()
    path = outputs[which]["prior_mean_path"]
    temps = [k for k in path if k.startswith("T")]
    assert temps
    with torch.no_grad():
        for key in temps:
            mean, scale, _ = net.decode(None, 1, 0, sample_prior=True, temperature=float(key[1:]))
            _close(mean, path[key]["x_mu"], rtol=0, atol=1e-6, what=f"x_mu at {key}")
            if "x_std" in path[key]:
                _close(scale, path[key]["x_std"], rtol=0, atol=1e-6, what=f"x_std at {key}")
            assert torch.equal(net.sample(1, float(key[1:])), mean)  # sample() is this path


def test_std_temperature_mode_departs_from_the_reference_below_one(fixture, zero_noise):
    outputs, resolution, arch, _ = fixture
    net, _ = _load("perturbed", resolution, arch, temperature_mode="std")
    with torch.no_grad():
        at_one = net.decode(None, 1, 0, temperature=1.0)[0]
        at_half = net.decode(None, 1, 0, temperature=0.5)[0]
    path = outputs["perturbed"]["prior_mean_path"]
    _close(at_one, path["T1.0"]["x_mu"], rtol=0, atol=1e-6, what="T=1")  # same at T = 1
    assert (at_half - path["T0.5"]["x_mu"]).abs().max() > 1e-4  # with zero noise, "std" ignores T


@pytest.mark.parametrize("which", ["init", "perturbed"])
def test_converter_round_trips_the_fixture(fixture, which):
    _, resolution, arch, _ = fixture
    net, checkpoint = _load(which, resolution, arch)
    back = to_reference_state_dict(net)
    assert set(back) == set(REFERENCE_GRAPHS.values())
    for graph, state in back.items():
        assert list(state) == list(checkpoint[graph])  # same keys, in the reference's order
        for key, tensor in state.items():
            assert torch.equal(tensor, checkpoint[graph][key]), key


def test_converter_names_the_first_mismatch(fixture):
    _, resolution, arch, _ = fixture
    checkpoint = torch.load(os.path.join(PARITY, WEIGHTS["init"]))
    wider = dict(arch, channels_per_latent=[2, 2, 2, 2, 6])
    with pytest.raises(
        ValueError,
        match=r"'module\.0\.0\.convs_q\.3\.weight' has shape \[8, 12, 1, 1, 1\] but the configured model's "
        r"decoder_blocks\.0\.posterior_mean\.weight has shape \[6, 12, 1, 1, 1\]",
    ):
        convert_reference_state_dict(checkpoint, VDVAE(resolution, **wider))
    more = dict(arch, latent_feature_maps_per_resolution=[3, 2, 2, 1, 1])
    with pytest.raises(
        ValueError, match=r"has no tensor 'module\.4\.5\.convs_p\.0\.weight' \(needed for decoder_blocks\.8\.prior"
    ):
        convert_reference_state_dict(checkpoint, VDVAE(resolution, **more))
    fewer = dict(arch, latent_feature_maps_per_resolution=[1, 2, 2, 1, 1])
    with pytest.raises(ValueError, match=r"holds 'module\.4\.3\..*no place for"):
        convert_reference_state_dict(checkpoint, VDVAE(resolution, **fewer))
    with pytest.raises(ValueError, match="has no \\['top_down_x_mu_graph_state_dict'\\]"):
        convert_reference_state_dict(
            {k: v for k, v in checkpoint.items() if "x_mu" not in k}, VDVAE(resolution, **arch)
        )


def test_converter_command_line(fixture, tmp_path, zero_noise):
    """``python -m scripts.vdvae.reference`` builds network_def from the configs (with overrides) and writes weights that
    load into it and give the reference's loss."""
    outputs, resolution, arch, x = fixture
    out = tmp_path / "model.pt"
    overrides = [f"--{k}={v}".replace(" ", "") for k, v in arch.items()]
    cmd = [
        sys.executable,
        "-m",
        "scripts.vdvae.reference",
        "--reference_checkpoint",
        os.path.join(PARITY, WEIGHTS["perturbed"]),
        "--config_file",
        "configs/train.json",
        "--output",
        str(out),
        "--shared_x_scale=False",  # train.json shares one output scale; the reference predicts one per voxel
        f"--resolution={resolution}",
        *overrides,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "39,114 parameters" in proc.stdout
    net = VDVAE(resolution, **arch)
    net.load_state_dict(torch.load(out))
    mean, scale, kl = net.forward_train(x)
    loss = ELBOLoss(net, l2_reg_coeff=1e-4)(x, mean, scale, kl)["loss"]
    _close(loss.detach(), outputs["perturbed"]["train"]["loss"], what="loss after the command-line conversion")
    bad = subprocess.run(
        cmd[: -len(overrides) - 1], cwd=ROOT, capture_output=True, text=True, timeout=300
    )  # train.json's 32^3 architecture
    assert bad.returncode != 0 and "has shape" in bad.stderr and "another architecture" in bad.stderr
    # train.json alone: the options that change the function are set to the reference's, named, and recorded
    plain = subprocess.run(
        [c for c in cmd if c != "--shared_x_scale=False"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert "--full_resolution_residual False" in plain.stdout and "--shared_x_scale False" in plain.stdout
    with open(tmp_path / "model.json") as f:
        recorded = json.load(f)["network_options"]
    assert recorded["full_resolution_residual"] is False and recorded["shared_x_scale"] is False
    # a config that would run these weights as another function stops, naming the option and its value
    other = VDVAE(resolution, **arch, full_resolution_residual=True)
    with pytest.raises(ValueError, match="full_resolution_residual False.*pass --full_resolution_residual False"):
        load_weights(other, str(out), "cpu")
    assert load_weights(VDVAE(resolution, **arch), str(out), "cpu") is not None
    refused = subprocess.run(cmd + ["--full_resolution_residual=True"], cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode != 0 and "--full_resolution_residual True would make" in refused.stderr
