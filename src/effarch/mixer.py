"""A Mamba mixer's prefill, written once: ``effarch.hooks`` records its internals with it and
``effarch.fast`` runs it with a fast scan.

It repeats transformers' ``MambaMixer.forward`` / ``JambaMambaMixer.forward`` (5.x) over a whole
prompt from the mixer's own weights, its steps numbered as transformers numbers them:
1. the gated MLP's linear projection ``in_proj`` into x and the gate z;
2. the causal depthwise convolution and its activation;
3. the SSM: ``x_proj`` into Δ (rank r), B and C; ``dt_proj``'s weight on Δ (its bias goes to the
   scan with the softplus, as transformers passes it); the selective scan;
4. the final linear projection ``out_proj``.
Which scan runs is the caller's: any function with mamba-ssm's ``selective_scan_fn`` signature.

Letters: b batch, l length, d = d_inner channels, n state size, r Δ's rank, k conv kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class MixerPrefill:
    """What one mixer computed over a prompt.

    ``conv_input`` is the convolution's input x (before the convolution), from which a decode
    cache keeps the last k columns; the SSM tensors are as the scan received them."""

    output: torch.Tensor  # (b, l, hidden) in the input's dtype
    conv_input: torch.Tensor  # (b, d, l)
    u: torch.Tensor  # (b, d, l) the SSM's input (after the convolution and activation)
    delta: torch.Tensor  # (b, d, l) Δ before dt_proj's bias and the softplus
    A: torch.Tensor  # (d, n) float32, A = -exp(A_log)
    B: torch.Tensor  # (b, n, l)
    C: torch.Tensor  # (b, n, l)
    z: torch.Tensor  # (b, d, l) the gate
    scan_result: object  # what ``scan`` returned besides y (e.g. the last state), or None


def mask_padding(x: torch.Tensor, attention_mask) -> torch.Tensor:
    """Zero padded positions, as transformers' ``apply_mask_to_padding_states``; x: (b, l, ·)."""
    if attention_mask is None or attention_mask.dim() != 2:
        return x
    return (x * attention_mask[:, :, None]).to(x.dtype)


def conv_tail(conv_input: torch.Tensor, k: int) -> torch.Tensor:
    """The conv state a decode step starts from: the last k columns of the convolution's input,
    zero-padded on the left for a prompt shorter than k. (b, d, l) -> (b, d, k)."""
    length = conv_input.shape[-1]
    return F.pad(conv_input, (k - length, 0)) if length < k else conv_input[..., -k:]


def mixer_prefill(mixer: torch.nn.Module, hidden_states: torch.Tensor, *, scan: Callable,
                  attention_mask: torch.Tensor | None = None,
                  A: torch.Tensor | None = None) -> MixerPrefill:
    """Run a Mamba mixer over a prompt ``hidden_states`` (b, l, hidden) with ``scan``.

    ``scan(u, delta, A, B, C, *, D, z, delta_bias, delta_softplus)`` returns y (b, d, l) or a
    tuple (y, extra), extra kept in ``scan_result``. ``A`` may be passed precomputed.
    """
    dtype, length = hidden_states.dtype, hidden_states.shape[1]
    # 1. Gated MLP's linear projection
    xz = mixer.in_proj(mask_padding(hidden_states, attention_mask)).transpose(1, 2)  # (b, 2d, l)
    x, z = xz.chunk(2, dim=1)  # (b, d, l) each
    # 2. Convolution sequence transformation: depthwise, causal (pad k-1, keep the first l)
    conv = mixer.conv1d
    u = F.conv1d(x.to(conv.weight.dtype), conv.weight, conv.bias,
                 padding=conv.kernel_size[0] - 1, groups=conv.groups)[..., :length]
    u = mask_padding(mixer.act(u).to(dtype).transpose(1, 2), attention_mask)  # (b, l, d)
    # 3. SSM transformation
    r, n = mixer.time_step_rank, mixer.ssm_state_size
    dt, B, C = torch.split(mixer.x_proj(u), [r, n, n], dim=-1)  # (b, l, r), (b, l, n) x2
    if hasattr(mixer, "dt_layernorm"):  # Jamba normalises Δ, B and C before using them
        dt, B, C = mixer.dt_layernorm(dt), mixer.b_layernorm(B), mixer.c_layernorm(C)
    if hasattr(mixer, "dt_layernorm") and hasattr(mixer.config, "_is_quantized"):
        dt = (mixer.dt_proj(dt) - mixer.dt_proj.bias).transpose(1, 2)  # Jamba, when quantised
    else:
        dt = mixer.dt_proj.weight @ dt.transpose(1, 2)  # (d, r) @ (b, r, l) -> (b, d, l)
    A = -torch.exp(mixer.A_log.float()) if A is None else A  # (d, n)
    bias = mixer.dt_proj.bias.float() if mixer.dt_proj.bias is not None else None
    u, B, C = u.transpose(1, 2), B.transpose(1, 2), C.transpose(1, 2)  # (b, d, l), (b, n, l)
    result = scan(u, dt, A, B, C, D=mixer.D.float(), z=z, delta_bias=bias, delta_softplus=True)
    y, extra = result if isinstance(result, tuple) else (result, None)
    # 4. Final linear projection
    out = mixer.out_proj(y.transpose(1, 2).to(dtype))  # (b, l, hidden)
    return MixerPrefill(output=out, conv_input=x, u=u, delta=dt, A=A, B=B, C=C, z=z,
                        scan_result=extra)


