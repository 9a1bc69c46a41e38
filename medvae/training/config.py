"""Training configuration: YAML files plus ``key=value`` overrides, checked by pydantic.

The schema is a tree of dataclasses validated by :mod:`pydantic` (strict types, no unknown keys).
An unknown key, a value of the wrong type, or a data path that matches nothing gives a one-line
:class:`~medvae.errors.MedvaeError` that names the key (and the file). Configs shipped with medvae
(package data ``medvae/configs/<name>.yaml``) are found by name: ``load_config("default")``.
"""
from __future__ import annotations

import dataclasses
import glob
import re
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence, TypeVar

import yaml
from pydantic import (
    BeforeValidator, ConfigDict, Field, Strict, StrictBool, StrictInt, StrictStr, TypeAdapter, ValidationError, create_model,
)
from pydantic.dataclasses import dataclass

from medvae import resources
from medvae.errors import MedvaeError
from medvae.intensity import CT_WINDOW_LIMIT, DEFAULT_CT_WINDOW, DEFAULT_MR_PERCENTILES
from medvae.losses import LossConfig
from medvae.runtime import MAX_THREADS
from medvae.yamlsafe import check_expansion, describe_error, strict_loader

_SCHEMA = ConfigDict(extra="forbid")   # an unknown key is an error
Float = Annotated[float, Strict()]     # strict: an int is fine, a string or a bool is not
Finite = Annotated[float, Strict(), Field(allow_inf_nan=False)]
Count = Annotated[int, Strict(), Field(ge=1)]      # at least one
Size = Annotated[int, Strict(), Field(ge=0)]       # zero or more
#: a layer's width: far above any model medvae trains (the shipped one's widest is 96), far below one that
#: takes the machine's memory at the first step (latent_channels 1,000,000 reached 23 GB before it was killed)
Width = Annotated[int, Strict(), Field(ge=1, le=2048)]
Share = Annotated[float, Strict(), Field(ge=0, le=1)]


def _one_path_is_a_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


Paths = Annotated[list[StrictStr], BeforeValidator(_one_path_is_a_list)]
_S = TypeVar("_S")


def _section(cls: type[_S]) -> Any:
    """A nested section; an empty YAML section (``optim:``) means its defaults."""
    return Annotated[cls, BeforeValidator(lambda v: {} if v is None else v)]


@dataclass(config=_SCHEMA)
class DataConfig:
    paths: Paths = field(default_factory=list)       # files, folders or globs of scans
    val_paths: Paths = field(default_factory=list)   # explicit validation volumes (else val_fraction)
    exclude: Paths = field(default_factory=list)     # globs of files/folders to leave out
    val_fraction: Share = 0.2                        # used only when val_paths is empty
    # patch edges: at most 1024 px, twice a 512² CT slice (100000 once ran out of memory in a traceback)
    patch_size: Annotated[int, Strict(), Field(ge=16, le=1024)] = 128   # training patch edge (2-D)
    large_patch_size: Annotated[int, Strict(), Field(ge=0, le=1024)] = 0   # 0: off; else a share of the batches is cut this large,
                                                     # from the slices at least this large (data.py)
    large_patch_share: Annotated[Float, Field(ge=0, le=1)] = 0.5   # that share of the batches
    min_size: Count = 48                             # slices smaller than this in-plane are skipped
    min_foreground: Share = 0.1                      # skip slices with less foreground than this
    samples_per_epoch: Count = 2048
    val_slices: Size = 24                            # fixed validation slices
    val_max_size: Annotated[int, Strict(), Field(ge=16)] = 256   # validation slices are center-cropped to this
    num_workers: Size = 0
    augment: StrictBool = True                       # flips, 90° rotations, intensity jitter
    window_jitter: Share = 0.0                       # non-CT: window ends moved by up to this (data.py; off:
                                                     # 0.1 made Gaussian MR noise pass for Rician, benchmarks run 9)
    downsample: Share = 0.0                          # share of samples cut from a slice shrunk 1.25-2x (area
                                                     # averaging): coarser scans in training (data.py)
    texture: Annotated[Float, Field(ge=0, le=1)] = 0.0   # share of targets given a scan's own noise (data.py)
    texture_sigma: list[Float] = field(default_factory=lambda: [0.003, 0.03])   # its std, window units
    texture_smooth: Annotated[Float, Field(ge=0, le=1)] = 0.5   # share of those fields smoothed 0.5-1.2 px
    texture_modalities: list[StrictStr] = field(default_factory=list)   # only these get it ([]: all)
    manifest: StrictStr | None = None                # a dataset manifest (medvae.store), instead of paths
    store: StrictStr | None = None                   # a slice store written by medvae prepare


