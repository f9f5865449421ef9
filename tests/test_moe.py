"""effarch.moe: parameter counts (exact against builds, published figures under each source's
convention), token labels, and routing statistics that separate signal from noise."""

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from effarch import data, memory, models, moe

REAL_MOE = [n for n, s in models.REGISTRY.items() if s.config and s.role in ("moe", "hybrid")]


def _tree_active(model) -> int:
    """Active parameters from the module tree, independently of the formula: every parameter,
    less (E - k)/E of each fused experts module (3-D weights with E rows)."""
    k = model.config.num_experts_per_tok
    total = sum(p.numel() for p in model.parameters())
    idle = 0
    for m in model.modules():
        own = [p for p in m.parameters(recurse=False) if p.dim() == 3]
        if len(own) >= 2:
            e = own[0].shape[0]
            idle += sum(p.numel() for p in own) * (e - k) // e
    return total - idle


# ============================================================================ parameter counts


@pytest.mark.parametrize("name", REAL_MOE + ["tiny-moe", "tiny-hybrid"])
def test_count_is_exact_against_a_meta_build(name):
    loaded = models.load_model(name, weights="random", device="meta")
    pc = moe.count_params(loaded.model)  # checks the formula's total against the tensors
    assert pc.total == sum(p.numel() for p in loaded.model.parameters())
    assert pc.active == _tree_active(loaded.model), name
    assert pc == moe.count_params(loaded.model.config) == memory.count_params(loaded.model.config)


@pytest.mark.parametrize("family", moe.MOE_FAMILIES)
@pytest.mark.parametrize("tied", [False, True])
def test_count_is_exact_for_every_family(family, tied):
    cfg = moe.small_config(family, tie_word_embeddings=tied)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    pc = moe.count_params(model)
    assert pc.total == sum(p.numel() for p in model.parameters())
    assert pc.active == _tree_active(model)
    assert (pc.lm_head == 0) == tied
    parts = (pc.embedding + pc.lm_head + pc.attention + pc.ssm + pc.dense_mlp + pc.routed_experts
             + pc.shared_experts + pc.router + pc.norms)
    assert parts == pc.total
    assert pc.active == pc.total - pc.routed_experts + pc.active_experts
    assert pc.active_experts == pc.experts_per_token * pc.per_expert * pc.moe_layers
    assert pc.moe_layers == len(moe.moe_layers(cfg)) and pc.n_experts == moe.n_experts(cfg)
    assert (pc.shared_experts > 0) == (family in ("qwen2_moe", "deepseek_v2", "deepseek_v3"))
    assert (pc.dense_mlp > 0) == (family in ("qwen2_moe", "qwen3_moe", "deepseek_v2",
                                             "deepseek_v3", "jamba"))


def test_count_refuses_a_model_the_formula_does_not_describe():
    model = models.load_model("tiny-moe", device="cpu").model
    model.model.extra = torch.nn.Linear(3, 3)  # a part no formula knows
    with pytest.raises(ValueError, match="Parameter counts"):
        moe.count_params(model)


@pytest.mark.parametrize("name", sorted(moe.PUBLISHED))
def test_published_figures_under_each_sources_convention(name):
    pub = moe.PUBLISHED[name]
    total, active = moe.published_convention_counts(moe.count_params(models.get_config(name)),
                                                    name)
    assert abs(total / pub.total - 1) < 0.02, (name, total)
    if pub.cut_not_rounded:  # 2.45B printed as 2.4B: the count cut to one decimal
        assert math.floor(active / 1e8) / 10 == pytest.approx(pub.active / 1e9), (name, active)
        assert 0 <= active / pub.active - 1 < 0.025
    else:
        assert abs(active / pub.active - 1) < 0.02, (name, active)


def test_other_conventions_would_miss_the_published_active_figures():
    """The written-down conventions matter: where the embedding is a sizeable share of the
    active parameters, counting the other way misses by more than 2%."""
    for name in ("olmoe-1b-7b", "qwen1.5-moe-a2.7b", "deepseek-v2-lite"):
        pub, pc = moe.PUBLISHED[name], moe.count_params(models.get_config(name))
        other = pc.active if pub.active_without_input_embedding else pc.active - pc.embedding
        assert abs(other / pub.active - 1) > 0.02, name


