"""scripts/train_zoo.py: the zoo's size constraints, a CPU smoke run, reloading and --resume."""

from __future__ import annotations

import csv
import importlib.util
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from effarch import memory, paths, profile

SCRIPT = paths.repo_root() / "scripts" / "train_zoo.py"


@pytest.fixture(scope="module")
def tz():
    spec = importlib.util.spec_from_file_location("train_zoo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def real_configs(tz):
    settings = tz.load_settings()
    return settings, {n: tz.build_config(n, settings) for n in tz.NAMES}


# --- the real configuration: no training ---------------------------------------------------


def test_active_parameters_within_20_percent(real_configs):
    _, cfgs = real_configs
    active = {n: memory.count_params(c).active for n, c in cfgs.items()}
    assert max(active.values()) / min(active.values()) <= 1.2, active
    assert all(2.4e6 <= a <= 3.6e6 for a in active.values()), active  # "about 3M"


def test_moe_total_exceeds_active_and_zoo_fits_40_mb(real_configs):
    _, cfgs = real_configs
    moe = memory.count_params(cfgs["tiny-moe"])
    assert moe.total > 2 * moe.active
    hybrid = memory.count_params(cfgs["tiny-hybrid"])
    assert hybrid.total > hybrid.active
    bf16_bytes = sum(2 * memory.count_params(c).total for c in cfgs.values())
    assert bf16_bytes <= 40e6, bf16_bytes


def test_formula_counts_match_a_meta_build(real_configs):
    _, cfgs = real_configs
    for name, cfg in cfgs.items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        assert sum(p.numel() for p in model.parameters()) == memory.count_params(cfg).total, name
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight, name


def test_same_budget_and_sequence_length_for_all(real_configs):
    settings, cfgs = real_configs
    assert settings["seq_len"] in (256, 512)
    assert settings["train_tokens"] % (settings["seq_len"] * settings["batch_size"]) == 0
    assert all(c.vocab_size == settings["vocab_size"] for c in cfgs.values())
    assert all(getattr(c, "use_mambapy", False) is False for c in cfgs.values())
    for name in ("tiny-moe", "tiny-hybrid"):
        assert cfgs[name].router_aux_loss_coef == settings["router_aux_loss_coef"] > 0


def test_scoring_windows_score_each_position_once(tz):
    for n, window, stride in [(10, 4, 3), (1000, 64, 48), (30, 64, 48), (129, 64, 63)]:
        scored = []
        for start, first in tz.scoring_windows(n, window, stride):
            assert start < first <= start + min(window, n)
            scored.extend(range(first, min(start + window, n)))
        assert scored == list(range(1, n)), (n, window, stride)


def test_sampler_is_a_function_of_the_step(tz):
    import numpy as np

    tokens = np.arange(10_000, dtype=np.uint16)
    a = tz.WindowSampler(tokens, 64, 4, seed=1)
    b = tz.WindowSampler(tokens, 64, 4, seed=1)
    assert torch.equal(a.batch(37), b.batch(37)) and not torch.equal(a.batch(0), a.batch(1))
    epoch = torch.cat([a.batch(s) for s in range(a.per_epoch // 4)])
    assert len(set(epoch[:, 0].tolist())) == len(epoch)  # no window twice in one epoch


# --- a smoke run on the CPU -----------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke(tz, tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo")
    results = tz.main(["--smoke", "--device", "cpu", "--out", str(out),
                       "--work", str(out / "_work")])
    return out, results


def _log(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_smoke_trains_all_four_and_writes_files(smoke, tz):
    out, results = smoke
    assert set(results) == set(tz.NAMES)
    for name in tz.NAMES:
        assert results[name]["finished"], name
        for f in ("config.json", "generation_config.json", "model.safetensors", "train_log.csv",
                  "train_meta.json"):
            assert (out / name / f).is_file(), (name, f)
        rows = _log(out / name / "train_log.csv")
        losses = [float(r["train_loss"]) for r in rows]
        assert all(math.isfinite(x) for x in losses), name
        assert min(losses[-3:]) < losses[0], (name, losses)
        assert rows[-1]["val_loss"] and int(rows[-1]["step"]) == 10
        moe = name in ("tiny-moe", "tiny-hybrid")
        assert all(bool(r["aux_loss"]) == moe for r in rows), name
        meta = json.loads((out / name / "train_meta.json").read_text())
        assert meta["tokens_trained"] == 2560 and meta["smoke"] is True
        assert 0 < meta["validation"]["bits_per_byte"] < 20
        tensors = load_file(out / name / "model.safetensors")
        assert {t.dtype for t in tensors.values()} == {torch.bfloat16}, name


def test_saved_config_keeps_the_default_mamba_path(smoke):
    out, _ = smoke
    for name in ("tiny-mamba", "tiny-hybrid"):
        cfg = AutoConfig.from_pretrained(out / name)
        assert cfg.use_mambapy is False
    assert json.loads((out / "tiny-mamba" / "train_meta.json").read_text())[
        "mamba_path_in_training"] in ("mambapy parallel scan", "sequential fallback")


@torch.no_grad()
def test_reload_gives_the_in_memory_logits(smoke, tz):
    out, results = smoke
    x = torch.randint(1, 4096, (2, 40), generator=torch.Generator().manual_seed(0))
    for name in tz.NAMES:
        trained = results[name]["model"].eval()
        tz.set_mamba_path(trained, use_mambapy=False)  # the path the saved config selects
        reloaded = AutoModelForCausalLM.from_pretrained(out / name, dtype=torch.float32).eval()
        got = reloaded(input_ids=x).logits
        # bf16 on disk: the same weights rounded to bf16 give exactly the reloaded logits ...
        rounded = type(trained)(trained.config)
        rounded.load_state_dict({k: v.to(torch.bfloat16).float()
                                 for k, v in trained.state_dict().items()})
        torch.testing.assert_close(rounded.eval()(input_ids=x).logits, got, rtol=0, atol=1e-5)
        # ... and the float32 model's logits within bf16 rounding of the weights
        torch.testing.assert_close(trained(input_ids=x).logits, got, rtol=0.05, atol=0.05)


def test_resume_continues_from_the_checkpoint(smoke, tz, tmp_path):
    full_out, _ = smoke
    out, work = tmp_path / "out", tmp_path / "work"
    common = ["--smoke", "--device", "cpu", "--only", "transformer,mamba", "--out", str(out),
              "--work", str(work)]
    first = tz.main(common + ["--stop-after-steps", "4"])
    assert not any(r["finished"] for r in first.values())
    for name in ("tiny-transformer", "tiny-mamba"):
        assert not (out / name / "model.safetensors").exists()
        assert torch.load(work / name / "checkpoint.pt", weights_only=False)["step"] == 4
    second = tz.main(common + ["--resume"])
    for name in ("tiny-transformer", "tiny-mamba"):
        assert second[name]["finished"]
        steps = [int(r["step"]) for r in _log(out / name / "train_log.csv")]
        assert steps == list(range(1, 11)), steps
        # the interrupted run ends with the weights of the uninterrupted one
        a = load_file(out / name / "model.safetensors")
        b = load_file(full_out / name / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    third = tz.main(common + ["--resume"])  # finished models are skipped
    assert all(r["finished"] and r["model"] is None for r in third.values())


# --- scripts/eval_zoo.py ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def ez():
    spec = importlib.util.spec_from_file_location("eval_zoo", SCRIPT.parent / "eval_zoo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_eval_zoo_on_the_smoke_models(smoke, ez, monkeypatch):
    out, _ = smoke
    monkeypatch.delenv("EFFARCH_ROOT", raising=False)
    results = ez.main(["--zoo", str(out), "--only", "moe,transformer", "--window", "64",
                       "--stride", "48", "--batch-size", "32", "--permutations", "5",
                       "--random-tokens", "256", "--new-tokens", "4", "--write-readme"])
    assert "EFFARCH_ROOT" not in __import__("os").environ
    assert [r["name"] for r in results] == ["tiny-transformer", "tiny-moe"]
    for r in results:
        assert 0 < r["validation"]["bits_per_byte"] < 20 and r["load_s"] < 30
        assert set(r["samples"]) == {"code", "prose"}
    moe = results[1]["routing"]
    assert [row["layer"] for row in moe] == [0, 1]
    assert all(abs(sum(row["load"]) - 1) < 1e-6 for row in moe)
    readme = (out / "README.md").read_text()
    assert "xz -9e" in readme and "tiny-moe" in readme


def test_per_layer_aux_loss_option(tz, tmp_path, monkeypatch):
    import numpy as np
    from transformers.models.mixtral import modeling_mixtral

    settings = tz.load_settings(smoke=True)
    settings["models"]["tiny-moe"]["aux_loss"] = "per_layer"
    tokens = np.arange(5000, dtype=np.uint16) % 4096
    sampler = tz.WindowSampler(tokens, settings["seq_len"], settings["batch_size"], 0)
    run = tz.Run("tiny-moe", settings, torch.device("cpu"), tmp_path, None, sampler, None, None)
    layers_seen = []  # how many layers' router logits each call of the balancing loss pools
    real = modeling_mixtral.load_balancing_loss_func
    monkeypatch.setattr(modeling_mixtral, "load_balancing_loss_func",
                        lambda gates, *a, **k: layers_seen.append(len(gates)) or real(gates, *a, **k))
    ce, aux = run.train_step()
    n_layers = run.cfg.num_hidden_layers
    assert layers_seen.count(1) == n_layers  # the option: one call per MoE layer
    assert n_layers > 1
    assert math.isfinite(ce) and 1.0 < aux < 8.0  # top-2 routing: about 2 near uniform
    pooled = tz.load_settings(smoke=True)
    pooled["models"]["tiny-moe"]["aux_loss"] = "pooled"
    assert tz.fingerprint("tiny-moe", settings) != tz.fingerprint("tiny-moe", pooled)
