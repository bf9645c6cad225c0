"""Train a YOLO detector on a czii_kit dataset, offline and resumable.

Weights land in ``{out_dir}/weights/{best,last}.pt``; ``czii_kit_train.json`` beside them records
the training arguments, the dataset manifest (including the preprocessing that inference must
repeat), and the czii_kit / ultralytics / torch versions; a run fine-tuned from a ``.pt`` also keeps
that model's own record under ``base_model``, so a chain of stages stays traceable.

Augmentation defaults suit 2.5D cryo-ET stacks: hue and saturation jitter are off (they would mix
the z-slices held in the colour channels), scale jitter is small (particle size is a class cue),
flips and mosaic are on, rotations off; a ``.yaml`` architecture starts from scratch
(``pretrained=False``), a ``.pt`` is fine-tuned from its weights (:data:`FINETUNE_DEFAULTS`).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform
from pathlib import Path

from czii_kit import __version__
from czii_kit.atomic import atomic_write_text
from czii_kit.bundle import TRAIN_RECORD, read_train_record
from czii_kit.errors import CziiKitError, DataError, FileExistsNoForce
from czii_kit.offline import configure_offline
from czii_kit.yolo_dataset import read_manifest

DEFAULTS: dict = {
    "epochs": 50,
    "batch": 16,
    "seed": 0,
    "deterministic": True,
    "pretrained": False,
    "hsv_h": 0.0,
    "hsv_s": 0.0,
    "hsv_v": 0.2,
    "scale": 0.1,
    "translate": 0.1,
    "degrees": 0.0,
    "shear": 0.0,
    "perspective": 0.0,
    "fliplr": 0.5,
    "flipud": 0.5,
    "mosaic": 1.0,
    "mixup": 0.0,
    "close_mosaic": 5,
    "amp": False,  # AMP's self-check would download yolo weights; CPU training has no AMP anyway
    "plots": True,
    "workers": 2,
    "patience": 50,
    "verbose": False,
}
"""ultralytics ``train`` arguments czii_kit uses unless told otherwise (merged as ``{**DEFAULTS, **kwargs}``)."""

FINETUNE_DEFAULTS: dict = {
    "pretrained": True,  # start from the .pt's weights (ultralytics builds a fresh model when this is False)
    "warmup_bias_lr": 0.0,  # the usual 0.1 bias warm-up knocks a trained detector back to scratch-level losses
    "warmup_epochs": 1.0,
}
"""Merged over :data:`DEFAULTS` when training starts from a ``.pt`` (fine-tuning), before the caller's arguments."""


def default_imgsz(manifest: dict) -> int:
    """Training image size from a dataset manifest: the crop side, else the largest slice side (multiple of 32)."""
    side = manifest.get("crop")
    if not side:
        shapes = manifest.get("shape_zyx") or {}
        side = max((max(s[1], s[2]) for s in shapes.values()), default=640)
    return int(math.ceil(int(side) / 32) * 32)


def _versions() -> dict:
    import torch
    import ultralytics

    return {"czii_kit": __version__, "ultralytics": ultralytics.__version__, "torch": torch.__version__,
            "python": platform.python_version()}


def _resolve_model(model: str | Path) -> str:
    m = str(model)
    if m.endswith((".yaml", ".yml")):
        return m  # built from ultralytics' bundled model configs (or a local yaml): no download
    if not Path(m).is_file():
        raise DataError(m, "no such weights file (czii_kit never downloads weights; give a local .pt or a "
                           "model .yaml such as yolo11n.yaml)")
    return m


