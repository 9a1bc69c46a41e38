"""Restore scan volumes slice by slice with a medvae model.

:func:`restore_volume` works on arrays (for scripts); :func:`restore_scan` reads a scan through
:mod:`medvae.io`, restores it and writes the result (and an uncertainty map) in the input's format.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medvae.errors import MedvaeError, require_flags, require_seed
from medvae.intensity import CT_PADDING_HU
from medvae.io.formats import as_mask, require_finite, require_real
from medvae.models.label import model_label
from medvae.runtime import hold_after_commit, inference_dtype, pick_device, tune_allocator
from medvae.slice_gaps import PADDING_HU, is_hole_mask

log = logging.getLogger(__name__)


#: most pixels per forward pass (2 slices of 512²): activations, not the volume, set the peak memory
MAX_BATCH_PIXELS = 2 * 512 * 512
#: test-time flip ensembles: the dims flipped for each copy beyond the slice itself (slices are (B, 1, X, Y))
FLIPS = {1: (), 2: ((-1,),), 4: ((-1,), (-2,), (-2, -1))}
#: mirrored copies averaged by default: +0.03 to +0.35 dB on the benchmark (run 7) for twice the compute
DEFAULT_ENSEMBLE = 2
#: CT padding outside the field of view (-2000 to -3024 HU; no training CT has any) reaches the network
#: moved up to this level (HU), with its noise: the step to the air beside it cost up to 4 dB there
#: (docs/benchmarks.md, quality runs 11 and 12); clamping it flat instead lowered the blind noise estimate
#: and cost 0.5-1 dB in the brain window. HU, not window units: a caller's own window must not move it
CT_INPUT_FLOOR_HU = -1500.0
# CT pixels whose 5x5 mean lies at or below medvae.intensity.CT_PADDING_HU (-2000 HU, the level
# ``medvae corrupt`` keeps) are that padding (ct_padding): returned as they came


def ct_padding(x: Any, padding: float, floor: float) -> Any:
    """Where a batch of slices ``x`` (torch, (B, 1, X, Y)) holds padding outside the field of view: below
    ``floor``, and either within 2 pixels of where the 5x5 mean lies at or below ``padding`` (the noise of
    air, averaged over 25 pixels, never gets there; the dilation reaches the region's border) or itself at
    or below ``padding`` (a padding line one pixel thick, where the circle meets the image's edge). "At or
    below": vendors pad with exactly -2000 HU as well as -2048 and -3024."""
    import torch.nn.functional as F

    core = F.avg_pool2d(x.float(), 5, stride=1, padding=2, count_include_pad=False) <= padding
    near = F.max_pool2d(core.float(), 5, stride=1, padding=2) > 0
    return (x < floor) & (near | (x <= padding))


def _ready(lm: Any, device: Any) -> Any:
    """A caller's :class:`~medvae.models.checkpoint.LoadedModel` ready for inference on ``device``:
    itself when every module is in eval mode and every weight on ``device`` already, else a copy that is
    (the caller's model is never switched to eval mode or moved: it may be in the middle of training)."""
    import copy
    import dataclasses
    import itertools

    import torch

    if device.type == "cuda" and device.index is None:  # where .to("cuda") puts tensors
        device = torch.device("cuda", torch.cuda.current_device())
    net = lm.model
    if not any(m.training for m in net.modules()) and all(
            t.device == device for t in itertools.chain(net.parameters(), net.buffers())):
        return lm
    with torch.no_grad():  # a TorchScript module's copy would otherwise hold non-leaf weights
        clone = copy.deepcopy(net)
    for name, value in vars(net).items():  # a TorchScript copy loses plain attributes (its config)
        vars(clone).setdefault(name, value)
    return dataclasses.replace(lm, model=clone.to(device).eval())


def std_dtype(window: tuple[float, float]) -> type:
    """The uncertainty map's storage type for a scan windowed to ``window`` (its units): float16 (2 bytes
    a voxel) where a window width of 1 to 10,000 keeps the map to 3 significant digits, else float32 (a
    map of a scan in 1e-5 units underflowed to 0, one of a 0..1e9 scan was clipped at 65504).

    >>> std_dtype((-1000.0, 1000.0)).__name__, std_dtype((0.0, 1e-5)).__name__, std_dtype((0.0, 1e9)).__name__
    ('float16', 'float32', 'float32')
    """
    width = float(window[1]) - float(window[0])
    return np.float16 if 1.0 <= width <= 10_000.0 else np.float32


def _resolve_model(model: Any, device: Any, tracking_uri: str | None = None):
    """The model ready to restore slices on ``device`` (one that cannot is refused here, before any work)."""
    from medvae.models.checkpoint import LoadedModel, require_slice_restorer
    from medvae.tracking import load_model  # local files, and runs:/ and models:/ URIs

    if isinstance(model, LoadedModel):
        return _ready(require_slice_restorer(model), device)
    if isinstance(model, str) and model == "default":
        from medvae.models.export import load_inference_model  # its TorchScript export: no MONAI import

        return load_inference_model(model, device=device)
    if not isinstance(model, (str, os.PathLike)):  # a bare network lacks the window and calibration it needs
        raise MedvaeError(f"model must be 'default', a checkpoint path, an MLflow model URI or a LoadedModel "
                          f"(medvae.load_model), not a {type(model).__name__}")
    return require_slice_restorer(load_model(model, device=device, tracking_uri=tracking_uri))


def flip_average(net: Any, x: Any, m: Any, mean: Any, ensemble: int) -> Any:
    """The posterior mean averaged over the flip ensemble ``FLIPS[ensemble]`` (float32); ``mean`` is the
    unmirrored copy's when the caller has it already (None: computed here)."""
    total = (net.posterior_mean(x, m) if mean is None else mean).float()
    if ensemble == 1:
        return total
    for dims in FLIPS[ensemble]:  # the mirrored copies' restorations, mirrored back
        total = total + net.posterior_mean(x.flip(dims), m.flip(dims)).flip(dims).float()
    return total / ensemble


def _check_options(*, samples: Any, batch_size: Any, ensemble: Any, window: Any) -> tuple[float, float] | None:
    """Refuse bad option values of :func:`restore_volume` with a one-line :class:`MedvaeError`, before any
    work; returns ``window`` as ``(lo, hi)`` (None: the model's own)."""
    from medvae.intensity import window_range

    for name, value, least in (("samples", samples, 0), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise MedvaeError(f"{name} must be a whole number >= {least}, not {value!r}")
    if isinstance(ensemble, bool) or not isinstance(ensemble, (int, np.integer)) or ensemble not in FLIPS:
        raise MedvaeError(f"ensemble must be one of {sorted(FLIPS)}, not {ensemble!r}")
    if window is None:
        return None
    try:  # a Window, a preset name, "CENTER,WIDTH" or (lo, hi): read as medvae.evaluate reads them
        lo, hi = window_range(window)
    except ValueError as exc:
        raise MedvaeError(str(exc)) from None
    if not np.isfinite(hi - lo):
        raise MedvaeError(f"bad window {window!r}: its width {hi} - {lo} overflows")
    problem = _float32_problem(lo, hi)
    if problem:
        raise MedvaeError(f"bad window {window!r}: {problem}")
    return lo, hi


def _float32_problem(lo: float, hi: float) -> str | None:
    """Why the window ``lo..hi`` cannot scale images in float32, their type (inf, or a width of 0, there)."""
    with np.errstate(over="ignore"):
        lo32, hi32 = np.float32(lo), np.float32(hi)
        width32 = hi32 - lo32
    if not np.isfinite(width32):
        return f"its width {hi} - {lo} overflows float32, the images' type"
    if not width32 > 0:
        return f"its width {hi - lo:g} is lost to rounding in float32, the images' type"
    return None


def _check_slice_geometry(n: int, positions: Any, step: Any) -> None:
    """Refuse slice positions and a step that would put missing slices nowhere (NaN) or at the wrong
    distance: one finite position per slice, strictly rising or falling; a finite step > 0."""
    if positions is not None:
        pos = np.asarray(positions)
        if pos.shape != (n,) or pos.dtype.kind not in "iuf":
            raise MedvaeError(f"slice_positions must be {n} numbers, one per slice, not an array of shape "
                              f"{pos.shape} ({pos.dtype})")
        d = np.diff(pos.astype(np.float64))
        if not np.isfinite(pos).all() or not ((d > 0).all() or (d < 0).all()):
            raise MedvaeError("slice_positions must be finite and strictly rising or falling (mm along the "
                              "slice normal)")
    if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float, np.number))
                             or not np.isfinite(step) or step <= 0):
        raise MedvaeError(f"slice_step must be a finite number of mm > 0, not {step!r}")


