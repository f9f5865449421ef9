#!/usr/bin/env python
"""A training step of a real-size Mamba layer stack: transformers' own ``MambaMixer`` path
against ``effarch.fast.use_fast_scan`` (only the scan changes: Triton forward and backward where
Triton runs, else the chunked PyTorch scan), side by side in one run, random weights.

    python scripts/bench_train_step.py --device cuda                     # the measurement (GPU)
    python scripts/bench_train_step.py --device cpu --layers 1 --seq 64 --repeats 1   # smoke run
    TRITON_INTERPRET=1 python scripts/bench_train_step.py --device cpu --hidden-size 16 \
        --layers 2 --seq 40 --backends chunked,auto --repeats 1 --warmup 0   # Triton arm, CPU

The stack is the registry's mamba-2.8b config (d_model 2560, d_inner 5120, n 16) cut to
--layers layers, as a transformers ``MambaModel`` fed random ``inputs_embeds`` (b, l, 2560):
the embedding and LM head are left out, being the same on every path (the vocabulary is cut to
8 so they cost nothing). One step = forward, a loss (the last hidden state's projection on a fixed
random tensor), and backward into every trainable parameter (all of them; --lora: LoRA r=8 on in_proj and x_proj
only, as lab 2.4.6 trains) and into the input. Each arm is timed with ``effarch.bench.time_fn``
(synchronised, --warmup untimed steps, median of --repeats); before timing, one step of each
arm is compared with transformers' (relative error of the input's and the parameters'
gradients). On CUDA the peak memory of a step is printed too.

Run it from the repository's root with ``effarch`` importable: installed (``make lab`` installs
it) or ``PYTHONPATH=src`` (the GPU machine, which has no install).
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import sys

import torch

from effarch import backends, bench, fast, registry

REPORT = bench.Report(width=52)
row = REPORT.row


def build(args):
    """The layer stack: ``MambaModel`` at the registry config, --layers deep, random weights."""
    from transformers import CONFIG_MAPPING, MambaModel

    spec = registry.as_spec(args.model)
    size = dict(num_hidden_layers=args.layers, vocab_size=8)
    if args.hidden_size:  # smoke runs only: d_inner and Δ's rank follow from it
        size["hidden_size"] = args.hidden_size
    cfg = CONFIG_MAPPING[spec.family](**{**spec.config, **size})
    torch.manual_seed(0)
    model = MambaModel(cfg).to(device=args.device, dtype=args.dtype).train()
    if args.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, target_modules=["in_proj", "x_proj"]))
    return model, cfg


def arms(args, x) -> dict[str, str | None]:
    """Arm name -> effarch backend (None: transformers' own path, the baseline)."""
    found = {"transformers": None}
    for backend in args.backends:
        picked = f" ({fast.choose_backend(x, needs_grad=True)})" if backend == "auto" else ""
        found[f"effarch {backend}{picked}"] = backend
    return found


def step_fn(model, x, probe, backend):
    """One training step: forward, a loss, backward (gradients accumulate). The loss is the
    last hidden state's projection on a fixed random ``probe`` (b, l, H): a mean square of it
    would be nearly constant, the output being RMS-normalised, and its gradients rounding."""
    def step():
        ctx = fast.use_fast_scan(model, backend=backend) if backend else contextlib.nullcontext()
        with ctx:
            h = model(inputs_embeds=x, use_cache=False).last_hidden_state     # (b, l, H)
            (h.float() * probe).sum().backward()
    return step


def gradients(model, x, probe, backend) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    x.grad = None
    step_fn(model, x, probe, backend)()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    grads["input"] = x.grad.float().clone()
    return grads


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def measure(args) -> None:
    model, cfg = build(args)
    b, length, dev = args.batch, args.seq, args.device
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, length, cfg.hidden_size, generator=g).to(dev, args.dtype)
    x.requires_grad_(True)
    probe = torch.randn(x.shape, generator=g).to(dev) / x.numel() ** 0.5
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cut = f"{args.layers} layers" + (f", d_model {args.hidden_size} (smoke run)"
                                     if args.hidden_size else "")
    print(f"{args.model} config cut to {cut}, random weights, {args.dtype_name}, "
          f"b={b}, l={length}, d_model={cfg.hidden_size}, d_inner={cfg.intermediate_size}, "
          f"n={cfg.state_size}; {trainable:,} trainable parameters "
          f"({'LoRA r=8 on in_proj, x_proj' if args.lora else 'all'})")
    print(f"transformers' path here: {backends.mamba_path(model)}; effarch 'auto' picks "
          f"'{fast.choose_backend(x, needs_grad=True)}'")
    ref = gradients(model, x, probe, None)
    for name, backend in arms(args, x).items():
        if backend is not None:
            got = gradients(model, x, probe, backend)
            worst = max(relative_error(got[k], ref[k]) for k in ref)
            row(f"{name}: max relative gradient error vs transformers", worst, "",
                f"input: {relative_error(got['input'], ref['input']):.2e}")
    base = None
    for name, backend in arms(args, x).items():
        model.zero_grad(set_to_none=True)
        bench.reset_peak_memory(dev)
        t = bench.time_fn(step_fn(model, x, probe, backend), warmup=args.warmup, repeats=args.repeats,
                          device=dev)
        base = base or t.median
        row(f"{name}: training step", t.median * 1e3, "ms",
            f"min {t.min * 1e3:.4g}, max {t.max * 1e3:.4g} of {args.repeats}; "
            f"{base / t.median:.2f}x transformers")
        if dev.startswith("cuda"):
            row(f"{name}: peak memory", bench.peak_memory_bytes(dev) / 1e9, "GB")
        row(f"{name}: tokens per second", b * length / t.median, "tok/s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="mamba-2.8b", help="a Mamba in effarch's registry")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden-size", type=int, default=None,
                    help="smoke runs only: cut d_model (the figures are then not the model's)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 elsewhere")
    ap.add_argument("--lora", action="store_true", help="train LoRA on in_proj, x_proj only")
    ap.add_argument("--backends", default=None,
                    help="effarch arms, comma-separated (default: chunked,triton on CUDA; chunked "
                         "elsewhere). 'chunked' is the gradient path before the Triton backward")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.dtype_name = args.dtype or ("bfloat16" if cuda else "float32")
    args.dtype = getattr(torch, args.dtype_name)
    default = "chunked,triton" if cuda else "chunked"
    args.backends = [s for s in (args.backends or default).split(",") if s]
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, triton "
          f"{backends.package_version('triton')}, {platform.machine()}, device {args.device}"
          + (f" ({torch.cuda.get_device_name(args.device)})" if cuda else ""))
    measure(args)
    if args.json:
        REPORT.save(args.json, device=args.device, torch=torch.__version__,
                    args={k: v for k, v in vars(args).items() if k != "dtype"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
