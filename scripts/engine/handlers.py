# Copyright 2026 The VDVAE bundle authors. Licensed under the Apache License, Version 2.0.
"""Small Ignite handlers MONAI lacks: per-epoch reseeding, atomic checkpoints with resume lookup, the best-model
export, TensorBoard 3-plane images and the pre-training pipeline visualisation."""

from __future__ import annotations

import logging
import os
import random
import re
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from torch import nn
from torch.optim.swa_utils import AveragedModel

from scripts.engine.data import atomic_write_json
from scripts.engine.sampling import draw_samples
from scripts.engine.visualisation import montage, plot_volume_rows

__all__ = [
    "ReseedEachEpoch",
    "TrainingCheckpoint",
    "latest_checkpoint",
    "BestModelSaver",
    "VolumeImageLogger",
    "visualise_pipeline",
    "is_main_process",
    "WallClockSnapshots",
]

logger = logging.getLogger(__name__)
CHECKPOINT_RE = re.compile(r"^checkpoint_(\d+)\.pt$")


def is_main_process() -> bool:
    """True on the process that logs and writes files: rank 0 under torchrun, or a single-process run."""
    return int(os.environ.get("RANK", "0")) == 0


class ReseedEachEpoch:
    """At every EPOCH_STARTED, seeds torch/numpy/random and the training transforms with ``seed + epoch`` (plus
    ``RANK_SEED_STRIDE * rank`` under torchrun, so that ranks draw independent augmentations and latent noise,
    as the volumes of one large batch would), so a run resumed at an epoch boundary draws the same
    augmentations, shuffles and latent noise as an unbroken one."""

    RANK_SEED_STRIDE = 100_003

    def __init__(self, seed: int, transform=None) -> None:
        self.seed = int(seed)
        self.transform = transform

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        seed = self.seed + engine.state.epoch + self.RANK_SEED_STRIDE * int(os.environ.get("RANK", "0"))
        torch.manual_seed(seed)  # CPU and CUDA generators (shuffling, worker seeds, latent noise)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        if self.transform is not None and hasattr(self.transform, "set_random_state"):
            self.transform.set_random_state(seed=seed)


def latest_checkpoint(ckpt_dir: str) -> str | None:
    """Path of the newest ``checkpoint_<iteration>.pt`` in ``ckpt_dir``, or None."""
    if not os.path.isdir(ckpt_dir):
        return None
    found = [(int(m.group(1)), f) for f in os.listdir(ckpt_dir) if (m := CHECKPOINT_RE.match(f))]
    return os.path.join(ckpt_dir, max(found)[1]) if found else None


class TrainingCheckpoint:
    """Full training state saved atomically (write to a temporary file, then rename: Ignite's
    ``DiskSaver(atomic=True)``) as ``ckpt_dir/checkpoint_<iteration>.pt`` at every epoch end and, when
    ``save_every_n_iterations`` > 0, every N iterations. The previous file is removed only after a newer one
    exists unless ``keep_every_checkpoint``. Only the main process writes.

    ``objects`` maps names to objects with ``state_dict``/``load_state_dict`` (trainer, network, optimizer, EMA,
    gradient skipper, data split, best-model saver, ...); None entries are dropped.
    """

    def __init__(
        self, ckpt_dir: str, objects: dict, save_every_n_iterations: int = 0, keep_every_checkpoint: bool = False
    ) -> None:
        self.objects = {k: v for k, v in objects.items() if v is not None}
        self.every = int(save_every_n_iterations)
        self.ckpt_dir = ckpt_dir
        self.checkpoint = Checkpoint(
            self.objects,
            DiskSaver(ckpt_dir, atomic=True, require_empty=False, create_dir=True),
            filename_prefix="",
            n_saved=None if keep_every_checkpoint else 2,
            global_step_transform=lambda engine, _: engine.state.iteration,
        )

    def attach(self, engine: Engine) -> None:
        if not is_main_process():
            return
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._save)
        if self.every > 0:
            engine.add_event_handler(
                Events.ITERATION_COMPLETED(
                    event_filter=lambda e, it: (
                        it % self.every == 0 and (e.state.epoch_length is None or it % e.state.epoch_length != 0)
                    )
                ),
                self._save,
            )

    def _save(self, engine: Engine) -> None:
        self.checkpoint(engine)


class BestModelSaver:
    """After each validation, writes the network's weights (the EMA's when ``ema`` is given) as a plain state
    dict to ``path`` (``models/model.pt``) when the key metric ``metric_name`` improved (lower is better unless
    ``higher_is_better``), and next to it
    ``model.json``: the training grid's affine and intensity window from ``data`` (used by inference to write
    samples that overlay the training data) and the network's ``function_options()`` (checked when the weights are
    loaded). Both atomic."""

    def __init__(
        self,
        network: nn.Module,
        path: str,
        ema: AveragedModel | None = None,
        data=None,
        metric_name: str = "val_neg_elbo_nats",
        higher_is_better: bool = False,
    ) -> None:
        self.network = network
        self.sign = -1.0 if higher_is_better else 1.0
        self.data = data
        self.ema = ema
        self.path = path
        self.metric_name = metric_name
        self.best = self.sign * float("inf")
        self.best_epoch = -1

    def attach(self, engine: Engine) -> None:
        if is_main_process():
            engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        value = float(engine.state.metrics[self.metric_name])
        if self.sign * value < self.sign * self.best:
            self.best, self.best_epoch = value, int(engine.state.epoch)
            source = self.ema.module if self.ema is not None else self.network
            state = {k: v.detach().cpu() for k, v in source.state_dict().items()}
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{self.path}.tmp{os.getpid()}"
            torch.save(state, tmp)
            os.replace(tmp, self.path)
            info = {
                **(self.data.preprocessing_info if self.data is not None else {}),
                "metric": self.metric_name,
                "value": value,
                "epoch": self.best_epoch,
            }
            if callable(getattr(source, "function_options", None)):  # checked when the weights are loaded
                info["network_options"] = source.function_options()
            atomic_write_json(os.path.splitext(self.path)[0] + ".json", info)
            logger.info(
                f"epoch {self.best_epoch}: {self.metric_name} {value:.5f} is the best so far; saved {self.path}"
            )

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch = float(state["best"]), int(state["best_epoch"])


