"""The install rules the README's commands rely on: a light core that every module imports with,
extras for each kind of user, tested versions in constraints.txt, the licence, the Makefile's
choices, and a compose file that publishes JupyterLab on the host's 127.0.0.1 only."""

from __future__ import annotations

import ast
import functools
import json
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml itself")

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
CORE = {"torch", "transformers", "accelerate", "safetensors", "tokenizers", "huggingface-hub",
        "numpy", "pandas", "matplotlib", "psutil", "tqdm", "mambapy"}
NOT_PINNED = {"torch", "triton"}  # an NGC container's own; triton's version follows torch's


def _reqs(items: list[str]) -> dict[str, Requirement]:
    return {canonicalize_name(Requirement(r).name): Requirement(r) for r in items}


def _deps() -> dict[str, Requirement]:
    return _reqs(PROJECT["dependencies"])


def _extra(name: str) -> dict[str, Requirement]:
    return _reqs(PROJECT["optional-dependencies"][name])


def test_torch_has_a_lower_bound_only_and_admits_an_ngc_build():
    torch = _deps()["torch"]
    assert all(s.operator == ">=" for s in torch.specifier), torch
    # pip keeps an installed pre-release (NGC PyTorch containers ship e.g. 2.10.0a0+…) when it
    # satisfies the specifier with pre-releases allowed, as pip checks installed candidates.
    assert torch.specifier.contains("2.10.0a0+ef64d3a", prereleases=True)
    assert torch.specifier.contains("2.13.0")


def test_transformers_stays_below_its_next_major_version():
    spec = _deps()["transformers"].specifier
    assert spec.contains("5.17.0") and spec.contains("5.24.0")  # the GPU and the CPU machine
    assert not spec.contains("6.0.0") and not spec.contains("6.0.0rc1", prereleases=True)


def test_a_light_core_and_extras_for_each_user():
    assert set(_deps()) == CORE
    assert set(_extra("lab")) == {"jupyterlab", "ipywidgets"}
    assert set(_extra("finetune")) == {"peft", "datasets"}
    assert set(_extra("quant")) == {"bitsandbytes"}
    dev = _extra("dev")
    assert dev["effarch"].extras == {"lab", "finetune", "quant"}  # tests run what students run
    assert {"pytest", "pytest-xdist", "nbmake", "nbformat", "ipykernel", "ruff", "pyyaml",
            "playwright", "triton"} <= set(dev)


def test_bitsandbytes_is_asked_for_only_where_it_ships_wheels():
    marker = _extra("quant")["bitsandbytes"].marker
    where = {("Linux", "x86_64"): True, ("Linux", "aarch64"): True, ("Windows", "AMD64"): True,
             ("Darwin", "arm64"): True, ("Darwin", "x86_64"): False, ("Linux", "ppc64le"): False}
    for (system, machine), expected in where.items():
        assert marker.evaluate({"platform_system": system, "platform_machine": machine}) == expected


# ------------------------------------------------------------- what effarch's modules import


def _imports(tree: ast.Module) -> list[tuple[str, bool, bool]]:
    """(top-level package, at module level, guarded by a try) for every import in a module."""
    found = []

    def visit(node, module_level: bool, guarded: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((a.name.split(".")[0], module_level, guarded) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module.split(".")[0], module_level, guarded))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, False, guarded)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                continue  # annotations only
            else:
                visit(child, module_level, guarded or isinstance(child, ast.Try))
    visit(tree, True, False)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"


@functools.cache
def _distributions() -> dict[str, list[str]]:
    return metadata.packages_distributions()


def _distribution_names(package: str) -> set[str]:
    return {canonicalize_name(d) for d in _distributions().get(package, [])}


def _declared() -> dict[str, str]:
    """Every distribution pyproject names → where (core, or the extra's name)."""
    where = {name: "core" for name in _deps()}
    for extra, items in PROJECT["optional-dependencies"].items():
        where |= {name: extra for name in _reqs(items) if name not in where}
    return where


@pytest.mark.parametrize("module", sorted(p.stem for p in (ROOT / "src" / "effarch").glob("*.py")))
def test_effarch_modules_import_with_the_core_only(module):
    """`import effarch.<module>` needs only the core; optional packages are imported inside
    functions or under a try. Private modules (``_name``) are imported only when their package
    is there. Every package imported outside a try is declared in pyproject.toml."""
    path = ROOT / "src" / "effarch" / f"{module}.py"
    declared = _declared()
    problems = []
    for package, module_level, guarded in _imports(ast.parse(path.read_text())):
        if package in sys.stdlib_module_names or package == "effarch" or package == "__future__":
            continue
        names = _distribution_names(package)
        if not names and guarded:
            continue  # optional and not installed here (mamba_ssm, …)
        if not names:
            pytest.skip(f"{package} is not installed here, so its distribution is unknown")
        places = {declared[n] for n in names if n in declared}
        if not places and guarded:
            continue  # optional, under a try: it may come with another package (IPython)
        if not places:
            problems.append(f"{package} ({', '.join(sorted(names))}) is not in pyproject.toml")
        elif module_level and not guarded and "core" not in places and not module.startswith("_"):
            problems.append(f"{package} is imported at module level but is only in the "
                            f"{'/'.join(sorted(places))} extra: import it inside the function")
    assert not problems, f"src/effarch/{module}.py: " + "; ".join(problems)


# ------------------------------------------------------------------------------ constraints


