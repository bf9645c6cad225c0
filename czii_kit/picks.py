"""Read and write particle picks in the copick JSON schema (the Kaggle ``overlay`` files).

A picks table is a DataFrame with columns ``experiment, particle_type, x, y, z`` (Å, in the
tomogram frame). File names may be Kaggle's ``{particle}.json`` or copick's
``{user_id}_{session_id}_{particle}.json``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from czii_kit.atomic import atomic_write_text
from czii_kit.catalog import PARTICLE_NAMES, radii
from czii_kit.coords import voxel_to_angstrom
from czii_kit.errors import DataError, FileExistsNoForce
from czii_kit.layout import PICKS_DIR, find_runs, picks_location
from czii_kit.tomogram import open_tomogram

PICK_COLUMNS = ["experiment", "particle_type", "x", "y", "z"]
_IDENTITY = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]


def empty_picks() -> pd.DataFrame:
    """An empty picks table with the right columns and dtypes."""
    return pd.DataFrame(
        {"experiment": pd.Series(dtype=str), "particle_type": pd.Series(dtype=str),
         "x": pd.Series(dtype=float), "y": pd.Series(dtype=float), "z": pd.Series(dtype=float)}
    )


def parse_pick_filename(path: str | Path) -> tuple[str | None, str | None, str]:
    """``(user_id, session_id, particle)`` from a picks file name (user/session ``None`` for Kaggle names)."""
    stem = Path(path).stem
    if stem in PARTICLE_NAMES:
        return None, None, stem
    parts = stem.split("_")
    if len(parts) >= 3:
        return "_".join(parts[:-2]), parts[-2], parts[-1]
    return None, None, stem


def read_picks_file(path: str | Path, run_name: str | None = None) -> pd.DataFrame:
    """Read one picks JSON file.

    Parameters
    ----------
    path : path-like
        A copick picks file.
    run_name : str, optional
        Experiment name; defaults to ``run_name`` in the file, else the run folder's name.

    Raises
    ------
    DataError
        Unreadable JSON, unknown particle name, or a point without finite x, y, z.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(path, "no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(path, f"not valid JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise DataError(path, "expected a JSON object with 'pickable_object_name' and 'points'")
    particle = doc.get("pickable_object_name") or parse_pick_filename(path)[2]
    if particle not in PARTICLE_NAMES:
        raise DataError(path, f"unknown particle type {particle!r}; known: {', '.join(PARTICLE_NAMES)}")
    if run_name is None:
        run_name = doc.get("run_name") or (path.parent.parent.name if path.parent.name == PICKS_DIR else None)
    if not run_name:
        raise DataError(path, "cannot tell which run the picks belong to (no 'run_name', not in a Picks folder)")
    points = doc.get("points") or []
    if not isinstance(points, list):
        raise DataError(path, "'points' must be a list")
    unit = doc.get("unit", "angstrom")
    if unit not in (None, "angstrom"):
        raise DataError(path, f"unit {unit!r} is not supported (expected 'angstrom')")
    xyz = np.empty((len(points), 3))
    for i, p in enumerate(points):
        try:
            loc = p["location"]
            xyz[i] = [float(loc["x"]), float(loc["y"]), float(loc["z"])]
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(path, f"point {i} has no numeric location x, y, z ({exc!r})") from None
    if not np.isfinite(xyz).all():
        bad = int(np.flatnonzero(~np.isfinite(xyz).all(axis=1))[0])
        raise DataError(path, f"point {bad} has a NaN or infinite coordinate")
    df = pd.DataFrame(xyz, columns=["x", "y", "z"])
    df.insert(0, "particle_type", particle)
    df.insert(0, "experiment", str(run_name))
    return df


def read_picks(
    path: str | Path | Sequence[str | Path],
    split: str | None = None,
    runs: Iterable[str] | None = None,
    user_id: str | None = None,
) -> pd.DataFrame:
    """Read every picks file under a dataset root, split, overlay root or run folder (or one JSON file).

    Parameters
    ----------
    path : path-like
        Anything :func:`czii_kit.layout.find_runs` accepts (one folder or several), or a single ``.json`` file.
    split : str, optional
        Only runs of this split.
    runs : iterable of str, optional
        Only these run names.
    user_id : str, optional
        Only copick files of this user (Kaggle-named files have no user and are always read).

    Returns
    -------
    DataFrame
        ``experiment, particle_type, x, y, z`` (Å), sorted by experiment then particle type.

    Raises
    ------
    DataError
        Missing folder, no runs, a malformed file, or several files for one run and particle type
        (e.g. two users' picks, or Kaggle and copick names side by side) that ``user_id`` does not
        narrow down to one.
    """
    if isinstance(path, (str, Path)) and Path(path).is_file():
        return read_picks_file(path)
    keep = None if runs is None else set(runs)
    frames = []
    for run in find_runs(path, split):
        if keep is not None and run.name not in keep:
            continue
        sources: dict[str, list[Path]] = {}
        for f in run.pick_files():
            user, _, particle = parse_pick_filename(f)
            if user_id is not None and user is not None and user != user_id:
                continue
            sources.setdefault(particle, []).append(f)
        for particle, files in sorted(sources.items()):
            if len(files) > 1:
                names = ", ".join(f.name for f in files)
                hint = "pass user_id (--user-id) to choose one" if user_id is None else "remove all but one"
                raise DataError(files[0].parent, f"several picks files for {particle!r} of run {run.name!r} "
                                                 f"({names}); reading them all would count points twice: {hint}")
            frames.append(read_picks_file(files[0], run.name))
    if not frames:
        return empty_picks()
    df = pd.concat(frames, ignore_index=True)
    return df.sort_values(["experiment", "particle_type"], kind="stable").reset_index(drop=True)


def run_extents(runs) -> dict[str, np.ndarray]:
    """``{run name: (2, 3) array}``: the lower and upper ``(x, y, z)`` Å corners of each run's tomograms.

    From the metadata of level 0 (nothing read); the outer faces of the edge voxels, widest over a
    run's tomograms. Runs (``czii_kit.layout.Run``) without a readable tomogram are left out.
    """
    out = {}
    for run in runs:
        boxes = []
        for path in run.tomograms().values():
            try:
                t = open_tomogram(path, 0)
            except DataError:
                continue  # reported where the voxels are read
            boxes.append(voxel_to_angstrom([[-0.5] * 3, np.asarray(t.shape) - 0.5], t.voxel_size, t.origin))
        if boxes:
            out[run.name] = np.stack([np.min([b[0] for b in boxes], 0), np.max([b[1] for b in boxes], 0)])
    return out


def outside_extent(table: pd.DataFrame, extents: dict) -> np.ndarray:
    """Boolean mask of the rows of ``table`` (``experiment, particle_type, x, y, z`` Å) whose point
    lies outside its run's extent (:func:`run_extents`) by more than its particle's radius; rows of
    runs without an extent, or of unknown particle types, are not flagged."""
    mask = np.zeros(len(table), bool)
    if not len(table) or not extents:
        return mask
    radius = table["particle_type"].astype(str).map(radii()).to_numpy(float)
    xyz = table[["x", "y", "z"]].to_numpy(float)
    runs = table["experiment"].astype(str).to_numpy()
    for name, (lo, hi) in extents.items():
        rows = (runs == name) & np.isfinite(radius)
        r = radius[rows, None]
        mask[rows] = ((xyz[rows] < lo - r) | (xyz[rows] > hi + r)).any(axis=1)
    return mask


def warn_outside(table: pd.DataFrame, extents: dict, source) -> int:
    """Warn, in one warning naming ``source``, how many rows of ``table`` lie outside their tomogram
    (:func:`outside_extent`); return that count. Kaggle accepts such rows (as false positives)."""
    mask = outside_extent(table, extents)
    n = int(mask.sum())
    if n:
        i = int(np.flatnonzero(mask)[0])
        row = table.iloc[i]
        warnings.warn(f"{source}: {n} point(s) lie outside their tomogram by more than "
                  f"a particle radius, e.g. row {i} ({row['experiment']}, {row['particle_type']}, x,y,z "
                  f"{float(row['x']):.4g}, {float(row['y']):.4g}, {float(row['z']):.4g} Å); they can only "
                  "count as false positives", stacklevel=2)
    return n


def check_naming(naming: str, user_id: str = "curation", session_id: str = "0") -> None:
    """Check a picks file naming: ``"kaggle"``, or ``"copick"`` with a user and a session id.

    Raises
    ------
    DataError
        Another naming, or copick names with an empty id or one holding ``_`` (copick splits the
        file name ``{user}_{session}_{particle}`` at every ``_``).
    """
    if naming not in ("kaggle", "copick"):
        raise DataError(None, f"picks naming must be 'kaggle' or 'copick', got {naming!r}")
    if naming == "copick" and (not user_id or not str(session_id) or "_" in str(user_id) + str(session_id)):
        raise DataError(None, f"copick picks names need a user id and a session id without '_' "
                              f"(got user {user_id!r}, session {session_id!r})")


def picks_files(overlay_root: str | Path, runs: Iterable[str], particle_types: Iterable[str] = PARTICLE_NAMES,
                naming: str = "kaggle", user_id: str = "curation", session_id: str = "0",
                overwrite: bool = False) -> dict[tuple[str, str], Path]:
    """``{(run, particle): path}`` of the picks files :func:`write_picks` writes under ``overlay_root``.

    Raises
    ------
    DataError
        A bad naming (:func:`check_naming`).
    FileExistsNoForce
        One of them exists and ``overwrite`` is false (checked for all, before anything is written).
    """
    check_naming(naming, user_id, session_id)
    out = {}
    for run in runs:
        for particle in particle_types:
            name = f"{particle}.json" if naming == "kaggle" else f"{user_id}_{session_id}_{particle}.json"
            out[(str(run), particle)] = picks_location(overlay_root, str(run)) / name
    exists = [] if overwrite else [p for p in out.values() if p.exists()]
    if exists:
        more = f" (and {len(exists) - 1} more)" if len(exists) > 1 else ""
        raise FileExistsNoForce(f"{exists[0]}: already exists{more} (use --force / overwrite=True to replace)")
    return out


def picks_document(points_xyz, particle: str, run_name: str, user_id: str = "curation",
                   session_id: str = "0") -> dict:
    """The copick JSON document for ``points_xyz`` ``(N, 3)`` in Å."""
    if particle not in PARTICLE_NAMES:
        raise DataError(None, f"unknown particle type {particle!r}; known: {', '.join(PARTICLE_NAMES)}")
    pts = np.asarray(points_xyz, dtype=float).reshape(-1, 3)
    if not np.isfinite(pts).all():
        raise DataError(None, f"{run_name}/{particle}: points contain NaN or infinite coordinates")
    return {
        "pickable_object_name": particle,
        "user_id": user_id,
        "session_id": str(session_id),
        "run_name": run_name,
        "voxel_spacing": None,
        "unit": "angstrom",
        "points": [
            {"location": {"x": float(x), "y": float(y), "z": float(z)},
             "transformation_": _IDENTITY, "instance_id": 0}
            for x, y, z in pts
        ],
        "trust_orientation": True,
    }


def write_picks(
    picks: pd.DataFrame,
    overlay_root: str | Path,
    naming: str = "kaggle",
    user_id: str = "curation",
    session_id: str = "0",
    runs: Iterable[str] | None = None,
    particle_types: Iterable[str] = PARTICLE_NAMES,
    overwrite: bool = False,
) -> list[Path]:
    """Write picks as ``{overlay_root}/ExperimentRuns/{run}/Picks/*.json`` (one file per run and type).

    Parameters
    ----------
    picks : DataFrame
        ``experiment, particle_type, x, y, z`` in Å.
    overlay_root : path-like
        The overlay folder (e.g. ``root/train/overlay``).
    naming : {"kaggle", "copick"}
        ``{particle}.json`` or ``{user_id}_{session_id}_{particle}.json``.
    runs : iterable of str, optional
        Runs to write (default: those in ``picks``); a run without points of a type gets an empty file.
    particle_types : iterable of str
        Types to write a file for, even when empty.
    overwrite : bool
        Replace existing files; otherwise :class:`FileExistsNoForce` (checked for every file before
        any is written).

    Returns
    -------
    list of Path
        The files written, one per run and particle type.

    Raises
    ------
    DataError
        Missing columns, unknown particle types, NaN/infinite coordinates, or a bad naming
        (:func:`check_naming`).
    """
    check_naming(naming, user_id, session_id)
    missing = [c for c in PICK_COLUMNS if c not in picks.columns]
    if missing:
        raise DataError(None, f"picks table lacks columns {missing}")
    unknown = sorted(set(picks["particle_type"].astype(str)) - set(PARTICLE_NAMES))
    if unknown:
        raise DataError(None, f"unknown particle types {unknown}; known: {', '.join(PARTICLE_NAMES)}")
    xyz = picks[["x", "y", "z"]].to_numpy(float) if len(picks) else np.empty((0, 3))
    if not np.isfinite(xyz).all():
        bad = int(np.flatnonzero(~np.isfinite(xyz).all(axis=1))[0])
        raise DataError(None, f"picks row {bad} has a NaN or infinite coordinate")
    run_names = sorted(str(r) for r in (set(picks["experiment"]) if runs is None else set(runs)))
    types = list(dict.fromkeys([*particle_types, *sorted(set(picks["particle_type"]))]))
    groups = {(str(k[0]), str(k[1])): g for k, g in picks.groupby(["experiment", "particle_type"])}
    dests = picks_files(overlay_root, run_names, types, naming, user_id, session_id, overwrite)
    written = []
    for (run, particle), dest in dests.items():
        g = groups.get((run, particle))
        pts = np.empty((0, 3)) if g is None else g[["x", "y", "z"]].to_numpy(float)
        doc = picks_document(pts, particle, run, user_id, session_id)
        written.append(atomic_write_text(dest, json.dumps(doc), overwrite=overwrite))
    return written
