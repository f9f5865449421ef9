"""The documents the errors point to, and the generated tables, stay true."""

import ast
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTION = re.compile(r"(?:section|TROUBLE\}|SEE_BUILDING\}?) '([^']+)'")
# Adjacent string literals ("… section " "'Title'."), joined before SECTION reads them.
ADJACENT = re.compile(r"""(["'])\s*\n?\s*f?\1""")


def _python_sources() -> list[Path]:
    return [*ROOT.joinpath("src").rglob("*.py"), *ROOT.joinpath("scripts").glob("*.py")]


def _headings() -> set[str]:
    return set(re.findall(r"^## (.+)$", (ROOT / "TROUBLESHOOTING.md").read_text(), re.M))


def _referenced_sections() -> set[str]:
    found = set()
    for path in _python_sources():
        found |= set(SECTION.findall(ADJACENT.sub("", path.read_text())))
    return found


def test_every_referenced_troubleshooting_section_exists():
    referenced = _referenced_sections()
    assert referenced, "no references found: the pattern is broken"
    assert referenced <= _headings(), referenced - _headings()


# Raises that name no section, each with the reason. Keyed by (file, enclosing function); every
# other `raise` of a new exception in src/effarch and scripts/ must name a TROUBLESHOOTING.md
# section, directly or through a helper that test_error_helpers_name_a_section runs.
NO_SECTION = {
    ("scripts/bench_before_after.py", "one"): "internal: prints the worker's own output",
    ("scripts/probe_quantization.py", "forward_ms"): "a measurement's outcome, kept as such",
    ("scripts/train_zoo.py", "check_reload"): "internal invariant: the file this run just wrote",
    ("scripts/lab_prep_tables.py", "lab246_step_peaks"): "internal invariant: a kept log the repository ships",
    ("scripts/eval_zoo.py", "evaluate_all"): "re-raises zoo.model_names' message, which names one",
    ("scripts/train_zoo.py", "main"): "re-raises zoo.model_names' message, which names one",
    ("src/effarch/checks.py", "check_function"): "a check written without cases: a course bug",
    ("src/effarch/checks.py", "check_topk_route"): "a check's own precondition: a course bug",
    ("src/effarch/checks.py", "_finish"): "strict mode: the result's text names the section",
    ("src/effarch/checks.py", "FakeDecoder.prefill"): "shown inside the check's ❌ report",
    ("src/effarch/checks.py", "FakeDecoder.step"): "shown inside the check's ❌ report",
    ("src/effarch/finetune.py", "interrupt_at.InterruptAt.on_step_end"): "the interruption asked for",
}
# Helpers whose messages carry the section (run by test_error_helpers_name_a_section).
SECTION_HELPERS = ("_missing(", "offline_error(", "_held_message(", "qlora_unavailable(", "{fix}",
                   "(reason)")


# A raise names a section by its title in quotes after TROUBLE ("{TROUBLE} 'Title'") or
# "section 'Title'", or through a constant that holds one (TROUBLE_X, SEE_X, X_HELP).
NAMED = re.compile(r"TROUBLE\}?\s*'[^']+'|section '[^']+'|\bTROUBLE_\w+|\bSEE_\w+|\b\w*_HELP\b")
ADJACENT = re.compile(r"[\"']\s*\n\s*[rbfuRBFU]*[\"']")  # "…" "…" across a line: one string


def _names_a_section(text: str) -> bool:
    joined = ADJACENT.sub("", text)
    return bool(NAMED.search(joined)) or any(h in text for h in SECTION_HELPERS)


