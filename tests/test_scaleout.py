"""Predicting many runs on a Dask cluster (czii_kit.scaleout): the same CSV as serial, checkpoints that
resume, refused mismatches, a killed worker, one unreadable run among good ones."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import cloudpickle
import numpy as np
import pandas as pd
import pytest
from pipeline_fixture import make_root
from test_cli_foundation import assert_one_line_error, run_cli

import czii_kit.predict as predict_module
from czii_kit.bundle import MODELS_DIR
from czii_kit.errors import CziiKitError, DataError, FileExistsNoForce
from czii_kit.layout import select_runs
from czii_kit.predict import (
    RunJob,
    finish,
    make_plan,
    open_checkpoint,
    predict_on_worker,
    predict_to_csv,
)
from czii_kit.scaleout import (
    MANIFEST,
    Checkpoint,
    bench_workers,
    frame_from_npz,
    frame_to_npz,
    parts_dir,
    run_checkpointed,
    worker_layout,
)
from czii_kit.submission import write_submission

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers need not import this test file

RUNS = ("TS_a", "TS_b", "TS_c")
REPO = Path(__file__).resolve().parents[1]
BACKEND = "openvino" if importlib.util.find_spec("openvino") else "torch"
"""OpenVINO gives the same floats whatever the thread count; torch's CPU kernels do not, so with torch
the serial reference runs with the threads of a worker of a two-worker cluster."""
KW = {"split": "test", "backend": BACKEND}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three tiny test runs and their serial submission (shipped model, all stages): ``(root, CSV bytes of a
    fresh process, CSV bytes of this process)``."""
    if not (MODELS_DIR / "default.pt").is_file():
        pytest.skip("no model shipped")
    tmp = tmp_path_factory.mktemp("scaleout")
    root = tmp / "root"
    make_root(root, runs=RUNS, shape=(16, 64, 64), split="test", with_picks=False, seed=27)
    # the serial reference of the cluster runs comes from a fresh process, as a user's serial run does: in
    # the pytest process, after other test files (the in-process training of test_pipeline_e2e), the same
    # predict gave a few coordinates ~0.02 Å apart; what leaves that state behind is not found yet
    out = tmp / "serial.csv"
    code, err = fresh_cli("predict", root, "--out", out, "--split", "test", "--backend", BACKEND, "--quiet")
    assert code == 0, err
    assert set(pd.read_csv(out)["experiment"]) == set(RUNS) and not parts_dir(out).exists()
    local = tmp / "local.csv"  # the same in this process: the reference of the in-process resume
    import torch

    threads = torch.get_num_threads()
    if BACKEND == "torch":
        torch.set_num_threads(int(worker_layout(2, gpus=0)[0]["OMP_NUM_THREADS"]))
    try:
        predict_to_csv(root, local, progress=False, **KW)
    finally:
        torch.set_num_threads(threads)
    return root, out.read_bytes(), local.read_bytes()


