"""The model registry: names, hub ids, published real-size configs, the zoo, hub and cache checks.

One :class:`ModelSpec` per name. A name is resolved to its spec once (:func:`get_spec`) and the spec
is passed down. Nothing here builds a model: :mod:`effarch.models` loads them. Configs come from
the registry's published hyperparameters (random weights at the real size) or from the zoo's
folder (:func:`get_config`).
"""

from __future__ import annotations

import difflib
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from effarch import paths
from effarch.paths import TROUBLE

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
_MAMBA_SKIP = ("dt_proj", "lm_head")  # 8-bit Mamba needs these in float ("expected scalar type Float but found Char")
# AI21 keeps Jamba's Mamba layers unquantised (its model card: llm_int8_skip_modules=["mamba"]);
# transformers 5 matches skip names from the start of a module's name or as its suffix, so
# "mamba" alone no longer matches "model.layers.0.mamba.in_proj" (tests/test_memory.py).
_JAMBA_SKIP = (r"model\.layers\.\d+\.mamba", "lm_head")

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
              published_params=6.9e9, published_active=1.3e9),
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
              published_params=51.6e9, published_active=12e9, skip_quantization=_JAMBA_SKIP,
              note="for the memory table; bf16 ~103 GB"),
    ModelSpec("deepseek-moe-16b", "moe", "deepseek-ai/deepseek-moe-16b-base",
              family="deepseek", remote_code=True, published_params=16.4e9,
              published_active=2.8e9,
              note="needs remote code that no longer runs on current transformers: opt-in only"),
]}
for _name, _role in zip(ZOO_NAMES, ROLES, strict=True):
    REGISTRY[_name] = ModelSpec(_name, _role, zoo=True,
                                note="trained by scripts/train_zoo.py on data/corpus")

# The model each role uses in each profile (README.md, "Profiles").
FULL_BY_ROLE = {"mamba": "mamba-2.8b", "transformer": "phi-2", "moe": "olmoe-1b-7b",
                "hybrid": "jamba-v0.1"}


def full_profile_names() -> list[str]:
    """The hub models the full profile loads pretrained (Jamba only ever sizes the memory table)."""
    return [FULL_BY_ROLE[r] for r in ("mamba", "transformer", "moe")]


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


def as_spec(name_or_spec: str | ModelSpec) -> ModelSpec:
    """A spec as given, or the registry's for a name: callers resolve a name once."""
    return name_or_spec if isinstance(name_or_spec, ModelSpec) else get_spec(name_or_spec)


def zoo_path(name_or_spec: str | ModelSpec, zoo_dir: Path | None = None) -> Path:
    """The folder of a zoo model: ``data/zoo/<name>``, or ``<zoo_dir>/<name>`` when given (a
    freshly trained zoo somewhere else, as ``scripts/eval_zoo.py --zoo`` evaluates)."""
    return Path(zoo_dir or paths.zoo_dir()) / as_spec(name_or_spec).name


def get_config(name_or_spec: str | ModelSpec, *, zoo_dir: Path | None = None):
    """The transformers config of a registry model: published real size, or the zoo's own."""
    from transformers import CONFIG_MAPPING, AutoConfig

    spec = as_spec(name_or_spec)
    if spec.zoo:
        check_zoo(spec, zoo_dir)
        return AutoConfig.from_pretrained(zoo_path(spec, zoo_dir))
    if spec.config:
        return CONFIG_MAPPING[spec.family](**spec.config)
    raise ModelError(f"{spec.name} has no real-size config in the registry (it needs remote "
                     f"code); {TROUBLE} 'Remote-code models'.")


def _head(path: Path, n: int = 8) -> bytes:
    with path.open("rb") as f:
        return f.read(n)


def check_zoo(name_or_spec: str | ModelSpec, zoo_dir: Path | None = None) -> None:
    """Raise :class:`ZooModelMissing`, saying how to restore it, unless the zoo model's config and
    weights are there and loadable (not a Git LFS pointer or a truncated file)."""
    name = as_spec(name_or_spec).name
    path = zoo_path(name, zoo_dir)
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


def is_cached(name_or_spec: str | ModelSpec, revision: str | None = None) -> bool:
    """True when the model's config and safetensors weights are in the local hub cache (for a
    zoo model: present and loadable)."""
    from huggingface_hub import try_to_load_from_cache

    spec = as_spec(name_or_spec)
    if spec.zoo:  # present means loadable: not a Git LFS pointer or a truncated file
        try:
            check_zoo(spec)
        except ZooModelMissing:
            return False
        return True
    rev = revision or spec.revision
    found = [try_to_load_from_cache(spec.hub_id, f, revision=rev)
             for f in ("config.json", "model.safetensors", "model.safetensors.index.json")]
    return isinstance(found[0], str) and any(isinstance(f, str) for f in found[1:])


def offline_error(spec: ModelSpec) -> ModelNotAvailableOffline:
    return ModelNotAvailableOffline(
        f"{spec.hub_id} is not in the local Hugging Face cache and the hub cannot be reached. "
        "Offline, use the tiny profile (EFFARCH_PROFILE=tiny: the course's own zoo) or random "
        "weights at the real size (EFFARCH_WEIGHTS=random). To fetch it, run "
        f"`python scripts/prefetch_models.py {spec.name}` on a machine that is online. "
        f"{TROUBLE} 'Offline: models not in the cache'.")