def mixer_step(mixer: torch.nn.Module, x: torch.Tensor, conv_state: torch.Tensor,
               ssm_state: torch.Tensor, *, A: torch.Tensor | None = None) -> torch.Tensor:
    """One decode step of a Mamba mixer: one token per row, the states updated in place.

    What transformers' ``MambaMixer`` does for a token with a cache (``causal_conv1d_update``,
    then ``selective_state_update``), in mamba-ssm's arithmetic (Δ and h in float32):
    1. ``in_proj`` into x_t and the gate z_t;
    2. the conv window drops its oldest column and takes x_t; the depthwise convolution is one
       dot product per channel over that window, then the activation: u_t;
    3. ``x_proj`` into Δ_t (rank r), B_t, C_t; Δ_t = softplus(dt_proj(Δ_t)) (bias included);
       h ← exp(Δ_t A) h + Δ_t B_t u_t;  y_t = C_t · h + D u_t;  y_t · silu(z_t);
    4. ``out_proj``.

    Args:
        x: (b, hidden) the mixer's input for this token.
        conv_state: (b, d, k) the last k conv inputs, oldest first; updated in place.
        ssm_state: (b, d, n) float32, h_{t-1}; updated in place to h_t.
        A: (d, n) precomputed -exp(A_log), or None.
    Returns:
        (b, hidden) in x's dtype.
    """
    xs, z = mixer.in_proj(x).chunk(2, dim=-1)                                  # (b, d) each
    conv_state.copy_(torch.cat([conv_state[..., 1:], xs[..., None]], dim=-1))  # (b, d, k)
    u = (conv_state * mixer.conv1d.weight[:, 0]).sum(-1)                       # (b, d)
    if mixer.conv1d.bias is not None:
        u = u + mixer.conv1d.bias
    u = mixer.act(u)
    r, n = mixer.time_step_rank, mixer.ssm_state_size
    dt, B, C = torch.split(mixer.x_proj(u), [r, n, n], dim=-1)                # (b, r), (b, n) x2
    dt = F.softplus(mixer.dt_proj(dt).float())                                 # (b, d)
    A = -torch.exp(mixer.A_log.float()) if A is None else A                    # (d, n)
    ssm_state.mul_(torch.exp(dt[..., None] * A))
    ssm_state.add_((dt * u.float())[..., None] * B.float()[:, None, :])
    y = (ssm_state @ C.float()[..., None])[..., 0] + mixer.D.float() * u.float()  # (b, d)
    y = (y * F.silu(z.float())).to(x.dtype)
    return mixer.out_proj(y)