def restore_volume(volume: np.ndarray, *, model: Any = "default", modality: str | None = None,
                   mask: np.ndarray | None = None, samples: int = 0, batch_size: int = 8,
                   device: Any = None, progress: bool = False, seed: int = 0,
                   out: np.ndarray | None = None,
                   window: tuple[float, float] | None = None,
                   precision: str = "auto", holes: bool | None = None,
                   ensemble: int = DEFAULT_ENSEMBLE, blend: bool = True,
                   coarse_holes: bool = True, slice_positions: np.ndarray | None = None,
                   slice_step: float | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Restore a volume with the model's posterior mean, slice by slice along the last axis.

    Parameters
    ----------
    volume : (X, Y, Z) or (X, Y) array in the scan's units (HU for CT). Not modified.
    model : ``"default"``, a checkpoint path, ``runs:/ID/model``, ``models:/NAME/VERSION`` or a
        :class:`~medvae.models.checkpoint.LoadedModel`. A ``LoadedModel`` is left as it was: when it is
        in training mode or on another device, a copy in eval mode on ``device`` restores.
    modality : ``"CT"`` or ``"MR"``; picks the intensity scaling stored with the model. Guessed
        from the values when omitted, with the rule ``load_scan`` uses for NIfTI.
    mask : boolean array of ``volume``'s shape, True where pixels are to be restored (inpainting).
        Pixels outside it are returned bit-identical for float32 input (and integers up to 2**24);
        the output is float32, so float64 values come back rounded to float32. Without a mask every
        pixel is denoised.
    samples : number of posterior samples for the uncertainty map (0: none).
    batch_size : slices per forward pass (at most ``MAX_BATCH_PIXELS`` pixels); the working memory is
        bounded by the batch, not the volume.
    device : ``None``/``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``...
    progress : show progress on stderr (:func:`medvae.progress.progress`: a bar on a terminal, a
        plain line every few seconds otherwise).
    seed : seed of the posterior samples.
    precision : ``"auto"`` (bf16 autocast for denoising on CPUs with native bf16, else fp32; inpainting
        stays fp32, because TorchScript cannot keep the harmonic prefill out of autocast), ``"fp32"``
        or ``"bf16"`` (:func:`medvae.runtime.inference_dtype`). Known pixels stay exact either way.
    holes : whether this is inpainting (the std's calibration regime and the precision). Default:
        from ``mask`` (a mask that is not all True). A caller restoring a scan part by part passes
        the answer for the whole scan, since one part may lie wholly inside the mask.
    slice_positions : each slice's position along the normal (mm; a DICOM series,
        :func:`medvae.io.dicom.slice_positions`), so that missing slices are interpolated by position
        where the gaps are uneven. Default: evenly spaced slices.
    slice_step : the typical step of the slice positions (mm) that the missing slices' distances are
        measured in. Default: ``slice_positions``' own; a caller restoring part of a series passes the
        whole series' (:func:`medvae.slice_gaps.typical_step`).
    out : float32 array of ``volume``'s shape that receives the mean, batch by batch. It may be
        ``volume`` itself: the volume is then restored in place, with no other volume-sized
        array (each batch is read before it is overwritten). Default: a new array.
    window : (low, high), :class:`~medvae.evaluate.Window`, preset name or ``"CENTER,WIDTH"``, optional
        The intensity window, in the scan's units, mapped linearly to [0, 1] (no clipping) for the
        network. A plain pair is ``(low, high)``; a ``Window`` (center, width), a preset name
        (``"brain"``: 0..80 HU) or a ``"CENTER,WIDTH"`` string mean what they mean in
        :mod:`medvae.evaluate` (:func:`medvae.evaluate.window_range`). Low and high must be finite with
        low < high. Default: the model's policy for ``modality`` applied to ``volume`` (CT: the model's
        fixed window, -1000..1000 HU for the shipped one; MR: the volume's percentiles), which is what
        the model was trained on: another window shows it contrasts it never saw. A caller restoring a
        scan part by part passes the window of the whole scan, so every part is scaled alike.
    ensemble : {1, 2, 4}
        Test-time flip ensemble: the posterior mean is averaged over this many mirrored copies of
        each slice (2: the slice and its mirror along the slice's second array axis, Y: front to back on
        an axial scan stored (X, Y, Z), not left to right; 4: also along X, and along both). Default 2:
        +0.03 to +0.35 dB on the benchmark for twice the compute (docs/benchmarks.md, run 7). The
        uncertainty map comes from the unmirrored slice.
    blend : bool
        Average the network's restoration with a classical one (non-local means for noise, biharmonic
        inpainting for holes) by the weight the model's ``meta["blend"]`` holds for the regime and
        modality (:mod:`medvae.blend`; a model without it: the network alone). False: the network alone.
    coarse_holes : bool
        Restore holes larger than those the network saw in training (inscribed radius above the
        model's ``meta["hole_radius"]``, 20 px without one) on a copy of the slice shrunk by a power of
        two, where they are no larger, and use the upsampled result inside them (:mod:`medvae.hole_scale`). Default True: +1.7 dB inside 15 % boxes on 512²
        CT slices (docs/benchmarks.md, large-holes run 1); strokes and small holes are unchanged.
        False: every hole at full scale. In the coarse-filled pixels the uncertainty map mixes in the
        coarse pass's predictive std by the same weight.

    Notes
    -----
    The first call tunes this process's malloc (:func:`medvae.runtime.tune_allocator`, as the
    ``medvae`` CLI does): glibc then keeps freed buffers for reuse instead of handing every batch's
    tensors back to the OS (1.5x faster on 20 slices of the dev head CT, 1.7x on its 108 slices,
    on a 2-core CPU). The setting lasts for the process: its resident memory stays near its peak.
    ``MEDVAE_TUNE_MALLOC=0`` keeps glibc's defaults.

    A slice wholly inside the mask (a missing slice) has nothing of its own to restore from: it is
    interpolated along the slice axis between the nearest slices that have known pixels, after they are
    restored, and its uncertainty is their difference (:mod:`medvae.slice_gaps`). A mask covering every
    slice is global noise.

    CT padding outside the field of view (below -1500 HU, in a region whose 5x5 mean is at or below
    -2000 HU, whatever ``window`` is) is denoised as if it sat at -1500 HU, with its
    noise, and returned as it came with zero uncertainty: no training scan has it, and the step to the
    air beside it cost the air there up to 4 dB (:data:`CT_INPUT_FLOOR_HU`).

    Returns
    -------
    mean : float32 array of ``volume``'s shape, in the scan's units.
    std : per-pixel predictive standard deviation (the spread of the ``samples`` restorations and,
        for models with a scale head, the decoder's per-pixel Laplace scale), calibrated with the model's
        stored calibration for the regime (``meta["calibration"]``, noise or holes; see
        :mod:`medvae.models.calibration`) so that it estimates the spread of the error; float16 (to
        keep memory at 2.5 volumes) for a window 1 to 10,000 units wide, else float32 (:func:`std_dtype`),
        or None when ``samples == 0``.

    Examples
    --------
    >>> vol = np.random.default_rng(0).normal(0, 30, (64, 64, 3)).astype(np.float32) - 1000
    >>> mean, std = restore_volume(vol, modality="CT", samples=2)   # doctest: +SKIP
    >>> mean.shape, std.shape                                       # doctest: +SKIP
    ((64, 64, 3), (64, 64, 3))
    """
    import torch

    from medvae.intensity import normalize
    from medvae.slice_gaps import fill_missing_slices, missing_slices, slice_batches

    window = _check_options(samples=samples, batch_size=batch_size, ensemble=ensemble, window=window)
    require_flags(progress=progress, blend=blend, coarse_holes=coarse_holes,
                  **({} if holes is None else {"holes": holes}))  # holes: None is decided from the mask
    for what, value in (("volume", volume), ("mask", mask)):  # "got shape ()" for a file name
        if isinstance(value, (str, bytes, os.PathLike)):
            raise MedvaeError(f"restore_volume takes the {what} as an array, not a path ({str(value)[:80]!r}): "
                              "read a file with medvae.io.load_scan, or restore files with restore_scan")
    tune_allocator()  # as the CLI does: glibc's defaults made API calls ~1.7x slower than the CLI
    vol = np.asarray(volume)
    squeeze = vol.ndim == 2
    if squeeze:
        vol = vol[:, :, None]
    if vol.ndim != 3:
        raise MedvaeError(f"expected a 2-D or 3-D volume, got shape {vol.shape}")
    if min(vol.shape) < 1 or min(vol.shape[:2]) < 2:  # the blind noise estimate needs 2 pixels a side
        raise MedvaeError(f"slices of {vol.shape[0]}x{vol.shape[1]} pixels ({vol.shape[2]} of them) cannot be "
                          "restored: at least 2x2 pixels and one slice are needed")
    if modality is not None and str(modality).upper() not in ("CT", "MR"):
        raise MedvaeError(f"modality must be CT or MR, not {modality!r}: the model's intensity scaling "
                          "knows no other")
    require_real(vol, what="the input")
    _check_slice_geometry(vol.shape[2], slice_positions, slice_step)
    given, seed = seed, require_seed(seed)
    if not -2 ** 63 <= seed < 2 ** 64:  # torch.Generator.manual_seed's range (it raised a bare ValueError)
        raise MedvaeError(f"seed must be in -2**63..2**64-1, not {given!r:.40}")
    wide = vol.dtype.kind == "f" and vol.dtype.itemsize > 4  # float64: values float32 cannot hold
    for k0 in range(0, vol.shape[2], 16):  # a slab at a time: no volume-sized boolean array
        if not np.isfinite(vol[:, :, k0:k0 + 16]).all():
            require_finite(vol, what="the input")  # counts them, for the message
        if wide and np.abs(vol[:, :, k0:k0 + 16]).max() > np.finfo(np.float32).max:
            raise MedvaeError("the input holds values beyond float32's range (about ±3.4e38), the type medvae "
                              "restores in")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.ndim == 2 and squeeze:
            mask = mask[:, :, None]
        if mask.shape != vol.shape:
            raise MedvaeError(f"mask shape {mask.shape} does not match the image shape {vol.shape}")
        mask = as_mask(mask)

    dev = pick_device(device)
    lm = _resolve_model(model, dev)
    if modality is None:
        from medvae.io.nifti import guess_modality  # the rule load_scan uses for NIfTI

        # from the known voxels: a -32768 fill in the holes made a CT "MR" (and -1024 an MR "CT")
        partial = mask is not None and mask.any() and not mask.all()
        modality, _ = guess_modality(np.where(mask, np.float32(np.nan), vol) if partial else vol)
    modality = modality.upper()
    if holes is None:
        holes = is_hole_mask(mask, lambda a, b: vol[:, :, a:b], modality)
    if window is not None:
        lo, hi = window  # checked
    else:
        lo, hi = scan_window(lm.intensity, lambda a, b: vol[:, :, a:b], vol.shape, modality,
                             unknown=mask if holes else None)
        problem = _float32_problem(lo, hi)
        if problem:  # 1e9 + detail in float64: float32 keeps no detail (every voxel came back 1e9)
            raise MedvaeError(f"the image's window {lo:.10g} to {hi:.10g}: {problem}; subtract its offset first")

    # bound the working memory by pixels, not slices: 8 slices of 128² but 2 of 512²
    batch_size = max(1, min(batch_size, MAX_BATCH_PIXELS // (vol.shape[0] * vol.shape[1])))
    if out is None:
        mean = np.empty(vol.shape, dtype=np.float32)
    else:
        if not isinstance(out, np.ndarray):
            raise MedvaeError(f"out must be a float32 numpy array of shape {vol.shape}, not {type(out).__name__}")
        mean = out[:, :, None] if squeeze and out.ndim == 2 else out
        if mean.shape != vol.shape or mean.dtype != np.float32:
            raise MedvaeError(f"out must be float32 of shape {vol.shape}, not {out.dtype} {out.shape}")
    in_place = (mean.__array_interface__["data"][0] == vol.__array_interface__["data"][0]
                and mean.strides == vol.strides)
    if not in_place and np.may_share_memory(mean, vol):
        raise MedvaeError("out must be the volume itself or not overlap it")
    std = np.empty(vol.shape, dtype=std_dtype((lo, hi))) if samples else None
    saturated = False
    gen = torch.Generator(device=dev).manual_seed(seed)
    # missing slices are filled from their neighbours after the loop: the network never sees them (a CT
    # slice masked but for its padding too); the padding they keep is put back after the fill
    gaps = (missing_slices(mask, lambda a, b: vol[:, :, a:b], PADDING_HU if modality == "CT" else None)
            if holes and mask is not None else np.zeros(vol.shape[2], bool))
    kept_in_gaps = {int(k): vol[:, :, k][~mask[:, :, k]].copy() for k in np.flatnonzero(gaps)
                    if not mask[:, :, k].all()}  # read before an in-place restore writes the volume
    starts = slice_batches(gaps, batch_size)
    if progress:  # a tqdm bar on a terminal, a plain line every few seconds in scripts
        from medvae.progress import progress as show_progress

        starts = show_progress(starts, total=len(starts), desc="restoring", unit="batch")
    net = lm.model.eval()
    from medvae.blend import blend as blend_images
    from medvae.blend import blend_weight, classical_estimate
    from medvae.hole_scale import model_hole_radius, restore_large_holes
    from medvae.models.calibration import calibrate_slice
    from medvae.models.vae import predictive_stats

    # the classical estimate's share (0: the network alone), fitted on calibration volumes
    w_stored = blend_weight(lm.meta, holes=holes, modality=modality, source=lm.source)
    w_classical = w_stored if blend else 0.0
    radius = model_hole_radius(lm.meta, source=lm.source)  # the largest holes this model was trained on
    adtype = inference_dtype(precision, dev)

    def coarse(xs, ms):  # a shrunk batch restored as the full one: the std from the unmirrored copy
        mc, sc = predictive_stats(net, xs, ms, samples, gen) if samples else (None, None)
        return flip_average(net, xs, ms, mc, ensemble), sc

    # the padding's HU levels in the units of the window in use (a brain window's -0.5 is -40 HU: air)
    pad_level, floor_level = ((v - lo) / (hi - lo) for v in (CT_PADDING_HU, CT_INPUT_FLOOR_HU))
    if holes and precision == "auto":  # the exported model's harmonic prefill would run in bf16 too
        adtype = None
    with torch.inference_mode(), torch.autocast(dev.type, dtype=adtype or torch.float32, enabled=adtype is not None):
        for k0, k1 in starts:
            chunk = np.moveaxis(vol[:, :, k0:k1], 2, 0)[:, None]  # (B, 1, X, Y)
            x = normalize(chunk, (lo, hi))
            if not np.isfinite(x).all():  # a window so narrow that the scaled values overflow float32
                raise MedvaeError(f"the window ({lo:g}, {hi:g}) is too narrow for this volume: its values "
                                  "overflow once scaled to it")
            x = torch.from_numpy(x).to(dev)
            pad = None
            if modality == "CT":  # padding returned as it came; the network sees it nearer to air
                pad_t = ct_padding(x, pad_level, floor_level)
                pad = pad_t[:, 0].cpu().numpy() if bool(pad_t.any()) and not holes else None
                for j in range(x.shape[0]):
                    pj = pad_t[j]
                    if bool(pj.any()):  # its level moved up, its noise kept (the blind noise estimate reads it)
                        x[j][pj] = x[j][pj] - x[j][pj].median() + floor_level
            if mask is None or not holes:  # denoising: the network sees every pixel as noisy, as in training
                m = torch.ones_like(x)  # (a partial mask then only keeps the pixels outside it, below)
            else:
                m = torch.from_numpy(np.moveaxis(mask[:, :, k0:k1], 2, 0)[:, None].astype(np.float32)).to(dev)
            if samples:  # one encoder pass: posterior mean, and the predictive std (samples + decoder scale)
                mean_t, std_t = predictive_stats(net, x, m, samples, gen)
            else:
                mean_t = net.posterior_mean(x, m)
            mean_t = flip_average(net, x, m, mean_t, ensemble)
            if holes and coarse_holes and mask is not None:  # holes larger than any in training: coarser
                mean_t, std_t = restore_large_holes(coarse, x, m, mean_t.float(), np.moveaxis(mask[:, :, k0:k1], 2, 0),
                                                    std=std_t if samples else None, radius=radius)
            unit_mean = mean_t[:, 0].float().cpu().numpy()  # window units
            disagreement: list[np.ndarray | None] = [None] * unit_mean.shape[0]
            # the map's blend term was fitted with the disagreement: kept under --no-blend too (without it
            # the map came out 20-37 % narrower for the same error)
            if w_classical > 0 or (samples and w_stored > 0):
                x_units = x[:, 0].float().cpu().numpy()
                for j in range(unit_mean.shape[0]):
                    hole = None if mask is None or not holes else mask[:, :, k0 + j]
                    if hole is not None and (bool(hole.all()) or not bool(hole.any())):
                        continue  # nothing known to fill from, or nothing to fill
                    classical = classical_estimate(x_units[j], hole)
                    if samples:  # where the two part, the uncertainty map widens (its blend term)
                        disagreement[j] = np.abs(unit_mean[j] - classical)
                    if w_classical > 0:
                        unit_mean[j] = blend_images(unit_mean[j], classical, w_classical)
            restored = np.moveaxis(unit_mean, 0, 2) * (hi - lo) + lo
            if pad is not None:
                restored = np.where(np.moveaxis(pad, 0, 2), vol[:, :, k0:k1], restored)
            if samples:
                s = std_t[:, 0].float().cpu().numpy()  # window units
                for j in range(s.shape[0]):  # the checkpoint's calibration (none: the raw std)
                    s[j] = calibrate_slice(s[j], chunk[j, 0] / (hi - lo), lm.meta, holes=holes,
                                           modality=modality, restored=unit_mean[j],
                                           disagreement=disagreement[j]) * (hi - lo)
                if pad is not None:
                    s[pad] = 0  # returned unchanged
                if mask is not None:  # known pixels: zero, before the range is checked (their values go)
                    s[~np.moveaxis(mask[:, :, k0:k1], 2, 0)] = 0
                top = float(np.finfo(std.dtype).max)
                if not saturated and s.max() > top:  # float16's max: say so once, never silently
                    saturated = True
                    log.warning("the uncertainty exceeds %.6g (the %s map's largest value) and is clipped there; "
                                "values this large (%.3g) suggest a scan in unusual units", top, std.dtype,
                                float(s.max()))
                std[:, :, k0:k1] = np.moveaxis(np.minimum(s, top), 0, 2)
            # written last: `chunk` is a view of the input, which `mean` may be (in place)
            if mask is None:
                mean[:, :, k0:k1] = restored
            else:
                # known pixels bit-identical to the input, in its own units (in place: left as they are)
                hole = mask[:, :, k0:k1]
                if not in_place:
                    np.copyto(mean[:, :, k0:k1], vol[:, :, k0:k1], where=~hole, casting="unsafe")
                np.copyto(mean[:, :, k0:k1], restored, where=hole)
    if gaps.any():  # slices with no known pixel: from their neighbours, not from nothing
        fill_missing_slices(mean, gaps, std, positions=slice_positions, step=slice_step)
        for k, values in kept_in_gaps.items():  # known padding: as it came, with no uncertainty
            known = ~mask[:, :, k]
            mean[:, :, k][known] = values
            if std is not None:
                std[:, :, k][known] = 0
    if squeeze:
        mean = mean[:, :, 0]
        std = None if std is None else std[:, :, 0]
    return mean, std


@dataclass
class RestoreSummary:
    slices: int
    seconds: float
    output: Path
    uncertainty: Path | None
    modality: str = ""
    #: why the modality was guessed (NIfTI has none), or None when it came from the file or caller
    modality_guess: str | None = None


def _warn_imaged_gaps(mask: np.ndarray, slabs: Any, modality: str, mask_path: Any,
                      gaps: np.ndarray | None = None) -> None:
    """Say so when slices wholly inside the mask hold an image: they are restored as missing slices (from
    their neighbours), which discards the noise slices of ``medvae corrupt``'s per-slice mixes (a low-dose
    slice of the ``train`` mix came back at 27.5 dB from 30.5, 39 dB when denoised). ``gaps``: the
    missing slices when the caller has them (a streamed series: no second pass over its files)."""
    from medvae.slice_gaps import imaged, missing_slices

    if gaps is None:
        if not is_hole_mask(mask, slabs, str(modality)):
            return
        gaps = missing_slices(mask, slabs, PADDING_HU if str(modality).upper() == "CT" else None)
    kept = imaged(gaps, slabs, mask)
    if kept:
        shown = ", ".join(map(str, kept[:8])) + (f" and {len(kept) - 8} more" if len(kept) > 8 else "")
        log.warning("%s: slice(s) %s lie wholly inside the mask but hold an image: restored as missing slices, "
                    "from their neighbours, without their own values; to denoise them, restore them without "
                    "--mask (a per-slice mix of noise and holes, such as the train or mixed recipes, needs "
                    "both)", mask_path, shown)


@contextlib.contextmanager
def _naming(path: Path):
    """An OSError of a write that names no file (a full disk), or only medvae's staging file, names
    ``path``, the output being written."""
    from medvae.io.atomic import is_staging_path

    try:
        yield
    except OSError as exc:
        if exc.filename is None or is_staging_path(exc.filename):
            if not exc.strerror:  # pydicom's re-raised message: its reason taken out of the text
                from medvae.errors import os_reason

                raise OSError(exc.errno, os_reason(exc), str(path)) from None
            exc.filename = str(path)
        raise


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def restore_scan(input_path: str | os.PathLike, output_path: str | os.PathLike, *, model: Any = "default",
                 mask_path: str | os.PathLike | None = None, samples: int = 0,
                 uncertainty_path: str | os.PathLike | None = None, batch_size: int = 8,
                 device: Any = None, series: str | None = None, volume: int | None = None,
                 modality: str | None = None, overwrite: bool = False, progress: bool = False,
                 tracking_uri: str | None = None, ensemble: int = DEFAULT_ENSEMBLE,
                 blend: bool = True) -> RestoreSummary:
    """Read a scan, restore it, write the result in the input's format (and the uncertainty map).

    The outputs are claimed first (a second process writing the same output is refused at
    once), then every check that can fail runs (input headers, mask geometry, model, output
    geometry) before any computing; each output is written atomically and replaces only an earlier
    medvae output (with ``overwrite``), so a failure never leaves a partial series or a lost file.

    A series of single-frame DICOM files written as DICOM is streamed: read a batch of files,
    restore it, write those files into the output's staging folder, so memory does not grow with
    the series (:func:`_restore_series`). Anything else (NIfTI, an enhanced multi-frame file, DICOM
    written as NIfTI) is read whole and restored in place in the loaded array. Scans are read with
    pydicom or nibabel directly (``load_scan(reader="native")``): restoring never imports MONAI.
    Like :func:`restore_volume`, it tunes this process's malloc on first use (freed buffers are
    kept for reuse; :func:`medvae.runtime.tune_allocator`).

    Parameters
    ----------
    volume : int, optional
        The volume of a 4-D NIfTI file to restore, from 0 (default 0); the output is that 3-D volume.
    modality : {"CT", "MR"}, optional
        Overrides the scan's modality (NIfTI has none: it is guessed from the values, and the
        guess and its reason are returned in the summary).
    ensemble : {1, 2, 4}
        Test-time flip ensemble of :func:`restore_volume` (default 2).
    blend : bool
        Blend with the classical restoration by the model's weights (:func:`restore_volume`; default True).

    Examples
    --------
    >>> s = restore_scan("ct.nii.gz", "ct_restored.nii.gz", modality="CT")   # doctest: +SKIP
    >>> s.slices, s.modality, s.output                                        # doctest: +SKIP
    (108, 'CT', PosixPath('ct_restored.nii.gz'))
    """
    import contextlib

    from medvae.io import claim_scan_output, load_scan, save_scan
    from medvae.io.atomic import all_or_none
    from medvae.io.dicom import warn_if_modality_overridden, warn_if_not_hu
    from medvae.io.formats import MODALITIES, check_output

    t0 = time.perf_counter()
    tune_allocator()  # before reading and loading the model, as the CLI does
    src, dst = Path(input_path), Path(output_path)
    unc = Path(uncertainty_path) if uncertainty_path else None
    if samples and unc is None:
        unc = _default_uncertainty_path(dst)
    if unc is not None and not samples:
        samples = 8
    for out in filter(None, (dst, unc)):
        for what, given in (("the input scan", src), ("the mask (an input)", mask_path)):
            inp = Path(given) if given else None
            if inp is not None and (_same_path(out, inp) or (inp.is_dir() and inp.resolve() in out.resolve().parents)):
                raise MedvaeError(f"output would overwrite {what}", out)
    if unc is not None and _same_path(unc, dst):
        raise MedvaeError("the uncertainty map and the restored scan need different paths", unc)
    if unc is not None and (dst.resolve() in unc.resolve().parents or unc.resolve() in dst.resolve().parents):
        # a DICOM output folder would then hold two series, which medvae refuses to read back
        raise MedvaeError(f"the uncertainty map cannot be written inside the restored scan's folder, nor around "
                          f"it ({dst})", unc)
    if modality is not None and str(modality).upper() not in MODALITIES:
        raise MedvaeError(f"modality must be one of {', '.join(MODALITIES)}, not {modality!r}", src)
    # before any work: restore_volume says it too, per batch, after the scan is read and the model loaded
    _check_options(samples=samples, batch_size=batch_size, ensemble=ensemble, window=None)
    require_flags(overwrite=overwrite, progress=progress, blend=blend)

    with contextlib.ExitStack() as claims:
        claimed = [claims.enter_context(claim_scan_output(out, overwrite=overwrite))
                   for out in filter(None, (dst, unc))]
        opened = None if volume else _open_streamable(src, dst, unc, series)  # headers only
        scan = None if opened is not None else load_scan(src, series=series, volume=volume,
                                                         modality=modality, reader="native")
        source = opened if opened is not None else scan
        for out in filter(None, (dst, unc)):
            check_output(source, out)
        headers = opened.headers if opened is not None else scan.datasets
        warn_if_modality_overridden(headers, modality, src)
        warn_if_not_hu(headers, modality or source.modality, src,
                       hint="pass --modality MR to window them by their percentiles")
        shape = opened.shape if opened is not None else scan.array.shape
        affine = opened.affine if opened is not None else scan.affine_mm  # a DICOM series is in mm
        mask = None if mask_path is None else _read_mask(mask_path, shape, affine, src=src, volume=volume)
        if scan is not None and modality is None and scan.modality_guess and mask is not None:
            _guess_from_known_voxels(scan, mask)
        dev = pick_device(device)
        lm = _resolve_model(model, dev, tracking_uri)
        if mask is not None and opened is None:  # a streamed series is told so where its gaps are found
            _warn_imaged_gaps(mask, lambda a, b: scan.array[:, :, a:b], modality or scan.modality, mask_path)
        label = model_label(lm.source)  # for DerivationDescription: never a path (it can name a patient)
        if opened is not None:
            mod = str(modality or opened.modality).upper()
            with all_or_none(*filter(None, (dst, unc))), _naming(dst):  # both series renamed in, or neither
                wrote_std = _restore_series(opened, claimed[0], claimed[1] if unc is not None else None,
                                            model=lm, modality=mod, mask=mask, samples=samples,
                                            batch_size=batch_size, device=dev, progress=progress,
                                            ensemble=ensemble, blend=blend, label=label, mask_path=mask_path)
                hold_after_commit()  # committed next: a later Ctrl-C keeps it all
            if overwrite and not _is_default_map(unc, dst):
                _drop_replaced_map(dst)
            return RestoreSummary(slices=shape[2], seconds=time.perf_counter() - t0, output=dst,
                                  uncertainty=unc if wrote_std else None, modality=mod)
        # restored in place in the loaded array: no second volume-sized array (issue 12)
        positions = None
        if scan.format == "dicom" and mask is not None:
            from medvae.io.dicom import slice_positions

            positions = slice_positions(scan.datasets)
        try:
            mean, std = restore_volume(scan.array, model=lm, modality=scan.modality, mask=mask,
                                       samples=samples, batch_size=batch_size, device=dev, progress=progress,
                                       out=scan.array, ensemble=ensemble, blend=blend, slice_positions=positions)
        except MedvaeError as exc:  # the array's problem (slices of 64x1 pixels...) is the input file's
            if exc.path is None:
                raise MedvaeError(exc.message, src) from None
            raise
        del mask
        with all_or_none(*filter(None, (dst, unc))):  # never a restoration without its map
            with _naming(dst):
                save_scan(scan, mean, dst, overwrite=overwrite, description="medvae restored", model=label)
            del mean
            if std is not None and unc is not None:
                with _naming(unc):  # a full disk while the map was written named the restoration
                    save_scan(scan, std.astype(np.float32), unc, overwrite=overwrite,
                              description=UNCERTAINTY_DESCRIPTION, rescale="fit", model=label)
            hold_after_commit()  # committed next: a later Ctrl-C keeps it all
        if overwrite and not _is_default_map(unc, dst):
            _drop_replaced_map(dst)
    return RestoreSummary(slices=scan.array.shape[2], seconds=time.perf_counter() - t0, output=dst,
                          uncertainty=unc if std is not None else None, modality=scan.modality,
                          modality_guess=scan.modality_guess)


UNCERTAINTY_DESCRIPTION = "medvae uncertainty (std)"


def _is_default_map(unc: Path | None, dst: Path) -> bool:
    """Whether ``unc`` is the map path beside ``dst`` (written over by this run), not none or another."""
    return unc is not None and os.path.realpath(unc) == os.path.realpath(_default_uncertainty_path(dst))


def _drop_replaced_map(dst: Path) -> None:
    """Remove the uncertainty map medvae wrote beside ``dst`` for the restoration an ``--overwrite``
    has just replaced without a map there (no ``--samples``, or ``--uncertainty`` elsewhere): left
    there, it passed for the new restoration's map."""
    import shutil

    from medvae.io.atomic import claim_output, read_marker

    old = _default_uncertainty_path(dst)
    if old.is_dir():
        import pydicom

        first = next(iter(sorted(old.glob("IM*.dcm"))), None)
        text = "" if first is None or read_marker(old) is None else str(pydicom.dcmread(
            first, stop_before_pixels=True, specific_tags=["SeriesDescription"]).get("SeriesDescription", ""))
    elif old.is_file():
        from medvae.io.nifti import nifti_description

        text = nifti_description(old) or ""
    else:
        return
    if UNCERTAINTY_DESCRIPTION not in text:  # another file of that name is not ours to remove
        return
    if old.is_symlink():  # the link goes, its target is left as it is (claim_output refuses a link)
        target = old.resolve()
        old.unlink()
        log.warning("%s: removed this link to the uncertainty map of the restoration this run replaced (%s is "
                    "kept; the link would pass for this one's map)", old, target)
        return
    with claim_output(old, kind="dir" if old.is_dir() else "file", overwrite=True):
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    log.warning("%s: removed the uncertainty map of the restoration this run replaced (it would pass for "
                "this one's; --samples N writes this one's there)", old)
