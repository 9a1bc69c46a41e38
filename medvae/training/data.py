"""Training data: volumes read through :mod:`medvae.io` or from a slice store, patches corrupted on the fly.

Every sample is a pure function of ``(seed, epoch, index)``: the patch location, augmentation and the
corruption seed are drawn from ``numpy.random.default_rng([seed, epoch, index])``. That makes an
epoch identical whatever the number of workers, and makes ``--resume`` exact.

Two sources of volumes, one dataset:

* ``data.paths`` / ``data.val_paths`` (files, folders, globs) or ``data.manifest`` (a dataset manifest,
  split by subject): every volume is read and normalized into RAM before training (:class:`Volume`);
* ``data.store`` (a store written by ``medvae prepare``, see :mod:`medvae.store`): volumes stay on
  disk as memory maps (:class:`StoreVolume`), a sample reads only its patch, so RAM holds what the
  DataLoader workers touch and the page cache does the rest. Under ``torchrun`` the store's training
  volumes are partitioned between ranks (MONAI's ``partition_dataset``): each rank reads only its
  shard, and rank ``r`` draws the samples ``r * n + i`` of the epoch, so the draw is still a function
  of ``(seed, epoch, index)``.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from monai.data import Dataset

from medvae.errors import MedvaeError
from medvae.identifiers import keyed_digest
from medvae.intensity import IntensityPolicy, normalize
from medvae.store import (SliceStore, foreground_fraction, load_listed_scan, nested_scans, read_manifest,
                          refuse_repeated_scans, source_fingerprint, subject_split)

__all__ = ["Volume", "StoreVolume", "foreground_fraction", "load_volumes", "store_volumes", "PatchDataset",
           "PatchBatchSampler", "validation_slices", "TrainingData", "build_training_data"]

log = logging.getLogger(__name__)


@dataclass
class Volume:
    """One normalized training/validation volume in memory (no identifiers: ``name`` is ``vol<i>``)."""

    name: str
    modality: str
    array: np.ndarray          # normalized float32 (X, Y, Z)
    slices: list[int]          # usable slice indices along Z

    def slice(self, k: int) -> np.ndarray:
        """Slice ``k`` as an ``(X, Y)`` view."""
        return self.array[:, :, k]

    @property
    def in_plane(self) -> tuple[int, int]:
        return tuple(self.array.shape[:2])  # type: ignore[return-value]


@dataclass
class StoreVolume:
    """One normalized volume of a slice store, memory-mapped only while a slice of it is read.

    Nothing is cached: the map is opened per read (tens of microseconds) and closed when the slice
    view is dropped, so the process neither keeps file pages mapped (they stay in the page cache,
    outside the process's RSS) nor runs into the kernel's limit on mappings with many volumes.
    """

    name: str
    modality: str
    path: Path                 # volumes/<key>.npy, (Z, X, Y) float32
    slices: list[int]

    def slice(self, k: int) -> np.ndarray:
        """Slice ``k`` as an ``(X, Y)`` view of a memory map (only what is indexed is read)."""
        return np.load(self.path, mmap_mode="r")[k]

    @property
    def in_plane(self) -> tuple[int, int]:
        """The slices' in-plane shape, from the file's header."""
        return tuple(np.load(self.path, mmap_mode="r").shape[1:3])  # type: ignore[return-value]


def load_volumes(paths: Sequence[Path], *, intensity: IntensityPolicy, min_size: int,
                 min_foreground: float, offset: int = 0,
                 modalities: Sequence[str | None] | None = None,
                 series: Sequence[str | None] | None = None) -> list[Volume]:
    """Read and normalize scans; keep slices at least ``min_size`` in-plane with enough foreground.

    ``modalities`` (one per path, ``None`` to read it from the scan) overrides the scan's modality;
    ``series`` (one per path, ``None`` for a folder of one series) picks a series of a DICOM folder.
    """
    vols = []
    for i, p in enumerate(paths):
        scan = load_listed_scan(p, modality=modalities[i] if modalities else None, series=series[i] if series else None)
        window = intensity.window_for(scan.array, scan.modality)
        arr = normalize(scan.array, window)
        if min(arr.shape[:2]) < min_size:
            log.info("skipping vol%02d: in-plane size %s < %d", offset + i, arr.shape[:2], min_size)
            continue
        keep = [k for k in range(arr.shape[2])
                if foreground_fraction(arr[:, :, k], scan.modality, window=window) >= min_foreground]
        if keep:
            vols.append(Volume(f"vol{offset + i:02d}", scan.modality, arr, keep))
    return vols


def store_volumes(store: SliceStore, *, split: str, min_size: int, min_foreground: float) -> list[StoreVolume]:
    """The volumes of ``split`` in a store with their usable slices (from the index: nothing is read).

    Examples
    --------
    >>> vols = store_volumes(SliceStore("store/"), split="train", min_size=48, min_foreground=0.1)  # doctest: +SKIP
    """
    out = []
    for r in store.records:
        if r.split != split:
            continue
        keep = r.usable_slices(min_size=min_size, min_foreground=min_foreground)
        if keep:
            # the key is a plain hash of the scan's path: keyed again, as the review figure's label in MLflow
            out.append(StoreVolume(f"vol_{keyed_digest(r.key, digits=8)}", r.modality, store.volume_path(r.key), keep))
    return out


def _fit(patch: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop or pad a 2-D array to ``size`` × ``size`` (MONAI ``ResizeWithPadOrCrop``).

    Each axis is padded by reflection, or by repeating the edge where the axis is too short to
    reflect (a pad wider than the axis).
    """
    from monai.transforms import ResizeWithPadOrCrop
    from monai.utils import convert_to_numpy

    out = patch
    for ax in (0, 1):
        n = out.shape[ax]
        if n == size:
            continue
        mode = "reflect" if n > (size - n) // 2 + 1 else "edge"
        target = (size, -1) if ax == 0 else (-1, size)
        out = convert_to_numpy(ResizeWithPadOrCrop(target, mode=mode)(out[None]))[0]
    return out


class PatchDataset(Dataset):
    """Random 2-D patches from training volumes, corrupted on the fly by a recipe.

    A MONAI :class:`~monai.data.Dataset` whose items are the sample indices; ``set_epoch`` changes the
    draw, like ``DistributedSampler.set_epoch``. ``index_offset`` shifts the indices the draw is
    seeded with (rank ``r`` of a sharded store draws samples ``index_offset + i``).

    An item may also be ``(index, size, epoch)``, what :class:`PatchBatchSampler` yields: the epoch
    travels with the index because DataLoader workers keep their own copy of the dataset, which a
    ``set_epoch`` in the main process never reaches. A patch of ``size`` = ``large_patch_size`` is
    cut only from volumes whose slices are at least that large, so it shows more context of a large
    slice instead of a padded small one (docs/benchmarks.md, quality run 22: 192² patches helped
    the 512² CT slices and hurt the small volumes).
    """

    def __init__(self, volumes: Sequence[Volume | StoreVolume], *, recipe: Any, patch_size: int,
                 samples_per_epoch: int, seed: int, augment: bool = True, index_offset: int = 0,
                 window_jitter: float = 0.0, downsample: float = 0.0, large_patch_size: int = 0,
                 texture: float = 0.0, texture_sigma: Sequence[float] = (0.003, 0.03),
                 texture_smooth: float = 0.5, texture_modalities: Sequence[str] = ()) -> None:
        if not volumes:
            raise MedvaeError("no usable training slices (check data.paths or the manifest's training subjects, "
                              "data.min_size and data.min_foreground)")
        if not 0.0 <= window_jitter < 0.5:
            raise MedvaeError(f"data.window_jitter must be in [0, 0.5), got {window_jitter}")
        if not 0.0 <= downsample <= 1.0:
            raise MedvaeError(f"data.downsample must be in [0, 1], got {downsample}")
        if not 0.0 <= texture <= 1.0:
            raise MedvaeError(f"data.texture must be in [0, 1], got {texture}")
        if not 0.0 <= texture_smooth <= 1.0:
            raise MedvaeError(f"data.texture_smooth must be in [0, 1], got {texture_smooth}")
        lo, hi = (float(v) for v in texture_sigma) if len(texture_sigma) == 2 else (0.0, 0.0)
        if not 0.0 < lo <= hi:
            raise MedvaeError(f"data.texture_sigma must be [low, high] with 0 < low <= high, got {list(texture_sigma)}")
        super().__init__(data=list(range(samples_per_epoch)))
        self.volumes, self.recipe, self.patch = list(volumes), recipe, patch_size
        self.seed, self.augment, self.epoch, self.index_offset = seed, augment, 0, int(index_offset)
        self.window_jitter = float(window_jitter)
        self.downsample = float(downsample)
        self.texture, self.texture_sigma, self.texture_smooth = float(texture), (lo, hi), float(texture_smooth)
        self.texture_modalities = {m.upper() for m in texture_modalities}   # empty: every modality
        # volumes are drawn with weight sqrt(slices) so single-slice scans are not drowned out
        self.vol_p = _draw_weights(self.volumes)
        self.large_patch = int(large_patch_size)
        self.large_volumes: list[Volume | StoreVolume] = []
        if self.large_patch:
            if self.large_patch <= patch_size:
                raise MedvaeError(f"data.large_patch_size must be 0 (off) or larger than data.patch_size "
                                  f"({patch_size}), got {self.large_patch}")
            self.large_volumes = [v for v in self.volumes if min(v.in_plane) >= self.large_patch]
            if not self.large_volumes:
                raise MedvaeError(f"no training slice is {self.large_patch} px or larger in-plane "
                                  "(data.large_patch_size)")
            self.large_p = _draw_weights(self.large_volumes)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _coarser(self, sl: np.ndarray, index: int, epoch: int) -> np.ndarray:
        """With probability ``downsample``, the slice shrunk by a factor in [1.25, 2] by area averaging,
        as a coarser acquisition of the same anatomy would give: more structure per pixel and less of
        the scan's own noise. Drawn from a stream of its own, so the rest of the draw stays as it was."""
        rng = np.random.default_rng([self.seed, epoch, self.index_offset + int(index), 1])
        if rng.random() >= self.downsample:
            return sl
        f = rng.uniform(1.25, 2.0)
        size = (max(1, round(sl.shape[0] / f)), max(1, round(sl.shape[1] / f)))
        t = torch.from_numpy(np.ascontiguousarray(sl, dtype=np.float32))[None, None]
        return torch.nn.functional.interpolate(t, size=size, mode="area")[0, 0].numpy()

    def _textured(self, patch: np.ndarray, modality: str, index: int, epoch: int) -> np.ndarray:
        """With probability ``texture``, the patch with a scan's own noise added: what the *target* of
        a real reference looks like. Real references keep noise of their own (0.3-3 % of the window on
        the validation volumes; a resampled volume's is spatially correlated), and a network trained on
        near-clean targets removes it with the added noise (docs/benchmarks.md, quality run 24).

        Its std is log-uniform in ``texture_sigma`` (window units); a ``texture_smooth`` share of the
        fields is smoothed by a Gaussian of 0.5-1.2 px and rescaled to that std, as resampling leaves
        it, the rest is white (so not :class:`~medvae.corruption.noise.RicianNoise`, which is white).
        Magnitude MR gets it as Rician texture, ``sqrt((x + s n1)^2 + (s n2)^2)``, so its background
        stays positive; CT gets it added. Only the ``texture_modalities`` get it, when any
        are named. Own stream, so the rest of the draw is unchanged.
        """
        if self.texture_modalities and modality.upper() not in self.texture_modalities:
            return patch
        rng = np.random.default_rng([self.seed, epoch, self.index_offset + int(index), 2])
        if rng.random() >= self.texture:
            return patch
        from scipy.ndimage import gaussian_filter

        lo, hi = self.texture_sigma
        sigma = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        smooth = float(rng.uniform(0.5, 1.2)) if rng.random() < self.texture_smooth else 0.0
        fields = rng.standard_normal((2, *patch.shape))
        if smooth:
            fields = np.stack([gaussian_filter(f, smooth, mode="wrap") for f in fields])
            fields /= fields.std(axis=(1, 2), keepdims=True)
        n1, n2 = sigma * fields
        if modality.upper() == "CT":
            return patch + n1
        return np.sqrt((patch + n1) ** 2 + n2 ** 2)

    def __getitem__(self, item: int | tuple[int, int, int]) -> dict[str, torch.Tensor]:  # type: ignore[override]
        index, P, epoch = item if isinstance(item, tuple) else (item, self.patch, self.epoch)
        if P != self.patch and (not self.large_patch or P != self.large_patch):
            raise ValueError(f"patch size {P}: this dataset cuts {self.patch} or {self.large_patch or self.patch}")
        rng = np.random.default_rng([self.seed, epoch, self.index_offset + int(index)])
        vols, vol_p = (self.volumes, self.vol_p) if P == self.patch else (self.large_volumes, self.large_p)
        vol = vols[rng.choice(len(vols), p=vol_p)]
        sl = vol.slice(vol.slices[rng.integers(len(vol.slices))])
        if self.augment and self.downsample > 0:
            sl = self._coarser(sl, index, epoch)
        # random crop, then pad what is too small
        x0 = rng.integers(0, max(1, sl.shape[0] - P + 1))
        y0 = rng.integers(0, max(1, sl.shape[1] - P + 1))
        patch = _fit(sl[x0:x0 + P, y0:y0 + P], P)
        if self.augment:
            patch = np.rot90(patch, k=int(rng.integers(4)))
            if rng.random() < 0.5:
                patch = patch[::-1]
            patch = patch * rng.uniform(0.9, 1.1)  # scanner gain differences
            if self.texture > 0:
                patch = self._textured(patch, vol.modality, index, epoch)
        clean = np.array(patch, dtype=np.float32)[None]  # a copy: never a view of a memory map
        res = self.recipe(clean, seed=int(rng.integers(2**31 - 1)), modality=vol.modality)
        image = np.asarray(res.image, dtype=np.float32)
        if self.augment and self.window_jitter > 0 and vol.modality.upper() != "CT" and rng.random() < 0.5:
            # `medvae restore` windows an MR scan by the percentiles of the *noisy* volume, so the clean
            # anatomy lands a few % off where training put it; the same window moved on input and target
            # teaches the model to restore in whatever window it gets (CT's HU window is fixed: not moved).
            # Off by default: with the level 0 of the window gone, Gaussian noise on a background above 0
            # looks like Rician noise at 0 and gets its lift removed (docs/benchmarks.md, quality run 9)
            j = self.window_jitter
            window = (float(rng.uniform(-j, j)), 1.0 + float(rng.uniform(-j, j)))
            image, clean = normalize(image, window), normalize(clean, window)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)),
            "mask": torch.from_numpy(np.ascontiguousarray(res.mask, dtype=np.float32)),
            "target": torch.from_numpy(clean),
        }


