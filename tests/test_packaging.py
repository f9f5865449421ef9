"""The install rules the README's two commands rely on."""

from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml itself")

ROOT = Path(__file__).resolve().parents[1]


def _deps() -> dict[str, Requirement]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {Requirement(r).name: Requirement(r) for r in meta["dependencies"]}


def test_torch_has_a_lower_bound_only_and_admits_an_ngc_build():
    torch = _deps()["torch"]
    assert all(s.operator == ">=" for s in torch.specifier), torch
    # pip keeps an installed pre-release (NGC PyTorch containers ship e.g. 2.10.0a0+…) when it
    # satisfies the specifier with pre-releases allowed, as pip checks installed candidates.
    assert torch.specifier.contains("2.10.0a0+ef64d3a", prereleases=True)
    assert torch.specifier.contains("2.13.0")


def test_runtime_dependencies_named_by_the_course():
    names = set(_deps())
    assert {"transformers", "accelerate", "peft", "datasets", "tokenizers", "safetensors",
            "matplotlib", "ipywidgets", "jupyterlab", "pandas", "psutil", "tqdm",
            "mambapy"} <= names
    assert _deps()["transformers"].specifier.contains("5.17.0")
