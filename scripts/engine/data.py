# Copyright 2026 The VDVAE bundle authors. Licensed under the Apache License, Version 2.0.
"""NIfTI folder discovery, validation and the saved train/validation split.

:class:`DataSplit` is instantiated by the configs: it finds the NIfTI files of ``dataset_dir`` (generating the
built-in MNI cohort first when ``dataset_dir`` is the default folder), checks every header, splits the files
deterministically for a seed and saves the split to ``output_dir/data_split.json`` so that a resumed run (or a
run with another seed in the same folder) keeps it. Its state dict, saved in every checkpoint, also records
the preprocessing grid (affine of a preprocessed volume) and the training set's intensity statistics.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from scripts.engine.covariates import fit_covariates
from scripts.engine.default_data import generate_mni_cohort

__all__ = [
    "DataSplit",
    "find_niftis",
    "check_nifti_header",
    "file_identity_hash",
    "atomic_write_json",
    "make_dataset",
    "preprocess_volumes",
]

logger = logging.getLogger(__name__)
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def find_niftis(dataset_dir: str | os.PathLike) -> list[str]:
    """Sorted paths of the ``.nii``/``.nii.gz`` files directly inside ``dataset_dir``."""
    folder = Path(dataset_dir)
    if not folder.exists():
        raise FileNotFoundError(f"dataset_dir {str(folder)!r} does not exist: expected a folder of .nii/.nii.gz files")
    if not folder.is_dir():
        raise NotADirectoryError(f"dataset_dir {str(folder)!r} is a file: expected a folder of .nii/.nii.gz files")
    files = sorted(str(p) for p in folder.iterdir() if p.is_file() and p.name.endswith(NIFTI_SUFFIXES))
    if not files:
        raise FileNotFoundError(f"dataset_dir {str(folder)!r} holds no .nii or .nii.gz files")
    return files


def check_nifti_header(path: str, channels: int = 1) -> tuple[int, ...]:
    """Reads the header of ``path``; returns its 3-D shape or raises ValueError naming the file. With ``channels`` > 1
    the file must be 4-D with that many volumes (paired or multi-contrast volumes as channels)."""
    try:
        img = nib.load(path)
    except Exception as e:  # nibabel raises several types for corrupt files
        raise ValueError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})") from e
    shape = tuple(int(s) for s in img.shape)
    spatial = shape[:3]
    extra = [s for s in shape[3:] if s != 1]
    if len(spatial) < 3 or min(spatial) < 2 or extra != ([] if channels == 1 else [channels]):
        what = (
            "a 3-D volume (a 4-D file may hold one volume)"
            if channels == 1
            else f"a 4-D file of {channels} 3-D volumes (in_channels = {channels})"
        )
        hint = f"; for {extra[0]} modalities per file set in_channels = {extra[0]}" if len(extra) == 1 else ""
        raise ValueError(f"{path}: expected {what}, got shape {shape}{hint}")
    return spatial


def file_identity_hash(item: dict) -> bytes:
    """Cache key of a data item {"image": path}: path, size and modification time, so a changed file is
    never served from the cache."""
    path = item["image"]
    st = os.stat(path)
    return hashlib.md5(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest().encode()


def atomic_write_json(path: str | os.PathLike, obj: object) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


class DataSplit:
    """Train/validation split of a NIfTI folder, saved under ``output_dir``.

    Args:
        dataset_dir: flat folder of ``.nii``/``.nii.gz`` volumes.
        output_dir: run folder; the split is saved to ``output_dir/data_split.json`` and reused from there.
        train_frac: fraction of files used for training (reference: 0.95); at least one file validates.
        seed: seed of the shuffle that makes the split.
        max_niis_to_use: use only the first N files (sorted by name); None or 0 for all.
        default_dataset_dir: the built-in data folder; when ``dataset_dir`` is it and it is missing, the MNI
            template cohort is generated there first (rank 0 only; other ranks wait).
        default_dataset_kwargs: arguments of :func:`scripts.engine.default_data.generate_mni_cohort`.
        channels: volumes per file (1, or a 4-D file of paired volumes as channels).
        covariates_csv: optional CSV of per-volume covariates (:mod:`scripts.engine.covariates`); the items then
            carry ``covariates`` (K,) and :attr:`num_covariates` is K.
        covariates: the columns that condition the model, column -> "numeric" or "categorical" (None: every column
            but ``file``, numeric).
    """

    def __init__(
        self,
        dataset_dir: str,
        output_dir: str,
        train_frac: float = 0.95,
        seed: int = 0,
        max_niis_to_use: int | None = None,
        default_dataset_dir: str | None = None,
        default_dataset_kwargs: dict | None = None,
        channels: int = 1,
        covariates_csv: str | None = None,
        covariates: dict[str, str] | None = None,
    ) -> None:
        if not 0.0 < train_frac < 1.0:
            raise ValueError(f"train_frac must be in (0, 1), got {train_frac}")
        self.dataset_dir = str(dataset_dir)
        self.channels = int(channels)
        if default_dataset_dir is not None and os.path.abspath(dataset_dir) == os.path.abspath(default_dataset_dir):
            ensure_default_dataset(self.dataset_dir, **(default_dataset_kwargs or {}))
        files = all_files = find_niftis(self.dataset_dir)
        if max_niis_to_use:
            files = files[: int(max_niis_to_use)]
        if len(files) < 2:
            raise ValueError(
                f"dataset_dir {self.dataset_dir!r}: need at least 2 NIfTI files (train + validation), found {len(files)}"
            )
        for f in files:
            check_nifti_header(f, channels)
        self.split_file = Path(output_dir) / "data_split.json"
        saved = self._load_saved(files)
        if saved is not None:
            self.train_files, self.val_files = saved
        else:
            order = list(files)
            random.Random(seed).shuffle(order)
            n_val = min(len(order) - 1, max(1, int(round((1.0 - train_frac) * len(order)))))
            self.val_files = sorted(order[:n_val])
            self.train_files = sorted(order[n_val:])
            if _rank() == 0:
                atomic_write_json(
                    self.split_file, {"dataset_dir": self.dataset_dir, "train": self.train_files, "val": self.val_files}
                )
        self.preprocessing_info: dict = {}
        self.covariate_encoder, self.covariate_features = None, {}
        self.covariates_csv = None
        if covariates_csv:
            self.covariates_csv = _covariates_file(covariates_csv, self.dataset_dir, default_dataset_dir)
            self.covariate_encoder, self.covariate_features = fit_covariates(
                self.covariates_csv,
                self.train_files,
                self.val_files,
                covariates,
                folder_files=all_files,
            )
            logger.info(
                f"covariates {self.covariate_encoder.names} from {covariates_csv}: "
                f"{self.covariate_encoder.num_features} features"
            )
        elif covariates:
            raise ValueError(
                f"covariates {sorted(covariates)} given without covariates_csv: name the CSV that holds them"
            )
        logger.info(
            f"data: {len(self.train_files)} training and {len(self.val_files)} validation volumes from {self.dataset_dir}"
        )

    def _load_saved(self, files: list[str]) -> tuple[list[str], list[str]] | None:
        if not self.split_file.exists():
            return None
        saved = json.loads(self.split_file.read_text())
        if saved.get("dataset_dir") != self.dataset_dir or sorted(saved["train"] + saved["val"]) != sorted(files):
            raise ValueError(
                f"{self.split_file} holds a split of other files (dataset_dir {saved.get('dataset_dir')!r}, "
                f"{len(saved['train']) + len(saved['val'])} files) than this run ({self.dataset_dir!r}, {len(files)} files): "
                "use another output_dir for another data set, or delete that file to re-split"
            )
        return saved["train"], saved["val"]

    @property
    def num_covariates(self) -> int:
        """Length K of each item's ``covariates`` features (0 without ``covariates_csv``)."""
        return self.covariate_encoder.num_features if self.covariate_encoder is not None else 0

    def _items(self, files: list[str]) -> list[dict]:
        if self.covariate_encoder is None:
            return [{"image": f} for f in files]
        return [{"image": f, "covariates": self.covariate_features[f]} for f in files]

    def train_data(self) -> list[dict]:
        return self._items(self.train_files)

    def val_data(self) -> list[dict]:
        return self._items(self.val_files)

    def describe_preprocessing(self, preprocessing: Callable, num_files: int = 16) -> dict:
        """Records the output grid (affine of ``preprocessing(first training file)``) and the training set's
        intensity statistics: the medians over up to ``num_files`` volumes of the raw intensities at the
        clamp percentiles, which map to -1 and 1 (one number, or a list of one per channel for files of several
        channels)."""
        if not self.preprocessing_info:
            first = preprocessing({"image": self.train_files[0]})["image"]
            lows, highs = [], []
            for f in self.train_files[:num_files]:
                data = np.asarray(nib.load(f).dataobj, dtype=np.float32)
                if self.channels > 1:  # (X, Y, Z, C): a window per channel
                    lo, hi = np.percentile(data.reshape(-1, data.shape[-1]), [0.05, 99.95], axis=0)
                else:
                    lo, hi = np.percentile(data, [0.05, 99.95])
                lows.append(lo)
                highs.append(hi)
            low, high = np.median(lows, axis=0), np.median(highs, axis=0)
            self.preprocessing_info = {
                "affine": np.asarray(first.affine, dtype=np.float64).tolist(),
                "spatial_shape": list(first.shape[1:]),
                "intensity_low": low.tolist() if self.channels > 1 else float(low),
                "intensity_high": high.tolist() if self.channels > 1 else float(high),
            }
            if self.covariate_encoder is not None:  # saved beside the weights: sampling needs no CSV
                self.preprocessing_info["covariates"] = {
                    **self.covariate_encoder.state_dict(),
                    "csv": os.path.abspath(self.covariates_csv),  # the default of reconstruct / evaluate
                }
        return self.preprocessing_info

    def state_dict(self) -> dict:
        return {
            "dataset_dir": self.dataset_dir,
            "train_files": list(self.train_files),
            "val_files": list(self.val_files),
            "preprocessing": dict(self.preprocessing_info),
        }

    def load_state_dict(self, state: dict) -> None:
        if sorted(state["train_files"]) != sorted(self.train_files) or sorted(state["val_files"]) != sorted(
            self.val_files
        ):
            raise ValueError(
                "the checkpoint was trained on another train/validation split than "
                f"{self.split_file}: resume with the same dataset_dir and output_dir"
            )
        self.preprocessing_info = dict(state.get("preprocessing", {}))


