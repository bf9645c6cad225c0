"""Run a YOLO detector over the slices of tomograms: streamed, batched, through ultralytics.

Backends: ``"torch"`` (the ``.pt`` itself), ``"onnx"`` and ``"openvino"``, all run through
ultralytics' ``AutoBackend`` and ``non_max_suppression``. ONNX/OpenVINO models are exported once
with ultralytics (static input ``(batch, 3, imgsz, imgsz)``, fp32) and cached beside the weights as
``{stem}_{imgsz}_b{batch}.onnx`` / ``{stem}_{imgsz}_b{batch}_openvino_model/`` with a
``czii_kit_export.json`` naming the source weights' SHA-256; a changed ``.pt`` triggers a re-export.

The raw volume of one tomogram is held in memory (float32, ~290 MB for 184x630x630); the 2.5D
images are built one batch at a time and never all at once.

Detections table: ``run, z, x, y, w, h, conf, class``. ``z`` is the slice index; ``x, y`` are the
box centre as *fractional voxel indices* of the level-0 volume (voxel ``i``'s centre is ``i``, so a
box centred at pixel coordinate ``c`` gives index ``c - 0.5``); ``w, h`` are the box size in voxels;
``class`` is the catalog class id. :mod:`czii_kit.postprocess` turns them into Å.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import queue
import shutil
import sys
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from czii_kit.catalog import class_names
from czii_kit.checksum import file_sha256
from czii_kit.config import StrictConfig
from czii_kit.errors import CziiKitError, DataError
from czii_kit.offline import configure_offline, czii_home
from czii_kit.postprocess import DETECTION_COLUMNS, empty_detections
from czii_kit.preprocess import (
    FLATTEN_MODES,
    INPUT_SCALE,
    TILT_AXES,
    PreprocessConfig,
    Window,
    channel_input,
    channel_source,
    contrast_skew,
    iter_stacks,
    parse_smooth,
    resampled_shape,
    settle_flatten,
    settle_smoothing,
    settle_tilt_axis,
    slice_indices,
    to_uint8,
    wedge_ratio,
    window_for,
)
from czii_kit.tomogram import open_tomogram
from czii_kit.volumes import load_volume

BACKENDS = ("torch", "onnx", "openvino")
EXPORT_RECORD = "czii_kit_export.json"


@dataclass
class InferenceConfig(StrictConfig):
    """How slices are run through the model.

    Attributes
    ----------
    imgsz : int or None
        Network input size; ``None`` = the slice's larger side rounded up to a multiple of 32
        (native resolution: 630 -> 640).
    batch : int
        Slices per forward pass.
    z_stride : int
        Run every ``z_stride``-th slice. 2 halves the time (OpenVINO, 2 CPUs: ~3.8 s instead of
        ~5.7 s per 184x630x630 tomogram, `czii-kit bench`); every particle (radius >= 6 voxels)
        still shows on >= 4 visited slices. Cost measured on simulated detections of the real
        Kaggle layouts: weighted F4 0.999 -> 0.992, mostly apo-ferritin (0.995 -> 0.951).
    tta : bool
        Also run left-right and up-down flipped images and pool the boxes (3x the time).
    conf : float
        Minimum box confidence kept (keep it low: thresholds are tuned after 3D merging).
    iou : float
        2D NMS IoU threshold inside each slice.
    max_det : int
        Boxes kept per slice.
    multi_label : bool
        Keep a box once per class whose score passes ``conf`` (not only its best class), so a
        particle the network hesitates about (beta-galactosidase or thyroglobulin?) stays a
        candidate of both; the per-type thresholds tuned afterwards decide.
    polarity : {"auto", "dark", "bright"}
        Contrast of the input: ``"dark"`` dense matter (the cryo-ET convention the models are
        trained on), ``"bright"`` inverted before detection, ``"auto"`` inverted only when the
        volume's smoothed intensity skew shows clearly bright dense matter
        (:func:`czii_kit.preprocess.window_for`; a warning names the tomogram).
    smooth : "auto" or float
        Gaussian low-pass (sigma in voxels) of the whole volume before detection, rescoring and
        refinement: ``"auto"`` low-passes only noisy tomograms (raw WBP reconstructions: x-neighbour
        correlation below :data:`czii_kit.preprocess.SMOOTH_TARGET`) just enough to look as smooth
        as the denoised tomograms the models are trained on, and sharpens over-smoothed ones
        (x-neighbour correlation above :data:`czii_kit.preprocess.SHARPEN_LIMIT`, e.g. a stronger
        denoiser) with an unsharp mask (:func:`czii_kit.preprocess.settle_smoothing`; a warning names
        the tomogram); ``0`` never does either.
    flatten : {"auto", "on", "off"}
        Subtract the slow lateral variation of the background (uneven ice or illumination) before
        everything else: ``"auto"`` only when it is strong (:func:`czii_kit.preprocess.settle_flatten`;
        a warning names the tomogram), ``"on"`` always, ``"off"`` never.
    tilt_axis : {"auto", "y", "x"}
        Direction of the tilt axis in the tomogram. The models are trained with it along y, where
        the missing wedge smears particles along x; with ``"x"`` (or ``"auto"`` when the wedge shows
        it: :func:`czii_kit.preprocess.settle_tilt_axis`) each slice reaches the detector with x and
        y exchanged and its boxes are turned back.
    device : str or None
        ultralytics device string (``"cpu"``, ``"0"``); ``None`` lets ultralytics choose.
    """

    imgsz: int | None = None
    batch: int = 8
    z_stride: int = 1
    tta: bool = False
    conf: float = 0.05
    iou: float = 0.6
    max_det: int = 300
    multi_label: bool = False
    polarity: str = "auto"
    smooth: str | float = "auto"
    flatten: str = "auto"
    tilt_axis: str = "auto"
    device: str | None = None

    def __post_init__(self):
        self.smooth = parse_smooth(self.smooth)
        if self.flatten not in FLATTEN_MODES:
            raise ValueError(f"flatten must be one of {FLATTEN_MODES}, got {self.flatten!r}")
        if self.tilt_axis not in TILT_AXES:
            raise ValueError(f"tilt_axis must be one of {TILT_AXES}, got {self.tilt_axis!r}")
        if self.polarity not in ("auto", "dark", "bright"):
            raise ValueError(f"polarity must be 'auto', 'dark' or 'bright', got {self.polarity!r}")
        if self.z_stride < 1 or self.batch < 1 or self.max_det < 1:
            raise ValueError(f"z_stride, batch and max_det must be >= 1, got {self.z_stride}, {self.batch}, "
                             f"{self.max_det}")
        if self.imgsz is not None and (self.imgsz < 32 or self.imgsz % 32):
            raise ValueError(f"imgsz must be a multiple of 32 (or null: native), got {self.imgsz}")
        if not (0.0 <= self.conf <= 1.0 and 0.0 < self.iou <= 1.0):
            raise ValueError(f"conf must lie in [0, 1] and iou in (0, 1], got {self.conf}, {self.iou}")


def native_imgsz(shape_yx: Sequence[int], stride: int = 32) -> int:
    """The slice's larger side rounded up to a multiple of ``stride``."""
    return int(math.ceil(max(shape_yx) / stride) * stride)


