#!/usr/bin/env python
"""The MR intensity window of a noisy scan: what `medvae restore` gets against the clean scan's window.

    python scripts/bench_window.py [--model default] [--max-slices 4] [--samples 8] [--split calibration] [--seed 0]

`scripts/bench_quality.py` hands medvae slices already in the clean volume's window units, so it never
sees how `medvae restore` windows a noisy MR scan itself (the 0.5-99.5 percentiles of the noisy
volume). Here each MR validation volume (``benchmarks.common.VALIDATION_SPLIT``; ``--split calibration``:
those of ``CALIBRATION_SPLIT``) is corrupted in its own units (Gaussian noise of 5 % / 10 % of its clean
window, Rician of 5 % / 10 %, seed 0 or ``--seed S``) and its benchmark slices are restored three ways,
differing only in the window: ``plain`` (the noisy volume's percentiles, what restore did before
2026-11-30), ``restore`` (``IntensityPolicy.window_for(noisy=True)``, what it does now) and ``clean``
(the clean volume's window: the reference). Scored by PSNR against the clean slices in the clean window
(data range = its width), mean over the volume's slices. The network alone (no blend), flip ensemble 2.

With ``--samples N`` the uncertainty map is measured too: the slices are restored as `medvae restore`
restores them (blend on, N posterior samples, seed 0) in the ``restore`` and in the ``clean`` window, and
the share of all their pixels whose error lies within ± 2 std, and Spearman(std, |error|), are given
for each (the calibration's figures come from the clean window, as `scripts/bench_quality.py` restores).

With ``--holes`` the holes of the benchmark's ``boxes_15`` and ``strokes_10`` masks are measured instead:
every slice of the volume is masked (seed ``--seed`` + slice), the holes are filled with 0 in the scan's
units (as `medvae corrupt` leaves them), and the benchmark slices are restored as `medvae restore` restores
them (blend on) in three windows: ``all`` (every voxel, the holes' zeros too: restore before 2026-12-07),
``known`` (the known voxels only, :func:`medvae.restore.scan_window`: what it does now) and ``clean``.
Scored by PSNR inside the holes, clipped to the clean window.

With ``--stored`` the noisy scan (Gaussian noise of 5 % of the clean window) is stored as a user's file
may hold it: ``as is`` (float), ``blank slice`` (one slice that is not a benchmark slice set to 0, as a
zero-filled or padding slice) and ``unsigned`` (rounded and clipped at 0, as a uint16 file keeps it).
Each is restored in :func:`medvae.restore.scan_window`'s window (what `medvae restore` does) and in the
clean window; scored by PSNR over the benchmark slices against the clean ones.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    from benchmarks.common import at_least

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default", help="default | PATH.pt")
    ap.add_argument("--max-slices", type=at_least(1), default=4, help="slices per volume (default 4)")
    ap.add_argument("--split", default="validation", choices=["validation", "calibration"],
                    help="the MR volumes of this benchmark split (default: validation)")
    ap.add_argument("--seed", type=at_least(0), default=0, help="seed of the noise (default 0)")
    ap.add_argument("--samples", type=at_least(0), default=0,
                    help="also measure the uncertainty map's coverage with N posterior samples (default 0: off)")
    ap.add_argument("--holes", action="store_true", help="measure the holes of boxes and strokes instead of noise")
    ap.add_argument("--stored", action="store_true",
                    help="measure a noisy scan stored with a blank slice or clipped at 0 (unsigned)")
    args = ap.parse_args(argv)
    if args.holes:
        return _holes(args, argv)
    if args.stored:
        return _stored(args, argv)

    from benchmarks import common as bench
    from medvae.corruption import GaussianNoise, RicianNoise
    from medvae.intensity import IntensityPolicy
    from medvae.restore import restore_volume

    _, model, _ = bench.open_bench("bench_window.py", argv, args.model, "MR window of a noisy scan")
    print()
    policy = IntensityPolicy()
    noises = {"gaussian_0.05": (GaussianNoise, 0.05), "gaussian_0.10": (GaussianNoise, 0.10),
              "rician_0.05": (RicianNoise, 0.05), "rician_0.10": (RicianNoise, 0.10)}
    rows, gains, cover, shares = [], {n: [] for n in noises}, [], {}
    for path, vol, clean_w, ks in _mr_volumes(args):
        width = clean_w[1] - clean_w[0]
        for name, (transform, sigma) in noises.items():
            noisy = np.asarray(transform(sigma * width, seed=args.seed)(vol[None])[0][0], np.float32)
            windows = {"plain": policy.window_for(noisy, "MR"), "restore": policy.window_for(noisy, "MR", noisy=True),
                       "clean": clean_w}
            score = _network_scores(model, noisy, vol, ks, windows)
            if args.samples:
                from scipy.stats import spearmanr

                ref, row = vol[:, :, ks], [Path(path).name, name]
                for how in ("restore", "clean"):
                    mean, std = restore_volume(noisy[:, :, ks], model=model, modality="MR", window=windows[how],
                                               samples=args.samples)
                    err = np.abs(mean - ref)
                    row += [100 * float(np.mean(err <= 2 * std)),
                            f"{spearmanr(std.ravel(), err.ravel()).correlation:.2f}"]
                cover.append(row)
                shares.setdefault(name, []).append(row[2:6:2])
            gains[name].append(score["restore"] - score["plain"])
            rows.append(_row(path, name, ks, windows, score, "plain", "restore"))
    print(bench.markdown_table(["volume", "noise", "slices", "low end, plain (of the clean window)",
                                "low end, restore", "PSNR plain", "PSNR restore", "PSNR clean window",
                                "restore − plain", "restore − clean"], rows) + "\n")
    print("mean gain of restore's window over the plain percentiles: "
          + ", ".join(f"{n} {np.mean(g):+.2f} dB" for n, g in gains.items() if g))
    if cover:
        print("\nuncertainty map, all pixels of the slices (blend on, as `medvae restore`):\n")
        print(bench.markdown_table(["volume", "noise", "within ± 2 std, restore's window", "Spearman",
                                    "within ± 2 std, clean window", "Spearman"],
                                   [[r[0], r[1], f"{r[2]:.1f} %", r[3], f"{r[4]:.1f} %", r[5]] for r in cover]))
        print("\nmean over the volumes, within ± 2 std in restore's / the clean window: "
              + ", ".join(f"{n} {np.mean([v[0] for v in s]):.1f} / {np.mean([v[1] for v in s]):.1f} %"
                          for n, s in shares.items()))
    return 0


def _network_scores(model, noisy: np.ndarray, vol: np.ndarray, ks, windows: dict) -> dict:
    """Per window, the mean PSNR over slices ``ks`` of the network's restoration (no blend) of ``noisy``
    against the clean ``vol``, in the clean window's width (``windows["clean"]``)."""
    from medvae.evaluate import psnr
    from medvae.restore import restore_volume

    width = windows["clean"][1] - windows["clean"][0]
    score = {}
    for how, w in windows.items():
        mean, _ = restore_volume(noisy[:, :, ks], model=model, modality="MR", window=w, blend=False)
        score[how] = float(np.mean([psnr(vol[:, :, k], mean[:, :, i], data_range=width) for i, k in enumerate(ks)]))
    return score


