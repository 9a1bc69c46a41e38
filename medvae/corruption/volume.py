"""Corrupting a whole scan volume with a recipe, in the scan's own units.

The volume is scaled to the recipe's window (:func:`recipe_window`: the model's window of
:mod:`medvae.intensity`, shifted to zero signal for MR magnitude data), corrupted slice by slice
(each slice with its own seed derived from ``seed`` and the slice index) or as a volume for 3-D
recipes (missing slices) and for steps drawn for the whole volume (a bias field, a mask file; see
``Recipe.whole_volume``), and scaled back. The scan's in-plane pixel size, when given, reaches the
recipe (low-dose CT noise depends on it). :func:`corrupt_scan` does the same from a scan file to
files: the corrupted scan in the input's format, the mask (NIfTI) and a JSON record.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medvae.corruption.noise import child_seed
from medvae.errors import MedvaeError, require_seed
from medvae.intensity import CT_PADDING_HU, IntensityPolicy, denormalize, normalize
from medvae.runtime import hold_after_commit
from medvae.slice_gaps import missing_slices

log = logging.getLogger(__name__)


def slice_seed(seed: int, k: int) -> int:
    """Seed of slice ``k`` derived from a volume seed (stable across runs and versions)."""
    return child_seed(seed, k)


#: ``VolumeCorruption.origin``: what 0 of the recipe's [0, 1] image is
ZERO_SIGNAL, WINDOW_LOW = "zero_signal", "window_low"




@dataclass
class VolumeCorruption:
    image: np.ndarray            # corrupted volume, float32, the scan's units
    mask: np.ndarray             # bool, True = corrupted voxel
    window: tuple[float, float]  # the intensity window the recipe worked in (its 0 and 1)
    mode: str                    # "slices" or "volume"
    records: list[dict[str, Any]]  # per-slice (or one) replayable records
    policy_window: tuple[float, float] | None = None  # the model's window (IntensityPolicy), same width
    origin: str = WINDOW_LOW     # ZERO_SIGNAL or WINDOW_LOW: what the recipe's 0 is
    pixel_size_mm: float | None = None  # the in-plane pixel size given to the recipe
    padding_voxels: int = 0      # CT padding outside the field of view, returned as it came (not in the mask)


def recipe_window(volume: np.ndarray, modality: str | None,
                  policy_window: tuple[float, float] | None = None) -> tuple[tuple[float, float], str]:
    """The window ``(low, high)`` a recipe works in (its image holds ``(v - low) / (high - low)``),
    and what its low end is (:data:`ZERO_SIGNAL` or :data:`WINDOW_LOW`).

    The width is that of the model's window (``policy_window``, default
    ``IntensityPolicy().window_for(volume, modality)``), so noise levels given as fractions of the
    window mean what they mean in training. The low end is zero signal for MR magnitude data (no
    negative finite value): Rician noise (``sqrt((x + n1)^2 + n2^2)``) and the bias field
    (``x * exp(field)``) are defined around zero signal, and an MR window starts at the 0.5
    percentile, which is well above zero in a scan without air around it. CT keeps its window
    (-1000 HU, zero attenuation, is its low end already), and signed data (e.g. phase or
    already-processed MR) keep the window's low end.

    Examples
    --------
    >>> mr = np.full((8, 8, 2), 200.0, np.float32); mr[2:6, 2:6] = 1000.0   # no background
    >>> IntensityPolicy().window_for(mr, "MR")
    (200.0, 1000.0)
    >>> recipe_window(mr, "MR")          # zero signal, the same width
    ((0.0, 800.0), 'zero_signal')
    >>> recipe_window(mr - 300, "MR")    # signed data: the window as it is
    ((-100.0, 700.0), 'window_low')
    >>> recipe_window(mr, "CT")
    ((-1000.0, 1000.0), 'window_low')
    """
    lo, hi = IntensityPolicy().window_for(volume, modality) if policy_window is None else policy_window
    if (modality or "").upper() != "CT":
        arr = np.asarray(volume)
        finite = np.isfinite(arr)
        if finite.any() and float(np.min(arr, where=finite, initial=np.inf)) >= 0:
            return (0.0, float(hi - lo)), ZERO_SIGNAL
    return (float(lo), float(hi)), WINDOW_LOW


def inplane_pixel_size(spacing: Sequence[float], source: str | os.PathLike | None = None) -> float:
    """One in-plane pixel size (mm) from an ``(X, Y[, Z])`` spacing: the geometric mean of X and Y.

    The low-dose CT simulation assumes square pixels. The geometric mean keeps the pixel's area, so
    the object's cross-section, and with it the chord lengths (attenuation) averaged over the view
    directions, stay those of the scan; either side alone would scale that area by their ratio.

    >>> inplane_pixel_size((0.5, 2.0, 3.0))
    1.0
    """
    try:
        dx, dy = (float(v) for v in list(spacing)[:2])
    except (TypeError, ValueError):
        raise MedvaeError(f"spacing must be the voxel size in mm (X, Y[, Z]), got {spacing!r}", source) from None
    if not (np.isfinite(dx) and np.isfinite(dy) and dx > 0 and dy > 0):
        raise MedvaeError(f"the in-plane spacing must be two positive numbers (mm), got {dx:g} x {dy:g}", source)
    return float(np.sqrt(dx * dy))


def _as_recipe(recipe: Any):
    """``recipe`` as a :class:`~medvae.corruption.Recipe`: loaded when a name or path is given."""
    from medvae.corruption.recipes import Recipe, load_recipe

    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, (str, os.PathLike)):
        try:
            return load_recipe(recipe)
        except ValueError as exc:
            raise MedvaeError(str(exc)) from None  # its messages name the recipe (file) already
    raise TypeError(f"recipe must be a recipe name, a YAML path or a Recipe (load_recipe), "
                    f"got {type(recipe).__name__}")


def _warn_noise_slices(name: str, mask: np.ndarray, image: np.ndarray, original: np.ndarray, padded: bool) -> None:
    """A per-slice mix that masks some slices whole (noise; for CT all but the padding it leaves out)
    beside slices with holes: ``restore --mask`` takes such a slice for a missing one and interpolates it
    from its neighbours (documented), which discards these noisy slices; say so where the mask is made (a
    missing slice holds one value)."""
    floor = CT_PADDING_HU if padded else None  # restore reads the padding it left out of the mask alike
    whole = missing_slices(mask, lambda a, b: original[:, :, a:b], floor)
    kept = [k for k in np.flatnonzero(whole) if np.ptp(image[:, :, k][mask[:, :, k]]) > 0]
    if kept:
        shown = ", ".join(map(str, kept[:8])) + (f" and {len(kept) - 8} more" if len(kept) > 8 else "")
        log.warning("recipe %r masks slice(s) %s whole (noise over the whole slice) beside slices with holes: "
                    "`medvae restore --mask` interpolates a wholly masked slice from its neighbours, as a "
                    "missing slice; restore such slices without --mask to denoise them", name, shown)


def _warn_nothing_applied(name: str, records: list[dict[str, Any]], modality: str | None) -> None:
    """A recipe whose steps were all skipped for the scan's modality (``modalities: CT`` on an MR scan)
    wrote an unchanged copy with an empty mask and exit 0: say so. Steps skipped by ``prob`` alone are
    the recipe's intent and pass quietly."""
    steps = [s for r in records for s in r["steps"]]
    # every step (if any: a one_of with no chain for the modality records none) skipped for the modality
    if all(s.get("skipped") == "modality" for s in steps):
        log.warning("recipe %r applies no step to a scan of modality %s: the output is an unchanged copy with an "
                    "empty mask (check the recipe's modalities, or give --modality)", name, modality or "(none)")


