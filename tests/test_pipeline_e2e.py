"""Tiny dataset -> build-dataset -> 1-epoch training -> tune -> predict (3 backends) -> score, all offline.

Marked ``network_guard`` (tests/conftest.py): any socket connection to a non-loopback address fails
the test; DNS look-ups are refused and recorded here as well.
"""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
from pipeline_fixture import make_root

from czii_kit.errors import CziiKitError, DataError, FileExistsNoForce
from czii_kit.metric import score
from czii_kit.picks import read_picks
from czii_kit.submission import read_submission

pytestmark = pytest.mark.network_guard


@pytest.fixture
def no_dns(monkeypatch):
    lookups = []

    def getaddrinfo(host, *args, **kwargs):
        if host in ("localhost", "127.0.0.1", "::1", None):
            return real(host, *args, **kwargs)
        lookups.append(host)
        raise OSError(f"no_dns: test tried to resolve {host!r}")

    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield lookups
    assert not lookups, f"the pipeline tried to resolve host names: {lookups}"


@pytest.fixture
def offline_home(tmp_path, monkeypatch):
    """A private czii_kit cache so the test never depends on the user's ultralytics settings."""
    monkeypatch.setenv("CZII_KIT_HOME", str(tmp_path / "czii_home"))
    return tmp_path / "czii_home"


def test_offline_configuration(no_dns, offline_home):
    from czii_kit.offline import configure_offline

    cfg = configure_offline()
    import ultralytics.utils as uu
    from ultralytics.utils.checks import check_font

    assert uu.ONLINE is False and uu.SETTINGS["sync"] is False
    font = check_font("Arial.ttf")
    assert font is not None and font.is_file() and font.stat().st_size > 10_000
    assert (cfg / "Arial.Unicode.ttf").is_file()
    assert check_font("SomeMissingFont.ttf").is_file()  # unknown fonts fall back locally, no download


