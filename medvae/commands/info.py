"""``medvae info PATH``: describe a scan (format, series, shape, spacing, orientation, values), or a
medvae model file (``.pt``, or ``default``): its architecture, intensity policy, training and the
measured calibration of its uncertainty map, read with ``weights_only=True``.

A DICOM object that medvae does not restore (RT Dose, SEG, ultrasound, a zero PixelSpacing, ...)
is still described, with a ``restorable  no: <reason>`` line, and invalid geometry is named instead
of being printed as ``0 x 0 x 1 mm`` / ``??S``. One with no grayscale image to read (a Structured
Report, an RT Structure Set, a colour image) is described from its headers: SOP class, modality,
series and, for an image, its shape and photometric interpretation.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from medvae.io.dicom import DicomObjects, NotRestorableError

HELP = ("show a scan's format, series, shape, spacing, orientation, modality and value range, or a model "
        "file's architecture, training and calibration")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a NIfTI file (.nii, .nii.gz), a DICOM file or a DICOM folder; or a medvae "
                                     "model: a checkpoint (.pt) or default (the shipped model)")
    parser.add_argument("--series", metavar="UID",
                        help="SeriesInstanceUID to show when the folder holds several series")
    parser.add_argument("--volume", metavar="N", type=int,
                        help="volume of a 4-D NIfTI file, from 0 (default: 0)")


def _geometry_text(scan, problems) -> tuple[str, str] | None:
    """(spacing, orientation) texts when the geometry is invalid; None when it is valid."""
    import numpy as np

    for problem in problems:
        if problem.kind == "geometry":
            return f"invalid: {problem.message}", "undefined (invalid geometry)"
    spacing = scan.spacing
    if not all(np.isfinite(s) and s > 0 for s in spacing) or "?" in scan.orientation:
        shown = " x ".join(f"{s:.4g}" for s in spacing)
        return (f"invalid: the affine has a zero or undefined axis (voxel size {shown} mm)",
                "undefined (invalid geometry)")
    return None


def _dicom_rows(path, n_files: int, series_uid: str | None, description: str | None) -> list[tuple[str, str]]:
    """The path, format and series lines of a DICOM series."""
    desc = f" '{description}'" if description else ""
    return [("path", str(path)),
            ("format", f"DICOM ({n_files} file{'s' if n_files != 1 else ''})"),
            ("series", f"{series_uid or '(no SeriesInstanceUID)'}{desc}")]


def _restorable_row(problems: Sequence[NotRestorableError]) -> tuple[str, str]:
    """``restorable  yes``, or ``no:`` and every reason."""
    return "restorable", ("no: " + "; ".join(p.message for p in problems)) if problems else "yes"


def _aligned(rows: list[tuple[str, str]]) -> list[str]:
    width = max(len(k) for k, _ in rows) + 2
    return [f"{k:<{width}}{v}" for k, v in rows]


def describe_objects(objects: DicomObjects, *, problems: Sequence[NotRestorableError] = (),
                     volume_problem: str | None = None) -> list[str]:
    """The lines printed by ``medvae info`` for DICOM objects with no grayscale volume to read.

    ``objects``: a :class:`~medvae.io.dicom.DicomObjects` (:func:`medvae.io.dicom.read_headers`);
    ``problems``: why they are not restored (:func:`medvae.io.dicom.find_problems`);
    ``volume_problem``: why their frames make no single volume (an RT Dose's stacks), if they do not.
    """
    from medvae.io.dicom import pixel_problem

    rows = _dicom_rows(objects.path, len(objects.files), objects.series_uid, objects.description)
    rows.append(("object", ", ".join(objects.sop_classes)))
    rows.append(("modality", objects.modality))
    images = [ds for ds, n in zip(objects.headers, objects.frames) if n]
    if images:
        sizes = list(dict.fromkeys(f"{int(ds.Columns)} x {int(ds.Rows)}" for ds in images))
        n = sum(objects.frames)
        rows.append(("shape", f"{sizes[0]} x {n}  (X, Y, Z)" if len(sizes) == 1 else
                     f"images of different sizes ({', '.join(sizes)}), {n} frames in all"))
        kinds = dict.fromkeys(f"{ds.get('PhotometricInterpretation', '') or '(none)'}, "
                              f"{int(ds.get('SamplesPerPixel', 1) or 1)} samples per pixel" for ds in images)
        rows.append(("photometric", "; ".join(kinds)))
    else:
        rows.append(("pixels", "none: " + pixel_problem(objects.headers[0])))
    if volume_problem:
        rows.append(("volume", f"none: {volume_problem}"))
    rows.append(_restorable_row(problems))
    return _aligned(rows)


def _medvae_map(scan) -> str | None:
    """``"uncertainty"`` or ``"mask"`` for a map medvae wrote (its NIfTI description or DICOM series
    description says so), whose values say nothing of a modality; None for any other scan."""
    from medvae.io.derived_series import medvae_step, series_role

    step = medvae_step(scan.description)
    role = series_role(step) if step else None
    return role if role in ("uncertainty", "mask") else None


def _slice_note(scan) -> str:
    """What the Z spacing hides: the reader uses the mean slice step, so a missing slice or uneven gaps
    (DICOM positions) and a gantry tilt (slices stepping at an angle to their plane's normal) showed only
    as a log line, or not at all."""
    import numpy as np

    notes = []
    if scan.format == "dicom" and scan.datasets and scan.array.shape[2] > 2:
        from medvae.io.dicom import slice_positions

        pos = slice_positions(scan.datasets)
        if pos is not None and len(pos) == scan.array.shape[2]:
            gaps = np.abs(np.diff(pos))
            mean = float(np.mean(gaps))
            if np.max(np.abs(gaps - mean)) > 0.01 * mean + 0.01:  # as the reader's warning tells them
                notes.append(f"slice gaps {gaps.min():.4g} to {gaps.max():.4g} mm, the mean shown: a missing "
                             "slice or uneven spacing")
    a = scan.affine_mm[:3, :3]
    normal, step = np.cross(a[:, 0], a[:, 1]), a[:, 2]
    if scan.array.shape[2] > 1 and np.linalg.norm(normal) > 0 and np.linalg.norm(step) > 0:
        cos = abs(float(normal @ step)) / float(np.linalg.norm(normal) * np.linalg.norm(step))
        tilt = float(np.degrees(np.arccos(min(cos, 1.0))))
        if tilt > 0.5:
            notes.append(f"slices step at {tilt:.1f} degrees to their plane's normal (gantry tilt): "
                         f"{float(np.linalg.norm(step)) * cos:.4g} mm apart")
    return "".join(f"  ({n})" for n in notes)


def _spacing_unit(scan) -> str:
    """" mm", with the NIfTI header's own unit when it is not mm (the spacing is converted)."""
    unit = {0.001: "micrometres", 1000.0: "metres"}.get(scan.mm_per_unit)
    return f" mm (the header's unit: {unit})" if unit else " mm"


def describe(scan, *, n_volumes: int | None = None, volume: int | None = None,
             problems=()) -> list[str]:
    """The lines printed by ``medvae info`` for a loaded :class:`~medvae.io.Scan`.

    ``problems``: the :class:`~medvae.io.dicom.NotRestorableError` of a DICOM scan read with
    ``check=False`` (:func:`medvae.io.dicom.find_problems`); shown in a ``restorable`` line.
    """
    import numpy as np

    if scan.format == "dicom":
        rows = _dicom_rows(scan.path, len(scan.files or []), scan.series_uid, scan.description)
    else:
        rows = [("path", str(scan.path)), ("format", "NIfTI")]
        if n_volumes and n_volumes > 1:
            rows.append(("volumes", f"{n_volumes} (showing volume {volume or 0}; choose with "
                                    "--volume N)"))
        if scan.description:
            rows.append(("description", scan.description))
    guess = getattr(scan, "modality_guess", None)
    kind = _medvae_map(scan)
    if kind is not None:  # a std map or a 0/1 mask: its values would make any guess wrong
        what = ("a medvae uncertainty map: the posterior std, in the source's units" if kind == "uncertainty"
                else "a medvae mask: 1 = corrupted")
        rows.append(("content", what))
        rows.append(("modality", "unknown (not guessed: a map's values do not tell CT from MR)" if guess
                     else scan.modality))
    else:
        # the guess's reason starts "guessed from the values: ..." (as restore prints it): no prefix here
        rows.append(("modality", f"{scan.modality} ({guess})" if guess else scan.modality))
    shape = scan.array.shape
    rows.append(("shape", " x ".join(str(s) for s in shape) + "  (X, Y, Z)"))
    rows.append(("slices", str(shape[2])))
    bad_geometry = _geometry_text(scan, problems)
    if bad_geometry:
        rows.append(("spacing", bad_geometry[0]))
        rows.append(("orientation", bad_geometry[1]))
    else:
        notes = {}
        if scan.format == "dicom" and scan.datasets:
            from medvae.io.dicom import assumed_geometry

            notes = {k: f"  ({v})" for k, v in assumed_geometry(scan.datasets[0]).items()}
        rows.append(("spacing", " x ".join(f"{s:.4g}" for s in scan.spacing) + _spacing_unit(scan)
                     + notes.get("spacing", "") + _slice_note(scan)))
        rows.append(("orientation", f"{scan.orientation}  (RAS axis codes of X, Y, Z)"
                     + notes.get("orientation", "")))
    lo, hi = float(np.min(scan.array)), float(np.max(scan.array))
    unit = " HU" if scan.modality == "CT" and kind != "mask" and not (kind and guess) else ""
    if unit and scan.format == "dicom" and scan.datasets:
        from medvae.io.dicom import not_hu_note

        note = not_hu_note(scan.datasets[0])  # a CT perfusion map states its own units
        unit = f" ({note})" if note else unit
    rows.append(("values", f"min {lo:.6g}, max {hi:.6g}{unit}"))
    if scan.format == "dicom":
        rows.append(_restorable_row(problems))
    return _aligned(rows)


def model_file(path: str) -> Path | None:
    """The model file ``info`` describes for ``path``: ``default``, a local MLflow model folder's checkpoint,
    or a file named as a torch checkpoint (``.pt``, ``.pth``; a missing one too, to say so) that is not a
    DICOM file (which is read by its content, whatever its name); None for a scan."""
    from medvae.io.dicom import is_dicom_file
    from medvae.models.checkpoint import checkpoint_in_folder, weights_path

    if path == "default":
        return weights_path(path)
    p = Path(path)
    if p.is_dir():
        return checkpoint_in_folder(p)
    # .ts: a TorchScript export is named as such ("neither a DICOM file ... nor a NIfTI file" before)
    if p.suffix.lower() in (".pt", ".pth", ".ts") and not (p.is_file() and is_dicom_file(p)):
        return p
    return None


def _number(value) -> str:
    """A number as ``%g`` (a number stored as text too, as restore reads it), anything else as it is."""
    try:
        return f"{float(value):g}"
    except (TypeError, ValueError):
        return repr(value)


def describe_model(path: Path) -> list[str]:
    """The lines printed by ``medvae info`` for a medvae model file (read with ``weights_only=True``).

    Only what the checkpoint states of itself: a training checkpoint's data paths (``last.pt`` keeps
    them for ``--resume``) are never printed, as they can name patients; a model's are digests.
    """
    import hashlib

    from medvae.blend import blend_weight
    from medvae.errors import MedvaeError
    from medvae.hole_scale import HOLE_RADIUS_KEY, model_hole_radius
    from medvae.models.calibration import CALIBRATION_KEY
    from medvae.models.checkpoint import model_from_checkpoint, read_checkpoint, require_slice_restorer

    ckpt = read_checkpoint(path)
    lm = model_from_checkpoint(ckpt, source=str(path))  # the configuration builds and the weights fit it
    cfg, meta = lm.model.config, dict(ckpt.get("meta") or {})
    n_params = sum(int(t.numel()) for t in ckpt["state_dict"].values())
    training = all(k in ckpt for k in ("optimizer", "epoch"))
    rows = [("path", str(path)),
            ("format", f"medvae {'training checkpoint (resumable)' if training else 'model'}, checkpoint format "
                       f"{ckpt.get('format_version', 0)}"),
            ("sha256", hashlib.sha256(path.read_bytes()).hexdigest()),
            ("network", f"{cfg.spatial_dims}-D masked VAE, channels {' '.join(map(str, cfg.channels))}, latent "
                        f"{cfg.latent_channels}, {cfg.num_res_units} residual unit(s) a level, "
                        f"{n_params / 1e6:.2f} M parameters"),
            ("inputs", "image + mask" + (" + noise map" if cfg.noise_map else "")
             + (f", context dilations {' '.join(map(str, cfg.context_dilations))}" if cfg.context_dilations else "")),
            ("outputs", "posterior mean" + (" + decoder scale (aleatoric std)" if cfg.scale_head else "")),
            ("intensity", f"CT {lm.intensity.ct_window[0]:g}..{lm.intensity.ct_window[1]:g} HU; MR the volume's "
                          f"{lm.intensity.mr_percentiles[0]:g}-{lm.intensity.mr_percentiles[1]:g} percentiles")]
    try:
        require_slice_restorer(lm)
        rows.append(("restores", "yes (single-channel 2-D slices)"))
    except MedvaeError as exc:
        rows.append(("restores", f"no: {exc.message}"))
    trained = [f"medvae {meta['medvae_version']}" if "medvae_version" in meta else None,
               f"recipe {meta['recipe']}" if "recipe" in meta else None,
               f"seed {meta['seed']}" if "seed" in meta else None,
               f"epoch {meta.get('epoch', ckpt.get('epoch'))}" if "epoch" in meta or training else None,
               "averaged from " + ", ".join(map(str, meta["averaged_from"])) if meta.get("averaged_from") else None]
    rows.append(("trained", "; ".join(t for t in trained if t) or "not stated"))
    if HOLE_RADIUS_KEY in meta:
        try:  # restore's own check: a broken value is named, as restore would refuse it
            rows.append(("hole radius", f"{model_hole_radius(meta):g} px (larger holes are restored at a coarser "
                                        "scale)"))
        except MedvaeError as exc:
            rows.append(("hole radius", f"broken: {exc.message}"))
    blend = {str(k): v for k, v in (meta.get("blend") or {}).items() if str(k).startswith("weight_")}
    if blend:
        try:  # restore's own check of every weight it may read (a number in [0, 1])
            for holes in (False, True):
                for modality in (None, "CT", "MR"):
                    blend_weight(meta, holes=holes, modality=modality)
            rows.append(("blend", ", ".join(f"{k} {_number(v)}" for k, v in sorted(blend.items()))
                         + " (share of the classical restoration)"))
        except MedvaeError as exc:
            rows.append(("blend", f"broken: {exc.message}"))
    cal = meta.get(CALIBRATION_KEY) or {}
    if cal:
        cover = [f"{regime} {100 * cal[f'coverage_2std_{regime}']:.1f} %" for regime in ("noise", "holes")
                 if f"coverage_2std_{regime}" in cal]
        rows.append(("uncertainty", "calibrated" + (f": |error| <= 2 std on {', '.join(cover)} of held-out pixels"
                                                    if cover else "")
                     + (f" (aimed at {_number(100 * cal['target_coverage'])} %)"
                        if isinstance(cal.get("target_coverage"), (int, float)) else "")
                     + (f", {cal['date']}" if "date" in cal else "")))
    else:
        rows.append(("uncertainty", "not calibrated: the map is the raw posterior std"))
    return _aligned(rows)


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from medvae.errors import MedvaeError
    from medvae.io import load_scan
    from medvae.io.scan import is_nifti_path

    model = model_file(str(args.path))
    if model is not None:
        if args.series or args.volume is not None:
            raise MedvaeError("--series and --volume describe scans, not a model file", args.path)
        print("\n".join(describe_model(model)))
        return 0
    problems = []
    try:
        scan = load_scan(args.path, series=args.series, volume=args.volume)
    except MedvaeError as exc:
        dicom = sys.modules.get("medvae.io.dicom")  # loaded whenever a DICOM was read
        if dicom is not None and isinstance(exc, dicom.NotRestorableError):
            # describe what medvae will not restore, and say why
            objects = dicom.read_headers(Path(args.path), series=args.series)
            # reports, structure sets, colour images: no grayscale pixels, so their headers say what they
            # are (one among CT slices is refused below, naming the file, as it is for restore)
            if all(dicom.pixel_problem(ds) for ds in objects.headers):
                problems = dicom.find_problems(objects.headers, objects.files)
                print("\n".join(describe_objects(objects, problems=problems)))
                return 0
            try:
                scan = dicom.read_dicom(Path(args.path), series=args.series, check=False)
            except MedvaeError as read_exc:
                # what the object is (RT Dose...) comes first: frames that make no single volume (a
                # dose grid's duplicate positions) are a detail of an object medvae refuses anyway
                problems = dicom.find_problems(objects.headers, objects.files)
                if not problems or isinstance(read_exc, dicom.NotRestorableError):
                    raise
                print("\n".join(describe_objects(objects, problems=problems,
                                                  volume_problem=read_exc.message)))
                return 0
            problems = dicom.find_problems(scan.datasets or [], scan.files or [])
            print("\n".join(describe(scan, problems=problems)))
            return 0
        table = getattr(exc, "series", None)
        if table:
            print(f"{len(table)} series in {args.path}:")
            for uid, desc, n in table:
                print(f"  {uid}  {desc!r}  {n} slice{'s' if n != 1 else ''}")
        raise
    n_volumes = None
    if scan.format == "nifti" and is_nifti_path(args.path):
        from medvae.io.nifti import n_volumes as count_volumes

        n_volumes = count_volumes(args.path)
    print("\n".join(describe(scan, n_volumes=n_volumes, volume=args.volume)))
    return 0
