"""Triton kernel of ``effarch.fast.selective_scan`` (imported only when Triton is there).

One program per (batch row, block of BLOCK_D channels). It walks the sequence in tiles of
BLOCK_L steps; inside a tile, the recurrence h_t = Ā_t h_{t-1} + B̄_t u_t is an associative scan
over (Ā, B̄u) pairs; the tile's first state comes from the previous tile. Ā, B̄u and the states
live only in registers: (b, d, l, n) is never written to memory.
"""

import os

import triton
import triton.language as tl

# Tile shapes tried once per (d, n) on the first call; the fastest is kept (GPUs differ: an
# H200 and a GB10 need not agree). The interpreter (CPU tests) runs one shape.
_SCAN_CONFIGS = [triton.Config({"BLOCK_D": bd, "BLOCK_L": bl}, num_warps=w)
                 for bd, bl, w in [(4, 32, 4), (8, 32, 4), (8, 16, 4), (16, 16, 4), (4, 64, 4),
                                   (8, 32, 8), (16, 32, 8), (2, 64, 2), (4, 16, 2)]]
if os.environ.get("TRITON_INTERPRET", "0") == "1":
    _SCAN_CONFIGS = [triton.Config({"BLOCK_D": 8, "BLOCK_L": 32}, num_warps=4)]


@triton.jit
def combine(a1, b1, a2, b2):  # (a1, b1) ∘ (a2, b2) = (a1·a2, a2·b1 + b2)
    return a1 * a2, a2 * b1 + b2


@triton.autotune(configs=_SCAN_CONFIGS, key=["Dm", "N", "MODE"])
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
    h0_ptr,
    stats_ptr,
    L,
    Dm,
    N,
    CHUNK,
    NCHUNK,
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
    MODE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    # MODE 0: one pass over the whole sequence. A long sequence is split into NCHUNK chunks of
    # CHUNK steps for parallelism: MODE 1 scans each chunk from a zero state and stores its end
    # state and its decay exp(A·ΣΔ); the host chains those into each chunk's first state h0;
    # MODE 2 scans each chunk again from h0 and writes the output.
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_c = tl.program_id(2)
    l_start = pid_c * CHUNK
    l_end = tl.minimum(L, l_start + CHUNK)
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
    m_dn = mask_d[:, None] & mask_n[None, :]
    chunk_off = ((pid_b * NCHUNK + pid_c) * Dm + offs_d[:, None]) * N + offs_n[None, :]
    if MODE == 2:
        h = tl.load(h0_ptr + chunk_off, mask=m_dn, other=0.0)
    else:
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)  # the state, (BD, BN)
    dt_sum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for l0 in range(l_start, l_end, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)  # (BL,)
        mask_l = offs_l < l_end
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
        dA = tl.exp(dt[:, None, :] * A[:, :, None])  # (BD, BN, BL)
        dBu = (dt * u)[:, None, :] * Bt[None, :, :]  # (BD, BN, BL)
        cA, cB = tl.associative_scan((dA, dBu), 2, combine)
        hs = cA * h[:, :, None] + cB  # states of this tile
        last = (tl.arange(0, BLOCK_L) == BLOCK_L - 1)[None, None, :]
        h = tl.sum(tl.where(last, hs, 0.0), axis=2)
        if MODE == 1:
            dt_sum += tl.sum(dt, axis=1)
        else:
            Ct = tl.load(
                C_ptr + pid_b * s_Cb + offs_n[:, None] * s_Cn + offs_l[None, :] * s_Cl,
                mask=m_nl,
                other=0.0,
            ).to(tl.float32)
            y = tl.sum(hs * Ct[None, :, :], axis=1)  # (BD, BL)
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
    if MODE == 1:  # the chunk's end state and its decay exp(A·ΣΔ), side by side
        half = tl.num_programs(0) * NCHUNK * Dm * N
        tl.store(stats_ptr + chunk_off, h, mask=m_dn)
        tl.store(stats_ptr + half + chunk_off, tl.exp(A * dt_sum[:, None]), mask=m_dn)
    elif STORE_LAST:
        if pid_c == NCHUNK - 1:
            tl.store(
                last_ptr + pid_b * Dm * N + offs_d[:, None] * N + offs_n[None, :],
                h,
                mask=m_dn,
            )


