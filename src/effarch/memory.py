"""Memory: what is available (unified-memory aware), what a model will need, and a guard.

On a discrete GPU the free device memory comes from ``torch.cuda.mem_get_info``. On an
integrated GPU that shares system memory (NVIDIA GB10 in DGX Spark, Jetson) ``mem_get_info``
under-reports (it ignores reclaimable page cache), so, as vLLM and SGLang do, we use
``psutil.virtual_memory().available``. On the CPU, the same psutil figure.

Weight footprints are estimated from a config by formula (no model is built), one term per
part of the network, so the estimate can be read and checked against a meta-device build.
"""

from __future__ import annotations

from dataclasses import dataclass

from effarch import compat

GiB = 1024**3

_DTYPE_BYTES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2,
                "float64": 8, "int8": 1, "uint8": 1, "float8_e4m3fn": 1, "float8_e5m2": 1,
                "8bit": 1, "4bit": 0.5}


class InsufficientMemoryError(MemoryError):
    """Raised by :func:`require` when a load would not fit; the message says what to do."""


@dataclass(frozen=True)
class MemoryInfo:
    available_bytes: int
    total_bytes: int
    device: str
    source: str  # how it was measured

    def describe(self) -> str:
        return (f"{self.available_bytes / GiB:.1f} GiB available of {self.total_bytes / GiB:.1f} "
                f"GiB on {self.device} ({self.source})")


def dtype_bytes(dtype) -> float:
    """Bytes per element of a dtype given as a torch.dtype or a name (``"bfloat16"``)."""
    name = str(dtype).replace("torch.", "")
    if name not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPE_BYTES)}")
    return _DTYPE_BYTES[name]


def is_unified_memory(device: str = "cuda") -> bool:
    """True for an integrated GPU that shares system memory (e.g. GB10), False otherwise."""
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        return False
    props = torch.cuda.get_device_properties(torch.device(device))
    return bool(getattr(props, "is_integrated", False))


def available(device: str | None = None) -> MemoryInfo:
    """Memory a new allocation on ``device`` can use now."""
    import psutil

    from effarch.profile import default_device

    device = device or default_device()
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was asked for but no CUDA GPU is visible. "
                               "See TROUBLESHOOTING.md, section 'No GPU'.")
        if not is_unified_memory(device):
            free, total = torch.cuda.mem_get_info(torch.device(device))
            return MemoryInfo(int(free), int(total), device, "torch.cuda.mem_get_info")
        vm = psutil.virtual_memory()
        return MemoryInfo(int(vm.available), int(vm.total), device,
                          "unified memory: psutil available (mem_get_info under-reports)")
    vm = psutil.virtual_memory()
    return MemoryInfo(int(vm.available), int(vm.total), device, "psutil available")


def require(bytes_needed: float, *, device: str | None = None, what: str = "this model",
            margin: float = 0.10, suggestions: tuple[str, ...] = ()) -> MemoryInfo:
    """Check that ``bytes_needed`` (plus ``margin``) fits; raise InsufficientMemoryError if not.

    Running out of memory on a unified-memory machine can freeze it whole, so labs check first.
    """
    info = available(device)
    if device == "meta":
        return info
    needed = bytes_needed * (1 + margin)
    if needed <= info.available_bytes:
        return info
    tips = list(suggestions) or ["quantise it (quantization='8bit' or '4bit', needs a CUDA GPU)",
                                 "use a smaller model or the tiny profile (EFFARCH_PROFILE=tiny)"]
    raise InsufficientMemoryError(
        f"{what} needs about {needed / GiB:.1f} GiB (weights {bytes_needed / GiB:.1f} GiB + "
        f"{margin:.0%} margin) but {info.describe()}. Try: " + "; ".join(tips)
        + ". Pass force=True to load anyway. See TROUBLESHOOTING.md, section 'Not enough memory'."
    )


# --- parameter counts from a config, part by part -----------------------------------------


