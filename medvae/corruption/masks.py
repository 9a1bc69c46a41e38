"""Mask corruptions: pixels to restore are overwritten by a ``fill`` value and returned as a mask.

Every transform returns ``(image, mask)`` like the noise transforms (see
:mod:`medvae.corruption.noise`): the mask has shape ``(1, *spatial)``, dtype bool, ``True`` = the
pixel was erased and must be restored. Every channel is erased at the same pixels.

``fill`` (keyword-only everywhere) is the value written into the holes:

* a number (default ``0.0``): on images normalized by the intensity window (the recipes' input),
  0 is the bottom of the window, i.e. air (-1000 HU) for CT and the 0.5 % percentile (background)
  for MR in training; ``medvae corrupt`` scales MR magnitude data from zero signal
  (:func:`medvae.corruption.volume.recipe_window`), so there 0 is no signal. Either way holes look
  like "no signal" and do not depend on the image content;
* ``"min"``: each channel's minimum, for images in other units.

The random transforms draw shapes until the covered fraction of the image lands in the
``coverage`` range: a target is drawn uniformly in the range, shapes are added while they keep
the coverage below the range's maximum, until the target is reached (at most ``max_tries``
shapes are tried, otherwise a ``ValueError`` says the range cannot be reached with those sizes).
A single number ``c`` (or a range ``[c, c]``) means *at least* ``c``: whole shapes rarely add up to
an exact fraction of the pixels, so the last shape may go beyond ``c``: by at most 5 % of it
(:data:`AT_LEAST_SLACK`), or, when 50 draws in a row found no shape that small, by the least of them.

Examples
--------
>>> import numpy as np
>>> t = RandBoxMask(coverage=(0.1, 0.2)).set_random_state(0)
>>> out, mask = t(np.ones((1, 64, 64), np.float32))
>>> 0.1 <= float(mask.mean()) <= 0.2, bool((out[mask] == 0).all())
(True, True)
"""
from __future__ import annotations

from functools import lru_cache
from os import PathLike
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from medvae.corruption.noise import Corruption, RandCorruption, register
from medvae.corruption.ranges import parse_int, parse_range, parse_value

__all__ = [
    "BoxMask", "RandBoxMask", "StrokeMask", "RandStrokeMask", "StripeMask", "RandStripeMask",
    "MissingSlices", "RandMissingSlices", "FileMask", "RandFileMask",
]

Region = tuple[tuple[slice, ...], np.ndarray]  # (bounding-box slices, boolean patch)


def _parse_fill(fill: Any) -> float | str:
    if isinstance(fill, str):
        if fill != "min":
            raise ValueError(f"fill must be a number or 'min', got {fill!r}")
        return fill
    return float(parse_value(fill, "fill"))


def _apply_fill(x: np.ndarray, mask: np.ndarray, fill: float | str) -> np.ndarray:
    out = x.copy()
    m = mask[0]
    for c in range(out.shape[0]):
        v = out[c].min() if fill == "min" else fill
        out[c][m] = v
    return out


class _MaskCorruption(Corruption):
    """Deterministic mask corruption: subclasses build the ``(1, *spatial)`` mask."""

    fill: float | str

    def _mask(self, spatial: tuple[int, ...]) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def _apply(self, x):
        mask = self._mask(tuple(x.shape[1:]))[None]
        return _apply_fill(x, mask, self.fill), mask


#: a single ``coverage`` c: a shape that takes the coverage to at most ``c * AT_LEAST_SLACK`` ends the
#: draw at once; after 50 draws in a row found none, the one of them that overshoots least ends it
AT_LEAST_SLACK = 1.05


