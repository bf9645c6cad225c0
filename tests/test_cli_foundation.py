"""``czii-kit info`` and ``czii-kit score``: output, JSON, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT

from czii_kit.cli import main
from czii_kit.picks import read_picks
from czii_kit.submission import to_submission, write_submission


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert str(n) in lines[0], lines[0]


# --------------------------------------------------------------------------- info


def test_info_lists_runs_tomograms_and_picks(make_dataset, capsys):
    root, _, picks = make_dataset(runs=("TS_A", "TS_B"))
    code, out, err = run_cli(capsys, "info", root)
    assert code == 0, err
    assert "2 run(s)" in out
    tomo_lines = [ln for ln in out.splitlines() if "denoised" in ln]
    assert len(tomo_lines) == 2 and tomo_lines[0].startswith("TS_A")
    assert "10.0124" in tomo_lines[0]
    assert "0: 16x32x48" in tomo_lines[0] and "1: 8x16x24" in tomo_lines[0] and "2: 4x8x12" in tomo_lines[0]
    total = [ln for ln in out.splitlines() if ln.startswith("total")][0].split()
    assert total[1:] == ["6", "6", "6", "6", "6", "6", "36"]  # 3 per type and run


def test_info_json(make_dataset, capsys):
    root, _, _ = make_dataset(runs=("TS_A",))
    code, out, _ = run_cli(capsys, "info", root / "train" / "static", "--json")
    assert code == 0
    info = json.loads(out)
    (run,) = info["runs"]
    assert run["name"] == "TS_A" and run["split"] == "train"
    levels = run["tomograms"]["denoised"]
    assert [lv["shape"] for lv in levels] == [[16, 32, 48], [8, 16, 24], [4, 8, 12]]
    assert levels[0]["voxel_size"] == pytest.approx(10.012444)
    assert sum(run["picks"].values()) == 0  # the static root holds no picks
    code, out, _ = run_cli(capsys, "info", root, "--split", "train", "--json")
    assert sum(json.loads(out)["picks_total"].values()) == 18


def test_info_on_one_tomogram(make_dataset, capsys):
    root, _, _ = make_dataset(runs=("TS_A",))
    tomo = root / "train" / "static" / "ExperimentRuns" / "TS_A" / "VoxelSpacing10.000" / "denoised.zarr"
    code, out, _ = run_cli(capsys, "info", tomo)
    assert code == 0
    assert "level 1: 8x16x24 (z,y,x) float32, 20.0249 Å/voxel" in out
    code, out, _ = run_cli(capsys, "info", tomo, "--json")
    assert [lv["shape"] for lv in json.loads(out)["levels"]] == [[16, 32, 48], [8, 16, 24], [4, 8, 12]]
    code, _, err = run_cli(capsys, "info", tomo.with_name("wbp.zarr"))
    assert_one_line_error(code, err, "wbp.zarr", "no such zarr group")


def test_info_reports_smoothness(make_dataset, capsys):
    from scipy.ndimage import gaussian_filter

    from czii_kit.preprocess import neighbour_correlation, smoothing_sigma, unevenness

    root, volumes, _ = make_dataset(runs=("TS_A",))
    vol = volumes["TS_A"]  # white noise: auto would low-pass it
    code, out, _ = run_cli(capsys, "info", root, "--smoothness", "--json")
    assert code == 0
    s = json.loads(out)["runs"][0]["smoothness"]["denoised"]
    assert s["neighbour_correlation"] == pytest.approx(neighbour_correlation(vol), abs=1e-4)
    assert s["auto_sigma"] == smoothing_sigma(vol) > 0
    assert s["tilt_axis"] == "y" and s["wedge_ratio"] == 1.0  # too small a volume to tell
    assert s["unevenness"] == pytest.approx(unevenness(vol), abs=1e-4) and s["unevenness"] < 0.1
    assert s["flatten"] is False
    code, out, _ = run_cli(capsys, "info", root, "--smoothness")
    row = [ln for ln in out.splitlines() if ln.startswith("TS_A") and "denoised" in ln and "x" not in ln.split()[-1]]
    assert "x-corr" in out and row and float(row[-1].split()[-1]) == s["auto_sigma"]
    code, out, _ = run_cli(capsys, "info", root)
    assert "x-corr" not in out and "smoothness" not in json.loads(run_cli(capsys, "info", root, "--json")[1])["runs"][0]
    # one tomogram; a smooth one needs no low-pass
    tomo = root / "train" / "static" / "ExperimentRuns" / "TS_A" / "VoxelSpacing10.000" / "denoised.zarr"
    smooth_root, _, _ = make_dataset(runs=("TS_S",), root=root.parent / "smooth")
    smooth_tomo = smooth_root / "train" / "static" / "ExperimentRuns" / "TS_S" / "VoxelSpacing10.000" / "denoised.zarr"
    from czii_kit.tomogram import write_tomogram

    shutil.rmtree(smooth_tomo)
    write_tomogram(smooth_tomo, gaussian_filter(vol, 5.0), 10.012444, chunks=(8, 16, 16))
    code, out, _ = run_cli(capsys, "info", smooth_tomo, "--smoothness", "--json")
    smooth_doc = json.loads(out)["smoothness"]
    assert smooth_doc["auto_sigma"] == 0 and smooth_doc["auto_sharpen"] > 0  # sigma 5: over-smoothed
    assert s["auto_sharpen"] == 0  # the noisy one is low-passed, not sharpened
    code, out, _ = run_cli(capsys, "info", tomo, "--smoothness")
    assert f"auto low-pass sigma {s['auto_sigma']:g} voxels" in out
    assert f"background unevenness {s['unevenness']:.3f}: not flattened by --flatten auto" in out


def test_info_reports_uneven_background(make_dataset, capsys):
    """A tomogram with a strong lateral ramp (brighter towards high x; unequal sides) is reported
    as one that predict --flatten auto would flatten; the same without the ramp is not."""
    from czii_kit.tomogram import write_tomogram

    root, volumes, _ = make_dataset(runs=("TS_R",))
    vol = volumes["TS_R"]  # [z, y, x], unequal sides
    span = np.percentile(vol, 99.5) - np.percentile(vol, 0.5)
    ramp = np.linspace(-1.5, 1.5, vol.shape[2], dtype=np.float32)[None, None, :] * span
    tomo = root / "train" / "static" / "ExperimentRuns" / "TS_R" / "VoxelSpacing10.000" / "denoised.zarr"
    shutil.rmtree(tomo)
    write_tomogram(tomo, vol + ramp, 10.012444, chunks=(8, 16, 16))
    code, out, _ = run_cli(capsys, "info", root, "--smoothness", "--json")
    s = json.loads(out)["runs"][0]["smoothness"]["denoised"]
    assert code == 0 and s["unevenness"] > 0.1 and s["flatten"] is True
    code, out, _ = run_cli(capsys, "info", root, "--smoothness")
    row = next(ln for ln in out.splitlines() if ln.startswith("TS_R") and "denoised" in ln and "yes" in ln.split())
    assert f"{s['unevenness']:.3f}" in row.split()


def test_info_on_the_real_picks(train_picks_dir, capsys):
    code, out, _ = run_cli(capsys, "info", train_picks_dir)
    assert code == 0
    assert "7 run(s)" in out and "no tomograms" in out
    assert [ln for ln in out.splitlines() if ln.startswith("TS_73_6")][0].split()[1:] == [
        "95", "12", "14", "46", "28", "22", "217"]
    assert [ln for ln in out.splitlines() if ln.startswith("total")][0].split()[-1] == "1269"


def test_info_errors(make_dataset, tmp_path, capsys):
    code, _, err = run_cli(capsys, "info", tmp_path / "nowhere")
    assert_one_line_error(code, err, "czii-kit info: error:", tmp_path / "nowhere", "no such file")
    root, _, _ = make_dataset(runs=("TS_A",))
    bad = root / "train" / "overlay" / "ExperimentRuns" / "TS_A" / "Picks" / "ribosome.json"
    bad.write_text("{broken")
    code, _, err = run_cli(capsys, "info", root)
    assert_one_line_error(code, err, bad, "not valid JSON")
    bad.unlink()
    tomo = root / "train" / "static" / "ExperimentRuns" / "TS_A" / "VoxelSpacing10.000" / "denoised.zarr"
    shutil.rmtree(tomo / "2")
    code, _, err = run_cli(capsys, "info", root)
    assert_one_line_error(code, err, tomo / "2", "cannot open zarr array")


# --------------------------------------------------------------------------- score


@pytest.fixture
def scored_dataset(make_dataset, tmp_path):
    root, _, picks = make_dataset(runs=("TS_A", "TS_B"))
    sub = picks[picks.particle_type != "thyroglobulin"]  # thyroglobulin all missed
    path = write_submission(sub, tmp_path / "submission.csv")
    return root, picks, path


def test_score_table_and_json(scored_dataset, capsys):
    root, picks, sub = scored_dataset
    code, out, err = run_cli(capsys, "score", root, sub)
    assert code == 0, err
    thy = [ln for ln in out.splitlines() if ln.startswith("thyroglobulin")][0].split()
    assert thy[1:5] == ["2", "0", "0", "6"]  # weight, TP, FP, FN
    assert "final (weighted F4)" in out and out.split("final (weighted F4)")[1].split()[0] == "0.7143"
    code, out, _ = run_cli(capsys, "score", root, sub, "--json")
    res = json.loads(out)
    assert res["final"] == pytest.approx(5 / 7)
    assert res["particles"]["thyroglobulin"] == {"tp": 0, "fp": 0, "fn": 6, "precision": 0.0, "recall": 0.0,
                                                 "f_beta": 0.0, "weight": 2.0}
    assert res["particles"]["ribosome"]["f_beta"] == 1.0
    assert res["n_solution"] == len(picks) and res["experiments"] == ["TS_A", "TS_B"]


def test_score_solution_as_csv_split_and_ignored_rows(scored_dataset, make_dataset, tmp_path, capsys):
    root, picks, sub = scored_dataset
    make_dataset(runs=("TS_T",), split="test", root=root, seed=4)
    sol_csv = tmp_path / "solution.csv"
    picks.to_csv(sol_csv, index=False)
    code, out, _ = run_cli(capsys, "score", sol_csv, sub, "--json")
    assert code == 0 and json.loads(out)["final"] == pytest.approx(5 / 7)
    # the test split's run is not in the submission: with the whole root its points are all missed
    code, out, _ = run_cli(capsys, "score", root, sub, "--json")
    assert json.loads(out)["final"] < 5 / 7
    code, out, _ = run_cli(capsys, "score", root, sub, "--split", "train", "--json")
    assert json.loads(out)["final"] == pytest.approx(5 / 7)
    # submission rows of runs absent from the solution are ignored, and said so
    code, out, _ = run_cli(capsys, "score", root / "train" / "overlay" / "ExperimentRuns" / "TS_A", sub)
    assert code == 0 and "were ignored" in out
    assert "final (weighted F4)" in out and out.split("final (weighted F4)")[1].split()[0] == "0.7143"


def test_score_picks_folder_as_submission(make_dataset, tmp_path, capsys):
    root, _, picks = make_dataset(runs=("TS_A", "TS_B"))
    code, out, _ = run_cli(capsys, "score", root, root / "train" / "overlay", "--json")
    assert code == 0
    res = json.loads(out)
    assert res["final"] == 1.0 and res["n_submission"] == len(picks) and res["n_ignored"] == 0


def test_score_real_picks_against_themselves(train_picks_dir, tmp_path, capsys):
    sub = write_submission(to_submission(read_picks(train_picks_dir)), tmp_path / "s.csv")
    code, out, _ = run_cli(capsys, "score", train_picks_dir, sub, "--json")
    assert code == 0 and json.loads(out)["final"] == 1.0


def test_score_errors(scored_dataset, tmp_path, capsys):
    root, _, sub = scored_dataset
    code, _, err = run_cli(capsys, "score", tmp_path / "none", sub)
    assert_one_line_error(code, err, "czii-kit score: error:", tmp_path / "none", "solution")
    code, _, err = run_cli(capsys, "score", root, tmp_path / "none.csv")
    assert_one_line_error(code, err, tmp_path / "none.csv", "submission")
    bad = tmp_path / "bad.csv"
    bad.write_text("id,experiment,particle_type,x,y,z\n0,TS_A,ribozome,1,2,3\n")
    code, _, err = run_cli(capsys, "score", root, bad)
    assert_one_line_error(code, err, bad, "unknown particle types ['ribozome']")
    bad.write_text("id,experiment,particle_type,x,y,z\n0,TS_A,ribosome,1,NaN,3\n")
    code, _, err = run_cli(capsys, "score", root, bad)
    assert_one_line_error(code, err, bad, "NaN")
    sol = tmp_path / "sol.csv"
    sol.write_text("experiment,particle_type,x,y\nTS_A,ribosome,1,2\n")
    code, _, err = run_cli(capsys, "score", sol, sub)
    assert_one_line_error(code, err, sol, "missing columns ['z']")
    sol.write_text("experiment,particle_type,x,y,z\nTS_A,ribosome,1,oops,3\n")
    code, _, err = run_cli(capsys, "score", sol, sub)
    assert_one_line_error(code, err, sol, "row 0", "'y'")
    empty = tmp_path / "empty_root" / "ExperimentRuns" / "TS_A" / "Picks"
    empty.mkdir(parents=True)
    code, _, err = run_cli(capsys, "score", tmp_path / "empty_root", sub)
    assert_one_line_error(code, err, "no reference picks")


def test_console_entry_point_reports_errors_in_one_line(tmp_path, train_picks_dir):
    """The real process: `python -m czii_kit`, no traceback, exit code 2 for a bad path."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    ok = subprocess.run([sys.executable, "-m", "czii_kit", "info", str(train_picks_dir)], capture_output=True,
                        text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "1269" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "czii_kit", "score", str(tmp_path / "x"), str(tmp_path / "y.csv")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "Traceback" not in bad.stderr