#: slices read, restored and written at a time when a DICOM series is streamed (a whole number of
#: forward batches): about 8 slices of 512², 32 of 256²; the memory of a batch, not of the series
STREAM_PIXELS = 8 * 512 * 512


def _open_streamable(src: Path, dst: Path, unc: Path | None, series: str | None):
    """The series opened (headers only) when it can be streamed: single-frame DICOM files written
    as DICOM; else None (read whole)."""
    from medvae.io.scan import is_nifti_path

    if is_nifti_path(src) or any(is_nifti_path(p) for p in filter(None, (dst, unc))):
        return None
    from medvae.io.dicom import frame_count, is_dicom_file, open_series

    if src.is_file() and not is_dicom_file(src):
        return None  # load_scan names the problem
    if src.is_file() and frame_count(src) > 1:  # read whole anyway: opening it first said each header warning twice
        return None
    opened = open_series(src, series=series)
    return opened if opened.single_frame else None


def _guess_from_known_voxels(scan, mask: np.ndarray) -> None:
    """Guess a NIfTI scan's modality again from the voxels ``mask`` leaves known, in place: what fills the
    holes is not the scan (a -32768 fill made a CT crop "MR", a -1024 one an MR crop "CT"). The hole voxels
    are set aside while NaN stands in for them, so no second volume is held."""
    from medvae.io.nifti import guess_modality

    if not mask.any() or mask.all():
        return
    kept = scan.array[mask]
    try:
        scan.array[mask] = np.nan
        guessed, why = guess_modality(scan.array)
    finally:
        scan.array[mask] = kept
    # the reason too when the guess stands: it quoted the fill ("range -32768..1735 is not a HU range")
    scan.modality, scan.modality_guess = guessed, f"{why}, in the voxels the mask leaves known"


