"""Slices wholly inside the mask (for CT, all but padding outside the field of view), filled from the
neighbouring slices.

The network restores one slice at a time from the slice's own known pixels. A slice with none (a
missing slice: the ``missing_slices`` corruption, a dropped frame) gives it nothing to start from, and
it returned a blank slice with a small uncertainty. Such a slice is instead interpolated linearly along
the slice axis between the nearest slices that have known pixels (restored first, so their own holes are
filled), and held constant beyond the first or last of them. Its uncertainty combines two terms, times
:data:`GAP_STD_SCALE`: half the difference of those two slices (where the anatomy changes between them
the interpolation is least certain; beyond the last known slice, the change a linear continuation of
the last two would add), and how far the scan itself departs from linear across one slice,
measured on the known slice triples nearest the gap (``x[j] - (x[j-1] + x[j+1]) / 2``, RMS per pixel) and
grown with the distance to the known slices (by ``D² t (1 - t)`` for a slice at ``t`` of a gap of ``D``
slices, 1 for a single missing slice). Measured coverage in docs/benchmarks.md, missing-slices run 1.

With ``positions`` (each slice's place along the normal, in mm, for a DICOM series whose gaps are
uneven), interpolation weights and distances follow the positions instead of the slice indices,
measured in the series' typical (median) step.

A caller that fills part of a scan (the streamed DICOM restore, a slab at a time) gets the whole scan's
filled slices when its part holds :func:`fill_span` and it passes the whole scan's ``step``
(:func:`typical_step`).

What a mask asks for at all, holes or global noise (:func:`is_hole_mask`), is decided here too, for
restoration and evaluation alike.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: CT values at or below this (HU) are no tissue nor air (air is -1000): padding outside the field of view
PADDING_HU = -1500.0


def is_hole_mask(mask: np.ndarray | None, slabs: Any, modality: str) -> bool:
    """Whether ``mask`` asks for inpainting (the holes regime) rather than global denoising.

    An all-True mask is global noise; so is, for CT, a mask whose every pixel left out is padding
    outside the field of view (at or below :data:`PADDING_HU`): the noise mask ``medvae corrupt`` writes
    for a padded CT, which was inpainted as holes over three quarters of the image (858 HU RMS error
    against 19 without the mask). ``slabs``: ``(first, stop) -> (X, Y, stop - first)`` values of the scan
    (HU), read only as far as the first left-out pixel that is not padding."""
    if mask is None or bool(mask.all()):
        return False
    if modality.upper() != "CT":
        return True
    nz = mask.shape[2]
    for a in range(0, nz, 8):
        kept = ~np.asarray(mask[:, :, a:a + 8], bool)
        if kept.any() and bool((np.asarray(slabs(a, min(a + 8, nz)))[kept] > PADDING_HU).any()):
            return True
    return False


#: the factor of an interpolated slice's uncertainty (see the module docstring)
GAP_STD_SCALE = 1.0
#: known slice triples (nearest the gap) that estimate how far the scan departs from linear
TRIPLES = 8


def missing_slices(mask: np.ndarray, slabs: Any = None, floor: float | None = None) -> np.ndarray:
    """Bool per slice (last axis) of a ``(X, Y, Z)`` mask: True where every pixel is masked, or (with
    ``slabs``, ``(first, stop) -> (X, Y, stop - first)`` values of the scan, and ``floor``: a CT's padding
    level) every pixel left out of the mask is padding outside the field of view, at or below ``floor``:
    ``medvae corrupt`` leaves padding out of its masks, and such a slice was restored as one great hole
    (1168 HU RMS off inside the field of view). Every slice with a masked pixel is read then (padding can
    cover most of a slice: a limit of half a slice missed a CT padded outside a circle).

    A mask that covers every slice is global noise, not missing slices: all False then.

    >>> m = np.zeros((4, 4, 3), bool); m[:, :, 1] = True
    >>> missing_slices(m).tolist()
    [False, True, False]
    >>> ct = np.zeros((4, 4, 3)); ct[0] = -3024.0; m[1:, :, 2] = True     # slice 2: all but its padding row
    >>> missing_slices(m, lambda a, b: ct[:, :, a:b], floor=-1500.0).tolist()
    [False, True, True]
    """
    mask = np.asarray(mask, bool)
    whole = mask.all(axis=(0, 1))
    if slabs is not None and floor is not None:
        candidates = ~whole & mask.any(axis=(0, 1))
        for a in range(0, len(whole), 8):  # read in slabs of 8, as is_hole_mask does
            b = min(a + 8, len(whole))
            if candidates[a:b].any():
                kept = ~mask[:, :, a:b]
                # every pixel left out of the mask is padding: no known pixel above the floor
                whole[a:b] |= candidates[a:b] & ~((np.asarray(slabs(a, b)) > floor) & kept).any(axis=(0, 1))
    return whole if not whole.all() else np.zeros_like(whole)


def imaged(gaps: np.ndarray, slabs: Any, mask: np.ndarray) -> list[int]:
    """The missing slices (``gaps``, :func:`missing_slices`) whose masked pixels hold an image rather than
    one value: interpolated all the same (the mask says their pixels are not to be trusted), which
    discards a noise slice of ``medvae corrupt``'s per-slice mixes (``train``, ``mixed``). ``slabs``:
    ``(first, stop) -> (X, Y, stop - first)`` values of the scan; only the missing slices are read.

    >>> image = np.zeros((4, 4, 3)); image[:, :, 2] = np.arange(16).reshape(4, 4)
    >>> imaged(np.array([False, True, True]), lambda a, b: image[:, :, a:b], np.ones((4, 4, 3), bool))
    [2]
    """
    out = []
    for k in np.flatnonzero(gaps):
        values = np.asarray(slabs(int(k), int(k) + 1))[:, :, 0][np.asarray(mask[:, :, k], bool)]
        if values.size and values.min() != values.max():
            out.append(int(k))
    return out


def slice_batches(skip: np.ndarray, batch_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` batches of at most ``batch_size`` consecutive slices, none of them in ``skip``.

    >>> slice_batches(np.array([False, False, True, False, False, False]), 2)
    [(0, 2), (3, 5), (5, 6)]
    """
    batches = []
    k, z = 0, len(skip)
    while k < z:
        if skip[k]:
            k += 1
            continue
        stop = k
        while stop < z and stop - k < batch_size and not skip[stop]:
            stop += 1
        batches.append((k, stop))
        k = stop
    return batches


