"""The README's main job: sample scans → corrupt → restore → evaluate (next to a classical baseline)
→ review pages → MLflow.

Everything runs on the sample set that :func:`medvae.io.samples.build_samples` builds from pip
packages, with no network. Each step uses the public commands and APIs a user would use:
``medvae corrupt``, :func:`medvae.restore.restore_scan`, :func:`medvae.evaluate.evaluate_volumes`
and :func:`medvae.report.write_report`.
"""
from __future__ import annotations

import contextlib
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: (case name, sample key, recipe, kind) - kind "noise" is restored without a mask and compared
#: with NL-means; kind "mask" is restored inside the mask and compared with biharmonic inpainting.
CASES = (
    ("ct_lowdose", "ct_series", "lowdose_ct", "noise"),
    ("ct_boxes", "ct_series", "boxes", "mask"),
    ("mr_rician", "mr", "rician", "noise"),
    ("mr_strokes", "mr", "strokes", "mask"),
)


@dataclass
class CaseResult:
    name: str
    modality: str
    recipe: str
    kind: str
    baseline: str
    region: str
    scores: dict[str, tuple[float, float]]  # input / baseline / medvae -> (PSNR, SSIM)
    report: Path
    run_id: str | None
    seconds: float


def _scores(ev, source: str, region: str) -> tuple[float, float]:
    m = ev.summary["metrics"][source]
    return float(m[region]["psnr"]["mean"]), float(m["image"]["ssim"]["mean"])


def _baseline(corrupted: np.ndarray, mask: np.ndarray, window: tuple[float, float], kind: str) -> np.ndarray:
    """NL-means (noise) or biharmonic inpainting (mask), slice by slice in window units."""
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


def run_case(name: str, src: Path, recipe: str, kind: str, out: Path, *, model: Any, model_uri: str,
             seed: int, tracking_uri: str | None, log_mlflow: bool, samples: int = 8) -> CaseResult:
    from medvae import evaluate as E
    from medvae.cli import main as cli
    from medvae.errors import MedvaeError
    from medvae.io import load_scan
    from medvae.report import write_report
    from medvae.restore import restore_scan

    t0 = time.perf_counter()
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    nifti = src.name.endswith((".nii", ".nii.gz"))
    ext = ".nii.gz" if nifti else ""
    corrupted_p, restored_p = folder / f"corrupted{ext}", folder / f"restored{ext}"
    unc_p, mask_p = folder / f"uncertainty{ext}", folder / "mask.nii.gz"

    # 1. corrupt, through the CLI a user would call (its own log goes to a file, not the table)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        code = cli(["corrupt", str(src), str(corrupted_p), "--recipe", recipe, "--seed", str(seed),
                    "--mask-output", str(mask_p), "--overwrite"])
    if code:
        raise MedvaeError(f"corrupting the sample with recipe {recipe!r} failed", src)
    # 2. restore with the model (inside the mask for mask recipes; everywhere for noise)
    summary = restore_scan(corrupted_p, restored_p, model=model, mask_path=mask_p if kind == "mask" else None,
                           samples=samples, uncertainty_path=unc_p, overwrite=True)
    log.write(f"restored {summary.slices} slices in {summary.seconds:.1f} s\n")
    (folder / "log.txt").write_text(log.getvalue())

    clean, corrupted, restored = load_scan(src), load_scan(corrupted_p), load_scan(restored_p)
    unc, mask = load_scan(unc_p), load_scan(mask_p).array > 0.5
    modality = clean.modality
    window = (-1000.0, 1000.0) if modality == "CT" else tuple(E.default_scaling(clean.array, modality)["window"])
    # 3. a classical baseline on the same input, then every output scored the same way
    base = _baseline(corrupted.array, mask, window, kind)
    eval_mask = mask if kind == "mask" else None
    ev = E.evaluate_volumes(restored.array, clean.array, window=window, mask=eval_mask,
                            corrupted=corrupted.array, modality=modality)
    ev_base = E.evaluate_volumes(base, clean.array, window=window, mask=eval_mask, modality=modality)
    region = "mask" if kind == "mask" else "image"
    scores = {"input": _scores(ev, "corrupted", region), "baseline": _scores(ev_base, "restored", region),
              "medvae": _scores(ev, "restored", region)}
    baseline = "NL-means" if kind == "noise" else "biharmonic"
    # 4. review page
    files = write_report(folder / "report", evaluation=ev, restored=restored.array, reference=clean.array,
                         corrupted=corrupted.array, uncertainty=unc.array, mask=eval_mask, window=window,
                         title=f"medvae demo: {name} ({recipe}, seed {seed})", model_uri=model_uri,
                         affine=clean.affine, units="HU" if modality == "CT" else "")
    # 5. MLflow (names built here; the sample files' identifiers never leave the DICOM headers)
    run_id = None
    if log_mlflow:
        run_id = _log_case(name, modality, recipe, kind, seed, window, model_uri, baseline, scores, ev,
                           files, tracking_uri)
    return CaseResult(name, modality, recipe, kind, baseline, region, scores, files["index_html"], run_id,
                      time.perf_counter() - t0)


def _log_case(name, modality, recipe, kind, seed, window, model_uri, baseline, scores, ev, files,
              tracking_uri) -> str:
    import mlflow

    from medvae import tracking

    tags = {"medvae.command": "demo", "medvae.model_uri": model_uri}
    with tracking.start_run("demo", tracking_uri=tracking_uri, run_name=tracking.safe_name(name), tags=tags) as run:
        mlflow.log_params({"case": name, "modality": modality, "recipe": recipe, "kind": kind, "seed": seed,
                           "window_lo": window[0], "window_hi": window[1], "baseline": baseline,
                           "model": model_uri})
        metrics = {}
        for who, (p, s) in scores.items():
            metrics[f"{who}_psnr"], metrics[f"{who}_ssim"] = p, s
        metrics.update(ev.flat_metrics("mean"))
        mlflow.log_metrics(metrics)
        for p in files.values():
            mlflow.log_artifact(str(p), artifact_path="report")
        return run.info.run_id


def format_table(results: list[CaseResult]) -> str:
    head = (f"{'case':<12} {'metric region':<14} {'input':>14} {'baseline':>26} {'medvae':>14}")
    lines = [head, "-" * len(head)]
    for r in results:
        cell = lambda k: f"{r.scores[k][0]:6.2f} / {r.scores[k][1]:.3f}"  # noqa: E731
        lines.append(f"{r.name:<12} {'PSNR ' + r.region + '/SSIM':<14} {cell('input'):>14} "
                     f"{r.baseline + ' ' + cell('baseline'):>26} {cell('medvae'):>14}")
    return "\n".join(lines)


def run_demo(out: str | Path = "demo_out", *, model: str = "default", seed: int = 0,
             tracking_uri: str | None = None, log_mlflow: bool = True) -> list[CaseResult]:
    """Run every demo case; returns their results (the table is :func:`format_table`)."""
    from medvae.io.samples import build_samples
    from medvae.models.checkpoint import load_model
    from medvae.runtime import tune_allocator

    tune_allocator()
    out = Path(out)
    samples = build_samples(out / "samples", overwrite=True)
    lm = load_model(model)
    results = []
    for name, key, recipe, kind in CASES:
        results.append(run_case(name, samples[key], recipe, kind, out, model=lm, model_uri=str(model),
                                seed=seed, tracking_uri=tracking_uri, log_mlflow=log_mlflow))
        r = results[-1]
        print(f"  {name:<12} done in {r.seconds:5.1f} s  ->  {r.report}", flush=True)
    return results
