"""Many runs on a Dask cluster, checkpointed run by run so that a killed job resumes where it stopped.

:func:`run_checkpointed` calls a per-run function (``work(run) -> DataFrame``) for every run that is
not finished yet, either here, one run after another, or as one Dask task per run on a
``distributed.Client`` (:func:`cluster`: a local cluster of worker processes, or an existing one by
address). Each finished run's table is written atomically into a parts folder (:class:`Checkpoint`:
one ``.npz`` per run, exact floats, and a manifest naming the model and settings it was made with),
so a job that dies loses only the runs in progress, and ``--resume`` reuses the rest.

Dask retries a task whose worker died (the worker is restarted); a run that fails with a
:class:`~czii_kit.errors.CziiKitError` (an unreadable tomogram) fails alone: its one-line message comes
back and the other runs finish. Workers keep what they load once per process (:func:`process_cached`:
the model bundle, the loaded network).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from czii_kit.atomic import atomic_write, atomic_write_text, read_json
from czii_kit.errors import CziiKitError, DataError, FileExistsNoForce

PARTS_SUFFIX = ".parts"
"""The parts folder of ``OUT`` is ``OUT.parts`` beside it."""
MANIFEST = "manifest.json"
PART_FORMAT = 1
"""Version of the parts folder's layout (a manifest of another version is a mismatch)."""
RETRIES = 2
"""Dask retries of a run whose task raised an unexpected error (a worker that dies is retried by the
scheduler itself, up to ``distributed.scheduler.allowed-failures`` times)."""
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
CORES_ENV = "CZII_KIT_CORES"
"""Set by :func:`cluster` on each local worker: the CPU cores it is pinned to (``"0,1"``)."""


# --------------------------------------------------------------------------- checkpoint


def parts_dir(out: str | Path) -> Path:
    """The parts folder of the output file ``out``: ``OUT.parts`` beside it."""
    out = Path(out)
    return out.with_name(out.name + PARTS_SUFFIX)


def frame_to_npz(frame: pd.DataFrame, path: str | Path) -> None:
    """Write ``frame`` column by column to ``path`` (``.npz``): exact values and dtypes (text as unicode)."""
    arrays, kinds = {}, []
    for i, (_, col) in enumerate(frame.items()):
        values = col.to_numpy()
        text = values.dtype == object
        arrays[f"c{i}"] = values.astype(str) if text else values
        kinds.append(str(col.dtype) if text else "")  # the pandas dtype of a text column ("object", "str")
    arrays["columns"] = np.array([str(c) for c in frame.columns], dtype=str)
    arrays["kinds"] = np.array(kinds, dtype=str)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def frame_from_npz(path: str | Path) -> pd.DataFrame:
    """A table written by :func:`frame_to_npz`; :class:`DataError` naming the file when it is not one."""
    try:
        with np.load(path, allow_pickle=False) as z:
            cols, kinds = list(z["columns"]), list(z["kinds"])
            data = {c: (pd.Series(z[f"c{i}"].astype(object), dtype=k) if k else z[f"c{i}"])
                    for i, (c, k) in enumerate(zip(cols, kinds, strict=True))}
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise DataError(path, f"not a readable part of a checkpointed job ({exc}); delete it to redo that run") \
            from None
    return pd.DataFrame(data, columns=cols)