def test_moe_layers_follow_each_familys_rule():
    assert moe.moe_layers(moe.small_config("qwen2_moe")) == [0, 2, 3]  # mlp_only_layers=[1]
    assert moe.moe_layers(moe.small_config("deepseek_v2")) == [1, 2, 3]  # first layer dense
    assert moe.moe_layers(moe.small_config("jamba")) == [1, 3]
    assert moe.moe_layers(models.get_config("tiny-hybrid")) == [1, 3]
    assert moe.n_experts(models.get_config("deepseek-v2-lite")) == 64
    with pytest.raises(ValueError, match="unknown MoE family"):
        moe.small_config("gpt2")


# ============================================================================== token labels


def test_code_token_classes():
    text = 'def f(x):\n    return x + 1  # one\n'
    cls = moe.code_classes(text)
    name = dict(enumerate(moe.TOKEN_CLASSES))
    at = [0, 4, 5, 10, 25, 28]  # def, f, (, indentation, 1, # one
    assert [name[cls[i]] for i in at] == [
        "keyword", "identifier", "punctuation", "whitespace", "number", "string/comment"]
    assert name[cls[text.index("return")]] == "keyword"


def test_token_labels_line_up_with_the_tokens():
    tok = data.load_tokenizer()
    docs = [data.Document("code", "t", "def f(self):\n    return self.x\n"),
            data.Document("prose", "t", "The cat sat.")]
    text = data.DOC_SEPARATOR.join(d.text for d in docs)
    cls, dom = moe.token_labels(tok, text, *moe.char_labels(docs))
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(cls) == len(dom) == len(ids)
    assert dom[0] == data.DOMAINS.index("code") and dom[-1] == data.DOMAINS.index("prose")
    first_self = [i for i, t in enumerate(ids) if tok.decode([t]).strip() == "self"][0]
    assert moe.TOKEN_CLASSES[cls[first_self]] == "identifier"


# ======================================================================== routing statistics


def test_mutual_information_and_its_shuffled_baseline():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 4, 20_000)
    assert moe.mutual_information(label, label, 4, 4) == pytest.approx(2.0, abs=0.01)  # H = 2
    noise = moe.mi_with_baseline(rng.integers(0, 8, 20_000), label, 8, 4, n_perm=20)
    assert noise["mi_bits"] < 3 * noise["perm_p99"]
    tied = moe.mi_with_baseline(label * 2, label, 8, 4, n_perm=20)
    assert tied["mi_bits"] > 100 * tied["perm_p99"]


def test_load_entropy_and_cv():
    even = moe.load_stats(np.tile(np.arange(8), 50).reshape(-1, 2), 8, logits=np.zeros((200, 8)))
    assert even.cv == pytest.approx(0) and even.entropy_bits == pytest.approx(3.0)
    assert even.router_entropy_bits == pytest.approx(3.0) and even.tokens == 200
    skew = moe.load_stats(np.array([[0, 1]] * 90 + [[2, 3]] * 10), 4)
    assert skew.load.tolist() == pytest.approx([0.45, 0.45, 0.05, 0.05])
    assert skew.cv == pytest.approx(np.std([0.45, 0.45, 0.05, 0.05]) / 0.25)
    sure = np.full((5, 4), -1e4)
    sure[:, 0] = 0
    assert moe.router_entropy_bits(sure) == pytest.approx(0, abs=1e-6)


def test_first_choice_reads_the_weights_not_the_column():
    index = np.array([[3, 1], [0, 2]])  # DeepSeek's top-k is unsorted
    weight = np.array([[0.2, 0.7], [0.6, 0.1]])
    assert moe.first_choice(index, weight).tolist() == [1, 0]


def _documents(n_docs, tokens, n_experts, rng, *, domain_effect=0.0, doc_effect=0.0):
    """Tokens of n_docs documents in 2 domains; each document prefers one expert (doc_effect)
    and domain 1 prefers expert 0 (domain_effect)."""
    doc = np.repeat(np.arange(n_docs), tokens)
    doc_domain = np.arange(n_docs) % 2
    top = []
    for d in range(n_docs):
        p = np.full(n_experts, 1.0)
        p[rng.integers(n_experts)] += doc_effect
        p[0] += domain_effect * doc_domain[d]
        top.append(rng.choice(n_experts, size=tokens, p=p / p.sum()))
    return np.concatenate(top), doc, doc_domain


def test_domain_test_detects_a_real_domain_preference():
    rng = np.random.default_rng(0)
    top, doc, dd = _documents(20, 200, 8, rng, domain_effect=3.0)
    res = moe.domain_test(top, doc, dd, 8, 2, n_perm=500)
    assert res.p_value < 0.01 and res.mi_bits > res.null_p99
    assert res.shares.shape == (2, 8) and np.allclose(res.shares.sum(1), 1)
    assert res.shares[1, 0] > 2 * res.shares[0, 0]
    assert res.documents.tolist() == [10, 10] and res.tokens == 4000


