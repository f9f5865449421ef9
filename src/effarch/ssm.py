"""Selective state-space scans: the core of Mamba (Gu & Dao 2023, §2-3, Algorithm 2).

Glossary of dimension letters (the paper's notation, as in mamba-minimal and mamba-ssm):

    b : batch size                                      (B in Algorithm 2)
    l : sequence length                                 (L)
    d : channels of the SSM, d_inner = expand · d_model (D); every channel has its own SSM
    n : state size per channel, d_state                 (N; 16 in Mamba-1)
    g : groups sharing one B/C (only for the grouped shape (b, g, n, l)); g divides d

The continuous system (§2, eq. 1a-1b) is h'(t) = A h(t) + B x(t), y(t) = C h(t).
Discretised with step Δ (§2, eq. 4) it becomes the recurrence (eq. 2a-2b)

    h_t = Ā_t h_{t-1} + B̄_t x_t,     y_t = C_t h_t,     Ā_t = exp(Δ_t A),  B̄_t ≈ Δ_t B_t

where A is diagonal, so every product above is elementwise over (d, n).
Selection (§3.2, Algorithm 2): Δ, B and C depend on the input token, so the system is
time-varying and cannot be computed as a convolution; it is computed as a scan.

Conventions follow mamba-ssm's ``selective_scan_ref`` (the field's signature, also what
transformers passes to its own scan):

    u, delta, z : (b, d, l)    A : (d, n) real, negative    D, delta_bias : (d,)
    B, C        : (b, n, l) input-dependent, (b, g, n, l) grouped, or (d, n) fixed (as in S4)

All arithmetic is float32; the output is cast back to u's dtype, the last state stays
float32 (b, d, n). Complex A (S4D-Lin) is not supported.

Three implementations of the same function, each checked against the first in tests:
``selective_scan_ref`` (ground truth, a loop over l), ``selective_scan_sequential`` (one
recurrent step per token, the decode path) and ``selective_scan_parallel`` (an associative
scan, log2(l) steps).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from effarch.paths import TROUBLE

__all__ = [
    "associative_scan",
    "discretize",
    "discretize_zoh_exact",
    "selective_scan_parallel",
    "selective_scan_ref",
    "selective_scan_sequential",
    "selective_scan_states",
    "ssm_step",
]


# ---------------------------------------------------------------- shapes and discretisation
def per_channel(X: torch.Tensor, d: int) -> torch.Tensor:
    """B or C in any accepted shape -> float32, broadcastable to (b, d, l, n)."""
    X = X.float()
    if X.dim() == 2:  # (d, n): fixed, the same at every step
        return X[None, :, None, :]  # (1, d, 1, n)
    if X.dim() == 3:  # (b, n, l): one B_t for all channels
        return X.transpose(1, 2)[:, None]  # (b, 1, l, n)
    if X.dim() == 4:  # (b, g, n, l): channel i uses group i // (d // g)
        g = X.shape[1]
        if d % g:
            raise ValueError(f"groups g={g} must divide d={d}. {TROUBLE} 'Scan shapes'.")
        return X.transpose(2, 3).repeat_interleave(d // g, dim=1)  # (b, d, l, n)
    raise ValueError(f"B and C must be (d, n), (b, n, l) or (b, g, n, l); got {tuple(X.shape)}. "
                     f"{TROUBLE} 'Scan shapes'.")


def prepare_delta(delta, delta_bias=None, delta_softplus=False):
    """Δ = softplus(delta + delta_bias) in float32, (b, d, l) (§3.2, s_Δ and τ_Δ)."""
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]  # (b, d, l) + (d, 1)
    if delta_softplus:
        delta = F.softplus(delta)
    return delta


def discretize(delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor):
    """Zero-order hold for A, first-order (Euler) for B: Ā = exp(ΔA), B̄ = ΔB (§2, eq. 4).

    The exact zero-order hold is B̄ = (ΔA)^{-1}(exp(ΔA) - I) ΔB (see
    ``discretize_zoh_exact``). Mamba's reference scan (mamba-ssm ``selective_scan_ref``)
    and transformers use B̄ ≈ ΔB: the first term of (exp(ΔA) - I)/(ΔA) = I + ΔA/2 + ...,
    so the two agree to a relative error of about |ΔA|/2, i.e. when Δ·|A| ≪ 1. For large
    Δ·|A| they differ (exact B̄ saturates at B/|A|), but Ā ≈ 0 there and the model is
    trained with the approximation, so it is what must be used to reproduce a checkpoint.

    Args:
        delta: (b, d, l) step sizes Δ, already positive (after softplus).
        A: (d, n) the continuous, diagonal state matrix (negative).
        B: (b, n, l), (b, g, n, l) or (d, n).
    Returns:
        (A_bar, B_bar): both (b, d, l, n), float32 (B_bar may broadcast over b for fixed B).
    """
    delta = delta.float()[..., None]  # (b, d, l, 1)
    A_bar = torch.exp(delta * A.float()[:, None, :])  # (b, d, l, n)
    B_bar = delta * per_channel(B, A.shape[0])  # (b, d, l, n)
    return A_bar, B_bar


def discretize_zoh_exact(delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor):
    """Exact zero-order hold for diagonal A: B̄ = (exp(ΔA) - 1)/(ΔA) · ΔB (§2, eq. 4).

    Same arguments and shapes as ``discretize``; expm1 keeps small ΔA accurate, and
    ΔA = 0 takes the limit B̄ = ΔB.
    """
    A_bar, B_euler = discretize(delta, A, B)
    dA = delta.float()[..., None] * A.float()[:, None, :]  # (b, d, l, n)
    safe = torch.where(dA == 0, torch.ones_like(dA), dA)
    ratio = torch.where(dA == 0, torch.ones_like(dA), torch.expm1(safe) / safe)
    return A_bar, ratio * B_euler


def readout(y, u, D=None, z=None, dtype=None):
    """out = (y + D·u) · silu(z), cast to dtype. The skip D·u and the gate silu(z) are not in
    Algorithm 2 (the S6 layer): they come from the Mamba block (Fig. 3) and mamba-ssm's
    reference code, which the scan's signature follows."""
    out = y  # (b, d, l) float32
    if D is not None:
        out = out + D.float()[:, None] * u.float()  # (d, 1) * (b, d, l)
    if z is not None:
        out = out * F.silu(z.float())
    return out.to(dtype if dtype is not None else u.dtype)


