"""Average the weights of medvae models of one architecture (a "model soup").

Fine-tunes that share a starting point can be averaged weight by weight; the average often keeps
what each gained and loses less than either (docs/benchmarks.md, quality runs 16, 21 and 23). The
output keeps the first model's config, intensity and meta, minus what described that model alone:
its epoch, step and validation scores, and its uncertainty calibration and holes blend (re-fit them with
``scripts/calibrate_uncertainty.py --model OUT --write``).

Usage::

    python scripts/average_models.py medvae/weights/default.pt runs/v14/model-last.pt --out runs/soup.pt
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


from medvae.errors import MedvaeError
from medvae.models.checkpoint import atomic_torch_save, read_checkpoint


def average(paths: list[Path]) -> dict:
    """The uniform average of the models' weights, with the first model's other entries."""
    cks = [read_checkpoint(p) for p in paths]
    first = cks[0]
    for p, ck in zip(paths[1:], cks[1:]):
        if ck["model_config"] != first["model_config"] or ck["state_dict"].keys() != first["state_dict"].keys():
            raise MedvaeError(f"not the architecture of {paths[0].name}: weights cannot be averaged", p)
        if ck["intensity"] != first["intensity"]:
            raise MedvaeError(f"another intensity policy than {paths[0].name}'s", p)
    state = {}
    for k, v in first["state_dict"].items():
        if v.is_floating_point():
            state[k] = (sum(ck["state_dict"][k].double() for ck in cks) / len(cks)).to(v.dtype)
        else:  # counters (BatchNorm's num_batches_tracked): the first model's
            state[k] = v
    # what described one model's training (epoch, step, validation scores) is not the average's
    meta = {k: v for k, v in first["meta"].items()
            if k not in ("calibration", "blend", "epoch", "step", "train_samples_per_s") and not k.startswith("val_")}
    meta["averaged_from"] = [Path(p).name for p in paths]
    return {**first, "state_dict": state, "meta": meta}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", type=Path, help="two or more inference checkpoints (model.pt)")
    ap.add_argument("--out", type=Path, required=True, help="the averaged checkpoint (not one of the inputs)")
    args = ap.parse_args(argv)
    try:
        if len(args.models) < 2:
            raise MedvaeError("give two or more models to average")
        if any(args.out.resolve() == p.resolve() for p in args.models):
            raise MedvaeError("the output would overwrite an input model", args.out)
        atomic_torch_save(average(args.models), args.out)
    except MedvaeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.out}: the average of {len(args.models)} models; re-fit its calibration with "
          f"scripts/calibrate_uncertainty.py --model {args.out} --write")
    return 0


if __name__ == "__main__":
    sys.exit(main())
