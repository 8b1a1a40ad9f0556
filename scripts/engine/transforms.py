# Copyright 2026 The VDVAE bundle authors. Licensed under the Apache License, Version 2.0.
"""Transforms MONAI lacks: input validation and four of the reference's augmentations.

All work on channel-first tensors (C, D, H, W); the random ones follow MONAI's RandomizableTransform protocol
(``prob``, ``set_random_state``), so per-epoch reseeding and DataLoader worker seeding apply to them.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import Affine, LoadImaged, MapTransform, RandomizableTransform
from monai.utils import convert_to_dst_type

__all__ = ["LoadVolumed", "ValidateVolumed", "RandGhostingd", "RandMotiond", "RandAxisResampled", "RandZeroEdgesd"]


def _filename(d: Mapping, key: Hashable) -> str:
    img = d[key]
    meta = getattr(img, "meta", None) or d.get(f"{key}_meta_dict", {})
    return str(meta.get("filename_or_obj", "<in-memory volume>"))


class LoadVolumed(LoadImaged):
    """MONAI's LoadImaged whose read errors (truncated or corrupt files) name the file."""

    def __call__(self, data, reader=None):
        try:
            return super().__call__(data, reader)
        except Exception as e:
            names = ", ".join(str(data[k]) for k in self.key_iterator(dict(data)))
            raise ValueError(f"{names}: could not read this NIfTI file ({type(e).__name__}: {e})") from e


