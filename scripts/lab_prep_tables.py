#!/usr/bin/env python
"""Generate LAB_PREP.md's model table from effarch's registry (never typed by hand).

    python scripts/lab_prep_tables.py          # rewrite the table in LAB_PREP.md
    python scripts/lab_prep_tables.py --check  # exit 1 when LAB_PREP.md is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from effarch import memory, models

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- BEGIN GENERATED: model table -->", "<!-- END GENERATED: model table -->"


def model_table() -> str:
    rows = ["| model | hub id | parameters (total) | active per token | bf16 | 8-bit | 4-bit |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, spec in models.REGISTRY.items():
        if not spec.config:
            continue
        pc = memory.count_params(models.get_config(name))
        gb = [memory.estimate_weights_bytes(name, "bfloat16", q) / 1e9 for q in (None, "8bit", "4bit")]
        rows.append(f"| {name} | `{spec.hub_id}` | {pc.total / 1e9:.2f} B | {pc.active / 1e9:.2f} B"
                    f" | {gb[0]:.1f} GB | {gb[1]:.1f} GB | {gb[2]:.1f} GB |")
    return "\n".join(rows)


def render(text: str) -> str:
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{model_table()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    path = ROOT / "LAB_PREP.md"
    text = path.read_text()
    new = render(text)
    if args.check:
        if new != text:
            print("LAB_PREP.md's model table is stale: run python scripts/lab_prep_tables.py")
            return 1
        return 0
    path.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
