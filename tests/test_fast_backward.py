"""effarch.fast's Triton backward against autograd through the reference scan, and the training
opt-in ``use_fast_scan`` against transformers' own MambaMixer.

The kernel tests (``test_kernel_*``) run in Triton's interpreter (TRITON_INTERPRET=1, CPU); the
GPU has its own tests at the end. In a run without the interpreter, ``test_file_in_interpreter_mode`` runs this whole file again in a subprocess
with TRITON_INTERPRET=1, where ``use_fast_scan``'s tests go through the Triton kernels too.
Sizes are small (the interpreter runs a scan element by element) and chosen to cover the edges:
d=3 is two blocks of the interpreter's 2 channels (the second half empty), l=37 is three tiles of
16 steps (the last one padded), n=3 is padded to 4, b=2 sums dA, dD and dbias over rows.

Tolerances, float32: atol 1e-4, rtol 1e-4 (the kernel sums in another order than autograd;
seen: ≤ 1e-5 on gradients of size ~10). bf16 inputs: relative error of each gradient's norm ≤ 2e-2.
"""

import contextlib
import os
import subprocess
import sys

import pytest
import torch
from transformers import (
    FalconMambaConfig,
    FalconMambaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MambaConfig,
    MambaForCausalLM,
)

from effarch import fast, ssm

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1" and fast.triton_available()
kernel = pytest.mark.skipif(not INTERPRETING, reason="needs Triton's interpreter: "
                            "test_file_in_interpreter_mode runs it in a subprocess")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
TOL = dict(atol=1e-4, rtol=1e-4)


def _inputs(b=2, d=3, length=37, n=3, *, seed=0, device="cpu", delta_scale=1.0, a_scale=1.0):
    """u, B, C and z are transposed views of (b, l, ·) tensors, as a mixer passes them."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    t = dict(u=r(b, length, d).transpose(1, 2),
             delta=(torch.rand(b, d, length, generator=g) - 0.3) * delta_scale,
             A=-torch.exp(r(d, n) * 0.5) * a_scale, B=r(b, length, n).transpose(1, 2),
             C=r(b, length, n).transpose(1, 2), D=r(d), z=r(b, length, d).transpose(1, 2),
             delta_bias=r(d) * 0.1)
    return {k: v.to(device) for k, v in t.items()}


def _grads(fn, t, options, *, w_out=None, w_last=None, **kw):
    """Gradients of sum(out·w_out) + sum(last·w_last) for every tensor ``fn`` takes."""
    used = {k: v.clone().requires_grad_(True) for k, v in t.items()
            if k in ("u", "delta", "A", "B", "C") or options.get(k)}
    out, last = fn(**used, delta_softplus=bool(options.get("delta_softplus")),
                   return_last_state=True, **kw)
    loss = 0.0
    if w_out is not None:
        loss = loss + (out.float() * w_out).sum()
    if w_last is not None:
        loss = loss + (last * w_last).sum()
    loss.backward()
    return {k: v.grad for k, v in used.items()}


def _weights(t, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(t["u"].shape, generator=g).to(t["u"].device),
            torch.randn(t["u"].shape[0], *t["A"].shape, generator=g).to(t["u"].device))


def _assert_grads_close(got, want, **tol):
    assert got.keys() == want.keys()
    for k in want:
        if want[k] is None:  # not on the loss's path (C when only the last state counts)
            assert got[k] is None or not got[k].any(), k
            continue
        assert got[k] is not None and got[k].shape == want[k].shape, k
        torch.testing.assert_close(got[k], want[k], **(tol or TOL), msg=lambda m, k=k: f"{k}: {m}")


# --- the kernel -------------------------------------------------------------------------------

# every flag on its own somewhere; all together in test_kernel_every_input_both_reverse_scans
OPTIONS = {"plain": {}, "D and z": dict(D=True, z=True),
           "bias and softplus": dict(delta_bias=True, delta_softplus=True)}


@kernel
@pytest.mark.parametrize("name", OPTIONS)
def test_kernel_gradients_match_autograd_through_the_reference(name):
    t = _inputs()
    w_out, w_last = _weights(t)
    want = _grads(ssm.selective_scan_ref, t, OPTIONS[name], w_out=w_out, w_last=w_last)
    got = _grads(fast.selective_scan_triton_autograd, t, OPTIONS[name], w_out=w_out,
                 w_last=w_last)
    _assert_grads_close(got, want)


@kernel
@pytest.mark.parametrize("reverse", [True, False])
def test_kernel_every_input_both_reverse_scans(reverse):
    """All of D, z, delta_bias and softplus, through both ways the kernel scans backward. Some
    Δ are past softplus's threshold of 20, where the forward switches to the identity (the
    gradient, 1 there, equals sigmoid's to float32 precision: that branch is not told apart)."""
    t = _inputs()
    t["delta"][:, :2, 5:9] += 25.0
    w_out, w_last = _weights(t)
    opts = dict(D=True, z=True, delta_bias=True, delta_softplus=True)
    want = _grads(ssm.selective_scan_ref, t, opts, w_out=w_out, w_last=w_last)
    grads = fast.selective_scan_triton_backward(*t.values(), True, w_out, w_last,
                                                reverse=reverse)
    _assert_grads_close(dict(zip(NAMES, grads, strict=True)), want)
    assert fast.reverse_scan_works("cpu", 3)  # the interpreter's reverse scan composes right


