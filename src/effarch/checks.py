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
import math
import numbers
import reprlib
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

from effarch import profile

__all__ = [
    "Case", "CheckFailed", "CheckNotAttempted", "CheckResult", "check_function",
    "check_value", "diff", "diff_lines", "history", "reset", "summary",
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


class Case:
    """The arguments of one call: ``Case(x, dim=-1)`` calls ``fn(x, dim=-1)``.

    A plain tuple is positional arguments, a dict keyword arguments, anything else one argument.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __repr__(self) -> str:
        return f"Case({_call_args(self.args, self.kwargs)})"


_HISTORY: list[CheckResult] = []


def history() -> list[CheckResult]:
    """The results of the checks run so far in this process, oldest first (a copy)."""
    return list(_HISTORY)


def reset() -> None:
    """Forget the recorded results."""
    _HISTORY.clear()


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
                   compare: Compare | None = None) -> Callable:
    """Call both functions on every case and compare; return ``student_fn`` if all pass, else
    ``reference_fn``.

    ``cases``: a list of cases (:class:`Case`, a tuple of positional arguments, a dict of keyword
    arguments, or a single argument), or a callable returning one so random inputs are drawn
    fresh. The reference runs first on each case. ``compare(actual, expected)`` replaces
    :func:`diff`: it returns ``None``/``True`` on a match, else ``False`` or a message, or raises
    ``AssertionError`` (so ``torch.testing.assert_close`` works as is).
    """
    name = name or getattr(student_fn, "__name__", "exercise")
    case_list = list(cases() if callable(cases) else cases)
    if not case_list:
        raise ValueError(f"check {name!r} has no cases")
    for i, case in enumerate(case_list, 1):
        args, kwargs = _unpack(case)
        where = f"case {i} of {len(case_list)}"
        call = f"call: {name}({_call_args(args, kwargs)})"
        expected = reference_fn(*args, **kwargs)
        try:
            actual = student_fn(*args, **kwargs)
        except NotImplementedError as exc:
            return _finish(_not_attempted(name, exc), reference_fn)
        except Exception as exc:  # any error in student code is a ❌, not a crash
            return _finish(_raised(name, exc, where, [call]), reference_fn, exc)
        problems = _compare(actual, expected, rtol, atol, compare)
        if problems:
            result = CheckResult(name, "fail", f"{where} gives a different output",
                                 (call, *problems))
            return _finish(result, reference_fn)
    n = len(case_list)
    return _finish(CheckResult(name, "pass", f"passed {n} case{'s' * (n != 1)}"), student_fn)


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
        tail = ("EFFARCH_STRICT=1, so the check raises" if strict
                else "the reference stands in so the lab goes on")
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
    """A short description: shape and dtype for tensors and arrays, a clipped repr otherwise."""
    shape = getattr(x, "shape", None)
    if shape is not None and hasattr(x, "dtype") and not isinstance(x, numbers.Number):
        kind = "tensor" if type(x).__module__.startswith("torch") else type(x).__name__
        dtype = str(x.dtype).removeprefix("torch.")
        return f"{kind} {tuple(shape)} {dtype}"
    return _repr.repr(x)


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


# ------------------------------------------------------------------ lab 2.4.6: LoRA on Mamba


def check_lora_model(student_fn: Callable, reference_fn: Callable, *,
                     make_model: Callable[[], Any], batch: Mapping[str, Any],
                     ranks: Sequence[int] = (4, 8), name: str | None = None) -> Callable:
    """Check ``student_fn(model, rank)``, which must return ``model`` wrapped with LoRA adapters
    of rank ``rank`` on ``in_proj`` and ``x_proj`` (lab 2.4.6). For each rank, on a fresh model
    from ``make_model()``: a PEFT model comes back (not the bare model, which would fully
    fine-tune); its trainable parameters per module are ``r·in`` (``lora_A``) and ``out·r``
    (``lora_B``) for every layer's ``in_proj`` and ``x_proj`` and nothing else; after one
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
    report = finetune.gradient_check(wrapped, batch)
    problems = []
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
