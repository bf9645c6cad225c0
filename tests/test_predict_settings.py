"""Which tuned settings predict uses: the file beside the weights, or one given with --thresholds."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from czii_kit.errors import DataError


@pytest.fixture(scope="module")
def tuned_copy(tmp_path_factory):
    """A small dataset and a copy of the shipped model with its thresholds, rescorer and templates."""
    from pipeline_fixture import shipped_model_copy

    from czii_kit.bundle import MODELS_DIR

    tmp = tmp_path_factory.mktemp("settings")
    root, run, weights = shipped_model_copy(tmp, seed=4251)
    for f in ("czii_kit_thresholds.json", "czii_kit_rescorer.pt", "czii_kit_templates.npz"):
        shutil.copy(MODELS_DIR / f, weights.parent)
    return root, weights


@pytest.mark.slow
def test_predict_reads_a_thresholds_file_of_its_own(tuned_copy, tmp_path, capsys):
    from czii_kit.cli import main
    from czii_kit.predict import predict
    from czii_kit.tune import THRESHOLDS_FILE

    root, weights = tuned_copy
    kw = {"split": "train", "model": weights, "backend": "torch", "progress": False}
    base = predict(root, **kw)
    assert (base["particle_type"] == "ribosome").any() and (base["particle_type"] != "ribosome").any()
    beside = weights.parent / THRESHOLDS_FILE
    doc = json.loads(beside.read_text())

    # the same settings elsewhere, none beside the weights: everything comes from the file given
    # (the rescorer and templates it names are still found beside the weights)
    own = tmp_path / "mine.json"
    own.write_text(json.dumps(doc))
    moved = tmp_path / "beside.json"
    shutil.move(beside, moved)
    try:
        pd.testing.assert_frame_equal(predict(root, settings=own, **kw), base)

        # a file tuned for other weights (by SHA-256) is used, with a warning naming it
        other = tmp_path / "other.json"
        other.write_text(json.dumps({**doc, "weights_sha256": "0" * 64, "weights": "best.pt"}))
        with pytest.warns(UserWarning, match=r"other.json: tuned for other weights \(best.pt"):
            pd.testing.assert_frame_equal(predict(root, settings=other, **kw), base)

        # its thresholds are the ones applied: no ribosome passes 1.0
        doc["rescore"]["thresholds"]["ribosome"] = 1.0
        strict = tmp_path / "strict.json"
        strict.write_text(json.dumps(doc))
        picks = predict(root, settings=strict, **kw)
        want = base[base["particle_type"] != "ribosome"].reset_index(drop=True)
        pd.testing.assert_frame_equal(picks.reset_index(drop=True), want)

        out = tmp_path / "sub.csv"
        rc = main(["predict", str(root), "--split", "train", "--weights", str(weights), "--backend", "torch",
                   "--thresholds", str(strict), "--out", str(out), "--quiet"])
        assert rc == 0
        assert len(pd.read_csv(out)) == len(want)
        capsys.readouterr()

        # a missing or malformed file: a one-line error naming it, nothing written
        with pytest.raises(DataError, match="no such settings file"):
            predict(root, settings=tmp_path / "none.json", **kw)
        bad = tmp_path / "bad.json"
        bad.write_text("[1, 2]")
        with pytest.raises(DataError, match="expected a JSON object of settings"):
            predict(root, settings=bad, **kw)
        rc = main(["predict", str(root), "--split", "train", "--weights", str(weights), "--thresholds",
                   str(tmp_path / "none.json"), "--out", str(tmp_path / "x.csv"), "--quiet"])
        err = capsys.readouterr().err
        assert rc != 0 and "none.json" in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "x.csv").exists()
    finally:
        shutil.move(moved, beside)


def test_tune_refuses_to_replace_an_out_file_without_force(tuned_copy, tmp_path, capsys):
    from czii_kit.cli import main

    root, weights = tuned_copy
    out = tmp_path / "mine.json"
    out.write_text("{}")
    rc = main(["tune", str(root), "--weights", str(weights), "--out", str(out), "--backend", "torch", "--quiet"])
    err = capsys.readouterr().err
    assert rc != 0 and "mine.json" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert out.read_text() == "{}"


@pytest.mark.slow
def test_predict_falls_back_to_another_tomogram_when_a_run_has_no_denoised_one(tuned_copy, tmp_path, capsys):
    from czii_kit.cli import main
    from czii_kit.layout import find_runs
    from czii_kit.predict import predict

    root, weights = tuned_copy
    kw = {"split": "train", "model": weights, "backend": "torch", "progress": False}
    (run,) = find_runs(root, "train")
    assert set(run.tomograms()) == {"denoised", "wbp"}
    # the default takes the denoised tomogram, silently
    pd.testing.assert_frame_equal(predict(root, **kw), predict(root, tomogram="denoised", **kw))

    # a copy whose run has only its WBP reconstruction: picked in that one, with a warning naming the run
    only_wbp = tmp_path / "only_wbp"
    shutil.copytree(root, only_wbp)
    (only,) = find_runs(only_wbp, "train")
    shutil.rmtree(only.tomogram_path("denoised"))
    with pytest.warns(UserWarning, match=rf"1 of 1 run\(s\) have no denoised tomogram.*{run.name}: wbp"):
        picks = predict(only_wbp, **kw)
    pd.testing.assert_frame_equal(picks, predict(root, tomogram="wbp", **kw))
    assert len(picks)
    with pytest.raises(DataError, match=r"no tomogram 'denoised' \(found: wbp\)"):
        predict(only_wbp, tomogram="denoised", **kw)

    out = tmp_path / "sub.csv"
    rc = main(["predict", str(only_wbp), "--split", "train", "--weights", str(weights), "--backend", "torch",
               "--out", str(out), "--quiet"])
    assert rc == 0 and len(pd.read_csv(out)) == len(picks)
    capsys.readouterr()


@pytest.mark.slow
def test_predict_resamples_tomograms_of_another_voxel_size(tuned_copy, tmp_path):
    from czii_kit.bundle import ModelBundle
    from czii_kit.coords import KAGGLE_VOXEL_SIZE
    from czii_kit.infer import InferenceConfig, iter_detect_runs
    from czii_kit.layout import find_runs
    from czii_kit.metric import score
    from czii_kit.picks import read_picks
    from czii_kit.predict import predict
    from czii_kit.preprocess import resample_to, resampled_shape
    from czii_kit.tomogram import open_tomogram, write_tomogram
    from czii_kit.volumes import read_volume

    root, weights = tuned_copy
    model = ModelBundle(weights)
    assert model.voxel_size == pytest.approx(KAGGLE_VOXEL_SIZE)
    kw = {"split": "train", "model": weights, "backend": "torch", "progress": False}
    truth = read_picks(root, split="train")
    base = score(truth, predict(root, **kw)).final

    # the same run written at 15 A voxels (the picks stay in A)
    coarse = tmp_path / "coarse"
    shutil.copytree(root, coarse)
    (run,) = find_runs(coarse, "train")
    path = run.tomogram_path("denoised")
    vol, vs = resample_to(read_volume(open_tomogram(path)), KAGGLE_VOXEL_SIZE, 15.0, warn=False)
    write_tomogram(path, vol, vs, overwrite=True)
    shutil.rmtree(run.tomogram_path("wbp"))
    with pytest.warns(UserWarning, match=r"voxel size 15 Å, the model.s is 10.0124 Å: resampled"):
        (done,) = list(iter_detect_runs(weights, [run], "denoised", "torch", InferenceConfig(), model.preprocess,
                                        model.voxel_size, progress=False))
    assert done.voxel_size == pytest.approx(KAGGLE_VOXEL_SIZE)
    assert done.volume.shape == resampled_shape(vol.shape, 15.0, KAGGLE_VOXEL_SIZE)
    with pytest.warns(UserWarning, match="resampled"):
        picks = predict(coarse, **kw)
    assert score(truth, picks).final >= base - 0.15, (score(truth, picks).final, base)