class VolumeImageLogger:
    """Attached to the evaluator: after each validation run, logs 3-plane slices of the first validation batch,
    its reconstructions (posterior means) and ``num_samples`` samples at ``temperature`` to TensorBoard, at
    the trainer's epoch. The samples are those of the stream ``seed`` (:func:`scripts.engine.sampling.draw_samples`):
    the same noise every epoch, so the TensorBoard images show one set of samples as the model learns."""

    def __init__(
        self,
        summary_writer,
        network: nn.Module,
        ema: AveragedModel | None = None,
        num_samples: int = 4,
        temperature: float = 1.0,
        max_volumes: int = 4,
        seed: int = 0,
    ) -> None:
        self.writer = summary_writer
        self.network = network
        self.ema = ema
        self.num_samples = int(num_samples)
        self.temperature = float(temperature)
        self.max_volumes = int(max_volumes)
        self.seed = int(seed)
        self._first: dict | None = None

    def attach(self, engine: Engine) -> None:
        if not is_main_process():
            return
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._keep_first)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _keep_first(self, engine: Engine) -> None:
        out = engine.state.output
        if out.get("recon") is not None:
            self._first = {
                "image": out["image"][: self.max_volumes].cpu(),
                "recon": out["recon"][: self.max_volumes].cpu(),
            }

    def __call__(self, engine: Engine) -> None:
        step = engine.state.epoch
        if self._first is not None:
            self.writer.add_image("val/inputs", montage(self._first["image"]), step, dataformats="HW")
            self.writer.add_image("val/reconstructions", montage(self._first["recon"]), step, dataformats="HW")
        if self.num_samples > 0:
            vae = self.ema.module if self.ema is not None else self.network
            vae.eval()
            with torch.no_grad():
                samples = draw_samples(vae, self.temperature, self.seed, range(self.num_samples))
            self.writer.add_image(f"samples/t{self.temperature:g}", montage(samples), step, dataformats="HW")
        self.writer.flush()


def visualise_pipeline(enabled: bool, dataset, output_dir: str, num_examples: int = 8) -> str | None:
    """When ``enabled``, writes ``num_examples`` augmented training examples to ``output_dir/pipeline_test``
    as NIfTI files and one PNG montage (the reference's visualise_training_pipeline_before_starting)."""
    if not enabled or not is_main_process():
        return None
    folder = os.path.join(output_dir, "pipeline_test")
    os.makedirs(folder, exist_ok=True)
    vols = []
    for i in range(min(num_examples, len(dataset))):
        img = dataset[i]["image"]
        arr = torch.as_tensor(img).float().cpu().numpy()
        affine = np.asarray(getattr(img, "affine", torch.eye(4)), dtype=np.float64)
        nib.save(nib.Nifti1Image(arr[0], affine), os.path.join(folder, f"example_{i:03d}.nii.gz"))
        vols.append(arr)
    path = plot_volume_rows(
        {f"example {i}": [v] for i, v in enumerate(vols)},
        os.path.join(folder, "montage.png"),
        title="augmented training examples (training pipeline)",
    )
    logger.info(f"wrote {len(vols)} augmented training examples to {folder}")
    return path


class WallClockSnapshots:
    """Saves the weights at fixed wall-clock times since the trainer started, then stops it after the last one.

    For quality-over-time measurements (``scripts.tools.quality_benchmark``): at the first iteration that ends at or after
    each of ``times_s`` (seconds, validation included, since a real run spends that time too) it writes
    ``folder/snapshot_<t>s.pt`` = {"network": state dict, "ema": the EMA's state dict or None, "elapsed_s",
    "iteration", "epoch", "skipped_updates"}.
    """

    def __init__(self, times_s, folder: str, network: nn.Module, ema: AveragedModel | None = None) -> None:
        self.times = sorted(float(t) for t in times_s)
        if not self.times or self.times[0] <= 0:
            raise ValueError(f"times_s must be a non-empty list of positive seconds, got {times_s!r}")
        self.folder, self.network, self.ema = folder, network, ema
        self.start = 0.0
        self.written: list[str] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _started(self, engine: Engine) -> None:
        self.start = time.perf_counter()

    def __call__(self, engine: Engine) -> None:
        elapsed = time.perf_counter() - self.start
        while len(self.written) < len(self.times) and elapsed >= self.times[len(self.written)]:
            t = self.times[len(self.written)]
            path = os.path.join(self.folder, f"snapshot_{t:g}s.pt")
            os.makedirs(self.folder, exist_ok=True)
            ema = self.ema.module.state_dict() if self.ema is not None else None
            torch.save(
                {
                    "network": {k: v.detach().cpu() for k, v in self.network.state_dict().items()},
                    "ema": {k: v.detach().cpu() for k, v in ema.items()} if ema is not None else None,
                    "elapsed_s": elapsed,
                    "iteration": int(engine.state.iteration),
                    "epoch": int(engine.state.epoch),
                    "skipped_updates": int(getattr(engine.state, "skipped_updates", 0)),
                },
                path,
            )
            self.written.append(path)
            logger.info(f"snapshot at {elapsed:.0f} s (iteration {engine.state.iteration}): {path}")
        if len(self.written) == len(self.times):
            engine.terminate()