def _draw_weights(volumes: Sequence[Volume | StoreVolume]) -> np.ndarray:
    w = np.sqrt([len(v.slices) for v in volumes])
    return w / w.sum()


def deal_volumes(volumes: Sequence[Any], world: int) -> list[list[Any]]:
    """The volumes of each of ``world`` ranks, dealt so that the ranks' draw weights (sqrt(slices), as
    :class:`PatchDataset` draws them) come out close to even: each rank draws as many patches, so a
    volume's share of the training then stays near its share in one process (dealt in equal counts, a
    34-slice volume fell from 65 % to 43 % of the patches on 2 ranks). Heaviest first, each to the
    lightest rank so far (a greedy deal: near even for many volumes, not the best split of a few); every
    rank gets one when there are ``world`` or more. Each rank keeps the volumes' order.

    >>> class V:
    ...     def __init__(self, n): self.slices = range(n)
    >>> [[len(v.slices) for v in part] for part in deal_volumes([V(34), V(1), V(1), V(1)], 2)]
    [[34], [1, 1, 1]]
    """
    order = sorted(range(len(volumes)), key=lambda i: -len(volumes[i].slices))  # stable: ties keep their order
    totals, parts = [0.0] * world, [[] for _ in range(world)]
    for i in order:
        r = min(range(world), key=lambda k: (totals[k], k))
        totals[r] += float(np.sqrt(len(volumes[i].slices)))
        parts[r].append(i)
    return [[volumes[i] for i in sorted(p)] for p in parts]


