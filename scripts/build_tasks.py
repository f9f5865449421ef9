#!/usr/bin/env python
"""Generate the fine-tuning tasks of lab 2.4.6 into ``data/tasks/<task>/``.

Each task folder holds ``train.jsonl`` and ``test.jsonl`` (held out: no prompt of the test split
is in train), one JSON object a line with ``prompt`` and ``answer`` strings, and a README that
says what the task is, its sizes and its seed (this script writes it: edit the script, not the
README). The lab and ``scripts/finetune_mamba.py`` read the files with ``datasets``
(``effarch.finetune.load_task``).

Tasks:

- ``dates``: an ISO date ``YYYY-MM-DD`` written out as day, month name and year
  (``1995-03-02 -> `` gives ``2 March 1995``). The corpus the zoo learned from has ISO dates (its
  generated JSON and CSV records) and month names (the Python documentation) but never this
  rewriting (the base tiny-mamba's exact match: data/measurements/finetune_tiny_cpu.txt). The
  answer copies the year, drops the day's leading zero and maps the month number to its name:
  a deterministic transformation that a LoRA adapter learns in a few minutes of CPU.

Usage::

    python scripts/build_tasks.py            # writes data/tasks/dates/
    python scripts/build_tasks.py --check    # regenerates in memory and compares with the files
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "data" / "tasks"
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
FIRST, LAST = datetime.date(1990, 1, 1), datetime.date(2029, 12, 31)
SIZES = {"train": 4000, "test": 200}
SEED = 2024


def date_row(day: datetime.date) -> dict[str, str]:
    """One example: the ISO date as the prompt, the date in words as the answer."""
    return {"prompt": f"{day.isoformat()} -> ",
            "answer": f"{day.day} {MONTHS[day.month - 1]} {day.year}"}


def dates(seed: int, sizes: dict[str, int]) -> dict[str, list[dict[str, str]]]:
    """Distinct dates drawn without replacement from FIRST..LAST, test first, then train."""
    span = (LAST - FIRST).days + 1
    picks = random.Random(f"{seed}-dates").sample(range(span), sizes["test"] + sizes["train"])
    days = [FIRST + datetime.timedelta(days=i) for i in picks]
    return {"test": [date_row(d) for d in days[:sizes["test"]]],
            "train": [date_row(d) for d in days[sizes["test"]:]]}


TASKS = {"dates": dates}


def readme(task: str, splits: dict[str, list[dict]], seed: int) -> str:
    ex = splits["train"][0]
    counts = "\n".join(f"| `{name}.jsonl` | {len(rows):,} | {len(_jsonl(rows)):,} |"
                       for name, rows in splits.items())
    return f"""# Task `{task}` (lab 2.4.6)

Written by `scripts/build_tasks.py` (this file too: edit the script, not this file).

An ISO date written out in words: the prompt is `YYYY-MM-DD -> ` and the answer is the day
without a leading zero, the English month name and the year. Example:
`{json.dumps(ex, ensure_ascii=False)}`. Dates are drawn without replacement, uniformly from
{FIRST.isoformat()} to {LAST.isoformat()}, with `random.Random("{seed}-dates")` (seed {seed});
the test split's dates appear nowhere in train.

The zoo's corpus has ISO dates (its generated records) and month names (the Python
documentation) but never this rewriting. The exact match of the base tiny-mamba and of the
adapter trained with `scripts/finetune_mamba.py`'s defaults on the test split is in the kept log
of that run, `data/measurements/finetune_tiny_cpu.txt`.

Training text is `prompt + answer + "\\n"`, tokenised as the prompt's tokens followed by the
answer's, with the loss on the answer's tokens only (`effarch.finetune.tokenize_example`).
Exact match: the greedy continuation of the prompt (at most 32 new tokens), cut at the first
newline and stripped, equals the answer stripped.

| file | rows | bytes |
| --- | ---: | ---: |
{counts}

Licence: generated, part of this repository (Apache-2.0).
"""


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def build(task: str, seed: int) -> dict[str, bytes]:
    """The task's files as bytes, keyed by file name."""
    splits = TASKS[task](seed, SIZES)
    test_prompts = {r["prompt"] for r in splits["test"]}
    assert not test_prompts & {r["prompt"] for r in splits["train"]}, "test leaked into train"
    files = {f"{name}.jsonl": _jsonl(rows) for name, rows in splits.items()}
    files["README.md"] = readme(task, splits, seed).encode()
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), default=None,
                        help="one task (default: all)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--check", action="store_true",
                        help="compare the files on disk with a fresh build; write nothing")
    args = parser.parse_args(argv)
    stale = []
    for task in [args.task] if args.task else sorted(TASKS):
        folder = args.out / task
        for name, content in build(task, args.seed).items():
            path = folder / name
            if args.check:
                if not path.is_file() or path.read_bytes() != content:
                    stale.append(str(path))
                continue
            folder.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            print(f"{path}: {len(content):,} bytes, sha256 "
                  f"{hashlib.sha256(content).hexdigest()[:16]}")
    if stale:
        print("stale or missing (run `python scripts/build_tasks.py`):\n  " + "\n  ".join(stale),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
