#!/usr/bin/env python
"""What 8-bit, 4-bit and FP8 loading really do to an MoE: save a random real-size checkpoint,
reload it quantised, and compare what loads with effarch's estimate.

    PYTHONPATH=src python scripts/probe_quantization.py                    # OLMoE-1B-7B, GPU
    PYTHONPATH=src python scripts/probe_quantization.py --layers 2         # a quick smoke run
    PYTHONPATH=src python scripts/probe_quantization.py --device cpu --small --modes bf16

1. Prints, for every mode, which modules transformers' quantizer would replace (read from the
   module tree on the meta device: this needs no GPU) and effarch's footprint estimate.
2. Builds the model with random weights (initializer_range 0.02) in bf16 on ``--device`` and
   saves it as safetensors under ``--out`` (default: a temporary folder, removed at the end), after
   checking the disk has room: Mixtral-8x7B's 93 GB does not fit a 64 GB disk, and the script says so.
3. Reloads it with each ``--modes`` (``bf16``; ``8bit`` and ``4bit`` through bitsandbytes'
   ``BitsAndBytesConfig``; ``fp8`` through transformers' ``FineGrainedFP8Config``;
   ``4bit+experts``: 4-bit, then bitsandbytes' experimental ``replace_parameter_4bit`` on every
   fused expert tensor, ``effarch.moe.quantize_experts_4bit``), on a CUDA GPU,
   one at a time, and prints the weights by module type (dtype, bytes, bitsandbytes' scales), the
   GPU memory the load left allocated and its peak, the estimate, and whether a forward pass runs.
``--json`` writes every figure to a file. Quantised loading needs a CUDA GPU (and bitsandbytes for
8/4-bit); on a CPU the script does steps 1 and 2 and a bf16 reload.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from effarch import memory, models, moe

MODES = ("bf16", "8bit", "4bit", "fp8", "4bit+experts")


def build_config(args):
    spec = models.get_spec(args.model)
    cfg = moe.small_config(spec.family) if args.small else models.get_config(spec)
    if args.layers:
        cfg.num_hidden_layers = args.layers
    cfg.initializer_range = min(getattr(cfg, "initializer_range", 0.02), 0.02)
    return spec, cfg


def quantization_config(mode: str, skip):
    from transformers import BitsAndBytesConfig, FineGrainedFP8Config

    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    if mode in ("4bit", "4bit+experts"):
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=skip)
    return FineGrainedFP8Config() if mode == "fp8" else None


def estimate(cfg, mode: str, skip) -> memory.QuantizedFootprint | None:
    if mode == "bf16":
        return None
    return memory.quantized_footprint(cfg, mode, skip_modules=None if mode == "fp8" else skip)


def print_selection(cfg, modes, skip) -> None:
    pc = memory.count_params(cfg)
    print(f"{cfg.model_type}: {pc.total:,} parameters, {cfg.num_hidden_layers} layers; routed "
          f"experts {pc.routed_experts:,} ({pc.routed_experts / pc.total:.1%})")
    print(f"  bf16 estimate: {memory.estimate_weights_bytes(cfg) / 1e9:.3f} GB")
    for mode in modes:
        fp = estimate(cfg, mode, skip)
        if fp is None:
            continue
        kinds = sorted({n.split(".")[-1] for n in fp.quantized_modules})
        print(f"  {mode}: transformers replaces {len(fp.quantized_modules)} modules "
              f"({', '.join(kinds)}), {fp.quantized_share:.1%} of the parameters; experts "
              f"{fp.expert_bytes / 1e9:.3f} GB as loaded; estimate {fp.total_bytes / 1e9:.3f} GB"
              f" (skipped: {', '.join(fp.skip_modules) or 'none'})")


def disk_fits(cfg, where: Path) -> tuple[bool, str]:
    need = memory.estimate_weights_bytes(cfg) * 1.02  # safetensors headers, config
    free = shutil.disk_usage(where).free
    text = (f"the bf16 checkpoint needs {need / 1e9:.1f} GB; {where} has {free / 1e9:.1f} GB "
            "free")
    return need < free, text


def save_random(cfg, out: Path, device: str) -> float:
    t = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return time.perf_counter() - t


def forward_ms(model, vocab: int, tokens: int) -> float:
    """Median time of a forward pass over ``tokens`` tokens (3 after a warm-up), in ms."""
    ids = torch.arange(1, tokens + 1).reshape(1, tokens) % vocab
    ids = ids.to(next(model.parameters()).device)
    times = []
    with torch.no_grad():
        for _ in range(4):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t = time.perf_counter()
            logits = model(input_ids=ids, use_cache=False).logits
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    if not torch.isfinite(logits.float()).all():
        raise RuntimeError("the forward pass gave non-finite logits")
    return 1e3 * statistics.median(times[1:])


def reload(out: Path, cfg, mode: str, skip, device: str, tokens: int) -> dict:
    cuda = device.startswith("cuda")
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.bfloat16, quantization_config=quantization_config(mode, skip),
        device_map={"": device})
    if mode == "4bit+experts":  # bitsandbytes' experimental path for fused parameters
        moe.quantize_experts_4bit(model)
        gc.collect()
        torch.cuda.empty_cache()
    row = dict(mode=mode, tokens=tokens, load_s=time.perf_counter() - t,
               groups=[asdict(g) for g in memory.weights_by_module_type(model)],
               footprint=model.get_memory_footprint())
    if cuda:
        row["allocated"] = torch.cuda.memory_allocated() - before
        row["peak_during_load"] = torch.cuda.max_memory_allocated() - before
    fp = estimate(cfg, mode, skip)
    row["estimate"] = fp.total_bytes if fp else memory.estimate_weights_bytes(cfg)
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        row["forward_ms"] = forward_ms(model, cfg.vocab_size, tokens)
        if cuda:  # activations, and any weights dequantised on the fly
            row["forward_peak_above"] = torch.cuda.max_memory_allocated() - before - row["allocated"]
    except Exception as exc:  # report it; the memory figures stand
        row["forward_error"] = f"{type(exc).__name__}: {exc}"
    del model
    return row


def print_row(row: dict) -> None:
    print(f"\n{row['mode']}: loaded in {row['load_s']:.1f} s")
    for g in row["groups"]:
        scales = f" + scales {g['scale_bytes'] / 1e6:.2f} MB" if g["scale_bytes"] else ""
        print(f"  {g['module_type']:<28} {g['modules']:>5} modules  {'/'.join(g['dtypes']):<22}"
              f" {g['bytes'] / 1e9:9.4f} GB{scales}")
    measured = row.get("allocated")
    text = (f"  GPU memory allocated by the load {measured / 1e9:.4f} GB (peak during the load "
            f"{row['peak_during_load'] / 1e9:.4f} GB); " if measured is not None else "  ")
    print(text + f"get_memory_footprint {row['footprint'] / 1e9:.4f} GB; effarch estimate "
          f"{row['estimate'] / 1e9:.4f} GB"
          + (f" ({measured / row['estimate'] - 1:+.2%} measured against it)" if measured else ""))
    peak = (f"; peak {row['forward_peak_above'] / 1e9:.3f} GB above the weights"
            if "forward_peak_above" in row else "")
    print(f"  forward pass of the {row.get('tokens', '?')} tokens: {row['forward_ms']:.1f} ms (median "
          f"of 3){peak}" if "forward_ms" in row else f"  forward pass failed: {row['forward_error']}")


def available_modes(modes, device: str) -> list[str]:
    keep = []
    for mode in modes:
        if mode != "bf16" and not device.startswith("cuda"):
            print(f"{mode}: skipped — quantised loading needs a CUDA GPU (the selection above "
                  "is what transformers would quantise)")
        elif mode not in ("bf16", "fp8") and importlib.util.find_spec("bitsandbytes") is None:
            print(f"{mode}: skipped — bitsandbytes is not installed")
        else:
            keep.append(mode)
    return keep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="olmoe-1b-7b", help="a registry name (default OLMoE)")
    ap.add_argument("--layers", type=int, help="keep only this many layers (a quick smoke run)")
    ap.add_argument("--small", action="store_true", help="the family's small test config")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {MODES}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, help="where to save the checkpoint (default: a temp dir)")
    ap.add_argument("--tokens", type=int, default=128, help="tokens in the forward check")
    ap.add_argument("--json", type=Path, help="write every figure to this file")
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if set(modes) - set(MODES):
        ap.error(f"unknown mode(s) {sorted(set(modes) - set(MODES))}; choose from {MODES}")
    spec, cfg = build_config(args)
    skip = list(spec.skip_quantization) or None
    print_selection(cfg, modes, skip)
    root = args.out or Path(tempfile.mkdtemp(prefix="probe-quant-"))
    root.mkdir(parents=True, exist_ok=True)
    fits, text = disk_fits(cfg, root)
    print(f"disk: {text}")
    if not fits:
        print(f"{spec.name} does not fit on this disk: not saved. Probe a model that fits "
              "(the default, OLMoE-1B-7B) or fewer layers (--layers); the estimate above "
              "still holds.")
        return 2
    out = root / "checkpoint"
    try:
        print(f"saved a random {spec.name} in {save_random(cfg, out, args.device):.1f} s")
        rows = []
        for mode in available_modes(modes, args.device):
            rows.append(reload(out, cfg, mode, skip, args.device, args.tokens))
            print_row(rows[-1])
    finally:
        shutil.rmtree(out, ignore_errors=True)
        if args.out is None:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        import transformers

        args.json.write_text(json.dumps(dict(
            model=spec.name, layers=cfg.num_hidden_layers, small=args.small, device=args.device,
            device_name=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            torch=torch.__version__, transformers=transformers.__version__, rows=rows),
            indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