def _bare_raises(node, source: str, scope: list[str]):
    """(enclosing function, line) of each `raise <new exception>` under ``node`` that names no
    section."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield from _bare_raises(child, source, [*scope, child.name])
            continue
        if isinstance(child, ast.Raise) and child.exc is not None \
                and not _names_a_section(ast.get_source_segment(source, child)):
            yield ".".join(scope), child.lineno
        yield from _bare_raises(child, source, scope)


def _raises_without_section() -> dict[tuple[str, str], list[int]]:
    found: dict[tuple[str, str], list[int]] = {}
    for path in _python_sources():
        source = path.read_text()
        for scope, line in _bare_raises(ast.parse(source), source, []):
            found.setdefault((path.relative_to(ROOT).as_posix(), scope), []).append(line)
    return found


def test_every_user_fixable_raise_names_a_section():
    found = _raises_without_section()
    new = {f"{f}:{lines} in {fn or '<module>'}" for (f, fn), lines in found.items()
           if (f, fn) not in NO_SECTION}
    assert not new, ("raises that name no TROUBLESHOOTING.md section (add one, or list the "
                     "raise in NO_SECTION with the reason): " + "; ".join(sorted(new)))
    stale = sorted(set(NO_SECTION) - set(found))
    assert not stale, f"NO_SECTION lists raises that no longer exist or now name one: {stale}"


def test_error_helpers_name_a_section(monkeypatch):
    from effarch import checks, data, finetune, labs, registry

    messages = [str(data._missing("x is missing", "python scripts/build_corpus.py")),
                str(registry.offline_error(registry.get_spec("mamba-130m"))),
                labs._held_message(ROOT / "labs", {"lab-2.4.1-x.ipynb": "it carries outputs"})]
    for target in ("out_proj", "dt_proj", "nothing"):
        try:
            finetune.validate_targets([target])
        except finetune.FinetuneError as exc:
            messages.append(str(exc))
    monkeypatch.setattr(finetune.torch.cuda, "is_available", lambda: False)
    messages.append(finetune.qlora_unavailable())
    monkeypatch.setenv("EFFARCH_STRICT", "1")
    try:
        checks.check_value("helpers_test", 1, 2)
    except checks.CheckFailed as exc:
        messages.append(str(exc))
    finally:
        checks.reset()
    assert len(messages) == 8
    headings = _headings()
    for message in messages:
        sections = SECTION.findall(message)
        assert sections and set(sections) <= headings, message


def _document_texts() -> dict[str, str]:
    """The top-level documents and every notebook's cells, whitespace folded to one space."""
    texts = {p.name: p.read_text(encoding="utf-8") for p in ROOT.glob("*.md")}
    for nb in [*ROOT.glob("labs/*.ipynb"), *ROOT.glob("solutions/*.ipynb")]:
        cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
        texts[nb.relative_to(ROOT).as_posix()] = "\n".join("".join(c["source"]) for c in cells)
    return {name: re.sub(r"\s+", " ", text) for name, text in texts.items()}


# `TROUBLESHOOTING.md, "Mamba is slow"`, `ELI5.md, section "Hybrids"` or `X.md, "A" and "B"`:
# sections of a document, cited by their headings.
_TITLE = r"[\"'“][A-Za-z][^\"'”]*[\"'”]"
DOC_SECTION = re.compile(rf"\b([A-Z][A-Z0-9_]+\.md), (?:sections? )?({_TITLE}(?:(?:,? and |, | or ){_TITLE})*)")


def _cited_sections(text: str) -> list[tuple[str, str]]:
    return [(doc, title[1:-1]) for doc, titles in DOC_SECTION.findall(text)
            for title in re.findall(_TITLE, titles)]


def test_documents_cite_existing_sections():
    """A section of a top-level document cited by name (in a document or a notebook) exists
    there, as a heading of any level."""
    cited = {(name, doc, s) for name, text in _document_texts().items()
             for doc, s in _cited_sections(text)}
    assert {doc for _, doc, _ in cited} >= {"TROUBLESHOOTING.md", "ELI5.md"}, cited
    missing = []
    for name, doc, section in sorted(cited):
        path = ROOT / doc
        headings = set(re.findall(r"^#+ (.+)$", path.read_text(), re.M)) if path.is_file() else ()
        if section not in headings:
            missing.append(f"{name} cites {doc}, {section!r}")
    assert not missing, missing