def corrupt_volume(volume: np.ndarray, recipe: Any, *, seed: int, modality: str | None,
                   source: str | os.PathLike | None = None,
                   spacing: Sequence[float] | None = None) -> VolumeCorruption:
    """Apply ``recipe`` to a (X, Y, Z) volume; the input is not modified.

    Parameters
    ----------
    volume : numpy.ndarray
        ``(X, Y, Z)``, the scan's units (HU for CT).
    recipe : str, PathLike or Recipe
        A shipped recipe name, a YAML path or a loaded recipe (see
        :func:`~medvae.corruption.load_recipe`).
    seed : int, keyword-only
        Slice ``k`` uses :func:`slice_seed` ``(seed, k)``; a recipe that runs on the whole volume
        (``Recipe.whole_volume``: a 3-D recipe, a bias field) uses ``seed``.
    modality : str or None, keyword-only
        ``"CT"``, ``"MR"`` (any case), another DICOM modality (its CT and MR steps skipped, with a
        warning) or None (no filter). Picks the window (:func:`recipe_window`) and the recipe's
        modality-filtered steps.
    source : str or PathLike, keyword-only
        Named in errors.
    spacing : (float, float[, float]), optional, keyword-only
        Voxel size in mm along X, Y[, Z] (``Scan.spacing``). Its in-plane size
        (:func:`inplane_pixel_size`) is given to the recipe: low-dose CT noise in HU depends on it.
        ``None``: unknown (low-dose steps fall back to their ``fov_mm`` rule).

    Returns
    -------
    VolumeCorruption
        ``image`` is float32: voxels outside the mask are the input's, bit for bit when the input is
        float32 or an integer type that float32 holds exactly (float64 input is rounded). ``window`` is the window the recipe
        worked in: ``replay(normalize(volume, window)[:, :, k][None], records[k])`` reproduces slice
        ``k`` in that scale, except CT padding outside the field of view (at or below
        :data:`CT_PADDING_HU`), which is returned as it came and left out of the mask: a scan taken
        at a lower dose keeps its padding, and viewers hide it by its PixelPaddingValue.

    Examples
    --------
    >>> from medvae.corruption import load_recipe
    >>> vc = corrupt_volume(np.full((32, 32, 2), 100, np.float32), load_recipe("boxes"), seed=0, modality="MR")
    >>> vc.image.shape, vc.mode, vc.origin
    ((32, 32, 2), 'slices', 'zero_signal')
    >>> water = np.zeros((64, 64, 1), np.float32)   # 0 HU
    >>> vc = corrupt_volume(water, load_recipe("lowdose_ct"), seed=0, modality="CT", spacing=(0.8, 0.8, 2.0))
    >>> vc.records[0]["steps"][0]["params"]["pixel_size_mm"]
    0.8
    """
    from medvae.io.formats import require_finite, require_real

    seed = require_seed(seed, source)
    if seed < 0:  # numpy's seeds are non-negative: it failed as "recipe 'boxes': expected non-negative integer"
        raise MedvaeError(f"seed must be a non-negative whole number, not {seed}", source)
    if modality is not None:
        if not isinstance(modality, str):
            raise MedvaeError(f"modality must be a string (CT, MR or another DICOM modality) or None, "
                              f"not {modality!r}", source)
        if modality.strip().upper() in ("CT", "MR"):
            modality = modality.strip().upper()
        else:  # "MRI" silently got Gaussian noise where MR gets Rician: say what another modality gets
            log.warning("%smodality %r is neither CT nor MR: the recipe's CT and MR steps are skipped and the "
                        "window is the volume's percentiles (give 'MR' or 'CT' if it is one of them)",
                        f"{source}: " if source else "", modality)
    recipe = _as_recipe(recipe)
    require_real(volume, source, what="the scan")  # float32 conversion would drop an imaginary part
    arr = np.asarray(volume, dtype=np.float32)
    if arr.ndim != 3:
        raise MedvaeError(f"expected a 3-D scan (X, Y, Z), got shape {arr.shape}", source)
    if arr.size == 0:
        raise MedvaeError(f"the scan is empty (shape {arr.shape})", source)
    if min(arr.shape[:2]) < 2:  # a single coronal slice stored (X, 1, Z): boxes became 1-pixel stripes
        raise MedvaeError(f"slices of {arr.shape[0]}x{arr.shape[1]} pixels ({arr.shape[2]} of them) cannot be "
                          "corrupted slice by slice, nor restored: at least 2x2 pixels are needed (a single "
                          "non-axial slice is stored as (X, 1, Z); reslice it as (X, Z, 1))", source)
    require_finite(arr, source, what="the scan")  # noise and masks passed NaN through, low-dose CT failed
    pixel = None if spacing is None else inplane_pixel_size(spacing, source)
    policy = IntensityPolicy().window_for(arr, modality)
    window, origin = recipe_window(arr, modality, policy)
    x = normalize(arr, window)
    try:
        # a one-slice scan takes a 2-D field; a 3-D-only recipe cannot run on it
        if recipe.requires_3d or (recipe.whole_volume and arr.shape[2] > 1):
            if arr.shape[2] < 2:
                raise MedvaeError(f"recipe {recipe.name!r} needs a 3-D volume; the scan has one slice", source)
            res = recipe(x[None], seed=int(seed), modality=modality, pixel_size_mm=pixel,
                         spacing_mm=None if spacing is None or len(spacing) != 3 else tuple(spacing))
            y, mask = res.image[0], res.mask[0]
            records, mode = [dict(res.record, slice=None)], "volume"
        else:
            y = np.empty_like(x)
            mask = np.zeros(x.shape, dtype=bool)
            records = []
            for k in range(x.shape[2]):
                res = recipe(x[:, :, k][None], seed=slice_seed(seed, k), modality=modality, pixel_size_mm=pixel)
                y[:, :, k], mask[:, :, k] = res.image[0], res.mask[0]
                records.append(dict(res.record, slice=k))
            mode = "slices"
            if "volume" in recipe.volume_modes and arr.shape[2] > 1:  # its field cannot span the volume
                log.warning("recipe %r pairs a step drawn for the whole volume (a bias field, a mask file) with "
                            "slice-wise steps: it runs slice by slice (a bias field per slice; a mask file must be "
                            "one slice); corrupt with that step alone, or with voxel-wise noise, to run it on the "
                            "volume", recipe.name)
    except MedvaeError:
        raise
    except ValueError as exc:
        raise MedvaeError(f"recipe {recipe.name!r}: {exc}", source) from None
    n_pad = 0
    padding = None
    if str(modality or "").upper() == "CT":  # as the window and the recipe's filters read it
        padding = arr <= CT_PADDING_HU
        n_pad = int(np.count_nonzero(padding))
        if n_pad:
            mask &= ~padding
    _warn_nothing_applied(recipe.name, records, modality)
    if mode == "slices":
        _warn_noise_slices(recipe.name, mask, y, arr, bool(n_pad))
    # outside the mask the scan is returned as it came: a round trip through the window would move
    # every voxel by float rounding, and untouched slices would no longer compare as identical
    return VolumeCorruption(np.where(mask, denormalize(y, window), arr), mask, window, mode, records,
                            policy, origin, pixel, n_pad)


