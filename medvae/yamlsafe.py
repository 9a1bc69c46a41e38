"""YAML from files medvae did not write (configs, recipes, manifests): bounded in what it expands to.

``yaml.safe_load`` runs no code, but its aliases share nodes, so a file of a few hundred bytes
("billion laughs") becomes hundreds of millions of values once anything walks it: a message quoting
it, a schema checking it. :func:`check_expansion` counts the values as they would be walked and
stops at a bound far above any real config, recipe or manifest.
"""
from __future__ import annotations

import os
from typing import Any

from medvae.errors import MedvaeError

#: values (mapping keys and values, list items, scalars) a YAML document may expand to: a manifest of a
#: million scans has about five million
MAX_VALUES = 5_000_000


def check_expansion(data: Any, source: str | os.PathLike | None = None, *, limit: int = MAX_VALUES) -> Any:
    """Return ``data`` (as ``yaml.safe_load`` gave it) unless it expands to more than ``limit`` values.

    Examples
    --------
    >>> import yaml
    >>> bomb = yaml.safe_load("a: &a [x, x, x]\\nb: &b [*a, *a, *a]\\nc: [*b, *b, *b]")
    >>> check_expansion(bomb, "bomb.yaml", limit=30)
    Traceback (most recent call last):
    medvae.errors.MedvaeError: bomb.yaml: the YAML expands to more than 30 values (nested aliases?)
    """
    count, stack = 0, [data]
    while stack:
        value = stack.pop()
        count += 1
        if count > limit:
            raise MedvaeError(f"the YAML expands to more than {limit:,} values (nested aliases?)", source)
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
    return data
