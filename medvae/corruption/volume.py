"""Corrupting a whole scan volume with a recipe, in the scan's own units.

The volume is scaled to the model's window (:mod:`medvae.intensity`), corrupted slice by slice
(each slice with its own seed derived from ``seed`` and the slice index) or as a volume for 3-D
recipes (missing slices), and scaled back.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from medvae.errors import MedvaeError
from medvae.intensity import IntensityPolicy, denormalize, normalize


def slice_seed(seed: int, k: int) -> int:
    """Seed of slice ``k`` derived from a volume seed (stable across runs and versions)."""
    return int(np.random.SeedSequence([int(seed), int(k)]).generate_state(1)[0])


@dataclass
class VolumeCorruption:
    image: np.ndarray            # corrupted volume, float32, the scan's units
    mask: np.ndarray             # bool, True = corrupted voxel
    window: tuple[float, float]  # the intensity window the recipe worked in
    mode: str                    # "slices" or "volume"
    records: list[dict[str, Any]]  # per-slice (or one) replayable records


def corrupt_volume(volume: np.ndarray, recipe: Any, *, seed: int, modality: str | None,
                   source: str | os.PathLike | None = None) -> VolumeCorruption:
    """Apply ``recipe`` to a (X, Y, Z) volume; the input is not modified.

    Examples
    --------
    >>> from medvae.corruption import load_recipe
    >>> vc = corrupt_volume(np.full((32, 32, 2), 100, np.float32), load_recipe("boxes"), seed=0, modality="MR")
    >>> vc.image.shape, vc.mode
    ((32, 32, 2), 'slices')
    """
    arr = np.asarray(volume, dtype=np.float32)
    if arr.ndim != 3:
        raise MedvaeError(f"expected a 3-D scan (X, Y, Z), got shape {arr.shape}", source)
    window = IntensityPolicy().window_for(arr, modality)
    x = normalize(arr, window)
    try:
        if recipe.requires_3d:
            if arr.shape[2] < 2:
                raise MedvaeError(f"recipe {recipe.name!r} needs a 3-D volume; the scan has one slice", source)
            res = recipe(x[None], seed=int(seed), modality=modality)
            y, mask = res.image[0], res.mask[0]
            records, mode = [dict(res.record, slice=None)], "volume"
        else:
            y = np.empty_like(x)
            mask = np.zeros(x.shape, dtype=bool)
            records = []
            for k in range(x.shape[2]):
                res = recipe(x[:, :, k][None], seed=slice_seed(seed, k), modality=modality)
                y[:, :, k], mask[:, :, k] = res.image[0], res.mask[0]
                records.append(dict(res.record, slice=k))
            mode = "slices"
    except MedvaeError:
        raise
    except ValueError as exc:
        raise MedvaeError(f"recipe {recipe.name!r}: {exc}", source) from None
    return VolumeCorruption(denormalize(y, window), mask, window, mode, records)
