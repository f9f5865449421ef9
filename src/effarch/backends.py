"""Which Mamba path runs: mamba-ssm's compiled kernels, mambapy's parallel scan, transformers'
sequential fallback, or ``effarch.fast`` (whose generator names its own path).

transformers 5 (``modeling_mamba.py``) binds each scan function once, at import, to mamba-ssm's
kernel when the package imports, whatever the device; otherwise to its PyTorch reference, which
runs mambapy's parallel scan (``pscan``) for a full sequence when ``config.use_mambapy`` and
mambapy is installed, and a Python loop over the sequence otherwise. A decode step (one token)
always uses the single-step state update. Nothing here imports a kernel package.
"""

from __future__ import annotations

import importlib.util
import sys

from effarch import compat

MAMBA_PATHS = ("mamba-ssm kernels", "mambapy parallel scan", "sequential fallback",
               "effarch fast path", "n/a")


def is_mamba_mixer(module) -> bool:
    """A Mamba-style mixer (MambaMixer, JambaMambaMixer, Mamba2Mixer, BambaMixer, ...)."""
    name = type(module).__name__
    # BambaMixer / FalconH1Mixer carry no "Mamba" in their names but the SSM's A_log
    return "Mixer" in name and ("Mamba" in name or hasattr(module, "A_log"))


def mamba_mixers(model) -> list:
    """The model's Mamba mixers (Mamba, FalconMamba, Mamba2, Jamba, Zamba, Bamba, …)."""
    return [m for m in model.modules() if is_mamba_mixer(m)]


def kernels_run(mixer) -> bool:
    """Whether the mixer's modeling module sends its scan to mamba-ssm's kernels."""
    module = sys.modules.get(type(mixer).__module__)
    legacy = getattr(module, "is_fast_path_available", None)  # transformers 4.x
    if legacy is not None:
        return bool(legacy) and mixer.in_proj.weight.device.type == "cuda"
    for name in ("mamba_selective_scan", "mamba_chunk_scan_combined",
                 "mamba_split_conv1d_scan_combined", "selective_scan_fn"):
        resolved = compat.resolved_to_package(getattr(module, name, None))
        if resolved is not None:
            return resolved
    return importlib.util.find_spec("mamba_ssm") is not None


def mambapy_available() -> bool:
    """transformers' own test for mambapy (it also checks the version it needs)."""
    try:
        from transformers.utils.import_utils import is_mambapy_available
    except ImportError:
        return importlib.util.find_spec("mambapy") is not None
    return bool(is_mambapy_available())


def mamba_path(model) -> str:
    """Which path a transformers model's Mamba layers take for a whole prompt: one of
    `MAMBA_PATHS` ("n/a" for a model with no Mamba layer). An ``effarch.fast`` generator names
    its own path (``MambaFastGenerator.mamba_path``)."""
    mixers = mamba_mixers(model)
    if not mixers:
        return "n/a"
    mixer = mixers[0]
    if kernels_run(mixer) or getattr(model, "use_kernels", False) is True:
        return "mamba-ssm kernels"
    if getattr(mixer, "use_mambapy", False) and mambapy_available():
        return "mambapy parallel scan"
    return "sequential fallback"


def transformers_mamba_path(config) -> tuple[str, str]:
    """(path, why): the path transformers will take for a whole prompt through a Mamba model
    built from ``config`` here, decided as transformers decides it (see the module docstring),
    without building the model. `mamba_path` reads the same off a built model."""
    if importlib.util.find_spec("mamba_ssm") is not None:
        return "mamba-ssm kernels", "mamba-ssm imports, so transformers binds its scan to them"
    missing = "mamba-ssm is not installed"
    if getattr(config, "use_mambapy", False):
        if mambapy_available():
            return "mambapy parallel scan", f"{missing}; the config sets use_mambapy=True"
        return "sequential fallback", f"{missing}; the config asks for mambapy, not installed"
    unused = "; mambapy is installed, but transformers uses it only when a config asks" \
        if mambapy_available() else ""
    return "sequential fallback", f"{missing} and the config has use_mambapy=False{unused}"


def package_version(package: str) -> str | bool:
    """An importable package's installed version; False when it does not import; True when it
    imports but has no distribution metadata (e.g. run from a path)."""
    if importlib.util.find_spec(package) is None:
        return False
    try:
        from importlib.metadata import version
        return version(package.replace("_", "-"))
    except Exception:  # importable but not installed as a distribution
        return True


def available_mamba_paths() -> dict[str, bool | str]:
    """Which Mamba paths this environment can run, with the packages' versions (for the
    doctor). Imports none of the kernel packages."""
    import torch

    cuda = torch.cuda.is_available()
    mamba_ssm, conv = package_version("mamba_ssm"), package_version("causal_conv1d")
    return {
        "cuda": cuda,
        "mamba_ssm": mamba_ssm,
        "causal_conv1d": conv,
        "mambapy": package_version("mambapy"),
        "mamba-ssm kernels": bool(mamba_ssm) and cuda,
        "mambapy parallel scan": mambapy_available(),
        "sequential fallback": True,
        "effarch fast path": fast_path_description(cuda=cuda),
    }


def fast_path_description(*, cuda: bool, no_gpu: str = "no CUDA GPU") -> str:
    """What ``effarch.fast`` would run here (prefill scan, decode step); ``no_gpu`` says why
    there is no GPU path when ``cuda`` is false."""
    triton = importlib.util.find_spec("triton") is not None
    if cuda and triton:
        return "yes: Triton scan prefill, fused Triton decode step in a CUDA graph"
    if cuda:
        return "yes: chunked PyTorch scan prefill, CUDA-graph decode (Triton missing)"
    return f"yes: chunked PyTorch scan prefill, eager decode ({no_gpu})"
