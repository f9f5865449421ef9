"""The measurement protocol: timing, device memory, prefill against decode, context sweeps.

The protocol: warm up before timing; synchronise the device around every
timed region; report the median and spread of several repeats; reset peak memory after the model
is loaded; time to first token (prefill) and decode (generated tokens only) are separate figures;
every result records the device, dtype, profile and which Mamba path ran.

Letters in shape comments: b batch, l prompt length, n new tokens, V vocabulary, N text tokens.

Generation here is a greedy loop over ``effarch.decoding``'s interface (a transformers model over
its cache, or ``effarch.fast``'s generator), not timed ``generate()`` calls, so prefill and decode
are separated exactly; a test checks that it produces the same tokens as ``generate()``.
"""

from __future__ import annotations

import contextlib
import gc
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

import torch

from effarch import compat
from effarch.decoding import Decoder, as_decoder, inference
from effarch.paths import TROUBLE

if TYPE_CHECKING:
    import pandas as pd

# The clock every timed region reads; a module attribute so that tests can substitute a fake one.
_clock = time.perf_counter



@contextlib.contextmanager
def _no_gc():
    """Collect garbage first, then keep the collector off while timing (as ``timeit`` does): a
    collection in the middle of a timed step would be counted as that step's cost."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# --------------------------------------------------------------------------------------------
# device: synchronisation and memory
# --------------------------------------------------------------------------------------------

def _device(device) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def synchronize(device) -> None:
    """Wait for the device's queued work: CUDA and MPS run asynchronously, the CPU does not."""
    kind = _device(device).type
    if kind == "cuda":
        torch.cuda.synchronize(device)
    elif kind == "mps":
        torch.mps.synchronize()


def reset_peak_memory(device) -> None:
    """Start a new peak: CUDA's allocator statistics; on other devices there is nothing to reset
    (their "peak" is sampled, see `peak_memory_bytes`)."""
    dev = _device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def current_memory_bytes(device) -> int | None:
    """Memory in use now: CUDA tensors allocated, MPS tensors allocated, or the process's resident
    set size (RSS, via psutil) on the CPU; None when it cannot be read."""
    dev = _device(device)
    if dev.type == "cuda":
        return torch.cuda.memory_allocated(dev)
    if dev.type == "mps":
        return torch.mps.current_allocated_memory()
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss


def peak_memory_bytes(device) -> int | None:
    """The peak since `reset_peak_memory` on CUDA (``torch.cuda.max_memory_allocated``).

    Elsewhere no resettable peak exists (``resource.getrusage``'s high-water mark never goes
    down), so this returns the current reading; the harness samples it between steps, which
    gives a lower bound on the true peak (activations inside a forward are missed) and, on the
    CPU, counts RSS — every allocation of the process, including the allocator's free lists.
    """
    dev = _device(device)
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev)
    return current_memory_bytes(dev)


def memory_measure(device) -> str:
    """What `peak_memory_bytes` measures on this device, for the record."""
    return {"cuda": "cuda max_memory_allocated",
            "mps": "mps allocated, sampled between steps"}.get(
        _device(device).type, "process RSS, sampled between steps")


class _MemoryMeter:
    """Peak memory above the memory in use when the meter started."""

    def __init__(self, device) -> None:
        self.device = _device(device)
        synchronize(self.device)
        reset_peak_memory(self.device)
        self.start = current_memory_bytes(self.device)
        self.peak = self.start

    def sample(self) -> None:
        now = peak_memory_bytes(self.device)
        if now is not None and self.peak is not None:
            self.peak = max(self.peak, now)

    def above_start(self) -> int | None:
        self.sample()
        return None if self.start is None else self.peak - self.start


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Timing:
    """Seconds of several timed repeats: the median and the spread (min/max, quartiles, stdev)."""

    median: float
    min: float
    max: float
    q1: float
    q3: float
    stdev: float
    samples: tuple[float, ...]

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @property
    def relative_spread(self) -> float:
        """(max − min) / median: how far apart the repeats fell, against the figure quoted."""
        return (self.max - self.min) / self.median if self.median > 0 else math.inf

    @classmethod
    def from_samples(cls, samples: Sequence[float]) -> Timing:
        s = tuple(float(x) for x in samples)
        if not s:
            raise ValueError(f"no samples to summarise. {TROUBLE} 'Benchmark settings'.")
        q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive") if len(s) > 1 else s * 3
        sd = statistics.stdev(s) if len(s) > 1 else 0.0
        return cls(statistics.median(s), min(s), max(s), q1, q3, sd, s)

    def to_dict(self) -> dict:
        return {**asdict(self), "iqr": self.iqr}


