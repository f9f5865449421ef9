"""Lab 2.4.5's harness: one protocol, one text, every model — and what the table implies.

:func:`compare` loads each model in turn (never two in memory), runs it on its best path on this
machine, and returns one tidy row per (model, context, batch size): parameters (total and active),
weight bytes, the inference state measured from the real cache object after a forward pass of
``context`` tokens, prefill and decode speed (medians with interquartile ranges, decode counting
generated tokens only, summed over the batch), and quality as bits per byte on the shipped
validation text through the one sliding-window scorer. :func:`save_results` and
:func:`load_results` round-trip a table exactly, so two machines can be put side by side.

From the tables, :func:`decode_crossover` finds the context where one model's decode overtakes
another's (interpolated between measured points), :func:`pareto_front` marks the models that no
other beats on two axes, and :func:`guide` answers four questions of a practitioner.

The paths ("best on this machine"):
- Mamba: ``effarch.fast.MambaFastGenerator`` (Triton scan and a CUDA-graph decode on a GPU, the
  chunked scan on a CPU); ``fallback=True`` runs transformers' own path instead, for contrast.
- attention-only models on a CUDA GPU: a static KV cache with the one-token forward compiled by
  ``torch.compile`` (mode ``reduce-overhead``: CUDA graphs) — what ``generate()`` does with
  ``cache_implementation="static"`` — in the same greedy loop as every other model.
- everything else (a hybrid, any model on a CPU): transformers eager with its dynamic cache.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from effarch import backends, bench, compat, data, fast, memory, models
from effarch.decoding import TransformersDecoder
from effarch.paths import TROUBLE
from effarch.quality import evaluate_text

FAMILIES = ("transformer", "mamba", "moe", "hybrid")
QUALITY_WINDOW, QUALITY_STRIDE = 512, 448  # the zoo's final evaluation (data/zoo/zoo_config.json)
QUALITY_CHARS_PER_DOMAIN = 10_000
COLUMNS = (
    "model", "family", "context", "batch_size", "total_params", "active_params", "weight_bytes",
    "state_bytes", "kv_bytes", "ssm_bytes", "prefill_s", "prefill_s_iqr", "decode_tok_s",
    "decode_tok_s_iqr", "decode_ms_per_token", "peak_memory_bytes", "bits_per_byte",
    "perplexity", "tokenizer", "weights", "new_tokens", "repeats", "device", "device_name",
    "dtype", "path", "mamba_path", "profile", "torch_version", "transformers_version")
_OOM = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), MemoryError)


class CompareError(ValueError):
    """Bad input to the harness or to the functions of its tables; names the section to read."""


# ----------------------------------------------------------------------------- what a model is


def family_of(cfg) -> str:
    """``"hybrid"`` for a model with both SSM and attention layers (whatever its MLPs),
    ``"mamba"`` for SSM layers only, ``"moe"`` for attention with routed experts (fewer active
    than total parameters), else ``"transformer"``."""
    ssm = memory.ssm_state_bytes(cfg, batch=1) > 0
    attention = memory.kv_cache_bytes(cfg, 1, 1) > 0
    if ssm and attention:
        return "hybrid"
    if ssm:
        return "mamba"
    counts = memory.count_params(cfg)
    return "moe" if counts.active < counts.total else "transformer"


def expected_state_bytes(cfg, context: int, batch_size: int, dtype) -> int:
    """Lab 2.4.1's formulas for the state after ``context`` tokens: the KV cache of the attention
    layers plus the conv and SSM states of the Mamba layers (SSM state in float32, as
    transformers and ``effarch.fast`` keep it)."""
    return (memory.kv_cache_bytes(cfg, context, batch_size, dtype)
            + memory.ssm_state_bytes(cfg, batch_size, dtype, "float32"))


# ------------------------------------------------------------------------------- the decoders


class StaticCacheDecoder:
    """A transformers causal LM decoding over a ``StaticCache`` of ``max_cache_len`` positions,
    its one-token steps through ``step_fn`` (e.g. the model's forward compiled with
    ``torch.compile``; default the model itself). Satisfies ``effarch.decoding.Decoder``.

    The cache is preallocated and updated in place, so every step has the same shapes — what
    CUDA graphs need. Prompts must be unpadded; prompt plus steps must fit ``max_cache_len``.
    """

    def __init__(self, model, *, max_cache_len: int, step_fn=None, label: str = "static cache"):
        first = next(model.parameters())
        self.module, self.device, self.dtype = model, first.device, first.dtype
        self.mamba_path = backends.mamba_path(model)
        self.model_class = f"{type(model).__name__} ({label})"
        self.max_cache_len, self._step_fn = max_cache_len, step_fn or model
        self._cache_name = compat.cache_keyword(compat.forward_params(model))
        self.cache, self._batch = None, None

    def prefill(self, input_ids, *, attention_mask=None):
        from transformers import StaticCache

        if attention_mask is not None or input_ids.shape[1] >= self.max_cache_len:
            raise CompareError(f"a static-cache prompt must be unpadded and shorter than "
                               f"{self.max_cache_len} tokens; {TROUBLE} 'Comparing models'.")
        if self._batch != input_ids.shape[0]:  # a cache's batch size is fixed at first use
            self.cache = StaticCache(config=self.module.config, max_cache_len=self.max_cache_len)
            self._batch = input_ids.shape[0]
        else:
            self.cache.reset()
        out = self.module(input_ids=input_ids, use_cache=True, logits_to_keep=1,
                          **{self._cache_name: self.cache})
        return out.logits[:, -1, :]

    def step(self, token):
        out = self._step_fn(input_ids=token.view(-1, 1), use_cache=True,
                            **{self._cache_name: self.cache})
        return out.logits[:, -1, :]

    def all_logits(self, input_ids):
        return self.module(input_ids=input_ids, use_cache=False).logits


def compiled_step(model):
    """The model's forward compiled as ``generate()`` compiles it for a static cache
    (``torch.compile`` with its default ``CompileConfig``: mode ``reduce-overhead``, i.e. CUDA
    graphs; dynamic shapes so that a new context or batch does not recompile from scratch)."""
    return torch.compile(model.__call__, mode="reduce-overhead", fullgraph=False, dynamic=True)


def best_decoder(model, *, max_cache_len: int, fallback: bool = False, step_fn=None):
    """``(decoder, path)``: the best way to decode ``model`` on its device, and its name.

    ``fallback=True`` gives transformers' eager path with its dynamic cache (for contrast);
    ``step_fn`` reuses one compiled step across contexts (see :func:`compiled_step`).
    """
    cfg, on_gpu = model.config, next(model.parameters()).device.type == "cuda"
    family = family_of(cfg)
    if not fallback and getattr(cfg, "model_type", "") == "mamba":
        gen = fast.MambaFastGenerator(model)
        return gen, gen.path
    if not fallback and on_gpu and family in ("transformer", "moe"):
        how = "static cache + torch.compile" if step_fn is not None else "static cache, eager"
        dec = StaticCacheDecoder(model, max_cache_len=max_cache_len, step_fn=step_fn, label=how)
        return dec, f"transformers, {how}" + (" (reduce-overhead)" if step_fn is not None else "")
    mamba = backends.mamba_path(model)
    where = "" if mamba == "n/a" else f"; Mamba layers: {mamba}"
    return TransformersDecoder(model), f"transformers eager, dynamic cache{where}"


# ----------------------------------------------------------------------------- measurements


def validation_excerpt(chars_per_domain: int = QUALITY_CHARS_PER_DOMAIN) -> str:
    """The lab's quality text: the first ``chars_per_domain`` characters of each domain of the
    shipped validation split (cut at a line end), joined — every domain weighs the same."""
    parts = []
    for domain in data.DOMAINS:
        text = data.domain_text("validation", domain)
        cut = text.rfind("\n", 0, chars_per_domain)
        parts.append(text[: cut if cut > 0 else chars_per_domain])
    return data.DOC_SEPARATOR.join(parts)


def prompt_ids(tokenizer, text: str, length: int, batch_size: int) -> torch.Tensor:
    """The first ``length`` tokens of ``text`` (repeated when too short), one copy per row:
    (batch_size, length) — every model reads the same prompt."""
    ids = torch.as_tensor(tokenizer(text)["input_ids"]).flatten()  # (N,)
    if ids.numel() == 0:
        raise CompareError(f"the prompt text has no tokens; {TROUBLE} 'Comparing models'.")
    ids = ids.repeat(math.ceil(length / ids.numel()))[:length]
    return ids.expand(batch_size, length).clone()


@torch.no_grad()
def state_after_prefill(decoder, input_ids: torch.Tensor) -> memory.CacheBytes:
    """Bytes of the inference state after a forward pass of ``input_ids`` (b, l), counted on
    the real cache object: the fast Mamba generator's own state tensors, or the cache a
    transformers forward returns (a dynamic cache holds exactly the l positions)."""
    if isinstance(decoder, fast.MambaFastGenerator):
        decoder.prefill(input_ids)
        return memory.measure_cache_bytes(decoder)
    out = decoder.module(input_ids=input_ids, use_cache=True, logits_to_keep=1)
    return memory.measure_cache_bytes(compat.returned_cache(out))


def time_generation(decoder, input_ids: torch.Tensor, *, new_tokens: int, repeats: int,
                    warmup: int = 1) -> dict:
    """Prefill seconds and decode tokens/s (b·(n − 1) generated tokens after the first, over
    decode time), median and interquartile range of ``repeats`` runs after ``warmup``; the
    decode loop runs unsynchronised, as a serving loop does."""
    runs = [bench.measure_generation(decoder, input_ids, new_tokens=new_tokens,
                                     warmup=warmup if i == 0 else 0, repeats=1,
                                     sync_every_token=False) for i in range(repeats)]
    prefill = bench.Timing.from_samples([r.ttft_s for r in runs])
    decode = bench.Timing.from_samples([r.decode_tokens_per_s for r in runs])
    peaks = [r.peak_memory_bytes for r in runs if r.peak_memory_bytes is not None]
    b = input_ids.shape[0]
    return {"prefill_s": prefill.median, "prefill_s_iqr": prefill.iqr,
            "decode_tok_s": decode.median, "decode_tok_s_iqr": decode.iqr,
            "decode_ms_per_token": 1e3 * b / decode.median,
            "peak_memory_bytes": max(peaks) if peaks else None, "record": runs[0]}


def quality(decoder, tokenizer, text: str, *, random_weights: bool,
            window: int = QUALITY_WINDOW, stride: int = QUALITY_STRIDE) -> dict:
    """Bits per byte and token perplexity of ``text`` through the one scorer
    (``quality.evaluate_text``), NaN for random weights (there is no quality to measure)."""
    if random_weights:
        return {"bits_per_byte": math.nan, "perplexity": math.nan}
    res = evaluate_text(decoder, tokenizer, text, window, stride)
    return {"bits_per_byte": res.bits_per_byte, "perplexity": res.perplexity}


# ---------------------------------------------------------------------------------- the harness


@dataclass(frozen=True)
class Protocol:
    """What every model is run through: the (batch size, context) shapes, tokens and repeats,
    the text (prompts and quality), the dtype and device, and whether the fallback path runs."""

    shapes: tuple[tuple[int, int], ...]  # (batch size, context), in the order measured
    new_tokens: int
    repeats: int
    weights: str
    dtype: object
    device: str | None
    text: str
    fallback: bool
    overrides: dict | None


def compare(model_names: Sequence[str], *, contexts: Sequence[int],
            batch_sizes: Sequence[int] = (1,), batch_contexts: Sequence[int] | None = None,
            new_tokens: int = 16, repeats: int = 3, weights: str | None = None, dtype=None,
            device: str | None = None, text: str | None = None, fallback: bool = False,
            overrides: dict | None = None, progress: bool = True):
    """Measure every model in ``model_names`` (registry or zoo names), one model in memory at a
    time: a DataFrame with the columns of ``COLUMNS``, one row per (model, context, batch size).
    Rows past a model's position limit, or out of memory, are left out and listed in
    ``df.attrs["skipped"]`` with the reason.

    Shapes: every context at every batch size, or, with ``batch_contexts``, every context at the
    first batch size and the other batch sizes at ``batch_contexts`` only (a context sweep and a
    batch sweep from one load of each model). ``weights``: ``"pretrained"`` or ``"random"``
    (default: the profile's); ``text``: prompts and quality text (default
    :func:`validation_excerpt`); ``fallback=True`` runs transformers' own path for every model
    (the contrast to the best path); ``overrides`` change the configs of random weights.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from effarch.profile import get_profile

    proto = _protocol(contexts=contexts, batch_sizes=batch_sizes, batch_contexts=batch_contexts,
                      new_tokens=new_tokens, repeats=repeats, weights=weights, dtype=dtype,
                      device=device, text=text, fallback=fallback, overrides=overrides,
                      prof=get_profile())
    rows, skipped, notes = [], [], {}
    for name in tqdm(list(model_names), desc="models", disable=not progress):
        model_rows, model_skipped, notes[name] = _measure_model(name, proto, progress=progress)
        rows += model_rows
        skipped += model_skipped
        models.unload()  # the model was local to _measure_model: now it is really gone
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    df.attrs.update(skipped=skipped, notes=notes, quality_window=QUALITY_WINDOW,
                    quality_stride=QUALITY_STRIDE, text_chars=len(proto.text))
    return df


