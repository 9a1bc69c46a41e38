"""Intensity normalisation shared by corruption, training, restoration and evaluation.

The model works on images scaled so that the intensity window maps to [0, 1]:

* CT: a fixed HU window (default -1000..1000 HU), the same for every scan, so HU stay meaningful;
* MR (and anything else): the 0.5 and 99.5 percentiles of the volume, because MR has no absolute unit.

Values outside the window are *not* clipped: scaling is linear and exactly invertible, so a restored
image maps back to the scan's own units (HU for CT).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

DEFAULT_CT_WINDOW = (-1000.0, 1000.0)
DEFAULT_MR_PERCENTILES = (0.5, 99.5)
#: CT voxels above this are body, below it air (used for foreground masks and the modality guess)
CT_FOREGROUND_HU = -500.0
#: MR foreground: above this fraction of the intensity scale (evaluation: of the reference's 99.5th
#: percentile; training slices: of the normalized window)
MR_FOREGROUND_FRACTION = 0.10


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
        lo, hi = self.mr_percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"mr_percentiles must satisfy 0 <= low < high <= 100, not "
                             f"{tuple(self.mr_percentiles)}")

    def window_for(self, volume: np.ndarray, modality: str | None, *,
                   noisy: bool = False, slices: np.ndarray | None = None) -> tuple[float, float]:
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
            noise (Rician) keeps its floor at 0 and the plain percentile, as in training.
        slices : the slices :func:`smoothing_slices` picks, ``(X, Y, n)``, when ``volume`` is only a 1-D
            sample of the voxels (a series read in parts); without them a 1-D sample keeps the plain
            percentile.

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
        if flat.size > 4_000_000:  # a strided subsample: same percentiles, no volume-sized copy
            flat = flat[:: flat.size // 2_000_000]
        finite = flat[np.isfinite(flat)]
        if finite.size == 0:
            raise ValueError("cannot compute an intensity window: the image has no finite values")
        lo, hi = np.percentile(finite, self.mr_percentiles)
        if noisy and lo < 0 and (slices is not None or np.ndim(volume) >= 2):
            smooth = (smoothed_percentile(volume, self.mr_percentiles[0]) if slices is None
                      else _smoothed_percentile(slices, self.mr_percentiles[0]))
            if smooth is not None:
                lo = min(max(lo, smooth), hi)
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


def smoothed_percentile(volume: np.ndarray, q: float, *, max_voxels: int = SMOOTH_SAMPLE) -> float | None:
    """The ``q`` percentile of a 2-D or 3-D volume's slices (:func:`smoothing_slices`), each smoothed
    in-plane with a Gaussian of sigma 2 px: zero-mean noise averages out, structures of a few pixels stay.

    >>> noisy = np.random.default_rng(0).normal(0, 300, (64, 64))   # an MR background under heavy noise
    >>> float(noisy.min()) < -500 < smoothed_percentile(noisy, 0)
    True
    """
    v = np.asarray(volume)
    v = v[:, :, None] if v.ndim == 2 else v
    return _smoothed_percentile(v[:, :, smoothing_slices(v.shape, max_voxels)], q)


def _smoothed_percentile(slices: np.ndarray, q: float) -> float | None:
    """The ``q`` percentile of ``(X, Y, n)`` slices, each smoothed in-plane with a Gaussian of sigma
    2 px (one at a time); non-finite voxels are left out. None when no finite voxel remains."""
    from scipy.ndimage import gaussian_filter

    parts = []
    for k in range(slices.shape[2]):
        sl = np.asarray(slices[:, :, k], dtype=np.float32)
        ok = np.isfinite(sl)
        if not ok.any():
            continue
        parts.append(gaussian_filter(np.where(ok, sl, np.median(sl[ok])), 2.0)[ok])
    return float(np.percentile(np.concatenate(parts), q)) if parts else None


def normalize(x: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Map ``window`` linearly to [0, 1] (no clipping); returns a new float32 array."""
    lo, hi = window
    return ((np.asarray(x, dtype=np.float32) - lo) / (hi - lo)).astype(np.float32, copy=False)


def denormalize(x: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Inverse of :func:`normalize`; returns a new float32 array."""
    lo, hi = window
    return (np.asarray(x, dtype=np.float32) * (hi - lo) + lo).astype(np.float32, copy=False)
