#!/usr/bin/env python
"""Start-up of ``medvae restore`` against ``python -c "import torch"`` (issue 10).

    nice -n 10 python scripts/bench_startup.py [--runs 5] [--work DIR]

Target: ``medvae restore`` of a 4-slice volume (default model, the whole command as a user runs it:
start-up, reading, restoring, writing) takes at most the time of ``python -c "import torch"`` + 2 s.
Inputs: 4 slices of the dev head CT (``../shared/data/dev``; 256², HU) as a NIfTI file and as a
series of 4 DICOM files. Every command runs in a fresh process, once to warm the page cache and then
``--runs`` times, the three commands interleaved so that the load of a shared machine hits them alike;
the table gives the median and minimum, and the difference and ratio of the medians against
``import torch`` measured in the same run. Then the steps of one NIfTI restore are timed in a fresh
process (imports, reading, loading the model, restoring, writing: where the time above ``import torch``
goes). ``--importtime`` also lists the slowest top-level imports of one restore (``python -X importtime``)
and whether MONAI, MLflow, matplotlib or pandas were imported.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEV = ROOT.parent / "shared" / "data" / "dev"
#: the slowest imports a restore must not pay for
HEAVY = ("monai", "mlflow", "matplotlib", "pandas")


def build_inputs(work: Path) -> dict[str, Path]:
    """4 slices of the dev head CT: a NIfTI file and a DICOM series (4 files of the dev series)."""
    import nibabel as nib

    nii = work / "ct4.nii.gz"
    if not nii.exists():
        img = nib.load(DEV / "nifti" / "invesalius_cranium_ct.nii.gz")
        k = img.shape[2] // 2
        nib.save(img.slicer[:, :, k:k + 4], nii)
    series = work / "ct4_series"
    if not series.is_dir():
        series.mkdir()
        files = sorted((DEV / "dicom" / "series_ct_head").glob("*.dcm"))
        k = len(files) // 2
        for f in files[k:k + 4]:
            (series / f.name).write_bytes(f.read_bytes())
    return {"nifti": nii, "dicom": series}


def _medvae() -> list[str]:
    script = Path(sys.executable).with_name("medvae")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "medvae"]


def timed(argv: list[str]) -> float:
    t = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}")
    return seconds


def importtime(argv_tail: list[str], top: int = 8) -> list[tuple[str, float]]:
    """The slowest top-level imports of one ``medvae restore`` (seconds, cumulative)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "medvae", *argv_tail],
                          capture_output=True, text=True)
    rows = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _self, cumulative, name = (p.strip() for p in line[len("import time:"):].split("|"))
        if cumulative.isdigit() and not name.startswith(" ") and "." not in name.strip():
            rows.append((name.strip(), int(cumulative) / 1e6))
    return sorted(rows, key=lambda r: -r[1])[:top]


#: one NIfTI restore in a fresh process, step by step (what restore_scan does, timed): seconds since start
PHASES = """
import json, sys, time
t = [time.perf_counter()]
import torch
t.append(time.perf_counter())
from medvae.io import load_scan, save_scan
from medvae.restore import _resolve_model, restore_volume
t.append(time.perf_counter())
scan = load_scan(sys.argv[1], reader="native")
t.append(time.perf_counter())
lm = _resolve_model("default", torch.device("cpu"))
t.append(time.perf_counter())
mean, _ = restore_volume(scan.array, model=lm, modality=scan.modality, out=scan.array)
t.append(time.perf_counter())
save_scan(scan, mean, sys.argv[2], overwrite=True)
t.append(time.perf_counter())
names = ["import torch", "import medvae", "read", "load the model", "restore 4 slices", "write"]
print(json.dumps({n: b - a for n, a, b in zip(names, t, t[1:])}))
"""


def phases(nifti: Path, out: Path) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", PHASES, str(nifti), str(out)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"phases failed: {proc.stderr.strip()[-800:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="timed runs per command (after one warm-up)")
    ap.add_argument("--work", type=Path, default=None, help="folder for the inputs and outputs (default: a temporary one)")
    ap.add_argument("--importtime", action="store_true", help="also list the slowest imports of one restore")
    args = ap.parse_args(argv)
    if args.runs < 1:  # 0 crashed after the set-up
        ap.error("--runs must be at least 1")
    with tempfile.TemporaryDirectory(prefix="medvae_startup_") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        inputs = build_inputs(work)
        outs = work / "out"
        outs.mkdir(exist_ok=True)
        commands = {
            'python -c "import torch"': lambda i: [sys.executable, "-c", "import torch"],
            "medvae restore, NIfTI 256×256×4": lambda i: [*_medvae(), "restore", str(inputs["nifti"]),
                                                          str(outs / f"n{i}.nii.gz"), "--overwrite"],
            "medvae restore, DICOM 4 files of 256²": lambda i: [*_medvae(), "restore", str(inputs["dicom"]),
                                                                str(outs / f"d{i}"), "--overwrite"],
            # one torch thread: two threads wait for each other when other work holds a core
            "medvae restore --threads 1, NIfTI 256×256×4": lambda i: [
                *_medvae(), "restore", str(inputs["nifti"]), str(outs / f"t{i}.nii.gz"), "--overwrite",
                "--threads", "1"],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for i in range(args.runs + 1):  # run 0 warms the page cache and is not counted
            for name, argv_of in commands.items():
                t = timed(argv_of(i))
                if i:
                    times[name].append(t)
            print(f"run {i}/{args.runs}: " + ", ".join(f"{times[n][-1]:.2f} s" if i else "warm-up" for n in commands),
                  file=sys.stderr, flush=True)
        base = statistics.median(times['python -c "import torch"'])
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"{args.runs} runs per command after one warm-up, interleaved; {time.strftime('%Y-%m-%d %H:%M')}, "
              f"{os.cpu_count()} CPUs, load average {load} at the end\n")
        print("| command | median s | min s | median − import torch | ratio | target (≤ import torch + 2 s) |")
        print("|---|---|---|---|---|---|")
        for name, ts in times.items():
            med = statistics.median(ts)
            if name.startswith("python"):
                print(f"| `{name}` | {med:.2f} | {min(ts):.2f} | | 1.00 | |")
                continue
            ok = med <= base + 2.0
            print(f"| `{name}` | {med:.2f} | {min(ts):.2f} | {med - base:+.2f} s | {med / base:.2f} | "
                  f"{'**PASS**' if ok else '**MISS**'} |")
        steps = [phases(inputs["nifti"], outs / f"p{i}.nii.gz") for i in range(args.runs)]
        print("\nWhere the time of a NIfTI restore goes (the steps of restore_scan timed in a fresh process, "
              "medians; the interpreter's own start, about 0.05 s, is not included): "
              + ", ".join(f"{n} {statistics.median(st[n] for st in steps):.2f} s" for n in steps[0]))
        if args.importtime:
            tail = ["restore", str(inputs["nifti"]), str(outs / "imp.nii.gz"), "--overwrite"]
            rows = importtime(tail)
            print("\nSlowest top-level imports of one `medvae restore` (NIfTI), cumulative: "
                  + ", ".join(f"{n} {s:.2f} s" for n, s in rows))
            heavy = [n for n, _ in importtime(tail, top=10_000) if n in HEAVY]
            print(f"Imported of {', '.join(HEAVY)}: {', '.join(heavy) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
