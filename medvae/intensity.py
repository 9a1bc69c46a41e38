"""Intensity normalisation shared by corruption, training, restoration and evaluation.

The model works on images scaled so that the intensity window maps to [0, 1]:

* CT: a fixed HU window (default -1000..1000 HU), the same for every scan, so HU stay meaningful;
* MR (and anything else): the 0.5 and 99.5 percentiles of the volume, because MR has no absolute unit.

Values outside the window are *not* clipped: scaling is linear and exactly invertible, so a restored
image maps back to the scan's own units (HU for CT).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

#: how far a CT window may reach, in HU (air is -1000, dense metal a few 10,000): training configs too
CT_WINDOW_LIMIT = 1_000_000.0

DEFAULT_CT_WINDOW = (-1000.0, 1000.0)
DEFAULT_MR_PERCENTILES = (0.5, 99.5)
#: CT voxels above this are body, below it air (used for foreground masks and the modality guess)
CT_FOREGROUND_HU = -500.0
#: CT voxels at or below this (HU) are padding outside the field of view (vendors pad with -2000, -2048
#: or -3024; air is -1000): corrupt_volume returns them as they came, as restore does
CT_PADDING_HU = -2000.0
#: MR foreground: above this fraction of the intensity scale (evaluation: of the reference's 99.5th
#: percentile; training slices: of the normalized window)
MR_FOREGROUND_FRACTION = 0.10


#: :meth:`IntensityPolicy.window_for` reads every voxel of a volume up to WINDOW_FULL voxels, else
#: about WINDOW_SAMPLE of them (:func:`window_stride`)
WINDOW_FULL, WINDOW_SAMPLE = 4_000_000, 2_000_000


def window_stride(shape: tuple[int, ...]) -> int:
    """Every how many voxels of a C-ordered volume of ``shape`` the window is read from: 1 up to
    :data:`WINDOW_FULL` voxels, else about ``size // WINDOW_SAMPLE``, made coprime with the size of
    the trailing axes so that the sample cycles through every slice and row (a stride of 2 on a
    2-slice volume once read slice 0 alone).

    >>> window_stride((256, 256, 40)), window_stride((1500, 1400, 2)), window_stride((10_000_000,))
    (1, 3, 5)
    """
    size = int(np.prod(shape)) if len(shape) else 1
    if size <= WINDOW_FULL:
        return 1
    stride = size // WINDOW_SAMPLE
    trailing = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    while math.gcd(stride, trailing) > 1:
        stride += 1
    return stride


@dataclass(frozen=True)
class IntensityPolicy:
    """How scans of each modality are scaled to the model's [0, 1] range.

    Stored inside every medvae model, so restoration uses exactly the scaling seen in training.
    """

    ct_window: tuple[float, float] = DEFAULT_CT_WINDOW
    mr_percentiles: tuple[float, float] = DEFAULT_MR_PERCENTILES

    def __post_init__(self) -> None:
        lo, hi = self.ct_window
        if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
            raise ValueError(f"ct_window must be (low, high) with low < high, not {tuple(self.ct_window)}")
        if not (-CT_WINDOW_LIMIT <= lo and hi <= CT_WINDOW_LIMIT):  # ±1e30 restored to ±3.5e28 "HU", exit 0
            raise ValueError(f"ct_window must lie within ±{CT_WINDOW_LIMIT:g} HU, not {tuple(self.ct_window)}")
        lo, hi = self.mr_percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"mr_percentiles must satisfy 0 <= low < high <= 100, not "
                             f"{tuple(self.mr_percentiles)}")

    def window_for(self, volume: np.ndarray, modality: str | None, *,
                   noisy: bool = False, slices: np.ndarray | None = None,
                   exact: bool = False, strict: bool = False) -> tuple[float, float]:
        """Return the ``(low, high)`` window for ``volume``.

        Parameters
        ----------
        volume : the scan, ``(X, Y[, Z])`` (or a 1-D sample of its voxels).
        modality : ``"CT"`` gets the fixed HU window; anything else the volume's percentiles.
        noisy : the volume may carry zero-mean noise (a scan to restore, not a clean training scan).
            Zero-mean noise spreads a background below its level: Gaussian noise of 5 % of the window
            puts the 0.5 percentile about 10 % of the window below the clean one, and the models,
            trained on clean windows, restore such a shifted image 5–9 dB worse (docs/benchmarks.md).
            So when the low percentile is negative (which MR magnitude data never is without such
            noise), it is taken from an in-plane Gaussian-smoothed copy (sigma 2 px) of up to
            :data:`SMOOTH_SAMPLE` voxels of whole slices, where that spread averages out. Magnitude
            noise (Rician) never goes negative but spreads a background that lies above 0 down towards
            it (sdcflows' EPI, whose background is a constant 8 % up its window: the 0.5 percentile
            fell 6.5 % of the window and the restoration 6.7 dB) and lifts a zero background by its
            Rayleigh mean. So when the low percentile is not negative and no constant fill holds it
            (:func:`_constant_fill`: as in a masked clean scan, many voxels exactly at its value, and far
            fewer at the next), it is the same slices' background level with the Rician bias removed
            (:func:`rician_floor`).
        slices : the slices :func:`smoothing_slices` picks, ``(X, Y, n)``, when ``volume`` is only a 1-D
            sample of the voxels (a series read in parts); without them a 1-D sample keeps the plain
            percentile.
        exact : the percentiles of every voxel (evaluation); by default a volume of more than
            :data:`WINDOW_FULL` voxels is sampled at every :func:`window_stride`-th voxel.
        strict : ``ValueError`` when the two percentiles coincide (a constant or nearly empty image), where
            a window one unit wide keeps a restoration's scale finite but would make a score meaningless.

        Examples
        --------
        >>> IntensityPolicy().window_for(np.zeros((4, 4)), "CT")
        (-1000.0, 1000.0)
        >>> bg = np.zeros((64, 64)); bg[16:48, 16:48] = 1.0
        >>> noisy = bg + np.random.default_rng(0).normal(0, 0.05, bg.shape)
        >>> [round(v, 2) for v in IntensityPolicy().window_for(noisy, "MR")]
        [-0.12, 1.1]
        >>> [round(v, 2) for v in IntensityPolicy().window_for(noisy, "MR", noisy=True)]
        [-0.02, 1.1]
        """
        if (modality or "").upper() == "CT":
            return tuple(float(v) for v in self.ct_window)  # type: ignore[return-value]
        flat = np.asarray(volume).ravel()
        if not exact:  # a strided subsample of a large volume: about the same percentiles, no volume-sized copy
            flat = flat[:: window_stride(np.shape(volume))]
        finite = flat[np.isfinite(flat)]
        if finite.size == 0:
            raise ValueError("cannot compute an intensity window: the image has no finite values")
        lo, hi = np.percentile(finite, self.mr_percentiles)
        q = self.mr_percentiles[0]
        if noisy and (slices is not None or np.ndim(volume) >= 2):
            if lo < 0:
                smooth = _smoothed_percentile(_noisy_slices(volume, slices), q)
                if smooth is not None:
                    lo = min(max(lo, smooth), hi)
            elif not _constant_fill(finite, lo, q, slices=_noisy_slices(volume, slices)):
                floor = rician_floor(_noisy_slices(volume, slices), q)
                if floor is not None:
                    lo = min(floor, hi)
        if hi <= lo and strict:
            raise ValueError(f"its {self.mr_percentiles[0]:g} and {self.mr_percentiles[1]:g} percentiles are both "
                             f"{lo:g}, so they define no intensity window")
        if hi <= lo:  # a constant image: keep the scale finite
            hi = lo + 1.0
        return float(lo), float(hi)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "IntensityPolicy":
        data = data or {}
        unknown = set(data) - {"ct_window", "mr_percentiles"}
        if unknown:
            raise ValueError(f"unknown intensity key(s): {', '.join(sorted(unknown))}")
        return cls(**{k: tuple(float(x) for x in v) for k, v in data.items()})


#: most voxels smoothed for a noisy scan's low percentile (whole slices, evenly spread)
SMOOTH_SAMPLE = 4_000_000


def smoothing_slices(shape: tuple[int, ...], max_voxels: int = SMOOTH_SAMPLE) -> np.ndarray:
    """Indices of the slices a noisy scan's low percentile is smoothed on: every slice of an
    ``(X, Y, Z)`` volume up to ``max_voxels`` voxels, else evenly spread ones."""
    per_slice = max(int(shape[0]) * int(shape[1]), 1)
    nz = int(shape[2]) if len(shape) > 2 else 1
    n = max(1, min(nz, max_voxels // per_slice))
    return ((np.arange(n) + 0.5) * nz / n).astype(int)


def _constant_fill(values: np.ndarray, low: float, q: float, *, slices: np.ndarray | None = None) -> bool:
    """Whether a constant fill (a masked, zeroed or padded background) holds the ``q`` percentile ``low``
    of ``values``: at least ``q`` % of them sit exactly at it, and more than four times as many as at the
    next value above it. Noise stored as integers also piles ``q`` % onto one value, but about as many
    onto its neighbours (an int16 copy of a Rician-noisy scan kept its Rayleigh-lifted low end).

    With ``slices`` (``(X, Y, n)``), a fill must also hang together: at least half of its in-plane pixels
    there have two or more of their four neighbours at ``low`` too (a region, or a border one pixel wide).
    Noise clipped at 0 (stored unsigned) piles onto 0 in scattered pixels, and taking it for a fill kept a
    window whose low end sat 8 % below the EPI's background (−8 dB)."""
    at = np.count_nonzero(values == low)
    if 100 * at < q * values.size:
        return False
    above = values[values > low]
    if not (above.size == 0 or at > 4 * np.count_nonzero(values == above.min())):
        return False
    if slices is None or min(slices.shape[:2]) < 3:
        return True
    eq = slices == low
    n = np.count_nonzero(eq)
    if n == 0:  # the slices miss it: the counts decide
        return True
    pad = np.pad(eq, ((1, 1), (1, 1), (0, 0)))  # outside the slice counts as not at it
    same = (pad[:-2, 1:-1].astype(np.uint8) + pad[2:, 1:-1] + pad[1:-1, :-2] + pad[1:-1, 2:])
    return 2 * np.count_nonzero(eq & (same >= 2)) >= n


