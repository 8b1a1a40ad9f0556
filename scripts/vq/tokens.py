# Copyright 2026 The VDVAE bundle authors. Licensed under the Apache License, Version 2.0.
"""Token files of the VQ family: the VQ-VAE's token grids of every volume of a split, written once after stage 1
(``tokens.pt``) and read by the prior's training."""

from __future__ import annotations

import logging
import os

import torch

from scripts.engine.sampling import load_weights
from scripts.vq.networks import STAGE1_COMMAND, VQVAE, codebook_usage

logger = logging.getLogger(__name__)

__all__ = ["write_token_grids", "load_token_grids"]


@torch.no_grad()
def write_token_grids(vqvae: VQVAE, loaders: dict, path: str, device: torch.device | str, vqvae_path: str) -> str:
    """Loads the stage-1 weights ``vqvae_path`` into ``vqvae``, encodes every volume of each loader in ``loaders``
    ({"train": ..., "val": ...}, deterministic preprocessing) and saves {split: {"tokens": (N, *grid) int16,
    "files": [...], "codebook_usage": {...}}, "vqvae": vqvae_path, ...} to ``path`` (atomically) for stage 2.
    Logs progress."""
    vqvae = load_weights(vqvae, vqvae_path, device, "vqvae_path", STAGE1_COMMAND)
    vqvae = vqvae.to(device).eval()
    out: dict = {"vqvae": vqvae_path, "token_grid": list(vqvae.token_grid), "num_embeddings": vqvae.num_embeddings}
    for split, loader in loaders.items():
        grids, files = [], []
        for i, batch in enumerate(loader):
            x = batch["image"]
            x = (x.as_tensor() if hasattr(x, "as_tensor") else x).to(device).float()
            grids.append(vqvae.tokens(x).to(torch.int16).cpu())
            meta = getattr(batch["image"], "meta", {})
            files.extend(list(meta.get("filename_or_obj", [None] * x.shape[0])))
            logger.info(f"tokens: {split} batch {i + 1}/{len(loader)}")
        tokens = torch.cat(grids)
        counts = torch.bincount(tokens.reshape(-1).long(), minlength=vqvae.num_embeddings)
        out[split] = {"tokens": tokens, "files": files, "codebook_usage": codebook_usage(counts)}
        logger.info(
            f"tokens: {split}: {tokens.shape[0]} grids of {tuple(tokens.shape[1:])}, {out[split]['codebook_usage']}"
        )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(out, tmp)
    os.replace(tmp, path)
    logger.info(f"wrote {path}")
    return path


def load_token_grids(path: str, split: str, covariate_features: dict | None = None) -> list[dict]:
    """The ``split`` token grids of a :func:`write_token_grids` file as a list of {"tokens": (*grid) long} items;
    a clear error when the file is missing (run stage 1 first). With ``covariate_features`` ({volume file: (K,)},
    the ``covariate_features`` of :class:`scripts.engine.data.DataSplit`; empty or None: none) each item also carries its
    volume's ``covariates``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"token file {path} does not exist: train stage 1 first (python -m monai.bundle run --config_file "
            "configs/vqvae_train.json), or write the tokens of a trained VQ-VAE with python -m monai.bundle run tokenize "
            "--config_file configs/vqvae_train.json; a stage-1 run with another --output_dir is found with "
            "--vqvae_dir <that output_dir>"
        )
    data = torch.load(path, map_location="cpu", weights_only=False)
    if split not in data:
        raise KeyError(f"{path} holds no {split!r} token grids (has {[k for k in data if isinstance(data[k], dict)]})")
    items = [{"tokens": t.long()} for t in data[split]["tokens"]]
    if covariate_features:
        files = data[split]["files"]
        missing = [f for f in files if f not in covariate_features]
        if missing:
            raise ValueError(
                f"{path}: {len(missing)} {split} token grids come from volumes without covariates, e.g. {missing[:2]}: "
                "write the tokens again (python -m monai.bundle run tokenize --config_file configs/vqvae_train.json) "
                "with the same data split as the covariates"
            )
        items = [{**item, "covariates": covariate_features[f]} for item, f in zip(items, files)]
    return items


# ---------------------------------------------------------------------------------------------------- inference
