# Copyright 2026 The VDVAE bundle authors. Licensed under the Apache License, Version 2.0.
"""Sampling workflow pieces for configs/inference.json: a data set of sample requests, an evaluator step
that draws them in batches, and a handler that streams them to NIfTI files on the training grid."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.engines import SupervisedEvaluator

from scripts.trainer import autocast
from scripts.visualisation import montage, save_png

__all__ = ["SampleRequests", "SamplingEvaluator", "PriorSampler", "SampleWriter", "load_weights", "preprocessing_sidecar"]

logger = logging.getLogger(__name__)


def preprocessing_sidecar(model_path: str) -> str:
    """Path of the JSON written next to the weights: training grid affine and intensity statistics."""
    return os.path.splitext(model_path)[0] + ".json"


def load_weights(network: torch.nn.Module, path: str, device: torch.device | str) -> torch.nn.Module:
    """Loads a plain state dict into ``network``; errors name the file and the mismatch."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no weights at {path!r}: train first (models/model.pt) or pass --ckpt_path")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "network" in state and isinstance(state["network"], dict):
        state = state["network"]  # a full training checkpoint
    try:
        network.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(
            f"{path}: weights of another architecture than this config's network_def (use the same resolution and "
            f"per-level lists as in training, e.g. the same vdvae_*.json overlay): {str(e).splitlines()[0]}"
        ) from e
    return network.to(device).eval()


class SampleRequests(torch.utils.data.Dataset):
    """``num_samples`` requests per temperature: items {"index", "temperature"}."""

    def __init__(self, num_samples: int, temperature: float | Sequence[float]) -> None:
        temps = [float(t) for t in (temperature if isinstance(temperature, Sequence) else [temperature])]
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if not temps or any(t <= 0 for t in temps):
            raise ValueError(f"temperature must be positive (a number or a list), got {temperature}")
        self.items = [{"index": i, "temperature": t} for t in temps for i in range(num_samples)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class SamplingEvaluator(SupervisedEvaluator):
    """Draws the samples of each batch of requests with ``network.sample`` (one temperature per batch: the
    data loader must not mix temperatures, which holds when batches do not straddle them). Batch b is seeded
    with ``seed + b``, so a run is deterministic for a seed and batch size."""

    def __init__(self, *args, seed: int = 0, amp_mode: str = "none", **kwargs) -> None:
        kwargs["amp"] = False
        kwargs.setdefault("decollate", False)
        super().__init__(*args, **kwargs)
        self.seed = int(seed)
        self.amp_mode = amp_mode

    def _iteration(self, engine: SamplingEvaluator, batchdata: dict) -> dict:
        temps = batchdata["temperature"].tolist()
        out = []
        torch.manual_seed(engine.seed + engine.state.iteration - 1)
        with torch.no_grad(), autocast(engine.state.device, engine.amp_mode):
            start = 0
            while start < len(temps):  # group consecutive requests that share a temperature
                stop = start
                while stop < len(temps) and temps[stop] == temps[start]:
                    stop += 1
                out.append(engine.inferer(stop - start, engine.network, temps[start]))
                start = stop
        engine.state.output = {"pred": torch.cat(out).float(), "index": batchdata["index"], "temperature": batchdata["temperature"]}
        return engine.state.output


class PriorSampler:
    """Inferer: ``network.sample(n, temperature)`` -> (n, 1, R, R, R) on [-1, 1]."""

    def __call__(self, n: int, network: torch.nn.Module, temperature: float) -> torch.Tensor:
        return network.sample(n, temperature)


class SampleWriter:
    """Writes each sample as ``output_dir/sample_t<T>_<index>.nii.gz`` on the training grid (affine from the
    sidecar JSON of the weights), intensities mapped from [-1, 1] back to the training set's window, and at the
    end ``output_dir/samples.png`` (3-plane rows of the first ``montage_size`` samples)."""

    def __init__(self, output_dir: str, model_path: str, montage_size: int = 8) -> None:
        self.output_dir = output_dir
        self.montage_size = int(montage_size)
        sidecar = preprocessing_sidecar(model_path)
        info = json.load(open(sidecar)) if os.path.isfile(sidecar) else {}
        if not info:
            logger.warning(f"{sidecar} not found: writing samples with an identity affine and [-1, 1] intensities")
        self.affine = np.asarray(info.get("affine", np.eye(4)), dtype=np.float64)
        self.low = float(info.get("intensity_low", -1.0))
        self.high = float(info.get("intensity_high", 1.0))
        self._shown: list[np.ndarray] = []
        self.written: list[str] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda e: os.makedirs(self.output_dir, exist_ok=True))
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._write)
        engine.add_event_handler(Events.COMPLETED, self._montage)

    def _write(self, engine: Engine) -> None:
        out = engine.state.output
        for vol, idx, t in zip(out["pred"].cpu().numpy(), out["index"].tolist(), out["temperature"].tolist()):
            data = self.low + (vol[0] + 1.0) / 2.0 * (self.high - self.low)
            path = os.path.join(self.output_dir, f"sample_t{t:g}_{idx:05d}.nii.gz")
            nib.save(nib.Nifti1Image(data.astype(np.float32), self.affine), path)
            self.written.append(path)
            if len(self._shown) < self.montage_size:
                self._shown.append(vol)

    def _montage(self, engine: Engine) -> None:
        if self._shown:
            save_png(montage(np.stack(self._shown)), os.path.join(self.output_dir, "samples.png"))
        logger.info(f"wrote {len(self.written)} samples to {self.output_dir}")
