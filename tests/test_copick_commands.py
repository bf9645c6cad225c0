"""copick both ways from the command line: ``synth --naming``, ``predict --picks-out``, ``copick-config``.

The real copick (which pins zarr<3) runs in the cached venv of ``tests/envs.py`` (built here when
absent); czii_kit writes the data in this environment, and a script in that venv reads it with copick.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from czii_kit.catalog import PARTICLE_NAMES, PARTICLES
from czii_kit.cli import main
from czii_kit.picks import read_picks

# prints {run: {"tomograms": {name: shape}, "picks": {particle: [[x, y, z], ...]}}} as copick sees them
_READ_WITH_COPICK = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
import copick

config, user, session, want_picks = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
cp = copick.from_file(config)
assert sorted(o.name for o in cp.pickable_objects) == sorted(json.loads(sys.argv[5])), cp.pickable_objects
out = {}
for run in cp.runs:
    vs = run.get_voxel_spacing(10.0)
    entry = {"tomograms": {t.tomo_type: list(t.numpy().shape) for t in vs.tomograms} if vs else {}, "picks": {}}
    if want_picks:
        for p in run.get_picks(user_id=user, session_id=session):
            entry["picks"][p.pickable_object_name] = [[q.location.x, q.location.y, q.location.z]
                                                      for q in (p.points or [])]
    out[run.name] = entry
print("COPICK" + json.dumps(out))
"""


def _copick_view(config, user="curation", session="0", picks=True) -> dict:
    import envs

    try:
        res = envs.run_copick(_READ_WITH_COPICK, str(config), user, session, "1" if picks else "0",
                              json.dumps(list(PARTICLE_NAMES)))
    except envs.EnvUnavailable as exc:
        pytest.skip(f"cannot build the copick test environment: {exc}")
    assert res.returncode == 0 and "COPICK" in res.stdout, res.stdout[-2000:] + res.stderr[-3000:]
    return json.loads(res.stdout.split("COPICK", 1)[1])


def _counts(df: pd.DataFrame) -> dict:
    return {(str(k[0]), str(k[1])): len(g) for k, g in df.groupby(["experiment", "particle_type"])}