EXPORTS_ENV = "CZII_KIT_EXPORTS"
"""Environment variable naming the export cache folder (default ``$CZII_KIT_HOME/exports``)."""


def export_cache(export_dir: str | Path | None = None) -> Path:
    """The folder ONNX / OpenVINO exports are cached in: ``export_dir``, else ``$CZII_KIT_EXPORTS``, else
    ``exports`` in czii_kit's cache folder (:func:`czii_kit.offline.czii_home`). Never the package folder,
    so a read-only install works."""
    if export_dir is not None:
        return Path(export_dir).expanduser()
    env = os.environ.get(EXPORTS_ENV)
    return Path(env).expanduser() if env else czii_home() / "exports"


def export_path(weights: str | Path, backend: str, imgsz: int, batch: int = 8, digest: str | None = None,
                export_dir: str | Path | None = None) -> Path:
    """Where the cached export of ``weights`` (SHA-256 ``digest``) for ``backend`` at ``imgsz`` and ``batch`` lives:
    a folder per weights checksum in :func:`export_cache`, so two models (or versions) never mix."""
    w = Path(weights)
    folder = export_cache(export_dir) / (digest or file_sha256(w))[:16]
    if backend == "onnx":
        return folder / f"{w.stem}_{imgsz}_b{batch}.onnx"
    if backend == "openvino":
        return folder / f"{w.stem}_{imgsz}_b{batch}_openvino_model"
    raise ValueError(f"backend {backend!r} has no export")


def _cached_copy(weights: Path, folder: Path) -> Path:
    """A copy of ``weights`` in the export folder ``folder`` (ultralytics writes an export beside its ``.pt``)."""
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / weights.name
    if not copy.is_file():
        tmp = folder / f".{weights.name}.{os.getpid()}.tmp"
        shutil.copyfile(weights, tmp)
        tmp.replace(copy)
    return copy


BACKEND_MODULES = {"torch": (), "onnx": ("onnx", "onnxruntime"), "openvino": ("openvino",)}
"""Python modules each backend needs beyond torch (installed by the ``[export]`` extra)."""


def missing_backend_modules(backend: str) -> list[str]:
    """The modules of :data:`BACKEND_MODULES` that are not importable here (``[]`` when all are)."""
    import importlib.util

    return [m for m in BACKEND_MODULES.get(backend, ()) if importlib.util.find_spec(m) is None]


def ensure_export(weights: str | Path, backend: str, imgsz: int, batch: int = 8,
                  export_dir: str | Path | None = None) -> Path:
    """Export ``weights`` to ``backend`` once (cached in :func:`export_cache`, keyed by the weights'
    SHA-256); return the model path.

    Exports are static (``dynamic=False``) with input ``(batch, 3, imgsz, imgsz)``: OpenVINO runs
    static shapes faster and with less memory; ultralytics' AutoBackend pads a short last batch.
    """
    configure_offline()
    w = Path(weights)
    digest = file_sha256(w)
    dest = export_path(w, backend, imgsz, batch, digest, export_dir)
    w = _cached_copy(w, dest.parent)
    rec_path = dest / EXPORT_RECORD if backend == "openvino" else dest.with_name(f"{dest.name}.{EXPORT_RECORD}")
    if dest.exists() and rec_path.is_file():
        try:
            rec = json.loads(rec_path.read_text())
        except json.JSONDecodeError:
            rec = {}
        if rec.get("weights_sha256") == digest:
            return dest
    from ultralytics import YOLO
    from ultralytics.utils import LOGGER

    print(f"exporting {w.name} to {backend} (imgsz {imgsz}, batch {batch}), cached as {dest.name} ...",
          file=sys.stderr)
    kwargs = {"format": backend, "imgsz": imgsz, "dynamic": False, "batch": batch, "device": "cpu"}
    if backend == "onnx":
        kwargs["simplify"] = False
    level = LOGGER.level
    LOGGER.setLevel(logging.WARNING)  # ultralytics logs its export report to stdout: keep stdout clean
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace deprecation notices
            out = Path(YOLO(str(w)).export(**kwargs))
    except Exception as exc:  # an exporter failure is a user-facing problem with the model/backend
        raise CziiKitError(f"{w}: export to {backend} failed: {exc}") from exc
    finally:
        LOGGER.setLevel(level)
    if dest.exists():
        shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
    out.rename(dest)
    record = {"weights": str(w.name), "weights_sha256": digest, "imgsz": imgsz, "batch": batch,
              "export_args": kwargs}
    rec_path.write_text(json.dumps(record, indent=1))
    return dest