class ValidateVolumed(MapTransform):
    """Checks a loaded, channel-first volume: ``channels`` channels (1 by default), three spatial axes, only finite
    values.

    Raises ValueError naming the file and what was expected (a 4-D NIfTI holding one volume arrives here as
    one channel and passes; several volumes do not, unless ``channels`` says so).
    """

    def __init__(self, keys: KeysCollection, channels: int = 1, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.channels = int(channels)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            name = _filename(d, key)
            if img.ndim != 4:
                raise ValueError(f"{name}: expected a 3-D volume, got an image of shape {tuple(img.shape[1:])}")
            if img.shape[0] != self.channels:
                hint = (
                    "split it into one file per volume"
                    if self.channels == 1
                    else f"expected in_channels = {self.channels}"
                )
                raise ValueError(
                    f"{name}: expected {self.channels} 3-D volume(s), got {img.shape[0]} volumes/channels (shape "
                    f"{tuple(img.shape[1:])} x {img.shape[0]}); {hint}"
                )
            if min(img.shape[1:]) < 2:
                raise ValueError(f"{name}: expected a 3-D volume, got spatial shape {tuple(img.shape[1:])}")
            if not torch.isfinite(torch.as_tensor(img)).all():
                bad = int((~torch.isfinite(torch.as_tensor(img))).sum())
                raise ValueError(f"{name}: contains {bad} NaN or infinite voxel values; fix or remove this file")
        return d


class RandGhostingd(RandomizableTransform, MapTransform):
    """k-space ghosting (substitute for torchio's RandomGhosting): along a random axis, every
    ``num_ghosts``-th k-space plane is scaled by ``1 - intensity``, giving ``num_ghosts`` faint copies."""

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.1,
        num_ghosts: tuple[int, int] = (4, 10),
        intensity: tuple[float, float] = (0.5, 1.0),
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.num_ghosts, self.intensity = num_ghosts, intensity

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        axis = int(self.R.randint(3)) + 1
        n = int(self.R.randint(self.num_ghosts[0], self.num_ghosts[1] + 1))
        strength = float(self.R.uniform(*self.intensity))
        for key in self.key_iterator(d):
            img = d[key]
            k = torch.fft.fftn(torch.as_tensor(img, dtype=torch.float32), dim=(1, 2, 3))
            index = [slice(None)] * 4
            index[axis] = slice(None, None, n)
            k[tuple(index)] *= 1.0 - strength
            out = torch.fft.ifftn(k, dim=(1, 2, 3)).real
            d[key] = convert_to_dst_type(out, img)[0]
        return d


class RandMotiond(RandomizableTransform, MapTransform):
    """Rigid motion during acquisition (substitute for torchio's RandomMotion): k-space is filled in
    ``num_transforms + 1`` segments along a random axis, each from a copy of the volume under a different
    random rotation (``degrees``) and translation (``translation`` voxels)."""

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.1,
        degrees: float = 5.0,
        translation: float = 5.0,
        num_transforms: int = 2,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.degrees, self.translation, self.num_transforms = degrees, translation, num_transforms

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        axis = int(self.R.randint(3)) + 1
        moves = [
            (
                np.deg2rad(self.R.uniform(-self.degrees, self.degrees, 3)),
                self.R.uniform(-self.translation, self.translation, 3),
            )
            for _ in range(self.num_transforms)
        ]
        cuts = np.sort(self.R.uniform(0, 1, self.num_transforms))
        for key in self.key_iterator(d):
            img = torch.as_tensor(d[key], dtype=torch.float32)
            size = img.shape[axis]
            k = torch.fft.fftshift(torch.fft.fftn(img, dim=(1, 2, 3)), dim=(1, 2, 3))
            bounds = [0, *[int(c * size) for c in cuts], size]
            for (rot, trans), start, stop in zip(moves, bounds[1:-1], bounds[2:]):
                moved = Affine(
                    rotate_params=tuple(rot), translate_params=tuple(trans), padding_mode="border", image_only=True
                )(img)
                k_moved = torch.fft.fftshift(torch.fft.fftn(torch.as_tensor(moved), dim=(1, 2, 3)), dim=(1, 2, 3))
                index = [slice(None)] * 4
                index[axis] = slice(start, stop)
                k[tuple(index)] = k_moved[tuple(index)]
            out = torch.fft.ifftn(torch.fft.ifftshift(k, dim=(1, 2, 3)), dim=(1, 2, 3)).real
            d[key] = convert_to_dst_type(out, d[key])[0]
        return d


class RandAxisResampled(RandomizableTransform, MapTransform):
    """Anisotropic resolution loss: one random axis is resized down by a factor in ``zoom_range`` and back
    (trilinear), as the reference's one-axis down/up resize (MONAI's RandSimulateLowResolution is isotropic)."""

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.1,
        zoom_range: tuple[float, float] = (0.8, 0.95),
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.zoom_range = zoom_range

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        axis = int(self.R.randint(3))
        zoom = float(self.R.uniform(*self.zoom_range))
        for key in self.key_iterator(d):
            img = d[key]
            x = torch.as_tensor(img, dtype=torch.float32)[None]
            shape = list(x.shape[2:])
            small = list(shape)
            small[axis] = max(1, int(round(shape[axis] * zoom)))
            x = F.interpolate(
                F.interpolate(x, size=small, mode="trilinear", align_corners=False),
                size=shape,
                mode="trilinear",
                align_corners=False,
            )
            d[key] = convert_to_dst_type(x[0], img)[0]
        return d


class RandZeroEdgesd(RandomizableTransform, MapTransform):
    """Sets ``width`` voxels at both ends of one random axis to the volume's minimum (its background), as the
    reference's edge zeroing does on data whose background is 0."""

    def __init__(
        self, keys: KeysCollection, prob: float = 0.1, width: int = 1, allow_missing_keys: bool = False
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.width = int(width)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        axis = int(self.R.randint(3)) + 1
        for key in self.key_iterator(d):
            img = d[key].clone() if isinstance(d[key], torch.Tensor) else np.array(d[key], copy=True)
            low = img.min()
            for part in (slice(0, self.width), slice(-self.width, None)):
                index: list[slice] = [slice(None)] * 4
                index[axis] = part
                img[tuple(index)] = low
            d[key] = img
        return d
