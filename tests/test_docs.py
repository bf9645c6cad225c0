"""The user documentation: README.md stays a short landing page, every relative link of README.md,
CHANGELOG.md and docs/*.md resolves (anchors included), and the README's Python example runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MAX_README_LINES = 300

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def doc_files() -> list[Path]:
    return [README, REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("*.md"))]


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the lines outside fenced code blocks."""
    out, fenced = [], False
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            out.append((n, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        k = seen.get(base, 0)
        seen[base] = k + 1
        found.add(base if k == 0 else f"{base}-{k}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every markdown link and image outside code."""
    out = []
    for n, line in prose_lines(path):
        line = re.sub(r"`[^`]*`", "", line)
        out += [(n, m.group(1)) for m in LINK.finditer(line)]
    return out


def broken_links(path: Path) -> list[str]:
    problems = []
    for n, target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(REPO)}:{n}: {target}"
        try:
            dest.relative_to(REPO)
        except ValueError:
            problems.append(f"{where} points outside the repository")
            continue
        if not dest.exists():
            problems.append(f"{where} does not exist")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where} has no heading #{anchor}")
    return problems


def test_readme_is_a_short_landing_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines (at most {MAX_README_LINES})"
    # the two commands of a fresh machine, exactly as .ci/run and the demo use them
    text = "\n".join(lines)
    assert 'pip install -e ".[export]" && czii-kit demo' in text
    assert 'pip install -e ".[test,export]" && python -m pytest' in text
    assert 'pip install -e ".[test,export]" && python -m pytest' in (REPO / ".ci" / "run").read_text()


def test_every_relative_link_resolves():
    problems = [p for f in doc_files() for p in broken_links(f)]
    assert not problems, "\n".join(problems)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / t.partition("#")[0]).resolve() for _, t in links(README)}
    orphans = [p.name for p in sorted((REPO / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not orphans, f"docs pages the README does not link: {orphans}"


def test_link_checker_finds_broken_links(tmp_path, monkeypatch):
    """The checker itself: a missing file, a missing anchor and an anchor of a duplicate heading."""
    monkeypatch.setitem(globals(), "REPO", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text(
        "# Title (`code`)\n\n## Same\n\n## Same\n\n```bash\n# not a heading\n[x](nowhere.md)\n```\n"
        "[ok](#title-code) [ok](#same-1) [ok](../README.md) `[code](nowhere.md)` [ok](https://example.org)\n"
        "[bad](#not-a-heading) [bad](b.md) [bad](#same-2)\n", encoding="utf-8")
    (tmp_path / "README.md").write_text("[ok](docs/a.md#same)\n", encoding="utf-8")
    problems = broken_links(tmp_path / "docs" / "a.md")
    assert [p.split(": ")[1].split()[0] for p in problems] == ["#not-a-heading", "b.md", "#same-2"], problems
    assert broken_links(tmp_path / "README.md") == []


def first_python_block(path: Path) -> str:
    m = re.search(r"^```python\n(.*?)^```", path.read_text(encoding="utf-8"), re.S | re.M)
    assert m, f"{path.name} has no ```python block"
    return m.group(1)


def test_readme_python_example_runs(tmp_path):
    """The README's first Python block, unchanged, from a scratch folder outside the repository,
    without the shared reference data: it simulates, predicts with the shipped model and scores."""
    code = first_python_block(README)
    script = tmp_path / "example.py"
    script.write_text(code, encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               CZII_SHARED_DATA=str(tmp_path / "no_shared_data"))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final (weighted F4)" in proc.stdout, proc.stdout[-3000:]
    final = float(proc.stdout.strip().splitlines()[-1])
    assert 0.5 < final <= 1.0, proc.stdout[-3000:]
    assert list((tmp_path / "czii_example" / "test").iterdir()), "the example's dataset is not in the scratch folder"
