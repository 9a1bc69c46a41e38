"""Calibration of the posterior standard deviation (the uncertainty map).

The raw predictive std (the spread of a few decoded posterior samples and, for a model with a scale head,
the decoder's Laplace scale) is of the error's size but not calibrated: the sample spread alone is 1–2
orders of magnitude too small, and the scale head was trained on other scans. A checkpoint can therefore
carry a measured calibration in
``meta["calibration"]``, per regime (global noise: no mask, every pixel restored; holes: inside the
mask), fitted by ``scripts/calibrate_uncertainty.py`` on calibration volumes that are disjoint (by
subject) from the benchmark's validation volumes:

    calibrated std = sqrt((scale * sampled std)**2 + floor**2 + (edge * |grad restored|)**2
                          + (blend * |network - classical|)**2)                          (window units)

with ``scale = std_scale_noise`` and ``floor = std_floor_noise * sigma`` for noise, where ``sigma`` is the
blind noise estimate of the input slice (``skimage.restoration.estimate_sigma``, as the classical
baselines use), and ``scale = std_scale_holes``, ``floor = std_floor_holes`` for holes. The edge term
(``std_edge_noise``, ``std_edge_holes``; absent: 0) adds the gradient magnitude of the restored slice
(:func:`restoration_gradient`): a restoration errs most on edges it has to rebuild or keep sharp, which
the decoder's scale alone under-ranks. The blend term (``std_blend_noise``, ``std_blend_holes``; absent:
0) adds, for a model whose restoration is blended with a classical one (:mod:`medvae.blend`), how far the
two disagree at the pixel: where two estimators with different errors part, the truth is least certain.
The weights are fitted by Gaussian likelihood and then
widened together to a split-conformal coverage target (95 % of calibration pixels within ± 2 std). The
coverage measured on held-out volumes is stored beside them and is the figure to quote.

Keys of ``meta["calibration"]``: ``std_scale_noise``, ``std_scale_holes``, ``std_floor_noise``,
``std_floor_holes``, ``std_edge_noise``, ``std_edge_holes``, ``std_blend_noise``, ``std_blend_holes`` (the model), ``coverage_2std_noise``, ``coverage_2std_holes``, ``spearman_noise``,
``spearman_holes`` (measured on held-out volumes after calibration), ``measured_on`` (words), and
provenance (``weights_sha256`` of the weights it was fitted for, ``date``...).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from medvae.errors import MedvaeError

#: key of the calibration dict in a checkpoint's ``meta``
CALIBRATION_KEY = "calibration"
#: the std multiple whose coverage is measured and targeted (± 2 std)
K_STD = 2.0


def _key(cal: Mapping[str, Any], name: str, modality: str | None) -> str:
    """``name`` with the modality's suffix (``std_scale_noise_ct``) when the calibration has that key:
    a fit per modality, else the regime's own key."""
    if modality:
        specific = f"{name}_{str(modality).lower()}"
        if specific in cal:
            return specific
    return name


def calibration_problem(cal: Any) -> str | None:
    """What is wrong with a checkpoint's ``meta["calibration"]`` (``None`` when nothing is): every
    ``std_*`` term a finite number ≥ 0 (a scale > 0), every ``coverage_*`` a share in [0, 1] and every
    ``spearman_*`` in [−1, 1]. :func:`std_scale` would read a broken term as the raw std, while the review
    page went on quoting the measured coverage of the calibrated one.

    >>> calibration_problem({"std_scale_noise": 0.99, "coverage_2std_noise": 0.93})
    >>> calibration_problem({"std_scale_noise": float("nan")})
    "its 'std_scale_noise' = nan is not a finite number above 0"
    """
    if not isinstance(cal, Mapping):
        return None
    for key, value in cal.items():
        key = str(key)
        if not key.startswith(("std_", "coverage_", "spearman_")):
            continue
        lo, hi, what = ((-1.0, 1.0, "in [-1, 1]") if key.startswith("spearman_") else
                        (0.0, 1.0, "in [0, 1]") if key.startswith("coverage_") else
                        (0.0, math.inf, "above 0" if key.startswith("std_scale") else "≥ 0"))
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and lo <= value <= hi and (value > 0 or not key.startswith("std_scale"))
        if not ok:
            return f"its {key!r} = {value!r} is not a finite number {what}"
    return None


