"""Tests of effarch.bench: behaviour only — no test asserts a wall-clock time.

Models are tiny and random (hidden 64, 2 layers, vocabulary 256), built from configs."""

from __future__ import annotations

import math
import types

import pytest
import torch

from effarch import backends, bench, compat, decoding, quality

transformers = pytest.importorskip("transformers")

VOCAB = 256
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB)


def _tiny(name: str, **kw):
    torch.manual_seed(0)
    if name == "llama":
        model = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**COMMON, max_position_embeddings=64, **kw))
    elif name == "mamba":
        model = transformers.MambaForCausalLM(transformers.MambaConfig(
            hidden_size=64, num_hidden_layers=2, vocab_size=VOCAB, state_size=8, **kw))
    elif name == "mixtral":
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
            **COMMON, num_local_experts=4, num_experts_per_tok=2, **kw))
    elif name == "jamba":
        model = transformers.JambaForCausalLM(transformers.JambaConfig(
            **COMMON, num_experts=4, num_experts_per_tok=2, attn_layer_period=2,
            attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8,
            mamba_dt_rank=8, **kw))
    else:
        raise KeyError(name)
    model.generation_config.eos_token_id = None  # generate() must run to max_new_tokens
    model.generation_config.pad_token_id = 0
    return model.eval()


@pytest.fixture(scope="module")
def llama():
    return _tiny("llama")


@pytest.fixture(scope="module")
def mamba():
    return _tiny("mamba")


def _ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return bench.random_input_ids(VOCAB, length, batch_size=batch, seed=seed)


# ---------------------------------------------------------------- decode loop against generate()

@pytest.mark.parametrize("name", ["llama", "mamba", "mixtral", "jamba"])
def test_greedy_decode_matches_generate(name):
    model = _tiny(name)
    ids = _ids(2, 7)  # (b, l)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a left-padded row: the mask and the positions must follow generate()
    for attention_mask in (None, mask):
        ours = decoding.greedy_decode(model, ids, 6, attention_mask=attention_mask)
        ref = model.generate(ids, attention_mask=attention_mask, max_new_tokens=6,
                             do_sample=False)[:, ids.shape[1]:]
        assert ours.shape == (2, 6)
        assert torch.equal(ours, ref), (name, attention_mask is not None)


# ---------------------------------------------------------------- timing with a fake clock

class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class CountingModel(torch.nn.Module):
    """Predicts last token + 1; a prefill costs 1 s and a decode step 0.1 s of the fake clock."""

    def __init__(self, clock: FakeClock):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.clock, self.prefills, self.steps = clock, 0, 0

    def forward(self, input_ids, attention_mask=None, cache=None, use_cache=None):
        if cache is None:
            self.prefills += 1
            self.clock.now += 1.0
            cache = {"length": 0}
        else:
            self.steps += 1
            self.clock.now += 0.1
        cache["length"] += input_ids.shape[1]
        logits = torch.nn.functional.one_hot((input_ids + 1) % VOCAB, VOCAB).float()
        return types.SimpleNamespace(logits=logits, cache=cache)


@pytest.mark.parametrize("sync_every_token", [True, False])
def test_decode_rate_counts_generated_tokens_only(monkeypatch, sync_every_token):
    clock = FakeClock()
    monkeypatch.setattr(bench, "_clock", clock)
    model = CountingModel(clock)
    ids = torch.full((3, 10), 5)  # (b, l)
    res = bench.measure_generation(model, ids, new_tokens=5, warmup=1, repeats=2,
                                   sync_every_token=sync_every_token)
    assert model.prefills == 3 and model.steps == 3 * 4  # warm-up + repeats; n − 1 steps each
    assert (res.batch_size, res.prompt_length, res.new_tokens, res.repeats) == (3, 10, 5, 2)
    assert res.ttft_s == pytest.approx(1.0)  # the prefill, and only it
    assert res.decode_s == pytest.approx(0.4)  # 4 steps after the first token: no prefill in it
    assert res.decode_tokens_per_s == pytest.approx(3 * 4 / 0.4)
    assert res.decode_ms_per_token == pytest.approx(100.0)
    assert res.prefill_tokens_per_s == pytest.approx(3 * 10 / 1.0)
    assert res.mamba_path == "n/a" and res.model_class == "CountingModel"
    assert decoding.greedy_decode(model, ids[:1], 4).tolist() == [[6, 7, 8, 9]]


