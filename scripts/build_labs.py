"""Generate the student labs from the solution notebooks (the logic lives in ``effarch.labs``).

    python scripts/build_labs.py           # write labs/; remove generated labs whose solution is gone
    python scripts/build_labs.py --check   # write nothing; exit 1 if labs/ is stale or a solution
                                           # notebook carries outputs

Building refuses to overwrite or remove a generated lab that holds someone's changes (edited
cells, outputs) and then writes nothing: keep that work elsewhere, restore the lab, build again
(TROUBLESHOOTING.md, "Your changes to a lab").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from effarch import labs


def main(argv: list[str] | None = None) -> int:
    root = labs.course_root()
    parser = argparse.ArgumentParser(description="Generate labs/ from solutions/.")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if labs/ is stale or a solution has outputs")
    parser.add_argument("--solutions", type=Path, default=root / "solutions",
                        help="solution notebooks (default: the repository's solutions/)")
    parser.add_argument("--labs", type=Path, default=root / "labs",
                        help="generated labs (default: the repository's labs/)")
    args = parser.parse_args(argv)
    if not args.solutions.is_dir():
        print(f"error: {args.solutions} is not a folder", file=sys.stderr)
        return 2
    try:
        notes = labs.build_all(args.solutions, args.labs, check=args.check)
    except (labs.MarkerError, labs.LabChangedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    count = len(list(args.solutions.glob("*" + labs.SOLUTION_SUFFIX)))
    for note in notes:
        print(note)
    if count == 0:
        print(f"no solution notebooks (*{labs.SOLUTION_SUFFIX}) in {args.solutions}: "
              "nothing to build")
    if args.check and notes:
        held = any("holds changes" in n for n in notes)
        print("labs/ is not up to date: run `python scripts/build_labs.py` (and clear solution "
              "outputs)" + ("; it refuses while a lab holds changes, see TROUBLESHOOTING.md, "
                            "section 'Your changes to a lab'" if held else ""), file=sys.stderr)
        return 1
    if count:
        print(f"{count} lab(s) {'up to date' if args.check else 'built'} in {args.labs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
