"""How much does effarch.bench's harness add to what it measures?

The same work is timed two ways, interleaved round by round (alternating which goes first, so
drift and contention fall on both alike):

(a) a bare loop: ``time.perf_counter()`` around each call, synchronising a GPU by hand;
(b) effarch.bench: ``time_fn`` for a fixed matmul, ``measure_generation`` for a tiny Llama's
    prefill and decode steps (random weights, built from a config; no download).

It prints the medians of both and their ratio; the target is an overhead under 3%. On the CPU
it uses one thread by default: the harness's cost is Python's, and on a machine shared with other
work more threads only add oversubscription to the figures.

    python scripts/bench_overhead.py                 # the default device (EFFARCH_DEVICE, cuda, mps, cpu)
    python scripts/bench_overhead.py --device cpu --rounds 60 --threads 0   # torch's threads

Run it from the repository's root with ``effarch`` importable: installed (``make lab`` installs
it) or ``PYTHONPATH=src`` (the GPU machine, which has no install).
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time
import types

import torch

from effarch import bench, decoding
from effarch.profile import default_device


def bare_samples(fn, calls: int, device: torch.device) -> list[float]:
    samples = []
    for _ in range(calls):
        bench.synchronize(device)
        start = time.perf_counter()
        fn()
        bench.synchronize(device)
        samples.append(time.perf_counter() - start)
    return samples


def matmul_workload(device: torch.device, target_s: float = 2e-3):
    """A square matmul grown until one call takes about ``target_s`` (1-5 ms). The fastest of
    a few warmed-up calls is the cost of the work itself, whatever else the machine runs."""
    n = 128
    while True:
        a = torch.randn(n, n, device=device)
        fn = lambda a=a: a @ a  # noqa: E731
        bare_samples(fn, 3, device)  # warm-up: the first calls start thread pools
        if min(bare_samples(fn, 7, device)) >= target_s or n >= 16384:
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
        bench.synchronize(device)
        start = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        bench.synchronize(device)
        last = time.perf_counter()
        prefill_s, steps = last - start, []
        cache = getattr(out, cache_kw)
        for _ in range(new_tokens - 1):
            out = model(input_ids=token, use_cache=True, **{cache_kw: cache})
            token, cache = out.logits[:, -1].argmax(-1, keepdim=True), getattr(out, cache_kw)
            bench.synchronize(device)
            now = time.perf_counter()
            steps.append(now - last)
            last = now
    return prefill_s, steps


def bare_round(fn, model, ids, args, device) -> tuple[float, float, float]:
    """One round of the bare loops: median matmul call, median decode step, median prefill."""
    matmul = statistics.median(bare_samples(fn, args.calls, device))
    runs = [bare_generation(model, ids, args.new_tokens, device) for _ in range(args.repeats)]
    step = statistics.median([s for _, steps in runs for s in steps])
    return matmul, step, statistics.median([p for p, _ in runs])


def harness_round(fn, model, ids, args, device) -> tuple[float, float, float]:
    """The same round through effarch.bench."""
    matmul = bench.time_fn(fn, warmup=0, repeats=args.calls, device=device).median
    res = bench.measure_generation(model, ids, new_tokens=args.new_tokens, warmup=0,
                                   repeats=args.repeats)
    return matmul, res.decode_ms_per_token / 1e3, res.ttft_s


class NoOpModel(torch.nn.Module):
    """A "model" that does no work: what is left to time is the loop's own cost."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, device=device))
        self.logits = torch.zeros(1, 1, 8, device=device)

    def forward(self, input_ids, attention_mask=None, cache=None, use_cache=None):
        return types.SimpleNamespace(logits=self.logits, cache={} if cache is None else cache)


def loop_cost_us(device: torch.device, new_tokens: int, runs: int = 300) -> tuple[float, float]:
    """Microseconds per forward of a bare greedy loop and of effarch's, around a no-op model."""
    model, ids = NoOpModel(device), torch.zeros(1, 4, dtype=torch.long, device=device)

    def bare():
        out = model(input_ids=ids, use_cache=True)
        for _ in range(new_tokens - 1):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            out = model(input_ids=token, use_cache=True, cache=out.cache)

    decoder = decoding.as_decoder(model)  # built once, as bench.measure_generation does

    def harness():
        token = decoder.prefill(ids).argmax(-1)
        for _ in range(new_tokens - 1):
            token = decoder.step(token).argmax(-1)

    costs = {bare: [], harness: []}
    with torch.no_grad():
        for _ in range(5):
            for fn in costs:
                start = time.perf_counter()
                for _ in range(runs):
                    fn()
                costs[fn].append((time.perf_counter() - start) / runs / new_tokens * 1e6)
    return min(costs[bare]), min(costs[harness])


def run(args):
    """Per-round medians of both ways, the order alternating from round to round."""
    device = torch.device(args.device or default_device())
    fn, name = matmul_workload(device)
    model = tiny_llama(device)
    ids = bench.random_input_ids(256, args.prompt).to(device)
    bare_round(fn, model, ids, args, device)  # warm-up, untimed
    harness_round(fn, model, ids, args, device)
    bare, harness = [], []
    for r in range(args.rounds):
        first, second = (bare_round, harness_round) if r % 2 == 0 else (harness_round,
                                                                          bare_round)
        a, b = first(fn, model, ids, args, device), second(fn, model, ids, args, device)
        bare.append(a if first is bare_round else b)
        harness.append(b if first is bare_round else a)
    names = [name, "decode step (measure_generation)",
             f"prefill {args.prompt} tokens = ttft (measure_generation)"]
    return device, [(n, [x[i] for x in bare], [x[i] for x in harness])
                    for i, n in enumerate(names)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", help="cpu, cuda, mps (default: effarch's default device)")
    parser.add_argument("--rounds", type=int, default=40, help="interleaved rounds")
    parser.add_argument("--calls", type=int, default=20, help="matmul calls per round")
    parser.add_argument("--repeats", type=int, default=3, help="generations per round")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=64, help="prompt length")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: steady on a shared machine; "
                             "0 keeps torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    device, rows = run(args)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"{args.rounds} interleaved rounds")
    print(f"{'workload':<52} {'bare ms':>8} {'effarch ms':>10} {'ratio':>6} {'overhead':>8}")
    for name, bare, harness in rows:
        b, h = statistics.median(bare), statistics.median(harness)
        ratio = statistics.median(y / x for x, y in zip(bare, harness, strict=True))  # by round
        print(f"{name:<52} {b * 1e3:>8.4f} {h * 1e3:>10.4f} {ratio:>6.3f} {ratio - 1:>+8.1%}")
    bare_us, harness_us = loop_cost_us(device, args.new_tokens)
    print(f"loop cost per forward around a no-op model: bare {bare_us:.1f} us, "
          f"effarch {harness_us:.1f} us")
    print(f"(medians over rounds of each round's median; ratio: the median of the rounds' "
          f"effarch/bare ratios; {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
