"""Shared pytest fixtures and options for czii_kit.

Keep this file light: it is also loaded inside the cached zarr-2 / copick test environments
(``tests/envs.py``), which hold only numpy, scipy, pandas, zarr, pytest and copick.

Fixtures
--------
shared_data
    Path of the real reference data (``$CZII_SHARED_DATA`` or ``<repo>/../shared/data``); skips when absent.
train_picks_dir
    ``shared_data / "czii_train_picks"``; skips when absent.
make_dataset
    Factory writing a small synthetic dataset in the Kaggle layout (unequal-sided volumes).

Markers
-------
``slow`` marks tests that take long (training, fresh installs; see docs/testing.md): they run by
default, ``-m "not slow"`` leaves them out. Tests marked ``network_guard`` fail if they open an
internet socket.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:  # `import envs` / `from conftest import ...` work with or without tests/__init__.py
    sys.path.insert(0, _TESTS_DIR)
VOXEL_SIZE = 10.012444
"""The real Kaggle voxel size, Å."""
SMALL_SHAPE = (16, 32, 48)
"""Unequal-sided test volume ``(nz, ny, nx)``: an axis swap changes the shape and fails loudly."""


def shared_data_path() -> Path:
    """Where the shared reference data should be (it may not exist)."""
    env = os.environ.get("CZII_SHARED_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _network_guard(request, monkeypatch):
    """For tests marked ``network_guard``: any connection to a non-loopback address fails the test."""
    if request.node.get_closest_marker("network_guard") is None:
        yield
        return
    attempts: list[object] = []
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def _allowed(sock, address) -> bool:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return True  # unix sockets and the like stay local
        host = address[0] if isinstance(address, tuple) else str(address)
        return host in ("localhost", "::1") or str(host).startswith("127.")

    def connect(sock, address):
        if not _allowed(sock, address):
            attempts.append(address)
            raise OSError(f"network_guard: test tried to connect to {address!r}")
        return real_connect(sock, address)

    def connect_ex(sock, address):
        if not _allowed(sock, address):
            attempts.append(address)
            raise OSError(f"network_guard: test tried to connect to {address!r}")
        return real_connect_ex(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    yield
    if attempts:
        pytest.fail(f"network_guard: the test tried to open network connections: {attempts}")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared reference data folder; skips the test when it is absent."""
    path = shared_data_path()
    if not path.is_dir():
        pytest.skip(f"shared reference data not found at {path} (set CZII_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def train_picks_dir(shared_data) -> Path:
    """The real Kaggle training picks (``czii_train_picks``); skips when absent."""
    path = shared_data / "czii_train_picks"
    if not (path / "ExperimentRuns").is_dir():
        pytest.skip(f"real training picks not found at {path}")
    return path


def random_picks(runs, shape=SMALL_SHAPE, voxel_size=VOXEL_SIZE, per_type=3, seed=0) -> pd.DataFrame:
    """A picks table with ``per_type`` points per run and particle type, inside a ``shape`` volume (Å)."""
    from czii_kit.catalog import PARTICLE_NAMES

    rng = np.random.default_rng(seed)
    extent_xyz = np.array(shape[::-1], dtype=float) * voxel_size
    rows = []
    for run in runs:
        for particle in PARTICLE_NAMES:
            for xyz in rng.uniform(0, extent_xyz, size=(per_type, 3)):
                rows.append((run, particle, *xyz))
    return pd.DataFrame(rows, columns=["experiment", "particle_type", "x", "y", "z"])


@pytest.fixture
def make_dataset(tmp_path):
    """Factory: ``make_dataset(runs=("TS_A", "TS_B"), split="train", shape=(16, 32, 48), naming="kaggle")``.

    Writes ``{root}/{split}/static/ExperimentRuns/{run}/VoxelSpacing10.000/denoised.zarr`` (random
    float32 volumes, 3 levels, voxel size 10.012444 Å) and ``{root}/{split}/overlay/.../Picks/*.json``;
    returns ``(root, volumes {run: ndarray}, picks DataFrame)``.
    """
    from czii_kit.picks import write_picks
    from czii_kit.tomogram import write_tomogram

    def make(runs=("TS_A", "TS_B"), split="train", shape=SMALL_SHAPE, naming="kaggle", seed=0,
             root=None, tomograms=("denoised",)):
        root = Path(root) if root is not None else tmp_path / "dataset"
        rng = np.random.default_rng(seed)
        volumes = {}
        for run in runs:
            vol = rng.normal(size=shape).astype(np.float32)
            volumes[run] = vol
            for name in tomograms:
                dest = root / split / "static" / "ExperimentRuns" / run / "VoxelSpacing10.000" / f"{name}.zarr"
                write_tomogram(dest, vol, VOXEL_SIZE, chunks=(8, 16, 16))
        picks = random_picks(runs, shape, seed=seed)
        write_picks(picks, root / split / "overlay", naming=naming)
        return root, volumes, picks

    return make
