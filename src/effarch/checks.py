"""Exercise checks: ✅ pass, ❌ fail with a readable diff, ⏭ not attempted.

The check cell after an exercise is the same in the lab and in its solution. It calls
:func:`check_function` or :func:`check_value`, which return what the rest of the notebook should
use: the student's answer when it passes, the reference when the student's code raised
``NotImplementedError`` (⏭ — the stub the lab builder writes) or gave a different answer (❌).
So an unsolved lab runs end to end. With ``EFFARCH_STRICT=1`` (:func:`effarch.profile.strict`)
❌ raises :class:`CheckFailed` and ⏭ raises :class:`CheckNotAttempted`: CI runs the solutions
strict, so a wrong reference answer fails CI.

Outputs are compared by :func:`diff`: tensors and arrays (shape, dtype, then values with per-dtype
tolerances as in state-spaces/mamba's tests; NaN never matches), numbers (ints exactly unless a
tolerance is given), strings, sequences, mappings, dataclasses and pandas objects, recursively.

Example (a check cell)::

    scan = checks.check_function(selective_scan, ssm.selective_scan_ref,
                                 cases=lambda: [make_inputs(seed) for seed in range(3)])
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import reprlib
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

from effarch import profile

__all__ = [
    "Case", "CheckFailed", "CheckNotAttempted", "CheckResult", "Mistake", "check_function",
    "check_value", "count_tensor_ops", "diff", "diff_lines", "grows_like_log", "history",
    "reset", "result", "summary", "tolerance_by_dtype",
]

Status = Literal["pass", "fail", "skip"]
ICONS = {"pass": "✅", "fail": "❌", "skip": "⏭"}
Compare = Callable[[Any, Any], Any]

# (rtol, atol) by dtype when the check gives none; mamba's test_selective_scan uses the fp16/bf16 pair.
DEFAULT_TOLERANCES = {
    "float64": (1e-7, 1e-7), "complex128": (1e-7, 1e-7),
    "float32": (1e-4, 1e-5), "complex64": (1e-4, 1e-5),
    "float16": (3e-3, 5e-3), "bfloat16": (3e-2, 5e-2),
    "float": (1e-5, 1e-8),  # Python floats: numpy.allclose's defaults
}
_MAX_DETAIL_LINES = 14
_MAX_ITEM_DIFFS = 3
_repr = reprlib.Repr()
_repr.maxstring, _repr.maxother, _repr.maxlist, _repr.maxdict = 60, 60, 6, 6


class CheckFailed(AssertionError):
    """An exercise check failed in strict mode (``EFFARCH_STRICT=1``)."""


class CheckNotAttempted(AssertionError):
    """An exercise was not attempted (``NotImplementedError``) in strict mode."""


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """One check's outcome: ``status`` is ``pass``, ``fail`` or ``skip``; ``details`` are diff lines."""

    name: str
    status: Status
    message: str
    details: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    @property
    def text(self) -> str:
        """What the check prints: one line with its icon, then the indented details."""
        return "\n".join([f"{ICONS[self.status]} {self.name}: {self.message}"]
                         + [f"   {line}" for line in self.details])


_UNSET = object()


class Case:
    """The arguments of one call: ``Case(x, dim=-1)`` calls ``fn(x, dim=-1)``.

    A plain tuple is positional arguments, a dict keyword arguments, anything else one argument.
    ``Case(...).expecting(value, source=...)`` compares with a known value (e.g. bytes measured
    on a real cache) instead of calling the reference; ``.hinting(text)`` adds a line to the
    report when this case fails (what is special about it).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs
        self.expected, self.source, self.hint = _UNSET, None, None

    def expecting(self, value: Any, *, source: str) -> Case:
        """Compare this case with ``value``; ``source`` says where it came from."""
        self.expected, self.source = value, source
        return self

    def hinting(self, text: str) -> Case:
        """Print ``text`` when this case fails."""
        self.hint = text
        return self

    def __repr__(self) -> str:
        return f"Case({_call_args(self.args, self.kwargs)})"


@dataclasses.dataclass(frozen=True)
class Mistake:
    """A common wrong answer and its likely cause, named in the report when it fits.

    ``wrong(*args, **kwargs)`` computes what the mistake gives on a case: when the student's
    output matches it, the report says ``likely cause: <cause>``. ``error`` is a regular
    expression searched in ``"<ExceptionType>: <message>"`` when the student's code raises.
    """

    cause: str
    wrong: Callable | None = None
    error: str | None = None


_HISTORY: list[CheckResult] = []


def history() -> list[CheckResult]:
    """The results of the checks run so far in this process, oldest first (a copy)."""
    return list(_HISTORY)


def reset() -> None:
    """Forget the recorded results."""
    _HISTORY.clear()


def result(name: str) -> CheckResult | None:
    """The most recent result of the check called ``name`` (None if it has not run): what the
    rest of a lab uses to say whether the student's answer or the reference ran."""
    return next((r for r in reversed(_HISTORY) if r.name == name), None)


def summary(*, show: bool = True) -> dict[str, int]:
    """Count the results so far as ``{"pass": n, "fail": n, "skip": n}``; print them if ``show``."""
    counts = {status: sum(r.status == status for r in _HISTORY) for status in ICONS}
    if show:
        line = (f"Checks: {counts['pass']} ✅ passed, {counts['fail']} ❌ failed, "
                f"{counts['skip']} ⏭ not attempted")
        pending = [f"{ICONS[r.status]} {r.name}" for r in _HISTORY if not r.passed]
        _say("\n".join([line] + [f"   {p}" for p in pending]))
    return counts


def _say(text: str) -> None:
    """The module's only output."""
    print(text, flush=True)


# ----------------------------------------------------------------------------------- checks


def check_function(student_fn: Callable, reference_fn: Callable,
                   cases: Iterable[Any] | Callable[[], Iterable[Any]], *, name: str | None = None,
                   rtol: float | None = None, atol: float | None = None,
                   compare: Compare | None = None, mistakes: Iterable[Mistake] = (),
                   structure: Callable[[Callable], list[str]] | None = None) -> Callable:
    """Call both functions on every case and compare; return ``student_fn`` if all pass, else
    ``reference_fn``.

    ``cases``: a list of cases (:class:`Case`, a tuple of positional arguments, a dict of keyword
    arguments, or a single argument), or a callable returning one so random inputs are drawn
    fresh. The reference runs first on each case (unless the case carries its expected value).
    ``compare(actual, expected)`` replaces :func:`diff`: it returns ``None``/``True`` on a match,
    else ``False`` or a message, or raises ``AssertionError`` (so ``torch.testing.assert_close``
    works as is). ``mistakes``: common wrong answers whose cause the report names when one fits.
    ``structure(student_fn)``, run once every value matched, returns problems with *how* the
    answer computes (e.g. :func:`grows_like_log`); any problem is a ❌.
    """
    name = name or getattr(student_fn, "__name__", "exercise")
    case_list = list(cases() if callable(cases) else cases)
    mistakes = tuple(mistakes)
    if not case_list:
        raise ValueError(f"check {name!r} has no cases")
    outputs = []  # the student's output on each case so far
    for i, case in enumerate(case_list, 1):
        args, kwargs = _unpack(case)
        where = f"case {i} of {len(case_list)}"
        call = [f"call: {name}({_call_args(args, kwargs)})"]
        known = isinstance(case, Case) and case.expected is not _UNSET
        expected = case.expected if known else reference_fn(*args, **kwargs)
        if known:
            call.append(f"expected: {case.source}")
        hint = [f"about this case: {case.hint}"] if isinstance(case, Case) and case.hint else []
        try:
            actual = student_fn(*args, **kwargs)
        except NotImplementedError as exc:
            return _finish(_not_attempted(name, exc), reference_fn)
        except Exception as exc:  # any error in student code is a ❌, not a crash
            causes = _error_causes(exc, mistakes)
            return _finish(_raised(name, exc, where, [*call, *hint, *causes]), reference_fn, exc)
        outputs.append(actual)
        problems = _compare(actual, expected, rtol, atol, compare)
        if problems:
            match = functools.partial(_matches, rtol=rtol, atol=atol, compare=compare)
            causes = _likely_causes(student_fn, case_list, outputs, mistakes, match)
            result = CheckResult(name, "fail", f"{where} gives a different output",
                                 (*call, *causes, *hint, *problems))
            return _finish(result, reference_fn)
    n = len(case_list)
    problems = structure(student_fn) if structure is not None else []
    if problems:
        result = CheckResult(name, "fail", f"right values on {n} case{'s' * (n != 1)}, but "
                             "not computed the way the exercise asks", tuple(problems))
        return _finish(result, reference_fn)
    return _finish(CheckResult(name, "pass", f"passed {n} case{'s' * (n != 1)}"), student_fn)


def _matches(actual, wrong, *, rtol, atol, compare) -> bool:
    """Does the student's output match a mistake's? To the check's tolerance, or loosely (1%)
    where a mistake makes the arithmetic blow up and rounding then decides the digits."""
    if wrong is None:
        return False
    return not _compare(actual, wrong, rtol, atol, compare) or _loosely_equal(actual, wrong)


def _loosely_equal(a: Any, b: Any) -> bool:
    """Same structure; tensors of one shape whose non-finite entries sit in the same places and
    whose finite ones agree to 1% (of the largest finite magnitude, elementwise)."""
    torch = sys.modules.get("torch")
    if isinstance(b, (tuple, list)):
        return isinstance(a, (tuple, list)) and len(a) == len(b) and all(
            _loosely_equal(x, y) for x, y in zip(a, b, strict=True))
    if torch is None or not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    if a.shape != b.shape or not (a.is_floating_point() and b.is_floating_point()):
        return False
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    finite = torch.isfinite(b)
    if not torch.equal(torch.isfinite(a), finite) or not torch.equal(a[~finite].nan_to_num(),
                                                                    b[~finite].nan_to_num()):
        return False
    if not finite.any():
        return True
    a, b = a[finite], b[finite]
    return bool(((a - b).abs() <= 1e-2 * b.abs() + 1e-3 * b.abs().max()).all())


def _wrong_on(mistake: Mistake, case: Any) -> Any:
    """What the mistake gives on a case; None where it does not apply (or cannot run)."""
    args, kwargs = _unpack(case)
    try:
        return mistake.wrong(*args, **kwargs)
    except Exception:  # a diagnosis that does not apply to this case
        return None


def _likely_causes(student_fn, cases, outputs, mistakes, match) -> list[str]:
    """``likely cause: …`` for the mistakes whose wrong answer the student's output matches on
    the failing case (the last of ``outputs``). When several do, those that also match the
    student on every other case (run now where not yet run) are named."""
    failing = len(outputs) - 1
    fits = [m for m in mistakes if m.wrong is not None
            and match(outputs[failing], _wrong_on(m, cases[failing]))]
    if len(fits) > 1:
        for case in cases[len(outputs):]:
            args, kwargs = _unpack(case)
            try:
                outputs.append(student_fn(*args, **kwargs))
            except Exception:  # NotImplementedError included: that case says nothing
                outputs.append(_UNSET)

        def everywhere(m: Mistake) -> bool:
            for case, out in zip(cases, outputs, strict=True):
                wrong = _wrong_on(m, case)
                if out is not _UNSET and wrong is not None and not match(out, wrong):
                    return False
            return True
        fits = [m for m in fits if everywhere(m)] or fits
    return [f"likely cause: {m.cause}" for m in fits]


def _error_causes(exc: Exception, mistakes) -> list[str]:
    import re

    text = f"{type(exc).__name__}: {exc}"
    return [f"likely cause: {m.cause}" for m in mistakes
            if m.error is not None and re.search(m.error, text)]


def check_value(name: str, student: Callable[[], Any] | Any, expected: Any, *,
                rtol: float | None = None, atol: float | None = None,
                compare: Compare | None = None) -> Any:
    """Compare a value the student computed with ``expected``; return it if it matches, else
    ``expected``.

    Pass the student's computation as a thunk (``lambda: my_estimate(cfg)``) so that
    ``NotImplementedError`` is caught; a callable is always called, anything else is the value.
    """
    try:
        actual = student() if callable(student) else student
    except NotImplementedError as exc:
        return _finish(_not_attempted(name, exc), expected)
    except Exception as exc:  # any error in student code is a ❌, not a crash
        return _finish(_raised(name, exc, "", []), expected, exc)
    problems = _compare(actual, expected, rtol, atol, compare)
    if problems:
        return _finish(CheckResult(name, "fail", "does not match the reference", tuple(problems)),
                       expected)
    return _finish(CheckResult(name, "pass", "matches the reference"), actual)


def _unpack(case: Any) -> tuple[tuple, dict]:
    if isinstance(case, Case):
        return case.args, case.kwargs
    if isinstance(case, tuple):
        return case, {}
    if isinstance(case, dict):
        return (), case
    return (case,), {}


def _not_attempted(name: str, exc: NotImplementedError) -> CheckResult:
    msg = str(exc)
    # A NotImplementedError that is not the lab's stub (e.g. an op missing on this device) is shown.
    details = () if not msg or msg.startswith("Exercise") else (f"NotImplementedError: {msg}",)
    return CheckResult(name, "skip", "not attempted yet", details)