def test_domain_test_shuffles_documents_not_tokens():
    """Every document has its own favourite expert, unrelated to its domain. Shuffling tokens
    calls that a domain effect (their MI beats every token shuffle); shuffling documents does
    not."""
    rng = np.random.default_rng(1)
    top, doc, dd = _documents(16, 300, 8, rng, doc_effect=6.0)
    res = moe.domain_test(top, doc, dd, 8, 2, n_perm=500)
    assert res.p_value > 0.05
    token_level = moe.mi_with_baseline(top, dd[doc], 8, 2, n_perm=200)
    assert token_level["mi_bits"] > token_level["perm_p99"]  # the wrong test is fooled


def test_domain_test_p_values_are_uniform_under_the_null():
    rng = np.random.default_rng(2)
    ps = []
    for _ in range(40):
        top, doc, dd = _documents(12, 50, 4, rng)
        ps.append(moe.domain_test(top, doc, dd, 4, 2, n_perm=99, seed=int(rng.integers(1e6)))
                  .p_value)
    assert 0.25 < np.mean(ps) < 0.75 and np.mean(np.array(ps) < 0.05) < 0.2


def test_same_expert_rate_against_the_measured_load():
    top1 = np.array([0, 0, 0, 1, 1, 2, 0, 0])
    doc = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    r = moe.same_expert_rate(top1, doc, 4)
    assert r.pairs == 6  # the pair across the document boundary (1 | 1) is not a pair
    assert r.rate == pytest.approx(3 / 6)  # 0-0, 0-0, 0-1 | 1-2, 2-0, 0-0
    load = np.array([5, 2, 1, 0]) / 8
    assert r.chance == pytest.approx((load ** 2).sum()) and r.uniform == 0.25
    assert moe.same_expert_rate(top1, None, 4).pairs == 7


def test_same_expert_rate_of_independent_tokens_is_its_chance_not_one_over_e():
    rng = np.random.default_rng(3)
    p = np.array([0.55, 0.25, 0.1, 0.05, 0.05])
    top1 = rng.choice(5, size=50_000, p=p)
    r = moe.same_expert_rate(top1, None, 5)
    assert r.rate == pytest.approx(r.chance, abs=0.01) and r.chance == pytest.approx(
        (p ** 2).sum(), abs=0.01)
    assert abs(r.rate - r.uniform) > 0.15


def test_which_tokens_go_where():
    ids = np.array([7, 7, 7, 7, 7, 3, 3, 3, 3, 3, 9])
    top1 = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 2, 2])
    table = moe.expert_tokens(ids, top1, 3, min_count=5)
    assert table[1][0] == (7, 4, 5, 0.8) and table[0][0] == (3, 4, 5, 0.8)
    assert table[2] == [(3, 1, 5, 0.2)]  # 9 is seen once: left out
    c = moe.token_expert_concentration(ids, top1, [7], 3)
    assert c == dict(count=5, expert=1, share=0.8, load=4 / 11)


# ===================================================================================== plots


@pytest.mark.parametrize("e", [8, 64])
def test_routing_plots_draw_and_name_the_device(e):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from effarch import plots

    rng = np.random.default_rng(0)
    shares = rng.dirichlet(np.ones(e), size=4)                     # (D, E)
    figs = [plots.expert_shares(shares, domains=data.DOMAINS, layer=1, device="cpu",
                                pooled=shares.mean(0), highlight="code"),
            plots.domain_expert_bars(shares[0], shares.mean(0), domain="code", layer=1,
                                     device="cpu"),
            plots.same_expert_rates(["a L0", "a L1"], [0.3, 0.4], [0.1, 0.2], [1 / e] * 2,
                                    device="cpu"),
            plots.token_experts(rng.integers(0, e, (3, 10)), list("abcdefghij"), n_experts=e,
                                row_labels=["l0", "l1", "l2"], device="cpu", title="t")]
    for fig in figs:
        assert plots.device_name("cpu") in fig.axes[0].get_title()
        plt.close(fig)
    heat = figs[0].axes[0]
    assert [t.get_text() for t in heat.get_yticklabels()] == [*data.DOMAINS, "all"]
    assert (len(heat.texts) > 0) == (e <= 16)  # shares written in the cells when they fit