@dataclass
class ScanCorruption:
    """What :func:`corrupt_scan` wrote."""

    output: Path        # corrupted scan (NIfTI file or DICOM series folder)
    mask: Path          # float32 NIfTI, 1 = corrupted voxel
    sidecar: Path       # JSON record (recipe, seed, windows, pixel size, every sampled parameter)
    recipe: str
    seed: int
    mode: str           # "slices" or "volume"
    mask_fraction: float
    modality: str = ""
    modality_guess: str | None = None   # why the modality was guessed (NIfTI), else None


def _strip_nifti(path: Path) -> str:
    from medvae.io.scan import split_nifti_suffix

    return split_nifti_suffix(str(path))[0]


def output_paths(output: str | os.PathLike, mask_output: str | os.PathLike | None = None) -> tuple[Path, Path, Path]:
    """``(output, mask, sidecar)`` paths of :func:`corrupt_scan`.

    Examples
    --------
    >>> [p.name for p in output_paths("out/noisy.nii.gz")]
    ['noisy.nii.gz', 'noisy_mask.nii.gz', 'noisy.json']
    >>> [p.name for p in output_paths("out/series", "m.nii")]
    ['series', 'm.nii', 'series.json']
    """
    out = Path(output)
    stem = _strip_nifti(out)
    mask = Path(mask_output) if mask_output else Path(stem + "_mask.nii.gz")
    return out, mask, Path(stem + ".json")