@pytest.mark.slow
def test_tiny_pipeline_offline(tmp_path, no_dns, offline_home, capsys):
    from czii_kit import infer
    from czii_kit.cli import main
    from czii_kit.infer import Detector, InferenceConfig
    from czii_kit.train import train
    from czii_kit.yolo_dataset import build_dataset

    root = tmp_path / "root"
    shape = (24, 64, 80)
    make_root(root, runs=("TS_a", "TS_b"), shape=shape, per_type=1, seed=11)
    solution = make_root(root, runs=("TS_t",), shape=shape, per_type=1, seed=12, split="test")

    data_yaml = build_dataset(root, tmp_path / "ds", val_runs=["TS_b"], z_stride=2, progress=False)
    out = tmp_path / "run"
    best = train(data_yaml, out, epochs=1, imgsz=96, batch=8, workers=0)
    assert best.is_file() and (out / "results.csv").is_file()
    assert any(out.glob("*.png")) or any(out.glob("*.jpg"))  # plots on, drawn with the local font
    record = json.loads((best.parent / "czii_kit_train.json").read_text())
    assert record["status"] == "finished" and record["versions"]["czii_kit"]
    assert record["preprocess"]["offsets"] == [-2, 0, 2] and record["dataset"]["val_runs"] == ["TS_b"]
    assert record["train_args"]["hsv_h"] == 0 and record["train_args"]["hsv_s"] == 0
    assert record["train_args"]["pretrained"] is False

    # the three backends agree on the raw boxes of one batch
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, size=(3, 64, 80, 3), dtype=np.uint8)
    cfg = InferenceConfig(conf=0.0005, max_det=50)
    boxes = {be: Detector(best, be, cfg, imgsz=96).detect(imgs) for be in ("torch", "onnx", "openvino")}
    for be in ("onnx", "openvino"):
        for a, b in zip(boxes["torch"], boxes[be], strict=True):
            if len(a) and len(b):
                np.testing.assert_allclose(a[0, 4], b[0, 4], atol=0.02)
    exported = infer.export_path(best, "openvino", 96, infer.export_batch("openvino", cfg))  # the streams' batch 1
    assert (exported / "czii_kit_export.json").is_file() and exported.parent.parent == infer.export_cache()
    assert not list(best.parent.glob("*openvino_model")) and not list(best.parent.glob("*.onnx"))  # none beside it
    # a tomogram written with the opposite sign is recognised and inverted back (polarity "auto")
    from czii_kit.bundle import ModelBundle
    from czii_kit.infer import detect_volume
    from czii_kit.tomogram import open_tomogram

    run_dir = root / "test" / "static" / "ExperimentRuns" / "TS_t" / "VoxelSpacing10.000"
    vol = open_tomogram(run_dir / "denoised.zarr").read()
    det = Detector(best, "torch", InferenceConfig(conf=0.001), imgsz=96)  # a 1-epoch model: low scores
    prep = ModelBundle(best).preprocess
    plain = detect_volume(det, vol, "TS_t", prep)
    with pytest.warns(UserWarning, match="looks bright"):
        flipped = detect_volume(det, np.float32(5000.0) - vol, "TS_t", prep)
    assert len(plain) > 0 and abs(len(flipped) - len(plain)) <= 0.1 * len(plain) + 2
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # polarity "dark": no inversion, no warning (and no low-pass)
        detect_volume(Detector(best, "torch", InferenceConfig(conf=0.001, polarity="dark", smooth=0), imgsz=96),
                      -vol, "TS_t", prep)

    # multi-label: boxes come back once per class passing the floor, so some positions carry two classes
    one = Detector(best, "torch", InferenceConfig(conf=0.001, max_det=2000), imgsz=96).detect(imgs)
    many = Detector(best, "torch", InferenceConfig(conf=0.001, max_det=2000, multi_label=True), imgsz=96).detect(imgs)
    for a, b in zip(one, many, strict=True):
        assert len(b) > len(a)
        _, n_cls = np.unique(b[:, :4].round(3), axis=0, return_counts=True)
        assert n_cls.max() >= 2

    # tune on the validation run, then predict the test split through the CLI
    rc = main(["tune", str(root), "--weights", str(best), "--quiet", "--per-type-merge"])
    assert rc == 0
    tuned = json.loads((best.parent / "czii_kit_thresholds.json").read_text())
    assert tuned["val_runs"] == ["TS_b"] and set(tuned["thresholds"]) >= {"ribosome", "apo-ferritin"}
    assert {row["name"] for row in tuned["comparison"]} >= {"greedy", "components"}
    assert {c["name"] for c in tuned["merge_per_type"].values()} <= {row["name"] for row in tuned["comparison"]}
    assert set(tuned["refine_comparison"]) == {"none", "refined"}  # refinement kept only where it pays
    assert (tuned["refine"] is not None) == (tuned["refine_comparison"]["refined"] > tuned["refine_comparison"]["none"])

    csv = tmp_path / "submission.csv"
    rc = main(["predict", str(root), "--split", "test", "--weights", str(best), "--out", str(csv),
               "--backend", "openvino", "--quiet"])
    assert rc == 0 and csv.is_file()
    sub = read_submission(csv)
    assert set(sub["experiment"]) <= {"TS_t"}
    result = score(read_picks(root, split="test"), sub)
    assert 0.0 <= result.final <= 1.0
    assert len(solution) >= 4
    capsys.readouterr()
    rc = main(["predict", str(root), "--split", "test", "--weights", str(best), "--out", str(csv), "--quiet"])
    assert rc == 2 and "already exists" in capsys.readouterr().err
    rc = main(["predict", str(root), "--split", "test", "--weights", str(best), "--out", str(csv),
               "--backend", "torch", "--force", "--quiet", "--no-refine", "--no-rescore"])
    assert rc == 0

    with pytest.raises(DataError, match="nothing to resume"):
        train(data_yaml, tmp_path / "empty_run", resume=True)
    with pytest.raises(CziiKitError, match="already finished"):
        train(data_yaml, out, resume=True)  # ultralytics would fall back to a downloadable dataset
    with pytest.raises(FileExistsNoForce):
        train(data_yaml, out, epochs=1)

    # fine-tuning from a .pt starts from its weights: with a zero learning rate the convolutions come back unchanged
    # (ultralytics rebuilds a fresh model when pretrained=False, which czii_kit sets for .yaml architectures only)
    import torch

    ft = train(data_yaml, tmp_path / "ft", model=best, epochs=1, imgsz=96, batch=8, workers=0, plots=False,
               optimizer="SGD", lr0=0.0, momentum=0.0, weight_decay=0.0)
    ft_record = json.loads((ft.parent / "czii_kit_train.json").read_text())
    ft_args = ft_record["train_args"]
    assert ft_args["pretrained"] is True and ft_args["warmup_bias_lr"] == 0.0
    # the base model's own record is kept, so a multi-stage model stays traceable
    assert ft_record["base_model"]["weights"] == str(best.absolute())
    assert ft_record["base_model"]["record"]["train_args"]["epochs"] == 1
    w0, w1 = (torch.load(w, map_location="cpu", weights_only=False)["model"].state_dict() for w in (best, ft))
    convs = [k for k in w0 if k.endswith("conv.weight")]
    assert len(convs) > 50 and all(torch.equal(w0[k], w1[k]) for k in convs)
    rc = main(["predict", str(root), "--weights", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x.csv")])
    assert rc == 2 and "missing.pt" in capsys.readouterr().err


def test_simulator_tiny_preset_pipeline(tmp_path, no_dns, offline_home):
    """The simulator's tiny preset (CTF, noise, WBP + denoising) through build -> train -> predict -> score."""
    synthetic = pytest.importorskip("czii_kit.synthetic")
    import pandas as pd

    from czii_kit.predict import predict_to_csv
    from czii_kit.train import train
    from czii_kit.yolo_dataset import build_dataset

    root = synthetic.generate_dataset(tmp_path / "sim", n_train=2, n_test=1, size="tiny", seed=0, progress=False)
    root = root if (root / "train").is_dir() else tmp_path / "sim"
    data_yaml = build_dataset(root, tmp_path / "ds", crop=64, crops_per_slice=1, z_stride=4, progress=False)
    best = train(data_yaml, tmp_path / "run", epochs=1, batch=8, workers=0, plots=False)
    assert json.loads((best.parent / "czii_kit_train.json").read_text())["imgsz"] == 64
    with pytest.warns(UserWarning, match="czii_kit_thresholds.json"):
        path, picks = predict_to_csv(root, tmp_path / "sub.csv", split="test", model=best, backend="openvino",
                                     z_stride=2, progress=False)
    sub = read_submission(path)
    assert len(sub) == len(picks)
    solution = pd.read_csv(root / "solution.csv")
    assert 0.0 <= score(solution, sub).final <= 1.0


def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    from czii_kit import bundle
    from czii_kit.cli import main

    monkeypatch.setattr(bundle, "MODELS_DIR", tmp_path / "no_models")
    make_root(tmp_path / "root", runs=("TS_a",), shape=(8, 48, 56), per_type=1, seed=0, split="test")
    rc = main(["predict", str(tmp_path / "root"), "--out", str(tmp_path / "s.csv")])
    err = capsys.readouterr().err
    assert rc == 2 and "--weights" in err and len(err.strip().splitlines()) == 1
    rc = main(["train", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "missing.yaml" in err
    rc = main(["build-dataset", str(tmp_path / "root"), "--split", "test", "--out", str(tmp_path / "ds"),
               "--tomogram", "wbp", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "wbp" in err
    assert not (tmp_path / "ds").exists() and not (tmp_path / "s.csv").exists()


def test_interrupted_training_resumes(tmp_path, no_dns, offline_home, monkeypatch):
    from czii_kit.offline import configure_offline
    from czii_kit.train import train
    from czii_kit.yolo_dataset import build_dataset

    make_root(tmp_path / "root", runs=("TS_a",), shape=(12, 64, 64), per_type=1, seed=4)
    data_yaml = build_dataset(tmp_path / "root", tmp_path / "ds", z_stride=2, progress=False)
    configure_offline()
    import ultralytics.engine.trainer as trainer_mod

    original = trainer_mod.BaseTrainer.save_model

    def save_then_crash(self):
        original(self)
        if self.epoch == 0:
            raise KeyboardInterrupt  # as if the job were killed after the first epoch

    monkeypatch.setattr(trainer_mod.BaseTrainer, "save_model", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(data_yaml, tmp_path / "run", epochs=2, imgsz=64, batch=8, workers=0, plots=False)
    record = json.loads((tmp_path / "run" / "weights" / "czii_kit_train.json").read_text())
    assert record["status"] == "running"
    monkeypatch.setattr(trainer_mod.BaseTrainer, "save_model", original)
    best = train(data_yaml, tmp_path / "run", resume=True)
    record = json.loads((best.parent / "czii_kit_train.json").read_text())
    assert record["status"] == "finished" and len(record["resumed"]) == 1
    import pandas as pd

    assert len(pd.read_csv(tmp_path / "run" / "results.csv")) == 2  # epoch 1 then the resumed epoch 2
