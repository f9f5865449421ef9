"""The router half of effarch.moe (lab 2.4.4): top-k routing against real blocks, the Switch
loss against transformers, capacity dispatch, interventions on a real model's routing, and the
lab's checks against plausible wrong answers. Runs on transformers 5.17 and 5.24."""

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func as mixtral_lbl
from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func as qwen_lbl

from effarch import checks, hooks, models, moe

SOFTMAX_TOPK = [("mixtral", {}), ("jamba", {}), ("olmoe", {}), ("olmoe", {"norm_topk_prob": True}),
                ("qwen2_moe", {}), ("qwen3_moe", {})]


def _build(family, **overrides):
    torch.manual_seed(0)
    cfg = moe.small_config(family, **overrides)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def _ids(batch=2, length=9, vocab=128, seed=1):
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny_moe():
    return models.load_model("tiny-moe", device="cpu").model


@pytest.fixture(scope="module")
def tiny_hybrid():
    return models.load_model("tiny-hybrid", device="cpu").model


# --- topk_route against what real blocks chose ------------------------------------------------


@pytest.mark.parametrize("family, overrides", SOFTMAX_TOPK)
def test_topk_route_is_what_the_block_chose(family, overrides):
    model = _build(family, **overrides)
    cases = moe.router_cases(model, _ids(), name=family)
    assert cases and all(c.norm_topk_prob == moe.renormalises(model.config) for c in cases)
    for c in cases:
        w, i = moe.topk_route(c.logits, c.k, norm_topk_prob=c.norm_topk_prob)
        assert torch.equal(i, c.index) and w.shape == c.weights.shape
        torch.testing.assert_close(w, c.weights)


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-hybrid"])
def test_topk_route_on_the_zoo(name, request):
    model = request.getfixturevalue(name.replace("-", "_"))
    cases = moe.router_cases(model, _ids(vocab=4000), name=name)
    assert {c.norm_topk_prob for c in cases} == {name == "tiny-moe"}
    for c in cases:
        w, i = moe.topk_route(c.logits, c.k, norm_topk_prob=c.norm_topk_prob)
        assert torch.equal(i, c.index)
        torch.testing.assert_close(w, c.weights)


def test_softmax_after_topk_equals_renormalising_and_nothing_else():
    logits = torch.randn(20, 8, generator=torch.Generator().manual_seed(0))
    top = torch.topk(logits, 2, dim=-1)
    after = torch.softmax(top.values, -1)
    torch.testing.assert_close(after, moe.topk_route(logits, 2, norm_topk_prob=True)[0])
    assert not torch.allclose(after, moe.topk_route(logits, 2, norm_topk_prob=False)[0])


def test_renormalises_refuses_other_weightings():
    assert moe.renormalises(moe.small_config("mixtral"))
    assert not moe.renormalises(moe.small_config("jamba"))
    for family in ("granitemoe", "deepseek_v2", "phimoe"):
        with pytest.raises(ValueError, match="Router exercises"):
            moe.renormalises(moe.small_config(family))


# --- the Switch loss against transformers --------------------------------------------------


def _layers(n, t=48, e=8, seed=0, skew=1.0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(t, e, generator=g) + skew * i * torch.linspace(1, -1, e)
                 for i in range(n))


