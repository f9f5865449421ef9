"""Triton kernels of ``effarch.fast`` (imported only when Triton is there).

Two forward scans. ``selective_scan_seq_kernel`` (for channel-contiguous inputs, the prefill's)
walks the sequence one step at a time with each channel's state inside one thread.
``selective_scan_kernel`` (for time-contiguous inputs) uses one program per (batch row, block of
BLOCK_D channels), and walks the sequence in tiles of
BLOCK_L steps; inside a tile, the recurrence h_t = Ā_t h_{t-1} + B̄_t u_t is an associative scan
over (Ā, B̄u) pairs; the tile's first state comes from the previous tile. Ā, B̄u and the states
live only in registers: (b, d, l, n) is never written to memory.

The backward (``selective_scan_bwd_kernel``) takes the same programs and tiles: a forward pass
keeps only each tile's first state, then the tiles are visited last to first, each one's states
rebuilt from its first state and the adjoint scanned backward with the same operator.
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


# --- the sequential-in-time scan: one step at a time, UNROLL steps' loads issued together ------

# One channel per thread (BLOCK_D = 32 · num_warps), or two. Every tensor in the kernel is a
# (BLOCK_D,) vector: the state is a tuple of n of them, and B_t, C_t are n scalars each step. A
# (n, BLOCK_D) tensor instead lets the compiler pick a layout per load (B's is contiguous along
# n, A's along d), and the state then moves through shared memory every step.
_SEQ_CONFIGS = [triton.Config({"BLOCK_D": bd, "UNROLL": un}, num_warps=w)
                for bd, un, w in [(32, 4, 1), (32, 8, 1), (64, 4, 2), (64, 4, 1), (128, 4, 4),
                                  (128, 8, 4), (64, 8, 2), (256, 4, 4)]]
if os.environ.get("TRITON_INTERPRET", "0") == "1":  # its cost is per operation, not per channel
    _SEQ_CONFIGS = [triton.Config({"BLOCK_D": 16, "UNROLL": 4}, num_warps=1)]
LOG2E = tl.constexpr(1.4426950408889634)


@triton.autotune(configs=_SEQ_CONFIGS, key=["Dm", "N", "MODE"])
@triton.jit
def selective_scan_seq_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, last_ptr, h0_ptr,
    stats_ptr, L, Dm, N, CHUNK, NCHUNK,
    s_ub, s_ud, s_ul, s_tb, s_td, s_tl, s_Ad, s_An, s_Bb, s_Bn, s_Bl, s_Cb, s_Cn, s_Cl,
    s_zb, s_zd, s_zl, s_ob, s_od, s_ol,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    STORE_LAST: tl.constexpr, MODE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    UNROLL: tl.constexpr,
):
    """The scan of ``selective_scan_kernel`` (same arguments, same MODEs; BLOCK_N is n itself),
    walked one step at a time: each channel's n state values stay in its thread's registers; a
    step is an exponential and two multiply-adds per state element, with no log-depth combining
    and no exchange between threads. The loop body covers UNROLL steps whose loads do not depend
    on the state, so they are issued together and their latency is paid once per UNROLL steps.
    Channel-contiguous inputs ((b, l, d) memory, what the projections write) make each step's
    loads of u, Δ, z and stores of y contiguous."""
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_c = tl.program_id(2)
    l_start = pid_c * CHUNK
    l_end = tl.minimum(L, l_start + CHUNK)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < Dm
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    # chunk states and the last state are stored (n, d), channels contiguous like everything
    # else this kernel touches (A too: the caller passes it transposed)
    chunk_row = (pid_b * NCHUNK + pid_c) * BLOCK_N
    A2 = ()  # exp(Δ·A) = exp2(Δ·A·log2 e)
    h = ()
    for j in tl.static_range(BLOCK_N):
        A2 = A2 + (tl.load(A_ptr + j * s_An + offs_d * s_Ad, mask=mask_d,
                           other=0.0).to(tl.float32) * LOG2E,)
        if MODE == 2:
            h = h + (tl.load(h0_ptr + (chunk_row + j) * Dm + offs_d, mask=mask_d, other=0.0),)
        else:
            h = h + (tl.zeros((BLOCK_D,), dtype=tl.float32),)
    dt_sum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    u_row = u_ptr + pid_b * s_ub + offs_d * s_ud
    t_row = dt_ptr + pid_b * s_tb + offs_d * s_td
    z_row = z_ptr + pid_b * s_zb + offs_d * s_zd
    o_row = out_ptr + pid_b * s_ob + offs_d * s_od
    B_row = B_ptr + pid_b * s_Bb
    C_row = C_ptr + pid_b * s_Cb
    for l0 in range(l_start, l_end, UNROLL):
        for i in tl.static_range(UNROLL):
            t = l0 + i
            m = mask_d & (offs_d * 0 + t < l_end)  # a vector: the interpreter wants one
            tc = tl.minimum(t, l_end - 1)  # B, C of a step past the end: any step's will do
            u = tl.load(u_row + t * s_ul, mask=m, other=0.0).to(tl.float32)
            dt = tl.load(t_row + t * s_tl, mask=m, other=0.0).to(tl.float32)
            if HAS_BIAS:
                dt = dt + bias
            if SOFTPLUS:
                dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
            dt = tl.where(m, dt, 0.0)  # steps past the end: Ā = 1, B̄u = 0
            dtu = dt * u
            y = tl.zeros((BLOCK_D,), dtype=tl.float32)
            hn = ()
            for j in tl.static_range(BLOCK_N):
                Bj = tl.load(B_row + tc * s_Bl + j * s_Bn).to(tl.float32)
                hj = tl.exp2(dt * A2[j]) * h[j] + Bj * dtu
                if MODE != 1:
                    y += hj * tl.load(C_row + tc * s_Cl + j * s_Cn).to(tl.float32)
                hn = hn + (hj,)
            h = hn
            if MODE == 1:
                dt_sum += dt
            else:
                if HAS_D:
                    y += Dv * u
                if HAS_Z:
                    zz = tl.load(z_row + t * s_zl, mask=m, other=0.0).to(tl.float32)
                    y = y * zz * tl.sigmoid(zz)
                tl.store(o_row + t * s_ol, y.to(out_ptr.dtype.element_ty), mask=m)
    half = tl.num_programs(0) * NCHUNK * Dm * BLOCK_N
    for j in tl.static_range(BLOCK_N):
        if MODE == 1:
            tl.store(stats_ptr + (chunk_row + j) * Dm + offs_d, h[j], mask=mask_d)
            tl.store(stats_ptr + half + (chunk_row + j) * Dm + offs_d,
                     tl.exp2(A2[j] * dt_sum), mask=mask_d)
        elif STORE_LAST:
            if pid_c == NCHUNK - 1:
                tl.store(last_ptr + (pid_b * BLOCK_N + j) * Dm + offs_d, h[j], mask=mask_d)


@triton.jit
def scan_chain_kernel(stats_ptr, h0_ptr, NCHUNK, DN, BLOCK: tl.constexpr):
    """Each chunk's first state from the chunks before it: h0[0] = 0,
    h0[c] = decay[c-1]·h0[c-1] + end[c-1]. stats (2, b, chunks, d·n), h0 (b, chunks, d·n)."""
    pid_b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < DN
    half = tl.num_programs(0) * NCHUNK * DN
    h = tl.zeros((BLOCK,), dtype=tl.float32)
    for c in range(0, NCHUNK):
        base = (pid_b * NCHUNK + c) * DN + offs
        tl.store(h0_ptr + base, h, mask=m)
        h = tl.load(stats_ptr + half + base, mask=m, other=0.0) * h + tl.load(
            stats_ptr + base, mask=m, other=0.0)


# --- prefill: the causal depthwise convolution and its activation, one kernel -----------------


@triton.jit
def causal_conv1d_silu_kernel(x_ptr, w_ptr, b_ptr, out_ptr, L, Dm, s_xb, s_xl, s_xd, s_ob, s_ol,
                              s_od, K: tl.constexpr, HAS_BIAS: tl.constexpr,
                              BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[t] = silu(Σ_j w[j]·x[t-K+1+j] + bias) per channel, x zero before the start: what
    ``F.conv1d(x, w, bias, padding=K-1, groups=d)[..., :L]`` and the activation compute, the
    convolution's output rounded to its dtype before the activation as there. x, out: (b, l, d)
    by strides; w: (d, 1, K) contiguous."""
    pid_b = tl.program_id(0)
    offs_l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < Dm
    acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    for j in tl.static_range(K):
        src = offs_l - (K - 1) + j
        m = ((src >= 0) & (src < L))[:, None] & mask_d[None, :]
        xv = tl.load(x_ptr + pid_b * s_xb + src[:, None] * s_xl + offs_d[None, :] * s_xd, mask=m,
                     other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs_d * K + j, mask=mask_d, other=0.0).to(tl.float32)
        acc += xv * w[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    acc = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
    m_out = (offs_l < L)[:, None] & mask_d[None, :]
    tl.store(out_ptr + pid_b * s_ob + offs_l[:, None] * s_ol + offs_d[None, :] * s_od,
             (acc * tl.sigmoid(acc)).to(out_ptr.dtype.element_ty), mask=m_out)


# --- backward: a reverse scan over the same tiles -------------------------------------------

# Tile shapes for the backward. Its tiles hold more live (BD, BN, BL) tensors than the forward's
# (states, adjoints, their scans), so smaller tiles are offered too. The smallest BLOCK_L sizes
# the scratch of tile-start states (``BWD_MIN_BLOCK_L``).
_BWD_CONFIGS = [triton.Config({"BLOCK_D": bd, "BLOCK_L": bl}, num_warps=w)
                for bd, bl, w in [(2, 32, 2), (4, 16, 2), (4, 32, 4), (8, 16, 4), (8, 32, 4),
                                  (4, 64, 4), (16, 16, 4), (8, 32, 8)]]
if os.environ.get("TRITON_INTERPRET", "0") == "1":
    # small tiles: several per test sequence, and the interpreter scans element by element
    _BWD_CONFIGS = [triton.Config({"BLOCK_D": 2, "BLOCK_L": 16}, num_warps=4)]
BWD_CONFIGS = [(c.kwargs["BLOCK_D"], c.kwargs["BLOCK_L"], c.num_warps) for c in _BWD_CONFIGS]
BWD_MIN_BLOCK_L = min(bl for _, bl, _ in BWD_CONFIGS)


@triton.jit
def _load_dt(dt_ptr, row, offs_d, offs_l, mask, s_td, s_tl, bias,
             HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(raw, Δ): raw = delta + bias; Δ = softplus(raw) as the forward computes it, 0 off mask."""
    raw = tl.load(dt_ptr + row + offs_d[:, None] * s_td + offs_l[None, :] * s_tl, mask=mask,
                  other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw = raw + bias[:, None]
    dt = raw
    if SOFTPLUS:
        dt = tl.where(raw <= 20.0, tl.log(1.0 + tl.exp(raw)), raw)
    return raw, tl.where(mask, dt, 0.0)


@triton.jit
def _load_dy(g_ptr, z_ptr, offs_d, offs_l, mask, g_row, s_gd, s_gl, z_row, s_zd, s_zl,
             HAS_Z: tl.constexpr):
    """(dout, z, dy): the output's gradient, the gate, and the gradient of y + D·u (BD, BL)."""
    g = tl.load(g_ptr + g_row + offs_d[:, None] * s_gd + offs_l[None, :] * s_gl, mask=mask,
                other=0.0).to(tl.float32)
    zz = g
    dy = g
    if HAS_Z:
        zz = tl.load(z_ptr + z_row + offs_d[:, None] * s_zd + offs_l[None, :] * s_zl, mask=mask,
                     other=0.0).to(tl.float32)
        dy = g * zz * tl.sigmoid(zz)
    return g, zz, dy


@triton.autotune(configs=_BWD_CONFIGS, key=["Dm", "N", "REVERSE"],
                 reset_to_zero=["dB_ptr", "dC_ptr"])
@triton.jit
def selective_scan_bwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, g_ptr, glast_ptr,
    du_ptr, ddt_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, hstart_ptr,
    L, Dm, N, NT,
    s_ub, s_ud, s_ul, s_tb, s_td, s_tl, s_Ad, s_An, s_Bb, s_Bn, s_Bl, s_Cb, s_Cn, s_Cl,
    s_zb, s_zd, s_zl, s_gb, s_gd, s_gl, s_xb, s_xd, s_xl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_GLAST: tl.constexpr, REVERSE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Gradients of ``selective_scan_kernel`` for one (batch row, block of channels).

    Pass 1 walks the sequence forward and stores the state at each tile's start (hstart,
    (b, NT, d, n) float32). Pass 2 walks the tiles backward: it rebuilds the tile's states from
    hstart with the forward scan, and scans the adjoint λ_t = ∂loss/∂h_t backward,
    λ_t = C_t·dy_t + Ā_{t+1} λ_{t+1} (λ after the last step: the last state's gradient), with
    the same operator over the pairs (Ā_{t+1}, C_t·dy_t). Gradients, with hA_t = h_t - B̄u_t
    (= Ā_t h_{t-1}, no division):
        ∂B̄u_t = λ_t,  ∂Δ_t = u_t Σ_n λ_t B_t + Σ_n λ_t A hA_t,  ∂A = Σ_t λ_t Δ_t hA_t,
        ∂u_t = D dy_t + Δ_t Σ_n λ_t B_t,  ∂B_t = Σ_d λ_t Δ_t u_t,  ∂C_t = Σ_d dy_t h_t.
    du, ddt, dz (b, d, l) are written; dB, dC (b, n, l) float32 are summed over channel blocks
    with atomics; dA (b, d, n), dD and dbias (b, d) are this row's partial sums.

    REVERSE: the backward scan is ``tl.associative_scan(reverse=True)``; otherwise the tile is
    read in reversed order, scanned forward and flipped back (``tl.flip``).
    """
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (BD,)
    offs_n = tl.arange(0, BLOCK_N)  # (BN,)
    ar = tl.arange(0, BLOCK_L)
    mask_d = offs_d < Dm
    mask_n = offs_n < N
    m_dn = mask_d[:, None] & mask_n[None, :]
    A = tl.load(A_ptr + offs_d[:, None] * s_Ad + offs_n[None, :] * s_An, mask=m_dn,
                other=0.0).to(tl.float32)  # (BD, BN)
    Dv = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    u_row, t_row, z_row, g_row = pid_b * s_ub, pid_b * s_tb, pid_b * s_zb, pid_b * s_gb
    n_tiles = tl.cdiv(L, BLOCK_L)
    dn_off = offs_d[:, None] * N + offs_n[None, :]  # (BD, BN) in a (d, n) plane

    # pass 1: the state at every tile's start
    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for t in range(0, n_tiles):
        tl.store(hstart_ptr + (pid_b * NT + t) * Dm * N + dn_off, h, mask=m_dn)
        offs_l = t * BLOCK_L + ar
        m_dl = mask_d[:, None] & (offs_l < L)[None, :]
        m_nl = mask_n[:, None] & (offs_l < L)[None, :]
        u = tl.load(u_ptr + u_row + offs_d[:, None] * s_ud + offs_l[None, :] * s_ul, mask=m_dl,
                    other=0.0).to(tl.float32)
        _, dt = _load_dt(dt_ptr, t_row, offs_d, offs_l, m_dl, s_td, s_tl, bias, HAS_BIAS,
                         SOFTPLUS)
        Bt = tl.load(B_ptr + pid_b * s_Bb + offs_n[:, None] * s_Bn + offs_l[None, :] * s_Bl,
                     mask=m_nl, other=0.0).to(tl.float32)
        cA, cB = tl.associative_scan((tl.exp(dt[:, None, :] * A[:, :, None]),
                                      (dt * u)[:, None, :] * Bt[None, :, :]), 2, combine)
        h = tl.sum(tl.where((ar == BLOCK_L - 1)[None, None, :], cA * h[:, :, None] + cB, 0.0),
                   axis=2)
    tl.debug_barrier()  # pass 2 reads what other threads of this program stored

    # pass 2: tiles in reverse order; lam carries λ at the first step of the tile after
    lam_next = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    if HAS_GLAST:
        lam_next = tl.load(glast_ptr + pid_b * Dm * N + dn_off, mask=m_dn, other=0.0)
    dA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for i in range(0, n_tiles):
        t = n_tiles - 1 - i
        offs_l = t * BLOCK_L + ar
        mask_l = offs_l < L
        m_dl = mask_d[:, None] & mask_l[None, :]
        m_nl = mask_n[:, None] & mask_l[None, :]
        u = tl.load(u_ptr + u_row + offs_d[:, None] * s_ud + offs_l[None, :] * s_ul, mask=m_dl,
                    other=0.0).to(tl.float32)  # (BD, BL)
        raw, dt = _load_dt(dt_ptr, t_row, offs_d, offs_l, m_dl, s_td, s_tl, bias, HAS_BIAS,
                           SOFTPLUS)
        Bt = tl.load(B_ptr + pid_b * s_Bb + offs_n[:, None] * s_Bn + offs_l[None, :] * s_Bl,
                     mask=m_nl, other=0.0).to(tl.float32)  # (BN, BL)
        Ct = tl.load(C_ptr + pid_b * s_Cb + offs_n[:, None] * s_Cn + offs_l[None, :] * s_Cl,
                     mask=m_nl, other=0.0).to(tl.float32)
        g, zz, dy = _load_dy(g_ptr, z_ptr, offs_d, offs_l, m_dl, g_row, s_gd, s_gl, z_row,
                             s_zd, s_zl, HAS_Z)
        # the tile's states, rebuilt from its first state
        h0 = tl.load(hstart_ptr + (pid_b * NT + t) * Dm * N + dn_off, mask=m_dn, other=0.0)
        dBu = (dt * u)[:, None, :] * Bt[None, :, :]  # (BD, BN, BL)
        cA, cB = tl.associative_scan((tl.exp(dt[:, None, :] * A[:, :, None]), dBu), 2, combine)
        hs = cA * h0[:, :, None] + cB  # h_t
        x_off = pid_b * s_xb + offs_d[:, None] * s_xd + offs_l[None, :] * s_xl
        if HAS_Z:  # out = (y + D·u)·silu(z): ∂z needs y, rebuilt here
            y = tl.sum(hs * Ct[None, :, :], axis=1) + Dv[:, None] * u
            sz = tl.sigmoid(zz)
            tl.store(dz_ptr + x_off, (g * y * sz * (1.0 + zz * (1.0 - sz))).to(
                dz_ptr.dtype.element_ty), mask=m_dl)
        if HAS_D:
            dD_acc += tl.sum(dy * u, axis=1)
        tl.atomic_add(dC_ptr + pid_b * N * L + offs_n[:, None] * L + offs_l[None, :],
                      tl.sum(dy[:, None, :] * hs, axis=0), mask=m_nl)
        # the adjoint λ_t over this tile
        if REVERSE:
            nxt = offs_l + 1
            _, dtn = _load_dt(dt_ptr, t_row, offs_d, nxt, mask_d[:, None] & (nxt < L)[None, :],
                              s_td, s_tl, bias, HAS_BIAS, SOFTPLUS)
            rA, rB = tl.associative_scan((tl.exp(dtn[:, None, :] * A[:, :, None]),
                                          dy[:, None, :] * Ct[None, :, :]), 2, combine,
                                         reverse=True)
            lam = rA * lam_next[:, :, None] + rB
        else:  # the same pairs read last step first, scanned forward, flipped back
            offs_r = t * BLOCK_L + BLOCK_L - 1 - ar
            m_rl = mask_d[:, None] & (offs_r < L)[None, :]
            nxt = offs_r + 1
            _, dtn = _load_dt(dt_ptr, t_row, offs_d, nxt, mask_d[:, None] & (nxt < L)[None, :],
                              s_td, s_tl, bias, HAS_BIAS, SOFTPLUS)
            _, _, dy_r = _load_dy(g_ptr, z_ptr, offs_d, offs_r, m_rl, g_row, s_gd, s_gl, z_row,
                                  s_zd, s_zl, HAS_Z)
            C_r = tl.load(C_ptr + pid_b * s_Cb + offs_n[:, None] * s_Cn + offs_r[None, :] * s_Cl,
                          mask=mask_n[:, None] & (offs_r < L)[None, :], other=0.0).to(tl.float32)
            rA, rB = tl.associative_scan((tl.exp(dtn[:, None, :] * A[:, :, None]),
                                          dy_r[:, None, :] * C_r[None, :, :]), 2, combine)
            lam = tl.flip(rA * lam_next[:, :, None] + rB, 2)
        lam_next = tl.sum(tl.where((ar == 0)[None, None, :], lam, 0.0), axis=2)
        hA = hs - dBu  # Ā_t h_{t-1}
        lamB = tl.sum(lam * Bt[None, :, :], axis=1)  # (BD, BL)
        ddt = u * lamB + tl.sum(lam * A[:, :, None] * hA, axis=1)
        if SOFTPLUS:
            ddt = ddt * tl.where(raw <= 20.0, tl.sigmoid(raw), 1.0)
        ddt = tl.where(m_dl, ddt, 0.0)
        dbias_acc += tl.sum(ddt, axis=1)
        dA_acc += tl.sum(lam * hA * dt[:, None, :], axis=2)
        tl.atomic_add(dB_ptr + pid_b * N * L + offs_n[:, None] * L + offs_l[None, :],
                      tl.sum(lam * (dt * u)[:, None, :], axis=0), mask=m_nl)
        tl.store(du_ptr + x_off, (Dv[:, None] * dy + dt * lamB).to(du_ptr.dtype.element_ty),
                 mask=m_dl)
        tl.store(ddt_ptr + x_off, ddt.to(ddt_ptr.dtype.element_ty), mask=m_dl)
    tl.store(dA_ptr + pid_b * Dm * N + dn_off, dA_acc, mask=m_dn)
    tl.store(dD_ptr + pid_b * Dm + offs_d, dD_acc, mask=mask_d)
    tl.store(dbias_ptr + pid_b * Dm + offs_d, dbias_acc, mask=mask_d)


@triton.jit
def reverse_scan_probe_kernel(a_ptr, c_ptr, out_ptr, BLOCK_D: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    """X_t = c_t + a_t·X_{t+1} over axis 2 of a (BD, BN, BL) tile with ``reverse=True``, in
    the backward's layout: whether this Triton's reverse scan composes as the backward needs."""
    off = (tl.arange(0, BLOCK_D)[:, None, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :, None]
           ) * BLOCK_L + tl.arange(0, BLOCK_L)[None, None, :]
    _, x = tl.associative_scan((tl.load(a_ptr + off), tl.load(c_ptr + off)), 2, combine,
                               reverse=True)
    tl.store(out_ptr + off, x)


# --- decode: one token per row, small fused kernels beside the GEMVs (in_proj, out_proj: cuBLAS) ---


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
def _conv_step(xz_ptr, state_ptr, w_ptr, b_ptr, out_ptr, row, offs_d, mask_d, Dm, s_xz,
               K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Shift the new input into the conv state (b, d, k); store and return u = silu(conv ·
    weight + bias) for channels ``offs_d``, rounded to out's dtype as conv1d's output is."""
    offs_k = tl.arange(0, BLOCK_K)
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
    u = (acc * tl.sigmoid(acc)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * Dm + offs_d, u, mask=mask_d)
    return u


@triton.jit
def conv_step_kernel(xz_ptr, state_ptr, w_ptr, b_ptr, out_ptr, Dm, s_xz,
                     K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    """Shift the new input into the conv state (b, d, k); out = silu(conv · weight + bias)."""
    row = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    _conv_step(xz_ptr, state_ptr, w_ptr, b_ptr, out_ptr, row, offs_d, offs_d < Dm, Dm, s_xz, K,
               HAS_BIAS, BLOCK_K)


@triton.jit
def conv_xproj_step_kernel(xz_ptr, state_ptr, w_ptr, b_ptr, out_ptr, xw_ptr, part_ptr, Dm, E,
                           s_xz, K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr):
    """``conv_step_kernel`` followed by this block's share of ``x_proj``: part[row, block] =
    W_x[:, block] · u[block] in float32, (b, blocks, E); ``xproj_reduce_kernel`` sums the blocks
    in a fixed order (no atomics: the same sums every run). Two small launches instead of the
    convolution, cuBLAS's split-K matrix-vector product and its reduction."""
    row = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < Dm
    u = _conv_step(xz_ptr, state_ptr, w_ptr, b_ptr, out_ptr, row, offs_d, mask_d, Dm, s_xz, K,
                   HAS_BIAS, BLOCK_K)
    offs_e = tl.arange(0, BLOCK_E)
    mask_e = offs_e < E
    wx = tl.load(xw_ptr + offs_e[:, None] * Dm + offs_d[None, :],
                 mask=mask_e[:, None] & mask_d[None, :], other=0.0)
    part = tl.sum(wx.to(tl.float32) * u.to(tl.float32)[None, :], axis=1)
    tl.store(part_ptr + (row * tl.num_programs(1) + pid_d) * E + offs_e, part, mask=mask_e)


@triton.jit
def xproj_reduce_kernel(part_ptr, out_ptr, NP, E, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr):
    """x_proj's output row from ``conv_xproj_step_kernel``'s partial sums: out[row, e] =
    Σ_p part[row, p, e], in a fixed order, rounded to the output's dtype as x_proj's is."""
    row = tl.program_id(0)
    offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_p = tl.arange(0, BLOCK_P)
    m = (offs_p < NP)[:, None] & (offs_e < E)[None, :]
    part = tl.load(part_ptr + (row * NP + offs_p[:, None]) * E + offs_e[None, :], mask=m,
                   other=0.0)
    tl.store(out_ptr + row * E + offs_e, tl.sum(part, axis=0).to(out_ptr.dtype.element_ty),
             mask=offs_e < E)


@triton.jit
def ssm_step_kernel(x_ptr, z_ptr, dbc_ptr, wdt_ptr, bdt_ptr, A_ptr, Dp_ptr, state_ptr, out_ptr,
                    dtr_ptr, Dm, R, N, s_z, s_dbc,
                    BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                    DT_READY: tl.constexpr):
    """dt = softplus(W_dt · dt_low + b); h = exp(dt·A)·h + dt·x·B; y = (C·h + D·x)·silu(z).

    dt_low, B, C: x_proj's output row (b, r + 2n) in the model's dtype. DT_READY: W_dt · dt_low
    was computed already (a matrix product over the whole batch, ``dtr_ptr`` (b, d)); otherwise
    each program computes its channels'."""
    row = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d, mask_r, mask_n = offs_d < Dm, offs_r < R, offs_n < N
    rnd = out_ptr.dtype.element_ty
    Bv = tl.load(dbc_ptr + row * s_dbc + R + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    Cv = tl.load(dbc_ptr + row * s_dbc + R + N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if DT_READY:
        dt = tl.load(dtr_ptr + row * Dm + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        low = tl.load(dbc_ptr + row * s_dbc + offs_r, mask=mask_r, other=0.0).to(tl.float32)
        wdt = tl.load(wdt_ptr + offs_d[:, None] * R + offs_r[None, :],
                      mask=mask_d[:, None] & mask_r[None, :], other=0.0)
        dt = tl.sum(wdt.to(tl.float32) * low[None, :], axis=1)
        dt = dt.to(rnd).to(tl.float32)  # dt_proj's output dtype
    dt += tl.load(bdt_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
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
