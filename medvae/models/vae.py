"""The masked-restoration VAE.

A fully convolutional VAE with a *spatial* latent (as in MONAI's ``AutoencoderKL``), so it trains on
patches and restores slices of any size. Unlike a plain autoencoder, it

* takes the corrupted image **and** the damage mask (1 = damaged) as two input channels;
* has skip connections from the encoder to the decoder (a U-Net-shaped detail path), because a
  restoration must keep the fine detail of the known pixels; the KL-regularized latent at the
  bottleneck carries the global context and is what posterior sampling varies;
* predicts a residual that is added to the input image (residual learning: the network only has to
  model the damage), and at inference pixels outside the mask are returned unchanged.

Built from MONAI blocks (``Convolution``, ``ResidualUnit``, ``UpSample``), for ``spatial_dims`` 2
(slices) or 3 (patches). Inputs whose size is not a multiple of the total stride are reflect-padded
and cropped back, so a 130×130 slice comes back 130×130.

MONAI is imported only when a :class:`MaskedVAE` is built (importing ``monai`` imports the whole
package, 6–16 s here): :class:`VAEConfig` and the shape helpers cost only torch. The helpers
(:func:`harmonic_fill`, :func:`pad_to_multiple`, :func:`crop_pads`, :func:`keep_known`) are
TorchScript-compatible, so :mod:`medvae.models.export` scripts the very same code.
"""
from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass
from typing import Any, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class VAEConfig:
    """Architecture of :class:`MaskedVAE`; stored in every checkpoint.

    Parameters
    ----------
    spatial_dims : 2 or 3.
    in_channels, out_channels : image channels (the mask channel is added internally).
    channels : feature channels per resolution level; each level after the first halves the size.
    latent_channels : channels of the spatial latent at the coarsest level.
    num_res_units : MONAI ``ResidualUnit`` blocks per level in the encoder and decoder. Units after
        the first start as identities, so a model warm-started from one with fewer units keeps its
        function (more depth for a fine-tune).
    act : MONAI activation name.
    prefill : ``"none"`` or ``"harmonic"``: fill the holes of the input (where the mask is 1 and
        some pixels are known) with a smooth harmonic interpolation of their surroundings before the
        network sees them, so the network only adds what a smooth fill misses. 2-D models only.
    noise_map : add an input channel holding the image's blind noise estimate (:func:`noise_level`,
        as in FFDNet/DRUNet, but estimated, so the model stays blind).
    noise_map_gain : the estimate is multiplied by this before the encoder sees it. Training keeps
        1.0; after training it is fitted on the calibration split (``scripts/fit_noise_gain.py``): as
        with FFDNet's noise-level input, a lower value asks for less smoothing and keeps more detail.
    scale_head : the decoder also predicts a per-pixel log-scale ``log b`` of a Laplace likelihood
        ``p(x|z)`` (the aleatoric uncertainty); trained with ``loss.kind: laplace``.
    context_dilations : dilations of extra residual units at the coarsest level (a larger receptive
        field for holes), e.g. ``(2, 4)``; built as identities so that a warm start keeps its function.
    """

    spatial_dims: int = 2
    in_channels: int = 1
    out_channels: int = 1
    channels: tuple[int, ...] = (16, 32, 64, 96)
    latent_channels: int = 8
    num_res_units: int = 1
    act: str = "PRELU"
    prefill: str = "none"
    noise_map: bool = False
    noise_map_gain: float = 1.0
    scale_head: bool = False
    context_dilations: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.prefill not in ("none", "harmonic"):
            raise ValueError(f"prefill must be 'none' or 'harmonic', got {self.prefill!r}")
        if isinstance(self.spatial_dims, bool) or not isinstance(self.spatial_dims, numbers.Integral) \
                or self.spatial_dims not in (2, 3):  # 2.0 passed, then failed as "tuple indices must be integers"
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims!r}")  # '2' read "got 2"
        for name in ("in_channels", "out_channels", "latent_channels", "num_res_units"):
            value = getattr(self, name)
            least = 0 if name == "num_res_units" else 1
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
                # 0 latent channels built a model after torch's two-line warning, then failed
                raise ValueError(f"{name} must be a whole number >= {least}, got {value!r}")
        if self.prefill == "harmonic" and self.spatial_dims != 2:  # it did nothing: the fill works on slices
            raise ValueError("prefill 'harmonic' is for 2-D models (spatial_dims 2); use 'none' for 3-D")
        if len(self.channels) < 2 or any(int(c) < 1 for c in self.channels):
            raise ValueError(f"channels must list at least two positive sizes, got {self.channels}")
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if any(int(d) < 1 for d in self.context_dilations):
            raise ValueError(f"context_dilations must be positive, got {self.context_dilations}")
        object.__setattr__(self, "context_dilations", tuple(int(d) for d in self.context_dilations))
        if not float(self.noise_map_gain) > 0:  # also refuses NaN
            raise ValueError(f"noise_map_gain must be positive, got {self.noise_map_gain}")
        object.__setattr__(self, "noise_map_gain", float(self.noise_map_gain))

    @property
    def stride(self) -> int:
        """Total down-sampling factor: input sizes are padded to a multiple of it."""
        return 2 ** (len(self.channels) - 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        d["context_dilations"] = list(self.context_dilations)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VAEConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model key(s): {', '.join(sorted(unknown))}")
        d = dict(d)
        for key in ("channels", "context_dilations"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)




def noise_level(x: torch.Tensor) -> torch.Tensor:
    """Blind per-image noise estimate ``(B, 1, 1, ...)``: the median absolute finest diagonal Haar
    coefficient / 0.6745 (Donoho's wavelet MAD, the estimator of ``skimage.restoration.estimate_sigma``,
    which uses a Daubechies wavelet). 2-D ``(B, C, H, W)`` or 3-D ``(B, C, D, H, W)`` (the Haar
    blocks of every H x W plane); averaged over channels. TorchScript-compatible.

    >>> g = torch.Generator().manual_seed(0)
    >>> round(float(noise_level(0.1 * torch.randn(1, 1, 128, 128, generator=g))), 2)
    0.1
    """
    h, w = (x.shape[-2] // 2) * 2, (x.shape[-1] // 2) * 2
    if h == 0 or w == 0:  # no 2x2 block: median() of nothing failed with an IndexError
        raise ValueError("the noise estimate needs images of at least 2x2 pixels in their last two dimensions")
    t = x[..., :h, :w].float()
    hh = (t[..., 0::2, 0::2] - t[..., 0::2, 1::2] - t[..., 1::2, 0::2] + t[..., 1::2, 1::2]) / 2.0
    sigma = hh.abs().flatten(2).median(dim=-1).values.mean(dim=1) / 0.6745  # (B,)
    shape = [sigma.shape[0]]
    for _ in range(x.dim() - 1):  # (B, 1, 1, 1) for 2-D, (B, 1, 1, 1, 1) for 3-D images
        shape.append(1)
    return sigma.view(shape)


def encoder_input(x: torch.Tensor, mask: torch.Tensor, noise_map: bool, gain: float = 1.0) -> torch.Tensor:
    """What the encoder sees: the image, the mask and (``noise_map``) ``10 * gain * noise_level(x)``
    as a constant channel (sigma in window units, ~0.01–0.15, brought to O(1)). TorchScript-compatible,
    so the eager and the exported model share it."""
    parts = [x, mask.to(x.dtype)]
    if noise_map:
        parts.append((10.0 * gain * noise_level(x)).to(x.dtype).expand_as(mask))
    return torch.cat(parts, dim=1)


def decoder_output(start: torch.Tensor, out: torch.Tensor, n: int, scale_head: bool) -> torch.Tensor:
    """The reconstruction from the decoder's output: ``start`` + the residual channels, then (with a
    scale head) ``log b`` = the raw channels − 4 (b = 0.018 of the window at a zero output: the head
    starts at zero), clamped to [−12, 2]. TorchScript-compatible."""
    if not scale_head:
        return start + out
    log_b = (out[:, n:] - 4.0).clamp(-12.0, 2.0)
    return torch.cat([start + out[:, :n], log_b], dim=1)


def harmonic_fill(x: torch.Tensor, known: torch.Tensor, iterations: int = 30) -> torch.Tensor:
    """Fill unknown pixels by solving Laplace's equation with the known pixels as boundary values.

    Coarse to fine (a multigrid-like pyramid): each level starts from the upsampled coarser
    solution and relaxes it with Jacobi iterations, so large holes fill in O(pixels) time.
    Samples without any known pixel are returned unchanged. 2-D only (``(B, C, H, W)``).
    TorchScript-compatible.
    """
    if x.dim() != 4:
        return x
    w0 = known.to(x.dtype)
    if not bool((w0 > 0).any()):  # nothing known anywhere (global noise): nothing to fill
        return x
    pyramid: List[Tuple[torch.Tensor, torch.Tensor]] = [(x * w0, w0)]
    while min(pyramid[-1][0].shape[-2], pyramid[-1][0].shape[-1]) > 4:
        v, w = pyramid[-1]
        pyramid.append((F.avg_pool2d(v, 2, ceil_mode=True), F.avg_pool2d(w, 2, ceil_mode=True)))
    kernel = torch.tensor([[0.0, 0.25, 0.0], [0.25, 0.0, 0.25], [0.0, 0.25, 0.0]], dtype=x.dtype,
                          device=x.device).view(1, 1, 3, 3)
    kernel = kernel.repeat(x.shape[1], 1, 1, 1)
    fill = torch.empty(0, dtype=x.dtype, device=x.device)
    for level in range(len(pyramid) - 1, -1, -1):  # coarse to fine
        v, w = pyramid[level]
        val = v / w.clamp_min(1e-6)
        fixed = (w > 0.999).to(x.dtype)  # fully known at this level: a boundary value
        if level == len(pyramid) - 1:
            mean = v.flatten(2).sum(-1) / w.flatten(2).sum(-1).clamp_min(1e-6)
            fill = torch.where(w > 0, val, mean.unsqueeze(-1).unsqueeze(-1).expand_as(v))
        else:
            fill = F.interpolate(fill, size=[v.shape[-2], v.shape[-1]], mode="bilinear", align_corners=False)
        fill = fixed * val + (1 - fixed) * fill
        for _ in range(iterations):
            avg = F.conv2d(F.pad(fill, [1, 1, 1, 1], mode="replicate"), kernel, groups=x.shape[1])
            fill = fixed * val + (1 - fixed) * avg
    has_known = (w0.flatten(1).sum(1) > 0).view(-1, 1, 1, 1)
    return torch.where((w0 > 0.5) | ~has_known, x, fill)


def pad_to_multiple(t: torch.Tensor, stride: int) -> Tuple[torch.Tensor, List[int]]:
    """Pad the spatial dims of ``(B, C, ...)`` to a multiple of ``stride`` (reflect; replicate when
    the input is too small to reflect); returns the padded tensor and ``F.pad``'s pad list.

    >>> pad_to_multiple(torch.zeros(1, 1, 30, 32), 8)[0].shape
    torch.Size([1, 1, 32, 32])
    """
    dims = t.shape[2:]
    pads: List[int] = []
    reflect = True
    for d in range(len(dims) - 1, -1, -1):  # F.pad lists the last dim first
        extra = (stride - dims[d] % stride) % stride
        lo, hi = extra // 2, extra - extra // 2
        pads += [lo, hi]
        reflect = reflect and lo < dims[d] and hi < dims[d]  # reflect needs pad < size
    if sum(pads) > 0:
        t = F.pad(t, pads, mode="reflect" if reflect else "replicate")
    return t, pads


def crop_pads(t: torch.Tensor, pads: List[int]) -> torch.Tensor:
    """Undo :func:`pad_to_multiple` (``pads`` as it returned them)."""
    n = len(pads) // 2
    for d in range(n):
        lo, hi = pads[2 * (n - 1 - d)], pads[2 * (n - 1 - d) + 1]
        t = t.narrow(2 + d, lo, t.shape[2 + d] - lo - hi)
    return t


def keep_known(x: torch.Tensor, out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``out`` where ``mask`` is set, ``x`` elsewhere; an all-set mask (global noise) returns ``out``."""
    m = mask.to(torch.bool)
    if bool(m.all()):  # global noise: every pixel is to be restored
        return out
    return torch.where(m, out, x)


def predictive_stats(net: Any, x: torch.Tensor, mask: torch.Tensor, n: int,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`MaskedVAE.predictive` for any network with ``posterior_terms`` (eager or exported)."""
    mean, var = net.posterior_terms(x, mask, n, generator)
    std = var.clamp_min(0).sqrt()
    m = mask.to(torch.bool)
    if not bool(m.all()):
        std = torch.where(m, std, torch.zeros_like(std))
    return mean, std


def zero_last_conv(unit: nn.Module) -> None:
    """Make a MONAI ``ResidualUnit`` (same channels in and out) the identity: its last convolution
    outputs zero, and the activation after it keeps zero. The first convolution keeps its random
    weights, so the last one gets gradients and the unit learns from where a warm start left off."""
    last = unit.conv[-1].conv
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)


class MaskedVAE(nn.Module):
    """VAE that restores an image from its corrupted version and damage mask.

    Examples
    --------
    >>> model = MaskedVAE(VAEConfig(channels=(8, 16), latent_channels=4)).eval()
    >>> x = torch.rand(2, 1, 30, 30); m = torch.zeros_like(x)
    >>> model.posterior_mean(x, m).shape
    torch.Size([2, 1, 30, 30])
    """

    def __init__(self, config: VAEConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        from monai.networks.blocks import Convolution, ResidualUnit, UpSample  # package-wide import: lazily

        self.config = config or VAEConfig(**kwargs)
        c = self.config
        sd, ch, act = c.spatial_dims, c.channels, c.act

        def conv(i: int, o: int, stride: int = 1) -> nn.Module:
            return Convolution(sd, i, o, strides=stride, kernel_size=3, act=act, norm=None)

        def res(n: int) -> nn.Module:
            units = [ResidualUnit(sd, n, n, subunits=2, act=act, norm=None) for _ in range(c.num_res_units)]
            for unit in units[1:]:  # a unit added to a trained model starts as the identity (see context)
                zero_last_conv(unit)
            return nn.Sequential(*units)

        # encoder: level 0 at full resolution, then one stride-2 step per level
        self.enc = nn.ModuleList()
        prev = c.in_channels + 1 + int(c.noise_map)  # image + mask (+ noise map)
        for i, n in enumerate(ch):
            self.enc.append(nn.Sequential(conv(prev, n, stride=1 if i == 0 else 2), res(n)))
            prev = n
        # dilated residual units at the coarsest level: context for large holes; each starts as the
        # identity (its last convolution is zero), so adding them to trained weights changes nothing
        self.context = nn.Sequential(*[ResidualUnit(sd, ch[-1], ch[-1], subunits=2, act=act, norm=None,
                                                    dilation=d) for d in c.context_dilations])
        for unit in self.context:
            zero_last_conv(unit)
        # the spatial latent: mean and log-variance from the coarsest features
        self.to_latent = Convolution(sd, ch[-1], 2 * c.latent_channels, kernel_size=1, conv_only=True)
        self.from_latent = nn.Sequential(conv(c.latent_channels, ch[-1]), res(ch[-1]))
        # decoder: upsample, concatenate the encoder's skip, fuse
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for i in range(len(ch) - 1, 0, -1):
            self.up.append(UpSample(sd, ch[i], ch[i - 1], scale_factor=2, mode="deconv"))
            self.dec.append(nn.Sequential(conv(2 * ch[i - 1], ch[i - 1]), res(ch[i - 1])))
        n_out = c.out_channels * (2 if c.scale_head else 1)  # residual (+ Laplace log-scale)
        self.head = Convolution(sd, ch[0], n_out, kernel_size=1, conv_only=True)
        nn.init.zeros_(self.head.conv.weight)  # start as the identity: output = input image
        nn.init.zeros_(self.head.conv.bias)

    def train_only_scale(self) -> list[nn.Parameter]:
        """Freeze everything but the Laplace scale output and return the parameters left to train.

        The scale is read from the decoder's last features by the head's ``log b`` rows; the head's
        restoration rows get their gradients zeroed, so with AdamW and no weight decay the
        restoration stays bit-identical while the scale learns (a short second stage of training,
        ``optim.train: scale_head``).
        """
        if not self.config.scale_head:
            raise ValueError("optim.train 'scale_head' needs a model with a scale head (model.scale_head: true)")
        for p in self.parameters():
            p.requires_grad_(False)
        k = self.config.out_channels
        params = [self.head.conv.weight, self.head.conv.bias]
        for p in params:
            keep = torch.ones_like(p)
            keep[:k] = 0  # the restoration rows
            p.requires_grad_(True)
            p.register_hook(lambda g, keep=keep: g * keep)
        return params

    # -- shape handling -------------------------------------------------------------------------
    def _pad(self, t: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        return pad_to_multiple(t, self.config.stride)

    @staticmethod
    def _crop(t: torch.Tensor, pads: list[int]) -> torch.Tensor:
        return crop_pads(t, pads)

    def _check(self, x: torch.Tensor, mask: torch.Tensor) -> None:
        c = self.config
        if x.ndim != c.spatial_dims + 2 or x.shape[1] != c.in_channels:
            raise ValueError(
                f"model expects input of shape (B, {c.in_channels}, {'H, W' if c.spatial_dims == 2 else 'H, W, D'}), "
                f"got {tuple(x.shape)}")
        if mask.shape[0] != x.shape[0] or mask.shape[2:] != x.shape[2:] or mask.shape[1] != 1:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match image shape {tuple(x.shape)}")

    # -- VAE API --------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior parameters ``(mu, logvar)`` of the spatial latent."""
        mu, logvar, _, _ = self._encode(self.prepare(x, mask), mask)
        return mu, logvar

    def prepare(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The image the network starts from: ``x``, with holes prefilled when configured."""
        if self.config.prefill == "harmonic" and self.config.spatial_dims == 2:
            with torch.autocast(x.device.type, enabled=False):
                return harmonic_fill(x.float(), 1 - mask.float()).to(x.dtype)
        return x

    def _encode(self, x, mask):
        self._check(x, mask)
        h, pads = self._pad(encoder_input(x, mask, self.config.noise_map, self.config.noise_map_gain))
        skips = []
        for block in self.enc:
            h = block(h)
            skips.append(h)
        h = self.context(h)
        skips[-1] = h
        mu, logvar = self.to_latent(h).chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)  # keeps exp() finite under fp16 autocast
        return mu, logvar, skips, pads

    def decode(self, z: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        """Residual prediction (padded size) from a latent and the encoder's skip features; with a
        scale head, the raw log-scale channels follow the residual channels."""
        h = self.from_latent(z)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips[:-1])):
            h = dec(torch.cat([up(h), skip], dim=1))
        return self.head(h)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, *, sample: bool | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: returns ``(reconstruction, mu, logvar)``.

        The latent is sampled with the reparameterisation trick in training mode and set to the
        mean in eval mode (unless ``sample`` says otherwise). The reconstruction covers every pixel;
        compositing known pixels is done by :meth:`posterior_mean` / :meth:`sample`. With a scale
        head, the reconstruction has ``2 * out_channels`` channels: the mean, then ``log b``.
        """
        x = self.prepare(x, mask)
        mu, logvar, skips, pads = self._encode(x, mask)
        if self.training if sample is None else sample:
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        else:
            z = mu
        out = self._crop(self.decode(z, skips), pads)
        return self._split(x, out), mu, logvar

    def _split(self, start: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return decoder_output(start, out, self.config.out_channels, self.config.scale_head)

    @staticmethod
    def _keep_known(x: torch.Tensor, out: torch.Tensor, mask: torch.Tensor, keep: bool) -> torch.Tensor:
        return keep_known(x, out, mask) if keep else out

    @torch.no_grad()
    def posterior_mean(self, x: torch.Tensor, mask: torch.Tensor, *, keep_known: bool = True) -> torch.Tensor:
        """Restoration from the posterior mean of the latent (not mean + sigma, cf. MONAI #8413).

        Pixels where ``mask == 0`` are returned exactly as given when ``keep_known``.
        """
        recon, _, _ = self.forward(x, mask, sample=False)
        return self._keep_known(x, recon[:, :self.config.out_channels], mask, keep_known)

    @torch.no_grad()
    def sample(self, x: torch.Tensor, mask: torch.Tensor, n: int, *, keep_known: bool = True,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` restorations from latents drawn from the posterior; shape ``(n, B, C, ...)``.

        The encoder runs once; only the decoder is repeated.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        start = self.prepare(x, mask)
        mu, logvar, skips, pads = self._encode(start, mask)
        std = torch.exp(0.5 * logvar)
        outs = []
        for _ in range(n):
            eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
            recon = self._split(start, self._crop(self.decode(mu + eps * std, skips), pads))
            outs.append(self._keep_known(x, recon[:, :self.config.out_channels], mask, keep_known))
        return torch.stack(outs)

    @torch.no_grad()
    def posterior_terms(self, x: torch.Tensor, mask: torch.Tensor, n: int,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(posterior mean restoration with known pixels kept, predictive variance)``."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        k = self.config.out_channels
        start = self.prepare(x, mask)
        mu, logvar, skips, pads = self._encode(start, mask)
        at_mean = self._split(start, self._crop(self.decode(mu, skips), pads))
        mean = keep_known(x, at_mean[:, :k], mask)
        var = torch.zeros_like(mean)
        if self.config.scale_head:
            var = 2.0 * torch.exp(2.0 * at_mean[:, k:].float()).to(mean.dtype)
        if n > 1:
            std = torch.exp(0.5 * logvar)
            draws = []
            for _ in range(n):
                eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
                draws.append(self._split(start, self._crop(self.decode(mu + eps * std, skips), pads))[:, :k])
            var = var + torch.stack(draws).float().var(0).to(mean.dtype)
        return mean, var

    @torch.no_grad()
    def predictive(self, x: torch.Tensor, mask: torch.Tensor, n: int,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior-mean restoration and the predictive standard deviation of every pixel.

        The std combines the spread of ``n`` decoded posterior samples (the model's own uncertainty;
        zero for ``n == 1``) with the decoder's Laplace scale (``sqrt(2) * b``, the aleatoric part) when
        the model has a scale head: ``std = sqrt(var_samples + 2 b**2)``. Known pixels get the input
        and a std of 0 (unless the mask is all ones). The encoder runs once. Uncalibrated: see
        :mod:`medvae.models.calibration`.
        """
        return predictive_stats(self, x, mask, n, generator)
