"""The demo: refuses foreign folders; with the shipped model, runs end to end on a tiny dataset."""

import json

import pandas as pd
import pytest

from czii_kit.cli import main
from czii_kit.demo import MARKER


def test_demo_refuses_a_foreign_folder(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    assert main(["demo", "--out", str(tmp_path), "--size", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "not a czii-kit demo folder" in err and str(tmp_path) in err
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    assert not (tmp_path / MARKER).exists()


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys, monkeypatch):
    """Without any shared data the demo simulates with the density maps shipped in czii_kit."""
    from czii_kit.bundle import MODELS_DIR

    if not any(MODELS_DIR.glob("*.pt")):
        pytest.skip("no model shipped in czii_kit/models")
    monkeypatch.setenv("CZII_SHARED_DATA", str(tmp_path / "no-shared-data"))
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--size", "tiny", "--runs", "1", "--backend", "torch"]) == 0
    text = capsys.readouterr().out
    assert "final (weighted F4)" in text and "submission" in text and "shipped density maps" in text
    info = json.loads((out / "data_tiny_1_2024_shipped" / "synthetic.json").read_text())
    assert "shipped" in info["maps_dir"]
    sub = pd.read_csv(out / "submission.csv")
    assert list(sub.columns) == ["id", "experiment", "particle_type", "x", "y", "z"]
    doc = json.loads((out / "score.json").read_text())
    assert 0.0 <= doc["final"] <= 1.0 and set(doc["particles"]) >= {"ribosome", "apo-ferritin"}
    assert (out / "predictions.png").stat().st_size > 5000
    # a second run reuses the cached dataset and replaces its own outputs
    assert main(["demo", "--out", str(out), "--size", "tiny", "--runs", "1", "--backend", "torch"]) == 0
    assert "using the cached synthetic dataset" in capsys.readouterr().out
    # procedural models on request ('none' as before), in their own cached dataset
    assert main(["demo", "--out", str(out), "--size", "tiny", "--runs", "1", "--backend", "torch",
                 "--maps", "none"]) == 0
    assert "procedural" in capsys.readouterr().out and (out / "data_tiny_1_2024_procedural").is_dir()
