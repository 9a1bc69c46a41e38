"""Dictionary versions of the corruptions (MONAI ``MapTransform`` style).

A ``*d`` transform randomizes **once** per call for all its ``keys`` (the parameters are sampled on
the first key's image), applies the same corruption to every key, and stores the mask under
``mask_key`` (default ``"mask"``), united with a mask already there; the mask has the type (numpy
or torch, and device) of the first key's image, whatever the other keys' types. The keys must share
one spatial shape. With ``same_noise=True``
(default) paired keys, e.g. two echoes or an image and its copy, get the *identical* noise field;
with ``same_noise=False`` each key gets its own noise seed (geometry and levels stay shared).
A MetaTensor (from ``LoadImaged``, or sliced from one) gives its voxel size (``pixdim``) to the
corruption, as ``corrupt_volume`` gives a scan's: low-dose CT noise in HU depends on the pixel size. A
MetaTensor with MONAI's default identity affine and no reader's metadata gives none (as a plain array).

``last_params`` maps every key to the parameters applied to it (``None`` when ``prob`` skipped the
call), each replayable with the deterministic transform's ``from_params``; ``records`` gives them per
key as array-transform records for :func:`~medvae.corruption.replay`.

Examples
--------
>>> import numpy as np
>>> t = RandGaussianNoised(["a", "b"], sigma=0.1).set_random_state(0)
>>> out = t({"a": np.zeros((1, 8, 8), np.float32), "b": np.zeros((1, 8, 8), np.float32)})
>>> bool((out["a"] == out["b"]).all()), out["mask"].shape
(True, (1, 8, 8))
"""
from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms.transform import MapTransform, RandomizableTransform
from monai.utils import convert_to_dst_type
from monai.utils.misc import MAX_SEED

from medvae.corruption import masks, noise
from medvae.corruption.ranges import parse_prob
from medvae.corruption.volume import inplane_pixel_size
from medvae.errors import require_flags

__all__ = [
    "RandCorruptiond", "RandGaussianNoised", "RandRicianNoised", "RandLowDoseCTd", "RandKSpaceSpikesd",
    "RandGibbsRingingd", "RandBiasFieldd", "RandMotionGhostingd", "RandBoxMaskd", "RandStrokeMaskd",
    "RandStripeMaskd", "RandMissingSlicesd", "FileMaskd",
]


#: ``child_seed(seed, _INNER_STREAM)`` seeds the wrapped transform of a wrapper seeded with ``seed``
_INNER_STREAM = 1


def _check_shapes(d: Mapping[Hashable, Any], keys: list[Hashable]) -> None:
    """One spatial shape for all ``keys`` (one corruption, one mask for all of them)."""
    first = None
    for k in keys:
        shape = getattr(d[k], "shape", None)
        if shape is None or len(shape) < 1:
            continue  # not an image: the array transform says so
        if first is None:
            first = (k, tuple(shape[1:]))
        elif tuple(shape[1:]) != first[1]:
            raise ValueError(f"keys {first[0]!r} and {k!r} have different spatial shapes {first[1]} and "
                             f"{tuple(shape[1:])}; a dictionary corruption needs one spatial shape for all its keys")


def _geometry(img: Any) -> dict[str, Any]:
    """``pixel_size_mm`` (from the first two spatial axes) and, when the affine has one entry per spatial
    axis, ``spacing_mm`` of a channel-first MetaTensor (MONAI's ``pixdim``), as ``corrupt_volume`` gives
    them from a scan; nothing for other arrays, nor for a MetaTensor no reader made whose affine is the
    identity (``EnsureTyped`` of a plain array: MONAI's default, not a measured 1 mm)."""
    if not isinstance(img, MetaTensor):
        return {}
    affine = torch.as_tensor(img.affine).cpu()
    read = any(k in img.meta for k in ("filename_or_obj", "original_affine"))
    if not read and torch.equal(affine, torch.eye(affine.shape[0], dtype=affine.dtype)):
        return {}
    spacing = [float(v) for v in img.pixdim]
    if len(spacing) < 2:
        return {}
    geometry: dict[str, Any] = {"pixel_size_mm": inplane_pixel_size(spacing)}
    if len(spacing) == img.ndim - 1:  # a 2-D slice of a loaded volume keeps the volume's 3-D affine
        geometry["spacing_mm"] = spacing
    return geometry


