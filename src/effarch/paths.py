"""Where the course's files are: the repository's root, ``data/`` and the tiny zoo; ``TROUBLE``, the
prefix with which errors name their TROUBLESHOOTING.md section.

``EFFARCH_ROOT`` overrides the root (for an installed, non-editable copy of the package).
Nothing is read at import.
"""

from __future__ import annotations

import os
from pathlib import Path

# How every user-fixable error names its TROUBLESHOOTING.md section: TROUBLE, then the section's
# title in single quotes.
TROUBLE = "See TROUBLESHOOTING.md, section"


def repo_root() -> Path:
    """The repository's root, found from this file (nbmake runs notebooks from their folder)."""
    env = os.environ.get("EFFARCH_ROOT")
    if env:
        return Path(env).resolve()
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").is_file() and (parent / "data").is_dir():
            return parent
    raise FileNotFoundError(
        "effarch cannot find the course repository (a folder with pyproject.toml and data/). "
        "Install it editable (`make lab` does) or set EFFARCH_ROOT to the repository's path. "
        "See TROUBLESHOOTING.md, section 'Repository not found'."
    )


def data_dir() -> Path:
    """``data/``: the corpus, the long document, the zoo, the measurements."""
    return repo_root() / "data"


def zoo_dir() -> Path:
    """``data/zoo/``: the trained tiny models and their shared tokenizer."""
    return data_dir() / "zoo"


def measurements_dir() -> Path:
    """``data/measurements/``: kept logs of runs whose figures the course quotes."""
    return data_dir() / "measurements"
