#!/usr/bin/env python
"""How fast is Mamba here, and why: effarch's fast path against transformers' fallback and a
transformer of Phi-2's size, side by side in one run (random weights at the real configs).

    python scripts/bench_fast_mamba.py --device cuda            # the full table (GPU)
    python scripts/bench_fast_mamba.py --device cpu --quick     # the CPU scan speed-up only

Prints one table and writes every figure to --json. Roofline: decode must read every weight
once per token, so tokens/s ≤ copy bandwidth ÷ parameter bytes, with the bandwidth measured
here as a large device-to-device copy counting bytes read + written.

Run it from the repository's root with ``effarch`` importable: installed (``make lab`` installs
it) or ``PYTHONPATH=src`` (the GPU machine, which has no install).
"""

from __future__ import annotations

import argparse
import platform
import sys

import torch

from effarch import backends, bench, fast, models
from effarch.ssm import selective_scan_ref

REPORT = bench.Report(width=58)
row = REPORT.row


def cpu_scan(args) -> None:
    """transformers' sequential scan against effarch's chunked scan (l=2048, d=512, n=16)."""
    from transformers.models.mamba import modeling_mamba as mm

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    b, d, length, n = 1, 512, 2048, 16
    u, z = torch.randn(b, d, length, generator=g), torch.randn(b, d, length, generator=g)
    delta = torch.randn(b, d, length, generator=g) * 0.5
    A = -torch.exp(torch.randn(d, n, generator=g) * 0.5 + 1)
    B, C = torch.randn(b, n, length, generator=g), torch.randn(b, n, length, generator=g)
    D, bias = torch.randn(d, generator=g), torch.randn(d, generator=g) * 0.1
    hf_scan = getattr(mm.mamba_selective_scan, "__wrapped__", mm.mamba_selective_scan)
    call = dict(D=D, z=z, delta_bias=bias, delta_softplus=True, return_last_state=True)
    with torch.no_grad():
        t_hf = bench.time_fn(lambda: hf_scan(u, delta, A, B, C, **call), repeats=5, device="cpu")
        t_fast = bench.time_fn(lambda: fast.selective_scan_chunked(u, delta, A, B, C, **call),
                               repeats=5, device="cpu")
        ref = selective_scan_ref(u, delta, A, B, C, **call)[0]
        out = fast.selective_scan_chunked(u, delta, A, B, C, **call)[0]
    print(f"CPU scan, b=1 d=512 l=2048 n=16 float32, {args.threads} threads, median of 5:")
    row("transformers sequential scan", t_hf.median * 1e3, "ms")
    row("effarch chunked scan", t_fast.median * 1e3, "ms")
    row("speed-up", t_hf.median / t_fast.median, "x")
    row("max |chunked - reference|", (out - ref).abs().max().item(), "")


def build(name: str, device: str, layers: int | None = None, **overrides):
    """A registry model at its real config with random weights, in bf16 on ``device``.

    ``layers`` cuts the depth (smoke runs on a CPU only: figures are then not the model's).
    """
    if layers:
        overrides["num_hidden_layers"] = layers
    torch.manual_seed(0)
    lm = models.load_model(name, weights="random", dtype=torch.bfloat16, device=device,
                           overrides=overrides)
    return lm.model, lm.record.parameter_bytes


def timed(fn, device, repeats=3, warmup=1) -> float:
    return bench.time_fn(fn, warmup=warmup, repeats=repeats, device=device).median


ROUND_1 = dict(fused_prefill=False, fuse_xproj_max_batch=0, dt_matmul_min_batch=10**9)
RESULTS: dict[str, float] = {}  # figures the Phi-2 section compares against


def arms(model, args) -> dict[str, fast.MambaFastGenerator]:
    """The generators measured: today's path and, with --before, the first round's (the scan
    over (b, d, l) tensors between PyTorch's convolution and copies; three Triton kernels and
    cuBLAS's x_proj and dt_proj-free step per decoded token), same weights, same process."""
    found = {}
    if args.before:
        found["round 1"] = fast.MambaFastGenerator(model, **ROUND_1)
    found["round 2"] = fast.MambaFastGenerator(model)
    for chunks in args.prefill_chunks:
        found[f"round 2, {chunks} chunks"] = fast.MambaFastGenerator(model, prefill_chunks=chunks)
    return found


