"""Bad inputs are refused or flagged in one line (issue 26): tomogram dtypes and voxels, --out paths,
points outside their tomogram, what `score` scores against, and quiet output."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import warnings

import numpy as np
import pandas as pd
import pytest
import zarr
from conftest import REPO_ROOT
from pipeline_fixture import make_root
from test_cli_foundation import assert_one_line_error, run_cli

from czii_kit.atomic import check_out_path
from czii_kit.errors import DataError, FileExistsNoForce
from czii_kit.layout import find_runs
from czii_kit.picks import run_extents, write_picks
from czii_kit.submission import read_submission, write_submission
from czii_kit.tomogram import NONFINITE_LIMIT, check_voxel_dtype, open_tomogram, write_tomogram
from czii_kit.volumes import read_volume


def replace_level0(store, data=None, shape=None, dtype=None):
    """Rewrite level ``0`` of a written tomogram with ``data`` (or an empty ``shape``/``dtype`` array)."""
    group = zarr.open_group(str(store), mode="a")
    shape = data.shape if data is not None else shape
    dtype = data.dtype if data is not None else dtype
    if hasattr(group, "create_array"):
        arr = group.create_array("0", shape=shape, dtype=dtype, overwrite=True)
    else:  # zarr 2
        arr = group.create_dataset("0", shape=shape, dtype=dtype, overwrite=True)
    if data is not None:
        arr[...] = data
    return store / "0"


def store_with(tmp_path, data, name="t"):
    store = write_tomogram(tmp_path / "VoxelSpacing10.000" / f"{name}.zarr", np.zeros((4, 6, 8), np.float32), 10.0,
                           n_levels=1)
    replace_level0(store, data)
    return store


# --------------------------------------------------------------------------- item 3: what cannot be a tomogram


@pytest.mark.parametrize("dtype, word", [("complex64", "complex"), ("bool", "boolean"), ("U4", "strings"),
                                         (str, "strings")])
def test_non_numeric_tomograms_are_refused_naming_the_store(tmp_path, dtype, word):
    data = np.ones((4, 6, 8)).astype(dtype) if dtype is not str else np.full((4, 6, 8), "x", object)
    if dtype is str:
        store = write_tomogram(tmp_path / "s.zarr", np.zeros((4, 6, 8), np.float32), 10.0, n_levels=1)
        group = zarr.open_group(str(store), mode="a")
        if not hasattr(group, "create_array"):
            pytest.skip("variable-length strings need zarr 3 here")
        group.create_array("0", shape=data.shape, dtype=str, overwrite=True)[...] = data
    else:
        store = store_with(tmp_path, data)
    with pytest.raises(DataError, match=rf"{store / '0'}: voxels are {word} .*not a tomogram"):
        open_tomogram(store)


def test_object_dtype_is_refused():
    with pytest.raises(DataError, match="x.zarr/0: voxels are Python objects"):
        check_voxel_dtype(np.dtype(object), "x.zarr/0")


@pytest.mark.parametrize("dtype", ["int16", "uint8", "float16", "float64"])
def test_integer_and_other_float_tomograms_are_cast_with_one_notice(tmp_path, dtype):
    vol = (np.arange(4 * 6 * 8).reshape(4, 6, 8) % 100).astype(dtype)
    store = store_with(tmp_path, vol, name=f"t_{dtype}")
    with pytest.warns(UserWarning, match=rf"t_{dtype}.zarr/0: voxels are {dtype}; read as float32"):
        t = open_tomogram(store)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per store
        again = open_tomogram(store)
    np.testing.assert_array_equal(t.read(), vol.astype(np.float32))
    assert read_volume(again).dtype == np.float32


@pytest.mark.parametrize("shape", [(2, 4, 6, 8), (6, 8)])
def test_level_that_is_not_3d_is_refused(tmp_path, shape):
    store = write_tomogram(tmp_path / "s.zarr", np.zeros((4, 6, 8), np.float32), 10.0, n_levels=1)
    replace_level0(store, np.zeros(shape, np.float32))
    with pytest.raises(DataError, match=rf"s.zarr/0: expected a 3D array \[z, y, x\], got shape {shape}".replace(
            "(", r"\(").replace(")", r"\)")):
        open_tomogram(store)


def test_a_few_non_finite_voxels_are_filled_more_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(10, 20, 30)).astype(np.float32)  # 6000 voxels
    few = vol.copy()
    few[1, 2, 3], few[4, 5, 6], few[7, 8, 9] = np.nan, np.inf, -np.inf
    store = write_tomogram(tmp_path / "few.zarr", vol, 10.0, n_levels=1, chunks=(4, 8, 8))
    replace_level0(store, few)
    tomo = open_tomogram(store)
    with pytest.warns(UserWarning, match=r"few.zarr/0: 3 NaN or infinite voxel\(s\) .* filled with the mean"):
        whole = read_volume(tomo)
    assert np.isfinite(whole).all()
    fill = vol[np.isfinite(few)].mean()
    assert whole[1, 2, 3] == pytest.approx(fill, abs=1e-5)
    np.testing.assert_array_equal(whole[np.isfinite(few)], vol[np.isfinite(few)])
    np.testing.assert_array_equal(tomo.read(), whole)  # Tomogram.read does the same

    many = vol.copy()
    many.reshape(-1)[: int(NONFINITE_LIMIT * vol.size) + 1] = np.nan
    bad = write_tomogram(tmp_path / "many.zarr", vol, 10.0, n_levels=1, chunks=(4, 8, 8))
    replace_level0(bad, many)
    for read in (read_volume, lambda t: t.read()):
        with pytest.raises(DataError, match=r"many.zarr/0: 7 of 6000 voxels \(0.12%\) are NaN or infinite"):
            read(open_tomogram(bad))


@pytest.mark.parametrize("dtype", ["complex64", "bool"])
def test_predict_refuses_complex_and_boolean_tomograms_without_writing(tmp_path, capsys, dtype):
    root = tmp_path / "root"
    make_root(root, runs=("TS_a",), shape=(16, 64, 64), split="test", with_picks=False)
    store = root / "test" / "static" / "ExperimentRuns" / "TS_a" / "VoxelSpacing10.000" / "denoised.zarr"
    replace_level0(store, np.ones((16, 64, 64), dtype))
    out = tmp_path / "sub.csv"
    code, _, err = run_cli(capsys, "predict", root, "--out", out, "--backend", "torch", "--quiet")
    assert_one_line_error(code, err, store / "0", dtype)
    assert not out.exists()


# --------------------------------------------------------------------------- item 3: points outside the tomogram


@pytest.fixture
def outside(make_dataset, tmp_path):
    """A dataset (16 x 32 x 48 voxels of 10.01 Å) and its picks with 2 points far outside, 1 just outside."""
    root, _, picks = make_dataset(runs=("TS_A",))
    extra = pd.DataFrame([("TS_A", "ribosome", 1e30, 10.0, 10.0),  # absurd
                          ("TS_A", "ribosome", 100.0, 100.0, 160.0 + 2 * 150.0 + 10),  # 2 radii past z
                          ("TS_A", "ribosome", 490.0, 100.0, 80.0)],  # x past 480 Å by less than 150 Å
                         columns=picks.columns)
    return root, picks, pd.concat([picks, extra], ignore_index=True)


def test_score_and_read_submission_count_points_outside_once(outside, tmp_path, capsys):
    root, _, table = outside
    sub = write_submission(table, tmp_path / "sub.csv")
    code, out, err = run_cli(capsys, "score", root, sub)
    assert code == 0, err
    warned = [ln for ln in err.splitlines() if "outside their tomogram" in ln]
    assert len(warned) == 1 and warned[0].startswith(f"czii-kit score: warning: {sub}: 2 point(s) lie outside")
    with pytest.warns(UserWarning, match=r"sub.csv: 2 point\(s\) lie outside their tomogram"):
        read_submission(sub, run_extents(find_runs(root)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_submission(sub)  # no extents, no check
    bad = tmp_path / "inf.csv"
    bad.write_text("id,experiment,particle_type,x,y,z\n0,TS_A,ribosome,1,2,inf\n")
    code, _, err = run_cli(capsys, "score", root, bad)
    assert_one_line_error(code, err, bad, "NaN or infinite")  # non-finite: still an error


def test_info_counts_picks_outside(outside, capsys):
    root, _, table = outside
    write_picks(table, root / "train" / "overlay", overwrite=True)
    code, out, err = run_cli(capsys, "info", root)
    assert code == 0 and "1 run(s)" in out
    assert err.count("2 point(s) lie outside their tomogram") == 1 and err.count("\n") == 1, err


# --------------------------------------------------------------------------- item 4: --out checked first


def test_check_out_path(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file.csv").write_text("x")
    for force in (False, True):
        with pytest.raises(DataError, match="dir: is a folder; --out must name a file"):
            check_out_path(tmp_path / "dir", force)
    with pytest.raises(FileExistsNoForce):
        check_out_path(tmp_path / "file.csv")
    assert check_out_path(tmp_path / "file.csv", force=True) == tmp_path / "file.csv"
    with pytest.raises(DataError, match="file.csv is a file, not a folder"):
        check_out_path(tmp_path / "file.csv" / "sub.csv", force=True)
    with pytest.raises(DataError, match="is a file; --out must name a folder"):
        check_out_path(tmp_path / "file.csv", force=True, folder=True)
    assert check_out_path(tmp_path / "dir", folder=True) == tmp_path / "dir"


def test_out_existing_folder_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    import czii_kit.baseline
    import czii_kit.demo
    import czii_kit.predict
    import czii_kit.tune

    def no_work(*a, **k):
        raise AssertionError("work started before --out was checked")

    for mod, name in [(czii_kit.predict, "predict_to_csv"), (czii_kit.tune, "tune"),
                      (czii_kit.baseline, "tune_baseline"), (czii_kit.demo, "_prepare")]:
        monkeypatch.setattr(mod, name, no_work)
    folder = tmp_path / "existing"
    folder.mkdir()
    t = time.perf_counter()
    code, _, err = run_cli(capsys, "predict", tmp_path, "--out", folder, "--force")
    assert_one_line_error(code, err, folder, "is a folder")
    assert time.perf_counter() - t < 5
    code, _, err = run_cli(capsys, "tune", tmp_path, "--weights", tmp_path / "w.pt", "--out", folder, "--force")
    assert_one_line_error(code, err, folder, "is a folder")
    code, _, err = run_cli(capsys, "baseline", tmp_path, "--tune-root", tmp_path, "--out", folder)
    assert_one_line_error(code, err, folder, "is a folder")
    a_file = tmp_path / "demo.txt"
    a_file.write_text("mine")
    code, _, err = run_cli(capsys, "demo", "--out", a_file, "--force")
    assert_one_line_error(code, err, a_file, "is a file; --out must name a folder")
    assert a_file.read_text() == "mine"


# --------------------------------------------------------------------------- item 5: what score scores against


@pytest.fixture
def synthetic_like(make_dataset, tmp_path):
    """Train runs with picks, a test run without, its ground truth in ROOT/solution.csv (as `synth` writes)."""
    root, _, _ = make_dataset(runs=("TS_A",))
    _, _, test_picks = make_dataset(runs=("TS_T",), split="test", root=root, seed=4)
    shutil.rmtree(root / "test" / "overlay")
    test_picks.to_csv(root / "solution.csv", index=False)
    sub = write_submission(test_picks, tmp_path / "submission.csv")
    return root, test_picks, sub


def test_score_root_uses_its_solution_csv_and_says_so(synthetic_like, capsys):
    root, picks, sub = synthetic_like
    code, out, err = run_cli(capsys, "score", root, sub)
    assert code == 0, err
    assert out.splitlines()[0] == f"scored against {root / 'solution.csv'} (test split)"
    assert out.split("final (weighted F4)")[1].split()[0] == "1.0000"
    code, out, _ = run_cli(capsys, "score", root, sub, "--json")
    assert json.loads(out)["reference"] == f"{root / 'solution.csv'} (test split)"
    # --split train: the train picks, which the submission does not match: exit 2, naming solution.csv
    code, _, err = run_cli(capsys, "score", root, sub, "--split", "train")
    assert_one_line_error(code, err, sub, "match none", "solution.csv exists: drop --split train")


def test_score_picks_reference_is_named(make_dataset, tmp_path, capsys):
    root, _, picks = make_dataset(runs=("TS_A", "TS_B"))
    sub = write_submission(picks, tmp_path / "s.csv")
    code, out, _ = run_cli(capsys, "score", root, sub)
    assert code == 0 and out.splitlines()[0] == f"scored against 12 picks file(s) under {root} (split train)"


def test_score_swapped_arguments_and_unmatched_experiments(synthetic_like, tmp_path, capsys):
    root, picks, sub = synthetic_like
    code, _, err = run_cli(capsys, "score", sub, root)
    assert_one_line_error(code, err, sub, "arguments look swapped", "czii-kit score SOLUTION SUBMISSION")
    other = write_submission(picks.assign(experiment="TS_X"), tmp_path / "other.csv")
    code, _, err = run_cli(capsys, "score", root, other)
    assert_one_line_error(code, err, other, "its experiments (TS_X) match none of the reference's")
    sol = tmp_path / "sol.csv"
    picks.to_csv(sol, index=False)
    code, _, err = run_cli(capsys, "score", sol, other)
    assert_one_line_error(code, err, "match none")


def test_score_reports_a_missing_field_as_missing(synthetic_like, tmp_path, capsys):
    root, _, sub = synthetic_like
    sol = tmp_path / "sol.csv"
    sol.write_text("experiment,particle_type,x,y,z\nTS_T,ribosome,1,,3\n")
    code, _, err = run_cli(capsys, "score", sol, sub)
    assert_one_line_error(code, err, sol, "row 0 (line 2): field 'y' is missing")
    bad = tmp_path / "bad.csv"
    bad.write_text("id,experiment,particle_type,x,y,z\n0,TS_T,ribosome,1,2\n")
    code, _, err = run_cli(capsys, "score", root, bad)
    assert_one_line_error(code, err, bad, "row 0 (line 2): field 'z' is missing")
    assert "NaN" not in err


# --------------------------------------------------------------------------- item 6: quiet, tidy output


def test_predict_output_has_no_banners_and_one_line_warnings(tmp_path):
    """A fresh czii_kit cache (ultralytics settings created there): no banner, no Loading / LATENCY lines;
    each warning once on one line; none at all with --quiet."""
    root = tmp_path / "root"
    make_root(root, runs=("TS_a",), shape=(16, 64, 64), split="test", with_picks=False)
    backend = "openvino" if importlib.util.find_spec("openvino") else "torch"
    env = {k: v for k, v in os.environ.items() if k not in ("YOLO_CONFIG_DIR", "YOLO_VERBOSE")}
    env.update(PYTHONPATH=str(REPO_ROOT), CZII_KIT_HOME=str(tmp_path / "home"))
    runs = {}
    for quiet in (False, True):
        argv = [sys.executable, "-m", "czii_kit", "predict", str(root), "--out", str(tmp_path / f"{quiet}.csv"),
                "--backend", backend] + (["--quiet"] if quiet else [])
        runs[quiet] = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
        assert runs[quiet].returncode == 0, runs[quiet].stderr
    assert list((tmp_path / "home" / "ultralytics").rglob("settings.json"))  # in czii_kit's cache folder
    for r in runs.values():
        both = r.stdout + r.stderr
        for banner in ("Creating new Ultralytics Settings", "Loading ", "LATENCY", "UserWarning", "Traceback"):
            assert banner not in both, both
    warned = [ln for ln in runs[False].stderr.replace("\r", "\n").splitlines() if "warning:" in ln]
    assert warned and all(ln.strip().startswith("czii-kit predict: warning: ") for ln in warned)
    assert len(set(warned)) == len(warned)
    quiet = runs[True]
    assert "wrote" in quiet.stdout and "warning" not in quiet.stderr and "detect" not in quiet.stderr, quiet.stderr