class RandCorruptiond(RandomizableTransform, MapTransform):
    """Base of the dictionary corruptions; ``array_class`` is the wrapped random transform.

    Parameters
    ----------
    keys : key or list of keys
        Entries to corrupt (channel-first images of the same spatial shape; numpy and torch may
        be mixed).
    mask_key : str, keyword-only
        Where the ``(1, *spatial)`` bool mask is stored (united with an existing one of shape
        ``(1, *spatial)`` or ``spatial``; another shape raises ``ValueError``), in the type
        and device of the first key's image. When the call is skipped by ``prob`` an all-False
        mask is stored if none is there.
    same_noise : bool, keyword-only
        Identical noise for every key (default) or an independent noise seed per key.
    prob : float, keyword-only
        Probability of corrupting (all keys together).
    allow_missing_keys : bool, keyword-only
    **kwargs
        Options of the array transform (``sigma``, ``coverage``...).

    Examples
    --------
    Wrap another random transform by naming it ``array_class``; the ``*d`` classes of this module
    are such subclasses.

    >>> class RandRingingd(RandCorruptiond):
    ...     array_class = noise.RandGibbsRinging
    >>> t = RandRingingd(["t1", "t2"], alpha=(0.4, 0.6)).set_random_state(0)
    >>> img = np.ones((1, 16, 16), np.float32)
    >>> out = t({"t1": img, "t2": img, "id": 7})
    >>> sorted(out), out["id"], bool((out["t1"] == out["t2"]).all())
    (['id', 'mask', 't1', 't2'], 7, True)
    >>> t.last_params["t1"] == t.last_params["t2"]
    True
    """

    array_class: ClassVar[type[noise.RandCorruption]] = noise.RandCorruption
    backend = noise.RandCorruption.backend

    def __init__(self, keys: KeysCollection, *, mask_key: Hashable = "mask", same_noise: bool = True,
                 prob: float = 1.0, allow_missing_keys: bool = False, **kwargs: Any) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, parse_prob(prob))
        if mask_key in self.keys:  # the mask would replace the corrupted image under that key
            raise ValueError(f"mask_key {mask_key!r} is also one of the keys to corrupt {list(self.keys)}; "
                             "store the mask under another key")
        self.mask_key = mask_key
        require_flags(same_noise=same_noise)  # "no" is true: every key would get the same noise
        self.same_noise = bool(same_noise)
        self.transform = self.array_class(prob=1.0, **kwargs)
        self.last_params: dict[Hashable, dict[str, Any] | None] = {}

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        """Seed the wrapper (``prob``) and, with a stream derived from it, the wrapped transform.

        The wrapped transform gets :func:`~medvae.corruption.noise.child_seed` of the wrapper's seed
        (with ``state``: of one draw from it), never the wrapper's own stream: seeded alike, the two
        streams made whether call k+1 was applied a function of call k's parameters.
        """
        super().set_random_state(seed, state)
        if seed is not None:
            base = int(np.int64(seed if isinstance(seed, (int, np.integer)) else id(seed)) % MAX_SEED)  # as MONAI
        elif state is not None:
            base = int(self.R.randint(0, noise.SEED_MAX))
        else:
            self.transform.set_random_state()  # unseeded: a fresh stream of its own
            return self
        self.transform.set_random_state(noise.child_seed(base, _INNER_STREAM))
        return self

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)

    @property
    def records(self) -> dict[Hashable, dict[str, Any]]:
        """Per key, the array transform's record of the last call, accepted by :func:`~medvae.corruption.replay`."""
        return {k: {"transform": self.array_class.name, "params": None if p is None else dict(p)}
                for k, p in self.last_params.items()}

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        for key in keys:  # on every call, as the array transform checks: not only when prob applies it
            noise._check_image(d[key], self.array_class.deterministic.spatial_dims, f"{type(self).__name__} {key!r}")
        _check_shapes(d, keys)
        self.randomize()
        self.last_params = {k: None for k in keys}
        union = None
        if self._do_transform and keys:
            # a MetaTensor (LoadImaged) carries its voxel size: low-dose CT noise in HU depends on it
            self.transform.randomize(d[keys[0]], **_geometry(d[keys[0]]))
            base = self.transform._params
            det = self.array_class.deterministic
            for i, key in enumerate(keys):
                params = dict(base)
                if i > 0 and not self.same_noise and "seed" in params:
                    # derived from the sampled seed, not drawn from self.R: the wrapper's and the inner
                    # transform's streams start from one seed, so a draw here repeated an earlier key's noise
                    params["seed"] = noise.child_seed(base["seed"], i) % noise.SEED_MAX
                d[key], m = det.from_params(**params)(d[key])
                self.last_params[key] = params
                if union is not None:  # the first key's type: keys may mix numpy and torch
                    m = convert_to_dst_type(m, dst=union, dtype=union.dtype)[0]
                union = m if union is None else union | m
        ref = d[keys[0]] if keys else None
        old = d.get(self.mask_key)
        if union is None and ref is not None:
            zeros = np.zeros((1, *ref.shape[1:]), dtype=bool)
            union = convert_to_dst_type(zeros, dst=ref, dtype=torch.bool)[0] if isinstance(ref, torch.Tensor) else zeros
        if old is not None and union is not None:
            # (1, *spatial) or (*spatial): a mask of several channels made the union several channels
            if tuple(old.shape) not in (tuple(union.shape), tuple(union.shape[1:])):
                raise ValueError(f"{self.mask_key!r}: existing mask shape {tuple(old.shape)} is neither (1, *spatial) "
                                 f"nor the image's spatial shape {tuple(union.shape[1:])}")
            old_b, *_ = convert_to_dst_type(old.reshape(union.shape), dst=union, dtype=union.dtype)
            union = union | (old_b != 0)
        if union is not None:
            d[self.mask_key] = union
        return d


