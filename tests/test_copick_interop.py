"""Interoperability with the real ``copick`` package (the CZII data library).

copick pins ``zarr<3`` and pulls heavy dependencies, so the main environment usually lacks it and
these tests skip there; ``test_zarr_versions.py`` runs them inside a cached venv with zarr 2.18 +
copick, where ``CZII_KIT_REQUIRE_COPICK=1`` turns a missing copick into a failure.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pandas as pd
import pytest
from conftest import SMALL_SHAPE, VOXEL_SIZE, random_picks

from czii_kit.catalog import PARTICLE_NAMES, PARTICLES
from czii_kit.layout import find_runs, get_run, tomogram_location
from czii_kit.picks import read_picks, write_picks
from czii_kit.tomogram import open_tomogram, write_tomogram

if os.environ.get("CZII_KIT_REQUIRE_COPICK") == "1":
    import copick
else:
    copick = pytest.importorskip("copick", reason="copick is not installed here (test_zarr_versions runs it)")


def copick_config(path, static_root, overlay_root):
    """A copick filesystem config pointing at our static and overlay roots, with the six particles."""
    config = {
        "config_type": "filesystem",
        "name": "czii_kit interop",
        "description": "written by czii_kit tests",
        "version": "1.0.0",
        "pickable_objects": [
            {"name": p.name, "is_particle": True, "label": p.copick_label, "color": [*p.color, 255],
             "radius": p.radius, "pdb_id": p.pdb_id}
            for p in PARTICLES
        ],
        "overlay_root": f"local://{overlay_root}",
        "static_root": f"local://{static_root}",
        "overlay_fs_args": {"auto_mkdir": True},
        "static_fs_args": {"auto_mkdir": True},
    }
    path.write_text(json.dumps(config))
    return path


def _tomogram(vs, name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        found = vs.get_tomograms(name)
    assert len(found) == 1, found
    return found[0]


def test_copick_reads_what_czii_kit_writes(tmp_path):
    root = tmp_path / "train"
    rng = np.random.default_rng(11)
    volumes = {}
    for run in ("TS_A", "TS_B"):
        volumes[run] = rng.normal(size=SMALL_SHAPE).astype(np.float32)
        write_tomogram(tomogram_location(root / "static", run), volumes[run], VOXEL_SIZE, chunks=(8, 16, 16))
    picks = random_picks(["TS_A", "TS_B"], per_type=4, seed=12)
    write_picks(picks, root / "overlay", naming="copick", user_id="curation", session_id="0")

    cp = copick.from_file(str(copick_config(tmp_path / "copick.json", root / "static", root / "overlay")))
    assert sorted(r.name for r in cp.runs) == ["TS_A", "TS_B"]
    for run_name, vol in volumes.items():
        run = cp.get_run(run_name)
        vs = run.get_voxel_spacing(10.0)
        assert vs is not None, "copick did not find VoxelSpacing10.000"
        tomo = _tomogram(vs, "denoised")
        np.testing.assert_array_equal(tomo.numpy(), vol)  # identical voxels, [z, y, x]
        ours = get_run(root, run_name).tomogram_path()
        for level in ("1", "2"):
            np.testing.assert_array_equal(tomo.numpy(level), open_tomogram(ours, level).read())
        for particle in PARTICLE_NAMES:
            (cp_picks,) = run.get_picks(object_name=particle, user_id="curation", session_id="0")
            points, transforms = cp_picks.numpy()
            expect = picks[(picks.experiment == run_name) & (picks.particle_type == particle)]
            np.testing.assert_array_equal(points, expect[["x", "y", "z"]].to_numpy())  # identical (x, y, z) Å
            np.testing.assert_array_equal(transforms, np.tile(np.eye(4), (len(points), 1, 1)))


def test_czii_kit_reads_what_copick_writes(tmp_path):
    static, overlay = tmp_path / "static", tmp_path / "overlay"
    static.mkdir()
    cp = copick.from_file(str(copick_config(tmp_path / "copick.json", static, overlay)))
    rng = np.random.default_rng(21)
    vol = rng.normal(size=SMALL_SHAPE).astype(np.float32)
    rows = []
    for run_name in ("TS_X", "TS_Y"):
        run = cp.new_run(run_name)
        tomo = run.new_voxel_spacing(10.0).new_tomogram("wbp")
        tomo.from_numpy(vol)
        for particle in ("ribosome", "thyroglobulin"):
            pts = rng.uniform(0, 400, size=(5, 3))
            cp_picks = run.new_picks(particle, session_id="3", user_id="someone")
            cp_picks.from_numpy(pts)
            cp_picks.store()
            rows += [(run_name, particle, *p) for p in pts]
    expect = pd.DataFrame(rows, columns=["experiment", "particle_type", "x", "y", "z"])

    runs = find_runs(overlay)
    assert [r.name for r in runs] == ["TS_X", "TS_Y"]
    t = open_tomogram(runs[0].tomogram_path("wbp"))
    assert t.shape == SMALL_SHAPE and t.voxel_size == pytest.approx(10.0)
    np.testing.assert_array_equal(t.read(), vol)
    assert open_tomogram(runs[0].tomogram_path("wbp"), 1).shape == (8, 16, 24)
    got = read_picks(overlay, user_id="someone")
    key = ["experiment", "particle_type", "x", "y", "z"]
    pd.testing.assert_frame_equal(got.sort_values(key).reset_index(drop=True),
                                  expect.sort_values(key).reset_index(drop=True), check_exact=True)
    assert read_picks(overlay, user_id="nobody").empty
