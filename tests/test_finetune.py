"""effarch.finetune, lab 2.4.6's checks and scripts/finetune_mamba.py on the tiny zoo's Mamba."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import set_seed

from effarch import backends, checks, finetune, models, paths

ROOT = paths.repo_root()
SCRIPT = ROOT / "scripts" / "finetune_mamba.py"
SHORT = finetune.TrainSettings(max_steps=6, batch_size=4, warmup_steps=1, eval_steps=6,
                               save_steps=2, logging_steps=1)


def fresh_model():
    return models.load_model("tiny-mamba").model


@pytest.fixture(scope="module")
def tok():
    return models.load_model("tiny-mamba").tokenizer


@pytest.fixture(scope="module")
def task():
    return finetune.load_task("dates")


@pytest.fixture(scope="module")
def batch(tok, task):
    return finetune.example_batch(tok, [task["train"][i] for i in range(4)])


def lora_model(rank=8, targets=finetune.DEFAULT_TARGETS, seed=0):
    set_seed(seed)
    return finetune.add_lora(fresh_model(), finetune.lora_config(rank, targets))


# ------------------------------------------------------------------------------ task and data


def test_task_splits_are_disjoint_and_current():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_tasks.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    files = finetune.task_files("dates")
    rows = {s: [json.loads(line) for line in open(p)] for s, p in files.items()}
    assert len(rows["train"]) == 4000 and len(rows["test"]) == 200
    assert not {r["prompt"] for r in rows["test"]} & {r["prompt"] for r in rows["train"]}
    assert rows["train"][0].keys() == {"prompt", "answer"}


def test_unknown_task_names_the_shipped_ones():
    with pytest.raises(finetune.FinetuneError, match="dates.*build_tasks"):
        finetune.task_files("no-such-task")


def test_tokenized_example_scores_the_answer_only(tok):
    ex = finetune.tokenize_example(tok, "1995-03-02 -> ", "2 March 1995")
    prompt_ids = tok("1995-03-02 -> ", add_special_tokens=False).input_ids
    n = len(prompt_ids)
    assert ex["input_ids"][:n] == prompt_ids and ex["labels"][:n] == [-100] * n
    assert ex["labels"][n:] == ex["input_ids"][n:]
    assert tok.decode(ex["input_ids"][n:]) == "2 March 1995\n"
    assert len(ex["attention_mask"]) == len(ex["input_ids"])


def test_padded_batch_ignores_padding(tok, task):
    rows = [{"prompt": "1995-03-02 -> ", "answer": "2 March 1995"},
            {"prompt": "2001-11-30 -> ", "answer": "30 November 2001, a longer answer"}]
    b = finetune.example_batch(tok, rows)
    short = len(finetune.tokenize_example(tok, **rows[0])["input_ids"])
    assert (b["labels"][0, short:] == -100).all() and (b["attention_mask"][0, short:] == 0).all()


# ------------------------------------------------------------------------------------ targets


def test_module_kind():
    assert finetune.module_kind(
        "base_model.model.backbone.layers.3.mixer.in_proj.lora_A.default.weight") == "in_proj.lora_A"
    assert finetune.module_kind("backbone.layers.0.mixer.A_log") == "A_log"
    assert finetune.module_kind("backbone.embeddings.weight") == "embeddings"
    assert finetune.module_kind(
        "base_model.model.backbone.layers.1.mixer.x_proj.base_layer.weight") == "x_proj"


@pytest.mark.parametrize("rank", [1, 8])
def test_trainable_counts_are_r_times_in_plus_out(rank):
    model = lora_model(rank)
    got = finetune.trainable_by_module(model)
    assert got == finetune.expected_lora_counts(model.config, rank)
    cfg = model.config
    h, d = cfg.hidden_size, cfg.intermediate_size
    r_dt, n = cfg.time_step_rank, cfg.state_size
    assert sum(got.values()) == cfg.num_hidden_layers * rank * (h + 2 * d + d + r_dt + 2 * n)


@pytest.mark.parametrize(("targets", "words"), [
    (["out_proj"], "PEFT refuses"), (["in_proj", "conv1d"], "PEFT refuses"),
    (["dt_proj"], "never train"), (["in_proj", "gate_proj"], "layers are"), ([], "no targets")])
def test_targets_that_cannot_train_are_refused_before_wrapping(targets, words):
    model = fresh_model()
    with pytest.raises(finetune.FinetuneError, match=words) as info:
        finetune.add_lora(model, finetune.lora_config(4, targets))
    assert "'PEFT target errors'" in str(info.value)
    assert not finetune.lora_matrices(model)  # nothing was wrapped


def test_peft_itself_refuses_out_proj_on_a_meta_model():
    meta = models.load_model("tiny-mamba", weights="random", device="meta").model
    message = finetune.peft_refusal(meta, "out_proj")
    assert message and "incompatible with Mamba" in message
    assert finetune.peft_refusal(
        models.load_model("tiny-mamba", weights="random", device="meta").model, "in_proj") is None


def test_dt_proj_adapter_is_bypassed_and_x_proj_is_not(tok):
    model = fresh_model()
    ids = tok("2001-02-03 -> 3 February 2001\n", return_tensors="pt").input_ids
    dt = finetune.adapter_effect(model, "dt_proj", ids)
    assert dt.max_output_change == 0.0 and dt.forward_calls == 0
    assert dt.gradient_norms and all(g is None for g in dt.gradient_norms.values())
    x = finetune.adapter_effect(model, "x_proj", ids)
    assert x.max_output_change > 1e-3 and x.forward_calls == model.config.num_hidden_layers
    assert all(g and g > 0 for g in x.gradient_norms.values())
    assert not finetune.lora_matrices(model)  # unloaded
    assert all(p.requires_grad for p in model.parameters())  # as it was


def test_gradient_check_on_lora(batch):
    model = lora_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = finetune.gradient_check(model, batch)
    assert report.ok, report
    a = [n for n in report.first_step if ".lora_A." in n]
    assert all(report.first_step[n] == 0 for n in a)  # lora_B starts at zero
    assert all(v > 0 for v in report.second_step.values())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # restored


def test_gradient_check_sees_a_trainable_base(batch):
    model = lora_model()
    model.base_model.model.backbone.embeddings.weight.requires_grad_(True)
    report = finetune.gradient_check(model, batch)
    assert not report.ok
    assert report.trainable_base == ["base_model.model.backbone.embeddings.weight"]
    assert report.base_changed == report.trainable_base


# --------------------------------------------------------------------------------- exact match


class FixedModel(torch.nn.Module):
    """Generates the same continuation after any prompt: tests the cut and the comparison."""

    def __init__(self, tok, continuation):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.ids = tok(continuation, add_special_tokens=False, return_tensors="pt").input_ids

    def generate(self, input_ids, eos_token_id, max_new_tokens, **kw):
        new = self.ids[:, :max_new_tokens]
        for i, t in enumerate(new[0].tolist()):  # stop at a newline token, as generate does
            if t in eos_token_id:
                new = new[:, :i + 1]
                break
        return torch.cat([input_ids, new], dim=1)


@pytest.mark.parametrize(("continuation", "hit"), [
    (" 2 March 1995 \nand more", True), ("2 March 1995\n", True), ("2 March 19955\n", False),
    ("2 March\n1995\n", False), ("2 March 1995" + " x" * 40, False)])
def test_exact_match_cuts_at_the_first_newline_and_strips(tok, continuation, hit):
    rows = [{"prompt": "1995-03-02 -> ", "answer": " 2 March 1995"}]
    em = finetune.exact_match(FixedModel(tok, continuation), tok, rows)
    assert em.score == float(hit) and em.n == 1


def test_qlora_is_skipped_with_the_reason_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reason = finetune.qlora_unavailable()
    assert reason and "'QLoRA on the CPU'" in reason
    with pytest.raises(finetune.FinetuneError, match="QLoRA on the CPU"):
        finetune.load_4bit("mamba-2.8b", weights="random", workdir="/nonexistent")


def test_base_model_does_not_know_the_task(tok, task):
    em = finetune.exact_match(fresh_model(), tok, task["test"], limit=10)
    assert em.n == 10 and em.score < 0.3


# ------------------------------------------------------------------------------------ memory


def test_counted_bytes_of_a_lora_step(batch):
    model = lora_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step = finetune.training_step_bytes(model, batch)
    t = step.table
    lora = t[t.index.str.contains(".lora_")]
    assert (lora["trainable"] == lora["parameters"]).all()
    assert (lora["gradients"] == lora["weights"]).all()  # fp32 gradients, one per weight
    assert (lora["optimizer"] == 2 * lora["weights"]).all()  # AdamW: exp_avg, exp_avg_sq
    frozen = t[~t.index.str.contains(".lora_")]
    assert (frozen[["trainable", "gradients", "optimizer"]] == 0).all().all()
    assert step.activations > 0 and step.peak is None
    assert step.trainable_state == 4 * int(lora["weights"].sum())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # lr 0


def test_full_fine_tuning_counts_every_weight_four_times(batch):
    model = fresh_model()
    step = finetune.training_step_bytes(model, batch)
    s = step.summary()
    assert s["gradients"] == s["weights"] and s["optimizer"] == 2 * s["weights"]
    assert step.trainable_state == 4 * s["weights"]


# -------------------------------------------------------------------------- Trainer and resume


def _trainer(tok, task, out, settings=SHORT, callbacks=()):
    model = lora_model(settings.rank, settings.targets, settings.seed)
    finetune.use_parallel_scan(model)
    data = finetune.tokenize_task(task, tok)
    args = finetune.training_arguments(out, settings, progress=False)
    return finetune.make_trainer(model, tok, data["train"], data["test"].select(range(8)), args,
                                 callbacks), model


def _lora_state(model):
    return {n: p.detach().clone() for n, p in finetune.lora_matrices(model).items()}


def test_interrupted_training_resumes_without_losing_a_step(tok, task, tmp_path):
    trainer, model = _trainer(tok, task, tmp_path / "straight")
    trainer.train()
    straight = _lora_state(model)

    trainer, _ = _trainer(tok, task, tmp_path / "cut", callbacks=[finetune.interrupt_at(3)])
    with pytest.raises(finetune.TrainingInterrupted):
        trainer.train()
    assert finetune.latest_checkpoint(tmp_path / "cut").name == "checkpoint-2"
    trainer, model = _trainer(tok, task, tmp_path / "cut")  # a new process would start so
    trainer.train(resume_from_checkpoint=str(finetune.latest_checkpoint(tmp_path / "cut")))
    assert trainer.state.global_step == SHORT.max_steps
    resumed = _lora_state(model)
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-5, atol=1e-6, msg=name)
    steps = [e["step"] for e in trainer.state.log_history if "loss" in e]
    assert steps == list(range(1, SHORT.max_steps + 1))  # every step logged once


def test_adapter_round_trip_reload_and_merge(tok, tmp_path, batch):
    from peft import PeftModel

    model = lora_model()
    with torch.no_grad():  # a trained-looking adapter: lora_B away from zero
        for name, p in finetune.lora_matrices(model).items():
            if ".lora_B." in name:
                p.normal_(0, 0.05)
    model.eval()
    ids = batch["input_ids"].to(next(model.parameters()).device)
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        base = fresh_model()(input_ids=ids).logits
    assert (trained - base).abs().max() > 1e-2  # the adapter does something
    model.save_pretrained(tmp_path)
    assert finetune.adapter_bytes(tmp_path) < 0.1 * finetune.parameter_bytes(fresh_model())
    reloaded = PeftModel.from_pretrained(fresh_model(), tmp_path).eval()
    with torch.no_grad():
        # equal to float32 rounding: two model instances may take different CPU kernels
        # (6.7e-6 seen on one machine); a lost or wrong adapter moves them by > 1e-2 (above)
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained, rtol=1e-5, atol=2e-5)
        merged = reloaded.merge_and_unload()
        assert not finetune.lora_matrices(merged)
        torch.testing.assert_close(merged(input_ids=ids).logits, trained, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------------- checks


def reference_add_lora(model, rank):
    return finetune.add_lora(model, finetune.lora_config(rank))


def _run_check(fn, batch):
    checks.reset()
    returned = checks.check_lora_model(fn, reference_add_lora, make_model=fresh_model,
                                       batch=batch, ranks=(4, 8))
    (result,) = checks.history()
    checks.reset()
    return result, returned


def test_lora_check_passes_the_reference(batch, monkeypatch):
    monkeypatch.delenv("EFFARCH_STRICT", raising=False)
    result, returned = _run_check(reference_add_lora, batch)
    assert result.status == "pass" and returned is reference_add_lora


def _peft(targets, rank=None):
    from peft import LoraConfig, get_peft_model

    def fn(model, r):
        return get_peft_model(model, LoraConfig(r=rank or r, target_modules=targets))
    return fn


def _alpha_r(model, rank):  # lora_alpha = r: the update scaled by 1, not 2
    return finetune.add_lora(model, finetune.lora_config(rank, alpha=rank))


def _dropout(model, rank):  # PEFT's usual recipe, not the exercise's
    return finetune.add_lora(model, finetune.lora_config(rank, dropout=0.1))


def _unfrozen(model, rank):
    wrapped = reference_add_lora(model, rank)
    for p in wrapped.parameters():
        p.requires_grad_(True)
    return wrapped


def _no_wrap(model, rank):
    finetune.lora_config(rank)
    return model


@pytest.mark.parametrize(("wrong", "words"), [
    (_peft(["in_proj", "out_proj"]), "PEFT refuses out_proj"),
    (_peft(["in_proj", "x_proj", "dt_proj"]), "dt_proj is targeted"),
    (_peft(["in_proj"]), "no adapter on x_proj"),
    (_peft(["in_proj", "x_proj"], rank=8), "rank 8, not 4"),
    (_no_wrap, "full fine-tuning"),
    (_unfrozen, "base weights are trainable"),
    (_alpha_r, "lora_alpha is 4, not 2·rank = 8"),
    (_dropout, "lora_dropout is 0.1"),
])
def test_lora_check_fails_plausible_wrong_answers(batch, monkeypatch, wrong, words):
    monkeypatch.delenv("EFFARCH_STRICT", raising=False)
    result, returned = _run_check(wrong, batch)
    assert result.status == "fail" and returned is reference_add_lora
    assert words in "\n".join(result.details), result.text


def test_lora_check_skips_the_stub_and_raises_when_strict(batch, monkeypatch):
    def stub(model, rank):
        raise NotImplementedError("Exercise: write add_lora")

    monkeypatch.delenv("EFFARCH_STRICT", raising=False)
    result, returned = _run_check(stub, batch)
    assert result.status == "skip" and returned is reference_add_lora
    monkeypatch.setenv("EFFARCH_STRICT", "1")
    with pytest.raises(checks.CheckFailed):
        _run_check(_peft(["in_proj"]), batch)
    checks.reset()


def _sweep():
    import pandas as pd

    rows = [("in_proj,x_proj", 1, 1.10), ("in_proj,x_proj", 4, 0.92), ("in_proj,x_proj", 16, 0.90),
            ("in_proj", 8, 0.95), ("x_proj", 8, 1.40)]
    out = []
    for targets, rank, loss in rows:
        per_rank = {"in_proj,x_proj": 9200, "in_proj": 6400, "x_proj": 2800}[targets]
        out.append({"config": f"{targets} r={rank}", "targets": targets, "rank": rank,
                    "trainable": per_rank * rank, "state_bytes": 16 * per_rank * rank,
                    "eval_loss": loss})
    return pd.DataFrame(out)


def test_read_sweep_reference():
    got = finetune.read_sweep(_sweep())
    assert got == {"best": "in_proj,x_proj r=16", "cheapest_good": "in_proj,x_proj r=4",
                   "bytes_per_rank": 16 * 9200}


@pytest.mark.parametrize("wrong", [
    lambda s: {**finetune.read_sweep(s), "best": s.loc[s["eval_loss"].idxmax(), "config"]},
    lambda s: {**finetune.read_sweep(s), "best": s.loc[s["rank"].idxmax(), "config"]},
    lambda s: {**finetune.read_sweep(s), "cheapest_good": s.loc[s["trainable"].idxmin(),
                                                                "config"]},
    lambda s: {**finetune.read_sweep(s), "bytes_per_rank": 16 * 9200},
])
def test_sweep_reading_check_fails_wrong_readings(monkeypatch, wrong):
    monkeypatch.delenv("EFFARCH_STRICT", raising=False)
    checks.reset()
    checks.check_sweep_reading(wrong, finetune.read_sweep, _sweep())
    (result,) = checks.history()
    checks.reset()
    assert result.status == "fail", result.text


def test_sweep_reading_check_passes_the_reference(monkeypatch):
    monkeypatch.delenv("EFFARCH_STRICT", raising=False)
    checks.reset()
    fn = checks.check_sweep_reading(finetune.read_sweep, finetune.read_sweep, _sweep())
    assert fn is finetune.read_sweep and checks.history()[0].status == "pass"
    checks.reset()


# ------------------------------------------------------------------------------------- script


def _env():
    path = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    env.pop("EFFARCH_STRICT", None)
    return env


def _script(*args, launcher=(sys.executable,)):
    return subprocess.run([*launcher, str(SCRIPT), *map(str, args)], capture_output=True,
                          text=True, env=_env(), cwd=ROOT)


def _snapshot(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


LAST_LINE = re.compile(r"^exact match: base \d+% -> adapter \d+% \(\d+ held-out rows\)$")


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "dates"
    r = _script("--output", out, "--max-steps", 4, "--batch-size", 4, "--eval-rows", 4)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_script_writes_a_loadable_adapter_and_ends_with_exact_match(short_run):
    from peft import PeftModel

    out, r = short_run
    assert LAST_LINE.match(r.stdout.strip().splitlines()[-1]), r.stdout[-500:]
    assert "adapter:" in r.stdout.strip().splitlines()[-2]
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert finetune.latest_checkpoint(out / "checkpoints").name == "checkpoint-4"
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["max_steps"] == 4 and run["eval_rows"] == 4
    model = PeftModel.from_pretrained(fresh_model(), out)
    assert finetune.trainable_by_module(model) == {}  # loaded for inference
    assert len(finetune.lora_matrices(model)) == 4 * model.config.num_hidden_layers
    assert "it/s" in r.stderr or "s/it" in r.stderr  # tqdm progress


@pytest.mark.parametrize(("extra", "words"), [
    ((), "exists and is not empty"),
    (("--resume", "--overwrite"), "pass one of them"),
    (("--resume", "--max-steps", 8), "these differ"),
    (("--resume", "--rank", 4), "these differ"),
    (("--overwrite", "--targets", "in_proj,out_proj"), "PEFT refuses"),
    (("--overwrite", "--targets", "dt_proj"), "never train"),
    (("--overwrite", "--quantization", "4bit"), "QLoRA on the CPU"),
])
def test_script_refusals_touch_nothing(short_run, extra, words):
    out, _ = short_run
    before = _snapshot(out)
    r = _script("--output", out, "--max-steps", 4, "--batch-size", 4, "--eval-rows", 4, *extra)
    assert r.returncode == 2, r.stdout[-500:] + r.stderr[-2000:]
    assert words in r.stderr and "TROUBLESHOOTING.md" in r.stderr
    assert _snapshot(out) == before


def test_script_resume_needs_a_checkpoint(tmp_path):
    r = _script("--output", tmp_path / "none", "--resume")
    assert r.returncode == 2 and "holds no checkpoint" in r.stderr
    assert not (tmp_path / "none").exists()


def test_script_resume_continues_to_the_same_max_steps(short_run, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "copy"
    shutil.copytree(short_run[0], out)
    assert finetune.latest_checkpoint(out / "checkpoints").name == "checkpoint-4"
    shutil.rmtree(out / "checkpoints" / "checkpoint-4")  # as if stopped before step 4's save
    r = _script("--output", out, "--max-steps", 4, "--batch-size", 4, "--eval-rows", 4,
                "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stdout and "checkpoint-2" in r.stdout
    log = json.loads((out / "train_log.json").read_text())
    assert [s for s, _ in finetune.loss_curve(log)["train"]] == [1, 2, 3, 4]
    straight = load_file(short_run[0] / "adapter_model.safetensors")
    resumed = load_file(out / "adapter_model.safetensors")
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_two_processes_follow_the_same_loss_curve(tmp_path):
    common = ("--max-steps", 3, "--batch-size", 4, "--eval-rows", 1)
    one = _script("--output", tmp_path / "one", *common)
    assert one.returncode == 0, one.stderr[-2000:]
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", "29517")
    two = _script("--output", tmp_path / "two", *common, launcher=launcher)
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "run.json").read_text())["processes"] == 2
    curves = [finetune.loss_curve(json.loads((tmp_path / d / "train_log.json").read_text()))
              for d in ("one", "two")]
    steps = [s for s, _ in curves[0]["train"]]
    assert steps == [1, 2, 3] and steps == [s for s, _ in curves[1]["train"]]
    torch.testing.assert_close([v for _, v in curves[1]["train"]],
                               [v for _, v in curves[0]["train"]], rtol=1e-3, atol=1e-4)


def test_accelerate_cpu_launch_of_one_process_is_refused(tmp_path):
    launcher = (str(Path(sys.executable).parent / "accelerate"), "launch", "--cpu",
                "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no")
    r = _script("--output", tmp_path / "out", "--max-steps", 2, launcher=launcher)
    assert r.returncode != 0 and "torchrun --nproc_per_node" in r.stderr
    assert "'Several processes on a CPU'" in r.stderr
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------------------------- plots


def test_lab_246_plots_draw_what_they_are_given():
    import matplotlib

    matplotlib.use("Agg")
    from effarch import plots

    curve = {"train": [(1, 6.0), (10, 1.5), (20, 0.5)], "eval": [(20, 0.6)]}
    fig = plots.loss_curves({"run": curve}, device="cpu", title="Live run")
    ax = fig.axes[0]
    assert [line.get_ydata().tolist() for line in ax.lines] == [[6.0, 1.5, 0.5], [0.6]]
    assert ax.get_title().startswith("Live run\nCPU")
    summaries = {"LoRA": {"weights": 2**20, "gradients": 0, "optimizer": 0, "activations": 2**21},
                 "full": {"weights": 2**20, "gradients": 2**20, "optimizer": 2**21,
                          "activations": 2**21}}
    fig = plots.training_memory(summaries, device="cpu")
    tops = [p.get_y() + p.get_height() for p in fig.axes[0].patches]
    assert max(tops) == 6.0  # MiB: the full fine-tuning bar, stacked
    fig = plots.lora_sweep(_sweep(), device="cpu")
    left, right = fig.axes
    assert len(left.lines) == 3 and right.get_ylabel().endswith("(KiB)")
    matplotlib.pyplot.close("all")


def test_parallel_scan_only_for_float32_models(batch):
    """transformers' mambapy branch fails in bf16 training (float32 states @ bf16 C): the switch
    must leave a bf16 model on the path that trains, and still train."""
    if not backends.mambapy_available():
        pytest.skip("mambapy is not installed")
    model = models.load_model("tiny-mamba", dtype=torch.bfloat16, device="cpu").model
    for m in backends.mamba_mixers(model):  # switched on before: the switch must turn it off
        m.use_mambapy = True
    finetune.use_parallel_scan(model)
    assert not any(m.use_mambapy for m in backends.mamba_mixers(model))
    model.train()
    model(**batch).loss.backward()  # would raise on the mambapy branch
    f32 = fresh_model().to("cpu")
    finetune.use_parallel_scan(f32)
    assert all(m.use_mambapy for m in backends.mamba_mixers(f32))