def std_scale(meta: Mapping[str, Any] | None, *, holes: bool, modality: str | None = None) -> float:
    """The factor for the sampled std stored in ``meta["calibration"]`` (1.0 when there is none).

    Parameters
    ----------
    meta : a checkpoint's ``meta`` dict.
    holes : True for inpainting (a mask was given), False for global noise.
    modality : ``"CT"`` or ``"MR"``: its own factor (``std_scale_noise_ct``) when one was fitted.

    Examples
    --------
    >>> std_scale({"calibration": {"std_scale_noise": 12.0, "std_scale_holes": 40.0}}, holes=True)
    40.0
    >>> std_scale({}, holes=False)
    1.0
    >>> std_scale({"calibration": {"std_scale_noise": 2.0, "std_scale_noise_ct": 0.5}}, holes=False, modality="CT")
    0.5
    """
    cal = (meta or {}).get(CALIBRATION_KEY)
    if not isinstance(cal, Mapping):
        return 1.0
    value = cal.get(_key(cal, "std_scale_holes" if holes else "std_scale_noise", modality), 1.0)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return 1.0
    # a broken entry must not silently shrink or erase the map
    return value if math.isfinite(value) and value > 0 else 1.0


def fit_std_scale(error: np.ndarray, std: np.ndarray, *, coverage: float = 0.95, k: float = K_STD) -> float:
    """Smallest factor ``s`` with ``|error| <= k * s * std`` on a ``coverage`` share of the pixels.

    A split-conformal quantile of the score ``|error| / (k * std)`` (with the finite-sample
    correction ``ceil((n + 1) * coverage) / n``). Pixels where ``std == 0`` are left out.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> std = np.full(10000, 0.01); err = rng.normal(0, 0.1, 10000)   # 10x too small a std
    >>> round(fit_std_scale(err, std), 0)
    10.0
    """
    e = np.abs(np.asarray(error, np.float64)).ravel()
    s = np.asarray(std, np.float64).ravel()
    ok = (s > 0) & np.isfinite(s) & np.isfinite(e)
    score = e[ok] / (k * s[ok])
    if score.size == 0:
        raise MedvaeError("no pixel with a positive std to calibrate on: the model's samples do not vary "
                          "(an untrained model, or samples=0?)")
    level = min(1.0, math.ceil((score.size + 1) * coverage) / score.size)
    return float(np.quantile(score, level, method="higher"))


def coverage_within(error: np.ndarray, std: np.ndarray, *, k: float = K_STD) -> float:
    """Share of pixels with ``|error| <= k * std``.

    >>> coverage_within(np.array([0.1, 0.3]), np.array([0.1, 0.1]))
    0.5
    """
    e = np.abs(np.asarray(error, np.float64))
    return float(np.mean(e <= k * np.asarray(std, np.float64)))


def spearman(std: np.ndarray, error: np.ndarray) -> float:
    """Spearman rank correlation of the std and ``|error|`` over pixels (NaN when either is constant).

    >>> spearman(np.array([1.0, 2, 3, 4]), np.array([0.1, -0.2, 0.25, 0.5]))
    1.0
    """
    from scipy.stats import spearmanr

    a = np.asarray(std, np.float64).ravel()
    b = np.abs(np.asarray(error, np.float64)).ravel()
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def calibration_terms(meta: Mapping[str, Any] | None, *, holes: bool, modality: str | None = None
                      ) -> tuple[float, float, float, float]:
    """``(scale, floor, edge, blend)`` of the regime: ``floor`` is per unit of the noise estimate for noise,
    in window units for holes; ``edge`` weighs the restored slice's gradient magnitude, ``blend`` the
    disagreement of the network and the classical restoration. ``(1.0, 0.0, 0.0, 0.0)`` (the raw std)
    when the checkpoint has no calibration; a missing or broken floor, edge or blend is 0.

    >>> calibration_terms({"calibration": {"std_scale_holes": 3.0, "std_floor_holes": 0.02}}, holes=True)
    (3.0, 0.02, 0.0, 0.0)
    """
    cal = (meta or {}).get(CALIBRATION_KEY)
    regime = "holes" if holes else "noise"
    extra = []
    for name in (f"std_floor_{regime}", f"std_edge_{regime}", f"std_blend_{regime}"):
        value = 0.0
        if isinstance(cal, Mapping):
            try:
                value = float(cal.get(_key(cal, name, modality), 0.0))
            except (TypeError, ValueError):
                value = 0.0
        extra.append(value if math.isfinite(value) and value > 0 else 0.0)
    return std_scale(meta, holes=holes, modality=modality), extra[0], extra[1], extra[2]


