"""Generate the student labs from the solution notebooks (nbgrader's ClearSolutions, simplified).

``solutions/lab-2.4.N-<name>-solution.ipynb`` → ``labs/lab-2.4.N-<name>.ipynb``: in code cells
each region between a ``### BEGIN SOLUTION`` line and a ``### END SOLUTION`` line becomes one
``raise NotImplementedError(...)`` line at the BEGIN marker's indentation. A region must sit
inside a function, so the lab still runs end to end (its check cells report ⏭). Outputs and
execution counts are cleared, the kernelspec is set to ``python3`` and a first markdown cell says
the lab is generated and names its source. Malformed markers are an error naming the file, the
cell and the line. Output is deterministic, so ``--check`` compares bytes.

    python scripts/build_labs.py           # write labs/; remove generated labs whose solution is gone
    python scripts/build_labs.py --check   # write nothing; exit 1 if labs/ is stale or a solution
                                           # notebook carries outputs
"""

from __future__ import annotations

import argparse
import ast
import copy
import hashlib
import re
import sys
from collections.abc import Callable
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
STUB = 'raise NotImplementedError("Exercise: write this part — see the hint above.")'
SOLUTION_SUFFIX = "-solution.ipynb"
LAB_PATTERN = re.compile(r"^lab-[0-9.]+-[A-Za-z0-9_.-]+\.ipynb$")
MARKER_LIKE = re.compile(r"(BEGIN|END)\W*SOLUTION", re.IGNORECASE)
GENERATED_BY = "by `scripts/build_labs.py`"
KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
# per-run cell metadata that would make the generated file change without a source change
TRANSIENT_CELL_METADATA = ("execution", "ExecuteTime", "collapsed", "scrolled")


class MarkerError(ValueError):
    """Malformed solution markers; the message names the file, the cell and the line."""


def lab_name(solution_name: str) -> str:
    """``lab-2.4.1-x-solution.ipynb`` → ``lab-2.4.1-x.ipynb``."""
    if not solution_name.endswith(SOLUTION_SUFFIX):
        raise ValueError(f"{solution_name} does not end with {SOLUTION_SUFFIX}")
    return solution_name[: -len(SOLUTION_SUFFIX)] + ".ipynb"


def strip_solutions(source: str, where: str) -> str:
    """Replace each marked region of one code cell's source by the stub; ``where`` names the cell."""
    lines, out = source.split("\n"), []
    opened: int | None = None  # 1-based line of the open BEGIN marker
    stubs: dict[int, int] = {}  # the stub's line in the lab's cell → its BEGIN line
    for n, line in enumerate(lines, 1):
        marker = line.strip()
        if marker == BEGIN:
            if opened is not None:
                raise MarkerError(f"{where} line {n}: nested {BEGIN!r} (the region opened at "
                                  f"line {opened} is not closed)")
            opened = n
            out.append(line[: len(line) - len(line.lstrip())] + STUB)
            stubs[len(out)] = n
        elif marker == END:
            if opened is None:
                raise MarkerError(f"{where} line {n}: {END!r} without a {BEGIN!r} before it")
            opened = None
        elif MARKER_LIKE.search(line):
            raise MarkerError(f"{where} line {n}: {marker!r} looks like a solution marker; write "
                              f"exactly {BEGIN!r} or {END!r} on a line of its own")
        elif opened is None:
            out.append(line)
    if opened is not None:
        raise MarkerError(f"{where} line {opened}: {BEGIN!r} is never closed by {END!r} "
                          "in the same cell")
    result = "\n".join(out)
    _require_inside_function(result, stubs, where)
    return result


def _require_inside_function(source: str, stubs: dict[int, int], where: str) -> None:
    """A stub outside a function would stop the unsolved lab when the cell runs."""
    if not stubs:
        return
    # IPython magics and shell lines are not Python; blank them, keeping the line numbers
    code = "\n".join("" if ln.lstrip().startswith(("%", "!")) else ln for ln in source.split("\n"))
    try:
        tree = ast.parse(code)
    except SyntaxError:
        outside = [n for n in stubs if not source.split("\n")[n - 1].startswith((" ", "\t"))]
    else:
        spans = [(f.lineno, f.end_lineno or f.lineno) for f in ast.walk(tree)
                 if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))]
        outside = [n for n in stubs if not any(a <= n <= b for a, b in spans)]
    if outside:
        raise MarkerError(f"{where} line {stubs[outside[0]]}: the solution region is not inside "
                          "a function, so the unsolved lab would stop there; put the exercise in "
                          "a function whose signature stays visible")