def _raised(name: str, exc: Exception, where: str, extra: list[str]) -> CheckResult:
    head = f"raised {type(exc).__name__}" + (f" on {where}" if where else "")
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename != __file__]
    at = []
    if frames:
        code = (frames[-1].line or "").strip()
        at = [f"in {frames[-1].name}, line {frames[-1].lineno}" + (f": {code}" if code else "")]
    return CheckResult(name, "fail", head, (f"{type(exc).__name__}: {exc}", *at, *extra))


def _finish(result: CheckResult, value: Any, cause: BaseException | None = None) -> Any:
    """Record and print the result; in strict mode raise on ❌ / ⏭, else return ``value``."""
    strict = profile.strict()
    if not result.passed:
        tail = ("EFFARCH_STRICT=1, so the check raises (TROUBLESHOOTING.md, section "
                "'Notebook checks')" if strict else "the reference stands in so the lab goes on")
        details = result.details
        if len(details) > _MAX_DETAIL_LINES:
            details = (*details[:_MAX_DETAIL_LINES], f"… {len(details) - _MAX_DETAIL_LINES} more")
        result = dataclasses.replace(result, message=f"{result.message} — {tail}.",
                                     details=details)
    _HISTORY.append(result)
    _say(result.text)
    if strict and result.status == "fail":
        raise CheckFailed(result.text) from cause
    if strict and result.status == "skip":
        raise CheckNotAttempted(result.text)
    return value


def _compare(actual: Any, expected: Any, rtol: float | None, atol: float | None,
             compare: Compare | None) -> list[str]:
    """Diff lines (empty on a match); a comparison that raises is a mismatch, not a crash."""
    try:
        if compare is None:
            return diff_lines(actual, expected, rtol=rtol, atol=atol)
        verdict = compare(actual, expected)
    except AssertionError as exc:
        return str(exc).strip().splitlines() or ["the comparison failed"]
    except Exception as exc:
        return [f"could not compare the output: {type(exc).__name__}: {exc}"]
    if verdict is None or verdict is True:
        return []
    return str(verdict).splitlines() if isinstance(verdict, str) else ["the comparison failed"]


# ------------------------------------------------------------------ how an answer computes


def count_tensor_ops(fn: Callable, *args: Any, **kwargs: Any) -> int:
    """How many ATen operations ``fn(*args, **kwargs)`` dispatches (views, copies and
    arithmetic alike), counted with a ``TorchDispatchMode``: a measure of the work's *structure*
    that no timing noise touches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    with _Count() as counter:
        fn(*args, **kwargs)
    return counter.n


def grows_like_log(make_case: Callable[[int], Any], lengths: tuple[int, int] = (32, 1024), *,
                   slack: float = 2.0) -> Callable[[Callable], list[str]]:
    """A ``structure`` test for :func:`check_function`: the number of tensor operations the
    answer dispatches on ``make_case(l)`` may grow from the first length to the second at most
    ``slack`` times as fast as log2 l — a scan in ceil(log2 l) rounds (Hillis–Steele) or
    2·log2 l (Blelloch) passes, a loop over the sequence (depth l) does not."""
    short, long = lengths

    def structure(fn: Callable) -> list[str]:
        counts = []
        for length in lengths:
            args, kwargs = _unpack(make_case(length))
            counts.append(count_tensor_ops(fn, *args, **kwargs))
        log_ratio = math.log2(long) / math.log2(short)
        if counts[1] <= slack * log_ratio * max(counts[0], 1):
            return []
        return [f"it dispatched {counts[0]:,} tensor operations at l = {short} and "
                f"{counts[1]:,} at l = {long}: ×{counts[1] / max(counts[0], 1):.1f}, while l "
                f"grew ×{long / short:.0f} and log2 l ×{log_ratio:.1f}.",
                "So the work is done a few time steps at a time (a loop over the sequence: "
                "depth l), not in rounds over whole tensors.",
                f"A parallel scan runs ceil(log2 l) rounds (Hillis–Steele) or 2·log2 l "
                f"(Blelloch), each a few operations on whole tensors: its count may grow at "
                f"most ×{slack * log_ratio:.1f} here."]
    return structure


def tolerance_by_dtype(**tolerances: tuple[float, float]) -> Compare:
    """A ``compare`` for :func:`check_function` whose (rtol, atol) depends on each expected
    tensor's dtype (``float32=(1e-4, 1e-4)``); other dtypes keep ``DEFAULT_TOLERANCES``. A tuple
    output (e.g. ``(out, last_state)``) is compared item by item."""
    def compare(actual: Any, expected: Any) -> str | None:
        pairs = [("", actual, expected)]
        if isinstance(expected, tuple) and isinstance(actual, tuple) \
                and len(actual) == len(expected):
            pairs = [(f"[{i}]", a, e) for i, (a, e) in enumerate(zip(actual, expected, strict=True))]
        lines = []
        for path, a, e in pairs:
            dtype = str(getattr(e, "dtype", "")).removeprefix("torch.")
            rtol, atol = tolerances.get(dtype, (None, None))
            lines += diff_lines(a, e, rtol=rtol, atol=atol, path=path)
        return "\n".join(lines) or None
    return compare


# ----------------------------------------------------------------- lab 2.4.1: Mamba inference
# Each check below is the one a lab's check cell calls: the cases the lab measured plus cases of
# its own, the common wrong answers it names, and (tests/test_lab_checks.py) proof that each
# plausible wrong answer fails it.


def _kv(config, seq_len, batch, dtype):
    from effarch import memory

    return memory.kv_cache_bytes(config, seq_len, batch, dtype)


def _kv_heads_instead(config, seq_len, batch, dtype):
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return _kv(config, seq_len, batch, dtype) * heads // kv_heads


KV_CACHE_MISTAKES = (
    Mistake("K and V are two tensors per layer: the factor 2 is missing",
            wrong=lambda cfg, L, b, dtype: _kv(cfg, L, b, dtype) // 2),
    Mistake("the bytes per element are fixed at 2: read them from dtype (memory.dtype_bytes: "
            "float32 is 4, an 8-bit cache 1)",
            wrong=lambda cfg, L, b, dtype: _kv(cfg, L, b, "bfloat16")),
    Mistake("num_attention_heads used where the cache stores num_key_value_heads (grouped-query "
            "attention keeps fewer K/V heads)", wrong=_kv_heads_instead),
    Mistake("the batch is missing: every sequence keeps its own cache",
            wrong=lambda cfg, L, b, dtype: _kv(cfg, L, 1, dtype)),
    Mistake("L² instead of L: the cache keeps one K and one V per token, O(n) memory (attention's "
            "compute is what grows as L²)",
            wrong=lambda cfg, L, b, dtype: _kv(cfg, L, b, dtype) * L),
)


def check_kv_cache_bytes(student_fn: Callable, cases: Iterable[Case]) -> Callable:
    """Lab 2.4.1, Exercise B: ``kv_cache_bytes(config, seq_len, batch, dtype)``.

    ``cases``: the lab's cases, those measured on real caches carrying their bytes
    (``Case.expecting``). Added here: an 8-bit cache (float8, as a quantised KV cache is
    stored), checked against ``memory.kv_cache_bytes``, so that a hard-coded 2 bytes fails.
    """
    import torch

    from effarch import memory

    cases = list(cases)
    eight_bit = Case(cases[0].args[0], 1000, 3, torch.float8_e4m3fn).hinting(
        "an 8-bit cache (float8_e4m3fn, as a quantised KV cache is kept): 1 byte per element")
    return check_function(student_fn, memory.kv_cache_bytes, [*cases, eight_bit],
                          name="kv_cache_bytes", mistakes=KV_CACHE_MISTAKES)


def _ssm_parts(config, batch, dtype, state_dtype, *, channels=None):
    """(conv bytes, SSM bytes) of a Mamba config's state; ``channels`` replaces d."""
    from effarch import memory

    d = channels or config.expand * config.hidden_size
    per = config.num_hidden_layers * batch * d
    return (per * config.conv_kernel * memory.dtype_bytes(dtype),
            per * config.state_size * memory.dtype_bytes(state_dtype))


SSM_STATE_MISTAKES = (
    Mistake("d = hidden_size used: Mamba's SSM runs on d_inner = expand · hidden_size channels",
            wrong=lambda cfg, b, dtype, sd: sum(_ssm_parts(cfg, b, dtype, sd,
                                                           channels=cfg.hidden_size))),
    Mistake("h counted in the model's dtype: transformers keeps the SSM state in state_dtype "
            "(float32, STATE_DTYPE in the lab)",
            wrong=lambda cfg, b, dtype, sd: sum(_ssm_parts(cfg, b, dtype, dtype))),
    Mistake("the conv state (b, d, k) is missing",
            wrong=lambda cfg, b, dtype, sd: _ssm_parts(cfg, b, dtype, sd)[1]),
    Mistake("the SSM state h (b, d, n) is missing",
            wrong=lambda cfg, b, dtype, sd: _ssm_parts(cfg, b, dtype, sd)[0]),
    Mistake("the batch is missing: every sequence keeps its own state",
            wrong=lambda cfg, b, dtype, sd: sum(_ssm_parts(cfg, 1, dtype, sd))),
)


def check_ssm_state_bytes(student_fn: Callable, cases: Iterable[Case]) -> Callable:
    """Lab 2.4.1, Exercise B: ``ssm_state_bytes(config, batch, dtype, state_dtype)``; ``cases``
    as in `check_kv_cache_bytes`."""
    from effarch import memory

    return check_function(student_fn, memory.ssm_state_bytes, list(cases),
                          name="ssm_state_bytes", mistakes=SSM_STATE_MISTAKES)


DECODE_RATE_MISTAKES = (
    Mistake("the prefill is counted: decode time is total_s − ttft_s",
            wrong=lambda total, ttft, b, n: b * (n - 1) / total),
    Mistake("the first token is counted: it comes from the prefill, so decode made "
            "new_tokens − 1 per sequence", wrong=lambda total, ttft, b, n: b * n / (total - ttft)),
    Mistake("the batch is missing: every sequence generates its own tokens",
            wrong=lambda total, ttft, b, n: (n - 1) / (total - ttft)),
)


def check_decode_tokens_per_s(student_fn: Callable) -> Callable:
    """Lab 2.4.1, Exercise C: ``decode_tokens_per_s(total_s, ttft_s, batch, new_tokens)``."""
    from effarch import bench

    cases = [Case(1.0, 0.2, 1, 33), Case(2.5, 0.5, 4, 101), Case(0.3, 0.25, 1, 2),
             Case(0.9, 0.3, 8, 17)]
    return check_function(student_fn, bench.decode_tokens_per_s, cases,
                          name="decode_tokens_per_s", mistakes=DECODE_RATE_MISTAKES)


class FakeDevice:
    """An asynchronous device with a clock, for checking a timing loop without timing anything.

    Work queued on it runs one item after another; ``clock()`` reads the host's time, which
    catches up with the device's work only in ``synchronize()`` — as with a GPU, where a call
    returns as soon as its kernels are queued."""

    def __init__(self) -> None:
        self.now, self.done_at = 0.0, 0.0

    def queue(self, seconds: float) -> None:
        self.done_at = max(self.done_at, self.now) + seconds

    def clock(self) -> float:
        return self.now

    def synchronize(self, device: Any = None) -> None:
        self.now = max(self.now, self.done_at)


class FakeDecoder:
    """A decoder (``prefill`` and ``step``, as ``effarch.decoding.Decoder``) whose work takes
    known times on a :class:`FakeDevice`: run r's prefill takes ``prefill_s[r]`` and each of its
    decode steps ``step_s[r]``. Its ``device`` is that FakeDevice."""

    def __init__(self, prefill_s: Iterable[float], step_s: Iterable[float], *, batch: int = 2,
                 vocab: int = 7) -> None:
        self.prefill_s, self.step_s = list(prefill_s), list(step_s)
        self.batch, self.vocab, self.runs = batch, vocab, 0
        self.device = FakeDevice()

    def _logits(self):
        import torch

        return torch.zeros(self.batch, self.vocab).index_fill_(1, torch.tensor([3]), 1.0)

    def prefill(self, input_ids, *, attention_mask=None):
        if self.runs >= len(self.prefill_s):
            raise RuntimeError(f"prefill called {self.runs + 1} times: more than warmup + "
                               f"repeats = {len(self.prefill_s)} runs")
        self.device.queue(self.prefill_s[self.runs])
        self.runs += 1
        return self._logits()  # (b, V)

    def step(self, token):
        shape = tuple(getattr(token, "shape", ()))
        if self.runs == 0:
            raise RuntimeError("step() before prefill(): a generation starts with its prefill")
        if shape != (self.batch,):
            raise ValueError(f"step() takes one token id per row, shape (b,) = ({self.batch},); "
                             f"got shape {shape}: pass logits.argmax(-1)")
        self.device.queue(self.step_s[self.runs - 1])
        return self._logits()


