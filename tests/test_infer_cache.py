"""Exports of read-only weights (Kaggle datasets under /kaggle/input) are cached in a writable folder."""

import os

from czii_kit import infer
from czii_kit.checksum import file_sha256


def test_writable_copy_for_read_only_weights(tmp_path, monkeypatch):
    ro = tmp_path / "input" / "model"
    ro.mkdir(parents=True)
    w = ro / "best.pt"
    w.write_bytes(b"weights-bytes")
    (ro / "czii_kit_thresholds.json").write_text("{}")
    home = tmp_path / "home"
    monkeypatch.setenv("CZII_KIT_HOME", str(home))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if os.fspath(p) == os.fspath(ro) else real_access(p, mode))

    digest = file_sha256(w)
    copy = infer._writable_copy(w, digest)
    assert copy.parent.parent == home / "exports" and copy.read_bytes() == b"weights-bytes"
    assert (copy.parent / "czii_kit_thresholds.json").is_file()
    assert infer.export_path(copy, "openvino", 640).parent == copy.parent
    assert infer._writable_copy(w, digest) == copy  # reused

    monkeypatch.setattr(os, "access", real_access)
    assert infer._writable_copy(w, digest) == w  # writable folder: export beside the weights


def test_missing_backend_gives_a_clear_error(monkeypatch, tmp_path):
    import importlib.util

    import pytest

    from czii_kit.errors import CziiKitError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    assert infer.missing_backend_modules("openvino") == ["openvino"]
    assert infer.missing_backend_modules("torch") == []
    with pytest.raises(CziiKitError, match=r"czii_kit\[export\]"):
        infer.Detector(tmp_path / "w.pt", "openvino")