def _shapes(contexts, batch_sizes, batch_contexts) -> tuple[tuple[int, int], ...]:
    contexts, batch_sizes = [int(c) for c in contexts], [int(b) for b in batch_sizes]
    batch_contexts = contexts if batch_contexts is None else [int(c) for c in batch_contexts]
    values = contexts + batch_sizes + batch_contexts
    if not contexts or not batch_sizes or min(values) < 1:
        raise CompareError(f"contexts and batch sizes need positive values, got {contexts}, "
                           f"{batch_sizes} and {batch_contexts}; {TROUBLE} 'Comparing models'.")
    first = [(batch_sizes[0], c) for c in contexts]
    rest = [(b, c) for b in batch_sizes[1:] for c in batch_contexts]
    return tuple(dict.fromkeys(first + rest))


def _protocol(*, contexts, batch_sizes, batch_contexts, new_tokens, repeats, weights, dtype,
              device, text, fallback, overrides, prof) -> Protocol:
    if new_tokens < 2 or repeats < 1:
        raise CompareError(f"need new_tokens >= 2 (the first comes from the prefill) and "
                           f"repeats >= 1, got {new_tokens} and {repeats}; {TROUBLE} "
                           "'Comparing models'.")
    return Protocol(_shapes(contexts, batch_sizes, batch_contexts), new_tokens, repeats,
                    weights or ("random" if prof.random_weights else "pretrained"), dtype,
                    device, text if text is not None else validation_excerpt(), fallback,
                    overrides)


