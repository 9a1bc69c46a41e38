"""``medvae prepare MANIFEST STORE``: read and normalize a data set once into an on-disk slice store."""
from __future__ import annotations

import argparse

HELP = "read the scans of a dataset manifest once into a slice store that training reads from disk"


def _fraction(text: str) -> float:
    """A share in [0, 1] (argparse prints the one-line usage error otherwise)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], not {text!r}")
    return value


def _seed(text: str) -> int:
    """A training seed (0..2**32 - 1, as the config's ``seed``): a store split with another cannot be
    trained as its manifest read into memory."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be a whole number from 0 to 2**32 - 1 (the config's seed range), "
                                         f"not {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", help="dataset manifest: CSV or YAML with path, subject[, modality, split, series_uid]")
    p.add_argument("store", help="store folder (created; an existing store is completed, not rewritten)")
    p.add_argument("--config", "-c", default=None,
                   help="training config whose intensity section to normalize with (default: medvae's defaults)")
    p.add_argument("--val-fraction", type=_fraction, default=0.2,
                   help="share of subjects without a split that go to validation (default 0.2)")
    p.add_argument("--seed", type=_seed, default=0,
                   help="seed of the subject split, as the training config's seed (default 0)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="stored value type; float16 halves the store (steps of at most 2^-11 of the "
                        "window inside it, ~1 HU for CT; values above the window, such as bone, are not "
                        "clipped and get coarser steps: 2^-10 of the window, ~2 HU, up to 3000 HU, "
                        "2^-9 beyond; default float32)")
    p.add_argument("--no-wait", dest="wait", action="store_false",
                   help="fail at once when another `medvae prepare` is writing the store (default: wait "
                        "for it, then complete the store, so every task of a Slurm array may run prepare)")


def run(args: argparse.Namespace) -> int:
    import logging
    import sys

    from medvae.intensity import IntensityPolicy
    from medvae.store import prepare_store

    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    intensity = IntensityPolicy()
    if args.config:
        from medvae.training.config import load_config

        cfg = load_config(args.config)
        intensity = IntensityPolicy(ct_window=tuple(cfg.intensity.ct_window),
                                    mr_percentiles=tuple(cfg.intensity.mr_percentiles))
    r = prepare_store(args.manifest, args.store, intensity=intensity, val_fraction=args.val_fraction,
                      seed=args.seed, dtype=args.dtype, progress=True, wait=args.wait)
    for row, msg in r.failed:
        print(f"medvae prepare: manifest row {row} failed: {msg}", file=sys.stderr)
    gone = f", {len(r.removed)} removed (no longer in the manifest, or unreadable)" if r.removed else ""
    print(f"store {r.store}: {len(r.added)} volume(s) added, {len(r.skipped)} already there{gone}, "
          f"{len(r.failed)} failed")
    return 2 if r.failed else 0  # bad input; the store refuses training until every row is read