def _constraints() -> dict[str, Requirement]:
    lines = [ln.split("#")[0].strip() for ln in (ROOT / "constraints.txt").read_text().splitlines()]
    return _reqs([ln for ln in lines if ln])


def test_constraints_pin_everything_but_torch():
    pins = _constraints()
    assert pins, "constraints.txt pins nothing"
    for req in pins.values():
        (spec,) = req.specifier
        assert spec.operator == "==", f"{req}: a constraint pins one version"
    assert not NOT_PINNED & set(pins), NOT_PINNED & set(pins)
    wanted = set(_declared()) - NOT_PINNED - {"effarch"}
    assert wanted <= set(pins), f"not pinned: {sorted(wanted - set(pins))}"


def test_constraints_satisfy_pyproject():
    pins = _constraints()
    for name, req in _declared_requirements().items():
        if name in pins:
            version = next(iter(pins[name].specifier)).version
            assert req.specifier.contains(version), f"constraints.txt {name}=={version} ∉ {req}"


def _declared_requirements() -> dict[str, Requirement]:
    reqs = _deps()
    for items in PROJECT["optional-dependencies"].values():
        reqs |= {n: r for n, r in _reqs(items).items() if n != "effarch"}
    return reqs


# ---------------------------------------------------------------------------------- licence


def test_licence_file_matches_pyproject():
    assert PROJECT["license"] == "Apache-2.0" and PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the full text, not a stub


# --------------------------------------------------------------------------------- Makefile


def _make_n(*args: str) -> str:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    r = subprocess.run(["make", "-n", *args, "VENV=/nonexistent-venv"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _pip_installs(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if "pip install" in ln and "-e " in ln]


def test_make_lab_installs_what_a_student_needs_with_the_constraints():
    (line,) = _pip_installs(_make_n("lab"))
    assert "-c constraints.txt" in line and '".[lab,finetune,quant]"' in line


def test_make_test_adds_the_test_tools():
    (line,) = _pip_installs(_make_n("test"))
    assert "-c constraints.txt" in line and '".[lab,finetune,quant,dev]"' in line


def test_an_empty_constraints_variable_turns_them_off():
    (line,) = _pip_installs(_make_n("test", "CONSTRAINTS="))
    assert " -c " not in line


def test_ci_installs_chromium_before_the_tests():
    script = (ROOT / ".ci" / "run").read_text()
    install = script.index("apt-get install")
    assert "chromium" in script[install:] and "fonts-noto-color-emoji" in script[install:]
    assert install < script.index("make test")


# ------------------------------------------------------------------------ docker-compose.yml


def _readme_test_command() -> str:
    block = (ROOT / "README.md").read_text().split("```bash", 1)[1].split("```", 1)[0]
    return [ln.split("#")[0].strip() for ln in block.strip().splitlines()][1]


def _compose() -> tuple[dict, str]:
    """The compose file as `docker compose config` resolves it, or as YAML where no docker
    compose runs (variables then take their ${VAR:-default})."""
    compose = shutil.which("docker") and subprocess.run(
        ["docker", "compose", "version"], capture_output=True).returncode == 0
    if compose:  # parsing needs no engine
        r = subprocess.run(["docker", "compose", "--profile", "tests", "config", "--format",
                            "json"], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, f"docker compose config rejects the file:\n{r.stderr}"
        return json.loads(r.stdout), "docker compose config"
    yaml = pytest.importorskip("yaml", reason="pyyaml (the dev extra) reads the compose file")
    text = re.sub(r"\$\{(\w+):-([^}]*)\}", r"\2", (ROOT / "docker-compose.yml").read_text())
    return yaml.safe_load(text), "yaml"


def _ports(service: dict) -> list[tuple[str, str, str]]:
    """(host address, published port, container port) for each published port."""
    ports = []
    for port in service.get("ports", []):
        if isinstance(port, dict):  # docker compose config's long form
            ports.append((port.get("host_ip", ""), str(port.get("published", "")),
                          str(port["target"])))
        else:
            parts = str(port).rsplit(":", 2)
            ports.append(tuple(parts) if len(parts) == 3 else ("", *parts[-2:]))
    return ports


def _command(service: dict) -> str:
    command = service.get("command", "")
    return " ".join(command) if isinstance(command, list) else command


def test_compose_publishes_jupyterlab_on_localhost_only_with_a_token():
    compose, how = _compose()
    services = compose["services"]
    for name, service in services.items():
        for host, _, _ in _ports(service):
            assert host == "127.0.0.1", f"{how}: service {name} publishes on {host or 'every address'}"
    lab = services["lab"]
    assert _ports(lab) == [("127.0.0.1", "8888", "8888")], how
    command = _command(lab)
    assert command.startswith("make lab") and "--ip=0.0.0.0" in command, command
    env = lab.get("environment", {})
    env = env if isinstance(env, dict) else dict(e.split("=", 1) for e in env)
    assert env.get("JUPYTER_TOKEN", "unset") != "", "an empty JUPYTER_TOKEN would be token-less"
    assert not re.search(r"token=(''|\"\"|\s|$)", command), command
    assert "deploy" in lab, "the lab service asks for the GPUs"


def test_compose_tests_service_runs_the_readme_test_command():
    compose, how = _compose()
    tests = compose["services"]["tests"]
    assert _command(tests) == _readme_test_command() == "make test", how
    assert not tests.get("ports"), "the tests publish nothing"
    assert tests["image"] == compose["services"]["lab"]["image"]