def _grow(
    R: np.random.RandomState,
    spatial: tuple[int, ...],
    coverage: tuple[float, float],
    sample: Callable[[], Any],
    render: Callable[[Any, tuple[int, ...]], Region],
    *,
    max_tries: int,
    name: str,
) -> list[Any]:
    """Draw shapes with ``sample`` until the union covers a fraction in ``coverage`` (``lo == hi``: at
    least ``lo``, the last shape may go beyond it)."""
    lo, hi = coverage
    at_least = lo == hi  # an exact fraction: no shape could be rejected for overshooting it
    total = float(np.prod(spatial))
    target = float(R.uniform(lo, hi))
    mask = np.zeros(spatial, dtype=bool)
    count = 0
    items: list[Any] = []
    tries = rejected = 0
    closest = None  # at least lo: the overshooting shape of this streak of draws that overshoots least
    while count / total < target:
        if rejected >= 50 and count / total >= lo:
            break  # the target is out of reach with these sizes, but the coverage is in range
        if at_least and rejected >= 50 and closest is not None:  # no shape fits: take the closest
            item, sl, patch, added = closest
            closest, rejected = None, 0
            mask[sl] |= patch
            count += added
            items.append(item)
            continue
        if tries >= max_tries:
            raise ValueError(
                f"{name}: could not reach a coverage in [{lo:g}, {hi:g}] after {max_tries} shapes "
                f"(reached {count / total:.3f}); widen coverage or change the shape sizes"
            )
        tries += 1
        item = sample()
        sl, patch = render(item, spatial)
        added = int((patch & ~mask[sl]).sum())
        over = (count + added) / total > hi
        if at_least and over and added > 0:
            if (count + added) / total <= hi * AT_LEAST_SLACK:
                over = False  # close enough: this shape ends the draw
            elif closest is None or added < closest[3]:
                closest = (item, sl, patch, added)
        if added == 0 or over:
            rejected += 1
            continue
        rejected, closest = 0, None
        mask[sl] |= patch
        count += added
        items.append(item)
    return items


# --------------------------------------------------------------------------------------------
# boxes
# --------------------------------------------------------------------------------------------
def _render_box(box: Sequence[Sequence[int]], spatial: tuple[int, ...]) -> Region:
    start, stop = box
    sl = tuple(slice(max(0, int(a)), min(s, int(b))) for a, b, s in zip(start, stop, spatial))
    shape = tuple(max(0, x.stop - x.start) for x in sl)
    if 0 in shape:  # a given box wholly beyond the image erased nothing (sampled ones start inside)
        raise ValueError(f"box {[list(start), list(stop)]} lies outside the image of spatial shape {tuple(spatial)}")
    return sl, np.ones(shape, dtype=bool)


class BoxMask(_MaskCorruption):
    """Erase axis-aligned boxes.

    Parameters
    ----------
    boxes : list of [start, stop]
        Each box is ``[[start per spatial axis], [stop per spatial axis]]`` (half-open, pixels).
    fill : float or "min", keyword-only
        Value written in the boxes (default 0.0, see the module notes).

    Examples
    --------
    >>> out, mask = BoxMask([[[2, 2], [6, 10]]])(np.ones((1, 16, 16), np.float32))
    >>> int(mask.sum())
    32
    """

    def __init__(self, boxes: Sequence[Sequence[Sequence[int]]], *, fill: float | str = 0.0) -> None:
        if not isinstance(boxes, (list, tuple)):
            raise ValueError(f"boxes must be a list of [start, stop] pairs, got {boxes!r}")
        self.boxes = []
        for b in boxes:
            if not (isinstance(b, (list, tuple)) and len(b) == 2 and len(b[0]) == len(b[1])):
                raise ValueError(f"boxes: each box must be [[start...], [stop...]], got {b!r}")
            start, stop = [parse_int(v, "boxes", low=0) for v in b[0]], [parse_int(v, "boxes", low=0) for v in b[1]]
            if len(start) != len(stop) or any(e <= a for a, e in zip(start, stop)):  # an empty box: a typo
                raise ValueError(f"boxes: each stop must lie past its start in every dimension, got {b!r}")
            self.boxes.append([start, stop])
        self.fill = _parse_fill(fill)

    def params(self):
        return {"boxes": self.boxes, "fill": self.fill}

    def _mask(self, spatial):
        mask = np.zeros(spatial, dtype=bool)
        for b in self.boxes:
            if len(b[0]) != len(spatial):
                raise ValueError(f"boxes: box {b} does not fit a {len(spatial)}-D image")
            sl, patch = _render_box(b, spatial)
            mask[sl] |= patch
        return mask


