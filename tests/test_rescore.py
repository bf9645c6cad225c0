"""The second-stage 3D rescorer: patches, labels, rescoring arithmetic, training, files."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from czii_kit.catalog import PARTICLE_NAMES, get_particle
from czii_kit.errors import DataError, FileExistsNoForce
from czii_kit.rescore import BACKGROUND, CLASSES, RescoreConfig, Rescorer, build_network, rescore_volume
from czii_kit.rescore_train import (
    STORE_SIZE,
    augment,
    background_points,
    label_points,
    save_patches,
    save_rescorer,
    train_rescorer,
)
from czii_kit.volumes import centre_crop, extract_patches, standardise

VS = 10.012444


def test_extract_patches_axis_order_and_edges():
    shape = (20, 30, 44)  # unequal sides: an axis swap changes what lands where
    vol = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    s, h = 8, 4
    p = extract_patches(vol, [(5, 7, 9), (0, 0, 43)], s)
    assert p.shape == (2, s, s, s)
    assert p[0, h, h, h] == vol[5, 7, 9]
    assert p[0, h, h, h + 1] == vol[5, 7, 10]  # last patch axis is x
    assert p[0, h + 1, h, h] == vol[6, 7, 9]  # first is z
    np.testing.assert_array_equal(p[0], vol[1:9, 3:11, 5:13])
    # beyond the volume the edge voxel repeats
    assert p[1, 0, 0, 0] == vol[0, 0, 39] and p[1, h, h, h] == vol[0, 0, 43]
    assert p[1, h, h, s - 1] == vol[0, 0, 43] and p[1, 0, 0, h] == vol[0, 0, 43]


def test_standardise_and_crops():
    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 3.0, (4, 36, 36, 36)).astype(np.float32)
    z = standardise(centre_crop(x))
    assert z.shape == (4, 32, 32, 32)
    np.testing.assert_allclose(z.mean((1, 2, 3)), 0, atol=1e-4)
    np.testing.assert_allclose(z.std((1, 2, 3)), 1, atol=1e-3)
    np.testing.assert_array_equal(centre_crop(x)[:, 0, 0, 0], x[:, 2, 2, 2])
    a = augment(x, np.random.default_rng(1))
    assert a.shape == (4, 32, 32, 32) and a.dtype == np.float32
    np.testing.assert_array_equal(a, augment(x, np.random.default_rng(1)))  # same seed, same augmentation


def test_label_points_uses_the_hit_radius_of_the_reference_type():
    r_ribo = get_particle("ribosome").radius
    sol = pd.DataFrame({"experiment": ["TS_A", "TS_A", "TS_B"],
                        "particle_type": ["ribosome", "apo-ferritin", "ribosome"],
                        "x": [1000.0, 4000.0, 1000.0], "y": [1000.0, 4000.0, 1000.0], "z": [500.0, 500.0, 500.0]})
    pts = [(1000, 1000, 500), (1000 + 0.49 * r_ribo, 1000, 500), (1000 + 0.51 * r_ribo, 1000, 500),
           (4000, 4000, 500 + 10), (2500, 2500, 500)]
    lab = label_points(pts, "TS_A", sol)
    ribo, apo = PARTICLE_NAMES.index("ribosome"), PARTICLE_NAMES.index("apo-ferritin")
    assert lab.tolist() == [ribo, ribo, BACKGROUND, apo, BACKGROUND]
    assert (label_points(pts, "TS_C", sol) == BACKGROUND).all()  # other runs' references do not count


def test_background_points_stay_away_from_references():
    rng = np.random.default_rng(0)
    ref = np.array([[8.0, 20.0, 30.0], [10.0, 10.0, 10.0]])
    pts = background_points((20, 40, 60), ref, 50, rng, min_distance=6.0)
    assert pts.shape == (50, 3)
    d = np.linalg.norm(pts[:, None, :] - ref[None], axis=2).min(1)
    assert (d >= 6.0 - 0.87).all()  # rounding to a voxel moves a point by <= sqrt(3)/2
    assert (pts >= 0).all() and (pts < [20, 40, 60]).all()


@pytest.fixture
def random_rescorer(tmp_path):
    import torch

    torch.manual_seed(0)
    path = save_rescorer(build_network(), tmp_path / "r.pt", {"note": "random"})
    return Rescorer(path)


def test_rescore_volume_mixes_scores_and_shares_patches(random_rescorer):
    rng = np.random.default_rng(0)
    vol = rng.random((40, 50, 64)).astype(np.float32)
    xyz = np.array([[300.0, 250.0, 200.0], [300.0, 250.0, 200.0], [100.0, 400.0, 150.0]])
    cands = pd.DataFrame({"experiment": "TS_A", "particle_type": ["ribosome", "thyroglobulin", "ribosome"],
                          "x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2], "score": [0.8, 0.3, 0.5]})
    out = rescore_volume(cands, vol, VS, random_rescorer, RescoreConfig(mix=0.5))
    assert {"det_score", "p_type", "p_background"} <= set(out.columns)
    assert len(out) == 3
    np.testing.assert_allclose(sorted(out["det_score"]), sorted(cands["score"]))
    np.testing.assert_allclose(out["score"], np.sqrt(out["det_score"] * out["p_type"]))
    # the two candidates at one place share one patch: same background probability, own type's probability
    ribo = out[(out["particle_type"] == "ribosome") & (out["x"] == 300.0)].iloc[0]
    thyro = out[out["particle_type"] == "thyroglobulin"].iloc[0]
    assert ribo["p_background"] == thyro["p_background"]
    patch = extract_patches(vol, [[20, 25, 30]], 32)  # z=200/VS, y=250/VS, x=300/VS rounded
    probs = random_rescorer.predict_proba(patch)[0]
    assert ribo["p_type"] == pytest.approx(probs[CLASSES.index("ribosome")])
    assert thyro["p_type"] == pytest.approx(probs[CLASSES.index("thyroglobulin")])
    only_rescorer = rescore_volume(cands, vol, VS, random_rescorer, RescoreConfig(mix=1.0))
    np.testing.assert_allclose(only_rescorer["score"], only_rescorer["p_type"])
    tta = random_rescorer.predict_proba(patch, tta=True)
    assert tta.shape == (1, len(CLASSES)) and tta.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        RescoreConfig(mix=1.5)


def test_cross_type_proposals(random_rescorer):
    from czii_kit.rescore import combine_scores

    rng = np.random.default_rng(1)
    vol = rng.random((40, 50, 64)).astype(np.float32)
    # two candidates at one place (ribosome 0.8, thyroglobulin 0.3) and one VLP far away
    cands = pd.DataFrame({"experiment": "TS_A", "particle_type": ["ribosome", "thyroglobulin", "virus-like-particle"],
                          "x": [300.0, 300.0, 100.0], "y": [250.0, 250.0, 400.0], "z": [200.0, 200.0, 150.0],
                          "score": [0.8, 0.3, 0.5]})
    cfg = RescoreConfig(mix=0.75, cross_type=True)
    raw = rescore_volume(cands, vol, VS, random_rescorer, cfg, raw=True)
    assert len(raw) == 3 + 4 + 5 and raw["proposed"].sum() == 9
    at_first = raw[raw["x"] == 300.0]
    assert sorted(at_first["particle_type"]) == sorted(PARTICLE_NAMES)
    assert (at_first.loc[at_first["proposed"], "det_score"] == 0.8).all()  # the location's best detector score
    probs = random_rescorer.predict_proba(extract_patches(vol, [[20, 25, 30]], 32))[0]
    for _, row in at_first.iterrows():
        assert row["p_type"] == pytest.approx(probs[CLASSES.index(row["particle_type"])])
    out = combine_scores(raw, cfg)
    np.testing.assert_allclose(out["score"], out["det_score"] ** 0.25 * out["p_type"] ** 0.75)
    assert len(out) == 12  # the two places are far apart: NMS keeps one candidate per type and place
    plain = combine_scores(raw, RescoreConfig(mix=0.75))
    assert len(plain) == 3 and not plain["proposed"].any()
    # NMS among one type: a proposal next to a better-scoring candidate of that type goes
    near = pd.concat([cands, cands.iloc[[0]].assign(x=310.0, score=0.9)], ignore_index=True)
    kept = rescore_volume(near, vol, VS, random_rescorer, cfg)
    assert (kept["particle_type"] == "ribosome").sum() == 2  # x=300/310 within 0.8 r: one kept, plus the VLP place
    assert not kept.duplicated(["particle_type", "x", "y", "z"]).any()


def test_bad_rescorer_file_names_the_file(tmp_path):
    bad = tmp_path / "czii_kit_rescorer.pt"
    bad.write_text("not a network")
    with pytest.raises(DataError, match="czii_kit_rescorer.pt"):
        Rescorer(bad)
    with pytest.raises(DataError, match="no such"):
        Rescorer(tmp_path / "missing.pt")
    from czii_kit.rescore_train import load_patches

    bad_patches = tmp_path / "patches.npz"
    bad_patches.write_text("not an archive")
    with pytest.raises(DataError, match="patches.npz: not a czii_kit patch file"):
        load_patches(bad_patches)
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(DataError, match="other.npz: not a czii_kit patch file"):
        load_patches(tmp_path / "other.npz")


def _blob_patches(n, rng, radius=5.0):
    """Half dark spheres (label 0) and half plain noise (background), side 36."""
    g = np.indices((STORE_SIZE,) * 3) - STORE_SIZE / 2
    sphere = (np.sqrt((g**2).sum(0)) <= radius).astype(np.float32)
    y = np.where(np.arange(n) % 2 == 0, 0, BACKGROUND)
    X = rng.normal(0.5, 0.15, (n, STORE_SIZE, STORE_SIZE, STORE_SIZE)).astype(np.float32)
    X[y == 0] -= 0.3 * sphere
    return X, y


def _patch_file(path, n, seed):
    rng = np.random.default_rng(seed)
    X, y = _blob_patches(n, rng)
    runs = np.array(["TS_train"] * (n - 32) + ["TS_val"] * 32)
    return save_patches({"X": X.astype(np.float16), "y": y, "run": runs, "source": np.array(["reference"] * n),
                         "tomogram": np.array(["denoised"] * n)}, path)


@pytest.mark.slow
def test_training_learns_is_deterministic_and_resumes(tmp_path, monkeypatch):
    import torch

    import czii_kit.rescore_train as rs

    data = _patch_file(tmp_path / "p.npz", 160, 0)
    meta = train_rescorer(data, tmp_path / "learn.pt", val_runs=["TS_val"], progress=False,
                          epochs=6, batch=16, seed=3, threads=1)
    assert meta["history"][-1]["val_accuracy"] >= 0.9, meta["history"]
    assert meta["n_val"] == 32 and meta["n_train"] == 128
    X, y = _blob_patches(40, np.random.default_rng(99))
    pred = Rescorer(tmp_path / "learn.pt").predict_proba(centre_crop(X)).argmax(1)
    assert (pred == y).mean() >= 0.9
    with pytest.raises(FileExistsNoForce):
        train_rescorer(data, tmp_path / "learn.pt", progress=False)

    # interrupted in epoch 2, then run again: resumes from the checkpoint and ends with the same weights
    data = _patch_file(tmp_path / "small.npz", 96, 1)
    kw = {"epochs": 2, "batch": 16, "seed": 3, "threads": 1}
    train_rescorer(data, tmp_path / "a.pt", val_runs=["TS_val"], progress=False, **kw)
    real_augment, calls = rs.augment, {"n": 0}

    def crash_in_epoch_two(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4 + 2:  # 4 batches per epoch
            raise KeyboardInterrupt
        return real_augment(*a, **k)

    monkeypatch.setattr(rs, "augment", crash_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train_rescorer(data, tmp_path / "b.pt", val_runs=["TS_val"], progress=False, **kw)
    assert (tmp_path / "b.pt.ckpt").is_file() and not (tmp_path / "b.pt").exists()
    monkeypatch.setattr(rs, "augment", real_augment)
    train_rescorer(data, tmp_path / "b.pt", val_runs=["TS_val"], progress=False, **kw)
    assert not (tmp_path / "b.pt.ckpt").exists()
    a = torch.load(tmp_path / "a.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b.pt", weights_only=True)["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_training_can_start_from_a_rescorer(tmp_path):
    from czii_kit.checksum import file_sha256

    data = _patch_file(tmp_path / "p.npz", 96, 2)
    kw = {"epochs": 1, "batch": 16, "seed": 3, "threads": 1, "progress": False}
    train_rescorer(data, tmp_path / "base.pt", **kw)
    # with a zero learning rate, fine-tuning keeps the starting weights exactly; a fresh start does not
    meta = train_rescorer(data, tmp_path / "ft.pt", lr=0.0, init=tmp_path / "base.pt", **kw)
    assert meta["base_rescorer"] == {"file": str(tmp_path / "base.pt"), "sha256": file_sha256(tmp_path / "base.pt")}
    assert meta["train_args"]["init"] == str(tmp_path / "base.pt")
    fresh = train_rescorer(data, tmp_path / "fresh.pt", lr=0.0, **kw)
    assert fresh["base_rescorer"] is None

    def params(name):
        return dict(Rescorer(tmp_path / name).net.named_parameters())

    base, ft, new = params("base.pt"), params("ft.pt"), params("fresh.pt")
    assert all(np.array_equal(base[k].detach().numpy(), ft[k].detach().numpy()) for k in base)
    assert not all(np.array_equal(base[k].detach().numpy(), new[k].detach().numpy()) for k in base)
    with pytest.raises(DataError, match="no such rescorer file"):
        train_rescorer(data, tmp_path / "x.pt", init=tmp_path / "missing.pt", **kw)


def test_collect_cli_cuts_references_and_background(tmp_path, capsys):
    from pipeline_fixture import make_root

    from czii_kit.cli import main
    from czii_kit.rescore_train import load_patches

    picks = make_root(tmp_path / "root", runs=("TS_a", "TS_b"), shape=(40, 96, 112))
    out = tmp_path / "p.npz"
    args = ["rescorer", "collect", str(tmp_path / "root"), "--weights", "none", "--out", str(out), "--quiet"]
    assert main(args) == 0
    d = load_patches(out)
    refs = d["source"] == "reference"
    assert refs.sum() == len(picks) and (d["source"] == "background").sum() == len(picks)
    assert d["X"].shape[1:] == (STORE_SIZE,) * 3
    want = sorted(PARTICLE_NAMES.index(n) for n in picks["particle_type"])
    assert sorted(d["y"][refs].tolist()) == want
    assert (d["y"][~refs] == BACKGROUND).all()
    # a reference patch is centred on a dark sphere: its centre is darker than its corners
    X = d["X"][refs].astype(np.float32)
    c = STORE_SIZE // 2
    assert (X[:, c, c, c] < X[:, :4, :4, :4].mean((1, 2, 3))).mean() > 0.8
    assert main(args) == 2  # exists: refused without --force
    assert "already exists" in capsys.readouterr().err
    # a tomogram kind the runs lack, or a run that is not there: one clear line naming the folder
    assert main(args[:-1] + ["--force", "--quiet", "--tomograms", "wbp"]) == 2
    assert "no tomograms ['wbp'] in these runs" in capsys.readouterr().err
    assert main(args[:-1] + ["--force", "--quiet", "--runs", "TS_zz"]) == 2
    err = capsys.readouterr().err
    assert "no run(s) ['TS_zz'] in split 'train' (found: TS_a, TS_b)" in err and str(tmp_path / "root") in err


@pytest.mark.slow
def test_tune_records_rescored_thresholds_and_predict_follows_them(tmp_path, monkeypatch):
    import torch
    from pipeline_fixture import shipped_model_copy

    import czii_kit.infer
    import czii_kit.tune
    import czii_kit.volumes
    from czii_kit.infer import InferenceConfig
    from czii_kit.postprocess import apply_thresholds
    from czii_kit.predict import predict
    from czii_kit.rescore import RESCORER_FILE
    from czii_kit.tune import THRESHOLDS_FILE, tune

    root, run, weights = shipped_model_copy(tmp_path, seed=4243)
    wdir = weights.parent
    torch.manual_seed(0)
    save_rescorer(build_network(), wdir / RESCORER_FILE)
    reads = []
    real_read = czii_kit.volumes.read_volume
    monkeypatch.setattr(czii_kit.volumes, "read_volume", lambda tomo: reads.append(tomo.path) or real_read(tomo))
    kw_tune = {"split": "train", "runs": [run], "backend": "torch", "config": InferenceConfig(multi_label=True),
               "progress": False, "refine": True, "out": tmp_path / "kept.json"}
    doc = tune(weights, root, **kw_tune)  # predict then refines and rescores on one read of each tomogram
    assert len(reads) == 1  # detection, refinement and rescoring share one read of the run's tomogram
    # with no memory to keep it, the tomogram is read for each stage, and the result is the same
    monkeypatch.setattr(czii_kit.tune, "KEEP_VOLUMES_BYTES", 0)
    again = tune(weights, root, **{**kw_tune, "out": tmp_path / "reread.json"})
    assert len(reads) == 1 + 3
    assert again["rescore"]["thresholds"] == doc["rescore"]["thresholds"] and again["thresholds"] == doc["thresholds"]
    pd.testing.assert_frame_equal(again["_rescored"], doc["_rescored"])
    doc = tune(weights, root, **{**kw_tune, "out": None})
    assert doc["refine"]
    section = doc["rescore"]
    assert section["file"] == RESCORER_FILE and len(section["sha256"]) == 64
    assert set(section["thresholds"]) == set(PARTICLE_NAMES)
    rescored = doc["_rescored"]
    mix, cross = section["config"]["mix"], section["config"]["cross_type"]
    trials = {(m["mix"], m["cross_type"]): m["final"] for m in section["comparison"]}
    assert set(trials) == {(m, c) for m in (1.0, 0.75, 0.5) for c in (False, True)}
    assert trials[mix, cross] == max(trials.values()) == section["final_f4"]
    np.testing.assert_allclose(rescored["score"], rescored["det_score"] ** (1 - mix) * rescored["p_type"] ** mix)
    assert rescored["proposed"].any() == cross

    kw = {"split": "train", "model": weights, "backend": "torch", "progress": False}
    cols = ["experiment", "particle_type", "x", "y", "z"]
    picks = predict(root, **kw)
    want = apply_thresholds(rescored, section["thresholds"])
    pd.testing.assert_frame_equal(picks.sort_values(cols).reset_index(drop=True),
                                  want.sort_values(cols).reset_index(drop=True))
    plain = predict(root, rescore=False, **kw)
    want_plain = apply_thresholds(doc["_candidates"], doc["thresholds"])
    pd.testing.assert_frame_equal(plain.sort_values(cols).reset_index(drop=True),
                                  want_plain.sort_values(cols).reset_index(drop=True))

    # another rescorer file than the one tuned: a warning and the detector-only thresholds
    torch.manual_seed(1)
    save_rescorer(build_network(), wdir / RESCORER_FILE, overwrite=True)
    with pytest.warns(UserWarning, match="differs from the one the thresholds were tuned with"):
        changed = predict(root, **kw)
    assert len(changed) == len(plain)
    with pytest.raises(DataError, match="differs"):
        predict(root, rescore=True, **kw)
    # thresholds tuned without a rescorer: rescore=True is refused, the default runs without
    doc_file = wdir / THRESHOLDS_FILE
    d = json.loads(doc_file.read_text())
    d.pop("rescore")
    doc_file.write_text(json.dumps(d))
    with pytest.raises(DataError, match="tuned without a rescorer"):
        predict(root, rescore=True, **kw)
    assert len(predict(root, **kw)) == len(plain)


@pytest.mark.slow
def test_bench_times_the_rescorer(tmp_path):
    """The benchmark's rescore worker rescoring its candidates on a (small) tomogram."""
    import argparse

    import torch

    from czii_kit.bench import RESCORE_CANDIDATES, _worker, synthetic_tomogram

    tomo = synthetic_tomogram(tmp_path / "t.zarr", shape=(40, 64, 80), n_per_type=1)
    torch.manual_seed(0)
    weights = save_rescorer(build_network(), tmp_path / "r.pt")
    args = argparse.Namespace(tomogram=str(tomo), weights=str(weights), backend="torch", mode="rescore",
                              batch=1, z_stride=1, imgsz=None)
    out = _worker(args)
    assert out["candidates"] == RESCORE_CANDIDATES and out["rescore_s"] > 0 and out["peak_rss_mb"] > 0
    assert out["refine_s"] > 0 and out["smooth_check_s"] > 0 and out["smooth_s"] > 0
