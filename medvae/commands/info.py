"""``medvae info PATH``: describe a scan (format, series, shape, spacing, orientation, values)."""
from __future__ import annotations

import argparse

HELP = "show a scan's format, series, shape, spacing, orientation, modality and value range"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a NIfTI file (.nii, .nii.gz), a DICOM file or a DICOM folder")
    parser.add_argument("--series", metavar="UID",
                        help="SeriesInstanceUID to show when the folder holds several series")
    parser.add_argument("--volume", metavar="N", type=int,
                        help="volume of a 4-D NIfTI file, from 0 (default: 0)")


def describe(scan, *, n_volumes: int | None = None, volume: int | None = None) -> list[str]:
    """The lines printed by ``medvae info`` for a loaded :class:`~medvae.io.Scan`."""
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
    rows.append(("modality", scan.modality))
    shape = scan.array.shape
    rows.append(("shape", " x ".join(str(s) for s in shape) + "  (X, Y, Z)"))
    rows.append(("slices", str(shape[2])))
    rows.append(("spacing", " x ".join(f"{s:.4g}" for s in scan.spacing) + " mm"))
    rows.append(("orientation", f"{scan.orientation}  (RAS axis codes of X, Y, Z)"))
    lo, hi = float(np.min(scan.array)), float(np.max(scan.array))
    unit = " HU" if scan.modality == "CT" else ""
    rows.append(("values", f"min {lo:.6g}, max {hi:.6g}{unit}"))
    width = max(len(k) for k, _ in rows) + 2
    return [f"{k:<{width}}{v}" for k, v in rows]


def run(args: argparse.Namespace) -> int:
    from medvae.errors import MedvaeError
    from medvae.io import load_scan
    from medvae.io.scan import is_nifti_path

    try:
        scan = load_scan(args.path, series=args.series, volume=args.volume)
    except MedvaeError as exc:
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
