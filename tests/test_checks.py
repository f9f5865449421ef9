"""effarch.checks: ✅ / ❌ / ⏭, what each check returns, strict mode, and the diffs it prints."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from effarch import checks
from effarch.checks import Case, CheckFailed, CheckNotAttempted


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv("EFFARCH_STRICT", raising=False)
    checks.reset()
    yield
    checks.reset()


def reference(x, scale=2.0):
    return x * scale


def student_ok(x, scale=2.0):
    return scale * x


def student_wrong(x, scale=2.0):
    return x * scale + (x > 0.5) * 0.25


def student_stub(x, scale=2.0):
    raise NotImplementedError("Exercise: write this part — see the hint above.")


def student_crash(x, scale=2.0):
    return x / undefined_name  # noqa: F821


def cases():
    g = torch.Generator().manual_seed(0)
    return [Case(torch.rand(3, 4, generator=g), scale=3.0), (torch.rand(5, generator=g),)]


# ------------------------------------------------------------------------- check_function


def test_pass_returns_student_function_and_prints_one_line(capsys):
    got = checks.check_function(student_ok, reference, cases)
    assert got is student_ok
    out = capsys.readouterr().out
    assert out == "✅ student_ok: passed 2 cases\n"
    assert [r.status for r in checks.history()] == ["pass"]


def test_fail_returns_reference_and_prints_diff(capsys):
    got = checks.check_function(student_wrong, reference, cases, name="scale")
    assert got is reference
    out = capsys.readouterr().out
    assert out.startswith("❌ scale: case 1 of 2 gives a different output")
    assert "the reference stands in" in out
    assert "call: scale(tensor (3, 4) float32, scale=3.0)" in out
    assert "max abs error 0.25 at [" in out
    result = checks.history()[-1]
    assert result.status == "fail" and not result.passed


def test_not_attempted_returns_reference(capsys):
    assert checks.check_function(student_stub, reference, cases) is reference
    out = capsys.readouterr().out
    assert out.startswith("⏭ student_stub: not attempted yet")
    assert "the reference stands in so the lab goes on" in out
    assert checks.history()[-1].status == "skip"


def test_foreign_not_implemented_error_is_shown(capsys):
    def needs_op(x, scale=2.0):
        raise NotImplementedError("aten::foo is not implemented for 'mps'")

    checks.check_function(needs_op, reference, cases)
    assert "NotImplementedError: aten::foo" in capsys.readouterr().out


def test_exception_in_student_code_is_a_failure_not_a_crash(capsys):
    assert checks.check_function(student_crash, reference, cases) is reference
    out = capsys.readouterr().out
    assert "❌ student_crash: raised NameError on case 1 of 2" in out
    assert "NameError: name 'undefined_name' is not defined" in out
    assert "in student_crash, line" in out


def test_case_forms_and_fresh_cases():
    calls = []

    def make():
        calls.append(1)
        return [(1.0,), {"x": 2.0, "scale": 3.0}, Case(4.0, scale=0.5), 5.0]

    seen = []

    def spy(x, scale=2.0):
        seen.append((x, scale))
        return x * scale

    checks.check_function(spy, reference, make)
    checks.check_function(spy, reference, make)
    assert len(calls) == 2
    assert seen[:4] == [(1.0, 2.0), (2.0, 3.0), (4.0, 0.5), (5.0, 2.0)]


def test_no_cases_is_an_error():
    with pytest.raises(ValueError, match="no cases"):
        checks.check_function(student_ok, reference, [])


def test_errors_in_the_reference_propagate():
    def broken(x, scale=2.0):
        raise RuntimeError("bug in the course")

    with pytest.raises(RuntimeError, match="bug in the course"):
        checks.check_function(student_ok, broken, cases)


# ---------------------------------------------------------------------------- check_value


def test_check_value_returns_student_value_or_expected(capsys):
    assert checks.check_value("n_params", lambda: 12, 12) == 12
    assert checks.check_value("n_params", lambda: 13, 12) == 12
    assert checks.check_value("n_params", lambda: student_stub(1), 12) == 12
    assert checks.check_value("ratio", 0.5, 0.5) == 0.5  # a plain value works too
    assert [r.status for r in checks.history()] == ["pass", "fail", "skip", "pass"]
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "✅ n_params: matches the reference"
    assert out[1].startswith("❌ n_params: does not match the reference")
    assert "got 13, expected 12 (compared exactly" in out[2]


def test_check_value_keeps_the_student_object():
    value = torch.ones(3)
    assert checks.check_value("ones", lambda: value, torch.ones(3)) is value


def test_check_value_exception(capsys):
    assert checks.check_value("v", lambda: 1 / 0, 1.0) == 1.0
    assert "raised ZeroDivisionError" in capsys.readouterr().out


# ----------------------------------------------------------------------------- strict mode


def test_strict_failure_raises_with_the_diff(monkeypatch):
    monkeypatch.setenv("EFFARCH_STRICT", "1")
    with pytest.raises(CheckFailed, match="EFFARCH_STRICT=1") as info:
        checks.check_function(student_wrong, reference, cases)
    assert "max abs error" in str(info.value)
    assert isinstance(info.value, AssertionError)


def test_strict_not_attempted_raises(monkeypatch):
    monkeypatch.setenv("EFFARCH_STRICT", "1")
    with pytest.raises(CheckNotAttempted):
        checks.check_value("v", lambda: student_stub(1), 1)
    assert issubclass(CheckNotAttempted, AssertionError)


def test_strict_exception_is_chained(monkeypatch):
    monkeypatch.setenv("EFFARCH_STRICT", "1")
    with pytest.raises(CheckFailed) as info:
        checks.check_function(student_crash, reference, cases)
    assert isinstance(info.value.__cause__, NameError)


def test_strict_pass_returns_student(monkeypatch):
    monkeypatch.setenv("EFFARCH_STRICT", "1")
    assert checks.check_function(student_ok, reference, cases) is student_ok


# ------------------------------------------------------------------------------- summary


def test_summary_counts_and_history_is_a_copy(capsys):
    checks.check_value("a", 1, 1)
    checks.check_value("b", 2, 1)
    checks.check_value("c", lambda: student_stub(0), 1)
    checks.history().clear()
    capsys.readouterr()
    assert checks.summary() == {"pass": 1, "fail": 1, "skip": 1}
    out = capsys.readouterr().out
    assert out.startswith("Checks: 1 ✅ passed, 1 ❌ failed, 1 ⏭ not attempted")
    assert "❌ b" in out and "⏭ c" in out
    assert checks.summary(show=False) == {"pass": 1, "fail": 1, "skip": 1}
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------------------------- diffs


def test_tensor_diff_names_the_worst_element():
    expected = torch.zeros(3, 4)
    actual = expected.clone()
    actual[1, 2] = 0.5
    actual[2, 0] = 0.1
    text = checks.diff(actual, expected)
    assert "2 of 12 elements differ (rtol=0.0001, atol=1e-05)" in text
    assert "max abs error 0.5 at [1, 2]: got 0.5, expected 0" in text
    assert checks.diff(expected + 1e-7, expected) == ""


def test_max_rel_error_location():
    expected = torch.tensor([1.0, 100.0])
    text = checks.diff(torch.tensor([1.5, 101.0]), expected)
    assert "max abs error 1 at [1]" in text and "max rel error 0.5 at [0]" in text


def test_nan_never_matches():
    nan = torch.tensor([1.0, float("nan")])
    assert "got NaN at 1 position(s), first at [1]" in checks.diff(nan, torch.ones(2))
    assert "the reference has NaN" in checks.diff(nan, nan.clone())
    assert checks.diff(float("nan"), float("nan")) != ""
    inf = torch.tensor([float("inf")])
    assert checks.diff(inf, inf.clone()) == ""
    assert "infinite error" in checks.diff(inf, torch.ones(1))


def test_bf16_upcast_and_tolerance():
    x = torch.linspace(-3, 3, 64)
    expected = (x * 1.5).to(torch.bfloat16)
    actual = (x.to(torch.bfloat16) * 1.5)  # rounded differently, within bf16 tolerance
    assert checks.diff(actual, expected) == ""
    wrong = expected.clone()
    wrong[10] += 1
    assert "rtol=0.03, atol=0.05" in checks.diff(wrong, expected)
    assert "dtype mismatch: got float32, expected bfloat16" in checks.diff(x * 1.5, expected)


def test_shape_and_type_mismatch():
    assert "shape mismatch: got (4, 3), expected (3, 4) (the same sizes in another order" in \
        checks.diff(torch.zeros(4, 3), torch.zeros(3, 4))
    assert "expected a torch.Tensor tensor (2,) float32, got [0.0, 0.0]" in \
        checks.diff([0.0, 0.0], torch.zeros(2))


def test_integer_tensors_compare_exactly():
    text = checks.diff(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4]))
    assert "1 of 3 elements differ (compared exactly); first at [2]: got 3, expected 4" in text
    assert checks.diff(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4]), atol=1) == ""


def test_numbers():
    assert checks.diff(3, 3) == "" and "compared exactly" in checks.diff(3, 4)
    assert checks.diff(3, 4, atol=1) == ""
    assert checks.diff(1.0 + 1e-9, 1.0) == ""
    assert "abs error 0.1" in checks.diff(1.1, 1.0)
    assert checks.diff(torch.tensor(2.0), 2.0) == ""  # a 0-d tensor stands for its number
    assert "expected a number" in checks.diff("2", 2.0)


def test_mapping_diff():
    text = checks.diff({"a": 1, "b": [1, 2], "extra": 0}, {"a": 1, "b": [1, 3], "c": 5})
    assert "missing key(s): 'c'" in text
    assert "unexpected key(s): 'extra'" in text
    assert "output['b'][1]: got 2, expected 3" in text


def test_sequence_diff():
    assert "got 2 item(s), expected 3" in checks.diff([1, 2], [1, 2, 3])
    assert checks.diff((1, 2.0), [1, 2.0]) == ""  # a tuple for a list is fine
    text = checks.diff(list(range(10)), [i + 1 for i in range(10)])
    assert text.count("got") == 3 and "… and 7 more item(s) differ" in text
    nested = checks.diff((torch.ones(2), 1), (torch.zeros(2), 1))
    assert nested.startswith("output[0]: 2 of 2 elements differ")


def test_dataclass_diff():
    @dataclasses.dataclass
    class Estimate:
        weights_gb: float
        shape: tuple

    assert checks.diff(Estimate(1.0, (2, 3)), Estimate(1.0, (2, 3))) == ""
    text = checks.diff(Estimate(1.5, (2, 3)), Estimate(1.0, (2, 4)))
    assert "output.weights_gb: got 1.5, expected 1" in text
    assert "output.shape[1]: got 3, expected 4" in text


def test_numpy_and_pandas():
    assert checks.diff(np.arange(3.0), np.arange(3.0)) == ""
    assert "max abs error 1 at [2]" in checks.diff(np.array([0.0, 1.0, 3.0]), np.arange(3.0))
    assert "dtype mismatch: got int32, expected int64" in \
        checks.diff(np.arange(3, dtype=np.int32), np.arange(3, dtype=np.int64))
    frame = pd.DataFrame({"model": ["mamba", "gpt"], "ppl": [10.0, 12.0]})
    assert checks.diff(frame.copy(), frame) == ""
    other = frame.assign(ppl=[10.0, 13.0])
    assert 'column name="ppl"' in checks.diff(other, frame)


def test_strings_and_others():
    assert "first difference at character 2" in checks.diff("abc", "abd")
    assert checks.diff(None, None) == "" and "expected None" in checks.diff(0, None)
    assert checks.diff(True, True) == ""


def test_custom_compare(capsys):
    def close_enough(a, b):
        return abs(a - b) < 0.5 or f"off by {a - b}"

    assert checks.check_value("c1", 1.2, 1.0, compare=close_enough) == 1.2
    assert checks.check_value("c2", 2.0, 1.0, compare=close_enough) == 1.0
    assert "off by 1.0" in capsys.readouterr().out
    checks.check_value("c3", torch.ones(2), torch.zeros(2), compare=torch.testing.assert_close)
    assert "Tensor-likes are not close" in capsys.readouterr().out
    assert [r.status for r in checks.history()] == ["pass", "fail", "fail"]


def test_long_diffs_are_clipped():
    many = {f"k{i}": torch.ones(3) for i in range(30)}
    result = checks.check_value("many", {k: v * 2 for k, v in many.items()}, many)
    assert result is many
    assert len(checks.history()[-1].details) <= checks._MAX_DETAIL_LINES + 1
    # a message longer than the limit is cut, and says how much was left out
    twenty = "\n".join(f"line {i}" for i in range(20))
    checks.check_value("long", 1, 2, compare=lambda a, e: twenty)
    details = checks.history()[-1].details
    assert len(details) == checks._MAX_DETAIL_LINES + 1
    assert details[-1] == f"… {20 - checks._MAX_DETAIL_LINES} more"


# ------------------------------------------------- known expectations, hints, causes, structure


def test_case_expecting_replaces_the_reference_and_names_its_source(capsys):
    def broken_reference(x, scale=2.0):
        raise AssertionError("not called for a case with a known value")

    case = Case(torch.ones(2), scale=3.0).expecting(torch.full((2,), 3.0), source="a measurement")
    assert checks.check_function(student_ok, broken_reference, [case]) is student_ok
    checks.check_function(student_wrong, broken_reference, [case], name="scale")
    out = capsys.readouterr().out
    assert "expected: a measurement" in out


def test_case_hint_is_printed_when_that_case_fails(capsys):
    cases_ = [Case(torch.zeros(2)), Case(torch.ones(2)).hinting("values above one half")]
    checks.check_function(student_wrong, reference, cases_, name="scale")
    out = capsys.readouterr().out
    assert "case 2 of 2" in out and "about this case: values above one half" in out


def test_mistakes_name_the_likely_cause_and_only_a_consistent_one():
    def halved(x, scale=2.0):
        return x * scale / 2

    def plus_quarter(x, scale=2.0):
        return x * scale + (x > 0.5) * 0.25

    mistakes = [checks.Mistake("the factor is halved", wrong=halved),
                checks.Mistake("a quarter added above one half", wrong=plus_quarter),
                checks.Mistake("a crash", error=r"ZeroDivision")]
    checks.check_function(student_wrong, reference, cases, mistakes=mistakes)
    details = checks.history()[-1].details
    assert "likely cause: a quarter added above one half" in details
    assert not any("halved" in d for d in details)

    # two mistakes fit the failing case; the one that also fits the other case is named
    def ones_case():
        return [Case(torch.ones(3), scale=2.0), Case(torch.full((3,), 2.0), scale=4.0)]

    both = [checks.Mistake("minus one", wrong=lambda x, scale: x * scale - 1),
            checks.Mistake("halved", wrong=lambda x, scale: x * scale / 2)]
    checks.check_function(lambda x, scale: x * scale / 2, reference, ones_case, mistakes=both)
    details = checks.history()[-1].details
    assert "likely cause: halved" in details and "likely cause: minus one" not in details


def test_mistake_by_error_message(capsys):
    def divides(x, scale=2.0):
        return x / 0 if isinstance(x, int) else 1 // 0

    checks.check_function(divides, reference, cases,
                          mistakes=[checks.Mistake("a division by zero", error="ZeroDivision")])
    assert "likely cause: a division by zero" in capsys.readouterr().out


def test_mistakes_match_loosely_where_the_arithmetic_blows_up():
    wrong = torch.tensor([1.0, float("inf"), 3e38, float("nan")])
    assert checks._loosely_equal(wrong * (1 + 1e-3), wrong)
    assert not checks._loosely_equal(torch.tensor([1.0, 2.0, 3e38, 0.0]), wrong)


def test_structure_problems_fail_a_check_with_right_values(capsys):
    got = checks.check_function(student_ok, reference, cases,
                                structure=lambda fn: ["computed the wrong way"])
    assert got is reference
    out = capsys.readouterr().out
    assert "right values on 2 cases, but not computed the way the exercise asks" in out
    assert "computed the wrong way" in out


def test_count_tensor_ops_and_grows_like_log():
    def loop(x):
        for _ in range(x.shape[-1]):
            x = x + 1
        return x

    def rounds(x):
        k = 1
        while k < x.shape[-1]:
            x = x * 2
            k *= 2
        return x

    assert checks.count_tensor_ops(loop, torch.zeros(10)) == 10
    make = lambda n: Case(torch.zeros(n))  # noqa: E731
    assert checks.grows_like_log(make)(rounds) == []
    problems = checks.grows_like_log(make)(loop)
    assert problems and "32" in problems[0] and "1,024" in problems[0]


def test_result_returns_the_latest_run_of_a_check():
    assert checks.result("scale") is None
    checks.check_function(student_wrong, reference, cases, name="scale")
    checks.check_function(student_ok, reference, cases, name="scale")
    assert checks.result("scale").passed


def test_tolerance_by_dtype_per_item():
    compare = checks.tolerance_by_dtype(float32=(1e-4, 1e-4))
    out, state = torch.ones(3, dtype=torch.bfloat16), torch.ones(3)
    assert compare((out * 1.01, state + 5e-5), (out, state)) is None  # bf16 default tolerance
    assert "output[1]" in compare((out, state + 1e-2), (out, state))


def test_calls_show_short_names_for_long_reprs(capsys):
    class Config:
        def __repr__(self):
            return "Config {\n  many: lines\n}"

    checks.check_function(lambda cfg, f: 1, lambda cfg, f: 2, [Case(Config(), len)], name="n")
    assert "call: n(Config, len)" in capsys.readouterr().out