def _read_mask(mask_path, shape: tuple[int, ...], affine: np.ndarray, *, src, volume: int | None) -> np.ndarray:
    """The mask scan as booleans (nonzero = restore), refused unless it has the scan's geometry
    (``affine``: the scan's, in mm).

    A 4-D NIfTI mask is the mask of each volume of a 4-D scan with as many: the restored volume's
    (``volume``, default 0) is taken; any other 4-D mask is refused (its volume 0 was used, whatever
    volume was restored)."""
    from medvae.io import load_scan
    from medvae.io.scan import is_nifti_path

    mask_volume = None
    if is_nifti_path(mask_path) and Path(mask_path).is_file():
        from medvae.io.nifti import n_volumes

        n = n_volumes(mask_path)
        if n > 1:
            scan_n = n_volumes(src) if is_nifti_path(src) and Path(src).is_file() else 1
            if scan_n != n:
                raise MedvaeError(f"the mask is a 4-D NIfTI with {n} volumes but the scan has {scan_n}: give a "
                                  "3-D mask, or one volume per volume of the scan", mask_path)
            mask_volume = volume or 0
    if Path(mask_path).is_dir():  # "choose one with --series" chose among the input's series, not the mask's
        from medvae.io.dicom import list_series

        found = list_series(mask_path)
        if len(found) > 1:
            raise MedvaeError(f"the mask folder holds {len(found)} series; give a folder holding the mask's "
                              "series alone", mask_path)
    mscan = load_scan(mask_path, reader="native", volume=mask_volume, what="the mask")
    if mscan.array.shape != tuple(shape):
        raise MedvaeError(f"mask shape {mscan.array.shape} does not match the scan shape "
                          f"{tuple(shape)}", mask_path)
    if not np.allclose(mscan.affine_mm, affine, rtol=0, atol=1e-3):  # in mm, as evaluate compares them
        raise MedvaeError("mask geometry (affine) differs from the scan's", mask_path)
    return as_mask(mscan.array, mask_path)


