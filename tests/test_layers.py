"""The package's imports form layers (tests/check_layers.py): no cycles, nothing imports upward."""

from __future__ import annotations

import textwrap

from tests import check_layers


def test_the_package_is_layered():
    assert check_layers.problems() == []


def test_the_checker_finds_upward_imports_cycles_and_hidden_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "czii_kit"
    (pkg / "cli").mkdir(parents=True)
    files = {
        "__init__.py": "from czii_kit.errors import CziiKitError\n",
        "errors.py": "class CziiKitError(Exception):\n    pass\n",
        "metric.py": "from czii_kit.predict import predict\n",  # scoring imports the pipeline: upward
        "predict.py": "import czii_kit.tune\n",  # the pipeline imports training: upward, and a cycle back
        "tune.py": "from czii_kit import predict\n",
        "refine.py": "def f():\n    from czii_kit.metric import score\n    return score\n",  # hidden import
        "wizard.py": "x = 1\n",  # in no layer
        "cli/__init__.py": "def main():\n    from czii_kit.tune import tune\n",  # lazy in the CLI: allowed
    }
    for name, text in files.items():
        (pkg / name).write_text(textwrap.dedent(text))
    monkeypatch.setattr(check_layers, "PACKAGE", pkg)
    found = "\n".join(check_layers.problems())
    assert "czii_kit.metric (scoring) imports czii_kit.predict (pipeline), a layer above" in found
    assert "czii_kit.predict (pipeline) imports czii_kit.tune (training), a layer above" in found
    assert "import cycle: czii_kit.predict -> czii_kit.tune -> czii_kit.predict" in found
    assert "czii_kit.refine imports czii_kit.metric inside a function" in found
    assert "module czii_kit.wizard is in no layer" in found
    assert "cli" not in found


def test_import_czii_kit_is_light_and_its_public_api_loads_on_use():
    import subprocess
    import sys

    code = ("import sys, czii_kit; heavy = [m for m in ('czii_kit.predict', 'czii_kit.bundle', 'pandas', 'torch', "
            "'ultralytics') if m in sys.modules]; assert not heavy, heavy; "
            "assert czii_kit.load_model.__qualname__ == 'ModelBundle.load'; "
            "assert callable(czii_kit.score) and callable(czii_kit.read_picks) and callable(czii_kit.generate_dataset)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