@dataclass
class _Arm:
    """The compiled decode step of one model (None: no compiled arm), and why it was given up
    if it failed (then every later shape runs eager, its path saying so)."""

    step_fn: object = None
    failure: str | None = None


def _measure_model(name: str, proto: Protocol, *, progress: bool):
    """(rows, skipped, notes) of one model; the model lives in this frame only."""
    lm = models.load_model(name, weights=proto.weights, dtype=proto.dtype, device=proto.device,
                           overrides=proto.overrides)
    if lm.tokenizer is None:
        raise CompareError(f"{name} was loaded without a tokenizer, so it cannot read the "
                           f"lab's text; {TROUBLE} 'Missing data files'.")
    model, tok = lm.model, lm.tokenizer
    arm = _Arm()
    if not proto.fallback and model.device.type == "cuda" and \
            family_of(model.config) in ("transformer", "moe"):
        arm.step_fn = compiled_step(model)
    try:
        base = _model_fields(name, lm, proto, arm.step_fn)
        rows, skipped = _sweep(model, tok, base, proto, arm, progress=progress)
    finally:
        if arm.step_fn is not None or arm.failure is not None:
            torch.compiler.reset()  # compiled code holds the model: drop it with the model
    return rows, skipped, list(lm.record.notes)


def _model_fields(name, lm, proto, step_fn) -> dict:
    """The columns that are the same on every row of one model (quality included)."""
    from effarch.plots import device_name
    from effarch.profile import get_profile

    model, cfg, rec = lm.model, lm.model.config, lm.record
    counts = memory.count_params(cfg)
    dec, _ = best_decoder(model, max_cache_len=QUALITY_WINDOW + 1, fallback=proto.fallback,
                          step_fn=step_fn)
    limit = bench.position_limit(model)
    window = min(QUALITY_WINDOW, limit or QUALITY_WINDOW)
    q = quality(dec, lm.tokenizer, proto.text, random_weights=rec.random_weights, window=window,
                stride=min(QUALITY_STRIDE, window))
    return {"model": name, "family": family_of(cfg), "total_params": counts.total,
            "active_params": counts.active, "weight_bytes": rec.parameter_bytes, **q,
            "tokenizer": rec.tokenizer, "weights": proto.weights, "new_tokens": proto.new_tokens,
            "repeats": proto.repeats, "device": str(model.device),
            "device_name": device_name(str(model.device)), "dtype": str(model.dtype),
            "profile": get_profile().name, "torch_version": torch.__version__,
            "transformers_version": compat.transformers_version()}