def _covariates_file(path: str, dataset_dir: str, default_dataset_dir: str | None) -> str:
    """``path``, after checking that it exists; the built-in cohort's missing CSV (a cohort generated before the
    covariates existed) names the command that writes it."""
    if os.path.isfile(path):
        return path
    if (
        default_dataset_dir is not None
        and os.path.abspath(dataset_dir) == os.path.abspath(default_dataset_dir)
        and os.path.abspath(os.path.dirname(path)) == os.path.abspath(dataset_dir)
    ):
        raise FileNotFoundError(
            f"covariates_csv {path!r} does not exist: the built-in cohort in {dataset_dir} was generated before it "
            "wrote its covariates; write them (same volumes) with python -m scripts.engine.default_data "
            f"--output_directory {dataset_dir} --covariates_only True"
        )
    raise FileNotFoundError(f"covariates_csv {path!r} does not exist")


def ensure_default_dataset(folder: str, timeout_s: float = 1800.0, **kwargs) -> None:
    """Generates the built-in MNI cohort into ``folder`` unless it exists. Rank 0 generates into a temporary
    folder and renames it (an interrupted generation leaves nothing half-written); other ranks wait for it."""
    if os.path.isdir(folder):
        return
    if _rank() != 0:
        start = time.time()
        while not os.path.isdir(folder):
            if time.time() - start > timeout_s:
                raise TimeoutError(
                    f"rank {_rank()}: waited {timeout_s:.0f} s for rank 0 to generate {folder}; on several nodes the "
                    "folder must be on a filesystem they all share (or generate it on each node first)"
                )
            time.sleep(1.0)
        return
    logger.info(f"generating the built-in MNI template cohort into {folder} (first use only)")
    for stale in glob.glob(f"{folder.rstrip('/')}.tmp*"):  # left by an interrupted generation
        shutil.rmtree(stale, ignore_errors=True)
    tmp = f"{folder.rstrip('/')}.tmp{os.getpid()}"
    generate_mni_cohort(tmp, **kwargs)
    os.replace(tmp, folder)


