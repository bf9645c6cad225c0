"""Dataset discovery, tomogram zarr I/O and picks JSON I/O.

These tests run in the main environment and, through ``test_zarr_versions.py``, inside cached
venvs with the other zarr major version (and copick): keep imports to numpy/pandas/zarr.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import warnings

import numpy as np
import pandas as pd
import pytest
import zarr
from conftest import SMALL_SHAPE, VOXEL_SIZE, random_picks

from czii_kit.catalog import PARTICLE_NAMES
from czii_kit.coords import level_origin, nearest_voxel, voxel_to_angstrom
from czii_kit.errors import CziiKitError, DataError, FileExistsNoForce
from czii_kit.layout import (
    choose_tomogram,
    find_runs,
    get_run,
    picks_location,
    spacing_folder,
    tomogram_location,
)
from czii_kit.picks import parse_pick_filename, picks_document, read_picks, read_picks_file, write_picks
from czii_kit.tomogram import bin2, describe_tomogram, open_tomogram, read_multiscales, write_tomogram

# Points per run from ../shared/data/README.md, in PARTICLE_NAMES order.
REAL_COUNTS = {
    "TS_5_4": (46, 10, 12, 31, 30, 11),
    "TS_69_2": (35, 12, 16, 37, 34, 9),
    "TS_6_4": (58, 9, 12, 74, 30, 10),
    "TS_6_6": (41, 14, 11, 23, 35, 19),
    "TS_73_6": (95, 12, 14, 46, 28, 22),
    "TS_86_3": (64, 9, 23, 55, 45, 29),
    "TS_99_9": (36, 21, 24, 65, 49, 13),
}


def test_zarr_version_is_the_expected_one():
    """Inside a test-env leg, prove the leg really runs the zarr it was built for."""
    expected = os.environ.get("CZII_KIT_EXPECT_ZARR")
    if not expected:
        pytest.skip("not inside a zarr-version leg (CZII_KIT_EXPECT_ZARR unset)")
    assert zarr.__version__.split(".")[0] == expected, zarr.__version__


# --------------------------------------------------------------------------- layout


def test_find_runs_from_every_kind_of_path(make_dataset):
    root, _, _ = make_dataset(runs=("TS_A", "TS_B"), split="train")
    make_dataset(runs=("TS_C",), split="test", root=root, seed=1)
    train = root / "train"

    def names(path, split=None):
        return [(r.split, r.name) for r in find_runs(path, split)]

    assert names(root) == [("test", "TS_C"), ("train", "TS_A"), ("train", "TS_B")]
    assert names(root, "train") == [("train", "TS_A"), ("train", "TS_B")]
    assert names(train) == [("train", "TS_A"), ("train", "TS_B")]
    assert names(train / "static") == [("train", "TS_A"), ("train", "TS_B")]
    assert names(train / "overlay" / "ExperimentRuns") == [("train", "TS_A"), ("train", "TS_B")]
    assert names(train / "static" / "ExperimentRuns" / "TS_B") == [("train", "TS_B")]
    assert names(train / "overlay" / "ExperimentRuns" / "TS_B" / "Picks") == [("train", "TS_B")]
    # static and overlay folders of one run are merged
    run = get_run(root, "TS_A", split="train")
    assert {d.parent.parent.name for d in run.dirs} == {"static", "overlay"}
    assert list(run.tomograms()) == ["denoised"]
    assert run.tomogram_path("denoised") == tomogram_location(train / "static", "TS_A")
    assert len(run.pick_files()) == len(PARTICLE_NAMES)
    assert run.pick_files()[0].parent == picks_location(train / "overlay", "TS_A")


def test_layout_helpers_spell_folders_like_kaggle(tmp_path):
    assert spacing_folder(10.0) == "VoxelSpacing10.000"
    assert tomogram_location(tmp_path, "TS_1", "wbp").relative_to(tmp_path).as_posix() == (
        "ExperimentRuns/TS_1/VoxelSpacing10.000/wbp.zarr"
    )


def test_finest_spacing_wins(make_dataset, tmp_path):
    root, _, _ = make_dataset(runs=("TS_A",))
    coarse = root / "train" / "static" / "ExperimentRuns" / "TS_A" / "VoxelSpacing20.000" / "denoised.zarr"
    write_tomogram(coarse, np.zeros((4, 8, 12), np.float32), 2 * VOXEL_SIZE, n_levels=1)
    run = get_run(root, "TS_A")
    assert run.tomogram_path().parent.name == "VoxelSpacing10.000"


def test_find_runs_errors(tmp_path, make_dataset):
    with pytest.raises(DataError, match="no such file or folder") as exc:
        find_runs(tmp_path / "missing")
    assert exc.value.path == tmp_path / "missing"
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(DataError, match="got a file"):
        find_runs(tmp_path / "a.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no runs found"):
        find_runs(tmp_path / "empty")
    root, _, _ = make_dataset()
    with pytest.raises(DataError, match="no runs of split 'valid' found; its 2 run\\(s\\) are of split train "):
        find_runs(root, split="valid")
    runs_dir = root / "train" / "static" / "ExperimentRuns"
    with pytest.raises(DataError, match="are of split train "):
        find_runs(runs_dir, split="test")
    loose = tmp_path / "loose" / "ExperimentRuns"
    shutil.copytree(runs_dir, loose)
    with pytest.raises(DataError, match="of split \\(none: not under a split folder\\)"):
        find_runs(loose, split="test")
    assert [r.name for r in find_runs(loose)] == ["TS_A", "TS_B"]
    with pytest.raises(DataError, match="no run 'TS_Z' \\(found: TS_A, TS_B\\)"):
        get_run(root, "TS_Z")
    with pytest.raises(DataError, match="no tomogram 'wbp' \\(found: denoised\\)"):
        get_run(root, "TS_A").tomogram_path("wbp")



def test_auto_tomogram_prefers_the_denoised_one_then_the_least_noisy(make_dataset):
    assert choose_tomogram(["wbp", "denoised", "ctfdeconvolved", "isonetcorrected"]) == "denoised"
    assert choose_tomogram(["wbp", "ctfdeconvolved", "isonetcorrected"]) == "isonetcorrected"
    assert choose_tomogram(["wbp", "ctfdeconvolved"]) == "ctfdeconvolved"
    assert choose_tomogram(["zz", "wbp"]) == "wbp"
    assert choose_tomogram(["raw", "wbp-Denoised"]) == "wbp-Denoised"
    assert choose_tomogram(["b", "a"]) == "a"
    assert choose_tomogram([]) is None
    root, _, _ = make_dataset(runs=("TS_A",))
    run = get_run(root, "TS_A")
    assert run.tomogram_name("auto") == "denoised" and run.tomogram_name("wbp") == "wbp"
    assert run.tomogram_path("auto") == run.tomogram_path("denoised")
    wbp = run.tomogram_path().parent / "wbp.zarr"
    write_tomogram(wbp, np.zeros((4, 8, 12), np.float32), VOXEL_SIZE, n_levels=1)
    shutil.rmtree(run.tomogram_path("denoised"))
    assert run.tomogram_name("auto") == "wbp" and run.tomogram_path("auto") == wbp
    shutil.rmtree(wbp)
    with pytest.raises(DataError, match="has no tomograms"):
        run.tomogram_path("auto")


# --------------------------------------------------------------------------- tomograms


def test_tomogram_round_trip_unequal_sides(tmp_path):
    rng = np.random.default_rng(3)
    vol = rng.normal(size=SMALL_SHAPE).astype(np.float32)
    path = write_tomogram(tmp_path / "t.zarr", vol, VOXEL_SIZE, chunks=(8, 16, 16))
    assert read_multiscales(path) == [("0", VOXEL_SIZE), ("1", 2 * VOXEL_SIZE), ("2", 4 * VOXEL_SIZE)]
    info = describe_tomogram(path)
    assert [d["shape"] for d in info] == [(16, 32, 48), (8, 16, 24), (4, 8, 12)]
    assert {d["dtype"] for d in info} == {"float32"}
    t0 = open_tomogram(path)
    assert t0.shape == SMALL_SHAPE and t0.voxel_size == VOXEL_SIZE and t0.level == "0"
    np.testing.assert_array_equal(t0.read(), vol)
    np.testing.assert_array_equal(t0.read(3, 9), vol[3:9])
    np.testing.assert_array_equal(t0[2, :, 5], vol[2, :, 5])
    assert t0.read(4, 4).shape == (0, 32, 48)
    with pytest.raises(ValueError, match="outside 0:16"):
        t0.read(10, 17)
    t1 = open_tomogram(path, 1)
    assert t1.voxel_size == pytest.approx(2 * VOXEL_SIZE)
    expect1 = vol.reshape(8, 2, 16, 2, 24, 2).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(t1.read(), expect1, atol=1e-6)
    np.testing.assert_allclose(open_tomogram(path, "2").read(), bin2(expect1), atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_read_into_fills_views_of_a_larger_array(tmp_path, dtype):
    from czii_kit.volumes import read_volume

    vol = (np.random.default_rng(4).normal(size=SMALL_SHAPE) * 100).astype(dtype)
    path = write_tomogram(tmp_path / "t.zarr", vol, VOXEL_SIZE, n_levels=1, chunks=(16, 20, 20))  # partial edge chunks
    t = open_tomogram(path)
    out = np.full((2, *SMALL_SHAPE), -1.0, np.float32)
    key = (slice(None), slice(20, 32), slice(5, 47))
    t.read_into(out[1][key], key)
    np.testing.assert_array_equal(out[1][key], vol[key].astype(np.float32))
    assert (out[0] == -1).all() and (out[1][:, :20] == -1).all() and (out[1][:, 20:, :5] == -1).all()
    np.testing.assert_array_equal(read_volume(t), vol.astype(np.float32))


def test_tomogram_files_follow_the_kaggle_format(tmp_path):
    vol = np.arange(np.prod(SMALL_SHAPE), dtype=np.float32).reshape(SMALL_SHAPE)
    path = write_tomogram(tmp_path / "denoised.zarr", vol, VOXEL_SIZE, chunks=(8, 16, 16))
    assert json.loads((path / ".zgroup").read_text())["zarr_format"] == 2
    ms = json.loads((path / ".zattrs").read_text())["multiscales"][0]
    assert ms["version"] == "0.4"
    assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    assert {a["unit"] for a in ms["axes"]} == {"angstrom"}
    assert [d["path"] for d in ms["datasets"]] == ["0", "1", "2"]
    scales = [d["coordinateTransformations"][0] for d in ms["datasets"]]
    assert all(s["type"] == "scale" for s in scales)
    assert [s["scale"] for s in scales] == [[VOXEL_SIZE * 2**k] * 3 for k in range(3)]
    shifts = [d["coordinateTransformations"][1] for d in ms["datasets"]]
    assert [s["translation"] for s in shifts] == [[level_origin(VOXEL_SIZE, k)] * 3 for k in range(3)]
    for level, shape in (("0", [16, 32, 48]), ("1", [8, 16, 24]), ("2", [4, 8, 12])):
        meta = json.loads((path / level / ".zarray").read_text())
        assert meta["zarr_format"] == 2 and meta["shape"] == shape and meta["dtype"] == "<f4"
        assert meta["dimension_separator"] == "/"
        c = meta["compressor"]
        assert (c["id"], c["cname"], c["clevel"], c["shuffle"]) == ("blosc", "lz4", 5, 1)
    assert (path / "0" / "1" / "1" / "2").is_file()  # nested chunk keys z/y/x
    assert not [p for p in path.glob("0/*.*") if not p.name.startswith(".")]  # no "0.1.2" keys
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary left behind


def test_bin2_averages_odd_edges_over_existing_voxels():
    vol = np.arange(5 * 7 * 9, dtype=np.float32).reshape(5, 7, 9)
    b = bin2(vol)
    assert b.shape == (3, 4, 5)
    assert b[0, 0, 0] == pytest.approx(vol[:2, :2, :2].mean())
    assert b[2, 3, 4] == vol[4, 6, 8]  # corner made of a single voxel
    assert b[2, 0, 0] == pytest.approx(vol[4, :2, :2].mean())
    assert b.dtype == np.float32


def test_write_tomogram_never_overwrites_silently(tmp_path):
    path = tmp_path / "t.zarr"
    write_tomogram(path, np.zeros((4, 6, 8), np.float32), 10.0, n_levels=2)
    with pytest.raises(FileExistsNoForce, match="already exists"):
        write_tomogram(path, np.ones((4, 6, 8), np.float32), 10.0)
    assert open_tomogram(path).read().max() == 0
    write_tomogram(path, np.ones((4, 6, 8), np.float32), 12.5, overwrite=True)
    t = open_tomogram(path)
    assert t.read().min() == 1 and t.voxel_size == 12.5
    assert [p.name for p in tmp_path.iterdir()] == ["t.zarr"]
    with pytest.raises(ValueError, match="NaN"):
        write_tomogram(tmp_path / "nan.zarr", np.full((2, 2, 2), np.nan, np.float32), 10.0)
    with pytest.raises(ValueError, match="3D"):
        write_tomogram(tmp_path / "flat.zarr", np.zeros((2, 2), np.float32), 10.0)
    assert not (tmp_path / "nan.zarr").exists()


def test_bad_tomograms(tmp_path):
    path = write_tomogram(tmp_path / "t.zarr", np.zeros((4, 6, 8), np.float32), 10.0)
    with pytest.raises(DataError, match="no multiscale level '7'"):
        open_tomogram(path, 7)
    shutil.rmtree(path / "1")
    with pytest.raises(DataError, match="cannot open zarr array") as exc:
        open_tomogram(path, 1)
    assert exc.value.path == path / "1"
    open_tomogram(path, 0)  # the other levels still open
    with pytest.raises(DataError, match="no such zarr group"):
        open_tomogram(tmp_path / "missing.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not a zarr group \\(no .zgroup, .zarray or zarr.json\\)"):
        open_tomogram(tmp_path / "plain")
    attrs = path / ".zattrs"
    good = attrs.read_text()
    attrs.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON") as exc:
        open_tomogram(path)
    assert exc.value.path == attrs
    attrs.write_text(json.dumps({"other": 1}))
    with pytest.raises(DataError, match="no OME-NGFF 'multiscales'"):
        open_tomogram(path)
    attrs.write_text(json.dumps({"multiscales": [{"datasets": [{"path": "0"}]}]}))
    with pytest.raises(DataError, match="malformed 'multiscales'"):
        open_tomogram(path)
    # OME-NGFF 0.5 nests the metadata under "ome"
    attrs.write_text(json.dumps({"ome": json.loads(good)}))
    assert open_tomogram(path).voxel_size == 10.0



def test_voxel_size_in_other_units_and_without_metadata(tmp_path):
    vol = np.arange(4 * 6 * 8, dtype=np.float32).reshape(4, 6, 8)
    path = write_tomogram(tmp_path / "t.zarr", vol, VOXEL_SIZE)
    attrs = path / ".zattrs"
    doc = json.loads(attrs.read_text())
    ms = doc["multiscales"][0]
    for ax in ms["axes"]:
        ax["unit"] = "nanometer"
    for ds in ms["datasets"]:
        for t in ds["coordinateTransformations"]:
            t[t["type"]] = [v / 10 for v in t[t["type"]]]
    attrs.write_text(json.dumps(doc))
    assert [k for k, _ in read_multiscales(path)] == ["0", "1", "2"]
    assert np.allclose([v for _, v in read_multiscales(path)], [VOXEL_SIZE, 2 * VOXEL_SIZE, 4 * VOXEL_SIZE])
    for ax in ms["axes"]:
        ax["unit"] = "second"
    attrs.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="axis unit 'second' is not a length unit") as exc:
        open_tomogram(path)
    assert exc.value.path == path
    for ax in ms["axes"]:
        ax["unit"] = "angstrom"
    ms["axes"] = ms["axes"][::-1]  # an array written [x, y, z]
    attrs.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"array axes are \(x, y, z\); czii_kit reads tomograms as \[z, y, x\]"):
        open_tomogram(path)

    # no multiscales: the voxel size of the VoxelSpacing folder, with a warning; levels by width
    spacing = tmp_path / "VoxelSpacing10.000"
    plain = write_tomogram(spacing / "denoised.zarr", vol, VOXEL_SIZE)
    (plain / ".zattrs").write_text("{}")
    with pytest.warns(UserWarning, match="voxel size 10 A taken from the folder name VoxelSpacing10.000"):
        levels = read_multiscales(plain)
    assert levels == [("0", 10.0), ("1", 20.0), ("2", 40.0)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per store: opening it again is silent
        t = open_tomogram(plain)
    assert t.voxel_size == 10.0 and t.shape == (4, 6, 8)
    np.testing.assert_array_equal(t.read(), vol)
    # the store is one bare array
    bare = spacing / "wbp.zarr"
    arr = zarr.open_array(str(bare), mode="w", shape=vol.shape, dtype="float32", chunks=(2, 6, 8))
    arr[:] = vol
    with pytest.warns(UserWarning, match="taken from the folder name"):
        t = open_tomogram(bare)
    assert t.voxel_size == 10.0 and t.level == ""
    np.testing.assert_array_equal(t.read(1, 3), vol[1:3])
    # neither metadata nor a VoxelSpacing folder: the voxel size cannot be told
    (path / ".zattrs").write_text("{}")
    with pytest.raises(DataError, match="cannot tell the voxel size"):
        open_tomogram(path)

def test_corrupt_chunk_is_a_data_error(tmp_path):
    path = write_tomogram(tmp_path / "t.zarr", np.ones((4, 6, 8), np.float32), 10.0, n_levels=1)
    (path / "0" / "0" / "0" / "0").write_bytes(b"garbage, not blosc")
    with pytest.raises(DataError, match="cannot read voxels"):
        open_tomogram(path).read()
    from czii_kit.volumes import read_volume

    t = open_tomogram(path)
    assert t.files is not None  # czii_kit's own chunk reader: its codec's error, named the same way
    with pytest.raises(DataError, match="cannot read voxels"):
        read_volume(t)


def test_angstrom_voxel_convention_end_to_end(make_dataset):
    """Picks at known voxels, written to JSON and read back, land on the bright voxels of the zarr."""
    root, _, _ = make_dataset(runs=("TS_A",))
    vol = np.zeros(SMALL_SHAPE, np.float32)
    idx = np.array([[1, 2, 3], [14, 30, 45], [8, 3, 40], [15, 31, 0]])  # (z, y, x); x > z extent
    vol[tuple(idx.T)] = 1.0
    run = get_run(root, "TS_A")
    write_tomogram(run.tomogram_path(), vol, VOXEL_SIZE, chunks=(8, 16, 16), overwrite=True)
    xyz = voxel_to_angstrom(idx, VOXEL_SIZE)
    picks = pd.DataFrame({"experiment": "TS_A", "particle_type": "ribosome",
                          "x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2]})
    write_picks(picks, root / "train" / "overlay", particle_types=["ribosome"], overwrite=True)
    back = read_picks(root, runs=["TS_A"]).query("particle_type == 'ribosome'")
    tomo = open_tomogram(run.tomogram_path())
    found = nearest_voxel(back[["x", "y", "z"]].to_numpy(), tomo.voxel_size)
    assert found.tolist() == idx.tolist()
    assert (tomo.read()[tuple(found.T)] == 1.0).all()
    # at a binned level, voxel size and origin from the tomogram find the binned voxel holding the point
    for level in (1, 2):
        t = open_tomogram(run.tomogram_path(), level)
        assert t.origin == pytest.approx(level_origin(VOXEL_SIZE, level))
        coarse = nearest_voxel(xyz, t.voxel_size, t.origin)
        np.testing.assert_array_equal(coarse, idx // 2**level)
        assert (t.read()[tuple(coarse.T)] >= 1 / 8**level - 1e-7).all()
    assert open_tomogram(run.tomogram_path(), 0).origin == 0


# --------------------------------------------------------------------------- picks


def test_real_picks_have_the_documented_counts(train_picks_dir):
    df = read_picks(train_picks_dir)
    assert list(df.columns) == ["experiment", "particle_type", "x", "y", "z"]
    assert len(df) == 1269
    counts = df.groupby(["experiment", "particle_type"]).size()
    for run, per_type in REAL_COUNTS.items():
        assert tuple(int(counts.get((run, t), 0)) for t in PARTICLE_NAMES) == per_type, run
    # coordinates are Å inside a 630 x 630 x 184 voxel tomogram
    assert df[["x", "y", "z"]].min().min() >= 0
    assert (df[["x", "y"]].to_numpy() < 630 * VOXEL_SIZE).all() and (df["z"] < 184 * VOXEL_SIZE).all()
    one = read_picks(train_picks_dir, runs=["TS_5_4"])
    assert len(one) == sum(REAL_COUNTS["TS_5_4"]) and set(one["experiment"]) == {"TS_5_4"}
    single = read_picks(train_picks_dir / "ExperimentRuns" / "TS_6_6" / "Picks" / "ribosome.json")
    assert len(single) == 23 and set(single["experiment"]) == {"TS_6_6"}


def test_real_picks_written_back_are_byte_identical(train_picks_dir, tmp_path):
    df = read_picks(train_picks_dir)
    written = write_picks(df, tmp_path)
    assert len(written) == 42
    for path in written:
        original = train_picks_dir / path.relative_to(tmp_path)
        assert filecmp.cmp(path, original, shallow=False), path


@pytest.mark.parametrize("naming", ["kaggle", "copick"])
def test_picks_round_trip(tmp_path, naming):
    picks = random_picks(["TS_A", "TS_B"], per_type=4, seed=5)
    picks = picks[~((picks.experiment == "TS_B") & (picks.particle_type == "ribosome"))]
    files = write_picks(picks, tmp_path / "overlay", naming=naming, user_id="tester", session_id="7")
    assert len(files) == 12  # an empty file for TS_B's ribosomes too
    if naming == "copick":
        assert files[0].name == "tester_7_apo-ferritin.json"
        assert parse_pick_filename(files[0]) == ("tester", "7", "apo-ferritin")
    else:
        assert files[0].name == "apo-ferritin.json"
    doc = json.loads(files[0].read_text())
    assert list(doc) == ["pickable_object_name", "user_id", "session_id", "run_name", "voxel_spacing", "unit",
                         "points", "trust_orientation"]
    assert (doc["user_id"], doc["session_id"], doc["run_name"], doc["unit"]) == ("tester", "7", "TS_A", "angstrom")
    assert list(doc["points"][0]) == ["location", "transformation_", "instance_id"]
    back = read_picks(tmp_path / "overlay")
    key = ["experiment", "particle_type", "x", "y", "z"]
    pd.testing.assert_frame_equal(back.sort_values(key).reset_index(drop=True),
                                  picks.sort_values(key).reset_index(drop=True), check_exact=True)
    assert read_picks(tmp_path / "overlay", user_id="nobody").empty == (naming == "copick")


def test_write_picks_never_overwrites_silently(tmp_path):
    picks = random_picks(["TS_A"], per_type=1)
    write_picks(picks, tmp_path)
    target = tmp_path / "ExperimentRuns" / "TS_A" / "Picks" / "ribosome.json"
    before = target.read_text()
    with pytest.raises(FileExistsNoForce, match="already exists"):
        write_picks(random_picks(["TS_A"], per_type=2, seed=9), tmp_path)
    assert target.read_text() == before
    write_picks(random_picks(["TS_A"], per_type=2, seed=9), tmp_path, overwrite=True)
    assert len(read_picks_file(target)) == 2


def test_write_picks_rejects_bad_tables(tmp_path):
    good = random_picks(["TS_A"], per_type=1)
    with pytest.raises(DataError, match="lacks columns"):
        write_picks(good.drop(columns="z"), tmp_path)
    with pytest.raises(DataError, match="unknown particle types \\['ribozome'\\]"):
        write_picks(good.assign(particle_type="ribozome"), tmp_path)
    bad = good.copy()
    bad.loc[2, "y"] = np.nan
    with pytest.raises(DataError, match="row 2 has a NaN"):
        write_picks(bad, tmp_path)
    assert not tmp_path.joinpath("ExperimentRuns").exists()
    with pytest.raises(DataError):
        picks_document([[1.0, 2.0, np.inf]], "ribosome", "TS_A")


def _picks_file(tmp_path, text, name="ribosome.json"):
    path = tmp_path / "ExperimentRuns" / "TS_X" / "Picks" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _doc(points, name="ribosome"):
    return {"pickable_object_name": name, "run_name": "TS_X", "unit": "angstrom",
            "points": [{"location": dict(zip("xyz", p, strict=True))} for p in points]}


def test_bad_picks_files(tmp_path):
    path = _picks_file(tmp_path, '{"pickable_object_name": "ribosome", "points": [')
    with pytest.raises(DataError, match="not valid JSON") as exc:
        read_picks(tmp_path)
    assert exc.value.path == path
    path.write_text(json.dumps(_doc([[1, 2, 3]], name="ribozome")))
    with pytest.raises(DataError, match="unknown particle type 'ribozome'"):
        read_picks_file(path)
    path.write_text(json.dumps(_doc([[1, 2, 3], [4, float("nan"), 6]])))  # json writes NaN
    with pytest.raises(DataError, match="point 1 has a NaN"):
        read_picks_file(path)
    path.write_text(json.dumps(_doc([[1, 2, 3], [4, "abc", 6]])))
    with pytest.raises(DataError, match="point 1 has no numeric location"):
        read_picks_file(path)
    path.write_text(json.dumps({**_doc([[1, 2, 3]]), "unit": "pixel"}))
    with pytest.raises(DataError, match="unit 'pixel'"):
        read_picks_file(path)
    path.write_text("[1, 2]")
    with pytest.raises(DataError, match="expected a JSON object"):
        read_picks_file(path)
    with pytest.raises(DataError, match="no such file"):
        read_picks_file(tmp_path / "nothing.json")
    path.write_text(json.dumps(_doc([])))
    assert read_picks_file(path).empty
    path.write_text(json.dumps(_doc([[1, 2, 3]])))
    df = read_picks_file(path)
    assert df.iloc[0].tolist() == ["TS_X", "ribosome", 1.0, 2.0, 3.0]


def test_several_sources_for_one_particle_are_not_merged_silently(tmp_path):
    truth = random_picks(["TS_A"], per_type=2, seed=1)
    write_picks(truth, tmp_path, naming="copick", user_id="curation")
    write_picks(random_picks(["TS_A"], per_type=5, seed=2), tmp_path, naming="copick", user_id="model")
    with pytest.raises(DataError, match="several picks files for 'apo-ferritin' of run 'TS_A'.*--user-id"):
        read_picks(tmp_path)
    assert len(read_picks(tmp_path, user_id="curation")) == len(truth)
    assert len(read_picks(tmp_path, user_id="model")) == 30
    write_picks(truth, tmp_path)  # Kaggle names beside copick names of the same picks
    with pytest.raises(DataError, match="curation_0_apo-ferritin.json, apo-ferritin.json|"
                                        "apo-ferritin.json, curation_0_apo-ferritin.json"):
        read_picks(tmp_path, user_id="curation")


def test_picks_errors_are_czii_kit_errors(tmp_path):
    """Every read failure derives from CziiKitError, so the CLI reports one line, exit code 2."""
    with pytest.raises(CziiKitError):
        read_picks(tmp_path / "nowhere")
    with pytest.raises(CziiKitError):
        read_picks(tmp_path)  # empty folder: no runs


def test_find_runs_pools_several_folders(make_dataset, tmp_path):
    from czii_kit.layout import find_runs

    r1, _, _ = make_dataset(runs=("TS_A", "TS_B"), root=tmp_path / "one")
    r2, _, _ = make_dataset(runs=("TS_C",), root=tmp_path / "two")
    runs = find_runs([r2, r1], "train")
    assert [r.name for r in runs] == ["TS_A", "TS_B", "TS_C"]
    assert find_runs([r1], "train")[0].dirs == find_runs(r1, "train")[0].dirs
    with pytest.raises(DataError, match="no dataset folder given"):
        find_runs([], "train")
    with pytest.raises(DataError, match="TS_A.*distinct names"):
        find_runs([r1, r1 / "train" / "static"], "train")
    with pytest.raises(DataError) as info:
        find_runs([r1, tmp_path / "missing"], "train")
    assert "missing" in str(info.value) and "no such file" in str(info.value)


def _write_v2_array(folder, vol, chunks, codec_config, separator="/", **meta):
    """A zarr-v2 float32 array written by hand (``.zarray`` and full-size chunk files, numcodecs): the layout
    of any zarr version's v2 writer, without depending on its API."""
    from numcodecs import get_codec

    folder.mkdir(parents=True)
    codec = get_codec(dict(codec_config)) if codec_config else None
    grid = [-(-n // c) for n, c in zip(vol.shape, chunks, strict=True)]
    for idx in np.ndindex(*grid):
        chunk = np.zeros(chunks, np.float32)  # edge chunks are stored whole, padded with the fill value
        part = vol[tuple(slice(i * c, (i + 1) * c) for i, c in zip(idx, chunks, strict=True))]
        chunk[tuple(slice(0, n) for n in part.shape)] = part
        file = folder / separator.join(map(str, idx))
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(bytes(codec.encode(chunk)) if codec else chunk.tobytes())
    doc = {"zarr_format": 2, "shape": list(vol.shape), "chunks": list(chunks), "dtype": "<f4", "order": "C",
           "fill_value": 0.0, "filters": None, "compressor": codec_config, "dimension_separator": separator, **meta}
    (folder / ".zarray").write_text(json.dumps(doc))
    return folder


@pytest.mark.parametrize("compressor, separator", [
    ({"id": "blosc", "cname": "lz4", "clevel": 5, "shuffle": 1, "blocksize": 0}, "/"),
    ({"id": "blosc", "cname": "zstd", "clevel": 3, "shuffle": 2, "blocksize": 0}, "."),
    ({"id": "zstd", "level": 1}, "/"),
    (None, "."),
])
def test_chunk_files_read_what_zarr_reads(tmp_path, compressor, separator):
    from czii_kit.tomogram import ChunkFiles, Tomogram
    from czii_kit.volumes import read_volume

    vol = np.random.default_rng(6).normal(size=(13, 37, 50)).astype(np.float32)
    folder = _write_v2_array(tmp_path / "a.zarr", vol, (5, 16, 20), compressor, separator)
    files = ChunkFiles.of(folder, vol.shape)
    assert files is not None and files.chunks == (5, 16, 20)
    arr = zarr.open_array(str(folder), mode="r")
    np.testing.assert_array_equal(arr[:], vol)  # zarr reads the hand-written array as written
    own, by_zarr = Tomogram(folder, "", 10.0, arr, files=files), Tomogram(folder, "", 10.0, arr)
    np.testing.assert_array_equal(read_volume(own), vol)
    for key in [(slice(None), slice(16, 32), slice(40, 50)), (slice(3, 11), slice(7, 30), slice(1, 49)),
                (slice(12, 13), slice(0, 37), slice(19, 21)), (slice(2, 2), slice(None), slice(None))]:
        out = np.full(vol[key].shape, np.nan, np.float32)
        assert files.read_into(out, key)
        np.testing.assert_array_equal(out, vol[key])
    # a missing chunk: left to zarr, which fills it with the fill value
    (folder / separator.join(["1", "1", "1"])).unlink()
    expect = vol.copy()
    expect[5:10, 16:32, 20:40] = 0.0
    np.testing.assert_array_equal(read_volume(own), expect)
    np.testing.assert_array_equal(read_volume(by_zarr), expect)


def test_chunk_files_leave_everything_but_the_plain_case_to_zarr(tmp_path):
    from czii_kit.tomogram import ChunkFiles

    vol = np.zeros((4, 6, 8), np.float32)
    blosc = {"id": "blosc", "cname": "lz4", "clevel": 5, "shuffle": 1, "blocksize": 0}
    assert ChunkFiles.of(_write_v2_array(tmp_path / "ok", vol, (2, 6, 8), blosc), vol.shape) is not None
    assert ChunkFiles.of(tmp_path / "ok", (4, 6, 9)) is None  # not the array's shape
    for name, meta in {"f": {"order": "F"}, "i2": {"dtype": "<i2"}, "be": {"dtype": ">f4"},
                       "filters": {"filters": [{"id": "delta", "dtype": "<f4"}]},
                       "codec": {"compressor": {"id": "no-such-codec"}}, "v3": {"zarr_format": 3}}.items():
        assert ChunkFiles.of(_write_v2_array(tmp_path / name, vol, (2, 6, 8), blosc, **meta), vol.shape) is None
    assert ChunkFiles.of(tmp_path / "nothing-here", vol.shape) is None
    # an uncompressed chunk file of the wrong size is an error naming the store
    from czii_kit.tomogram import Tomogram
    from czii_kit.volumes import read_volume

    raw = _write_v2_array(tmp_path / "raw", vol, (2, 6, 8), None, ".")
    (raw / "1.0.0").write_bytes(b"\0" * 100)
    t = Tomogram(raw, "", 10.0, zarr.open_array(str(raw), mode="r"), files=ChunkFiles.of(raw, vol.shape))
    with pytest.raises(DataError, match="cannot read voxels: chunk 1.0.0 holds 100 bytes"):
        read_volume(t)
    # what czii_kit writes, and opens, is read its own way
    path = write_tomogram(tmp_path / "t.zarr", np.ones((4, 6, 8), np.float32), 10.0, n_levels=1)
    assert open_tomogram(path).files is not None