@dataclass
class Checkpoint:
    """The parts folder of one job: ``manifest.json`` and ``RUN.npz`` per finished run.

    Attributes
    ----------
    folder : Path
    manifest : dict
        What the parts were made with (``format``, the model's and settings' checksums, ...).
    labels : dict
        Words for the manifest keys in a mismatch message (``{"weights_sha256": "weights"}``).
    """

    folder: Path
    manifest: dict
    labels: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def open(cls, folder: str | Path, manifest: Mapping, resume: bool = False, force: bool = False,
             labels: Mapping[str, str] | None = None, info: Mapping | None = None) -> Checkpoint:
        """Start a parts folder, or reopen one to resume it; before any work.

        ``manifest``: the compared items; ``info``: written beside them, never compared (paths, for
        people). An existing folder is reused when ``resume`` (its manifest must match), removed when
        ``force``, else refused.

        Raises
        ------
        FileExistsNoForce
            ``folder`` exists and neither ``resume`` nor ``force`` is given.
        DataError
            ``resume`` and the folder was made with another model or settings (named in the message),
            or ``folder`` is a file.
        """
        folder = Path(folder)
        manifest = {"format": PART_FORMAT, **manifest}
        labels = dict(labels or {})
        path = folder / MANIFEST
        if folder.exists() and not folder.is_dir():
            raise DataError(folder, "is a file; it must be the parts folder of a checkpointed job")
        if folder.is_dir() and {f.name for f in folder.iterdir()} <= {MANIFEST}:
            shutil.rmtree(folder)  # a job stopped before its first run finished: nothing to keep
        if folder.exists() and resume:
            old = read_json(path)
            differ = [k for k in manifest if old.get(k) != manifest[k]]
            if differ:
                what = "; ".join(f"{labels.get(k, k)}: {_short(old.get(k))} then, {_short(manifest[k])} now"
                                 for k in differ)
                raise DataError(path, f"the finished runs were made with other settings ({what}); "
                                      "run with the same ones, or use --force to start again")
        elif folder.exists() and not force:
            raise FileExistsNoForce(f"{folder}: finished runs of an earlier job are there (use --resume to reuse "
                                    "them, or --force to start again)")
        elif folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({**manifest, **(info or {})}, indent=1) + "\n", overwrite=True)
        return cls(folder, manifest, labels)

    def part(self, run: str) -> Path:
        """The file of ``run``'s table."""
        return self.folder / f"{run}.npz"

    def finished(self, runs: Sequence[str]) -> list[str]:
        """Those of ``runs`` whose table is there."""
        return [r for r in runs if self.part(r).is_file()]

    def save(self, run: str, frame: pd.DataFrame) -> Path:
        """Write ``run``'s table atomically (a reader sees the whole file or none)."""
        return atomic_write(self.part(run), lambda p: frame_to_npz(frame, p), overwrite=True)

    def load(self, run: str) -> pd.DataFrame:
        """``run``'s table as it was saved (the same values, bit for bit)."""
        return frame_from_npz(self.part(run))

    def remove(self) -> None:
        """Delete the parts folder (the job's output is written)."""
        shutil.rmtree(self.folder, ignore_errors=True)


def _short(value) -> str:
    text = "none" if value is None else str(value)
    return text[:12] + "..." if len(text) == 64 else text  # a SHA-256: its first characters


# --------------------------------------------------------------------------- workers


_CACHE: dict = {}
_CACHE_LOCK = threading.Lock()
_RUN_LOCK = threading.Lock()


def process_cached(key, make: Callable[[], object]):
    """``make()`` once per process and ``key`` (a worker's model bundle, loaded network, ...)."""
    with _CACHE_LOCK:
        if key not in _CACHE:
            _pin_threads()
            _CACHE[key] = make()
        return _CACHE[key]


def _pin_threads() -> None:
    """Pin this worker process to the cores :func:`cluster` gave it (``$CZII_KIT_CORES``), before the
    first model loads: torch uses that many threads, and OpenVINO's CPU plugin follows the affinity."""
    cores = os.environ.get(CORES_ENV)
    if not cores or _CACHE.get("_pinned"):
        return
    chosen = {int(c) for c in cores.split(",")}
    if hasattr(os, "sched_setaffinity"):
        tasks = Path("/proc/self/task")  # every thread of the process: OpenVINO reads the process's mask
        for tid in sorted(int(t.name) for t in tasks.iterdir()) if tasks.is_dir() else [0]:
            try:
                os.sched_setaffinity(tid, chosen)
            except OSError:  # a thread that ended meanwhile
                pass
    import torch

    torch.set_num_threads(len(chosen))
    _CACHE["_pinned"] = True


@dataclass
class Outcome:
    """What one run's task sends back: its table, or the one-line error that stopped it, and its warnings."""

    run: str
    frame: pd.DataFrame | None
    error: str | None
    warnings: list[tuple[type, str]]


def run_task(work: Callable, run) -> Outcome:
    """Run ``work(run)`` on a worker: one run at a time per process, its warnings and a
    :class:`CziiKitError` (the run's own fault, e.g. an unreadable tomogram) sent back, not raised.
    Other exceptions are raised, so Dask retries the task."""
    with _RUN_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)  # each run's own (the command line prints each once)
        try:
            frame, error = work(run), None
        except CziiKitError as exc:
            frame, error = None, str(exc)
    seen = list(dict.fromkeys((w.category, str(w.message)) for w in caught))
    return Outcome(run.name, frame, error, seen)


