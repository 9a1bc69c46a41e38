#!/usr/bin/env python
"""Calibrate a model's uncertainty map (posterior std) without retraining, and measure its coverage.

    python scripts/calibrate_uncertainty.py [--model default] [--max-slices 3] [--samples 8]
                                            [--coverage 0.95] [--write] [--out calibration.json]

0. **Blend** (:mod:`medvae.blend`): on the same calibration cases, the least-squares weight of the
   classical restoration (biharmonic inpainting for holes; non-local means for noise with
   ``--blend-regimes holes,noise``) that is averaged with the network's, per regime and per modality
   with enough cases from at least two subjects (:func:`own_fit`); everything below is measured on the restoration as ``restore_volume`` returns it.
1. **Fit** on the calibration volumes (``benchmarks.common.CALIBRATION_SPLIT``: dipy's PIESNO and
   T1 slices, pydicom's MR_small, the enhanced CT eCT_Supplemental; never trained on, disjoint by
   subject from the validation volumes). Each usable slice (at most
   ``--max-slices`` per volume) is corrupted with each benchmark corruption (benchmarks/common.py,
   seeds from ``--seed``), restored with ``--samples`` posterior samples exactly as
   ``restore_volume`` does (the raw, uncalibrated predictive std: the samples' spread and, for a model
   with a scale head, the decoder's Laplace scale). The error, that std, the floor's unit and the
   restored slice's gradient are collected in window units: every pixel for the noise corruptions, the
   mask's pixels for the holes (the same number of random pixels from each slice, so no slice
   dominates). Per regime (and per modality with enough cases from two subjects: one scan, such as the
   single CT perfusion map of the split, does not stand for a modality) the weights of
   :func:`medvae.models.calibration.fit_calibration` are fitted by likelihood and widened to the
   split-conformal ``--coverage`` quantile: after calibration, ``|error| <= 2 std`` holds on that
   share of the calibration pixels.
2. **Measure** on the benchmark's validation volumes (``VALIDATION_SPLIT``, seed 0, the benchmark's
   slices): the share of pixels with ``|error| <= 2 std`` (before and after scaling) and Spearman of
   std and ``|error|``, as a mean over slices, per corruption, per regime and per volume; beside it the
   Spearman an oracle map reaches (:func:`oracle_spearman`: the true local RMS error).
3. With ``--write``, store ``meta["calibration"]`` and ``meta["blend"]`` in the checkpoint (``default``: the shipped
   ``medvae/weights/default.pt``). Only ``meta`` changes: the file is rewritten atomically and
   re-read, and the write is refused unless every weight tensor is bit-identical to before.
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

DEFAULT_OUT = ROOT / "runs" / "calibration" / "calibration.json"


def sig(x: float) -> float:
    """Four significant digits: how a fitted weight is stored. Not decimal places, which would turn a
    tiny fitted weight into 0, and a scale of 0 reads as 'no calibration' (1.0)."""
    return float(f"{x:.4g}")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv):
    from benchmarks.common import at_least

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default", help="default | PATH.pt (a medvae checkpoint)")
    ap.add_argument("--config", default="default",
                    help="the training config of --model (default: the shipped one): its training scans must "
                         "be neither calibration nor validation scans")
    ap.add_argument("--max-slices", type=at_least(1), default=3, help="calibration slices per volume (default 3)")
    ap.add_argument("--val-max-slices", type=int, default=4,
                    help="validation slices per volume, as in the benchmark run (default 4)")
    ap.add_argument("--samples", type=int, default=8,
                    help="posterior samples, as 'medvae restore --uncertainty' draws (default 8)")
    ap.add_argument("--coverage", type=float, default=0.95, help="target share within ± 2 std (default 0.95)")
    ap.add_argument("--seed", type=int, default=1, help="base seed of the calibration corruptions (default 1)")
    ap.add_argument("--pixels-per-slice", type=int, default=4000, help="scores drawn per slice (default 4000)")
    ap.add_argument("--min-modality-slices", type=int, default=5,
                    help="fit a modality on its own only with at least this many (slice, corruption) cases "
                         "per regime (default 5); else it uses the regime's fit")
    ap.add_argument("--min-modality-subjects", type=int, default=2,
                    help="fit a modality on its own only with cases from at least this many subjects (default 2): "
                         "one scan's noise and anatomy do not stand for a modality; else it uses the regime's fit")
    ap.add_argument("--blend-regimes", default="holes",
                    help="regimes whose blend with the classical restoration is fitted and stored (comma-separated "
                         "from holes, noise; default holes: for noise the blend gained on the benchmark's white "
                         "Gaussian noise but lost 1-2.5 dB on the demo's heavy low-dose CT and Rician MR, "
                         "docs/benchmarks.md; 'none': no blend)")
    ap.add_argument("--write", action="store_true", help="store meta['calibration'] and meta['blend'] in the checkpoint")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help=f"JSON with every number (default {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    if not {r.strip() for r in args.blend_regimes.split(",")} <= {"holes", "noise", "none", ""}:
        ap.error("--blend-regimes takes holes, noise or none")
    if args.samples < 2:
        ap.error("--samples must be >= 2 (a std needs two samples)")
    if not 0.5 < args.coverage < 1.0:
        ap.error("--coverage must lie in (0.5, 1)")
    return args


def run_split(bench, loaded, slices, *, seed: int, samples: int):
    """Corrupt and restore every (corruption, slice) case; yields dicts with the network's mean
    (``net``), the classical estimate that the blend mixes in (``classical``) and the raw std."""
    from medvae.blend import classical_estimate

    # who was scanned (SplitEntry.subject), by the volume names load_bench_data gives (file names)
    subject = {Path(e.path).name: e.subject or e.path for e in (*bench.CALIBRATION_SPLIT, *bench.VALIDATION_SPLIT)}
    by_volume: dict[str, list[int]] = {}
    for i, s in enumerate(slices):
        by_volume.setdefault(s.volume, []).append(i)
    for spec in bench.CORRUPTIONS:
        t0 = time.perf_counter()
        use_mask = spec.kind == "mask"
        for vol, idx in by_volume.items():
            idx = [i for i in idx if spec.applies_to(slices[i].modality)]
            if not idx:
                continue
            cases = [bench.corrupt_slice(spec, slices[i].clean, bench.case_seed(seed, spec.name, vol, slices[i].index))
                     for i in idx]
            means, stds = bench.restore_slices_std(loaded, [c[0] for c in cases],
                                                   [c[1] for c in cases] if use_mask else None,
                                                   modality=slices[idx[0]].modality, samples=samples,
                                                   blend=False)
            for i, (img, mask), mean, std in zip(idx, cases, means, stds):
                regime = "holes" if use_mask else "noise"
                yield {"corruption": spec.name, "regime": regime,
                       "volume": vol, "subject": subject.get(vol, vol), "modality": slices[i].modality,
                       "slice": slices[i].index,
                       "clean": slices[i].clean, "image": img, "net": mean, "std": std,
                       "classical": classical_estimate(img, mask if use_mask else None),
                       "mask": mask if use_mask else None}
        _log(f"{spec.name}: done in {time.perf_counter() - t0:.1f} s")


def own_fit(cases, *, min_cases: int, min_subjects: int) -> bool:
    """Whether a modality's cases of one regime may have a fit of their own: at least ``min_cases``
    (slice, corruption) cases from at least ``min_subjects`` subjects (else the regime's fit serves)."""
    return len(cases) >= min_cases and len({c["subject"] for c in cases}) >= min_subjects


def fit_blend(cases, *, rng, pixels: int, min_cases: int, min_subjects: int):
    """Least-squares weights of the classical estimate per regime, and per modality with enough cases
    and subjects (:func:`own_fit`); each case gives at most ``pixels`` of its regime's pixels, so no
    slice dominates.
    Returns the weights (``meta["blend"]`` keys) and table rows of PSNR per corruption."""
    from medvae.blend import blend, fit_weight
    from medvae.evaluate import psnr

    def pick(case):
        sel = case["mask"] if case["mask"] is not None else np.ones(case["clean"].shape, bool)
        flat = np.flatnonzero(sel)
        if flat.size > pixels:
            flat = rng.choice(flat, pixels, replace=False)
        return tuple(case[k].ravel()[flat] for k in ("net", "classical", "clean"))

    picked = [(c, pick(c)) for c in cases]
    groups: dict[str, list] = {}
    for c, p in picked:
        groups.setdefault(f"weight_{c['regime']}", []).append((c, p))
        groups.setdefault(f"weight_{c['regime']}_{c['modality'].lower()}", []).append((c, p))
    weights = {}
    for key, cps in sorted(groups.items()):
        if key.count("_") == 2 and not own_fit([c for c, _ in cps], min_cases=min_cases, min_subjects=min_subjects):
            continue  # too few cases or subjects for a modality of its own
        weights[key] = round(fit_weight(*(np.concatenate([p[j] for _, p in cps]) for j in range(3))), 4)
    rows = []
    for corr in dict.fromkeys(c["corruption"] for c in cases):
        cs = [c for c in cases if c["corruption"] == corr]
        vals = []
        for c in cs:
            w = weights.get(f"weight_{c['regime']}_{c['modality'].lower()}", weights.get(f"weight_{c['regime']}", 0.0))
            m = c["mask"]
            vals.append([psnr(c["clean"], im, window=(0.0, 1.0), mask=m)
                         for im in (c["net"], c["classical"], blend(c["net"], c["classical"], w))])
        rows.append([corr, len(cs), *(f"{v:.2f}" for v in np.mean(vals, axis=0))])
    return weights, rows


def apply_blend(case, blend_meta) -> None:
    """Set ``case["mean"]`` to the blended restoration, as ``restore_volume`` returns it, and
    ``case["disagreement"]`` to ``|network - classical|`` where the blend applies (else None)."""
    from medvae.blend import BLEND_KEY, blend, blend_weight

    w = blend_weight({BLEND_KEY: blend_meta}, holes=case["regime"] == "holes", modality=case["modality"])
    case["mean"] = blend(case["net"], case["classical"], w)
    case["disagreement"] = np.abs(case["net"] - case["classical"]) if w > 0 else None


def region(case):
    """Error, raw std, the restored slice's gradient magnitude (the edge term's feature) and the
    network's disagreement with the classical restoration (the blend term's; 0 when not blended) over
    the regime's pixels."""
    from medvae.models.calibration import restoration_gradient

    err = case["mean"].astype(np.float64) - case["clean"].astype(np.float64)
    std = case["std"].astype(np.float64)
    grad = restoration_gradient(case["mean"])
    dis = case["disagreement"] if case["disagreement"] is not None else np.zeros(err.shape)
    if case["mask"] is not None:
        return err[case["mask"]], std[case["mask"]], grad[case["mask"]], dis[case["mask"]]
    return err.ravel(), std.ravel(), grad.ravel(), dis.ravel()


def summarize(rows, keys):
    """Mean over rows of each metric, grouped by ``keys``."""
    out: dict[str, dict] = {}
    for r in rows:
        k = " / ".join(str(r[x]) for x in keys)
        out.setdefault(k, []).append(r)
    res = {}
    for k, rs in out.items():
        res[k] = {m: float(np.nanmean([r[m] for r in rs])) for m in
                  ("unc_spearman", "unc_cover_raw", "unc_cover", "unc_err_over_std", "oracle_spearman")}
        res[k]["n"] = len(rs)
    return res


def oracle_spearman(case, size: int = 7) -> float:
    """Spearman of |error| and an oracle map that knows the true error: the RMS error of the
    ``size`` x ``size`` neighbourhood, the pixel itself left out. A smooth map can hardly rank the
    error of single pixels better; it is the reference for the Spearman target."""
    from scipy.ndimage import uniform_filter

    from medvae.models.calibration import spearman

    err = case["mean"].astype(np.float64) - case["clean"].astype(np.float64)
    n = size * size
    local = np.sqrt(np.maximum(uniform_filter(err ** 2, size, mode="nearest") * n - err ** 2, 0) / (n - 1))
    if case["mask"] is not None:
        return spearman(local[case["mask"]], err[case["mask"]])
    return spearman(local, err)


def main(argv=None) -> int:
    args = parse_args(argv)
    from benchmarks import common as bench
    from medvae.blend import BLEND_KEY
    from medvae.errors import MedvaeError
    from medvae.models.calibration import (calibrate_slice, calibrated_std, coverage_within, fit_calibration,
                                           fit_std_scale, noise_sigma)
    from medvae.models.checkpoint import DEFAULT_WEIGHTS, load_model, require_slice_restorer, update_checkpoint
    from medvae.models.export import weights_sha256
    from medvae.runtime import tune_allocator

    bench.check_json_output(args.out)  # before the work: --out naming the --model file replaced it

    tune_allocator()
    overlap = bench.split_disjoint(bench.VALIDATION_SPLIT, bench.CALIBRATION_SPLIT)
    if overlap:
        print(f"calibrate_uncertainty: error: calibration and validation share {overlap}", file=sys.stderr)
        return 2
    try:
        if args.model != "default" and args.config == "default":  # the held-out claim rests on this check
            print("calibrate_uncertainty: note: the calibration and validation scans are checked against the "
                  "shipped config's training scans; pass --config with the training config of --model",
                  file=sys.stderr)
        bench.check_unseen(bench.CALIBRATION_SPLIT, args.config)
        bench.check_unseen(bench.VALIDATION_SPLIT, args.config)
        loaded = require_slice_restorer(load_model(args.model))
        # the benchmark's slices are in window units: restore them as they are (as bench_quality does)
        raw = bench.uncalibrated(bench.in_window_units(loaded))
        cal_vols, cal_slices = bench.load_bench_data(bench.split_items(bench.CALIBRATION_SPLIT),
                                                     max_slices=args.max_slices)
        val_vols, val_slices = bench.load_bench_data(bench.split_items(bench.VALIDATION_SPLIT),
                                                     max_slices=args.val_max_slices)
    except MedvaeError as exc:
        print(f"calibrate_uncertainty: error: {exc}", file=sys.stderr)
        return 2
    info = bench.run_info(None if argv is None else ["scripts/calibrate_uncertainty.py", *map(str, argv)])
    print("# medvae uncertainty calibration\n")
    print("\n".join(bench.header_lines(info, bench.model_info(raw))))
    print(f"samples {args.samples}, target coverage {args.coverage:g} of pixels within ± 2 std\n")
    print("calibration volumes:\n\n" + bench.selection_table(cal_vols) + "\n")

    rng = np.random.default_rng(args.seed)
    # 0. the blend: the least-squares weight of the classical estimate per regime (and modality), on
    #    the same calibration cases; the std is then fitted to the blended restoration's error
    cal_cases = list(run_split(bench, raw, cal_slices, seed=args.seed, samples=args.samples))
    regimes = {r.strip() for r in args.blend_regimes.split(",")} - {"none", ""}
    blend_meta, blend_rows = fit_blend([c for c in cal_cases if c["regime"] in regimes], rng=rng,
                                       pixels=args.pixels_per_slice, min_cases=args.min_modality_slices,
                                       min_subjects=args.min_modality_subjects)
    for case in cal_cases:
        apply_blend(case, blend_meta)
    print("## Blend with the classical restoration (fitted on the calibration volumes)\n")
    print("weights of the classical estimate: " + ", ".join(f"{k} {v:.3f}" for k, v in blend_meta.items())
          + "\n")
    print(bench.markdown_table(["corruption", "slices", "network PSNR", "classical PSNR", "blended PSNR"],
                               blend_rows) + "\n")
    # 1. fit: per pixel the error, the sampled std, the floor's unit (noise: the slice's blind
    #    noise estimate; holes: 1), the restored slice's gradient (the edge term) and the network's
    #    disagreement with the classical restoration (the blend term)
    Case = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]
    data: dict[str, list[Case]] = {"noise": [], "holes": []}
    per_corr: dict[str, list[Case]] = {}
    by_modality: dict[tuple[str, str], list[Case]] = {}
    subjects_of: dict[tuple[str, str], list[dict]] = {}  # the cases behind by_modality, for own_fit
    for case in cal_cases:
        err, std, grad, dis = region(case)
        if err.size > args.pixels_per_slice:
            pick = rng.choice(err.size, args.pixels_per_slice, replace=False)
            err, std, grad, dis = err[pick], std[pick], grad[pick], dis[pick]
        unit = np.full(err.shape, 1.0 if case["regime"] == "holes" else noise_sigma(case["image"]))
        data[case["regime"]].append((err, std, unit, grad, dis))
        by_modality.setdefault((case["regime"], case["modality"]), []).append((err, std, unit, grad, dis))
        subjects_of.setdefault((case["regime"], case["modality"]), []).append(case)
        per_corr.setdefault(case["corruption"], []).append((err, std, unit, grad, dis))
    terms = {}
    for regime, quads in data.items():
        e, s, u, g, d = (np.concatenate([q[j] for q in quads]) for j in range(5))
        terms[regime] = fit_calibration(e, s, u, g, d, coverage=args.coverage)
    # per modality too: the error of a CT and of an MR restoration differ in how they relate to the
    # model's std (v3: its Laplace scale is about twice the error on CT); restore_volume uses these
    modality_terms = {}
    for (regime, modality), quads in sorted(by_modality.items()):
        cs = subjects_of[(regime, modality)]
        if not own_fit(cs, min_cases=args.min_modality_slices, min_subjects=args.min_modality_subjects):
            print(f"{regime} {modality}: {len(quads)} calibration cases from {len({c['subject'] for c in cs})} "
                  f"subject(s) (needs {args.min_modality_slices} from {args.min_modality_subjects}), no fit of "
                  "its own: the regime's fit serves it\n")
            continue
        e, s, u, g, d = (np.concatenate([q[j] for q in quads]) for j in range(5))
        modality_terms[(regime, modality)] = fit_calibration(e, s, u, g, d, coverage=args.coverage)
    fit_rows = []
    for corr, quads in per_corr.items():
        e, s, u, g, d = (np.concatenate([q[j] for q in quads]) for j in range(5))
        regime = "holes" if bench.CORRUPTION_BY_NAME[corr].kind == "mask" else "noise"
        scale, floor, edge, blend_term = terms[regime]
        cal = calibrated_std(s, scale=scale, floor=floor * u, edge=edge, gradient=g,  # a floor per pixel
                             blend=blend_term, disagreement=d)
        fit_rows.append([corr, regime, len(quads), f"{np.mean(np.abs(e)) / np.mean(s):.1f}",
                         f"{fit_std_scale(e, s, coverage=args.coverage):.1f}",
                         f"{100 * coverage_within(e, s):.1f} %", f"{100 * coverage_within(e, cal):.1f} %",
                         f"{np.mean(cal) / np.mean(np.abs(e)):.2f}"])
    print("## Fit on the calibration volumes\n")
    print(f"noise: scale {terms['noise'][0]:.4g}, floor {terms['noise'][1]:.4g} x the slice's noise estimate, "
          f"edge {terms['noise'][2]:.4g}, blend {terms['noise'][3]:.4g}; holes: scale {terms['holes'][0]:.4g}, "
          f"floor {terms['holes'][1]:.4g}, edge {terms['holes'][2]:.4g}, blend {terms['holes'][3]:.4g} "
          "(window units)\n")
    print(bench.markdown_table(["corruption", "regime", "slices", "mean abs. error / mean raw std",
                                f"a scale alone for {args.coverage:g}", "within ± 2 std, raw",
                                "within ± 2 std, calibrated", "mean calibrated std / mean abs. error"],
                               fit_rows) + "\n")
    per_modality = {}
    for (regime, modality), (scale, floor, edge, blend_term) in modality_terms.items():
        per_modality[f"std_scale_{regime}_{modality.lower()}"] = sig(scale)
        per_modality[f"std_floor_{regime}_{modality.lower()}"] = sig(floor)
        per_modality[f"std_edge_{regime}_{modality.lower()}"] = sig(edge)
        per_modality[f"std_blend_{regime}_{modality.lower()}"] = sig(blend_term)
    print("per modality: " + ", ".join(f"{k} {v:.4g}" for k, v in per_modality.items()) + "\n")
    # validated exactly as stored (4 significant digits)
    meta = {"calibration": {"std_scale_noise": sig(terms["noise"][0]), "std_floor_noise": sig(terms["noise"][1]),
                            "std_edge_noise": sig(terms["noise"][2]), "std_scale_holes": sig(terms["holes"][0]),
                            "std_floor_holes": sig(terms["holes"][1]), "std_edge_holes": sig(terms["holes"][2]),
                            "std_blend_noise": sig(terms["noise"][3]), "std_blend_holes": sig(terms["holes"][3]),
                            **per_modality}}

    # 2. measure on the validation volumes (the benchmark's seed 0 and slices)
    print("validation volumes:\n\n" + bench.selection_table(val_vols) + "\n")
    rows = []
    for case in run_split(bench, raw, val_slices, seed=0, samples=args.samples):
        holes = case["regime"] == "holes"
        apply_blend(case, blend_meta)
        cal = calibrate_slice(case["std"], case["image"], meta, holes=holes, modality=case["modality"],
                              restored=case["mean"], disagreement=case["disagreement"])
        sc = bench.uncertainty_scores(case["clean"], case["mean"], case["std"], cal, mask=case["mask"])
        rows.append({k: case[k] for k in ("corruption", "regime", "volume", "modality", "slice")} | sc
                    | {"oracle_spearman": oracle_spearman(case)})
    by_regime = summarize(rows, ["regime"])
    by_corr = summarize(rows, ["corruption"])
    by_vol = summarize(rows, ["regime", "volume"])

    def table(summary, head):
        body = [[k, v["n"], f"{v['unc_err_over_std']:.1f}", f"{100 * v['unc_cover_raw']:.1f} %",
                 f"{100 * v['unc_cover']:.1f} %", f"{v['unc_spearman']:.3f}", f"{v['oracle_spearman']:.3f}"]
                for k, v in summary.items()]
        return bench.markdown_table([head, "slices", "mean abs. error / mean raw std", "within ± 2 std, raw",
                                     "within ± 2 std, calibrated", "Spearman(std, abs. error)",
                                     "oracle Spearman (true local RMS error, 7×7)"], body)

    print("## Held-out coverage (validation volumes, mean over slices)\n")
    print(table(by_regime, "regime") + "\n")
    print(table(by_corr, "corruption") + "\n")
    print(table(by_vol, "regime / volume") + "\n")

    names = lambda vols: ", ".join(v.name.split(".")[0] for v in vols)  # noqa: E731
    calibration = {
        "std_scale_noise": sig(terms["noise"][0]),
        "std_floor_noise": sig(terms["noise"][1]),
        "std_edge_noise": sig(terms["noise"][2]),
        "std_scale_holes": sig(terms["holes"][0]),
        "std_floor_holes": sig(terms["holes"][1]),
        "std_edge_holes": sig(terms["holes"][2]),
        "std_blend_noise": sig(terms["noise"][3]),
        "std_blend_holes": sig(terms["holes"][3]),
        **per_modality,
        "coverage_2std_noise": round(by_regime["noise"]["unc_cover"], 4),
        "coverage_2std_holes": round(by_regime["holes"]["unc_cover"], 4),
        "spearman_noise": round(by_regime["noise"]["unc_spearman"], 4),
        "spearman_holes": round(by_regime["holes"]["unc_spearman"], 4),
        "model": "std = sqrt((std_scale * predictive std)^2 + floor^2 + (std_edge * |gradient of the "
                 "restored slice|)^2 + (std_blend * |network - classical|)^2) in window units; noise: floor = std_floor_noise * the slice's blind noise "
                 "estimate (skimage estimate_sigma); holes: floor = std_floor_holes; a key with a modality "
                 "suffix (_ct, _mr) is that modality's own fit and is used for it",
        "measured_on": (f"fitted (Gaussian likelihood, then widened to a {args.coverage:g} conformal quantile; "
                        f"{args.samples} samples) on "
                        f"{len(cal_slices)} slices of {names(cal_vols)}; coverage and Spearman on "
                        f"{len(val_slices)} held-out slices of {names(val_vols)} "
                        f"(benchmark corruptions, mean over slices)"),
        "target_coverage": args.coverage,
        "samples": args.samples,
        "date": info["date"][:10],
        "weights_sha256": weights_sha256(raw.model.state_dict()),  # the weights it was fitted for
    }
    blend_meta.update({
        "model": "restored = (1 - w) * network + w * classical in window units; classical: non-local means "
                 "(noise), biharmonic inpainting (holes); a key with a modality suffix (_ct, _mr) is that "
                 "modality's own fit",
        "measured_on": (f"least squares on {len(cal_slices)} slices of {names(cal_vols)} "
                        f"(benchmark corruptions; pixels of the regime, at most {args.pixels_per_slice} per slice)"),
        "date": info["date"][:10],
        "weights_sha256": calibration["weights_sha256"],
    })
    print("meta['calibration'] = " + repr(calibration) + "\n")
    print("meta['blend'] = " + repr(blend_meta) + "\n")
    out = bench.write_json({"run": info, "calibration": calibration, "blend": blend_meta, "fit": fit_rows,
                            "validation": {"by_regime": by_regime, "by_corruption": by_corr,
                                           "by_volume": by_vol, "rows": rows}}, args.out)
    print(f"numbers: {out}")
    if args.write:
        path = DEFAULT_WEIGHTS if args.model == "default" else Path(args.model)
        if not path.is_file():
            print(f"calibrate_uncertainty: error: --write needs a checkpoint file, got {args.model}", file=sys.stderr)
            return 2
        update_checkpoint(path, meta={"calibration": calibration, BLEND_KEY: blend_meta})
        print(f"wrote meta['calibration'] and meta['{BLEND_KEY}'] to {path} (weights bit-identical)")
    return 0


if __name__ == "__main__":
    from medvae.errors import MedvaeError

    try:
        sys.exit(main())
    except MedvaeError as exc:  # found while fitting (a model whose samples do not vary): one line
        sys.exit(f"calibrate_uncertainty: error: {exc}")
