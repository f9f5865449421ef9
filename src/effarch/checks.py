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
from collections.abc import Callable, Iterable, Mapping
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
