"""The training loop: one CPU, one GPU (with AMP), or many processes under ``torchrun`` (DDP).

* Rank 0 alone validates, logs to MLflow and writes checkpoints; the other ranks wait at a barrier.
* ``last.pt`` and ``best.pt`` are written atomically at the end of every epoch. ``resume=True``
  restarts from ``last.pt`` at the next epoch; because the data and the latent noise of an epoch are
  functions of ``(seed, epoch)``, a resumed run takes exactly the steps an uninterrupted one would.
* A NaN or Inf loss stops training before the optimizer step, so ``last.pt`` stays the last good one.
* Tracking never stops training: the MLflow run starts when training does, and what an unreachable
  or dead server could not take is kept in ``OUTPUT_DIR/tracking_pending.jsonl`` for
  ``medvae track sync OUTPUT_DIR`` (:class:`medvae.tracking.RunLogger`).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from medvae.errors import MedvaeError
from medvae.intensity import IntensityPolicy
from medvae.losses import masked_vae_loss
from medvae.io.atomic import exclusive
from medvae.models.checkpoint import atomic_torch_save, checkpoint_dict, read_checkpoint, warm_start, weights_path
from medvae.models.vae import MaskedVAE, VAEConfig
from medvae.runtime import env_int, pick_device, termination_as_interrupt, tune_allocator
from medvae.training.config import TrainConfig, config_source

log = logging.getLogger("medvae.train")


class TrainingStopped(MedvaeError):
    """Training stopped on a non-finite loss; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    output_dir: Path
    epochs_run: int
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)   # per-step losses (rank 0)
    val: list[dict[str, float]] = field(default_factory=list)       # per-epoch validation
    run_id: str | None = None
    tracking_skipped: str | None = None                             # why, when records were kept locally
    model: MaskedVAE | None = None                                  # the trained model (every rank)
    epochs_planned: int = 0                                         # optim.epochs, or what fit max_minutes
    epochs_done_before: int = 0                                     # a resumed finished run: its epochs
    exported: bool = False                  # a resumed finished run wrote the model its stopped run did not


_clock = time.monotonic  # the training's wall clock (tests replace it)


# -- set-up helpers ---------------------------------------------------------------------------------

def dist_info() -> tuple[int, int, int]:
    """``(rank, local_rank, world)`` under torchrun, which sets them all; ``(0, 0, 1)`` without WORLD_SIZE
    (a stray RANK made DistributedSampler raise "Invalid rank 1"); a malformed one is a one-line error."""
    if "WORLD_SIZE" not in os.environ:
        return 0, 0, 1
    hint = "unset it, or start the training with torchrun"
    return env_int("RANK", 0, hint=hint), env_int("LOCAL_RANK", 0, hint=hint), env_int("WORLD_SIZE", 1, hint=hint)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "auto":
        return torch.float16 if device.type == "cuda" else None
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]  # the config's Literal


# -- validation -------------------------------------------------------------------------------------

@torch.no_grad()
def validate(model: MaskedVAE, val: list[dict[str, Any]], device: torch.device) -> dict[str, float]:
    """PSNR/SSIM (data range 1 on the normalized images) over the whole slice and over the mask."""
    from medvae.evaluate import psnr, ssim

    model.eval()
    rows: dict[str, list[float]] = {"psnr": [], "ssim": [], "psnr_mask": [], "ssim_mask": [],
                                    "psnr_input": []}
    for item in val:
        x = torch.from_numpy(item["image"])[None].to(device)
        m = torch.from_numpy(item["mask"])[None].to(device)
        out = model.posterior_mean(x, m)[0, 0].float().cpu().numpy()
        ref, mask = item["target"][0], item["mask"][0] > 0.5
        rows["psnr"].append(psnr(ref, out, data_range=1.0))
        rows["ssim"].append(ssim(ref, out, data_range=1.0))
        rows["psnr_input"].append(psnr(ref, item["image"][0], data_range=1.0))
        if mask.any() and not mask.all():
            rows["psnr_mask"].append(psnr(ref, out, data_range=1.0, mask=mask))
            rows["ssim_mask"].append(ssim(ref, out, data_range=1.0, mask=mask))
    return {f"val_{k}": float(np.mean(v)) for k, v in rows.items() if v}


@torch.no_grad()
def review_figure(model: MaskedVAE, val: list[dict[str, Any]], device: torch.device, n_samples: int = 8):
    """The epoch's review figure (:func:`medvae.report.review_figure`, one row per fixed validation
    slice): corrupted | restored | reference | abs error | uncertainty, in the model's [0, 1] units."""
    from medvae.report import review_figure as draw

    model.eval()
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for item in val:
        x = torch.from_numpy(item["image"])[None].to(device)
        m = torch.from_numpy(item["mask"])[None].to(device)
        mean, std = (t[0, 0].float().cpu().numpy() for t in model.predictive(x, m, n_samples, generator=gen))
        row = {"corrupted": item["image"][0], "restored": mean, "reference": item["target"][0],
               "uncertainty": std}
        if 0 < float(item["mask"].mean()) < 1:  # holes: outline them; global noise has no outline
            row["mask"] = item["mask"][0] > 0.5
        rows.append(row)
    return draw(rows, title="validation slices", window=(0, 1), error_range=0.1,
                row_labels=[item["name"] for item in val])


