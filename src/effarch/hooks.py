"""Context managers that record what a model computes inside; their hooks are always removed.

SSM internals (``capture_ssm``): Δ, B, C and the state h of Mamba layers (Gu & Dao 2023,
Algorithm 2), for transformers' ``MambaMixer`` and ``JambaMambaMixer``.

Why recompute instead of hooking the scan: the mixers read ``dt_proj.weight`` and
``conv1d.weight`` directly, so forward hooks on those submodules never fire, and the scan is a
module-level function (mamba-ssm kernel, mambapy's pscan or a PyTorch loop, depending on what
is installed) that we would have to monkey-patch. Instead a pre-hook on each mixer repeats its
computation from its own weights and input with ``effarch.ssm`` (which keeps every state), and
a forward hook compares the result with the mixer's real output: ``SSMTrace.max_abs_diff``
says how far the recording is from what the model computed.

Dimension letters as in ``effarch.ssm``: b batch, l length, d = d_inner channels, n state size.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial

import torch

from effarch import compat
from effarch.compat import has_previous_state, mixer_inputs
from effarch.decoding import TransformersDecoder, inference
from effarch.mixer import mixer_prefill
from effarch.paths import TROUBLE
from effarch.ssm import selective_scan_ref, selective_scan_states

__all__ = ["DecodeStep", "SSMCapture", "SSMTrace", "capture_mixer_inputs", "capture_ssm",
           "find_ssm_mixers", "recompute_mixer", "record_decode_step", "scan_arguments"]


# ================================================================ SSM internals (Mamba, Jamba)
@dataclass
class SSMTrace:
    """One Mamba layer in one forward pass; tensors detached, on CPU, float32."""

    delta: torch.Tensor  # (b, d, l) Δ after dt_proj's bias and softplus
    state: torch.Tensor  # (b, d, l, n) h_t after every step t (h_0 = 0 is not included)
    B: torch.Tensor  # (b, n, l) input-dependent B_t (Jamba: after b_layernorm)
    C: torch.Tensor  # (b, n, l) input-dependent C_t (Jamba: after c_layernorm)
    u: torch.Tensor  # (b, d, l) the SSM's input x_t (after in_proj, conv1d and activation)
    A: torch.Tensor  # (d, n) A = -exp(A_log)
    output: torch.Tensor  # (b, l, hidden) the mixer's real output
    max_abs_diff: float  # max |recomputed output - real output|

    @property
    def last_state(self) -> torch.Tensor:
        """h_l, (b, d, n): what the cache holds after this prefill."""
        return self.state[:, :, -1]


class SSMCapture(dict):
    """``{layer index: SSMTrace}``, filled while the model runs inside ``capture_ssm``.

    ``skipped[layer]`` counts the calls that were not recorded (decode steps, later passes).
    """

    def __init__(self) -> None:
        super().__init__()
        self.skipped: dict[int, int] = {}


def _mixer_classes() -> tuple[type, ...]:
    """The mixer classes we can recompute, imported lazily (a missing one is simply absent)."""
    classes = []
    with contextlib.suppress(ImportError):
        from transformers.models.mamba.modeling_mamba import MambaMixer

        classes.append(MambaMixer)
    with contextlib.suppress(ImportError):
        from transformers.models.jamba.modeling_jamba import JambaMambaMixer

        classes.append(JambaMambaMixer)
    return tuple(classes)


def find_ssm_mixers(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """``{layer index: mixer}`` for every Mamba mixer in ``model``, found by type."""
    classes = _mixer_classes()
    mixers = {m.layer_idx: m for m in model.modules() if classes and isinstance(m, classes)}
    return dict(sorted(mixers.items()))


@torch.no_grad()
def recompute_mixer(mixer: torch.nn.Module, hidden_states: torch.Tensor, attention_mask=None):
    """Repeat a Mamba mixer's prefill from its weights (``effarch.mixer.mixer_prefill``) with
    the reference scan that keeps every state.

    Args:
        hidden_states: (b, l, hidden), the mixer's input.
    Returns:
        (output (b, l, hidden) in the input's dtype, dict of u, delta (after the bias and the
        softplus), A, B, C, state (b, d, l, n)).
    """
    def scan(u, delta, A, B, C, *, D, z, delta_bias, delta_softplus):
        y, states, delta = selective_scan_states(u, delta, A, B, C, D=D, z=z,
                                                 delta_bias=delta_bias,
                                                 delta_softplus=delta_softplus)
        return y, (states, delta)

    run = mixer_prefill(mixer, hidden_states, scan=scan, attention_mask=attention_mask)
    states, delta = run.scan_result
    return run.output, {"u": run.u, "delta": delta, "A": run.A, "B": run.B, "C": run.C,
                        "state": states}


@torch.no_grad()
def scan_arguments(mixer: torch.nn.Module, hidden_states: torch.Tensor) -> dict:
    """The arguments a Mamba mixer hands its selective scan for ``hidden_states`` (b, l, hidden),
    in mamba-ssm's signature and in float32 (lab 2.4.2, Part B): u, delta (before bias and
    softplus), z (b, d, l); A (d, n); B, C (b, n, l); D, delta_bias (d,); delta_softplus."""
    seen = {}

    def scan(u, delta, A, B, C, *, D, z, delta_bias, delta_softplus):
        seen.update(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus)

    mixer_prefill(mixer, hidden_states, scan=scan)
    args = {k: v.detach().float() for k, v in seen.items() if v is not None}
    return {**args, "delta_softplus": True}


@torch.no_grad()
def capture_mixer_inputs(model: torch.nn.Module, input_ids: torch.Tensor,
                         layers) -> dict[int, torch.Tensor]:
    """Run ``model`` once on ``input_ids`` (b, l) and return ``{layer: the input its Mamba mixer
    received}``, (b, l, hidden), detached; the hooks are removed afterwards."""
    mixers, seen, handles = find_ssm_mixers(model), {}, []

    def keep(layer, module, args, kwargs):
        seen[layer] = mixer_inputs(args, kwargs)[0].detach()

    try:
        for layer in layers:
            handles.append(mixers[layer].register_forward_pre_hook(partial(keep, layer),
                                                                   with_kwargs=True))
        model(input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@dataclass
class DecodeStep:
    """One decode step of one Mamba layer, as transformers ran it (lab 2.4.2, Part B)."""

    mixer: torch.nn.Module
    x: torch.Tensor  # (b, hidden) the mixer's input for the new token
    conv_state: torch.Tensor  # (b, d, k) the cache's conv state before the step
    ssm_state: torch.Tensor  # (b, d, n) the cache's SSM state h before the step
    output: torch.Tensor  # (b, hidden) the mixer's output
    new_conv_state: torch.Tensor  # (b, d, k) the cache's conv state after the step
    new_ssm_state: torch.Tensor  # (b, d, n) after the step


def record_decode_step(model: torch.nn.Module, input_ids: torch.Tensor,
                       layers) -> dict[int, DecodeStep]:
    """Prefill ``input_ids[:, :-1]`` (b, l) through transformers with a cache, then feed the last
    token as one decode step, recording for each Mamba layer in ``layers`` its input and output
    and the cache's conv and SSM states before and after the step (clones, on the model's
    device)."""
    mixers = find_ssm_mixers(model)
    decoder, seen, handles = TransformersDecoder(model), {}, []

    def before(layer, module, args, kwargs):
        seen[layer] = {"x": mixer_inputs(args, kwargs)[0].detach()[:, -1].clone()}

    def after(layer, module, args, kwargs, output):
        out = output[0] if isinstance(output, tuple) else output
        seen[layer]["output"] = out.detach()[:, -1].clone()

    def states(layer):
        return (compat.conv_state(decoder.cache, layer).detach().clone(),
                compat.recurrent_state(decoder.cache, layer).detach().clone())

    with inference(decoder):
        decoder.prefill(input_ids[:, :-1])
        start = {layer: states(layer) for layer in layers}
        try:
            for layer in layers:
                handles += [mixers[layer].register_forward_pre_hook(partial(before, layer),
                                                                    with_kwargs=True),
                            mixers[layer].register_forward_hook(partial(after, layer),
                                                                with_kwargs=True)]
            decoder.step(input_ids[:, -1])
        finally:
            for handle in handles:
                handle.remove()
        return {layer: DecodeStep(mixers[layer], seen[layer]["x"], *start[layer],
                                  seen[layer]["output"], *states(layer)) for layer in layers}


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32)


def _before(capture: SSMCapture, pending: dict, layer: int, mixer, args, kwargs):
    hidden, cache, mask = mixer_inputs(args, kwargs)
    if layer in capture or has_previous_state(cache, layer):
        capture.skipped[layer] = capture.skipped.get(layer, 0) + 1
        return
    try:
        pending[layer] = recompute_mixer(mixer, hidden, mask)
    except Exception as error:  # name the layer: the traceback alone points into transformers
        raise RuntimeError(f"capture_ssm could not recompute Mamba layer {layer} "
                           f"({type(mixer).__name__}): {error}. {TROUBLE} 'SSM capture'."
                           ) from error


def _after(capture: SSMCapture, pending: dict, layer: int, mixer, args, kwargs, output):
    if layer not in pending:
        return
    recomputed, parts = pending.pop(layer)
    real = output[0] if isinstance(output, tuple) else output
    diff = (recomputed.float() - real.detach().float()).abs().max().item()
    capture[layer] = SSMTrace(output=_cpu(real), max_abs_diff=diff,
                              **{k: _cpu(v) for k, v in parts.items()})


@contextlib.contextmanager
def capture_ssm(model: torch.nn.Module, layers=None):
    """Record Δ, B, C and the state h of Mamba layers during one forward pass.

    Works for ``MambaForCausalLM``/``MambaModel`` (any ``use_mambapy``) and the Mamba layers of
    Jamba, with or without a cache, under ``torch.no_grad`` or not. The first prefill through
    each layer is recorded; later calls (decode steps with a cache that already holds a state,
    or a second forward pass) are counted in ``capture.skipped`` and not recorded.
    The states take 4·b·d·l·n bytes per layer (mamba-130m, 2,048 tokens: 200 MB a layer); pass
    ``layers`` to keep only some. ``max_abs_diff`` is ~1e-8 for float32 models and ~1e-3 for
    bfloat16 ones (the projections round in bf16, the scan runs in float32).

    Args:
        model: any module containing ``MambaMixer`` or ``JambaMambaMixer`` modules.
        layers: layer indices (the model's decoder-layer index, ``mixer.layer_idx``); None = all.
    Yields:
        an ``SSMCapture``, ``{layer index: SSMTrace}``, filled when the model runs.

    Example::

        with capture_ssm(model) as ssm:
            model(input_ids)
        ssm[0].delta  # (b, d, l)
    """
    mixers = find_ssm_mixers(model)
    if not mixers:
        raise ValueError("capture_ssm: no MambaMixer or JambaMambaMixer found in the model. "
                         f"{TROUBLE} 'SSM capture'.")
    if layers is not None:
        missing = sorted(set(layers) - set(mixers))
        if missing:
            raise ValueError(f"capture_ssm: layers {missing} are not Mamba layers; these are: "
                             f"{list(mixers)}. {TROUBLE} 'SSM capture'.")
        mixers = {i: mixers[i] for i in layers}
    capture, pending, handles = SSMCapture(), {}, []
    try:
        for layer, mixer in mixers.items():
            handles.append(mixer.register_forward_pre_hook(
                partial(_before, capture, pending, layer), with_kwargs=True))
            handles.append(mixer.register_forward_hook(
                partial(_after, capture, pending, layer), with_kwargs=True))
        yield capture
    finally:
        for handle in handles:
            handle.remove()


# ======================================================== routing (every MoE family)
#
# A mixture-of-experts block in transformers 5 holds a router and one experts module whose
# weights are fused 3-D parameters (E, ·, ·); the block calls the router, then
# ``experts(hidden (T, H), top_k_index (T, k), top_k_weights (T, k))``. What multiplied the
# experts' outputs is therefore exactly what the experts module receives: a pre-hook there reads
# it, after whatever renormalisation or scaling the family applied (Mixtral renormalises,
# DeepSeek scales by routed_scaling_factor, GraniteMoE softmaxes over the k, ...). The logits
# come from a hook on the router, found by what it is: the block's other child with a weight of
# E rows (Qwen2-MoE's shared_expert_gate has one row and is not a router). Nothing is found by
# name, and nothing is recomputed.

__all__ += ["RoutingRecord", "RoutingTrace", "capture_routing", "find_moe_blocks"]

@dataclass
class RoutingRecord:
    """One MoE layer in one forward call; tensors detached, on CPU.

    T = batch × sequence of this call, flattened in the model's order (padding included).
    """

    layer: int                  # the decoder layer's index in the model
    call: int                   # the forward call's index, from 0 (generate: one per step)
    logits: torch.Tensor        # (T, E) float32 router logits
    topk_index: torch.Tensor    # (T, k) int64 experts chosen
    topk_weight: torch.Tensor   # (T, k) float32 weights that multiplied the experts' outputs
    shape: tuple[int, int]      # (batch, sequence) of this call
    attention_mask: torch.Tensor | None = None  # (batch, length so far) as given to the call

    @property
    def token_mask(self) -> torch.Tensor:
        """(T,) bool: True for real tokens (all of them without a mask). The mask's last
        ``sequence`` columns are this call's tokens (decode steps pass the whole mask)."""
        batch, length = self.shape
        if self.attention_mask is None or self.attention_mask.dim() != 2:
            return torch.ones(batch * length, dtype=torch.bool)
        return self.attention_mask[:, -length:].reshape(-1).bool()


class RoutingTrace(list):
    """The :class:`RoutingRecord` s of a ``capture_routing`` block, in the order they ran."""

    def __init__(self, layers: list[int]) -> None:
        super().__init__()
        self.moe_layers = layers  # decoder-layer indices of the MoE layers found

    @property
    def calls(self) -> int:
        return 1 + max((r.call for r in self), default=-1)

    def get(self, layer: int, call: int = 0) -> RoutingRecord:
        """The record of one layer in one call."""
        for r in self:
            if r.layer == layer and r.call == call:
                return r
        raise KeyError(f"no record for layer {layer}, call {call}; MoE layers: "
                       f"{self.moe_layers}, calls recorded: {self.calls}. "
                       f"{TROUBLE} 'Routing capture'.")

    def tokens(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One layer over every call, real tokens only (padding dropped), in call order:
        ``topk_index`` (N, k), ``topk_weight`` (N, k), ``logits`` (N, E)."""
        records = [r for r in self if r.layer == layer]
        if not records:
            raise KeyError(f"layer {layer} is not an MoE layer recorded here; these are: "
                           f"{self.moe_layers}. {TROUBLE} 'Routing capture'.")
        keep = [r.token_mask for r in records]
        return tuple(torch.cat([getattr(r, f)[m] for r, m in zip(records, keep, strict=True)])
                     for f in ("topk_index", "topk_weight", "logits"))


def _experts_size(module: torch.nn.Module) -> int:
    """E when ``module`` holds fused expert weights: two or more direct 3-D parameters with the
    same leading size E > 1 (a convolution's 3-D weight is not that); else 0."""
    if isinstance(module, torch.nn.modules.conv._ConvNd):
        return 0
    sizes = [p.shape[0] for p in module.parameters(recurse=False) if p.dim() == 3]
    return sizes[0] if len(sizes) >= 2 and len(set(sizes)) == 1 and sizes[0] > 1 else 0


def _router_of(block: torch.nn.Module, experts: torch.nn.Module, n: int):
    """The block's child whose own 2-D weight has ``n`` rows (H → E), other than the experts."""
    for child in block.children():
        w = dict(child.named_parameters(recurse=False)).get("weight")
        if child is not experts and w is not None and w.dim() == 2 and w.shape[0] == n:
            return child
    return None


def _layer_index(model: torch.nn.Module) -> dict[int, int]:
    """id(module) → index of the decoder layer containing it (the longest ModuleList)."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        return {}
    layers = max(lists, key=len)
    return {id(sub): i for i, layer in enumerate(layers) for sub in layer.modules()}


def find_moe_blocks(model: torch.nn.Module) -> dict[int, tuple]:
    """``{decoder-layer index: (block, router, experts)}`` for every MoE block in ``model``,
    found by structure (fused 3-D expert weights beside a router of E outputs), not by name."""
    where, found = _layer_index(model), {}
    for block in model.modules():
        for experts in block.children():
            n = _experts_size(experts)
            router = _router_of(block, experts, n) if n else None
            if router is not None:
                found[where.get(id(block), len(found))] = (block, router, experts)
    return dict(sorted(found.items()))


class _RoutingState:
    """What the hooks share while a capture runs."""

    def __init__(self, trace: RoutingTrace) -> None:
        self.trace, self.call, self.mask, self.pending = trace, -1, None, {}
        self.seen: set[int] = set()  # layers recorded in the current call

    def new_call(self, mask) -> None:
        self.call, self.seen = self.call + 1, set()
        self.mask = mask.detach().to("cpu") if isinstance(mask, torch.Tensor) else None


def _on_model(state: _RoutingState, module, args, kwargs):
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
        mask = args[1]  # forward(input_ids, attention_mask, ...)
    state.new_call(mask)


def _on_block(state: _RoutingState, layer: int, module, args, kwargs):
    hidden = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
    state.pending[layer] = {"shape": tuple(hidden.shape[:-1])}


def _on_router(state: _RoutingState, layer: int, module, args, output):
    state.pending.setdefault(layer, {})["router"] = output


def _router_logits(output, weights: torch.Tensor, n: int, tokens: int):
    """The (T, E) logits among a router's outputs: a float tensor of E columns that is not the
    weights handed to the experts (transformers 5.17's Jamba router returns the logits alone,
    its GraniteMoE router returns (index, weights, logits), the others (logits, weights, index))."""
    outputs = output if isinstance(output, (tuple, list)) else (output,)
    for t in outputs:
        if (isinstance(t, torch.Tensor) and t.is_floating_point() and t is not weights
                and t.shape[-1] == n and t.numel() == tokens * n):
            return t.reshape(tokens, n)
    raise RuntimeError(f"capture_routing: the router returned no (T, {n}) logits "
                       f"({[getattr(t, 'shape', type(t)) for t in outputs]}). {TROUBLE} "
                       "'Routing capture'.")


def _on_experts(state: _RoutingState, layer: int, n: int, module, args, kwargs):
    tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    index = next((t for t in tensors if not t.is_floating_point()), None)
    weights = next((t for t in tensors if index is not None and t.is_floating_point()
                    and t.shape == index.shape), None)
    if weights is None:
        raise RuntimeError(f"capture_routing: the experts of layer {layer} were called without "
                           f"(top_k_index, top_k_weights) ({[tuple(t.shape) for t in tensors]}). "
                           f"{TROUBLE} 'Routing capture'.")
    pending = state.pending.pop(layer, {})
    if state.call < 0 or layer in state.seen:  # called without going through the model's top
        state.new_call(None)
    state.seen.add(layer)
    tokens = index.shape[0]
    shape = pending.get("shape", (1, tokens))
    logits = _router_logits(pending.get("router"), weights, n, tokens)
    state.trace.append(RoutingRecord(
        layer=layer, call=state.call, logits=_cpu(logits),
        topk_index=index.detach().to("cpu", torch.int64), topk_weight=_cpu(weights),
        shape=shape if len(shape) == 2 else (1, tokens), attention_mask=state.mask))


@contextlib.contextmanager
def capture_routing(model: torch.nn.Module):
    """Record every MoE layer's routing in every forward call made inside the block.

    Works for Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3, PhiMoE, GraniteMoE and Jamba
    (transformers 5.17 and 5.24), and the zoo's tiny-moe and tiny-hybrid. One
    :class:`RoutingRecord` per MoE layer per call (``generate``: one per step); the hooks are
    removed on exit, also after an exception.

    Example::

        with capture_routing(model) as trace, torch.no_grad():
            model(input_ids, attention_mask=mask)
        trace.get(layer=1).topk_index  # (b·l, k)
    """
    blocks = find_moe_blocks(model)
    if not blocks:
        raise ValueError(
            f"capture_routing: {type(model).__name__} has no mixture-of-experts layer (no "
            "module holding fused expert weights (E, ·, ·) beside a router with E outputs). "
            "Pass an MoE model (e.g. models.load_model('tiny-moe')). "
            f"{TROUBLE} 'Routing capture'.")
    state = _RoutingState(RoutingTrace(list(blocks)))
    handles = [model.register_forward_pre_hook(partial(_on_model, state), with_kwargs=True)]
    try:
        for layer, (block, router, experts) in blocks.items():
            n = _experts_size(experts)
            handles += [
                block.register_forward_pre_hook(partial(_on_block, state, layer),
                                                with_kwargs=True),
                router.register_forward_hook(partial(_on_router, state, layer)),
                experts.register_forward_pre_hook(partial(_on_experts, state, layer, n),
                                                  with_kwargs=True)]
        yield state.trace
    finally:
        for handle in handles:
            handle.remove()