def test_generated_blocks_are_all_written_by_the_generator():
    """Every `BEGIN GENERATED` block of a top-level document is one scripts/lab_prep_tables.py
    writes (so none is typed by hand and left stale), and each has its END marker."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import lab_prep_tables
    finally:
        sys.path.pop(0)
    written = lab_prep_tables.documents()
    for path in ROOT.glob("*.md"):
        text = path.read_text(encoding="utf-8")
        names = re.findall(r"^<!-- BEGIN GENERATED: (.+?) -->$", text, re.M)
        assert len(names) == len(re.findall(r"^<!-- END GENERATED: .+ -->$", text, re.M)), path.name
        if names:
            assert path in written, f"{path.name} has generated blocks the generator ignores"
            assert written[path] == text, f"{path.name} is stale: run scripts/lab_prep_tables.py"
    assert {p.name for p in written} >= {"README.md", "LAB_PREP.md", "QUICK_REFERENCE.md",
                                          "ELI5.md"}


# `module.function(...)` in a document: the function must exist in effarch and take the keyword
# arguments written (a document's call is a promise of an API).
MODULES = ("backends", "bench", "checks", "compare", "data", "decoding", "doctor", "fast",
           "finetune", "hooks", "memory", "models", "moe", "paths", "plots", "profile",
           "quality", "recall", "registry", "runs", "ssm", "zoo")
API_CALL = re.compile(r"(?<![\w.])(?:effarch\.)?(" + "|".join(MODULES) + r")\.([A-Za-z_]\w*)"
                      r"(\((?:[^()]|\([^()]*\))*\))?")
API_DOCUMENTS = ("QUICKSTART.md", "STUDY_GUIDE.md", "QUICK_REFERENCE.md", "ELI5.md",
                 "TROUBLESHOOTING.md", "README.md", "LAB_PREP.md")


def _arguments(call: str) -> tuple[int, list[str]]:
    """How many positional arguments a written call passes, and its keywords (``...`` and
    ``…`` stand for elided arguments and count as neither)."""
    inner = call[1:-1]
    depth, parts, cur = 0, [], ""
    for ch in inner:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    parts = [p.strip() for p in parts if p.strip() not in ("", "...", "…")]
    keywords = [m.group(1) for p in parts if (m := re.match(r"(\w+)\s*=(?!=)", p))]
    positional = [p for p in parts if not re.match(r"\w+\s*=(?!=)", p) and not
                  p.startswith("*")]
    return len(positional), keywords


def test_effarch_calls_in_documents_exist():
    import importlib

    problems, seen = [], 0
    for doc in API_DOCUMENTS:
        text = (ROOT / doc).read_text(encoding="utf-8")
        for code in re.findall(r"`([^`]+)`", text):
            for mod, name, call in API_CALL.findall(code):
                seen += 1
                obj = getattr(importlib.import_module(f"effarch.{mod}"), name, None)
                if obj is None:
                    problems.append(f"{doc}: effarch.{mod}.{name} does not exist")
                    continue
                if not call or not callable(obj):
                    continue
                try:
                    params = inspect.signature(obj).parameters
                except (TypeError, ValueError):
                    continue
                n_positional, keywords = _arguments(call)
                kinds = {p.kind for p in params.values()}
                takes = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                            for p in params.values())
                if inspect.Parameter.VAR_POSITIONAL not in kinds and n_positional > takes:
                    problems.append(f"{doc}: {mod}.{name} takes {takes} positional arguments, "
                                    f"{n_positional} written")
                if inspect.Parameter.VAR_KEYWORD in kinds:
                    continue
                problems += [f"{doc}: {mod}.{name} takes no argument {kw!r}"
                             for kw in keywords if kw not in params]
    assert seen, "no calls found: the pattern is broken"
    assert not problems, problems


def test_lab_prep_table_is_generated_and_current():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "lab_prep_tables.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_readme_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    cmds = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert cmds == ["make lab", "make test"]


def test_labs_are_generated_from_the_solutions():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_labs.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_notebook_environment(monkeypatch):
    from effarch import testing

    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    sol = testing.notebook_env(ROOT / "solutions" / "x-solution.ipynb")
    lab = testing.notebook_env(ROOT / "labs" / "x.ipynb")
    assert sol["EFFARCH_STRICT"] == "1" and lab["EFFARCH_STRICT"] == "0"
    assert sol["EFFARCH_PROFILE"] == lab["EFFARCH_PROFILE"] == "tiny"
    assert sol["HF_HUB_OFFLINE"] == "1" and int(sol["OMP_NUM_THREADS"]) >= 1


def test_notebook_environment_is_restored_after_the_notebook(monkeypatch):
    from types import SimpleNamespace

    from effarch import testing

    monkeypatch.delenv("EFFARCH_STRICT", raising=False)
    monkeypatch.setenv("EFFARCH_PROFILE", "auto")
    item = SimpleNamespace(fspath=ROOT / "solutions" / "x-solution.ipynb")
    testing.pytest_runtest_setup(item)
    assert os.environ["EFFARCH_STRICT"] == "1" and os.environ["EFFARCH_PROFILE"] == "tiny"
    testing.pytest_runtest_teardown(item)
    assert "EFFARCH_STRICT" not in os.environ and os.environ["EFFARCH_PROFILE"] == "auto"


def test_run_notebook_executes_code_cells_in_order(tmp_path):
    nb = {"cells": [{"cell_type": "markdown", "source": ["# t"]},
                    {"cell_type": "code", "source": ["x = 2\n"]},
                    {"cell_type": "code", "source": ["print('x is', x * 21)"]},
                    {"cell_type": "code", "source": ["y = x + 1\n", "y * 1000"]},
                    {"cell_type": "code", "source": ["y * 7;"]},
                    {"cell_type": "code", "source": ["import os\n", "os.getcwd()"]}],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    (tmp_path / "nb").mkdir()
    (tmp_path / "nb" / "t.ipynb").write_text(__import__("json").dumps(nb))
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_notebook.py"), "nb/t.ipynb"],
                       capture_output=True, text=True, cwd=tmp_path)  # a relative path
    assert r.returncode == 0, r.stderr
    assert "x is 42" in r.stdout and "--- cell 2" in r.stdout
    lines = r.stdout.splitlines()
    assert "3000" in lines and "21" not in lines  # a last expression shows; `;` hides it
    assert str(tmp_path / "nb") in r.stdout  # runs in the notebook's folder, as Jupyter does


# A path in the repository's own folders, or a file at its top level, named in a file.
REFERENCE = re.compile(r"(?<![\w./-])((?:\.ci|data|labs|scripts|solutions|src|tests)/[\w./-]*"
                       r"|[A-Z][A-Z_]+\.md|LICENSE|constraints\.txt|docker-compose\.yml"
                       r"|pyproject\.toml)(.?)")
TOP_LEVEL_ONLY = re.compile(r"[A-Z][A-Z_]+\.md|LICENSE|constraints\.txt|docker-compose\.yml"
                            r"|pyproject\.toml")
# Files the project's own notes (outside the repository) are cited from; each entry goes when
# its file stops citing it (the test below says so).
KNOWN_MISSING: set[tuple[str, str]] = set()


def _tracked_text_files() -> list[str]:
    r = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        import pytest

        pytest.skip("not a git checkout")
    keep = (".md", ".py", ".toml", ".yml", ".yaml", ".json", ".ipynb", ".txt")
    return [f for f in r.stdout.split() if f.endswith(keep) or f in ("Makefile", ".ci/run")]


def _missing_references() -> set[tuple[str, str]]:
    missing = set()
    for name in _tracked_text_files():
        if name == "tests/test_docs.py":
            continue  # KNOWN_MISSING names them
        if name.startswith("data/") and not name.endswith((".md", ".json")):
            continue  # the corpus and measurements quote other projects' paths
        for match in REFERENCE.finditer((ROOT / name).read_text(encoding="utf-8")):
            ref, after = match.group(1).rstrip("."), match.group(2)
            if after and after in "{*…<":
                continue  # a pattern (lab-2.4.{1,2}-…, *.ipynb), not one file
            if name.startswith("tests/") and not TOP_LEVEL_ONLY.fullmatch(ref):
                continue  # tests name files they make in temporary folders
            if not (ROOT / ref).exists():
                missing.add((name, ref))
    return missing


def test_no_reference_to_a_file_the_repository_does_not_have():
    missing = _missing_references()
    new = sorted(missing - KNOWN_MISSING)
    assert not new, "referenced but not in the repository: " + "; ".join(
        f"{f} names {ref}" for f, ref in new)
    fixed = sorted(KNOWN_MISSING - missing)
    assert not fixed, f"no longer referenced, remove from KNOWN_MISSING: {fixed}"


def test_a_raise_names_a_section_only_with_its_title():
    assert _names_a_section('''raise ValueError(f"bad. {TROUBLE} 'Fast path arguments'.")''')
    assert _names_a_section('''raise X("bad. See TROUBLESHOOTING.md, section "\n    "'Scan shapes'.")''')
    assert _names_a_section("raise TypeError('no mixer. ' + TROUBLE_TRAINING)")
    assert not _names_a_section('''raise ValueError(f"bad. {TROUBLE}.")''')  # no title
    assert not _names_a_section('''raise ValueError("see TROUBLESHOOTING.md")''')
