"""Strict settings: one parser for every section of a tuned settings file; the model bundle; the commands."""

from __future__ import annotations

import json
import shutil

import pytest

from czii_kit.bundle import MANIFEST_FILE, MODELS_DIR, ModelBundle
from czii_kit.errors import DataError, SettingsError
from czii_kit.settings import SETTINGS_FILE, PipelineSettings, set_setting

SHIPPED = MODELS_DIR / SETTINGS_FILE
needs_model = pytest.mark.skipif(not SHIPPED.is_file(), reason="no model shipped in czii_kit/models")


def shipped_doc() -> dict:
    return json.loads(SHIPPED.read_text())


@needs_model
def test_the_shipped_settings_parse_and_mean_what_tune_wrote():
    s = PipelineSettings.read(SHIPPED)
    doc = shipped_doc()
    assert s.inference.to_dict() == {**s.inference.to_dict(), **doc["inference"]}
    assert s.merge.to_dict() == doc["merge"]
    assert s.refine is not None and list(s.refine.types) == doc["refine"]["types"]
    assert dict(s.thresholds) == doc["thresholds"]
    assert dict(s.rescore.thresholds) == doc["rescore"]["thresholds"]
    assert s.rescore.config.to_dict() == doc["rescore"]["config"]
    assert s.rescore.templates.config.wedge == "auto"
    # the one change made after tuning is recorded with the command that made it
    (edit,) = doc["edits"]
    assert edit["set"] == {"rescore.templates.config.wedge": "auto"}
    assert edit["command"].startswith("czii-kit settings set czii_kit/models/czii_kit_thresholds.json")


# (section path in the document, a bad key, a value of the wrong type, an out-of-range value)
SECTIONS = [
    (("inference",), "z_strid", ("batch", "eight"), ("z_stride", 0)),
    (("merge",), "xy_fraction", ("refine", True), ("method", "kmeans")),
    (("refine",), "windows", ("window", "3"), ("window", -1)),
    (("rescore", "config"), "mixx", ("cross_type", "yes"), ("mix", 2.0)),
    (("rescore", "templates", "config"), "n_rotation", ("seed", 0.5), ("bin", 0)),
    (("thresholds",), "ribosomes", ("ribosome", "high"), ("ribosome", 1.5)),
    (("rescore", "thresholds"), "apoferritin", ("apo-ferritin", None), ("apo-ferritin", -0.1)),
]


def _with(doc: dict, path: tuple, key: str, value) -> dict:
    doc = json.loads(json.dumps(doc))
    node = doc
    for p in path:
        node = node[p]
    node[key] = value
    return doc


@needs_model
@pytest.mark.parametrize("path, unknown, wrong_type, out_of_range", SECTIONS, ids=[".".join(s[0]) for s in SECTIONS])
def test_each_section_refuses_unknown_keys_wrong_types_and_out_of_range_values(path, unknown, wrong_type,
                                                                                 out_of_range):
    doc = shipped_doc()
    dotted = ".".join(path)
    with pytest.raises(SettingsError, match=rf"^f\.json: {dotted}\.{unknown}: unknown"):
        PipelineSettings.from_doc(_with(doc, path, unknown, 1), "f.json")
    with pytest.raises(SettingsError, match=rf"^f\.json: {dotted}(\.{wrong_type[0]})?: .*(expected|must|invalid)"):
        PipelineSettings.from_doc(_with(doc, path, *wrong_type), "f.json")
    with pytest.raises(SettingsError, match=rf"^f\.json: {dotted}"):
        PipelineSettings.from_doc(_with(doc, path, *out_of_range), "f.json")


@needs_model
def test_top_level_and_record_keys():
    doc = shipped_doc()
    with pytest.raises(SettingsError, match=r"bogus_setting_x: unknown setting"):
        PipelineSettings.from_doc({**doc, "bogus_setting_x": 1}, "f.json")
    with pytest.raises(SettingsError, match=r"rescore.mixture: unknown setting"):
        PipelineSettings.from_doc(_with(doc, ("rescore",), "mixture", 1), "f.json")
    with pytest.raises(SettingsError, match=r"thresholds: missing"):
        PipelineSettings.from_doc({k: v for k, v in doc.items() if k != "thresholds"}, "f.json")
    with pytest.raises(SettingsError, match=r"weights_sha256: expected"):
        PipelineSettings.from_doc({**doc, "weights_sha256": "abc"}, "f.json")
    with pytest.raises(SettingsError, match=r"n_detections: unexpected value"):
        PipelineSettings.from_doc({**doc, "n_detections": "many"}, "f.json")
    # records of the tuning are kept as written, unchecked beyond their type
    PipelineSettings.from_doc({**doc, "comparison": [], "table": {}}, "f.json")


