#!/usr/bin/env python
"""Evaluate the tiny zoo on this machine and (with --write-readme) record it in data/zoo/README.md.

For each model, loaded through ``effarch.models.load_model`` (float32 on the CPU):

- load time, and validation bits per byte over the *whole* validation text: every token scored
  once by sliding windows (``final_eval`` in zoo_config.json; ``effarch.quality``'s treatment of
  windows), total nats / ln 2 / UTF-8 bytes,
  beside ``gzip -9`` and ``xz -9e`` on the same text (Python's gzip and lzma modules);
- two sample generations, a code prompt and a prose prompt (seeded sampling);
- for tiny-moe and tiny-hybrid, from the same pass (``output_router_logits=True``): each MoE
  layer's expert load (share of the top-k assignments; experts under a quarter of the uniform
  share are flagged), and the mutual information in bits between the top-1 expert and the
  token's class (keyword, identifier, punctuation, whitespace, number, string/comment, prose
  word) and between the top-1 expert and the document's domain, each beside a permutation
  baseline (labels shuffled N times: mean and 99th percentile).

    python scripts/eval_zoo.py                      # print
    python scripts/eval_zoo.py --write-readme       # and write data/zoo/README.md
    python scripts/eval_zoo.py --zoo /tmp/zoo-smoke-x   # models trained elsewhere (--smoke)

Bits per byte come from ``effarch.zoo.score_text``, i.e. ``effarch.quality.evaluate_text``: the
scorer the labs use. Run it from the repository's root with ``effarch`` importable: installed
(``make lab`` installs it) or ``PYTHONPATH=src``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import lzma
import platform
import time
import warnings
from datetime import date
from pathlib import Path

import numpy as np
import torch
import transformers

from effarch import backends, data, memory, models, paths, quality, registry, zoo
from effarch.moe import TOKEN_CLASSES as CLASSES
from effarch.moe import char_labels, mutual_information, n_experts, routing_report, token_labels

PROMPTS = {"code": "def read_config(path):\n    \"\"\"Return the settings in ",
           "prose": "The module provides functions for"}
LOAD_LIMIT_S = 5.0


# --- one model ------------------------------------------------------------------------------


def compressors(text: str) -> dict:
    raw = text.encode("utf-8")
    return {"gzip -9": 8 * len(gzip.compress(raw, compresslevel=9)) / len(raw),
            "xz -9e": 8 * len(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)) / len(raw)}


@torch.no_grad()
def generate(model, tokenizer, prompt: str, new_tokens: int, seed: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    torch.manual_seed(seed)
    out = model.generate(ids.to(model.device), max_new_tokens=new_tokens, do_sample=True,
                         temperature=0.7, top_k=50, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=False)


def evaluate(name: str, args, text: str, ids: torch.Tensor,
             labels: tuple[np.ndarray, np.ndarray]) -> dict:
    """One model: load time, validation bits per byte (with routes for MoE models, from the
    same pass), parameters, file size, samples and, for MoE models, routing statistics."""
    folder = registry.zoo_path(name, args.zoo)
    t0 = time.perf_counter()
    model, tokenizer = models.load_model(name, device=args.device, zoo_dir=args.zoo)
    load_s = time.perf_counter() - t0
    cfg = model.config
    moe = zoo.is_moe(cfg)
    t0 = time.perf_counter()
    res = zoo.score_text(model, tokenizer, text, window=args.window, stride=args.stride,
                         batch_size=args.batch_size, capture_routes=moe)
    eval_s = time.perf_counter() - t0
    pc = memory.count_params(cfg)
    result = dict(name=name, model_class=type(model).__name__, load_s=load_s, eval_s=eval_s,
                  validation=zoo.validation_summary(res),
                  params=dict(total=pc.total, active=pc.active),
                  weights_bytes=(folder / "model.safetensors").stat().st_size,
                  mamba_path=backends.mamba_path(model), train_meta=zoo.read_train_meta(folder),
                  samples={k: generate(model, tokenizer, p, args.new_tokens, args.seed)
                           for k, p in PROMPTS.items()})
    if moe:
        result["routing"] = routing_report(cfg, stream_routes(res.routes, len(ids)), *labels,
                                           n_perm=args.permutations)
        reference = random_router_mi(cfg, ids, labels[0], args)
        for row, mi in zip(result["routing"], reference, strict=True):
            row["mi_class_random_init"] = mi
    del model
    models.unload()
    return result


def stream_routes(routes: quality.Routes, n: int) -> list[np.ndarray]:
    """The routes as `routing_report` reads them: (n-1, k) per MoE layer, row p = input
    position p (0: the <|endoftext|> that `quality.text_ids` put first). Every position but
    the last is scored once when stride < window, so the positions are exactly 0..n-2."""
    if not np.array_equal(routes.positions, np.arange(n - 1)):
        raise SystemExit("the routing statistics need every position routed once: use "
                         "--stride smaller than --window. See TROUBLESHOOTING.md, section "
                         "'Training and evaluating the zoo'.")
    return routes.experts


def random_router_mi(cfg, ids: torch.Tensor, cls: np.ndarray, args) -> list[float]:
    """MI(top-1 expert; class) per MoE layer of the same architecture at initialisation, over
    ``args.random_tokens`` tokens in evenly spaced windows of the validation stream.

    A router that sees (nearly) the token alone routes by token identity, and the class is a
    function of the token too: such MI is above the shuffled baseline without any learning.
    This is the untrained reference for the trained figure."""
    from transformers import AutoModelForCausalLM

    transformers.set_seed(args.seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).to(args.device).eval()
    w = min(args.window, len(ids))
    k = max(1, min(args.random_tokens // w, len(ids) // w))
    starts = np.linspace(1, len(ids) - w, k).astype(int)  # skip the leading <|endoftext|>
    tops: list[list[np.ndarray]] = []
    with torch.no_grad():
        for b in range(0, k, args.batch_size):
            x = torch.stack([ids[s:s + w] for s in starts[b:b + args.batch_size]])  # (b, w)
            out = model(input_ids=x.to(args.device), use_cache=False, output_router_logits=True)
            tops.append([r.reshape(len(x), w, -1).argmax(-1).reshape(-1).cpu().numpy()
                         for r in out.router_logits])
    labels = np.concatenate([cls[s - 1:s - 1 + w] for s in starts])  # ids[j] is token j-1
    e = n_experts(cfg)
    result = [mutual_information(np.concatenate([t[i] for t in tops]).astype(np.int64), labels,
                                 e, len(CLASSES)) for i in range(len(tops[0]))]
    del model
    models.unload()
    return result


# --- output -----------------------------------------------------------------------------------


def format_report(results: list[dict], comp: dict, info: dict) -> str:
    """The report as Markdown (printed, and the body of the README)."""
    lines = ["## Validation bits per byte", "",
             f"Whole validation split: {info['bytes']:,} UTF-8 bytes, {info['tokens']:,} tokens; "
             f"windows of {info['window']} tokens starting every {info['stride']}, the last "
             f"ending with the text (each token scored once, the first after "
             f"`<|endoftext|>`: `effarch.quality.evaluate_text`, the labs' scorer); bits/byte = "
             f"total nats / ln 2 / bytes. "
             f"Measured by `scripts/eval_zoo.py` on {info['device']} ({info['machine']}), torch "
             f"{info['torch']}, transformers {info['transformers']}, {info['date']}.", "",
             "| model | class | params total | active | bf16 file | trained on | val bits/byte "
             "| beats xz | load s |", "| --- | --- | ---: | ---: | ---: | --- | ---: | --- | ---: |"]
    xz = comp["xz -9e"]
    for r in results:
        m = r["train_meta"]
        trained = (f"{m['tokens_trained'] / 1e6:.1f}M tokens, {m['wall_time_s'] / 60:.1f} min"
                   f"{' (smoke)' if m.get('smoke') else ''}" if m else "?")
        bpb = r["validation"]["bits_per_byte"]
        flag = "" if r["load_s"] < LOAD_LIMIT_S else " ⚠"
        lines.append(f"| {r['name']} | {r['model_class']} | {r['params']['total']:,} | "
                     f"{r['params']['active']:,} | {r['weights_bytes'] / 1e6:.1f} MB | {trained} | "
                     f"{bpb:.3f} | {'yes' if bpb < xz else 'NO'} | {r['load_s']:.2f}{flag} |")
    for k, v in comp.items():
        lines.append(f"| `{k}` | compressor | | | | | {v:.3f} | | |")
    lines += ["", "## Samples", "",
              f"Seeded sampling (seed {info['seed']}, temperature 0.7, top-k 50, "
              f"{info['new_tokens']} new tokens); each sample starts with its prompt.", ""]
    for r in results:
        lines.append(f"### {r['name']}")
        for k, p in PROMPTS.items():
            lines += ["", f"{k}:", "", "```text", p + r["samples"][k], "```"]
        lines.append("")
    routed = [r for r in results if "routing" in r]
    if routed:
        lines += _routing_lines(routed, info)
    return "\n".join(lines) + "\n"


def _routing_lines(routed: list[dict], info: dict) -> list[str]:
    lines = ["## Routing", "",
             "Expert load: share of all top-k assignments per expert over the validation "
             "split (uniform = 1/E); ⚠ marks an expert under a quarter of the uniform share.", ""]
    for r in routed:
        e = len(r["routing"][0]["load"])
        lines += [f"### {r['name']}", "", "| layer | " + " | ".join(f"e{i}" for i in range(e))
                  + " | starved |", "| --- |" + " ---: |" * e + " --- |"]
        for row in r["routing"]:
            cells = [f"{s:.3f}{' ⚠' if i in row['starved'] else ''}"
                     for i, s in enumerate(row["load"])]
            lines.append(f"| {row['layer']} | " + " | ".join(cells)
                         + f" | {', '.join(map(str, row['starved'])) or 'none'} |")
        lines.append("")
    n = routed[0]["routing"][0]["mi_class"]
    lines += ["Mutual information between the top-1 expert and a token label, in bits, over "
              f"{n['tokens']:,} validation tokens (all of them), beside the same statistic with "
              f"the labels shuffled {n['n_perm']} times (mean, 99th percentile). Token classes: "
              + ", ".join(CLASSES) + " (code documents by Python's `tokenize` and `keyword`, the "
              "other domains by character rules; a token takes the class of its first "
              "non-space character). Domains: " + ", ".join(data.DOMAINS) + ". The shuffled "
              "baseline tests independence only: a router that sees mostly the token itself "
              "routes by token identity, and the class is a function of the token, so even an "
              f"untrained router scores above it; *random init* is the same architecture "
              f"before training, on {info['random_tokens']:,} tokens in evenly spaced windows.", "",
              "| model | layer | MI class | shuffled mean / p99 | random init | H(class) | "
              "MI domain | shuffled mean / p99 | H(domain) |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in routed:
        for row in r["routing"]:
            c, d = row["mi_class"], row["mi_domain"]
            lines.append(f"| {r['name']} | {row['layer']} | {c['mi_bits']:.3f} | "
                         f"{c['perm_mean']:.4f} / {c['perm_p99']:.4f} | "
                         f"{row.get('mi_class_random_init', float('nan')):.3f} | "
                         f"{row['class_entropy_bits']:.2f} | {d['mi_bits']:.3f} | "
                         f"{d['perm_mean']:.4f} / {d['perm_p99']:.4f} | "
                         f"{row['domain_entropy_bits']:.2f} |")
    return lines + [""]


README_HEAD = """# The tiny model zoo

