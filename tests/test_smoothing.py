"""Low-pass of noisy tomograms at prediction: detection, refinement and rescoring see the same volume."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pandas as pd
import pytest

COLS = ["experiment", "particle_type", "x", "y", "z"]


def _sort(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(COLS).reset_index(drop=True)[COLS]


@pytest.mark.slow
def test_predict_low_passes_noisy_tomograms_once_for_every_stage(tmp_path, monkeypatch):
    from pipeline_fixture import shipped_model_copy

    import czii_kit.volumes as infer
    from czii_kit.bundle import MODELS_DIR
    from czii_kit.layout import get_run
    from czii_kit.predict import predict
    from czii_kit.preprocess import SMOOTH_TARGET, neighbour_correlation, settle_smoothing, smoothing_sigma
    from czii_kit.tomogram import open_tomogram

    root, run, weights = shipped_model_copy(tmp_path, seed=4247)
    for f in ("czii_kit_thresholds.json", "czii_kit_rescorer.pt", "czii_kit_templates.npz"):
        shutil.copy(MODELS_DIR / f, weights.parent)
    r = get_run(root, run)
    denoised = open_tomogram(r.tomogram_path("denoised")).read()
    wbp = open_tomogram(r.tomogram_path("wbp")).read()
    # the simulator's denoised tomogram is left alone, its raw WBP one is low-passed
    assert neighbour_correlation(denoised) >= SMOOTH_TARGET > neighbour_correlation(wbp)
    assert smoothing_sigma(denoised) == 0 and smoothing_sigma(wbp) > 0

    kw = {"split": "train", "model": weights, "backend": "torch", "progress": False, "tomogram": "wbp"}
    # one pass per tomogram: read once and low-passed once for detection, refinement and rescoring
    import scipy.ndimage

    read, gauss = infer.read_volume, scipy.ndimage.gaussian_filter
    reads, whole = [], []
    monkeypatch.setattr(infer, "read_volume", lambda tomo: reads.append(tomo.path) or read(tomo))
    monkeypatch.setattr(scipy.ndimage, "gaussian_filter",
                        lambda a, *x, **k: whole.append(np.shape(a) == wbp.shape) or gauss(a, *x, **k))
    with pytest.warns(UserWarning, match=rf"{run}.*wbp\.zarr.*: noisy tomogram"):
        auto = predict(root, **kw)
    assert len(reads) == 1 and reads[0].name == "wbp.zarr"
    assert sum(whole) == 1
    monkeypatch.setattr(infer, "read_volume", read)
    monkeypatch.setattr(scipy.ndimage, "gaussian_filter", gauss)
    off = predict(root, smooth="off", **kw)
    assert not _sort(off).equals(_sort(auto))
    # the same as predicting, without smoothing, a tomogram that was low-passed beforehand: so the
    # detector, the centre refinement and the rescorer all read the low-passed volume
    monkeypatch.setattr(infer, "read_volume", lambda tomo: settle_smoothing(read(tomo), "auto", warn=False)[0])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*noisy tomogram")
        pre = predict(root, smooth=0, **kw)
    pd.testing.assert_frame_equal(_sort(pre), _sort(auto))
    assert len(auto) > 0 and np.isfinite(auto[["x", "y", "z"]].to_numpy()).all()


def test_predict_cli_rejects_a_bad_smooth_value(capsys):
    from czii_kit.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["predict", "root", "--out", "x.csv", "--smooth", "strong"])
    assert exc.value.code == 2
    assert "smooth must be 'auto', 'off' or a sigma in voxels, got 'strong'" in capsys.readouterr().err


def test_low_pass_in_place_gives_the_same_volume_without_a_copy():
    from czii_kit.preprocess import settle_smoothing

    noisy = np.random.default_rng(7).normal(size=(20, 40, 56)).astype(np.float32)  # white noise: low-passed
    ref, sigma = settle_smoothing(noisy, "auto", warn=False)
    assert sigma > 0 and not np.shares_memory(ref, noisy)
    work = noisy.copy()
    got, sigma2 = settle_smoothing(work, "auto", warn=False, in_place=True)
    assert got is work and sigma2 == sigma and np.array_equal(got, ref)
    ints = (noisy * 100).astype(np.int16)  # not float32: filtered into a new array even when asked in place
    out, _ = settle_smoothing(ints, 1.0, in_place=True)
    assert out.dtype == np.float32 and ints.dtype == np.int16
