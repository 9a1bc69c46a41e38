"""``medvae demo``: the end-to-end job on the bundled sample scans (no arguments, no network)."""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from medvae.commands.corrupt import _seed

HELP = "run the whole pipeline on sample scans: corrupt, restore, evaluate vs NL-means, MLflow"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--model", default="default",
                   help="model to restore with (default: the shipped model); a local path is logged only as "
                        "its sha256")
    # the same check as `medvae corrupt --seed`: refused by the parser, before anything is written
    p.add_argument("--seed", type=_seed, default=0, help="corruption seed (an integer >= 0, default 0)")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")


def run(args: argparse.Namespace) -> int:
    import logging

    from medvae.demo import format_table, run_demo
    from medvae.tracking import redact, resolve_tracking_uri

    logging.basicConfig(level=logging.WARNING)

    def start() -> None:  # after the model is checked: a bad one is the only line printed
        print(f"medvae demo: sample scans from pip packages (held out from the default model's training) -> "
              f"corrupt -> restore (model: {args.model}) -> evaluate vs NL-means/biharmonic -> MLflow", flush=True)

    def done(r) -> None:
        print(f"  {r.name:<12} done in {r.seconds:5.1f} s  ->  {r.report}", flush=True)
        if r.tracking_note:
            print(f"  {r.name:<12} {r.tracking_note}", flush=True)

    results = run_demo(args.out, model=args.model, seed=args.seed, tracking_uri=args.tracking_uri,
                       log_mlflow=not args.no_mlflow, on_case=done, on_start=start)
    print()
    print("PSNR (dB) / SSIM against the clean scans; CT window -1000..1000 HU, MR 0.5-99.5 percentiles;")
    print("noise cases score the whole image, mask cases PSNR inside the mask (SSIM: whole image)")
    print(format_table(results))
    print()
    print("review pages (sign off on each, then: medvae review import VERDICTS.json):")
    for r in results:
        print(f"  {r.report}")
    if not args.no_mlflow:
        uri = redact(resolve_tracking_uri(args.tracking_uri))  # never a password on the terminal
        logged = sum(r.run_id is not None for r in results)
        print(f"\nMLflow: {logged} runs in experiment 'demo' at {uri}")
        if uri.startswith("sqlite:") and logged:
            print(f"  open the UI with: {_mlflow_command()} ui --backend-store-uri {uri}")
        if logged < len(results):  # as medvae evaluate: the results stand, the tracking did not happen
            print(f"medvae demo: {len(results) - logged} of {len(results)} cases were not logged to MLflow "
                  "(tracking unavailable, above); their outputs and review pages are complete", file=sys.stderr)
            return 3
    return 0


def _mlflow_command() -> str:
    """``mlflow`` when it is on the PATH, else the one beside this interpreter (``make demo`` runs
    ``.venv/bin/medvae`` without activating the venv, so a bare ``mlflow`` would not be found)."""
    if shutil.which("mlflow"):
        return "mlflow"
    beside = Path(sys.executable).parent / "mlflow"
    return str(beside) if beside.is_file() else "mlflow"

