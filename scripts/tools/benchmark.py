# Copyright 2026 The VDVAE bundle authors. Licensed under the Apache License, Version 2.0.
"""Training and sampling speed, memory and data-loading benchmark; writes ``docs/performance.md``.

    python -m scripts.tools.benchmark                      # everything (about 35 min on 2 CPU cores)
    python -m scripts.tools.benchmark --sections train     # one part: train, memory, sampling, allocator, data
    python -m scripts.tools.benchmark --quick True         # fewer steps, 32^3 only, no 128^3 memory (smoke run)

Every comparison is measured side by side in one run: the training paths of one configuration are timed in
turn, step by step (round robin), against this bundle's own float32 contiguous path and against a
convolution-only model with the same convolutions (shapes, dtype, memory layout; forward and backward, nothing
else), and figures are medians. Peak memory of one training step is taken in a fresh process per figure (CPU
resident set, or CUDA max allocated). The training and sampling sections run in this process with the allocator
setting of train.json and inference.json (``configure_allocator(lean_memory=False)``); the allocator section
compares that setting with glibc's default in fresh processes. The reference code's figures on this machine kind are quoted from the
reference's users, not measured here.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import fire
import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from scripts.engine.config import from_config_file
from scripts.engine.generate_synthetic_data import synthetic_volume
from scripts.engine.training import autocast, configure_allocator
from scripts.vdvae.loss import ELBOLoss, negative_elbo_terms
from scripts.vdvae.network import ARCHITECTURE_LISTS, VDVAE

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sampling_temperature() -> float:
    """The VDVAE family's default sampling temperature, as ``configs/inference.json`` states it."""
    return float(from_config_file(ROOT, "configs/inference.json", "temperature"))


# The reference code's own training loop on this machine kind (2 CPU cores with AMX), quoted from its users.
REFERENCE_VOLUMES_PER_S = {32: 1.2, 64: 0.084}
TRAIN_BATCH = {32: 8, 64: 2, 128: 1}
SECTIONS = ("train", "memory", "sampling", "allocator", "data")


@dataclass(frozen=True)
class Path:
    """One way of running the same training step."""

    name: str
    amp: str = "none"
    channels_last: bool = False
    activation_checkpointing: bool = False


FLOAT32 = Path("float32, contiguous (baseline)")
PATHS = [
    FLOAT32,
    Path("float32, channels-last", channels_last=True),
    Path("bfloat16, channels-last (default)", amp="bfloat16", channels_last=True),
    Path(
        "bfloat16, channels-last, activation checkpointing",
        amp="bfloat16",
        channels_last=True,
        activation_checkpointing=True,
    ),
]
PATHS_BY_KEY = {"float32": PATHS[0], "float32_cl": PATHS[1], "bf16_cl": PATHS[2], "bf16_cl_ckpt": PATHS[3]}


def architecture(resolution: int) -> dict:
    """The reference example configuration at ``resolution`` (configs/vdvae_<resolution>.json), without batch."""
    with open(os.path.join(ROOT, "configs", f"vdvae_{resolution}.json")) as f:
        cfg = json.load(f)
    return {k: cfg[k] for k in ("resolution", *ARCHITECTURE_LISTS)}  # activation checkpointing: each path sets its own


def build(resolution: int, path: Path, device: torch.device, seed: int = 0) -> VDVAE:
    torch.manual_seed(seed)
    net = VDVAE(**architecture(resolution), activation_checkpointing=path.activation_checkpointing).to(device)
    return net.to(memory_format=torch.channels_last_3d) if path.channels_last else net


def volumes(resolution: int, n: int, seed: int) -> torch.Tensor:
    """(n, 1, R, R, R) synthetic ellipsoid volumes scaled to [-1, 1] (the reference generator)."""
    rng = np.random.default_rng(seed)
    vols = np.stack([synthetic_volume(rng, resolution) for _ in range(n)])[:, None]
    return torch.from_numpy(vols) * 2.0 - 1.0


