"""effarch.labs for students: their own copies in my-labs/ (never overwritten once they changed
them; an update arrives as a new copy) and the JupyterLab command `make lab` runs."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from effarch import labs

ROOT = Path(__file__).resolve().parents[1]
DAY = datetime.date(2026, 12, 2)
LAB = "lab-2.4.9-fixture.ipynb"


def _notebook(text: str, outputs: list | None = None) -> bytes:
    nb = {"cells": [{"cell_type": "markdown", "id": "a", "metadata": {}, "source": [text]},
                    {"cell_type": "code", "id": "b", "metadata": {}, "source": ["x = 1"],
                     "execution_count": 1 if outputs else None, "outputs": outputs or []}],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    return (json.dumps(nb, indent=1, sort_keys=True) + "\n").encode()


def _student_runs(path: Path) -> None:
    """What JupyterLab's autosave writes after the student ran the lab."""
    nb = json.loads(path.read_text())
    nb["cells"][1]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["1\n"]}]
    nb["cells"][1]["execution_count"] = 1
    nb["metadata"]["language_info"] = {"name": "python"}
    path.write_text(json.dumps(nb, indent=1))


@pytest.fixture
def course(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "labs").mkdir()
    (tmp_path / "labs" / LAB).write_bytes(_notebook("version 1"))
    return tmp_path / "labs", tmp_path / "my-labs"


def test_first_use_copies_every_lab(course):
    labs_dir, mine = course
    (labs_dir / "lab-2.4.8-other.ipynb").write_bytes(_notebook("other"))
    notes = labs.working_copies(labs_dir, mine, today=DAY)
    assert notes == ["copied labs/lab-2.4.8-other.ipynb → my-labs/lab-2.4.8-other.ipynb",
                     f"copied labs/{LAB} → my-labs/{LAB}"]
    assert (mine / LAB).read_bytes() == (labs_dir / LAB).read_bytes()
    assert labs.working_copies(labs_dir, mine, today=DAY) == []  # the second time: nothing


def test_an_update_never_overwrites_the_students_work(course):
    labs_dir, mine = course
    labs.working_copies(labs_dir, mine, today=DAY)
    _student_runs(mine / LAB)
    work = (mine / LAB).read_bytes()
    (labs_dir / LAB).write_bytes(_notebook("version 2"))
    notes = labs.working_copies(labs_dir, mine, today=DAY)
    new = "lab-2.4.9-fixture.updated-2026-12-02.ipynb"
    assert notes == [f"labs/{LAB} was updated: the new version is my-labs/{new}; your copy "
                     f"my-labs/{LAB} keeps your work"]
    assert (mine / LAB).read_bytes() == work
    assert (mine / new).read_bytes() == _notebook("version 2")
    assert labs.working_copies(labs_dir, mine, today=DAY) == []  # each update arrives once
    # a third version: the student worked on the second copy too, so a third file comes
    _student_runs(mine / new)
    (labs_dir / LAB).write_bytes(_notebook("version 3"))
    labs.working_copies(labs_dir, mine, today=DAY)
    assert (mine / "lab-2.4.9-fixture.updated-2026-12-02-2.ipynb").read_bytes() == \
        _notebook("version 3")
    assert (mine / LAB).read_bytes() == work


def test_a_copy_the_student_never_changed_is_refreshed_in_place(course):
    labs_dir, mine = course
    labs.working_copies(labs_dir, mine, today=DAY)
    nb = json.loads((mine / LAB).read_text())  # opened: Jupyter added metadata, nothing else
    nb["metadata"]["language_info"] = {"name": "python"}
    (mine / LAB).write_text(json.dumps(nb))
    (labs_dir / LAB).write_bytes(_notebook("version 2"))
    notes = labs.working_copies(labs_dir, mine, today=DAY)
    assert notes == [f"updated my-labs/{LAB} (labs/{LAB} changed; you had not changed your copy)"]
    assert (mine / LAB).read_bytes() == _notebook("version 2")
    assert sorted(p.name for p in mine.glob("*.ipynb")) == [LAB]