def _timing_case(prefill_s, step_s, *, new_tokens, warmup, repeats) -> Case:
    import statistics

    import torch

    decoder = FakeDecoder(prefill_s, step_s)
    expected = (statistics.median(prefill_s[warmup:]), statistics.median(step_s[warmup:]))
    return Case(decoder, torch.zeros(2, 5, dtype=torch.long), new_tokens=new_tokens,
                warmup=warmup, repeats=repeats, clock=decoder.device.clock,
                synchronize=decoder.device.synchronize).expecting(
        expected, source="the fake model's known times (median of the timed runs' prefill, "
                         "and of their seconds per decode step)")


def _timing_mistake(summarise):
    """A wrong answer computed from the fake's known times: ``summarise(prefill, step, n)``
    gets the timed runs' (or, with ``warmup=False`` semantics, the first runs') times."""
    def wrong(decoder, input_ids, *, new_tokens, warmup, repeats, **_):
        return summarise(decoder.prefill_s[warmup:], decoder.step_s[warmup:], new_tokens,
                         decoder.prefill_s[:repeats], decoder.step_s[:repeats])
    return wrong


def _median(xs):
    import statistics

    return statistics.median(xs)


TIMING_MISTAKES = (
    Mistake("no warm-up: the first, slow runs (compilation, caches, the allocator) are in the "
            "median — run `warmup` untimed generations first",
            wrong=_timing_mistake(lambda p, s, n, p0, s0: (_median(p0), _median(s0)))),
    Mistake("the clock was read without waiting for the device: its work is asynchronous, so "
            "call synchronize(decoder.device) before every clock reading",
            wrong=_timing_mistake(lambda p, s, n, p0, s0: (0.0, 0.0))),
    Mistake("the clock was read without waiting for the device after the prefill: its time "
            "went into the decode — synchronize before every clock reading",
            wrong=_timing_mistake(lambda p, s, n, p0, s0: (
                0.0, _median([(a + (n - 1) * b) / (n - 1) for a, b in zip(p, s, strict=True)])))),
    Mistake("the prefill is counted in the decode time: start the decode clock after the "
            "first token",
            wrong=_timing_mistake(lambda p, s, n, p0, s0: (
                _median(p), _median([(a + (n - 1) * b) / (n - 1) for a, b in zip(p, s, strict=True)])))),
    Mistake("the mean, not the median: one slow repeat moves a mean",
            wrong=_timing_mistake(lambda p, s, n, p0, s0: (sum(p) / len(p), sum(s) / len(s)))),
    Mistake("decode time divided by new_tokens: the first token came from the prefill, so the "
            "decode made new_tokens − 1",
            wrong=_timing_mistake(lambda p, s, n, p0, s0: (
                _median(p), _median([b * (n - 1) / n for b in s])))),
)


def check_time_generation(student_fn: Callable) -> Callable:
    """Lab 2.4.1, Exercise C: ``time_generation(decoder, input_ids, *, new_tokens, warmup,
    repeats, clock, synchronize) -> (ttft_s, decode_s_per_token)``, run on :class:`FakeDecoder`
    models whose times are known, with the fake device's clock: no wall-clock time is read."""
    from effarch import bench

    cases = [
        _timing_case([0.8, 0.010, 0.030, 0.012], [0.05, 0.002, 0.0021, 0.0045],
                     new_tokens=5, warmup=1, repeats=3),
        _timing_case([1.2, 0.4, 0.021, 0.020, 0.050, 0.022, 0.019],
                     [0.09, 0.03, 0.0031, 0.0030, 0.0028, 0.0065, 0.0029],
                     new_tokens=9, warmup=2, repeats=5),
    ]
    return check_function(student_fn, bench.time_prefill_decode, cases,
                          name="time_generation", mistakes=TIMING_MISTAKES)


# -------------------------------------------------------------- lab 2.4.2: Mamba architecture


def _discretize_not_transposed(delta, A, B):
    """B used as (b, 1, n, l) against Δ (b, d, l, 1): runs only when n == l, then wrong."""
    import torch

    delta = delta.float()[..., None]
    return torch.exp(delta * A.float()[:, None, :]), delta * B.float()[:, None]


def _exp_then_times_A(delta, A, B):
    import torch

    from effarch import ssm

    return (torch.exp(delta.float()[..., None]) * A.float()[:, None, :],
            ssm.discretize(delta, A, B)[1])


def check_discretize(student_fn: Callable) -> Callable:
    """Lab 2.4.2, Exercise A: ``discretize(delta, A, B) -> (A_bar, B_bar)``, (b, d, l, n) each."""
    import torch

    from effarch import ssm

    def cases():  # random shapes and step sizes, from small to large Δ·|A|; one with n == l
        g = torch.Generator().manual_seed(0)
        return [Case(torch.rand(b, d, length, generator=g) * s,
                     -4 * torch.rand(d, n, generator=g) - 0.1,
                     torch.randn(b, n, length, generator=g))
                for b, d, length, n, s in [(1, 4, 3, 2, 0.1), (2, 8, 16, 16, 1.0),
                                           (3, 5, 7, 4, 5.0)]]

    mistakes = (
        Mistake("B̄ from the exact zero-order hold: Mamba takes the first-order B̄ = Δ·B",
                wrong=ssm.discretize_zoh_exact),
        Mistake("B is (b, n, l): transpose it to (b, l, n) before it meets Δ[..., None] "
                "(b, d, l, 1)", wrong=_discretize_not_transposed,
                error=r"must match the size of tensor b|shape .* doesn't match|broadcast"),
        Mistake("Ā = exp(Δ)·A: the exponential is of the product, Ā = exp(Δ·A)",
                wrong=_exp_then_times_A),
    )
    return check_function(student_fn, ssm.discretize, cases, name="discretize",
                          mistakes=mistakes)


_SCAN_PARAMS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus",
                "return_last_state")


def _scan_without(**changes):
    """The reference scan with some arguments changed (None when they change nothing here)."""
    def wrong(*args, **kwargs):
        from effarch import ssm

        call = dict(zip(_SCAN_PARAMS[:len(args)], args, strict=True), **kwargs)
        if all(call.get(k) is None or call.get(k) is False for k in changes):
            return None  # the case does not use what the mistake forgets
        return ssm.selective_scan_ref(**{**call, **changes})
    return wrong


SCAN_MISTAKES = (
    Mistake("the softplus on Δ is missing (delta_softplus: Δ = softplus(delta + delta_bias))",
            wrong=_scan_without(delta_softplus=False)),
    Mistake("delta_bias is missing: it is added to delta before the softplus",
            wrong=_scan_without(delta_bias=None)),
    Mistake("the skip D·u is missing", wrong=_scan_without(D=None)),
    Mistake("the gate is missing: out = y · silu(z)", wrong=_scan_without(z=None)),
)


def check_selective_scan(student_fn: Callable, reference_fn: Callable,
                         layer_cases: Iterable[dict]) -> Callable:
    """Lab 2.4.2, Exercise B: ``selective_scan_sequential`` with mamba-ssm's signature.

    ``layer_cases``: scan arguments captured on real layers (the first is also asked for its
    last state), compared with ``reference_fn`` (transformers' scan). Added here: a small
    random case without D, z or bias, and a bfloat16 case compared with mamba-ssm's
    ``selective_scan_ref`` semantics (float32 arithmetic, the state in float32 whatever u's
    dtype) — a scan that keeps h in bfloat16 fails it.
    """
    import torch

    from effarch import ssm

    def cases():
        g = torch.Generator().manual_seed(1)
        first, *rest = list(layer_cases)
        small = Case(torch.randn(2, 6, 9, generator=g), torch.rand(2, 6, 9, generator=g),
                     -torch.rand(6, 4, generator=g) - 0.5, torch.randn(2, 4, 9, generator=g),
                     torch.randn(2, 4, 9, generator=g))
        d, n, length = 16, 8, 200
        half = dict(u=torch.randn(2, d, length, generator=g), z=torch.randn(2, d, length, generator=g),
                    delta=torch.randn(2, d, length, generator=g) - 2,
                    B=torch.randn(2, n, length, generator=g), C=torch.randn(2, n, length, generator=g))
        half = {k: v.bfloat16() for k, v in half.items()}
        rest_args = dict(A=-torch.rand(d, n, generator=g) * 0.2 - 0.01, D=torch.randn(d, generator=g),
                         delta_bias=torch.randn(d, generator=g) * 0.1, delta_softplus=True,
                         return_last_state=True)
        bf16 = Case(**half, **rest_args).expecting(
            ssm.selective_scan_ref(**half, **rest_args),
            source="mamba-ssm's selective_scan_ref semantics (float32 arithmetic, h float32)"
        ).hinting("bfloat16 inputs: keep h and the arithmetic in float32 (cast with .float()), "
                  "return the output in u's dtype and the last state in float32")
        return [Case(**first, return_last_state=True), *(Case(**c) for c in rest), small, bf16]

    return check_function(student_fn, reference_fn, cases, name="selective_scan_sequential",
                          compare=tolerance_by_dtype(float32=(1e-4, 1e-4)),
                          mistakes=SCAN_MISTAKES)


def _swapped_scan(a, b, dim=-1):
    """h_t with the operator's order swapped, (a1·a2, a1·b2 + b1): a plausible wrong answer."""
    import torch

    a, b = torch.broadcast_tensors(a, b)
    a, b = a.movedim(dim, -1), b.movedim(dim, -1)
    k = 1
    while k < a.shape[-1]:
        a, b = (torch.cat([a[..., :k], a[..., :-k] * a[..., k:]], -1),
                torch.cat([b[..., :k], a[..., :-k] * b[..., k:] + b[..., :-k]], -1))
        k *= 2
    return b.movedim(-1, dim)


def _exclusive_scan(a, b, dim=-1):
    """h_{t-1} instead of h_t: off by one step."""
    import torch

    from effarch import ssm

    h = ssm.associative_scan(a, b, dim)[1].movedim(dim, -1)
    return torch.cat([torch.zeros_like(h[..., :1]), h[..., :-1]], -1).movedim(-1, dim)


def parallel_scan_reference(a, b, dim: int = -1):
    """h_t = a_t·h_{t-1} + b_t (h_0 = 0) along ``dim`` by ``effarch.ssm.associative_scan``
    (Hillis–Steele): lab 2.4.2's stand-in for a ``parallel_scan`` that did not pass."""
    from effarch import ssm

    return ssm.associative_scan(a, b, dim)[1]


def check_parallel_scan(student_fn: Callable) -> Callable:
    """Lab 2.4.2, Exercise C: ``parallel_scan(a, b, dim=-1)``: equal to the sequential
    recurrence on lengths 1, powers of two and not, time in any dimension, a long sequence;
    and a log-depth structure (:func:`grows_like_log`), so a loop over time fails."""
    import torch

    def cases():  # a in (0, 1) as Ā is
        g = torch.Generator().manual_seed(2)
        shapes = [((5,), -1), ((3, 8), -1), ((2, 7), -1), ((4, 100), 1), ((1, 6, 33, 4), 2)]
        out = [Case(torch.rand(s, generator=g), torch.randn(s, generator=g), dim=d)
               for s, d in shapes] + [Case(torch.rand(2, 1), torch.randn(2, 1))]
        long = Case(torch.rand(2, 1500, generator=g), torch.randn(2, 1500, generator=g))
        return out + [long.hinting(
            "1,500 steps: products of many a_t underflow to 0, so a formula that divides by "
            "cumulative products (cumsum(b / cumprod(a))) breaks here; combine pairs with the "
            "operator instead")]

    def make(length):
        g = torch.Generator().manual_seed(length)
        return Case(torch.rand(2, length, generator=g), torch.randn(2, length, generator=g))

    mistakes = (
        Mistake("the operator's order is swapped: (a1, b1)∘(a2, b2) = (a1·a2, a2·b1 + b2), the "
                "earlier pair's b scaled by the later a", wrong=_swapped_scan),
        Mistake("off by one step: h_t includes b_t (an inclusive scan)", wrong=_exclusive_scan),
    )
    return check_function(student_fn, parallel_scan_reference, cases, name="parallel_scan",
                          mistakes=mistakes, structure=grows_like_log(make, (32, 1024)))


def _block(mixer, x, *, causal=True, act=True, softplus=True, bias=True, D=True, gate=True):
    """A Mamba mixer's forward with parts left out or wrong: the wrong answers of the block
    exercise (effarch.mixer.mixer_prefill is the right one)."""
    import torch
    import torch.nn.functional as F

    from effarch import ssm

    length = x.shape[1]
    u, z = mixer.in_proj(x).transpose(1, 2).chunk(2, dim=1)                   # (b, d, l)
    conv = F.conv1d(u, mixer.conv1d.weight, mixer.conv1d.bias,
                    padding=mixer.conv1d.kernel_size[0] - 1, groups=mixer.conv1d.groups)
    u = conv[..., :length] if causal else conv[..., -length:]
    u = mixer.act(u) if act else u
    r, n = mixer.time_step_rank, mixer.ssm_state_size
    dt, B, C = torch.split(mixer.x_proj(u.transpose(1, 2)), [r, n, n], dim=-1)
    y = ssm.selective_scan_ref(u, mixer.dt_proj.weight @ dt.transpose(1, 2),
                               -torch.exp(mixer.A_log.float()), B.transpose(1, 2),
                               C.transpose(1, 2), mixer.D.float() if D else None,
                               z if gate else None, mixer.dt_proj.bias.float() if bias else None,
                               softplus)
    return mixer.out_proj(y.transpose(1, 2).to(x.dtype))


