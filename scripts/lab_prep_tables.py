#!/usr/bin/env python
"""Generate the documents' tables (never typed by hand): LAB_PREP.md's model table from effarch's
registry, its quantisation-probe table from the kept ``scripts/probe_quantization.py`` run, and
the per-lab full-profile table of README.md and LAB_PREP.md from the kept runs
(``data/measurements/full_profile_runs.jsonl``, written by ``scripts/run_full_profile.py``);
the study documents' tables (QUICK_REFERENCE.md, ELI5.md) and README's DGX Spark estimates, each
computed by effarch's own functions.

    python scripts/lab_prep_tables.py          # rewrite the tables
    python scripts/lab_prep_tables.py --check  # exit 1 when a document is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from effarch import bench, finetune, memory, moe, paths, plots, registry, runs, ssm

ROOT = paths.repo_root()


def model_table() -> str:
    rows = ["| model | hub id | parameters (total) | active per token | bf16 | 8-bit (bnb) "
            "| 4-bit (bnb) | FP8 | 4-bit + experts (bnb parametrize) "
            "| in `nn.Linear` (what bnb quantises) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, spec in registry.REGISTRY.items():
        if not spec.config:
            continue
        cfg = registry.get_config(spec)
        pc = memory.count_params(cfg)
        gb = [memory.estimate_weights_bytes(name, "bfloat16", q) / 1e9
              for q in (None, "8bit", "4bit", "fp8", "4bit+experts")]
        skip = spec.skip_quantization or None
        share = memory.quantized_footprint(cfg, "4bit", skip_modules=skip).quantized_share
        rows.append(f"| {name} | `{spec.hub_id}` | {pc.total / 1e9:.2f} B | {pc.active / 1e9:.2f} B"
                    f" | {gb[0]:.1f} GB | {gb[1]:.1f} GB | {gb[2]:.1f} GB | {gb[3]:.1f} GB"
                    f" | {gb[4]:.1f} GB | {share:.1%} |")
    return "\n".join(rows)


def probe_table() -> str:
    """The kept run of scripts/probe_quantization.py (data/measurements/), or a line saying
    there is none yet."""
    probe = memory.kept_quantization_probe()
    if probe is None:
        return ("(no kept run yet: on a GPU, `scripts/probe_quantization.py --json` writes "
                f"`{memory.PROBE_FILE}` into data/measurements)")
    rows = [f"{probe['model']}, {probe['layers']} layers, random weights, on {probe['device_name']} "
            f"(torch {probe['torch']}, transformers {probe['transformers']}), kept in "
            f"`data/measurements/{memory.PROBE_FILE}`:", "",
            "| load | GPU memory allocated | peak during the load | effarch's estimate | "
            "measured ÷ estimate | forward pass | its peak above the weights |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    if probe.get("note"):  # how the run went, written into the kept file by whoever kept it
        rows[0] += f" {probe['note']}"
    for r in probe["rows"]:
        fwd = (f"{r['forward_ms']:.0f} ms ({r['tokens']} tokens)" if "forward_ms" in r
               else r.get("forward_error", "—"))
        peak = f"{r['forward_peak_above'] / 1e9:.2f} GB" if "forward_peak_above" in r else "—"
        rows.append(f"| {r['mode']} | {r['allocated'] / 1e9:.2f} GB | "
                    f"{r['peak_during_load'] / 1e9:.2f} GB | {r['estimate'] / 1e9:.2f} GB | "
                    f"{r['allocated'] / r['estimate']:.3f} | {fwd} | {peak} |")
    return "\n".join(rows)


# --- the study documents -------------------------------------------------------------------

# Inference state: the zoo's four models and the full-size models whose KV cache the formula
# covers (DeepSeek-V2-Lite's multi-head latent attention caches a compressed latent: not modelled).
STATE_MODELS = ("tiny-transformer", "tiny-mamba", "tiny-moe", "tiny-hybrid", "phi-2",
                "mamba-2.8b", "olmoe-1b-7b", "mixtral-8x7b", "qwen1.5-moe-a2.7b", "jamba-v0.1")
STATE_CONTEXTS = (2048, 32768)


def _state_bytes(cfg, context: int) -> int:
    """Inference state after ``context`` tokens, batch 1, bf16 (the SSM state h in float32)."""
    return memory.kv_cache_bytes(cfg, context) + memory.ssm_state_bytes(cfg)


def state_table() -> str:
    """KV cache and Mamba state of each model, from ``memory.kv_cache_bytes`` and
    ``memory.ssm_state_bytes`` (lab 2.4.1's formulas, checked against real caches)."""
    head = " | ".join(f"state at {c:,} tokens" for c in STATE_CONTEXTS)
    rows = [f"| model | type | positions | KV cache per token | Mamba state (any length) | {head} |",
            "| --- | --- | --- | --- | --- |" + " --- |" * len(STATE_CONTEXTS)]
    for name in STATE_MODELS:
        cfg = registry.get_config(name)
        limit = getattr(cfg, "max_position_embeddings", None)
        cells = " | ".join(plots.format_bytes(_state_bytes(cfg, c)) if not limit or c <= limit
                           else f"({plots.format_bytes(_state_bytes(cfg, c))})"
                           for c in STATE_CONTEXTS)
        rows.append(f"| {name} | {cfg.model_type} | {f'{limit:,}' if limit else 'no limit'} | "
                    f"{memory.kv_cache_bytes(cfg, 1):,} B | {memory.ssm_state_bytes(cfg):,} B | "
                    f"{cells} |")
    return "\n".join(rows)


def _even_logits(tokens: int, experts: int, k: int, collapsed: bool) -> torch.Tensor:
    """(T, E) router logits: token t prefers experts t, t+1, … (mod E) in that order — every
    expert chosen equally often —, or, collapsed, experts 0, 1, … for every token."""
    logits = torch.zeros(tokens, experts)
    for j in range(k):
        cols = torch.full((tokens,), j) if collapsed else (torch.arange(tokens) + j) % experts
        logits[torch.arange(tokens), cols] = 20.0 - 10.0 * j
    return logits


def switch_loss_table() -> str:
    """``moe.load_balancing_loss`` (transformers' pooled Switch loss, no α) on routers built to
    be perfectly even or collapsed."""
    rows = ["| experts E | top-k | every expert chosen equally | every token to the same k experts |",
            "| --- | --- | --- | --- |"]
    for experts, k in ((8, 1), (8, 2), (64, 8)):
        loss = [float(moe.load_balancing_loss(_even_logits(experts * 64, experts, k, c),
                                              experts, k)) for c in (False, True)]
        rows.append(f"| {experts} | {k} | {loss[0]:.3f} | {loss[1]:.3f} |")
    return "\n".join(rows)


def capacity_table(tokens: int = 4096) -> str:
    """``moe.expert_capacity`` for a batch of ``tokens`` tokens."""
    factors = (1.0, 1.25, 2.0)
    rows = ["| experts E | top-k | even share (T·k/E) | "
            + " | ".join(f"capacity at factor {f}" for f in factors) + " |",
            "| --- | --- | --- |" + " --- |" * len(factors)]
    for experts, k, who in ((8, 2, "Mixtral"), (64, 8, "OLMoE")):
        caps = " | ".join(f"{moe.expert_capacity(tokens, k, experts, f):,}" for f in factors)
        rows.append(f"| {experts} ({who}) | {k} | {tokens * k / experts:,.0f} | {caps} |")
    return "\n".join(rows)


def lora_table(rank: int = 8) -> str:
    """Trainable parameters of LoRA on ``in_proj`` and ``x_proj`` (``finetune.expected_lora_counts``)
    against the model's total (``memory.count_params``)."""
    rows = ["| model | module | lora_A (r × in) | lora_B (out × r) | in all layers | "
            "share of the model |", "| --- | --- | --- | --- | --- | --- |"]
    for name in ("tiny-mamba", "mamba-2.8b"):
        cfg = registry.get_config(name)
        counts, shapes = finetune.expected_lora_counts(cfg, rank), finetune.lora_shapes(cfg)
        total = memory.count_params(cfg).total
        for target in finetune.DEFAULT_TARGETS:
            fan_in, fan_out = shapes[target]
            n = counts[f"{target}.lora_A"] + counts[f"{target}.lora_B"]
            rows.append(f"| {name} | `{target}` | {rank} × {fan_in:,} | {fan_out:,} × {rank} | "
                        f"{n:,} | {n / total:.2%} |")
        n = sum(counts.values())
        rows.append(f"| {name} | both | | | {n:,} | {n / total:.2%} |")
    return "\n".join(rows)


def discretisation_table() -> str:
    """``ssm.discretize`` (B̄ = ΔB, what Mamba uses) against ``ssm.discretize_zoh_exact``."""
    x = torch.tensor([0.01, 0.1, 0.5, 1.0, 2.0, 5.0])               # Δ·|A|
    delta, A, B = x[None, :, None], -torch.ones(len(x), 1), torch.ones(1, 1, 1)
    a_bar, b_first = ssm.discretize(delta, A, B)
    _, b_exact = ssm.discretize_zoh_exact(delta, A, B)
    rows = ["| Δ·(−A) | Ā = exp(ΔA) | B̄ = ΔB (Mamba) ÷ exact B̄ | relative error |",
            "| --- | --- | --- | --- |"]
    for i, v in enumerate(x.tolist()):
        ratio = float(b_first[0, i, 0, 0] / b_exact[0, i, 0, 0])
        rows.append(f"| {v:g} | {float(a_bar[0, i, 0, 0]):.4f} | {ratio:.4f} | {ratio - 1:.2%} |")
    return "\n".join(rows)


def eli5_numbers() -> str:
    """The few figures ELI5.md quotes, as sentences."""
    phi, mamba, olmoe = (registry.get_config(n) for n in ("phi-2", "mamba-2.8b", "olmoe-1b-7b"))
    per_token, state = memory.kv_cache_bytes(phi, 1), memory.ssm_state_bytes(mamba)
    limit = phi.max_position_embeddings
    pc = memory.count_params(olmoe)
    return (f"- Phi-2, a transformer of {memory.count_params(phi).total / 1e9:.2f} billion "
            f"parameters, adds "
            f"{plots.format_bytes(per_token)} of KV cache for every token it reads: "
            f"{plots.format_bytes(memory.kv_cache_bytes(phi, limit))} at its limit of "
            f"{limit:,} tokens, for one sequence. Mamba-2.8B's state is "
            f"{plots.format_bytes(state)} whatever the length — the KV cache of "
            f"{state / per_token:.0f} tokens.\n"
            f"- OLMoE-1B-7B holds {pc.total / 1e9:.2f} billion parameters; each token runs "
            f"through {pc.active / 1e9:.2f} billion of them ({pc.experts_per_token} of its "
            f"{pc.n_experts} experts in each layer, plus attention and embeddings): each token "
            f"uses {pc.active / pc.total:.0%} of the parameters, and the memory holds all of "
            f"them.")


# --- DGX Spark: estimates from published figures, not measurements ----------------------------

SPARK_BANDWIDTH = 273e9   # bytes/s: NVIDIA's published LPDDR5x bandwidth of DGX Spark
SPARK_MEMORY = 128e9      # bytes: its unified memory, shared by the CPU and the GPU
SPARK_MODELS = ("mamba-2.8b", "phi-2", "olmoe-1b-7b", "mixtral-8x7b", "jamba-v0.1")
SPARK_CONTEXT = 2048


def decode_step_bytes(name: str, context: int = SPARK_CONTEXT) -> int:
    """Bytes one decode step reads at batch 1, bf16: the weights a token uses (an MoE's k experts
    per layer; an untied input embedding is read one row, so not counted), the KV cache after
    ``context`` tokens and the Mamba state."""
    cfg = registry.get_config(name)
    pc = memory.count_params(cfg)
    weights = (pc.active - (pc.embedding if pc.lm_head else 0)) * memory.dtype_bytes("bfloat16")
    return int(weights + _state_bytes(cfg, context))


def spark_table() -> str:
    rows = [f"| model | weights in bf16 | share of {SPARK_MEMORY / 1e9:.0f} GB | bytes a decode "
            f"step reads (batch 1, {SPARK_CONTEXT:,}-token context) | decode bound at "
            f"{SPARK_BANDWIDTH / 1e9:.0f} GB/s |", "| --- | --- | --- | --- | --- |"]
    for name in SPARK_MODELS:
        weights, step = memory.estimate_weights_bytes(name), decode_step_bytes(name)
        rows.append(f"| {name} | {weights / 1e9:.1f} GB | {weights / SPARK_MEMORY:.0%} | "
                    f"{step / 1e9:.2f} GB | {SPARK_BANDWIDTH / step:.0f} tokens/s |")
    return "\n".join(rows)


def lab246_step_peaks(name: str = "lab246_full_h100.txt") -> dict[str, str]:
    """The allocator peaks of one training step that lab 2.4.6's kept full-size run printed
    (its Part E table: method, allocated before the step, peak), as printed, in GiB."""
    import re

    text = (paths.measurements_dir() / name).read_text(encoding="utf-8")
    found = dict(re.findall(r"^(LoRA r=8|full fine-tuning|QLoRA \(4-bit base\))\s+[\d.]+ GiB"
                            r"\s+([\d.]+) GiB", text, flags=re.M))
    if len(found) != 3:
        raise ValueError(f"{name}: expected the LoRA / full / QLoRA peaks table, found {found}")
    return found


def _kept_bench(what: str, name: str = "bench_fast_mamba_h200.json") -> float:
    """One figure of a kept ``scripts/bench_fast_mamba.py --json`` run (data/measurements)."""
    return bench.kept_figure(paths.measurements_dir() / name, what)


def spark_claims() -> str:
    """The seed's "DGX Spark advantages", each against numbers: effarch's formulas for weights
    and state, NVIDIA's published memory and bandwidth, and a kept H200 run for comparison."""
    mixtral = memory.estimate_weights_bytes("mixtral-8x7b")
    mix_cfg = registry.get_config("mixtral-8x7b")
    mix_ctx = 32768
    mix_kv = memory.kv_cache_bytes(mix_cfg, mix_ctx)
    jamba = memory.estimate_weights_bytes("jamba-v0.1")
    jam_cfg = registry.get_config("jamba-v0.1")
    jam_ctx = 262144
    jam_state = _state_bytes(jam_cfg, jam_ctx)
    h200_copy = _kept_bench("device copy bandwidth (read + write)") * 1e12
    h200_decode = _kept_bench("decode batch 1, effarch fast path (graph)")
    mamba_step = decode_step_bytes("mamba-2.8b")
    ft = memory.estimate_weights_bytes("mamba-2.8b")  # bf16 weights
    step_peaks = lab246_step_peaks()  # GiB, as the lab printed them
    gb = lambda b: f"{b / 1e9:.1f} GB"  # noqa: E731
    mix_left, jam_left = SPARK_MEMORY - mixtral - mix_kv, SPARK_MEMORY - jamba - jam_state
    fits = lambda left: (f"yes, {left / SPARK_MEMORY:.0%} of the memory left"  # noqa: E731
                         if left > 0 else "no")
    slower = h200_copy / SPARK_BANDWIDTH
    return "\n".join([
        "| the seed's claim | the numbers | holds? |", "| --- | --- | --- |",
        f"| 128 GB: Mixtral without quantisation | Mixtral-8x7B's weights take {gb(mixtral)} in "
        f"bf16 ({mixtral / SPARK_MEMORY:.0%} of {SPARK_MEMORY / 1e9:.0f} GB); its KV cache at "
        f"{mix_ctx:,} tokens, batch 1, adds {gb(mix_kv)}, leaving "
        f"{gb(mix_left)} for the system, the CUDA context and activations (the CPU shares the "
        f"same memory) | {fits(mix_left)} |",
        f"| 128 GB: Jamba at 256K context | Jamba-v0.1's weights take {gb(jamba)} in bf16; its "
        f"state at {jam_ctx:,} tokens (KV cache of its attention layers and the Mamba state, batch "
        f"1) is {gb(jam_state)}: {gb(jamba + jam_state)} in all, {gb(jam_left)} left; a "
        "256K-token prefill's activations are not counted here and would have to be processed "
        f"in chunks | weights and state: {fits(jam_left)}; the prefill is not counted |",
        f"| fast memory for Mamba's sequential state updates | DGX Spark's memory moves "
        f"{SPARK_BANDWIDTH / 1e9:.0f} GB/s (published); one H200's device copy measured "
        f"{h200_copy / 1e12:.2f} TB/s, bytes read and written "
        f"({slower:.0f}×). Mamba-2.8B's decode "
        f"step reads {gb(mamba_step)}, so at most {SPARK_BANDWIDTH / mamba_step:.0f} tokens/s on "
        f"DGX Spark at batch 1, against {h200_decode:.0f} measured on the H200 "
        "(`data/measurements/bench_fast_mamba_h200.json`) | "
        + (f"no: {slower:.0f}× slower than an H200's; what it offers is capacity |" if slower > 1
           else "yes |"),
        f"| bf16: train and fine-tune at full precision | bf16 is half precision; full "
        f"fine-tuning of Mamba-2.8B in bf16 with AdamW holds the weights, their gradients and two "
        f"optimiser moments, about 4 × {gb(ft)} = {gb(4 * ft)} (lab 2.4.6's count) before "
        f"activations. LoRA drops the gradients and moments of the frozen weights but not the "
        f"activations: lab 2.4.6's full-size run (one H100, batch 16, "
        f"`data/measurements/lab246_full_h100.txt`) peaked at {step_peaks['LoRA r=8']} GiB with "
        f"LoRA, {step_peaks['full fine-tuning']} GiB with full fine-tuning and "
        f"{step_peaks['QLoRA (4-bit base)']} GiB with QLoRA | "
        + ("fits" if 4 * ft < SPARK_MEMORY else "does not fit")
        + ", but in half precision, not \"full\" |",
    ])


STUDY_BLOCKS = {
    "QUICK_REFERENCE.md": {"inference state": state_table, "switch loss": switch_loss_table,
                           "capacity": capacity_table, "lora targets": lora_table,
                           "discretisation": discretisation_table},
    "ELI5.md": {"eli5 numbers": eli5_numbers},
}


def replace_block(text: str, name: str, body: str) -> str:
    """Put ``body`` between the document's ``<!-- BEGIN/END GENERATED: name -->`` markers."""
    begin, end = f"<!-- BEGIN GENERATED: {name} -->", f"<!-- END GENERATED: {name} -->"
    if begin not in text or end not in text:
        raise ValueError(f"the markers of the generated {name!r} block are missing. See "
                         "TROUBLESHOOTING.md, section 'Generated documents'.")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body}\n{end}{tail}"


