"""The pipeline's tuned settings: one typed object, read from one strict file format.

``czii-kit tune`` writes the settings of a trained model as ``czii_kit_thresholds.json`` beside its
weights (the file name is historical; ``--thresholds FILE`` on the command line points at another
one): inference settings, the 3D merging, centre refinement, the rescorer and template matching, and
the per-type thresholds with and without rescoring, plus a record of how they were chosen.

:meth:`PipelineSettings.read` parses it strictly: an unknown (misspelt) key, a value of the wrong
type or out of range is a :class:`~czii_kit.errors.SettingsError` naming the file and the dotted
key (``rescore.config.mix``), never ignored. The records that only document the tuning
(``comparison``, ``table``, ``final_f4``, ...) are accepted as they are.

Files the settings were tuned with (the rescorer, the templates) are named with their SHA-256 and
looked up beside the weights by :mod:`czii_kit.bundle`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from czii_kit.catalog import PARTICLE_NAMES
from czii_kit.config import check_type
from czii_kit.errors import SettingsError
from czii_kit.infer import InferenceConfig
from czii_kit.postprocess import MergeConfig
from czii_kit.refine import RefineConfig
from czii_kit.rescore import RescoreConfig
from czii_kit.templates import TemplateConfig

SETTINGS_FILE = "czii_kit_thresholds.json"
"""Name of the settings file ``tune`` writes beside the weights."""
DEFAULT_THRESHOLD = 0.5
"""Threshold of every type when no settings were tuned."""
TEMPLATE_WEDGES = ("auto", "none")
"""Values of the ``template_wedge`` override."""

_RECORD_KEYS = {  # documentation of the tuning: accepted as written, with the JSON type they must have
    "czii_kit_version": str, "created": str, "weights": str, "val_runs": list, "backend": str, "merge_name": str,
    "refine_comparison": (dict, type(None)), "threshold_tolerance": (int, float), "final_f4": (int, float),
    "table": dict, "comparison": list, "n_detections": int, "edits": list,
}
_RESCORE_RECORD_KEYS = {"comparison": list, "final_f4": (int, float), "table": dict}
INFERENCE_OVERRIDES = ("z_stride", "batch", "tta", "imgsz", "polarity", "smooth", "flatten", "tilt_axis")
"""Inference settings a caller may override at prediction time (``predict(..., z_stride=2)``, ``--z-stride``)."""


@dataclass(frozen=True)
class Companion:
    """A file the settings were tuned with: its name (relative to the weights' folder, or absolute) and SHA-256."""

    file: str
    sha256: str | None = None

    def to_dict(self) -> dict:
        return {"file": self.file, **({"sha256": self.sha256} if self.sha256 else {})}


@dataclass(frozen=True)
class TemplateSettings:
    """Template matching as tuned: the template file and how candidates are matched."""

    file: Companion
    config: TemplateConfig


@dataclass(frozen=True)
class RescoreSettings:
    """Rescoring as tuned: the rescorer file, how scores combine, thresholds on the rescored score, templates."""

    file: Companion
    config: RescoreConfig
    thresholds: Mapping[str, float]
    templates: TemplateSettings | None = None


@dataclass(frozen=True)
class PipelineSettings:
    """Everything :func:`czii_kit.predict.predict` needs to know besides the data and the model.

    Attributes
    ----------
    inference : InferenceConfig
        How slices are run through the detector (and how tomograms are prepared).
    merge : MergeConfig
        How 2D boxes merge into 3D candidates; ``merge_per_type`` overrides it per particle type.
    thresholds : mapping of str to float
        Per-type thresholds (0..1) on the detector's merged score (every catalog type).
    refine : RefineConfig or None
        Centre refinement (``None``: off).
    rescore : RescoreSettings or None
        The 3D rescorer and the thresholds on its score (``None``: off).
    weights_sha256 : str or None
        SHA-256 of the weights the settings were tuned for.
    source : Path or None
        The file read (``None``: built-in defaults, nothing tuned).
    """

    inference: InferenceConfig = field(default_factory=InferenceConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    merge_per_type: Mapping[str, MergeConfig] = field(default_factory=dict)
    thresholds: Mapping[str, float] = field(default_factory=lambda: dict.fromkeys(PARTICLE_NAMES, DEFAULT_THRESHOLD))
    refine: RefineConfig | None = None
    rescore: RescoreSettings | None = None
    weights_sha256: str | None = None
    weights_name: str | None = None
    source: Path | None = None

    @property
    def tuned(self) -> bool:
        """Whether these settings come from a file (``False``: the built-in defaults)."""
        return self.source is not None

    # --- reading -------------------------------------------------------------------------------

    @classmethod
    def read(cls, path: str | Path) -> PipelineSettings:
        """Parse a settings file strictly (:class:`~czii_kit.errors.SettingsError` naming file and key)."""
        path = Path(path)
        if not path.is_file():
            raise SettingsError(path, "no such settings file (write one with `czii-kit tune ... --out FILE`)")
        try:
            doc = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SettingsError(path, f"not valid JSON ({exc})") from None
        return cls.from_doc(doc, path)

    @classmethod
    def from_doc(cls, doc, where: str | Path | None = None) -> PipelineSettings:
        """Parse the JSON document of a settings file (``where`` names it in errors)."""
        if not isinstance(doc, Mapping):
            raise SettingsError(where, "expected a JSON object of settings")
        known = {"inference", "merge", "merge_per_type", "refine", "thresholds", "rescore", "weights_sha256",
                 *_RECORD_KEYS}
        _check_keys(doc, known, where, "")
        _check_records(doc, _RECORD_KEYS, where, "")
        if "thresholds" not in doc:
            raise SettingsError(where, "thresholds: missing (every settings file holds the per-type thresholds)")
        per_type = doc.get("merge_per_type") or {}
        if not isinstance(per_type, Mapping):
            raise SettingsError(where, f"merge_per_type: expected an object, got {per_type!r}")
        merge_per_type = {}
        for name, conf in per_type.items():
            _particle(name, where, "merge_per_type")
            conf = dict(conf) if isinstance(conf, Mapping) else conf
            if isinstance(conf, dict):
                conf.pop("name", None)  # the configuration's name in CANDIDATE_MERGES, for the record
            merge_per_type[name] = MergeConfig.from_dict(conf, where, f"merge_per_type.{name}")
        refine = doc.get("refine")
        sha = _digest(doc.get("weights_sha256"), where, "weights_sha256")
        return cls(
            inference=InferenceConfig.from_dict(doc.get("inference"), where, "inference"),
            merge=MergeConfig.from_dict(doc.get("merge"), where, "merge"),
            merge_per_type=merge_per_type,
            thresholds=_thresholds(doc["thresholds"], where, "thresholds", fill=True),
            refine=None if refine is None else RefineConfig.from_dict(refine, where, "refine"),
            rescore=_rescore(doc.get("rescore"), where),
            weights_sha256=sha,
            weights_name=doc.get("weights"),
            source=Path(where) if where is not None else None,
        )

    # --- overrides -----------------------------------------------------------------------------

    def overridden(self, thresholds: Mapping[str, float] | None = None, template_wedge: str | None = None,
                   **inference) -> PipelineSettings:
        """A copy with some settings replaced (``None`` leaves one as it is).

        ``inference``: any of :data:`INFERENCE_OVERRIDES`; ``thresholds``: per-type thresholds replacing
        the tuned ones (on the score that is thresholded: rescored when rescoring runs);
        ``template_wedge``: ``"auto"`` or ``"none"``, whether the matched templates get each tomogram's
        missing wedge. Raises :class:`~czii_kit.errors.SettingsError` for an unknown name or bad value.
        """
        unknown = sorted(set(inference) - set(INFERENCE_OVERRIDES))
        if unknown:
            raise SettingsError(None, f"unknown setting(s) {', '.join(unknown)}; the inference settings one can "
                                      f"override are {', '.join(INFERENCE_OVERRIDES)}")
        out = self
        given = {k: v for k, v in inference.items() if v is not None}
        if given:
            merged = {**self.inference.to_dict(), **given}
            out = dataclasses.replace(out, inference=InferenceConfig.from_dict(merged, None, "override"))
        if template_wedge is not None:
            if template_wedge not in TEMPLATE_WEDGES:
                raise SettingsError(None, f"template wedge must be 'auto' or 'none', got {template_wedge!r}")
            if out.rescore is not None and out.rescore.templates is not None:
                t = out.rescore.templates
                conf = dataclasses.replace(t.config, wedge=None if template_wedge == "none" else "auto")
                out = dataclasses.replace(out, rescore=dataclasses.replace(
                    out.rescore, templates=dataclasses.replace(t, config=conf)))
        if thresholds:
            user = _thresholds(thresholds, None, "thresholds", fill=False)
            out = dataclasses.replace(out, thresholds={**out.thresholds, **user})
            if out.rescore is not None:
                out = dataclasses.replace(out, rescore=dataclasses.replace(
                    out.rescore, thresholds={**out.rescore.thresholds, **user}))
        return out


def _check_keys(doc: Mapping, known, where, section: str) -> None:
    for key in doc:
        if key not in known:
            dotted = f"{section}.{key}" if section else key
            raise SettingsError(where, f"{dotted}: unknown setting (known: {', '.join(sorted(known))})")


def _check_records(doc: Mapping, kinds: Mapping, where, section: str) -> None:
    for key, kind in kinds.items():
        if key in doc and not isinstance(doc[key], kind) or (kind is int and isinstance(doc.get(key), bool)):
            dotted = f"{section}.{key}" if section else key
            raise SettingsError(where, f"{dotted}: unexpected value {doc[key]!r}")


def _particle(name, where, section: str) -> str:
    if name not in PARTICLE_NAMES:
        raise SettingsError(where, f"{section}.{name}: unknown particle type (known: {', '.join(PARTICLE_NAMES)})")
    return name


def _thresholds(values, where, section: str, fill: bool) -> dict[str, float]:
    if not isinstance(values, Mapping):
        raise SettingsError(where, f"{section}: expected an object of per-type thresholds, got {values!r}")
    out = dict.fromkeys(PARTICLE_NAMES, DEFAULT_THRESHOLD) if fill else {}
    for name, v in values.items():
        _particle(name, where, section)
        try:
            v = check_type(v, float)
        except TypeError as exc:
            raise SettingsError(where, f"{section}.{name}: {exc}") from None
        if not 0.0 <= v <= 1.0:
            raise SettingsError(where, f"{section}.{name}: a threshold must lie in [0, 1], got {v}")
        out[name] = float(v)
    return out


def _companion(doc: Mapping, where, section: str) -> Companion:
    f = doc.get("file")
    if not isinstance(f, str) or not f:
        raise SettingsError(where, f"{section}.file: expected a file name, got {f!r}")
    return Companion(f, _digest(doc.get("sha256"), where, f"{section}.sha256"))


def _digest(value, where, key: str) -> str | None:
    """``value`` if it is a SHA-256 hex digest (or ``None``), else :class:`SettingsError` naming ``key``."""
    if value is not None and not (isinstance(value, str) and len(value) == 64):
        raise SettingsError(where, f"{key}: expected a 64-character hex digest, got {value!r}")
    return value


def _rescore(doc, where) -> RescoreSettings | None:
    if doc is None:
        return None
    if not isinstance(doc, Mapping):
        raise SettingsError(where, f"rescore: expected an object, got {doc!r}")
    _check_keys(doc, {"file", "sha256", "config", "thresholds", "templates", *_RESCORE_RECORD_KEYS}, where, "rescore")
    _check_records(doc, _RESCORE_RECORD_KEYS, where, "rescore")
    templates = doc.get("templates")
    if templates is not None:
        if not isinstance(templates, Mapping):
            raise SettingsError(where, f"rescore.templates: expected an object, got {templates!r}")
        _check_keys(templates, {"file", "sha256", "config"}, where, "rescore.templates")
        templates = TemplateSettings(_companion(templates, where, "rescore.templates"),
                                     TemplateConfig.from_dict(templates.get("config"), where, "rescore.templates.config"))
    if "thresholds" not in doc:
        raise SettingsError(where, "rescore.thresholds: missing")
    return RescoreSettings(_companion(doc, where, "rescore"),
                           RescoreConfig.from_dict(doc.get("config"), where, "rescore.config"),
                           _thresholds(doc["thresholds"], where, "rescore.thresholds", fill=True), templates)


def set_setting(doc: dict, key: str, value, where=None) -> dict:
    """A copy of the settings document ``doc`` with the dotted ``key`` set to ``value``, checked strictly.

    The key must name a setting :meth:`PipelineSettings.from_doc` knows (records such as ``table``
    cannot be set); the result is parsed again, so a bad value raises
    :class:`~czii_kit.errors.SettingsError` naming ``where`` and the key.
    """
    parts = key.split(".")
    if not all(parts) or parts[0] in _RECORD_KEYS or parts[0] == "weights_sha256":
        raise SettingsError(where, f"{key}: not a setting that can be set")
    out = json.loads(json.dumps(doc))
    node = out
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part) if isinstance(node, dict) else None
        if not isinstance(nxt, dict):
            raise SettingsError(where, f"{'.'.join(parts[:i + 1])}: no such section in this file")
        node = nxt
    node[parts[-1]] = value
    PipelineSettings.from_doc(out, where)
    return out
