"""The comparison harness of lab 2.4.5 (``effarch.compare``): its state bytes against lab 2.4.1's
formulas on the real zoo models, skipped rows, one model in memory at a time, the exact round
trip of a table, the crossover, the Pareto front and the guide computed from the tables."""

import gc
import math
import weakref

import pandas as pd
import pytest
import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

from effarch import compare, decoding, fast, memory, models

TEXT = "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n" * 8
ZOO = ("tiny-transformer", "tiny-mamba", "tiny-moe", "tiny-hybrid")


@pytest.fixture(scope="module")
def zoo_table():
    torch.set_num_threads(1)
    return compare.compare(ZOO, contexts=(8, 40), batch_sizes=(1, 3), new_tokens=3, repeats=2,
                           dtype=torch.float32, device="cpu", text=TEXT, progress=False)


def test_a_context_sweep_and_a_batch_sweep_in_one_call():
    assert compare._shapes((8, 40, 100), (1, 3, 5), (40,)) == (
        (1, 8), (1, 40), (1, 100), (3, 40), (5, 40))
    assert compare._shapes((8, 40), (1, 3), None) == ((1, 8), (1, 40), (3, 8), (3, 40))


# ------------------------------------------------------------------------ the harness, measured


def test_every_column_and_row_is_there(zoo_table):
    assert list(zoo_table.columns) == list(compare.COLUMNS)
    assert len(zoo_table) == len(ZOO) * 2 * 2
    assert zoo_table.attrs["skipped"] == []
    assert dict(zip(zoo_table.model, zoo_table.family, strict=True)) == {
        "tiny-transformer": "transformer", "tiny-mamba": "mamba", "tiny-moe": "moe",
        "tiny-hybrid": "hybrid"}
    assert set(zoo_table.dtype) == {"torch.float32"} and set(zoo_table.device) == {"cpu"}
    assert (zoo_table.decode_tok_s > 0).all() and (zoo_table.prefill_s > 0).all()
    assert (zoo_table.bits_per_byte > 0).all() and zoo_table.bits_per_byte.notna().all()


def test_state_bytes_equal_the_formulas_of_lab_241(zoo_table):
    for r in zoo_table.itertuples():
        cfg = models.get_config(r.model)
        assert r.state_bytes == r.kv_bytes + r.ssm_bytes
        assert r.kv_bytes == memory.kv_cache_bytes(cfg, r.context, r.batch_size, torch.float32)
        assert r.ssm_bytes == memory.ssm_state_bytes(cfg, r.batch_size, torch.float32, "float32")
        assert r.state_bytes == compare.expected_state_bytes(cfg, r.context, r.batch_size,
                                                             torch.float32), r
    mamba = zoo_table[zoo_table.model == "tiny-mamba"]
    assert mamba.groupby("batch_size").state_bytes.nunique().eq(1).all()  # fixed in the context


def test_parameters_and_weight_bytes_are_the_models(zoo_table):
    for r in zoo_table.drop_duplicates("model").itertuples():
        counts = memory.count_params(models.get_config(r.model))
        assert (r.total_params, r.active_params) == (counts.total, counts.active)
        assert r.weight_bytes == 4 * r.total_params  # float32, tied embeddings counted once
    moe = zoo_table[zoo_table.model == "tiny-moe"].iloc[0]
    assert moe.active_params < moe.total_params


def test_each_model_runs_on_its_best_path_here(zoo_table):
    paths = dict(zip(zoo_table.model, zoo_table.path, strict=True))
    assert paths["tiny-mamba"].startswith("effarch fast path")
    assert paths["tiny-transformer"] == "transformers eager, dynamic cache"  # no GPU here
    assert "Mamba layers" in paths["tiny-hybrid"]


def test_rows_past_the_position_limit_are_listed_not_measured():
    df = compare.compare(["tiny-transformer"], contexts=(8, 510), new_tokens=3, repeats=1,
                         dtype=torch.float32, device="cpu", text=TEXT, progress=False)
    assert df.context.tolist() == [8]
    (skip,) = df.attrs["skipped"]
    assert skip["model"] == "tiny-transformer" and skip["context"] == 510
    assert "max_position_embeddings=512" in skip["reason"]