def typical_step(positions: np.ndarray | None) -> float:
    """The typical (median) step between slices of ``positions`` (mm); 1 for slice indices (None).

    >>> typical_step(np.array([0.0, 1.5, 3.0, 4.5, 9.0]))
    1.5
    """
    if positions is None:
        return 1.0
    steps = np.abs(np.diff(np.asarray(positions, np.float64)))
    return float(np.median(steps[steps > 0])) if (steps > 0).any() else 1.0


def _sides(known: np.ndarray, k: int) -> tuple[int, int, np.ndarray | None]:
    """``(lo, hi, side)`` of missing slice ``k``: its nearest known slices below and above; beyond the
    first or last known slice ``lo == hi`` and ``side`` lists the known slices on that side, nearest first."""
    below, above = known[known < k], known[known > k]
    if below.size and above.size:  # between two known slices: linear
        return int(below[-1]), int(above[0]), None
    side = below[::-1] if below.size else above  # beyond: held constant
    return int(side[0]), int(side[0]), side


def _error_slices(missing: np.ndarray, k: int, n: int) -> tuple[str, list[int]]:
    """What :func:`_midpoint_error` measures for slice ``k``: ``("triples", centres)``, the ``n`` known
    triples nearest ``k``; without one ``("pairs", firsts)``, the ``n`` nearest known neighbour pairs;
    without those ``("near", [j])``, the nearest known slice."""
    z = missing.size
    centres = [j for j in range(1, z - 1) if not missing[j - 1:j + 2].any()]
    if centres:
        return "triples", sorted(centres, key=lambda j: abs(j - k))[:n]
    pairs = [j for j in range(z - 1) if not missing[j] and not missing[j + 1]]
    if pairs:
        return "pairs", sorted(pairs, key=lambda j: abs(j - k))[:n]
    known = np.flatnonzero(~missing)
    return "near", [int(known[np.argmin(np.abs(known - k))])]


