#!/usr/bin/env python
"""What does recording the routing cost? ``effarch.hooks.capture_routing`` against the bare
forward pass, side by side in one run.

A batch of ``--batch`` × ``--length`` random tokens (default 20 × 512 = 10,240, tiny-moe's
position limit) runs through the model without hooks and inside ``capture_routing`` (entered
anew for every pass, so building the trace counts), alternating which goes first each round so
that drift and contention fall on both. It prints the median and spread of each, and the ratio
of the medians; the target is at most 2×.

    python scripts/bench_routing.py                          # tiny-moe on the default device
    python scripts/bench_routing.py --model tiny-hybrid --rounds 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import transformers

from effarch import bench, hooks, models
from effarch.profile import default_device


def one_pass(model, ids: torch.Tensor, *, capture: bool) -> float:
    """Seconds of one forward pass over ``ids`` (b, l), synchronised on both sides."""
    bench.synchronize(ids.device)
    start = time.perf_counter()
    with torch.no_grad():
        if capture:
            with hooks.capture_routing(model) as trace:
                model(input_ids=ids, use_cache=False)
            assert len(trace) == len(trace.moe_layers)
        else:
            model(input_ids=ids, use_cache=False)
    bench.synchronize(ids.device)
    return time.perf_counter() - start


def summary(samples: list[float]) -> str:
    return (f"median {statistics.median(samples) * 1e3:8.1f} ms  (min {min(samples) * 1e3:.1f}, "
            f"max {max(samples) * 1e3:.1f}, n={len(samples)})")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny-moe")
    ap.add_argument("--device", default=None, help="default: EFFARCH_DEVICE, cuda, mps or cpu")
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or default_device()
    loaded = models.load_model(args.model, device=device)
    model = loaded.model
    ids = bench.random_input_ids(model.config.vocab_size, args.length,
                                 batch_size=args.batch).to(device)          # (b, l)
    for capture in (False, True):  # warm-up: thread pools, allocator
        one_pass(model, ids, capture=capture)
    samples: dict[bool, list[float]] = {False: [], True: []}
    for r in range(args.rounds):
        for capture in ((False, True) if r % 2 == 0 else (True, False)):
            samples[capture].append(one_pass(model, ids, capture=capture))
    ratio = statistics.median(samples[True]) / statistics.median(samples[False])
    print(f"{args.model} ({loaded.record.dtype}, {len(hooks.find_moe_blocks(model))} MoE layers) "
          f"on {device} ({platform.machine()}, {torch.get_num_threads()} threads), torch "
          f"{torch.__version__}, transformers {transformers.__version__}")
    print(f"{ids.numel():,} tokens ({args.batch} × {args.length}) per forward pass, "
          f"{args.rounds} rounds, order alternating")
    print(f"  forward, no hooks        {summary(samples[False])}")
    print(f"  forward, capture_routing {summary(samples[True])}")
    print(f"  capture / bare: {ratio:.3f}× ({'within' if ratio <= 2 else 'OVER'} the 2× target)")
    return {"bare_s": samples[False], "capture_s": samples[True], "ratio": ratio}


if __name__ == "__main__":
    main()
