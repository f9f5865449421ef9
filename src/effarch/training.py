"""The pieces of the zoo's training loop (``scripts/train_zoo.py``), each testable alone.

Data (`train_tokens`, `WindowSampler`: a batch is a pure function of the step, so resuming needs
no sampler state), the optimiser and schedule, one optimiser step with the load-balancing loss
(`train_step`), checkpoints and random states, the CSV log, and saving a model as the zoo ships
it (`save_model`: bf16 safetensors, transformers' default Mamba path).

Letters in shapes: b batch, l sequence length, E experts.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
import math
import os
import random
from pathlib import Path

import numpy as np
import torch

from effarch import backends, data, moe, zoo
from effarch.paths import TROUBLE

LOG_FIELDS = ("step", "tokens", "train_loss", "aux_loss", "val_loss", "lr", "elapsed_s")


# --- device and Mamba path ------------------------------------------------------------------


def autocast(device: torch.device):
    """bf16 autocast on CUDA; nothing elsewhere (float32 on the CPU)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def mambapy_available() -> bool:
    """Whether mambapy's parallel scan imports (much faster CPU training than transformers' sequential loop)."""
    try:
        import mambapy.pscan  # noqa: F401
    except ImportError:
        return False
    return True


def set_mamba_path(model, *, use_mambapy: bool) -> str | None:
    """Switch every Mamba mixer to mambapy's scan (or back); the config is left as saved.

    Returns the path that runs now for a full sequence (`effarch.backends.mamba_path`), or None
    when the model has no Mamba layers. Without mamba-ssm transformers calls its PyTorch
    reference, which runs mambapy's ``pscan`` when ``mixer.use_mambapy`` is set and mambapy
    imports, else a loop over the sequence."""
    mixers = [m for m in backends.mamba_mixers(model) if hasattr(m, "use_mambapy")]
    if not mixers:
        return None
    on = use_mambapy and mambapy_available()
    for m in mixers:
        m.use_mambapy = on
    return backends.mamba_path(model)  # mamba-ssm's kernels, when installed, win over both


# --- data -------------------------------------------------------------------------------------


def _train_texts(max_chars: int | None) -> list[str]:
    texts = [d.text for d in data.corpus_domains("train")]
    if not max_chars:
        return texts
    kept, n = [], 0  # smoke mode: the first documents only
    for t in texts:
        if n >= max_chars:
            break
        kept.append(t)
        n += len(t)
    return kept


def train_tokens(tokenizer, cache_dir: Path, *, max_chars: int | None = None) -> np.ndarray:
    """Token ids (T,) of the train split, documents separated by ``<|endoftext|>``, cached
    as ``<cache_dir>/train-<hash of tokenizer and texts>.npy``."""
    texts = _train_texts(max_chars)
    key = hashlib.sha256(Path(data.tokenizer_dir() / "tokenizer.json").read_bytes())
    for t in texts:
        key.update(t.encode("utf-8"))
    path = Path(cache_dir) / f"train-{key.hexdigest()[:16]}.npy"
    if path.is_file():
        return np.load(path)
    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(tokenizer.eos_token_id)
    arr = np.asarray(ids, dtype=np.uint16 if tokenizer.vocab_size <= 65536 else np.int32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)  # a killed run never leaves half a cache
    return arr