_LOADED: dict = {}


def loaded_detector(weights: str | Path, backend: str = "torch", config: InferenceConfig | None = None,
                    imgsz: int = 640, export_dir: str | Path | None = None) -> Detector:
    """A :class:`Detector`, kept for the next call with the same arguments in the same thread (one per thread).

    Loading and compiling a model costs about as much as a few dozen slices; a process that predicts
    tomogram after tomogram in separate calls (a Dask worker, ``tune``, ``bench``) pays it once. The
    weights file's size and modification time are part of the key, so a changed file is loaded again.
    """
    config = config or InferenceConfig()
    w = Path(weights)
    st = w.stat() if w.is_file() else None
    key = (str(w.resolve()), st and (st.st_size, st.st_mtime_ns), backend, repr(config), int(imgsz),
           str(export_dir), threading.get_ident())
    det = _LOADED.get(key)
    if det is None:
        det = Detector(weights, backend, config, imgsz, export_dir)
        for k in [k for k in _LOADED if k[-1] == key[-1]]:  # one per thread
            del _LOADED[k]
        _LOADED[key] = det
    return det


LETTERBOX_PAD = np.float32(114.0 / 255.0)
"""Network input value of the padding below and right of an image (ultralytics' letterbox grey 114)."""


def prepare_batch(images: np.ndarray, imgsz: int) -> tuple[np.ndarray, float]:
    """Network input for ``images (B, H, W, 3)`` uint8: ``(B, 3, imgsz, imgsz)`` float32 0..1 and the scale.

    Channels are reversed (PNGs written by cv2 as BGR are read by ultralytics' training loader and
    fed to the network as RGB). Images are padded bottom/right with ultralytics' letterbox grey
    (114) without resizing when they fit (scale 1); larger ones are first scaled down to fit.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"expected images (B, H, W, 3), got shape {images.shape}")
    b, h, w = images.shape[:3]
    s = int(imgsz)
    scale = min(1.0, s / max(h, w))
    if scale < 1.0:
        import cv2

        nh, nw = min(s, int(round(h * scale))), min(s, int(round(w * scale)))
        images = np.stack([cv2.resize(im, (nw, nh), interpolation=cv2.INTER_LINEAR) for im in images])
        h, w = nh, nw
    x = np.empty((b, 3, s, s), np.float32)
    x[:, :, h:, :] = LETTERBOX_PAD
    x[:, :, :h, w:] = LETTERBOX_PAD
    for c in range(3):
        np.multiply(images[..., 2 - c], INPUT_SCALE, out=x[:, c, :h, :w])
    return x, scale


def iter_inputs(volume: np.ndarray, window: Window, preprocess: PreprocessConfig, z_indices: Sequence[int],
                batch: int, imgsz: int, free: list | None = None
                ) -> Iterator[tuple[np.ndarray, np.ndarray, float]]:
    """Network inputs of slices ``z_indices`` of ``volume [z, y, x]``, ``batch`` at a time: ``(z_batch (B,),
    x (B, 3, imgsz, imgsz) float32, scale)``.

    The values of :func:`prepare_batch` on :func:`czii_kit.preprocess.iter_stacks`' images, but each source
    slice is windowed, rounded to uint8, scaled to 0..1 and padded once, into a float32 channel image that
    the (up to three) 2.5D images using it copy; only the channel images of the batch and its neighbours
    are kept (about 20 MB at 640 px), and those no longer needed are reused for the next slices. Slices
    larger than ``imgsz`` (scaled down) and images of other than three channels go the plain way.

    ``free``: a list the consumer appends each ``x`` to once it is done with it; a batch is then made in
    one of those arrays rather than in a new one. With the channel images reused too, a pass over a
    tomogram takes no fresh memory after its first batches (fresh memory costs a page fault per 4 kB:
    about 0.2 s per full-size tomogram on 2 cores).
    """
    nz, ny, nx = volume.shape
    s = int(imgsz)
    if max(ny, nx) > s or len(preprocess.offsets) != 3:
        for zb, imgs in iter_stacks(volume, window, preprocess, z_indices, batch):
            yield (zb, *prepare_batch(to_uint8(imgs), s))
        return
    reversed_offsets = preprocess.offsets[::-1]  # channel c of the network = image channel 2 - c (prepare_batch)
    lo = min(preprocess.offsets) - preprocess.slab // 2
    cache: dict[int, np.ndarray] = {}  # channel images (s, s) by source slice
    spare: list[np.ndarray] = []  # channel images no later slice needs, to be written again
    work = np.empty((ny, nx), np.uint8)
    z_all = np.asarray(z_indices, dtype=int)
    for i in range(0, len(z_all), batch):
        zb = z_all[i : i + batch]
        for k in [k for k in cache if k < int(zb.min()) + lo]:
            spare.append(cache.pop(k))
        x = _free_array(free, (len(zb), 3, s, s))
        for b, z in enumerate(zb):
            if not 0 <= z < nz:
                raise IndexError(f"slice {z} outside 0..{nz - 1}")
            for c, off in enumerate(reversed_offsets):
                zc = channel_source(int(z), off, nz, preprocess)
                img = cache.get(zc)
                if img is None:
                    if spare:  # its padding is already in place
                        img = spare.pop()
                    else:
                        img = np.empty((s, s), np.float32)
                        img[ny:] = LETTERBOX_PAD
                        img[:ny, nx:] = LETTERBOX_PAD
                    channel_input(volume, zc, window, preprocess, img[:ny, :nx], work)
                    cache[zc] = img
                x[b, c] = img
        yield zb, x, 1.0


def _free_array(free: list | None, shape: tuple) -> np.ndarray:
    """A float32 array of ``shape`` taken from ``free`` (the last of that shape), else a new one."""
    for j in range(len(free or ()) - 1, -1, -1):
        if free[j].shape == shape and free[j].dtype == np.float32:
            return free.pop(j)
    return np.empty(shape, np.float32)


def _device(device: str | None, backend: str):
    import torch

    if backend != "torch":
        return torch.device("cpu")
    if device is None:
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    from ultralytics.utils.torch_utils import select_device

    return select_device(device, verbose=False)


def uses_streams(backend: str, config: InferenceConfig) -> bool:
    """Whether a :class:`Detector` runs ``backend`` on parallel OpenVINO streams (:class:`OpenVINOStreams`):
    OpenVINO on the CPU."""
    return backend == "openvino" and config.device in (None, "cpu")


def export_batch(backend: str, config: InferenceConfig, streams: bool = True) -> int:
    """The batch size of the export a :class:`Detector` of ``backend`` loads: 1 for the streams (one image per
    request), else ``config.batch``."""
    return 1 if streams and uses_streams(backend, config) else config.batch


def export_metadata(path: str | Path) -> dict:
    """The ``metadata.yaml`` ultralytics writes into an OpenVINO export folder (class names, ``end2end``, ...);
    ``{}`` when there is none."""
    import yaml

    meta = Path(path) / "metadata.yaml"
    if not meta.is_file():
        return {}
    try:
        return yaml.safe_load(meta.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DataError(meta, f"not readable YAML: {exc}") from exc


REQUESTS_PER_STREAM = 2
"""Inference requests per OpenVINO stream (:class:`OpenVINOStreams`): with one, a stream idles from the end of
its image until the callback has run and the next image is queued; with two, the next is queued already
(on 2 cores, detection of a full-size tomogram 2.51 -> 2.42 s, medians of 6 alternated in one process,
the same detections)."""


class OpenVINOStreams:
    """An OpenVINO model (batch-1 IR folder ``path``) compiled for throughput on the CPU: :data:`REQUESTS_PER_STREAM`
    inference requests per stream, the images of a batch queued on them with OpenVINO's own ``AsyncInferQueue``.

    OpenVINO's latency mode (ultralytics' setting) spreads one image over all cores, which leaves them
    idle between its layers; streams keep each core busy with an image of its own. Each image's output
    is what the latency-mode model gives it (the same kernels, one image at a time). The requests run on
    OpenVINO's threads, not Python's: no two Python threads call into the binding at once.
    """

    def __init__(self, path: str | Path):
        import openvino as ov

        xml = next(Path(path).glob("*.xml"))
        core = ov.Core()
        self.compiled = core.compile_model(core.read_model(xml), "CPU", {"PERFORMANCE_HINT": "THROUGHPUT"})
        n = REQUESTS_PER_STREAM * max(1, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self.queue = ov.AsyncInferQueue(self.compiled, n)
        self.queue.set_callback(_StreamedOutputs.store)
        shape = tuple(self.compiled.input(0).get_shape())
        self(np.zeros((n, *shape[1:]), np.float32))  # one pass on every request before real work

    def queue_images(self, x: np.ndarray) -> _StreamedOutputs:
        """Queue the images ``x (B, 3, S, S)`` (float32) on the streams; returns once the last is queued, which
        may be before the first has run (``.result()`` waits for them). Queuing the next batch before taking
        this one's outputs keeps every stream busy: no stream waits at the end of a batch for the others."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        pending = _StreamedOutputs(self.queue, x)
        for i in range(len(x)):  # zero-copy: the requests read x itself (kept by ``pending`` until it has run)
            self.queue.start_async({0: x[i:i + 1]}, (pending, i), share_inputs=True)
        return pending

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Raw outputs ``(B, ...)`` of images ``x (B, 3, S, S)`` float32."""
        return self.queue_images(x).result()


class _StreamedOutputs:
    """The outputs of one batch of images queued on :class:`OpenVINOStreams`, filled in as its requests end."""

    WAIT_S = 5.0
    """Seconds :meth:`result` waits before asking the queue itself (which raises a failed request's error)."""

    def __init__(self, queue, x: np.ndarray):
        self.queue, self.x = queue, x  # x: the requests read it until they have run
        self.outputs: list = [None] * len(x)
        self.left = len(x)
        self.lock = threading.Lock()
        self.done = threading.Event()
        if not len(x):
            self.done.set()

    @staticmethod
    def store(request, userdata) -> None:  # the queue's callback, on OpenVINO's thread
        pending, i = userdata
        pending.outputs[i] = np.array(request.get_output_tensor(0).data)  # a copy: the request reuses its buffer
        with pending.lock:
            pending.left -= 1
            if not pending.left:
                pending.done.set()

    def result(self) -> np.ndarray:
        """``(B, ...)`` outputs, once every image has run."""
        if not self.done.wait(self.WAIT_S):
            self.queue.wait_all()  # a failed request calls no callback; the queue raises its error here
            if not self.done.is_set():
                raise RuntimeError("OpenVINO ran the images but returned no output for some of them")
        self.x = None
        return np.concatenate(self.outputs)


class _Finished:
    """Outputs already computed, with the ``result()`` of a pending batch."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class _Started:
    """:meth:`Detector.start`'s pending outputs: ``result()`` gives :meth:`Detector.outputs`' list."""

    def __init__(self, parts: list):
        self.parts = parts  # [(pending raw output, flip)]

    def result(self) -> list[tuple]:
        import torch

        return [(torch.from_numpy(p.result()), flip) for p, flip in self.parts]


class Detector:
    """A loaded model (ultralytics ``AutoBackend``) plus its settings: uint8 images in, boxes out.

    Images are padded (bottom/right, grey 114 like ultralytics' letterbox) to ``imgsz x imgsz``
    without resizing when they fit, so particles keep their pixel size; larger images are scaled
    down to fit. Boxes go through ultralytics' ``non_max_suppression``.

    Parameters
    ----------
    weights : path-like
        A ``.pt`` trained by :func:`czii_kit.train.train`.
    backend : {"torch", "onnx", "openvino"}
    config : InferenceConfig
    imgsz : int
        Network input size (resolved by the caller for the slice shape; multiple of 32).
    export_dir : path-like, optional
        Cache of the exports (:func:`export_cache`).
    streams : bool
        OpenVINO on the CPU: run the images of a batch on parallel streams (:class:`OpenVINOStreams`, the
        batch-1 export, compiled once, without ultralytics' ``AutoBackend``; the same outputs, image by
        image, as the latency-mode model). ``False``: ultralytics' own setup (latency mode, the
        batch-``config.batch`` export; the bench's forward-pass limit uses it).
    """

    def __init__(self, weights: str | Path, backend: str = "torch", config: InferenceConfig | None = None,
                 imgsz: int = 640, export_dir: str | Path | None = None, streams: bool = True):
        configure_offline()
        if backend not in BACKENDS:
            raise CziiKitError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        missing = missing_backend_modules(backend)
        if missing:
            raise CziiKitError(f"the {backend} backend needs {', '.join(missing)}: pip install 'czii_kit[export]' "
                               "(or use --backend torch)")
        self.weights = Path(weights)
        if not self.weights.is_file():
            raise DataError(self.weights, "no such weights file")
        self.backend_name = backend
        self.config = config or InferenceConfig()
        self.imgsz = int(imgsz)
        if self.imgsz % 32:
            raise ValueError(f"imgsz must be a multiple of 32, got {imgsz}")
        self.streams = None
        streamed = streams and uses_streams(backend, self.config)
        path = self.weights if backend == "torch" else ensure_export(
            self.weights, backend, self.imgsz, export_batch(backend, self.config, streams), export_dir)
        self.device = _device(self.config.device, backend)
        if streamed:  # the streams alone: ultralytics' own (latency-mode) compilation of the model is not needed
            self.model = None
            self.streams = OpenVINOStreams(path)
            meta = export_metadata(path)
            names, self.end2end = meta.get("names") or {}, bool(meta.get("end2end", False))
        else:
            from ultralytics.nn.autobackend import AutoBackend

            self.model = AutoBackend(str(path), device=self.device, fp16=False, verbose=False)
            self.model.eval()
            names, self.end2end = self.model.names, bool(getattr(self.model, "end2end", False))
        self.names = {int(k): str(v) for k, v in dict(names).items()}
        if self.names != class_names():
            raise DataError(self.weights, f"the model's classes {self.names} are not czii_kit's catalog classes "
                                          f"{class_names()} (train it on a dataset from `czii-kit build-dataset`)")

    def to_tensor(self, images: np.ndarray):
        """``(B, H, W, 3)`` uint8 -> ``(B, 3, S, S)`` float tensor on the model's device, and the scale."""
        x, scale = prepare_batch(images, self.imgsz)
        return self.tensor(x), scale

    def tensor(self, x: np.ndarray):
        """Network input ``x (B, 3, S, S)`` float32 (:func:`iter_inputs`) as a tensor on the model's device."""
        import torch

        return torch.from_numpy(x).to(self.device)

    def release_memory(self) -> None:
        """Give back the working memory of an OpenVINO model between tomograms (reallocated by the next
        forward pass); nothing for the other backends."""
        for compiled in (getattr(getattr(self.model, "backend", None), "ov_compiled_model", None),
                         self.streams and self.streams.compiled):
            if compiled is not None and hasattr(compiled, "release_memory"):
                compiled.release_memory()

    def forward(self, x):
        """Raw network output for a prepared tensor (model-only timing)."""
        import torch

        if self.streams is not None:
            return torch.from_numpy(self.streams(x.numpy()))
        with torch.inference_mode():
            y = self.model(x)
        return y[0] if isinstance(y, (list, tuple)) else y

    def _boxes(self, y, flip: str | None = None) -> list[np.ndarray]:
        from ultralytics.utils.nms import non_max_suppression

        c = self.config
        out = non_max_suppression(y, c.conf, c.iou, max_det=c.max_det, nc=len(self.names), max_time_img=2.0,
                                  multi_label=c.multi_label, end2end=self.end2end)
        res = []
        s = float(self.imgsz)
        for d in out:
            d = d.detach().cpu().numpy().astype(np.float32)
            x0, y0, x1, y1 = d[:, 0], d[:, 1], d[:, 2], d[:, 3]
            if flip == "lr":
                x0, x1 = s - x1, s - x0
            elif flip == "ud":
                y0, y1 = s - y1, s - y0
            res.append(np.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0, d[:, 4], d[:, 5]], axis=1))
        return res

    def detect(self, images: np.ndarray) -> list[np.ndarray]:
        """Boxes per image for ``images (B, H, W, 3)`` uint8: each ``(n, 6)`` ``cx, cy, w, h, conf, cls``
        in pixel coordinates of the input image."""
        return self.detect_tensor(*self.to_tensor(np.asarray(images)))

    def outputs(self, x) -> list[tuple]:
        """Raw outputs of a prepared tensor ``x``: ``[(output, flip)]``, the images' own (flip ``None``), and with
        TTA the left-right and up-down flipped images' (``"lr"``, ``"ud"``); :meth:`boxes` makes them boxes."""
        return self.start(x).result()

    def start(self, x):
        """:meth:`outputs` of ``x`` begun; ``.result()`` of what it returns gives them. OpenVINO streams queue
        the images and return at once (see :meth:`OpenVINOStreams.queue_images`); the other backends run now."""
        flips = [(x, None)] + ([(x.flip(3), "lr"), (x.flip(2), "ud")] if self.config.tta else [])
        if self.streams is not None:
            return _Started([(self.streams.queue_images(t.numpy()), flip) for t, flip in flips])
        return _Finished([(self.forward(t), flip) for t, flip in flips])

    def boxes(self, outputs: list[tuple], scale: float = 1.0) -> list[np.ndarray]:
        """Boxes per image (as :meth:`detect`) of :meth:`outputs`' raw outputs: NMS, flipped boxes turned back
        and pooled, coordinates divided by the input's ``scale``."""
        res = [self._boxes(y, flip) for y, flip in outputs]
        res = res[0] if len(res) == 1 else [np.concatenate(t) for t in zip(*res, strict=True)]
        if scale != 1.0:
            for r in res:
                r[:, :4] /= scale
        return res

    def detect_tensor(self, x, scale: float = 1.0) -> list[np.ndarray]:
        """:meth:`detect` of images already made a tensor by :meth:`to_tensor` (``x`` and its ``scale``)."""
        return self.boxes(self.outputs(x), scale)


