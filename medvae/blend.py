"""Blending the network's restoration with a classical one (a two-estimator ensemble).

The network and a classical restorer err differently: where the network keeps too much noise on a smooth
CT slice, non-local means smooths it away; where the network repaints a stroke through an edge, a
biharmonic fill continues it. Their weighted mean has a smaller error than either (the benchmark's
validation volumes, docs/benchmarks.md). A checkpoint can therefore carry, in ``meta["blend"]``, the
weight ``w`` of the classical estimate per regime, and per modality where it was fitted:

    restored = (1 - w) * network + w * classical        (window units)

with non-local means (:func:`medvae.baselines.nl_means`, blind like the network) for global noise and
biharmonic inpainting (:func:`medvae.baselines.biharmonic`) inside the holes. The weights are fitted by
least squares (:func:`fit_weight`) by ``scripts/calibrate_uncertainty.py`` on calibration volumes that
are disjoint by subject from the benchmark's validation volumes, never on those. A model without
``meta["blend"]`` restores with the network alone; ``restore_volume(blend=False)`` and
``medvae restore --no-blend`` turn it off. The shipped default model stores weights for holes only: for
noise the blend with non-local means gained on the benchmark's corruptions but lost 1–2.5 dB on heavier
low-dose CT and Rician MR (docs/benchmarks.md, quality run 8).

Keys of ``meta["blend"]``: ``weight_noise``, ``weight_holes`` and their per-modality forms
(``weight_noise_ct``...), and provenance (``measured_on``, ``date``, ``weights_sha256``).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from medvae.errors import MedvaeError

#: key of the blend dict in a checkpoint's ``meta``
BLEND_KEY = "blend"


def blend_weight(meta: Mapping[str, Any] | None, *, holes: bool, modality: str | None = None,
                 source: str | None = None) -> float:
    """The classical estimate's weight stored in ``meta["blend"]`` (0.0 when there is none).

    Parameters
    ----------
    meta : a checkpoint's ``meta`` dict.
    holes : True for inpainting (a mask was given), False for global noise.
    modality : ``"CT"`` or ``"MR"``: that modality's own weight (``weight_noise_ct``) when one was fitted.
    source : the model's file, named in the error for a weight outside [0, 1].

    Examples
    --------
    >>> blend_weight({"blend": {"weight_noise": 0.4, "weight_noise_ct": 0.5}}, holes=False, modality="CT")
    0.5
    >>> blend_weight({"blend": {"weight_noise": 0.4}}, holes=True)
    0.0
    """
    cal = dict((meta or {}).get(BLEND_KEY) or {})
    name = "weight_holes" if holes else "weight_noise"
    if modality and f"{name}_{str(modality).lower()}" in cal:
        name = f"{name}_{str(modality).lower()}"
    raw = cal.get(name, 0.0)
    try:
        w = float(raw)
    except (TypeError, ValueError):  # a bare float() gave a traceback without the model's name
        raise MedvaeError(f"the model's meta['{BLEND_KEY}']['{name}'] = {raw!r} is not a number", source) from None
    if not 0.0 <= w <= 1.0:
        raise MedvaeError(f"the model's meta['{BLEND_KEY}']['{name}'] = {w} lies outside [0, 1]", source)
    return w


def classical_estimate(image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """The classical restoration of one window-unit slice: non-local means without a mask (or with an
    all-True one), biharmonic inpainting of the mask's pixels with one. Float32; the input is not modified.

    Examples
    --------
    >>> img = np.tile(np.linspace(0, 1, 32, dtype=np.float32), (32, 1))
    >>> hole = np.zeros((32, 32), bool); hole[10:14, 10:14] = True
    >>> bool(np.abs(classical_estimate(np.where(hole, 0, img), hole) - img).max() < 1e-3)
    True
    """
    from medvae import baselines

    if mask is None or bool(np.all(mask)):
        return baselines.nl_means(image)
    if not bool(np.any(mask)):
        return np.array(image, dtype=np.float32)
    return baselines.biharmonic(image, mask)


def blend(network: np.ndarray, classical: np.ndarray, weight: float) -> np.ndarray:
    """``(1 - weight) * network + weight * classical`` as float32 (``weight`` 0: the network as it is).

    >>> blend(np.zeros(2), np.ones(2), 0.25).tolist()
    [0.25, 0.25]
    """
    if weight == 0.0:
        return np.asarray(network, dtype=np.float32)
    return ((1.0 - weight) * np.asarray(network, np.float64)
            + weight * np.asarray(classical, np.float64)).astype(np.float32)


def fit_weight(network: np.ndarray, classical: np.ndarray, reference: np.ndarray) -> float:
    """The least-squares weight of the classical estimate, in [0, 1].

    Minimises ``sum((blend(network, classical, w) - reference)**2)`` over the given pixels (pass those of
    several slices concatenated): ``w = <c - n, r - n> / |c - n|**2``, clipped to [0, 1].

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> ref = rng.random(10000)
    >>> net, cls = ref + rng.normal(0, 0.1, 10000), ref + rng.normal(0, 0.1, 10000)
    >>> round(fit_weight(net, cls, ref), 1)   # equal independent errors: half and half
    0.5
    """
    n = np.asarray(network, np.float64).ravel()
    d = np.asarray(classical, np.float64).ravel() - n
    denom = float(d @ d)
    if denom == 0.0:
        return 0.0
    return float(np.clip(d @ (np.asarray(reference, np.float64).ravel() - n) / denom, 0.0, 1.0))
