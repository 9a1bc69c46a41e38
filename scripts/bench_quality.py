#!/usr/bin/env python
"""Restoration quality: medvae against classical denoisers and inpainters on the same slices.

    python scripts/bench_quality.py [--split validation|config] [--data DIR] [--model M] [--max-slices N]
                                    [--seed S] [--samples N] [--out results.json] [--skip-bm3d]
                                    [--only NAME,...]

Data: the validation split (``benchmarks.common.VALIDATION_SPLIT``: four MR subjects from four packages
and five CT scans, none in the shipped model's training data, disjoint by subject from the volumes its
uncertainty is calibrated on), or ``--split config`` (``data.val_paths`` of ``--config``), or every scan
in ``--data DIR``. Slices with >= 10 % foreground and an in-plane size >= 64, at most
``--max-slices`` per volume (evenly spread). Everything runs in protocol window units (CT
−1000..1000 HU, MR the volume's 0.5–99.5 percentiles → [0, 1]): each slice is corrupted once per
corruption with a seed derived from (--seed, corruption, volume, slice), and the input, medvae and
every baseline are scored on that same corrupted slice: PSNR and SSIM (clipped to [0, 1], data
range 1, scikit-image's definitions) over the whole slice, plus PSNR over the mask for the mask
corruptions. CT slices are also scored in a soft-tissue (C 40, W 400) and a brain window (C 40, W 80).
medvae restores noise without a mask (every pixel) and holes with the mask, as ``restore_volume`` does
(with the checkpoint's blend with the classical restoration, when it has one; the row ``medvae_net`` is
then the network alone). The baselines are blind
(noise level from ``estimate_sigma``). medvae's uncertainty map (``--samples`` posterior samples, as
``restore_volume`` returns it) is scored against |error|: Spearman, and the share of pixels within
± 2 std before and after the checkpoint's calibration (every pixel for noise, the mask for holes).
The protocol is in docs/benchmarks.md and benchmarks/common.py.

Prints per corruption a method table, a per-volume table, the CT windows and the uncertainty, then
"medvae minus the best baseline" with the targets (PASS/MISS) and the per-volume floors, and writes
every per-slice number to ``--out`` (JSON).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "runs" / "bench" / "quality.json"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--split", default="validation", choices=["validation", "config"],
                    help="validation: the benchmark's validation split (default); config: data.val_paths of --config")
    ap.add_argument("--data", default=None, help="folder of scans (instead of --split)")
    ap.add_argument("--config", default="default",
                    help="training config: its training data must not be scored; with --split config its "
                         "data.val_paths are (default: the shipped config 'default')")
    ap.add_argument("--model", default="default", help="default | PATH.pt | runs:/ID/model | models:/NAME/V")
    ap.add_argument("--max-slices", type=int, default=4, help="slices per volume, evenly spread (default 4)")
    ap.add_argument("--samples", type=int, default=8,
                    help="posterior samples for the uncertainty scores (default 8, as medvae restore; 0: none)")
    ap.add_argument("--seed", type=int, default=0, help="base seed of the corruptions (default 0)")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help=f"JSON with all numbers (default {DEFAULT_OUT})")
    ap.add_argument("--skip-bm3d", action="store_true", help="leave BM3D out (about 3 s per 200² slice)")
    ap.add_argument("--only", default=None, help="comma-separated corruption names (default: all)")
    ap.add_argument("--batch-size", type=int, default=8, help="medvae slices per forward pass (default 8)")
    ap.add_argument("--device", default="auto", help="medvae device: auto, cpu, cuda")
    args = ap.parse_args(argv)
    if args.max_slices < 1:
        ap.error("--max-slices must be >= 1")
    from benchmarks.common import check_json_output

    check_json_output(args.out)  # before the work: an unwritable --out lost the run's numbers after it
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import numpy as np

    from benchmarks import common as bench
    from medvae.baselines import DENOISERS, INPAINTERS
    from medvae.blend import BLEND_KEY, blend_weight, classical_estimate
    from medvae.errors import MedvaeError
    from medvae.models.calibration import calibrate_slice, calibration_terms
    from medvae.restore import DEFAULT_ENSEMBLE
    from medvae.models.checkpoint import load_model, require_slice_restorer
    from medvae.runtime import pick_device, tune_allocator

    tune_allocator()  # as the medvae CLI does
    specs = list(bench.CORRUPTIONS)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        unknown = sorted(set(wanted) - set(bench.CORRUPTION_BY_NAME))
        if unknown:
            print(f"bench_quality: error: unknown corruption(s) {unknown}; choose from "
                  f"{', '.join(bench.CORRUPTION_BY_NAME)}", file=sys.stderr)
            return 2
        specs = [s for s in specs if s.name in wanted]

    try:
        device = pick_device(args.device)
        lm = require_slice_restorer(load_model(args.model, device=device))
        if args.data:
            paths = bench.scans_in_dir(args.data)
        elif args.split == "config":
            paths = bench.default_data_paths(args.config)
        else:
            bench.check_unseen(bench.VALIDATION_SPLIT, args.config)
            paths = bench.split_items(bench.VALIDATION_SPLIT)
        volumes, slices = bench.load_bench_data(paths, max_slices=args.max_slices)
    except MedvaeError as exc:
        print(f"bench_quality: error: {exc}", file=sys.stderr)
        return 2

    info = bench.run_info(None if argv is None else ["scripts/bench_quality.py", *map(str, argv)])
    minfo = bench.model_info(lm)
    print("# medvae restoration quality\n")
    print("\n".join(bench.header_lines(info, minfo)))
    data_words = ("every scan in " + str(args.data) if args.data else
                  "data.val_paths of " + str(args.config) if args.split == "config" else
                  "the validation split (benchmarks.common.VALIDATION_SPLIT)")
    print(f"data:     {data_words} ({len(volumes)} volume(s)), max {args.max_slices} slices per volume, "
          f"seed {args.seed}")
    print(f"metrics:  window units clipped to [0, 1], data range 1; PSNR/SSIM over the whole slice, "
          f"PSNR mask over the damaged pixels; CT also in the windows "
          f"{', '.join(f'{k} (C {c:g}, W {w:g})' for k, (c, w) in bench.CT_READING_WINDOWS.items())}; "
          f"medvae on {device}, batch {args.batch_size}, flip ensemble {DEFAULT_ENSEMBLE} (restore_volume's default)")
    terms = {"noise": calibration_terms(lm.meta, holes=False), "mask": calibration_terms(lm.meta, holes=True)}
    cal_words = (f"noise: scale {terms['noise'][0]:.4g}, floor {terms['noise'][1]:.4g} x the slice's noise "
                 f"estimate, edge {terms['noise'][2]:.4g}; holes: scale {terms['mask'][0]:.4g}, floor "
                 f"{terms['mask'][1]:.4g}, edge {terms['mask'][2]:.4g}; blend: noise {terms['noise'][3]:.4g}, "
                 f"holes {terms['mask'][3]:.4g} (regime fits; per-modality fits apply "
                 "where the checkpoint has them)"
                 if lm.meta.get("calibration") else "none")
    print(f"uncertainty: {args.samples} posterior samples (seed 0); calibration in the checkpoint: {cal_words}")
    blend_words = ", ".join(f"{k} {v:g}" for k, v in (lm.meta.get(BLEND_KEY) or {}).items()
                           if k.startswith("weight_") and isinstance(v, (int, float)))
    print(f"blend with the classical restoration (medvae.blend): {blend_words or 'none (the network alone)'}"
          + ("; row medvae_net: the network alone (--no-blend)" if blend_words else "") + "\n")
    print(bench.selection_table(volumes) + "\n")
    if not slices:
        print("bench_quality: error: no slice passes the selection rules (in-plane >= 64, >= 10 % foreground)",
              file=sys.stderr)
        return 2
    warn = bench.scaling_mismatch(lm)
    if warn:
        print(f"warning: {warn}\n")

    # baselines that can run here
    skipped: dict[str, str] = {}
    denoisers = dict(DENOISERS)
    inpainters = dict(INPAINTERS)
    if args.skip_bm3d:
        skipped["bm3d"] = "--skip-bm3d"
    elif importlib.util.find_spec("bm3d") is None:
        skipped["bm3d"] = "package bm3d not installed (pip install 'medvae-restore[bench]')"
    if importlib.util.find_spec("cv2") is None:
        skipped["telea"] = "package opencv-python-headless not installed (pip install 'medvae-restore[bench]')"
    for name in skipped:
        denoisers.pop(name, None)
        inpainters.pop(name, None)
    for name, why in skipped.items():
        print(f"note: {name} skipped: {why}")
    if skipped:
        print()

    unit_model = bench.in_window_units(lm)
    raw_model = bench.uncalibrated(unit_model)
    by_volume: dict[str, list[int]] = {}
    for i, s in enumerate(slices):
        by_volume.setdefault(s.volume, []).append(i)
    # warm-up (not timed): one restoration per slice shape
    for idx in by_volume.values():
        s = slices[idx[0]]
        bench.restore_slices(unit_model, [s.clean], modality=s.modality, batch_size=1)

    rows: list[dict] = []
    for spec in specs:
        todo = [i for i, s in enumerate(slices) if spec.applies_to(s.modality)]
        print(f"## {spec.name}: {spec.label}\n")
        if not todo:
            print(f"no {'/'.join(spec.modalities or ())} slice in the data: not run\n")
            continue
        t0 = time.perf_counter()
        seeds, images, masks = {}, {}, {}
        for i in todo:
            s = slices[i]
            seeds[i] = bench.case_seed(args.seed, spec.name, s.volume, s.index)
            images[i], masks[i] = bench.corrupt_slice(spec, s.clean, seeds[i])
        _log(f"{spec.name}: {len(todo)} slice(s) corrupted in {time.perf_counter() - t0:.1f} s")
        use_mask = spec.kind == "mask"
        outputs: dict[str, dict[int, tuple]] = {"input": {i: (images[i], float("nan")) for i in todo}}

        # medvae, batched per volume (slices of one volume share a shape)
        outputs["medvae"] = {}
        unc: dict[int, dict[str, float]] = {}
        for vol, idx in by_volume.items():
            idx = [i for i in idx if i in images]
            if not idx:
                continue
            t = time.perf_counter()
            res = bench.restore_slices(unit_model, [images[i] for i in idx],
                                       [masks[i] for i in idx] if use_mask else None,
                                       modality=slices[idx[0]].modality, batch_size=args.batch_size)
            per = (time.perf_counter() - t) / len(idx)
            for i, r in zip(idx, res):
                outputs["medvae"][i] = (r, per)
            if blend_weight(lm.meta, holes=use_mask, modality=slices[idx[0]].modality) > 0:
                # the network alone too, so the blend's share stays visible
                t = time.perf_counter()
                res = bench.restore_slices(unit_model, [images[i] for i in idx],
                                           [masks[i] for i in idx] if use_mask else None,
                                           modality=slices[idx[0]].modality, batch_size=args.batch_size,
                                           blend=False)
                per = (time.perf_counter() - t) / len(idx)
                for i, r in zip(idx, res):
                    outputs.setdefault("medvae_net", {})[i] = (r, per)
            if args.samples:  # the uncertainty map (not timed); its posterior mean is the restoration above
                kw = dict(modality=slices[idx[0]].modality, samples=args.samples, batch_size=args.batch_size)
                hole_masks = [masks[i] for i in idx] if use_mask else None
                _, raw = bench.restore_slices_std(raw_model, [images[i] for i in idx], hole_masks, blend=False, **kw)
                for i, sd in zip(idx, raw):  # calibrated as restore_volume does it
                    dis = None  # the blend term's |network - classical|, where the restoration is blended
                    if i in outputs.get("medvae_net", {}) and blend_weight(lm.meta, holes=use_mask,
                                                                           modality=slices[i].modality) > 0:
                        dis = np.abs(outputs["medvae_net"][i][0]
                                     - classical_estimate(images[i], masks[i] if use_mask else None))
                    sc = calibrate_slice(sd, images[i], lm.meta, holes=use_mask, modality=slices[i].modality,
                                         restored=outputs["medvae"][i][0], disagreement=dis)
                    unc[i] = bench.uncertainty_scores(slices[i].clean, outputs["medvae"][i][0], sd, sc,
                                                      mask=masks[i] if use_mask else None)
        _log(f"{spec.name}: medvae done")

        methods = inpainters if use_mask else denoisers
        for name, fn in methods.items():
            outputs[name] = {}
            for n, i in enumerate(todo, 1):
                t = time.perf_counter()
                out = fn(images[i], masks[i]) if use_mask else fn(images[i])
                outputs[name][i] = (out, time.perf_counter() - t)
                if name == "bm3d" or n == len(todo):
                    _log(f"{spec.name}: {name} {n}/{len(todo)}")

        for name, res in outputs.items():
            for i, (out, sec) in res.items():
                s = slices[i]
                m = bench.score(s.clean, out, masks[i] if use_mask else None)
                if s.modality == "CT":
                    m.update(bench.score_ct_windows(s.clean, out, masks[i] if use_mask else None))
                if name == "medvae":
                    m.update(unc.get(i, {}))
                rows.append({"corruption": spec.name, "method": name, "volume": s.volume, "modality": s.modality,
                             "slice": s.index, "seed": seeds[i], "mask_fraction": float(masks[i].mean()),
                             "psnr_mask": float("nan"), **m, "seconds": sec})
        summary = bench.summarize([r for r in rows if r["corruption"] == spec.name])[spec.name]
        mods = ", ".join(f"{k} {v['n']}" for k, v in summary["input"]["by_modality"].items())
        print(f"{len(todo)} slices ({mods}); mean over slices\n")
        print(bench.method_table(summary, mask_metric=use_mask) + "\n")
        metric = "psnr_mask" if use_mask else "psnr"
        table, _ = bench.volume_table(summary, metric=metric, floor=bench.FLOOR_BASELINE[spec.kind])
        print(f"Per volume ({'mask PSNR' if use_mask else 'PSNR'}, dB, mean over the volume's slices):\n")
        print(table + "\n")
        wt = bench.window_table(summary, mask_metric=use_mask)
        if wt:
            print(f"CT reading windows ({'mask PSNR' if use_mask else 'PSNR'}, dB; SSIM over the slice):\n")
            print(wt + "\n")
        ut = bench.uncertainty_table(summary)
        if ut:
            print(f"Uncertainty ({'inside the mask' if use_mask else 'every pixel'}; calibrated: "
                  f"sqrt((scale std)^2 + floor^2 + (edge |grad restored|)^2) with the checkpoint's terms above):\n")
            print(ut + "\n")

    summary = bench.summarize(rows)
    gaps = bench.gap_rows(summary)
    print("## medvae minus the best baseline\n")
    print("Δ vs best: medvae − the best baseline on the corruption's metric (PSNR; mask PSNR for holes). "
          "Result: margin over the target (>= 0 passes).\n")
    print(bench.gap_table(gaps) + "\n")
    floors = []
    for spec in specs:
        if spec.name not in summary:
            continue
        _, vrows = bench.volume_table(summary[spec.name], metric="psnr_mask" if spec.kind == "mask" else "psnr",
                                      floor=bench.FLOOR_BASELINE[spec.kind])
        below = [r for r in vrows if bench._fin(r["delta_floor"]) and r["delta_floor"] < 0]
        worst = min((r for r in vrows if bench._fin(r["delta_floor"])), key=lambda r: r["delta_floor"], default=None)
        floors.append([spec.name, bench.FLOOR_BASELINE[spec.kind], f"{len(vrows) - len(below)}/{len(vrows)}",
                       ", ".join(f"{r['volume']} ({r['delta_floor']:+.2f})" for r in below) or "none",
                       f"{worst['volume']} {worst['delta_floor']:+.2f}" if worst else "—"])
    print("## Per-volume floor: medvae never below NL-means (noise) or biharmonic (holes) on any volume\n")
    print(bench.markdown_table(["corruption", "floor", "volumes at or above", "volumes below (dB)",
                                "worst volume (dB)"], floors) + "\n")

    out = bench.write_json({
        "run": info, "model": minfo,
        "protocol": {"data": data_words, "samples": args.samples,
                     "ct_reading_windows": dict(bench.CT_READING_WINDOWS),
                     "calibration": lm.meta.get("calibration"),
                     "max_slices_per_volume": args.max_slices, "seed": args.seed,
                     "min_foreground": bench.MIN_FOREGROUND, "min_size": bench.MIN_SIZE,
                     "window": {"CT": list(bench.PROTOCOL.ct_window),
                                "MR_percentiles": list(bench.PROTOCOL.mr_percentiles)},
                     "metric_window": list(bench.METRIC_WINDOW), "data_range": 1.0,
                     "corruptions": {s.name: {"label": s.label, "kind": s.kind,
                                              "modalities": list(s.modalities) if s.modalities else None,
                                              "params": dict(s.params)} for s in specs},
                     "targets": {k: t.describe() for k, t in bench.TARGETS.items()},
                     "skipped": skipped, "device": str(device), "batch_size": args.batch_size},
        "volumes": [vars(v) for v in volumes],
        "rows": rows, "summary": summary, "gaps": gaps,
    }, args.out)
    print(f"per-slice numbers: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