def test_multi_line_library_errors_print_on_one_line(monkeypatch, tmp_path, capsys):
    import czii_kit.cli.info as info_cmd
    from czii_kit.errors import DataError

    def broken(*args, **kwargs):
        raise DataError(tmp_path, "codec failed:\n  blosc said\n  something long")

    monkeypatch.setattr(info_cmd, "collect", broken)
    code, _, err = run_cli(capsys, "info", tmp_path)
    assert_one_line_error(code, err, "codec failed: blosc said something long")


def test_info_reports_the_sampled_tilt_range(make_dataset, capsys):
    """A tomogram reconstructed from tilts over about -55..+40° about y (noise given that missing wedge;
    unequal sides) reports those edges; plain noise reports none."""
    from czii_kit.tomogram import write_tomogram
    from czii_kit.wedge import Wedge, apply_wedge

    root, volumes, _ = make_dataset(runs=("TS_W",), shape=(64, 96, 192))
    tomo = root / "train" / "static" / "ExperimentRuns" / "TS_W" / "VoxelSpacing10.000" / "denoised.zarr"
    plain = run_cli(capsys, "info", tomo, "--smoothness", "--json")[1]
    assert json.loads(plain)["smoothness"]["sampled_wedge"] is None
    shutil.rmtree(tomo)
    write_tomogram(tomo, apply_wedge(volumes["TS_W"], Wedge(40.0, 55.0)), 10.012444, chunks=(16, 32, 32))
    code, out, _ = run_cli(capsys, "info", root, "--smoothness", "--json")
    w = json.loads(out)["runs"][0]["smoothness"]["denoised"]["sampled_wedge"]
    assert code == 0 and w["axis"] == "y"
    assert w["lo"] == pytest.approx(40, abs=3) and w["hi"] == pytest.approx(55, abs=3), w
    out = run_cli(capsys, "info", root, "--smoothness")[1]
    assert f"-{w['hi']:.0f}/+{w['lo']:.0f}° y" in out
    out = run_cli(capsys, "info", tomo, "--smoothness")[1]
    assert f"sampled directions -{w['hi']:.0f}/+{w['lo']:.0f}° y" in out
