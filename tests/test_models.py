import time

import pytest
import torch

from effarch import memory, models


def test_unknown_name_lists_closest():
    with pytest.raises(models.UnknownModelError) as e:
        models.get_spec("mamba-2.7b")
    msg = str(e.value)
    assert "mamba-2.8b" in msg and "TROUBLESHOOTING.md" in msg


def test_hub_id_maps_to_registry_and_unknown_hub_id_is_allowed():
    assert models.get_spec("state-spaces/mamba-2.8b-hf").name == "mamba-2.8b"
    spec = models.get_spec("someone/some-model")
    assert spec.hub_id == "someone/some-model" and spec.role == "unknown"


def test_roles_follow_profile(monkeypatch):
    monkeypatch.setenv("EFFARCH_PROFILE", "tiny")
    assert models.name_for("mamba") == "tiny-mamba"
    monkeypatch.setenv("EFFARCH_PROFILE", "full")
    assert models.name_for("moe") == "olmoe-1b-7b"
    with pytest.raises(ValueError):
        models.name_for("rnn")


@pytest.mark.parametrize("offline_env", ["1", None])
def test_offline_hub_id_fails_fast_with_advice(monkeypatch, tmp_path, offline_env):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    if offline_env:
        monkeypatch.setenv("HF_HUB_OFFLINE", offline_env)
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        if models.hub_reachable():
            pytest.skip("the hub is reachable from here: the offline path cannot be shown")
    t = time.perf_counter()
    with pytest.raises(models.ModelNotAvailableOffline) as e:
        models.load_model("state-spaces/mamba-130m-hf", device="cpu")
    assert time.perf_counter() - t < 2.0
    msg = str(e.value)
    assert "EFFARCH_PROFILE=tiny" in msg and "prefetch_models.py" in msg
    assert "TROUBLESHOOTING.md" in msg


def test_remote_code_needs_opt_in_and_pinned_revision():
    with pytest.raises(models.RemoteCodeError, match="trust_remote_code=True"):
        models.load_model("deepseek-moe-16b", device="cpu")
    with pytest.raises(models.RemoteCodeError, match="pinned commit"):
        models.load_model("deepseek-moe-16b", device="cpu", trust_remote_code=True)
    with pytest.raises(models.RemoteCodeError, match="pinned commit"):
        models.load_model("someone/custom", device="cpu", trust_remote_code=True,
                          revision="main")


def test_no_config_for_remote_code_model():
    with pytest.raises(models.ModelError, match="remote code"):
        models.get_config("deepseek-moe-16b")


def test_random_weights_on_meta_cost_nothing():
    lm = models.load_model("mixtral-8x7b", weights="random", device="meta", dtype="bfloat16")
    assert lm.record.random_weights and lm.record.device == "meta"
    assert abs(lm.record.parameters / 46.7e9 - 1) < 0.01
    assert lm.record.parameter_bytes == memory.estimate_weights_bytes("mixtral-8x7b")


def test_random_real_size_mamba_keeps_activations_near_one():
    # transformers' Mamba default (initializer_range 0.1) grows mamba-130m's random residual
    # stream to ~700 in 16 tokens; effarch draws random weights with 0.02, as other families do.
    lm = models.load_model("mamba-130m", weights="random", dtype="float32", device="cpu")
    assert lm.model.config.initializer_range == models.RANDOM_INIT_STD
    assert any("initializer_range" in note for note in lm.record.notes)
    ids = torch.randint(0, 50000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = lm.model(ids, output_hidden_states=True).hidden_states[:-1]
    assert max(h.abs().max().item() for h in hidden) < 10
    phi = models.load_model("phi-2", weights="random", device="meta")  # 0.02 already: untouched
    assert phi.model.config.initializer_range == 0.02
    assert not any("initializer_range" in note for note in phi.record.notes)


def test_random_weights_take_config_overrides():
    lm = models.load_model("phi-2", weights="random", device="meta",
                           overrides={"max_position_embeddings": 16384, "num_hidden_layers": 2})
    cfg = lm.model.config
    assert (cfg.max_position_embeddings, cfg.num_hidden_layers) == (16384, 2)
    assert len(lm.model.model.layers) == 2
    assert any("max_position_embeddings=16384" in note for note in lm.record.notes)
    with pytest.raises(ValueError, match="no field 'n_layers'"):
        models.load_model("phi-2", weights="random", device="meta", overrides={"n_layers": 2})
    with pytest.raises(ValueError, match="random weights only"):
        models.load_model("tiny-mamba", device="cpu", overrides={"num_hidden_layers": 1})


def test_too_little_memory_refuses_unless_forced(monkeypatch):
    # whatever this machine has (a 128 GB host would otherwise build a random Mixtral): 1 MiB
    monkeypatch.setattr(memory, "available",
                        lambda device=None: memory.MemoryInfo(2**20, 2**30, "cpu", "test"))
    with pytest.raises(memory.InsufficientMemoryError, match="mixtral-8x7b"):
        models.load_model("mixtral-8x7b", weights="random", device="cpu", dtype="bfloat16")
    with pytest.raises(memory.InsufficientMemoryError, match="mamba-130m"):
        models.load_model("mamba-130m", weights="random", device="cpu")
    lm = models.load_model("mamba-130m", weights="random", device="cpu", force=True)
    assert lm.record.parameters > 100e6


def test_quantisation_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(models.QuantizationUnavailable, match="CUDA GPU"):
        models.load_model("mamba-130m", weights="random", device="cpu", quantization="4bit")
    with pytest.raises(ValueError, match="quantization must be"):
        models._quantization_config(models.get_spec("mamba-130m"), "3bit", torch.float32)


def test_zoo_missing_says_how_to_rebuild(monkeypatch, tmp_path):
    (tmp_path / "data" / "zoo").mkdir(parents=True)
    (tmp_path / "pyproject.toml").write_text("")
    monkeypatch.setenv("EFFARCH_ROOT", str(tmp_path))
    with pytest.raises(models.ZooModelMissing, match="train_zoo.py"):
        models.load_model("tiny-mamba", device="cpu")
    d = tmp_path / "data" / "zoo" / "tiny-mamba"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(models.ZooModelMissing, match="not a weight file"):
        models.load_model("tiny-mamba", device="cpu")
    assert not models.is_cached("tiny-mamba")  # doctor must not call a pointer file present
    monkeypatch.delenv("EFFARCH_ROOT")
    assert models.is_cached("tiny-mamba")


def _fake_hub_cache(root, repo_id, model, tokenizer=None):
    """Lay a saved model out as the hub cache does: refs/main → snapshots/<sha>/."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / sha
    model.save_pretrained(snap, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    return sha


def test_cached_hub_model_loads_offline(monkeypatch, tmp_path):
    import huggingface_hub.constants as c
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, vocab_size=128)
    torch.manual_seed(0)
    src = LlamaForCausalLM(cfg).eval()
    _fake_hub_cache(tmp_path, "org/tiny-llama", src)
    assert models.is_cached("org/tiny-llama")
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **k: "tok")
    lm = models.load_model("org/tiny-llama", device="cpu", dtype="float32")
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(lm.model(ids).logits, src(ids).logits)
    assert lm.record.parameters == sum(p.numel() for p in src.parameters())
    assert not lm.record.random_weights
