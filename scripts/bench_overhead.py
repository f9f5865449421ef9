"""How much does effarch.bench's harness add to what it measures?

The same work is timed two ways, interleaved round by round (alternating which goes first, so
drift and contention fall on both alike):

(a) a bare loop: ``time.perf_counter()`` around each call, synchronising a GPU by hand;
(b) effarch.bench: ``time_fn`` for a fixed matmul, ``measure_generation`` for a tiny Llama's
    prefill and decode steps (random weights, built from a config; no download).

It prints the medians of both and their ratio; the target is an overhead under 3%. On a CPU
shared with other work, ``--threads 1`` keeps thread oversubscription out of the figures.

    python scripts/bench_overhead.py                 # the default device (EFFARCH_DEVICE, cuda, mps, cpu)
    python scripts/bench_overhead.py --device cpu --rounds 60 --threads 1
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time

import torch

from effarch import bench
from effarch.profile import default_device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def bare_samples(fn, calls: int, device: torch.device) -> list[float]:
    samples = []
    for _ in range(calls):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        samples.append(time.perf_counter() - start)
    return samples


def matmul_workload(device: torch.device, target_s: float = 2e-3):
    """A square matmul grown until one call takes about ``target_s`` (1-5 ms)."""
    n = 128
    while True:
        a = torch.randn(n, n, device=device)
        fn = lambda a=a: a @ a  # noqa: E731
        if statistics.median(bare_samples(fn, 5, device)) >= target_s or n >= 16384:
            return fn, f"matmul {n}x{n} (time_fn)"
        n = int(n * 1.25)


def tiny_llama(device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                      max_position_embeddings=1024)
    return LlamaForCausalLM(cfg).to(device).eval()


def bare_generation(model, ids, new_tokens: int, device: torch.device):
    """Prefill seconds and per-step decode seconds of a hand-written greedy loop."""
    params = inspect.signature(model.forward).parameters  # `cache` (5.24) or older name
    cache_kw = "cache" if "cache" in params else "past_key_values"
    with torch.no_grad():
        sync(device)
        start = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        sync(device)
        last = time.perf_counter()
        prefill_s, steps = last - start, []
        cache = getattr(out, cache_kw)
        for _ in range(new_tokens - 1):
            out = model(input_ids=token, use_cache=True, **{cache_kw: cache})
            token, cache = out.logits[:, -1].argmax(-1, keepdim=True), getattr(out, cache_kw)
            sync(device)
            now = time.perf_counter()
            steps.append(now - last)
            last = now
    return prefill_s, steps


def run(args) -> list[tuple[str, list[float], list[float]]]:
    device = torch.device(args.device or default_device())
    fn, name = matmul_workload(device)
    model = tiny_llama(device)
    ids = bench.random_input_ids(256, args.prompt).to(device)
    bare_generation(model, ids, args.new_tokens, device)  # warm-up, untimed
    bench.measure_generation(model, ids, new_tokens=args.new_tokens, warmup=1, repeats=1)
    rows = {k: ([], []) for k in (name, "decode step (measure_generation)",
                                  f"prefill {args.prompt} tokens (measure_generation)")}
    for r in range(args.rounds):
        for which in ((0, 1) if r % 2 == 0 else (1, 0)):
            if which == 0:
                rows[name][0].extend(bare_samples(fn, args.calls, device))
                prefill_s, steps = bare_generation(model, ids, args.new_tokens, device)
                step_s = statistics.median(steps)
            else:
                rows[name][1].extend(bench.time_fn(fn, warmup=0, repeats=args.calls,
                                                   device=device).samples)
                res = bench.measure_generation(model, ids, new_tokens=args.new_tokens,
                                               warmup=0, repeats=1)
                prefill_s, step_s = res.ttft_s, res.decode_ms_per_token / 1e3
            keys = list(rows)
            rows[keys[1]][which].append(step_s)  # each round's median step latency
            rows[keys[2]][which].append(prefill_s)
    return device, [(k, *v) for k, v in rows.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", help="cpu, cuda, mps (default: effarch's default device)")
    parser.add_argument("--rounds", type=int, default=40, help="interleaved rounds")
    parser.add_argument("--calls", type=int, default=20, help="matmul calls per round")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=64, help="prompt length")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (1 is steadier on a shared machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    device, rows = run(args)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.rounds} interleaved rounds")
    print(f"{'workload':<46} {'bare ms':>9} {'effarch ms':>11} {'ratio':>7} {'overhead':>9}")
    for name, bare, harness in rows:
        b, h = statistics.median(bare), statistics.median(harness)
        print(f"{name:<46} {b * 1e3:>9.4f} {h * 1e3:>11.4f} {h / b:>7.3f} {h / b - 1:>+9.1%}")
    print(f"(medians; the decode row is the median over rounds of each round's median step; {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
