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

    from effarch import backends, compat

    installed = backends.package_version("bitsandbytes")
    if not installed:
        return "no (not installed)"
    if not torch.cuda.is_available():  # not imported: its CPU backend's advice would only confuse
        return "installed, but 8/4-bit model loading needs a CUDA GPU: not usable here"
    compat.hide_inapplicable_warnings(cuda=True)
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:
        return f"no ({exc.__class__.__name__}: {str(exc).splitlines()[0][:80]})"
    return "yes"


def _mamba_lines() -> list[str]:
    """The Mamba packages installed, then ONE answer per way of running the profile's Mamba:
    the path it will take here, and why."""
    import torch

    from effarch import backends, models
    from effarch.profile import get_profile

    def version(package: str) -> str:
        found = backends.package_version(package)
        return "not installed" if not found else "installed" if found is True else found

    name = models.name_for("mamba")
    path, why = backends.transformers_mamba_path(models.get_config(name))
    on_gpu = torch.cuda.is_available() and get_profile().device.startswith("cuda")  # the profile's
    fast = backends.fast_path_description(  # the profile's device, not the machine's
        cuda=on_gpu, no_gpu="this profile runs on the CPU" if torch.cuda.is_available()
        else "no CUDA GPU").removeprefix("yes: ")
    return [f"mamba packages: mamba-ssm {version('mamba_ssm')}, causal-conv1d "
            f"{version('causal_conv1d')}, mambapy {version('mambapy')}",
            f"mamba paths for this profile's Mamba ({name}), whole prompts:",
            f"  through transformers: {path} — {why}",
            f"  through effarch.fast: {fast}"]


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
    from effarch import profile, registry

    lines = [f"python: {sys.version.split()[0]} on {platform.machine()} ({platform.system()})"]
    lines += [f"{p}: {_version(p)}" for p in PACKAGES]
    lines += _device_lines()
    lines.append(f"hub: {'reachable' if registry.hub_reachable() else 'offline (not reachable)'}")
    lines.append(profile.get_profile().describe())
    lines += _mamba_lines()
    lines.append(f"bitsandbytes usable: {_bitsandbytes_status()}")
    lines.append("models:")
    lines += _model_lines()
    return lines
