"""``medvae train``: train a masked VAE from a YAML config (CPU, CUDA with AMP, or torchrun DDP)."""
from __future__ import annotations

import argparse

HELP = "train a restoration model from a YAML config (also under torchrun for DDP)"

_EPILOG = """\
exit status: 0 done; 2 bad input; 3 trained and checkpointed, but MLflow tracking was skipped
             (server unreachable or died): the records are kept in OUTPUT_DIR/tracking_pending.jsonl,
             send them with `medvae track sync OUTPUT_DIR`
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = _EPILOG
    p.add_argument("--config", "-c", default=None, metavar="NAME_OR_YAML",
                   help="a YAML config file, or the name of a shipped one: default (the shipped model's)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. optim.epochs=2 data.patch_size=96")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:1")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/last.pt")
    p.add_argument("--output-dir", default=None, help="where checkpoints go (config: output_dir)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")


def run(args: argparse.Namespace) -> int:
    import logging
    import sys

    from medvae.errors import MedvaeError
    from medvae.training.config import load_config
    from medvae.training.loop import train

    overrides = list(args.overrides)
    if args.device:
        overrides.append(f"device={args.device}")
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if args.tracking_uri:
        overrides.append(f"tracking.uri={args.tracking_uri}")
    if args.no_mlflow:
        overrides.append("tracking.enabled=false")
    rank = _rank()
    try:
        cfg = load_config(args.config, overrides)
    except MedvaeError:
        if rank != 0:  # every rank reads the same config and fails alike: rank 0 alone says why
            return 2
        raise
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if rank != 0:  # under torchrun every rank reads the same scans and warns alike: rank 0 says it once
        import warnings

        logging.getLogger().setLevel(logging.ERROR)  # errors: every rank (one may fail alone)
        warnings.simplefilter("ignore")
    result = train(cfg, resume=args.resume)
    if rank != 0:  # under torchrun rank 0 alone reports (it validates and tracks)
        return 0
    if result.epochs_done_before:
        done = "wrote the model its stopped run had not" if result.exported else "nothing left to train"
        print(f"{done}: {result.output_dir} already trained {result.epochs_done_before} of "
              f"{result.epochs_planned} epoch(s); its model: {result.output_dir / 'model.pt'}")
        return 0
    # every epoch's record has its speed; the validation scores only with a validation set
    summary = ", ".join(f"{k} {v:.3f}" for k, v in (result.val[-1] if result.val else {}).items()
                        if k.startswith("val_")) or "no validation set"
    print(f"trained {result.epochs_run} epoch(s), {result.steps} steps; {summary}; "
          f"model: {result.output_dir / 'model.pt'}" + (f"; MLflow run {result.run_id}" if result.run_id else ""))
    if result.tracking_skipped:
        from medvae.tracking import EXIT_TRACKING_SKIPPED

        print(f"medvae train: {result.tracking_skipped}; send the kept records with: "
              f"medvae track sync {result.output_dir}", file=sys.stderr)
        return EXIT_TRACKING_SKIPPED
    return 0


def _rank() -> int:
    """This process's torchrun rank (:func:`medvae.training.loop.dist_info`); a malformed one counts as
    rank 0, so that its error is said."""
    from medvae.errors import MedvaeError
    from medvae.training.loop import dist_info

    try:
        return dist_info()[0]
    except MedvaeError:
        return 0
