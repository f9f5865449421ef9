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
                           f"({type(mixer).__name__}): {error}") from error


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
        raise ValueError("capture_ssm: no MambaMixer or JambaMambaMixer found in the model")
    if layers is not None:
        missing = sorted(set(layers) - set(mixers))
        if missing:
            raise ValueError(f"capture_ssm: layers {missing} are not Mamba layers; these are: {list(mixers)}")
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