class TrainingStep:
    """A model, its Adamax optimiser and ELBO loss: ``step(x)`` runs one update on ``x`` (B, 1, R, R, R)."""

    def __init__(self, resolution: int, path: Path, device: torch.device) -> None:
        self.path, self.device = path, device
        self.net = build(resolution, path, device).train()
        self.optimizer = torch.optim.Adamax(self.net.parameters(), lr=1e-3)
        self.loss = ELBOLoss()

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device)
        return x.contiguous(memory_format=torch.channels_last_3d) if self.path.channels_last else x

    def step(self, x: torch.Tensor, seed: int) -> float:
        x = self.prepare(x)
        torch.manual_seed(seed)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.path.amp):
            mean, scale, kl = self.net.forward_train(x)
        loss = self.loss(x, mean, scale, kl)["loss"]
        loss.backward()
        for params in self.net.clipping_groups().values():  # as the trainer: per part
            torch.nn.utils.clip_grad_norm_(params, 100.0)
        self.optimizer.step()
        return float(loss.detach())

    @torch.no_grad()
    def heldout_bits_per_voxel(self, x: torch.Tensor) -> float:
        """Mean discretised negative ELBO (bits/voxel) of ``x`` in float32 eval mode."""
        self.net.eval()
        torch.manual_seed(0)
        mean, scale, kl = self.net.forward_train(self.prepare(x))
        self.net.train()
        return float(negative_elbo_terms(x.to(self.device), mean, scale, kl)["neg_elbo_bits"].mean())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _RecordConvolutions(TorchFunctionMode):
    """Records every 3D convolution call (module or functional) as (input shape, input requires grad, weight copy,
    bias copy, stride, padding, groups); it keeps no activation alive."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv3d:
            bound = dict(zip(("input", "weight", "bias", "stride", "padding", "dilation", "groups"), args), **kwargs)
            bias = bound.get("bias")
            self.calls.append(
                (
                    tuple(bound["input"].shape),
                    bound["input"].requires_grad,
                    bound["weight"].detach().clone(),
                    None if bias is None else bias.detach().clone(),
                    bound.get("stride", 1),
                    bound.get("padding", 0),
                    bound.get("groups", 1),
                )
            )
        return func(*args, **kwargs)


def _triple(v) -> tuple[int, int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)


class ConvolutionOnlyModel:
    """Every 3D convolution of one VDVAE training pass, replayed alone: same shapes, dtype and layout.

    ``run()`` does their forward passes, then the backward pass of all of them (weight gradients always,
    input gradients where the VDVAE needs them). ``flops`` counts multiply-adds x 2 analytically.
    """

    def __init__(self, training: TrainingStep, x: torch.Tensor) -> None:
        if training.path.activation_checkpointing:
            raise ValueError("record the convolutions of a path without activation checkpointing")
        recorder = _RecordConvolutions()
        with recorder:
            training.step(x, seed=0)
        self.device, self.path = training.device, training.path
        dtype = torch.bfloat16 if training.path.amp == "bfloat16" else torch.float32
        fmt = torch.channels_last_3d if training.path.channels_last else torch.contiguous_format
        self.calls = []
        self.flops = 0.0
        for shape, needs_input_grad, weight, bias, stride, padding, groups in recorder.calls:
            replay_input = torch.randn(shape, device=self.device, dtype=dtype).contiguous(memory_format=fmt)
            replay_bias = None if bias is None else bias.requires_grad_(True)
            stride, padding = _triple(stride), _triple(padding)
            self.calls.append(
                (
                    replay_input.requires_grad_(needs_input_grad),
                    weight.requires_grad_(True),
                    replay_bias,
                    stride,
                    padding,
                    groups,
                )
            )
            kernel = weight.shape[2:]
            out_voxels = np.prod([(s + 2 * p - k) // st + 1 for s, p, k, st in zip(shape[2:], padding, kernel, stride)])
            macs = shape[0] * out_voxels * weight.shape[0] * weight.shape[1] * np.prod(kernel)
            self.flops += 2.0 * macs * (3 if needs_input_grad else 2)
        self.num_convolutions = len(recorder.calls)

    def run(self) -> None:
        outputs = []
        with autocast(self.device, self.path.amp):
            for inp, weight, bias, stride, padding, groups in self.calls:
                outputs.append(F.conv3d(inp, weight, bias, stride, padding, 1, groups))
        torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])


def _median_times(fns: dict, repeats: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each function, called in turn (round robin) after ``warmup`` calls each."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            _sync(device)
            t = time.perf_counter()
            fn(i)
            _sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_training(resolution: int, steps: int, warmup: int, device: torch.device, log) -> dict:
    """Step times of every path, the convolution-only model, and the ELBO agreement of the paths."""
    batch = TRAIN_BATCH[resolution]
    data = volumes(resolution, batch * (warmup + steps), seed=1)
    heldout = volumes(resolution, 8 if resolution <= 32 else 2, seed=2)
    runs = {p.name: TrainingStep(resolution, p, device) for p in PATHS}
    # the same first step on the same fixed batch: the loss of every path against float32
    first = {name: run.step(data[:batch], seed=0) for name, run in runs.items()}
    default = PATHS_BY_KEY["bf16_cl"]
    conv_only = ConvolutionOnlyModel(TrainingStep(resolution, default, device), data[:batch])
    conv_fp32 = ConvolutionOnlyModel(TrainingStep(resolution, FLOAT32, device), data[:batch])
    log(
        f"  {resolution}^3 batch {batch}: {conv_only.num_convolutions} convolutions, {conv_only.flops / 1e9:.1f} GFLOP per step"
    )

    fns = {
        name: (lambda i, r=run: r.step(data[(i % (warmup + steps)) * batch :][:batch], seed=i + 1))
        for name, run in runs.items()
    }
    fns["conv-only, bfloat16 channels-last"] = lambda i: conv_only.run()
    fns["conv-only, float32 contiguous"] = lambda i: conv_fp32.run()
    medians = _median_times(fns, steps, warmup, device)
    heldout_bits = {name: run.heldout_bits_per_voxel(heldout) for name, run in runs.items()}
    base = medians[FLOAT32.name]
    rows = []
    for p in PATHS:
        t = medians[p.name]
        conv_t = (
            medians["conv-only, float32 contiguous"] if p == FLOAT32 else medians["conv-only, bfloat16 channels-last"]
        )
        same_layout = p in (FLOAT32, default, PATHS_BY_KEY["bf16_cl_ckpt"])
        rows.append(
            {
                "path": p.name,
                "step_s": t,
                "volumes_per_s": batch / t,
                "speedup_vs_float32": base / t,
                "speedup_vs_reference": (batch / t) / REFERENCE_VOLUMES_PER_S[resolution]
                if resolution in REFERENCE_VOLUMES_PER_S
                else None,
                "gflops": conv_only.flops / t / 1e9,
                "fraction_of_conv_only": conv_t / t if same_layout else None,
                "first_step_loss": first[p.name],
                "first_step_loss_rel_diff": abs(first[p.name] - first[FLOAT32.name]) / abs(first[FLOAT32.name]),
                "heldout_bits_per_voxel": heldout_bits[p.name],
            }
        )
    for key in ("conv-only, float32 contiguous", "conv-only, bfloat16 channels-last"):
        rows.append(
            {
                "path": key,
                "step_s": medians[key],
                "volumes_per_s": batch / medians[key],
                "gflops": conv_only.flops / medians[key] / 1e9,
            }
        )
    return {
        "resolution": resolution,
        "batch_size": batch,
        "steps": steps,
        "warmup": warmup,
        "gflop_per_step": conv_only.flops / 1e9,
        "rows": rows,
    }


def peak_resident_set_gb() -> float:
    """This process's peak resident set (VmHWM). Unlike ru_maxrss, it is not inherited from the parent across
    fork + exec, so a worker started by a large process reports its own peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # no /proc: ru_maxrss, in KiB


