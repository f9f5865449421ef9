"""Multi-query associative recall (``effarch.recall``): the generator's layout, the scoring of
queried values only, the small models, the differentiable scan swapped in for training, the
training loop, and ``scripts/train_recall.py --smoke`` end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from effarch import compare, recall

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(d_model=16, heads=2, vocab_size=64, max_len=64)


def test_batches_are_seeded():
    a = recall.mqar_batch(4, num_pairs=5, seq_len=40, vocab_size=64, seed=7)
    b = recall.mqar_batch(4, num_pairs=5, seq_len=40, vocab_size=64, seed=7)
    c = recall.mqar_batch(4, num_pairs=5, seq_len=40, vocab_size=64, seed=8)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, c.inputs)


@pytest.mark.parametrize("pairs,queries", [(5, None), (8, 3), (1, 1)])
def test_every_query_asks_for_a_listed_key_and_expects_its_value(pairs, queries):
    V, L = 64, 48
    batch = recall.mqar_batch(16, num_pairs=pairs, seq_len=L, vocab_size=V, seed=1,
                              num_queries=queries)
    keys, values = batch.inputs[:, 0:2 * pairs:2], batch.inputs[:, 1:2 * pairs:2]
    assert ((keys >= 1) & (keys < V // 2)).all() and ((values >= V // 2) & (values < V)).all()
    for i in range(16):
        assert len(set(keys[i].tolist())) == pairs and len(set(values[i].tolist())) == pairs
        table = dict(zip(keys[i].tolist(), values[i].tolist(), strict=True))
        where = (batch.targets[i] != recall.IGNORE).nonzero().flatten()
        assert len(where) == (queries or pairs)
        assert (where >= 2 * pairs).all() and ((where - 2 * pairs) % 2 == 0).all()
        asked = batch.inputs[i, where].tolist()
        assert len(set(asked)) == len(asked)  # each key asked once
        assert [table[k] for k in asked] == batch.targets[i, where].tolist()
    assert batch.queries == 16 * (queries or pairs)


def test_near_queries_are_more_common_than_far_ones():
    batch = recall.mqar_batch(512, num_pairs=1, seq_len=202, vocab_size=64, seed=0)
    offset = (batch.targets != recall.IGNORE).nonzero()[:, 1] - 2
    assert (offset < 50).float().mean() > 0.5  # a uniform draw would put ~25% there


@pytest.mark.parametrize("kw", [dict(num_pairs=0), dict(num_pairs=12, seq_len=40),
                                dict(num_pairs=40, seq_len=400, vocab_size=64),
                                dict(num_pairs=4, num_queries=5)])
def test_impossible_shapes_name_the_troubleshooting_section(kw):
    args = dict(num_pairs=4, seq_len=40, vocab_size=64, seed=0) | kw
    with pytest.raises(recall.RecallError, match="section 'Recall task shapes'"):
        recall.mqar_batch(2, **args)


def test_only_the_queried_values_are_scored():
    batch = recall.mqar_batch(8, num_pairs=4, seq_len=32, vocab_size=64, seed=3)
    oracle = torch.nn.functional.one_hot(batch.targets.clamp(min=0), 64).float()  # (b, L, V)
    assert recall.correct_predictions(oracle, batch.targets) == (32, 32)
    copy_input = torch.nn.functional.one_hot(batch.inputs, 64).float()  # predicts the key
    assert recall.correct_predictions(copy_input, batch.targets) == (0, 32)
    assert recall.recall_loss(oracle * 50, batch.targets) < 1e-6


@pytest.mark.parametrize("arch", recall.ARCHS)
def test_the_three_architectures(arch):
    spec = recall.RecallModelSpec(arch, **SMALL)
    cfg = recall.recall_config(spec)
    assert compare.family_of(cfg) == {"attention": "transformer", "mamba": "mamba",
                                      "hybrid": "hybrid"}[arch]
    model = recall.build_model(spec, seed=0)
    batch = recall.mqar_batch(2, num_pairs=3, seq_len=24, vocab_size=64, seed=0)
    assert 0 <= recall.accuracy(model, batch) <= 1
    state = recall.state_elements(spec, 24)
    assert state == {"attention": 2 * 2 * 16 * 24, "mamba": 2 * 32 * 16,
                     "hybrid": 32 * 16 + 2 * 16 * 24}[arch]
    with pytest.raises(recall.RecallError, match="unknown recall architecture"):
        recall.recall_config(recall.RecallModelSpec("rnn"))


@pytest.mark.parametrize("arch", ["mamba", "hybrid"])
@pytest.mark.parametrize("scan", ["parallel", "chunked"])
def test_the_training_scan_computes_the_same_model_with_gradients(arch, scan):
    model = recall.build_model(recall.RecallModelSpec(arch, d_state=8, **SMALL), seed=0)
    ids = recall.mqar_batch(2, num_pairs=3, seq_len=24, vocab_size=64, seed=0).inputs
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
    mixer = next(m for m in model.modules() if hasattr(m, "A_log"))
    with recall.training_scan(model, recall.scan_by_name(scan)) as switched:
        assert switched == {"mamba": 2, "hybrid": 1}[arch]
        logits = model(input_ids=ids, use_cache=False).logits
        logits.sum().backward()
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    assert mixer.A_log.grad.abs().sum() > 0 and mixer.dt_proj.weight.grad.abs().sum() > 0
    assert "forward" not in vars(mixer)  # the class's forward is back


def test_training_is_seeded_and_logged():
    spec = recall.RecallModelSpec("mamba", d_state=4, **SMALL)
    cfg = recall.TrainConfig(steps=4, batch_size=4, seq_len=24, pairs=(2, 3), warmup=1,
                             eval_every=2, eval_examples=4)
    runs = [recall.train(recall.build_model(spec, seed=0), spec, cfg) for _ in range(2)]
    strip = [[{k: v for k, v in r.items() if k != "seconds"} for r in run.log] for run in runs]
    assert strip[0] == strip[1] and [r["step"] for r in runs[0].log] == [2, 4]
    assert set(runs[0].log[0]) >= {"loss", "acc@2", "acc@3"}
    capped = recall.train(recall.build_model(spec, seed=0), spec,
                          recall.TrainConfig(**{**vars(cfg), "max_seconds": 0.0}))
    assert capped.log[-1]["step"] == 2 and capped.stopped_early.startswith("time cap")


def test_train_recall_smoke_ships_loadable_models(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_recall.py"), "--smoke",
                        "--out", str(tmp_path), "--only", "attention", "mamba-d16-l2-n4",
                        "hybrid"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [m["name"] for m in manifest["models"]] == [
        "attention-d16-l2", "mamba-d16-l2-n4", "hybrid-d16-l2-n16"]
    assert "done: 3 models" in (tmp_path / "train_log.txt").read_text()
    loaded = recall.load_shipped(tmp_path)
    table = recall.accuracy_table(loaded, pairs=(2, 4), seq_len=32, examples=4, seed=0)
    assert len(table) == 6 and table.accuracy.between(0, 1).all()
    assert loaded[0][1].dtype == torch.float32
    assert all(p.stat().st_size < 50_000 for p in tmp_path.rglob("*.safetensors"))


def test_train_recall_in_processes_writes_one_manifest_in_order(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_recall.py"), "--smoke",
                        f"--out={tmp_path}", "--only", "attention", "mamba-d16-l2-n4",
                        "--jobs=2"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [m["name"] for m in manifest["models"]] == ["attention-d16-l2", "mamba-d16-l2-n4"]
    assert manifest["jobs"] == 2 and manifest["complete"] and manifest["smoke"]
    log = (tmp_path / "train_log.txt").read_text()
    assert "== attention-d16-l2" in log and "== mamba-d16-l2-n4" in log
    assert "done: 2 models" in log and not (tmp_path / ".parts").exists()
    assert len(recall.load_shipped(tmp_path)) == 2


def test_missing_recall_models_say_how_to_restore_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="section 'Missing data files'"):
        recall.load_shipped(tmp_path)


def test_the_shipped_recall_models():
    folder = recall.recall_dir()
    if not (folder / recall.MANIFEST).is_file():
        pytest.skip("data/recall is not shipped yet: scripts/train_recall.py runs on a GPU")
    manifest = json.loads((folder / recall.MANIFEST).read_text())
    assert [m["name"] for m in manifest["models"]] == [s.name for s in recall.SHIPPED]
    assert not manifest["smoke"] and manifest["complete"]
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) <= 2 * 2**20
    for _, model, entry in recall.load_shipped(folder):
        assert recall.parameter_count(model) == entry["parameters"]


def test_training_accuracy_compares_at_the_last_common_step(tmp_path):
    logs = {"a": [2, 4, 6], "b": [2, 4]}  # b stopped early (a time cap)
    entries = []
    for name, steps in logs.items():
        (tmp_path / name).mkdir()
        log = [{"step": s, "loss": 1.0, "seconds": s, "acc@2": s / 10 + (name == "b")}
               for s in steps]
        (tmp_path / name / "train_log.json").write_text(json.dumps({"log": log}))
        entries.append({"name": name, "folder": name})
    recall.write_manifest(tmp_path, entries, {})
    table = recall.training_accuracy(tmp_path)
    assert table.model.tolist() == ["a", "b"] and set(table.step) == {4}
    assert table["acc@2"].tolist() == [0.4, 1.4]  # each model's own row at step 4, not its last
    assert recall.training_accuracy(tmp_path, step=2)["acc@2"].tolist() == [0.2, 1.2]
    with pytest.raises(recall.RecallError, match="common steps: \\[2, 4\\]"):
        recall.training_accuracy(tmp_path, step=6)


def test_train_recall_in_processes_leaves_the_folder_alone_when_one_fails(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")  # what an earlier run shipped
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_recall.py"), "--smoke",
                        "--out", str(tmp_path), "--only", "attention", "mamba-d16-l2-n4",
                        "--jobs", "2", "--steps", "0"],  # 0 steps: each process fails
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 1 and "is unchanged" in r.stderr, r.stderr[-2000:]
    assert (tmp_path / "manifest.json").read_text() == "{}"
    assert not (tmp_path / "train_log.txt").exists()
    assert sorted(p.name for p in (tmp_path / ".parts").glob("*.out")) == [
        "attention-d16-l2.out", "mamba-d16-l2-n4.out"]


def test_reaching_the_last_step_is_not_an_early_stop():
    spec = recall.RecallModelSpec("mamba", d_state=4, **SMALL)
    cfg = recall.TrainConfig(steps=2, batch_size=4, seq_len=24, pairs=(2,), warmup=1,
                             eval_every=2, eval_examples=4, max_seconds=0.0)
    run = recall.train(recall.build_model(spec, seed=0), spec, cfg)
    assert run.log[-1]["step"] == 2 and run.stopped_early is None