def scan_window(intensity, read, shape: tuple[int, int, int], modality: str, *,
                unknown: np.ndarray | None = None, step: int = 16) -> tuple[float, float]:
    """The window a scan to restore is scaled by: ``intensity.window_for(noisy=True)`` of the ``(X, Y, Z)``
    volume that ``read(k0, k1)`` gives slab by slab (CT: the fixed HU window, nothing read).

    The voxels of ``unknown`` (a hole mask) are left out: what fills them is not the scan, and zeros
    from ``medvae corrupt`` or a -32768 sentinel there pulled an MR window's low end down with them
    (0.45 dB inside the holes of the sdcflows EPI, 60 % more error with the sentinel). Whole-volume and
    series restores read the same voxels (:func:`_window_sample`), so they get the same window.
    """
    from medvae.intensity import smoothing_slices

    if modality == "CT":
        return intensity.window_for(np.empty(0, np.float32), modality)
    if unknown is not None and unknown.any() and not unknown.all():
        known_read = read
        read = lambda a, b: np.where(unknown[:, :, a:b], np.float32(np.nan), known_read(a, b))  # noqa: E731
    whole_read = read
    read = lambda a, b: _without_constant_slices(whole_read(a, b))  # noqa: E731
    sample = _window_sample(read, shape, step)
    if not np.isfinite(sample).any():  # every slice constant: the window of what there is
        read = whole_read
        sample = _window_sample(read, shape, step)
    # the slices a noisy scan's low end comes from, as window_for picks them from a whole volume
    smooth = np.stack([read(k, k + 1)[:, :, 0] for k in smoothing_slices(shape)], 2)
    lo, hi = intensity.window_for(sample, modality, noisy=True, slices=smooth)
    _warn_if_padding_holds_the_window(sample, lo, hi)
    return lo, hi


