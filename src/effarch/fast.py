"""Portable fast Mamba: a fused selective scan and a graph-captured decoder, pip-installable.

Without mamba-ssm's compiled kernels (none exist for aarch64 / DGX Spark), transformers runs
Mamba's scan as a Python loop over the sequence that also materialises (b, d, l, n) float32
tensors. This module gives the same function, ``selective_scan`` (mamba-ssm's signature, see
``effarch.ssm.selective_scan_ref``, the reference it is tested against), three ways:

- ``triton``: Triton kernels. On (b, l, d) memory (the prefill's), one step at a time with each
  channel's state inside one thread, the sequence cut into chunks scanned in parallel and then
  chained; on (b, d, l) memory, one program per (batch, block of channels) walking the sequence
  in tiles and scanning each tile with the associative operator (a1, b1)∘(a2, b2) =
  (a1·a2, a2·b1 + b2) (Blelloch 1990; the Mamba paper §3.3 uses the same operator). Nothing of
  size (b, d, l, n) ever reaches memory. With gradients, a Triton backward walks the tiles
  in reverse (``selective_scan_triton_backward``).
- ``chunked``: PyTorch, any device: Ā and B̄u are computed for a tile of time steps at once,
  then one fused multiply-add per step, and the readout y = C·h one tile at a time. Gradients
  flow through it.
- ``reference``: ``effarch.ssm.selective_scan_ref``.

``MambaFastGenerator`` runs an unmodified transformers ``MambaForCausalLM`` with its own weights:
prefill with ``selective_scan``, then decoding one token at a time on static state tensors,
captured in a CUDA graph on GPUs. It reads the weights only; it patches nothing in transformers.

``use_fast_scan(model)`` is the training opt-in: inside the ``with`` block each ``MambaMixer``
runs its own modules (``in_proj``, ``x_proj``, ``out_proj``, LoRA wrappers included) and only
its scan goes through ``selective_scan``; on exit the mixers are exactly as they were.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from dataclasses import dataclass

import torch

from effarch.backends import is_mamba_mixer
from effarch.mixer import conv_tail, mixer_prefill, mixer_step
from effarch.paths import TROUBLE
from effarch.ssm import prepare_delta, readout, selective_scan_ref

BACKENDS = ("auto", "triton", "chunked", "reference")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when Triton imports (its kernels then run on CUDA, or anywhere in interpreter mode)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_runs(device: torch.device) -> bool:
    """Triton kernels run for tensors on ``device``: CUDA, or anywhere in interpreter mode."""
    return triton_available() and (device.type == "cuda" or _interpreting())


# The Triton backward passed its GPU tests (tests/test_fast_backward.py, marked cuda) on an H100
# (data/measurements/README.md names the kept log), so "auto" trains with it on CUDA too. Set
# this to False to train through the chunked PyTorch scan on CUDA instead.
TRITON_BACKWARD_ON_GPU_BY_DEFAULT = True


def choose_backend(u: torch.Tensor, needs_grad: bool = False) -> str:
    """The best backend for this tensor: Triton on CUDA (the forward; the backward too once
    verified on a GPU: ``TRITON_BACKWARD_ON_GPU_BY_DEFAULT``) or under Triton's interpreter,
    else the chunked scan."""
    if not _triton_runs(u.device):
        return "chunked"
    if needs_grad and u.device.type == "cuda" and not TRITON_BACKWARD_ON_GPU_BY_DEFAULT:
        return "chunked"
    return "triton"


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, *, backend: str = "auto", chunk: int | None = None):
    """mamba-ssm's ``selective_scan_fn``: u, delta, z (b, d, l); A (d, n); B, C (b, n, l).

    Returns out (b, d, l) in u's dtype, and the last state (b, d, n) float32 if asked.
    ``chunk``: steps per chunk of the forward-only scans (``triton`` without gradients,
    ``chunked``); None keeps their defaults. The reference and the Triton backward have none.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}. "
                         f"{TROUBLE} 'Fast path arguments'.")
    tensors = (u, delta, A, B, C, D, z, delta_bias)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors)
    if backend == "auto":
        backend = choose_backend(u, needs_grad)
    if B.dim() != 3 or C.dim() != 3:  # grouped or fixed B/C: only the reference takes them
        backend = "reference"
    if backend == "triton" and needs_grad:
        return selective_scan_triton_autograd(u, delta, A, B, C, D, z, delta_bias,
                                              delta_softplus, return_last_state)
    fn = {"triton": selective_scan_triton, "chunked": selective_scan_chunked,
          "reference": selective_scan_ref}[backend]
    kw = {"chunk": chunk} if chunk is not None and backend != "reference" else {}
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, **kw)


