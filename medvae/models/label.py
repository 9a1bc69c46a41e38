"""How a model is named in MLflow, on the review page and in a derived series: never by a local path.

File names can carry patient names or IDs, so a local checkpoint is named by its content.
"""
from __future__ import annotations

import hashlib
import re
from os import PathLike
from pathlib import Path

_LABEL = re.compile(r"^(sha256|path-sha1):[0-9a-f]{12}$")


def model_label(spec: str | PathLike | None) -> str | None:
    """How a model is named in MLflow and on the review page: never by a local path.

    File names can carry patient names or IDs, so only the shipped model's name ``"default"`` and
    MLflow model URIs (``runs:/...``, ``models:/...``) are kept as given. A local checkpoint is
    named by its content, ``sha256:<12 hex digits>`` (the file, or the ``medvae.pt`` inside a
    local MLflow model folder); anything else (a path that is not there, any other text) by a keyed
    digest of its text (:func:`medvae.identifiers.keyed_digest`), ``path-sha1:<12 hex digits>``. A
    label is returned unchanged.

    Parameters
    ----------
    spec : str or PathLike or None
        The model as the user gave it (``--model``, ``--model-uri``).

    Returns
    -------
    str or None
        None when ``spec`` is None or empty.

    Examples
    --------
    >>> model_label("runs:/0123abcd/model"), model_label("default")
    ('runs:/0123abcd/model', 'default')
    >>> model_label("DOE^JANE/no_such_model.pt")
    'path-sha1:edf959c474e8'
    """
    if spec is None or str(spec) == "":
        return None
    text = str(spec)
    path = Path(text)
    if text == "default" or text.startswith(("runs:/", "models:/")) or (_LABEL.match(text) and not path.exists()):
        return text  # a label; a file of a label's name is named by its content, as any other
    if path.is_dir():  # a local MLflow model folder: its checkpoint (see medvae.models.checkpoint)
        path = next((c for c in (path / "extra_files" / "medvae.pt", path / "medvae.pt") if c.is_file()), path)
    if path.is_file():
        h = hashlib.sha256()
        try:
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            return f"sha256:{h.hexdigest()[:12]}"
        except OSError:  # unreadable: still never the path itself
            pass
    from medvae.identifiers import keyed_digest

    return f"path-sha1:{keyed_digest(text)}"  # keyed: a plain hash of a path gives a guessed ID back
