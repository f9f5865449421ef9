"""Which profile the course runs in, on which device, and where the repository's files are.

Everything here is read in one place, from the environment, when asked (never at import):

- ``EFFARCH_PROFILE``: ``tiny`` (the offline zoo, CPU-sized), ``full`` (the real hub models) or
  ``auto`` (default): ``full`` when a CUDA GPU is present *and* the full models are in the local
  Hugging Face cache, otherwise ``tiny``; the result says which and why.
- ``EFFARCH_WEIGHTS``: ``pretrained`` (default) or ``random`` — with ``full``, the real model
  configs with random weights: the real memory and speed of a 2.8B or 47B model, no download.
- ``EFFARCH_DEVICE``: overrides the device choice (``cpu``, ``cuda``, ``cuda:1``, ``mps``).
- ``EFFARCH_STRICT``: ``1`` makes exercise checks raise instead of letting the lab go on (CI).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

PROFILES = ("tiny", "full", "auto")
WEIGHTS = ("pretrained", "random")


@dataclass(frozen=True)
class Profile:
    """The resolved profile: ``name`` is ``tiny`` or ``full``; ``reason`` says why."""

    name: str
    weights: str
    device: str
    reason: str
    requested: str

    @property
    def is_tiny(self) -> bool:
        return self.name == "tiny"

    @property
    def random_weights(self) -> bool:
        return self.weights == "random"

    def describe(self) -> str:
        w = ", random weights at the real configs" if self.random_weights else ""
        return f"profile {self.name}{w} on {self.device} — {self.reason}"


def default_device() -> str:
    """``EFFARCH_DEVICE`` if set, else ``cuda`` when a CUDA GPU is usable, else ``mps``, else ``cpu``."""
    env = os.environ.get("EFFARCH_DEVICE")
    if env:
        return env
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def strict() -> bool:
    """True when exercise checks must raise instead of letting the lab go on (CI on solutions)."""
    return os.environ.get("EFFARCH_STRICT", "0").lower() in ("1", "true", "yes")


def _read_choice(var: str, choices: tuple[str, ...], default: str) -> str:
    value = os.environ.get(var, default).strip().lower() or default
    if value not in choices:
        raise ValueError(
            f"{var}={value!r} is not one of {', '.join(choices)}. "
            "See TROUBLESHOOTING.md, section 'Choosing a profile'."
        )
    return value


def get_profile() -> Profile:
    """Resolve the profile from the environment; cheap enough to call in every cell."""
    requested = _read_choice("EFFARCH_PROFILE", PROFILES, "auto")
    weights = _read_choice("EFFARCH_WEIGHTS", WEIGHTS, "pretrained")
    device = default_device()
    if requested != "auto":
        reason = f"EFFARCH_PROFILE={requested}"
        if weights == "random" and requested == "tiny":
            reason += " (EFFARCH_WEIGHTS=random applies to the full profile only; ignored)"
            weights = "pretrained"
        return Profile(requested, weights, device, reason, requested)
    if weights == "random":
        return Profile("full", weights, device, "EFFARCH_WEIGHTS=random selects the real configs",
                       requested)
    if not device.startswith("cuda"):
        return Profile("tiny", weights, device, "auto: no CUDA GPU, so the offline tiny zoo",
                       requested)
    from effarch import registry

    missing = [n for n in registry.full_profile_names() if not registry.is_cached(n)]
    if missing:
        return Profile("tiny", weights, device,
                       f"auto: a GPU is present but {len(missing)} full model(s) are not in the "
                       f"local cache ({', '.join(missing)}); run scripts/prefetch_models.py "
                       "online to fetch them", requested)
    return Profile("full", weights, device, "auto: a CUDA GPU and every full model is cached",
                   requested)
