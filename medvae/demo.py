"""The README's main job: sample scans → corrupt → restore → evaluate (next to a classical baseline)
→ review pages → MLflow.

Everything runs on the sample set that :func:`medvae.io.samples.build_samples` builds from pip
packages, with no network. The CT sample's slices are held out from the default model's training
(validation volumes of ``configs/default.yaml``), and so is the MR volume. Each step is a library
call a user would make: :func:`medvae.corruption.corrupt_scan`, :func:`medvae.restore.restore_scan`,
a classical baseline (:mod:`medvae.baselines`), :func:`medvae.evaluate.evaluate_scans` and
:func:`medvae.report.write_report`. This module prints nothing; ``medvae demo`` does.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

#: (case name, sample key, recipe, kind) - kind "noise" is restored without a mask and compared
#: with NL-means; kind "mask" is restored inside the mask and compared with biharmonic inpainting.
CASES = (
    ("ct_lowdose", "ct_series", "lowdose_ct", "noise"),
    ("ct_boxes", "ct_series", "boxes", "mask"),
    ("mr_rician", "mr", "rician", "noise"),
    ("mr_strokes", "mr", "strokes", "mask"),
)
BASELINES = {"noise": "NL-means", "mask": "biharmonic"}


@dataclass
class CaseResult:
    name: str
    modality: str
    recipe: str
    kind: str
    baseline: str
    region: str
    scores: dict[str, tuple[float, float]]  # input / baseline / medvae -> (PSNR in region, SSIM image)
    report: Path
    run_id: str | None
    seconds: float
    tracking_note: str | None = None  # why MLflow was skipped, when it was


def _scores(ev, source: str, region: str) -> tuple[float, float]:
    m = ev.summary["metrics"][source]
    p, s = m[region]["psnr"]["mean"], m["image"]["ssim"]["mean"]
    return float("nan") if p is None else float(p), float("nan") if s is None else float(s)


def baseline_volume(corrupted: np.ndarray, mask: np.ndarray, window: tuple[float, float], kind: str) -> np.ndarray:
    """NL-means (``kind="noise"``) or biharmonic inpainting inside ``mask`` (``"mask"``), slice by
    slice in the model's window units, returned in the scan's units."""
    from medvae import baselines
    from medvae.intensity import denormalize, normalize

    x = normalize(corrupted, window)
    out = np.empty_like(x)
    for k in range(x.shape[2]):
        if kind == "noise":
            out[:, :, k] = baselines.nl_means(x[:, :, k])
        else:
            m = mask[:, :, k]
            out[:, :, k] = baselines.biharmonic(x[:, :, k], m) if m.any() else x[:, :, k]
    return denormalize(out, window)


def _write_baseline(src: Path, corrupted_p: Path, mask_p: Path, out: Path, kind: str) -> Path:
    from medvae.intensity import IntensityPolicy
    from medvae.io import load_scan, save_scan
    from medvae.io.formats import as_mask

    corrupted = load_scan(corrupted_p)
    mask = as_mask(load_scan(mask_p).array, mask_p)
    window = IntensityPolicy().window_for(load_scan(src).array, corrupted.modality)
    base = baseline_volume(corrupted.array, mask, window, kind)
    return save_scan(corrupted, base, out, overwrite=True, description=f"medvae demo baseline {BASELINES[kind]}",
                     rescale="fit")


def run_case(name: str, src: Path, recipe: str, kind: str, out: Path, *, model: Any, model_uri: str,
             seed: int, tracking_uri: str | None, log_mlflow: bool, samples: int = 8) -> CaseResult:
    """Corrupt ``src`` with ``recipe``, restore it with ``model``, compute the classical baseline,
    score everything against ``src``, write the review page and (optionally) an MLflow run.

    ``model_uri`` names the model in MLflow and on the page; a local path is recorded only as a
    digest (:func:`medvae.models.label.model_label`)."""
    from medvae.corruption import corrupt_scan
    from medvae.evaluate import evaluate_scans
    from medvae.restore import restore_scan

    started = time.time()
    t0 = time.perf_counter()
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".nii.gz" if src.name.endswith((".nii", ".nii.gz")) else ""
    p = {k: folder / f"{k}{ext}" for k in ("corrupted", "restored", "uncertainty", "baseline")}
    p["mask"] = folder / "mask.nii.gz"

    corrupt_scan(src, p["corrupted"], recipe=recipe, seed=seed, mask_path=p["mask"], overwrite=True)
    restore_scan(p["corrupted"], p["restored"], model=model, mask_path=p["mask"] if kind == "mask" else None,
                 samples=samples, uncertainty_path=p["uncertainty"], overwrite=True)
    _write_baseline(src, p["corrupted"], p["mask"], p["baseline"], kind)
    # scored the way `medvae evaluate` scores (CT -1000..1000 HU, MR reference percentiles)
    res = evaluate_scans(p["restored"], src, mask=p["mask"] if kind == "mask" else None, corrupted=p["corrupted"],
                         baseline=p["baseline"], uncertainty=p["uncertainty"])
    ev = res.evaluation
    region = "mask" if kind == "mask" else "image"
    scores = {"input": _scores(ev, "corrupted", region), "baseline": _scores(ev, "baseline", region),
              "medvae": _scores(ev, "restored", region)}
    title = f"medvae demo: {name} ({recipe}, seed {seed})"
    meta = dict(getattr(model, "meta", {}) or {})

    def report(run_id: str | None) -> dict[str, Path]:
        from medvae.io.formats import scan_slice_positions
        from medvae.report import write_report

        # like the case's other outputs, a rerun replaces the demo's own earlier report only
        return write_report(folder / "report", evaluation=ev, restored=res.array("restored"),
                            reference=res.array("reference"), corrupted=res.array("corrupted"),
                            baseline=res.array("baseline"), uncertainty=res.array("uncertainty"),
                            mask=res.array("mask"), window=res.display_window, title=title,
                            baseline_name=BASELINES[kind], model_uri=model_uri, model_meta=meta, run_id=run_id,
                            affine=res.scans["reference"].affine_mm,
                            slice_positions=scan_slice_positions(res.scans["reference"]), units=res.units,
                            overwrite=True)

    run_id, note, files = None, None, None
    if log_mlflow:
        from medvae.tracking import TrackingUnavailable

        try:
            run_id, files = _log_case(name, res, recipe, kind, seed, model_uri, scores, region, report,
                                      tracking_uri, started)
        except TrackingUnavailable as exc:
            note = str(exc)
    if files is None:
        files = report(None)
    return CaseResult(name, res.modality or "", recipe, kind, BASELINES[kind], region, scores, files["index_html"],
                      run_id, time.perf_counter() - t0, note)


def _log_case(name, res, recipe, kind, seed, model_uri, scores, region, report, tracking_uri, started):
    """One MLflow run per case, started when the case started; the report is written inside it so
    its page and summary.json carry the run id for the sign-off."""
    from medvae import tracking
    from medvae.models.label import model_label

    window = res.window
    model_uri = model_label(model_uri)  # a local path can name a patient: its digest only
    tags = {"medvae.command": "demo", "medvae.model_uri": model_uri}
    with tracking.start_run("demo", tracking_uri=tracking_uri, run_name=tracking.safe_name(name), tags=tags,
                            start_time=started) as run:
        files = report(run.info.run_id)
        tracking.log_params({"case": name, "modality": res.modality, "recipe": recipe, "kind": kind, "seed": seed,
                             "window_lo": window[0], "window_hi": window[1], "baseline": BASELINES[kind],
                             "model": model_uri, "headline_metric": f"psnr_{region}"})
        metrics = {}
        for who, (p, s) in scores.items():
            if np.isfinite(p):
                metrics[f"{who}_psnr_{region}"] = p
            if np.isfinite(s):
                metrics[f"{who}_ssim_image"] = s
        metrics.update(res.evaluation.flat_metrics(stat="mean"))
        tracking.log_metrics(metrics)
        for f in files.values():  # PNG figures and the HTML page preview in the MLflow UI
            tracking.log_artifact(f, artifact_path="report")
        return run.info.run_id, files


def format_table(results: list[CaseResult]) -> str:
    """The demo's table: PSNR in the case's headline region / SSIM over the image, per method."""
    head = f"{'case':<12} {'metric region':<14} {'input':>14} {'baseline':>26} {'medvae':>14}"
    lines = [head, "-" * len(head)]
    for r in results:
        cell = lambda k: f"{r.scores[k][0]:6.2f} / {r.scores[k][1]:.3f}"  # noqa: E731
        lines.append(f"{r.name:<12} {'PSNR ' + r.region + '/SSIM':<14} {cell('input'):>14} "
                     f"{r.baseline + ' ' + cell('baseline'):>26} {cell('medvae'):>14}")
    return "\n".join(lines)


def _check_demo_folder(out: Path) -> None:
    """``out`` is new, empty, or an earlier demo's folder (its samples and case folders only): the demo
    wrote its cases into any folder, a DICOM series' too (which then held eleven series)."""
    from medvae.errors import MedvaeError

    if out.exists() and not out.is_dir():
        raise MedvaeError("is a file; give a folder for the demo", out)
    if not out.is_dir():
        return
    ours = {"samples", *(name for name, *_ in CASES)}
    others = sorted(p.name for p in out.iterdir() if p.name not in ours and not p.name.startswith("."))
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise MedvaeError(f"holds files the demo did not write ({shown}); give a new or empty folder", out)