@kernel
def test_kernel_long_memory_crosses_every_tile():
    """What a wrong reverse recurrence gets wrong: with Ā ≈ 1 (small Δ·|A|) the loss on the
    last tile and the last state reaches back to the first tile, so an adjoint that drops its
    carry between tiles, takes it from the wrong end, or restarts pass 2 from zero states
    is off by O(1) here, not only next to tile borders."""
    t = _inputs(delta_scale=0.1, a_scale=0.05, seed=3)
    w_out, w_last = _weights(t)
    w_out[..., :32] = 0.0  # only the last (partial) tile's outputs count
    want = _grads(ssm.selective_scan_ref, t, {}, w_out=w_out, w_last=w_last)
    first_tile = want["u"][..., :16].abs().amax()
    assert first_tile > 0.1 * want["u"].abs().amax()  # the case is sensitive, as meant
    got = _grads(fast.selective_scan_triton_autograd, t, {}, w_out=w_out, w_last=w_last)
    _assert_grads_close(got, want)


@kernel
def test_kernel_only_the_last_state_or_only_the_output():
    t = _inputs(b=1, length=20)
    w_out, w_last = _weights(t)
    for weights in (dict(w_last=w_last), dict(w_out=w_out)):  # the other gradient is None
        want = _grads(ssm.selective_scan_ref, t, {}, **weights)
        _assert_grads_close(_grads(fast.selective_scan_triton_autograd, t, {}, **weights), want)


@kernel
def test_kernel_bf16_inputs_through_selective_scan():
    """A bf16 model's call (u, Δ, B, C, z bf16; A, D, bias float32) through the public entry
    point with backend='auto', which picks Triton for gradients where Triton runs."""
    t = _inputs(length=20)
    low = {k: (v.bfloat16() if k in ("u", "delta", "B", "C", "z") else v) for k, v in t.items()}
    opts = dict(D=True, z=True, delta_bias=True, delta_softplus=True)
    w_out, w_last = _weights(t)
    want = _grads(ssm.selective_scan_ref, low, opts, w_out=w_out, w_last=w_last)
    leaves = {k: v.clone().requires_grad_(True) for k, v in low.items()}
    out, last = fast.selective_scan(**leaves, delta_softplus=True, return_last_state=True)
    assert type(out.grad_fn).__name__ == "_TritonScanFunctionBackward"
    ((out.float() * w_out).sum() + (last * w_last).sum()).backward()
    for k in want:
        assert leaves[k].grad.dtype == low[k].dtype, k
        err = (leaves[k].grad.float() - want[k].float()).norm() / want[k].float().norm()
        assert err < 2e-2, (k, err.item())