def test_a_deleted_copy_comes_back_and_other_files_are_left_alone(course):
    labs_dir, mine = course
    labs.working_copies(labs_dir, mine, today=DAY)
    (mine / LAB).unlink()
    (mine / "scratch.ipynb").write_text("mine")
    (mine / "notes.txt").write_text("mine")
    assert labs.working_copies(labs_dir, mine, today=DAY) == [
        f"copied labs/{LAB} → my-labs/{LAB}"]
    assert (mine / "scratch.ipynb").read_text() == (mine / "notes.txt").read_text() == "mine"


def test_without_the_record_a_different_copy_is_kept(course):
    labs_dir, mine = course
    labs.working_copies(labs_dir, mine, today=DAY)
    _student_runs(mine / LAB)
    work = (mine / LAB).read_bytes()
    (mine / labs.MANIFEST).write_text("{ broken")
    labs.working_copies(labs_dir, mine, today=DAY)
    assert (mine / LAB).read_bytes() == work
    assert (mine / "lab-2.4.9-fixture.updated-2026-12-02.ipynb").exists()


def test_the_repositorys_copies_are_ignored_by_git():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    r = subprocess.run(["git", "check-ignore", "-q", f"{labs.MY_LABS}/{LAB}"], cwd=ROOT)
    assert r.returncode == 0, f"{labs.MY_LABS}/ must be in .gitignore"


# ---------------------------------------------------------------------- starting JupyterLab


def test_jupyter_arguments(tmp_path):
    args = labs.jupyter_args([], port=8899, root_dir=tmp_path, is_root=False)
    assert args == [f"--ServerApp.root_dir={tmp_path}", "--port=8899"]
    args = labs.jupyter_args(["--ip=0.0.0.0", "--no-browser"], port=8888, root_dir=tmp_path,
                             is_root=True)
    assert args[1:] == ["--port=8888", "--allow-root", "--ip=0.0.0.0", "--no-browser"]
    args = labs.jupyter_args(["--ServerApp.port=9000", "--allow-root"], port=8888,
                             root_dir=tmp_path, is_root=True)
    assert args[1:] == ["--ServerApp.port=9000", "--allow-root"]  # theirs, once each


@pytest.mark.parametrize("arg", ["--IdentityProvider.token=", "--ServerApp.token=''",
                                 "--NotebookApp.token="])
def test_a_server_without_a_token_is_refused(tmp_path, arg):
    with pytest.raises(ValueError, match="never starts JupyterLab without a token"):
        labs.jupyter_args([arg], port=8888, root_dir=tmp_path, is_root=False)


@pytest.fixture
def started(monkeypatch, course):
    """Run ``effarch-lab``'s main without starting JupyterLab; the command it would run."""
    labs_dir, _ = course
    calls = []
    monkeypatch.setattr(labs, "course_root", lambda: labs_dir.parent)
    monkeypatch.setattr(os, "execv", lambda path, argv: calls.append(argv))
    monkeypatch.delenv("PORT", raising=False)
    return calls


def test_main_copies_then_starts_jupyterlab_on_the_copies(started, course, capsys):
    labs_dir, mine = course
    assert labs.main(["--port=8888", "--port=8899", "--no-browser"]) == 0  # make's, then theirs
    (argv,) = started
    assert argv[1:3] == ["-m", "jupyterlab"]
    assert f"--ServerApp.root_dir={mine}" in argv and "--port=8899" in argv
    assert "--port=8888" not in argv and "--no-browser" in argv
    assert ("--allow-root" in argv) == (os.geteuid() == 0)
    assert (mine / LAB).exists()
    out = capsys.readouterr().out
    assert f"copied labs/{LAB}" in out and "?token=" in out


def test_main_refuses_a_server_without_a_token(started, capsys):
    assert labs.main(["--IdentityProvider.token="]) == 2
    assert started == [] and "Starting JupyterLab" in capsys.readouterr().err


def test_main_port_from_the_environment(started, monkeypatch):
    monkeypatch.setenv("PORT", "8890")
    labs.main([])
    assert "--port=8890" in started[0]


def test_make_lab_passes_port_then_lab_args():
    """`make lab LAB_ARGS=--port=8899` reaches effarch-lab after make's --port (the last wins)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    r = subprocess.run(["make", "-n", "lab", "LAB_ARGS=--port=8899 --no-browser"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (line,) = [ln for ln in r.stdout.splitlines() if "bin/effarch-lab" in ln]
    assert line.rstrip().endswith("effarch-lab --port=8888 --port=8899 --no-browser")