def _noisy_slices(volume: np.ndarray, slices: np.ndarray | None, max_voxels: int = SMOOTH_SAMPLE) -> np.ndarray:
    """``slices`` when given, else the :func:`smoothing_slices` of a 2-D or 3-D ``volume``, ``(X, Y, n)``."""
    if slices is not None:
        return slices
    v = np.asarray(volume)
    v = v[:, :, None] if v.ndim == 2 else v
    return v[:, :, smoothing_slices(v.shape, max_voxels)]


def smoothed_percentile(volume: np.ndarray, q: float, *, max_voxels: int = SMOOTH_SAMPLE) -> float | None:
    """The ``q`` percentile of a 2-D or 3-D volume's slices (:func:`smoothing_slices`), each smoothed
    in-plane with a Gaussian of sigma 2 px: zero-mean noise averages out, structures of a few pixels stay.

    >>> noisy = np.random.default_rng(0).normal(0, 300, (64, 64))   # an MR background under heavy noise
    >>> float(noisy.min()) < -500 < smoothed_percentile(noisy, 0)
    True
    """
    return _smoothed_percentile(_noisy_slices(volume, None, max_voxels), q)


def rician_floor(slices: np.ndarray, q: float) -> float | None:
    """The ``q`` percentile of the noise-free magnitude under Rician noise, from ``(X, Y, n)`` slices.

    A magnitude ``R = |A + n|`` with complex Gaussian noise of std ``sigma`` per channel has
    ``E[R**2] = A**2 + 2 sigma**2``, so ``sqrt(max(local mean of R**2 - 2 sigma**2, 0))`` (the local
    mean over a Gaussian of sigma 2 px in-plane) estimates ``A`` without the bias that lifts a zero
    background to ``sigma * sqrt(pi / 2)``. ``sigma`` is the median absolute finest diagonal Haar
    coefficient / 0.6745 over the 2x2 blocks whose mean is above 3 times that estimate for all blocks:
    there the noise is near Gaussian, whereas a Rayleigh background's spread is 0.66 sigma. Anatomy's
    texture makes it a slight over-estimate, which errs towards a zero floor. Non-finite voxels are left
    out; None when no finite voxel or no 2x2 block remains.

    >>> rng = np.random.default_rng(0)
    >>> clean = np.full((96, 96, 1), 100.0); clean[24:72, 24:72] = 1000.0   # a background at 100
    >>> noisy = np.hypot(clean + rng.normal(0, 50, clean.shape), rng.normal(0, 50, clean.shape))
    >>> round(float(np.percentile(noisy, 0.5))), round(rician_floor(noisy, 0.5))
    (17, 81)
    """
    tops = (np.abs(sl[np.isfinite(sl)]) for sl in (np.asarray(slices[:, :, k]) for k in range(slices.shape[2])))
    scale = max((float(t.max()) for t in tops if t.size), default=0.0) or 1.0  # squares of ~1e160 overflowed
    details, means, squares = [], [], []
    for k in range(slices.shape[2]):
        sl = np.asarray(slices[:, :, k], dtype=np.float64)
        ok = np.isfinite(sl)
        if not ok.any():
            continue
        sl = np.where(ok, sl, 0.0) / scale
        h, w = (sl.shape[0] // 2) * 2, (sl.shape[1] // 2) * 2
        b, whole = sl[:h, :w], ok[:h, :w]
        whole = (whole[0::2, 0::2] & whole[0::2, 1::2] & whole[1::2, 0::2] & whole[1::2, 1::2]).ravel()
        details.append((np.abs(b[0::2, 0::2] - b[0::2, 1::2] - b[1::2, 0::2] + b[1::2, 1::2]).ravel() / 2)[whole])
        means.append(((b[0::2, 0::2] + b[0::2, 1::2] + b[1::2, 0::2] + b[1::2, 1::2]).ravel() / 4)[whole])
        squares.append(_local_mean(sl * sl, ok)[ok])
    if not squares:
        return None
    detail, mean = np.concatenate(details), np.concatenate(means)
    if not detail.size:  # no 2x2 block (slices one pixel wide): no noise estimate to remove
        return None
    sigma = float(np.median(detail)) / 0.6745
    signal = mean > 3 * sigma
    if np.count_nonzero(signal) >= 100:  # too few such blocks: keep the estimate of all of them
        sigma = float(np.median(detail[signal])) / 0.6745
    return scale * float(np.percentile(np.sqrt(np.maximum(np.concatenate(squares) - 2 * sigma * sigma, 0.0)), q))


def _smoothed_percentile(slices: np.ndarray, q: float) -> float | None:
    """The ``q`` percentile of ``(X, Y, n)`` slices, each smoothed in-plane with a Gaussian of sigma
    2 px (one at a time); non-finite voxels are left out. None when no finite voxel remains."""
    parts = []
    for k in range(slices.shape[2]):
        sl = np.asarray(slices[:, :, k], dtype=np.float32)
        ok = np.isfinite(sl)
        if not ok.any():
            continue
        parts.append(_local_mean(np.where(ok, sl, 0), ok)[ok])
    return float(np.percentile(np.concatenate(parts), q)) if parts else None


def _local_mean(image: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """The in-plane Gaussian mean (sigma 2 px) of ``image`` over its ``ok`` pixels only (normalized
    convolution; ``image`` is 0 elsewhere): unknown pixels (a restore's holes) neither pull the estimate
    towards their fill nor towards a stand-in value."""
    from scipy.ndimage import gaussian_filter

    smooth = gaussian_filter(image, 2.0)
    if ok.all():
        return smooth
    weight = gaussian_filter(ok.astype(image.dtype), 2.0)
    return smooth / np.maximum(weight, np.finfo(image.dtype).tiny)


def normalize(x: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Map ``window`` linearly to [0, 1] (no clipping); returns a new float32 array."""
    lo, hi = window
    return ((np.asarray(x, dtype=np.float32) - lo) / (hi - lo)).astype(np.float32, copy=False)


def denormalize(x: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Inverse of :func:`normalize`; returns a new float32 array."""
    lo, hi = window
    return (np.asarray(x, dtype=np.float32) * (hi - lo) + lo).astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------
# windows given by the user: evaluation's window= and restore_volume's window= read them alike
# (documented in medvae.evaluate, which re-exports them)
# --------------------------------------------------------------------------------------------
def window_bounds(center: float, width: float) -> tuple[float, float]:
    """``(center, width)`` → ``(lo, hi)``; ``ValueError`` unless finite with a positive width.

    >>> window_bounds(40, 80)
    (0.0, 80.0)
    """
    center, width = float(center), float(width)
    if not math.isfinite(center):
        raise ValueError(f"window center must be a finite number, got center={center}, width={width}")
    if not math.isfinite(width) or width <= 0:
        raise ValueError(f"window width must be a positive number, got center={center}, width={width}")
    lo, hi = center - width / 2.0, center + width / 2.0
    if not hi > lo or not math.isfinite(hi - lo):  # lost to rounding next to the center: scaling by it divides by 0
        raise ValueError(f"window width {width} is too small (or large) for center {center} in float64")
    return lo, hi


@dataclass(frozen=True)
class Window:
    """An intensity window given as ``center`` and ``width`` (HU for CT), the way radiologists give
    them; :attr:`bounds` is its ``(lo, hi)``.

    Deliberately not a tuple: every ``window=`` argument reads a plain pair as ``(lo, hi)``, so a
    ``(center, width)`` pair there would silently score another range. A ``Window`` is accepted by
    every ``window=`` argument, and unpacking one as a pair raises ``TypeError``.

    Raises ``ValueError`` unless both numbers are finite and the width positive.

    Examples
    --------
    >>> w = Window(40, 80)
    >>> w.bounds
    (0.0, 80.0)
    >>> w
    Window(center=40.0, width=80.0)
    >>> lo, hi = w   # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    TypeError: cannot unpack non-iterable Window object
    """

    center: float
    width: float

    def __post_init__(self) -> None:
        window_bounds(self.center, self.width)  # the same check as every window
        object.__setattr__(self, "center", float(self.center))
        object.__setattr__(self, "width", float(self.width))

    @property
    def bounds(self) -> tuple[float, float]:
        """``(lo, hi) = (center - width / 2, center + width / 2)``."""
        return window_bounds(self.center, self.width)


#: Named CT windows, each a :class:`Window` (center, width) in HU; use ``.bounds`` for ``(lo, hi)``,
#: or pass the Window (or its name) to any ``window=`` argument.
WINDOWS: dict[str, Window] = {
    "brain": Window(40.0, 80.0),
    "subdural": Window(75.0, 215.0),
    "lung": Window(-600.0, 1500.0),
    "abdomen": Window(50.0, 400.0),
    "bone": Window(400.0, 1800.0),
    # medvae's model window (-1000..1000 HU)
    "ct": Window((DEFAULT_CT_WINDOW[0] + DEFAULT_CT_WINDOW[1]) / 2, DEFAULT_CT_WINDOW[1] - DEFAULT_CT_WINDOW[0]),
}

#: What a ``window=`` argument takes: a :class:`Window`, a preset name or ``"CENTER,WIDTH"`` string, or
#: a plain ``(lo, hi)`` pair (see :func:`window_range`).
WindowLike = Window | str | Sequence[float]


def parse_window(spec: str | Window | Sequence[float]) -> tuple[float, float]:
    """Parse a window given **as center and width** (``--window``'s convention); returns ``(lo, hi)``.

    ``spec`` is a preset name (see :data:`WINDOWS`), a ``"CENTER,WIDTH"`` string, a :class:`Window`,
    or a 2-sequence of numbers taken as ``(center, width)``. Note that the ``window=`` arguments of
    :func:`medvae.evaluate.psnr` and the others, and of :func:`medvae.restore.restore_volume`, read a
    plain 2-sequence as ``(lo, hi)`` instead: pass them the result of this function, a :class:`Window`
    or a preset name (see :func:`window_range`).

    >>> parse_window("brain")
    (0.0, 80.0)
    >>> parse_window("-600,1500")
    (-1350.0, 150.0)
    >>> parse_window(WINDOWS["lung"])
    (-1350.0, 150.0)
    """
    if isinstance(spec, Window):
        return spec.bounds
    if isinstance(spec, str):
        text = spec.strip()
        if text.lower() in WINDOWS:
            return WINDOWS[text.lower()].bounds
        parts = [p.strip() for p in text.split(",")]
        if len(parts) != 2:
            raise ValueError(
                f"bad window {spec!r}: expected CENTER,WIDTH or one of {', '.join(WINDOWS)}"
            )
        try:
            center, width = float(parts[0]), float(parts[1])
        except ValueError:
            raise ValueError(
                f"bad window {spec!r}: expected CENTER,WIDTH or one of {', '.join(WINDOWS)}"
            ) from None
    else:
        try:
            center, width = (float(v) for v in spec)
        except (TypeError, ValueError):
            raise ValueError(f"bad window {spec!r}: expected (center, width)") from None
    if not math.isfinite(center):
        raise ValueError(f"bad window {spec!r}: the center must be a finite number")
    if not math.isfinite(width) or width <= 0:
        raise ValueError(f"bad window {spec!r}: the width must be a positive number")
    return window_bounds(center, width)


def window_range(window: WindowLike) -> tuple[float, float]:
    """The ``(lo, hi)`` of any ``window=`` argument, checked.

    * :class:`Window` (center, width), e.g. ``WINDOWS["brain"]``: its :attr:`Window.bounds`;
    * ``str``: a preset name or ``"CENTER,WIDTH"``, read by :func:`parse_window` (as ``--window``);
    * any other 2-sequence of numbers: **(lo, hi)** as given.

    Raises ``ValueError`` for anything else, or unless ``lo < hi`` are finite.

    >>> window_range(WINDOWS["brain"]), window_range("brain"), window_range("40,80"), window_range([0, 80])
    ((0.0, 80.0), (0.0, 80.0), (0.0, 80.0), (0.0, 80.0))
    >>> window_range((40, 80))          # a plain pair is (lo, hi)
    (40.0, 80.0)
    """
    if isinstance(window, (Window, str)):
        return parse_window(window)
    try:
        lo, hi = (float(v) for v in window)
    except (TypeError, ValueError):
        raise ValueError(f"bad window {window!r}: expected a Window(center, width), a preset name "
                         f"({', '.join(WINDOWS)}), \"CENTER,WIDTH\" or (lo, hi)") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        raise ValueError(f"bad window {window!r}: a pair is (lo, hi) and needs finite lo < hi")
    return lo, hi