def _sweep(model, tok, base: dict, proto: Protocol, arm: _Arm, *, progress: bool):
    """One row per (batch size, context) of one model, and the skipped ones with reasons."""
    from tqdm.auto import tqdm

    limit = bench.position_limit(model)
    rows, skipped = [], []
    for b, c in tqdm(proto.shapes, desc=base["model"], disable=not progress, leave=False):
        reason = None
        if limit is not None and c + proto.new_tokens > limit:
            reason = (f"prompt {c} + {proto.new_tokens} new tokens exceeds "
                      f"max_position_embeddings={limit}")
        else:
            ids = prompt_ids(tok, proto.text, c, b).to(model.device)
            try:
                rows.append({**base, **_measure_shape(model, ids, proto, arm)})
            except _OOM as exc:
                reason = f"out of memory ({type(exc).__name__})"
                models.unload()
        if reason is not None:
            skipped.append({"model": base["model"], "context": c, "batch_size": b,
                            "reason": reason})
    return rows, skipped


def _measure_shape(model, ids: torch.Tensor, proto: Protocol, arm: _Arm) -> dict:
    """The measured columns at one (batch size, context): state bytes, then the timings."""
    b, c = ids.shape
    dec, path = best_decoder(model, max_cache_len=c + proto.new_tokens, fallback=proto.fallback,
                             step_fn=arm.step_fn)
    if arm.failure is not None:
        dec, path = TransformersDecoder(model), arm.failure
    state = state_after_prefill(dec, ids)
    try:
        timing = time_generation(dec, ids, new_tokens=proto.new_tokens, repeats=proto.repeats)
    except _OOM:
        raise
    except Exception as exc:  # a compiled arm that fails still leaves measured rows, eager
        if arm.step_fn is None:
            raise
        arm.step_fn, arm.failure = None, (
            f"transformers eager, dynamic cache (static cache + torch.compile failed: "
            f"{type(exc).__name__}: {str(exc)[:80]})")
        dec, path = TransformersDecoder(model), arm.failure
        timing = time_generation(dec, ids, new_tokens=proto.new_tokens, repeats=proto.repeats)
    record = timing.pop("record")
    return {"context": c, "batch_size": b, "state_bytes": state.total,
            "kv_bytes": state.key_value, "ssm_bytes": state.conv + state.ssm, **timing,
            "path": path, "mamba_path": record.mamba_path}


