#!/usr/bin/env python
"""medvae at dataset scale (issue 12): training memory and throughput from the slice store, restore memory,
batch restore on several processes.

    nice -n 15 python scripts/bench_scale.py [--only SECTION,...] [--quick] [--work DIR] [--out scale.json]

Sections (``--only``):

* ``train_memory``: peak RSS of one short training epoch (``medvae.training.loop.train``, the default
  model, in a fresh subprocess) on 16 and on 160 volumes, from volumes in memory (``data.paths``, the
  former only way) and from a slice store (``data.store``). Target: the store's 160-volume peak ≤ 1.3×
  its 16-volume peak and < 4 GB.
* ``train_speed``: training samples/s of the default model fed by the store's DataLoader against the
  same steps on batches held as tensors in memory. Target ≥ 0.85.
* ``restore_memory``: peak RSS restoring a 512×512×300 CT NIfTI against a 4-slice one (target: ≤ the
  4-slice peak + 1.25× the float32 volume), a 600-slice DICOM series of 256² against a 60-slice one
  (target ≤ 1.2×), and a 300-slice DICOM series of 512² against a 30-slice one (the same target: a
  series is restored file by file, so its length should not show), each ``medvae restore`` in a fresh
  process.
* ``batch``: ``medvae restore`` of a folder of series on 2 processes (``--shard i/2``) against 1
  (target ≤ 0.6× the time), a killed batch rerun, and series per hour.

Inputs are built from the dev head CT (``../shared/data/dev/nifti/invesalius_cranium_ct.nii.gz``,
256×256×108, HU): symlinks of it as separate volumes, or its slices tiled and repeated (see each
section). The work folder (default ``runs/bench/scale``) keeps the prepared stores between runs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEV = ROOT.parent / "shared" / "data" / "dev"
CT_FILE = DEV / "nifti" / "invesalius_cranium_ct.nii.gz"
SECTIONS = ("train_memory", "train_speed", "restore_memory", "batch")
MIB = 2**20


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _status(ok: bool) -> str:
    return "**PASS**" if ok else "**MISS**"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _peak_bytes() -> int:
    """Peak RSS of this process (``VmHWM``: see :func:`benchmarks.common.max_rss_bytes`)."""
    from benchmarks.common import max_rss_bytes

    return max_rss_bytes()


def _child(args: list[str], timeout: float = 3600) -> dict:
    """Run this script as a child with ``args``; return the JSON of its last stdout line."""
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"child {args[:2]} failed (exit {proc.returncode}): {proc.stderr.strip()[-1500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# data sets built from the dev head CT
# --------------------------------------------------------------------------------------------
def ct_copies(work: Path, n: int) -> list[Path]:
    """``n`` symlinks of the dev head CT, each a separate volume to medvae."""
    d = work / "ct_copies"
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = d / f"vol{i:03d}.nii.gz"
        if not p.exists():
            p.symlink_to(CT_FILE)
        out.append(p)
    return out


def manifest_for(paths: list[Path], out: Path) -> Path:
    rows = [f"{p},subject{i:03d},CT,train," for i, p in enumerate(paths)]
    out.write_text("path,subject,modality,split,series_uid\n" + "\n".join(rows) + "\n")
    return out


def store_of(work: Path, n: int) -> Path:
    """A store of ``n`` CT copies (the first ``n`` of a larger one are reused: prepare is incremental)."""
    from medvae.store import prepare_store

    store = work / f"store{n}"
    if not (store / "store.json").is_file():
        smaller = sorted((p for p in work.glob("store*") if p.name[5:].isdigit() and int(p.name[5:]) < n),
                         key=lambda p: int(p.name[5:]))
        if smaller and (smaller[-1] / "store.json").is_file():
            shutil.copytree(smaller[-1], store)
    t = time.perf_counter()
    rep = prepare_store(manifest_for(ct_copies(work, n), work / f"manifest{n}.csv"), store)
    _log(f"store{n}: {len(rep.added)} added, {len(rep.skipped)} skipped in {time.perf_counter() - t:.0f} s")
    if rep.failed:
        raise RuntimeError(f"prepare failed: {rep.failed[:3]}")
    return store


# --------------------------------------------------------------------------------------------
# training memory
# --------------------------------------------------------------------------------------------
TRAIN_OVERRIDES = ["optim.epochs=1", "tracking.enabled=false", "data.val_paths=[]", "data.val_fraction=0",
                   "data.val_slices=0"]


def train_child(overrides: list[str]) -> int:
    """One training epoch as configured; print peak RSS and timing as JSON."""
    from medvae.training.config import load_config
    from medvae.training.loop import train

    cfg = load_config("default", overrides)
    t = time.perf_counter()
    res = train(cfg, progress=False)
    print(json.dumps({"peak": _peak_bytes(), "seconds": time.perf_counter() - t, "steps": res.steps}))
    return 0


def section_train_memory(args, res):
    work = args.work
    sizes = (4, 16) if args.quick else (16, 160)
    spe = 32 if args.quick else 256
    common = [*TRAIN_OVERRIDES, f"data.samples_per_epoch={spe}"]
    out: dict[str, dict] = {}
    for n in sizes:
        store = store_of(work, n)
        copies = ct_copies(work, n)
        with tempfile.TemporaryDirectory(prefix="medvae_scale_") as tmp:
            for source, extra in (("store", [f"data.store={store}", "data.paths=[]"]),
                                  ("memory", [f"data.paths={[str(p) for p in copies]}"])):
                if source == "memory" and args.skip_memory_baseline:
                    continue
                r = _child(["--_train-child", *common, *extra, f"output_dir={tmp}/{source}{n}"])
                out.setdefault(source, {})[str(n)] = r
                _log(f"train memory {source} {n} volumes: peak {r['peak'] / MIB:.0f} MiB, {r['seconds']:.0f} s")
    res["train_memory"] = {"sizes": list(sizes), "samples_per_epoch": spe, "runs": out}
    a, b = (str(s) for s in sizes)
    print(f"One epoch of `medvae train --config default` ({spe} samples, batch 16, patch 128², bf16, no "
          f"validation, no tracking) in a fresh process, on {a} and {b} volumes: symlinks of the dev head CT "
          f"({CT_FILE.name}, 256×256×108, 27 MiB float32 each), once as `data.paths` (every volume read and "
          "normalized into RAM: the way before the store) and once as `data.store` (prepared with "
          "`medvae prepare`). Peak RSS: VmHWM of the training process.\n")
    rows = []
    for source, runs in out.items():
        pa, pb = runs[a]["peak"], runs[b]["peak"]
        ratio = pb / pa
        target = f"≤ 1.3× and < 4 GB: {_status(ratio <= 1.3 and pb < 4e9)}" if source == "store" else "(former way)"
        rows.append([f"`data.{'store' if source == 'store' else 'paths'}`", f"{pa / MIB:.0f} MiB", f"{pb / MIB:.0f} MiB",
                     f"{ratio:.2f}×", f"{runs[a]['seconds']:.0f} s / {runs[b]['seconds']:.0f} s", target])
    print(_table(["source", f"peak, {a} volumes", f"peak, {b} volumes", "ratio", "epoch time", "target"], rows) + "\n")


# --------------------------------------------------------------------------------------------
# training throughput: store vs tensors in memory
# --------------------------------------------------------------------------------------------
def section_train_speed(args, res):
    import torch

    from medvae.corruption.recipes import load_recipe
    from medvae.losses import masked_vae_loss
    from medvae.models.vae import MaskedVAE, VAEConfig
    from medvae.runtime import tune_allocator
    from medvae.store import SliceStore
    from medvae.training.config import load_config
    from medvae.training.data import PatchDataset, store_volumes
    from medvae.training.loop import amp_dtype

    tune_allocator()
    n = 16 if args.quick else 160
    cfg = load_config("default", [f"data.store={store_of(args.work, n)}"])
    vols = store_volumes(SliceStore(cfg.data.store), split="train", min_size=cfg.data.min_size,
                         min_foreground=cfg.data.min_foreground)
    torch.manual_seed(cfg.seed)
    model = MaskedVAE(VAEConfig.from_dict(dict(cfg.model.__dict__))).train()
    B, P = cfg.optim.batch_size, cfg.data.patch_size
    warm, steps = (1, 3) if args.quick else (3, 20)
    n_mem = 4
    ds = PatchDataset(vols, recipe=load_recipe(cfg.corruption.recipe), patch_size=P,
                      samples_per_epoch=B * (warm + steps) * 4, seed=cfg.seed, augment=cfg.data.augment)
    adtype = amp_dtype(cfg.amp, torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    loss_cfg = cfg.loss_config

    def step(batch, i):
        x, m, y = batch["image"], batch["mask"], batch["target"]
        with torch.autocast("cpu", dtype=adtype or torch.float32, enabled=adtype is not None):
            recon, mu, logvar = model(x, m)
        loss, _ = masked_vae_loss(recon, y, m, mu, logvar, step=i, cfg=loss_cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()

    out = {"volumes": n, "batch": B, "patch": P, "steps": steps, "amp": cfg.amp}
    # Steps are interleaved (one on tensors, one from the store) and compared by their medians, so
    # that the load of other processes on this shared machine falls on both alike.
    for workers in (0, 1):
        loader = torch.utils.data.DataLoader(ds, batch_size=B, shuffle=True, drop_last=True, num_workers=workers,
                                             generator=torch.Generator().manual_seed(0))
        it = iter(loader)
        memory = [next(it) for _ in range(n_mem)]
        t_mem, t_store = [], []
        for i in range(warm + steps):
            t = time.perf_counter()
            step(memory[i % n_mem], i)
            t1 = time.perf_counter()
            step(next(it), i)
            t2 = time.perf_counter()
            if i >= warm:
                t_mem.append(t1 - t)
                t_store.append(t2 - t1)
        del it
        mem_rate, store_rate = B / float(np.median(t_mem)), B / float(np.median(t_store))
        out[f"workers{workers}"] = {"store_samples_per_s": store_rate, "memory_samples_per_s": mem_rate,
                                    "ratio": store_rate / mem_rate,
                                    "store_mean_samples_per_s": B * steps / sum(t_store),
                                    "memory_mean_samples_per_s": B * steps / sum(t_mem)}
        _log(f"train speed (num_workers={workers}): store {store_rate:.1f}/s, tensors {mem_rate:.1f}/s")
    # the data alone: the same draws from the store and from the same volumes held in RAM
    from medvae.training.data import load_volumes

    mem_vols = load_volumes(ct_copies(args.work, 4), intensity=SliceStore(cfg.data.store).intensity,
                            min_size=cfg.data.min_size, min_foreground=cfg.data.min_foreground)
    store_vols = store_volumes(SliceStore(store_of(args.work, 16)), split="train", min_size=cfg.data.min_size,
                               min_foreground=cfg.data.min_foreground)[:4]
    draws = 32 if args.quick else 256
    dd = {label: PatchDataset(vv, recipe=load_recipe(cfg.corruption.recipe), patch_size=P, samples_per_epoch=draws,
                              seed=cfg.seed, augment=cfg.data.augment)
          for label, vv in (("store", store_vols), ("memory", mem_vols))}
    times: dict[str, list[float]] = {"store": [], "memory": []}
    for i in range(draws):  # interleaved, as the training steps
        for label, d in dd.items():
            t = time.perf_counter()
            d[i]
            times[label].append(time.perf_counter() - t)
    rates = {label: 1.0 / float(np.median(t)) for label, t in times.items()}
    out["data_only_samples_per_s"] = rates
    _log(f"data only: store {rates['store']:.0f}/s, volumes in RAM {rates['memory']:.0f}/s")
    res["train_speed"] = out
    print(f"Training steps of the default model (MaskedVAE {list(cfg.model.channels)}, batch {B}, patch {P}², "
          f"{cfg.amp} autocast, AdamW, clipping) on CPU: fed by a DataLoader over `PatchDataset` reading a store "
          f"of {n} CT volumes from disk (`{cfg.corruption.recipe}` recipe on the fly), against the same steps on "
          f"{n_mem} batches held as tensors in memory; {steps} steps of each, interleaved, after {warm} warm-up; "
          "samples/s from the median step time (a store step includes drawing its batch).\n")
    rows = [[f"num_workers={w}", f"{out[f'workers{w}']['store_samples_per_s']:.1f}",
             f"{out[f'workers{w}']['memory_samples_per_s']:.1f}", f"{out[f'workers{w}']['ratio']:.2f}",
             f"≥ 0.85: {_status(out[f'workers{w}']['ratio'] >= 0.85)}"] for w in (0, 1)]
    print(_table(["loader", "store samples/s", "tensors samples/s", "ratio", "target"], rows) + "\n")
    r = out["data_only_samples_per_s"]
    print(f"The data alone (`PatchDataset[i]`, median over {draws} draws, the `{cfg.corruption.recipe}` recipe "
          f"included): {r['store']:.0f} samples/s from the store against {r['memory']:.0f} samples/s from the "
          f"same 4 volumes held in RAM ({r['store'] / r['memory']:.2f}×).\n")
    lowdose_timing(args, res)


def lowdose_timing(args, res):
    """The CT low-dose simulation of a draw, its cached sparse operators against scikit-image's
    radon/iradon (the same code with the operators switched off): median ms per slice."""
    from skimage.transform import resize

    from medvae.corruption import LowDoseCT
    from medvae.corruption import noise as noise_module
    from medvae.io import load_scan

    vol = load_scan(CT_FILE).array
    mid = np.asarray(vol[:, :, vol.shape[2] // 2], np.float32)
    calls = 10 if args.quick else 100
    rows, out = [], {}
    for size in (128, 256):
        hu = resize(mid, (size, size), preserve_range=True).astype(np.float32)[None]
        t = LowDoseCT(0.25, photons=1e5, seed=3)
        times: dict[str, list[float]] = {"operators": [], "skimage": []}
        limit = noise_module._MAX_OPERATOR_NNZ
        try:
            for i in range(calls + 1):  # interleaved; the first call of each builds or warms, not timed
                for label in times:
                    noise_module._MAX_OPERATOR_NNZ = limit if label == "operators" else 0
                    t0 = time.perf_counter()
                    t(hu)
                    if i:
                        times[label].append(time.perf_counter() - t0)
        finally:
            noise_module._MAX_OPERATOR_NNZ = limit
        ms = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
        out[size] = ms
        rows.append([f"{size}²", f"{ms['operators']:.1f} ms", f"{ms['skimage']:.1f} ms",
                     f"{ms['skimage'] / ms['operators']:.1f}×"])
    res["train_speed"]["lowdose_ms"] = out
    print(f"`LowDoseCT(0.25, photons=1e5)` on the dev head CT's middle slice, median of {calls} interleaved calls:\n")
    print(_table(["slice", "cached sparse operators", "scikit-image radon/iradon", "speed-up"], rows) + "\n")


# --------------------------------------------------------------------------------------------
# restore memory
# --------------------------------------------------------------------------------------------
def stretched_ct(n_slices: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The dev head CT (HU, int16) tiled to ``size``² in-plane and its slices repeated in order to ``n_slices``."""
    from medvae.io import load_scan

    scan = load_scan(CT_FILE)
    reps = max(1, size // scan.array.shape[0])
    vol = np.tile(scan.array, (reps, reps, 1))[:size, :size]
    idx = np.linspace(0, vol.shape[2] - 1, n_slices).round().astype(int)
    affine = scan.affine.copy()
    affine[:3, 2] *= (scan.array.shape[2] - 1) / max(1, n_slices - 1)
    return np.ascontiguousarray(vol[:, :, idx]).astype(np.int16), affine


def write_nifti(path: Path, n_slices: int, size: int = 512) -> Path:
    import nibabel as nib

    if not path.exists():
        vol, affine = stretched_ct(n_slices, size)
        nib.save(nib.Nifti1Image(vol, affine), str(path))
    return path


def write_dicom_series(folder: Path, n_slices: int, size: int = 256) -> Path:
    """A CT series of ``n_slices`` files built from the dev head CT series (same header, new UIDs)."""
    import pydicom
    from pydicom.uid import generate_uid

    if folder.is_dir() and len(list(folder.iterdir())) == n_slices:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    src = sorted((DEV / "dicom" / "series_ct_head").iterdir())
    template = pydicom.dcmread(src[0])
    vol, _ = stretched_ct(n_slices, size)
    series_uid = generate_uid()
    z0 = float(template.ImagePositionPatient[2])
    thick = float(template.get("SliceThickness", 1.5))
    for k in range(n_slices):
        ds = template.copy()
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [template.ImagePositionPatient[0], template.ImagePositionPatient[1], z0 + k * thick]
        ds.Rows, ds.Columns = size, size
        # medvae's arrays are (X, Y): DICOM pixel rows run along Y
        ds.PixelData = np.ascontiguousarray(vol[:, :, k].T).astype(np.int16).tobytes()
        ds.save_as(folder / f"slice_{k + 1:04d}.dcm", enforce_file_format=True)
    return folder


def restore_child(inp: str, out: str, *extra: str) -> int:
    """``medvae restore`` in this process (as the CLI runs it); print its peak RSS as JSON."""
    from medvae.cli import main as cli

    t = time.perf_counter()
    rc = cli(["restore", inp, out, "--device", "cpu", *extra])
    print(json.dumps({"rc": rc, "peak": _peak_bytes(), "seconds": time.perf_counter() - t}))
    return 0


def section_restore_memory(args, res):
    work = args.work / "restore_memory"
    work.mkdir(parents=True, exist_ok=True)
    n_big, n_small = (24, 4) if args.quick else (300, 4)
    d_big, d_small = (60, 6) if args.quick else (600, 60)
    w_big, w_small = (12, 4) if args.quick else (300, 30)
    inputs = {
        "nifti_small": write_nifti(work / f"ct_512x512x{n_small}.nii.gz", n_small),
        "nifti_big": write_nifti(work / f"ct_512x512x{n_big}.nii.gz", n_big),
        "dicom_small": write_dicom_series(work / f"dicom_{d_small}", d_small),
        "dicom_big": write_dicom_series(work / f"dicom_{d_big}", d_big),
        "dicom512_small": write_dicom_series(work / f"dicom512_{w_small}", w_small, size=512),
        "dicom512_big": write_dicom_series(work / f"dicom512_{w_big}", w_big, size=512),
    }
    only = [c for c in (args.cases or "").split(",") if c]
    runs = {}
    for label, inp in inputs.items():
        if only and label not in only:
            continue
        with tempfile.TemporaryDirectory(prefix="medvae_scale_", dir=work) as tmp:
            out = Path(tmp) / ("out.nii.gz" if label.startswith("nifti") else "out")
            r = _child(["--_restore_child", str(inp), str(out)])
            if r["rc"] != 0:
                raise RuntimeError(f"medvae restore {label} failed with exit {r['rc']}")
            runs[label] = r
            _log(f"restore memory {label}: peak {r['peak'] / MIB:.0f} MiB, {r['seconds']:.0f} s")
    vol_bytes = 512 * 512 * n_big * 4
    res["restore_memory"] = {"runs": runs, "nifti_volume_bytes": vol_bytes}
    print(f"`medvae restore IN OUT --device cpu` (default model), each in a fresh process (peak RSS: VmHWM). "
          f"NIfTI: the dev head CT tiled 2×2 to 512² and its slices repeated in order, int16 HU, .nii.gz, "
          f"{n_big} slices ({vol_bytes / MIB:.0f} MiB as float32) against {n_small} slices. DICOM: CT series "
          f"built from the dev head CT series (int16, one file per slice): 256², {d_big} files against {d_small}; "
          f"512² (tiled 2×2), {w_big} files against {w_small}.\n")

    def row(label: str, name: str, target: str = "") -> list[str]:
        r = runs[label]
        return [name, f"{r['peak'] / MIB:.0f} MiB", f"{r['seconds']:.0f} s", target]

    rows = []
    if "nifti_small" in runs:
        rows.append(row("nifti_small", f"NIfTI 512×512×{n_small}", "(runtime peak)"))
    if "nifti_big" in runs:
        target = ""
        if "nifti_small" in runs:
            limit_n = runs["nifti_small"]["peak"] + 1.25 * vol_bytes
            res["restore_memory"]["nifti_limit"] = limit_n
            target = (f"≤ {limit_n / MIB:.0f} MiB (runtime + 1.25× volume): "
                      f"{_status(runs['nifti_big']['peak'] <= limit_n)}")
        rows.append(row("nifti_big", f"NIfTI 512×512×{n_big}", target))
    for key, small, big, size in (("dicom", d_small, d_big, 256), ("dicom512", w_small, w_big, 512)):
        if f"{key}_small" in runs:
            rows.append(row(f"{key}_small", f"DICOM {size}², {small} files"))
        if f"{key}_big" in runs:
            target = ""
            if f"{key}_small" in runs:
                ratio = runs[f"{key}_big"]["peak"] / runs[f"{key}_small"]["peak"]
                res["restore_memory"][f"{key}_ratio"] = ratio
                target = f"≤ 1.2× the {small}-file peak: {ratio:.2f}× {_status(ratio <= 1.2)}"
            rows.append(row(f"{key}_big", f"DICOM {size}², {big} files", target))
    print(_table(["input", "peak RSS", "time", "target"], rows) + "\n")


# --------------------------------------------------------------------------------------------
# batch restore: 1 vs 2 processes, kill and rerun, series per hour
# --------------------------------------------------------------------------------------------
def _medvae() -> list[str]:
    return [sys.executable, "-m", "medvae"]


def section_batch(args, res):
    work = args.work / "batch"
    src = work / "series"
    n = 4 if args.quick else 8
    src.mkdir(parents=True, exist_ok=True)
    head = DEV / "dicom" / "series_ct_head"
    for i in range(n):  # DICOM series folders: symlinks of the dev head CT series (108 slices of 256²)
        p = src / f"series{i:03d}"
        if not p.exists():
            p.symlink_to(head, target_is_directory=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    timing = {}
    # 1 process with both cores (2 threads) is what one runs on this machine; 1 process with 1 thread has
    # the resources of each of the 2 processes, so 2 processes against it is the scaling of sharding
    for label, cmd in (
        ("1 process", [*_medvae(), "restore", str(src), "{out}", "--batch", "--device", "cpu", "--threads", "2"]),
        ("1 process, 1 thread", [*_medvae(), "restore", str(src), "{out}", "--batch", "--device", "cpu",
                                 "--threads", "1"]),
        ("2 processes (torchrun)", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                    "--master_port", "29533", "-m", "medvae", "restore", str(src), "{out}",
                                    "--batch", "--device", "cpu", "--threads", "1"]),
    ):
        out = work / ("out1" if label == "1 process" else "out1t" if label.startswith("1") else "out2")
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        proc = subprocess.run([c.replace("{out}", str(out)) for c in cmd], capture_output=True, text=True, env=env)
        dt = time.perf_counter() - t
        if proc.returncode != 0:
            raise RuntimeError(f"batch {label} failed: {proc.stderr[-1500:]}")
        timing[label] = dt
        _log(f"batch {label}: {n} series in {dt:.0f} s")
    # kill a running batch after about half its series, run it again
    out = work / "out_kill"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [*_medvae(), "restore", str(src), str(out), "--batch", "--device", "cpu", "--threads", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    deadline = time.time() + timing["1 process"] * 3
    while time.time() < deadline and proc.poll() is None:
        done = [p for p in out.glob("series*") if p.is_dir()] if out.is_dir() else []
        if len(done) >= n // 2:
            break
        time.sleep(0.5)
    os.killpg(proc.pid, 9)
    proc.wait()
    done_before = sorted(p.name for p in out.glob("series*") if p.is_dir())
    from medvae.batch import read_summaries

    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env)
    rows = read_summaries(out)
    restored = sorted(r["series"] for r in rows if r["status"] == "restored")
    skipped = sorted(r["series"] for r in rows if r["status"] == "skipped")
    ok_kill = rerun.returncode == 0 and skipped == done_before and len(restored) + len(skipped) == n
    t1, t1t, t2 = timing["1 process"], timing["1 process, 1 thread"], timing["2 processes (torchrun)"]
    per_hour = n / t2 * 3600
    res["batch"] = {"series": n, "slices_per_series": 108, "seconds": timing, "ratio": t2 / t1,
                    "ratio_same_threads": t2 / t1t,
                    "series_per_hour_2proc": per_hour, "series_per_hour_1proc": n / t1 * 3600,
                    "kill": {"done_before_kill": len(done_before), "skipped_on_rerun": len(skipped),
                             "restored_on_rerun": len(restored), "ok": ok_kill}}
    print(f"`medvae restore FOLDER OUT --batch` on {n} DICOM series (the dev head CT series, 108 slices of 256² "
          f"each, CT, default model, CPU), with 1 process (2 torch threads, then 1) and with 2 processes under "
          f"`torchrun --nproc_per_node 2` (1 thread each), wall time including start-up.\n")
    print(_table(["run", "wall time", "series per hour", "2 processes against it (target ≤ 0.6×)"],
                 [["1 process, 2 threads", f"{t1:.0f} s", f"{n / t1 * 3600:.0f}", f"{t2 / t1:.2f}× {_status(t2 / t1 <= 0.6)}"],
                  ["1 process, 1 thread", f"{t1t:.0f} s", f"{n / t1t * 3600:.0f}",
                   f"{t2 / t1t:.2f}× {_status(t2 / t1t <= 0.6)}"],
                  ["2 processes, 1 thread each", f"{t2:.0f} s", f"{per_hour:.0f}", ""]])
          + "\n")
    print(f"Killed (SIGKILL) after {len(done_before)} of {n} series were written, then run again: "
          f"{len(skipped)} skipped, {len(restored)} restored: {_status(ok_kill)}.\n")


# --------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections: {', '.join(SECTIONS)}")
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke test only")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench" / "scale",
                    help="work folder (keeps the prepared stores)")
    ap.add_argument("--out", type=Path, default=None, help="JSON of the figures (default WORK/scale.json)")
    ap.add_argument("--cases", default=None,
                    help="restore_memory: only these inputs (comma-separated: nifti_small, nifti_big, dicom_small, "
                         "dicom_big, dicom512_small, dicom512_big)")
    ap.add_argument("--skip-memory-baseline", action="store_true",
                    help="train_memory: skip the in-memory runs (160 volumes need about 5 GB)")
    ap.add_argument("--_train-child", nargs=argparse.REMAINDER, dest="train_child", help=argparse.SUPPRESS)
    for name, nargs in CHILDREN.items():
        ap.add_argument(f"--{name}", nargs=nargs, dest=name, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.work = args.work.resolve()  # the store records absolute input paths; a relative one would nest
    if args.train_child is not None:
        return train_child(args.train_child)
    for name in CHILDREN:
        if getattr(args, name) is not None:
            return CHILD_FUNCS[name](*getattr(args, name))
    sections = [name for name in args.only.split(",") if name]
    unknown = [name for name in sections if name not in SECTIONS]
    if unknown:  # before the work: a typo after a 35-minute section lost its figures
        ap.error(f"unknown section(s) {', '.join(map(repr, unknown))}; choose from {', '.join(SECTIONS)}")
    from benchmarks.common import check_json_output, write_json

    out = args.out or args.work / "scale.json"
    check_json_output(out)
    args.work.mkdir(parents=True, exist_ok=True)
    res: dict = {"commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                          text=True).stdout.strip(), "date": time.strftime("%Y-%m-%d %H:%M"),
                 "quick": args.quick}
    for name in sections:
        print(f"### {name}\n")
        globals()[f"section_{name}"](args, res)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_json(res, out)  # atomic, strict JSON
    _log(f"figures written to {out}")
    return 0


#: hidden child modes: name -> nargs (filled in by the restore sections)
CHILDREN: dict[str, object] = {"_restore_child": "+"}
CHILD_FUNCS: dict[str, object] = {"_restore_child": restore_child}


if __name__ == "__main__":
    sys.exit(main())
