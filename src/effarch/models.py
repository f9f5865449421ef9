"""The model registry and ``load_model``: hub models, the offline tiny zoo, random real-size configs.

Names map to :class:`ModelSpec` entries. Hub models are loaded offline-first: a model that is not
in the local Hugging Face cache fails in well under two seconds when the hub cannot be reached,
with an error that points at the tiny profile and at ``scripts/prefetch_models.py``. Memory is
checked before anything is allocated. Remote code never runs unless the caller opts in *and* the
revision is pinned to a commit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from effarch import memory, profile, registry
from effarch.registry import (  # noqa: F401  (re-exported: the labs' names for them)
    FULL_BY_ROLE,
    REGISTRY,
    ROLES,
    TROUBLE,
    ZOO_NAMES,
    ModelError,
    ModelNotAvailableOffline,
    ModelSpec,
    QuantizationUnavailable,
    RemoteCodeError,
    UnknownModelError,
    ZooModelMissing,
    as_spec,
    full_profile_names,
    get_config,
    get_spec,
    hub_reachable,
    is_cached,
    zoo_path,
)


def name_for(role: str, prof: profile.Profile | None = None) -> str:
    """Registry name of the model that plays ``role`` in the profile (``tiny-mamba``, ...)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; roles are {', '.join(ROLES)}. "
                         f"{TROUBLE} 'Unknown names and values'.")
    prof = prof or profile.get_profile()
    return f"tiny-{role}" if prof.is_tiny else FULL_BY_ROLE[role]



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


DTYPES = ("float32", "float16", "bfloat16", "float64")


def _resolve_dtype(dtype, device: str):
    """A torch dtype from None (float32 on the CPU, bfloat16 elsewhere), a name or a dtype."""
    import torch

    if dtype is None:
        return torch.float32 if device in ("cpu", "meta") else torch.bfloat16
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one a model can be loaded in; use one of "
                         f"{', '.join(DTYPES)} (or the torch dtype, e.g. torch.bfloat16). For 8- or "
                         f"4-bit weights pass quantization='8bit' or '4bit' instead. "
                         f"{TROUBLE} 'Unknown names and values'.")
    return getattr(torch, name)


def _quantization_config(spec: ModelSpec, quantization: str | None, dtype):
    if quantization is None:
        return None
    if quantization not in ("8bit", "4bit"):
        raise ValueError(f"quantization must be None, '8bit' or '4bit', not {quantization!r}. "
                         f"{TROUBLE} 'Unknown names and values'.")
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


def load_model(name: str | ModelSpec, *, weights: str = "pretrained", dtype=None,
               quantization: str | None = None, device: str | None = None, device_map=None,
               revision: str | None = None, trust_remote_code: bool = False,
               force: bool = False, overrides: dict | None = None,
               zoo_dir=None) -> LoadedModel:
    """Load a registry model, a zoo model or a hub id, offline-first and memory-checked.

    ``weights="random"`` builds the registry's real-size config with random weights (no
    download; ``device="meta"`` allocates nothing, for sizing). The tokenizer of the tiny zoo
    stands in for hub tokenizers in that case, and the record says so. ``overrides`` changes
    fields of that config (random weights only: fewer layers for a smoke run, more positions to
    measure past a model's limit); the record lists them. ``zoo_dir`` reads a zoo model from
    another folder than ``data/zoo`` (a freshly trained zoo).
    """
    if weights not in ("pretrained", "random"):
        raise ValueError(f"weights must be 'pretrained' or 'random', not {weights!r}. "
                         f"{TROUBLE} 'Unknown names and values'.")
    spec = as_spec(name)
    device = device or profile.default_device()
    torch_dtype = _resolve_dtype(dtype, device)
    revision = revision or spec.revision
    _check_remote_code(spec, revision, trust_remote_code)
    if quantization is not None and (weights == "random" or spec.zoo):
        _quantization_config(spec, quantization, torch_dtype)  # says why it cannot run here
        raise ValueError(
            "quantisation applies to pretrained hub weights; to size a quantised model use "
            f"effarch.memory.estimate_weights_bytes({spec.name!r}, "
            f"quantization={quantization!r}). {TROUBLE} 'Quantisation'.")
    if overrides and weights != "random":
        raise ValueError("overrides change the config of random weights only (weights='random'). "
                         f"{TROUBLE} 'Random weights at the real size'.")
    if weights == "random" or spec.zoo:
        return _load_local(spec, weights=weights, dtype=torch_dtype, device=device, force=force,
                           overrides=overrides or {}, zoo_dir=zoo_dir)
    return _load_hub(spec, dtype=torch_dtype, quantization=quantization, device=device,
                     device_map=device_map, revision=revision,
                     trust_remote_code=trust_remote_code, force=force)