UNRELIABLE_SPREAD = 0.5
"""A spread above this fraction of the median makes a measurement unreliable: on an idle
machine repeats of the same work fall within a few percent of each other."""


def compare_timings(a: Timing, b: Timing) -> str:
    """``"faster"`` when every repeat of ``a`` beat every repeat of ``b``, ``"slower"`` in the
    reverse case, else ``"indistinguishable"``: their min–max ranges overlap, so these repeats
    do not say which is faster."""
    if a.max < b.min:
        return "faster"
    if a.min > b.max:
        return "slower"
    return "indistinguishable"


def spread_warnings(frame, *, limit: float = UNRELIABLE_SPREAD) -> list[str]:
    """One line per measurement of a `context_sweep` frame whose spread exceeds ``limit`` times
    its median: the time to first token's min–max range, or the decode steps' interquartile
    range. Such a figure says more about what else the machine was doing than about the model."""
    lines = []
    for row in frame.itertuples():
        if getattr(row, "skipped", None) is not None and row.skipped == row.skipped:
            continue  # a skipped length (NaN when measured)
        ttft = (row.ttft_max_s - row.ttft_min_s) / row.ttft_s
        step = row.decode_ms_per_token_iqr / row.decode_ms_per_token
        where = f"{row.label or row.model_class} at {row.prompt_length} tokens"
        if ttft > limit:
            lines.append(f"{where}: time to first token {row.ttft_s * 1e3:.3g} ms, repeats "
                         f"spread over {ttft:.0%} of it")
        if step > limit:
            lines.append(f"{where}: decode {row.decode_ms_per_token:.3g} ms/token, the steps' "
                         f"interquartile range {step:.0%} of it")
    return lines


def copy_bandwidth(device, *, nbytes: int | None = None) -> float:
    """Bytes read + written per second by a device-to-device copy (median of 5 after 2 warm-up
    copies): what one pass over memory costs here. ``nbytes`` defaults to 2 GiB on a GPU and
    256 MiB elsewhere."""
    dev = _device(device)
    nbytes = nbytes or (2**31 if dev.type == "cuda" else 2**28)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=dev).uniform_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), warmup=2, repeats=5, device=dev)
    return 2 * nbytes / t.median


def copy_bandwidth_best(device, sizes=(2**30, 2**31, 2**32)) -> tuple[float, dict[str, float]]:
    """The best of several large copies' :func:`copy_bandwidth` (read + written), and each one's
    (keyed "1 GiB", ...): a conservative roofline, as a kernel can rarely beat a plain copy."""
    each = {f"{s / 2**30:g} GiB": copy_bandwidth(device, nbytes=s) for s in sizes}
    return max(each.values()), each


