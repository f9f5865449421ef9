"""scripts/run_full_profile.py and effarch.runs: a lab's cost kept, and the tables made of it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from effarch import paths, runs

ROOT = paths.repo_root()


def _notebook(folder: Path, name: str, cells: list[str]) -> Path:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    path = folder / name
    nbformat.write(nb, path)
    return path


def _run(tmp_path, notebook):
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "run_full_profile.py"), str(notebook),
         "--runs-file", str(tmp_path / "runs.jsonl"), "--log-dir", str(tmp_path),
         "--commit", "abc1234def"], capture_output=True, text=True, timeout=300)


def test_a_run_is_kept_with_its_cost(tmp_path):
    nb = _notebook(tmp_path, "lab-2.4.9-fixture-solution.ipynb",
                   ["import os\nprofile = os.environ['EFFARCH_PROFILE']",
                    "assert profile == 'full' and os.environ['EFFARCH_STRICT'] == '1'",
                    "print('weights', os.environ['EFFARCH_WEIGHTS'])"])
    r = _run(tmp_path, nb)
    assert r.returncode == 0, r.stdout + r.stderr
    (record,) = runs.read_runs(tmp_path / "runs.jsonl")
    assert record.ok and record.lab == "2.4.9" and record.cells == 3
    assert record.profile == "full" and record.weights == "random" and record.commit == "abc1234def"
    assert record.wall_s > 0 and record.peak_rss_bytes > 0 and record.device
    log = (tmp_path / "lab249_full.txt").read_text()
    assert "weights random" in log and "--- done" in log


def test_a_failing_lab_is_recorded_as_failed(tmp_path):
    nb = _notebook(tmp_path, "lab-2.4.9-fixture-solution.ipynb", ["x = 1", "1 / 0", "y = 2"])
    r = _run(tmp_path, nb)
    assert r.returncode == 1
    (record,) = runs.read_runs(tmp_path / "runs.jsonl")
    assert not record.ok and "ZeroDivisionError" in record.error
    assert runs.latest_by_lab([record]) == {}  # a failed run never reaches the tables


def _record(lab, **kw):
    base = dict(lab=lab, notebook=f"lab-{lab}-x-solution.ipynb", ok=True, error=None,
                wall_s=120.0, cells=10, peak_gpu_bytes=int(20e9), peak_rss_bytes=int(3e9),
                device="NVIDIA H200", profile="full", weights="random",
                commit="0123456789", date="2026-12-02", torch_version="2.11",
                transformers_version="5.17.0")
    return runs.LabRun(**{**base, **kw})


def test_table_shows_the_latest_successful_run_per_lab(tmp_path):
    path = tmp_path / "runs.jsonl"
    for rec in (_record("2.4.2", wall_s=60), _record("2.4.1", wall_s=300),
                _record("2.4.1", wall_s=240), _record("2.4.1", ok=False, wall_s=1),
                _record("2.4.3", profile="tiny")):
        runs.append_run(rec, path)
    table = runs.runs_table(runs.read_runs(path))
    lines = table.splitlines()
    assert len(lines) == 4  # header, rule, 2.4.1, 2.4.2 (the tiny run is not a full run)
    assert lines[2].startswith("| 2.4.1 ") and "4.0 min" in lines[2]  # the latest ok run
    assert "20.0 GB" in lines[3] and "0123456" in lines[3]


def test_table_keeps_what_a_record_adds_to_its_commit(tmp_path):
    path = tmp_path / "runs.jsonl"
    runs.append_run(_record("2.4.5", commit="fea9dec0123+lab245"), path)  # uncommitted notebooks
    assert "| fea9dec+lab245, 2026-12-02 |" in runs.runs_table(runs.read_runs(path))


def test_lab_names():
    assert runs.lab_of("solutions/lab-2.4.1-mamba-inference-solution.ipynb") == "2.4.1"
    assert runs.lab_of("lab-2.4.6-mamba-finetuning.ipynb") == "2.4.6"
    with pytest.raises(ValueError, match="named like a lab"):
        runs.lab_of("notes.ipynb")


def test_kept_runs_file_parses():
    for record in runs.read_runs():  # the kept file: every line a complete record
        assert record.lab.startswith("2.4.") and record.commit
        json.dumps(record.__dict__)
