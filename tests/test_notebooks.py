"""The notebooks run top to bottom on a tiny synthetic dataset, and produce what they promise."""

import json
from pathlib import Path

import pytest

from czii_kit.picks import read_picks
from czii_kit.submission import write_submission

from .nbrun import REPO, cell_text, run_notebook

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
    nb = run_notebook("explore.ipynb", tmp_path, {
        "DATA_ROOT": str(tiny_dataset), "RUN": run, "SUBMISSION": str(tmp_path / "sub.csv"), "OUT_DIR": "figs",
    })
    for name in ("slices.png", "orthogonal.png", "histogram.png", "gallery.png", "matches.png"):
        assert (tmp_path / "figs" / name).stat().st_size > 2000, name
    text = cell_text(nb)
    assert run in text and "final (weighted F4)" in text
    assert "FP" in text and "TP" in text