def _cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cuda_devices() -> int:
    """How many CUDA GPUs torch sees here (0 without torch's CUDA)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def worker_layout(workers: int | None, cores: int | None = None, gpus: int | None = None) -> list[dict]:
    """Environment of each local worker: its CPU cores (``workers`` x threads <= ``cores``) and its GPU.

    ``workers=None``: one per CUDA GPU, else one. With GPUs, worker ``i`` sees only GPU ``i mod gpus``
    (``CUDA_VISIBLE_DEVICES``). Threads per worker: ``max(1, cores // workers)`` (the cores in
    :data:`CORES_ENV`; the same count for the math libraries in ``OMP_NUM_THREADS`` ...).
    """
    if workers is not None and workers < 1:
        raise CziiKitError(f"--workers must be >= 1, got {workers}")
    cores = cores or _cores()
    gpus = cuda_devices() if gpus is None else gpus
    n = workers or max(1, gpus)
    threads = max(1, cores // n)
    order = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(cores))
    out = []
    for i in range(n):
        mine = [order[(i * threads + k) % len(order)] for k in range(threads)]
        env = {CORES_ENV: ",".join(map(str, mine)), **dict.fromkeys(THREAD_VARIABLES, str(threads))}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
        out.append(env)
    return out


@contextmanager
def cluster(workers: int | None = None, scheduler: str | None = None, memory_limit: int | None = None
            ) -> Iterator[object]:
    """A ``distributed.Client``: of a local cluster of ``workers`` processes (:func:`worker_layout`), or of
    the running scheduler at ``scheduler`` (``tcp://host:8786``); closed (and a local cluster stopped) at
    the end. The local cluster listens on 127.0.0.1 only and has no dashboard."""
    try:
        import logging

        import dask
        from distributed import Client, Nanny, Scheduler, SpecCluster
        from distributed.system import MEMORY_LIMIT
    except ImportError:
        raise CziiKitError("--workers / --scheduler need Dask: pip install 'czii_kit[scaleout]'") from None
    if scheduler:
        try:
            client = Client(scheduler, timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise CziiKitError(f"{scheduler}: no Dask scheduler answers there ({exc})") from None
        with client:
            yield client
        return
    layout = worker_layout(workers)
    limit = memory_limit or MEMORY_LIMIT // len(layout)
    spec = {f"czii-{i}": {"cls": Nanny, "options": {"nthreads": 1, "env": env, "memory_limit": limit}}
            for i, env in enumerate(layout)}
    sched = {"cls": Scheduler, "options": {"host": "127.0.0.1", "port": 0, "dashboard": False,
                                           "dashboard_address": None}}
    # set before each worker process starts (and restarts): its thread counts, and Dask's logs errors only
    spawn = {"DASK_LOGGING__DISTRIBUTED": "error", **{v: layout[0][v] for v in THREAD_VARIABLES}}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": spawn}):
        local = SpecCluster(scheduler=sched, workers=spec, silence_logs=logging.ERROR)
    with local, Client(local) as client:
        yield client


# --------------------------------------------------------------------------- the job


@dataclass
class JobResult:
    """What :func:`run_checkpointed` gives back: each finished run's table and each failed run's error."""

    frames: dict[str, pd.DataFrame]
    failed: dict[str, str]
    reused: list[str]


def run_checkpointed(runs: Sequence, work: Callable, checkpoint: Checkpoint | None = None, client=None,
                     progress: bool = True, retries: int = RETRIES) -> JobResult:
    """``work(run)`` for every run (objects with a ``.name``) not finished in ``checkpoint``.

    Parameters
    ----------
    runs : sequence
        The runs, in the order tables come back.
    work : callable
        ``work(run) -> DataFrame``; picklable for a ``client`` (a module-level function or a
        ``functools.partial`` of one).
    checkpoint : Checkpoint, optional
        Where finished runs are saved as they finish, and reused from.
    client : distributed.Client, optional
        Run one task per run on this cluster (``None``: here, one after another).
    progress : bool
        One bar over the runs (done / total, with an ETA).
    retries : int
        Dask retries of a task that raised an unexpected error.

    Returns
    -------
    JobResult
        ``frames`` of the finished runs (reused ones too) in the order of ``runs``; ``failed``: run ->
        one-line error of the runs that failed (the others are finished and saved).
    """
    from tqdm.auto import tqdm

    names = [r.name for r in runs]
    reused = checkpoint.finished(names) if checkpoint is not None else []
    skip = set(reused)
    todo = [r for r in runs if r.name not in skip]
    frames: dict[str, pd.DataFrame] = {}
    failed: dict[str, str] = {}
    bar = tqdm(total=len(runs), initial=len(reused), desc="runs", unit="run", disable=not progress)

    def done(outcome: Outcome) -> None:
        for category, text in outcome.warnings:
            warnings.warn(text, category, stacklevel=3)
        if outcome.error is not None:
            failed[outcome.run] = outcome.error
        else:
            if checkpoint is not None:
                checkpoint.save(outcome.run, outcome.frame)
            frames[outcome.run] = outcome.frame
        bar.update(1)

    try:
        if client is None:
            for run in todo:
                try:
                    frame = work(run)
                except CziiKitError as exc:
                    if checkpoint is None:
                        raise
                    done(Outcome(run.name, None, str(exc), []))
                else:
                    done(Outcome(run.name, frame, None, []))
        else:
            _submit_all(client, todo, work, retries, done)
    finally:
        bar.close()
    for name in reused:
        frames[name] = checkpoint.load(name)
    return JobResult({n: frames[n] for n in names if n in frames}, {n: failed[n] for n in names if n in failed},
                     reused)


def _submit_all(client, runs: Sequence, work: Callable, retries: int, done: Callable) -> None:
    """One task per run on ``client``; ``done(outcome)`` as each comes back, in any order."""
    from distributed import as_completed

    stamp = f"{time.time_ns():x}"
    futures = {client.submit(run_task, work, r, retries=retries, pure=False, key=f"czii-run-{r.name}-{stamp}"): r
               for r in runs}
    for fut in as_completed(futures):
        run = futures[fut]
        try:
            outcome = fut.result()
        except Exception as exc:  # noqa: BLE001 - a run that failed for good (KilledWorker, ...) fails alone
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            done(Outcome(run.name, None, f"{type(exc).__name__}: {first}", []))
        else:
            done(outcome)
        fut.release()


def failure_message(failed: Mapping[str, str], total: int, kept: Path | None) -> str:
    """One line naming the failed runs and why, and where the finished ones are kept."""
    shown = "; ".join(f"{run}: {why}" for run, why in list(failed.items())[:10])
    more = f"; and {len(failed) - 10} more" if len(failed) > 10 else ""
    where = f" (the finished runs are kept in {kept}: rerun with --resume)" if kept is not None else ""
    return f"{len(failed)} of {total} run(s) failed{where}: {shown}{more}"


# --------------------------------------------------------------------------- bench


FULL_VOXELS = 184 * 630 * 630
"""Voxels of a full-size Kaggle tomogram (184 x 630 x 630 at 10 Å)."""


def bench_workers(run_job: Callable[[int], tuple[float, float]], n_runs: int, run_voxels: int,
                  workers: Sequence[int] = (1, 2), target: int = 500, repeats: int = 1) -> dict:
    """Throughput of ``predict`` on ``n`` workers for each ``n`` of ``workers``.

    ``run_job(n)`` starts ``n`` workers, lets each load the model, then predicts ``n_runs`` runs of
    ``run_voxels`` voxels each, and returns ``(seconds of the runs, seconds of the start)``. The best
    of ``repeats`` rounds counts (the worker counts take turns, so a busy moment of a shared machine
    does not fall on one count only).

    Returns ``{"runs", "run_voxels", "cpu_count", "repeats", "workers": {"N": {"seconds", "start_s",
    "runs_per_hour"}}, "ratio", "hours_for_500"}``: ``ratio`` is the runs' time with the most workers
    over that with the fewest (> 1: slower); the projected hours for ``target`` full-size tomograms
    scale the best seconds per run by voxels (:data:`FULL_VOXELS` / ``run_voxels``), an estimate.
    """
    times: dict[int, float] = {}
    starts: dict[int, float] = {}
    for _ in range(repeats):
        for n in workers:
            runs_s, start_s = run_job(n)
            times[n] = min(times.get(n, np.inf), runs_s)
            starts[n] = min(starts.get(n, np.inf), start_s)
    best = min(times.values()) / n_runs * FULL_VOXELS / run_voxels
    return {"runs": n_runs, "run_voxels": int(run_voxels), "cpu_count": _cores(), "repeats": repeats,
            "workers": {str(n): {"seconds": round(s, 2), "start_s": round(starts[n], 2),
                                 "runs_per_hour": round(n_runs * 3600 / s, 1)} for n, s in times.items()},
            "ratio": round(times[max(times)] / times[min(times)], 3),
            f"hours_for_{target}": round(target * best / 3600, 2)}


__all__ = ["Checkpoint", "JobResult", "Outcome", "bench_workers", "cluster", "failure_message", "parts_dir",
           "process_cached", "run_checkpointed", "run_task", "worker_layout"]
