#!/usr/bin/env python
"""How the random-weight init scale of a real-size Mamba changes its numerics (CPU, float32 and bf16).

    python scripts/probe_random_init.py 0.1 16    # initializer_range, layers of mamba-2.8b kept
    python scripts/probe_random_init.py 0.02 16

Builds mamba-2.8b's config (cut to the given depth) with random weights, runs 32 random tokens
through transformers and through effarch's fast path, in float32 and in bf16, and prints the
residual stream's size and how far the logits of each pair are apart. The output kept in
data/measurements/random_init_probe_cpu.txt is why effarch.models draws random weights with
initializer_range 0.02 (RANDOM_INIT_STD).

Run it from the repository's root with ``effarch`` importable: installed (``make lab`` installs
it) or ``PYTHONPATH=src`` (the GPU machine, which has no install).
"""

import sys
import time

import torch
from transformers import AutoModelForCausalLM

from effarch import fast, models


def main(init: float, layers: int | None) -> None:
    torch.set_num_threads(2)
    cfg = models.get_config("mamba-2.8b")
    cfg.initializer_range = init
    if layers:
        cfg.num_hidden_layers = layers
    torch.manual_seed(0)
    start = time.time()
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    print(f"init {init} layers {cfg.num_hidden_layers}: built in {time.time() - start:.0f}s",
          flush=True)
    ids = torch.randint(0, cfg.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    ref32 = out.logits[:, -1]
    residual = [h.abs().max().item() for h in out.hidden_states]
    print("residual max per 8 layers:", [f"{v:.3g}" for v in residual[::8]],
          "logits max", f"{ref32.abs().max():.3g}", flush=True)
    f32 = fast.MambaFastGenerator(model).prefill(ids)
    print(f"fp32 fast vs transformers: max diff {(f32 - ref32).abs().max():.3g}", flush=True)
    model.to(torch.bfloat16)
    with torch.no_grad():
        ref16 = model(ids).logits[:, -1].float()
    f16 = fast.MambaFastGenerator(model).prefill(ids)
    same = lambda x, y: bool((x.argmax(-1) == y.argmax(-1)).all())  # noqa: E731
    print(f"bf16 transformers vs fp32: {(ref16 - ref32).abs().max():.3g}; "
          f"bf16 fast vs fp32: {(f16 - ref32).abs().max():.3g}; "
          f"bf16 fast vs bf16 transformers {(f16 - ref16).abs().max():.3g}; "
          f"argmax agree fast16/ref16 {same(f16, ref16)}, ref16/ref32 {same(ref16, ref32)}",
          flush=True)


if __name__ == "__main__":
    main(float(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else None)