BLOCK_MISTAKES = (
    Mistake("the convolution is not causal: pad k − 1 on the left only (keep the first l "
            "outputs), so step t sees no later token", wrong=lambda m, x: _block(m, x, causal=False)),
    Mistake("the activation (SiLU) after the convolution is missing",
            wrong=lambda m, x: _block(m, x, act=False)),
    Mistake("the softplus on Δ is missing", wrong=lambda m, x: _block(m, x, softplus=False)),
    Mistake("dt_proj's bias is missing: pass it to the scan as delta_bias",
            wrong=lambda m, x: _block(m, x, bias=False)),
    Mistake("the skip D·u is missing", wrong=lambda m, x: _block(m, x, D=False)),
    Mistake("the gate is missing: y · silu(z), z the second half of in_proj",
            wrong=lambda m, x: _block(m, x, gate=False)),
    Mistake("a shape: the scan takes u, delta, z as (b, d, l) and B, C as (b, n, l); x_proj's "
            "output is (b, l, r + 2n) — a transposed B or C?",
            error=r"size of tensor|shape|mat1 and mat2|expected .* dim"),
)


def _model_tolerance(module) -> Compare:
    """float32 models to 1e-4; bfloat16 and float16 ones to their dtype's tolerance, also for
    the float32 tensors computed from them (Δ and h are rounded inputs' products there)."""
    dtype = str(next(module.parameters()).dtype).removeprefix("torch.")
    if dtype == "float32":
        return tolerance_by_dtype(float32=(1e-4, 1e-4))
    return tolerance_by_dtype(float32=DEFAULT_TOLERANCES.get(dtype, (3e-2, 5e-2)))


def check_mamba_block(student_fn: Callable, cases: Iterable[tuple]) -> Callable:
    """Lab 2.4.2, Exercise B2: ``mamba_block(mixer, x) -> (b, l, hidden)``, the Mamba block's
    forward from a real layer's weights, compared with that ``MambaMixer``'s own output.
    ``cases``: (mixer, x) pairs, x (b, l, hidden) in the model's dtype."""
    import torch

    case_list = [Case(mixer, x).expecting(_mixer_output(mixer, x),
                                          source="the real MambaMixer's output on the same x")
                 for mixer, x in cases]
    with torch.no_grad():
        return check_function(student_fn, _mixer_output, case_list, name="mamba_block",
                              compare=_model_tolerance(case_list[0].args[0]),
                              mistakes=BLOCK_MISTAKES)


def _mixer_output(mixer, x):
    """The mixer's own forward (transformers), no cache: the block exercise's stand-in."""
    import torch

    with torch.no_grad():
        out = mixer(x)
    return out[0] if isinstance(out, tuple) else out


def _with_states(fn: Callable) -> Callable:
    """Run a decode step on copies of the states; return (output, conv_state, ssm_state) as the
    step left them, so a step that does not write its states in place is seen."""
    def run(mixer, x, conv_state, ssm_state):
        import torch

        conv, state = conv_state.clone(), ssm_state.clone()
        with torch.no_grad():
            out = fn(mixer, x, conv, state)
        return out, conv, state
    return run


def _step(mixer, x, conv_state, ssm_state, *, shift_left=True, softplus=True, bias=True,
          D=True, gate=True, in_place=True):
    """One decode step with parts left out or wrong (effarch.mixer.mixer_step is the right one)."""
    import torch
    import torch.nn.functional as F

    xs, z = mixer.in_proj(x).chunk(2, dim=-1)
    window = torch.cat([conv_state[..., 1:], xs[..., None]], -1) if shift_left \
        else torch.cat([xs[..., None], conv_state[..., :-1]], -1)
    u = (window * mixer.conv1d.weight[:, 0]).sum(-1)
    u = mixer.act(u + mixer.conv1d.bias if mixer.conv1d.bias is not None else u)
    r, n = mixer.time_step_rank, mixer.ssm_state_size
    dt, B, C = torch.split(mixer.x_proj(u), [r, n, n], dim=-1)
    dt = (mixer.dt_proj(dt) if bias else dt @ mixer.dt_proj.weight.T).float()
    dt = F.softplus(dt) if softplus else dt
    h = torch.exp(dt[..., None] * -torch.exp(mixer.A_log.float())) * ssm_state \
        + (dt * u.float())[..., None] * B.float()[:, None, :]
    y = (h @ C.float()[..., None])[..., 0] + (mixer.D.float() * u.float() if D else 0)
    y = y * F.silu(z.float()) if gate else y
    if in_place:
        conv_state.copy_(window)
        ssm_state.copy_(h)
    return mixer.out_proj(y.to(x.dtype))


STEP_MISTAKES = (
    Mistake("the states are not updated in place: write the new window into conv_state and h "
            "into ssm_state (copy_, mul_, add_), as a cache does",
            wrong=_with_states(lambda m, x, c, s: _step(m, x, c, s, in_place=False))),
    Mistake("the conv window shifted the wrong way: drop the oldest column (index 0) and put "
            "the new input last (index −1)",
            wrong=_with_states(lambda m, x, c, s: _step(m, x, c, s, shift_left=False))),
    Mistake("the softplus on Δ is missing", wrong=_with_states(
        lambda m, x, c, s: _step(m, x, c, s, softplus=False))),
    Mistake("dt_proj's bias is missing (dt_proj(Δ) includes it)", wrong=_with_states(
        lambda m, x, c, s: _step(m, x, c, s, bias=False))),
    Mistake("the skip D·u is missing", wrong=_with_states(
        lambda m, x, c, s: _step(m, x, c, s, D=False))),
    Mistake("the gate is missing: y · silu(z)", wrong=_with_states(
        lambda m, x, c, s: _step(m, x, c, s, gate=False))),
)


def check_mamba_step(student_fn: Callable, records: Iterable) -> Callable:
    """Lab 2.4.2, Exercise B3: ``mamba_step(mixer, x, conv_state, ssm_state) -> (b, hidden)``,
    one decode step that updates the states in place, compared with what transformers computed
    and left in its cache (``effarch.hooks.record_decode_step``)."""
    from effarch.mixer import mixer_step

    records = list(records)
    cases = [Case(r.mixer, r.x, r.conv_state, r.ssm_state).expecting(
        (r.output, r.new_conv_state, r.new_ssm_state),
        source="transformers' decode step: the layer's output, then the conv and SSM states "
               "its cache holds after the step") for r in records]
    student = _with_states(student_fn)
    chosen = check_function(student, _with_states(mixer_step), cases, name="mamba_step",
                            compare=_model_tolerance(records[0].mixer), mistakes=STEP_MISTAKES)
    return student_fn if chosen is student else mixer_step


# ------------------------------------------------------------------------------- comparison


def diff(actual: Any, expected: Any, *, rtol: float | None = None,
         atol: float | None = None) -> str:
    """A readable description of how ``actual`` differs from ``expected``; ``""`` when they match.

    ``rtol``/``atol`` default by dtype (``DEFAULT_TOLERANCES``); integers, booleans and strings
    compare exactly unless a tolerance is given.
    """
    return "\n".join(diff_lines(actual, expected, rtol=rtol, atol=atol))


def diff_lines(actual: Any, expected: Any, *, rtol: float | None = None,
               atol: float | None = None, path: str = "") -> list[str]:
    """:func:`diff` as a list of lines; ``path`` names the position inside a nested output."""
    torch, np, pd = (sys.modules.get(m) for m in ("torch", "numpy", "pandas"))
    tol = (rtol, atol)
    if torch is not None and isinstance(expected, torch.Tensor):
        return _diff_tensor(actual, expected, tol, path)
    if np is not None and isinstance(expected, np.ndarray):
        return _diff_ndarray(actual, expected, tol, path)
    if pd is not None and isinstance(expected, (pd.DataFrame, pd.Series)):
        return _diff_pandas(actual, expected, tol, path)
    if dataclasses.is_dataclass(expected) and not isinstance(expected, type):
        return _diff_dataclass(actual, expected, tol, path)
    if isinstance(expected, Mapping):
        return _diff_mapping(actual, expected, tol, path)
    if isinstance(expected, (list, tuple)):
        return _diff_sequence(actual, expected, tol, path)
    if isinstance(expected, numbers.Number) and not isinstance(expected, bool):
        return _diff_number(actual, expected, tol, path)
    return _diff_other(actual, expected, path)


def _at(path: str, text: str) -> list[str]:
    return [f"output{path}: {text}" if path else text]


def _describe(x: Any) -> str:
    """A short description: shape and dtype for tensors and arrays, a function's or a method's
    name, a class name for objects whose repr is long or not meant to be read (a config, a
    module), a clipped repr otherwise."""
    shape = getattr(x, "shape", None)
    if shape is not None and hasattr(x, "dtype") and not isinstance(x, numbers.Number):
        kind = "tensor" if type(x).__module__.startswith("torch") else type(x).__name__
        dtype = str(x.dtype).removeprefix("torch.")
        return f"{kind} {tuple(shape)} {dtype}"
    if callable(x) and hasattr(x, "__qualname__"):
        return x.__qualname__
    text = _repr.repr(x)
    if "\n" in text or text.startswith("<"):
        return type(x).__name__
    return text


def _call_args(args: tuple, kwargs: dict) -> str:
    return ", ".join([_describe(a) for a in args] + [f"{k}={_describe(v)}" for k, v in kwargs.items()])


def _tolerance(tol: tuple[float | None, float | None], dtype: str) -> tuple[float, float]:
    rtol, atol = DEFAULT_TOLERANCES.get(dtype, DEFAULT_TOLERANCES["float32"])
    return (rtol if tol[0] is None else tol[0]), (atol if tol[1] is None else tol[1])


def _num(x: Any) -> str:
    try:
        return f"{x:.6g}"
    except (TypeError, ValueError):
        return repr(x)


def _as_scalar(x: Any) -> Any:
    """A one-element tensor or array as a Python number (``.item()``); anything else unchanged."""
    size = x.numel() if callable(getattr(x, "numel", None)) else getattr(x, "size", None)
    return x.item() if size == 1 and callable(getattr(x, "item", None)) else x


def _diff_tensor(actual: Any, expected: Any, tol: tuple, path: str) -> list[str]:
    import torch

    if not isinstance(actual, torch.Tensor):
        return _at(path, f"expected a torch.Tensor {_describe(expected)}, got {_describe(actual)}")
    inexact = expected.is_floating_point() or expected.is_complex() or tol != (None, None)

    def to_numpy(t: torch.Tensor) -> Any:
        t = t.detach().cpu()
        if t.is_complex():
            return t.to(torch.complex128).numpy()
        # bf16 has no numpy dtype; float64 also keeps the reported errors exact
        return t.to(torch.float64).numpy() if inexact or t.is_floating_point() else t.numpy()

    a_dtype, e_dtype = (str(t.dtype).removeprefix("torch.") for t in (actual, expected))
    return _diff_arrays(to_numpy(actual), to_numpy(expected), a_dtype, e_dtype,
                        _tolerance(tol, e_dtype) if inexact else None, path)


def _diff_ndarray(actual: Any, expected: Any, tol: tuple, path: str) -> list[str]:
    import numpy as np

    if not isinstance(actual, np.ndarray):
        return _at(path, f"expected a numpy array {_describe(expected)}, got {_describe(actual)}")
    numeric = np.issubdtype(expected.dtype, np.number) and np.issubdtype(actual.dtype, np.number)
    inexact = numeric and (np.issubdtype(expected.dtype, np.inexact) or tol != (None, None))
    a, e = actual, expected
    if inexact:
        wide = np.complex128 if np.iscomplexobj(a) or np.iscomplexobj(e) else np.float64
        a, e = a.astype(wide), e.astype(wide)
    return _diff_arrays(a, e, actual.dtype.name, expected.dtype.name,
                        _tolerance(tol, expected.dtype.name) if inexact else None, path)


def _diff_arrays(a: Any, e: Any, a_dtype: str, e_dtype: str, tol: tuple[float, float] | None,
                 path: str) -> list[str]:
    """Compare two numpy arrays (already upcast); ``tol`` is ``None`` for an exact comparison."""
    if a.shape != e.shape:
        hint = " (the same sizes in another order: a transpose?)" \
            if sorted(a.shape) == sorted(e.shape) else ""
        return _at(path, f"shape mismatch: got {tuple(a.shape)}, expected {tuple(e.shape)}{hint}")
    lines = [] if a_dtype == e_dtype else [f"dtype mismatch: got {a_dtype}, expected {e_dtype}"]
    lines += _diff_values(a, e, tol) if tol is not None else _diff_exact(a, e)
    return [out for line in lines for out in _at(path, line)]


def _index(flat: int, shape: tuple) -> str:
    import numpy as np

    return "[" + ", ".join(str(int(i)) for i in np.unravel_index(flat, shape)) + "]"


