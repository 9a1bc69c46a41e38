"""``medvae evaluate RESTORED REFERENCE``: PSNR/SSIM per slice and in summary, review page, MLflow run."""
from __future__ import annotations

import argparse

HELP = "score a restored scan against its reference (PSNR/SSIM per slice), optional review page"

_EPILOG = """\
intensity scaling (always printed and recorded):
  --window C,W|PRESET  clip both scans to the window and scale to [0, 1] (data range 1);
                       presets: brain 40,80  subdural 75,215  lung -600,1500  abdomen 50,400
                       bone 400,1800  ct 0,2000 (-1000..1000 HU)
  --data-range R       raw values, data range R
  neither              CT: the 'ct' window (-1000..1000 HU); MR/other: the reference volume's
                       0.5-99.5 percentiles as the window (scaled to [0, 1], clipped)
SSIM is scikit-image's structural_similarity (7x7 uniform window, sample covariance), the map
averaged over each region; PSNR uses the MSE over the region's pixels.

exit status: 0 done; 2 bad input (one-line error, nothing written);
             3 outputs written, MLflow tracking skipped (server unreachable; one line says why)
"""


def _window_arg(text: str):
    from medvae.evaluate import parse_window  # only when the option is used

    try:
        return parse_window(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = _EPILOG
    p.add_argument("restored", help="restored scan (NIfTI file or DICOM file/folder)")
    p.add_argument("reference", help="reference (clean) scan in the same geometry")
    p.add_argument("--mask", default=None, help="damage mask in the same geometry (nonzero = damaged); adds the 'mask' region")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--window", type=_window_arg, default=None, metavar="CENTER,WIDTH|PRESET",
                       help="intensity window for the metrics (see below)")
    scale.add_argument("--data-range", type=_positive, default=None, metavar="R",
                       help="score raw values with this data range (see below)")
    p.add_argument("--corrupted", default=None, help="the damaged input, scored too as a baseline")
    p.add_argument("--uncertainty", default=None, help="uncertainty map (from medvae restore --samples) for the review page")
    p.add_argument("--report", default=None, metavar="DIR",
                   help="write metrics.csv, summary.json, review figures and index.html here")
    p.add_argument("--title", default=None,
                   help="title of the review page (default: 'medvae evaluation, MODALITY'); never put patient data here")
    p.add_argument("--series", default=None, help="SeriesInstanceUID of the REFERENCE when its folder holds several series")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log an MLflow run")
    p.add_argument("--model-uri", default=None, help="the model that produced RESTORED (recorded as the tag medvae.model_uri)")


def _same_geometry(name: str, scan, path: str, ref, ref_path: str) -> None:
    import numpy as np

    from medvae.errors import MedvaeError

    if tuple(scan.array.shape) != tuple(ref.array.shape):
        raise MedvaeError(f"{name} has shape {tuple(scan.array.shape)} but the reference ({ref_path}) has shape "
                          f"{tuple(ref.array.shape)}", path)
    a, b = np.asarray(scan.affine, dtype=np.float64), np.asarray(ref.affine, dtype=np.float64)
    if not np.allclose(a, b, rtol=0, atol=1e-2):
        diff = float(np.max(np.abs(a - b)))
        raise MedvaeError(f"{name} is not in the reference's geometry ({ref_path}): affines differ by up to "
                          f"{diff:.3g} mm", path)


def _check_finite(name: str, scan, path: str) -> None:
    import numpy as np

    from medvae.errors import MedvaeError

    arr = np.asarray(scan.array)
    bad = int(np.count_nonzero(~np.isfinite(arr))) if np.issubdtype(arr.dtype, np.floating) else 0
    if bad:
        raise MedvaeError(f"{name} contains {bad} NaN or infinite voxel(s)", path)


