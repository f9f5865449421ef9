"""effarch.hooks.capture_routing on every MoE family (small random configs) and the zoo.

Runs on transformers 5.17 and 5.24: the 5.17 routers differ (Jamba's is a plain Linear, GraniteMoE
returns (index, weights, logits)), which is what these tests pin.
"""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from effarch import hooks, models, moe

FAMILIES = list(moe.MOE_FAMILIES)


def _build(family: str, **overrides):
    torch.manual_seed(0)
    cfg = moe.small_config(family, **overrides)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def _inputs(batch=2, length=7, vocab=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, length - 2:] = 0  # right padding on the second row
    return ids, mask


@pytest.fixture(scope="module", params=FAMILIES)
def family_run(request):
    """A small model of each family, one forward pass under capture, and every MoE block's
    real input and output (recorded by separate hooks: what the block computed)."""
    model = _build(request.param)
    ids, mask = _inputs()
    blocks = hooks.find_moe_blocks(model)
    seen, handles = {}, []
    for layer, (block, _, _) in blocks.items():
        handles.append(block.register_forward_hook(
            lambda m, a, out, layer=layer: seen.__setitem__(layer, (a[0].detach(), out))))
    try:
        with hooks.capture_routing(model) as trace, torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    return request.param, model, trace, seen, (ids, mask)


def test_one_record_per_moe_layer_at_the_decoder_layer_index(family_run):
    family, model, trace, _, (ids, _) = family_run
    cfg = model.config
    assert trace.moe_layers == moe.moe_layers(cfg), family
    assert [r.layer for r in trace] == moe.moe_layers(cfg)
    e, k, t = moe.n_experts(cfg), cfg.num_experts_per_tok, ids.numel()
    for r in trace:
        assert r.call == 0 and r.shape == tuple(ids.shape)
        assert r.logits.shape == (t, e) and r.logits.dtype == torch.float32
        assert r.topk_index.shape == (t, k) and r.topk_index.dtype == torch.int64
        assert r.topk_weight.shape == (t, k) and r.topk_weight.dtype == torch.float32
        assert int(r.topk_index.min()) >= 0 and int(r.topk_index.max()) < e


def test_dense_layers_and_shared_gates_are_not_routers(family_run):
    family, model, _, _, _ = family_run
    blocks = hooks.find_moe_blocks(model)
    e = moe.n_experts(model.config)
    for _, router, experts in blocks.values():
        assert router.weight.shape[0] == e and router is not experts
    if family == "qwen2_moe":  # its shared_expert_gate (H -> 1) sits in the same block
        gates = [b.shared_expert_gate for b, _, _ in blocks.values()]
        assert all(g not in [r for _, r, _ in blocks.values()] for g in gates)