def _diff_exact(a: Any, e: Any) -> list[str]:
    import numpy as np

    bad = np.asarray(a != e).reshape(-1)
    if not bad.any():
        return []
    i = int(np.argmax(bad))
    return [f"{int(bad.sum())} of {bad.size} elements differ (compared exactly); first at "
            f"{_index(i, e.shape)}: got {a.reshape(-1)[i].item()!r}, "
            f"expected {e.reshape(-1)[i].item()!r}"]


def _diff_values(a: Any, e: Any, tol: tuple[float, float]) -> list[str]:
    """Elementwise ``|a - e| <= atol + rtol * |e|`` (as ``torch.isclose``); NaN never matches."""
    import numpy as np

    (rtol, atol), shape = tol, e.shape
    a, e = a.reshape(-1), e.reshape(-1)
    with np.errstate(all="ignore"):
        bad = ~np.isclose(a, e, rtol=rtol, atol=atol)  # equal infinities match, NaN never
        err = np.where(a == e, 0.0, np.abs(a - e))  # for the report
        nan_a, nan_e, finite = np.isnan(a), np.isnan(e), np.isfinite(err)
        if not bad.any():
            return []
        lines = [f"{int(bad.sum())} of {bad.size} elements differ (rtol={rtol:g}, atol={atol:g})"]
        for mask, what in ((nan_e, "the reference has NaN"), (nan_a, "got NaN"),
                           (~finite & ~nan_a & ~nan_e, "infinite error")):
            if mask.any():
                i = int(np.argmax(mask))
                lines.append(f"{what} at {int(mask.sum())} position(s), first at "
                             f"{_index(i, shape)}: got {_num(a[i])}, expected {_num(e[i])}")
        err = np.where(finite & bad, err, -1.0)
        i = int(np.argmax(err))
        if err[i] >= 0:
            lines.append(f"max abs error {err[i]:.3g} at {_index(i, shape)}: "
                         f"got {_num(a[i])}, expected {_num(e[i])}")
            rel = np.where(np.abs(e) > 0, err / np.abs(e), -1.0)
            j = int(np.argmax(rel))
            if rel[j] >= 0:
                lines.append(f"max rel error {rel[j]:.3g} at {_index(j, shape)}")
    return lines


def _diff_number(actual: Any, expected: Any, tol: tuple, path: str) -> list[str]:
    actual = _as_scalar(actual)
    if not isinstance(actual, numbers.Number):
        return _at(path, f"expected a number ({_num(expected)}), got {_describe(actual)}")
    if isinstance(expected, numbers.Integral) and tol == (None, None):
        if actual == expected:
            return []
        return _at(path, f"got {actual!r}, expected {expected!r} "
                         "(compared exactly; give the check rtol/atol to allow a tolerance)")
    dtype = getattr(getattr(expected, "dtype", None), "name", "float")
    rtol, atol = _tolerance(tol, dtype)
    if actual != actual or expected != expected:  # NaN never matches
        return _at(path, f"got {_num(actual)}, expected {_num(expected)} (NaN never matches)")
    err = abs(actual - expected)
    if actual == expected or (math.isfinite(err) and err <= atol + rtol * abs(expected)):
        return []
    rel = f", rel error {err / abs(expected):.3g}" if expected else ""
    return _at(path, f"got {_num(actual)}, expected {_num(expected)} "
                     f"(abs error {err:.3g}{rel}; rtol={rtol:g}, atol={atol:g})")


def _diff_other(actual: Any, expected: Any, path: str) -> list[str]:
    """Strings, booleans, ``None`` and other objects: ``==``."""
    if isinstance(expected, str) and isinstance(actual, str):
        if actual == expected:
            return []
        i = next((k for k, (x, y) in enumerate(zip(actual, expected, strict=False))
                  if x != y),
                 min(len(actual), len(expected)))
        return _at(path, f"got {_repr.repr(actual)}, expected {_repr.repr(expected)} "
                         f"(first difference at character {i})")
    if not isinstance(actual, str):
        actual = _as_scalar(actual)
    try:
        same = bool(actual == expected)
    except Exception as exc:
        return _at(path, f"cannot compare {type(actual).__name__} with {type(expected).__name__} "
                         f"({type(exc).__name__}); give the check a compare= function")
    if same:
        return []
    kinds = "" if type(actual) is type(expected) else \
        f" (a {type(actual).__name__}, not a {type(expected).__name__})"
    return _at(path, f"got {_describe(actual)}, expected {_describe(expected)}{kinds}")


def _diff_pandas(actual: Any, expected: Any, tol: tuple, path: str) -> list[str]:
    import pandas as pd

    if not isinstance(actual, type(expected)):
        return _at(path, f"expected a {type(expected).__name__}, got {_describe(actual)}")
    rtol, atol = _tolerance(tol, "float")
    assert_equal = pd.testing.assert_frame_equal if isinstance(expected, pd.DataFrame) \
        else pd.testing.assert_series_equal
    try:
        assert_equal(actual, expected, rtol=rtol, atol=atol)
    except AssertionError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        return [out for line in lines for out in _at(path, line)]
    return []


def _diff_items(items: Iterable[tuple[str, Any, Any]], tol: tuple) -> list[str]:
    """Diff ``(path, actual, expected)`` triples; show the first few that differ, count the rest."""
    lines, failing = [], 0
    for path, a, e in items:
        sub = diff_lines(a, e, rtol=tol[0], atol=tol[1], path=path)
        failing += bool(sub)
        if sub and failing <= _MAX_ITEM_DIFFS:
            lines += sub
    if failing > _MAX_ITEM_DIFFS:
        lines.append(f"… and {failing - _MAX_ITEM_DIFFS} more item(s) differ")
    return lines


def _diff_dataclass(actual: Any, expected: Any, tol: tuple, path: str) -> list[str]:
    names = [f.name for f in dataclasses.fields(expected)]
    missing = [n for n in names if not hasattr(actual, n)]
    if missing:
        return _at(path, f"expected a {type(expected).__name__}, got {_describe(actual)} "
                         f"(without field(s) {', '.join(missing)})")
    return _diff_items(((f"{path}.{n}", getattr(actual, n), getattr(expected, n)) for n in names),
                       tol)


def _diff_mapping(actual: Any, expected: Any, tol: tuple, path: str) -> list[str]:
    if not isinstance(actual, Mapping):
        return _at(path, f"expected a mapping with keys {_repr.repr(list(expected))}, "
                         f"got {_describe(actual)}")
    missing = [repr(k) for k in expected if k not in actual]
    extra = [repr(k) for k in actual if k not in expected]
    lines = _at(path, f"missing key(s): {', '.join(missing)}") if missing else []
    lines += _at(path, f"unexpected key(s): {', '.join(extra)}") if extra else []
    common = ((f"{path}[{k!r}]", actual[k], v) for k, v in expected.items() if k in actual)
    return lines + _diff_items(common, tol)


def _diff_sequence(actual: Any, expected: Any, tol: tuple, path: str) -> list[str]:
    if not isinstance(actual, (list, tuple)):
        return _at(path, f"expected a {type(expected).__name__} of {len(expected)} item(s), "
                         f"got {_describe(actual)}")
    if len(actual) != len(expected):
        return _at(path, f"got {len(actual)} item(s), expected {len(expected)}")
    pairs = enumerate(zip(actual, expected, strict=True))
    return _diff_items(((f"{path}[{i}]", a, e) for i, (a, e) in pairs), tol)


# ------------------------------------------------------------ lab 2.4.3: MoE exploration
# Checks that know the likely mistakes: each ❌ names the cause when the answer matches one.

_COUNT_FAMILIES = (("qwen2_moe", {}), ("deepseek_v2", {}), ("olmoe", {"tie_word_embeddings": True}),
                   ("jamba", {}))  # shared experts and a gate, dense layers, a tied head, a hybrid


def _count_diagnosis(actual, pc) -> list[str]:
    """Why (total, active) differs from the ParamCount ``pc``: the likely cause, when the answer
    equals what that mistake gives."""
    if not (isinstance(actual, (tuple, list)) and len(actual) == 2
            and all(isinstance(_as_scalar(x), numbers.Integral) for x in actual)):
        return [f"expected (total, active) as two integers, got {_describe(actual)}"]
    total, active = (int(_as_scalar(x)) for x in actual)
    if (total, active) == (pc.total, pc.active):
        return []
    k, one = pc.experts_per_token, pc.per_expert * pc.moe_layers
    causes = [
        (pc.lm_head == 0 and total == pc.total + pc.embedding,
         "the LM head is tied to the embedding (one tensor): count it once "
         "(model.parameters() yields a shared tensor once; state_dict() lists it twice)"),
        (total != pc.total, "count every parameter once: sum(p.numel() for p in "
                            "model.parameters())"),
        (active == pc.total, "every routed expert counted as active: a token uses only the "
                             f"k = {k} its router picks in each MoE layer"),
        (k > 1 and active == pc.active - (k - 1) * one,
         f"one routed expert per token counted active; this model sends each token to k = {k} "
         "(config.num_experts_per_tok) in every MoE layer"),
        (pc.shared_experts and active == pc.active - pc.shared_experts,
         "the shared experts are missing: every token goes through them (and Qwen2-MoE's "
         "shared_expert_gate)"),
        (active == pc.active - pc.router, "the routers are missing: every token goes through "
                                          "the router of every MoE layer"),
        (pc.dense_mlp and active == pc.active - pc.dense_mlp,
         "the dense feed-forward layers are missing: layers that are not MoE keep a plain MLP"),
        (active == pc.active - pc.embedding,
         "the embedding table is left out: this check counts it as active, as Mixtral's and "
         "OLMoE's published figures do"),
        (pc.lm_head == 0 and active == pc.active + pc.embedding,
         "the tied LM head is counted twice in the active count"),
        (active != pc.active, "active differs: every parameter, less (E - k)/E of each MoE "
                              "layer's routed experts"),
    ]
    cause = next((text for hit, text in causes if hit), None)
    if cause is None:
        return []
    return [f"got total {total:,}, active {active:,}; expected total {pc.total:,}, active "
            f"{pc.active:,}", f"likely cause: {cause}",
            f"(this model: E = {pc.n_experts}, k = {k}, {pc.moe_layers} MoE layers, "
            f"{pc.per_expert:,} parameters per routed expert, shared experts {pc.shared_experts:,},"
            f" routers {pc.router:,}, dense MLPs {pc.dense_mlp:,}, head "
            f"{'tied' if pc.lm_head == 0 else f'{pc.lm_head:,}'})"]


def family_models(families=_COUNT_FAMILIES) -> list:
    """Small random models (CPU, float32) of MoE families whose counts trip common mistakes."""
    import torch
    from transformers import AutoModelForCausalLM

    from effarch import moe

    torch.manual_seed(0)
    return [AutoModelForCausalLM.from_config(moe.small_config(f, **kw), dtype=torch.float32)
            for f, kw in families]


def check_param_count(student_fn: Callable, models: Iterable = (), *,
                      name: str = "count_total_and_active") -> Callable:
    """Check ``student_fn(model) -> (total, active)`` against ``effarch.moe.count_params`` on
    ``models`` and on small random models of families with shared experts, dense layers, a tied
    head and a hybrid (:func:`family_models`). A ❌ names the likely cause (a tied head counted
    twice, one expert active for top-k, shared experts or routers left out, ...). Returns
    ``student_fn`` if every case passes, else a function giving effarch's (total, active)."""
    from effarch import moe

    counts: dict[tuple[int, int], Any] = {}

    def reference(model):
        pc = moe.count_params(model)
        counts[(pc.total, pc.active)] = pc
        return pc.total, pc.active

    def compare(actual, expected):
        return "\n".join(_count_diagnosis(actual, counts[expected])) or None

    cases = [*models, *family_models()]
    return check_function(student_fn, reference, cases=cases, name=name, compare=compare)


def _rate_without_boundaries(top1, doc, n_experts):
    import numpy as np

    top1 = np.asarray(top1)
    return float((top1[1:] == top1[:-1]).mean())