def _get(cfg, *names, default=None):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def _attention_params(cfg) -> int:
    h = cfg.hidden_size
    heads = cfg.num_attention_heads
    if getattr(cfg, "kv_lora_rank", None):  # DeepSeek multi-head latent attention (V2 §2.1)
        qk_head = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        q = (h * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * heads * qk_head
             if cfg.q_lora_rank else h * heads * qk_head)
        kv = (h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
              + cfg.kv_lora_rank * heads * (cfg.qk_nope_head_dim + cfg.v_head_dim))
        return q + kv + heads * cfg.v_head_dim * h
    head_dim = _get(cfg, "head_dim", default=h // heads)
    kv_heads = _get(cfg, "num_key_value_heads", default=heads)
    qkv = h * head_dim * (heads + 2 * kv_heads)
    out = heads * head_dim * h
    bias = getattr(cfg, "model_type", "") == "phi"  # Phi's q, k, v and dense carry biases
    if getattr(cfg, "attention_bias", False) or bias:
        qkv += head_dim * (heads + 2 * kv_heads)
        out += h
    elif getattr(cfg, "model_type", "") == "qwen2_moe":  # Qwen2 has q, k, v biases only
        qkv += head_dim * (heads + 2 * kv_heads)
    if getattr(cfg, "model_type", "") == "olmoe":  # OLMoE normalises q and k (QK-norm)
        qkv += heads * head_dim + kv_heads * head_dim
    return qkv + out


def _mlp_params(h: int, inter: int, gated: bool = True, bias: bool = False) -> int:
    if gated:  # SwiGLU: gate, up (H→I) and down (I→H)
        return 3 * h * inter
    return 2 * h * inter + (inter + h if bias else 0)  # fc1, fc2 (Phi: GELU with biases)


def _mamba_dims(cfg, h: int) -> tuple[int, int, int]:
    """(d, n, k) of a Mamba mixer: inner channels expand · h, state size, conv kernel (the names
    of MambaConfig and of JambaConfig's mamba_* fields)."""
    return (_get(cfg, "mamba_expand", "expand", default=2) * h,
            _get(cfg, "mamba_d_state", "state_size", default=16),
            _get(cfg, "mamba_d_conv", "conv_kernel", default=4))


def _mamba_mixer_params(cfg, h: int) -> int:
    d, n, k = _mamba_dims(cfg, h)
    r = _get(cfg, "mamba_dt_rank", "time_step_rank", default="auto")
    r = -(-h // 16) if r == "auto" else r
    conv_bias = _get(cfg, "mamba_conv_bias", "use_conv_bias", default=True)
    proj_bias = _get(cfg, "mamba_proj_bias", "use_bias", default=False)
    p = h * 2 * d + (2 * d if proj_bias else 0)             # in_proj: H → 2D (x and z)
    p += d * k + (d if conv_bias else 0)                      # depthwise conv1d
    p += d * (r + 2 * n)                                      # x_proj: D → R + 2N (dt, B, C)
    p += r * d + d                                            # dt_proj with bias
    p += d * n + d                                            # A_log and D
    p += d * h + (h if proj_bias else 0)                      # out_proj
    if getattr(cfg, "model_type", "") == "jamba":             # dt, B, C RMSNorms
        p += r + 2 * n
    return p


@dataclass(frozen=True)
class ParamCount:
    """Parameters of a config: ``total``; ``active`` = those one token uses (MoE: top-k experts)."""

    total: int
    active: int
    embedding: int


def count_params(cfg) -> ParamCount:
    """Total and per-token active parameters of a transformers config, by formula.

    Supports the course's families: Llama/Phi/GPT-NeoX-style transformers, Mamba, Mixtral,
    OLMoE, Qwen2-MoE, DeepSeek-V2/V3 and Jamba.
    """
    mt = getattr(cfg, "model_type", "")
    h, v = cfg.hidden_size, cfg.vocab_size
    n_layers = cfg.num_hidden_layers
    emb = v * h
    head = 0 if getattr(cfg, "tie_word_embeddings", False) else v * h + (v if mt == "phi" else 0)
    norm = (2 if mt == "phi" else 1) * h  # final norm (Phi's LayerNorm has a bias)
    total = active = emb + head + norm
    for i in range(n_layers):
        t, a = _layer_params(cfg, i)
        total, active = total + t, active + a
    return ParamCount(int(total), int(active), int(emb))


def _layer_params(cfg, i: int) -> tuple[int, int]:
    mt = getattr(cfg, "model_type", "")
    h = cfg.hidden_size
    if mt in ("mamba", "falcon_mamba"):
        p = _mamba_mixer_params(cfg, h) + h
        return p, p
    if mt == "phi":  # parallel attention + MLP with one LayerNorm (weight and bias)
        p = _attention_params(cfg) + _mlp_params(h, cfg.intermediate_size, gated=False, bias=True) + 2 * h
        return p, p
    mixer = (_mamba_mixer_params(cfg, h) if mt == "jamba" and not _jamba_is_attention(cfg, i)
             else _attention_params(cfg))
    ffn_t, ffn_a = _ffn_params(cfg, i)
    norms = 2 * h
    return mixer + ffn_t + norms, mixer + ffn_a + norms


def _jamba_is_attention(cfg, i: int) -> bool:
    return i % cfg.attn_layer_period == cfg.attn_layer_offset


def _ffn_params(cfg, i: int) -> tuple[int, int]:
    """(total, active) parameters of layer i's feed-forward part: dense MLP or MoE block."""
    mt = getattr(cfg, "model_type", "")
    h = cfg.hidden_size
    n_exp = _get(cfg, "num_local_experts", "num_experts", "n_routed_experts", default=0)
    k = _get(cfg, "num_experts_per_tok", default=0)
    moe_layer = n_exp > 0
    if mt == "jamba":
        moe_layer = i % cfg.expert_layer_period == cfg.expert_layer_offset
    if mt in ("deepseek_v2", "deepseek_v3"):
        moe_layer = i >= cfg.first_k_dense_replace and i % getattr(cfg, "moe_layer_freq", 1) == 0
    if not moe_layer:
        p = _mlp_params(h, cfg.intermediate_size)
        return p, p
    inter = _get(cfg, "moe_intermediate_size", default=cfg.intermediate_size)
    expert = _mlp_params(h, inter)
    router = h * n_exp + (n_exp if mt == "deepseek_v3" else 0)  # V3: score correction bias
    shared = 0
    if mt == "qwen2_moe":
        shared = _mlp_params(h, cfg.shared_expert_intermediate_size) + h  # + gate (H → 1)
    elif mt in ("deepseek_v2", "deepseek_v3"):
        shared = _mlp_params(h, inter * (cfg.n_shared_experts or 0))
    return n_exp * expert + router + shared, k * expert + router + shared


def estimate_weights_bytes(name_or_config, dtype="bfloat16", quantization: str | None = None
                           ) -> int:
    """Bytes of a model's weights in ``dtype``, or quantised (``"8bit"`` / ``"4bit"``).

    With bitsandbytes the Linear layers inside the blocks are quantised; embeddings, norms and
    the LM head stay in ``dtype``; 4-bit (NF4) adds one absmax scale per block of 64 weights.
    """
    cfg = _resolve_config(name_or_config)
    pc = count_params(cfg)
    per = dtype_bytes(dtype)
    if quantization is None:
        return int(pc.total * per)
    kept = pc.embedding + (0 if getattr(cfg, "tie_word_embeddings", False) else pc.embedding)
    quantised = pc.total - kept
    qbytes = {"8bit": 1.0 + 4 / 4096, "4bit": 0.5 + 4 / 64}[quantization]  # scales included
    return int(kept * per + quantised * qbytes)


def _resolve_config(name_or_config):
    if isinstance(name_or_config, str):
        from effarch.registry import get_config

        return get_config(name_or_config)
    return name_or_config


# --- inference state: the KV cache of attention layers and the state of Mamba layers --------


def _attention_layers(cfg) -> int:
    """How many layers keep a KV cache: all of them in a transformer, none in Mamba, the
    attention layers of a Jamba-style hybrid."""
    mt = getattr(cfg, "model_type", "")
    if mt in ("mamba", "falcon_mamba"):
        return 0
    if mt == "jamba":
        return sum(_jamba_is_attention(cfg, i) for i in range(cfg.num_hidden_layers))
    return cfg.num_hidden_layers


def _ssm_layers(cfg) -> int:
    mt = getattr(cfg, "model_type", "")
    if mt in ("mamba", "falcon_mamba"):
        return cfg.num_hidden_layers
    if mt == "jamba":
        return cfg.num_hidden_layers - _attention_layers(cfg)
    return 0


def kv_cache_bytes(cfg, seq_len: int, batch: int = 1, dtype="bfloat16") -> int:
    """Bytes of the KV cache after ``seq_len`` tokens: 2 (K and V) · layers · b · kv_heads ·
    seq_len · head_dim · bytes per element — linear in the context length (lab 2.4.1, Part B).

    Grouped-query attention stores ``num_key_value_heads`` heads; layers without attention
    (Mamba, a hybrid's Mamba layers) store none. Sliding windows and MLA are not modelled.
    """
    heads = cfg.num_attention_heads if _attention_layers(cfg) else 0
    kv_heads = _get(cfg, "num_key_value_heads", default=heads)
    head_dim = _get(cfg, "head_dim", default=cfg.hidden_size // heads if heads else 0)
    per_token = 2 * _attention_layers(cfg) * kv_heads * head_dim * dtype_bytes(dtype)
    return int(per_token * seq_len * batch)


def ssm_state_bytes(cfg, batch: int = 1, dtype="bfloat16", state_dtype="float32") -> int:
    """Bytes of a Mamba model's inference state, whatever the context length (lab 2.4.1, Part B):
    per Mamba layer a conv state (b, d, k) in ``dtype`` and an SSM state h (b, d, n) in
    ``state_dtype``, with d = expand · hidden. transformers keeps h in float32 in a bf16 model
    (5.17 and 5.24 both did; lab 2.4.1 reads ``state_dtype`` off the real cache), as mamba-ssm does.
    """
    d, n, k = _mamba_dims(cfg, cfg.hidden_size)
    per_layer = batch * d * (k * dtype_bytes(dtype) + n * dtype_bytes(state_dtype))
    return int(_ssm_layers(cfg) * per_layer)


@dataclass(frozen=True)
class CacheBytes:
    """Bytes held by a real cache object, by kind, and the dtype each kind is stored in."""

    key_value: int
    conv: int
    ssm: int
    dtypes: dict  # kind -> dtype name, e.g. {"ssm": "float32"}
    tensors: int  # how many tensors were counted

    @property
    def total(self) -> int:
        return self.key_value + self.conv + self.ssm


def _tensors(obj):
    """Every tensor inside a tensor, list, tuple or dict (any nesting)."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def measure_cache_bytes(cache) -> CacheBytes:
    """Count the bytes of the tensors a model's cache really holds (``nbytes``, each tensor once).

    Reads the names transformers uses: 5.24's ``DynamicCache.layers`` (``keys``/``values``,
    ``conv_states``/``recurrent_states``), 5.17's ``MambaCache`` (``conv_states``/``ssm_states``
    lists), older ``key_cache``/``value_cache`` lists, and the legacy tuple of (K, V) pairs.
    """
    holders = list(getattr(cache, "layers", None) or []) + [cache]
    found: dict[str, list] = {"key_value": [], "conv": [], "ssm": []}
    if isinstance(cache, (list, tuple)):  # legacy ((K, V), ...) per layer
        found["key_value"] = list(_tensors(cache))
    for holder in holders:
        for name, kind in compat.CACHE_FIELDS.items():
            found[kind] += list(_tensors(getattr(holder, name, None)))
    seen, sizes, dtypes = set(), {k: 0 for k in found}, {}
    for kind, tensors in found.items():
        for t in tensors:
            key = (t.data_ptr(), t.numel(), t.dtype) if t.numel() else id(t)
            if key in seen:
                continue
            seen.add(key)
            sizes[kind] += t.numel() * t.element_size()
            if t.numel():
                dtypes[kind] = str(t.dtype).removeprefix("torch.")
    return CacheBytes(sizes["key_value"], sizes["conv"], sizes["ssm"], dtypes, len(seen))