def test_one_model_in_memory_at_a_time(monkeypatch):
    loaded: list[weakref.ref] = []
    real = models.load_model

    def load(name, **kw):
        gc.collect()
        alive = [r() for r in loaded if r() is not None]
        assert not alive, f"{len(alive)} earlier model(s) still in memory when loading {name}"
        lm = real(name, **kw)
        loaded.append(weakref.ref(lm.model))
        return lm

    monkeypatch.setattr(compare.models, "load_model", load)
    compare.compare(["tiny-mamba", "tiny-transformer", "tiny-mamba"], contexts=(8,),
                    new_tokens=2, repeats=1, dtype=torch.float32, device="cpu", text=TEXT,
                    progress=False)
    assert len(loaded) == 3


def test_fallback_names_transformers_path():
    df = compare.compare(["tiny-mamba"], contexts=(8,), new_tokens=2, repeats=1,
                         dtype=torch.float32, device="cpu", text=TEXT, fallback=True,
                         progress=False)
    assert df.path.iloc[0].startswith("transformers eager, dynamic cache; Mamba layers: ")
    assert "effarch" not in df.path.iloc[0]


def test_random_weights_have_no_quality():
    df = compare.compare(["tiny-transformer"], contexts=(8,), new_tokens=2, repeats=1,
                         weights="random", dtype=torch.float32, device="cpu", text=TEXT,
                         progress=False)
    assert math.isnan(df.bits_per_byte.iloc[0]) and df.weights.iloc[0] == "random"


@pytest.mark.parametrize("kw", [dict(contexts=()), dict(contexts=(8,), batch_sizes=(0,)),
                                dict(contexts=(8,), new_tokens=1),
                                dict(contexts=(8,), batch_sizes=(1, 2), batch_contexts=(0,))])
def test_bad_protocols_name_the_troubleshooting_section(kw):
    with pytest.raises(compare.CompareError, match="TROUBLESHOOTING.md, section 'Comparing"):
        compare.compare(["tiny-transformer"], text=TEXT, progress=False, **kw)


def test_family_of_real_configs():
    fam = {n: compare.family_of(models.get_config(n))
           for n in ("phi-2", "mamba-2.8b", "olmoe-1b-7b", "mixtral-8x7b", "jamba-v0.1")}
    assert fam == {"phi-2": "transformer", "mamba-2.8b": "mamba", "olmoe-1b-7b": "moe",
                   "mixtral-8x7b": "moe", "jamba-v0.1": "hybrid"}  # Jamba's MoE MLPs: hybrid


# ------------------------------------------------------------------------------ the decoders


def _small(family):
    torch.manual_seed(0)
    kw = {"llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16),
          "mixtral": dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=1, num_local_experts=4,
                          num_experts_per_tok=2)}[family]
    cfg = CONFIG_MAPPING[family](vocab_size=97, max_position_embeddings=128, **kw)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_static_cache_decoder_generates_what_generate_does(family):
    model = _small(family)
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(3))
    expected = decoding.greedy_decode(model, ids, 9)
    dec = compare.StaticCacheDecoder(model, max_cache_len=20)
    for _ in range(2):  # the second generation reuses the cache after a reset
        assert torch.equal(decoding.greedy_decode(dec, ids, 9), expected)
    assert torch.equal(decoding.greedy_decode(dec, ids[:1], 9), expected[:1])  # a new batch size
    with pytest.raises(compare.CompareError, match="shorter than 20"):
        dec.prefill(torch.zeros(1, 20, dtype=torch.long))


def test_best_decoder_on_a_cpu():
    dec, path = compare.best_decoder(_small("llama"), max_cache_len=32)
    assert isinstance(dec, decoding.TransformersDecoder) and "eager" in path
    mamba = models.load_model("tiny-mamba", dtype=torch.float32, device="cpu").model
    dec, path = compare.best_decoder(mamba, max_cache_len=32)
    assert isinstance(dec, fast.MambaFastGenerator) and path == dec.path
    dec, path = compare.best_decoder(mamba, max_cache_len=32, fallback=True)
    assert isinstance(dec, decoding.TransformersDecoder) and "Mamba layers" in path


