"""``python -m effarch doctor``: what this machine can run, and why the course chose what it did."""

from __future__ import annotations

import argparse
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
    from effarch import models

    lines = []
    for name, spec in models.REGISTRY.items():
        if spec.zoo:
            state = "present" if models.is_cached(name) else "MISSING (scripts/train_zoo.py)"
        else:
            state = "cached" if models.is_cached(name) else "not cached"
        lines.append(f"  {name:20s} {spec.hub_id or 'data/zoo/' + name:36s} {state}")
    return lines


def doctor_lines() -> list[str]:
    from effarch import bench, models, profile

    lines = [f"python: {sys.version.split()[0]} on {platform.machine()} ({platform.system()})"]
    lines += [f"{p}: {_version(p)}" for p in PACKAGES]
    lines += _device_lines()
    lines.append(f"hub: {'reachable' if models.hub_reachable() else 'offline (not reachable)'}")
    lines.append(profile.get_profile().describe())
    lines.append("mamba paths:")
    lines += [f"  {k}: {v}" for k, v in bench.available_mamba_paths().items()]
    lines.append(f"bitsandbytes usable: {_bitsandbytes_status()}")
    lines.append("models:")
    lines += _model_lines()
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m effarch")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("doctor", help="report versions, device, memory, profile and model cache")
    args = parser.parse_args(argv)
    if args.command == "doctor":
        print("\n".join(doctor_lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
