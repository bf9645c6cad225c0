"""Execute a notebook through papermill with parameters, as a user would, for the notebook tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_notebook(name: str, workdir: Path, params: dict, timeout: int = 900, kernel_name: str = "python3",
                 cli: bool = False):
    """Run ``notebooks/{name}`` in ``workdir`` through papermill with ``params`` injected after its ``parameters`` cell.

    Every key of ``params`` must be declared in the parameters cell (papermill itself only warns).
    With ``cli``, the ``papermill`` command line is run with one ``-p NAME VALUE`` per parameter (string
    values only), as the docs show it. The executed copy is written to ``workdir/executed_{name}``.
    Returns the executed notebook (nbformat node); a failing cell raises (the API's
    ``PapermillExecutionError``, or an ``AssertionError`` holding the command's output).
    """
    import nbformat
    import papermill

    src = REPO / "notebooks" / name
    out = Path(workdir) / f"executed_{name}"
    unknown = sorted(set(params) - set(papermill.inspect_notebook(str(src))))
    assert not unknown, f"{name}: its parameters cell does not declare {unknown}"
    if not cli:
        return papermill.execute_notebook(str(src), str(out), parameters=params, cwd=str(workdir),
                                          kernel_name=kernel_name, execution_timeout=timeout, progress_bar=False)
    assert all(isinstance(v, str) for v in params.values()), "-p passes strings; use the API for other values"
    cmd = [sys.executable, "-m", "papermill", str(src), str(out), "--cwd", str(workdir), "-k", kernel_name,
           "--execution-timeout", str(timeout), "--no-progress-bar"]
    cmd += [arg for k, v in params.items() for arg in ("-p", k, v)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return nbformat.read(out, as_version=4)


def cell_text(nb) -> str:
    """All stream and text/plain outputs of an executed notebook, joined."""
    parts = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            if o.get("output_type") == "stream":
                parts.append(o.get("text", ""))
            elif "data" in o and "text/plain" in o["data"]:
                parts.append(o["data"]["text/plain"])
    return "\n".join(parts)
