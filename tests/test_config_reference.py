"""docs/config.md names every training config key with its true default."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import yaml

from medvae.losses import LossConfig
from medvae.training.config import TrainConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def _defaults(obj, prefix: str = "") -> dict:
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name == "loss" and not prefix:  # a dict checked as a LossConfig
            value = LossConfig()
        if dataclasses.is_dataclass(value):
            out.update(_defaults(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = value
    return out


def test_every_config_key_is_documented_with_its_default():
    rows = re.findall(r"^\| `([a-z_.]+)` \| `([^`]*)` \|", DOC.read_text(), flags=re.M)
    documented = {key: yaml.safe_load(default) for key, default in rows}
    true = _defaults(TrainConfig())
    assert len(true) > 50 and set(documented) == set(true), set(documented) ^ set(true)
    wrong = {k: (documented[k], v) for k, v in true.items() if documented[k] != v}
    assert not wrong, wrong