def _expert(experts, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e of a fused experts module on x (n, H), from its weights (gate_up, down)."""
    gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
    return F.linear(experts.act_fn(gate) * up, experts.down_proj[e])


def _always_on(family: str, block, x: torch.Tensor) -> torch.Tensor:
    """The part of a block's output every token gets (shared experts), or 0."""
    if family == "qwen2_moe":
        return torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
    if family in ("deepseek_v2", "deepseek_v3"):
        return block.shared_experts(x)
    return torch.zeros_like(x)


def test_recorded_weights_rebuild_the_block_output(family_run):
    """Σ_j w_j · expert_{i_j}(x) (+ shared experts) from the recorded indices and weights equals
    what the MoE block returned: the weights are the ones that multiplied the experts."""
    family, model, trace, seen, _ = family_run
    blocks = hooks.find_moe_blocks(model)
    for r in trace:
        block, _, experts = blocks[r.layer]
        x_in, out = seen[r.layer]
        x = x_in.reshape(-1, x_in.shape[-1])                                 # (T, H)
        with torch.no_grad():
            routed = torch.zeros_like(x)
            for j in range(r.topk_index.shape[1]):
                for e in r.topk_index[:, j].unique().tolist():
                    rows = r.topk_index[:, j] == e
                    routed[rows] += r.topk_weight[rows, j, None] * _expert(experts, e, x[rows])
            rebuilt = routed + _always_on(family, block, x)
        torch.testing.assert_close(rebuilt, out.reshape(x.shape), rtol=1e-4, atol=1e-5,
                                   msg=f"{family} layer {r.layer}")
        assert (r.topk_weight > 0).all(), family


def _softmax_pick(r):
    return F.softmax(r.logits, dim=-1).gather(-1, r.topk_index)


def test_weights_follow_each_familys_rule(family_run):
    """The recorded logits and weights agree with how each family weighs its experts (each modeling_*.py:
    Mixtral renormalises; Qwen/OLMoE only with norm_topk_prob; Jamba never; DeepSeek-V2 scales
    by routed_scaling_factor; V3 uses sigmoid scores; GraniteMoE softmaxes over the k)."""
    family, model, trace, _, _ = family_run
    cfg = model.config
    for r in trace:
        w, probs = r.topk_weight, _softmax_pick(r)
        if family in ("mixtral", "qwen3_moe"):  # renormalised (qwen3: norm_topk_prob=True)
            expected = probs / probs.sum(-1, keepdim=True)
        elif family in ("qwen2_moe", "olmoe", "jamba"):  # softmax over all E, not renormalised
            expected = probs
        elif family == "deepseek_v2":
            expected = probs * cfg.routed_scaling_factor
        elif family == "deepseek_v3":
            s = torch.sigmoid(r.logits).gather(-1, r.topk_index)
            expected = s / s.sum(-1, keepdim=True) * cfg.routed_scaling_factor
        elif family == "granitemoe":
            expected = F.softmax(r.logits.gather(-1, r.topk_index), dim=-1)
        else:  # phimoe's sparsemixer: its own multipliers; first choice is the top logit
            assert torch.equal(r.topk_index[:, 0], r.logits.argmax(-1))
            continue
        torch.testing.assert_close(w, expected, rtol=1e-5, atol=1e-6, msg=family)
        if family not in ("deepseek_v3", "granitemoe"):  # the k largest probabilities
            top = probs.sort(-1).values
            ref = F.softmax(r.logits, -1).topk(w.shape[1], -1).values.sort(-1).values
            torch.testing.assert_close(top, ref)


def test_padding_is_marked_and_tokens_are_flattened_batch_major(family_run):
    _, _, trace, _, (ids, mask) = family_run
    r = trace[0]
    assert torch.equal(r.token_mask, mask.reshape(-1).bool())
    assert torch.equal(r.attention_mask, mask)


def test_generate_gives_one_record_per_layer_per_step():
    model = _build("mixtral")
    ids = torch.randint(1, 128, (1, 5))
    with hooks.capture_routing(model) as trace, torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    layers = moe.moe_layers(model.config)
    assert trace.calls == 4 and len(trace) == 4 * len(layers)
    assert trace.get(layers[0], 0).topk_index.shape[0] == 5  # the prefill
    assert trace.get(layers[-1], 3).topk_index.shape[0] == 1  # one token per decode step
    assert trace.get(layers[0], 3).token_mask.tolist() == [True]


def test_calls_without_the_top_module_are_still_separated():
    model = _build("olmoe")
    ids = torch.randint(1, 128, (1, 4))
    with hooks.capture_routing(model) as trace, torch.no_grad():
        model.model(input_ids=ids)  # the inner model: the top module's hook does not fire
        model.model(input_ids=ids)
    assert trace.calls == 2 and [r.call for r in trace].count(1) == len(trace.moe_layers)


def test_hooks_are_removed_on_exit_and_after_an_exception():
    model = _build("qwen2_moe")

    def n_hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    before = n_hooks()
    with hooks.capture_routing(model):
        assert n_hooks() > before
    assert n_hooks() == before
    with pytest.raises(RuntimeError, match="boom"), hooks.capture_routing(model):
        raise RuntimeError("boom")
    assert n_hooks() == before


def test_a_model_without_moe_layers_gets_a_clear_error():
    model = models.load_model("tiny-transformer", device="cpu").model
    with pytest.raises(ValueError, match="no mixture-of-experts layer.*Routing capture"):
        with hooks.capture_routing(model):
            pass
    conv = torch.nn.Sequential(torch.nn.Conv1d(4, 4, 3, bias=False))  # a 3-D weight alone
    assert hooks.find_moe_blocks(conv) == {}


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-hybrid"])
def test_zoo_models(name):
    model = models.load_model(name, device="cpu").model
    ids = torch.randint(1, 4096, (2, 9))
    with hooks.capture_routing(model) as trace, torch.no_grad():
        out = model(input_ids=ids, output_router_logits=True)
    assert trace.moe_layers == moe.moe_layers(model.config)
    for r, logits in zip(trace, out.router_logits, strict=True):  # transformers' own record
        torch.testing.assert_close(r.logits, logits.float().reshape(r.logits.shape))
    assert all(torch.allclose(r.topk_weight.sum(-1), torch.ones(18)) for r in trace) \
        == (name == "tiny-moe")  # Mixtral renormalises its top-2, Jamba does not


def test_trace_tokens_drop_padding_across_calls():
    model = _build("mixtral")
    ids, mask = _inputs()
    with hooks.capture_routing(model) as trace, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        model(input_ids=ids[:1, :3])
    index, weight, logits = trace.tokens(trace.moe_layers[1])
    real = int(mask.sum()) + 3
    assert index.shape == (real, 2) and weight.shape == (real, 2) and logits.shape == (real, 4)
    first = trace.get(trace.moe_layers[1], 0)
    assert torch.equal(index[:int(mask.sum())], first.topk_index[first.token_mask])
    with pytest.raises(KeyError, match="not an MoE layer"):
        trace.tokens(99)


def test_experts_called_without_routing_get_a_clear_error():
    model = _build("mixtral")
    _, _, experts = hooks.find_moe_blocks(model)[0]
    with pytest.raises(RuntimeError, match="without .*Routing capture"), \
            hooks.capture_routing(model):
        experts(torch.randn(3, 64), torch.rand(3, 2))  # no integer index