# --------------------------------------------------------------------------- saving, loading


def test_save_and_load_round_trip_exactly(zoo_table, tmp_path):
    table = zoo_table.copy()
    table.attrs = {**zoo_table.attrs, "skipped": [{"model": "x", "context": 9, "batch_size": 1,
                                                   "reason": "r"}]}
    table.loc[0, "bits_per_byte"] = math.nan
    table.loc[1, "decode_tok_s"] = 1 / 3  # needs all 17 digits
    path = compare.save_results(table, tmp_path / "t.json")
    back = compare.load_results(path)
    pd.testing.assert_frame_equal(back, table, check_exact=True)
    assert back.attrs == table.attrs
    assert back.loc[1, "decode_tok_s"] == 1 / 3


def test_load_results_rejects_other_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"rows": []}')
    with pytest.raises(compare.CompareError, match="not a table written by"):
        compare.load_results(bad)
    with pytest.raises(compare.CompareError, match="Comparing models"):
        compare.load_results(tmp_path / "missing.json")


# ---------------------------------------------------------------- the crossover and the guide


def test_crossover_is_interpolated_in_log_context():
    # a − b: −20 at 512, +10 at 1024 → 2/3 of the way in log2: 2 ** (9 + 2/3)
    at = compare.crossover_context([256, 512, 1024, 2048], [100] * 4, [150, 120, 90, 60])
    assert at == pytest.approx(2 ** (9 + 2 / 3))
    assert compare.crossover_context([1, 2], [5, 5], [5, 4]) == pytest.approx(1.0)  # 0 then +1
    assert compare.crossover_context([64, 128], [10, 10], [20, 19]) is None  # never overtakes
    assert compare.crossover_context([64, 128], [30, 31], [20, 19]) is None  # ahead already
    assert compare.crossover_context([64, 128], [30, 10], [20, 19]) is None  # falls behind


def row(model, family, context, batch, *, rate, state, weights=1e6, active=None, total=1e6,
        bpb=1.0, iqr=1.0):
    return {"model": model, "family": family, "context": context, "batch_size": batch,
            "total_params": total, "active_params": active or total, "weight_bytes": weights,
            "state_bytes": state, "decode_tok_s": rate, "decode_tok_s_iqr": iqr,
            "bits_per_byte": bpb, "path": "p"}


def synthetic(rates_t=(150, 120, 90), rate_m=100, state_t=1000, moe_total=2e6):
    ctx = (256, 512, 1024)
    rows = [row("T", "transformer", c, 1, rate=r, state=state_t * c) for c, r in zip(ctx, rates_t, strict=True)]
    rows += [row("M", "mamba", c, 1, rate=rate_m, state=5000, bpb=1.1) for c in ctx]
    rows += [row("E", "moe", c, 1, rate=90, state=state_t * c, weights=4e6, active=0.5e6,
                 total=moe_total, bpb=1.05) for c in ctx]
    rows += [row(m, f, 256, 8, rate=r, state=s) for m, f, r, s in
             (("T", "transformer", 800, 8e6), ("M", "mamba", 600, 4e4), ("E", "moe", 500, 8e6))]
    return pd.DataFrame(rows)


def test_decode_crossover_reads_the_table_and_says_what_it_found():
    cross = compare.decode_crossover(synthetic(), "M", "T")
    assert cross.contexts == (256, 512, 1024) and cross.gaps == (-50, -20, 10)
    assert cross.context == pytest.approx(2 ** (9 + 2 / 3)) and "interpolated" in cross.sentence
    closing = compare.decode_crossover(synthetic(rates_t=(150, 130, 110)), "M", "T")
    assert closing.context is None and closing.trend_context == pytest.approx(2 ** 10.5)
    assert "extrapolation" in closing.sentence
    opening = compare.decode_crossover(synthetic(rates_t=(110, 130, 150)), "M", "T")
    assert opening.trend_context is None and "not closing" in opening.sentence
    ahead = compare.decode_crossover(synthetic(rates_t=(90, 80, 70)), "M", "T")
    assert ahead.context is None and "below 256" in ahead.sentence
    with pytest.raises(compare.CompareError, match="no measured rows of 'X'"):
        compare.decode_crossover(synthetic(), "X", "T")