@pytest.mark.parametrize("lbl", [mixtral_lbl, qwen_lbl], ids=["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("n_layers, e, k", [(1, 8, 1), (2, 8, 2), (3, 16, 3), (4, 4, 2)])
def test_loss_equals_transformers(lbl, n_layers, e, k):
    layers = _layers(n_layers, e=e)
    torch.testing.assert_close(moe.load_balancing_loss(layers, e, k), lbl(layers, e, k))
    mask = (torch.rand(6, 8, generator=torch.Generator().manual_seed(3)) > 0.3).long()
    torch.testing.assert_close(moe.load_balancing_loss(layers, e, k, mask), lbl(layers, e, k, mask))


def test_loss_on_half_precision_and_one_tensor():
    layers = tuple(g.bfloat16() for g in _layers(2))
    torch.testing.assert_close(moe.load_balancing_loss(layers, 8, 2), mixtral_lbl(layers, 8, 2))
    one = _layers(1)[0]
    torch.testing.assert_close(moe.load_balancing_loss(one, 8, 2), mixtral_lbl((one,), 8, 2))


@pytest.mark.parametrize("k", [1, 2, 4])
def test_uniform_routing_gives_k_and_one_expert_gives_n(k):
    uniform = torch.zeros(64, 8) + torch.arange(8) * 1e-7  # ties broken, probabilities ~1/8
    assert moe.load_balancing_loss(uniform, 8, k).item() == pytest.approx(k, rel=1e-5)
    one = torch.zeros(64, 8)
    one[:, 3] = 50.0
    assert moe.load_balancing_loss(one, 8, 1).item() == pytest.approx(8, rel=1e-5)


def test_per_layer_is_the_mean_of_layer_losses_and_differs_from_pooled():
    layers = _layers(3, skew=2.0)
    per = moe.load_balancing_loss(layers, 8, 2, per_layer=True)
    torch.testing.assert_close(per, torch.stack([mixtral_lbl((g,), 8, 2) for g in layers]).mean())
    assert abs(per.item() - moe.load_balancing_loss(layers, 8, 2).item()) > 1e-3


def test_loss_is_the_models_own_aux_loss_and_has_a_gradient(tiny_moe):
    ids = _ids(vocab=4000)
    out = tiny_moe(input_ids=ids, output_router_logits=True)
    torch.testing.assert_close(moe.load_balancing_loss(out.router_logits, 8, 2), out.aux_loss)
    logits = torch.randn(16, 8, requires_grad=True)
    moe.load_balancing_loss(logits, 8, 2).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


# --- capacity -------------------------------------------------------------------------------


def test_capacity_is_ceil_of_factor_tokens_k_over_e():
    assert moe.expert_capacity(37, 2, 8, 1.25) == 12 and moe.expert_capacity(40, 2, 4, 1.0) == 20
    assert moe.expert_capacity(64, 3, 8, 1.0) == 24  # exactly the even share, no float slop
    with pytest.raises(ValueError):
        moe.expert_capacity(10, 1, 2, 0.0)


def test_dispatch_keeps_min_of_load_and_capacity_first_choices_first():
    index = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0], [0, 3]])  # expert 0 wanted 5 times
    d = moe.capacity_dispatch(index, 4, 1.0)                         # C = ceil(10 / 4) = 3
    assert d.capacity == 3 and d.load.tolist() == [5, 3, 1, 1]
    kept_per_expert = torch.bincount(index[d.kept], minlength=4)
    assert kept_per_expert.tolist() == [3, 3, 1, 1]
    # first choices of tokens 0, 1, 2 fill expert 0; token 3's second choice (0) and token 4's
    # first choice (0) are dropped: a second choice never displaces a first
    assert d.kept.tolist() == [[True, True], [True, True], [True, True], [True, False],
                               [False, True]]
    assert d.slot[0, 0] == 0 and d.slot[3, 1] == -1 and d.dropped_tokens.numel() == 0
    assert d.drop_rate == pytest.approx(0.2)


def test_priority_serves_the_surest_tokens_first():
    index = torch.tensor([[0], [0], [0], [1]])
    d = moe.capacity_dispatch(index, 2, 1.0, priority=torch.tensor([0.1, 0.9, 0.5, 0.7]))
    assert d.capacity == 2 and d.kept[:, 0].tolist() == [False, True, True, True]
    assert d.dropped_tokens.tolist() == [0] and d.token_drop_rate == 0.25
    assert moe.capacity_dispatch(index, 2, 1.0).kept[:, 0].tolist() == [True, True, False, True]


def test_enough_capacity_drops_nothing():
    index = torch.randint(0, 8, (100, 2), generator=torch.Generator().manual_seed(0))
    assert moe.capacity_dispatch(index, 8, 8.0).drop_rate == 0.0