def combine(*tables):
    """Tables of the harness as one: rows appended in order, ``attrs["skipped"]`` lists joined,
    ``attrs["notes"]`` merged (the other attrs from the first table)."""
    import pandas as pd

    if not tables:
        raise CompareError(f"nothing to combine; {TROUBLE} 'Comparing models'.")
    df = pd.concat(tables, ignore_index=True)
    df.attrs = {**tables[0].attrs,
                "skipped": [s for t in tables for s in t.attrs.get("skipped", [])],
                "notes": {k: v for t in tables for k, v in t.attrs.get("notes", {}).items()}}
    return df


# ------------------------------------------------------------------------ saving and loading


FORMAT = "effarch.compare/1"


def save_results(df, path) -> Path:
    """Write a harness table to ``path`` (JSON: columns, dtypes, values as Python writes them —
    floats exactly — and ``df.attrs``); :func:`load_results` reads it back equal."""
    path = Path(path)
    columns = {c: [_plain(v) for v in df[c].tolist()] for c in df.columns}
    doc = {"format": FORMAT, "dtypes": {c: str(df[c].dtype) for c in df.columns},
           "columns": columns, "index": [_plain(v) for v in df.index.tolist()],
           "attrs": df.attrs}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, allow_nan=True) + "\n", encoding="utf-8")
    return path


def _plain(value):
    """A JSON-writable Python value (numpy scalars to Python; NaN stays a float)."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (str, bytes)) else value


def load_results(path):
    """Read a table written by :func:`save_results`: same columns, dtypes, values and attrs."""
    import pandas as pd

    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CompareError(f"cannot read a results table from {path}: {exc}. {TROUBLE} "
                           "'Comparing models'.") from exc
    if doc.get("format") != FORMAT:
        raise CompareError(f"{path} is not a table written by effarch.compare.save_results "
                           f"(format {doc.get('format')!r}); {TROUBLE} 'Comparing models'.")
    df = pd.DataFrame({c: pd.Series(v, dtype=_dtype(doc["dtypes"][c]))
                       for c, v in doc["columns"].items()})
    df.index = pd.Index(doc["index"])
    df.attrs.update(doc["attrs"])
    return df


def _dtype(name: str):
    """A dtype name as pandas wrote it; pandas 3's default string dtype is called "str"."""
    return object if name == "object" else name


# ------------------------------------------------------------------------------ the crossover