def _estimate(cfg, dtype, quantization=None, skip=None, notes=None) -> int | None:
    name = str(dtype).replace("torch.", "")
    if quantization is not None:
        try:  # the modules bitsandbytes replaces, from a meta-device build of the config
            return memory.estimate_weights_bytes(cfg, name, quantization, skip_modules=skip)
        except Exception as exc:  # never guess low: size it unquantised instead
            if notes is not None:
                notes.append(f"memory checked as if unquantised (quantised size unknown: "
                             f"{type(exc).__name__})")
    try:
        return memory.estimate_weights_bytes(cfg, name)
    except Exception:  # a family the formula does not know: no estimate, no guard
        return None


def _guard(spec: ModelSpec, cfg, *, dtype, quantization, device: str, force: bool,
           notes: list[str]) -> None:
    needed = _estimate(cfg, dtype, quantization, list(spec.skip_quantization) or None, notes)
    if needed is None:
        notes.append("memory not checked: no footprint formula for this family")
        return
    if force or device == "meta":
        return
    memory.require(needed, device=device, suggestions=_moe_tips(spec, cfg),
                   what=f"{spec.name} ({str(dtype).replace('torch.', '')}"
                        f"{', ' + quantization if quantization else ''})")


def _moe_tips(spec: ModelSpec, cfg) -> tuple[str, ...]:
    """What to try when an MoE does not fit: bitsandbytes leaves its fused experts in bf16, so
    "quantise it" alone would mislead (empty: the guard's general advice)."""
    if not memory.n_routed_experts(cfg):
        return ()
    try:
        q4 = memory.estimate_weights_bytes(cfg, quantization="4bit",
                                           skip_modules=list(spec.skip_quantization) or None)
    except Exception:  # no module tree for this family: the general advice
        return ()
    return (f"4-bit would still need {q4 / memory.GiB:.1f} GiB: bitsandbytes leaves an MoE's "
            "fused experts in bf16 (TROUBLESHOOTING.md, 'bitsandbytes on MoE experts')",
            "use a smaller MoE (OLMoE-1B-7B) or the tiny profile (EFFARCH_PROFILE=tiny)")


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


def _load_local(spec: ModelSpec, *, weights: str, dtype, device: str, force: bool,
                overrides: dict, zoo_dir) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM

    notes: list[str] = []
    cfg = get_config(spec, zoo_dir=zoo_dir)
    for key, value in overrides.items():
        if not hasattr(cfg, key):
            raise ValueError(f"{spec.name}'s config has no field {key!r}. "
                             f"{TROUBLE} 'Random weights at the real size'.")
        setattr(cfg, key, value)
        notes.append(f"config changed: {key}={value!r} (not the published model)")
    _guard(spec, cfg, dtype=dtype, quantization=None, device=device, force=force, notes=notes)
    if weights == "random":
        _tame_random_init(cfg, notes)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(zoo_path(spec, zoo_dir), dtype=dtype,
                                                     use_safetensors=True).to(device)
    model.eval()
    tok = _zoo_tokenizer(notes, standing_in=not spec.zoo)
    rec = _record(spec, model, revision=None if spec.zoo else spec.revision, dtype=dtype,
                  device=device, random_weights=weights == "random", quantization=None,
                  tokenizer="zoo" if tok is not None else "none", notes=notes)
    return LoadedModel(model, tok, rec)


def _load_hub(spec: ModelSpec, *, dtype, quantization, device, device_map, revision,
              trust_remote_code, force) -> LoadedModel:
    from huggingface_hub import snapshot_download
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    notes: list[str] = []
    cached = is_cached(spec, revision)
    if not cached and not hub_reachable():
        raise registry.offline_error(spec)
    # A cached model is read from its snapshot folder, which never touches the network.
    source = snapshot_download(spec.hub_id, revision=revision, local_files_only=True) if cached \
        else spec.hub_id
    kw = dict(revision=None if cached else revision, trust_remote_code=trust_remote_code)
    cfg = get_config(spec) if spec.config else AutoConfig.from_pretrained(source, **kw)
    _guard(spec, cfg, dtype=dtype, quantization=quantization, device=device, force=force,
           notes=notes)
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
    rec = _record(spec, model, revision=revision, dtype=dtype, device=device,
                  random_weights=False, quantization=quantization, tokenizer=spec.hub_id,
                  notes=notes)
    return LoadedModel(model, tok, rec)


def _record(spec, model, *, revision, dtype, device, random_weights, quantization, tokenizer,
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