# --- interventions on a real model ----------------------------------------------------------


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "jamba", "qwen2_moe"])
def test_routed_top_k_changes_k_and_restores_it(family):
    model = _build(family)
    k0 = model.config.num_experts_per_tok
    ids = _ids()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with moe.routed_top_k(model, 1):
            with hooks.capture_routing(model) as trace:
                changed = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert all(r.topk_index.shape[1] == 1 for r in trace)
    assert not torch.allclose(before, changed) and torch.equal(before, after)
    assert model.config.num_experts_per_tok == k0
    with pytest.raises(ValueError, match="between 1 and E"):
        with moe.routed_top_k(model, 99):
            pass


def test_limit_capacity_drops_and_is_removed(tiny_moe):
    ids = _ids(vocab=4000, length=32)
    with torch.no_grad():
        base = tiny_moe(input_ids=ids).logits
        with moe.limit_capacity(tiny_moe, 16.0) as wide:
            same = tiny_moe(input_ids=ids).logits
        with moe.limit_capacity(tiny_moe, 0.5, priority=True) as tight:
            cut = tiny_moe(input_ids=ids).logits
        again = tiny_moe(input_ids=ids).logits
    torch.testing.assert_close(base, same)
    assert all(d.drop_rate == 0 for d in wide) and len(tight) == 3
    assert all(d.drop_rate >= 0.5 for d in tight) and not torch.allclose(base, cut)
    assert torch.equal(base, again)


def test_moe_block_is_a_sparse_mixture_and_capture_finds_it():
    torch.manual_seed(0)
    block = moe.MoEBlock(16, 24, 4, 2)
    x = torch.randn(3, 5, 16)
    y, logits, index = block(x)
    w, i = moe.topk_route(logits, 2, norm_topk_prob=True)
    dense = torch.zeros(15, 16)
    flat = x.reshape(-1, 16)
    for e in range(4):
        g, u = (flat @ block.experts.gate_up_proj[e].T).chunk(2, -1)
        out = (torch.nn.functional.silu(g) * u) @ block.experts.down_proj[e].T
        dense += out * (w * (i == e)).sum(-1, keepdim=True)
    torch.testing.assert_close(y.reshape(-1, 16), dense)
    model = torch.nn.Sequential(block)
    with hooks.capture_routing(model) as trace:
        block(x)
    assert torch.equal(trace[0].topk_index, index)


# --- the lab's checks ----------------------------------------------------------------------


@pytest.fixture
def lenient(monkeypatch):
    monkeypatch.setenv("EFFARCH_STRICT", "0")
    checks.reset()
    yield
    checks.reset()


@pytest.fixture(scope="module")
def router_cases(tiny_moe, tiny_hybrid):
    ids = _ids(vocab=4000, length=24)
    return (moe.router_cases(tiny_moe, ids, name="tiny-moe")
            + moe.router_cases(tiny_hybrid, ids, name="tiny-hybrid"))


def _last():
    return checks.history()[-1]


def _route_right(logits, k, *, norm_topk_prob):
    return moe.topk_route(logits, k, norm_topk_prob=norm_topk_prob)


@pytest.mark.parametrize("wrong, cause", [
    (lambda lg, k, *, norm_topk_prob: moe.topk_route(lg, k, norm_topk_prob=True),
     "does not renormalise"),
    (lambda lg, k, *, norm_topk_prob: (torch.softmax(lg.topk(k).values, -1), lg.topk(k).indices),
     "softmax over the k selected logits"),
    (lambda lg, k, *, norm_topk_prob: moe.topk_route(lg, k, norm_topk_prob=False),
     "were not renormalised"),
    (lambda lg, k, *, norm_topk_prob: tuple(lg.topk(k)), "raw logits"),
    (lambda lg, k, *, norm_topk_prob: tuple(torch.softmax(lg, 0).topk(k)), "over the tokens"),
    (lambda lg, k, *, norm_topk_prob: tuple(torch.softmax(lg, -1).topk(k, largest=False)),
     "least likely"),
    (lambda lg, k, *, norm_topk_prob: tuple(t.flip(-1) for t in
                                            _route_right(lg, k, norm_topk_prob=norm_topk_prob)),
     "another order"),
])
def test_topk_check_names_the_mistake(lenient, router_cases, wrong, cause):
    assert checks.check_topk_route(wrong, router_cases) is moe.topk_route
    assert _last().status == "fail" and cause in _last().text, _last().text


