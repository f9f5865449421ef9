#!/usr/bin/env python
"""The fast path's speed before and after a change, side by side in one run on one GPU.

    git archive <old commit> src | tar -x -C .gpu/before     # the old library, in an ignored folder
    PYTHONPATH=src python scripts/bench_before_after.py --before .gpu/before/src --after src

Each round runs the old and the new library in turn (before, after, before, after, ...), each in a
fresh process that imports ``effarch`` from the folder given: Mamba-2.8B with random weights at
the real size, bf16, batch 1, through ``effarch.fast.MambaFastGenerator`` only — prefill at 4,096
and 16,384 tokens and greedy decode — with ``effarch.bench.time_fn`` (warm-up, synchronised,
median of repeats). It prints every round and the medians over rounds, and the after/before ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

WORKER = r"""
import json, torch
from effarch import bench, fast, models
lm = models.load_model("mamba-2.8b", weights="random", dtype="bfloat16", device="cuda")
gen = fast.MambaFastGenerator(lm.model)
out = {"path": gen.path}
for length in (4096, 16384):
    ids = bench.random_input_ids(lm.model.config.vocab_size, length).cuda()
    t = bench.time_fn(lambda: gen.prefill(ids), warmup=2, repeats=5, device="cuda")
    out[f"prefill_{length}_tok_s"] = length / t.median
ids = bench.random_input_ids(lm.model.config.vocab_size, 128).cuda()
logits = gen.prefill(ids)
token = logits.argmax(-1)
for _ in range(3):
    gen.step(token)
steps = 256
def decode():
    tok = token
    for _ in range(steps):
        tok = gen.step(tok).argmax(-1)
t = bench.time_fn(decode, warmup=1, repeats=5, device="cuda")
out["decode_b1_tok_s"] = steps / t.median
print("RESULT " + json.dumps(out), flush=True)
"""


def one(src: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src.resolve())}
    proc = subprocess.run([sys.executable, "-c", WORKER], env=env, capture_output=True,
                          text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"the worker on {src} failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=Path, required=True, help="the old library's src folder")
    ap.add_argument("--after", type=Path, required=True, help="the new library's src folder")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    results: dict[str, list[dict]] = {"before": [], "after": []}
    for r in range(args.rounds):
        for arm in ("before", "after"):
            res = one(getattr(args, arm))
            results[arm].append(res)
            print(f"round {r + 1} {arm:6s} " + "  ".join(
                f"{k}={v:,.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()),
                flush=True)
    keys = [k for k in results["after"][0] if k != "path"]
    print("\nmedians over rounds (tokens/s), after/before:")
    for k in keys:
        b = statistics.median(x[k] for x in results["before"])
        a = statistics.median(x[k] for x in results["after"])
        print(f"  {k:22s} before {b:10,.1f}  after {a:10,.1f}  ratio {a / b:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
