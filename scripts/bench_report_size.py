#!/usr/bin/env python3
"""Size of the review page for a large series (issue 13 item 10): the bound, measured.

    python scripts/bench_report_size.py [--slices 300] [--size 512] [--budget 45000000]

Builds a CT series of ``--slices`` slices of ``--size``² from the real head CT of the dev data
(resampled, so the anatomy is real), with Gaussian noise of 40 HU in the corrupted, 15 HU in the
baseline and 10 HU in the restored volume (noise is what makes the panels hard to compress), and an
uncertainty map; writes the review page with all six panels and prints its size, the in-plane
downsampling and the slice stride the page chose, and the time taken.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks.common, from any working folder
    sys.path.insert(0, str(ROOT))

CT_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "dev" / "nifti" / "invesalius_cranium_ct.nii.gz"


def main(argv: list[str] | None = None) -> int:
    import json
    import re

    import nibabel as nib
    from scipy.ndimage import zoom

    from medvae.evaluate import evaluate_volumes
    from medvae.report import PAGE_BUDGET, write_report

    from benchmarks.common import at_least

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=at_least(16), default=512)
    ap.add_argument("--budget", type=at_least(1), default=PAGE_BUDGET)
    args = ap.parse_args(argv)
    if args.slices < 1:  # 0 crashed after the set-up
        ap.error("--slices must be at least 1")
    if not CT_FILE.is_file():
        print(f"bench_report_size: dev data missing: {CT_FILE}", file=sys.stderr)
        return 2
    src = nib.load(CT_FILE).get_fdata(dtype=np.float32)[:, :, 40:70]
    ref = zoom(src, (args.size / src.shape[0], args.size / src.shape[1], args.slices / src.shape[2]), order=1)
    rng = np.random.default_rng(0)
    vols = {name: (ref + rng.normal(0, sd, ref.shape)).astype(np.float32)
            for name, sd in (("corrupted", 40), ("baseline", 15), ("restored", 10))}
    unc = np.abs(rng.normal(0, 5, ref.shape)).astype(np.float32)
    t0 = time.perf_counter()
    ev = evaluate_volumes(vols["restored"], ref, window=(-1000, 1000), corrupted=vols["corrupted"],
                          baseline=vols["baseline"], modality="CT", regions=("image",))
    t1 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_report(tmp, evaluation=ev, reference=ref, uncertainty=unc, window=(-1000, 1000),
                             title="size benchmark", affine=np.diag([0.5, 0.5, 1.0, 1.0]), max_bytes=args.budget,
                             **vols)
        size = paths["index_html"].stat().st_size
        html = paths["index_html"].read_text()
    t2 = time.perf_counter()
    d = json.loads(re.search(r'id="data">(.*?)</script>', html, re.S).group(1))
    print(f"series {args.size}x{args.size}x{args.slices}, 6 panels, budget {args.budget / 1e6:.0f} MB: "
          f"index.html {size / 1e6:.1f} MB; in-plane downsampling {d['downsample']}x, "
          f"{len(d['slices'])} of {args.slices} slices shown (stride {d['stride']}); "
          f"evaluate {t1 - t0:.0f} s, report {t2 - t1:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
