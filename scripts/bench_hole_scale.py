#!/usr/bin/env python
"""Large holes: restored at full scale or at the coarser scale where they look like the training holes.

    python scripts/bench_hole_scale.py [--model default] [--sets big,validation,calibration] [--json PATH]

``restore_volume`` restores a hole whose inscribed radius exceeds the training holes' (the model's
``meta["hole_radius"]``, 20 px without one) on a copy of the slice shrunk by a power of two, and uses the
upsampled result inside it (``medvae.hole_scale``).
This compares that (``coarse``, the default) with every hole at full scale (``full``,
``restore_volume(coarse_holes=False)``) and with biharmonic inpainting, all as ``medvae restore`` runs
them (blend with biharmonic included), on the benchmark's hole corruptions (boxes ~15 %, strokes
~10 %; ``benchmarks.common.CORRUPTIONS``), mask PSNR in window units. The sets:

- ``big``: every 512² CT slice of ``../shared/data/dev`` (five scans; two are training volumes of the
  default model, one a calibration volume, two validation volumes), seeds 0-3: the case the rule is for;
- ``validation``: the quality benchmark's validation split, seed 0 (its own slices and seeds);
- ``calibration``: the calibration split, seeds 0-1.

Prints per set and corruption the means and ``coarse − full``, then per volume.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BIG = ("dicom/pydicom/J2K_pixelrep_mismatch.dcm", "dicom/pydicom-data/693_UNCR.dcm",
       "dicom/pydicom-data/eCT_Supplemental.dcm", "dicom/pydicom-data/bad_sequence.dcm",
       "dicom/pydicom-data/explicit_VR-UN.dcm")
SEEDS = {"big": (0, 1, 2, 3), "validation": (0,), "calibration": (0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default", help="default | PATH.pt")
    ap.add_argument("--sets", default="big,validation,calibration", help="comma-separated, from " + ", ".join(SEEDS))
    ap.add_argument("--json", help="also write the per-slice scores here")
    args = ap.parse_args(argv)
    if args.json:  # before the work: an unwritable path lost the scores after it
        from benchmarks.common import check_json_output

        check_json_output(args.json, "--json")
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    if not sets or set(sets) - set(SEEDS):
        ap.error(f"--sets takes {', '.join(SEEDS)}")

    from benchmarks import common as bench
    from medvae.baselines import biharmonic
    from medvae.hole_scale import EDGE_RAMP, hole_levels, model_hole_radius

    info, loaded, model = bench.open_bench("bench_hole_scale.py", argv, args.model,
                                           "Large holes: full scale or coarse scale")
    radius = model_hole_radius(loaded.meta, source=loaded.source)  # what restore_volume uses for this model
    print(f"rule:     holes of inscribed radius > {radius:g} px restored at 1/f scale (f a power of two, "
          f"radius/f <= {radius:g}); coarse weight 0 at {EDGE_RAMP:g} px from the known pixels, 1 from "
          f"{2 * EDGE_RAMP:g} px\n")
    rows = []
    for name in sets:
        items = ([(bench.DEV_DATA / p, "CT") for p in BIG] if name == "big"
                 else bench.split_items(bench.SPLITS[name]))
        _, slices = bench.load_bench_data(items, max_slices=4)
        for spec in (bench.CORRUPTION_BY_NAME["boxes_15"], bench.CORRUPTION_BY_NAME["strokes_10"]):
            for seed in SEEDS[name]:
                for s in slices:
                    seed_of_case = bench.case_seed(seed, spec.name, s.volume, s.index)
                    image, mask = bench.corrupt_slice(spec, s.clean, seed_of_case)
                    out = {"biharmonic": biharmonic(image, mask)}
                    for how, coarse in (("full", False), ("coarse", True)):
                        out[how] = bench.restore_slices(model, [image], [mask], modality=s.modality,
                                                        coarse_holes=coarse)[0]
                    row = {"set": name, "corruption": spec.name, "volume": s.volume, "slice": s.index, "seed": seed,
                           "shape": list(image.shape), "shrunk": int(hole_levels(mask, radius=radius)[1].max())}
                    row.update({how: bench.score(s.clean, o, mask)["psnr_mask"] for how, o in out.items()})
                    rows.append(row)
            print(f"{name} {spec.name}: done", file=sys.stderr, flush=True)

    hows = ("biharmonic", "full", "coarse")
    print("| set | corruption | slices | slices shrunk | biharmonic | full scale | coarse (default) | coarse − full "
          "| coarse − biharmonic |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in sets:
        for corr in ("boxes_15", "strokes_10"):
            rs = [r for r in rows if r["set"] == name and r["corruption"] == corr]
            m = {h: float(np.mean([r[h] for r in rs])) for h in hows}
            print(f"| {name} | {corr} | {len(rs)} | {sum(r['shrunk'] > 1 for r in rs)} | {m['biharmonic']:.2f} | "
                  f"{m['full']:.2f} | **{m['coarse']:.2f}** | {m['coarse'] - m['full']:+.2f} | "
                  f"{m['coarse'] - m['biharmonic']:+.2f} |")
    print("\nPer volume (mean over its slices and seeds; mask PSNR, dB):\n")
    print("| set | corruption | volume | shape | cases | biharmonic | full scale | coarse | coarse − full |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in sets:
        for corr in ("boxes_15", "strokes_10"):
            vols = dict.fromkeys(r["volume"] for r in rows if r["set"] == name and r["corruption"] == corr)
            for v in vols:
                rs = [r for r in rows if r["set"] == name and r["corruption"] == corr and r["volume"] == v]
                m = {h: float(np.mean([r[h] for r in rs])) for h in hows}
                print(f"| {name} | {corr} | {v} | {'x'.join(map(str, rs[0]['shape']))} | {len(rs)} | "
                      f"{m['biharmonic']:.2f} | {m['full']:.2f} | {m['coarse']:.2f} | {m['coarse'] - m['full']:+.2f} |")
    if args.json:
        bench.write_json({"info": info, "rows": rows}, args.json, "--json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