@dataclass(frozen=True)
class Crossover:
    """Where ``challenger``'s decode overtakes ``incumbent``'s, from the measured points.

    ``context``: interpolated (linear in log2 of the context between the two measured contexts
    that bracket the first change of sign), or None when the sign does not change from behind to
    ahead in the measured range; then ``trend_context`` is where a straight line through the last
    two gaps (in log2 of the context) would cross, if it would (an extrapolation, not a
    measurement). ``sentence`` says it in words."""

    challenger: str
    incumbent: str
    batch_size: int
    contexts: tuple[int, ...]
    gaps: tuple[float, ...]  # challenger − incumbent decode tokens/s at each context
    context: float | None
    trend_context: float | None
    sentence: str


def crossover_context(contexts: Sequence[float], rate_a: Sequence[float],
                      rate_b: Sequence[float]) -> float | None:
    """The context where ``rate_a`` (e.g. Mamba's decode tokens/s) first overtakes ``rate_b``:
    between the first pair of consecutive contexts where a − b goes from ≤ 0 to > 0, linear
    interpolation of a − b in log2(context); None if a never overtakes b in the range. Contexts
    ascending. A context where a − b is already > 0 at the first point is not a crossover."""
    gaps = [a - b for a, b in zip(rate_a, rate_b, strict=True)]
    for i in range(1, len(gaps)):
        if gaps[i - 1] <= 0 < gaps[i]:
            x0, x1 = math.log2(contexts[i - 1]), math.log2(contexts[i])
            x = x0 + (x1 - x0) * (-gaps[i - 1]) / (gaps[i] - gaps[i - 1])
            return 2.0 ** x
    return None


def _rates(table, model: str, batch_size: int):
    rows = table[(table["model"] == model) & (table["batch_size"] == batch_size)]
    if rows.empty:
        raise CompareError(f"no measured rows of {model!r} at batch size {batch_size}; models in "
                           f"the table: {sorted(set(table['model']))}. {TROUBLE} "
                           "'Comparing models'.")
    return rows.set_index("context")["decode_tok_s"].sort_index()


def decode_crossover(table, challenger: str, incumbent: str, *,
                     batch_size: int = 1) -> Crossover:
    """:func:`crossover_context` on a harness table, at the contexts both models were measured
    at, with a sentence that says what the data show (and, without a crossover, what the trend
    implies, labelled as an extrapolation)."""
    a, b = _rates(table, challenger, batch_size), _rates(table, incumbent, batch_size)
    common = a.index.intersection(b.index)
    if len(common) < 2:
        raise CompareError(f"{challenger} and {incumbent} share {len(common)} measured context(s) "
                           f"at batch size {batch_size}; a crossover needs at least two. "
                           f"{TROUBLE} 'Comparing models'.")
    ctx = [int(c) for c in common]
    gaps = tuple(float(a[c] - b[c]) for c in ctx)
    at = crossover_context(ctx, a[common].tolist(), b[common].tolist())
    trend = None if at is not None else _trend_crossing(ctx, gaps)
    return Crossover(challenger, incumbent, batch_size, tuple(ctx), gaps, at, trend,
                     _crossover_sentence(challenger, incumbent, ctx, gaps, at, trend))


def _trend_crossing(contexts: Sequence[int], gaps: Sequence[float]) -> float | None:
    """Where the line through the last two gaps (in log2 context) reaches 0, if it does beyond
    the measured range while closing the gap; None otherwise."""
    (x0, g0), (x1, g1) = [(math.log2(c), g) for c, g in zip(contexts[-2:], gaps[-2:], strict=True)]
    if g1 > 0 or g1 <= g0:  # already ahead, or not closing
        return None
    return 2.0 ** (x1 + (x1 - x0) * (-g1) / (g1 - g0))


def _crossover_sentence(a, b, ctx, gaps, at, trend) -> str:
    span = f"{ctx[0]:,}–{ctx[-1]:,} tokens"
    if at is not None:
        return (f"{a}'s decode overtakes {b}'s at about {at:,.0f} tokens of context "
                f"(interpolated between measured points; measured {span}).")
    if all(g > 0 for g in gaps):
        return (f"{a} decodes faster than {b} at every measured context ({span}): the "
                f"crossover, if any, lies below {ctx[0]:,} tokens.")
    if all(g <= 0 for g in gaps) and trend is not None:
        return (f"{b} decodes faster at every measured context ({span}), but the gap is "
                f"closing: a straight line through the last two points (log context) would "
                f"cross near {trend:,.0f} tokens — an extrapolation, not a measurement.")
    if all(g <= 0 for g in gaps):
        return (f"{b} decodes faster at every measured context ({span}) and the gap is not "
                f"closing at the longest contexts: no crossover is implied by this trend.")
    return (f"{a} is ahead at some contexts and behind at others without overtaking from behind "
            f"({span}): the difference is within the noise or changes direction.")


