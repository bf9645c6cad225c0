"""Figures: circles land where the picks are (unequal-sided volume), TP/FP/FN labels follow the radius rule."""

import numpy as np
import pandas as pd
import pytest

from czii_kit import plots
from czii_kit.catalog import get_particle

VS = 10.0


def _picks(rows):
    return pd.DataFrame(rows, columns=["experiment", "particle_type", "x", "y", "z"])


def test_circles_follow_axes_and_cross_sections():
    # ribosome at x=500, y=300, z=200 Å -> voxel (z=20, y=30, x=50)
    picks = _picks([("r", "ribosome", 500.0, 300.0, 200.0)])
    r = get_particle("ribosome").radius / VS
    circles = list(plots._circles_on_slice(picks, VS, axis=0, index=20))
    assert circles == [(50.0, 30.0, pytest.approx(r), "ribosome")]
    off = list(plots._circles_on_slice(picks, VS, axis=0, index=20 + 9))
    assert off[0][2] == pytest.approx(np.sqrt(r * r - 81))
    assert list(plots._circles_on_slice(picks, VS, axis=0, index=20 + 16)) == []
    # x-z view at y=30: u is x, v is z
    xz = list(plots._circles_on_slice(picks, VS, axis=1, index=30))
    assert xz[0][:2] == (50.0, 20.0)


def test_match_labels_radius_rule():
    sol = _picks([("a", "apo-ferritin", 1000.0, 1000.0, 500.0), ("a", "ribosome", 3000.0, 2000.0, 800.0)])
    sub = _picks([
        ("a", "apo-ferritin", 1029.0, 1000.0, 500.0),  # 29 Å < 30 Å: TP
        ("a", "ribosome", 3000.0, 2000.0, 880.0),  # 80 Å > 75 Å: FP, and the ribosome is FN
        ("b", "thyroglobulin", 0.0, 0.0, 0.0),  # run without references: FP
    ])
    lab = plots.match_labels(sol, sub)
    status = {(r.experiment, r.particle_type, r.status) for r in lab.itertuples()}
    assert status == {("a", "apo-ferritin", "TP"), ("a", "ribosome", "FP"), ("a", "ribosome", "FN"),
                      ("b", "thyroglobulin", "FP")}


def test_figures_render(tmp_path):
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(16, 32, 48)).astype(np.float32)
    picks = _picks([("a", "apo-ferritin", 200.0, 150.0, 80.0), ("a", "ribosome", 300.0, 160.0, 70.0)])
    fig = plots.orthogonal_views(vol, picks=picks, voxel_size=VS)
    out = plots.save_figure(fig, tmp_path / "o.png")
    assert out.stat().st_size > 1000
    fig = plots.particle_gallery(vol, picks, voxel_size=VS, per_type=2)
    assert len([a for a in fig.axes if a.images]) == 2
    plots.save_figure(fig, tmp_path / "g.png")
    plt = plots._plt()
    fig, ax = plt.subplots()
    plots.intensity_histogram(ax, vol, label="noise")
    plots.save_figure(fig, tmp_path / "h.png")
    assert (tmp_path / "h.png").exists()
