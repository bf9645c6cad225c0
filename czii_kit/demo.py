"""The demo: simulate a small dataset, pick particles with the shipped model, score, and draw a figure.

``czii-kit demo`` runs :func:`run_demo`. Everything happens offline, inside one output folder:
the synthetic dataset (cached there and reused), ``submission.csv``, ``score.json`` and
``predictions.png``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from czii_kit import plots
from czii_kit.atomic import check_out_path
from czii_kit.bundle import ModelBundle
from czii_kit.coords import angstrom_to_voxel
from czii_kit.errors import CziiKitError
from czii_kit.infer import missing_backend_modules
from czii_kit.layout import find_runs
from czii_kit.maps import PROCEDURAL, SHIPPED, describe_maps, maps_option
from czii_kit.metric import format_table, score
from czii_kit.offline import configure_offline
from czii_kit.predict import predict, summary
from czii_kit.submission import write_submission
from czii_kit.synthetic import generate_dataset
from czii_kit.tomogram import open_tomogram

MARKER = ".czii_kit_demo"


def _prepare(out: Path, force: bool) -> None:
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists() and not force:
        raise CziiKitError(f"{out}: exists and is not a czii-kit demo folder; choose another --out (or --force)")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by czii-kit demo; its files are replaced on each run\n")


def run_demo(out: str | Path = "czii_kit_demo", weights: str | Path | None = None, backend: str = "openvino",
             n_runs: int = 2, size: str = "small", seed: int = 2024, maps: str | Path | None = SHIPPED,
             force: bool = False, progress: bool = True, echo=print) -> dict:
    """Simulate ``n_runs`` test runs, predict, write ``submission.csv``, score it and save a figure.

    Parameters
    ----------
    out : path-like
        Output folder (created; a folder holding anything but a previous demo is refused unless ``force``).
    weights : path-like, optional
        Model weights; default the model shipped with czii_kit.
    backend : {"openvino", "onnx", "torch"}
    n_runs, size, seed :
        Synthetic test runs to simulate (see :func:`czii_kit.synthetic.generate_dataset`).
    maps : "shipped", "procedural" or path-like
        Density maps for the simulator: those shipped with czii_kit (default), the built-in
        procedural models (``"procedural"`` or ``None``), or a folder of MRC maps.

    Returns
    -------
    dict
        ``final`` score, per-type ``particles`` figures, ``paths`` of the outputs and ``seconds`` per step.
    """
    check_out_path(out, force, folder=True)  # a file there is refused before any work

    configure_offline()
    out = Path(out)
    _prepare(out, force)
    model = ModelBundle.load(weights)
    if missing_backend_modules(backend):
        echo(f"note: {backend} is not installed ({', '.join(missing_backend_modules(backend))}); using the torch "
             "backend (pip install 'czii_kit[export]' for the faster OpenVINO backend)")
        backend = "torch"
    maps = maps_option(maps)
    seconds = {}

    t = time.perf_counter()
    data = out / f"data_{size}_{n_runs}_{seed}_{maps if maps in (SHIPPED, PROCEDURAL) else 'maps'}"
    if (data / "solution.csv").is_file():
        echo(f"[1/4] using the cached synthetic dataset {data}")
    else:
        echo(f"[1/4] simulating {n_runs} {size} tomogram(s) ({describe_maps(maps)})")
        generate_dataset(data, n_train=0, n_test=n_runs, size=size, seed=seed, maps_dir=maps,
                         overwrite=True, progress=progress)
    seconds["simulate"] = time.perf_counter() - t

    t = time.perf_counter()
    echo(f"[2/4] picking particles with {model.weights.name} ({backend})")
    picks = predict(data, split="test", model=model, backend=backend, progress=progress)
    sub_path = write_submission(picks, out / "submission.csv", overwrite=True)
    seconds["predict"] = time.perf_counter() - t
    echo(summary(picks).to_string() if len(picks) else "no particles found")

    import pandas as pd

    echo("[3/4] scoring against the simulator's ground truth")
    solution = pd.read_csv(data / "solution.csv")
    result = score(solution, picks)
    echo(format_table(result))
    score_path = out / "score.json"
    score_path.write_text(json.dumps(result.to_dict(), indent=1))

    t = time.perf_counter()
    echo("[4/4] drawing predictions against the ground truth")
    fig_path = _figure(data, solution, picks, out / "predictions.png")
    seconds["figure"] = time.perf_counter() - t
    echo(f"\nfiles:\n  dataset     {data}\n  submission  {sub_path}\n  score       {score_path}\n  figure      {fig_path}")
    echo("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    return {**result.to_dict(), "paths": {"dataset": str(data), "submission": str(sub_path),
                                          "score": str(score_path), "figure": str(fig_path)}, "seconds": seconds}


def _figure(data: Path, solution, picks, path: Path) -> Path:
    import numpy as np


    run = find_runs(data, "test")[0]
    tomo = open_tomogram(run.tomogram_path("denoised"), 0)
    sol = solution[solution["experiment"] == run.name]
    sub = picks[picks["experiment"] == run.name]
    # the slice that cuts the most particles
    zs = angstrom_to_voxel(sol[["x", "y", "z"]].to_numpy(float), tomo.voxel_size)[:, 0] if len(sol) else [0]
    z = int(np.clip(np.median(zs), 0, tomo.shape[0] - 1))
    volume = tomo.read()
    labels = plots.match_labels(sol, sub)
    plt = plots._plt()
    fig, axes = plt.subplots(1, 2, figsize=(13, 6.8))
    plots.show_slice(axes[0], volume, z, sol, tomo.voxel_size, title=f"{run.name} z={z}: ground truth by type")
    plots.show_matches(axes[1], volume, z, labels, tomo.voxel_size,
                       title=f"{run.name} z={z}: predictions TP / FP, missed FN")
    return plots.save_figure(fig, path)
