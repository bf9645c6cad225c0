"""Turn a dataset root (tomograms + picks) into an ultralytics YOLO detection dataset.

Geometry: a particle of radius ``r`` (voxels) centred at fractional voxel index ``(z0, y0, x0)``
cuts slice ``z`` in a disc of radius ``sqrt(r^2 - (z - z0)^2)``; its label on that slice is the
square box of that half-side around ``(x0, y0)``. Slices where the half-side is below
``min_frac * r`` are skipped (the particle is barely visible there).

Pixel convention: image pixel ``i`` covers ``[i, i + 1)`` in ultralytics' box coordinates, so the
centre of voxel index ``x`` sits at box coordinate ``x + 0.5``. :mod:`czii_kit.infer` undoes this
(``voxel index = box centre - 0.5``).

Layout written::

    out/images/{train,val}/{run}_z{z:03d}[_c{k}].png     (2.5D stacks, uint8, channels = z offsets)
    out/labels/{train,val}/{run}_z{z:03d}[_c{k}].txt     (YOLO: class cx cy w h, normalised)
    out/data.yaml                                        (absolute path, names from the catalog)
    out/czii_kit_dataset.json                            (config, runs, counts: read back by training)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from czii_kit import __version__
from czii_kit.atomic import atomic_dir, read_json
from czii_kit.augment import DegradeConfig, WindowConfig, degrade, rewindow
from czii_kit.catalog import class_names, get_particle
from czii_kit.coords import angstrom_to_voxel
from czii_kit.errors import DataError, FileExistsNoForce
from czii_kit.layout import find_runs
from czii_kit.picks import read_picks
from czii_kit.preprocess import (
    PreprocessConfig,
    resample_to,
    resampled_shape,
    robust_window,
    slice_indices,
    stack_slice,
    to_uint8,
)
from czii_kit.tomogram import open_tomogram

MANIFEST = "czii_kit_dataset.json"


@dataclass
class Boxes:
    """Boxes on one image: ``cls (N,)`` int, ``xyxy (N, 4)`` float pixel coordinates."""

    cls: np.ndarray
    xyxy: np.ndarray

    def __len__(self) -> int:
        return len(self.cls)

    def yolo_lines(self, width: int, height: int) -> list[str]:
        """``"class cx cy w h"`` lines normalised by the image size."""
        out = []
        for c, (x0, y0, x1, y1) in zip(self.cls, self.xyxy, strict=True):
            out.append(
                f"{int(c)} {(x0 + x1) / 2 / width:.6f} {(y0 + y1) / 2 / height:.6f} "
                f"{(x1 - x0) / width:.6f} {(y1 - y0) / height:.6f}"
            )
        return out


def box_half_side(radius: np.ndarray, dz: np.ndarray) -> np.ndarray:
    """Half side ``sqrt(r^2 - dz^2)`` of the box of a sphere of radius ``r`` at depth offset ``dz`` (0 outside)."""
    r = np.asarray(radius, dtype=float)
    d = np.asarray(dz, dtype=float)
    return np.sqrt(np.clip(r**2 - d**2, 0.0, None))


def slice_boxes(centres_zyx: np.ndarray, radii: np.ndarray, classes: np.ndarray, z: int,
                shape_yx: tuple[int, int], min_frac: float = 0.3) -> Boxes:
    """Boxes of every particle cutting slice ``z``.

    Parameters
    ----------
    centres_zyx : ndarray ``(N, 3)``
        Particle centres as fractional voxel indices ``(z, y, x)``.
    radii : ndarray ``(N,)``
        Radii in voxels.
    classes : ndarray ``(N,)``
        YOLO class ids.
    z : int
        Slice index.
    shape_yx : (ny, nx)
        Image size; boxes are clipped to it, fully outside ones dropped.
    min_frac : float
        Skip a particle on this slice when its half-side is below ``min_frac * r``.
    """
    c = np.asarray(centres_zyx, dtype=float).reshape(-1, 3)
    r = np.asarray(radii, dtype=float).reshape(-1)
    half = box_half_side(r, z - c[:, 0])
    keep = (half > 0) & (half >= min_frac * r)
    cx, cy, h = c[keep, 2] + 0.5, c[keep, 1] + 0.5, half[keep]
    xyxy = np.stack([cx - h, cy - h, cx + h, cy + h], axis=1) if keep.any() else np.empty((0, 4))
    return clip_boxes(Boxes(np.asarray(classes)[keep].astype(int), xyxy), 0, 0, shape_yx[1], shape_yx[0], 0.0)


def clip_boxes(boxes: Boxes, x0: float, y0: float, x1: float, y1: float, min_visible: float = 0.4) -> Boxes:
    """Boxes clipped to the window ``[x0, x1) x [y0, y1)`` and shifted to its origin.

    Boxes keeping less than ``min_visible`` of their area (or none) are dropped.
    """
    if len(boxes) == 0:
        return Boxes(np.empty(0, int), np.empty((0, 4)))
    b = boxes.xyxy
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    cb = np.stack([np.clip(b[:, 0], x0, x1), np.clip(b[:, 1], y0, y1),
                   np.clip(b[:, 2], x0, x1), np.clip(b[:, 3], y0, y1)], axis=1)
    vis = (cb[:, 2] - cb[:, 0]) * (cb[:, 3] - cb[:, 1])
    keep = (vis > 0) & (vis >= min_visible * np.maximum(area, 1e-9))
    cb = cb[keep] - np.array([x0, y0, x0, y0], dtype=float)
    return Boxes(boxes.cls[keep], cb)


def particle_table(picks: pd.DataFrame, voxel_size: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(centres_zyx (N,3), radii_vox (N,), classes (N,))`` from a picks table of one run."""
    if len(picks) == 0:
        return np.empty((0, 3)), np.empty(0), np.empty(0, int)
    centres = angstrom_to_voxel(picks[["x", "y", "z"]].to_numpy(float), voxel_size)
    parts = [get_particle(t) for t in picks["particle_type"]]
    radii = np.array([p.radius for p in parts]) / voxel_size
    classes = np.array([p.class_id for p in parts], dtype=int)
    return centres, radii, classes


