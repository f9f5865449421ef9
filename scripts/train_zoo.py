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
imports (FACTS.md: ~20x faster than transformers' sequential loop); the saved config says
``use_mambapy=False`` so that the labs meet transformers' default path and effarch's fast path
separately. ``train_meta.json`` records which path trained each model.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import hashlib
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # runs from a plain checkout (the GPU machine) too
    sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, GenerationConfig  # noqa: E402

from effarch import bench, data, memory, models, paths, profile  # noqa: E402

CONFIG_FILE = ROOT / "data" / "zoo" / "zoo_config.json"
NAMES = models.ZOO_NAMES
TRAIN_ORDER = ("tiny-transformer", "tiny-moe", "tiny-hybrid", "tiny-mamba")  # fastest first
LOG_FIELDS = ("step", "tokens", "train_loss", "aux_loss", "val_loss", "lr", "elapsed_s")
CHECKPOINT = "checkpoint.pt"


# --- settings and model configs ------------------------------------------------------------


def load_settings(path: Path = CONFIG_FILE, smoke: bool = False) -> dict:
    """The training settings; with ``smoke`` the ``smoke`` block replaces sizes and budget."""
    settings = json.loads(Path(path).read_text(encoding="utf-8"))
    smoke_block = settings.pop("smoke", {})
    settings["smoke"] = smoke
    if not smoke:
        return settings
    for key, value in smoke_block.items():
        if key == "model_overrides":
            for name, over in value.items():
                settings["models"][name]["config"].update(over)
        elif isinstance(value, dict) and isinstance(settings.get(key), dict):
            settings[key] = {**settings[key], **value}
        elif not key.startswith("_"):
            settings[key] = value
    return settings


def build_config(name: str, settings: dict):
    """The transformers config of a zoo model as it is saved (``use_mambapy=False``)."""
    spec = settings["models"][name]
    special = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)  # <|endoftext|> (data.py)
    kw = dict(spec["config"], vocab_size=settings["vocab_size"], **special)
    if spec["model_type"] in ("mixtral", "jamba"):
        kw["router_aux_loss_coef"] = settings["router_aux_loss_coef"]
    if spec["model_type"] in ("mamba", "jamba"):
        kw["use_mambapy"] = False
    return CONFIG_MAPPING[spec["model_type"]](**kw)


def is_moe(cfg) -> bool:
    return cfg.model_type in ("mixtral", "jamba")


def param_report(cfg) -> dict:
    """Total / active / embedding parameters by formula (effarch.memory) and bf16 bytes."""
    pc = memory.count_params(cfg)
    return dict(total=pc.total, active=pc.active, embedding=pc.embedding, bf16_bytes=2 * pc.total)


def fingerprint(name: str, settings: dict) -> str:
    """What a checkpoint must match to be resumed: the model's and the run's settings."""
    keep = {k: v for k, v in settings.items()
            if k not in ("models", "gpu_estimate", "_comment", "checkpoint_minutes")}
    blob = json.dumps([settings["models"][name], keep], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --- Mamba path ---------------------------------------------------------------------------


def mambapy_available() -> bool:
    try:
        import mambapy.pscan  # noqa: F401
    except ImportError:
        return False
    return True


def set_mamba_path(model, use_mambapy: bool) -> str | None:
    """Switch every Mamba mixer to mambapy's scan (or back); the config is left as saved.

    Returns the path that runs now for a full sequence, or None when the model has no Mamba
    layers. Without mamba-ssm transformers calls its PyTorch reference, which runs mambapy's
    ``pscan`` when ``mixer.use_mambapy`` is set and mambapy imports, else a loop over the sequence.
    """
    mixers = [m for m in bench.mamba_mixers(model) if hasattr(m, "use_mambapy")]
    if not mixers:
        return None
    on = use_mambapy and mambapy_available()
    for m in mixers:
        m.use_mambapy = on
    return bench.mamba_path(model)  # mamba-ssm's kernels, when installed, win over both


# --- data ---------------------------------------------------------------------------------


def train_tokens(tokenizer, cache_dir: Path, max_chars: int | None = None) -> np.ndarray:
    """Token ids of the train split, documents separated by <|endoftext|>, cached as .npy."""
    docs = data.corpus_domains("train")
    texts = [d.text for d in docs]
    if max_chars:  # smoke mode: the first documents only
        kept, n = [], 0
        for t in texts:
            if n >= max_chars:
                break
            kept.append(t)
            n += len(t)
        texts = kept
    key = hashlib.sha256()
    key.update(Path(data.tokenizer_dir() / "tokenizer.json").read_bytes())
    for t in texts:
        key.update(t.encode("utf-8"))
    path = Path(cache_dir) / f"train-{key.hexdigest()[:16]}.npy"
    if path.is_file():
        return np.load(path)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)
    arr = np.asarray(ids, dtype=np.uint16 if tokenizer.vocab_size <= 65536 else np.int32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)
    return arr