def _same_expert_diagnosis(actual, expected, case) -> list[str]:
    import numpy as np

    from effarch import moe

    if not (isinstance(actual, (tuple, list)) and len(actual) == 2):
        return [f"expected (rate, chance) as two numbers, got {_describe(actual)}"]
    rate, chance = (float(_as_scalar(x)) for x in actual)
    top1, doc, n = (np.asarray(case[0]), np.asarray(case[1]), case[2])
    close = lambda a, b: abs(a - b) <= 1e-12 + 1e-9 * abs(b)  # noqa: E731
    if close(rate, expected[0]) and close(chance, expected[1]):
        return []
    load = moe.expert_load(top1, n)
    ref = moe.same_expert_rate(top1, doc, n)
    same = (top1[1:] == top1[:-1])[doc[1:] == doc[:-1]]
    causes = [
        (close(chance, 1 / n), "chance as 1/E assumes every expert gets the same share; two "
                               "independent tokens pick the same expert with probability "
                               "Σ loadᵢ² of the measured first-choice load"),
        (close(chance, float((load ** 2).mean())), "the mean of loadᵢ²: the chance is the sum"),
        (close(chance, float(load.max())), "the largest load: the chance is Σ loadᵢ²"),
        (not close(chance, ref.chance), "chance should be Σ loadᵢ², load = the share of first "
                                        "choices each expert gets over these tokens"),
        (close(rate, _rate_without_boundaries(top1, doc, n)),
         "pairs across a document boundary counted: the last token of one document and the "
         "first of the next are not consecutive"),
        (close(rate, float(same.sum()) / len(top1)), "divided by the tokens; divide by the "
                                                     "pairs (consecutive tokens in one document)"),
        (not close(rate, ref.rate), "rate: share of consecutive pairs, inside one document, "
                                    "whose first choices agree"),
    ]
    cause = next((text for hit, text in causes if hit), None)
    if cause is None:
        return []
    return [f"got rate {rate:.6g}, chance {chance:.6g}; expected {expected[0]:.6g}, "
            f"{expected[1]:.6g}", f"likely cause: {cause}"]


def same_expert_cases() -> list[tuple]:
    """(top1, doc, E) cases with an uneven load (chance ≠ 1/E) and document boundaries whose
    neighbours agree (so counting across them changes the rate)."""
    import numpy as np

    rng = np.random.default_rng(0)
    cases = []
    for n_tokens, n_docs, e in ((400, 5, 8), (97, 1, 4), (1000, 12, 16)):
        p = rng.dirichlet(np.full(e, 0.7))
        top1 = rng.choice(e, size=n_tokens, p=p)
        top1[1:] = np.where(rng.random(n_tokens - 1) < 0.3, top1[:-1], top1[1:])  # some runs
        doc = np.sort(rng.integers(0, n_docs, n_tokens))
        starts = np.flatnonzero(np.diff(doc)) + 1
        top1[starts] = top1[starts - 1]  # neighbours across boundaries agree
        cases.append((top1, doc, e))
    return cases


def check_same_expert_rate(student_fn: Callable, *, name: str = "same_expert_rate") -> Callable:
    """Check ``student_fn(top1, doc, n_experts) -> (rate, chance)`` against
    ``effarch.moe.same_expert_rate`` on :func:`same_expert_cases`. A ❌ names the likely cause
    (a chance of 1/E, pairs across documents, dividing by tokens, ...)."""
    from effarch import moe

    cases = same_expert_cases()
    by_value: dict[tuple[float, float], tuple] = {}

    def reference(top1, doc, n_experts):
        r = moe.same_expert_rate(top1, doc, n_experts)
        by_value[(r.rate, r.chance)] = (top1, doc, n_experts)
        return r.rate, r.chance

    def compare(actual, expected):
        return "\n".join(_same_expert_diagnosis(actual, expected, by_value[expected])) or None

    return check_function(student_fn, reference, cases=cases, name=name, compare=compare)

# ------------------------------------------------------------------ lab 2.4.6: LoRA on Mamba


def check_lora_model(student_fn: Callable, reference_fn: Callable, *,
                     make_model: Callable[[], Any], batch: Mapping[str, Any],
                     ranks: Sequence[int] = (4, 8), name: str | None = None) -> Callable:
    """Check ``student_fn(model, rank)``, which must return ``model`` wrapped with LoRA adapters
    of rank ``rank`` on ``in_proj`` and ``x_proj`` (lab 2.4.6). For each rank, on a fresh model
    from ``make_model()``: a PEFT model comes back (not the bare model, which would fully
    fine-tune); its trainable parameters per module are ``r·in`` (``lora_A``) and ``out·r``
    (``lora_B``) for every layer's ``in_proj`` and ``x_proj`` and nothing else; its
    ``lora_alpha`` is ``2·r`` and it has no dropout; after one
    optimiser step on ``batch`` every LoRA matrix gets a non-zero gradient, and the base weights
    have not moved. Returns ``student_fn`` if every rank passes, else ``reference_fn``."""
    name = name or getattr(student_fn, "__name__", "exercise")
    for rank in ranks:
        model = make_model()
        try:
            wrapped = student_fn(model, rank)
        except NotImplementedError as exc:
            return _finish(_not_attempted(name, exc), reference_fn)
        except Exception as exc:  # PEFT's refusal of out_proj lands here, with a hint
            hint = [] if "Mamba" not in str(exc) else [
                "PEFT refuses out_proj and conv1d on Mamba models: target in_proj and x_proj"]
            return _finish(_raised(name, exc, f"rank {rank}", hint), reference_fn, exc)
        problems = _lora_problems(wrapped, model.config, rank, batch)
        if problems:
            return _finish(CheckResult(name, "fail", f"rank {rank}: the adapters are not what "
                                       "LoRA on in_proj and x_proj should be", tuple(problems)),
                           reference_fn)
    return _finish(CheckResult(
        name, "pass", f"ranks {', '.join(map(str, ranks))}: LoRA parameters per module as "
        "expected, a gradient on every LoRA matrix after one step, base weights unchanged"),
        student_fn)


def _lora_problems(wrapped: Any, config: Any, rank: int, batch: Mapping[str, Any]) -> list[str]:
    from effarch import finetune

    if not hasattr(wrapped, "peft_config"):
        total = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
        return [f"got a {type(wrapped).__name__} without adapters: {total:,} parameters would "
                "train — full fine-tuning. The LoRA wrapping is missing: return "
                "peft.get_peft_model(model, config)"]
    got = finetune.trainable_by_module(wrapped)
    want = finetune.expected_lora_counts(config, rank)
    if got != want:
        return [f"trainable parameters by module: got {got}", f"expected {want}",
                *_lora_hints(got, want, config, rank)]
    cfg = wrapped.peft_config.get("default")
    problems = []
    if cfg is not None and cfg.lora_alpha != 2 * rank:
        problems.append(f"lora_alpha is {cfg.lora_alpha}, not 2·rank = {2 * rank}: the update is "
                        f"scaled by alpha/r = {cfg.lora_alpha / rank:g} instead of 2. Pass "
                        "lora_alpha=2 * rank")
    if cfg is not None and cfg.lora_dropout:
        problems.append(f"lora_dropout is {cfg.lora_dropout}: the exercise asks for none "
                        "(lora_dropout=0.0)")
    if problems:
        return problems
    report = finetune.gradient_check(wrapped, batch)
    if report.no_gradient:
        problems.append(f"{len(report.no_gradient)} LoRA matrices got no gradient after one "
                        f"step on the path that runs ({report.path}), e.g. "
                        f"{report.no_gradient[0]}")
    if report.base_changed:
        problems.append(f"base weights changed in training: {report.base_changed[:3]}")
    return problems


def _lora_hints(got: dict, want: dict, config: Any, rank: int) -> list[str]:
    """The likely causes of trainable counts that differ from LoRA's on in_proj and x_proj."""
    hints = []
    base = [k for k in got if ".lora_" not in k]
    if base:
        hints.append(f"base weights are trainable ({', '.join(base)}): LoRA trains the adapters "
                     "only and keeps the model frozen")
    if any(k.startswith("dt_proj.") for k in got):
        hints.append("dt_proj is targeted: transformers' mixer reads dt_proj.weight directly, "
                     "so its adapter is never called and never trains")
    missing = sorted({k.split(".")[0] for k in want} - {k.split(".")[0] for k in got})
    if missing:
        hints.append(f"no adapter on {', '.join(missing)}: target in_proj and x_proj")
    if not hints and got.keys() == want.keys():
        per_layer = config.num_hidden_layers * config.hidden_size
        hints.append(f"the adapters have rank {got['in_proj.lora_A'] // per_layer}, not {rank}: "
                     "pass r=rank to LoraConfig")
    return hints


def check_sweep_reading(student_fn: Callable, reference_fn: Callable, sweep: Any, *,
                        name: str | None = None) -> Callable:
    """Check a function that reads a rank/targets sweep (lab 2.4.6) on the measured ``sweep``
    and on three variants built from it, so that an answer copied from this run's table, or read
    from the wrong column, fails: the smallest adapters given the lowest losses; the largest
    ones given the lowest, with only the two largest within 10% of the best; the bytes tripled.
    Returns ``student_fn`` if it agrees with ``reference_fn`` on all four, else ``reference_fn``."""
    order = sweep["trainable"].rank(method="first").astype(int).tolist()  # 1 = fewest
    low, n = float(sweep["eval_loss"].min()), len(sweep)
    small_best, big_best, tripled = sweep.copy(), sweep.copy(), sweep.copy()
    small_best["eval_loss"] = [low * (1 + 0.25 * (k - 1)) for k in order]
    factors = [1.0, 1.05] + [1.3 + 0.3 * i for i in range(n)]
    big_best["eval_loss"] = [low * factors[n - k] for k in order]
    tripled["state_bytes"] = sweep["state_bytes"] * 3
    return check_function(student_fn, reference_fn,
                          cases=[Case(sweep), Case(small_best), Case(big_best), Case(tripled)],
                          name=name or getattr(student_fn, "__name__", "exercise"))


# ------------------------------------------------------------------ lab 2.4.4: MoE router
# The top-k router is checked against what real MoE blocks chose, the Switch loss against
# transformers' own function, capacity dispatch against effarch.moe; each ❌ names the likely
# mistake when the answer equals what that mistake gives.


def _route_parts(actual, case) -> tuple[Any, Any] | str:
    """(weights, indices) as float64 / int64 tensors, or why the output has the wrong form."""
    import torch

    if not (isinstance(actual, (tuple, list)) and len(actual) == 2):
        return f"expected (weights, indices), got {_describe(actual)}"
    w, i = (torch.as_tensor(x) for x in actual)
    shape = tuple(case.index.shape)
    if tuple(w.shape) != shape or tuple(i.shape) != shape:
        return (f"expected weights and indices of shape (T, k) = {shape}, got "
                f"{tuple(w.shape)} and {tuple(i.shape)}")
    if i.is_floating_point():
        return "indices must be integers (torch.topk's .indices), got floats"
    return w.detach().double(), i.long()


def _route_causes(w, i, case, tol) -> str | None:
    import torch

    logits = case.logits.double()
    probs = torch.softmax(logits, -1)
    near = lambda a, b: torch.allclose(a, b, rtol=tol, atol=tol)  # noqa: E731
    top = torch.topk(probs, case.k, -1).values
    sums_one = near(w.sum(-1), torch.ones(len(w), dtype=w.dtype))
    if not case.norm_topk_prob and sums_one:
        return ("the k weights were renormalised to sum 1 — or taken as a softmax over the k "
                "selected logits, which is the same thing — but this model does not "
                f"renormalise (norm_topk_prob=False, {case.model}): use the probabilities of "
                "the softmax over all E experts as they are")
    if case.norm_topk_prob and near(w, top):
        return ("the k probabilities were not renormalised: this model "
                f"({case.model}, norm_topk_prob=True) divides them by their sum")
    if near(w, torch.topk(logits, case.k, -1).values):
        return "the weights are the raw logits: apply the softmax over the E experts first"
    if near(w, torch.topk(torch.softmax(logits, 0), case.k, -1).values):
        return "the softmax ran over the tokens (dim 0): take it over the experts (dim=-1)"
    if near(probs.gather(-1, i), torch.topk(probs, case.k, -1, largest=False).values):
        return "these are the k least likely experts: top-k keeps the largest"
    if torch.equal(i.sort(-1).values, case.index.sort(-1).values):
        return ("the right experts in another order: return them by descending weight, as "
                "torch.topk does")
    return None


def _route_diagnosis(actual, case) -> list[str]:
    import torch

    parts = _route_parts(actual, case)
    if isinstance(parts, str):
        return [parts]
    w, i = parts
    tol = 1e-2 if case.dtype in ("bfloat16", "float16") else 1e-5
    probs = torch.softmax(case.logits.double(), -1)
    # compare the probabilities of the chosen experts, not their ids: tied logits may pick either
    same_choice = torch.allclose(probs.gather(-1, i.clamp(0, probs.shape[-1] - 1)),
                                 probs.gather(-1, case.index), rtol=tol, atol=tol)
    if same_choice and torch.allclose(w, case.weights.double(), rtol=tol, atol=tol):
        return []
    where = f"{case.model}, layer {case.layer} (k = {case.k}, E = {probs.shape[-1]})"
    bad = (w - case.weights.double()).abs().max(-1).values.argmax()
    lines = [f"{where}: token {int(bad)} got experts {i[bad].tolist()} weights "
             f"{[round(x, 4) for x in w[bad].tolist()]}; the block chose "
             f"{case.index[bad].tolist()} weights "
             f"{[round(x, 4) for x in case.weights[bad].double().tolist()]}"]
    cause = _route_causes(w, i, case, tol)
    return lines + ([f"likely cause: {cause}"] if cause else [])


