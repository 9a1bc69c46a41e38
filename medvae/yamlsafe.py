"""YAML from files medvae did not write (configs, recipes, manifests): bounded in what it expands to.

``yaml.safe_load`` runs no code, but its aliases share nodes, so a file of a few hundred bytes
("billion laughs") becomes hundreds of millions of values once anything walks it: a message quoting
it, a schema checking it. :func:`check_expansion` counts the values as they would be walked and
stops at a bound far above any real config, recipe or manifest.
"""
from __future__ import annotations

import functools
import os
from typing import Any

from medvae.errors import MedvaeError

#: values any document may expand to; beyond it, twice the text's length: without aliases every value
#: (a key, an item, a scalar, a mapping) takes at least a character of the text, so only aliases exceed it
MIN_VALUES = 100_000


def check_expansion(data: Any, source: str | os.PathLike | None = None, *, text: str = "",
                    limit: int | None = None) -> Any:
    """Return ``data`` (as ``yaml.safe_load`` gave it from ``text``) unless its aliases expand it to more
    than ``limit`` values (default: twice the length of ``text``, at least :data:`MIN_VALUES`).

    Examples
    --------
    >>> import yaml
    >>> bomb = yaml.safe_load("a: &a [x, x, x]\\nb: &b [*a, *a, *a]\\nc: [*b, *b, *b]")
    >>> check_expansion(bomb, "bomb.yaml", limit=30)
    Traceback (most recent call last):
    medvae.errors.MedvaeError: bomb.yaml: the YAML's aliases expand it to more than 30 values
    """
    limit = max(MIN_VALUES, 2 * len(text)) if limit is None else limit
    count, stack = 0, [data]
    while stack:
        value = stack.pop()
        count += 1
        if count > limit:
            raise MedvaeError(f"the YAML's aliases expand it to more than {limit:,} values", source)
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
    return data


def describe_error(exc: Exception) -> str:
    """A PyYAML error in one line, without the stream's name (the caller names the file).

    Examples
    --------
    >>> import yaml
    >>> try:
    ...     yaml.safe_load("a: [1,")
    ... except yaml.YAMLError as exc:
    ...     describe_error(exc)
    "invalid YAML (line 1): expected the node content, but found '<stream end>'"
    """
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"invalid YAML{f' (line {mark.line + 1})' if mark else ''}: {problem}"


@functools.lru_cache(maxsize=None)  # one class per base: a manifest read builds none anew
def strict_loader(base: Any) -> Any:
    """``base`` (a PyYAML loader class) refusing a key given twice in one mapping: PyYAML keeps the last,
    so a second ``optim:`` section, or a manifest row's second ``path``, silently dropped the first."""
    import yaml

    class Strict(base):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen = set()
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=True)
                    try:
                        duplicate = key in seen
                        seen.add(key)
                    except TypeError:  # an unhashable key: the constructor says what is wrong with it
                        continue
                    if duplicate:
                        raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}",
                                                                key_node.start_mark)
            return super().construct_mapping(node, deep=deep)

    return Strict