# -- the parts of a training run --------------------------------------------------------------------

@dataclass
class _Runtime:
    """Where this process trains: its rank, device and precision."""

    rank: int
    world: int
    device: torch.device
    adtype: torch.dtype | None
    own_group: bool            # this call started the process group and ends it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


@dataclass
class _Optimization:
    """The model and everything that moves its weights; all of it is checkpointed."""

    model: MaskedVAE
    net: torch.nn.Module       # the model, wrapped in DDP when distributed
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler


def _setup_runtime(cfg: TrainConfig) -> _Runtime:
    """Pick the device, join the process group under torchrun, set threads and precision."""
    rank, local_rank, world = dist_info()
    try:
        device = pick_device(cfg.device, local_rank)
    except MedvaeError as exc:  # e.g. a config for a GPU machine on a CPU one: name the config file
        raise MedvaeError(f"config key 'device': {exc.message}", config_source(cfg, "device")) from None
    adtype = amp_dtype(cfg.amp, device)
    if world > 1 and cfg.optim.batch_size % world:  # each rank takes batch_size / world samples
        raise MedvaeError(f"config key 'optim.batch_size' {cfg.optim.batch_size} is not a multiple of the "
                          f"{world} processes; the global batch is split evenly between them", config_source(cfg))
    own_group = world > 1 and not dist.is_initialized()
    if own_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tune_allocator()
    return _Runtime(rank=rank, world=world, device=device, adtype=adtype, own_group=own_group)


