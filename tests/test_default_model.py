"""The model shipped in czii_kit/models: complete, offline-loadable, and it really picks particles."""

import json

import pandas as pd
import pytest

from czii_kit.bundle import MODELS_DIR, default_weights
from czii_kit.catalog import class_names

pytestmark = pytest.mark.skipif(not any(MODELS_DIR.glob("*.pt")), reason="no model shipped in czii_kit/models")


def test_shipped_files():
    w = default_weights()
    assert w.stat().st_size < 15 * 2**20, "shipped weights must stay under 15 MB"
    thr = json.loads((w.parent / "czii_kit_thresholds.json").read_text())
    assert set(thr["thresholds"]) == set(class_names().values())
    assert all(0.0 <= t <= 1.0 for t in thr["thresholds"].values())
    rec = json.loads((w.parent / "czii_kit_train.json").read_text())
    assert rec["status"] == "finished" and rec["preprocess"]


def test_shipped_files_agree_with_the_thresholds_and_go_into_the_wheel(tmp_path):
    """Every file the tuned thresholds name (rescorer, templates, same SHA-256) is shipped, and a
    wheel of the project carries all of czii_kit/models (what the Kaggle bundle installs)."""
    import subprocess
    import sys
    import zipfile

    from czii_kit.checksum import file_sha256

    w = default_weights()
    doc = json.loads((w.parent / "czii_kit_thresholds.json").read_text())
    assert doc["weights_sha256"] == file_sha256(w), "thresholds tuned for other weights than the shipped ones"
    section = doc.get("rescore") or {}
    for rec in (section, section.get("templates")):
        if rec:
            assert file_sha256(w.parent / rec["file"]) == rec["sha256"], rec["file"]
    import shutil

    repo = MODELS_DIR.parent.parent
    if not (repo / "setup.cfg").is_file():
        pytest.skip("not a source checkout")
    src = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(repo / name, src)
    shutil.copytree(repo / "czii_kit", src / "czii_kit",
                    ignore=shutil.ignore_patterns("__pycache__", "*_openvino_model", "*.onnx"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=600)
    names = zipfile.ZipFile(next((tmp_path / "dist").glob("czii_kit-*.whl"))).namelist()
    shipped = sorted(f"czii_kit/models/{p.name}" for p in MODELS_DIR.iterdir()
                     if p.is_file() and p.suffix in (".pt", ".json", ".npz"))
    assert shipped and not [f for f in shipped if f not in names]


def test_model_classes_match_catalog():
    from czii_kit.offline import configure_offline

    configure_offline()
    from ultralytics import YOLO

    assert {int(k): v for k, v in YOLO(str(default_weights())).names.items()} == class_names()


@pytest.mark.slow
def test_picks_a_fresh_synthetic_run(tmp_path):
    """On a small run of a seed never used in training the shipped model finds the big particles."""
    from czii_kit.metric import score
    from czii_kit.predict import predict
    from czii_kit.synthetic import generate_dataset

    root = generate_dataset(tmp_path / "d", n_train=0, n_test=1, size="small", seed=4242, progress=False)
    picks = predict(root, split="test", backend="torch", progress=False)
    result = score(pd.read_csv(root / "solution.csv"), picks)
    table = result.table
    assert table.loc["ribosome", "f_beta"] > 0.6, table
    assert result.final > 0.4, table