class _RandMask(RandCorruption):
    def __init__(self, *, coverage, fill, max_tries, prob) -> None:
        super().__init__(prob=prob)
        self.coverage = parse_range(coverage, "coverage", low=0, high=1)
        self.fill = _parse_fill(fill)
        self.max_tries = parse_int(max_tries, "max_tries", low=1)


@register("boxes")
class RandBoxMask(_RandMask):
    """Random boxes covering a fraction of the image in ``coverage``.

    Parameters
    ----------
    coverage : float or (float, float), keyword-only
        Fraction of the pixels to erase, in [0, 1] (default 0.05-0.25); a single number: at least
        that fraction (see the module docstring).
    size : float or (float, float), keyword-only
        Box side as a fraction of the image side, drawn per axis (default 0.05-0.3).
    fill : float or "min", keyword-only
    max_tries : int, keyword-only
        Bound on the number of boxes drawn (default 1000).
    prob : float, keyword-only

    Examples
    --------
    >>> out, mask = RandBoxMask(coverage=(0.1, 0.2)).set_random_state(0)(np.ones((1, 64, 64)))
    """

    deterministic = BoxMask

    def __init__(self, *, coverage: float | Sequence[float] = (0.05, 0.25), size: float | Sequence[float] = (0.05, 0.3),
                 fill: float | str = 0.0, max_tries: int = 1000, prob: float = 1.0) -> None:
        super().__init__(coverage=coverage, fill=fill, max_tries=max_tries, prob=prob)
        self.size = parse_range(size, "size", low=0, high=1, low_open=True)

    def _sample(self, spatial, img):
        def sample():
            sizes = [max(1, int(round(self.R.uniform(*self.size) * s))) for s in spatial]
            start = [int(self.R.randint(0, s - z + 1)) for s, z in zip(spatial, sizes)]
            return [start, [a + z for a, z in zip(start, sizes)]]

        boxes = _grow(self.R, spatial, self.coverage, sample, _render_box, max_tries=self.max_tries, name="boxes")
        return {"boxes": boxes, "fill": self.fill}


# --------------------------------------------------------------------------------------------
# strokes (scratches)
# --------------------------------------------------------------------------------------------
def _render_stroke(stroke: dict[str, Any], spatial: tuple[int, ...]) -> Region:
    pts = np.asarray(stroke["points"], dtype=np.float64)
    r = max(float(stroke["width"]) / 2.0, 0.71)  # at least 8-connected
    lo = np.maximum(np.floor(pts.min(0) - r), 0).astype(int)
    hi = np.minimum(np.ceil(pts.max(0) + r) + 1, spatial).astype(int)
    if (hi <= lo).any():  # a given stroke wholly beyond the image (sampled ones start inside)
        raise ValueError(f"stroke {pts.tolist()} (width {stroke['width']}) lies outside the image of "
                         f"spatial shape {tuple(spatial)}")
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    grids = np.ogrid[sl]
    patch = np.zeros(tuple(hi - lo), dtype=bool)
    for p0, p1 in zip(pts[:-1], pts[1:]):
        d = p1 - p0
        dd = float(d @ d)
        # projection parameter of every pixel centre on the segment, clipped to [0, 1]
        t = sum((g - a) * b for g, a, b in zip(grids, p0, d))
        t = np.clip(t / dd, 0.0, 1.0) if dd > 0 else np.zeros_like(t, dtype=float)
        dist2 = sum((g - (a + t * b)) ** 2 for g, a, b in zip(grids, p0, d))
        patch |= dist2 <= r * r
    return sl, patch


