"""Compare runs of ``scripts/bench_quality.py``: medvae's means, floors and per-volume differences.

Usage: ``python scripts/compare_quality.py BASE.json OTHER.json [OTHER.json ...]``

Each argument is the JSON written by ``bench_quality.py --out``. The runs must score the same slices
(same ``--max-slices``, ``--seed`` and split), so that a difference is the model's and not the data's;
a run whose (corruption, volume, slice, seed) cases differ from BASE's is refused. Printed, in markdown:

* per corruption, medvae's mean on the corruption's metric (PSNR; mask PSNR for holes) in each run, and
  the difference to BASE;
* per corruption, the floor (volumes at or above NL-means for noise, biharmonic for holes) in each run;
* per volume, each OTHER run minus BASE, the cells of one volume that one mean can hide.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common as bench
from medvae.errors import MedvaeError


def load_run(path: Path) -> dict[str, Any]:
    """The run's summary, metric per corruption and scored cases; a one-line error if it is not one."""
    try:
        data = json.loads(path.read_text())
        summary, gaps, rows = data["summary"], data["gaps"], data["rows"]
        cases = {(r["corruption"], r["volume"], r["slice"], r["seed"]) for r in rows if r["method"] == "medvae"}
        metric = {g["corruption"]: g["metric"] for g in gaps}
    except FileNotFoundError:
        raise MedvaeError("no such file", path) from None
    except IsADirectoryError:
        raise MedvaeError("is a folder; give the JSON file of scripts/bench_quality.py --out", path) from None
    except (ValueError, KeyError, TypeError):  # rows or gaps without their keys too
        raise MedvaeError("not the JSON of scripts/bench_quality.py --out", path) from None
    return {"path": path, "summary": summary, "metric": metric, "cases": cases}


def _floor(summary: dict[str, Any], corruption: str, metric: str) -> tuple[int, int]:
    """(volumes at or above the floor baseline, volumes scored)."""
    floor = bench.FLOOR_BASELINE[bench.CORRUPTION_BY_NAME[corruption].kind]
    _, rows = bench.volume_table(summary[corruption], metric=metric, floor=floor)   # as bench_quality counts it
    return sum(1 for r in rows if bench._fin(r["delta_floor"]) and r["delta_floor"] >= 0), len(rows)


def compare(runs: list[dict[str, Any]], names: list[str]) -> str:
    """Markdown tables comparing ``runs[1:]`` against ``runs[0]`` (see the module docstring)."""
    base = runs[0]
    for run in runs[1:]:
        if run["cases"] != base["cases"]:
            raise MedvaeError(f"scores other slices or seeds than {base['path']}: compare runs of one protocol",
                              run["path"])
    corruptions = [c for c in base["metric"] if "medvae" in base["summary"].get(c, {})]
    head = ["corruption", "metric", *names, *(f"{n} − {names[0]}" for n in names[1:])]
    body = []
    for c in corruptions:
        m = base["metric"][c]
        vals = [r["summary"][c]["medvae"][m] for r in runs]
        body.append([c, m, *(f"{v:.2f}" for v in vals), *(f"{v - vals[0]:+.2f}" for v in vals[1:])])
    out = ["## medvae, mean over slices (dB)", "", bench.markdown_table(head, body), ""]

    head = ["corruption", "floor", *names]
    body = []
    for c in corruptions:
        m = base["metric"][c]
        floors = [_floor(r["summary"], c, m) for r in runs]
        body.append([c, bench.FLOOR_BASELINE[bench.CORRUPTION_BY_NAME[c].kind], *(f"{a}/{n}" for a, n in floors)])
    out += ["## Volumes at or above the floor", "", bench.markdown_table(head, body), ""]

    vols = list(dict.fromkeys(v for c in corruptions for v in base["summary"][c]["medvae"]["by_volume"]))
    head = ["volume", *corruptions]
    body = []
    for v in vols:
        cells = []
        for c in corruptions:
            m = base["metric"][c]
            ref = base["summary"][c]["medvae"]["by_volume"].get(v)
            if ref is None:
                cells.append("—")
                continue
            cells.append(" / ".join(f"{r['summary'][c]['medvae']['by_volume'][v][m] - ref[m]:+.2f}" for r in runs[1:]))
        body.append([v, *cells])
    label = " / ".join(names[1:])
    out += [f"## Per volume: {label} minus {names[0]} (dB)", "", bench.markdown_table(head, body)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="compare_quality", description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="bench_quality.py JSON files; the first is the base")
    args = ap.parse_args(argv)
    if len(args.runs) < 2:
        ap.error("give a base run and at least one other")
    try:
        runs = [load_run(p) for p in args.runs]
        print(compare(runs, [p.stem for p in args.runs]))
    except MedvaeError as exc:
        print(f"compare_quality: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