class PatchBatchSampler(torch.utils.data.Sampler):
    """Batches of a sampler's indices as :class:`PatchDataset` keys ``(index, size, epoch)``.

    ``size`` is ``large_patch_size`` for a ``large_share`` of the batches and ``patch_size`` for the
    rest (one size per batch, so it stacks). Which batches are large is drawn from ``(seed, epoch)``
    alone: every rank of a DDP run (each with the same number of batches) cuts the same size at the
    same step, and ``--resume`` and the number of workers change nothing. The epoch is in the key
    because persistent DataLoader workers never see the main process's ``PatchDataset.set_epoch``.
    Incomplete last batches are dropped.

    Examples
    --------
    >>> s = PatchBatchSampler(range(8), batch_size=4, patch_size=128)
    >>> s.set_epoch(3)
    >>> [b[0] for b in s]
    [(0, 128, 3), (4, 128, 3)]
    """

    def __init__(self, sampler: Any, *, batch_size: int, patch_size: int, large_patch_size: int = 0,
                 large_share: float = 0.0, seed: int = 0) -> None:
        self.sampler, self.batch_size, self.seed, self.epoch = sampler, int(batch_size), int(seed), 0
        self.sizes = (int(patch_size), int(large_patch_size) or int(patch_size))
        self.large_share = float(large_share) if large_patch_size else 0.0

    def set_epoch(self, epoch: int) -> None:
        """Change the draw of sizes, and the inner sampler's order when it has ``set_epoch``."""
        self.epoch = int(epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch, 2])   # a stream of its own
        batch: list[int] = []
        for i in self.sampler:
            batch.append(int(i))
            if len(batch) == self.batch_size:
                size = self.sizes[1] if rng.random() < self.large_share else self.sizes[0]
                yield [(j, size, self.epoch) for j in batch]
                batch = []


