"""medvae: restore CT and MR scans with a KL-regularized masked VAE built on MONAI.

The top-level names are imported lazily so that ``import medvae`` (and the CLI) stay fast.
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load_scan": "medvae.io",
    "save_scan": "medvae.io",
    "Scan": "medvae.io",
    "restore_volume": "medvae.restore",
    "load_model": "medvae.tracking",  # local files, and runs:/ and models:/ URIs
    "MedvaeError": "medvae.errors",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'medvae' has no attribute {name!r}")
