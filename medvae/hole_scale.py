"""Large holes restored at a coarser scale, where they look like the holes the network learned.

The default model was trained on 128² patches whose boxes are at most 0.3 × 128 ≈ 38 px wide, so no
training hole had an inscribed radius above about 20 px. A larger hole (a 15 % box on a 512² CT slice
reaches a radius of 40–75 px) is outside what the network learned, and its fill degrades: on 512² CT
slices with such boxes the full-scale restoration fell below biharmonic inpainting on three of five
scans (docs/benchmarks.md, large-holes run 1). So each hole is restored at the scale where it is no larger
than that: the slice and the mask are shrunk by the power of two ``f`` that brings the hole's inscribed
radius to at most :data:`HOLE_RADIUS` (block means; a block is a hole if any of its pixels is), the
network restores the small copy, and the upsampled result replaces the full-scale restoration inside
the hole. Near the known pixels the full-scale restoration is kept for its detail: the weight of the
coarse one ramps from 0 at :data:`EDGE_RAMP` px from the nearest known pixel to 1 at twice that, and
the uncertainty map mixes in the coarse pass's predictive std by the same weight.
Holes no larger than the training holes (every stroke, most boxes below 256²) are left at full scale.
:data:`HOLE_RADIUS` belongs to the default model's training (128² patches, the ``train`` recipe's boxes). A
model trained on other patches or holes carries its own in ``meta["hole_radius"]``: training stores the
inscribed radius of the largest of its training holes (``medvae.training.data.training_hole_radius``), and
:func:`model_hole_radius` reads it (``restore_volume(coarse_holes=False)`` turns the rule off).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from medvae.errors import MedvaeError

#: inscribed radius (px) of the largest holes the network saw in training (0.3 × 128 px boxes / 2), for
#: checkpoints without ``meta["hole_radius"]``
HOLE_RADIUS = 20.0
#: the checkpoint meta key that holds a model's own radius
HOLE_RADIUS_KEY = "hole_radius"
#: distance (px) from the known pixels over which the coarse restoration's weight ramps up (4 to 8 px)
EDGE_RAMP = 4.0
#: the smallest side (px) a shrunk slice may have
MIN_SIDE = 16


def hole_levels(mask: np.ndarray, *, radius: float = HOLE_RADIUS,
                min_side: int = MIN_SIDE) -> tuple[np.ndarray, np.ndarray]:
    """Distance to the nearest known pixel and the shrink factor of each pixel's hole.

    Parameters
    ----------
    mask : (X, Y) bool array, True in the holes. Not modified.
    radius : keyword-only
        Holes whose inscribed radius (the largest distance of one of their pixels to a known pixel)
        exceeds it get the smallest power-of-two factor that brings it to at most ``radius``.
    min_side : keyword-only
        The factor is capped so that the shrunk slice keeps at least this many pixels per side.

    Returns
    -------
    distance : float array, the Euclidean distance of each pixel to the nearest known pixel (0 outside
        the holes).
    factor : int array, 1 outside the holes and in holes that need no shrinking.

    Examples
    --------
    >>> m = np.zeros((256, 256), bool); m[20:120, 20:120] = True; m[200:204, 10:250] = True
    >>> d, f = hole_levels(m)
    >>> int(f[70, 70]), int(f[202, 100]), int(f[0, 0])
    (4, 1, 1)
    """
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    factor = np.ones(mask.shape, dtype=np.int32)
    if not mask.any() or mask.all():  # nothing to fill, or nothing known to measure holes against
        return np.zeros(mask.shape), factor
    distance = ndimage.distance_transform_edt(mask)
    labels, n = ndimage.label(mask)
    inscribed = np.asarray(ndimage.maximum(distance, labels, index=np.arange(1, n + 1)), dtype=np.float64)
    cap = max(1, 2 ** int(math.floor(math.log2(max(1, min(mask.shape) // min_side)))))
    per_hole = np.ones(n + 1, dtype=np.int32)
    big = inscribed > radius
    per_hole[1:][big] = np.minimum(2 ** np.ceil(np.log2(inscribed[big] / radius)), cap).astype(np.int32)
    return distance, per_hole[labels]


def inscribed_radius(mask: np.ndarray) -> float:
    """The inscribed radius (px) of the largest hole in ``mask``: the largest distance of a hole pixel
    to a known pixel; 0 when nothing, or everything, is masked.

    >>> m = np.zeros((64, 64), bool); m[10:30, 10:50] = True
    >>> inscribed_radius(m)
    10.0
    """
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    if not mask.any() or mask.all():
        return 0.0
    return float(ndimage.distance_transform_edt(mask).max())


def model_hole_radius(meta: dict, *, source: object = None) -> float:
    """The radius stored in a checkpoint's ``meta["hole_radius"]``, :data:`HOLE_RADIUS` when it has none."""
    r = meta.get(HOLE_RADIUS_KEY, HOLE_RADIUS)
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not r > 0:
        raise MedvaeError(f"the model's meta['{HOLE_RADIUS_KEY}'] = {r!r} is not a positive number of pixels", source)
    return float(r)