def _check_resumable(last: Path) -> None:
    """Refuse to resume a finished run (ultralytics would fall back to its default, downloadable dataset)."""
    import torch

    try:
        ckpt = torch.load(str(last), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise DataError(last, f"cannot read the checkpoint ({exc})") from exc
    epoch = ckpt.get("epoch", -1) if isinstance(ckpt, dict) else -1
    epochs = (ckpt.get("train_args") or {}).get("epochs") if isinstance(ckpt, dict) else None
    if epoch is None or epoch < 0 or (epochs is not None and epoch + 1 >= epochs):
        raise CziiKitError(
            f"{last}: this training run already finished; start a new run (e.g. `czii-kit train DATA --out NEW "
            f"--model {last}` to continue from these weights)"
        )


def train(
    data_yaml: str | Path,
    out_dir: str | Path,
    model: str | Path = "yolo11n.yaml",
    epochs: int | None = None,
    imgsz: int | None = None,
    batch: int | None = None,
    seed: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    **overrides,
) -> Path:
    """Train (or resume) a detector; return the path of ``best.pt``.

    Parameters
    ----------
    data_yaml : path-like
        ``data.yaml`` written by :func:`czii_kit.yolo_dataset.build_dataset`.
    out_dir : path-like
        Run folder; weights go to ``out_dir/weights``.
    model : str or path
        ``"yolo11n.yaml"`` (architecture from scratch) or a local ``.pt``.
    epochs, imgsz, batch, seed : optional
        Override :data:`DEFAULTS`; ``imgsz`` defaults to the dataset's crop side (or slice size).
    resume : bool
        Continue from ``out_dir/weights/last.pt`` with its saved arguments.
    overwrite : bool
        Start afresh in an ``out_dir`` that already holds weights.
    **overrides
        Any other ultralytics ``train`` argument.
    """
    out_dir = Path(out_dir).absolute()
    if not resume and not Path(data_yaml).is_file():
        raise DataError(data_yaml, "no such dataset file (build one with `czii-kit build-dataset`)")

    configure_offline()
    from ultralytics import YOLO

    wdir = out_dir / "weights"
    record_path = wdir / TRAIN_RECORD
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    if resume:
        last = wdir / "last.pt"
        if not last.is_file():
            raise DataError(last, "nothing to resume (no last.pt in the run folder)")
        _check_resumable(last)
        record = read_train_record(last)
        record.setdefault("resumed", []).append(started)
        yolo = YOLO(str(last))
        results = yolo.train(resume=True)
    else:
        data_yaml = Path(data_yaml).absolute()
        if not data_yaml.is_file():
            raise DataError(data_yaml, "no such dataset file (build one with `czii-kit build-dataset`)")
        if (wdir / "last.pt").exists() and not overwrite:
            raise FileExistsNoForce(f"{wdir / 'last.pt'}: a training run already exists here "
                                    "(use --resume to continue it or --force to start afresh)")
        manifest = read_manifest(data_yaml)
        given = {"epochs": epochs, "batch": batch, "seed": seed,
                 "imgsz": imgsz if imgsz is not None else default_imgsz(manifest)}
        finetune = FINETUNE_DEFAULTS if str(model).endswith(".pt") else {}
        args = {**DEFAULTS, **finetune, **{k: v for k, v in given.items() if v is not None}, **overrides}
        # project=out_dir, name="." saves exactly into out_dir (ultralytics renames a run called "model")
        args.update(data=str(data_yaml), project=str(out_dir), name=".", exist_ok=True)
        record = {
            "czii_kit_train_version": 1,
            "started": started,
            "status": "running",
            "model": str(model),
            "data_yaml": str(data_yaml),
            "train_args": args,
            "imgsz": args["imgsz"],
            "preprocess": manifest.get("preprocess"),
            "dataset": manifest,
            "versions": _versions(),
        }
        if finetune:
            record["base_model"] = {"weights": str(Path(model).absolute()), "record": read_train_record(model)}
        wdir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(record_path, json.dumps(record, indent=1, default=str), overwrite=True)
        yolo = YOLO(_resolve_model(model))
        results = yolo.train(**args)
    trainer = getattr(yolo, "trainer", None)
    metrics = {}
    if trainer is not None and getattr(trainer, "metrics", None):
        metrics = {k: float(v) for k, v in trainer.metrics.items() if isinstance(v, (int, float))}
    elif results is not None and hasattr(results, "results_dict"):
        metrics = {k: float(v) for k, v in results.results_dict.items()}
    best = wdir / "best.pt"
    if not best.is_file():
        best = wdir / "last.pt"
    record.update(status="finished", finished=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  metrics=metrics, best=str(best), last=str(wdir / "last.pt"))
    atomic_write_text(record_path, json.dumps(record, indent=1, default=str), overwrite=True)
    return best