class StrokeMask(_MaskCorruption):
    """Erase thick polylines (free-form strokes, scratches).

    Parameters
    ----------
    strokes : list of dict
        Each ``{"points": [[coordinates per spatial axis], ...], "width": pixels}``; the pixels
        whose centre is within ``width / 2`` of the polyline are erased.
    fill : float or "min", keyword-only

    Examples
    --------
    >>> out, mask = StrokeMask([{"points": [[2, 2], [2, 12]], "width": 3}])(np.ones((1, 16, 16)))
    >>> int(mask.sum())
    39
    """

    def __init__(self, strokes: Sequence[dict[str, Any]], *, fill: float | str = 0.0) -> None:
        if not isinstance(strokes, (list, tuple)):
            raise ValueError(f"strokes must be a list of {{points, width}} dicts, got {strokes!r}")
        self.strokes = []
        for s in strokes:
            if not isinstance(s, dict) or set(s) != {"points", "width"} or len(s["points"]) < 2:
                raise ValueError(f"strokes: each stroke needs 'points' (>= 2) and 'width', got {s!r}")
            pts = [[float(parse_value(v, "strokes.points")) for v in p] for p in s["points"]]
            self.strokes.append({"points": pts, "width": float(parse_value(s["width"], "strokes.width", low=0))})
        self.fill = _parse_fill(fill)

    def params(self):
        return {"strokes": self.strokes, "fill": self.fill}

    def _mask(self, spatial):
        mask = np.zeros(spatial, dtype=bool)
        for s in self.strokes:
            if any(len(p) != len(spatial) for p in s["points"]):
                raise ValueError(f"strokes: points do not fit a {len(spatial)}-D image")
            sl, patch = _render_stroke(s, spatial)
            mask[sl] |= patch
        return mask


@register("strokes")
class RandStrokeMask(_RandMask):
    """Random strokes: polyline walks with a random thickness.

    Each stroke starts at a random point and walks ``vertices - 1`` segments, turning by a random
    amount at each vertex and bouncing off the image border.

    Parameters
    ----------
    coverage : float or (float, float), keyword-only
        Fraction of pixels to erase (default 0.03-0.15).
    width : float or (float, float), keyword-only
        Stroke thickness as a fraction of the largest image side (default 0.01-0.05).
    length : float or (float, float), keyword-only
        Segment length as a fraction of the largest image side (default 0.1-0.3).
    vertices : int or (int, int), keyword-only
        Number of points per stroke (default 3-7).
    turn : float, keyword-only
        Standard deviation of the direction change between segments (radians-like, default 0.8).
    fill, max_tries, prob : keyword-only

    Examples
    --------
    >>> out, mask = RandStrokeMask().set_random_state(0)(np.ones((1, 64, 64), np.float32))
    """

    deterministic = StrokeMask

    def __init__(self, *, coverage: float | Sequence[float] = (0.03, 0.15), width: float | Sequence[float] = (0.01, 0.05),
                 length: float | Sequence[float] = (0.1, 0.3), vertices: int | Sequence[int] = (3, 7),
                 turn: float = 0.8, fill: float | str = 0.0, max_tries: int = 1000, prob: float = 1.0) -> None:
        super().__init__(coverage=coverage, fill=fill, max_tries=max_tries, prob=prob)
        self.width = parse_range(width, "width", low=0, high=1, low_open=True)
        self.length = parse_range(length, "length", low=0, high=1)
        self.vertices = parse_range(vertices, "vertices", low=2, integer=True)
        self.turn = float(parse_value(turn, "turn", low=0))

    def _sample(self, spatial, img):
        scale = float(max(spatial))
        hi_pt = np.array(spatial, dtype=float) - 1

        def sample():
            n = int(self.R.randint(self.vertices[0], self.vertices[1] + 1))
            width = max(1.0, self.R.uniform(*self.width) * scale)
            p = self.R.uniform(0, 1, len(spatial)) * hi_pt
            d = self.R.normal(size=len(spatial))
            pts = [p]
            for _ in range(n - 1):
                d = d / max(np.linalg.norm(d), 1e-12)
                p = p + d * self.R.uniform(*self.length) * scale
                # bounce off the image border instead of sliding along it
                low, high = p < 0, p > hi_pt
                p = np.where(low, -p, np.where(high, 2 * hi_pt - p, p))
                d = np.where(low | high, -d, d)
                p = np.clip(p, 0, hi_pt)
                pts.append(p)
                d = d + self.turn * self.R.normal(size=len(spatial))
            return {"points": [[round(float(v), 3) for v in q] for q in pts], "width": round(float(width), 3)}

        strokes = _grow(self.R, spatial, self.coverage, sample, _render_stroke, max_tries=self.max_tries, name="strokes")
        return {"strokes": strokes, "fill": self.fill}