def validation_text(max_chars: int | None = None) -> str:
    text = data.corpus_text("validation")
    return text[:max_chars] if max_chars else text


class WindowSampler:
    """Batches of ``seq_len`` windows, a pure function of (seed, step): resuming needs no state.

    Epoch e starts at a random offset in [0, seq_len) and visits its windows in a random order,
    so every token is seen about equally often (seq_len < windows per epoch)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int):
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.per_epoch = (len(tokens) - seq_len) // seq_len
        if self.per_epoch < batch_size:
            raise ValueError(f"{len(tokens)} tokens are too few for batches of {batch_size} x "
                             f"{seq_len}")
        self._epoch, self._order = -1, None

    def _epoch_order(self, epoch: int) -> tuple[int, np.ndarray]:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch, self._order = epoch, (int(rng.integers(self.seq_len)),
                                               rng.permutation(self.per_epoch))
        return self._order

    def batch(self, step: int) -> torch.Tensor:
        rows = []
        for i in range(step * self.batch_size, (step + 1) * self.batch_size):
            offset, order = self._epoch_order(i // self.per_epoch)
            start = offset + int(order[i % self.per_epoch]) * self.seq_len
            rows.append(self.tokens[start:start + self.seq_len].astype(np.int64))
        return torch.from_numpy(np.stack(rows))  # (b, l)

    def epochs(self, steps: int) -> float:
        return steps * self.batch_size / self.per_epoch


# --- evaluation ---------------------------------------------------------------------------


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()  # float32 on the CPU


def scoring_windows(n: int, window: int, stride: int) -> list[tuple[int, int]]:
    """(start, first scored position) of the windows that score positions 1..n-1 of a stream
    once each; every window but a short stream's only one is ``window`` long."""
    if not 0 < stride < window:
        raise ValueError(f"need 0 < stride < window (a window's first token is context only), "
                         f"got stride={stride}, window={window}")
    if n <= window:
        return [(0, 1)]
    out, scored_to = [], 1
    start = 0
    while scored_to < n:
        start = min(start, n - window)
        out.append((start, scored_to))
        scored_to = start + window
        start += stride
    return out