def test_copick_config_command(tmp_path, capsys):
    root = tmp_path / "data"
    (root / "train" / "static" / "ExperimentRuns").mkdir(parents=True)
    (root / "test" / "static" / "ExperimentRuns").mkdir(parents=True)
    out = tmp_path / "copick.json"
    assert main(["copick-config", str(root), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "choose a split" in err and "test, train" in err and not out.exists()
    assert main(["copick-config", str(root), "--split", "val", "--out", str(out)]) == 2
    assert "no split 'val'" in capsys.readouterr().err
    assert main(["copick-config", str(root), "--split", "train", "--out", str(out)]) == 0
    cfg = json.loads(out.read_text())
    assert cfg["config_type"] == "filesystem"
    assert cfg["static_root"] == str((root / "train" / "static").resolve())
    assert cfg["overlay_root"] == str((root / "train" / "overlay").resolve())
    assert [(o["name"], o["radius"], o["label"]) for o in cfg["pickable_objects"]] == [
        (p.name, p.radius, p.copick_label) for p in PARTICLES]
    assert all(o["is_particle"] and len(o["color"]) == 4 for o in cfg["pickable_objects"])
    # never overwritten silently; --force, a split folder as root and --overlay
    assert main(["copick-config", str(root), "--split", "train", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["copick-config", str(root / "test"), "--out", str(out), "--overlay", str(tmp_path / "ov"),
                 "--force"]) == 0
    cfg = json.loads(out.read_text())
    assert cfg["static_root"] == str((root / "test" / "static").resolve())
    assert cfg["overlay_root"] == str((tmp_path / "ov").resolve())
    assert main(["copick-config", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.json")]) == 2


def test_synth_naming_validation(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "x"), "--runs", "1", "--test-runs", "0", "--size", "tiny",
                 "--naming", "copick", "--session-id", "a_b", "--quiet"]) == 2
    assert "without '_'" in capsys.readouterr().err and not (tmp_path / "x").exists()


@pytest.mark.parametrize("naming", ["copick", "kaggle"])
def test_copick_reads_synth_output(tmp_path, naming):
    root = tmp_path / naming
    args = ["synth", "--out", str(root), "--runs", "2", "--test-runs", "0", "--size", "tiny", "--seed", "7",
            "--naming", naming, "--quiet", "--range", "crowding=6"]
    if naming == "copick":
        args += ["--user-id", "simulator", "--session-id", "3"]
    assert main(args) == 0
    files = sorted(p.name for p in (root / "train" / "overlay").rglob("*.json"))
    prefix = "simulator_3_" if naming == "copick" else ""
    assert files == sorted(f"{prefix}{n}.json" for n in PARTICLE_NAMES for _ in range(2))
    ours = read_picks(root, split="train")
    assert len(ours) >= 10
    assert main(["copick-config", str(root), "--out", str(tmp_path / "copick.json")]) == 0  # one split: no --split
    # copick reads Kaggle-named picks files not at all (it splits every name at '_'): tomograms only there
    seen = _copick_view(tmp_path / "copick.json", "simulator", "3", picks=naming == "copick")
    assert sorted(seen) == sorted(set(ours["experiment"]))
    for run in seen.values():
        assert run["tomograms"] == {"denoised": [48, 96, 128], "wbp": [48, 96, 128]}
    if naming == "copick":
        rows = [(r, p, *xyz) for r, v in seen.items() for p, pts in v["picks"].items() for xyz in pts]
        theirs = pd.DataFrame(rows, columns=["experiment", "particle_type", "x", "y", "z"])
        assert _counts(theirs) == _counts(ours)
        key = ["experiment", "particle_type", "x", "y", "z"]
        np.testing.assert_array_equal(theirs.sort_values(key)[key[2:]].to_numpy(),
                                      ours.sort_values(key)[key[2:]].to_numpy())


def test_predict_picks_out_opens_in_copick(tmp_path, capsys):
    from czii_kit.predict import MODELS_DIR

    if not any(MODELS_DIR.glob("*.pt")):
        pytest.skip("no model shipped in czii_kit/models")
    root = tmp_path / "data"
    assert main(["synth", "--out", str(root), "--runs", "0", "--test-runs", "1", "--size", "tiny", "--quiet"]) == 0
    overlay = tmp_path / "predictions"
    base = ["predict", str(root), "--out", str(tmp_path / "sub.csv"), "--backend", "torch", "--quiet",
            "--picks-out", str(overlay)]
    # a bad session id is refused before predicting
    assert main([*base, "--session-id", "a_b"]) == 2
    assert "without '_'" in capsys.readouterr().err and not (tmp_path / "sub.csv").exists()
    assert main([*base, "--user-id", "model", "--session-id", "7"]) == 0
    sub = pd.read_csv(tmp_path / "sub.csv")
    assert len(sub) > 0
    files = sorted(p.name for p in overlay.rglob("*.json"))
    assert files == sorted(f"model_7_{n}.json" for n in PARTICLE_NAMES)  # one per type, even when empty
    assert main(["copick-config", str(root), "--split", "test", "--overlay", str(overlay),
                 "--out", str(tmp_path / "copick.json")]) == 0
    seen = _copick_view(tmp_path / "copick.json", "model", "7")
    (run,) = seen.values()
    got = {p: len(pts) for p, pts in run["picks"].items() if pts}
    assert got == sub.groupby("particle_type").size().to_dict()
    # existing picks files are refused before predicting (nothing written), unless --force
    capsys.readouterr()
    assert main(["predict", str(root), "--out", str(tmp_path / "sub2.csv"), "--backend", "torch", "--quiet",
                 "--picks-out", str(overlay), "--user-id", "model", "--session-id", "7"]) == 2
    assert "already exists" in capsys.readouterr().err and not (tmp_path / "sub2.csv").exists()