#: the standard normal's 75th percentile, ``scipy.stats.norm.ppf(0.75)``: scikit-image's MAD denominator
NORM_Q75 = 0.6744897501960817


def noise_sigma(image: np.ndarray) -> float:
    """Blind Gaussian noise estimate of a 2-D slice (wavelet MAD, Donoho & Johnstone).

    scikit-image's ``estimate_sigma``: the median absolute db2 diagonal detail coefficient (zeros left
    out) over the normal's 75th percentile, computed with PyWavelets directly, because importing
    scikit-image's function imports ``scipy.stats`` (0.6 s of a ``medvae restore`` start-up). Equal to it
    (tested); 0.0 for a slice without any detail.
    """
    import pywt

    detail = pywt.dwtn(np.asarray(image, dtype=np.float64), wavelet="db2")["dd"]
    detail = detail[np.nonzero(detail)]
    return float(np.median(np.abs(detail)) / NORM_Q75) if detail.size else 0.0


def restoration_gradient(restored: np.ndarray) -> np.ndarray:
    """Gradient magnitude of a restored 2-D slice (central differences, window units per pixel).

    >>> restoration_gradient(np.tile(np.arange(4.0), (3, 1))).tolist()[0]
    [1.0, 1.0, 1.0, 1.0]
    """
    return np.hypot(*np.gradient(np.asarray(restored, np.float32)))  # float32: a slice-sized temporary per batch


def calibrated_std(std: np.ndarray, *, scale: float, floor: float | np.ndarray, edge: float = 0.0,
                   gradient: np.ndarray | None = None, blend: float = 0.0,
                   disagreement: np.ndarray | None = None) -> np.ndarray:
    """``sqrt((scale * std)**2 + floor**2 + (edge * gradient)**2 + (blend * disagreement)**2)``: the
    calibrated map of one slice (window units); ``gradient`` is :func:`restoration_gradient` of the
    restored slice, ``floor`` a number or one per pixel, ``disagreement`` ``|network - classical|`` of a
    blended restoration (``None``: not blended, no such term).

    >>> calibrated_std(np.array([0.0, 0.03]), scale=100.0, floor=4.0).tolist()
    [4.0, 5.0]
    >>> calibrated_std(np.array([0.0, 0.0]), scale=1.0, floor=3.0, edge=2.0, gradient=np.array([0.0, 2.0])).tolist()
    [3.0, 5.0]
    """
    var = np.multiply(std, scale, dtype=np.float64)  # in place from here: restore calls it once per slice
    np.square(var, out=var)
    var += floor ** 2
    if edge:
        if gradient is None:
            raise ValueError("this calibration has an edge term: pass the restored slice's gradient")
        g = np.multiply(gradient, edge, dtype=np.float64)
        var += np.square(g, out=g)
    if blend and disagreement is not None:
        d = np.multiply(disagreement, blend, dtype=np.float64)
        var += np.square(d, out=d)
    return np.sqrt(var, out=var)


