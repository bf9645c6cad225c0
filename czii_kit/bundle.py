"""A trained model on disk: the weights and the files that travel with them.

A model bundle is a folder holding

==============================  ===========================================================  ================
file                            what                                                         written by
==============================  ===========================================================  ================
``*.pt`` (e.g. ``best.pt``)     the YOLO detector's weights                                  ``czii-kit train``
``czii_kit_train.json``         training record: preprocessing, dataset (voxel size,         ``czii-kit train``
                                validation runs), arguments, versions
``czii_kit_thresholds.json``    tuned pipeline settings (:mod:`czii_kit.settings`)           ``czii-kit tune``
``czii_kit_rescorer.pt``        the 3D rescorer (optional)                                   ``czii-kit rescorer train``
``czii_kit_templates.npz``      templates for template matching (optional)                   ``czii-kit templates``
``czii_kit_manifest.json``      every file above with its SHA-256 (optional)                 ``czii-kit model manifest``
==============================  ===========================================================  ================

:class:`ModelBundle` locates, reads and checks them in one place; :func:`czii_kit.predict.predict`,
``tune``, ``bench``, ``demo`` and the notebooks go through it. The shipped model is the bundle in
the package's ``models`` folder, found with :mod:`importlib.resources`.
"""

from __future__ import annotations

import datetime as _dt
import json
import warnings
from functools import cached_property
from importlib import resources
from pathlib import Path

import numpy as np

from czii_kit import __version__
from czii_kit.atomic import atomic_write_text, read_json
from czii_kit.checksum import file_sha256
from czii_kit.coords import KAGGLE_VOXEL_SIZE
from czii_kit.errors import CziiKitError, DataError
from czii_kit.infer import InferenceConfig
from czii_kit.preprocess import PreprocessConfig
from czii_kit.rescore import RESCORER_FILE
from czii_kit.settings import SETTINGS_FILE, Companion, PipelineSettings
from czii_kit.templates import TEMPLATES_FILE
from czii_kit.volumes import VolumeReading

TRAIN_RECORD = "czii_kit_train.json"
MANIFEST_FILE = "czii_kit_manifest.json"
COMPANION_FILES = (TRAIN_RECORD, SETTINGS_FILE, RESCORER_FILE, TEMPLATES_FILE)
"""The files of a bundle besides the weights (each optional)."""


def shipped_models_dir() -> Path:
    """The package's ``models`` folder (the shipped bundle), through :mod:`importlib.resources`."""
    return Path(str(resources.files("czii_kit").joinpath("models")))


MODELS_DIR = shipped_models_dir()


def default_weights() -> Path:
    """The weights shipped in the package's ``models`` folder; a clear error when there are none."""
    found = sorted(MODELS_DIR.glob("*.pt")) if MODELS_DIR.is_dir() else []
    found = [p for p in found if p.name != RESCORER_FILE]
    if not found:
        raise CziiKitError(
            f"no model is shipped in {MODELS_DIR} yet; pass --weights path/to/best.pt "
            "(train one with `czii-kit build-dataset` + `czii-kit train`)"
        )
    if len(found) > 1:
        preferred = [p for p in found if p.stem in ("default", "best")]
        if preferred:
            return preferred[0]
        raise CziiKitError(f"several models in {MODELS_DIR} ({', '.join(p.name for p in found)}); pass --weights")
    return found[0]


def read_train_record(weights: str | Path) -> dict:
    """The ``czii_kit_train.json`` beside ``weights`` (``{}`` when absent)."""
    return read_json(Path(weights).parent / TRAIN_RECORD)