def validation_slices(volumes: Sequence[Volume | StoreVolume], *, recipe: Any, n: int, max_size: int
                      ) -> list[dict[str, Any]]:
    """Fixed validation slices, spread evenly over the validation volumes, each corrupted once
    with a fixed seed, so every epoch (and every run) is scored on the same inputs."""
    pool = [(v, k) for v in volumes for k in v.slices]
    if not pool:
        return []
    pick = np.linspace(0, len(pool) - 1, num=min(n, len(pool))).round().astype(int)
    out = []
    for j, idx in enumerate(pick):
        v, k = pool[idx]
        sl = v.slice(k)
        size = min(max_size, *sl.shape)
        clean = _fit(sl, size)[None].astype(np.float32)  # center crop to a square
        res = recipe(clean, seed=10_000 + j, modality=v.modality)
        out.append({"name": f"{v.name}_s{k:03d}", "modality": v.modality, "target": clean,
                    "image": np.asarray(res.image, dtype=np.float32),
                    "mask": np.asarray(res.mask, dtype=np.float32)})
    return out


# -- what the training loop needs ---------------------------------------------------------------------

@dataclass
class TrainingData:
    """This rank's training dataset and batches, its training volumes, and the validation slices."""

    dataset: PatchDataset
    batches: PatchBatchSampler
    volumes: list[Volume | StoreVolume]
    val: list[dict[str, Any]]
    store: SliceStore | None = None   # read under its readers lock until the training releases it
    sources: str = ""                 # digest of the scans behind the data, the same on every rank
    n_volumes: int = 0                # training volumes and slices of all ranks (``volumes``: this rank's)
    n_slices: int = 0
    ranks: str = ""                   # digest of how the data is split between ranks (their number, the deal)


