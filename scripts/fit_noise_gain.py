"""Fit the noise-map gain of a model on the calibration split (issue 10).

Usage: ``python scripts/fit_noise_gain.py [--model default|PATH.pt] [--gains 0.6,0.7,...] [--write]``

The model's encoder sees the slice's blind noise estimate as an input channel. Like FFDNet's
noise-level input, that channel sets how strongly the network smooths. It is trained with the estimate
as it is (gain 1.0). This script restores the noise corruptions of the benchmark (Gaussian 0.05 and
0.10, Rician 0.05, quarter-dose CT) on :data:`benchmarks.common.CALIBRATION_SPLIT`, which is never
trained or validated on, at each gain. It picks the gain with the highest mean PSNR, each corruption
counting equally. With ``--write`` it stores the gain in the checkpoint's ``model_config``
(``noise_map_gain``) and the table in ``meta["noise_map_gain"]``. The weights stay bit-identical.

``--oracle`` also restores the Gaussian cases with the noise map at the true sigma (per slice, gain =
true sigma / the blind estimate) and prints what a perfect noise estimator would add; with
``--split validation`` it does so on the benchmark's validation split instead (nothing is fitted or
written there).

The restorations change with the gain, so re-fit the uncertainty calibration afterwards
(``scripts/calibrate_uncertainty.py --write``) and re-export the shipped model
(``python -m medvae.models.export``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

META_KEY = "noise_map_gain"


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="default | PATH.pt")
    ap.add_argument("--gains", default="0.6,0.7,0.75,0.8,0.85,0.9,1.0",
                    help="comma-separated gains to try (default %(default)s)")
    ap.add_argument("--max-slices", type=int, default=4, help="slices per volume (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write", action="store_true", help="store the best gain in the checkpoint")
    ap.add_argument("--oracle", action="store_true",
                    help="also restore the Gaussian cases with the true sigma in the noise map")
    ap.add_argument("--split", default="calibration", choices=["calibration", "validation"],
                    help="the slices (default calibration; validation only with --oracle, no fit)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "calibration" / "noise_gain.json")
    args = ap.parse_args(argv)
    try:
        args.gains = sorted({float(g) for g in args.gains.split(",")})
    except ValueError:
        ap.error(f"--gains must list numbers, got {args.gains!r}")
    if not args.gains or not min(args.gains) > 0:
        ap.error("--gains must list positive numbers")
    if args.split == "validation" and (args.write or not args.oracle):
        ap.error("--split validation is for --oracle only, and never written")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from benchmarks import common as bench
    from medvae.errors import MedvaeError
    from medvae.models.checkpoint import DEFAULT_WEIGHTS, load_model, require_slice_restorer, update_checkpoint
    from medvae.models.export import weights_sha256

    bench.check_json_output(args.out)  # before the work: --out naming the --model file replaced it
    from medvae.runtime import tune_allocator

    tune_allocator()
    path = DEFAULT_WEIGHTS if args.model == "default" else Path(args.model)
    try:
        loaded = bench.in_window_units(require_slice_restorer(load_model(path)))
        volumes, slices = bench.load_bench_data(bench.split_items(bench.SPLITS[args.split]),
                                                max_slices=args.max_slices)
    except MedvaeError as exc:
        print(f"fit_noise_gain: error: {exc}", file=sys.stderr)
        return 2
    trained_gain = loaded.config.noise_map_gain
    cases = []
    for name in bench.NOISE_CORRUPTIONS:
        spec = bench.CORRUPTION_BY_NAME[name]
        for s in slices:
            if spec.applies_to(s.modality):
                image, _ = bench.corrupt_slice(spec, s.clean, bench.case_seed(args.seed, name, s.volume, s.index))
                cases.append((name, s, image))
    print(f"fit_noise_gain: {path} (gain now {trained_gain}); {len(slices)} slices of "
          f"{', '.join(v.name for v in volumes)}; {len(cases)} cases", flush=True)

    table: dict[str, dict[str, float]] = {}
    t0 = time.perf_counter()
    for gain in args.gains:
        loaded.model.config = dataclasses.replace(loaded.config, noise_map_gain=gain)
        psnr: dict[str, list[float]] = {}
        for name, s, image in cases:
            out = bench.restore_slices(loaded, [image], modality=s.modality)[0]
            psnr.setdefault(name, []).append(bench.score(s.clean, out)["psnr"])
        row = {name: float(np.mean(v)) for name, v in psnr.items()}
        row["mean"] = float(np.mean(list(row.values())))
        table[f"{gain:g}"] = row
        print(f"gain {gain:g}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    best = max(table, key=lambda g: table[g]["mean"])
    heads = list(bench.NOISE_CORRUPTIONS) + ["mean"]
    print("\n| gain | " + " | ".join(heads) + " |\n|---|" + "---|" * len(heads))
    for g, row in table.items():
        print(f"| {g}{' (best)' if g == best else ''} | " + " | ".join(f"{row.get(h, float('nan')):.3f}" for h in heads) + " |")
    print(f"\nbest gain {best} ({time.perf_counter() - t0:.0f} s)")
    if args.oracle:
        oracle_table(loaded, cases, trained_gain)
        if args.split == "validation":
            return 0

    record = {"value": float(best), "psnr_by_gain": table,
              "measured_on": f"mean PSNR (window units, data range 1) of {', '.join(bench.NOISE_CORRUPTIONS)} "
                             f"on {len(slices)} slices of {', '.join(v.name for v in volumes)} (calibration split), "
                             f"seed {args.seed}",
              "date": time.strftime("%Y-%m-%d"),
              "weights_sha256": weights_sha256(loaded.model.state_dict())}
    bench.write_json(record, args.out)  # atomic, and never over the --model checkpoint
    print(f"numbers: {args.out}")
    if args.write:
        update_checkpoint(path, meta={META_KEY: record}, model_config={"noise_map_gain": float(best)})
        print(f"wrote noise_map_gain {best} to {path}")
    return 0


def oracle_table(loaded, cases, trained_gain: float) -> None:
    """Gaussian cases restored with the noise map at the true sigma against the blind estimate."""
    import torch

    from benchmarks import common as bench
    from medvae.models.vae import noise_level

    rows: dict[str, dict[str, list[float]]] = {}
    for name, s, image in cases:
        spec = bench.CORRUPTION_BY_NAME[name]
        if spec.params.get("transform") != "GaussianNoise":
            continue
        blind = float(noise_level(torch.from_numpy(image)[None, None]))
        r = rows.setdefault(name, {"blind sigma / true": [], "blind": [], "oracle": []})
        r["blind sigma / true"].append(blind / spec.params["sigma"])
        for how, gain in (("blind", trained_gain), ("oracle", trained_gain * spec.params["sigma"] / blind)):
            loaded.model.config = dataclasses.replace(loaded.config, noise_map_gain=gain)
            out = bench.restore_slices(loaded, [image], modality=s.modality)[0]
            r[how].append(bench.score(s.clean, out)["psnr"])
    loaded.model.config = dataclasses.replace(loaded.config, noise_map_gain=trained_gain)
    print("\n| corruption | slices | blind sigma / true sigma | PSNR, blind estimate | PSNR, true sigma | gain (dB) |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        m = {k: float(np.mean(v)) for k, v in r.items()}
        print(f"| {name} | {len(r['blind'])} | {m['blind sigma / true']:.2f} (max {max(r['blind sigma / true']):.2f}) "
              f"| {m['blind']:.2f} | {m['oracle']:.2f} | {m['oracle'] - m['blind']:+.2f} |")


if __name__ == "__main__":
    raise SystemExit(main())
