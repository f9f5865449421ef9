"""Multi-query associative recall (MQAR): where a fixed-size state loses (lab 2.4.5, Part E).

The task of Arora et al. 2023, "Zoology: Measuring and Improving Recall in Efficient Language
Models" (§3): a sequence first lists ``num_pairs`` key-value pairs, then, in a region of noise
tokens, asks for some of the keys again; at each queried key the model must output the value that
followed that key earlier. Attention can look the pair up wherever it is; a recurrent model must
have kept it in its state, whose size is fixed — so as the pairs grow, Mamba needs a larger state
(``d_state``) where attention does not. Zoology found this gap to explain much of the perplexity
gap between attention and gated-convolution or SSM models.

Layout of one example (V the vocabulary; keys from [1, V/2), values from [V/2, V)):

    inputs : k1 v1 k2 v2 … kD vD | noise … k_i noise … k_j noise …
    targets: -100 everywhere except at each queried key's position, where it is that key's value

A query sits on an even offset of the query region, at a distance drawn from a power law
(p(i) ∝ i^(a−1), Zoology's a = 0.01: near queries are common, far ones rare); the token after a
query is noise, so the value is never shown twice. Targets are already aligned with the
predictions: the logits at position t are scored against ``targets[:, t]``.

Letters: b batch, L sequence length, D key-value pairs, V vocabulary.

Models: :func:`recall_config` builds the small transformers configs the lab compares — attention
(Llama-style), Mamba, and a Jamba-style hybrid — and :func:`train` trains one on fresh batches.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from effarch import compat, paths
from effarch.mixer import mixer_prefill

ARCHS = ("attention", "mamba", "hybrid")
IGNORE = -100
POWER_A = 0.01  # Zoology's default


class RecallError(ValueError):
    """An MQAR shape that cannot be built; the message names the TROUBLESHOOTING.md section."""


@dataclass(frozen=True)
class MQARBatch:
    """``inputs`` (b, L) token ids; ``targets`` (b, L): the value expected at each query
    position, -100 elsewhere; ``num_pairs`` D pairs per example."""

    inputs: torch.Tensor
    targets: torch.Tensor
    num_pairs: int

    @property
    def queries(self) -> int:
        """How many predictions are scored in the batch."""
        return int((self.targets != IGNORE).sum())


def _check_shape(num_pairs: int, seq_len: int, vocab_size: int, num_queries: int) -> None:
    if num_pairs < 1 or not 1 <= num_queries <= num_pairs:
        raise RecallError(f"need num_pairs >= 1 and 1 <= num_queries <= num_pairs, got "
                          f"num_pairs={num_pairs}, num_queries={num_queries}. See "
                          "TROUBLESHOOTING.md, section 'Recall task shapes'.")
    if (seq_len - 2 * num_pairs) // 2 < num_queries:
        raise RecallError(f"seq_len={seq_len} is too short for {num_pairs} pairs and "
                          f"{num_queries} queries: it needs at least "
                          f"{2 * num_pairs + 2 * num_queries} tokens. See TROUBLESHOOTING.md, "
                          "section 'Recall task shapes'.")
    if vocab_size // 2 - 1 < num_pairs:
        raise RecallError(f"vocab_size={vocab_size} has {vocab_size // 2 - 1} keys, fewer than "
                          f"num_pairs={num_pairs}. See TROUBLESHOOTING.md, section "
                          "'Recall task shapes'.")


def _distinct(batch: int, low: int, high: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """k distinct integers from [low, high) per row, in random order: (batch, k)."""
    return torch.rand(batch, high - low, generator=gen).argsort(dim=1)[:, :k] + low


def mqar_batch(batch_size: int, *, num_pairs: int, seq_len: int, vocab_size: int,
               seed: int | torch.Generator, num_queries: int | None = None,
               power_a: float = POWER_A) -> MQARBatch:
    """A seeded batch of MQAR examples (the same ``seed`` gives the same batch).

    Every example lists ``num_pairs`` distinct keys with distinct values, then queries
    ``num_queries`` (default: all) of the keys, each once, in random order, in a region of
    random noise tokens. ``seed``: an int or a ``torch.Generator`` (a training loop's stream).
    """
    num_queries = num_pairs if num_queries is None else num_queries
    _check_shape(num_pairs, seq_len, vocab_size, num_queries)
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    b, d, half = batch_size, num_pairs, vocab_size // 2
    keys = _distinct(b, 1, half, d, gen)                                   # (b, D)
    values = _distinct(b, half, vocab_size, d, gen)                        # (b, D)
    slots = (seq_len - 2 * d) // 2                                         # query positions
    weights = power_a * torch.arange(1, slots + 1, dtype=torch.float64) ** (power_a - 1)
    where = torch.multinomial(weights.expand(b, slots), num_queries, replacement=False,
                              generator=gen)                               # (b, Q) slot indices
    inputs = torch.randint(0, vocab_size, (b, seq_len), generator=gen)     # noise everywhere
    inputs[:, 0:2 * d:2], inputs[:, 1:2 * d:2] = keys, values
    asked = _distinct(b, 0, d, num_queries, gen)                           # which pairs: (b, Q)
    pos = 2 * d + 2 * where                                                # (b, Q) positions
    inputs.scatter_(1, pos, keys.gather(1, asked))
    targets = torch.full((b, seq_len), IGNORE, dtype=torch.long)
    targets.scatter_(1, pos, values.gather(1, asked))
    return MQARBatch(inputs, targets, num_pairs)


# --------------------------------------------------------------------------------- scoring


def recall_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy at the query positions only. logits (b, L, V), targets (b, L)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


def correct_predictions(logits: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
    """(correct, scored): greedy predictions that equal the queried values, and how many
    queries were scored. logits (b, L, V), targets (b, L)."""
    mask = targets != IGNORE
    right = (logits.argmax(-1) == targets) & mask
    return int(right.sum()), int(mask.sum())


@torch.no_grad()
def accuracy(model, batch: MQARBatch, *, chunk: int = 256) -> float:
    """Fraction of the queried values that ``model`` (a causal LM) predicts greedily; only the
    query positions count (the keys, values and noise cannot be predicted)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    right = scored = 0
    try:
        for s in range(0, batch.inputs.shape[0], chunk):
            ids, tgt = batch.inputs[s:s + chunk].to(device), batch.targets[s:s + chunk]
            logits = model(input_ids=ids, use_cache=False).logits.cpu()   # (b, L, V)
            r, n = correct_predictions(logits, tgt)
            right, scored = right + r, scored + n
    finally:
        model.train(was_training)
    return right / scored


# ---------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class RecallModelSpec:
    """One model of the recall experiment: an architecture, its width, depth and state size."""

    arch: str
    d_model: int = 64
    layers: int = 2
    d_state: int = 16
    heads: int = 4
    vocab_size: int = 256
    max_len: int = 128

    @property
    def name(self) -> str:
        tail = f"-n{self.d_state}" if self.arch != "attention" else ""
        return f"{self.arch}-d{self.d_model}-l{self.layers}{tail}"


def recall_config(spec: RecallModelSpec):
    """The transformers config of a recall model: Llama-style attention, Mamba, or a Jamba-style
    hybrid (Mamba layers with one attention layer, dense MLPs) — same width and vocabulary."""
    from transformers import JambaConfig, LlamaConfig, MambaConfig

    if spec.arch not in ARCHS:
        raise RecallError(f"unknown recall architecture {spec.arch!r}; use one of "
                          f"{', '.join(ARCHS)}. See TROUBLESHOOTING.md, section "
                          "'Recall task shapes'.")
    common = dict(vocab_size=spec.vocab_size, hidden_size=spec.d_model,
                  num_hidden_layers=spec.layers, tie_word_embeddings=True,
                  initializer_range=0.02, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if spec.arch == "mamba":
        return MambaConfig(state_size=spec.d_state, expand=2, conv_kernel=4,
                           use_mambapy=False, **common)
    attention = dict(num_attention_heads=spec.heads, num_key_value_heads=spec.heads,
                     intermediate_size=2 * spec.d_model, max_position_embeddings=spec.max_len)
    if spec.arch == "attention":
        return LlamaConfig(head_dim=spec.d_model // spec.heads, **attention, **common)
    # Jamba's pattern: attention once every `attn_layer_period` layers, at the offset (the last)
    return JambaConfig(num_experts=1, num_experts_per_tok=1, expert_layer_period=1,
                       expert_layer_offset=0, attn_layer_period=spec.layers,
                       attn_layer_offset=spec.layers - 1, mamba_d_state=spec.d_state,
                       mamba_d_conv=4, mamba_expand=2, use_mamba_kernels=False,
                       **attention, **common)


def build_model(spec: RecallModelSpec, *, seed: int, device="cpu"):
    """A freshly initialised recall model (float32), seeded."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(recall_config(spec)).to(device)


def parameter_count(model) -> int:
    """Parameters of ``model``, tied embeddings counted once."""
    return sum(p.numel() for p in model.parameters())


def state_elements(spec: RecallModelSpec, seq_len: int) -> int:
    """Numbers a model keeps per sequence to continue after ``seq_len`` tokens: the SSM states
    (d_inner · d_state per Mamba layer; the conv windows excluded) plus the KV cache of its
    attention layers (2 · d_model · seq_len each)."""
    d_inner = 2 * spec.d_model
    mamba_layers = {"attention": 0, "mamba": spec.layers, "hybrid": spec.layers - 1}[spec.arch]
    attention_layers = spec.layers - mamba_layers
    return mamba_layers * d_inner * spec.d_state + attention_layers * 2 * spec.d_model * seq_len


# ------------------------------------------------------------- a differentiable fast scan


def _train_forward(mixer, scan, original, hidden_states, *args, **kwargs):
    _, cache, mask = compat.mixer_inputs((hidden_states, *args), kwargs)
    if cache is not None:  # generation: transformers' own path, untouched
        return original(hidden_states, *args, **kwargs)
    return mixer_prefill(mixer, hidden_states, scan=scan, attention_mask=mask).output


@contextlib.contextmanager
def training_scan(model, scan: Callable | None) -> Iterator[int]:
    """Run every Mamba mixer's cache-free forward through ``effarch.mixer.mixer_prefill`` with
    ``scan`` (a differentiable scan of mamba-ssm's signature) instead of transformers' path;
    restore the mixers on exit. Yields how many mixers were switched (0 when ``scan`` is None).
    """
    from effarch.backends import mamba_mixers

    mixers = mamba_mixers(model) if scan is not None else []
    for m in mixers:
        m.forward = functools.partial(_train_forward, m, _with_keywords(scan), type(m).forward
                                      .__get__(m))
    try:
        yield len(mixers)
    finally:
        for m in mixers:
            del m.forward


def _with_keywords(scan: Callable) -> Callable:
    """mixer_prefill calls ``scan(u, delta, A, B, C, *, D, z, delta_bias, delta_softplus)``."""
    def call(u, delta, A, B, C, *, D, z, delta_bias, delta_softplus):
        return scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, False)
    return call


def scan_by_name(name: str) -> Callable | None:
    """The scan a Mamba arm trains with: ``"transformers"`` (None: the model's own path),
    ``"chunked"`` (``effarch.fast``) or ``"parallel"`` (``effarch.ssm``, log-depth)."""
    from effarch import fast, ssm

    scans = {"transformers": None, "chunked": fast.selective_scan_chunked,
             "parallel": ssm.selective_scan_parallel}
    if name not in scans:
        raise RecallError(f"unknown scan {name!r}; use one of {', '.join(scans)}. See "
                          "TROUBLESHOOTING.md, section 'Recall task shapes'.")
    return scans[name]


# -------------------------------------------------------------------------------- training


@dataclass
class TrainConfig:
    """How one recall model is trained: fresh seeded batches, AdamW, warm-up then cosine."""

    steps: int = 2000
    batch_size: int = 64
    seq_len: int = 128
    pairs: tuple[int, ...] = (4, 8, 16, 32)  # each batch draws one of these
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup: int = 100
    seed: int = 0
    eval_every: int = 250
    eval_examples: int = 256
    scan: str = "parallel"
    max_seconds: float | None = None  # stop early (logged) when a model's training passes this


@dataclass
class TrainResult:
    """The log of one training run: one row per evaluation, and the wall time."""

    name: str
    parameters: int
    config: dict
    log: list[dict] = field(default_factory=list)
    wall_s: float = 0.0
    stopped_early: str | None = None


def _lr(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def evaluate(model, *, pairs: Sequence[int], seq_len: int, vocab_size: int, examples: int,
             seed: int) -> dict[int, float]:
    """Accuracy at each number of pairs on held-out batches (seeds apart from training's)."""
    return {d: accuracy(model, mqar_batch(examples, num_pairs=d, seq_len=seq_len,
                                          vocab_size=vocab_size, seed=10_000_019 * (seed + 1) + d))
            for d in pairs}


def _optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, with weight decay on the matrices but not on embeddings, norms, biases, A_log, D."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))


def _step(model, opt, batch: MQARBatch, lr: float) -> torch.Tensor:
    """One optimiser step on one batch; returns the loss (a 0-d tensor)."""
    device = next(model.parameters()).device
    for group in opt.param_groups:
        group["lr"] = lr
    logits = model(input_ids=batch.inputs.to(device), use_cache=False).logits   # (b, L, V)
    loss = recall_loss(logits, batch.targets.to(device))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.detach()


def train(model, spec: RecallModelSpec, cfg: TrainConfig, *,
          log: Callable[[dict], None] | None = None) -> TrainResult:
    """Train ``model`` on fresh MQAR batches (``cfg.seed`` fixes every batch, each with a number
    of pairs drawn from ``cfg.pairs``) and evaluate every ``cfg.eval_every`` steps on held-out
    batches; ``log(row)`` sees each evaluation row as it is made. Mamba layers train through
    ``cfg.scan`` (:func:`training_scan`)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = _optimizer(model, cfg)
    result = TrainResult(spec.name, parameter_count(model), {**asdict(spec), **asdict(cfg)})
    start = time.perf_counter()
    model.train()
    with training_scan(model, scan_by_name(cfg.scan) if spec.arch != "attention" else None):
        for step in range(cfg.steps):
            d = cfg.pairs[int(torch.randint(len(cfg.pairs), (1,), generator=gen))]
            batch = mqar_batch(cfg.batch_size, num_pairs=d, seq_len=cfg.seq_len,
                               vocab_size=spec.vocab_size, seed=gen)
            loss = _step(model, opt, batch, _lr(step, cfg))
            if (step + 1) % cfg.eval_every and step + 1 != cfg.steps:
                continue
            acc = evaluate(model, pairs=cfg.pairs, seq_len=cfg.seq_len,
                           vocab_size=spec.vocab_size, examples=cfg.eval_examples, seed=cfg.seed)
            row = {"step": step + 1, "loss": loss.item(), "seconds": time.perf_counter() - start,
                   **{f"acc@{k}": v for k, v in acc.items()}}
            result.log.append(row)
            if log is not None:
                log(row)
            if (cfg.max_seconds is not None and row["seconds"] > cfg.max_seconds
                    and step + 1 < cfg.steps):  # the last step is no early stop
                result.stopped_early = f"time cap of {cfg.max_seconds:.0f} s at step {step + 1}"
                break
    result.wall_s = time.perf_counter() - start
    model.eval()
    return result


# ------------------------------------------------------------------------ shipped models

# The set scripts/train_recall.py trains and data/recall ships: the same width, depth and
# vocabulary for all; Mamba at three state sizes (16 is the hybrid's and Mamba's default).
SHIPPED = (RecallModelSpec("attention"), RecallModelSpec("mamba", d_state=4),
           RecallModelSpec("mamba", d_state=16), RecallModelSpec("mamba", d_state=64),
           RecallModelSpec("hybrid", d_state=16))
SHIPPED_TRAINING = TrainConfig(steps=8000, batch_size=64, seq_len=64, pairs=(2, 4, 8, 16),
                               lr=3e-3, warmup=200, eval_every=500, eval_examples=256)
SMOKE = dict(d_model=16, heads=2, vocab_size=64, max_len=32)
SMOKE_TRAINING = TrainConfig(steps=6, batch_size=8, seq_len=32, pairs=(2, 4), warmup=2,
                             eval_every=3, eval_examples=8)
MANIFEST = "manifest.json"


def recall_dir() -> Path:
    """``data/recall``: the shipped recall models, one folder each, and their README."""
    return paths.data_dir() / "recall"


def save(model, result: TrainResult, folder: Path) -> None:
    """Save a trained recall model as fp16 safetensors with its config and training log."""
    folder.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    model.float()
    (folder / "train_log.json").write_text(json.dumps(asdict(result), indent=1) + "\n")


def write_manifest(out: Path, entries: list[dict], meta: dict) -> Path:
    """``<out>/manifest.json``: one entry per model (folder, spec, parameters, final
    accuracies, wall time) and how the run went (device, versions, seed, command)."""
    path = out / MANIFEST
    path.write_text(json.dumps({"models": entries, **meta}, indent=1) + "\n")
    return path


def read_manifest(folder: Path | None = None) -> dict:
    """``manifest.json`` of the recall models in ``folder`` (default ``data/recall``): the models
    and how they were trained (device, versions, wall time). Raises ``FileNotFoundError`` naming
    the section of TROUBLESHOOTING.md when it is missing."""
    path = Path(folder or recall_dir()) / MANIFEST
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(
            f"the recall models are missing or unreadable ({path}: {exc}). Retrain them with "
            "`python scripts/train_recall.py` (GPU: a few minutes) or restore them with "
            "`git checkout -- data/recall`. See TROUBLESHOOTING.md, section "
            "'Missing data files'.") from None


def training_accuracy(folder: Path | None = None, *, step: int | None = None):
    """Held-out accuracy from the shipped models' training logs (``train_log.json``) at one step
    for all: ``step``, or by default the last step every model reached (a model stopped early by
    a time cap reached fewer). A DataFrame, one row per model in manifest order: ``model``,
    ``step`` and one ``acc@<pairs>`` column per number of pairs evaluated during training."""
    import pandas as pd

    folder = Path(folder or recall_dir())
    logs = {}
    for e in read_manifest(folder)["models"]:
        path = folder / e["folder"] / "train_log.json"
        try:
            logs[e["name"]] = json.loads(path.read_text(encoding="utf-8"))["log"]
        except (OSError, ValueError, KeyError) as exc:
            raise FileNotFoundError(
                f"a recall model's training log is missing or unreadable ({path}: {exc}). "
                "See TROUBLESHOOTING.md, section 'Missing data files'.") from None
    reached = {name: {r["step"] for r in log} for name, log in logs.items()}
    common = set.intersection(*reached.values()) if reached else set()
    if step is None:
        if not common:
            raise RecallError("the training logs share no evaluated step; pass step=. See "
                              "TROUBLESHOOTING.md, section 'Recall task shapes'.")
        step = max(common)
    elif step not in common:
        raise RecallError(f"not every model was evaluated at step {step}; common steps: "
                          f"{sorted(common)}. See TROUBLESHOOTING.md, section 'Recall task shapes'.")
    rows = [{"model": name, "step": step,
             **{k: v for r in log if r["step"] == step for k, v in r.items()
                if k.startswith("acc@")}} for name, log in logs.items()]
    return pd.DataFrame(rows)


def load_shipped(folder: Path | None = None, *, device="cpu") -> list[tuple[RecallModelSpec,
                                                                          object, dict]]:
    """The recall models of ``folder`` (default ``data/recall``) in float32, in manifest order:
    ``(spec, model, manifest entry)`` each."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder or recall_dir())
    out = []
    for entry in read_manifest(folder)["models"]:
        spec = RecallModelSpec(**entry["spec"])
        model = AutoModelForCausalLM.from_pretrained(folder / entry["folder"],
                                                     dtype=torch.float32).to(device).eval()
        out.append((spec, model, entry))
    return out


def accuracy_table(loaded, *, pairs: Sequence[int], seq_len: int, examples: int, seed: int):
    """Accuracy of each loaded model at each number of pairs, on the same seeded test batches
    for every model: a DataFrame with model, arch, d_state, parameters, state_elements,
    num_pairs, accuracy, examples."""
    import pandas as pd

    rows = []
    for d in pairs:
        batch = mqar_batch(examples, num_pairs=d, seq_len=seq_len, seed=seed + d,
                           vocab_size=loaded[0][0].vocab_size)
        for spec, model, _ in loaded:
            rows.append({"model": spec.name, "arch": spec.arch,
                         "d_state": spec.d_state if spec.arch != "attention" else 0,
                         "parameters": parameter_count(model),
                         "state_elements": state_elements(spec, seq_len), "num_pairs": d,
                         "accuracy": accuracy(model, batch), "examples": examples})
    return pd.DataFrame(rows)