def _row(path, name: str, ks, windows: dict, score: dict, old: str, new: str) -> list:
    """A table row: the low ends of the ``old`` and ``new`` windows (fractions of the clean one), the three
    PSNRs, and ``new`` against ``old`` and against the clean window."""
    lo, hi = windows["clean"]
    low = {how: (w[0] - lo) / (hi - lo) for how, w in windows.items()}
    return [Path(path).name, name, len(ks), f"{low[old]:+.3f}", f"{low[new]:+.3f}", f"{score[old]:.2f}",
            f"{score[new]:.2f}", f"{score['clean']:.2f}", f"{score[new] - score[old]:+.2f}",
            f"{score[new] - score['clean']:+.2f}"]


def _mr_volumes(args):
    """``(path, volume, clean window, benchmark slices)`` of each MR volume of ``--split``."""
    from benchmarks import common as bench
    from medvae.intensity import IntensityPolicy
    from medvae.io import load_scan

    for path, modality in bench.split_items(bench.SPLITS[args.split]):
        scan = load_scan(path, modality=modality)
        if scan.modality.upper() != "MR":
            continue
        vol = np.asarray(scan.array, np.float32)
        clean_w = IntensityPolicy().window_for(vol, "MR")
        ks = bench.select_slices((vol - clean_w[0]) / (clean_w[1] - clean_w[0]), "MR", max_slices=args.max_slices)
        yield path, vol, clean_w, ks


