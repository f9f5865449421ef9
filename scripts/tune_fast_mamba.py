#!/usr/bin/env python
"""The measurements behind two of the fast Mamba path's settings, on the GPU it runs on:

- how many chunks the "seq" scan cuts a sequence into (``fast.seq_chunks``): the scan alone at
  Mamba-2.8B's width (d = 5,120, n = 16), bf16, its inputs laid out as the prefill lays them out
  (views of (b, l, d) memory; B and C column slices of x_proj's (b, l, 192) output), at several
  lengths and chunk counts;
- the decode SSM step's program size (``MambaFastGenerator``'s ``ssm_bd``, ``ssm_warps``): the
  kernel alone at batch 1, 4 (x_proj fused, dt_proj inside the step) and 32 (dt_proj a matrix
  product before it), for every block width and warp count.

    PYTHONPATH=src python scripts/tune_fast_mamba.py

Times are medians of ``triton.testing.do_bench`` (it empties the L2 cache before each call).
Needs CUDA and Triton.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys

import torch


def scan_sweep(lengths, counts, dev) -> None:
    from triton.testing import do_bench

    from effarch import fast

    d, n, rank = 5120, 16, 160
    g = torch.Generator(device=dev).manual_seed(0)
    r = lambda *s: torch.randn(*s, device=dev, generator=g)  # noqa: E731
    A, D, bias = -torch.exp(r(d, n) * 0.5), r(d), r(d) * 0.1
    top = max(lengths)
    u, dt, z = (r(1, top, d) * s for s in (1, 0.5, 1))
    dbc = r(1, top, rank + 2 * n)
    u, dt, z, dbc = (x.bfloat16() for x in (u, dt, z, dbc))
    for length in lengths:
        v = {k: x[:, :length] for k, x in dict(u=u, dt=dt, z=z, dbc=dbc).items()}
        B = v["dbc"][..., rank:rank + n].transpose(1, 2)
        C = v["dbc"][..., rank + n:].transpose(1, 2)
        auto = fast.seq_chunks(1, d, length, torch.device(dev))
        for chunks in sorted(set(counts) | {auto}):
            if chunks > length:
                continue
            call = functools.partial(
                fast.selective_scan_triton, v["u"].transpose(1, 2), v["dt"].transpose(1, 2), A,
                B, C, D=D, z=v["z"].transpose(1, 2), delta_bias=bias, delta_softplus=True,
                return_last_state=True, kernel="seq", chunk=-(-length // chunks))
            ms = statistics.median(do_bench(call, rep=60, return_mode="all"))
            print(f"scan, l={length:6d}, {chunks:4d} chunks{' (default)' if chunks == auto else '':10s}"
                  f" {ms:8.3f} ms  {length * d * n / ms * 1e3:.3g} state elements/s", flush=True)


def step_sweep(batches, dev) -> None:
    from triton.testing import do_bench

    from effarch import _triton_scan as tk

    d, n, rank = 5120, 16, 160
    e = rank + 2 * n
    g = torch.Generator(device=dev).manual_seed(1)
    r = lambda *s: torch.randn(*s, device=dev, generator=g)  # noqa: E731
    A = -torch.exp(r(d, n) * 0.5)
    wdt, bdt, Dp = (r(d, rank) * 0.05).bfloat16(), r(d).bfloat16(), r(d).bfloat16()
    for b in batches:
        xs, y = r(b, d).bfloat16(), torch.empty(b, d, device=dev, dtype=torch.bfloat16)
        xz, dbc, state, dtr = r(b, 2 * d).bfloat16(), r(b, e).bfloat16(), r(b, d, n), r(b, d).bfloat16()
        ready = b >= 8  # the generator's dt_matmul_min_batch
        found = []
        for bd in (16, 32, 64):
            for warps in (1, 2, 4):
                call = functools.partial(
                    tk.ssm_step_kernel[(b, -(-d // bd))], xs, xz[:, d:], dbc, wdt, bdt, A, Dp,
                    state, y, dtr, d, rank, n, xz.stride(0), e, BLOCK_D=bd, BLOCK_R=256,
                    BLOCK_N=16, DT_READY=ready, num_warps=warps)
                call()
                torch.cuda.synchronize()
                found.append((statistics.median(do_bench(call, rep=30, return_mode="all")) * 1e3,
                              bd, warps))
        found.sort()
        print(f"SSM step, batch {b}, dt_proj {'before it' if ready else 'inside'}: "
              + ", ".join(f"{us:.2f} µs (block {bd}, {w} warps)" for us, bd, w in found), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="1024,4096,16384")
    ap.add_argument("--chunks", default="1,4,8,16,32,64,96,128,192,256")
    ap.add_argument("--batches", default="1,4,32")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_fast_mamba: needs a CUDA GPU (and Triton); nothing to measure here. "
              "See TROUBLESHOOTING.md, section 'Mamba is slow'.")
        return 2
    import triton

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}")
    scan_sweep([int(x) for x in args.lengths.split(",")],
               [int(x) for x in args.chunks.split(",")], "cuda")
    step_sweep([int(x) for x in args.batches.split(",")], "cuda")
    return 0


if __name__ == "__main__":
    sys.exit(main())
