"""Training the 3D rescorer: patches from labelled runs, the training loop, the rescorer file.

:func:`collect_patches` cuts cubes of :data:`STORE_SIZE` voxels around the reference picks of
training runs, random background and the detector's own candidates (labelled by the nearest
reference: the hard negatives that matter); :func:`train_rescorer` trains
:func:`czii_kit.rescore.build_network` on random 32³ crops of them and writes the rescorer file
(state dict + ``meta``) that :class:`czii_kit.rescore.Rescorer` loads.

Arrays are indexed ``[z, y, x]``; points are ``(x, y, z)`` in Å, converted with :mod:`czii_kit.coords` only.
"""

from __future__ import annotations

import datetime as _dt
import json
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree
from tqdm.auto import tqdm

from czii_kit import __version__
from czii_kit.atomic import atomic_write
from czii_kit.bundle import ModelBundle
from czii_kit.catalog import PARTICLE_NAMES, get_particle
from czii_kit.checksum import file_sha256
from czii_kit.coords import nearest_voxel, voxel_to_angstrom
from czii_kit.errors import DataError, FileExistsNoForce
from czii_kit.infer import detect_runs
from czii_kit.metric import DISTANCE_MULTIPLIER
from czii_kit.postprocess import merge_detections
from czii_kit.preprocess import PreprocessConfig
from czii_kit.rescore import BACKGROUND, CLASSES, Rescorer, build_network
from czii_kit.tomogram import open_tomogram
from czii_kit.volumes import (
    PATCH_SIZE,
    centre_crop,
    extract_patches,
    load_volume,
    normalised_volume,
    standardise,
)

STORE_SIZE = 36
"""Side of the stored training patches: random 32³ crops of them shift the centre by up to 2 voxels."""


def augment(patches: np.ndarray, rng: np.random.Generator, size: int = PATCH_SIZE) -> np.ndarray:
    """Random crop (centre shift), flips of each axis, a quarter turn in y/x, contrast and noise.

    ``patches (N, S, S, S)`` with ``S >= size`` -> float32 ``(N, size, size, size)``, not standardised.
    The whole batch shares crop offset and orientation (cheap); contrast and noise are per patch.
    """
    s = patches.shape[1]
    oz, oy, ox = rng.integers(0, s - size + 1, 3)
    x = patches[:, oz:oz + size, oy:oy + size, ox:ox + size]
    x = np.rot90(x, int(rng.integers(4)), axes=(2, 3))
    for ax in (1, 2, 3):
        if rng.random() < 0.5:
            x = np.flip(x, ax)
    x = np.ascontiguousarray(x, dtype=np.float32)
    mean = x.mean((1, 2, 3), keepdims=True)
    gain = rng.uniform(0.7, 1.3, (len(x), 1, 1, 1)).astype(np.float32)
    noise = rng.normal(0.0, 1.0, x.shape).astype(np.float32)
    noise *= (x.std((1, 2, 3), keepdims=True) * rng.uniform(0.0, 0.5, (len(x), 1, 1, 1))).astype(np.float32)
    return (x - mean) * gain + mean + noise


# --- training data ---------------------------------------------------------------------------


def label_points(points_xyz, experiment: str, solution: pd.DataFrame,
                 distance_multiplier: float = DISTANCE_MULTIPLIER) -> np.ndarray:
    """Class index of what lies at each point ``(N, 3)`` (x, y, z Å) of one run.

    The type of the nearest reference within ``distance_multiplier * radius`` of that type (the
    metric's hit rule), else :data:`BACKGROUND`.
    """
    pts = np.asarray(points_xyz, float).reshape(-1, 3)
    labels = np.full(len(pts), BACKGROUND, np.int64)
    best = np.full(len(pts), np.inf)
    sol = solution[solution["experiment"].astype(str) == str(experiment)]
    for name, g in sol.groupby("particle_type"):
        p = get_particle(name)
        d, _ = cKDTree(g[["x", "y", "z"]].to_numpy(float)).query(pts)
        rel = d / p.radius
        hit = (rel <= distance_multiplier) & (rel < best)
        labels[hit] = PARTICLE_NAMES.index(p.name)
        best[hit] = rel[hit]
    return labels


