#!/usr/bin/env python
"""Train the course's tiny model zoo: tiny-mamba, tiny-transformer, tiny-moe and tiny-hybrid.

Every model sees the same tokens of the shipped corpus (``effarch.data.corpus_text("train")``,
documents separated by ``<|endoftext|>``), through the same tokenizer, with the same optimiser,
schedule, batch, sequence length and seed; everything comes from ``data/zoo/zoo_config.json``.
Each model is written to ``<out>/<name>/`` in bf16 safetensors with ``train_log.csv`` and
``train_meta.json`` beside it, only once its token budget is reached.

Typical use (one H200 trains all four in a few minutes; see the config's ``gpu_estimate``)::

    python scripts/train_zoo.py                       # all four into data/zoo
    python scripts/train_zoo.py --max-minutes 9       # stop cleanly with a checkpoint ...
    python scripts/train_zoo.py --resume --max-minutes 9   # ... and continue in the next command
    python scripts/train_zoo.py --smoke --device cpu  # tiny configs, a few steps, a temp folder

Mamba layers (tiny-mamba and the hybrid's) train through mambapy's parallel scan when mambapy
imports (much faster than transformers' sequential loop); the saved config says
``use_mambapy=False`` so that the labs meet transformers' default path and effarch's fast path
separately. ``train_meta.json`` records which path trained each model.

The pieces live in the library: settings, configs and the validation measurement in
``effarch.zoo`` (the same scorer as the labs', ``effarch.quality``), the sampler, optimiser,
training step, checkpoints and logs in ``effarch.training``. Run it from the repository's root
with ``effarch`` importable: installed (``make lab`` installs it) or ``PYTHONPATH=src``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from effarch import bench, data, paths, quality, training, zoo

CHECKPOINT = "checkpoint.pt"


class Run:
    """One model's training: what ``train_model`` carries between steps."""

    def __init__(self, name, settings, device, work: Path, sampler, val_ids):
        self.name, self.settings, self.device = name, settings, device
        self.work = work / name
        self.sampler, self.val_ids = sampler, val_ids
        self.cfg = zoo.build_config(name, settings)
        self.moe = zoo.is_moe(self.cfg)
        self.per_layer_aux = settings["models"][name].get("aux_loss", "pooled") == "per_layer"
        self.tokens_per_step = settings["batch_size"] * settings["seq_len"]
        self.total_steps = math.ceil(settings["train_tokens"] / self.tokens_per_step)
        transformers.set_seed(settings["seed"])
        self.model = AutoModelForCausalLM.from_config(self.cfg, dtype=torch.float32).to(device)
        self.mamba_path = training.set_mamba_path(self.model, use_mambapy=True)
        self.opt = training.make_optimizer(self.model, settings["optimizer"])
        self.sched = training.make_scheduler(self.opt, self.total_steps, settings["schedule"])
        self.step, self.elapsed = 0, 0.0
        self.fp = zoo.fingerprint(name, settings)
        self.experts_implementation: str | None = None

    def resume(self) -> bool:
        path = self.work / CHECKPOINT
        if not path.is_file():
            return False
        state = torch.load(path, map_location=self.device, weights_only=False)
        if state["fingerprint"] != self.fp:
            raise SystemExit(f"{path} was written with other settings (fingerprint "
                             f"{state['fingerprint']} != {self.fp}); start afresh without "
                             "--resume. See TROUBLESHOOTING.md, section "
                             "'Training and evaluating the zoo'.")
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.step, self.elapsed = state["step"], state["elapsed_s"]
        training.set_rng_states(state["rng"])
        return True

    def checkpoint(self) -> None:
        training.save_checkpoint(
            self.work / CHECKPOINT, model=self.model.state_dict(),
            optimizer=self.opt.state_dict(), scheduler=self.sched.state_dict(), step=self.step,
            elapsed_s=self.elapsed, rng=training.rng_states(), fingerprint=self.fp,
            name=self.name)

    def val_loss(self) -> float:
        """Mean NLL per token (nats) of the validation ids in windows of seq_len moving by
        seq_len - 1 (``val_batches`` batches of them when set: smoke runs)."""
        s = self.settings
        window, stride = s["seq_len"], s["seq_len"] - 1
        ids = self.val_ids
        if s.get("val_batches"):
            ids = ids[:, :(s["val_batches"] * s["batch_size"] - 1) * stride + window]
        with training.autocast(self.device):
            res = quality.sliding_window_perplexity(self.model, ids, max_length=window,
                                                    stride=stride, batch_size=s["batch_size"])
        return res.nll_per_token

    def train_step(self) -> tuple[float, float | None]:
        """One optimiser step; returns (cross-entropy, auxiliary loss or None)."""
        x = self.sampler.batch(self.step).to(self.device, non_blocking=True)  # (b, l)
        losses = training.train_step(self.model, self.opt, self.sched, x,
                                     grad_clip=self.settings["optimizer"]["grad_clip"],
                                     per_layer_aux=self.per_layer_aux)
        self.step += 1
        return losses