@functools.lru_cache(maxsize=8)
def training_hole_radius(recipe: str, *, patch_size: int, draws: int = 4096, seed: int = 0,
                         quantile: float = 100.0) -> float | None:
    """The inscribed radius (px) of the largest hole ``recipe`` makes in ``draws`` training patches
    (``quantile`` < 100: the radius that share of them stay within); None when it makes no holes.

    ``restore_volume`` restores holes larger than this at a coarser scale (:mod:`medvae.hole_scale`),
    so a checkpoint stores it in ``meta["hole_radius"]``. The draws are seeded: the same recipe and
    patch size always give the same radius. The largest, not a lower quantile: on the validation
    volumes the network fills holes up to the largest it learned as well as the coarse pass does, and
    the 99th percentile of the default recipe (19 px against 22) lost 0.33 dB on one CT volume
    (docs/benchmarks.md, large-holes run 2).

    >>> training_hole_radius("boxes", patch_size=128, draws=256) > 15     # boxes up to 0.3 x 128 px
    True
    """
    from medvae.corruption.recipes import load_recipe
    from medvae.hole_scale import inscribed_radius

    r = load_recipe(recipe)
    if r.requires_3d:  # missing slices: no 2-D hole to measure
        return None
    blank = np.ones((1, patch_size, patch_size), np.float32)
    radii = [inscribed_radius(np.asarray(r(blank, seed=seed + i, modality="MR").mask[0])) for i in range(draws)]
    radii = [v for v in radii if v > 0]  # noise draws mask everything: no hole
    return round(float(np.percentile(radii, quantile)), 2) if radii else None


