# Copyright 2026 The VDVAE bundle authors. Licensed under the Apache License, Version 2.0.
"""Public brain MRI data in one command: the Medical Segmentation Decathlon's Task01_BrainTumour (BraTS, 484
training subjects, FLAIR / T1 / T1Gd / T2 as one 4-D file each, tumour labels; CC-BY-SA 4.0), downloaded through
MONAI and prepared for ``train.json``.

``prepare`` downloads the archive into ``root`` (or uses one already there: put a manually downloaded
``Task01_BrainTumour.tar`` in ``root``), extracts it, checks its layout, and writes for the chosen modalities
``<root>/msd_brain_tumour/<modalities>/images/BRATS_NNN.nii.gz`` (one modality: a 3-D volume; several: a 4-D file
with one channel per modality, in the order asked for) cropped to the brain (the box of voxels non-zero in any
modality, plus ``margin`` voxels), and ``labels/BRATS_NNN.nii.gz`` cropped the same way (0 background, 1 oedema,
2 non-enhancing tumour, 3 enhancing tumour), plus ``dataset.json`` saying what was written. Prepared files are kept:
running it again only writes what is missing.

CLI (from the bundle root)::

    python -m scripts.engine.public_data --name msd_brain_tumour --root data --modality t1
    python -m monai.bundle run --config_file configs/train.json --dataset_dir data/msd_brain_tumour/t1/images
    python -m scripts.engine.public_data --name msd_brain_tumour --root data --modality all
    python -m monai.bundle run --config_file configs/train.json --dataset_dir data/msd_brain_tumour/all/images --in_channels 4
"""

from __future__ import annotations

import json
import logging
import os

import fire
import nibabel as nib
import numpy as np
from monai.apps import DecathlonDataset, download_url, extractall
from monai.transforms import CropForegroundd, EnsureChannelFirstd, LoadImaged

__all__ = ["DATASETS", "fetch", "prepare"]

logger = logging.getLogger(__name__)

TASK = "Task01_BrainTumour"
DATASETS = {
    "msd_brain_tumour": {
        "task": TASK,
        "url": DecathlonDataset.resource[TASK],
        "md5": DecathlonDataset.md5[TASK],
        "modalities": {"flair": "FLAIR", "t1": "T1w", "t1gd": "t1gd", "t2": "T2w"},  # ours -> dataset.json's
    }
}


def fetch(name: str = "msd_brain_tumour", root: str = "data") -> str:
    """The extracted task folder of data set ``name`` under ``root``: extracted before, or extracted from
    ``<root>/<task>.tar`` (downloaded first, with its MD5 checked, when it is not there). Without network it stops
    with an error naming the address and where a manually downloaded archive goes."""
    spec = _spec(name)
    task_dir = os.path.join(root, spec["task"])
    if not os.path.isfile(os.path.join(task_dir, "dataset.json")):
        archive = os.path.join(root, f"{spec['task']}.tar")
        if not os.path.isfile(archive):
            os.makedirs(root, exist_ok=True)
            try:
                download_url(spec["url"], archive, hash_val=spec["md5"], hash_type="md5")
            except Exception as e:  # no network, a proxy, a partial file: say what to do by hand
                raise RuntimeError(
                    f"could not download {spec['url']} ({type(e).__name__}: {e}). Download it by hand and put it at "
                    f"{os.path.abspath(archive)}, then run this again"
                ) from e
        logger.info(f"extracting {archive}")
        extractall(archive, root, file_type="tar")
    _check_layout(task_dir)
    return task_dir


