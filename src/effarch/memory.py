"""Memory: what is available (unified-memory aware), what a model will need, and a guard.

On a discrete GPU the free device memory comes from ``torch.cuda.mem_get_info``. On an
integrated GPU that shares system memory (NVIDIA GB10 in DGX Spark, Jetson) ``mem_get_info``
under-reports (it ignores reclaimable page cache), so, as vLLM and SGLang do, we use
``psutil.virtual_memory().available``. On the CPU, the same psutil figure.

Weight footprints are estimated from a config by formula (no model is built), one term per
part of the network, so the estimate can be read and checked against a meta-device build.
Quantised footprints follow the module tree of a meta-device build (nothing is allocated):
which modules a quantiser replaces depends on their type, not on a formula (in transformers 5
bitsandbytes leaves an MoE's fused experts unquantised).
"""

from __future__ import annotations

from dataclasses import dataclass

from effarch import compat
from effarch.paths import TROUBLE

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
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPE_BYTES)}. "
                         f"{TROUBLE} 'Unknown names and values'.")
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
#
# One formula per part of the network, so a count can be read and checked: tests compare every
# family with a meta-device build (tests/test_memory.py, tests/test_moe.py), and lab 2.4.3 with
# a count from the module tree. effarch.moe.count_params is the same function for a model.

MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3",
                "phimoe", "granitemoe", "jamba")