def _probe(run: Run) -> None:
    x = run.sampler.batch(0)[:2, :32].to(run.device)  # (2, 32)
    extra = {"output_router_logits": True} if run.moe else {}
    with training.autocast(run.device):
        out = run.model(input_ids=x, labels=x, use_cache=False, **extra)
    out.loss.backward()
    run.model.zero_grad(set_to_none=True)


def ensure_trainable(run: Run) -> str | None:
    """One small forward and backward before training. transformers 5 runs MoE experts through
    ``grouped_mm`` by default, whose CUDA kernels expect bf16; where it rejects the float32
    master weights, fall back to the eager loop over experts (same numbers, slower) and say so.
    Returns the experts implementation in use (None for dense models)."""
    impl = getattr(run.model.config, "_experts_implementation", None) if run.moe else None
    try:
        _probe(run)
    except (RuntimeError, NotImplementedError) as e:
        if not run.moe or impl == "eager":
            raise
        print(f"{run.name}: the '{impl}' experts path failed here ({type(e).__name__}: "
              f"{str(e)[:200]}); falling back to experts_implementation='eager'", flush=True)
        run.model.set_experts_implementation("eager")
        impl = "eager"
        _probe(run)
    return impl


def train_model(run: Run, deadline: float, stop_after: int | None) -> bool:
    """Train until the token budget is reached (True) or the deadline passes (False; checkpoint
    written). Logs go to the work folder and are copied next to the model at the end."""
    s = run.settings
    log_path = run.work / "train_log.csv"
    if run.step == 0:
        run.work.mkdir(parents=True, exist_ok=True)
        log_path.unlink(missing_ok=True)
    else:  # drop rows a killed run logged after its last checkpoint
        rows = [r for r in training.read_log(log_path) if int(r["step"]) <= run.step]
        log_path.unlink(missing_ok=True)
        training.append_log(log_path, rows)
    pending: list[dict] = []
    last_ckpt = time.time()
    bar = tqdm(total=run.total_steps, initial=run.step, desc=run.name, unit="step",
               mininterval=1.0 if sys.stderr.isatty() else 20.0, dynamic_ncols=True)
    run.model.train()
    while run.step < run.total_steps:
        t0 = time.time()
        lr = run.sched.get_last_lr()[0]
        loss, aux = run.train_step()
        if not math.isfinite(loss):
            raise FloatingPointError(f"{run.name}: loss {loss} at step {run.step}. See "
                                     "TROUBLESHOOTING.md, section "
                                     "'Training and evaluating the zoo'.")
        bench.synchronize(run.device)
        dt = time.time() - t0
        run.elapsed += dt
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{run.tokens_per_step / dt:,.0f}")
        val = None
        if run.step % s["eval_interval_steps"] == 0 or run.step == run.total_steps:
            t1 = time.time()
            val = run.val_loss()
            run.elapsed += time.time() - t1
            bar.write(f"{run.name} step {run.step}/{run.total_steps} train {loss:.3f} "
                      f"val {val:.3f} ({val / math.log(2):.3f} bits/token)")
        if run.step % s["log_interval_steps"] == 0 or val is not None:
            pending.append(dict(step=run.step, tokens=run.step * run.tokens_per_step,
                                train_loss=f"{loss:.5f}",
                                aux_loss="" if aux is None else f"{aux:.5f}",
                                val_loss="" if val is None else f"{val:.5f}", lr=f"{lr:.6g}",
                                elapsed_s=f"{run.elapsed:.2f}"))
        stop = time.time() > deadline or (stop_after is not None and run.step >= stop_after)
        due = time.time() - last_ckpt > 60 * s.get("checkpoint_minutes", 2.0)
        if run.step < run.total_steps and (stop or due):
            training.append_log(log_path, pending)
            pending = []
            run.checkpoint()
            last_ckpt = time.time()
            if stop:
                bar.close()
                print(f"{run.name}: stopped at step {run.step}/{run.total_steps} with a "
                      f"checkpoint in {run.work}; continue with --resume", flush=True)
                return False
    training.append_log(log_path, pending)
    bar.close()
    return True


