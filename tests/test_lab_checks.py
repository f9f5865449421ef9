"""The lab checks of 2.4.1 and 2.4.2 (``effarch.checks.check_*``): the right answer passes, and
each plausible wrong answer — a loop for ``parallel_scan``, a hard-coded 2 bytes, a scan that
keeps its state in bfloat16, a block without its softplus, a step that does not write its states
— fails, with a message naming the likely cause."""

from __future__ import annotations

import statistics

import pytest
import torch
import torch.nn.functional as F
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

from effarch import bench, checks, compat, hooks, memory
from effarch.checks import Case


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv("EFFARCH_STRICT", raising=False)
    checks.reset()
    yield
    checks.reset()


def verdict(capsys):
    """(status, printed text) of the check that just ran."""
    return checks.history()[-1].status, capsys.readouterr().out


def build(family: str, dtype=torch.float32, **overrides):
    small = {
        "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=128),
        "mamba": dict(hidden_size=32, num_hidden_layers=2, state_size=8, expand=2,
                      conv_kernel=4, use_mambapy=False),
    }[family]
    torch.manual_seed(0)
    cfg = CONFIG_MAPPING[family](vocab_size=97, **{**small, **overrides})
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def real_cache_bytes(model, seq_len, batch):
    ids = torch.randint(0, 97, (batch, seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    return memory.measure_cache_bytes(compat.returned_cache(out))


# ------------------------------------------------------------------------ lab 2.4.1, Part B


def kv_right(config, seq_len, batch, dtype):
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * memory.dtype_bytes(dtype) \
        * seq_len * batch


def kv_two_bytes(config, seq_len, batch, dtype):
    return kv_right(config, seq_len, batch, "bfloat16")


def kv_no_factor_two(config, seq_len, batch, dtype):
    return kv_right(config, seq_len, batch, dtype) // 2


def kv_all_heads(config, seq_len, batch, dtype):
    return 2 * config.num_hidden_layers * config.hidden_size * memory.dtype_bytes(dtype) \
        * seq_len * batch


@pytest.fixture(scope="module")
def kv_cases():
    """As the lab builds them: the measured float32 caches of a real model, and bf16 formulas."""
    model = build("llama")
    measured = [Case(model.config, L, b, torch.float32).expecting(
        real_cache_bytes(model, L, b).key_value, source="the real cache")
        for L, b in [(1, 1), (17, 2)]]
    return measured + [Case(model.config, 100, 1, "bfloat16")]


def test_kv_cache_formula_passes(kv_cases, capsys):
    assert checks.check_kv_cache_bytes(kv_right, kv_cases) is kv_right
    assert verdict(capsys)[0] == "pass"


@pytest.mark.parametrize("wrong, cause", [
    (kv_two_bytes, "fixed at 2"),
    (kv_no_factor_two, "factor 2 is missing"),
    (kv_all_heads, "num_key_value_heads"),
])
def test_kv_cache_wrong_answers_fail_with_their_cause(kv_cases, wrong, cause, capsys):
    assert checks.check_kv_cache_bytes(wrong, kv_cases) is memory.kv_cache_bytes
    status, out = verdict(capsys)
    assert status == "fail" and "likely cause: " in out and cause in out


def test_a_hard_coded_two_fails_even_without_measured_float32_cases(capsys):
    cfg = build("llama").config
    checks.check_kv_cache_bytes(kv_two_bytes, [Case(cfg, 10, 1, "bfloat16")])
    status, out = verdict(capsys)
    assert status == "fail" and "8-bit cache" in out and "fixed at 2" in out


def ssm_right(config, batch, dtype, state_dtype):
    d = config.expand * config.hidden_size
    conv = d * config.conv_kernel * memory.dtype_bytes(dtype)
    return config.num_hidden_layers * batch * (
        conv + d * config.state_size * memory.dtype_bytes(state_dtype))


def ssm_hidden_channels(config, batch, dtype, state_dtype):
    d = config.hidden_size
    return config.num_hidden_layers * batch * d * (
        config.conv_kernel * memory.dtype_bytes(dtype)
        + config.state_size * memory.dtype_bytes(state_dtype))


def ssm_model_dtype(config, batch, dtype, state_dtype):
    return ssm_right(config, batch, dtype, dtype)


@pytest.fixture(scope="module")
def ssm_cases():
    model = build("mamba", dtype=torch.bfloat16)
    real = real_cache_bytes(model, 5, 2)
    return [Case(model.config, 2, torch.bfloat16, real.dtypes["ssm"]).expecting(
        real.conv + real.ssm, source="the real cache")]


@pytest.mark.parametrize("wrong, cause", [(ssm_hidden_channels, "d_inner"),
                                          (ssm_model_dtype, "state_dtype")])
def test_ssm_state_wrong_answers_fail_with_their_cause(ssm_cases, wrong, cause, capsys):
    assert checks.check_ssm_state_bytes(ssm_right, ssm_cases) is ssm_right
    assert checks.check_ssm_state_bytes(wrong, ssm_cases) is memory.ssm_state_bytes
    status, out = verdict(capsys)
    assert status == "fail" and cause in out


def test_decode_rate_with_the_prefill_fails(capsys):
    assert checks.check_decode_tokens_per_s(bench.decode_tokens_per_s) is bench.decode_tokens_per_s
    checks.check_decode_tokens_per_s(lambda total, ttft, b, n: b * (n - 1) / total)
    status, out = verdict(capsys)
    assert status == "fail" and "the prefill is counted" in out


# ------------------------------------------------------------------------ lab 2.4.1, Part C


def timing_right(decoder, input_ids, *, new_tokens, warmup, repeats, clock, synchronize):
    ttft, per_token = [], []
    for run in range(warmup + repeats):
        synchronize(decoder.device)
        start = clock()
        token = decoder.prefill(input_ids).argmax(-1)
        synchronize(decoder.device)
        first = clock()
        for _ in range(new_tokens - 1):
            token = decoder.step(token).argmax(-1)
        synchronize(decoder.device)
        end = clock()
        if run >= warmup:
            ttft.append(first - start)
            per_token.append((end - first) / (new_tokens - 1))
    return statistics.median(ttft), statistics.median(per_token)


def timing_per_step_sync(decoder, input_ids, *, new_tokens, warmup, repeats, clock, synchronize):
    """Also right: synchronising after every step changes nothing on an idle device."""
    ttft, per_token = [], []
    for run in range(warmup + repeats):
        synchronize(decoder.device)
        start = clock()
        token = decoder.prefill(input_ids).argmax(-1)
        synchronize(decoder.device)
        first = clock()
        steps = []
        for _ in range(new_tokens - 1):
            before = clock()
            token = decoder.step(token).argmax(-1)
            synchronize(decoder.device)
            steps.append(clock() - before)
        if run >= warmup:
            ttft.append(first - start)
            per_token.append(sum(steps) / len(steps))
    return statistics.median(ttft), statistics.median(per_token)


def timing_variant(*, warm=True, sync=True, split=True, median=True, divide_by_n=False):
    def fn(decoder, input_ids, *, new_tokens, warmup, repeats, clock, synchronize):
        ttft, per_token = [], []
        for run in range((warmup if warm else 0) + repeats):
            if sync:
                synchronize(decoder.device)
            start = clock()
            token = decoder.prefill(input_ids).argmax(-1)
            if sync:
                synchronize(decoder.device)
            first = clock()
            for _ in range(new_tokens - 1):
                token = decoder.step(token).argmax(-1)
            if sync:
                synchronize(decoder.device)
            end = clock()
            if run >= (warmup if warm else 0):
                ttft.append(first - start)
                per_token.append((end - (first if split else start))
                                 / (new_tokens if divide_by_n else new_tokens - 1))
        summary = statistics.median if median else statistics.mean
        return summary(ttft), summary(per_token)
    return fn


def test_timing_loop_passes_on_the_fake_model_and_runs_on_a_real_one(capsys):
    assert checks.check_time_generation(timing_right) is timing_right
    assert checks.check_time_generation(timing_per_step_sync) is timing_per_step_sync
    assert verdict(capsys)[0] == "pass"
    # the stand-in (bench.time_prefill_decode) and the answer also run on a real model
    from effarch import decoding

    decoder = decoding.as_decoder(build("llama"))
    ids = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        for fn in (timing_right, bench.time_prefill_decode):
            ttft, step = fn(decoder, ids, new_tokens=3, warmup=1, repeats=2,
                            clock=bench._clock, synchronize=bench.synchronize)
            assert ttft > 0 and step > 0


@pytest.mark.parametrize("wrong, cause", [
    (timing_variant(warm=False), "no warm-up"),
    (timing_variant(sync=False), "without waiting for the device"),
    (timing_variant(split=False), "prefill is counted in the decode"),
    (timing_variant(median=False), "the mean, not the median"),
    (timing_variant(divide_by_n=True), "divided by new_tokens"),
])
def test_timing_loop_mistakes_fail_with_their_cause(wrong, cause, capsys):
    assert checks.check_time_generation(wrong) is bench.time_prefill_decode
    status, out = verdict(capsys)
    assert status == "fail" and cause in out


def test_timing_loop_that_passes_logits_to_step_gets_a_clear_error(capsys):
    def logits_to_step(decoder, input_ids, *, new_tokens, warmup, repeats, clock, synchronize):
        logits = decoder.prefill(input_ids)
        decoder.step(logits)

    checks.check_time_generation(logits_to_step)
    status, out = verdict(capsys)
    assert status == "fail" and "pass logits.argmax(-1)" in out


# ------------------------------------------------------------------------ lab 2.4.2, Part A


def discretize_right(delta, A, B):
    delta = delta.float()[..., None]
    return torch.exp(delta * A.float()[:, None, :]), delta * B.float().transpose(1, 2)[:, None]


def discretize_untransposed(delta, A, B):
    delta = delta.float()[..., None]
    return torch.exp(delta * A.float()[:, None, :]), delta * B.float()[:, None]


def discretize_exact(delta, A, B):
    from effarch import ssm

    return ssm.discretize_zoh_exact(delta, A, B)


@pytest.mark.parametrize("wrong, cause", [(discretize_untransposed, "transpose it"),
                                          (discretize_exact, "exact zero-order hold")])
def test_discretize_wrong_answers_fail_with_their_cause(wrong, cause, capsys):
    assert checks.check_discretize(discretize_right) is discretize_right
    checks.check_discretize(wrong)
    status, out = verdict(capsys)
    assert status == "fail" and cause in out


# ------------------------------------------------------------------------ lab 2.4.2, Part B


def scan_right(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
               return_last_state=False, state_dtype=torch.float32, softplus=True, bias=True):
    delta = delta.float()
    if delta_bias is not None and bias:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus and softplus:
        delta = F.softplus(delta)
    A_bar, B_bar = discretize_right(delta, A, B)
    Bu = B_bar * u.float()[..., None]
    h = torch.zeros(u.shape[0], *A.shape, dtype=state_dtype)
    ys = []
    for t in range(u.shape[-1]):
        h = (A_bar[:, :, t] * h + Bu[:, :, t]).to(state_dtype)
        ys.append(torch.einsum("bdn,bn->bd", h.float(), C[:, :, t].float()))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.float()[:, None] * u.float()
    if z is not None:
        y = y * F.silu(z.float())
    return (y.to(u.dtype), h) if return_last_state else y.to(u.dtype)


def scan_bf16_state(*args, **kwargs):
    return scan_right(*args, **kwargs, state_dtype=u_dtype(args, kwargs))


def u_dtype(args, kwargs):
    return (args[0] if args else kwargs["u"]).dtype


def scan_bf16_state_returned_float(*args, **kwargs):
    out = scan_bf16_state(*args, **kwargs)
    return (out[0], out[1].float()) if isinstance(out, tuple) else out


@pytest.fixture(scope="module")
def mamba():
    return build("mamba")


@pytest.fixture(scope="module")
def layer_cases(mamba):
    ids = torch.randint(0, 97, (1, 23), generator=torch.Generator().manual_seed(3))
    xs = hooks.capture_mixer_inputs(mamba, ids, [0, 1])
    mixers = hooks.find_ssm_mixers(mamba)
    return [hooks.scan_arguments(mixers[i], x) for i, x in xs.items()]


def transformers_scan(*args, **kwargs):
    from effarch import ssm

    return ssm.selective_scan_ref(*args, **kwargs)


@pytest.mark.parametrize("wrong, cause", [
    (scan_bf16_state, "bfloat16 inputs: keep h"),
    (scan_bf16_state_returned_float, "bfloat16 inputs: keep h"),
    (lambda *a, **k: scan_right(*a, **k, softplus=False), "softplus on Δ is missing"),
    (lambda *a, **k: scan_right(*a, **k, bias=False), "delta_bias is missing"),
])
def test_selective_scan_wrong_answers_fail_with_their_cause(layer_cases, wrong, cause, capsys):
    assert checks.check_selective_scan(scan_right, transformers_scan, layer_cases) is scan_right
    checks.check_selective_scan(wrong, transformers_scan, layer_cases)
    status, out = verdict(capsys)
    assert status == "fail" and cause in out


# ------------------------------------------------------------------------ lab 2.4.2, Part C


def hillis_steele(a, b, dim=-1):
    a, b = torch.broadcast_tensors(a, b)
    a, b = a.movedim(dim, -1), b.movedim(dim, -1)
    k = 1
    while k < a.shape[-1]:
        a, b = (torch.cat([a[..., :k], a[..., :-k] * a[..., k:]], -1),
                torch.cat([b[..., :k], a[..., k:] * b[..., :-k] + b[..., k:]], -1))
        k *= 2
    return b.movedim(-1, dim)


def blelloch(a, b, dim=-1):
    """Work-efficient: up-sweep, then down-sweep, padded to a power of two (2·log2 l rounds)."""
    a, b = torch.broadcast_tensors(a, b)
    a, b = a.movedim(dim, -1), b.movedim(dim, -1)
    length = a.shape[-1]
    size = 1 << max(0, (length - 1).bit_length())
    a = torch.cat([a, a.new_ones(*a.shape[:-1], size - length)], -1).clone()
    b = torch.cat([b, b.new_zeros(*b.shape[:-1], size - length)], -1).clone()
    a0, b0 = a.clone(), b.clone()
    step = 1
    while step < size:  # up-sweep: node i·2s + 2s − 1 takes the pair ending s earlier
        right = slice(2 * step - 1, size, 2 * step)
        left = slice(step - 1, size, 2 * step)
        a[..., right], b[..., right] = a[..., left] * a[..., right], \
            a[..., right] * b[..., left] + b[..., right]
        step *= 2
    a[..., -1], b[..., -1] = 1.0, 0.0  # exclusive scan: identity at the root
    step = size // 2
    while step >= 1:  # down-sweep
        right = slice(2 * step - 1, size, 2 * step)
        left = slice(step - 1, size, 2 * step)
        la, lb, ra, rb = a[..., left].clone(), b[..., left].clone(), a[..., right], b[..., right]
        a[..., left], b[..., left] = ra, rb
        a[..., right], b[..., right] = ra * la, la * rb + lb
        step //= 2
    h = a0 * b + b0  # inclusive: the exclusive prefix then this step
    return h[..., :length].movedim(-1, dim)


def python_loop(a, b, dim=-1):
    a, b = torch.broadcast_tensors(a, b)
    a, b = a.movedim(dim, -1), b.movedim(dim, -1)
    h, out = torch.zeros_like(b[..., 0]), []
    for t in range(b.shape[-1]):
        h = a[..., t] * h + b[..., t]
        out.append(h)
    return torch.stack(out, -1).movedim(-1, dim)


def cumulative_products(a, b, dim=-1):
    a, b = torch.broadcast_tensors(a, b)
    p = torch.cumprod(a.double(), dim)
    return (p * torch.cumsum(b.double() / p, dim)).to(b.dtype)


def test_parallel_scan_accepts_hillis_steele_and_blelloch(capsys):
    for fn in (hillis_steele, blelloch):
        assert checks.check_parallel_scan(fn) is fn, capsys.readouterr().out


def test_a_loop_over_time_fails_the_parallel_scan_and_says_why(capsys):
    assert checks.check_parallel_scan(python_loop) is checks.parallel_scan_reference
    status, out = verdict(capsys)
    assert status == "fail" and "right values" in out and "loop over the sequence" in out
    counts = [checks.count_tensor_ops(python_loop, torch.rand(2, n), torch.rand(2, n))
              for n in (32, 1024)]
    assert counts[1] > 16 * counts[0]  # grows like l


def exclusive(a, b, dim=-1):
    h = hillis_steele(a, b, dim).movedim(dim, -1)
    return torch.cat([torch.zeros_like(h[..., :1]), h[..., :-1]], -1).movedim(-1, dim)


@pytest.mark.parametrize("wrong, cause", [(exclusive, "off by one step"),
                                          (cumulative_products, "cumulative products")])
def test_parallel_scan_wrong_answers_fail_with_their_cause(wrong, cause, capsys):
    checks.check_parallel_scan(wrong)
    status, out = verdict(capsys)
    assert status == "fail" and cause in out


def swapped(a, b, dim=-1):
    a, b = a.movedim(dim, -1), b.movedim(dim, -1)
    k = 1
    while k < a.shape[-1]:
        a, b = (torch.cat([a[..., :k], a[..., :-k] * a[..., k:]], -1),
                torch.cat([b[..., :k], a[..., :-k] * b[..., k:] + b[..., :-k]], -1))
        k *= 2
    return b.movedim(-1, dim)


def test_a_swapped_operator_is_named(capsys):
    checks.check_parallel_scan(swapped)
    status, out = verdict(capsys)
    assert status == "fail" and "order is swapped" in out


# ----------------------------------------------------------- lab 2.4.2, the block and the step


def block_right(mixer, x, *, softplus=True, causal=True, transpose_B=True):
    length = x.shape[1]
    u, z = mixer.in_proj(x).transpose(1, 2).chunk(2, dim=1)
    conv = F.conv1d(u, mixer.conv1d.weight, mixer.conv1d.bias,
                    padding=mixer.conv1d.kernel_size[0] - 1, groups=mixer.conv1d.groups)
    u = mixer.act(conv[..., :length] if causal else conv[..., -length:])
    r, n = mixer.time_step_rank, mixer.ssm_state_size
    dt, B, C = torch.split(mixer.x_proj(u.transpose(1, 2)), [r, n, n], dim=-1)
    B, C = (B.transpose(1, 2), C.transpose(1, 2)) if transpose_B else (B, C)
    y = scan_right(u, mixer.dt_proj.weight @ dt.transpose(1, 2), -torch.exp(mixer.A_log.float()),
                   B, C, mixer.D, z, mixer.dt_proj.bias, delta_softplus=softplus)
    return mixer.out_proj(y.transpose(1, 2).to(x.dtype))


@pytest.fixture(scope="module")
def block_cases(mamba):
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(4))
    xs = hooks.capture_mixer_inputs(mamba, ids, [0, 1])
    mixers = hooks.find_ssm_mixers(mamba)
    return [(mixers[i], x) for i, x in xs.items()]


@pytest.mark.parametrize("wrong, cause", [
    (lambda m, x: block_right(m, x, softplus=False), "softplus on Δ is missing"),
    (lambda m, x: block_right(m, x, causal=False), "not causal"),
    (lambda m, x: block_right(m, x, transpose_B=False), "transposed B"),
])
def test_mamba_block_wrong_answers_fail_with_their_cause(block_cases, wrong, cause, capsys):
    assert checks.check_mamba_block(block_right, block_cases) is block_right
    checks.check_mamba_block(wrong, block_cases)
    status, out = verdict(capsys)
    assert status == "fail" and cause in out


def step_right(mixer, x, conv_state, ssm_state, *, in_place=True, roll_right=False):
    xs, z = mixer.in_proj(x).chunk(2, dim=-1)
    window = torch.cat([xs[..., None], conv_state[..., :-1]], -1) if roll_right \
        else torch.cat([conv_state[..., 1:], xs[..., None]], -1)
    u = mixer.act((window * mixer.conv1d.weight[:, 0]).sum(-1) + mixer.conv1d.bias)
    r, n = mixer.time_step_rank, mixer.ssm_state_size
    dt, B, C = torch.split(mixer.x_proj(u), [r, n, n], dim=-1)
    dt = F.softplus(mixer.dt_proj(dt).float())
    h = torch.exp(dt[..., None] * -torch.exp(mixer.A_log.float())) * ssm_state \
        + (dt * u.float())[..., None] * B.float()[:, None, :]
    if in_place:
        conv_state.copy_(window)
        ssm_state.copy_(h)
    y = (h @ C.float()[..., None])[..., 0] + mixer.D * u
    return mixer.out_proj((y * F.silu(z.float())).to(x.dtype))


@pytest.fixture(scope="module")
def step_records(mamba):
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(5))
    return list(hooks.record_decode_step(mamba, ids, [0, 1]).values())


@pytest.mark.parametrize("wrong, cause", [
    (lambda *a: step_right(*a, in_place=False), "not updated in place"),
    (lambda *a: step_right(*a, roll_right=True), "shifted the wrong way"),
])
def test_mamba_step_wrong_answers_fail_with_their_cause(step_records, wrong, cause, capsys):
    assert checks.check_mamba_step(step_right, step_records) is step_right
    checks.check_mamba_step(wrong, step_records)
    status, out = verdict(capsys)
    assert status == "fail" and cause in out


def test_mamba_step_stand_in_is_effarchs_step(step_records, capsys):
    from effarch.mixer import mixer_step

    def stub(*args):
        raise NotImplementedError("Exercise")

    assert checks.check_mamba_step(stub, step_records) is mixer_step
    assert verdict(capsys)[0] == "skip"
