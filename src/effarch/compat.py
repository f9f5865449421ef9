"""Every difference between the transformers versions the course runs on, in one place.

The GPU machine runs transformers 5.17, the CPU machines 5.24; both must work.

| what | 5.17 | 5.24 |
| --- | --- | --- |
| the cache a Mamba forward takes and returns | ``cache_params=`` / ``out.cache_params`` | ``cache=`` / ``out.cache`` (old names warn) |
| the cache an attention model takes and returns | ``past_key_values=`` | ``cache=`` (``past_key_values`` still accepted) |
| a Mamba cache's tensors | ``MambaCache.conv_states`` / ``.ssm_states`` lists | ``DynamicCache.layers[i].conv_states`` / ``.recurrent_states`` |
| asking a cache for a layer's state | ``has_previous_state(layer)`` | also ``get_recurrent_state(layer)``, ``get_conv_state(layer)`` |
| which scan a Mamba mixer calls | bound once at import: mamba-ssm's kernel, else the PyTorch reference | same, through ``use_kernel_func_from_hub_with_fallback`` |

Nothing here imports transformers at module import.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re

# The keyword a forward takes its cache by, newest first: 5.24 answers to every name (the old
# ones with a deprecation warning), 5.17 to the name in its signature only.
CACHE_NAMES = ("cache", "past_key_values", "cache_params")

# Attribute names of cache tensors across versions -> the kind of state they hold.
CACHE_FIELDS = {"keys": "key_value", "values": "key_value", "key_cache": "key_value",
                "value_cache": "key_value", "conv_states": "conv", "ssm_states": "ssm",
                "recurrent_states": "ssm"}


def forward_params(model) -> frozenset[str]:
    """The names a module's ``forward`` accepts (read once, outside timed regions)."""
    return frozenset(inspect.signature(model.forward).parameters)


def cache_keyword(params) -> str | None:
    """The keyword this forward takes its cache by, from its parameter names (None: no cache)."""
    return next((name for name in CACHE_NAMES if name in params), None)


def find_cache(out) -> tuple[str | None, object]:
    """(name, cache) of the cache a forward with ``use_cache=True`` returned, whatever this
    version calls it (5.24: ``cache``; 5.17: ``past_key_values``, Mamba ``cache_params``);
    (None, None) if none. The current name is read first: the old ones warn on 5.24."""
    for name in CACHE_NAMES:
        cache = getattr(out, name, None)
        if cache is not None:
            return name, cache
    return None, None


def returned_cache(out):
    """The cache a forward with ``use_cache=True`` returned (see `find_cache`), or None."""
    return find_cache(out)[1]


def mixer_inputs(args: tuple, kwargs: dict):
    """(hidden_states, cache, attention_mask) of a Mamba mixer's call, by position or name
    (the cache keyword is ``cache_params`` in 5.17 and ``cache`` in 5.24)."""
    hidden = args[0] if args else kwargs["hidden_states"]
    cache = args[1] if len(args) > 1 else kwargs.get("cache", kwargs.get("cache_params"))
    mask = args[2] if len(args) > 2 else kwargs.get("attention_mask")
    return hidden, cache, mask


def has_previous_state(cache, layer_idx: int) -> bool:
    """Whether the cache already holds this layer's SSM state (then the call is a decode step)."""
    if cache is None:
        return False
    with contextlib.suppress(AttributeError, ValueError, IndexError, TypeError):
        return bool(cache.has_previous_state(layer_idx))
    get_state = getattr(cache, "get_recurrent_state", None)  # 5.24 only
    return get_state is not None and get_state(layer_idx) is not None


def _layer_state(cache, layer_idx: int, *, getter: str, field: str, legacy: str):
    """A layer's state by 5.24's ``cache.<getter>(i)``, a ``layers[i].<field>[0]`` holder, or
    5.17's ``cache.<legacy>[i]`` list (``MambaCache``, Jamba's hybrid cache)."""
    get_state = getattr(cache, getter, None)
    if get_state is not None:
        return get_state(layer_idx)
    layers = getattr(cache, "layers", None)
    if layers and hasattr(layers[layer_idx], field):
        return getattr(layers[layer_idx], field)[0]
    return getattr(cache, legacy)[layer_idx]


def recurrent_state(cache, layer_idx: int):
    """A layer's SSM state h (b, d, n) held by a cache, on 5.17 and 5.24."""
    return _layer_state(cache, layer_idx, getter="get_recurrent_state",
                        field="recurrent_states", legacy="ssm_states")


def conv_state(cache, layer_idx: int):
    """A layer's conv state (b, d, k) held by a cache, on 5.17 and 5.24."""
    return _layer_state(cache, layer_idx, getter="get_conv_state", field="conv_states",
                        legacy="conv_states")


def resolved_to_package(fn) -> bool | None:
    """Did transformers' ``use_kernel_func_from_hub_with_fallback`` (5.x,
    ``integrations/hub_kernels.py``) bind ``fn`` to the package's kernel (True) or to its
    PyTorch reference (False)? None when ``fn`` is not such a wrapper."""
    for _ in range(4):  # the hub decorator may wrap the fallback wrapper once more
        code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
        if code is not None and cells and "is_new_implementation" in code.co_freevars:
            return bool(cells[code.co_freevars.index("is_new_implementation")].cell_contents)
        fn = getattr(fn, "__wrapped__", None)
        if fn is None:
            return None
    return None


# Messages whose advice cannot apply on a machine without CUDA: transformers' "install mamba-ssm /
# causal-conv1d" (4.x: "fast path is not available"); both packages need a CUDA GPU to install.
_KERNEL_ADVICE = r"falling back to its reference PyTorch implementation|fast path is not available"
_KERNEL_LOGGERS = ("transformers.integrations.hub_kernels", "transformers.models.mamba.modeling_mamba")
# bitsandbytes' CPU backend, at import on a CPU with AVX512-BF16: advice for 4-bit inference on
# the CPU, which the course never runs (load_model quantises on CUDA only).
_BNB_CPU_ADVICE = r"Failed to load CPU gemm_4bit_forward"
_BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"


class _DropMatching(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def _drop(logger_name: str, pattern: str) -> None:
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _DropMatching) and f.pattern.pattern == pattern
               for f in logger.filters):
        logger.addFilter(_DropMatching(pattern))


def hide_inapplicable_warnings(*, cuda: bool | None = None) -> list[str]:
    """Hide library warnings whose advice cannot apply here; return one sentence per kind hidden
    (a lab prints them, so nothing is hidden silently). ``cuda`` defaults to whether a CUDA GPU
    is visible: with one, transformers' advice to install mamba-ssm stays (it can apply)."""
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    _drop(_BNB_CPU_LOGGER, _BNB_CPU_ADVICE)
    hidden = ["bitsandbytes' 'Failed to load CPU gemm_4bit_forward … pip install kernels': advice "
              "for 4-bit inference on a CPU, which this course never runs"]
    if not cuda:
        for name in _KERNEL_LOGGERS:
            _drop(name, _KERNEL_ADVICE)
        hidden.append("transformers' 'falling back to its reference PyTorch implementation … "
                      "install mamba_ssm / causal_conv1d': both need a CUDA GPU, so the PyTorch "
                      "path is the only one here (effarch.backends.mamba_path names it)")
    return hidden


def transformers_version() -> str:
    """transformers' version, or ``"not installed"``."""
    try:
        import transformers
    except ImportError:
        return "not installed"
    return transformers.__version__
