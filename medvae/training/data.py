"""Training data: volumes read through :mod:`medvae.io`, split by volume, patches corrupted on the fly.

Every sample is a pure function of ``(seed, epoch, index)``: the patch location, augmentation and the
corruption seed are drawn from ``numpy.random.default_rng([seed, epoch, index])``. That makes an
epoch identical whatever the number of workers or ranks, and makes ``--resume`` exact.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from monai.data import Dataset

from medvae.errors import MedvaeError
from medvae.intensity import IntensityPolicy, normalize

log = logging.getLogger(__name__)


@dataclass
class Volume:
    """One normalized training/validation volume (no identifiers: ``name`` is ``vol<i>``)."""

    name: str
    modality: str
    array: np.ndarray          # normalized float32 (X, Y, Z)
    slices: list[int]          # usable slice indices along Z


def foreground_fraction(slice_2d: np.ndarray, modality: str) -> float:
    """Fraction of foreground pixels of a normalized slice (CT > -500 HU; MR > 10 % of the window)."""
    thr = 0.25 if modality == "CT" else 0.1  # CT window -1000..1000: -500 HU is 0.25
    return float((slice_2d > thr).mean())


def load_volumes(paths: Sequence[Path], *, intensity: IntensityPolicy, min_size: int,
                 min_foreground: float, offset: int = 0) -> list[Volume]:
    """Read and normalize scans; keep slices at least ``min_size`` in-plane with enough foreground."""
    from medvae.io import load_scan

    vols = []
    for i, p in enumerate(paths):
        scan = load_scan(p)
        arr = normalize(scan.array, intensity.window_for(scan.array, scan.modality))
        if min(arr.shape[:2]) < min_size:
            log.info("skipping vol%02d: in-plane size %s < %d", offset + i, arr.shape[:2], min_size)
            continue
        keep = [k for k in range(arr.shape[2]) if foreground_fraction(arr[:, :, k], scan.modality) >= min_foreground]
        if keep:
            vols.append(Volume(f"vol{offset + i:02d}", scan.modality, arr, keep))
    return vols


def _fit(patch: np.ndarray, size: int) -> np.ndarray:
    """Reflect-pad (or crop) a 2-D array to ``size`` × ``size`` around its centre."""
    out = patch
    for ax in (0, 1):
        n = out.shape[ax]
        if n < size:
            before = (size - n) // 2
            pad = [(0, 0), (0, 0)]
            pad[ax] = (before, size - n - before)
            out = np.pad(out, pad, mode="reflect" if n > (size - n) // 2 + 1 else "edge")
        elif n > size:
            start = (n - size) // 2
            out = out.take(range(start, start + size), axis=ax)
    return out


class PatchDataset(Dataset):
    """Random 2-D patches from training volumes, corrupted on the fly by a recipe.

    A MONAI :class:`~monai.data.Dataset` whose items are the sample indices; ``set_epoch`` changes the
    draw, like ``DistributedSampler.set_epoch``.
    """

    def __init__(self, volumes: list[Volume], *, recipe: Any, patch_size: int, samples_per_epoch: int,
                 seed: int, augment: bool = True) -> None:
        if not volumes:
            raise MedvaeError("no usable training slices (check data.paths, min_size, min_foreground)")
        super().__init__(data=list(range(samples_per_epoch)))
        self.volumes, self.recipe, self.patch = volumes, recipe, patch_size
        self.seed, self.augment, self.epoch = seed, augment, 0
        # volumes are drawn with weight sqrt(slices) so single-slice scans are not drowned out
        w = np.sqrt([len(v.slices) for v in volumes])
        self.vol_p = w / w.sum()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:  # type: ignore[override]
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        vol = self.volumes[rng.choice(len(self.volumes), p=self.vol_p)]
        sl = vol.array[:, :, vol.slices[rng.integers(len(vol.slices))]]
        # random crop, then pad what is too small
        P = self.patch
        x0 = rng.integers(0, max(1, sl.shape[0] - P + 1))
        y0 = rng.integers(0, max(1, sl.shape[1] - P + 1))
        patch = _fit(sl[x0:x0 + P, y0:y0 + P], P)
        if self.augment:
            patch = np.rot90(patch, k=int(rng.integers(4)))
            if rng.random() < 0.5:
                patch = patch[::-1]
            patch = patch * rng.uniform(0.9, 1.1)  # scanner gain differences
        clean = np.ascontiguousarray(patch, dtype=np.float32)[None]
        res = self.recipe(clean, seed=int(rng.integers(2**31 - 1)), modality=vol.modality)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(res.image, dtype=np.float32)),
            "mask": torch.from_numpy(np.ascontiguousarray(res.mask, dtype=np.float32)),
            "target": torch.from_numpy(clean),
        }


def validation_slices(volumes: list[Volume], *, recipe: Any, n: int, max_size: int
                      ) -> list[dict[str, Any]]:
    """Fixed validation slices, spread evenly over the validation volumes, each corrupted once
    with a fixed seed, so every epoch (and every run) is scored on the same inputs."""
    pool = [(v, k) for v in volumes for k in v.slices]
    if not pool:
        return []
    pick = np.linspace(0, len(pool) - 1, num=min(n, len(pool))).round().astype(int)
    out = []
    for j, idx in enumerate(pick):
        v, k = pool[idx]
        sl = v.array[:, :, k]
        size = min(max_size, *sl.shape)
        clean = _fit(sl, size)[None].astype(np.float32)  # center crop to a square
        res = recipe(clean, seed=10_000 + j, modality=v.modality)
        out.append({"name": f"{v.name}_s{k:03d}", "modality": v.modality, "target": clean,
                    "image": np.asarray(res.image, dtype=np.float32),
                    "mask": np.asarray(res.mask, dtype=np.float32)})
    return out
