# Copyright 2026 The VDVAE bundle authors. Licensed under the Apache License, Version 2.0.
"""Inference workflow pieces.

configs/inference.json (sampling): a data set of sample requests, an evaluator step that draws them in batches,
and a handler that streams them to NIfTI files on the training grid.

configs/reconstruct.json (reconstruction): an inferer that gives the full and the "progressive"
reconstructions of a batch, and a handler that writes them as NIfTI files and PNG montages.
"""

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
from monai.inferers import Inferer

from scripts.engine.training import autocast
from scripts.engine.visualisation import counterfactual_figure, plot_volume_rows, save_figure

__all__ = [
    "draw_samples",
    "sample_seed",
    "nifti_array",
    "SampleRequests",
    "SamplingEvaluator",
    "PriorSampler",
    "SampleWriter",
    "ProgressiveReconstructor",
    "ReconstructionWriter",
    "load_weights",
    "check_function_options",
    "preprocessing_sidecar",
    "read_sidecar",
    "check_sampling_options",
    "save_nifti",
]

logger = logging.getLogger(__name__)


def preprocessing_sidecar(model_path: str) -> str:
    """Path of the JSON written next to the weights: training grid affine and intensity statistics."""
    return os.path.splitext(model_path)[0] + ".json"


TRAIN_COMMAND = "python -m monai.bundle run --config_file configs/train.json"


