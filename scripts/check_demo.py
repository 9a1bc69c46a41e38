"""Two checks of a `medvae demo` output folder that its PSNR table does not show (docs/benchmarks.md).

Usage: ``python scripts/check_demo.py [--demo demo_out] [--png brain.png]``

* ``ct_boxes``: the share of the damaged pixels inside the body (reference above -500 HU) that come out
  below -500 HU, i.e. air filled in where the reference has tissue, for medvae and the biharmonic
  baseline;
* ``ct_lowdose``: the RMS error in HU over the pixels of the head slice (the series' first) whose
  reference lies in the brain window's range (0..80 HU), where mottle hides grey-white contrast, for the
  low-dose input and medvae. ``--png`` also writes that slice in the brain window (C 40, W 80).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BRAIN_WINDOW = (0.0, 80.0)  # C 40, W 80


def air_share(reference: np.ndarray, image: np.ndarray, mask: np.ndarray) -> float:
    """Share (%) of the masked body pixels of ``reference`` that ``image`` puts below -500 HU."""
    from medvae.intensity import (
        CT_FOREGROUND_HU as AIR_HU,  # body pixels of the reference lie above it
    )

    body = (mask > 0) & (reference > AIR_HU)
    return 100.0 * float((image[body] < AIR_HU).mean())


def brain_rms(reference: np.ndarray, image: np.ndarray) -> float:
    """RMS error (HU) over the pixels whose reference lies in the brain window's range."""
    sel = (reference > BRAIN_WINDOW[0]) & (reference < BRAIN_WINDOW[1])
    return float(np.sqrt(np.mean((image[sel] - reference[sel]) ** 2)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", type=Path, default=Path("demo_out"), help="a medvae demo output folder")
    ap.add_argument("--png", type=Path, help="write the head slice of ct_lowdose in the brain window here")
    args = ap.parse_args(argv)
    if args.png is not None and (args.png.suffix.lower() != ".png" or not args.png.parent.is_dir()):
        ap.error(f"--png {args.png}: give a .png path in an existing folder")  # before the checks, not after
    from medvae.errors import MedvaeError
    from medvae.io.formats import load_scan

    d = args.demo
    try:
        ref = load_scan(d / "samples" / "ct_series").array
        boxes = {k: load_scan(d / "ct_boxes" / k).array for k in ("restored", "baseline")}
        mask = load_scan(d / "ct_boxes" / "mask.nii.gz").array
        low = {k: load_scan(d / "ct_lowdose" / k).array[..., 0] for k in ("corrupted", "restored")}
    except MedvaeError as exc:
        print(f"check_demo: error: {exc}", file=sys.stderr)
        return 2
    print("ct_boxes: damaged body pixels (reference > -500 HU) restored below -500 HU: "
          f"medvae {air_share(ref, boxes['restored'], mask):.1f} %, "
          f"biharmonic {air_share(ref, boxes['baseline'], mask):.1f} %")
    head = ref[..., 0]
    print(f"ct_lowdose, head slice: RMS error over the reference's 0..80 HU pixels: "
          f"input {brain_rms(head, low['corrupted']):.1f} HU, medvae {brain_rms(head, low['restored']):.1f} HU")
    if args.png:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 3, figsize=(12, 4.3))
        for a, (title, img) in zip(ax, [("reference", head), ("low dose", low["corrupted"]),
                                        ("medvae", low["restored"])]):
            a.imshow(np.asarray(img).T, cmap="gray", vmin=BRAIN_WINDOW[0], vmax=BRAIN_WINDOW[1])
            a.set_title(f"{title} (C 40, W 80)")
            a.axis("off")
        fig.tight_layout()
        fig.savefig(args.png, dpi=70)
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
