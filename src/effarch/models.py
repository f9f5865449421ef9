"""The model registry and ``load_model``: hub models, the offline tiny zoo, random real-size configs.

Names map to :class:`ModelSpec` entries. Hub models are loaded offline-first: a model that is not
in the local Hugging Face cache fails in well under two seconds when the hub cannot be reached,
with an error that points at the tiny profile and at ``scripts/prefetch_models.py``. Memory is
checked before anything is allocated. Remote code never runs unless the caller opts in *and* the
revision is pinned to a commit.
"""

from __future__ import annotations

import difflib
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

from effarch import memory, profile

TROUBLE = "See TROUBLESHOOTING.md, section"
ZOO_NAMES = ("tiny-mamba", "tiny-transformer", "tiny-moe", "tiny-hybrid")
ROLES = ("mamba", "transformer", "moe", "hybrid")


class ModelError(RuntimeError):
    """Base class: every message says what to do and names a TROUBLESHOOTING.md section."""


class UnknownModelError(ModelError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class ModelNotAvailableOffline(ModelError, OSError):
    pass


class RemoteCodeError(ModelError):
    pass


class ZooModelMissing(ModelError, FileNotFoundError):
    pass


class QuantizationUnavailable(ModelError):
    pass


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry. ``config`` holds the published hyperparameters for random weights."""

    name: str
    role: str
    hub_id: str | None = None
    revision: str = "main"
    family: str = ""                       # transformers model_type
    config: dict = field(default_factory=dict)
    published_params: float | None = None  # total parameters reported by the authors
    published_active: float | None = None
    remote_code: bool = False
    zoo: bool = False
    skip_quantization: tuple[str, ...] = ()
    note: str = ""


_MAMBA = dict(state_size=16, expand=2, conv_kernel=4, vocab_size=50280, tie_word_embeddings=True,
              pad_vocab_size_multiple=8, time_step_rank="auto", use_conv_bias=True, use_bias=False,
              layer_norm_epsilon=1e-5, residual_in_fp32=True, bos_token_id=0, eos_token_id=0)
_MAMBA_SKIP = ("dt_proj", "lm_head")  # FACTS.md: 8-bit Mamba needs these kept in float

REGISTRY: dict[str, ModelSpec] = {s.name: s for s in [
    ModelSpec("mamba-130m", "mamba", "state-spaces/mamba-130m-hf", family="mamba",
              config=dict(_MAMBA, hidden_size=768, num_hidden_layers=24),
              published_params=129.1e6, skip_quantization=_MAMBA_SKIP,
              note="the test-size Mamba (Gu & Dao 2023)"),
    ModelSpec("mamba-2.8b", "mamba", "state-spaces/mamba-2.8b-hf", family="mamba",
              config=dict(_MAMBA, hidden_size=2560, num_hidden_layers=64),
              published_params=2.77e9, skip_quantization=_MAMBA_SKIP),
    ModelSpec("phi-2", "transformer", "microsoft/phi-2", family="phi",
              config=dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=32, vocab_size=51200,
                          max_position_embeddings=2048, partial_rotary_factor=0.4,
                          hidden_act="gelu_new", layer_norm_eps=1e-5, rope_theta=10000.0,
                          tie_word_embeddings=False, bos_token_id=50256, eos_token_id=50256),
              published_params=2.78e9, note="positions stop at 2,048"),
    ModelSpec("olmoe-1b-7b", "moe", "allenai/OLMoE-1B-7B-0924", family="olmoe",
              config=dict(hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                          num_attention_heads=16, num_key_value_heads=16, vocab_size=50304,
                          num_experts=64, num_experts_per_tok=8, norm_topk_prob=False,
                          max_position_embeddings=4096, rope_theta=10000.0,
                          tie_word_embeddings=False, pad_token_id=1, eos_token_id=50279),
              published_params=6.92e9, published_active=1.28e9),
    ModelSpec("mixtral-8x7b", "moe", "mistralai/Mixtral-8x7B-v0.1", family="mixtral",
              config=dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                          num_local_experts=8, num_experts_per_tok=2,
                          max_position_embeddings=32768, rope_theta=1e6,
                          tie_word_embeddings=False),
              published_params=46.7e9, published_active=12.9e9,
              note="bf16 ~93 GB; 4/8-bit through BitsAndBytesConfig"),
    ModelSpec("qwen1.5-moe-a2.7b", "moe", "Qwen/Qwen1.5-MoE-A2.7B", family="qwen2_moe",
              config=dict(hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
                          shared_expert_intermediate_size=5632, num_hidden_layers=24,
                          num_attention_heads=16, num_key_value_heads=16, vocab_size=151936,
                          num_experts=60, num_experts_per_tok=4, norm_topk_prob=False,
                          decoder_sparse_step=1, max_position_embeddings=8192,
                          tie_word_embeddings=False),
              published_params=14.3e9, published_active=2.7e9),
    ModelSpec("deepseek-v2-lite", "moe", "deepseek-ai/DeepSeek-V2-Lite", family="deepseek_v2",
              config=dict(hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                          num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
                          vocab_size=102400, n_routed_experts=64, n_shared_experts=2,
                          num_experts_per_tok=6, first_k_dense_replace=1, moe_layer_freq=1,
                          kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128,
                          qk_rope_head_dim=64, v_head_dim=128, head_dim=64,
                          max_position_embeddings=163840, tie_word_embeddings=False),
              published_params=15.7e9, published_active=2.4e9),
    ModelSpec("jamba-v0.1", "hybrid", "ai21labs/Jamba-v0.1", family="jamba",
              config=dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=8, vocab_size=65536,
                          num_experts=16, num_experts_per_tok=2, expert_layer_period=2,
                          expert_layer_offset=1, attn_layer_period=8, attn_layer_offset=4,
                          mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=256,
                          mamba_conv_bias=True, mamba_proj_bias=False,
                          max_position_embeddings=262144, tie_word_embeddings=False),
              published_params=51.6e9, published_active=12e9, skip_quantization=("mamba",),
              note="for the memory table; bf16 ~103 GB"),
    ModelSpec("deepseek-moe-16b", "moe", "deepseek-ai/deepseek-moe-16b-base",
              family="deepseek", remote_code=True, published_params=16.4e9,
              published_active=2.8e9,
              note="needs remote code that no longer runs on current transformers: opt-in only"),
]}
for _name, _role in zip(ZOO_NAMES, ROLES, strict=True):
    REGISTRY[_name] = ModelSpec(_name, _role, zoo=True,
                                note="trained by scripts/train_zoo.py on data/corpus")

# The model each role uses in each profile (CURRICULUM.md).
FULL_BY_ROLE = {"mamba": "mamba-2.8b", "transformer": "phi-2", "moe": "olmoe-1b-7b",
                "hybrid": "jamba-v0.1"}


def full_profile_names() -> list[str]:
    """The hub models the full profile loads pretrained (Jamba only ever sizes the memory table)."""
    return [FULL_BY_ROLE[r] for r in ("mamba", "transformer", "moe")]


def name_for(role: str, prof: profile.Profile | None = None) -> str:
    """Registry name of the model that plays ``role`` in the profile (``tiny-mamba``, ...)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
    prof = prof or profile.get_profile()
    return f"tiny-{role}" if prof.is_tiny else FULL_BY_ROLE[role]


def get_spec(name: str) -> ModelSpec:
    """The registry entry for a name or hub id; unknown names list the closest ones."""
    if name in REGISTRY:
        return REGISTRY[name]
    for spec in REGISTRY.values():
        if spec.hub_id and spec.hub_id.lower() == name.lower():
            return spec
    if "/" in name:  # a hub id outside the registry is allowed, loaded as given
        return ModelSpec(name, "unknown", hub_id=name)
    close = difflib.get_close_matches(name, list(REGISTRY), n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UnknownModelError(
        f"unknown model {name!r}.{hint} Registry names: {', '.join(sorted(REGISTRY))}; "
        f"or pass a hub id such as 'state-spaces/mamba-130m-hf'. {TROUBLE} 'Unknown model'.")


def zoo_path(name: str) -> Path:
    return profile.zoo_dir() / name


def get_config(name: str):
    """The transformers config of a registry model: published real size, or the zoo's own."""
    from transformers import CONFIG_MAPPING, AutoConfig

    spec = get_spec(name)
    if spec.zoo:
        _check_zoo(name)
        return AutoConfig.from_pretrained(zoo_path(name))
    if spec.config:
        return CONFIG_MAPPING[spec.family](**spec.config)
    raise ModelError(f"{name} has no real-size config in the registry (it needs remote code); "
                     f"{TROUBLE} 'Remote-code models'.")


def _head(path: Path, n: int = 8) -> bytes:
    with path.open("rb") as f:
        return f.read(n)


def _check_zoo(name: str) -> None:
    path = zoo_path(name)
    weights = path / "model.safetensors"
    if not (path / "config.json").is_file() or not weights.is_file():
        raise ZooModelMissing(
            f"the zoo model {name!r} is missing ({path}). Rebuild it with "
            "`python scripts/train_zoo.py` (GPU recommended) or restore it with "
            f"`git checkout -- data/zoo`. {TROUBLE} 'Missing data files'.")
    if weights.stat().st_size < 1024 or _head(weights) == b"version ":
        raise ZooModelMissing(
            f"{weights} is not a weight file (a Git LFS pointer or truncated?). Restore it with "
            "`git checkout -- data/zoo` or rebuild with `python scripts/train_zoo.py`. "
            f"{TROUBLE} 'Missing data files'.")


# --- hub access ------------------------------------------------------------------------------


def hub_reachable(timeout: float = 1.0) -> bool:
    """False when ``HF_HUB_OFFLINE`` is set or the hub's host cannot be reached within ``timeout``."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    from urllib.parse import urlparse

    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    # getaddrinfo has no timeout of its own: resolve in a daemon thread and stop waiting.
    import threading

    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, 443), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(result and result[0])


def is_cached(name: str, revision: str | None = None) -> bool:
    """True when the model's config and safetensors weights are in the local hub cache."""
    from huggingface_hub import try_to_load_from_cache

    spec = get_spec(name)
    if spec.zoo:  # present means loadable: not a Git LFS pointer or a truncated file
        try:
            _check_zoo(name)
        except ZooModelMissing:
            return False
        return True
    rev = revision or spec.revision
    found = [try_to_load_from_cache(spec.hub_id, f, revision=rev)
             for f in ("config.json", "model.safetensors", "model.safetensors.index.json")]
    return isinstance(found[0], str) and any(isinstance(f, str) for f in found[1:])


def _offline_error(spec: ModelSpec) -> ModelNotAvailableOffline:
    return ModelNotAvailableOffline(
        f"{spec.hub_id} is not in the local Hugging Face cache and the hub cannot be reached. "
        "Offline, use the tiny profile (EFFARCH_PROFILE=tiny: the course's own zoo) or random "
        "weights at the real size (EFFARCH_WEIGHTS=random). To fetch it, run "
        f"`python scripts/prefetch_models.py {spec.name}` on a machine that is online. "
        f"{TROUBLE} 'Offline: models not in the cache'.")


# --- loading ---------------------------------------------------------------------------------


@dataclass
class ModelRecord:
    """What was loaded: enough to label every measurement made with it."""

    name: str
    hub_id: str | None
    revision: str | None
    dtype: str
    device: str
    parameters: int
    parameter_bytes: int
    random_weights: bool
    quantization: str | None
    tokenizer: str
    notes: list[str] = field(default_factory=list)


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    record: ModelRecord

    def __iter__(self):  # model, tokenizer = load_model(...)
        return iter((self.model, self.tokenizer))


def _resolve_dtype(dtype, device: str):
    import torch

    if dtype is None:
        return torch.float32 if device in ("cpu", "meta") else torch.bfloat16
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _quantization_config(spec: ModelSpec, quantization: str | None, dtype):
    if quantization is None:
        return None
    if quantization not in ("8bit", "4bit"):
        raise ValueError(f"quantization must be None, '8bit' or '4bit', not {quantization!r}")
    import torch

    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except Exception as exc:  # ImportError or a broken native library
        raise QuantizationUnavailable(
            f"bitsandbytes cannot be imported here ({exc.__class__.__name__}: {exc}). Install "
            f"the quant extra (`pip install -e '.[quant]'`). {TROUBLE} 'Quantisation'.") from exc
    if not torch.cuda.is_available():
        raise QuantizationUnavailable(
            "8-bit and 4-bit loading through bitsandbytes need a CUDA GPU; none is visible. "
            f"Load in bfloat16 or use the tiny profile. {TROUBLE} 'Quantisation'.")
    skip = list(spec.skip_quantization) or None
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=skip)


def _check_remote_code(spec: ModelSpec, revision: str, trust_remote_code: bool) -> None:
    if not (spec.remote_code or trust_remote_code):
        return
    if not trust_remote_code:
        raise RemoteCodeError(
            f"{spec.hub_id} needs remote code (Python files from the hub that run on your "
            "machine). Opt in with trust_remote_code=True and a pinned revision=<commit sha>. "
            f"{TROUBLE} 'Remote-code models'.")
    if not re.fullmatch(r"[0-9a-f]{40}", revision or ""):
        raise RemoteCodeError(
            f"remote code runs only from a pinned commit: pass revision=<40-hex commit sha> for "
            f"{spec.hub_id} (got {revision!r}). {TROUBLE} 'Remote-code models'.")


def load_model(name: str, *, weights: str = "pretrained", dtype=None,
               quantization: str | None = None, device: str | None = None, device_map=None,
               revision: str | None = None, trust_remote_code: bool = False,
               force: bool = False, overrides: dict | None = None) -> LoadedModel:
    """Load a registry model, a zoo model or a hub id, offline-first and memory-checked.

    ``weights="random"`` builds the registry's real-size config with random weights (no
    download; ``device="meta"`` allocates nothing, for sizing). The tokenizer of the tiny zoo
    stands in for hub tokenizers in that case, and the record says so. ``overrides`` changes
    fields of that config (random weights only: fewer layers for a smoke run, more positions to
    measure past a model's limit); the record lists them.
    """
    if weights not in ("pretrained", "random"):
        raise ValueError(f"weights must be 'pretrained' or 'random', not {weights!r}")
    spec = get_spec(name)
    device = device or profile.default_device()
    torch_dtype = _resolve_dtype(dtype, device)
    revision = revision or spec.revision
    _check_remote_code(spec, revision, trust_remote_code)
    if quantization is not None and (weights == "random" or spec.zoo):
        _quantization_config(spec, quantization, torch_dtype)  # says why it cannot run here
        raise ValueError(
            "quantisation applies to pretrained hub weights; to size a quantised model use "
            f"effarch.memory.estimate_weights_bytes({name!r}, quantization={quantization!r})")
    if overrides and weights != "random":
        raise ValueError("overrides change the config of random weights only (weights='random')")
    if weights == "random" or spec.zoo:
        return _load_local(spec, weights, torch_dtype, device, force, overrides or {})
    return _load_hub(spec, torch_dtype, quantization, device, device_map, revision,
                     trust_remote_code, force)


def _estimate(cfg, dtype, quantization=None) -> int | None:
    try:
        return memory.estimate_weights_bytes(cfg, str(dtype).replace("torch.", ""), quantization)
    except Exception:  # a family the formula does not know: no estimate, no guard
        return None


def _guard(spec: ModelSpec, cfg, dtype, quantization, device: str, force: bool,
           notes: list[str]) -> None:
    needed = _estimate(cfg, dtype, quantization)
    if needed is None:
        notes.append("memory not checked: no footprint formula for this family")
        return
    if force or device == "meta":
        return
    memory.require(needed, device=device,
                   what=f"{spec.name} ({str(dtype).replace('torch.', '')}"
                        f"{', ' + quantization if quantization else ''})")


def _zoo_tokenizer(notes: list[str], standing_in: bool):
    from effarch import data

    try:
        tok = data.load_tokenizer()  # cached and shared: do not modify it in place
    except data.MissingDataError:
        notes.append("no tokenizer: the zoo tokenizer (data/zoo/tokenizer) is missing")
        return None
    if standing_in:
        notes.append("random weights: the tiny zoo's tokenizer stands in for the model's own; "
                     "generated text is meaningless, memory and speed are real")
    return tok


RANDOM_INIT_STD = 0.02
"""Standard deviation of random weights (``initializer_range``) at the real configs. transformers'
Mamba default, 0.1, grows Mamba-2.8B's random residual stream to ~1e5 (16 of its 64 layers:
data/measurements/random_init_probe_cpu.txt, scripts/probe_random_init.py): bf16 logits then differ from float32 by more than their own size and every numeric
comparison is noise. With 0.02 — what the other families use — it stays near 1 and bf16 is
within 0.12 of float32 (logits up to 4). Speed and memory do not depend on it."""


def _tame_random_init(cfg, notes: list[str]) -> None:
    current = getattr(cfg, "initializer_range", None)
    if current is not None and current > RANDOM_INIT_STD:
        cfg.initializer_range = RANDOM_INIT_STD
        notes.append(f"random weights drawn with initializer_range {RANDOM_INIT_STD} (the "
                     f"config says {current}, which makes a deep random model's activations "
                     f"explode)")


def _load_local(spec: ModelSpec, weights: str, dtype, device: str, force: bool,
                overrides: dict) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM

    notes: list[str] = []
    cfg = get_config(spec.name)
    for key, value in overrides.items():
        if not hasattr(cfg, key):
            raise ValueError(f"{spec.name}'s config has no field {key!r}")
        setattr(cfg, key, value)
        notes.append(f"config changed: {key}={value!r} (not the published model)")
    _guard(spec, cfg, dtype, None, device, force, notes)
    if weights == "random":
        _tame_random_init(cfg, notes)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(zoo_path(spec.name), dtype=dtype,
                                                     use_safetensors=True).to(device)
    model.eval()
    tok = _zoo_tokenizer(notes, standing_in=not spec.zoo)
    rec = _record(spec, model, None if spec.zoo else spec.revision, dtype, device,
                  weights == "random", None, "zoo" if tok is not None else "none", notes)
    return LoadedModel(model, tok, rec)


def _load_hub(spec, dtype, quantization, device, device_map, revision, trust_remote_code,
              force) -> LoadedModel:
    from huggingface_hub import snapshot_download
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    notes: list[str] = []
    cached = is_cached(spec.name, revision)
    if not cached and not hub_reachable():
        raise _offline_error(spec)
    # A cached model is read from its snapshot folder, which never touches the network.
    source = snapshot_download(spec.hub_id, revision=revision, local_files_only=True) if cached \
        else spec.hub_id
    kw = dict(revision=None if cached else revision, trust_remote_code=trust_remote_code)
    cfg = get_config(spec.name) if spec.config else AutoConfig.from_pretrained(source, **kw)
    _guard(spec, cfg, dtype, quantization, device, force, notes)
    qcfg = _quantization_config(spec, quantization, dtype)
    if qcfg is not None and device_map is None:
        device_map = {"": device}
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, quantization_config=qcfg, device_map=device_map,
        use_safetensors=True, **kw)
    if device_map is None:
        model = model.to(device)
    model.eval()
    tok = AutoTokenizer.from_pretrained(source, **kw)
    rec = _record(spec, model, revision, dtype, device, False, quantization, spec.hub_id, notes)
    return LoadedModel(model, tok, rec)


def _record(spec, model, revision, dtype, device, random_weights, quantization, tokenizer,
            notes) -> ModelRecord:
    params = list(model.parameters())
    return ModelRecord(
        name=spec.name, hub_id=spec.hub_id, revision=revision,
        dtype=str(dtype).replace("torch.", ""), device=str(params[0].device) if params else device,
        parameters=sum(p.numel() for p in params),
        parameter_bytes=sum(p.numel() * p.element_size() for p in params),
        random_weights=random_weights, quantization=quantization, tokenizer=tokenizer,
        notes=notes)


def unload() -> None:
    """Return freed model memory to the device before the next model is measured (labs compare
    one at a time). Delete your own references first (``del model``): only then is it free."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
