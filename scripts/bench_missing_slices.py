#!/usr/bin/env python
"""Missing slices: filled from their neighbours, and how well the uncertainty map covers the error.

    python scripts/bench_missing_slices.py [--model default] [--slices 24] [--seeds 3] [--json PATH]

A slice wholly inside the mask is interpolated along the slice axis between the nearest slices that
have known pixels (``medvae.slice_gaps``, inside ``restore_volume``). Here every 3-D volume of the
validation and calibration splits (``benchmarks.common``; at least 8 slices) is cut to at most
``--slices`` consecutive slices around its middle, in protocol window units, and loses slices to the
``missing_slices`` recipe's transform (5-20 % of the slices in runs of 1-3; ``--seeds`` draws), with
the rest of each slice known. Scored over the missing slices: PSNR (data range 1) of the input (the
recipe's fill, 0), of the nearest known slice copied and of medvae; and the share of pixels within
± 2 std of the map (8 samples) with the Spearman correlation of std and |error|. The calibration
split's coverage is what ``GAP_STD_SCALE`` is set from; the validation split's is the held-out figure.
Time: each restore against that of the same slices with none missing (every slice through the network);
missing slices skip the network, so the ratio follows the share of known slices.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def nearest_copy(volume: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """Each missing slice replaced by the nearest known one (the simplest fill)."""
    out = volume.copy()
    known = np.flatnonzero(~missing)
    for k in np.flatnonzero(missing):
        out[:, :, k] = volume[:, :, known[np.argmin(np.abs(known - k))]]
    return out


def main(argv=None) -> int:
    from benchmarks.common import at_least

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default", help="default | PATH.pt")
    ap.add_argument("--slices", type=at_least(8), default=24,
                    help="consecutive slices kept per volume (default 24, at least 8)")
    ap.add_argument("--seeds", type=at_least(1), default=3, help="draws of missing slices per volume (default 3)")
    ap.add_argument("--json", help="also write the per-case scores here")
    args = ap.parse_args(argv)
    if args.json:  # before the work: an unwritable path lost the scores after it
        from benchmarks.common import check_json_output

        check_json_output(args.json, "--json")

    from scipy.stats import spearmanr

    from benchmarks import common as bench
    from medvae.corruption import RandMissingSlices
    from medvae.restore import restore_volume
    from medvae.slice_gaps import GAP_STD_SCALE

    info, _, model = bench.open_bench("bench_missing_slices.py", argv, args.model,
                                      "Missing slices: filled from the neighbouring slices")
    print(f"uncertainty of a filled slice: {GAP_STD_SCALE:g} x sqrt(change^2 + reach x e^2): the neighbours' "
          "change, and the midpoint error e of the nearest known triples grown to the slice's place in its gap "
          "(medvae.slice_gaps.fill_missing_slices)\n")
    rows = []
    for split in ("calibration", "validation"):
        for path, modality in bench.split_items(bench.SPLITS[split]):
            from medvae.io import load_scan

            scan = load_scan(path)
            vol = np.asarray(scan.array, np.float32)
            if vol.shape[2] < 8:
                continue
            mid, half = vol.shape[2] // 2, args.slices // 2
            vol = vol[:, :, max(0, mid - half):mid - half + args.slices]
            clean, _ = bench.to_window_units(vol, modality)
            for seed in range(args.seeds):
                t = RandMissingSlices(coverage=(0.05, 0.2), run_length=(1, 3), fill=0.0).set_random_state(seed)
                image, mask = (np.asarray(a[0]) for a in t(clean[None]))
                image, mask = image.astype(np.float32), mask.astype(bool)
                gaps = mask.all(axis=(0, 1))
                t0 = time.perf_counter()
                restored, std = restore_volume(image, model=model, modality=modality, mask=mask, samples=8)
                seconds = time.perf_counter() - t0
                ref = np.clip(clean[:, :, gaps], 0, 1)

                def psnr(x):
                    mse = float(np.mean((np.clip(x[:, :, gaps], 0, 1) - ref) ** 2))
                    return 10 * np.log10(1 / mse) if mse > 0 else float("inf")

                err = np.abs(restored[:, :, gaps] - clean[:, :, gaps]).ravel()
                sd = np.asarray(std[:, :, gaps], np.float64).ravel()
                rows.append({"split": split, "volume": Path(path).name, "modality": modality, "seed": seed,
                             "missing": int(gaps.sum()), "of": int(gaps.size), "input": psnr(image),
                             "nearest": psnr(nearest_copy(image, gaps)), "medvae": psnr(restored),
                             "within_2std": float(np.mean(err <= 2 * sd)),
                             "spearman": float(spearmanr(sd, err)[0]) if sd.std() > 0 else float("nan"),
                             "err_over_std": float(err.mean() / max(sd.mean(), 1e-12)), "seconds": seconds})
            # the baseline: the same slices with none missing (every slice through the network)
            t0 = time.perf_counter()
            restore_volume(clean, model=model, modality=modality, mask=np.zeros(clean.shape, bool), samples=8)
            intact = time.perf_counter() - t0
            for r in rows[-args.seeds:]:
                r["intact_seconds"] = intact
            print(f"{split} {Path(path).name}: done", file=sys.stderr, flush=True)

    print("| split | volume | mod. | draws | missing slices | input | nearest slice | medvae | within ± 2 std "
          "| Spearman | mean abs. error / mean std | time / time with none missing |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for split in ("calibration", "validation"):
        vols = dict.fromkeys(r["volume"] for r in rows if r["split"] == split)
        for v in [*vols, None]:
            rs = [r for r in rows if r["split"] == split and (v is None or r["volume"] == v)]
            if not rs:
                continue
            m = {k: float(np.nanmean([r[k] for r in rs])) for k in ("input", "nearest", "medvae", "within_2std",
                                                                     "spearman", "err_over_std")}
            name = f"**all {split}**" if v is None else v
            time_ratio = sum(r["seconds"] for r in rs) / sum(r["intact_seconds"] for r in rs)
            print(f"| {split} | {name} | {rs[0]['modality'] if v else ''} | {len(rs)} | "
                  f"{sum(r['missing'] for r in rs)} of {sum(r['of'] for r in rs)} | {m['input']:.2f} | "
                  f"{m['nearest']:.2f} | **{m['medvae']:.2f}** | {100 * m['within_2std']:.1f} % | "
                  f"{m['spearman']:.2f} | {m['err_over_std']:.2f} | {time_ratio:.2f} |")
    if args.json:
        bench.write_json({"info": info, "rows": rows}, args.json, "--json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
