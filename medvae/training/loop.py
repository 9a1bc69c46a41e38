"""The training loop: one CPU, one GPU (with AMP), or many processes under ``torchrun`` (DDP).

* Rank 0 alone validates, logs to MLflow and writes checkpoints; the other ranks wait at a barrier.
* ``last.pt`` and ``best.pt`` are written atomically at the end of every epoch. ``resume=True``
  restarts from ``last.pt`` at the next epoch; because the data and the latent noise of an epoch are
  functions of ``(seed, epoch)``, a resumed run takes exactly the steps an uninterrupted one would.
* A NaN or Inf loss stops training before the optimizer step, so ``last.pt`` stays the last good one.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from medvae.errors import MedvaeError
from medvae.intensity import IntensityPolicy
from medvae.losses import masked_vae_loss
from medvae.models.checkpoint import atomic_torch_save, checkpoint_dict, read_checkpoint
from medvae.models.vae import MaskedVAE, VAEConfig
from medvae.runtime import pick_device, tune_allocator
from medvae.training.config import TrainConfig

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
    model: MaskedVAE | None = None                                  # the trained model (every rank)


# -- set-up helpers ---------------------------------------------------------------------------------

def _dist_info() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "auto":
        return torch.float16 if device.type == "cuda" else None
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}.get(amp, "bad")  # type: ignore


def _lr_factor(step: int, total: int, kind: str) -> float:
    if kind == "none" or total <= 0:
        return 1.0
    warm = min(100, max(1, total // 20))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))


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
    """corrupted | restored | reference | abs error | uncertainty for a few fixed validation slices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model.eval()
    fig, axes = plt.subplots(len(val), 5, figsize=(12.5, 2.6 * len(val)), squeeze=False)
    gen = torch.Generator(device=device).manual_seed(0)
    for r, item in enumerate(val):
        x = torch.from_numpy(item["image"])[None].to(device)
        m = torch.from_numpy(item["mask"])[None].to(device)
        mean = model.posterior_mean(x, m)[0, 0].float().cpu().numpy()
        std = model.sample(x, m, n_samples, generator=gen).std(0)[0, 0].float().cpu().numpy()
        ref = item["target"][0]
        panels = [(item["image"][0], "corrupted", "gray", (0, 1)), (mean, "restored", "gray", (0, 1)),
                  (ref, "reference", "gray", (0, 1)), (np.abs(mean - ref), "abs error", "magma", (0, 0.1)),
                  (std, "uncertainty (std)", "viridis", (0, max(1e-6, float(std.max()))))]
        for c, (img, title, cmap, (lo, hi)) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(img.T, cmap=cmap, vmin=lo, vmax=hi, origin="lower")
            ax.set_axis_off()
            if r == 0:
                ax.set_title(title, fontsize=9)
        axes[r, 0].text(2, 2, item["name"], color="yellow", fontsize=7)
    fig.tight_layout()
    return fig


# -- the loop ---------------------------------------------------------------------------------------

