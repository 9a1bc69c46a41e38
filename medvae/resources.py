"""Files shipped inside the package: corruption recipes and training configs, found by name.

They are package data (``medvae/recipes/*.yaml``, ``medvae/configs/*.yaml``), read with
:mod:`importlib.resources`, so they are there in a wheel as in the git checkout. This module imports
nothing heavy: the command line lists the names in its help.

Examples
--------
>>> "gaussian" in names("recipes"), "default" in names("configs")
(True, True)
>>> find("configs", "default").name
'default.yaml'
>>> find("configs", "nonexistent") is None
True
"""
from __future__ import annotations

from importlib.resources import files
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = ["Folder", "folder", "names", "find", "stem"]

#: the package-data folders that hold named YAML files
Folder = Literal["recipes", "configs"]


def folder(kind: Folder) -> Traversable:
    """The shipped folder ``medvae/<kind>`` (a ``pathlib.Path`` for an installed package)."""
    return files("medvae").joinpath(kind)


def stem(path: Traversable) -> str:
    """The name of a YAML file without ``.yaml`` / ``.yml``."""
    name = path.name
    for suffix in (".yaml", ".yml"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def names(kind: Folder) -> list[str]:
    """Sorted names of the YAML files shipped in ``medvae/<kind>``."""
    return sorted(stem(p) for p in folder(kind).iterdir() if p.is_file() and p.name.endswith(".yaml"))


def find(kind: Folder, name: str) -> Traversable | None:
    """The shipped file ``medvae/<kind>/<name>.yaml``, or ``None`` when there is none."""
    path = folder(kind).joinpath(f"{name}.yaml")
    return path if path.is_file() else None
