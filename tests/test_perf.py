"""Issue 28 (performance): what the faster paths keep the same, and what they reuse."""

import os
import platform
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from czii_kit import infer
from czii_kit.bundle import default_weights
from czii_kit.preprocess import Window
from czii_kit.rescore import Rescorer, build_network
from czii_kit.rescore_train import save_rescorer


def test_prefetch_keeps_order_overlaps_and_raises_the_producers_error():
    made = []

    def items():
        for i in range(6):
            made.append(i)
            yield i

    assert list(infer.prefetch(items(), 2)) == list(range(6))
    made.clear()
    gen = infer.prefetch(items(), 2)
    assert next(gen) == 0
    deadline = time.time() + 5
    while len(made) < 3 and time.time() < deadline:  # the producer runs ahead, at most 2 queued + 1 in hand
        time.sleep(0.01)
    assert 3 <= len(made) <= 4
    gen.close()  # stops the producer
    assert not [t for t in threading.enumerate() if t.name == "czii_kit-prefetch"]
    assert len(made) <= 4

    def broken():
        yield 1
        raise ValueError("bad slice")

    with pytest.raises(ValueError, match="bad slice"):
        list(infer.prefetch(broken()))


MMAP_PROBE = """
import ctypes, sys
import numpy as np
from czii_kit import infer

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL(None)
libc.mallinfo.restype = Info
applied = infer.fix_mmap_threshold() if sys.argv[1] == "fix" else False
big = np.ones(24 << 20, np.uint8)  # a mapped block; freed, glibc's own threshold rises to its size
del big
before = libc.mallinfo().hblks
slice_ = np.ones((630, 630), np.float32)  # one slice of a full-size tomogram
print(int(applied), libc.mallinfo().hblks - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_slices_stay_mapped_after_a_large_block_is_freed():
    def probe(mode: str, **env) -> tuple[int, int]:
        clean = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_" and k != "GLIBC_TUNABLES"}
        out = subprocess.run([sys.executable, "-c", MMAP_PROBE, mode], env={**clean, **env}, capture_output=True,
                             text=True, check=True).stdout.split()
        return int(out[0]), int(out[1])

    assert probe("plain") == (0, 0)  # glibc's default: the slice comes from the heap (and stays resident)
    assert probe("fix") == (1, 1)  # its own mapping, unmapped when freed
    assert probe("fix", MALLOC_MMAP_THRESHOLD_="33554432") == (0, 0)  # the user's setting is left alone


def test_window_in_place_gives_the_same_values():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 30, 40)).astype(np.float32)
    for w in (Window(-1.0, 1.5), Window(-1.0, 1.5, invert=True)):
        ref = w.apply(x, "float32")
        y = x.copy()
        out = w.apply(y, "float32", in_place=True)
        assert out is y and np.array_equal(out, ref)
    z = x.astype(np.float64)  # not float32: a new array, the input untouched
    out = Window(-1.0, 1.5).apply(z, "float32", in_place=True)
    assert out.dtype == np.float32 and out is not z and np.array_equal(z, x.astype(np.float64))


def test_loaded_detector_is_reused_until_its_arguments_or_file_change(tmp_path):
    w = tmp_path / "m.pt"
    w.write_bytes(default_weights().read_bytes())
    cfg = infer.InferenceConfig()
    a = infer.loaded_detector(w, "torch", cfg, 96)
    assert infer.loaded_detector(w, "torch", infer.InferenceConfig(), 96) is a
    b = infer.loaded_detector(w, "torch", infer.InferenceConfig(conf=0.1), 96)
    assert b is not a and b.config.conf == 0.1
    st = w.stat()
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file changed: loaded again
    assert infer.loaded_detector(w, "torch", infer.InferenceConfig(conf=0.1), 96) is not b


def test_openvino_streams_give_the_latency_models_outputs(tmp_path, monkeypatch):
    pytest.importorskip("openvino")
    monkeypatch.setenv(infer.EXPORTS_ENV, str(tmp_path / "exports"))
    cfg = infer.InferenceConfig(batch=3, conf=0.01)
    streamed = infer.Detector(default_weights(), "openvino", cfg, 96)  # streams: the default on the CPU
    plain = infer.Detector(default_weights(), "openvino", cfg, 96, streams=False)
    assert streamed.streams is not None and streamed.model is None and plain.streams is None
    assert streamed.names == plain.names and streamed.end2end == plain.end2end
    images = np.random.default_rng(2).integers(0, 256, (5, 90, 70, 3), dtype=np.uint8)  # a short last batch
    for i in (0, 3):
        x, _ = plain.to_tensor(images[i : i + 3])
        np.testing.assert_array_equal(streamed.forward(x).numpy(), plain.forward(x).numpy())
    for a, b in zip(streamed.detect(images), plain.detect(images), strict=True):
        np.testing.assert_array_equal(a, b)
    x, _ = plain.to_tensor(images[:3])
    monkeypatch.setattr(infer._StreamedOutputs, "WAIT_S", 0.0)  # result() asks the queue itself at once
    np.testing.assert_array_equal(streamed.forward(x).numpy(), plain.forward(x).numpy())


@pytest.mark.parametrize("tta", [False, True])
def test_streamed_batches_queued_back_to_back_give_the_plain_detections(tmp_path, monkeypatch, tta):
    """detect_prepared queues each batch's images on the OpenVINO streams before taking the previous batch's
    outputs: the same detections as the latency-mode model run image by image."""
    pytest.importorskip("openvino")
    from czii_kit.preprocess import PreprocessConfig, robust_window

    monkeypatch.setenv(infer.EXPORTS_ENV, str(tmp_path / "exports"))
    cfg = infer.InferenceConfig(batch=3, conf=0.01, tta=tta)
    streamed = infer.Detector(default_weights(), "openvino", cfg, 96)
    plain = infer.Detector(default_weights(), "openvino", cfg, 96, streams=False)
    vol = np.random.default_rng(5).normal(size=(11, 70, 90)).astype(np.float32)
    vol[:, 20:40, 30:50] -= 2.0  # something dark to detect

    class Plain:  # only .detect: detect_prepared's sequential path
        config, imgsz = plain.config, plain.imgsz
        detect = staticmethod(plain.detect)

    w, prep = robust_window(vol), PreprocessConfig()
    got = infer.detect_prepared(streamed, vol, w, "r", prep)
    assert len(got) and got.equals(infer.detect_prepared(Plain(), vol, w, "r", prep))


@pytest.mark.parametrize("tta", [False, True])
def test_pipelined_detection_equals_image_by_image_detection(tta):
    from czii_kit.preprocess import PreprocessConfig, robust_window

    det = infer.loaded_detector(default_weights(), "torch", infer.InferenceConfig(batch=3, conf=0.01, tta=tta), 96)
    vol = np.random.default_rng(5).normal(size=(11, 70, 90)).astype(np.float32)
    vol[:, 20:40, 30:50] -= 2.0  # something dark to detect

    class Plain:  # only .detect: detect_prepared's sequential path, no prefetched tensors, no NMS thread
        config, imgsz = det.config, det.imgsz
        detect = staticmethod(det.detect)

    w, prep = robust_window(vol), PreprocessConfig()
    got = infer.detect_prepared(det, vol, w, "r", prep)
    ref = infer.detect_prepared(Plain(), vol, w, "r", prep)
    assert len(got) and got.equals(ref)
    if tta:  # the images' own boxes come first, then the flipped images'
        one = infer.detect_prepared(infer.loaded_detector(default_weights(), "torch", infer.InferenceConfig(
            batch=3, conf=0.01), 96), vol, w, "r", prep)
        assert len(got) > len(one)


def test_openvino_rescorer_matches_torch_and_caches_its_conversion(tmp_path, monkeypatch):
    pytest.importorskip("openvino")
    import torch

    monkeypatch.setenv(infer.EXPORTS_ENV, str(tmp_path / "exports"))
    torch.manual_seed(0)
    path = save_rescorer(build_network(), tmp_path / "r.pt")
    patches = np.random.default_rng(1).random((70, 32, 32, 32), dtype=np.float32)
    ref = Rescorer(path, engine="torch")
    assert ref.engine == "torch"
    ov = Rescorer(path, engine="openvino")
    assert ov.engine == "openvino"
    (ir,) = (tmp_path / "exports").glob("*/rescorer_32_openvino/rescorer.xml")
    np.testing.assert_allclose(ov.predict_proba(patches, batch=64), ref.predict_proba(patches, batch=64), atol=1e-5)
    np.testing.assert_array_equal(ov.predict_proba(patches[:7]), ov.predict_proba(patches)[:7])  # batch-independent
    stamp = ir.stat().st_mtime_ns
    assert Rescorer(path, engine="openvino").engine == "openvino" and ir.stat().st_mtime_ns == stamp  # reused
    with pytest.raises(ValueError, match="engine"):
        Rescorer(path, engine="tpu")
    first = ov.logits(patches[:40]).numpy()
    ov.release_memory()  # its working memory given back; the next call allocates it again
    np.testing.assert_array_equal(ov.logits(np.ascontiguousarray(patches[:40])).numpy(), first)


def test_wedge_ratio_of_the_half_spectrum_is_the_full_spectrum_s():
    """:func:`wedge_ratio` reads the half spectrum of ``rfftn`` (weighted for the mirrored half): the same
    ratio as the full spectrum, odd and even sizes."""
    from scipy.ndimage import gaussian_filter

    from czii_kit.preprocess import central_block, wedge_ratio

    def full(volume, half_angle=15.0):
        b = central_block(volume).astype(np.float64)
        b -= b.mean()
        power = np.abs(np.fft.fftn(b)) ** 2
        kz, ky, kx = (np.abs(k) for k in np.meshgrid(*[np.fft.fftfreq(n) for n in b.shape], indexing="ij"))
        k = np.sqrt(kz**2 + ky**2 + kx**2)
        band = (k > 0.04) & (k < 0.2)
        t = np.tan(np.radians(half_angle))
        return power[band & (kx < t * kz) & (ky > kz)].mean() / power[band & (ky < t * kz) & (kx > kz)].mean()

    rng = np.random.default_rng(0)
    for shape, sigma in (((40, 90, 96), (3, 1, 0.5)), ((41, 95, 81), (3, 0.5, 1)), ((30, 64, 64), 0)):
        v = gaussian_filter(rng.random(shape), sigma)
        assert wedge_ratio(v) == pytest.approx(full(v), rel=1e-12)


def test_bench_pipeline_worker_reports_the_limit_ratios_stages_and_startup(tmp_path):
    """The bench's whole-predict measurement on a small dataset (runs ``bench`` and ``warmup``): each figure
    the best of its rounds, the ratios to the limit, the profiled stages, and a startup breakdown."""
    import argparse

    from czii_kit import bench
    from czii_kit.layout import tomogram_location

    static = tmp_path / "static"
    bench.synthetic_tomogram(tomogram_location(static, bench.WARMUP_RUN), (32, 64, 64), n_per_type=1, seed=1)
    bench.synthetic_tomogram(tomogram_location(static, bench.BENCH_RUN), (40, 64, 80), n_per_type=1)
    args = argparse.Namespace(weights=None, backend="openvino", root=str(tmp_path), profile=True, imgsz=None, rounds=2)
    out = bench._pipeline_worker(args)
    assert out["slices"] == 40 and out["imgsz"] == 96 and out["stages_run"] == "refine, rescore"
    for name in ("e2e", "detect", "forward_limit"):
        assert len(out["runs_s"][name]) == 2 and out[f"{name}_s"] == min(out["runs_s"][name]) > 0
    assert out["e2e_ratio"] == pytest.approx(out["e2e_s"] / out["forward_limit_s"])
    assert out["detect_ratio"] == pytest.approx(out["detect_s"] / out["forward_limit_s"])
    assert set(out["stages_s"]) == set(bench.STAGES) and out["stages_s"]["forward"] > 0
    assert out["stages_s"]["read"] > 0 and out["stages_s"]["rescore"] >= out["stages_s"]["templates"] > 0
    assert out["peak_rss_mb"] > 100
    start = bench._startup_worker(args)
    assert set(start) == {"plan_s", "detector_s", "templates_s"} and min(start.values()) > 0
