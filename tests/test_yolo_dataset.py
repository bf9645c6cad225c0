"""Box geometry and the picks -> YOLO dataset builder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pipeline_fixture import VOXEL, make_root

from czii_kit.catalog import class_names, get_particle
from czii_kit.coords import angstrom_to_voxel
from czii_kit.errors import DataError, FileExistsNoForce
from czii_kit.yolo_dataset import Boxes, box_half_side, build_dataset, clip_boxes, slice_boxes


def test_box_half_side_is_the_sphere_cross_section():
    np.testing.assert_allclose(box_half_side(10.0, [0.0, 6.0, -8.0, 10.0, 12.0]), [10.0, 8.0, 6.0, 0.0, 0.0])


def test_slice_boxes_geometry_unequal_axes():
    # one particle, r = 8 voxels, centre z=10.3, y=20, x=45 in a (30, 40, 64) volume
    centres = np.array([[10.3, 20.0, 45.0]])
    boxes = slice_boxes(centres, [8.0], [3], 12, (40, 64), min_frac=0.3)
    half = np.sqrt(64 - 1.7**2)
    assert boxes.cls.tolist() == [3]
    np.testing.assert_allclose(boxes.xyxy[0], [45.5 - half, 20.5 - half, 45.5 + half, 20.5 + half])
    line = boxes.yolo_lines(64, 40)[0].split()
    assert line[0] == "3"
    np.testing.assert_allclose([float(v) for v in line[1:]], [45.5 / 64, 20.5 / 40, 2 * half / 64, 2 * half / 40],
                               atol=1e-6)
    # near the pole the cross-section is tiny: skipped below min_frac * r
    assert len(slice_boxes(centres, [8.0], [3], 18, (40, 64), min_frac=0.3)) == 0  # half = 1.18 < 2.4
    assert len(slice_boxes(centres, [8.0], [3], 18, (40, 64), min_frac=0.1)) == 1
    assert len(slice_boxes(centres, [8.0], [3], 19, (40, 64), min_frac=0.0)) == 0  # outside the sphere


def test_boxes_are_clipped_to_the_image_and_crops():
    boxes = slice_boxes(np.array([[5.0, 2.0, 60.0]]), [6.0], [0], 5, (40, 64))
    x0, y0, x1, y1 = boxes.xyxy[0]
    assert y0 == 0 and x1 == 64 and y1 == pytest.approx(8.5) and x0 == pytest.approx(54.5)
    b = Boxes(np.array([0, 1, 2]), np.array([[10, 10, 20, 20], [28, 10, 38, 20], [35, 35, 45, 45]], float))
    cb = clip_boxes(b, 5, 5, 35, 35, min_visible=0.4)
    # box 0 inside; box 1 keeps 70% of its width; box 2 keeps nothing
    assert cb.cls.tolist() == [0, 1]
    np.testing.assert_allclose(cb.xyxy, [[5, 5, 15, 15], [23, 5, 30, 15]])
    assert clip_boxes(b, 5, 5, 31, 35, min_visible=0.4).cls.tolist() == [0]  # box 1 keeps 30%


def _labels(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(folder.glob("*.txt")):
        txt = f.read_text().strip()
        out[f.stem] = np.array([[float(v) for v in line.split()] for line in txt.splitlines()]).reshape(-1, 5)
    return out


def test_build_dataset_full_slices_match_picks(tmp_path):
    shape = (24, 72, 88)
    picks = make_root(tmp_path / "root", runs=("TS_a", "TS_b", "TS_c"), shape=shape, per_type=1, seed=3)
    data_yaml = build_dataset(tmp_path / "root", tmp_path / "ds", val_runs=["TS_b"], progress=False)
    import yaml

    doc = yaml.safe_load(data_yaml.read_text())
    assert Path(doc["path"]).is_absolute() and Path(doc["path"]) == (tmp_path / "ds").absolute()
    assert doc["names"] == class_names() and doc["train"] == "images/train" and doc["val"] == "images/val"
    manifest = json.loads((tmp_path / "ds" / "czii_kit_dataset.json").read_text())
    assert manifest["train_runs"] == ["TS_a", "TS_c"] and manifest["val_runs"] == ["TS_b"]
    assert manifest["preprocess"]["offsets"] == [-2, 0, 2]
    val_imgs = sorted(p.name for p in (tmp_path / "ds" / "images" / "val").glob("*.png"))
    assert len(val_imgs) == shape[0] and all(n.startswith("TS_b_z") for n in val_imgs)
    import cv2

    im = cv2.imread(str(tmp_path / "ds" / "images" / "val" / val_imgs[0]))
    assert im.shape == (72, 88, 3)
    # every particle is labelled on its central slice, at its (x, y), with its class and size
    labels = _labels(tmp_path / "ds" / "labels" / "val")
    for _, p in picks[picks["experiment"] == "TS_b"].iterrows():
        z, y, x = angstrom_to_voxel([[p.x, p.y, p.z]], VOXEL)[0]
        part = get_particle(p.particle_type)
        lab = labels[f"TS_b_z{int(round(z)):03d}"]
        cx, cy = (x + 0.5) / 88, (y + 0.5) / 72
        d = np.hypot(lab[:, 1] - cx, lab[:, 2] - cy)
        i = int(np.argmin(d))
        assert d[i] < 1e-3 and int(lab[i, 0]) == part.class_id
        r = part.radius / VOXEL
        expect_w = 2 * box_half_side(r, round(z) - z)
        assert lab[i, 3] * 88 == pytest.approx(expect_w, abs=0.01) and lab[i, 4] * 72 == pytest.approx(expect_w, abs=0.01)


def test_build_dataset_crops_seeded_and_refuses_overwrite(tmp_path):
    make_root(tmp_path / "root", runs=("TS_a", "TS_b"), shape=(12, 64, 80), per_type=1, seed=5)
    kw = dict(crop=48, crops_per_slice=2, z_stride=3, seed=7, progress=False)
    a = build_dataset(tmp_path / "root", tmp_path / "a", **kw).parent
    b = build_dataset(tmp_path / "root", tmp_path / "b", **kw).parent
    names = sorted(p.relative_to(a).as_posix() for p in a.rglob("*.png"))
    assert names == sorted(p.relative_to(b).as_posix() for p in b.rglob("*.png"))
    assert len(names) == 2 * 4 * 2  # runs x slices (0,3,6,9) x crops
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes()
        lab = (a / n.replace("images", "labels")).with_suffix(".txt")
        assert lab.read_text() == (b / n.replace("images", "labels")).with_suffix(".txt").read_text()
    for lab in _labels(a / "labels" / "train").values():
        if len(lab):
            assert (lab[:, 1:] >= 0).all() and (lab[:, 1:] <= 1 + 1e-6).all()
    with pytest.raises(FileExistsNoForce):
        build_dataset(tmp_path / "root", tmp_path / "a", **kw)
    build_dataset(tmp_path / "root", tmp_path / "a", overwrite=True, **kw)
    with pytest.raises(DataError, match="TS_zz"):
        build_dataset(tmp_path / "root", tmp_path / "c", val_runs=["TS_zz"], progress=False)
    with pytest.raises(DataError, match="crop"):
        build_dataset(tmp_path / "root", tmp_path / "d", crop=70, progress=False)
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()
    assert not list(tmp_path.glob(".d.tmp-*"))


def test_single_run_validates_on_training_images(tmp_path):
    make_root(tmp_path / "root", runs=("TS_a",), shape=(8, 48, 56), per_type=1, seed=1)
    data_yaml = build_dataset(tmp_path / "root", tmp_path / "ds", progress=False)
    assert "val: images/train" in data_yaml.read_text()


def test_cli_build_dataset(tmp_path, capsys):
    from czii_kit.cli import main

    make_root(tmp_path / "root", runs=("TS_a", "TS_b"), shape=(8, 48, 56), per_type=1, seed=2)
    rc = main(["build-dataset", str(tmp_path / "root"), "--out", str(tmp_path / "ds"), "--crop", "32",
               "--crops-per-slice", "2", "--z-stride", "2", "--val-runs", "TS_b", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0 and "data.yaml" in out and "TS_b" in out
    assert len(list((tmp_path / "ds" / "images" / "train").glob("*.png"))) == 4 * 2
    manifest = json.loads((tmp_path / "ds" / "czii_kit_dataset.json").read_text())
    assert manifest["root"] == str((tmp_path / "root").absolute())  # one root: a path, not a list
    rc = main(["build-dataset", str(tmp_path / "root"), "--out", str(tmp_path / "ds"), "--quiet"])
    assert rc == 2 and "already exists" in capsys.readouterr().err


def test_build_dataset_pools_several_roots(tmp_path, capsys):
    from czii_kit.cli import main
    from czii_kit.picks import read_picks

    a = make_root(tmp_path / "r1", runs=("TS_a", "TS_b"), shape=(8, 48, 56), per_type=1, seed=3)
    b = make_root(tmp_path / "r2", runs=("TS_c",), shape=(8, 48, 56), per_type=1, seed=4)
    both = read_picks([tmp_path / "r1", tmp_path / "r2"], split="train")
    assert len(both) == len(a) + len(b) and set(both["experiment"]) == {"TS_a", "TS_b", "TS_c"}
    rc = main(["build-dataset", str(tmp_path / "r1"), str(tmp_path / "r2"), "--out", str(tmp_path / "ds"),
               "--val-runs", "TS_c", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    manifest = json.loads((tmp_path / "ds" / "czii_kit_dataset.json").read_text())
    assert manifest["train_runs"] == ["TS_a", "TS_b"] and manifest["val_runs"] == ["TS_c"]
    assert manifest["root"] == [str((tmp_path / "r1").absolute()), str((tmp_path / "r2").absolute())]
    assert len(list((tmp_path / "ds" / "images" / "val").glob("TS_c_*.png"))) == 8
    # the same run name under two roots is refused, naming the folder
    make_root(tmp_path / "r3", runs=("TS_a",), shape=(8, 48, 56), per_type=1, seed=5)
    rc = main(["build-dataset", str(tmp_path / "r1"), str(tmp_path / "r3"), "--out", str(tmp_path / "ds2"),
               "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "TS_a" in err and "r3" in err and "distinct names" in err
    assert not (tmp_path / "ds2").exists()


def _add_tomogram(root: Path, run: str, name: str, transform) -> None:
    """Write tomogram ``name`` of ``run`` as ``transform(denoised)``."""
    from czii_kit.tomogram import open_tomogram, write_tomogram

    base = root / "train" / "static" / "ExperimentRuns" / run / "VoxelSpacing10.000"
    vol = open_tomogram(base / "denoised.zarr").read()
    write_tomogram(base / f"{name}.zarr", transform(vol), VOXEL, n_levels=1, chunks=(32, 64, 64))


def test_build_dataset_mixes_tomograms_with_the_same_labels(tmp_path):
    make_root(tmp_path / "root", runs=("TS_a", "TS_b"), shape=(12, 64, 80), per_type=1, seed=5)
    for run in ("TS_a", "TS_b"):
        _add_tomogram(tmp_path / "root", run, "inverted", lambda v: -v)
    kw = dict(crop=48, crops_per_slice=3, z_stride=2, seed=7, progress=False, val_runs=["TS_b"],
              tomogram=["denoised", "inverted"])
    mixed = build_dataset(tmp_path / "root", tmp_path / "mixed", tomogram_weights=[1, 1], **kw).parent
    plain = build_dataset(tmp_path / "root", tmp_path / "plain", tomogram_weights=[1, 0], **kw).parent
    m = json.loads((mixed / "czii_kit_dataset.json").read_text())
    n = 2 * 6 * 3
    assert m["tomogram"] == ["denoised", "inverted"] and sum(m["images_per_tomogram"].values()) == n
    assert min(m["images_per_tomogram"].values()) > 5  # both drawn
    assert json.loads((plain / "czii_kit_dataset.json").read_text())["images_per_tomogram"]["inverted"] == 0
    import cv2

    n_same = n_inverted = 0
    for f in sorted(plain.rglob("*.png")):
        rel = f.relative_to(plain)
        lab = rel.as_posix().replace("images", "labels")[:-4] + ".txt"
        # the crop windows and labels do not depend on which tomogram an image is cut from
        assert (plain / lab).read_text() == (mixed / lab).read_text()
        a, b = cv2.imread(str(f)).astype(int), cv2.imread(str(mixed / rel)).astype(int)
        if np.array_equal(a, b):
            n_same += 1
        elif np.corrcoef(a.ravel(), b.ravel())[0, 1] < -0.9:  # the same crop of the negated volume
            n_inverted += 1
    assert n_same + n_inverted == n and n_inverted == m["images_per_tomogram"]["inverted"]
    kw.pop("tomogram")
    with pytest.raises(DataError, match="no tomogram .missing. .found: denoised, inverted"):
        build_dataset(tmp_path / "root", tmp_path / "x", tomogram=["denoised", "missing"], **kw)
    with pytest.raises(ValueError, match="one non-negative weight per tomogram"):
        build_dataset(tmp_path / "root", tmp_path / "y", tomogram=["denoised", "inverted"], tomogram_weights=[1], **kw)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_build_dataset_degrade_changes_pixels_not_crops(tmp_path):
    make_root(tmp_path / "root", runs=("TS_a",), shape=(8, 64, 80), per_type=1, seed=4)
    kw = dict(crop=48, crops_per_slice=2, seed=3, progress=False)
    plain = build_dataset(tmp_path / "root", tmp_path / "plain", **kw).parent
    deg = build_dataset(tmp_path / "root", tmp_path / "deg", degrade_config={"prob": 0.5}, **kw).parent
    again = build_dataset(tmp_path / "root", tmp_path / "again", degrade_config={"prob": 0.5}, **kw).parent
    m = json.loads((deg / "czii_kit_dataset.json").read_text())
    n = 8 * 2
    assert 0 < m["degraded_images"] < n and m["degrade"]["prob"] == 0.5
    changed = 0
    for f in sorted(plain.rglob("*.png")):
        rel = f.relative_to(plain)
        assert (deg / rel).read_bytes() == (again / rel).read_bytes()  # seeded
        lab = rel.as_posix().replace("images", "labels")[:-4] + ".txt"
        assert (plain / lab).read_text() == (deg / lab).read_text()
        changed += (deg / rel).read_bytes() != f.read_bytes()
    assert changed == m["degraded_images"]
    # re-windowing on top: its own random stream, so the degraded images it leaves alone stay the same
    win = build_dataset(tmp_path / "root", tmp_path / "win", degrade_config={"prob": 0.5},
                        window_config={"prob": 0.5}, **kw).parent
    mw = json.loads((win / "czii_kit_dataset.json").read_text())
    assert 0 < mw["rewindowed_images"] < n and mw["window"]["prob"] == 0.5 and m["rewindowed_images"] == 0
    assert mw["degraded_images"] == m["degraded_images"]
    differ = sum((win / f.relative_to(deg)).read_bytes() != f.read_bytes() for f in deg.rglob("*.png"))
    assert 0 < differ <= mw["rewindowed_images"]


def test_cli_build_dataset_mixing_options(tmp_path, capsys):
    from czii_kit.cli import main

    make_root(tmp_path / "root", runs=("TS_a", "TS_b"), shape=(8, 48, 56), per_type=1, seed=2)
    for run in ("TS_a", "TS_b"):
        _add_tomogram(tmp_path / "root", run, "wbp", lambda v: v + np.float32(3.0))
    rc = main(["build-dataset", str(tmp_path / "root"), "--out", str(tmp_path / "ds"), "--crop", "32",
               "--tomogram", "denoised", "wbp", "--tomogram-weights", "3,1", "--degrade", "0.5", "--window", "0.5", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0 and "images per tomogram: denoised" in out and "degraded:" in out and "re-windowed:" in out
    m = json.loads((tmp_path / "ds" / "czii_kit_dataset.json").read_text())
    assert m["tomogram_weights"] == [0.75, 0.25]
    rc = main(["build-dataset", str(tmp_path / "root"), "--out", str(tmp_path / "e"), "--tomogram", "denoised",
               "wbp", "--tomogram-weights", "1", "--quiet"])
    assert rc == 2 and "--tomogram-weights needs 2" in capsys.readouterr().err
    rc = main(["build-dataset", str(tmp_path / "root"), "--out", str(tmp_path / "e"), "--degrade", "1.5", "--quiet"])
    assert rc == 2 and "--degrade" in capsys.readouterr().err
    rc = main(["build-dataset", str(tmp_path / "root"), "--out", str(tmp_path / "e"), "--window", "2", "--quiet"])
    assert rc == 2 and "--window must be in [0, 1]" in capsys.readouterr().err


def test_build_dataset_resamples_another_voxel_size(tmp_path, capsys):
    """A run stored at twice the voxel size (every 2nd voxel of the same specimen) is resampled to
    the voxel size of most runs: its labels sit at the picks (Å) in the common voxel grid."""
    import shutil

    import cv2

    from czii_kit.cli import main
    from czii_kit.tomogram import open_tomogram, write_tomogram
    from czii_kit.yolo_dataset import common_voxel_size

    shape = (24, 72, 88)
    picks = make_root(tmp_path / "root", runs=("TS_a", "TS_b", "TS_c"), shape=shape, per_type=1, seed=5)
    tomo = tmp_path / "root" / "train" / "static" / "ExperimentRuns" / "TS_c" / "VoxelSpacing10.000" / "denoised.zarr"
    coarse = open_tomogram(tomo).read()[::2, ::2, ::2]  # [z, y, x] (12, 36, 44): voxel j at 2 j VOXEL Å
    shutil.rmtree(tomo)
    write_tomogram(tomo, coarse, 2 * VOXEL, n_levels=1)
    assert common_voxel_size([VOXEL, 2 * VOXEL, VOXEL]) == VOXEL and common_voxel_size([]) is None
    with pytest.warns(UserWarning, match="TS_c.*resampled"):
        build_dataset(tmp_path / "root", tmp_path / "ds", val_runs=["TS_c"], progress=False)
    m = json.loads((tmp_path / "ds" / "czii_kit_dataset.json").read_text())
    assert m["voxel_size"] == {"TS_a": VOXEL, "TS_b": VOXEL, "TS_c": VOXEL}
    assert m["shape_zyx"]["TS_c"] == [23, 71, 87] and m["shape_zyx"]["TS_a"] == list(shape)
    assert m["resampled_from"] == {"TS_c": {"voxel_size": 2 * VOXEL, "shape_zyx": [12, 36, 44]}}
    assert m["grid_voxel_size"] == VOXEL
    val = sorted((tmp_path / "ds" / "images" / "val").glob("*.png"))
    assert len(val) == 23 and cv2.imread(str(val[0])).shape == (71, 87, 3)
    labels = _labels(tmp_path / "ds" / "labels" / "val")
    for _, p in picks[picks["experiment"] == "TS_c"].iterrows():
        z, y, x = angstrom_to_voxel([[p.x, p.y, p.z]], VOXEL)[0]
        lab = labels[f"TS_c_z{int(round(z)):03d}"]
        d = np.hypot(lab[:, 1] - (x + 0.5) / 87, lab[:, 2] - (y + 0.5) / 71)
        i = int(np.argmin(d))
        assert d[i] < 1e-3 and int(lab[i, 0]) == get_particle(p.particle_type).class_id
    # an explicit voxel size: the other two runs are resampled instead (the CLI prints the warning on one line)
    code = main(["build-dataset", str(tmp_path / "root"), "--out", str(tmp_path / "ds2"), "--val-runs", "TS_c",
                 "--voxel-size", str(2 * VOXEL)])
    captured = capsys.readouterr()
    out = captured.out
    assert "warning: " in captured.err and "the dataset's is 20.0249 Å" in captured.err
    assert code == 0 and "resampled to 20.0249 Å voxels: TS_a (10.0124 Å), TS_b (10.0124 Å)" in out
    m = json.loads((tmp_path / "ds2" / "czii_kit_dataset.json").read_text())
    assert m["shape_zyx"] == {"TS_a": [12, 36, 44], "TS_b": [12, 36, 44], "TS_c": [12, 36, 44]}
    assert set(m["resampled_from"]) == {"TS_a", "TS_b"}
    assert main(["build-dataset", str(tmp_path / "root"), "--out", str(tmp_path / "ds3"), "--voxel-size", "0"]) == 2