# ---------------------------------------------------------------- reference: a loop over l
def selective_scan_states(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Reference scan that also returns every state: the ground truth for everything else.

    Args: as ``selective_scan_ref``.
    Returns:
        (out (b, d, l) in u's dtype, states h_t (b, d, l, n) float32, Δ (b, d, l) float32).
    """
    delta = prepare_delta(delta, delta_bias, delta_softplus)  # (b, d, l)
    A_bar, B_bar = discretize(delta, A, B)  # (b, d, l, n)
    Bu = B_bar * u.float()[..., None]  # (b, d, l, n)
    C = per_channel(C, A.shape[0])  # (b|1, d|1, l|1, n)
    h = u.new_zeros((u.shape[0], *A.shape), dtype=torch.float32)  # h_0 = 0 (b, d, n), as in the kernel
    states = []
    for t in range(u.shape[-1]):
        h = A_bar[:, :, t] * h + Bu[:, :, t]  # (b, d, n), eq. 2a
        states.append(h)
    states = torch.stack(states, dim=2)  # (b, d, l, n)
    y = (states * C).sum(-1)  # (b, d, l), eq. 2b: y_t = C_t h_t
    return readout(y, u, D, z), states, delta


def selective_scan_ref(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
):
    """Selective scan, mamba-ssm's ``selective_scan_ref`` semantics (Algorithm 2, SSM step).

    Args:
        u: (b, d, l) input x of the SSM.
        delta: (b, d, l) time steps before ``delta_bias`` and softplus.
        A: (d, n) real, negative.  B, C: (b, n, l), (b, g, n, l) or (d, n).
        D: (d,) skip connection.  z: (b, d, l) gate, out *= silu(z).
        delta_bias: (d,) added to delta.  delta_softplus: apply softplus to delta.
        return_last_state: also return h_l, (b, d, n) float32.
    Returns:
        out (b, d, l) in u's dtype, or (out, last_state).
    """
    out, states, _ = selective_scan_states(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return (out, states[:, :, -1]) if return_last_state else out


# ---------------------------------------------------------------- recurrent form: one token per step
def ssm_step(h, u_t, delta_t, A, B_t, C_t):
    """One recurrent step (the decode path), discretising as it goes (eq. 2a-2b).

    Args:
        h: (b, d, n) previous state, float32.
        u_t, delta_t: (b, d) input and Δ_t (already positive).
        A: (d, n).  B_t, C_t: (b, n) or (b, d, n) (grouped B/C expanded per channel).
    Returns:
        (h_t (b, d, n), y_t (b, d)), float32.
    """
    dt = delta_t.float()[..., None]  # (b, d, 1)
    B_t = B_t.float() if B_t.dim() == 3 else B_t.float()[:, None]  # (b, d|1, n)
    C_t = C_t.float() if C_t.dim() == 3 else C_t.float()[:, None]  # (b, d|1, n)
    h = torch.exp(dt * A.float()) * h + dt * B_t * u_t.float()[..., None]  # (b, d, n)
    return h, (h * C_t).sum(-1)  # y_t: (b, d)


def selective_scan_sequential(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
):
    """Selective scan as l calls of ``ssm_step``; same signature and result as ``selective_scan_ref``.

    This is how Mamba generates: O(1) memory per token, no Ā of shape (b, d, l, n) is ever built.
    """
    delta = prepare_delta(delta, delta_bias, delta_softplus)  # (b, d, l)
    d, n = A.shape
    Bs = per_channel(B, d).expand(u.shape[0], -1, u.shape[-1], -1)  # (b, d|1, l, n)
    Cs = per_channel(C, d).expand(u.shape[0], -1, u.shape[-1], -1)
    h = u.new_zeros((u.shape[0], d, n), dtype=torch.float32)  # (b, d, n)
    ys = []
    for t in range(u.shape[-1]):
        h, y_t = ssm_step(h, u[:, :, t], delta[:, :, t], A, Bs[:, :, t], Cs[:, :, t])
        ys.append(y_t)
    out = readout(torch.stack(ys, dim=-1), u, D, z)  # (b, d, l)
    return (out, h) if return_last_state else out


# ---------------------------------------------------------------- parallel form: associative scan
def associative_scan(a: torch.Tensor, b: torch.Tensor, dim: int = -1):
    """Inclusive scan of h_t = a_t h_{t-1} + b_t (h_0 = 0) along ``dim`` in ceil(log2 l) steps.

    The pairs (a, b) compose with the associative operator
    (a1, b1) ∘ (a2, b2) = (a1·a2, a2·b1 + b2)   (element 1 earlier in time, §3.3.2),
    evaluated Hillis-Steele style: at step k every position combines with the one 2^k
    before it. Any length works (positions with no partner 2^k back keep their value);
    the work is O(l log l) instead of O(l), the depth O(log l) instead of O(l).

    Args:
        a, b: same shape (or broadcastable), e.g. (b, d, l, n) with dim=2.
    Returns:
        (a_cum, h): a_cum_t = a_1···a_t and h_t, both of the broadcast shape.
    """
    a, b = torch.broadcast_tensors(a, b)
    dim = dim % a.dim()
    L = a.shape[dim]
    offset = 1
    while offset < L:
        keep, m = offset, L - offset  # the first `keep` positions are already final
        a_prev, b_prev = a.narrow(dim, 0, m), b.narrow(dim, 0, m)  # prefixes ending at t - offset
        a_cur, b_cur = a.narrow(dim, keep, m), b.narrow(dim, keep, m)  # segments ending at t
        b = torch.cat([b.narrow(dim, 0, keep), a_cur * b_prev + b_cur], dim)
        a = torch.cat([a.narrow(dim, 0, keep), a_cur * a_prev], dim)
        offset *= 2
    return a, b


def selective_scan_parallel(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
):
    """Selective scan with ``associative_scan`` over l; same signature and result as the reference.

    Ā ∈ (0, 1] (A < 0, Δ > 0), so the running products only shrink: no overflow, unlike
    tricks that divide by cumulative products.
    """
    delta = prepare_delta(delta, delta_bias, delta_softplus)  # (b, d, l)
    A_bar, B_bar = discretize(delta, A, B)  # (b, d, l, n)
    _, states = associative_scan(A_bar, B_bar * u.float()[..., None], dim=2)  # (b, d, l, n)
    y = (states * per_channel(C, A.shape[0])).sum(-1)  # (b, d, l)
    out = readout(y, u, D, z)
    return (out, states[:, :, -1]) if return_last_state else out
