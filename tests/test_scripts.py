"""scripts/ holds command-line programs only: what a script and a lab share lives in effarch."""

from __future__ import annotations

import re

from effarch import paths

# Editing the import path, or loading a file as a module, makes a script a library in disguise.
FORBIDDEN = ("sys.path", "spec_from_file_location", "SourceFileLoader", "runpy")


def test_no_script_edits_sys_path_or_loads_a_script_by_path():
    scripts = sorted((paths.repo_root() / "scripts").glob("*.py"))
    assert len(scripts) > 5
    found = [f"{path.name}:{i}: {needle}"
             for path in scripts
             for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             for needle in FORBIDDEN if needle in line]
    assert not found, "scripts must import effarch, not each other: " + "; ".join(found)


def test_no_script_imports_another_script():
    names = {p.stem for p in (paths.repo_root() / "scripts").glob("*.py")}
    found = [f"{path.name}: {m.group(0)}"
             for path in (paths.repo_root() / "scripts").glob("*.py")
             for m in re.finditer(r"^\s*(?:from|import)\s+(\w+)", path.read_text(), re.M)
             if m.group(1) in names or m.group(1) == "scripts"]
    assert not found, found