def prepare(
    name: str = "msd_brain_tumour",
    root: str = "data",
    modality: str | list[str] = "all",
    margin: int = 2,
    max_volumes: int | None = None,
) -> str:
    """Writes the chosen ``modality`` ("all", one of flair / t1 / t1gd / t2, or a list of them: the channel order) of
    the training subjects (the first ``max_volumes``, default all), cropped to the brain, with their labels; returns
    the images folder (what ``train.json --dataset_dir`` takes)."""
    spec = _spec(name)
    chosen = list(spec["modalities"]) if modality == "all" else [modality] if isinstance(modality, str) else modality
    unknown = [m for m in chosen if m not in spec["modalities"]]
    if unknown or not chosen:
        raise ValueError(f"modality {unknown or chosen}: choose 'all' or among {list(spec['modalities'])}")
    task_dir = fetch(name, root)
    with open(os.path.join(task_dir, "dataset.json")) as f:
        meta = json.load(f)
    index = {v: int(k) for k, v in meta["modality"].items()}
    channels = [index[spec["modalities"][m]] for m in chosen]
    out = os.path.join(root, name, "all" if modality == "all" else "_".join(chosen))
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    os.makedirs(os.path.join(out, "labels"), exist_ok=True)
    cases = sorted(meta["training"], key=lambda c: c["image"])[: max_volumes or None]
    load = LoadImaged(["image", "label"], image_only=True)
    first = EnsureChannelFirstd(["image", "label"])
    crop = CropForegroundd(["image", "label"], source_key="image", margin=margin, allow_smaller=True)
    written = 0
    for i, case in enumerate(cases):
        base = os.path.basename(case["image"])
        image_out, label_out = os.path.join(out, "images", base), os.path.join(out, "labels", base)
        if os.path.isfile(image_out) and os.path.isfile(label_out):
            continue
        item = first(load({k: os.path.join(task_dir, case[k]) for k in ("image", "label")}))
        item["image"] = item["image"][channels]
        item = crop(item)
        affine = np.asarray(item["image"].affine, dtype=np.float64)
        image = np.moveaxis(np.asarray(item["image"], dtype=np.float32), 0, -1)  # (X, Y, Z, C)
        _save(image[..., 0] if len(channels) == 1 else image, affine, image_out)
        _save(np.asarray(item["label"], dtype=np.uint8)[0], affine, label_out)
        written += 1
        if written % 20 == 0 or i == len(cases) - 1:
            logger.info(f"{name}: {i + 1}/{len(cases)} subjects prepared in {out}")
    manifest = {
        "source": spec["url"],
        "licence": meta.get("licence"),
        "modalities": chosen,
        "channels_from_dataset_json": [meta["modality"][str(c)] for c in channels],
        "labels": meta.get("labels"),
        "num_volumes": len(cases),
        "crop": f"box of voxels non-zero in any chosen modality, plus {margin} voxels",
    }
    with open(os.path.join(out, "dataset.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    logger.info(
        f"{name}: {len(cases)} subjects ({written} written now) in {out}/images; train with --dataset_dir "
        f"{out}/images" + (f" --in_channels {len(channels)}" if len(channels) > 1 else "")
    )
    return os.path.join(out, "images")


def _spec(name: str) -> dict:
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known: {sorted(DATASETS)}")
    return DATASETS[name]


def _check_layout(task_dir: str) -> None:
    """A Decathlon task folder: dataset.json with modality and training entries whose files exist."""
    path = os.path.join(task_dir, "dataset.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{task_dir}: no dataset.json (not an extracted Decathlon task)")
    with open(path) as f:
        meta = json.load(f)
    for key in ("modality", "training"):
        if key not in meta:
            raise ValueError(f"{path}: no {key!r} entry")
    missing = [
        c[k] for c in meta["training"] for k in ("image", "label") if not os.path.isfile(os.path.join(task_dir, c[k]))
    ]
    if missing:
        raise FileNotFoundError(f"{path} lists {len(missing)} files that are not there, e.g. {missing[:2]}")


def _save(array: np.ndarray, affine: np.ndarray, path: str) -> None:
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)


def main(name: str = "msd_brain_tumour", root: str = "data", modality="all", margin: int = 2, max_volumes=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    print(prepare(name, root, modality, margin, max_volumes))


if __name__ == "__main__":
    fire.Fire(main)
