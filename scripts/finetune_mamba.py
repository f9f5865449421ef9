#!/usr/bin/env python
"""Fine-tune a Mamba model on a shipped task with LoRA (PEFT + transformers' Trainer).

    python scripts/finetune_mamba.py --model tiny-mamba --task dates --output runs/dates
    python scripts/finetune_mamba.py ... --resume       # continue from the latest checkpoint
    torchrun --nproc_per_node 2 scripts/finetune_mamba.py ...   # two processes on one CPU
    accelerate launch --num_processes 1 scripts/finetune_mamba.py ...   # one GPU

Writes the final PEFT adapter to OUTPUT (``adapter_config.json``, ``adapter_model.safetensors``:
``peft.PeftModel.from_pretrained(base_model, OUTPUT)`` loads it), Trainer checkpoints to
OUTPUT/checkpoints/, the Trainer's log to OUTPUT/train_log.json and the run's settings and
results to OUTPUT/run.json. An existing OUTPUT is refused unless ``--resume`` (continue its
training, with the same settings and ``--max-steps``) or ``--overwrite`` (delete it, start
again). The last line printed is ``exact match: base X% -> adapter Y% (N held-out rows)`` on the
task's test split; the line before it gives the adapter's size.

LoRA targets default to ``in_proj,x_proj``: PEFT refuses ``out_proj`` and ``conv1d`` on Mamba,
and transformers' mixer reads ``dt_proj.weight`` directly, so an adapter there never trains
(lab 2.4.6 shows both). The global batch (``--batch-size``) is split over the processes, so one
process and two give the same steps. ``accelerate launch --cpu --num_processes 2`` starts one
process only (accelerate needs mpirun and a hostfile for several CPU processes): the script
refuses it and says to use ``torchrun``, whose processes accelerate joins in one gloo group.
Run with ``PYTHONPATH=src`` from a plain checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from accelerate import PartialState
from transformers import set_seed

from effarch import bench, finetune, models, plots
from effarch.finetune import FinetuneError, TrainSettings

RESUME_KEYS = ("model", "weights", "quantization", "task", "settings")
TROUBLE_RESUME = "See TROUBLESHOOTING.md, section 'Interrupted training and resume'."


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = TrainSettings()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny-mamba", help="registry name (default tiny-mamba)")
    ap.add_argument("--weights", choices=("pretrained", "random"), default="pretrained",
                    help="random: the real config with random weights (memory and speed only)")
    ap.add_argument("--quantization", choices=("4bit",), default=None,
                    help="QLoRA: the frozen base in 4-bit NF4 (a CUDA GPU and bitsandbytes)")
    ap.add_argument("--task", default="dates", help="a folder of data/tasks (default dates)")
    ap.add_argument("--output", type=Path, required=True, help="folder for the adapter and run")
    ap.add_argument("--max-steps", type=int, default=d.max_steps)
    ap.add_argument("--rank", type=int, default=d.rank)
    ap.add_argument("--targets", default=",".join(d.targets),
                    help=f"comma-separated mixer modules (default {','.join(d.targets)})")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--batch-size", type=int, default=d.batch_size,
                    help="global batch, split over the processes")
    ap.add_argument("--learning-rate", type=float, default=d.learning_rate)
    ap.add_argument("--eval-rows", type=int, default=None,
                    help="score exact match on the first N test rows only (default: all)")
    ap.add_argument("--resume", action="store_true", help="continue OUTPUT's training")
    ap.add_argument("--overwrite", action="store_true", help="delete OUTPUT and start again")
    return ap.parse_args(argv)


def settings_from(args) -> TrainSettings:
    d = TrainSettings()
    steps = args.max_steps
    return TrainSettings(max_steps=steps, rank=args.rank,
                         targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
                         seed=args.seed, batch_size=args.batch_size,
                         learning_rate=args.learning_rate,
                         warmup_steps=min(d.warmup_steps, steps // 10),
                         eval_steps=min(d.eval_steps, steps),
                         save_steps=min(d.save_steps, max(1, steps // 2)),
                         logging_steps=min(d.logging_steps, max(1, steps // 10)))


def run_record(args, settings: TrainSettings) -> dict:
    return {"model": args.model, "weights": args.weights, "quantization": args.quantization,
            "task": args.task, "settings": settings.as_dict()}


def check_output(args, record: dict) -> None:
    """Refuse what would lose or mix work; touch nothing in OUTPUT while deciding."""
    out = args.output
    if args.resume and args.overwrite:
        raise FinetuneError("--resume continues OUTPUT's training and --overwrite deletes it: "
                            f"pass one of them. {TROUBLE_RESUME}")
    if args.resume:
        ckpt = finetune.latest_checkpoint(out / "checkpoints")
        if ckpt is None:
            raise FinetuneError(f"--resume: {out / 'checkpoints'} holds no checkpoint to continue "
                                f"from; start without --resume. {TROUBLE_RESUME}")
        saved = json.loads((out / "run_args.json").read_text())
        diff = [f"{k}: {saved.get(k)!r} then, {record[k]!r} now"
                for k in RESUME_KEYS if saved.get(k) != record[k]]
        if diff:
            raise FinetuneError("--resume continues a run with the same settings (the same "
                                "--max-steps too); these differ: " + "; ".join(diff) +
                                f". {TROUBLE_RESUME}")
    elif out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FinetuneError(
            f"{out} exists and is not empty; nothing in it was changed. Pass --resume to "
            f"continue its training from its latest checkpoint, or --overwrite to delete it and "
            f"start again. {TROUBLE_RESUME}")


def check_processes(state: PartialState) -> None:
    """Refuse the silent single process of ``accelerate launch --cpu --num_processes N``."""
    asked = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") \
        and "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ
    if asked and state.num_processes == 1:
        raise FinetuneError(
            "`accelerate launch --cpu --num_processes N` started this one process only: on a CPU "
            "accelerate starts several through mpirun, given a hostfile (huggingface/accelerate"
            "#2741). On one machine use `torchrun --nproc_per_node N scripts/finetune_mamba.py "
            "...`; accelerate then joins the processes in one gloo group. See TROUBLESHOOTING.md, "
            "section 'Several processes on a CPU'.")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # cpu=True on a machine without CUDA: processes started by torchrun then join one gloo group.
    state = PartialState(cpu=not torch.cuda.is_available())
    settings = settings_from(args)
    record = run_record(args, settings)
    try:
        check_processes(state)
        if args.quantization and finetune.qlora_unavailable():
            raise FinetuneError(finetune.qlora_unavailable())
        finetune.validate_targets(settings.targets, models.get_config(args.model).model_type)
        check_output(args, record)  # every process, before any of them writes
    except FinetuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    state.wait_for_everyone()
    if state.is_main_process:
        if args.overwrite and args.output.exists():
            shutil.rmtree(args.output)
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / "run_args.json").write_text(json.dumps(record, indent=1) + "\n")
    state.wait_for_everyone()
    return train(args, settings, state)


def train(args, settings: TrainSettings, state: PartialState) -> int:
    device = state.device
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    set_seed(settings.seed)
    base, tok = load_base(args, dtype, device)
    spec = models.as_spec(args.model)
    base.name_or_path = spec.hub_id or spec.name  # what adapter_config.json names
    model = finetune.add_lora(base, finetune.lora_config(settings.rank, settings.targets))
    path = finetune.use_parallel_scan(model)
    with state.main_process_first():
        task = finetune.load_task(args.task)
        tokenized = finetune.tokenize_task(task, tok)
    targs = finetune.training_arguments(args.output / "checkpoints", settings,
                                        processes=state.num_processes,
                                        include_num_input_tokens_seen=True)
    trainer = finetune.make_trainer(model, tok, tokenized["train"], tokenized["test"], targs)
    resume = finetune.latest_checkpoint(args.output / "checkpoints") if args.resume else None
    if state.is_main_process:
        counts = finetune.trainable_by_module(model)
        print(f"{args.model} ({args.weights} weights, {dtype}) on {device}, {state.num_processes} "
              f"process(es); Mamba path: {path}; LoRA r={settings.rank} on "
              f"{','.join(settings.targets)}: {sum(counts.values()):,} trainable parameters "
              f"{counts}" + (f"; resuming from {resume}" if resume else ""), flush=True)
    bench.reset_peak_memory(device)
    start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - start
    peak = bench.peak_memory_bytes(device) if device.type == "cuda" else None
    trainer.save_model(str(args.output))
    if not state.is_main_process:
        return 0
    return report(args, settings, trainer, model, tok, task["test"], output.metrics, seconds,
                  path, state, peak)


def load_base(args, dtype, device):
    """The frozen base model and its tokenizer: as served (float32 on a CPU, bf16 on a GPU), or
    in 4-bit NF4 for QLoRA, prepared with PEFT's ``prepare_model_for_kbit_training``."""
    if not args.quantization:
        return tuple(models.load_model(args.model, weights=args.weights, dtype=dtype,
                                       device=str(device)))
    from peft import prepare_model_for_kbit_training

    with tempfile.TemporaryDirectory(prefix="finetune-4bit-") as workdir:
        model, tok = finetune.load_4bit(args.model, weights=args.weights, workdir=workdir)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False), tok


