#!/usr/bin/env python
"""Train lab 2.4.5's recall models on generated MQAR data (Zoology, Arora et al. 2023) and ship
them: attention (Llama-style), Mamba at d_state 4, 16 and 64, and a Jamba-style hybrid, all of
width 64, 2 layers and a 256-token vocabulary (``effarch.recall.SHIPPED``).

    PYTHONPATH=src python scripts/train_recall.py                     # the shipped set (GPU)
    PYTHONPATH=src python scripts/train_recall.py --smoke --out /tmp/r   # seconds on a CPU
    PYTHONPATH=src python scripts/train_recall.py --time-scans           # which scan trains fastest

Every batch is generated fresh from the seed; each model is evaluated every ``eval_every`` steps
on held-out batches. Writes ``<out>/<model>/`` (config.json, fp16 model.safetensors,
train_log.json), ``<out>/manifest.json`` and the run's log ``<out>/train_log.txt``.
Mamba layers train through ``--scan`` (default ``parallel``: effarch's log-depth scan swapped
into the mixers, much faster than transformers' sequential loop without mamba-ssm).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from effarch import bench, compat, recall


def log_line(out, text: str) -> None:
    print(text, flush=True)
    out.write(text + "\n")
    out.flush()


def configs(args) -> tuple[list[recall.RecallModelSpec], recall.TrainConfig]:
    specs = [dataclasses.replace(s, **recall.SMOKE) if args.smoke else s for s in recall.SHIPPED]
    if args.only:
        specs = [s for s in specs if s.name.startswith(tuple(args.only))]
    base = recall.SMOKE_TRAINING if args.smoke else recall.SHIPPED_TRAINING
    changes = {k: v for k, v in dict(steps=args.steps, seed=args.seed, scan=args.scan,
                                     max_seconds=args.max_seconds).items() if v is not None}
    return specs, dataclasses.replace(base, **changes)


def train_one(spec, cfg, args, log) -> dict:
    model = recall.build_model(spec, seed=cfg.seed, device=args.device)
    log(f"== {spec.name}: {recall.parameter_count(model):,} parameters, "
        f"{recall.state_elements(spec, cfg.seq_len):,} state numbers at {cfg.seq_len} tokens")

    def row(r):
        accs = " ".join(f"{k}={v:.3f}" for k, v in r.items() if k.startswith("acc@"))
        log(f"   step {r['step']:5d}  loss {r['loss']:.4f}  {r['seconds']:6.1f} s  {accs}")

    result = recall.train(model, spec, cfg, log=row)
    if result.stopped_early:
        log(f"   stopped early: {result.stopped_early}")
    recall.save(model, result, args.out / spec.name)
    last = result.log[-1]
    return {"folder": spec.name, "name": spec.name, "spec": dataclasses.asdict(spec),
            "parameters": result.parameters, "steps": last["step"], "wall_s": result.wall_s,
            "stopped_early": result.stopped_early,
            "final_accuracy": {k: v for k, v in last.items() if k.startswith("acc@")}}


def time_scans(specs, cfg, args) -> None:
    """Median seconds of one training step (forward and backward, one batch of the recipe's
    largest number of pairs) of each Mamba-layered model through each scan."""
    batch = recall.mqar_batch(cfg.batch_size, num_pairs=max(cfg.pairs), seq_len=cfg.seq_len,
                              vocab_size=specs[0].vocab_size, seed=0)
    ids, targets = batch.inputs.to(args.device), batch.targets.to(args.device)
    print(f"one training step, batch {cfg.batch_size} x {cfg.seq_len} tokens, on {args.device} "
          f"(torch {torch.__version__}, transformers {compat.transformers_version()}):")
    for spec in specs:
        model = recall.build_model(spec, seed=0, device=args.device)
        for name in ("parallel", "chunked", "transformers"):
            def step(model=model):
                model.zero_grad(set_to_none=True)
                recall.recall_loss(model(input_ids=ids, use_cache=False).logits, targets).backward()
            with recall.training_scan(model, recall.scan_by_name(name)):
                t = bench.time_fn(step, warmup=1, repeats=3, device=args.device)
            print(f"  {spec.name:22s} {name:13s} {t.median * 1e3:10.1f} ms "
                  f"(min {t.min * 1e3:.1f}, max {t.max * 1e3:.1f})", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=recall.recall_dir())
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny models, a few steps (tests)")
    ap.add_argument("--only", nargs="*", help="train the models whose names start so")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--scan", choices=("parallel", "chunked", "transformers"))
    ap.add_argument("--max-seconds", type=float, help="per model: stop (logged) past this")
    ap.add_argument("--jobs", type=int, default=1,
                    help="train this many models at once, each in its own process (one GPU "
                         "runs several of these small models side by side); wall times then "
                         "include the sharing, and the manifest records it")
    ap.add_argument("--time-scans", action="store_true",
                    help="time one training step of the Mamba-layered models per scan, then exit")
    args = ap.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    specs, cfg = configs(args)
    if args.time_scans:
        time_scans([s for s in specs if s.arch != "attention"], cfg, args)
        return 0
    if args.jobs > 1 and len(specs) > 1:
        return train_in_processes(specs, cfg, args, argv)
    train_all(specs, cfg, args, argv)
    return 0


def _without(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """argv without the given options and their values (``--out X``, ``--only a b``)."""
    out, skipping = [], False
    for a in argv:
        if a.startswith("--"):
            skipping = a.split("=")[0] in flags
        if not skipping:
            out.append(a)
    return out


def train_in_processes(specs, cfg, args, argv) -> int:
    """``--jobs N``: one process per model (N at a time), each writing its folder under
    ``<out>/.parts``. Only when every one succeeded do the folders move into ``<out>`` and one
    manifest and one log get written in ``specs`` order, as a single-process run writes them; a
    failure leaves ``<out>`` as it was (and ``.parts`` with each process's output)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    base = _without(argv, ("--out", "--only", "--jobs"))
    parts = args.out / ".parts"
    shutil.rmtree(parts, ignore_errors=True)
    parts.mkdir(parents=True)
    start, pending, running, failed = time.perf_counter(), list(specs), [], []
    try:
        while pending or running:
            while pending and len(running) < args.jobs:
                spec = pending.pop(0)
                log = (parts / f"{spec.name}.out").open("w", encoding="utf-8")
                out = os.path.relpath(parts / spec.name)  # as the logged command shows it
                cmd = [sys.executable, __file__, *base, "--out", out, "--only", spec.name]
                running.append((spec, subprocess.Popen(cmd, stdout=log,
                                                       stderr=subprocess.STDOUT), log))
            time.sleep(1.0)
            for item in [r for r in running if r[1].poll() is not None]:
                running.remove(item)
                item[2].close()
                if item[1].returncode:
                    failed.append(item[0].name)
    finally:  # interrupted: no orphan left training on the GPU
        for _, proc, log in running:
            proc.terminate()
            proc.wait()
            log.close()
    if failed:
        print(f"failed: {', '.join(failed)} (their output: {parts}/<name>.out); {args.out} is "
              "unchanged", file=sys.stderr)
        return 1
    entries, logs, metas = [], [], []
    for spec in specs:
        manifest = recall.read_manifest(parts / spec.name)
        entries.extend(manifest.pop("models"))
        metas.append(manifest)
        logs.append((parts / spec.name / "train_log.txt").read_text(encoding="utf-8"))
    for spec in specs:
        shutil.rmtree(args.out / spec.name, ignore_errors=True)
        shutil.move(str(parts / spec.name / spec.name), str(args.out / spec.name))
    wall = time.perf_counter() - start
    recall.write_manifest(args.out, entries, {**metas[0], "wall_s": wall, "jobs": args.jobs,
                                              "complete": len(entries) == len(specs)})
    head = f"$ {shlex.join(['python', 'scripts/train_recall.py', *argv])}\n"
    (args.out / "train_log.txt").write_text(
        head + "".join(logs) + f"done: {len(entries)} models in {wall:.0f} s "
        f"({args.jobs} processes at once)\n", encoding="utf-8")
    shutil.rmtree(parts)
    print(f"done: {len(entries)} models in {wall:.0f} s ({args.jobs} processes at once)")
    return 0


def train_all(specs, cfg, args, argv) -> None:
    """Train every model in turn; the manifest is rewritten after each, so an interrupted run
    still ships what it finished (``"complete": false`` says it stopped early)."""
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        platform.processor() or platform.machine()
    meta = {"training": dataclasses.asdict(cfg), "device": device, "torch": torch.__version__,
            "transformers": compat.transformers_version(), "smoke": args.smoke}
    with (args.out / "train_log.txt").open("w", encoding="utf-8") as f:
        log = lambda text: log_line(f, text)  # noqa: E731
        log(f"$ {shlex.join(['python', 'scripts/train_recall.py', *(argv or sys.argv[1:])])}")
        log(f"torch {torch.__version__}, transformers {compat.transformers_version()}, "
            f"device {args.device} ({device}); training: {dataclasses.asdict(cfg)}")
        entries = []
        for spec in specs:
            entries.append(train_one(spec, cfg, args, log))
            recall.write_manifest(args.out, entries, {
                **meta, "wall_s": time.perf_counter() - start,
                "complete": len(entries) == len(specs)})
        log(f"done: {len(entries)} models in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