def _make(name: str, array_class: type[noise.RandCorruption], doc: str) -> type[RandCorruptiond]:
    cls = type(name, (RandCorruptiond,), {"array_class": array_class, "__doc__": doc, "__module__": __name__})
    return cls


RandGaussianNoised = _make("RandGaussianNoised", noise.RandGaussianNoise, """\
Dictionary version of :class:`~medvae.corruption.noise.RandGaussianNoise`.

    Parameters as :class:`RandCorruptiond`, plus those of the array transform (``sigma``...).

    Examples
    --------
    The keys come back corrupted (paired keys with identical noise), other entries untouched, and
    the mask is written under ``mask_key``; the same seed gives the same result.

    >>> img = np.zeros((1, 8, 8), np.float32)
    >>> t = RandGaussianNoised(["a", "b"], sigma=(0.02, 0.1)).set_random_state(0)
    >>> out = t({"a": img, "b": img.copy(), "label": "knee"})
    >>> sorted(out), out["mask"].shape, bool(out["mask"].all())
    (['a', 'b', 'label', 'mask'], (1, 8, 8), True)
    >>> bool((out["a"] == out["b"]).all()), sorted(t.last_params["a"])
    (True, ['seed', 'sigma', 'window'])
    >>> again = RandGaussianNoised(["a", "b"], sigma=(0.02, 0.1)).set_random_state(0)({"a": img, "b": img})
    >>> bool((again["a"] == out["a"]).all())
    True
    """)
RandRicianNoised = _make("RandRicianNoised", noise.RandRicianNoise,
                         "Dictionary version of :class:`~medvae.corruption.noise.RandRicianNoise`.")
RandLowDoseCTd = _make("RandLowDoseCTd", noise.RandLowDoseCT,
                       "Dictionary version of :class:`~medvae.corruption.noise.RandLowDoseCT`.")
RandKSpaceSpikesd = _make("RandKSpaceSpikesd", noise.RandKSpaceSpikes,
                          "Dictionary version of :class:`~medvae.corruption.noise.RandKSpaceSpikes`.")
RandGibbsRingingd = _make("RandGibbsRingingd", noise.RandGibbsRinging,
                          "Dictionary version of :class:`~medvae.corruption.noise.RandGibbsRinging`.")
RandBiasFieldd = _make("RandBiasFieldd", noise.RandBiasField,
                       "Dictionary version of :class:`~medvae.corruption.noise.RandBiasField`.")
RandMotionGhostingd = _make("RandMotionGhostingd", noise.RandMotionGhosting,
                            "Dictionary version of :class:`~medvae.corruption.noise.RandMotionGhosting`.")
RandBoxMaskd = _make("RandBoxMaskd", masks.RandBoxMask, """\
Dictionary version of :class:`~medvae.corruption.masks.RandBoxMask`.

    Parameters as :class:`RandCorruptiond`, plus those of the array transform (``coverage``...).

    Examples
    --------
    The same boxes are erased (set to ``fill``) in every key and written, united with a mask
    already there, under ``mask_key``; the same seed gives the same boxes.

    >>> img = np.ones((1, 32, 32), np.float32)
    >>> old = np.zeros((1, 32, 32), bool); old[0, 0] = True
    >>> t = RandBoxMaskd(["image", "copy"], mask_key="holes", coverage=(0.1, 0.2)).set_random_state(0)
    >>> out = t({"image": img, "copy": img, "holes": old})
    >>> sorted(out), out["holes"].dtype, bool(out["holes"][0, 0].all())
    (['copy', 'holes', 'image'], dtype('bool'), True)
    >>> boxes = out["image"] == 0
    >>> 0.1 <= float(boxes.mean()) <= 0.2, bool((out["copy"] == out["image"]).all())
    (True, True)
    >>> again = RandBoxMaskd(["image", "copy"], mask_key="holes", coverage=(0.1, 0.2)).set_random_state(0)
    >>> bool((again({"image": img, "copy": img})["holes"] == boxes).all())
    True
    """)
RandStrokeMaskd = _make("RandStrokeMaskd", masks.RandStrokeMask,
                        "Dictionary version of :class:`~medvae.corruption.masks.RandStrokeMask`.")
RandStripeMaskd = _make("RandStripeMaskd", masks.RandStripeMask,
                        "Dictionary version of :class:`~medvae.corruption.masks.RandStripeMask`.")
RandMissingSlicesd = _make("RandMissingSlicesd", masks.RandMissingSlices,
                           "Dictionary version of :class:`~medvae.corruption.masks.RandMissingSlices`.")
FileMaskd = _make("FileMaskd", masks.RandFileMask,
                  "Dictionary version of :class:`~medvae.corruption.masks.FileMask` (``path=...``).")
