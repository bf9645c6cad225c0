"""ONNX / OpenVINO exports are cached in a user cache folder keyed by the weights' checksum, never beside them."""

import pytest

from czii_kit import infer
from czii_kit.checksum import file_sha256


def test_exports_are_cached_outside_the_weights_folder_keyed_by_checksum(tmp_path, monkeypatch):
    ro = tmp_path / "input" / "model"
    ro.mkdir(parents=True)
    w = ro / "best.pt"
    w.write_bytes(b"weights-bytes")
    other = tmp_path / "other" / "best.pt"
    other.parent.mkdir()
    other.write_bytes(b"other-weights")
    home = tmp_path / "home"
    monkeypatch.setenv("CZII_KIT_HOME", str(home))
    monkeypatch.delenv(infer.EXPORTS_ENV, raising=False)

    digest = file_sha256(w)
    dest = infer.export_path(w, "openvino", 640, 8)
    assert dest == home / "exports" / digest[:16] / "best_640_b8_openvino_model"
    assert infer.export_path(w, "onnx", 320, 4).name == "best_320_b4.onnx"
    assert infer.export_path(other, "openvino", 640, 8).parent != dest.parent  # same name, other weights: apart
    copy = infer._cached_copy(w, dest.parent)
    assert copy.parent == dest.parent and copy.read_bytes() == b"weights-bytes"
    assert infer._cached_copy(w, dest.parent) == copy  # reused
    assert sorted(p.name for p in ro.iterdir()) == ["best.pt"]  # nothing written beside the weights

    monkeypatch.setenv(infer.EXPORTS_ENV, str(tmp_path / "env_cache"))
    assert infer.export_path(w, "openvino", 640).parent.parent == tmp_path / "env_cache"
    assert infer.export_path(w, "openvino", 640, export_dir=tmp_path / "opt").parent.parent == tmp_path / "opt"
    with pytest.raises(ValueError, match="no export"):
        infer.export_path(w, "torch", 640)


def test_missing_backend_gives_a_clear_error(monkeypatch, tmp_path):
    import importlib.util

    from czii_kit.errors import CziiKitError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    assert infer.missing_backend_modules("openvino") == ["openvino"]
    assert infer.missing_backend_modules("torch") == []
    with pytest.raises(CziiKitError, match=r"czii_kit\[export\]"):
        infer.Detector(tmp_path / "w.pt", "openvino")