def load_weights(
    network: torch.nn.Module,
    path: str,
    device: torch.device | str,
    option: str = "ckpt_path",
    made_by: str = TRAIN_COMMAND,
) -> torch.nn.Module:
    """Loads a plain state dict into ``network``; errors name the file and the mismatch. A missing file names the
    config ``option`` that points to it and the command ``made_by`` that writes it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no weights at {path!r} (--{option}): make them with {made_by}, or pass --{option}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated files, TorchScript archives, pickles of other objects
        raise ValueError(
            f"{path}: not a readable PyTorch state dict ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from e
    if isinstance(state, dict) and "network" in state and isinstance(state["network"], dict):
        state = state["network"]  # a full training checkpoint
    if not isinstance(state, dict):
        raise ValueError(
            f"{path}: expected a state dict of network_def (models/model.pt), got a {type(state).__name__}"
        )
    expected = set(network.state_dict())
    if (("x_scale" in expected) != ("x_scale" in state)) and expected ^ set(state) == {"x_scale"}:
        trained = "a per-voxel" if "x_scale" not in state else "a shared"
        raise ValueError(
            f"{path}: weights trained with {trained} output scale; pass --shared_x_scale "
            f"{'False' if 'x_scale' not in state else 'True'} (train.json's default is shared since 3.0.0)"
        )
    try:
        network.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(
            f"{path}: weights of another architecture than this config's network_def (use the same resolution and "
            f"per-level lists as in training, e.g. the same vdvae_*.json overlay): {str(e).splitlines()[0]}"
        ) from e
    check_function_options(network, path)
    return network.to(device).eval()


def _as_option(value) -> str:
    """A value as one would write it after ``--key`` on the command line."""
    return f"'{json.dumps(value, separators=(',', ':'))}'" if isinstance(value, list) else str(value)


def check_function_options(network: torch.nn.Module, path: str) -> None:
    """Stops when the options recorded next to the weights at ``path`` (``network_options`` of its sidecar JSON,
    written by training and by the reference converter) differ from ``network.function_options()``: the same
    tensors would compute another function. The error names each option and the ``--key value`` to pass."""
    sidecar = preprocessing_sidecar(path)
    if not callable(getattr(network, "function_options", None)) or not os.path.isfile(sidecar):
        return
    with open(sidecar) as f:
        recorded = json.load(f).get("network_options", {})
    current = json.loads(json.dumps(network.function_options()))  # tuples as lists, as in the JSON
    differ = sorted(k for k in recorded if k in current and recorded[k] != current[k])
    if differ:
        raise ValueError(
            f"{path}: these weights were made with "
            + ", ".join(f"{k} {_as_option(recorded[k])}" for k in differ)
            + f" ({sidecar}), but this config's network_def has "
            + ", ".join(f"{k} {_as_option(current[k])}" for k in differ)
            + ", which computes another function with the same tensors: pass "
            + " ".join(f"--{k} {_as_option(recorded[k])}" for k in differ)
            + " (or the preset overlay the weights were made with, e.g. configs/vdvae_32.json)"
        )


def read_sidecar(model_path: str) -> dict:
    """The sidecar of :func:`preprocessing_sidecar` as a dict ({} with a warning when it is missing)."""
    sidecar = preprocessing_sidecar(model_path)
    if not os.path.isfile(sidecar):
        logger.warning(f"{sidecar} not found: writing with an identity affine and [-1, 1] intensities")
        return {}
    with open(sidecar) as f:
        return json.load(f)


def check_sampling_options(num_samples: int, temperature: float | Sequence[float]) -> list[float]:
    """Validates ``num_samples`` (> 0) and ``temperature`` (a number or a non-empty list, each > 0); returns
    the temperatures as a list. Errors name the option and the value."""
    temps = (
        list(temperature) if isinstance(temperature, Sequence) and not isinstance(temperature, str) else [temperature]
    )
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
        raise ValueError(f"num_samples must be positive (an integer >= 1), got {num_samples!r}")
    try:
        temps = [float(t) for t in temps]
    except (TypeError, ValueError):
        raise ValueError(f"temperature must be positive (a number or a list), got {temperature!r}") from None
    if not temps or any(not t > 0 for t in temps):
        raise ValueError(f"temperature must be positive (a number or a list), got {temperature!r}")
    return temps


def save_nifti(volume: np.ndarray, affine: np.ndarray, path: str) -> str:
    """Writes a (D, H, W) array as float32 NIfTI with the same ``affine`` as qform and sform (code 1,
    scanner), so nibabel and ITK-based readers (which prefer the qform) place it identically."""
    img = nib.Nifti1Image(np.asarray(volume, dtype=np.float32), np.asarray(affine, dtype=np.float64))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    nib.save(img, path)
    return path


def nifti_array(
    item: np.ndarray, low: float | Sequence[float] = -1.0, high: float | Sequence[float] = 1.0
) -> np.ndarray:
    """A network output (C, *spatial) on [-1, 1] as the array of a NIfTI file, intensities mapped to [low, high]
    (numbers, or one per channel): (*spatial) for one channel, (D, H, W, C) for several 3-D channels, (H, W, 1, C)
    for several 2-D channels."""
    item = np.asarray(item, dtype=np.float32)
    window = [1] * (item.ndim - 1)
    low = np.asarray(low, dtype=np.float32).reshape(-1, *window)
    high = np.asarray(high, dtype=np.float32).reshape(-1, *window)
    data = low + (item + 1.0) / 2.0 * (high - low)
    if data.shape[0] == 1:
        return data[0]
    data = np.moveaxis(data, 0, -1)
    return data[:, :, None, :] if data.ndim == 3 else data


class SampleRequests(torch.utils.data.Dataset):
    """``num_samples`` requests per temperature and condition: items {"index", "temperature", "condition"}."""

    def __init__(self, num_samples: int, temperature: float | Sequence[float], num_conditions: int = 1) -> None:
        temps = check_sampling_options(num_samples, temperature)
        self.items = [
            {"index": i, "temperature": t, "condition": c}
            for t in temps
            for c in range(num_conditions)
            for i in range(num_samples)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def sample_seed(seed: int, index: int) -> int:
    """The RNG seed of sample ``index`` of the stream ``seed``."""
    return (int(seed) * 1_000_003 + int(index)) % 2**63


def draw_samples(generator, temperature: float, seed: int, indices: Sequence[int]) -> torch.Tensor:
    """Samples ``indices`` of the stream ``seed`` at ``temperature``: (len(indices), C, *R) on [-1, 1].

    Sample i is drawn alone, from the RNG seeded with :func:`sample_seed` (seed, i), so it is the same volume whatever
    the batch size and whichever tool draws it (``inference.json``, ``evaluate.json``, ``check_samples``, the
    benchmarks), and the same noise at every temperature. The caller's RNG state is restored afterwards."""
    out = []
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        for i in indices:
            torch.manual_seed(sample_seed(seed, i))
            out.append(generator.sample(1, float(temperature)).float())
    return torch.cat(out)


