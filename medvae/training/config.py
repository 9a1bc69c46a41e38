"""Training configuration: YAML files in ``configs/`` plus ``key=value`` overrides.

The schema is a tree of dataclasses. Every key is checked: an unknown key, a value of the wrong type,
or a data path that matches nothing gives a one-line :class:`~medvae.errors.MedvaeError` that names
the key (and the file).
"""
from __future__ import annotations

import dataclasses
import glob
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from medvae.errors import MedvaeError
from medvae.losses import LossConfig


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=list)       # files, folders or globs of scans
    val_paths: list[str] = field(default_factory=list)   # explicit validation volumes (else val_fraction)
    exclude: list[str] = field(default_factory=list)     # globs of files/folders to leave out
    val_fraction: float = 0.2                            # used only when val_paths is empty
    patch_size: int = 128                                # training patch edge (2-D) / cube edge (3-D)
    min_size: int = 48                                   # slices smaller than this in-plane are skipped
    min_foreground: float = 0.1                          # skip slices with less foreground than this
    samples_per_epoch: int = 2048
    val_slices: int = 24                                 # fixed validation slices
    val_max_size: int = 256                              # validation slices are center-cropped to this
    num_workers: int = 0
    augment: bool = True                                 # flips, 90° rotations, intensity jitter


@dataclass
class CorruptionConfig:
    recipe: str = "mixed"
    val_recipe: str = "mixed"


@dataclass
class ModelConfig:
    spatial_dims: int = 2
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 96])
    latent_channels: int = 8
    num_res_units: int = 1
    act: str = "PRELU"
    prefill: str = "none"        # "harmonic": smooth fill of holes before the network


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 16
    epochs: int = 10
    grad_clip: float = 1.0
    scheduler: str = "cosine"   # "cosine" or "none"


@dataclass
class IntensityConfig:
    ct_window: list[float] = field(default_factory=lambda: [-1000.0, 1000.0])
    mr_percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None
    experiment: str = "medvae-train"
    run_name: str | None = None
    log_every: int = 10          # steps between loss logs
    review_slices: int = 4       # validation slices shown in the per-epoch review image
    log_model: bool = True


@dataclass
class TrainConfig:
    seed: int = 0
    device: str = "auto"         # "auto", "cpu", "cuda", "cuda:1"
    amp: str = "auto"            # "auto" (fp16 on CUDA, off on CPU), "off", "bf16", "fp16"
    threads: int = 0             # torch CPU threads (0: torch's default)
    output_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    corruption: CorruptionConfig = field(default_factory=CorruptionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: dict[str, Any] = field(default_factory=dict)   # validated by LossConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    intensity: IntensityConfig = field(default_factory=IntensityConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def loss_config(self) -> LossConfig:
        return LossConfig(**self.loss)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["loss"] = dataclasses.asdict(self.loss_config)
        return d


# -- parsing --------------------------------------------------------------------------------------

def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check ``value`` against annotation ``tp``; returns (ok, converted value)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _type_ok(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if tp is Any:
        return True, value
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        if isinstance(value, (str, int, float)) and inner is str:
            value = [value]  # a single path is fine
        if not isinstance(value, (list, tuple)):
            return False, value
        out = []
        for v in value:
            ok, cv = _type_ok(v, inner)
            if not ok:
                return False, value
            out.append(cv)
        return True, out
    if origin is dict:
        return isinstance(value, dict), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if tp is str:
        return isinstance(value, str), value
    return isinstance(value, tp), value


def _build(cls: type, data: dict[str, Any], prefix: str, source: str) -> Any:
    if not isinstance(data, dict):
        raise MedvaeError(f"config key '{prefix.rstrip('.') or '<root>'}' must be a mapping", source)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise MedvaeError(f"unknown config key '{prefix}{key}' (known: {', '.join(sorted(names))})", source)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, f"{prefix}{key}.", source)
            continue
        ok, converted = _type_ok(value, tp)
        if not ok:
            tname = getattr(tp, "__name__", str(tp)).replace("typing.", "")
            raise MedvaeError(f"config key '{prefix}{key}' must be {tname}, got {value!r}", source)
        kwargs[key] = converted
    return cls(**kwargs)


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise MedvaeError(f"config key '{dotted}': '{k}' is not a section")
    d[keys[-1]] = value


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config and apply ``key=value`` overrides (values parsed as YAML).

    Examples
    --------
    >>> cfg = load_config(None, ["optim.epochs=2", "model.channels=[8,16]"])
    >>> cfg.optim.epochs, cfg.model.channels
    (2, [8, 16])
    """
    source = str(path) if path else "<defaults>"
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise MedvaeError("config file not found", p)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise MedvaeError(f"invalid YAML: {str(exc).splitlines()[0]}", p) from None
        if not isinstance(data, dict):
            raise MedvaeError("a config file must be a YAML mapping", p)
    for item in overrides:
        if "=" not in item:
            raise MedvaeError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        _set_dotted(data, key.strip(), value)
    cfg = _build(TrainConfig, data, "", source)
    try:
        cfg.loss_config
    except (TypeError, ValueError) as exc:
        msg = str(exc)
        if "unexpected keyword argument" in msg:
            key = msg.split("'")[-2]
            msg = f"unknown config key 'loss.{key}'"
        raise MedvaeError(msg, source) from None
    if path is not None:
        cfg = _resolve_relative(cfg, Path(path).resolve().parent)
    return cfg


def _resolve_relative(cfg: TrainConfig, base: Path) -> TrainConfig:
    """Relative data paths in a config file are relative to the working directory first, then
    to the config's own folder (so ``configs/x.yaml`` can say ``../shared/...``)."""
    def fix(p: str) -> str:
        if Path(p).is_absolute() or glob.glob(p):
            return p
        alt = str(base / p)
        return alt if glob.glob(alt) else p

    cfg.data.paths = [fix(p) for p in cfg.data.paths]
    cfg.data.val_paths = [fix(p) for p in cfg.data.val_paths]
    return cfg


def expand_paths(patterns: Sequence[str], key: str, *, exclude: Sequence[str] = ()) -> list[Path]:
    """Expand files/folders/globs to scan paths; a pattern matching nothing is an error naming ``key``."""
    excluded = {Path(x).resolve() for pat in exclude for x in glob.glob(pat)}
    out: list[Path] = []
    for pat in patterns:
        matches = sorted(glob.glob(pat)) if any(ch in pat for ch in "*?[") else ([pat] if Path(pat).exists() else [])
        if not matches:
            raise MedvaeError(f"config key '{key}': no scan matches {pat!r}")
        for m in matches:
            p = Path(m)
            if p.resolve() not in excluded and p not in out:
                out.append(p)
    return out