def _get(cfg, *names, default=None):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def _attention_params(cfg) -> int:
    """One attention block: projections, their biases and any q/k norms inside it."""
    h = cfg.hidden_size
    heads = cfg.num_attention_heads
    mt = getattr(cfg, "model_type", "")
    bias = bool(getattr(cfg, "attention_bias", False))
    if getattr(cfg, "kv_lora_rank", None):  # DeepSeek multi-head latent attention (V2 §2.1)
        qk_head = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        q = (h * cfg.q_lora_rank + cfg.q_lora_rank * bias + cfg.q_lora_rank  # + q_a_layernorm
             + cfg.q_lora_rank * heads * qk_head if cfg.q_lora_rank else h * heads * qk_head)
        kv_a = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        kv = (h * kv_a + kv_a * bias + cfg.kv_lora_rank  # + kv_a_layernorm
              + cfg.kv_lora_rank * heads * (cfg.qk_nope_head_dim + cfg.v_head_dim))
        return q + kv + heads * cfg.v_head_dim * h + h * bias
    head_dim = _get(cfg, "head_dim", default=h // heads)
    kv_heads = _get(cfg, "num_key_value_heads", default=heads)
    qkv = h * head_dim * (heads + 2 * kv_heads)
    out = heads * head_dim * h
    if bias or mt == "phi":  # Phi's q, k, v and dense carry biases
        qkv += head_dim * (heads + 2 * kv_heads)
        out += h
    elif mt == "qwen2_moe":  # Qwen2 has q, k, v biases only
        qkv += head_dim * (heads + 2 * kv_heads)
    if mt == "olmoe":  # OLMoE normalises q and k over all heads (QK-norm)
        qkv += heads * head_dim + kv_heads * head_dim
    elif mt == "qwen3_moe":  # Qwen3 normalises each head of q and k (one norm of head_dim each)
        qkv += 2 * head_dim
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
    """Parameters of a model, part by part: ``total``; ``active`` = those one token uses.

    ``total = embedding + lm_head + attention + ssm + dense_mlp + routed_experts +
    shared_experts + router + norms`` and ``active = total - routed_experts + active_experts``:
    a token runs through ``experts_per_token`` of the ``n_experts`` routed experts of each of the
    ``moe_layers`` MoE layers, and through everything else (shared experts and routers included).
    The embedding table counts whole (the convention of Mixtral's and OLMoE's published figures).
    """

    total: int
    active: int
    embedding: int               # input embedding table (V, H)
    lm_head: int = 0             # output projection; 0 when tied to the embedding (one tensor)
    attention: int = 0           # attention blocks: projections, biases, q/k and latent norms
    ssm: int = 0                 # Mamba mixers
    dense_mlp: int = 0           # dense feed-forward layers
    routed_experts: int = 0      # every routed expert of every MoE layer
    active_experts: int = 0      # experts_per_token routed experts per MoE layer
    shared_experts: int = 0      # always-on experts (Qwen2-MoE: with their sigmoid gate)
    router: int = 0              # routers (H → E per MoE layer)
    norms: int = 0               # the decoder layers' norms and the final norm
    moe_layers: int = 0
    n_experts: int = 0
    experts_per_token: int = 0

    @property
    def per_expert(self) -> int:
        """Parameters of one routed expert (0 without MoE layers)."""
        return self.routed_experts // max(1, self.moe_layers * self.n_experts)


_PARTS = ("attention", "ssm", "dense_mlp", "routed_experts", "active_experts", "shared_experts",
          "router", "norms")


def count_params(cfg) -> ParamCount:
    """Total and per-token active parameters of a transformers config, by formula, part by part.

    Exact (tests: meta-device builds) for Llama-, Phi- and GPT-NeoX-style transformers, Mamba,
    Jamba and the MoE families of ``MOE_FAMILIES``. A tied LM head is the embedding's tensor and
    is counted once.
    """
    mt = getattr(cfg, "model_type", "")
    h, v = cfg.hidden_size, cfg.vocab_size
    emb = v * h
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    head_bias = v if mt == "phi" or getattr(cfg, "lm_head_bias", False) else 0
    head = 0 if tied else v * h + head_bias
    layernorm = mt in ("phi", "phimoe")  # LayerNorm with a bias, not RMSNorm
    parts = dict.fromkeys(_PARTS, 0)
    parts["norms"] = (2 if layernorm else 1) * h  # the final norm
    for i in range(cfg.num_hidden_layers):
        for key, n in _layer_parts(cfg, i).items():
            parts[key] += n
    total = emb + head + sum(n for k, n in parts.items() if k != "active_experts")
    moe = [i for i in range(cfg.num_hidden_layers) if is_moe_layer(cfg, i)]
    return ParamCount(int(total), int(total - parts["routed_experts"] + parts["active_experts"]),
                      int(emb), lm_head=int(head), moe_layers=len(moe),
                      n_experts=n_routed_experts(cfg) if moe else 0,
                      experts_per_token=experts_per_token(cfg) if moe else 0,
                      **{k: int(n) for k, n in parts.items()})


def _layer_parts(cfg, i: int) -> dict[str, int]:
    mt = getattr(cfg, "model_type", "")
    h = cfg.hidden_size
    if mt in ("mamba", "falcon_mamba"):
        return {"ssm": _mamba_mixer_params(cfg, h), "norms": h}
    if mt == "phi":  # parallel attention + MLP with one LayerNorm (weight and bias)
        return {"attention": _attention_params(cfg), "norms": 2 * h,
                "dense_mlp": _mlp_params(h, cfg.intermediate_size, gated=False, bias=True)}
    parts = {"norms": (4 if mt == "phimoe" else 2) * h}
    if mt == "jamba" and not _jamba_is_attention(cfg, i):
        parts["ssm"] = _mamba_mixer_params(cfg, h)
    else:
        parts["attention"] = _attention_params(cfg)
    parts.update(_ffn_parts(cfg, i))
    return parts


def _jamba_is_attention(cfg, i: int) -> bool:
    return i % cfg.attn_layer_period == cfg.attn_layer_offset


def n_routed_experts(cfg) -> int:
    """Routed experts per MoE layer (0 for a dense model), whatever the config calls them."""
    return int(_get(cfg, "num_local_experts", "num_experts", "n_routed_experts", default=0))


def experts_per_token(cfg) -> int:
    """Routed experts each token goes to, k (``num_experts_per_tok``; 0 for a dense model)."""
    return int(_get(cfg, "num_experts_per_tok", default=0)) if n_routed_experts(cfg) else 0


def is_moe_layer(cfg, i: int) -> bool:
    """Whether decoder layer ``i``'s feed-forward part is a mixture of experts, by each family's
    rule (Jamba: every ``expert_layer_period``-th; DeepSeek: after ``first_k_dense_replace``;
    Qwen-MoE: ``decoder_sparse_step`` and ``mlp_only_layers``)."""
    mt = getattr(cfg, "model_type", "")
    if n_routed_experts(cfg) <= (1 if mt == "jamba" else 0) or mt in ("mamba", "falcon_mamba"):
        return False
    if mt == "jamba":
        return i % cfg.expert_layer_period == cfg.expert_layer_offset
    if mt in ("deepseek_v2", "deepseek_v3"):
        return i >= cfg.first_k_dense_replace and i % getattr(cfg, "moe_layer_freq", 1) == 0
    if mt in ("qwen2_moe", "qwen3_moe"):
        step = getattr(cfg, "decoder_sparse_step", 1) or 1
        return i not in (getattr(cfg, "mlp_only_layers", None) or []) and (i + 1) % step == 0
    return True


def _ffn_parts(cfg, i: int) -> dict[str, int]:
    """Layer i's feed-forward part: a dense MLP, or routed experts, router and shared experts."""
    mt = getattr(cfg, "model_type", "")
    h = cfg.hidden_size
    if not is_moe_layer(cfg, i):
        return {"dense_mlp": _mlp_params(h, cfg.intermediate_size)}
    n_exp, k = n_routed_experts(cfg), experts_per_token(cfg)
    expert = _mlp_params(h, _get(cfg, "moe_intermediate_size", default=cfg.intermediate_size))
    shared = 0
    if mt == "qwen2_moe":  # one shared expert, scaled by a sigmoid gate (H → 1)
        shared = _mlp_params(h, cfg.shared_expert_intermediate_size) + h
    elif mt in ("deepseek_v2", "deepseek_v3"):  # n_shared_experts fused into one MLP
        shared = _mlp_params(h, cfg.moe_intermediate_size * (cfg.n_shared_experts or 0))
    # DeepSeek-V3's score-correction bias is a buffer in transformers, not a parameter
    return {"routed_experts": n_exp * expert, "active_experts": k * expert,
            "router": h * n_exp, "shared_experts": shared}


def estimate_weights_bytes(name_or_config, dtype="bfloat16", quantization: str | None = None,
                           *, skip_modules=None) -> int:
    """Bytes of a model's weights in ``dtype``, or as they load quantised (``"8bit"``,
    ``"4bit"`` through bitsandbytes, ``"fp8"`` through transformers' FineGrainedFP8Config,
    ``"4bit+experts"``: bitsandbytes 4-bit with the fused experts quantised afterwards).

    Unquantised: the parameter count (:func:`count_params`) times the dtype's size. Quantised:
    :func:`quantized_footprint`, module by module, from the model's module tree built on the
    meta device — bitsandbytes replaces only ``nn.Linear`` layers, so in transformers 5 an MoE's
    fused experts stay in ``dtype``. ``skip_modules`` are the modules kept unquantised
    (``llm_int8_skip_modules``); given a registry name and bitsandbytes, its
    ``skip_quantization`` by default, as ``effarch.models.load_model`` passes it.
    """
    cfg = _resolve_config(name_or_config)
    if quantization is None:
        return int(count_params(cfg).total * dtype_bytes(dtype))
    if skip_modules is None and isinstance(name_or_config, str) and quantization != "fp8":
        from effarch.registry import get_spec

        skip_modules = get_spec(name_or_config).skip_quantization or None
    return quantized_footprint(cfg, quantization, dtype, skip_modules=skip_modules).total_bytes


def _resolve_config(name_or_config):
    if isinstance(name_or_config, str):
        from effarch.registry import get_config

        return get_config(name_or_config)
    return name_or_config


# --- quantised weights: which modules a quantiser replaces, read from the module tree --------
#
# bitsandbytes (transformers' integrations/bitsandbytes.py, ``replace_with_bnb_linear``, the same
# in 5.17 and 5.24) replaces a module only when ``type(module) is nn.Linear`` (or GPT-2's
# ``Conv1D``) and the skip list does not match its name; without ``llm_int8_skip_modules`` that
# list is transformers' default (the output embedding, tied weights, the last parameter). In
# transformers 5 an MoE's experts are one module of fused 3-D parameters, not Linear layers, so
# bitsandbytes leaves them in the model's dtype. FineGrainedFP8Config (``replace_with_fp8_linear``)
# also replaces every module whose name ends in ``.experts``. tests/test_quantization.py compares
# this selection with transformers' own quantizers applied to meta-device models. ``4bit+experts``
# is bitsandbytes 4-bit plus its experimental ``bnb.nn.parametrize.replace_parameter_4bit`` applied
# to every fused expert tensor afterwards (``effarch.moe.quantize_experts_4bit``): transformers
# does not call it.

QUANTIZATIONS = ("8bit", "4bit", "fp8", "4bit+experts")
NF4_BLOCK = 64            # bitsandbytes 4-bit: one float32 absmax per block of 64 weights
NF4_CODE_BYTES = 16 * 4   # and the 16-entry NF4 table (float32) in each tensor's quant state
FP8_BLOCK = (128, 128)    # FineGrainedFP8Config's weight_block_size: one float32 scale per block


@dataclass(frozen=True)
class QuantizedFootprint:
    """Weights as a quantiser loads them: what it replaces, and what stays in ``dtype``.

    ``quantized_*``: the weights stored in 8 or 4 bits (scales included in the bytes);
    ``kept_*``: everything else (embeddings, norms, biases, routers, skipped modules — and, under
    bitsandbytes, the fused experts); ``expert_*``: the fused experts alone, as loaded.
    """

    quantization: str
    dtype: str
    total_bytes: int
    quantized_params: int
    quantized_bytes: int
    kept_params: int
    kept_bytes: int
    expert_params: int
    expert_bytes: int
    quantized_modules: tuple[str, ...]
    skip_modules: tuple[str, ...]

    @property
    def quantized_share(self) -> float:
        """Share of the parameters stored quantised."""
        return self.quantized_params / max(1, self.quantized_params + self.kept_params)


_META_MODELS: dict[str, object] = {}


def meta_model(cfg):
    """``cfg``'s causal LM built on the meta device (shapes only, nothing allocated); cached."""
    key = cfg.to_json_string()
    if key not in _META_MODELS:
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            _META_MODELS[key] = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    return _META_MODELS[key]


def quantization_skips(model, skip_modules=None) -> list[str]:
    """The names a quantiser leaves alone: ``skip_modules`` if given, else transformers' default
    (``get_keys_to_not_convert``: LM head, tied weights, last parameter), plus the model's
    ``_keep_in_fp32_modules`` — as ``HfQuantizer.get_modules_to_not_convert`` builds them."""
    from transformers.quantizers.base import get_keys_to_not_convert

    skips = list(skip_modules) if skip_modules is not None else get_keys_to_not_convert(model)
    return sorted(set(skips) | set(getattr(model, "_keep_in_fp32_modules", None) or ()))


def _is_fused_experts(module) -> bool:
    sizes = [p.shape[0] for p in module.parameters(recurse=False) if p.dim() == 3]
    return len(sizes) >= 2 and len(set(sizes)) == 1


def replaced_by(module, name: str, quantization: str, skips: list[str]) -> str | None:
    """``"linear"`` or ``"experts"`` when ``quantization`` replaces this module, else None."""
    import torch
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.quantizers_utils import should_convert_module

    if not should_convert_module(name, skips):
        return None
    if type(module) is torch.nn.Linear or (quantization != "fp8" and isinstance(module, Conv1D)):
        return "linear"
    if quantization == "fp8" and name.endswith(".experts"):
        return "experts"
    if quantization == "4bit+experts" and _is_fused_experts(module):
        return "experts"
    return None


def _quantized_bytes(shape, quantization: str, out_features: int) -> float:
    """Bytes of one weight stored quantised, with its scales."""
    n = 1
    for s in shape:
        n *= s
    if quantization == "8bit":  # int8 weights + one float32 scale (SCB) per output row
        return n + 4 * out_features
    if quantization in ("4bit", "4bit+experts"):  # two NF4 weights a byte + float32 absmaxes
        return -(-n // 2) + 4 * -(-n // NF4_BLOCK) + NF4_CODE_BYTES
    blocks = 1  # fp8: one byte a weight + a float32 scale per 128 x 128 block of each matrix
    for s, b in zip(shape[-2:], FP8_BLOCK, strict=True):
        blocks *= -(-s // b)
    return n + 4 * blocks * (n // (shape[-2] * shape[-1]))


def _strict_fp32(model, name: str, dtype) -> bool:
    """Whether transformers keeps parameter ``name`` in float32 whatever the half dtype asked
    (``_keep_in_fp32_modules_strict``, e.g. DeepSeek-V2's router ``gate.weight``)."""
    keys = getattr(model, "_keep_in_fp32_modules_strict", None) or ()
    return dtype_bytes(dtype) == 2 and any(
        name == k or name.endswith("." + k) or name.startswith(k + ".") or f".{k}." in name
        for k in keys)


def _weight_bytes(model, module, name: str, kind, quantization: str, dtype):
    """(parameters, bytes if quantised, bytes if kept, bytes as loaded) of ``module``'s own
    tensors; a tensor shared with a module seen before (a tied head) is skipped by the caller."""
    for pname, p in module.named_parameters(recurse=False):
        full = f"{name}.{pname}" if name else pname
        if kind and pname != "bias" and p.dim() >= 2:
            out = p.shape[1] if type(module).__name__ == "Conv1D" else p.shape[-2]
            yield p, _quantized_bytes(tuple(p.shape), quantization, out), True
        else:
            per = 4 if (kind == "linear" and quantization == "fp8") or _strict_fp32(
                model, full, dtype) else dtype_bytes(dtype)  # FP8Linear's bias is float32
            yield p, p.numel() * per, False


def quantized_footprint(cfg, quantization: str, dtype="bfloat16", *,
                        skip_modules=None) -> QuantizedFootprint:
    """Bytes of ``cfg``'s weights loaded with ``quantization`` (``"8bit"``, ``"4bit"``,
    ``"fp8"``, ``"4bit+experts"``), module by module on a meta-device build (:func:`meta_model`): replaced modules
    (:func:`replaced_by`) store their weights quantised with their scales; biases, norms,
    embeddings, routers and every module left alone stay in ``dtype`` (or float32 where
    transformers insists)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, not {quantization!r}. "
                         f"{TROUBLE} 'Unknown names and values'.")
    model = meta_model(cfg)
    skips = quantization_skips(model, skip_modules)
    seen: set[int] = set()
    sums = dict.fromkeys(("qp", "qb", "kp", "kb", "ep", "eb"), 0.0)
    names = []
    for name, module in model.named_modules():
        kind = replaced_by(module, name, quantization, skips)
        names += [name] if kind else []
        experts = _is_fused_experts(module)
        for p, nbytes, quantised in _weight_bytes(model, module, name, kind, quantization, dtype):
            if id(p) in seen:
                continue
            seen.add(id(p))
            tag = "q" if quantised else "k"
            sums[tag + "p"] += p.numel()
            sums[tag + "b"] += nbytes
            if experts:
                sums["ep"] += p.numel()
                sums["eb"] += nbytes
    s = {k: int(v) for k, v in sums.items()}
    return QuantizedFootprint(quantization, str(dtype).replace("torch.", ""), s["qb"] + s["kb"],
                              s["qp"], s["qb"], s["kp"], s["kb"], s["ep"], s["eb"],
                              tuple(names), tuple(skips))


@dataclass(frozen=True)
class WeightGroup:
    """The weights of one kind of module in a loaded model, as stored."""

    module_type: str   # e.g. "OlmoeExperts", "Linear4bit", "Linear"
    modules: int
    tensors: int
    bytes: int         # the tensors' own bytes (bitsandbytes 4-bit: packed, two weights a byte)
    scale_bytes: int   # quantisation scales kept beside them (bitsandbytes absmax / SCB)
    dtypes: tuple[str, ...]


def _state_bytes(state) -> int:
    """Bytes of a bitsandbytes 4-bit quant state: absmax and the code table."""
    total = 0
    for name in ("absmax", "code"):
        t = getattr(state, name, None)
        total += t.numel() * t.element_size() if hasattr(t, "element_size") else 0
    return total


def _scale_bytes(p) -> int:
    """Bytes of the scales bitsandbytes keeps beside a quantised weight (outside the tensor)."""
    scb = getattr(p, "SCB", None)            # Int8Params: one float32 scale per output row
    return _state_bytes(getattr(p, "quant_state", None)) + (  # Params4bit: its quant state
        scb.numel() * scb.element_size() if hasattr(scb, "element_size") else 0)


def _group_name(model, name: str, module) -> str:
    """A module's type; a tensor quantised by bitsandbytes' ``replace_parameter_4bit`` lives in
    ``<owner>.parametrizations.<tensor>``: named after its owner."""
    if ".parametrizations." not in name:
        return type(module).__name__
    owner = model.get_submodule(name.split(".parametrizations.")[0])
    return f"{type(owner).__name__.removeprefix('Parametrized')} (4-bit, parametrized)"


def weights_by_module_type(model) -> list[WeightGroup]:
    """A loaded model's parameters grouped by the type of the module that holds them, with
    their dtypes and bytes as stored (each tensor once): what a quantiser really changed."""
    groups: dict[str, dict] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        state = _state_bytes(getattr(module, "quant_state", None))  # a parametrization's
        if not own and not state:
            continue
        seen.update(id(p) for p in own)
        g = groups.setdefault(_group_name(model, name, module), dict(
            modules=0, tensors=0, bytes=0, scale_bytes=0, dtypes=set()))
        g["modules"] += bool(own)
        g["tensors"] += len(own)
        g["bytes"] += sum(p.numel() * p.element_size() for p in own)
        g["scale_bytes"] += sum(_scale_bytes(p) for p in own) + state
        g["dtypes"] |= {str(p.dtype).removeprefix("torch.") for p in own}
    return sorted((WeightGroup(name, g["modules"], g["tensors"], g["bytes"], g["scale_bytes"],
                               tuple(sorted(g["dtypes"]))) for name, g in groups.items()),
                  key=lambda w: -w.bytes)


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


# --- kept measurements of quantised loading -----------------------------------------------

PROBE_FILE = "probe_quantization_h100.json"


def kept_quantization_probe(name: str = PROBE_FILE) -> dict | None:
    """The kept output of ``scripts/probe_quantization.py --json`` in ``data/measurements/``
    (model, device, versions, one row per mode with the GPU memory a load left allocated and
    effarch's estimate), or None when no run was kept."""
    import json

    from effarch import paths

    path = paths.measurements_dir() / name
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