def test_overrides_are_checked_by_name_and_value():
    s = PipelineSettings()
    assert s.overridden(z_stride=2, smooth="off").inference.z_stride == 2
    assert s.overridden(thresholds={"ribosome": 0.9}).thresholds["ribosome"] == 0.9
    with pytest.raises(SettingsError, match="unknown setting.*zstride"):
        s.overridden(zstride=2)
    with pytest.raises(SettingsError, match="z_stride"):
        s.overridden(z_stride=0)
    with pytest.raises(SettingsError, match="thresholds.ribozome: unknown particle type"):
        s.overridden(thresholds={"ribozome": 0.2})
    with pytest.raises(SettingsError, match="template wedge"):
        s.overridden(template_wedge="sideways")


@needs_model
def test_set_setting_checks_key_and_value():
    doc = shipped_doc()
    out = set_setting(doc, "rescore.config.mix", 0.5, "f.json")
    assert out["rescore"]["config"]["mix"] == 0.5 and doc["rescore"]["config"]["mix"] == 0.75
    with pytest.raises(SettingsError, match="rescore.config: mix must lie in"):
        set_setting(doc, "rescore.config.mix", 5, "f.json")
    with pytest.raises(SettingsError, match="rescore.config.mixx: unknown"):
        set_setting(doc, "rescore.config.mixx", 0.5, "f.json")
    with pytest.raises(SettingsError, match="table: not a setting"):
        set_setting(doc, "table", {}, "f.json")
    with pytest.raises(SettingsError, match="nosuch: no such section"):
        set_setting(doc, "nosuch.mix", 0.5, "f.json")


@needs_model
def test_settings_commands(tmp_path, capsys):
    from czii_kit.cli import main

    f = tmp_path / "s.json"
    shutil.copy(SHIPPED, f)
    assert main(["settings", "check", str(f)]) == 0
    assert "valid" in capsys.readouterr().out
    assert main(["settings", "set", str(f), "rescore.templates.config.wedge=none"]) == 2  # in place needs --force
    assert "already exists" in capsys.readouterr().err
    out = tmp_path / "t.json"
    assert main(["settings", "set", str(f), "rescore.templates.config.wedge=null", "merge.xy_frac=0.5",
                 "--note", "trial", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["rescore"]["templates"]["config"]["wedge"] is None and doc["merge"]["xy_frac"] == 0.5
    assert doc["edits"][-1]["set"] == {"rescore.templates.config.wedge": None, "merge.xy_frac": 0.5}
    assert doc["edits"][-1]["note"] == "trial"
    capsys.readouterr()
    assert main(["settings", "set", str(f), "merge.xy_frac=big", "--out", str(tmp_path / "u.json")]) == 2
    err = capsys.readouterr().err
    assert "merge.xy_frac" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "u.json").exists()


@needs_model
def test_predict_refuses_a_bogus_setting_before_reading_any_tomogram(tmp_path, capsys, monkeypatch):
    from pipeline_fixture import make_root

    import czii_kit.volumes
    from czii_kit.cli import main

    root = make_root(tmp_path / "root", runs=("TS_a",), shape=(8, 48, 56), per_type=1, seed=0, split="test")
    bad = tmp_path / "tuned.json"
    bad.write_text(json.dumps({**shipped_doc(), "bogus_setting_x": 3}))

    def no_reading(*a, **k):
        raise AssertionError("a tomogram was read")

    monkeypatch.setattr(czii_kit.volumes, "read_volume", no_reading)
    rc = main(["predict", str(root), "--thresholds", str(bad), "--out", str(tmp_path / "s.csv"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "tuned.json" in err and "bogus_setting_x" in err
    assert not (tmp_path / "s.csv").exists()


@needs_model
def test_bundle_reads_the_shipped_model_and_checks_its_manifest(tmp_path):
    m = ModelBundle.load()
    assert m.weights.parent == MODELS_DIR and m.voxel_size == pytest.approx(10.012444)
    assert m.settings().rescore is not None and m.preprocess.offsets == (-2, 0, 2)
    assert m.check_manifest()["files"][m.weights.name] == m.weights_sha256
    assert {p.name for p in m.files()} == set(json.loads((MODELS_DIR / MANIFEST_FILE).read_text())["files"])
    # a copy whose settings changed after the manifest was written is refused, naming the file
    copy = tmp_path / "model"
    shutil.copytree(MODELS_DIR, copy, ignore=shutil.ignore_patterns("*openvino*", "*.onnx", "__pycache__"))
    ModelBundle(copy / m.weights.name)
    (copy / SETTINGS_FILE).write_text((copy / SETTINGS_FILE).read_text().replace('"mix": 0.75', '"mix": 0.7'))
    with pytest.raises(DataError, match=r"czii_kit_thresholds.json: differs from czii_kit_manifest.json"):
        ModelBundle(copy / m.weights.name)
    from czii_kit.cli import main

    assert main(["model", "check", "--weights", str(copy / m.weights.name)]) == 2
    assert main(["model", "manifest", "--weights", str(copy / m.weights.name)]) == 0  # the change is wanted
    assert main(["model", "check", "--weights", str(copy / m.weights.name)]) == 0
    assert ModelBundle(copy / m.weights.name).settings().rescore.config.mix == 0.7