# --- the chunked PyTorch scan ----------------------------------------------------------------


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                           delta_softplus=False, return_last_state=False, chunk: int = 128):
    """Scan in tiles of ``chunk`` steps: vectorised discretisation and readout, one FMA a step.

    Memory beyond the inputs: two (chunk, b, d, n) float32 tiles.
    """
    b, d, length = u.shape
    n = A.shape[-1]
    dt = prepare_delta(delta, delta_bias, delta_softplus)  # (b, d, l) float32
    # time-major and contiguous, so that every step below reads one contiguous slice
    dt_t = dt.permute(2, 0, 1).contiguous()                  # (l, b, d)
    dtu_t = (dt * u.float()).permute(2, 0, 1).contiguous()   # (l, b, d)
    B_t = B.float().permute(2, 0, 1).contiguous()            # (l, b, n)
    C_t = C.float().permute(2, 0, 1).contiguous()            # (l, b, n)
    A = A.float()
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, delta_bias))
    h = u.new_zeros((b, d, n), dtype=torch.float32)
    ys = []
    tile = None if grad else u.new_empty((chunk, b, d, n), dtype=torch.float32)
    for s in range(0, length, chunk):
        e = min(s + chunk, length)
        dA = torch.exp(dt_t[s:e, :, :, None] * A)            # (m, b, d, n)
        dBu = dtu_t[s:e, :, :, None] * B_t[s:e, :, None, :]  # (m, b, d, n)
        if grad:  # autograd cannot record writes into a preallocated tile
            states = []
            for t in range(e - s):
                h = torch.addcmul(dBu[t], dA[t], h)
                states.append(h)
            hs = torch.stack(states)
        else:
            for t in range(e - s):
                h = torch.addcmul(dBu[t], dA[t], h, out=tile[t])
            hs = tile[: e - s]
            h = h.clone()
        ys.append(torch.einsum("mbdn,mbn->mbd", hs, C_t[s:e]))   # (m, b, d)
    out = readout(torch.cat(ys).permute(1, 2, 0), u, D, z)
    return (out, h) if return_last_state else out


# --- the Triton scan -------------------------------------------------------------------------


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                          delta_softplus=False, return_last_state=False, *,
                          chunk: int | None = None, kernel: str | None = None):
    """The Triton scan (forward only; tile shape autotuned on first use). B, C: (b, n, l).

    Two kernels compute it (``kernel``; None picks by the inputs' memory layout):
    - ``"seq"``, for channel-contiguous inputs (views of (b, l, d) memory, as the projections
      write them, ``u.stride(1) == 1``): one step at a time per block of channels, the state in
      registers, each step's loads contiguous. Its sequence is cut into chunks scanned in
      parallel, then chained, so that there are enough programs for the GPU (``seq_chunks``).
    - ``"tile"``, for time-contiguous inputs ((b, d, l) memory): tiles of steps, each scanned with
      the associative operator; one pass over the sequence unless ``chunk`` is given.
    ``chunk`` (steps per chunk) overrides the chunking of either kernel.
    """
    if not triton_available():
        raise RuntimeError("Triton is not installed; use backend='chunked'. "
                           "See TROUBLESHOOTING.md, section 'Mamba is slow'.")
    if not _triton_runs(u.device):
        raise ValueError(f"the Triton scan runs on CUDA tensors (or anywhere under "
                         f"TRITON_INTERPRET=1), not on {u.device.type}: use backend='chunked'. "
                         f"{TROUBLE} 'Fast path arguments'.")
    if kernel not in (None, "seq", "tile"):
        raise ValueError(f"kernel must be 'seq', 'tile' or None, not {kernel!r}. "
                         f"{TROUBLE} 'Fast path arguments'.")
    b, d, length = u.shape
    n = A.shape[-1]
    kernel = kernel or ("seq" if u.stride(1) == 1 and d > 1 else "tile")
    seq = kernel == "seq"
    if chunk is None:
        chunk = _cdiv(length, seq_chunks(b, d, length, u.device)) if seq else length
    chunk = max(chunk, 1)
    n_chunks = _cdiv(length, chunk)
    out = torch.empty_like(u)
    if return_last_state:  # the seq kernel stores states (n, d), channels contiguous
        last = u.new_empty((b, n, d) if seq else (b, d, n), dtype=torch.float32)
    else:
        last = out
    if seq:
        A = A.t().contiguous().t()  # (d, n) values, (n, d) memory
    dummy = u  # unused pointer arguments still need a tensor
    zz = z if z is not None else dummy
    args = [u, delta, A, B, C, D if D is not None else dummy, zz,
            delta_bias if delta_bias is not None else dummy, out, last]
    sizes = [length, d, n, chunk, n_chunks, *u.stride(), *delta.stride(), *A.stride(),
             *B.stride(), *C.stride(), *zz.stride(), *out.stride()]
    flags = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                 SOFTPLUS=bool(delta_softplus), STORE_LAST=bool(return_last_state),
                 BLOCK_N=n if seq else _next_pow2(n))
    grid = lambda meta: (b, _cdiv(d, meta["BLOCK_D"]), n_chunks)  # noqa: E731
    from effarch import _triton_scan as tk

    kern = tk.selective_scan_seq_kernel if seq else tk.selective_scan_kernel
    if n_chunks == 1:
        kern[grid](*args, dummy, dummy, *sizes, MODE=0, **flags)
    else:
        stats = u.new_empty((2, b, n_chunks, d, n), dtype=torch.float32)
        kern[grid](*args, dummy, stats, *sizes, MODE=1, **flags)
        h0 = torch.empty_like(stats[0])                     # (b, chunks, d, n)
        block = 1024
        tk.scan_chain_kernel[(b, _cdiv(d * n, block))](stats, h0, n_chunks, d * n, BLOCK=block)
        kern[grid](*args, h0, dummy, *sizes, MODE=2, **flags)
    if return_last_state and seq:
        last = last.transpose(1, 2)  # (b, d, n) values
    return (out, last) if return_last_state else out


