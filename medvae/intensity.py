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

    def window_for(self, volume: np.ndarray, modality: str | None) -> tuple[float, float]:
        """Return the ``(low, high)`` window for ``volume``.

        Examples
        --------
        >>> IntensityPolicy().window_for(np.zeros((4, 4)), "CT")
        (-1000.0, 1000.0)
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


def normalize(x: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Map ``window`` linearly to [0, 1] (no clipping); returns a new float32 array."""
    lo, hi = window
    return ((np.asarray(x, dtype=np.float32) - lo) / (hi - lo)).astype(np.float32, copy=False)


def denormalize(x: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Inverse of :func:`normalize`; returns a new float32 array."""
    lo, hi = window
    return (np.asarray(x, dtype=np.float32) * (hi - lo) + lo).astype(np.float32, copy=False)
