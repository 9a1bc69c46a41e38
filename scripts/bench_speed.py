#!/usr/bin/env python
"""Speed of medvae on this machine: restore, the restore command, training, FLOP/s and memory.

Restore throughput, the ``medvae restore`` command end to end, training steps, achieved FLOP/s against
a measured peak, and peak memory on a large CT volume.

    python scripts/bench_speed.py [--model M] [--quick] [--skip-bm3d] [--only SECTION,...] [--out speed.json]

Sections (``--only``): ``restore`` (slices/s at 128², 256², 512² vs NL-means and BM3D), ``e2e`` (the
``medvae restore`` command on a ~180-slice ~200² NIfTI vs NL-means and BM3D), ``cli`` (``medvae
--help`` start-up), ``train`` (samples/s of the real data pipeline vs tensors in memory, bf16 and
fp32), ``compute`` (FLOPs per slice, achieved GFLOP/s vs a measured conv2d/matmul peak), ``memory``
(peak RSS restoring a 512×512×300 CT volume, in a clean subprocess).

All inputs are built from the real development scans in ../shared/data/dev (each section says how).
The process calls ``medvae.runtime.tune_allocator()`` first, as the medvae CLI does: the numbers are
those of the tuned allocator (it cannot be undone within one process). ``--quick`` runs every
section on a few slices, for smoke tests only.
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEV = ROOT.parent / "shared" / "data" / "dev"
CT_FILE = DEV / "nifti" / "invesalius_cranium_ct.nii.gz"   # 256 x 256 x 108, HU
MR_FILE = DEV / "nifti" / "heudiconv_b0dwi_1.nii.gz"       # 152 x 150 x 81, 1.5 mm
DEFAULT_OUT = ROOT / "runs" / "bench" / "speed.json"
SECTIONS = ("restore", "e2e", "cli", "train", "compute", "memory")
SIZES = (128, 256, 512)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _status(ok: bool) -> str:
    return "**PASS**" if ok else "**MISS**"


def _timed(fn, *a, **k):
    t = time.perf_counter()
    out = fn(*a, **k)
    return out, time.perf_counter() - t


def _noisy_slices(base, size, seed_tag):
    """``base`` window-unit slices resampled to ``size``² with Gaussian noise 0.05 (seeded per slice)."""
    from benchmarks import common as bench

    spec = bench.CORRUPTION_BY_NAME["gaussian_0.05"]
    out = []
    for k, b in base:
        s = b if b.shape == (size, size) else bench.resize_slice(b, size)
        out.append(bench.corrupt_slice(spec, s, bench.case_seed(0, seed_tag, CT_FILE.name, k))[0])
    return out


def _baseline_rate(fn, slices):
    t = time.perf_counter()
    for s in slices:
        fn(s)
    return len(slices) / (time.perf_counter() - t)


# --------------------------------------------------------------------------------------------
# restore throughput
# --------------------------------------------------------------------------------------------
def section_restore(lm, args, res):
    from benchmarks import common as bench
    from medvae.baselines import bm3d, nl_means
    from medvae.io import load_scan
    from medvae.restore import restore_volume

    n_med = {128: 8, 256: 8, 512: 4} if args.quick else {128: 64, 256: 48, 512: 24}
    n_nl = {128: 2, 256: 2, 512: 1} if args.quick else {128: 32, 256: 24, 512: 12}
    n_bm = {128: 1, 256: 1, 512: 1} if args.quick else {128: 4, 256: 3, 512: 2}
    scan = load_scan(CT_FILE)
    norm, _ = bench.to_window_units(scan.array, "CT")
    ks = bench.select_slices(norm, "CT", max_slices=max(n_med.values()))
    base = [(k, norm[:, :, k]) for k in ks]
    print(f"Input: {len(ks)} slices with >= 10 % foreground of the dev head CT {CT_FILE.name} "
          f"({'x'.join(map(str, scan.array.shape))}, HU), evenly spread; resampled bilinearly to 128² "
          "(anti-aliased) and 512², native at 256²; Gaussian noise sigma 0.05 of the window added. "
          "medvae: restore_volume on the HU stack, modality CT, batch 8, after a one-batch warm-up, "
          "no mask (every pixel). Baselines: one call per slice (blind sigma), BM3D on a subset.\n")
    rows = []
    for size in SIZES:
        noisy = _noisy_slices(base[: n_med[size]], size, "speed_restore")
        hu = np.stack(noisy, axis=2) * 2000.0 - 1000.0
        restore_volume(hu[:, :, :8], model=lm, modality="CT", batch_size=8)   # warm-up
        _, dt = _timed(restore_volume, hu, model=lm, modality="CT", batch_size=8)
        med = len(noisy) / dt
        nl = _baseline_rate(nl_means, noisy[: n_nl[size]])
        bm = float("nan") if args.skip_bm3d else _baseline_rate(bm3d, noisy[: n_bm[size]])
        _log(f"restore {size}²: medvae {med:.2f}/s, nl_means {nl:.2f}/s, bm3d {bm:.3f}/s")
        res.setdefault("restore", {})[str(size)] = {
            "medvae_slices_per_s": med, "nl_means_slices_per_s": nl, "bm3d_slices_per_s": bm,
            "n_medvae": len(noisy), "n_nl_means": n_nl[size], "n_bm3d": 0 if args.skip_bm3d else n_bm[size]}
        rows.append([f"{size}²", f"{med:.2f}", f"{nl:.2f}", "—" if args.skip_bm3d else f"{bm:.3f}",
                     f"{med / nl:.2f}×", "—" if args.skip_bm3d else f"{med / bm:.1f}×",
                     f"{len(noisy)} / {n_nl[size]} / {0 if args.skip_bm3d else n_bm[size]}"])
    print(bench.markdown_table(["size", "medvae slices/s", "NL-means slices/s", "BM3D slices/s",
                                "medvae / NL-means", "medvae / BM3D", "slices timed (medvae / NL / BM3D)"],
                               rows) + "\n")


# --------------------------------------------------------------------------------------------
# the restore command end to end
# --------------------------------------------------------------------------------------------
def _medvae_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("medvae")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "medvae"]


def build_mr_series(path: Path, n_slices: int, size: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """The dev MR b0dwi volume resampled (trilinear) to ``size`` x ``size`` x ``n_slices``, saved as NIfTI."""
    import nibabel as nib
    from scipy import ndimage

    from medvae.io import load_scan

    scan = load_scan(MR_FILE)
    a = scan.array
    zoom = (size / a.shape[0], size / a.shape[1], n_slices / a.shape[2])
    vol = ndimage.zoom(a, zoom, order=1).astype(np.float32)
    vol = np.maximum(vol, 0)
    affine = np.array(scan.affine, dtype=np.float64)
    affine[:3, :3] = affine[:3, :3] / np.array(zoom)[None, :]
    nib.save(nib.Nifti1Image(vol, affine), str(path))
    return vol, affine


def section_e2e(args, res):
    from benchmarks import common as bench
    from medvae.baselines import bm3d, nl_means

    n, size = (16, 200) if args.quick else (180, 200)
    n_bm = 1 if args.quick else 8
    with tempfile.TemporaryDirectory(prefix="medvae_bench_") as tmp:
        src, dst = Path(tmp) / "series.nii.gz", Path(tmp) / "restored.nii.gz"
        vol, _ = build_mr_series(src, n, size)
        print(f"Input: the dev MR {MR_FILE.name} (152×150×81, 1.5 mm) resampled trilinearly to "
              f"{size}×{size}×{n} and written as a gzipped NIfTI ({vol.nbytes / 2**20:.0f} MiB float32). "
              f"medvae: the whole `medvae restore IN OUT --model {args.model}` command as a subprocess "
              "(start-up, reading, restoring every pixel, writing .nii.gz). Baselines: in-process on the "
              "same slices in window units (no start-up, no I/O); NL-means on every slice, BM3D on "
              f"{n_bm} evenly spaced slice(s), extrapolated to {n}.\n")
        cmd = _medvae_cmd()
        subprocess.run(cmd + ["--help"], capture_output=True)   # warm the file cache
        full = cmd + ["restore", str(src), str(dst), "--model", str(args.model), "--overwrite"]
        proc, dt = _timed(subprocess.run, full, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"`medvae restore` failed (exit {proc.returncode}): {proc.stderr.strip()[-400:]}\n")
            return
        _log(f"e2e: medvae restore {dt:.1f} s ({proc.stdout.strip()})")
        norm, _ = bench.to_window_units(vol, "MR")
        slices = [np.ascontiguousarray(norm[:, :, k]) for k in range(n)]
        t_nl = n / _baseline_rate(nl_means, slices)
        _log(f"e2e: nl_means {t_nl:.1f} s")
        if args.skip_bm3d:
            t_bm = float("nan")
        else:
            pick = bench.cap_evenly(list(range(n)), n_bm)
            t_bm = n / _baseline_rate(bm3d, [slices[k] for k in pick])
            _log(f"e2e: bm3d {t_bm:.1f} s (extrapolated)")
    res["e2e"] = {"slices": n, "size": size, "medvae_command_s": dt, "medvae_stdout": proc.stdout.strip(),
                  "nl_means_s": t_nl, "bm3d_s_extrapolated": t_bm, "bm3d_slices_timed": 0 if args.skip_bm3d else n_bm,
                  "command": " ".join(full)}
    rows = [["medvae restore (command)", f"{dt:.1f}", f"{dt / n * 1000:.0f}", ""],
            ["NL-means (fast mode)", f"{t_nl:.1f}", f"{t_nl / n * 1000:.0f}",
             f"medvae <= 3× NL-means: {_status(dt <= 3 * t_nl)} (medvae = {dt / t_nl:.2f}× NL-means)"]]
    if not args.skip_bm3d:
        rows.append([f"BM3D (extrapolated from {n_bm})", f"{t_bm:.1f}", f"{t_bm / n * 1000:.0f}",
                     f"medvae <= BM3D / 10: {_status(dt <= t_bm / 10)} (medvae = 1/{t_bm / dt:.1f} of BM3D)"])
    print(bench.markdown_table(["method", "total s", "ms/slice", "target"], rows) + "\n")


def section_cli(args, res):
    from benchmarks import common as bench

    reps = 2 if args.quick else 5
    cmd = _medvae_cmd()
    rows = []
    for label, extra, target in (("medvae --help", ["--help"], 1.5), ("medvae restore --help", ["restore", "--help"], None)):
        warm = subprocess.run(cmd + extra, capture_output=True, text=True)   # also warms the file cache
        if warm.returncode != 0:
            rows.append([f"`{label}`", "—", "—", f"failed (exit {warm.returncode}): {warm.stderr.strip()[-200:]}"])
            continue
        times = [_timed(subprocess.run, cmd + extra, capture_output=True)[1] for _ in range(reps)]
        res.setdefault("cli", {})[label] = {"min_s": min(times), "median_s": statistics.median(times), "runs": times}
        verdict = f"< {target} s: {_status(statistics.median(times) < target)}" if target else "report"
        rows.append([f"`{label}`", f"{min(times):.2f}", f"{statistics.median(times):.2f}", verdict])
    print(f"`{' '.join(cmd)}` as a subprocess, {reps} runs after one warm-up run.\n")
    print(bench.markdown_table(["command", "min s", "median s", "target (median)"], rows) + "\n")


# --------------------------------------------------------------------------------------------
# training throughput
# --------------------------------------------------------------------------------------------
def _train_setup(args):
    import torch

    from medvae.corruption.recipes import load_recipe
    from medvae.intensity import IntensityPolicy
    from medvae.models.vae import MaskedVAE, VAEConfig
    from medvae.training.config import expand_paths, load_config
    from medvae.training.data import PatchDataset, load_volumes

    cfg = load_config("default")
    paths = expand_paths(cfg.data.paths, "data.paths", exclude=cfg.data.exclude)
    val = {p.resolve() for p in expand_paths(cfg.data.val_paths, "data.val_paths")}
    paths = [p for p in paths if p.resolve() not in val]
    if args.quick:
        paths = paths[:2]
    intensity = IntensityPolicy(ct_window=tuple(cfg.intensity.ct_window),
                                mr_percentiles=tuple(cfg.intensity.mr_percentiles))
    vols = load_volumes(paths, intensity=intensity, min_size=cfg.data.min_size,
                        min_foreground=cfg.data.min_foreground)
    torch.manual_seed(cfg.seed)
    model = MaskedVAE(VAEConfig.from_dict(dict(cfg.model.__dict__)))
    return cfg, vols, model, PatchDataset, load_recipe


def section_train(args, res):
    import torch

    from benchmarks import common as bench
    from medvae.losses import masked_vae_loss
    from medvae.runtime import pick_device

    cfg, vols, model, PatchDataset, load_recipe = _train_setup(args)
    dev = pick_device("auto")
    model = model.to(dev).train()
    B, P = cfg.optim.batch_size, cfg.data.patch_size
    warm, steps = (1, 2) if args.quick else (3, 20)
    n_mem = min(steps, 4)
    ds = PatchDataset(vols, recipe=load_recipe(cfg.corruption.recipe), patch_size=P,
                      samples_per_epoch=B * (warm + steps + n_mem), seed=cfg.seed, augment=cfg.data.augment)
    loader = torch.utils.data.DataLoader(ds, batch_size=B, shuffle=False, drop_last=True,
                                         num_workers=cfg.data.num_workers, pin_memory=dev.type == "cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    loss_cfg = cfg.loss_config

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def step(batch, adtype, i):
        x, m, y = (batch[k].to(dev, non_blocking=True) for k in ("image", "mask", "target"))
        with torch.autocast(dev.type, dtype=adtype or torch.float32, enabled=adtype is not None):
            recon, mu, logvar = model(x, m)
        loss, _ = masked_vae_loss(recon, y, m, mu, logvar, step=i, cfg=loss_cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()

    # the data pipeline alone
    it = iter(loader)
    next(it)
    t = time.perf_counter()
    for _ in range(min(steps, 4)):
        next(it)
    data_rate = B * min(steps, 4) / (time.perf_counter() - t)
    it = iter(loader)
    memory = [next(it) for _ in range(n_mem)]

    out = {"batch": B, "patch": P, "steps_timed": steps, "warmup_steps": warm,
           "train_volumes": len(vols), "data_only_samples_per_s": data_rate, "num_workers": cfg.data.num_workers}
    rows = []
    for label, adtype in (("bf16 autocast", torch.bfloat16), ("fp32", None)):
        for i in range(warm):
            step(memory[i % n_mem], adtype, i)
        sync()
        t = time.perf_counter()
        for i in range(steps):
            step(memory[i % n_mem], adtype, i)
        sync()
        mem_rate = B * steps / (time.perf_counter() - t)
        ds.set_epoch(ds.epoch + 1)
        it = iter(loader)
        for i in range(warm):
            step(next(it), adtype, i)
        sync()
        t = time.perf_counter()
        for i in range(steps):
            step(next(it), adtype, i)
        sync()
        pipe_rate = B * steps / (time.perf_counter() - t)
        ratio = pipe_rate / mem_rate
        _log(f"train {label}: pipeline {pipe_rate:.1f}/s, in memory {mem_rate:.1f}/s")
        out[label] = {"pipeline_samples_per_s": pipe_rate, "memory_samples_per_s": mem_rate, "ratio": ratio}
        rows.append([label, f"{pipe_rate:.1f}", f"{mem_rate:.1f}", f"{ratio:.2f}", f">= 0.85: {_status(ratio >= 0.85)}"])
    res["train"] = out
    print(f"The real pipeline of the default config: {len(vols)} training volumes read through medvae.io, "
          f"`PatchDataset` with the `{cfg.corruption.recipe}` recipe, DataLoader with "
          f"num_workers={cfg.data.num_workers}, batch {B}, patch {P}², MaskedVAE {list(cfg.model.channels)}, "
          f"masked VAE loss, AdamW, gradient clipping, on {dev}; {steps} steps timed after {warm} warm-up "
          f"step(s). \"In memory\": the same steps on {n_mem} batches drawn beforehand. The data pipeline "
          f"alone draws {data_rate:.0f} samples/s.\n")
    print(bench.markdown_table(["precision", "pipeline samples/s", "in-memory samples/s", "ratio", "target"], rows) + "\n")


# --------------------------------------------------------------------------------------------
# compute: FLOPs and peak
# --------------------------------------------------------------------------------------------
def _best_time(fn, reps):
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure_peaks(quick: bool) -> dict[str, float]:
    """GFLOP/s of a 3×3 64→64 conv2d (NCHW and channels-last) and a square matmul, fp32 and bf16."""
    import torch
    import torch.nn.functional as F

    size, batch, n, reps = (128, 1, 512, 2) if quick else (256, 4, 2048, 5)
    out = {}
    with torch.inference_mode():
        for dt_name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            for cl in (False, True):
                x = torch.randn(batch, 64, size, size).to(dt)
                w = torch.randn(64, 64, 3, 3).to(dt)
                if cl:
                    x, w = x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last)
                flops = 2.0 * batch * 64 * 64 * 9 * size * size
                t = _best_time(lambda: F.conv2d(x, w, padding=1), reps)
                out[f"conv_{dt_name}{'_channels_last' if cl else ''}"] = flops / t / 1e9
            a, b = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
            out[f"matmul_{dt_name}"] = 2.0 * n ** 3 / _best_time(lambda: a @ b, reps) / 1e9
    out["conv_size"], out["conv_batch"], out["matmul_n"] = size, batch, n
    return out


def count_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


def section_compute(lm, args, res):
    import torch

    from benchmarks import common as bench

    net = lm.model.eval()
    fl = {}
    for size in SIZES:
        x = torch.rand(1, 1, size, size)
        m = torch.ones_like(x)
        fl[size] = count_flops(lambda: net.posterior_mean(x, m))
    # one training step (forward + backward) per 128² sample, as in the default config
    from medvae.models.vae import MaskedVAE

    train_net = MaskedVAE(lm.config).train()
    xb = torch.rand(4, 1, 128, 128)
    mb = torch.ones_like(xb)

    def fwd_bwd():
        recon, mu, logvar = train_net(xb, mb)
        (recon.abs().mean() + mu.pow(2).mean() + logvar.mean()).backward()
    fl_train = count_flops(fwd_bwd) / 4
    peaks = measure_peaks(args.quick)
    _log(f"compute: peaks {', '.join(f'{k} {v:.0f}' for k, v in peaks.items())}")
    res["compute"] = {"flops_per_slice": {str(k): v for k, v in fl.items()}, "train_flops_per_sample_128": fl_train,
                      "peaks_gflops": peaks}
    p32 = max(peaks["matmul_fp32"], peaks["conv_fp32"], peaks["conv_fp32_channels_last"])
    p16 = max(peaks["matmul_bf16"], peaks["conv_bf16"], peaks["conv_bf16_channels_last"])
    print(f"FlopCounterMode (2 FLOPs per multiply-add) of the model's posterior mean ({lm.source}). Peak: "
          f"best of a few runs of conv2d 3×3 64→64 on {peaks['conv_batch']}×64×{peaks['conv_size']}² and a "
          f"{peaks['matmul_n']}³ matmul.\n")
    print(bench.markdown_table(
        ["operation", "fp32 GFLOP/s", "bf16 GFLOP/s"],
        [["conv2d 3×3 64→64 (NCHW)", f"{peaks['conv_fp32']:.0f}", f"{peaks['conv_bf16']:.0f}"],
         ["conv2d 3×3 64→64 (channels-last)", f"{peaks['conv_fp32_channels_last']:.0f}",
          f"{peaks['conv_bf16_channels_last']:.0f}"],
         [f"matmul {peaks['matmul_n']}³", f"{peaks['matmul_fp32']:.0f}", f"{peaks['matmul_bf16']:.0f}"]]) + "\n")
    rows = []
    for size in SIZES:
        r = res.get("restore", {}).get(str(size))
        ach = fl[size] * r["medvae_slices_per_s"] / 1e9 if r else float("nan")
        rows.append([f"restore {size}² (fp32)", f"{fl[size] / 1e9:.2f}",
                     f"{r['medvae_slices_per_s']:.2f} slices/s" if r else "— (run the restore section)",
                     f"{ach:.1f}" if r else "—", f"{100 * ach / p32:.0f} %" if r else "—"])
    tr = res.get("train")
    for label, key, peak in (("train 128² bf16", "bf16 autocast", p16), ("train 128² fp32", "fp32", p32)):
        if tr and key in tr:
            rate = tr[key]["memory_samples_per_s"]
            ach = fl_train * rate / 1e9
            rows.append([label + " (in memory)", f"{fl_train / 1e9:.2f}", f"{rate:.1f} samples/s", f"{ach:.1f}",
                         f"{100 * ach / peak:.0f} %"])
        else:
            rows.append([label, f"{fl_train / 1e9:.2f}", "— (run the train section)", "—", "—"])
    print(bench.markdown_table(["workload", "GFLOP per slice/sample", "rate", "achieved GFLOP/s",
                                "of the best peak of its precision"], rows) + "\n")


# --------------------------------------------------------------------------------------------
# memory (child process)
# --------------------------------------------------------------------------------------------
def memory_child(npy: str, model: str, tune: bool = True) -> int:
    """Restore the volume in ``npy`` as CT, then print one JSON line of RSS figures."""
    from medvae.runtime import tune_allocator

    if tune:
        tune_allocator()
    from benchmarks import common as bench
    from medvae.models.checkpoint import load_model
    from medvae.restore import restore_volume

    lm = load_model(model)
    vol = np.load(npy)
    rss0, peak0 = bench.current_rss_bytes(), bench.max_rss_bytes()
    t = time.perf_counter()
    mean, _ = restore_volume(vol, model=lm, modality="CT", batch_size=8)
    dt = time.perf_counter() - t
    print(json.dumps({"rss_before": rss0, "peak_before": peak0, "peak": bench.max_rss_bytes(),
                      "rss_after": bench.current_rss_bytes(), "seconds": dt, "volume_bytes": vol.nbytes,
                      "shape": list(vol.shape), "out_dtype": str(mean.dtype)}))
    return 0


def section_memory(args, res):
    from benchmarks import common as bench
    from medvae.io import load_scan

    shape = (512, 512, 24) if args.quick else (512, 512, 300)
    ct = load_scan(CT_FILE).array
    vol = bench.stretch_volume(ct, shape)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="medvae_bench_") as tmp:
        npy = Path(tmp) / "ct.npy"
        np.save(npy, vol)
        size = vol.nbytes
        del vol
        for label, extra in (("tuned allocator (as the CLI)", []), ("glibc defaults", ["--_no-tune"])):
            # restore_volume tunes the allocator itself unless MEDVAE_TUNE_MALLOC=0 says not to
            env = {**os.environ, **({"MEDVAE_TUNE_MALLOC": "0"} if extra else {})}
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_memory-child", str(npy),
                                   "--model", str(args.model), *extra], capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(f"memory child ({label}) failed (exit {proc.returncode}): {proc.stderr.strip()[-400:]}\n")
                continue
            runs[label] = json.loads(proc.stdout.strip().splitlines()[-1])
            _log(f"memory ({label}): peak {runs[label]['peak'] / 2**20:.0f} MiB")
    if not runs:
        return
    res["memory"] = {"volume_bytes": size, "shape": list(shape), "runs": runs}
    mib = 2 ** 20
    print(f"The dev head CT {CT_FILE.name} (256×256×108, HU) tiled 2×2 in-plane and its slices repeated in "
          f"order to {shape[0]}×{shape[1]}×{shape[2]} ({size / mib:.0f} MiB float32), loaded from .npy in a "
          "fresh subprocess and restored from that in-memory array with restore_volume (CT, batch 8, no mask); "
          "once with tune_allocator() as the CLI calls it, once with glibc's defaults. Peak RSS: VmHWM of "
          "that process (volume, result, model, torch and the batch's activations).\n")

    def cell(r, key):
        v = r[key] if isinstance(key, str) else key(r)
        return f"{v / mib:.0f} MiB ({v / size:.2f}×)"
    labels = list(runs)
    print(bench.markdown_table(
        ["quantity (× the volume)", *labels],
        [["volume (float32)", *[f"{size / mib:.0f} MiB (1.00×)" for _ in labels]],
         ["RSS before restoring (imports, model, volume)", *[cell(runs[k], "rss_before") for k in labels]],
         ["**peak RSS of the process**", *[cell(runs[k], "peak") for k in labels]],
         ["peak − RSS before (restoring itself)", *[cell(runs[k], lambda r: r["peak"] - r["rss_before"]) for k in labels]],
         ["restore time", *[f"{runs[k]['seconds']:.1f} s ({shape[2] / runs[k]['seconds']:.2f} slices/s)" for k in labels]],
         ]) + "\n")
    for k in labels:
        r = runs[k]
        print(f"- {k}: peak RSS < 3× the volume: {_status(r['peak'] < 3 * size)} ({r['peak'] / size:.2f}×)")
    print()


# --------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default", help="default | PATH.pt | runs:/ID/model | models:/NAME/V")
    ap.add_argument("--quick", action="store_true", help="a few slices per section (smoke test)")
    ap.add_argument("--skip-bm3d", action="store_true", help="leave BM3D out")
    ap.add_argument("--only", default=None, help=f"comma-separated sections: {', '.join(SECTIONS)}")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help=f"JSON with all numbers (default {DEFAULT_OUT})")
    ap.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_no-tune", dest="no_tune", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        return memory_child(args.memory_child, args.model, tune=not args.no_tune)
    from benchmarks.common import check_json_output

    check_json_output(args.out)  # before the work: an unwritable --out lost the run's numbers after it

    sections = SECTIONS
    if args.only:
        sections = tuple(s.strip() for s in args.only.split(",") if s.strip())
        bad = sorted(set(sections) - set(SECTIONS))
        if bad:
            ap.error(f"unknown section(s) {bad}; choose from {', '.join(SECTIONS)}")
    if not args.skip_bm3d:
        import importlib.util

        if importlib.util.find_spec("bm3d") is None:
            print("note: package bm3d not installed (pip install 'medvae-restore[bench]'): BM3D skipped")
            args.skip_bm3d = True

    from medvae.runtime import tune_allocator

    tune_allocator()  # as the medvae CLI does; cannot be undone in this process
    from benchmarks import common as bench
    from medvae.errors import MedvaeError
    from medvae.models.checkpoint import load_model, require_slice_restorer

    try:
        lm = require_slice_restorer(load_model(args.model))
    except MedvaeError as exc:
        print(f"bench_speed: error: {exc}", file=sys.stderr)
        return 2
    info = bench.run_info(None if argv is None else ["scripts/bench_speed.py", *map(str, argv)])
    minfo = bench.model_info(lm)
    print("# medvae speed\n")
    print("\n".join(bench.header_lines(info, minfo)))
    env = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MALLOC_MMAP_MAX_",
                                      "MALLOC_TRIM_THRESHOLD_") if k in os.environ}
    print(f"allocator: medvae.runtime.tune_allocator() called (as the CLI does); environment {env or '{}'}")
    print(f"mode:     {'QUICK (smoke test: too few slices for real numbers)' if args.quick else 'full'}; "
          f"sections {', '.join(sections)}\n")
    res = {"run": info, "model": minfo, "quick": args.quick, "env": env}
    titles = {"restore": "Restore throughput", "e2e": "`medvae restore` end to end", "cli": "Command start-up",
              "train": "Training throughput", "compute": "Compute", "memory": "Memory"}
    for name in SECTIONS:
        if name not in sections:
            continue
        print(f"## {titles[name]}\n")
        t = time.perf_counter()
        if name == "restore":
            section_restore(lm, args, res)
        elif name == "e2e":
            section_e2e(args, res)
        elif name == "cli":
            section_cli(args, res)
        elif name == "train":
            section_train(args, res)
        elif name == "compute":
            section_compute(lm, args, res)
        elif name == "memory":
            section_memory(args, res)
        _log(f"{name}: {time.perf_counter() - t:.0f} s")
    out = bench.write_json(res, args.out)
    print(f"numbers: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