class SamplingEvaluator(SupervisedEvaluator):
    """Draws the samples of each batch of requests {"index", "temperature"} with the inferer
    (:class:`PriorSampler`): sample i of every temperature comes from :func:`draw_samples` with ``seed``, so a run's
    volumes depend on the seed only, not on the batch size."""

    def __init__(self, *args, seed: int = 0, amp_mode: str = "none", **kwargs) -> None:
        kwargs["amp"] = False
        kwargs.setdefault("decollate", False)
        super().__init__(*args, **kwargs)
        self.seed = int(seed)
        self.amp_mode = amp_mode

    def _iteration(self, engine: SamplingEvaluator, batchdata: dict) -> dict:
        temps, indices = batchdata["temperature"].tolist(), batchdata["index"].tolist()
        conditions = batchdata["condition"].tolist()
        net = engine.network  # a ConditionSweep (several conditions) gives the generator of each with select

        def generator(c: int) -> torch.nn.Module:
            return net.select(c) if hasattr(net, "select") else net

        with torch.no_grad(), autocast(engine.state.device, engine.amp_mode):
            out = [engine.inferer([i], generator(c), t, engine.seed) for i, t, c in zip(indices, temps, conditions)]
        engine.state.output = {
            "pred": torch.cat(out).float(),
            "index": batchdata["index"],
            "temperature": batchdata["temperature"],
            "condition": batchdata["condition"],
        }
        return engine.state.output


class PriorSampler(Inferer):
    """Inferer: the samples ``indices`` of the stream ``seed`` at ``temperature`` (:func:`draw_samples`),
    (len(indices), C, *R) on [-1, 1]."""

    def __call__(self, indices: Sequence[int], network: torch.nn.Module, temperature: float, seed: int) -> torch.Tensor:
        return draw_samples(network, temperature, seed, indices)