def fit_calibration(error: np.ndarray, std: np.ndarray, unit: np.ndarray, gradient: np.ndarray | None = None,
                    disagreement: np.ndarray | None = None, *,
                    coverage: float = 0.95, k: float = K_STD) -> tuple[float, float, float, float]:
    """Fit ``(scale, floor, edge, blend)`` of ``sqrt((scale * std)**2 + (floor * unit)**2 + (edge * gradient)**2
    + (blend * disagreement)**2)`` to ``error``.

    ``unit`` is each pixel's floor unit (the slice's noise estimate for noise; 1 for holes), ``gradient``
    the restored slice's :func:`restoration_gradient` at the pixel (``None``: no edge term, ``edge`` 0),
    ``disagreement`` ``|network - classical|`` of a blended restoration (``None``: no blend term, 0).
    First the Gaussian log-likelihood of the errors is maximised over the terms; then all are multiplied
    by the split-conformal factor that puts ``coverage`` of the pixels within ``k`` calibrated std.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> std = rng.uniform(0, 0.01, 20000); err = rng.normal(0, np.hypot(10 * std, 0.05))
    >>> scale, floor, edge, blend = fit_calibration(err, std, np.ones_like(std))
    >>> bool(8 < scale < 13 and 0.04 < floor < 0.065), edge, blend
    (True, 0.0, 0.0)
    """
    from scipy.optimize import minimize

    e = np.asarray(error, np.float64).ravel()
    s = np.asarray(std, np.float64).ravel()
    u = np.asarray(unit, np.float64).ravel()
    g = np.zeros_like(s) if gradient is None else np.asarray(gradient, np.float64).ravel()
    d = np.zeros_like(s) if disagreement is None else np.asarray(disagreement, np.float64).ravel()
    ok = (np.isfinite(e) & np.isfinite(s) & np.isfinite(u) & np.isfinite(g) & np.isfinite(d)
          & (s >= 0) & (u >= 0) & (g >= 0) & (d >= 0))
    e, s, u, g, d = e[ok], s[ok], u[ok], g[ok], d[ok]
    if e.size == 0:
        raise MedvaeError("no pixel to calibrate on")
    e2 = e ** 2
    # the terms fitted (a term given as None stays 0); their order is that of the result
    present = [True, True, gradient is not None, disagreement is not None and bool(d.any())]
    features = [s, u, g, d]
    terms = [x for x, p in zip(features, present) if p]

    def nll(theta):
        var = sum((np.exp(t) * x) ** 2 for t, x in zip(theta, terms)) + 1e-12
        return float(np.mean(np.log(var) + e2 / var))

    # start: the scale alone explains the mean error, each other term a tenth of it
    mae = np.mean(np.abs(e))
    x0 = [math.log(max(mae / max(np.mean(x), 1e-12), 1e-6) * (1.0 if i == 0 else 0.1)) for i, x in enumerate(terms)]
    res = minimize(nll, x0=x0, method="Nelder-Mead",
                   options={"xatol": 1e-4, "fatol": 1e-7, "maxiter": 4000})
    fitted = iter(float(np.exp(v)) for v in res.x)
    weights = [next(fitted) if p else 0.0 for p in present]
    width = np.sqrt(sum((w * x) ** 2 for w, x in zip(weights, features)))
    factor = fit_std_scale(e, width, coverage=coverage, k=k)
    scale, floor, edge, blend = (w * factor for w in weights)
    # a scale of 0 (the sampled spread unused) would read as "no calibration" (std_scale): keep it positive
    return max(scale, 1e-12), floor, edge, blend


def calibrate_slice(std: np.ndarray, image: np.ndarray, meta: Mapping[str, Any] | None, *,
                    holes: bool, modality: str | None = None, restored: np.ndarray | None = None,
                    disagreement: np.ndarray | None = None) -> np.ndarray:
    """The calibrated map of one 2-D slice: ``std`` (sampled, window units), ``image`` (the corrupted
    input, window units, for the noise estimate), ``restored`` (the restored slice, window units, for
    the edge term; needed when the calibration has one) and ``disagreement`` (``|network - classical|``
    of a blended restoration, for the blend term; ``None``: not blended) under ``meta``'s calibration for the regime (and
    ``modality``, when the calibration was fitted per modality). The raw ``std`` (as float64) when the
    checkpoint has none.

    >>> meta = {"calibration": {"std_scale_holes": 10.0, "std_floor_holes": 0.04}}
    >>> calibrate_slice(np.array([0.0, 0.003]), np.zeros(2), meta, holes=True).tolist()
    [0.04, 0.05]
    """
    scale, floor, edge, blend = calibration_terms(meta, holes=holes, modality=modality)
    if floor and not holes:
        floor *= noise_sigma(image)
    gradient = None if not edge or restored is None else restoration_gradient(restored)
    return calibrated_std(std, scale=scale, floor=floor, edge=edge, gradient=gradient, blend=blend,
                          disagreement=disagreement)