def train(cfg: TrainConfig, *, resume: bool = False, progress: bool | None = None) -> TrainResult:
    """Train a :class:`MaskedVAE` as configured; returns a summary (full on rank 0)."""
    from medvae.training.data import build_training_data

    rank, local_rank, world = _dist_info()
    distributed = world > 1
    device = pick_device(cfg.device, local_rank)
    own_group = distributed and not dist.is_initialized()
    if own_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tune_allocator()
    adtype = amp_dtype(cfg.amp, device)
    if adtype == "bad":
        raise MedvaeError(f"config key 'amp' must be auto, off, bf16 or fp16, got {cfg.amp!r}")
    out_dir = Path(cfg.output_dir)
    is_main = rank == 0

    # data: split by volume, never by slice
    intensity = IntensityPolicy(ct_window=tuple(cfg.intensity.ct_window),
                                mr_percentiles=tuple(cfg.intensity.mr_percentiles))
    # globs, a manifest or a slice store (medvae.store); a store is sharded between ranks
    data = build_training_data(cfg, intensity=intensity, rank=rank, world=world, with_val=is_main)
    ds, sampler, vols, val = data.dataset, data.sampler, data.volumes, data.val
    per_rank_batch = max(1, cfg.optim.batch_size // world)
    loader = torch.utils.data.DataLoader(ds, batch_size=per_rank_batch, sampler=sampler, drop_last=True,
                                         num_workers=cfg.data.num_workers,
                                         pin_memory=device.type == "cuda",
                                         persistent_workers=cfg.data.num_workers > 0)
    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * cfg.optim.epochs

    # model (same initial weights on every rank: seeded, and DDP broadcasts rank 0's anyway)
    torch.manual_seed(cfg.seed)
    model = MaskedVAE(VAEConfig.from_dict(dict(cfg.model.__dict__))).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _lr_factor(s, total_steps, cfg.optim.scheduler))
    scaler = torch.amp.GradScaler("cuda", enabled=adtype == torch.float16 and device.type == "cuda")
    loss_cfg = cfg.loss_config
    start_epoch, step, best = 0, 0, -math.inf
    if resume:
        last = out_dir / "last.pt"
        if not last.is_file():
            raise MedvaeError("nothing to resume: no last.pt checkpoint", out_dir)
        ck = read_checkpoint(last)
        model.load_state_dict(ck["state_dict"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        start_epoch, step, best = int(ck["epoch"]) + 1, int(ck["step"]), float(ck["best"])
    net = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None) if distributed else model

    result = TrainResult(output_dir=out_dir, epochs_run=0, steps=step)
    tracker = _Tracker(cfg, enabled=is_main and cfg.tracking.enabled, resume=resume, out_dir=out_dir)
    tracker.start(extra={"data.n_train_volumes": len(vols), "data.n_val_slices": len(val),
                         "data.n_train_slices": sum(len(v.slices) for v in vols),
                         "device": device.type, "world_size": world,
                         "model.n_parameters": sum(p.numel() for p in model.parameters())})
    result.run_id = tracker.run_id
    show_bar = is_main and (sys.stderr.isatty() if progress is None else progress)
    review = val[: cfg.tracking.review_slices]
    try:
        for epoch in range(start_epoch, cfg.optim.epochs):
            sampler.set_epoch(epoch)
            ds.set_epoch(epoch)
            torch.manual_seed(cfg.seed * 100_003 + epoch * 1009 + rank)  # latent noise of this epoch
            net.train()
            t0, seen = time.perf_counter(), 0
            batches = loader
            if show_bar:
                from tqdm.auto import tqdm

                batches = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.optim.epochs}", leave=False)
            for batch in batches:
                x = batch["image"].to(device, non_blocking=True)
                m = batch["mask"].to(device, non_blocking=True)
                y = batch["target"].to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=adtype or torch.float32, enabled=adtype is not None):
                    recon, mu, logvar = net(x, m)
                loss, parts = masked_vae_loss(recon, y, m, mu, logvar, step=step, cfg=loss_cfg)
                bad = torch.tensor([0.0 if math.isfinite(parts["loss"]) else 1.0], device=device)
                if distributed:
                    dist.all_reduce(bad)
                if bad.item() > 0:
                    raise TrainingStopped(
                        f"training stopped: the loss became NaN/Inf at epoch {epoch + 1}, step {step + 1}; "
                        f"the last good checkpoint is kept", out_dir / "last.pt")
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.optim.grad_clip > 0:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.optim.grad_clip)
                scaler.step(opt)
                scaler.update()
                sched.step()
                step += 1
                seen += x.shape[0] * world
                parts["lr"] = opt.param_groups[0]["lr"]
                if is_main:
                    result.history.append({"step": step, **parts})
                    if step % cfg.tracking.log_every == 0 or step == 1:
                        tracker.log_metrics({f"train_{k}": v for k, v in parts.items()}, step)
                        if show_bar:
                            batches.set_postfix(loss=f"{parts['loss']:.4f}", kl=f"{parts['kl']:.2f}")
                        else:
                            log.info("epoch %d step %d loss %.5f rec %.5f rec_mask %.5f kl %.3f beta %.2e",
                                     epoch + 1, step, parts["loss"], parts["rec"], parts["rec_mask"],
                                     parts["kl"], parts["beta"])
            rate = seen / max(1e-9, time.perf_counter() - t0)
            if is_main:
                metrics = validate(model, val, device) if val else {}
                metrics["train_samples_per_s"] = rate
                result.val.append({"epoch": epoch + 1, **metrics})
                tracker.log_metrics(metrics, step)
                if review and tracker.enabled:  # the figure only exists to be logged
                    tracker.log_figure(review_figure(model, review, device), f"review/epoch_{epoch + 1:03d}.png")
                score = metrics.get("val_psnr", -float(np.mean([h["loss"] for h in result.history[-steps_per_epoch:]])))
                state = checkpoint_dict(model, intensity, meta=_meta(cfg, epoch, step, metrics),
                                        optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                                        scaler=scaler.state_dict() if scaler.is_enabled() else {},
                                        epoch=epoch, step=step, best=max(best, score), config=cfg.to_dict())
                atomic_torch_save(state, out_dir / "last.pt")
                if score > best:
                    best = score
                    atomic_torch_save(state, out_dir / "best.pt")
                log.info("epoch %d/%d done: %s (%.1f samples/s)", epoch + 1, cfg.optim.epochs,
                         ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("val_")), rate)
            result.epochs_run += 1
            if distributed:
                dist.barrier()
        result.steps = step
        if is_main:
            final = out_dir / "best.pt" if (out_dir / "best.pt").is_file() else out_dir / "last.pt"
            if final.is_file():
                export_inference(final, out_dir / "model.pt")
                tracker.log_model(out_dir / "model.pt", final)
        result.model = model
    finally:
        tracker.end()
        if own_group:
            dist.destroy_process_group()
    return result