def time_fn(fn: Callable[[], object], *, warmup: int = 2, repeats: int = 5,
            device=None) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` calls each synchronised on both
    sides, so queued GPU work is neither counted for the next call nor left out of this one."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1. {TROUBLE} 'Benchmark settings'.")
    if device is None:
        from effarch.profile import default_device
        device = default_device()
    device = _device(device)
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        with _no_gc():
            synchronize(device)
            start = _clock()
            fn()
            synchronize(device)
            samples.append(_clock() - start)
    return Timing.from_samples(samples)


# --------------------------------------------------------------------------------------------
# timed greedy generation
# --------------------------------------------------------------------------------------------

def _timed_generation(decoder: Decoder, input_ids, *, attention_mask, new_tokens: int,
                      sync_every_token: bool, after=None, clock=None, sync=None):
    """One prefill and ``new_tokens - 1`` decode steps: (ttft s, decode s, per-step s).
    ``after()`` runs once the clock has stopped, while the decoder's state is still alive.
    ``clock`` and ``sync(device)`` default to this module's ``_clock`` and `synchronize`."""
    clock = clock or _clock
    sync = sync or synchronize
    device = decoder.device
    sync(device)
    start = clock()
    token = decoder.prefill(input_ids, attention_mask=attention_mask).argmax(-1)  # (b,)
    sync(device)
    decode_start = clock()
    steps, last = [], decode_start
    for _ in range(new_tokens - 1):
        token = decoder.step(token).argmax(-1)
        if sync_every_token:
            sync(device)
            now = clock()
            steps.append(now - last)
            last = now
    sync(device)
    end = clock()
    if after is not None:
        after()
    decode_s = end - decode_start
    if not sync_every_token:
        steps = [decode_s / (new_tokens - 1)] * (new_tokens - 1)
    return decode_start - start, decode_s, steps


def time_prefill_decode(decoder: Decoder, input_ids: torch.Tensor, *, new_tokens: int,
                        warmup: int, repeats: int, clock: Callable[[], float] | None = None,
                        synchronize: Callable | None = None) -> tuple[float, float]:
    """The protocol's core, as lab 2.4.1 asks a student to write it: ``warmup`` untimed runs,
    then ``repeats`` timed ones, each a prefill (time to first token) and ``new_tokens - 1``
    decode steps timed apart, the device synchronised before every clock reading.

    Returns (median time to first token in s, median decode seconds per token), the decode of a
    run being its decode time / (new_tokens − 1). ``clock`` and ``synchronize(device)`` can be
    replaced (a fake device in a check); call it under ``torch.no_grad()``.
    """
    if new_tokens < 2:
        raise ValueError("new_tokens must be at least 2: the first token comes from the "
                         f"prefill. {TROUBLE} 'Benchmark settings'.")
    ttft, per_token = [], []
    for run in range(warmup + repeats):
        first, decode_s, _ = _timed_generation(decoder, input_ids, attention_mask=None,
                                               new_tokens=new_tokens, sync_every_token=False,
                                               clock=clock, sync=synchronize)
        if run >= warmup:
            ttft.append(first)
            per_token.append(decode_s / (new_tokens - 1))
    return statistics.median(ttft), statistics.median(per_token)


# --------------------------------------------------------------------------------------------
# generation results
# --------------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class RunRecord:
    """The record every result carries: what ran, where, and on which versions."""

    label: str | None
    model_class: str
    device: str
    dtype: str
    profile: str
    mamba_path: str
    torch_version: str
    transformers_version: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationResult(RunRecord):
    """Prefill and decode figures of one model on one prompt shape, with the run's record.

    ``decode_tokens_per_s`` counts generated tokens after the first, b·(n − 1), over decode time
    only; the first token comes from the prefill and is in ``ttft_s``.
    """

    batch_size: int
    prompt_length: int
    new_tokens: int
    ttft_s: float  # median time to first token (prefill)
    ttft_min_s: float
    ttft_max_s: float
    prefill_tokens_per_s: float  # b·l / ttft
    decode_s: float  # median decode time for the n − 1 tokens after the first
    decode_min_s: float
    decode_max_s: float
    decode_tokens_per_s: float  # b·(n − 1) / decode_s
    decode_ms_per_token: float  # median latency of one decode step
    decode_ms_per_token_iqr: float
    peak_memory_bytes: int | None  # above the memory in use when the measurement began
    memory_measure: str
    warmup: int
    repeats: int


def _profile_name() -> str:
    try:
        from effarch.profile import get_profile
        return get_profile().name
    except Exception as exc:  # a record should still be written; say why the name is missing
        return f"unknown ({type(exc).__name__})"


def run_record(decoder: Decoder, *, label: str | None) -> dict:
    """What ran, where, on which versions: the fields of every result's record."""
    return {"label": label, "model_class": decoder.model_class, "device": str(decoder.device),
            "dtype": str(decoder.dtype).removeprefix("torch."),
            "profile": _profile_name(), "mamba_path": decoder.mamba_path,
            "torch_version": torch.__version__,
            "transformers_version": compat.transformers_version()}


def measure_generation(model, input_ids: torch.Tensor, *, new_tokens: int = 32,
                       warmup: int = 1, repeats: int = 3,
                       attention_mask: torch.Tensor | None = None, label: str | None = None,
                       sync_every_token: bool = True) -> GenerationResult:
    """Time greedy generation of ``new_tokens`` from ``input_ids`` (b, l): prefill (time to first
    token) and decode (the tokens after the first) separately; ``warmup`` untimed runs, then
    the median and spread of ``repeats``. Peak memory is counted from the call's start: load the
    model first. ``sync_every_token=False`` times the decode loop as a whole (the per-token
    latency is then its mean), letting the CPU queue steps ahead as an unsynchronised loop does.
    """
    if new_tokens < 2:
        raise ValueError("new_tokens must be at least 2: the first token comes from the "
                         f"prefill. {TROUBLE} 'Benchmark settings'.")
    decoder = as_decoder(model)
    input_ids = input_ids.to(decoder.device)
    attention_mask = None if attention_mask is None else attention_mask.to(decoder.device)
    meter = _MemoryMeter(decoder.device)
    runs = []
    with inference(decoder):
        for i in range(warmup + repeats):
            # sample memory once, at the end of the last run: every run has the same shapes, and
            # on the CPU reading RSS just before a prefill was seen to slow it by ~2%
            last = i == warmup + repeats - 1
            with _no_gc():
                run = _timed_generation(decoder, input_ids, attention_mask=attention_mask,
                                        new_tokens=new_tokens, sync_every_token=sync_every_token,
                                        after=meter.sample if last else None)
            if i >= warmup:
                runs.append(run)
    return _generation_result(decoder, input_ids, new_tokens=new_tokens, runs=runs, meter=meter,
                              warmup=warmup, label=label)


def _generation_result(decoder, input_ids, *, new_tokens, runs, meter, warmup, label):
    b, length = input_ids.shape
    ttft = Timing.from_samples([r[0] for r in runs])
    decode = Timing.from_samples([r[1] for r in runs])
    steps = Timing.from_samples([s for r in runs for s in r[2]])
    return GenerationResult(
        batch_size=b, prompt_length=length, new_tokens=new_tokens,
        ttft_s=ttft.median, ttft_min_s=ttft.min, ttft_max_s=ttft.max,
        prefill_tokens_per_s=b * length / ttft.median,
        decode_s=decode.median, decode_min_s=decode.min, decode_max_s=decode.max,
        decode_tokens_per_s=b * (new_tokens - 1) / decode.median,
        decode_ms_per_token=steps.median * 1e3, decode_ms_per_token_iqr=steps.iqr * 1e3,
        peak_memory_bytes=meter.above_start(), memory_measure=memory_measure(meter.device),
        warmup=warmup, repeats=len(runs), **run_record(decoder, label=label))


def results_frame(results: Sequence) -> pd.DataFrame:
    """One row per result (anything with ``.to_dict()``, or a dict)."""
    import pandas as pd

    return pd.DataFrame([r if isinstance(r, dict) else r.to_dict() for r in results])


@dataclass
class StaticDecode:
    """Decode through transformers' static cache, compiled by ``generate()``."""

    batch_size: int
    new_tokens: int
    decode_tokens_per_s: float  # b·(n − 1) / (t(generate n tokens) − t(generate 1 token))
    compile_s: float  # the first three generate() calls: compilation and graph capture
    compiled: bool  # whether generate() compiled the forward


def measure_static_cache_decode(model, input_ids: torch.Tensor, *, new_tokens: int = 32,
                                repeats: int = 3) -> StaticDecode:
    """transformers' own fast decode: ``generate(cache_implementation="static")``, with which
    ``generate()`` compiles the forward by itself (torch.compile with CUDA graphs on a GPU). No
    per-step hook exists inside a compiled ``generate()``, so decode is the median time of
    ``generate`` with ``new_tokens`` minus that with 1 (its prefill and first token), after
    three calls that compile and capture (``scripts/bench_fast_mamba.py``; lab 2.4.1)."""
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              cache_implementation="static", attention_mask=torch.ones_like(input_ids))
    one = dict(kw, max_new_tokens=1, min_new_tokens=1)
    start = _clock()
    with torch.no_grad():
        for _ in range(3):  # compile, then record the graphs
            model.generate(input_ids, **kw)
        synchronize(device)
        compile_s = _clock() - start
        t_all = time_fn(lambda: model.generate(input_ids, **kw), warmup=0, repeats=repeats,
                        device=device).median
        t_one = time_fn(lambda: model.generate(input_ids, **one), warmup=1, repeats=repeats,
                        device=device).median
    b = input_ids.shape[0]
    # a model so small that the difference drowns in noise gives no rate rather than a negative one
    rate = decode_tokens_per_s(t_all, t_one, b, new_tokens) if t_all > t_one else math.nan
    return StaticDecode(batch_size=b, new_tokens=new_tokens, decode_tokens_per_s=rate,
                        compile_s=compile_s, compiled=hasattr(model, "_compiled_call"))


# --------------------------------------------------------------------------------------------
# context sweep
# --------------------------------------------------------------------------------------------

def position_limit(model) -> int | None:
    """The longest sequence the model's positions allow (``config.max_position_embeddings``),
    or None for models without one (Mamba). ``model``: a module or a decoder."""
    module = as_decoder(model).module
    return getattr(module.config, "max_position_embeddings", None)


def random_input_ids(vocab_size: int, length: int, *, batch_size: int = 1,
                     seed: int = 0) -> torch.Tensor:
    """Reproducible random token ids (b, l): the prompt of a speed measurement."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch_size, length), generator=gen)


def _text_input_maker(tokenizer, text: str, batch_size: int) -> Callable[[int], torch.Tensor]:
    ids = torch.as_tensor(tokenizer(text)["input_ids"]).flatten()  # (N,)
    if ids.numel() == 0:
        raise ValueError(f"the text has no tokens. {TROUBLE} 'Benchmark settings'.")

    def make(length: int) -> torch.Tensor:  # the text's tokens, repeated when it is too short
        reps = math.ceil(length / ids.numel())
        return ids.repeat(reps)[:length].expand(batch_size, length).clone()  # (b, l)
    return make


def _input_maker(model, make_input_ids, tokenizer, text, batch_size):
    if make_input_ids is not None:
        return make_input_ids
    if tokenizer is not None and text is not None:
        return _text_input_maker(tokenizer, text, batch_size)
    vocab = as_decoder(model).module.config.vocab_size
    return lambda length: random_input_ids(vocab, length, batch_size=batch_size)


def _skip_reason(length: int, new_tokens: int, limit: int | None) -> str | None:
    if limit is not None and length + new_tokens > limit:
        return (f"prompt {length} + {new_tokens} new tokens exceeds "
                f"max_position_embeddings={limit}")
    return None


_OOM_ERRORS = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), MemoryError)


def context_sweep(model, make_input_ids: Callable[[int], torch.Tensor] | None = None,
                  lengths: Sequence[int] = (), *, tokenizer=None, text: str | None = None,
                  new_tokens: int = 32, batch_size: int = 1, progress: bool = True,
                  **kw) -> pd.DataFrame:
    """`measure_generation` at each prompt length: one row per length, with a ``skipped``
    reason instead of figures for a length past the model's position limit or out of memory.

    Prompts come from ``make_input_ids(length) -> (b, l)``, else from ``tokenizer`` and
    ``text`` (its tokens, repeated when too short), else random ids. ``kw`` goes to
    `measure_generation`.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    decoder = as_decoder(model)  # built once for every length
    make = _input_maker(decoder, make_input_ids, tokenizer, text, batch_size)
    limit = position_limit(decoder)
    rows = []
    for length in tqdm(list(lengths), desc="context sweep", disable=not progress):
        reason = _skip_reason(length, new_tokens, limit)
        if reason is None:
            try:
                res = measure_generation(decoder, make(length), new_tokens=new_tokens, **kw)
                rows.append({**res.to_dict(), "skipped": None})
                continue
            except _OOM_ERRORS as exc:
                reason = f"out of memory ({type(exc).__name__})"
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        rows.append({**run_record(decoder, label=kw.get("label")),
                     "batch_size": batch_size, "prompt_length": length,
                     "new_tokens": new_tokens, "skipped": reason})
    columns = [f.name for f in fields(GenerationResult)] + ["skipped"]
    return pd.DataFrame(rows, columns=columns)


def batch_sweep(model, batch_sizes: Sequence[int], *, prompt_length: int, new_tokens: int = 32,
                warmup: int = 1, repeats: int = 3, static_cache: bool = False,
                label: str | None = None, progress: bool = True) -> pd.DataFrame:
    """Decode throughput against batch size, one row per size, on random prompts of
    ``prompt_length`` tokens: where a fixed-size state pays (Gu & Dao 2023 report Mamba's
    throughput at large batch). Each size runs `measure_generation` with the decode loop timed
    as a whole (``sync_every_token=False``, as a server runs it) or, with ``static_cache``,
    `measure_static_cache_decode` (a transformers model only). ``decode_spread`` is the repeats'
    (max − min) / median decode time. A size that runs out of memory gets a ``skipped`` reason."""
    import pandas as pd
    from tqdm.auto import tqdm

    decoder = as_decoder(model)
    vocab = decoder.module.config.vocab_size
    rows = []
    for b in tqdm(list(batch_sizes), desc="batch sweep", disable=not progress):
        ids = random_input_ids(vocab, prompt_length, batch_size=b)
        row = {"label": label, "batch_size": b, "prompt_length": prompt_length,
               "new_tokens": new_tokens, "skipped": None}
        try:
            if static_cache:
                res = measure_static_cache_decode(decoder.module, ids, new_tokens=new_tokens,
                                                  repeats=repeats)
                row.update(decode_tokens_per_s=res.decode_tokens_per_s, compile_s=res.compile_s,
                           compiled=res.compiled)
            else:
                res = measure_generation(decoder, ids, new_tokens=new_tokens, warmup=warmup,
                                         repeats=repeats, sync_every_token=False, label=label)
                row.update(decode_tokens_per_s=res.decode_tokens_per_s,
                           decode_spread=(res.decode_max_s - res.decode_min_s) / res.decode_s,
                           peak_memory_bytes=res.peak_memory_bytes)
        except _OOM_ERRORS as exc:
            row["skipped"] = f"out of memory ({type(exc).__name__})"
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        rows.append(row)
    frame = pd.DataFrame(rows)
    frame["ms_per_step"] = 1e3 * frame.batch_size / frame.get("decode_tokens_per_s", math.nan)
    return frame


# --------------------------------------------------------------------------------------------
# small helpers of the labs
# --------------------------------------------------------------------------------------------

def decode_tokens_per_s(total_s: float, ttft_s: float, batch_size: int, new_tokens: int) -> float:
    """Decode throughput from a generation's total time and its time to first token: the
    b·(n − 1) tokens generated after the first, over the decode time total − ttft (the
    definition of ``GenerationResult.decode_tokens_per_s``; lab 2.4.1, Part C)."""
    return batch_size * (new_tokens - 1) / (total_s - ttft_s)


# --- a benchmark script's table of figures ------------------------------------------------


class Report:
    """The figures a benchmark script prints, one row each (what, value, unit, note), kept for
    ``--json``: ``save`` writes ``{**meta, "rows": [...]}``; :func:`kept_figure` reads one back."""

    def __init__(self, width: int = 56):
        self.rows: list[dict] = []
        self.width = width

    def row(self, what: str, value: float, unit: str, note: str = "") -> None:
        self.rows.append(dict(what=what, value=value, unit=unit, note=note))
        print(f"  {what:{self.width}s} {value:12.4g} {unit:8s} {note}", flush=True)

    def save(self, path, **meta) -> None:
        import json

        with open(path, "w", encoding="utf-8") as f:
            json.dump({**meta, "rows": self.rows}, f, indent=1)


def kept_figure(path, what: str) -> float:
    """The value of row ``what`` in a :meth:`Report.save` file (e.g. a kept run in
    data/measurements/)."""
    import json

    with open(path, encoding="utf-8") as f:
        rows = json.load(f)["rows"]
    try:
        return next(r["value"] for r in rows if r["what"] == what)
    except StopIteration:
        raise KeyError(f"{path} has no row {what!r}. See TROUBLESHOOTING.md, section "
                       "'Missing data files'.") from None