def mamba_section(args, bw: float) -> None:
    dev = args.device
    model, wbytes = build(args.mamba, dev, args.layers)
    roof = bw / wbytes
    cfg = model.config
    print(f"{args.mamba}{args.layer_note}, random weights, bf16, {wbytes / 1e9:.2f} GB of weights:")
    row("decode roofline (copy bandwidth / weight bytes)", roof, "tok/s")
    vocab = cfg.vocab_size
    ids = lambda b, n: torch.randint(0, vocab, (b, n), device=dev)  # noqa: E731
    gens = arms(model, args)
    for name, gen in gens.items():
        print(f"  [{name}] {gen.path}")
    t_fb = None
    if args.prefill_fallback:
        with torch.no_grad():
            x = ids(1, args.prefill_fallback)
            t_fb = timed(lambda: model(x), dev, repeats=1, warmup=0)
        row(f"prefill {args.prefill_fallback} tokens, transformers fallback",
            args.prefill_fallback / t_fb, "tok/s", mamba_path_note(model))
    for n in args.lengths:
        x = ids(1, n)
        for name, gen in gens.items():
            t = timed(lambda x=x, gen=gen: gen.prefill(x), dev)
            RESULTS[f"prefill {n} {name}"] = n / t
            row(f"prefill {n} tokens, fast path {name}", n / t, "tok/s")
            if t_fb and n == args.prefill_fallback:
                row(f"prefill speed-up at {n} over the fallback, {name}", t_fb / t, "x")
        if args.before:
            row(f"prefill {n}: round 2 / round 1", RESULTS[f"prefill {n} round 2"]
                / RESULTS[f"prefill {n} round 1"], "x")
    for name, gen in gens.items():
        bench.reset_peak_memory(dev)
        base = bench.current_memory_bytes(dev)
        gen.prefill(ids(1, args.lengths[-1]))
        if dev.startswith("cuda"):  # elsewhere no resettable peak exists
            extra = bench.peak_memory_bytes(dev) - base
            row(f"peak prefill memory above the weights at {args.lengths[-1]}, {name}",
                extra / 1e9, "GB", f"{extra / wbytes:.2f}x the weights")
    state_per_row = cfg.num_hidden_layers * cfg.intermediate_size * (
        cfg.state_size * 4 + cfg.conv_kernel * 2)
    decode_section(model, gens, ids, roof, bw, wbytes, state_per_row, dev, args)
    models.unload()


def mamba_path_note(model) -> str:
    return f"({backends.mamba_path(model)})"


def decode_section(model, gens, ids, roof, bw, wbytes, state_per_row, dev, args) -> None:
    if args.fallback_tokens:
        fb = bench.measure_generation(model, ids(1, 64), new_tokens=args.fallback_tokens + 1,
                                      warmup=1, repeats=1, sync_every_token=False
                                      ).decode_tokens_per_s
        row("decode batch 1, transformers fallback", fb, "tok/s", f"{fb / roof:.1%} of roofline")
    for b in args.batches:
        for name, gen in gens.items():
            if "chunks" in name:  # the same decode as round 2's
                continue
            logits = gen.prefill(ids(b, 64))
            nxt = logits.argmax(-1)
            gen.step(nxt)  # captures the graph for this batch size
            t = timed(lambda nxt=nxt, gen=gen: [gen.step(nxt) for _ in range(args.tokens)], dev,
                      repeats=5)
            step = t / args.tokens
            limit = (wbytes + 2 * b * state_per_row) / bw  # weights read, states read + written
            row(f"decode batch {b}, fast path {name} ({'graph' if gen.use_graph else 'eager'})",
                b / step, "tok/s", f"{wbytes / bw / step:.1%} of the weights' roofline, "
                f"{limit / step:.1%} of the limit with the state")
            RESULTS[f"decode {b} {name}"] = b / step
        if "round 1" in gens:
            row(f"decode batch {b}: round 2 / round 1", RESULTS[f"decode {b} round 2"]
                / RESULTS[f"decode {b} round 1"], "x")


def phi_section(args, bw: float) -> None:
    dev = args.device
    limit = models.get_config(args.transformer).max_position_embeddings
    positions = max(limit, *args.lengths)
    model, wbytes = build(args.transformer, dev, args.layers, max_position_embeddings=positions)
    roof = bw / wbytes
    print(f"{args.transformer}{args.layer_note} architecture, random weights, bf16, positions "
          f"raised to {positions:,} for this measurement (the real model stops at {limit:,}), "
          f"{wbytes / 1e9:.2f} GB:")
    row("decode roofline", roof, "tok/s")
    vocab = model.config.vocab_size
    with torch.no_grad():
        for n in args.lengths:
            x = torch.randint(0, vocab, (1, n), device=dev)
            t = timed(lambda x=x: model(x, use_cache=False, logits_to_keep=1), dev)
            row(f"prefill {n} tokens, SDPA (eager module)", n / t, "tok/s")
            arms_run = sorted({k.split(" ", 2)[2] for k in RESULTS if k.startswith(f"prefill {n} ")})
            for name in arms_run:
                if f"prefill {n} {name}" in RESULTS:
                    row(f"prefill {n}: Mamba {name} / this transformer",
                        RESULTS[f"prefill {n} {name}"] * t / n, "x")
    if args.tokens_transformer:
        prompt = torch.randint(0, vocab, (1, 64), device=dev)
        eager = bench.measure_generation(model, prompt, new_tokens=args.tokens_transformer,
                                         warmup=1, repeats=3)
        row("decode batch 1, eager dynamic cache", eager.decode_tokens_per_s, "tok/s",
            f"{eager.decode_tokens_per_s / roof:.1%} of roofline")
        if args.compile:
            fair_arm(model, prompt, roof, args)
    models.unload()


