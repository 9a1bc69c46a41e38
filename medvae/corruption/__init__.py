"""MONAI-style corruption transforms with masks, and corruption recipes.

* :mod:`~medvae.corruption.noise` - Gaussian, Rician, low-dose CT, k-space spikes, Gibbs ringing,
  bias field, motion ghosting (global: the mask is the whole image);
* :mod:`~medvae.corruption.masks` - boxes, strokes, stripes, missing slices, a mask file
  (the erased pixels are set to ``fill`` and returned as the mask);
* :mod:`~medvae.corruption.dictionary` - ``*d`` versions for dictionaries of images (MONAI
  ``MapTransform`` style): ``RandGaussianNoised``, ``RandRicianNoised``, ``RandLowDoseCTd``,
  ``RandKSpaceSpikesd``, ``RandGibbsRingingd``, ``RandBiasFieldd``, ``RandMotionGhostingd``,
  ``RandBoxMaskd``, ``RandStrokeMaskd``, ``RandStripeMaskd``, ``RandMissingSlicesd``, ``FileMaskd``
  and their base ``RandCorruptiond`` (subclass it with ``array_class`` to wrap another transform);
* :mod:`~medvae.corruption.recipes` - YAML chains (package data ``medvae/recipes``): ``load_recipe``;
* :mod:`~medvae.corruption.volume` - a whole scan: ``corrupt_volume`` (array), ``corrupt_scan`` (files).

Every array transform maps a channel-first image (``(C, H, W)`` or ``(C, H, W, D)``, numpy or
torch) to ``(image, mask)``, mask ``(1, *spatial)`` bool with ``True`` = corrupted pixel. Random
transforms record their parameters (``last_params``, ``record``) and :func:`replay` reproduces
them bit for bit.

Examples
--------
>>> import numpy as np
>>> from medvae.corruption import load_recipe
>>> res = load_recipe("boxes")(np.ones((1, 64, 64), np.float32), seed=0)
>>> 0.05 <= float(res.mask.mean()) <= 0.25
True
"""
from medvae.corruption.masks import (
    BoxMask, FileMask, MissingSlices, RandBoxMask, RandFileMask, RandMissingSlices, RandStripeMask,
    RandStrokeMask, StripeMask, StrokeMask,
)
from medvae.corruption.noise import (
    REGISTRY, BiasField, Corruption, GaussianNoise, GibbsRinging, KSpaceSpikes, LowDoseCT, MotionGhosting,
    RandBiasField, RandCorruption, RandGaussianNoise, RandGibbsRinging, RandKSpaceSpikes, RandLowDoseCT,
    RandMotionGhosting, RandRicianNoise, RicianNoise, replay, sigma_from_hu,
)
from medvae.corruption.ranges import parse_range
from medvae.corruption.recipes import CorruptionResult, Recipe, list_recipes, load_recipe
from medvae.corruption.volume import ScanCorruption, VolumeCorruption, corrupt_scan, corrupt_volume, slice_seed
# after noise and masks, which it wraps (it adds no module of MONAI or torch to the ones they load)
from medvae.corruption.dictionary import (
    FileMaskd, RandBiasFieldd, RandBoxMaskd, RandCorruptiond, RandGaussianNoised, RandGibbsRingingd,
    RandKSpaceSpikesd, RandLowDoseCTd, RandMissingSlicesd, RandMotionGhostingd, RandRicianNoised,
    RandStripeMaskd, RandStrokeMaskd,
)

__all__ = [
    "REGISTRY", "Corruption", "RandCorruption", "replay", "sigma_from_hu", "parse_range",
    "GaussianNoise", "RandGaussianNoise", "RicianNoise", "RandRicianNoise", "LowDoseCT", "RandLowDoseCT",
    "KSpaceSpikes", "RandKSpaceSpikes", "GibbsRinging", "RandGibbsRinging", "BiasField", "RandBiasField",
    "MotionGhosting", "RandMotionGhosting",
    "BoxMask", "RandBoxMask", "StrokeMask", "RandStrokeMask", "StripeMask", "RandStripeMask",
    "MissingSlices", "RandMissingSlices", "FileMask", "RandFileMask",
    "Recipe", "CorruptionResult", "load_recipe", "list_recipes",
    "VolumeCorruption", "corrupt_volume", "slice_seed", "ScanCorruption", "corrupt_scan",
    "RandCorruptiond", "RandGaussianNoised", "RandRicianNoised", "RandLowDoseCTd", "RandKSpaceSpikesd",
    "RandGibbsRingingd", "RandBiasFieldd", "RandMotionGhostingd", "RandBoxMaskd", "RandStrokeMaskd",
    "RandStripeMaskd", "RandMissingSlicesd", "FileMaskd",
]
