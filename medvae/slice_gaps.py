"""Slices wholly inside the mask, filled from the neighbouring slices.

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
"""
from __future__ import annotations

import numpy as np

#: the factor of an interpolated slice's uncertainty (see the module docstring)
GAP_STD_SCALE = 1.0
#: known slice triples (nearest the gap) that estimate how far the scan departs from linear
TRIPLES = 8


def missing_slices(mask: np.ndarray) -> np.ndarray:
    """Bool per slice (last axis) of a ``(X, Y, Z)`` mask: True where every pixel is masked.

    A mask that covers every slice is global noise, not missing slices: all False then.

    >>> m = np.zeros((4, 4, 3), bool); m[:, :, 1] = True
    >>> missing_slices(m).tolist()
    [False, True, False]
    """
    whole = np.asarray(mask, bool).all(axis=(0, 1))
    return whole if not whole.all() else np.zeros_like(whole)


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


def fill_missing_slices(mean: np.ndarray, missing: np.ndarray, std: np.ndarray | None = None, *,
                        positions: np.ndarray | None = None, scale: float = GAP_STD_SCALE,
                        triples: int = TRIPLES) -> None:
    """Fill the ``missing`` slices of ``mean`` (and ``std``) in place from their nearest known slices.

    Parameters
    ----------
    mean : float array ``(X, Y, Z)``, the restoration; its other slices are read, not changed.
    missing : bool array ``(Z,)``, as :func:`missing_slices` returns it. At least one slice must be known.
    std : optional array ``(X, Y, Z)``, the uncertainty map of the filled slices (see the module docstring).
    positions : optional float array ``(Z,)``, each slice's position along the normal (mm, monotonic);
        default: the slice indices (evenly spaced slices).
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
    steps = np.abs(np.diff(pos))
    unit = float(np.median(steps[steps > 0])) if (steps > 0).any() else 1.0  # the typical step (mm)
    at = pos / unit  # positions in typical steps: the indices for evenly spaced slices
    top = np.finfo(std.dtype).max if std is not None else None
    for k in np.flatnonzero(missing):
        below, above = known[known < k], known[known > k]
        side = None
        if below.size and above.size:  # between two known slices: linear
            lo, hi = int(below[-1]), int(above[0])
        else:  # beyond the first or last known slice: held constant (t = 0)
            side = below[::-1] if below.size else above  # nearest first
            lo = hi = int(side[0])
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
        gap, d = abs(at[hi] - at[lo]), abs(at[k] - at[lo])
        reach = gap ** 2 * t * (1 - t) if hi > lo else float(d * (d + 1))
        std[:, :, k] = np.minimum(scale * np.sqrt(change ** 2 + reach * e ** 2), top)


def _midpoint_error(mean: np.ndarray, missing: np.ndarray, k: int, n: int,
                    at: np.ndarray | None = None) -> np.ndarray:
    """Per pixel, the RMS of ``x[j] - (x[j-1] + x[j+1]) / 2`` over the ``n`` known triples nearest ``k``:
    how far this scan departs from linear across one slice. Without a known triple, the RMS change
    between the nearest known neighbours, and without those the nearest known slice's spread about its
    median: never 0, since a filled slice with no evidence of its own is not certain."""
    z = missing.size
    centres = [j for j in range(1, z - 1) if not missing[j - 1:j + 2].any()]
    centres = sorted(centres, key=lambda j: abs(j - k))[:n]
    if not centres:
        pairs = sorted((j for j in range(z - 1) if not missing[j] and not missing[j + 1]),
                       key=lambda j: abs(j - k))[:n]
        if pairs:
            sq = sum((mean[:, :, j + 1].astype(np.float64) - mean[:, :, j]) ** 2 for j in pairs)
            return np.sqrt(sq / len(pairs)).astype(np.float32)
        known = np.flatnonzero(~missing)
        near = mean[:, :, int(known[np.argmin(np.abs(known - k))])].astype(np.float32)
        return np.abs(near - np.median(near))
    sq = np.zeros(mean.shape[:2], np.float64)
    at = np.arange(z, dtype=np.float64) if at is None else at
    for j in centres:  # the linear prediction from the two neighbours, at this slice's place between them
        w = (at[j] - at[j - 1]) / (at[j + 1] - at[j - 1])
        d = mean[:, :, j].astype(np.float64) - ((1 - w) * mean[:, :, j - 1].astype(np.float64) + w * mean[:, :, j + 1])
        sq += d * d
    return np.sqrt(sq / len(centres)).astype(np.float32)
