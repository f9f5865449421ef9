"""The documents the errors point to, and the generated tables, stay true."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTION = re.compile(r"(?:section|TROUBLE\}) '([^']+)'")


def _referenced_sections() -> set[str]:
    found = set()
    for path in [*ROOT.joinpath("src").rglob("*.py"), *ROOT.joinpath("scripts").glob("*.py")]:
        found |= set(SECTION.findall(path.read_text()))
    return found


def test_every_referenced_troubleshooting_section_exists():
    headings = set(re.findall(r"^## (.+)$", (ROOT / "TROUBLESHOOTING.md").read_text(), re.M))
    referenced = _referenced_sections()
    assert referenced, "no references found: the pattern is broken"
    assert referenced <= headings, referenced - headings


def test_lab_prep_table_is_generated_and_current():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "lab_prep_tables.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_readme_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    cmds = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert cmds == ["make lab", "make test"]


def test_labs_are_generated_from_the_solutions():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_labs.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_notebook_environment(monkeypatch):
    from effarch import testing

    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    sol = testing.notebook_env(ROOT / "solutions" / "x-solution.ipynb")
    lab = testing.notebook_env(ROOT / "labs" / "x.ipynb")
    assert sol["EFFARCH_STRICT"] == "1" and lab["EFFARCH_STRICT"] == "0"
    assert sol["EFFARCH_PROFILE"] == lab["EFFARCH_PROFILE"] == "tiny"
    assert sol["HF_HUB_OFFLINE"] == "1" and int(sol["OMP_NUM_THREADS"]) >= 1


def test_notebook_environment_is_restored_after_the_notebook(monkeypatch):
    from types import SimpleNamespace

    from effarch import testing

    monkeypatch.delenv("EFFARCH_STRICT", raising=False)
    monkeypatch.setenv("EFFARCH_PROFILE", "auto")
    item = SimpleNamespace(fspath=ROOT / "solutions" / "x-solution.ipynb")
    testing.pytest_runtest_setup(item)
    assert os.environ["EFFARCH_STRICT"] == "1" and os.environ["EFFARCH_PROFILE"] == "tiny"
    testing.pytest_runtest_teardown(item)
    assert "EFFARCH_STRICT" not in os.environ and os.environ["EFFARCH_PROFILE"] == "auto"


def test_run_notebook_executes_code_cells_in_order(tmp_path):
    nb = {"cells": [{"cell_type": "markdown", "source": ["# t"]},
                    {"cell_type": "code", "source": ["x = 2\n"]},
                    {"cell_type": "code", "source": ["print('x is', x * 21)"]},
                    {"cell_type": "code", "source": ["y = x + 1\n", "y * 1000"]},
                    {"cell_type": "code", "source": ["y * 7;"]},
                    {"cell_type": "code", "source": ["import os\n", "os.getcwd()"]}],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    (tmp_path / "nb").mkdir()
    (tmp_path / "nb" / "t.ipynb").write_text(__import__("json").dumps(nb))
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_notebook.py"), "nb/t.ipynb"],
                       capture_output=True, text=True, cwd=tmp_path)  # a relative path
    assert r.returncode == 0, r.stderr
    assert "x is 42" in r.stdout and "--- cell 2" in r.stdout
    lines = r.stdout.splitlines()
    assert "3000" in lines and "21" not in lines  # a last expression shows; `;` hides it
    assert str(tmp_path / "nb") in r.stdout  # runs in the notebook's folder, as Jupyter does


# A path in the repository's own folders, or a file at its top level, named in a file.
REFERENCE = re.compile(r"(?<![\w./-])((?:\.ci|data|labs|scripts|solutions|src|tests)/[\w./-]*"
                       r"|[A-Z][A-Z_]+\.md|LICENSE|constraints\.txt|docker-compose\.yml"
                       r"|pyproject\.toml)(.?)")
TOP_LEVEL_ONLY = re.compile(r"[A-Z][A-Z_]+\.md|LICENSE|constraints\.txt|docker-compose\.yml"
                            r"|pyproject\.toml")
# Files the project's own notes (outside the repository) are cited from; each entry goes when
# its file stops citing it (the test below says so).
KNOWN_MISSING: set[tuple[str, str]] = set()


def _tracked_text_files() -> list[str]:
    r = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        import pytest

        pytest.skip("not a git checkout")
    keep = (".md", ".py", ".toml", ".yml", ".yaml", ".json", ".ipynb", ".txt")
    return [f for f in r.stdout.split() if f.endswith(keep) or f in ("Makefile", ".ci/run")]


def _missing_references() -> set[tuple[str, str]]:
    missing = set()
    for name in _tracked_text_files():
        if name == "tests/test_docs.py":
            continue  # KNOWN_MISSING names them
        if name.startswith("data/") and not name.endswith((".md", ".json")):
            continue  # the corpus and measurements quote other projects' paths
        for match in REFERENCE.finditer((ROOT / name).read_text(encoding="utf-8")):
            ref, after = match.group(1).rstrip("."), match.group(2)
            if after and after in "{*…<":
                continue  # a pattern (lab-2.4.{1,2}-…, *.ipynb), not one file
            if name.startswith("tests/") and not TOP_LEVEL_ONLY.fullmatch(ref):
                continue  # tests name files they make in temporary folders
            if not (ROOT / ref).exists():
                missing.add((name, ref))
    return missing


def test_no_reference_to_a_file_the_repository_does_not_have():
    missing = _missing_references()
    new = sorted(missing - KNOWN_MISSING)
    assert not new, "referenced but not in the repository: " + "; ".join(
        f"{f} names {ref}" for f, ref in new)
    fixed = sorted(KNOWN_MISSING - missing)
    assert not fixed, f"no longer referenced, remove from KNOWN_MISSING: {fixed}"