# ---------------------------------------------------------------------------- Pareto and guide


def pareto_front(points: Sequence[tuple[float, float]], *, maximize: tuple[bool, bool]
                 ) -> list[bool]:
    """For each (x, y) point, whether no other point is at least as good on both axes and
    strictly better on one (``maximize`` says which direction is better on each axis). NaN
    points are never on the front."""
    def better_or_equal(p, q, i):
        return p[i] >= q[i] if maximize[i] else p[i] <= q[i]

    def dominates(p, q):
        return (better_or_equal(p, q, 0) and better_or_equal(p, q, 1)
                and (p[0] != q[0] or p[1] != q[1]))

    valid = [not any(math.isnan(v) for v in p) for p in points]
    return [ok and not any(v and dominates(q, p) for q, v in zip(points, valid, strict=True))
            for p, ok in zip(points, valid, strict=True)]


@dataclass(frozen=True)
class Answer:
    """One question of the guide: the model (or architecture) the data favour, and why, in a
    sentence generated from the numbers."""

    question: str
    answer: str
    because: str


QUESTIONS = ("memory-bound long context", "throughput at batch", "quality per active parameter",
             "recall-heavy task")


def _fmt_bytes(n: float) -> str:
    from effarch.plots import format_bytes

    return format_bytes(n)


def _shared_longest(rows, column: str = "context") -> int:
    """The largest value of ``column`` measured for at least two models (else the largest)."""
    counts = rows.groupby(column)["model"].nunique()
    shared = counts[counts >= 2]
    return int((shared if not shared.empty else counts).index.max())


def _moe_note(rows) -> str:
    moe = rows[rows["family"] == "moe"].drop_duplicates("model")
    return "".join(f" {r.model} keeps all {r.total_params / 1e6:,.1f} M parameters resident "
                   f"although only {r.active_params / 1e6:,.1f} M are active per token: an MoE "
                   "saves compute per token, not memory." for r in moe.itertuples())


def choose_for_memory(table) -> Answer:
    """The model with the smallest weights + inference state at the longest context that at
    least two models reached, at the largest batch measured there (weights count every
    parameter: all of an MoE's experts are resident)."""
    context = _shared_longest(table)
    at = table[table["context"] == context]
    batch = int(at["batch_size"].max())
    at = at[at["batch_size"] == batch].assign(
        footprint=lambda d: d["weight_bytes"] + d["state_bytes"])
    best = at.loc[at["footprint"].idxmin()]
    others = "; ".join(f"{r.model} {_fmt_bytes(r.footprint)}" for r in
                       at.sort_values("footprint").itertuples() if r.model != best["model"])
    further = sorted(set(table.loc[table["context"] > context, "model"]))
    reach = f" Only {', '.join(further)} measured beyond {context:,} tokens." if further else ""
    return Answer(QUESTIONS[0], best["model"],
                  f"At {context:,} tokens and batch {batch}, {best['model']} needs "
                  f"{_fmt_bytes(best['weight_bytes'])} of weights + "
                  f"{_fmt_bytes(best['state_bytes'])} of state = {_fmt_bytes(best['footprint'])}"
                  f" (others: {others or 'none measured'}).{reach}{_moe_note(at)}")


def choose_for_throughput(table) -> Answer:
    """The model with the most decode tokens/s (summed over the batch) at the largest batch
    size, at the longest context at least two models reached at that batch."""
    batch = int(table["batch_size"].max())
    rows = table[table["batch_size"] == batch]
    context = _shared_longest(rows)
    at = rows[rows["context"] == context].sort_values("decode_tok_s", ascending=False)
    best = at.iloc[0]
    lead = ""
    if len(at) > 1:
        second = at.iloc[1]
        spread = max(best["decode_tok_s_iqr"], second["decode_tok_s_iqr"])
        margin = best["decode_tok_s"] - second["decode_tok_s"]
        lead = (f"; {margin:,.0f} tok/s ahead of {second['model']}, "
                f"{'more than' if margin > spread else 'within'} the spread ({spread:,.0f})")
    return Answer(QUESTIONS[1], best["model"],
                  f"At batch {batch} and {context:,} tokens, {best['model']} decodes "
                  f"{best['decode_tok_s']:,.0f} tok/s ({best['path']}){lead}.")