def seq_chunks(b: int, d: int, length: int, device: torch.device) -> int:
    """How many chunks the "seq" kernel cuts a sequence into: enough for about 96 warps of 32
    channels (one a thread) per multiprocessor, one and a half times what one can hold, so that
    the last wave is short; none shorter than 32 steps (the chain costs a pass over the states per
    chunk). On an H100 at d = 5,120: 32 chunks at 1K steps, the fastest count measured there;
    80 at 4K, where every count from 16 to 128 ran within 9% of the fastest; 80 at 16K, within
    7% of the fastest (data/measurements/tune_fast_mamba_h100.txt). One where there are warps
    enough, and on a CPU."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(_cdiv(96 * sms, b * _cdiv(d, 32)), length // 32))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --- the Triton backward ---------------------------------------------------------------------


@functools.cache
def reverse_scan_works(device: str, n: int) -> bool:
    """Whether ``tl.associative_scan(..., reverse=True)`` composes our operator as the backward
    needs (X_t = c_t + a_t·X_{t+1}) on ``device``, in every backward tile shape for state size
    ``n``. Checked once per (device, n) with a tiny kernel: reversed scans of non-commutative
    operators have had compiler bugs (triton-lang/triton#4362), and a wrong one would give
    wrong gradients silently. Where it fails the backward reads tiles reversed and flips them.
    """
    from effarch import _triton_scan as tk

    g = torch.Generator().manual_seed(0)
    bn = _next_pow2(n)
    for bd, bl, warps in tk.BWD_CONFIGS:
        a = torch.rand(bd, bn, bl, generator=g)
        c = torch.randn(bd, bn, bl, generator=g)
        want, acc = torch.empty_like(c), torch.zeros(bd, bn)
        for t in reversed(range(bl)):
            acc = c[..., t] + a[..., t] * acc
            want[..., t] = acc
        a, c = a.to(device), c.to(device)
        got = torch.empty_like(c)
        try:
            tk.reverse_scan_probe_kernel[(1,)](a, c, got, BLOCK_D=bd, BLOCK_N=bn, BLOCK_L=bl,
                                               num_warps=warps)
        except Exception:  # e.g. a Triton whose scan has no reverse=
            return False
        if not torch.allclose(got.cpu(), want, atol=1e-5, rtol=1e-4):
            return False
    return True


def selective_scan_triton_backward(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                   dout, dlast=None, *, reverse: bool | None = None):
    """Gradients of :func:`selective_scan_triton` (shapes as there; B, C: (b, n, l)).

    ``dout`` (b, d, l) is the output's gradient (None: zero), ``dlast`` (b, d, n) the last
    state's (None: zero). Returns (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias), each in its
    input's dtype, None where the input is None.

    Saved against recomputed: the forward keeps only its inputs (what autograd would keep for
    the projections anyway); the backward rebuilds the states, at the price of scanning each
    tile twice forward (pass 1 for the tile's first state, pass 2 for its states) and once
    backward, against the forward's once. Its scratch is the state at each tile's start,
    (b, ⌈l / 16⌉, d, n) float32, freed on return. dB and dC are summed over channel blocks with
    float32 atomics, so on a GPU their last bits depend on the order the blocks finish.
    ``reverse`` picks how the kernel scans backward (None: ``reverse_scan_works`` decides; both
    give the same numbers).
    """
    from effarch import _triton_scan as tk

    b, d, length = u.shape
    n = A.shape[-1]
    if reverse is None:
        reverse = reverse_scan_works(str(u.device), n)
    f32 = dict(device=u.device, dtype=torch.float32)
    dout = torch.zeros_like(u) if dout is None else dout
    du = torch.empty((b, d, length), device=u.device, dtype=u.dtype)  # (b, d, l) contiguous
    ddelta = torch.empty((b, d, length), device=u.device, dtype=delta.dtype)
    dz = torch.empty((b, d, length), device=u.device, dtype=z.dtype) if z is not None else du
    dA, dD, dbias = torch.empty(b, d, n, **f32), torch.empty(b, d, **f32), torch.empty(b, d, **f32)
    dB, dC = torch.zeros(b, n, length, **f32), torch.zeros(b, n, length, **f32)
    n_tiles = _cdiv(length, tk.BWD_MIN_BLOCK_L)
    hstart = torch.empty(b, n_tiles, d, n, **f32)
    zz = z if z is not None else u
    glast = dlast.float().contiguous() if dlast is not None else u
    grid = lambda meta: (b, _cdiv(d, meta["BLOCK_D"]))  # noqa: E731
    tk.selective_scan_bwd_kernel[grid](
        u, delta, A, B, C, D if D is not None else u, zz,
        delta_bias if delta_bias is not None else u, dout, glast,
        du, ddelta, dz, dA, dB, dC, dD, dbias, hstart, length, d, n, n_tiles,
        *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(), *zz.stride(),
        *dout.stride(), *du.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus), HAS_GLAST=dlast is not None, REVERSE=bool(reverse),
        BLOCK_N=_next_pow2(n))
    return (du, ddelta, dA.sum(0).to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
            dD.sum(0).to(D.dtype) if D is not None else None, dz if z is not None else None,
            dbias.sum(0).to(delta_bias.dtype) if delta_bias is not None else None)


class _TritonScanFunction(torch.autograd.Function):
    """Triton forward and Triton backward; saves the inputs only (see the backward)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        out, last = selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                          return_last_state=True)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        ctx.delta_softplus = delta_softplus
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        if dout is None and dlast is None:
            return (None,) * 9
        grads = selective_scan_triton_backward(*ctx.saved_tensors, ctx.delta_softplus, dout,
                                               dlast)
        needs = ctx.needs_input_grad[:8]
        return (*(g if need else None for g, need in zip(grads, needs, strict=True)), None)


def selective_scan_triton_autograd(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                                   delta_softplus=False, return_last_state=False):
    """:func:`selective_scan_triton` with gradients for every tensor input, from the Triton
    backward (:func:`selective_scan_triton_backward`). B, C: (b, n, l)."""
    if not triton_available():
        raise RuntimeError("Triton is not installed; use backend='chunked'. "
                           "See TROUBLESHOOTING.md, section 'Mamba is slow'.")
    if B.dim() != 3 or C.dim() != 3:
        raise ValueError("the Triton scan takes input-dependent B and C of shape (b, n, l); "
                         f"got {tuple(B.shape)} and {tuple(C.shape)}: use backend='reference'. "
                         f"{TROUBLE} 'Fast path arguments'.")
    D = D.contiguous() if D is not None else None  # the kernels index (d,) vectors densely
    delta_bias = delta_bias.contiguous() if delta_bias is not None else None
    out, last = _TritonScanFunction.apply(u, delta, A, B, C, D, z, delta_bias,
                                          bool(delta_softplus))
    return (out, last) if return_last_state else out


# --- training through transformers' MambaMixer: the scan only --------------------------------


TROUBLE_TRAINING = "See TROUBLESHOOTING.md, section 'Fast Mamba training'."


@dataclass
class ScanRouting:
    """What a ``use_fast_scan`` block routes: how many mixers, which backend, and how many
    mixer forwards went through effarch's scan so far (a forward with a cache does not; one
    recomputed by gradient checkpointing counts again)."""

    mixers: int
    backend: str
    calls: int = 0


def routable_mixers(model) -> list:
    """The model's transformers ``MambaMixer`` modules, or a TypeError naming what
    ``use_fast_scan`` cannot route (another mixer class, an offloaded or patched mixer)."""
    from transformers.models.mamba.modeling_mamba import MambaMixer

    mixers = [m for m in model.modules() if is_mamba_mixer(m)]
    if not mixers:
        raise TypeError(f"use_fast_scan found no Mamba mixer in {type(model).__name__}. "
                        + TROUBLE_TRAINING)
    for m in mixers:
        if type(m) is not MambaMixer:  # e.g. FalconMamba normalises Δ, B and C after x_proj
            raise TypeError(f"use_fast_scan routes transformers' MambaMixer only, not "
                            f"{type(m).__name__}, whose forward differs. " + TROUBLE_TRAINING)
        if "forward" in vars(m) or any(hasattr(c, "_hf_hook") for c in m.modules()):
            raise TypeError(f"use_fast_scan: this {type(m).__name__} already has its forward "
                            "replaced (a use_fast_scan block already open, or accelerate "
                            "offloading hooks). " + TROUBLE_TRAINING)
    return mixers


def _routed_forward(mixer, routing: ScanRouting):
    """The mixer's forward with effarch's scan: transformers' signature, its modules called."""
    original = mixer.forward
    signature = inspect.signature(original)

    def scan(u, delta, A, B, C, *, D, z, delta_bias, delta_softplus):
        return selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                              delta_softplus=delta_softplus, backend=routing.backend)

    def forward(hidden_states, *args, **kwargs):
        bound = signature.bind(hidden_states, *args, **kwargs).arguments
        given = {**bound.get("kwargs", {}), **bound}
        if given.get("cache") is not None or given.get("cache_params") is not None:
            return original(hidden_states, *args, **kwargs)  # generation: transformers' own
        routing.calls += 1
        return mixer_prefill(mixer, hidden_states, scan=scan,
                             attention_mask=given.get("attention_mask")).output

    return forward