def _imwrite(path: Path, img: np.ndarray) -> None:
    import cv2

    if not cv2.imwrite(str(path), img):
        raise OSError(f"{path}: cannot write image")


def _image(stacks: dict, i: int, vols: list, windows: list, z: int, cfg: PreprocessConfig) -> np.ndarray:
    """The uint8 2.5D image of slice ``z`` of tomogram ``i``, made once per slice (kept in ``stacks``)."""
    if i not in stacks:
        stacks[i] = to_uint8(stack_slice(vols[i], z, windows[i], cfg))
    return stacks[i]


def _draw(rng: np.random.Generator, weights: np.ndarray) -> int:
    """Index of the tomogram an image is cut from (``weights`` normalised; no draw for a single one)."""
    return int(rng.choice(len(weights), p=weights)) if len(weights) > 1 else 0


def choose_val_runs(run_names: Sequence[str], val_fraction: float = 0.2, seed: int = 0) -> list[str]:
    """A seeded choice of validation runs: ``round(val_fraction * n)`` runs, at least 1 when there are 2+."""
    names = sorted(run_names)
    if len(names) < 2:
        return []
    k = min(len(names) - 1, max(1, int(round(val_fraction * len(names)))))
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(names, size=k, replace=False).tolist())


def build_dataset(
    root: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    split: str = "train",
    tomogram: str | Sequence[str] = "denoised",
    runs: Sequence[str] | None = None,
    val_runs: Sequence[str] | None = None,
    val_fraction: float = 0.2,
    crop: int | None = None,
    crops_per_slice: int = 1,
    full_slices: bool | None = None,
    z_stride: int = 1,
    min_frac: float = 0.3,
    min_visible: float = 0.4,
    preprocess: PreprocessConfig | dict | None = None,
    tomogram_weights: Sequence[float] | None = None,
    degrade_config: DegradeConfig | dict | None = None,
    window_config: WindowConfig | dict | None = None,
    voxel_size: float | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Build a YOLO detection dataset from a dataset root; return the path of ``data.yaml``.

    Parameters
    ----------
    root : path-like or sequence of path-like
        Dataset root (Kaggle layout) with tomograms and picks, or several roots whose runs are
        pooled (run names must differ).
    out_dir : path-like
        New dataset folder (written to a temporary sibling, renamed at the end).
    split : str
        Split of ``root`` to read (``"train"``).
    tomogram : str or sequence of str
        Tomogram name (``"denoised"``, ``"wbp"``, ...), or several: each image is then cut from
        one of them drawn at random (``tomogram_weights``), the labels being the same.
    runs : sequence of str, optional
        Restrict to these runs.
    val_runs : sequence of str, optional
        Validation runs; default a seeded ``val_fraction`` of the runs. With a single run the
        training images double as validation images.
    crop : int, optional
        Side of random square crops (pixels); ``None`` = full slices.
    crops_per_slice : int
        Random crops per slice.
    full_slices : bool, optional
        Also write full slices when cropping (default: only when ``crop`` is None).
    z_stride : int
        Use every ``z_stride``-th slice.
    min_frac : float
        Skip a particle on a slice where its box half-side is below ``min_frac * r``.
    min_visible : float
        Drop a cropped box keeping less than this fraction of its area.
    preprocess : PreprocessConfig or dict, optional
        Normalisation/stacking (recorded in the manifest; training copies it beside the weights).
    tomogram_weights : sequence of float, optional
        Relative frequency of each of several tomograms (default: equal).
    degrade_config : DegradeConfig or dict, optional
        Blur + noise augmentation of a random fraction of the images (:func:`czii_kit.augment.degrade`).
    window_config : WindowConfig or dict, optional
        Intensity-window augmentation of a random fraction of the images, after any degrading
        (:func:`czii_kit.augment.rewindow`).
    voxel_size : float, optional
        Å per voxel of the images: a tomogram whose voxel size differs by more than
        :data:`czii_kit.preprocess.RESAMPLE_TOLERANCE` is resampled to it
        (:func:`czii_kit.preprocess.resample_to`; a warning names it), so that runs of several voxel
        sizes train at one scale, the one ``predict`` later resamples to. Default: the voxel size of
        most runs (:func:`common_voxel_size`; a dataset of one voxel size is used as it is).
    seed : int
        Same seed, same dataset.
    overwrite : bool
        Replace an existing ``out_dir``; otherwise :class:`FileExistsNoForce`.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir).absolute()
    cfg = preprocess if isinstance(preprocess, PreprocessConfig) else PreprocessConfig.from_dict(preprocess)
    if out_dir.exists() and not overwrite:
        raise FileExistsNoForce(f"{out_dir}: already exists (use --force / overwrite=True to replace it)")
    if crop is not None and crop < 32:
        raise ValueError(f"crop must be >= 32 pixels, got {crop}")
    if full_slices is None:
        full_slices = crop is None
    if not full_slices and crop is None:
        raise ValueError("nothing to write: full_slices=False and no crop")
    roots = [str(Path(r).absolute()) for r in ([root] if isinstance(root, (str, Path)) else root)]
    tomo_names = [tomogram] if isinstance(tomogram, str) else list(tomogram)
    if not tomo_names or len(set(tomo_names)) != len(tomo_names):
        raise ValueError(f"tomogram names must be distinct and at least one, got {tomo_names}")
    if tomogram_weights is None:
        tomogram_weights = [1.0] * len(tomo_names)
    tw = np.asarray(tomogram_weights, dtype=float)
    if tw.shape != (len(tomo_names),) or (tw < 0).any() or not tw.sum() > 0:
        raise ValueError(f"need one non-negative weight per tomogram {tomo_names}, got {list(tomogram_weights)}")
    tw = tw / tw.sum()
    dcfg = degrade_config if isinstance(degrade_config, DegradeConfig) else DegradeConfig(**(degrade_config or {}))
    all_runs = find_runs(root, split)
    if runs is not None:
        wanted = set(runs)
        missing = wanted - {r.name for r in all_runs}
        if missing:
            raise DataError(root, f"no run(s) {sorted(missing)} in split {split!r}")
        all_runs = [r for r in all_runs if r.name in wanted]
    names = [r.name for r in all_runs]
    if val_runs is None:
        val = choose_val_runs(names, val_fraction, seed)
    else:
        val = sorted(set(val_runs))
        missing = set(val) - set(names)
        if missing:
            raise DataError(root, f"validation run(s) {sorted(missing)} not among the runs {names}")
    picks = read_picks(root, split=split, runs=names)
    rng = np.random.default_rng(seed)
    aug_rng = np.random.default_rng([seed, 1])  # its own stream: degrading leaves the crops unchanged
    win_rng = np.random.default_rng([seed, 2])  # and re-windowing leaves both unchanged
    wcfg = window_config if isinstance(window_config, WindowConfig) else WindowConfig(**(window_config or {}))

    counts = {"train": {"images": 0, "boxes": 0}, "val": {"images": 0, "boxes": 0}}
    per_tomogram = {n: 0 for n in tomo_names}
    n_degraded = n_rewindowed = 0
    per_class = {n: 0 for n in class_names().values()}
    voxel_sizes, shapes, resampled = {}, {}, {}
    with atomic_dir(out_dir) as tmp:
        for sub in ("train", "val"):
            (tmp / "images" / sub).mkdir(parents=True)
            (tmp / "labels" / sub).mkdir(parents=True)
        tomos = {r.name: [open_tomogram(r.tomogram_path(t)) for t in tomo_names] for r in all_runs}
        for run in all_runs:
            first = tomos[run.name][0]
            for t in tomos[run.name][1:]:
                if t.shape != first.shape:
                    raise DataError(t.path, f"shape {t.shape} differs from {first.path} {first.shape}")
        if voxel_size is None:
            voxel_size = common_voxel_size([t[0].voxel_size for t in tomos.values()])
        elif not voxel_size > 0:
            raise ValueError(f"voxel_size must be > 0 Å, got {voxel_size!r}")
        new_shape = {n: resampled_shape(t[0].shape, t[0].voxel_size, voxel_size) for n, t in tomos.items()}
        total = sum(len(slice_indices(shape[0], z_stride)) for shape in new_shape.values())
        bar = tqdm(total=total, desc="build-dataset", unit="slice", disable=not progress)
        for run in all_runs:
            sub = "val" if run.name in val else "train"
            tomo = tomos[run.name][0]
            vols, run_vs = [], tomo.voxel_size
            for t in tomos[run.name]:
                v, run_vs = resample_to(t.read(), t.voxel_size, voxel_size, source=t.path,  # [z, y, x]
                                        target_of="the dataset's", purpose="(labels in that grid)")
                vols.append(v)
            shape = vols[0].shape
            voxel_sizes[run.name], shapes[run.name] = run_vs, shape
            if run_vs != tomo.voxel_size:
                resampled[run.name] = {"voxel_size": tomo.voxel_size, "shape_zyx": list(tomo.shape)}
            windows = [robust_window(v, cfg.lo, cfg.hi, cfg.sample_step, cfg.invert, source=t.path)
                       for v, t in zip(vols, tomos[run.name], strict=True)]
            centres, radii, classes = particle_table(picks[picks["experiment"] == run.name], run_vs)
            ny, nx = shape[1:]
            if crop is not None and (crop > ny or crop > nx):
                raise DataError(tomo.path, f"crop {crop} is larger than the slice {ny}x{nx}")
            for z in slice_indices(shape[0], z_stride):
                stacks: dict[int, np.ndarray] = {}  # tomogram index -> 2.5D image of slice z
                boxes = slice_boxes(centres, radii, classes, int(z), (ny, nx), min_frac)
                items = []
                if full_slices:
                    i = _draw(rng, tw)
                    items.append((f"{run.name}_z{z:03d}", i, _image(stacks, i, vols, windows, int(z), cfg), boxes))
                if crop is not None:
                    for k in range(crops_per_slice):
                        y0 = int(rng.integers(0, ny - crop + 1))
                        x0 = int(rng.integers(0, nx - crop + 1))
                        i = _draw(rng, tw)
                        cb = clip_boxes(boxes, x0, y0, x0 + crop, y0 + crop, min_visible)
                        img = _image(stacks, i, vols, windows, int(z), cfg)
                        items.append((f"{run.name}_z{z:03d}_c{k}", i, img[y0 : y0 + crop, x0 : x0 + crop], cb))
                for stem, i, im, bx in items:
                    h, w = im.shape[:2]
                    if dcfg.prob > 0 and aug_rng.random() < dcfg.prob:
                        im = degrade(im, aug_rng, dcfg)
                        n_degraded += 1
                    if wcfg.prob > 0 and win_rng.random() < wcfg.prob:
                        im = rewindow(im, win_rng, wcfg)
                        n_rewindowed += 1
                    per_tomogram[tomo_names[i]] += 1
                    _imwrite(tmp / "images" / sub / f"{stem}.png", np.ascontiguousarray(im))
                    lines = bx.yolo_lines(w, h)
                    (tmp / "labels" / sub / f"{stem}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
                    counts[sub]["images"] += 1
                    counts[sub]["boxes"] += len(bx)
                    for c in bx.cls:
                        per_class[class_names()[int(c)]] += 1
                bar.update(1)
            del vols
        bar.close()
        val_dir = "images/val" if counts["val"]["images"] else "images/train"
        yaml_text = (
            f"# written by czii_kit {__version__} (czii_kit.yolo_dataset.build_dataset)\n"
            f"path: {json.dumps(str(out_dir))}\n"
            "train: images/train\n"
            f"val: {val_dir}\n"
            f"nc: {len(class_names())}\n"
            "names:\n" + "".join(f"  {k}: {v}\n" for k, v in class_names().items())
        )
        (tmp / "data.yaml").write_text(yaml_text)
        manifest = {
            "czii_kit_version": __version__,
            "root": roots[0] if len(roots) == 1 else roots,
            "split": split,
            "tomogram": tomo_names[0] if len(tomo_names) == 1 else tomo_names,
            "tomogram_weights": tw.tolist(),
            "images_per_tomogram": per_tomogram,
            "degrade": dcfg.to_dict(),
            "degraded_images": n_degraded,
            "window": wcfg.to_dict(),
            "rewindowed_images": n_rewindowed,
            "preprocess": cfg.to_dict(),
            "crop": crop,
            "crops_per_slice": crops_per_slice if crop is not None else 0,
            "full_slices": bool(full_slices),
            "z_stride": z_stride,
            "min_frac": min_frac,
            "min_visible": min_visible,
            "seed": seed,
            "train_runs": [n for n in names if n not in val],
            "val_runs": val,
            "val_is_train": not counts["val"]["images"],
            "voxel_size": voxel_sizes,
            "grid_voxel_size": float(voxel_size),
            "shape_zyx": {k: list(v) for k, v in shapes.items()},
            "resampled_from": resampled,
            "counts": counts,
            "boxes_per_class": per_class,
            "names": class_names(),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out_dir / "data.yaml"


def common_voxel_size(sizes: Sequence[float]) -> float | None:
    """The voxel size (Å) most of ``sizes`` share (compared rounded to 0.001 Å; a tie goes to the one
    seen first); ``None`` for no sizes."""
    rounded = [round(float(v), 3) for v in sizes]
    if not rounded:
        return None
    best = max(dict.fromkeys(rounded), key=rounded.count)  # dict keeps first-seen order for ties
    return float(next(v for v, r in zip(sizes, rounded, strict=True) if r == best))


def read_manifest(data_yaml: str | Path) -> dict:
    """The ``czii_kit_dataset.json`` beside a ``data.yaml`` (``{}`` when absent)."""
    return read_json(Path(data_yaml).parent / MANIFEST)