def _without_constant_slices(slab: np.ndarray) -> np.ndarray:
    """``slab`` (``(X, Y, k)``) with the slices whose known voxels all hold one value set to NaN: a blank
    (zero-filled or padding) slice holds no anatomy, and its value took an MR window's low end (a zero
    slice in the sdcflows EPI, whose background lies 8 % up its window, cost the other slices 8 dB)."""
    flat = slab.reshape(-1, slab.shape[2])
    lo, hi = np.nanmin(flat, axis=0, initial=np.inf, where=~np.isnan(flat)), np.nanmax(
        flat, axis=0, initial=-np.inf, where=~np.isnan(flat))
    blank = lo == hi
    if not blank.any():
        return slab
    out = slab.astype(np.float32, copy=True)
    out[:, :, blank] = np.nan
    return out


def _warn_if_padding_holds_the_window(sample: np.ndarray, lo: float, hi: float) -> None:
    """Say so when the low end is a value many voxels hold, further below the rest than the rest spans
    (a -32768 padding under a 0..700 MR): the anatomy is squeezed into a sliver of the window."""
    finite = sample[np.isfinite(sample)]
    if not finite.size:
        return
    fill = float(finite.min())
    share = np.count_nonzero(finite == fill) / finite.size
    above = finite[finite > fill]
    if share < 0.01 or not above.size or lo - fill > 0.05 * (hi - fill):  # the low end is not at that value
        return
    rest = float(above.min())
    if rest - fill > hi - rest:
        log.warning("the MR window runs from %g, which %.0f %% of the voxels hold, far below the rest (%g to %g): "
                    "a padding value? The anatomy gets %.0f %% of the window and is restored coarsely; set "
                    "those voxels to the background before restoring", fill, 100 * share, rest, hi,
                    100 * (hi - rest) / (hi - lo))