def check_topk_route(student_fn: Callable, cases: Iterable, *,
                     name: str = "topk_route") -> Callable:
    """Check ``student_fn(logits, k, *, norm_topk_prob) -> (weights, indices)`` against what
    real MoE blocks chose on the same logits (``effarch.moe.router_cases``: each case is one
    layer of a model that renormalises or one that does not). Ties between experts are
    accepted either way. A ❌ names the likely cause (renormalising where the model does not —
    a softmax over the k selected logits does exactly that —, not renormalising where it does,
    raw logits, the wrong axis, the wrong order). Returns ``student_fn`` or
    ``effarch.moe.topk_route``."""
    from effarch import moe

    cases = list(cases)
    if not {c.norm_topk_prob for c in cases} >= {True, False}:
        raise ValueError("check_topk_route needs a model that renormalises and one that does "
                         "not, so that a softmax over the k selected logits is caught")
    by_logits = {id(c.logits): c for c in cases}
    by_answer: dict[int, Any] = {}

    def reference(logits, k, *, norm_topk_prob):
        case = by_logits.get(id(logits))
        if case is None:  # called later by the notebook: effarch's router
            return moe.topk_route(logits, k, norm_topk_prob=norm_topk_prob)
        by_answer[id(case.weights)] = case
        return case.weights, case.index

    def compare(actual, expected):
        return "\n".join(_route_diagnosis(actual, by_answer[id(expected[0])])) or None

    result = check_function(student_fn, reference, name=name, compare=compare,
                            cases=[Case(c.logits, c.k, norm_topk_prob=c.norm_topk_prob)
                                   for c in cases])
    return result if result is student_fn else moe.topk_route


