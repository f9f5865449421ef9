"""The tiny zoo: its settings (effarch.zoo), its training pieces (effarch.training), and the
two programs that train and evaluate it (scripts/train_zoo.py, scripts/eval_zoo.py) run as
subprocesses: a CPU smoke run, --resume, and an evaluation of the smoke models."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

import effarch
from effarch import memory, paths, registry, training, zoo

SCRIPTS = paths.repo_root() / "scripts"


@pytest.fixture(scope="module")
def real_configs():
    settings = zoo.load_settings()
    return settings, {n: zoo.build_config(n, settings) for n in registry.ZOO_NAMES}


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
    bf16_bytes = sum(zoo.param_report(c)["bf16_bytes"] for c in cfgs.values())
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
    assert settings["seq_len"] in (256, 512) and settings["smoke"] is False
    assert settings["train_tokens"] % (settings["seq_len"] * settings["batch_size"]) == 0
    assert all(c.vocab_size == settings["vocab_size"] for c in cfgs.values())
    assert all(getattr(c, "use_mambapy", False) is False for c in cfgs.values())
    for name in ("tiny-moe", "tiny-hybrid"):
        assert zoo.is_moe(cfgs[name])
        assert cfgs[name].router_aux_loss_coef == settings["router_aux_loss_coef"] > 0


def test_the_shipped_models_were_trained_with_these_settings(real_configs):
    settings, _ = real_configs
    for name in registry.ZOO_NAMES:
        meta = zoo.read_train_meta(paths.zoo_dir() / name)
        assert zoo.finished(paths.zoo_dir(), name, zoo.fingerprint(name, settings)) == meta
        assert meta["validation"]["window"] == settings["final_eval"]["window"]


def test_smoke_settings_and_fingerprint():
    smoke = zoo.load_settings(smoke=True)
    assert smoke["smoke"] is True and smoke["seq_len"] == 64
    assert smoke["models"]["tiny-moe"]["config"]["num_local_experts"] == 4
    assert smoke["schedule"]["min_lr_ratio"] == zoo.load_settings()["schedule"]["min_lr_ratio"]
    other = zoo.load_settings(smoke=True)
    other["checkpoint_minutes"] = 99  # how often checkpoints are written does not matter
    assert zoo.fingerprint("tiny-moe", other) == zoo.fingerprint("tiny-moe", smoke)
    other["seed"] += 1
    assert zoo.fingerprint("tiny-moe", other) != zoo.fingerprint("tiny-moe", smoke)
    assert zoo.fingerprint("tiny-mamba", smoke) != zoo.fingerprint("tiny-moe", smoke)


def test_model_names():
    assert zoo.model_names() == list(zoo.TRAIN_ORDER)
    assert zoo.model_names("mamba, tiny-moe") == ["tiny-moe", "tiny-mamba"]
    assert zoo.model_names("mamba,moe", order=registry.ZOO_NAMES) == ["tiny-mamba", "tiny-moe"]
    with pytest.raises(ValueError, match="choose from"):
        zoo.model_names("gpt")


# --- training pieces -------------------------------------------------------------------------


def test_sampler_is_a_function_of_the_step():
    tokens = np.arange(10_000, dtype=np.uint16)
    a = training.WindowSampler(tokens, 64, 4, seed=1)
    b = training.WindowSampler(tokens, 64, 4, seed=1)
    assert torch.equal(a.batch(37), b.batch(37)) and not torch.equal(a.batch(0), a.batch(1))
    epoch = torch.cat([a.batch(s) for s in range(a.per_epoch // 4)])
    assert len(set(epoch[:, 0].tolist())) == len(epoch)  # no window twice in one epoch
    assert a.batch(0).shape == (4, 64) and a.epochs(a.per_epoch // 4) == pytest.approx(
        (a.per_epoch // 4) * 4 / a.per_epoch)
    with pytest.raises(ValueError, match="too few"):
        training.WindowSampler(tokens[:200], 64, 4, seed=1)


def test_schedule_warms_up_then_decays_to_its_floor():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = training.make_scheduler(opt, 100, {"warmup_steps": 10, "min_lr_ratio": 0.1})
    lrs = []
    for _ in range(100):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(x >= y for x, y in zip(lrs[9:], lrs[10:], strict=False))
    assert sched.get_last_lr()[0] == pytest.approx(0.1)


def test_optimizer_decays_matrices_only():
    cfg = zoo.build_config("tiny-mamba", zoo.load_settings(smoke=True))
    model = AutoModelForCausalLM.from_config(cfg)
    decay, no_decay = training.make_optimizer(model, zoo.load_settings()["optimizer"]).param_groups
    assert all(p.dim() >= 2 for p in decay["params"]) and no_decay["weight_decay"] == 0
    kept = {id(p) for p in no_decay["params"]}
    spared = [p for n, p in model.named_parameters()
              if n.endswith(("A_log", ".D")) or p.dim() < 2]  # A_log is (d, n): 2-D
    assert any(p.dim() == 2 for p in spared) and all(id(p) in kept for p in spared)


def _smoke_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = zoo.build_config(name, zoo.load_settings(smoke=True))
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def test_per_layer_aux_loss_option(monkeypatch):
    from transformers.models.mixtral import modeling_mixtral

    model = _smoke_model("tiny-moe")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = training.make_scheduler(opt, 10, {"warmup_steps": 2, "min_lr_ratio": 0.1})
    x = torch.arange(2 * 64).reshape(2, 64) % 4096
    from effarch import moe

    calls = []  # (layers pooled, per_layer) of each call of effarch's balancing loss
    ours = moe.load_balancing_loss
    monkeypatch.setattr(moe, "load_balancing_loss", lambda gates, *a, per_layer=False, **k:
                        calls.append((len(gates) if isinstance(gates, tuple) else 1, per_layer))
                        or ours(gates, *a, per_layer=per_layer, **k))
    ce, aux = training.train_step(model, opt, sched, x, grad_clip=1.0, per_layer_aux=True)
    n_layers = model.config.num_hidden_layers
    # the option: effarch's loss, one layer at a time, averaged
    assert calls == [(n_layers, True)] + [(1, False)] * n_layers and n_layers > 1
    assert math.isfinite(ce) and 1.0 < aux < 8.0  # top-2 routing: about 2 near uniform
    layers_seen = []  # how many layers' router logits transformers' own loss pools
    real = modeling_mixtral.load_balancing_loss_func
    monkeypatch.setattr(modeling_mixtral, "load_balancing_loss_func",
                        lambda gates, *a, **k: layers_seen.append(len(gates)) or real(gates, *a, **k))
    _, pooled = training.train_step(model, opt, sched, x, grad_clip=1.0)
    assert layers_seen == [n_layers] and 1.0 < pooled < 8.0  # transformers' pooled loss
    dense = _smoke_model("tiny-transformer")
    opt = torch.optim.AdamW(dense.parameters(), lr=1e-3)
    sched = training.make_scheduler(opt, 10, {"warmup_steps": 2, "min_lr_ratio": 0.1})
    assert training.train_step(dense, opt, sched, x, grad_clip=1.0)[1] is None


def test_random_states_and_checkpoint_round_trip(tmp_path):
    states = training.rng_states()
    first = (torch.rand(3), np.random.rand(), __import__("random").random())
    training.save_checkpoint(tmp_path / "c" / "checkpoint.pt", rng=states, step=7)
    saved = torch.load(tmp_path / "c" / "checkpoint.pt", weights_only=False)
    training.set_rng_states(saved["rng"])
    again = (torch.rand(3), np.random.rand(), __import__("random").random())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:] and saved["step"] == 7
    assert not list((tmp_path / "c").glob("*.tmp"))


def test_log_is_appended_and_read_back(tmp_path):
    path = tmp_path / "train_log.csv"
    assert training.read_log(path) == []
    row = dict(step=1, tokens=256, train_loss="8.1", aux_loss="", val_loss="", lr="0.1",
               elapsed_s="0.5")
    training.append_log(path, [row])
    training.append_log(path, [{**row, "step": 2}])
    rows = training.read_log(path)
    assert [r["step"] for r in rows] == ["1", "2"] and list(rows[0]) == list(training.LOG_FIELDS)


@torch.no_grad()
@pytest.mark.parametrize("name", registry.ZOO_NAMES)
def test_saved_model_reloads_with_the_in_memory_logits(name, tmp_path):
    trained = _smoke_model(name).eval()
    training.set_mamba_path(trained, use_mambapy=False)  # the path the saved config selects
    saved = training.save_model(trained, tmp_path / name)
    assert getattr(AutoConfig.from_pretrained(tmp_path / name), "use_mambapy", False) is False
    assert {t.dtype for t in load_file(tmp_path / name / "model.safetensors").values()} == {
        torch.bfloat16}
    x = torch.randint(1, 4096, (2, 40), generator=torch.Generator().manual_seed(0))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / name, dtype=torch.float32).eval()
    got = reloaded(input_ids=x).logits
    # bf16 on disk: the same weights rounded to bf16 give exactly the reloaded logits ...
    rounded = type(trained)(trained.config)
    rounded.load_state_dict({k: v.to(torch.bfloat16).float()
                             for k, v in trained.state_dict().items()})
    torch.testing.assert_close(rounded.eval()(input_ids=x).logits, got, rtol=0, atol=1e-5)
    # ... and the float32 model's logits within bf16 rounding of the weights
    torch.testing.assert_close(trained(input_ids=x).logits, got, rtol=0.05, atol=0.05)
    assert training.reload_difference(saved, tmp_path / name) < 1e-4


# --- the programs, run as a user runs them ---------------------------------------------------


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run a script with this test's effarch importable (PYTHONPATH), one torch thread."""
    env = {**os.environ, "PYTHONPATH": str(Path(effarch.__file__).parents[1]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, str(SCRIPTS / script), *args], env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo")
    _run("train_zoo.py", "--smoke", "--device", "cpu", "--out", str(out),
         "--work", str(out / "_work"))
    return out


def _log(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_smoke_trains_all_four_and_writes_files(smoke):
    for name in registry.ZOO_NAMES:
        for f in ("config.json", "generation_config.json", "model.safetensors", "train_log.csv",
                  "train_meta.json"):
            assert (smoke / name / f).is_file(), (name, f)
        rows = _log(smoke / name / "train_log.csv")
        losses = [float(r["train_loss"]) for r in rows]
        assert all(math.isfinite(x) for x in losses), name
        assert min(losses[-3:]) < losses[0], (name, losses)
        assert rows[-1]["val_loss"] and int(rows[-1]["step"]) == 10
        assert all(bool(r["aux_loss"]) == (name in ("tiny-moe", "tiny-hybrid")) for r in rows)
        meta = json.loads((smoke / name / "train_meta.json").read_text())
        assert meta["tokens_trained"] == 2560 and meta["smoke"] is True
        assert 0 < meta["validation"]["bits_per_byte"] < 20
        assert meta["validation"]["window"] == 64 and meta["validation"]["stride"] == 48
        tensors = load_file(smoke / name / "model.safetensors")
        assert {t.dtype for t in tensors.values()} == {torch.bfloat16}, name


def test_saved_config_keeps_the_default_mamba_path(smoke):
    for name in ("tiny-mamba", "tiny-hybrid"):
        assert AutoConfig.from_pretrained(smoke / name).use_mambapy is False
    assert json.loads((smoke / "tiny-mamba" / "train_meta.json").read_text())[
        "mamba_path_in_training"] in ("mambapy parallel scan", "sequential fallback")


def test_resume_continues_from_the_checkpoint(smoke, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    common = ["--smoke", "--device", "cpu", "--only", "transformer,mamba", "--out", str(out),
              "--work", str(work)]
    first = _run("train_zoo.py", *common, "--stop-after-steps", "4")
    assert "unfinished: tiny-transformer, tiny-mamba" in first.stdout
    for name in ("tiny-transformer", "tiny-mamba"):
        assert not (out / name / "model.safetensors").exists()
        assert torch.load(work / name / "checkpoint.pt", weights_only=False)["step"] == 4
    second = _run("train_zoo.py", *common, "--resume")
    assert "resumed at step 4" in second.stdout
    for name in ("tiny-transformer", "tiny-mamba"):
        steps = [int(r["step"]) for r in _log(out / name / "train_log.csv")]
        assert steps == list(range(1, 11)), steps
        # the interrupted run ends with the weights of the uninterrupted one
        a = load_file(out / name / "model.safetensors")
        b = load_file(smoke / name / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    third = _run("train_zoo.py", *common, "--resume")  # finished models are skipped
    assert third.stdout.count("already trained") == 2


def test_eval_zoo_on_the_smoke_models(smoke, tmp_path):
    _run("eval_zoo.py", "--zoo", str(smoke), "--only", "moe,transformer", "--window", "64",
         "--stride", "48", "--batch-size", "32", "--permutations", "5", "--random-tokens",
         "256", "--new-tokens", "4", "--write-readme", "--json", str(tmp_path / "r.json"))
    results = json.loads((tmp_path / "r.json").read_text())
    assert [r["name"] for r in results] == ["tiny-transformer", "tiny-moe"]
    for r in results:
        meta = json.loads((smoke / r["name"] / "train_meta.json").read_text())
        # the same scorer, windows and text as train_zoo's final evaluation (float32 on the
        # CPU both times; eval_zoo reloads the bf16 file, so the figures differ by rounding)
        assert r["validation"]["tokens"] > meta["validation"]["tokens"]  # the whole split
        assert 0 < r["validation"]["bits_per_byte"] < 20 and r["load_s"] < 30
        assert set(r["samples"]) == {"code", "prose"} and r["train_meta"] == meta
    moe = results[1]["routing"]
    assert [row["layer"] for row in moe] == [0, 1]
    assert all(abs(sum(row["load"]) - 1) < 1e-6 for row in moe)
    assert moe[0]["mi_class"]["tokens"] == results[1]["validation"]["tokens"] - 1
    readme = (smoke / "README.md").read_text()
    assert "xz -9e" in readme and "tiny-moe" in readme and "effarch.quality" in readme