# --------------------------------------------------------------------------------------------
# stripes (dropped rows / columns)
# --------------------------------------------------------------------------------------------
def _render_band(band: Sequence[int], spatial: tuple[int, ...], axis: int) -> Region:
    a, b = int(band[0]), int(band[1])
    sl = tuple(slice(max(0, a), min(s, b)) if d == axis else slice(None) for d, s in enumerate(spatial))
    shape = tuple(max(0, x.stop - x.start) if d == axis else s for d, (x, s) in enumerate(zip(sl, spatial)))
    if shape[axis] == 0:  # a given stripe wholly beyond the image erased nothing (sampled ones lie inside)
        raise ValueError(f"stripe {[a, b]} lies outside the image: axis {axis} has {spatial[axis]} pixels")
    return sl, np.ones(shape, dtype=bool)


class StripeMask(_MaskCorruption):
    """Erase whole rows or columns (dropped lines): bands ``[start, stop)`` along ``axis``.

    Parameters
    ----------
    stripes : list of [start, stop]
        Half-open index ranges along ``axis``.
    axis : int, keyword-only
        Spatial axis the stripes are indexed along (0: rows of H, 1: columns of W).
    fill : float or "min", keyword-only

    Examples
    --------
    >>> out, mask = StripeMask([[3, 5]], axis=0)(np.ones((1, 8, 10)))
    >>> int(mask.sum())
    20
    """

    def __init__(self, stripes: Sequence[Sequence[int]], *, axis: int = 0, fill: float | str = 0.0) -> None:
        if not isinstance(stripes, (list, tuple)) or any(not isinstance(s, (list, tuple)) or len(s) != 2 for s in stripes):
            raise ValueError(f"stripes must be a list of [start, stop] pairs, got {stripes!r}")
        self.stripes = [[parse_int(a, "stripes", low=0), parse_int(b, "stripes", low=0)] for a, b in stripes]
        if any(b <= a for a, b in self.stripes):  # an empty stripe: a typo, as an empty box is
            raise ValueError(f"stripes: each stop must lie past its start, got {stripes!r}")
        self.axis = parse_int(axis, "axis", low=0, high=2)
        self.fill = _parse_fill(fill)

    def params(self):
        return {"stripes": self.stripes, "axis": self.axis, "fill": self.fill}

    def _mask(self, spatial):
        if self.axis >= len(spatial):
            raise ValueError(f"axis {self.axis} does not exist in a {len(spatial)}-D image")
        mask = np.zeros(spatial, dtype=bool)
        for band in self.stripes:
            sl, patch = _render_band(band, spatial, self.axis)
            mask[sl] |= patch
        return mask


@register("stripes")
class RandStripeMask(_RandMask):
    """Random dropped rows or columns.

    Parameters
    ----------
    coverage : float or (float, float), keyword-only
        Fraction of pixels to erase (default 0.03-0.15).
    width : int or (int, int), keyword-only
        Stripe width in pixels (default 1-4).
    axes : list of int, keyword-only
        Candidate axes, one is drawn per call (default ``[0, 1]``: rows or columns).
    fill, max_tries, prob : keyword-only

    Examples
    --------
    >>> out, mask = RandStripeMask().set_random_state(0)(np.ones((1, 64, 64), np.float32))
    """

    deterministic = StripeMask

    def __init__(self, *, coverage: float | Sequence[float] = (0.03, 0.15), width: int | Sequence[int] = (1, 4),
                 axes: Sequence[int] = (0, 1), fill: float | str = 0.0, max_tries: int = 1000, prob: float = 1.0) -> None:
        super().__init__(coverage=coverage, fill=fill, max_tries=max_tries, prob=prob)
        self.width = parse_range(width, "width", low=1, integer=True)
        if not isinstance(axes, (list, tuple)) or not axes:
            raise ValueError(f"axes must be a non-empty list of spatial axes, got {axes!r}")
        self.axes = [parse_int(a, "axes", low=0, high=2) for a in axes]

    def _sample(self, spatial, img):
        axes = [a for a in self.axes if a < len(spatial)]
        if not axes:
            raise ValueError(f"axes {self.axes} do not exist in a {len(spatial)}-D image")
        axis = int(axes[self.R.randint(len(axes))])
        n = spatial[axis]

        def sample():
            w = min(n, int(self.R.randint(self.width[0], self.width[1] + 1)))
            a = int(self.R.randint(0, n - w + 1))
            return [a, a + w]

        stripes = _grow(self.R, spatial, self.coverage, sample, lambda b, s: _render_band(b, s, axis),
                        max_tries=self.max_tries, name="stripes")
        return {"stripes": sorted(stripes), "axis": axis, "fill": self.fill}


