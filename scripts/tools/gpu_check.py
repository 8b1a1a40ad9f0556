# Copyright 2026 The VDVAE bundle authors. Licensed under the Apache License, Version 2.0.
"""The GPU path, measured in one run (at most about 8 minutes on one GPU); writes ``docs/performance_gpu.md`` and
its ``.json``:

1. precision: one training step of the reference 32^3 architecture on the same batch and noise in float32, bfloat16
   autocast and float16 autocast with a gradient scaler: the loss and each part's gradient norm, and their relative
   difference from float32;
2. training volumes/s of the reference 32^3, 64^3 and 128^3 presets (their batch sizes, the bundle's bfloat16) with
   contiguous tensors, with ``channels_last_3d``, and with ``channels_last_3d`` plus ``cudnn.benchmark``;
3. peak memory of a 128^3 training step (batch 1) with and without activation checkpointing;
4. sampling seconds per volume at each preset's resolution;
5. a one-process ``torchrun`` of ``train.json`` + ``multi_gpu_train.json`` (NCCL on CUDA, Gloo on CPU) on a small
   cohort.

CLI (from the bundle root)::

    python -m scripts.tools.gpu_check                                     # cuda:0 -> docs/performance_gpu.md
    python -m scripts.tools.gpu_check --device cpu --tiny True --output /tmp/gpu_check.md   # the tests' smoke run

``--tiny True`` replaces the presets by a 16^3 network of width 8 (and skips nothing else), so that every code path
runs in seconds; its figures say nothing about speed.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import fire
import numpy as np
import torch

from scripts.engine.default_data import generate_mni_cohort
from scripts.engine.training import autocast
from scripts.tools.benchmark import architecture, volumes
from scripts.vdvae.loss import ELBOLoss
from scripts.vdvae.network import ARCHITECTURE_LISTS, VDVAE

__all__ = ["gpu_check", "tiny_architecture"]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRESET_BATCH = {32: 64, 64: 8, 128: 1}  # the reference presets' batch sizes (configs/vdvae_<R>.json)
LAYOUTS = [  # (name, channels_last_3d, cudnn.benchmark)
    ("contiguous", False, False),
    ("channels_last_3d", True, False),
    ("channels_last_3d + cudnn.benchmark", True, True),
]


def tiny_architecture(resolution: int = 16, width: int = 8) -> dict:
    """A small VDVAE at ``resolution``^3 (one latent group per level, two at the top) for smoke runs."""
    levels = resolution.bit_length()
    kernels = [3] * (levels - 2) + [2, 1]
    widths = {
        k: [width] * levels for k in ARCHITECTURE_LISTS if k.startswith("channels") and k != "channels_per_latent"
    }
    return {
        "resolution": resolution,
        **widths,
        "channels_per_latent": [4] * levels,
        "latent_feature_maps_per_resolution": [1] * (levels - 1) + [2],
        "kernel_sizes_bottom_up": kernels,
        "kernel_sizes_top_down": kernels,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _network(arch: dict, device: torch.device, channels_last: bool = False, checkpointing: bool = False) -> VDVAE:
    torch.manual_seed(0)
    net = VDVAE(**arch, activation_checkpointing=checkpointing).to(device).train()
    return net.to(memory_format=torch.channels_last_3d) if channels_last else net


def _step(net: VDVAE, x: torch.Tensor, amp: str, scaler=None, optimizer=None) -> tuple[float, dict[str, float]]:
    """One training step's loss and per-part gradient norms (unscaled); updates the weights when ``optimizer``."""
    net.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same posterior noise for every precision
    with autocast(x.device, amp):
        mean, scale, kl = net.forward_train(x)
    loss = ELBOLoss()(x, mean, scale, kl)["loss"]
    if scaler is not None:
        scaler.scale(loss).backward()
        if optimizer is not None:
            scaler.unscale_(optimizer)
        else:
            inv = 1.0 / scaler.get_scale()
            for p in net.parameters():
                if p.grad is not None:
                    p.grad.mul_(inv)
    else:
        loss.backward()
    norms = {
        name: float(
            torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in params if p.grad is not None]))
        )
        for name, params in net.clipping_groups().items()
    }
    if optimizer is not None:
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    return float(loss.detach()), norms