@dataclass(config=_SCHEMA)
class CorruptionConfig:
    # the default model's mix; "mixed" adds noise over holes 30 % of the time, which widens their mask to
    # the whole image and hides where the holes are (medvae/recipes/train.yaml)
    recipe: StrictStr = "train"
    val_recipe: StrictStr = "train"


@dataclass(config=_SCHEMA)
class ModelConfig:
    spatial_dims: StrictInt = 2      # medvae train cuts 2-D patches (checked in _validate)
    channels: Annotated[list[Width], Field(min_length=2)] = field(default_factory=lambda: [16, 32, 64, 96])
    latent_channels: Width = 8
    num_res_units: Annotated[int, Strict(), Field(ge=0, le=16)] = 1
    act: StrictStr = "PRELU"
    prefill: Literal["none", "harmonic"] = "none"   # "harmonic": smooth fill of holes before the network
    noise_map: StrictBool = False    # an input channel with the blind noise estimate
    scale_head: StrictBool = False   # the decoder predicts a per-pixel Laplace scale (loss.kind: laplace)
    context_dilations: list[StrictInt] = field(default_factory=list)   # dilated units at the coarsest level


@dataclass(config=_SCHEMA)
class OptimConfig:
    lr: Annotated[float, Strict(), Field(gt=0, le=10, allow_inf_nan=False)] = 1e-3   # 1e300 overflowed float32 mid-epoch
    weight_decay: Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False)] = 0.0
    batch_size: Count = 16
    epochs: Count = 10
    max_minutes: Annotated[Finite, Field(ge=0)] = 0.0   # wall-clock budget of one run (0: none); the schedule is fitted to it
    grad_clip: Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False)] = 1.0   # 0: off
    scheduler: Literal["cosine", "none"] = "cosine"
    train: Literal["all", "scale_head"] = "all"   # scale_head: only the Laplace scale output learns


@dataclass(config=_SCHEMA)
class IntensityConfig:
    ct_window: list[Float] = field(default_factory=lambda: [float(v) for v in DEFAULT_CT_WINDOW])
    mr_percentiles: list[Float] = field(default_factory=lambda: [float(v) for v in DEFAULT_MR_PERCENTILES])


@dataclass(config=_SCHEMA)
class TrackingConfig:
    enabled: StrictBool = True
    uri: StrictStr | None = None
    experiment: StrictStr = "medvae-train"
    run_name: StrictStr | None = None
    log_every: Count = 10              # steps between loss logs
    review_slices: Size = 4       # validation slices shown in the per-epoch review image
    log_model: StrictBool = True


# LossConfig (medvae.losses, a plain dataclass) checked as strictly as the other sections: no "4" or
# true for a number, no inf; LossConfig's own checks (kind, warm-up, >= 0) run after this
_STRICT_TYPES: dict[str, Any] = {"float": Finite, "int": Annotated[int, Strict()], "str": StrictStr}
_LossSchema = create_model("LossSchema", __config__=_SCHEMA,
                           **{f.name: (_STRICT_TYPES[str(f.type)], f.default) for f in dataclasses.fields(LossConfig)})


