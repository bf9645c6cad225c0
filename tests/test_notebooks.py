"""The notebooks run top to bottom through papermill on a tiny synthetic dataset, and produce what they promise."""

import io
import json
import tarfile
from pathlib import Path

import pandas as pd
import pytest
from nbrun import REPO, cell_text, run_notebook

from czii_kit.picks import read_picks
from czii_kit.submission import read_submission, write_submission

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_clean(path):
    """One parameters cell, no function or class definitions, outputs stripped."""
    nb = json.loads(path.read_text())
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    for c in nb["cells"]:
        if c["cell_type"] != "code":
            continue
        src = "".join(c["source"])
        assert "def " not in src and "class " not in src and "lambda" not in src, src[:80]
        assert not c.get("outputs") and c.get("execution_count") is None, "outputs must be stripped"


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    synthetic = pytest.importorskip("czii_kit.synthetic")
    root = tmp_path_factory.mktemp("nbdata") / "data"
    synthetic.generate_dataset(root, n_train=2, n_test=1, size="tiny", seed=3, progress=False)
    return root


def test_explore_notebook(tiny_dataset, tmp_path):
    picks = read_picks(tiny_dataset, split="train")
    run = sorted(picks["experiment"].unique())[0]
    sub = picks[picks["experiment"] == run].copy()
    sub.loc[sub.index[::3], "x"] += 500.0  # every third point moved far away: FP + FN
    write_submission(sub, tmp_path / "sub.csv")
    # the papermill command line, as the notebook's first cell and the docs show it
    nb = run_notebook("explore.ipynb", tmp_path, {
        "DATA_ROOT": str(tiny_dataset), "RUN": run, "SUBMISSION": str(tmp_path / "sub.csv"), "OUT_DIR": "figs",
    }, cli=True)
    for name in ("slices.png", "orthogonal.png", "histogram.png", "gallery.png", "matches.png"):
        assert (tmp_path / "figs" / name).stat().st_size > 2000, name
    text = cell_text(nb)
    assert run in text and "final (weighted F4)" in text
    assert "FP" in text and "TP" in text


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory):
    """Run train.ipynb on the tiny dataset (1 epoch); returns (workdir, executed notebook)."""
    work = tmp_path_factory.mktemp("nbtrain")
    nb = run_notebook("train.ipynb", work, {
        "DATA_ROOT": str(tiny_dataset), "WORK_DIR": "work", "CROP": None, "Z_STRIDE": 2, "EPOCHS": 1,
        "IMGSZ": 128, "BATCH": 8, "SEED": 0, "TOMOGRAMS": ["denoised", "wbp"], "DEGRADE": 0.5,
        "RESCORER_EPOCHS": 1,
    })
    return work, nb


@pytest.mark.slow
def test_train_notebook(trained):
    work, nb = trained
    weights = work / "work" / "model" / "weights"
    assert (weights / "best.pt").is_file()
    assert (weights / "czii_kit_train.json").is_file()
    manifest = json.loads((work / "work" / "yolo_dataset" / "czii_kit_dataset.json").read_text())
    assert manifest["tomogram"] == ["denoised", "wbp"] and manifest["degraded_images"] > 0
    doc = json.loads((weights / "czii_kit_thresholds.json").read_text())
    assert set(doc["thresholds"]) >= {"apo-ferritin", "ribosome", "virus-like-particle"}
    assert (work / "work" / "training_curves.png").stat().st_size > 2000
    assert "final F4 on validation" in cell_text(nb)
    # the optional rescorer: trained beside the weights, thresholds tuned for it (the inference notebook uses it)
    assert (weights / "czii_kit_rescorer.pt").is_file() and (work / "work" / "rescorer_patches.npz").is_file()
    assert doc["rescore"]["file"] == "czii_kit_rescorer.pt" and set(doc["rescore"]["thresholds"]) == set(doc["thresholds"])
    assert "final F4 on validation, rescored" in cell_text(nb)


@pytest.mark.slow
def test_inference_notebook_as_on_kaggle(trained, tiny_dataset, tmp_path):
    """Given only a Kaggle-like input root, the notebook finds the competition data and the wheel bundle in
    the top two levels of the attached datasets, unpacks the .tar.gz bundle into the working folder first,
    and writes the submission there (czii_kit is installed here, so nothing is pip-installed)."""
    work, _ = trained
    weights = work / "work" / "model" / "weights" / "best.pt"
    kaggle_input, working = tmp_path / "input", tmp_path / "working"
    kaggle_input.mkdir()
    working.mkdir()
    (kaggle_input / "czii-cryo-et-object-identification").symlink_to(tiny_dataset, target_is_directory=True)
    bundle_dir = kaggle_input / "czii-kit-wheels" / "v1"
    bundle_dir.mkdir(parents=True)
    wheel = b"stands in for czii_kit's wheel"
    with tarfile.open(bundle_dir / "czii_kit-wheels-cp311-manylinux_2_35_x86_64.tar.gz", "w:gz") as tar:
        for name, data in (("czii_kit-0.0.1-py3-none-any.whl", wheel), ("manifest.json", b"{}")):
            info = tarfile.TarInfo(name)  # no folder inside, as build_wheels.sh writes it
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    too_deep = kaggle_input / "other-dataset" / "a" / "b"
    too_deep.mkdir(parents=True)
    (too_deep / "czii_kit-9.9.9-py3-none-any.whl").write_bytes(b"must not be found")

    nb = run_notebook("inference.ipynb", tmp_path, {
        "WEIGHTS": str(weights), "BACKEND": "torch", "KAGGLE_INPUT": str(kaggle_input),
        "KAGGLE_WORKING": str(working),
    })
    text = cell_text(nb)
    assert f"wheel bundles found: ['{bundle_dir}/czii_kit-wheels-cp311-manylinux_2_35_x86_64.tar.gz']" in text
    unpacked = working / "czii_kit-wheels-cp311-manylinux_2_35_x86_64"
    assert (unpacked / "czii_kit-0.0.1-py3-none-any.whl").read_bytes() == wheel
    assert f"data: {kaggle_input / 'czii-cryo-et-object-identification'}" in text

    sub = pd.read_csv(working / "submission.csv")
    assert list(sub.columns) == ["id", "experiment", "particle_type", "x", "y", "z"]
    assert sub["id"].is_unique
    test_runs = set(pd.read_csv(Path(tiny_dataset) / "solution.csv")["experiment"])
    assert set(sub["experiment"]) <= test_runs
    assert "wrote" in text


@pytest.mark.slow
def test_inference_notebook_command_line(trained, tiny_dataset, tmp_path):
    """``papermill notebooks/inference.ipynb out.ipynb -p DATA_ROOT ... -p OUT ...``, as the docs show it."""
    work, _ = trained
    weights = work / "work" / "model" / "weights" / "best.pt"
    run_notebook("inference.ipynb", tmp_path, {
        "DATA_ROOT": str(tiny_dataset), "WEIGHTS": str(weights), "BACKEND": "torch", "OUT": "sub.csv",
    }, cli=True)
    sub = read_submission(tmp_path / "sub.csv")  # relative OUT: in papermill's --cwd
    assert set(sub["experiment"]) <= set(pd.read_csv(Path(tiny_dataset) / "solution.csv")["experiment"])
