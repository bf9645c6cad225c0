"""The density maps shipped in czii_kit/assets: packing, reading, defaults, and the simulator's output."""

from __future__ import annotations

import configparser
import fnmatch
import json

import mrcfile
import numpy as np
import pytest

from czii_kit.catalog import PARTICLE_NAMES
from czii_kit.checksum import file_sha256
from czii_kit.cli import main
from czii_kit.errors import DataError
from czii_kit.maps import (
    ALL_MAP_NAMES,
    PROCEDURAL,
    SHIPPED,
    load_models,
    map_file,
    map_sources,
    maps_option,
    read_packed_maps,
    shipped_maps_path,
)
from czii_kit.synthetic import generate_dataset, simulate_run
from czii_kit.synthetic.simulate import get_models

REPO = shipped_maps_path().parents[2]


def _blob_maps(folder, seed=0):
    """Seven small synthetic MRC maps (a Gaussian blob each, one size per map) named as in the catalog."""
    folder.mkdir()
    rng = np.random.default_rng(seed)
    arrays = {}
    for i, name in enumerate(ALL_MAP_NAMES):
        n = 12 + i
        g = np.indices((n, n, n)) - (n - 1) / 2
        a = (np.exp(-(g**2).sum(0) / (2 * (2 + 0.3 * i) ** 2)) * 15 + rng.normal(0, 1e-3, (n,) * 3))
        arrays[map_file(name)] = a.astype(np.float32)
        with mrcfile.new(folder / map_file(name)) as m:
            m.set_data(arrays[map_file(name)])
            m.voxel_size = 10.0
    return arrays