def fill_span(missing: np.ndarray, start: int, stop: int, *, uncertainty: bool = True,
              triples: int = TRIPLES) -> tuple[int, int]:
    """The slices ``[a, b)`` that :func:`fill_missing_slices` reads to fill the missing slices among
    ``start:stop`` of the whole scan, with ``start:stop`` itself.

    Filling the part ``[a, b)`` of a scan (``missing[a:b]``, the whole scan's ``step``) gives those
    slices exactly as filling the whole scan does; any larger part does too.

    Parameters
    ----------
    missing : bool array ``(Z,)`` of the whole scan (:func:`missing_slices`).
    start, stop : the slices wanted.
    uncertainty : keyword-only; also the slices the std of a filled slice reads (its known triples); False:
        the nearest known slices only, all the mean reads.
    triples : keyword-only; as for :func:`fill_missing_slices`.

    Examples
    --------
    >>> gaps = np.array([True, True, False, False, False, False, False, False])
    >>> fill_span(gaps, 0, 2, uncertainty=False), fill_span(gaps, 0, 2, triples=2)
    ((0, 3), (0, 6))
    """
    missing = np.asarray(missing, bool)
    known = np.flatnonzero(~missing)
    a, b = int(start), int(stop)
    if known.size == 0:
        return a, b
    for k in np.flatnonzero(missing[start:stop]) + start:
        lo, hi, side = _sides(known, int(k))
        reads = [lo, hi]
        if uncertainty:  # the next known slice beyond an end, and the known triples (or pairs)
            reads += [int(side[1])] if side is not None and side.size > 1 else []
            kind, js = _error_slices(missing, int(k), triples)
            reach = {"triples": (-1, 1), "pairs": (0, 1), "near": (0, 0)}[kind]
            reads += [min(js) + reach[0], max(js) + reach[1]]
        a, b = min(a, *reads), max(b, max(reads) + 1)
    return a, b