def build_training_data(cfg: Any, *, intensity: IntensityPolicy, rank: int = 0, world: int = 1,
                        with_val: bool = True) -> TrainingData:
    """Build the datasets a :class:`~medvae.training.config.TrainConfig` describes, for one rank.

    Volumes are split by volume (or by subject, for a manifest or a store), never by slice.
    ``with_val``: build the validation slices (rank 0 alone validates).
    """
    from medvae.corruption.recipes import load_recipe

    d = cfg.data
    idle = [k for k in ("window_jitter", "downsample", "texture") if getattr(d, k) > 0]
    if not d.augment and idle and rank == 0:  # they are augmentations: the samples were as without them
        log.warning("data.augment is false, so %s (augmentations) do nothing",
                    " and ".join(f"data.{k} {getattr(d, k):g}" for k in idle))
    recipe = load_recipe(cfg.corruption.recipe)
    per_rank = d.samples_per_epoch // world
    store_dir = getattr(d, "store", None)
    if store_dir:
        store = SliceStore(store_dir)
        if store.intensity != intensity:
            raise MedvaeError(f"the store was normalized with {store.intensity.to_dict()}, but the config's "
                              f"intensity is {intensity.to_dict()}", store.root)
        vols_all = store_volumes(store, split="train", min_size=d.min_size, min_foreground=d.min_foreground)
        if not vols_all:  # say which store, and what it holds
            n_train = sum(r.split == "train" for r in store.records)
            raise MedvaeError(f"config key 'data.store': no usable training slices: the store holds "
                              f"{len(store.records)} volume(s), {n_train} of them for training (check the "
                              "prepare report, data.min_size and data.min_foreground)", store.root)
        if world > 1:
            if len(vols_all) < world:
                raise MedvaeError(f"the store has {len(vols_all)} usable training volume(s) for {world} ranks; "
                                  "each rank needs at least one", store.root)
            dealt = deal_volumes(vols_all, world)
            vols = dealt[rank]
        else:
            vols = dealt = vols_all
        counts = (len(vols_all), sum(len(v.slices) for v in vols_all))
        # which volumes each rank trains on (their order within a rank follows the manifest, as in memory)
        split = repr((world, [sorted(v.path.stem for v in part) for part in dealt] if world > 1 else None))
        ds = PatchDataset(vols, recipe=recipe, patch_size=d.patch_size, samples_per_epoch=per_rank,
                          seed=cfg.seed, augment=d.augment, index_offset=rank * per_rank,
                          window_jitter=d.window_jitter, downsample=d.downsample,
                          large_patch_size=d.large_patch_size,
                          texture=d.texture, texture_sigma=d.texture_sigma,
                          texture_smooth=d.texture_smooth, texture_modalities=d.texture_modalities)
        # the rank's own samples; shuffled like the in-memory path so one rank draws the same batches
        sampler = torch.utils.data.DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True,
                                                      seed=cfg.seed, drop_last=True)
        val_vols = (store_volumes(store, split="val", min_size=d.min_size, min_foreground=d.min_foreground)
                    if with_val else [])
    else:
        train_paths, val_paths, train_opts, val_opts = _split_paths(cfg)
        _refuse_output_inside_inputs(Path(cfg.output_dir), [*train_paths, *val_paths])
        vols = load_volumes(train_paths, intensity=intensity, min_size=d.min_size,
                            min_foreground=d.min_foreground, **train_opts)
        if not vols:  # the scans were read, and none keeps a slice: name the config (PatchDataset cannot)
            from medvae.training.config import config_source

            raise MedvaeError(f"no usable training slices in the {len(train_paths)} training scan(s) (check "
                              f"data.paths or the manifest's training subjects, data.min_size {d.min_size} and "
                              f"data.min_foreground {d.min_foreground})", config_source(cfg))
        counts = (len(vols), sum(len(v.slices) for v in vols))  # every rank holds them all
        split = repr((world, None))  # DistributedSampler splits the samples by rank
        ds = PatchDataset(vols, recipe=recipe, patch_size=d.patch_size, samples_per_epoch=d.samples_per_epoch,
                          seed=cfg.seed, augment=d.augment, window_jitter=d.window_jitter,
                          downsample=d.downsample, large_patch_size=d.large_patch_size,
                          texture=d.texture, texture_sigma=d.texture_sigma,
                          texture_smooth=d.texture_smooth, texture_modalities=d.texture_modalities)
        sampler = torch.utils.data.DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True,
                                                      seed=cfg.seed, drop_last=True)
        val_vols = (load_volumes(val_paths, intensity=intensity, min_size=d.min_size,
                                 min_foreground=d.min_foreground, offset=len(train_paths), **val_opts)
                    if with_val and val_paths else [])
    val = validation_slices(val_vols, recipe=load_recipe(cfg.corruption.val_recipe),
                            n=d.val_slices, max_size=d.val_max_size) if val_vols else []
    batches = PatchBatchSampler(sampler, batch_size=max(1, cfg.optim.batch_size // world),
                                patch_size=d.patch_size, large_patch_size=d.large_patch_size,
                                large_share=d.large_patch_share, seed=cfg.seed)
    if store_dir:  # a prepare waits before it changes a volume this training reads (loop.train releases it)
        store.hold_for_reading()
        listed = [(r.key, r.split, r.fingerprint, r.source_content) for r in store.records]
    else:  # each scan's path, role and files (names, sizes, modification times), on every rank
        listed = [(role, os.path.realpath(p), source_fingerprint(p))
                  for role, paths in (("train", train_paths), ("val", val_paths)) for p in paths]
    sources = hashlib.sha256(repr(sorted(listed)).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return TrainingData(dataset=ds, batches=batches, volumes=list(vols), val=val, store=store if store_dir else None,
                        sources=sources, n_volumes=counts[0], n_slices=counts[1],
                        ranks=hashlib.sha256(split.encode()).hexdigest()[:16])


def _refuse_output_inside_inputs(out: Path, paths: Sequence[Path]) -> None:
    """Checkpoints written into a scan's DICOM folder made it a folder of several things (``prepare``
    refuses its store there too)."""
    o = out.resolve()
    for p in paths:
        r = Path(p).resolve()
        if r.is_dir() and (o == r or r in o.parents):
            raise MedvaeError(f"config key 'output_dir' lies inside the training input {p}; choose a folder "
                              "outside the scans", out)


def _split_paths(cfg: Any) -> tuple[list[Path], list[Path], dict[str, list], dict[str, list]]:
    """Training and validation paths, and per path the manifest's read options (``modalities``,
    ``series``: the keywords of :func:`load_volumes`), from globs or a manifest."""
    from medvae.training.config import config_source, expand_paths

    d = cfg.data
    manifest = getattr(d, "manifest", None)
    if manifest:
        entries = [e for e in read_manifest(manifest) if e.split != "test"]
        refuse_repeated_scans(entries, Path(manifest))  # else one scan could train and validate
        split = {e.subject: e.split for e in entries if e.split}
        for e in entries:
            split.setdefault(e.subject, subject_split(e.subject, val_fraction=d.val_fraction, seed=cfg.seed))
        tr = [e for e in entries if split[e.subject] == "train"]
        va = [e for e in entries if split[e.subject] == "val"]
        if entries and not tr:  # "no usable training slices" named no file
            raise MedvaeError(f"config key 'data.manifest': no training subject: all {len(split)} subject(s) fall in "
                              f"the validation split (their split column, or data.val_fraction {d.val_fraction} "
                              f"with seed {cfg.seed}); lower data.val_fraction or give the split column", manifest)
        def options(es):
            return {"modalities": [e.modality for e in es], "series": [e.series_uid for e in es]}

        return [e.path for e in tr], [e.path for e in va], options(tr), options(va)
    if not d.paths:
        raise MedvaeError("config key 'data.paths' is empty: give the training scans (files, folders or globs), "
                          "a data.manifest or a data.store")
    train_paths = expand_paths(d.paths, "data.paths", exclude=d.exclude)
    if d.val_paths:
        val_paths = expand_paths(d.val_paths, "data.val_paths", exclude=d.exclude)
        val_set = {p.resolve() for p in val_paths}
        # a folder is one volume: a slice of it cannot be taken out of training
        nested = next(nested_scans([(t, t, None) for t in train_paths], [(v, v, None) for v in val_paths]), None)
        if nested is not None:
            raise MedvaeError(f"config key 'data.val_paths': {nested[1]} lies inside the training folder "
                              f"{nested[0]}, whose volume holds it; validate on a scan outside the training "
                              "folders (volumes are split whole, never by slice)", config_source(cfg))
        # a training file inside a validation folder is part of that validation volume: kept out
        held = {t for _, t in nested_scans([(v, v, None) for v in val_paths], [(t, t, None) for t in train_paths])}
        train_paths = [p for p in train_paths if p.resolve() not in val_set and p not in held]
    else:
        order = np.random.default_rng(cfg.seed).permutation(len(train_paths))
        n_val = int(round(d.val_fraction * len(train_paths))) if len(train_paths) > 1 else 0
        val_paths = [train_paths[i] for i in order[:n_val]]
        train_paths = [train_paths[i] for i in sorted(order[n_val:])]
    return train_paths, val_paths, {}, {}