Written by `scripts/eval_zoo.py --write-readme` (edit the script, not this file).

Four small causal language models trained by `scripts/train_zoo.py` with the settings in
`zoo_config.json`: the same corpus (`data/corpus`, train split), the same {vocab}-token tokenizer
(`tokenizer/`), the same number of tokens, sequence length, batch, optimiser and schedule, and
about the same number of active parameters (embeddings counted), so that their validation
bits per byte compare directly. Each folder holds `config.json`, `generation_config.json`,
`model.safetensors` (bf16), `train_log.csv` and `train_meta.json` (device, wall time, versions,
which Mamba path trained it). Load one with `effarch.models.load_model("tiny-mamba")` or
`transformers.AutoModelForCausalLM.from_pretrained(<folder>)`. The saved Mamba and Jamba configs
say `use_mambapy=False` (transformers' default path); training ran mambapy's parallel scan.

Licence: the weights are derived from the corpus (see `data/corpus/README.md`).

"""


def parse_args(argv=None) -> argparse.Namespace:
    final = zoo.load_settings()["final_eval"]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--zoo", type=Path, help="a folder of models to evaluate instead of "
                   "data/zoo (e.g. the output of train_zoo.py --smoke)")
    p.add_argument("--only", help="comma-separated model names")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (default 1: on a shared 2-core machine one thread "
                        "scored tiny-mamba 4.7x faster than two)")
    p.add_argument("--window", type=int, default=final["window"])
    p.add_argument("--stride", type=int, default=final["stride"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--permutations", type=int, default=200)
    p.add_argument("--random-tokens", type=int, default=32768,
                   help="tokens for the random-initialisation routing reference")
    p.add_argument("--write-readme", action="store_true",
                   help="write the report into <zoo>/README.md")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    return evaluate_all(args, (args.zoo or paths.zoo_dir()) / "README.md", time.perf_counter())


def evaluate_all(args: argparse.Namespace, readme: Path, start: float) -> list[dict]:
    try:
        names = zoo.model_names(args.only, order=registry.ZOO_NAMES)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    missing = [n for n in names
               if not (registry.zoo_path(n, args.zoo) / "model.safetensors").is_file()]
    if missing:
        raise SystemExit(f"not trained yet: {', '.join(missing)} (run scripts/train_zoo.py). "
                         "See TROUBLESHOOTING.md, section 'Training and evaluating the zoo'.")
    tokenizer = data.load_tokenizer()
    text = data.corpus_text("validation")
    ids = quality.text_ids(tokenizer, text)[0]  # (n,): <|endoftext|>, then the text
    labels = token_labels(tokenizer, text, *char_labels(data.corpus_domains("validation")))
    comp = compressors(text)
    results = []
    for name in names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = evaluate(name, args, text, ids, labels)
        print(f"{name}: {r['validation']['bits_per_byte']:.3f} bits/byte, loaded in "
              f"{r['load_s']:.2f} s, scored in {r['eval_s']:.0f} s", flush=True)
        results.append(r)
    info = dict(bytes=len(text.encode("utf-8")), tokens=len(ids) - 1, window=args.window,
                stride=args.stride, device=args.device, seed=args.seed,
                new_tokens=args.new_tokens, random_tokens=args.random_tokens,
                machine=platform.machine(), torch=torch.__version__,
                transformers=transformers.__version__, date=date.today().isoformat())
    report = format_report(results, comp, info)
    print()
    print(report)
    slow = [r["name"] for r in results if r["load_s"] >= LOAD_LIMIT_S]
    if slow:
        print(f"WARNING: loading took {LOAD_LIMIT_S:.0f} s or more for {', '.join(slow)}")
    if args.write_readme:
        readme.write_text(README_HEAD.replace("{vocab}", str(len(tokenizer))) + report,
                          encoding="utf-8")
        print(f"wrote {readme}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    print(f"eval_zoo: {time.perf_counter() - start:.0f} s")
    return results


if __name__ == "__main__":
    main()