def coarse_weight(distance: np.ndarray, *, ramp: float = EDGE_RAMP) -> np.ndarray:
    """The coarse restoration's weight: 0 up to ``ramp`` px from the known pixels, 1 from ``2 ramp``."""
    return np.clip((np.asarray(distance, dtype=np.float32) - ramp) / ramp, 0.0, 1.0)


def shrink(x, mask, factor: int):
    """Shrink ``(B, 1, X, Y)`` tensors by ``factor``: block means of ``x``, and a block of ``mask`` is a
    hole (1) if any of its pixels is. A size that is not a multiple of ``factor`` gets ``ceil(size /
    factor)`` blocks spread evenly over it (adaptive pooling), so a mirrored slice gets the mirrored
    blocks: padding at the far end moved the block grid under a flip, and ``--ensemble 4`` restored a
    large hole of a mirrored scan up to 5 % of its range differently."""
    import torch.nn.functional as F

    size = (-(-x.shape[-2] // factor), -(-x.shape[-1] // factor))  # on a multiple: plain factor x factor blocks
    return F.adaptive_avg_pool2d(x, size), F.adaptive_max_pool2d(mask, size)


def enlarge(t, shape: tuple[int, int]):
    """Upsample ``(B, 1, x, y)`` to ``shape`` (bilinear, the inverse of :func:`shrink`'s blocks)."""
    import torch.nn.functional as F

    return F.interpolate(t, size=tuple(shape), mode="bilinear", align_corners=False)


def restore_large_holes(restore: Callable, x, m, full, mask: np.ndarray, *, std=None,
                        radius: float = HOLE_RADIUS, ramp: float = EDGE_RAMP):
    """Replace ``full``'s restoration of holes larger than ``radius`` by a coarse-scale one.

    Parameters
    ----------
    restore : callable ``(x, m) -> (restored, std or None)`` on ``(B, 1, X, Y)`` tensors: the network's
        posterior mean and, when ``std`` is given, its predictive std.
    x, m : the batch (window units) and its mask as ``(B, 1, X, Y)`` tensors, as ``restore`` takes them.
    full : the full-scale restoration, float32 ``(B, 1, X, Y)``. Not modified.
    mask : the batch's holes as a bool ``(B, X, Y)`` array.
    std : the full-scale predictive std (or None). Where the coarse restoration is used, the coarse
        std (upsampled) is mixed in by the same weight, so the map describes the fill it comes with.

    Returns
    -------
    ``(mean, std)``: ``full`` and ``std`` themselves when no hole is larger than ``radius``, else new tensors.
    """
    import torch

    levels = [hole_levels(mask[j], radius=radius) for j in range(mask.shape[0])]
    factors = sorted({int(f) for _, fac in levels for f in np.unique(fac)} - {1})
    if not factors:
        return full, std
    out = full.clone()
    out_std = None if std is None else std.float().clone()
    for f in factors:
        idx = [j for j, (_, fac) in enumerate(levels) if (fac == f).any()]
        xs, ms = shrink(x[idx].float(), m[idx].float(), f)
        mean_c, std_c = restore(xs, ms)
        coarse = enlarge(mean_c.float(), tuple(x.shape[-2:]))
        spread = None if out_std is None or std_c is None else enlarge(std_c.float(), tuple(x.shape[-2:]))
        for k, j in enumerate(idx):
            dist, fac = levels[j]
            w = torch.from_numpy(coarse_weight(dist, ramp=ramp) * (fac == f)).to(out.device)
            out[j, 0] = (1 - w) * out[j, 0] + w * coarse[k, 0]
            if spread is not None:
                out_std[j, 0] = (1 - w) * out_std[j, 0] + w * spread[k, 0]
    return out, out_std