def _transformers_balancing_loss():
    """transformers' ``load_balancing_loss_func`` (one copy per MoE model; Mixtral's, which
    Qwen2-MoE, OLMoE and Jamba repeat verbatim in 5.17 and 5.24)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    return load_balancing_loss_func


def switch_loss_cases(extra: Iterable = ()) -> list:
    """Cases ``(router_logits, num_experts, top_k[, attention_mask])`` whose answers separate
    the usual mistakes: skewed routing (f is not uniform), layers that differ (pooled ≠ mean
    of layers), k > 1 (all choices ≠ first choice), padding. ``extra``: more cases (a real
    model's ``out.router_logits``)."""
    import torch

    g = torch.Generator().manual_seed(0)

    def layer(t, e, skew):  # logits with a preference for the first experts
        return torch.randn(t, e, generator=g) + skew * torch.linspace(1, -1, e)

    mask = torch.ones(4, 16)
    mask[0, 10:], mask[2, 5:] = 0, 0
    return [Case((layer(64, 8, 1.5), layer(64, 8, -0.5)), 8, 2),
            Case((layer(40, 16, 2.0),), 16, 3),
            Case((layer(64, 8, 0.0), layer(64, 8, 2.5), layer(64, 8, 1.0)), 8, 1),
            Case((layer(64, 8, 1.0), layer(64, 8, 0.3)), 8, 2, attention_mask=mask),
            *extra]


def _switch_variants(router_logits, num_experts, top_k, attention_mask=None) -> list[tuple]:
    """(value, cause) of the plausible wrong answers on one case."""
    import torch

    from effarch import moe

    ref = float(_transformers_balancing_loss()(tuple(router_logits), num_experts, top_k,
                                                attention_mask))
    stacked = torch.cat([g.float() for g in router_logits])
    probs = torch.softmax(stacked, -1)
    first = torch.nn.functional.one_hot(probs.argmax(-1), num_experts).float().mean(0)
    out = [
        (ref / num_experts, "the factor N (the number of experts) is missing: N · Σ f_i · P_i "
                            "makes a uniform router score k whatever N"),
        (num_experts * float((first * probs.mean(0)).sum()),
         "only the first choice counted in f: transformers counts every one of the k choices "
         "(so uniform top-k routing gives k, 2.0 for top-2)"),
        (ref / top_k, "f divided by k (shares summing to 1): transformers' f counts the k choices "
                      "of each token, summing to k"),
        (num_experts * float((probs.mean(0) ** 2).sum()),
         "f taken as the mean probability: f is the share of tokens *routed* to each expert "
         "(a count from the top-k; it carries no gradient)"),
        (float(moe.load_balancing_loss(tuple(router_logits), num_experts, top_k, attention_mask,
                                       per_layer=True)),
         "the mean of each layer's loss: transformers pools the layers — f and P are averaged "
         "over every layer's tokens, then multiplied (per-layer is how tiny-moe was trained)"),
    ]
    if attention_mask is not None:
        out.append((float(_transformers_balancing_loss()(tuple(router_logits), num_experts,
                                                          top_k)),
                    "padding counted: leave out the tokens whose attention_mask is 0, from f "
                    "and from P"))
    out += [(ref * a, f"multiplied by a coefficient α = {a}: the loss is N · Σ f_i · P_i; α "
                      "is applied by the caller") for a in (0.001, 0.01, 0.02)]
    return out


def check_switch_loss(student_fn: Callable, extra_cases: Iterable = (), *,
                      name: str = "switch_loss") -> Callable:
    """Check ``student_fn(router_logits, num_experts, top_k, attention_mask=None)`` — a tuple of
    (T, E) logits per layer in, a scalar out — against transformers'
    ``load_balancing_loss_func`` on :func:`switch_loss_cases` and ``extra_cases``. A ❌ names
    the likely cause (N missing, the first choice only, per-layer mean, padding counted, ...).
    Returns ``student_fn`` or ``effarch.moe.load_balancing_loss``."""
    from effarch import moe

    lbl = _transformers_balancing_loss()
    cases = switch_loss_cases(extra_cases)
    by_value: dict[float, tuple] = {}

    def reference(router_logits, num_experts, top_k, attention_mask=None):
        value = float(lbl(tuple(router_logits), num_experts, top_k, attention_mask))
        by_value[value] = (router_logits, num_experts, top_k, attention_mask)
        return value

    def compare(actual, expected):
        got = _as_scalar(actual)
        if not isinstance(got, numbers.Real):
            return f"expected a scalar (a 0-d tensor or a float), got {_describe(actual)}"
        if math.isclose(float(got), expected, rel_tol=1e-5, abs_tol=1e-7):
            return None
        lines = [f"got {float(got):.6g}, transformers' load_balancing_loss_func gives "
                 f"{expected:.6g}"]
        for value, cause in _switch_variants(*by_value[expected]):
            if math.isclose(float(got), value, rel_tol=1e-5, abs_tol=1e-7):
                return "\n".join(lines + [f"likely cause: {cause}"])
        return "\n".join(lines)

    result = check_function(student_fn, reference, cases=cases, name=name, compare=compare)
    return result if result is student_fn else moe.load_balancing_loss


def capacity_cases() -> list[tuple]:
    """(indices (T, k), E, capacity factor) with skewed loads, so that some experts overflow
    and the order of service matters; capacities that are not whole numbers before rounding."""
    import torch

    g = torch.Generator().manual_seed(0)
    cases = []
    for t, k, e, cf in ((37, 2, 8, 1.25), (40, 2, 4, 1.0), (50, 1, 5, 0.7), (64, 3, 8, 1.1)):
        p = torch.linspace(2.0, 0.5, e)
        index = torch.stack([torch.multinomial(p, k, replacement=False, generator=g)
                             for _ in range(t)])                          # (T, k) distinct
        cases.append((index, e, cf))
    return cases


def _kept_in_order(flat_expert, n_experts: int, capacity: int):
    """Kept flags of assignments served in the given order (each expert takes ``capacity``)."""
    import torch

    onehot = torch.nn.functional.one_hot(flat_expert, n_experts)
    return ((onehot.cumsum(0) * onehot).sum(-1) - 1) < capacity


def _capacity_variants(indices, n_experts: int, cf: float) -> list[tuple]:
    """((capacity, kept), cause) of the plausible wrong answers on one case."""
    from effarch import moe

    t, k = indices.shape
    cap = moe.expert_capacity(t, k, n_experts, cf)
    right = moe.capacity_dispatch(indices, n_experts, cf).kept
    token_major = _kept_in_order(indices.reshape(-1), n_experts, cap).reshape(t, k)
    last = _kept_in_order(indices.flip(0).T.reshape(-1), n_experts, cap).reshape(k, t).T.flip(0)
    return [
        ((math.floor(cf * t * k / n_experts), None), "the capacity was rounded down: "
                                                     "C = ceil(capacity_factor · T · k / E)"),
        ((math.ceil(cf * t / n_experts - 1e-9), None), "k is missing from the capacity: each "
                                                      "token makes k assignments, C = "
                                                      "ceil(capacity_factor · T · k / E)"),
        ((cap, token_major), "served token by token (a token's second choice before the next "
                             "token's first): serve every token's first choice, in position "
                             "order, before any second choice"),
        ((cap, last), "the last tokens were served first: first come, first served"),
        ((cap, right & right.all(-1, keepdim=True)),
         "whole tokens dropped when one assignment was: each of the k assignments is kept or "
         "dropped on its own"),
        ((cap, _kept_in_order(indices.T.reshape(-1), n_experts, cap + 1).reshape(k, t).T),
         "one assignment too many per expert: its buffer has places 0 … C-1"),
    ]


def check_capacity(student_fn: Callable, *, name: str = "dispatch") -> Callable:
    """Check ``student_fn(indices, num_experts, capacity_factor) -> (capacity, kept)`` — kept a
    (T, k) bool tensor — against ``effarch.moe.capacity_dispatch`` (position order) on
    :func:`capacity_cases`. A ❌ names the likely cause (floor, k left out, token-major or
    reverse order, whole tokens dropped, off by one)."""
    import torch

    from effarch import moe

    cases = capacity_cases()
    by_id: dict[int, tuple] = {}

    def reference(indices, num_experts, capacity_factor):
        d = moe.capacity_dispatch(indices, num_experts, capacity_factor)
        by_id[id(d.kept)] = (indices, num_experts, capacity_factor)
        return d.capacity, d.kept

    def compare(actual, expected):
        if not (isinstance(actual, (tuple, list)) and len(actual) == 2):
            return f"expected (capacity, kept), got {_describe(actual)}"
        cap, kept = int(_as_scalar(actual[0])), torch.as_tensor(actual[1])
        if kept.shape != expected[1].shape:
            return f"kept must be (T, k) = {tuple(expected[1].shape)}, got {tuple(kept.shape)}"
        kept = kept.bool()
        if cap == expected[0] and torch.equal(kept, expected[1]):
            return None
        lines = [f"got capacity {cap}, {int(kept.sum())} of {kept.numel()} assignments kept; "
                 f"expected {expected[0]}, {int(expected[1].sum())}"]
        for (vcap, vkept), cause in _capacity_variants(*by_id[id(expected[1])]):
            if cap == vcap and (vkept is None or torch.equal(kept, vkept)):
                return "\n".join(lines + [f"likely cause: {cause}"])
        return "\n".join(lines)

    def as_pair(indices, num_experts, capacity_factor):
        d = moe.capacity_dispatch(indices, num_experts, capacity_factor)
        return d.capacity, d.kept

    result = check_function(student_fn, reference, cases=cases, name=name, compare=compare)
    return result if result is student_fn else as_pair

# =============================================================================================
# Lab 2.4.5 (architecture comparison): checks that read the harness's tables.
# Each runs the student's function, names the likely cause of a wrong answer, and returns what
# the rest of the lab should use (the student's answer, or the reference).
# =============================================================================================


def _lab245_check(name: str, run: Callable[[], Any], problems: Callable[[Any], list[str]],
                  reference: Callable[[], Any], ok_message: str) -> Any:
    """Run the student's code (``run``), collect ``problems(result)``; ✅ returns the result,
    ⏭ / ❌ return ``reference()`` (called only then: it may measure)."""
    try:  # the student's code runs in both: a function is only called inside problems()
        actual = run()
        found = problems(actual)
    except NotImplementedError as exc:
        _finish(_not_attempted(name, exc), None)
        return reference()
    except Exception as exc:  # any error in student code is a ❌, not a crash
        _finish(_raised(name, exc, "", []), None, exc)
        return reference()
    if found:
        _finish(CheckResult(name, "fail", "does not match the harness", tuple(found)), None)
        return reference()
    return _finish(CheckResult(name, "pass", ok_message), actual)


def _harness_paths() -> tuple[str, ...]:
    return ("effarch fast path", "transformers, static cache", "transformers eager, dynamic cache")


def _shapes(df) -> set[tuple[int, int]]:
    return {(int(c), int(b)) for c, b in zip(df["context"], df["batch_size"], strict=True)}


def _added_rows_problems(actual, table, name: str) -> list[str]:
    """Why ``actual`` is not ``table`` plus the harness's rows of ``name`` (empty: it is)."""
    import pandas as pd

    from effarch import compare

    if not isinstance(actual, pd.DataFrame):
        return [f"expected the table (a pandas DataFrame), got {_describe(actual)}"]
    if "model" not in actual.columns or actual[actual["model"] == name].empty:
        models = sorted(set(actual["model"])) if "model" in actual.columns else "none"
        return [f"no row of {name}: models in the table are {models}"]
    rows = actual[actual["model"] == name]
    missing = [c for c in compare.COLUMNS if c not in actual.columns
               or (rows[c].isna().all() and table[c].notna().any())]
    if missing:
        return [f"the rows lack the harness's columns {missing[:6]}"
                f"{' …' if len(missing) > 6 else ''}: measure {name} with compare.compare, "
                "do not build rows by hand"]
    kept = actual[actual["model"] != name].reset_index(drop=True)
    try:
        pd.testing.assert_frame_equal(kept[list(table.columns)], table.reset_index(drop=True),
                                      check_dtype=False)
    except AssertionError:
        return ["the rows of the models already in the table changed or were dropped: append "
                "the new rows (compare.combine), do not replace the table"]
    return (_shape_problems(actual, table, rows, name) + _record_problems(rows, table)
            + _state_problems(rows, name))


def _shape_problems(actual, table, rows, name) -> list[str]:
    from effarch import models

    if rows.duplicated(["context", "batch_size"]).any():
        return [f"{name} has rows measured twice at the same context and batch size"]
    wanted = _shapes(table) | {(s["context"], s["batch_size"]) for s in table.attrs["skipped"]}
    skipped = {(s["context"], s["batch_size"]): s["reason"] for s in
               actual.attrs.get("skipped", []) if s["model"] == name}
    lost = sorted(wanted - _shapes(rows) - set(skipped))
    extra = sorted(_shapes(rows) - wanted)
    limit = getattr(models.get_config(name), "max_position_embeddings", None)
    bad_skip = [s for s, why in skipped.items() if not why.startswith("out of memory")
                and (limit is None or s[0] + int(rows["new_tokens"].iloc[0]) <= limit)]
    out = []
    if lost:
        out.append(f"no row and no skip reason at (context, batch) {lost[:4]}: measure it with "
                   "the table's protocol (PROTOCOL) and keep the skipped list "
                   "(compare.combine joins df.attrs['skipped'])")
    if extra:
        out.append(f"rows at (context, batch) {extra[:4]} that the table's protocol does not "
                   "have: use the same PROTOCOL")
    if bad_skip:
        out.append(f"skipped {bad_skip[:4]} although {name} reaches them (limit {limit})")
    return out


def _record_problems(rows, table) -> list[str]:
    from effarch import compare, models

    out = []
    for column in ("dtype", "device", "new_tokens", "repeats", "weights"):
        theirs, ours = set(rows[column]), set(table[column])
        if theirs != ours:
            out.append(f"measured with {column} {sorted(map(str, theirs))}, the table with "
                       f"{sorted(map(str, ours))}: pass the same PROTOCOL")
    bad = [p for p in rows["path"] if not str(p).startswith(_harness_paths())]
    if bad:
        out.append(f"path {bad[0]!r} is not one the harness writes: the rows must come from "
                   "compare.compare")
    family = compare.family_of(models.get_config(rows["model"].iloc[0]))
    if set(rows["family"]) != {family}:
        out.append(f"family {sorted(set(rows['family']))}, but the config makes it {family!r}")
    return out


def _state_problems(rows, name) -> list[str]:
    from effarch import memory, models

    cfg = models.get_config(name)
    for r in rows.itertuples():
        dtype = str(r.dtype).removeprefix("torch.")
        kv = memory.kv_cache_bytes(cfg, r.context, r.batch_size, dtype)
        ssm = memory.ssm_state_bytes(cfg, r.batch_size, dtype, "float32")
        if r.state_bytes == kv + ssm:
            continue
        where = f"at {r.context} tokens × batch {r.batch_size}: state_bytes {r.state_bytes:,}"
        cause = {kv: "the KV cache only: the Mamba layers' conv and SSM states count too",
                 ssm: "the Mamba layers' states only: the attention layers' KV cache counts too"
                 }.get(r.state_bytes, f"lab 2.4.1's formulas give KV {kv:,} + conv/SSM {ssm:,}"
                                      f" = {kv + ssm:,}")
        return [f"{where} is {cause}" if r.state_bytes in (kv, ssm) else f"{where}; {cause}"]
    return []


def check_added_model(add_model: Callable, table, name: str, *, reference: Callable) -> Any:
    """Exercise of lab 2.4.5: ``add_model(table, name)`` returns ``table`` with ``name``'s rows
    from the harness appended. Checks that the rows came from ``effarch.compare.compare``: its
    columns, one row per shape of the table's protocol (or a justified skip), the same dtype,
    device and settings, a path the harness writes, and state bytes equal to lab 2.4.1's
    formulas. Returns the student's table, else ``reference(table, name)``."""
    return _lab245_check(
        "add_model", lambda: add_model(table.copy(), name),
        lambda actual: _added_rows_problems(actual, table, name),
        lambda: reference(table, name), f"{name}'s rows came from the harness")


# --- the decode crossover ---------------------------------------------------------------------


def _crossover_variants() -> dict[str, Callable]:
    """Plausible wrong answers to the crossover exercise, with the cause each reveals."""
    def sign_change(ctx, a, b, *, interpolate, log=True, any_direction=False, start=False):
        gaps = [x - y for x, y in zip(a, b, strict=True)]
        if start and gaps and gaps[0] > 0:
            return float(ctx[0])
        for i in range(1, len(gaps)):
            up = gaps[i - 1] <= 0 < gaps[i]
            if up or (any_direction and gaps[i - 1] > 0 >= gaps[i]):
                if interpolate is None:
                    return float(ctx[i])
                f = math.log2 if log else float
                x0, x1 = f(ctx[i - 1]), f(ctx[i])
                x = x0 + (x1 - x0) * (interpolate if interpolate != "linear" else
                                      -gaps[i - 1] / (gaps[i] - gaps[i - 1]))
                return 2.0 ** x if log else x
        return None

    return {
        "interpolated linearly in the context itself: interpolate in log2(context)":
            lambda c, a, b: sign_change(c, a, b, interpolate="linear", log=False),
        "returned the first measured context where a is ahead, without interpolating":
            lambda c, a, b: sign_change(c, a, b, interpolate=None),
        "returned the midpoint of the bracketing contexts instead of interpolating the gap":
            lambda c, a, b: sign_change(c, a, b, interpolate=0.5),
        "also counted a falling behind (a ahead, then behind) as a crossover":
            lambda c, a, b: sign_change(c, a, b, interpolate="linear", any_direction=True),
        "counted a ahead at the first context as a crossover there: none was observed":
            lambda c, a, b: sign_change(c, a, b, interpolate="linear", start=True),
    }


def _crossover_cases(table, challenger: str, incumbent: str) -> list[tuple]:
    cases = [((256, 512, 1024, 2048), (100, 100, 100, 100), (150, 120, 90, 60)),
             ((64, 128, 256), (10, 12, 30), (20, 20, 20)),
             ((64, 128), (5, 5), (5, 4)),
             ((64, 128, 256), (10, 10, 10), (30, 20, 15)),
             ((64, 128, 256), (30, 31, 32), (20, 19, 18)),
             ((64, 128, 256), (30, 10, 40), (20, 19, 18))]
    for batch in sorted(set(table["batch_size"])):
        rows = table[table["batch_size"] == batch].pivot_table(
            index="context", columns="model", values="decode_tok_s").dropna()
        if {challenger, incumbent} <= set(rows.columns) and len(rows) >= 2:
            cases.append((tuple(int(c) for c in rows.index), tuple(rows[challenger]),
                          tuple(rows[incumbent])))
    return cases


def _same(x, y) -> bool:
    if x is None or y is None or isinstance(x, str) or isinstance(y, str):
        return x == y
    try:
        return math.isclose(float(x), float(y), rel_tol=1e-6)
    except (TypeError, ValueError):
        return False


def _outputs_problems(student: Callable, reference: Callable, cases: list[tuple],
                      variants: dict[str, Callable], describe: Callable) -> list[str]:
    """Compare the student's outputs with the reference's; on a mismatch, name the first wrong
    rule that reproduces every output of the student."""
    got = [student(*c) for c in cases]
    want = [reference(*c) for c in cases]
    bad = [i for i, (g, w) in enumerate(zip(got, want, strict=True)) if not _same(g, w)]
    if not bad:
        return []
    i = bad[0]
    lines = [f"case {i + 1} of {len(cases)}: {describe(cases[i])}: got {got[i]!r}, "
             f"expected {want[i]!r}"]
    for cause, rule in variants.items():
        if all(_same(rule(*c), g) for c, g in zip(cases, got, strict=True)):
            return [*lines, f"likely cause: you {cause}"]
    return lines


def check_crossover(crossover_context: Callable, table, challenger: str,
                    incumbent: str) -> Callable:
    """Exercise of lab 2.4.5: ``crossover_context(contexts, rate_a, rate_b)`` against
    ``effarch.compare.crossover_context`` on synthetic cases and on the table's measurements of
    ``challenger`` against ``incumbent``; a wrong answer is matched against plausible mistakes.
    Returns the student's function, else the reference."""
    from effarch import compare

    cases = _crossover_cases(table, challenger, incumbent)
    return _lab245_check(
        "crossover_context", lambda: crossover_context,
        lambda fn: _outputs_problems(fn, compare.crossover_context, cases,
                                     _crossover_variants(),
                                     lambda c: f"contexts {c[0]}, a {c[1]}, b {c[2]}"),
        lambda: compare.crossover_context, f"passed {len(cases)} cases")


# --- one question of the guide --------------------------------------------------------------


def _guide_table(spec: dict):
    """A small harness-shaped table: ``spec`` maps a model to (family, weight bytes, active
    parameters, state(context, batch), contexts); batch sizes 1 and 8 at every context."""
    import pandas as pd

    rows = [{"model": m, "family": fam, "context": c, "batch_size": b, "weight_bytes": w,
             "total_params": w // 2, "active_params": act, "state_bytes": state(c, b)}
            for m, (fam, w, act, state, contexts) in spec.items()
            for c in contexts for b in (1, 8)]
    return pd.DataFrame(rows)


def _memory_cases(table) -> list[tuple]:
    kv = lambda per: (lambda c, b: int(per * c * b))  # noqa: E731
    return [(table,), (_guide_table({  # MoE fallacy and weights-only
                 "T": ("transformer", 100_000, 50_000, kv(50), (256, 1024)),
                 "M": ("mamba", 120_000, 60_000, lambda c, b: 2_000 * b, (256, 1024, 4096)),
                 "E": ("moe", 300_000, 20_000, kv(5), (256, 1024))}),),
            (_guide_table({  # the longest context only one model reached
                 "T": ("transformer", 100_000, 50_000, kv(0.1), (256, 1024)),
                 "M": ("mamba", 400_000, 200_000, lambda c, b: 1_000 * b, (256, 1024, 4096))}),),
            (_guide_table({  # the state only
                 "T": ("transformer", 100_000, 50_000, kv(5), (256, 1024)),
                 "M": ("mamba", 400_000, 200_000, lambda c, b: 1_000 * b, (256, 1024))}),),
            (_guide_table({  # batch 1 instead of the largest batch
                 "T": ("transformer", 100_000, 50_000, kv(60), (256, 1024)),
                 "M": ("mamba", 300_000, 150_000, lambda c, b: 5_000 * b, (256, 1024))}),)]


def _memory_variants() -> dict[str, Callable]:
    def pick(table, *, cost, shared=True, largest_batch=True):
        counts = table.groupby("context")["model"].nunique()
        ctx = counts[counts >= 2].index.max() if shared else counts.index.max()
        at = table[table["context"] == ctx]
        batch = at["batch_size"].max() if largest_batch else at["batch_size"].min()
        at = at[at["batch_size"] == batch]
        return at.loc[cost(at).idxmin(), "model"]

    total = lambda d: d["weight_bytes"] + d["state_bytes"]  # noqa: E731
    return {
        "chose by active parameters: an MoE keeps every expert in memory, so use weight_bytes "
        "(all parameters resident)":
            lambda t: pick(t, cost=lambda d: d["active_params"] * d["weight_bytes"]
                           / d["total_params"] + d["state_bytes"]),
        "compared the weights only: at long context the inference state counts too":
            lambda t: pick(t, cost=lambda d: d["weight_bytes"]),
        "compared the state only: the weights are in memory too":
            lambda t: pick(t, cost=lambda d: d["state_bytes"]),
        "used batch size 1: take the largest batch measured at that context":
            lambda t: pick(t, cost=total, largest_batch=False),
        "took the longest context any model reached: use the longest that at least two "
        "models reached, so that there is a choice":
            lambda t: pick(t, cost=total, shared=False),
    }


def check_memory_choice(memory_choice: Callable, table) -> Callable:
    """Exercise of lab 2.4.5: ``memory_choice(table)`` names the model the guide picks for a
    memory-bound long context (``effarch.compare.choose_for_memory``), on the measured table and
    on small tables built to tell apart the plausible mistakes. Returns the student's function,
    else the reference."""
    from effarch import compare

    cases = _memory_cases(table)
    return _lab245_check(
        "memory_choice", lambda: memory_choice,
        lambda fn: _outputs_problems(fn, lambda t: compare.choose_for_memory(t).answer, cases,
                                     _memory_variants(),
                                     lambda c: f"a table of {sorted(set(c[0]['model']))}"),
        lambda: (lambda t: compare.choose_for_memory(t).answer), f"passed {len(cases)} tables")