def save_final(run: Run, out_dir: Path, tokenizer) -> dict:
    """bf16 safetensors + config + generation config, the log and the metadata."""
    s, dev = run.settings, run.device
    res = zoo.score_text(run.model, tokenizer, zoo.validation_text(s.get("val_chars")),
                         window=s["final_eval"]["window"], stride=s["final_eval"]["stride"],
                         batch_size=s["batch_size"])
    target = out_dir / run.name
    model = training.save_model(run.model, target)
    log_rows = training.read_log(run.work / "train_log.csv")
    with (target / "train_log.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=training.LOG_FIELDS)
        w.writeheader()
        w.writerows(log_rows)
    last_val = next((float(r["val_loss"]) for r in reversed(log_rows) if r["val_loss"]), None)
    meta = dict(
        name=run.name, model_type=run.cfg.model_type,
        tokens_trained=run.step * run.tokens_per_step, steps=run.step,
        epochs=round(run.sampler.epochs(run.step), 3), wall_time_s=round(run.elapsed, 1),
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor()
        or platform.machine(),
        precision="bf16 autocast" if dev.type == "cuda" else "float32",
        saved_dtype="bfloat16", mamba_path_in_training=run.mamba_path,
        experts_implementation=run.experts_implementation,
        torch=torch.__version__, transformers=transformers.__version__,
        python=platform.python_version(), params=zoo.param_report(run.cfg),
        final_val_loss=last_val, validation=zoo.validation_summary(res), smoke=s["smoke"],
        seed=s["seed"], fingerprint=run.fp,
        settings={k: s[k] for k in ("seq_len", "batch_size", "train_tokens", "optimizer",
                                    "schedule", "router_aux_loss_coef")})
    (target / "train_meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    meta["reload_max_abs_diff"] = check_reload(model, target, run.experts_implementation)
    return meta


def check_reload(saved_model, target: Path, experts_implementation: str | None) -> float:
    """Reload what was written and compare logits with the bf16 model that was saved.

    Same weights; kernels differ (TF32 on a GPU, and a router's top-k can flip on a near-tie),
    so a large difference is reported, and only a broken file (NaN, wild logits) stops the run."""
    diff = training.reload_difference(saved_model, target,
                                      experts_implementation=experts_implementation)
    if not diff < 1.0:
        raise RuntimeError(f"{target}: reloaded logits differ by {diff}")
    if diff > 1e-3:
        print(f"{target.name}: reloaded logits differ by up to {diff:.2e} (kernel differences)")
    return diff


def print_table(metas: list[dict]) -> None:
    head = (f"{'model':18s} {'total':>10s} {'active':>10s} {'tokens':>12s} {'wall s':>8s} "
            f"{'val loss':>9s} {'bits/byte':>9s}")
    print(head)
    print("-" * len(head))
    for m in metas:
        p = m["params"]
        print(f"{m['name']:18s} {p['total']:>10,d} {p['active']:>10,d} {m['tokens_trained']:>12,d} "
              f"{m['wall_time_s']:>8.1f} {m['final_val_loss'] or float('nan'):>9.4f} "
              f"{m['validation']['bits_per_byte']:>9.4f}")


# --- command line -------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", help="comma-separated model names (tiny-mamba or mamba, ...)")
    p.add_argument("--out", type=Path, help="where finished models go (default data/zoo; "
                   "--smoke: a temporary folder)")
    p.add_argument("--work", type=Path, help="checkpoints, logs and the token cache "
                   "(default runs/zoo, git-ignored; --smoke: inside --out)")
    p.add_argument("--config", type=Path, default=None,
                   help="the settings (default data/zoo/zoo_config.json)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the last checkpoints; models already finished are skipped")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop cleanly with a checkpoint after this many minutes of this command")
    p.add_argument("--stop-after-steps", type=int, default=None,
                   help="stop each model with a checkpoint at this step (tests of --resume)")
    p.add_argument("--smoke", action="store_true", help="tiny configs, a few steps (CPU tests)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if any)")
    p.add_argument("--time-steps", type=int, default=None, metavar="N",
                   help="only time N training steps per model (after 2 warm-up steps) and "
                        "project the full run's minutes; writes nothing")
    return p.parse_args(argv)


def time_steps(run: Run, n: int) -> dict:
    """Seconds per training step (median of ``n`` after 2 warm-up steps) and the projection."""
    run.model.train()
    per_step = bench.time_fn(run.train_step, warmup=2, repeats=n, device=run.device).median
    per_eval = bench.time_fn(run.val_loss, warmup=0, repeats=1, device=run.device).median
    evals = run.total_steps // run.settings["eval_interval_steps"] + 1
    minutes = (run.total_steps * per_step + evals * per_eval) / 60
    print(f"{run.name:18s} {per_step * 1000:8.1f} ms/step {run.tokens_per_step / per_step:>11,.0f} "
          f"tok/s  -> {run.total_steps} steps + {evals} evals ~ {minutes:.2f} min", flush=True)
    return dict(s_per_step=per_step, minutes=minutes)


def main(argv=None) -> dict:
    """Train the selected models; returns {name: {"meta", "finished"}}."""
    args = parse_args(argv)
    if args.smoke:  # tiny matrices: one thread beats several on a shared CPU
        torch.set_num_threads(1)
    start = time.time()
    settings = zoo.load_settings(args.config, smoke=args.smoke)
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="zoo-smoke-")) if args.smoke else paths.zoo_dir()
    if args.work is None:
        args.work = args.out / "_work" if args.smoke else paths.repo_root() / "runs" / "zoo"
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    try:
        names = zoo.model_names(args.only)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if not training.mambapy_available() and any(
            settings["models"][n]["model_type"] in ("mamba", "jamba") for n in names):
        warnings.warn("mambapy is not importable: Mamba layers train through transformers' "
                      "sequential loop (use_mambapy=False), ~20x slower. Install the pure-"
                      "Python wheel (pip install --no-deps mambapy) to train at full speed.",
                      stacklevel=1)
    print(f"train_zoo: {', '.join(names)} on {device}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, mambapy "
          f"{'yes' if training.mambapy_available() else 'NO'}; out {args.out}, work {args.work}",
          flush=True)
    tokenizer, sampler, val_ids = prepare_data(settings, args.work)
    if args.time_steps:
        return time_all(names, settings, device, args, sampler, val_ids)
    results = {name: train_one(name, settings, device, args, tokenizer, sampler, val_ids,
                               deadline=start + 60 * args.max_minutes if args.max_minutes
                               else float("inf"))
               for name in names}
    metas = [r["meta"] for r in results.values() if r["meta"]]
    if metas:
        print_table(metas)
    left = [n for n, r in results.items() if not r["finished"]]
    if left:
        print(f"unfinished: {', '.join(left)} — rerun with --resume", flush=True)
    print(f"train_zoo: {time.time() - start:.0f} s", flush=True)
    return results