class ModelBundle:
    """The weights at ``weights`` and the bundle files beside them (see the module docstring).

    Parameters
    ----------
    weights : path-like
        The detector's ``.pt``.
    verify : bool
        Check the files against ``czii_kit_manifest.json`` when there is one (:meth:`check_manifest`).

    Raises
    ------
    DataError
        No such weights file, or a manifest beside them that the files do not match.
    """

    def __init__(self, weights: str | Path, verify: bool = True):
        self.weights = Path(weights)
        if not self.weights.is_file():
            raise DataError(self.weights, "no such weights file")
        self.folder = self.weights.parent
        self._digests: dict[tuple, str] = {}
        if verify:
            self.check_manifest()

    @classmethod
    def load(cls, model: ModelBundle | str | Path | None = None, verify: bool = True) -> ModelBundle:
        """``model`` itself when it is a bundle, the bundle of the weights file ``model``, or (``None``) the shipped one."""
        if isinstance(model, ModelBundle):
            return model
        return cls(default_weights() if model is None else model, verify)

    def __repr__(self) -> str:
        return f"ModelBundle({str(self.weights)!r})"

    # --- what the training recorded ----------------------------------------------------------

    @cached_property
    def train_record(self) -> dict:
        """The training record (``{}`` when there is none)."""
        return read_train_record(self.weights)

    @cached_property
    def preprocess(self) -> PreprocessConfig:
        """How the model's training images were made (inference repeats it)."""
        return PreprocessConfig.from_dict(self.train_record.get("preprocess"), self.folder / TRAIN_RECORD,
                                          "preprocess")

    @cached_property
    def voxel_size(self) -> float:
        """Å per voxel of the tomograms the model was trained on (median over the recorded runs), else
        :data:`czii_kit.coords.KAGGLE_VOXEL_SIZE`."""
        sizes = self.train_record.get("dataset", {}).get("voxel_size")
        values = [float(v) for v in sizes.values()] if isinstance(sizes, dict) else []
        return float(np.median(values)) if values else KAGGLE_VOXEL_SIZE

    @property
    def val_runs(self) -> list[str]:
        """The validation runs recorded by training (``[]`` when none)."""
        return list(self.train_record.get("dataset", {}).get("val_runs") or [])

    @property
    def weights_sha256(self) -> str:
        return self.sha256(self.weights)

    def sha256(self, path: Path) -> str:
        """SHA-256 of a file, read once while it keeps its size and modification time (loading a bundle
        checks the manifest, the settings' weights and companion records: one read per file)."""
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self._digests:
            self._digests[key] = file_sha256(path)
        return self._digests[key]

    # --- the tuned settings and the files they name ----------------------------------------------

    @property
    def settings_path(self) -> Path:
        """Where the tuned settings of this model live (``czii_kit_thresholds.json`` beside the weights)."""
        return self.folder / SETTINGS_FILE

    def settings(self, path: str | Path | None = None) -> PipelineSettings:
        """The tuned settings: the file ``path`` (it must exist), else the one beside the weights, else
        the defaults (with a warning: greedy merging, threshold 0.5). Warns when they were tuned for other
        weights. Raises :class:`~czii_kit.errors.SettingsError` for a malformed file."""
        if path is None and not self.settings_path.is_file():
            warnings.warn(f"{self.settings_path} not found: using greedy merging and a threshold of 0.5 for every "
                          "type (run `czii-kit tune`)", stacklevel=2)
            return PipelineSettings()
        settings = PipelineSettings.read(self.settings_path if path is None else path)
        if settings.weights_sha256 and settings.weights_sha256 != self.weights_sha256:
            warnings.warn(f"{settings.source}: tuned for other weights ({settings.weights_name or '?'}, sha256 "
                          f"{settings.weights_sha256[:12]}...) than {self.weights}; its thresholds may not fit this "
                          "model (re-run `czii-kit tune`)", stacklevel=2)
        return settings

    def companion(self, record: Companion) -> tuple[Path, str | None]:
        """The file a settings record names (relative to this folder, or absolute) and what is wrong with
        it (``None``: there, and the very file the settings were tuned with)."""
        path = Path(record.file)
        path = path if path.is_absolute() else self.folder / path
        if not path.is_file():
            return path, "is missing"
        if record.sha256 and self.sha256(path) != record.sha256:
            return path, "differs from the one the thresholds were tuned with"
        return path, None

    def file(self, name: str) -> Path | None:
        """The bundle file ``name`` beside the weights, or ``None`` when absent."""
        p = self.folder / name
        return p if p.is_file() else None

    def reading(self, inference: InferenceConfig | None = None, tomogram: str = "denoised") -> VolumeReading:
        """How the 3D stages read a tomogram so that they see what this detector sees with ``inference``."""
        inference = inference or InferenceConfig()
        return VolumeReading(tomogram, self.preprocess, inference.polarity, inference.smooth, inference.flatten,
                             self.voxel_size)

    # --- manifest -------------------------------------------------------------------------------

    def files(self) -> list[Path]:
        """The bundle's files that exist: the weights, then :data:`COMPANION_FILES`."""
        return [self.weights] + [p for p in (self.file(n) for n in COMPANION_FILES) if p is not None]

    def manifest(self) -> dict:
        """``{"files": {name: sha256}, ...}`` for :meth:`files` (what ``czii-kit model manifest`` writes)."""
        return {"czii_kit_version": __version__,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "weights": self.weights.name,
                "files": {p.name: self.sha256(p) for p in self.files()}}

    def write_manifest(self, overwrite: bool = True) -> Path:
        """Write :meth:`manifest` as ``czii_kit_manifest.json`` beside the weights (atomically)."""
        return atomic_write_text(self.folder / MANIFEST_FILE, json.dumps(self.manifest(), indent=1) + "\n",
                                 overwrite=overwrite)

    def check_manifest(self) -> dict | None:
        """Check the files against ``czii_kit_manifest.json`` when there is one (``None`` when not).

        Raises :class:`~czii_kit.errors.DataError` naming the first file that is missing or differs.
        """
        path = self.folder / MANIFEST_FILE
        if not path.is_file():
            return None
        doc = read_json(path)
        files = doc.get("files") if isinstance(doc, dict) else None
        if not isinstance(files, dict):
            raise DataError(path, "not a czii_kit manifest (no 'files' object)")
        if self.weights.name not in files:
            return None  # the manifest of other weights in the same folder
        for name, sha in files.items():
            p = self.folder / name
            if not p.is_file():
                raise DataError(path, f"lists {name}, which is missing")
            if self.sha256(p) != sha:
                raise DataError(p, f"differs from {MANIFEST_FILE} (changed after `czii-kit model manifest`; "
                                   "re-run it if the change is wanted)")
        return doc
