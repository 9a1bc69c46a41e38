"""PSNR and SSIM of a restored volume against its reference, slice by slice and in summary.

Everything here works on numpy arrays in medvae's voxel order ``(X, Y, Z)``; 2-D slices are
``array[:, :, k]``. The only I/O are :meth:`Evaluation.write_csv` and :meth:`Evaluation.write_json`.

**Intensity scaling is never implicit.** Published CT/MR numbers differ mostly because of the HU
window and ``data_range`` (see docs/architecture.md), so every function takes exactly one of

* ``window=``: both images are clipped to the window and scaled to [0, 1]; the data range is then 1
  (the low-dose-CT convention: C −600/W 1500 chest, C 50/W 400 abdomen, C 40/W 80 neuro);
* ``data_range=R``: raw values, data range ``R`` (no clipping).

**Window conventions.** Every ``window=`` argument takes (see :func:`window_range`)

* a :class:`Window` (``center``, ``width``), e.g. a preset ``WINDOWS["brain"]`` (C 40/W 80 → 0..80 HU);
* a preset name or ``"CENTER,WIDTH"`` string, as ``--window`` does (:func:`parse_window`): ``"brain"``;
* a plain 2-tuple or list, which is **always** ``(lo, hi)``: ``(0, 80)``.

Radiologists give windows as center and width, so the presets are :class:`Window` objects, never
plain tuples: a ``(40, 80)`` tuple would score 40..80 HU instead of 0..80. A :class:`Window` cannot be
unpacked as a pair, so it cannot be mistaken for ``(lo, hi)`` anywhere.

>>> WINDOWS["brain"].bounds
(0.0, 80.0)
>>> window_range(WINDOWS["brain"]) == window_range("brain") == window_range((0, 80)) == (0.0, 80.0)
True

Giving neither (or both) raises ``ValueError``. :func:`default_scaling` gives medvae's documented
choice per modality for callers that want one (the CLI prints and records it).

**PSNR** is ``10 log10(R² / MSE)`` with the MSE taken over the region's pixels only; over the whole
slice it equals ``skimage.metrics.peak_signal_noise_ratio``. Identical images give ``inf`` for that
slice (for example air-only slices that become identical after clipping to a brain window).

**SSIM** is scikit-image's ``structural_similarity`` with its defaults (see :data:`SSIM_DEFINITION`):
a 7×7 uniform window, sample covariance (N−1), K1 = 0.01, K2 = 0.03, computed on the whole slice. The
per-pixel SSIM map is averaged over the region (the BraTS convention), restricted to the interior
pixels at least 3 pixels from the slice border, which are exactly the pixels scikit-image averages
for its own mean SSIM. Over the ``image`` region the value therefore equals scikit-image's mean SSIM.
Note that MONAI's ``SSIMMetric`` is a different SSIM (Gaussian window σ 1.5, population covariance)
and gives different numbers.

**Sources**: ``restored`` (the restoration under test), ``baseline`` (any other restoration of the same
input, e.g. NL-means) and ``corrupted`` (the damaged input), each scored the same way.

**Regions** (``REGION_DEFINITIONS``): ``image`` (every pixel), ``mask`` (the damage mask, 1 = damaged,
when one is given) and ``foreground`` (from the reference, see :func:`foreground_mask`). A slice where a
region is empty gets NaN for it.

**Summaries use one common slice set per region** (:data:`IDENTICAL_SLICES`). The per-slice table keeps
every slice, but a region's summary statistics of *every* source and of *both* metrics are taken over
the same slices: a slice is left out for all of them when the region is empty there (no pixel, or none
at least 3 px from the border where SSIM is defined) or when **any** source is identical to the
reference there (infinite PSNR; its SSIM of 1 is left out too). So a summary never holds an infinite
mean, and a restoration that scores at least as well as another source on every slice is never
summarized as worse. Each statistic says how many slices it used (``n_slices``) and how many were left
out and why (``n_left_out``, ``n_left_out_identical``, ``n_left_out_empty``; ``n_identical`` counts the
slices where that source itself is identical); ``summary["slice_sets"]`` lists the slices, and
``summary["restored_minus"]`` holds the paired per-slice difference restored − each other source over
the same set.

>>> vol = np.random.default_rng(0).random((16, 16, 2))
>>> other = vol.copy(); other[:, :, 0] += 0.01                   # the other source differs on slice 0 only
>>> ev = evaluate_volumes(vol + 0.001, vol, data_range=1.0, baseline=other, regions=["image"])
>>> ev.summary["slice_sets"]["image"]["left_out_identical"]      # baseline identical on slice 1
[1]
>>> ps = ev.summary["metrics"]["restored"]["image"]["psnr"]
>>> ps["n_slices"], ps["n_left_out_identical"], ps["n_identical"], round(ps["mean"], 1)
(1, 1, 0, 60.0)
>>> round(ev.summary["restored_minus"]["baseline"]["image"]["psnr"]["mean"], 1)
20.0
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from medvae.errors import MedvaeError
from medvae.intensity import CT_FOREGROUND_HU, MR_FOREGROUND_FRACTION
# the window types and their parsing live in medvae.intensity (restore_volume reads the same windows);
# re-exported here, where they are documented
from medvae.intensity import WINDOWS, Window, WindowLike, parse_window, window_bounds, window_range  # noqa: F401
from medvae.io.formats import as_mask, require_finite
from medvae.jsonsafe import json_safe  # noqa: F401  (re-exported: the one JSON helper)
from medvae.slice_gaps import is_hole_mask


#: The SSIM medvae reports, in words (recorded in every summary, report and MLflow run).
SSIM_DEFINITION = (
    "scikit-image structural_similarity defaults: 7x7 uniform window, sample covariance (N-1), "
    "K1=0.01, K2=0.03, computed on the whole 2-D slice; the SSIM map is averaged over the region's "
    "pixels at least 3 px from the slice border (over the whole image this is skimage's mean SSIM)"
)
PSNR_DEFINITION = "10*log10(data_range^2 / MSE), MSE over the region's pixels of the 2-D slice"

#: How a region's summary picks its slices (recorded in every summary as ``identical_slices``).
IDENTICAL_SLICES = (
    "each region is summarized over one common slice set, the same for every source and for PSNR and "
    "SSIM: a slice is left out for all of them when the region is empty there (n_left_out_empty) or when "
    "any source is identical to the reference there, i.e. has infinite PSNR (n_left_out_identical); "
    "n_identical counts the slices where that source itself is identical; n_slices counts the slices used"
)
#: What ``summary["restored_minus"]`` holds.
RESTORED_MINUS_DEFINITION = (
    "per-slice restored minus SOURCE (PSNR in dB, SSIM), summarized over the region's common slice set; "
    "positive = the restoration scores higher"
)

REGION_DEFINITIONS = {
    "image": "every pixel of the slice",
    "mask": "pixels of the damage mask (1 = damaged)",
    "foreground": (
        "reference-based body mask: CT > -500 HU; MR > 10% of the reference volume's 99.5th "
        "percentile; other/unknown modality > p0.5 + 10% of (p99.5 - p0.5) of the reference; "
        "then per slice specks (8-connected components under 0.1% of the slice, min 4 px) removed "
        "and holes filled"
    ),
}

REGIONS = ("image", "mask", "foreground")
SOURCES = ("restored", "baseline", "corrupted")
METRICS = ("psnr", "ssim")
STATS = ("mean", "median", "min", "max")

_SSIM_WIN = 7  # skimage's default win_size for non-Gaussian SSIM
_SSIM_PAD = (_SSIM_WIN - 1) // 2


# --------------------------------------------------------------------------------------------
# windows and scaling
# --------------------------------------------------------------------------------------------
def _check_scaling(data_range: float | None, window: WindowLike | None) -> tuple[float, tuple[float, float] | None]:
    """Validate the (data_range xor window) choice; return ``(range_used, (lo, hi) or None)``."""
    if (data_range is None) == (window is None):
        raise ValueError(
            "give exactly one of data_range=R (raw values) or window=(lo, hi), a Window or a preset name "
            f"(clip and scale to [0, 1]); got data_range={data_range!r}, window={window!r}"
        )
    if window is not None:
        return 1.0, window_range(window)
    return check_data_range(data_range), None  # type: ignore[arg-type]


def check_data_range(data_range: float) -> float:
    """``data_range`` as a float; ``ValueError`` unless positive and finite, and scorable in float64:
    PSNR takes R² (0 or inf scored every slice as identical to its reference) and SSIM multiplies its
    constants (0.01 R)² and (0.03 R)² (inf or 0 left every slice without a score)."""
    if isinstance(data_range, (bool, np.bool_)):  # True scored with a range of 1
        raise ValueError(f"bad data_range {data_range!r}: must be a positive number, not a bool")
    try:
        r = float(data_range)
    except (TypeError, ValueError):  # "could not convert string to float: 'abc'" named no argument
        raise ValueError(f"bad data_range {data_range!r}: must be a positive number") from None
    if not math.isfinite(r) or r <= 0:
        raise ValueError(f"bad data_range {data_range!r}: must be a positive number")
    if not 1e-70 <= r <= 1e70:  # R**4 * 1e-7 (SSIM) and R**4 stay normal float64 numbers
        raise ValueError(f"bad data_range {data_range!r}: too {'small' if r < 1 else 'large'} to score "
                         "(PSNR and SSIM take its square and fourth power, out of float64's range)")
    return r


def apply_window(x: np.ndarray, window: WindowLike) -> np.ndarray:
    """Clip ``x`` to ``window`` and scale it to [0, 1] (float64, new array).

    ``window`` is a plain ``(lo, hi)`` pair, a :class:`Window` (center, width) or a preset name (see
    :func:`window_range`).

    >>> apply_window(np.array([-10.0, 40.0, 100.0]), WINDOWS["brain"])
    array([0. , 0.5, 1. ])
    """
    lo, hi = window_range(window)
    return (np.clip(np.asarray(x, dtype=np.float64), lo, hi) - lo) / (hi - lo)


def _check_window_keeps_values(ref: np.ndarray, win: tuple[float, float]) -> None:
    """MedvaeError when the window maps the whole reference to one value, or to under a millionth of its
    width, although the reference holds several values: every slice then scored as identical to its
    reference (infinite PSNR) or near-perfect, whatever the restoration (``--window 0,1e308``)."""
    lo_v, hi_v = float(np.min(ref)), float(np.max(ref))
    ends = apply_window(np.array([lo_v, hi_v]), win)
    if hi_v > lo_v and ends[1] - ends[0] < 1e-6:
        where = ("lie outside it" if hi_v <= win[0] or lo_v >= win[1]
                 else "span under a millionth of a window that wide")
        raise MedvaeError(f"the window {win[0]:g}..{win[1]:g} leaves the reference no contrast to score: its values "
                          f"{lo_v:g}..{hi_v:g} {where}; give a window around them")


def default_scaling(reference: np.ndarray, modality: str | None, *, strict: bool = True) -> dict[str, Any]:
    """medvae's default scaling for a reference volume, for callers that want one.

    * CT: the ``ct`` window, −1000..1000 HU (the model's own window, :mod:`medvae.intensity`);
    * MR and anything else: the reference volume's 0.5 and 99.5 percentiles as the window, so both
      volumes are scaled to [0, 1] with the reference's percentiles, clipped, and the data range is 1
      (BraTS normalises with percentiles the same way).

    Returns ``{"window": (lo, hi), "data_range": None, "source": <words>}``; ``MedvaeError`` when the
    percentiles coincide (a constant or nearly empty reference): a window one unit wide scored a uniform
    phantom with noise of 1 % at 3.5 dB. ``strict=False`` gives that window instead (to show images in).
    """
    from medvae.intensity import IntensityPolicy

    require_finite(np.asarray(reference), what="reference")  # evaluate refuses it: no window is made for it
    if (modality or "").upper() == "CT":
        return {"window": WINDOWS["ct"].bounds, "data_range": None,
                "source": "CT default: window 'ct' (-1000..1000 HU)"}
    try:  # every voxel, as documented
        lo, hi = IntensityPolicy().window_for(np.asarray(reference), "MR", exact=True, strict=strict)
    except ValueError as exc:
        raise MedvaeError(f"no default window for this reference: {exc}; give --window or --data-range") from None
    return {"window": (lo, hi), "data_range": None,
            "source": f"{(modality or 'unknown modality')} default: reference volume 0.5-99.5 percentiles"}


# --------------------------------------------------------------------------------------------
# 2-D metrics
# --------------------------------------------------------------------------------------------
def _prepare_pair(reference, image, data_range, window) -> tuple[np.ndarray, np.ndarray, float]:
    reference = np.asarray(reference)
    image = np.asarray(image)
    if reference.ndim != 2 or image.ndim != 2:  # evaluate_volumes scores volumes
        raise MedvaeError(f"expected 2-D slices, got shapes {reference.shape} and {image.shape} "
                          "(evaluate_volumes scores (X, Y, Z) volumes slice by slice)")
    if reference.shape != image.shape:
        raise MedvaeError(f"reference has shape {reference.shape} but image has shape {image.shape}")
    if reference.size == 0:  # the mean of nothing is NaN, which reads like a score
        raise MedvaeError(f"the slices are empty (shape {reference.shape})")
    r, win = _check_scaling(data_range, window)
    require_finite(reference, what="reference")  # NaN would give a NaN metric, inf a -inf PSNR
    require_finite(image, what="image")
    if win is not None:
        return apply_window(reference, win), apply_window(image, win), r
    return reference.astype(np.float64), image.astype(np.float64), r


def _region(mask, shape) -> np.ndarray | None:
    if mask is None:
        return None
    m = np.asarray(mask)
    if m.shape != shape:
        raise MedvaeError(f"mask has shape {m.shape} but the images have shape {shape}")
    return as_mask(m)


def _psnr_from_mse(mse: float, data_range: float) -> float:
    if np.isnan(mse):
        return float("nan")
    if mse == 0:
        return float("inf")
    return float(10.0 * np.log10((data_range ** 2) / mse))


def psnr(reference: np.ndarray, image: np.ndarray, *, data_range: float | None = None,
         window: WindowLike | None = None, mask: np.ndarray | None = None) -> float:
    """Peak signal-to-noise ratio of one 2-D slice, in dB.

    ``10 * log10(R**2 / MSE)`` where the MSE is over ``mask`` pixels only (all pixels without a
    mask). Give exactly one of ``data_range`` (raw values) or ``window`` (both images clipped to the
    window and scaled to [0, 1], R = 1). ``window`` is a plain ``(lo, hi)`` pair, or a :class:`Window`
    (center, width) such as ``WINDOWS["brain"]``, or a preset name such as ``"brain"`` (see
    :func:`window_range`). Identical images give ``inf``; an empty mask gives NaN. Without a mask this
    equals ``skimage.metrics.peak_signal_noise_ratio``.

    >>> psnr(np.zeros((8, 8)), np.full((8, 8), 0.1), data_range=1.0)
    20.0
    >>> psnr(np.zeros((8, 8)), np.full((8, 8), 8.0), window=WINDOWS["brain"])   # 0..80 HU
    20.0
    >>> psnr(np.zeros((8, 8)), np.full((8, 8), 8.0), window=(0, 80))             # the same, as (lo, hi)
    20.0
    """
    ref, img, r = _prepare_pair(reference, image, data_range, window)
    region = _region(mask, ref.shape)
    err = (ref - img) ** 2
    if region is not None:
        if not region.any():
            return float("nan")
        err = err[region]
    return _psnr_from_mse(float(np.mean(err, dtype=np.float64)), r)


def _ssim_map(ref: np.ndarray, img: np.ndarray, data_range: float) -> np.ndarray:
    from skimage.metrics import structural_similarity

    if min(ref.shape) < _SSIM_WIN:
        raise MedvaeError(
            f"slices of {ref.shape[0]}x{ref.shape[1]} pixels are smaller than the {_SSIM_WIN}x{_SSIM_WIN} SSIM window"
        )
    _, smap = structural_similarity(ref, img, data_range=data_range, full=True)
    return smap


def _interior(shape: tuple[int, ...]) -> np.ndarray:
    inner = np.zeros(shape, dtype=bool)
    p = _SSIM_PAD
    inner[p:shape[0] - p, p:shape[1] - p] = True
    return inner


def ssim(reference: np.ndarray, image: np.ndarray, *, data_range: float | None = None,
         window: WindowLike | None = None, mask: np.ndarray | None = None) -> float:
    """Structural similarity of one 2-D slice (see :data:`SSIM_DEFINITION`).

    scikit-image's ``structural_similarity`` with its defaults (7×7 uniform window, sample
    covariance, K1 = 0.01, K2 = 0.03) is computed on the whole slice with ``full=True``; its SSIM map
    is then averaged over ``mask`` (BraTS convention), restricted to pixels at least 3 px from the
    border, which are the pixels scikit-image itself averages. Without a mask the value equals
    scikit-image's mean SSIM. Give exactly one of ``data_range`` or ``window``: a plain ``(lo, hi)``
    pair, a :class:`Window` (center, width) or a preset name (see :func:`psnr`, :func:`window_range`).
    An empty region gives NaN. This is *not* MONAI's ``SSIMMetric`` (Gaussian window).

    >>> from skimage.metrics import structural_similarity
    >>> ref = np.tile(np.linspace(0.0, 1.0, 32), (32, 1))
    >>> noisy = ref + np.random.default_rng(0).normal(0.0, 0.1, ref.shape)
    >>> ssim(ref, ref, data_range=1.0)
    1.0
    >>> round(ssim(ref, noisy, data_range=1.0), 4), round(float(structural_similarity(ref, noisy, data_range=1.0)), 4)
    (0.49, 0.49)
    >>> inner = np.zeros(ref.shape, bool); inner[8:24, 8:24] = True
    >>> round(ssim(ref, noisy, data_range=1.0, mask=inner), 4)                  # the map averaged inside
    0.4853
    """
    ref, img, r = _prepare_pair(reference, image, data_range, window)
    region = _region(mask, ref.shape)
    smap = _ssim_map(ref, img, r)
    sel = _interior(ref.shape)
    if region is not None:
        sel &= region
    if not sel.any():
        return float("nan")
    return float(np.mean(smap[sel], dtype=np.float64))


# --------------------------------------------------------------------------------------------
# regions
# --------------------------------------------------------------------------------------------
def foreground_threshold(reference: np.ndarray, modality: str | None) -> float:
    """The intensity above which a reference voxel counts as foreground (see ``REGION_DEFINITIONS``)."""
    mod = (modality or "").upper()
    if mod not in ("", "CT", "MR"):  # another modality would silently get the rule for unknown ones
        raise MedvaeError(f"modality must be CT, MR or None, not {modality!r}")
    if mod == "CT":
        return CT_FOREGROUND_HU
    finite = np.asarray(reference)[np.isfinite(reference)]
    if finite.size == 0:
        return float("inf")
    if mod == "MR":
        return float(MR_FOREGROUND_FRACTION * np.percentile(finite, 99.5))
    lo, hi = np.percentile(finite, (0.5, 99.5))
    return float(lo + MR_FOREGROUND_FRACTION * (hi - lo))


def foreground_mask(reference: np.ndarray, modality: str | None) -> np.ndarray:
    """Boolean body mask of a reference volume ``(X, Y, Z)`` (or one 2-D slice).

    Threshold (:func:`foreground_threshold`): CT > −500 HU; MR > 10 % of the reference volume's 99.5th
    percentile; unknown modality > p0.5 + 10 % of (p99.5 − p0.5). Then, per slice, specks of noise
    (8-connected components smaller than 0.1 % of the slice, at least 4 pixels) are removed and holes
    are filled (air cavities inside the body stay foreground). Unlike a binary opening this keeps thin
    structures (scalp, skin) of low-resolution scans.
    """
    from scipy import ndimage
    from skimage.morphology import remove_small_objects

    ref = np.asarray(reference)
    if ref.ndim not in (2, 3) or ref.size == 0:
        raise MedvaeError(f"the reference must be a 2-D slice or a 3-D volume, not shape {ref.shape}")
    require_finite(ref, what="reference")  # a NaN is no body and no air: its threshold would be made up
    vol = ref[:, :, None] if ref.ndim == 2 else ref
    raw = vol > foreground_threshold(vol, modality)
    out = np.zeros_like(raw)
    min_size = max(4, int(round(0.001 * vol.shape[0] * vol.shape[1])))
    for k in range(vol.shape[2]):
        # connectivity=2: 8-connected in 2-D; components of fewer than min_size pixels go
        kept = remove_small_objects(raw[:, :, k], max_size=min_size - 1, connectivity=2)
        out[:, :, k] = ndimage.binary_fill_holes(kept)
    return out[:, :, 0] if ref.ndim == 2 else out


# --------------------------------------------------------------------------------------------
# volumes
# --------------------------------------------------------------------------------------------
def _stats(values: np.ndarray) -> dict[str, Any]:
    """``mean/median/min/max`` and ``n_slices`` (how many values) of the per-slice values of the
    region's common slice set, which are all finite (see :func:`_common_slices`); NaN statistics
    and ``n_slices`` 0 when the set is empty."""
    v = np.asarray(values, dtype=np.float64)
    if not np.isfinite(v).all():  # the common slice set never holds NaN (empty) or inf (identical)
        raise AssertionError("summary statistics over non-finite per-slice values")
    if v.size == 0:
        return {**{s: float("nan") for s in STATS}, "n_slices": 0}
    return {"mean": float(np.mean(v)), "median": float(np.median(v)), "min": float(np.min(v)),
            "max": float(np.max(v)), "n_slices": int(v.size)}


def _common_slices(per: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, Any]:
    """The slices of one region that its summary is taken over, for every source and both metrics.

    ``per[source][metric]`` holds the per-slice values (length ``n_slices``). A slice is left out

    * as ``empty`` when the region has no pixel there, or none at least 3 px from the slice border
      (PSNR or SSIM is NaN; this depends on the region only, not on the source);
    * else as ``identical`` when *any* source equals the reference there (infinite PSNR).

    Returns ``{"used": bool array, "empty": bool array, "identical": bool array,
    "identical_by_source": {source: bool array}}``.
    """
    first = next(iter(per.values()))
    n = len(first["psnr"])
    empty = np.zeros(n, dtype=bool)
    for vals in per.values():
        for metric in METRICS:
            empty |= np.isnan(vals[metric])
    by_source = {src: np.isinf(vals["psnr"]) & ~empty for src, vals in per.items()}
    identical = np.zeros(n, dtype=bool)
    for flags in by_source.values():
        identical |= flags
    used = ~empty & ~identical
    return {"used": used, "empty": empty, "identical": identical, "identical_by_source": by_source}


def headline_region(summary: Mapping[str, Any]) -> str:
    """The region whose PSNR is the case's headline: ``summary["headline"]["region"]``
    (:func:`evaluate_volumes`: ``mask`` for a hole mask, inpainting, where only the damaged pixels were
    restored; ``image`` for denoising, also with the noise mask ``medvae corrupt`` writes); a summary
    without it: ``mask`` whenever it has that region.

    >>> headline_region({"regions": {"image": "", "mask": ""}, "headline": {"metric": "psnr", "region": "image"}})
    'image'
    """
    region = summary.get("headline", {}).get("region")
    return region if region else ("mask" if "mask" in summary.get("regions", {}) else "image")


@dataclass
class Evaluation:
    """Result of :func:`evaluate_volumes`.

    Attributes
    ----------
    rows : list of dict
        One per slice × source × region: ``slice`` (index k of ``array[:, :, k]``), ``source``
        (``restored`` / ``corrupted``), ``region``, ``n_pixels`` (pixels in the region), ``psnr``
        (dB) and ``ssim``; NaN where the region is empty, ``inf`` PSNR where the images are
        identical. Every slice is kept here, including those left out of the summary.
    summary : dict
        ``n_slices``, ``shape``, ``modality``, ``scaling`` (window or data range and the range used),
        ``psnr_definition``, ``ssim_definition``, ``regions`` (region → definition, only the regions
        evaluated), ``sources``, ``headline`` (``{"metric": "psnr", "region": "mask"|"image"}``, see
        :func:`headline_region`), ``identical_slices`` (the slice rule in words,
        :data:`IDENTICAL_SLICES`) and:

        * ``metrics[source][region][metric]`` → ``mean/median/min/max`` over the region's common
          slice set (the same slices for every source and both metrics), ``n_slices`` (how many
          slices that is), ``n_left_out`` = ``n_left_out_identical`` (some source identical to the
          reference there) + ``n_left_out_empty`` (region empty there), and ``n_identical`` (slices
          where *this* source is identical to the reference, all of them left out);
          ``n_slices + n_left_out`` is the number of slices of the volume;
        * ``slice_sets[region]`` → the same counts and the slice indices ``k`` left out:
          ``left_out_identical``, ``left_out_empty`` and ``identical_by_source`` (source → indices);
        * ``restored_minus[source][region][metric]`` → ``mean/median/min/max/n_slices`` of the
          per-slice difference restored − ``source`` over the same common slice set (positive: the
          restoration scores higher), for every source other than ``restored``;
          ``restored_minus_definition`` says so in words.
    """

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    _index: dict[tuple[str, str, str], np.ndarray] = field(default_factory=dict, repr=False)

    def per_slice(self, source: str, region: str, metric: str) -> np.ndarray:
        """The per-slice values of one metric as an array of length ``n_slices`` (NaN = empty region)."""
        key = (source, region, metric)
        if key not in self._index:
            n = self.summary["n_slices"]
            out = np.full(n, np.nan)
            found = False
            for row in self.rows:
                if row["source"] == source and row["region"] == region:
                    out[row["slice"]] = row[metric]
                    found = True
            if not found:
                raise KeyError(f"no {metric} for source={source!r}, region={region!r}")
            self._index[key] = out
        return self._index[key]

    def flat_metrics(self, *, stat: str = "mean") -> dict[str, float]:
        """``{"restored.image.psnr_mean": ...}`` for MLflow: every name says its source and region.

        Also ``psnr_REGION`` / ``ssim_REGION`` for the restored source (``psnr_mask``,
        ``psnr_image``, ...), ``SOURCE.REGION.psnr_n_identical`` (slices where that source is
        identical to the reference), ``REGION.n_slices_used`` / ``REGION.n_slices_left_out`` (the
        region's common slice set, the same for every source and metric) and
        ``restored_minus_SOURCE.REGION.METRIC_STAT`` (the paired per-slice difference, see
        ``summary["restored_minus"]``). Non-finite values are left out.
        """
        out: dict[str, float] = {}

        def put(name: str, v: Any) -> None:
            if isinstance(v, float) and math.isfinite(v):
                out[name] = v

        for source, regions in self.summary["metrics"].items():
            for region, metrics in regions.items():
                for metric, stats in metrics.items():
                    put(f"{source}.{region}.{metric}_{stat}", stats[stat])
                    if source == "restored":
                        put(f"{metric}_{region}", stats[stat])
                out[f"{source}.{region}.psnr_n_identical"] = float(metrics["psnr"].get("n_identical", 0))
        for region, used in self.summary.get("slice_sets", {}).items():
            out[f"{region}.n_slices_used"] = float(used["n_slices"])
            out[f"{region}.n_slices_left_out"] = float(used["n_left_out"])
        for source, regions in self.summary.get("restored_minus", {}).items():
            for region, metrics in regions.items():
                for metric, stats in metrics.items():
                    put(f"restored_minus_{source}.{region}.{metric}_{stat}", stats[stat])
        return out

    def write_csv(self, path: str | PathLike) -> Path:
        """One line per slice × source × region: ``slice,source,region,n_pixels,psnr,ssim``.

        Empty regions are written as empty cells, identical images as ``inf``.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        cols = ["slice", "source", "region", "n_pixels", "psnr", "ssim"]
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(cols)
            for row in self.rows:
                w.writerow(["" if isinstance(row[c], float) and math.isnan(row[c]) else
                            (repr(row[c]) if isinstance(row[c], float) else row[c]) for c in cols])
        return path

    def write_json(self, path: str | PathLike) -> Path:
        """The summary as strict JSON: finite numbers or null (a region with no slice left to
        summarize), with the slice counts (``n_slices``, ``n_left_out``, ...) beside every
        statistic; never "inf"."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(json_safe(self.summary), indent=2, allow_nan=False) + "\n")
        return path


def _as_volume(name: str, x: np.ndarray | None) -> np.ndarray | None:
    if x is None:
        return None
    a = np.asarray(x)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise MedvaeError(f"{name} must be a 3-D (X, Y, Z) volume, got shape {a.shape}")
    return a


def evaluate_volumes(
    restored: np.ndarray,
    reference: np.ndarray,
    *,
    data_range: float | None = None,
    window: WindowLike | None = None,
    mask: np.ndarray | None = None,
    corrupted: np.ndarray | None = None,
    baseline: np.ndarray | None = None,
    modality: str | None = None,
    regions: Iterable[str] | None = None,
    show_progress: bool = False,
) -> Evaluation:
    """PSNR and SSIM of every slice ``array[:, :, k]`` of ``restored`` (and ``corrupted``,
    ``baseline``) against ``reference``, over the regions ``image``, ``mask`` (when ``mask`` is given)
    and ``foreground``.

    The rows keep every slice; each region's summary is over one common slice set for every source
    and both metrics: slices where the region is empty, or where any source is identical to the
    reference, are left out of it for all of them and counted (see :class:`Evaluation` and the
    module docstring).

    Parameters
    ----------
    restored, reference : ndarray (X, Y, Z)
        Same shape; 2-D arrays are taken as one slice.
    data_range, window : exactly one of them
        See the module docstring. ``window`` is a plain ``(lo, hi)`` pair, a :class:`Window`
        (center, width) such as ``WINDOWS["brain"]``, or a preset name or ``"CENTER,WIDTH"``
        string (see :func:`window_range`); ``summary["scaling"]["window"]`` records its ``[lo, hi]``.
    mask : ndarray (X, Y, Z), optional
        Damage mask, nonzero = damaged.
    corrupted : ndarray (X, Y, Z), optional
        The damaged input, scored the same way.
    baseline : ndarray (X, Y, Z), optional
        Another restoration of the same input (e.g. NL-means), scored the same way.
    modality : "CT", "MR" or None
        Chooses the foreground rule (:func:`foreground_mask`).
    regions : iterable of str, optional
        Subset of ``("image", "mask", "foreground")``; default all that apply.
    show_progress : bool
        Report progress on stderr (:func:`medvae.progress.progress`).

    Raises
    ------
    MedvaeError
        Shapes differ (both named), an input holds NaN/inf, or slices are smaller than 7×7.
    ValueError
        Neither or both of ``data_range`` and ``window``.
    """
    range_used, win = _check_scaling(data_range, window)
    ref = _as_volume("reference", reference)
    vols = {"restored": _as_volume("restored", restored)}
    if baseline is not None:
        vols["baseline"] = _as_volume("baseline", baseline)
    if corrupted is not None:
        vols["corrupted"] = _as_volume("corrupted", corrupted)
    m = _as_volume("mask", mask)
    given = {"restored": restored, "baseline": baseline, "corrupted": corrupted, "mask": mask}
    for name, a in [*vols.items(), ("mask", m)]:
        if a is not None and a.shape != ref.shape:  # the shapes as passed: a 2-D one is shown (X, Y), not (X, Y, 1)
            raise MedvaeError(f"{name} has shape {tuple(np.shape(given[name]))} but reference has shape "
                              f"{tuple(np.shape(reference))}")
    if ref.size == 0:  # a summary of NaN would read like a result
        raise MedvaeError(f"the reference is empty (shape {tuple(ref.shape)})")
    require_finite(ref, what="reference")
    for name, a in vols.items():
        require_finite(a, what=name)
    if m is not None:
        m = as_mask(m)
    if win is not None:
        _check_window_keeps_values(ref, win)

    # one name alone is that region ("image" was read letter by letter: unknown regions 'a', 'e', ...)
    wanted = list(REGIONS) if regions is None else [regions] if isinstance(regions, str) else list(regions)
    unknown = set(wanted) - set(REGIONS)
    if unknown:
        raise ValueError(f"unknown region(s) {sorted(unknown)}; choose from {REGIONS}")
    if m is None and "mask" in wanted:
        if regions is not None:  # asked for by name: scoring nothing would look like a result
            raise ValueError("region 'mask' needs a mask")
        wanted = [r for r in wanted if r != "mask"]
    if not wanted:
        raise ValueError("regions is empty: name at least one of " + ", ".join(REGIONS))
    region_vols: dict[str, np.ndarray | None] = {}
    for r in wanted:
        if r == "image":
            region_vols[r] = None
        elif r == "mask":
            region_vols[r] = m
        else:
            region_vols[r] = foreground_mask(ref, modality)
    # the headline: inside the mask when it asks for inpainting; over the image for a noise mask (all ones,
    # or for CT all but the padding), which was headlined "mask" although every pixel was restored
    holes = "mask" in region_vols and is_hole_mask(m, lambda a, b: ref[:, :, a:b], str(modality or ""))
    headline = "mask" if holes else "image"
    if headline not in region_vols:  # the regions asked for leave it out: the first of them there is
        headline = next(r for r in ("mask", "image", "foreground") if r in region_vols)

    def scaled(a: np.ndarray, k: int) -> np.ndarray:
        s = a[:, :, k]
        return apply_window(s, win) if win is not None else s.astype(np.float64)

    from medvae.progress import progress

    nz = ref.shape[2]
    inner = _interior(ref.shape[:2])
    rows: list[dict[str, Any]] = []
    for k in progress(range(nz), desc="evaluate", unit="slices", enabled=show_progress):
        ref_k = scaled(ref, k)
        for source, vol in vols.items():
            img_k = scaled(vol, k)
            sq = (ref_k - img_k) ** 2
            smap = _ssim_map(ref_k, img_k, range_used)
            for r, rv in region_vols.items():
                if rv is None:
                    n_px = sq.size
                    p = _psnr_from_mse(float(np.mean(sq, dtype=np.float64)), range_used)
                    s = float(np.mean(smap[inner], dtype=np.float64))
                else:
                    reg = rv[:, :, k]
                    n_px = int(np.count_nonzero(reg))
                    p = _psnr_from_mse(float(np.mean(sq[reg], dtype=np.float64)), range_used) if n_px else float("nan")
                    sel = reg & inner
                    s = float(np.mean(smap[sel], dtype=np.float64)) if sel.any() else float("nan")
                rows.append({"slice": k, "source": source, "region": r, "n_pixels": n_px, "psnr": p, "ssim": s})

    ev = Evaluation(rows=rows, summary={})
    # one common slice set per region: every source and both metrics are summarized over the same
    # slices, so the summary ranks the sources as their per-slice values do
    metrics: dict[str, Any] = {source: {} for source in vols}
    differences: dict[str, Any] = {source: {} for source in vols if source != "restored"}
    slice_sets: dict[str, Any] = {}
    per_all = {(source, r): {metric: np.full(nz, np.nan) for metric in METRICS} for source in vols for r in region_vols}
    for row in rows:
        for metric in METRICS:
            per_all[row["source"], row["region"]][metric][row["slice"]] = row[metric]
    for r in region_vols:
        per = {source: per_all[source, r] for source in vols}
        sets = _common_slices(per)
        used = sets["used"]
        counts = {"n_left_out": int(nz - np.count_nonzero(used)),
                  "n_left_out_identical": int(np.count_nonzero(sets["identical"])),
                  "n_left_out_empty": int(np.count_nonzero(sets["empty"]))}
        for source in vols:
            n_same = int(np.count_nonzero(sets["identical_by_source"][source]))
            metrics[source][r] = {metric: {**_stats(per[source][metric][used]), "n_identical": n_same, **counts}
                                  for metric in METRICS}
            if source != "restored":
                differences[source][r] = {
                    metric: _stats(per["restored"][metric][used] - per[source][metric][used]) for metric in METRICS}
        slice_sets[r] = {
            "n_slices": int(np.count_nonzero(used)), **counts,
            "left_out_identical": [int(k) for k in np.flatnonzero(sets["identical"])],
            "left_out_empty": [int(k) for k in np.flatnonzero(sets["empty"])],
            "identical_by_source": {source: [int(k) for k in np.flatnonzero(flags)]
                                    for source, flags in sets["identical_by_source"].items()},
        }
    ev.summary = {
        "n_slices": int(nz),
        "shape": [int(v) for v in ref.shape],
        "modality": modality,
        "scaling": {
            "window": None if win is None else [win[0], win[1]],
            "data_range": None if win is not None else range_used,
            "range_used": range_used,
            "description": (f"clipped to window {win[0]:g}..{win[1]:g} and scaled to [0, 1], data_range 1"
                            if win is not None else f"raw values, data_range {range_used:g}"),
        },
        "psnr_definition": PSNR_DEFINITION,
        "ssim_definition": SSIM_DEFINITION,
        "regions": {r: REGION_DEFINITIONS[r] for r in region_vols},
        "sources": list(vols),
        "headline": {"metric": "psnr", "region": headline},
        "identical_slices": IDENTICAL_SLICES,
        "metrics": metrics,
        "slice_sets": slice_sets,
        "restored_minus": differences,
        "restored_minus_definition": RESTORED_MINUS_DEFINITION,
    }
    return ev


# --------------------------------------------------------------------------------------------
# scans on disk
# --------------------------------------------------------------------------------------------
#: The optional companions of a restored scan that :func:`evaluate_scans` reads.
COMPANIONS = ("mask", "corrupted", "baseline", "uncertainty")


@dataclass
class ScanEvaluation:
    """Result of :func:`evaluate_scans`: the evaluation and the scans it was computed on.

    ``scans`` maps ``reference``, ``restored`` and any of :data:`COMPANIONS` that were given to
    their loaded :class:`medvae.io.Scan`; ``window`` / ``data_range`` is the scaling used,
    ``scaling_source`` says where it came from (``--window``, ``--data-range`` or the default's
    words), ``display_window`` is the grey window of the figures (the metric window, or the default
    one when raw values were scored) and ``units`` is ``"HU"`` for CT, else ``""``.
    """

    evaluation: Evaluation
    scans: dict[str, Any]
    modality: str | None
    window: tuple[float, float] | None
    data_range: float | None
    scaling_source: str
    display_window: tuple[float, float]
    units: str
    modality_guess: str | None = None   # why the modality was guessed (NIfTI), else None

    def array(self, name: str) -> np.ndarray | None:
        """The voxel array of one scan, or None when it was not given."""
        scan = self.scans.get(name)
        return None if scan is None else scan.array

    @property
    def scaling_text(self) -> str:
        """``window 0..80 HU, clipped and scaled to [0, 1], data range 1`` or ``raw values, ...``."""
        usfx = f" {self.units}" if self.units else ""
        if self.window is not None:
            return (f"window {self.window[0]:g}..{self.window[1]:g}{usfx}, clipped and scaled to [0, 1], "
                    "data range 1")
        return f"raw values, data range {self.data_range:g}{usfx}"


def _same_geometry(name: str, scan, path, ref, ref_path) -> None:
    if tuple(scan.array.shape) != tuple(ref.array.shape):
        raise MedvaeError(f"{name} has shape {tuple(scan.array.shape)} but the reference ({ref_path}) has shape "
                          f"{tuple(ref.array.shape)}{_voxel_order_note(scan, ref)}", path)
    a, b = scan.affine_mm, ref.affine_mm  # in mm: a NIfTI header may count in micrometres or metres
    if not np.allclose(a, b, rtol=0, atol=1e-2):
        diff = float(np.max(np.abs(a - b)))
        raise MedvaeError(f"{name} is not in the reference's geometry ({ref_path}): affines differ by up to "
                          f"{diff:.3g} mm{_voxel_order_note(scan, ref)}", path)
    # entries within 0.01 still let a spacing 0.009 mm off drift by mm across the grid: compare the
    # world positions of the grid's corner voxels too
    corners = np.array([[i, j, k, 1.0] for i in (0, ref.array.shape[0] - 1) for j in (0, ref.array.shape[1] - 1)
                        for k in (0, ref.array.shape[2] - 1)]).T
    drift = float(np.max(np.linalg.norm((a @ corners - b @ corners)[:3], axis=0)))
    if drift > 1e-2:
        raise MedvaeError(f"{name} is not in the reference's geometry ({ref_path}): its voxels lie up to "
                          f"{drift:.3g} mm from the reference's (spacing or origin differ slightly)", path)
    # a DICOM affine steps by the mean gap from the first slice to the last: two series of as many slices
    # with a gap in different places passed, and slices of different anatomy were scored as pairs. (A NIfTI
    # file written from a series with a gap, such as corrupt's mask, holds its slices in the series' order
    # on an even grid: it pairs by index.)
    if scan.format != "dicom" or ref.format != "dicom":
        return
    from medvae.io.formats import scan_slice_positions

    pa, pb = scan_slice_positions(scan), scan_slice_positions(ref)
    off = np.abs(pa - pb)
    if off.size and float(off.max()) > 1e-2:
        k = int(np.argmax(off > 1e-2))
        raise MedvaeError(f"{name} is not in the reference's geometry ({ref_path}): its slice {k} lies at "
                          f"{pa[k]:.3f} mm along the slice normal, the reference's at {pb[k]:.3f} mm (a missing "
                          "slice or uneven gaps in one of them)", path)


def _voxel_order_note(scan, ref) -> str:
    """``"; ... the same grid in another voxel order ..."`` when ``scan`` holds the reference's voxel grid
    with its axes permuted or reversed (e.g. a DICOM series and a NIfTI file of the same scan), else ``""``."""
    try:
        from nibabel.orientations import aff2axcodes, inv_ornt_aff, io_orientation, ornt_transform

        a, b = np.asarray(scan.affine, dtype=np.float64), np.asarray(ref.affine, dtype=np.float64)
        codes_a, codes_b = "".join(aff2axcodes(a)), "".join(aff2axcodes(b))
        t = ornt_transform(io_orientation(a), io_orientation(b))
        moved = a @ inv_ornt_aff(t, scan.array.shape[:3])
        shape = tuple(int(scan.array.shape[int(i)]) for i in np.argsort(t[:, 0]))
    except Exception:  # noqa: BLE001  (an affine nibabel cannot read: no note)
        return ""
    if codes_a != codes_b and shape == tuple(ref.array.shape[:3]) and np.allclose(moved, b, rtol=0, atol=1e-2):
        return (f"; it holds the same voxel grid in another voxel order ({codes_a} vs the reference's {codes_b}), "
                "so voxel (i, j, k) is not the same anatomy: write both in one orientation first")
    if codes_a != codes_b:
        return f" (voxel order {codes_a} vs the reference's {codes_b})"
    return ""


def _load_input(name: str, path: str | PathLike, series: str | None, modality: str | None,
                chosen: list[bool]):
    """Read one input of :func:`evaluate_scans`, choosing ``series`` in a DICOM input that holds it.

    Appends to ``chosen`` (for DICOM inputs) whether ``series`` was found there, so the caller can
    refuse a UID that no input holds.
    """
    from medvae.io import load_scan
    from medvae.io.dicom import SeriesChoiceError, format_series_table
    from medvae.io.scan import is_nifti_path

    p = Path(path)
    if p.exists() and not p.is_dir() and is_nifti_path(p):
        from medvae.io.nifti import n_volumes

        n = n_volumes(p)
        if n > 1:  # load_scan would score volume 0 only, silently dropping the others
            raise MedvaeError(f"the {name} is a 4-D NIfTI with {n} volumes; medvae evaluate scores 3-D volumes "
                              "only: save the volume to score as its own file", p)
        return load_scan(p, modality=modality, what=f"the {name}")
    if series is None:
        try:
            return load_scan(p, modality=modality, what=f"the {name}")
        except SeriesChoiceError as exc:
            raise MedvaeError(f"the {name} input holds {len(exc.series)} series; choose one with --series UID "
                              f"(it applies to every DICOM input that holds it): {format_series_table(exc.series)}",
                              p) from None
    try:
        scan = load_scan(p, series=series, modality=modality, what=f"the {name}")
    except SeriesChoiceError as exc:
        if any(uid == series for uid, _, _ in exc.series):
            raise
        if len(exc.series) != 1:
            raise MedvaeError(f"the {name} input holds {len(exc.series)} series and --series {series} is not "
                              f"one of them: {format_series_table(exc.series)}", p) from None
        scan = load_scan(p, modality=modality, what=f"the {name}")  # its only series (e.g. a restoration's new series)
        chosen.append(False)
        return scan
    chosen.append(True)
    return scan


def evaluate_scans(
    restored: str | PathLike,
    reference: str | PathLike,
    *,
    mask: str | PathLike | None = None,
    corrupted: str | PathLike | None = None,
    baseline: str | PathLike | None = None,
    uncertainty: str | PathLike | None = None,
    window: WindowLike | None = None,
    data_range: float | None = None,
    series: str | None = None,
    modality: str | None = None,
    show_progress: bool = False,
) -> ScanEvaluation:
    """Read a restored scan, its reference and companions, check them, and score them.

    Every scan must be in the reference's geometry (same shape, affines within 0.01 mm and every voxel
    within 0.01 mm of the reference's, checked at the grid's corners and, between DICOM series, at every
    slice's stored position) and hold
    only finite values; the first that is not raises a :class:`MedvaeError` naming its file. The
    scaling is ``window`` or ``data_range`` when one is given, else :func:`default_scaling`.

    Parameters
    ----------
    restored, reference : path
        NIfTI files or DICOM files/folders (``series`` picks a series, see below).
    mask, corrupted, baseline, uncertainty : path, optional
        Damage mask (nonzero = damaged; adds the ``mask`` region), the damaged input and another
        restoration (both scored too), and an uncertainty map (only shown in the report).
    window, data_range : optional, at most one
        See the module docstring. ``window`` is a plain ``(lo, hi)`` pair, a :class:`Window`
        (center, width) such as ``WINDOWS["brain"]``, or a preset name or ``"CENTER,WIDTH"`` string
        (see :func:`window_range`); ``ScanEvaluation.window`` is its ``(lo, hi)``.
    series : str, optional
        SeriesInstanceUID to read from every DICOM input that holds it (a restored series keeps its
        source's folder layout, so RESTORED and REFERENCE can both hold several series). A DICOM
        input without it is read when it holds one series only; at least one input must hold it.
    modality : {"CT", "MR"}, optional
        The reference's modality, which picks the default scaling and the foreground rule;
        default: its DICOM Modality, or a guess from its values for NIfTI
        (``ScanEvaluation.modality_guess`` says why).
    show_progress : bool
        Report progress on stderr.

    Returns
    -------
    ScanEvaluation

    Examples
    --------
    >>> res = evaluate_scans("restored.nii.gz", "reference.nii.gz", window="brain")  # doctest: +SKIP
    >>> res.evaluation.summary["metrics"]["restored"]["image"]["psnr"]["mean"]                    # doctest: +SKIP
    31.2
    """
    if window is not None and data_range is not None:
        raise ValueError("give at most one of window and data_range")
    if window is not None:
        window = window_range(window)  # checked before anything is read
    chosen: list[bool] = []  # one entry per DICOM input: did it hold `series`?
    ref = _load_input("reference", reference, series, modality, chosen)
    from medvae.io.dicom import warn_if_modality_overridden

    warn_if_modality_overridden(ref.datasets, modality, reference)
    scans: dict[str, Any] = {"reference": ref, "restored": _load_input("restored", restored, series, modality, chosen)}
    paths: dict[str, Any] = {"reference": reference, "restored": restored}
    _same_geometry("restored", scans["restored"], restored, ref, reference)
    for name, path in (("mask", mask), ("corrupted", corrupted), ("baseline", baseline),
                       ("uncertainty", uncertainty)):
        if path:
            scans[name] = _load_input(name, path, series, None, chosen)
            paths[name] = path
            _same_geometry(name, scans[name], path, ref, reference)
    if series is not None and not any(chosen):
        raise MedvaeError(f"--series {series}: no input holds this series" if chosen else
                          "--series applies to DICOM inputs only (all inputs are NIfTI)", reference)
    for name in ("restored", "corrupted", "baseline"):  # the scored sources: every slice would be left out
        if name in scans and np.array_equal(scans[name].array, ref.array):  # (a mask may equal a binary one)
            raise MedvaeError(f"the {name} input is identical to the reference in every voxel: nothing to score "
                              "(the reference given twice, or a scan that was never changed)", paths[name])
    for name, scan in scans.items():
        require_finite(scan.array, paths[name], what=name)
    if "mask" in scans:  # its values, named with its file (an image given as the mask was "all damaged")
        as_mask(scans["mask"].array, mask)
    if "uncertainty" in scans and (low := float(np.min(scans["uncertainty"].array))) < 0:
        # a standard deviation is never negative: another scan given as the map (its coverage would be 0 %)
        raise MedvaeError(f"not an uncertainty map: it holds negative values (down to {low:.6g}), and a "
                          "standard deviation is never below 0", uncertainty)
    if min(ref.array.shape[:2]) < _SSIM_WIN:
        raise MedvaeError(f"slices of {ref.array.shape[0]}x{ref.array.shape[1]} pixels are smaller than the "
                          f"{_SSIM_WIN}x{_SSIM_WIN} SSIM window", reference)

    modality = (ref.modality or "").upper() or None
    units = "HU" if modality == "CT" else ""
    if window is not None:
        source = "--window"
        try:
            _check_window_keeps_values(ref.array, window_range(window))
        except MedvaeError as exc:
            raise MedvaeError(exc.message, reference) from None
    elif data_range is not None:
        source = "--data-range"
    else:
        try:
            default = default_scaling(ref.array, modality)
        except MedvaeError as exc:
            raise MedvaeError(exc.message, reference) from None
        window, source = default["window"], default["source"]
        from medvae.io.dicom import warn_if_not_hu

        warn_if_not_hu(ref.datasets, modality, reference, hint="give --window or --data-range in their units")
    m = scans.get("mask")
    ev = evaluate_volumes(
        scans["restored"].array, ref.array, data_range=data_range, window=window,
        mask=None if m is None else m.array,
        corrupted=scans["corrupted"].array if "corrupted" in scans else None,
        baseline=scans["baseline"].array if "baseline" in scans else None,
        modality=modality, show_progress=show_progress,
    )
    ev.summary["scaling"]["source"] = source
    # --data-range: the page still shows the images in the default window (one unit wide for a constant one)
    display = tuple(window if window is not None else default_scaling(ref.array, modality, strict=False)["window"])
    return ScanEvaluation(evaluation=ev, scans=scans, modality=modality, window=window,
                          data_range=data_range, scaling_source=source, display_window=display,
                          units=units, modality_guess=ref.modality_guess)