# --------------------------------------------------------------------------------------------
# missing slices (3-D)
# --------------------------------------------------------------------------------------------
class MissingSlices(_MaskCorruption):
    """Erase whole slices of a 3-D volume ``(C, H, W, D)``.

    Parameters
    ----------
    slices : list of int
        Indices along ``axis`` of the erased slices.
    axis : int, keyword-only
        Spatial axis (default 2, the slice axis D / Z).
    fill : float or "min", keyword-only

    Examples
    --------
    >>> out, mask = MissingSlices([1, 2])(np.ones((1, 8, 8, 10)))
    >>> float(mask.mean())
    0.2
    """

    spatial_dims = (3,)

    def __init__(self, slices: Sequence[int], *, axis: int = 2, fill: float | str = 0.0) -> None:
        if not isinstance(slices, (list, tuple)):
            raise ValueError(f"slices must be a list of slice indices, got {slices!r}")
        self.slices = sorted({parse_int(k, "slices", low=0) for k in slices})
        self.axis = parse_int(axis, "axis", low=0, high=2)
        self.fill = _parse_fill(fill)

    def params(self):
        return {"slices": self.slices, "axis": self.axis, "fill": self.fill}

    def _mask(self, spatial):
        mask = np.zeros(spatial, dtype=bool)
        if self.slices and self.slices[-1] >= spatial[self.axis]:
            raise ValueError(f"slices: index {self.slices[-1]} out of range for axis size {spatial[self.axis]}")
        idx = [slice(None)] * 3
        idx[self.axis] = self.slices
        mask[tuple(idx)] = True
        return mask


@register("missing_slices")
class RandMissingSlices(_RandMask):
    """Random missing slices (runs of ``run_length`` consecutive slices) in a 3-D volume.

    Parameters
    ----------
    coverage : float or (float, float), keyword-only
        Fraction of slices to erase (default 0.05-0.2).
    run_length : int or (int, int), keyword-only
        Consecutive slices per gap (default 1-3).
    axis : int, keyword-only
        Slice axis (default 2).
    fill, max_tries, prob : keyword-only

    Examples
    --------
    >>> out, mask = RandMissingSlices().set_random_state(0)(np.ones((1, 8, 8, 40)))
    """

    deterministic = MissingSlices

    def __init__(self, *, coverage: float | Sequence[float] = (0.05, 0.2), run_length: int | Sequence[int] = (1, 3),
                 axis: int = 2, fill: float | str = 0.0, max_tries: int = 1000, prob: float = 1.0) -> None:
        super().__init__(coverage=coverage, fill=fill, max_tries=max_tries, prob=prob)
        self.run_length = parse_range(run_length, "run_length", low=1, integer=True)
        self.axis = parse_int(axis, "axis", low=0, high=2)

    def _sample(self, spatial, img):
        n = spatial[self.axis]
        lo, hi = self.coverage
        if not any(lo <= k / n <= hi for k in range(1, n + 1)):
            # no whole number of slices lies in the coverage: said so, not "could not reach a coverage"
            raise ValueError(f"missing_slices: a volume of {n} slices cannot lose a share in [{lo:g}, {hi:g}] "
                             f"of them (one slice is {1 / n:.0%}); give it more slices or a wider coverage")

        def sample():
            w = min(n, int(self.R.randint(self.run_length[0], self.run_length[1] + 1)))
            a = int(self.R.randint(0, n - w + 1))
            return [a, a + w]

        runs = _grow(self.R, (n,), self.coverage, sample, lambda b, s: _render_band(b, s, 0),
                     max_tries=self.max_tries, name="missing_slices")
        slices = sorted({k for a, b in runs for k in range(a, b)})
        return {"slices": slices, "axis": self.axis, "fill": self.fill}