def _meta(cfg: TrainConfig, epoch: int, step: int, metrics: dict[str, float]) -> dict[str, Any]:
    import medvae

    return {"medvae_version": medvae.__version__, "epoch": epoch + 1, "step": step,
            "recipe": cfg.corruption.recipe, "seed": cfg.seed,
            **{k: float(v) for k, v in metrics.items()}}


def export_inference(checkpoint: Path, out: Path) -> Path:
    """Strip a training checkpoint down to what inference needs (config, weights, intensity, meta)."""
    ck = read_checkpoint(checkpoint)
    slim = {k: ck[k] for k in ("format", "format_version", "model_config", "intensity", "state_dict", "meta")}
    return atomic_torch_save(slim, out)


class _Tracker:
    """MLflow logging for rank 0; a no-op when tracking is disabled."""

    def __init__(self, cfg: TrainConfig, *, enabled: bool, resume: bool, out_dir: Path) -> None:
        self.cfg, self.enabled, self.resume, self.out_dir = cfg, enabled, resume, out_dir
        self.run_id: str | None = None
        self._ctx = None

    def start(self, extra: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from medvae import tracking

        run_file = self.out_dir / "mlflow_run_id"
        tags = {"medvae.kind": "train"}
        self._ctx = tracking.start_run(self.cfg.tracking.experiment, tracking_uri=self.cfg.tracking.uri,
                                       run_name=self.cfg.tracking.run_name, tags=tags,
                                       run_id=run_file.read_text().strip() if self.resume and run_file.is_file() else None)
        run = self._ctx.__enter__()
        self.run_id = run.info.run_id
        self.out_dir.mkdir(parents=True, exist_ok=True)
        run_file.write_text(self.run_id)
        import mlflow

        if not self.resume:
            mlflow.log_params({**tracking.config_params(self.cfg.to_dict()), **extra})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.enabled:
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}, step=step)

    def log_figure(self, fig, name: str) -> None:
        import matplotlib.pyplot as plt

        if self.enabled:
            import mlflow

            mlflow.log_figure(fig, name)
        plt.close(fig)

    def log_model(self, model_pt: Path, checkpoint: Path) -> None:
        if self.enabled and self.cfg.tracking.log_model:
            from medvae import tracking

            tracking.log_medvae_model(model_pt)
            import mlflow

            mlflow.log_artifact(str(checkpoint), artifact_path="checkpoints")

    def end(self) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*sys.exc_info())
            self._ctx = None
