#!/usr/bin/env python
"""Faint noise: does medvae leave a nearly clean scan nearly unchanged?

    python scripts/bench_faint.py [--model default] [--max-slices 4] [--json PATH]

A denoiser that smooths anatomy it takes for noise does harm to a scan that was already clean, and the
quality benchmark (``scripts/bench_quality.py``, noise of 5-10 % of the window) never asks. Here the
benchmark slices of every validation volume (``benchmarks.common.VALIDATION_SPLIT``, window units, the
same selection as bench_quality) get Gaussian noise of 0.25 %, 0.5 %, 1 % and 2 % of the window, seeded
per slice, and are restored by medvae (``restore_volume`` as `medvae restore` runs it, blend included)
and by NL-means. Scored by PSNR against the clean slice (window [0, 1], data range 1), per volume and on
average; ``medvae − input`` below 0 means the restoration is worse than doing nothing.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SIGMAS = (0.0025, 0.005, 0.01, 0.02)


def main(argv=None) -> int:
    from benchmarks.common import at_least

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default", help="default | PATH.pt")
    ap.add_argument("--max-slices", type=at_least(1), default=4, help="slices per volume (default 4)")
    ap.add_argument("--json", help="also write the per-slice scores here")
    args = ap.parse_args(argv)
    if args.json:  # before the work: an unwritable path lost the scores after it
        from benchmarks.common import check_json_output

        check_json_output(args.json, "--json")

    from benchmarks import common as bench
    from medvae.baselines import nl_means
    from medvae.corruption import GaussianNoise

    info, loaded, model = bench.open_bench("bench_faint.py", argv, args.model,
                                           "Faint noise: a nearly clean scan restored")
    print()
    volumes, slices = bench.load_bench_data(bench.split_items(bench.VALIDATION_SPLIT), max_slices=args.max_slices)
    rows, per_slice = [], []
    means = {s: {"input": [], "medvae": [], "nl_means": []} for s in SIGMAS}
    for v in volumes:
        mine = [s for s in slices if s.volume == v.name]
        for sigma in SIGMAS:
            noisy = [np.asarray(GaussianNoise(sigma, seed=bench.case_seed(0, f"faint_{sigma}", v.name, s.index))(
                s.clean[None])[0][0], np.float32) for s in mine]
            restored = bench.restore_slices(model, noisy, modality=v.modality)
            scores = {"input": [bench.score(s.clean, n)["psnr"] for s, n in zip(mine, noisy)],
                      "medvae": [bench.score(s.clean, r)["psnr"] for s, r in zip(mine, restored)],
                      "nl_means": [bench.score(s.clean, nl_means(n))["psnr"] for s, n in zip(mine, noisy)]}
            for how, vals in scores.items():
                means[sigma][how].extend(vals)
            per_slice += [{"volume": v.name, "slice": s.index, "sigma": sigma,
                           **{how: vals[i] for how, vals in scores.items()}} for i, s in enumerate(mine)]
            m = {how: float(np.mean(vals)) for how, vals in scores.items()}
            rows.append([v.name, v.modality, sigma, len(mine), f"{m['input']:.2f}", f"{m['medvae']:.2f}",
                         f"{m['nl_means']:.2f}", f"{m['medvae'] - m['input']:+.2f}",
                         f"{m['medvae'] - m['nl_means']:+.2f}"])
    print(bench.markdown_table(["volume", "mod.", "sigma", "slices", "input", "medvae", "nl_means",
                                "medvae − input", "medvae − nl_means"], rows) + "\n")
    summary = []
    for sigma in SIGMAS:
        m = {how: float(np.mean(vals)) for how, vals in means[sigma].items()}
        worse = sum(1 for r in rows if r[2] == sigma and float(r[7]) < 0)
        summary.append([sigma, f"{m['input']:.2f}", f"{m['medvae']:.2f}", f"{m['nl_means']:.2f}",
                        f"{m['medvae'] - m['input']:+.2f}", f"{m['medvae'] - m['nl_means']:+.2f}",
                        f"{worse}/{len(volumes)}"])
    print("Mean over slices:\n")
    print(bench.markdown_table(["sigma", "input", "medvae", "nl_means", "medvae − input", "medvae − nl_means",
                                "volumes where medvae is below its input"], summary))
    if args.json:
        bench.write_json({"info": info, "model": bench.model_info(loaded), "slices": per_slice}, args.json, "--json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