@torch.no_grad()
def stream_nll(model, ids: torch.Tensor, *, window: int, stride: int, batch_size: int,
               device: torch.device, max_batches: int | None = None,
               routes: list | None = None) -> tuple[float, int]:
    """Summed NLL (nats, float32) and the number of scored tokens of ``ids`` (n,), windows of
    ``window`` tokens moving by ``stride`` < ``window``; each position 1..n-1 is scored once.
    Position 0 is context only: put ``<|endoftext|>`` there to score a whole text. Logits at t
    predict t + 1 (float32 CE, never ``out.loss``, which for MoE models includes the router's
    auxiliary loss).

    With ``routes`` (a list, MoE models only) the routers' top-k choices for input positions
    0..n-2, each taken from the window that scores its prediction, are appended to it as one
    (n-1, k) int array per MoE layer (``output_router_logits=True``: (b·w, E) per layer).
    """
    was_training = model.training
    model.eval()
    wins = scoring_windows(len(ids), window, stride)
    total, count = 0.0, 0
    picked: list[list[torch.Tensor]] = []
    for b, first in enumerate(range(0, len(wins), batch_size)):
        if max_batches is not None and b >= max_batches:
            break
        group = wins[first:first + batch_size]
        length = min(window, len(ids))
        x = torch.stack([ids[s:s + length] for s, _ in group]).to(device)  # (b, w)
        extra = {"output_router_logits": True} if routes is not None else {}
        with autocast(device):
            out = model(input_ids=x, use_cache=False, **extra)
        logits = out.logits[:, :-1]  # (b, w-1, V)
        target = x[:, 1:].clone()  # (b, w-1)
        for row, (s, scored_from) in enumerate(group):
            target[row, : scored_from - s - 1] = -100  # context already scored
        if routes is not None:
            k = model.config.num_experts_per_tok
            layers = [r.float().reshape(len(group), length, -1) for r in out.router_logits]
            picked.extend([lay[row, scored_from - s - 1:length - 1].topk(k).indices.cpu()
                           for lay in layers] for row, (s, scored_from) in enumerate(group))
        nll = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                target.reshape(-1), ignore_index=-100,
                                                reduction="sum")
        total += float(nll)
        count += int((target != -100).sum())
    model.train(was_training)
    if routes is not None and picked:
        routes.extend(torch.cat([w[i] for w in picked]).numpy() for i in range(len(picked[0])))
    return total, count


def text_ids(tokenizer, text: str) -> torch.Tensor:
    """``<|endoftext|>`` followed by the text's tokens: (n,) int64."""
    return torch.tensor([tokenizer.eos_token_id]
                        + tokenizer(text, add_special_tokens=False)["input_ids"])


def text_bits_per_byte(model, tokenizer, text: str, *, window: int, stride: int,
                       batch_size: int, device: torch.device, routes: list | None = None,
                       ids: torch.Tensor | None = None) -> dict:
    """Bits per UTF-8 byte of the whole ``text``: every token scored once (the first after
    ``<|endoftext|>``), total nats / ln 2 / bytes. ``routes``: see `stream_nll`."""
    if ids is None:
        ids = text_ids(tokenizer, text)
    nll, n = stream_nll(model, ids, window=window, stride=stride, batch_size=batch_size,
                        device=device, routes=routes)
    n_bytes = len(text.encode("utf-8"))
    return dict(nll_per_token=nll / n, tokens=n, bytes=n_bytes,
                bits_per_byte=bench.bits_per_byte(nll / n, n, n_bytes), window=window, stride=stride)


# --- checkpoints --------------------------------------------------------------------------