def documents() -> dict[Path, str]:
    """Each generated document and its text as it should be now."""
    table = runs.runs_table(runs.read_runs())
    lab_prep = (ROOT / "LAB_PREP.md").read_text(encoding="utf-8")
    lab_prep = replace_block(lab_prep, "model table", model_table())
    lab_prep = replace_block(lab_prep, "quantisation probe", probe_table())
    lab_prep = replace_block(lab_prep, "dgx spark claims", spark_claims())
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    readme = replace_block(readme, "dgx spark estimates", spark_table())
    out = {ROOT / "LAB_PREP.md": replace_block(lab_prep, "full-profile runs", table),
           ROOT / "README.md": replace_block(readme, "full-profile runs", table)}
    for doc, blocks in STUDY_BLOCKS.items():
        text = (ROOT / doc).read_text(encoding="utf-8")
        for name, make in blocks.items():
            text = replace_block(text, name, make())
        out[ROOT / doc] = text
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    stale = []
    for path, new in documents().items():
        if new != path.read_text(encoding="utf-8"):
            stale.append(path.name)
            if not args.check:
                path.write_text(new, encoding="utf-8")
    if args.check and stale:
        print(f"generated tables are stale in {', '.join(stale)}: run "
              "python scripts/lab_prep_tables.py. See TROUBLESHOOTING.md, section "
              "'Generated documents'.")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