def prepare_data(settings: dict, work: Path):
    """The tokenizer, the sampler over the train split and the validation ids (1, N)."""
    tokenizer = data.load_tokenizer()
    if len(tokenizer) > settings["vocab_size"]:
        raise SystemExit(f"the tokenizer has {len(tokenizer)} tokens but zoo_config.json says "
                         f"vocab_size {settings['vocab_size']}. See TROUBLESHOOTING.md, "
                         "section 'Training and evaluating the zoo'.")
    tokens = training.train_tokens(tokenizer, work / "tokens",
                                   max_chars=settings.get("train_chars"))
    sampler = training.WindowSampler(tokens, settings["seq_len"], settings["batch_size"],
                                     settings["seed"])
    val_ids = quality.text_ids(tokenizer, zoo.validation_text(settings.get("val_chars")))
    print(f"train split: {len(tokens):,} tokens ({sampler.per_epoch:,} windows of "
          f"{settings['seq_len']}); validation: {val_ids.shape[1] - 1:,} tokens", flush=True)
    return tokenizer, sampler, val_ids


def time_all(names, settings, device, args, sampler, val_ids) -> dict:
    """--time-steps: each model's step time and the projected minutes; writes nothing."""
    results = {}
    for name in names:
        run = Run(name, settings, device, args.work, sampler, val_ids)
        run.experts_implementation = ensure_trainable(run)
        results[name] = time_steps(run, args.time_steps)
    total = sum(r["minutes"] for r in results.values())
    print(f"projected training time: {total:.1f} min (+ start-up, final evaluation, saving)")
    return results