PREFETCH_DEPTH = 1
"""Batches of network input :func:`detect_prepared` builds ahead of the model (a bounded queue; one more
is being built meanwhile, 39 MB each at batch 8 and 640 px)."""


def prefetch(items: Iterable, depth: int = PREFETCH_DEPTH) -> Iterator:
    """The items of ``items``, produced by a background thread at most ``depth`` ahead of the consumer.

    Overlaps making the next batch (numpy, much of it outside the GIL) with the model's forward pass on
    this one (OpenVINO / torch release the GIL). An exception in the producer is raised here; closing
    the generator early stops the producer.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            put((end, exc))
            return
        put((end, None))

    worker = threading.Thread(target=produce, name="czii_kit-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item, exc = q.get()
            if item is end:
                if exc is not None:
                    raise exc
                return
            yield item
    finally:
        stop.set()
        worker.join()


def prepare_for_detection(volume: np.ndarray, preprocess: PreprocessConfig, config: InferenceConfig | None = None,
                          source=None, in_place: bool = False) -> tuple[np.ndarray, Window, float, bool]:
    """``volume [z, y, x]`` flattened and low-passed as ``config`` asks, its intensity window, the Gaussian sigma
    used and the tilt axis: ``(volume, window, sigma, turn)``.

    ``volume``: the (possibly) flattened and low-passed (or sharpened) volume
    (:func:`czii_kit.preprocess.settle_flatten`, :func:`czii_kit.preprocess.settle_smoothing`); ``window``: the
    :class:`Window` that maps it to 0..1 with dense matter dark (polarity settled as ``config.polarity``
    asks); ``sigma``: voxels (0: not filtered); ``turn``: give the detector each slice with x and y exchanged
    (:func:`czii_kit.preprocess.settle_tilt_axis`). The detector and the 3D stages (refinement, rescoring) use
    the same volume and window, so a tomogram is prepared once per pass over it. ``in_place``: a low-pass may
    overwrite ``volume`` (the caller holds no other use of it).

    The two measurements that read the volume as it is, the missing-wedge ratio and the contrast skew,
    are made in a second thread while this one settles flattening and smoothing (on 2 cores about 0.45 ->
    0.26 s for a full-size tomogram); when either changed the volume they are measured again on the
    new one, so the results are those of the sequential calls.
    """
    from concurrent.futures import ThreadPoolExecutor

    config = config or InferenceConfig()

    def measure(v):
        return (wedge_ratio(v) if config.tilt_axis == "auto" else None,
                contrast_skew(v) if config.polarity == "auto" else None)

    with ThreadPoolExecutor(1, thread_name_prefix="czii_kit-measure") as pool:
        pending = pool.submit(measure, volume)
        flat, _ = settle_flatten(volume, config.flatten, source=source)
        ratio, skew = pending.result()  # before a low-pass may overwrite the volume it reads
    out, sigma = settle_smoothing(flat, config.smooth, source=source, in_place=in_place)
    if out is not volume or sigma > 0:  # flattened, low-passed or sharpened: measured again on what is detected
        ratio, skew = measure(out)
    window, _ = window_for(out, preprocess, config.polarity, source=source, skew=skew)
    return out, window, sigma, settle_tilt_axis(out, config.tilt_axis, source, ratio=ratio)


def _single_torch_thread() -> None:
    """Torch ops of the calling thread on one core (OpenMP's thread count is per thread): NMS of a few hundred
    boxes gains nothing from a second thread, which takes a core from the model (detection of a full-size
    tomogram on 2 cores 2.44 -> 2.39 s, CPU 4.81 -> 4.70 s, medians of 6 alternated; the same boxes)."""
    import torch

    torch.set_num_threads(1)


def model_outputs(started) -> list[tuple]:
    """The outputs of a batch :meth:`Detector.start` began, once the model has them (a function of its own, so
    that profiles show the time :func:`detect_prepared` waits for the model's last images of a batch)."""
    return started.result()


def nms_result(future):
    """The boxes an NMS thread's ``future`` holds, once it has them (a function of its own, so that profiles
    show the time :func:`detect_prepared` waits for them)."""
    return future.result()


def detect_prepared(detector: Detector, volume: np.ndarray, window: Window, run: str, preprocess: PreprocessConfig,
                    z_stride: int = 1, progress=None, turn: bool = False) -> pd.DataFrame:
    """Detections of one volume already prepared by :func:`prepare_for_detection` (columns: module docstring).

    ``progress``: a tqdm bar advanced by the number of slices run. ``turn``: give the detector each
    slice with x and y exchanged (a tilt axis along x: :func:`czii_kit.preprocess.settle_tilt_axis`);
    the boxes are returned in the volume's own x and y.
    """
    rows = []
    zs = slice_indices(volume.shape[0], z_stride)
    seen = volume.transpose(0, 2, 1) if turn else volume

    split = all(hasattr(detector, m) for m in ("tensor", "start", "boxes"))  # else any .detect(images)

    free: list[np.ndarray] = []  # input arrays the model is done with, filled again by iter_inputs

    def inputs():  # made in a background thread while the model runs on the previous batch
        batch = detector.config.batch
        if split:
            for zb, x, scale in iter_inputs(seen, window, preprocess, zs, batch, detector.imgsz, free):
                yield zb, x, detector.tensor(x), scale
        else:
            for zb, imgs in iter_stacks(seen, window, preprocess, zs, batch):
                yield zb, to_uint8(imgs)

    def add(zb, boxes_per_image) -> None:
        for z, boxes in zip(zb, boxes_per_image, strict=True):
            if len(boxes):
                rows.append(np.column_stack([np.full(len(boxes), z, np.float32), boxes]))
        if progress is not None:
            progress.update(len(zb))

    if not split:
        for zb, imgs in prefetch(inputs(), PREFETCH_DEPTH):
            add(zb, detector.detect(imgs))
    else:  # NMS of a batch in a second thread while the model runs on the next one
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1, thread_name_prefix="czii_kit-nms", initializer=_single_torch_thread) as post:
            running, boxing = None, []  # the batch the model is on; batches in NMS, in order

            def finish(zb, x, started, scale) -> None:
                outputs = model_outputs(started)
                free.append(x)  # the model has read it
                boxing.append((zb, post.submit(detector.boxes, outputs, scale)))

            for zb, x, tensor, scale in prefetch(inputs(), PREFETCH_DEPTH):
                started = detector.start(tensor)  # queued before the last batch's outputs are taken: no pause
                if running is not None:
                    finish(*running)
                running = (zb, x, started, scale)
                while len(boxing) > 1:
                    zp, future = boxing.pop(0)
                    add(zp, nms_result(future))
            if running is not None:
                finish(*running)
            for zp, future in boxing:
                add(zp, nms_result(future))
    if not rows:
        return empty_detections()
    a = np.concatenate(rows)
    if turn:  # boxes of the turned slices: x <-> y, w <-> h
        a[:, [1, 2, 3, 4]] = a[:, [2, 1, 4, 3]]
    df = pd.DataFrame({
        "run": run, "z": a[:, 0].astype(int), "x": a[:, 1] - 0.5, "y": a[:, 2] - 0.5,
        "w": a[:, 3], "h": a[:, 4], "conf": a[:, 5], "class": a[:, 6].astype(int),
    })
    return df[DETECTION_COLUMNS]


def detect_volume(detector: Detector, volume: np.ndarray, run: str, preprocess: PreprocessConfig,
                  z_stride: int = 1, source=None, progress=None) -> pd.DataFrame:
    """Detections of one raw ``[z, y, x]`` volume (see module docstring for the columns).

    The volume is prepared first (:func:`prepare_for_detection`: low-passed as ``detector.config.smooth``
    asks, noisy tomograms only by default).
    """
    volume, window, _, turn = prepare_for_detection(volume, preprocess, detector.config, source or run)
    return detect_prepared(detector, volume, window, run, preprocess, z_stride, progress, turn)


@dataclass
class DetectedRun:
    """One run after detection (:func:`iter_detect_runs`).

    ``volume`` is the prepared tomogram (float32 ``[z, y, x]``, low-passed when ``sigma`` > 0) and
    ``window`` its intensity window (:func:`prepare_for_detection`); ``normalised()`` gives the 0..1 volume
    (dense matter dark) that refinement and rescoring read. Drop the object before the next run.
    """

    run: object
    voxel_size: float
    detections: pd.DataFrame
    volume: np.ndarray | None
    window: Window
    sigma: float

    def normalised(self, release: bool = False) -> np.ndarray:
        """The volume mapped through its window: float32 0..1 ``[z, y, x]``.

        ``release=True`` maps the volume in place (no second copy) and drops ``volume`` (set to ``None``).
        """
        if self.volume is None:
            raise ValueError(f"run {getattr(self.run, 'name', self.run)}: the volume was released")
        out = self.window.apply(self.volume, "float32", in_place=release)  # released: mapped where it lies
        if release:
            self.volume = None
        return out


@functools.cache
def _glibc():
    """The C library when it is glibc (whose ``malloc`` :func:`trim_heap` and :func:`fix_mmap_threshold` tune),
    else ``None``; looked up once per process (``find_library`` runs ``ldconfig``)."""
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") else None  # mallopt of other C libraries differs


def trim_heap() -> None:
    """Hand memory the C heap holds but no longer uses back to the system (glibc's ``malloc_trim``; nothing
    elsewhere): the many slice-sized arrays of detection leave it fragmented, which would otherwise stay
    in the resident size for the rest of the process."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


MMAP_THRESHOLD = 1 << 20
"""Bytes from which glibc's ``malloc`` maps each allocation on its own (:func:`fix_mmap_threshold`): below
one slice of a tomogram (630 x 630 float32: 1.6 MB), so slices, images and batches are unmapped when freed."""

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter numbers (malloc.h)


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes for this process; True if it was set.

    By default glibc raises the threshold to the size of each mapped block freed (up to 32 MB) and its
    trim threshold to twice that, so after the first freed batch every slice-sized array comes from the
    heaps of the threads that made it (the prefetch thread, OpenVINO's, the main one) and what they free
    stays resident, fragmented: the peak RSS of ``predict`` grew with each run it read. A fixed threshold
    stops that adjustment (and leaves the trim threshold at its default, 128 kB). Nothing is changed
    where the user set ``MALLOC_MMAP_THRESHOLD_`` or a ``glibc.malloc.mmap_threshold`` tunable, or
    where the C library is not glibc.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))


def _read_prepared(tomo, voxel_size: float | None, preprocess: PreprocessConfig, config: InferenceConfig):
    """``(volume, voxel size, window, sigma, turn)``: ``tomo`` read (:func:`czii_kit.volumes.load_volume`) and
    prepared (:func:`prepare_for_detection`), the raw volume held by nothing else and low-passed in place (one
    volume, not two, at the peak)."""
    vol, vs = load_volume(tomo, voxel_size)
    held = [vol]
    del vol  # from here the only reference travels into prepare_for_detection (popped from ``held``)
    prepared, window, sigma, turn = prepare_for_detection(held.pop(), preprocess, config, tomo.path, in_place=True)
    return prepared, vs, window, sigma, turn


def iter_detect_runs(weights: str | Path, runs: Iterable, tomogram: str = "denoised", backend: str = "torch",
                     config: InferenceConfig | None = None, preprocess: PreprocessConfig | None = None,
                     voxel_size: float | None = None, progress: bool = True, stage: str | None = None,
                     export_dir: str | Path | None = None, detectors: dict | None = None):
    """Yield a :class:`DetectedRun` per run (``czii_kit.layout.Run`` objects), one tomogram at a time.

    Each tomogram is read and prepared once (:func:`prepare_for_detection`) and kept in the yielded object,
    so later stages need not read or filter it again. The model is loaded once (for the first run's
    slice size; again only when a run's slices need another input size). One progress bar counts the
    slices of all runs; ``stage`` names what the consumer does with each run (shown on the bar
    meanwhile, e.g. ``"rescore"``). ``detectors``: loaded models by input size, kept across calls
    with the same weights, backend and ``config`` (a worker loads its model once, not once per run).
    """
    from tqdm.auto import tqdm

    config = config or InferenceConfig()
    runs = list(runs)
    prep = preprocess or PreprocessConfig()
    target = voxel_size
    detector = None
    tomos = [(r, open_tomogram(r.tomogram_path(tomogram))) for r in runs]
    total = sum(len(slice_indices(resampled_shape(t.shape, t.voxel_size, target or t.voxel_size)[0], config.z_stride))
                for _, t in tomos)
    bar = tqdm(total=total, desc="detect", unit="slice", disable=not progress)
    fix_mmap_threshold()  # freed slices and batches go back to the system, not into the heaps (peak RSS per run)
    try:
        for run, tomo in tomos:
            bar.set_postfix_str(run.name)
            vol, voxel_size, window, sigma, turn = _read_prepared(tomo, target, prep, config)
            imgsz = config.imgsz or native_imgsz(vol.shape[1:])
            if detector is None or detector.imgsz != imgsz:
                detector = (detectors or {}).get(imgsz) or loaded_detector(weights, backend, config, imgsz,
                                                                           export_dir)
                if detectors is not None:
                    detectors[imgsz] = detector
            dets = detect_prepared(detector, vol, window, run.name, prep, config.z_stride, bar, turn)
            detector.release_memory()  # the model's working memory, while the consumer's 3D stages run
            trim_heap()  # and the freed slices and batches the C heap still holds
            item = DetectedRun(run, voxel_size, dets, vol, window, sigma)
            del vol, dets  # the consumer may drop the volume (see DetectedRun.normalised)
            if stage:
                bar.set_postfix_str(f"{run.name}: {stage}")
            yield item
            del item
    finally:
        bar.close()


def detect_keeping_volumes(weights: str | Path, runs: Iterable, tomogram: str = "denoised", backend: str = "torch",
                           config: InferenceConfig | None = None, progress: bool = True, budget: int = 0,
                           preprocess: PreprocessConfig | None = None, voxel_size: float | None = None
                           ) -> tuple[pd.DataFrame, dict[str, float], dict[str, tuple[float, np.ndarray]]]:
    """:func:`detect_runs`, plus each run's normalised volume (``{run: (voxel_size, volume)}``,
    :meth:`DetectedRun.normalised`) kept while they fit in ``budget`` bytes, so that later 3D stages
    (``tune``'s refinement and rescoring) need not read, resample, flatten and low-pass it again."""
    frames, voxel_sizes, volumes, used = [], {}, {}, 0
    for done in iter_detect_runs(weights, runs, tomogram, backend, config, preprocess, voxel_size, progress):
        frames.append(done.detections)
        voxel_sizes[done.run.name] = done.voxel_size
        if used + done.volume.nbytes <= budget:
            vol = done.normalised(release=True)
            volumes[done.run.name] = (done.voxel_size, vol)
            used += vol.nbytes
        del done  # its volume, before the next tomogram is read
    dets = pd.concat(frames, ignore_index=True) if frames else empty_detections()
    return dets, voxel_sizes, volumes


def detect_runs(weights: str | Path, runs: Iterable, tomogram: str = "denoised", backend: str = "torch",
                config: InferenceConfig | None = None, progress: bool = True,
                preprocess: PreprocessConfig | None = None, voxel_size: float | None = None
                ) -> tuple[pd.DataFrame, dict[str, float]]:
    """Detections of every run (``czii_kit.layout.Run`` objects) and each run's voxel size (Å).

    Tomograms are read one at a time (:func:`iter_detect_runs`).
    """
    dets, voxel_sizes, _ = detect_keeping_volumes(weights, runs, tomogram, backend, config, progress, 0, preprocess,
                                                  voxel_size)
    return dets, voxel_sizes
