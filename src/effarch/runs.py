"""Kept records of whole-lab runs (``scripts/run_full_profile.py``) and the tables made of them.

One JSON object a line in ``data/measurements/full_profile_runs.jsonl``: which solution ran, in
which profile and weights, on which device and commit, how long it took and the peak memory it
used. README.md's and LAB_PREP.md's per-lab tables are generated from the latest record of each
lab (``scripts/lab_prep_tables.py``), never typed by hand.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from effarch import paths
from effarch.paths import TROUBLE

RUNS_FILE = "full_profile_runs.jsonl"
LAB_PATTERN = re.compile(r"lab-(2\.4\.\d)-(.+?)(?:-solution)?\.ipynb$")


@dataclass(frozen=True)
class LabRun:
    """One solution run end to end. Peak memory: the CUDA allocator's reserved bytes (the
    device memory the run held), sampled at every cell's end and every 50 ms, or None on a
    CPU; ``peak_rss_bytes`` the process's resident high-water mark."""

    lab: str  # "2.4.1"
    notebook: str  # file name
    ok: bool
    error: str | None
    wall_s: float
    cells: int
    peak_gpu_bytes: int | None
    peak_rss_bytes: int | None
    device: str  # e.g. "NVIDIA H200" or "cpu"
    profile: str
    weights: str
    commit: str
    date: str
    torch_version: str
    transformers_version: str


def lab_of(notebook: str | Path) -> str:
    """``"2.4.1"`` from ``lab-2.4.1-mamba-inference-solution.ipynb``."""
    found = LAB_PATTERN.search(Path(notebook).name)
    if not found:
        raise ValueError(f"{notebook} is not named like a lab (lab-2.4.N-name[-solution].ipynb). "
                         f"{TROUBLE} 'Full-profile runs'.")
    return found.group(1)


def runs_path() -> Path:
    return paths.measurements_dir() / RUNS_FILE


def append_run(run: LabRun, path: Path | None = None) -> None:
    """Add one record to the kept file (created if missing)."""
    path = Path(path or runs_path())
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(asdict(run), sort_keys=True) + "\n")


def read_runs(path: Path | None = None) -> list[LabRun]:
    """Every record of the kept file, oldest first ([] when there is none)."""
    path = Path(path or runs_path())
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [LabRun(**json.loads(line)) for line in lines if line.strip()]


def latest_by_lab(runs: list[LabRun], *, profile: str = "full") -> dict[str, LabRun]:
    """The last successful run of each lab in ``profile``, labs in order."""
    latest = {r.lab: r for r in runs if r.ok and r.profile == profile}
    return dict(sorted(latest.items()))


def _gb(n: int | None) -> str:
    return "—" if n is None else f"{n / 1e9:.1f} GB"


def _short_commit(commit: str) -> str:
    """A commit as the tables show it: 7 hex digits, and what the record adds after it (e.g.
    ``+lab245``: the tree held uncommitted changes) kept."""
    head, sep, tail = commit.partition("+")
    return head[:7] + sep + tail


def runs_table(runs: list[LabRun]) -> str:
    """The per-lab markdown table: time and peak memory of the latest full-profile run."""
    rows = ["| lab | weights | device | wall time | peak GPU memory | peak process memory | "
            "commit, date |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for lab, r in latest_by_lab(runs).items():
        rows.append(f"| {lab} | {r.weights} | {r.device} | {r.wall_s / 60:.1f} min | "
                    f"{_gb(r.peak_gpu_bytes)} | {_gb(r.peak_rss_bytes)} | "
                    f"{_short_commit(r.commit)}, {r.date} |")
    if len(rows) == 2:
        rows.append("| (no full-profile run kept yet) | | | | | | |")
    return "\n".join(rows)