def background_points(shape_zyx: Sequence[int], reference_zyx: np.ndarray, n: int, rng: np.random.Generator,
                      min_distance: float = 8.0) -> np.ndarray:
    """``n`` random voxel indices ``(n, 3)`` (z, y, x) at least ``min_distance`` voxels from every reference."""
    tree = cKDTree(reference_zyx) if len(reference_zyx) else None
    found: list[np.ndarray] = []
    have = 0
    for _ in range(100):
        q = rng.uniform([0, 0, 0], np.asarray(shape_zyx) - 1, (max(4 * n, 16), 3))
        if tree is not None:
            q = q[tree.query(q)[0] >= min_distance]
        found.append(q[: n - have])
        have += len(found[-1])
        if have >= n:
            break
    return np.rint(np.concatenate(found)).astype(np.int64) if found else np.zeros((0, 3), np.int64)


def collect_patches(runs: Sequence, solution: pd.DataFrame, candidates: pd.DataFrame | None = None,
                    tomograms: Sequence[str] = ("denoised",), background_ratio: float = 1.0,
                    preprocess: PreprocessConfig | None = None, seed: int = 0, progress: bool = True,
                    smooth: str | float = "auto", voxel_size: float | None = None, flatten: str = "auto") -> dict:
    """Training patches of ``runs``: references, random background and (optionally) detector candidates.

    Parameters
    ----------
    runs : sequence of czii_kit.layout.Run
    solution : DataFrame
        Reference picks of those runs (``experiment, particle_type, x, y, z`` Å).
    candidates : DataFrame, optional
        Detector candidates (``experiment, x, y, z``), labelled with :func:`label_points`; one patch
        per distinct voxel.
    tomograms : sequence of str
        Tomogram kinds to cut from (each run's missing kinds are skipped).
    background_ratio : float
        Random background patches per reference.
    smooth : "auto" or float
        Low-pass of each tomogram before cutting, as at inference (:class:`czii_kit.infer.InferenceConfig`;
        the shipped rescorer's patches were cut with 0, before the option existed).
    voxel_size : float, optional
        Resample tomograms whose voxel size differs to this one (Å; :func:`czii_kit.infer.load_volume`).
    flatten : {"auto", "on", "off"}
        Background flattening, as at inference (:class:`czii_kit.infer.InferenceConfig`).

    Returns
    -------
    dict
        ``X`` float16 ``(N, 36, 36, 36)``, ``y`` int64 class indices, ``run`` and ``source``
        (``"reference"``, ``"background"``, ``"candidate"``) and ``tomogram`` per patch.
    """


    rng = np.random.default_rng(seed)
    X, y, run_of, source, kind_of = [], [], [], [], []
    jobs = [(r, k) for r in runs for k in tomograms if k in r.tomograms()]
    if not jobs:
        raise DataError([str(d) for r in runs for d in r.dirs[:1]] or None,
                        f"no tomograms {list(tomograms)} in these runs")
    for run, kind in tqdm(jobs, desc="patches", unit="tomogram", disable=not progress):
        tomo = open_tomogram(run.tomogram_path(kind))
        vol, vs = load_volume(tomo, voxel_size)
        vol = normalised_volume(vol, preprocess, "dark", tomo.path, smooth, flatten)
        sol = solution[solution["experiment"].astype(str) == run.name]
        ref_xyz = sol[["x", "y", "z"]].to_numpy(float)
        ref = nearest_voxel(ref_xyz, vs)
        ref_labels = np.array([PARTICLE_NAMES.index(get_particle(n).name) for n in sol["particle_type"]], np.int64)
        parts = [(ref, ref_labels, "reference")]
        nb = int(round(background_ratio * max(len(ref), 1)))
        parts.append((background_points(vol.shape, ref.astype(float), nb, rng), None, "background"))
        if candidates is not None:
            c = candidates[candidates["experiment"].astype(str) == run.name]
            if len(c):
                vox = np.unique(nearest_voxel(c[["x", "y", "z"]].to_numpy(float), vs), axis=0)
                parts.append((vox, label_points(voxel_to_angstrom(vox, vs), run.name, solution), "candidate"))
        for vox, labels, src in parts:
            if len(vox) == 0:
                continue
            if labels is None:
                labels = np.full(len(vox), BACKGROUND, np.int64)
            X.append(extract_patches(vol, vox, STORE_SIZE).astype(np.float16))
            y.append(labels)
            run_of += [run.name] * len(vox)
            source += [src] * len(vox)
            kind_of += [kind] * len(vox)
        del vol
    return {"X": np.concatenate(X), "y": np.concatenate(y), "run": np.array(run_of), "source": np.array(source),
            "tomogram": np.array(kind_of)}


