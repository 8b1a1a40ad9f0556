import math

import pytest
import torch

from scripts.engine.training import autocast
from scripts.vdvae.network import VDVAE
from scripts.vdvae.trainer import GradientSkipper, make_ema
from tests.conftest import tiny_architecture


def test_fixed_threshold_alone_would_stall_but_adaptive_skipping_recovers():
    # gradient norms rise for good (as when a model moves to a new regime): a fixed threshold of 50 would
    # skip every update from step 30 on; the adaptive threshold follows the norms and accepts again
    skipper = GradientSkipper(
        gradient_skipping_value=50.0, gradient_skip_factor=3.0, window=20, min_window=5, max_consecutive_skips=1000
    )
    decisions = []
    for step in range(200):
        norm = 10.0 if step < 30 else 100.0
        skip = skipper.should_skip(norm)
        skipper.record(skip, False)
        decisions.append(skip)
    assert any(decisions[30:40])  # the jump is first treated as an outlier
    assert not any(decisions[60:])  # and then accepted: no stall
    assert skipper.consecutive == 0


def test_isolated_spike_is_skipped_and_nonfinite_counted():
    skipper = GradientSkipper(gradient_skip_factor=10.0, min_window=5)
    for _ in range(10):
        assert not skipper.should_skip(1.0)
        skipper.record(False, False)
    assert skipper.should_skip(50.0)
    skipper.record(True, False)
    assert skipper.should_skip(float("nan"))
    skipper.record(True, True)
    assert skipper.skipped_total == 2 and skipper.nonfinite_total == 1
    state = skipper.state_dict()
    other = GradientSkipper()
    other.load_state_dict(state)
    assert other.state_dict() == state


def test_reference_skip_rule_and_warm_up():
    """Reference defaults: skip at a norm >= 1e12 or a non-finite one, but no finite norm before iteration 50."""
    skipper = GradientSkipper()
    assert skipper.factor == 0 and skipper.warmup_iterations == 50
    assert not skipper.should_skip(1e13, iteration=1)
    assert not skipper.should_skip(1e13, iteration=49)
    assert skipper.should_skip(1e13, iteration=50)
    assert skipper.should_skip(1e12, iteration=60)
    assert not skipper.should_skip(9.9e11, iteration=60)
    assert skipper.should_skip(float("nan"), iteration=3)  # unlike the reference, which would apply it
    assert not GradientSkipper().should_skip(5e3, iteration=1000)  # no adaptive threshold by default


def test_too_many_consecutive_skips_is_a_clear_error():
    skipper = GradientSkipper(max_consecutive_skips=3)
    with pytest.raises(RuntimeError, match="3 consecutive updates were skipped"):
        for _ in range(3):
            skipper.record(skipper.should_skip(math.inf), True)


def test_autocast_modes():
    with pytest.raises(ValueError, match="amp must be one of"):
        autocast("cpu", "half")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        autocast("cpu", "float16")
    net = VDVAE(8, **tiny_architecture(8))
    with autocast("cpu", "bfloat16"):
        mean, scale, kl = net.forward_train(torch.zeros(1, 1, 8, 8, 8))
    assert mean.dtype == torch.float32 and kl.dtype == torch.float32  # likelihood terms stay in float32


def test_ema_tracks_weights():
    net = VDVAE(8, **tiny_architecture(8))
    assert make_ema(net, 0.0) is None
    ema = make_ema(net, 0.5)
    w0 = net.output_head.conv.weight.detach().clone()
    with torch.no_grad():
        net.output_head.conv.weight.add_(1.0)
    ema.update_parameters(net)  # first update copies
    with torch.no_grad():
        net.output_head.conv.weight.add_(1.0)
    ema.update_parameters(net)
    assert torch.allclose(ema.module.output_head.conv.weight, w0 + 1.5)
    with pytest.raises(ValueError, match="ema_decay"):
        make_ema(net, 1.0)
