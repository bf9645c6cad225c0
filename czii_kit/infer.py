"""Run a YOLO detector over the slices of tomograms: streamed, batched, through ultralytics.

Backends: ``"torch"`` (the ``.pt`` itself), ``"onnx"`` and ``"openvino"``. ONNX/OpenVINO models are
exported once with ultralytics (``dynamic=True`` batch and size, ``half=False``) and cached beside
the weights as ``{stem}_{imgsz}.onnx`` / ``{stem}_{imgsz}_openvino_model/`` with a
``czii_kit_export.json`` naming the source weights' SHA-256; a changed ``.pt`` triggers a re-export.

The raw volume of one tomogram is held in memory (float32, ~290 MB for 184x630x630); the 2.5D
images are built one batch at a time and never all at once.

Detections table: ``run, z, x, y, w, h, conf, class``. ``z`` is the slice index; ``x, y`` are the
box centre as *fractional voxel indices* of the level-0 volume (voxel ``i``'s centre is ``i``, so a
box centred at pixel coordinate ``c`` gives index ``c - 0.5``); ``w, h`` are the box size in voxels;
``class`` is the catalog class id. :mod:`czii_kit.postprocess` turns them into Å.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from czii_kit.errors import CziiKitError, DataError
from czii_kit.postprocess import DETECTION_COLUMNS, empty_detections
from czii_kit.preprocess import PreprocessConfig, iter_stacks, robust_window, slice_indices
from czii_kit.tomogram import open_tomogram

BACKENDS = ("torch", "onnx", "openvino")
EXPORT_RECORD = "czii_kit_export.json"


@dataclass
class InferenceConfig:
    """How slices are run through the model.

    Attributes
    ----------
    imgsz : int or None
        Network input size; ``None`` = the slice's larger side rounded up to a multiple of 32
        (native resolution: 630 -> 640).
    batch : int
        Slices per forward pass.
    z_stride : int
        Run every ``z_stride``-th slice (2 halves the time; particles of radius >= 6 voxels still
        cross >= 4 visited slices).
    tta : bool
        Also run left-right and up-down flipped images and pool the boxes (3x the time).
    conf : float
        Minimum box confidence kept (keep it low: thresholds are tuned after 3D merging).
    iou : float
        2D NMS IoU threshold inside each slice.
    max_det : int
        Boxes kept per slice.
    device : str or None
        ultralytics device string (``"cpu"``, ``"0"``); ``None`` lets ultralytics choose.
    """

    imgsz: int | None = None
    batch: int = 16
    z_stride: int = 1
    tta: bool = False
    conf: float = 0.05
    iou: float = 0.6
    max_det: int = 300
    device: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def native_imgsz(shape_yx: Sequence[int], stride: int = 32) -> int:
    """The slice's larger side rounded up to a multiple of ``stride``."""
    return int(math.ceil(max(shape_yx) / stride) * stride)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export_path(weights: str | Path, backend: str, imgsz: int) -> Path:
    """Where the cached export of ``weights`` for ``backend`` at ``imgsz`` lives."""
    w = Path(weights)
    if backend == "onnx":
        return w.with_name(f"{w.stem}_{imgsz}.onnx")
    if backend == "openvino":
        return w.with_name(f"{w.stem}_{imgsz}_openvino_model")
    raise ValueError(f"backend {backend!r} has no export")


def ensure_export(weights: str | Path, backend: str, imgsz: int) -> Path:
    """Export ``weights`` to ``backend`` once (cached beside the weights); return the model path."""
    from czii_kit.offline import configure_offline

    configure_offline()
    w = Path(weights)
    dest = export_path(w, backend, imgsz)
    rec_path = (dest if backend == "openvino" else dest.parent) / (
        EXPORT_RECORD if backend == "openvino" else f"{dest.name}.{EXPORT_RECORD}")
    digest = _sha256(w)
    if dest.exists() and rec_path.is_file():
        try:
            rec = json.loads(rec_path.read_text())
        except json.JSONDecodeError:
            rec = {}
        if rec.get("weights_sha256") == digest and rec.get("imgsz") == imgsz:
            return dest
    from ultralytics import YOLO

    model = YOLO(str(w))
    kwargs = {"format": backend, "imgsz": imgsz, "dynamic": True, "batch": 1}
    if backend == "onnx":
        kwargs["simplify"] = False
    try:
        out = Path(model.export(**kwargs))
    except Exception as exc:  # an exporter failure is a user-facing problem with the model/backend
        raise CziiKitError(f"{w}: export to {backend} failed: {exc}") from exc
    if dest.exists():
        shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
    out.rename(dest)
    record = {"weights": str(w.name), "weights_sha256": digest, "imgsz": imgsz, "export_args": kwargs}
    rec_path.write_text(json.dumps(record, indent=1))
    return dest


def load_model(weights: str | Path, backend: str = "torch", imgsz: int = 640):
    """An ultralytics ``YOLO`` for ``weights`` on ``backend`` (exporting once when needed)."""
    from czii_kit.offline import configure_offline

    configure_offline()
    if backend not in BACKENDS:
        raise CziiKitError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    w = Path(weights)
    if not w.is_file():
        raise DataError(w, "no such weights file")
    from ultralytics import YOLO

    path = w if backend == "torch" else ensure_export(w, backend, imgsz)
    return YOLO(str(path), task="detect")


