"""Where the denoising falls below NL-means, and why (issue 10; diagnostic, nothing is fitted or written).

Usage: ``python scripts/diagnose_denoising.py [--model default|PATH.pt] [--split validation|calibration]``

For every volume of the split and each noise corruption of the benchmark (same slices, seeds and
window units as ``scripts/bench_quality.py``), it restores the slices and reports, averaged per volume:

* PSNR of medvae and of NL-means (the per-volume floor of the benchmark);
* the reference's own noise (``skimage.restoration.estimate_sigma`` of the clean slice): the benchmark's
  references are real scans, and what noise they carry is part of the "truth";
* the oracle re-injection: the share ``alpha`` of the removed residual ``input - medvae`` that, added
  back, brings the restoration closest to the reference (searched on a 0.05 grid with the clean slice;
  blind inference cannot do this), and the PSNR it would give. A large ``alpha`` means the network
  removed content that the reference keeps;
* the mean error in the background (reference < 0.1 in window units) for the input, medvae and
  NL-means: a negative value is a background returned darker than the reference's own noise floor.

Then the Spearman correlation, over volumes, between the reference's own noise and the oracle share.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ALPHAS = np.round(np.arange(0.0, 1.0001, 0.05), 2)
BACKGROUND = 0.1  # window units: below it a pixel of the reference counts as background


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="default | PATH.pt")
    ap.add_argument("--split", default="validation", choices=["validation", "calibration"])
    ap.add_argument("--max-slices", type=int, default=4, help="slices per volume (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="base seed of the corruptions (default 0)")
    return ap.parse_args(argv)


def oracle_reinjection(clean: np.ndarray, noisy: np.ndarray, restored: np.ndarray) -> tuple[float, float, float]:
    """``(alpha, psnr at alpha, psnr at 0)``: the share of ``noisy - restored`` that, added back to
    ``restored``, gives the highest PSNR against ``clean`` (window units, the benchmark's metric)."""
    from benchmarks import common as bench

    psnrs = [bench.score(clean, restored + a * (noisy - restored))["psnr"] for a in ALPHAS]
    best = int(np.argmax(psnrs))  # the first of equals: 0 when adding back cannot help
    return float(ALPHAS[best]), float(psnrs[best]), float(psnrs[0])


def main(argv=None) -> int:
    args = parse_args(argv)
    from scipy.stats import spearmanr
    from skimage.restoration import estimate_sigma

    from benchmarks import common as bench
    from medvae.baselines import DENOISERS
    from medvae.errors import MedvaeError
    from medvae.models.checkpoint import load_model, require_slice_restorer

    try:
        model = bench.in_window_units(require_slice_restorer(load_model(args.model)))
        _, slices = bench.load_bench_data(bench.split_items(bench.SPLITS[args.split]), max_slices=args.max_slices)
    except MedvaeError as exc:
        print(f"diagnose_denoising: error: {exc}", file=sys.stderr)
        return 2
    nl_means = DENOISERS["nl_means"]

    rows: dict[tuple[str, str], list[dict[str, float]]] = defaultdict(list)
    for name in bench.NOISE_CORRUPTIONS:
        spec = bench.CORRUPTION_BY_NAME[name]
        for s in slices:
            if not spec.applies_to(s.modality):
                continue
            noisy, _ = bench.corrupt_slice(spec, s.clean, bench.case_seed(args.seed, name, s.volume, s.index))
            out = bench.restore_slices(model, [noisy], modality=s.modality)[0]
            nlm = nl_means(noisy)
            alpha, oracle, psnr = oracle_reinjection(s.clean, noisy, out)
            bg = s.clean < BACKGROUND
            rows[(name, s.volume)].append({
                "medvae": psnr, "nl_means": bench.score(s.clean, nlm)["psnr"],
                "sigma_ref": float(estimate_sigma(s.clean)), "alpha": alpha, "oracle": oracle,
                "bg_input": float((noisy - s.clean)[bg].mean()) if bg.any() else np.nan,
                "bg_medvae": float((out - s.clean)[bg].mean()) if bg.any() else np.nan,
                "bg_nl_means": float((nlm - s.clean)[bg].mean()) if bg.any() else np.nan,
            })

    keys = ["medvae", "nl_means", "sigma_ref", "alpha", "oracle", "bg_input", "bg_medvae", "bg_nl_means"]
    print("| corruption | volume | medvae | NL-means | medvae − NL-means | reference's own noise | oracle alpha "
          "| PSNR at alpha | background error: input / medvae / NL-means |")
    print("|---|---|---|---|---|---|---|---|---|")
    means = {}
    for (name, vol), rs in rows.items():
        m = {k: float(np.nanmean([r[k] for r in rs])) for k in keys}
        means[(name, vol)] = m
        print(f"| {name} | {vol} | {m['medvae']:.2f} | {m['nl_means']:.2f} | {m['medvae'] - m['nl_means']:+.2f} "
              f"| {m['sigma_ref']:.4f} | {m['alpha']:.2f} | {m['oracle']:.2f} ({m['oracle'] - m['medvae']:+.2f}) "
              f"| {m['bg_input']:+.3f} / {m['bg_medvae']:+.3f} / {m['bg_nl_means']:+.3f} |")
    sig = [m["sigma_ref"] for m in means.values()]
    alpha = [m["alpha"] for m in means.values()]
    below = [m["medvae"] < m["nl_means"] for m in means.values()]
    rho = spearmanr(sig, alpha).statistic
    print(f"\nSpearman(reference's own noise, oracle alpha) over {len(sig)} volume rows: {rho:.2f}")
    print(f"mean oracle alpha where medvae is below NL-means: "
          f"{np.mean([a for a, b in zip(alpha, below) if b]):.2f}; elsewhere: "
          f"{np.mean([a for a, b in zip(alpha, below) if not b]):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
