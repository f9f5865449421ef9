#!/usr/bin/env python
"""Where the fast Mamba path spends its GPU time: torch.profiler kernel tables of one prefill and
of one decode step at batch 1 and 32 (Mamba-2.8B's real config, random weights, bf16).

    PYTHONPATH=src python scripts/profile_fast_mamba.py --out /tmp/profile   # /tmp/profile.txt, .json

Writes ``<out>.txt`` (the tables) and ``<out>.json`` (every figure). Per profiled region:
- every kernel with its device time per call and in total, grouped into kinds (matrix products,
  the scan, the convolution, effarch's fused Triton kernels, elementwise and copies);
- for each matrix product (aten::mm / addmm by input shape), the bytes it must move (both
  matrices and the output, bf16) over its device time: its achieved bandwidth, against
  the roofline bandwidth (the best of several large device-to-device copies, read + written);
- for the scan, its state elements (b·d·l·n per layer) per second.
Decode is profiled eagerly (one kernel launch each, as the CUDA graph replays them) and the graph's
replay is timed beside it, so the launch overhead the graph removes shows as the difference.
Tables, not raw traces: Nsight's counters need not work where this runs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch

from effarch import bench, fast, models

KINDS = [  # (kind, pattern on the kernel's name), first match wins
    ("scan (Triton)", r"selective_scan|scan_chain"),
    ("residual add + RMSNorm (Triton)", r"add_rmsnorm|rmsnorm"),
    ("decode step kernels (Triton)", r"conv_step|conv_xproj_step|xproj_reduce|ssm_step"),
    ("conv (Triton)", r"causal_conv"),
    ("matrix products", r"gemm|gemv|cutlass|xmma|sm\d+_|cublas|splitK|dot_kernel|ampere|hopper"),
    ("convolution (cuDNN/aten)", r"conv|cudnn|winograd|implicit"),
    ("attention", r"flash|fmha|attention|sdpa"),
    ("copies and casts", r"copy|cast|transpose|cat|Memcpy|memcpy|fill"),
    ("elementwise and reductions", r"elementwise|vectorized|reduce|unrolled|softplus|exp|silu"),
]


def kind_of(name: str) -> str:
    for kind, pat in KINDS:
        if re.search(pat, name, re.IGNORECASE):
            return kind
    return "other"


def kernel_rows(prof) -> list[dict]:
    """Device-side kernels: name, calls, total and per-call time (µs), kind."""
    rows = []
    for ev in prof.key_averages():
        t = getattr(ev, "self_device_time_total", 0)
        if ev.device_type.name != "CUDA" or t <= 0:
            continue
        rows.append(dict(name=ev.key, calls=ev.count, total_us=t, per_call_us=t / ev.count,
                         kind=kind_of(ev.key)))
    return sorted(rows, key=lambda r: -r["total_us"])


ELEMENT_BYTES = 2  # the profiled model is bf16; averaged profiler events carry no dtypes


def matmul_rows(prof, bandwidth: float) -> list[dict]:
    """aten::mm / addmm by input shapes: device time, bytes moved (both matrices and the
    output, bf16), achieved bandwidth."""
    out = []
    for ev in prof.key_averages(group_by_input_shape=True):
        if ev.key not in ("aten::mm", "aten::addmm", "aten::bmm"):
            continue
        t = getattr(ev, "device_time_total", 0)
        mats = [s for s in ev.input_shapes if s and len(s) == 2]  # addmm's bias is 1-D
        if not t or len(mats) < 2:
            continue
        (m, k), (_, n) = mats[-2], mats[-1]
        nbytes = (m * k + k * n + m * n) * ELEMENT_BYTES
        per_call = t / ev.count
        out.append(dict(op=ev.key, shapes=str(mats), calls=ev.count, per_call_us=per_call,
                        bytes=nbytes, achieved_tb_s=nbytes / (per_call * 1e-6) / 1e12,
                        of_roofline=nbytes / (per_call * 1e-6) / bandwidth))
    return sorted(out, key=lambda r: -r["per_call_us"] * r["calls"])


def profile_region(fn, device: str):
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                 record_shapes=True) as prof:
        fn()
        torch.cuda.synchronize()
    return prof


class Out:
    def __init__(self):
        self.lines, self.data = [], {}

    def p(self, s=""):
        print(s)
        self.lines.append(s)


def summarise(o: Out, label: str, prof, bandwidth: float, extra: dict) -> dict:
    rows = kernel_rows(prof)
    total = sum(r["total_us"] for r in rows)
    kinds = defaultdict(lambda: [0.0, 0])
    for r in rows:
        kinds[r["kind"]][0] += r["total_us"]
        kinds[r["kind"]][1] += r["calls"]
    o.p(f"\n== {label}: {total / 1e3:.2f} ms of kernels, {sum(r['calls'] for r in rows)} launches")
    o.p(f"{'kind':<34}{'ms':>10}{'share':>8}{'launches':>10}")
    for k, (t, c) in sorted(kinds.items(), key=lambda kv: -kv[1][0]):
        o.p(f"{k:<34}{t / 1e3:>10.3f}{t / total:>8.1%}{c:>10}")
    o.p(f"\n{'kernel (top 25 by device time)':<70}{'calls':>7}{'µs/call':>10}{'ms total':>10}")
    for r in rows[:25]:
        o.p(f"{r['name'][:69]:<70}{r['calls']:>7}{r['per_call_us']:>10.1f}"
            f"{r['total_us'] / 1e3:>10.3f}")
    mm = matmul_rows(prof, bandwidth)
    if mm:
        o.p(f"\n{'matrix product (input shapes)':<58}{'calls':>6}{'µs/call':>9}{'TB/s':>7}"
            f"{'of roof':>9}")
        for r in mm[:10]:
            o.p(f"{(r['op'] + ' ' + r['shapes'])[:57]:<58}{r['calls']:>6}"
                f"{r['per_call_us']:>9.1f}{r['achieved_tb_s']:>7.2f}{r['of_roofline']:>9.1%}")
    for k, v in extra.items():
        o.p(f"{k}: {v}")
    return dict(total_kernel_ms=total / 1e3, kinds={k: dict(ms=t / 1e3, launches=c)
                                                   for k, (t, c) in kinds.items()},
                kernels=rows[:60], matmuls=mm, **extra)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True, help="path prefix: writes .txt and .json")
    ap.add_argument("--model", default="mamba-2.8b")
    ap.add_argument("--prefill", type=int, default=16384)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--layers", type=int, default=None, help="smoke runs: cut the depth")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_fast_mamba needs a CUDA GPU (torch.profiler's kernel times).")
        return 2
    dev = "cuda"
    o = Out()
    bw, each = bench.copy_bandwidth_best(dev)
    o.p(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    o.p("roofline bandwidth: best of large device-to-device copies (read + written): "
        f"{bw / 1e12:.2f} TB/s; each: " + ", ".join(f"{k} {v / 1e12:.2f}" for k, v in each.items()))
    o.data["bandwidth"] = dict(best=bw, each=each)
    over = {"num_hidden_layers": args.layers} if args.layers else {}
    torch.manual_seed(0)
    lm = models.load_model(args.model, weights="random", dtype=torch.bfloat16, device=dev,
                           overrides=over)
    model, wbytes = lm.model, lm.record.parameter_bytes
    cfg = model.config
    n_layers = cfg.num_hidden_layers
    d, n = cfg.intermediate_size, cfg.state_size
    o.p(f"{args.model}: {n_layers} layers, d_inner {d}, n {n}, {wbytes / 1e9:.2f} GB of weights")
    gen = fast.MambaFastGenerator(model)
    ids = torch.randint(0, cfg.vocab_size, (1, args.prefill), device=dev)
    with torch.inference_mode():
        t_pre = bench.time_fn(lambda: gen.prefill(ids), warmup=1, repeats=3, device=dev).median
        prof = profile_region(lambda: gen.prefill(ids), dev)
    scan_us = sum(r["total_us"] for r in kernel_rows(prof) if r["kind"] == "scan (Triton)")
    elems = args.prefill * d * n * n_layers
    extra = {"prefill wall, median of 3 (s)": round(t_pre, 4),
             "prefill tokens/s": round(args.prefill / t_pre, 1),
             "scan state elements per second (b·d·l·n over the scan kernels' time)":
                 f"{elems / (scan_us * 1e-6):.3e}" if scan_us else "n/a",
             "scan per layer (ms)": round(scan_us / 1e3 / n_layers, 3)}
    o.data[f"prefill_{args.prefill}"] = summarise(o, f"prefill {args.prefill} tokens, batch 1",
                                                  prof, bw, extra)
    for b in [int(x) for x in args.batches.split(",")]:
        logits = gen.prefill(torch.randint(0, cfg.vocab_size, (b, 64), device=dev))
        nxt = logits.argmax(-1)
        gen.use_graph = True
        gen._graph = None
        gen.step(nxt)
        t_graph = bench.time_fn(lambda nxt=nxt: gen.step(nxt), warmup=3, repeats=50, device=dev).median
        gen.use_graph = False
        t_eager = bench.time_fn(lambda nxt=nxt: gen.step(nxt), warmup=3, repeats=20, device=dev).median
        state = n_layers * b * d * (n * 4 + gen.k * 2)
        prof = profile_region(lambda nxt=nxt: gen.step(nxt), dev)
        extra = {"graph replay per step, median of 50 (µs)": round(t_graph * 1e6, 1),
                 "eager step, median of 20 (µs)": round(t_eager * 1e6, 1),
                 "weights' roofline per step (µs)": round(wbytes / bw * 1e6, 1),
                 "with the state read and written (µs)": round((wbytes + 2 * state) / bw * 1e6, 1),
                 "graph step against the weights' roofline":
                     f"{wbytes / bw / t_graph:.1%}",
                 "against the limit counting the state":
                     f"{(wbytes + 2 * state) / bw / t_graph:.1%}"}
        o.data[f"decode_b{b}"] = summarise(o, f"decode step, batch {b} (profiled eagerly)", prof,
                                           bw, extra)
        gen.use_graph = True
        gen._graph = None
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".txt").write_text("\n".join(o.lines) + "\n", encoding="utf-8")
    Path(args.out + ".json").write_text(json.dumps(o.data, indent=1, default=str),
                                        encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
