"""effarch.labs, solutions → labs (scripts/build_labs.py is its command line): solution regions
become stubs, labs are deterministic, --check works, and a lab holding changes is never
overwritten. The students' copies (my-labs/) are tested in test_labs.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from effarch import checks
from effarch import labs as build_labs

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SOLUTION = FIXTURES / "solutions" / "lab-2.4.9-fixture-solution.ipynb"
LAB = "lab-2.4.9-fixture.ipynb"
STUB = build_labs.STUB


def _solution() -> nbformat.NotebookNode:
    return nbformat.read(SOLUTION, as_version=4)


@pytest.fixture
def lab() -> nbformat.NotebookNode:
    return build_labs.build_lab(_solution(), f"solutions/{SOLUTION.name}")


@pytest.fixture
def repo(tmp_path: Path) -> tuple[Path, Path]:
    solutions, labs = tmp_path / "solutions", tmp_path / "labs"
    solutions.mkdir()
    shutil.copy(SOLUTION, solutions / SOLUTION.name)
    return solutions, labs


def _cli(solutions: Path, labs: Path, *extra: str) -> subprocess.CompletedProcess:
    """scripts/build_labs.py as a program, the way make and maintainers run it."""
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "build_labs.py"),
                           "--solutions", str(solutions), "--labs", str(labs), *extra],
                          capture_output=True, text=True)


def _code(nb: nbformat.NotebookNode, needle: str) -> str:
    (source,) = [c.source for c in nb.cells if c.cell_type == "code" and needle in c.source]
    return source


# ------------------------------------------------------------------------------ build_lab


def test_region_in_function_becomes_stub(lab):
    assert _code(lab, "def double") == (
        'def double(x):\n    """Return twice ``x``."""\n    ' + STUB)


def test_nested_regions_keep_their_indentation(lab):
    source = _code(lab, "class Accumulator")
    lines = source.split("\n")
    assert " " * 16 + STUB in lines  # inside for / if inside a method
    assert " " * 8 + STUB in lines  # directly in a method
    assert "    def total(self, values):" in lines
    assert '        """Sum of ``values``, skipping ``None``."""' in lines
    assert "        return result" in lines  # code after END stays
    assert "result += v" not in source and "SOLUTION" not in source
    compile(source, "<lab cell>", "exec")


def test_outputs_cleared_banner_and_kernelspec():
    solution = _solution()
    code = solution.cells[4]
    code.outputs = [nbformat.v4.new_output("stream", text="8\n")]
    code.execution_count = 7
    code.metadata["execution"] = {"iopub.status.idle": "2025-01-01T00:00:00Z"}
    solution.metadata["kernelspec"] = {"name": "myenv", "display_name": "My env"}
    lab = build_labs.build_lab(solution, f"solutions/{SOLUTION.name}")
    assert all(c.outputs == [] and c.execution_count is None
               for c in lab.cells if c.cell_type == "code")
    assert all("execution" not in c.metadata for c in lab.cells)
    assert lab.metadata.kernelspec == {"name": "python3", "display_name": "Python 3 (ipykernel)",
                                       "language": "python"}
    banner = lab.cells[0]
    assert banner.cell_type == "markdown"
    assert f"Generated from `solutions/{SOLUTION.name}` by `scripts/build_labs.py`" in banner.source
    assert "do not edit" in banner.source
    assert code.outputs and code.execution_count == 7  # the source notebook is untouched


def test_cell_ids_are_copied_and_banner_id_is_stable(lab):
    assert [c.id for c in lab.cells[1:]] == [c.id for c in _solution().cells]
    again = build_labs.build_lab(_solution(), f"solutions/{SOLUTION.name}")
    assert lab.cells[0].id == again.cells[0].id
    assert lab.cells[0].id != build_labs.build_lab(_solution(), "solutions/other.ipynb").cells[0].id


def test_notebooks_without_ids_get_deterministic_ones():
    solution = _solution()
    solution.nbformat_minor = 4
    for cell in solution.cells:
        del cell["id"]
    lab = build_labs.build_lab(solution, "solutions/old.ipynb")
    nbformat.validate(lab)
    assert lab.cells[1].id == "cell-0"


@pytest.mark.parametrize(("fixture", "line", "words"), [
    ("nested", 5, "nested '### BEGIN SOLUTION' (the region opened at line 3"),
    ("unterminated", 3, "never closed"),
    ("end-without-begin", 4, "'### END SOLUTION' without a '### BEGIN SOLUTION'"),
    ("misspelled", 3, "looks like a solution marker"),
    ("markdown", 3, "solution marker in a markdown cell"),
    ("top-level", 2, "not inside a function"),
])
def test_malformed_markers_name_the_cell_and_line(fixture, line, words):
    nb = nbformat.read(FIXTURES / "malformed" / f"{fixture}.ipynb", as_version=4)
    with pytest.raises(build_labs.MarkerError) as info:
        build_labs.build_lab(nb, f"solutions/{fixture}.ipynb")
    message = str(info.value)
    assert message.startswith(f"solutions/{fixture}.ipynb: cell 2 (id {fixture}-2) line {line}")
    assert words in message


def test_unsolved_lab_reports_skip_and_solution_passes_strict(lab, monkeypatch, capsys):
    def run(nb):
        namespace: dict = {}
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                exec(compile(cell.source, f"<cell {i}>", "exec"), namespace)
        return [r.status for r in checks.history()]

    monkeypatch.delenv("EFFARCH_STRICT", raising=False)
    assert run(lab) == ["skip", "skip", "skip"]
    monkeypatch.setenv("EFFARCH_STRICT", "1")
    assert run(_solution()) == ["pass", "pass", "pass"]
    checks.reset()
    assert "⏭" in capsys.readouterr().out


# ---------------------------------------------------------------------- build_all and CLI


def test_check_then_build_then_check(repo):
    solutions, labs = repo
    r = _cli(solutions, labs, "--check")
    assert r.returncode == 1 and f"missing: labs/{LAB}" in r.stdout
    assert not labs.exists()  # --check writes nothing
    r = _cli(solutions, labs)
    assert r.returncode == 0 and f"wrote labs/{LAB}" in r.stdout
    r = _cli(solutions, labs, "--check")
    assert r.returncode == 0 and "1 lab(s) up to date" in r.stdout


def test_check_detects_a_stale_lab(repo):
    solutions, labs = repo
    build_labs.build_all(solutions, labs)
    solution = nbformat.read(solutions / SOLUTION.name, as_version=4)
    solution.cells[2].source += "\n\nA new sentence."
    nbformat.write(solution, solutions / SOLUTION.name)
    assert build_labs.build_all(solutions, labs, check=True) == [
        f"stale: labs/{LAB} differs from what its solution generates"]
    r = _cli(solutions, labs, "--check")
    assert r.returncode == 1 and "not up to date" in r.stderr
    build_labs.build_all(solutions, labs)
    assert build_labs.build_all(solutions, labs, check=True) == []


def test_build_is_byte_identical_and_deterministic(repo):
    solutions, labs = repo
    build_labs.build_all(solutions, labs)
    first = (labs / LAB).read_bytes()
    assert build_labs.build_all(solutions, labs) == []  # nothing to write the second time
    assert (labs / LAB).read_bytes() == first
    assert first.endswith(b"}\n") and b'\n "cells": [\n  {\n' in first  # nbformat's 1-space indent
    assert nbformat.reads(first.decode(), as_version=4).metadata.kernelspec.name == "python3"


def test_extra_labs(repo, capsys):
    solutions, labs = repo
    build_labs.build_all(solutions, labs)
    shutil.copy(labs / LAB, labs / "lab-2.4.8-gone.ipynb")  # generated, solution deleted
    shutil.copy(SOLUTION, labs / "scratch.ipynb")  # not generated by the script
    problems = build_labs.build_all(solutions, labs, check=True)
    assert problems == ["extra: labs/lab-2.4.8-gone.ipynb has no solution notebook",
                        "extra: labs/scratch.ipynb has no solution notebook"]
    notes = build_labs.build_all(solutions, labs)
    assert not (labs / "lab-2.4.8-gone.ipynb").exists()
    assert (labs / "scratch.ipynb").exists()
    assert any(n.startswith("left alone: labs/scratch.ipynb") for n in notes)


def test_check_fails_when_a_solution_carries_outputs(repo):
    solutions, labs = repo
    build_labs.build_all(solutions, labs)
    solution = nbformat.read(solutions / SOLUTION.name, as_version=4)
    solution.cells[4].outputs = [nbformat.v4.new_output("stream", text="8\n")]
    nbformat.write(solution, solutions / SOLUTION.name)
    problems = build_labs.build_all(solutions, labs, check=True)
    assert problems == [f"solution carries outputs: solutions/{SOLUTION.name} (cells 4); "
                        "clear them before committing"]


def test_marker_error_writes_nothing(repo):
    solutions, labs = repo
    shutil.copy(FIXTURES / "malformed" / "nested.ipynb", solutions / "lab-2.4.0-bad-solution.ipynb")
    r = _cli(solutions, labs)
    assert r.returncode == 1
    assert "error: solutions/lab-2.4.0-bad-solution.ipynb: cell 2 (id nested-2) line 5" in r.stderr
    assert not labs.exists()


def test_no_solutions_is_fine(tmp_path):
    (tmp_path / "solutions").mkdir()
    r = _cli(tmp_path / "solutions", tmp_path / "labs")
    assert r.returncode == 0 and "nothing to build" in r.stdout
    assert _cli(tmp_path / "solutions", tmp_path / "labs", "--check").returncode == 0


def test_default_folders_are_the_repositorys():
    assert build_labs.course_root() == ROOT
    assert build_labs.lab_name("lab-2.4.1-mamba-inference-solution.ipynb") == \
        "lab-2.4.1-mamba-inference.ipynb"


# ------------------------------------------------------- a lab that holds someone's changes


def _edit_lab(path: Path, edit) -> None:
    """Change a generated lab the way JupyterLab saves it (nbformat's JSON)."""
    nb = nbformat.read(path, as_version=4)
    edit(nb)
    nbformat.write(nb, path)


def _change_solution(solutions: Path) -> None:
    solution = nbformat.read(solutions / SOLUTION.name, as_version=4)
    solution.cells[2].source += "\n\nA new sentence."
    nbformat.write(solution, solutions / SOLUTION.name)


def _run_cell(nb):
    code = next(c for c in nb.cells if c.cell_type == "code")
    code.outputs = [nbformat.v4.new_output("stream", text="8\n")]
    code.execution_count = 1


def test_the_digest_of_the_written_cells_is_recorded(repo):
    solutions, labs = repo
    build_labs.build_all(solutions, labs)
    raw = json.loads((labs / LAB).read_text())  # as stored: sources split into lines
    assert raw["metadata"]["effarch"] == {"generated_from": f"solutions/{SOLUTION.name}",
                                          "cells_sha256": build_labs.cells_digest(raw)}
    assert build_labs.lab_changes(labs / LAB) is None


@pytest.mark.parametrize(("edit", "why"), [
    (_run_cell, "it carries outputs (cells 2)"),
    (lambda nb: setattr(nb.cells[5], "source", "my answer"), "its cells differ"),
    (lambda nb: nb.cells.append(nbformat.v4.new_markdown_cell("my notes")), "its cells differ"),
])
def test_build_refuses_to_overwrite_a_lab_holding_changes(repo, edit, why):
    solutions, labs = repo
    build_labs.build_all(solutions, labs)
    _edit_lab(labs / LAB, edit)
    held = (labs / LAB).read_bytes()
    _change_solution(solutions)
    with pytest.raises(build_labs.LabChangedError) as info:
        build_labs.build_all(solutions, labs)
    assert f"labs/{LAB}: {why}" in str(info.value)
    assert "TROUBLESHOOTING.md, section 'Your changes to a lab'" in str(info.value)
    assert (labs / LAB).read_bytes() == held  # nothing written
    r = _cli(solutions, labs)
    assert r.returncode == 1 and "refusing to overwrite" in r.stderr and "my-labs/" in r.stderr
    assert (labs / LAB).read_bytes() == held
    r = _cli(solutions, labs, "--check")
    assert r.returncode == 1 and f"stale: labs/{LAB}" in r.stdout and "holds changes" in r.stdout
    assert "Your changes to a lab" in r.stderr


def test_nothing_is_written_when_any_lab_holds_changes(repo):
    solutions, labs = repo
    shutil.copy(SOLUTION, solutions / "lab-2.4.8-other-solution.ipynb")
    build_labs.build_all(solutions, labs)
    _edit_lab(labs / LAB, _run_cell)
    _change_solution(solutions)
    other = (labs / "lab-2.4.8-other.ipynb").read_bytes()
    shutil.copy(solutions / SOLUTION.name, solutions / "lab-2.4.8-other-solution.ipynb")
    with pytest.raises(build_labs.LabChangedError):
        build_labs.build_all(solutions, labs)
    assert (labs / "lab-2.4.8-other.ipynb").read_bytes() == other


def test_what_jupyter_alone_changes_is_not_a_change(repo):
    solutions, labs = repo
    build_labs.build_all(solutions, labs)

    def opened(nb):  # a kernel started, a cell collapsed, ids rewritten: no work of anyone's
        nb.metadata["language_info"] = {"name": "python", "version": "3.11.7"}
        nb.cells[4].metadata["collapsed"] = True
        nb.cells[4].id = "renamed"
    _edit_lab(labs / LAB, opened)
    assert build_labs.lab_changes(labs / LAB) is None
    _change_solution(solutions)
    assert build_labs.build_all(solutions, labs) == [f"wrote labs/{LAB}"]


def test_a_changed_lab_whose_solution_did_not_change_is_only_reported(repo):
    solutions, labs = repo
    build_labs.build_all(solutions, labs)
    _edit_lab(labs / LAB, _run_cell)
    with pytest.raises(build_labs.LabChangedError):
        build_labs.build_all(solutions, labs)  # rebuilding would wipe the outputs


def test_a_generated_lab_holding_changes_is_not_removed(repo):
    solutions, labs = repo
    build_labs.build_all(solutions, labs)
    shutil.copy(labs / LAB, labs / "lab-2.4.8-gone.ipynb")
    _edit_lab(labs / "lab-2.4.8-gone.ipynb", _run_cell)
    with pytest.raises(build_labs.LabChangedError, match="lab-2.4.8-gone.ipynb: it carries"):
        build_labs.build_all(solutions, labs)
    assert (labs / "lab-2.4.8-gone.ipynb").exists()


def test_a_lab_that_is_not_a_notebook_is_kept(repo):
    solutions, labs = repo
    build_labs.build_all(solutions, labs)
    (labs / LAB).write_text("{ half a notebook")
    _change_solution(solutions)
    with pytest.raises(build_labs.LabChangedError, match="not a readable notebook"):
        build_labs.build_all(solutions, labs)


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd,
                   check=True, capture_output=True)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_a_lab_from_before_digests_is_compared_with_git(repo):
    solutions, labs = repo
    build_labs.build_all(solutions, labs)

    def legacy(nb):
        del nb.metadata["effarch"]
    _edit_lab(labs / LAB, legacy)
    _git(labs.parent, "init", "-q")
    _git(labs.parent, "add", "labs")
    _git(labs.parent, "commit", "-qm", "labs")
    _change_solution(solutions)
    assert build_labs.lab_changes(labs / LAB) is None  # as committed
    _edit_lab(labs / LAB, _run_cell)
    assert build_labs.lab_changes(labs / LAB).startswith("it carries outputs")
    _git(labs.parent, "checkout", "--", "labs")
    _edit_lab(labs / LAB, lambda nb: setattr(nb.cells[5], "source", "mine"))
    assert "differs from the committed version" in build_labs.lab_changes(labs / LAB)


def test_a_lab_from_before_digests_identical_to_the_new_one_is_replaced(repo):
    solutions, labs = repo
    build_labs.build_all(solutions, labs)
    _edit_lab(labs / LAB, lambda nb: nb.metadata.pop("effarch"))  # no git repository here
    assert build_labs.build_all(solutions, labs) == [f"wrote labs/{LAB}"]
    assert "effarch" in json.loads((labs / LAB).read_text())["metadata"]