def precision_agreement(arch: dict, batch: int, device: torch.device) -> list[dict]:
    """float32, bfloat16 and float16-with-scaler (CUDA only) steps on the same batch, weights and noise."""
    x = volumes(arch["resolution"], batch, seed=0).to(device)
    rows, reference = [], None
    for amp in ("none", "bfloat16", "float16"):
        if amp == "float16" and device.type != "cuda":
            rows.append({"precision": "float16 + GradScaler", "note": "CUDA only"})
            continue
        net = _network(arch, device)
        scaler = torch.amp.GradScaler("cuda") if amp == "float16" else None
        loss, norms = _step(net, x, amp, scaler)
        row = {"precision": {"none": "float32", "bfloat16": "bfloat16", "float16": "float16 + GradScaler"}[amp]}
        row.update({"loss": loss, "grad_norms": norms})
        if reference is None:
            reference = row
        else:
            row["loss_rel_diff"] = abs(loss - reference["loss"]) / max(abs(reference["loss"]), 1e-12)
            row["grad_norm_rel_diff_max"] = max(
                abs(norms[k] - reference["grad_norms"][k]) / max(reference["grad_norms"][k], 1e-12) for k in norms
            )
        rows.append(row)
    return rows


def training_throughput(cases: list[tuple[str, dict, int]], device: torch.device, steps: int) -> list[dict]:
    """Volumes/s of ``steps`` timed bfloat16 training steps (after 2 untimed) per case and memory layout."""
    rows = []
    for name, arch, batch in cases:
        x0 = volumes(arch["resolution"], batch, seed=0).to(device)
        for layout, channels_last, benchmark in LAYOUTS:
            torch.backends.cudnn.benchmark = benchmark
            net = _network(arch, device, channels_last)
            optimizer = torch.optim.Adamax(net.parameters(), lr=1e-3)
            x = x0.contiguous(memory_format=torch.channels_last_3d) if channels_last else x0
            for _ in range(2):
                _step(net, x, "bfloat16", optimizer=optimizer)
            _sync(device)
            tic = time.perf_counter()
            for _ in range(steps):
                _step(net, x, "bfloat16", optimizer=optimizer)
            _sync(device)
            seconds = (time.perf_counter() - tic) / steps
            rows.append({"preset": name, "batch": batch, "layout": layout, "volumes_per_s": batch / seconds})
            del net, optimizer
        torch.backends.cudnn.benchmark = False
    return rows


def peak_memory(arch: dict, device: torch.device) -> list[dict]:
    """Peak allocated memory (GB) of one bfloat16 training step of batch 1, with and without activation
    checkpointing (CUDA's allocator statistics; not measured on CPU)."""
    rows = []
    for checkpointing in (False, True):
        row = {"resolution": arch["resolution"], "activation_checkpointing": checkpointing}
        if device.type != "cuda":
            rows.append({**row, "note": "CUDA only"})
            continue
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        net = _network(arch, device, channels_last=True, checkpointing=checkpointing)
        optimizer = torch.optim.Adamax(net.parameters(), lr=1e-3)
        x = volumes(arch["resolution"], 1, seed=0).to(device).contiguous(memory_format=torch.channels_last_3d)
        try:
            _step(net, x, "bfloat16", optimizer=optimizer)
            _sync(device)
            row["peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        except torch.OutOfMemoryError as e:
            row["note"] = f"out of memory: {str(e)[:120]}"
        rows.append(row)
        del net, optimizer
    return rows


def sampling_speed(cases: list[tuple[str, dict, int]], device: torch.device, repeats: int) -> list[dict]:
    """Seconds per volume of ``sample(1)`` in bfloat16 (median of ``repeats`` after one untimed)."""
    rows = []
    for name, arch, _ in cases:
        net = _network(arch, device, channels_last=True).eval()
        times = []
        for i in range(repeats + 1):
            _sync(device)
            tic = time.perf_counter()
            with torch.no_grad(), autocast(device, "bfloat16"):
                net.sample(1, temperature=1.0, generator_seed=i)
            _sync(device)
            times.append(time.perf_counter() - tic)
        rows.append({"preset": name, "seconds_per_volume": float(np.median(times[1:]))})
    return rows


def torchrun_one_process(device: torch.device, tiny: bool, work_dir: str) -> dict:
    """``torchrun --standalone --nproc_per_node 1`` of train.json + multi_gpu_train.json for one epoch on 8 volumes
    of the built-in cohort at 16^3 (the tiny network when ``tiny``, else the default one at 32^3)."""
    data = os.path.join(work_dir, "cohort")
    generate_mni_cohort(data, number_of_files=8, voxels_per_axis=32, seed=0)
    arch = tiny_architecture(16) if tiny else {"resolution": 32}
    overrides = {
        "dataset_dir": data,
        "output_dir": os.path.join(work_dir, "run"),
        "model_path": os.path.join(work_dir, "run", "model.pt"),
        "max_epochs": 1,
        "batch_size": 2,
        "train_frac": 0.75,
        "latent_prior_resolution": 0,
        **arch,
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "monai.bundle"]
    cmd += ["run", "--config_file", "['configs/train.json','configs/multi_gpu_train.json']"]
    for k, v in overrides.items():
        cmd += [f"--{k}", v if isinstance(v, str) else json.dumps(v)]
    tic = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    return {
        "backend": "nccl" if device.type == "cuda" else "gloo",
        "returncode": proc.returncode,
        "seconds": time.perf_counter() - tic,
        "weights_written": os.path.isfile(overrides["model_path"]),
        "log_tail": (proc.stdout + proc.stderr)[-1500:] if proc.returncode else "",
    }


def gpu_check(
    device: str = "cuda",
    tiny: bool = False,
    output: str = "docs/performance_gpu.md",
    steps: int = 5,
    repeats: int = 3,
) -> dict:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device here: run on a GPU machine, or --device cpu --tiny True for a smoke run")
    if tiny:
        cases = [("tiny 16^3", tiny_architecture(16), 2)]
        arch32 = arch128 = tiny_architecture(16)
    else:
        cases = [(f"reference {r}^3", architecture(r), PRESET_BATCH[r]) for r in (32, 64, 128)]
        arch32, arch128 = architecture(32), architecture(128)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "CPU")
    report = {
        "device": f"{name} ({device})",
        "torch": torch.__version__,
        "tiny": bool(tiny),
        "precision": precision_agreement(arch32, 2 if tiny else 4, device),
        "training": training_throughput(cases, device, 1 if tiny else steps),
        "memory_128": peak_memory(arch128, device),
        "sampling": sampling_speed(cases, device, 1 if tiny else repeats),
    }
    with tempfile.TemporaryDirectory() as work:
        report["torchrun"] = torchrun_one_process(device, tiny, work)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(os.path.splitext(output)[0] + ".json", "w") as f:
        json.dump(report, f, indent=1)
    with open(output, "w") as f:
        f.write(markdown(report))
    return report


