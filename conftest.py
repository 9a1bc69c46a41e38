"""Fixtures for every test the suite collects: tests/ and the doctests of medvae/ and benchmarks/."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _digest_key(monkeypatch):
    """A fixed key for the keyed path digests (medvae.identifiers): the doctests show their values, and no
    test writes a key file into the home folder."""
    monkeypatch.setenv("MEDVAE_DIGEST_KEY", "medvae-tests-" + "0" * 20)  # 32 bytes: no short-key warning


@pytest.fixture(autouse=True)
def _temporary_files_under_basetemp(tmp_path_factory, monkeypatch):
    """Temporary files of the library and of what it calls (MLflow's model copies, torchrun's
    rendezvous folders, torch caches), in this process and in subprocesses, go to a fresh folder
    that pytest manages (beside the tests' ``tmp_path``), not to the machine's /tmp. Not inside
    ``tmp_path``: tests assert what it holds. A short name: Chromium puts a socket in it (at most
    108 characters of path)."""
    import tempfile

    tmp = tmp_path_factory.mktemp("tmp")
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