def choose_for_quality(table) -> Answer:
    """Among models whose quality was measured: the Pareto front of (active parameters, bits
    per byte) — no other model has fewer active parameters and lower bits per byte — and on it
    the lowest bits per byte."""
    per_model = table.drop_duplicates("model")
    per_model = per_model[per_model["bits_per_byte"].notna()]
    if per_model.empty:
        return Answer(QUESTIONS[2], "not measured",
                      "No model has a quality figure (random weights: bits per byte is NaN).")
    points = list(zip(per_model["active_params"].astype(float), per_model["bits_per_byte"],
                      strict=True))
    front = per_model[pareto_front(points, maximize=(False, False))]
    best = front.loc[front["bits_per_byte"].idxmin()]
    listed = "; ".join(f"{r.model} {r.bits_per_byte:.3f} bits/byte with "
                       f"{r.active_params / 1e6:,.2f} M active" for r in per_model.itertuples())
    off = sorted(set(per_model["model"]) - set(front["model"]))
    return Answer(QUESTIONS[2], best["model"],
                  f"{listed}. Front (nothing has fewer active parameters and lower bits/byte): "
                  f"{', '.join(front['model'])}"
                  f"{'; dominated: ' + ', '.join(off) if off else ''}.")


def _accuracy_noise(row) -> float:
    """Standard error of a recall accuracy over its scored queries (examples × pairs); 0 when
    the table does not say how many were scored."""
    n = getattr(row, "examples", None)
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return 0.0
    p, scored = float(row["accuracy"]), float(n) * float(row["num_pairs"])
    return math.sqrt(max(p * (1 - p), 1 / scored) / scored)


def choose_for_recall(recall) -> Answer:
    """The recall model with the highest accuracy at the largest number of key-value pairs
    measured — or a tie when the runner-up is within two standard errors of the sampling noise —
    and the smallest Mamba state that reached 90% there (if any)."""
    if recall is None or len(recall) == 0:
        return Answer(QUESTIONS[3], "not measured",
                      "No recall table was given: pass the accuracies of Part E.")
    pairs = int(recall["num_pairs"].max())
    at = recall[recall["num_pairs"] == pairs].sort_values("accuracy", ascending=False)
    best, answer = at.iloc[0], at.iloc[0]["arch"]
    if len(at) > 1:
        second = at.iloc[1]
        noise = 2 * math.hypot(_accuracy_noise(best), _accuracy_noise(second))
        if best["accuracy"] - second["accuracy"] <= noise and second["arch"] != best["arch"]:
            answer = f"no clear winner ({best['arch']} and {second['arch']} within the noise)"
    scores = "; ".join(f"{r.model} {r.accuracy:.1%}" for r in at.itertuples())
    mamba = at[at["arch"] == "mamba"].sort_values("d_state")
    # against 90%, with each accuracy's sampling noise (2 standard errors): a hard threshold
    # would flip between runs for a model at 89.9% or 90.1%
    noise = {i: 2 * _accuracy_noise(r) for i, r in mamba.iterrows()}
    above = [i for i, r in mamba.iterrows() if r["accuracy"] - noise[i] >= 0.9]
    near = [i for i, r in mamba.iterrows() if abs(r["accuracy"] - 0.9) < noise[i]]
    states = ", ".join(map(str, mamba["d_state"]))
    if mamba.empty:
        state = ""
    elif above:
        state = f" Mamba held 90% beyond its sampling noise from d_state {int(mamba.loc[above[0], 'd_state'])}."
    elif near:
        state = (f" No Mamba state tried (d_state {states}) is clearly above 90%; d_state "
                 f"{', '.join(str(int(mamba.loc[i, 'd_state'])) for i in near)} within the "
                 "sampling noise of it.")
    else:
        state = f" No Mamba state tried (d_state {states}) reached 90%."
    return Answer(QUESTIONS[3], answer, f"At {pairs} key-value pairs: {scores}.{state}")


def guide(table, recall=None):
    """The four answers as a DataFrame (question, answer, because), each computed from the
    measured tables by the ``choose_for_*`` function of its question."""
    import pandas as pd

    answers = [choose_for_memory(table), choose_for_throughput(table),
               choose_for_quality(table), choose_for_recall(recall)]
    return pd.DataFrame([vars(a) for a in answers])