def build_lab(nb: nbformat.NotebookNode, source_name: str) -> nbformat.NotebookNode:
    """The lab for one solution notebook; ``source_name`` (``solutions/<file>``) is named in the
    banner and in errors."""
    lab = copy.deepcopy(nb)
    for index, cell in enumerate(lab.cells):
        where = f"{source_name}: cell {index}" + (f" (id {cell['id']})" if cell.get("id") else "")
        if cell.cell_type == "code":
            cell.source = strip_solutions(cell.source, where)
            cell.outputs, cell.execution_count = [], None
        else:
            for n, line in enumerate(cell.source.split("\n"), 1):
                if MARKER_LIKE.search(line):
                    raise MarkerError(f"{where} line {n}: solution marker in a {cell.cell_type} "
                                      "cell; only code cells may hold exercise regions")
        for key in TRANSIENT_CELL_METADATA:
            cell.metadata.pop(key, None)
    lab.nbformat, lab.nbformat_minor = 4, max(5, lab.get("nbformat_minor", 5))
    for index, cell in enumerate(lab.cells):
        cell.setdefault("id", f"cell-{index}")  # solutions older than nbformat 4.5 have none
    lab.cells.insert(0, _banner(source_name))
    lab.metadata.pop("widgets", None)  # saved widget state is an output
    lab.metadata["kernelspec"] = dict(KERNELSPEC)
    return lab


def _banner(source_name: str) -> nbformat.NotebookNode:
    text = (f"Generated from `{source_name}` {GENERATED_BY} — do not edit; edit the solution "
            "and rebuild.")
    digest = hashlib.sha1(source_name.encode()).hexdigest()[:8]
    return nbformat.v4.new_markdown_cell(f"> {text}", id=f"generated-{digest}")


def render(nb: nbformat.NotebookNode) -> bytes:
    """nbformat's own JSON (1-space indent, sorted keys) with a trailing newline, as UTF-8."""
    nbformat.validate(nb)
    text = nbformat.writes(nb)
    return (text if text.endswith("\n") else text + "\n").encode("utf-8")


def cells_with_outputs(nb: nbformat.NotebookNode) -> list[int]:
    """Indices of code cells that carry outputs or an execution count."""
    return [i for i, c in enumerate(nb.cells)
            if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)]


def build_all(solutions_dir: Path, labs_dir: Path, *, check: bool = False) -> list[str]:
    """Build every lab. With ``check``, write nothing and return the problems (empty: up to date);
    otherwise write the labs that changed and return what was done. Raises ``MarkerError``
    before writing anything."""
    wanted, notes = {}, []
    for path in sorted(solutions_dir.glob("*" + SOLUTION_SUFFIX)):
        source_name = f"{solutions_dir.name}/{path.name}"
        nb = nbformat.read(path, as_version=4)
        if dirty := cells_with_outputs(nb):
            notes.append(f"solution carries outputs: {source_name} (cells "
                         f"{', '.join(map(str, dirty))}); clear them before committing")
        wanted[lab_name(path.name)] = render(build_lab(nb, source_name))
    show = f"{labs_dir.name}/{{}}".format
    for name, data in wanted.items():
        target = labs_dir / name
        current = target.read_bytes() if target.is_file() else None
        if current == data:
            continue
        if check:
            notes.append(f"missing: {show(name)}" if current is None else
                         f"stale: {show(name)} differs from what its solution generates")
        else:
            labs_dir.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            notes.append(f"wrote {show(name)}")
    return notes + _extra_labs(labs_dir, set(wanted), check, show)


def _extra_labs(labs_dir: Path, wanted: set[str], check: bool,
                show: Callable[[str], str]) -> list[str]:
    """Labs without a solution: generated ones are removed (unless ``check``), others reported."""
    notes = []
    extra = sorted(p for p in labs_dir.glob("*.ipynb") if p.name not in wanted) \
        if labs_dir.is_dir() else []
    for path in extra:
        generated = LAB_PATTERN.match(path.name) and GENERATED_BY in path.read_text("utf-8")
        if check:
            notes.append(f"extra: {show(path.name)} has no solution notebook")
        elif generated:
            path.unlink()
            notes.append(f"removed {show(path.name)} (its solution notebook is gone)")
        else:
            notes.append(f"left alone: {show(path.name)} has no solution notebook and was not "
                         "generated by this script; move it to solutions/ or delete it")
    return notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate labs/ from solutions/.")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if labs/ is stale or a solution has outputs")
    parser.add_argument("--solutions", type=Path, default=ROOT / "solutions",
                        help="solution notebooks (default: the repository's solutions/)")
    parser.add_argument("--labs", type=Path, default=ROOT / "labs",
                        help="generated labs (default: the repository's labs/)")
    args = parser.parse_args(argv)
    if not args.solutions.is_dir():
        print(f"error: {args.solutions} is not a folder", file=sys.stderr)
        return 2
    try:
        notes = build_all(args.solutions, args.labs, check=args.check)
    except MarkerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    count = len(list(args.solutions.glob("*" + SOLUTION_SUFFIX)))
    for note in notes:
        print(note)
    if count == 0:
        print(f"no solution notebooks (*{SOLUTION_SUFFIX}) in {args.solutions}: nothing to build")
    if args.check and notes:
        print("labs/ is not up to date: run `python scripts/build_labs.py` (and clear solution "
              "outputs)", file=sys.stderr)
        return 1
    if count:
        print(f"{count} lab(s) {'up to date' if args.check else 'built'} in {args.labs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