def fair_arm(model, prompt, roof, args) -> None:
    """transformers' own fast path: a static cache, with which generate() compiles the forward
    (torch.compile, mode reduce-overhead: CUDA graphs) by itself."""
    res = bench.measure_static_cache_decode(model, prompt, new_tokens=args.tokens, repeats=3)
    row("static cache: compile and warm-up (3 generate calls)", res.compile_s, "s",
        "compiled by generate()" if res.compiled else "NOT compiled: eager static cache")
    row(f"decode batch 1, static cache{' + torch.compile' if res.compiled else ''}",
        res.decode_tokens_per_s, "tok/s",
        f"{res.decode_tokens_per_s / roof:.1%} of roofline (generate(n) - generate(1))")


def equivalence_section(args, bw: float) -> None:
    """Correctness at the real size: the fast path's logits over a prompt against transformers'
    (float32, relative to the logits' spread) and 32 greedy tokens against ``generate``."""
    dev = args.device
    torch.manual_seed(0)
    lm = models.load_model(args.mamba, weights="random", dtype=torch.float32, device=dev,
                           overrides={"num_hidden_layers": args.layers} if args.layers else {})
    model = lm.model
    ids = torch.randint(0, model.config.vocab_size, (1, 64), device=dev,
                        generator=torch.Generator(device=dev).manual_seed(1))
    gen = fast.MambaFastGenerator(model)
    with torch.no_grad():
        ref = model(ids).logits.float()
        got = gen.all_logits(ids)
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32,
                              min_new_tokens=32, do_sample=False)
    same = int((gen.generate(ids, 32)[0, 64:] == want[0, 64:]).sum())
    print(f"{args.mamba}{args.layer_note}, float32, random weights: {gen.path}")
    row("max |logits - transformers'| / their std, 64 tokens",
        ((got - ref).abs().max() / ref.std()).item(), "")
    row("greedy tokens equal to transformers' generate", same, "of 32")
    del gen, model
    models.unload()


def scan_section(args, bw: float) -> None:
    """The scan alone at Mamba-2.8B's width over the longest length, bf16 inputs: the "tile"
    kernel on (b, d, l) tensors against the "seq" kernel on (b, l, d) views in its default
    chunks."""
    dev, n_len = args.device, args.lengths[-1]
    if not dev.startswith("cuda") and not fast._interpreting():
        print("the scan alone: Triton runs on CUDA (or under TRITON_INTERPRET=1)")
        return
    d, n = args.scan_width, 16
    g = torch.Generator(device=dev).manual_seed(0)
    r = lambda *s: torch.randn(*s, device=dev, generator=g)  # noqa: E731
    A, D, bias = -torch.exp(r(d, n) * 0.5), r(d), r(d) * 0.1
    bld = dict(u=r(1, n_len, d), delta=r(1, n_len, d) * 0.5, z=r(1, n_len, d),
               B=r(1, n_len, n), C=r(1, n_len, n))
    bld = {k: v.bfloat16() for k, v in bld.items()}
    as_bdl = {k: v.transpose(1, 2) for k, v in bld.items()}           # views of (b, l, ·)
    contiguous = {k: v.contiguous() for k, v in as_bdl.items()}       # (b, d, l) memory
    elems = n_len * d * n
    print(f"the scan alone: b=1, l={n_len}, d={d}, n={n}, bf16 inputs, median of 5:")

    def arm(label, t, **kw):
        call = lambda: fast.selective_scan_triton(  # noqa: E731
            t["u"], t["delta"], A, t["B"], t["C"], D=D, z=t["z"], delta_bias=bias,
            delta_softplus=True, return_last_state=True, **kw)
        s = timed(call, dev, repeats=5, warmup=2)
        row(label, s * 1e3, "ms", f"{elems / s:.3g} state elements/s")

    arm("tile kernel, (b, d, l) tensors, one pass", contiguous, kernel="tile")
    auto = fast.seq_chunks(1, d, n_len, torch.device(dev))
    # by chunk count and at other lengths: scripts/tune_fast_mamba.py
    arm(f"seq kernel, (b, l, d) views, {auto} chunks (default)", as_bdl, kernel="seq")