# --- the training opt-in ----------------------------------------------------------------------


def _tiny_mamba(seed=0, layers=1):
    torch.manual_seed(seed)
    cfg = MambaConfig(hidden_size=16, state_size=4, num_hidden_layers=layers, vocab_size=64,
                      intermediate_size=4, time_step_rank=4)
    return MambaForCausalLM(cfg)


def _train_step(model, ids, ctx):
    model.zero_grad(set_to_none=True)
    with ctx:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_use_fast_scan_trains_lora_adapters_like_transformers():
    """One backward through transformers' mixer and one through the opt-in: the same loss and
    the same gradients on LoRA adapters of in_proj and x_proj (atol 1e-5, rtol 1e-4; both
    paths are float32). An adapter on dt_proj gets none on either path (the mixer reads
    dt_proj.weight), so the two paths agree on what trains."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny_mamba(layers=2), LoraConfig(
        r=2, target_modules=["in_proj", "x_proj", "dt_proj"], init_lora_weights=False))
    model.train()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    loss_hf, grads_hf = _train_step(model, ids, contextlib.nullcontext())
    with fast.use_fast_scan(model) as routing:
        loss_fast, grads_fast = _train_step(model, ids, contextlib.nullcontext())
    assert routing.calls == routing.mixers == 2
    torch.testing.assert_close(loss_fast, loss_hf, atol=1e-6, rtol=1e-6)
    lora = [n for n in grads_hf if "lora_" in n]
    assert len(lora) == 2 * 3 * 2  # A and B, three targets, two layers
    for name in lora:
        if ".dt_proj." in name:
            assert grads_hf[name] is None and grads_fast[name] is None, name
            continue
        assert grads_hf[name].abs().sum() > 0, name
        torch.testing.assert_close(grads_fast[name], grads_hf[name], atol=1e-5, rtol=1e-4,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_use_fast_scan_trains_every_weight_like_transformers():
    """Full fine-tuning: every parameter's gradient through the opt-in equals transformers'
    (A_log, D, dt_proj's bias, conv1d and the projections included: a scan that dropped D's or
    the bias's gradient, or detached Δ, fails here). Chunked on a CPU; the Triton backward when
    this file reruns under the interpreter (test_file_in_interpreter_mode)."""
    model = _tiny_mamba(layers=2).train()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    loss_hf, grads_hf = _train_step(model, ids, contextlib.nullcontext())
    with fast.use_fast_scan(model) as routing:
        loss_fast, grads_fast = _train_step(model, ids, contextlib.nullcontext())
    assert routing.calls == 2
    torch.testing.assert_close(loss_fast, loss_hf, atol=1e-6, rtol=1e-6)
    mixer_params = [n for n in grads_hf if ".mixer." in n]
    assert {n.rsplit(".mixer.", 1)[1] for n in mixer_params} >= {
        "A_log", "D", "dt_proj.bias", "dt_proj.weight", "conv1d.weight", "in_proj.weight",
        "x_proj.weight", "out_proj.weight"}
    for name, g in grads_hf.items():
        assert g is not None and grads_fast[name] is not None, name
        torch.testing.assert_close(grads_fast[name], g, atol=1e-5, rtol=1e-4,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_use_fast_scan_restores_the_mixers_even_after_an_exception():
    model = _tiny_mamba().eval()
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(2))
    mixer = model.backbone.layers[0].mixer
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        with fast.use_fast_scan(model, backend="chunked") as routing:
            assert "forward" in vars(mixer)
            torch.testing.assert_close(model(ids, use_cache=False).logits, ref, atol=1e-5,
                                       rtol=1e-5)
        assert routing.calls == 1 and "forward" not in vars(mixer)
        with pytest.raises(RuntimeError, match="inside"):
            with fast.use_fast_scan(model):
                raise RuntimeError("inside the block")
        assert "forward" not in vars(mixer)
        assert torch.equal(model(ids, use_cache=False).logits, ref)  # transformers' own path
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_use_fast_scan_leaves_generation_to_transformers():
    model = _tiny_mamba().eval()
    ids = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(4))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    ref = model.generate(ids, **kw)
    with fast.use_fast_scan(model) as routing:
        assert torch.equal(model.generate(ids, **kw), ref)
    assert routing.calls == 0  # every forward had a cache: transformers' own forward ran


def test_use_fast_scan_refuses_what_it_cannot_route():
    falcon = FalconMambaForCausalLM(FalconMambaConfig(hidden_size=16, state_size=4,
                                                      num_hidden_layers=1, vocab_size=64))
    with pytest.raises(TypeError, match="FalconMambaMixer.*section 'Fast Mamba training'"):
        with fast.use_fast_scan(falcon):
            pass
    assert all("forward" not in vars(m) for m in falcon.modules())
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         vocab_size=64))
    with pytest.raises(TypeError, match="no Mamba mixer"):
        with fast.use_fast_scan(llama):
            pass
    model = _tiny_mamba()
    with fast.use_fast_scan(model):
        with pytest.raises(TypeError, match="already"):
            with fast.use_fast_scan(model):
                pass
    with pytest.raises(ValueError, match="backend"):
        with fast.use_fast_scan(model, backend="magic"):
            pass


# --- the same file through Triton's interpreter; the GPU --------------------------------------


def test_file_in_interpreter_mode():
    if INTERPRETING:
        pytest.skip("already in interpreter mode: the kernel tests ran in this process")
    pytest.importorskip("triton", reason="Triton is not installed (dev extra on Linux)")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        __file__, "-k", "not in_interpreter_mode and not on_gpu"],
                       capture_output=True, text=True, env=env, timeout=600)
    if "only 0-dimensional arrays can be converted" in r.stdout:  # as in test_fast.py
        pytest.skip("this Triton's interpreter calls int() on a 1-element array, which NumPy 2 "
                    "refuses (later Triton squeezes it); the compiled kernel is unaffected")
    assert r.returncode == 0 and " passed" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]


@cuda
@pytest.mark.parametrize("reverse", [None, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [1, 63, 1000, 4099])
def test_triton_backward_on_gpu_matches_reference(dtype, length, reverse):
    """The first call autotunes the kernel: its atomics must not add up over the trials."""
    t = _inputs(b=2, d=96, length=length, n=16, device="cuda")
    low = {k: (v.to(dtype) if k in ("u", "delta", "B", "C", "z") else v) for k, v in t.items()}
    w_out, w_last = _weights(t)
    opts = dict(D=True, z=True, delta_bias=True, delta_softplus=True)
    want = _grads(ssm.selective_scan_ref, low, opts, w_out=w_out, w_last=w_last)
    got = dict(zip(NAMES, fast.selective_scan_triton_backward(
        *low.values(), True, w_out.to(dtype), w_last, reverse=reverse), strict=True))
    for k in want:
        if dtype == torch.float32:
            torch.testing.assert_close(got[k], want[k], atol=1e-3, rtol=1e-3)
        elif want[k].abs().max() == 0:  # e.g. A at length 1: no earlier state to decay
            assert got[k].float().abs().max() < 1e-4, (k, got[k].abs().max().item())
        else:
            err = (got[k].float() - want[k].float()).norm() / want[k].float().norm()
            assert err < 2e-2, (k, err.item())


@cuda
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_use_fast_scan_on_gpu_matches_transformers(backend):
    model = _tiny_mamba(layers=2).cuda().train()
    ids = torch.randint(0, 64, (2, 100), generator=torch.Generator().manual_seed(1)).cuda()
    loss_hf, grads_hf = _train_step(model, ids, contextlib.nullcontext())
    with fast.use_fast_scan(model, backend=backend) as routing:
        loss_fast, grads_fast = _train_step(model, ids, contextlib.nullcontext())
    assert routing.calls == 2
    torch.testing.assert_close(loss_fast, loss_hf, atol=1e-5, rtol=1e-5)
    for name, g in grads_hf.items():
        torch.testing.assert_close(grads_fast[name], g, atol=1e-4, rtol=1e-3)