def run_demo(out: str | Path = "demo_out", *, model: str = "default", seed: int = 0,
             tracking_uri: str | None = None, log_mlflow: bool = True,
             on_case: Callable[[CaseResult], None] | None = None,
             on_start: Callable[[], None] | None = None) -> list[CaseResult]:
    """Run every demo case; returns their results (the table is :func:`format_table`).

    ``on_start`` is called once the seed and the model are checked, before the first case (the
    command prints its banner then, so a bad model is its only line); ``on_case`` with each result as
    soon as its case is done (the command prints it).
    The seed and the model are checked before anything is written: a bad one is a
    :class:`~medvae.errors.MedvaeError` and leaves ``out`` untouched.

    Examples
    --------
    >>> results = run_demo("demo_out", log_mlflow=False)   # doctest: +SKIP
    >>> print(format_table(results))                        # doctest: +SKIP
    """
    from medvae.io.samples import build_samples
    from medvae.progress import progress
    from medvae.runtime import tune_allocator
    from medvae.tracking import load_model

    from medvae.errors import MedvaeError
    from medvae.models.checkpoint import require_slice_restorer
    from medvae.models.label import model_label

    # every input is checked before the first file is written: a typo leaves no half-built OUT
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise MedvaeError(f"the seed must be an integer >= 0, got {seed!r}")
    _check_demo_folder(Path(out))
    lm = require_slice_restorer(load_model(model, tracking_uri=tracking_uri))
    if on_start is not None:
        on_start()
    tune_allocator()
    out = Path(out)
    samples = build_samples(out / "samples", overwrite=True)
    results = []
    for name, key, recipe, kind in progress(CASES, desc="demo", unit="cases"):
        results.append(run_case(name, samples[key], recipe, kind, out, model=lm, model_uri=model_label(lm.source),  # an alias or latest: the version that restored
                                seed=seed, tracking_uri=tracking_uri, log_mlflow=log_mlflow))
        if on_case is not None:
            on_case(results[-1])
    return results