def _window_sample(read, shape: tuple[int, int, int], step: int) -> np.ndarray:
    """The voxels ``IntensityPolicy.window_for`` reads of an ``(X, Y, Z)`` volume, gathered slab by
    slab from ``read(k0, k1)`` (an ``(X, Y, k1 - k0)`` array), never holding the volume.

    ``window_for`` takes every :func:`~medvae.intensity.window_stride`-th voxel of the C-ordered volume
    (flat index ``(x * Y + y) * Z + z``): the same multiset is gathered here, so its percentiles, and
    the window, are the same.
    """
    from medvae.intensity import window_stride

    nx, ny, nz = shape
    stride = window_stride(shape)
    base = np.arange(nx * ny, dtype=np.int64) * nz  # flat index of (x, y, 0)
    parts = []
    for k0 in range(0, nz, step):
        k1 = min(k0 + step, nz)
        slab = read(k0, k1).reshape(nx * ny, k1 - k0)
        if stride == 1:
            parts.append(slab.ravel().copy())
            continue
        first = (-(base + k0)) % stride  # per (x, y): offset of its first sampled z at or after k0
        for j in range(0, k1 - k0, stride):
            z = first + j
            rows = np.flatnonzero(z < k1 - k0)
            parts.append(slab[rows, z[rows]])
    return np.concatenate(parts) if parts else np.empty(0, np.float32)


class _Spill:
    """Slices parked in an anonymous temporary file, with their running minimum and maximum.

    For a series whose stored values need the range of the whole series (the uncertainty map's
    fitted rescale, a source with a Modality LUT) before its first file can be written. The file is
    unlinked at once, so the system removes it even when the process is killed; the disk holds what
    the memory does not (2 bytes per voxel for a float16 std).
    """

    def __init__(self, shape_xy: tuple[int, int], dtype) -> None:
        import tempfile

        self.file = tempfile.TemporaryFile(prefix="medvae-spill-")
        self.shape_xy, self.dtype = shape_xy, np.dtype(dtype)
        self.low, self.high = np.inf, -np.inf

    def add(self, slab: np.ndarray) -> None:
        slab = np.asarray(slab)
        as32 = slab.astype(np.float32, copy=False)  # the values the writer gets: float32
        self.low, self.high = min(self.low, float(as32.min())), max(self.high, float(as32.max()))
        self.file.write(np.ascontiguousarray(np.moveaxis(slab.astype(self.dtype, copy=False), 2, 0)).tobytes())

    def read(self, k0: int, k1: int) -> np.ndarray:
        n = self.shape_xy[0] * self.shape_xy[1]
        self.file.seek(k0 * n * self.dtype.itemsize)
        data = np.fromfile(self.file, dtype=self.dtype, count=(k1 - k0) * n)
        return np.moveaxis(data.reshape((k1 - k0,) + self.shape_xy), 0, 2).astype(np.float32)