def _check_file_masks(recipe, scan) -> None:
    """Refuse a ``file_mask`` step whose file lies in another geometry than ``scan``: its holes were
    placed by voxel index, so a flipped or shifted mask erased another region. A one-slice mask (used
    on every slice) needs the scan's in-plane axes and an origin on the scan's slice axis."""
    from medvae.corruption.masks import RandFileMask
    from medvae.io import load_scan

    for t in recipe.transforms:
        if not isinstance(t, RandFileMask):
            continue
        m = load_scan(Path(t.path).expanduser(), reader="native", what="the mask")
        a, b = np.asarray(m.affine_mm, float), np.asarray(scan.affine_mm, float)
        if m.array.shape[:2] == scan.array.shape[:2] and m.array.shape[2:] in ((1,), scan.array.shape[2:]):
            if m.array.shape[2:] != (1,):
                same = np.allclose(a, b, rtol=0, atol=1e-3)  # in mm, as restore compares its mask
            else:  # one slice, used on every slice: its place along the slice axis does not matter
                axis = b[:3, 2] / max(np.linalg.norm(b[:3, 2]), 1e-12)
                d = a[:3, 3] - b[:3, 3]
                same = (np.allclose(a[:3, :2], b[:3, :2], rtol=0, atol=1e-3)
                        and np.linalg.norm(d - axis * (d @ axis)) <= 1e-3)
            if not same:
                raise MedvaeError("a file_mask step's mask has another geometry (affine) than the scan: its "
                                  "holes would land elsewhere", t.path)