def save_patches(data: dict, path: str | Path, overwrite: bool = False) -> Path:
    """Write :func:`collect_patches` output as an ``.npz`` (atomically)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **data)

    return atomic_write(path, write, overwrite=overwrite)


def load_patches(paths: str | Path | Sequence[str | Path]) -> dict:
    """Read and concatenate one or more patch files written by :func:`save_patches`."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    parts = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise DataError(p, "no such patch file")
        if not zipfile.is_zipfile(p):
            raise DataError(p, "not a czii_kit patch file (not an .npz archive)")
        try:
            with np.load(p) as d:
                parts.append({k: d[k] for k in ("X", "y", "run", "source", "tomogram")})
        except (KeyError, ValueError, OSError) as exc:
            raise DataError(p, f"not a czii_kit patch file ({exc})") from exc
        if parts[-1]["X"].ndim != 4 or len(parts[-1]["X"]) != len(parts[-1]["y"]):
            raise DataError(p, f"patches of shape {parts[-1]['X'].shape} do not match {len(parts[-1]['y'])} labels")
    return {k: np.concatenate([q[k] for q in parts]) for k in parts[0]}


# --- training --------------------------------------------------------------------------------

MIN_TRAIN_PATCHES = 8
TRAIN_DEFAULTS = {"epochs": 6, "batch": 64, "lr": 2e-3, "weight_decay": 1e-4, "label_smoothing": 0.05,
                  "seed": 0, "threads": None, "init": None}
"""Rescorer training arguments; ``init`` is a rescorer file whose weights training starts from (fine-tuning)."""