def peak_memory_of_training(resolution: int, path_key: str, device: str, steps: int = 2) -> dict:
    """``steps`` training steps in this process, as train.json runs them (with
    ``scripts.engine.training.configure_allocator(lean_memory=<activation checkpointing>)``); peak resident set (CPU) or max allocated (CUDA), in GB,
    and the time of the last step."""
    dev = torch.device(device)
    path = PATHS_BY_KEY[path_key]
    configure_allocator(lean_memory=path.activation_checkpointing)
    run = TrainingStep(resolution, path, dev)
    x = volumes(resolution, TRAIN_BATCH[resolution], seed=1)
    for i in range(steps):
        t = time.perf_counter()
        run.step(x, seed=i)
        _sync(dev)
        seconds = time.perf_counter() - t
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) / 1e9
        kind = "CUDA max allocated"
    else:
        peak = peak_resident_set_gb()
        kind = "peak resident set"
    return {
        "resolution": resolution,
        "batch_size": TRAIN_BATCH[resolution],
        "path": path.name,
        "peak_gb": peak,
        "kind": kind,
        "step_s": seconds,
    }


def bench_memory(cases: list[tuple[int, str]], device: torch.device, log) -> list[dict]:
    rows = []
    for resolution, key in cases:
        cmd = [sys.executable, "-m", "scripts.tools.benchmark", "memory_worker", str(resolution), key, str(device)]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if out.returncode != 0:
            rows.append(
                {
                    "resolution": resolution,
                    "batch_size": TRAIN_BATCH[resolution],
                    "path": PATHS_BY_KEY[key].name,
                    "error": out.stderr.strip().splitlines()[-1],
                }
            )
        else:
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        log(f"  memory {rows[-1]}")
    return rows