def rng_states() -> dict:
    return dict(python=random.getstate(), numpy=np.random.get_state(),
                torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_states(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(path: Path, **state) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a run killed mid-write leaves the previous checkpoint intact


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def append_log(path: Path, rows: list[dict]) -> None:
    new = not path.is_file()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        if new:
            w.writeheader()
        w.writerows(rows)


# --- training -----------------------------------------------------------------------------


def make_optimizer(model, opt: dict) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        # matrices decay; norms, biases and Mamba's A_log and D do not (mamba-ssm's _no_weight_decay)
        keep = p.dim() < 2 or name.endswith("A_log") or name.endswith(".D")
        (no_decay if keep else decay).append(p)
    groups = [dict(params=decay, weight_decay=opt["weight_decay"]),
              dict(params=no_decay, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=opt["lr"], betas=tuple(opt["betas"]), eps=opt["eps"])


def lr_lambda(total_steps: int, warmup: int, min_ratio: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


class Run:
    """One model's training: what ``train_model`` carries between steps."""

    def __init__(self, name, settings, device, work: Path, tokenizer, sampler, val_ids, args):
        self.name, self.settings, self.device, self.args = name, settings, device, args
        self.work = work / name
        self.tokenizer, self.sampler, self.val_ids = tokenizer, sampler, val_ids
        self.cfg = build_config(name, settings)
        self.moe = is_moe(self.cfg)
        self.tokens_per_step = settings["batch_size"] * settings["seq_len"]
        self.total_steps = math.ceil(settings["train_tokens"] / self.tokens_per_step)
        transformers.set_seed(settings["seed"])
        self.model = AutoModelForCausalLM.from_config(self.cfg, dtype=torch.float32).to(device)
        self.mamba_path = set_mamba_path(self.model, use_mambapy=True)
        self.opt = make_optimizer(self.model, settings["optimizer"])
        sch = settings["schedule"]
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_lambda(self.total_steps, sch["warmup_steps"], sch["min_lr_ratio"]))
        self.step, self.elapsed = 0, 0.0
        self.fp = fingerprint(name, settings)
        self.experts_implementation: str | None = None

    def resume(self) -> bool:
        path = self.work / CHECKPOINT
        if not path.is_file():
            return False
        state = torch.load(path, map_location=self.device, weights_only=False)
        if state["fingerprint"] != self.fp:
            raise SystemExit(f"{path} was written with other settings (fingerprint "
                             f"{state['fingerprint']} != {self.fp}); start afresh without --resume")
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.step, self.elapsed = state["step"], state["elapsed_s"]
        set_rng_states(state["rng"])
        return True

    def checkpoint(self) -> None:
        save_checkpoint(self.work / CHECKPOINT, model=self.model.state_dict(),
                        optimizer=self.opt.state_dict(), scheduler=self.sched.state_dict(),
                        step=self.step, elapsed_s=self.elapsed, rng=rng_states(),
                        fingerprint=self.fp, name=self.name)

    def val_loss(self) -> float:
        s = self.settings
        nll, n = stream_nll(self.model, self.val_ids, window=s["seq_len"],
                            stride=s["seq_len"] - 1, batch_size=s["batch_size"], device=self.device,
                            max_batches=s.get("val_batches"))
        return nll / n

    def train_step(self) -> tuple[float, float | None]:
        """One optimiser step; returns (cross-entropy, auxiliary loss or None)."""
        x = self.sampler.batch(self.step).to(self.device, non_blocking=True)  # (b, l)
        extra = {"output_router_logits": True} if self.moe else {}
        with autocast(self.device):
            out = self.model(input_ids=x, labels=x, use_cache=False, **extra)
        ce, aux = out.loss, None
        if self.moe:  # out.loss = CE + coef * aux (Mixtral/Jamba ForCausalLM)
            coef = self.cfg.router_aux_loss_coef
            ce = out.loss - coef * out.aux_loss
            aux = self.aux_loss(out)
        loss = ce if aux is None else ce + self.cfg.router_aux_loss_coef * aux
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                       self.settings["optimizer"]["grad_clip"])
        self.opt.step()
        self.sched.step()
        self.step += 1
        return ce.item(), None if aux is None else aux.item()

    def aux_loss(self, out) -> torch.Tensor:
        """The load-balancing loss: transformers' own (``out.aux_loss``: f and P pooled over all
        MoE layers, so one layer's dead experts can hide behind another's busy ones), or with
        ``"aux_loss": "per_layer"`` in the model's entry of zoo_config.json the same function
        applied to each layer and averaged (Switch Transformer's per-layer form; 2.0 = uniform
        top-2 either way)."""
        if self.settings["models"][self.name].get("aux_loss", "pooled") == "pooled":
            return out.aux_loss
        lb = sys.modules[type(self.model).__module__].load_balancing_loss_func
        e, k = self.cfg.num_local_experts if self.cfg.model_type == "mixtral" \
            else self.cfg.num_experts, self.cfg.num_experts_per_tok
        return torch.stack([lb((g,), e, k) for g in out.router_logits]).mean()


def _probe(run: Run) -> None:
    x = run.sampler.batch(0)[:2, :32].to(run.device)  # (2, 32)
    extra = {"output_router_logits": True} if run.moe else {}
    with autocast(run.device):
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
        rows = [r for r in read_log(log_path) if int(r["step"]) <= run.step]
        log_path.unlink(missing_ok=True)
        append_log(log_path, rows)
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
            raise FloatingPointError(f"{run.name}: loss {loss} at step {run.step}")
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
            append_log(log_path, pending)
            pending = []
            run.checkpoint()
            last_ckpt = time.time()
            if stop:
                bar.close()
                print(f"{run.name}: stopped at step {run.step}/{run.total_steps} with a "
                      f"checkpoint in {run.work}; continue with --resume", flush=True)
                return False
    append_log(log_path, pending)
    bar.close()
    return True


def save_final(run: Run, out_dir: Path) -> dict:
    """bf16 safetensors + config + generation config, the log and the metadata."""
    s, dev = run.settings, run.device
    val = text_bits_per_byte(run.model, run.tokenizer, validation_text(s.get("val_chars")),
                             window=s["final_eval"]["window"], stride=s["final_eval"]["stride"],
                             batch_size=s["batch_size"], device=dev, ids=run.val_ids)
    target = out_dir / run.name
    target.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(run.model).to("cpu", torch.bfloat16)
    set_mamba_path(model, use_mambapy=False)
    model.config.use_cache = True
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model.save_pretrained(target)  # transformers 5 writes safetensors only
    log_rows = read_log(run.work / "train_log.csv")
    with (target / "train_log.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LOG_FIELDS)
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
        python=platform.python_version(), params=param_report(run.cfg),
        final_val_loss=last_val, validation=val, smoke=s["smoke"], seed=s["seed"],
        fingerprint=run.fp, settings={k: s[k] for k in ("seq_len", "batch_size", "train_tokens",
                                                        "optimizer", "schedule",
                                                        "router_aux_loss_coef")})
    (target / "train_meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    meta["reload_max_abs_diff"] = check_reload(model, target, run.experts_implementation)
    return meta


@torch.no_grad()
def check_reload(saved_model, target: Path, experts_implementation: str | None = None) -> float:
    """Reload what was written and compare logits with the bf16 model that was saved."""
    dev = next(saved_model.parameters()).device
    reloaded = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).to(dev)
    if experts_implementation == "eager":  # the path that worked in training (ensure_trainable)
        reloaded.set_experts_implementation("eager")
    x = (torch.arange(1, 33).reshape(1, 32) % saved_model.config.vocab_size).to(dev)
    a = saved_model.float().eval()(input_ids=x, use_cache=False).logits
    b = reloaded.eval()(input_ids=x, use_cache=False).logits
    diff = float((a - b).abs().max())
    # Same weights; kernels differ (TF32 on a GPU, and a router's top-k can flip on a near-tie),
    # so a large difference is reported, and only a broken file (NaN, wild logits) stops the run.
    if not diff < 1.0:
        raise RuntimeError(f"{target}: reloaded logits differ by {diff}")
    if diff > 1e-3:
        print(f"{target.name}: reloaded logits differ by up to {diff:.2e} (kernel differences)")
    return diff


def finished(out_dir: Path, name: str, fp: str) -> dict | None:
    path = out_dir / name / "train_meta.json"
    if not path.is_file() or not (out_dir / name / "model.safetensors").is_file():
        return None
    meta = json.loads(path.read_text(encoding="utf-8"))
    return meta if meta.get("fingerprint") == fp else None


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
    p.add_argument("--config", type=Path, default=CONFIG_FILE)
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


def select(only: str | None) -> list[str]:
    """The models to train, fastest first (a run cut short by --max-minutes finishes most)."""
    if not only:
        return list(TRAIN_ORDER)
    names = set()
    for n in only.split(","):
        n = n.strip()
        full = n if n.startswith("tiny-") else f"tiny-{n}"
        if full not in NAMES:
            raise SystemExit(f"unknown model {n!r}; choose from {', '.join(NAMES)}")
        names.add(full)
    return [n for n in TRAIN_ORDER if n in names]


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
    """Train the selected models; returns {name: {"meta", "model", "finished"}} for tests."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.smoke:  # tiny matrices: one thread beats several on a shared CPU
        torch.set_num_threads(1)
    try:
        return _main(args)
    finally:
        torch.set_num_threads(threads)


def _main(args: argparse.Namespace) -> dict:
    start = time.time()
    deadline = start + 60 * args.max_minutes if args.max_minutes else float("inf")
    settings = load_settings(args.config, smoke=args.smoke)
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="zoo-smoke-")) if args.smoke else paths.zoo_dir()
    if args.work is None:
        args.work = args.out / "_work" if args.smoke else ROOT / "runs" / "zoo"
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    names = select(args.only)
    if not mambapy_available() and any(
            settings["models"][n]["model_type"] in ("mamba", "jamba") for n in names):
        warnings.warn("mambapy is not importable: Mamba layers train through transformers' "
                      "sequential loop (use_mambapy=False), ~20x slower. Install the pure-"
                      "Python wheel (pip install --no-deps mambapy) to train at full speed.",
                      stacklevel=1)
    tokenizer = data.load_tokenizer()
    if len(tokenizer) > settings["vocab_size"]:
        raise SystemExit(f"the tokenizer has {len(tokenizer)} tokens but zoo_config.json says "
                         f"vocab_size {settings['vocab_size']}")
    print(f"train_zoo: {', '.join(names)} on {device}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, mambapy {'yes' if mambapy_available() else 'NO'}; "
          f"out {args.out}, work {args.work}", flush=True)
    tokens = train_tokens(tokenizer, args.work / "tokens", settings.get("train_chars"))
    sampler = WindowSampler(tokens, settings["seq_len"], settings["batch_size"], settings["seed"])
    val_ids = text_ids(tokenizer, validation_text(settings.get("val_chars")))
    print(f"train split: {len(tokens):,} tokens ({sampler.per_epoch:,} windows of "
          f"{settings['seq_len']}); validation: {len(val_ids) - 1:,} tokens", flush=True)
    results: dict = {}
    if args.time_steps:
        for name in names:
            run = Run(name, settings, device, args.work, tokenizer, sampler, val_ids, args)
            run.experts_implementation = ensure_trainable(run)
            results[name] = time_steps(run, args.time_steps)
        total = sum(r["minutes"] for r in results.values())
        print(f"projected training time: {total:.1f} min (+ start-up, final evaluation, saving)")
        return results
    for name in names:
        fp = fingerprint(name, settings)
        done = finished(args.out, name, fp) if args.resume else None
        if done:
            print(f"{name}: already trained ({args.out / name}); skipped", flush=True)
            results[name] = dict(meta=done, model=None, finished=True)
            continue
        if time.time() > deadline:
            print(f"{name}: not started, --max-minutes reached", flush=True)
            results[name] = dict(meta=None, model=None, finished=False)
            continue
        run = Run(name, settings, device, args.work, tokenizer, sampler, val_ids, args)
        resumed = args.resume and run.resume()
        pc = param_report(run.cfg)
        print(f"{name}: {pc['total']:,} parameters ({pc['active']:,} active), "
              f"{run.total_steps} steps of {run.tokens_per_step:,} tokens = "
              f"{sampler.epochs(run.total_steps):.2f} epochs; Mamba path: {run.mamba_path}"
              + (f"; resumed at step {run.step}" if resumed else ""), flush=True)
        run.experts_implementation = ensure_trainable(run)
        complete = train_model(run, deadline, args.stop_after_steps)
        meta = save_final(run, args.out) if complete else None
        if meta:
            print(f"{name}: saved to {args.out / name} (val {meta['final_val_loss']:.4f} nats/"
                  f"token, {meta['validation']['bits_per_byte']:.4f} bits/byte; reload check "
                  f"max |Δlogit| {meta['reload_max_abs_diff']:.2g})", flush=True)
        results[name] = dict(meta=meta, model=run.model, finished=complete)
    metas = [r["meta"] for r in results.values() if r["meta"]]
    if metas:
        print_table(metas)
    left = [n for n, r in results.items() if not r["finished"]]
    if left:
        print(f"unfinished: {', '.join(left)} — rerun with --resume", flush=True)
    print(f"train_zoo: {time.time() - start:.0f} s", flush=True)
    return results


if __name__ == "__main__":
    main()