@contextlib.contextmanager
def use_fast_scan(model, *, backend: str = "auto"):
    """Within the block, every ``MambaMixer`` of ``model`` scans with :func:`selective_scan`.

    Everything else stays transformers': ``in_proj``, ``x_proj`` and ``out_proj`` are called as
    modules (PEFT LoRA wrappers on them run and train), the convolution and ``dt_proj`` are
    read as weights, as transformers' mixer reads them (an adapter on ``dt_proj`` does nothing
    on either path), ``A = -exp(A_log)``, ``D`` and ``dt_proj.bias`` get gradients through the
    scan. With ``backend="auto"`` the scan is Triton on CUDA for the forward and, once verified
    on a GPU (``TRITON_BACKWARD_ON_GPU_BY_DEFAULT``), the backward; ``backend="triton"`` asks for
    the Triton backward now; elsewhere the chunked PyTorch scan.
    A forward given a cache (generation) runs transformers' own forward. On exit, even by an
    exception, each mixer's forward is transformers' again. Yields a :class:`ScanRouting`.

        with fast.use_fast_scan(model) as routing:
            loss = model(input_ids=ids, labels=ids).loss   # (b, l) ids
            loss.backward()
        assert routing.calls == model.config.num_hidden_layers  # twice that with gradient
                                                                 # checkpointing (forwards rerun)

    Raises TypeError for mixers it cannot route (FalconMamba, Jamba, Mamba2, ...; offloaded or
    already patched mixers), naming TROUBLESHOOTING.md's section.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}. "
                         f"{TROUBLE} 'Fast path arguments'.")
    mixers = routable_mixers(model)
    routing = ScanRouting(mixers=len(mixers), backend=backend)
    patched = []
    try:
        for m in mixers:
            m.forward = _routed_forward(m, routing)
            patched.append(m)
        yield routing
    finally:
        for m in patched:
            del m.forward  # the instance attribute: the class's forward shows again


# --- fast generation over an unmodified transformers Mamba -----------------------------------


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """MambaRMSNorm as transformers computes it: float32 statistics, weight in its own dtype."""
    xf = x.to(weight.dtype).float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(weight.dtype)


class MambaFastGenerator:
    """Greedy generation for a transformers ``MambaForCausalLM``, reading only its weights.

    Prefill runs every layer over the prompt with :func:`selective_scan`; decoding keeps each
    layer's conv state (b, d, k) and SSM state (b, d, n, float32) in static tensors and, on CUDA,
    replays one captured CUDA graph per token (``use_graph=False`` runs the same step eagerly).

    ``kernels`` (default: where Triton runs and the residual is float32) decodes with fused
    Triton kernels; ``fused_prefill`` (default: with ``kernels``) prefills in Triton kernels over
    (b, l, d) memory, its scan in ``prefill_chunks`` chunks (None: ``seq_chunks`` decides).
    ``fuse_xproj_max_batch`` and ``dt_matmul_min_batch`` pick the decode step's form by batch
    size (see ``_step_kernels``). ``fused_prefill=False, fuse_xproj_max_batch=0,
    dt_matmul_min_batch=10**9`` is the first round's path, which the benchmark puts beside it.
    """

    def __init__(self, model, *, use_graph: bool | None = None, backend: str = "auto",
                 kernels: bool | None = None, fused_prefill: bool | None = None,
                 fuse_xproj_max_batch: int = 4, dt_matmul_min_batch: int = 8,
                 prefill_chunks: int | None = None):
        cfg = model.config
        # FalconMamba's mixer normalises dt, B and C after the split, which this path does not
        if getattr(cfg, "model_type", "") != "mamba":
            raise TypeError(f"MambaFastGenerator needs a MambaForCausalLM, got {type(model)}. "
                            f"{TROUBLE} 'Fast path arguments'.")
        self.model, self.cfg, self.backend = model, cfg, backend
        self.layers = [blk for blk in model.backbone.layers]
        first = self.layers[0].mixer
        self.device, self.dtype = first.in_proj.weight.device, first.in_proj.weight.dtype
        self.d_inner, self.n = first.A_log.shape
        self.k = first.conv1d.weight.shape[-1]
        self.rank = first.dt_proj.weight.shape[1]
        self.eps = cfg.layer_norm_epsilon
        self.use_graph = self.device.type == "cuda" if use_graph is None else use_graph
        # the fused step keeps the residual in float32, as Mamba's configs ask (residual_in_fp32)
        fused_ok = _triton_runs(self.device) and cfg.residual_in_fp32
        self.kernels = fused_ok if kernels is None else kernels
        # prefill in Triton kernels over (b, l, d) memory; the scan through the "auto" backend
        self.fused_prefill = (self.kernels and backend in ("auto", "triton")
                              if fused_prefill is None else fused_prefill)
        # decode batches up to this size fuse x_proj into the convolution's kernel; from
        # dt_matmul_min_batch rows, dt_proj runs as one matrix product for the whole batch
        plain = lambda m: type(m) is torch.nn.Linear and m.bias is None  # noqa: E731
        self.fuse_xproj_max_batch = (fuse_xproj_max_batch if all(
            plain(blk.mixer.x_proj) for blk in self.layers) else 0)
        self.dt_matmul_min_batch = dt_matmul_min_batch
        # chunks the fused prefill's scan cuts a prompt into (None: ``seq_chunks`` decides)
        self.prefill_chunks = prefill_chunks
        self._A = [-torch.exp(blk.mixer.A_log.float()) for blk in self.layers]
        # the fused prefill's scan arguments, made once: A with (n, d) memory (what the "seq"
        # kernel reads; selective_scan_triton would otherwise copy it every call), D and the
        # dt bias in float32
        self._A_seq = [a.t().contiguous().t() for a in self._A]
        self._D = [blk.mixer.D.float() for blk in self.layers]
        self._dt_bias = [blk.mixer.dt_proj.bias.float() if blk.mixer.dt_proj.bias is not None
                         else None for blk in self.layers]
        self._batch = None
        self._graph = None

    @property
    def path(self) -> str:
        step = ("fused Triton step, " if self.kernels else "") + (
            "CUDA graph" if self.use_graph else "eager")
        scan = self.backend if self.backend != "auto" else (
            "triton" if _triton_runs(self.device) else "chunked")
        fused = "fused Triton " if self.fused_prefill else ""
        return f"effarch fast path ({scan} scan {fused}prefill, {step} decode)"

    def _allocate(self, batch: int) -> None:
        n_layers, dev = len(self.layers), self.device
        self.conv = torch.zeros(n_layers, batch, self.d_inner, self.k, device=dev, dtype=self.dtype)
        self.ssm = torch.zeros(n_layers, batch, self.d_inner, self.n, device=dev,
                               dtype=torch.float32)
        self.token = torch.zeros(batch, dtype=torch.long, device=dev)
        self.logits = None
        self._batch, self._graph = batch, None

    @property
    def conv_states(self) -> torch.Tensor | None:
        """Every layer's conv state, (layers, b, d, k) in the model's dtype (None before use)."""
        return getattr(self, "conv", None)

    @property
    def ssm_states(self) -> torch.Tensor | None:
        """Every layer's SSM state h, (layers, b, d, n) in float32 (None before use).

        Named as transformers names its cache's fields, so ``memory.measure_cache_bytes(gen)``
        counts the generator's state as it counts a cache."""
        return getattr(self, "ssm", None)

    @property
    def module(self) -> torch.nn.Module:
        """The transformers model whose weights run (``effarch.decoding.Decoder``)."""
        return self.model

    @property
    def mamba_path(self) -> str:
        return self.path

    @property
    def model_class(self) -> str:
        return f"{type(self).__name__}({type(self.model).__name__})"

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                all_logits: bool = False) -> torch.Tensor:
        """Run the prompt (b, l); fill the states; return the last position's logits (b, V),
        or with ``all_logits=True`` every position's, (b, l, V) — what scoring a text needs.
        Rows must be unpadded: the prefill reads every position (``attention_mask`` None)."""
        if attention_mask is not None:
            raise ValueError("effarch.fast's generator takes unpadded prompts only: pass "
                             "attention_mask=None (rows of equal length). "
                             f"{TROUBLE} 'Fast path arguments'.")
        b, length = input_ids.shape
        if self._batch != b:
            self._allocate(b)
        if self.fused_prefill:
            return self._prefill_kernels(input_ids, all_logits)
        h = self.model.backbone.embeddings(input_ids.to(self.device))     # (b, l, H)
        for i, blk in enumerate(self.layers):
            x = _rms_norm(h, blk.norm.weight, self.eps)
            res = h.float() if self.cfg.residual_in_fp32 else h
            h = res + self._mixer_prefill(i, blk.mixer, x)
        h = _rms_norm(h if all_logits else h[:, -1], self.model.backbone.norm_f.weight, self.eps)
        return self.model.lm_head(h.to(self.dtype)).float()

    def _prefill_kernels(self, input_ids: torch.Tensor, all_logits: bool) -> torch.Tensor:
        """:meth:`prefill` over (b·l, ·) rows in the projections' own layout: per layer one
        Triton kernel adds the residual and normalises, the causal convolution and its
        activation are one kernel, the scan reads u, Δ, z, B and C where the projections wrote
        them and writes y where ``out_proj`` reads it. No transposes, casts or copies between."""
        from effarch import _triton_scan as tk

        b, length = input_ids.shape
        rows, H, d, r, n = b * length, self.cfg.hidden_size, self.d_inner, self.rank, self.n
        h = self.model.backbone.embeddings(input_ids.to(self.device)).float().view(rows, H)
        x = torch.empty(rows, H, device=self.device, dtype=self.dtype)
        u = torch.empty(b, length, d, device=self.device, dtype=self.dtype)
        delta = None
        bl, bd = 32, 64
        conv_grid = (b, _cdiv(length, bl), _cdiv(d, bd))
        for i, blk in enumerate(self.layers):
            mx = blk.mixer
            tk.add_rmsnorm_kernel[(rows,)](h, delta if delta is not None else h, blk.norm.weight,
                                           x, H, self.eps, HAS_DELTA=delta is not None,
                                           BLOCK_H=_next_pow2(H))
            xz = mx.in_proj(x).view(b, length, 2 * d)                      # (b, l, 2d)
            xs = xz[..., :d]
            bias = mx.conv1d.bias
            tk.causal_conv1d_silu_kernel[conv_grid](
                xs, mx.conv1d.weight, bias if bias is not None else xs, u, length, d,
                *xs.stride(), *u.stride(), K=self.k, HAS_BIAS=bias is not None, BLOCK_L=bl,
                BLOCK_D=bd)
            dbc = mx.x_proj(u.view(rows, d)).view(b, length, r + 2 * n)     # (b, l, r + 2n)
            dt = torch.nn.functional.linear(dbc[..., :r], mx.dt_proj.weight)  # (b, l, d)
            out, last = selective_scan(
                u.transpose(1, 2), dt.transpose(1, 2), self._A_seq[i],
                dbc[..., r:r + n].transpose(1, 2), dbc[..., r + n:].transpose(1, 2),
                D=self._D[i], z=xz[..., d:].transpose(1, 2), delta_bias=self._dt_bias[i],
                delta_softplus=True, return_last_state=True, backend=self.backend,
                chunk=_cdiv(length, self.prefill_chunks) if self.prefill_chunks else None)
            self.conv[i].copy_(conv_tail(xs.transpose(1, 2), self.k))
            self.ssm[i].copy_(last)
            delta = mx.out_proj(out.transpose(1, 2).reshape(rows, d))      # (b·l, H)
        if all_logits:
            tk.add_rmsnorm_kernel[(rows,)](h, delta, self.model.backbone.norm_f.weight, x, H,
                                           self.eps, HAS_DELTA=True, BLOCK_H=_next_pow2(H))
            return self.model.lm_head(x.view(b, length, H)).float()
        last_rows = (h.view(b, length, H)[:, -1] + delta.view(b, length, H)[:, -1].float())
        hn = _rms_norm(last_rows, self.model.backbone.norm_f.weight, self.eps)
        return self.model.lm_head(hn.to(self.dtype)).float()

    def all_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Every position's logits (b, l, V) (``effarch.decoding.Decoder``)."""
        return self.prefill(input_ids, all_logits=True)

    def _scan(self, u, delta, A, B, C, *, D, z, delta_bias, delta_softplus):
        return selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                              delta_softplus=delta_softplus, return_last_state=True,
                              backend=self.backend)

    def _mixer_prefill(self, i: int, mx, x: torch.Tensor) -> torch.Tensor:
        run = mixer_prefill(mx, x, scan=self._scan, A=self._A[i])
        self.conv[i].copy_(conv_tail(run.conv_input, self.k))
        self.ssm[i].copy_(run.scan_result)
        return run.output

    def _step(self) -> torch.Tensor:
        """One token for every row: reads self.token, updates the states in place."""
        h = self.model.backbone.embeddings(self.token)                      # (b, H)
        for i, blk in enumerate(self.layers):
            x = _rms_norm(h, blk.norm.weight, self.eps)
            res = h.float() if self.cfg.residual_in_fp32 else h
            h = res + mixer_step(blk.mixer, x, self.conv[i], self.ssm[i], A=self._A[i])
        h = _rms_norm(h, self.model.backbone.norm_f.weight, self.eps)
        return self.model.lm_head(h.to(self.dtype)).float()

    def _step_kernels(self) -> torch.Tensor:
        """The same step as :meth:`_step` in Triton kernels plus the matrix products, per layer:
        add the residual and normalise; ``in_proj``; the convolution step (with ``x_proj`` fused
        into it for batches up to ``fuse_xproj_max_batch`` rows, else cuBLAS's ``x_proj``); the
        SSM step (``dt_proj`` inside it, or for ``dt_matmul_min_batch`` rows and more one matrix
        product before it); ``out_proj``."""
        from effarch import _triton_scan as tk

        b, H, d = self.token.shape[0], self.cfg.hidden_size, self.d_inner
        h = self.model.backbone.embeddings(self.token).float()              # (b, H) residual
        x = torch.empty(b, H, device=self.device, dtype=self.dtype)
        xs = torch.empty(b, d, device=self.device, dtype=self.dtype)
        y = torch.empty_like(xs)
        bd, delta = 64, None
        grid = (b, -(-d // bd))
        # the SSM step: with x_proj fused (small batches) it has few rows of work, and more,
        # smaller programs hide its memory latency better (the kernel alone at batch 1 on an
        # H100: 7.97 against 9.25 µs, data/measurements/tune_fast_mamba_h100.txt)
        e = self.rank + 2 * self.n
        fuse = b <= self.fuse_xproj_max_batch
        ssm_bd, ssm_warps = (16, 1) if fuse else (64, 4)
        if fuse:
            parts = torch.empty(b, grid[1], e, device=self.device, dtype=torch.float32)
            dbc = torch.empty(b, e, device=self.device, dtype=self.dtype)
        dt_ready = b >= self.dt_matmul_min_batch and not fuse
        for i, blk in enumerate(self.layers):
            mx = blk.mixer
            tk.add_rmsnorm_kernel[(b,)](h, delta if delta is not None else h, blk.norm.weight, x,
                                        H, self.eps, HAS_DELTA=delta is not None,
                                        BLOCK_H=_next_pow2(H))
            xz = mx.in_proj(x)                                               # (b, 2d)
            bias = mx.conv1d.bias
            conv_args = (xz, self.conv[i], mx.conv1d.weight, bias if bias is not None else xz, xs)
            conv_flags = dict(K=self.k, HAS_BIAS=bias is not None, BLOCK_D=bd,
                              BLOCK_K=_next_pow2(self.k))
            if fuse:
                tk.conv_xproj_step_kernel[grid](*conv_args, mx.x_proj.weight, parts, d, e,
                                                xz.stride(0), BLOCK_E=_next_pow2(e), **conv_flags)
                tk.xproj_reduce_kernel[(b, _cdiv(e, 32))](parts, dbc, grid[1], e,
                                                          BLOCK_P=_next_pow2(grid[1]), BLOCK_E=32)
                s_dbc = e
            else:
                tk.conv_step_kernel[grid](*conv_args, d, xz.stride(0), **conv_flags)
                dbc = mx.x_proj(xs)                                          # (b, r + 2n)
                s_dbc = dbc.stride(0)
            dtr = (torch.nn.functional.linear(dbc[:, :self.rank], mx.dt_proj.weight)
                   if dt_ready else xs)                                      # (b, d)
            tk.ssm_step_kernel[(b, _cdiv(d, ssm_bd))](
                xs, xz[:, d:], dbc, mx.dt_proj.weight, mx.dt_proj.bias, self._A[i], mx.D,
                self.ssm[i], y, dtr, d, self.rank, self.n, xz.stride(0), s_dbc, BLOCK_D=ssm_bd,
                BLOCK_R=_next_pow2(self.rank), BLOCK_N=_next_pow2(self.n), DT_READY=dt_ready,
                num_warps=ssm_warps)
            delta = mx.out_proj(y)
        tk.add_rmsnorm_kernel[(b,)](h, delta, self.model.backbone.norm_f.weight, x, H, self.eps,
                                    HAS_DELTA=True, BLOCK_H=_next_pow2(H))
        return self.model.lm_head(x).float()

    def _run_step(self) -> torch.Tensor:
        return self._step_kernels() if self.kernels else self._step()

    def _capture(self) -> None:
        saved = (self.conv.clone(), self.ssm.clone())
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up (allocator, cuBLAS handles) outside the graph
                self._run_step()
        torch.cuda.current_stream().wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self.logits = self._run_step()
        self.conv.copy_(saved[0])
        self.ssm.copy_(saved[1])

    @torch.inference_mode()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (b,), return the next logits (b, V)."""
        self.token.copy_(token.view(-1))
        if not self.use_graph:
            return self._run_step()
        if self._graph is None:
            self._capture()
        self._graph.replay()
        return self.logits

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding: the prompt followed by ``max_new_tokens`` tokens, (b, l + new)."""
        logits = self.prefill(input_ids)
        out = [input_ids.to(self.device)]
        for i in range(max_new_tokens):
            nxt = logits.argmax(-1)
            out.append(nxt[:, None].clone())
            if i + 1 < max_new_tokens:
                logits = self.step(nxt)
        return torch.cat(out, dim=1)
