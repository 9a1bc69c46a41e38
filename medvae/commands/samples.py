"""``medvae samples DIR``: build a small CT/MR sample set from pip packages (no download)."""
from __future__ import annotations

import argparse

HELP = "build a small CT DICOM series and MR volumes from files shipped in pip packages"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="folder to create (refused if it exists and is not empty)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing folder (after the new one is complete)")


def run(args: argparse.Namespace) -> int:
    from medvae.io.samples import build_samples

    paths = build_samples(args.dir, overwrite=args.overwrite)
    width = max(len(k) for k in paths) + 2
    print(f"samples written to {args.dir} (see README.txt there for sources and licenses):")
    for key, path in paths.items():
        print(f"  {key:<{width}}{path}")
    return 0