# --------------------------------------------------------------------------------------------
# mask from a file
# --------------------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def _load_mask_cached(path: str, mtime_ns: int, size: int) -> np.ndarray:
    from medvae.io.formats import as_mask

    a = as_mask(_load_mask_array(Path(path)), path)
    a.flags.writeable = False
    return a


def _load_mask_array(path: Path) -> np.ndarray:
    try:
        from medvae.io import load_scan  # type: ignore[attr-defined]
    except ImportError:
        load_scan = None
    if load_scan is not None:
        return np.asarray(load_scan(path).array)
    import nibabel as nib

    return np.asarray(nib.load(str(path)).dataobj)


def _mask_path(path: str | PathLike) -> str:
    """A mask file's path as given; an empty one was read as the working folder (``Path("")``)."""
    if not isinstance(path, (str, PathLike)) or not str(path).strip():
        raise ValueError(f"path: the mask file's path is empty or not a path ({path!r})")
    return str(path)


class FileMask(_MaskCorruption):
    """Erase the pixels given by a mask file (NIfTI, or anything :func:`medvae.io.load_scan` reads).

    Non-zero voxels are erased. The file's array must have the image's spatial shape, possibly
    with extra singleton axes (``(H, W, 1)`` for a 2-D image, ``(1, H, W)``...); a one-slice mask
    of a 3-D image is used on every slice.

    Parameters
    ----------
    path : str or PathLike
        Mask file.
    fill : float or "min", keyword-only

    Examples
    --------
    >>> out, mask = FileMask("lesion_mask.nii.gz")(image)  # doctest: +SKIP
    """

    # a mask file of a scan covers its volume: corrupt_volume runs it on the volume where it can
    volume_mode = "volume"

    def __init__(self, path: str | PathLike, *, fill: float | str = 0.0) -> None:
        self.path = _mask_path(path)
        self.fill = _parse_fill(fill)

    def params(self):
        return {"path": self.path, "fill": self.fill}

    def _mask(self, spatial):
        p = Path(self.path).expanduser()
        if not p.exists():
            raise ValueError(f"path: mask file {self.path} does not exist")
        st = p.stat()
        a = _load_mask_cached(str(p.resolve()), st.st_mtime_ns, st.st_size)
        squeezed = a.reshape([s for s in a.shape if s != 1])
        want = tuple(s for s in spatial if s != 1)
        if squeezed.shape == want:  # a copy: the cached array is shared by every call (and read-only)
            return squeezed.reshape(spatial).copy()
        plane = tuple(s for s in spatial[:2] if s != 1)
        if len(spatial) == 3 and squeezed.shape == plane:  # a one-slice mask: the same on every slice
            return np.broadcast_to(squeezed.reshape(spatial[:2] + (1,)), spatial).copy()
        if len(spatial) == 2 and a.ndim == 3 and a.shape[:2] == tuple(spatial):
            raise ValueError(f"mask file {self.path} is a volume (shape {a.shape}) and this recipe corrupts slice "
                             "by slice (a step of it needs slices): give file_mask alone, or with voxel-wise noise, "
                             "to mask the volume, or give a one-slice mask")
        raise ValueError(f"mask file {self.path} has shape {a.shape}, the image's spatial shape is {spatial}")


@register("file_mask")
class RandFileMask(_RandMask):
    """A :class:`FileMask` usable in recipes (nothing random except ``prob``).

    A relative ``path`` is read from the working directory of the call, and recorded resolved
    (absolute), so the record replays from any working directory.

    Examples
    --------
    >>> out, mask = RandFileMask(path="mask.nii.gz")(image)  # doctest: +SKIP
    """

    deterministic = FileMask

    def __init__(self, *, path: str | PathLike, fill: float | str = 0.0, prob: float = 1.0) -> None:
        super().__init__(coverage=(0, 1), fill=fill, max_tries=1, prob=prob)
        self.path = _mask_path(path)

    def _sample(self, spatial, img):
        # absolute: a relative path in a record named a different file, or none, from another directory
        return {"path": str(Path(self.path).expanduser().resolve()), "fill": self.fill}
