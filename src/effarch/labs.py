"""The labs: generated from the solutions for the course, copied once more for each student.

Maintainers (``scripts/build_labs.py``, nbgrader's ClearSolutions, simplified):
``solutions/lab-2.4.N-<name>-solution.ipynb`` → ``labs/lab-2.4.N-<name>.ipynb``. In code cells
each region between a ``### BEGIN SOLUTION`` line and a ``### END SOLUTION`` line becomes one
``raise NotImplementedError(...)`` line at the BEGIN marker's indentation. A region must sit
inside a function, so the lab still runs end to end (its check cells report ⏭). Outputs and
execution counts are cleared, the kernelspec is set to ``python3``, a first markdown cell says
the lab is generated and names its source, and the notebook's metadata records a digest of the
cells written (``metadata.effarch.cells_sha256``). Malformed markers are an error naming the
file, the cell and the line. Output is deterministic, so ``--check`` compares bytes.

A generated lab whose cells no longer match that digest holds someone's work (edited cells,
outputs): building refuses to overwrite or delete it, and writes nothing.

Students (``effarch-lab``, which ``make lab`` runs): JupyterLab opens ``my-labs/``, the
student's own working copies of ``labs/``, made on first use. A lab updated later arrives as a
new copy beside the student's (``<lab>.updated-<date>.ipynb``), never over it; a copy the
student never changed is simply refreshed. ``my-labs/.effarch-copies.json`` records what was
delivered, so each update arrives once.
"""

from __future__ import annotations

import argparse
import ast
import copy
import datetime
import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # nbformat comes with the lab and dev extras; the copies need only json
    from nbformat import NotebookNode

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
STUB = 'raise NotImplementedError("Exercise: write this part — see the hint above.")'
SOLUTION_SUFFIX = "-solution.ipynb"
LAB_PATTERN = re.compile(r"^lab-[0-9.]+-[A-Za-z0-9_.-]+\.ipynb$")
MARKER_LIKE = re.compile(r"(BEGIN|END)\W*SOLUTION", re.IGNORECASE)
GENERATED_BY = "by `scripts/build_labs.py`"
KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
# per-run cell metadata that would make the generated file change without a source change
TRANSIENT_CELL_METADATA = ("execution", "ExecuteTime", "collapsed", "scrolled")
# what a student's work changes in a cell (notebook and cell metadata are Jupyter's bookkeeping)
CELL_CONTENT = ("cell_type", "source", "outputs", "execution_count", "attachments")
MY_LABS = "my-labs"
MANIFEST = ".effarch-copies.json"
SEE_CHANGES = "See TROUBLESHOOTING.md, section 'Your changes to a lab'."
SEE_STARTING = "See TROUBLESHOOTING.md, section 'Starting JupyterLab'."
SEE_BUILDING = "See TROUBLESHOOTING.md, section 'Building the labs'."


class MarkerError(ValueError):
    """Malformed solution markers; the message names the file, the cell and the line."""


class LabChangedError(RuntimeError):
    """Generated labs hold changes that building would overwrite; nothing was written."""


def course_root() -> Path:
    """The repository: ``solutions/``, ``labs/`` and the students' ``my-labs/`` sit in it."""
    try:  # the repository's root moves to effarch.paths; profile held it before
        from effarch.paths import repo_root
    except ImportError:
        from effarch.profile import repo_root
    return repo_root()


def lab_name(solution_name: str) -> str:
    """``lab-2.4.1-x-solution.ipynb`` → ``lab-2.4.1-x.ipynb``."""
    if not solution_name.endswith(SOLUTION_SUFFIX):
        raise ValueError(f"{solution_name} does not end with {SOLUTION_SUFFIX}. {SEE_BUILDING}")
    return solution_name[: -len(SOLUTION_SUFFIX)] + ".ipynb"