class SampleWriter:
    """Writes each sample as ``output_dir/sample_t<T>_<index>.nii.gz`` (``sample_t<T>_<condition label>_<index>``
    with several conditions, ``condition_labels``) on the training grid (affine from the sidecar JSON of the
    weights), intensities mapped from [-1, 1] back to the training set's window, and at the end
    ``output_dir/samples.png`` (3-plane rows of the first ``montage_size`` samples, shared among the conditions, one
    column per channel)."""

    def __init__(
        self, output_dir: str, model_path: str, montage_size: int = 8, condition_labels: Sequence[str] = ()
    ) -> None:
        self.output_dir = output_dir
        self.montage_size = int(montage_size)
        self.labels = list(condition_labels)
        info = read_sidecar(model_path)
        self.affine = np.asarray(info.get("affine", np.eye(4)), dtype=np.float64)
        self.low = info.get("intensity_low", -1.0)  # a number, or one per channel
        self.high = info.get("intensity_high", 1.0)
        self._shown: dict[str, list[np.ndarray]] = {}  # row label -> the sample
        self.written: list[str] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda e: os.makedirs(self.output_dir, exist_ok=True))
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._write)
        engine.add_event_handler(Events.COMPLETED, self._montage)

    def _write(self, engine: Engine) -> None:
        out = engine.state.output
        per_condition = max(1, self.montage_size // max(1, len(self.labels)))
        for vol, idx, t, c in zip(
            out["pred"].cpu().numpy(), out["index"].tolist(), out["temperature"].tolist(), out["condition"].tolist()
        ):
            label = f"_{self.labels[c]}" if self.labels else ""
            path = os.path.join(self.output_dir, f"sample_t{t:g}{label}_{idx:05d}.nii.gz")
            save_nifti(nifti_array(vol, self.low, self.high), self.affine, path)
            self.written.append(path)
            if len(self._shown) < self.montage_size and idx < per_condition:  # one column per channel (modality)
                label = f"sample {idx}, T={t:g}" + (f"\n{self.labels[c]}" if self.labels else "")
                self._shown[label] = list(vol) if vol.ndim == 4 else [vol]  # (C, D, H, W): 3-D channels

    def _montage(self, engine: Engine) -> None:
        if self._shown:
            channels = len(next(iter(self._shown.values())))
            columns = [f"channel {c}" for c in range(channels)] if channels > 1 else None
            path = os.path.join(self.output_dir, "samples.png")
            plot_volume_rows(self._shown, path, title="samples", column_titles=columns)
        logger.info(f"wrote {len(self.written)} samples to {self.output_dir}")


# ---------------------------------------------------------------- reconstruction (configs/reconstruct.json)


class ProgressiveReconstructor(Inferer):
    """Inferer: (B, C, R, R, R) inputs -> (B, (1 + K + L) C, R, R, R), C channels per output. Output 0 is the
    reconstruction from the posterior means of every latent group (``network.reconstruct(x)``); output k <= K is the
    "progressive" reconstruction ``network.reconstruct(x, resolutions[k - 1])``: posterior means for the groups at
    resolutions <= that one, prior means below, so coarse settings keep only the input's coarse layout. For a
    conditional model (``covariates`` (B, F) given) output K + l is the counterfactual of ``counterfactuals[l - 1]``
    (:meth:`scripts.vdvae.network.VDVAE.counterfactual`).

    Args:
        resolutions: latent resolutions (voxels per axis) to stop at; None for every resolution that holds a
            latent group, except the finest (which gives the full reconstruction).
        amp_mode: "none", "bfloat16" or "float16" (CUDA), as in training.
        counterfactuals: changes of the covariate features (:class:`scripts.engine.covariates.CovariateChange`).
        abduct_to_resolution: the counterfactual's coarsest-to-this-resolution groups follow the new covariates'
            priors, finer ones keep the posterior (None: every group).
    """

    def __init__(
        self,
        resolutions: Sequence[int] | None = None,
        amp_mode: str = "none",
        counterfactuals: Sequence = (),
        abduct_to_resolution: int | None = None,
    ) -> None:
        super().__init__()
        self.resolutions = None if resolutions is None else [int(r) for r in resolutions]
        self.amp_mode = amp_mode
        self.counterfactuals = list(counterfactuals)
        self.abduct_to_resolution = abduct_to_resolution

    def levels(self, network: torch.nn.Module) -> list[int]:
        """The progressive resolutions used with ``network``, coarse to fine."""
        available = sorted(set(network.group_resolutions()))
        if self.resolutions is None:
            return available[:-1]
        bad = [r for r in self.resolutions if r not in available]
        if bad:
            raise ValueError(f"progressive_resolutions {bad} hold no latent group; choose among {available}")
        return sorted(self.resolutions)

    def __call__(
        self, inputs: torch.Tensor, network: torch.nn.Module, covariates: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = inputs.as_tensor() if hasattr(inputs, "as_tensor") else inputs
        c = covariates.as_tensor() if hasattr(covariates, "as_tensor") else covariates
        if self.counterfactuals and c is None:
            raise ValueError("counterfactuals need the volumes' covariates (a conditional model and covariates_csv)")
        with torch.no_grad(), autocast(x.device, self.amp_mode):
            outs = [network.reconstruct(x, covariates=c)]
            outs += [network.reconstruct(x, r, covariates=c) for r in self.levels(network)]
            outs += [
                network.counterfactual(x, c, change(c), self.abduct_to_resolution) for change in self.counterfactuals
            ]
        return torch.cat([o.float() for o in outs], dim=1)


class ReconstructionWriter:
    """Handler of the reconstruction evaluator. For every input ``<name>.nii[.gz]`` writes to ``output_dir``:

    * ``<name>_input.nii.gz``: the preprocessed input the network saw;
    * ``<name>_recon.nii.gz``: its reconstruction (posterior means of every latent group);
    * ``<name>_recon_to_r<r>.nii.gz``: progressive reconstructions (posterior means down to r^3, prior below);
    * ``<name>.png``: 3-plane rows of the input, the progressive reconstructions coarse to fine, and the full one;
    * for each counterfactual ``<label>`` (``counterfactual_labels``, e.g. ``brain_volume_ml+100``):
      ``<name>_cf_<label>.nii.gz`` and ``<name>_cf_<label>_diff.nii.gz`` (the counterfactual minus the
      reconstruction), and ``<name>_counterfactual.png`` (reconstruction, counterfactuals, differences).

    Volumes lie on the preprocessed grid of the input (its MONAI affine: same world space as the input file,
    so they overlay it in a viewer), with [-1, 1] mapped back to the input's own intensity window (its
    ``clamp_percentiles``, as in preprocessing).
    """

    def __init__(
        self,
        output_dir: str,
        levels: Sequence[int],
        clamp_percentiles: Sequence[float] = (0.05, 99.95),
        write_png: bool = True,
        counterfactual_labels: Sequence[str] = (),
    ) -> None:
        self.output_dir = output_dir
        self.levels = [int(r) for r in levels]
        self.counterfactual_labels = list(counterfactual_labels)
        self.percentiles = [float(p) for p in clamp_percentiles]
        self.write_png = bool(write_png)
        self.written: list[str] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda e: os.makedirs(self.output_dir, exist_ok=True))
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._write)
        engine.add_event_handler(
            Events.COMPLETED, lambda e: logger.info(f"wrote {len(self.written)} reconstructions to {self.output_dir}")
        )

    def _write(self, engine: Engine) -> None:
        image = engine.state.batch["image"]
        inputs = torch.as_tensor(image).float().cpu().numpy()  # (B, C, R, R, R)
        channels = inputs.shape[1]
        pred = engine.state.output["pred"].detach().float().cpu().numpy()  # (B, (1 + K + L) * C, R, R, R)
        pred = pred.reshape(pred.shape[0], -1, channels, *pred.shape[2:])  # (B, 1 + K + L, C, R, R, R)
        names = image.meta["filename_or_obj"]
        affines = image.affine.reshape(-1, 4, 4).cpu().numpy()
        first = 1 + len(self.levels)
        for b, src in enumerate(names):
            stem = os.path.basename(str(src))
            stem = stem[: -len(".nii.gz")] if stem.endswith(".nii.gz") else os.path.splitext(stem)[0]
            raw = np.asarray(nib.load(str(src)).dataobj, dtype=np.float32)
            raw = raw.reshape(-1, channels) if channels > 1 else raw.reshape(-1, 1)  # (voxels, C): a window each
            low, high = np.percentile(raw, self.percentiles, axis=0)
            to_raw = lambda v: nifti_array(v, low, high)  # noqa: E731  (C, R, R, R) -> the file's array
            out = os.path.join(self.output_dir, stem)
            recon = pred[b, 0]
            save_nifti(to_raw(inputs[b]), affines[b], f"{out}_input.nii.gz")
            save_nifti(to_raw(recon), affines[b], f"{out}_recon.nii.gz")
            for k, r in enumerate(self.levels):
                save_nifti(to_raw(pred[b, k + 1]), affines[b], f"{out}_recon_to_r{r}.nii.gz")
            columns = [f"channel {c}" for c in range(channels)] if channels > 1 else None
            if self.write_png:
                rows = {
                    "input": list(inputs[b]),
                    **{f"posterior down to {r}^3": list(pred[b, k + 1]) for k, r in enumerate(self.levels)},
                    "full reconstruction": list(recon),
                }
                title = f"{stem}: progressive reconstructions, coarse to fine"
                plot_volume_rows(rows, f"{out}.png", title=title, column_titles=columns)
            cfs = [pred[b, first + i] for i in range(len(self.counterfactual_labels))]
            for label, cf in zip(self.counterfactual_labels, cfs):
                save_nifti(to_raw(cf), affines[b], f"{out}_cf_{label}.nii.gz")
                save_nifti(to_raw(cf) - to_raw(recon), affines[b], f"{out}_cf_{label}_diff.nii.gz")
            if cfs and self.write_png:  # the first channel
                figure = counterfactual_figure(
                    recon[0], [cf[0] for cf in cfs], self.counterfactual_labels, title=f"{stem}: counterfactuals"
                )
                save_figure(figure, f"{out}_counterfactual.png")
            self.written.append(f"{out}_recon.nii.gz")
