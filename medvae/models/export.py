"""TorchScript export of a model's inference: restore without building the network from MONAI.

Importing MONAI runs its whole package import (6–16 s on a 2-core machine), which a one-off
``medvae restore`` pays at start-up although inference needs only a few convolutions. An exported
model is a TorchScript archive (``torch.jit.save``) of :class:`InferenceVAE`: the trained
:class:`~medvae.models.vae.MaskedVAE`'s modules with its inference path (harmonic prefill, padding,
encoder, posterior mean or sampled latents, decoder, known pixels kept), scripted from the same
helpers the eager model uses. ``torch.jit.load`` unpickles no Python objects, but an archive carries
TorchScript code that is compiled and run: unlike ``torch.load(weights_only=True)`` it is not safe for
files of unknown origin. So medvae loads only the archive shipped inside the package (for
``--model default``); a ``.ts`` given as a model is refused by ``read_checkpoint`` without being run.

Why TorchScript and not ``torch.export`` (which torch 2.13 recommends, deprecating ``torch.jit``): the
harmonic prefill's pyramid depth and the padding mode depend on the slice size, which
``torch.export`` would specialise to one shape; TorchScript keeps them as control flow, so one archive
restores slices of any size.

The archive sits beside its checkpoint (``default.pt`` → ``default.ts``) and records the SHA-256 of the
checkpoint's weights and its config; :func:`load_exported` refuses an archive whose weights or config
differ from the checkpoint's, so a retrained or re-configured ``default.pt`` never silently runs a stale
export. (Archives exported before the config was stored are checked on the switches they hold:
prefill, noise map, scale head, dimensions, channels and stride.)

Examples
--------
>>> from medvae.models.checkpoint import load_model                    # doctest: +SKIP
>>> export_model(load_model("default").model, "default.ts", weights_sha256="...")  # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from torch import nn

from medvae.models.vae import (crop_pads, decoder_output, encoder_input, harmonic_fill, keep_known,
                               pad_to_multiple)

#: suffix of the TorchScript archive beside a checkpoint
EXPORT_SUFFIX = ".ts"


class _UpStage(nn.Module):
    """One decoder level: upsample, concatenate the skip, fuse (the eager model's ``up[i]``, ``dec[i]``)."""

    def __init__(self, up: nn.Module, dec: nn.Module) -> None:
        super().__init__()
        self.up = up
        self.dec = dec

    def forward(self, h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.dec(torch.cat([self.up(h), skip], dim=1))


class InferenceVAE(nn.Module):
    """The inference path of a :class:`~medvae.models.vae.MaskedVAE`, in TorchScript-compatible form.

    It holds the eager model's own modules (no copy), so scripting it exports the trained weights.
    ``posterior_mean`` and ``sample`` match ``MaskedVAE.posterior_mean`` / ``MaskedVAE.sample``
    (``keep_known=True``) bit for bit (tests/test_model.py).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        cfg = model.config
        self.enc = model.enc
        self.context = model.context
        self.to_latent = model.to_latent
        self.from_latent = model.from_latent
        self.stages = nn.ModuleList([_UpStage(u, d) for u, d in zip(model.up, model.dec)])
        self.head = model.head
        self.stride: int = cfg.stride
        self.harmonic: bool = cfg.prefill == "harmonic" and cfg.spatial_dims == 2
        self.spatial_dims: int = cfg.spatial_dims
        self.in_channels: int = cfg.in_channels
        self.out_channels: int = cfg.out_channels
        self.noise_map: bool = cfg.noise_map
        self.noise_map_gain: float = cfg.noise_map_gain  # set again from the checkpoint on load
        self.scale_head: bool = cfg.scale_head

    def prepare(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.harmonic:
            return harmonic_fill(x.float(), 1 - mask.float()).to(x.dtype)
        return x

    def encode(self, x: torch.Tensor, mask: torch.Tensor
               ) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor], List[int]]:
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError("model input must be (B, C, spatial...) with the model's channels")
        if mask.shape[0] != x.shape[0] or mask.shape[1] != 1 or mask.shape[2:] != x.shape[2:]:
            raise ValueError("mask shape does not match the image shape")
        h, pads = pad_to_multiple(encoder_input(x, mask, self.noise_map, self.noise_map_gain), self.stride)
        skips: List[torch.Tensor] = []
        for block in self.enc:
            h = block(h)
            skips.append(h)
        h = self.context(h)
        skips[-1] = h
        mu, logvar = self.to_latent(h).chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0), skips, pads

    def decode(self, z: torch.Tensor, skips: List[torch.Tensor]) -> torch.Tensor:
        h = self.from_latent(z)
        n = len(skips)
        for i, stage in enumerate(self.stages):
            h = stage(h, skips[n - 2 - i])
        return self.head(h)

    def split(self, start: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return decoder_output(start, out, self.out_channels, self.scale_head)

    @torch.jit.export
    def posterior_mean(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        start = self.prepare(x, mask)
        mu, logvar, skips, pads = self.encode(start, mask)
        out = self.split(start, crop_pads(self.decode(mu, skips), pads))
        return keep_known(x, out[:, :self.out_channels], mask)

    @torch.jit.export
    def posterior_terms(self, x: torch.Tensor, mask: torch.Tensor, n: int,
                        generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        if n < 1:
            raise ValueError("n must be >= 1")
        k = self.out_channels
        start = self.prepare(x, mask)
        mu, logvar, skips, pads = self.encode(start, mask)
        at_mean = self.split(start, crop_pads(self.decode(mu, skips), pads))
        mean = keep_known(x, at_mean[:, :k], mask)
        var = torch.zeros_like(mean)
        if self.scale_head:
            var = (2.0 * torch.exp(2.0 * at_mean[:, k:].float())).to(mean.dtype)
        if n > 1:
            std = torch.exp(0.5 * logvar)
            draws: List[torch.Tensor] = []
            for _ in range(n):
                eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
                draws.append(self.split(start, crop_pads(self.decode(mu + eps * std, skips), pads))[:, :k])
            var = var + torch.stack(draws).float().var(0).to(mean.dtype)
        return mean, var

    @torch.jit.export
    def sample(self, x: torch.Tensor, mask: torch.Tensor, n: int,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if n < 1:
            raise ValueError("n must be >= 1")
        start = self.prepare(x, mask)
        mu, logvar, skips, pads = self.encode(start, mask)
        std = torch.exp(0.5 * logvar)
        outs: List[torch.Tensor] = []
        for _ in range(n):
            eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
            out = self.split(start, crop_pads(self.decode(mu + eps * std, skips), pads))
            outs.append(keep_known(x, out[:, :self.out_channels], mask))
        return torch.stack(outs)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.posterior_mean(x, mask)


def weights_sha256(state_dict: dict) -> str:
    """SHA-256 over a state dict's names, dtypes, shapes and bytes (fp32 on the CPU), in key order."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        v = state_dict[k].detach().cpu().contiguous()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.numpy().tobytes() if v.dtype != torch.bfloat16 else v.float().numpy().tobytes())
    return h.hexdigest()


def exported_path(checkpoint: str | os.PathLike) -> Path:
    """Where the TorchScript archive of ``checkpoint`` lives: same folder and stem, ``.ts``."""
    return Path(checkpoint).with_suffix(EXPORT_SUFFIX)


def config_fingerprint(config) -> str:
    """The JSON of a :class:`~medvae.models.vae.VAEConfig` that an archive was scripted with, less
    ``noise_map_gain`` (set from the checkpoint on load): a config change that leaves the weights
    alone (``act``, ``prefill``) makes another network."""
    import dataclasses
    import json

    d = dataclasses.asdict(config)
    d.pop("noise_map_gain", None)
    return json.dumps(d, sort_keys=True, default=list)


def export_model(model: nn.Module, path: str | os.PathLike, *, weights_sha256: str) -> Path:
    """Script ``model``'s inference (:class:`InferenceVAE`) and save it atomically to ``path``.

    ``weights_sha256`` (of the checkpoint's state dict) and the model's :func:`config_fingerprint`
    are stored in the archive's extra files.
    """
    from medvae.io.atomic import atomic_output

    with warnings.catch_warnings():  # TorchScript is deprecated in favour of torch.export (see the module doc)
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(InferenceVAE(model.cpu().eval()).eval())
        with atomic_output(path, kind="file", overwrite=True) as tmp:
            torch.jit.save(scripted, str(tmp), _extra_files={"weights_sha256": weights_sha256,
                                                             "model_config": config_fingerprint(model.config)})
    return Path(path)


def _matches_config(module, extra: dict, config) -> bool:
    """Whether a loaded archive was scripted with ``config``: its stored fingerprint when it has one,
    and in any case the switches it holds as attributes (archives exported before the fingerprint)."""
    stored = extra.get("model_config") or b""
    stored = stored.decode() if isinstance(stored, bytes) else stored
    if stored and stored != config_fingerprint(config):
        return False
    switches = {"harmonic": config.prefill == "harmonic" and config.spatial_dims == 2,
                "spatial_dims": config.spatial_dims, "in_channels": config.in_channels,
                "out_channels": config.out_channels, "noise_map": config.noise_map,
                "scale_head": config.scale_head, "stride": config.stride}
    return all(getattr(module, k, None) == v for k, v in switches.items())


def load_exported(path: str | os.PathLike, *, weights_sha256: str, config=None,
                  device: str | torch.device = "cpu") -> Optional[torch.jit.ScriptModule]:
    """The scripted model at ``path`` when it exists and was exported from these weights (and, given a
    ``config``, with that :class:`~medvae.models.vae.VAEConfig`), else None."""
    path = Path(path)
    if not path.is_file():
        return None
    extra = {"weights_sha256": "", "model_config": ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except Exception:  # unreadable archive: fall back to the checkpoint
        return None
    stored = extra["weights_sha256"]
    if isinstance(stored, bytes):
        stored = stored.decode()
    if stored != weights_sha256 or (config is not None and not _matches_config(module, extra, config)):
        return None
    return module.eval()


def load_inference_model(spec: str | os.PathLike = "default", *, device: str | torch.device = "cpu"):
    """:func:`~medvae.models.checkpoint.load_model` for inference only: for the shipped ``"default"``
    model, the network is its TorchScript export (``default.ts``) when that was exported from the
    checkpoint's weights, so MONAI is never imported; otherwise, and for any other ``spec``, the
    eager model. Config, intensity policy and meta (e.g. the uncertainty calibration) always come
    from the checkpoint.

    The returned ``LoadedModel.model`` offers what inference uses: ``config``, ``eval()``, ``to()``,
    ``parameters()``, ``posterior_mean(x, mask)`` and ``sample(x, mask, n, generator=...)``.
    """
    from medvae.intensity import IntensityPolicy
    from medvae.models.checkpoint import DEFAULT_WEIGHTS, LoadedModel, load_model, read_checkpoint
    from medvae.models.vae import VAEConfig

    if str(spec) != "default":
        return load_model(spec, device=device)
    ckpt = read_checkpoint(DEFAULT_WEIGHTS)
    config = VAEConfig.from_dict(ckpt["model_config"])
    scripted = load_exported(exported_path(DEFAULT_WEIGHTS), weights_sha256=weights_sha256(ckpt["state_dict"]),
                             config=config, device=device)
    if scripted is None:
        return load_model(spec, device=device)
    if not hasattr(scripted, "noise_map_gain"):  # exported before the gain existed
        return load_model(spec, device=device)
    # The gain is fitted after training and stored in the checkpoint's config, not in the weights
    # that the archive is matched on: the checkpoint decides.
    scripted.noise_map_gain = config.noise_map_gain
    scripted.config = config  # a plain Python attribute
    return LoadedModel(model=scripted, intensity=IntensityPolicy.from_dict(ckpt.get("intensity")),
                       source="default", meta=dict(ckpt.get("meta") or {}))


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m medvae.models.export [CHECKPOINT]``: write CHECKPOINT's ``.ts`` beside it
    (default: the shipped ``medvae/weights/default.pt``) and check it against the eager model."""
    import sys

    from medvae.models.checkpoint import DEFAULT_WEIGHTS, model_from_checkpoint, read_checkpoint

    args = sys.argv[1:] if argv is None else argv
    src = Path(args[0]) if args else DEFAULT_WEIGHTS
    ckpt = read_checkpoint(src)
    lm = model_from_checkpoint(ckpt, source=str(src))
    sha = weights_sha256(ckpt["state_dict"])
    out = export_model(lm.model, exported_path(src), weights_sha256=sha)
    scripted = load_exported(out, weights_sha256=sha, config=lm.model.config)
    # a 3-D model's check needs a volume: a 2-D input failed after the archive was written
    x = torch.rand(2, 1, *((19, 70, 53) if lm.model.config.spatial_dims == 3 else (70, 53)),
                   generator=torch.Generator().manual_seed(0))
    m = (torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) > 0.7).float()
    try:
        with torch.no_grad():
            same = scripted is not None and all(
                torch.equal(lm.model.posterior_mean(x, mk), scripted.posterior_mean(x, mk)) for mk in (m, torch.ones_like(m)))
    except Exception as exc:  # noqa: BLE001  (an unchecked archive is not left behind)
        out.unlink()
        print(f"export of {src} could not be checked ({type(exc).__name__}: {exc}); removed {out}", file=sys.stderr)
        return 1
    if not same:
        out.unlink()
        print(f"export of {src} does not reproduce the eager model; removed {out}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, weights sha256 {sha[:12]}); equal to the eager model")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