# ------------------------------------------------------------------ solutions → labs


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
                                  f"line {opened} is not closed). {SEE_BUILDING}")
            opened = n
            out.append(line[: len(line) - len(line.lstrip())] + STUB)
            stubs[len(out)] = n
        elif marker == END:
            if opened is None:
                raise MarkerError(f"{where} line {n}: {END!r} without a {BEGIN!r} before it. "
                                  f"{SEE_BUILDING}")
            opened = None
        elif MARKER_LIKE.search(line):
            raise MarkerError(f"{where} line {n}: {marker!r} looks like a solution marker; write "
                              f"exactly {BEGIN!r} or {END!r} on a line of its own. {SEE_BUILDING}")
        elif opened is None:
            out.append(line)
    if opened is not None:
        raise MarkerError(f"{where} line {opened}: {BEGIN!r} is never closed by {END!r} "
                          f"in the same cell. {SEE_BUILDING}")
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
                          f"a function whose signature stays visible. {SEE_BUILDING}")


def build_lab(nb: NotebookNode, source_name: str) -> NotebookNode:
    """The lab for one solution notebook; ``source_name`` (``solutions/<file>``) is named in the
    banner and in errors."""
    import nbformat

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
                                      f"cell; only code cells may hold exercise regions. "
                                      f"{SEE_BUILDING}")
        for key in TRANSIENT_CELL_METADATA:
            cell.metadata.pop(key, None)
    lab.nbformat, lab.nbformat_minor = 4, max(5, lab.get("nbformat_minor", 5))
    for index, cell in enumerate(lab.cells):
        cell.setdefault("id", f"cell-{index}")  # solutions older than nbformat 4.5 have none
    lab.cells.insert(0, _banner(source_name))
    lab.metadata.pop("widgets", None)  # saved widget state is an output
    lab.metadata["kernelspec"] = dict(KERNELSPEC)
    lab.metadata["effarch"] = nbformat.from_dict(
        {"generated_from": source_name, "cells_sha256": cells_digest(lab)})
    return lab


def _banner(source_name: str) -> NotebookNode:
    import nbformat

    text = (f"Generated from `{source_name}` {GENERATED_BY} — do not edit; edit the solution "
            "and rebuild.")
    digest = hashlib.sha1(source_name.encode()).hexdigest()[:8]
    return nbformat.v4.new_markdown_cell(f"> {text}", id=f"generated-{digest}")


