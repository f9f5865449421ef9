"""Tests of the effarch helpers labs 2.4.1 and 2.4.2 use: cache sizes (formula against the real
cache objects), the long document, the fast path under the benchmark protocol, and the plots."""

import json
import shutil
import sys
import types

import matplotlib
import pytest
import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

from effarch import bench, compat, data, decoding, fast, memory, plots

matplotlib.use("Agg")

SMALL = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=128),
    "phi": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, partial_rotary_factor=0.5,
                max_position_embeddings=128),
    "mixtral": dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=1, num_local_experts=4,
                    num_experts_per_tok=2, max_position_embeddings=128),
    "mamba": dict(hidden_size=32, num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4,
                  use_mambapy=False),
    "jamba": dict(hidden_size=32, intermediate_size=32, num_hidden_layers=4,
                  num_attention_heads=2, num_key_value_heads=1, num_experts=2,
                  num_experts_per_tok=1, expert_layer_period=2, expert_layer_offset=1,
                  attn_layer_period=4, attn_layer_offset=2, mamba_d_state=8, mamba_d_conv=4,
                  mamba_expand=2, use_mamba_kernels=False, max_position_embeddings=128),
}


def build(family: str, dtype=torch.bfloat16):
    torch.manual_seed(0)
    cfg = CONFIG_MAPPING[family](vocab_size=97, **SMALL[family])
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def real_cache(model, seq_len: int, batch: int) -> memory.CacheBytes:
    ids = torch.randint(0, 97, (batch, seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    return memory.measure_cache_bytes(compat.returned_cache(out))


@pytest.mark.parametrize("family", ["llama", "phi", "mixtral", "jamba"])
@pytest.mark.parametrize("seq_len,batch", [(1, 1), (13, 2)])
def test_kv_cache_formula_equals_the_real_cache(family, seq_len, batch):
    model = build(family)
    real = real_cache(model, seq_len, batch)
    assert real.key_value > 0
    assert memory.kv_cache_bytes(model.config, seq_len, batch, torch.bfloat16) == real.key_value


@pytest.mark.parametrize("family", ["mamba", "jamba"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_ssm_state_formula_equals_the_real_cache_at_any_length(family, dtype):
    model = build(family, dtype)
    for seq_len, batch in [(1, 1), (9, 3), (40, 1)]:
        real = real_cache(model, seq_len, batch)
        state_dtype = real.dtypes["ssm"]
        expected = memory.ssm_state_bytes(model.config, batch, dtype, state_dtype)
        assert real.conv + real.ssm == expected, (seq_len, batch, real)


def test_kv_cache_is_linear_and_zero_where_there_is_no_attention():
    cfg = CONFIG_MAPPING["llama"](**SMALL["llama"])
    assert memory.kv_cache_bytes(cfg, 2000, 3) == 2 * memory.kv_cache_bytes(cfg, 1000, 3)
    mamba = CONFIG_MAPPING["mamba"](**SMALL["mamba"])
    assert memory.kv_cache_bytes(mamba, 1000) == 0
    assert memory.ssm_state_bytes(cfg) == 0
    # phi-2: 2 (K, V) · 32 layers · 32 heads · 80 head_dim · 2 bytes per token
    from effarch import models

    assert memory.kv_cache_bytes(models.get_config("phi-2"), 1, 1, "bfloat16") == 327_680


def test_measure_cache_bytes_reads_older_cache_layouts():
    # transformers 5.17's MambaCache: per-layer lists, SSM state in the model's dtype
    old = types.SimpleNamespace(conv_states=[torch.zeros(1, 8, 4, dtype=torch.bfloat16)] * 2,
                                ssm_states=[torch.zeros(1, 8, 16, dtype=torch.bfloat16),
                                            torch.zeros(1, 8, 16, dtype=torch.bfloat16)])
    got = memory.measure_cache_bytes(old)
    assert (got.conv, got.ssm) == (1 * 8 * 4 * 2, 2 * 8 * 16 * 2)  # the shared tensor counts once
    assert got.dtypes == {"conv": "bfloat16", "ssm": "bfloat16"}
    legacy = tuple((torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4)) for _ in range(3))
    assert memory.measure_cache_bytes(legacy).key_value == 3 * 2 * 40 * 4
    lists = types.SimpleNamespace(key_cache=[torch.zeros(2, 3)], value_cache=[torch.zeros(2, 3)])
    assert memory.measure_cache_bytes(lists).total == 48


def test_returned_cache_and_decode_tokens_per_s():
    assert compat.returned_cache(types.SimpleNamespace(logits=None)) is None
    assert compat.returned_cache(types.SimpleNamespace(cache_params="c")) == "c"
    assert bench.decode_tokens_per_s(2.5, 0.5, 4, 101) == pytest.approx(200.0)


def test_long_document_is_checked(tmp_path, monkeypatch):
    doc = data.long_document()
    assert doc.domain == "code" and "public domain" in doc.text[:400]
    assert len(doc.text.encode("utf-8")) == 80_986
    bad = tmp_path / "long_document"
    shutil.copytree(data.long_document_dir(), bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    (bad / manifest["file"]).write_text("tampered")
    monkeypatch.setattr(data, "long_document_dir", lambda: bad)
    data.long_document.cache_clear()
    try:
        with pytest.raises(data.MissingDataError, match="sha256"):
            data.long_document()
    finally:
        data.long_document.cache_clear()


def test_context_sweep_of_the_fast_path_has_the_models_columns():
    model = build("mamba", torch.float32)
    gen = fast.MambaFastGenerator(model)
    kw = dict(lengths=[4, 8], new_tokens=3, warmup=0, repeats=1, progress=False)
    df = bench.context_sweep(gen, lambda n: bench.random_input_ids(97, n), **kw)
    ref = bench.context_sweep(model, **kw)
    assert list(df.columns) == list(ref.columns)
    assert df.prompt_length.tolist() == [4, 8] and df.skipped.isna().all()
    assert (df.mamba_path == gen.path).all() and gen.path.startswith("effarch fast path")


def test_fast_path_generates_what_transformers_generates():
    model = build("mamba", torch.float32)
    ids = bench.random_input_ids(97, 10)
    fast_tokens = fast.MambaFastGenerator(model).generate(ids, 6)[:, 10:]
    assert torch.equal(fast_tokens, decoding.greedy_decode(model, ids, 6))


def test_plots_name_the_device_and_label_the_axes():
    import pandas as pd

    figs = [plots.memory_vs_context([64, 128], {"a": [1e3, 2e3]}, device="cpu",
                                    memory_bytes=1e9)]
    frame = pd.DataFrame({"prompt_length": [64, 128], "decode_ms_per_token": [1.0, 1.1],
                          "decode_ms_per_token_iqr": [0.1, 0.1], "ttft_s": [0.01, 0.02],
                          "ttft_min_s": [0.009, 0.019], "ttft_max_s": [0.011, 0.021],
                          "skipped": [None, None]})
    for metric in ("decode_ms_per_token", "ttft_s"):
        figs.append(plots.latency_vs_context({"m": frame}, device="cpu", metric=metric))
    figs.append(plots.token_heatmap(torch.rand(3, 4), list("abcd"), device="cpu", title="t"))
    timing = bench.Timing.from_samples([0.1, 0.2])
    figs.append(plots.scan_timings([16, 32], {"s": [timing, timing]}, device="cpu"))
    for fig in figs:
        ax = fig.axes[0]
        assert plots.device_name("cpu") in ax.get_title()
        assert ax.get_xlabel() and ax.get_ylabel()
    assert plots.device_name("cpu").startswith("CPU (")


def test_format_bytes_and_token_labels():
    assert plots.format_bytes(1536) == "1.5 KiB"
    assert plots.format_bytes(0) == "0 B"
    assert plots.format_bytes(3 * 1024**3) == "3 GiB"
    tok = data.load_tokenizer()
    ids = tok("def f(x):\n\treturn x")["input_ids"]
    labels = plots.token_labels(tok, ids)
    assert len(labels) == len(ids) and all(labels)
    assert "".join(labels).replace("·", " ").replace("↵", "\n").replace("→", "\t") == \
        "def f(x):\n\treturn x"


def test_explore_draws_the_default_view_once(monkeypatch):
    calls = []

    def view(batch=1):
        calls.append(batch)

    plots.explore(view, batch=(1, 8))
    assert calls == [1]  # the widget does not draw a second time until a control moves
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # as if not installed
    plots.explore(view, batch=(1, 8))
    assert calls == [1, 1]


def test_block_diagram_draws_every_box():
    fig = plots.mamba_block_diagram()
    texts = [t.get_text() for t in fig.axes[0].texts]
    for part in ("in_proj", "conv1d", "x_proj", "dt_proj", "selective scan", "out_proj"):
        assert any(part in t for t in texts), part


def test_hide_inapplicable_warnings_says_what_it_hides(caplog):
    import logging

    lines = compat.hide_inapplicable_warnings(cuda=False)
    assert len(lines) == 2 and "mamba_ssm" in lines[1] and "gemm_4bit" in lines[0]
    log = logging.getLogger("transformers.integrations.hub_kernels")
    with caplog.at_level(logging.WARNING, logger=log.name):
        log.warning("`selective_scan_fn` is falling back to its reference PyTorch implementation")
        log.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]
    assert len(compat.hide_inapplicable_warnings(cuda=False)) == 2  # idempotent
    assert sum(type(f).__name__ == "_DropMatching" for f in log.filters) == 1
    assert len(compat.hide_inapplicable_warnings(cuda=True)) == 1  # with CUDA the advice can apply


def test_conv_state_reads_both_cache_layouts():
    model = build("mamba", dtype=torch.float32)
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = compat.returned_cache(model(input_ids=ids, use_cache=True))
    state = compat.conv_state(cache, 1)
    assert tuple(state.shape) == (2, 64, 4)
    legacy = types.SimpleNamespace(conv_states=[None, state])  # 5.17's MambaCache lists
    assert compat.conv_state(legacy, 1) is state


def test_mixer_step_is_transformers_decode_step():
    from effarch import hooks, mixer

    model = build("mamba", dtype=torch.float32)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    for rec in hooks.record_decode_step(model, ids, [0, 1]).values():
        conv, state = rec.conv_state.clone(), rec.ssm_state.clone()
        with torch.no_grad():
            out = mixer.mixer_step(rec.mixer, rec.x, conv, state)
        torch.testing.assert_close(out, rec.output)
        torch.testing.assert_close(conv, rec.new_conv_state)
        torch.testing.assert_close(state, rec.new_ssm_state)
        assert not torch.equal(rec.ssm_state, rec.new_ssm_state)  # the step did change it