@dataclass(config=_SCHEMA)
class TrainConfig:
    seed: Annotated[int, Strict(), Field(ge=0, lt=2**32)] = 0   # numpy's and the samplers' range
    device: StrictStr = "auto"         # "auto", "cpu", "cuda", "cuda:1"
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"   # auto: fp16 on CUDA, off on CPU
    threads: Annotated[int, Strict(), Field(ge=0, le=MAX_THREADS)] = 0   # torch CPU threads (0: torch's default)
    output_dir: StrictStr = "runs/default"
    init_from: StrictStr | None = None  # warm start from a checkpoint's weights, or "default" (checkpoint.warm_start)
    data: _section(DataConfig) = field(default_factory=DataConfig)
    corruption: _section(CorruptionConfig) = field(default_factory=CorruptionConfig)
    model: _section(ModelConfig) = field(default_factory=ModelConfig)
    loss: Annotated[dict[StrictStr, Any], BeforeValidator(lambda v: {} if v is None else v)] = field(
        default_factory=dict)   # checked as a LossConfig; empty as the other sections may be
    optim: _section(OptimConfig) = field(default_factory=OptimConfig)
    intensity: _section(IntensityConfig) = field(default_factory=IntensityConfig)
    tracking: _section(TrackingConfig) = field(default_factory=TrackingConfig)

    @property
    def loss_config(self) -> LossConfig:
        return LossConfig(**self.loss)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["loss"] = dataclasses.asdict(self.loss_config)
        return d


# -- parsing --------------------------------------------------------------------------------------

_EXPECTED = {"int_type": "int", "float_type": "float", "bool_type": "bool", "string_type": "str",
             "list_type": "list", "dict_type": "a mapping", "dataclass_type": "a mapping"}