def cells_digest(nb: dict) -> str:
    """SHA-256 of what a student's work changes: each cell's type, source, outputs, execution
    count and attachments, in order. Notebook and cell metadata (kernel info, collapsed, …) and
    cell ids are left out: Jupyter rewrites them without anyone changing the lab."""
    cells = [{key: _joined(cell.get(key)) for key in CELL_CONTENT} for cell in nb["cells"]]
    text = json.dumps(cells, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _joined(value: Any) -> Any:
    """Multi-line strings as one string, as nbformat reads them (files may store lists)."""
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return "".join(value)
    if isinstance(value, list):
        return [_joined(v) for v in value]
    if isinstance(value, dict):
        return {k: _joined(v) for k, v in value.items()}
    return value


def render(nb: NotebookNode) -> bytes:
    """nbformat's own JSON (1-space indent, sorted keys) with a trailing newline, as UTF-8."""
    import nbformat

    nbformat.validate(nb)
    text = nbformat.writes(nb)
    return (text if text.endswith("\n") else text + "\n").encode("utf-8")


def cells_with_outputs(nb: dict) -> list[int]:
    """Indices of code cells that carry outputs or an execution count."""
    return [i for i, c in enumerate(nb["cells"])
            if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count") is not None)]


def _read_json(data: bytes) -> dict | None:
    try:
        nb = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return nb if isinstance(nb, dict) and isinstance(nb.get("cells"), list) else None


def lab_changes(path: Path, replacement: bytes | None = None) -> str | None:
    """Why overwriting (or deleting) the generated lab at ``path`` would lose someone's work, or
    None when it would not: its cells still match the digest recorded when it was written, or
    match the ``replacement`` about to be written. A lab from before digests were recorded is
    compared with the version committed to git."""
    nb = _read_json(path.read_bytes())
    if nb is None:
        return "it is not a readable notebook (edited by hand?)"
    digest = cells_digest(nb)
    new = _read_json(replacement) if replacement is not None else None
    if new is not None and digest == cells_digest(new):
        return None
    record = (nb.get("metadata") or {}).get("effarch")
    recorded = record.get("cells_sha256") if isinstance(record, dict) else None
    if recorded is None:
        committed = _read_json(_committed(path) or b"")
        if committed is not None and cells_digest(committed) == digest:
            return None
    elif recorded == digest:
        return None
    if with_outputs := cells_with_outputs(nb):
        return f"it carries outputs (cells {', '.join(map(str, with_outputs[:5]))}" + \
            (", …)" if len(with_outputs) > 5 else ")")
    if recorded is None:
        return "it differs from the committed version and records no digest to compare with"
    return "its cells differ from what scripts/build_labs.py wrote (edited or added cells)"


def _committed(path: Path) -> bytes | None:
    """The file as committed at git's HEAD, or None (no git, not a repository, not tracked)."""
    try:
        top = subprocess.run(["git", "-C", str(path.parent), "rev-parse", "--show-toplevel"],
                             capture_output=True, text=True, check=True).stdout.strip()
        rel = path.resolve().relative_to(Path(top).resolve()).as_posix()
        return subprocess.run(["git", "-C", top, "show", f"HEAD:{rel}"],
                              capture_output=True, check=True).stdout
    except (OSError, ValueError, subprocess.CalledProcessError):
        return None


def build_all(solutions_dir: Path, labs_dir: Path, *, check: bool = False) -> list[str]:
    """Build every lab. With ``check``, write nothing and return the problems (empty: up to date);
    otherwise write the labs that changed and return what was done. Raises ``MarkerError`` or
    ``LabChangedError`` before writing anything."""
    import nbformat

    wanted, notes = {}, []
    for path in sorted(solutions_dir.glob("*" + SOLUTION_SUFFIX)):
        source_name = f"{solutions_dir.name}/{path.name}"
        nb = nbformat.read(path, as_version=4)
        if dirty := cells_with_outputs(nb):
            notes.append(f"solution carries outputs: {source_name} (cells "
                         f"{', '.join(map(str, dirty))}); clear them before committing")
        wanted[lab_name(path.name)] = render(build_lab(nb, source_name))
    show = f"{labs_dir.name}/{{}}".format
    changed = {name: (labs_dir / name).read_bytes() if (labs_dir / name).is_file() else None
               for name in wanted}
    changed = {name: data for name, data in changed.items() if data != wanted[name]}
    held = {name: why for name in changed if changed[name] is not None
            and (why := lab_changes(labs_dir / name, wanted[name]))}
    extra = _extra_labs(labs_dir, set(wanted))
    held |= {p.name: why for p, generated in extra if generated and (why := lab_changes(p))}
    if check:
        notes += [f"missing: {show(n)}" if data is None else
                  f"stale: {show(n)} differs from what its solution generates"
                  + (f", and holds changes: {held[n]}" if n in held else "")
                  for n, data in changed.items()]
        return notes + [f"extra: {show(p.name)} has no solution notebook" for p, _ in extra]
    if held:
        raise LabChangedError(_held_message(labs_dir, held))
    for name in changed:
        labs_dir.mkdir(parents=True, exist_ok=True)
        (labs_dir / name).write_bytes(wanted[name])
        notes.append(f"wrote {show(name)}")
    return notes + _remove_extra(extra, show)


def _held_message(labs_dir: Path, held: dict[str, str]) -> str:
    lines = [f"{labs_dir.name}/{name}: {why}" for name, why in sorted(held.items())]
    return ("refusing to overwrite generated labs that hold changes, so no work is lost "
            "(nothing was written):\n  " + "\n  ".join(lines) + "\nKeep that work elsewhere "
            f"(students: `make lab` gives you copies in {MY_LABS}/; copy a notebook there), then "
            f"restore the lab (`git checkout -- {labs_dir.name}/<file>`, or delete it) and build "
            "again. " + SEE_CHANGES)


def _extra_labs(labs_dir: Path, wanted: set[str]) -> list[tuple[Path, bool]]:
    """Labs without a solution, each with whether this script generated it."""
    if not labs_dir.is_dir():
        return []
    extra = sorted(p for p in labs_dir.glob("*.ipynb") if p.name not in wanted)
    return [(p, bool(LAB_PATTERN.match(p.name)) and GENERATED_BY in p.read_text("utf-8"))
            for p in extra]


def _remove_extra(extra: list[tuple[Path, bool]], show: Callable[[str], str]) -> list[str]:
    """Generated labs whose solution is gone are removed; others are reported and kept."""
    notes = []
    for path, generated in extra:
        if generated:
            path.unlink()
            notes.append(f"removed {show(path.name)} (its solution notebook is gone)")
        else:
            notes.append(f"left alone: {show(path.name)} has no solution notebook and was not "
                         "generated by this script; move it to solutions/ or delete it")
    return notes


# ------------------------------------------------------------------ labs → my-labs


def working_copies(labs_dir: Path, work_dir: Path, *,
                   today: datetime.date | None = None) -> list[str]:
    """Bring the student's copies in ``work_dir`` up to date with ``labs_dir``; return what was
    done, one line each. Never overwrites a copy the student changed: an updated lab then
    arrives as a new file beside it. Files that are not labs' copies are never touched."""
    work_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = work_dir / MANIFEST
    manifest = _read_manifest(manifest_path)
    stamp = (today or datetime.date.today()).isoformat()
    notes = []
    for lab in sorted(labs_dir.glob("*.ipynb")):
        data = lab.read_bytes()
        entry = manifest.get(lab.name)
        if entry and entry["sha256"] == _sha(data) and (work_dir / entry["copy"]).is_file():
            continue  # delivered already, and the copy is there
        name, note = _place_copy(lab.name, data, work_dir, entry, stamp)
        target = work_dir / name  # a new name, or a copy that holds nothing of the student's
        if not (target.is_file() and target.read_bytes() == data):
            target.write_bytes(data)
        manifest[lab.name] = {"copy": name, "sha256": _sha(data), "cells_sha256": _digest(data)}
        if note:
            notes.append(note)
    _write_manifest(manifest_path, manifest)
    return notes


def _place_copy(lab: str, data: bytes, work_dir: Path, entry: dict | None,
                stamp: str) -> tuple[str, str | None]:
    """Where a lab's (new) version goes in ``work_dir``, and the note to print."""
    shown = f"{work_dir.name}/{{}}".format
    current = work_dir / (entry["copy"] if entry else lab)
    if not current.exists():
        name = lab if entry is None or not (work_dir / lab).exists() else _fresh(lab, work_dir, stamp)
        return name, f"copied labs/{lab} → {shown(name)}"
    if current.is_file() and current.read_bytes() == data:
        return current.name, None  # already identical (e.g. a lost manifest)
    if entry and current.is_file() and _digest(current.read_bytes()) == entry["cells_sha256"]:
        return current.name, f"updated {shown(current.name)} (labs/{lab} changed; you had not " \
            "changed your copy)"
    name = _fresh(lab, work_dir, stamp)
    return name, (f"labs/{lab} was updated: the new version is {shown(name)}; your copy "
                  f"{shown(current.name)} keeps your work")


def _fresh(lab: str, work_dir: Path, stamp: str) -> str:
    """``lab-2.4.1-x.updated-2026-12-02.ipynb``, with ``-2``, ``-3`` … if that exists."""
    stem = lab[: -len(".ipynb")]
    for n in range(1, 1000):
        name = f"{stem}.updated-{stamp}{'' if n == 1 else f'-{n}'}.ipynb"
        if not (work_dir / name).exists():
            return name
    raise FileExistsError(f"{work_dir}: too many updated copies of {lab}; remove some. "
                          f"{SEE_CHANGES}")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _digest(data: bytes) -> str | None:
    nb = _read_json(data)
    return cells_digest(nb) if nb is not None else None


def _read_manifest(path: Path) -> dict:
    try:
        labs = json.loads(path.read_text("utf-8")).get("labs", {})
    except (OSError, ValueError, AttributeError):
        return {}  # none yet, or unreadable: copies are then compared with labs/ afresh
    return {k: v for k, v in labs.items()
            if isinstance(v, dict) and {"copy", "sha256", "cells_sha256"} <= v.keys()}


def _write_manifest(path: Path, manifest: dict) -> None:
    text = json.dumps({"about": "what `make lab` copied from labs/; do not edit",
                       "labs": manifest}, indent=1, sort_keys=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    tmp.replace(path)


# ------------------------------------------------------------------ starting JupyterLab


def jupyter_args(extra: Sequence[str], *, port: int, root_dir: Path,
                 is_root: bool) -> list[str]:
    """The ``jupyter lab`` arguments for the student's copies. ``extra`` passes through;
    a port given there wins, ``--allow-root`` is added as root, and a token-less server is
    refused (``ValueError``)."""
    for arg in extra:
        key, _, value = arg.partition("=")
        if key.startswith("--") and key.endswith(".token") and value in ("", "''", '""'):
            raise ValueError(f"{arg}: the course never starts JupyterLab without a token "
                             "(anyone who reaches the port could run code as you). "
                             + SEE_STARTING)
    args = [f"--ServerApp.root_dir={root_dir}"]
    if not any(a.split("=")[0] in ("--port", "--ServerApp.port") for a in extra):
        args.append(f"--port={port}")
    if is_root and "--allow-root" not in extra:
        args.append("--allow-root")  # containers run as root; Jupyter refuses root without it
    return args + list(extra)


def _listens_beyond_loopback(args: Sequence[str]) -> str | None:
    for i, arg in enumerate(args):
        key, eq, value = arg.partition("=")
        if key in ("--ip", "--ServerApp.ip"):
            value = value if eq else (args[i + 1] if i + 1 < len(args) else "")
            if value not in ("127.0.0.1", "localhost", "::1"):
                return value
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """``effarch-lab``: refresh the student's copies, then run JupyterLab on them."""
    parser = argparse.ArgumentParser(
        prog="effarch-lab", description="Copy labs/ into your own folder (first use; updates "
        "arrive as new copies) and start JupyterLab there. Other options go to `jupyter lab`.")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", 8888)),
                        help="port on this machine (default: $PORT or 8888)")
    parser.add_argument("--dir", type=Path, default=None,
                        help=f"your working copies (default: the repository's {MY_LABS}/)")
    parser.add_argument("--copy-only", action="store_true", help="copy, do not start JupyterLab")
    args, extra = parser.parse_known_args(argv)
    root = course_root()
    work = args.dir or root / MY_LABS
    for note in working_copies(root / "labs", work):
        print(note)
    print(f"your labs: {work} (yours to edit; `make lab` never overwrites them)")
    if args.copy_only:
        return 0
    try:
        lab_args = jupyter_args(extra, port=args.port, root_dir=work,
                                is_root=hasattr(os, "geteuid") and os.geteuid() == 0)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return _exec_jupyter(lab_args)


def _exec_jupyter(lab_args: list[str]) -> int:
    import importlib.util

    if importlib.util.find_spec("jupyterlab") is None:
        print("error: JupyterLab is not installed in this environment. Install the lab extra: "
              "`pip install -e '.[lab]'` (`make lab` does). "
              + SEE_STARTING, file=sys.stderr)
        return 2
    if ip := _listens_beyond_loopback(lab_args):
        print(f"note: JupyterLab will listen on {ip}, beyond this machine's loopback; inside a "
              "container that is what the 127.0.0.1 port mapping needs, elsewhere prefer an SSH "
              "tunnel (README, 'Reaching JupyterLab from another machine').")
    print("JupyterLab starts below. Open the address it prints that begins with "
          "http://127.0.0.1 and ends with ?token=… (the token is your password).", flush=True)
    command = [sys.executable, "-m", "jupyterlab", *lab_args]
    os.execv(sys.executable, command)
    return 0  # not reached: execv replaces this process


if __name__ == "__main__":
    sys.exit(main())
