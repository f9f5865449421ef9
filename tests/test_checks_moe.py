"""Lab 2.4.3's checks pass right answers and fail the plausible wrong ones, naming the cause."""

import numpy as np
import pytest

from effarch import checks, models, moe


@pytest.fixture(autouse=True)
def lenient(monkeypatch):
    monkeypatch.setenv("EFFARCH_STRICT", "0")
    checks.reset()
    yield
    checks.reset()


def _last():
    return checks.history()[-1]


# --- exercise B: total and active parameters from the module tree ---------------------------


def _experts_modules(model):
    """(module, E) of each fused experts module: direct 3-D parameters with E rows."""
    for m in model.modules():
        own = [p for p in m.parameters(recurse=False) if p.dim() == 3]
        if len(own) >= 2:
            yield m, own[0].shape[0], sum(p.numel() for p in own)


def right(model):
    total = sum(p.numel() for p in model.parameters())
    k = model.config.num_experts_per_tok
    idle = sum(n * (e - k) // e for _, e, n in _experts_modules(model))
    return total, total - idle


def tied_twice(model):  # state_dict lists a tied head under both names
    total = sum(v.numel() for v in model.state_dict().values())
    return total, total - (right(model)[0] - right(model)[1])


def one_expert(model):
    total = sum(p.numel() for p in model.parameters())
    return total, total - sum(n * (e - 1) // e for _, e, n in _experts_modules(model))


def all_experts(model):
    total = sum(p.numel() for p in model.parameters())
    return total, total


def no_shared(model):
    total, active = right(model)
    shared = sum(p.numel() for n, p in model.named_parameters() if "shared_expert" in n)
    return total, active - shared


def no_router(model):
    total, active = right(model)
    routers = sum(r.weight.numel() for _, (_, r, _) in
                  __import__("effarch.hooks").hooks.find_moe_blocks(model).items())
    return total, active - routers


@pytest.fixture(scope="module")
def tiny_moe():
    return models.load_model("tiny-moe", device="cpu").model


def test_param_count_passes_a_right_answer(tiny_moe):
    assert checks.check_param_count(right, [tiny_moe]) is right
    assert _last().status == "pass" and "5 cases" in _last().message


@pytest.mark.parametrize("wrong, cause", [
    (tied_twice, "tied to the embedding"),
    (one_expert, "one routed expert per token"),
    (all_experts, "every routed expert counted as active"),
    (no_shared, "shared experts are missing"),
    (no_router, "routers are missing"),
])
def test_param_count_names_the_likely_cause(tiny_moe, wrong, cause):
    fn = checks.check_param_count(wrong, [tiny_moe])
    assert fn is not wrong and _last().status == "fail"
    assert any(cause in line for line in _last().details), _last().details
    model = checks.family_models()[0]
    pc = moe.count_params(model)
    assert fn(model) == (pc.total, pc.active)  # the reference stands in, same shape of answer


def test_param_count_check_tries_the_families_that_trip_mistakes():
    fams = [m.config.model_type for m in checks.family_models()]
    assert fams == ["qwen2_moe", "deepseek_v2", "olmoe", "jamba"]
    pcs = [moe.count_params(m) for m in checks.family_models()]
    assert pcs[0].shared_experts and pcs[1].dense_mlp and pcs[2].lm_head == 0


# --- exercise D: consecutive tokens against chance --------------------------------------------


def rate_right(top1, doc, n_experts):
    top1, doc = np.asarray(top1), np.asarray(doc)
    inside = doc[1:] == doc[:-1]
    load = np.bincount(top1, minlength=n_experts) / len(top1)
    return float((top1[1:] == top1[:-1])[inside].mean()), float((load ** 2).sum())


def chance_uniform(top1, doc, n_experts):
    return rate_right(top1, doc, n_experts)[0], 1 / n_experts


def across_documents(top1, doc, n_experts):
    top1 = np.asarray(top1)
    return float((top1[1:] == top1[:-1]).mean()), rate_right(top1, doc, n_experts)[1]


def over_tokens(top1, doc, n_experts):
    top1, doc = np.asarray(top1), np.asarray(doc)
    same = (top1[1:] == top1[:-1])[doc[1:] == doc[:-1]]
    return float(same.sum() / len(top1)), rate_right(top1, doc, n_experts)[1]


def mean_not_sum(top1, doc, n_experts):
    load = np.bincount(top1, minlength=n_experts) / len(top1)
    return rate_right(top1, doc, n_experts)[0], float((load ** 2).mean())


def test_same_expert_rate_passes_a_right_answer():
    assert checks.check_same_expert_rate(rate_right) is rate_right
    assert _last().status == "pass"


@pytest.mark.parametrize("wrong, cause", [
    (chance_uniform, "1/E"), (across_documents, "across a document boundary"),
    (over_tokens, "divided by the tokens"), (mean_not_sum, "mean of loadᵢ²"),
])
def test_same_expert_rate_names_the_likely_cause(wrong, cause):
    fn = checks.check_same_expert_rate(wrong)
    assert fn is not wrong and _last().status == "fail"
    assert any(cause in line for line in _last().details), _last().details


def test_same_expert_cases_separate_the_mistakes():
    for top1, doc, e in checks.same_expert_cases():
        rate, chance = rate_right(top1, doc, e)
        assert abs(chance - 1 / e) > 0.01
        if doc.max() > 0:
            assert across_documents(top1, doc, e)[0] != rate


def test_strict_mode_raises(monkeypatch):
    monkeypatch.setenv("EFFARCH_STRICT", "1")
    with pytest.raises(checks.CheckFailed, match="1/E"):
        checks.check_same_expert_rate(chance_uniform)
