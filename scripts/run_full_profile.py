#!/usr/bin/env python
"""Run solutions end to end in the full profile and keep what each cost.

    PYTHONPATH=src python scripts/run_full_profile.py                 # every solution
    PYTHONPATH=src python scripts/run_full_profile.py solutions/lab-2.4.1-mamba-inference-solution.ipynb

Each solution runs strict (every check must pass) in its own process (``scripts/run_notebook.py``)
with ``EFFARCH_PROFILE=full`` and, by default, ``EFFARCH_WEIGHTS=random``: the real sizes with no
download. Its log goes to ``--log-dir`` and one record — lab, wall time, peak GPU and process
memory, device, commit, versions — is appended to ``data/measurements/full_profile_runs.jsonl``,
from which ``scripts/lab_prep_tables.py`` generates README's and LAB_PREP's per-lab tables.
Pass ``--commit`` where the tree is not a git checkout (the GPU machine gets a copy).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from effarch import paths, runs

ROOT = paths.repo_root()


def commit_of(given: str | None) -> str:
    if given:
        return given
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout: pass --commit)"


def run_one(notebook: Path, args) -> runs.LabRun:
    env = {**os.environ, "EFFARCH_PROFILE": "full", "EFFARCH_WEIGHTS": args.weights,
           "EFFARCH_STRICT": "1", "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
    log = args.log_dir / f"lab{runs.lab_of(notebook).replace('.', '')}_full.txt"
    with tempfile.TemporaryDirectory() as tmp:
        stats_file = Path(tmp) / "stats.json"
        with log.open("w", encoding="utf-8") as out:
            proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_notebook.py"),
                                   str(notebook), "--stats", str(stats_file)],
                                  env=env, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=args.timeout)
        stats = json.loads(stats_file.read_text()) if stats_file.is_file() else dict(
            ok=False, error=f"no stats (exit {proc.returncode}): see {log}", wall_s=0.0,
            cells=0, peak_gpu_bytes=None, peak_rss_bytes=None, device="unknown",
            torch_version="?", transformers_version="?")
    return runs.LabRun(lab=runs.lab_of(notebook), notebook=notebook.name, profile="full",
                       weights=args.weights, commit=commit_of(args.commit),
                       date=datetime.date.today().isoformat(), **stats)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebooks", nargs="*", type=Path,
                    help="solutions to run (default: every solutions/*.ipynb)")
    ap.add_argument("--weights", choices=("random", "pretrained"), default="random")
    ap.add_argument("--log-dir", type=Path, default=paths.measurements_dir())
    ap.add_argument("--runs-file", type=Path, default=runs.runs_path())
    ap.add_argument("--commit", help="the commit the tree was copied from")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per notebook")
    args = ap.parse_args(argv)
    notebooks = args.notebooks or sorted((ROOT / "solutions").glob("lab-*.ipynb"))
    args.log_dir.mkdir(parents=True, exist_ok=True)
    failed = 0
    for notebook in notebooks:
        record = run_one(notebook.resolve(), args)
        runs.append_run(record, args.runs_file)
        failed += not record.ok
        peak = "—" if record.peak_gpu_bytes is None else f"{record.peak_gpu_bytes / 1e9:.1f} GB"
        print(f"{record.lab}: {'ok' if record.ok else 'FAILED ' + str(record.error)}, "
              f"{record.wall_s:.0f} s, peak GPU {peak}, peak RSS "
              f"{(record.peak_rss_bytes or 0) / 1e9:.1f} GB on {record.device}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
