"""Reading and writing scans: NIfTI and DICOM, with atomic writes and sample data.

Public API: :class:`Scan`, :func:`load_scan`, :func:`save_scan`, :func:`list_series`.
Importing this package is cheap (numpy only); nibabel, pydicom and MONAI are imported when a
scan is read or written, MONAI only by ``load_scan``'s default reader (``LoadImage``):
``load_scan(reader="native")``, :func:`medvae.io.dicom.open_series` and the writers never import
it. :class:`medvae.io.dicom.MedvaeDicomReader` (a MONAI ``ImageReader``) is built on first use.

Examples
--------
>>> from medvae.io import load_scan, save_scan                 # doctest: +SKIP
>>> scan = load_scan("series_folder")                          # doctest: +SKIP
>>> save_scan(scan, scan.array, "restored_folder")              # doctest: +SKIP
"""
from __future__ import annotations

import os

from medvae.io.formats import claim_scan_output, load_scan, save_scan
from medvae.io.scan import Scan

__all__ = ["Scan", "load_scan", "save_scan", "claim_scan_output", "list_series"]


def list_series(folder: str | os.PathLike) -> list[tuple[str, str, int]]:
    """List the DICOM series under ``folder``: ``[(uid, description, n_slices), ...]``.

    Examples
    --------
    >>> list_series("dev/dicom/series_ct_head")  # doctest: +SKIP
    [('1.2.826.0.1.3680043.8.498.1002', 'CT head sample series', 108)]
    """
    from medvae.io.dicom import list_series as _list_series

    return _list_series(folder)