def test_pack_and_info_round_trip(tmp_path, capsys):
    arrays = _blob_maps(tmp_path / "maps")
    out = tmp_path / "packed.npz"
    assert main(["maps", "pack", str(tmp_path / "maps"), "--out", str(out)]) == 0
    packed, meta = read_packed_maps(out)
    assert set(packed) == set(arrays) and meta["dtype"] == "float16"
    assert meta["command"] == f"czii-kit maps pack {tmp_path / 'maps'} --out {out}"
    for f, a in arrays.items():
        got, vs = packed[f]
        assert got.dtype == np.float32 and vs == pytest.approx(10.0)
        np.testing.assert_allclose(got, a, rtol=1e-3, atol=1e-6)  # float16 rounding
        assert meta["maps"][f]["sha256"] == file_sha256(tmp_path / "maps" / f)
    assert main(["maps", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "float16" in text and all(f in text for f in arrays)
    # no silent overwrite; --force replaces
    assert main(["maps", "pack", str(tmp_path / "maps"), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["maps", "pack", str(tmp_path / "maps"), "--out", str(out), "--force"]) == 0
    # a missing map is named
    (tmp_path / "maps" / "8vaf.mrc").unlink()
    assert main(["maps", "pack", str(tmp_path / "maps"), "--out", str(tmp_path / "x.npz")]) == 2
    assert "8vaf.mrc" in capsys.readouterr().err and not (tmp_path / "x.npz").exists()


def test_bad_packed_file_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip archive" * 10)
    with pytest.raises(DataError, match="bad.npz.*not a readable packed-maps file"):
        read_packed_maps(bad)
    other = tmp_path / "other.npz"
    np.savez(other, meta=np.frombuffer(json.dumps({"format": "something else"}).encode(), np.uint8))
    with pytest.raises(DataError, match="not a czii_kit packed-maps file"):
        read_packed_maps(other)
    with pytest.raises(DataError, match="not found"):
        read_packed_maps(tmp_path / "missing.npz")


def test_maps_option_and_defaults(tmp_path):
    assert maps_option("shipped") == SHIPPED and maps_option("Shipped") == SHIPPED
    assert maps_option(None) == maps_option("none") == maps_option("procedural") == PROCEDURAL
    assert maps_option(tmp_path) == tmp_path
    with pytest.raises(DataError, match="nowhere.*density map folder not found"):
        maps_option(tmp_path / "nowhere")
    with pytest.raises(DataError, match="procedural"):
        load_models(PROCEDURAL)
    shipped = get_models()  # the default: the shipped maps
    assert set(shipped) == set(PARTICLE_NAMES) | {"distractor"}
    assert all("density_maps.npz" in m.source for m in shipped.values())
    assert all(m.source == "procedural" for m in get_models("procedural").values())
    # the shipped maps keep the proteins' relative masses
    assert shipped["ribosome"].mass_fraction_volume > 20 * shipped["beta-amylase"].mass_fraction_volume


def test_synth_defaults_to_shipped_maps_and_records_them(tmp_path):
    root = generate_dataset(tmp_path / "ds", n_train=1, n_test=0, size="tiny", seed=5, progress=False)
    info = json.loads((root / "synthetic.json").read_text())
    assert "shipped" in info["maps_dir"] and info["picks_naming"]["naming"] == "kaggle"
    assert main(["synth", "--out", str(tmp_path / "p"), "--runs", "1", "--test-runs", "0", "--size", "tiny",
                 "--maps", "procedural", "--quiet"]) == 0
    assert json.loads((tmp_path / "p" / "synthetic.json").read_text())["maps_dir"] == "procedural"


def test_shipped_maps_are_the_reference_maps(shared_data):
    """The shipped file holds the reference MRC maps (same SHA-256 recorded, values within float16 rounding)."""
    folder = shared_data / "density_maps"
    if not folder.is_dir():
        pytest.skip("no density maps in the shared data")
    packed, meta = read_packed_maps()
    assert meta["command"].startswith("czii-kit maps pack ")
    assert sorted(packed) == sorted(map_file(n) for n in ALL_MAP_NAMES)
    for name in ALL_MAP_NAMES:
        f = folder / map_file(name)
        assert meta["maps"][f.name]["sha256"] == file_sha256(f), f.name
        with mrcfile.open(f, permissive=True) as m:
            ref = np.asarray(m.data, np.float32)
        np.testing.assert_allclose(packed[f.name][0], ref, rtol=1e-3, atol=1e-6)
    assert map_sources(SHIPPED, PARTICLE_NAMES) == map_sources(folder, PARTICLE_NAMES)
    a, b = load_models(SHIPPED), load_models(folder)
    for name in ALL_MAP_NAMES:
        np.testing.assert_allclose(a[name].center, b[name].center, atol=1e-3)
        assert a[name].radius == pytest.approx(b[name].radius, rel=1e-3)


def test_simulator_output_unchanged_with_shipped_maps(shared_data):
    """Same seed, shipped (float16) maps vs the MRC maps: the same particles, centres within 0.01 Å;
    tomograms differ far below the noise.

    Measured on a small run (92x316x316, seed 2024): RMS difference / tomogram std 6.0e-5 (denoised)
    and 1.2e-5 (WBP), largest voxel difference 0.0025 std; on this tiny one picks move by < 0.001 Å.
    """
    folder = shared_data / "density_maps"
    if not folder.is_dir():
        pytest.skip("no density maps in the shared data")
    a, pa = simulate_run("tiny", seed=2024, maps=SHIPPED)
    b, pb = simulate_run("tiny", seed=2024, maps=folder)
    assert list(pa["particle_type"]) == list(pb["particle_type"]) and len(pa) > 0
    np.testing.assert_allclose(pa[["x", "y", "z"]].to_numpy(), pb[["x", "y", "z"]].to_numpy(), atol=1e-2)
    for k in a:
        d = (a[k] - b[k]).astype(np.float64)
        assert np.sqrt((d**2).mean()) < 1e-3 * a[k].std(), k
        assert np.abs(d).max() < 2e-2 * a[k].std(), k


def test_templates_from_shipped_maps_match_the_shipped_templates(tmp_path):
    from czii_kit.predict import MODELS_DIR
    from czii_kit.templates import TEMPLATES_FILE, load_templates

    shipped, meta = load_templates(MODELS_DIR / TEMPLATES_FILE)
    assert main(["templates", "--out", str(tmp_path / "t.npz")]) == 0  # default: the shipped maps
    built, meta2 = load_templates(tmp_path / "t.npz")
    assert list(built) == list(shipped)
    for k in built:
        assert built[k].density.shape == shipped[k].density.shape
        np.testing.assert_allclose(built[k].density, shipped[k].density, atol=2e-3 * shipped[k].density.max())
        np.testing.assert_allclose(built[k].center, shipped[k].center, atol=1e-3)
    assert meta2["sources"] == meta["sources"]  # the same source maps, by SHA-256


def test_assets_are_package_data():
    """setup.cfg's package_data carries the packed maps and their licence notice into the wheel."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    patterns = [p.strip() for p in cfg["options.package_data"]["czii_kit"].split(",")]
    for name in ("density_maps.npz", "NOTICE-polnet.txt"):
        assert (REPO / "czii_kit" / "assets" / name).is_file()
        assert any(fnmatch.fnmatch(f"assets/{name}", p) for p in patterns), patterns
    notice = (REPO / "czii_kit" / "assets" / "NOTICE-polnet.txt").read_text()
    assert "Apache License" in notice and "Version 2.0" in notice and "polnet" in notice
    assert "END OF TERMS AND CONDITIONS" in notice
