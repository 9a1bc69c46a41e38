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

--report DIR is claimed before anything is read and appears complete or not at all; it must not
be, hold or lie inside an input, and --overwrite replaces only a report medvae wrote there.

exit status: 0 done; 2 bad input (one-line error, nothing written);
             3 outputs written, MLflow tracking skipped (server unreachable; one line says why)
"""


def _window_arg(text: str):
    from medvae.evaluate import parse_window  # only when the option is used

    try:
        return parse_window(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _data_range(text: str) -> float:
    from medvae.evaluate import check_data_range

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    try:
        return check_data_range(v)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = _EPILOG
    p.add_argument("restored", help="restored scan (NIfTI file or DICOM file/folder)")
    p.add_argument("reference", help="reference (clean) scan in the same geometry")
    p.add_argument("--mask", default=None, help="damage mask in the same geometry (0 = known, 1 or one positive value = damaged); adds the 'mask' region")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--window", type=_window_arg, default=None, metavar="CENTER,WIDTH|PRESET",
                       help="intensity window for the metrics (see below)")
    scale.add_argument("--data-range", type=_data_range, default=None, metavar="R",
                       help="score raw values with this data range (see below)")
    p.add_argument("--corrupted", default=None, help="the damaged input, scored too")
    p.add_argument("--baseline", default=None, metavar="PATH",
                   help="another restoration of the same input (e.g. NL-means), scored and shown beside RESTORED")
    p.add_argument("--baseline-name", default=None, metavar="NAME",
                   help="what the baseline is, for the review page (e.g. NL-means; not sent to MLflow as a "
                        "param); never put patient data here")
    p.add_argument("--uncertainty", default=None, help="uncertainty map (from medvae restore --samples) for the review page")
    p.add_argument("--report", default=None, metavar="DIR",
                   help="write metrics.csv, summary.json, review figures and index.html into this new folder "
                        "(claimed first, written atomically; never an input's folder)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a report that an earlier medvae run wrote in DIR (anything else is refused)")
    p.add_argument("--title", default=None,
                   help="title of the review page (default: 'medvae evaluation, MODALITY'); never put patient data here")
    p.add_argument("--series", default=None, metavar="UID",
                   help="SeriesInstanceUID to read from every DICOM folder (RESTORED, REFERENCE, ...) that holds "
                        "it, when a folder holds several series; a folder without it must hold one series")
    p.add_argument("--modality", type=str.upper, choices=("CT", "MR"), default=None,
                   help="the reference's modality, which picks the default scaling (default: the DICOM "
                        "Modality; guessed from the values for NIfTI, and the guess is reported)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log an MLflow run")
    p.add_argument("--model-uri", default=None,
                   help="the model that produced RESTORED, recorded as the tag medvae.model_uri: an MLflow URI or "
                        "'default' as given (models:/NAME/latest and @ALIAS as the version they name now), a "
                        "local file as its sha256 (never its path); with --uncertainty "
                        "the review page quotes its measured calibration (without it: 'unknown')")


def format_summary(summary: dict) -> str:
    """The printed table: PSNR and SSIM mean / median / min per source and region, the number of
    slices scored (each region's common slice set) and of those left out (a source identical to the
    reference there / the region empty there)."""
    from medvae.report import _fmt

    lines = [f"{'source':<10} {'region':<11} {'PSNR dB mean / median / min':>28}   {'SSIM mean / median / min':>26}"
             f"  slices  left out (identical / empty)"]
    for src, regions in summary["metrics"].items():
        for reg, ms in regions.items():
            p = " / ".join(_fmt(ms["psnr"][s], 2) for s in ("mean", "median", "min"))
            q = " / ".join(_fmt(ms["ssim"][s], 4) for s in ("mean", "median", "min"))
            out = f"{ms['psnr'].get('n_left_out_identical', 0)} / {ms['psnr'].get('n_left_out_empty', 0)}"
            lines.append(f"{src:<10} {reg:<11} {p:>28}   {q:>26}  {ms['psnr']['n_slices']:>6}  {out:>9}")
    return "\n".join(lines)


def _model_meta(args) -> dict | None:
    """The checkpoint metadata of --model-uri (for the uncertainty's calibration), read by
    :func:`_check_model`; None when unreadable (the page then calls the calibration unknown)."""
    return getattr(args, "_meta", None) if args.model_uri and args.uncertainty else None


def _check_model(args) -> None:
    """``--model-uri`` as the version it names now (``latest`` or an alias moves), with --no-mlflow too:
    the review page records it; then read it before any work: a model that does not exist (a mistyped
    run id, a deleted version) was recorded as the restoration's maker. A store that cannot be reached
    skips the check."""
    import sys

    from medvae import tracking
    from medvae.errors import MedvaeError
    from medvae.models.checkpoint import require_slice_restorer

    pinned = tracking.pin_model_uri(args.model_uri, tracking_uri=args.tracking_uri)
    if pinned != args.model_uri:
        print(f"medvae evaluate: note: --model-uri {args.model_uri} names {pinned} now; recorded as "
              f"{pinned} (pass the version that restored RESTORED if it was another)", file=sys.stderr)
        args.model_uri = pinned
    args._meta = None
    if tracking.is_model_uri(args.model_uri):
        try:
            tracking.check_server(tracking.resolve_tracking_uri(args.tracking_uri))
        except tracking.TrackingUnavailable as exc:
            if args.uncertainty:
                print(f"medvae evaluate: note: cannot read the model's metadata ({exc}); the review page will "
                      "call its uncertainty's calibration unknown", file=sys.stderr)
            return
    try:  # a model restore refuses (3-D, multi-channel) cannot have made the restoration either
        lm = require_slice_restorer(tracking.load_model(args.model_uri, tracking_uri=args.tracking_uri))
        args._meta = dict(lm.meta)
    except tracking.ModelUnavailable as exc:  # the store failed the download: as unreachable, not a wrong model
        print(f"medvae evaluate: note: cannot check --model-uri: {exc.message}"
              + ("; the review page will call its uncertainty's calibration unknown" if args.uncertainty else ""),
              file=sys.stderr)
    except MedvaeError as exc:
        raise MedvaeError(f"--model-uri {args.model_uri}: {exc.message}", exc.path) from None


def run(args: argparse.Namespace) -> int:
    import contextlib
    import time

    started = time.time()  # the MLflow run starts here, so its duration is the evaluation's
    if not args.no_mlflow:  # a mistyped store is refused before the scans are scored
        from medvae import tracking

        tracking.check_uri(tracking.resolve_tracking_uri(args.tracking_uri))
    if args.model_uri:
        _check_model(args)
    with contextlib.ExitStack() as claims:
        if args.report:  # claimed before any work: refused at once, never after minutes of scoring
            from medvae.report import claim_report

            claims.enter_context(claim_report(args.report, overwrite=args.overwrite, inputs={
                "restored": args.restored, "reference": args.reference, "mask": args.mask,
                "corrupted": args.corrupted, "baseline": args.baseline, "uncertainty": args.uncertainty}))
        from medvae.runtime import commit_ends_the_command

        with commit_ends_the_command():  # a signal after the commit keeps the outputs (medvae.runtime.LateSignal)
            return _run(args, started)


def _run(args: argparse.Namespace, started: float) -> int:
    import contextlib
    import tempfile
    from pathlib import Path

    from medvae import evaluate as E

    res = E.evaluate_scans(args.restored, args.reference, mask=args.mask, corrupted=args.corrupted,
                           baseline=args.baseline, uncertainty=args.uncertainty, window=args.window,
                           data_range=args.data_range, series=args.series, modality=args.modality,
                           show_progress=True)
    ev = res.evaluation
    shape = "x".join(str(v) for v in ev.summary["shape"])
    how = f" ({res.modality_guess}; pass --modality to override)" if res.modality_guess else ""
    print(f"medvae evaluate: {ev.summary['n_slices']} slices ({shape}), modality {res.modality or 'unknown'}{how}")
    note = "" if res.scaling_source.startswith("--") else "; set --window or --data-range to change"
    print(f"intensity: {res.scaling_text} ({res.scaling_source}{note})")
    print(f"SSIM: {E.SSIM_DEFINITION}")
    print(format_summary(ev.summary))
    identical = ev.summary["metrics"]["restored"]["image"]["psnr"].get("n_left_out_identical", 0)
    if identical:
        print(f"{identical} slice(s) where a source is identical to the reference (infinite PSNR): left out of "
              "every source's statistics")
    headline = E.headline_region(ev.summary)
    print(f"headline: restored PSNR in the {headline} region")
    mask_stats = ev.summary["metrics"]["restored"].get("mask")
    if headline == "mask" and mask_stats is not None and mask_stats["psnr"]["n_slices"] == 0:
        import sys

        print(f"medvae evaluate: note: the mask region has no slice to summarize ({args.mask}: no damaged "
              "voxel at least 3 px from a slice border, or only identical slices), so the headline has no value; "
              "check that --mask is this case's damage mask", file=sys.stderr)
    title = args.title or f"medvae evaluation, {res.modality or 'scan'}"
    meta = _model_meta(args)

    def report(folder: Path, run_id: str | None = None) -> dict:
        from medvae.io.formats import scan_slice_positions
        from medvae.report import write_report

        return write_report(
            folder, evaluation=ev, restored=res.array("restored"), reference=res.array("reference"),
            corrupted=res.array("corrupted"), baseline=res.array("baseline"), uncertainty=res.array("uncertainty"),
            mask=res.array("mask"), window=res.display_window, title=title, baseline_name=args.baseline_name,
            model_uri=args.model_uri, model_meta=meta, run_id=run_id, affine=res.scans["reference"].affine_mm,
            slice_positions=scan_slice_positions(res.scans["reference"]),
            units=res.units, overwrite=args.overwrite)

    def done(paths: dict) -> None:
        if args.report:
            print(f"report: {paths['index_html']} (+ metrics.csv, summary.json, "
                  f"{len([k for k in paths if k.startswith('figure_')])} figures)")

    from medvae.runtime import hold_after_commit

    if args.no_mlflow:
        if args.report:
            paths = report(Path(args.report))
            hold_after_commit()  # committed: a later Ctrl-C keeps it
            done(paths)
        return 0

    import sys

    from medvae.tracking import EXIT_TRACKING_SKIPPED, TrackingUnavailable

    from medvae.errors import MedvaeError, os_reason
    from medvae.io.atomic import all_or_none
    from medvae.tracking import redact, resolve_tracking_uri

    try:
        # the report is written inside its run (the page names the run id): when the logging then fails
        # or is interrupted, the report goes too (or the one it replaced comes back), never a page whose
        # run holds no metrics.csv to import its sign-off against
        with tempfile.TemporaryDirectory(prefix="medvae-eval-") as tmp, \
                (all_or_none(Path(args.report)) if args.report else contextlib.nullcontext()):
            folder = Path(args.report) if args.report else Path(tmp) / "report"

            report_failed = False

            def write(run_id: str) -> list:
                nonlocal report_failed
                try:
                    paths = report(folder, run_id)
                except OSError:
                    report_failed = True  # the report's own disk: named as the report, not the store
                    raise
                written.update(paths)
                return list(paths.values())

            written: dict = {}
            try:
                run_id, uri = _log_mlflow(args, res, write, start_time=started)
            except OSError as exc:  # a full store: name it, not the report folder
                if report_failed:
                    raise
                why = f"cannot write {exc.filename}: {os_reason(exc)}" if exc.filename else os_reason(exc)
                raise MedvaeError(f"the MLflow store could not record the run ({why}); "
                                  f"{'the report was not kept' if args.report else 'nothing was logged'}",
                                  redact(resolve_tracking_uri(args.tracking_uri))) from None
    except TrackingUnavailable as exc:  # the local outputs are written without a run: say so in one line
        if args.report:
            paths = report(Path(args.report))
            hold_after_commit()  # committed: a later Ctrl-C keeps it
            done(paths)
        print(f"medvae evaluate: {exc}", file=sys.stderr)
        return EXIT_TRACKING_SKIPPED
    done(written)  # said once the run holds it: a report whose logging fails is not kept
    print(f"mlflow: run {run_id} in experiment 'evaluation' ({uri})")
    return 0


def _log_mlflow(args, res, write_files, *, start_time: float | None = None) -> tuple[str, str]:
    """Open the evaluation's run, write the report into it (so the page knows its run id), log it."""
    from medvae import evaluate as E
    from medvae import tracking
    from medvae.runtime import hold_after_commit

    ev, modality = res.evaluation, res.modality
    s = ev.summary
    sc = s["scaling"]
    params = {
        "scaling": "window" if sc["window"] is not None else "data_range",
        "scaling_source": res.scaling_source,
        "ssim_definition": E.SSIM_DEFINITION,
        "psnr_definition": E.PSNR_DEFINITION,
        "n_slices": s["n_slices"],
        "shape": "x".join(str(v) for v in s["shape"]),
        "modality": modality or "unknown",
        "regions": ",".join(s["regions"]),
        "sources": ",".join(s["sources"]),
        "headline_metric": f"psnr_{E.headline_region(s)}",
        "has_mask": bool(args.mask),
        "has_uncertainty": bool(args.uncertainty),
        "has_baseline": bool(args.baseline),  # not its name: free text, which could name a patient
    }
    if sc["window"] is not None:
        params["window_lo"], params["window_hi"] = sc["window"]
    else:
        params["data_range"] = sc["data_range"]
    tags = {"medvae.command": "evaluate"}
    if args.model_uri:  # a local path can name the patient: logged as the file's digest
        from medvae.models.label import model_label

        tags["medvae.model_uri"] = model_label(args.model_uri)
    run_name = tracking.safe_name(f"evaluate_{(modality or 'scan').lower()}")
    with tracking.start_run("evaluation", tracking_uri=args.tracking_uri, run_name=run_name, tags=tags,
                            start_time=start_time) as run:
        files = write_files(run.info.run_id)
        tracking.log_params(params)
        tracking.log_metrics(ev.flat_metrics(stat="mean"))
        # only the files write_report wrote, all named by medvae (metrics.csv, summary.json,
        # slice_KKK_worst.png, ..., index.html), never anything else from the user's folder;
        # PNG and HTML artifacts preview in the MLflow UI
        for p in files:
            if p.name == tracking.safe_name(p.name):
                tracking.log_artifact(p, artifact_path="report")
        # all is logged: a signal while the run is ended and the report committed keeps both (it left a
        # FINISHED run holding the report, and the report rolled back)
        hold_after_commit()
        return run.info.run_id, tracking.redact(tracking.resolve_tracking_uri(args.tracking_uri))
