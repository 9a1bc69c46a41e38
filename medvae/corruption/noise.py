"""Noise and acquisition-artefact corruptions, and the machinery shared by every corruption.

Each corruption comes as

* a deterministic transform (every parameter explicit, the noise given by an integer ``seed``),
  e.g. :class:`GaussianNoise`; calling it returns ``(image, mask)``;
* a random transform, e.g. :class:`RandGaussianNoise`, that samples those parameters in
  :meth:`~RandCorruption.randomize` from ranges checked by :func:`~medvae.corruption.ranges.parse_range`,
  records them in ``last_params`` and delegates to the deterministic transform.

Images are channel-first, ``(C, H, W)`` or ``(C, H, W, D)``, numpy arrays or torch tensors (the
output has the input's type, device and float dtype; integer input gives float32). The input is
never modified. The mask has shape ``(1, *spatial)`` and dtype bool, ``True`` = affected pixel;
global noise marks the whole image.

Replaying a record reproduces the output bit for bit::

    >>> import numpy as np
    >>> img = np.zeros((1, 32, 32), np.float32)
    >>> t = RandGaussianNoise(sigma=(0.02, 0.1)).set_random_state(0)
    >>> out, mask = t(img)
    >>> again, _ = replay(img, t.record)
    >>> bool((out == again).all()), bool(mask.all())
    (True, True)
"""
from __future__ import annotations

import functools
import math
from contextlib import contextmanager
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np
import torch
from monai.transforms.intensity.array import GibbsNoise as _MonaiGibbsNoise
from monai.transforms.intensity.array import KSpaceSpikeNoise as _MonaiKSpaceSpikeNoise
from monai.transforms.intensity.array import RandRicianNoise as _MonaiRandRicianNoise
from monai.transforms.transform import RandomizableTransform, Transform
from monai.utils import TransformBackends, convert_to_dst_type

from medvae.corruption.ranges import parse_int, parse_prob, parse_range, parse_value
from medvae.intensity import DEFAULT_CT_WINDOW
from medvae.jsonsafe import json_safe

__all__ = [
    "Corruption", "RandCorruption", "REGISTRY", "register", "replay", "sigma_from_hu",
    "GaussianNoise", "RandGaussianNoise", "RicianNoise", "RandRicianNoise",
    "LowDoseCT", "RandLowDoseCT", "KSpaceSpikes", "RandKSpaceSpikes",
    "GibbsRinging", "RandGibbsRinging", "BiasField", "RandBiasField",
    "MotionGhosting", "RandMotionGhosting", "legendre_field",
]

#: Seeds drawn for the per-call noise lie in [0, SEED_MAX).
SEED_MAX = 2**31 - 1


def child_seed(seed: int, k: int) -> int:
    """The ``k``-th seed derived from ``seed`` (numpy ``SeedSequence([seed, k])``): independent of the
    others and of any random stream, stable across runs and versions.

    >>> child_seed(0, 1) == child_seed(0, 1) != child_seed(0, 2)
    True
    """
    return int(np.random.SeedSequence([int(seed), int(k)]).generate_state(1)[0])

#: registry name -> random transform class (``.deterministic`` gives the deterministic one).
REGISTRY: dict[str, type["RandCorruption"]] = {}


def register(name: str):
    """Class decorator: register a :class:`RandCorruption` under ``name`` (used by recipes)."""

    def deco(cls):
        cls.name = name
        cls.deterministic.name = name
        REGISTRY[name] = cls
        return cls

    return deco


# --------------------------------------------------------------------------------------------
# array conversion helpers
# --------------------------------------------------------------------------------------------
def _check_image(img: Any, spatial_dims: Sequence[int], name: str) -> None:
    if not isinstance(img, (np.ndarray, torch.Tensor)):
        raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(img).__name__}")
    nd = img.ndim - 1
    if nd not in (2, 3):
        raise ValueError(
            f"{name}: expected a channel-first image (C, H, W) or (C, H, W, D), got shape {tuple(img.shape)}"
        )
    if nd not in spatial_dims:
        raise ValueError(f"{name} needs a {spatial_dims[0]}-D image (C, H, W, D), got shape {tuple(img.shape)}")
    if any(int(s) == 0 for s in img.shape):
        raise ValueError(f"{name}: the image is empty (shape {tuple(img.shape)})")
    if (img.is_complex() or img.dtype == torch.bool) if isinstance(img, torch.Tensor) else \
            np.asarray(img).dtype.kind not in "iuf":  # complex lost its imaginary part with only a warning
        raise ValueError(f"{name}: the image has data type {img.dtype}; the corruptions work on real numbers")
    if isinstance(img, torch.Tensor):
        floating = img.is_floating_point()
        bad = int((~torch.isfinite(img.detach())).sum()) if floating else 0
    else:
        floating = np.issubdtype(img.dtype, np.inexact)
        bad = int(np.count_nonzero(~np.isfinite(img))) if floating else 0
    if bad:
        # k-space and projection corruptions would spread one NaN over the whole image
        raise ValueError(f"{name}: {bad} of {math.prod(img.shape)} values are NaN or infinite in the image; "
                         "replace them first (e.g. numpy.nan_to_num)")


def _to_numpy(img: np.ndarray | torch.Tensor) -> np.ndarray:
    """A C-ordered float copy of ``img`` as numpy (float64 stays float64, everything else float32)."""
    if isinstance(img, torch.Tensor):
        t = img.detach()
        if t.dtype == torch.float64:
            return np.array(t.cpu().numpy(), dtype=np.float64, copy=True, order="C")
        return np.array(t.to(device="cpu", dtype=torch.float32).numpy(), copy=True, order="C")
    dtype = np.float64 if img.dtype == np.float64 else np.float32
    # C order always: the FFT of a Fortran-ordered copy rounds differently, and a replay must be bit for bit
    return np.array(img, dtype=dtype, copy=True, order="C")


def _out_dtype(img: np.ndarray | torch.Tensor):
    if isinstance(img, torch.Tensor):
        return img.dtype if img.dtype.is_floating_point else torch.float32
    return img.dtype if np.issubdtype(img.dtype, np.floating) else np.dtype(np.float32)


def _like(out: np.ndarray, mask: np.ndarray, ref: np.ndarray | torch.Tensor):
    """Return ``(out, mask)`` converted to the type/device/dtype of ``ref``."""
    if isinstance(ref, torch.Tensor):
        o, *_ = convert_to_dst_type(out, dst=ref, dtype=_out_dtype(ref))
        m, *_ = convert_to_dst_type(mask, dst=ref, dtype=torch.bool)
        return o, m
    return out.astype(_out_dtype(ref), copy=False), mask.astype(bool, copy=False)


@contextmanager
def _small_op_threads(x: np.ndarray):
    """Run MONAI's torch code single-threaded on small images.

    On a busy 2-core machine a 2-thread torch FFT of a 128x128 slice took 15-30 ms instead of
    0.5 ms (threads waiting on each other); one thread is always as fast for slices. The previous
    setting is restored; large volumes keep torch's threads.
    """
    n = torch.get_num_threads()
    if x.size > 2**20 or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _full_mask(x: np.ndarray, value: bool) -> np.ndarray:
    return np.full((1, *x.shape[1:]), value, dtype=bool)


