"""KL-regularized masked reconstruction loss.

``loss = rec_all + mask_weight * rec_mask + beta(step) * KL``

* ``rec_all``: L1 or MSE over every pixel (denoising: every pixel is damaged), or (``kind: laplace``)
  the negative log-likelihood of a Laplace ``p(x|z)`` whose per-pixel scale ``b`` the decoder predicts
  (:class:`~medvae.models.vae.VAEConfig` ``scale_head``): ``|x - m| / b + log b``, each pixel weighted
  by ``b**nll_beta`` with the gradient stopped (beta-NLL, Seitzer et al., 2022): with ``nll_beta = 1``
  the mean gets exactly the L1 gradient, so learning the scale does not trade detail for
  "explained-away" pixels, while ``b`` still fits the expected absolute error;
* ``rec_mask``: the same error averaged over the masked pixels only (unlike MONAI's ``MaskedLoss``,
  which averages over all pixels), so holes get extra weight whatever their size;
* ``KL``: KL divergence of the diagonal Gaussian posterior from N(0, I), summed over latent channels
  and averaged over latent positions, optionally with *free bits* (no penalty below ``free_bits``
  nats per channel, so the latent is not pushed into collapse);
* ``beta(step)``: linear warm-up from 0 to ``beta``, or cyclic (Fu et al., 2019).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LossConfig:
    """Loss settings (the ``loss:`` section of a training config)."""

    kind: str = "l1"               # "l1", "mse" or "laplace" (needs a model with a scale head)
    mask_weight: float = 4.0       # extra weight of the masked-region term
    beta: float = 1e-4             # KL weight after warm-up
    warmup: str = "linear"         # "linear", "cyclic" or "none"
    warmup_steps: int = 1000       # steps to reach beta (linear) or length of one cycle (cyclic)
    free_bits: float = 0.0         # nats per latent channel below which KL is not penalised
    nll_beta: float = 1.0          # laplace: weight b**nll_beta (stopped gradient) of each pixel's NLL

    def __post_init__(self) -> None:
        if self.kind not in ("l1", "mse", "laplace"):
            raise ValueError(f"loss.kind must be 'l1', 'mse' or 'laplace', got {self.kind!r}")
        if self.warmup not in ("linear", "cyclic", "none"):
            raise ValueError(f"loss.warmup must be 'linear', 'cyclic' or 'none', got {self.warmup!r}")
        for name in ("mask_weight", "beta", "free_bits", "nll_beta"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss.{name} must be >= 0, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"loss.warmup_steps must be >= 0, got {self.warmup_steps}")


def beta_at(step: int, cfg: LossConfig) -> float:
    """KL weight at optimisation ``step`` (0-based).

    Examples
    --------
    >>> beta_at(50, LossConfig(beta=1.0, warmup_steps=100))
    0.5
    """
    if cfg.warmup == "none" or cfg.warmup_steps == 0:
        return cfg.beta
    if cfg.warmup == "linear":
        return cfg.beta * min(1.0, step / cfg.warmup_steps)
    # cyclic: ramp over the first half of each cycle, hold for the second half
    phase = (step % cfg.warmup_steps) / cfg.warmup_steps
    return cfg.beta * min(1.0, 2.0 * phase)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor, *, free_bits: float = 0.0) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)), summed over channels, averaged over batch and positions."""
    kl = 0.5 * (mu.float().pow(2) + logvar.float().exp() - 1.0 - logvar.float())  # (B, C, ...)
    per_channel = kl.flatten(2).mean(-1)  # (B, C): nats per channel per position
    if free_bits > 0:
        per_channel = per_channel.mean(0).clamp(min=free_bits)  # free bits on the batch mean
        return per_channel.sum()
    return per_channel.sum(1).mean()


def masked_vae_loss(recon: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                    mu: torch.Tensor, logvar: torch.Tensor, *, step: int, cfg: LossConfig
                    ) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its components (``rec``, ``rec_mask``, ``kl``, ``beta``) for logging.

    ``mask`` is 1 where the input was damaged. For global noise it is all ones, and then
    ``rec_mask`` equals ``rec``. With ``kind: laplace``, ``recon`` holds the mean channels and then
    the ``log b`` channels (twice ``target``'s channels); ``l1`` (the plain mean absolute error) is
    logged too, so runs with different likelihoods compare.
    """
    k = target.shape[1]
    if cfg.kind == "laplace":
        if recon.shape[1] != 2 * k:
            raise ValueError("loss.kind 'laplace' needs a model with a scale head (model.scale_head: true)")
        log_b = recon[:, k:].float()
        diff = (recon[:, :k].float() - target.float()).abs()
        err = (diff * torch.exp(-log_b) + log_b) * torch.exp(cfg.nll_beta * log_b.detach())
    else:
        diff = (recon[:, :k].float() - target.float()).abs()
        err = diff if cfg.kind == "l1" else diff.pow(2)
    m = mask.to(err.dtype).expand_as(err)
    rec = err.mean()
    n_mask = m.sum()
    rec_mask = (err * m).sum() / n_mask.clamp(min=1.0)
    kl = kl_divergence(mu, logvar, free_bits=cfg.free_bits)
    beta = beta_at(step, cfg)
    total = rec + cfg.mask_weight * rec_mask + beta * kl
    parts = {"loss": float(total.detach()), "rec": float(rec.detach()), "rec_mask": float(rec_mask.detach()),
             "kl": float(kl.detach()), "beta": beta, "l1": float(diff.detach().mean())}
    if not all(math.isfinite(v) for v in parts.values()):
        parts["nonfinite"] = 1.0
    return total, parts
