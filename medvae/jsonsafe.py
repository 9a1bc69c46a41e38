"""Plain, strict JSON from medvae's records, summaries and sidecars.

One conversion for every JSON that medvae writes (corruption records, evaluation summaries,
benchmark results), so that they all follow RFC 8259 and load back the same way.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np

__all__ = ["json_safe"]


def json_safe(obj: Any) -> Any:
    """NaN → None, ±inf → "inf"/"-inf", numpy scalars/arrays and tuples → plain JSON types, paths → str.

    Examples
    --------
    >>> json_safe({"a": np.float32(0.5), "b": (1, np.int64(2)), "c": float("nan"), "d": np.ones(2)})
    {'a': 0.5, 'b': [1, 2], 'c': None, 'd': [1.0, 1.0]}
    >>> json_safe([float("inf"), Path("x/y")])
    ['inf', 'x/y']
    """
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    return obj