def gpu_scan_check(dev: str) -> None:
    g = torch.Generator(device=dev).manual_seed(0)
    b, d, length, n = 2, 1024, 1000, 16
    r = lambda *s: torch.randn(*s, device=dev, generator=g)  # noqa: E731
    u, z, B, C = r(b, d, length), r(b, d, length), r(b, n, length), r(b, n, length)
    delta, A = r(b, d, length) * 0.5, -torch.exp(r(d, n) * 0.5)
    D, bias = r(d), r(d) * 0.1
    kw = dict(D=D, z=z, delta_bias=bias, delta_softplus=True, return_last_state=True)
    ref, rl = selective_scan_ref(u, delta, A, B, C, **kw)
    out, last = fast.selective_scan(u, delta, A, B, C, **kw)
    ok = torch.allclose(out, ref, atol=1e-5, rtol=1e-4) and torch.allclose(last, rl, 1e-4, 1e-5)
    bf = [x.bfloat16() for x in (u, delta, B, C, z)]
    kb = dict(kw, z=bf[4])
    refb = selective_scan_ref(bf[0], bf[1], A, bf[2], bf[3], **kb)[0].float()
    outb = fast.selective_scan(bf[0], bf[1], A, bf[2], bf[3], **kb)[0].float()
    print(f"GPU scan check ({fast.choose_backend(u)}): float32 max err "
          f"{(out - ref).abs().max().item():.2e} ({'ok' if ok else 'FAIL'}), bf16 max err "
          f"{(outb - refb).abs().max().item():.2e}")
    if not ok:
        sys.exit(1)


def section(fn, *args) -> None:
    """Run one part of the table; a failure is printed and the other parts still run."""
    try:
        fn(*args)
    except Exception:
        import traceback

        traceback.print_exc()
        row(f"{fn.__name__} FAILED", float("nan"), "", "see the traceback above")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="CPU scan comparison only")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128, help="decode tokens per measurement")
    ap.add_argument("--fallback-tokens", type=int, default=32, help="0: skip")
    ap.add_argument("--prefill-fallback", type=int, default=4096, help="0: skip")
    ap.add_argument("--json", default=None)
    ap.add_argument("--mamba", default="mamba-2.8b")
    ap.add_argument("--transformer", default="phi-2")
    ap.add_argument("--layers", type=int, default=None, help="smoke runs: cut the depth")
    ap.add_argument("--lengths", default="4096,16384", help="fast-path prefill lengths")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--before", action="store_true",
                    help="also measure the first round's path (fast.MambaFastGenerator options)")
    ap.add_argument("--scan", action="store_true", help="also time the scan kernels alone")
    ap.add_argument("--batches", default="1,8,32", help="decode batch sizes")
    ap.add_argument("--prefill-chunks", default="",
                    help="also measure round 2 with its prefill scan in these chunk counts, "
                         "e.g. 16,32 (the default is fast.seq_chunks's)")
    ap.add_argument("--check", action="store_true",
                    help="also compare the fast path with transformers at the real size, float32")
    ap.add_argument("--scan-width", type=int, default=5120, help="d of the scan alone")
    ap.add_argument("--tokens-transformer", type=int, default=128,
                    help="the transformer's decode tokens (0: skip its decode)")
    args = ap.parse_args(argv)
    args.layer_note = f" cut to {args.layers} layers (smoke run)" if args.layers else ""
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.batches = [int(x) for x in args.batches.split(",")]
    args.prefill_chunks = [int(x) for x in args.prefill_chunks.split(",") if x]
    print(f"torch {torch.__version__}, {platform.machine()}, device {args.device}")
    section(cpu_scan, args)
    if not args.quick:
        if args.device.startswith("cuda"):
            print(f"GPU: {torch.cuda.get_device_name()}")
            gpu_scan_check(args.device)
        bw, each = bench.copy_bandwidth_best(args.device)
        row("device copy bandwidth (read + write), best of", bw / 1e12, "TB/s",
            ", ".join(f"{k} {v / 1e12:.2f}" for k, v in each.items()))
        if args.check:
            section(equivalence_section, args, bw)
        if args.scan:
            section(scan_section, args, bw)
        section(mamba_section, args, bw)
        section(phi_section, args, bw)
    if args.json:
        REPORT.save(args.json, device=args.device, torch=torch.__version__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
