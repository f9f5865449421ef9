"""LoRA on Mamba that trains what it claims to: lab 2.4.6 and ``scripts/finetune_mamba.py``.

PEFT builds and saves the adapters, ``transformers.Trainer`` trains them (evaluation,
checkpoints, resume), ``datasets`` reads the task files and ``accelerate`` runs one or several
processes; this module only puts them together and measures what they did:

- the task: ``data/tasks/<task>/{train,test}.jsonl`` (``scripts/build_tasks.py``) read with
  ``datasets``; training text is ``prompt + answer + "\\n"`` with the loss on the answer only;
- LoRA targets on a Mamba mixer (``in_proj`` and ``x_proj``; PEFT refuses ``out_proj`` and
  ``conv1d``, huggingface/peft#2556; transformers' mixer reads ``dt_proj.weight`` directly, so an
  adapter there is never called), trainable parameters per module against ``r·(in + out)``;
- a gradient check: every LoRA matrix gets a non-zero gradient once ``lora_B`` has left zero
  (after one optimiser step), and the base weights do not move;
- exact match: greedy continuation of the prompt (at most 32 new tokens) cut at the first newline
  and stripped, against the answer stripped;
- memory of one training step counted in bytes (parameters, gradients, optimiser state by
  module, and the activations autograd saves for the backward pass), and the allocator's peak
  on a GPU.

Mamba module letters as in ``effarch.ssm``: hidden size *H*, channels *D* (``intermediate_size``),
state *N*, Δ rank *R*.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from effarch import backends, bench, paths
from effarch.paths import TROUBLE

DEFAULT_TARGETS = ("in_proj", "x_proj")
"""The mixer's linear layers that are called as modules on transformers' PyTorch path."""
MAMBA_LINEARS = ("in_proj", "x_proj", "dt_proj", "out_proj")
PEFT_REFUSES = ("out_proj", "conv1d")
"""PEFT raises for these on Mamba-family models (since huggingface/peft PR #2562, for issue
#2556): fused kernels pass their raw weights, bypassing an adapter's forward."""
MAX_NEW_TOKENS = 32
IGNORE_INDEX = -100  # labels the loss skips (PyTorch's cross-entropy default)


class FinetuneError(ValueError):
    """A fine-tuning request that cannot run as asked; the message says what to do instead."""


# ------------------------------------------------------------------------------------- task


def tasks_dir() -> Path:
    """``data/tasks/``: one folder per task (``scripts/build_tasks.py``)."""
    return paths.data_dir() / "tasks"


def task_files(task: str) -> dict[str, str]:
    """``{"train": path, "test": path}`` of a shipped task; a clear error when it is missing."""
    folder = tasks_dir() / task
    files = {split: folder / f"{split}.jsonl" for split in ("train", "test")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        known = sorted(p.name for p in tasks_dir().iterdir() if p.is_dir()) \
            if tasks_dir().is_dir() else []
        raise FinetuneError(
            f"task {task!r} has no {' or '.join(missing)}; shipped tasks: {known or 'none'}. "
            f"Regenerate with `python scripts/build_tasks.py`. {TROUBLE} 'Missing data files'.")
    return {split: str(path) for split, path in files.items()}


def load_task(task: str):
    """The task's ``train`` and ``test`` splits as a ``datasets.DatasetDict`` (``prompt``,
    ``answer`` columns), read from the local JSON Lines files."""
    import datasets

    return datasets.load_dataset("json", data_files=task_files(task))


def tokenize_example(tokenizer, prompt: str, answer: str) -> dict[str, list[int]]:
    """Token ids of ``prompt + answer + "\\n"`` and labels that score the answer only.

    The prompt is tokenised alone — the same tokens the model is given at evaluation — and the
    answer with its newline after it; labels are ``-100`` (ignored) on the prompt.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer + "\n", add_special_tokens=False)["input_ids"]
    ids = prompt_ids + answer_ids
    return {"input_ids": ids, "attention_mask": [1] * len(ids),
            "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids}


def tokenize_task(dataset, tokenizer):
    """``tokenize_example`` over a ``datasets`` split or DatasetDict; the text columns dropped."""
    columns = dataset.column_names
    columns = columns["train"] if isinstance(columns, dict) else columns
    return dataset.map(lambda row: tokenize_example(tokenizer, row["prompt"], row["answer"]),
                       remove_columns=columns)


def collator(tokenizer):
    """Pads ``input_ids`` with the pad token and ``labels`` with -100 (transformers' own)."""
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)


def example_batch(tokenizer, rows: Sequence[dict], device=None) -> dict[str, torch.Tensor]:
    """A padded training batch (``input_ids``, ``attention_mask``, ``labels``) from task rows."""
    features = [tokenize_example(tokenizer, r["prompt"], r["answer"]) for r in rows]
    batch = collator(tokenizer)(features)
    return {k: v.to(device) if device is not None else v for k, v in batch.items()}


# ------------------------------------------------------------------------------------- LoRA


def lora_config(rank: int = 8, targets: Iterable[str] = DEFAULT_TARGETS, *,
                alpha: float | None = None, dropout: float = 0.0):
    """PEFT's ``LoraConfig`` for a causal LM: ``lora_alpha`` defaults to ``2 · rank``."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=2 * rank if alpha is None else alpha,
                      target_modules=list(targets), lora_dropout=dropout, bias="none",
                      task_type="CAUSAL_LM")


def validate_targets(targets: Iterable[str], model_type: str = "mamba") -> list[str]:
    """The targets as a list, or a ``FinetuneError`` that says why one cannot train on a Mamba
    mixer: not one of its linear layers, refused by PEFT (``out_proj``, ``conv1d``), or never
    called by transformers' mixer (``dt_proj``: its weight is read directly, so its adapter gets
    no gradient)."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    if model_type not in ("mamba", "falcon_mamba"):
        return targets
    known = set(MAMBA_LINEARS) | set(PEFT_REFUSES)
    fix = f"Target {' and '.join(DEFAULT_TARGETS)}. {TROUBLE} 'PEFT target errors'."
    unknown = [t for t in targets if t not in known]
    if unknown or not targets:
        raise FinetuneError(f"{unknown or 'no targets'}: a Mamba mixer's layers are "
                            f"{', '.join(MAMBA_LINEARS)} and conv1d. {fix}")
    refused = [t for t in targets if t in PEFT_REFUSES]
    if refused:
        raise FinetuneError(
            f"PEFT refuses LoRA on {', '.join(refused)} in Mamba models: mamba-ssm's fused "
            f"kernel passes their raw weights and would bypass the adapter. {fix}")
    if "dt_proj" in targets:
        raise FinetuneError(
            "a LoRA adapter on dt_proj would never train: transformers' Mamba mixer reads "
            "dt_proj.weight directly, so the adapter is never called and gets no gradient "
            f"(lab 2.4.6 measures it). {fix}")
    return targets


def add_lora(model, config):
    """``peft.get_peft_model`` after ``validate_targets``: a target that PEFT refuses or that
    would never train is an error that says what to target. The model is changed in place
    (PEFT wraps the targeted layers)."""
    from peft import get_peft_model

    validate_targets(_targets(config), getattr(model.config, "model_type", ""))
    return get_peft_model(model, config)


def _targets(config) -> list[str]:
    targets = config.target_modules
    return [targets] if isinstance(targets, str) else list(targets or [])


def module_kind(name: str) -> str:
    """A parameter's module kind, layer index and PEFT's prefixes removed:
    ``base_model.model.backbone.layers.3.mixer.in_proj.lora_A.default.weight`` →
    ``in_proj.lora_A``; ``backbone.layers.0.mixer.A_log`` → ``A_log``."""
    name = re.sub(r"^(base_model\.model\.)?", "", name)
    name = re.sub(r"(^|\.)layers\.\d+\.", r"\1", name)
    name = re.sub(r"\.(default|base_layer)(?=\.|$)", "", name)
    parts = [p for p in name.split(".") if p not in ("backbone", "mixer", "model")]
    if parts and parts[-1] in ("weight", "bias") and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def trainable_by_module(model) -> dict[str, int]:
    """Trainable parameters summed by module kind (``in_proj.lora_A``, …, or ``in_proj`` for a
    base weight left trainable), largest first."""
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            kind = module_kind(name)
            counts[kind] = counts.get(kind, 0) + p.numel()
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def lora_shapes(config) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear layer of a Mamba mixer, from a ``MambaConfig``."""
    h, d, n = config.hidden_size, config.intermediate_size, config.state_size
    r = int(config.time_step_rank)
    return {"in_proj": (h, 2 * d), "x_proj": (d, r + 2 * n), "dt_proj": (r, d),
            "out_proj": (d, h)}


def expected_lora_counts(config, rank: int, targets: Iterable[str] = DEFAULT_TARGETS
                         ) -> dict[str, int]:
    """LoRA parameters per targeted module kind for all layers: ``lora_A`` is (r, in) and
    ``lora_B`` (out, r), so ``r·in`` and ``out·r`` per layer (Hu et al. 2021, §4)."""
    shapes, layers = lora_shapes(config), config.num_hidden_layers
    counts = {}
    for t in targets:
        fan_in, fan_out = shapes[t]
        counts[f"{t}.lora_A"] = layers * rank * fan_in
        counts[f"{t}.lora_B"] = layers * fan_out * rank
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def lora_matrices(model) -> dict[str, torch.nn.Parameter]:
    """Every LoRA matrix of a PEFT model, by parameter name."""
    return {n: p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}


# --------------------------------------------------------------------------- gradient checks


@dataclass
class GradientReport:
    """One gradient check (``gradient_check``). Norms are of the LoRA matrices' gradients at the
    first backward pass (``lora_B`` starts at zero, so ``lora_A``'s is zero there) and at the
    second, after one optimiser step."""

    first_step: dict[str, float]
    second_step: dict[str, float]
    no_gradient: list[str]
    base_changed: list[str]
    trainable_base: list[str]
    path: str
    losses: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.no_gradient or self.base_changed or self.trainable_base) \
            and bool(self.second_step)


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _to_model(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``batch`` on the device of ``model``'s weights (a batch built on the CPU for a model a GPU
    holds works as it does on a CPU)."""
    device = _model_device(model)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _grad_norms(named: dict[str, torch.nn.Parameter]) -> dict[str, float]:
    return {n: (p.grad.float().norm().item() if p.grad is not None else 0.0)
            for n, p in named.items()}


def gradient_check(model, batch: dict[str, torch.Tensor], *, lr: float = 1e-3) -> GradientReport:
    """Two training steps of a PEFT model on ``batch`` with AdamW: gradient norms of every LoRA
    matrix at each backward pass, which base weights changed, which base weights are trainable.
    The model's weights are restored afterwards (the check trains nothing)."""
    batch = _to_model(model, batch)
    named = dict(model.named_parameters())
    lora = lora_matrices(model)
    saved = {n: p.detach().clone() for n, p in named.items()}
    trainable = [p for p in named.values() if p.requires_grad]
    was_training = model.training
    model.train()
    opt = torch.optim.AdamW(trainable, lr=lr) if trainable else None
    norms, losses = [], []
    try:
        for _ in range(2):
            loss = model(**batch).loss
            loss.backward()
            losses.append(loss.item())
            norms.append(_grad_norms(lora))
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
        changed = [n for n, p in named.items()
                   if n not in lora and not torch.equal(p.detach(), saved[n])]
    finally:
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(saved[n])
                p.grad = None
        model.train(was_training)
    return GradientReport(
        first_step=norms[0], second_step=norms[1],
        no_gradient=[n for n, v in norms[1].items() if not v > 0],
        base_changed=changed,
        trainable_base=[n for n, p in named.items() if p.requires_grad and n not in lora],
        path=backends.mamba_path(model), losses=losses)


def use_parallel_scan(model) -> str:
    """Train through mambapy's parallel scan where mambapy is installed (transformers'
    ``use_mambapy``; much faster than the sequential loop for a training step on a CPU); returns
    the Mamba path that now runs (``backends.mamba_path``). Nothing changes where mambapy is
    missing, or where the model is not in float32: transformers' mambapy branch multiplies its
    float32 states by C in the model's dtype without a cast, so a bf16 or fp16 model would fail
    in training ("expected scalar type Float but found BFloat16", seen on transformers 5.17 and
    in 5.24's source)."""
    if backends.mambapy_available():
        inner = getattr(model, "get_base_model", lambda: model)()
        mixers = backends.mamba_mixers(inner)
        use = all(m.x_proj.weight.dtype == torch.float32 for m in mixers)  # the scan's inputs
        inner.config.use_mambapy = use
        for mixer in mixers:
            mixer.use_mambapy = use
    return backends.mamba_path(model)


# ------------------------------------------------------------------------------ demonstrations


def peft_refusal(model, target: str) -> str | None:
    """PEFT's error when ``target`` is asked for on ``model`` (``None`` if it is accepted).
    Pass a throwaway model — one on the meta device costs nothing — since PEFT wraps the
    accepted targets before it refuses one."""
    from peft import get_peft_model

    try:
        get_peft_model(model, lora_config(4, [target]))
    except ValueError as exc:
        return str(exc)
    return None


@dataclass
class BypassReport:
    """What a LoRA adapter on one module did (``adapter_effect``): the largest change of the
    logits it caused, its matrices' gradient norms (``None``: no gradient reached them), how
    many times its forward ran, and the Mamba path."""

    target: str
    max_output_change: float
    gradient_norms: dict[str, float | None]
    forward_calls: int
    path: str


def adapter_effect(model, target: str, input_ids: torch.Tensor, *, seed: int = 0) -> BypassReport:
    """Wrap ``target`` with a LoRA adapter whose ``lora_B`` is random (not zero, so a called
    adapter must change the output), then measure the largest change of the logits against the
    adapter disabled, the adapter's gradient norms (``None``: not in the graph) and how often
    its forward ran. The adapter is removed afterwards (``unload``) and every weight's
    ``requires_grad`` restored: the model is left as it was."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    input_ids = input_ids.to(_model_device(model))
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    cfg = lora_config(4, [target])
    cfg.init_lora_weights = False  # random A and B: a nonzero update B·A
    peft_model = get_peft_model(model, cfg)
    lora = lora_matrices(peft_model)
    calls = []
    handles = [m.register_forward_hook(lambda *a: calls.append(1))
               for n, m in peft_model.named_modules() if n.endswith(f"{target}.lora_A.default")]
    try:
        peft_model.train()
        result = peft_model(input_ids=input_ids, labels=input_ids)
        with peft_model.disable_adapter(), torch.no_grad():
            base = peft_model(input_ids=input_ids).logits
        out = result.logits
        if result.loss.requires_grad:  # False when no trainable parameter reached the loss
            result.loss.backward()
        grads = {n: (p.grad.float().norm().item() if p.grad is not None else None)
                 for n, p in lora.items()}
        change = (out.detach().float() - base.float()).abs().max().item()
    finally:
        for h in handles:
            h.remove()
        path = backends.mamba_path(peft_model)
        peft_model.unload()
        model.eval()
        for n, p in model.named_parameters():  # PEFT froze the base: give back what it had
            p.requires_grad_(trainable.get(n, p.requires_grad))
    return BypassReport(target, change, grads, len(calls), path)


# ------------------------------------------------------------------------------ exact match


def newline_token_ids(tokenizer) -> list[int]:
    """Every token whose text contains a newline: generation stops at the first of them."""
    vocab = tokenizer.get_vocab()
    ids = sorted(set(vocab.values()))
    return [i for i, text in zip(ids, tokenizer.batch_decode([[i] for i in ids]), strict=True)
            if "\n" in text]


def greedy_answer(model, tokenizer, prompt: str, *, max_new_tokens: int = MAX_NEW_TOKENS,
                  stop_ids: list[int] | None = None) -> str:
    """The model's greedy continuation of ``prompt`` (``generate``, at most ``max_new_tokens``),
    cut at the first newline and stripped."""
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
    stop = stop_ids if stop_ids is not None else newline_token_ids(tokenizer)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=stop, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return text.split("\n", 1)[0].strip()


@dataclass
class ExactMatch:
    """Exact match over ``n`` rows; ``rows`` holds ``(prompt, answer, prediction)``."""

    score: float
    n: int
    rows: list[tuple[str, str, str]]
    seconds: float

    @property
    def percent(self) -> float:
        return 100.0 * self.score

    def examples(self, k: int = 5) -> list[str]:
        return [f"{p!r} → {pred!r} ({'✓' if pred == a.strip() else '✗ want ' + repr(a)})"
                for p, a, pred in self.rows[:k]]


def exact_match(model, tokenizer, rows: Iterable[dict], *, limit: int | None = None,
                max_new_tokens: int = MAX_NEW_TOKENS, progress: bool = False,
                desc: str = "exact match") -> ExactMatch:
    """Exact match of greedy answers over task rows (``{"prompt", "answer"}``), the first
    ``limit`` rows if given. The model is put in eval mode."""
    from tqdm.auto import tqdm

    rows = list(rows)[:limit]
    stop = newline_token_ids(tokenizer)
    model.eval()
    start, out = time.perf_counter(), []
    for r in tqdm(rows, desc=desc, disable=not progress, leave=False):
        pred = greedy_answer(model, tokenizer, r["prompt"], max_new_tokens=max_new_tokens,
                             stop_ids=stop)
        out.append((r["prompt"], r["answer"], pred))
    hits = sum(pred == a.strip() for _, a, pred in out)
    return ExactMatch(hits / max(len(out), 1), len(out), out, time.perf_counter() - start)


# ----------------------------------------------------------------------------------- Trainer


@dataclass(frozen=True)
class TrainSettings:
    """What a fine-tuning run is: ``scripts/finetune_mamba.py``'s defaults, which the lab's
    headline figure (the shipped adapter) comes from. ``batch_size`` is the global batch: with
    several processes each gets ``batch_size / processes`` rows of every step."""

    max_steps: int = 250
    rank: int = 8
    targets: tuple[str, ...] = DEFAULT_TARGETS
    seed: int = 0
    batch_size: int = 16
    learning_rate: float = 5e-3
    warmup_steps: int = 10
    eval_steps: int = 50
    save_steps: int = 50
    logging_steps: int = 10

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


def training_arguments(output_dir, settings: TrainSettings = TrainSettings(), *,
                       processes: int = 1, progress: bool = True, **overrides):
    """``TrainingArguments`` for a seeded LoRA run: linear warm-up and decay, AdamW, evaluation
    on the test split every ``eval_steps`` (loss only: monitoring, never model selection),
    checkpoints every ``save_steps`` (the last two kept), no external loggers."""
    from transformers import TrainingArguments

    if settings.batch_size % processes:
        raise FinetuneError(f"the batch of {settings.batch_size} rows does not split over "
                            f"{processes} processes; pick a batch size divisible by it. "
                            f"{TROUBLE} 'Several processes on a CPU'.")
    kw = dict(
        output_dir=str(output_dir), max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size // processes,
        per_device_eval_batch_size=64, learning_rate=settings.learning_rate,
        lr_scheduler_type="linear", warmup_steps=settings.warmup_steps, weight_decay=0.0,
        eval_strategy="steps", eval_steps=settings.eval_steps, save_strategy="steps",
        save_steps=settings.save_steps, save_total_limit=2, logging_steps=settings.logging_steps,
        logging_first_step=True, seed=settings.seed, data_seed=settings.seed, report_to="none",
        label_names=["labels"], prediction_loss_only=True, dataloader_num_workers=0,
        disable_tqdm=not progress, remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available())  # and so a gloo group of CPU processes (torchrun)
    kw.update(overrides)
    return TrainingArguments(**kw)


def make_trainer(model, tokenizer, train, test, args, callbacks: Sequence = ()):
    """A ``transformers.Trainer`` over tokenised splits (``tokenize_task``) with the padding
    collator."""
    from transformers import Trainer

    return Trainer(model=model, args=args, train_dataset=train, eval_dataset=test,
                   data_collator=collator(tokenizer), callbacks=list(callbacks))


class TrainingInterrupted(RuntimeError):
    """Raised by ``InterruptAt``: a stand-in for a crash, a kill or a closed laptop."""


def interrupt_at(step: int):
    """A ``TrainerCallback`` that raises ``TrainingInterrupted`` when ``step`` optimiser steps
    are done — after the step, before the checkpoint that step may save."""
    from transformers import TrainerCallback

    class InterruptAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= step:
                raise TrainingInterrupted(
                    f"training interrupted after step {state.global_step} (interrupt_at)")

    return InterruptAt()


def latest_checkpoint(folder) -> Path | None:
    """The ``checkpoint-N`` folder with the largest N in ``folder`` (``None`` if there is none)."""
    from transformers.trainer_utils import get_last_checkpoint

    folder = Path(folder)
    found = get_last_checkpoint(str(folder)) if folder.is_dir() else None
    return Path(found) if found else None


def loss_curve(log_history: Sequence[dict]) -> dict[str, list[tuple[int, float]]]:
    """``{"train": [(step, loss)], "eval": [(step, eval_loss)]}`` from a Trainer's
    ``state.log_history`` (or the ``train_log.json`` a run writes)."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    return {"train": train, "eval": evals}


def adapter_bytes(folder) -> int:
    """Bytes of the adapter files PEFT wrote (``adapter_model.safetensors`` and its config)."""
    folder = Path(folder)
    return sum((folder / f).stat().st_size
               for f in ("adapter_model.safetensors", "adapter_config.json")
               if (folder / f).is_file())


def parameter_bytes(model) -> int:
    """Bytes of every parameter of a model (an adapter's included if it has one)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def base_weight_bytes(model) -> int:
    """Bytes of a model's own weights, its LoRA matrices left out."""
    lora = {id(p) for p in lora_matrices(model).values()}
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in lora)


def shipped_run(name: str = "tiny-mamba-dates") -> dict:
    """The kept default run of ``scripts/finetune_mamba.py`` (``data/finetune/<name>/``): its
    ``run.json`` (settings, exact match before and after, times, versions, machine) with
    ``log_history`` from ``train_log.json`` and ``adapter_dir``."""
    folder = paths.data_dir() / "finetune" / name
    try:
        run = json.loads((folder / "run.json").read_text())
        run["log_history"] = json.loads((folder / "train_log.json").read_text())
    except FileNotFoundError as exc:
        raise FinetuneError(f"the shipped run {folder} is missing ({exc.filename}); restore it "
                            f"with git or rerun scripts/finetune_mamba.py. "
                            f"{TROUBLE} 'Missing data files'.") from None
    run["adapter_dir"] = str(folder)
    return run


# ------------------------------------------------------------------------------------ memory


@dataclass
class StepBytes:
    """Memory of one training step, counted: ``table`` has one row per module kind
    (``parameters``, ``trainable``, and bytes of ``weights``, ``gradients``, ``optimizer``
    state); ``activations`` counts what autograd saved for the backward pass (parameters
    excluded); on a GPU ``resident`` is what the allocator held before the step and ``peak`` its
    peak during the step (both ``None`` elsewhere)."""

    table: object  # pandas.DataFrame
    activations: int
    peak: int | None
    resident: int | None
    device: str

    @property
    def total(self) -> int:
        t = self.table
        return int(t["weights"].sum() + t["gradients"].sum() + t["optimizer"].sum()) \
            + self.activations

    @property
    def trainable_state(self) -> int:
        """Bytes that exist because parameters train: their weights, gradients and optimiser
        state (the rows with trainable parameters)."""
        t = self.table[self.table["trainable"] > 0]
        return int(t["weights"].sum() + t["gradients"].sum() + t["optimizer"].sum())

    def summary(self) -> dict[str, int]:
        t = self.table
        return {"weights": int(t["weights"].sum()), "gradients": int(t["gradients"].sum()),
                "optimizer": int(t["optimizer"].sum()), "activations": self.activations,
                "total": self.total}


def _storage(t: torch.Tensor):
    return t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()


def training_step_bytes(model, batch: dict[str, torch.Tensor]) -> StepBytes:
    """Run one AdamW step (learning rate 0: the weights stay as they are, the optimiser's state
    is allocated as in training) and count its memory by module kind. Activations are the
    distinct storages autograd saves for the backward pass, counted with
    ``torch.autograd.graph.saved_tensors_hooks``; parameters saved there are not counted again."""
    import pandas as pd

    batch = _to_model(model, batch)
    named = dict(model.named_parameters())
    device = next(iter(named.values())).device
    weight_ptrs = {_storage(p)[0] for p in named.values()}
    saved: dict[int, int] = {}

    def pack(t):
        ptr, nbytes = _storage(t)
        if ptr not in weight_ptrs:
            saved[ptr] = nbytes
        return t

    trainable = [p for p in named.values() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=0.0, weight_decay=0.0)
    model.train()
    bench.synchronize(device)
    bench.reset_peak_memory(device)
    resident = bench.current_memory_bytes(device) if device.type == "cuda" else None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    opt.step()
    bench.synchronize(device)
    peak = bench.peak_memory_bytes(device) if device.type == "cuda" else None
    rows: dict[str, dict[str, int]] = {}
    for name, p in named.items():
        row = rows.setdefault(module_kind(name), dict.fromkeys(
            ("parameters", "trainable", "weights", "gradients", "optimizer"), 0))
        row["parameters"] += p.numel()
        row["trainable"] += p.numel() if p.requires_grad else 0
        row["weights"] += p.numel() * p.element_size()
        row["gradients"] += p.grad.numel() * p.grad.element_size() if p.grad is not None else 0
        row["optimizer"] += sum(v.numel() * v.element_size()
                                for v in opt.state.get(p, {}).values()
                                if torch.is_tensor(v) and v.dim() > 0)
    opt.zero_grad(set_to_none=True)
    del opt, loss
    table = pd.DataFrame.from_dict(rows, orient="index").rename_axis("module")
    table = table.sort_values(["trainable", "weights"], ascending=False)
    return StepBytes(table, sum(saved.values()), peak, resident, str(device))


def quantized_modules(model) -> dict[str, int]:
    """Module kinds whose linear layers bitsandbytes replaced (``Linear4bit`` / ``Linear8bitLt``),
    with how many there are."""
    found: dict[str, int] = {}
    for name, module in model.named_modules():
        if type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            kind = module_kind(name + ".weight")
            found[kind] = found.get(kind, 0) + 1
    return found


def qlora_unavailable() -> str | None:
    """Why the course does not run 4-bit QLoRA here (``None`` when it does): it runs it on a
    CUDA GPU with bitsandbytes. (bitsandbytes 0.50 also quantises on a CPU, slowly; the course
    measures QLoRA's saving as GPU memory.)"""
    if not torch.cuda.is_available():
        return ("QLoRA is measured on the GPU path (bitsandbytes' CUDA kernels, the allocator's "
                f"peak) and no CUDA GPU is visible here. {TROUBLE} 'QLoRA on the CPU'.")
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # ImportError or a broken native library
        return (f"bitsandbytes cannot be imported ({type(exc).__name__}: {exc}); install the "
                f"quant extra (`pip install -e '.[quant]'`). {TROUBLE} 'QLoRA on the CPU'.")
    return None


def load_4bit(name: str, *, weights: str = "pretrained", workdir=None):
    """``(model, tokenizer)`` with the model in 4-bit NF4 (``BitsAndBytesConfig``, bf16 compute)
    and the registry's skipped modules (Mamba: ``dt_proj``, read as a raw weight by the mixer,
    and ``lm_head``) kept in bf16. Random weights are built at the real config, saved to
    ``workdir`` and read back quantised — ``from_pretrained`` is where transformers quantises —
    with the zoo's tokenizer standing in."""
    reason = qlora_unavailable()
    if reason:
        raise FinetuneError(reason)
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from effarch import models

    if weights == "pretrained":
        return tuple(models.load_model(name, quantization="4bit"))
    spec = models.as_spec(name)
    if workdir is None:
        raise FinetuneError("random weights are written to disk before 4-bit loading: pass "
                            "workdir= (a folder with room for the bf16 weights). "
                           f"{TROUBLE} 'QLoRA on the CPU'.")
    built, tokenizer = models.load_model(spec, weights="random", dtype=torch.bfloat16,
                                         device="cuda")
    built.save_pretrained(workdir)
    del built
    models.unload()
    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=torch.bfloat16,
                              llm_int8_skip_modules=list(spec.skip_quantization) or None)
    model = AutoModelForCausalLM.from_pretrained(workdir, quantization_config=qcfg,
                                                 device_map={"": "cuda"}, dtype=torch.bfloat16)
    return model, tokenizer