def corrupt_scan(input_path: str | os.PathLike, output_path: str | os.PathLike, *, recipe: Any,
                 seed: int = 0, mask_path: str | os.PathLike | None = None, series: str | None = None,
                 volume: int | None = None, modality: str | None = None,
                 overwrite: bool = False) -> ScanCorruption:
    """Corrupt a scan file with a recipe; write the scan, its mask and a replayable JSON record.

    Parameters
    ----------
    input_path : str or PathLike
        NIfTI file, DICOM file or DICOM series folder (read with :func:`medvae.io.load_scan`).
    output_path : str or PathLike
        The corrupted scan, in the input's format (a NIfTI file, or a folder receiving a new
        derived DICOM series; a ``.nii.gz`` path works for any input).
    recipe : str, PathLike or Recipe, keyword-only
        A shipped recipe name (:func:`~medvae.corruption.list_recipes`), a YAML path or a loaded
        :class:`~medvae.corruption.Recipe`.
    seed : int, keyword-only
        Same input, recipe and seed: same outputs. Slice ``k`` uses :func:`slice_seed` ``(seed, k)``.
    mask_path : str or PathLike, keyword-only
        Default: see :func:`output_paths`. A ``.nii``/``.nii.gz`` path, or for a DICOM input a
        folder: the mask then is a derived DICOM series (1 = corrupted) with every slice's position,
        which a series with a missing slice or uneven gaps needs (a NIfTI affine cannot hold it).
    series : str, keyword-only
        SeriesInstanceUID to read when the input folder holds several series.
    volume : int, keyword-only
        Volume of a 4-D NIfTI file (0-based; default 0, with a log message); the outputs are that
        3-D volume's.
    modality : {"CT", "MR"}, keyword-only
        The intensity scaling the recipe works in (:func:`recipe_window`); default: the DICOM
        Modality, or a guess from the values for NIfTI (returned with its reason). The scan's
        in-plane spacing is given to the recipe (:func:`corrupt_volume`).
    overwrite : bool, keyword-only
        Replace existing outputs; default: refuse before reading anything.

    Returns
    -------
    ScanCorruption
        The paths written and a summary.

    Raises
    ------
    MedvaeError
        Unknown recipe, unreadable scan, an output that exists or would overwrite the input;
        nothing is written then. Each output is written atomically.

    Examples
    --------
    >>> import tempfile, pathlib, nibabel as nib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> nib.save(nib.Nifti1Image(np.full((32, 32, 2), 100, np.float32), np.eye(4)), d / "mr.nii.gz")
    >>> res = corrupt_scan(d / "mr.nii.gz", d / "noisy.nii.gz", recipe="boxes", seed=1)
    >>> res.mask.name, res.sidecar.name, res.mode
    ('noisy_mask.nii.gz', 'noisy.json', 'slices')
    """
    import contextlib

    from medvae import __version__
    from medvae.io import claim_scan_output, load_scan, save_scan
    from medvae.io.atomic import all_or_none, claim_output
    from medvae.io.derived_series import fits_stored_type
    from medvae.io.formats import check_output
    from medvae.io.scan import is_nifti_path

    src = Path(input_path)
    out, mask_out, sidecar = output_paths(output_path, mask_path)
    if not is_nifti_path(mask_out) and is_nifti_path(src):
        raise MedvaeError("the mask of a NIfTI scan is written as NIfTI: give a path ending in .nii or "
                          ".nii.gz", mask_out)
    if len({p.resolve() for p in (out, mask_out, sidecar)}) != 3:
        raise MedvaeError("the output, the mask and the JSON sidecar must be different paths", mask_out)
    for inner, outer in ((mask_out, out), (sidecar, out), (out, mask_out), (sidecar, mask_out)):
        if outer.resolve() in inner.resolve().parents:  # a DICOM folder would then hold two series
            raise MedvaeError(f"an output cannot be written inside another output ({outer})", inner)
    for p in (out, mask_out, sidecar):
        here, there = p.resolve(), src.resolve()
        if here == there or there in here.parents or here in there.parents:  # same file, inside, or around it
            raise MedvaeError("output would overwrite the input scan", p)

    # the recipe first: a typo in its name should not cost a scan read
    recipe = _as_recipe(recipe)

    with contextlib.ExitStack() as claims:  # all three outputs claimed before any work
        claims.enter_context(claim_scan_output(out, overwrite=overwrite))
        claims.enter_context(claim_scan_output(mask_out, overwrite=overwrite))
        side = claims.enter_context(claim_output(sidecar, kind="file", overwrite=overwrite, owned=_own_record))
        scan = load_scan(src, series=series, volume=volume, modality=modality)
        from medvae.io.dicom import warn_if_modality_overridden, warn_if_not_hu

        warn_if_modality_overridden(scan.datasets, modality, src)
        warn_if_not_hu(scan.datasets, scan.modality, src,
                       hint="the noise is scaled to that window; pass --modality MR to scale it by the percentiles"
                       if recipe.adds_noise else "")
        _check_file_masks(recipe, scan)
        check_output(scan, out)
        # uneven slices: the mask can follow the series as a series of its own
        check_output(scan, mask_out, uneven_advice="give the mask a folder (--mask-output DIR) to write it "
                                                   "as a DICOM series beside the output")
        vc = corrupt_volume(scan.array, recipe, seed=int(seed), modality=scan.modality, source=src,
                            spacing=scan.spacing)
        claims.enter_context(all_or_none(out, mask_out, sidecar))  # never a scan without its mask
        # DICOM: the source's own stored type and rescale when the values fit (the voxels outside the
        # mask come back exactly), else a fitted rescale that holds noise beyond the source's range
        keep = scan.format == "dicom" and fits_stored_type(scan.datasets, float(vc.image.min()),
                                                           float(vc.image.max()))
        save_scan(scan, vc.image, out, overwrite=overwrite,
                  description=f"medvae corrupt {recipe.name} seed {seed}", rescale="keep" if keep else "fit")
        save_scan(scan, vc.mask.astype(np.float32), mask_out, overwrite=overwrite,
                  description=f"medvae corrupt mask {recipe.name} (1 = corrupted)", rescale="unit")
        record = {
            "medvae_version": __version__,
            "command": "corrupt",
            "input": str(src),
            "series": scan.series_uid,
            "volume": volume,
            "output": str(out),
            "mask": str(mask_out),
            "modality": scan.modality,
            "modality_guess": scan.modality_guess,
            # the recipe ran on (v - lo) / (hi - lo) of this window: replay a slice record on that
            "intensity_window": [float(vc.window[0]), float(vc.window[1])],
            "intensity_origin": vc.origin,
            "policy_window": [float(v) for v in vc.policy_window],
            "spacing_mm": [float(v) for v in scan.spacing],
            "pixel_size_mm": vc.pixel_size_mm,
            "ct_padding_kept": {"at_or_below_hu": CT_PADDING_HU, "voxels": vc.padding_voxels} if vc.padding_voxels else None,
            "recipe": {"name": recipe.name, "path": str(recipe.path), "description": recipe.description,
                       "config": recipe.config},
            "seed": int(seed),
            "mode": vc.mode,
            "slice_seeds": "numpy SeedSequence([seed, k]).generate_state(1)[0]" if vc.mode == "slices" else None,
            "mask_fraction": float(vc.mask.mean()),
            "records": vc.records,
        }
        with side.writing() as tmp:
            tmp.write_text(json.dumps(record, indent=1) + "\n")
        hold_after_commit()  # committed next: a later Ctrl-C keeps it all
    return ScanCorruption(out, mask_out, sidecar, recipe.name, int(seed), vc.mode, float(vc.mask.mean()),
                          scan.modality, scan.modality_guess)


def _own_record(path: Path, _marker: object = None) -> None:
    """The ``owned`` check of a corruption record: only a JSON that ``corrupt_scan`` wrote is replaced."""
    try:
        ours = json.loads(path.read_text()).get("command") == "corrupt"
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise MedvaeError("refusing to replace a file medvae did not write (not a medvae corruption "
                          "record); remove it yourself or choose another output", path)
