"""Classical restoration baselines that medvae is compared against (demo and benchmarks).

All work on one 2-D slice scaled to the intensity window ([0, 1], see :mod:`medvae.intensity`) and
return a new float32 array. Denoisers are *blind* like medvae: the noise level comes from
``skimage.restoration.estimate_sigma``, never from the corruption's true parameters.

``bm3d`` (non-commercial licence) and OpenCV are optional: install ``medvae-restore[bench]``.
"""
from __future__ import annotations

from typing import Callable

import numpy as np


def estimated_sigma(x: np.ndarray) -> float:
    """Blind Gaussian noise estimate (wavelet MAD, Donoho & Johnstone) of a slice: scikit-image's
    ``estimate_sigma`` (:func:`medvae.models.calibration.noise_sigma`, which computes it without
    importing ``scipy.stats``).

    >>> noisy = np.random.default_rng(0).normal(0.5, 0.05, (128, 128))
    >>> round(estimated_sigma(noisy), 2)
    0.05
    """
    from medvae.models.calibration import noise_sigma

    return noise_sigma(x)


def nl_means(x: np.ndarray) -> np.ndarray:
    """scikit-image non-local means in fast mode (patch 5, distance 6), h = 0.8 sigma.

    Examples
    --------
    >>> noisy = np.clip(0.5 + np.random.default_rng(0).normal(0, 0.05, (64, 64)), 0, 1)
    >>> float(np.std(nl_means(noisy))) < float(np.std(noisy))
    True
    """
    from skimage.restoration import denoise_nl_means

    s = estimated_sigma(x)
    if s <= 0:  # no detail at all (a constant slice): nothing to denoise
        return np.array(x, dtype=np.float32)
    return denoise_nl_means(np.asarray(x, np.float64), h=0.8 * s, sigma=s, fast_mode=True,
                            patch_size=5, patch_distance=6).astype(np.float32)


def tv_chambolle(x: np.ndarray) -> np.ndarray:
    """Total-variation denoising with the weight set to the estimated sigma."""
    from skimage.restoration import denoise_tv_chambolle

    return denoise_tv_chambolle(np.asarray(x, np.float64), weight=max(estimated_sigma(x), 1e-4)).astype(np.float32)


def wavelet(x: np.ndarray) -> np.ndarray:
    """BayesShrink wavelet denoising (sigma estimated by scikit-image)."""
    from skimage.restoration import denoise_wavelet

    return denoise_wavelet(np.asarray(x, np.float64), method="BayesShrink", mode="soft",
                           rescale_sigma=True).astype(np.float32)


def bm3d(x: np.ndarray) -> np.ndarray:
    """BM3D (the ``bm3d`` package, free for non-commercial use) with the estimated sigma."""
    try:
        import bm3d as _bm3d
    except ImportError as exc:  # optional benchmark dependency
        raise ImportError("BM3D needs the optional 'bm3d' package: pip install 'medvae-restore[bench]'") from exc
    return np.asarray(_bm3d.bm3d(np.asarray(x, np.float64), sigma_psd=max(estimated_sigma(x), 1e-4)),
                      dtype=np.float32)


def biharmonic(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """scikit-image biharmonic inpainting of the pixels where ``mask`` is True."""
    from skimage.restoration import inpaint_biharmonic

    return inpaint_biharmonic(np.ascontiguousarray(x, np.float64),
                              np.ascontiguousarray(mask, bool)).astype(np.float32)


def telea(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """OpenCV Telea inpainting. OpenCV's float path gives garbage, so it runs on 16-bit data."""
    try:
        import cv2
    except ImportError as exc:
        raise ImportError("Telea inpainting needs opencv-python-headless: pip install 'medvae-restore[bench]'") from exc
    lo, hi = float(np.min(x)), float(np.max(x))
    scale = (hi - lo) or 1.0
    u16 = np.round((np.ascontiguousarray(x, np.float64) - lo) / scale * 65535).astype(np.uint16)
    out = cv2.inpaint(u16, np.ascontiguousarray(mask, np.uint8), 5, cv2.INPAINT_TELEA)
    return (out.astype(np.float32) / 65535 * scale + lo).astype(np.float32)


DENOISERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "nl_means": nl_means, "tv_chambolle": tv_chambolle, "wavelet": wavelet, "bm3d": bm3d}
INPAINTERS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "biharmonic": biharmonic, "telea": telea}
