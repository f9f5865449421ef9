"""Triton kernel of ``effarch.fast.selective_scan`` (imported only when Triton is there).

One program per (batch row, block of BLOCK_D channels). It walks the sequence in tiles of
BLOCK_L steps; inside a tile, the recurrence h_t = Ā_t h_{t-1} + B̄_t u_t is an associative scan
over (Ā, B̄u) pairs; the tile's first state comes from the previous tile. Ā, B̄u and the states
live only in registers: (b, d, l, n) is never written to memory.
"""

import triton
import triton.language as tl


@triton.jit
def combine(a1, b1, a2, b2):  # (a1, b1) ∘ (a2, b2) = (a1·a2, a2·b1 + b2)
    return a1 * a2, a2 * b1 + b2


@triton.jit
def selective_scan_kernel(
    u_ptr,
    dt_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    bias_ptr,
    out_ptr,
    last_ptr,
    L,
    Dm,
    N,
    s_ub,
    s_ud,
    s_ul,
    s_tb,
    s_td,
    s_tl,
    s_Ad,
    s_An,
    s_Bb,
    s_Bn,
    s_Bl,
    s_Cb,
    s_Cn,
    s_Cl,
    s_zb,
    s_zd,
    s_zl,
    s_ob,
    s_od,
    s_ol,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    STORE_LAST: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (BD,)
    offs_n = tl.arange(0, BLOCK_N)  # (BN,)
    mask_d = offs_d < Dm
    mask_n = offs_n < N
    A = tl.load(
        A_ptr + offs_d[:, None] * s_Ad + offs_n[None, :] * s_An,
        mask=mask_d[:, None] & mask_n[None, :],
        other=0.0,
    ).to(tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)  # the state, (BD, BN)
    for l0 in range(0, L, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)  # (BL,)
        mask_l = offs_l < L
        m_dl = mask_d[:, None] & mask_l[None, :]
        m_nl = mask_n[:, None] & mask_l[None, :]
        u = tl.load(
            u_ptr + pid_b * s_ub + offs_d[:, None] * s_ud + offs_l[None, :] * s_ul,
            mask=m_dl,
            other=0.0,
        ).to(tl.float32)  # (BD, BL)
        dt = tl.load(
            dt_ptr + pid_b * s_tb + offs_d[:, None] * s_td + offs_l[None, :] * s_tl,
            mask=m_dl,
            other=0.0,
        ).to(tl.float32)
        if HAS_BIAS:
            dt = dt + bias[:, None]
        if SOFTPLUS:
            dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
        dt = tl.where(m_dl, dt, 0.0)  # padded steps: Ā = 1, B̄u = 0, the state carries over
        Bt = tl.load(
            B_ptr + pid_b * s_Bb + offs_n[:, None] * s_Bn + offs_l[None, :] * s_Bl,
            mask=m_nl,
            other=0.0,
        ).to(tl.float32)  # (BN, BL)
        Ct = tl.load(
            C_ptr + pid_b * s_Cb + offs_n[:, None] * s_Cn + offs_l[None, :] * s_Cl,
            mask=m_nl,
            other=0.0,
        ).to(tl.float32)
        dA = tl.exp(dt[:, None, :] * A[:, :, None])  # (BD, BN, BL)
        dBu = (dt * u)[:, None, :] * Bt[None, :, :]  # (BD, BN, BL)
        cA, cB = tl.associative_scan((dA, dBu), 2, combine)
        hs = cA * h[:, :, None] + cB  # states of this tile
        y = tl.sum(hs * Ct[None, :, :], axis=1)  # (BD, BL)
        last = (tl.arange(0, BLOCK_L) == BLOCK_L - 1)[None, None, :]
        h = tl.sum(tl.where(last, hs, 0.0), axis=2)
        if HAS_D:
            y += Dv[:, None] * u
        if HAS_Z:
            zz = tl.load(
                z_ptr + pid_b * s_zb + offs_d[:, None] * s_zd + offs_l[None, :] * s_zl,
                mask=m_dl,
                other=0.0,
            ).to(tl.float32)
            y = y * zz * tl.sigmoid(zz)
        tl.store(
            out_ptr + pid_b * s_ob + offs_d[:, None] * s_od + offs_l[None, :] * s_ol,
            y.to(out_ptr.dtype.element_ty),
            mask=m_dl,
        )
    if STORE_LAST:
        tl.store(
            last_ptr + pid_b * Dm * N + offs_d[:, None] * N + offs_n[None, :],
            h,
            mask=mask_d[:, None] & mask_n[None, :],
        )
