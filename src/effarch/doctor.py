"""The environment report (``python -m effarch doctor``, lab 2.4.1 Part A): versions, device,
memory available (unified-memory aware), the profile and why, which Mamba paths run, which models
are present."""

from __future__ import annotations

import platform
import sys
from importlib import metadata

PACKAGES = ("torch", "transformers", "accelerate", "peft", "datasets", "tokenizers",
            "safetensors", "huggingface_hub", "bitsandbytes", "triton", "mamba-ssm",
            "causal-conv1d", "mambapy", "jupyterlab", "ipywidgets", "nbmake")


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


def _device_lines() -> list[str]:
    import torch

    from effarch import memory, profile

    dev = profile.default_device()
    lines = [f"device: {dev}"]
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        kind = "integrated, unified memory" if memory.is_unified_memory("cuda") else "discrete"
        lines.append(f"gpu: {p.name}, compute capability {p.major}.{p.minor}, {kind}")
    else:
        lines.append("gpu: none visible (CUDA not available)")
    lines.append(f"memory: {memory.available(dev).describe()}")
    return lines


def _bitsandbytes_status() -> str:
    import torch

    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:
        return f"no ({exc.__class__.__name__}: {str(exc).splitlines()[0][:80]})"
    if not torch.cuda.is_available():
        return "imports, but 8/4-bit model loading needs a CUDA GPU: not usable here"
    return "yes"


def _model_lines() -> list[str]:
    from effarch import registry

    lines = []
    for name, spec in registry.REGISTRY.items():
        if spec.zoo:
            state = "present" if registry.is_cached(spec) else "MISSING (scripts/train_zoo.py)"
        else:
            state = "cached" if registry.is_cached(spec) else "not cached"
        lines.append(f"  {name:20s} {spec.hub_id or 'data/zoo/' + name:36s} {state}")
    return lines


def doctor_lines() -> list[str]:
    from effarch import backends, profile, registry

    lines = [f"python: {sys.version.split()[0]} on {platform.machine()} ({platform.system()})"]
    lines += [f"{p}: {_version(p)}" for p in PACKAGES]
    lines += _device_lines()
    lines.append(f"hub: {'reachable' if registry.hub_reachable() else 'offline (not reachable)'}")
    lines.append(profile.get_profile().describe())
    lines.append("mamba paths:")
    lines += [f"  {k}: {v}" for k, v in backends.available_mamba_paths().items()]
    lines.append(f"bitsandbytes usable: {_bitsandbytes_status()}")
    lines.append("models:")
    lines += _model_lines()
    return lines