def fill_missing_slices(mean: np.ndarray, missing: np.ndarray, std: np.ndarray | None = None, *,
                        positions: np.ndarray | None = None, step: float | None = None,
                        scale: float = GAP_STD_SCALE, triples: int = TRIPLES) -> None:
    """Fill the ``missing`` slices of ``mean`` (and ``std``) in place from their nearest known slices.

    Parameters
    ----------
    mean : float array ``(X, Y, Z)``, the restoration; its other slices are read, not changed.
    missing : bool array ``(Z,)``, as :func:`missing_slices` returns it. At least one slice must be known.
    std : optional array ``(X, Y, Z)``, the uncertainty map of the filled slices (see the module docstring).
    positions : optional float array ``(Z,)``, each slice's position along the normal (mm, monotonic);
        default: the slice indices (evenly spaced slices).
    step : keyword-only; the typical step (mm) distances are measured in. Default: ``positions``'
        (:func:`typical_step`); a caller filling part of a scan passes the whole scan's.
    scale, triples : keyword-only; the std's factor and how many known slice triples estimate the
        interpolation error.

    Examples
    --------
    >>> v = np.zeros((2, 2, 4), np.float32); v[:, :, 0] = 10; v[:, :, 3] = 40
    >>> fill_missing_slices(v, np.array([False, True, True, False]))
    >>> v[0, 0].tolist()
    [10.0, 20.0, 30.0, 40.0]
    >>> v[:, :, 1:3] = 0; fill_missing_slices(v, np.array([False, True, True, False]), positions=np.array([0, 1, 1.5, 2.0]))
    >>> v[0, 0].tolist()
    [10.0, 25.0, 32.5, 40.0]
    """
    missing = np.asarray(missing, bool)
    known = np.flatnonzero(~missing)
    if not missing.any() or known.size == 0:
        return
    pos = np.arange(missing.size, dtype=np.float64) if positions is None else np.asarray(positions, np.float64)
    unit = typical_step(positions) if step is None else float(step)
    at = pos / unit  # positions in typical steps: the indices for evenly spaced slices
    top = np.finfo(std.dtype).max if std is not None else None
    clipped = False
    for k in np.flatnonzero(missing):
        lo, hi, side = _sides(known, int(k))  # beyond the first or last known slice: held (t = 0)
        t = (at[k] - at[lo]) / (at[hi] - at[lo]) if hi > lo else 0.0
        a, b = mean[:, :, lo].astype(np.float32), mean[:, :, hi].astype(np.float32)
        mean[:, :, k] = (1 - t) * a + t * b
        if std is None:
            continue
        if side is None:  # the two slices' disagreement
            change = np.abs(b - a) / 2
        elif side.size > 1:  # the change a linear continuation would add
            change = np.abs(a - mean[:, :, side[1]]) * (abs(at[k] - at[lo]) / abs(at[int(side[1])] - at[lo]))
        else:
            change = np.zeros_like(a)
        # the midpoint error of the nearest known triples, grown to this slice's place in its gap
        e = _midpoint_error(mean, missing, k, triples, at)
        positive = e[e > 0]  # a pixel where the known slices agree exactly still has a fill that may be wrong
        e = np.maximum(e, 0.1 * float(np.median(positive)) if positive.size else 1.0)
        gap, d = abs(at[hi] - at[lo]), abs(at[k] - at[lo])
        reach = gap ** 2 * t * (1 - t) if hi > lo else float(d * (d + 1))
        spread = scale * np.sqrt(change ** 2 + reach * e ** 2)
        if spread.max() > top and not clipped:  # said once, as restore_volume says it, never silently
            clipped = True
            log.warning("the uncertainty of a missing slice exceeds %.6g (the %s map's largest value) and is "
                        "clipped there", top, std.dtype)
        std[:, :, k] = np.minimum(spread, top)


def _midpoint_error(mean: np.ndarray, missing: np.ndarray, k: int, n: int,
                    at: np.ndarray | None = None) -> np.ndarray:
    """Per pixel, the RMS of ``x[j] - (x[j-1] + x[j+1]) / 2`` over the ``n`` known triples nearest ``k``:
    how far this scan departs from linear across one slice. Without a known triple, the RMS change
    between the nearest known neighbours, and without those the nearest known slice's spread about its
    median: never 0, since a filled slice with no evidence of its own is not certain."""
    kind, centres = _error_slices(missing, k, n)
    if kind == "pairs":
        sq = sum((mean[:, :, j + 1].astype(np.float64) - mean[:, :, j]) ** 2 for j in centres)
        return np.sqrt(sq / len(centres)).astype(np.float32)
    if kind == "near":
        # the slice's spread about its median, with its robust scale (MAD) added: |x - median| alone was
        # 0 at every pixel at the median (hundreds of HU-integer tissue pixels), however wrong the fill
        near = mean[:, :, centres[0]].astype(np.float64)
        dev = np.abs(near - np.median(near))
        floor = 1.4826 * float(np.median(dev)) or float(dev.mean()) or 1.0  # a constant slice: one unit
        return np.sqrt(dev ** 2 + floor ** 2).astype(np.float32)
    sq = np.zeros(mean.shape[:2], np.float64)
    at = np.arange(missing.size, dtype=np.float64) if at is None else at
    for j in centres:  # the linear prediction from the two neighbours, at this slice's place between them
        w = (at[j] - at[j - 1]) / (at[j + 1] - at[j - 1])
        d = mean[:, :, j].astype(np.float64) - ((1 - w) * mean[:, :, j - 1].astype(np.float64) + w * mean[:, :, j + 1])
        sq += d * d
    return np.sqrt(sq / len(centres)).astype(np.float32)