def test_pareto_front():
    pts = [(1, 5), (2, 3), (3, 3), (4, 1), (float("nan"), 0)]
    assert compare.pareto_front(pts, maximize=(False, False)) == [True, True, False, True, False]
    assert compare.pareto_front(pts, maximize=(True, True)) == [True, False, True, True, False]


def test_guide_answers_follow_the_table():
    g = compare.guide(synthetic()).set_index("question").answer
    assert list(g.index) == list(compare.QUESTIONS)
    assert g["memory-bound long context"] == "M"
    assert g["throughput at batch"] == "T"
    assert g["quality per active parameter"] == "T"
    assert g["recall-heavy task"] == "not measured"
    # change the measurements and the answers change with them
    t = synthetic()
    t.loc[(t.model == "M") & (t.batch_size == 8), "decode_tok_s"] = 900
    t.loc[t.model == "T", "state_bytes"] = 10
    t.loc[t.model == "E", "bits_per_byte"] = 0.5
    g = compare.guide(t).set_index("question").answer
    assert g["throughput at batch"] == "M"
    assert g["memory-bound long context"] == "T"
    assert g["quality per active parameter"] == "E"


def test_the_guide_knows_an_moe_saves_compute_not_memory():
    # E has the fewest active parameters but the most weights resident: never the memory answer
    t = synthetic(moe_total=8e6)
    t.loc[t.model == "E", "state_bytes"] = 1
    answer = compare.choose_for_memory(t)
    assert answer.answer != "E"
    assert "saves compute per token, not memory" in answer.because


def test_guide_recall_question():
    recall = pd.DataFrame([
        {"model": "attention-d64", "arch": "attention", "d_state": 0, "num_pairs": 32,
         "accuracy": 0.99},
        {"model": "mamba-n4", "arch": "mamba", "d_state": 4, "num_pairs": 32, "accuracy": 0.2},
        {"model": "mamba-n64", "arch": "mamba", "d_state": 64, "num_pairs": 32, "accuracy": 0.93},
        {"model": "mamba-n64", "arch": "mamba", "d_state": 64, "num_pairs": 8, "accuracy": 1.0}])
    answer = compare.choose_for_recall(recall)
    assert answer.answer == "attention" and "d_state 64" in answer.because
    recall.loc[recall.model == "attention-d64", "accuracy"] = 0.5
    assert compare.choose_for_recall(recall).answer == "mamba"


# --------------------------------------------------------------------- the exercise checks


@pytest.fixture
def no_strict(monkeypatch):
    from effarch import checks

    monkeypatch.delenv("EFFARCH_STRICT", raising=False)
    checks.reset()
    yield checks
    checks.reset()


def _split(zoo_table, name="tiny-hybrid"):
    first = zoo_table[zoo_table.model != name].reset_index(drop=True)
    first.attrs = {**zoo_table.attrs, "skipped": []}
    added = zoo_table[zoo_table.model == name].reset_index(drop=True)
    added.attrs = {**zoo_table.attrs, "skipped": []}
    return first, added


def _last(checks):
    return checks.history()[-1]


def test_check_added_model_passes_the_harness_rows(zoo_table, no_strict):
    first, added = _split(zoo_table)
    got = no_strict.check_added_model(lambda t, n: compare.combine(t, added), first,
                                      "tiny-hybrid", reference=lambda t, n: "reference")
    assert _last(no_strict).status == "pass" and len(got) == len(zoo_table)


def _wrong_additions(added, first):
    hand = added[["model", "context", "batch_size", "state_bytes"]]
    kv_only = added.assign(state_bytes=added.kv_bytes)
    short = added[added.context == 8]
    manual = added.assign(path="measured by hand")
    other_dtype = added.assign(dtype="torch.bfloat16")
    return {
        "lack the harness's columns": lambda t, n: compare.combine(t, hand),
        "is the KV cache only": lambda t, n: compare.combine(t, kv_only),
        "changed or were dropped": lambda t, n: added,
        "no row and no skip reason at (context, batch) [(40, 1)": lambda t, n:
            compare.combine(t, short),
        "is not one the harness writes": lambda t, n: compare.combine(t, manual),
        "measured with dtype ['torch.bfloat16']": lambda t, n: compare.combine(t, other_dtype),
        "measured twice": lambda t, n: compare.combine(t, added, added),
    }