class Detector:
    """A loaded model plus its inference settings: images in, boxes out.

    Parameters
    ----------
    weights : path-like
        A ``.pt`` trained by :func:`czii_kit.train.train`.
    backend : {"torch", "onnx", "openvino"}
    config : InferenceConfig
    imgsz : int
        Network input size (resolved by the caller for the slice shape).
    """

    def __init__(self, weights: str | Path, backend: str = "torch", config: InferenceConfig | None = None,
                 imgsz: int = 640):
        self.weights = Path(weights)
        self.backend = backend
        self.config = config or InferenceConfig()
        self.imgsz = int(imgsz)
        self.model = load_model(self.weights, backend, self.imgsz)

    def _predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
        c = self.config
        kw = {"imgsz": self.imgsz, "conf": c.conf, "iou": c.iou, "max_det": c.max_det, "verbose": False}
        if c.device is not None:
            kw["device"] = c.device
        out = []
        for r in self.model.predict(images, **kw):
            b = r.boxes
            if b is None or len(b) == 0:
                out.append(np.empty((0, 6), np.float32))
                continue
            out.append(np.concatenate([b.xywh.cpu().numpy(), b.conf.cpu().numpy()[:, None],
                                       b.cls.cpu().numpy()[:, None]], axis=1).astype(np.float32))
        return out

    def detect(self, images: np.ndarray) -> list[np.ndarray]:
        """Boxes per image for ``images (B, H, W, 3)`` uint8: each ``(n, 6)`` ``cx, cy, w, h, conf, cls`` (pixels)."""
        imgs = [np.ascontiguousarray(im) for im in images]
        res = self._predict(imgs)
        if self.config.tta:
            h, w = images.shape[1:3]
            lr = self._predict([np.ascontiguousarray(im[:, ::-1]) for im in images])
            ud = self._predict([np.ascontiguousarray(im[::-1]) for im in images])
            merged = []
            for a, b, c in zip(res, lr, ud, strict=True):
                b = b.copy()
                c = c.copy()
                b[:, 0] = w - b[:, 0]
                c[:, 1] = h - c[:, 1]
                merged.append(np.concatenate([a, b, c]))
            res = merged
        return res


def preprocess_config_for(weights: str | Path) -> PreprocessConfig:
    """The preprocessing recorded beside ``weights`` (``czii_kit_train.json``), else the default."""
    from czii_kit.train import read_train_record

    return PreprocessConfig.from_dict(read_train_record(weights).get("preprocess"))


def detect_volume(detector: Detector, volume: np.ndarray, run: str, preprocess: PreprocessConfig,
                  z_stride: int = 1, source=None, progress=None) -> pd.DataFrame:
    """Detections of one ``[z, y, x]`` volume (see module docstring for the columns)."""
    window = robust_window(volume, preprocess.lo, preprocess.hi, preprocess.sample_step, preprocess.invert,
                           source=source)
    rows = []
    zs = slice_indices(volume.shape[0], z_stride)
    for zb, imgs in iter_stacks(volume, window, preprocess, zs, detector.config.batch):
        if imgs.dtype != np.uint8:
            imgs = (imgs * 255.0 + 0.5).astype(np.uint8)
        for z, boxes in zip(zb, detector.detect(imgs), strict=True):
            if len(boxes):
                rows.append(np.column_stack([np.full(len(boxes), z, np.float32), boxes]))
        if progress is not None:
            progress.update(len(zb))
    if not rows:
        return empty_detections()
    a = np.concatenate(rows)
    df = pd.DataFrame({
        "run": run, "z": a[:, 0].astype(int), "x": a[:, 1] - 0.5, "y": a[:, 2] - 0.5,
        "w": a[:, 3], "h": a[:, 4], "conf": a[:, 5], "class": a[:, 6].astype(int),
    })
    return df[DETECTION_COLUMNS]


def detect_runs(weights: str | Path, runs: Iterable, tomogram: str = "denoised", backend: str = "torch",
                config: InferenceConfig | None = None, progress: bool = True
                ) -> tuple[pd.DataFrame, dict[str, float]]:
    """Detections of every run (``czii_kit.layout.Run`` objects) and each run's voxel size (Å).

    Tomograms are read one at a time; the model is loaded once (for the first run's slice size).
    """
    from tqdm.auto import tqdm

    config = config or InferenceConfig()
    runs = list(runs)
    prep = preprocess_config_for(weights)
    detector = None
    frames, voxel_sizes = [], {}
    tomos = [(r, open_tomogram(r.tomogram_path(tomogram))) for r in runs]
    total = sum(len(slice_indices(t.shape[0], config.z_stride)) for _, t in tomos)
    bar = tqdm(total=total, desc="detect", unit="slice", disable=not progress)
    for run, tomo in tomos:
        bar.set_postfix_str(run.name)
        imgsz = config.imgsz or native_imgsz(tomo.shape[1:])
        if detector is None or detector.imgsz != imgsz:
            detector = Detector(weights, backend, config, imgsz)
        vol = tomo.read()
        frames.append(detect_volume(detector, vol, run.name, prep, config.z_stride, tomo.path, bar))
        voxel_sizes[run.name] = tomo.voxel_size
        del vol
    bar.close()
    dets = pd.concat(frames, ignore_index=True) if frames else empty_detections()
    return dets, voxel_sizes
