"""Fixtures of the hostile-input tests: the shared input files and a private working
directory holding a copy of them."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

import harness
from harness.mcn import save_net

from .inputs import (
    clean_imdb_arrays,
    pool_net,
    save_imdb,
    small_net,
)

# --------------------------------------------------------------------------- shared inputs


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """net.mat (small net, v7), net73.mat (v7.3), model.keras (its faithful model),
    pool.mat and pool.keras (the same with a pool layer), imdb8.mat (8x8x1, 8 images, 2 classes)."""
    d = tmp_path_factory.mktemp("hostile_shared")
    net = small_net()
    save_net(d / "net.mat", net)
    save_net(d / "net73.mat", net, version="7.3")
    harness.to_keras(net).save(d / "model.keras")
    save_net(d / "pool.mat", pool_net())
    harness.to_keras(pool_net()).save(d / "pool.keras")
    save_imdb(d / "imdb8.mat", *clean_imdb_arrays(8, 8, 1))
    return d


@pytest.fixture
def wd(shared, tmp_path, monkeypatch) -> Path:
    """A private copy of the shared inputs as the working directory; sys.path restored."""
    for p in shared.iterdir():
        shutil.copy2(p, tmp_path / p.name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    return tmp_path