def test_check_added_model_names_the_likely_cause(zoo_table, no_strict):
    first, added = _split(zoo_table)
    for cause, student in _wrong_additions(added, first).items():
        got = no_strict.check_added_model(student, first, "tiny-hybrid",
                                          reference=lambda t, n: "reference")
        result = _last(no_strict)
        assert got == "reference" and result.status == "fail", cause
        assert cause in "\n".join(result.details), (cause, result.details)


def test_check_added_model_not_attempted_measures_the_reference(zoo_table, no_strict):
    first, _ = _split(zoo_table)

    def stub(table, name):
        raise NotImplementedError("Exercise: measure it")

    assert no_strict.check_added_model(stub, first, "tiny-hybrid",
                                       reference=lambda t, n: "reference") == "reference"
    assert _last(no_strict).status == "skip"


def test_check_crossover_passes_the_reference_and_names_mistakes(zoo_table, no_strict):
    from effarch import checks

    ok = no_strict.check_crossover(compare.crossover_context, zoo_table, "tiny-mamba",
                                   "tiny-transformer")
    assert ok is compare.crossover_context and _last(no_strict).status == "pass"
    for cause, wrong in checks._crossover_variants().items():
        got = no_strict.check_crossover(wrong, zoo_table, "tiny-mamba", "tiny-transformer")
        assert got is compare.crossover_context and _last(no_strict).status == "fail"
        assert f"likely cause: you {cause}" in _last(no_strict).details, cause


def test_check_memory_choice_passes_the_reference_and_names_mistakes(zoo_table, no_strict):
    from effarch import checks

    def reference(table):
        return compare.choose_for_memory(table).answer

    assert no_strict.check_memory_choice(reference, zoo_table) is reference
    assert _last(no_strict).status == "pass"
    for cause, wrong in checks._memory_variants().items():
        no_strict.check_memory_choice(wrong, zoo_table)
        assert _last(no_strict).status == "fail"
        assert f"likely cause: you {cause}" in _last(no_strict).details, cause


def test_strict_mode_raises_on_a_wrong_crossover(zoo_table, monkeypatch):
    from effarch import checks

    monkeypatch.setenv("EFFARCH_STRICT", "1")
    with pytest.raises(checks.CheckFailed):
        checks.check_crossover(lambda c, a, b: None, zoo_table, "tiny-mamba", "tiny-transformer")
    checks.reset()


# ---------------------------------------------------------------------------------- plots


def test_the_plots_draw_the_measured_points(zoo_table):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from effarch import plots

    fig = plots.state_vs_context(zoo_table, device="cpu")
    assert len(fig.axes[0].get_lines()) == len(ZOO)
    line = fig.axes[0].get_lines()[1]  # tiny-mamba, in table order
    assert list(line.get_xdata()) == [8, 40] and len(set(line.get_ydata())) == 1
    cross = compare.Crossover("a", "b", 1, (8, 40), (-1.0, 1.0), 20.0, None, "s")
    fig = plots.decode_vs_context(zoo_table, device="cpu", crossover=cross)
    assert any("crossover" in t.get_text() for t in fig.axes[0].get_legend().get_texts())
    fig = plots.throughput_vs_batch(zoo_table, device="cpu", context=40)
    assert len(fig.axes[0].containers) == len(ZOO)  # one errorbar container per model
    fig = plots.pareto({"a": (1, 2), "b": (2, 1), "c": (3, 3)}, front=[True, True, False],
                       device="cpu", xlabel="x", ylabel="y", title="t")
    assert [t.get_text() for t in fig.axes[0].texts] == ["a", "b", "c"]
    recall_rows = pd.DataFrame([
        {"model": m, "arch": a, "d_state": d, "num_pairs": p, "accuracy": acc}
        for m, a, d in (("att", "attention", 0), ("m4", "mamba", 4), ("m16", "mamba", 16))
        for p, acc in ((4, 0.9), (16, 0.5))])
    assert len(plots.recall_vs_pairs(recall_rows, device="cpu").axes[0].get_lines()) == 3
    fig = plots.recall_vs_state(recall_rows, device="cpu")
    assert len(fig.axes[0].get_lines()) == 4  # two pair counts + attention's two dotted lines
    plt.close("all")


