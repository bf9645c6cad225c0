"""Build (once) and cache virtual environments with pinned requirements for the test legs.

The main test environment has whatever ``zarr`` pip resolved; some I/O tests must also run under
another zarr major version and next to the real ``copick`` package (which pins ``zarr<3``). This
module builds such an environment with the stdlib ``venv`` and pip, caches it under
``~/.cache/czii_kit/test-envs/<name>-<hash>`` (the hash covers the requirement list and the Python
version, so a changed list builds a new one), and runs pytest inside it with ``PYTHONPATH`` set to
the repository root (czii_kit is not installed there; only what the I/O tests import is).

A build that fails (no package registry, no wheel for this platform, ...) raises
:class:`EnvUnavailable` with the reason; the failure is remembered for an hour so a test session
without a registry does not retry it on every test.

Environment variables
---------------------
CZII_KIT_TEST_ENVS
    Cache folder (default ``~/.cache/czii_kit/test-envs``).
CZII_KIT_NO_TEST_ENVS
    When set to ``1``, never build: every leg is skipped.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
FAILURE_TTL_S = 3600
BUILD_TIMEOUT_S = 1500
BASE_REQUIREMENTS = ["numpy>=1.24", "scipy>=1.10", "pandas>=2.0", "pytest>=7.4"]
COPICK_ENV = "zarr2-copick"
COPICK_REQUIREMENTS = [*BASE_REQUIREMENTS, "zarr>=2.18,<2.19", "numcodecs>=0.12,<0.16", "copick>=1.0,<2"]
"""The venv with the real copick (which pins zarr<3): test_zarr_versions runs I/O tests in it, and tests
of the main environment run copick scripts in it (:func:`run_copick`)."""


class EnvUnavailable(RuntimeError):
    """The environment could not be built; the message says why."""


def cache_root() -> Path:
    """Folder holding all cached test environments."""
    env = os.environ.get("CZII_KIT_TEST_ENVS")
    return Path(env) if env else Path.home() / ".cache" / "czii_kit" / "test-envs"


def env_key(requirements: list[str]) -> str:
    """Short hash of the requirement list and the interpreter version."""
    text = json.dumps({"python": sys.version_info[:2], "requirements": sorted(requirements)})
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def env_dir(name: str, requirements: list[str]) -> Path:
    """Where the environment ``name`` with these requirements lives."""
    return cache_root() / f"{name}-{env_key(requirements)}"


def _python(path: Path) -> Path:
    return path / "bin" / "python"


def ensure_env(name: str, requirements: list[str], timeout: float = BUILD_TIMEOUT_S) -> Path:
    """Return the Python executable of a venv holding ``requirements``, building it if needed.

    Parameters
    ----------
    name : str
        Readable prefix of the cache folder (``"zarr2-copick"``).
    requirements : list of str
        pip requirement specifiers.
    timeout : float
        Seconds allowed for the whole build.

    Raises
    ------
    EnvUnavailable
        When building is disabled, failed recently, or fails now.
    """
    if os.environ.get("CZII_KIT_NO_TEST_ENVS") == "1":
        raise EnvUnavailable("building test environments is disabled (CZII_KIT_NO_TEST_ENVS=1)")
    path = env_dir(name, requirements)
    done = path / ".czii-kit-complete"
    failed = path.with_name(path.name + ".failed")
    if done.is_file():
        return _python(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_name(path.name + ".lock"), "w")  # noqa: SIM115
    except OSError as exc:
        raise EnvUnavailable(f"cannot use the cache folder {path.parent}: {exc}") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another pytest process may be building the same env
        if done.is_file():
            return _python(path)
        if failed.is_file() and time.time() - failed.stat().st_mtime < FAILURE_TTL_S:
            raise EnvUnavailable(f"{name}: build failed recently ({failed}): {failed.read_text()[-500:]}")
        try:
            _build(path, requirements, timeout)
        except EnvUnavailable as exc:
            failed.write_text(str(exc))
            shutil.rmtree(path, ignore_errors=True)
            raise
        failed.unlink(missing_ok=True)
        done.write_text(json.dumps({"requirements": requirements, "built": time.time()}))
    return _python(path)


def _build(path: Path, requirements: list[str], timeout: float) -> None:
    shutil.rmtree(path, ignore_errors=True)
    deadline = time.monotonic() + timeout
    steps = [
        [sys.executable, "-m", "venv", str(path)],
        [str(_python(path)), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--timeout", "30", "--retries", "2", *requirements],
    ]
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.pop("PIP_REQUIRE_VIRTUALENV", None)
    for cmd in steps:
        left = deadline - time.monotonic()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(left, 1), env=env,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise EnvUnavailable(f"building {path.name} took longer than {timeout:.0f} s") from None
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
            raise EnvUnavailable(f"cannot build {path.name} ({' '.join(cmd[2:5])} ...): " + " | ".join(tail))


def copick_python() -> Path:
    """Python of the cached copick venv, built now if absent (so no test depends on another having built it).

    Raises
    ------
    EnvUnavailable
        When it cannot be built (no package registry, building disabled, ...).
    """
    return ensure_env(COPICK_ENV, COPICK_REQUIREMENTS)


def run_copick(code: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``code`` (a Python script; ``sys.argv[1:]`` = ``args``) in the copick venv, without PYTHONPATH.

    Raises
    ------
    EnvUnavailable
        As :func:`copick_python`.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(copick_python()), "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout, env=env, stdin=subprocess.DEVNULL)


def run_pytest(python: Path, test_args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m pytest test_args`` from the repository root with ``PYTHONPATH`` = repo root."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT)
    env.pop("PYTEST_ADDOPTS", None)
    env.pop("PYTEST_CURRENT_TEST", None)
    cmd = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", *test_args]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def python_modules(python: Path, modules: list[str]) -> dict[str, str]:
    """``{module: version}`` as seen by ``python`` (handy in skip and failure messages)."""
    code = (
        "import importlib, json, sys\n"
        "out = {}\n"
        "for m in sys.argv[1:]:\n"
        "    try:\n"
        "        out[m] = getattr(importlib.import_module(m), '__version__', '?')\n"
        "    except Exception as exc:\n"
        "        out[m] = 'missing: ' + type(exc).__name__\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run([str(python), "-c", code, *modules], capture_output=True, text=True, timeout=120)
    return json.loads(proc.stdout) if proc.returncode == 0 else {}
