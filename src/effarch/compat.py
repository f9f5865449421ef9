"""Every difference between the transformers versions the course runs on, in one place.

The GPU machine runs transformers 5.17, the CPU machines 5.24; both must work.

| what | 5.17 | 5.24 |
| --- | --- | --- |
| the cache a Mamba forward takes and returns | ``cache_params=`` / ``out.cache_params`` | ``cache=`` / ``out.cache`` (old names warn) |
| the cache an attention model takes and returns | ``past_key_values=`` | ``cache=`` (``past_key_values`` still accepted) |
| a Mamba cache's tensors | ``MambaCache.conv_states`` / ``.ssm_states`` lists | ``DynamicCache.layers[i].conv_states`` / ``.recurrent_states`` |
| asking a cache for a layer's state | ``has_previous_state(layer)`` | also ``get_recurrent_state(layer)`` |
| which scan a Mamba mixer calls | bound once at import: mamba-ssm's kernel, else the PyTorch reference | same, through ``use_kernel_func_from_hub_with_fallback`` |

Nothing here imports transformers at module import.
"""

from __future__ import annotations

import contextlib
import inspect

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


def recurrent_state(cache, layer_idx: int):
    """A layer's SSM state h (b, d, n) held by a cache: 5.24's ``get_recurrent_state``, or
    5.17's ``ssm_states`` list (``MambaCache``, Jamba's hybrid cache)."""
    get_state = getattr(cache, "get_recurrent_state", None)
    if get_state is not None:
        return get_state(layer_idx)
    layers = getattr(cache, "layers", None)
    if layers and hasattr(layers[layer_idx], "recurrent_states"):
        return layers[layer_idx].recurrent_states[0]
    return cache.ssm_states[layer_idx]


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


def transformers_version() -> str:
    """transformers' version, or ``"not installed"``."""
    try:
        import transformers
    except ImportError:
        return "not installed"
    return transformers.__version__