class WindowSampler:
    """Batches (b, l) of ``seq_len``-token windows, a pure function of (seed, step).

    Epoch e starts at a random offset in [0, seq_len) and visits its windows in a random order,
    so every token is seen about equally often; resuming at step s needs no sampler state."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int):
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.per_epoch = (len(tokens) - seq_len) // seq_len
        if self.per_epoch < batch_size:
            raise ValueError(f"{len(tokens)} tokens are too few for batches of {batch_size} x "
                             f"{seq_len}. {TROUBLE} 'Training and evaluating the zoo'.")
        self._epoch, self._order = -1, None

    def _epoch_order(self, epoch: int) -> tuple[int, np.ndarray]:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch, self._order = epoch, (int(rng.integers(self.seq_len)),
                                               rng.permutation(self.per_epoch))
        return self._order

    def batch(self, step: int) -> torch.Tensor:
        """The batch of optimiser step ``step``, (b, l) int64."""
        rows = []
        for i in range(step * self.batch_size, (step + 1) * self.batch_size):
            offset, order = self._epoch_order(i // self.per_epoch)
            start = offset + int(order[i % self.per_epoch]) * self.seq_len
            rows.append(self.tokens[start:start + self.seq_len].astype(np.int64))
        return torch.from_numpy(np.stack(rows))                                   # (b, l)

    def epochs(self, steps: int) -> float:
        """How many passes over the train split ``steps`` steps make."""
        return steps * self.batch_size / self.per_epoch


# --- optimiser and one step ------------------------------------------------------------------


def make_optimizer(model, opt: dict) -> torch.optim.Optimizer:
    """AdamW from zoo_config's ``optimizer`` block; matrices decay, while norms, biases and
    Mamba's ``A_log`` and ``D`` do not (mamba-ssm's ``_no_weight_decay``, nanoGPT)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        keep = p.dim() < 2 or name.endswith("A_log") or name.endswith(".D")
        (no_decay if keep else decay).append(p)
    groups = [dict(params=decay, weight_decay=opt["weight_decay"]),
              dict(params=no_decay, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=opt["lr"], betas=tuple(opt["betas"]), eps=opt["eps"])


def make_scheduler(optimizer, total_steps: int, schedule: dict):
    """Linear warm-up over ``warmup_steps``, then a cosine down to ``min_lr_ratio`` of the
    peak at ``total_steps`` (zoo_config's ``schedule`` block)."""
    warmup, floor = schedule["warmup_steps"], schedule["min_lr_ratio"]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def balancing_loss(out, model, *, per_layer: bool) -> torch.Tensor:
    """The load-balancing loss of a forward with ``output_router_logits=True``: transformers'
    own (``out.aux_loss``: f and P pooled over all MoE layers, so one layer's dead experts can
    hide behind another's busy ones), or with ``per_layer`` the same function applied to each
    layer's (b·l, E) router logits and averaged (Switch Transformer's per-layer form:
    ``effarch.moe.load_balancing_loss(..., per_layer=True)``). Uniform top-2 routing gives 2.0
    either way."""
    if not per_layer:
        return out.aux_loss
    cfg = model.config
    return moe.load_balancing_loss(out.router_logits, moe.n_experts(cfg),
                                   cfg.num_experts_per_tok, per_layer=True)


def train_step(model, optimizer, scheduler, x: torch.Tensor, *, grad_clip: float,
               per_layer_aux: bool = False) -> tuple[float, float | None]:
    """One optimiser step on the batch ``x`` (b, l) under `autocast`; returns (cross-entropy,
    load-balancing loss or None for dense models). The loss minimised is CE + coef · aux."""
    moe = zoo.is_moe(model.config)
    extra = {"output_router_logits": True} if moe else {}
    with autocast(x.device):
        out = model(input_ids=x, labels=x, use_cache=False, **extra)
    ce, aux = out.loss, None
    if moe:  # out.loss = CE + coef * pooled aux (Mixtral/Jamba ForCausalLM)
        coef = model.config.router_aux_loss_coef
        ce = out.loss - coef * out.aux_loss
        aux = balancing_loss(out, model, per_layer=per_layer_aux)
    loss = ce if aux is None else ce + model.config.router_aux_loss_coef * aux
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    return ce.item(), None if aux is None else aux.item()


# --- checkpoints and logs --------------------------------------------------------------------


def rng_states() -> dict:
    """Python's, NumPy's, torch's and (if any) CUDA's random states, for a checkpoint."""
    return dict(python=random.getstate(), numpy=np.random.get_state(),
                torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_states(states: dict) -> None:
    """Restore what `rng_states` returned."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path: Path, **state) -> None:
    """``torch.save(state)`` through a temporary file: a run killed mid-write leaves the
    previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def read_log(path: Path) -> list[dict]:
    """The rows of a ``train_log.csv`` (strings, as written), [] when there is none."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def append_log(path: Path, rows: list[dict]) -> None:
    """Append rows with `LOG_FIELDS` to a ``train_log.csv``, writing the header first."""
    path = Path(path)
    new = not path.is_file()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        if new:
            w.writeheader()
        w.writerows(rows)


# --- the saved model --------------------------------------------------------------------------


def save_model(model, target: Path):
    """Write ``model`` as the zoo ships it into ``target``: a bf16 copy on the CPU, with
    transformers' default Mamba path and a generation config whose special tokens are
    ``<|endoftext|>``; transformers 5 writes safetensors. Returns the bf16 copy."""
    from transformers import GenerationConfig

    saved = copy.deepcopy(model).to("cpu", torch.bfloat16)
    set_mamba_path(saved, use_mambapy=False)
    saved.config.use_cache = True
    saved.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    Path(target).mkdir(parents=True, exist_ok=True)
    saved.save_pretrained(target)
    return saved


@torch.no_grad()
def reload_difference(saved_model, target: Path, *,
                      experts_implementation: str | None = None) -> float:
    """Max |Δ logit| between ``saved_model`` (in float32) and what ``target`` reloads, on one
    fixed (1, 32) input. ``experts_implementation="eager"`` reloads MoE experts on the loop
    that training fell back to."""
    from transformers import AutoModelForCausalLM

    dev = next(saved_model.parameters()).device
    reloaded = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).to(dev)
    if experts_implementation == "eager":
        reloaded.set_experts_implementation("eager")
    x = (torch.arange(1, 33).reshape(1, 32) % saved_model.config.vocab_size).to(dev)
    a = saved_model.float().eval()(input_ids=x, use_cache=False).logits
    b = reloaded.eval()(input_ids=x, use_cache=False).logits
    return float((a - b).abs().max())
