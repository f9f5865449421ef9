"""A pytest plugin for the course's test run (``pytest -p effarch.testing``).

nbmake starts each notebook's kernel with the test process's environment, so setting it per
test item is enough: solutions run strict (every check must pass), labs run as students get
them (every check may say "not attempted"), and all of them in the offline tiny profile.
"""

from __future__ import annotations

import os
from pathlib import Path


def _threads_per_worker() -> int | None:
    """Cores per xdist worker; None outside xdist. Two workers each running torch on every core
    were seen to slow one another 50-80x on a 2-core machine."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, (os.cpu_count() or 1) // workers) if workers > 1 else None


def pytest_configure(config) -> None:
    threads = _threads_per_worker()
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def notebook_env(path: Path) -> dict[str, str]:
    """The environment a notebook runs under in CI."""
    env = {"EFFARCH_PROFILE": "tiny", "HF_HUB_OFFLINE": "1",
           "EFFARCH_STRICT": "1" if path.parent.name == "solutions" else "0"}
    threads = _threads_per_worker()
    if threads is not None:  # each worker's kernel gets its share of the cores
        env["OMP_NUM_THREADS"] = str(threads)
    return env


_SAVED: dict[str, str | None] = {}


def pytest_runtest_setup(item) -> None:
    path = Path(str(item.fspath))
    if path.suffix == ".ipynb":
        env = notebook_env(path)
        _SAVED.update({k: os.environ.get(k) for k in env})
        os.environ.update(env)


def pytest_runtest_teardown(item) -> None:
    """Give the next test the environment it had before a notebook (no EFFARCH_STRICT left)."""
    for key, value in _SAVED.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _SAVED.clear()
