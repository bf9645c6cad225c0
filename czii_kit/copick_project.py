"""copick project configs: point copick (the CZII data library and its viewers) at a czii_kit dataset.

A dataset in the Kaggle layout is a copick filesystem project: ``{split}/static`` is copick's static
root (tomograms) and ``{split}/overlay`` its overlay root (picks, named ``{user}_{session}_{particle}.json``
for copick; write them with ``naming="copick"``). :func:`copick_config` builds the config, with the
six pickable objects of :mod:`czii_kit.catalog`; :func:`write_copick_config` writes it.
"""

from __future__ import annotations

import json
from pathlib import Path

from czii_kit import __version__
from czii_kit.atomic import atomic_write_text, check_out_path
from czii_kit.catalog import PARTICLES
from czii_kit.errors import DataError

COLOR_ALPHA = 128
"""Opacity of the objects' colours, as in the competition's copick config."""


def _split_dir(root: Path, split: str | None) -> Path:
    if not root.is_dir():
        raise DataError(root, "dataset folder not found")
    if (root / "static").is_dir() or (root / "overlay").is_dir():
        if split is not None and split != root.name:
            raise DataError(root, f"is the split folder {root.name!r}, not {split!r}")
        return root
    splits = [d.name for d in sorted(root.iterdir()) if (d / "static").is_dir() or (d / "overlay").is_dir()]
    if split is None:
        if len(splits) != 1:
            found = ", ".join(splits) if splits else "none (expected {split}/static or {split}/overlay)"
            raise DataError(root, f"choose a split with --split / split= (found: {found})")
        split = splits[0]
    if split not in splits:
        raise DataError(root, f"no split {split!r} with a static or overlay folder (found: {', '.join(splits) or 'none'})")
    return root / split


def copick_config(root: str | Path, split: str | None = None, overlay_root: str | Path | None = None,
                  name: str | None = None) -> dict:
    """The copick filesystem config of one split of a dataset.

    Parameters
    ----------
    root : path-like
        Dataset root (holding ``train/``, ``test/``) or a split folder (holding ``static/``, ``overlay/``).
    split : str, optional
        Split of a dataset root; may be left out when the root holds one split.
    overlay_root : path-like, optional
        Where copick reads and writes picks (default ``{split}/overlay``; created by copick when absent,
        e.g. the overlay that ``czii-kit predict --picks-out`` fills for a test split).
    name : str, optional
        Project name (default ``{root folder}/{split}``).

    Returns
    -------
    dict
        ``config_type: filesystem``, absolute ``static_root`` and ``overlay_root``, and the six pickable
        objects (name, label, RGBA colour, radius in Å, PDB id).

    Raises
    ------
    DataError
        The folder or split does not exist, or a root with several splits without ``split``.
    """
    root = Path(root).resolve()
    split_dir = _split_dir(root, split)
    static = split_dir / "static"
    overlay = Path(overlay_root).resolve() if overlay_root is not None else split_dir / "overlay"
    label = f"{split_dir.parent.name}/{split_dir.name}"
    return {
        "config_type": "filesystem",
        "name": name or label,
        "description": f"czii_kit dataset {split_dir} (written by czii-kit copick-config, czii_kit {__version__})",
        "version": "1.0.0",
        "pickable_objects": [
            {"name": p.name, "is_particle": True, "label": p.copick_label, "color": [*p.color, COLOR_ALPHA],
             "radius": p.radius, "pdb_id": p.pdb_id}
            for p in PARTICLES
        ],
        "static_root": str(static),
        "overlay_root": str(overlay),
        "static_fs_args": {"auto_mkdir": True},
        "overlay_fs_args": {"auto_mkdir": True},
    }


def write_copick_config(root: str | Path, out: str | Path, split: str | None = None,
                        overlay_root: str | Path | None = None, name: str | None = None,
                        overwrite: bool = False) -> Path:
    """Write :func:`copick_config` to ``out`` as JSON (atomically; an existing file needs ``overwrite``).

    Raises
    ------
    FileExistsNoForce
        ``out`` exists and ``overwrite`` is false.
    DataError
        As :func:`copick_config`.
    """
    out = check_out_path(out, overwrite)  # before reading the dataset
    config = copick_config(root, split, overlay_root, name)
    return atomic_write_text(out, json.dumps(config, indent=2) + "\n", overwrite=overwrite)