def _g(v, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}g}"


def markdown(report: dict) -> str:
    """The report as ``docs/performance_gpu.md``."""
    lines = [
        "# GPU performance",
        "",
        f"Measured by `python -m scripts.tools.gpu_check` on {report['device']}, torch {report['torch']}"
        + (" (tiny smoke run: the figures say nothing about speed)" if report["tiny"] else "")
        + ".",
        "",
        "## One training step in three precisions (same batch, weights and noise)",
        "",
        "| precision | loss | max relative gradient-norm difference from float32 | loss relative difference |",
        "|---|---|---|---|",
    ]
    for r in report["precision"]:
        if "note" in r:
            lines.append(f"| {r['precision']} | {r['note']} | | |")
        else:
            lines.append(
                f"| {r['precision']} | {r['loss']:.6g} | {_g(r.get('grad_norm_rel_diff_max'))} "
                f"| {_g(r.get('loss_rel_diff'))} |"
            )
    lines += ["", "## Training volumes per second (bfloat16)", "", "| preset | batch | layout | volumes/s |"]
    lines += ["|---|---|---|---|"]
    lines += [
        f"| {r['preset']} | {r['batch']} | {r['layout']} | {r['volumes_per_s']:.3g} |" for r in report["training"]
    ]
    lines += ["", "## Peak memory of a 128^3 training step (batch 1, bfloat16)", ""]
    lines += ["| activation checkpointing | peak allocated (GB) |", "|---|---|"]
    lines += [
        f"| {r['activation_checkpointing']} | {_g(r.get('peak_gb')) if 'peak_gb' in r else r.get('note')} |"
        for r in report["memory_128"]
    ]
    lines += ["", "## Sampling", "", "| preset | seconds per volume |", "|---|---|"]
    lines += [f"| {r['preset']} | {r['seconds_per_volume']:.3g} |" for r in report["sampling"]]
    t = report["torchrun"]
    lines += [
        "",
        "## torchrun, one process",
        "",
        f"`torchrun --standalone --nproc_per_node=1 -m monai.bundle run --config_file "
        f"\"['configs/train.json','configs/multi_gpu_train.json']\"` ({t['backend']}): "
        + ("finished" if t["returncode"] == 0 else f"FAILED (exit {t['returncode']})")
        + f" in {t['seconds']:.0f} s, weights written: {t['weights_written']}.",
    ]
    if t["log_tail"]:
        lines += ["", "```text", t["log_tail"], "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    fire.Fire(gpu_check)
