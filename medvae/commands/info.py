"""``medvae info PATH``: describe a scan (format, series, shape, spacing, orientation, values).

A DICOM object that medvae does not restore (RT Dose, SEG, ultrasound, a zero PixelSpacing, ...)
is still described when its pixels can be read, with a ``restorable  no: <reason>`` line, and
invalid geometry is named instead of being printed as ``0 x 0 x 1 mm`` / ``??S``.
"""
from __future__ import annotations

import argparse

HELP = "show a scan's format, series, shape, spacing, orientation, modality and value range"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a NIfTI file (.nii, .nii.gz), a DICOM file or a DICOM folder")
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


def describe(scan, *, n_volumes: int | None = None, volume: int | None = None,
             problems=()) -> list[str]:
    """The lines printed by ``medvae info`` for a loaded :class:`~medvae.io.Scan`.

    ``problems``: the :class:`~medvae.io.dicom.NotRestorableError` of a DICOM scan read with
    ``check=False`` (:func:`medvae.io.dicom.find_problems`); shown in a ``restorable`` line.
    """
    import numpy as np

    rows = [("path", str(scan.path))]
    if scan.format == "dicom":
        n_files = len(scan.files or [])
        rows.append(("format", f"DICOM ({n_files} file{'s' if n_files != 1 else ''})"))
        desc = f" '{scan.description}'" if scan.description else ""
        rows.append(("series", f"{scan.series_uid or '(no SeriesInstanceUID)'}{desc}"))
    else:
        rows.append(("format", "NIfTI"))
        if n_volumes and n_volumes > 1:
            rows.append(("volumes", f"{n_volumes} (showing volume {volume or 0}; choose with "
                                    "--volume N)"))
        if scan.description:
            rows.append(("description", scan.description))
    guess = getattr(scan, "modality_guess", None)
    rows.append(("modality", f"{scan.modality} (guessed: {guess})" if guess else scan.modality))
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
        rows.append(("spacing", " x ".join(f"{s:.4g}" for s in scan.spacing) + " mm"
                     + notes.get("spacing", "")))
        rows.append(("orientation", f"{scan.orientation}  (RAS axis codes of X, Y, Z)"
                     + notes.get("orientation", "")))
    lo, hi = float(np.min(scan.array)), float(np.max(scan.array))
    unit = " HU" if scan.modality == "CT" else ""
    rows.append(("values", f"min {lo:.6g}, max {hi:.6g}{unit}"))
    if scan.format == "dicom":
        why = "; ".join(p.message for p in problems)
        rows.append(("restorable", f"no: {why}" if problems else "yes"))
    width = max(len(k) for k, _ in rows) + 2
    return [f"{k:<{width}}{v}" for k, v in rows]


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from medvae.errors import MedvaeError
    from medvae.io import load_scan
    from medvae.io.scan import is_nifti_path

    problems = []
    try:
        scan = load_scan(args.path, series=args.series, volume=args.volume)
    except MedvaeError as exc:
        dicom = sys.modules.get("medvae.io.dicom")  # loaded whenever a DICOM was read
        if dicom is not None and isinstance(exc, dicom.NotRestorableError):
            # describe what medvae will not restore, and say why
            scan = dicom.read_dicom(Path(args.path), series=args.series, check=False)
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
