"""Find runs, tomograms and picks in a dataset laid out like Kaggle's download (= copick's filesystem).

::

    {root}/{split}/static/ExperimentRuns/{run}/VoxelSpacing10.000/{tomogram}.zarr
    {root}/{split}/overlay/ExperimentRuns/{run}/Picks/{particle}.json            (Kaggle names)
    {root}/{split}/overlay/ExperimentRuns/{run}/Picks/{user}_{session}_{particle}.json  (copick names)

:func:`find_runs` accepts the dataset root, a split folder, a static or overlay root, an
``ExperimentRuns`` folder, one run folder, or a run's ``Picks`` folder.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from czii_kit.errors import DataError

RUNS_DIR = "ExperimentRuns"
PICKS_DIR = "Picks"
_SPACING_RE = re.compile(r"^VoxelSpacing(\d+(?:\.\d+)?)$")

AUTO_TOMOGRAM = "auto"
"""Tomogram name that stands for the best one a run has (:func:`choose_tomogram`)."""

TOMOGRAM_PREFERENCE = ("denoised", "isonetcorrected", "ctfdeconvolved", "wbp")
"""The tomograms of the Kaggle / CZII layout in the order :func:`choose_tomogram` takes them: the
denoised one the shipped models are trained on, then the other reconstructions from the least to
the most noisy (prediction low-passes noisy ones; see ``InferenceConfig.smooth``)."""


def choose_tomogram(available) -> str | None:
    """The tomogram to pick in among the names ``available``; ``None`` when there is none.

    The first of :data:`TOMOGRAM_PREFERENCE` present; else a name containing ``"denoised"``
    (portal names such as ``"wbp-denoised"``); else the first name in sorted order.
    """
    names = sorted(available)
    for name in TOMOGRAM_PREFERENCE:
        if name in names:
            return name
    for name in names:
        if "denoised" in name.lower():
            return name
    return names[0] if names else None


@dataclass
class Run:
    """One experiment run: where its tomograms and picks live.

    Attributes
    ----------
    name : str
        Run name, e.g. ``"TS_5_4"``; the ``experiment`` column of picks and submissions.
    split : str or None
        ``"train"``/``"test"``/... when the run was found under a split folder.
    dirs : list of Path
        The run folders (static and/or overlay) that hold this run.
    """

    name: str
    split: str | None = None
    dirs: list[Path] = field(default_factory=list)

    def tomograms(self) -> dict[str, Path]:
        """Tomogram name (``"denoised"``, ``"wbp"``, ...) -> zarr path, at the finest voxel spacing."""
        found: dict[str, tuple[float, Path]] = {}
        for d in self.dirs:
            for vs_dir in sorted(d.glob("VoxelSpacing*")):
                spacing = folder_spacing(vs_dir.name)
                if spacing is None or not vs_dir.is_dir():
                    continue
                for z in sorted(vs_dir.glob("*.zarr")):
                    name = z.name[: -len(".zarr")]
                    if name not in found or spacing < found[name][0]:
                        found[name] = (spacing, z)
        return {k: v[1] for k, v in sorted(found.items())}

    def tomogram_name(self, name: str = "denoised") -> str:
        """``name``, or for ``"auto"`` the tomogram :func:`choose_tomogram` takes among the run's."""
        if name != AUTO_TOMOGRAM:
            return name
        return choose_tomogram(self.tomograms()) or AUTO_TOMOGRAM

    def tomogram_path(self, name: str = "denoised") -> Path:
        """Path of one tomogram (``"auto"``: :meth:`tomogram_name`); :class:`DataError` naming the run
        folder when it is missing."""
        tomos = self.tomograms()
        if name == AUTO_TOMOGRAM:
            name = choose_tomogram(tomos) or name
        if name not in tomos:
            where = ", ".join(str(d) for d in self.dirs) or self.name
            if not tomos:
                raise DataError(where, f"run {self.name!r} has no tomograms (expected VoxelSpacing*/NAME.zarr)")
            raise DataError(where, f"run {self.name!r} has no tomogram {name!r} (found: {', '.join(tomos)})")
        return tomos[name]

    def pick_files(self) -> list[Path]:
        """All picks JSON files of the run (Kaggle or copick names)."""
        files: list[Path] = []
        for d in self.dirs:
            p = d / PICKS_DIR
            if p.is_dir():
                files.extend(sorted(p.glob("*.json")))
        return files


def _is_run_dir(p: Path) -> bool:
    return p.is_dir() and p.parent.name == RUNS_DIR


def _runs_in(experiment_runs: Path, split: str | None, into: dict) -> None:
    for d in sorted(experiment_runs.iterdir()):
        if d.is_dir() and not d.name.startswith("."):
            run = into.setdefault((split, d.name), Run(d.name, split))
            run.dirs.append(d)