def make_dataset(data: list[dict], transform: Callable, cache: str = "none", cache_dir: str | None = None):
    """MONAI dataset over ``data`` with optional caching of the deterministic transforms:

    * ``"none"``: plain Dataset;
    * ``"memory"``: CacheDataset (this process only, so always built with the current settings);
    * ``"disk"``: PersistentDataset under ``cache_dir``, keyed by each file's path, size and modification time
      plus a hash of the deterministic transforms' settings, so it never serves data preprocessed differently.
    """
    from monai.data import CacheDataset, Dataset, PersistentDataset
    from monai.data.utils import pickle_hashing

    if cache == "none":
        return Dataset(data, transform)
    if cache == "memory":
        return CacheDataset(data, transform, progress=False)
    if cache == "disk":
        if not cache_dir:
            raise ValueError("cache='disk' needs a cache_dir")
        return PersistentDataset(
            data, transform, cache_dir=cache_dir, hash_func=file_identity_hash, hash_transform=pickle_hashing
        )
    raise ValueError(f"cache must be 'none', 'memory' or 'disk', got {cache!r}")


def preprocess_volumes(files: list[str], preprocessing: Callable) -> torch.Tensor:
    """The volumes of ``files`` through ``preprocessing`` ({"image": path} -> (C, R, R, R)), stacked: (N, C, R, R, R)
    float32 (for metrics and fits that need a whole, small set in memory)."""
    return torch.stack([torch.as_tensor(np.asarray(preprocessing({"image": f})["image"])) for f in files]).float()