ALLOCATOR_SETTINGS = ("glibc default", "configure_allocator(lean_memory=False)")


def allocator_worker(kind: str, resolution: int, setting: str, repeats: int) -> None:
    """Run by :func:`bench_allocator` in a fresh process: ``repeats`` timed training steps (``kind='train'``,
    default path) or 1-volume samples (``kind='sample'``) after one untimed, under ``setting``; prints one JSON line."""
    if setting == ALLOCATOR_SETTINGS[1]:
        configure_allocator(lean_memory=False)
    elif setting != ALLOCATOR_SETTINGS[0]:
        raise ValueError(f"setting must be one of {ALLOCATOR_SETTINGS}, got {setting!r}")
    resolution, device = int(resolution), torch.device("cpu")
    if kind == "train":
        run = TrainingStep(resolution, PATHS_BY_KEY["bf16_cl"], device)
        x = volumes(resolution, TRAIN_BATCH[resolution], seed=1)
        fn = lambda i: run.step(x, seed=i)  # noqa: E731
    elif kind == "sample":
        net = build(resolution, PATHS_BY_KEY["bf16_cl"], device).eval()
        temperature = sampling_temperature()

        def fn(i: int) -> None:
            with autocast(device, "bfloat16"):
                net.sample(1, temperature=temperature, generator_seed=i)

    else:
        raise ValueError(f"kind must be 'train' or 'sample', got {kind!r}")
    times = []
    for i in range(int(repeats) + 1):
        t = time.perf_counter()
        fn(i)
        if i:
            times.append(time.perf_counter() - t)
    print(json.dumps({"times": times, "peak_gb": peak_resident_set_gb()}))


def bench_allocator(cases: list[tuple[str, int]], rounds: int, repeats: int, log) -> list[dict]:
    """glibc's default allocator against :func:`scripts.engine.training.configure_allocator` (``lean_memory=False``, what
    train.json without activation checkpointing and the sampling configs use): for every case, fresh processes
    alternate between the two settings ``rounds`` times; median time per step (or sample) and largest peak
    resident set over the processes of a setting."""
    rows = []
    for kind, resolution in cases:
        times: dict[str, list[float]] = {k: [] for k in ALLOCATOR_SETTINGS}
        peaks: dict[str, list[float]] = {k: [] for k in ALLOCATOR_SETTINGS}
        for _ in range(rounds):
            for setting in ALLOCATOR_SETTINGS:
                cmd = [
                    sys.executable,
                    "-m",
                    "scripts.tools.benchmark",
                    "allocator_worker",
                    kind,
                    str(resolution),
                    setting,
                    str(repeats),
                ]
                out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
                result = json.loads(out.stdout.strip().splitlines()[-1])
                times[setting] += result["times"]
                peaks[setting].append(result["peak_gb"])
        medians = {k: statistics.median(v) for k, v in times.items()}
        for setting in ALLOCATOR_SETTINGS:
            rows.append(
                {
                    "kind": kind,
                    "resolution": resolution,
                    "batch": TRAIN_BATCH[resolution] if kind == "train" else 1,
                    "setting": setting,
                    "seconds": medians[setting],
                    "speedup": medians[ALLOCATOR_SETTINGS[0]] / medians[setting],
                    "peak_gb": max(peaks[setting]),
                    "n": len(times[setting]),
                }
            )
            log(f"  allocator {rows[-1]}")
    return rows