def test_a_failing_compiled_arm_falls_back_to_eager_and_says_so(monkeypatch):
    model = _small("llama")
    calls = []

    def broken_step(**kw):
        calls.append(1)
        raise RuntimeError("inductor could not compile this")

    def static(model, *, max_cache_len, fallback=False, step_fn=None):
        if step_fn is None:
            return decoding.TransformersDecoder(model), "eager"
        return compare.StaticCacheDecoder(model, max_cache_len=max_cache_len,
                                          step_fn=step_fn), "transformers, static cache + x"

    monkeypatch.setattr(compare, "best_decoder", static)
    proto = compare._protocol(contexts=(8, 12), batch_sizes=(1,), batch_contexts=None,
                              new_tokens=3, repeats=1, weights="random", dtype=None,
                              device="cpu", text=TEXT, fallback=False, overrides=None,
                              prof=models.profile.get_profile())
    arm = compare._Arm(step_fn=broken_step)
    ids = torch.randint(0, 97, (1, 8))
    first = compare._measure_shape(model, ids, proto, arm)
    second = compare._measure_shape(model, torch.randint(0, 97, (1, 12)), proto, arm)
    for row in (first, second):
        assert row["path"].startswith("transformers eager, dynamic cache (static cache + "
                                      "torch.compile failed: RuntimeError: inductor could not")
        assert row["decode_tok_s"] > 0
    assert len(calls) == 1  # given up after the first failure


def test_guide_recall_calls_a_tie_within_the_sampling_noise():
    recall = pd.DataFrame([
        {"model": "att", "arch": "attention", "d_state": 0, "num_pairs": 16, "accuracy": 0.52,
         "examples": 64},
        {"model": "m16", "arch": "mamba", "d_state": 16, "num_pairs": 16, "accuracy": 0.50,
         "examples": 64}])
    assert compare.choose_for_recall(recall).answer.startswith("no clear winner")
    recall["examples"] = 100_000  # the same gap, measured on far more queries
    assert compare.choose_for_recall(recall).answer == "attention"


def test_function_checks_report_a_stub_as_not_attempted(zoo_table, no_strict):
    def stub(*args):
        raise NotImplementedError("Exercise: write this part")

    assert no_strict.check_crossover(stub, zoo_table, "tiny-mamba", "tiny-transformer") \
        is compare.crossover_context
    assert _last(no_strict).status == "skip"
    no_strict.check_memory_choice(stub, zoo_table)
    assert _last(no_strict).status == "skip"
    no_strict.check_memory_choice(lambda t: t.no_such_column, zoo_table)
    assert _last(no_strict).status == "fail" and "AttributeError" in _last(no_strict).details[0]


def test_guide_recall_threshold_counts_the_sampling_noise():
    def table(acc, examples):
        return pd.DataFrame([
            {"model": "att", "arch": "attention", "d_state": 0, "num_pairs": 16,
             "accuracy": 1.0, "examples": examples},
            {"model": "m16", "arch": "mamba", "d_state": 16, "num_pairs": 16,
             "accuracy": acc, "examples": examples}])
    # 89.9% and 90.6% over 256 sequences are the same result: neither flips the sentence
    for acc in (0.899, 0.906):
        because = compare.choose_for_recall(table(acc, 256)).because
        assert "within the sampling noise" in because and "d_state 16" in because, because
    # measured on far more queries, 90.6% is clearly above 90%, 80% clearly below
    assert "held 90% beyond its sampling noise from d_state 16" in compare.choose_for_recall(
        table(0.906, 100_000)).because
    assert "reached 90%" in compare.choose_for_recall(table(0.8, 256)).because