def _restore_series(opened, claim, unc_claim, *, model, modality: str, mask: np.ndarray | None,
                    samples: int, batch_size: int, device: Any, progress: bool, seed: int = 0,
                    ensemble: int = DEFAULT_ENSEMBLE, blend: bool = True, label: str | None = None,
                    mask_path: Any = None) -> bool:
    """Restore a single-frame DICOM series a batch of files at a time, writing as it goes.

    Each batch is read (:meth:`~medvae.io.dicom.DicomSeries.read`), restored in place with
    :func:`restore_volume` and written file by file (:class:`~medvae.io.derived_series.DerivedSeriesWriter`)
    into the staging folder of ``claim``; the series appears only when complete. The batches are
    whole numbers of ``restore_volume``'s forward batches and the window is the whole series'
    (for MR, a first pass gathers the voxels ``window_for`` would read), so the restored files are
    bit for bit those of restoring the whole volume at once. A batch with missing slices reads and
    restores the slices they are filled from as well (:func:`_slab`), so its filled slices, and
    their uncertainty, are the whole volume's too.

    The uncertainty map's rescale is fitted to the range of the whole map: its slices are parked in
    a temporary file (:class:`_Spill`) and written after the last batch. Its posterior samples are
    drawn per batch with seed ``seed + first slice``, so the map is reproducible but its values are
    other draws than a whole-volume call's. ``label``: the model's label for the files'
    DerivationDescription (:func:`medvae.models.label.model_label`); ``mask_path``: the mask's file, named
    in the warning about wholly masked slices that hold an image. Returns whether the map was written.
    """
    import contextlib

    from medvae.io.derived_series import DerivedSeriesWriter, arm_series, needs_value_range
    from medvae.io.dicom import slice_positions
    from medvae.slice_gaps import missing_slices, slice_batches, typical_step

    nx, ny, nz = opened.shape
    forward = max(1, min(batch_size, MAX_BATCH_PIXELS // (nx * ny)))  # restore_volume's batch
    step = forward * max(1, STREAM_PIXELS // (nx * ny) // forward)
    read = lambda a, b: opened.read(a, b)[0]  # noqa: E731
    holes = is_hole_mask(mask, read, modality)  # the whole scan's regime, for every batch
    gaps = missing_slices(mask, read, PADDING_HU if modality == "CT" else None) if holes else np.zeros(nz, bool)
    if gaps.any():
        _warn_imaged_gaps(mask, read, modality, mask_path, gaps=gaps)
    batches = slice_batches(gaps, forward)  # the whole volume's forward batches
    positions = slice_positions(opened.headers) if gaps.any() else None  # uneven gaps: by position
    unit = typical_step(positions) if positions is not None else None  # the whole series' step, per slab
    window = scan_window(model.intensity, read, opened.shape, modality, unknown=mask if holes else None, step=step)
    starts = range(0, nz, step)
    if progress:
        from medvae.progress import progress as show_progress

        starts = show_progress(starts, total=len(starts), desc="restoring", unit="batch")
    spill_mean = _Spill((nx, ny), np.float32) if needs_value_range(opened.headers, "keep") else None
    opened.headers.clear()  # checked; each batch reads its files again: ~13 KB a file not held meanwhile
    spill_std = _Spill((nx, ny), std_dtype(window)) if samples and unc_claim is not None else None
    kept: list = []  # datasets (no pixels) for the files written after the last batch
    with contextlib.ExitStack() as staging:
        # the map's staging entered first, so it is renamed in last: a kill between the two renames leaves a
        # restoration without its map, which a rerun redoes, never a map without its restoration
        tmp_unc = (staging.enter_context(unc_claim.writing(finalize=arm_series))
                   if spill_std is not None else None)
        tmp = staging.enter_context(claim.writing(finalize=arm_series))
        writer = DerivedSeriesWriter(tmp, description="medvae restored", model=label)
        for k0 in starts:
            k1 = min(k0 + step, nz)
            a, b = _slab(k0, k1, gaps, batches, uncertainty=spill_std is not None)
            slab, datasets = opened.read(a, b)
            mean, std = restore_volume(slab, model=model, modality=modality,
                                       mask=None if mask is None else mask[:, :, a:b], samples=samples,
                                       batch_size=batch_size, device=device, seed=seed + k0,
                                       window=window, holes=holes, out=slab, ensemble=ensemble, blend=blend,
                                       slice_positions=None if positions is None else positions[a:b],
                                       slice_step=unit)
            if (a, b) != (k0, k1):  # only this batch's own slices are written
                mean, datasets = mean[:, :, k0 - a:k1 - a], datasets[k0 - a:k1 - a]
                std = None if std is None else std[:, :, k0 - a:k1 - a]
            require_finite(mean, claim.out, what="the array to write")
            if spill_mean is not None:
                spill_mean.add(mean)
            else:
                for j, ds in enumerate(datasets):
                    writer.write(ds, mean[:, :, j:j + 1], source=opened.files[k0 + j])
            if spill_std is not None:
                require_finite(std, unc_claim.out, what="the array to write")
                spill_std.add(std)
            if spill_mean is not None or spill_std is not None:
                kept.extend(datasets)
            del slab, mean, std, datasets
        writer.finish()
        for spill, folder, description, rescale in (
                (spill_mean, tmp, "medvae restored", "keep"),
                (spill_std, tmp_unc, UNCERTAINTY_DESCRIPTION, "fit")):
            if spill is None:
                continue
            w = DerivedSeriesWriter(folder, description=description, rescale=rescale,
                                    value_range=(spill.low, spill.high), model=label)
            for k0 in range(0, nz, step):
                part = spill.read(k0, min(k0 + step, nz))
                for j in range(part.shape[2]):
                    w.write(kept[k0 + j], part[:, :, j:j + 1], source=opened.files[k0 + j])
            w.finish()
            spill.file.close()
    return spill_std is not None


def _slab(k0: int, k1: int, gaps: np.ndarray, batches: list[tuple[int, int]], *,
          uncertainty: bool) -> tuple[int, int]:
    """The slices ``[a, b)`` a streamed batch restores so that its slices ``k0:k1`` come out as the whole
    volume's.

    With missing slices (``gaps``, the whole series'): the slices they are filled from, and with
    ``uncertainty`` the known triples their std is measured on (:func:`medvae.slice_gaps.fill_span`;
    a gap at the first or last slices, filled from the batch's own slices alone, got another std), then
    widened to whole forward ``batches`` of the whole volume, so each slice is restored in the same
    batch as there. Without missing slices, ``(k0, k1)``: the batches fall on the same slices.
    """
    from medvae.slice_gaps import fill_span

    if not gaps.any():
        return k0, k1
    a, b = fill_span(gaps, k0, k1, uncertainty=uncertainty)
    for start, stop in batches:
        if start < a < stop:
            a = start
        if start < b < stop:
            b = stop
    return a, b


def _default_uncertainty_path(dst: Path) -> Path:
    from medvae.io.scan import split_nifti_suffix

    stem, ext = split_nifti_suffix(dst.name)  # any case: OUT.NII.GZ's map is OUT_uncertainty.NII.GZ
    return dst.with_name(stem + "_uncertainty" + ext)