def make_scheduler(opt: torch.optim.Optimizer, *, total_steps: int, kind: str
                   ) -> torch.optim.lr_scheduler.LRScheduler:
    """Learning-rate schedule, stepped once per optimizer step.

    ``"cosine"``: a linear warm-up over ``min(100, total_steps // 20)`` steps (at least 1) from
    ``lr / warm`` to ``lr``, then a cosine decay to 0 at ``total_steps``. ``"none"``: constant.

    Examples
    --------
    >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    >>> sched = make_scheduler(opt, total_steps=40, kind="cosine")   # warm-up: 2 steps
    >>> lrs = []
    >>> for _ in range(40):
    ...     lrs.append(opt.param_groups[0]["lr"]); opt.step(); sched.step()
    >>> [round(v, 3) for v in (lrs[0], lrs[1], lrs[2], lrs[21], lrs[39])]
    [0.5, 1.0, 1.0, 0.5, 0.002]
    """
    schedulers = torch.optim.lr_scheduler
    if kind == "none" or total_steps <= 0:
        return schedulers.ConstantLR(opt, factor=1.0, total_iters=0)
    warm = min(100, max(1, total_steps // 20))
    warmup = schedulers.LinearLR(opt, start_factor=1.0 / warm, end_factor=1.0, total_iters=max(1, warm - 1))
    decay = schedulers.CosineAnnealingLR(opt, T_max=max(1, total_steps - warm), eta_min=0.0)
    return schedulers.SequentialLR(opt, [warmup, decay], milestones=[warm])


def fit_epochs(*, planned: int, done: int, elapsed_s: float, epoch_s: float, budget_s: float) -> int:
    """How many epochs in all fit a wall-clock budget, after ``done`` epochs in ``elapsed_s``.

    Never fewer than ``done`` (they are trained) nor more than ``planned``.

    Examples
    --------
    >>> fit_epochs(planned=50, done=1, elapsed_s=70.0, epoch_s=60.0, budget_s=480.0)   # 410 s left: 6 more
    7
    >>> fit_epochs(planned=5, done=1, elapsed_s=70.0, epoch_s=60.0, budget_s=480.0)
    5
    """
    if epoch_s <= 0:
        return planned
    return max(done, min(planned, done + int((budget_s - elapsed_s) // epoch_s)))


def refit_scheduler(o: _Optimization, cfg: TrainConfig, *, total_steps: int, step: int) -> None:
    """Replace ``o.sched`` by the schedule of ``total_steps`` steps, at ``step``: a run cut to a time
    budget still ends its cosine decay at 0 instead of stopping at a high learning rate."""
    for g in o.opt.param_groups:  # as a new schedule starts (its warm-up multiplies the current lr)
        g["lr"] = g["initial_lr"]
    sched = make_scheduler(o.opt, total_steps=total_steps, kind=cfg.optim.scheduler)
    with warnings.catch_warnings():  # replaying the steps already taken, with no optimizer step between
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(step):
            sched.step()
    o.sched = sched


def _from_rank0(value: int, rt: _Runtime) -> int:
    """Rank 0's ``value`` on every rank (decisions that all ranks must share)."""
    if not rt.distributed:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=rt.device if rt.device.type == "cuda" else "cpu")
    dist.broadcast(t, src=0)
    return int(t.item())


def _build_optimization(cfg: TrainConfig, rt: _Runtime, total_steps: int, *, resume: bool = False
                        ) -> _Optimization:
    """Model, AdamW, schedule and loss scaler (same initial weights on every rank: seeded, and DDP
    broadcasts rank 0's anyway). A resumed run skips the warm start: last.pt replaces every weight."""
    torch.manual_seed(cfg.seed)
    try:
        model = MaskedVAE(VAEConfig.from_dict(dict(cfg.model.__dict__)))
    except ValueError as exc:  # e.g. an activation MONAI does not know (its message spans lines)
        raise MedvaeError("config key 'model': " + " ".join(str(exc).split())) from None
    if cfg.init_from and not resume:  # a fine-tune
        log.info("warm start from %s: %s", cfg.init_from, _warm_start(model, cfg))
    model = model.to(rt.device)
    if cfg.optim.train == "scale_head":  # a second stage: the restoration stays bit-identical
        try:
            params = model.train_only_scale()
        except ValueError as exc:
            raise MedvaeError(str(exc)) from None
    else:
        params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    sched = make_scheduler(opt, total_steps=total_steps, kind=cfg.optim.scheduler)
    scaler = torch.amp.GradScaler("cuda", enabled=rt.adtype == torch.float16 and rt.device.type == "cuda")
    net = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None) if rt.distributed else model
    return _Optimization(model=model, net=net, opt=opt, sched=sched, scaler=scaler)


#: config keys a resumed run may change: where and how fast it runs, and what it tells MLflow
RESUME_FREE = ("device", "amp", "threads", "output_dir", "init_from", "data.num_workers", "optim.max_minutes",
               "tracking.")


def config_changes(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """The keys (``"model.channels [4, 8] -> [8, 16]"``) where ``cfg`` differs from a checkpoint's
    training config, leaving out :data:`RESUME_FREE` and keys the checkpoint's medvae did not have.

    Examples
    --------
    >>> from medvae.training.config import load_config
    >>> cfg = load_config(None, ["optim.lr=0.01", "threads=2"])
    >>> config_changes(load_config(None, []).to_dict(), cfg)
    ['optim.lr 0.001 -> 0.01']
    """
    from medvae.tracking import flatten
    from medvae.training.config import config_source

    old, new = flatten(saved or {}), flatten(cfg.to_dict())
    source = config_source(cfg)
    base = Path(source).parent if source and source != "<defaults>" else Path(".")

    def same(k: str) -> bool:
        if old[k] == new[k]:
            return True
        if k not in _PATH_KEYS:
            return False
        # a relative path as the first run wrote it: from its working folder, or the config's (as
        # load_config finds it); a resume from another folder names the same scans another way
        olds, news = (v if isinstance(v, list) else [v] for v in (old[k], new[k]))
        return len(olds) == len(news) and all(
            isinstance(a, str) and isinstance(b, str)
            and os.path.abspath(b) in (os.path.abspath(a), os.path.abspath(base / a)) for a, b in zip(olds, news))

    return [f"{k} {old[k]!r} -> {new[k]!r}".replace("'", "") for k in sorted(new)
            if k in old and not same(k) and not any(k == f or (f.endswith(".") and k.startswith(f))
                                                    for f in RESUME_FREE)]


#: config keys holding paths, which :func:`medvae.training.config.load_config` resolves from the working
#: folder or the config's own
_PATH_KEYS = ("data.paths", "data.val_paths", "data.manifest", "data.store")


def _resume_checkpoint(out_dir: Path, cfg: TrainConfig) -> dict[str, Any]:
    """``last.pt`` of the run to resume, read and checked before any data is read.

    Refused, in one line, when it is missing, damaged, not a training checkpoint, or was trained with
    another config (except :data:`RESUME_FREE`): the run would go on as a mix of two configs, or fail
    on the shapes."""
    last = out_dir / "last.pt"
    if not last.is_file():
        raise MedvaeError("nothing to resume: no last.pt checkpoint", out_dir)
    ck = read_checkpoint(last)
    missing = [k for k in ("optimizer", "scheduler", "epoch", "step", "best") if k not in ck]
    if missing:  # a slim inference model (model.pt, the shipped weights) copied to last.pt
        raise MedvaeError(f"not a training checkpoint (no {', '.join(missing)}): it cannot be resumed; start a "
                          "new output_dir with init_from= it to train from its weights", last)
    counters = {"epoch": ck["epoch"], "step": ck["step"], "planned_epochs": ck.get("planned_epochs") or 0}
    for key, value in counters.items():  # a damaged counter gave a traceback at int() after the data was read
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise MedvaeError(f"a damaged training checkpoint: its {key!r} is {value!r}, not a whole number", last)
    if isinstance(ck["best"], bool) or not isinstance(ck["best"], (int, float)):
        raise MedvaeError(f"a damaged training checkpoint: its 'best' is {ck['best']!r}, not a number", last)
    changed = config_changes(ck.get("config") or {}, cfg)
    if changed:
        shown = "; ".join(changed[:4]) + (f"; and {len(changed) - 4} more" if len(changed) > 4 else "")
        raise MedvaeError(f"cannot resume with a changed config ({shown}): resume with the config the run "
                          "started with, or start a new output_dir (init_from= to start from its weights)", last)
    return ck


def _resume_from(ck: dict[str, Any], last: Path, o: _Optimization) -> tuple[int, int, float, int | None]:
    """Load a checked ``last.pt`` (:func:`_resume_checkpoint`) into ``o``; returns (next epoch, step,
    best score, epochs planned or None)."""
    try:
        o.model.load_state_dict(ck["state_dict"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise MedvaeError(f"the checkpoint does not fit the configured model ({first})", last) from None
    try:
        o.opt.load_state_dict(ck["optimizer"])
        o.sched.load_state_dict(ck["scheduler"])
    except (KeyError, TypeError, ValueError):
        raise MedvaeError("cannot resume exactly: the checkpoint's optimizer or learning-rate schedule was "
                          "written by an older medvae or another optim.train", last) from None
    if ck.get("scaler"):
        o.scaler.load_state_dict(ck["scaler"])
    planned = ck.get("planned_epochs")
    return int(ck["epoch"]) + 1, int(ck["step"]), float(ck["best"]), int(planned) if planned else None


def _warm_start(model: MaskedVAE, cfg: TrainConfig) -> dict[str, int]:
    """:func:`warm_start` from ``cfg.init_from``, its errors naming the key and the config file
    ("/etc/passwd: not a medvae model" named neither)."""
    try:
        return warm_start(model, cfg.init_from)
    except MedvaeError as exc:
        raise MedvaeError(f"config key 'init_from' ({exc.path or cfg.init_from}): {exc.message}",
                          config_source(cfg, "init_from")) from None


def _preflight(cfg: TrainConfig, *, resume: bool) -> dict[str, Any] | None:
    """Every check that needs no scan, before any data is read (or MLflow is told): the model builds,
    the recipes load, the data paths, manifest, store and ``init_from`` exist, and the output folder
    is new (or, with ``resume``, holds a ``last.pt`` of this config, which is returned). Each failure
    is one line naming the config key, and the config file for keys it holds."""
    from medvae.corruption.recipes import load_recipe
    from medvae.training.config import expand_paths

    source = config_source(cfg)
    try:
        with torch.random.fork_rng(devices=[]):  # a trial build: the run's random draws stay as they were
            trial = MaskedVAE(VAEConfig.from_dict(dict(cfg.model.__dict__)))
    except ValueError as exc:  # e.g. an activation MONAI does not know (its message spans lines)
        raise MedvaeError("config key 'model': " + " ".join(str(exc).split()), source) from None
    except (RuntimeError, MemoryError) as exc:  # torch's allocator: "DefaultCPUAllocator: not enough memory"
        raise MedvaeError(f"config key 'model': the model does not fit in memory ({' '.join(str(exc).split())[:200]})",
                          source) from None
    for key in ("recipe", "val_recipe"):
        try:
            load_recipe(getattr(cfg.corruption, key))
        except ValueError as exc:  # a missing or broken recipe file (a MedvaeError is one too)
            raise MedvaeError(f"config key 'corruption.{key}': {exc}",
                              config_source(cfg, f"corruption.{key}")) from None
    d = cfg.data
    if not (d.store or d.manifest):
        if not d.paths:
            raise MedvaeError("config key 'data.paths' is empty: give the training scans (files, folders or "
                              "globs), a data.manifest or a data.store", source)
        for key, patterns in (("data.paths", d.paths), ("data.val_paths", d.val_paths)):
            try:
                expand_paths(patterns, key, exclude=d.exclude)
            except MedvaeError as exc:
                raise MedvaeError(exc.message, config_source(cfg, key)) from None
    for key, value, kind in (("data.store", d.store, "folder"), ("data.manifest", d.manifest, "file"),
                             ("init_from", None if resume else cfg.init_from, "file")):  # resumed: last.pt's weights
        if key == "init_from" and value == "default":  # the shipped weights, wherever medvae is installed
            value = str(weights_path(value))
        if value and not (Path(value).is_dir() if kind == "folder" else Path(value).is_file()):
            raise MedvaeError(f"config key '{key}': no {kind} {value!r}", config_source(cfg, key))
    if cfg.init_from and not resume:  # not a model, or one this model cannot start from
        _warm_start(trial, cfg)
    out_dir = Path(cfg.output_dir)
    if resume:
        return _resume_checkpoint(out_dir, cfg)
    if (out_dir / "last.pt").is_file():  # a forgotten --resume would overwrite the run's checkpoints
        raise MedvaeError("holds the checkpoints of an earlier run (last.pt): continue it with --resume, or "
                          "train into another output_dir", out_dir)
    return None


def _open_tracking(cfg: TrainConfig, out_dir: Path, *, resume: bool):
    """The MLflow run of this training (rank 0, tracking enabled), dated from now so that its duration
    is the training's. The server is checked now, before any data is read: an unreachable one is
    said at once in one warning (records kept in ``OUTPUT_DIR/tracking_pending.jsonl``, sent later by
    ``medvae track sync``), not only when training ends. It never stops training: see
    :class:`medvae.tracking.RunLogger`."""
    from medvae.tracking import RunLogger

    tracker = RunLogger(out_dir, experiment=cfg.tracking.experiment, tracking_uri=cfg.tracking.uri,
                        run_name=cfg.tracking.run_name, tags={"medvae.kind": "train"}, resume=resume)
    tracker.check()
    return tracker


def _kept(out_dir: Path) -> str:
    """What a stopped run leaves: the last good checkpoint, or none."""
    if (out_dir / "last.pt").is_file():
        return "the last good checkpoint is kept"
    return "no checkpoint was written (the first one is written when epoch 1 ends)"


def _mean_over_ranks(parts: dict[str, float], rt: _Runtime) -> dict[str, float]:
    """The mean of each loss part over the ranks (every rank calls it at the same step)."""
    keys = sorted(parts)
    t = torch.tensor([float(parts[k]) for k in keys], dtype=torch.float64,
                     device=rt.device if rt.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return {k: float(v) / rt.world for k, v in zip(keys, t.tolist())}


def _train_epoch(cfg: TrainConfig, rt: _Runtime, o: _Optimization, loader, *, epoch: int, step: int,
                 result: TrainResult, tracker, show_bar: bool, planned: int) -> tuple[int, float]:
    """One pass over ``loader``; returns the step count after it and the samples per second."""
    loss_cfg = cfg.loss_config
    o.net.train()
    t0, seen = time.perf_counter(), 0
    batches = loader
    if show_bar:
        from tqdm.auto import tqdm

        batches = tqdm(loader, desc=f"epoch {epoch + 1}/{planned}", leave=False)
    for batch in batches:
        x = batch["image"].to(rt.device, non_blocking=True)
        m = batch["mask"].to(rt.device, non_blocking=True)
        y = batch["target"].to(rt.device, non_blocking=True)
        with torch.autocast(rt.device.type, dtype=rt.adtype or torch.float32, enabled=rt.adtype is not None):
            recon, mu, logvar = o.net(x, m)
        loss, parts = masked_vae_loss(recon, y, m, mu, logvar, step=step, cfg=loss_cfg)
        bad = torch.tensor([0.0 if math.isfinite(parts["loss"]) else 1.0], device=rt.device)
        if rt.distributed:
            dist.all_reduce(bad)
        if bad.item() > 0:
            raise TrainingStopped(
                f"training stopped: the loss became NaN/Inf at epoch {epoch + 1}, step {step + 1}; "
                f"{_kept(Path(cfg.output_dir))}", Path(cfg.output_dir) / "last.pt")
        o.opt.zero_grad(set_to_none=True)
        o.scaler.scale(loss).backward()
        if cfg.optim.grad_clip > 0:
            o.scaler.unscale_(o.opt)
            torch.nn.utils.clip_grad_norm_(o.net.parameters(), cfg.optim.grad_clip)
        lr = o.opt.param_groups[0]["lr"]  # the rate this step uses, before the schedule moves on
        o.scaler.step(o.opt)
        o.scaler.update()
        o.sched.step()
        step += 1
        seen += x.shape[0] * rt.world
        if rt.distributed:  # every rank's share of the batch, not rank 0's alone
            parts = _mean_over_ranks(parts, rt)
        parts["lr"] = lr
        if rt.is_main:
            result.history.append({"step": step, **parts})
            if step % cfg.tracking.log_every == 0 or step == 1:
                if tracker:
                    tracker.log_metrics({f"train_{k}": v for k, v in parts.items()}, step=step)
                if show_bar:
                    batches.set_postfix(loss=f"{parts['loss']:.4f}", kl=f"{parts['kl']:.2f}")
                else:
                    log.info("epoch %d step %d loss %.5f rec %.5f rec_mask %.5f kl %.3f beta %.2e",
                             epoch + 1, step, parts["loss"], parts["rec"], parts["rec_mask"],
                             parts["kl"], parts["beta"])
    return step, seen / max(1e-9, time.perf_counter() - t0)


def _end_epoch(cfg: TrainConfig, rt: _Runtime, o: _Optimization, *, epoch: int, step: int, rate: float,
               val: list[dict[str, Any]], steps_per_epoch: int, result: TrainResult, tracker) -> float:
    """Rank 0: validate and log the epoch; returns its score (validation PSNR, else minus the loss)."""
    metrics = validate(o.model, val, rt.device) if val else {}
    metrics["train_samples_per_s"] = rate
    result.val.append({"epoch": epoch + 1, **metrics})
    review = val[: cfg.tracking.review_slices]
    if tracker:
        tracker.log_metrics(metrics, step=step)
        if review:  # the figure only exists to be logged
            tracker.log_figure(review_figure(o.model, review, rt.device), f"review/epoch_{epoch + 1:03d}.png")
    return metrics.get("val_psnr", -float(np.mean([h["loss"] for h in result.history[-steps_per_epoch:]])))


def _check_weights(cfg: TrainConfig, o: _Optimization, *, epoch: int) -> None:
    """Every rank (DDP keeps the weights equal): stop before a checkpoint of broken weights is written.

    A last step that diverges leaves a finite loss and NaN/Inf weights behind it."""
    broken = sum(not bool(torch.isfinite(t).all()) for t in o.model.state_dict().values()
                 if torch.is_floating_point(t))
    if broken:
        out_dir = Path(cfg.output_dir)
        raise TrainingStopped(f"training stopped: {broken} weight tensor(s) became NaN/Inf in epoch {epoch + 1}; "
                              f"{_kept(out_dir)}", out_dir / "last.pt")


def _save_epoch(cfg: TrainConfig, o: _Optimization, *, epoch: int, step: int, best: float, score: float,
                intensity: IntensityPolicy, result: TrainResult, planned: int, data: str, ranks: str) -> float:
    """Rank 0: write ``last.pt`` (and ``best.pt`` when better); returns the best score."""
    out_dir = Path(cfg.output_dir)
    metrics = {k: v for k, v in result.val[-1].items() if k != "epoch"}
    state = checkpoint_dict(o.model, intensity, meta=_meta(cfg, epoch, step, metrics),
                            optimizer=o.opt.state_dict(), scheduler=o.sched.state_dict(),
                            scaler=o.scaler.state_dict() if o.scaler.is_enabled() else {},
                            epoch=epoch, step=step, best=max(best, score), config=cfg.to_dict(),
                            planned_epochs=planned, data_digest=data, ranks_digest=ranks)
    # best.pt first: a kill between the two writes leaves last.pt at the epoch before, which a resume
    # trains again, rather than a last.pt whose best score no later epoch beats
    if score > best:
        best = score
        atomic_torch_save(state, out_dir / "best.pt")
    atomic_torch_save(state, out_dir / "last.pt")
    log.info("epoch %d/%d done: %s (%.1f samples/s)", epoch + 1, planned,
             ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("val_")) or "no validation set",
             metrics["train_samples_per_s"])
    return best


def _export(cfg: TrainConfig, tracker) -> None:
    """Rank 0, after the last epoch: the slim ``model.pt`` from the best checkpoint, and its logging."""
    out_dir = Path(cfg.output_dir)
    # the best epoch by validation PSNR; a scale_head stage leaves the PSNR unchanged: its last epoch
    best = out_dir / "best.pt"
    final = best if best.is_file() and cfg.optim.train == "all" else out_dir / "last.pt"
    if not final.is_file():
        return
    logging_it = bool(tracker) and cfg.tracking.log_model
    if logging_it:
        (out_dir / MODEL_PENDING).touch()
    export_inference(final, out_dir / "model.pt")
    if logging_it:
        tracker.log_model(out_dir / "model.pt")
        tracker.log_artifact(_tracked_copy(final), artifact_path="checkpoints")
        (out_dir / MODEL_PENDING).unlink()  # sent, or kept for `medvae track sync`


#: there from the export of a tracked run's model until it is logged: a run stopped in between has
#: model.pt, and --resume took it for a finished run whose MLflow run would never get its model
MODEL_PENDING = ".model-pending"


def _export_pending(cfg: TrainConfig) -> bool:
    out_dir = Path(cfg.output_dir)
    return not (out_dir / "model.pt").is_file() or (out_dir / MODEL_PENDING).is_file()


def _tracked_copy(checkpoint: Path) -> Path:
    """The checkpoint as MLflow may receive it: its config's paths (which can name patients) digested.

    Kept in ``OUTPUT_DIR/tracked/`` so that records kept offline can still send it later."""
    from medvae.tracking import redacted_config

    ck = read_checkpoint(checkpoint)
    ck["config"] = redacted_config(ck.get("config") or {})
    (checkpoint.parent / "tracked").mkdir(exist_ok=True)
    return atomic_torch_save(ck, checkpoint.parent / "tracked" / checkpoint.name)


# -- the loop ---------------------------------------------------------------------------------------

def train(cfg: TrainConfig, *, resume: bool = False, progress: bool | None = None) -> TrainResult:
    """Train a :class:`MaskedVAE` as configured; returns a summary (full on rank 0).

    Tracking (rank 0) never stops training: when the MLflow server is unreachable or dies, the run's
    records are kept in ``OUTPUT_DIR/tracking_pending.jsonl`` for ``medvae track sync OUTPUT_DIR``.
    """
    from medvae.training.data import build_training_data, training_hole_radius

    t_start = _clock()
    rt = _setup_runtime(cfg)
    held = contextlib.ExitStack()  # one training at a time writes an output_dir (rank 0 holds its lock)
    try:
        out_dir = Path(cfg.output_dir)
        # a file there, or above it, failed only when the first checkpoint was written, an epoch later
        blocked = next((p for p in (out_dir, *out_dir.parents) if p.exists() and not p.is_dir()), None)
        if blocked is not None:
            raise MedvaeError(f"config key 'output_dir': {blocked} is a file, not a folder",
                              config_source(cfg, "output_dir"))
        if rt.is_main:
            held.enter_context(exclusive(Path(cfg.output_dir)))
        resumed = _preflight(cfg, resume=resume)
    except BaseException:
        held.close()
        if rt.own_group:
            dist.destroy_process_group()
        raise
    out_dir = Path(cfg.output_dir)
    try:
        tracker = _open_tracking(cfg, out_dir, resume=resume) if rt.is_main and cfg.tracking.enabled else None
    except BaseException:
        held.close()
        raise
    status = "FAILED"
    # SIGTERM ends training as Ctrl-C does, so the MLflow run ends KILLED instead of RUNNING forever
    term = contextlib.ExitStack()
    term.enter_context(termination_as_interrupt())
    try:
        # data: split by volume, never by slice
        intensity = IntensityPolicy(ct_window=tuple(cfg.intensity.ct_window),
                                    mr_percentiles=tuple(cfg.intensity.mr_percentiles))
        # globs, a manifest or a slice store (medvae.store); a store is sharded between ranks
        data = build_training_data(cfg, intensity=intensity, rank=rt.rank, world=rt.world, with_val=rt.is_main)
        ds, batches, val = data.dataset, data.batches, data.val
        if data.store is not None:
            held.callback(data.store.release_reading)
        digest = data.sources  # the scans behind the data: a store or glob that changed since last.pt
        if rt.is_main and resumed is not None and resumed.get("data_digest") not in (None, digest):
            raise MedvaeError("the training data changed since this run's last checkpoint (a store prepared "
                              "again, or globs that match other files): resuming would mix two data sets and "
                              "pick best.pt across two validation sets; train into a new output_dir "
                              "(init_from= its last.pt to start from its weights)", out_dir / "last.pt")
        if rt.is_main and resumed is not None and resumed.get("ranks_digest") not in (None, data.ranks):
            # another number of processes, or a store dealt otherwise: not the steps an uninterrupted run takes
            raise MedvaeError("this run's last checkpoint was trained with its data split otherwise between "
                              "processes (another torchrun --nproc_per_node, or a store whose volumes changed "
                              "ranks): resume as it ran, or train into a new output_dir (init_from= its last.pt "
                              "to start from its weights)", out_dir / "last.pt")
        if rt.is_main and resumed is not None and "ranks_digest" not in resumed and rt.world > 1:
            log.warning("%s: written by an older medvae, which records no split of the data between processes: "
                        "if it ran with another number of processes, or from a store (dealt otherwise then), "
                        "this resume does not take the steps an uninterrupted run would", out_dir / "last.pt")
        # its own generator: creating an iterator would otherwise draw from the global RNG, whose stream
        # is the epoch's latent noise, and a resumed or multi-worker run would take other steps
        loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=cfg.data.num_workers,
                                             pin_memory=rt.device.type == "cuda",
                                             persistent_workers=cfg.data.num_workers > 0,
                                             generator=torch.Generator().manual_seed(cfg.seed))
        steps_per_epoch = len(loader)
        if rt.is_main:  # seconds of seeded draws, cached for every checkpoint's meta: not in epoch 1's time
            training_hole_radius(cfg.corruption.recipe, patch_size=cfg.data.patch_size)
        o = _build_optimization(cfg, rt, steps_per_epoch * cfg.optim.epochs, resume=resume)
        start_epoch, step, best, planned = (_resume_from(resumed, out_dir / "last.pt", o) if resumed is not None
                                            else (0, 0, -math.inf, None))
        planned = min(planned or cfg.optim.epochs, cfg.optim.epochs)
        budget_s = 60.0 * cfg.optim.max_minutes

        result = TrainResult(output_dir=out_dir, epochs_run=0, steps=step, epochs_planned=planned)
        if start_epoch >= planned:  # a finished run: nothing to train, export or log again
            log.info("%s: nothing left to train (%d of %d epochs done)", out_dir, start_epoch, planned)
            result.model, result.epochs_done_before = o.model, start_epoch
            if rt.is_main and _export_pending(cfg):
                # stopped while its model was exported or logged: export and log it now (its run was left KILLED)
                log.info("%s: writing the model the stopped run did not", out_dir)
                if tracker:
                    tracker.start()
                    result.run_id = tracker.run_id
                _export(cfg, tracker)
                result.exported = True
            status = "FINISHED"
            return result
        if tracker:
            tracker.start()
            result.run_id = tracker.run_id
            if not tracker.continued:  # a new run, also when a resumed job could not continue its old one
                from medvae.tracking import config_params

                tracker.log_params({**config_params(cfg.to_dict()),
                                    # all ranks' (a store is dealt out: rank 0 holds its part)
                                    "data.n_train_volumes": data.n_volumes, "data.n_val_slices": len(val),
                                    "data.n_train_slices": data.n_slices,
                                    "device": rt.device.type, "world_size": rt.world,
                                    "model.n_parameters": sum(p.numel() for p in o.model.parameters())})
        show_bar = rt.is_main and (sys.stderr.isatty() if progress is None else progress)
        epoch = start_epoch
        while epoch < planned:
            t_epoch = _clock()
            batches.set_epoch(epoch)
            ds.set_epoch(epoch)
            torch.manual_seed(cfg.seed * 100_003 + epoch * 1009 + rt.rank)  # latent noise of this epoch
            step, rate = _train_epoch(cfg, rt, o, loader, epoch=epoch, step=step, result=result,
                                      tracker=tracker, show_bar=show_bar, planned=planned)
            _check_weights(cfg, o, epoch=epoch)  # before validating: NaN weights give NaN images
            score = _end_epoch(cfg, rt, o, epoch=epoch, step=step, rate=rate, val=val,
                               steps_per_epoch=steps_per_epoch, result=result, tracker=tracker) \
                if rt.is_main else 0.0
            if rt.distributed:
                dist.barrier()
            if budget_s and epoch == start_epoch:  # the first epoch of this run shows its speed
                now = _clock()
                fit = _from_rank0(fit_epochs(planned=planned, done=epoch + 1, elapsed_s=now - t_start,
                                             epoch_s=now - t_epoch, budget_s=budget_s), rt)
                if fit <= epoch + 1 < planned:  # the schedule cannot end within an epoch already trained
                    log.warning("time budget %g min: only %d of %d epochs fit, so the run ends at learning rate "
                                "%.3g, not at the end of its schedule; lower data.samples_per_epoch so that several "
                                "epochs fit", cfg.optim.max_minutes, fit, planned, o.opt.param_groups[0]["lr"])
                elif fit < planned:
                    log.info("time budget %g min: %d of %d epochs fit; the schedule ends with them",
                             cfg.optim.max_minutes, fit, planned)
                if fit < planned:
                    refit_scheduler(o, cfg, total_steps=fit * steps_per_epoch, step=step)
                    planned = result.epochs_planned = fit
            if rt.is_main:
                best = _save_epoch(cfg, o, epoch=epoch, step=step, best=best, score=score, intensity=intensity,
                                   result=result, planned=planned, data=digest, ranks=data.ranks)
            result.epochs_run += 1
            epoch += 1
            # slower than the first epoch promised: stop before the budget runs out (last.pt is written)
            now = _clock()
            if budget_s and epoch < planned and _from_rank0(int(now - t_start + (now - t_epoch) > budget_s), rt):
                log.warning("time budget %g min reached after epoch %d of %d", cfg.optim.max_minutes,
                            epoch, planned)
                break
        result.steps = step
        if rt.is_main:
            _export(cfg, tracker)
        result.model = o.model
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except RuntimeError as exc:
        if rt.distributed and _peer_lost(exc):  # a collective whose peer died: one line, not gloo's traceback
            first = " ".join(str(exc).split())[:160]
            # the cause is in the other process's message (a bad input, changed data, a kill), which may say
            # what to do instead (a new output_dir when the data changed); a killed one says nothing
            then = ("; unless the other process's message says otherwise, continue with --resume once its cause "
                    "is fixed" if (out_dir / "last.pt").is_file() else "; train again once its cause is fixed")
            raise MedvaeError(f"another torchrun process stopped ({first}); this one stops too, see the other "
                              f"process's message (if it left one) for why; {_kept(out_dir)}{then}", out_dir) from None
        raise
    finally:
        term.close()
        held.close()
        if tracker and tracker.started:
            tracker.end(status)
            if tracker.unavailable is not None and status == "FINISHED":
                result.tracking_skipped = str(tracker.unavailable)
        if rt.own_group:
            dist.destroy_process_group()
    return result


def _peer_lost(exc: RuntimeError) -> bool:
    """Whether a RuntimeError under torchrun comes from a collective whose peer process is gone
    (gloo: "Connection reset by peer", "Connection closed by peer"; NCCL: a communicator error)."""
    text = str(exc)
    return "by peer" in text or "gloo" in text.lower() or "nccl" in text.lower()


def _meta(cfg: TrainConfig, epoch: int, step: int, metrics: dict[str, float]) -> dict[str, Any]:
    import medvae

    from medvae.hole_scale import HOLE_RADIUS_KEY
    from medvae.tracking.params import recipe_label, redacted_config
    from medvae.training.data import training_hole_radius

    radius = training_hole_radius(cfg.corruption.recipe, patch_size=cfg.data.patch_size)  # cached
    return {"medvae_version": medvae.__version__, "epoch": epoch + 1, "step": step,
            "recipe": recipe_label(cfg.corruption.recipe), "seed": cfg.seed,  # logged with the model
            # which data and split made it, as the run's params name them (paths as digests only)
            "data": redacted_config({"data": cfg.to_dict()["data"]})["data"],
            **({HOLE_RADIUS_KEY: radius} if radius is not None else {}),
            **{k: float(v) for k, v in metrics.items()}}


def export_inference(checkpoint: Path, out: Path) -> Path:
    """Strip a training checkpoint down to what inference needs (config, weights, intensity, meta).

    A checkpoint written before training stored ``meta["hole_radius"]`` gets it here, from the training
    config it carries."""
    from medvae.hole_scale import HOLE_RADIUS_KEY
    from medvae.training.data import training_hole_radius

    if Path(checkpoint).resolve() == Path(out).resolve():  # the slim copy replaced the run's checkpoint: no --resume
        raise MedvaeError("the export would replace the training checkpoint it is made from; give another "
                          "output path", out)
    ck = read_checkpoint(checkpoint)
    slim = {k: ck[k] for k in ("format", "format_version", "model_config", "intensity", "state_dict", "meta")}
    config = ck.get("config") or {}
    if HOLE_RADIUS_KEY not in slim["meta"] and "corruption" in config and "data" in config:
        radius = training_hole_radius(config["corruption"]["recipe"], patch_size=config["data"]["patch_size"])
        if radius is not None:
            slim["meta"] = {**slim["meta"], HOLE_RADIUS_KEY: radius}
    return atomic_torch_save(slim, out)