def fresh_cli(*args) -> tuple[int, str]:
    """``czii-kit ARGS`` in a fresh Python process with this checkout first on the path: (exit code, stderr)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    if BACKEND == "torch":
        env["OMP_NUM_THREADS"] = worker_layout(2, gpus=0)[0]["OMP_NUM_THREADS"]
    proc = subprocess.run([sys.executable, "-m", "czii_kit", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)
    return proc.returncode, proc.stderr


@pytest.fixture(scope="module")
def client():
    """One local cluster of two worker processes for the module (a start costs seconds)."""
    pytest.importorskip("distributed")
    from czii_kit.scaleout import cluster

    with cluster(2) as c:
        yield c


def test_two_workers_write_the_serial_csv(data, client, tmp_path, capsys):
    root, serial, _ = data
    out = tmp_path / "w2.csv"
    predict_to_csv(root, out, client=client, progress=False, **KW)
    assert out.read_bytes() == serial
    assert not parts_dir(out).exists()  # removed once the CSV is written
    # a worker builds one plan and one set of loaded networks for all its runs
    kept = list(client.run(_cached).values())
    assert ["detectors", "plan"] in kept and all(k in ([], ["detectors", "plan"]) for k in kept), kept

    # the command line on a running cluster (--scheduler): the same code path, the same CSV
    cli_out = tmp_path / "cli.csv"
    code, _, err = run_cli(capsys, "predict", root, "--out", cli_out, "--scheduler", client.scheduler.address,
                           "--backend", BACKEND, "--quiet")
    assert code == 0, err
    assert cli_out.read_bytes() == serial


def _cached() -> list[str]:
    """What a worker process keeps (:func:`czii_kit.scaleout.process_cached`), by kind."""
    from czii_kit import scaleout

    return sorted(k[0] for k in scaleout._CACHE if isinstance(k, tuple))


class Interrupt(BaseException):
    """Stands for a job killed between runs (not an error a run could catch)."""


def test_an_interrupted_job_resumes_without_redoing_finished_runs(data, tmp_path, monkeypatch, capsys):
    root, _, serial = data  # in this process, like the interrupted and the resumed job
    out = tmp_path / "sub.csv"
    done = []
    real = predict_module.predict_run

    def dies_after_one(plan, run, *args, **kwargs):
        if done:
            raise Interrupt
        done.append(run.name)
        return real(plan, run, *args, **kwargs)

    monkeypatch.setattr(predict_module, "predict_run", dies_after_one)
    with pytest.raises(Interrupt):
        predict_to_csv(root, out, progress=False, **KW)
    parts = parts_dir(out)
    assert not out.exists() and sorted(p.name for p in parts.iterdir()) == sorted([MANIFEST, f"{done[0]}.npz"])

    # without --resume the parts are refused (before any work), with --force they are dropped
    with pytest.raises(FileExistsNoForce, match="--resume"):
        predict_to_csv(root, out, progress=False, **KW)

    redone = []

    def spy(plan, run, *args, **kwargs):
        redone.append(run.name)
        return real(plan, run, *args, **kwargs)

    monkeypatch.setattr(predict_module, "predict_run", spy)
    capsys.readouterr()
    predict_to_csv(root, out, resume=True, progress=True, **KW)
    assert sorted(redone) == sorted(set(RUNS) - set(done))  # the finished run is not computed again
    assert out.read_bytes() == serial and not parts.exists()
    err = capsys.readouterr().err
    assert "runs:" in err and "1/3" in err and "3/3" in err and "detect" not in err  # one bar over the runs


def test_resume_refuses_parts_made_with_other_weights_or_settings(data, tmp_path):
    root, _, _ = data
    plan = make_plan(None)
    folder = tmp_path / "sub.csv.parts"
    open_checkpoint(plan, folder, "auto", BACKEND).save("TS_a", pd.DataFrame({"x": [1.0]}))  # a finished run
    manifest = folder / MANIFEST
    doc = json.loads(manifest.read_text())
    assert doc["weights_sha256"] == plan.model.weights_sha256 and doc["weights"] == str(plan.model.weights)

    with pytest.raises(DataError, match=r"settings \(SHA-256\): [0-9a-f]{12}\.\.\. then") as exc:
        predict_to_csv(root, tmp_path / "sub.csv", resume=True, thresholds={"ribosome": 0.9}, **KW)
    assert str(manifest) in str(exc.value) and "weights" not in str(exc.value)

    manifest.write_text(json.dumps({**doc, "weights_sha256": "0" * 64}))
    with pytest.raises(DataError, match=r"weights \(SHA-256\): 000000000000\.\.\. then, [0-9a-f]{12}\.\.\. now") as exc:
        predict_to_csv(root, tmp_path / "sub.csv", resume=True, **KW)
    assert "settings" not in str(exc.value).split("other settings")[1]
    manifest.write_text(json.dumps({**doc, "backend": "onnx"}))
    with pytest.raises(DataError, match=f"backend: onnx then, {BACKEND} now"):
        predict_to_csv(root, tmp_path / "sub.csv", resume=True, **KW)


class KillOnce:
    """Work that kills its worker process (``os._exit``) the first time it runs, then does the real work."""

    def __init__(self, marker: Path, work):
        self.marker, self.work = marker, work

    def __call__(self, run):
        if not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            time.sleep(0.2)
            os._exit(1)
        return self.work(run)


def test_a_worker_killed_mid_task_still_gives_the_same_csv(data, client, tmp_path):
    root, serial, _ = data
    plan = make_plan(None)
    runs = select_runs(root, "test", None)
    before = set(client.scheduler_info()["workers"])
    work = KillOnce(tmp_path / "killed", partial(predict_on_worker, RunJob.of(plan, "auto", BACKEND, None, False)))
    job = run_checkpointed(runs, work, Checkpoint.open(tmp_path / "parts", {}), client, progress=False)
    assert (tmp_path / "killed").is_file() and not job.failed  # a worker died, its run was retried
    assert set(client.scheduler_info()["workers"]) != before  # ... on a worker started again
    out = write_submission(finish(plan, list(job.frames.values())), tmp_path / "sub.csv")
    assert out.read_bytes() == serial


def test_an_unreadable_run_fails_alone_and_the_others_are_kept(data, client, tmp_path, capsys):
    from test_bad_inputs import replace_level0

    root, serial, _ = data
    copy = tmp_path / "root"
    shutil.copytree(root, copy)
    store = copy / "test" / "static" / "ExperimentRuns" / "TS_b" / "VoxelSpacing10.000" / "denoised.zarr"
    good = tmp_path / "good.zarr"
    shutil.copytree(store, good)
    replace_level0(store, np.ones((16, 64, 64), "complex64"))
    out = tmp_path / "sub.csv"

    with pytest.raises(CziiKitError, match=r"1 of 3 run\(s\) failed .*--resume\): TS_b: .*denoised.zarr/0: .*complex64"):
        predict_to_csv(copy, out, client=client, progress=False, **KW)
    parts = parts_dir(out)
    assert sorted(p.name for p in parts.glob("*.npz")) == ["TS_a.npz", "TS_c.npz"] and not out.exists()

    # the command line (serial here): exit 2, one line naming the run; the finished runs are reused
    code, _, err = run_cli(capsys, "predict", copy, "--out", out, "--backend", BACKEND, "--quiet", "--resume")
    assert_one_line_error(code, err, "1 of 3 run(s) failed", "TS_b", store / "0", "complex64")

    shutil.rmtree(store)
    shutil.copytree(good, store)
    code, err = fresh_cli("predict", copy, "--out", out, "--backend", BACKEND, "--quiet", "--resume")
    assert code == 0, err
    assert out.read_bytes() == serial and not parts.exists()


def test_a_parts_folder_is_refused_on_the_command_line_unless_resume_or_force(data, tmp_path, capsys):
    root, _, _ = data
    out = tmp_path / "sub.csv"
    parts_dir(out).mkdir()
    (parts_dir(out) / "TS_a.npz").write_bytes(b"")
    code, _, err = run_cli(capsys, "predict", root, "--out", out, "--backend", BACKEND, "--quiet")
    assert_one_line_error(code, err, str(parts_dir(out)), "--resume", "--force")
    # a job stopped before any run finished left only its manifest: nothing to keep, no refusal
    empty = Checkpoint.open(tmp_path / "empty.parts", {"backend": "x"})
    assert Checkpoint.open(empty.folder, {"backend": "y"}).finished(["TS_a"]) == []
    for bad, says in ((["--workers", "2", "--scheduler", "tcp://x:1"], "not allowed with argument"),
                      (["--workers", "0"], "number of workers >= 1")):
        with pytest.raises(SystemExit) as exc:
            run_cli(capsys, "predict", root, "--out", out, *bad)
        assert exc.value.code == 2 and says in capsys.readouterr().err
    from czii_kit.cli import build_parser

    given = {v: build_parser().parse_args(["predict", "r", "--out", "x", *v]).workers
             for v in ((), ("--workers",), ("--workers", "auto"), ("--workers", "3"))}
    assert list(given.values()) == [False, None, None, 3]  # None: one per GPU (else one); False: no cluster


def test_parts_keep_every_value_and_dtype(tmp_path):
    frame = pd.DataFrame({"experiment": ["TS_a", "TS_b"], "x": [1 / 3, 2e-300], "s": np.float32([0.1, 0.7]),
                          "n": np.int64([3, -1]), "ok": [True, False]})
    for f in (frame, frame.iloc[:0]):
        frame_to_npz(f, tmp_path / "p.npz")
        back = frame_from_npz(tmp_path / "p.npz")
        pd.testing.assert_frame_equal(back, f.reset_index(drop=True))
        assert back.to_csv() == f.to_csv()
    (tmp_path / "bad.npz").write_bytes(b"no zip")
    with pytest.raises(DataError, match="bad.npz: not a readable part"):
        frame_from_npz(tmp_path / "bad.npz")


def test_worker_layout_shares_the_cores_and_pins_one_gpu_each():
    two = worker_layout(2, cores=2, gpus=0)
    assert [w["OMP_NUM_THREADS"] for w in two] == ["1", "1"] and "CUDA_VISIBLE_DEVICES" not in two[0]
    assert len({w["CZII_KIT_CORES"] for w in two}) == 2 or len(os.sched_getaffinity(0)) == 1
    assert [w["OMP_NUM_THREADS"] for w in worker_layout(1, cores=2, gpus=0)] == ["2"]
    assert [w["OMP_NUM_THREADS"] for w in worker_layout(3, cores=16, gpus=0)] == ["5"] * 3
    gpu = worker_layout(None, cores=16, gpus=2)
    assert [w["CUDA_VISIBLE_DEVICES"] for w in gpu] == ["0", "1"] and gpu[0]["OMP_NUM_THREADS"] == "8"
    assert len(worker_layout(None, cores=4, gpus=0)) == 1


def test_bench_workers_reports_throughput_ratio_and_projection():
    waits = {1: [0.2, 0.25], 2: [0.15, 0.1]}  # seconds of the runs in each round: the best counts
    calls = []

    def job(n):
        calls.append(n)
        return waits[n][calls.count(n) - 1], 1.5

    out = bench_workers(job, n_runs=4, run_voxels=184 * 630 * 630 // 1000, repeats=2)
    assert calls == [1, 2, 1, 2] and out["ratio"] == 0.5 and out["workers"]["1"]["start_s"] == 1.5
    assert out["workers"]["2"]["runs_per_hour"] == 4 * 3600 / 0.1
    assert out["hours_for_500"] == round(500 * 0.1 / 4 * 1000 / 3600, 2)  # full size: 1000 times the voxels


def test_synth_workers_is_the_deprecated_name_of_threads(capsys):
    from czii_kit.synthetic.dataset import threads_arg

    with pytest.warns(FutureWarning, match="now called 'threads'"):
        assert threads_arg(None, 3) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert threads_arg(2, None) == 2
    code, _, err = run_cli(capsys, "synth", "--bench", "--workers", "0")
    assert code == 2 and "--workers is deprecated" in err and "--threads must be >= 1, got 0" in err
