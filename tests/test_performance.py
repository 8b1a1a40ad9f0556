"""The optimised training path (bfloat16 autocast, channels-last-3d) computes the same loss as float32."""

import json
import sys

import pytest
import torch

from scripts.engine.training import autocast
from scripts.vdvae.loss import ELBOLoss
from scripts.vdvae.network import VDVAE
from tests.conftest import tiny_architecture

# stated tolerance (docs/performance.md): the first-step ELBO loss of the bfloat16 channels-last path is within
# 1% of the float32 contiguous path's on the same batch and weights (measured 0.1% at the reference 32^3 model)
RELATIVE_TOLERANCE = 1e-2


def _first_step_loss(amp: str, channels_last: bool, x: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    torch.manual_seed(0)
    net = VDVAE(16, **tiny_architecture(16, width=16))
    if channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    torch.manual_seed(1)
    with autocast("cpu", amp):
        mean, scale, kl = net.forward_train(x)
    loss = ELBOLoss()(x, mean, scale, kl)["loss"]
    loss.backward()
    return float(loss.detach()), [p.grad.float() for p in net.parameters()]


def test_bfloat16_channels_last_loss_matches_float32():
    torch.manual_seed(2)
    x = torch.rand(2, 1, 16, 16, 16) * 2 - 1
    loss32, grads32 = _first_step_loss("none", False, x)
    loss_bf, grads_bf = _first_step_loss("bfloat16", True, x)
    assert abs(loss_bf - loss32) / abs(loss32) < RELATIVE_TOLERANCE
    # the gradient points the same way (cosine similarity over all parameters)
    g32, gbf = torch.cat([g.flatten() for g in grads32]), torch.cat([g.flatten() for g in grads_bf])
    assert float(torch.nn.functional.cosine_similarity(g32, gbf, dim=0)) > 0.99
    # a different batch gives a clearly different loss: the tolerance above is tight enough to fail
    other, _ = _first_step_loss("none", False, x * 0.5)
    assert abs(other - loss32) / abs(loss32) > 5 * RELATIVE_TOLERANCE


def test_benchmark_counts_convolution_flops_like_torch():
    """The benchmark's analytic FLOP count of a training step equals torch's FlopCounterMode on the same step."""
    from torch.utils.flop_counter import FlopCounterMode

    from scripts.tools.benchmark import FLOAT32, ConvolutionOnlyModel, TrainingStep

    step = TrainingStep.__new__(TrainingStep)  # a tiny network instead of a preset
    step.path, step.device = FLOAT32, torch.device("cpu")
    torch.manual_seed(0)
    step.net = VDVAE(8, **tiny_architecture(8)).train()
    step.optimizer = torch.optim.Adamax(step.net.parameters(), lr=1e-3)
    step.loss = ELBOLoss()
    x = torch.rand(2, 1, 8, 8, 8) * 2 - 1
    conv_only = ConvolutionOnlyModel(step, x)
    with FlopCounterMode(display=False) as counter:
        step.step(x, seed=0)
    # every Conv3d module once, the prior's and posterior's heads included
    assert conv_only.num_convolutions == sum(isinstance(m, torch.nn.Conv3d) for m in step.net.modules())
    assert conv_only.flops == counter.get_total_flops()


_RSS_AFTER_FREE = """
import sys, torch
from scripts.engine.training import configure_allocator
setting = sys.argv[1]
applied = configure_allocator(lean_memory=setting == "lean") if setting != "default" else True
def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
before = rss_mb()
block = torch.ones(48 * 2**20)  # 192 MiB, touched
del block
print(applied, round(rss_mb() - before))
"""


def _rss_kept_after_free(setting: str) -> tuple[bool, int]:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _RSS_AFTER_FREE, setting], capture_output=True, text=True, check=True)
    applied, kept = out.stdout.split()
    return applied == "True", int(kept)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_allocator_keeps_freed_blocks_for_speed_and_returns_them_for_memory():
    """configure_allocator(lean_memory=False) keeps a freed 192 MiB block resident for the next step (glibc's
    default, like lean_memory=True, unmaps it), each in a fresh process since the setting is process-wide."""
    applied, kept = _rss_kept_after_free("speed")
    assert applied and kept > 150, kept
    applied, kept = _rss_kept_after_free("lean")
    assert applied and kept < 50, kept
    _, kept = _rss_kept_after_free("default")
    assert kept < 50, kept


def test_gpu_check_runs_every_section_at_tiny_size_on_cpu(tmp_path):
    """The GPU check's code paths at a tiny size on CPU: bfloat16 agrees with float32 on one step, float16 and the
    128^3 memory are marked CUDA-only, throughput and sampling are measured, a one-process torchrun (Gloo) trains,
    and the report is written."""
    from scripts.tools.gpu_check import gpu_check

    out = str(tmp_path / "gpu.md")
    report = gpu_check(device="cpu", tiny=True, output=out)
    fp32, bf16, fp16 = report["precision"]
    assert fp32["precision"] == "float32" and fp16["note"] == "CUDA only"
    assert bf16["loss_rel_diff"] < 0.05 and bf16["grad_norm_rel_diff_max"] < 0.25  # same step, lower precision
    assert set(fp32["grad_norms"]) == set(bf16["grad_norms"]) and all(v > 0 for v in fp32["grad_norms"].values())
    assert [r["layout"] for r in report["training"]] == [
        "contiguous",
        "channels_last_3d",
        "channels_last_3d + cudnn.benchmark",
    ]
    assert all(r["volumes_per_s"] > 0 for r in report["training"])
    assert all(r["note"] == "CUDA only" for r in report["memory_128"])
    assert report["sampling"][0]["seconds_per_volume"] > 0
    run = report["torchrun"]
    assert run["returncode"] == 0 and run["backend"] == "gloo" and run["weights_written"], run["log_tail"]
    text = open(out).read()
    assert "## torchrun, one process" in text and "finished" in text
    assert json.load(open(str(tmp_path / "gpu.json")))["tiny"] is True
