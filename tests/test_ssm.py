"""effarch.ssm: the reference scan against transformers, and every other scan against the reference."""

import inspect
import itertools

import pytest
import torch
import torch.nn.functional as F

from effarch import ssm

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}
SCANS = [ssm.selective_scan_sequential, ssm.selective_scan_parallel]


def make_inputs(b=2, d=4, length=7, n=3, dtype=torch.float32, bc="bnl", seed=0):
    """Random scan inputs in mamba-ssm's layout; A < 0 as in Mamba (A = -exp(A_log))."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    l = length  # noqa: E741 (the paper's letter)
    bc_shape = {"bnl": (b, n, l), "bgnl": (b, 2, n, l), "dn": (d, n)}[bc]
    return dict(
        u=r(b, d, l).to(dtype), delta=r(b, d, l).to(dtype), A=-torch.exp(r(d, n)),
        B=r(*bc_shape).to(dtype), C=r(*bc_shape).to(dtype), D=r(d), z=r(b, d, l).to(dtype),
        delta_bias=r(d),
    )


def assert_close(actual, expected, dtype=torch.float32):
    torch.testing.assert_close(actual.float(), expected.float(), **TOL[dtype])


# ---------------------------------------------------------------- reference against transformers
def transformers_scan():
    try:
        from transformers.models.mamba.modeling_mamba import mamba_selective_scan
    except ImportError:
        pytest.skip("this transformers has no module-level mamba_selective_scan (added in transformers 5)")
    # the hub-kernel decorator may route to mamba-ssm's CUDA kernel: test the PyTorch function it wraps
    return getattr(mamba_selective_scan, "__wrapped__", mamba_selective_scan)


@pytest.mark.parametrize("use_mambapy", [False, True])
def test_ref_matches_transformers_scan(use_mambapy):
    scan = transformers_scan()
    if use_mambapy:
        pytest.importorskip("mambapy", reason="mambapy not installed: transformers falls back to its loop")
    x = make_inputs(length=11)
    extra = {"use_mambapy": use_mambapy} if "use_mambapy" in inspect.signature(scan).parameters else {}
    args = [x[k] for k in ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]]  # its names differ
    expected, expected_state = scan(*args, delta_softplus=True, return_last_state=True, **extra)
    out, state = ssm.selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
    assert_close(out, expected)
    assert_close(state, expected_state)


def test_ref_matches_mamba_mixer_forward():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.MambaConfig(hidden_size=32, state_size=8, num_hidden_layers=1, vocab_size=64)
    mixer = transformers.MambaForCausalLM(config).backbone.layers[0].mixer.eval()
    hidden = torch.randn(2, 9, 32)  # (b, l, hidden)
    with torch.no_grad():
        expected = mixer(hidden)
        # Algorithm 2 with the mixer's weights, written out independently of effarch.hooks
        x, z = F.linear(hidden, mixer.in_proj.weight, mixer.in_proj.bias).transpose(1, 2).chunk(2, 1)
        k = mixer.conv1d.weight.shape[-1]
        x = F.silu(F.conv1d(F.pad(x, (k - 1, 0)), mixer.conv1d.weight, mixer.conv1d.bias,
                            groups=x.shape[1]))  # (b, d, l), causal
        dt, B, C = (x.transpose(1, 2) @ mixer.x_proj.weight.T).split(
            [mixer.time_step_rank, config.state_size, config.state_size], dim=-1)
        delta = (dt @ mixer.dt_proj.weight.T).transpose(1, 2)  # (b, d, l), bias added by the scan
        y = ssm.selective_scan_ref(x, delta, -torch.exp(mixer.A_log), B.transpose(1, 2),
                                   C.transpose(1, 2), mixer.D, z, mixer.dt_proj.bias, True)
        out = F.linear(y.transpose(1, 2), mixer.out_proj.weight, mixer.out_proj.bias)
    assert_close(out, expected)


# ---------------------------------------------------------------- other scans against the reference
@pytest.mark.parametrize("scan", SCANS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("length", [1, 2, 7, 64, 100])
def test_scans_match_ref_at_any_length(scan, length):
    x = make_inputs(length=length)
    expected, expected_state = ssm.selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
    out, state = scan(**x, delta_softplus=True, return_last_state=True)
    assert out.shape == (2, 4, length) and state.shape == (2, 4, 3)
    assert_close(out, expected)
    assert_close(state, expected_state)


OPTIONS = list(itertools.product([False, True], repeat=4))  # D, z, delta_bias, softplus


@pytest.mark.parametrize("scan", SCANS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("use_D,use_z,use_bias,softplus", OPTIONS)
def test_scans_match_ref_with_every_option(scan, use_D, use_z, use_bias, softplus):
    x = make_inputs(length=9)
    x["delta"] = x["delta"].abs() if not softplus else x["delta"]  # Δ > 0 even without softplus
    for key, used in [("D", use_D), ("z", use_z), ("delta_bias", use_bias)]:
        if not used:
            x[key] = None
    if use_bias and not softplus:
        x["delta_bias"] = x["delta_bias"].abs()
    expected = ssm.selective_scan_ref(**x, delta_softplus=softplus)
    assert_close(scan(**x, delta_softplus=softplus), expected)


@pytest.mark.parametrize("scan", SCANS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("bc", ["bgnl", "dn"])
def test_grouped_and_fixed_B_C(scan, bc):
    x = make_inputs(length=10, bc=bc)
    expected, expected_state = ssm.selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
    out, state = scan(**x, delta_softplus=True, return_last_state=True)
    assert_close(out, expected)
    assert_close(state, expected_state)


def test_grouped_B_C_equal_ungrouped_when_one_group_repeated():
    x = make_inputs(length=6)
    grouped = dict(x, B=x["B"][:, None].repeat(1, 2, 1, 1), C=x["C"][:, None].repeat(1, 2, 1, 1))
    assert_close(ssm.selective_scan_ref(**grouped), ssm.selective_scan_ref(**x))


def test_ref_is_the_recurrence_written_out():
    """h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t, y_t = C_t·h_t + D u_t, times silu(z_t) (eq. 2)."""
    x = make_inputs(b=1, d=2, length=3, n=2)
    delta = F.softplus(x["delta"] + x["delta_bias"][:, None])
    out = ssm.selective_scan_ref(**x, delta_softplus=True)
    for i in range(2):
        h = torch.zeros(2)
        for t in range(3):
            h = torch.exp(delta[0, i, t] * x["A"][i]) * h + delta[0, i, t] * x["B"][0, :, t] * x["u"][0, i, t]
            y = (x["C"][0, :, t] * h).sum() + x["D"][i] * x["u"][0, i, t]
            assert torch.allclose(out[0, i, t], y * F.silu(x["z"][0, i, t]), atol=1e-6)


@pytest.mark.parametrize("scan", SCANS, ids=lambda f: f.__name__)
def test_gradients_match_ref(scan):
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]

    def grads(fn):
        x = {k: v.clone().requires_grad_(True) for k, v in make_inputs(length=13).items()}
        out, state = fn(**x, delta_softplus=True, return_last_state=True)
        weight = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
        ((out * weight).sum() + state.square().sum()).backward()
        return [x[k].grad for k in names]

    for name, g, g_ref in zip(names, grads(scan), grads(ssm.selective_scan_ref), strict=True):
        assert g is not None, name
        torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("scan", [ssm.selective_scan_ref, *SCANS], ids=lambda f: f.__name__)
def test_bf16_inputs(scan):
    x = make_inputs(length=20, dtype=torch.bfloat16)
    out, state = scan(**x, delta_softplus=True, return_last_state=True)
    assert out.dtype == torch.bfloat16 and state.dtype == torch.float32
    x32 = {k: v.float() for k, v in x.items()}  # the same numbers, computed in float32
    expected, expected_state = ssm.selective_scan_ref(**x32, delta_softplus=True, return_last_state=True)
    assert_close(out, expected, torch.bfloat16)
    assert_close(state, expected_state)


def test_return_last_state_shapes():
    x = make_inputs(length=5)
    out = ssm.selective_scan_ref(**x)
    assert torch.is_tensor(out) and out.shape == (2, 4, 5)
    out2, state = ssm.selective_scan_ref(**x, return_last_state=True)
    assert torch.equal(out, out2) and state.shape == (2, 4, 3)


# ---------------------------------------------------------------- building blocks
@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("length", [1, 5, 16, 33])
def test_associative_scan_matches_loop(dim, length):
    g = torch.Generator().manual_seed(length)
    shape = [3, 4, 2]
    shape[dim] = length
    a, b = torch.rand(*shape, generator=g), torch.randn(*shape, generator=g)
    a_cum, h = ssm.associative_scan(a, b, dim=dim)
    a_, b_ = a.movedim(dim, 0), b.movedim(dim, 0)
    state, prod, hs, ps = torch.zeros_like(b_[0]), torch.ones_like(a_[0]), [], []
    for t in range(length):
        state, prod = a_[t] * state + b_[t], prod * a_[t]
        hs.append(state)
        ps.append(prod)
    assert_close(h, torch.stack(hs).movedim(0, dim))
    assert_close(a_cum, torch.stack(ps).movedim(0, dim))


def test_ssm_step_is_one_column_of_the_scan():
    x = make_inputs(length=4)
    delta = F.softplus(x["delta"])
    _, states, _ = ssm.selective_scan_states(x["u"], delta, x["A"], x["B"], x["C"])
    h, y = ssm.ssm_step(states[:, :, 2], x["u"][:, :, 3], delta[:, :, 3], x["A"], x["B"][:, :, 3], x["C"][:, :, 3])
    assert_close(h, states[:, :, 3])
    assert_close(y, (states[:, :, 3] * x["C"][:, None, :, 3]).sum(-1))


def test_discretize_shapes_and_values():
    x = make_inputs(length=5)
    delta = F.softplus(x["delta"])
    A_bar, B_bar = ssm.discretize(delta, x["A"], x["B"])
    assert A_bar.shape == B_bar.shape == (2, 4, 5, 3)
    assert ((A_bar > 0) & (A_bar <= 1)).all()  # A < 0, Δ > 0: the state decays
    assert_close(B_bar[1, 2, 3], delta[1, 2, 3] * x["B"][1, :, 3])


def test_exact_zoh_matches_matrix_formula_and_euler_for_small_steps():
    d, n = 3, 4
    A = -torch.linspace(0.5, 4, d * n, dtype=torch.float64).reshape(d, n)
    B = torch.randn(1, n, 1, dtype=torch.float64)
    delta = torch.tensor([0.3, 1.0, 2.0], dtype=torch.float64).reshape(1, d, 1)
    _, B_exact = ssm.discretize_zoh_exact(delta, A, B)
    for i in range(d):  # B̄ = (ΔA)^{-1} (exp(ΔA) - I) ΔB with A = diag(A_i)
        dA = torch.diag(delta[0, i, 0] * A[i])
        expected = torch.linalg.solve(dA, torch.linalg.matrix_exp(dA) - torch.eye(n, dtype=dA.dtype)) @ (
            delta[0, i, 0] * B[0, :, 0])
        torch.testing.assert_close(B_exact[0, i, 0].double(), expected, atol=1e-6, rtol=1e-5)
    small = torch.full((1, d, 1), 1e-4, dtype=torch.float64)
    torch.testing.assert_close(ssm.discretize_zoh_exact(small, A, B)[1], ssm.discretize(small, A, B)[1],
                               rtol=1e-3, atol=0)
    zero_A = torch.zeros(d, n)
    torch.testing.assert_close(ssm.discretize_zoh_exact(small.float(), zero_A, B.float())[1],
                               ssm.discretize(small.float(), zero_A, B.float())[1])


def test_bad_B_shape_is_a_clear_error():
    x = make_inputs()
    with pytest.raises(ValueError, match="B and C must be"):
        ssm.selective_scan_ref(**dict(x, B=torch.randn(7)))