def test_topk_check_passes_and_skips(lenient, router_cases):
    assert checks.check_topk_route(_route_right, router_cases) is _route_right
    assert _last().status == "pass"

    def stub(logits, k, *, norm_topk_prob):
        raise NotImplementedError("Exercise: write it")

    assert checks.check_topk_route(stub, router_cases) is moe.topk_route
    assert _last().status == "skip"
    with pytest.raises(ValueError, match="renormalises and one that does not"):
        checks.check_topk_route(_route_right, [c for c in router_cases if c.norm_topk_prob])


def _switch(router_logits, num_experts, top_k, attention_mask=None, *, first=False, n=True,
            pooled=True, soft=False, per_k=False, mask=True, alpha=1.0):
    """The Switch loss with one mistake switched on."""
    if not pooled:
        return torch.stack([_switch((g,), num_experts, top_k, attention_mask, n=n)
                            for g in router_logits]).mean()
    probs = torch.softmax(torch.cat(router_logits).float(), -1)
    chosen = torch.topk(probs, 1 if first else top_k, -1).indices
    keep = (torch.ones(len(probs)) if attention_mask is None or not mask
            else attention_mask.reshape(-1).float().repeat(len(router_logits)))
    f = torch.zeros(num_experts).index_add_(0, chosen.reshape(-1),
                                            keep.repeat_interleave(chosen.shape[1])) / keep.sum()
    p = (probs * keep[:, None]).sum(0) / keep.sum()
    f = p if soft else f / (top_k if per_k else 1)
    return alpha * (num_experts if n else 1) * (f * p).sum()


@pytest.mark.parametrize("kwargs, cause", [
    (dict(n=False), "factor N"), (dict(first=True), "only the first choice"),
    (dict(pooled=False), "mean of each layer's loss"), (dict(per_k=True), "f divided by k"),
    (dict(soft=True), "mean probability"), (dict(mask=False), "padding counted"),
    (dict(alpha=0.01), "coefficient α = 0.01"),
])
def test_switch_check_names_the_mistake(lenient, kwargs, cause):
    def wrong(router_logits, num_experts, top_k, attention_mask=None):
        return _switch(router_logits, num_experts, top_k, attention_mask, **kwargs)

    assert checks.check_switch_loss(wrong) is moe.load_balancing_loss
    assert _last().status == "fail" and cause in _last().text, _last().text


def test_switch_check_passes_a_right_answer_and_real_logits(lenient, tiny_moe):
    out = tiny_moe(input_ids=_ids(vocab=4000), output_router_logits=True)
    extra = [checks.Case(tuple(g.detach() for g in out.router_logits), 8, 2)]
    assert checks.check_switch_loss(_switch, extra) is _switch
    assert _last().status == "pass" and "5 cases" in _last().message


def _dispatch_right(indices, num_experts, capacity_factor):
    d = moe.capacity_dispatch(indices, num_experts, capacity_factor)
    return d.capacity, d.kept


def _dispatch(indices, num_experts, capacity_factor, *, cap=None, order="choice", slack=0,
              whole=False):
    t, k = indices.shape
    cap = cap(capacity_factor, t, k, num_experts) if cap else math.ceil(
        capacity_factor * t * k / num_experts)
    if order == "choice":
        flat = indices.T.reshape(-1)
    elif order == "token":
        flat = indices.reshape(-1)
    else:
        flat = indices.flip(0).T.reshape(-1)
    seen, kept = [0] * num_experts, []
    for e in flat.tolist():
        kept.append(seen[e] < cap + slack)
        seen[e] += 1
    kept = torch.tensor(kept)
    kept = kept.reshape(t, k) if order == "token" else kept.reshape(k, t).T
    if order == "reverse":
        kept = kept.flip(0)
    return cap, kept & kept.all(-1, keepdim=True) if whole else kept