# --------------------------------------------------------------------------------------------
# base classes
# --------------------------------------------------------------------------------------------
class Corruption(Transform):
    """Base of the deterministic corruptions: ``__call__(img) -> (image, mask)``.

    Subclasses implement ``_apply(x)`` on a float numpy copy ``x`` of shape ``(C, *spatial)`` and
    return the corrupted array and the ``(1, *spatial)`` bool mask. :meth:`params` gives the
    constructor arguments, so ``type(t).from_params(**t.params())`` rebuilds the transform.
    """

    # as in MONAI: the types accepted and returned as given (device and dtype kept); the work itself is
    # done in numpy on the CPU, so a CUDA tensor makes a round trip through the host
    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]
    name: ClassVar[str] = "corruption"
    #: spatial dimensionalities the transform accepts
    spatial_dims: ClassVar[tuple[int, ...]] = (2, 3)
    #: how a scan volume is corrupted (:func:`medvae.corruption.corrupt_volume`): ``"slice"``, each
    #: slice by itself, as a 2-D acquisition or artefact is; ``"volume"``, one draw for the whole volume
    #: (a field smooth across slices, which a draw per slice would band); ``"either"``, voxel-wise noise
    volume_mode: ClassVar[str] = "slice"

    @classmethod
    def from_params(cls, **params: Any) -> "Corruption":
        """Rebuild the transform from a record's ``params``."""
        return cls(**params)

    def params(self) -> dict[str, Any]:  # pragma: no cover - overridden
        raise NotImplementedError

    def _apply(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    def __call__(self, img):
        _check_image(img, self.spatial_dims, type(self).__name__)
        out, mask = self._apply(_to_numpy(img))
        return _like(out, mask, img)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


class RandCorruption(RandomizableTransform):
    """Base of the random corruptions.

    ``randomize(img)`` samples the parameters of :attr:`deterministic` with ``self.R`` (its own
    ``numpy.random.RandomState``; :meth:`set_random_state` returns ``self``), including an integer
    noise ``seed`` where the corruption draws noise. ``__call__(img)`` returns ``(image, mask)``
    and stores the sampled parameters in :attr:`last_params` (``None`` when ``prob`` skipped the
    call, in which case the image is returned unchanged, as a copy, with an all-False mask).

    ``pixel_size_mm`` (keyword of ``__call__`` and ``randomize``) is the image's in-plane pixel size
    when the caller knows it: corruptions whose physics depends on it (:class:`RandLowDoseCT`) use it
    unless their own options fix it, and record the value used in their parameters, so replaying
    needs no geometry; the others ignore it. ``None`` (default): the corruption's own rule.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]
    deterministic: ClassVar[type[Corruption]] = Corruption
    name: ClassVar[str] = "corruption"

    def __init__(self, *, prob: float = 1.0) -> None:
        RandomizableTransform.__init__(self, prob=parse_prob(prob))
        self.last_params: dict[str, Any] | None = None
        self._params: dict[str, Any] | None = None
        self._pixel_size_mm: float | None = None  # the caller's geometry during randomize(), for _sample
        self._spacing_mm: tuple[float, ...] | None = None

    # -- to be provided by subclasses ----------------------------------------------------------
    def _sample(self, spatial_shape: tuple[int, ...], img: np.ndarray | torch.Tensor) -> dict[str, Any]:
        raise NotImplementedError  # pragma: no cover

    # -- MONAI protocol ------------------------------------------------------------------------
    def _seed(self) -> int:
        return int(self.R.randint(0, SEED_MAX))

    def randomize(self, img: np.ndarray | torch.Tensor, *,  # type: ignore[override]
                  pixel_size_mm: float | None = None, spacing_mm: Sequence[float] | None = None) -> None:
        """Decide whether to apply (``prob``) and sample the parameters for ``img`` (whose in-plane
        pixel size is ``pixel_size_mm``, and voxel size along every spatial axis ``spacing_mm``, when
        known)."""
        super().randomize(None)
        self._pixel_size_mm = (None if pixel_size_mm is None
                               else float(parse_value(pixel_size_mm, "pixel_size_mm", low=0, low_open=True)))
        self._spacing_mm = (None if spacing_mm is None or len(spacing_mm) != img.ndim - 1 else
                            tuple(float(parse_value(v, "spacing_mm", low=0, low_open=True)) for v in spacing_mm))
        self._params = json_safe(self._sample(tuple(img.shape[1:]), img)) if self._do_transform else None

    def __call__(self, img, *, randomize: bool = True, pixel_size_mm: float | None = None,
                 spacing_mm: Sequence[float] | None = None):
        _check_image(img, self.deterministic.spatial_dims, type(self).__name__)
        if randomize:
            self.randomize(img, pixel_size_mm=pixel_size_mm, spacing_mm=spacing_mm)
        elif self._do_transform and self._params is None:
            raise RuntimeError("call randomize() first, or use randomize=True")
        if not self._do_transform:
            self.last_params = None
            x = _to_numpy(img)
            return _like(x, _full_mask(x, False), img)
        self.last_params = dict(self._params)
        return self.deterministic.from_params(**self._params)(img)

    @property
    def record(self) -> dict[str, Any]:
        """``{"transform": name, "params": last_params}``, accepted by :func:`replay`."""
        return {"transform": self.name, "params": None if self.last_params is None else dict(self.last_params)}


def replay(img, record: dict[str, Any]):
    """Reproduce a recorded corruption bit for bit.

    Parameters
    ----------
    img : numpy.ndarray or torch.Tensor
        The same input that was corrupted.
    record : dict
        Either one transform's record ``{"transform": name, "params": {...}}`` (``RandX.record``)
        or a recipe record ``{"steps": [record, ...]}`` (see :mod:`medvae.corruption.recipes`).
        Steps with ``params`` ``None`` (skipped) are ignored.

    Returns
    -------
    (image, mask)
        As the original call returned them; the masks of several steps are united.

    Examples
    --------
    A random transform's record, even after a trip through JSON, gives back its output bit for bit:

    >>> import json
    >>> img = np.linspace(0, 1, 256, dtype=np.float32).reshape(1, 16, 16)
    >>> t = RandRicianNoise(sigma=(0.02, 0.1)).set_random_state(3)
    >>> out, mask = t(img)
    >>> t.record["transform"], sorted(t.record["params"])
    ('rician', ['seed', 'sigma', 'window'])
    >>> again, again_mask = replay(img, json.loads(json.dumps(t.record)))
    >>> bool((again == out).all()), bool((again_mask == mask).all())
    (True, True)
    """
    if not isinstance(record, Mapping):
        raise ValueError(f"replay: a record is a mapping ({{'transform': ..., 'params': ...}}), not {record!r:.60}")
    steps = record["steps"] if "steps" in record else [record]
    if not isinstance(steps, (list, tuple)):
        raise ValueError(f"replay: a recipe record's 'steps' is a list of records, not {steps!r:.60}")
    x = img
    mask = None
    for k, step in enumerate(steps):
        where = f"replay: step {k}" if "steps" in record else "replay"
        # 'params' is there even for a skipped step (null): a record without it (a typo) is no record
        if not isinstance(step, Mapping) or "transform" not in step or "params" not in step or not (
                step["params"] is None or isinstance(step["params"], Mapping)):
            raise ValueError(f"{where}: a record needs 'transform' (a name) and 'params' (a mapping, or null for "
                             "a skipped step), as a transform's .record holds them")
        params, name = step["params"], step["transform"]
        if params is None:
            continue
        if not isinstance(name, str) or name not in REGISTRY:
            raise ValueError(f"{where}: unknown transform {name!r}; known: {', '.join(sorted(REGISTRY))}")
        deterministic = REGISTRY[name].deterministic
        try:
            transform = deterministic.from_params(**params)
        except TypeError as exc:  # a missing or unknown parameter: say which, not Python's call error
            why = str(exc).split("() ", 1)[-1]  # "missing 1 required keyword-only argument: 'seed'"
            raise ValueError(f"{where}: {name!r} params do not fit {deterministic.__name__}: {why}") from None
        x, m = transform(x)
        mask = m if mask is None else mask | m
    if mask is None:  # nothing applied
        xn = _to_numpy(img)
        return _like(xn, _full_mask(xn, False), img)
    return x, mask


def _window_scale(window: Sequence[float] | None, name: str = "window") -> float:
    if window is None:
        return 1.0
    if isinstance(window, (str, bytes)) or not isinstance(window, Sequence) or len(window) != 2:
        raise ValueError(f"{name} must be (low, high), got {window!r}")
    lo, hi = parse_range(list(window), name)
    if hi <= lo:
        raise ValueError(f"{name} must be (low, high) with low < high, got {window!r}")
    return hi - lo


def sigma_from_hu(sigma_hu: float, *, window: Sequence[float] = DEFAULT_CT_WINDOW) -> float:
    """Convert a noise level in HU to a fraction of the intensity ``window``.

    >>> sigma_from_hu(50, window=(-1000, 1000))
    0.025
    """
    sigma_hu = parse_value(sigma_hu, "sigma_hu", low=0)
    return float(sigma_hu) / _window_scale(window)


# --------------------------------------------------------------------------------------------
# Gaussian
# --------------------------------------------------------------------------------------------
class GaussianNoise(Corruption):
    """Add white Gaussian noise of standard deviation ``sigma``.

    Parameters
    ----------
    sigma : float
        Standard deviation in image units, or, when ``window`` is given, as a fraction of the
        window width (``sigma=0.05, window=(-1000, 1000)`` adds 100 HU). On images normalized to
        [0, 1] by the intensity window, image units *are* fractions of the window.
    seed : int, keyword-only
        Seed of the noise field (``numpy.random.default_rng``).
    window : (float, float), optional, keyword-only
        Intensity window the image is expressed in; see :func:`sigma_from_hu`.

    Examples
    --------
    >>> out, mask = GaussianNoise(0.05, seed=1)(np.zeros((1, 64, 64), np.float32))
    >>> round(float(out.std()), 2), mask.shape
    (0.05, (1, 64, 64))
    """

    volume_mode = "either"

    def __init__(self, sigma: float, *, seed: int, window: Sequence[float] | None = None) -> None:
        self.sigma = float(parse_value(sigma, "sigma", low=0))
        self.seed = parse_int(seed, "seed", low=0)
        self.window = None if window is None else [float(v) for v in window]
        self._scale = _window_scale(window)

    def params(self) -> dict[str, Any]:
        return {"sigma": self.sigma, "seed": self.seed, "window": self.window}

    def _apply(self, x):
        rng = np.random.default_rng(self.seed)
        std = x.dtype.type(self.sigma * self._scale)
        # drawn in float32 whatever the input's type: numpy draws float64 by another algorithm, so paired
        # float32 and float64 keys (and a replay on a float64 copy) got unrelated noise fields
        out = x + std * rng.standard_normal(x.shape, dtype=np.float32).astype(x.dtype, copy=False)
        return out, _full_mask(x, True)


class _RandSigmaNoise(RandCorruption):
    """Shared by the additive noises: ``sigma`` sampled from a range, an optional HU ``window``."""

    def __init__(self, *, sigma: float | Sequence[float] = (0.01, 0.1),
                 window: Sequence[float] | None = None, prob: float = 1.0) -> None:
        super().__init__(prob=prob)
        self.sigma = parse_range(sigma, "sigma", low=0)
        _window_scale(window)
        self.window = None if window is None else [float(v) for v in window]

    def _sample(self, spatial_shape, img):
        return {"sigma": float(self.R.uniform(*self.sigma)), "seed": self._seed(), "window": self.window}


@register("gaussian")
class RandGaussianNoise(_RandSigmaNoise):
    """Gaussian noise with ``sigma`` drawn uniformly from a range.

    Unlike MONAI's ``RandGaussianNoise`` (std drawn from [0, std]), ``sigma`` is an explicit
    ``[min, max]`` range (a single number = fixed sigma), and ``prob`` defaults to 1.

    Parameters
    ----------
    sigma : float or (float, float), keyword-only
        Noise standard deviation range, in image units or window fractions (see ``window``).
    window : (float, float), optional, keyword-only
        See :class:`GaussianNoise`.
    prob : float, keyword-only
        Probability of applying the corruption.

    Examples
    --------
    >>> t = RandGaussianNoise(sigma=(0.02, 0.12)).set_random_state(seed=0)
    >>> out, mask = t(np.zeros((1, 32, 32), np.float32))
    >>> sorted(t.last_params)
    ['seed', 'sigma', 'window']
    """

    deterministic = GaussianNoise



# --------------------------------------------------------------------------------------------
# Rician
# --------------------------------------------------------------------------------------------
class RicianNoise(Corruption):
    """Rician noise of magnitude MR: ``sqrt((x + n1)^2 + n2^2)``, ``n1, n2 ~ N(0, sigma^2)``.

    Uses MONAI's ``RandRicianNoise`` with a fixed std and its RNG seeded with ``seed``. On a zero
    background the result is Rayleigh distributed with mean ``sigma * sqrt(pi / 2)``.

    Parameters
    ----------
    sigma : float
        Standard deviation of each Gaussian component (image units, or window fraction with
        ``window``).
    seed : int, keyword-only
        Noise seed.
    window : (float, float), optional, keyword-only
        See :class:`GaussianNoise`.

    Examples
    --------
    >>> out, _ = RicianNoise(0.1, seed=0)(np.zeros((1, 128, 128), np.float32))
    >>> bool(abs(out.mean() - 0.1 * np.sqrt(np.pi / 2)) < 0.002)  # Rayleigh mean
    True
    """

    volume_mode = "either"

    def __init__(self, sigma: float, *, seed: int, window: Sequence[float] | None = None) -> None:
        self.sigma = float(parse_value(sigma, "sigma", low=0))
        self.seed = parse_int(seed, "seed", low=0)
        self.window = None if window is None else [float(v) for v in window]
        self._scale = _window_scale(window)

    def params(self):
        return {"sigma": self.sigma, "seed": self.seed, "window": self.window}

    def _apply(self, x):
        monai_t = _MonaiRandRicianNoise(prob=1.0, mean=0.0, std=self.sigma * self._scale,
                                       channel_wise=False, relative=False, sample_std=False, dtype=None)
        monai_t.set_random_state(seed=self.seed)
        with _small_op_threads(x):
            out = monai_t(torch.from_numpy(x), randomize=True)
        return np.asarray(out.detach().cpu().numpy(), dtype=x.dtype), _full_mask(x, True)


@register("rician")
class RandRicianNoise(_RandSigmaNoise):
    """Rician noise with ``sigma`` drawn from a range (MONAI's default std of 1.0 is not used).

    Parameters
    ----------
    sigma : float or (float, float), keyword-only
        Range of the Gaussian components' standard deviation.
    window : (float, float), optional, keyword-only
        See :class:`GaussianNoise`.
    prob : float, keyword-only

    Examples
    --------
    >>> out, mask = RandRicianNoise(sigma=(0.02, 0.08)).set_random_state(1)(np.ones((1, 16, 16)))
    """

    deterministic = RicianNoise

    def __init__(self, *, sigma: float | Sequence[float] = (0.01, 0.08),
                 window: Sequence[float] | None = None, prob: float = 1.0) -> None:
        super().__init__(sigma=sigma, window=window, prob=prob)


# --------------------------------------------------------------------------------------------
# Low-dose CT (Poisson noise in projection space)
# --------------------------------------------------------------------------------------------
#: linear attenuation of water at ~70 keV, per mm
MU_WATER_PER_MM = 0.0193
#: ``photons`` is given per view of a scan with this many views (see :class:`LowDoseCT`)
REFERENCE_VIEWS = 1000
#: HU that :class:`LowDoseCT` accepts (after ``hu_window``): air is -1000, padding outside the field of
#: view goes down to -32768, extended-scale metal to ~30000; an image in HU read as window units
#: lies far beyond (window ``(-1000, 1000)``: air, -1000, reads as -2e6 HU; bone, 1000, as 2e6 HU)
LOWDOSE_HU_RANGE = (-1e5, 1e5)


def _resize_linear(a: np.ndarray, size: int) -> np.ndarray:
    """Area-style resize of a square 2-D array to ``size x size`` (cheap, for projection only)."""
    from skimage.transform import resize

    return resize(a, (size, size), order=1, mode="constant", cval=0.0, anti_aliasing=True,
                  preserve_range=True)


#: Largest projection or backprojection operator kept in memory, in nonzeros (8 Mi, ~100 MB: the
#: backprojection onto 256x256 with 64 views, ~250 MB at peak while it is built; 24 MB at 128x128);
#: larger ones fall back to ``skimage.transform.radon`` and ``iradon`` themselves. At most 4 of each
#: are cached (the last sizes used), per process.
_MAX_OPERATOR_NNZ = 2**23


def _views(n_angles: int) -> np.ndarray:
    """The view angles in degrees: ``n_angles`` over 180 degrees."""
    return np.linspace(0.0, 180.0, n_angles, endpoint=False)


#: positions (pixel x view) handled at once while an operator is built: bounds the temporary arrays
_BUILD_CHUNK = 2**18


def _csr_block(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, shape: tuple[int, int]):
    """One row block of an operator as CSR (zero weights dropped, repeated entries summed)."""
    import scipy.sparse

    keep = vals != 0
    return scipy.sparse.csr_matrix((vals[keep], (rows[keep].astype(np.int32), cols[keep].astype(np.int32))),
                                   shape=shape)


def _vstack(blocks: list) -> Any:
    import scipy.sparse

    return scipy.sparse.vstack(blocks, format="csr")


@functools.lru_cache(maxsize=4)
def _projector(size: int, n_angles: int):
    """Forward projection as ``skimage.transform.radon(image, _views(n_angles), circle=False)``
    computes it, as a cached linear operator.

    radon zero-pads the ``size x size`` image to ``p = size + ceil(sqrt(2) size - size)``, rotates it
    about pixel ``p // 2`` for each view (``warp``: bilinear, zeros outside) and sums the rows. Returns
    ``(p, A)``: the sparse ``A`` (``p * n_angles x size**2``, CSR) holds those bilinear weights, so
    ``(A @ image.ravel()).reshape(p, n_angles)`` is the sinogram (equal to radon's up to float
    rounding; see the tests).
    """
    pad = int(np.ceil(np.sqrt(2) * size - size))
    before = (size + pad) // 2 - size // 2
    p = size + pad
    center = p // 2
    angles = np.deg2rad(_views(n_angles))
    cos_a, sin_a = np.cos(angles), np.sin(angles)
    blocks = []
    step = max(1, _BUILD_CHUNK // (p * n_angles))
    for first in range(0, p, step):  # blocks of detector bins (= columns of the rotated image)
        out_r, out_c = np.mgrid[:p, first:min(first + step, p)]
        out_r, out_c = out_r[..., None], out_c[..., None]
        # warp's inverse map of output pixel (row, col), with radon's rotation matrix
        c_in = cos_a * out_c + sin_a * out_r - center * (cos_a + sin_a - 1)
        r_in = -sin_a * out_c + cos_a * out_r - center * (cos_a - sin_a - 1)
        r0, c0 = np.floor(r_in), np.floor(c_in)
        dr, dc = r_in - r0, c_in - c0
        r0 = r0.astype(np.int64) - before
        c0 = c0.astype(np.int64) - before
        r1 = np.ceil(r_in).astype(np.int64) - before
        c1 = np.ceil(c_in).astype(np.int64) - before
        det_view = (out_c - first) * n_angles + np.arange(n_angles)  # sinogram entry (detector, view)
        rows, cols, vals = [], [], []
        for r, c, wgt in ((r0, c0, (1 - dr) * (1 - dc)), (r0, c1, (1 - dr) * dc),
                          (r1, c0, dr * (1 - dc)), (r1, c1, dr * dc)):
            ok = (r >= 0) & (r < size) & (c >= 0) & (c < size)  # the padding and beyond are zeros
            rows.append(np.broadcast_to(det_view, ok.shape)[ok])
            cols.append(r[ok] * size + c[ok])
            vals.append(wgt[ok])
        blocks.append(_csr_block(np.concatenate(rows), np.concatenate(cols), np.concatenate(vals),
                                 (out_c.shape[1] * n_angles, size * size)))
    return p, _vstack(blocks)


def _project(image: np.ndarray, n_angles: int) -> np.ndarray:
    """``skimage.transform.radon(image, _views(n_angles), circle=False)`` of a square image, via
    :func:`_projector`."""
    size = image.shape[0]
    if 4 * size * size * n_angles > _MAX_OPERATOR_NNZ:
        from skimage.transform import radon

        return radon(image, _views(n_angles), circle=False, preserve_range=True)
    p, a = _projector(size, n_angles)
    return (a @ image.ravel()).reshape(p, n_angles)


def _ramp_filter(size: int) -> np.ndarray:
    """The ramp filter of ``skimage.transform.iradon(filter_name="ramp")`` for a padded length ``size``:
    the DFT of the band-limited ramp's spatial kernel (Kak & Slaney, eq. 61), first ``size // 2 + 1`` bins."""
    n = np.concatenate((np.arange(1, size / 2 + 1, 2, dtype=int), np.arange(size / 2 - 1, 0, -2, dtype=int)))
    f = np.zeros(size)
    f[0] = 0.25
    f[1::2] = -1 / (np.pi * n) ** 2
    return 2 * np.real(np.fft.rfft(f))


@functools.lru_cache(maxsize=4)
def _backprojector(n_det: int, n_angles: int, size: int):
    """Filtered backprojection as ``skimage.transform.iradon`` computes it (``circle=False``,
    ``output_size=size``, views ``_views(n_angles)``, linear interpolation), as a cached linear operator.

    Returns ``(pad, ramp, A)``: the sinogram ``(n_det, n_angles)`` is zero-padded to ``pad`` rows and
    ramp-filtered along the detector, and the sparse ``A`` (``size**2 x n_det*n_angles``, CSR) maps
    the filtered sinogram, raveled in C order, to the image raveled in C order; it holds iradon's
    interpolation weights (``np.interp`` with zeros outside the detector) times its
    ``pi / (2 n_angles)`` scale. iradon loops over the views in Python; one sparse product is
    several times faster and gives the same image up to float rounding (see the tests).
    """
    pad = max(64, int(2 ** np.ceil(np.log2(2 * n_det))))
    angles = np.deg2rad(_views(n_angles))
    radius = size // 2
    cos_a, sin_a = np.cos(angles), np.sin(angles)
    scale = np.pi / (2 * n_angles)
    blocks = []
    step = max(1, _BUILD_CHUNK // (size * n_angles))
    for first in range(0, size, step):  # blocks of image rows
        xpr, ypr = np.mgrid[first:min(first + step, size), :size] - radius
        # detector coordinate of every (pixel, view), the same expression as in iradon
        t = ypr[..., None] * cos_a - xpr[..., None] * sin_a
        lo = np.floor(t)
        w = t - lo
        inside = (t >= -(n_det // 2)) & (t <= n_det - 1 - n_det // 2)
        j = lo.astype(np.int64) + n_det // 2
        pix = np.broadcast_to(np.arange(xpr.size).reshape(*xpr.shape, 1), t.shape)
        view = np.broadcast_to(np.arange(n_angles), t.shape)
        upper = inside & (w > 0)  # at the last detector bin (w == 0) np.interp uses that bin alone
        rows = np.concatenate((pix[inside], pix[upper]))
        cols = np.concatenate((j[inside] * n_angles + view[inside], (j[upper] + 1) * n_angles + view[upper]))
        vals = np.concatenate(((1.0 - w[inside]) * scale, w[upper] * scale))
        blocks.append(_csr_block(rows, cols, vals, (xpr.size, n_det * n_angles)))
    return pad, _ramp_filter(pad), _vstack(blocks)


def _filtered_backprojection(sinogram: np.ndarray, size: int) -> np.ndarray:
    """``skimage.transform.iradon(sinogram, _views(n_angles), output_size=size, circle=False,
    filter_name="ramp")``, via :func:`_backprojector`."""
    n_det, n_angles = sinogram.shape
    if 2 * size * size * n_angles > _MAX_OPERATOR_NNZ:
        from skimage.transform import iradon

        return iradon(sinogram, _views(n_angles), output_size=size, circle=False, filter_name="ramp",
                      preserve_range=True)
    pad, ramp, a = _backprojector(n_det, n_angles, size)
    filtered = np.fft.irfft(np.fft.rfft(sinogram, n=pad, axis=0) * ramp[:, None], n=pad, axis=0)[:n_det]
    return (a @ filtered.ravel()).reshape(size, size)


def _lowdose_noise(mu_mm: np.ndarray, *, incident: float, rng: np.random.Generator,
                   pixel_size_mm: float, n_angles: int, projection_size: int | None) -> np.ndarray:
    """Noise field (attenuation per mm) of a scan at ``incident`` photons per ray, on a square image."""
    m = mu_mm.shape[0]
    f = 1.0
    small = mu_mm
    if projection_size is not None and m > projection_size:
        f = m / projection_size
        small = _resize_linear(mu_mm, projection_size)
    # line integrals (dimensionless) on the (possibly coarse) grid
    sino_small = _project(small, n_angles) * (pixel_size_mm * f)
    n_full = int(math.ceil(math.sqrt(2) * m))  # detector length radon() gives for the full image
    pad_full = n_full - m
    c_full = (m + pad_full) // 2
    if f == 1.0:
        p = sino_small
    else:  # linear interpolation along the detector, aligned on the rotation centre
        c_small = sino_small.shape[0] // 2
        t = (np.arange(n_full) - c_full) / f + c_small
        i0 = np.floor(t).astype(int)
        w = (t - i0)[:, None]
        n_small = sino_small.shape[0]
        a = np.where(((i0 >= 0) & (i0 < n_small))[:, None], sino_small[np.clip(i0, 0, n_small - 1)], 0.0)
        b = np.where(((i0 + 1 >= 0) & (i0 + 1 < n_small))[:, None], sino_small[np.clip(i0 + 1, 0, n_small - 1)], 0.0)
        p = (1 - w) * a + w * b
    p = np.maximum(p, 0.0)
    lam = incident * np.exp(-p)
    counts = np.maximum(rng.poisson(lam), 1)  # a ray with no photon is read as one photon
    with np.errstate(divide="ignore"):
        log_lam = np.log(lam)
    # where exp(-p) underflowed (lam == 0, log -inf: an all-NaN image after filtering) the log
    # domain gives the clean log count; elsewhere the values are those computed before, bit for bit
    log_lam = np.where(lam > 0, log_lam, math.log(incident) - p)
    delta = log_lam - np.log(counts)  # noisy minus clean line integral
    noise_pix = _filtered_backprojection(delta, m)
    return noise_pix / pixel_size_mm


class LowDoseCT(Corruption):
    """Low-dose CT noise simulated in projection space.

    For each axial slice (``(C, H, W)``, or every ``[..., k]`` of ``(C, H, W, D)``): HU are turned
    into attenuation ``mu = mu_water (1 + HU/1000)`` (clipped at 0) with the pixel size, forward
    projected (``skimage.transform.radon``, ``n_angles`` views over 180 degrees, on a grid of at most
    ``projection_size`` pixels: line integrals only set the noise variance, so a coarse grid is
    enough), transmitted counts ``photons * dose * exp(-p)`` are drawn from a Poisson law and logged
    back. Only the *noise field* ``FBP(noisy) - FBP(clean)`` is reconstructed (``iradon``, ramp
    filter, full resolution) and added to the image, so the image's own detail is kept. The noise
    is correlated, streaky behind dense bone, and its std grows like ``1/sqrt(dose)``. ``radon``
    and ``iradon`` are applied as sparse matrices holding their interpolation weights, built on
    first use for each size and cached (the same sinogram and image up to float rounding; operators
    above ~100 MB, e.g. ``iradon`` beyond 256x256 with 64 views, call scikit-image itself).

    ``photons`` is the incident count per detector bin and view of a scan with
    ``REFERENCE_VIEWS`` (1000) views; the simulation uses ``n_angles`` views with
    ``photons * 1000 / n_angles`` photons each, so the noise *level* does not depend on
    ``n_angles`` (only its texture does). With ``photons=1e5`` the noise std in a 20 cm water disk
    is about 10 HU at full dose for 2 mm pixels (21 HU for 1 mm pixels) and grows like
    ``1/sqrt(dose)``. The pixel size is ``pixel_size_mm`` or, by default, ``fov_mm`` divided by the
    image's larger side, so a down-sampled slice and the original see the same anatomy sizes
    (:class:`RandLowDoseCT` takes the pixel size from the caller when it knows the scan's spacing:
    ``medvae corrupt``). The noise already present in the input is not accounted for.

    Timing (the 2-core development machine, one slice of the dev head CT, defaults
    ``n_angles=64, projection_size=64``, median of 100 calls): 3.4 ms at 128x128, 10.5 ms at
    256x256, mostly the two sparse products; calling scikit-image's ``radon`` and ``iradon`` (which
    loop over the views in Python) took 15 ms and 33 ms. Building the operators takes ~0.2 s for
    128x128 and ~0.7 s for 256x256, once per size and process.

    Parameters
    ----------
    dose : float
        Dose fraction in (0, 1].
    photons : float, keyword-only
        Incident photons per ray at full dose (``I0``), > 0.
    seed : int, keyword-only
        Seed of the Poisson draws.
    hu_window : (float, float), optional, keyword-only
        If given, the image holds normalized values ``v`` with ``HU = lo + v (hi - lo)``;
        ``None`` (default): the image is in HU. Values that read as HU beyond
        :data:`LOWDOSE_HU_RANGE` (+-1e5) raise ``ValueError``: typically an image in HU given with
        ``hu_window`` (the recipes expect window units).
    fov_mm : float, keyword-only
        Field of view (the image's larger side) in mm, used when ``pixel_size_mm`` is None
        (default 250: a head; use ~350-450 for a body).
    pixel_size_mm : float or None, keyword-only
        In-plane pixel size; overrides ``fov_mm``.
    n_angles : int, keyword-only
        Number of views over 180 degrees (default 64).
    projection_size : int or None, keyword-only
        Size of the grid used for the forward projection (default 64; ``None``: full resolution).

    Examples
    --------
    >>> hu = np.zeros((1, 64, 64), np.float32)  # water
    >>> out, mask = LowDoseCT(0.25, photons=1e5, seed=0, pixel_size_mm=1.0)(hu)
    >>> bool(abs(out.mean()) < 5), bool(mask.all())
    (True, True)
    """

    def __init__(self, dose: float, *, photons: float, seed: int,
                 hu_window: Sequence[float] | None = None, fov_mm: float = 250.0,
                 pixel_size_mm: float | None = None, n_angles: int = 64,
                 projection_size: int | None = 64) -> None:
        self.dose = float(parse_value(dose, "dose", low=0, high=1, low_open=True))
        self.photons = float(parse_value(photons, "photons", low=0, low_open=True))
        self.seed = parse_int(seed, "seed", low=0)
        _window_scale(hu_window, "hu_window")
        self.hu_window = None if hu_window is None else [float(v) for v in hu_window]
        self.fov_mm = float(parse_value(fov_mm, "fov_mm", low=0, low_open=True))
        self.pixel_size_mm = (None if pixel_size_mm is None
                              else float(parse_value(pixel_size_mm, "pixel_size_mm", low=0, low_open=True)))
        self.n_angles = parse_int(n_angles, "n_angles", low=2)
        self.projection_size = None if projection_size is None else parse_int(projection_size, "projection_size", low=8)

    def params(self):
        return {"dose": self.dose, "photons": self.photons, "seed": self.seed, "hu_window": self.hu_window,
                "fov_mm": self.fov_mm, "pixel_size_mm": self.pixel_size_mm, "n_angles": self.n_angles,
                "projection_size": self.projection_size}

    def _check_units(self, x: np.ndarray, lo: float, scale: float) -> None:
        """Refuse values no CT holds once read as HU, typically an image in HU given where window
        units are expected (``hu_window``): its noise was hundreds of times too strong, or NaN."""
        vmin, vmax = float(x.min()), float(x.max())
        # in window units a CT spans about 0..1 (air..soft tissue; bone above 1, padding down to -1); in HU
        # no image with air or bone lies within -1.6..4 HU
        if self.hu_window is None and -1.6 <= vmin and vmax <= 4.0 and vmax - vmin >= 0.25:
            raise ValueError(f"LowDoseCT expects HU (hu_window=None), but the image's values {vmin:g}..{vmax:g} "
                             "look scaled to [0, 1] of a window: give that window as hu_window, e.g. "
                             "hu_window=(-1000, 1000), or its noise is hundreds of times too strong")
        hu_lo, hu_hi = vmin * scale + lo, vmax * scale + lo
        if LOWDOSE_HU_RANGE[0] <= hu_lo and hu_hi <= LOWDOSE_HU_RANGE[1]:
            return
        if self.hu_window is None:
            expects = "HU (hu_window=None)"
        else:
            a, b = self.hu_window
            expects = (f"values scaled to [0, 1] of the intensity window {a:g}..{b:g} HU, "
                       f"(HU {'-' if a >= 0 else '+'} {abs(a):g}) / {b - a:g} (the recipes' input)")
        raise ValueError(f"LowDoseCT expects {expects}; the image's values {vmin:g}..{vmax:g} read as "
                         f"{hu_lo:.3g}..{hu_hi:.3g} HU, beyond {LOWDOSE_HU_RANGE[0]:g}..{LOWDOSE_HU_RANGE[1]:g}")

    def _apply(self, x):
        rng = np.random.default_rng(self.seed)
        lo, scale = (0.0, 1.0) if self.hu_window is None else (self.hu_window[0], _window_scale(self.hu_window))
        self._check_units(x, lo, scale)
        hw = x.shape[1:3]
        m = max(hw)
        pixel = self.pixel_size_mm if self.pixel_size_mm is not None else self.fov_mm / m
        out = x.copy()
        slices = [(c,) for c in range(x.shape[0])] if x.ndim == 3 else [
            (c, Ellipsis, k) for c in range(x.shape[0]) for k in range(x.shape[3])]
        for idx in slices:
            hu = x[idx].astype(np.float64) * scale + lo
            mu = np.zeros((m, m))
            o0, o1 = (m - hw[0]) // 2, (m - hw[1]) // 2
            mu[o0:o0 + hw[0], o1:o1 + hw[1]] = np.maximum(MU_WATER_PER_MM * (1.0 + hu / 1000.0), 0.0)
            incident = self.photons * self.dose * REFERENCE_VIEWS / self.n_angles
            noise_mu = _lowdose_noise(mu, incident=incident, rng=rng,
                                      pixel_size_mm=pixel, n_angles=self.n_angles,
                                      projection_size=self.projection_size)
            noise_hu = 1000.0 * noise_mu[o0:o0 + hw[0], o1:o1 + hw[1]] / MU_WATER_PER_MM
            out[idx] = (x[idx] + (noise_hu / scale)).astype(x.dtype)
        return out, _full_mask(x, True)


@register("lowdose_ct")
class RandLowDoseCT(RandCorruption):
    """Low-dose CT noise with ``dose`` (and optionally ``photons``) drawn from ranges.

    Parameters
    ----------
    dose : float or (float, float), keyword-only
        Dose fraction range, in (0, 1].
    photons : float or (float, float), keyword-only
        Full-dose incident photons per ray; a range is sampled log-uniformly.
    pixel_size_mm : float or None, keyword-only
        A fixed in-plane pixel size. ``None`` (default): the ``pixel_size_mm`` the call is given
        (the scan's spacing), else the ``fov_mm`` rule of :class:`LowDoseCT`. The size used is
        recorded in the parameters.
    hu_window, fov_mm, n_angles, projection_size : keyword-only
        See :class:`LowDoseCT`.
    prob : float, keyword-only

    Examples
    --------
    >>> t = RandLowDoseCT(dose=(0.1, 0.5), hu_window=(-1000, 1000)).set_random_state(0)
    >>> out, mask = t(np.full((1, 64, 64), 0.5, np.float32))
    >>> t.last_params["pixel_size_mm"] is None   # unknown: fov_mm / 64
    True
    >>> out, mask = t(np.full((1, 64, 64), 0.5, np.float32), pixel_size_mm=0.7)
    >>> t.last_params["pixel_size_mm"]
    0.7
    """

    deterministic = LowDoseCT

    def __init__(self, *, dose: float | Sequence[float] = (0.1, 0.5), photons: float | Sequence[float] = 1e5,
                 hu_window: Sequence[float] | None = None, fov_mm: float = 250.0,
                 pixel_size_mm: float | None = None, n_angles: int = 64, projection_size: int | None = 64,
                 prob: float = 1.0) -> None:
        super().__init__(prob=prob)
        self.dose = parse_range(dose, "dose", low=0, high=1, low_open=True)
        self.photons = parse_range(photons, "photons", low=0, low_open=True)
        self.fixed = LowDoseCT(1.0, photons=1.0, seed=0, hu_window=hu_window, fov_mm=fov_mm,
                               pixel_size_mm=pixel_size_mm, n_angles=n_angles, projection_size=projection_size)  # validates the rest

    def _sample(self, spatial_shape, img):
        p = self.fixed.params()
        lo, hi = self.photons
        p["dose"] = float(self.R.uniform(*self.dose))
        p["photons"] = lo if lo == hi else float(math.exp(self.R.uniform(math.log(lo), math.log(hi))))
        p["seed"] = self._seed()
        if p["pixel_size_mm"] is None:  # the recipe's own size wins over the scan's
            p["pixel_size_mm"] = self._pixel_size_mm
        return p


# --------------------------------------------------------------------------------------------
# k-space spikes
# --------------------------------------------------------------------------------------------
class KSpaceSpikes(Corruption):
    """Herringbone artefact: spikes in k-space (MONAI ``KSpaceSpikeNoise``).

    Parameters
    ----------
    locations : list of spatial index tuples
        Spike positions in centred k-space (``fftshift`` order), one tuple per spike, of length 2
        (2-D) or 3 (3-D); the same spikes are put in every channel.
    intensities : list of float
        Spike magnitude per spike, relative to the k-space centre ``|sum(x)|`` of each channel:
        the stripe pattern it adds has an amplitude of about ``intensity * mean(x)``.

    Examples
    --------
    >>> out, mask = KSpaceSpikes([(10, 20)], [0.5])(np.ones((1, 32, 32), np.float32))
    >>> round(float(out.max() - out.min()), 1)
    1.0
    """

    def __init__(self, locations: Sequence[Sequence[int]], intensities: Sequence[float]) -> None:
        if not isinstance(locations, (list, tuple)) or not locations:
            raise ValueError(f"locations must be a non-empty list of index tuples, got {locations!r}")
        self.locations = [[parse_int(v, "locations", low=0) for v in loc] for loc in locations]
        if not isinstance(intensities, (list, tuple)) or len(intensities) != len(self.locations):
            raise ValueError("intensities must be a list with one value per location")
        self.intensities = [float(parse_value(v, "intensities", low=0)) for v in intensities]

    def params(self):
        return {"locations": self.locations, "intensities": self.intensities}

    def _apply(self, x):
        spatial = x.shape[1:]
        for loc in self.locations:
            if len(loc) != len(spatial) or any(i >= s for i, s in zip(loc, spatial)):
                raise ValueError(f"spike location {loc} does not fit an image of spatial shape {spatial}")
        n = float(np.prod(spatial))
        locs, vals = [], []
        for c in range(x.shape[0]):
            dc = max(abs(float(x[c].sum(dtype=np.float64))), 1e-6 * n)
            for loc, inten in zip(self.locations, self.intensities):
                locs.append((c, *loc))
                vals.append(math.log(max(inten, 1e-12) * dc))
        with _small_op_threads(x):
            out = _MonaiKSpaceSpikeNoise(loc=locs, k_intensity=vals)(torch.from_numpy(x))
        return np.asarray(out.detach().cpu().numpy(), dtype=x.dtype), _full_mask(x, True)


@register("kspace_spikes")
class RandKSpaceSpikes(RandCorruption):
    """Random k-space spikes: ``n_spikes`` positions away from the centre, relative ``intensity``.

    Parameters
    ----------
    n_spikes : int or (int, int), keyword-only
        Number of spikes (default 1-2).
    intensity : float or (float, float), keyword-only
        Relative spike magnitude range (see :class:`KSpaceSpikes`), default 0.1-0.4.
    min_radius : float, keyword-only
        Spikes are at least this fraction of the half-size away from the k-space centre
        (default 0.1), so they produce stripes rather than a brightness change.
    prob : float, keyword-only

    Examples
    --------
    >>> out, mask = RandKSpaceSpikes(n_spikes=1).set_random_state(0)(np.ones((1, 32, 32)))
    """

    deterministic = KSpaceSpikes

    def __init__(self, *, n_spikes: int | Sequence[int] = (1, 2), intensity: float | Sequence[float] = (0.1, 0.4),
                 min_radius: float = 0.1, prob: float = 1.0) -> None:
        super().__init__(prob=prob)
        self.n_spikes = parse_range(n_spikes, "n_spikes", low=1, integer=True)
        self.intensity = parse_range(intensity, "intensity", low=0)
        self.min_radius = float(parse_value(min_radius, "min_radius", low=0, high=1, high_open=True))

    def _sample(self, spatial_shape, img):
        n = int(self.R.randint(self.n_spikes[0], self.n_spikes[1] + 1))
        centre = np.array([s // 2 for s in spatial_shape], dtype=float)
        half = np.array(spatial_shape, dtype=float) / 2
        locs = []
        for _ in range(n):
            for _attempt in range(1000):
                loc = np.array([self.R.randint(0, s) for s in spatial_shape])
                if np.sqrt((((loc - centre) / half) ** 2).sum()) >= self.min_radius:
                    break
            locs.append([int(v) for v in loc])
        vals = [float(self.R.uniform(*self.intensity)) for _ in range(n)]
        return {"locations": locs, "intensities": vals}


# --------------------------------------------------------------------------------------------
# Gibbs ringing
# --------------------------------------------------------------------------------------------
class GibbsRinging(Corruption):
    """Gibbs ringing by k-space truncation (MONAI ``GibbsNoise``).

    Parameters
    ----------
    alpha : float
        In [0, 1]; k-space is kept within a radius ``(1 - alpha) * max(shape) * sqrt(2) / 2``.
        0 is the identity; ~0.4-0.7 gives visible ringing at 128 pixels.

    Examples
    --------
    >>> out, mask = GibbsRinging(0.5)(np.ones((1, 32, 32), np.float32))
    """

    def __init__(self, alpha: float) -> None:
        self.alpha = float(parse_value(alpha, "alpha", low=0, high=1))

    def params(self):
        return {"alpha": self.alpha}

    def _apply(self, x):
        with _small_op_threads(x):
            out = _MonaiGibbsNoise(alpha=self.alpha)(torch.from_numpy(x))
        return np.asarray(out.detach().cpu().numpy(), dtype=x.dtype), _full_mask(x, True)


@register("gibbs")
class RandGibbsRinging(RandCorruption):
    """Gibbs ringing with ``alpha`` drawn from a range (default 0.4-0.7).

    Examples
    --------
    >>> out, mask = RandGibbsRinging(alpha=(0.4, 0.6)).set_random_state(0)(np.ones((1, 32, 32)))
    """

    deterministic = GibbsRinging

    def __init__(self, *, alpha: float | Sequence[float] = (0.4, 0.7), prob: float = 1.0) -> None:
        super().__init__(prob=prob)
        self.alpha = parse_range(alpha, "alpha", low=0, high=1)

    def _sample(self, spatial_shape, img):
        return {"alpha": float(self.R.uniform(*self.alpha))}


# --------------------------------------------------------------------------------------------
# Bias field
# --------------------------------------------------------------------------------------------
def legendre_field(spatial_shape: Sequence[int], *, degree: int, coefficients: Sequence[float],
                   extent: Sequence[float] | None = None, order: str = "total") -> np.ndarray:
    """Sum of products of Legendre polynomials on ``[-1, 1]`` per axis, of total degree at most
    ``degree``, from NumPy's public Legendre functions.

    ``extent``: the half-range each axis spans (default 1 for all): an axis of the image that is
    physically shorter than the longest covers a shorter stretch of ``[-1, 1]``, so the field is smooth in
    mm (a volume of 4 slices 6 mm deep got the field's whole variation across them). ``order="monai"``:
    the 2-D coefficient order of MONAI and of medvae before 2026-12-07 (records without ``order``).

    Coefficient ``c[i, j]`` of ``P_i(x) P_j(y)`` for ``i + j <= degree`` (2-D), ``c[i, j, k]`` for
    ``i + j + k <= degree`` (3-D), ``i`` slowest: in 3-D the field of MONAI's ``RandBiasField`` with
    its coefficient order. MONAI's 2-D field takes ``j <= i <= degree`` instead (total degree up to
    twice ``degree``, and no ``P_j(y)`` term alone), which makes it rougher along the first axis than
    along the second; medvae's treats both axes alike.

    Examples
    --------
    >>> f = legendre_field((4, 3), degree=1, coefficients=[0.5, 0.0, 1.0])  # c00, c01, c10
    >>> f.shape, float(f[0, 0]), float(f[-1, -1])  # 0.5 + P_1(x): a ramp along the first axis
    ((4, 3), -0.5, 1.5)
    """
    rank = len(spatial_shape)
    ext = [1.0] * rank if extent is None else [float(e) for e in extent]
    coords = [np.linspace(-e, e, dim, dtype=np.float32) for dim, e in zip(spatial_shape, ext)]
    c = np.zeros((degree + 1,) * rank)
    if rank == 2 and order == "monai":
        c[np.tril_indices(degree + 1)] = coefficients
        return np.polynomial.legendre.leggrid2d(coords[0], coords[1], c)
    if rank == 2:
        idx = np.array([(i, j) for i in range(degree + 1) for j in range(degree + 1 - i)])
        c[idx[:, 0], idx[:, 1]] = coefficients
        return np.polynomial.legendre.leggrid2d(coords[0], coords[1], c)
    if rank == 3:
        idx = np.array([(i, j, k) for i in range(degree + 1) for j in range(degree + 1 - i)
                        for k in range(degree + 1 - i - j)])
        c[idx[:, 0], idx[:, 1], idx[:, 2]] = coefficients
        return np.polynomial.legendre.leggrid3d(coords[0], coords[1], coords[2], c)
    raise ValueError(f"a bias field is 2-D or 3-D, got spatial shape {tuple(spatial_shape)}")


def _n_bias_coeffs(degree: int, ndim: int) -> int:
    return int(round(np.prod([(degree + k) / k for k in range(1, ndim + 1)])))


class BiasField(Corruption):
    """Smooth multiplicative bias field ``x * exp(field)``, field = Legendre polynomial of ``degree``.

    The field is :func:`legendre_field` (in 3-D the field of MONAI's ``RandBiasField``; in 2-D of
    the same total degree along both axes) with the given coefficients; every channel gets the same
    field. :func:`~medvae.corruption.corrupt_volume` draws one field for a whole volume.

    Parameters
    ----------
    coefficients : list of float
        ``(degree+1)(degree+2)/2`` coefficients in 2-D, ``(degree+1)(degree+2)(degree+3)/6`` in 3-D.
    degree : int, keyword-only
        Polynomial degree (default 3).

    Examples
    --------
    >>> out, mask = BiasField([0.0, 0.2, 0, 0, 0, 0, 0, 0, 0, 0], degree=3)(np.ones((1, 8, 8)))
    """

    volume_mode = "volume"

    def __init__(self, coefficients: Sequence[float], *, degree: int = 3, extent: Sequence[float] | None = None,
                 order: str = "total") -> None:
        self.degree = parse_int(degree, "degree", low=1)
        if not isinstance(coefficients, (list, tuple)):
            raise ValueError(f"coefficients must be a list of numbers, got {coefficients!r}")
        self.coefficients = [float(parse_value(c, "coefficients")) for c in coefficients]
        self.extent = None if extent is None else [float(parse_value(e, "extent", low=0, high=1, low_open=True))
                                                   for e in extent]
        if order not in ("total", "monai"):
            raise ValueError(f"order must be 'total' or 'monai', got {order!r}")
        self.order = order

    @classmethod
    def from_params(cls, **params: Any) -> "BiasField":
        """A record from before the 2-D order changed (no ``order``) replays with the order it was drawn in."""
        return cls(**{"order": "monai", **params})

    def params(self):
        return {"coefficients": self.coefficients, "degree": self.degree, "extent": self.extent, "order": self.order}

    def _apply(self, x):
        spatial = x.shape[1:]
        need = _n_bias_coeffs(self.degree, len(spatial))
        if len(self.coefficients) != need:
            raise ValueError(f"coefficients: degree {self.degree} in {len(spatial)}-D needs {need} values, "
                             f"got {len(self.coefficients)}")
        if self.extent is not None and len(self.extent) != len(spatial):
            raise ValueError(f"extent: {len(spatial)} values for a {len(spatial)}-D image, got {len(self.extent)}")
        field = legendre_field(spatial, degree=self.degree, coefficients=self.coefficients, extent=self.extent,
                               order=self.order)
        out = x * np.exp(field).astype(x.dtype)[None]
        return out, _full_mask(x, True)


@register("bias_field")
class RandBiasField(RandCorruption):
    """Random smooth bias field; coefficients drawn uniformly from ``coeff_range``.

    Parameters
    ----------
    degree : int, keyword-only
        Polynomial degree (default 3).
    coeff_range : (float, float), keyword-only
        Range of every coefficient (default (-0.25, 0.25); MONAI's default (0, 0.1) is barely
        visible).
    prob : float, keyword-only

    Examples
    --------
    >>> out, mask = RandBiasField().set_random_state(0)(np.ones((1, 16, 16), np.float32))
    """

    deterministic = BiasField

    def __init__(self, *, degree: int = 3, coeff_range: Sequence[float] = (-0.25, 0.25), prob: float = 1.0) -> None:
        super().__init__(prob=prob)
        self.degree = parse_int(degree, "degree", low=1)
        self.coeff_range = parse_range(coeff_range, "coeff_range")

    def _sample(self, spatial_shape, img):
        n = _n_bias_coeffs(self.degree, len(spatial_shape))
        extent = None
        if self._spacing_mm is not None:  # each axis's share of the longest physical side: smooth in mm
            lengths = [dim * s for dim, s in zip(spatial_shape, self._spacing_mm)]
            extent = [round(length / max(lengths), 6) for length in lengths]
        return {"coefficients": [float(v) for v in self.R.uniform(*self.coeff_range, n)], "degree": self.degree,
                "extent": extent, "order": "total"}


# --------------------------------------------------------------------------------------------
# Motion ghosting
# --------------------------------------------------------------------------------------------
class MotionGhosting(Corruption):
    """Motion ghosting: some phase-encode lines of k-space come from a shifted copy of the image.

    The k-space of the image (``fftn`` over the spatial axes, centred with ``fftshift``) has the
    lines ``lines`` along ``axis`` replaced by those of the image translated by ``shift`` pixels
    (a linear phase ramp, so sub-pixel shifts are exact); the real part of the inverse transform is
    returned (signed images stay signed). The mask is the whole image.

    Parameters
    ----------
    shift : list of float
        Translation in pixels, one value per spatial axis.
    lines : list of int
        Indices (centred k-space order) along ``axis`` of the lines taken from the moved copy.
    axis : int, keyword-only
        Phase-encode axis, a spatial axis index (0 = H, 1 = W, 2 = D).

    Examples
    --------
    >>> img = np.zeros((1, 32, 32), np.float32); img[0, 8:24, 8:24] = 1
    >>> out, mask = MotionGhosting([0.0, 4.0], list(range(0, 32, 3)), axis=0)(img)
    """

    def __init__(self, shift: Sequence[float], lines: Sequence[int], *, axis: int = 0) -> None:
        if not isinstance(shift, (list, tuple)) or not shift:
            raise ValueError(f"shift must be a list of numbers (pixels per spatial axis), got {shift!r}")
        self.shift = [float(parse_value(s, "shift")) for s in shift]
        if not isinstance(lines, (list, tuple)):
            raise ValueError(f"lines must be a list of k-space line indices, got {lines!r}")
        self.lines = sorted({parse_int(v, "lines", low=0) for v in lines})
        self.axis = parse_int(axis, "axis", low=0, high=2)

    def params(self):
        return {"shift": self.shift, "lines": self.lines, "axis": self.axis}

    def _apply(self, x):
        spatial = x.shape[1:]
        nd = len(spatial)
        if len(self.shift) != nd or self.axis >= nd:
            raise ValueError(f"shift/axis do not fit an image with {nd} spatial dims: shift={self.shift}, axis={self.axis}")
        if self.lines and self.lines[-1] >= spatial[self.axis]:
            raise ValueError(f"lines: index {self.lines[-1]} out of range for axis size {spatial[self.axis]}")
        axes = tuple(range(1, nd + 1))
        k = np.fft.fftshift(np.fft.fftn(x, axes=axes), axes=axes)
        if self.lines:
            idx = [slice(None)] * (nd + 1)
            idx[self.axis + 1] = self.lines
            idx = tuple(idx)
            ramp = np.zeros([len(self.lines) if d == self.axis else s for d, s in enumerate(spatial)])
            for d, (s, sh) in enumerate(zip(spatial, self.shift)):
                f = np.fft.fftshift(np.fft.fftfreq(s))
                if d == self.axis:
                    f = f[self.lines]
                shape = [1] * nd
                shape[d] = -1
                ramp = ramp + (f * sh).reshape(shape)
            k[idx] = k[idx] * np.exp(-2j * np.pi * ramp)[None]
        out = np.fft.ifftn(np.fft.ifftshift(k, axes=axes), axes=axes).real
        return out.astype(x.dtype), _full_mask(x, True)


@register("motion")
class RandMotionGhosting(RandCorruption):
    """Random motion ghosting.

    Parameters
    ----------
    shift : float or (float, float), keyword-only
        Range of the translation length in pixels (direction uniform), default 3-10.
    fraction : float or (float, float), keyword-only
        Range of the fraction of phase-encode lines taken from the moved copy, default 0.1-0.4.
    axes : list of int, keyword-only
        Candidate phase-encode axes (default ``[0, 1]``: the in-plane axes).
    prob : float, keyword-only

    Examples
    --------
    >>> out, mask = RandMotionGhosting().set_random_state(0)(np.ones((1, 32, 32), np.float32))
    """

    deterministic = MotionGhosting

    def __init__(self, *, shift: float | Sequence[float] = (3.0, 10.0), fraction: float | Sequence[float] = (0.1, 0.4),
                 axes: Sequence[int] = (0, 1), prob: float = 1.0) -> None:
        super().__init__(prob=prob)
        self.shift = parse_range(shift, "shift", low=0)
        self.fraction = parse_range(fraction, "fraction", low=0, high=1)
        if not isinstance(axes, (list, tuple)) or not axes:
            raise ValueError(f"axes must be a non-empty list of spatial axes, got {axes!r}")
        self.axes = [parse_int(a, "axes", low=0, high=2) for a in axes]

    def _sample(self, spatial_shape, img):
        nd = len(spatial_shape)
        axes = [a for a in self.axes if a < nd]
        if not axes:
            raise ValueError(f"axes {self.axes} do not exist in a {nd}-D image")
        axis = int(axes[self.R.randint(len(axes))])
        direction = self.R.normal(size=nd)
        direction /= max(np.linalg.norm(direction), 1e-12)
        length = self.R.uniform(*self.shift)
        n_lines = spatial_shape[axis]
        n = int(round(self.R.uniform(*self.fraction) * n_lines))
        lines = sorted(int(v) for v in self.R.choice(n_lines, size=n, replace=False))
        return {"shift": [float(v) for v in direction * length], "lines": lines, "axis": axis}