def report(args, settings, trainer, model, tok, test, metrics, seconds, path, state,
           peak) -> int:
    (args.output / "train_log.json").write_text(
        json.dumps(trainer.state.log_history, indent=1) + "\n")
    model = trainer.accelerator.unwrap_model(model)
    with model.disable_adapter():
        base = finetune.exact_match(model, tok, test, limit=args.eval_rows, progress=True,
                                    desc="exact match, base")
    tuned = finetune.exact_match(model, tok, test, limit=args.eval_rows, progress=True,
                                 desc="exact match, adapter")
    size = finetune.adapter_bytes(args.output)
    weights = finetune.base_weight_bytes(model)
    tokens = metrics.get("num_input_tokens_seen") or trainer.state.num_input_tokens_seen
    result = {
        **run_record(args, settings), "processes": state.num_processes,
        "device": str(state.device), "machine": _machine(state.device), "mamba_path": path,
        "train_seconds": round(seconds, 1), "train_metrics": metrics,
        "input_tokens_per_second": round(tokens / metrics["train_runtime"], 1) if tokens else None,
        "exact_match_base": base.score, "exact_match_adapter": tuned.score,
        "eval_rows": tuned.n, "adapter_bytes": size, "model_weight_bytes": weights,
        "peak_allocated_bytes": peak,
        "examples": [list(r) for r in tuned.rows[:5]],
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": _version("peft"), "accelerate": _version("accelerate"),
                     "datasets": _version("datasets"), "python": platform.python_version()}}
    (args.output / "run.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"trained {settings.max_steps} steps in {seconds:.1f} s "
          f"({metrics.get('train_steps_per_second', 0):.2f} steps/s"
          + (f", {result['input_tokens_per_second']:,.0f} input tokens/s (padding included)"
             if tokens else "") + f"); final train loss {_last(trainer, 'loss')}, "
          f"eval loss {_last(trainer, 'eval_loss')}")
    for line in tuned.examples(3):
        print("  " + line)
    if peak is not None:
        print(f"peak memory allocated while training: {plots.format_bytes(peak)} "
              "(torch.cuda.max_memory_allocated)")
    if args.weights == "random":
        print("random weights: the exact match below is meaningless; memory and speed are real")
    print(f"adapter: {args.output / 'adapter_model.safetensors'} and its config, {size:,} bytes "
          f"({size / weights:.1%} of the model's {weights:,} bytes of weights)")
    print(f"exact match: base {base.percent:.0f}% -> adapter {tuned.percent:.0f}% "
          f"({tuned.n} held-out rows)", flush=True)
    return 0


def _last(trainer, key: str) -> str:
    values = [e[key] for e in trainer.state.log_history if key in e]
    return f"{values[-1]:.4f}" if values else "n/a"


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _machine(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{plots.device_name('cpu')}, {torch.get_num_threads()} torch thread(s)"


if __name__ == "__main__":
    sys.exit(main())