def train_rescorer(patches: str | Path | Sequence[str | Path], out: str | Path, val_runs: Sequence[str] = (),
                   overwrite: bool = False, progress: bool = True, **kwargs) -> dict:
    """Train the rescorer on patch files; save it to ``out`` (usually beside the detector weights).

    Resumable: a checkpoint ``out + '.ckpt'`` is written after every epoch and picked up by the next
    call with the same arguments. Patches of ``val_runs`` are held out and scored after each epoch.
    Keyword arguments override :data:`TRAIN_DEFAULTS`. Same seed and threads -> same weights.

    Returns
    -------
    dict
        The ``meta`` saved with the weights (``history`` holds loss / validation accuracy per epoch).
    """
    import torch


    args = {**TRAIN_DEFAULTS, **kwargs}
    unknown = set(args) - set(TRAIN_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown training arguments {sorted(unknown)}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsNoForce(f"{out}: already exists (use --force to replace it)")
    data = load_patches(patches)
    is_val = np.isin(data["run"], list(val_runs))
    if val_runs and not is_val.any():
        raise DataError(patches, f"no patches of the validation runs {list(val_runs)}")
    X, y = data["X"][~is_val], data["y"][~is_val]
    Xv, yv = centre_crop(data["X"][is_val]), data["y"][is_val]
    if len(X) < MIN_TRAIN_PATCHES:
        raise DataError(patches, f"only {len(X)} training patches (at least {MIN_TRAIN_PATCHES} needed)")
    if len(X) < args["batch"]:

        warnings.warn(f"only {len(X)} training patches: batch {args['batch']} -> {len(X)}", stacklevel=2)
        args["batch"] = len(X)
    if args["threads"]:
        torch.set_num_threads(int(args["threads"]))
    torch.manual_seed(int(args["seed"]))
    net = build_network()
    base = None
    if args["init"] is not None:
        args["init"] = str(args["init"])
        net.load_state_dict(Rescorer(args["init"]).net.state_dict())
        base = {"file": args["init"], "sha256": file_sha256(args["init"])}
    opt = torch.optim.AdamW(net.parameters(), args["lr"], weight_decay=args["weight_decay"])
    steps = len(X) // args["batch"]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args["lr"], total_steps=args["epochs"] * steps)
    lossf = torch.nn.CrossEntropyLoss(label_smoothing=args["label_smoothing"])
    ckpt = Path(str(out) + ".ckpt")
    fingerprint = {"n": int(len(X)), "counts": np.bincount(y, minlength=len(CLASSES)).tolist(),
                   **{k: args[k] for k in ("epochs", "batch", "lr", "seed")}, "init": base}
    start, history = 0, []
    if ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if state.get("fingerprint") == fingerprint:
            net.load_state_dict(state["net"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            start, history = int(state["epoch"]), list(state["history"])
    for epoch in range(start, args["epochs"]):
        rng = np.random.default_rng([int(args["seed"]), epoch])
        torch.manual_seed(int(args["seed"]) * 1000 + epoch)  # dropout: a resumed epoch repeats exactly
        net.train()
        perm = rng.permutation(len(X))
        total = 0.0
        bar = tqdm(range(steps), desc=f"rescorer epoch {epoch + 1}/{args['epochs']}", unit="batch",
                   disable=not progress)
        for b in bar:
            idx = np.sort(perm[b * args["batch"]:(b + 1) * args["batch"]])
            xb = torch.from_numpy(standardise(augment(X[idx].astype(np.float32), rng))[:, None])
            loss = lossf(net(xb), torch.from_numpy(y[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
            bar.set_postfix(loss=f"{total / (b + 1):.3f}")
        rec = {"epoch": epoch + 1, "loss": total / steps}
        if len(Xv):
            net.eval()
            with torch.inference_mode():
                pred = np.concatenate([
                    net(torch.from_numpy(standardise(Xv[i:i + 256])[:, None])).argmax(1).numpy()
                    for i in range(0, len(Xv), 256)])
            rec["val_accuracy"] = float((pred == yv).mean())
        history.append(rec)
        torch.save({"fingerprint": fingerprint, "net": net.state_dict(), "opt": opt.state_dict(),
                    "sched": sched.state_dict(), "epoch": epoch + 1, "history": history}, ckpt)
    meta = {
        "classes": list(CLASSES), "patch_size": PATCH_SIZE, "czii_kit_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "patches": [str(p) for p in ([patches] if isinstance(patches, (str, Path)) else patches)],
        "n_train": int(len(X)), "n_val": int(len(Xv)), "val_runs": list(val_runs),
        "class_counts": fingerprint["counts"], "train_args": args, "history": history, "base_rescorer": base,
    }

    save_rescorer(net, out, meta, overwrite=overwrite)
    ckpt.unlink(missing_ok=True)
    return meta


def save_rescorer(net, path: str | Path, meta: Mapping | None = None, overwrite: bool = False) -> Path:
    """Write a network from :func:`build_network` as a rescorer file (atomically); ``meta`` must be JSON-able."""
    import torch


    meta = {"classes": list(CLASSES), "patch_size": PATCH_SIZE, **(meta or {})}

    def write(tmp: Path) -> None:
        torch.save({"state_dict": net.state_dict(), "meta": json.loads(json.dumps(meta))}, tmp)

    return atomic_write(path, write, overwrite=overwrite)


def detector_candidates(weights: ModelBundle | str | Path, runs: Sequence, tomogram: str = "denoised", backend: str = "openvino",
                        floor: float = 0.5, progress: bool = True) -> pd.DataFrame:
    """The detector's merged candidates on ``runs`` whose score is >= ``floor`` x the tuned threshold.

    Uses the inference, merging and thresholds tuned beside ``weights`` (as ``predict`` does).
    """
    model = ModelBundle.load(weights)
    s = model.settings()
    dets, voxel_sizes = detect_runs(model.weights, runs, tomogram, backend, s.inference, progress, model.preprocess,
                                    model.voxel_size)
    cands = merge_detections(dets, voxel_sizes, s.merge, s.merge_per_type)
    keep = cands["score"] >= cands["particle_type"].map(dict(s.thresholds)).astype(float) * floor
    return cands[keep].reset_index(drop=True)
