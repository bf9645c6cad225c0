"""Run the I/O tests under the other zarr major version, and next to the real copick package.

The main environment has whatever zarr pip resolved (zarr 3 on a fresh machine). Each leg below
builds (once, cached: see ``tests/envs.py``) a venv with pinned requirements and runs a subset of
the tests inside it with ``PYTHONPATH`` = repository root:

* ``zarr2-copick``: zarr 2.18 + copick; runs the layout/IO tests and the copick interop tests
  (which must not skip there).
* ``zarr3``: zarr 3; only needed when the main environment itself runs zarr 2.

A leg that cannot be built (no package registry, ...) skips with the reason.
"""

from __future__ import annotations

import re

import envs
import pytest
import zarr

LEGS = {
    envs.COPICK_ENV: {
        "requirements": envs.COPICK_REQUIREMENTS,
        "zarr": "2",
        "tests": ["tests/test_layout_io.py", "tests/test_copick_interop.py", "tests/test_catalog_coords.py"],
        "env": {"CZII_KIT_REQUIRE_COPICK": "1"},
    },
    "zarr3": {
        "requirements": [*envs.BASE_REQUIREMENTS, "zarr>=3,<4", "numcodecs>=0.14"],
        "zarr": "3",
        "tests": ["tests/test_layout_io.py", "tests/test_catalog_coords.py"],
        "env": {},
    },
}
MAIN_ZARR = zarr.__version__.split(".")[0]


@pytest.mark.parametrize("leg", sorted(LEGS))
def test_io_tests_pass_in_leg(leg, monkeypatch):
    spec = LEGS[leg]
    if spec["zarr"] == MAIN_ZARR and not spec["env"]:
        pytest.skip(f"the main environment already runs zarr {zarr.__version__}: the I/O tests ran there")
    try:
        python = envs.ensure_env(leg, spec["requirements"])
    except envs.EnvUnavailable as exc:
        pytest.skip(f"cannot build the {leg} test environment: {exc}")
    monkeypatch.setenv("CZII_KIT_EXPECT_ZARR", spec["zarr"])
    for k, v in spec["env"].items():
        monkeypatch.setenv(k, v)
    proc = envs.run_pytest(python, spec["tests"])
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{leg} leg failed:\n{output[-6000:]}"
    summary = output.strip().splitlines()[-1]
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    assert passed >= 20, summary
    if "CZII_KIT_REQUIRE_COPICK" in spec["env"]:
        assert "copick is not installed" not in output
        for name in ("test_copick_reads_what_czii_kit_writes", "test_czii_kit_reads_what_copick_writes"):
            assert f"PASSED tests/test_copick_interop.py::{name}" in output, output[-3000:]
    assert "PASSED tests/test_layout_io.py::test_zarr_version_is_the_expected_one" in output


def test_env_key_depends_on_requirements():
    a = envs.env_key(["zarr<3", "numpy"])
    assert a == envs.env_key(["numpy", "zarr<3"])  # order does not matter
    assert a != envs.env_key(["zarr>=3", "numpy"])
    assert envs.env_dir("x", ["numpy"]).name == f"x-{envs.env_key(['numpy'])}"


def test_disabled_builds_raise_env_unavailable(monkeypatch, tmp_path):
    monkeypatch.setenv("CZII_KIT_TEST_ENVS", str(tmp_path))
    monkeypatch.setenv("CZII_KIT_NO_TEST_ENVS", "1")
    with pytest.raises(envs.EnvUnavailable, match="disabled"):
        envs.ensure_env("never", ["numpy"])
    assert not any(tmp_path.iterdir())


def test_failed_build_is_remembered(monkeypatch, tmp_path):
    """A leg whose build fails fails once, then skips fast with the same reason; a success clears it."""
    monkeypatch.setenv("CZII_KIT_TEST_ENVS", str(tmp_path))
    calls = []

    def failing_build(path, requirements, timeout):
        calls.append(path)
        path.mkdir()
        raise envs.EnvUnavailable(f"cannot build {path.name}: no registry")

    monkeypatch.setattr(envs, "_build", failing_build)
    reqs = ["czii-kit-no-such-package==0.0.1"]
    with pytest.raises(envs.EnvUnavailable, match="no registry"):
        envs.ensure_env("broken", reqs)
    assert not envs.env_dir("broken", reqs).exists()  # the half-built venv is removed
    with pytest.raises(envs.EnvUnavailable, match="failed recently.*no registry"):
        envs.ensure_env("broken", reqs)
    assert len(calls) == 1
    monkeypatch.setattr(envs, "_build", lambda path, requirements, timeout: path.mkdir())
    monkeypatch.setattr(envs, "FAILURE_TTL_S", 0)
    assert envs.ensure_env("broken", reqs) == envs.env_dir("broken", reqs) / "bin" / "python"
    assert not envs.env_dir("broken", reqs).with_name(envs.env_dir("broken", reqs).name + ".failed").exists()
    assert envs.ensure_env("broken", reqs)  # cached: no build