def test_time_fn_excludes_warmup(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(bench, "_clock", clock)
    costs = iter([50.0, 50.0, 3.0, 1.0, 2.0, 5.0, 4.0])

    def fn():
        clock.now += next(costs)

    t = bench.time_fn(fn, warmup=2, repeats=5, device="cpu")
    assert t.samples == (3.0, 1.0, 2.0, 5.0, 4.0)
    assert (t.median, t.min, t.max, t.q1, t.q3, t.iqr) == (3.0, 1.0, 5.0, 2.0, 4.0, 2.0)
    assert t.stdev == pytest.approx(math.sqrt(2.5))


def test_timed_regions_run_without_the_garbage_collector():
    import gc

    seen = []
    bench.time_fn(lambda: seen.append(gc.isenabled()), warmup=1, repeats=3, device="cpu")
    assert seen == [True, False, False, False]  # warm-up untouched; timed calls without it

    class GcSpy(CountingModel):
        def forward(self, *args, **kw):
            seen.append(gc.isenabled())
            return super().forward(*args, **kw)

    seen.clear()
    bench.measure_generation(GcSpy(FakeClock()), torch.full((1, 4), 5), new_tokens=3,
                             warmup=0, repeats=2)
    assert seen == [False] * 6 and gc.isenabled()  # 2 × (prefill + 2 steps); then back on


def test_measure_generation_record(llama):
    res = bench.measure_generation(llama, _ids(1, 8), new_tokens=3, warmup=0, repeats=1,
                                   label="tiny llama")
    d = res.to_dict()
    assert d["label"] == "tiny llama" and d["model_class"] == "LlamaForCausalLM"
    assert d["device"] == "cpu" and d["dtype"] == "float32" and d["profile"]
    assert d["peak_memory_bytes"] is None or d["peak_memory_bytes"] >= 0
    frame = bench.results_frame([res, res])
    assert len(frame) == 2 and "decode_tokens_per_s" in frame.columns


# ---------------------------------------------------------------- context sweep

def test_context_sweep_skips_past_position_limit(llama):
    df = bench.context_sweep(llama, None, [8, 62], new_tokens=3, warmup=0, repeats=1,
                             progress=False)
    assert list(df["prompt_length"]) == [8, 62]
    assert df["skipped"].isna().iloc[0] and df["decode_tokens_per_s"].iloc[0] > 0
    assert "max_position_embeddings=64" in df["skipped"].iloc[1]
    assert math.isnan(df["ttft_s"].iloc[1])


def test_context_sweep_from_text(mamba):
    assert bench.position_limit(mamba) is None
    df = bench.context_sweep(mamba, None, [5, 12], tokenizer=ByteTokenizer(), text="abc",
                             new_tokens=2, warmup=0, repeats=1, progress=False)
    assert list(df["prompt_length"]) == [5, 12] and df["skipped"].isna().all()


# ---------------------------------------------------------------- perplexity

def _guide_nll(model, ids, max_length, stride):
    """The transformers perplexity guide's loop, with the model's own loss per window."""
    n, prev_end, nll_sum, count = ids.shape[1], 0, 0.0, 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        window = ids[:, begin:end]
        target = window.clone()
        target[:, : window.shape[1] - (end - prev_end)] = -100
        scored = int((target[:, 1:] != -100).sum())
        with torch.no_grad():
            nll_sum += model(window, labels=target).loss.item() * scored
        count, prev_end = count + scored, end
        if end == n:
            break
    return nll_sum / count, count


def test_perplexity_plain_chunks(llama):
    ids = _ids(1, 40)  # (1, N)
    res = quality.sliding_window_perplexity(llama, ids, max_length=16, stride=16)
    chunks = [ids[:, i:i + 16] for i in range(0, 40, 16)]
    with torch.no_grad():
        total = sum(llama(c, labels=c).loss.item() * (c.shape[1] - 1) for c in chunks)
    assert res.tokens_scored == 40 - len(chunks) and res.windows == len(chunks)
    assert res.nll_per_token == pytest.approx(total / res.tokens_scored, abs=1e-5)


@pytest.mark.parametrize("name", ["llama", "mamba"])
def test_perplexity_full_window_equals_model_loss(name, request):
    model = request.getfixturevalue(name)
    ids = _ids(1, 40)
    res = quality.sliding_window_perplexity(model, ids, max_length=64, stride=16)
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert res.tokens_scored == 39 and res.windows == 1
    assert res.nll_per_token == pytest.approx(loss, abs=1e-5)
    assert res.perplexity == pytest.approx(math.exp(loss), rel=1e-5)
    assert res.bits_per_token == pytest.approx(loss / math.log(2), abs=1e-5)


def test_perplexity_overlapping_windows_score_each_token_once(llama):
    ids = _ids(1, 40)
    res = quality.sliding_window_perplexity(llama, ids, max_length=16, stride=5)
    nll, count = _guide_nll(llama, ids, 16, 5)
    assert res.tokens_scored == count == 39
    assert res.nll_per_token == pytest.approx(nll, abs=1e-5)


def test_perplexity_rejects_bad_arguments(llama):
    with pytest.raises(ValueError):
        quality.sliding_window_perplexity(llama, _ids(1, 20), max_length=8, stride=9)
    with pytest.raises(ValueError):
        quality.sliding_window_perplexity(llama, _ids(2, 20), max_length=8, stride=4)


class ByteTokenizer:
    """Stands in for a tokenizer: one token per UTF-8 byte."""

    def __call__(self, text):
        return {"input_ids": list(text.encode("utf-8"))}


def test_bits_per_byte():
    assert quality.bits_per_byte(math.log(2), 10, 5) == pytest.approx(2.0)
    assert quality.bits_per_byte(1.0, 300, 1000) == pytest.approx(300 / math.log(2) / 1000)
    with pytest.raises(ValueError):
        quality.bits_per_byte(1.0, 3, 0)


def test_evaluate_text(llama):
    text = "def f(x):\n    return x + 1  # é\n" * 2
    res = quality.evaluate_text(llama, ByteTokenizer(), text, max_length=32, stride=16)
    assert res.n_bytes == len(text.encode("utf-8"))
    assert res.tokens_scored == res.n_bytes - 1
    assert res.bits_per_byte == pytest.approx(
        res.nll_per_token * res.tokens_scored / math.log(2) / res.n_bytes)


# ---------------------------------------------------------------- Mamba path

def test_mamba_path(llama, mamba):
    assert backends.mamba_path(llama) == "n/a"
    assert backends.mamba_path(mamba) == "sequential fallback"  # no mamba-ssm on the test machine
    if backends.available_mamba_paths()["mambapy parallel scan"]:
        assert backends.mamba_path(_tiny("mamba", use_mambapy=True)) == "mambapy parallel scan"
    from effarch.fast import MambaFastGenerator

    gen = MambaFastGenerator(_tiny("mamba"), use_graph=False)
    assert gen.mamba_path.startswith("effarch fast path")
    # the protocol reads each decoder's own path: no test of which kind of model it holds
    assert decoding.as_decoder(gen).mamba_path == gen.path
    assert decoding.as_decoder(mamba).mamba_path == "sequential fallback"


def test_mamba_path_reads_transformers_kernel_binding(mamba, monkeypatch):
    from transformers.models.mamba import modeling_mamba

    # the installed wrapper is the one we read: bound to its PyTorch reference here
    assert compat.resolved_to_package(modeling_mamba.mamba_selective_scan) is False

    def bound(resolved):
        is_new_implementation = resolved

        def wrapped(*args, **kwargs):
            return is_new_implementation
        return wrapped

    monkeypatch.setattr(modeling_mamba, "mamba_selective_scan", bound(True))
    assert backends.mamba_path(mamba) == "mamba-ssm kernels"


def test_available_mamba_paths():
    paths = backends.available_mamba_paths()
    assert paths["sequential fallback"] is True
    assert set(backends.MAMBA_PATHS) - {"n/a"} <= set(paths)


def test_compare_timings_and_spread():
    fast, slow = (bench.Timing.from_samples(s) for s in ([1.0, 1.1, 1.2], [2.0, 2.1, 2.2]))
    wide = bench.Timing.from_samples([1.0, 1.5, 3.0])
    assert bench.compare_timings(fast, slow) == "faster"
    assert bench.compare_timings(slow, fast) == "slower"
    assert bench.compare_timings(wide, slow) == "indistinguishable"
    assert wide.relative_spread == pytest.approx(2 / 1.5)


def test_spread_warnings_name_the_noisy_rows():
    import pandas as pd

    frame = pd.DataFrame({"label": ["m", "m", "m"], "model_class": ["X"] * 3,
                          "prompt_length": [64, 128, 256], "skipped": [None, None, "too long"],
                          "ttft_s": [1.0, 1.0, float("nan")], "ttft_min_s": [0.9, 0.5, float("nan")],
                          "ttft_max_s": [1.1, 2.0, float("nan")],
                          "decode_ms_per_token": [10.0, 10.0, float("nan")],
                          "decode_ms_per_token_iqr": [1.0, 20.0, float("nan")]})
    lines = bench.spread_warnings(frame)
    assert len(lines) == 2 and all("m at 128 tokens" in line for line in lines)


def test_copy_bandwidth_is_positive():
    assert bench.copy_bandwidth("cpu", nbytes=2**20) > 0


def test_copy_bandwidth_best_is_the_best_of_the_sizes(monkeypatch):
    rates = {2**20: 3.0, 2**21: 5.0, 2**22: 4.0}  # bytes/s per size, as copy_bandwidth gives
    monkeypatch.setattr(bench, "copy_bandwidth", lambda device, nbytes: rates[nbytes])
    best, each = bench.copy_bandwidth_best("cpu", sizes=tuple(rates))
    assert best == 5.0 and sorted(each.values()) == [3.0, 4.0, 5.0] and len(each) == 3


def test_time_prefill_decode_with_a_fake_clock(llama):
    from effarch import checks

    decoder = checks.FakeDecoder([5.0, 0.1, 0.3, 0.2], [1.0, 0.01, 0.03, 0.02])
    ids = torch.zeros(2, 3, dtype=torch.long)
    ttft, step = bench.time_prefill_decode(decoder, ids, new_tokens=4, warmup=1, repeats=3,
                                           clock=decoder.device.clock,
                                           synchronize=decoder.device.synchronize)
    assert ttft == pytest.approx(0.2) and step == pytest.approx(0.02)


def test_batch_sweep_rows(llama):
    frame = bench.batch_sweep(llama, [1, 2], prompt_length=5, new_tokens=3, repeats=1,
                              progress=False)
    assert list(frame.batch_size) == [1, 2]
    assert (frame.decode_tokens_per_s > 0).all() and frame.skipped.isna().all()
    assert (frame.ms_per_step > 0).all() and (frame.decode_spread >= 0).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="generate() compiles with CUDA graphs")
def test_static_cache_decode_on_gpu(llama):
    res = bench.measure_static_cache_decode(llama.cuda(), torch.randint(0, 97, (1, 8)),
                                            new_tokens=4, repeats=1)
    assert res.decode_tokens_per_s > 0


def test_transformers_mamba_path_predicts_the_built_models_path(mamba):
    path, why = backends.transformers_mamba_path(mamba.config)
    assert path == backends.mamba_path(mamba)
    assert why


def test_a_report_keeps_what_it_prints(tmp_path, capsys):
    report = bench.Report(width=10)
    report.row("prefill", 123.456, "tok/s", "note")
    report.row("decode", 7.0, "tok/s")
    assert "prefill" in capsys.readouterr().out
    report.save(tmp_path / "r.json", device="cpu")
    assert bench.kept_figure(tmp_path / "r.json", "decode") == 7.0
    with pytest.raises(KeyError, match="no row 'missing'"):
        bench.kept_figure(tmp_path / "r.json", "missing")