def _error_line(exc: ValidationError, prefix: str = "") -> str:
    """The first error of a pydantic validation as one line that names the config key."""
    err = exc.errors()[0]
    loc = [str(part) for part in err["loc"] if not isinstance(part, int)]
    key = prefix + ".".join(loc)
    if err["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        return f"unknown config key '{key}'"
    if err["loc"] and err["loc"][-1] == "[key]":  # a mapping's key (pydantic names it '[key]')
        return f"config key '{prefix}{'.'.join(loc[:-1]) or '<root>'}' keys should be strings, got {err['input']!r}"
    if err["type"] == "value_error":  # a check of the section itself (LossConfig.__post_init__)
        return str(err.get("ctx", {}).get("error", err["msg"]))
    expected = _EXPECTED.get(err["type"])
    what = f"must be {expected}" if expected else err["msg"].lower()
    if err["type"] == "too_short":  # pydantic's "list should have at least 2 items after validation, not 1"
        what = f"must list at least {err.get('ctx', {}).get('min_length')} values"
    return f"config key '{key or '<root>'}' {what}, got {err['input']!r}"


def _validate(data: dict[str, Any], source: str) -> TrainConfig:
    try:
        cfg = TypeAdapter(TrainConfig).validate_python(data)
        cfg.loss = _LossSchema.model_validate(cfg.loss).model_dump(exclude_unset=True)  # the checked values
        cfg.loss_config  # noqa: B018 - LossConfig's own checks (kind, warm-up, >= 0)
    except ValidationError as exc:
        prefix = "loss." if exc.title == _LossSchema.__name__ else ""
        raise MedvaeError(_error_line(exc, prefix), source) from None
    except ValueError as exc:  # LossConfig.__post_init__: its message names the key
        raise MedvaeError(str(exc), source) from None
    problem = _problem(cfg)
    if problem:
        raise MedvaeError(problem, source)
    cfg._source = source  # not a config key: errors found later (e.g. no CUDA) name the file too
    return cfg


def config_source(cfg: TrainConfig, key: str | None = None) -> str | None:
    """The config file a :class:`TrainConfig` was read from (``<defaults>`` without one), for errors
    found after loading it; None for a config built in Python. With ``key``: the override that set it
    (or a section above it), when one did, as load-time errors name it.

    >>> cfg = load_config(None, ["device=cpu"])
    >>> config_source(cfg), config_source(cfg, "device"), config_source(cfg, "init_from")
    ('<defaults>', "override 'device=cpu'", '<defaults>')
    """
    if key:
        items = getattr(cfg, "_overrides", {})
        item = next((v for k, v in reversed(items.items()) if key == k or key.startswith(k + ".")), None)
        if item:
            return f"override {item!r}"
    return getattr(cfg, "_source", None)


def _problem(cfg: TrainConfig) -> str | None:
    """What the schema cannot say about a config: values that depend on each other or on the package."""
    from medvae.models.vae import VAEConfig
    from medvae.runtime import device_problem

    problem = device_problem(cfg.device)  # the name only: the hardware is checked when training starts
    if problem:
        return f"config key 'device': {problem}"
    if cfg.model.spatial_dims != 2:
        return (f"config key 'model.spatial_dims' is {cfg.model.spatial_dims}: medvae train cuts 2-D patches "
                "(a 3-D MaskedVAE can be built with the Python API, not trained by this loop)")
    try:
        VAEConfig.from_dict(dict(cfg.model.__dict__))
    except (TypeError, ValueError) as exc:
        return f"config key 'model': {exc}"
    for key in ("recipe", "val_recipe"):
        name = getattr(cfg.corruption, key)
        if not (name.endswith((".yaml", ".yml")) or "/" in name or "\\" in name) \
                and resources.find("recipes", name) is None:  # a recipe file is checked when it is read
            return (f"config key 'corruption.{key}': unknown recipe {name!r}; shipped: "
                    f"{', '.join(resources.names('recipes'))}")
    if cfg.data.samples_per_epoch < cfg.optim.batch_size:
        return (f"config key 'data.samples_per_epoch' {cfg.data.samples_per_epoch} is smaller than "
                f"optim.batch_size {cfg.optim.batch_size}: an epoch would take no step")
    d = cfg.data
    if not 0.0 <= d.window_jitter < 0.5:
        return f"config key 'data.window_jitter' must be in [0, 0.5), got {d.window_jitter}"
    if cfg.loss_config.kind == "laplace" and not cfg.model.scale_head:  # failed at the first step
        return "config key 'loss.kind' is 'laplace', which needs model.scale_head: true (the decoder's scale)"
    if cfg.optim.train == "scale_head" and not cfg.model.scale_head:
        return "config key 'optim.train' is 'scale_head', which needs model.scale_head: true"
    if cfg.optim.train == "scale_head" and cfg.optim.weight_decay:
        return ("config key 'optim.train' is 'scale_head', which needs optim.weight_decay 0 (decay would move "
                "the frozen restoration weights)")
    unknown = [m for m in d.texture_modalities if m.upper() not in ("CT", "MR")]
    if unknown:  # any other name matched no volume, and texture was silently off
        return f"config key 'data.texture_modalities' lists CT and/or MR only, got {d.texture_modalities}"
    if len(d.texture_sigma) != 2 or not 0.0 < d.texture_sigma[0] <= d.texture_sigma[1] <= 1.0:
        return (f"config key 'data.texture_sigma' must be [low, high] with 0 < low <= high <= 1 (window units), "
                f"got {d.texture_sigma}")
    if d.large_patch_size and d.large_patch_size <= d.patch_size:
        return (f"config key 'data.large_patch_size' must be 0 (off) or larger than data.patch_size "
                f"({d.patch_size}), got {d.large_patch_size}")
    for key, values, lo, hi in (("intensity.ct_window", cfg.intensity.ct_window, -CT_WINDOW_LIMIT, CT_WINDOW_LIMIT),
                                ("intensity.mr_percentiles", cfg.intensity.mr_percentiles, 0.0, 100.0)):
        if len(values) != 2 or not lo <= values[0] < values[1] <= hi:
            return f"config key '{key}' must be two increasing numbers within [{lo}, {hi}], got {values}"
    return None


def _dotted_keys(d: Any, prefix: str = "") -> set[str]:
    """Every key of a nested mapping, dotted: ``{"optim": {"lr": 1}}`` gives ``{"optim", "optim.lr"}``."""
    if not isinstance(d, dict):
        return set()
    out: set[str] = set()
    for k, v in d.items():
        out.add(f"{prefix}{k}")
        out |= _dotted_keys(v, f"{prefix}{k}.")
    return out


def _set_dotted(d: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        if d.get(k) is None:  # an empty section ('optim:' in a file) holds the defaults
            d[k] = {}
        d = d[k]
        if not isinstance(d, dict):  # named with the config, as the schema's errors are
            raise MedvaeError(f"config key '{dotted}': '{k}' is not a section", source)
    d[keys[-1]] = value


def _config_file(path: str | Path) -> tuple[Any, bool]:
    """``(file, shipped)``: a YAML path, or the config shipped under that name (``default``)."""
    p = Path(path)
    if p.is_file():
        return p, False
    name = str(path)
    if not any(ch in name for ch in "/\\") and not name.endswith((".yaml", ".yml")):
        shipped = resources.find("configs", name)
        if shipped is not None:
            return shipped, True
    known = ", ".join(resources.names("configs"))
    raise MedvaeError(f"config file not found (or give a shipped config by name: {known})", p)


class _Loader(strict_loader(yaml.SafeLoader)):
    """PyYAML's safe loader, reading ``1e-3`` as the float YAML 1.2 says it is (YAML 1.1 wants ``1.0e-3``
    and reads ``1e-3`` as a string, which the strict schema then refuses), and refusing a key given
    twice in one mapping (:func:`medvae.yamlsafe.strict_loader`)."""


# YAML 1.2 booleans only: YAML 1.1 also reads on/off/yes/no as booleans, so `amp: off` became False and
# was refused as "should be 'auto', 'off', ...", and `tracking.run_name: no` became False
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
               |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
               |\.[0-9_]+(?:[eE][-+][0-9]+)?
               |[-+]?\.(?:inf|Inf|INF)
               |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def _refuse_replaced_data_keys(cfg: TrainConfig, given: set[str], where: str | None) -> None:
    """A store holds its own split and a manifest its own scans: data keys they replace were ignored
    without a word, so a scan given in data.val_paths beside a store was trained on."""
    if cfg.data.store:
        source, replaced = "data.store", ("paths", "val_paths", "val_fraction", "exclude", "manifest")
        why = "a store trains and validates on the split `medvae prepare` gave it"
    elif cfg.data.manifest:
        source, replaced = "data.manifest", ("paths", "val_paths", "exclude")
        why = "a manifest lists the scans and their subjects' split"
    else:
        return
    for key in replaced:
        if f"data.{key}" in given:
            raise MedvaeError(f"config keys 'data.{key}' and '{source}' are both given, and {source} replaces "
                              f"data.{key} ({why}): drop one of them", where)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config (a path, or the name of a shipped config) and apply ``key=value`` overrides.

    Override values are parsed as YAML.

    Examples
    --------
    >>> cfg = load_config(None, ["optim.epochs=2", "model.channels=[8,16]"])
    >>> cfg.optim.epochs, cfg.model.channels
    (2, [8, 16])
    >>> load_config("default").corruption.recipe
    'train'
    """
    source = str(path) if path else "<defaults>"
    data: dict[str, Any] = {}
    shipped = False
    if path is not None:
        p, shipped = _config_file(path)
        source = str(p)
        try:
            text = p.read_text(encoding="utf-8")
            data = check_expansion(yaml.load(text, Loader=_Loader), p, text=text) or {}
        except yaml.YAMLError as exc:
            raise MedvaeError(describe_error(exc), p) from None
        except UnicodeDecodeError:
            raise MedvaeError("not a YAML text file (it is not UTF-8 text)", p) from None
        if not isinstance(data, dict):
            raise MedvaeError("a config file must be a YAML mapping", p)
    # the data keys the user set to a value of their own (not a shipped config's, nor a copy of the default
    # config's: the README has users copy it): one that a store or a manifest replaces is refused
    given: set[str] = set()
    overridden: dict[str, str] = {}  # key -> the override that set it: its errors name it, not the file
    in_file = _dotted_keys(data)
    top_values = {k for k, v in data.items() if v is not None and not isinstance(v, dict)}
    if path is not None and not shipped and isinstance(data.get("data"), dict):
        ours = (yaml.load(resources.find("configs", "default").read_text(encoding="utf-8"), Loader=_Loader)
                or {}).get("data") or {}
        given = {f"data.{k}" for k, v in data["data"].items() if v not in (None, "", []) and v != ours.get(k)}
    for item in overrides:
        if "=" not in item:
            raise MedvaeError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        try:
            value = check_expansion(yaml.load(raw, Loader=_Loader), f"override {key.strip()}", text=raw)
        except yaml.YAMLError:
            value = raw
        key = key.strip()
        if "" in key.split("."):  # '=5' or 'optim..lr=5' were "unknown config key ''" or 'optim.'
            raise MedvaeError(f"override {item!r} names no config key: give section.key=value, such as "
                              "optim.epochs=2")
        try:
            _set_dotted(data, key, value, source)
        except MedvaeError as exc:  # 'optim.lr.x=1' below an override's value: the override's fault
            if key.split(".")[0] in top_values:
                raise  # a section the file gives as a value ('optim: 5'): the file's fault
            raise MedvaeError(f"override {item!r}: {exc.message}") from None
        overridden[key] = item
        # what the override replaced is no longer given (data={store: S} replaces the file's data paths)
        given = {g for g in given if g != key and not g.startswith(key + ".")}
        if isinstance(value, dict):
            given |= {f"{key}.{k}" for k, v in value.items() if v not in (None, "", [])}
        elif value not in (None, "", []):  # data.paths=[] beside a store sets nothing
            given.add(key)
    try:
        cfg = _validate(data, source)
    except MedvaeError as exc:
        # "default.yaml: unknown config key 'data.foo'" blamed a typo on the command line on the shipped file
        named = re.findall(r"config key '([^']+)'|^([\w.]+) must", exc.message)
        keys = [a or b for a, b in named]
        # the override that set the key, or a section above it
        exact = [v for k, v in overridden.items() for n in keys if n == k or n.startswith(k + ".")]
        if exact:
            raise MedvaeError(f"override {exact[-1]!r}: {exc.message}") from None
        # overrides below the key: a section the file lacks ('optm.epochs=2' is "unknown config key 'optm'"),
        # or a check of a whole section the file and the overrides both set
        below = list(dict.fromkeys(v for k, v in overridden.items() for n in keys if k.startswith(n + ".")))
        if not below:
            raise
        shown = ", ".join(map(repr, below))
        if any(n in in_file for n in keys):
            raise MedvaeError(f"{exc.message} (with {shown} from the command line)", source) from None
        raise MedvaeError(f"override{'s' if len(below) > 1 else ''} {shown}: {exc.message}") from None
    cfg._overrides = overridden  # not a config key: later errors about these keys name the override
    _refuse_replaced_data_keys(cfg, given, source if path is not None else None)  # named as the schema's errors
    if path is not None and not shipped:  # a shipped config's data paths are relative to the working directory
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
    cfg.data.exclude = [fix(p) for p in cfg.data.exclude]  # as the paths it excludes from
    cfg.data.manifest = fix(cfg.data.manifest) if cfg.data.manifest else None  # issue 12
    cfg.data.store = fix(cfg.data.store) if cfg.data.store else None
    cfg.init_from = fix(cfg.init_from) if cfg.init_from and cfg.init_from != "default" else cfg.init_from
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
            r = p.resolve()
            # a file, or any file inside an excluded folder
            if not any(r == x or x in r.parents for x in excluded) and p not in out:
                out.append(p)
    return out
