"""effarch.hooks.capture_ssm on tiny random-weight Mamba and Jamba models (no hub)."""

import pytest
import torch

from effarch import ssm
from effarch.hooks import SSMTrace, capture_ssm, find_ssm_mixers

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN, STATE = 128, 32, 8


@pytest.fixture(scope="module", params=[False, True], ids=["loop", "mambapy"])
def mamba(request):
    if request.param:
        pytest.importorskip("mambapy", reason="use_mambapy=True needs the mambapy package")
    torch.manual_seed(0)
    config = transformers.MambaConfig(hidden_size=HIDDEN, state_size=STATE, num_hidden_layers=2,
                                      vocab_size=VOCAB, use_mambapy=request.param)
    return transformers.MambaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def jamba():
    torch.manual_seed(0)
    config = transformers.JambaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
        expert_layer_period=2, expert_layer_offset=1, attn_layer_period=4, attn_layer_offset=2,
        mamba_d_state=STATE, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8,
        use_mamba_kernels=False,  # needed before transformers 5; deprecated (no effect) after
    )
    return transformers.JambaForCausalLM(config).eval()


@pytest.fixture
def input_ids():
    return torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))


def returned_cache(output):
    """The cache a forward returned: ``cache`` (transformers >= 5.24) or ``cache_params`` (5.17)."""
    return getattr(output, "cache", None) or getattr(output, "cache_params", None)


def recurrent_state(cache, layer):
    if hasattr(cache, "get_recurrent_state"):  # transformers >= 5.24
        return cache.get_recurrent_state(layer)
    return cache.layers[layer].recurrent_states[0]


def check_trace(trace: SSMTrace, b, l, d, n):  # noqa: E741 (the paper's letters)
    assert trace.max_abs_diff < 1e-5, "recomputation no longer matches the mixer: did transformers change?"
    assert trace.delta.shape == trace.u.shape == (b, d, l)
    assert trace.state.shape == (b, d, l, n)
    assert trace.B.shape == trace.C.shape == (b, n, l)
    assert (trace.delta > 0).all()
    assert not trace.state.requires_grad and trace.state.device.type == "cpu"
    # the recorded state at the last step is the scan's last state, from the recorded inputs
    _, last = ssm.selective_scan_ref(trace.u, trace.delta, trace.A, trace.B, trace.C, return_last_state=True)
    torch.testing.assert_close(trace.last_state, last, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("use_cache", [False, True])
def test_capture_mamba(mamba, input_ids, use_cache):
    with torch.no_grad(), capture_ssm(mamba) as traces:
        output = mamba(input_ids, use_cache=use_cache)
    assert sorted(traces) == [0, 1]
    d = mamba.config.intermediate_size
    for layer, trace in traces.items():
        check_trace(trace, 2, 11, d, STATE)
        assert trace.output.shape == (2, 11, HIDDEN)
        if use_cache:  # what the model keeps for decoding is the last recorded state
            torch.testing.assert_close(trace.last_state, recurrent_state(returned_cache(output), layer).float(),
                                       atol=1e-5, rtol=1e-4)


def test_capture_jamba_records_only_mamba_layers(jamba, input_ids):
    mamba_layers = [i for i, kind in enumerate(jamba.config.layers_block_type) if kind == "mamba"]
    assert mamba_layers == [0, 1, 3]
    mask = torch.ones_like(input_ids)
    mask[0, :3] = 0  # left padding
    with torch.no_grad(), capture_ssm(jamba) as traces:
        jamba(input_ids, attention_mask=mask)
    assert sorted(traces) == mamba_layers
    for trace in traces.values():
        check_trace(trace, 2, 11, 2 * HIDDEN, STATE)


def test_capture_with_gradients_enabled(mamba, input_ids):
    with capture_ssm(mamba, layers=[0]) as traces:
        mamba(input_ids).logits.sum().backward()
    assert not traces[0].delta.requires_grad and traces[0].max_abs_diff < 1e-5
    mamba.zero_grad(set_to_none=True)


def test_generate_records_the_prefill_and_skips_decode_steps(mamba, input_ids):
    with torch.no_grad(), capture_ssm(mamba) as traces:
        mamba.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=3,
                       do_sample=False, pad_token_id=0)
    check_trace(traces[1], 2, 11, mamba.config.intermediate_size, STATE)
    assert traces.skipped == {0: 2, 1: 2}


def test_layers_filter(mamba, jamba, input_ids):
    with torch.no_grad(), capture_ssm(mamba, layers=[1]) as traces:
        mamba(input_ids)
    assert list(traces) == [1]
    with pytest.raises(ValueError, match="not Mamba layers"):
        with capture_ssm(jamba, layers=[2]):  # layer 2 is attention
            pass
    with pytest.raises(ValueError, match="no MambaMixer"):
        with capture_ssm(torch.nn.Linear(2, 2)):
            pass


def hook_counts(model):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in find_ssm_mixers(model).values()]


def test_hooks_removed_after_exit_and_after_an_error(jamba, input_ids):
    before = hook_counts(jamba)
    with torch.no_grad(), capture_ssm(jamba):
        assert hook_counts(jamba) != before
    assert hook_counts(jamba) == before
    with pytest.raises(RuntimeError, match="inside"):
        with torch.no_grad(), capture_ssm(jamba):
            raise RuntimeError("inside")
    assert hook_counts(jamba) == before
    with pytest.raises(IndexError), capture_ssm(jamba):  # the error raised by the model itself
        jamba(torch.tensor([[VOCAB + 5]]))
    assert hook_counts(jamba) == before


def test_capture_bf16_model(input_ids):
    torch.manual_seed(0)
    config = transformers.MambaConfig(hidden_size=HIDDEN, state_size=STATE, num_hidden_layers=1, vocab_size=VOCAB)
    model = transformers.MambaForCausalLM(config).eval().to(torch.bfloat16)
    with torch.no_grad(), capture_ssm(model) as traces:
        model(input_ids)
    assert traces[0].state.dtype == torch.float32
    assert traces[0].max_abs_diff < 1e-2  # projections round in bf16 in both, the scan runs in float32