# --- decode: one token per row, three fused kernels per layer (the GEMVs stay in cuBLAS) -----


@triton.jit
def add_rmsnorm_kernel(h_ptr, delta_ptr, w_ptr, out_ptr, H, eps,
                       HAS_DELTA: tl.constexpr, BLOCK_H: tl.constexpr):
    """h += delta (float32 residual stream); out = w · rmsnorm(h) as MambaRMSNorm rounds it."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_H)
    mask = offs < H
    h = tl.load(h_ptr + row * H + offs, mask=mask, other=0.0)
    if HAS_DELTA:
        h += tl.load(delta_ptr + row * H + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(h_ptr + row * H + offs, h, mask=mask)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    x = h.to(w.dtype).to(tl.float32)  # the block casts the residual to the norm's dtype first
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
    y = (x * inv).to(w.dtype).to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * H + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def conv_step_kernel(xz_ptr, state_ptr, w_ptr, b_ptr, out_ptr, Dm, s_xz,
                     K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    """Shift the new input into the conv state (b, d, k); out = silu(conv · weight + bias)."""
    row = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    mask_d = offs_d < Dm
    base = state_ptr + row * Dm * K + offs_d[:, None] * K
    shifted = tl.load(base + offs_k[None, :] + 1,
                      mask=mask_d[:, None] & (offs_k[None, :] + 1 < K), other=0.0)
    x = tl.load(xz_ptr + row * s_xz + offs_d, mask=mask_d, other=0.0)
    new = tl.where(offs_k[None, :] == K - 1, x[:, None], shifted)           # (BD, BK)
    mask_dk = mask_d[:, None] & (offs_k[None, :] < K)
    tl.store(base + offs_k[None, :], new, mask=mask_dk)
    w = tl.load(w_ptr + offs_d[:, None] * K + offs_k[None, :], mask=mask_dk, other=0.0)
    acc = tl.sum(new.to(tl.float32) * w.to(tl.float32), axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    acc = acc.to(out_ptr.dtype.element_ty).to(tl.float32)  # conv1d's output dtype, then silu
    tl.store(out_ptr + row * Dm + offs_d, (acc * tl.sigmoid(acc)).to(out_ptr.dtype.element_ty),
             mask=mask_d)


@triton.jit
def ssm_step_kernel(x_ptr, z_ptr, dbc_ptr, wdt_ptr, bdt_ptr, A_ptr, Dp_ptr, state_ptr, out_ptr,
                    Dm, R, N, s_z, s_dbc,
                    BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """dt = softplus(W_dt · dt_low + b); h = exp(dt·A)·h + dt·x·B; y = (C·h + D·x)·silu(z)."""
    row = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d, mask_r, mask_n = offs_d < Dm, offs_r < R, offs_n < N
    low = tl.load(dbc_ptr + row * s_dbc + offs_r, mask=mask_r, other=0.0)
    wdt = tl.load(wdt_ptr + offs_d[:, None] * R + offs_r[None, :],
                  mask=mask_d[:, None] & mask_r[None, :], other=0.0)
    dt = tl.sum(wdt.to(tl.float32) * low.to(tl.float32)[None, :], axis=1)
    dt = dt.to(low.dtype).to(tl.float32)  # dt_proj's output dtype
    dt += tl.load(bdt_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
    Bv = tl.load(dbc_ptr + row * s_dbc + R + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    Cv = tl.load(dbc_ptr + row * s_dbc + R + N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + row * Dm + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    mask_dn = mask_d[:, None] & mask_n[None, :]
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0)
    sp = state_ptr + row * Dm * N + offs_d[:, None] * N + offs_n[None, :]
    h = tl.load(sp, mask=mask_dn, other=0.0)
    h = h * tl.exp(dt[:, None] * A) + (dt * x)[:, None] * Bv[None, :]
    tl.store(sp, h, mask=mask_dn)
    y = tl.sum(h * Cv[None, :], axis=1)
    y += tl.load(Dp_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32) * x
    z = tl.load(z_ptr + row * s_z + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * Dm + offs_d, (y * z * tl.sigmoid(z)).to(out_ptr.dtype.element_ty),
             mask=mask_d)