def bench_sampling(resolutions: list[int], device: torch.device, repeats: int, log) -> list[dict]:
    """Seconds per call of ``sample(n)`` (n = 1, and 4 up to 64^3), bfloat16 channels-last, eval mode; the
    128^3 row carries a profile of where the time goes."""
    rows, temperature = [], sampling_temperature()
    for r in resolutions:
        net = build(r, PATHS_BY_KEY["bf16_cl"], device).eval()
        for n in (1, 4) if r <= 64 else (1,):

            def sample(i: int, n: int = n) -> None:
                with autocast(device, "bfloat16"):
                    net.sample(n, temperature=temperature, generator_seed=i)

            t = _median_times({"sample": sample}, repeats, 1, device)["sample"]
            row = {"resolution": r, "batch": n, "s_per_call": t, "volumes_per_s": n / t}
            if r == 128:
                from torch.profiler import profile

                with profile() as prof:
                    sample(0)
                row["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8)
            rows.append(row)
            log(f"  sampling {r}^3 batch {n}: {t:.2f} s per call")
    return rows


def bench_data_loading(steps: int, log) -> dict:
    """Fraction of training-step time spent waiting for the default pipeline (train.json: default data set,
    workers, caching, resolution and batch size), over ``steps`` steps after the first."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "train.json"))
    tmp = tempfile.mkdtemp(prefix="vdvae_bench_")
    parser["bundle_root"] = ROOT
    parser["output_dir"] = tmp
    loader = parser.get_parsed_content("train#dataloader")
    device = parser.get_parsed_content("device")
    run = TrainingStep(parser["resolution"], PATHS_BY_KEY["bf16_cl"], device)
    waits, totals = [], []
    it = iter(loader)
    for i in range(steps + 1):
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        run.step(batch["image"].as_tensor() if hasattr(batch["image"], "as_tensor") else batch["image"], seed=i)
        t2 = time.perf_counter()
        if i > 0:  # the first batch includes starting the workers
            waits.append(t1 - t0)
            totals.append(t2 - t0)
    result = {
        "num_workers": parser["num_workers"],
        "cache": parser["cache"],
        "resolution": parser["resolution"],
        "batch_size": parser["batch_size"],
        "steps": steps,
        "wait_fraction": sum(waits) / sum(totals),
        "median_wait_s": statistics.median(waits),
        "median_step_s": statistics.median(totals),
    }
    log(f"  data loading {result}")
    return result


def _fmt(v, digits=2) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


HEADER = [
    "Training figures are medians of per-step times measured side by side in one process (the paths of a",
    "configuration take turns step by step). `x float32` is the speed-up over this bundle's float32 contiguous",
    "path; `x reference` over the reference code's own training loop on this machine kind (1.2 volumes/s at",
    "32^3 batch 8, 0.084 at 64^3 batch 2: quoted from its users on this machine kind, not re-measured). GFLOP/s counts the",
    "convolutions' multiply-adds x 2 (forward + both backward products) analytically; `of conv-only` is the",
    "convolution-only model's step time divided by the path's (same convolutions, dtype and layout, run alone).",
    "Every row runs with `configure_allocator(lean_memory=False)`, as train.json runs the default path;",
    "train.json pairs activation checkpointing with `lean_memory=True`, whose cost shows in the memory",
    "table's step time. Loss: the ELBO loss",
    "(nats per volume) of every path's first step on the same batch from the same initial weights; held-out",
    "bits/voxel: discretised negative ELBO of held-out volumes after all the timed steps, float32 evaluation.",
    "",
]


def _training_section(t: dict) -> list[str]:
    lines = [
        f"## Training, reference {t['resolution']}^3 architecture, batch {t['batch_size']}",
        "",
        f"{t['gflop_per_step']:.1f} GFLOP of convolutions per step; {t['warmup']} warm-up steps, median of {t['steps']}.",
        "",
        "| path | s/step | volumes/s | x float32 | x reference | GFLOP/s | of conv-only "
        "| first-step loss (rel. diff. to float32) | held-out bits/voxel after the run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in t["rows"]:
        if "first_step_loss" in r:
            loss = f"{r['first_step_loss']:.1f} ({r['first_step_loss_rel_diff']:.1e})"
            lines.append(
                f"| {r['path']} | {_fmt(r['step_s'])} | {_fmt(r['volumes_per_s'])} | {_fmt(r['speedup_vs_float32'])} | "
                f"{_fmt(r['speedup_vs_reference'])} | {_fmt(r['gflops'], 0)} | {_fmt(r['fraction_of_conv_only'])} | "
                f"{loss} | {_fmt(r['heldout_bits_per_voxel'], 3)} |"
            )
        else:
            lines.append(
                f"| {r['path']} | {_fmt(r['step_s'])} | {_fmt(r['volumes_per_s'])} | | | {_fmt(r['gflops'], 0)} | 1.00 | | |"
            )
    return lines + [""]


def _memory_section(rows: list[dict]) -> list[str]:
    lines = [
        "## Peak memory of training (two steps, a fresh process per row)",
        "",
        "Each row runs as train.json runs it: `configure_allocator(lean_memory=True)` with activation",
        "checkpointing (glibc serves blocks >= 4 MiB by mmap), `lean_memory=False` without; `step s` is the",
        "second step's time in that process.",
        "",
        "| resolution | batch | path | peak GB | measured as | step s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['resolution']}^3 | {r['batch_size']} | {r['path']} | failed: {r['error']} | | |")
        else:
            lines.append(
                f"| {r['resolution']}^3 | {r['batch_size']} | {r['path']} | {r['peak_gb']:.2f} | {r['kind']} | {r['step_s']:.1f} |"
            )
    reference = (
        "Reference code on this machine kind (quoted from its users): 5.4 GB at 32^3 batch 8, "
        "8.9 GB at 64^3 batch 2, over 20 GB at 128^3 batch 1 (stopped)."
    )
    return lines + ["", reference, ""]


def _sampling_section(rows: list[dict]) -> list[str]:
    lines = [
        "## Sampling (bfloat16, channels-last, temperature 0.8)",
        "",
        "| resolution | batch | s per call | volumes/s |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['resolution']}^3 | {r['batch']} | {r['s_per_call']:.2f} | {r['volumes_per_s']:.2f} |" for r in rows
    ]
    for r in rows:
        if "profile" in r:
            lines += [
                "",
                f"Where the time of one {r['resolution']}^3 sample goes:",
                "",
                "```",
                r["profile"].rstrip(),
                "```",
            ]
    return lines + [""]


def _allocator_section(rows: list[dict]) -> list[str]:
    lines = [
        "## Allocator (glibc default against `configure_allocator(lean_memory=False)`)",
        "",
        "Fresh processes alternate between the two settings; bfloat16 channels-last; training steps of the",
        "default path, or 1-volume samples; median over all timed repeats, largest peak resident set.",
        "",
        "| work | resolution | batch | allocator | s per step or sample | speed-up | peak GB | timed repeats |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {'training step' if r['kind'] == 'train' else 'sample'} | {r['resolution']}^3 | {r['batch']} | {r['setting']} | "
            f"{r['seconds']:.2f} | {r['speedup']:.2f} | {r['peak_gb']:.2f} | {r['n']} |"
        )
    return lines + [""]


def _data_section(d: dict) -> list[str]:
    return [
        f"## Data loading (configs/train.json defaults: built-in data set, {d['resolution']}^3, batch {d['batch_size']})",
        "",
        f"num_workers={d['num_workers']}, cache={d['cache']!r}: {100 * d['wait_fraction']:.1f}% of step time waiting for data "
        f"over {d['steps']} steps (median wait {d['median_wait_s']:.3f} s, median step {d['median_step_s']:.2f} s).",
        "",
    ]


def write_markdown(results: dict, path: str) -> None:
    """Writes ``docs/performance.md`` from the benchmark's ``results``: the header, then one section per part measured."""
    measured = "; ".join(f"{k}: {v}" for k, v in results.get("measured_by", {}).items() if k in results)
    lines = ["# Performance", "", f"Measured on {results['machine']}; torch {torch.__version__}; {measured}.", *HEADER]
    for t in results.get("train", []):
        lines += _training_section(t)
    sections = {
        "memory": _memory_section,
        "sampling": _sampling_section,
        "allocator": _allocator_section,
        "data": _data_section,
    }
    for key, section in sections.items():
        if results.get(key):
            lines += section(results[key])
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main(
    sections: str | tuple = SECTIONS,
    resolutions: str | tuple = (32, 64),
    steps: int = 6,
    warmup: int = 2,
    quick: bool = False,
    output: str = os.path.join(ROOT, "docs", "performance.md"),
    device: str | None = None,
    merge: bool = True,
) -> None:
    """Runs the chosen ``sections`` and writes ``output`` (Markdown) and ``output`` with .json (raw figures).
    With ``merge``, sections not run this time are kept from an earlier run's .json (the Markdown says each
    section's command and date)."""
    sections = [sections] if isinstance(sections, str) else list(sections)
    resolutions = [int(r) for r in ([resolutions] if isinstance(resolutions, (int, str)) else resolutions)]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"sections must be among {', '.join(SECTIONS)}; got {sorted(unknown)}")
    bad = [r for r in resolutions if r not in REFERENCE_VOLUMES_PER_S]
    if bad:
        raise ValueError(f"resolutions must be among {sorted(REFERENCE_VOLUMES_PER_S)}, got {bad}")
    if quick:
        resolutions, steps, warmup = [32], 3, 1
    dev = torch.device(device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    configure_allocator(lean_memory=False)  # as train.json (without activation checkpointing) and inference.json
    machine = (
        torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} CPU threads"
    )
    results: dict = {
        "command": " ".join(["python -m scripts.tools.benchmark", *sys.argv[1:]]),
        "machine": machine,
        "date": time.strftime("%Y-%m-%d"),
    }

    def log(msg: str) -> None:
        print(msg, flush=True)

    raw_path = os.path.splitext(output)[0] + ".json"
    if merge and os.path.exists(raw_path):  # keep the sections of an earlier run that this run does not redo
        with open(raw_path) as f:
            earlier = json.load(f)
        results = {**{k: v for k, v in earlier.items() if k in SECTIONS}, **results}
        results["measured_by"] = {k: v for k, v in earlier.get("measured_by", {}).items() if k in results}
    this_run = f"`{results['command']}` ({results['date']})"
    results.setdefault("measured_by", {}).update({k: this_run for k in sections})

    def save() -> None:
        """Writes the Markdown table and the raw figures; called after every section, so a failure keeps the rest."""
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        write_markdown(results, output)
        with open(raw_path, "w") as f:
            json.dump(results, f, indent=1, default=str)

    if "train" in sections:
        results["train"] = []
        for r in resolutions:
            log(f"training {r}^3 ...")
            results["train"].append(bench_training(r, steps, warmup, dev, log))
            save()
    if "memory" in sections:
        log("peak memory ...")
        cases = [(r, k) for r in resolutions for k in ("float32", "bf16_cl", "bf16_cl_ckpt")]
        if not quick:
            cases += [(128, "bf16_cl_ckpt")]
        results["memory"] = bench_memory(cases, dev, log)
        save()
    if "sampling" in sections:
        log("sampling ...")
        results["sampling"] = bench_sampling(resolutions + ([] if quick else [128]), dev, 2 if quick else 3, log)
        save()
    if "allocator" in sections:
        log("allocator ...")
        cases = [("train", r) for r in resolutions] + [("sample", 64 if quick else 128)]
        results["allocator"] = bench_allocator(cases, 1 if quick else 2, 2 if quick else 3, log)
        save()
    if "data" in sections:
        log("data loading ...")
        results["data"] = bench_data_loading(4 if quick else 12, log)
        save()
    save()
    log(f"wrote {output}")


def memory_worker(resolution: int, path_key: str, device: str) -> None:
    """Run by :func:`bench_memory` in a fresh process; prints one JSON line."""
    print(json.dumps(peak_memory_of_training(int(resolution), path_key, device)))


if __name__ == "__main__":
    if sys.argv[1:2] == ["memory_worker"]:
        fire.Fire(memory_worker, command=sys.argv[2:])
    elif sys.argv[1:2] == ["allocator_worker"]:
        allocator_worker(*sys.argv[2:6])
    else:
        fire.Fire(main)
