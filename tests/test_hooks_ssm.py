"""effarch.hooks.capture_ssm on tiny random-weight Mamba and Jamba models (no hub)."""

import pytest
import torch

from effarch import compat
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


def check_trace(trace: SSMTrace, b, l, d, n):  # noqa: E741 (the paper's letters)
    assert trace.max_abs_diff < 1e-5, "recomputation no longer matches the mixer: did transformers change?"
    assert trace.delta.shape == trace.u.shape == (b, d, l)
    assert trace.state.shape == (b, d, l, n)
    assert trace.B.shape == trace.C.shape == (b, n, l)
    assert (trace.delta > 0).all()
    assert not trace.state.requires_grad and trace.state.device.type == "cpu"


def check_delta_through_modules(mixer, trace: SSMTrace):
    """Δ recomputed another way: the modules' own forwards (x_proj, then dt_proj with its bias,
    then softplus) on the recorded u, not the weight products the recording used."""
    r = mixer.time_step_rank
    with torch.no_grad():
        dt = mixer.x_proj(trace.u.transpose(1, 2))[..., :r]  # (b, l, r)
        if hasattr(mixer, "dt_layernorm"):
            dt = mixer.dt_layernorm(dt)
        delta = torch.nn.functional.softplus(mixer.dt_proj(dt)).transpose(1, 2)  # (b, d, l)
    torch.testing.assert_close(trace.delta, delta, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("use_cache", [False, True])
def test_capture_mamba(mamba, input_ids, use_cache):
    with torch.no_grad(), capture_ssm(mamba) as traces:
        output = mamba(input_ids, use_cache=use_cache)
    assert sorted(traces) == [0, 1]
    d = mamba.config.intermediate_size
    mixers = find_ssm_mixers(mamba)
    for layer, trace in traces.items():
        check_trace(trace, 2, 11, d, STATE)
        check_delta_through_modules(mixers[layer], trace)
        assert trace.output.shape == (2, 11, HIDDEN)
        if use_cache:  # what the model keeps for decoding is the last recorded state
            torch.testing.assert_close(trace.last_state, compat.recurrent_state(compat.returned_cache(output), layer).float(),
                                       atol=1e-5, rtol=1e-4)


def test_every_recorded_state_is_the_models_own_state_after_that_prefix(mamba, input_ids):
    """h_t of the recording against an independent source: transformers' own scan run on the
    first t + 1 tokens, whose cache holds h_t (true of every t, not only the last)."""
    with torch.no_grad(), capture_ssm(mamba) as traces:
        mamba(input_ids)
    for t in (0, 3, 10):
        with torch.no_grad():
            cache = compat.returned_cache(mamba(input_ids[:, : t + 1], use_cache=True))
        for layer, trace in traces.items():
            torch.testing.assert_close(trace.state[:, :, t],
                                       compat.recurrent_state(cache, layer).float(),
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
