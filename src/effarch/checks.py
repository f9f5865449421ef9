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