def _holes(args, argv) -> int:
    """``--holes``: the window of a scan whose holes hold zeros (see the module's docstring)."""
    from benchmarks import common as bench
    from medvae.evaluate import psnr
    from medvae.intensity import IntensityPolicy
    from medvae.restore import restore_volume, scan_window

    _, model, _ = bench.open_bench("bench_window.py", argv, args.model, "MR window of a scan with holes")
    print()
    policy, rows, gains = IntensityPolicy(), [], {}
    for path, vol, clean_w, ks in _mr_volumes(args):
        width = clean_w[1] - clean_w[0]
        for name in ("boxes_15", "strokes_10"):
            spec = bench.CORRUPTION_BY_NAME[name]
            mask = np.stack([bench.corrupt_slice(spec, (vol[:, :, k] - clean_w[0]) / width, args.seed + k)[1]
                             for k in range(vol.shape[2])], 2)
            holed = np.where(mask, np.float32(0), vol)
            windows = {"all": policy.window_for(holed, "MR", noisy=True),
                       "known": scan_window(policy, lambda a, b: holed[:, :, a:b], vol.shape, "MR", unknown=mask),
                       "clean": clean_w}
            score = {}
            for how, w in windows.items():
                mean, _ = restore_volume(holed[:, :, ks], model=model, modality="MR", mask=mask[:, :, ks], window=w)
                score[how] = float(np.mean([psnr(vol[:, :, k], mean[:, :, i], window=clean_w, mask=mask[:, :, k])
                                            for i, k in enumerate(ks)]))
            gains.setdefault(name, []).append(score["known"] - score["all"])
            rows.append(_row(path, name, ks, windows, score, "all", "known"))
    print(bench.markdown_table(["volume", "holes", "slices", "low end, all voxels (of the clean window)",
                                "low end, known voxels", "PSNR all", "PSNR known", "PSNR clean window",
                                "known − all", "known − clean"], rows) + "\n")
    print("mean gain of the known voxels' window over every voxel's, inside the holes: "
          + ", ".join(f"{n} {np.mean(g):+.2f} dB" for n, g in gains.items()))
    return 0


def _stored(args, argv) -> int:
    """``--stored``: the window of a noisy scan with a blank slice or stored unsigned (see the docstring)."""
    from benchmarks import common as bench
    from medvae.corruption import GaussianNoise
    from medvae.evaluate import psnr
    from medvae.restore import scan_window

    _, model, _ = bench.open_bench("bench_window.py", argv, args.model, "MR window of a scan as it is stored")
    print()
    rows = []
    for path, vol, clean_w, ks in _mr_volumes(args):
        width = clean_w[1] - clean_w[0]
        noisy = np.asarray(GaussianNoise(0.05 * width, seed=args.seed)(vol[None])[0][0], np.float32)
        blank = noisy.copy()
        blank[:, :, next(k for k in range(vol.shape[2]) if k not in set(ks)) if vol.shape[2] > len(ks) else 0] = 0
        for name, v in (("as is", noisy), ("blank slice", blank),
                        ("unsigned", np.clip(np.round(noisy), 0, None).astype(np.float32))):
            if name == "blank slice" and vol.shape[2] <= len(ks):
                continue  # every slice is a benchmark slice: none to blank
            windows = {"restore": scan_window(model.intensity, lambda a, b: v[:, :, a:b], v.shape, "MR"),
                       "clean": clean_w}
            score = _network_scores(model, v, vol, ks, windows)
            noisy_in = float(np.mean([psnr(vol[:, :, k], v[:, :, k], data_range=width) for k in ks]))
            low = (windows["restore"][0] - clean_w[0]) / width
            rows.append([Path(path).name, name, len(ks), f"{low:+.3f}", f"{noisy_in:.2f}", f"{score['restore']:.2f}",
                         f"{score['clean']:.2f}", f"{score['restore'] - score['clean']:+.2f}"])
    print(bench.markdown_table(["volume", "stored", "slices", "low end, restore (of the clean window)",
                                "PSNR input", "PSNR restore", "PSNR clean window", "restore − clean"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