def format_summary(summary: dict) -> str:
    """The printed table: PSNR and SSIM mean / median / min per source and region."""
    from medvae.report import _fmt

    lines = [f"{'source':<10} {'region':<11} {'PSNR dB mean / median / min':>28}   {'SSIM mean / median / min':>26}  slices"]
    for src, regions in summary["metrics"].items():
        for reg, ms in regions.items():
            p = " / ".join(_fmt(ms["psnr"][s], 2) for s in ("mean", "median", "min"))
            q = " / ".join(_fmt(ms["ssim"][s], 4) for s in ("mean", "median", "min"))
            lines.append(f"{src:<10} {reg:<11} {p:>28}   {q:>26}  {ms['psnr']['n_slices']:>6}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import tempfile
    import time
    from pathlib import Path

    started = time.time()  # the MLflow run starts here, so its duration is the evaluation's

    from medvae import evaluate as E
    from medvae.io import load_scan

    ref = load_scan(args.reference, series=args.series)
    rest = load_scan(args.restored)
    _same_geometry("restored", rest, args.restored, ref, args.reference)
    extra = {}
    for name in ("mask", "corrupted", "uncertainty"):
        path = getattr(args, name)
        if path:
            scan = load_scan(path)
            _same_geometry(name, scan, path, ref, args.reference)
            extra[name] = scan
    for name, scan, path in [("reference", ref, args.reference), ("restored", rest, args.restored),
                             *[(n, s, getattr(args, n)) for n, s in extra.items()]]:
        _check_finite(name, scan, path)

    modality = (ref.modality or "").upper() or None
    units = "HU" if modality == "CT" else ""
    if args.window is not None:
        window, data_range, source = args.window, None, "--window"
    elif args.data_range is not None:
        window, data_range, source = None, args.data_range, "--data-range"
    else:
        d = E.default_scaling(ref.array, modality)
        window, data_range, source = d["window"], None, d["source"]

    ev = E.evaluate_volumes(
        rest.array, ref.array, data_range=data_range, window=window,
        mask=extra["mask"].array if "mask" in extra else None,
        corrupted=extra["corrupted"].array if "corrupted" in extra else None, modality=modality,
    )
    ev.summary["scaling"]["source"] = source
    usfx = f" {units}" if units else ""
    shape = "x".join(str(v) for v in ev.summary["shape"])
    if window is not None:
        scaling_txt = f"window {window[0]:g}..{window[1]:g}{usfx}, clipped and scaled to [0, 1], data range 1"
    else:
        scaling_txt = f"raw values, data range {data_range:g}{usfx}"
    print(f"medvae evaluate: {ev.summary['n_slices']} slices ({shape}), modality {modality or 'unknown'}")
    note = "" if source.startswith("--") else "; set --window or --data-range to change"
    print(f"intensity: {scaling_txt} ({source}{note})")
    print(f"SSIM: {E.SSIM_DEFINITION}")
    print(format_summary(ev.summary))

    display = window if window is not None else (E.default_scaling(ref.array, modality)["window"])
    title = args.title or f"medvae evaluation, {modality or 'scan'}"

    def report(folder: Path) -> dict:
        from medvae.report import write_report

        return write_report(
            folder, evaluation=ev, restored=rest.array, reference=ref.array,
            corrupted=extra["corrupted"].array if "corrupted" in extra else None,
            uncertainty=extra["uncertainty"].array if "uncertainty" in extra else None,
            mask=extra["mask"].array if "mask" in extra else None,
            window=display, title=title, model_uri=args.model_uri, affine=ref.affine, units=units,
        )

    paths = None
    if args.report:
        paths = report(Path(args.report))
        print(f"report: {paths['index_html']} (+ metrics.csv, summary.json, "
              f"{len([k for k in paths if k.startswith('figure_')])} figures)")

    if not args.no_mlflow:
        import sys

        from medvae.tracking import EXIT_TRACKING_SKIPPED, TrackingUnavailable

        try:
            with tempfile.TemporaryDirectory(prefix="medvae-eval-") as tmp:
                if paths is None:
                    paths = report(Path(tmp))
                run_id, uri = _log_mlflow(args, ev, list(paths.values()), source=source, modality=modality,
                                          start_time=started)
        except TrackingUnavailable as exc:  # the local outputs are written: say so in one line
            print(f"medvae evaluate: {exc}", file=sys.stderr)
            return EXIT_TRACKING_SKIPPED
        print(f"mlflow: run {run_id} in experiment 'evaluation' ({uri})")
    return 0


def _log_mlflow(args, ev, files, *, source: str, modality: str | None,
                start_time: float | None = None) -> tuple[str, str]:
    import mlflow

    from medvae import evaluate as E
    from medvae import tracking

    s = ev.summary
    sc = s["scaling"]
    params = {
        "scaling": "window" if sc["window"] is not None else "data_range",
        "scaling_source": source,
        "ssim_definition": E.SSIM_DEFINITION,
        "psnr_definition": E.PSNR_DEFINITION,
        "n_slices": s["n_slices"],
        "shape": "x".join(str(v) for v in s["shape"]),
        "modality": modality or "unknown",
        "regions": ",".join(s["regions"]),
        "sources": ",".join(s["sources"]),
        "has_mask": bool(args.mask),
        "has_uncertainty": bool(args.uncertainty),
    }
    if sc["window"] is not None:
        params["window_lo"], params["window_hi"] = sc["window"]
    else:
        params["data_range"] = sc["data_range"]
    tags = {"medvae.command": "evaluate"}
    if args.model_uri:
        tags["medvae.model_uri"] = args.model_uri
    run_name = tracking.safe_name(f"evaluate_{(modality or 'scan').lower()}")
    with tracking.start_run("evaluation", tracking_uri=args.tracking_uri, run_name=run_name, tags=tags,
                            start_time=start_time) as run:
        mlflow.log_params(params)
        mlflow.log_metrics(ev.flat_metrics("mean"))
        # only the files write_report wrote, all named by medvae (metrics.csv, summary.json,
        # slice_KKK_worst.png, ..., index.html), never anything else from the user's folder
        for p in files:
            if p.name == tracking.safe_name(p.name):
                mlflow.log_artifact(str(p), artifact_path="report")
        return run.info.run_id, tracking.resolve_tracking_uri(args.tracking_uri)