# ------------------------------------------------------------------------------------- sweep


def read_sweep(sweep, *, tolerance: float = 0.1) -> dict:
    """The reading lab 2.4.6 asks of a rank/targets sweep (columns ``config``, ``targets``,
    ``rank``, ``trainable``, ``state_bytes``, ``eval_loss``):

    - ``best``: the config with the lowest held-out loss;
    - ``cheapest_good``: the config with the fewest trainable parameters whose loss is within
      ``tolerance`` (relative) of the best;
    - ``bytes_per_rank``: training-state bytes that one unit of rank adds with both default
      targets (least-squares slope of ``state_bytes`` on ``rank`` over those rows).
    """
    import numpy as np

    best = sweep.loc[sweep["eval_loss"].idxmin()]
    good = sweep[sweep["eval_loss"] <= best["eval_loss"] * (1 + tolerance)]
    cheapest = good.loc[good["trainable"].idxmin()]
    both = sweep[sweep["targets"] == ",".join(DEFAULT_TARGETS)]
    slope = float(np.polyfit(both["rank"].astype(float), both["state_bytes"].astype(float), 1)[0])
    return {"best": best["config"], "cheapest_good": cheapest["config"],
            "bytes_per_rank": round(slope)}


def sweep(make_model, tokenizer, train, test, configs: Sequence[tuple[Sequence[str], int]], *,
          settings: TrainSettings, output_dir, batch: dict[str, torch.Tensor],
          progress: bool = True):
    """Train one adapter per ``(targets, rank)`` for ``settings.max_steps`` steps on a fresh
    model from ``make_model()`` (same seed, data and schedule), then measure its held-out loss
    and its training step's counted bytes on ``batch``. One row per config."""
    import dataclasses

    import pandas as pd
    from tqdm.auto import tqdm
    from transformers import set_seed

    from effarch import models

    rows = []
    for targets, rank in tqdm(list(configs), desc="sweep", disable=not progress):
        label = f"{','.join(targets)} r={rank}"
        set_seed(settings.seed)
        model = add_lora(make_model(), lora_config(rank, targets))
        path = use_parallel_scan(model)
        run = dataclasses.replace(settings, rank=rank, targets=tuple(targets))
        args = training_arguments(Path(output_dir) / label.replace(",", "+").replace(" ", "_"),
                                  run, progress=False, eval_strategy="no", save_strategy="no",
                                  logging_steps=max(1, run.max_steps))
        trainer = make_trainer(model, tokenizer, train, test, args)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        eval_loss = trainer.evaluate()["eval_loss"]
        counted = training_step_bytes(model, batch)
        rows.append({"config": label, "targets": ",".join(targets), "rank": rank,
                     "trainable": sum(trainable_by_module(model).values()),
                     "state_bytes": counted.trainable_state, "activation_bytes":
                     counted.activations, "eval_loss": eval_loss,
                     "train_s": seconds, "path": path})
        del trainer, model  # before the next config's model: one at a time
        models.unload()
    return pd.DataFrame(rows)