def find_runs(path: str | Path | Sequence[str | Path], split: str | None = None) -> list[Run]:
    """Discover the runs under ``path``.

    Parameters
    ----------
    path : path-like or sequence of path-like
        Dataset root (holding ``train/``, ``test/``), split folder (holding ``static/``,
        ``overlay/``), static or overlay root (holding ``ExperimentRuns/``), ``ExperimentRuns``
        itself, or one run folder; or several of these, whose runs are pooled (a run name may
        appear in only one of them per split).
    split : str, optional
        Keep only runs of this split (when ``path`` is a dataset root).

    Returns
    -------
    list of Run
        Sorted by split then name; static and overlay folders of one run are merged.

    Raises
    ------
    DataError
        If ``path`` does not exist or holds no runs.
    """
    if not isinstance(path, (str, Path)):
        return _pool_runs(list(path), split)
    root = Path(path)
    if not root.exists():
        raise DataError(root, "no such file or folder")
    if not root.is_dir():
        raise DataError(root, "expected a dataset folder, got a file")
    runs: dict[tuple[str | None, str], Run] = {}
    if root.name == PICKS_DIR and _is_run_dir(root.parent):
        root = root.parent  # a run's Picks folder stands for the run
    if _is_run_dir(root):
        inferred = _split_of(root.parent.parent)
        runs[(inferred, root.name)] = Run(root.name, inferred, [root])
    elif root.name == RUNS_DIR:
        _runs_in(root, _split_of(root.parent), runs)
    elif (root / RUNS_DIR).is_dir():
        _runs_in(root / RUNS_DIR, _split_of(root), runs)
    else:
        for split_dir in _split_dirs(root):
            name = split_dir.name if split_dir != root else _split_of(root / "static")
            for kind in ("static", "overlay"):
                er = split_dir / kind / RUNS_DIR
                if er.is_dir():
                    _runs_in(er, name, runs)
    out = [r for r in runs.values() if split is None or r.split == split]
    if not out and runs:
        found = ", ".join(sorted({r.split or "(none: not under a split folder)" for r in runs.values()}))
        raise DataError(root, f"no runs of split {split!r} found; its {len(runs)} run(s) are of split {found} "
                              "(--split all takes every run)")
    if not out:
        raise DataError(
            root,
            f"no runs found (expected {{split}}/static/{RUNS_DIR}/{{run}}/..., "
            f"{{split}}/overlay/{RUNS_DIR}/{{run}}/Picks, or a run folder)",
        )
    return sorted(out, key=lambda r: (r.split or "", r.name))


def select_runs(path: str | Path | Sequence[str | Path], split: str | None = None,
                names: Sequence[str] | None = None) -> list[Run]:
    """:func:`find_runs`, narrowed to ``names`` when given (all runs otherwise).

    Raises
    ------
    DataError
        Naming ``path`` and the runs found, when one of ``names`` is not among them.
    """
    runs = find_runs(path, split)
    if not names:
        return runs
    chosen = [r for r in runs if r.name in set(names)]
    missing = sorted(set(names) - {r.name for r in chosen})
    if missing:
        where = f" in split {split!r}" if split else ""
        raise DataError(path, f"no run(s) {missing}{where} (found: {', '.join(r.name for r in runs)})")
    return chosen


def _pool_runs(paths: list, split: str | None) -> list[Run]:
    if not paths:
        raise DataError(None, "no dataset folder given")
    pooled: dict[tuple[str | None, str], tuple[Path, Run]] = {}
    for p in paths:
        for r in find_runs(p, split):
            key = (r.split, r.name)
            if key in pooled:
                raise DataError(p, f"run {r.name!r} is also under {pooled[key][0]}; runs pooled from several "
                                   "folders need distinct names")
            pooled[key] = (Path(p), r)
    return sorted((r for _, r in pooled.values()), key=lambda r: (r.split or "", r.name))


def _split_dirs(root: Path) -> list[Path]:
    if (root / "static").is_dir() or (root / "overlay").is_dir():
        return [root]
    return [d for d in sorted(root.iterdir()) if d.is_dir() and ((d / "static").is_dir() or (d / "overlay").is_dir())]


def _split_of(kind_root: Path) -> str | None:
    """The split name of a static/overlay root, e.g. ``.../train/static`` -> ``"train"``."""
    if kind_root.name in ("static", "overlay"):
        return kind_root.parent.name or None
    return None


def folder_spacing(name: str) -> float | None:
    """The nominal voxel spacing a folder name spells (``"VoxelSpacing10.000" -> 10.0``), else ``None``."""
    m = _SPACING_RE.match(name)
    return float(m.group(1)) if m else None


def spacing_folder(voxel_spacing: float = 10.0) -> str:
    """Folder name of a voxel spacing as Kaggle and copick spell it: ``10.0 -> "VoxelSpacing10.000"``."""
    return f"VoxelSpacing{float(voxel_spacing):.3f}"


def tomogram_location(kind_root: str | Path, run: str, name: str = "denoised", voxel_spacing: float = 10.0) -> Path:
    """Where tomogram ``name`` of ``run`` goes under a static (or overlay) root.

    ``{kind_root}/ExperimentRuns/{run}/VoxelSpacing{voxel_spacing:.3f}/{name}.zarr``. The folder
    name is nominal (Kaggle's says 10.000 for 10.012444 Å); the true voxel size lives in the zarr
    metadata.
    """
    return Path(kind_root) / RUNS_DIR / run / spacing_folder(voxel_spacing) / f"{name}.zarr"


def picks_location(kind_root: str | Path, run: str) -> Path:
    """``{kind_root}/ExperimentRuns/{run}/Picks``: the folder holding a run's picks JSON files."""
    return Path(kind_root) / RUNS_DIR / run / PICKS_DIR


def get_run(path: str | Path, name: str, split: str | None = None) -> Run:
    """The run called ``name`` under ``path``; :class:`DataError` listing known runs if absent."""
    runs = find_runs(path, split)
    for r in runs:
        if r.name == name:
            return r
    raise DataError(path, f"no run {name!r} (found: {', '.join(r.name for r in runs)})")