def train_one(name, settings, device, args, tokenizer, sampler, val_ids, *,
              deadline: float) -> dict:
    """Train (or skip, or resume) one model; {"meta": train_meta or None, "finished": bool}."""
    fp = zoo.fingerprint(name, settings)
    done = zoo.finished(args.out, name, fp) if args.resume else None
    if done:
        print(f"{name}: already trained ({args.out / name}); skipped", flush=True)
        return dict(meta=done, finished=True)
    if time.time() > deadline:
        print(f"{name}: not started, --max-minutes reached", flush=True)
        return dict(meta=None, finished=False)
    run = Run(name, settings, device, args.work, sampler, val_ids)
    resumed = args.resume and run.resume()
    pc = zoo.param_report(run.cfg)
    print(f"{name}: {pc['total']:,} parameters ({pc['active']:,} active), "
          f"{run.total_steps} steps of {run.tokens_per_step:,} tokens = "
          f"{sampler.epochs(run.total_steps):.2f} epochs; Mamba path: {run.mamba_path}"
          + (f"; resumed at step {run.step}" if resumed else ""), flush=True)
    run.experts_implementation = ensure_trainable(run)
    complete = train_model(run, deadline, args.stop_after_steps)
    meta = save_final(run, args.out, tokenizer) if complete else None
    if meta:
        print(f"{name}: saved to {args.out / name} (val {meta['final_val_loss']:.4f} nats/"
              f"token, {meta['validation']['bits_per_byte']:.4f} bits/byte; reload check "
              f"max |Δlogit| {meta['reload_max_abs_diff']:.2g})", flush=True)
    return dict(meta=meta, finished=complete)


if __name__ == "__main__":
    main()