@pytest.mark.parametrize("kwargs, cause", [
    (dict(cap=lambda cf, t, k, e: math.floor(cf * t * k / e)), "rounded down"),
    (dict(cap=lambda cf, t, k, e: math.ceil(cf * t / e)), "k is missing"),
    (dict(order="token"), "token by token"), (dict(order="reverse"), "last tokens"),
    (dict(whole=True), "whole tokens"), (dict(slack=1), "one assignment too many"),
])
def test_capacity_check_names_the_mistake(lenient, kwargs, cause):
    def wrong(indices, num_experts, capacity_factor):
        return _dispatch(indices, num_experts, capacity_factor, **kwargs)

    checks.check_capacity(wrong)
    assert _last().status == "fail" and cause in _last().text, _last().text


def test_capacity_check_passes_a_right_answer(lenient):
    assert checks.check_capacity(_dispatch) is _dispatch
    assert _last().status == "pass"
    fn = checks.check_capacity(lambda *a: (_ for _ in ()).throw(NotImplementedError("Exercise")))
    assert _last().status == "skip" and fn(*checks.capacity_cases()[0])[0] == 12


@pytest.mark.parametrize("seed", range(4))
def test_dispatch_equals_a_plain_loop(seed):
    g = torch.Generator().manual_seed(seed)
    t, k, e = 60, 1 + seed % 3, 6
    index = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    prio = torch.rand(t, generator=g)
    for priority in (None, prio):
        order = range(t) if priority is None else sorted(range(t), key=lambda i: -float(prio[i]))
        cap, taken = moe.expert_capacity(t, k, e, 0.8), [0] * e
        kept = torch.zeros(t, k, dtype=torch.bool)
        for j in range(k):
            for i in order:
                kept[i, j] = taken[int(index[i, j])] < cap
                taken[int(index[i, j])] += 1
        assert torch.equal(moe.capacity_dispatch(index, e, 0.8, priority=priority).kept, kept)


def test_router_plots_draw_and_name_the_device():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from effarch import plots

    rng = np.random.default_rng(0)
    load = rng.dirichlet(np.ones(8), size=2)
    figs = [plots.layer_loads({"a L0": load[0], "a L1": load[1]}, device="cpu"),
            plots.capacity_curves([0.5, 1.0, 2.0], {"x": [0.5, 0.1, 0.0]}, device="cpu"),
            plots.topk_quality([1, 2, 4], {"m": [20.0, 15.0, 14.0]}, trained_k=2, device="cpu"),
            plots.capacity_bars(np.array([30, 10, 5, 3]), np.array([12, 10, 5, 3]), 12, layer=0,
                                capacity_factor=1.0, device="cpu")]
    for fig in figs:
        assert plots.device_name("cpu") in fig.axes[0].get_title()
        plt.close(fig)
    steps = rng.dirichlet(np.ones(16), size=40)                        # (steps, E)
    fig = plots.load_over_steps({"off": steps, "on": steps}, device="cpu")
    assert len(fig.axes) == 2 and plots.device_name("cpu") in fig._suptitle.get_text()
    plt.close(fig)


def test_train_moe_block_is_seeded_and_records_every_step():
    g = np.random.default_rng(0)
    ids, val = g.integers(0, 50, 2000), g.integers(0, 50, 500)
    table = torch.randn(50, 16, generator=torch.Generator().manual_seed(0))
    a = moe.train_moe_block(ids, table, val, aux_coef=0.01, seed=3, steps=12, num_experts=4,
                            batch=64)
    b = moe.train_moe_block(ids, table, val, aux_coef=0.01, seed=3, steps=12, num_experts=4,
                            batch=64)
    assert a.load.shape == (12, 4) and np.allclose(a.load.sum(1), 1) and len(a.aux) == 12
    assert np.array_equal(a.load, b.load) and a.val_mse == b.val_mse
    assert 0 <= a.starved() <= 4 and a.val_load.shape == (4,)
