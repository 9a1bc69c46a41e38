"""Corruption recipes: named chains of random corruptions read from YAML.

A recipe file (package data ``medvae/recipes/<name>.yaml``, or any YAML path) looks like::

    description: Gaussian noise, 2-12 % of the window
    steps:
      - transform: gaussian        # registry name (see medvae.corruption.REGISTRY)
        sigma: [0.02, 0.12]        # options of the random transform, ranges as [min, max]
        prob: 1.0                  # optional, default 1
        modalities: [CT, MR]       # optional: skipped for other modalities

A step can also be

* ``one_of: [chain, ...]`` with optional ``weights: [...]``: one chain is drawn per call among the
  chains allowed for the modality (a chain is a list of steps, or ``{name, modalities, steps}``);
* ``include: <recipe name or file>``: the steps of another recipe; a relative file path is read
  from the including recipe's folder, wherever the recipe is run from.

A ``file_mask`` step's relative ``path`` is read from the recipe's folder too. A key given twice in
one mapping is refused (YAML would keep the last silently), and so are ``weights`` that are all zero.

Instead of ``steps`` the top level may hold ``one_of`` (+ ``weights``) directly.

Recipes run on images normalized to [0, 1] by the intensity window (:mod:`medvae.intensity`), so
``sigma: 0.05`` is 5 % of the window and low-dose CT steps give ``hu_window: [-1000, 1000]``.
``modality=None`` disables the modality filters. ``pixel_size_mm`` (the image's in-plane pixel size,
when the caller knows it) reaches every step; low-dose CT steps that do not fix ``pixel_size_mm``
themselves use it instead of their ``fov_mm`` rule.

Examples
--------
>>> import numpy as np
>>> recipe = load_recipe("gaussian")
>>> res = recipe(np.zeros((1, 32, 32), np.float32), seed=3, modality="CT")
>>> again, _ = replay(np.zeros((1, 32, 32), np.float32), res.record)
>>> bool((again == res.image).all()), res.record["steps"][0]["transform"]
(True, 'gaussian')
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from medvae import resources
from medvae.corruption import masks as _masks  # noqa: F401  (registers the mask transforms)
from medvae.corruption.noise import REGISTRY, RandCorruption, replay
from medvae.corruption.ranges import parse_prob, parse_value
from medvae.io.formats import MODALITIES
from medvae.yamlsafe import check_expansion, describe_error, strict_loader

__all__ = ["RECIPE_DIR", "Recipe", "CorruptionResult", "load_recipe", "list_recipes", "replay"]

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

#: where recipe names are looked up: the ``recipes`` folder shipped inside the package
RECIPE_DIR: Traversable = resources.folder("recipes")

_RecipePath = Union[Path, "Traversable"]
_stem = resources.stem

_STEP_COMMON = {"transform", "prob", "modalities"}


@dataclass
class CorruptionResult:
    """What a recipe returns.

    Attributes
    ----------
    image : numpy.ndarray or torch.Tensor
        Corrupted image, same type and shape as the input.
    mask : numpy.ndarray or torch.Tensor
        ``(1, *spatial)`` bool, ``True`` = corrupted (union of the steps' masks; all False when
        no step was applied).
    record : dict
        JSON-serialisable ``{recipe, seed, modality, pixel_size_mm, steps: [{transform, params}], choices}``;
        :func:`replay` reproduces ``image`` and ``mask`` from it.
    """

    image: Any
    mask: Any
    record: dict[str, Any]


def list_recipes() -> list[str]:
    """Names of the recipes shipped with medvae (package data ``medvae/recipes/*.yaml``).

    Examples
    --------
    >>> "gaussian" in list_recipes()
    True
    """
    return resources.names("recipes")


def _modalities(value: Any, where: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: modalities must be a list of names like [CT, MR], got {value!r}")
    names = tuple(v.strip().upper() for v in value)
    unknown = [v for v, n in zip(value, names) if n not in MODALITIES]
    if unknown or not names:  # a typo switched the step off for every scan, silently
        raise ValueError(f"{where}: modalities must name {' or '.join(MODALITIES)}, got {value!r}")
    return names


def _allowed(mods: tuple[str, ...] | None, modality: str | None) -> bool:
    return mods is None or modality is None or modality.upper() in mods


@dataclass(frozen=True)
class _Context:
    """What every step of one recipe call sees besides the image."""

    modality: str | None
    pixel_size_mm: float | None = None
    spacing_mm: tuple[float, ...] | None = None  # voxel size along every axis, for a field smooth in mm


class _Step:
    def __init__(self, name: str, transform: RandCorruption, modalities: tuple[str, ...] | None,
                 where: str = "") -> None:
        self.name, self.transform, self.modalities = name, transform, modalities
        self.where = where or name  # the recipe file and step, named when the step fails on an image

    def spatial_dims(self) -> set[int]:
        return set(self.transform.deterministic.spatial_dims)

    def volume_modes(self) -> set[str]:
        return {self.transform.deterministic.volume_mode}

    def all_steps(self):
        yield self

    def run(self, x, mask, rng: np.random.Generator, ctx: _Context, record):
        step_seed = int(rng.integers(0, 2**31 - 1))  # drawn even when skipped: stable seeds
        if not _allowed(self.modalities, ctx.modality):
            record["steps"].append({"transform": self.name, "params": None, "skipped": "modality"})
            return x, mask
        self.transform.set_random_state(seed=step_seed)
        try:
            x, m = self.transform(x, pixel_size_mm=ctx.pixel_size_mm, spacing_mm=ctx.spacing_mm)
        except ValueError as exc:  # "axes [2] do not exist in a 2-D image": say which step of which file
            raise ValueError(f"{self.where}: {exc}") from None
        p = self.transform.last_params
        record["steps"].append({"transform": self.name, "params": p} if p is not None
                               else {"transform": self.name, "params": None, "skipped": "prob"})
        if p is not None:
            mask = m if mask is None else (mask | m)
        return x, mask


class _Chain:
    def __init__(self, steps: list[Any], modalities: tuple[str, ...] | None, name: str) -> None:
        self.steps, self.modalities, self.name = steps, modalities, name

    def spatial_dims(self) -> set[int]:
        dims = {2, 3}
        for s in self.steps:
            dims &= s.spatial_dims()
        return dims

    def volume_modes(self) -> set[str]:
        return set().union(*(s.volume_modes() for s in self.steps))

    def all_steps(self):
        for s in self.steps:
            yield from s.all_steps()

    def run(self, x, mask, rng, ctx: _Context, record):
        for s in self.steps:
            x, mask = s.run(x, mask, rng, ctx, record)
        return x, mask


class _OneOf:
    def __init__(self, chains: list[_Chain], weights: list[float], modalities, where: str) -> None:
        self.chains, self.weights, self.modalities, self.where = chains, weights, modalities, where

    def spatial_dims(self) -> set[int]:
        dims: set[int] = set()
        for c in self.chains:
            dims |= c.spatial_dims()
        return dims

    def volume_modes(self) -> set[str]:
        return set().union(*(c.volume_modes() for c in self.chains))

    def all_steps(self):
        for c in self.chains:
            yield from c.all_steps()

    def run(self, x, mask, rng, ctx: _Context, record):
        u = float(rng.random())
        sub_seed = int(rng.integers(0, 2**63 - 1))  # the chosen chain draws from its own stream
        if not _allowed(self.modalities, ctx.modality):
            return x, mask
        idx = [i for i, c in enumerate(self.chains) if _allowed(c.modalities, ctx.modality)]
        w = np.array([self.weights[i] for i in idx], dtype=float)
        if not idx or w.sum() <= 0:
            record["choices"].append({"one_of": self.where, "chosen": None})
            return x, mask
        cum = np.cumsum(w / w.sum())
        k = idx[min(int(np.searchsorted(cum, u, side="right")), len(idx) - 1)]
        record["choices"].append({"one_of": self.where, "chosen": self.chains[k].name})
        return self.chains[k].run(x, mask, np.random.default_rng(sub_seed), ctx, record)


class Recipe:
    """A parsed corruption recipe; call it on a channel-first image.

    Use :func:`load_recipe` to build one.

    Attributes
    ----------
    name : str
    path : pathlib.Path or importlib.resources.abc.Traversable
        The YAML file (a shipped recipe is package data).
    description : str
    config : dict
        The YAML content as loaded.
    spatial_dims : set of int
        The dimensionalities every possible chain accepts: ``{3}`` for 3-D-only recipes
        (missing slices), ``{2, 3}`` otherwise.

    Examples
    --------
    >>> import numpy as np
    >>> r = load_recipe("mixed")
    >>> res = r(np.random.rand(1, 64, 64).astype(np.float32), seed=0, modality="MR")
    >>> res.image.shape, res.mask.dtype
    ((1, 64, 64), dtype('bool'))
    """

    def __init__(self, name: str, path: Path, description: str, root: _Chain, config: dict[str, Any]) -> None:
        self.name, self.path, self.description, self._root, self.config = name, path, description, root, config

    @property
    def spatial_dims(self) -> set[int]:
        return self._root.spatial_dims()

    @property
    def transforms(self) -> list[RandCorruption]:
        """The transform of every step, in every chain a ``one_of`` may choose."""
        return [step.transform for step in self._root.all_steps()]

    @property
    def adds_noise(self) -> bool:
        """False when every step only erases (masks): such a recipe's holes are the same in any window.

        >>> load_recipe("boxes").adds_noise, load_recipe("mixed").adds_noise
        (False, True)
        """
        return not all(isinstance(t, _masks._RandMask) for t in self.transforms)

    @property
    def requires_3d(self) -> bool:
        """True when the recipe must run on whole volumes ``(C, H, W, D)``."""
        return 2 not in self.spatial_dims

    @property
    def volume_modes(self) -> set[str]:
        """The ``Corruption.volume_mode`` of every step."""
        return self._root.volume_modes()

    @property
    def whole_volume(self) -> bool:
        """True when a scan volume is corrupted whole rather than slice by slice: a recipe that needs
        3-D, or one whose every step runs on volumes and is voxel-wise or a field smooth across slices
        (a bias field), with at least one such field (see ``Corruption.volume_mode``).

        >>> load_recipe("bias_field").whole_volume, load_recipe("noise").whole_volume
        (True, False)
        """
        modes = self.volume_modes
        return self.requires_3d or (3 in self.spatial_dims and "volume" in modes and modes <= {"volume", "either"})

    def __call__(self, img, *, seed: int, modality: str | None = None,
                 pixel_size_mm: float | None = None, spacing_mm: Sequence[float] | None = None) -> CorruptionResult:
        """Corrupt ``img`` (``(C, H, W)`` or ``(C, H, W, D)``, numpy or torch; not modified).

        ``seed`` (a non-negative int) fixes everything: which chain, which parameters, which noise.
        ``pixel_size_mm``: the image's in-plane pixel size, when known (see the module's doc); it
        does not change any random draw, and the steps record the size they used.

        Examples
        --------
        >>> import numpy as np
        >>> water = np.full((1, 64, 64), 0.5, np.float32)   # 0 HU in the -1000..1000 window
        >>> res = load_recipe("lowdose_ct")(water, seed=0, modality="CT", pixel_size_mm=0.5)
        >>> res.record["steps"][0]["params"]["pixel_size_mm"]
        0.5
        """
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if pixel_size_mm is not None:
            pixel_size_mm = float(parse_value(pixel_size_mm, "pixel_size_mm", low=0, low_open=True))
        rng = np.random.default_rng(int(seed))
        record: dict[str, Any] = {"recipe": self.name, "seed": int(seed), "modality": modality,
                                  "pixel_size_mm": pixel_size_mm, "steps": [], "choices": []}
        spacing = None if spacing_mm is None else tuple(float(parse_value(v, "spacing_mm", low=0, low_open=True))
                                                        for v in spacing_mm)
        x, mask = self._root.run(img, None, rng, _Context(modality, pixel_size_mm, spacing), record)
        if mask is None:  # nothing applied: a copy, all-False mask
            x, mask = replay(img, {"steps": []})
        return CorruptionResult(x, mask, record)

    def __repr__(self) -> str:
        return f"Recipe({self.name!r}: {self.description})"


# --------------------------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------------------------
def _resolve(name_or_path: str | PathLike) -> _RecipePath:
    s = str(name_or_path)
    if isinstance(name_or_path, PathLike) or s.endswith((".yaml", ".yml")) or "/" in s or "\\" in s:
        p = Path(s).expanduser()
        if not p.is_file():
            raise ValueError(f"recipe file {s} does not exist")
        return p
    p = resources.find("recipes", s)
    if p is None:
        raise ValueError(f"unknown recipe {s!r}; available: {', '.join(list_recipes()) or '(none)'}")
    return p


def _read_yaml(path: _RecipePath) -> dict[str, Any]:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
        data = check_expansion(yaml.load(text, Loader=strict_loader(yaml.SafeLoader)), path, text=text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: {describe_error(exc)}") from None
    except UnicodeDecodeError as exc:  # every message names the recipe file (the CLI adds no path)
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a recipe must be a mapping with 'steps' or 'one_of'")
    return data


def _accepted_kwargs(cls: type[RandCorruption]) -> set[str]:
    sig = inspect.signature(cls.__init__)
    return {n for n, p in sig.parameters.items() if n != "self" and p.kind == p.KEYWORD_ONLY}


class _Parser:
    def __init__(self, path: _RecipePath, stack: tuple[tuple[str, str], ...]) -> None:
        self.path, self.stack = path, stack  # (the recipe's file, as resolved; its name as included)

    def err(self, where: str, msg: str) -> ValueError:
        return ValueError(f"{self.path}: {where}: {msg}")

    def _beside(self, name: str) -> str:
        """An included recipe file's path: a relative one from the including file's folder (it was read
        from the working folder, so a recipe included another file, or none, depending on where it ran)."""
        is_file = name.endswith((".yaml", ".yml")) or "/" in name or "\\" in name
        if is_file and isinstance(self.path, Path) and not Path(name).expanduser().is_absolute():
            return str(self.path.parent / name)
        return name

    def chain(self, node: Any, where: str, name: str) -> _Chain:
        mods, items = None, where  # a chain given as a list: its steps are where[i]; as a dict: where.steps[i]
        if isinstance(node, dict):
            items = f"{where}.steps"
            unknown = set(node) - {"name", "modalities", "steps"}
            if unknown:
                raise self.err(where, f"unknown key(s) {', '.join(sorted(map(str, unknown)))} "
                                      "(a chain has name, modalities, steps)")
            name = str(node.get("name", name))
            mods = _modalities(node.get("modalities"), f"{self.path}: {where}")
            node = node.get("steps")
        if not isinstance(node, list) or not node:
            raise self.err(where, "a chain must be a non-empty list of steps")
        return _Chain([self.step(s, f"{items}[{i}]") for i, s in enumerate(node)], mods, name)

    def one_of(self, node: dict[str, Any], where: str) -> _OneOf:
        chains = node["one_of"]
        if not isinstance(chains, list) or not chains:
            raise self.err(where, "one_of must be a non-empty list of chains")
        parsed = [self.chain(c, f"{where}[{i}]", f"{i}") for i, c in enumerate(chains)]
        weights = node.get("weights", [1.0] * len(parsed))
        if not isinstance(weights, list) or len(weights) != len(parsed):
            raise self.err(where, f"weights must be a list with one number per chain ({len(parsed)})")
        try:
            weights = [float(parse_value(w, "weights", low=0)) for w in weights]
        except ValueError as exc:
            raise self.err(where, str(exc)) from None
        if not any(weights):  # no chain could ever be drawn: the recipe wrote unchanged copies
            raise self.err(where, f"weights are all zero ({weights}); give at least one chain a weight above 0")
        mods = _modalities(node.get("modalities"), f"{self.path}: {where}")
        return _OneOf(parsed, weights, mods, f"{_stem(self.path)}:{where}")

    def step(self, node: Any, where: str):
        if not isinstance(node, dict):
            raise self.err(where, f"a step must be a mapping, got {node!r}")
        if "one_of" in node:
            unknown = set(node) - {"one_of", "weights", "modalities"}
            if unknown:
                raise self.err(where, f"unknown key(s) {', '.join(sorted(map(str, unknown)))} in a one_of step "
                                      "(allowed: one_of, weights, modalities)")
            return self.one_of(node, f"{where}.one_of")
        if "include" in node:
            unknown = set(node) - {"include", "modalities"}
            if unknown:
                raise self.err(where, f"unknown key(s) {', '.join(sorted(map(str, unknown)))} in an include step")
            name = str(node["include"])
            try:
                target = _resolve(self._beside(name))
            except ValueError as exc:  # named with the recipe and step that include it
                raise self.err(where, f"include: {exc}") from None
            # the same file, not the same words: '../base.yaml' names another file in each folder
            if _file_key(target) in (key for key, _ in self.stack):
                chain = " -> ".join([label for _, label in self.stack] + [name])
                raise self.err(where, f"recipe {name!r} includes itself ({chain})")
            sub = _load(target, self.stack + ((_file_key(target), name),))
            mods = _modalities(node.get("modalities"), f"{self.path}: {where}")
            return _Chain([sub._root], mods, name)
        if "transform" not in node:
            raise self.err(where, f"a step needs 'transform', 'one_of' or 'include'; got keys {sorted(map(str, node))}")
        name = node["transform"]
        if not isinstance(name, str) or name not in REGISTRY:  # a list was "unhashable type", a traceback
            raise self.err(where, f"unknown transform {name!r}; available: {', '.join(sorted(REGISTRY))}")
        cls = REGISTRY[name]
        allowed = _accepted_kwargs(cls) | _STEP_COMMON
        unknown = set(node) - allowed
        if unknown:
            raise self.err(where, f"unknown key(s) {', '.join(sorted(map(str, unknown)))} for transform "
                                  f"{name!r} (allowed: {', '.join(sorted(allowed))})")
        kwargs = {k: v for k, v in node.items() if k not in _STEP_COMMON}
        if name == "file_mask" and isinstance(kwargs.get("path"), str) and isinstance(self.path, Path):
            # from the recipe's folder, as an include is: from the working folder, one recipe masked
            # another file (or none) depending on where it ran
            p = Path(kwargs["path"]).expanduser()
            if kwargs["path"].strip() and not p.is_absolute():
                kwargs["path"] = str(self.path.parent / p)
        try:
            prob = parse_prob(node.get("prob", 1.0))
            transform = cls(prob=prob, **kwargs)
        except (ValueError, TypeError) as exc:
            raise self.err(f"{where} ({name})", str(exc)) from None
        return _Step(name, transform, _modalities(node.get("modalities"), f"{self.path}: {where}"),
                     f"{self.path}: {where} ({name})")


def _file_key(path: _RecipePath) -> str:
    """What tells two recipe files apart: the resolved path (a shipped recipe's, inside the package)."""
    return str(Path(str(path)).resolve()) if isinstance(path, Path) else f"package:{path}"


def _load(path: _RecipePath, stack: tuple[tuple[str, str], ...]) -> Recipe:
    data = _read_yaml(path)
    unknown = set(data) - {"description", "steps", "one_of", "weights"}
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(sorted(map(str, unknown)))} "
                         "(allowed: description, steps, one_of, weights)")
    if ("steps" in data) == ("one_of" in data):
        raise ValueError(f"{path}: a recipe needs exactly one of 'steps' or 'one_of'")
    if "weights" in data and "one_of" not in data:
        raise ValueError(f"{path}: 'weights' only goes with 'one_of'")
    parser = _Parser(path, stack)
    name = _stem(path)
    if "steps" in data:
        root = parser.chain(data["steps"], "steps", name)
    else:
        root = _Chain([parser.one_of(data, "one_of")], None, name)
    return Recipe(name, path, str(data.get("description", "")), root, data)


def load_recipe(name_or_path: str | PathLike) -> Recipe:
    """Load a recipe by name (one of :func:`list_recipes`, shipped in ``medvae/recipes``) or from a YAML path.

    Raises
    ------
    ValueError
        For an unknown name (listing the available ones), a missing file, invalid YAML, an unknown
        key (naming the key and the file) or a bad parameter (naming the parameter).

    Examples
    --------
    >>> load_recipe("gaussian").description
    'Gaussian noise, 2-12 % of the intensity window'
    """
    path = _resolve(name_or_path)
    return _load(path, ((_file_key(path), _stem(path)),))
